//! The repository lock: `walvault expire` holds it exclusively, backups
//! share it, so that expire never sweeps a data object a running backup
//! reuses nor deletes WAL or a manifest from under it, and two expires never
//! interleave. archive-push and archive-fetch never take it: they must never
//! wait on maintenance.
//!
//! Two implementations behind one guard, [`RepoLock`]:
//!
//! - **Local repositories**: an advisory `flock` on
//!   `<repository>/<cluster>/lock` (created if missing), through
//!   [`std::fs::File::lock`]. The kernel releases it when its holder dies,
//!   even by `kill -9`, so a crash never leaves the repository locked; on
//!   NFS, Linux maps it to a byte-range lock that the server releases when
//!   the dead client's lease expires. Each holder records itself in
//!   `<cluster>/lock.d/<command>+<pid>+<n>`: command, pid, host and since
//!   when, so that a conflict names who holds the lock. The `+` keeps these
//!   files out of storage listings (it is not a valid key character). A
//!   record left by a killed process is ignored once its pid is known to be
//!   dead on this host, and removed by the next holder that can tell.
//! - **Object stores** (`s3://`), which have no lock: lock *objects* under
//!   `<cluster>/locks/`, one per holder, each under a key no other holder
//!   uses: `locks/exclusive-<host>-<pid>-<token>` for expire,
//!   `locks/shared-<host>-<pid>-<token>` for the others. A side writes its
//!   own object *first* and only then lists `locks/`: an exclusive side
//!   backs off from any other live object, a shared side from a live
//!   exclusive one. Backing off deletes its object again, then waits or
//!   fails, naming the holder. S3 lists strongly consistently after a
//!   write, so of two racing sides at least one sees the other: both may
//!   back off (a jittered retry separates them), never both go on. A holder
//!   refreshes its object every [`Lease::refresh`] from a background
//!   thread; an object not refreshed for [`Lease::stale`] is stale (its
//!   holder died without cleaning up, or lost the store): it is reported in
//!   [`RepoLock::notes`] and removed. A dropped guard deletes its object.
//!   The same code runs on a local directory; the unit tests exercise it
//!   there.
//!
//! Because no two holders share a key, nothing here depends on the store
//! refusing a second create of a key (`If-None-Match`): the lock holds on a
//! store that ignores it. And deleting an object, whether one's own or a
//! stale one, can only ever delete the object meant: two commands that
//! both find the same stale object both delete that object, never the
//! fresh one the faster of them wrote next (which a single shared
//! `locks/exclusive` key, used by earlier versions, allowed; such an object
//! is still honoured as an exclusive holder).
//!
//! Local repositories keep `flock` because it is strictly better where it
//! exists: a killed holder frees the lock at once instead of after a lease,
//! and there is no clock to trust.
//!
//! Waiting: [`RepoLock::acquire`] takes a timeout. `walvault expire` waits
//! none by default (it fails at once, naming the holder; `--wait SECS`
//! waits); a backup waits up to [`BACKUP_WAIT`] for an expire to finish,
//! since a nightly backup that fails because maintenance ran is worse than
//! one that starts late.
//!
//! Readers: `walvault restore` and `walvault drill` share the lock too
//! ([`shared_for_reading`]), for as long as they read backup objects and
//! WAL, so that an expire neither deletes the backup being restored nor the
//! WAL its recovery needs. A host that may only read the repository (a
//! read-only mount, credentials without PUT) still restores: without the
//! lock, with a warning that says what it risks.

use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use walvault_formats::time::Timestamp;

use crate::config::Config;
use crate::repo::{Repository, now_ms};
use crate::storage::{PutOutcome, StorageError};

/// The lock file, under the cluster's directory (local repositories).
pub const LOCK_FILE: &str = "lock";
/// The directory of holder records, under the cluster's directory (local
/// repositories).
pub const HOLDERS_DIR: &str = "lock.d";
/// The folder of lock objects, under the cluster's prefix (object stores).
pub const LOCKS_DIR: &str = "locks";
/// How long a backup waits for an expire to release the lock.
pub const BACKUP_WAIT: Duration = Duration::from_secs(3600);

/// How long a restore or a drill waits for an expire to release the lock.
pub const READER_WAIT: Duration = BACKUP_WAIT;

/// Takes the shared lock for `command`, a reader of backups and WAL
/// (restore, drill), waiting up to [`READER_WAIT`] for an expire. When this
/// host cannot write the lock at all (permission refused, read-only file
/// system), returns `None` and
/// pushes a warning: refusing would make a read-only repository
/// unrestorable. The lock's own notes (stale holders removed) are pushed
/// too.
///
/// # Errors
/// [`LockError::Busy`] (an expire still runs after the wait) and
/// [`LockError::PossiblyStale`], as for a backup; any other failure to
/// take the lock (an unreachable store) and to open the repository.
pub fn shared_for_reading(
    config: &Config,
    command: &str,
    warnings: &mut Vec<String>,
) -> crate::error::Result<Option<RepoLock<'static>>> {
    shared_for_reading_within(config, command, READER_WAIT, warnings)
}

/// [`shared_for_reading`], waiting up to `wait`.
fn shared_for_reading_within(
    config: &Config,
    command: &str,
    wait: Duration,
    warnings: &mut Vec<String>,
) -> crate::error::Result<Option<RepoLock<'static>>> {
    match RepoLock::acquire_config(config, LockMode::Shared, command, wait) {
        Ok(lock) => {
            warnings.extend(lock.notes().iter().cloned());
            Ok(Some(lock))
        }
        Err(crate::Error::Lock(e)) if cannot_write_lock(&e) => {
            warnings.push(format!(
                "{command} runs without the repository lock ({e}): an expire running meanwhile could delete \
                 what it reads; run {command} where the repository is writable, or make sure no expire runs"
            ));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether the lock failed because this host may not write it, as opposed
/// to being held or the store failing.
fn cannot_write_lock(e: &LockError) -> bool {
    let refused =
        |kind: io::ErrorKind| matches!(kind, io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem);
    match e {
        LockError::Io { source, .. } => refused(source.kind()),
        LockError::Storage { source: StorageError::Io { source, .. }, .. } => refused(source.kind()),
        _ => false,
    }
}

/// Even with no wait, a busy lock is tried again for this long: a holder
/// records itself just after taking the lock and removes its record just
/// before releasing it, and a conflict should name it.
const SETTLE: Duration = Duration::from_millis(500);
/// How often a waiter tries again (local lock).
const POLL: Duration = Duration::from_millis(100);
/// How often a waiter tries again (object lock: each try is a few requests).
const OBJECT_POLL: Duration = Duration::from_millis(500);

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// With other shared holders (backups, a dry-run expire).
    Shared,
    /// Alone (expire).
    Exclusive,
}

/// The lease of an object lock: how often a holder rewrites its object,
/// and after how long without a rewrite the object is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// How often the holder refreshes its lock object.
    pub refresh: Duration,
    /// An object not refreshed for this long is stale and removed; several
    /// refresh periods, so that a slow store or a few failed refreshes do
    /// not break a live lock.
    pub stale: Duration,
}

