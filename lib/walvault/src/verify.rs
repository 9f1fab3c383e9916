//! `walvault verify`: reads every object of a cluster in the repository
//! and checks that the archive is whole.
//!
//! The repository is the source of truth (invariant 6), so verify works
//! from one listing of the cluster's prefix, never from the catalog, which
//! may be stale. It then reads every object on `jobs` threads and checks:
//! - every envelope (header, payload check, plaintext length and hash);
//! - that a WAL segment is a segment of this cluster at the position its
//!   name says, that history and backup history files parse;
//! - that a data object's plaintext hashes to its name;
//! - that every manifest parses, describes this cluster, and that every data
//!   object and WAL segment (from its start to its stop) it needs exists and
//!   is intact;
//! - per timeline, the segments missing between the first and the last
//!   archived one, and whether the newest backup's chain of WAL reaches the
//!   end of the archive (the PITR planner's answer, [`crate::plan`]);
//! - data objects no manifest refers to (orphans), and objects that are not
//!   part of the layout.
//!
//! A damaged or unreadable object never stops the run: each is one
//! [`Finding`] in [`VerifyReport::problems`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;
use walvault_formats::manifest::{Hash, Manifest};
use walvault_formats::object::{self, ContentHash, DecodeToError};
use walvault_formats::wal::{
    ClusterIdentity, HistoryEntry, SegmentName, SegmentNo, TimelineId, WalFileName, WalSegmentSize, parse_history,
    validate_segment,
};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::info::human_bytes;
use crate::plan::{self, ArchiveState, ArchivedSegment, BackupPoint, PlanError, Request, Target, TimelineTarget};
use crate::repo::{DrillRecord, Repository, now_ms};
use crate::storage::{ObjectMeta, StorageError};

/// What to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Only this backup: its manifest, its data objects and its WAL from
    /// start to stop.
    pub backup: Option<String>,
    /// Only WAL: every WAL object, the gaps, and the WAL each backup needs
    /// (manifests are read for their WAL positions; data objects are not).
    pub wal_only: bool,
    /// Objects read and checked in parallel (0 counts as 1).
    pub jobs: usize,
}

/// Why verify could not run at all. Damaged objects are not errors: they
/// are [`VerifyReport::problems`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// `--backup` names no backup of the repository.
    #[error("backup '{id}' not found in repository '{repo}' (cluster '{cluster}')")]
    BackupNotFound {
        /// The identifier given.
        id: String,
        /// The repository.
        repo: String,
        /// The cluster name.
        cluster: String,
    },
}

impl VerifyError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            VerifyError::BackupNotFound { .. } => {
                "'walvault info' lists the backups ('walvault catalog rebuild' first if the catalog may be stale)"
                    .into()
            }
        })
    }
}

/// Until `error.rs` has `Error::Verify(#[from] VerifyError)`: the closest
/// existing error. Then this becomes `Error::Verify(e)`.
fn into_error(e: VerifyError) -> Error {
    Error::Verify(e)
}

/// What kind of trouble a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// An object fails its envelope checks or holds the wrong content.
    Damaged,
    /// An object is listed but cannot be read.
    Unreadable,
    /// A data object a manifest refers to does not exist.
    MissingObject,
    /// A WAL segment a backup needs to become consistent is not archived
    /// (and lies outside any gap: before the first or after the last
    /// archived segment of its timeline).
    MissingWal,
    /// Segments missing between two archived ones of a timeline.
    WalGap,
    /// The newest backup's chain of WAL does not reach the end of the
    /// archive, for a reason no other finding shows.
    HeadUnreachable,
    /// A data object no manifest refers to.
    Orphan,
    /// An object that is not part of the repository layout.
    Stray,
    /// A part of the verification that could not be done.
    Skipped,
    /// About the repository lock: verify ran without it (this host cannot
    /// write it), or removed the record of a holder that no longer runs.
    Lock,
}

/// One problem or note: `<what> '<subject>': <detail>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Machine-readable kind.
    pub kind: FindingKind,
    /// What, in words: "damaged WAL file", "WAL gap", "orphaned data object".
    pub what: String,
    /// The object key or WAL file name concerned.
    pub subject: String,
    /// What is wrong, and what it breaks.
    pub detail: String,
}

impl Finding {
    fn new(kind: FindingKind, what: impl Into<String>, subject: impl Into<String>, detail: impl Into<String>) -> Self {
        Finding { kind, what: what.into(), subject: subject.into(), detail: detail.into() }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}': {}", self.what, self.subject, self.detail)
    }
}

/// What was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every object of the cluster.
    All,
    /// WAL only (`--wal`).
    Wal,
    /// One backup (`--backup`).
    Backup,
}

/// The outcome of a verification; serialized as-is for `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Repository location.
    pub repository: String,
    /// Cluster name.
    pub cluster: String,
    /// What was verified.
    pub scope: Scope,
    /// With [`Scope::Backup`], the backup.
    pub backup: Option<String>,
    /// Objects read in full.
    pub objects_read: u64,
    /// Stored bytes read.
    pub bytes_read: u64,
    /// WAL files read (segments, partial, history and backup history files).
    pub wal_files: u64,
    /// Data objects read.
    pub data_objects: u64,
    /// Manifests read.
    pub backups: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
    /// Everything that is wrong; empty means the repository verified.
    pub problems: Vec<Finding>,
    /// Things worth knowing that are not wrong (young unreferenced objects,
    /// gaps no backup needs, checks that could not be made).
    pub notes: Vec<Finding>,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        let scope = match (&self.scope, &self.backup) {
            (Scope::Backup, Some(id)) => format!("backup '{id}' of cluster '{}'", self.cluster),
            (Scope::Wal, _) => format!("WAL of cluster '{}'", self.cluster),
            _ => format!("cluster '{}'", self.cluster),
        };
        let count = self.problems.len();
        write!(
            f,
            "verified {scope} in repository '{}': {} read ({}): {}, {}, {}; {}; {:.1} s",
            self.repository,
            plural(self.objects_read, "object", "objects"),
            human_bytes(self.bytes_read),
            plural(self.wal_files, "WAL file", "WAL files"),
            plural(self.data_objects, "data object", "data objects"),
            plural(self.backups, "manifest", "manifests"),
            plural(count as u64, "problem", "problems"),
            self.elapsed_ms as f64 / 1000.0
        )
    }
}

/// Verifies the cluster the configuration names; see the module docs.
///
/// Holds the repository lock shared, as restore does (waiting up to
/// [`crate::lock::READER_WAIT`] for an expire): an expire deleting
/// backups and objects meanwhile would otherwise show up as objects
/// missing from manifests read a moment before — false alarms.
///
/// # Errors
/// Only what prevents verifying at all: the repository or its cluster
/// identity cannot be read, the listing fails, `--backup` names no backup,
/// or an expire still holds the lock after the wait. Everything found
/// wrong is in the report.
pub fn verify(config: &Config, opts: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut lock_notes = Vec::new();
    let _lock = crate::lock::shared_for_reading(config, "verify", &mut lock_notes)?;
    let repo = Repository::open_config(config)?;
    let mut report = verify_repository(&repo, config.grace_secs, opts, now_ms())?;
    report
        .notes
        .extend(lock_notes.into_iter().map(|n| Finding::new(FindingKind::Lock, "repository lock", repo.location(), n)));
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

/// Where an object belongs in the layout (see [`crate::repo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    Cluster,
    /// `<cluster>/lock`: the empty file the repository lock (`flock`) is
    /// taken on; not an object, never read. Its holder records
    /// (`lock.d/<command>+<pid>+<n>`) are not valid keys, so never listed.
    /// On object stores, the lock objects `<cluster>/locks/*` of running
    /// commands ([`crate::lock`]): not envelopes, never read.
    Lock,
    Wal(WalFileName),
    Data(Hash),
    Manifest(String),
    KeepForever(String),
    Drill(String),
    /// The record of a WAL file dropped under `queue-max`.
    Gap(String),
}

