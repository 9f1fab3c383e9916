//! The asynchronous push spool: `<spool>/push/`, where the background
//! worker records the outcome of each WAL file it pushed, and the lock that
//! keeps one worker per spool.
//!
//! Layout (everything created 0700 on demand):
//! - `<name>.ok` / `<name>.error`: one [`Record`] per WAL file, written to a
//!   temporary name (`.<name>.<pid>.tmp`), fsynced, renamed, and the
//!   directory fsynced. A reader never opens a temporary name, and a record
//!   that does not parse (no `end` line) is treated as absent, so a worker
//!   killed mid-write is harmless.
//! - `worker.lock`: locked (`flock`) by the running worker for its whole
//!   life, and holding its process id.
//! - `worker.log`: the worker's stderr.
//!
//! A record carries the size and BLAKE3 of the file it is about: a record
//! for other content under the same name (a stale one from another
//! timeline history, a restored cluster) never acknowledges a file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use walvault_formats::object::ContentHash;

use crate::error::{Error, Result};

/// The subdirectory of `spool-path` that async push owns.
pub const PUSH_DIR: &str = "push";
/// The worker's lock file (and pid file), in [`PUSH_DIR`].
pub const LOCK_FILE: &str = "worker.lock";
/// The worker's log (its stderr), in [`PUSH_DIR`].
pub const LOG_FILE: &str = "worker.log";

const MAGIC: &str = "walvault push record 1";

/// What identifies the content of a WAL file: its size and BLAKE3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    /// Bytes.
    pub size: u64,
    /// BLAKE3 of the bytes, hex.
    pub blake3: String,
}

impl FileId {
    /// Reads and hashes the file at `path`, through small buffers on two
    /// threads (archive-push does this for every file it hands over).
    ///
    /// # Errors
    /// [`Error::Read`] naming the file.
    pub fn of_file(path: &Path) -> Result<FileId> {
        use std::os::unix::fs::FileExt;
        let read_err = |source| Error::Read { path: path.to_path_buf(), source };
        let file = fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        let hash = ContentHash::of_filled(size, |offset, buf| file.read_exact_at(buf, offset)).map_err(read_err)?;
        Ok(FileId { size, blake3: hash.to_string() })
    }

    /// The identity of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> FileId {
        FileId { size: bytes.len() as u64, blake3: ContentHash::of(bytes).to_string() }
    }
}

/// How the worker's push of one file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durably stored in every required repository (or already there).
    Stored {
        /// Problems that did not fail the push, one line each.
        warnings: Vec<String>,
    },
    /// The push failed.
    Failed {
        /// The error, one line.
        message: String,
        /// Its `HINT:`, if any.
        hint: Option<String>,
        /// The repositories could not be reached (a transient storage
        /// failure), as opposed to a conflict or a bad file: what
        /// `queue-max` may act on.
        unreachable: bool,
    },
}

/// The outcome of one file, as recorded in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The WAL file name.
    pub name: String,
    /// The content the worker pushed.
    pub id: FileId,
    /// When the push ended, ms since the epoch.
    pub at_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
}

/// One line, whatever the message held.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl Record {
    /// The record's text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{MAGIC}\nname {}\nsize {}\nblake3 {}\nat {}\n",
            one_line(&self.name),
            self.id.size,
            self.id.blake3,
            self.at_ms
        );
        match &self.outcome {
            Outcome::Stored { warnings } => {
                s.push_str("result ok\n");
                for w in warnings {
                    s.push_str(&format!("warning {}\n", one_line(w)));
                }
            }
            Outcome::Failed { message, hint, unreachable } => {
                s.push_str("result error\n");
                s.push_str(&format!("unreachable {}\n", u8::from(*unreachable)));
                s.push_str(&format!("message {}\n", one_line(message)));
                if let Some(h) = hint {
                    s.push_str(&format!("hint {}\n", one_line(h)));
                }
            }
        }
        s.push_str("end\n");
        s
    }

    /// Parses a record; `None` for anything incomplete or malformed.
    pub fn parse(text: &str) -> Option<Record> {
        // The final newline is the last byte written: without it the
        // record is torn.
        if !text.ends_with("\nend\n") {
            return None;
        }
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let (mut name, mut size, mut blake3, mut at, mut result) = (None, None, None, None, None);
        let (mut warnings, mut message, mut hint, mut unreachable) = (Vec::new(), None, None, false);
        let mut ended = false;
        for line in lines {
            if ended {
                return None;
            }
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "name" => name = Some(value.to_string()),
                "size" => size = Some(value.parse::<u64>().ok()?),
                "blake3" if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    blake3 = Some(value.to_string())
                }
                "at" => at = Some(value.parse::<i64>().ok()?),
                "result" if value == "ok" || value == "error" => result = Some(value == "ok"),
                "warning" => warnings.push(value.to_string()),
                "unreachable" => unreachable = value == "1",
                "message" => message = Some(value.to_string()),
                "hint" => hint = Some(value.to_string()),
                "end" => ended = true,
                _ => return None,
            }
        }
        if !ended {
            return None;
        }
        let outcome = if result? {
            Outcome::Stored { warnings }
        } else {
            Outcome::Failed { message: message?, hint, unreachable }
        };
        Some(Record { name: name?, id: FileId { size: size?, blake3: blake3? }, at_ms: at?, outcome })
    }

    fn kind(&self) -> Kind {
        match self.outcome {
            Outcome::Stored { .. } => Kind::Ok,
            Outcome::Failed { .. } => Kind::Error,
        }
    }
}

