//! archive-push as PostgreSQL calls it: synchronous ([`crate::push`]) or
//! asynchronous through a background worker (`async = true`), and
//! `queue-max`, which lets PostgreSQL recycle WAL the repositories cannot
//! take, with an audit trail.
//!
//! Asynchronous push: [`archive`] hands its file to a worker process (one
//! per spool, started on demand by re-executing archive-push with
//! `--worker <pg_wal>`, exiting after [`WORKER_IDLE`] with nothing to do).
//! The worker looks ahead at `pg_wal/archive_status/*.ready`, oldest first,
//! pushes up to `jobs` files in parallel through [`crate::push::push`] (so
//! every repository, S3, create-once and the probe apply unchanged) and
//! records each outcome in the spool ([`crate::spool`]): an ok record only
//! after the push returned success. [`archive`] returns success only on an
//! ok record for the very content of its file (size and BLAKE3), so an
//! acknowledgement is never early and a worker killed at any moment loses
//! nothing: the next call starts another worker, which pushes the file
//! again (create-once makes that a no-op when it was stored).
//!
//! Waiting never polls hard: archive-push and the worker sleep on inotify
//! (the spool; `archive_status`) and every wait has a deadline.
//!
//! Memory: the worker holds at most `jobs` files at once, each with its
//! compressed copy: `jobs × (segment size + compressed size)`, 4 × 32 MiB
//! with the defaults and 16 MiB segments; archive-push itself reads its
//! file once to hash it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use walvault_formats::wal::{WalFileName, WalSegmentSize};

use crate::catalog::{Catalog, DroppedWal};
use crate::config::Config;
use crate::error::Error;
use crate::info::human_bytes;
use crate::push;
use crate::repo::now_ms;
use crate::spool::{FileId, Kind, LOG_FILE, Outcome, Record, Spool, Watch};

/// How long a worker with nothing to do waits before it exits.
pub const WORKER_IDLE: Duration = Duration::from_secs(10);

/// The shortest time archive-push waits for its file's outcome before it
/// fails (longer when an S3 repository's retry budget needs more).
pub const WAIT_MIN: Duration = Duration::from_secs(300);

/// How often a waiting archive-push checks that a worker is alive (and
/// starts one if not) when nothing else happens.
const LIVENESS: Duration = Duration::from_millis(500);

/// An error record older than this is not trusted as the outcome of the
/// current attempt: it is removed and the worker tries again.
const ERROR_FRESH: Duration = Duration::from_secs(10);

/// How to start a worker: this program with these arguments (the
/// configuration flags archive-push was given); `--worker <pg_wal>` is
/// appended.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The archive-push executable.
    pub program: PathBuf,
    /// Arguments before `--worker`.
    pub args: Vec<OsString>,
}

/// A successful archive-push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Lines to print as warnings (a DROPPED file's among them).
    pub warnings: Vec<String>,
    /// The file was not stored: `queue-max` let PostgreSQL recycle it.
    pub dropped: bool,
}

/// A failed archive-push: the message and hint to print. Errors from the
/// worker arrive as text through the spool, so this is text too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The error, one line.
    pub message: String,
    /// What to do, if there is something to say.
    pub hint: Option<String>,
    /// The repositories could not be reached (see [`is_unreachable`]).
    pub unreachable: bool,
}

