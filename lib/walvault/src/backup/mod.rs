//! `walvault backup`: a base backup through PostgreSQL's non-exclusive
//! low-level API, stored as content-addressed chunks plus a manifest.
//!
//! The steps, on one database session held throughout:
//! 1. check that the server is the repository's cluster and archives its
//!    WAL, and that its data directory is on this host;
//! 2. `pg_backup_start`;
//! 3. list the data directory and tablespaces, leaving out what PostgreSQL
//!    recreates (module `walk`), and copy the files with several threads
//!    (module `copy`): large files as [`CHUNK_SIZE`] chunks, small ones packed
//!    into bundles, anything already stored reused; `global/pg_control`
//!    last;
//! 4. `pg_backup_stop`, then wait until every WAL segment from the start to
//!    the stop is in the repository;
//! 5. write the manifest — the backup exists from that moment — and record
//!    it in the catalog.
//!
//! A failure before the manifest leaves no backup behind: the data objects
//! already stored are only unreferenced (the next backup reuses them, or a
//! later expire sweeps them).

mod copy;
mod label;
mod pace;
pub(crate) mod session;
mod walk;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use walvault_formats::manifest::{
    CHUNK_SIZE, EntryKind, FileData, Hash, MANIFEST_FORMAT, Manifest, Tablespace, Totals,
};
use walvault_formats::object::{Compression, ContentHash, EncodeOptions};
use walvault_formats::wal::{Lsn, PgVersion, SegmentName, SegmentNo, TimelineId, WalFileName};

use crate::catalog::{BackupRecord, Catalog, CatalogCluster};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::{ClusterInfo, Repository};

use copy::{Copied, CopyContext, Reusable};
use pace::{Progress, RateLimiter};
pub use session::PgEnv;
use session::{ArchiverStatus, ServerInfo, Session};
use walk::TablespaceDir;

/// How to take a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// libpq connection string or URI; `None` uses the `PG*` environment.
    pub connection: Option<String>,
    /// The libpq environment ([`PgEnv::from_process`]); `connection`'s
    /// settings win over it.
    pub env: PgEnv,
    /// The data directory; `None` asks the server (`SHOW data_directory`).
    pub pgdata: Option<PathBuf>,
    /// Files read, hashed, compressed and stored in parallel.
    pub jobs: usize,
    /// Request an immediate checkpoint instead of a spread one.
    pub fast: bool,
    /// How long to wait for the WAL the backup needs to be archived.
    pub archive_timeout: Duration,
    /// Read at most this many bytes per second from the data directory.
    pub max_rate: Option<u64>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What a completed backup reports.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The stored manifest.
    pub manifest: Manifest,
    /// Wall time.
    pub elapsed: Duration,
    /// Problems that did not fail the backup (a catalog not updated).
    pub warnings: Vec<String>,
}

/// Why a backup failed. No manifest is written in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The connection settings cannot be used.
    #[error("invalid connection settings: {detail}")]
    ConnInfo {
        /// What is wrong, naming the setting.
        detail: String,
    },
    /// The server cannot be reached or refused the connection.
    #[error("unable to connect to PostgreSQL '{target}': {detail}")]
    Connect {
        /// Where (a conninfo string without the password).
        target: String,
        /// Why.
        detail: String,
    },
    /// The session ended (the server stopped, or `pg_terminate_backend`):
    /// PostgreSQL aborted the backup with it.
    #[error("lost the connection to PostgreSQL '{target}' while {during}: {detail}")]
    ConnectionLost {
        /// Where.
        target: String,
        /// What the backup was doing.
        during: &'static str,
        /// The driver's or the server's message.
        detail: String,
    },
    /// The server refused a query.
    #[error("PostgreSQL '{target}' failed while {during}: {detail}")]
    Query {
        /// Where.
        target: String,
        /// What the backup was doing.
        during: &'static str,
        /// The server's message.
        detail: String,
    },
    /// A server version walvault cannot back up.
    #[error("PostgreSQL '{target}' runs version {version_num}: walvault backs up PostgreSQL 12 to 18")]
    Unsupported {
        /// Where.
        target: String,
        /// `server_version_num`.
        version_num: u32,
    },
    /// The server is not the cluster the repository's cluster name holds.
    #[error("PostgreSQL '{target}' is not the cluster '{cluster}' of repository '{repo}' holds: {detail}")]
    WrongCluster {
        /// Where.
        target: String,
        /// The repository.
        repo: String,
        /// The cluster name.
        cluster: String,
        /// What differs.
        detail: String,
    },
    /// WAL is not archived, so the backup could never be restored.
    #[error(
        "PostgreSQL '{target}' has archive_mode = off: a backup without archived WAL cannot be restored, \
         so none is taken"
    )]
    ArchiveModeOff {
        /// Where.
        target: String,
    },
    /// The data directory is not here or not the server's.
    #[error("data directory '{path}' {detail}")]
    PgData {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tablespace's location is unusable.
    #[error("tablespace '{name}' (oid {oid}) at '{}': {detail}", location.display())]
    Tablespace {
        /// Its OID.
        oid: u32,
        /// Its name.
        name: String,
        /// Its location.
        location: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A file or directory of the cluster cannot be read.
    #[error("unable to read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The WAL the backup needs did not reach the repository in time.
    #[error(
        "WAL segment '{segment}' needed by backup '{id}' did not reach repository '{repo}' within {} s: {reason}",
        timeout.as_secs()
    )]
    ArchiveTimeout {
        /// The backup (not stored).
        id: String,
        /// The first missing segment.
        segment: String,
        /// The repository.
        repo: String,
        /// How long walvault waited.
        timeout: Duration,
        /// What the archiver says.
        reason: String,
    },
    /// A bug: a thread panicked or a result went missing.
    #[error("internal error during the backup: {0}")]
    Internal(String),
}

