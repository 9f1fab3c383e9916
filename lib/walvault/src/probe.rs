//! The conditional-create probe: does the repository's object store refuse
//! a second create of the same key (`If-None-Match: *`), as create-once
//! (invariant 2) relies on? Some S3-compatible stores (Garage 2.5) ignore
//! the header and overwrite.
//!
//! [`probe_and_record`] (run by `walvault init` and `walvault check`) tries
//! it on the store and records the answer twice: in the repository
//! (`walvault.store-probe`, so that every host using the repository can
//! learn it) and in the local catalog (so that archive-push learns it
//! without a network request). [`configure_for_push`] then chooses how
//! `put_new` enforces create-once, from the `conditional-create` setting
//! and that record:
//!
//! - honoured: [`ConditionalCreate::Trust`], one conditional PUT per file,
//!   atomic;
//! - ignored: [`ConditionalCreate::CheckFirst`], a HEAD and then the PUT.
//!   A warning says what remains: two writers of the same key between one's
//!   HEAD and its PUT both write, the last one wins. For WAL that needs two
//!   servers archiving the same file name into the same repository at once.
//!
//! A local directory always honours create-once (a rename that never
//! replaces): nothing is probed or recorded for it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use walvault_formats::object::{self, Compression, EncodeOptions};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::repo::{Repository, now_ms};
use crate::storage::{ConditionalCreate, StorageError};

/// Key of the object recording the last probe, at the top of the
/// repository (next to `walvault.repository`).
pub const PROBE_RECORD_KEY: &str = "walvault.store-probe";

/// The `[s3] conditional-create` setting: how archive-push makes sure it
/// never overwrites an archived file on an object store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConditionalCreateSetting {
    /// Follow the recorded probe (the default): trust the store when it
    /// honours `If-None-Match: *`, check first when it does not or when no
    /// probe is recorded.
    #[default]
    Auto,
    /// Always trust `If-None-Match: *` (one request per file).
    Trust,
    /// Always look first (HEAD, then a conditional PUT).
    CheckFirst,
}

impl FromStr for ConditionalCreateSetting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ConditionalCreateSetting::Auto),
            "trust" => Ok(ConditionalCreateSetting::Trust),
            "check-first" => Ok(ConditionalCreateSetting::CheckFirst),
            other => Err(format!("conditional-create is '{other}', expected auto, trust or check-first")),
        }
    }
}

impl fmt::Display for ConditionalCreateSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConditionalCreateSetting::Auto => "auto",
            ConditionalCreateSetting::Trust => "trust",
            ConditionalCreateSetting::CheckFirst => "check-first",
        })
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The repository probed.
    pub repository: String,
    /// Whether the store refused the second create (`If-None-Match: *`
    /// honoured).
    pub honoured: bool,
    /// When, ms since the epoch.
    pub probed_at_ms: i64,
    /// How `put_new` enforces create-once from now on.
    pub mode: ConditionalCreate,
    /// What the operator should know: the fallback and its race, a record
    /// that could not be written.
    pub warnings: Vec<String>,
}

/// The stored form of a probe (`walvault.store-probe`).
#[derive(Debug, Serialize, Deserialize)]
struct ProbeDoc {
    format: u32,
    /// `honoured` or `ignored`.
    conditional_create: String,
    probed_at_ms: i64,
}

/// The warning for a store that ignores conditional create.
pub fn ignored_warning(repository: &str) -> String {
    format!(
        "the object store of repository '{repository}' ignores conditional create (If-None-Match: *): walvault \
         falls back to check-then-write (HEAD, then PUT), which leaves a race: two servers archiving the same \
         file name into this repository at the same moment can both write it, and the last write wins"
    )
}

/// Probes the repository's store, records the answer in the repository and
/// in `catalog` (when given), and sets the storage's create-once mode
/// accordingly. A local directory is not probed (it always honours
/// create-once) and nothing is recorded for it.
///
/// # Errors
/// [`Error::Storage`] when the probe cannot run (unreachable store,
/// refused credentials) or its record cannot be stored in the repository.
/// A catalog that cannot be updated is a warning, not an error.
pub fn probe_and_record(repo: &Repository, catalog: Option<&Catalog>) -> Result<ProbeReport> {
    let repository = repo.location();
    let probed_at_ms = now_ms();
    if !repo.is_object_store() {
        return Ok(ProbeReport {
            repository,
            honoured: true,
            probed_at_ms,
            mode: ConditionalCreate::Trust,
            warnings: Vec::new(),
        });
    }
    let storage_err =
        |op, source| Error::Storage { op, name: PROBE_RECORD_KEY.into(), repo: repository.clone(), source };
    let honoured = repo.storage().probe_conditional_create().map_err(|e| storage_err("probe", e))?;
    let doc = ProbeDoc {
        format: crate::repo::REPOSITORY_FORMAT,
        conditional_create: if honoured { "honoured" } else { "ignored" }.into(),
        probed_at_ms,
    };
    let json = serde_json::to_vec(&doc).map_err(|e| Error::Metadata {
        repo: repository.clone(),
        key: PROBE_RECORD_KEY.into(),
        detail: e.to_string(),
    })?;
    let opts = EncodeOptions { compression: Compression::Zstd, level: 3, workers: 0 };
    let (_, bytes) = object::encode(&json, &opts)
        .map_err(|e| storage_err("encode", StorageError::Io { key: PROBE_RECORD_KEY.into(), source: e }))?;
    // The record is replaced by each probe: it is a measurement, not
    // archived data.
    repo.storage().put_replace(PROBE_RECORD_KEY, &bytes).map_err(|e| storage_err("store", e))?;
    let mut warnings = Vec::new();
    if let Some(c) = catalog
        && let Err(e) = c.record_store_probe(&repository, honoured, probed_at_ms)
    {
        warnings
            .push(format!("the conditional-create probe is recorded in the repository but not in the catalog: {e}"));
    }
    let mode = if honoured { ConditionalCreate::Trust } else { ConditionalCreate::CheckFirst };
    repo.storage().set_conditional_create(mode);
    if !honoured {
        warnings.insert(0, ignored_warning(&repository));
    }
    Ok(ProbeReport { repository, honoured, probed_at_ms, mode, warnings })
}