impl Failure {
    /// The failure of `e`.
    pub fn of(e: &Error) -> Failure {
        Failure { message: e.to_string(), hint: e.hint(), unreachable: is_unreachable(e) }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether `e` means the repositories cannot be reached now (a transient
/// storage failure, a missing mount), as opposed to a conflict, a corrupt
/// object, a bad file or a local catalog problem: the only failures
/// `queue-max` may drop WAL for.
pub fn is_unreachable(e: &Error) -> bool {
    match e {
        Error::Catalog { .. } | Error::Conflict { .. } | Error::Corrupt { .. } => false,
        Error::InRepository { source, .. } => is_unreachable(source),
        e => e.is_transient(),
    }
}

/// Archives the file at `path` (`%p`), as `archive_command`: through the
/// worker when `async` is on and `path` is in a `pg_wal` directory (one
/// with `archive_status`), else directly. When that fails because the
/// repositories cannot be reached and `queue-max` is set and exceeded by
/// the WAL waiting in `pg_wal`, a segment is dropped instead: recorded as a
/// gap in every repository's catalog and reported as success with a loud
/// warning, so that PostgreSQL recycles it rather than fill the disk.
///
/// # Errors
/// The push's error for this file ([`Failure`]); a timeout waiting for the
/// worker; a spool that cannot be written.
pub fn archive(config: &Config, path: &Path, launcher: &Launcher) -> Result<Archived, Failure> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name: WalFileName =
        file_name.parse().map_err(|e: walvault_formats::wal::WalFileNameError| Failure::of(&Error::Name(e)))?;
    let pg_wal = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let status_dir = pg_wal.join("archive_status");
    let in_pg_wal = status_dir.is_dir();
    let result = if config.async_push && in_pg_wal {
        push_async(config, path, &file_name, &pg_wal, launcher)
    } else {
        push::push(config, path).map(|o| Archived { warnings: o.warnings, dropped: false }).map_err(|e| Failure::of(&e))
    };
    match (result, config.queue_max) {
        (Err(f), Some(max)) if f.unreachable && in_pg_wal && matches!(name, WalFileName::Segment(_)) => {
            drop_if_over(config, path, name, &pg_wal, max, f)
        }
        (result, _) => result,
    }
}

/// Bytes of WAL waiting in `pg_wal`: the files that have a `.ready`.
pub fn backlog_bytes(pg_wal: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(pg_wal.join("archive_status")) else { return 0 };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_owned))
        .filter_map(|n| fs::metadata(pg_wal.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

/// `queue-max`: drops the segment at `path` when the backlog exceeds
/// `max`, recording the gap first; otherwise returns `failure`.
fn drop_if_over(
    config: &Config,
    path: &Path,
    name: WalFileName,
    pg_wal: &Path,
    max: u64,
    failure: Failure,
) -> Result<Archived, Failure> {
    let backlog = backlog_bytes(pg_wal);
    if backlog <= max {
        return Err(failure);
    }
    let size = fs::metadata(path).ok().and_then(|m| WalSegmentSize::new(m.len()));
    let gap = DroppedWal {
        name: name.to_string(),
        timeline: name.timeline().get(),
        segno: size.and_then(|s| name.segment()?.segno(s)).map(|s| s.0),
        dropped_at_ms: now_ms(),
        reason: format!(
            "the repositories could not be reached while {} of WAL waited in pg_wal (queue-max {}): {}",
            human_bytes(backlog),
            human_bytes(max),
            failure.message
        ),
    };
    // The audit trail comes first: a drop that cannot be recorded does not
    // happen.
    for view in config.each() {
        if let Err(e) = Catalog::open(&view.catalog).and_then(|c| c.record_dropped(&gap)) {
            return Err(Failure {
                message: format!(
                    "{}; '{name}' was not dropped (queue-max) because the gap cannot be recorded: {e}",
                    failure.message
                ),
                hint: failure.hint,
                unreachable: true,
            });
        }
    }
    Ok(Archived {
        warnings: vec![format!(
            "'{name}' was DROPPED without being archived: {}; PITR across it is impossible: take a new full \
             backup ('walvault backup') once the repositories are reachable",
            gap.reason
        )],
        dropped: true,
    })
}

/// How long archive-push waits for its file's outcome: [`WAIT_MIN`], or
/// more when an S3 repository's retries may take longer.
pub fn wait_limit(config: &Config) -> Duration {
    let s3 = config
        .repositories
        .iter()
        .filter(|r| r.location.starts_with("s3://"))
        .map(|r| r.s3.retry_budget_secs + 2 * r.s3.request_timeout_secs + 60)
        .max()
        .unwrap_or(0);
    WAIT_MIN.max(Duration::from_secs(s3))
}

/// Waits for the worker's outcome for `name`, starting a worker when none
/// runs.
fn push_async(
    config: &Config,
    path: &Path,
    name: &str,
    pg_wal: &Path,
    launcher: &Launcher,
) -> Result<Archived, Failure> {
    let fail = |e: Error| Failure::of(&e);
    let id = FileId::of_file(path).map_err(fail)?;
    let spool = Spool::open(&config.spool).map_err(fail)?;
    // Watching before the first look: a record written in between still
    // wakes the wait.
    let watch = Watch::new(&[spool.dir()]);
    let limit = wait_limit(config);
    let started = Instant::now();
    let mut checked: Option<Instant> = None;
    loop {
        match spool.read(name) {
            Some(r) => match r.outcome {
                Outcome::Stored { warnings } if r.id == id => return Ok(Archived { warnings, dropped: false }),
                // An ok record for other content never acknowledges this
                // file: it goes, and the worker pushes this one.
                Outcome::Stored { .. } => spool.remove(name, Kind::Ok),
                Outcome::Failed { .. } if now_ms().saturating_sub(r.at_ms) > ERROR_FRESH.as_millis() as i64 => {
                    spool.remove(name, Kind::Error)
                }
                // Returned once, then cleared: PostgreSQL's retry makes
                // the worker try again.
                Outcome::Failed { message, hint, unreachable } => {
                    spool.remove(name, Kind::Error);
                    return Err(Failure { message, hint, unreachable });
                }
            },
            // A record file that does not parse would keep the worker
            // from this file forever.
            None if spool.has_record(name) => spool.remove_all(name),
            None => {}
        }
        let waited = started.elapsed();
        if waited >= limit {
            return Err(Failure {
                message: format!(
                    "no outcome for '{name}' from the archive-push worker after {} s (spool '{}')",
                    waited.as_secs(),
                    spool.dir().display()
                ),
                hint: Some(format!(
                    "see the worker's log '{}'; PostgreSQL retries the file; 'async = false' archives without \
                     the worker",
                    spool.dir().join(LOG_FILE).display()
                )),
                unreachable: false,
            });
        }
        if checked.is_none_or(|t| t.elapsed() >= LIVENESS) {
            if !spool.worker_running().map_err(fail)? {
                start_worker(launcher, &spool, pg_wal)?;
            }
            checked = Some(Instant::now());
        }
        watch.wait(None, (limit - waited).min(LIVENESS));
    }
}

/// Starts a detached worker: its own session, stdin and stdout to
/// /dev/null, stderr appended to the spool's log.
fn start_worker(launcher: &Launcher, spool: &Spool, pg_wal: &Path) -> Result<(), Failure> {
    let log_path = spool.dir().join(LOG_FILE);
    let fail = |what: &str, e: std::io::Error| Failure {
        message: format!("unable to start the archive-push worker ({what}): {e}"),
        hint: Some("set 'async = false' to archive without the worker".into()),
        unreachable: false,
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| fail(&format!("its log '{}'", log_path.display()), e))?;
    let pg_wal = std::path::absolute(pg_wal).map_err(|e| fail(&format!("'{}'", pg_wal.display()), e))?;
    let mut cmd = Command::new(&launcher.program);
    cmd.args(&launcher.args).arg("--worker").arg(&pg_wal).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid() is async-signal-safe and touches no memory: the
    // worker leaves PostgreSQL's process group and session, so signals
    // meant for the archiver's command do not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    // Not waited for: it outlives this process and is reaped by init.
    cmd.spawn().map(drop).map_err(|e| fail(&format!("'{}'", launcher.program.display()), e))
}

/// How a worker run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Another worker held the spool: this one did nothing.
    pub already_running: bool,
    /// Files pushed (ok records written).
    pub stored: u64,
    /// Pushes that failed (error records written).
    pub failed: u64,
}

/// The worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Exit after this long with nothing to push.
    pub idle: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions { idle: WORKER_IDLE }
    }
}

