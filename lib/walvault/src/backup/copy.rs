//! Copying files into the repository, in parallel: large files as
//! content-addressed chunks, small files packed into bundles — or, when
//! unchanged since the previous backup, pointed at the range of its bundle
//! that already holds them.
//!
//! The work is a list of items (a chunk of a large file, or a small file)
//! handed out through one atomic counter; chunks of a large file are items
//! of their own, so that one huge relation is read by every thread. Each
//! thread keeps its own bundle buffer and reports what it did when it ends;
//! the manifest is assembled from those reports on the calling thread.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use walvault_formats::manifest::{BUNDLE_FILE_MAX, BUNDLE_TARGET, CHUNK_SIZE, ChunkRef, FileData, Hash};
use walvault_formats::object::{ContentHash, EncodeOptions};

use super::BackupError;
use super::pace::{Progress, RateLimiter};
use super::walk::FileJob;
use crate::error::{Error, Result};
use crate::repo::Repository;

/// A small file of the previous backup, reusable when unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reusable {
    /// The bundle holding it.
    pub bundle: Hash,
    /// Where it starts in the bundle.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// BLAKE3 of the file.
    pub hash: Hash,
}

/// How a data object is used by this backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ObjectUse {
    /// Its stored size.
    pub stored: u64,
    /// Whether this backup stored it (rather than found it).
    pub created: bool,
}

/// What the copy needs besides the files.
pub(crate) struct CopyContext<'a> {
    /// Where objects go.
    pub repo: &'a Repository,
    /// How objects are encoded.
    pub encode: EncodeOptions,
    /// Small files of the previous backup, by path.
    pub previous: &'a HashMap<String, Reusable>,
    /// Paths of the files, by [`FileJob::entry`].
    pub paths: &'a [&'a str],
    /// The rate limit, if any.
    pub limiter: Option<&'a RateLimiter>,
    /// Bytes read so far.
    pub progress: &'a Progress,
    /// Threads reading at once.
    pub jobs: usize,
    /// Every data object that existed when the backup took the repository
    /// lock, with its stored size, or `None` to ask the storage about each
    /// object. The backup holds the lock shared, so expire cannot delete
    /// any of them meanwhile: a known object needs no HEAD, and an unknown
    /// one goes straight to a create-once PUT (one round trip instead of
    /// two on an object store).
    pub known: Option<&'a HashMap<Hash, u64>>,
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Copied {
    /// Removed before it could be opened: left out of the backup (WAL
    /// replay removes or recreates it).
    Vanished,
    /// Stored: its content and the number of bytes read.
    Stored {
        /// Where its bytes are.
        data: FileData,
        /// Bytes read (fewer than listed if it shrank).
        size: u64,
    },
}

/// The result of the copy.
#[derive(Debug, Default)]
pub(crate) struct CopyResult {
    /// One per file, in the order given.
    pub files: Vec<Option<Copied>>,
    /// Every object the files refer to.
    pub objects: HashMap<Hash, ObjectUse>,
}

enum Item {
    Chunk { file: usize, index: u64 },
    Small { file: usize },
}

/// A large file's open descriptor, shared by the threads reading its
/// chunks and closed after the last one (a cluster has more relation
/// segments than a process may hold descriptors).
enum Open {
    NotYet,
    File(Arc<File>),
    Vanished,
    Closed,
}

struct LargeFile {
    open: Open,
    remaining: u64,
}

/// A small file as one thread saw it.
enum SmallOut {
    Empty,
    /// In this thread's bundle number `seq`.
    Own {
        seq: usize,
        offset: u64,
        len: u64,
        hash: Hash,
    },
    Reused(Reusable),
}

#[derive(Default)]
struct WorkerOut {
    chunks: Vec<(usize, u64, ChunkRef, bool)>,
    small: Vec<(usize, SmallOut)>,
    /// This thread's bundles, by sequence number.
    bundles: Vec<Hash>,
    objects: HashMap<Hash, ObjectUse>,
    vanished: Vec<usize>,
}

