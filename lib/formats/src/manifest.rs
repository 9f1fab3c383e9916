//! The backup manifest: everything needed to restore one base backup, and
//! nothing else. It is stored (as JSON, in an envelope) at
//! `<cluster>/backups/<id>/manifest` and written last, so a backup exists
//! exactly when its manifest does.
//!
//! File contents live in content-addressed data objects
//! (`<cluster>/data/<hh>/<blake3>`): a large file is a list of
//! [`ChunkRef`]s (fixed-size pieces, [`CHUNK_SIZE`] by default, so that a
//! page changed in place changes one chunk), a small file is a byte range
//! of a *bundle* object that packs many small files ([`FileData::Bundled`]).
//! An object is shared by every backup whose files contain the same bytes.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::object::ContentHash;
use crate::wal::Lsn;

/// Manifest format version this code writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Default size of the pieces large files are cut into: 1 MiB is 128
/// PostgreSQL pages, small enough that a localized change re-uploads little
/// and large enough that a 1 TiB cluster is about a million objects.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// Files up to this size are packed into bundles rather than stored as
/// objects of their own.
pub const BUNDLE_FILE_MAX: u64 = 128 * 1024;

/// Bundles are closed once they reach this size.
pub const BUNDLE_TARGET: u64 = 8 << 20;

/// A content hash, serialized as 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl From<ContentHash> for Hash {
    fn from(h: ContentHash) -> Hash {
        Hash(h.0)
    }
}

impl From<Hash> for ContentHash {
    fn from(h: Hash) -> ContentHash {
        ContentHash(h.0)
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        ContentHash(self.0).fmt(f)
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        ContentHash::from_hex(&s).map(Hash::from).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

mod lsn_str {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::wal::Lsn;

    pub fn serialize<S: Serializer>(l: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(l)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

mod u64_str {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One piece of a large file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the piece: the data object's name.
    pub hash: Hash,
    /// Length of the piece.
    pub len: u64,
}

/// Where a file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileData {
    /// A zero-length file.
    Empty,
    /// The file is these pieces, in order.
    Chunks {
        /// The pieces; their lengths add up to the file's size.
        chunks: Vec<ChunkRef>,
    },
    /// The file is `len` bytes at `offset` of bundle object `bundle`.
    Bundled {
        /// The bundle's data object.
        bundle: Hash,
        /// Where the file starts inside the bundle's plaintext.
        offset: u64,
        /// The file's length.
        len: u64,
        /// BLAKE3 of the file itself (restore verifies it; the next
        /// backup reuses the range when the file is unchanged).
        hash: Hash,
    },
}

/// What kind of entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file and where its bytes are.
    File {
        /// The content.
        data: FileData,
    },
    /// A symbolic link (other than a tablespace link) and its target.
    Link {
        /// What it points to.
        target: String,
    },
}

/// One entry of the data directory or a tablespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the data directory, `/`-separated. Tablespace
    /// contents are under `pg_tblspc/<oid>/`.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    /// Size in bytes (0 for directories and links).
    pub size: u64,
    /// Modification time, ms since the epoch.
    pub mtime_ms: i64,
    /// Directory, file or link.
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// A tablespace in the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// Its OID: the name of its link in `pg_tblspc`.
    pub oid: u32,
    /// Its name (from `pg_tablespace`), for messages.
    pub name: String,
    /// Where it was on the backed-up host.
    pub location: String,
}

/// Sizes of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Number of regular files.
    pub files: u64,
    /// Bytes of the files (what a restore writes).
    pub bytes: u64,
    /// Stored bytes of all distinct data objects the backup refers to.
    pub stored_bytes: u64,
    /// Stored bytes of the data objects this backup created (not shared
    /// with an earlier backup).
    pub new_bytes: u64,
    /// Number of data objects this backup created.
    pub new_objects: u64,
}

/// Everything about one base backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Backup identifier (`20261121T143000Z`).
    pub id: String,
    /// Cluster name within the repository.
    pub cluster: String,
    /// System identifier of the PostgreSQL cluster.
    #[serde(with = "u64_str")]
    pub system_identifier: u64,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// Timeline the backup was taken on.
    pub timeline: u32,
    /// `pg_backup_start`'s LSN: replay starts from the checkpoint there.
    #[serde(with = "lsn_str")]
    pub start_lsn: Lsn,
    /// `pg_backup_stop`'s LSN: the cluster is consistent once replay gets here.
    #[serde(with = "lsn_str")]
    pub stop_lsn: Lsn,
    /// When the backup started, ms since the epoch.
    pub start_time_ms: i64,
    /// When `pg_backup_stop` returned (the consistency point), ms since the epoch.
    pub stop_time_ms: i64,
    /// First WAL segment recovery needs.
    pub start_wal: String,
    /// Last WAL segment needed for consistency.
    pub stop_wal: String,
    /// The next full transaction id after `pg_backup_stop`: any
    /// transaction from this one on committed after the consistency point.
    #[serde(with = "u64_str")]
    pub next_xid: u64,
    /// `backup_label` as returned by `pg_backup_stop`.
    pub backup_label: String,
    /// `tablespace_map` as returned by `pg_backup_stop` (empty without tablespaces).
    pub tablespace_map: String,
    /// Tablespaces.
    pub tablespaces: Vec<Tablespace>,
    /// The piece size large files were cut into.
    pub chunk_size: u64,
    /// Every directory, file and link, parents before children.
    pub entries: Vec<Entry>,
    /// Sizes.
    pub totals: Totals,
    /// The version of walvault that took the backup.
    pub walvault_version: String,
}

