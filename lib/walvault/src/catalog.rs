//! The catalog: a local SQLite index of what the repository holds.
//!
//! The repository is the source of truth; every row here can be rebuilt
//! from it ([`crate::rebuild`]). The catalog uses WAL journal mode and a busy
//! timeout so that concurrent archive-push processes and an operator's
//! command can all write. Schema changes are numbered migrations recorded in
//! `PRAGMA user_version`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::collections::BTreeMap;

use walvault_formats::manifest::{Manifest, Totals};
use walvault_formats::object::ObjectHeader;
use walvault_formats::wal::{
    ClusterIdentity, HistoryEntry, Lsn, PgVersion, SystemId, TimelineId, WalFileName, WalSegmentSize,
};

pub use crate::repo::DrillRecord;

use crate::error::{Error, Result};
use crate::storage::ObjectMeta;

/// Migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: clusters and WAL files.
    "CREATE TABLE cluster (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        repository TEXT NOT NULL,
        system_identifier TEXT NOT NULL,
        pg_version INTEGER NOT NULL,
        wal_segment_size INTEGER NOT NULL
    );
    CREATE TABLE wal_file (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('segment', 'partial', 'history', 'backup')),
        timeline INTEGER NOT NULL,
        segno INTEGER,
        plain_size INTEGER NOT NULL,
        stored_size INTEGER NOT NULL,
        blake3 TEXT NOT NULL,
        archived_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX wal_file_by_position ON wal_file (kind, timeline, segno);
    CREATE INDEX wal_file_by_time ON wal_file (archived_at_ms);",
    // 2: base backups (a summary of each manifest) and timelines (the
    // content of each history file).
    "CREATE TABLE backup (
        id TEXT PRIMARY KEY,
        timeline INTEGER NOT NULL,
        start_lsn INTEGER NOT NULL,
        stop_lsn INTEGER NOT NULL,
        start_time_ms INTEGER NOT NULL,
        stop_time_ms INTEGER NOT NULL,
        start_wal TEXT NOT NULL,
        stop_wal TEXT NOT NULL,
        next_xid TEXT NOT NULL,
        pg_version INTEGER NOT NULL,
        files INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        stored_bytes INTEGER NOT NULL,
        new_bytes INTEGER NOT NULL,
        new_objects INTEGER NOT NULL,
        manifest_blake3 TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE timeline_history (
        timeline INTEGER NOT NULL,
        parent INTEGER NOT NULL,
        switch_lsn INTEGER NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (timeline, parent)
    ) WITHOUT ROWID;",
    // 3: keep-forever marks on backups, and restore drills.
    "ALTER TABLE backup ADD COLUMN keep_forever INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE drill (
        id TEXT PRIMARY KEY,
        backup TEXT NOT NULL,
        target TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        finished_at_ms INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        rto_ms INTEGER NOT NULL,
        detail TEXT NOT NULL
    ) WITHOUT ROWID;",
    // 4: what the conditional-create probe found out about each
    // repository's store (read by archive-push instead of the network).
    "CREATE TABLE store_probe (
        repository TEXT PRIMARY KEY,
        conditional_create TEXT NOT NULL CHECK (conditional_create IN ('honoured', 'ignored')),
        probed_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 5: WAL files archive-push let PostgreSQL recycle without storing
    // them (queue-max): the holes in the PITR window, for info, check and
    // backup to report.
    "CREATE TABLE wal_gap (
        name TEXT PRIMARY KEY,
        timeline INTEGER NOT NULL,
        segno INTEGER,
        dropped_at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
    ) WITHOUT ROWID;",
    // 6: whether a dropped file's record is in the repository yet
    // (`<cluster>/gaps/<name>`): written as soon as the repository can be
    // reached again, so that `catalog rebuild` finds the gap too.
    "ALTER TABLE wal_gap ADD COLUMN in_repository INTEGER NOT NULL DEFAULT 0;",
];

/// How long a writer waits for another's transaction before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// An open catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

