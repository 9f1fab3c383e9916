//! archive-fetch: one WAL file from the repository to PostgreSQL.
//!
//! One GET finds and verifies the file; it reaches `%p` only complete and
//! verified (written under a temporary name, then renamed). "Not in the
//! archive" is a normal answer; anything else is an error, which the binary
//! turns into an exit code that stops recovery instead of ending it early.

use std::path::{Path, PathBuf};

use walvault_formats::object::{self, ContentHash, DecodeToError, Decoder};
use walvault_formats::wal::WalFileName;

use crate::config::{Config, FetchOnError};
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::StorageError;

/// The answer to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The file is at `%p`, verified.
    Restored,
    /// The archive does not have it (and the repository is there).
    Missing,
}

/// What the binary should tell PostgreSQL after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAnswer {
    /// Stop recovery: PostgreSQL aborts on an exit code above 125.
    Abort,
    /// Say "not available"; PostgreSQL (a standby) asks again later.
    Retry,
}

/// Decides how to answer an error. In `auto` mode, a data directory with
/// `standby.signal` (PostgreSQL runs `restore_command` in the data
/// directory, so `cwd` is it) is a standby: it never ends recovery because a
/// file is unavailable, it retries, so "retry" keeps it alive through a
/// repository outage. Anything else (archive recovery, PITR) must abort: a
/// "missing" answer would end recovery early and promote, silently losing
/// the rest of the history.
pub fn error_answer(mode: FetchOnError, cwd: Option<&Path>) -> ErrorAnswer {
    match mode {
        FetchOnError::Abort => ErrorAnswer::Abort,
        FetchOnError::Retry => ErrorAnswer::Retry,
        FetchOnError::Auto => {
            if cwd.is_some_and(|d| d.join("standby.signal").exists()) {
                ErrorAnswer::Retry
            } else {
                ErrorAnswer::Abort
            }
        }
    }
}

/// The temporary a file is written to before it is renamed to `dest`.
pub(crate) fn temp_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".walvault-tmp");
    dest.with_file_name(name)
}

/// The answer of [`fetch_all`]: the outcome, and what went wrong on the way
/// in repositories that did not give the file.
#[derive(Debug)]
pub struct FetchReport {
    /// Restored, missing, or the error that decides the answer.
    pub result: Result<FetchOutcome>,
    /// One line per repository that failed before another answered; empty
    /// with a single repository.
    pub notes: Vec<String>,
}

/// Fetches WAL file `name` (PostgreSQL's `%f`) to `dest` (`%p`) from the
/// first repository, in priority order, that has it.
///
/// # Errors
/// An invalid name, an unusable repository, an object that cannot be read
/// or fails verification (`dest` is then not created), or a failure to
/// write `dest`. With several repositories, an error only when none gave
/// the file and at least one failed: see [`fetch_all`].
pub fn fetch(config: &Config, name: &str, dest: &Path) -> Result<FetchOutcome> {
    fetch_all(config, name, dest).result
}

