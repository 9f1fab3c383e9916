//! `walvault restore`: a base backup written back into a data directory,
//! with the recovery settings that replay the archive to the target.

use std::path::PathBuf;

use crate::config::Config;
use crate::error::Result;

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
    /// Files written and kept (`--delta`).
    pub files_written: u64,
    /// Files left as they were because their content matched.
    pub files_kept: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Warnings (a forced plan's missing WAL).
    pub warnings: Vec<String>,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Not yet written.
    #[error("restore is not implemented yet")]
    Unimplemented,
}

impl RestoreError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        None
    }
}

/// Restores a backup into `opts.pgdata` and writes the recovery settings.
pub fn restore(_config: &Config, _opts: &RestoreOptions) -> Result<RestoreReport> {
    Err(RestoreError::Unimplemented.into())
}

/// The lines printed after a restore: what was restored and how to start.
pub fn summary_line(report: &RestoreReport, opts: &RestoreOptions) -> String {
    format!("restored backup '{}' into '{}'", report.backup, opts.pgdata.display())
}
