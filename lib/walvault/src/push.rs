//! archive-push: one WAL file from PostgreSQL into the repository.
//!
//! The per-segment path is: read the cluster identity (one GET), read and
//! validate the file, compress and hash it (in parallel), create-once put,
//! and record it in the catalog. No listing, no scan: the cost does not grow
//! with the archive.

use std::path::Path;

use walvault_formats::object::{self, ContentHash, EncodeOptions, HEADER_LEN};
use walvault_formats::wal::{WalFileName, parse_history, validate_segment};

use crate::catalog::{Catalog, CatalogCluster, WalRecord};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::{ClusterInfo, Repository};
use crate::storage::{PutOutcome, StorageError};

/// What happened to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushStatus {
    /// Stored now.
    Stored,
    /// Already archived with identical content (PostgreSQL retried).
    AlreadyArchived,
}

/// The result of a successful push: the status and warnings that did not
/// prevent success (a catalog that could not be updated).
#[derive(Debug)]
pub struct PushOutcome {
    /// Stored or already there.
    pub status: PushStatus,
    /// Problems that did not fail the push, one line each.
    pub warnings: Vec<String>,
}

/// How many pieces to compress in parallel: one per core (at most 8)
/// unless configured; the envelope encoder keeps pieces of at least 2 MiB.
fn workers_for(config: &Config) -> u32 {
    if config.compress_workers > 0 {
        return config.compress_workers;
    }
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)).min(8)
}

/// Checks that the bytes are what their name says they are.
fn validate(name: &WalFileName, bytes: &[u8], cluster: &ClusterInfo) -> Result<()> {
    match name {
        WalFileName::Segment(seg) | WalFileName::Partial(seg) => validate_segment(bytes, *seg, &cluster.identity)
            .map(|_| ())
            .map_err(|source| Error::Segment { name: name.to_string(), source }),
        WalFileName::History(_) => parse_history(bytes).map(|_| ()).map_err(|e| Error::NotWal {
            name: name.to_string(),
            what: "timeline history file",
            detail: e.to_string(),
        }),
        WalFileName::BackupHistory(..) => {
            let ok = bytes.len() < 64 * 1024
                && std::str::from_utf8(bytes).is_ok_and(|t| t.starts_with("START WAL LOCATION: "));
            if ok {
                Ok(())
            } else {
                Err(Error::NotWal {
                    name: name.to_string(),
                    what: "backup history file",
                    detail: "expected text starting with 'START WAL LOCATION: '".into(),
                })
            }
        }
    }
}

/// Archives the file at `path` (PostgreSQL's `%p`). Returns only once the
/// file is durably stored, or was already stored with identical content.
///
/// # Errors
/// Any failure to read, validate or store; and [`Error::Conflict`] when a
/// different file is archived under the same name, which is never
/// overwritten.
pub fn push(config: &Config, path: &Path) -> Result<PushOutcome> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name: WalFileName = file_name.parse()?;
    let repo = Repository::open(&config.repository, &config.cluster)?;
    let cluster = repo.cluster_info()?;
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    validate(&name, &bytes, &cluster)?;

    let opts = EncodeOptions { level: config.compress_level, workers: workers_for(config), ..Default::default() };
    let key = repo.wal_key(&name);
    let storage_err =
        |op, source: StorageError| Error::Storage { op, name: name.to_string(), repo: repo.location(), source };
    let (header, stored) = object::encode(&bytes, &opts)
        .map_err(|source| storage_err("compress", StorageError::Io { key: key.clone(), source }))?;
    let outcome = repo.storage().put_new(&key, &stored).map_err(|e| storage_err("store", e))?;
    let meta = match outcome {
        PutOutcome::Created(meta) => meta,
        PutOutcome::Exists => {
            let existing = existing_hash(&repo, &name, &key)?;
            if existing != header.hash {
                return Err(Error::Conflict {
                    name: name.to_string(),
                    repo: repo.location(),
                    stored: existing,
                    new: header.hash,
                });
            }
            return Ok(PushOutcome { status: PushStatus::AlreadyArchived, warnings: Vec::new() });
        }
    };

    // The file is durable: from here on nothing may fail the push. The
    // catalog is an index that `catalog rebuild` can always recreate.
    let record = WalRecord {
        name,
        segno: name.segment().and_then(|s| s.segno(cluster.identity.segment_size)).map(|s| s.0),
        plain_size: header.plain_len,
        stored_size: meta.size,
        blake3: header.hash.to_string(),
        archived_at_ms: meta.modified_ms,
    };
    let mut warnings = Vec::new();
    if let Err(e) = record_in_catalog(config, &repo, &cluster, &record) {
        warnings.push(format!("'{name}' is archived but the catalog was not updated: {e}"));
    }
    Ok(PushOutcome { status: PushStatus::Stored, warnings })
}

/// The plaintext hash of an already stored object, from its header alone.
fn existing_hash(repo: &Repository, name: &WalFileName, key: &str) -> Result<ContentHash> {
    let head = repo.storage().get_range(key, 0, HEADER_LEN as u64).map_err(|source| Error::Storage {
        op: "read",
        name: name.to_string(),
        repo: repo.location(),
        source,
    })?;
    object::parse_header(&head).map(|h| h.hash).map_err(|source| Error::Corrupt {
        name: name.to_string(),
        repo: repo.location(),
        source,
    })
}

fn record_in_catalog(config: &Config, repo: &Repository, cluster: &ClusterInfo, record: &WalRecord) -> Result<()> {
    let catalog = Catalog::open(&config.catalog)?;
    catalog.bind(&CatalogCluster {
        name: cluster.name.clone(),
        repository: repo.location(),
        identity: cluster.identity,
    })?;
    catalog.record_wal(record)
}