/// The two kinds of record file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<name>.ok`.
    Ok,
    /// `<name>.error`.
    Error,
}

impl Kind {
    fn suffix(self) -> &'static str {
        match self {
            Kind::Ok => ".ok",
            Kind::Error => ".error",
        }
    }
}

/// `<spool>/push/`, opened (created if needed).
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// The error for a spool that cannot be created or written.
fn spool_err(path: &Path, source: io::Error) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        source: io::Error::new(
            source.kind(),
            format!(
                "{source} (the async push spool, 'spool-path': a local directory the user running PostgreSQL may write)"
            ),
        ),
    }
}

impl Spool {
    /// Opens `<spool_root>/push`, creating it (0700) when needed.
    ///
    /// # Errors
    /// [`Error::Write`] naming the directory when it cannot be created.
    pub fn open(spool_root: &Path) -> Result<Spool> {
        let dir = spool_root.join(PUSH_DIR);
        if !dir.is_dir() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| spool_err(&dir, e))?;
        }
        Ok(Spool { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record of kind `kind` for `name` lives.
    pub fn record_path(&self, name: &str, kind: Kind) -> PathBuf {
        self.dir.join(format!("{name}{}", kind.suffix()))
    }

    /// Writes `record` durably: temporary name, fsync, rename, directory
    /// fsync. A record of the other kind for the same file is removed
    /// first.
    ///
    /// # Errors
    /// [`Error::Write`] naming the file.
    pub fn write_record(&self, record: &Record) -> Result<()> {
        let kind = record.kind();
        let other = if kind == Kind::Ok { Kind::Error } else { Kind::Ok };
        self.remove(&record.name, other);
        let path = self.record_path(&record.name, kind);
        let tmp = self.dir.join(format!(".{}.{}.tmp", record.name, std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(record.to_text().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            spool_err(&path, e)
        })
    }

    /// The record of `name`, if one is there and parses (an `.ok` one
    /// first).
    pub fn read(&self, name: &str) -> Option<Record> {
        [Kind::Ok, Kind::Error].into_iter().find_map(|kind| {
            let text = fs::read_to_string(self.record_path(name, kind)).ok()?;
            Record::parse(&text).filter(|r| r.name == name && r.kind() == kind)
        })
    }

    /// Whether any record file (parsable or not) exists for `name`.
    pub fn has_record(&self, name: &str) -> bool {
        [Kind::Ok, Kind::Error].into_iter().any(|k| self.record_path(name, k).exists())
    }

    /// Removes the record of kind `kind` for `name`, if any.
    pub fn remove(&self, name: &str, kind: Kind) {
        let _ = fs::remove_file(self.record_path(name, kind));
    }

    /// Removes every record of `name`.
    pub fn remove_all(&self, name: &str) {
        self.remove(name, Kind::Ok);
        self.remove(name, Kind::Error);
    }

    /// The names that have a record file, and leftover temporary files
    /// (from a worker killed mid-write), by file name.
    pub fn list(&self) -> (Vec<String>, Vec<String>) {
        let mut names = Vec::new();
        let mut temps = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else { return (names, temps) };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') && file.ends_with(".tmp") {
                temps.push(file);
            } else if let Some(n) = file.strip_suffix(".ok").or_else(|| file.strip_suffix(".error")) {
                names.push(n.to_string());
            }
        }
        (names, temps)
    }

    /// The lock file, opened (created 0600 if needed).
    ///
    /// # Errors
    /// [`Error::Write`] naming it.
    pub fn lock_file(&self) -> Result<File> {
        let path = self.dir.join(LOCK_FILE);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| spool_err(&path, e))
    }

    /// Whether a worker holds the lock now.
    pub fn worker_running(&self) -> Result<bool> {
        let file = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => Ok(false),
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => Err(spool_err(&self.dir.join(LOCK_FILE), e)),
        }
    }

    /// The running worker's process id, as it wrote it in the lock file.
    pub fn worker_pid(&self) -> Option<u32> {
        let mut text = String::new();
        File::open(self.dir.join(LOCK_FILE)).ok()?.read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    }
}

/// inotify events worth waking for: a file created, renamed in, deleted.
pub const WAKE_MASK: u32 = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_DELETE | libc::IN_MOVED_FROM;

