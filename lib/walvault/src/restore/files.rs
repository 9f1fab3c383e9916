//! Writing a backup's directories, links and files into place: in
//! parallel, every byte verified, each file fsynced; `--delta` keeps what
//! already matches and removes what the backup does not have.
//!
//! Work is cut into tasks: a bundle (fetched once for all the small files
//! it holds), a run of chunks of a large file (written with positioned
//! writes, so that one large file is written by several threads), or a
//! batch of empty files. `jobs` threads take tasks from a shared counter,
//! largest first. The first error stops every thread and is returned, naming
//! the file being restored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use walvault_formats::manifest::{ChunkRef, Entry, EntryKind, FileData, Hash, Manifest};
use walvault_formats::object::ContentHash;

use super::RestoreError;
use super::layout::{HELD_BACK, Layout, MARKER, Place, SKIPPED};
use crate::error::Error;
use crate::repo::Repository;
use crate::storage::StorageError;

/// Large files are cut into parts of about this many bytes, so that one
/// large file keeps several threads busy.
#[cfg(not(test))]
const PART_BYTES: u64 = 32 << 20;
/// Small in tests, so that a test file has several parts.
#[cfg(test)]
const PART_BYTES: u64 = 2 << 20;

/// Empty files created per task.
const EMPTY_BATCH: usize = 256;

/// Threads that fsync finished files. fsync mostly waits for the disk, and
/// file systems commit concurrent fsyncs together, so writers hand their
/// finished files to these instead of waiting themselves: restoring many
/// small files is bound by fsync latency otherwise.
const SYNC_THREADS: usize = 8;

/// Finished files waiting for fsync, at most (each holds a descriptor).
const SYNC_QUEUE: usize = 128;

/// A finished file, still open, and its job.
type SyncQueue = std::sync::mpsc::SyncSender<(File, usize)>;

/// How to write.
#[derive(Debug, Clone, Copy)]
pub struct FilesOptions {
    /// Update a non-empty directory, keeping what matches.
    pub delta: bool,
    /// Threads.
    pub jobs: usize,
}

/// What was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilesOutcome {
    /// Files written (wholly or in part).
    pub files_written: u64,
    /// Files whose content already matched (`--delta`).
    pub files_kept: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Files, links and directories removed because the backup does not
    /// have them (`--delta`).
    pub paths_removed: u64,
}

/// What a manifest path should be on disk.
#[derive(Debug, Clone, Copy)]
enum Want<'a> {
    Dir(u32),
    File(usize),
    Link(&'a str),
}

/// An existing file's metadata (`--delta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Existing {
    len: u64,
    mode: u32,
    mtime_ms: i64,
}

/// One file to restore.
struct Job<'a> {
    /// Its position in the list of jobs.
    index: usize,
    entry: &'a Entry,
    path: PathBuf,
    existing: Option<Existing>,
    /// Parts of a chunked file not finished yet; the last one finalizes.
    parts_left: AtomicUsize,
    /// Whether any byte was written.
    wrote: AtomicBool,
}

enum Task {
    Part { job: usize, first: usize, end: usize, offset: u64, bytes: u64 },
    Bundle { bundle: Hash, jobs: Vec<usize>, bytes: u64 },
    Empty { jobs: Vec<usize> },
}

impl Task {
    fn bytes(&self) -> u64 {
        match self {
            Task::Part { bytes, .. } | Task::Bundle { bytes, .. } => *bytes,
            Task::Empty { .. } => 0,
        }
    }
}

fn local<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> RestoreError + 'p {
    move |source| RestoreError::Local { op, path: path.to_path_buf(), source }
}

fn mtime(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d }
}

fn mtime_ms(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Reads data object `hash` for `file`; a failure names both.
fn fetch(repo: &Repository, hash: &Hash, file: &str) -> Result<Vec<u8>, RestoreError> {
    repo.get_data(hash).map_err(|e| {
        let detail = match &e {
            Error::Corrupt { source, .. } => format!("is corrupt: {source}"),
            Error::Storage { source: StorageError::NotFound { .. }, .. } => "is missing".to_string(),
            Error::Storage { source, .. } => format!("cannot be read: {source}"),
            other => other.to_string(),
        };
        RestoreError::Data { file: file.to_string(), key: repo.data_key(hash), repo: repo.location(), detail }
    })
}

fn fsync_dir(path: &Path) -> Result<(), RestoreError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(local("fsync", path))
}

/// Creates a directory (mode 0700 until its own mode is set at the end),
/// accepting one that exists.
fn make_dir(path: &Path) -> Result<(), RestoreError> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(local("create directory", path)(e)),
    }
}

fn remove_path(path: &Path, is_dir: bool) -> Result<(), RestoreError> {
    let r = if is_dir { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(local("remove", path)(e)),
        _ => Ok(()),
    }
}

/// The mode of the data directory itself: PostgreSQL accepts 0700, or 0750
/// for a cluster with group access, which its other directories show.
fn pgdata_mode(m: &Manifest) -> u32 {
    let group = m.entries.iter().find(|e| e.path == "global").is_some_and(|e| e.mode & 0o050 == 0o050);
    if group { 0o750 } else { 0o700 }
}