impl Class {
    fn noun(&self) -> &'static str {
        match self {
            Class::Cluster => "cluster identity",
            Class::Lock => "lock file",
            Class::Wal(WalFileName::History(_)) => "timeline history file",
            Class::Wal(WalFileName::BackupHistory(..)) => "backup history file",
            Class::Wal(_) => "WAL file",
            Class::Data(_) => "data object",
            Class::Manifest(_) => "manifest",
            Class::KeepForever(_) => "keep-forever mark",
            Class::Drill(_) => "drill record",
            Class::Gap(_) => "dropped-WAL record",
        }
    }
}

/// The place of `key` in the layout, or why it has none.
fn classify(repo: &Repository, key: &str) -> std::result::Result<Class, &'static str> {
    let rest = key.strip_prefix(repo.cluster()).and_then(|r| r.strip_prefix('/')).unwrap_or(key);
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["cluster"] => Ok(Class::Cluster),
        ["lock"] | ["locks", _] => Ok(Class::Lock),
        ["wal", _, file] => {
            let name: WalFileName = file.parse().map_err(|_| "not a WAL file name")?;
            if repo.wal_key(&name) == key { Ok(Class::Wal(name)) } else { Err("a WAL file in the wrong directory") }
        }
        ["data", _, hex] => {
            let hash = ContentHash::from_hex(hex).map(Hash::from).ok_or("not a data object name")?;
            if repo.data_key(&hash) == key {
                Ok(Class::Data(hash))
            } else {
                Err("a data object in the wrong directory")
            }
        }
        ["backups", id, "manifest"] => Ok(Class::Manifest((*id).to_string())),
        ["backups", id, "keep-forever"] => Ok(Class::KeepForever((*id).to_string())),
        ["drills", id] => Ok(Class::Drill((*id).to_string())),
        ["gaps", name] => Ok(Class::Gap((*name).to_string())),
        _ => Err("not part of the repository layout"),
    }
}

/// One listed object and its place in the layout.
struct Job<'a> {
    meta: &'a ObjectMeta,
    class: Class,
}

impl Job<'_> {
    fn key(&self) -> &str {
        &self.meta.key
    }
}

/// A manifest reduced to what verify needs, so that the manifests of a
/// large cluster (a million chunks each) are not all held at once.
struct BackupSummary {
    point: BackupPoint,
    tli: TimelineId,
    /// Start and stop segments.
    s0: u64,
    s1: u64,
    /// Every data object it refers to.
    objects: Vec<Hash>,
}

/// What reading an object found.
enum Content {
    Fine,
    Backup(Box<BackupSummary>),
    History(Vec<HistoryEntry>),
}

/// The result of reading one object.
struct Outcome {
    /// Stored bytes read; `None` when the read failed.
    bytes: Option<u64>,
    result: std::result::Result<Content, Damage>,
}

struct Damage {
    unreadable: bool,
    detail: String,
}

fn damaged(detail: impl Into<String>) -> Damage {
    Damage { unreadable: false, detail: detail.into() }
}

/// Reads `job`'s object and checks it; never fails.
fn read_and_check(repo: &Repository, identity: &ClusterIdentity, job: &Job<'_>) -> Outcome {
    let bytes = match repo.storage().get(job.key()) {
        Ok(b) => b,
        Err(e) => {
            let detail = match e {
                StorageError::NotFound { .. } => {
                    "it disappeared after the listing (removed by a concurrent 'walvault expire'?)".to_string()
                }
                e => format!("unable to read: {e}"),
            };
            return Outcome { bytes: None, result: Err(Damage { unreadable: true, detail }) };
        }
    };
    let result = check_bytes(repo, identity, &job.class, &bytes);
    Outcome { bytes: Some(bytes.len() as u64), result }
}

fn check_bytes(
    repo: &Repository,
    identity: &ClusterIdentity,
    class: &Class,
    bytes: &[u8],
) -> std::result::Result<Content, Damage> {
    if let Class::Data(hash) = class {
        // Streamed into a sink: a data object's plaintext (up to a bundle,
        // 8 MiB) is hashed, never held.
        return match object::decode_to(bytes, &mut std::io::sink()) {
            Ok(h) if h.hash == ContentHash::from(*hash) => Ok(Content::Fine),
            Ok(h) => Err(damaged(format!("holds content with blake3 {}, not the content its name says", h.hash))),
            Err(DecodeToError::Object(e)) => Err(damaged(e.to_string())),
            Err(DecodeToError::Write(e)) => Err(damaged(e.to_string())),
        };
    }
    // Other objects are checked whole: a segment's check needs its length
    // and its first page together.
    let (_, plain) = object::decode(bytes).map_err(|e| damaged(e.to_string()))?;
    match class {
        Class::Data(_) | Class::Lock => Ok(Content::Fine),
        Class::Wal(WalFileName::Segment(seg) | WalFileName::Partial(seg)) => validate_segment(&plain, *seg, identity)
            .map(|_| Content::Fine)
            .map_err(|e| damaged(format!("not a WAL segment of this cluster: {e}"))),
        Class::Wal(WalFileName::History(tli)) => {
            let entries = parse_history(&plain).map_err(|e| damaged(format!("not a timeline history file: {e}")))?;
            if let Some(last) = entries.last().filter(|e| e.parent >= *tli) {
                return Err(damaged(format!("lists timeline {} as an ancestor of timeline {tli}", last.parent)));
            }
            Ok(Content::History(entries))
        }
        Class::Wal(WalFileName::BackupHistory(..)) => {
            if std::str::from_utf8(&plain).is_ok_and(|t| t.starts_with("START WAL LOCATION: ")) {
                Ok(Content::Fine)
            } else {
                Err(damaged("not a backup history file: expected text starting with 'START WAL LOCATION: '"))
            }
        }
        Class::Manifest(id) => check_manifest(repo, identity, id, &plain).map(|b| Content::Backup(Box::new(b))),
        Class::Cluster | Class::KeepForever(_) => serde_json::from_slice::<serde_json::Value>(&plain)
            .map(|_| Content::Fine)
            .map_err(|e| damaged(format!("not JSON: {e}"))),
        Class::Drill(id) => match serde_json::from_slice::<DrillRecord>(&plain) {
            Ok(d) if d.id == *id => Ok(Content::Fine),
            Ok(d) => Err(damaged(format!("records drill '{}'", d.id))),
            Err(e) => Err(damaged(format!("not a drill record: {e}"))),
        },
        Class::Gap(name) => match serde_json::from_slice::<crate::catalog::DroppedWal>(&plain) {
            Ok(g) if g.name == *name => Ok(Content::Fine),
            Ok(g) => Err(damaged(format!("records dropped file '{}'", g.name))),
            Err(e) => Err(damaged(format!("not a dropped-WAL record: {e}"))),
        },
    }
}