/// The `.ready` files of `status_dir`, timeline history files first, then
/// oldest first (as PostgreSQL's archiver orders them).
fn ready_files(status_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(status_dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_owned))
        .filter(|n| n.parse::<WalFileName>().is_ok())
        .collect();
    names.sort_by(|a, b| (!a.ends_with(".history"), a).cmp(&(!b.ends_with(".history"), b)));
    names
}

/// The async push worker for the `pg_wal` directory `pg_wal`: see the
/// module docs. Returns at once when another worker holds the spool.
///
/// # Errors
/// A spool that cannot be created or locked.
pub fn run_worker(config: &Config, pg_wal: &Path, opts: &WorkerOptions) -> crate::Result<WorkerReport> {
    let spool = Spool::open(&config.spool)?;
    let lock = spool.lock_file()?;
    // A worker just exiting, or archive-push checking for one, may hold the
    // lock for a moment.
    let mut locked = false;
    for _ in 0..10 {
        if lock.try_lock().is_ok() {
            locked = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !locked {
        return Ok(WorkerReport { already_running: true, ..Default::default() });
    }
    let pid = format!("{}\n", std::process::id());
    let lock_path = spool.dir().join(crate::spool::LOCK_FILE);
    lock.set_len(0)
        .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
        .map_err(|source| Error::Write { path: lock_path, source })?;
    trim_log(&spool);

    let status_dir = pg_wal.join("archive_status");
    let watch = Watch::new(&[&status_dir, spool.dir()]);
    let (mut wake_rx, wake_tx) =
        UnixStream::pair().map_err(|source| Error::Write { path: spool.dir().to_path_buf(), source })?;
    let _ = wake_rx.set_nonblocking(true);
    let (done_tx, done_rx) = mpsc::channel::<(String, bool)>();
    // Files are pushed in parallel: each one compresses on fewer threads.
    let mut cfg = config.clone();
    if cfg.compress_workers == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cfg.compress_workers = u32::try_from(cores).unwrap_or(1).div_ceil(config.jobs.max(1)).clamp(1, 8);
    }
    let jobs = usize::try_from(config.jobs.max(1)).unwrap_or(1);
    let me = std::process::id();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut report = WorkerReport::default();
    let mut last_busy = Instant::now();
    loop {
        for (name, ok) in done_rx.try_iter() {
            in_flight.remove(&name);
            if ok { report.stored += 1 } else { report.failed += 1 }
        }
        let mut sink = [0u8; 256];
        while matches!(wake_rx.read(&mut sink), Ok(n) if n > 0) {}
        if !status_dir.is_dir() {
            // The cluster is gone; pushes still running end with us, which
            // acknowledges nothing.
            break;
        }
        let ready = ready_files(&status_dir);
        let ready_set: HashSet<&str> = ready.iter().map(String::as_str).collect();
        let (recorded, temps) = spool.list();
        // Records of files PostgreSQL no longer waits for (marked .done,
        // or gone) are cleaned up, and temporary files of killed workers.
        for n in &recorded {
            if !ready_set.contains(n.as_str()) && !in_flight.contains(n) {
                spool.remove_all(n);
            }
        }
        for t in temps.iter().filter(|t| !t.ends_with(&format!(".{me}.tmp"))) {
            let _ = fs::remove_file(spool.dir().join(t));
        }
        let recorded: HashSet<String> = recorded.into_iter().collect();
        let mut pending = false;
        for name in &ready {
            if in_flight.contains(name) || recorded.contains(name) {
                continue;
            }
            pending = true;
            if in_flight.len() >= jobs {
                break;
            }
            let job = Job {
                cfg: cfg.clone(),
                spool: spool.clone(),
                path: pg_wal.join(name),
                name: name.clone(),
                done: done_tx.clone(),
                wake: wake_tx.try_clone().ok(),
            };
            match std::thread::Builder::new().name(format!("push {name}")).spawn(move || job.run()) {
                Ok(_) => {
                    in_flight.insert(name.clone());
                }
                Err(e) => {
                    eprintln!("archive-push worker: unable to start a push thread for '{name}': {e}");
                    break;
                }
            }
        }
        if pending || !in_flight.is_empty() {
            last_busy = Instant::now();
        } else if last_busy.elapsed() >= opts.idle {
            break;
        }
        let timeout = if in_flight.is_empty() && !pending {
            opts.idle.saturating_sub(last_busy.elapsed()).max(Duration::from_millis(10)).min(Duration::from_secs(1))
        } else {
            Duration::from_secs(1)
        };
        watch.wait(Some(wake_rx.as_fd()), timeout);
    }
    Ok(report)
}

/// Keeps the worker's log from growing without bound: past 1 MiB it
/// starts over.
fn trim_log(spool: &Spool) {
    let path = spool.dir().join(LOG_FILE);
    if fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20) {
        let _ = fs::OpenOptions::new().write(true).truncate(true).open(&path);
    }
}