impl BackupError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            BackupError::ConnInfo { .. } => {
                "use a libpq connection string ('host=/var/run/postgresql port=5432 user=postgres') or a \
                 postgres:// URI with --dbname, or the PGHOST, PGPORT, PGUSER and PGDATABASE variables"
                    .into()
            }
            BackupError::Connect { .. } => {
                "check that the server runs on this host, that PGHOST (its socket directory), PGPORT and PGUSER \
                 (or --dbname) name it, and that pg_hba.conf lets this user in; walvault reads PGPASSWORD and \
                 ~/.pgpass"
                    .into()
            }
            BackupError::ConnectionLost { .. } => {
                "PostgreSQL ends a backup with its session, so nothing was recorded; run the backup again \
                 (the data already stored is reused)"
                    .into()
            }
            BackupError::Query { .. } => {
                "a backup needs a superuser, or a role granted pg_read_all_settings and EXECUTE on \
                 pg_backup_start, pg_backup_stop and pg_control_system"
                    .into()
            }
            BackupError::Unsupported { .. } => "back up this server with its own tools, or upgrade it".into(),
            BackupError::WrongCluster { .. } => {
                "back up each PostgreSQL cluster into its own cluster name (--cluster, 'walvault init'); after \
                 a major upgrade, initialize a new cluster name"
                    .into()
            }
            BackupError::ArchiveModeOff { .. } => {
                "set archive_mode = on and archive_command = 'archive-push %p' in postgresql.conf, and restart \
                 PostgreSQL"
                    .into()
            }
            BackupError::PgData { .. } => {
                "run 'walvault backup' on the database host as the user owning the data directory (usually \
                 'postgres'), or name the directory with --pgdata"
                    .into()
            }
            BackupError::Tablespace { .. } => {
                "run 'walvault backup' on the database host as the user owning the tablespace directories".into()
            }
            BackupError::Read { .. } => {
                "run 'walvault backup' as the user owning the data directory (usually 'postgres')".into()
            }
            BackupError::ArchiveTimeout { .. } => {
                "the backup is not usable without this WAL and was not recorded; fix archiving, then run the \
                 backup again (a longer wait: --archive-timeout)"
                    .into()
            }
            BackupError::Internal(_) => "please report this as a bug".into(),
        })
    }
}

/// How often the session is checked during the copy, so that a backup
/// whose session died (and which PostgreSQL therefore aborted) stops early.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often the repository is checked for the WAL the backup needs.
const WAL_POLL: Duration = Duration::from_millis(200);
/// The file copied last, on its own (see [`copy::copy_stable`]).
const CONTROL_FILE: &str = "global/pg_control";

