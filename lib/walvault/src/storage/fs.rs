//! The local-directory backend: a key is a relative path under the root.
//!
//! Durability follows the POSIX recipe: write a temporary file in the
//! target directory, fsync it, rename it into place without replacing
//! (`renameat2(RENAME_NOREPLACE)`, or `link()` + `unlink()` on file systems
//! without it), then fsync the directory. A crash at any point leaves either
//! no object or the complete object, never a partial one; leftover
//! temporaries are invisible to readers and removed by [`Storage::list`].

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{ObjectMeta, PutOutcome, Storage, StorageError, TEMP_PREFIX, validate_key};

/// Temporaries older than this are assumed to belong to a killed process.
/// No single write takes an hour; a slower one would only lose its
/// temporary and fail, never publish a partial object.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// A repository in a local directory (or a mounted network file system).
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

impl FsStorage {
    /// Storage rooted at `root`. Nothing is touched until the first call.
    pub fn new(root: impl Into<PathBuf>) -> FsStorage {
        FsStorage { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes `data` to a temporary beside `path`, fsyncs it, publishes it
    /// with `publish` (which returns false if it declined, for create-once),
    /// and fsyncs the directory. Returns the new object's metadata, or
    /// `None` if `publish` declined. Nothing partial is ever visible.
    fn write_durably(
        &self,
        key: &str,
        path: &Path,
        data: &[u8],
        publish: impl Fn(&Path, &Path) -> io::Result<bool>,
    ) -> Result<Option<ObjectMeta>, StorageError> {
        let err = io_err(key);
        let (Some(dir), Some(file_name)) = (path.parent(), path.file_name()) else {
            return Err(StorageError::InvalidKey { key: key.to_string(), reason: "no file name" });
        };
        ensure_dir(dir, &self.root).map_err(err)?;
        let tmp = dir.join(temp_name(&file_name.to_string_lossy()));
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            publish(&tmp, path)
        })();
        match written {
            Ok(true) => {}
            Ok(false) => {
                let _ = fs::remove_file(&tmp);
                return Ok(None);
            }
            Err(e) => {
                // Nothing partial may stay behind: the temporary goes, and
                // the final name was never touched.
                let _ = fs::remove_file(&tmp);
                return Err(io_err(key)(e));
            }
        }
        sync_dir(dir).map_err(io_err(key))?;
        let meta = fs::metadata(path).map_err(io_err(key))?;
        Ok(Some(ObjectMeta { key: key.to_string(), size: meta.len(), modified_ms: mtime_ms(&meta) }))
    }
}

fn io_err(key: &str) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { key: key.to_string(), source }
}