/// Reads into `buf` at `offset` until it is full or the file ends.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads into `buf` until it is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn read_err(path: &Path, source: io::Error) -> Error {
    BackupError::Read { path: path.to_path_buf(), source }.into()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a thread panicked, and then the copy fails anyway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stores `plain` as a data object unless it exists: returns its hash and
/// how this backup uses it.
fn store(ctx: &CopyContext<'_>, plain: &[u8], seen: &HashMap<Hash, ObjectUse>) -> Result<(Hash, ObjectUse)> {
    let (repo, encode) = (ctx.repo, &ctx.encode);
    let hash = Hash::from(ContentHash::of(plain));
    if let Some(u) = seen.get(&hash) {
        return Ok((hash, *u));
    }
    match ctx.known {
        Some(known) => {
            if let Some(&stored) = known.get(&hash) {
                return Ok((hash, ObjectUse { stored, created: false }));
            }
        }
        None => {
            if let Some(stored) = repo.head_data(&hash)? {
                return Ok((hash, ObjectUse { stored, created: false }));
            }
        }
    }
    match repo.put_data(&hash, plain, encode)? {
        Some(stored) => Ok((hash, ObjectUse { stored, created: true })),
        // Stored meanwhile by another thread or backup: same bytes.
        None => Ok((hash, ObjectUse { stored: repo.head_data(&hash)?.unwrap_or(0), created: false })),
    }
}

struct Shared<'a> {
    ctx: &'a CopyContext<'a>,
    files: &'a [FileJob],
    items: Vec<Item>,
    next: AtomicUsize,
    large: Vec<Mutex<LargeFile>>,
    /// Stored size of previous bundles, `None` when gone: one HEAD each.
    bundles: Mutex<HashMap<Hash, Option<u64>>>,
    abort: AtomicBool,
}

