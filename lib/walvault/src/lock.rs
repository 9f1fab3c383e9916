//! The repository lock: `walvault expire` holds it exclusively, backups
//! share it, so that expire never sweeps a data object a running backup
//! reuses nor deletes WAL or a manifest from under it, and two expires never
//! interleave. archive-push and archive-fetch never take it: they must never
//! wait on maintenance.
//!
//! The lock is an advisory `flock` on `<repository>/<cluster>/lock` (created
//! if missing), through [`std::fs::File::lock`]. The kernel releases it when
//! its holder dies, even by `kill -9`, so a crash never leaves the repository
//! locked; on NFS, Linux maps it to a byte-range lock that the server
//! releases when the dead client's lease expires.
//!
//! Each holder records itself in `<cluster>/lock.d/<command>+<pid>+<n>`:
//! command, pid, host and since when, so that a conflict names who holds the
//! lock. The `+` keeps these files out of storage listings (it is not a
//! valid key character). A record left by a killed process is ignored once
//! its pid is known to be dead on this host, and removed by the next holder
//! that can tell.
//!
//! Waiting: [`RepoLock::acquire`] takes a timeout. `walvault expire` waits
//! none by default (it fails at once, naming the holder; `--wait SECS`
//! waits); a backup waits up to [`BACKUP_WAIT`] for an expire to finish,
//! since a nightly backup that fails because maintenance ran is worse than
//! one that starts late.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use walvault_formats::time::Timestamp;

use crate::repo::{Repository, now_ms};

/// The lock file, under the cluster's directory.
pub const LOCK_FILE: &str = "lock";
/// The directory of holder records, under the cluster's directory.
pub const HOLDERS_DIR: &str = "lock.d";
/// How long a backup waits for an expire to release the lock.
pub const BACKUP_WAIT: Duration = Duration::from_secs(3600);

/// Even with no wait, a busy lock is tried again for this long: a holder
/// records itself just after taking the lock and removes its record just
/// before releasing it, and a conflict should name it.
const SETTLE: Duration = Duration::from_millis(500);
/// How often a waiter tries again.
const POLL: Duration = Duration::from_millis(100);

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// With other shared holders (backups, a dry-run expire).
    Shared,
    /// Alone (expire).
    Exclusive,
}

/// Who holds (or held) the lock, as recorded in `lock.d/`.
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

/// Why the lock cannot be taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another walvault command holds the lock.
    #[error("repository '{repo}' is locked by {}{}", holders_text(holders), waited_text(waited))]
    Busy {
        /// The repository.
        repo: String,
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as recorded (may be empty).
        holders: Vec<Holder>,
        /// How long this command waited.
        waited: Duration,
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
    /// The repository is on an object store, which has no exclusive lock
    /// yet.
    #[error("'{command}' needs the exclusive repository lock, which S3 repositories do not support yet ('{repo}')")]
    Unsupported {
        /// The repository.
        repo: String,
        /// The command that asked.
        command: String,
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
            LockError::Busy { holders, .. } => {
                let mut hint = "let it finish, then run the command again ('walvault expire --wait SECS' waits for \
                                the lock)"
                    .to_string();
                let here = host_name();
                if let Some(h) = holders.iter().find(|h| h.host != here) {
                    hint.push_str(&format!(
                        "; if host {} is down, its lock lasts until the NFS server notices (its lease expires)",
                        h.host
                    ));
                }
                hint
            }
            LockError::PossiblyStale { path, .. } => format!(
                "a process that inherited the lock may still hold it ('fuser -v {0}' names it); on NFS the server \
                 releases a dead client's lock when its lease expires. If no walvault command runs against this \
                 repository on any host, delete '{0}' and run the command again",
                path.display()
            ),
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
            LockError::Unsupported { .. } => {
                "run expire against a local repository for now; backups, archiving and restores work on S3".into()
            }
        })
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            LockError::Busy { .. } => true,
            LockError::PossiblyStale { .. } | LockError::Unsupported { .. } => false,
            LockError::Io { source, .. } => source.kind() != io::ErrorKind::PermissionDenied,
        }
    }
}

/// A held repository lock; released when dropped.
#[derive(Debug)]
pub struct RepoLock {
    // Closing the file releases the lock; `None` on an object store.
    _file: Option<File>,
    path: PathBuf,
    record: Option<PathBuf>,
}

/// Numbers the records of one process (tests take several locks).
static RECORDS: AtomicU64 = AtomicU64::new(0);

/// The lock file of `repo`'s cluster (local repositories only).
pub fn lock_path(repo: &Repository) -> PathBuf {
    Path::new(&repo.location()).join(repo.cluster()).join(LOCK_FILE)
}

impl RepoLock {
    /// Takes the lock of `repo`'s cluster in `mode` for `command`, waiting
    /// up to `wait` for a conflicting holder to finish.
    ///
    /// # Errors
    /// [`LockError::Busy`] naming the holders when it is still held after
    /// `wait`; [`LockError::PossiblyStale`] when every recorded holder is
    /// dead yet the lock is held; [`LockError::Io`] when the lock file
    /// cannot be opened.
    pub fn acquire(repo: &Repository, mode: LockMode, command: &str, wait: Duration) -> Result<RepoLock, LockError> {
        let path = lock_path(repo);
        if repo.is_object_store() {
            // Object stores have no lock yet. Nothing can take the exclusive
            // lock there, so shared holders (backups) need none; expire,
            // which needs it, is refused rather than run unprotected.
            return match mode {
                LockMode::Shared => Ok(RepoLock { _file: None, path, record: None }),
                LockMode::Exclusive => {
                    Err(LockError::Unsupported { repo: repo.location(), command: command.to_string() })
                }
            };
        }
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
        };
        let record = record_holder(&path, &holder, mode);
        Ok(RepoLock { _file: Some(file), path, record })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        // The record goes first, so that a holder named in a conflict
        // holds the lock (or did a moment ago).
        if let Some(r) = &self.record {
            let _ = std::fs::remove_file(r);
        }
    }
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
    LockError::Busy { repo: repo.location(), path: path.to_path_buf(), holders: alive, waited }
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
    fn a_waiter_gets_the_lock_when_the_holder_finishes() {
        let (dir, repo) = repo("wait");
        let held = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(held);
        });
        let start = Instant::now();
        let got = RepoLock::acquire(&repo, LockMode::Exclusive, "expire", Duration::from_secs(10));
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
}
