//! `walvault expire`: applies the retention policy to the repository.
//!
//! The steps, under the repository lock held exclusively (shared for a dry
//! run), so that no backup runs meanwhile ([`crate::lock`]):
//! 1. rebuild the catalog from the repository (invariant 6: decide from the
//!    truth, not from an index that may lag), refusing if a manifest or
//!    WAL object is damaged, since what it holds is then unknown;
//! 2. plan with the pure [`retention::plan_retention`];
//! 3. delete the backups the plan drops: everything of a backup but its
//!    manifest, then the manifest (a marked backup is never touched);
//! 4. sweep the data objects that no remaining manifest refers to and that
//!    are older than the grace period ([`retention::plan_sweep`]): a backup
//!    whose manifest does not exist yet keeps its objects;
//! 5. delete the WAL the plan drops, oldest first per timeline, history
//!    files last.
//!
//! The catalog is updated as it goes. Every step only ever removes what the
//! steps before made unreferenced, so a kill at any point leaves a
//! consistent repository (no manifest refers to a missing object, no kept
//! backup lacks WAL) and running expire again finishes the job.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use walvault_formats::manifest::Hash;
use walvault_formats::wal::{WalFileName, WalSegmentSize};

use crate::catalog::Catalog;
use crate::config::{Config, RetentionPolicy};
use crate::error::{Error, Result};
use crate::info::{archive_state, human_bytes};
use crate::lock::{LockMode, RepoLock};
use crate::repo::Repository;
use crate::retention::{self, Deletion, KeptBackup, RetentionError, RetentionInput, describe_policy, format_duration};
use crate::storage::StorageError;

/// How to expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpireOptions {
    /// Plan and report, delete nothing.
    pub dry_run: bool,
    /// The policy: the command's flags over the configuration's `[retention]`.
    pub policy: RetentionPolicy,
    /// How old an unreferenced data object must be before it is deleted.
    pub grace_secs: u64,
    /// The clock reading the policy is applied at, ms since the epoch.
    pub now_ms: i64,
    /// How long to wait for the repository lock; 0 fails at once, naming
    /// the holder.
    pub wait_secs: u64,
}

/// Consecutive WAL files deleted for the same reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalRange {
    /// The first file.
    pub first: String,
    /// The last file.
    pub last: String,
    /// How many files.
    pub files: u64,
    /// Why they go.
    pub reason: String,
}

/// What an expire did (or, in a dry run, would do); serialized as-is for
/// `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpireReport {
    /// Repository location.
    pub repository: String,
    /// Cluster name.
    pub cluster: String,
    /// Nothing was deleted: the counts say what would be.
    pub dry_run: bool,
    /// The policy applied, as the configuration writes it.
    pub policy: String,
    /// Backups kept, oldest first, with every rule that keeps them.
    pub kept: Vec<KeptBackup>,
    /// Backups deleted, oldest first, with the reason.
    pub deleted_backups: Vec<Deletion>,
    /// Data objects deleted: referenced by no backup, older than the grace period.
    pub data_objects_deleted: u64,
    /// Their stored bytes.
    pub data_bytes_deleted: u64,
    /// Unreferenced data objects kept because they are younger than the
    /// grace period (a backup in progress may be writing them).
    pub data_objects_in_grace: u64,
    /// Their stored bytes.
    pub data_bytes_in_grace: u64,
    /// The grace period, in seconds.
    pub grace_secs: u64,
    /// WAL files deleted (segments, `.partial`, `.backup` and history files).
    pub wal_files_deleted: u64,
    /// Their stored bytes.
    pub wal_bytes_deleted: u64,
    /// The WAL files deleted, as ranges with their reason.
    pub wal_deleted: Vec<WalRange>,
    /// Records of dropped WAL files (`queue-max`) deleted because every
    /// remaining backup started after the drop: no recovery crosses them
    /// any more, and `info` and `check` stop reporting them.
    pub gap_records_deleted: Vec<String>,
    /// What the operator should know.
    pub notes: Vec<String>,
}