impl Shared<'_> {
    fn worker(&self) -> Result<WorkerOut> {
        let mut out = WorkerOut::default();
        let mut chunk = Vec::new();
        let mut bundle: Vec<u8> = Vec::new();
        while !self.abort.load(Ordering::Relaxed) {
            let Some(item) = self.items.get(self.next.fetch_add(1, Ordering::Relaxed)) else { break };
            match *item {
                Item::Chunk { file, index } => {
                    if chunk.is_empty() {
                        chunk = vec![0u8; CHUNK_SIZE as usize];
                    }
                    self.chunk(file, index, &mut chunk, &mut out)?;
                }
                Item::Small { file } => {
                    if bundle.capacity() == 0 {
                        bundle.reserve_exact((BUNDLE_TARGET + BUNDLE_FILE_MAX) as usize);
                    }
                    self.small(file, &mut bundle, &mut out)?;
                    if bundle.len() as u64 >= BUNDLE_TARGET {
                        self.close_bundle(&mut bundle, &mut out)?;
                    }
                }
            }
        }
        if !bundle.is_empty() && !self.abort.load(Ordering::Relaxed) {
            self.close_bundle(&mut bundle, &mut out)?;
        }
        Ok(out)
    }

    /// Opens a large file for its first chunk; `None` if it vanished.
    fn open_large(&self, file: usize, out: &mut WorkerOut) -> Result<Option<Arc<File>>> {
        let job = &self.files[file];
        let mut state = lock(&self.large[file]);
        match &state.open {
            Open::File(f) => Ok(Some(Arc::clone(f))),
            Open::Vanished | Open::Closed => Ok(None),
            Open::NotYet => match File::open(&job.path) {
                Ok(f) => {
                    let f = Arc::new(f);
                    state.open = Open::File(Arc::clone(&f));
                    Ok(Some(f))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    state.open = Open::Vanished;
                    out.vanished.push(file);
                    Ok(None)
                }
                Err(e) => Err(read_err(&job.path, e)),
            },
        }
    }

    fn chunk(&self, file: usize, index: u64, buf: &mut [u8], out: &mut WorkerOut) -> Result<()> {
        let job = &self.files[file];
        let offset = index * CHUNK_SIZE;
        let want = (job.size - offset).min(CHUNK_SIZE) as usize;
        if let Some(f) = self.open_large(file, out)? {
            if let Some(l) = self.ctx.limiter {
                l.take(want as u64);
            }
            let n = read_full_at(&f, &mut buf[..want], offset).map_err(|e| read_err(&job.path, e))?;
            drop(f);
            self.ctx.progress.add(want as u64);
            let piece = ChunkRef { hash: Hash([0; 32]), len: n as u64 };
            if n == 0 {
                out.chunks.push((file, index, piece, true));
            } else {
                let (hash, used) = store(self.ctx, &buf[..n], &out.objects)?;
                out.objects.entry(hash).and_modify(|u| u.created |= used.created).or_insert(used);
                out.chunks.push((file, index, ChunkRef { hash, len: n as u64 }, n < want));
            }
        } else {
            self.ctx.progress.add(want as u64);
        }
        let mut state = lock(&self.large[file]);
        state.remaining -= 1;
        if state.remaining == 0 && matches!(state.open, Open::File(_)) {
            state.open = Open::Closed;
        }
        Ok(())
    }

    /// The stored size of a previous bundle, or `None` if it is gone.
    fn previous_bundle(&self, hash: &Hash) -> Result<Option<u64>> {
        if let Some(known) = lock(&self.bundles).get(hash) {
            return Ok(*known);
        }
        let stored = match self.ctx.known {
            Some(known) => known.get(hash).copied(),
            None => self.ctx.repo.head_data(hash)?,
        };
        lock(&self.bundles).insert(*hash, stored);
        Ok(stored)
    }

    fn small(&self, file: usize, bundle: &mut Vec<u8>, out: &mut WorkerOut) -> Result<()> {
        let job = &self.files[file];
        let mut f = match File::open(&job.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.ctx.progress.add(job.size);
                out.vanished.push(file);
                return Ok(());
            }
            Err(e) => return Err(read_err(&job.path, e)),
        };
        if let Some(l) = self.ctx.limiter {
            l.take(job.size);
        }
        // Read straight into the bundle; take the bytes back out if the
        // previous backup already holds them.
        let start = bundle.len();
        bundle.resize(start + job.size as usize, 0);
        let n = read_full(&mut f, &mut bundle[start..]).map_err(|e| read_err(&job.path, e))?;
        bundle.truncate(start + n);
        self.ctx.progress.add(job.size);
        if n == 0 {
            out.small.push((file, SmallOut::Empty));
            return Ok(());
        }
        let hash = Hash::from(ContentHash::of(&bundle[start..]));
        if let Some(prev) = self.ctx.previous.get(self.ctx.paths[job.entry])
            && prev.hash == hash
            && prev.len == n as u64
            && self.previous_bundle(&prev.bundle)?.is_some()
        {
            bundle.truncate(start);
            out.small.push((file, SmallOut::Reused(*prev)));
            return Ok(());
        }
        let seq = out.bundles.len();
        out.small.push((file, SmallOut::Own { seq, offset: start as u64, len: n as u64, hash }));
        Ok(())
    }

    fn close_bundle(&self, bundle: &mut Vec<u8>, out: &mut WorkerOut) -> Result<()> {
        let (hash, used) = store(self.ctx, bundle, &out.objects)?;
        out.objects.entry(hash).and_modify(|u| u.created |= used.created).or_insert(used);
        out.bundles.push(hash);
        bundle.clear();
        Ok(())
    }
}

