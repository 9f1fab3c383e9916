//! archive-push: one WAL file from PostgreSQL into the repository.
//!
//! The per-segment path is: read the cluster identity (one GET), read and
//! validate the file, compress and hash it (in parallel), create-once put,
//! and record it in the catalog. No listing, no scan: the cost does not grow
//! with the archive.

use std::os::unix::fs::FileExt;
use std::path::Path;

use walvault_formats::object::{self, ContentHash, EncodeOptions};
use walvault_formats::wal::{HistoryEntry, SegmentError, TimelineId, WalFileName, parse_history, validate_segment};

use crate::catalog::{Catalog, CatalogCluster, WalRecord};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::{ClusterInfo, Repository};
use crate::storage::{PutOutcome, StorageError};

/// What happened to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushStatus {
    /// Stored now.
    Stored,
    /// Already archived with identical content (PostgreSQL retried).
    AlreadyArchived,
}

/// The result of a successful push: the status and warnings that did not
/// prevent success (a catalog that could not be updated).
#[derive(Debug)]
pub struct PushOutcome {
    /// Stored or already there.
    pub status: PushStatus,
    /// Problems that did not fail the push, one line each.
    pub warnings: Vec<String>,
}

/// How many pieces to compress in parallel: one per core (at most 8)
/// unless configured; the envelope encoder keeps pieces of at least 2 MiB.
fn workers_for(config: &Config) -> u32 {
    if config.compress_workers > 0 {
        return config.compress_workers;
    }
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)).min(8)
}

/// Checks that the bytes are what their name says they are.
fn validate(name: &WalFileName, bytes: &[u8], cluster: &ClusterInfo) -> Result<()> {
    match name {
        WalFileName::Segment(seg) | WalFileName::Partial(seg) => validate_segment(bytes, *seg, &cluster.identity)
            .map(|_| ())
            .map_err(|source| Error::Segment { name: name.to_string(), source }),
        WalFileName::History(_) => parse_history(bytes).map(|_| ()).map_err(|e| Error::NotWal {
            name: name.to_string(),
            what: "timeline history file",
            detail: e.to_string(),
        }),
        WalFileName::BackupHistory(..) => {
            let ok = bytes.len() < 64 * 1024
                && std::str::from_utf8(bytes).is_ok_and(|t| t.starts_with("START WAL LOCATION: "));
            if ok {
                Ok(())
            } else {
                Err(Error::NotWal {
                    name: name.to_string(),
                    what: "backup history file",
                    detail: "expected text starting with 'START WAL LOCATION: '".into(),
                })
            }
        }
    }
}

