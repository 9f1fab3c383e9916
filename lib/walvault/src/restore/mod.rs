//! `walvault restore`: a base backup written back into a data directory,
//! with the recovery settings that replay the archive to the target.
//!
//! In order, each step only once the previous one succeeded:
//! 1. the target and timeline are parsed (`target`);
//! 2. the data directory is checked: not a running server's, empty unless
//!    `--delta` (`layout::check_pgdata`);
//! 3. the planner chooses the backup and checks the WAL chain, from the
//!    catalog — rebuilt from the repository when it is missing or behind;
//! 4. the tablespace locations are checked, then directories, links and
//!    files are written in parallel, every byte verified (`files`);
//! 5. `backup_label`, `tablespace_map` and the recovery settings in
//!    `postgresql.auto.conf` are written (`settings`), and last the signal
//!    file that lets PostgreSQL start: a restore that fails at any point
//!    leaves a directory PostgreSQL refuses to start.

mod files;
mod layout;
pub(crate) mod settings;
mod target;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use walvault_formats::manifest::Manifest;
use walvault_formats::time::TimestampError;
use walvault_formats::wal::{LsnParseError, SegmentName, SegmentNo, TimelineId, WalFileName};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::info::human_bytes;
use crate::plan::{self, Plan, PlanError};
use crate::repo::{ClusterInfo, Repository};

pub use layout::PlacedTablespace;

/// Where recovery should stop (the raw values the user gave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The end of the archive.
    End,
    /// As soon as the backup is consistent.
    Immediate,
    /// `--target-time`, zone required.
    Time(String),
    /// `--target-lsn`.
    Lsn(String),
    /// `--target-xid`.
    Xid(String),
    /// `--target-name` (a restore point).
    Name(String),
}

/// What the server does once the target is reached (`recovery_target_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    /// Start accepting writes on a new timeline.
    Promote,
    /// Stay in recovery, read-only, until `pg_wal_replay_resume()`.
    Pause,
    /// Stop the server.
    Shutdown,
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The data directory to write.
    pub pgdata: PathBuf,
    /// Where recovery stops.
    pub target: RestoreTarget,
    /// `latest`, `current` or a timeline number; `None` is `latest`.
    pub target_timeline: Option<String>,
    /// `None` leaves PostgreSQL's default (pause).
    pub target_action: Option<TargetAction>,
    /// Stop just before the target instead of just after it.
    pub target_exclusive: bool,
    /// Force this backup instead of letting the planner choose.
    pub backup: Option<String>,
    /// Write `standby.signal` instead of `recovery.signal`.
    pub standby: bool,
    /// Restore even when the WAL chain is incomplete.
    pub force: bool,
    /// Allow a non-empty directory; keep files whose content matches.
    pub delta: bool,
    /// Files written in parallel.
    pub jobs: usize,
    /// Tablespace relocations, old location → new location.
    pub tablespace_map: Vec<(String, String)>,
    /// The archive-fetch program for `restore_command`; `None` means the
    /// one beside the running executable, else `archive-fetch` from `PATH`.
    pub archive_fetch: Option<PathBuf>,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The backup restored.
    pub backup: String,
    /// Files written (wholly, or only their differing chunks with `--delta`).
    pub files_written: u64,
    /// Files left as they were because their content matched.
    pub files_kept: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Files, links and directories `--delta` removed because the backup
    /// does not have them.
    pub paths_removed: u64,
    /// The recovery target, in words ("time '2026-11-21 14:30:00+00'").
    pub target: String,
    /// The timeline recovery follows, as the planner resolved it.
    pub timeline: u32,
    /// The last WAL file recovery needs (for the target, or the newest).
    pub end_segment: String,
    /// How many WAL files recovery reads.
    pub wal_files: usize,
    /// Where each tablespace went.
    pub tablespaces: Vec<PlacedTablespace>,
    /// The `restore_command` written.
    pub restore_command: String,
    /// Wall time.
    pub elapsed: Duration,
    /// Warnings (a forced plan's missing WAL, a rebuilt catalog).
    pub warnings: Vec<String>,
}

