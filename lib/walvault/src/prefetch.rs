//! Prefetching fetch (`prefetch = N`): a spool of decoded WAL segments in
//! `<spool-path>/fetch/`, kept ahead of recovery by a background worker.
//!
//! [`fetch()`] is what `archive-fetch %f %p` runs. For a segment it first
//! looks in the spool: a copy there is moved to `%p` (a rename on the same
//! file system, else a copy), its BLAKE3 checked against the record the
//! worker wrote when it downloaded it (the hash the object's header claims:
//! this check is the one verification of the plaintext, covering download,
//! decode and spool), and only then renamed to `%p`. Anything else (no copy, a damaged copy, a spool that cannot be
//! used) falls back to the direct path, [`crate::fetch::fetch_all`], which
//! alone may answer "missing": the spool is a cache, never an authority.
//! After a segment was restored, [`fetch()`] records it as the last file asked
//! for (the `request` file) and starts the worker if none runs.
//!
//! [`run_worker`] is the worker (`archive-fetch --prefetch-worker`), one per
//! spool (a lock on `worker.lock`). It keeps the `prefetch` segments after
//! the requested one, on the same timeline, downloaded (`jobs` at a time,
//! within `prefetch-max` bytes), checked and in the spool; removes what
//! recovery will not ask for again (segments at or before the request,
//! other timelines); and exits, emptying the spool, once nothing was asked
//! for during its idle time.
//!
//! ```text
//! <spool>/fetch/worker.lock     held by the running worker (its pid inside)
//! <spool>/fetch/worker.log      the worker's stderr
//! <spool>/fetch/owner           cluster, repositories and system id the files belong to
//! <spool>/fetch/request         the last segment archive-fetch restored
//! <spool>/fetch/<segment>       plaintext, decoded when downloaded
//! <spool>/fetch/<segment>.b3    the BLAKE3 its object claims (written before the segment appears)
//! <spool>/fetch/<segment>.part  a download in progress
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use walvault_formats::object::{ContentHash, Decoder};
use walvault_formats::wal::{SegmentName, SegmentNo, WalFileName, WalSegmentSize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetch::{self, FetchOutcome, FetchReport};
use crate::repo::Repository;

/// The flag that makes `archive-fetch` run [`run_worker`].
pub const WORKER_FLAG: &str = "--prefetch-worker";

/// How long a worker waits for a new request before it exits.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);

/// How often the worker looks at the request file while it waits (it
/// sleeps in between; completions of downloads wake it at once).
const TICK: Duration = Duration::from_millis(50);

/// How long archive-fetch waits for a segment the worker is downloading
/// right now (its `.part` exists) before fetching it itself: replay that
/// catches up with the worker waits for the download under way instead of
/// paying for a second one.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);

/// How long a starting worker waits for the lock (a worker that is exiting
/// still holds it) before it leaves the work to the one that holds it.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The worker log is emptied when a worker starts and finds it larger.
const LOG_MAX: u64 = 1 << 20;

/// Temporaries older than this are left over by a killed process.
const STALE_TEMP: Duration = Duration::from_secs(60);

/// The prefetch spool: `<spool-path>/fetch/`.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// What the spool could do for one request.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// The file is at `dest`, verified.
    Served,
    /// No usable copy: fetch directly, nothing to say.
    Absent,
    /// Not served, for the reason given: fetch directly and warn.
    Skipped(String),
}

impl Spool {
    /// The spool of `config`: `<spool-path>/fetch`.
    pub fn of(config: &Config) -> Spool {
        Spool { dir: config.spool.join("fetch") }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The worker's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("worker.log")
    }

