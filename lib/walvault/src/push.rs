//! archive-push: one WAL file from PostgreSQL into the repository.
//!
//! The per-segment path is: read the cluster identity (one GET), read and
//! validate the file, compress and hash it (in parallel), create-once put,
//! and record it in the catalog. No listing, no scan: the cost does not grow
//! with the archive.

use std::os::unix::fs::FileExt;
use std::path::Path;

use walvault_formats::object::{self, ContentHash, EncodeOptions};
use walvault_formats::wal::{
    HistoryEntry, SegmentError, TimelineId, WalFileName, WalSegmentSize, parse_history, validate_segment,
};

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
    /// Size of the file pushed, bytes.
    pub plain_len: u64,
    /// BLAKE3 of the file pushed: what the async push spool matches its
    /// records against.
    pub hash: ContentHash,
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

/// One repository to push into, opened, with the cluster it holds and its
/// catalog, opened once per push.
struct Target {
    repo: Repository,
    cluster: ClusterInfo,
    /// The catalog, or why it cannot be opened: a push does not fail for
    /// its index (a warning says it was not updated).
    catalog: Result<Catalog>,
}

impl Target {
    fn open(config: &Config) -> Result<Target> {
        let repo = Repository::open_config(config)?;
        let cluster = repo.cluster_info()?;
        let catalog = Catalog::open(&config.catalog);
        if repo.is_object_store() {
            // Whether the store honours If-None-Match, as `walvault init`
            // or `check` recorded it: from the local catalog, so no request
            // once known. A store that ignores it (or an unknown one) gets
            // check-then-write. Its warning was printed by init/check and
            // shows in `info`; repeating it on every file would bury the
            // server log.
            let _ = crate::probe::configure_for_push(&repo, catalog.as_ref().ok(), config.s3.conditional_create);
        }
        Ok(Target { repo, cluster, catalog })
    }

    /// Records the pushed file in the catalog; the error, if any, as the
    /// warning line.
    fn record(&self, record: &WalRecord, history: Option<&(TimelineId, Vec<HistoryEntry>)>) -> Option<String> {
        let name = &record.name;
        let recorded = match &self.catalog {
            Ok(catalog) => record_in_catalog(catalog, &self.repo, &self.cluster, record, history),
            Err(e) => return Some(format!("'{name}' is archived but the catalog was not updated: {e}")),
        };
        recorded.err().map(|e| format!("'{name}' is archived but the catalog was not updated: {e}"))
    }
}

/// The file, read, compressed and hashed once for every repository.
struct Prepared {
    name: WalFileName,
    header: object::ObjectHeader,
    bytes: Vec<u8>,
    stored: Vec<u8>,
    history: Option<(TimelineId, Vec<HistoryEntry>)>,
}

impl Prepared {
    /// The outcome of pushing this file.
    fn outcome(&self, status: PushStatus, warnings: Vec<String>) -> PushOutcome {
        PushOutcome { status, warnings, plain_len: self.bytes.len() as u64, hash: self.header.hash }
    }
}

/// Reads and encodes the file at `path`; a segment must be
/// `segment_size` bytes long, checked before it is read.
fn prepare(config: &Config, path: &Path, name: WalFileName, segment_size: WalSegmentSize) -> Result<Prepared> {
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
        let expected = segment_size.bytes();
        if len != expected {
            let source = SegmentError::Size { actual: len, expected };
            return Err(Error::Segment { name: name.to_string(), source });
        }
    }
    let len = usize::try_from(len).map_err(|_| read_err(std::io::Error::other("file too large")))?;
    let opts = EncodeOptions { level: config.compress_level, workers: workers_for(config), ..Default::default() };
    // Reading, compressing and hashing overlap: each compression thread
    // reads its own piece of the file (pread) and compresses it while this
    // thread hashes the pieces already read.
    let (header, bytes, stored) = object::encode_filled(len, &opts, |offset, buf| file.read_exact_at(buf, offset))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::NotFound => read_err(e),
            _ if e.raw_os_error().is_some() => read_err(e),
            _ => Error::Read { path: path.to_path_buf(), source: std::io::Error::other(format!("compress: {e}")) },
        })?;
    // A history file is also indexed by content: the planner follows
    // timelines through the catalog.
    let history = match name {
        WalFileName::History(tli) => parse_history(&bytes).ok().map(|entries| (tli, entries)),
        _ => None,
    };
    Ok(Prepared { name, header, bytes, stored, history })
}

/// Archives the file at `path` (PostgreSQL's `%p`) into every configured
/// repository. Returns only once the file is durably stored, or was
/// already stored with identical content, in every required repository; a
/// failure in an optional one is a warning.
///
/// # Errors
/// Any failure to read, validate or store in a required repository; and
/// [`Error::Conflict`] when a different file is archived under the same
/// name in any repository, which is never overwritten.
pub fn push(config: &Config, path: &Path) -> Result<PushOutcome> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name: WalFileName = file_name.parse()?;
    if !config.is_multi() {
        let target = Target::open(config)?;
        let prepared = prepare(config, path, name, target.cluster.identity.segment_size)?;
        return store(&target, &prepared);
    }
    push_multi(config, path, name)
}