/// The start and stop segments of a manifest, checked.
fn wal_bounds(m: &Manifest, size: WalSegmentSize) -> std::result::Result<(TimelineId, u64, u64), String> {
    let seg = |text: &str, field: &str| match text.parse::<WalFileName>() {
        Ok(WalFileName::Segment(s)) => s
            .segno(size)
            .map(|n| (s.timeline, n.0))
            .ok_or_else(|| format!("{field} '{text}' is not a segment name for {size} segments")),
        _ => Err(format!("{field} '{text}' is not a WAL segment name")),
    };
    let (tli, s0) = seg(&m.start_wal, "start_wal")?;
    let (stop_tli, s1) = seg(&m.stop_wal, "stop_wal")?;
    if tli.get() != m.timeline || stop_tli != tli {
        return Err(format!(
            "start_wal '{}' and stop_wal '{}' are not both on the backup's timeline {}",
            m.start_wal, m.stop_wal, m.timeline
        ));
    }
    if s1 < s0 {
        return Err(format!("stop_wal '{}' precedes start_wal '{}'", m.stop_wal, m.start_wal));
    }
    Ok((tli, s0, s1))
}

/// Parses and checks a manifest against the cluster; returns its summary.
fn check_manifest(
    repo: &Repository,
    identity: &ClusterIdentity,
    id: &str,
    plain: &[u8],
) -> std::result::Result<BackupSummary, Damage> {
    let m = Manifest::from_json(plain).map_err(|e| damaged(e.to_string()))?;
    let wrong = if m.id != id || m.cluster != repo.cluster() {
        Some(format!("names backup '{}' of cluster '{}'", m.id, m.cluster))
    } else if m.system_identifier != identity.system_id.0 {
        Some(format!("describes system identifier {}, the cluster's is {}", m.system_identifier, identity.system_id))
    } else if m.pg_version != identity.pg_version.major() {
        Some(format!("describes PostgreSQL {}, the cluster runs {}", m.pg_version, identity.pg_version))
    } else if m.wal_segment_size != identity.segment_size.bytes() {
        Some(format!("describes {}-byte WAL segments, the cluster's are {}", m.wal_segment_size, identity.segment_size))
    } else {
        None
    };
    if let Some(detail) = wrong {
        return Err(damaged(detail));
    }
    let (tli, s0, s1) = wal_bounds(&m, identity.segment_size).map_err(damaged)?;
    Ok(BackupSummary {
        point: BackupPoint {
            id: m.id.clone(),
            timeline: m.timeline,
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            stop_time_us: m.stop_time_ms.saturating_mul(1000),
            next_xid: m.next_xid,
        },
        tli,
        s0,
        s1,
        objects: m.objects().into_iter().collect(),
    })
}

/// Runs `f` on every item with `jobs` threads; results in item order. A
/// panic (a bug) while handling one item becomes `panicked(item)`, so one
/// bad object never ends the run.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    f: impl Fn(&T) -> R + Sync,
    panicked: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let threads = jobs.clamp(1, items.len().max(1));
    let mut slots: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let r = catch_unwind(AssertUnwindSafe(|| f(item))).unwrap_or_else(|_| panicked(item));
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        for h in handles {
            // Panics are caught per item above; a thread cannot fail.
            if let Ok(done) = h.join() {
                for (i, r) in done {
                    if let Some(slot) = slots.get_mut(i) {
                        *slot = Some(r);
                    }
                }
            }
        }
    });
    slots.into_iter().zip(items).map(|(r, item)| r.unwrap_or_else(|| panicked(item))).collect()
}

