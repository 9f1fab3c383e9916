//! `walvault init`: binds a repository and a cluster name to one
//! PostgreSQL cluster, and the catalog to both.

use std::path::PathBuf;

use walvault_formats::wal::{ClusterIdentity, PgVersion, SystemId, WalSegmentSize};

use crate::catalog::{Catalog, CatalogCluster};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;

/// What `init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// False when the cluster was already bound to the same identity.
    pub created: bool,
    /// Problems that did not fail the init (the catalog).
    pub warnings: Vec<String>,
}

/// Where `walvault init` learns the cluster's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// Read from a data directory (the server may be running).
    PgData(PathBuf),
    /// Given explicitly: system identifier, major version, segment size in
    /// bytes.
    Explicit {
        /// `pg_control.system_identifier`.
        system_id: u64,
        /// Major version, 12 to 18.
        pg_version: u32,
        /// `wal_segment_size` in bytes.
        wal_segment_size: u64,
    },
}

impl IdentitySource {
    /// The identity this source describes.
    pub fn resolve(&self) -> Result<ClusterIdentity> {
        match self {
            IdentitySource::PgData(dir) => crate::pgdata::identity_from_pgdata(dir),
            IdentitySource::Explicit { system_id, pg_version, wal_segment_size } => Ok(ClusterIdentity {
                system_id: SystemId(*system_id),
                pg_version: PgVersion::new(*pg_version)
                    .ok_or_else(|| Error::Setting(format!("--pg-version is {pg_version}, expected 12 to 18")))?,
                segment_size: WalSegmentSize::new(*wal_segment_size).ok_or_else(|| {
                    Error::Setting(format!(
                        "--wal-segment-size is {wal_segment_size}, expected a power of two from 1 MiB to 1 GiB"
                    ))
                })?,
            }),
        }
    }
}

/// Binds `config`'s repository and cluster name to `identity`.
pub fn init(config: &Config, identity: &ClusterIdentity) -> Result<InitReport> {
    let repo = Repository::open_config(config)?;
    let created = repo.init(identity)?;
    let mut warnings = Vec::new();
    let bound = CatalogCluster { name: config.cluster.clone(), repository: repo.location(), identity: *identity };
    let catalog = Catalog::open(&config.catalog).and_then(|c| c.bind(&bound).map(|()| c));
    if let Err(e) = &catalog {
        warnings.push(format!("the repository is initialized but the catalog is not: {e}"));
    }
    if repo.is_object_store() {
        // Does the store honour If-None-Match? Recorded in the repository
        // and the catalog; archive-push follows it.
        match crate::probe::probe_and_record(&repo, catalog.as_ref().ok()) {
            Ok(report) => warnings.extend(report.warnings),
            Err(e) => warnings.push(format!(
                "unable to probe whether the store honours conditional writes ({e}); archive-push checks before \
                 each write until 'walvault check' records a probe"
            )),
        }
    }
    Ok(InitReport { created, warnings })
}