/// Archives the file at `path` (PostgreSQL's `%p`). Returns only once the
/// file is durably stored, or was already stored with identical content.
///
/// # Errors
/// Any failure to read, validate or store; and [`Error::Conflict`] when a
/// different file is archived under the same name, which is never
/// overwritten.
pub fn push(config: &Config, path: &Path) -> Result<PushOutcome> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name: WalFileName = file_name.parse()?;
    let repo = Repository::open_config(config)?;
    let cluster = repo.cluster_info()?;
    let read_err = |source| Error::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { std::io::ErrorKind::IsADirectory } else { std::io::ErrorKind::InvalidInput };
        return Err(read_err(std::io::Error::new(kind, "not a regular file")));
    }
    let len = meta.len();
    if let WalFileName::Segment(_) | WalFileName::Partial(_) = name {
        // Refuse a file of the wrong size before reading it.
        let expected = cluster.identity.segment_size.bytes();
        if len != expected {
            let source = SegmentError::Size { actual: len, expected };
            return Err(Error::Segment { name: name.to_string(), source });
        }
    }
    let len = usize::try_from(len).map_err(|_| read_err(std::io::Error::other("file too large")))?;

    let opts = EncodeOptions { level: config.compress_level, workers: workers_for(config), ..Default::default() };
    let key = repo.wal_key(&name);
    let storage_err =
        |op, source: StorageError| Error::Storage { op, name: name.to_string(), repo: repo.location(), source };
    // Reading, compressing and hashing overlap: each compression thread
    // reads its own piece of the file (pread) and compresses it while this
    // thread hashes the pieces already read.
    let (header, bytes, stored) = object::encode_filled(len, &opts, |offset, buf| file.read_exact_at(buf, offset))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::NotFound => read_err(e),
            _ if e.raw_os_error().is_some() => read_err(e),
            _ => storage_err("compress", StorageError::Io { key: key.clone(), source: e }),
        })?;
    validate(&name, &bytes, &cluster)?;
    // A history file is also indexed by content: the planner follows
    // timelines through the catalog.
    let history = match name {
        WalFileName::History(tli) => parse_history(&bytes).ok().map(|entries| (tli, entries)),
        _ => None,
    };
    let outcome = repo.storage().put_new(&key, &stored).map_err(|e| storage_err("store", e))?;
    let mut warnings = Vec::new();
    let meta = match outcome {
        PutOutcome::Created(meta) => meta,
        PutOutcome::Exists => match verify_existing(&repo, &name, &key, &header.hash)? {
            Existing::Intact => {
                // Record it anyway: this retry may follow a push whose
                // catalog write failed.
                if let Ok(Some(meta)) = repo.storage().head(&key) {
                    let record = WalRecord::of_object(name, cluster.identity.segment_size, &header, &meta);
                    if let Err(e) = record_in_catalog(config, &repo, &cluster, &record, history.as_ref()) {
                        warnings.push(format!("'{name}' is archived but the catalog was not updated: {e}"));
                    }
                }
                return Ok(PushOutcome { status: PushStatus::AlreadyArchived, warnings });
            }
            Existing::DamagedCopy(damage) => {
                // The stored object claims this very content but its bytes
                // are damaged: replacing it with the good copy PostgreSQL
                // still holds is a repair, not an overwrite of other content.
                let meta = repo.storage().put_replace(&key, &stored).map_err(|e| storage_err("store", e))?;
                warnings.push(format!(
                    "'{name}' was archived but its stored copy in repository '{}' was corrupt ({damage}); \
                     replaced it with the intact file",
                    repo.location()
                ));
                meta
            }
        },
    };

    // The file is durable: from here on nothing may fail the push. The
    // catalog is an index that `catalog rebuild` can always recreate.
    let record = WalRecord::of_object(name, cluster.identity.segment_size, &header, &meta);
    if let Err(e) = record_in_catalog(config, &repo, &cluster, &record, history.as_ref()) {
        warnings.push(format!("'{name}' is archived but the catalog was not updated: {e}"));
    }
    Ok(PushOutcome { status: PushStatus::Stored, warnings })
}

/// The state of an object found under the name being pushed.
enum Existing {
    /// Verified, and its content is the file being pushed.
    Intact,
    /// Its header names the file being pushed, but the object fails
    /// verification.
    DamagedCopy(walvault_formats::object::ObjectError),
}

/// Compares the stored object with the file being pushed (`new`): a ranged
/// read of the header decides; a copy of the same file is then read whole
/// to check it is intact. Only the retry path pays for this; the first push
/// never does.
///
/// # Errors
/// [`Error::Conflict`] if the stored object is another file;
/// [`Error::Corrupt`] if it is damaged so badly that its content cannot be
/// told (a broken header): it is then left for an operator to inspect.
fn verify_existing(repo: &Repository, name: &WalFileName, key: &str, new: &ContentHash) -> Result<Existing> {
    let read_err = |source| Error::Storage { op: "read", name: name.to_string(), repo: repo.location(), source };
    // The header alone (one ranged GET) tells a different file apart; only
    // a copy of the same file is read whole, to check it is intact.
    let head = repo.storage().get_range(key, 0, object::HEADER_LEN as u64).map_err(read_err)?;
    let header = object::parse_header(&head).map_err(|source| Error::Corrupt {
        name: name.to_string(),
        repo: repo.location(),
        source,
    })?;
    if header.hash != *new {
        return Err(Error::Conflict { name: name.to_string(), repo: repo.location(), stored: header.hash, new: *new });
    }
    let bytes = repo.storage().get(key).map_err(read_err)?;
    Ok(match object::decode(&bytes) {
        Ok(_) => Existing::Intact,
        Err(damage) => Existing::DamagedCopy(damage),
    })
}

fn record_in_catalog(
    config: &Config,
    repo: &Repository,
    cluster: &ClusterInfo,
    record: &WalRecord,
    history: Option<&(TimelineId, Vec<HistoryEntry>)>,
) -> Result<()> {
    let catalog = Catalog::open(&config.catalog)?;
    catalog.bind(&CatalogCluster {
        name: cluster.name.clone(),
        repository: repo.location(),
        identity: cluster.identity,
    })?;
    if let Some((tli, entries)) = history {
        catalog.record_history(*tli, entries)?;
    }
    catalog.record_wal(record)
}