    /// The lock file the running worker holds; it contains the worker's pid.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("worker.lock")
    }

    fn request_path(&self) -> PathBuf {
        self.dir.join("request")
    }

    fn owner_path(&self) -> PathBuf {
        self.dir.join("owner")
    }

    /// Where the verified plaintext of `seg` is kept.
    pub fn data_path(&self, seg: &SegmentName) -> PathBuf {
        self.dir.join(seg.to_string())
    }

    fn sidecar_path(&self, seg: &SegmentName) -> PathBuf {
        self.dir.join(format!("{seg}.b3"))
    }

    fn part_path(&self, seg: &SegmentName) -> PathBuf {
        self.dir.join(format!("{seg}.part"))
    }

    fn ensure_dir(&self) -> io::Result<()> {
        fs::create_dir_all(&self.dir)
    }

    /// Whether a worker holds the lock now.
    fn worker_running(&self) -> io::Result<bool> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(self.lock_path())?;
        match file.try_lock() {
            Ok(()) => Ok(false),
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Records `seg` as the last segment restored (a temporary renamed over
    /// the request file, so the worker never reads half a name).
    fn write_request(&self, seg: &SegmentName) -> io::Result<()> {
        let tmp = self.dir.join(format!("request.{}.tmp", std::process::id()));
        fs::write(&tmp, format!("{seg}\n"))?;
        fs::rename(&tmp, self.request_path()).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    fn read_request(&self) -> Option<SegmentName> {
        let text = fs::read_to_string(self.request_path()).ok()?;
        match text.trim().parse::<WalFileName>() {
            Ok(WalFileName::Segment(seg)) => Some(seg),
            _ => None,
        }
    }

    /// Hands the spool's copy of `seg` to `dest` if there is one and it is
    /// intact. The copy leaves the spool first (renamed or copied to the
    /// temporary beside `dest`), so that a damaged copy is never offered
    /// twice and the worker cannot remove it halfway; it reaches `dest`
    /// only if its BLAKE3 matches the record written when it was verified.
    fn take(&self, owner: &str, seg: &SegmentName, dest: &Path) -> Take {
        let data = self.data_path(seg);
        match fs::symlink_metadata(&data) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Take::Absent,
            Err(e) => return Take::Skipped(format!("unable to look at '{}': {e}", data.display())),
        }
        // Files another configuration (cluster, repositories) left here are
        // not this recovery's: the worker clears them when it starts.
        match fs::read_to_string(self.owner_path()) {
            Ok(text) if text.starts_with(owner) => {}
            _ => return Take::Absent,
        }
        let sidecar = self.sidecar_path(seg);
        let expected = fs::read_to_string(&sidecar).ok().and_then(|t| ContentHash::from_hex(t.trim()));
        let tmp = fetch::temp_path(dest);
        match fs::rename(&data, &tmp) {
            Ok(()) => {}
            // Removed meanwhile (a worker evicting it, another fetch).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Take::Absent,
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                if let Err(e) = fs::copy(&data, &tmp) {
                    let _ = fs::remove_file(&tmp);
                    return Take::Skipped(format!(
                        "unable to copy the prefetched '{seg}' from '{}' to '{}': {e}",
                        data.display(),
                        tmp.display()
                    ));
                }
                let _ = fs::remove_file(&data);
            }
            Err(e) => {
                return Take::Skipped(format!(
                    "unable to move the prefetched '{seg}' from '{}' to '{}': {e}",
                    data.display(),
                    tmp.display()
                ));
            }
        }
        let _ = fs::remove_file(&sidecar);
        let verdict = match expected {
            None => Err("its checksum record is missing or unreadable".to_string()),
            // Replay waits for this check: read through small buffers by
            // two threads, not into one allocation of the whole segment.
            Some(expected) => match hash_file(&tmp) {
                Ok(actual) if actual == expected => Ok(()),
                Ok(actual) => Err(format!("blake3 {actual}, expected {expected}")),
                Err(e) => Err(format!("unable to read it back: {e}")),
            },
        };
        let outcome =
            verdict.map_err(|why| format!("discarded the prefetched copy of '{seg}' ({why})")).and_then(|()| {
                fs::rename(&tmp, dest)
                    .map_err(|e| format!("unable to move the prefetched '{seg}' to '{}': {e}", dest.display()))
            });
        match outcome {
            Ok(()) => Take::Served,
            Err(why) => {
                let _ = fs::remove_file(&tmp);
                Take::Skipped(why)
            }
        }
    }
}

/// BLAKE3 of the file at `path`.
fn hash_file(path: &Path) -> io::Result<ContentHash> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    ContentHash::of_filled(len, |offset, buf| file.read_exact_at(buf, offset))
}

/// What the spool's files must belong to, as far as archive-fetch can tell
/// without asking a repository: the cluster name and the repositories, in
/// order. The worker appends the system identifier.
fn owner_prefix(config: &Config) -> String {
    let locations: Vec<&str> = config.repositories.iter().map(|r| r.location.as_str()).collect();
    format!("cluster={}\nrepositories={}\n", config.cluster, locations.join("\t"))
}

/// `archive-fetch %f %p` with prefetching: see the module documentation.
/// With `prefetch = 0`, or for anything but a segment (history files,
/// `.partial`, backup history files), exactly [`fetch::fetch_all`].
///
/// `start_worker` starts a detached worker (the binary re-executes itself
/// with [`WORKER_FLAG`], see [`spawn_detached`]); it is called after a
/// segment was restored when no worker holds the spool's lock.
///
/// Problems with the spool or the worker never change the answer: they
/// only add notes (warnings), and the file is fetched directly.
pub fn fetch(config: &Config, name: &str, dest: &Path, start_worker: &dyn Fn() -> io::Result<()>) -> FetchReport {
    if config.prefetch == 0 || dest.as_os_str().is_empty() {
        return fetch::fetch_all(config, name, dest);
    }
    let Ok(WalFileName::Segment(seg)) = name.parse::<WalFileName>() else {
        return fetch::fetch_all(config, name, dest);
    };
    let spool = Spool::of(config);
    let mut notes = Vec::new();
    let owner = owner_prefix(config);
    let mut taken = spool.take(&owner, &seg, dest);
    if matches!(taken, Take::Absent) && wait_for_download(&spool, &seg) {
        taken = spool.take(&owner, &seg, dest);
    }
    match taken {
        Take::Served => {
            if let Err(note) = nudge(&spool, &seg, start_worker) {
                notes.push(note);
            }
            return FetchReport { result: Ok(FetchOutcome::Restored), notes };
        }
        Take::Absent => {}
        Take::Skipped(note) => notes.push(format!("{note}; fetching it from the repository")),
    }
    let mut report = fetch::fetch_all(config, name, dest);
    // Only a restored segment moves the window: a standby polling for a
    // segment that is not archived yet costs the direct look-up, nothing
    // more, and starts no worker.
    if matches!(report.result, Ok(FetchOutcome::Restored))
        && let Err(note) = nudge(&spool, &seg, start_worker)
    {
        notes.push(note);
    }
    notes.append(&mut report.notes);
    report.notes = notes;
    report
}