fn check_server(
    target: &str,
    repo: &Repository,
    cluster: &ClusterInfo,
    server: &ServerInfo,
) -> Result<(), BackupError> {
    let major = server.major();
    if major < 12 || PgVersion::new(major).is_none() {
        return Err(BackupError::Unsupported { target: target.into(), version_num: server.version_num });
    }
    let ours = &cluster.identity;
    let detail = if server.system_id != ours.system_id.0 {
        Some(format!("its system identifier is {}, the repository's cluster has {}", server.system_id, ours.system_id))
    } else if major != ours.pg_version.major() {
        Some(format!("it runs PostgreSQL {major}, the repository's cluster PostgreSQL {}", ours.pg_version))
    } else if server.segment_size != ours.segment_size.bytes() {
        Some(format!(
            "its WAL segments are {} bytes, the repository's cluster's {}",
            server.segment_size, ours.segment_size
        ))
    } else {
        None
    };
    if let Some(detail) = detail {
        return Err(BackupError::WrongCluster {
            target: target.into(),
            repo: repo.location(),
            cluster: cluster.name.clone(),
            detail,
        });
    }
    // A standby need not archive: its primary does, and the wait for the
    // backup's WAL proves it reached this repository.
    if server.archive_mode == "off" && !server.in_recovery {
        return Err(BackupError::ArchiveModeOff { target: target.into() });
    }
    Ok(())
}

/// Checks that `pgdata` is here and is the server's: its `PG_VERSION` and
/// the system identifier at the start of `global/pg_control`. Guards
/// against `--pgdata` naming another cluster, whose backup would look fine
/// and restore the wrong data.
fn check_pgdata(pgdata: &Path, server: &ServerInfo) -> Result<(), BackupError> {
    let fail = |detail: String| BackupError::PgData { path: pgdata.to_path_buf(), detail };
    match std::fs::metadata(pgdata) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(fail("is not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail("does not exist on this host: walvault backup must run on the database host".into()));
        }
        Err(e) => return Err(fail(format!("cannot be read: {e}"))),
    }
    let version = std::fs::read_to_string(pgdata.join("PG_VERSION"))
        .map_err(|e| fail(format!("has no readable 'PG_VERSION': {e}")))?;
    if version.trim() != server.major().to_string() {
        return Err(fail(format!("holds PostgreSQL {}, the server runs {}", version.trim(), server.major())));
    }
    let mut head = [0u8; 8];
    std::fs::File::open(pgdata.join(CONTROL_FILE))
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .map_err(|e| fail(format!("has no readable '{CONTROL_FILE}': {e}")))?;
    // system_identifier is the first field of ControlFileData, in the
    // server's byte order.
    let sysid = u64::from_ne_bytes(head);
    if sysid != server.system_id {
        return Err(fail(format!(
            "belongs to another cluster: its system identifier is {sysid}, the server's {}",
            server.system_id
        )));
    }
    Ok(())
}

/// Checks that `--pgdata` is the directory the server uses, when the
/// server's path exists here too (it may not, in a container): a copy of
/// the data directory, or a standby's, has the same identity but is not
/// the running server's.
fn check_same_dir(given: &Path, server_dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(given), std::fs::metadata(server_dir))
        && (a.dev(), a.ino()) != (b.dev(), b.ino())
    {
        return Err(BackupError::PgData {
            path: given.to_path_buf(),
            detail: format!("is not the data directory of the server, which is '{}'", server_dir.display()),
        });
    }
    Ok(())
}

/// The first identifier for a start at `start_ms` that no backup uses.
fn unique_id(repo: &Repository, start_ms: i64) -> Result<String> {
    for attempt in 1..=1000 {
        let id = label::backup_id(start_ms, attempt);
        let key = repo.manifest_key(&id);
        match repo.storage().head(&key) {
            Ok(None) => return Ok(id),
            Ok(Some(_)) => {}
            Err(source) => return Err(Error::Storage { op: "read", name: key, repo: repo.location(), source }),
        }
    }
    Err(BackupError::Internal(format!("no free backup identifier for {}", label::backup_id(start_ms, 1))).into())
}

/// The newest backup: the catalog's if it indexes this repository's
/// cluster and knows backups, else the newest manifest in the repository.
fn previous_id(config: &Config, repo: &Repository) -> Result<Option<String>> {
    if let Ok(catalog) = Catalog::open_existing(&config.catalog)
        && let Ok(Some(c)) = catalog.cluster()
        && c.name == repo.cluster()
        && c.repository == repo.location()
        && let Ok(backups) = catalog.backups()
        && let Some(newest) = backups.last()
    {
        return Ok(Some(newest.id.clone()));
    }
    Ok(repo.list_backups()?.pop())
}