/// Why a restore failed. Each names its subject; [`RestoreError::hint`]
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// `--target-time` is not a time with a zone (the parser's own words).
    #[error(transparent)]
    Time(#[from] TimestampError),
    /// `--target-lsn` is not an LSN.
    #[error(transparent)]
    Lsn(#[from] LsnParseError),
    /// `--target-xid` is not a transaction id.
    #[error("invalid transaction id '{value}': {reason}")]
    Xid {
        /// What was given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `--target-name` could not be a restore point.
    #[error("invalid restore point name '{value}': {reason}")]
    RestorePointName {
        /// What was given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `--target-timeline` is not `latest`, `current` or a number.
    #[error("invalid timeline '{value}': expected 'latest', 'current' or a timeline number such as 2")]
    Timeline {
        /// What was given.
        value: String,
    },
    /// `--target-exclusive` with a target it does not apply to.
    #[error("--target-exclusive applies to a time, LSN or transaction id target, not to {target}")]
    Exclusive {
        /// The target, in words.
        target: String,
    },
    /// The data directory is a running server's.
    #[error("'{pgdata}' belongs to a running PostgreSQL (pid {pid}): stop it first")]
    Running {
        /// The data directory.
        pgdata: PathBuf,
        /// The postmaster's PID.
        pid: i32,
    },
    /// The data directory is not empty and `--delta` was not given.
    #[error("'{pgdata}' is not empty (it holds '{example}'): restore into an empty directory, or pass --delta")]
    NotEmpty {
        /// The data directory.
        pgdata: PathBuf,
        /// One thing it holds.
        example: String,
    },
    /// `--delta` on a directory that is not a data directory.
    #[error(
        "'{pgdata}' is not empty and is not a PostgreSQL data directory (no 'PG_VERSION'): --delta only \
         updates a data directory"
    )]
    NotPgData {
        /// The directory.
        pgdata: PathBuf,
    },
    /// The target path exists and is not a directory.
    #[error("'{path}' is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The planner refused (its message names the backup, target or file).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The backup's manifest describes another PostgreSQL cluster.
    #[error("backup '{backup}' does not belong to cluster '{cluster}' of repository '{repo}': {detail}")]
    ForeignBackup {
        /// The backup.
        backup: String,
        /// The cluster name.
        cluster: String,
        /// The repository.
        repo: String,
        /// Which identity field differs.
        detail: String,
    },
    /// `--tablespace-map OLD=NEW` whose OLD is no tablespace's location.
    #[error("--tablespace-map '{old}': backup '{backup}' has no tablespace there (it has {})", list_or_none(known))]
    TablespaceMapping {
        /// The OLD given.
        old: String,
        /// The backup.
        backup: String,
        /// Its tablespaces: "'name' at '/location'".
        known: Vec<String>,
    },
    /// A tablespace location that cannot be used.
    #[error("cannot restore tablespace '{name}' into '{location}': {reason}")]
    TablespaceLocation {
        /// The tablespace.
        name: String,
        /// The location.
        location: PathBuf,
        /// Why.
        reason: String,
    },
    /// A tablespace location that is not empty, without `--delta`.
    #[error("cannot restore tablespace '{name}' into '{location}': the directory is not empty")]
    TablespaceNotEmpty {
        /// The tablespace.
        name: String,
        /// The location.
        location: PathBuf,
    },
    /// With `--delta`, a non-empty location that is not this data
    /// directory's tablespace (maybe another cluster's).
    #[error(
        "cannot restore tablespace '{name}' into '{location}': it is not empty and is not a tablespace of \
         '{pgdata}', so --delta will not overwrite it"
    )]
    TablespaceNotOurs {
        /// The tablespace.
        name: String,
        /// The location.
        location: PathBuf,
        /// The data directory.
        pgdata: PathBuf,
    },
    /// A data object of the backup is missing, damaged or unreadable.
    #[error("unable to restore '{file}': data object '{key}' in repository '{repo}' {detail}")]
    Data {
        /// The file being restored (manifest path).
        file: String,
        /// The object's key.
        key: String,
        /// The repository.
        repo: String,
        /// "is missing", "is corrupt: …", "cannot be read: …".
        detail: String,
    },
    /// The manifest does not add up for a file.
    #[error("unable to restore '{file}': {detail}")]
    Manifest {
        /// The file (manifest path).
        file: String,
        /// What does not add up.
        detail: String,
    },
    /// A local file or directory cannot be written.
    #[error("unable to {op} '{path}': {source}")]
    Local {
        /// "write", "create directory", "fsync"…
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "no tablespaces".into() } else { items.join(", ") }
}

