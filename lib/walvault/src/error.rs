//! The library's error type and its policy.
//!
//! Every error names its subject (a path, a WAL file name, a repository) and
//! what failed; [`Error::hint`] says what to do about it. Messages follow one
//! style: lower case, subject in single quotes, no final period. Whether an
//! error is worth retrying is answered by [`Error::is_transient`]; how an
//! error maps to an exit code is the binaries' business, decided in one
//! place there.

use std::io;
use std::path::PathBuf;

use thiserror::Error;
use walvault_formats::object::{ContentHash, ObjectError};
use walvault_formats::wal::{SegmentError, WalFileNameError};

use crate::storage::StorageError;

/// Result with the library's [`Error`](enum@Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in walvault.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration file is unreadable or invalid.
    #[error("invalid configuration file '{file}': {detail}")]
    Config {
        /// The file.
        file: PathBuf,
        /// What is wrong, naming the key or line.
        detail: String,
    },
    /// A configuration value (from a file or a flag) is invalid.
    #[error("invalid configuration: {0}")]
    Setting(String),
    /// A file given to walvault cannot be read.
    #[error("unable to read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A local file cannot be written.
    #[error("unable to write '{path}': {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Not a WAL file name.
    #[error(transparent)]
    Name(#[from] WalFileNameError),
    /// A file named like a segment that is not an acceptable one.
    #[error("'{name}' {}", segment_detail(source))]
    Segment {
        /// The file name.
        name: String,
        /// What is wrong.
        source: SegmentError,
    },
    /// A history or backup history file that is not one.
    #[error("'{name}' is not a valid {what}: {detail}")]
    NotWal {
        /// The file name.
        name: String,
        /// "timeline history file", "backup history file".
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Create-once refused: another file is archived under this name.
    #[error(
        "'{name}' is already archived with different content in repository '{repo}': \
         stored blake3 {stored}, new blake3 {new}"
    )]
    Conflict {
        /// The file name.
        name: String,
        /// The repository.
        repo: String,
        /// Hash of the archived plaintext.
        stored: ContentHash,
        /// Hash of the file offered now.
        new: ContentHash,
    },
    /// A storage operation failed.
    #[error("unable to {op} '{name}' in repository '{repo}': {source}")]
    Storage {
        /// "store", "read", "list", "delete".
        op: &'static str,
        /// What was being handled.
        name: String,
        /// The repository.
        repo: String,
        /// The storage error.
        source: StorageError,
    },
    /// An object is in the repository but fails verification.
    #[error("'{name}' in repository '{repo}' is corrupt: {source}")]
    Corrupt {
        /// The file name.
        name: String,
        /// The repository.
        repo: String,
        /// What check failed.
        source: ObjectError,
    },
    /// The repository root does not exist.
    #[error("repository '{0}' does not exist")]
    RepoMissing(String),
    /// A directory without the repository marker.
    #[error("'{0}' is not a walvault repository")]
    NotARepo(String),
    /// The cluster name was never initialized in this repository.
    #[error("cluster '{cluster}' is not initialized in repository '{repo}'")]
    NotInitialized {
        /// The repository.
        repo: String,
        /// The cluster name.
        cluster: String,
    },
    /// `init` of a name already bound to another cluster.
    #[error("cluster '{cluster}' in repository '{repo}' is bound to another PostgreSQL cluster: {detail}")]
    ClusterMismatch {
        /// The repository.
        repo: String,
        /// The cluster name.
        cluster: String,
        /// Which identity field differs.
        detail: String,
    },
    /// Repository metadata that cannot be understood.
    #[error("repository metadata '{key}' in '{repo}' is invalid: {detail}")]
    Metadata {
        /// The repository.
        repo: String,
        /// The object key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The SQLite catalog failed.
    #[error("catalog '{path}': {detail}")]
    Catalog {
        /// The catalog file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The catalog does not exist yet.
    #[error("catalog '{0}' does not exist")]
    NoCatalog(PathBuf),
    /// A data directory that cannot be read as one.
    #[error("'{path}' is not a usable PostgreSQL data directory: {detail}")]
    PgData {
        /// The directory.
        path: PathBuf,
        /// What is missing or wrong.
        detail: String,
    },
    /// Objects that a maintenance command found damaged and skipped.
    #[error("{count} damaged object(s) in repository '{repo}' were left out")]
    Damaged {
        /// The repository.
        repo: String,
        /// How many.
        count: usize,
    },
    /// A base backup failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// A restore failed.
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    /// `walvault verify` could not run.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    /// `walvault check` could not run its checks.
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    /// A restore drill was refused or failed.
    #[error(transparent)]
    Drill(#[from] crate::drill::DrillError),
    /// The repository lock is held by another command, or cannot be taken.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// `walvault expire` refused to run.
    #[error(transparent)]
    Expire(#[from] crate::expire::ExpireError),
    /// A command run on several repositories failed in some of them.
    #[error("repository '{name}': {source}{}", failed_too(*count, names))]
    InRepository {
        /// The first repository that failed.
        name: String,
        /// How many failed.
        count: usize,
        /// Their names, quoted and joined.
        names: String,
        /// The first repository's error.
        source: Box<Error>,
    },
    /// A repository URL scheme this build does not support yet.
    #[error("repository '{0}': only local directories and s3:// URLs are supported")]
    UnsupportedRepository(String),
}

fn failed_too(count: usize, names: &str) -> String {
    if count > 1 { format!(" ({count} repositories failed: {names})") } else { String::new() }
}

fn segment_detail(e: &SegmentError) -> String {
    match e {
        SegmentError::SystemId { .. } => e.to_string(),
        _ => format!("is not a valid WAL segment: {e}"),
    }
}

impl Error {
    /// What the user can do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Error::Config { .. } | Error::Setting(_) => {
                "see pg-config-examples/walvault.toml; --config, --repository, --cluster and --catalog override \
                 the file"
                    .into()
            }
            Error::Segment { source: SegmentError::SystemId { .. }, .. } => {
                "a repository cluster belongs to one PostgreSQL cluster: archive this server into its own \
                 cluster name ('walvault init' with another --cluster)"
                    .into()
            }
            Error::Segment { .. } | Error::NotWal { .. } => {
                "PostgreSQL hands archive-push complete WAL files; check archive_command and the file".into()
            }
            Error::Conflict { .. } => {
                "the repository keeps the first copy; check that no other server archives into this cluster \
                 name, and compare the file with 'archive-fetch'"
                    .into()
            }
            Error::Storage { source, .. } if source.hint().is_some() => return source.hint(),
            Error::Storage { source, .. } => match source.io_kind() {
                Some(io::ErrorKind::StorageFull) => {
                    "free space in the repository; PostgreSQL keeps the WAL and retries".into()
                }
                Some(io::ErrorKind::PermissionDenied) => {
                    "the repository must be readable and writable by the user running PostgreSQL (usually \
                     'postgres')"
                        .into()
                }
                _ => return None,
            },
            Error::Corrupt { .. } => {
                "move the damaged object aside: if PostgreSQL still has the file, its next archive attempt stores \
                 an intact copy; otherwise copy it from another repository"
                    .into()
            }
            Error::RepoMissing(r) if r.starts_with("s3://") => {
                "check the bucket and prefix in 'repository' and s3.endpoint, or run 'walvault init'".into()
            }
            Error::RepoMissing(_) => {
                "check the path and that the file system holding it is mounted; 'walvault init' creates the \
                 repository directory (its parent must exist)"
                    .into()
            }
            Error::NotARepo(_) => "check 'repository' in the configuration, or run 'walvault init'".into(),
            Error::NotInitialized { .. } => "run 'walvault init --pgdata <data directory>' first".into(),
            Error::ClusterMismatch { .. } => "choose another cluster name with --cluster".into(),
            Error::Damaged { .. } => {
                "move the damaged objects aside (they are listed above), then run the command again".into()
            }
            Error::Backup(e) => return e.hint(),
            Error::Restore(e) => return e.hint(),
            Error::Verify(e) => return e.hint(),
            Error::Check(e) => return e.hint(),
            Error::Drill(e) => return e.hint(),
            Error::Lock(e) => return e.hint(),
            Error::Expire(e) => return e.hint(),
            Error::InRepository { source, .. } => return source.hint(),
            Error::NoCatalog(_) => "run 'walvault catalog rebuild' to build it from the repository".into(),
            Error::Catalog { .. } => {
                "the catalog is only an index: 'walvault catalog rebuild' recreates it from the repository".into()
            }
            _ => return None,
        })
    }

    /// Whether the same operation may succeed if simply retried later.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Storage { source, .. } => source.is_transient(),
            Error::Lock(e) => e.is_transient(),
            Error::Expire(e) => e.is_transient(),
            Error::InRepository { source, .. } => source.is_transient(),
            Error::Catalog { .. } | Error::RepoMissing(_) => true,
            _ => false,
        }
    }
}