/// The small files of the previous backup, by path; empty (with a warning)
/// when it cannot be read: the backup then stores them again.
fn previous_files(
    config: &Config,
    repo: &Repository,
    system_id: u64,
    warnings: &mut Vec<String>,
) -> HashMap<String, Reusable> {
    let manifest = match previous_id(config, repo).and_then(|id| id.map(|id| repo.get_manifest(&id)).transpose()) {
        Ok(Some((m, _))) => m,
        Ok(None) => return HashMap::new(),
        Err(e) => {
            warnings
                .push(format!("the previous backup could not be read, unchanged small files are stored again: {e}"));
            return HashMap::new();
        }
    };
    if manifest.system_identifier != system_id {
        return HashMap::new();
    }
    manifest
        .entries
        .into_iter()
        .filter_map(|e| match e.kind {
            EntryKind::File { data: FileData::Bundled { bundle, offset, len, hash } } => {
                Some((e.path, Reusable { bundle, offset, len, hash }))
            }
            _ => None,
        })
        .collect()
}

/// On an object store, every data object of the repository with its stored
/// size, from one listing (a request per 1,000 objects), so that the copy
/// asks nothing about each chunk ([`CopyContext::known`]); `None` on a
/// local repository, where a `stat` per chunk costs little, or when the
/// listing fails (with a warning: the copy then asks per object).
fn known_objects(repo: &Repository, warnings: &mut Vec<String>) -> Option<HashMap<Hash, u64>> {
    if !repo.is_object_store() {
        return None;
    }
    let prefix = repo.data_prefix();
    match repo.storage().list(&prefix) {
        Ok(listing) => Some(
            listing
                .into_iter()
                .filter_map(|m| {
                    let hex = m.key.rsplit('/').next()?;
                    let hash = Hash::from(ContentHash::from_hex(hex)?);
                    // Only keys where this hash belongs: anything else is
                    // not an object the copy would find.
                    (repo.data_key(&hash) == m.key).then_some((hash, m.size))
                })
                .collect(),
        ),
        Err(e) => {
            warnings.push(format!(
                "unable to list '{prefix}' in repository '{}' ({e}): each data object is looked up on its own",
                repo.location()
            ));
            None
        }
    }
}

/// Why the archiver has not delivered `missing` to the repository.
pub(crate) fn archive_reason(s: &ArchiverStatus, missing: &str, repo: &str, cluster: &str) -> String {
    if s.archive_command.trim().is_empty() && s.archive_library.trim().is_empty() {
        return "archive_command is empty, so PostgreSQL archives nothing: set archive_command = 'archive-push %p' \
                and reload PostgreSQL"
            .into();
    }
    if s.failing
        && let Some(wal) = &s.last_failed_wal
    {
        return format!(
            "the archiver last failed on '{wal}' at {} ({} failures since the statistics were reset): check \
             archive_command and the PostgreSQL log",
            s.last_failed_time.as_deref().unwrap_or("an unknown time"),
            s.failed_count
        );
    }
    match &s.last_archived_wal {
        Some(last) if last.as_str() >= missing => format!(
            "PostgreSQL reports '{last}' archived, yet '{missing}' is not in repository '{repo}' under cluster \
             '{cluster}': check that archive_command stores into this repository and cluster name"
        ),
        Some(last) => format!(
            "the archiver has only reached '{last}': archiving lags behind; check the PostgreSQL log, or allow \
             more time with --archive-timeout"
        ),
        None => "the archiver has archived nothing since the statistics were reset: check archive_command and \
                 the PostgreSQL log"
            .into(),
    }
}

/// Why a standby's backup waits: the standby cannot switch WAL, so the
/// segment holding the stop point reaches the archive when the primary
/// completes it.
fn standby_reason(missing: &str) -> String {
    format!(
        "the server is a standby, which cannot switch WAL: '{missing}' is archived once the primary completes \
         that segment; run SELECT pg_switch_wal() on the primary (or set archive_timeout there), and check that \
         the primary archives into this repository"
    )
}