impl Lease {
    /// Refreshed every 5 minutes, stale after 30.
    pub const DEFAULT: Lease = Lease { refresh: Duration::from_secs(300), stale: Duration::from_secs(1800) };
}

/// Who holds (or held) the lock, as recorded in `lock.d/` (local) or in
/// its lock object (object stores).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The walvault command: `expire`, `backup`.
    pub command: String,
    /// Whether it holds the lock exclusively.
    pub exclusive: bool,
    /// Its process id, on `host`.
    pub pid: u32,
    /// The host it runs on.
    pub host: String,
    /// When it took the lock, ms since the epoch.
    pub since_ms: i64,
    /// When it last refreshed its lock object, ms since the epoch (object
    /// locks; 0 in local records).
    #[serde(default)]
    pub refreshed_ms: i64,
    /// A random token telling this holder's object from another's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // To the second, as `walvault info` shows times.
        let since = Timestamp::from_ms(self.since_ms.div_euclid(1000) * 1000);
        write!(f, "{} (pid {} on host {} since {since})", self.command, self.pid, self.host)
    }
}

fn holders_text(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "another process that has not recorded itself (an older walvault, or one starting right now)".into();
    }
    let mut shown: Vec<String> = holders.iter().take(5).map(ToString::to_string).collect();
    if holders.len() > 5 {
        shown.push(format!("and {} more", holders.len() - 5));
    }
    shown.join(", ")
}

fn waited_text(waited: &Duration) -> String {
    if *waited >= Duration::from_secs(1) { format!(" (waited {} s)", waited.as_secs()) } else { String::new() }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) { format!("{} min", s / 60) } else { format!("{s} s") }
}

/// Why the lock cannot be taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another walvault command holds the lock.
    #[error("repository '{repo}' is locked by {}{}", holders_text(holders), waited_text(waited))]
    Busy {
        /// The repository.
        repo: String,
        /// The lock file, or the lock object's key.
        path: PathBuf,
        /// Who holds it, as recorded (may be empty).
        holders: Vec<Holder>,
        /// How long this command waited.
        waited: Duration,
        /// For an object lock, after how long without a refresh a holder's
        /// object is stale; `None` for the local lock.
        stale_after: Option<Duration>,
    },
    /// The lock is held, but every recorded holder is a process of this
    /// host that no longer runs.
    #[error(
        "repository '{repo}' is locked by {}, which no longer runs: the lock is possibly stale",
        holders_text(holders)
    )]
    PossiblyStale {
        /// The repository.
        repo: String,
        /// The lock file.
        path: PathBuf,
        /// The dead holders.
        holders: Vec<Holder>,
    },
    /// A lock object cannot be written, read, listed or deleted.
    #[error("unable to {op} lock object '{key}' in repository '{repo}': {source}")]
    Storage {
        /// What was attempted: `create`, `read`, `list`, `delete`.
        op: &'static str,
        /// The repository.
        repo: String,
        /// The lock object or prefix.
        key: String,
        /// Why.
        source: StorageError,
    },
    /// The lock file cannot be created, opened or locked.
    #[error("unable to lock '{}': {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl LockError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            LockError::Busy { holders, stale_after, .. } => {
                let mut hint = "let it finish, then run the command again ('walvault expire --wait SECS' waits for \
                                the lock)"
                    .to_string();
                let here = host_name();
                if let Some(h) = holders.iter().find(|h| h.host != here) {
                    match stale_after {
                        None => hint.push_str(&format!(
                            "; if host {} is down, its lock lasts until the NFS server notices (its lease expires)",
                            h.host
                        )),
                        Some(d) => hint.push_str(&format!(
                            "; if host {} is down, its lock object goes stale {} after its last refresh and the \
                             next command removes it",
                            h.host,
                            minutes(*d)
                        )),
                    }
                }
                hint
            }
            LockError::PossiblyStale { path, .. } => format!(
                "a process that inherited the lock may still hold it ('fuser -v {0}' names it); on NFS the server \
                 releases a dead client's lock when its lease expires. If no walvault command runs against this \
                 repository on any host, delete '{0}' and run the command again",
                path.display()
            ),
            LockError::Storage { source, .. } => match source.io_kind() {
                Some(io::ErrorKind::PermissionDenied) => {
                    "every command that takes the lock must be allowed to put, get, list and delete objects under \
                     '<cluster>/locks/'"
                        .into()
                }
                _ => return None,
            },
            LockError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                "the lock file must be readable by every user running walvault commands (usually 'postgres')".into()
            }
            // EBADF: NFS maps flock to fcntl locks, whose exclusive kind needs write access.
            LockError::Io { source, .. } if source.raw_os_error() == Some(libc::EBADF) => {
                "the lock file must be writable by the user running expire (on NFS an exclusive lock needs \
                 write access)"
                    .into()
            }
            LockError::Io { .. } => return None,
        })
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            LockError::Busy { .. } => true,
            LockError::PossiblyStale { .. } => false,
            LockError::Storage { source, .. } => source.is_transient(),
            LockError::Io { source, .. } => source.kind() != io::ErrorKind::PermissionDenied,
        }
    }
}