/// [`push`] with several repositories: each is opened and written by its
/// own thread; the file is read and compressed once.
fn push_multi(config: &Config, path: &Path, name: WalFileName) -> Result<PushOutcome> {
    let views = config.each();
    let opened: Vec<Result<Target>> = std::thread::scope(|s| {
        let handles: Vec<_> = views.iter().map(|v| s.spawn(move || Target::open(v))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Setting("a push thread panicked".into()))))
            .collect()
    });
    let Some(segment_size) = opened.iter().find_map(|t| t.as_ref().ok().map(|t| t.cluster.identity.segment_size))
    else {
        // No repository could be opened: the first required one's error.
        return Err(first_required_error(&views, opened));
    };
    let prepared = prepare(config, path, name, segment_size)?;
    let results: Vec<Result<PushOutcome>> = std::thread::scope(|s| {
        let prepared = &prepared;
        let handles: Vec<_> =
            opened.into_iter().map(|t| s.spawn(move || t.and_then(|t| store(&t, prepared)))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Setting("a push thread panicked".into()))))
            .collect()
    });
    let first_required = views.iter().find(|v| v.repositories[0].required).map_or("", |v| v.repo_name());
    let mut warnings = Vec::new();
    let mut status = PushStatus::AlreadyArchived;
    let mut failure = None;
    for (view, result) in views.iter().zip(results) {
        let spec = &view.repositories[0];
        match result {
            Ok(outcome) => {
                if outcome.status == PushStatus::Stored {
                    status = PushStatus::Stored;
                }
                warnings.extend(outcome.warnings.into_iter().map(|w| format!("repository '{}': {w}", spec.name)));
            }
            // Another file under the same name is never acceptable, in
            // any repository.
            Err(e) if spec.required || matches!(e, Error::Conflict { .. }) => {
                if failure.is_none() {
                    failure = Some(e);
                }
            }
            Err(e) => warnings.push(format!(
                "'{name}' was not stored in optional repository '{}' ({}): {e}; run 'walvault repo sync --from {} \
                 --to {}' once it is reachable again",
                spec.name, spec.location, first_required, spec.name
            )),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(prepared.outcome(status, warnings)),
    }
}

/// The error of the first required repository (there always is one).
fn first_required_error(views: &[Config], opened: Vec<Result<Target>>) -> Error {
    let mut first = None;
    for (view, t) in views.iter().zip(opened) {
        if let Err(e) = t {
            if view.repositories[0].required {
                return e;
            }
            first.get_or_insert(e);
        }
    }
    first.unwrap_or_else(|| Error::Setting("no repository configured".into()))
}

/// Stores the prepared file into one repository.
fn store(target: &Target, prepared: &Prepared) -> Result<PushOutcome> {
    let Target { repo, cluster, .. } = target;
    let Prepared { name, header, bytes, stored, history } = prepared;
    let name = *name;
    validate(&name, bytes, cluster)?;
    let key = repo.wal_key(&name);
    let storage_err =
        |op, source: StorageError| Error::Storage { op, name: name.to_string(), repo: repo.location(), source };
    let outcome = repo.storage().put_new(&key, stored).map_err(|e| storage_err("store", e))?;
    let mut warnings = Vec::new();
    let meta = match outcome {
        PutOutcome::Created(meta) => meta,
        PutOutcome::Exists => match verify_existing(repo, &name, &key, &header.hash)? {
            Existing::Intact => {
                // Record it anyway: this retry may follow a push whose
                // catalog write failed.
                if let Ok(Some(meta)) = repo.storage().head(&key) {
                    let record = WalRecord::of_object(name, cluster.identity.segment_size, header, &meta);
                    warnings.extend(target.record(&record, history.as_ref()));
                }
                return Ok(prepared.outcome(PushStatus::AlreadyArchived, warnings));
            }
            Existing::DamagedCopy(damage) => {
                // The stored object claims this very content but its bytes
                // are damaged: replacing it with the good copy PostgreSQL
                // still holds is a repair, not an overwrite of other content.
                let meta = repo.storage().put_replace(&key, stored).map_err(|e| storage_err("store", e))?;
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
    let record = WalRecord::of_object(name, cluster.identity.segment_size, header, &meta);
    warnings.extend(target.record(&record, history.as_ref()));
    Ok(prepared.outcome(PushStatus::Stored, warnings))
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
    catalog: &Catalog,
    repo: &Repository,
    cluster: &ClusterInfo,
    record: &WalRecord,
    history: Option<&(TimelineId, Vec<HistoryEntry>)>,
) -> Result<()> {
    catalog.bind(&CatalogCluster {
        name: cluster.name.clone(),
        repository: repo.location(),
        identity: cluster.identity,
    })?;
    if let Some((tli, entries)) = history {
        catalog.record_history(*tli, entries)?;
    }
    catalog.record_wal(record)?;
    // The repository answers again: the records of files dropped meanwhile
    // (queue-max) go into it, so that `catalog rebuild` finds the gap too.
    // One indexed query when there are none.
    for g in catalog.gaps_to_record()? {
        repo.put_gap(&g)?;
        catalog.mark_gap_recorded(&g.name)?;
    }
    Ok(())
}