const INCOMPLETE: &str = "the data directory is incomplete, and PostgreSQL will not start on it (no 'global/pg_control', \
                          no signal file)";

impl RestoreError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            RestoreError::Time(_) => "give the zone with the time, for example '2026-11-21 14:30:00+00' (UTC) or \
                 '2026-11-21 15:30:00+01:00'"
                .into(),
            RestoreError::Lsn(_) => "give the LSN as PostgreSQL prints it (pg_current_wal_lsn())".into(),
            RestoreError::Xid { .. } => "give the id pg_current_xact_id() or txid_current() returned".into(),
            RestoreError::RestorePointName { .. } => "give the name passed to pg_create_restore_point()".into(),
            RestoreError::Timeline { .. } => "'walvault info' lists the timelines the archive holds".into(),
            RestoreError::Exclusive { .. } => "leave out --target-exclusive".into(),
            RestoreError::Running { pgdata, .. } => {
                format!("stop the server (pg_ctl stop -D '{}'), or restore into another directory", pgdata.display())
            }
            RestoreError::NotEmpty { .. } => {
                "give a new or empty directory; --delta updates this data directory in place instead: files that \
                 match the backup are kept, everything the backup does not have is deleted"
                    .into()
            }
            RestoreError::NotPgData { .. } => "check --pgdata; a new or empty directory needs no --delta".into(),
            RestoreError::NotADirectory { .. } => "--pgdata is a directory, or a path that does not exist yet".into(),
            RestoreError::Plan(PlanError::MissingWal { .. } | PlanError::TargetAfterArchive { .. }) => {
                "'walvault info' shows what the archive holds; --force restores anyway, and recovery then stops \
                 where the archived WAL ends"
                    .into()
            }
            RestoreError::Plan(_) => "'walvault info' lists the backups and the moments they can reach".into(),
            RestoreError::ForeignBackup { .. } => {
                "a cluster name in a repository holds one PostgreSQL cluster's backups: check that nothing else \
                 writes into it"
                    .into()
            }
            RestoreError::TablespaceMapping { .. } => {
                "OLD is where the tablespace was when the backup was taken (listed above)".into()
            }
            RestoreError::TablespaceLocation { location, .. } => {
                format!("choose another location with --tablespace-map '{}=NEW'", location.display())
            }
            RestoreError::TablespaceNotEmpty { location, .. } => format!(
                "restore it elsewhere with --tablespace-map '{}=NEW', empty the directory, or pass --delta if it \
                 is this data directory's tablespace",
                location.display()
            ),
            RestoreError::TablespaceNotOurs { location, .. } => {
                format!("restore it elsewhere with --tablespace-map '{}=NEW', or empty it", location.display())
            }
            RestoreError::Data { .. } => format!(
                "{INCOMPLETE}: restore another backup (--backup ID), or repair the object and run the restore \
                 again with --delta"
            ),
            RestoreError::Manifest { .. } => {
                format!("{INCOMPLETE}: this backup cannot be restored as it is; restore another one (--backup ID)")
            }
            RestoreError::Local { source, .. } => match source.kind() {
                std::io::ErrorKind::StorageFull => {
                    format!("free space, then run the restore again with --delta; {INCOMPLETE}")
                }
                std::io::ErrorKind::PermissionDenied => {
                    "run the restore as the user PostgreSQL runs as (usually 'postgres'), who must be able to \
                     create the data directory and the tablespace locations"
                        .into()
                }
                _ => return None,
            },
        })
    }
}

/// Removes a temporary catalog directory when planning is done.
struct TempCatalog(PathBuf);

