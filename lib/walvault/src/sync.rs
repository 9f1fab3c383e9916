//! `walvault repo sync`: copies what one repository of a cluster has and
//! another lacks — to seed a new offsite copy, or to catch up after an
//! outage of an optional repository.
//!
//! [`sync`] lists both repositories once, then copies in an order that
//! keeps `to` consistent at every moment, so that a sync killed at any point
//! leaves nothing a reader could misread:
//!
//! 1. WAL files (segments, `.partial`, `.backup`) and data objects;
//! 2. timeline history files;
//! 3. backup manifests, each only once every data object it refers to and
//!    every WAL segment from its start to its stop segment is in `to` (a
//!    manifest is what makes a backup exist, as in a backup);
//! 4. keep-forever marks (of backups whose manifest is in `to`) and drill
//!    records.
//!
//! Every object is read whole from `from`, verified (envelope checksum, and
//! what its key says it holds) and written unchanged with create-once
//! semantics: nothing in `to` is ever overwritten or deleted. A corrupt
//! source object is reported and skipped; a WAL file that exists in both
//! with different content is reported as a conflict. A WAL file present in
//! both is compared by the headers of the two objects (two ranged reads),
//! so "already there" means "same content", not merely "same name".
//!
//! `to` is initialized with `from`'s cluster identity when it has none, and
//! refused when bound to another cluster. The sync holds `to`'s shared
//! repository lock, as a backup does, so that an expire never sweeps what it
//! is copying; and at the end `to`'s catalog is rebuilt from `to`.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;
use walvault_formats::manifest::{Hash, Manifest};
use walvault_formats::object::{self, ContentHash, HEADER_LEN};
use walvault_formats::wal::{ClusterIdentity, SegmentName, SegmentNo, WalFileName, parse_history, validate_segment};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::info::human_bytes;
use crate::lock::{BACKUP_WAIT, LockMode, RepoLock};
use crate::repo::{DrillRecord, Repository};
use crate::storage::{ObjectMeta, PutOutcome};

/// How [`sync`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOptions {
    /// Only say what would be copied: write nothing (no initialization, no
    /// lock, no catalog). Manifests are still read, to tell which backups
    /// would be complete.
    pub dry_run: bool,
    /// Objects copied (or compared) in parallel; at least 1.
    pub jobs: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions { dry_run: false, jobs: 4 }
    }
}

/// How many objects of each kind were copied (or, in a dry run, would be).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncCounts {
    /// WAL segments, `.partial` and backup history (`.backup`) files.
    pub wal_files: u64,
    /// Timeline history files.
    pub history_files: u64,
    /// Data objects (chunks and bundles of base backups).
    pub data_objects: u64,
    /// Backup manifests: backups now complete in the target.
    pub backups: u64,
    /// Keep-forever marks.
    pub keep_forever_marks: u64,
    /// Drill records.
    pub drill_records: u64,
}

impl SyncCounts {
    /// Objects of every kind.
    pub fn total(&self) -> u64 {
        self.wal_files
            + self.history_files
            + self.data_objects
            + self.backups
            + self.keep_forever_marks
            + self.drill_records
    }
}

/// What [`sync`] did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// The name of the repository copied from.
    pub from: String,
    /// Its location.
    pub from_location: String,
    /// The name of the repository copied into.
    pub to: String,
    /// Its location.
    pub to_location: String,
    /// The cluster name.
    pub cluster: String,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
    /// Whether `to` had no identity for the cluster and was (in a dry run:
    /// would be) initialized with `from`'s.
    pub initialized: bool,
    /// Objects copied, by kind.
    pub copied: SyncCounts,
    /// Stored bytes copied.
    pub copied_bytes: u64,
    /// Objects `from` has that `to` already had, with the same content.
    pub already_there: u64,
    /// Everything that went wrong, one line each (a corrupt source object,
    /// a conflict, a backup not copied and why); empty when the sync is
    /// complete.
    pub problems: Vec<String>,
    /// Things worth knowing that are not wrong.
    pub notes: Vec<String>,
    /// Wall time, ms.
    pub elapsed_ms: u64,
}

impl SyncReport {
    /// Whether nothing went wrong: `to` now has everything `from` has.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        let c = &self.copied;
        let mut kinds = vec![
            plural(c.wal_files, "WAL file", "WAL files"),
            plural(c.history_files, "history file", "history files"),
            plural(c.data_objects, "data object", "data objects"),
            plural(c.backups, "backup", "backups"),
        ];
        if c.keep_forever_marks > 0 {
            kinds.push(plural(c.keep_forever_marks, "keep-forever mark", "keep-forever marks"));
        }
        if c.drill_records > 0 {
            kinds.push(plural(c.drill_records, "drill record", "drill records"));
        }
        let (verb, copy) = if self.dry_run { ("would sync", "would copy") } else { ("synced", "copied") };
        writeln!(
            f,
            "{verb} '{}' -> '{}': {copy} {} ({}): {}; {} already there{}",
            self.from,
            self.to,
            plural(c.total(), "object", "objects"),
            human_bytes(self.copied_bytes),
            kinds.join(", "),
            self.already_there,
            if self.dry_run { " (dry run: nothing written)" } else { "" }
        )
    }
}

