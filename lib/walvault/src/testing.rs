//! Test support shared by the unit tests: a repository in a temporary
//! directory, bound to a cluster, with its catalog beside it.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use walvault_formats::wal::{ClusterIdentity, PgVersion, SystemId, WalSegmentSize};

use crate::config::{Config, Overrides};

/// `<tmp>/walvault-<tag>-<pid>/` (emptied first) holding `repo/` bound to
/// `system_id` (PostgreSQL 15, `segment_size`) and `catalog.db`. Returns
/// the directory, the configuration and the identity.
pub(crate) fn temp_repo(tag: &str, system_id: u64, segment_size: WalSegmentSize) -> (PathBuf, Config, ClusterIdentity) {
    let dir = std::env::temp_dir().join(format!("walvault-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let overrides = Overrides {
        repository: Some(dir.join("repo").display().to_string()),
        catalog: Some(dir.join("catalog.db")),
        ..Default::default()
    };
    let config = Config::load(&overrides, None).unwrap();
    let identity =
        ClusterIdentity { system_id: SystemId(system_id), pg_version: PgVersion::new(15).unwrap(), segment_size };
    crate::init::init(&config, &identity).unwrap();
    (dir, config, identity)
}