/// A held repository lock; released when dropped.
pub struct RepoLock<'r> {
    path: PathBuf,
    notes: Vec<String>,
    kind: Kind<'r>,
}

enum Kind<'r> {
    /// Closing the file releases the flock.
    File { _file: File, record: Option<PathBuf> },
    /// Deleting the object releases the object lock.
    Object { store: Store<'r>, key: String, refresher: Option<Refresher> },
}

/// The storage an object lock deletes its object from when dropped.
enum Store<'r> {
    Borrowed(&'r Repository),
    Owned(Arc<Repository>),
}

impl Store<'_> {
    fn repo(&self) -> &Repository {
        match self {
            Store::Borrowed(r) => r,
            Store::Owned(r) => r,
        }
    }
}

/// The thread that keeps an object lock's lease: it rewrites the object
/// every [`Lease::refresh`] until told to stop.
struct Refresher {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl std::fmt::Debug for RepoLock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoLock").field("path", &self.path).field("notes", &self.notes).finish_non_exhaustive()
    }
}

/// Numbers the records of one process (tests take several locks).
static RECORDS: AtomicU64 = AtomicU64::new(0);

/// The lock file of `repo`'s cluster (local repositories only).
pub fn lock_path(repo: &Repository) -> PathBuf {
    Path::new(&repo.location()).join(repo.cluster()).join(LOCK_FILE)
}

impl<'r> RepoLock<'r> {
    /// Takes the lock of `repo`'s cluster in `mode` for `command`, waiting
    /// up to `wait` for a conflicting holder to finish.
    ///
    /// On an object store the lock object is not refreshed: this is for
    /// holders that finish well within [`Lease::stale`] (keep-forever).
    /// Long holders use [`RepoLock::acquire_config`].
    ///
    /// # Errors
    /// [`LockError::Busy`] naming the holders when it is still held after
    /// `wait`; [`LockError::PossiblyStale`] when every recorded holder is
    /// dead yet the lock is held; [`LockError::Io`] when the lock file
    /// cannot be opened; on object stores [`LockError::Storage`].
    pub fn acquire(repo: &'r Repository, mode: LockMode, command: &str, wait: Duration) -> Result<Self, LockError> {
        if repo.is_object_store() {
            let held = take_objects(repo, mode, command, wait, Lease::DEFAULT)?;
            return Ok(RepoLock {
                path: PathBuf::from(&held.key),
                notes: held.notes,
                kind: Kind::Object { store: Store::Borrowed(repo), key: held.key, refresher: None },
            });
        }
        Self::acquire_file(repo, mode, command, wait)
    }

    fn acquire_file(repo: &Repository, mode: LockMode, command: &str, wait: Duration) -> Result<Self, LockError> {
        let path = lock_path(repo);
        let io_err = |source| LockError::Io { path: path.clone(), source };
        let file = open_lock_file(&path).map_err(io_err)?;
        let started = Instant::now();
        loop {
            let tried = match mode {
                LockMode::Shared => file.try_lock_shared(),
                LockMode::Exclusive => file.try_lock(),
            };
            match tried {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(io_err(e)),
            }
            let waited = started.elapsed();
            if waited >= wait.max(SETTLE) {
                return Err(conflict(repo, &path, mode, waited));
            }
            std::thread::sleep(POLL.min(wait.max(SETTLE) - waited));
        }
        let holder = Holder {
            command: command.to_string(),
            exclusive: mode == LockMode::Exclusive,
            pid: std::process::id(),
            host: host_name(),
            since_ms: now_ms(),
            refreshed_ms: 0,
            token: String::new(),
        };
        let record = record_holder(&path, &holder, mode);
        Ok(RepoLock { path, notes: Vec::new(), kind: Kind::File { _file: file, record } })
    }

    /// The lock file, or the key of the lock object.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What taking the lock found worth reporting: stale lock objects it
    /// removed. Empty for the local lock.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
}

impl RepoLock<'static> {
    /// Takes the lock of the repository and cluster `config` names, like
    /// [`RepoLock::acquire`]; on an object store the guard owns its own
    /// connection and refreshes its lock object from a background thread
    /// for as long as it is held. For long holders: backups, expire.
    ///
    /// # Errors
    /// As [`RepoLock::acquire`], and the errors of opening the repository.
    pub fn acquire_config(
        config: &Config,
        mode: LockMode,
        command: &str,
        wait: Duration,
    ) -> crate::error::Result<RepoLock<'static>> {
        let repo = Repository::open_config(config)?;
        if repo.is_object_store() {
            return Ok(Self::acquire_objects(Arc::new(repo), mode, command, wait, Lease::DEFAULT)?);
        }
        Ok(Self::acquire_file(&repo, mode, command, wait)?)
    }

    /// Takes the object lock (see the module documentation) on any
    /// repository whose storage lists consistently after a write, with
    /// `lease`, and keeps it refreshed until the guard is dropped.
    /// [`RepoLock::acquire_config`] uses it for `s3://` repositories; tests
    /// use it directly.
    ///
    /// # Errors
    /// [`LockError::Busy`] naming the holders when the lock is still held
    /// after `wait`; [`LockError::Storage`] when the store fails.
    pub fn acquire_objects(
        repo: Arc<Repository>,
        mode: LockMode,
        command: &str,
        wait: Duration,
        lease: Lease,
    ) -> Result<RepoLock<'static>, LockError> {
        let held = take_objects(&repo, mode, command, wait, lease)?;
        let refresher = spawn_refresher(Arc::clone(&repo), held.key.clone(), held.holder, lease.refresh);
        Ok(RepoLock {
            path: PathBuf::from(&held.key),
            notes: held.notes,
            kind: Kind::Object { store: Store::Owned(repo), key: held.key, refresher: Some(refresher) },
        })
    }
}