struct Writer<'a> {
    repo: &'a Repository,
    jobs: Vec<Job<'a>>,
    held: Option<usize>,
    held_bytes: Mutex<Option<Vec<u8>>>,
    stop: AtomicBool,
    error: Mutex<Option<RestoreError>>,
    written: AtomicU64,
    kept: AtomicU64,
    bytes: AtomicU64,
}

impl Writer<'_> {
    fn fail(&self, e: RestoreError) {
        if let Ok(mut slot) = self.error.lock()
            && slot.is_none()
        {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    fn run(&self, task: &Task, q: Option<&SyncQueue>) -> Result<(), RestoreError> {
        match task {
            Task::Part { job, first, end, offset, .. } => {
                let chunks = match &self.jobs[*job].entry.kind {
                    EntryKind::File { data: FileData::Chunks { chunks } } => chunks.get(*first..*end).unwrap_or(&[]),
                    _ => &[],
                };
                self.part(&self.jobs[*job], chunks, *offset, q)
            }
            Task::Bundle { bundle, jobs, .. } => self.bundle(bundle, jobs, q),
            Task::Empty { jobs } => {
                for &j in jobs {
                    let job = &self.jobs[j];
                    if job.existing.is_some_and(|e| e.len == 0) {
                        self.finish(job, false, None, q)?;
                    } else {
                        self.write_whole(job, &[], q)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes the chunks of one part of a large file at their offsets,
    /// skipping (with `--delta`) those whose bytes are already there.
    fn part(&self, job: &Job<'_>, chunks: &[ChunkRef], offset: u64, q: Option<&SyncQueue>) -> Result<(), RestoreError> {
        let mut reader: Option<File> = None;
        let mut writer: Option<File> = None;
        let mut buf = Vec::new();
        let mut off = offset;
        for c in chunks {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let end = off + c.len;
            let same = match job.existing {
                Some(ex) if end <= ex.len => {
                    let r = match &mut reader {
                        Some(r) => r,
                        None => reader.insert(File::open(&job.path).map_err(local("read", &job.path))?),
                    };
                    buf.resize(usize::try_from(c.len).unwrap_or(usize::MAX), 0);
                    r.read_exact_at(&mut buf, off).map_err(local("read", &job.path))?;
                    ContentHash::of(&buf) == ContentHash::from(c.hash)
                }
                _ => false,
            };
            if !same {
                let data = fetch(self.repo, &c.hash, &job.entry.path)?;
                if data.len() as u64 != c.len {
                    return Err(RestoreError::Manifest {
                        file: job.entry.path.clone(),
                        detail: format!(
                            "the manifest lists data object '{}' as {} bytes, it holds {}",
                            self.repo.data_key(&c.hash),
                            c.len,
                            data.len()
                        ),
                    });
                }
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(self.open_for_write(job)?),
                };
                w.write_all_at(&data, off).map_err(local("write", &job.path))?;
                job.wrote.store(true, Ordering::Relaxed);
                self.bytes.fetch_add(c.len, Ordering::Relaxed);
            }
            off = end;
        }
        // The last part to finish sees every other part's writes (AcqRel).
        if job.parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(job, job.wrote.load(Ordering::Relaxed), writer, q)?;
        }
        Ok(())
    }

    /// Opens a chunked file for positioned writes, sized to its final length
    /// (concurrent parts may all do this: the length is the same).
    fn open_for_write(&self, job: &Job<'_>) -> Result<File, RestoreError> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&job.path)
            .map_err(local("create", &job.path))?;
        if job.existing.map(|e| e.len) != Some(job.entry.size) {
            f.set_len(job.entry.size).map_err(local("write", &job.path))?;
        }
        Ok(f)
    }

    /// Sets length (if not yet right), mode and time, and fsyncs: the end of
    /// every file, written or kept. `open` is the descriptor the last bytes
    /// were written through, if any: it stays open until the fsync, so that
    /// a writeback error is reported to it.
    fn finish(
        &self,
        job: &Job<'_>,
        wrote: bool,
        open: Option<File>,
        q: Option<&SyncQueue>,
    ) -> Result<(), RestoreError> {
        let e = job.entry;
        let size_ok = job.existing.is_some_and(|x| x.len == e.size);
        let f = if let Some(f) = open.filter(|_| size_ok || wrote) {
            f
        } else if size_ok || wrote {
            File::open(&job.path).map_err(local("open", &job.path))?
        } else {
            // Nothing written, but the length differs (a file that shrank):
            // open for writing to set it.
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&job.path)
                .map_err(local("create", &job.path))?;
            f.set_len(e.size).map_err(local("write", &job.path))?;
            f
        };
        let changed = wrote || !size_ok;
        let mode = e.mode & 0o7777;
        if changed || job.existing.is_some_and(|x| x.mode & 0o7777 != mode) {
            f.set_permissions(Permissions::from_mode(mode)).map_err(local("set the mode of", &job.path))?;
        }
        if changed || job.existing.is_some_and(|x| x.mtime_ms != e.mtime_ms) {
            f.set_modified(mtime(e.mtime_ms)).map_err(local("set the time of", &job.path))?;
        }
        match q {
            Some(q) => {
                if q.send((f, job.index)).is_err() {
                    // The sync threads stopped: another error is on its way.
                    self.stop.store(true, Ordering::Relaxed);
                }
            }
            None => f.sync_all().map_err(local("fsync", &job.path))?,
        }
        if changed {
            self.written.fetch_add(1, Ordering::Relaxed);
        } else {
            self.kept.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes a whole (small) file from memory.
    fn write_whole(&self, job: &Job<'_>, bytes: &[u8], q: Option<&SyncQueue>) -> Result<(), RestoreError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&job.path)
            .map_err(local("create", &job.path))?;
        f.write_all(bytes).map_err(local("write", &job.path))?;
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.finish(job, true, Some(f), q)
    }

    /// Restores the files packed in one bundle, fetching it once, and only
    /// if one of them is not already in place (`--delta`).
    fn bundle(&self, bundle: &Hash, members: &[usize], q: Option<&SyncQueue>) -> Result<(), RestoreError> {
        let mut pending = Vec::with_capacity(members.len());
        for &j in members {
            let job = &self.jobs[j];
            if let (Some(ex), EntryKind::File { data: FileData::Bundled { hash, .. } }) =
                (job.existing, &job.entry.kind)
                && ex.len == job.entry.size
                && Some(j) != self.held
            {
                let current = std::fs::read(&job.path).map_err(local("read", &job.path))?;
                if ContentHash::of(&current) == ContentHash::from(*hash) {
                    self.finish(job, false, None, q)?;
                    continue;
                }
            }
            pending.push(j);
        }
        let Some(&first) = pending.first() else { return Ok(()) };
        let data = fetch(self.repo, bundle, &self.jobs[first].entry.path)?;
        for j in pending {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let job = &self.jobs[j];
            let EntryKind::File { data: FileData::Bundled { offset, len, hash, .. } } = &job.entry.kind else {
                continue;
            };
            let range =
                usize::try_from(*offset).ok().and_then(|o| Some(o..o.checked_add(usize::try_from(*len).ok()?)?));
            let Some(bytes) = range.and_then(|r| data.get(r)) else {
                return Err(RestoreError::Manifest {
                    file: job.entry.path.clone(),
                    detail: format!(
                        "the manifest places it at bytes {offset}..{} of data object '{}', which has only {} bytes",
                        offset.saturating_add(*len),
                        self.repo.data_key(bundle),
                        data.len()
                    ),
                });
            };
            let actual = ContentHash::of(bytes);
            if actual != ContentHash::from(*hash) {
                return Err(RestoreError::Data {
                    file: job.entry.path.clone(),
                    key: self.repo.data_key(bundle),
                    repo: self.repo.location(),
                    detail: format!("holds other bytes for it: blake3 {actual}, the manifest says {hash}"),
                });
            }
            if Some(j) == self.held {
                if let Ok(mut slot) = self.held_bytes.lock() {
                    *slot = Some(bytes.to_vec());
                }
                continue;
            }
            self.write_whole(job, bytes, q)?;
        }
        Ok(())
    }
}

/// Removes, under `dir` (manifest path `prefix`), everything the backup
/// does not have or has as another kind, and records the files that may be
/// kept. Directories of the backup are walked; links are never followed,
/// except an existing `pg_wal` link to a directory (WAL on its own disk),
/// which is kept and emptied of what the backup does not have.
fn sweep(
    dir: &Path,
    prefix: &str,
    wants: &HashMap<&str, Want<'_>>,
    layout: &Layout,
    existing: &mut HashMap<usize, Existing>,
    removed: &mut u64,
) -> Result<(), RestoreError> {
    let listing = std::fs::read_dir(dir).map_err(local("list", dir))?;
    for item in listing {
        let item = item.map_err(local("list", dir))?;
        let path = item.path();
        let ft = item.file_type().map_err(local("read", &path))?;
        let Some(name) = item.file_name().to_str().map(str::to_string) else {
            remove_path(&path, ft.is_dir())?;
            *removed += 1;
            continue;
        };
        if prefix.is_empty() && name == MARKER {
            continue;
        }
        if prefix.is_empty() && SKIPPED.contains(&name.as_str()) {
            // Written anew by the restore, or never restored: not counted.
            remove_path(&path, ft.is_dir())?;
            continue;
        }
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let keep = match layout.place(&rel) {
            Some(Place::TablespaceLink(oid)) => {
                ft.is_symlink()
                    && std::fs::read_link(&path).ok().as_deref() == layout.tablespaces.get(&oid).map(PathBuf::as_path)
            }
            Some(Place::Disk(_)) => match wants.get(rel.as_str()) {
                Some(Want::Dir(_)) if ft.is_dir() => {
                    sweep(&path, &rel, wants, layout, existing, removed)?;
                    true
                }
                Some(Want::Dir(_)) if rel == "pg_wal" && ft.is_symlink() && path.is_dir() => {
                    sweep(&path, &rel, wants, layout, existing, removed)?;
                    true
                }
                Some(Want::File(j)) if ft.is_file() => {
                    let meta = item.metadata().map_err(local("read", &path))?;
                    existing.insert(
                        *j,
                        Existing { len: meta.len(), mode: meta.permissions().mode(), mtime_ms: mtime_ms(&meta) },
                    );
                    true
                }
                Some(Want::Link(target)) => {
                    ft.is_symlink() && std::fs::read_link(&path).is_ok_and(|t| t.as_os_str() == *target)
                }
                _ => false,
            },
            None => false,
        };
        if !keep {
            remove_path(&path, ft.is_dir())?;
            *removed += 1;
        }
    }
    Ok(())
}

/// Restores every directory, link and file of `m` under `layout`: the data
/// directory is created if missing, tablespace locations are created and
/// linked from `pg_tblspc`, `pg_wal/archive_status` exists at the end, and
/// `global/pg_control` is written last. With `delta`, `pg_control` and any
/// signal file are removed first, files whose content matches are kept,
/// differing chunks rewritten, and everything else removed.
///
/// A marker file ([`MARKER`]) stays in the data directory until the caller
/// removes it with [`mark_complete`]: a failed restore leaves a directory that
/// PostgreSQL refuses to start (no `pg_control`, no signal file) and that a
/// later `--delta` recognizes.
///
/// # Errors
/// The first failure: a data object that is missing or corrupt (naming the
/// file being restored and the object), a manifest that does not add up, a
/// local write that fails.
pub fn restore_files(
    repo: &Repository,
    m: &Manifest,
    layout: &Layout,
    opts: FilesOptions,
) -> Result<FilesOutcome, RestoreError> {
    let pgdata = &layout.pgdata;
    let mut outcome = FilesOutcome::default();
    if !pgdata.is_dir() {
        if let Some(parent) = pgdata.parent() {
            std::fs::create_dir_all(parent).map_err(local("create directory", parent))?;
        }
        make_dir(pgdata)?;
    }
    std::fs::set_permissions(pgdata, Permissions::from_mode(pgdata_mode(m)))
        .map_err(local("set the mode of", pgdata))?;
    let marker = pgdata.join(MARKER);
    std::fs::write(
        &marker,
        format!("walvault is restoring backup '{}' here; until it finishes this directory cannot be started\n", m.id),
    )
    .map_err(local("write", &marker))?;

    // What each path should be.
    let entries: Vec<&Entry> = m.entries.iter().filter(|e| !SKIPPED.contains(&e.path.as_str())).collect();
    let parents: HashSet<&str> = entries.iter().filter_map(|e| e.path.rsplit_once('/').map(|p| p.0)).collect();
    let mut wants: HashMap<&str, Want<'_>> = HashMap::with_capacity(entries.len());
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for e in &entries {
        let Some(place) = layout.place(&e.path) else {
            return Err(RestoreError::Manifest {
                file: e.path.clone(),
                detail: "the manifest path is not a safe relative path".into(),
            });
        };
        let want = match (&e.kind, place) {
            (_, Place::TablespaceLink(_)) => continue,
            (EntryKind::Dir, _) => Want::Dir(e.mode),
            // A link with entries under it was followed by the backup, and a
            // separate WAL directory belongs to the source host (on the same
            // host, possibly the live server's): both become directories.
            (EntryKind::Link { .. }, _) if e.path == "pg_wal" || parents.contains(e.path.as_str()) => Want::Dir(0o700),
            (EntryKind::Link { target }, _) => Want::Link(target),
            (EntryKind::File { .. }, Place::Disk(path)) => {
                jobs.push(Job {
                    index: jobs.len(),
                    entry: e,
                    path,
                    existing: None,
                    parts_left: AtomicUsize::new(0),
                    wrote: AtomicBool::new(false),
                });
                Want::File(jobs.len() - 1)
            }
        };
        wants.insert(e.path.as_str(), want);
    }
    // Always directories, whether the backup lists them or not.
    for always in ["pg_wal", "pg_wal/archive_status"] {
        wants.entry(always).or_insert(Want::Dir(0o700));
    }
    if !layout.tablespaces.is_empty() {
        wants.entry("pg_tblspc").or_insert(Want::Dir(0o700));
    }

    if opts.delta {
        // First make the directory unstartable: no signal file, no pg_control
        // (restored last), so that a restore that fails half-way cannot be
        // started on a mix of old and new files.
        for name in ["recovery.signal", "standby.signal", HELD_BACK] {
            remove_path(&pgdata.join(name), false)?;
        }
        fsync_dir(pgdata)?;
        if pgdata.join("global").is_dir() {
            fsync_dir(&pgdata.join("global"))?;
        }
        let mut existing = HashMap::new();
        sweep(pgdata, "", &wants, layout, &mut existing, &mut outcome.paths_removed)?;
        for (oid, loc) in &layout.tablespaces {
            if loc.is_dir() {
                sweep(loc, &format!("pg_tblspc/{oid}"), &wants, layout, &mut existing, &mut outcome.paths_removed)?;
            }
        }
        for (j, ex) in existing {
            jobs[j].existing = Some(ex);
        }
    }

    // Tablespace locations and their links, then directories in manifest
    // order (parents first), then parents the manifest did not list.
    let mut dirs: Vec<(PathBuf, u32)> = vec![(pgdata.clone(), pgdata_mode(m))];
    if !layout.tablespaces.is_empty() {
        let tblspc = pgdata.join("pg_tblspc");
        std::fs::create_dir_all(&tblspc).map_err(local("create directory", &tblspc))?;
        for (oid, loc) in &layout.tablespaces {
            if let Some(parent) = loc.parent() {
                std::fs::create_dir_all(parent).map_err(local("create directory", parent))?;
            }
            make_dir(loc)?;
            dirs.push((loc.clone(), 0o700));
            let link = tblspc.join(oid.to_string());
            if std::fs::read_link(&link).ok().as_deref() != Some(loc.as_path()) {
                std::os::unix::fs::symlink(loc, &link).map_err(local("create link", &link))?;
            }
        }
        dirs.push((tblspc, 0o700));
    }
    let mut unlisted: BTreeSet<PathBuf> = BTreeSet::new();
    for e in &entries {
        if let Some((parent, _)) = e.path.rsplit_once('/')
            && !matches!(wants.get(parent), Some(Want::Dir(_)))
            && let Some(Place::Disk(p)) = layout.place(parent)
        {
            unlisted.insert(p);
        }
    }
    for p in &unlisted {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).map_err(local("create directory", p))?;
    }
    for e in &entries {
        match (wants.get(e.path.as_str()), layout.place(&e.path)) {
            (Some(Want::Dir(mode)), Some(Place::Disk(path))) => {
                make_dir(&path)?;
                dirs.push((path, *mode));
            }
            (Some(Want::Link(target)), Some(Place::Disk(path))) if std::fs::symlink_metadata(&path).is_err() => {
                std::os::unix::fs::symlink(target, &path).map_err(local("create link", &path))?;
            }
            _ => {}
        }
    }
    // PostgreSQL needs pg_wal and pg_wal/archive_status, even empty.
    for sub in ["pg_wal", "pg_wal/archive_status"] {
        let p = pgdata.join(sub);
        if !p.is_dir() {
            make_dir(&p)?;
            dirs.push((p, 0o700));
        }
    }

    // Tasks: bundles (each fetched once), parts of chunked files, empties.
    let held = jobs.iter().position(|j| j.entry.path == HELD_BACK);
    let mut bundles: BTreeMap<Hash, (Vec<usize>, u64)> = BTreeMap::new();
    let mut tasks: Vec<Task> = Vec::new();
    let mut empties: Vec<usize> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let EntryKind::File { data } = &job.entry.kind else { continue };
        match data {
            FileData::Bundled { bundle, len, .. } => {
                let b = bundles.entry(*bundle).or_default();
                b.0.push(j);
                b.1 += *len;
            }
            _ if Some(j) == held => {}
            FileData::Chunks { chunks } if !chunks.is_empty() => {
                let (mut first, mut offset, mut bytes, mut parts) = (0, 0u64, 0u64, 0);
                for (i, c) in chunks.iter().enumerate() {
                    bytes += c.len;
                    if bytes >= PART_BYTES || i + 1 == chunks.len() {
                        tasks.push(Task::Part { job: j, first, end: i + 1, offset, bytes });
                        parts += 1;
                        offset += bytes;
                        first = i + 1;
                        bytes = 0;
                    }
                }
                job.parts_left.store(parts, Ordering::Relaxed);
            }
            FileData::Chunks { .. } | FileData::Empty => empties.push(j),
        }
    }
    tasks.extend(bundles.into_iter().map(|(bundle, (jobs, bytes))| Task::Bundle { bundle, jobs, bytes }));
    tasks.sort_by_key(|t| std::cmp::Reverse(t.bytes()));
    tasks.extend(empties.chunks(EMPTY_BATCH).map(|c| Task::Empty { jobs: c.to_vec() }));

    let w = Writer {
        repo,
        jobs,
        held,
        held_bytes: Mutex::new(None),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        written: AtomicU64::new(0),
        kept: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(File, usize)>(SYNC_QUEUE);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..SYNC_THREADS {
            s.spawn(|| {
                loop {
                    // Ends when every writer has dropped its sender.
                    let Some((f, j)) = rx.lock().ok().and_then(|r| r.recv().ok()) else { break };
                    if let Err(e) = f.sync_all() {
                        w.fail(local("fsync", &w.jobs[j].path)(e));
                    }
                }
            });
        }
        for _ in 0..opts.jobs.clamp(1, 256) {
            let q = tx.clone();
            s.spawn(|| {
                let q = q;
                while !w.stop.load(Ordering::Relaxed) {
                    let Some(task) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    if let Err(e) = w.run(task, Some(&q)) {
                        w.fail(e);
                    }
                }
            });
        }
        drop(tx);
    });
    if let Some(e) = w.error.lock().ok().and_then(|mut e| e.take()) {
        return Err(e);
    }

    // pg_control last: only a directory with every other file in place can
    // be started.
    if let Some(j) = held {
        let job = &w.jobs[j];
        let bytes = match &job.entry.kind {
            EntryKind::File { data: FileData::Bundled { .. } } => {
                w.held_bytes.lock().ok().and_then(|mut b| b.take()).unwrap_or_default()
            }
            EntryKind::File { data: FileData::Chunks { chunks } } => {
                let mut all = Vec::with_capacity(usize::try_from(job.entry.size).unwrap_or(0));
                for c in chunks {
                    all.extend_from_slice(&fetch(repo, &c.hash, &job.entry.path)?);
                }
                all
            }
            _ => Vec::new(),
        };
        if bytes.len() as u64 != job.entry.size {
            return Err(RestoreError::Manifest {
                file: job.entry.path.clone(),
                detail: format!("the manifest gives it {} bytes, its data has {}", job.entry.size, bytes.len()),
            });
        }
        w.write_whole(job, &bytes, None)?;
    }

    // Directory modes, then fsync every directory written into, children
    // before parents.
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.dedup_by(|a, b| a.0 == b.0);
    for (path, mode) in &dirs {
        std::fs::set_permissions(path, Permissions::from_mode(mode & 0o7777))
            .map_err(local("set the mode of", path))?;
        fsync_dir(path)?;
    }
    for p in unlisted.iter().rev() {
        fsync_dir(p)?;
    }
    outcome.files_written = w.written.load(Ordering::Relaxed);
    outcome.files_kept = w.kept.load(Ordering::Relaxed);
    outcome.bytes_written = w.bytes.load(Ordering::Relaxed);
    Ok(outcome)
}

/// Removes the marker of a restore in progress, durably: the restore is
/// complete.
pub fn mark_complete(pgdata: &Path) -> Result<(), RestoreError> {
    remove_path(&pgdata.join(MARKER), false)?;
    fsync_dir(pgdata)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;
    use walvault_formats::manifest::{MANIFEST_FORMAT, Totals};
    use walvault_formats::object::EncodeOptions;
    use walvault_formats::wal::{Lsn, WalSegmentSize};

    /// A manifest of backup `B1` of cluster `main` with these entries.
    pub(crate) fn manifest_with(entries: &[Entry]) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            id: "B1".into(),
            cluster: "main".into(),
            system_identifier: 77,
            pg_version: 15,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: Lsn(0x200_0028),
            stop_lsn: Lsn(0x200_0100),
            start_time_ms: 1,
            stop_time_ms: 2,
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000002".into(),
            next_xid: 740,
            backup_label: "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".into(),
            tablespace_map: String::new(),
            tablespaces: vec![],
            chunk_size: 4,
            entries: entries.to_vec(),
            totals: Totals::default(),
            walvault_version: "test".into(),
        }
    }

    /// A repository in a temporary directory, bound to system id 77.
    pub(crate) struct TestRepo {
        pub dir: PathBuf,
        pub config: Config,
        pub repo: Repository,
    }

    impl TestRepo {
        pub(crate) fn new(tag: &str) -> TestRepo {
            let (dir, config, _) = crate::testing::temp_repo(&format!("restore-{tag}"), 77, WalSegmentSize::DEFAULT);
            let repo = Repository::open_config(&config).unwrap();
            TestRepo { dir, config, repo }
        }

        fn put(&self, bytes: &[u8]) -> Hash {
            let h = Hash::from(ContentHash::of(bytes));
            self.repo.put_data(&h, bytes, &EncodeOptions::default()).unwrap();
            h
        }

        /// A file stored as chunks of `chunk` bytes.
        pub(crate) fn chunked(&self, path: &str, mode: u32, bytes: &[u8], chunk: usize) -> Entry {
            let chunks = bytes.chunks(chunk).map(|c| ChunkRef { hash: self.put(c), len: c.len() as u64 }).collect();
            file(path, mode, bytes.len() as u64, FileData::Chunks { chunks })
        }

        /// Files packed into one bundle.
        pub(crate) fn bundled(&self, files: &[(&str, u32, &[u8])]) -> Vec<Entry> {
            let mut bundle = b"xx".to_vec();
            let mut ranges = Vec::new();
            for (_, _, b) in files {
                ranges.push((bundle.len() as u64, b.len() as u64));
                bundle.extend_from_slice(b);
            }
            let h = self.put(&bundle);
            files
                .iter()
                .zip(ranges)
                .map(|((path, mode, b), (offset, len))| {
                    let hash = Hash::from(ContentHash::of(b));
                    file(path, *mode, len, FileData::Bundled { bundle: h, offset, len, hash })
                })
                .collect()
        }
    }

    impl Drop for TestRepo {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub(crate) fn file(path: &str, mode: u32, size: u64, data: FileData) -> Entry {
        Entry { path: path.into(), mode, size, mtime_ms: 1_700_000_000_123, kind: EntryKind::File { data } }
    }

    pub(crate) fn dir(path: &str, mode: u32) -> Entry {
        Entry { path: path.into(), mode, size: 0, mtime_ms: 5, kind: EntryKind::Dir }
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// The data of a small cluster: directories, a chunked file cut into
    /// several parts, bundled small files (pg_control among them), an empty
    /// file, a link, and files the restore must not take from the backup.
    fn sample(t: &TestRepo, big: &[u8]) -> Manifest {
        let mut entries = vec![dir("base", 0o700), dir("base/1", 0o700), dir("global", 0o700), dir("pg_wal", 0o700)];
        entries.push(t.chunked("base/1/16384", 0o600, big, 1 << 20));
        entries.extend(t.bundled(&[
            ("PG_VERSION", 0o600, b"15\n"),
            ("global/pg_control", 0o600, &[7u8; 8192]),
            ("base/1/PG_VERSION", 0o640, b"15\n"),
            ("postgresql.auto.conf", 0o600, b"# Do not edit this file manually!\n"),
            ("standby.signal", 0o600, b""),
            ("backup_label", 0o600, b"stale label\n"),
        ]));
        entries.push(file("base/1/empty", 0o600, 0, FileData::Empty));
        entries.push(Entry {
            path: "pg_ident.link".into(),
            mode: 0o777,
            size: 0,
            mtime_ms: 5,
            kind: EntryKind::Link { target: "pg_ident.conf".into() },
        });
        manifest_with(&entries)
    }

    fn big_file(seed: u8) -> Vec<u8> {
        // Just over 33 parts' worth of 1 MiB chunks would be slow; 3.5 MiB
        // with a 1 MiB part size is tested through PART_BYTES-independent
        // chunking: 4 chunks in one part here.
        (0..(3 << 20) + 12345).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ seed).collect()
    }

    #[test]
    fn writes_files_modes_and_times() {
        let t = TestRepo::new("write");
        let big = big_file(0);
        let m = sample(&t, &big);
        let pgdata = t.dir.join("pgdata");
        let layout = Layout::new(pgdata.clone(), &[]);
        let out = restore_files(&t.repo, &m, &layout, FilesOptions { delta: false, jobs: 3 }).unwrap();
        mark_complete(&pgdata).unwrap();
        assert_eq!(out.files_written, 6, "{out:?}");
        assert_eq!(out.files_kept, 0);
        assert_eq!(out.bytes_written, big.len() as u64 + 3 + 8192 + 3 + 34);
        assert_eq!(std::fs::read(pgdata.join("base/1/16384")).unwrap(), big);
        assert_eq!(std::fs::read(pgdata.join("global/pg_control")).unwrap(), vec![7u8; 8192]);
        assert_eq!(std::fs::read(pgdata.join("base/1/PG_VERSION")).unwrap(), b"15\n");
        assert_eq!(mode_of(&pgdata.join("base/1/PG_VERSION")), 0o640);
        assert_eq!(mode_of(&pgdata.join("base/1/16384")), 0o600);
        assert_eq!(mode_of(&pgdata), 0o700);
        assert_eq!(std::fs::metadata(pgdata.join("base/1/empty")).unwrap().len(), 0);
        let meta = std::fs::metadata(pgdata.join("base/1/16384")).unwrap();
        assert_eq!(mtime_ms(&meta), 1_700_000_000_123);
        assert_eq!(std::fs::read_link(pgdata.join("pg_ident.link")).unwrap(), PathBuf::from("pg_ident.conf"));
        assert!(pgdata.join("pg_wal/archive_status").is_dir());
        // Never from the backup: signal files and backup_label.
        assert!(!pgdata.join("standby.signal").exists());
        assert!(!pgdata.join("backup_label").exists());
        assert!(!pgdata.join(MARKER).exists());
    }

    #[test]
    fn corrupt_object_names_the_file_and_leaves_no_pg_control() {
        let t = TestRepo::new("corrupt");
        let big = big_file(1);
        let m = sample(&t, &big);
        let EntryKind::File { data: FileData::Chunks { chunks } } = &m.entries[4].kind else { panic!() };
        let key = t.repo.data_key(&chunks[2].hash);
        let obj = PathBuf::from(&t.config.repository).join(&key);
        let mut bytes = std::fs::read(&obj).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xFF;
        std::fs::write(&obj, bytes).unwrap();
        let pgdata = t.dir.join("pgdata");
        let layout = Layout::new(pgdata.clone(), &[]);
        let e = restore_files(&t.repo, &m, &layout, FilesOptions { delta: false, jobs: 2 }).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("'base/1/16384'") && msg.contains(&key) && msg.contains("corrupt"), "{msg}");
        assert!(e.hint().is_some());
        assert!(!pgdata.join("global/pg_control").exists(), "a failed restore must not be startable");
        assert!(pgdata.join(MARKER).exists());

        // A missing object too.
        std::fs::remove_file(&obj).unwrap();
        let msg = restore_files(&t.repo, &m, &layout, FilesOptions { delta: true, jobs: 2 }).unwrap_err().to_string();
        assert!(msg.contains("'base/1/16384'") && msg.contains(&key) && msg.contains("missing"), "{msg}");
    }

    #[test]
    fn delta_keeps_matching_files_rewrites_changed_chunks_and_removes_extras() {
        let t = TestRepo::new("delta");
        let big = big_file(2);
        let m = sample(&t, &big);
        let pgdata = t.dir.join("pgdata");
        let layout = Layout::new(pgdata.clone(), &[]);
        restore_files(&t.repo, &m, &layout, FilesOptions { delta: false, jobs: 2 }).unwrap();
        mark_complete(&pgdata).unwrap();

        // Damage one chunk of the large file, change a small file, add
        // stale WAL, an extra file and directory, a signal file.
        let f = OpenOptions::new().write(true).open(pgdata.join("base/1/16384")).unwrap();
        f.write_all_at(b"garbage", (2 << 20) + 10).unwrap();
        drop(f);
        std::fs::write(pgdata.join("base/1/PG_VERSION"), b"14\n").unwrap();
        std::fs::write(pgdata.join("pg_wal/000000010000000000000009"), b"stale").unwrap();
        std::fs::write(pgdata.join("pg_wal/archive_status/000000010000000000000009.ready"), b"").unwrap();
        std::fs::create_dir_all(pgdata.join("base/99/sub")).unwrap();
        std::fs::write(pgdata.join("base/99/sub/x"), b"x").unwrap();
        std::fs::write(pgdata.join("recovery.signal"), b"").unwrap();
        std::fs::write(pgdata.join("postmaster.pid"), b"2147483646\n").unwrap();
        let kept_meta = std::fs::metadata(pgdata.join("PG_VERSION")).unwrap();

        let out = restore_files(&t.repo, &m, &layout, FilesOptions { delta: true, jobs: 2 }).unwrap();
        mark_complete(&pgdata).unwrap();
        // Rewritten: the damaged file (one chunk), the changed one, pg_control (always last).
        assert_eq!(out.files_written, 3, "{out:?}");
        assert_eq!(out.files_kept, 3, "{out:?}");
        assert_eq!(out.bytes_written, (1 << 20) + 3 + 8192, "only the damaged chunk is rewritten: {out:?}");
        assert_eq!(out.paths_removed, 3, "stale WAL, its .ready file, base/99: {out:?}");
        assert_eq!(std::fs::read(pgdata.join("base/1/16384")).unwrap(), big);
        assert_eq!(std::fs::read(pgdata.join("base/1/PG_VERSION")).unwrap(), b"15\n");
        assert!(!pgdata.join("pg_wal/000000010000000000000009").exists());
        assert!(std::fs::read_dir(pgdata.join("pg_wal/archive_status")).unwrap().next().is_none());
        assert!(!pgdata.join("base/99").exists());
        assert!(!pgdata.join("recovery.signal").exists());
        assert!(!pgdata.join("postmaster.pid").exists());
        let after = std::fs::metadata(pgdata.join("PG_VERSION")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((after.ino(), after.ctime_nsec()), (kept_meta.ino(), kept_meta.ctime_nsec()), "kept untouched");

        // A file that grew and one that shrank are fixed, the matching prefix kept.
        let mut longer = big.clone();
        longer.extend_from_slice(b"tail");
        std::fs::write(pgdata.join("base/1/16384"), &longer).unwrap();
        let out = restore_files(&t.repo, &m, &layout, FilesOptions { delta: true, jobs: 1 }).unwrap();
        assert_eq!(std::fs::read(pgdata.join("base/1/16384")).unwrap(), big);
        assert_eq!(out.bytes_written, 8192, "{out:?}");
        std::fs::write(pgdata.join("base/1/16384"), &big[..(2 << 20) + 5]).unwrap();
        let out = restore_files(&t.repo, &m, &layout, FilesOptions { delta: true, jobs: 1 }).unwrap();
        assert_eq!(std::fs::read(pgdata.join("base/1/16384")).unwrap(), big);
        assert_eq!(out.bytes_written, big.len() as u64 - (2 << 20) + 8192, "{out:?}");
    }

    #[test]
    fn tablespaces_go_to_their_location_and_are_linked() {
        let t = TestRepo::new("ts");
        let mut entries =
            vec![dir("pg_tblspc", 0o700), dir("pg_tblspc/16384", 0o700), dir("pg_tblspc/16384/PG_15_1", 0o700)];
        entries.push(dir("pg_tblspc/16384/PG_15_1/5", 0o700));
        entries.push(t.chunked("pg_tblspc/16384/PG_15_1/5/16385", 0o600, b"table data", 4));
        let m = manifest_with(&entries);
        let pgdata = t.dir.join("pgdata");
        let loc = t.dir.join("somewhere/ts");
        let placed = vec![crate::restore::layout::PlacedTablespace {
            oid: 16384,
            name: "ts".into(),
            original: "/old".into(),
            location: loc.clone(),
        }];
        let layout = Layout::new(pgdata.clone(), &placed);
        restore_files(&t.repo, &m, &layout, FilesOptions { delta: false, jobs: 2 }).unwrap();
        assert_eq!(std::fs::read_link(pgdata.join("pg_tblspc/16384")).unwrap(), loc);
        assert_eq!(std::fs::read(loc.join("PG_15_1/5/16385")).unwrap(), b"table data");
        // --delta cleans the location too.
        std::fs::write(loc.join("PG_15_1/5/99999"), b"x").unwrap();
        let out = restore_files(&t.repo, &m, &layout, FilesOptions { delta: true, jobs: 2 }).unwrap();
        assert_eq!((out.paths_removed, out.files_kept), (1, 1), "{out:?}");
        assert!(!loc.join("PG_15_1/5/99999").exists());
    }
}
