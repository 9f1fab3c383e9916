//! Retention planning: which backups, WAL files and data objects
//! `walvault expire` deletes, and why.
//!
//! Pure, like [`crate::plan`]: a [`RetentionPolicy`], a clock reading and a
//! [`RetentionInput`] (what the catalog says the repository holds) in, a
//! [`RetentionPlan`] with a reason for every backup kept and every file
//! deleted out; no I/O. [`plan_sweep`] does the same for data objects.
//!
//! The rules:
//! - a backup is kept when a rule of the policy keeps it (`keep-last`, the
//!   calendar tiers, `keep-within`), when it is marked keep-forever, or, as
//!   a safety net, when it is the newest backup from which the timeline
//!   being archived now can be restored and no other kept backup can;
//! - `keep-within W` is a promise: every moment of the last `W` that can be
//!   recovered now stays recoverable. On each timeline with such moments the
//!   newest backup consistent before the window is kept, with every backup
//!   consistent inside it. A window reaching back before the oldest backup
//!   keeps everything;
//! - WAL is kept wherever a kept backup's recovery can read it: from the
//!   backup's start segment on, along every timeline it can reach (its own,
//!   and those branching from it after it became consistent), with the
//!   segment holding a switch point read from the new timeline as
//!   PostgreSQL does ([`crate::plan`] decides which timelines a backup
//!   reaches). `.partial` and `.backup` files follow their segment; a history
//!   file is kept while a kept backup or WAL file is on its timeline or on
//!   one descending from it;
//! - an empty policy deletes nothing; a policy that keeps no backup at all
//!   is refused ([`RetentionError::KeepsNoBackup`]).
//!
//! Applying a plan and planning again deletes nothing more.
//!
//! ```
//! use std::collections::{BTreeMap, BTreeSet};
//! use walvault::config::RetentionPolicy;
//! use walvault::plan::{ArchiveState, ArchivedSegment, BackupPoint};
//! use walvault::retention::{plan_retention, RetentionInput};
//! use walvault_formats::wal::{Lsn, WalSegmentSize};
//!
//! const HOUR_US: i64 = 3_600_000_000;
//! let backup = |id: &str, seg: u64| BackupPoint { id: id.into(), timeline: 1,
//!     start_lsn: Lsn(seg << 24), stop_lsn: Lsn((seg << 24) + 0x100), stop_time_us: seg as i64 * HOUR_US,
//!     next_xid: seg };
//! let segments = (1..=9).map(|segno| ArchivedSegment { timeline: 1, segno, archived_at_us: segno as i64 * HOUR_US });
//! let state = ArchiveState { segment_size: WalSegmentSize::DEFAULT, backups: vec![backup("b2", 2), backup("b5", 5)],
//!     segments: segments.collect(), histories: BTreeMap::new() };
//! let input = RetentionInput { state, keep_forever: BTreeSet::new(), other_wal: vec![] };
//! let policy = RetentionPolicy { keep_last: Some(1), ..Default::default() };
//! let plan = plan_retention(&policy, 10 * HOUR_US / 1000, &input).unwrap();
//! assert_eq!(plan.delete_backups[0].name, "b2");
//! // WAL before b5's start segment goes with it.
//! let wal: Vec<&str> = plan.delete_wal.iter().map(|d| d.name.as_str()).collect();
//! assert_eq!(wal, ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003",
//!     "000000010000000000000004"]);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::Serialize;
use thiserror::Error;
use walvault_formats::manifest::Hash;
use walvault_formats::object::ContentHash;
use walvault_formats::time::Timestamp;
use walvault_formats::wal::{Lsn, SegmentName, SegmentNo, TimelineId, WalFileName};

use crate::config::RetentionPolicy;
use crate::plan::{ArchiveIndex, ArchiveState, BackupPoint, Request, Target, TimelineTarget};
use crate::storage::ObjectMeta;

/// What retention planning needs to know about the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionInput {
    /// Backups, archived segments (with their archive times) and timeline
    /// histories: the PITR planner's view.
    pub state: ArchiveState,
    /// Identifiers of the backups marked keep-forever.
    pub keep_forever: BTreeSet<String>,
    /// Every archived WAL file other than the segments of
    /// [`ArchiveState::segments`]: `.partial`, `.backup` and history files.
    pub other_wal: Vec<WalFileName>,
}

/// A backup the plan keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptBackup {
    /// The backup's identifier.
    pub id: String,
    /// Every rule that keeps it, such as `newest 2 (keep-last)`.
    pub reasons: Vec<String>,
}

/// Something the plan deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deletion {
    /// A backup identifier or a WAL file name.
    pub name: String,
    /// Why it goes.
    pub reason: String,
}

/// The outcome of retention planning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionPlan {
    /// Backups kept, oldest first (by consistency time).
    pub keep: Vec<KeptBackup>,
    /// Backups deleted, oldest first.
    pub delete_backups: Vec<Deletion>,
    /// WAL files deleted: segments, `.partial` and `.backup` files in
    /// timeline and segment order, then history files. Deleting in this
    /// order keeps the remaining WAL contiguous, and a history file outlives
    /// every other file of its timeline.
    pub delete_wal: Vec<Deletion>,
    /// What the operator should know: a window longer than the archive, a
    /// keep-forever backup holding WAL, the safety rule at work.
    pub notes: Vec<String>,
}

impl RetentionPlan {
    /// Whether the plan deletes no backup and no WAL file.
    pub fn deletes_nothing(&self) -> bool {
        self.delete_backups.is_empty() && self.delete_wal.is_empty()
    }
}

/// Why a policy cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RetentionError {
    /// The policy keeps no backup (keep-forever marks aside): applying it
    /// would delete every backup.
    #[error(
        "the retention policy ({policy}) keeps none of the {count} backups, so expire would delete {what}; \
         the newest, '{newest}', became consistent at {newest_time}"
    )]
    KeepsNoBackup {
        /// The policy, as the configuration writes it.
        policy: String,
        /// How many backups there are.
        count: usize,
        /// "every backup", or "every backup not marked keep-forever".
        what: &'static str,
        /// The newest backup.
        newest: String,
        /// When it became consistent.
        newest_time: String,
    },
}

/// The policy as the configuration writes it: `keep-last 2, keep-within 14d`.
pub fn describe_policy(p: &RetentionPolicy) -> String {
    let mut parts = Vec::new();
    parts.extend(p.keep_last.map(|n| format!("keep-last {n}")));
    parts.extend(p.keep_within_secs.map(|s| format!("keep-within {}", format_duration(s))));
    parts.extend(p.keep_daily.map(|n| format!("keep-daily {n}")));
    parts.extend(p.keep_weekly.map(|n| format!("keep-weekly {n}")));
    parts.extend(p.keep_monthly.map(|n| format!("keep-monthly {n}")));
    parts.extend(p.keep_yearly.map(|n| format!("keep-yearly {n}")));
    if parts.is_empty() { "no retention policy".into() } else { parts.join(", ") }
}