impl Drop for RepoLock<'_> {
    fn drop(&mut self) {
        match &mut self.kind {
            // The record goes first, so that a holder named in a conflict
            // holds the lock (or did a moment ago).
            Kind::File { record, .. } => {
                if let Some(r) = record {
                    let _ = std::fs::remove_file(r);
                }
            }
            Kind::Object { store, key, refresher } => {
                // The refresher stops first: a refresh after the delete
                // would bring the object back.
                if let Some(r) = refresher.take() {
                    drop(r.stop);
                    let _ = r.handle.join();
                }
                // Best effort: an object left behind goes stale and the
                // next command removes it.
                let _ = store.repo().storage().delete(key);
            }
        }
    }
}

/// The prefix of `repo`'s lock objects.
pub fn locks_prefix(repo: &Repository) -> String {
    format!("{}/{LOCKS_DIR}/", repo.cluster())
}

/// The one exclusive lock object of earlier versions, still honoured as an
/// exclusive holder: every exclusive holder now has a key of its own.
pub fn legacy_exclusive_key(repo: &Repository) -> String {
    format!("{}exclusive", locks_prefix(repo))
}

/// The kind of holder a lock object's key names: `Some(true)` exclusive,
/// `Some(false)` shared, `None` for a key that is neither (ignored).
fn key_kind(name: &str) -> Option<bool> {
    if name == "exclusive" || name.starts_with("exclusive-") {
        Some(true)
    } else if name.starts_with("shared-") {
        Some(false)
    } else {
        None
    }
}

/// Key characters only: a host name may hold anything.
fn key_safe(s: &str) -> String {
    let out: String = s
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with('.') { format!("h{out}") } else { out }
}

/// 16 hex digits, different for every call (no cryptographic strength is
/// needed: it only tells holders apart).
fn token() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_i64(now_ms());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// A lock object written and kept.
struct ObjectHeld {
    key: String,
    holder: Holder,
    notes: Vec<String>,
}

/// One try at the object lock: taken, or the holders in the way.
enum Try {
    Taken,
    Conflict(Vec<Holder>),
}

fn storage_err(repo: &Repository, op: &'static str, key: &str) -> impl FnOnce(StorageError) -> LockError {
    let (repo, key) = (repo.location(), key.to_string());
    move |source| LockError::Storage { op, repo, key, source }
}

/// Reads the holder a lock object records; `None` when the object is gone.
/// An object that is not a holder record (damaged, foreign) is described by
/// its key and dated by its modification time.
fn read_holder(repo: &Repository, key: &str) -> Result<Option<Holder>, LockError> {
    let bytes = match repo.storage().get(key) {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(storage_err(repo, "read", key)(e)),
    };
    if let Ok(h) = serde_json::from_slice::<Holder>(&bytes) {
        return Ok(Some(h));
    }
    let Some(meta) = repo.storage().head(key).map_err(storage_err(repo, "read", key))? else { return Ok(None) };
    Ok(Some(Holder {
        command: format!("an unreadable lock object '{key}'"),
        exclusive: key.rsplit('/').next().and_then(key_kind) == Some(true),
        pid: 0,
        host: "unknown".into(),
        since_ms: meta.modified_ms,
        refreshed_ms: meta.modified_ms,
        token: String::new(),
    }))
}

/// Whether a lock object's holder is gone: not refreshed for `lease.stale`,
/// or a process of this host that no longer runs.
fn stale(h: &Holder, lease: Lease, now: i64) -> bool {
    let age = now.saturating_sub(h.refreshed_ms.max(h.since_ms));
    u128::try_from(age).is_ok_and(|a| a > lease.stale.as_millis()) || dead(h)
}

/// Removes a stale lock object, with a note saying so.
fn break_stale(
    repo: &Repository,
    key: &str,
    h: &Holder,
    lease: Lease,
    notes: &mut Vec<String>,
) -> Result<(), LockError> {
    let age =
        Duration::from_millis(u64::try_from(now_ms().saturating_sub(h.refreshed_ms.max(h.since_ms))).unwrap_or(0));
    let why = if dead(h) {
        "its process no longer runs".to_string()
    } else {
        format!(
            "not refreshed for {} (stale after {})",
            minutes(Duration::from_secs(age.as_secs())),
            minutes(lease.stale)
        )
    };
    repo.storage().delete(key).map_err(storage_err(repo, "delete", key))?;
    notes.push(format!("removed stale lock object '{key}' of {h}: {why}"));
    Ok(())
}

fn take_objects(
    repo: &Repository,
    mode: LockMode,
    command: &str,
    wait: Duration,
    lease: Lease,
) -> Result<ObjectHeld, LockError> {
    let started = Instant::now();
    let mut notes = Vec::new();
    loop {
        let now = now_ms();
        let holder = Holder {
            command: command.to_string(),
            exclusive: mode == LockMode::Exclusive,
            pid: std::process::id(),
            host: host_name(),
            since_ms: now,
            refreshed_ms: now,
            token: token(),
        };
        let kind = match mode {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
        };
        let key = format!("{}{kind}-{}-{}-{}", locks_prefix(repo), key_safe(&holder.host), holder.pid, holder.token);
        let holders = match try_objects(repo, &key, &holder, lease, &mut notes)? {
            Try::Taken => return Ok(ObjectHeld { key, holder, notes }),
            Try::Conflict(h) => h,
        };
        let waited = started.elapsed();
        if waited >= wait {
            return Err(LockError::Busy {
                repo: repo.location(),
                path: PathBuf::from(key),
                holders,
                waited,
                stale_after: Some(lease.stale),
            });
        }
        // Jittered, so that two sides that saw each other and both backed
        // off do not keep meeting.
        let jitter = Duration::from_millis(u64::from(token().as_bytes()[0] % 16) * 25);
        std::thread::sleep((OBJECT_POLL + jitter).min(wait - waited));
    }
}