impl Drop for TempCatalog {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The catalog planning reads, and how to rebuild it.
struct PlanningCatalog {
    config: Config,
    catalog: Catalog,
    rebuilt: bool,
    _temp: Option<TempCatalog>,
}

impl PlanningCatalog {
    /// The configured catalog if it indexes this repository and cluster.
    /// A missing one is rebuilt from the repository (a restore host needs no
    /// catalog); one that cannot be created there, is unreadable, or indexes
    /// another repository is replaced, for this restore only, by a temporary
    /// one rebuilt from the repository.
    fn open(config: &Config, repo: &Repository, cluster: &ClusterInfo, warnings: &mut Vec<String>) -> Result<Self> {
        let location = repo.location();
        match Catalog::open_existing(&config.catalog) {
            Ok(catalog) => match catalog.cluster() {
                Ok(Some(c)) if c.name == cluster.name && c.repository == location && c.identity == cluster.identity => {
                    return Ok(PlanningCatalog { config: config.clone(), catalog, rebuilt: false, _temp: None });
                }
                Ok(None) => {
                    drop(catalog);
                    warnings.push(format!(
                        "catalog '{}' was empty: rebuilt it from repository '{location}'",
                        config.catalog.display()
                    ));
                    return Self::rebuild_at(config.clone(), None);
                }
                Ok(Some(c)) => warnings.push(format!(
                    "catalog '{}' indexes cluster '{}' of repository '{}': planned from a temporary catalog rebuilt \
                     from repository '{location}'",
                    config.catalog.display(),
                    c.name,
                    c.repository
                )),
                Err(e) => {
                    warnings.push(format!("{e}: planned from a temporary catalog rebuilt from repository '{location}'"))
                }
            },
            Err(Error::NoCatalog(_)) => match Self::rebuild_at(config.clone(), None) {
                Ok(p) => {
                    warnings.push(format!(
                        "no catalog at '{}': rebuilt it from repository '{location}'",
                        config.catalog.display()
                    ));
                    return Ok(p);
                }
                Err(e @ Error::Catalog { .. }) => warnings.push(format!(
                    "no catalog at '{}', and it cannot be created ({e}): planned from a temporary catalog rebuilt \
                         from repository '{location}'",
                    config.catalog.display()
                )),
                Err(e) => return Err(e),
            },
            Err(e @ Error::Catalog { .. }) => {
                warnings.push(format!("{e}: planned from a temporary catalog rebuilt from repository '{location}'"))
            }
            Err(e) => return Err(e),
        }
        let dir =
            std::env::temp_dir().join(format!("walvault-restore-{}-{}", std::process::id(), crate::repo::now_ms()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Write { path: dir.clone(), source })?;
        let temp = TempCatalog(dir.clone());
        let mut temp_config = config.clone();
        temp_config.catalog = dir.join("catalog.db");
        Self::rebuild_at(temp_config, Some(temp))
    }

    fn rebuild_at(config: Config, temp: Option<TempCatalog>) -> Result<Self> {
        crate::rebuild::rebuild(&config)?;
        let catalog = Catalog::open_existing(&config.catalog)?;
        Ok(PlanningCatalog { config, catalog, rebuilt: true, _temp: temp })
    }

    fn rebuild(&mut self) -> Result<()> {
        crate::rebuild::rebuild(&self.config)?;
        self.catalog = Catalog::open_existing(&self.config.catalog)?;
        self.rebuilt = true;
        Ok(())
    }
}

/// Whether the repository holds something the planner's state lacks,
/// judged by a few cheap requests (one listing of the backups, a HEAD per
/// timeline): the file or backup the error names, a backup the catalog does
/// not know, the segment after the last one of a timeline, the next
/// timeline's history. Returns what was found.
fn repository_has_more(repo: &Repository, state: &plan::ArchiveState, err: &PlanError) -> Result<Option<String>> {
    let head = |key: &str| {
        repo.storage().head(key).map_err(|source| Error::Storage {
            op: "read",
            name: key.to_string(),
            repo: repo.location(),
            source,
        })
    };
    match err {
        PlanError::MissingWal { name, .. } => {
            if let Ok(n) = name.parse::<WalFileName>()
                && head(&repo.wal_key(&n))?.is_some()
            {
                return Ok(Some(format!("the repository has '{name}'")));
            }
        }
        PlanError::BackupNotFound(id) if head(&repo.manifest_key(id))?.is_some() => {
            return Ok(Some(format!("the repository has backup '{id}'")));
        }
        _ => {}
    }
    let listed = repo.list_backups()?;
    if let Some(id) = listed.iter().find(|id| !state.backups.iter().any(|b| &b.id == *id)) {
        return Ok(Some(format!("the repository has backup '{id}'")));
    }
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for s in &state.segments {
        let e = last.entry(s.timeline).or_insert(s.segno);
        *e = (*e).max(s.segno);
    }
    for (tli, segno) in &last {
        if let Some(t) = TimelineId::new(*tli) {
            let next = SegmentName::from_segno(t, SegmentNo(segno + 1), state.segment_size);
            if head(&repo.wal_key(&WalFileName::Segment(next)))?.is_some() {
                return Ok(Some(format!("the repository has '{next}'")));
            }
        }
    }
    let top = last.keys().chain(state.histories.keys()).copied().max().unwrap_or(1);
    if let Some(t) = top.checked_add(1).and_then(TimelineId::new) {
        let history = WalFileName::History(t);
        if head(&repo.wal_key(&history))?.is_some() {
            return Ok(Some(format!("the repository has '{history}'")));
        }
    }
    Ok(None)
}

/// Plans from the catalog; when the plan fails and the repository shows
/// that the catalog is behind, rebuilds it once and plans again.
fn plan_restore(
    config: &Config,
    repo: &Repository,
    cluster: &ClusterInfo,
    req: &plan::Request,
    warnings: &mut Vec<String>,
) -> Result<Plan> {
    let mut source = PlanningCatalog::open(config, repo, cluster, warnings)?;
    loop {
        let state = crate::info::archive_state(&source.catalog, cluster.identity.segment_size)?;
        match plan::plan(&state, req) {
            Ok(p) => return Ok(p),
            Err(e) if !source.rebuilt => match repository_has_more(repo, &state, &e)? {
                Some(found) => {
                    warnings.push(format!(
                        "catalog '{}' was behind the repository ({found}): rebuilt it",
                        source.config.catalog.display()
                    ));
                    source.rebuild()?;
                }
                None => return Err(RestoreError::Plan(e).into()),
            },
            Err(e) => return Err(RestoreError::Plan(e).into()),
        }
    }
}

/// Checks that a manifest is of the repository's cluster.
fn check_identity(m: &Manifest, repo: &Repository, cluster: &ClusterInfo) -> Result<(), RestoreError> {
    let id = &cluster.identity;
    let detail = if m.system_identifier != id.system_id.0 {
        format!("it is of system identifier {}, the cluster's is {}", m.system_identifier, id.system_id)
    } else if m.pg_version != id.pg_version.major() {
        format!("it is of PostgreSQL {}, the cluster runs {}", m.pg_version, id.pg_version)
    } else if m.wal_segment_size != id.segment_size.bytes() {
        format!("it has {}-byte WAL segments, the cluster {}", m.wal_segment_size, id.segment_size)
    } else {
        return Ok(());
    };
    Err(RestoreError::ForeignBackup {
        backup: m.id.clone(),
        cluster: cluster.name.clone(),
        repo: repo.location(),
        detail,
    })
}

/// The archive-fetch to run: the one given, else the one beside this
/// executable, else `archive-fetch` from `PATH`. A relative path is made
/// absolute: PostgreSQL runs `restore_command` in the data directory.
fn archive_fetch_program(opts: &RestoreOptions) -> PathBuf {
    match &opts.archive_fetch {
        Some(p) if p.components().count() > 1 && p.is_relative() => layout::absolute(p).unwrap_or_else(|_| p.clone()),
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .map(|exe| exe.with_file_name("archive-fetch"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("archive-fetch")),
    }
}

/// Writes a small file durably: temporary name, fsync, rename (the caller
/// fsyncs the directory).
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), RestoreError> {
    let fail = |source| RestoreError::Local { op: "write", path: path.to_path_buf(), source };
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".walvault-tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    Ok(())
}

fn fsync_dir(path: &Path) -> Result<(), RestoreError> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(|source| RestoreError::Local {
        op: "fsync",
        path: path.to_path_buf(),
        source,
    })
}

/// Restores a backup into `opts.pgdata` and writes the recovery settings.
///
/// # Errors
/// An invalid target; a data directory that is a running server's, or not
/// empty without `--delta`; a plan the archive cannot satisfy (the
/// planner's message, naming the missing file); a tablespace location that
/// cannot be used; a data object that is missing or corrupt (naming the file
/// being restored and the object). After a failure the directory holds no
/// `global/pg_control` and no signal file, so it cannot be started.
///
/// With several repositories, the first (in priority order) that can plan
/// the restore is used; when one fails before anything was written into
/// the data directory, the next is tried and a warning says why. The
/// `restore_command` then reads every repository (the configuration file),
/// so each WAL file falls back too.
pub fn restore(config: &Config, opts: &RestoreOptions) -> Result<RestoreReport> {
    if !config.is_multi() {
        return restore_from(config, config, opts);
    }
    let mut skipped: Vec<String> = Vec::new();
    let views = config.each();
    let last = views.len() - 1;
    for (i, view) in views.iter().enumerate() {
        let name = view.repo_name();
        // After a fallback, recovery reads only the repository that
        // answered: one that failed would fail every WAL file PostgreSQL
        // asks for and does not exist anywhere (the next timeline's history
        // file), and such a failure stops recovery.
        let full = if skipped.is_empty() { config } else { view };
        match restore_from(view, full, opts) {
            Ok(mut report) => {
                if !skipped.is_empty() {
                    skipped.push(format!(
                        "restore_command reads only repository '{name}'; once the others are back, \
                         'walvault repo sync' fills in what they lack"
                    ));
                }
                let mut warnings = std::mem::take(&mut skipped);
                warnings.append(&mut report.warnings);
                report.warnings = warnings;
                return Ok(report);
            }
            // Something was written: falling back would restore on top of
            // a half restore; the error says what to do.
            Err(e) if i == last || started_writing(&opts.pgdata) => return Err(e),
            Err(e) => {
                let next = views[i + 1].repo_name();
                let line = format!("repository '{name}': {e}; trying '{next}'");
                eprintln!("walvault: warning: {line}");
                skipped.push(line);
            }
        }
    }
    // Every iteration returns on the last repository.
    Err(crate::Error::Setting("no repository configured".into()))
}

/// Whether a failed restore already wrote into `pgdata` (its marker of an
/// incomplete restore is there).
fn started_writing(pgdata: &Path) -> bool {
    pgdata.join(layout::MARKER).exists()
}

/// [`restore`] from the one repository of `config`; `full` is the whole
/// configuration, which decides what `restore_command` reads.
fn restore_from(config: &Config, full: &Config, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let goal = target::parse_target(&opts.target)?;
    let timeline = target::parse_timeline(opts.target_timeline.as_deref())?;
    if opts.target_exclusive && !goal.takes_exclusive() {
        return Err(RestoreError::Exclusive { target: goal.describe() }.into());
    }
    let mut warnings = Vec::new();
    if opts.target_action.is_some() && goal == target::Goal::End {
        warnings.push(
            "--target-action has no effect without a recovery target: at the end of the archive PostgreSQL promotes"
                .into(),
        );
    }

    // The target directory, before anything big is read.
    let pgdata = layout::absolute(&opts.pgdata).map_err(|source| RestoreError::Local {
        op: "resolve",
        path: opts.pgdata.clone(),
        source,
    })?;
    layout::check_pgdata(&pgdata, opts.delta)?;

    // The plan, then the manifest and where each part of it goes.
    let repo = Repository::open_config(config)?;
    let cluster = repo.cluster_info()?;
    // Shared with backups, held until the restore returns, taken before the
    // plan is made: an expire (exclusive) that ran meanwhile has finished,
    // and none deletes the chosen backup's objects while they are read.
    let _lock = crate::lock::shared_for_reading(config, "restore", &mut warnings)?;
    let req = plan::Request {
        target: goal.to_plan(),
        timeline: timeline.to_plan(),
        exclusive: opts.target_exclusive,
        backup: opts.backup.clone(),
        force: opts.force,
    };
    let plan = plan_restore(config, &repo, &cluster, &req, &mut warnings)?;
    warnings.extend(plan.warnings.iter().cloned());
    let (manifest, _) = repo.get_manifest(&plan.backup)?;
    check_identity(&manifest, &repo, &cluster)?;
    let placed = layout::place_tablespaces(&manifest, &opts.tablespace_map, &pgdata, opts.delta)?;
    let locations: BTreeMap<u32, String> = placed.iter().map(|t| (t.oid, t.location.display().to_string())).collect();
    let tablespace_map = settings::rewrite_tablespace_map(&manifest.tablespace_map, &locations).map_err(|detail| {
        RestoreError::Manifest {
            file: "tablespace_map".into(),
            detail: format!("the manifest's tablespace map {detail}"),
        }
    })?;
    let config_file = match &config.file {
        Some(f) => Some(layout::absolute(f).map_err(|source| RestoreError::Local {
            op: "resolve",
            path: f.clone(),
            source,
        })?),
        None => None,
    };
    // With several repositories, archive-fetch reads them all through the
    // configuration file; with one, exactly the repository restored from.
    let location = repo.location();
    let which = match &config_file {
        Some(_) if full.is_multi() => None,
        // A named repository may have its own [repositories.s3] settings,
        // which only its name finds again.
        Some(_) if config.repo_name() != crate::config::DEFAULT_REPO_NAME => Some(("--repo", config.repo_name())),
        _ => Some(("--repository", location.as_str())),
    };
    let restore_command =
        settings::restore_command(&archive_fetch_program(opts), config_file.as_deref(), which, repo.cluster());

    // The files.
    let layout = layout::Layout::new(pgdata.clone(), &placed);
    let outcome =
        files::restore_files(&repo, &manifest, &layout, files::FilesOptions { delta: opts.delta, jobs: opts.jobs })?;

    // What PostgreSQL reads to start recovery, then the signal.
    write_durable(&pgdata.join("backup_label"), manifest.backup_label.as_bytes())?;
    if !tablespace_map.is_empty() {
        write_durable(&pgdata.join("tablespace_map"), tablespace_map.as_bytes())?;
    }
    let auto_conf = pgdata.join("postgresql.auto.conf");
    let existing = match std::fs::read(&auto_conf) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(RestoreError::Local { op: "read", path: auto_conf, source }.into()),
    };
    let block = settings::recovery_block(&settings::Recovery {
        backup: &manifest.id,
        restore_command: &restore_command,
        goal: &goal,
        timeline,
        action: opts.target_action,
        exclusive: opts.target_exclusive,
    });
    write_durable(&auto_conf, settings::rewrite_auto_conf(&existing, &block).as_bytes())?;
    if let Ok(conf) = std::fs::read_to_string(pgdata.join("postgresql.conf")) {
        for (line, name) in settings::recovery_settings_in(&conf) {
            warnings.push(format!(
                "'postgresql.conf' sets '{name}' (line {line}): the settings walvault wrote in \
                 'postgresql.auto.conf' override it, but a recovery target of another kind there would conflict; \
                 remove or comment it out"
            ));
        }
    }
    fsync_dir(&pgdata)?;
    let signal = if opts.standby { "standby.signal" } else { "recovery.signal" };
    write_durable(&pgdata.join(signal), b"")?;
    files::mark_complete(&pgdata)?;

    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        warnings.push(format!(
            "restored as root: PostgreSQL refuses to start on files it does not own; run \
             chown -R postgres: '{}'{} before starting it",
            pgdata.display(),
            if placed.is_empty() { "" } else { " and the tablespace locations" }
        ));
    }

    Ok(RestoreReport {
        backup: manifest.id.clone(),
        files_written: outcome.files_written,
        files_kept: outcome.files_kept,
        bytes_written: outcome.bytes_written,
        paths_removed: outcome.paths_removed,
        target: goal.describe(),
        timeline: plan.target_timeline,
        end_segment: plan.end_segment.clone(),
        wal_files: plan.wal.len(),
        tablespaces: placed,
        restore_command,
        elapsed: started.elapsed(),
        warnings,
    })
}

