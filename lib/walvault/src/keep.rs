//! `walvault keep-forever ID [--undo]`: marks a backup that retention must
//! never delete (a pre-upgrade backup, one kept for an audit), or removes
//! the mark.
//!
//! The mark is an object in the repository (`<cluster>/backups/<id>/keep-forever`),
//! so it survives the loss of the catalog; the catalog only indexes it.

use std::time::Duration;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock::{LockMode, RepoLock};
use crate::repo::Repository;

/// Sets (`keep`) or clears the keep-forever mark of backup `id`. Returns
/// warnings (a catalog that could not be updated).
///
/// # Errors
/// [`Error::Setting`] when no such backup exists; storage errors.
pub fn keep_forever(config: &Config, id: &str, keep: bool) -> Result<Vec<String>> {
    let repo = Repository::open_config(config)?;
    repo.cluster_info()?;
    let key = repo.manifest_key(id);
    let exists = repo.storage().head(&key).map_err(|source| Error::Storage {
        op: "read",
        name: key.clone(),
        repo: repo.location(),
        source,
    })?;
    if id.contains('/') || exists.is_none() {
        return Err(Error::Setting(format!(
            "backup '{id}' does not exist in repository '{}': list backups with 'walvault info'",
            repo.location()
        )));
    }
    // Shared, like a backup: an expire running now must not delete the
    // backup between the check above and the mark.
    let _lock = RepoLock::acquire(&repo, LockMode::Shared, "keep-forever", Duration::from_secs(60))?;
    repo.set_keep_forever(id, keep)?;
    let mut warnings = Vec::new();
    let updated = Catalog::open_existing(&config.catalog).and_then(|c| c.set_keep_forever(id, keep));
    if let Err(e) = updated {
        warnings.push(format!("the mark is stored in the repository but the catalog was not updated: {e}"));
    }
    Ok(warnings)
}