/// Waits (inotify on the spool, at most [`IN_FLIGHT_WAIT`]) while a running
/// worker downloads `seg`; true when the segment arrived in the spool.
fn wait_for_download(spool: &Spool, seg: &SegmentName) -> bool {
    // A download writes `<seg>.part.walvault-tmp` while it decodes, renames
    // it to `<seg>.part` once verified, and the worker then places it.
    let part = spool.part_path(seg);
    let under_way = || part.exists() || fetch::temp_path(&part).exists();
    if !under_way() || !spool.worker_running().unwrap_or(false) {
        return false;
    }
    let watch = crate::spool::Watch::new(&[spool.dir()]);
    let deadline = Instant::now() + IN_FLIGHT_WAIT;
    loop {
        if spool.data_path(seg).exists() {
            return true;
        }
        let now = Instant::now();
        // The download ended without a result (failed, evicted): the
        // direct path decides.
        if now >= deadline || !under_way() {
            return spool.data_path(seg).exists();
        }
        watch.wait(None, (deadline - now).min(TICK));
    }
}

/// Records `seg` as the last restored segment and starts a worker if none
/// runs. The error is a warning line.
fn nudge(spool: &Spool, seg: &SegmentName, start_worker: &dyn Fn() -> io::Result<()>) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| {
        format!("prefetch is not running: unable to {what} in '{}': {e}", spool.dir().display())
    };
    spool.ensure_dir().map_err(|e| fail("create the spool", e))?;
    spool.write_request(seg).map_err(|e| fail("write the request file", e))?;
    if !spool.worker_running().map_err(|e| fail("check the worker lock", e))? {
        start_worker().map_err(|e| fail("start the prefetch worker", e))?;
    }
    Ok(())
}

/// Starts `program args…` detached from the caller: its own process group
/// (PostgreSQL's signals to the recovery process do not reach it), no
/// stdin/stdout, stderr appended to `log` (emptied first when larger than
/// 1 MiB), working directory `/`, niceness raised by [`WORKER_NICE`]
/// (replay comes first: the worker works ahead with the CPU replay leaves,
/// and when replay waits for a segment, it has the CPU). Does not wait
/// for it.
///
/// # Errors
/// The log cannot be opened or the program cannot be started.
pub fn spawn_detached(program: &Path, args: &[OsString], log: &Path) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let too_big = fs::metadata(log).is_ok_and(|m| m.len() > LOG_MAX);
    let log = OpenOptions::new().create(true).append(!too_big).write(true).truncate(too_big).open(log)?;
    let mut cmd = Command::new(program);
    // SAFETY: nice() is a plain system call on the forked child, which
    // touches no memory; failing to lower the priority is harmless.
    unsafe {
        cmd.pre_exec(|| {
            libc::nice(WORKER_NICE);
            Ok(())
        });
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .current_dir("/")
        .process_group(0);
    // The child is not waited for: it outlives this short-lived process,
    // which exits at once, and init reaps it.
    #[allow(clippy::zombie_processes)]
    cmd.spawn()?;
    Ok(())
}

/// How much the prefetch worker lowers its priority (`nice`).
pub const WORKER_NICE: i32 = 10;

/// Why [`Worker::run`] returned.
enum Ended {
    /// Idle for the configured time: the spool is emptied.
    Idle,
    /// The spool's lock file is no longer the one this worker locked.
    Replaced,
}

/// A file's identity (device, inode), to tell a file from a new one at
/// the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Inode(u64, u64);

impl Inode {
    fn of(file: &File) -> io::Result<Inode> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Inode(m.dev(), m.ino()))
    }
}

/// One finished download.
struct Done {
    seg: SegmentName,
    /// The verified plaintext's hash, `None` for "missing", or the error.
    result: std::result::Result<Option<ContentHash>, String>,
    /// Repositories that failed before another one answered.
    notes: Vec<String>,
}

/// The worker's state; see [`run_worker`].
struct Worker<'a> {
    spool: &'a Spool,
    log: &'a mut dyn FnMut(&str),
    size: WalSegmentSize,
    ahead: u64,
    jobs: usize,
    max_bytes: u64,
    repos: Arc<Vec<(String, Repository)>>,
    /// Decoders (and their buffers) kept between downloads: at most `jobs`.
    decoders: Arc<Mutex<Vec<Decoder>>>,
    /// The last segment restored, and the window after it.
    request: Option<SegmentName>,
    /// Placed in the spool by this worker (or adopted), with their sizes.
    ready: BTreeMap<SegmentName, u64>,
    in_flight: BTreeSet<SegmentName>,
    /// Failed since the request last moved: left to the direct path.
    failed: BTreeSet<SegmentName>,
    /// The first segment number found missing since the request last
    /// moved: nothing at or after it is asked for until it moves again.
    missing_from: Option<u64>,
}

