//! `walvault init`: binds a repository and a cluster name to one
//! PostgreSQL cluster, and the catalog to both.

use walvault_formats::wal::ClusterIdentity;

use crate::catalog::{Catalog, CatalogCluster};
use crate::config::Config;
use crate::error::Result;
use crate::repo::Repository;

/// What `init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// False when the cluster was already bound to the same identity.
    pub created: bool,
    /// Problems that did not fail the init (the catalog).
    pub warnings: Vec<String>,
}

/// Binds `config`'s repository and cluster name to `identity`.
pub fn init(config: &Config, identity: &ClusterIdentity) -> Result<InitReport> {
    let repo = Repository::open(&config.repository, &config.cluster)?;
    let created = repo.init(identity)?;
    let mut warnings = Vec::new();
    let bound = CatalogCluster { name: config.cluster.clone(), repository: repo.location(), identity: *identity };
    if let Err(e) = Catalog::open(&config.catalog).and_then(|c| c.bind(&bound)) {
        warnings.push(format!("the repository is initialized but the catalog is not: {e}"));
    }
    Ok(InitReport { created, warnings })
}