/// Seconds as [`crate::config::parse_duration`] reads them: `14d`, `1d12h`,
/// `90m`, `0s`.
pub fn format_duration(secs: u64) -> String {
    let mut out = String::new();
    let mut rest = secs;
    for (unit, len) in [('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)] {
        if rest >= len {
            let _ = write!(out, "{}{unit}", rest / len);
            rest %= len;
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

/// Newest last: the planner's order for time targets (consistency time,
/// then LSN, then identifier).
fn time_key(b: &BackupPoint) -> (i64, Lsn, &str) {
    (b.stop_time_us, b.stop_lsn, &b.id)
}

/// `[lo, hi)` segment numbers of one timeline; `hi` is `u64::MAX` when open.
type Span = (u32, u64, u64);

/// What one backup's recovery can read: per timeline it can reach, the
/// timelines and segments along the way, from its start segment on.
struct Reach {
    routes: Vec<(u32, Vec<Span>)>,
}

impl Reach {
    fn reaches(&self, t: u32) -> bool {
        self.routes.iter().any(|r| r.0 == t)
    }

    /// Whether recovery to timeline `t` reads segment `s` of timeline `tli`.
    fn reads(&self, t: u32, tli: u32, s: u64) -> bool {
        self.routes.iter().filter(|r| r.0 == t).flat_map(|r| &r.1).any(|&(l, lo, hi)| l == tli && lo <= s && s < hi)
    }
}

/// The segments `b`'s recovery reads on each timeline it can reach. The
/// planner decides which timelines (and through which switch points) a
/// backup reaches; this turns its path into segment ranges the way
/// `plan::Route` does: timeline k+1 begins in the segment holding timeline
/// k's switch point, and a segment is read from the last timeline on the
/// path that began at or before it.
fn reach(index: &ArchiveIndex<'_>, state: &ArchiveState, b: &BackupPoint, timelines: &BTreeSet<u32>) -> Reach {
    let size = state.segment_size;
    let s0 = size.segment_of(b.start_lsn).0;
    let mut routes = Vec::new();
    for &t in timelines {
        let req = Request {
            target: Target::Immediate,
            timeline: TimelineTarget::Id(t),
            exclusive: false,
            backup: Some(b.id.clone()),
            // Missing WAL is not the question here, only the route.
            force: true,
        };
        let Ok(plan) = index.plan(&req) else { continue };
        let begins: Vec<u64> =
            std::iter::once(0).chain(plan.path.iter().map(|p| size.segment_of(p.1).0)).take(plan.path.len()).collect();
        let mut spans = Vec::new();
        let mut hi = u64::MAX;
        for (&(tli, _), &lo) in plan.path.iter().zip(&begins).rev() {
            if lo < hi {
                if lo.max(s0) < hi {
                    spans.push((tli, lo.max(s0), hi));
                }
                hi = lo;
            }
        }
        spans.reverse();
        routes.push((t, spans));
    }
    Reach { routes }
}

/// Kept ranges of segment numbers per timeline, merged and sorted.
#[derive(Default)]
struct Regions(HashMap<u32, Vec<(u64, u64)>>);

impl Regions {
    fn add(&mut self, (tli, lo, hi): Span) {
        self.0.entry(tli).or_default().push((lo, hi));
    }

    fn merge(&mut self) {
        for ranges in self.0.values_mut() {
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
            for &(lo, hi) in ranges.iter() {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            *ranges = merged;
        }
    }

    fn contains(&self, tli: u32, s: u64) -> bool {
        let Some(ranges) = self.0.get(&tli) else { return false };
        let i = ranges.partition_point(|r| r.1 <= s);
        ranges.get(i).is_some_and(|r| r.0 <= s)
    }
}

/// The calendar tiers.
#[derive(Clone, Copy)]
enum Tier {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

const DAY_US: i64 = 86_400_000_000;

impl Tier {
    fn rule(self) -> &'static str {
        match self {
            Tier::Daily => "keep-daily",
            Tier::Weekly => "keep-weekly",
            Tier::Monthly => "keep-monthly",
            Tier::Yearly => "keep-yearly",
        }
    }

    /// The UTC period holding `us`: a sortable key and its name.
    fn period(self, us: i64) -> (i64, String) {
        let days = us.div_euclid(DAY_US);
        let (y, m, d) = civil_from_days(days);
        match self {
            Tier::Daily => (days, format!("{y:04}-{m:02}-{d:02}")),
            Tier::Weekly => {
                let (year, week, monday) = iso_week(days);
                (monday, format!("week {year:04}-W{week:02}"))
            }
            Tier::Monthly => (y * 12 + i64::from(m), format!("{y:04}-{m:02}")),
            Tier::Yearly => (y, format!("{y:04}")),
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both are small positive numbers by construction.
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// ISO 8601 week of a day number: (ISO year, week 1–53, day number of its
/// Monday). The week belongs to the year holding its Thursday.
fn iso_week(days: i64) -> (i64, u32, i64) {
    // 1970-01-01 was a Thursday: (days + 3) mod 7 is 0 on Mondays.
    let monday = days - (days + 3).rem_euclid(7);
    let (year, _, _) = civil_from_days(monday + 3);
    let week = (monday + 3 - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, week as u32, monday)
}

/// Plans what `walvault expire` deletes under `policy` at `now_ms` (ms
/// since the epoch). See the module documentation for the rules.
///
/// # Errors
/// [`RetentionError::KeepsNoBackup`] when the policy keeps no backup.
pub fn plan_retention(
    policy: &RetentionPolicy,
    now_ms: i64,
    input: &RetentionInput,
) -> Result<RetentionPlan, RetentionError> {
    let state = &input.state;
    let mut backups: Vec<&BackupPoint> = state.backups.iter().collect();
    backups.sort_by(|a, b| time_key(a).cmp(&time_key(b)));
    let everything = |reason: &str, note: String| RetentionPlan {
        keep: backups.iter().map(|b| KeptBackup { id: b.id.clone(), reasons: vec![reason.to_string()] }).collect(),
        delete_backups: vec![],
        delete_wal: vec![],
        notes: vec![note],
    };
    if policy.is_empty() {
        return Ok(everything("no retention policy", "no retention policy: nothing to expire".into()));
    }
    let Some(newest) = backups.last() else {
        return Ok(everything("", "no backup yet: all WAL is kept until the first backup".into()));
    };
    let described = describe_policy(policy);
    let index = ArchiveIndex::new(state);
    let timelines: BTreeSet<u32> = state.histories.keys().copied().chain(backups.iter().map(|b| b.timeline)).collect();
    let reaches: Vec<Reach> = backups.iter().map(|b| reach(&index, state, b, &timelines)).collect();
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); backups.len()];
    let mut notes = Vec::new();

    if let Some(n) = policy.keep_last {
        for r in reasons.iter_mut().rev().take(n as usize) {
            r.push(format!("newest {n} (keep-last)"));
        }
    }
    let tiers = [
        (policy.keep_daily, Tier::Daily),
        (policy.keep_weekly, Tier::Weekly),
        (policy.keep_monthly, Tier::Monthly),
        (policy.keep_yearly, Tier::Yearly),
    ];
    for (n, tier) in tiers.iter().filter_map(|(n, t)| n.map(|n| (n, *t))) {
        let mut seen = BTreeSet::new();
        for (i, b) in backups.iter().enumerate().rev() {
            let (key, name) = tier.period(b.stop_time_us);
            if seen.contains(&key) {
                continue;
            }
            if seen.len() >= n as usize {
                break;
            }
            seen.insert(key);
            reasons[i].push(format!("newest of {name} ({})", tier.rule()));
        }
    }
    let mut keep_all_wal = false;
    if let Some(w) = policy.keep_within_secs {
        let width = format_duration(w);
        let width_us = i64::try_from(w).unwrap_or(i64::MAX).saturating_mul(1_000_000);
        let cutoff = now_ms.saturating_mul(1000).saturating_sub(width_us);
        let oldest = backups[0];
        if oldest.stop_time_us > cutoff {
            // No backup is consistent at the window's start: the archive is
            // younger than the promise, so everything it has is kept.
            keep_all_wal = true;
            for r in &mut reasons {
                r.push(format!("keep-within {width} reaches back before the oldest backup"));
            }
            notes.push(format!(
                "keep-within {width} reaches back to {}, before the oldest backup '{}' (consistent at {}): \
                 everything is kept until the archive is older than the window",
                Timestamp(cutoff),
                oldest.id,
                Timestamp(oldest.stop_time_us)
            ));
        } else {
            for (i, _) in backups.iter().enumerate().filter(|(_, b)| b.stop_time_us > cutoff) {
                reasons[i].push(format!("consistent within the last {width} (keep-within)"));
            }
            // Every moment since the cutoff that can be recovered now: a time
            // target picks the newest backup consistent by then, so keeping the
            // newest one consistent at the cutoff (and all later ones) keeps
            // the same choice for every such moment.
            let mut covered: BTreeSet<u32> = BTreeSet::new();
            for w in index.windows().iter().filter(|w| w.latest_us >= cutoff) {
                covered.insert(w.timeline);
            }
            for t in covered {
                let before = (0..backups.len())
                    .filter(|&i| backups[i].stop_time_us <= cutoff && reaches[i].reaches(t))
                    .max_by(|&x, &y| time_key(backups[x]).cmp(&time_key(backups[y])));
                if let Some(i) = before {
                    reasons[i].push(format!("newest before the keep-within window on timeline {t} (keep-within)"));
                }
            }
            // And the newest one before the window whatever its timeline, as
            // pgBackRest does: the window's start stays restorable even while
            // WAL archiving is broken, and a rerun after an interrupted
            // expire sees the same archive shape (a backup before the window).
            let newest_before = backups.iter().rposition(|b| b.stop_time_us <= cutoff);
            if let Some(i) = newest_before.filter(|&i| !reasons[i].iter().any(|r| r.ends_with("(keep-within)"))) {
                reasons[i].push("newest before the keep-within window (keep-within)".into());
            }
        }
    }
    let unmarked = backups.iter().filter(|b| !input.keep_forever.contains(&b.id)).count();
    if reasons.iter().all(Vec::is_empty) && unmarked > 0 {
        return Err(RetentionError::KeepsNoBackup {
            policy: described,
            count: backups.len(),
            what: if unmarked == backups.len() { "every backup" } else { "every backup not marked keep-forever" },
            newest: newest.id.clone(),
            newest_time: Timestamp(newest.stop_time_us).to_string(),
        });
    }
    for (i, b) in backups.iter().enumerate() {
        if input.keep_forever.contains(&b.id) {
            reasons[i].push("marked keep-forever".into());
        }
    }
    safety_net(state, &backups, &reaches, &mut reasons, &mut notes);

    let mut keep = Vec::new();
    let mut delete_backups = Vec::new();
    let mut regions = Regions::default();
    for (i, b) in backups.iter().enumerate() {
        if reasons[i].is_empty() {
            delete_backups.push(Deletion { name: b.id.clone(), reason: format!("kept by no rule ({described})") });
        } else {
            keep.push(KeptBackup { id: b.id.clone(), reasons: std::mem::take(&mut reasons[i]) });
            reaches[i].routes.iter().flat_map(|r| &r.1).for_each(|&s| regions.add(s));
        }
    }
    regions.merge();
    if let Some(first) = keep.first()
        && first.reasons == ["marked keep-forever"]
        && keep.len() > 1
    {
        notes.push(format!(
            "backup '{}' is marked keep-forever: the WAL from its start on is kept, so that it restores to any \
             later moment",
            first.id
        ));
    }
    let delete_wal = if keep_all_wal {
        vec![]
    } else {
        let within = if policy.keep_within_secs.is_some() { " and the keep-within window" } else { "" };
        wal_deletions(input, &backups, &keep, &reaches, &regions, within)
    };
    Ok(RetentionPlan { keep, delete_backups, delete_wal, notes })
}

/// The safety net: the timeline being archived now (the one of the most
/// recently archived segment) keeps the newest backup that can restore it,
/// up to that segment, when no backup the policy keeps can. After a
/// point-in-time restore to an old moment, the newest backups may all lie on
/// the abandoned timeline; keeping only those would leave the running
/// cluster without a usable backup.
fn safety_net(
    state: &ArchiveState,
    backups: &[&BackupPoint],
    reaches: &[Reach],
    reasons: &mut [Vec<String>],
    notes: &mut Vec<String>,
) {
    let Some(last) = state.segments.iter().max_by_key(|g| (g.archived_at_us, g.timeline, g.segno)) else { return };
    let (t, s) = (last.timeline, last.segno);
    let restores = |i: usize| reaches[i].reads(t, t, s);
    if (0..backups.len()).any(|i| !reasons[i].is_empty() && restores(i)) {
        return;
    }
    let Some(i) =
        (0..backups.len()).filter(|&i| restores(i)).max_by(|&x, &y| time_key(backups[x]).cmp(&time_key(backups[y])))
    else {
        return;
    };
    reasons[i].push(format!("newest that restores timeline {t}, where WAL is archived now (safety)"));
    notes.push(format!(
        "no backup the policy keeps can restore timeline {t}, where WAL is archived now: backup '{}' is kept too; \
         take a backup",
        backups[i].id
    ));
}

/// Which WAL files go, given the kept regions.
fn wal_deletions(
    input: &RetentionInput,
    backups: &[&BackupPoint],
    keep: &[KeptBackup],
    reaches: &[Reach],
    regions: &Regions,
    within: &str,
) -> Vec<Deletion> {
    let state = &input.state;
    let size = state.segment_size;
    let segment_reason = |tli: u32, s: u64| -> String {
        match regions.0.get(&tli).and_then(|r| r.first()) {
            None => format!("timeline {tli} cannot be reached from any kept backup"),
            Some(first) if s < first.0 => format!("older than every kept backup{within} on timeline {tli}"),
            Some(_) => format!("not on the recovery path of any kept backup on timeline {tli}"),
        }
    };
    // By segment: (timeline, segno, name) for order; history files apart.
    let mut by_segment: BTreeMap<(u32, u64, String), String> = BTreeMap::new();
    let mut live: BTreeSet<u32> = BTreeSet::new();
    let mut consider = |tli: u32, s: u64, name: String, live: &mut BTreeSet<u32>| {
        if regions.contains(tli, s) {
            live.insert(tli);
        } else {
            by_segment.insert((tli, s, name), segment_reason(tli, s));
        }
    };
    for g in &state.segments {
        let Some(tli) = TimelineId::new(g.timeline) else { continue };
        let name = SegmentName::from_segno(tli, SegmentNo(g.segno), size).to_string();
        consider(g.timeline, g.segno, name, &mut live);
    }
    let mut history = Vec::new();
    for f in &input.other_wal {
        match f {
            WalFileName::History(t) => history.push(t.get()),
            // A name that cannot come from this segment size is left alone.
            _ => {
                if let Some(s) = f.segment().and_then(|s| s.segno(size)) {
                    consider(f.timeline().get(), s.0, f.to_string(), &mut live);
                }
            }
        }
    }
    // Timelines that must keep their history file: those kept backups can
    // reach or hold WAL on, and every ancestor of those.
    let kept: BTreeSet<&str> = keep.iter().map(|k| k.id.as_str()).collect();
    for (b, r) in backups.iter().zip(reaches).filter(|(b, _)| kept.contains(b.id.as_str())) {
        live.insert(b.timeline);
        live.extend(r.routes.iter().map(|r| r.0));
    }
    let ancestors: Vec<u32> =
        live.iter().filter_map(|t| state.histories.get(t)).flat_map(|h| h.iter().map(|e| e.parent.get())).collect();
    live.extend(ancestors);
    let mut out: Vec<Deletion> =
        by_segment.into_iter().map(|((_, _, name), reason)| Deletion { name, reason }).collect();
    history.sort_unstable();
    history.dedup();
    for t in history.into_iter().filter(|t| !live.contains(t)) {
        let Some(tli) = TimelineId::new(t) else { continue };
        out.push(Deletion {
            name: WalFileName::History(tli).to_string(),
            reason: format!("no kept backup or WAL file is on timeline {t} or on a timeline descending from it"),
        });
    }
    out
}

/// Which data objects a sweep deletes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepPlan {
    /// Referenced by no manifest and older than the grace period.
    pub delete: Vec<ObjectMeta>,
    /// Referenced by no manifest but younger than the grace period: perhaps
    /// written by a backup whose manifest does not exist yet.
    pub in_grace: Vec<ObjectMeta>,
    /// Keys under the data prefix that do not name a data object; left alone.
    pub unknown: Vec<String>,
}

/// Mark and sweep over data objects: of `listing` (the objects under
/// `data_prefix`, `<cluster>/data/`), those no hash of `referenced` names and
/// whose modification is at least `grace_secs` before `now_ms`.
pub fn plan_sweep(
    data_prefix: &str,
    listing: &[ObjectMeta],
    referenced: &BTreeSet<Hash>,
    now_ms: i64,
    grace_secs: u64,
) -> SweepPlan {
    let grace_ms = i64::try_from(grace_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut out = SweepPlan::default();
    for meta in listing {
        let hash = meta.key.strip_prefix(data_prefix).and_then(|rest| {
            let (dir, hex) = rest.split_once('/')?;
            let hash = ContentHash::from_hex(hex)?;
            // The key must be exactly the one walvault writes for this hash.
            (hex.get(..2) == Some(dir) && hash.to_string() == hex).then_some(Hash::from(hash))
        });
        match hash {
            None => out.unknown.push(meta.key.clone()),
            Some(h) if referenced.contains(&h) => {}
            Some(_) if now_ms.saturating_sub(meta.modified_ms) >= grace_ms => out.delete.push(meta.clone()),
            Some(_) => out.in_grace.push(meta.clone()),
        }
    }
    out.delete.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashSet;

    use proptest::collection::vec;
    use proptest::prelude::*;
    use walvault_formats::wal::{HistoryEntry, WalSegmentSize};

    use super::*;
    use crate::plan::{self, ArchivedSegment, Plan, PlanError};

    const SIZE: WalSegmentSize = WalSegmentSize::DEFAULT;
    const SEG: u64 = 0x100_0000;
    const HOUR: i64 = 3_600_000_000;
    /// 2026-11-16 00:00:00+00, a Monday.
    const MONDAY: i64 = 1_794_787_200_000_000;

    fn bp(id: &str, timeline: u32, seg: u64, stop_time_us: i64) -> BackupPoint {
        BackupPoint {
            id: id.into(),
            timeline,
            start_lsn: Lsn(seg * SEG + 0x28),
            stop_lsn: Lsn(seg * SEG + 0x100),
            stop_time_us,
            next_xid: seg * 100,
        }
    }

    /// Segments of `timeline`, segment s archived at `t0 + s` hours.
    fn segs(timeline: u32, segnos: std::ops::RangeInclusive<u64>, t0: i64) -> Vec<ArchivedSegment> {
        segnos.map(|segno| ArchivedSegment { timeline, segno, archived_at_us: t0 + segno as i64 * HOUR }).collect()
    }

    fn entry(parent: u32, switch_point: Lsn) -> HistoryEntry {
        HistoryEntry { parent: TimelineId::new(parent).unwrap(), switch_point, reason: String::new() }
    }

    fn input(
        backups: Vec<BackupPoint>,
        segments: Vec<ArchivedSegment>,
        histories: BTreeMap<u32, Vec<HistoryEntry>>,
    ) -> RetentionInput {
        let other_wal = histories.keys().map(|&t| WalFileName::History(TimelineId::new(t).unwrap())).collect();
        RetentionInput {
            state: ArchiveState { segment_size: SIZE, backups, segments, histories },
            keep_forever: BTreeSet::new(),
            other_wal,
        }
    }

    fn name(tli: u32, s: u64) -> String {
        SegmentName::from_segno(TimelineId::new(tli).unwrap(), SegmentNo(s), SIZE).to_string()
    }

    fn kept(p: &RetentionPlan) -> Vec<&str> {
        p.keep.iter().map(|k| k.id.as_str()).collect()
    }

    fn deleted_wal(p: &RetentionPlan) -> Vec<String> {
        p.delete_wal.iter().map(|d| d.name.clone()).collect()
    }

    fn reasons_of<'p>(p: &'p RetentionPlan, id: &str) -> &'p [String] {
        &p.keep.iter().find(|k| k.id == id).unwrap().reasons
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    #[test]
    fn calendar_periods_are_utc_and_iso_weeks() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2026, 11, 20), (1969, 12, 31), (2400, 12, 31)] {
            assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }
        let day = |y, m, d| days_from_civil(y, m, d);
        assert_eq!(day(2026, 11, 16) * DAY_US, MONDAY);
        // Checked against `date -u +%G-W%V`.
        for ((y, m, d), want) in [
            ((2026, 11, 20), (2026, 47)),
            ((2021, 1, 3), (2020, 53)),
            ((2021, 1, 4), (2021, 1)),
            ((2020, 12, 31), (2020, 53)),
            ((2024, 12, 30), (2025, 1)),
            ((1970, 1, 1), (1970, 1)),
            ((2027, 1, 1), (2026, 53)),
        ] {
            let (year, week, monday) = iso_week(day(y, m, d));
            assert_eq!((year, week), want, "{y}-{m}-{d}");
            assert_eq!((monday + 3).rem_euclid(7), 0, "{y}-{m}-{d}");
        }
        assert_eq!(Tier::Weekly.period(MONDAY + 4 * DAY_US).1, "week 2026-W47");
        assert_eq!(Tier::Daily.period(MONDAY - 1).1, "2026-11-15");
        assert_eq!(Tier::Monthly.period(MONDAY).1, "2026-11");
        assert_eq!(Tier::Yearly.period(MONDAY).1, "2026");
    }

    #[test]
    fn durations_and_policies_read_as_configured() {
        assert_eq!(format_duration(14 * 86_400), "14d");
        assert_eq!(format_duration(129_600), "1d12h");
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(format_duration(0), "0s");
        let p = policy(|p| {
            p.keep_last = Some(2);
            p.keep_within_secs = Some(86_400);
            p.keep_weekly = Some(4);
        });
        assert_eq!(describe_policy(&p), "keep-last 2, keep-within 1d, keep-weekly 4");
        assert_eq!(describe_policy(&RetentionPolicy::default()), "no retention policy");
    }

    /// Backups a (Mon 10:00), b (Mon 20:00), c (Tue 10:00), d (Fri 10:00),
    /// e (next Mon 10:00), starting in segments 1 to 5; WAL 1 to 6.
    fn week() -> RetentionInput {
        let at = |day: i64, hour: i64| MONDAY + day * DAY_US + hour * HOUR;
        let backups = vec![
            bp("e", 1, 5, at(7, 10)),
            bp("a", 1, 1, at(0, 10)),
            bp("c", 1, 3, at(1, 10)),
            bp("b", 1, 2, at(0, 20)),
            bp("d", 1, 4, at(4, 10)),
        ];
        input(backups, segs(1, 1..=6, at(7, 11)), BTreeMap::new())
    }

    #[test]
    fn keep_last_and_calendar_tiers_name_their_rule() {
        let s = week();
        let now = (MONDAY + 8 * DAY_US) / 1000;
        let p = plan_retention(&policy(|p| p.keep_daily = Some(2)), now, &s).unwrap();
        assert_eq!(kept(&p), ["d", "e"]);
        assert_eq!(reasons_of(&p, "e"), ["newest of 2026-11-23 (keep-daily)"]);
        assert_eq!(reasons_of(&p, "d"), ["newest of 2026-11-20 (keep-daily)"]);
        let gone: Vec<&str> = p.delete_backups.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(gone, ["a", "b", "c"]);
        assert_eq!(p.delete_backups[0].reason, "kept by no rule (keep-daily 2)");
        assert_eq!(deleted_wal(&p), [name(1, 1), name(1, 2), name(1, 3)]);
        assert_eq!(p.delete_wal[0].reason, "older than every kept backup on timeline 1");

        let p = plan_retention(&policy(|p| p.keep_weekly = Some(3)), now, &s).unwrap();
        assert_eq!(kept(&p), ["d", "e"]);
        assert_eq!(reasons_of(&p, "d"), ["newest of week 2026-W47 (keep-weekly)"]);
        let p = plan_retention(&policy(|p| p.keep_daily = Some(3)), now, &s).unwrap();
        assert_eq!(kept(&p), ["c", "d", "e"]);

        let p = plan_retention(
            &policy(|p| {
                p.keep_last = Some(2);
                p.keep_monthly = Some(1);
                p.keep_yearly = Some(5);
            }),
            now,
            &s,
        )
        .unwrap();
        assert_eq!(kept(&p), ["d", "e"]);
        assert_eq!(
            reasons_of(&p, "e"),
            ["newest 2 (keep-last)", "newest of 2026-11 (keep-monthly)", "newest of 2026 (keep-yearly)"]
        );
        assert_eq!(reasons_of(&p, "d"), ["newest 2 (keep-last)"]);
    }

    #[test]
    fn keep_within_keeps_the_newest_backup_before_the_window() {
        // Backups every 10 hours (b0 at hour 0 ... b4 at hour 40), one
        // segment an hour: bK starts in segment 10K + 1.
        let backups = (0..5).map(|k| bp(&format!("b{k}"), 1, 10 * k + 1, (10 * k as i64 + 1) * HOUR)).collect();
        let s = input(backups, segs(1, 1..=45, 0), BTreeMap::new());
        let now = 45 * HOUR / 1000;
        let p = plan_retention(&policy(|p| p.keep_within_secs = Some(25 * 3600)), now, &s).unwrap();
        // The window starts at hour 20; b1 (hour 11) and b2 (hour 21)? b2
        // became consistent at hour 21, after the start: b1 is the newest before.
        assert_eq!(kept(&p), ["b1", "b2", "b3", "b4"]);
        assert_eq!(reasons_of(&p, "b1"), ["newest before the keep-within window on timeline 1 (keep-within)"]);
        assert_eq!(reasons_of(&p, "b4"), ["consistent within the last 1d1h (keep-within)"]);
        assert_eq!(deleted_wal(&p), (1..=10).map(|s| name(1, s)).collect::<Vec<_>>());
        assert_eq!(p.delete_wal[0].reason, "older than every kept backup and the keep-within window on timeline 1");
        assert!(p.notes.is_empty(), "{:?}", p.notes);

        // Longer than the archive: everything is kept, and said.
        let p = plan_retention(&policy(|p| p.keep_within_secs = Some(30 * 86_400)), now, &s).unwrap();
        assert!(p.deletes_nothing());
        assert_eq!(p.keep.len(), 5);
        assert!(p.notes[0].contains("keep-within 30d reaches back to") && p.notes[0].contains("'b0'"), "{:?}", p.notes);
    }

    #[test]
    fn a_policy_that_keeps_no_backup_is_refused() {
        let mut s = week();
        let later = (MONDAY + 60 * DAY_US) / 1000;
        // With WAL archiving broken for weeks, keep-within still keeps the
        // newest backup before its window.
        let p = plan_retention(&policy(|p| p.keep_within_secs = Some(3600)), later, &s).unwrap();
        assert_eq!(kept(&p), ["e"]);
        assert_eq!(reasons_of(&p, "e"), ["newest before the keep-within window (keep-within)"]);
        let p = policy(|p| p.keep_daily = Some(0));
        let e = plan_retention(&p, later, &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the retention policy (keep-daily 0) keeps none of the 5 backups, so expire would delete every \
             backup; the newest, 'e', became consistent at 2026-11-23 10:00:00+00"
        );
        s.keep_forever.insert("a".into());
        let e = plan_retention(&p, later, &s).unwrap_err().to_string();
        assert!(e.contains("every backup not marked keep-forever"), "{e}");
        s.keep_forever.extend(["b", "c", "d", "e"].map(String::from));
        let plan = plan_retention(&p, later, &s).unwrap();
        assert!(plan.deletes_nothing() && plan.keep.iter().all(|k| k.reasons == ["marked keep-forever"]));
    }

    #[test]
    fn an_empty_policy_or_no_backup_deletes_nothing() {
        let s = week();
        let p = plan_retention(&RetentionPolicy::default(), 0, &s).unwrap();
        assert!(p.deletes_nothing());
        assert_eq!(p.notes, ["no retention policy: nothing to expire"]);
        assert_eq!(p.keep.len(), 5);
        let none = input(vec![], segs(1, 1..=6, 0), BTreeMap::new());
        let p = plan_retention(&policy(|p| p.keep_last = Some(1)), 0, &none).unwrap();
        assert!(p.deletes_nothing());
        assert_eq!(p.notes, ["no backup yet: all WAL is kept until the first backup"]);
    }

    /// Timeline 2 branched from 1 in segment 5, timeline 3 (a dead branch)
    /// from 1 in segment 3. b1 on 1 before both switches, b8 on 1 after them,
    /// b11 on 2.
    fn branched() -> RetentionInput {
        let mut segments = segs(1, 1..=10, 0);
        segments.extend(segs(2, 5..=12, 20 * HOUR));
        segments.extend(segs(3, 3..=4, 5 * HOUR));
        let histories =
            BTreeMap::from([(2, vec![entry(1, Lsn(5 * SEG + 0x200))]), (3, vec![entry(1, Lsn(3 * SEG + 0x200))])]);
        let backups = vec![bp("b1", 1, 1, HOUR), bp("b8", 1, 8, 8 * HOUR), bp("b11", 2, 11, 31 * HOUR)];
        input(backups, segments, histories)
    }

    #[test]
    fn wal_follows_the_timelines_kept_backups_reach() {
        let s = branched();
        let now = 40 * HOUR / 1000;
        let last = |n| policy(|p| p.keep_last = Some(n));
        let p = plan_retention(&last(1), now, &s).unwrap();
        assert_eq!(kept(&p), ["b11"]);
        let mut want: Vec<String> = (1..=10).map(|s| name(1, s)).collect();
        want.extend((5..=10).map(|s| name(2, s)));
        want.extend((3..=4).map(|s| name(3, s)));
        want.push("00000003.history".into());
        assert_eq!(deleted_wal(&p), want);
        let reason = |n: &str| p.delete_wal.iter().find(|d| d.name == n).unwrap().reason.clone();
        assert_eq!(reason(&name(1, 1)), "timeline 1 cannot be reached from any kept backup");
        assert_eq!(reason(&name(2, 5)), "older than every kept backup on timeline 2");
        assert_eq!(
            reason("00000003.history"),
            "no kept backup or WAL file is on timeline 3 or on a timeline descending from it"
        );

        let p = plan_retention(&last(2), now, &s).unwrap();
        assert_eq!(kept(&p), ["b8", "b11"]);
        let mut want: Vec<String> = (1..=7).map(|s| name(1, s)).collect();
        want.extend((5..=10).map(|s| name(2, s)));
        want.extend((3..=4).map(|s| name(3, s)));
        want.push("00000003.history".into());
        assert_eq!(deleted_wal(&p), want);

        // b1 reaches every timeline: only segment 1 of timeline 1 goes.
        let mut s = branched();
        s.keep_forever.insert("b1".into());
        let p = plan_retention(&last(1), now, &s).unwrap();
        assert_eq!(kept(&p), ["b1", "b11"]);
        assert_eq!(deleted_wal(&p), Vec::<String>::new());
        assert!(p.notes[0].contains("'b1' is marked keep-forever"), "{:?}", p.notes);
    }

    #[test]
    fn the_timeline_being_archived_keeps_a_backup_that_restores_it() {
        // A point-in-time restore of b1 ended in segment 4 and promoted
        // timeline 2, archived since; b6 and b8 are on the abandoned timeline 1.
        let mut segments = segs(1, 1..=10, 0);
        segments.extend(segs(2, 4..=12, 20 * HOUR));
        let histories = BTreeMap::from([(2, vec![entry(1, Lsn(4 * SEG + 0x200))])]);
        let backups = vec![bp("b1", 1, 1, HOUR), bp("b6", 1, 6, 6 * HOUR), bp("b8", 1, 8, 8 * HOUR)];
        let s = input(backups, segments, histories);
        let p = plan_retention(&policy(|p| p.keep_last = Some(2)), 40 * HOUR / 1000, &s).unwrap();
        assert_eq!(kept(&p), ["b1", "b6", "b8"]);
        assert_eq!(reasons_of(&p, "b1"), ["newest that restores timeline 2, where WAL is archived now (safety)"]);
        assert!(p.notes[0].contains("backup 'b1' is kept too"), "{:?}", p.notes);
        assert!(p.deletes_nothing());
    }

    #[test]
    fn partial_and_backup_files_follow_their_segment() {
        let mut s = week();
        let files = ["000000010000000000000001.00000028.backup", "000000010000000000000004.00000028.backup"];
        s.other_wal.extend(files.iter().map(|f| f.parse::<WalFileName>().unwrap()));
        s.other_wal.push("000000010000000000000002.partial".parse().unwrap());
        s.other_wal.push("000000010000000000000006.partial".parse().unwrap());
        let p = plan_retention(&policy(|p| p.keep_last = Some(2)), 0, &s).unwrap();
        assert_eq!(
            deleted_wal(&p),
            [name(1, 1), files[0].to_string(), name(1, 2), "000000010000000000000002.partial".into(), name(1, 3)]
        );
    }

    #[test]
    fn the_sweep_spares_referenced_and_young_objects() {
        let h = |b: u8| Hash::from(ContentHash::of(&[b]));
        let key = |hash: &Hash| {
            let hex = hash.to_string();
            format!("main/data/{}/{hex}", &hex[..2])
        };
        let meta = |key: String, modified_ms| ObjectMeta { key, size: 10, modified_ms };
        let listing = vec![
            meta(key(&h(1)), 0),
            meta(key(&h(2)), 0),
            meta(key(&h(3)), 9_000),
            meta("main/data/zz/not-a-hash".into(), 0),
            meta(key(&h(4)).replace("/data/", "/data/00"), 0),
        ];
        let out = plan_sweep("main/data/", &listing, &BTreeSet::from([h(1)]), 10_000, 5);
        assert_eq!(out.delete, [listing[1].clone()]);
        assert_eq!(out.in_grace, [listing[2].clone()]);
        assert_eq!(out.unknown.len(), 2);
        // Exactly the grace period old: swept.
        assert_eq!(plan_sweep("main/data/", &listing[2..3], &BTreeSet::new(), 14_000, 5).delete.len(), 1);
    }

    /// `(input, timelines)`: timeline 1 from segment 0, timeline 2 branched
    /// from 1, timeline 3 from 1 or 2; 20 segments each with ~8% holes,
    /// archived three hours apart along each timeline; backups whose stop
    /// time runs with their LSN; random keep-forever marks, `.partial` and
    /// `.backup` files.
    fn arb_input() -> impl Strategy<Value = (RetentionInput, u32)> {
        let backups = vec((0..3usize, 0..14u64, 0..SEG, 1..3 * SEG, 0..5u8), 0..7);
        let extra = vec((0..3usize, 0..20u64, any::<bool>()), 0..4);
        (1..=3u32, 2..12u64, 0..SEG, any::<bool>(), 1..8u64, 0..SEG, backups, vec(0..12u8, 60), extra).prop_map(
            |(n, k2, off2, from1, d3, off3, backups, keep, extra)| {
                let sw2 = Lsn(k2 * SEG + off2);
                let sw3 = Lsn(if from1 { d3 * SEG + off3 } else { sw2.0 + d3 * SEG + off3 });
                let h3 = if from1 { vec![entry(1, sw3)] } else { vec![entry(1, sw2), entry(2, sw3)] };
                let histories: BTreeMap<u32, Vec<HistoryEntry>> =
                    [(2, vec![entry(1, sw2)]), (3, h3)].into_iter().take(n as usize - 1).collect();
                let begin = &[(1, Lsn(0)), (2, sw2), (3, sw3)][..n as usize];
                let mut segments = Vec::new();
                for (i, &(timeline, start)) in begin.iter().enumerate() {
                    let first = SIZE.segment_of(start).0;
                    for segno in (first..first + 20).filter(|s| keep[i * 20 + (s - first) as usize] != 0) {
                        let archived_at_us = MONDAY + (segno as i64 + 1) * 3 * HOUR + i64::from(timeline) * 1000;
                        segments.push(ArchivedSegment { timeline, segno, archived_at_us });
                    }
                }
                let mut keep_forever = BTreeSet::new();
                let mut other_wal: Vec<WalFileName> =
                    histories.keys().map(|&t| WalFileName::History(TimelineId::new(t).unwrap())).collect();
                let backups: Vec<BackupPoint> = backups
                    .into_iter()
                    .enumerate()
                    .map(|(i, (t, seg, off, len, mark))| {
                        let (timeline, start) = begin[t % begin.len()];
                        let start_lsn = Lsn(start.0.max((SIZE.segment_of(start).0 + seg) * SEG + off));
                        let stop_lsn = Lsn(start_lsn.0 + len);
                        let stop_time_us =
                            MONDAY + (u128::from(stop_lsn.0) * 3 * HOUR as u128 / u128::from(SEG)) as i64;
                        let id = format!("b{i}");
                        if mark == 0 {
                            keep_forever.insert(id.clone());
                        }
                        let seg = SegmentName::from_segno(
                            TimelineId::new(timeline).unwrap(),
                            SIZE.segment_of(start_lsn),
                            SIZE,
                        );
                        other_wal.push(WalFileName::BackupHistory(seg, (start_lsn.0 % SEG) as u32));
                        BackupPoint { id, timeline, start_lsn, stop_lsn, stop_time_us, next_xid: stop_lsn.0 / 1000 }
                    })
                    .collect();
                for (t, s, partial) in extra {
                    let (timeline, start) = begin[t % begin.len()];
                    let segno = SegmentNo(SIZE.segment_of(start).0 + s);
                    let seg = SegmentName::from_segno(TimelineId::new(timeline).unwrap(), segno, SIZE);
                    other_wal.push(if partial {
                        WalFileName::Partial(seg)
                    } else {
                        WalFileName::BackupHistory(seg, 0x28)
                    });
                }
                let state = ArchiveState { segment_size: SIZE, backups, segments, histories };
                (RetentionInput { state, keep_forever, other_wal }, n)
            },
        )
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        let n = |max: u32| proptest::option::weighted(0.3, 1..=max);
        (n(4), proptest::option::weighted(0.4, 3600..60 * 3600u64), n(4), n(3), n(2), n(2)).prop_map(
            |(keep_last, keep_within_secs, keep_daily, keep_weekly, keep_monthly, keep_yearly)| RetentionPolicy {
                keep_last,
                keep_within_secs,
                keep_daily,
                keep_weekly,
                keep_monthly,
                keep_yearly,
            },
        )
    }

    /// The state after the plan's deletions.
    fn apply(s: &RetentionInput, p: &RetentionPlan) -> RetentionInput {
        let gone_b: HashSet<&str> = p.delete_backups.iter().map(|d| d.name.as_str()).collect();
        let gone_w: HashSet<&str> = p.delete_wal.iter().map(|d| d.name.as_str()).collect();
        let mut out = s.clone();
        out.state.backups.retain(|b| !gone_b.contains(b.id.as_str()));
        out.state.segments.retain(|g| !gone_w.contains(name(g.timeline, g.segno).as_str()));
        out.state.histories.retain(|&t, _| !gone_w.contains(format!("{t:08X}.history").as_str()));
        out.other_wal.retain(|f| !gone_w.contains(f.to_string().as_str()));
        out
    }

    fn req(target: Target, timeline: TimelineTarget, backup: Option<&str>) -> Request {
        Request { target, timeline, exclusive: false, backup: backup.map(String::from), force: false }
    }

    fn clean(r: &Result<Plan, PlanError>) -> bool {
        r.as_ref().is_ok_and(|p| p.warnings.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn applying_a_plan_keeps_every_promise(
            (s, n) in arb_input(),
            pol in arb_policy(),
            after_h in 0..40i64,
            frac in 0..=1000i64,
        ) {
            let last = s.state.segments.iter().map(|g| g.archived_at_us).max().unwrap_or(MONDAY);
            let now_ms = (last + after_h * HOUR) / 1000;
            let p = match plan_retention(&pol, now_ms, &s) {
                Ok(p) => p,
                Err(RetentionError::KeepsNoBackup { .. }) => {
                    prop_assert!(!pol.is_empty());
                    return Ok(());
                }
            };
            let after = apply(&s, &p);
            let kept: BTreeSet<&str> = p.keep.iter().map(|k| k.id.as_str()).collect();
            // Every backup is kept or deleted, never both; marked ones are kept (d).
            prop_assert_eq!(kept.len() + p.delete_backups.len(), s.state.backups.len());
            prop_assert!(p.delete_backups.iter().all(|d| !kept.contains(d.name.as_str())));
            prop_assert!(s.keep_forever.iter().all(|id| kept.contains(id.as_str())));
            if pol.is_empty() {
                prop_assert!(p.deletes_nothing());
            }

            // (a) Every kept backup still restores to its consistency point and
            // to the end of its chain, on every timeline, exactly as before.
            let timelines = [TimelineTarget::Current, TimelineTarget::Latest]
                .into_iter()
                .chain((1..=n).map(TimelineTarget::Id));
            for (id, tl) in kept.iter().flat_map(|id| timelines.clone().map(move |t| (id, t))) {
                for target in [Target::Immediate, Target::End] {
                    let r = req(target, tl, Some(id));
                    let before = plan::plan(&s.state, &r);
                    if clean(&before) {
                        let now = plan::plan(&after.state, &r);
                        prop_assert_eq!(now, before, "{} {:?}", id, r);
                    }
                }
            }

            // (b) Every moment of the keep-within window recoverable before
            // still is, from the same backup.
            if let Some(w) = pol.keep_within_secs {
                let cutoff = now_ms * 1000 - w as i64 * 1_000_000;
                for win in plan::windows(&s.state).iter().filter(|x| x.latest_us >= cutoff) {
                    let lo = win.earliest_us.max(cutoff);
                    for us in [lo, win.latest_us, lo + (win.latest_us - lo) * frac / 1000] {
                        for tl in [TimelineTarget::Id(win.timeline), TimelineTarget::Latest, TimelineTarget::Current] {
                            let r = req(Target::Time { us }, tl, None);
                            let before = plan::plan(&s.state, &r);
                            if let Ok(b) = &before {
                                let now = plan::plan(&after.state, &r);
                                prop_assert!(now.is_ok(), "{:?} {:?} was {:?}", now, r, b);
                                prop_assert_eq!(&now.unwrap().backup, &b.backup);
                            }
                        }
                    }
                }
            }

            // History files stay for every timeline holding a kept backup or
            // WAL file, and for all its ancestors.
            let mut live: BTreeSet<u32> = after.state.backups.iter().map(|b| b.timeline).collect();
            live.extend(after.state.segments.iter().map(|g| g.timeline));
            live.extend(after.other_wal.iter().filter(|f| f.segment().is_some()).map(|f| f.timeline().get()));
            for t in live.clone() {
                live.extend(s.state.histories.get(&t).into_iter().flatten().map(|e| e.parent.get()));
            }
            for t in live.iter().filter(|t| s.state.histories.contains_key(t)) {
                prop_assert!(after.state.histories.contains_key(t), "history of {} deleted: {:?}", t, p);
            }

            // (c) Planning again deletes nothing and keeps the same backups.
            let again = plan_retention(&pol, now_ms, &after).unwrap();
            prop_assert!(again.deletes_nothing(), "{:?}\nafter {:?}", again, p);
            prop_assert_eq!(again.keep.iter().map(|k| k.id.as_str()).collect::<BTreeSet<_>>(), kept);
        }

        #[test]
        fn planning_never_panics(
            backups in vec((0..4u32, 0..64 * SEG, 0..64 * SEG, any::<i64>()), 0..5),
            segments in vec((0..4u32, 0..64u64, any::<i64>()), 0..60),
            histories in vec((0..5u32, vec((1..5u32, 0..64 * SEG), 0..4)), 0..4),
            pol in arb_policy(),
            within in proptest::option::of(any::<u64>()),
            now_ms in any::<i64>(),
        ) {
            let pol = RetentionPolicy { keep_within_secs: within.or(pol.keep_within_secs), ..pol };
            let backups = backups.into_iter().enumerate().map(|(i, (timeline, a, z, stop_time_us))| {
                BackupPoint { id: format!("b{i}"), timeline, start_lsn: Lsn(a), stop_lsn: Lsn(z), stop_time_us, next_xid: 0 }
            });
            let segments = segments.into_iter().map(|(timeline, segno, archived_at_us)| ArchivedSegment { timeline, segno, archived_at_us });
            let histories = histories.into_iter().map(|(t, h)| (t, h.into_iter().map(|(p, l)| entry(p, Lsn(l))).collect()));
            let state = ArchiveState { segment_size: SIZE, backups: backups.collect(), segments: segments.collect(), histories: histories.collect() };
            let _ = plan_retention(&pol, now_ms, &RetentionInput { state, keep_forever: BTreeSet::new(), other_wal: vec![] });
        }
    }
}