/// Runs the prefetch worker of `config`'s spool until it has been idle
/// (no new request, nothing in flight) for `idle`; then it empties the spool
/// and returns. Returns at once when another worker holds the lock.
/// `log` receives one line per problem (downloads that failed, files that
/// could not be placed).
///
/// Killed at any moment, it leaves only temporaries (`*.part`) and
/// complete, recorded segments behind; the next worker removes the former.
///
/// # Errors
/// The spool cannot be created or locked, a repository cannot be opened,
/// or none answers with the cluster's identity. archive-fetch keeps
/// working without a worker (directly).
pub fn run_worker(config: &Config, idle: Duration, log: &mut dyn FnMut(&str)) -> Result<()> {
    let spool = Spool::of(config);
    let write_err = |path: PathBuf| move |source| Error::Write { path, source };
    spool.ensure_dir().map_err(write_err(spool.dir().to_path_buf()))?;
    let Some(lock) = lock_worker(&spool).map_err(write_err(spool.lock_path()))? else {
        return Ok(());
    };
    let lock_id = Inode::of(&lock).map_err(write_err(spool.lock_path()))?;
    let mut repos = Vec::new();
    for view in config.each() {
        repos.push((view.repo_name().to_string(), Repository::open_config(&view)?));
    }
    let mut first_error = None;
    let mut info = None;
    for (_, repo) in &repos {
        match repo.cluster_info() {
            Ok(i) => {
                info = Some(i);
                break;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let info = match (info, first_error) {
        (Some(info), _) => info,
        (None, Some(e)) => return Err(e),
        (None, None) => return Err(Error::Setting("no repository is configured".into())),
    };
    let owner = format!("{}system-id={}\n", owner_prefix(config), info.identity.system_id);
    let mut worker = Worker {
        spool: &spool,
        log,
        size: info.identity.segment_size,
        ahead: u64::from(config.prefetch),
        jobs: config.jobs.max(1) as usize,
        max_bytes: config.prefetch_max,
        repos: Arc::new(repos),
        decoders: Arc::new(Mutex::new(Vec::new())),
        request: None,
        ready: BTreeMap::new(),
        in_flight: BTreeSet::new(),
        failed: BTreeSet::new(),
        missing_from: None,
    };
    worker.adopt(&owner).map_err(write_err(spool.owner_path()))?;
    match worker.run(idle, lock_id) {
        Ended::Idle => worker.clear(),
        // What is there now belongs to a new worker: leave it alone.
        Ended::Replaced => (worker.log)(&format!(
            "the spool '{}' was removed or replaced while this worker ran; leaving it to the new worker",
            spool.dir().display()
        )),
    }
    drop(lock);
    Ok(())
}

/// Takes the worker lock, waiting up to [`LOCK_WAIT`] for a worker that is
/// exiting; `None` when another worker keeps it. Writes this process's pid
/// into the lock file.
fn lock_worker(spool: &Spool) -> io::Result<Option<File>> {
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(spool.lock_path())?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(TICK),
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(Some(file))
}

/// Whether `name` is a segment file name (the spool's data files).
fn segment_name(name: &str) -> Option<SegmentName> {
    match name.parse::<WalFileName>() {
        Ok(WalFileName::Segment(seg)) => Some(seg),
        _ => None,
    }
}

impl Worker<'_> {
    /// Takes over what the spool holds: everything, when it belongs to
    /// another cluster or repository (or to nobody), is removed; otherwise
    /// complete recorded segments are kept and temporaries left by a killed
    /// process removed.
    fn adopt(&mut self, owner: &str) -> io::Result<()> {
        let ours = fs::read_to_string(self.spool.owner_path()).is_ok_and(|t| t == owner);
        if !ours {
            self.clear();
            let tmp = self.spool.dir().join("owner.tmp");
            fs::write(&tmp, owner)?;
            fs::rename(&tmp, self.spool.owner_path())?;
        }
        let mut sidecars = BTreeSet::new();
        for entry in fs::read_dir(self.spool.dir())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(seg) = segment_name(&name) {
                if self.spool.sidecar_path(&seg).is_file() {
                    self.ready.insert(seg, entry.metadata().map_or(0, |m| m.len()));
                } else {
                    let _ = fs::remove_file(&path);
                }
            } else if let Some(seg) = name.strip_suffix(".b3").and_then(segment_name) {
                sidecars.insert(seg);
            } else if name.ends_with(".part") || name.ends_with(".walvault-tmp") || name == "owner.tmp" {
                let _ = fs::remove_file(&path);
            } else if name.ends_with(".tmp") {
                // A fetch may be writing its request right now: only old ones.
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > STALE_TEMP);
                if old {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        for seg in sidecars.difference(&self.ready.keys().copied().collect()) {
            let _ = fs::remove_file(self.spool.sidecar_path(seg));
        }
        Ok(())
    }

    /// Removes every segment and record from the spool (segments first: a
    /// fetch that finds a segment finds its record too, or finds neither).
    fn clear(&mut self) {
        let Ok(entries) = fs::read_dir(self.spool.dir()) else { return };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if segment_name(&name).is_some() {
                let _ = fs::remove_file(entry.path());
            } else if name.ends_with(".b3") || name.ends_with(".part") {
                records.push(entry.path());
            }
        }
        for path in records {
            let _ = fs::remove_file(path);
        }
        self.ready.clear();
    }

    fn run(&mut self, idle: Duration, lock_id: Inode) -> Ended {
        let (tx, rx) = mpsc::channel::<Done>();
        let mut last_activity = Instant::now();
        loop {
            // Someone removed the spool (or its lock file) and a new worker
            // may already run there: two would download everything twice.
            if File::open(self.spool.lock_path()).and_then(|f| Inode::of(&f)).ok() != Some(lock_id) {
                return Ended::Replaced;
            }
            if let Some(request) = self.spool.read_request()
                && self.request != Some(request)
            {
                self.set_request(request);
                last_activity = Instant::now();
            }
            self.schedule(&tx);
            if self.in_flight.is_empty() && last_activity.elapsed() >= idle {
                return Ended::Idle;
            }
            match rx.recv_timeout(TICK) {
                Ok(done) => {
                    self.complete(done);
                    last_activity = Instant::now();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // Impossible while `tx` lives; leave rather than spin.
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ended::Idle,
            }
        }
    }

    /// The segment numbers kept for `request`: the `ahead` after it.
    fn window(&self, request: &SegmentName) -> Option<(u64, u64)> {
        let base = request.segno(self.size)?.0;
        Some((base.checked_add(1)?, base.saturating_add(self.ahead)))
    }

    fn in_window(&self, seg: &SegmentName) -> bool {
        let Some(request) = self.request else { return false };
        let (Some((lo, hi)), Some(n)) = (self.window(&request), seg.segno(self.size)) else { return false };
        seg.timeline == request.timeline && (lo..=hi).contains(&n.0)
    }

    /// A new request: forget failures and "missing" answers (they may have
    /// changed), and remove what recovery will not ask for again.
    fn set_request(&mut self, request: SegmentName) {
        self.request = Some(request);
        self.failed.clear();
        self.missing_from = None;
        let gone: Vec<SegmentName> = self.ready.keys().filter(|s| !self.in_window(s)).copied().collect();
        for seg in gone {
            self.ready.remove(&seg);
            let _ = fs::remove_file(self.spool.data_path(&seg));
            let _ = fs::remove_file(self.spool.sidecar_path(&seg));
        }
    }

    /// Starts downloads, in order, for the window's segments that are not
    /// there yet, within `jobs` and `prefetch-max`.
    fn schedule(&mut self, tx: &mpsc::Sender<Done>) {
        let Some(request) = self.request else { return };
        let Some((lo, hi)) = self.window(&request) else { return };
        let seg_bytes = self.size.bytes();
        for n in lo..=hi {
            if self.missing_from.is_some_and(|m| n >= m) || self.in_flight.len() >= self.jobs {
                return;
            }
            let seg = SegmentName::from_segno(request.timeline, SegmentNo(n), self.size);
            if self.ready.contains_key(&seg) || self.in_flight.contains(&seg) || self.failed.contains(&seg) {
                continue;
            }
            let reserved: u64 = self.ready.values().sum::<u64>() + (self.in_flight.len() as u64 + 1) * seg_bytes;
            if reserved > self.max_bytes {
                return;
            }
            let repos = Arc::clone(&self.repos);
            let decoders = Arc::clone(&self.decoders);
            let part = self.spool.part_path(&seg);
            let tx = tx.clone();
            let spawned = std::thread::Builder::new().name(format!("prefetch {seg}")).spawn(move || {
                let pooled = decoders.lock().ok().and_then(|mut pool| pool.pop());
                let (result, notes) = match pooled.map_or_else(Decoder::new, Ok) {
                    Ok(mut decoder) => {
                        let fetched = fetch::fetch_from(&repos, &WalFileName::Segment(seg), &part, &mut decoder);
                        if let Ok(mut pool) = decoders.lock() {
                            pool.push(decoder);
                        }
                        fetched
                    }
                    Err(e) => (Err(Error::Setting(format!("unable to start a zstd decoder: {e}"))), Vec::new()),
                };
                let _ = tx.send(Done { seg, result: result.map_err(|e| e.to_string()), notes });
            });
            match spawned {
                Ok(_) => {
                    self.in_flight.insert(seg);
                }
                Err(e) => {
                    (self.log)(&format!("unable to start a download thread for '{seg}': {e}"));
                    self.failed.insert(seg);
                    return;
                }
            }
        }
    }

    fn complete(&mut self, done: Done) {
        let Done { seg, result, notes } = done;
        self.in_flight.remove(&seg);
        for note in notes {
            (self.log)(&note);
        }
        let part = self.spool.part_path(&seg);
        match result {
            Ok(Some(hash)) if self.in_window(&seg) => match self.place(&seg, &hash) {
                Ok(len) => {
                    self.ready.insert(seg, len);
                }
                Err(e) => {
                    (self.log)(&format!("unable to place '{seg}' in '{}': {e}", self.spool.dir().display()));
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(self.spool.sidecar_path(&seg));
                    self.failed.insert(seg);
                }
            },
            Ok(Some(_)) => {
                let _ = fs::remove_file(&part);
            }
            Ok(None) => {
                if let (Some(request), Some(n)) = (self.request, seg.segno(self.size))
                    && request.timeline == seg.timeline
                {
                    self.missing_from = Some(self.missing_from.map_or(n.0, |m| m.min(n.0)));
                }
            }
            Err(e) => {
                // Not "missing": archive-fetch will meet the same problem on
                // the direct path and report it to PostgreSQL.
                (self.log)(&format!("unable to prefetch '{seg}': {e}"));
                self.failed.insert(seg);
            }
        }
    }

    /// Records the hash, then makes the segment appear under its name.
    fn place(&self, seg: &SegmentName, hash: &ContentHash) -> io::Result<u64> {
        let sidecar = self.spool.sidecar_path(seg);
        let tmp = self.spool.dir().join(format!("{seg}.b3.part"));
        fs::write(&tmp, format!("{hash}\n"))?;
        fs::rename(&tmp, &sidecar)?;
        let data = self.spool.data_path(seg);
        fs::rename(self.spool.part_path(seg), &data)?;
        Ok(fs::metadata(&data)?.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use walvault_formats::object::{EncodeOptions, encode};
    use walvault_formats::wal::{ClusterIdentity, TimelineId, synthetic_segment};

    use super::*;
    use crate::testing::temp_repo;

    const MIB: u64 = 1 << 20;

    struct Fixture {
        dir: PathBuf,
        config: Config,
        identity: ClusterIdentity,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(tag: &str, prefetch: u32, prefetch_max: u64) -> Fixture {
        let (dir, mut config, identity) = temp_repo(&format!("prefetch-{tag}"), 77, WalSegmentSize::new(MIB).unwrap());
        config.prefetch = prefetch;
        config.prefetch_max = prefetch_max;
        config.jobs = 2;
        config.spool = dir.join("spool");
        fs::create_dir_all(dir.join("pg_wal")).unwrap();
        Fixture { dir, config, identity }
    }

    fn seg(tli: u32, n: u64) -> SegmentName {
        SegmentName::from_segno(TimelineId::new(tli).unwrap(), SegmentNo(n), WalSegmentSize::new(MIB).unwrap())
    }

    /// Archives segment `n` of timeline `tli`; returns its plaintext.
    fn archive(f: &Fixture, tli: u32, n: u64) -> Vec<u8> {
        let plain = synthetic_segment(&f.identity, TimelineId::new(tli).unwrap(), SegmentNo(n), n as u8);
        let (_, bytes) = encode(&plain, &EncodeOptions::default()).unwrap();
        let repo = Repository::open_config(&f.config).unwrap();
        repo.storage().put_new(&repo.wal_key(&WalFileName::Segment(seg(tli, n))), &bytes).unwrap();
        plain
    }

    /// Runs a worker to completion with a short idle time; returns its log.
    fn run_once(f: &Fixture) -> Vec<String> {
        let mut lines = Vec::new();
        let mut log = |l: &str| lines.push(l.to_string());
        run_worker(&f.config, Duration::from_millis(300), &mut log).unwrap();
        lines
    }

    /// Runs the worker until the spool holds `want`, then returns (the
    /// worker is left running on its thread; it exits when idle).
    fn prefill(f: &Fixture, request: SegmentName, want: &[SegmentName]) -> std::thread::JoinHandle<()> {
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        spool.write_request(&request).unwrap();
        let config = f.config.clone();
        let handle = std::thread::spawn(move || {
            run_worker(&config, Duration::from_millis(1500), &mut |l: &str| eprintln!("worker: {l}")).unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !want.iter().all(|s| spool.data_path(s).is_file()) {
            assert!(Instant::now() < deadline, "the worker did not prefetch {want:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        handle
    }

    fn no_worker() -> io::Result<()> {
        Ok(())
    }

    #[test]
    fn serves_prefetched_segments_byte_identical_and_consumes_them() {
        let f = fixture("serve", 3, 64 * MIB);
        let plains: Vec<Vec<u8>> = (1..=6).map(|n| archive(&f, 1, n)).collect();
        let worker = prefill(&f, seg(1, 1), &[seg(1, 2), seg(1, 3), seg(1, 4)]);
        let spool = Spool::of(&f.config);
        assert!(!spool.data_path(&seg(1, 5)).exists(), "only `prefetch` segments ahead");
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let started = Mutex::new(0);
        let start = || {
            *started.lock().unwrap() += 1;
            Ok(())
        };
        let report = fetch(&f.config, &seg(1, 2).to_string(), &dest, &start);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
        assert_eq!(fs::read(&dest).unwrap(), plains[1]);
        assert!(!spool.data_path(&seg(1, 2)).exists(), "a served copy leaves the spool");
        assert_eq!(*started.lock().unwrap(), 0, "a worker runs: no second one is started");
        assert_eq!(spool.read_request(), Some(seg(1, 2)));
        worker.join().unwrap();
        // Idle, the worker emptied the spool on its way out.
        assert!(!spool.data_path(&seg(1, 3)).exists());
        // Now no worker runs: the next restore starts one.
        let report = fetch(&f.config, &seg(1, 3).to_string(), &dest, &start);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored);
        assert_eq!(fs::read(&dest).unwrap(), plains[2]);
        assert_eq!(*started.lock().unwrap(), 1);
    }

    /// Replay that catches up with the worker waits for the download under
    /// way instead of downloading the segment a second time: here the
    /// repository does not even have it, so only the worker's copy can
    /// answer.
    #[test]
    fn a_download_under_way_is_waited_for() {
        let f = fixture("inflight", 3, 64 * MIB);
        let plain = synthetic_segment(&f.identity, TimelineId::FIRST, SegmentNo(2), 2);
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        fs::write(spool.owner_path(), format!("{}system-id=77\n", owner_prefix(&f.config))).unwrap();
        // A worker holds the spool and is decoding segment 2.
        let lock = lock_worker(&spool).unwrap().unwrap();
        let part = spool.part_path(&seg(1, 2));
        fs::write(fetch::temp_path(&part), b"partial").unwrap();
        let finisher = {
            let (spool, plain, part) = (Spool::of(&f.config), plain.clone(), part.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                fs::write(&part, &plain).unwrap();
                let _ = fs::remove_file(fetch::temp_path(&part));
                fs::write(spool.sidecar_path(&seg(1, 2)), format!("{}\n", ContentHash::of(&plain))).unwrap();
                fs::rename(&part, spool.data_path(&seg(1, 2))).unwrap();
            })
        };
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let report = fetch(&f.config, &seg(1, 2).to_string(), &dest, &no_worker);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored, "{:?}", report.notes);
        assert_eq!(fs::read(&dest).unwrap(), plain);
        finisher.join().unwrap();
        drop(lock);
        // No download under way, no worker: the direct path answers.
        let report = fetch(&f.config, &seg(1, 3).to_string(), &dest, &no_worker);
        assert_eq!(report.result.unwrap(), FetchOutcome::Missing);
    }

    #[test]
    fn a_corrupt_or_unrecorded_spool_copy_is_never_handed_over() {
        let f = fixture("corrupt", 3, 64 * MIB);
        let plains: Vec<Vec<u8>> = (1..=5).map(|n| archive(&f, 1, n)).collect();
        prefill(&f, seg(1, 1), &[seg(1, 2), seg(1, 3), seg(1, 4)]).join().unwrap_or(());
        // The worker emptied the spool when it left; put copies back as it
        // would have left them if killed, then damage them.
        let spool = Spool::of(&f.config);
        for n in 2..=4u64 {
            fs::write(spool.data_path(&seg(1, n)), &plains[n as usize - 1]).unwrap();
            fs::write(spool.sidecar_path(&seg(1, n)), format!("{}\n", ContentHash::of(&plains[n as usize - 1])))
                .unwrap();
        }
        let mut damaged = plains[1].clone();
        damaged[1000] ^= 0x40;
        fs::write(spool.data_path(&seg(1, 2)), &damaged).unwrap();
        let truncated = &plains[2][..plains[2].len() / 2];
        fs::write(spool.data_path(&seg(1, 3)), truncated).unwrap();
        fs::remove_file(spool.sidecar_path(&seg(1, 4))).unwrap();
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        for n in 2..=4u64 {
            let report = fetch(&f.config, &seg(1, n).to_string(), &dest, &no_worker);
            assert_eq!(report.result.unwrap(), FetchOutcome::Restored, "segment {n}");
            assert_eq!(fs::read(&dest).unwrap(), plains[n as usize - 1], "segment {n} is the archived one");
            assert!(
                report.notes.iter().any(|n| n.contains("discarded the prefetched copy")),
                "segment {n}: {:?}",
                report.notes
            );
            assert!(!spool.data_path(&seg(1, n)).exists(), "the damaged copy is gone");
        }
        assert!(!f.dir.join("pg_wal/RECOVERYXLOG.walvault-tmp").exists());
    }

    #[test]
    fn missing_is_never_cached_and_polling_starts_no_worker() {
        let f = fixture("missing", 4, 64 * MIB);
        archive(&f, 1, 1);
        archive(&f, 1, 2);
        // The worker is told segment 1 was restored: 2 is there, 3 is not
        // archived yet, so it stops looking at 3.
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        spool.write_request(&seg(1, 1)).unwrap();
        let lines = run_once(&f);
        assert!(lines.is_empty(), "{lines:?}");
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let started = Mutex::new(0);
        let start = || {
            *started.lock().unwrap() += 1;
            Ok(())
        };
        for _ in 0..3 {
            let report = fetch(&f.config, &seg(1, 3).to_string(), &dest, &start);
            assert_eq!(report.result.unwrap(), FetchOutcome::Missing);
            assert!(!dest.exists());
        }
        assert_eq!(*started.lock().unwrap(), 0, "a poll for a missing segment starts nothing");
        let plain = archive(&f, 1, 3);
        let report = fetch(&f.config, &seg(1, 3).to_string(), &dest, &start);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored);
        assert_eq!(fs::read(&dest).unwrap(), plain);
        assert_eq!(*started.lock().unwrap(), 1);
    }

    #[test]
    fn an_object_whose_plaintext_is_not_what_its_header_claims_is_never_handed_over() {
        // The worker leaves the plaintext's hash to the handover: an object
        // with a valid header and payload that claims another file's hash
        // reaches the spool, and must stop there.
        let f = fixture("claims", 2, 64 * MIB);
        archive(&f, 1, 1);
        let plain2 = archive(&f, 1, 2);
        let repo = Repository::open_config(&f.config).unwrap();
        let object = f.dir.join("repo").join(repo.wal_key(&WalFileName::Segment(seg(1, 2))));
        let mut claimed = ContentHash::of(&plain2);
        claimed.0[5] ^= 0x10;
        let (_, lying) = walvault_formats::object::encode_hashed(&plain2, claimed, &EncodeOptions::default()).unwrap();
        fs::write(&object, &lying).unwrap();
        let worker = prefill(&f, seg(1, 1), &[seg(1, 2)]);
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let report = fetch(&f.config, &seg(1, 2).to_string(), &dest, &no_worker);
        assert!(
            report.notes.iter().any(|n| n.contains("discarded the prefetched copy") && n.contains("expected")),
            "{:?}",
            report.notes
        );
        assert!(matches!(report.result, Err(Error::Corrupt { .. })), "{:?}", report.result);
        assert!(!dest.exists(), "nothing at %p");
        worker.join().unwrap();
    }

    #[test]
    fn a_broken_repository_is_an_error_not_missing() {
        let f = fixture("broken", 2, 64 * MIB);
        archive(&f, 1, 1);
        let plain2 = archive(&f, 1, 2);
        let repo = Repository::open_config(&f.config).unwrap();
        let key = repo.wal_key(&WalFileName::Segment(seg(1, 2)));
        let object = f.dir.join("repo").join(&key);
        let mut bytes = fs::read(&object).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&object, &bytes).unwrap();
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        spool.write_request(&seg(1, 1)).unwrap();
        let lines = run_once(&f);
        assert!(lines.iter().any(|l| l.contains("unable to prefetch") && l.contains("corrupt")), "{lines:?}");
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let report = fetch(&f.config, &seg(1, 2).to_string(), &dest, &no_worker);
        assert!(matches!(report.result, Err(Error::Corrupt { .. })), "{:?}", report.result);
        assert!(!dest.exists());
        assert_ne!(plain2.len(), 0);
    }

    #[test]
    fn the_window_follows_the_timeline_and_the_byte_limit() {
        let f = fixture("window", 8, 3 * MIB);
        for n in 1..=10 {
            archive(&f, 1, n);
        }
        for n in 5..=10 {
            archive(&f, 2, n);
        }
        let spool = Spool::of(&f.config);
        let worker = prefill(&f, seg(1, 4), &[seg(1, 5), seg(1, 6), seg(1, 7)]);
        // prefetch-max is 3 segments: no fourth.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!spool.data_path(&seg(1, 8)).exists(), "the byte limit holds");
        // Recovery switches to timeline 2 at segment 5: the timeline-1 copies
        // are never served for it, and they leave the spool.
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let report = fetch(&f.config, &seg(2, 5).to_string(), &dest, &no_worker);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored);
        let tl2 = fs::read(&dest).unwrap();
        assert_eq!(tl2, synthetic_segment(&f.identity, TimelineId::new(2).unwrap(), SegmentNo(5), 5));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !spool.data_path(&seg(2, 6)).is_file() || spool.data_path(&seg(1, 6)).exists() {
            assert!(Instant::now() < deadline, "the window did not move to timeline 2");
            std::thread::sleep(Duration::from_millis(20));
        }
        worker.join().unwrap();
    }

    #[test]
    fn files_of_another_configuration_are_not_served() {
        let f = fixture("owner", 2, 64 * MIB);
        let plain = archive(&f, 1, 2);
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        let other = b"from another cluster".to_vec();
        fs::write(spool.data_path(&seg(1, 2)), &other).unwrap();
        fs::write(spool.sidecar_path(&seg(1, 2)), format!("{}\n", ContentHash::of(&other))).unwrap();
        fs::write(spool.owner_path(), "cluster=other\nrepositories=/elsewhere\nsystem-id=1\n").unwrap();
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let report = fetch(&f.config, &seg(1, 2).to_string(), &dest, &no_worker);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored);
        assert_eq!(fs::read(&dest).unwrap(), plain);
        // A worker clears them.
        run_once(&f);
        assert!(!spool.data_path(&seg(1, 2)).exists());
    }

    #[test]
    fn a_worker_whose_spool_was_replaced_leaves_without_touching_the_new_one() {
        let f = fixture("replaced", 2, 64 * MIB);
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        let config = f.config.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            let result = run_worker(&config, Duration::from_secs(60), &mut |l: &str| lines.push(l.to_string()));
            let _ = tx.send((result.is_ok(), lines));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !spool.worker_running().unwrap() {
            assert!(Instant::now() < deadline, "the worker did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Removed and made again (as a restore or an operator would), with
        // a new worker's file in it.
        fs::remove_dir_all(spool.dir()).unwrap();
        spool.ensure_dir().unwrap();
        let theirs = spool.dir().join("owner");
        fs::write(&theirs, "a new worker's\n").unwrap();
        let (ok, lines) = rx.recv_timeout(Duration::from_secs(5)).expect("the old worker left within 5 s, not 60");
        assert!(ok);
        assert!(lines.iter().any(|l| l.contains("was removed or replaced")), "{lines:?}");
        assert_eq!(fs::read_to_string(&theirs).unwrap(), "a new worker's\n", "the new spool is left alone");
    }

    #[test]
    fn a_second_worker_leaves_at_once_and_prefetch_zero_is_the_direct_path() {
        let f = fixture("lock", 2, 64 * MIB);
        let spool = Spool::of(&f.config);
        spool.ensure_dir().unwrap();
        let held = lock_worker(&spool).unwrap().unwrap();
        assert!(spool.worker_running().unwrap());
        let t = Instant::now();
        assert!(run_once(&f).is_empty());
        assert!(t.elapsed() < Duration::from_secs(10));
        drop(held);
        assert!(!spool.worker_running().unwrap());

        let mut config = f.config.clone();
        config.prefetch = 0;
        let plain = archive(&f, 1, 1);
        let dest = f.dir.join("pg_wal/RECOVERYXLOG");
        let panics = || -> io::Result<()> { panic!("prefetch = 0 starts no worker") };
        let report = fetch(&config, &seg(1, 1).to_string(), &dest, &panics);
        assert_eq!(report.result.unwrap(), FetchOutcome::Restored);
        assert_eq!(fs::read(&dest).unwrap(), plain);
        assert!(!spool.request_path().exists());
    }
}