/// The probe recorded in the repository, if any: whether the store honours
/// conditional create, and when that was found. One GET.
///
/// # Errors
/// [`Error::Storage`] when the record cannot be read; [`Error::Corrupt`] or
/// [`Error::Metadata`] when it is damaged.
pub fn recorded(repo: &Repository) -> Result<Option<(bool, i64)>> {
    let repository = repo.location();
    let bytes = match repo.storage().get(PROBE_RECORD_KEY) {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(source) => {
            return Err(Error::Storage { op: "read", name: PROBE_RECORD_KEY.into(), repo: repository, source });
        }
    };
    let (_, plain) = object::decode(&bytes).map_err(|source| Error::Corrupt {
        name: PROBE_RECORD_KEY.into(),
        repo: repository.clone(),
        source,
    })?;
    let bad = |detail: String| Error::Metadata { repo: repository.clone(), key: PROBE_RECORD_KEY.into(), detail };
    let doc: ProbeDoc = serde_json::from_slice(&plain).map_err(|e| bad(e.to_string()))?;
    match doc.conditional_create.as_str() {
        "honoured" => Ok(Some((true, doc.probed_at_ms))),
        "ignored" => Ok(Some((false, doc.probed_at_ms))),
        other => Err(bad(format!("conditional_create is '{other}', expected 'honoured' or 'ignored'"))),
    }
}

/// Sets how `repo`'s `put_new` enforces create-once for one archive-push,
/// and returns the warnings to print. Call it after opening the repository
/// and before the first `put_new`.
///
/// With `Auto` this costs no request when the catalog holds a probe of this
/// repository (the usual case: `walvault init` records one). Without one it
/// reads the repository's record (one GET) and copies it into the catalog,
/// so that the next push reads it locally; with no record anywhere (a
/// repository initialised by an older walvault) it checks first, and warns
/// that `walvault check` records a probe. Local directories are left alone.
pub fn configure_for_push(
    repo: &Repository,
    catalog: Option<&Catalog>,
    setting: ConditionalCreateSetting,
) -> Vec<String> {
    if !repo.is_object_store() {
        return Vec::new();
    }
    let repository = repo.location();
    let (mode, warnings) = match setting {
        ConditionalCreateSetting::Trust => (ConditionalCreate::Trust, Vec::new()),
        ConditionalCreateSetting::CheckFirst => (ConditionalCreate::CheckFirst, Vec::new()),
        ConditionalCreateSetting::Auto => {
            let cached = catalog.and_then(|c| c.store_probe(&repository).ok().flatten());
            let found = match cached {
                Some((honoured, _)) => Ok(Some(honoured)),
                None => recorded(repo).map(|r| {
                    if let (Some(c), Some((honoured, at))) = (catalog, r) {
                        // Best effort: without it the next push reads the
                        // repository's record again.
                        let _ = c.record_store_probe(&repository, honoured, at);
                    }
                    r.map(|(honoured, _)| honoured)
                }),
            };
            match found {
                Ok(Some(true)) => (ConditionalCreate::Trust, Vec::new()),
                Ok(Some(false)) => (ConditionalCreate::CheckFirst, vec![ignored_warning(&repository)]),
                Ok(None) => (
                    ConditionalCreate::CheckFirst,
                    vec![format!(
                        "no conditional-create probe is recorded for repository '{repository}': checking before \
                         each write (one more request per file) until 'walvault check' records one"
                    )],
                ),
                Err(e) => (
                    ConditionalCreate::CheckFirst,
                    vec![format!("unable to read the conditional-create probe, checking before writing: {e}")],
                ),
            }
        }
    };
    repo.storage().set_conditional_create(mode);
    warnings
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn settings_round_trip() {
        for s in ["auto", "trust", "check-first"] {
            assert_eq!(s.parse::<ConditionalCreateSetting>().unwrap().to_string(), s);
        }
        assert!("sometimes".parse::<ConditionalCreateSetting>().is_err());
        assert_eq!(ConditionalCreateSetting::default(), ConditionalCreateSetting::Auto);
    }

    #[test]
    fn a_local_repository_is_not_probed() {
        let dir = std::env::temp_dir().join(format!("walvault-probe-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let repo = Repository::open(&dir.display().to_string(), "main").unwrap();
        let r = probe_and_record(&repo, None).unwrap();
        assert!(r.honoured && r.warnings.is_empty());
        assert!(!dir.join(PROBE_RECORD_KEY).exists(), "nothing recorded for a local directory");
        assert!(configure_for_push(&repo, None, ConditionalCreateSetting::Auto).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_warning_names_the_header_the_fallback_and_the_race() {
        let w = ignored_warning("s3://b/p");
        for part in ["'s3://b/p'", "If-None-Match", "check-then-write", "race", "last write wins"] {
            assert!(w.contains(part), "{part}: {w}");
        }
    }
}