impl fmt::Display for ExpireReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.policy == describe_policy(&RetentionPolicy::default()) {
            for n in &self.notes {
                writeln!(f, "{n}")?;
            }
            return Ok(());
        }
        let (verb, did) = if self.dry_run { ("would delete", "would be deleted") } else { ("delete", "deleted") };
        if self.dry_run {
            writeln!(f, "dry run: nothing was deleted")?;
        }
        writeln!(f, "cluster '{}' in repository '{}', policy: {}", self.cluster, self.repository, self.policy)?;
        for k in &self.kept {
            writeln!(f, "keep backup '{}': {}", k.id, k.reasons.join("; "))?;
        }
        for d in &self.deleted_backups {
            writeln!(f, "{verb} backup '{}': {}", d.name, d.reason)?;
        }
        write!(f, "data objects: {} {did} ({})", self.data_objects_deleted, human_bytes(self.data_bytes_deleted))?;
        if self.data_objects_in_grace > 0 {
            write!(
                f,
                "; {} unreferenced ({}) kept, younger than the grace period ({})",
                self.data_objects_in_grace,
                human_bytes(self.data_bytes_in_grace),
                format_duration(self.grace_secs)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "WAL files: {} {did} ({})", self.wal_files_deleted, human_bytes(self.wal_bytes_deleted))?;
        const SHOWN: usize = 20;
        for r in self.wal_deleted.iter().take(SHOWN) {
            if r.files == 1 {
                writeln!(f, "  '{}': {}", r.first, r.reason)?;
            } else {
                writeln!(f, "  '{}' to '{}' ({} files): {}", r.first, r.last, r.files, r.reason)?;
            }
        }
        if self.wal_deleted.len() > SHOWN {
            writeln!(f, "  and {} more ranges", self.wal_deleted.len() - SHOWN)?;
        }
        if !self.gap_records_deleted.is_empty() {
            writeln!(
                f,
                "dropped-WAL records: {} {did}, older than every remaining backup (PITR from them never crosses \
                 the gap): {}",
                self.gap_records_deleted.len(),
                crate::info::name_runs(&self.gap_records_deleted).join(", ")
            )?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Why expire refused to run (a held lock is a [`crate::lock::LockError`]).
#[derive(Debug, Error)]
pub enum ExpireError {
    /// The policy would delete every backup.
    #[error(transparent)]
    Policy(#[from] RetentionError),
    /// Objects whose content expire must know are damaged.
    #[error(
        "{} damaged object(s) in repository '{repo}': expire must read every manifest, history file and WAL \
         header before it deletes anything: {}",
        objects.len(),
        objects.join("; ")
    )]
    Damaged {
        /// The repository.
        repo: String,
        /// Each damaged object and what is wrong with it.
        objects: Vec<String>,
    },
}

impl ExpireError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            ExpireError::Policy(_) => "nothing was deleted: check that backups still run, or widen the policy \
                                       ('[retention]' in the configuration, or the command's flags); \
                                       'walvault keep-forever ID' protects a single backup"
                .into(),
            ExpireError::Damaged { .. } => "nothing was deleted: move the damaged objects aside (or replace them \
                                            with intact copies from another repository), then run expire again"
                .into(),
        })
    }

    /// Whether running expire again later may succeed as is.
    pub fn is_transient(&self) -> bool {
        match self {
            ExpireError::Policy(_) | ExpireError::Damaged { .. } => false,
        }
    }
}

/// What the next expire would delete, from the catalog alone: for
/// `walvault info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpirePreview {
    /// The configured policy.
    pub policy: String,
    /// Backups it would delete, with the reason.
    pub delete_backups: Vec<Deletion>,
    /// WAL files it would delete.
    pub wal_files: u64,
    /// Their stored bytes.
    pub wal_bytes: u64,
    /// Records of dropped WAL (queue-max) it would delete: every backup it
    /// keeps started after the drop.
    pub gap_records: Vec<String>,
    /// The plan's notes.
    pub notes: Vec<String>,
    /// Why expire would refuse to run, if it would.
    pub refused: Option<String>,
}

/// Previews the next expire under the configured policy, reading the
/// catalog only: no lock, no rebuild, no manifest (so data objects are not
/// counted). `None` when no policy is configured.
///
/// # Errors
/// Catalog errors ([`Error::NoCatalog`] when there is none).
pub fn preview(config: &Config, now_ms: i64) -> Result<Option<ExpirePreview>> {
    if config.retention.is_empty() {
        return Ok(None);
    }
    let catalog = Catalog::open_existing(&config.catalog)?;
    let cluster = catalog
        .cluster()?
        .ok_or_else(|| Error::Catalog { path: config.catalog.clone(), detail: "indexes no cluster yet".into() })?;
    let (input, sizes) = catalog_input(&catalog, cluster.identity.segment_size)?;
    let mut out = ExpirePreview {
        policy: describe_policy(&config.retention),
        delete_backups: vec![],
        wal_files: 0,
        wal_bytes: 0,
        gap_records: vec![],
        notes: vec![],
        refused: None,
    };
    match retention::plan_retention(&config.retention, now_ms, &input) {
        Ok(plan) => {
            out.wal_files = plan.delete_wal.len() as u64;
            out.wal_bytes = plan.delete_wal.iter().filter_map(|d| sizes.get(&d.name)).sum();
            let kept: Vec<String> = plan.keep.iter().map(|k| k.id.clone()).collect();
            out.gap_records = obsolete_gap_records(catalog.gap_records()?, &kept, &catalog.backups()?);
            out.delete_backups = plan.delete_backups;
            out.notes = plan.notes;
        }
        Err(e) => out.refused = Some(e.to_string()),
    }
    Ok(Some(out))
}