/// [`fetch`], with the notes about repositories that failed. Repositories
/// are tried in priority order; the first that restores the file wins.
/// "Missing" is answered only when every repository says so: a repository
/// that fails (unreachable, a corrupt object) may hold the file, so the
/// answer is then that failure, never "missing" (DESIGN.md invariant 5).
pub fn fetch_all(config: &Config, name: &str, dest: &Path) -> FetchReport {
    if !config.is_multi() {
        return FetchReport { result: fetch_one(config, name, dest), notes: Vec::new() };
    }
    let mut notes = Vec::new();
    let mut failure = None;
    for view in config.each() {
        let spec = &view.repositories[0];
        match fetch_one(&view, name, dest) {
            Ok(FetchOutcome::Restored) => return FetchReport { result: Ok(FetchOutcome::Restored), notes },
            Ok(FetchOutcome::Missing) => {}
            Err(e @ (Error::Name(_) | Error::Write { .. })) => {
                // Not the repository's fault: another one will not help.
                return FetchReport { result: Err(e), notes };
            }
            Err(e) => {
                notes.push(format!("repository '{}' could not give '{name}': {e}", spec.name));
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => {
            // The first failure is the answer; the notes keep the others.
            notes.remove(0);
            FetchReport { result: Err(e), notes }
        }
        None => FetchReport { result: Ok(FetchOutcome::Missing), notes },
    }
}

/// [`fetch`] from the one repository of `config`.
fn fetch_one(config: &Config, name: &str, dest: &Path) -> Result<FetchOutcome> {
    let name: WalFileName = name.parse()?;
    if dest.as_os_str().is_empty() {
        return Err(Error::Setting("the destination path (%p) is empty".into()));
    }
    let repo = Repository::open_config(config)?;
    Ok(match restore_from(&repo, &name, dest, None)? {
        Some(_) => FetchOutcome::Restored,
        None => FetchOutcome::Missing,
    })
}

/// [`fetch_all`] over repositories opened once (the prefetch worker's
/// downloads), with the same fallback rules: the first repository, in the
/// order given, that restores the file wins; "missing" only when every one
/// says so. Returns the BLAKE3 of the restored plaintext, `None` for
/// missing, and the notes about repositories that failed. Decodes with
/// `decoder` (one thread, reused buffers: the worker's CPU is shared with
/// replay) and every check but the plaintext's BLAKE3: the returned hash
/// is the object's claim, which the handover verifies (invariant 4).
pub(crate) fn fetch_from(
    repos: &[(String, Repository)],
    name: &WalFileName,
    dest: &Path,
    decoder: &mut Decoder,
) -> (Result<Option<ContentHash>>, Vec<String>) {
    let mut notes = Vec::new();
    let mut failure = None;
    for (repo_name, repo) in repos {
        match restore_from(repo, name, dest, Some(&mut *decoder)) {
            Ok(Some(hash)) => return (Ok(Some(hash)), notes),
            Ok(None) => {}
            Err(e @ Error::Write { .. }) => return (Err(e), notes),
            Err(e) => {
                notes.push(format!("repository '{repo_name}' could not give '{name}': {e}"));
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => {
            notes.remove(0);
            (Err(e), notes)
        }
        None => (Ok(None), notes),
    }
}

/// Restores `name` from `repo` to `dest`, verified; the BLAKE3 of the
/// plaintext, or `None` when the repository (which answers) lacks it.
/// Without a `decoder`, decodes and verifies with [`object::decode_to`]
/// (parallel frames: lowest wall time for a single file); with one, the
/// plaintext's BLAKE3 is left to the caller (see [`fetch_from`]).
fn restore_from(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
    decoder: Option<&mut Decoder>,
) -> Result<Option<ContentHash>> {
    let key = repo.wal_key(name);
    let stored = match repo.storage().get(&key) {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound { .. }) => {
            // Only a repository that is really there may answer "missing":
            // an unmounted file system or a typo in the path must not end
            // recovery early.
            repo.cluster_info()?;
            return Ok(None);
        }
        Err(source) => {
            return Err(Error::Storage { op: "read", name: name.to_string(), repo: repo.location(), source });
        }
    };
    let corrupt = |source| Error::Corrupt { name: name.to_string(), repo: repo.location(), source };
    let tmp = temp_path(dest);
    let mut file = std::fs::File::create(&tmp).map_err(|source| Error::Write { path: dest.to_path_buf(), source })?;
    // The plaintext streams into the temporary while it is decompressed and
    // hashed; the temporary becomes `dest` only if every check passed.
    // No fsync: PostgreSQL reads the file at once, and after a crash it
    // asks for it again. The rename only makes it appear whole.
    let decoded = match decoder {
        // The prefetch worker: its caller checks the plaintext's BLAKE3
        // against the returned hash at the handover (one hash per segment).
        Some(decoder) => decoder.decode_to_hash_deferred(&stored, &mut file),
        None => object::decode_to(&stored, &mut file),
    };
    let decoded = decoded.map_err(|e| match e {
        DecodeToError::Object(source) => corrupt(source),
        DecodeToError::Write(source) => Error::Write { path: dest.to_path_buf(), source },
    });
    drop(file);
    let renamed = decoded.and_then(|header| {
        std::fs::rename(&tmp, dest)
            .map(|()| header.hash)
            .map_err(|source| Error::Write { path: dest.to_path_buf(), source })
    });
    match renamed {
        Ok(hash) => Ok(Some(hash)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_abort_recovery_except_on_a_standby() {
        let dir = std::env::temp_dir().join(format!("walvault-fetch-answer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(error_answer(FetchOnError::Auto, Some(&dir)), ErrorAnswer::Abort);
        assert_eq!(error_answer(FetchOnError::Auto, None), ErrorAnswer::Abort);
        std::fs::write(dir.join("recovery.signal"), b"").unwrap();
        assert_eq!(error_answer(FetchOnError::Auto, Some(&dir)), ErrorAnswer::Abort);
        std::fs::write(dir.join("standby.signal"), b"").unwrap();
        assert_eq!(error_answer(FetchOnError::Auto, Some(&dir)), ErrorAnswer::Retry);
        assert_eq!(error_answer(FetchOnError::Abort, Some(&dir)), ErrorAnswer::Abort);
        assert_eq!(error_answer(FetchOnError::Retry, None), ErrorAnswer::Retry);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