/// Why bytes are not a manifest this code can use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("not a backup manifest: {0}")]
    Syntax(String),
    /// A newer format.
    #[error("manifest format {0} is not supported (this walvault reads format {MANIFEST_FORMAT}); upgrade walvault")]
    Format(u32),
    /// Inconsistent content.
    #[error("manifest entry '{path}': {reason}")]
    Invalid {
        /// The entry.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Whether a manifest path is safe to join to a restore directory: relative,
/// no empty, `.` or `..` component, no NUL.
pub fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

impl Manifest {
    /// Serializes to JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a manifest: format, safe paths, sizes that add up.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        if probe.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(probe.format));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let bad = |e: &Entry, reason| Err(ManifestError::Invalid { path: e.path.clone(), reason });
        let mut seen = BTreeSet::new();
        for e in &self.entries {
            if !is_safe_path(&e.path) {
                return bad(e, "unsafe path");
            }
            if !seen.insert(e.path.as_str()) {
                return bad(e, "listed twice");
            }
            if let EntryKind::File { data } = &e.kind {
                let len = match data {
                    FileData::Empty => 0,
                    FileData::Chunks { chunks } => chunks.iter().map(|c| c.len).sum(),
                    FileData::Bundled { len, .. } => *len,
                };
                if len != e.size {
                    return bad(e, "size differs from the sum of its pieces");
                }
            }
        }
        Ok(())
    }

    /// Every data object the backup refers to, each once.
    pub fn objects(&self) -> BTreeSet<Hash> {
        let mut out = BTreeSet::new();
        for e in &self.entries {
            if let EntryKind::File { data } = &e.kind {
                match data {
                    FileData::Empty => {}
                    FileData::Chunks { chunks } => out.extend(chunks.iter().map(|c| c.hash)),
                    FileData::Bundled { bundle, .. } => {
                        out.insert(*bundle);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let h = |b: u8| Hash([b; 32]);
        Manifest {
            format: MANIFEST_FORMAT,
            id: "20261121T143000Z".into(),
            cluster: "main".into(),
            system_identifier: u64::MAX - 1,
            pg_version: 15,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: Lsn(0x3000028),
            stop_lsn: Lsn(0x3000100),
            start_time_ms: 1,
            stop_time_ms: 2,
            start_wal: "000000010000000000000003".into(),
            stop_wal: "000000010000000000000003".into(),
            next_xid: 740,
            backup_label: "START WAL LOCATION: 0/3000028\n".into(),
            tablespace_map: String::new(),
            tablespaces: vec![],
            chunk_size: CHUNK_SIZE,
            entries: vec![
                Entry { path: "base".into(), mode: 0o700, size: 0, mtime_ms: 5, kind: EntryKind::Dir },
                Entry {
                    path: "base/1/1259".into(),
                    mode: 0o600,
                    size: 3,
                    mtime_ms: 5,
                    kind: EntryKind::File {
                        data: FileData::Chunks {
                            chunks: vec![ChunkRef { hash: h(1), len: 2 }, ChunkRef { hash: h(2), len: 1 }],
                        },
                    },
                },
                Entry {
                    path: "PG_VERSION".into(),
                    mode: 0o600,
                    size: 3,
                    mtime_ms: 5,
                    kind: EntryKind::File { data: FileData::Bundled { bundle: h(3), offset: 10, len: 3, hash: h(4) } },
                },
                Entry {
                    path: "postmaster.opts.x".into(),
                    mode: 0o600,
                    size: 0,
                    mtime_ms: 5,
                    kind: EntryKind::File { data: FileData::Empty },
                },
            ],
            totals: Totals::default(),
            walvault_version: "0.1.0".into(),
        }
    }

    #[test]
    fn round_trips_and_lists_objects() {
        let m = sample();
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.objects().len(), 3);
        let text = String::from_utf8(m.to_json()).unwrap();
        assert!(text.contains("\"system_identifier\":\"18446744073709551614\""), "{text}");
        assert!(text.contains("\"start_lsn\":\"0/3000028\""), "{text}");
    }

    #[test]
    fn refuses_unsafe_or_inconsistent() {
        for path in ["../etc/passwd", "/etc/passwd", "a//b", "a/./b", ""] {
            let mut m = sample();
            m.entries[0].path = path.into();
            assert!(matches!(Manifest::from_json(&m.to_json()), Err(ManifestError::Invalid { .. })), "{path:?}");
        }
        let mut m = sample();
        m.entries[1].size = 4;
        assert!(Manifest::from_json(&m.to_json()).is_err());
        let mut m = sample();
        m.format = 2;
        assert_eq!(Manifest::from_json(&m.to_json()), Err(ManifestError::Format(2)));
        assert!(Manifest::from_json(b"{\"format\":1}").is_err());
        assert!(Manifest::from_json(b"garbage").is_err());
    }
}