/// One archived WAL file, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    /// The file name.
    pub name: WalFileName,
    /// Segment number for segments, `.partial` and `.backup` files.
    pub segno: Option<u64>,
    /// Size of the WAL file.
    pub plain_size: u64,
    /// Size of the stored object.
    pub stored_size: u64,
    /// BLAKE3 of the WAL file, hex.
    pub blake3: String,
    /// When the object was stored (its modification time), ms since epoch.
    pub archived_at_ms: i64,
}

impl WalRecord {
    /// The record of a stored WAL object: its name, envelope header and
    /// storage metadata (whose modification time is the archive time, so
    /// that a push and a rebuild record the same thing).
    pub fn of_object(name: WalFileName, size: WalSegmentSize, header: &ObjectHeader, meta: &ObjectMeta) -> WalRecord {
        WalRecord {
            name,
            segno: name.segment().and_then(|s| s.segno(size)).map(|s| s.0),
            plain_size: header.plain_len,
            stored_size: meta.size,
            blake3: header.hash.to_string(),
            archived_at_ms: meta.modified_ms,
        }
    }
}

/// The cluster a catalog indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogCluster {
    /// Cluster name.
    pub name: String,
    /// Repository location.
    pub repository: String,
    /// Identity.
    pub identity: ClusterIdentity,
}

/// A base backup, as recorded: the summary of its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    /// Backup identifier.
    pub id: String,
    /// Timeline it was taken on.
    pub timeline: u32,
    /// `pg_backup_start` LSN.
    pub start_lsn: Lsn,
    /// `pg_backup_stop` LSN (consistency point).
    pub stop_lsn: Lsn,
    /// Start, ms since the epoch.
    pub start_time_ms: i64,
    /// Consistency time, ms since the epoch.
    pub stop_time_ms: i64,
    /// First WAL segment needed.
    pub start_wal: String,
    /// Last WAL segment needed for consistency.
    pub stop_wal: String,
    /// Next full transaction id after the stop.
    pub next_xid: u64,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// Sizes from the manifest.
    pub totals: Totals,
    /// BLAKE3 of the stored manifest's plaintext, hex.
    pub manifest_blake3: String,
    /// Marked to be kept whatever the retention policy says.
    pub keep_forever: bool,
}

impl BackupRecord {
    /// The record of a manifest whose plaintext hashes to `manifest_blake3`.
    pub fn of_manifest(m: &Manifest, manifest_blake3: &str) -> BackupRecord {
        BackupRecord {
            id: m.id.clone(),
            timeline: m.timeline,
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            start_time_ms: m.start_time_ms,
            stop_time_ms: m.stop_time_ms,
            start_wal: m.start_wal.clone(),
            stop_wal: m.stop_wal.clone(),
            next_xid: m.next_xid,
            pg_version: m.pg_version,
            totals: m.totals,
            manifest_blake3: manifest_blake3.to_string(),
            keep_forever: false,
        }
    }
}

/// A WAL file archive-push let PostgreSQL recycle without storing it
/// (`queue-max`): PITR across it is impossible. The same record is a
/// catalog row and, as JSON, the repository's `<cluster>/gaps/<name>`, so
/// that `catalog rebuild` finds the gap again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DroppedWal {
    /// The file name.
    pub name: String,
    /// Its timeline.
    pub timeline: u32,
    /// Its segment number (segments only).
    pub segno: Option<u64>,
    /// When archive-push dropped it, ms since the epoch.
    pub dropped_at_ms: i64,
    /// Why: the backlog and the error that kept it from the repository.
    pub reason: String,
}

/// A `wal_gap` row: name, timeline, segno, dropped_at_ms, reason.
fn dropped_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DroppedWal> {
    Ok(DroppedWal {
        name: r.get(0)?,
        timeline: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
        segno: r.get::<_, Option<i64>>(2)?.map(to_u64),
        dropped_at_ms: r.get(3)?,
        reason: r.get(4)?,
    })
}