/// `3 d`, `5 h`, `12 min`, `40 s`.
fn human_secs(s: u64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// `'B1'`, `'B1' and 'B2'`, `'B1', 'B2', 'B3' and 2 more`; `total` counts
/// items beyond those given.
fn quoted_list<S: AsRef<str>>(items: &[S], total: usize) -> String {
    let q: Vec<String> = items.iter().take(3).map(|i| format!("'{}'", i.as_ref())).collect();
    let more = total.saturating_sub(q.len());
    match (q.as_slice(), more) {
        ([], _) => String::new(),
        ([a], 0) => a.clone(),
        ([a, b], 0) => format!("{a} and {b}"),
        ([a, b, c], 0) => format!("{a}, {b} and {c}"),
        (q, n) => format!("{} and {n} more", q.join(", ")),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "backup 'B1'", "backups 'B1' and 'B2'".
fn backups_named<S: AsRef<str>>(ids: &[S], total: usize) -> String {
    format!("{} {}", if total == 1 { "backup" } else { "backups" }, quoted_list(ids, total))
}

/// Problems being collected, with notes appended to earlier ones (a
/// damaged segment is also what a backup needs, a gap is also where the
/// newest backup's recovery stops).
#[derive(Default)]
struct Findings {
    problems: Vec<Finding>,
    notes: Vec<Finding>,
    /// Appended to `problems[i].detail`, joined with "; ".
    extra: BTreeMap<usize, Vec<String>>,
}

impl Findings {
    fn problem(&mut self, f: Finding) -> usize {
        self.problems.push(f);
        self.problems.len() - 1
    }

    fn note(&mut self, f: Finding) {
        self.notes.push(f);
    }

    fn annotate(&mut self, i: usize, text: String) {
        let list = self.extra.entry(i).or_default();
        if !list.contains(&text) {
            list.push(text);
        }
    }

    fn finish(mut self) -> (Vec<Finding>, Vec<Finding>) {
        for (i, extra) in self.extra {
            if let Some(p) = self.problems.get_mut(i) {
                p.detail = format!("{}; {}", p.detail, extra.join("; "));
            }
        }
        (self.problems, self.notes)
    }
}

#[derive(Default)]
struct Counts {
    objects: u64,
    bytes: u64,
    wal: u64,
    data: u64,
    manifests: u64,
}

/// Which backups refer to one data object: the first three (indexes into
/// the backups) and how many; compact, as there is one per data object.
#[derive(Default, Clone, Copy)]
struct Refs {
    first: [u32; 3],
    count: u32,
}

impl Refs {
    fn add(&mut self, backup: u32) {
        if let Some(slot) = self.first.get_mut(self.count as usize) {
            *slot = backup;
        }
        self.count = self.count.saturating_add(1);
    }

    fn describe(&self, backups: &[BackupSummary]) -> String {
        let shown = self.first.get(..(self.count as usize).min(3)).unwrap_or(&[]);
        let ids: Vec<&str> =
            shown.iter().filter_map(|&i| backups.get(i as usize)).map(|b| b.point.id.as_str()).collect();
        backups_named(&ids, self.count as usize)
    }
}

/// What one verification has gathered so far.
struct Run<'a> {
    repo: &'a Repository,
    identity: ClusterIdentity,
    scope: Scope,
    jobs: usize,
    fx: Findings,
    counts: Counts,
    /// Problem index of each damaged or unreadable object, by key.
    damaged_at: HashMap<String, usize>,
}

impl Run<'_> {
    /// Reads and checks `jobs` in parallel, files the problems, and returns
    /// what each intact object held (`None` for damaged ones).
    fn read(&mut self, jobs: &[&Job<'_>]) -> Vec<Option<Content>> {
        let (repo, identity) = (self.repo, &self.identity);
        let outcomes = parallel(
            jobs,
            self.jobs,
            |j| read_and_check(repo, identity, j),
            |_| Outcome {
                bytes: None,
                result: Err(Damage {
                    unreadable: true,
                    detail: "internal error while checking it (please report)".into(),
                }),
            },
        );
        jobs.iter().zip(outcomes).map(|(job, outcome)| self.record(job, outcome)).collect()
    }

    fn record(&mut self, job: &Job<'_>, outcome: Outcome) -> Option<Content> {
        if let Some(b) = outcome.bytes {
            self.counts.objects += 1;
            self.counts.bytes += b;
            match job.class {
                Class::Wal(_) => self.counts.wal += 1,
                Class::Data(_) => self.counts.data += 1,
                Class::Manifest(_) => self.counts.manifests += 1,
                _ => {}
            }
        }
        match outcome.result {
            Ok(content) => Some(content),
            Err(d) => {
                let (kind, adjective) = if d.unreadable {
                    (FindingKind::Unreadable, "unreadable")
                } else {
                    (FindingKind::Damaged, "damaged")
                };
                let what = format!("{adjective} {}", job.class.noun());
                let i = self.fx.problem(Finding::new(kind, what, job.key(), d.detail));
                self.damaged_at.insert(job.key().to_string(), i);
                None
            }
        }
    }
}

/// Verifies the cluster of `repo`; `now_ms` decides which unreferenced
/// objects are older than the grace period.
pub(crate) fn verify_repository(
    repo: &Repository,
    grace_secs: u64,
    opts: &VerifyOptions,
    now_ms: i64,
) -> Result<VerifyReport> {
    let identity = repo.cluster_info()?.identity;
    let scope = match (&opts.backup, opts.wal_only) {
        (Some(_), _) => Scope::Backup,
        (None, true) => Scope::Wal,
        (None, false) => Scope::All,
    };
    let prefix = format!("{}/", repo.cluster());
    let mut listing = repo.storage().list(&prefix).map_err(|source| Error::Storage {
        op: "list",
        name: prefix.clone(),
        repo: repo.location(),
        source,
    })?;
    listing.sort_by(|a, b| a.key.cmp(&b.key));
    let mut run = Run {
        repo,
        identity,
        scope,
        jobs: opts.jobs,
        fx: Findings::default(),
        counts: Counts::default(),
        damaged_at: HashMap::new(),
    };

    let mut all: Vec<Job<'_>> = Vec::with_capacity(listing.len());
    let mut strays = Vec::new();
    for meta in &listing {
        match classify(repo, &meta.key) {
            Ok(class) => all.push(Job { meta, class }),
            Err(reason) if scope == Scope::All || (scope == Scope::Wal && meta.key.starts_with(&repo.wal_prefix())) => {
                strays.push(Finding::new(
                    FindingKind::Stray,
                    "stray object",
                    &meta.key,
                    format!("{reason}: walvault never writes it; move it out of the repository"),
                ));
            }
            Err(_) => {}
        }
    }

    // Manifests first: what the backups need decides what else is read
    // (with --backup) and how findings are described.
    let manifest_jobs: Vec<&Job<'_>> = all
        .iter()
        .filter(|j| match (&j.class, &opts.backup) {
            (Class::Manifest(id), Some(want)) => id == want,
            (Class::Manifest(_), None) => true,
            _ => false,
        })
        .collect();
    if let Some(id) = &opts.backup
        && manifest_jobs.is_empty()
    {
        return Err(into_error(VerifyError::BackupNotFound {
            id: id.clone(),
            repo: repo.location(),
            cluster: repo.cluster().to_string(),
        }));
    }
    let mut backups: Vec<BackupSummary> = Vec::new();
    let mut unreadable_manifests = 0usize;
    for content in run.read(&manifest_jobs) {
        match content {
            Some(Content::Backup(b)) => backups.push(*b),
            _ => unreadable_manifests += 1,
        }
    }
    let mut refs: HashMap<Hash, Refs> = HashMap::new();
    for (i, b) in backups.iter_mut().enumerate() {
        for h in std::mem::take(&mut b.objects) {
            if scope != Scope::Wal {
                refs.entry(h).or_default().add(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
    }
    // The backups that need each segment to become consistent.
    let mut needed: BTreeMap<(u32, u64), Vec<&str>> = BTreeMap::new();
    for b in &backups {
        for s in b.s0..=b.s1 {
            needed.entry((b.tli.get(), s)).or_default().push(&b.point.id);
        }
    }

    let size = identity.segment_size;
    let rest: Vec<&Job<'_>> = all
        .iter()
        .filter(|j| match (&j.class, scope) {
            (Class::Manifest(_) | Class::Lock, _) => false,
            (_, Scope::All) => true,
            (Class::Wal(_), Scope::Wal) => true,
            (Class::Data(h), Scope::Backup) => refs.contains_key(h),
            (Class::Wal(WalFileName::Segment(s)), Scope::Backup) => {
                s.segno(size).is_some_and(|n| needed.contains_key(&(s.timeline.get(), n.0)))
            }
            _ => false,
        })
        .collect();
    let mut histories: BTreeMap<u32, Vec<HistoryEntry>> = BTreeMap::new();
    for (job, content) in rest.iter().zip(run.read(&rest)) {
        if let (Some(Content::History(entries)), Class::Wal(name)) = (content, &job.class) {
            histories.insert(name.timeline().get(), entries);
        }
    }

    if scope != Scope::Wal {
        check_data(&mut run, &all, &refs, &backups);
    }
    if scope == Scope::All {
        check_orphans(&mut run.fx, &all, &refs, unreadable_manifests, grace_secs, now_ms);
    }
    check_wal(&mut run, &all, &backups, &needed, histories, unreadable_manifests);

    for f in strays {
        run.fx.problem(f);
    }
    let (problems, notes) = run.fx.finish();
    let c = run.counts;
    Ok(VerifyReport {
        repository: repo.location(),
        cluster: repo.cluster().to_string(),
        scope,
        backup: opts.backup.clone(),
        objects_read: c.objects,
        bytes_read: c.bytes,
        wal_files: c.wal,
        data_objects: c.data,
        backups: c.manifests,
        elapsed_ms: 0,
        problems,
        notes,
    })
}

/// Data objects the backups need that are missing or damaged.
fn check_data(run: &mut Run<'_>, all: &[Job<'_>], refs: &HashMap<Hash, Refs>, backups: &[BackupSummary]) {
    let present: HashSet<Hash> = all
        .iter()
        .filter_map(|j| match j.class {
            Class::Data(h) => Some(h),
            _ => None,
        })
        .collect();
    let mut missing: Vec<(String, String)> = Vec::new();
    for (hash, r) in refs {
        let key = run.repo.data_key(hash);
        if !present.contains(hash) {
            missing.push((key, format!("referenced by {}, which cannot be restored", r.describe(backups))));
        } else if let Some(&i) = run.damaged_at.get(&key) {
            run.fx.annotate(i, format!("{} cannot be restored", r.describe(backups)));
        }
    }
    missing.sort();
    for (key, detail) in missing {
        run.fx.problem(Finding::new(FindingKind::MissingObject, "missing data object", key, detail));
    }
}

/// Data objects no readable manifest refers to: problems once older than
/// the grace period (expire removes them), a note before (a backup in
/// progress writes its manifest last).
fn check_orphans(
    fx: &mut Findings,
    all: &[Job<'_>],
    refs: &HashMap<Hash, Refs>,
    unreadable_manifests: usize,
    grace_secs: u64,
    now_ms: i64,
) {
    if unreadable_manifests > 0 {
        fx.note(Finding::new(
            FindingKind::Skipped,
            "orphan check",
            "",
            format!(
                "skipped: {} could not be read, so which data objects are referenced is unknown",
                plural(unreadable_manifests as u64, "manifest", "manifests")
            ),
        ));
        return;
    }
    let (mut young, mut young_bytes) = (0u64, 0u64);
    let mut prefix = String::new();
    for job in all {
        let Class::Data(hash) = job.class else { continue };
        if refs.contains_key(&hash) {
            continue;
        }
        let meta = job.meta;
        let age = u64::try_from(now_ms.saturating_sub(meta.modified_ms) / 1000).unwrap_or(0);
        if age > grace_secs {
            fx.problem(Finding::new(
                FindingKind::Orphan,
                "orphaned data object",
                &meta.key,
                format!(
                    "referenced by no backup, stored {} ago (grace period {}): 'walvault expire' removes it",
                    human_secs(age),
                    human_secs(grace_secs)
                ),
            ));
        } else {
            young += 1;
            young_bytes += meta.size;
            if prefix.is_empty() {
                prefix = meta.key.rsplitn(3, '/').nth(2).map(|p| format!("{p}/")).unwrap_or_default();
            }
        }
    }
    if young > 0 {
        fx.note(Finding::new(
            FindingKind::Orphan,
            "unreferenced data objects",
            prefix,
            format!(
                "{} ({}) referenced by no backup yet, younger than the grace period ({}): a backup in progress \
                 may own them",
                plural(young, "object", "objects"),
                human_bytes(young_bytes),
                human_secs(grace_secs)
            ),
        ));
    }
}

/// WAL: what the backups need, the gaps, and the end of the archive.
fn check_wal(
    run: &mut Run<'_>,
    all: &[Job<'_>],
    backups: &[BackupSummary],
    needed: &BTreeMap<(u32, u64), Vec<&str>>,
    histories: BTreeMap<u32, Vec<HistoryEntry>>,
    unreadable_manifests: usize,
) {
    let size = run.identity.segment_size;
    let name_of = |tli: TimelineId, s: u64| SegmentName::from_segno(tli, SegmentNo(s), size).to_string();
    // Archived segments by timeline, damaged ones included (they have a
    // problem of their own); the planner sees only the intact ones.
    let mut listed: BTreeMap<u32, BTreeMap<u64, &str>> = BTreeMap::new();
    let mut intact: Vec<ArchivedSegment> = Vec::new();
    for job in all {
        if let Class::Wal(WalFileName::Segment(s)) = job.class
            && let Some(n) = s.segno(size)
        {
            listed.entry(s.timeline.get()).or_default().insert(n.0, job.key());
            if !run.damaged_at.contains_key(job.key()) {
                intact.push(ArchivedSegment {
                    timeline: s.timeline.get(),
                    segno: n.0,
                    archived_at_us: job.meta.modified_ms.saturating_mul(1000),
                });
            }
        }
    }
    // Which problem reports each missing or damaged segment, by name.
    let mut covered: HashMap<String, usize> = HashMap::new();
    for segs in listed.values() {
        for key in segs.values() {
            if let (Some(&i), Some(name)) = (run.damaged_at.get(*key), key.rsplit('/').next()) {
                covered.insert(name.to_string(), i);
            }
        }
    }
    for ((tli, s), ids) in needed {
        if let Some(key) = listed.get(tli).and_then(|l| l.get(s))
            && let Some(&i) = run.damaged_at.get(*key)
        {
            run.fx.annotate(i, format!("{} {} it to become consistent", backups_named(ids, ids.len()), needs(ids)));
        }
    }
    if run.scope != Scope::Backup {
        for h in holes(&listed) {
            report_hole(&mut run.fx, &mut covered, &h, backups, &histories, needed, name_of);
        }
    }
    // What backups need that is missing and in no gap: before the first or
    // after the last archived segment of the timeline.
    for b in backups {
        let line = listed.get(&b.tli.get());
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for s in b.s0..=b.s1 {
            if line.is_some_and(|l| l.contains_key(&s)) || covered.contains_key(&name_of(b.tli, s)) {
                continue;
            }
            match missing.last_mut() {
                Some(r) if r.1 + 1 == s => r.1 = s,
                _ => missing.push((s, s)),
            }
        }
        let id = &b.point.id;
        for (lo, hi) in missing {
            let detail = if lo == hi {
                format!("is not archived: backup '{id}' needs it to become consistent")
            } else {
                format!(
                    "'{}' to '{}' ({} segments) are not archived: backup '{id}' needs them to become consistent",
                    name_of(b.tli, lo),
                    name_of(b.tli, hi),
                    hi - lo + 1
                )
            };
            let i = run.fx.problem(Finding::new(FindingKind::MissingWal, "missing WAL", name_of(b.tli, lo), detail));
            for s in lo..=hi {
                covered.insert(name_of(b.tli, s), i);
            }
        }
    }
    if run.scope == Scope::Backup {
        return;
    }
    if unreadable_manifests > 0 {
        run.fx.note(Finding::new(
            FindingKind::Skipped,
            "end-of-archive check",
            run.repo.wal_prefix(),
            "skipped: a manifest could not be read, so the newest backup is unknown",
        ));
        return;
    }
    let points = backups.iter().map(|b| b.point.clone()).collect();
    check_head(&mut run.fx, &covered, points, intact, histories, size);
}

fn needs<S>(ids: &[S]) -> &'static str {
    if ids.len() == 1 { "needs" } else { "need" }
}

/// A run of missing segments on one timeline, between two archived ones.
struct Hole {
    tli: TimelineId,
    lo: u64,
    hi: u64,
}

/// Runs of missing segments between archived ones, per timeline.
fn holes(listed: &BTreeMap<u32, BTreeMap<u64, &str>>) -> Vec<Hole> {
    let mut out = Vec::new();
    for (&tli, segs) in listed {
        let Some(tli) = TimelineId::new(tli) else { continue };
        let mut prev: Option<u64> = None;
        for &s in segs.keys() {
            if let Some(p) = prev
                && s > p + 1
            {
                out.push(Hole { tli, lo: p + 1, hi: s - 1 });
            }
            prev = Some(s);
        }
    }
    out
}

/// Files one gap: a problem when a backup's recovery must cross it, a note
/// when it lies before every backup that could use it.
fn report_hole(
    fx: &mut Findings,
    covered: &mut HashMap<String, usize>,
    h: &Hole,
    backups: &[BackupSummary],
    histories: &BTreeMap<u32, Vec<HistoryEntry>>,
    needed: &BTreeMap<(u32, u64), Vec<&str>>,
    name_of: impl Fn(TimelineId, u64) -> String,
) {
    let t = h.tli.get();
    // Backups of these timelines replay into timeline t.
    let ancestors: BTreeSet<u32> = histories.get(&t).into_iter().flatten().map(|e| e.parent.get()).chain([t]).collect();
    let mut consistent: Vec<&str> = Vec::new();
    for s in h.lo..=h.hi {
        for id in needed.get(&(t, s)).into_iter().flatten() {
            if !consistent.contains(id) {
                consistent.push(id);
            }
        }
    }
    let blocked: Vec<&str> = backups
        .iter()
        .filter(|b| ancestors.contains(&b.tli.get()) && b.s0 <= h.hi && !consistent.contains(&b.point.id.as_str()))
        .map(|b| b.point.id.as_str())
        .collect();
    let count = h.hi - h.lo + 1;
    let mut detail = if count == 1 {
        "is not archived".to_string()
    } else {
        format!("'{}' to '{}' ({count} segments) are not archived", name_of(h.tli, h.lo), name_of(h.tli, h.hi))
    };
    detail.push_str(&format!(", between '{}' and '{}'", name_of(h.tli, h.lo - 1), name_of(h.tli, h.hi + 1)));
    let first = name_of(h.tli, h.lo);
    if consistent.is_empty() && blocked.is_empty() {
        detail.push_str(": no backup needs it (it lies before every backup of the timeline)");
        fx.note(Finding::new(FindingKind::WalGap, "WAL gap", first, detail));
        return;
    }
    let mut why = Vec::new();
    if !consistent.is_empty() {
        why.push(format!("{} cannot become consistent without it", backups_named(&consistent, consistent.len())));
    }
    if !blocked.is_empty() {
        why.push(format!("recovery from {} stops before it", backups_named(&blocked, blocked.len())));
    }
    detail.push_str(&format!(": {}", why.join("; ")));
    let i = fx.problem(Finding::new(FindingKind::WalGap, "WAL gap", first, detail));
    for s in h.lo..=h.hi {
        covered.insert(name_of(h.tli, s), i);
    }
}

/// Whether the newest backup's chain of WAL reaches the end of the archive
/// (what `restore` with no target replays), asked of the PITR planner over
/// the intact segments.
fn check_head(
    fx: &mut Findings,
    covered: &HashMap<String, usize>,
    backups: Vec<BackupPoint>,
    segments: Vec<ArchivedSegment>,
    histories: BTreeMap<u32, Vec<HistoryEntry>>,
    segment_size: WalSegmentSize,
) {
    if backups.is_empty() {
        return;
    }
    let state = ArchiveState { segment_size, backups, segments, histories };
    let req =
        Request { target: Target::End, timeline: TimelineTarget::Latest, exclusive: false, backup: None, force: false };
    match plan::plan(&state, &req) {
        Ok(_) => {}
        Err(PlanError::MissingWal { name, backup }) => {
            let text = format!("the newest backup '{backup}' cannot be restored to the end of the archive");
            match covered.get(&name) {
                Some(&i) => fx.annotate(i, text),
                None => {
                    fx.problem(Finding::new(
                        FindingKind::HeadUnreachable,
                        "missing WAL",
                        name,
                        format!("is not archived, though later WAL is: {text}, recovery stops here"),
                    ));
                }
            }
        }
        Err(e) => {
            fx.problem(Finding::new(FindingKind::HeadUnreachable, "unreachable end of archive", "", e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Overrides;
    use walvault_formats::object::EncodeOptions;
    use walvault_formats::wal::{PgVersion, SystemId, synthetic_segment};

    const SEG: u64 = 1 << 20;

    fn identity() -> ClusterIdentity {
        ClusterIdentity {
            system_id: SystemId(77),
            pg_version: PgVersion::new(15).unwrap(),
            segment_size: WalSegmentSize::new(SEG).unwrap(),
        }
    }

    struct T {
        dir: std::path::PathBuf,
        config: Config,
        repo: Repository,
        /// One data object of each backup, and one shared.
        b1_only: Hash,
        b2_only: Hash,
    }

    impl Drop for T {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl T {
        fn path(&self, key: &str) -> std::path::PathBuf {
            self.dir.join("repo").join(key)
        }

        fn seg_key(&self, segno: u64) -> String {
            let name = SegmentName::from_segno(TimelineId::FIRST, SegmentNo(segno), identity().segment_size);
            self.repo.wal_key(&WalFileName::Segment(name))
        }

        fn flip(&self, key: &str) {
            let path = self.path(key);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() - 3;
            bytes[at] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
        }

        fn age(&self, key: &str, secs: u64) {
            let when = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
            std::fs::File::options().write(true).open(self.path(key)).unwrap().set_modified(when).unwrap();
        }

        fn run(&self, opts: &VerifyOptions) -> VerifyReport {
            verify(&self.config, opts).unwrap()
        }

        fn all(&self) -> VerifyReport {
            self.run(&VerifyOptions { backup: None, wal_only: false, jobs: 3 })
        }
    }

    fn manifest(id: &str, start_seg: u64, stop_seg: u64, chunks: &[(Hash, u64)]) -> Manifest {
        crate::testing::chunked_manifest(id, 77, SEG, (start_seg, stop_seg), chunks)
    }

    /// Segments 1 to 8 of timeline 1; backup B1 needs 2..3, B2 needs 6..6;
    /// each refers to a data object of its own and to a shared one.
    fn setup(tag: &str) -> T {
        let dir = std::env::temp_dir().join(format!("walvault-verify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let overrides = Overrides {
            repository: Some(dir.join("repo").display().to_string()),
            catalog: Some(dir.join("catalog.db")),
            ..Default::default()
        };
        let config = Config::load(&overrides, None).unwrap();
        crate::init::init(&config, &identity()).unwrap();
        for segno in 1..=8u64 {
            let path = dir.join(format!("{segno}"));
            std::fs::write(&path, synthetic_segment(&identity(), TimelineId::FIRST, SegmentNo(segno), segno as u8))
                .unwrap();
            let name = SegmentName::from_segno(TimelineId::FIRST, SegmentNo(segno), identity().segment_size);
            let named = dir.join(name.to_string());
            std::fs::rename(&path, &named).unwrap();
            crate::push::push(&config, &named).unwrap();
        }
        let repo = Repository::open_config(&config).unwrap();
        let put = |bytes: &[u8]| {
            let h = Hash::from(ContentHash::of(bytes));
            repo.put_data(&h, bytes, &EncodeOptions::default()).unwrap();
            (h, bytes.len() as u64)
        };
        let shared = put(&[1u8; 5000]);
        let one = put(&[2u8; 3000]);
        let two = put(&[3u8; 7000]);
        repo.put_manifest(&manifest("B1", 2, 3, &[shared, one])).unwrap();
        repo.put_manifest(&manifest("B2", 6, 6, &[shared, two])).unwrap();
        T { dir, config, repo, b1_only: one.0, b2_only: two.0 }
    }

    /// Exactly one problem, of this kind, naming `subject`; its line.
    fn one_problem(r: &VerifyReport, kind: FindingKind, subject: &str) -> String {
        assert_eq!(r.problems.len(), 1, "{r}");
        let p = &r.problems[0];
        assert_eq!(p.kind, kind, "{r}");
        assert!(p.subject.contains(subject), "{r}");
        let text = r.to_string();
        let line = text.lines().next().unwrap().to_string();
        assert!(line.starts_with("problem: ") && line.contains(subject), "{text}");
        line
    }

    #[test]
    fn a_clean_repository_verifies() {
        let t = setup("clean");
        let r = t.all();
        assert!(r.ok(), "{r}");
        assert!(r.notes.is_empty(), "{r}");
        // 8 segments, 3 data objects, 2 manifests, the cluster identity.
        assert_eq!((r.objects_read, r.wal_files, r.data_objects, r.backups), (14, 8, 3, 2), "{r}");
        let text = r.to_string();
        assert!(text.starts_with("verified cluster 'main' in repository '"), "{text}");
        assert!(text.contains(": 14 objects read (") && text.contains("0 problems"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scope"], "all");
        assert_eq!(json["problems"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn a_damaged_wal_object_is_one_problem() {
        let t = setup("walflip");
        let key = t.seg_key(7);
        t.flip(&key);
        let r = t.all();
        let line = one_problem(&r, FindingKind::Damaged, "000000010000000000000007");
        assert!(line.starts_with(&format!("problem: damaged WAL file '{key}': ")), "{line}");
        // The newest backup's recovery stops there: said on the same line.
        assert!(line.contains("the newest backup 'B2' cannot be restored to the end of the archive"), "{line}");
    }

    #[test]
    fn a_damaged_segment_a_backup_needs_says_so() {
        let t = setup("walneeded");
        t.flip(&t.seg_key(3));
        let line = one_problem(&t.all(), FindingKind::Damaged, "000000010000000000000003");
        assert!(line.contains("backup 'B1' needs it to become consistent"), "{line}");
    }

    #[test]
    fn a_damaged_data_object_is_one_problem() {
        let t = setup("dataflip");
        let key = t.repo.data_key(&t.b2_only);
        t.flip(&key);
        let line = one_problem(&t.all(), FindingKind::Damaged, &key);
        assert!(line.starts_with(&format!("problem: damaged data object '{key}': ")), "{line}");
        assert!(line.contains("backup 'B2' cannot be restored"), "{line}");
        // --backup B1 does not read it; --wal reads no data at all.
        let b1 = t.run(&VerifyOptions { backup: Some("B1".into()), wal_only: false, jobs: 2 });
        assert!(b1.ok(), "{b1}");
        assert_eq!((b1.backups, b1.data_objects, b1.wal_files), (1, 2, 2), "{b1}");
        let wal = t.run(&VerifyOptions { backup: None, wal_only: true, jobs: 2 });
        assert!(wal.ok() && wal.data_objects == 0 && wal.wal_files == 8, "{wal}");
        let b2 = t.run(&VerifyOptions { backup: Some("B2".into()), wal_only: false, jobs: 2 });
        one_problem(&b2, FindingKind::Damaged, &key);
    }

    #[test]
    fn a_damaged_shared_object_names_every_backup() {
        let t = setup("shared");
        let shared = Hash::from(ContentHash::of(&[1u8; 5000]));
        let key = t.repo.data_key(&shared);
        t.flip(&key);
        let line = one_problem(&t.all(), FindingKind::Damaged, &key);
        assert!(line.ends_with("; backups 'B1' and 'B2' cannot be restored"), "{line}");
    }

    #[test]
    fn a_data_object_with_other_content_is_damaged() {
        let t = setup("swap");
        // An intact envelope under the wrong name.
        let (a, b) = (t.repo.data_key(&t.b1_only), t.repo.data_key(&t.b2_only));
        std::fs::copy(t.path(&a), t.path(&b)).unwrap();
        let line = one_problem(&t.all(), FindingKind::Damaged, &b);
        assert!(line.contains("not the content its name says"), "{line}");
    }

    #[test]
    fn a_deleted_data_object_is_one_problem() {
        let t = setup("datadel");
        let key = t.repo.data_key(&t.b1_only);
        std::fs::remove_file(t.path(&key)).unwrap();
        let line = one_problem(&t.all(), FindingKind::MissingObject, &key);
        assert!(line.ends_with("referenced by backup 'B1', which cannot be restored"), "{line}");
        let b1 = t.run(&VerifyOptions { backup: Some("B1".into()), wal_only: false, jobs: 1 });
        one_problem(&b1, FindingKind::MissingObject, &key);
    }

    #[test]
    fn a_deleted_segment_inside_a_backup_is_one_problem() {
        let t = setup("walneeded-del");
        std::fs::remove_file(t.path(&t.seg_key(3))).unwrap();
        let line = one_problem(&t.all(), FindingKind::WalGap, "000000010000000000000003");
        assert!(line.contains("backup 'B1' cannot become consistent without it"), "{line}");
        let b1 = t.run(&VerifyOptions { backup: Some("B1".into()), wal_only: false, jobs: 1 });
        let line = one_problem(&b1, FindingKind::MissingWal, "000000010000000000000003");
        assert!(line.contains("backup 'B1' needs it to become consistent"), "{line}");
    }

    #[test]
    fn a_gap_between_backups_is_one_problem() {
        let t = setup("gap");
        std::fs::remove_file(t.path(&t.seg_key(5))).unwrap();
        let line = one_problem(&t.all(), FindingKind::WalGap, "000000010000000000000005");
        assert!(
            line.contains("between '000000010000000000000004' and '000000010000000000000006'")
                && line.contains("recovery from backup 'B1' stops before it"),
            "{line}"
        );
        assert!(!line.contains("newest"), "B2 reaches the end: {line}");
    }

    #[test]
    fn a_gap_after_the_newest_backup_cuts_off_the_end() {
        let t = setup("headgap");
        std::fs::remove_file(t.path(&t.seg_key(7))).unwrap();
        let line = one_problem(&t.all(), FindingKind::WalGap, "000000010000000000000007");
        assert!(line.contains("the newest backup 'B2' cannot be restored to the end of the archive"), "{line}");
    }

    #[test]
    fn a_gap_before_every_backup_is_a_note() {
        let t = setup("oldgap");
        // Segment 0 then 2..8: segment 1 is missing before B1's start.
        let path = t.dir.join("000000010000000000000000");
        std::fs::write(&path, synthetic_segment(&identity(), TimelineId::FIRST, SegmentNo(0), 9)).unwrap();
        crate::push::push(&t.config, &path).unwrap();
        std::fs::remove_file(t.path(&t.seg_key(1))).unwrap();
        let r = t.all();
        assert!(r.ok(), "{r}");
        assert_eq!(r.notes.len(), 1, "{r}");
        assert!(r.to_string().contains("note: WAL gap '000000010000000000000001': is not archived"), "{r}");
    }

    #[test]
    fn old_orphans_are_problems_and_young_ones_notes() {
        let t = setup("orphan");
        let put = |bytes: &[u8]| {
            let h = Hash::from(ContentHash::of(bytes));
            t.repo.put_data(&h, bytes, &EncodeOptions::default()).unwrap();
            t.repo.data_key(&h)
        };
        let old = put(b"left by an expired backup");
        let young = put(b"a backup in progress");
        t.age(&old, 2 * 86_400);
        let r = t.all();
        let line = one_problem(&r, FindingKind::Orphan, &old);
        assert!(line.contains("stored 2 d ago (grace period 24 h)"), "{line}");
        assert_eq!(r.notes.len(), 1, "{r}");
        assert!(r.notes[0].detail.starts_with("1 object ("), "{r}");
        assert!(!r.to_string().contains(&young));
        // --wal does not look at data.
        assert!(t.run(&VerifyOptions { backup: None, wal_only: true, jobs: 1 }).ok());
    }

    #[test]
    fn a_stray_file_is_one_problem() {
        let t = setup("stray");
        std::fs::write(t.dir.join("repo/main/wal/0000000100000000/notes.txt"), b"x").unwrap();
        let line = one_problem(&t.all(), FindingKind::Stray, "main/wal/0000000100000000/notes.txt");
        assert!(line.contains("not a WAL file name"), "{line}");
        let r = t.run(&VerifyOptions { backup: Some("B1".into()), wal_only: false, jobs: 1 });
        assert!(r.ok(), "{r}");
    }

    #[test]
    fn the_lock_file_is_part_of_the_layout() {
        let t = setup("lock");
        std::fs::write(t.dir.join("repo/main/lock"), b"").unwrap();
        std::fs::create_dir_all(t.dir.join("repo/main/lock.d")).unwrap();
        std::fs::write(t.dir.join("repo/main/lock.d/expire+123+1"), b"{}").unwrap();
        let r = t.all();
        assert!(r.ok() && r.notes.is_empty(), "{r}");
        assert_eq!(r.objects_read, 14, "{r}");
    }

    #[test]
    fn a_misplaced_segment_is_a_stray() {
        let t = setup("misplaced");
        std::fs::create_dir_all(t.dir.join("repo/main/wal/0000000100000001")).unwrap();
        std::fs::copy(t.path(&t.seg_key(8)), t.dir.join("repo/main/wal/0000000100000001/000000010000000000000009"))
            .unwrap();
        let line = one_problem(&t.all(), FindingKind::Stray, "000000010000000000000009");
        assert!(line.contains("in the wrong directory"), "{line}");
    }

    #[test]
    fn a_damaged_manifest_skips_the_orphan_check() {
        let t = setup("manifest");
        let key = t.repo.manifest_key("B2");
        t.flip(&key);
        let r = t.all();
        one_problem(&r, FindingKind::Damaged, &key);
        assert!(r.notes.iter().any(|n| n.what == "orphan check"), "{r}");
        assert!(matches!(
            verify(&t.config, &VerifyOptions { backup: Some("B9".into()), wal_only: false, jobs: 1 }),
            Err(Error::Verify(_))
        ));
    }

    #[test]
    fn a_segment_of_another_cluster_is_damaged() {
        let t = setup("foreign");
        let key = t.seg_key(4);
        let other = ClusterIdentity { system_id: SystemId(78), ..identity() };
        let plain = synthetic_segment(&other, TimelineId::FIRST, SegmentNo(4), 4);
        let (_, bytes) = object::encode(&plain, &EncodeOptions::default()).unwrap();
        std::fs::write(t.path(&key), bytes).unwrap();
        let line = one_problem(&t.all(), FindingKind::Damaged, &key);
        assert!(line.contains("not a WAL segment of this cluster") && line.contains("78"), "{line}");
    }

    /// Timeline 2 branched from 1 in segment 9 (after B2); its history
    /// file is archived and its segments 9 to 11.
    fn with_timeline_2(tag: &str) -> T {
        let t = setup(tag);
        let history = t.dir.join("00000002.history");
        std::fs::write(&history, "1\t0/900100\tno recovery target specified\n").unwrap();
        crate::push::push(&t.config, &history).unwrap();
        let tli = TimelineId::new(2).unwrap();
        for segno in 9..=11u64 {
            let name = SegmentName::from_segno(tli, SegmentNo(segno), identity().segment_size);
            let path = t.dir.join(name.to_string());
            std::fs::write(&path, synthetic_segment(&identity(), tli, SegmentNo(segno), 5)).unwrap();
            crate::push::push(&t.config, &path).unwrap();
        }
        t
    }

    fn tl2_key(t: &T, segno: u64) -> String {
        let name = SegmentName::from_segno(TimelineId::new(2).unwrap(), SegmentNo(segno), identity().segment_size);
        t.repo.wal_key(&WalFileName::Segment(name))
    }

    #[test]
    fn timelines_are_followed_to_the_end_of_the_archive() {
        let t = with_timeline_2("tl2");
        let r = t.all();
        assert!(r.ok(), "{r}");
        assert_eq!(r.wal_files, 12, "{r}");
        // A gap on timeline 2 stops recovery from backups of timeline 1.
        std::fs::remove_file(t.path(&tl2_key(&t, 10))).unwrap();
        let line = one_problem(&t.all(), FindingKind::WalGap, "00000002000000000000000A");
        assert!(line.contains("recovery from backups 'B1' and 'B2' stops before it"), "{line}");
        assert!(line.contains("the newest backup 'B2' cannot be restored to the end of the archive"), "{line}");
    }

    #[test]
    fn a_missing_switch_segment_cuts_off_the_new_timeline() {
        let t = with_timeline_2("tl2switch");
        // Timeline 1 has its segment 9; recovery reads it from timeline 2.
        std::fs::remove_file(t.path(&tl2_key(&t, 9))).unwrap();
        let path = t.dir.join("000000010000000000000009");
        std::fs::write(&path, synthetic_segment(&identity(), TimelineId::FIRST, SegmentNo(9), 9)).unwrap();
        crate::push::push(&t.config, &path).unwrap();
        let line = one_problem(&t.all(), FindingKind::HeadUnreachable, "000000020000000000000009");
        assert!(line.contains("though later WAL is: the newest backup 'B2' cannot be restored"), "{line}");
    }

    #[test]
    fn a_damaged_history_file_is_one_problem() {
        let t = with_timeline_2("tl2history");
        let key = t.repo.wal_key(&"00000002.history".parse().unwrap());
        let (_, bytes) = object::encode(b"2\t0/1\tbogus\n", &EncodeOptions::default()).unwrap();
        std::fs::write(t.path(&key), bytes).unwrap();
        let r = t.all();
        let line = one_problem(&r, FindingKind::Damaged, &key);
        assert!(line.starts_with("problem: damaged timeline history file"), "{line}");
    }

    #[test]
    fn words() {
        assert_eq!(quoted_list(&["a"], 1), "'a'");
        assert_eq!(quoted_list(&["a", "b"], 2), "'a' and 'b'");
        let five: Vec<String> = (1..=5).map(|i| i.to_string()).collect();
        assert_eq!(quoted_list(&five, 5), "'1', '2', '3' and 2 more");
        assert_eq!(backups_named(&["B1", "B2", "B3"], 7), "backups 'B1', 'B2', 'B3' and 4 more");
        assert_eq!(backups_named(&["B1"], 1), "backup 'B1'");
        assert_eq!(human_secs(90), "90 s");
        assert_eq!(human_secs(3 * 86_400 + 5), "3 d");
    }
}