/// Copies every object of the cluster that `from` has and `to` lacks; see
/// the module documentation. `from` and `to` are single-repository
/// configurations (`Config::select`).
///
/// Problems with single objects (corrupt, conflicting, a backup that cannot
/// be completed) do not stop the sync: they are in
/// [`SyncReport::problems`], and the caller should fail when there are any.
///
/// # Errors
/// When the sync cannot run or cannot go on: `from` or `to` unreadable or
/// unlistable, `from` not initialized, `to` bound to another PostgreSQL
/// cluster ([`Error::ClusterMismatch`]), both naming the same repository,
/// `to`'s lock held by an expire, or a write into `to` failing (a full
/// disk: what was copied until then stays, and a new sync resumes).
pub fn sync(from: &Config, to: &Config, opts: &SyncOptions) -> Result<SyncReport> {
    let started = Instant::now();
    let src = Repository::open_config(from)?;
    let dst = Repository::open_config(to)?;
    let (from_name, to_name) = (from.repo_name().to_string(), to.repo_name().to_string());
    if from.cluster != to.cluster {
        return Err(Error::Setting(format!(
            "repo sync copies one cluster: '{from_name}' names cluster '{}', '{to_name}' names cluster '{}'",
            from.cluster, to.cluster
        )));
    }
    if src.location() == dst.location() {
        return Err(Error::Setting(format!(
            "'{from_name}' and '{to_name}' are the same repository ('{}'): there is nothing to sync",
            src.location()
        )));
    }
    let identity = src.cluster_info()?.identity;
    let uninitialized = match dst.cluster_info() {
        Ok(info) if info.identity == identity => false,
        Ok(info) => return Err(mismatch(&dst, &from_name, &identity, &info.identity)),
        Err(Error::NotInitialized { .. } | Error::NotARepo(_) | Error::RepoMissing(_)) => true,
        Err(e) => return Err(e),
    };
    let mut report = SyncReport {
        from: from_name,
        from_location: src.location(),
        to: to_name,
        to_location: dst.location(),
        cluster: src.cluster().to_string(),
        dry_run: opts.dry_run,
        initialized: uninitialized,
        copied: SyncCounts::default(),
        copied_bytes: 0,
        already_there: 0,
        problems: Vec::new(),
        notes: Vec::new(),
        elapsed_ms: 0,
    };
    if uninitialized {
        let verb = if opts.dry_run { "would be" } else { "was" };
        if !opts.dry_run {
            dst.init(&identity)?;
        }
        report.notes.push(format!(
            "'{}' ({}) had no cluster '{}' and {verb} initialized with the identity of '{}': system identifier {}, \
             PostgreSQL {}, {} segments",
            report.to,
            report.to_location,
            report.cluster,
            report.from,
            identity.system_id,
            identity.pg_version,
            identity.segment_size
        ));
    }
    // Shared, as a backup: an expire of `to` would otherwise sweep data
    // objects whose manifest is not copied yet.
    let _lock = match opts.dry_run {
        true => None,
        false => Some(RepoLock::acquire_config(to, LockMode::Shared, "sync", BACKUP_WAIT)?),
    };

    let prefix = format!("{}/", src.cluster());
    let list = |repo: &Repository| {
        repo.storage().list(&prefix).map_err(|source| Error::Storage {
            op: "list",
            name: prefix.clone(),
            repo: repo.location(),
            source,
        })
    };
    let source = list(&src)?;
    // An uninitialized target of a dry run may not even exist: it holds
    // nothing.
    let mut have: HashSet<String> = match uninitialized && opts.dry_run {
        true => HashSet::new(),
        false => list(&dst)?.into_iter().map(|m| m.key).collect(),
    };

    let mut common = Vec::new();
    let mut first = Vec::new();
    let mut histories = Vec::new();
    let mut manifests = Vec::new();
    let mut marks = Vec::new();
    let mut drills = Vec::new();
    let mut in_source = HashSet::new();
    for meta in source {
        // The cluster identity is written by `init`, never copied; lock
        // files and lock objects belong to their repository.
        let Some(item) = classify(&src, &meta.key) else { continue };
        in_source.insert(meta.key.clone());
        let present = have.contains(&meta.key);
        match item {
            Item::Wal(name) if present => common.push((meta, name)),
            _ if present => report.already_there += 1,
            Item::Wal(WalFileName::History(_)) => histories.push((meta, item)),
            Item::Wal(_) | Item::Data(_) => first.push((meta, item)),
            Item::Manifest(_) => manifests.push((meta, item)),
            Item::KeepForever(_) => marks.push((meta, item)),
            Item::Drill(_) => drills.push((meta, item)),
        }
    }
    manifests.sort_by(|a, b| a.0.key.cmp(&b.0.key));

    let (from_name, to_name) = (report.from.clone(), report.to.clone());
    let ctx = Ctx { src: &src, dst: &dst, from: &from_name, to: &to_name, identity, dry_run: opts.dry_run };
    let jobs = opts.jobs.max(1);

    // WAL files both have: the same content, or a conflict.
    for outcome in parallel(&common, jobs, |(meta, name)| Ok(ctx.compare(&meta.key, name)))? {
        match outcome {
            Copy::There => report.already_there += 1,
            Copy::Problem(p) => report.problems.push(p),
            Copy::Copied(_) => {}
        }
    }
    for batch in [&first, &histories] {
        let outcomes = parallel(batch, jobs, |(meta, item)| ctx.copy(meta, item))?;
        tally(&mut report, &mut have, batch, outcomes);
    }
    let outcomes = parallel(&manifests, jobs, |(meta, item)| match item {
        Item::Manifest(id) => ctx.copy_manifest(meta, id, &have, &in_source),
        _ => Ok(Copy::Problem(format!("'{}' is not a manifest", meta.key))),
    })?;
    tally(&mut report, &mut have, &manifests, outcomes);
    // A mark of a backup `to` does not have would mark nothing.
    let (marks, orphans): (Vec<_>, Vec<_>) = marks.into_iter().partition(|(_, item)| match item {
        Item::KeepForever(id) => have.contains(&src.manifest_key(id)),
        _ => true,
    });
    for (meta, _) in &orphans {
        report.notes.push(format!("'{}' not copied: its backup is not in '{}'", meta.key, report.to));
    }
    for batch in [&marks, &drills] {
        let outcomes = parallel(batch, jobs, |(meta, item)| ctx.copy(meta, item))?;
        tally(&mut report, &mut have, batch, outcomes);
    }

    if !opts.dry_run {
        match crate::rebuild::rebuild(to) {
            Ok(r) => {
                for d in &r.damaged {
                    report.notes.push(format!("catalog rebuild of '{}' left out a damaged object: {d}", report.to));
                }
            }
            Err(e) => report.problems.push(format!(
                "the catalog '{}' of '{}' was not rebuilt: {e}; run 'walvault catalog rebuild --repo {}'",
                to.catalog.display(),
                report.to,
                report.to
            )),
        }
    }
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

/// Counts the outcomes of `batch` into `report`; what `to` now has joins
/// `have`.
fn tally(report: &mut SyncReport, have: &mut HashSet<String>, batch: &[(ObjectMeta, Item)], outcomes: Vec<Copy>) {
    for ((meta, item), outcome) in batch.iter().zip(outcomes) {
        match outcome {
            Copy::Copied(bytes) => {
                report.copied_bytes += bytes;
                *item.counter(&mut report.copied) += 1;
                have.insert(meta.key.clone());
            }
            Copy::There => {
                report.already_there += 1;
                have.insert(meta.key.clone());
            }
            Copy::Problem(p) => report.problems.push(p),
        }
    }
}

/// `to` is bound to another PostgreSQL cluster: say which field differs.
fn mismatch(dst: &Repository, from: &str, ours: &ClusterIdentity, theirs: &ClusterIdentity) -> Error {
    let detail = if theirs.system_id != ours.system_id {
        format!("system identifier {} ('{from}' has {})", theirs.system_id, ours.system_id)
    } else if theirs.pg_version != ours.pg_version {
        format!("PostgreSQL {} ('{from}' has {})", theirs.pg_version, ours.pg_version)
    } else {
        format!("{} segments ('{from}' has {})", theirs.segment_size, ours.segment_size)
    };
    Error::ClusterMismatch { repo: dst.location(), cluster: dst.cluster().to_string(), detail }
}

/// What a key of the cluster holds, for the objects a sync copies.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Wal(WalFileName),
    Data(Hash),
    Manifest(String),
    KeepForever(String),
    Drill(String),
}