/// Waits until every segment of `names` is in the repository. `standby`:
/// the server is one, and the primary archives them.
fn wait_for_wal(
    repo: &Repository,
    db: &mut Session,
    id: &str,
    names: &[SegmentName],
    timeout: Duration,
    progress: bool,
    standby: bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut next = 0;
    let mut told = false;
    loop {
        while let Some(name) = names.get(next) {
            let key = repo.wal_key(&WalFileName::Segment(*name));
            match repo.storage().head(&key) {
                Ok(Some(_)) => next += 1,
                Ok(None) => break,
                Err(source) => {
                    return Err(Error::Storage { op: "read", name: name.to_string(), repo: repo.location(), source });
                }
            }
        }
        let Some(missing) = names.get(next) else { return Ok(()) };
        let now = Instant::now();
        if now >= deadline {
            let reason = if standby {
                standby_reason(&missing.to_string())
            } else {
                match db.archiver() {
                    Ok(status) => archive_reason(&status, &missing.to_string(), &repo.location(), repo.cluster()),
                    Err(e) => format!("the archiver's state could not be read ({e})"),
                }
            };
            return Err(BackupError::ArchiveTimeout {
                id: id.into(),
                segment: missing.to_string(),
                repo: repo.location(),
                timeout,
                reason,
            }
            .into());
        }
        if progress && !told {
            if standby {
                eprintln!(
                    "waiting for WAL segment '{missing}' to be archived (by the primary, once it completes the \
                     segment: SELECT pg_switch_wal() there finishes the backup sooner)"
                );
            } else {
                eprintln!("waiting for WAL segment '{missing}' to be archived");
            }
            told = true;
        }
        std::thread::sleep(WAL_POLL.min(deadline - now));
    }
}

fn record_in_catalog(
    config: &Config,
    repo: &Repository,
    cluster: &ClusterInfo,
    m: &Manifest,
    hash: &str,
) -> Result<()> {
    let catalog = Catalog::open(&config.catalog)?;
    catalog.bind(&CatalogCluster {
        name: cluster.name.clone(),
        repository: repo.location(),
        identity: cluster.identity,
    })?;
    catalog.record_backup(&BackupRecord::of_manifest(m, hash))
}