/// Copies on this thread a small file that the server rewrites in place
/// while it runs (`global/pg_control`): reads it until two reads in a row
/// agree, so that a copy torn by a concurrent write is not kept (a torn
/// pg_control fails its CRC and the restored server would not start), and
/// stores it as one chunk.
///
/// # Errors
/// A failure to read the file (other than its disappearance) or to store it.
pub(crate) fn copy_stable(
    ctx: &CopyContext<'_>,
    job: &FileJob,
    objects: &mut HashMap<Hash, ObjectUse>,
) -> Result<Copied> {
    let read = || -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(job.size as usize);
        File::open(&job.path)?.take(job.size).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let mut bytes = match read() {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Copied::Vanished),
        Err(e) => return Err(read_err(&job.path, e)),
    };
    for _ in 0..10 {
        let again = read().map_err(|e| read_err(&job.path, e))?;
        if again == bytes {
            break;
        }
        bytes = again;
        std::thread::sleep(Duration::from_millis(10));
    }
    ctx.progress.add(job.size);
    if bytes.is_empty() {
        return Ok(Copied::Stored { data: FileData::Empty, size: 0 });
    }
    let (hash, used) = store(ctx, &bytes, objects)?;
    objects.entry(hash).and_modify(|u| u.created |= used.created).or_insert(used);
    let len = bytes.len() as u64;
    Ok(Copied::Stored { data: FileData::Chunks { chunks: vec![ChunkRef { hash, len }] }, size: len })
}

/// Copies `files` with `ctx.jobs` threads. `tick` runs on the calling
/// thread about four times a second while they work (progress, a check
/// that the database session is alive); an error from it stops the copy
/// and is returned.
///
/// # Errors
/// The first failure to read a file (other than its disappearance) or to
/// store an object, or `tick`'s error.
pub(crate) fn copy_files(
    ctx: &CopyContext<'_>,
    files: &[FileJob],
    mut tick: impl FnMut() -> Result<()>,
) -> Result<CopyResult> {
    let mut items = Vec::new();
    let mut large: Vec<usize> = (0..files.len()).filter(|&i| files[i].size > BUNDLE_FILE_MAX).collect();
    // Largest first, so that the last items are small and the threads end
    // together.
    large.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
    let mut states: Vec<Mutex<LargeFile>> = Vec::with_capacity(files.len());
    for f in files {
        let remaining = if f.size > BUNDLE_FILE_MAX { f.size.div_ceil(CHUNK_SIZE) } else { 0 };
        states.push(Mutex::new(LargeFile { open: Open::NotYet, remaining }));
    }
    for &file in &large {
        items.extend((0..files[file].size.div_ceil(CHUNK_SIZE)).map(|index| Item::Chunk { file, index }));
    }
    items.extend(
        (0..files.len())
            .filter(|&i| files[i].size > 0 && files[i].size <= BUNDLE_FILE_MAX)
            .map(|file| Item::Small { file }),
    );

    let shared = Shared {
        ctx,
        files,
        items,
        next: AtomicUsize::new(0),
        large: states,
        bundles: Mutex::new(HashMap::new()),
        abort: AtomicBool::new(false),
    };
    let jobs = ctx.jobs.clamp(1, shared.items.len().max(1));
    let (outs, tick_error) = std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<()>();
        let handles: Vec<_> = (0..jobs)
            .map(|_| {
                let tx = tx.clone();
                let shared = &shared;
                s.spawn(move || {
                    // Dropped when the thread ends: the last one ends the wait below.
                    let _alive = tx;
                    let r = shared.worker();
                    if r.is_err() {
                        shared.abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        drop(tx);
        let mut tick_error = None;
        while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_millis(250)) {
            if tick_error.is_none()
                && let Err(e) = tick()
            {
                shared.abort.store(true, Ordering::Relaxed);
                tick_error = Some(e);
            }
        }
        let outs: Vec<Result<WorkerOut>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(BackupError::Internal("a copying thread panicked".into()).into())))
            .collect();
        (outs, tick_error)
    });
    if let Some(e) = tick_error {
        return Err(e);
    }
    let outs = outs.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(assemble(files, outs, &lock(&shared.bundles)))
}

