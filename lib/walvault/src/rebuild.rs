//! `walvault catalog rebuild`: the catalog recreated from the repository
//! alone. Reads one listing and the header of every WAL object (a ranged
//! read: no payload), so it costs little even for a large archive.

use walvault_formats::object::{self, HEADER_LEN};
use walvault_formats::wal::WalFileName;

use crate::catalog::{Catalog, CatalogCluster, WalRecord};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::{Repository, now_ms};

/// What a rebuild found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// WAL files indexed.
    pub wal_files: usize,
    /// Objects under the WAL prefix that are not WAL files (ignored).
    pub ignored: Vec<String>,
    /// WAL objects whose header is damaged (not indexed), with the reason.
    pub damaged: Vec<String>,
}

/// Rebuilds the catalog at `config.catalog` from the repository.
pub fn rebuild(config: &Config) -> Result<RebuildReport> {
    let repo = Repository::open(&config.repository, &config.cluster)?;
    let cluster = repo.cluster_info()?;
    let started = now_ms();
    let listing = repo.storage().list(&repo.wal_prefix()).map_err(|source| Error::Storage {
        op: "list",
        name: repo.wal_prefix(),
        repo: repo.location(),
        source,
    })?;
    let mut records = Vec::with_capacity(listing.len());
    let mut ignored = Vec::new();
    let mut damaged = Vec::new();
    for meta in listing {
        let file = meta.key.rsplit('/').next().unwrap_or_default();
        let Ok(name) = file.parse::<WalFileName>() else {
            ignored.push(meta.key);
            continue;
        };
        if repo.wal_key(&name) != meta.key {
            ignored.push(meta.key);
            continue;
        }
        let head = repo.storage().get_range(&meta.key, 0, HEADER_LEN as u64).map_err(|source| Error::Storage {
            op: "read",
            name: name.to_string(),
            repo: repo.location(),
            source,
        })?;
        // One damaged object must not stop the index of all the others; it
        // is reported, and left out as if missing (which it effectively is).
        let header = match object::parse_header(&head) {
            Ok(h) => h,
            Err(e) => {
                damaged.push(format!("{}: {e}", meta.key));
                continue;
            }
        };
        records.push(WalRecord::of_object(name, cluster.identity.segment_size, &header, &meta));
    }
    let mut catalog = Catalog::open(&config.catalog)?;
    let bound = CatalogCluster { name: cluster.name, repository: repo.location(), identity: cluster.identity };
    catalog.replace_all(&bound, &records, started)?;
    Ok(RebuildReport { wal_files: records.len(), ignored, damaged })
}