impl Item {
    fn counter<'c>(&self, c: &'c mut SyncCounts) -> &'c mut u64 {
        match self {
            Item::Wal(WalFileName::History(_)) => &mut c.history_files,
            Item::Wal(_) => &mut c.wal_files,
            Item::Data(_) => &mut c.data_objects,
            Item::Manifest(_) => &mut c.backups,
            Item::KeepForever(_) => &mut c.keep_forever_marks,
            Item::Drill(_) => &mut c.drill_records,
        }
    }
}

/// The place of `key` in the layout (see [`crate::repo`]); `None` for what
/// a sync does not copy: the cluster identity, lock files and objects, and
/// anything that is not part of the layout.
fn classify(repo: &Repository, key: &str) -> Option<Item> {
    let rest = key.strip_prefix(repo.cluster())?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["wal", _, file] => {
            let name: WalFileName = file.parse().ok()?;
            (repo.wal_key(&name) == key).then_some(Item::Wal(name))
        }
        ["data", _, hex] => {
            let hash = ContentHash::from_hex(hex).map(Hash::from)?;
            (repo.data_key(&hash) == key).then_some(Item::Data(hash))
        }
        ["backups", id, "manifest"] => Some(Item::Manifest((*id).to_string())),
        ["backups", id, "keep-forever"] => Some(Item::KeepForever((*id).to_string())),
        ["drills", id] => Some(Item::Drill((*id).to_string())),
        _ => None,
    }
}

