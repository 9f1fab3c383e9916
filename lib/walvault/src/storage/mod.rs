//! Storage: opaque keys and bytes behind one trait. Storage knows nothing
//! about WAL; the repository layer decides what the keys mean.
//!
//! The contract every backend keeps is written once, here, on [`Storage`].

pub mod fs;
pub mod s3;

use std::fmt;
use std::io;

use thiserror::Error;

/// What a listing or a completed write knows about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// The outcome of a create-once write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and is now durably stored.
    Created(ObjectMeta),
    /// An object already existed under the key; it was left untouched and
    /// the new bytes were discarded.
    Exists,
}

/// A storage failure, carrying the key it concerns.
#[derive(Debug, Error)]
pub enum StorageError {
    /// No object under this key. This is an answer, not a failure: callers
    /// decide whether a missing object is expected.
    #[error("'{key}' does not exist")]
    NotFound {
        /// The key asked for.
        key: String,
    },
    /// The key is not acceptable to the storage (empty, `..`, reserved).
    #[error("invalid storage key '{key}': {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The operation failed; see [`StorageError::is_transient`].
    #[error("{source}")]
    Io {
        /// The key the operation was on.
        key: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    /// Whether retrying the same call later may succeed: a full disk, a
    /// timeout, an interrupted connection. Permission errors and invalid
    /// keys are permanent until someone changes something.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::NotFound { .. } | StorageError::InvalidKey { .. } => false,
            StorageError::Io { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ),
        }
    }

    /// The underlying I/O error kind, if any.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            StorageError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// What the user can do about it, when the backend knows better than
    /// the error kind alone (an object store that refused the credentials
    /// is not a directory with the wrong owner).
    pub fn hint(&self) -> Option<String> {
        match self {
            StorageError::Io { source, .. } => {
                source.get_ref().and_then(|e| e.downcast_ref::<Fault>()).and_then(|f| f.hint.clone())
            }
            _ => None,
        }
    }
}

/// A backend's description of a failure, carried inside
/// [`StorageError::Io`]: one line of text, and advice for the `HINT:` line
/// that [`StorageError::hint`] returns.
#[derive(Debug)]
pub struct Fault {
    /// What failed, where (never a secret).
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fault {}

/// How a backend makes [`Storage::put_new`] create-once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionalCreate {
    /// The store decides atomically (`If-None-Match: *` honoured, or a
    /// rename that never replaces): two concurrent writers of one key
    /// cannot both win.
    Trust,
    /// The store ignores conditional create: look first (HEAD) and write
    /// only if absent, still asking for a conditional write. This leaves a
    /// race: two writers of the same key between one's HEAD and its PUT
    /// both write, and the last one wins.
    CheckFirst,
}

/// A place that stores objects under keys: a local directory, an object
/// store bucket.
///
/// Keys are `/`-separated relative paths of ASCII letters, digits, `.`, `_`
/// and `-`; no component is empty, `.` or `..`, or starts with `.wvtmp`
/// (reserved for temporaries). Every method is safe to call from several
/// processes at once.
pub trait Storage: Send + Sync {
    /// Where this storage is, for messages (`/mnt/nas/wal`). Never contains
    /// secrets.
    fn location(&self) -> String;

    /// Stores `data` under `key` only if no object exists there (create-once).
    ///
    /// Returns [`PutOutcome::Created`] only once the object is durable: on a
    /// local disk, written to a temporary name, fsynced, renamed without
    /// replacing, and its directory fsynced. An existing object is never
    /// modified; [`PutOutcome::Exists`] is returned instead and the caller
    /// compares contents. A failed or interrupted put leaves no visible
    /// object and no partial content under `key`.
    ///
    /// # Errors
    /// [`StorageError::Io`] for any failure (full disk, permissions,
    /// unreachable store); the error says whether it is transient.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<PutOutcome, StorageError>;

    /// Replaces the object under `key` with `data`, atomically: readers see
    /// the old or the new object, never a mix. Used only to repair an object
    /// that failed verification with a copy of the same content; everything
    /// else is create-once ([`Storage::put_new`]). Durable on return, as
    /// `put_new`.
    ///
    /// # Errors
    /// [`StorageError::Io`] for any failure; the old object is then intact.
    fn put_replace(&self, key: &str, data: &[u8]) -> Result<ObjectMeta, StorageError>;

    /// Reads a whole object.
    ///
    /// # Errors
    /// [`StorageError::NotFound`] when no object exists under `key` (and
    /// only then); [`StorageError::Io`] when it exists but cannot be read or
    /// the storage cannot be reached.
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError>;

    /// Reads at most `len` bytes starting at `offset` (fewer if the object
    /// is shorter), for instance an envelope header.
    ///
    /// # Errors
    /// As [`Storage::get`].
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError>;

    /// Size and modification time of an object, or `None` if it does not
    /// exist.
    ///
    /// # Errors
    /// [`StorageError::Io`] when the storage cannot answer.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;

    /// Every object whose key starts with `prefix` (a key prefix ending in
    /// `/`, or empty for all), in no particular order. Temporaries of writes
    /// in progress are never listed; stale temporaries left by killed
    /// processes are removed along the way. Listing is for maintenance
    /// (catalog rebuild, verify), never for the per-segment path.
    ///
    /// # Errors
    /// [`StorageError::Io`] when the storage cannot be read.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError>;

    /// Deletes an object. Deleting a missing object succeeds.
    ///
    /// # Errors
    /// [`StorageError::Io`] when the object exists and cannot be deleted.
    fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Whether the store itself refuses a second create of a key (what
    /// [`ConditionalCreate::Trust`] relies on), found by trying: a unique
    /// probe object is created, created again with other bytes, read back
    /// and deleted. Costs a few requests; meant for `init` and `check`,
    /// never for the per-segment path. A local directory always honours it
    /// (a rename that never replaces), so the default answers `true`
    /// without I/O.
    ///
    /// # Errors
    /// [`StorageError::Io`] when the probe cannot be written or read.
    fn probe_conditional_create(&self) -> Result<bool, StorageError> {
        Ok(true)
    }

    /// Chooses how [`Storage::put_new`] enforces create-once from now on.
    /// Backends whose create-once cannot be fooled ignore it (the default).
    fn set_conditional_create(&self, _mode: ConditionalCreate) {}

    /// How [`Storage::put_new`] enforces create-once now.
    fn conditional_create(&self) -> ConditionalCreate {
        ConditionalCreate::Trust
    }
}

/// Checks a key against the rules on [`Storage`].
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let bad = |reason| Err(StorageError::InvalidKey { key: key.to_string(), reason });
    if key.is_empty() {
        return bad("empty key");
    }
    if key.len() > 1024 {
        return bad("key longer than 1024 bytes");
    }
    for part in key.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("empty, '.' or '..' path component");
        }
        if part.starts_with(TEMP_PREFIX) {
            return bad("component reserved for temporaries");
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
            return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
        }
    }
    Ok(())
}

/// Names of temporaries start with this; they are never valid keys.
pub const TEMP_PREFIX: &str = ".wvtmp";

impl fmt::Debug for dyn Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Storage({})", self.location())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["a", "main/wal/0000000100000000/000000010000000000000001", "x.y_z-1"] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/a", "a/", "a//b", "../a", "a/./b", ".wvtmp-1-x", "a/.wvtmp", "a b", "ä"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }
}
