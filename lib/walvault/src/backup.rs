//! `walvault backup`: a base backup through PostgreSQL's non-exclusive
//! low-level API, stored as content-addressed chunks plus a manifest.

use std::path::PathBuf;
use std::time::Duration;

use walvault_formats::manifest::Manifest;

use crate::config::Config;
use crate::error::Result;

/// How to take a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// libpq connection string or URI; `None` uses the `PG*` environment.
    pub connection: Option<String>,
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

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Not yet written.
    #[error("backup is not implemented yet")]
    Unimplemented,
}

impl BackupError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        None
    }
}

/// Takes a base backup of the cluster the configuration names.
pub fn backup(_config: &Config, _opts: &BackupOptions) -> Result<BackupReport> {
    Err(BackupError::Unimplemented.into())
}

/// The one line printed after a backup.
pub fn summary_line(report: &BackupReport) -> String {
    let m = &report.manifest;
    format!("backup '{}' complete: {} files, {} bytes", m.id, m.totals.files, m.totals.bytes)
}