/// Applies `opts.policy` to the repository; see the module documentation.
///
/// # Errors
/// [`ExpireError`] when the lock is held, the policy keeps no backup, or
/// damaged objects make the plan unsafe (nothing is deleted then); storage
/// and catalog errors otherwise (expire stops; running it again finishes).
pub fn expire(config: &Config, opts: &ExpireOptions) -> Result<ExpireReport> {
    run(config, opts, Budget(None))
}

/// A test's stand-in for `kill -9`: stops the run before deletion number
/// N + 1, leaving whatever the deletions so far left.
struct Budget(Option<u64>);

impl Budget {
    fn spend(&mut self) -> Result<()> {
        match &mut self.0 {
            Some(0) => Err(Error::Setting("stopped by the test hook".into())),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// How many WAL files are deleted between two catalog updates.
const WAL_BATCH: usize = 1000;

fn run(config: &Config, opts: &ExpireOptions, mut budget: Budget) -> Result<ExpireReport> {
    let repo = Repository::open_config(config)?;
    let mut report = ExpireReport {
        repository: repo.location(),
        cluster: repo.cluster().to_string(),
        dry_run: opts.dry_run,
        policy: describe_policy(&opts.policy),
        kept: vec![],
        deleted_backups: vec![],
        data_objects_deleted: 0,
        data_bytes_deleted: 0,
        data_objects_in_grace: 0,
        data_bytes_in_grace: 0,
        grace_secs: opts.grace_secs,
        wal_files_deleted: 0,
        wal_bytes_deleted: 0,
        wal_deleted: vec![],
        gap_records_deleted: vec![],
        notes: vec![],
    };
    if opts.policy.is_empty() {
        report.notes.push("no retention policy: nothing to expire".into());
        return Ok(report);
    }
    let cluster = repo.cluster_info()?;
    // A dry run deletes nothing: it only must not watch an expire halfway.
    let mode = if opts.dry_run { LockMode::Shared } else { LockMode::Exclusive };
    let lock = RepoLock::acquire_config(config, mode, "expire", Duration::from_secs(opts.wait_secs))?;
    report.notes.extend(lock.notes().iter().cloned());

    // Invariant 6: the repository decides, under the lock, so no backup can
    // appear between this reading and the deletions.
    let rebuilt = crate::rebuild::rebuild(config)?;
    if !rebuilt.damaged.is_empty() {
        return Err(ExpireError::Damaged { repo: repo.location(), objects: rebuilt.damaged }.into());
    }
    if !rebuilt.ignored.is_empty() {
        report.notes.push(format!(
            "{} object(s) under '{}' are not WAL files of this cluster and were left alone",
            rebuilt.ignored.len(),
            repo.wal_prefix()
        ));
    }
    let mut catalog = Catalog::open_existing(&config.catalog)?;
    let (input, sizes) = catalog_input(&catalog, cluster.identity.segment_size)?;
    let plan = retention::plan_retention(&opts.policy, opts.now_ms, &input).map_err(ExpireError::from)?;
    report.kept = plan.keep.clone();
    report.notes.extend(plan.notes.iter().cloned());
    let mut catalog_errors: Vec<String> = Vec::new();

    // 1. Backups.
    let mut marked_meanwhile = false;
    for d in &plan.delete_backups {
        if !opts.dry_run {
            if !delete_backup(&repo, &d.name, &mut budget)? {
                report.notes.push(format!(
                    "backup '{}' was marked keep-forever meanwhile: it is kept, and no WAL was deleted (the plan \
                     counted on its deletion); run expire again",
                    d.name
                ));
                marked_meanwhile = true;
                continue;
            }
            if let Err(e) = catalog.forget_backup(&d.name) {
                catalog_errors.push(e.to_string());
            }
        }
        report.deleted_backups.push(d.clone());
    }

    // 2. Data objects, marked from every remaining manifest (in a dry run,
    // from those the plan keeps).
    let remaining = if opts.dry_run { plan.keep.iter().map(|k| k.id.clone()).collect() } else { repo.list_backups()? };
    let mut referenced: BTreeSet<Hash> = BTreeSet::new();
    for id in &remaining {
        // A manifest that cannot be read stops the sweep: what it refers to
        // is unknown.
        referenced.extend(repo.get_manifest(id)?.0.objects());
    }
    let prefix = repo.data_prefix();
    let listing = repo.storage().list(&prefix).map_err(|e| storage_err(&repo, "list", &prefix, e))?;
    let sweep = retention::plan_sweep(&prefix, &listing, &referenced, opts.now_ms, opts.grace_secs);
    for obj in &sweep.delete {
        if !opts.dry_run {
            budget.spend()?;
            repo.storage().delete(&obj.key).map_err(|e| storage_err(&repo, "delete", &obj.key, e))?;
        }
        report.data_objects_deleted += 1;
        report.data_bytes_deleted += obj.size;
    }
    report.data_objects_in_grace = sweep.in_grace.len() as u64;
    report.data_bytes_in_grace = sweep.in_grace.iter().map(|m| m.size).sum();
    if !sweep.unknown.is_empty() {
        report.notes.push(format!(
            "{} object(s) under '{prefix}' are not data objects walvault writes and were left alone",
            sweep.unknown.len()
        ));
    }

    // 3. WAL, in the plan's order: oldest first per timeline, history files last.
    let wal = if marked_meanwhile { &[][..] } else { &plan.delete_wal[..] };
    for batch in wal.chunks(WAL_BATCH) {
        if !opts.dry_run {
            for d in batch {
                let name: WalFileName = d.name.parse()?;
                let key = repo.wal_key(&name);
                budget.spend()?;
                repo.storage().delete(&key).map_err(|e| storage_err(&repo, "delete", &key, e))?;
            }
            let names: Vec<String> = batch.iter().map(|d| d.name.clone()).collect();
            if let Err(e) = catalog.forget_wal(&names) {
                catalog_errors.push(e.to_string());
            }
        }
        report.wal_files_deleted += batch.len() as u64;
        report.wal_bytes_deleted += batch.iter().filter_map(|d| sizes.get(&d.name)).sum::<u64>();
    }
    report.wal_deleted = wal_ranges(wal);

    // 4. Records of dropped WAL (queue-max) older than every remaining
    // backup: a backup that started after a drop starts past it (as `info`
    // judges), so no recovery from any of them crosses the gap.
    if !marked_meanwhile {
        let obsolete = obsolete_gap_records(repo.list_gaps()?, &remaining, &catalog.backups()?);
        if !opts.dry_run && !obsolete.is_empty() {
            for name in &obsolete {
                let key = repo.gap_key(name);
                budget.spend()?;
                repo.storage().delete(&key).map_err(|e| storage_err(&repo, "delete", &key, e))?;
            }
            if let Err(e) = catalog.forget_gaps(&obsolete) {
                catalog_errors.push(e.to_string());
            }
        }
        report.gap_records_deleted = obsolete;
    }
    if let Some(e) = catalog_errors.first() {
        report.notes.push(format!(
            "the catalog was not fully updated ({e}): 'walvault catalog rebuild' (or the next expire) fixes it"
        ));
    }
    Ok(report)
}

fn storage_err(repo: &Repository, op: &'static str, name: &str, source: StorageError) -> Error {
    Error::Storage { op, name: name.to_string(), repo: repo.location(), source }
}

/// Deletes backup `id`: everything in its directory but the manifest, then
/// the manifest, so that an interrupted deletion leaves a whole backup that
/// the next expire finds again. Returns false, deleting nothing, when the
/// backup carries a keep-forever mark.
fn delete_backup(repo: &Repository, id: &str, budget: &mut Budget) -> Result<bool> {
    let dir = format!("{}{id}/", repo.backups_prefix());
    let listing = repo.storage().list(&dir).map_err(|e| storage_err(repo, "list", &dir, e))?;
    let mark = repo.keep_forever_key(id);
    if listing.iter().any(|m| m.key == mark) {
        return Ok(false);
    }
    let manifest = repo.manifest_key(id);
    budget.spend()?;
    for m in listing.iter().filter(|m| m.key != manifest) {
        repo.storage().delete(&m.key).map_err(|e| storage_err(repo, "delete", &m.key, e))?;
    }
    repo.storage().delete(&manifest).map_err(|e| storage_err(repo, "delete", &manifest, e))?;
    Ok(true)
}

/// The planner's input from the catalog, with the stored size of every WAL
/// file by name.
fn catalog_input(catalog: &Catalog, size: WalSegmentSize) -> Result<(RetentionInput, HashMap<String, u64>)> {
    let state = archive_state(catalog, size)?;
    let keep_forever = catalog.backups()?.into_iter().filter(|b| b.keep_forever).map(|b| b.id).collect();
    let mut sizes = HashMap::new();
    let mut other_wal = Vec::new();
    for r in catalog.all_wal()? {
        sizes.insert(r.name.to_string(), r.stored_size);
        if !matches!(r.name, WalFileName::Segment(_)) {
            other_wal.push(r.name);
        }
    }
    Ok((RetentionInput { state, keep_forever, other_wal }, sizes))
}

/// The names of the dropped-WAL records that `remaining` backups make
/// obsolete: dropped before the oldest of them started, so that no recovery
/// from any of them crosses the gap (the rule `info` judges PITR by). None
/// when no backup remains.
fn obsolete_gap_records(
    gaps: Vec<crate::catalog::DroppedWal>,
    remaining: &[String],
    backups: &[crate::catalog::BackupRecord],
) -> Vec<String> {
    let started: HashMap<&str, i64> = backups.iter().map(|b| (b.id.as_str(), b.start_time_ms)).collect();
    let Some(oldest) = remaining.iter().filter_map(|id| started.get(id.as_str())).min().copied() else {
        return vec![];
    };
    gaps.into_iter().filter(|g| g.dropped_at_ms < oldest).map(|g| g.name).collect()
}

/// Consecutive deletions with the same reason, as ranges.
fn wal_ranges(deletions: &[Deletion]) -> Vec<WalRange> {
    let mut out: Vec<WalRange> = Vec::new();
    for d in deletions {
        match out.last_mut() {
            Some(r) if r.reason == d.reason => {
                r.last.clone_from(&d.name);
                r.files += 1;
            }
            _ => out.push(WalRange { first: d.name.clone(), last: d.name.clone(), files: 1, reason: d.reason.clone() }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    use walvault_formats::manifest::{
        CHUNK_SIZE, ChunkRef, Entry, EntryKind, FileData, MANIFEST_FORMAT, Manifest, Totals,
    };
    use walvault_formats::object::{ContentHash, EncodeOptions};
    use walvault_formats::wal::{ClusterIdentity, Lsn, SegmentName, SegmentNo, TimelineId, synthetic_segment};

    use super::*;
    use crate::lock::host_name;

    const DAY_MS: i64 = 86_400_000;
    const LAST_SEGMENT: u64 = 12;

    struct T {
        dir: PathBuf,
        config: Config,
        repo: Repository,
        identity: ClusterIdentity,
        now_ms: i64,
    }

    impl Drop for T {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl T {
        fn new(tag: &str) -> T {
            let (dir, config, identity) =
                crate::testing::temp_repo(&format!("expire-{tag}"), 42, WalSegmentSize::new(1 << 20).unwrap());
            let repo = Repository::open_config(&config).unwrap();
            T { dir, config, repo, identity, now_ms: crate::repo::now_ms() }
        }

        fn segment(&self, segno: u64) -> String {
            SegmentName::from_segno(TimelineId::FIRST, SegmentNo(segno), self.identity.segment_size).to_string()
        }

        fn push(&self, segnos: std::ops::RangeInclusive<u64>) {
            for segno in segnos {
                let path = self.dir.join(self.segment(segno));
                let bytes = synthetic_segment(&self.identity, TimelineId::FIRST, SegmentNo(segno), segno as u8);
                std::fs::write(&path, bytes).unwrap();
                crate::push::push(&self.config, &path).unwrap();
                std::fs::remove_file(&path).unwrap();
            }
        }

        fn object_path(&self, hash: &Hash) -> PathBuf {
            Path::new(&self.config.repository).join(self.repo.data_key(hash))
        }

        /// Stores `bytes` as a data object modified `age_ms` ago.
        fn object(&self, bytes: &[u8], age_ms: i64) -> Hash {
            let h = Hash::from(ContentHash::of(bytes));
            self.repo.put_data(&h, bytes, &EncodeOptions::default()).unwrap();
            let when = SystemTime::UNIX_EPOCH + Duration::from_millis((self.now_ms - age_ms) as u64);
            std::fs::File::options().write(true).open(self.object_path(&h)).unwrap().set_modified(when).unwrap();
            h
        }

        /// A backup starting in segment `seg`, consistent `age_days` ago,
        /// whose files are `objects`.
        fn backup(&self, id: &str, seg: u64, age_days: i64, objects: &[Hash]) {
            let size = self.identity.segment_size.bytes();
            let entries = objects
                .iter()
                .enumerate()
                .map(|(i, h)| Entry {
                    path: format!("base/{i}"),
                    mode: 0o600,
                    size: 1,
                    mtime_ms: 5,
                    kind: EntryKind::File { data: FileData::Chunks { chunks: vec![ChunkRef { hash: *h, len: 1 }] } },
                })
                .collect();
            let stop_ms = self.now_ms - age_days * DAY_MS;
            let m = Manifest {
                format: MANIFEST_FORMAT,
                id: id.into(),
                cluster: "main".into(),
                system_identifier: 42,
                pg_version: 15,
                wal_segment_size: size,
                timeline: 1,
                start_lsn: Lsn(seg * size + 0x28),
                stop_lsn: Lsn(seg * size + 0x100),
                start_time_ms: stop_ms - 1000,
                stop_time_ms: stop_ms,
                start_wal: self.segment(seg),
                stop_wal: self.segment(seg),
                next_xid: seg * 100,
                backup_label: String::new(),
                tablespace_map: String::new(),
                tablespaces: vec![],
                chunk_size: CHUNK_SIZE,
                entries,
                totals: Totals::default(),
                walvault_version: "test".into(),
            };
            self.repo.put_manifest(&m).unwrap();
        }

        fn opts(&self, keep_last: u32) -> ExpireOptions {
            ExpireOptions {
                dry_run: false,
                policy: RetentionPolicy { keep_last: Some(keep_last), ..Default::default() },
                grace_secs: 3600,
                now_ms: self.now_ms,
                wait_secs: 0,
            }
        }

        fn wal(&self) -> Vec<String> {
            let mut names: Vec<String> = self
                .repo
                .storage()
                .list(&self.repo.wal_prefix())
                .unwrap()
                .into_iter()
                .map(|m| m.key.rsplit('/').next().unwrap().to_string())
                .collect();
            names.sort();
            names
        }

        fn segments(&self, range: std::ops::RangeInclusive<u64>) -> Vec<String> {
            range.map(|s| self.segment(s)).collect()
        }

        /// No manifest refers to a missing object and every backup has its
        /// WAL from its start to the end of the archive.
        fn assert_consistent(&self) {
            for id in self.repo.list_backups().unwrap() {
                let (m, _) = self.repo.get_manifest(&id).unwrap();
                for h in m.objects() {
                    assert!(self.repo.head_data(&h).unwrap().is_some(), "backup '{id}' lost object {h}");
                }
                let first = self.identity.segment_size.segment_of(m.start_lsn).0;
                let wal = self.wal();
                for s in first..=LAST_SEGMENT {
                    assert!(wal.contains(&self.segment(s)), "backup '{id}' lost WAL segment {s}");
                }
            }
        }
    }

    /// Backups A, B, C, D starting in segments 2, 5, 8, 10, consistent 4 to
    /// 1 days ago, sharing object `s` and one object each; an old and a
    /// young unreferenced object; WAL segments 1 to 12 with a backup
    /// history file in segment 2. Returns (shared, [a, b, c, d], old, young).
    fn scenario(t: &T) -> (Hash, Vec<Hash>, Hash, Hash) {
        t.push(1..=LAST_SEGMENT);
        let backup_file = format!("{}.00000028.backup", t.segment(2));
        let path = t.dir.join(&backup_file);
        std::fs::write(&path, "START WAL LOCATION: 0/200028 (file 000000010000000000000002)\n").unwrap();
        crate::push::push(&t.config, &path).unwrap();
        let s = t.object(b"shared", 5 * DAY_MS);
        let own: Vec<Hash> = [b"a", b"b", b"c", b"d"].iter().map(|b| t.object(*b, 5 * DAY_MS)).collect();
        for (i, (id, seg)) in [("A", 2), ("B", 5), ("C", 8), ("D", 10)].into_iter().enumerate() {
            t.backup(id, seg, 4 - i as i64, &[s, own[i]]);
        }
        let old = t.object(b"left by a failed backup", 2 * DAY_MS);
        let young = t.object(b"written by a backup in progress", 60_000);
        (s, own, old, young)
    }

    #[test]
    fn expire_deletes_what_the_policy_drops_and_nothing_else() {
        let t = T::new("main");
        let (s, own, old, young) = scenario(&t);
        let before = t.wal();

        // A dry run says it all and deletes nothing.
        let dry = expire(&t.config, &ExpireOptions { dry_run: true, ..t.opts(2) }).unwrap();
        assert_eq!(t.wal(), before);
        assert_eq!(t.repo.list_backups().unwrap(), ["A", "B", "C", "D"]);
        assert_eq!((dry.data_objects_deleted, dry.data_objects_in_grace, dry.wal_files_deleted), (3, 1, 8));
        let text = dry.to_string();
        assert!(text.starts_with("dry run: nothing was deleted\n"), "{text}");
        assert!(text.contains("would delete backup 'A': kept by no rule (keep-last 2)"), "{text}");
        assert!(text.contains("keep backup 'D': newest 2 (keep-last)"), "{text}");
        assert!(
            text.contains(&format!(
                "  '{}' to '{}' (8 files): older than every kept backup on timeline 1",
                t.segment(1),
                t.segment(7)
            )),
            "{text}"
        );

        let report = expire(&t.config, &t.opts(2)).unwrap();
        let ids: Vec<&str> = report.deleted_backups.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(ids, ["A", "B"]);
        assert_eq!(t.repo.list_backups().unwrap(), ["C", "D"]);
        for gone in [own[0], own[1], old] {
            assert!(!t.object_path(&gone).exists());
        }
        for kept in [s, own[2], own[3], young] {
            assert!(t.object_path(&kept).exists());
        }
        assert_eq!(t.wal(), t.segments(8..=LAST_SEGMENT));
        assert_eq!((report.data_objects_deleted, report.wal_files_deleted), (3, 8));
        assert!(report.wal_bytes_deleted > 0 && report.data_bytes_deleted > 0);
        assert!(report.to_string().contains("data objects: 3 deleted"), "{report}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["deleted_backups"][0]["name"], "A");
        assert_eq!(json["wal_deleted"][0]["files"], 8);
        t.assert_consistent();
        // The catalog followed.
        let catalog = Catalog::open_existing(&t.config.catalog).unwrap();
        let ids: Vec<String> = catalog.backups().unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, ["C", "D"]);
        let names: Vec<String> = catalog.all_wal().unwrap().iter().map(|r| r.name.to_string()).collect();
        assert_eq!(names, t.segments(8..=LAST_SEGMENT));

        // Again: nothing more.
        let again = expire(&t.config, &t.opts(2)).unwrap();
        assert!(again.deleted_backups.is_empty());
        assert_eq!((again.data_objects_deleted, again.wal_files_deleted, again.data_objects_in_grace), (0, 0, 1));
    }

    #[test]
    fn records_of_dropped_wal_go_once_every_remaining_backup_started_after_the_drop() {
        let t = T::new("gaps");
        scenario(&t);
        // Only the drop time decides (a backup started after a drop starts
        // past it): one drop between A's and B's start, one between C's
        // and D's. Segments 20 and 21 are not archived, as dropped ones.
        let gap = |segno: u64, age_ms: i64| crate::catalog::DroppedWal {
            name: t.segment(segno),
            timeline: 1,
            segno: Some(segno),
            dropped_at_ms: t.now_ms - age_ms,
            reason: "repository unreachable".into(),
        };
        t.repo.put_gap(&gap(20, 3 * DAY_MS + DAY_MS / 2)).unwrap();
        t.repo.put_gap(&gap(21, DAY_MS + DAY_MS / 2)).unwrap();
        let dropped = |t: &T| -> Vec<String> {
            let catalog = Catalog::open_existing(&t.config.catalog).unwrap();
            crate::info::dropped_wal(&catalog).unwrap().into_iter().map(|d| d.name).collect()
        };

        // keep-last 2 keeps C and D: C started after the first drop, not
        // after the second, whose record PITR from C still needs.
        let dry = expire(&t.config, &ExpireOptions { dry_run: true, ..t.opts(2) }).unwrap();
        assert_eq!(dry.gap_records_deleted, [t.segment(20)]);
        assert_eq!(t.repo.list_gaps().unwrap().len(), 2, "a dry run deletes no record");
        let text = dry.to_string();
        assert!(text.contains(&format!("dropped-WAL records: 1 would be deleted, older than every remaining backup (PITR from them never crosses the gap): '{}'", t.segment(20))), "{text}");
        // info's preview of the next expire under the same policy names it.
        let mut config = t.config.clone();
        config.retention.keep_last = Some(2);
        assert_eq!(preview(&config, t.now_ms).unwrap().unwrap().gap_records, [t.segment(20)]);
        let info = crate::info::info(&config, t.now_ms).unwrap().to_string();
        assert!(
            info.contains(&format!(
                "  and 1 dropped-WAL record(s), as every backup it keeps started after the drop: '{}'",
                t.segment(20)
            )),
            "{info}"
        );

        let report = expire(&t.config, &t.opts(2)).unwrap();
        assert_eq!(report.gap_records_deleted, [t.segment(20)]);
        let left: Vec<String> = t.repo.list_gaps().unwrap().into_iter().map(|g| g.name).collect();
        assert_eq!(left, [t.segment(21)]);
        assert_eq!(dropped(&t), [t.segment(21)], "the catalog followed");
        assert_eq!(serde_json::to_value(&report).unwrap()["gap_records_deleted"][0], t.segment(20));

        // Once D alone remains, the second record goes too, and a rebuilt
        // catalog knows of neither.
        let report = expire(&t.config, &t.opts(1)).unwrap();
        assert_eq!(report.gap_records_deleted, [t.segment(21)]);
        assert!(t.repo.list_gaps().unwrap().is_empty());
        crate::rebuild::rebuild(&t.config).unwrap();
        assert!(dropped(&t).is_empty());
        t.assert_consistent();
    }

    #[test]
    fn keep_forever_backups_and_their_wal_stay() {
        let t = T::new("forever");
        let (_, own, _, _) = scenario(&t);
        t.repo.set_keep_forever("A", true).unwrap();
        let report = expire(&t.config, &t.opts(2)).unwrap();
        assert_eq!(t.repo.list_backups().unwrap(), ["A", "C", "D"]);
        assert_eq!(report.kept[0].reasons, ["marked keep-forever"]);
        assert!(t.object_path(&own[0]).exists() && !t.object_path(&own[1]).exists());
        // A needs the WAL from segment 2 on; its .backup file stays too.
        let mut want = t.segments(2..=LAST_SEGMENT);
        want.insert(1, format!("{}.00000028.backup", t.segment(2)));
        assert_eq!(t.wal(), want);
        assert!(report.notes.iter().any(|n| n.contains("'A' is marked keep-forever")), "{:?}", report.notes);
        t.assert_consistent();
    }

    /// `kill -9` after any number of deletions leaves a consistent
    /// repository, and running expire again finishes the job.
    #[test]
    fn an_interrupted_expire_is_consistent_and_a_rerun_finishes() {
        // 2 backups, 3 data objects, 8 WAL files.
        for stop_after in [0, 1, 2, 3, 4, 6, 9, 12] {
            let t = T::new(&format!("kill{stop_after}"));
            let (s, own, old, young) = scenario(&t);
            let e = run(&t.config, &t.opts(2), Budget(Some(stop_after))).unwrap_err();
            assert!(e.to_string().contains("test hook"), "{e}");
            t.assert_consistent();
            expire(&t.config, &t.opts(2)).unwrap();
            t.assert_consistent();
            assert_eq!(t.repo.list_backups().unwrap(), ["C", "D"], "stopped after {stop_after}");
            assert_eq!(t.wal(), t.segments(8..=LAST_SEGMENT), "stopped after {stop_after}");
            for (h, exists) in
                [(s, true), (own[0], false), (own[1], false), (own[2], true), (old, false), (young, true)]
            {
                assert_eq!(t.object_path(&h).exists(), exists, "stopped after {stop_after}");
            }
            let ids: Vec<String> = Catalog::open_existing(&t.config.catalog)
                .unwrap()
                .backups()
                .unwrap()
                .into_iter()
                .map(|b| b.id)
                .collect();
            assert_eq!(ids, ["C", "D"]);
        }
    }

    #[test]
    fn a_second_expire_fails_naming_the_first() {
        let t = T::new("lock");
        scenario(&t);
        let held = RepoLock::acquire(&t.repo, LockMode::Exclusive, "expire", Duration::ZERO).unwrap();
        let e = expire(&t.config, &t.opts(1)).unwrap_err().to_string();
        let want = format!(
            "repository '{}' is locked by expire (pid {} on host {} since ",
            t.repo.location(),
            std::process::id(),
            host_name()
        );
        assert!(e.contains(&want), "{e}");
        assert!(e.contains(&want), "{e}");
        drop(held);
        // A backup shares the lock: expire waits for it or fails; a dry run
        // runs beside it.
        let backup = RepoLock::acquire_config(&t.config, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        let e = expire(&t.config, &t.opts(1)).unwrap_err().to_string();
        assert!(e.contains("is locked by backup (pid"), "{e}");
        let dry = expire(&t.config, &ExpireOptions { dry_run: true, ..t.opts(1) }).unwrap();
        assert_eq!(dry.deleted_backups.len(), 3);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            drop(backup);
        });
        let report = expire(&t.config, &ExpireOptions { wait_secs: 30, ..t.opts(1) }).unwrap();
        releaser.join().unwrap();
        assert_eq!(report.deleted_backups.len(), 3);
        assert_eq!(t.repo.list_backups().unwrap(), ["D"]);
    }

    #[test]
    fn a_marked_backup_is_never_deleted_even_if_planned() {
        let t = T::new("mark");
        scenario(&t);
        t.repo.set_keep_forever("B", true).unwrap();
        assert!(!delete_backup(&t.repo, "B", &mut Budget(None)).unwrap());
        assert!(delete_backup(&t.repo, "A", &mut Budget(None)).unwrap());
        assert_eq!(t.repo.list_backups().unwrap(), ["B", "C", "D"]);
        assert_eq!(t.repo.keep_forever_marks().unwrap().into_iter().collect::<Vec<_>>(), ["B"]);
    }

    #[test]
    fn refusals_delete_nothing() {
        let t = T::new("refuse");
        scenario(&t);
        let before = (t.wal(), t.repo.list_backups().unwrap());

        let none = ExpireOptions { policy: RetentionPolicy::default(), ..t.opts(1) };
        let report = expire(&t.config, &none).unwrap();
        assert_eq!(report.to_string(), "no retention policy: nothing to expire\n");

        // A policy that keeps no backup.
        let policy = RetentionPolicy { keep_daily: Some(0), ..Default::default() };
        let e = expire(&t.config, &ExpireOptions { policy, ..t.opts(1) }).unwrap_err().to_string();
        assert!(e.contains("keeps none of the 4 backups") && e.contains("the newest, 'D'"), "{e}");

        // A damaged manifest: what it refers to is unknown.
        let key = Path::new(&t.config.repository).join(t.repo.manifest_key("B"));
        let mut bytes = std::fs::read(&key).unwrap();
        bytes.truncate(10);
        std::fs::write(&key, bytes).unwrap();
        let e = expire(&t.config, &t.opts(1)).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("main/backups/B/manifest"), "{e}");
        assert_eq!((t.wal(), t.repo.list_backups().unwrap()), before);
    }

    #[test]
    fn preview_reads_the_catalog_only() {
        let t = T::new("preview");
        scenario(&t);
        crate::rebuild::rebuild(&t.config).unwrap();
        assert_eq!(preview(&t.config, t.now_ms).unwrap(), None);
        let mut config = t.config.clone();
        config.retention.keep_last = Some(3);
        let p = preview(&config, t.now_ms).unwrap().unwrap();
        assert_eq!(p.delete_backups.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["A"]);
        assert_eq!(p.wal_files, 5);
        assert!(p.wal_bytes > 0 && p.refused.is_none());
        config.retention = RetentionPolicy { keep_weekly: Some(0), ..Default::default() };
        let p = preview(&config, t.now_ms).unwrap().unwrap();
        assert!(p.refused.unwrap().contains("keeps none"));
        assert_eq!(t.repo.list_backups().unwrap().len(), 4);
    }
}