/// One try: write `holder`'s own object under `key`, then list the lock
/// objects and back off from every live one in the way (any other for an
/// exclusive holder, an exclusive one for a shared holder), removing stale
/// ones on the way.
fn try_objects(
    repo: &Repository,
    key: &str,
    holder: &Holder,
    lease: Lease,
    notes: &mut Vec<String>,
) -> Result<Try, LockError> {
    let body = serde_json::to_vec(holder).map_err(|e| {
        storage_err(repo, "create", key)(StorageError::Io { key: key.to_string(), source: io::Error::other(e) })
    })?;
    // The key carries a fresh token: `Exists` would be another holder's
    // object, which only a store reusing tokens could produce; it is still
    // not ours to keep, nor to delete.
    if let PutOutcome::Exists = repo.storage().put_new(key, &body).map_err(storage_err(repo, "create", key))? {
        return Ok(Try::Conflict(Vec::new()));
    }
    let in_the_way = |notes: &mut Vec<String>| -> Result<Vec<Holder>, LockError> {
        let prefix = locks_prefix(repo);
        let listing = repo.storage().list(&prefix).map_err(storage_err(repo, "list", &prefix))?;
        let mut live = Vec::new();
        for m in listing.iter().filter(|m| m.key != key) {
            match m.key.strip_prefix(&prefix).and_then(key_kind) {
                Some(exclusive) if exclusive || holder.exclusive => {}
                _ => continue,
            }
            match read_holder(repo, &m.key)? {
                Some(h) if stale(&h, lease, now_ms()) => break_stale(repo, &m.key, &h, lease, notes)?,
                Some(h) => live.push(h),
                // Released meanwhile.
                None => {}
            }
        }
        Ok(live)
    };
    let mut live = match in_the_way(notes) {
        Ok(live) => live,
        Err(e) => {
            let _ = repo.storage().delete(key);
            return Err(e);
        }
    };
    if live.is_empty() {
        return Ok(Try::Taken);
    }
    repo.storage().delete(key).map_err(storage_err(repo, "delete", key))?;
    live.sort_by_key(|h| (h.since_ms, h.pid));
    Ok(Try::Conflict(live))
}

/// Rewrites the lock object every `every` with a new `refreshed_ms`, until
/// the sender is dropped. A failed refresh is tried again at the next
/// period: the object goes stale only after several.
fn spawn_refresher(repo: Arc<Repository>, key: String, mut holder: Holder, every: Duration) -> Refresher {
    let (stop, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
            holder.refreshed_ms = now_ms();
            if let Ok(body) = serde_json::to_vec(&holder) {
                let _ = repo.storage().put_replace(&key, &body);
            }
        }
    });
    Refresher { stop, handle }
}

/// Opens the lock file, creating it if missing. Read-write where allowed:
/// on NFS, Linux turns `flock` into a byte-range lock, and an exclusive one
/// needs a writable descriptor. Read-only otherwise (a file created by
/// another user: root running expire, postgres running backups), which is
/// enough for every lock on a local file system and for shared ones on NFS.
fn open_lock_file(path: &Path) -> io::Result<File> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let open = || match OpenOptions::new().read(true).write(true).open(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => File::open(path),
        other => other,
    };
    match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    match OpenOptions::new().write(true).create_new(true).mode(0o664).open(path) {
        Ok(mut f) => {
            // Only a note for whoever finds it; the lock is the flock.
            let _ = f.write_all(
                b"walvault repository lock: expire holds it exclusively, backups share it; holders are in lock.d/\n",
            );
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    open()
}

fn holders_dir(lock: &Path) -> PathBuf {
    lock.with_file_name(HOLDERS_DIR)
}

/// Every holder record, with its file.
fn read_holders(lock: &Path) -> Vec<(PathBuf, Holder)> {
    let Ok(entries) = std::fs::read_dir(holders_dir(lock)) else { return Vec::new() };
    let mut out: Vec<(PathBuf, Holder)> = entries
        .filter_map(|e| {
            let p = e.ok()?.path();
            let h = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, h))
        })
        .collect();
    out.sort_by_key(|(_, h)| (h.since_ms, h.pid));
    out
}

/// Records `holder` (best effort: a holder that cannot record itself still
/// holds the lock, it is only not named in conflicts), and removes the
/// records that holding the lock in `mode` proves stale.
fn record_holder(lock: &Path, holder: &Holder, mode: LockMode) -> Option<PathBuf> {
    for (p, h) in read_holders(lock) {
        let stale = match mode {
            // Nobody else holds it.
            LockMode::Exclusive => true,
            // Nobody holds it exclusively.
            LockMode::Shared => h.exclusive || dead(&h),
        };
        if stale {
            let _ = std::fs::remove_file(p);
        }
    }
    let dir = holders_dir(lock);
    std::fs::create_dir_all(&dir).ok()?;
    let n = RECORDS.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{}+{}+{n}", holder.command, holder.pid));
    let json = serde_json::to_vec(holder).ok()?;
    std::fs::write(&path, json).ok()?;
    Some(path)
}

/// The error for a lock still held after waiting: the conflicting holders,
/// or the verdict that they are all dead.
fn conflict(repo: &Repository, path: &Path, mode: LockMode, waited: Duration) -> LockError {
    let all: Vec<Holder> = read_holders(path).into_iter().map(|(_, h)| h).collect();
    // A shared request conflicts only with an exclusive holder.
    let mut holders: Vec<Holder> = match mode {
        LockMode::Shared => all.iter().filter(|h| h.exclusive).cloned().collect(),
        LockMode::Exclusive => all.clone(),
    };
    if holders.is_empty() {
        holders = all;
    }
    let alive: Vec<Holder> = holders.iter().filter(|h| !dead(h)).cloned().collect();
    if alive.is_empty() && !holders.is_empty() {
        return LockError::PossiblyStale { repo: repo.location(), path: path.to_path_buf(), holders };
    }
    LockError::Busy { repo: repo.location(), path: path.to_path_buf(), holders: alive, waited, stale_after: None }
}