/// Takes a base backup of the cluster the configuration names.
///
/// # Errors
/// [`BackupError`] for what concerns the server, the data directory and
/// archiving; storage errors from the repository. Either way no manifest is
/// written, so no partial backup ever appears.
pub fn backup(config: &Config, opts: &BackupOptions) -> Result<BackupReport> {
    let started = Instant::now();
    let repo = Repository::open_config(config)?;
    let cluster = repo.cluster_info()?;
    // Held to the end: expire (exclusive) must not sweep the objects this
    // backup reuses, nor the previous manifest it reads; backups share it.
    let lock = crate::lock::RepoLock::acquire_config(
        config,
        crate::lock::LockMode::Shared,
        "backup",
        crate::lock::BACKUP_WAIT,
    )?;
    let mut warnings: Vec<String> = lock.notes().to_vec();

    let pg = session::connection_config(&opts.env, opts.connection.as_deref())?;
    let mut db = Session::connect(&pg)?;
    let server = db.server_info()?;
    check_server(&db.target, &repo, &cluster, &server)?;
    let pgdata = match (&opts.pgdata, db.data_directory()) {
        (None, dir) => dir?,
        (Some(given), Ok(server_dir)) => {
            check_same_dir(given, &server_dir)?;
            given.clone()
        }
        // Not allowed to read data_directory: the identity check below
        // must do.
        (Some(given), Err(_)) => given.clone(),
    };
    check_pgdata(&pgdata, &server)?;
    let version_dir = format!("PG_{}_{}", server.major(), server.catalog_version);
    let tablespaces: Vec<TablespaceDir> = db
        .tablespaces()?
        .into_iter()
        // In-place tablespaces (a relative location) are directories inside
        // pg_tblspc, copied with the data directory.
        .filter(|(_, _, location)| location.starts_with('/'))
        .map(|(oid, name, location)| TablespaceDir {
            oid,
            name,
            location: PathBuf::from(location),
            version_dir: version_dir.clone(),
        })
        .collect();
    let previous = previous_files(config, &repo, server.system_id, &mut warnings);

    let start_ms = db.clock_ms("reading the start time")?;
    let id = unique_id(&repo, start_ms)?;
    if opts.progress && !opts.fast {
        eprintln!("waiting for a spread checkpoint (--fast requests an immediate one)");
    }
    let start_lsn = db.start(&format!("walvault {id}"), opts.fast)?;

    let tree = walk::walk(&pgdata, &tablespaces)?;
    warnings.extend(tree.warnings);
    let mut entries = tree.entries;
    let (control, files): (Vec<_>, Vec<_>) =
        tree.files.into_iter().partition(|f| entries[f.entry].path == CONTROL_FILE);
    let progress = Progress::new(files.iter().chain(&control).map(|f| f.size).sum());
    let limiter = opts.max_rate.map(RateLimiter::new);
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let known = known_objects(&repo, &mut warnings);
    let ctx = CopyContext {
        repo: &repo,
        encode: EncodeOptions { compression: Compression::Zstd, level: config.compress_level, workers: 1 },
        previous: &previous,
        paths: &paths,
        limiter: limiter.as_ref(),
        progress: &progress,
        jobs: opts.jobs,
        known: known.as_ref(),
    };
    let mut last_ping = Instant::now();
    let copied = copy::copy_files(&ctx, &files, || {
        if opts.progress {
            progress.draw();
        }
        if last_ping.elapsed() >= PING_EVERY {
            last_ping = Instant::now();
            db.ping("copying files")?;
        }
        Ok(())
    });
    if opts.progress {
        progress.clear();
    }
    let mut copied = copied?;
    // pg_control last, as pg_basebackup does, and checked against torn reads.
    let mut results: Vec<(usize, Copied)> = Vec::with_capacity(files.len() + control.len());
    for job in &control {
        results.push((job.entry, copy::copy_stable(&ctx, job, &mut copied.objects)?));
    }
    for (job, result) in files.iter().zip(copied.files) {
        let result = result.ok_or_else(|| BackupError::Internal(format!("no result for '{}'", job.path.display())))?;
        results.push((job.entry, result));
    }

    let stop = db.stop()?;
    let (stop_ms, next_xid) = db.after_stop()?;
    let timeline = match label::label_timeline(&stop.label) {
        Some(t) => t,
        None => db.checkpoint_timeline()?,
    };
    let tli = TimelineId::new(timeline)
        .ok_or_else(|| BackupError::Internal(format!("the server reported timeline {timeline}")))?;
    let size = cluster.identity.segment_size;
    let first = size.segment_of(start_lsn);
    // The segment holding the last byte before the stop LSN
    // (XLByteToPrevSeg): a stop exactly at a boundary needs no more.
    let last = size.segment_of(Lsn(stop.lsn.0.saturating_sub(1))).max(first);
    let names: Vec<SegmentName> =
        (first.0..=last.0).map(|n| SegmentName::from_segno(tli, SegmentNo(n), size)).collect();
    wait_for_wal(&repo, &mut db, &id, &names, opts.archive_timeout, opts.progress, server.in_recovery)?;

    fill_entries(&mut entries, results);
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        cluster: repo.cluster().to_string(),
        system_identifier: server.system_id,
        pg_version: server.major(),
        wal_segment_size: size.bytes(),
        timeline,
        start_lsn,
        stop_lsn: stop.lsn,
        start_time_ms: start_ms,
        stop_time_ms: stop_ms,
        start_wal: names.first().map(ToString::to_string).unwrap_or_default(),
        stop_wal: names.last().map(ToString::to_string).unwrap_or_default(),
        next_xid,
        backup_label: stop.label,
        tablespace_map: stop.tablespace_map,
        tablespaces: tablespaces
            .iter()
            .map(|t| Tablespace { oid: t.oid, name: t.name.clone(), location: t.location.display().to_string() })
            .collect(),
        chunk_size: CHUNK_SIZE,
        entries,
        totals: Totals::default(),
        walvault_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    manifest.totals = totals(&manifest, &copied.objects);
    warnings.extend(dropped_wal_warning(config));
    let hash = repo.put_manifest(&manifest)?;
    if let Err(e) = record_in_catalog(config, &repo, &cluster, &manifest, &hash.to_string()) {
        warnings.push(format!("backup '{id}' is stored but the catalog was not updated: {e}"));
    }
    Ok(BackupReport { manifest, elapsed: started.elapsed(), warnings })
}

/// The warning for WAL that archive-push dropped (`queue-max`) and no
/// backup has been taken since: read before this backup is recorded.
fn dropped_wal_warning(config: &Config) -> Option<String> {
    let catalog = crate::catalog::Catalog::open_existing(&config.catalog).ok()?;
    let uncovered: Vec<_> =
        crate::info::dropped_wal(&catalog).ok()?.into_iter().filter(|d| d.intact_from_backup.is_none()).collect();
    if uncovered.is_empty() {
        return None;
    }
    Some(format!(
        "WAL was dropped without being archived (queue-max): {}; PITR across the gap is impossible, a new full \
         backup is needed for PITR past it: this backup is one, PITR from it on is intact",
        crate::info::dropped_runs(&uncovered).join(", ")
    ))
}

/// Puts what the copy found into the files' entries (by index), and drops
/// the entries of files that vanished.
fn fill_entries(entries: &mut Vec<walvault_formats::manifest::Entry>, results: Vec<(usize, Copied)>) {
    let mut keep = vec![true; entries.len()];
    for (entry, result) in results {
        match result {
            Copied::Stored { data, size } => {
                entries[entry].size = size;
                entries[entry].kind = EntryKind::File { data };
            }
            Copied::Vanished => keep[entry] = false,
        }
    }
    let mut kept = keep.iter();
    entries.retain(|_| kept.next().copied().unwrap_or(true));
}