/// One file pushed by the worker.
struct Job {
    cfg: Config,
    spool: Spool,
    path: PathBuf,
    name: String,
    done: mpsc::Sender<(String, bool)>,
    wake: Option<UnixStream>,
}

impl Job {
    fn run(mut self) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| push::push(&self.cfg, &self.path)));
        let (id, outcome) = match result {
            Ok(Ok(o)) => {
                (FileId { size: o.plain_len, blake3: o.hash.to_string() }, Outcome::Stored { warnings: o.warnings })
            }
            Ok(Err(e)) => {
                let f = Failure::of(&e);
                (self.id_or_unknown(), Outcome::Failed { message: f.message, hint: f.hint, unreachable: f.unreachable })
            }
            Err(_) => (
                self.id_or_unknown(),
                Outcome::Failed {
                    message: format!("pushing '{}' panicked", self.name),
                    hint: None,
                    unreachable: false,
                },
            ),
        };
        let ok = matches!(outcome, Outcome::Stored { .. });
        let record = Record { name: self.name.clone(), id, at_ms: now_ms(), outcome };
        if let Err(e) = self.spool.write_record(&record) {
            eprintln!("archive-push worker: {e}");
        }
        let _ = self.done.send((self.name.clone(), ok));
        if let Some(w) = self.wake.as_mut() {
            let _ = w.write_all(&[1]);
        }
    }

    /// The file's identity for an error record (which only ever fails a
    /// call, so an unreadable file gets a placeholder).
    fn id_or_unknown(&self) -> FileId {
        FileId::of_file(&self.path).unwrap_or(FileId { size: 0, blake3: "0".repeat(64) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use walvault_formats::wal::{SegmentName, SegmentNo, TimelineId};

    use crate::catalog::Catalog;

    struct Cluster {
        dir: PathBuf,
        pg_wal: PathBuf,
        config: Config,
        identity: walvault_formats::wal::ClusterIdentity,
    }

    const MIB: u64 = 1 << 20;

    fn cluster(tag: &str, extra: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("walvault-async-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pg_wal = dir.join("pg_wal");
        fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
        let text = format!(
            "repository = \"{d}/repo\"\ncatalog = \"{d}/catalog.db\"\nasync = true\njobs = 2\n{extra}",
            d = dir.display()
        );
        fs::write(dir.join("walvault.toml"), text).unwrap();
        let config = Config::load(&crate::config::Overrides::default(), Some(dir.join("walvault.toml"))).unwrap();
        let identity = walvault_formats::wal::ClusterIdentity {
            system_id: walvault_formats::wal::SystemId(77),
            pg_version: walvault_formats::wal::PgVersion::new(15).unwrap(),
            segment_size: WalSegmentSize::new(MIB).unwrap(),
        };
        crate::init::init(&config, &identity).unwrap();
        Cluster { dir, pg_wal, config, identity }
    }

    impl Cluster {
        /// Writes segment `segno` (filled with `fill`) and its `.ready`.
        fn segment(&self, segno: u64, fill: u8) -> PathBuf {
            let name =
                SegmentName::from_segno(TimelineId::FIRST, SegmentNo(segno), self.identity.segment_size).to_string();
            let bytes =
                walvault_formats::wal::synthetic_segment(&self.identity, TimelineId::FIRST, SegmentNo(segno), fill);
            let path = self.pg_wal.join(&name);
            fs::write(&path, bytes).unwrap();
            fs::write(self.pg_wal.join("archive_status").join(format!("{name}.ready")), b"").unwrap();
            path
        }

        /// Runs a worker in a thread; returns once it holds the spool.
        fn worker(&self, idle: Duration) -> std::thread::JoinHandle<WorkerReport> {
            let (config, pg_wal) = (self.config.clone(), self.pg_wal.clone());
            let handle = std::thread::spawn(move || run_worker(&config, &pg_wal, &WorkerOptions { idle }).unwrap());
            let spool = Spool::open(&self.config.spool).unwrap();
            while !spool.worker_running().unwrap() {
                assert!(!handle.is_finished(), "the worker ended before it held the spool");
                std::thread::sleep(Duration::from_millis(5));
            }
            handle
        }

        fn object(&self, path: &Path) -> PathBuf {
            let name = path.file_name().unwrap().to_str().unwrap();
            self.dir.join("repo/main/wal").join(&name[..16]).join(name)
        }
    }

    /// A launcher that cannot start anything: the tests run the worker in
    /// a thread themselves.
    fn no_launcher() -> Launcher {
        Launcher { program: PathBuf::from("/nonexistent/archive-push"), args: Vec::new() }
    }

    #[test]
    fn the_worker_pushes_ahead_and_archive_push_acknowledges_from_its_record() {
        let c = cluster("ahead", "");
        let files: Vec<PathBuf> = (1..=5).map(|s| c.segment(s, s as u8)).collect();
        let worker = c.worker(Duration::from_millis(300));
        // Every file is pushed by the worker, ahead of any call.
        for f in &files {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !c.object(f).exists() {
                assert!(Instant::now() < deadline, "the worker did not push {}", f.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for f in &files {
            let out = archive(&c.config, f, &no_launcher()).unwrap();
            assert_eq!(out, Archived { warnings: vec![], dropped: false });
        }
        let report = worker.join().unwrap();
        assert_eq!(report.stored, 5, "{report:?}");
        // The records go once PostgreSQL marks the files .done.
        for f in &files {
            let name = f.file_name().unwrap().to_str().unwrap();
            let status = c.pg_wal.join("archive_status");
            fs::rename(status.join(format!("{name}.ready")), status.join(format!("{name}.done"))).unwrap();
        }
        let spool = Spool::open(&c.config.spool).unwrap();
        assert_eq!(spool.list().0.len(), 5);
        run_worker(&c.config, &c.pg_wal, &WorkerOptions { idle: Duration::ZERO }).unwrap();
        assert!(spool.list().0.is_empty(), "records of .done files are cleaned up: {:?}", spool.list());
        fs::remove_dir_all(&c.dir).unwrap();
    }

    #[test]
    fn a_stale_ok_record_never_acknowledges_other_content() {
        let c = cluster("stale", "");
        let file = c.segment(7, 1);
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let spool = Spool::open(&c.config.spool).unwrap();
        // An ok record for other bytes under this name.
        let other = walvault_formats::wal::synthetic_segment(&c.identity, TimelineId::FIRST, SegmentNo(7), 2);
        let stale = Record {
            name: name.clone(),
            id: FileId::of_bytes(&other),
            at_ms: now_ms(),
            outcome: Outcome::Stored { warnings: vec![] },
        };
        spool.write_record(&stale).unwrap();
        // No worker can start (the launcher is broken): archive-push must
        // not take the stale record for its file's; it removes it and
        // reports that it cannot start a worker.
        let e = archive(&c.config, &file, &no_launcher()).unwrap_err();
        assert!(e.message.contains("unable to start the archive-push worker"), "{e}");
        assert!(!c.object(&file).exists());
        assert!(spool.read(&name).is_none(), "the stale record is gone");
        // With a worker, the file is really pushed and then acknowledged.
        spool.write_record(&stale).unwrap();
        let worker = c.worker(Duration::from_millis(500));
        archive(&c.config, &file, &no_launcher()).unwrap();
        assert!(c.object(&file).exists(), "acknowledged only once stored");
        worker.join().unwrap();
        fs::remove_dir_all(&c.dir).unwrap();
    }

    #[test]
    fn worker_errors_reach_archive_push_once_and_queue_max_drops_with_a_record() {
        let c = cluster("unreachable", "queue-max = \"2MiB\"\n");
        let first = c.segment(1, 1);
        // The repository's WAL directory replaced by a file: unreachable.
        let wal = c.dir.join("repo/main/wal");
        let _ = fs::remove_dir_all(&wal);
        fs::write(&wal, b"not a directory").unwrap();
        let worker = c.worker(Duration::from_millis(1500));
        // One segment waiting (1 MiB <= 2 MiB): an error, never success.
        let e = archive(&c.config, &first, &no_launcher()).unwrap_err();
        assert!(e.unreachable && e.message.contains("unable to store"), "{e:?}");
        let spool = Spool::open(&c.config.spool).unwrap();
        let name = first.file_name().unwrap().to_str().unwrap();
        // Three segments waiting (3 MiB > 2 MiB): dropped, and recorded.
        c.segment(2, 2);
        c.segment(3, 3);
        let out = archive(&c.config, &first, &no_launcher()).unwrap();
        assert!(out.dropped, "{out:?}");
        assert!(out.warnings[0].contains("DROPPED") && out.warnings[0].contains(name), "{out:?}");
        let gaps = Catalog::open(&c.config.catalog).unwrap().dropped().unwrap();
        assert_eq!(gaps.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), vec![name]);
        assert_eq!(gaps[0].segno, Some(1));
        assert!(!c.object(&first).exists());
        let _ = spool;
        worker.join().unwrap();

        // The repository returns: the next stored file brings the gap's
        // record into it, and a catalog rebuilt from the repository alone
        // still knows the gap (invariant 6).
        fs::remove_file(&wal).unwrap();
        let repo = crate::repo::Repository::open_config(&c.config).unwrap();
        assert!(repo.list_gaps().unwrap().is_empty(), "not written while unreachable");
        crate::push::push(&c.config, &c.segment(2, 2)).unwrap();
        let recorded = repo.list_gaps().unwrap();
        assert_eq!(recorded.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), vec![name]);
        assert_eq!(recorded[0].reason, gaps[0].reason);
        fs::remove_file(&c.config.catalog).unwrap();
        crate::rebuild::rebuild(&c.config).unwrap();
        let rebuilt = Catalog::open(&c.config.catalog).unwrap().dropped().unwrap();
        assert_eq!(rebuilt, gaps, "the rebuilt catalog has the same gap");
        // verify knows the record is part of the layout.
        let report =
            crate::verify::verify(&c.config, &crate::verify::VerifyOptions { backup: None, wal_only: false, jobs: 2 })
                .unwrap();
        let text = report.to_string();
        assert!(!text.contains("gaps/"), "the record is part of the layout:\n{text}");
        fs::remove_dir_all(&c.dir).unwrap();
    }

    #[test]
    fn a_conflict_is_never_dropped() {
        let c = cluster("conflict", "queue-max = \"1MiB\"\n");
        let c = Cluster { config: Config { async_push: false, ..c.config.clone() }, ..c };
        let file = c.segment(4, 1);
        push::push(&c.config, &file).unwrap();
        // Other content under the same name, with a backlog over the limit.
        let other = walvault_formats::wal::synthetic_segment(&c.identity, TimelineId::FIRST, SegmentNo(4), 9);
        fs::write(&file, other).unwrap();
        c.segment(5, 1);
        c.segment(6, 1);
        let e = archive(&c.config, &file, &no_launcher()).unwrap_err();
        assert!(e.message.contains("different content") && !e.unreachable, "{e:?}");
        assert!(Catalog::open(&c.config.catalog).unwrap().dropped().unwrap().is_empty());
        fs::remove_dir_all(&c.dir).unwrap();
    }
}
