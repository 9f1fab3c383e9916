//! Reading a cluster's identity from its data directory, whether the server
//! runs or not: `PG_VERSION`, the system identifier at the start of
//! `global/pg_control`, and the long page header of a segment in `pg_wal`
//! (which carries the segment size and, again, the system identifier).

use std::path::Path;

use walvault_formats::wal::{
    ClusterIdentity, LONG_PAGE_HEADER_LEN, PgVersion, SegmentHeader, SystemId, WalFileName, WalSegmentSize,
};

use crate::error::{Error, Result};

/// The identity of the cluster whose data directory is `pgdata`.
pub fn identity_from_pgdata(pgdata: &Path) -> Result<ClusterIdentity> {
    let fail = |detail: String| Error::PgData { path: pgdata.to_path_buf(), detail };
    let version_text = std::fs::read_to_string(pgdata.join("PG_VERSION"))
        .map_err(|e| fail(format!("unable to read 'PG_VERSION': {e}")))?;
    let major: u32 =
        version_text.trim().parse().map_err(|_| fail(format!("'PG_VERSION' holds '{}'", version_text.trim())))?;
    let pg_version =
        PgVersion::new(major).ok_or_else(|| fail(format!("PostgreSQL {major} is not supported (12 to 18 are)")))?;

    // system_identifier is the first field of ControlFileData in every
    // version: a uint64 at offset 0, in the server's byte order.
    let control = std::fs::read(pgdata.join("global/pg_control"))
        .map_err(|e| fail(format!("unable to read 'global/pg_control': {e}")))?;
    let first8: [u8; 8] = control
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| fail("'global/pg_control' is truncated".into()))?;
    let system_id = SystemId(u64::from_le_bytes(first8));

    // The segment size lives at a version-dependent offset of pg_control;
    // every segment's first page states it plainly, so read that instead.
    let wal_dir = pgdata.join("pg_wal");
    let entries = std::fs::read_dir(&wal_dir).map_err(|e| fail(format!("unable to read 'pg_wal': {e}")))?;
    let mut segments: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| matches!(n.parse::<WalFileName>(), Ok(WalFileName::Segment(_))))
        .collect();
    segments.sort();
    let newest = segments.last().ok_or_else(|| fail("no WAL segment in 'pg_wal'".into()))?;
    let mut head = vec![0u8; LONG_PAGE_HEADER_LEN];
    let path = wal_dir.join(newest);
    std::io::Read::read_exact(
        &mut std::fs::File::open(&path).map_err(|e| fail(format!("unable to read '{}': {e}", path.display())))?,
        &mut head,
    )
    .map_err(|e| fail(format!("unable to read '{}': {e}", path.display())))?;
    let header = SegmentHeader::parse(&head).map_err(|e| fail(format!("'pg_wal/{newest}': {e}")))?;
    if header.system_id != system_id {
        return Err(fail(format!(
            "'pg_wal/{newest}' has system identifier {}, 'global/pg_control' has {system_id}",
            header.system_id
        )));
    }
    if header.pg_version != pg_version {
        return Err(fail(format!(
            "'pg_wal/{newest}' is WAL of PostgreSQL {}, 'PG_VERSION' says {pg_version}",
            header.pg_version
        )));
    }
    let segment_size = WalSegmentSize::new(u64::from(header.segment_size))
        .ok_or_else(|| fail(format!("'pg_wal/{newest}' states an invalid segment size {}", header.segment_size)))?;
    Ok(ClusterIdentity { system_id, pg_version, segment_size })
}