/// A run of consecutive archived segments on one timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentRun {
    /// Timeline.
    pub timeline: u32,
    /// First segment number.
    pub first: u64,
    /// Last segment number.
    pub last: u64,
    /// Sum of WAL bytes.
    pub plain_bytes: u64,
    /// Sum of stored bytes.
    pub stored_bytes: u64,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Catalog {
    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Catalog { path: self.path.clone(), detail: e.to_string() }
    }

    /// Opens (creating if needed, with its directory) and migrates the
    /// catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog> {
        Self::open_with(path, true)
    }

    /// Opens an existing catalog; [`Error::NoCatalog`] if there is none.
    pub fn open_existing(path: &Path) -> Result<Catalog> {
        if !path.exists() {
            return Err(Error::NoCatalog(path.to_path_buf()));
        }
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, create: bool) -> Result<Catalog> {
        let fail = |detail: String| Error::Catalog { path: path.to_path_buf(), detail };
        if create && let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("unable to create '{}': {e}", dir.display())))?;
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags).map_err(|e| fail(e.to_string()))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| fail(e.to_string()))?;
        let mut cat = Catalog { conn, path: path.to_path_buf() };
        cat.setup()?;
        Ok(cat)
    }

    fn setup(&mut self) -> Result<()> {
        // WAL journal mode lets readers and one writer work at once; losing
        // the last transactions in a power cut is acceptable (NORMAL) since
        // the repository, not the catalog, is the truth.
        let mode: String =
            self.conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(self.err(format!("cannot use WAL journal mode (got '{mode}')")));
        }
        self.conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;").map_err(|e| self.err(e))?;
        // Keep SQLite's default checkpoint on close. Skipping it (to save
        // the fsyncs of each push's last close) was measured to break
        // invariant 9: after a large transaction (a rebuild) the WAL file
        // stays big, and every later push's connection re-reads it to
        // rebuild the WAL index: 0.3 s per push with a million rows.
        let version: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        let applied = usize::try_from(version).unwrap_or(usize::MAX);
        if applied == MIGRATIONS.len() {
            return Ok(());
        }
        if applied > MIGRATIONS.len() {
            return Err(self.err(format!(
                "schema version {version} is newer than this walvault ({}); upgrade walvault",
                MIGRATIONS.len()
            )));
        }
        // IMMEDIATE takes the write lock first, so two processes migrating
        // at once serialize; the second sees the new version and skips.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::Catalog { path: self.path.clone(), detail: e.to_string() })?;
        let current: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| Error::Catalog { path: self.path.clone(), detail: e.to_string() })?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
            tx.execute_batch(sql)
                .and_then(|()| tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1)))
                .map_err(|e| Error::Catalog { path: self.path.clone(), detail: format!("migration {}: {e}", i + 1) })?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cluster this catalog indexes, if bound.
    pub fn cluster(&self) -> Result<Option<CatalogCluster>> {
        let row = self
            .conn
            .query_row(
                "SELECT name, repository, system_identifier, pg_version, wal_segment_size FROM cluster WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((name, repository, sysid, version, segsize)) = row else { return Ok(None) };
        let identity = (|| {
            Some(ClusterIdentity {
                system_id: SystemId(sysid.parse().ok()?),
                pg_version: PgVersion::new(u32::try_from(version).ok()?)?,
                segment_size: WalSegmentSize::new(to_u64(segsize))?,
            })
        })()
        .ok_or_else(|| self.err("the cluster row is invalid"))?;
        Ok(Some(CatalogCluster { name, repository, identity }))
    }

    /// Binds the catalog to a cluster, or checks that it already is bound to
    /// this one. A catalog never silently mixes two clusters.
    pub fn bind(&self, c: &CatalogCluster) -> Result<()> {
        if let Some(existing) = self.cluster()? {
            if existing == *c {
                return Ok(());
            }
            return Err(self.err(format!(
                "indexes cluster '{}' (system identifier {}) of repository '{}', not cluster '{}' \
                 (system identifier {}) of repository '{}'",
                existing.name,
                existing.identity.system_id,
                existing.repository,
                c.name,
                c.identity.system_id,
                c.repository
            )));
        }
        self.set_cluster(c)
    }

    fn set_cluster(&self, c: &CatalogCluster) -> Result<()> {
        set_cluster(&self.conn, c).map_err(|e| self.err(e))
    }

    /// Records one archived file (replacing an older record of the name).
    pub fn record_wal(&self, r: &WalRecord) -> Result<()> {
        insert_wal(&self.conn, r).map_err(|e| self.err(e))
    }

    /// Replaces the whole index with `records`, atomically: readers see the
    /// old or the new state. Rows of files archived at or after
    /// `listed_since_ms` are kept even if absent from `records`, so that a
    /// push that lands while a rebuild runs is not forgotten.
    pub fn replace_all(&mut self, c: &CatalogCluster, records: &[WalRecord], listed_since_ms: i64) -> Result<()> {
        let path = self.path.clone();
        let fail = |e: rusqlite::Error| Error::Catalog { path: path.clone(), detail: e.to_string() };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
        set_cluster(&tx, c).map_err(fail)?;
        tx.execute("CREATE TEMP TABLE listed (name TEXT PRIMARY KEY) WITHOUT ROWID", []).map_err(fail)?;
        {
            let mut listed = tx.prepare("INSERT INTO temp.listed (name) VALUES (?1)").map_err(fail)?;
            for r in records {
                insert_wal(&tx, r).map_err(fail)?;
                listed.execute([r.name.to_string()]).map_err(fail)?;
            }
        }
        tx.execute(
            "DELETE FROM wal_file WHERE archived_at_ms < ?1 AND name NOT IN (SELECT name FROM temp.listed)",
            [listed_since_ms],
        )
        .map_err(fail)?;
        tx.execute("DROP TABLE temp.listed", []).map_err(fail)?;
        tx.commit().map_err(fail)
    }

    /// Runs of consecutive segments, per timeline, in order. Gaps are what
    /// lies between two runs of the same timeline.
    pub fn segment_runs(&self) -> Result<Vec<SegmentRun>> {
        // The classic "islands" query: within a timeline, segno minus its
        // rank is constant along a run of consecutive segments.
        let mut stmt = self
            .conn
            .prepare(
                "SELECT timeline, MIN(segno), MAX(segno), SUM(plain_size), SUM(stored_size) FROM (
                    SELECT timeline, segno, plain_size, stored_size,
                           segno - ROW_NUMBER() OVER (PARTITION BY timeline ORDER BY segno) AS island
                    FROM wal_file WHERE kind = 'segment')
                 GROUP BY timeline, island ORDER BY timeline, MIN(segno)",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SegmentRun {
                    timeline: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    first: to_u64(r.get(1)?),
                    last: to_u64(r.get(2)?),
                    plain_bytes: to_u64(r.get(3)?),
                    stored_bytes: to_u64(r.get(4)?),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Names of archived files of one kind (`history`, `partial`, `backup`),
    /// in name order.
    pub fn names_of_kind(&self, kind: &str) -> Result<Vec<String>> {
        let mut stmt =
            self.conn.prepare("SELECT name FROM wal_file WHERE kind = ?1 ORDER BY name").map_err(|e| self.err(e))?;
        let rows = stmt.query_map([kind], |r| r.get::<_, String>(0)).map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The most recently archived file and when.
    pub fn newest(&self) -> Result<Option<(String, i64)>> {
        self.conn
            .query_row(
                "SELECT name, archived_at_ms FROM wal_file ORDER BY archived_at_ms DESC, name DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records a backup (replacing an older record of the same id).
    pub fn record_backup(&self, b: &BackupRecord) -> Result<()> {
        insert_backup(&self.conn, b).map_err(|e| self.err(e))
    }

    /// Every backup, oldest first.
    pub fn backups(&self) -> Result<Vec<BackupRecord>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, timeline, start_lsn, stop_lsn, start_time_ms, stop_time_ms, start_wal, stop_wal, next_xid,
                        pg_version, files, bytes, stored_bytes, new_bytes, new_objects, manifest_blake3, keep_forever
                 FROM backup ORDER BY stop_lsn, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(BackupRecord {
                    id: r.get(0)?,
                    timeline: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    start_lsn: Lsn(to_u64(r.get(2)?)),
                    stop_lsn: Lsn(to_u64(r.get(3)?)),
                    start_time_ms: r.get(4)?,
                    stop_time_ms: r.get(5)?,
                    start_wal: r.get(6)?,
                    stop_wal: r.get(7)?,
                    next_xid: r.get::<_, String>(8)?.parse().unwrap_or(0),
                    pg_version: u32::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
                    totals: Totals {
                        files: to_u64(r.get(10)?),
                        bytes: to_u64(r.get(11)?),
                        stored_bytes: to_u64(r.get(12)?),
                        new_bytes: to_u64(r.get(13)?),
                        new_objects: to_u64(r.get(14)?),
                    },
                    manifest_blake3: r.get(15)?,
                    keep_forever: r.get::<_, i64>(16)? != 0,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Sets or clears a backup's keep-forever mark.
    pub fn set_keep_forever(&self, id: &str, keep: bool) -> Result<()> {
        self.conn
            .execute("UPDATE backup SET keep_forever = ?2 WHERE id = ?1", params![id, i64::from(keep)])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Removes a backup's record (after expire deleted its manifest).
    pub fn forget_backup(&self, id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM backup WHERE id = ?1", [id]).map(|_| ()).map_err(|e| self.err(e))
    }

    /// Removes WAL records by name (after expire deleted the files).
    pub fn forget_wal(&mut self, names: &[String]) -> Result<()> {
        self.delete_names("DELETE FROM wal_file WHERE name = ?1", names)
    }

    /// Runs `delete` (one `?1` parameter) for each of `names`, in one
    /// transaction.
    fn delete_names(&mut self, delete: &str, names: &[String]) -> Result<()> {
        let path = self.path.clone();
        let fail = |e: rusqlite::Error| Error::Catalog { path: path.clone(), detail: e.to_string() };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
        {
            let mut stmt = tx.prepare(delete).map_err(fail)?;
            for n in names {
                stmt.execute([n]).map_err(fail)?;
            }
        }
        tx.commit().map_err(fail)
    }

    /// Records what the conditional-create probe found for `repository`
    /// (its location): whether the store honours `If-None-Match: *`.
    /// Replaces an older record.
    pub fn record_store_probe(&self, repository: &str, honoured: bool, probed_at_ms: i64) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO store_probe (repository, conditional_create, probed_at_ms) VALUES (?1, ?2, ?3)",
                params![repository, if honoured { "honoured" } else { "ignored" }, probed_at_ms],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The recorded probe of `repository`: whether its store honours
    /// conditional create, and when that was found; `None` if never probed.
    pub fn store_probe(&self, repository: &str) -> Result<Option<(bool, i64)>> {
        self.conn
            .query_row(
                "SELECT conditional_create, probed_at_ms FROM store_probe WHERE repository = ?1",
                params![repository],
                |r| Ok((r.get::<_, String>(0)? == "honoured", r.get::<_, i64>(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records a drill (replacing one with the same id).
    pub fn record_drill(&self, d: &DrillRecord) -> Result<()> {
        insert_drill(&self.conn, d).map_err(|e| self.err(e))
    }

    /// Every recorded drill, oldest first.
    pub fn drills(&self) -> Result<Vec<DrillRecord>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, backup, target, started_at_ms, finished_at_ms, ok, rto_ms, detail FROM drill
                 ORDER BY started_at_ms, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DrillRecord {
                    id: r.get(0)?,
                    backup: r.get(1)?,
                    target: r.get(2)?,
                    started_at_ms: r.get(3)?,
                    finished_at_ms: r.get(4)?,
                    ok: r.get::<_, i64>(5)? != 0,
                    rto_ms: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Replaces every drill record (catalog rebuild).
    pub fn replace_drills(&mut self, drills: &[DrillRecord]) -> Result<()> {
        let path = self.path.clone();
        let fail = |e: rusqlite::Error| Error::Catalog { path: path.clone(), detail: e.to_string() };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
        tx.execute("DELETE FROM drill", []).map_err(fail)?;
        for d in drills {
            insert_drill(&tx, d).map_err(fail)?;
        }
        tx.commit().map_err(fail)
    }

    /// Records that `gap.name` was dropped without being archived (a second
    /// drop of the same file keeps the first record).
    pub fn record_dropped(&self, gap: &DroppedWal) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO wal_gap (name, timeline, segno, dropped_at_ms, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![gap.name, i64::from(gap.timeline), gap.segno.map(to_i64), gap.dropped_at_ms, gap.reason],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Dropped files whose record is not in the repository yet, in name
    /// order.
    pub fn gaps_to_record(&self) -> Result<Vec<DroppedWal>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, timeline, segno, dropped_at_ms, reason FROM wal_gap WHERE in_repository = 0 \
                 ORDER BY name",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], dropped_row).map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// Notes that the record of dropped file `name` is in the repository.
    pub fn mark_gap_recorded(&self, name: &str) -> Result<()> {
        self.conn
            .execute("UPDATE wal_gap SET in_repository = 1 WHERE name = ?1", params![name])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Forgets the records of dropped files `names` (expire, once no
    /// remaining backup's recovery crosses them).
    pub fn forget_gaps(&mut self, names: &[String]) -> Result<()> {
        self.delete_names("DELETE FROM wal_gap WHERE name = ?1", names)
    }

    /// Every dropped-WAL record, archived since or not, in name order (what
    /// the repository's `gaps/` holds).
    pub fn gap_records(&self) -> Result<Vec<DroppedWal>> {
        self.query_gaps("")
    }

    /// The dropped WAL files that the archive still lacks (one archived
    /// since, by `walvault repo sync` say, is no gap), in name order.
    pub fn dropped(&self) -> Result<Vec<DroppedWal>> {
        self.query_gaps("WHERE name NOT IN (SELECT name FROM wal_file)")
    }

    /// The `wal_gap` rows `filter` (a WHERE clause or nothing) selects, in
    /// name order.
    fn query_gaps(&self, filter: &str) -> Result<Vec<DroppedWal>> {
        let sql = format!("SELECT name, timeline, segno, dropped_at_ms, reason FROM wal_gap {filter} ORDER BY name");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], dropped_row).map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Records the content of timeline `timeline`'s history file.
    pub fn record_history(&self, timeline: TimelineId, entries: &[HistoryEntry]) -> Result<()> {
        insert_history(&self.conn, timeline, entries).map_err(|e| self.err(e))
    }

    /// Every recorded history file: timeline → its entries, in order.
    pub fn histories(&self) -> Result<BTreeMap<u32, Vec<HistoryEntry>>> {
        let mut stmt = self
            .conn
            .prepare("SELECT timeline, parent, switch_lsn, reason FROM timeline_history ORDER BY timeline, parent")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out: BTreeMap<u32, Vec<HistoryEntry>> = BTreeMap::new();
        for row in rows {
            let (tli, parent, lsn, reason) = row.map_err(|e| self.err(e))?;
            let parent = u32::try_from(parent).ok().and_then(TimelineId::new);
            let (Ok(tli), Some(parent)) = (u32::try_from(tli), parent) else {
                return Err(self.err("a timeline_history row is invalid"));
            };
            out.entry(tli).or_default().push(HistoryEntry { parent, switch_point: Lsn(to_u64(lsn)), reason });
        }
        Ok(out)
    }

    /// Every archived segment as (timeline, segment number, archive time in
    /// ms), in timeline and segment order: the planner's view of the WAL.
    pub fn segments(&self) -> Result<Vec<(u32, u64, i64)>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT timeline, segno, archived_at_ms FROM wal_file WHERE kind = 'segment' ORDER BY timeline, segno",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((u32::try_from(r.get::<_, i64>(0)?).unwrap_or(0), to_u64(r.get(1)?), r.get::<_, i64>(2)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Replaces every backup and history record, atomically (catalog
    /// rebuild). Backups recorded at or after `listed_since_ms` (by their
    /// stop time) are kept even if absent, like WAL in [`Catalog::replace_all`].
    pub fn replace_backups(
        &mut self,
        backups: &[BackupRecord],
        histories: &BTreeMap<u32, Vec<HistoryEntry>>,
        listed_since_ms: i64,
    ) -> Result<()> {
        let path = self.path.clone();
        let fail = |e: rusqlite::Error| Error::Catalog { path: path.clone(), detail: e.to_string() };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(fail)?;
        tx.execute("CREATE TEMP TABLE listed_backup (id TEXT PRIMARY KEY) WITHOUT ROWID", []).map_err(fail)?;
        {
            let mut listed = tx.prepare("INSERT INTO temp.listed_backup (id) VALUES (?1)").map_err(fail)?;
            for b in backups {
                insert_backup(&tx, b).map_err(fail)?;
                listed.execute([&b.id]).map_err(fail)?;
            }
        }
        tx.execute(
            "DELETE FROM backup WHERE stop_time_ms < ?1 AND id NOT IN (SELECT id FROM temp.listed_backup)",
            [listed_since_ms],
        )
        .map_err(fail)?;
        tx.execute("DROP TABLE temp.listed_backup", []).map_err(fail)?;
        tx.execute("DELETE FROM timeline_history", []).map_err(fail)?;
        for (tli, entries) in histories {
            if let Some(t) = TimelineId::new(*tli) {
                insert_history(&tx, t, entries).map_err(fail)?;
            }
        }
        tx.commit().map_err(fail)
    }

    /// Every record, in name order (for tests and comparisons).
    pub fn all_wal(&self) -> Result<Vec<WalRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, segno, plain_size, stored_size, blake3, archived_at_ms FROM wal_file ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, segno, plain, stored, blake3, at) = row.map_err(|e| self.err(e))?;
            let name: WalFileName = name.parse().map_err(|e| self.err(e))?;
            out.push(WalRecord {
                name,
                segno: segno.map(to_u64),
                plain_size: to_u64(plain),
                stored_size: to_u64(stored),
                blake3,
                archived_at_ms: at,
            });
        }
        Ok(out)
    }
}

fn insert_backup(conn: &Connection, b: &BackupRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO backup (id, timeline, start_lsn, stop_lsn, start_time_ms, stop_time_ms, start_wal,
            stop_wal, next_xid, pg_version, files, bytes, stored_bytes, new_bytes, new_objects, manifest_blake3,
            keep_forever)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            b.id,
            b.timeline,
            to_i64(b.start_lsn.0),
            to_i64(b.stop_lsn.0),
            b.start_time_ms,
            b.stop_time_ms,
            b.start_wal,
            b.stop_wal,
            b.next_xid.to_string(),
            b.pg_version,
            to_i64(b.totals.files),
            to_i64(b.totals.bytes),
            to_i64(b.totals.stored_bytes),
            to_i64(b.totals.new_bytes),
            to_i64(b.totals.new_objects),
            b.manifest_blake3,
            i64::from(b.keep_forever),
        ],
    )
    .map(|_| ())
}

fn insert_drill(conn: &Connection, d: &DrillRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO drill (id, backup, target, started_at_ms, finished_at_ms, ok, rto_ms, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![d.id, d.backup, d.target, d.started_at_ms, d.finished_at_ms, i64::from(d.ok), d.rto_ms, d.detail],
    )
    .map(|_| ())
}

fn insert_history(conn: &Connection, timeline: TimelineId, entries: &[HistoryEntry]) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM timeline_history WHERE timeline = ?1", [timeline.get()])?;
    for e in entries {
        conn.execute(
            "INSERT INTO timeline_history (timeline, parent, switch_lsn, reason) VALUES (?1, ?2, ?3, ?4)",
            params![timeline.get(), e.parent.get(), to_i64(e.switch_point.0), e.reason],
        )?;
    }
    Ok(())
}

fn set_cluster(conn: &Connection, c: &CatalogCluster) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO cluster (id, name, repository, system_identifier, pg_version, wal_segment_size)
         VALUES (1, ?1, ?2, ?3, ?4, ?5)",
        params![
            c.name,
            c.repository,
            c.identity.system_id.to_string(),
            c.identity.pg_version.major(),
            to_i64(c.identity.segment_size.bytes())
        ],
    )
    .map(|_| ())
}

fn insert_wal(conn: &Connection, r: &WalRecord) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO wal_file (name, kind, timeline, segno, plain_size, stored_size, blake3, archived_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    stmt.execute(params![
        r.name.to_string(),
        r.name.kind(),
        r.name.timeline().get(),
        r.segno.map(to_i64),
        to_i64(r.plain_size),
        to_i64(r.stored_size),
        r.blake3,
        r.archived_at_ms
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walvault_formats::wal::{SegmentName, SegmentNo, TimelineId};

    fn cluster() -> CatalogCluster {
        CatalogCluster {
            name: "main".into(),
            repository: "/r".into(),
            identity: ClusterIdentity {
                system_id: SystemId(u64::MAX - 1),
                pg_version: PgVersion::new(15).unwrap(),
                segment_size: WalSegmentSize::DEFAULT,
            },
        }
    }

    fn seg(tli: u32, segno: u64, at: i64) -> WalRecord {
        let name = SegmentName::from_segno(TimelineId::new(tli).unwrap(), SegmentNo(segno), WalSegmentSize::DEFAULT);
        WalRecord {
            name: WalFileName::Segment(name),
            segno: Some(segno),
            plain_size: 16 << 20,
            stored_size: 1000,
            blake3: "00".repeat(32),
            archived_at_ms: at,
        }
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walvault-cat-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("sub").join("catalog.db")
    }

    #[test]
    fn runs_gaps_and_binding() {
        let path = temp("runs");
        let cat = Catalog::open(&path).unwrap();
        cat.bind(&cluster()).unwrap();
        assert_eq!(cat.cluster().unwrap().unwrap(), cluster());
        let mut other = cluster();
        other.identity.system_id = SystemId(1);
        assert!(cat.bind(&other).is_err());
        for s in [1, 2, 3, 6, 7, 10] {
            cat.record_wal(&seg(1, s, s as i64)).unwrap();
        }
        cat.record_wal(&seg(2, 7, 100)).unwrap();
        let runs: Vec<(u32, u64, u64)> =
            cat.segment_runs().unwrap().iter().map(|r| (r.timeline, r.first, r.last)).collect();
        assert_eq!(runs, vec![(1, 1, 3), (1, 6, 7), (1, 10, 10), (2, 7, 7)]);
        assert_eq!(cat.newest().unwrap().unwrap().1, 100);
        drop(cat);
        let reopened = Catalog::open_existing(&path).unwrap();
        assert_eq!(reopened.all_wal().unwrap().len(), 7);
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn replace_all_keeps_concurrent_pushes() {
        let path = temp("replace");
        let mut cat = Catalog::open(&path).unwrap();
        cat.record_wal(&seg(1, 1, 10)).unwrap();
        cat.record_wal(&seg(1, 2, 20)).unwrap(); // gone from the repository
        cat.record_wal(&seg(1, 3, 500)).unwrap(); // pushed during the listing
        cat.replace_all(&cluster(), &[seg(1, 1, 10)], 400).unwrap();
        let names: Vec<u64> = cat.all_wal().unwrap().iter().filter_map(|r| r.segno).collect();
        assert_eq!(names, vec![1, 3]);
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    /// Many archive-push processes write at once: WAL journal mode and the
    /// busy timeout must make every write land.
    #[test]
    fn concurrent_writers_all_land() {
        let path = temp("concurrent");
        Catalog::open(&path).unwrap().bind(&cluster()).unwrap();
        let handles: Vec<_> = (0..8u64)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        // A fresh connection per write, as each push is a process.
                        let cat = Catalog::open(&path).unwrap();
                        cat.bind(&cluster()).unwrap();
                        cat.record_wal(&seg(1, w * 1000 + i, 1)).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(Catalog::open_existing(&path).unwrap().all_wal().unwrap().len(), 400);
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn dropped_wal_is_recorded_until_archived() {
        let path = temp("dropped");
        let cat = Catalog::open(&path).unwrap();
        let gap = |segno: u64, at: i64| DroppedWal {
            name: seg(1, segno, 0).name.to_string(),
            timeline: 1,
            segno: Some(segno),
            dropped_at_ms: at,
            reason: "repository unreachable".into(),
        };
        cat.record_dropped(&gap(5, 10)).unwrap();
        cat.record_dropped(&gap(4, 20)).unwrap();
        // A second drop of the same file (PostgreSQL retried) keeps the first.
        cat.record_dropped(&gap(5, 30)).unwrap();
        assert_eq!(cat.dropped().unwrap(), vec![gap(4, 20), gap(5, 10)]);
        // Archived after all (copied from another repository): no gap.
        cat.record_wal(&seg(1, 4, 40)).unwrap();
        assert_eq!(cat.dropped().unwrap(), vec![gap(5, 10)]);
        std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn missing_catalog_is_reported() {
        let path = temp("missing");
        assert!(matches!(Catalog::open_existing(&path), Err(Error::NoCatalog(_))));
    }
}