/// The sizes of a backup whose objects are used as `objects` says.
fn totals(m: &Manifest, objects: &HashMap<Hash, copy::ObjectUse>) -> Totals {
    let mut t = Totals::default();
    for e in &m.entries {
        if let EntryKind::File { .. } = e.kind {
            t.files += 1;
            t.bytes += e.size;
        }
    }
    for hash in m.objects() {
        if let Some(u) = objects.get(&hash) {
            t.stored_bytes += u.stored;
            if u.created {
                t.new_bytes += u.stored;
                t.new_objects += 1;
            }
        }
    }
    t
}

/// The one line printed after a backup.
pub fn summary_line(report: &BackupReport) -> String {
    let m = &report.manifest;
    let t = &m.totals;
    let secs = report.elapsed.as_secs_f64();
    let pct = if t.bytes == 0 { 0.0 } else { t.new_bytes as f64 * 100.0 / t.bytes as f64 };
    format!(
        "backup '{}' complete: {} files, {}, {} newly stored ({pct:.1}%), WAL {}..{}, {secs:.1} s, {}",
        m.id,
        t.files,
        label::human_bytes(t.bytes),
        label::human_bytes(t.new_bytes),
        m.start_wal,
        m.stop_wal,
        label::human_rate(t.bytes, secs)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use walvault_formats::manifest::{ChunkRef, Entry};
    use walvault_formats::wal::{ClusterIdentity, SystemId, WalSegmentSize};

    use super::*;

    fn status() -> ArchiverStatus {
        ArchiverStatus { archive_command: "archive-push %p".into(), ..Default::default() }
    }

    #[test]
    fn archive_reasons() {
        let missing = "000000010000000000000005";
        let r = |s: &ArchiverStatus| archive_reason(s, missing, "/r", "main");
        let empty = ArchiverStatus::default();
        assert!(r(&empty).contains("archive_command is empty"), "{}", r(&empty));
        let failing = ArchiverStatus {
            last_failed_wal: Some("000000010000000000000004".into()),
            last_failed_time: Some("2026-11-21 14:30:00+00".into()),
            failed_count: 7,
            failing: true,
            ..status()
        };
        let text = r(&failing);
        assert!(text.contains("last failed on '000000010000000000000004' at 2026-11-21 14:30:00+00"), "{text}");
        assert!(text.contains("check archive_command and the PostgreSQL log"), "{text}");
        let elsewhere = ArchiverStatus { last_archived_wal: Some(missing.into()), ..status() };
        assert!(
            r(&elsewhere).contains("yet '000000010000000000000005' is not in repository '/r'"),
            "{}",
            r(&elsewhere)
        );
        let lagging = ArchiverStatus { last_archived_wal: Some("000000010000000000000003".into()), ..status() };
        assert!(r(&lagging).contains("lags behind"), "{}", r(&lagging));
        assert!(r(&status()).contains("archived nothing"), "{}", r(&status()));
    }

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "main".into(),
            identity: ClusterIdentity {
                system_id: SystemId(42),
                pg_version: PgVersion::new(15).unwrap(),
                segment_size: WalSegmentSize::DEFAULT,
            },
            created_at_ms: 0,
        }
    }

    fn server() -> ServerInfo {
        ServerInfo {
            version_num: 150_010,
            system_id: 42,
            catalog_version: 202_209_061,
            archive_mode: "on".into(),
            in_recovery: false,
            segment_size: 16 << 20,
        }
    }

    #[test]
    fn server_must_be_the_repository_s_cluster() {
        let repo = Repository::open("/r", "main").unwrap();
        let check = |s: ServerInfo| check_server("host=/tmp", &repo, &cluster(), &s);
        check(server()).unwrap();
        let e = check(ServerInfo { system_id: 43, ..server() }).unwrap_err();
        assert!(matches!(e, BackupError::WrongCluster { .. }) && e.to_string().contains("43"), "{e}");
        let e = check(ServerInfo { version_num: 160_002, ..server() }).unwrap_err();
        assert!(e.to_string().contains("PostgreSQL 16"), "{e}");
        let e = check(ServerInfo { segment_size: 64 << 20, ..server() }).unwrap_err();
        assert!(matches!(e, BackupError::WrongCluster { .. }), "{e}");
        let e = check(ServerInfo { version_num: 110_000, ..server() }).unwrap_err();
        assert!(matches!(e, BackupError::Unsupported { .. }), "{e}");
        let e = check(ServerInfo { archive_mode: "off".into(), ..server() }).unwrap_err();
        assert!(e.to_string().contains("cannot be restored") && e.hint().unwrap().contains("archive_mode"), "{e}");
        check(ServerInfo { archive_mode: "always".into(), ..server() }).unwrap();
        check(ServerInfo { archive_mode: "off".into(), in_recovery: true, ..server() }).unwrap();
    }

    #[test]
    fn pgdata_must_be_the_server_s() {
        let dir = std::env::temp_dir().join(format!("walvault-pgdata-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = check_pgdata(&dir, &server()).unwrap_err();
        assert!(e.to_string().contains("does not exist on this host"), "{e}");
        std::fs::create_dir_all(dir.join("global")).unwrap();
        std::fs::write(dir.join("PG_VERSION"), "15\n").unwrap();
        let mut control = 42u64.to_ne_bytes().to_vec();
        control.resize(8192, 0);
        std::fs::write(dir.join(CONTROL_FILE), &control).unwrap();
        check_pgdata(&dir, &server()).unwrap();
        let e = check_pgdata(&dir, &ServerInfo { system_id: 7, ..server() }).unwrap_err();
        assert!(e.to_string().contains("belongs to another cluster"), "{e}");
        check_same_dir(&dir, &dir.join("global/..")).unwrap();
        check_same_dir(&dir, Path::new("/nonexistent/in/a/container")).unwrap();
        let e = check_same_dir(&dir, &dir.join("global")).unwrap_err();
        assert!(e.to_string().contains("is not the data directory of the server"), "{e}");
        std::fs::write(dir.join("PG_VERSION"), "14\n").unwrap();
        assert!(check_pgdata(&dir, &server()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn totals_and_summary() {
        let h = |b: u8| Hash([b; 32]);
        let file = |path: &str, size: u64, data: FileData| Entry {
            path: path.into(),
            mode: 0o600,
            size,
            mtime_ms: 0,
            kind: EntryKind::File { data },
        };
        let entries = vec![
            Entry { path: "base".into(), mode: 0o700, size: 0, mtime_ms: 0, kind: EntryKind::Dir },
            file(
                "a",
                3 << 20,
                FileData::Chunks {
                    chunks: vec![ChunkRef { hash: h(1), len: 2 << 20 }, ChunkRef { hash: h(2), len: 1 << 20 }],
                },
            ),
            file("b", 10, FileData::Bundled { bundle: h(3), offset: 0, len: 10, hash: h(9) }),
            file("c", 20, FileData::Bundled { bundle: h(3), offset: 10, len: 20, hash: h(8) }),
            file("d", 0, FileData::Empty),
        ];
        let objects: HashMap<Hash, copy::ObjectUse> = [
            (h(1), copy::ObjectUse { stored: 100, created: true }),
            (h(2), copy::ObjectUse { stored: 50, created: false }),
            (h(3), copy::ObjectUse { stored: 7, created: true }),
            // Stored, then not referenced (a file that shrank): not counted.
            (h(4), copy::ObjectUse { stored: 1000, created: true }),
        ]
        .into();
        let m = Manifest {
            format: MANIFEST_FORMAT,
            id: "20261121T143000Z".into(),
            cluster: "main".into(),
            system_identifier: 42,
            pg_version: 15,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: Lsn(0x2000028),
            stop_lsn: Lsn(0x3000100),
            start_time_ms: 0,
            stop_time_ms: 0,
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000003".into(),
            next_xid: 740,
            backup_label: String::new(),
            tablespace_map: String::new(),
            tablespaces: vec![],
            chunk_size: CHUNK_SIZE,
            entries,
            totals: Totals::default(),
            walvault_version: "0".into(),
        };
        let t = totals(&m, &objects);
        assert_eq!(t, Totals { files: 4, bytes: (3 << 20) + 30, stored_bytes: 157, new_bytes: 107, new_objects: 2 });
        let report =
            BackupReport { manifest: Manifest { totals: t, ..m }, elapsed: Duration::from_secs(2), warnings: vec![] };
        assert_eq!(
            summary_line(&report),
            "backup '20261121T143000Z' complete: 4 files, 3.0 MiB, 107 B newly stored (0.0%), \
             WAL 000000010000000000000002..000000010000000000000003, 2.0 s, 1.5 MiB/s"
        );
    }
}
