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

/// A manifest of backup `id` of cluster `main` (system identifier
/// `system_id`, PostgreSQL 15, timeline 1, segments of `seg_size` bytes)
/// whose WAL runs from segment `start_seg` to `stop_seg`, holding one file
/// `base/1` made of `chunks` (hash, length).
pub(crate) fn chunked_manifest(
    id: &str,
    system_id: u64,
    seg_size: u64,
    (start_seg, stop_seg): (u64, u64),
    chunks: &[(walvault_formats::manifest::Hash, u64)],
) -> walvault_formats::manifest::Manifest {
    use walvault_formats::manifest::{ChunkRef, Entry, EntryKind, FileData, MANIFEST_FORMAT, Manifest, Totals};
    use walvault_formats::wal::{Lsn, SegmentName, SegmentNo, TimelineId};
    let size_of = WalSegmentSize::new(seg_size).unwrap();
    let name = |s| SegmentName::from_segno(TimelineId::FIRST, SegmentNo(s), size_of).to_string();
    let chunks: Vec<ChunkRef> = chunks.iter().map(|&(hash, len)| ChunkRef { hash, len }).collect();
    let size = chunks.iter().map(|c| c.len).sum();
    Manifest {
        format: MANIFEST_FORMAT,
        id: id.into(),
        cluster: "main".into(),
        system_identifier: system_id,
        pg_version: 15,
        wal_segment_size: seg_size,
        timeline: 1,
        start_lsn: Lsn(start_seg * seg_size + 0x28),
        stop_lsn: Lsn(stop_seg * seg_size + 0x100),
        start_time_ms: start_seg as i64 * 1000,
        stop_time_ms: stop_seg as i64 * 1000 + 500,
        start_wal: name(start_seg),
        stop_wal: name(stop_seg),
        next_xid: 740,
        backup_label: String::new(),
        tablespace_map: String::new(),
        tablespaces: vec![],
        chunk_size: 4096,
        entries: vec![
            Entry { path: "base".into(), mode: 0o700, size: 0, mtime_ms: 0, kind: EntryKind::Dir },
            Entry {
                path: "base/1".into(),
                mode: 0o600,
                size,
                mtime_ms: 0,
                kind: EntryKind::File { data: FileData::Chunks { chunks } },
            },
        ],
        totals: Totals::default(),
        walvault_version: "test".into(),
    }
}