/// Waits for changes in directories (inotify) instead of polling them;
/// where inotify is unavailable, every wait is a plain sleep of at most
/// 50 ms.
#[derive(Debug)]
pub struct Watch {
    fd: Option<OwnedFd>,
}

impl Watch {
    /// Watches each of `dirs` for [`WAKE_MASK`] events.
    pub fn new(dirs: &[&Path]) -> Watch {
        // SAFETY: plain system call, no pointers.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Watch { fd: None };
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        for dir in dirs {
            let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                return Watch { fd: None };
            };
            // SAFETY: `c` is a valid NUL-terminated string for the call.
            let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), WAKE_MASK) };
            if wd < 0 {
                return Watch { fd: None };
            }
        }
        Watch { fd: Some(fd) }
    }

    /// Waits until something changed in a watched directory, `other` is
    /// readable, or `timeout` passed. Pending events are consumed.
    pub fn wait(&self, other: Option<BorrowedFd<'_>>, timeout: Duration) {
        let Some(fd) = &self.fd else {
            std::thread::sleep(timeout.min(Duration::from_millis(50)));
            return;
        };
        let mut fds = vec![libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(o) = other {
            fds.push(libc::pollfd { fd: o.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc > 0 {
            self.drain(fd.as_fd());
        }
    }

    fn drain(&self, fd: BorrowedFd<'_>) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes; the descriptor
            // is non-blocking.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("walvault-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn ok_record(name: &str, bytes: &[u8]) -> Record {
        Record {
            name: name.into(),
            id: FileId::of_bytes(bytes),
            at_ms: 1,
            outcome: Outcome::Stored { warnings: vec!["a\nwarning".into()] },
        }
    }

    #[test]
    fn records_round_trip_and_replace_each_other() {
        let dir = temp("roundtrip");
        let spool = Spool::open(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(spool.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        let name = "000000010000000000000003";
        let ok = ok_record(name, b"content");
        spool.write_record(&ok).unwrap();
        let back = spool.read(name).unwrap();
        assert_eq!(back.id, ok.id);
        assert_eq!(back.outcome, Outcome::Stored { warnings: vec!["a warning".into()] });
        let failed = Record {
            outcome: Outcome::Failed {
                message: "unable to store".into(),
                hint: Some("fix it".into()),
                unreachable: true,
            },
            ..ok.clone()
        };
        spool.write_record(&failed).unwrap();
        assert!(!spool.record_path(name, Kind::Ok).exists(), "the error record replaces the ok one");
        assert_eq!(spool.read(name).unwrap(), failed);
        spool.remove_all(name);
        assert!(spool.read(name).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_for_other_content_does_not_match() {
        let dir = temp("stale");
        let spool = Spool::open(&dir).unwrap();
        let name = "000000010000000000000004";
        spool.write_record(&ok_record(name, b"old content")).unwrap();
        let record = spool.read(name).unwrap();
        assert_ne!(record.id, FileId::of_bytes(b"new content"), "same name, other content");
        assert_ne!(record.id, FileId::of_bytes(b"old contenT"), "same size, other content");
        assert_eq!(record.id, FileId::of_bytes(b"old content"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_and_foreign_records_are_ignored() {
        let dir = temp("torn");
        let spool = Spool::open(&dir).unwrap();
        let name = "000000010000000000000005";
        let text = ok_record(name, b"x").to_text();
        // Every proper prefix of a record is torn: none parses.
        for cut in 0..text.len() {
            assert!(Record::parse(&text[..cut]).is_none(), "prefix of {cut} bytes parsed");
        }
        fs::write(spool.record_path(name, Kind::Ok), &text[..text.len() - 4]).unwrap();
        assert!(spool.read(name).is_none(), "a torn record is no record");
        // A temporary file left by a killed worker is never read.
        fs::write(spool.dir().join(format!(".{name}.123.tmp")), &text).unwrap();
        assert!(spool.read(name).is_none());
        let (names, temps) = spool.list();
        assert_eq!(names, vec![name.to_string()]);
        assert_eq!(temps, vec![format!(".{name}.123.tmp")]);
        // A record file holding another name's record does not count.
        fs::write(spool.record_path(name, Kind::Ok), ok_record("000000010000000000000006", b"x").to_text()).unwrap();
        assert!(spool.read(name).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_spool_is_one_clear_error() {
        let dir = temp("unwritable");
        fs::create_dir_all(dir.parent().unwrap()).unwrap();
        fs::write(&dir, b"a file, not a directory").unwrap();
        let e = Spool::open(&dir).unwrap_err().to_string();
        assert!(e.contains(&dir.join(PUSH_DIR).display().to_string()) && e.contains("spool-path"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn the_lock_tells_whether_a_worker_runs() {
        let dir = temp("lock");
        let spool = Spool::open(&dir).unwrap();
        assert!(!spool.worker_running().unwrap());
        let held = spool.lock_file().unwrap();
        held.lock().unwrap();
        assert!(spool.worker_running().unwrap());
        drop(held);
        assert!(!spool.worker_running().unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