/// The outcome of one object.
#[derive(Debug)]
enum Copy {
    /// Copied (or would be), this many stored bytes.
    Copied(u64),
    /// `to` has it, with the same content.
    There,
    /// Not copied, and why.
    Problem(String),
}

/// Both repositories and how to name them in messages.
struct Ctx<'a> {
    src: &'a Repository,
    dst: &'a Repository,
    from: &'a str,
    to: &'a str,
    identity: ClusterIdentity,
    dry_run: bool,
}

impl Ctx<'_> {
    fn unreadable(&self, key: &str, e: impl fmt::Display) -> Copy {
        Copy::Problem(format!("unable to read '{key}' in '{}' ({}): {e}; not copied", self.from, self.src.location()))
    }

    fn corrupt(&self, key: &str, detail: impl fmt::Display) -> Copy {
        Copy::Problem(format!(
            "'{key}' in '{}' ({}) is corrupt: {detail}; not copied (if another repository has an intact copy, \
             sync from that one)",
            self.from,
            self.src.location()
        ))
    }

    fn store_error(&self, key: &str, source: crate::storage::StorageError) -> Error {
        Error::Storage { op: "store", name: key.to_string(), repo: self.dst.location(), source }
    }

    /// Copies one object: read whole, verify, create-once write.
    ///
    /// # Errors
    /// Only a failure to write into `to`, which stops the sync.
    fn copy(&self, meta: &ObjectMeta, item: &Item) -> Result<Copy> {
        if self.dry_run {
            return Ok(Copy::Copied(meta.size));
        }
        let bytes = match self.src.storage().get(&meta.key) {
            Ok(b) => b,
            Err(e) => return Ok(self.unreadable(&meta.key, e)),
        };
        let hash = match self.check(item, &bytes) {
            Ok(h) => h,
            Err(detail) => return Ok(self.corrupt(&meta.key, detail)),
        };
        match self.dst.storage().put_new(&meta.key, &bytes).map_err(|e| self.store_error(&meta.key, e))? {
            PutOutcome::Created(_) => Ok(Copy::Copied(bytes.len() as u64)),
            // Written meanwhile (an archive-push into `to`): a WAL file
            // must then hold the same content.
            PutOutcome::Exists => Ok(match item {
                Item::Wal(name) => self.compare_with(&meta.key, name, hash),
                _ => Copy::There,
            }),
        }
    }

    /// Verifies an object read from `from`: its envelope, and that it holds
    /// what its key says. Returns the BLAKE3 of its plaintext.
    fn check(&self, item: &Item, bytes: &[u8]) -> std::result::Result<ContentHash, String> {
        let (header, plain) = object::decode(bytes).map_err(|e| e.to_string())?;
        match item {
            Item::Data(hash) if header.hash != ContentHash::from(*hash) => {
                return Err(format!("it holds blake3 {}, not the {hash} its name says", header.hash));
            }
            Item::Wal(WalFileName::Segment(seg) | WalFileName::Partial(seg)) => {
                validate_segment(&plain, *seg, &self.identity).map_err(|e| e.to_string())?;
            }
            Item::Wal(WalFileName::History(_)) => {
                parse_history(&plain).map_err(|e| format!("not a timeline history file: {e}"))?;
            }
            Item::Manifest(id) => {
                self.parse_manifest(id, &plain)?;
            }
            Item::KeepForever(_) => {
                serde_json::from_slice::<serde_json::Value>(&plain).map_err(|e| format!("not JSON: {e}"))?;
            }
            Item::Drill(id) => match serde_json::from_slice::<DrillRecord>(&plain) {
                Ok(d) if d.id == *id => {}
                Ok(d) => return Err(format!("it records drill '{}'", d.id)),
                Err(e) => return Err(format!("not a drill record: {e}")),
            },
            Item::Data(_) | Item::Wal(WalFileName::BackupHistory(..)) => {}
        }
        Ok(header.hash)
    }

    fn parse_manifest(&self, id: &str, plain: &[u8]) -> std::result::Result<Manifest, String> {
        let m = Manifest::from_json(plain).map_err(|e| e.to_string())?;
        if m.id != id || m.cluster != self.src.cluster() {
            return Err(format!("it names backup '{}' of cluster '{}'", m.id, m.cluster));
        }
        if m.system_identifier != self.identity.system_id.0 {
            return Err(format!("it is a backup of system identifier {}", m.system_identifier));
        }
        Ok(m)
    }

    /// Compares a WAL file both repositories have, by their headers.
    fn compare(&self, key: &str, name: &WalFileName) -> Copy {
        let head = match self.src.storage().get_range(key, 0, HEADER_LEN as u64) {
            Ok(h) => h,
            Err(e) => return self.unreadable(key, e),
        };
        match object::parse_header(&head) {
            Ok(h) => self.compare_with(key, name, h.hash),
            Err(e) => self.corrupt(key, e),
        }
    }

    /// Whether `to`'s copy of WAL file `name` holds the plaintext `ours`.
    fn compare_with(&self, key: &str, name: &WalFileName, ours: ContentHash) -> Copy {
        let head = match self.dst.storage().get_range(key, 0, HEADER_LEN as u64) {
            Ok(h) => h,
            Err(e) => {
                return Copy::Problem(format!(
                    "unable to read '{name}' in '{}' ({}) to compare it: {e}",
                    self.to,
                    self.dst.location()
                ));
            }
        };
        match object::parse_header(&head) {
            Ok(h) if h.hash == ours => Copy::There,
            Ok(h) => Copy::Problem(format!(
                "'{name}' differs between '{}' (blake3 {ours}) and '{}' (blake3 {}): not overwritten; find out \
                 which server archived the other one",
                self.from, self.to, h.hash
            )),
            Err(e) => Copy::Problem(format!(
                "'{name}' in '{}' ({}) is corrupt: {e}; not overwritten: move it aside and sync again",
                self.to,
                self.dst.location()
            )),
        }
    }

    /// Copies a manifest once `to` has everything its backup needs.
    ///
    /// # Errors
    /// Only a failure to write into `to`.
    fn copy_manifest(
        &self,
        meta: &ObjectMeta,
        id: &str,
        have: &HashSet<String>,
        in_source: &HashSet<String>,
    ) -> Result<Copy> {
        let bytes = match self.src.storage().get(&meta.key) {
            Ok(b) => b,
            Err(e) => return Ok(self.unreadable(&meta.key, e)),
        };
        let m = match object::decode(&bytes).map_err(|e| e.to_string()).and_then(|(_, p)| self.parse_manifest(id, &p)) {
            Ok(m) => m,
            Err(detail) => return Ok(self.corrupt(&meta.key, detail)),
        };
        let mut needed: Vec<(String, String)> =
            m.objects().iter().map(|h| (self.src.data_key(h), format!("data object '{h}'"))).collect();
        match wal_needed(&m, &self.identity) {
            Ok(names) => needed.extend(names.into_iter().map(|n| (self.src.wal_key(&n), format!("WAL file '{n}'")))),
            Err(detail) => return Ok(self.corrupt(&meta.key, detail)),
        }
        let missing: Vec<&(String, String)> = needed.iter().filter(|(key, _)| !have.contains(key)).collect();
        if let Some((key, what)) = missing.first() {
            let why = if in_source.contains(key) {
                "it was not copied, see above".to_string()
            } else {
                format!("'{}' lacks it too", self.from)
            };
            let verb = if self.dry_run { "would not be" } else { "was not" };
            return Ok(Copy::Problem(format!(
                "backup '{id}' {verb} copied to '{}': {} of the objects it needs {} not there, first {what} ({why})",
                self.to,
                missing.len(),
                if missing.len() == 1 { "is" } else { "are" }
            )));
        }
        if self.dry_run {
            return Ok(Copy::Copied(meta.size));
        }
        match self.dst.storage().put_new(&meta.key, &bytes).map_err(|e| self.store_error(&meta.key, e))? {
            PutOutcome::Created(_) => Ok(Copy::Copied(bytes.len() as u64)),
            PutOutcome::Exists => Ok(Copy::There),
        }
    }
}