/// Puts the threads' reports together, file by file.
fn assemble(files: &[FileJob], outs: Vec<WorkerOut>, bundles: &HashMap<Hash, Option<u64>>) -> CopyResult {
    let mut result = CopyResult { files: vec![None; files.len()], objects: HashMap::new() };
    let mut chunks: HashMap<usize, Vec<(u64, ChunkRef, bool)>> = HashMap::new();
    let mut vanished = HashSet::new();
    for (i, f) in files.iter().enumerate() {
        if f.size == 0 {
            result.files[i] = Some(Copied::Stored { data: FileData::Empty, size: 0 });
        }
    }
    for out in outs {
        for (hash, used) in out.objects {
            result.objects.entry(hash).and_modify(|u| u.created |= used.created).or_insert(used);
        }
        vanished.extend(out.vanished);
        for (file, index, piece, short) in out.chunks {
            chunks.entry(file).or_default().push((index, piece, short));
        }
        for (file, small) in out.small {
            let copied = match small {
                SmallOut::Empty => Copied::Stored { data: FileData::Empty, size: 0 },
                SmallOut::Own { seq, offset, len, hash } => {
                    // Every bundle a file was put in was closed and pushed.
                    let Some(bundle) = out.bundles.get(seq) else { continue };
                    Copied::Stored { data: FileData::Bundled { bundle: *bundle, offset, len, hash }, size: len }
                }
                SmallOut::Reused(r) => {
                    let stored = bundles.get(&r.bundle).copied().flatten().unwrap_or(0);
                    result.objects.entry(r.bundle).or_insert(ObjectUse { stored, created: false });
                    Copied::Stored {
                        data: FileData::Bundled { bundle: r.bundle, offset: r.offset, len: r.len, hash: r.hash },
                        size: r.len,
                    }
                }
            };
            result.files[file] = Some(copied);
        }
    }
    for (file, mut pieces) in chunks {
        if vanished.contains(&file) {
            continue;
        }
        pieces.sort_unstable_by_key(|p| p.0);
        let mut list = Vec::with_capacity(pieces.len());
        for (_, piece, short) in pieces {
            if piece.len > 0 {
                list.push(piece);
            }
            // The file shrank: what follows was read past its end.
            if short {
                break;
            }
        }
        let size = list.iter().map(|c| c.len).sum();
        let data = if list.is_empty() { FileData::Empty } else { FileData::Chunks { chunks: list } };
        result.files[file] = Some(Copied::Stored { data, size });
    }
    for file in vanished {
        result.files[file] = Some(Copied::Vanished);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::PathBuf;

    use super::*;

    struct Fixture {
        dir: PathBuf,
        repo: Repository,
    }

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!("walvault-copy-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("data")).unwrap();
            std::fs::create_dir_all(dir.join("repo")).unwrap();
            let repo = Repository::open(dir.join("repo").to_str().unwrap(), "main").unwrap();
            Fixture { dir, repo }
        }

        /// Writes `data/<name>` and returns its job, listed as `listed` bytes.
        fn file(&self, entry: usize, name: &str, content: &[u8], listed: u64) -> FileJob {
            let path = self.dir.join("data").join(name);
            std::fs::write(&path, content).unwrap();
            FileJob { entry, path, size: listed }
        }

        fn copy(
            &self,
            jobs: &[FileJob],
            paths: &[&str],
            previous: &HashMap<String, Reusable>,
            threads: usize,
        ) -> CopyResult {
            let progress = Progress::new(jobs.iter().map(|j| j.size).sum());
            let ctx = CopyContext {
                repo: &self.repo,
                encode: EncodeOptions { workers: 1, ..Default::default() },
                previous,
                paths,
                limiter: None,
                progress: &progress,
                jobs: threads,
                known: None,
            };
            let r = copy_files(&ctx, jobs, || Ok(())).unwrap();
            assert_eq!(progress.done.load(Ordering::Relaxed), progress.total);
            r
        }

        /// The bytes a result says the file holds, read back from the repository.
        fn read_back(&self, copied: &Copied) -> Vec<u8> {
            match copied {
                Copied::Stored { data: FileData::Empty, .. } => Vec::new(),
                Copied::Stored { data: FileData::Chunks { chunks }, .. } => {
                    chunks.iter().flat_map(|c| self.repo.get_data(&c.hash).unwrap()).collect()
                }
                Copied::Stored { data: FileData::Bundled { bundle, offset, len, hash }, .. } => {
                    let b = self.repo.get_data(bundle).unwrap();
                    let bytes = b[*offset as usize..(*offset + *len) as usize].to_vec();
                    assert_eq!(Hash::from(ContentHash::of(&bytes)), *hash);
                    bytes
                }
                Copied::Vanished => panic!("vanished"),
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn previous_of(paths: &[&str], r: &CopyResult) -> HashMap<String, Reusable> {
        let mut out = HashMap::new();
        for (p, c) in paths.iter().zip(&r.files) {
            if let Some(Copied::Stored { data: FileData::Bundled { bundle, offset, len, hash }, .. }) = c {
                out.insert(p.to_string(), Reusable { bundle: *bundle, offset: *offset, len: *len, hash: *hash });
            }
        }
        out
    }

    /// Every object the files of a result point at: chunks and bundles.
    fn referenced_objects(r: &CopyResult) -> std::collections::BTreeSet<Hash> {
        let mut out = std::collections::BTreeSet::new();
        for c in r.files.iter().flatten() {
            match c {
                Copied::Stored { data: FileData::Chunks { chunks }, .. } => out.extend(chunks.iter().map(|c| c.hash)),
                Copied::Stored { data: FileData::Bundled { bundle, .. }, .. } => {
                    out.insert(*bundle);
                }
                _ => {}
            }
        }
        out
    }

    #[test]
    fn chunks_bundles_vanished_and_shrunk() {
        let fx = Fixture::new("mixed");
        let chunk = CHUNK_SIZE as usize;
        let large = pattern(2 * chunk + 4096, 1);
        let shrunk = pattern(chunk + 100, 2);
        let contents: Vec<Vec<u8>> = vec![pattern(1000, 3), Vec::new(), large.clone(), shrunk.clone(), pattern(200, 4)];
        let mut jobs = vec![
            fx.file(0, "small", &contents[0], 1000),
            fx.file(1, "empty", &contents[1], 0),
            fx.file(2, "large", &contents[2], large.len() as u64),
            // Listed larger than they are now: they shrank.
            fx.file(3, "shrunk", &contents[3], 3 * CHUNK_SIZE),
            fx.file(4, "small-shrunk", &contents[4], 500),
        ];
        jobs.push(FileJob { entry: 5, path: fx.dir.join("data/gone"), size: 10 });
        jobs.push(FileJob { entry: 6, path: fx.dir.join("data/gone-large"), size: 5 * CHUNK_SIZE });
        let paths = ["small", "empty", "large", "shrunk", "small-shrunk", "gone", "gone-large"];
        let r = fx.copy(&jobs, &paths, &HashMap::new(), 3);
        for (i, content) in contents.iter().enumerate() {
            let c = r.files[i].as_ref().unwrap();
            assert_eq!(&fx.read_back(c), content, "{}", paths[i]);
            let Copied::Stored { size, .. } = c else { unreachable!() };
            assert_eq!(*size, content.len() as u64);
        }
        assert!(
            matches!(&r.files[2], Some(Copied::Stored { data: FileData::Chunks { chunks }, .. }) if chunks.len() == 3)
        );
        assert!(matches!(&r.files[0], Some(Copied::Stored { data: FileData::Bundled { .. }, .. })));
        assert_eq!(r.files[5], Some(Copied::Vanished));
        assert_eq!(r.files[6], Some(Copied::Vanished));
        // 3 + 2 chunks and the bundles of the two small files, all new.
        // Each copy thread packs its own bundle, so the two small files
        // share one or land in two, depending on which threads took them.
        let referenced = referenced_objects(&r);
        let bundles = [&r.files[0], &r.files[4]]
            .iter()
            .filter_map(|c| match c {
                Some(Copied::Stored { data: FileData::Bundled { bundle, .. }, .. }) => Some(*bundle),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>();
        assert!((1..=2).contains(&bundles.len()), "{bundles:?}");
        assert_eq!(referenced.len(), 5 + bundles.len());
        assert_eq!(r.objects.keys().copied().collect::<std::collections::BTreeSet<_>>(), referenced);
        assert!(r.objects.values().all(|u| u.created && u.stored > 0));

        // Again, unchanged: every object is found, none created, and the
        // small files point into the first backup's bundle.
        let previous = previous_of(&paths, &r);
        let again = fx.copy(&jobs, &paths, &previous, 2);
        assert_eq!(again.files[..5], r.files[..5]);
        assert!(again.objects.values().all(|u| !u.created));
        assert_eq!(again.objects.keys().copied().collect::<std::collections::BTreeSet<_>>(), referenced);

        // One small file changed: stored in a new bundle, the other reused.
        fx.file(0, "small", b"changed", 7);
        jobs[0].size = 7;
        let third = fx.copy(&jobs, &paths, &previous, 1);
        assert_eq!(fx.read_back(third.files[0].as_ref().unwrap()), b"changed");
        assert_eq!(third.files[4], r.files[4]);
        assert_eq!(third.objects.values().filter(|u| u.created).count(), 1);
    }

    #[test]
    fn control_file_alone() {
        let fx = Fixture::new("control");
        let content = pattern(8192, 5);
        let job = fx.file(0, "pg_control", &content, 8192);
        let progress = Progress::new(8192);
        let ctx = CopyContext {
            repo: &fx.repo,
            encode: EncodeOptions::default(),
            previous: &HashMap::new(),
            paths: &["global/pg_control"],
            limiter: None,
            progress: &progress,
            jobs: 1,
            known: None,
        };
        let mut objects = HashMap::new();
        let copied = copy_stable(&ctx, &job, &mut objects).unwrap();
        assert_eq!(fx.read_back(&copied), content);
        assert!(
            matches!(&copied, Copied::Stored { data: FileData::Chunks { chunks }, size: 8192 } if chunks.len() == 1)
        );
        assert_eq!(objects.values().filter(|u| u.created).count(), 1);
        let gone = FileJob { path: fx.dir.join("data/none"), ..job };
        assert_eq!(copy_stable(&ctx, &gone, &mut objects).unwrap(), Copied::Vanished);
    }

    #[test]
    fn bundles_close_at_target() {
        let fx = Fixture::new("bundles");
        let n = (BUNDLE_TARGET / BUNDLE_FILE_MAX) as usize + 4;
        let names: Vec<String> = (0..n).map(|i| format!("f{i:03}")).collect();
        let contents: Vec<Vec<u8>> = (0..n).map(|i| pattern(BUNDLE_FILE_MAX as usize, i as u32 + 10)).collect();
        let jobs: Vec<FileJob> = (0..n).map(|i| fx.file(i, &names[i], &contents[i], BUNDLE_FILE_MAX)).collect();
        let paths: Vec<&str> = names.iter().map(String::as_str).collect();
        let r = fx.copy(&jobs, &paths, &HashMap::new(), 1);
        let mut bundles = std::collections::BTreeSet::new();
        for (c, content) in r.files.iter().zip(&contents) {
            let c = c.as_ref().unwrap();
            assert_eq!(&fx.read_back(c), content);
            if let Copied::Stored { data: FileData::Bundled { bundle, offset, .. }, .. } = c {
                bundles.insert(*bundle);
                assert!(*offset < BUNDLE_TARGET);
            }
        }
        // One thread: a full bundle, then one with the rest.
        assert_eq!(bundles.len(), 2);
    }
}
