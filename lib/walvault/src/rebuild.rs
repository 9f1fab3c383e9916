//! `walvault catalog rebuild`: the catalog recreated from the repository
//! alone. Reads one listing and the header of every WAL object (a ranged
//! read: no payload), so it costs little even for a large archive; then
//! every history file (tiny) and every backup manifest.

use std::collections::BTreeMap;

use walvault_formats::object::{self, HEADER_LEN};
use walvault_formats::wal::{WalFileName, parse_history};

use crate::catalog::{BackupRecord, Catalog, CatalogCluster, WalRecord};
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
    /// Backups indexed.
    pub backups: usize,
}

/// Rebuilds the catalog at `config.catalog` from the repository.
pub fn rebuild(config: &Config) -> Result<RebuildReport> {
    let repo = Repository::open_config(config)?;
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
    let mut histories = BTreeMap::new();
    for r in &records {
        if let WalFileName::History(tli) = r.name {
            let key = repo.wal_key(&r.name);
            let entries = repo
                .storage()
                .get(&key)
                .map_err(|e| e.to_string())
                .and_then(|bytes| object::decode(&bytes).map_err(|e| e.to_string()))
                .and_then(|(_, plain)| parse_history(&plain).map_err(|e| e.to_string()));
            match entries {
                Ok(entries) => {
                    histories.insert(tli.get(), entries);
                }
                Err(e) => damaged.push(format!("{key}: {e}")),
            }
        }
    }
    let mut backups = Vec::new();
    let marks = repo.keep_forever_marks()?;
    for id in repo.list_backups()? {
        match repo.get_manifest(&id) {
            Ok((m, hash)) => backups.push(BackupRecord {
                keep_forever: marks.contains(&id),
                ..BackupRecord::of_manifest(&m, &hash.to_string())
            }),
            Err(e) => damaged.push(format!("{}: {e}", repo.manifest_key(&id))),
        }
    }
    let mut catalog = Catalog::open(&config.catalog)?;
    let bound = CatalogCluster { name: cluster.name, repository: repo.location(), identity: cluster.identity };
    catalog.replace_all(&bound, &records, started)?;
    catalog.replace_backups(&backups, &histories, started)?;
    catalog.replace_drills(&repo.list_drills()?)?;
    for g in repo.list_gaps()? {
        catalog.record_dropped(&g)?;
        catalog.mark_gap_recorded(&g.name)?;
    }
    Ok(RebuildReport { wal_files: records.len(), ignored, damaged, backups: backups.len() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::TEMP_PREFIX;
    use walvault_formats::wal::{SegmentNo, TimelineId, WalSegmentSize, synthetic_segment};

    /// A damaged object is reported and left out, the others are indexed,
    /// and a stale temporary of a killed writer is removed, never indexed.
    #[test]
    fn rebuild_skips_damaged_objects_and_reclaims_stale_temporaries() {
        let (dir, config, id) = crate::testing::temp_repo("rebuild", 99, WalSegmentSize::new(1 << 20).unwrap());
        for segno in 1..=3u64 {
            let path = dir.join(format!("00000001000000000000000{segno}"));
            std::fs::write(&path, synthetic_segment(&id, TimelineId::FIRST, SegmentNo(segno), 7)).unwrap();
            crate::push::push(&config, &path).unwrap();
        }
        let wal_dir = dir.join("repo/main/wal/0000000100000000");
        let damaged = wal_dir.join("000000010000000000000002");
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[20] ^= 0xFF; // inside the header
        std::fs::write(&damaged, bytes).unwrap();
        let stale = wal_dir.join(format!("{TEMP_PREFIX}-1-000000001-000000010000000000000004"));
        std::fs::write(&stale, b"half a segment").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();

        std::fs::remove_file(dir.join("catalog.db")).unwrap();
        let report = rebuild(&config).unwrap();
        assert_eq!(report.wal_files, 2);
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        assert!(report.damaged[0].contains("000000010000000000000002"));
        assert!(!stale.exists(), "the stale temporary must be removed");
        let names: Vec<String> = Catalog::open_existing(&config.catalog)
            .unwrap()
            .all_wal()
            .unwrap()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["000000010000000000000001", "000000010000000000000003"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
