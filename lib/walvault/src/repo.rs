//! The repository: where things live, which cluster they belong to, and the
//! create-once rules on top of [`Storage`].
//!
//! ```text
//! <root>/walvault.repository                     marker: {"format": 1}
//! <root>/<cluster>/cluster                       identity of the PostgreSQL cluster
//! <root>/<cluster>/wal/<TTTTTTTTLLLLLLLL>/<name> segments, .partial, .backup files
//! <root>/<cluster>/wal/history/<TTTTTTTT>.history
//! <root>/<cluster>/data/<hh>/<blake3>           content-addressed chunks and bundles
//! <root>/<cluster>/backups/<id>/manifest         one per complete backup, written last
//! <root>/<cluster>/backups/<id>/keep-forever     present: retention never deletes the backup
//! <root>/<cluster>/drills/<id>                   the outcome of a restore drill
//! <root>/<cluster>/gaps/<name>                   a WAL file dropped under queue-max
//! ```
//!
//! Every object is an envelope ([`walvault_formats::object`]). A WAL file's
//! key is computed from its name alone, so one GET finds it: no listing is
//! ever needed on the per-segment path.

use serde::{Deserialize, Serialize};
use walvault_formats::manifest::{Hash, Manifest};
use walvault_formats::object::{self, Compression, ContentHash, EncodeOptions};
use walvault_formats::wal::{ClusterIdentity, PgVersion, SystemId, WalFileName, WalSegmentSize};

use crate::catalog::DroppedWal;
use crate::config::S3Settings;
use crate::config::validate_cluster_name;
use crate::error::{Error, Result};
use crate::storage::fs::FsStorage;
use crate::storage::s3::S3Storage;
use crate::storage::{PutOutcome, Storage, StorageError};

/// Key of the marker object that makes a directory a repository.
pub const MARKER_KEY: &str = "walvault.repository";
/// Repository layout version written into the marker.
pub const REPOSITORY_FORMAT: u32 = 1;

/// A cluster name within a repository, bound to one PostgreSQL cluster.
pub struct Repository {
    storage: Box<dyn Storage>,
    cluster: String,
}

/// The stored identity of a cluster (`<cluster>/cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// The cluster name.
    pub name: String,
    /// System identifier, major version and segment size.
    pub identity: ClusterIdentity,
    /// When `walvault init` bound it, ms since the epoch.
    pub created_at_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct MarkerDoc {
    format: u32,
}

#[derive(Serialize, Deserialize)]
struct ClusterDoc {
    format: u32,
    name: String,
    /// A string: JSON numbers lose precision above 2^53.
    system_identifier: String,
    pg_version: u32,
    wal_segment_size: u64,
    created_at_ms: i64,
}