fn mtime_ms(meta: &fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// fsyncs a directory so that a rename or creation inside it survives a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing each parent whose
/// entries changed. Costs one `mkdir` when the directory already exists.
fn ensure_dir(dir: &Path, root: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir != root => {
            let parent = dir.parent().ok_or(e)?;
            ensure_dir(parent, root)?;
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Renames `from` to `to` unless `to` exists. Returns `Ok(false)` if it
/// exists. Atomic: another process sees either no `to` or the whole file.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive
    // the call; AT_FDCWD makes the paths resolve as with rename().
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // The file system (NFS, CIFS, older kernels) lacks RENAME_NOREPLACE:
        // link() is create-once too, and atomic on POSIX file systems.
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => match fs::hard_link(from, to) {
            Ok(()) => {
                fs::remove_file(from)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
        _ => Err(e),
    }
}

fn temp_name(file_name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{TEMP_PREFIX}-{}-{nanos:09}-{file_name}", std::process::id())
}

impl Storage for FsStorage {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<PutOutcome, StorageError> {
        let path = self.path(key)?;
        // A cheap early answer for the common retry case; the rename below
        // stays the real create-once guard against races.
        if path.exists() {
            return Ok(PutOutcome::Exists);
        }
        match self.write_durably(key, &path, data, rename_noreplace)? {
            Some(meta) => Ok(PutOutcome::Created(meta)),
            None => Ok(PutOutcome::Exists),
        }
    }

    fn put_replace(&self, key: &str, data: &[u8]) -> Result<ObjectMeta, StorageError> {
        let path = self.path(key)?;
        let replace = |from: &Path, to: &Path| fs::rename(from, to).map(|()| true);
        self.write_durably(key, &path, data, replace)?
            .ok_or_else(|| io_err(key)(io::Error::other("rename reported no replacement")))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.path(key)?;
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound { key: key.to_string() },
            _ => io_err(key)(e),
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let path = self.path(key)?;
        let read = || -> io::Result<Vec<u8>> {
            let mut f = File::open(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.take(len).read_to_end(&mut buf)?;
            Ok(buf)
        };
        read().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound { key: key.to_string() },
            _ => io_err(key)(e),
        })
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                Ok(Some(ObjectMeta { key: key.to_string(), size: m.len(), modified_ms: mtime_ms(&m) }))
            }
            Ok(_) => Err(io_err(key)(io::Error::other("not a regular file"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(key)(e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let start = if prefix.is_empty() {
            self.root.clone()
        } else {
            let dir = prefix.trim_end_matches('/');
            validate_key(dir)?;
            self.root.join(dir)
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(prefix)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(prefix))?;
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let ft = match entry.file_type() {
                    Ok(ft) => ft,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(prefix)(e)),
                };
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                // An entry can vanish between readdir and stat: a writer
                // renaming its temporary into place, an expire deleting.
                // It is not an error of the listing; it is just not there.
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(prefix)(e)),
                };
                if name.starts_with(TEMP_PREFIX) {
                    let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
                    if age > STALE_TEMP_AGE {
                        // Left by a killed writer: never renamed, so never
                        // visible; reclaim the space.
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else { continue };
                let key = rel.to_string_lossy().into_owned();
                if validate_key(&key).is_err() {
                    continue;
                }
                out.push(ObjectMeta { key, size: meta.len(), modified_ms: mtime_ms(&meta) });
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    sync_dir(dir).map_err(io_err(key))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walvault-fs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn create_once_get_head_list_delete() {
        let root = tempdir("basic");
        let s = FsStorage::new(&root);
        assert!(matches!(s.put_new("a/b/c", b"one").unwrap(), PutOutcome::Created(m) if m.size == 3));
        assert_eq!(s.put_new("a/b/c", b"two").unwrap(), PutOutcome::Exists);
        assert_eq!(s.get("a/b/c").unwrap(), b"one");
        assert_eq!(s.put_replace("a/b/c", b"won").unwrap().size, 3);
        assert_eq!(s.get("a/b/c").unwrap(), b"won");
        assert_eq!(s.get_range("a/b/c", 1, 10).unwrap(), b"on");
        assert!(matches!(s.get("a/b/x"), Err(StorageError::NotFound { .. })));
        assert_eq!(s.head("a/b/c").unwrap().unwrap().size, 3);
        assert!(s.head("nope").unwrap().is_none());
        let keys: Vec<String> = s.list("a/").unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["a/b/c".to_string()]);
        s.delete("a/b/c").unwrap();
        s.delete("a/b/c").unwrap();
        assert!(s.list("").unwrap().is_empty());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn temporaries_are_invisible_and_stale_ones_are_removed() {
        let root = tempdir("tmp");
        let s = FsStorage::new(&root);
        s.put_new("d/obj", b"x").unwrap();
        let fresh = root.join("d").join(format!("{TEMP_PREFIX}-1-000000001-obj2"));
        let stale = root.join("d").join(format!("{TEMP_PREFIX}-2-000000002-obj3"));
        fs::write(&fresh, b"partial").unwrap();
        fs::write(&stale, b"partial").unwrap();
        let old = SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60);
        File::options().write(true).open(&stale).unwrap().set_modified(old).unwrap();
        let keys: Vec<String> = s.list("").unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["d/obj".to_string()]);
        assert!(fresh.exists(), "a temporary in use must not be removed");
        assert!(!stale.exists(), "a stale temporary must be removed");
        assert!(matches!(s.get(".wvtmp-1-000000001-obj2"), Err(StorageError::InvalidKey { .. })));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn concurrent_creates_store_exactly_one() {
        let root = tempdir("race");
        let s = Arc::new(FsStorage::new(&root));
        for round in 0..20 {
            let key = format!("r/{round}");
            let handles: Vec<_> = (0..8u8)
                .map(|i| {
                    let s = Arc::clone(&s);
                    let key = key.clone();
                    std::thread::spawn(move || (i, s.put_new(&key, &[i; 1000]).unwrap()))
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<u8> =
                results.iter().filter(|(_, o)| matches!(o, PutOutcome::Created(_))).map(|(i, _)| *i).collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            assert_eq!(s.get(&key).unwrap(), vec![winners[0]; 1000]);
        }
        let left = fs::read_dir(root.join("r")).unwrap().count();
        assert_eq!(left, 20, "no temporaries may remain");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn link_fallback_is_create_once() {
        let root = tempdir("link");
        let (a, b) = (root.join("a"), root.join("b"));
        fs::write(&a, b"1").unwrap();
        fs::write(&b, b"2").unwrap();
        assert!(!rename_noreplace(&a, &b).unwrap());
        assert_eq!(fs::read(&b).unwrap(), b"2");
        fs::remove_dir_all(&root).unwrap();
    }
}