/// Whether `h` is known to be dead: a process of this host that no longer
/// exists. A process of another host cannot be checked from here.
fn dead(h: &Holder) -> bool {
    if h.host != host_name() {
        return false;
    }
    // pid 0 or one beyond i32 would address process groups: never signalled.
    let Ok(pid) = i32::try_from(h.pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists; it
    // sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// This host's name, or `unknown`.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walvault_formats::wal::{ClusterIdentity, PgVersion, SystemId, WalSegmentSize};

    fn repo(tag: &str) -> (PathBuf, Repository) {
        let dir = std::env::temp_dir().join(format!("walvault-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let repo = Repository::open(dir.join("repo").to_str().unwrap(), "main").unwrap();
        let identity = ClusterIdentity {
            system_id: SystemId(5),
            pg_version: PgVersion::new(15).unwrap(),
            segment_size: WalSegmentSize::DEFAULT,
        };
        repo.init(&identity).unwrap();
        (dir, repo)
    }

    /// A pid that no longer runs: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn shared_holders_coexist_and_exclusive_conflicts_name_them() {
        let (dir, repo) = repo("modes");
        let a = RepoLock::acquire(&repo, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        let b = RepoLock::acquire(&repo, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        assert_eq!(a.path(), dir.join("repo/main/lock"));
        let e = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap_err();
        let msg = e.to_string();
        let me = format!("backup (pid {} on host {} since ", std::process::id(), host_name());
        assert_eq!(msg.matches(&me).count(), 2, "{msg}");
        assert!(msg.starts_with(&format!("repository '{}' is locked by backup", repo.location())), "{msg}");
        assert!(e.is_transient() && e.hint().unwrap().contains("--wait"));
        drop((a, b));
        let x = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap();
        let e = RepoLock::acquire(&repo, LockMode::Shared, "backup", Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains(&format!("locked by expire (pid {}", std::process::id())), "{e}");
        drop(x);
        assert_eq!(std::fs::read_dir(dir.join("repo/main/lock.d")).unwrap().count(), 0);
        // Records are invisible to storage listings.
        let _y = RepoLock::acquire(&repo, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        let keys: Vec<String> = repo.storage().list("main/").unwrap().into_iter().map(|m| m.key).collect();
        assert!(keys.iter().all(|k| !k.contains("lock.d")), "{keys:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn readers_wait_for_expire_and_go_on_without_a_lock_only_where_they_cannot_write_one() {
        let (dir, config, _) = crate::testing::temp_repo("lock-readers", 9, WalSegmentSize::DEFAULT);
        let repo = Repository::open_config(&config).unwrap();
        let expire = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap();
        let mut warnings = Vec::new();
        let e = shared_for_reading_within(&config, "restore", Duration::from_millis(200), &mut warnings).unwrap_err();
        assert!(e.to_string().contains("locked by expire"), "{e}");
        drop(expire);
        let held = shared_for_reading_within(&config, "restore", Duration::ZERO, &mut warnings).unwrap();
        assert!(held.is_some() && warnings.is_empty(), "{warnings:?}");
        // A backup (shared) and a drill share it with the restore; expire
        // does not get it.
        let drill = shared_for_reading_within(&config, "drill", Duration::ZERO, &mut warnings).unwrap();
        assert!(drill.is_some());
        let e = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap_err().to_string();
        // Both holders are named, in whatever order their records list.
        assert!(e.contains("is locked by ") && e.contains("restore (pid") && e.contains("drill (pid"), "{e}");
        drop((held, drill));
        // Which failures mean "this host cannot write a lock" (go on,
        // warned) rather than "held" or "the store failed" (stop).
        let io = |kind| LockError::Io { path: dir.clone(), source: io::Error::from(kind) };
        let store = |kind| LockError::Storage {
            op: "create",
            repo: "s3://b/p".into(),
            key: "main/locks/shared-x".into(),
            source: StorageError::Io { key: "main/locks/shared-x".into(), source: io::Error::from(kind) },
        };
        assert!(cannot_write_lock(&io(io::ErrorKind::PermissionDenied)));
        assert!(cannot_write_lock(&io(io::ErrorKind::ReadOnlyFilesystem)));
        assert!(cannot_write_lock(&store(io::ErrorKind::PermissionDenied)));
        assert!(!cannot_write_lock(&store(io::ErrorKind::TimedOut)));
        assert!(!cannot_write_lock(&io(io::ErrorKind::NotFound)));
        let busy = LockError::Busy {
            repo: "r".into(),
            path: dir.clone(),
            holders: Vec::new(),
            waited: Duration::ZERO,
            stale_after: None,
        };
        assert!(!cannot_write_lock(&busy));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_waiter_gets_the_lock_when_the_holder_finishes() {
        let (dir, repo) = repo("wait");
        // The guard borrows its repository; this one lives to the end.
        let repo: &'static Repository = Box::leak(Box::new(repo));
        let held = RepoLock::acquire(repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(held);
        });
        let start = Instant::now();
        let got = RepoLock::acquire(repo, LockMode::Exclusive, "expire", Duration::from_secs(10));
        assert!(got.is_ok() && start.elapsed() >= Duration::from_millis(600));
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_held_for_a_dead_recorded_holder_is_possibly_stale() {
        let (dir, repo) = repo("stale");
        let path = lock_path(&repo);
        // Held by a file description that recorded nothing (as a child that
        // inherited it would), while the record names a dead process.
        let _ = RepoLock::acquire(&repo, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        let raw = File::open(&path).unwrap();
        raw.lock().unwrap();
        let ghost = Holder {
            command: "expire".into(),
            exclusive: true,
            pid: dead_pid(),
            host: host_name(),
            since_ms: 1_700_000_000_000,
            refreshed_ms: 0,
            token: String::new(),
        };
        std::fs::write(holders_dir(&path).join("expire+1+1"), serde_json::to_vec(&ghost).unwrap()).unwrap();
        let e = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("since 2023-11-14 22:13:20+00), which no longer runs: the lock is possibly stale"),
            "{msg}"
        );
        assert!(e.hint().unwrap().contains(&format!("fuser -v {}", path.display())));
        assert!(!e.is_transient());
        // Nobody recorded at all: busy, holder unknown.
        std::fs::remove_file(holders_dir(&path).join("expire+1+1")).unwrap();
        let e = RepoLock::acquire(&repo, LockMode::Shared, "backup", Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains("locked by another process that has not recorded itself"), "{e}");
        // Released by closing: the kernel, not walvault, frees a dead holder's lock.
        drop(raw);
        let _ok = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // The object lock, on a local directory: its put_new is an atomic
    // create, which is all the object lock needs.

    fn arc_repo(tag: &str) -> (PathBuf, Arc<Repository>) {
        let (dir, _) = repo(tag);
        let r = Repository::open(dir.join("repo").to_str().unwrap(), "main").unwrap();
        (dir, Arc::new(r))
    }

    const QUICK: Lease = Lease { refresh: Duration::from_millis(100), stale: Duration::from_secs(1800) };

    fn lock_keys(repo: &Repository) -> Vec<String> {
        let mut keys: Vec<String> =
            repo.storage().list(&locks_prefix(repo)).unwrap().into_iter().map(|m| m.key).collect();
        keys.sort();
        keys
    }

    #[test]
    fn object_lock_shared_holders_coexist_and_exclusive_conflicts_name_them() {
        let (dir, repo) = arc_repo("objmodes");
        let take = |mode, cmd| RepoLock::acquire_objects(Arc::clone(&repo), mode, cmd, Duration::ZERO, QUICK);
        let a = take(LockMode::Shared, "backup").unwrap();
        let b = take(LockMode::Shared, "backup").unwrap();
        assert!(a.path().to_str().unwrap().starts_with("main/locks/shared-") && a.path() != b.path(), "{:?}", a.path());
        assert_eq!(lock_keys(&repo).len(), 2);
        let e = take(LockMode::Exclusive, "expire").unwrap_err();
        let msg = e.to_string();
        let me = format!("backup (pid {} on host {} since ", std::process::id(), host_name());
        assert_eq!(msg.matches(&me).count(), 2, "{msg}");
        assert!(msg.starts_with(&format!("repository '{}' is locked by backup", repo.location())), "{msg}");
        assert!(e.is_transient() && e.hint().unwrap().contains("--wait"));
        // The refused exclusive side removed its object again.
        assert!(lock_keys(&repo).iter().all(|k| k.starts_with("main/locks/shared-")), "{:?}", lock_keys(&repo));
        drop((a, b));
        assert!(lock_keys(&repo).is_empty(), "a dropped guard deletes its object");
        let x = take(LockMode::Exclusive, "expire").unwrap();
        let x_key = x.path().to_str().unwrap().to_string();
        assert!(x_key.starts_with(&format!("main/locks/exclusive-{}-{}-", host_name(), std::process::id())), "{x_key}");
        let e = take(LockMode::Shared, "backup").unwrap_err().to_string();
        assert!(e.contains(&format!("locked by expire (pid {}", std::process::id())), "{e}");
        let e = take(LockMode::Exclusive, "expire").unwrap_err().to_string();
        assert!(e.contains("locked by expire (pid"), "{e}");
        assert_eq!(lock_keys(&repo), [x_key]);
        drop(x);
        assert!(lock_keys(&repo).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn object_lock_waiter_gets_it_when_the_holder_finishes() {
        let (dir, repo) = arc_repo("objwait");
        let held =
            RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Exclusive, "expire", Duration::ZERO, QUICK).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1200));
            drop(held);
        });
        let start = Instant::now();
        let got =
            RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Shared, "backup", Duration::from_secs(20), QUICK);
        assert!(got.is_ok(), "{got:?}");
        assert!(start.elapsed() >= Duration::from_millis(1100));
        t.join().unwrap();
        drop(got);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn object_lock_is_refreshed_while_held() {
        let (dir, repo) = arc_repo("objrefresh");
        let held =
            RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Shared, "backup", Duration::ZERO, QUICK).unwrap();
        let key = held.path().to_str().unwrap().to_string();
        let first: Holder = serde_json::from_slice(&repo.storage().get(&key).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(450));
        let later: Holder = serde_json::from_slice(&repo.storage().get(&key).unwrap()).unwrap();
        assert!(later.refreshed_ms >= first.refreshed_ms + 200, "{first:?} {later:?}");
        assert_eq!((later.since_ms, &later.token), (first.since_ms, &first.token));
        drop(held);
        assert!(repo.storage().head(&key).unwrap().is_none(), "no refresh after the guard is dropped");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_lock_objects_are_reported_and_removed() {
        let (dir, repo) = arc_repo("objstale");
        let old = now_ms() - 45 * 60 * 1000;
        let ghost = |exclusive, host: &str, pid| Holder {
            command: if exclusive { "expire".into() } else { "backup".into() },
            exclusive,
            pid,
            host: host.into(),
            since_ms: old - 1000,
            refreshed_ms: old,
            token: "t".into(),
        };
        // The single exclusive object of earlier versions is honoured.
        let ex = legacy_exclusive_key(&repo);
        repo.storage().put_new(&ex, &serde_json::to_vec(&ghost(true, "elsewhere", 7)).unwrap()).unwrap();
        // A backup breaks a stale exclusive object, and says so.
        let b =
            RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Shared, "backup", Duration::ZERO, QUICK).unwrap();
        assert_eq!(b.notes().len(), 1, "{:?}", b.notes());
        let note = &b.notes()[0];
        assert!(
            note.starts_with("removed stale lock object 'main/locks/exclusive' of expire (pid 7 on host elsewhere"),
            "{note}"
        );
        assert!(note.ends_with("not refreshed for 45 min (stale after 30 min)"), "{note}");
        drop(b);
        // An expire breaks a stale shared object, and a dead local one at once.
        let stale_key = format!("{}shared-elsewhere-8-x", locks_prefix(&repo));
        repo.storage().put_new(&stale_key, &serde_json::to_vec(&ghost(false, "elsewhere", 8)).unwrap()).unwrap();
        let dead_key = format!("{}shared-here-1-y", locks_prefix(&repo));
        let fresh = Holder { since_ms: now_ms(), refreshed_ms: now_ms(), ..ghost(false, &host_name(), dead_pid()) };
        repo.storage().put_new(&dead_key, &serde_json::to_vec(&fresh).unwrap()).unwrap();
        let x =
            RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Exclusive, "expire", Duration::ZERO, QUICK).unwrap();
        assert_eq!(x.notes().len(), 2, "{:?}", x.notes());
        assert!(x.notes().iter().any(|n| n.contains("shared-here-1-y") && n.ends_with("its process no longer runs")));
        assert_eq!(lock_keys(&repo), [x.path().to_str().unwrap()]);
        drop(x);
        // A live holder elsewhere, refreshed recently, is not stale.
        let live = Holder { since_ms: now_ms(), refreshed_ms: now_ms(), ..ghost(false, "elsewhere", 9) };
        repo.storage().put_new(&stale_key, &serde_json::to_vec(&live).unwrap()).unwrap();
        let e = RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Exclusive, "expire", Duration::ZERO, QUICK)
            .unwrap_err();
        assert!(e.to_string().contains("locked by backup (pid 9 on host elsewhere"), "{e}");
        assert!(e.hint().unwrap().contains("goes stale 30 min after its last refresh"), "{:?}", e.hint());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use crate::storage::Storage;

    /// A store that ignores create-only writes: put_new always overwrites.
    struct Overwriting(crate::storage::fs::FsStorage);

    impl Storage for Overwriting {
        fn location(&self) -> String {
            self.0.location()
        }
        fn put_new(&self, key: &str, data: &[u8]) -> Result<PutOutcome, StorageError> {
            self.0.put_replace(key, data).map(PutOutcome::Created)
        }
        fn put_replace(&self, key: &str, data: &[u8]) -> Result<crate::storage::ObjectMeta, StorageError> {
            self.0.put_replace(key, data)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
            self.0.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
            self.0.get_range(key, offset, len)
        }
        fn head(&self, key: &str) -> Result<Option<crate::storage::ObjectMeta>, StorageError> {
            self.0.head(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<crate::storage::ObjectMeta>, StorageError> {
            self.0.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.0.delete(key)
        }
    }

    /// The lock never relies on a conditional create: on a store that
    /// ignores it, holders are kept apart all the same.
    #[test]
    fn a_store_ignoring_create_only_writes_still_keeps_holders_apart() {
        let (dir, _) = repo("objunsafe");
        let fs = crate::storage::fs::FsStorage::new(dir.join("repo").to_str().unwrap());
        let repo = Arc::new(Repository::with_storage(Box::new(Overwriting(fs)), "main").unwrap());
        let take = |mode, cmd| RepoLock::acquire_objects(Arc::clone(&repo), mode, cmd, Duration::ZERO, QUICK);
        let x = take(LockMode::Exclusive, "expire").unwrap();
        for (mode, cmd) in [(LockMode::Exclusive, "expire"), (LockMode::Shared, "backup")] {
            let e = take(mode, cmd).unwrap_err();
            assert!(matches!(e, LockError::Busy { .. }) && e.to_string().contains("locked by expire (pid"), "{e}");
        }
        drop(x);
        let (a, b) = (take(LockMode::Shared, "backup").unwrap(), take(LockMode::Shared, "backup").unwrap());
        assert!(take(LockMode::Exclusive, "expire").unwrap_err().to_string().contains("locked by backup"));
        drop((a, b));
        assert!(lock_keys(&repo).is_empty());
        race(&repo);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An expire of another host that stopped refreshing its lock object
    /// 45 minutes ago.
    fn stale_expire() -> Holder {
        let old = now_ms() - 45 * 60 * 1000;
        Holder {
            command: "expire".into(),
            exclusive: true,
            pid: 7,
            host: "elsewhere".into(),
            since_ms: old,
            refreshed_ms: old,
            token: "t".into(),
        }
    }

    /// Two commands that find the same stale object both delete it: the
    /// slower one's delete must not take the lock the faster one took next.
    #[test]
    fn a_late_break_of_a_stale_object_leaves_the_new_holder_alone() {
        let (dir, repo) = arc_repo("objbreak");
        let ghost = stale_expire();
        // The shared key of earlier versions: the one such a race broke.
        let ghost_key = legacy_exclusive_key(&repo);
        repo.storage().put_new(&ghost_key, &serde_json::to_vec(&ghost).unwrap()).unwrap();
        // The faster command breaks the stale object and takes the lock.
        let a =
            RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Exclusive, "expire", Duration::ZERO, QUICK).unwrap();
        assert!(a.notes()[0].starts_with(&format!("removed stale lock object '{ghost_key}'")), "{:?}", a.notes());
        // The slower one read the same stale object and deletes it now.
        break_stale(&repo, &ghost_key, &ghost, QUICK, &mut Vec::new()).unwrap();
        assert_eq!(lock_keys(&repo), [a.path().to_str().unwrap()], "the new holder's object is intact");
        let e = RepoLock::acquire_objects(Arc::clone(&repo), LockMode::Exclusive, "expire", Duration::ZERO, QUICK)
            .unwrap_err();
        assert!(e.to_string().contains("locked by expire (pid"), "{e}");
        drop(a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Racing holders, with stale exclusive objects (the legacy key and a
    /// current one) in the way at the start: never an exclusive holder
    /// beside any other.
    #[test]
    fn racing_object_lock_holders_never_overlap() {
        let (dir, repo) = arc_repo("objrace");
        race(&repo);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn race(repo: &Arc<Repository>) {
        use std::sync::atomic::AtomicI64;
        for key in [legacy_exclusive_key(repo), format!("{}exclusive-elsewhere-7-t", locks_prefix(repo))] {
            repo.storage().put_new(&key, &serde_json::to_vec(&stale_expire()).unwrap()).unwrap();
        }
        // > 0: shared holders; -1: the exclusive one.
        let state = Arc::new(AtomicI64::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (repo, state, barrier) = (Arc::clone(repo), Arc::clone(&state), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    let mode = if i % 3 == 0 { LockMode::Exclusive } else { LockMode::Shared };
                    for _ in 0..3 {
                        let l = RepoLock::acquire_objects(Arc::clone(&repo), mode, "t", Duration::from_secs(60), QUICK)
                            .unwrap();
                        match mode {
                            LockMode::Exclusive => {
                                assert_eq!(state.compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst), Ok(0));
                                std::thread::sleep(Duration::from_millis(20));
                                state.store(0, Ordering::SeqCst);
                            }
                            LockMode::Shared => {
                                assert!(state.fetch_add(1, Ordering::SeqCst) >= 0, "shared beside exclusive");
                                std::thread::sleep(Duration::from_millis(20));
                                state.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        drop(l);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(lock_keys(repo).is_empty());
    }
}