/// The lines printed after a restore: what was restored and how to start.
pub fn summary_line(report: &RestoreReport, opts: &RestoreOptions) -> String {
    let dir = opts.pgdata.display();
    let mut first = format!(
        "restored backup '{}' into '{dir}': {} file{} written ({})",
        report.backup,
        report.files_written,
        if report.files_written == 1 { "" } else { "s" },
        human_bytes(report.bytes_written)
    );
    if opts.delta {
        first.push_str(&format!(", {} kept, {} removed", report.files_kept, report.paths_removed));
    }
    first.push_str(&format!(" in {:.1}s", report.elapsed.as_secs_f64()));
    let then = match (&opts.target, opts.target_action) {
        _ if opts.standby => " as a standby".to_string(),
        (RestoreTarget::End, _) | (_, Some(TargetAction::Promote)) => ", then promote".to_string(),
        (_, Some(TargetAction::Shutdown)) => ", then shut down".to_string(),
        (_, Some(TargetAction::Pause) | None) => ", then pause (SELECT pg_wal_replay_resume() promotes)".to_string(),
    };
    let tli = match opts.target_timeline.as_deref() {
        Some(t) if !t.eq_ignore_ascii_case("latest") => format!("timeline {}", report.timeline),
        _ => format!("the latest timeline ({})", report.timeline),
    };
    format!(
        "{first}\nstart PostgreSQL on '{dir}' to replay WAL to {} along {tli}, through '{}'{then}",
        report.target, report.end_segment
    )
}

#[cfg(test)]
mod tests;