/// The outcome of one restore drill (`walvault drill`), as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// Identifier: the UTC start time, `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// The backup restored.
    pub backup: String,
    /// The recovery target, in words (`end of archive`, `time '…'`).
    pub target: String,
    /// When the drill started, ms since the epoch.
    pub started_at_ms: i64,
    /// When it finished.
    pub finished_at_ms: i64,
    /// Whether every check passed.
    pub ok: bool,
    /// Measured recovery time: from the start of the restore until the
    /// server accepted connections at the target, ms.
    pub rto_ms: i64,
    /// What was checked, or what failed.
    pub detail: String,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Repository {
    /// Opens the repository and cluster a configuration names, with its
    /// `[s3]` settings for `s3://` repositories.
    pub fn open_config(config: &crate::config::Config) -> Result<Repository> {
        Repository::open_with(&config.repository, &config.cluster, &config.s3)
    }

    /// Opens cluster `cluster` of the repository at `location` (an absolute
    /// directory path, or `s3://bucket/prefix` with default `[s3]`
    /// settings). Performs no I/O.
    pub fn open(location: &str, cluster: &str) -> Result<Repository> {
        Repository::open_with(location, cluster, &S3Settings::default())
    }

    /// Opens cluster `cluster` of the repository at `location`: an absolute
    /// directory path or `s3://bucket/prefix`. Performs no network I/O.
    pub fn open_with(location: &str, cluster: &str, s3: &S3Settings) -> Result<Repository> {
        validate_cluster_name(cluster)?;
        if location.starts_with("s3://") {
            let storage = S3Storage::open(location, s3).map_err(Error::Setting)?;
            return Ok(Repository { storage: Box::new(storage), cluster: cluster.to_string() });
        }
        if location.contains("://") {
            return Err(Error::UnsupportedRepository(location.to_string()));
        }
        if !location.starts_with('/') {
            return Err(Error::Setting(format!(
                "repository path '{location}' must be absolute (archive_command runs in the data directory)"
            )));
        }
        Ok(Repository { storage: Box::new(FsStorage::new(location)), cluster: cluster.to_string() })
    }

    /// A repository over any storage (tests, future backends).
    pub fn with_storage(storage: Box<dyn Storage>, cluster: &str) -> Result<Repository> {
        validate_cluster_name(cluster)?;
        Ok(Repository { storage, cluster: cluster.to_string() })
    }

    /// The storage underneath.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        self.storage.location()
    }

    /// Whether the repository is on an object store (`s3://`) rather than
    /// a local directory.
    pub fn is_object_store(&self) -> bool {
        self.location().starts_with("s3://")
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    fn cluster_key(&self) -> String {
        format!("{}/cluster", self.cluster)
    }

    /// The prefix under which all WAL of this cluster is stored.
    pub fn wal_prefix(&self) -> String {
        format!("{}/wal/", self.cluster)
    }

    /// The key of a WAL file, computed from its name alone.
    pub fn wal_key(&self, name: &WalFileName) -> String {
        match name.segment() {
            Some(seg) => format!("{}/wal/{}/{name}", self.cluster, seg.timeline_and_log()),
            None => format!("{}/wal/history/{name}", self.cluster),
        }
    }

    /// The key of the data object (chunk or bundle) whose plaintext hashes
    /// to `hash`: content-addressed, so equal bytes are stored once.
    pub fn data_key(&self, hash: &Hash) -> String {
        let hex = hash.to_string();
        format!("{}/data/{}/{hex}", self.cluster, &hex[..2])
    }

    /// The prefix under which all data objects are stored.
    pub fn data_prefix(&self) -> String {
        format!("{}/data/", self.cluster)
    }

    /// The prefix under which backup manifests are stored.
    pub fn backups_prefix(&self) -> String {
        format!("{}/backups/", self.cluster)
    }

    /// The key of backup `id`'s manifest.
    pub fn manifest_key(&self, id: &str) -> String {
        format!("{}/backups/{id}/manifest", self.cluster)
    }

    /// Stores a data object (create-once). `plain` must hash to `hash`.
    /// Returns the stored size when this call created it, `None` when it
    /// already existed (another backup stored the same bytes).
    pub fn put_data(&self, hash: &Hash, plain: &[u8], opts: &EncodeOptions) -> Result<Option<u64>> {
        let key = self.data_key(hash);
        let (_, bytes) = object::encode_hashed(plain, ContentHash::from(*hash), opts)
            .map_err(|e| self.storage_err("encode", &key, StorageError::Io { key: key.clone(), source: e }))?;
        match self.storage.put_new(&key, &bytes).map_err(|e| self.storage_err("store", &key, e))? {
            PutOutcome::Created(meta) => Ok(Some(meta.size)),
            PutOutcome::Exists => Ok(None),
        }
    }

    /// Whether a data object exists, and its stored size.
    pub fn head_data(&self, hash: &Hash) -> Result<Option<u64>> {
        let key = self.data_key(hash);
        Ok(self.storage.head(&key).map_err(|e| self.storage_err("read", &key, e))?.map(|m| m.size))
    }

    /// Reads a data object and checks that its plaintext hashes to `hash`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the object is damaged or holds other bytes;
    /// [`Error::Storage`] when it is missing or unreadable.
    pub fn get_data(&self, hash: &Hash) -> Result<Vec<u8>> {
        let key = self.data_key(hash);
        let bytes = self.storage.get(&key).map_err(|e| self.storage_err("read", &key, e))?;
        let (header, plain) = object::decode(&bytes).map_err(|source| Error::Corrupt {
            name: key.clone(),
            repo: self.location(),
            source,
        })?;
        if header.hash != ContentHash::from(*hash) {
            return Err(Error::Corrupt {
                name: key,
                repo: self.location(),
                source: object::ObjectError::Hash { actual: header.hash, expected: ContentHash::from(*hash) },
            });
        }
        Ok(plain)
    }

    /// Stores a backup's manifest (create-once): the backup exists from
    /// this moment. Returns the BLAKE3 of the stored plaintext.
    pub fn put_manifest(&self, m: &Manifest) -> Result<ContentHash> {
        let key = self.manifest_key(&m.id);
        let json = m.to_json();
        let opts = EncodeOptions { compression: Compression::Zstd, level: 3, workers: 0 };
        let (header, bytes) = object::encode(&json, &opts)
            .map_err(|e| self.storage_err("encode", &key, StorageError::Io { key: key.clone(), source: e }))?;
        match self.storage.put_new(&key, &bytes).map_err(|e| self.storage_err("store", &key, e))? {
            PutOutcome::Created(_) => Ok(header.hash),
            PutOutcome::Exists => Err(Error::Metadata {
                repo: self.location(),
                key,
                detail: "a backup with this id already exists".into(),
            }),
        }
    }

    /// Reads and checks backup `id`'s manifest; also returns the BLAKE3 of
    /// its plaintext.
    pub fn get_manifest(&self, id: &str) -> Result<(Manifest, ContentHash)> {
        let key = self.manifest_key(id);
        let bytes = self.storage.get(&key).map_err(|e| self.storage_err("read", &key, e))?;
        let (header, plain) = object::decode(&bytes).map_err(|source| Error::Corrupt {
            name: key.clone(),
            repo: self.location(),
            source,
        })?;
        let m = Manifest::from_json(&plain).map_err(|e| Error::Metadata {
            repo: self.location(),
            key: key.clone(),
            detail: e.to_string(),
        })?;
        if m.id != id || m.cluster != self.cluster {
            return Err(Error::Metadata {
                repo: self.location(),
                key,
                detail: format!("names backup '{}' of cluster '{}'", m.id, m.cluster),
            });
        }
        Ok((m, header.hash))
    }

    /// The key of backup `id`'s keep-forever mark.
    pub fn keep_forever_key(&self, id: &str) -> String {
        format!("{}/backups/{id}/keep-forever", self.cluster)
    }

    /// Sets (`keep`) or clears backup `id`'s keep-forever mark. Setting an
    /// existing mark or clearing an absent one is not an error.
    pub fn set_keep_forever(&self, id: &str, keep: bool) -> Result<()> {
        let key = self.keep_forever_key(id);
        if keep {
            #[derive(Serialize)]
            struct Mark {
                format: u32,
                marked_at_ms: i64,
            }
            self.put_meta(&key, &Mark { format: REPOSITORY_FORMAT, marked_at_ms: now_ms() }).map(|_| ())
        } else {
            match self.storage.delete(&key) {
                Ok(()) | Err(StorageError::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.storage_err("delete", &key, e)),
            }
        }
    }

    /// Backups that carry a keep-forever mark (one listing).
    pub fn keep_forever_marks(&self) -> Result<std::collections::BTreeSet<String>> {
        let prefix = self.backups_prefix();
        let listing = self.storage.list(&prefix).map_err(|e| self.storage_err("list", &prefix, e))?;
        Ok(listing
            .iter()
            .filter_map(|m| m.key.strip_prefix(&prefix)?.strip_suffix("/keep-forever").map(str::to_string))
            .filter(|id| !id.contains('/'))
            .collect())
    }

    /// Stores the outcome of a drill (create-once under its id).
    pub fn put_drill(&self, d: &DrillRecord) -> Result<()> {
        let key = format!("{}/drills/{}", self.cluster, d.id);
        match self.put_meta(&key, d)? {
            PutOutcome::Created(_) => Ok(()),
            PutOutcome::Exists => Err(Error::Metadata {
                repo: self.location(),
                key,
                detail: "a drill with this id already exists".into(),
            }),
        }
    }

    /// Records a dropped WAL file; a record already there is kept.
    pub fn put_gap(&self, g: &DroppedWal) -> Result<()> {
        self.put_meta(&self.gap_key(&g.name), g).map(|_| ())
    }

    /// The key of dropped WAL file `name`'s record.
    pub fn gap_key(&self, name: &str) -> String {
        format!("{}/gaps/{name}", self.cluster)
    }

    /// Every recorded dropped WAL file, in name order.
    pub fn list_gaps(&self) -> Result<Vec<DroppedWal>> {
        let prefix = format!("{}/gaps/", self.cluster);
        let listing = self.storage.list(&prefix).map_err(|e| self.storage_err("list", &prefix, e))?;
        let mut out: Vec<DroppedWal> =
            listing.iter().map(|m| self.get_meta::<DroppedWal>(&m.key)).collect::<Result<_>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every recorded drill, oldest first (one listing, one read each).
    pub fn list_drills(&self) -> Result<Vec<DrillRecord>> {
        let prefix = format!("{}/drills/", self.cluster);
        let listing = self.storage.list(&prefix).map_err(|e| self.storage_err("list", &prefix, e))?;
        let mut out: Vec<DrillRecord> =
            listing.iter().map(|m| self.get_meta::<DrillRecord>(&m.key)).collect::<Result<_>>()?;
        out.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        Ok(out)
    }

    /// Identifiers of every complete backup (those with a manifest), sorted.
    pub fn list_backups(&self) -> Result<Vec<String>> {
        let prefix = self.backups_prefix();
        let listing = self.storage.list(&prefix).map_err(|e| self.storage_err("list", &prefix, e))?;
        let mut ids: Vec<String> = listing
            .iter()
            .filter_map(|m| m.key.strip_prefix(&prefix)?.strip_suffix("/manifest").map(str::to_string))
            .filter(|id| !id.contains('/'))
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn storage_err(&self, op: &'static str, name: &str, source: StorageError) -> Error {
        Error::Storage { op, name: name.to_string(), repo: self.location(), source }
    }

    /// Explains why cluster metadata is absent: no repository at all, a
    /// directory that is not a repository, or a cluster never initialized.
    /// Called only on the not-found path, so it costs nothing on success.
    pub fn diagnose_missing(&self) -> Error {
        match self.storage.head(MARKER_KEY) {
            Ok(Some(_)) => Error::NotInitialized { repo: self.location(), cluster: self.cluster.clone() },
            Ok(None) => {
                if !self.is_object_store() && std::path::Path::new(&self.location()).is_dir() {
                    Error::NotARepo(self.location())
                } else {
                    Error::RepoMissing(self.location())
                }
            }
            Err(e) => self.storage_err("read", MARKER_KEY, e),
        }
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<T> {
        let bytes = match self.storage.get(key) {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => return Err(self.diagnose_missing()),
            Err(e) => return Err(self.storage_err("read", key, e)),
        };
        let (_, plain) = object::decode(&bytes).map_err(|source| Error::Corrupt {
            name: key.to_string(),
            repo: self.location(),
            source,
        })?;
        serde_json::from_slice(&plain).map_err(|e| Error::Metadata {
            repo: self.location(),
            key: key.to_string(),
            detail: e.to_string(),
        })
    }

    /// Reads the cluster's identity: one GET.
    pub fn cluster_info(&self) -> Result<ClusterInfo> {
        let key = self.cluster_key();
        let doc: ClusterDoc = self.get_meta(&key)?;
        let bad = |detail: String| Error::Metadata { repo: self.location(), key: key.clone(), detail };
        if doc.format != REPOSITORY_FORMAT {
            return Err(bad(format!(
                "format {} is not supported by this walvault (it reads format {REPOSITORY_FORMAT}); upgrade walvault",
                doc.format
            )));
        }
        let system_id = doc.system_identifier.parse::<u64>().map_err(|e| bad(format!("system_identifier: {e}")))?;
        let pg_version =
            PgVersion::new(doc.pg_version).ok_or_else(|| bad(format!("unsupported pg_version {}", doc.pg_version)))?;
        let segment_size = WalSegmentSize::new(doc.wal_segment_size)
            .ok_or_else(|| bad(format!("invalid wal_segment_size {}", doc.wal_segment_size)))?;
        if doc.name != self.cluster {
            return Err(bad(format!("names cluster '{}'", doc.name)));
        }
        Ok(ClusterInfo {
            name: doc.name,
            identity: ClusterIdentity { system_id: SystemId(system_id), pg_version, segment_size },
            created_at_ms: doc.created_at_ms,
        })
    }

    fn put_meta<T: Serialize>(&self, key: &str, doc: &T) -> Result<PutOutcome> {
        let json = serde_json::to_vec_pretty(doc).map_err(|e| Error::Metadata {
            repo: self.location(),
            key: key.to_string(),
            detail: e.to_string(),
        })?;
        let opts = EncodeOptions { compression: Compression::None, ..Default::default() };
        let (_, bytes) = object::encode(&json, &opts)
            .map_err(|e| self.storage_err("encode", key, StorageError::Io { key: key.to_string(), source: e }))?;
        self.storage.put_new(key, &bytes).map_err(|e| self.storage_err("store", key, e))
    }

    /// Binds the cluster name to `identity`, creating the repository
    /// directory (if its parent exists) and marker as needed. Returns
    /// `false` if it was already bound to the same identity.
    ///
    /// # Errors
    /// [`Error::ClusterMismatch`] if the name is bound to another cluster.
    pub fn init(&self, identity: &ClusterIdentity) -> Result<bool> {
        let root = self.location();
        // An object store has no directories: only the marker is written.
        if !self.is_object_store()
            && let Err(e) = std::fs::create_dir(&root)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => Error::RepoMissing(root),
                _ => Error::Write { path: root.into(), source: e },
            });
        }
        if let PutOutcome::Exists = self.put_meta(MARKER_KEY, &MarkerDoc { format: REPOSITORY_FORMAT })? {
            let marker: MarkerDoc = self.get_meta(MARKER_KEY)?;
            if marker.format != REPOSITORY_FORMAT {
                return Err(Error::Metadata {
                    repo: root,
                    key: MARKER_KEY.into(),
                    detail: format!(
                        "repository format {} is not supported by this walvault (format {REPOSITORY_FORMAT})",
                        marker.format
                    ),
                });
            }
        }
        let doc = ClusterDoc {
            format: REPOSITORY_FORMAT,
            name: self.cluster.clone(),
            system_identifier: identity.system_id.to_string(),
            pg_version: identity.pg_version.major(),
            wal_segment_size: identity.segment_size.bytes(),
            created_at_ms: now_ms(),
        };
        match self.put_meta(&self.cluster_key(), &doc)? {
            PutOutcome::Created(_) => Ok(true),
            PutOutcome::Exists => {
                let existing = self.cluster_info()?;
                let e = &existing.identity;
                let detail = if e.system_id != identity.system_id {
                    format!("system identifier {} (this server has {})", e.system_id, identity.system_id)
                } else if e.pg_version != identity.pg_version {
                    format!("PostgreSQL {} (this server runs {})", e.pg_version, identity.pg_version)
                } else if e.segment_size != identity.segment_size {
                    format!("{} segments (this server uses {})", e.segment_size, identity.segment_size)
                } else {
                    return Ok(false);
                };
                Err(Error::ClusterMismatch { repo: self.location(), cluster: self.cluster.clone(), detail })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn identity(sysid: u64) -> ClusterIdentity {
        ClusterIdentity {
            system_id: SystemId(sysid),
            pg_version: PgVersion::new(15).unwrap(),
            segment_size: WalSegmentSize::DEFAULT,
        }
    }

    #[test]
    fn init_binds_once_and_diagnoses() {
        let dir = std::env::temp_dir().join(format!("walvault-repo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let loc = dir.to_str().unwrap();
        let r = Repository::open(loc, "main").unwrap();
        assert!(matches!(r.cluster_info(), Err(Error::RepoMissing(_))));
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(r.cluster_info(), Err(Error::NotARepo(_))));
        assert!(r.init(&identity(7)).unwrap());
        assert!(!r.init(&identity(7)).unwrap());
        assert!(matches!(r.init(&identity(8)), Err(Error::ClusterMismatch { .. })));
        assert_eq!(r.cluster_info().unwrap().identity, identity(7));
        let other = Repository::open(loc, "other").unwrap();
        assert!(matches!(other.cluster_info(), Err(Error::NotInitialized { .. })));
        assert!(Repository::open("relative/path", "main").is_err());
        assert!(Repository::open("gs://bucket/x", "main").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_need_no_listing() {
        let r = Repository::open("/r", "main").unwrap();
        let seg: WalFileName = "0000000200000001000000FE".parse().unwrap();
        assert_eq!(r.wal_key(&seg), "main/wal/0000000200000001/0000000200000001000000FE");
        let h: WalFileName = "00000002.history".parse().unwrap();
        assert_eq!(r.wal_key(&h), "main/wal/history/00000002.history");
        let b: WalFileName = "000000010000000000000002.00000028.backup".parse().unwrap();
        assert_eq!(r.wal_key(&b), "main/wal/0000000100000000/000000010000000000000002.00000028.backup");
    }
}