/// The WAL segments a backup needs to become consistent: its start to its
/// stop segment, on its timeline.
fn wal_needed(m: &Manifest, identity: &ClusterIdentity) -> std::result::Result<Vec<WalFileName>, String> {
    let size = identity.segment_size;
    let seg = |text: &str, field: &str| match text.parse::<WalFileName>() {
        Ok(WalFileName::Segment(s)) => s
            .segno(size)
            .map(|n| (s, n))
            .ok_or_else(|| format!("{field} '{text}' is not a segment name for {size} segments")),
        _ => Err(format!("{field} '{text}' is not a WAL segment name")),
    };
    let (start, s0) = seg(&m.start_wal, "start_wal")?;
    let (stop, s1) = seg(&m.stop_wal, "stop_wal")?;
    if stop.timeline != start.timeline || s1 < s0 {
        return Err(format!("start_wal '{}' and stop_wal '{}' do not make a range", m.start_wal, m.stop_wal));
    }
    Ok((s0.0..=s1.0)
        .map(|n| WalFileName::Segment(SegmentName::from_segno(start.timeline, SegmentNo(n), size)))
        .collect())
}

/// Runs `work` on every item with up to `jobs` threads; the outcomes come
/// back in the items' order. The first error stops the other threads from
/// taking new items and is returned.
fn parallel<T: Sync, R: Send>(items: &[T], jobs: usize, work: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let threads = jobs.clamp(1, items.len().max(1));
    let (work, next, failed) = (&work, &next, &failed);
    let per_thread: Vec<Result<Vec<(usize, R)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        match work(item) {
                            Ok(r) => done.push((i, r)),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(done)
                })
            })
            .collect();
        // A panic in a worker is a bug: carry it on, as a single thread would.
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut all = Vec::with_capacity(items.len());
    for r in per_thread {
        all.extend(r?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use walvault_formats::object::EncodeOptions;
    use walvault_formats::wal::{TimelineId, WalSegmentSize, synthetic_segment};

    use super::*;
    use crate::catalog::Catalog;
    use crate::config::Overrides;
    use crate::fetch::{FetchOutcome, fetch};

    const SEG: u64 = 1 << 20;

    /// A source repository with segments 1..=6 of timeline 1, the history
    /// file of timeline 2, backups B1 (segments 2..3; data objects shared
    /// and one) and B2 (segment 5; shared and two), a keep-forever mark on
    /// B1 and a drill record.
    struct T {
        dir: PathBuf,
        from: Config,
        identity: ClusterIdentity,
        /// Data objects only B1 and only B2 refer to.
        one: Hash,
        two: Hash,
    }

    impl Drop for T {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn seg_name(segno: u64) -> SegmentName {
        SegmentName::from_segno(TimelineId::FIRST, SegmentNo(segno), WalSegmentSize::new(SEG).unwrap())
    }

    /// Pushes segment `segno` filled with `fill` into the repository of `config`.
    fn push_segment(dir: &Path, config: &Config, identity: &ClusterIdentity, segno: u64, fill: u8) -> Vec<u8> {
        let path = dir.join(seg_name(segno).to_string());
        let bytes = synthetic_segment(identity, TimelineId::FIRST, SegmentNo(segno), fill);
        std::fs::write(&path, &bytes).unwrap();
        crate::push::push(config, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        bytes
    }

    fn manifest(id: &str, seg: u64, chunks: &[(Hash, u64)], sysid: u64) -> Manifest {
        let (start, stop) = if id == "B1" { (seg, seg + 1) } else { (seg, seg) };
        crate::testing::chunked_manifest(id, sysid, SEG, (start, stop), chunks)
    }

    fn setup(tag: &str) -> T {
        let (dir, from, identity) =
            crate::testing::temp_repo(&format!("sync-{tag}"), 77, WalSegmentSize::new(SEG).unwrap());
        for segno in 1..=6u64 {
            push_segment(&dir, &from, &identity, segno, segno as u8);
        }
        let history = dir.join("00000002.history");
        std::fs::write(&history, "1\t0/5000000\tno recovery target specified\n").unwrap();
        crate::push::push(&from, &history).unwrap();
        let repo = Repository::open_config(&from).unwrap();
        let put = |bytes: &[u8]| {
            let h = Hash::from(ContentHash::of(bytes));
            repo.put_data(&h, bytes, &EncodeOptions::default()).unwrap();
            (h, bytes.len() as u64)
        };
        let shared = put(&[1u8; 5000]);
        let one = put(&[2u8; 3000]);
        let two = put(&[3u8; 7000]);
        repo.put_manifest(&manifest("B1", 2, &[shared, one], 77)).unwrap();
        repo.put_manifest(&manifest("B2", 5, &[shared, two], 77)).unwrap();
        repo.set_keep_forever("B1", true).unwrap();
        repo.put_drill(&DrillRecord {
            id: "20260101T000000Z".into(),
            backup: "B2".into(),
            target: "end of archive".into(),
            started_at_ms: 1,
            finished_at_ms: 2,
            ok: true,
            rto_ms: 1,
            detail: "checked".into(),
        })
        .unwrap();
        T { dir, from, identity, one: one.0, two: two.0 }
    }

    impl T {
        /// A configuration of a second repository `<dir>/<name>` (not
        /// initialized) with its own catalog.
        fn target(&self, name: &str) -> Config {
            let overrides = Overrides {
                repository: Some(self.dir.join(name).display().to_string()),
                catalog: Some(self.dir.join(format!("catalog-{name}.db"))),
                ..Default::default()
            };
            Config::load(&overrides, None).unwrap()
        }

        fn run(&self, to: &Config, dry_run: bool) -> SyncReport {
            sync(&self.from, to, &SyncOptions { dry_run, jobs: 3 }).unwrap()
        }
    }

    /// Every object file under `root`, relative path → bytes (the lock
    /// file and its holder records left out).
    fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries {
                let path = e.unwrap().path();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                if rel.ends_with("/lock") || rel.contains("lock.d") || rel.contains("/locks/") {
                    continue;
                }
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    out.insert(rel, std::fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    fn data_rel(hash: &Hash) -> String {
        let hex = hash.to_string();
        format!("main/data/{}/{hex}", &hex[..2])
    }

    #[test]
    fn copies_exactly_what_is_missing_and_a_second_sync_copies_nothing() {
        let t = setup("missing");
        let to = t.target("b");
        crate::init::init(&to, &t.identity).unwrap();
        // `to` already has segments 1 and 2 (archived into both) and one
        // data object.
        let mut originals = BTreeMap::new();
        for segno in 1..=2u64 {
            push_segment(&t.dir, &to, &t.identity, segno, segno as u8);
        }
        let to_repo = Repository::open_config(&to).unwrap();
        to_repo.put_data(&Hash::from(ContentHash::of(&[1u8; 5000])), &[1u8; 5000], &EncodeOptions::default()).unwrap();
        for segno in 1..=6u64 {
            originals.insert(segno, synthetic_segment(&t.identity, TimelineId::FIRST, SegmentNo(segno), segno as u8));
        }

        let r = t.run(&to, false);
        assert!(r.ok(), "{r}");
        assert!(!r.initialized, "{r}");
        let expected = SyncCounts {
            wal_files: 4,
            history_files: 1,
            data_objects: 2,
            backups: 2,
            keep_forever_marks: 1,
            drill_records: 1,
        };
        assert_eq!(r.copied, expected, "{r}");
        assert_eq!(r.already_there, 3, "{r}");
        let text = r.to_string();
        assert!(
            text.contains(
                "synced 'default' -> 'default': copied 11 objects (",
            ) && text.contains("4 WAL files, 1 history file, 2 data objects, 2 backups, 1 keep-forever mark, 1 drill record; 3 already there"),
            "{text}"
        );

        // Every object of the source is now in the target, byte for byte.
        let source = files(&t.dir.join("repo"));
        let target = files(&t.dir.join("b"));
        assert_eq!(source.keys().collect::<Vec<_>>(), target.keys().collect::<Vec<_>>());
        for (k, v) in &source {
            if k != "main/cluster" {
                assert!(target[k] == *v, "{k} differs");
            }
        }
        // What a user checks: archive-fetch from the target gives the
        // segments back, and the target's catalog knows both backups.
        for (segno, bytes) in &originals {
            let dest = t.dir.join("fetched");
            assert_eq!(fetch(&to, &seg_name(*segno).to_string(), &dest).unwrap(), FetchOutcome::Restored);
            assert!(std::fs::read(&dest).unwrap() == *bytes, "segment {segno}");
        }
        let catalog = Catalog::open_existing(&to.catalog).unwrap();
        let backups: Vec<(String, bool)> =
            catalog.backups().unwrap().into_iter().map(|b| (b.id, b.keep_forever)).collect();
        assert_eq!(backups, [("B1".to_string(), true), ("B2".to_string(), false)]);
        assert_eq!(catalog.all_wal().unwrap().len(), 7);
        assert_eq!(catalog.drills().unwrap().len(), 1);

        let again = t.run(&to, false);
        assert!(again.ok(), "{again}");
        assert_eq!(again.copied, SyncCounts::default(), "{again}");
        assert_eq!(again.already_there, 14, "{again}");
        assert!(again.to_string().contains("copied 0 objects (0 B)"), "{again}");
    }

    #[test]
    fn a_dry_run_writes_nothing_then_a_sync_initializes_the_target() {
        let t = setup("dry");
        let to = t.target("b");
        let dry = t.run(&to, true);
        assert!(dry.ok() && dry.initialized, "{dry}");
        assert!(!t.dir.join("b").exists(), "a dry run must not create the repository");
        assert!(!to.catalog.exists(), "a dry run must not create the catalog");
        assert!(dry.to_string().contains("would sync 'default' -> 'default': would copy 14 objects ("), "{dry}");
        assert!(dry.notes.iter().any(|n| n.contains("would be initialized")), "{dry}");

        let r = t.run(&to, false);
        assert!(r.ok() && r.initialized, "{r}");
        assert_eq!(r.copied, dry.copied, "{r}");
        assert_eq!(r.copied_bytes, dry.copied_bytes, "{r}");
        let to_repo = Repository::open_config(&to).unwrap();
        assert_eq!(to_repo.cluster_info().unwrap().identity, t.identity);
        assert_eq!(to_repo.get_manifest("B2").unwrap().0.id, "B2");
        // A dry run of a synced target: nothing left to copy.
        let dry = t.run(&to, true);
        assert_eq!((dry.copied.total(), dry.already_there), (0, 14), "{dry}");
    }

    #[test]
    fn a_corrupt_source_object_is_skipped_and_its_backup_not_copied() {
        let t = setup("corrupt");
        let path = t.dir.join("repo").join(data_rel(&t.one));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let to = t.target("b");
        let r = t.run(&to, false);
        assert!(!r.ok(), "{r}");
        assert_eq!(r.problems.len(), 2, "{r}");
        let text = r.to_string();
        let one = t.one.to_string();
        assert!(
            text.lines().any(|l| l.starts_with("problem: ") && l.contains(&one) && l.contains("is corrupt")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("problem: backup 'B1' was not copied")
                    && l.contains(&format!("data object '{one}'"))),
            "{text}"
        );
        assert!(!t.dir.join("b").join(data_rel(&t.one)).exists());
        assert!(!t.dir.join("b/main/backups/B1").exists(), "neither B1's manifest nor its mark");
        assert!(t.dir.join("b").join(data_rel(&t.two)).exists());
        assert!(t.dir.join("b/main/backups/B2/manifest").exists());
        assert_eq!((r.copied.backups, r.copied.data_objects, r.copied.keep_forever_marks), (1, 2, 0), "{r}");
        let catalog = Catalog::open_existing(&to.catalog).unwrap();
        assert_eq!(catalog.backups().unwrap().len(), 1);
    }

    #[test]
    fn a_wal_conflict_is_reported_and_not_overwritten() {
        let t = setup("conflict");
        let to = t.target("b");
        crate::init::init(&to, &t.identity).unwrap();
        // Another server's segment 4 under the same name.
        push_segment(&t.dir, &to, &t.identity, 4, 0xEE);
        let key = format!("main/wal/0000000100000000/{}", seg_name(4));
        let before = std::fs::read(t.dir.join("b").join(&key)).unwrap();
        let r = t.run(&to, false);
        assert_eq!(r.problems.len(), 1, "{r}");
        let p = &r.problems[0];
        assert!(p.contains(&seg_name(4).to_string()) && p.contains("differs") && p.contains("not overwritten"), "{p}");
        assert!(std::fs::read(t.dir.join("b").join(&key)).unwrap() == before, "the target's copy must stay");
        assert_eq!(r.copied.wal_files, 5, "{r}");
        // The same conflict on the next sync, and in a dry run.
        assert_eq!(t.run(&to, true).problems.len(), 1);
    }

    #[test]
    fn a_target_bound_to_another_cluster_is_refused() {
        let t = setup("other");
        let (other_dir, other, _) =
            crate::testing::temp_repo("sync-other-target", 78, WalSegmentSize::new(SEG).unwrap());
        let err = sync(&t.from, &other, &SyncOptions::default()).unwrap_err();
        assert!(matches!(err, Error::ClusterMismatch { .. }), "{err}");
        assert!(err.to_string().contains("system identifier 78"), "{err}");
        let keys: Vec<String> = files(&other_dir.join("repo")).into_keys().collect();
        assert_eq!(keys, ["main/cluster", "walvault.repository"], "nothing may be written");
        let same = sync(&t.from, &t.from, &SyncOptions::default()).unwrap_err();
        assert!(same.to_string().contains("same repository"), "{same}");
        std::fs::remove_dir_all(&other_dir).unwrap();
    }
}
