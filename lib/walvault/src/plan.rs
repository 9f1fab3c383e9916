//! Point-in-time recovery planning: which backup, which timelines and which
//! WAL files a recovery target needs, or precisely why it cannot be reached.
//!
//! Pure, like the formats layer: an [`ArchiveState`] (what the catalog says
//! the repository holds) and a [`Request`] in, a [`Plan`] or a [`PlanError`]
//! out; no I/O and no clock. [`windows`] tells to which moments each timeline
//! can be recovered. Timelines follow PostgreSQL: the history file of
//! timeline T lists all of T's ancestors with the LSN where each ended, and
//! the segment holding a switch point is read from the newer timeline.
//! [`ArchiveIndex`] indexes the segments once when several questions are asked
//! of one archive.
//!
//! ```
//! use std::collections::BTreeMap;
//! use walvault::plan::{plan, ArchiveState, ArchivedSegment, BackupPoint, Request, Target, TimelineTarget};
//! use walvault_formats::wal::{Lsn, WalSegmentSize};
//!
//! let backup = BackupPoint { id: "b1".into(), timeline: 1, start_lsn: Lsn(0x200_0028), stop_lsn: Lsn(0x200_0100),
//!     stop_time_us: 1_000, next_xid: 740 };
//! let segments = (2..5).map(|segno| ArchivedSegment { timeline: 1, segno, archived_at_us: 2_000 * segno as i64 });
//! let state = ArchiveState { segment_size: WalSegmentSize::DEFAULT, backups: vec![backup],
//!     segments: segments.collect(), histories: BTreeMap::new() };
//! let req = Request { target: Target::End, timeline: TimelineTarget::Latest, exclusive: false, backup: None, force: false };
//! let plan = plan(&state, &req).unwrap();
//! assert_eq!((plan.backup.as_str(), plan.wal.len()), ("b1", 3));
//! assert_eq!(plan.end_segment, "000000010000000000000004");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::iter;

use thiserror::Error;
use walvault_formats::wal::{HistoryEntry, Lsn, SegmentName, SegmentNo, TimelineId, WalSegmentSize};

/// A base backup as the planner sees it: where its WAL starts and where it
/// becomes consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPoint {
    /// The backup's label in the repository.
    pub id: String,
    /// The timeline the backup was taken on.
    pub timeline: u32,
    /// Where replay starts (the redo point of the backup's checkpoint).
    pub start_lsn: Lsn,
    /// Where the restored cluster becomes consistent (the backup end).
    pub stop_lsn: Lsn,
    /// When it became consistent, in microseconds since the Unix epoch.
    pub stop_time_us: i64,
    /// The full 64-bit next transaction id after the backup stopped.
    pub next_xid: u64,
}

/// One archived WAL segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchivedSegment {
    /// Its timeline.
    pub timeline: u32,
    /// Its segment number.
    pub segno: u64,
    /// When the archive stored it, in microseconds since the Unix epoch.
    pub archived_at_us: i64,
}

/// What the repository holds, as far as planning is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveState {
    /// The cluster's WAL segment size.
    pub segment_size: WalSegmentSize,
    /// Every backup, in any order.
    pub backups: Vec<BackupPoint>,
    /// Every archived segment, in any order.
    pub segments: Vec<ArchivedSegment>,
    /// Timeline number to the entries of its history file; timeline 1 has none.
    pub histories: BTreeMap<u32, Vec<HistoryEntry>>,
}

/// Where recovery stops (PostgreSQL's `recovery_target*` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay all archived WAL (no recovery target).
    End,
    /// Stop as soon as the backup is consistent (`recovery_target = 'immediate'`).
    Immediate,
    /// `recovery_target_time`.
    Time {
        /// Microseconds since the Unix epoch.
        us: i64,
    },
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`, as a full 64-bit transaction id.
    Xid(u64),
    /// `recovery_target_name`: a restore point made by `pg_create_restore_point()`.
    Name(String),
}

/// Which timeline recovery follows (`recovery_target_timeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineTarget {
    /// The highest timeline reachable from the backup.
    Latest,
    /// The backup's own timeline.
    Current,
    /// This timeline.
    Id(u32),
}

/// A recovery request, as the operator states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Where to stop.
    pub target: Target,
    /// Which timeline to follow.
    pub timeline: TimelineTarget,
    /// Stop just before the target (`recovery_target_inclusive = off`).
    /// PostgreSQL applies it; it does not change the plan.
    pub exclusive: bool,
    /// Restore this backup rather than the one the planner would choose.
    pub backup: Option<String>,
    /// Plan even when WAL is missing or the target lies past the archive,
    /// listing the problems in [`Plan::warnings`].
    pub force: bool,
}

/// What a recovery needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The backup to restore.
    pub backup: String,
    /// The timeline recovery follows (`recovery_target_timeline`), resolved.
    pub target_timeline: u32,
    /// The timelines from the backup's to the target one, each with the LSN
    /// where it ends (`u64::MAX` for the target timeline).
    pub path: Vec<(u32, Lsn)>,
    /// Every WAL file recovery reads, in replay order, from the backup's
    /// start segment to [`end_segment`](Plan::end_segment).
    pub wal: Vec<String>,
    /// The last WAL file that must exist.
    pub end_segment: String,
    /// With [`Request::force`]: what is missing or out of reach.
    pub warnings: Vec<String>,
}

/// An interval of moments one timeline can be recovered to: every time
/// target from `earliest_us` to `latest_us` plans successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The timeline (the `Id` to recover with).
    pub timeline: u32,
    /// The first reachable moment: when the backup became consistent.
    pub earliest_us: i64,
    /// The last reachable moment: when the last segment of the unbroken
    /// chain of WAL was archived.
    pub latest_us: i64,
    /// The first reachable LSN: where the backup became consistent.
    pub earliest_lsn: Lsn,
    /// The last reachable LSN: the last byte of the unbroken chain of WAL.
    pub latest_lsn: Lsn,
    /// The backup the window starts from.
    pub from_backup: String,
}

/// Why a recovery cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// The archive holds no backup at all.
    #[error("no backup in the archive: take one with 'walvault backup'")]
    NoBackups,
    /// The requested backup is unknown.
    #[error("backup '{0}' not found in the archive: list backups with 'walvault info'")]
    BackupNotFound(String),
    /// The requested timeline has no history file in the archive.
    #[error("timeline '{0}' not found: its history file is not archived; choose a timeline the archive knows")]
    TimelineNotFound(u32),
    /// The target timeline does not descend from the backup's timeline after
    /// the backup became consistent.
    #[error(
        "backup '{backup}' cannot reach timeline '{timeline}': that timeline does not descend from the \
         backup's timeline after the backup ended; choose another backup or timeline"
    )]
    BackupNotOnTimeline {
        /// The backup (with no backup requested, the newest one).
        backup: String,
        /// The target timeline.
        timeline: u32,
    },
    /// Every eligible backup becomes consistent after the target.
    #[error("recovery target {target} is before the earliest reachable point, {earliest}: choose a later target")]
    TargetBeforeBackups {
        /// The target, such as "time '2024-05-01 10:00:00+00'".
        target: String,
        /// The earliest point any eligible backup reaches.
        earliest: String,
    },
    /// The target lies past the unbroken chain of archived WAL.
    #[error(
        "recovery target {target} is after the end of the archived WAL, {latest}: choose an earlier target, \
         or wait until the server has archived more WAL"
    )]
    TargetAfterArchive {
        /// The target.
        target: String,
        /// The end of the unbroken chain of WAL.
        latest: String,
    },
    /// A WAL file that recovery must read is not archived.
    #[error(
        "missing WAL file '{name}', needed to recover backup '{backup}': copy it from the server's pg_wal \
         into the archive or choose another backup or target (forced, recovery would stop at the gap)"
    )]
    MissingWal {
        /// The first missing file.
        name: String,
        /// The backup whose recovery needs it.
        backup: String,
    },
}

/// Plans a recovery; see [`ArchiveIndex::plan`].
///
/// # Errors
///
/// A [`PlanError`] when no backup can reach the target with archived WAL.
pub fn plan(state: &ArchiveState, req: &Request) -> Result<Plan, PlanError> {
    ArchiveIndex::new(state).plan(req)
}

/// The recoverable windows of every timeline; see [`ArchiveIndex::windows`].
pub fn windows(state: &ArchiveState) -> Vec<Window> {
    ArchiveIndex::new(state).windows()
}

/// An [`ArchiveState`] with its segments indexed by timeline, in
/// `O(n log n)`: build it once to ask several questions of an archive of
/// millions of segments. Every later lookup is logarithmic.
#[derive(Debug)]
pub struct ArchiveIndex<'a> {
    state: &'a ArchiveState,
    lines: HashMap<u32, Line>,
}

/// The archived segments of one timeline.
#[derive(Debug)]
struct Line {
    /// `(segno, archived_at_us)` sorted by segno, one entry per segno.
    segs: Vec<(u64, i64)>,
    /// The contiguous runs of `segs`: inclusive `(first, last)`, sorted.
    runs: Vec<(u64, u64)>,
}

impl Line {
    fn new(mut segs: Vec<(u64, i64)>) -> Line {
        // Sorting by time too keeps the first archive time of a duplicate.
        segs.sort_unstable();
        segs.dedup_by_key(|s| s.0);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(s, _) in &segs {
            match runs.last_mut() {
                Some(run) if run.1.checked_add(1) == Some(s) => run.1 = s,
                _ => runs.push((s, s)),
            }
        }
        Line { segs, runs }
    }

    fn archived_at(&self, s: u64) -> Option<i64> {
        let i = self.segs.binary_search_by_key(&s, |p| p.0).ok()?;
        self.segs.get(i).map(|p| p.1)
    }

    /// The last segment of the contiguous run holding `s`.
    fn run_end(&self, s: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.1 < s);
        self.runs.get(i).filter(|r| r.0 <= s).map(|r| r.1)
    }

    /// The archived segments in `[lo, hi)`; `hi` None is unbounded.
    fn within(&self, lo: u64, hi: Option<u64>) -> &[(u64, i64)] {
        let a = self.segs.partition_point(|p| p.0 < lo);
        let b = hi.map_or(self.segs.len(), |h| self.segs.partition_point(|p| p.0 < h));
        self.segs.get(a..b.max(a)).unwrap_or(&[])
    }
}

/// The timelines recovery follows from one backup to the target timeline.
struct Route {
    /// From the backup's timeline to the target, with the LSN each ends at.
    path: Vec<(TimelineId, Lsn)>,
    /// Which timeline each segment is read from: `[lo, hi)` ranges in order,
    /// together covering every segment number from 0.
    spans: Vec<Span>,
}

#[derive(Clone, Copy)]
struct Span {
    tli: TimelineId,
    lo: u64,
    hi: Option<u64>,
}

impl Route {
    fn new(path: Vec<(TimelineId, Lsn)>, size: WalSegmentSize) -> Route {
        // Timeline k+1 begins in the segment holding timeline k's switch
        // point, and a segment is read from the last timeline on the path
        // that began at or before it: PostgreSQL's XLogFileReadAnyTLI() reads
        // the switch segment from the new timeline. Scanning backwards with a
        // running minimum keeps the spans a partition even when a damaged
        // history has switch points out of order.
        let begins: Vec<u64> =
            iter::once(0).chain(path.iter().map(|p| size.segment_of(p.1).0)).take(path.len()).collect();
        let mut spans = Vec::new();
        let mut hi: Option<u64> = None;
        for (&(tli, _), &lo) in path.iter().zip(&begins).rev() {
            if hi.is_none_or(|h| lo < h) {
                spans.push(Span { tli, lo, hi });
                hi = Some(lo);
            }
        }
        spans.reverse();
        Route { path, spans }
    }

    fn tli_of(&self, s: u64) -> TimelineId {
        let i = self.spans.partition_point(|sp| sp.lo <= s);
        // The first span starts at segment 0, so `i` is at least 1; the
        // fallback is never taken.
        i.checked_sub(1).and_then(|i| self.spans.get(i)).map_or(TimelineId::FIRST, |sp| sp.tli)
    }

    /// The spans from segment `from` on, the first one clipped to start there.
    fn spans_from(&self, from: u64) -> impl Iterator<Item = Span> + '_ {
        self.spans
            .iter()
            .filter(move |sp| sp.hi.is_none_or(|h| h > from))
            .map(move |sp| Span { lo: sp.lo.max(from), ..*sp })
    }
}

/// Why a backup cannot reach a timeline.
enum Unreachable {
    NoTimeline,
    NotOnTimeline,
}

/// What the target asks of the chain of WAL.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Up to this segment.
    Seg(u64),
    /// Up to a segment archived at or after this time, past the chain's end.
    After(i64),
    /// Everything archived, without a gap.
    Rest,
}

impl<'a> ArchiveIndex<'a> {
    /// Indexes `state`.
    pub fn new(state: &'a ArchiveState) -> ArchiveIndex<'a> {
        let mut by_tli: HashMap<u32, Vec<(u64, i64)>> = HashMap::new();
        for s in &state.segments {
            by_tli.entry(s.timeline).or_default().push((s.segno, s.archived_at_us));
        }
        ArchiveIndex { state, lines: by_tli.into_iter().map(|(t, segs)| (t, Line::new(segs))).collect() }
    }

    /// Plans a recovery: resolves the timeline, chooses the backup, and
    /// lists the WAL files from the backup's start to the target.
    ///
    /// Without [`Request::backup`] the planner takes the newest backup that
    /// is on the target timeline's path and at or before the target (by
    /// stop time for a time target, by stop LSN otherwise; for an xid target,
    /// its next xid must not be past the target). A restore point's position
    /// is unknown without reading WAL, so a [`Target::Name`] takes the oldest
    /// such backup instead: a newer one would miss every restore point made
    /// before it became consistent. If the chosen backup's WAL is incomplete
    /// the planner says so rather than silently falling back to an older one.
    ///
    /// # Errors
    ///
    /// Every [`PlanError`]; with [`Request::force`], missing WAL and a target
    /// past the archive become [`Plan::warnings`] instead.
    pub fn plan(&self, req: &Request) -> Result<Plan, PlanError> {
        let backups = &self.state.backups;
        if backups.is_empty() {
            return Err(PlanError::NoBackups);
        }
        let pool: Vec<&BackupPoint> = match &req.backup {
            Some(id) => {
                vec![backups.iter().find(|b| &b.id == id).ok_or_else(|| PlanError::BackupNotFound(id.clone()))?]
            }
            None => backups.iter().collect(),
        };
        let target = &req.target;
        let (backup, timeline) = match req.timeline {
            TimelineTarget::Id(t) => {
                let on: Vec<&BackupPoint> = pool.iter().copied().filter(|b| self.route(b, t).is_ok()).collect();
                if on.is_empty() {
                    return Err(if t == 0 || self.lineage(t).is_none() {
                        PlanError::TimelineNotFound(t)
                    } else {
                        PlanError::BackupNotOnTimeline { backup: newest(&pool), timeline: t }
                    });
                }
                (pick(target, &reached(target, &on)?), t)
            }
            TimelineTarget::Current => {
                let b = pick(target, &reached(target, &pool)?);
                (b, b.map_or(0, |b| b.timeline))
            }
            TimelineTarget::Latest => {
                let ok = reached(target, &pool)?;
                let t = ok.iter().filter_map(|b| self.latest_from(b)).max().unwrap_or(0);
                let on: Vec<&BackupPoint> = ok.into_iter().filter(|b| self.route(b, t).is_ok()).collect();
                (pick(target, &on), t)
            }
        };
        // `reached` never returns an empty list, so only `Latest` can find no
        // backup: when every eligible one names the nonexistent timeline 0.
        let backup = backup.ok_or(PlanError::TimelineNotFound(timeline))?;
        let route = self.route(backup, timeline).map_err(|e| match e {
            Unreachable::NoTimeline => PlanError::TimelineNotFound(timeline),
            Unreachable::NotOnTimeline => PlanError::BackupNotOnTimeline { backup: backup.id.clone(), timeline },
        })?;
        self.plan_route(backup, &route, timeline, req)
    }

    fn plan_route(&self, b: &BackupPoint, route: &Route, timeline: u32, req: &Request) -> Result<Plan, PlanError> {
        let size = self.state.segment_size;
        let (s0, stop) = self.bounds(b);
        let last = self.walk(route, s0);
        let missing = last.map_or(s0, |e| e.saturating_add(1));
        let consistent = last.is_some_and(|e| e >= stop);
        let later = self.first_archived(route, missing.saturating_add(1), |_| true).is_some();
        let want = match &req.target {
            Target::Immediate => Want::Seg(stop),
            Target::Lsn(l) => Want::Seg(size.segment_of(*l).0.max(stop)),
            // The first segment archived at or after the target time holds
            // every record written before it (its archive time bounds their
            // write times), so recovery passes the target there at the latest.
            Target::Time { us } => match last {
                Some(e) if self.archived_at(route, e).is_some_and(|at| at >= *us) => {
                    Want::Seg(self.first_archived(route, s0, |at| at >= *us).unwrap_or(e).max(stop))
                }
                _ => Want::After(*us),
            },
            // Where an xid or a restore point lies is unknown without reading
            // the WAL: recovery may need all of it.
            Target::End | Target::Xid(_) | Target::Name(_) => Want::Rest,
        };
        // Past a gap, or short of the target timeline, ending recovery early
        // would silently lose history that is known to exist.
        let target_start = route.spans.last().map_or(0, |sp| sp.lo);
        let complete = match want {
            Want::Seg(x) => last.filter(|&e| x <= e).map(|_| x),
            Want::Rest => last.filter(|_| consistent && !later && missing >= target_start),
            Want::After(_) => None,
        };
        let mut warnings = Vec::new();
        let end = match complete {
            Some(end) => end,
            None => {
                let refusal = if !consistent || later || want == Want::Rest {
                    PlanError::MissingWal { name: self.name(route, missing), backup: b.id.clone() }
                } else {
                    PlanError::TargetAfterArchive {
                        target: describe_target(&req.target),
                        latest: self.describe_latest(route, last, &req.target),
                    }
                };
                if !req.force {
                    return Err(refusal);
                }
                warnings.push(refusal.to_string());
                // Never list past what is archived (or the backup's end):
                // recovery cannot read further anyway.
                let newest = self.last_archived(route).unwrap_or(s0).max(stop);
                match want {
                    Want::Seg(x) => x.min(newest),
                    Want::After(us) => self.first_archived(route, missing, |at| at >= us).unwrap_or(newest).max(stop),
                    Want::Rest => newest,
                }
            }
        };
        let (mut wal, mut gaps) = (Vec::new(), Vec::<(u64, u64)>::new());
        for s in s0..=end {
            // Only a forced plan can list files that are not archived.
            if !warnings.is_empty() && self.archived_at(route, s).is_none() {
                match gaps.last_mut() {
                    Some(g) if g.1 + 1 == s => g.1 = s,
                    _ => gaps.push((s, s)),
                }
            }
            wal.push(self.name(route, s));
        }
        if !gaps.is_empty() {
            let count: u64 = gaps.iter().map(|g| g.1 - g.0 + 1).sum();
            let mut shown: Vec<String> = gaps
                .iter()
                .take(20)
                .map(|&(lo, hi)| match hi - lo {
                    0 => format!("'{}'", self.name(route, lo)),
                    n => format!("'{}' to '{}' ({} files)", self.name(route, lo), self.name(route, hi), n + 1),
                })
                .collect();
            shown.extend((gaps.len() > 20).then(|| format!("and {} more gaps", gaps.len() - 20)));
            warnings.push(format!("{count} of {} WAL files are not archived: {}", wal.len(), shown.join(", ")));
        }
        Ok(Plan {
            backup: b.id.clone(),
            target_timeline: timeline,
            path: route.path.iter().map(|&(t, l)| (t.get(), l)).collect(),
            end_segment: self.name(route, end),
            wal,
            warnings,
        })
    }

    /// The recoverable windows: for each timeline that has archived WAL, the
    /// intervals of time targets that [`plan`](ArchiveIndex::plan) accepts
    /// with `TimelineTarget::Id(timeline)` and no backup given, sorted by
    /// timeline and time. A timeline appears more than once when a gap in
    /// its WAL splits its history; a timeline no backup can reach is omitted.
    ///
    /// A time target picks the newest backup consistent by then, so the
    /// interval from each backup's stop time to the next backup's is
    /// recoverable up to the archive time of the end of that backup's
    /// unbroken chain of WAL. The LSN bounds are those of the same backups
    /// and chains.
    pub fn windows(&self) -> Vec<Window> {
        let mut timelines: Vec<u32> = self.lines.keys().copied().collect();
        timelines.sort_unstable();
        let mut out = Vec::new();
        for t in timelines {
            let mut cands: Vec<(&BackupPoint, Route)> =
                self.state.backups.iter().filter_map(|b| self.route(b, t).ok().map(|r| (b, r))).collect();
            cands.sort_by(|x, y| time_key(x.0).cmp(&time_key(y.0)));
            // Of backups that stopped at the same moment, a time target picks the last.
            let mut slots = cands
                .iter()
                .enumerate()
                .filter(|(i, (b, _))| cands.get(i + 1).is_none_or(|(n, _)| n.stop_time_us != b.stop_time_us));
            let mut current: Option<Window> = None;
            let mut next = slots.next();
            while let Some((_, (b, route))) = next {
                next = slots.next();
                let slot_end = next.map_or(i64::MAX, |(_, (n, _))| n.stop_time_us.saturating_sub(1));
                let (s0, stop) = self.bounds(b);
                let chain = self.walk(route, s0).filter(|&e| e >= stop);
                let reach = chain.and_then(|e| self.archived_at(route, e).map(|at| (e, at)));
                let Some((e, latest)) = reach.filter(|&(_, at)| at >= b.stop_time_us) else {
                    out.extend(current.take());
                    continue;
                };
                // Cut short by the next backup, LSN targets past its stop would pick it.
                let cap = if slot_end < latest {
                    next.map_or(u64::MAX, |(_, (n, _))| n.stop_lsn.0.saturating_sub(1))
                } else {
                    u64::MAX
                };
                let latest_lsn = self.last_lsn(e).min(Lsn(cap));
                let latest_us = latest.min(slot_end);
                // An open window always ends where this slot begins.
                let w = current.get_or_insert_with(|| Window {
                    timeline: t,
                    earliest_us: b.stop_time_us,
                    latest_us,
                    earliest_lsn: b.stop_lsn,
                    latest_lsn,
                    from_backup: b.id.clone(),
                });
                (w.latest_us, w.latest_lsn) = (latest_us, latest_lsn);
                if latest_us < slot_end {
                    out.extend(current.take());
                }
            }
            out.extend(current);
        }
        out
    }

    /// Timeline `t` and its ancestors with the LSN each ends at, oldest
    /// first; None when `t` (other than 1) has no history file.
    fn lineage(&self, t: u32) -> Option<Vec<(TimelineId, Lsn)>> {
        let tli = TimelineId::new(t)?;
        let history = match self.state.histories.get(&t) {
            Some(h) => h.as_slice(),
            None if t == 1 => &[],
            None => return None,
        };
        Some(history.iter().map(|e| (e.parent, e.switch_point)).chain([(tli, Lsn(u64::MAX))]).collect())
    }

    fn route(&self, b: &BackupPoint, t: u32) -> Result<Route, Unreachable> {
        let tli = TimelineId::new(t).ok_or(Unreachable::NoTimeline)?;
        let path = if b.timeline == t {
            vec![(tli, Lsn(u64::MAX))]
        } else {
            let mut all = self.lineage(t).ok_or(Unreachable::NoTimeline)?;
            let k = all.iter().position(|p| p.0.get() == b.timeline).ok_or(Unreachable::NotOnTimeline)?;
            all.split_off(k)
        };
        // A backup that became consistent after its timeline branched off
        // holds changes the target timeline never had.
        if path.first().is_none_or(|p| b.stop_lsn > p.1) {
            return Err(Unreachable::NotOnTimeline);
        }
        Ok(Route::new(path, self.state.segment_size))
    }

    /// The highest timeline reachable from `b`: its own, or one whose
    /// history file lists it as an ancestor that ended after `b` stopped.
    fn latest_from(&self, b: &BackupPoint) -> Option<u32> {
        let known = self.state.histories.keys().copied().chain([b.timeline]);
        known.filter(|&t| self.route(b, t).is_ok()).max()
    }

    /// The segments holding the backup's start and its stop.
    fn bounds(&self, b: &BackupPoint) -> (u64, u64) {
        let size = self.state.segment_size;
        let s0 = size.segment_of(b.start_lsn).0;
        (s0, size.segment_of(b.stop_lsn).0.max(s0))
    }

    /// The last byte of segment `s`.
    fn last_lsn(&self, s: u64) -> Lsn {
        Lsn(s.saturating_add(1).saturating_mul(self.state.segment_size.bytes()).saturating_sub(1))
    }

    fn name(&self, route: &Route, s: u64) -> String {
        SegmentName::from_segno(route.tli_of(s), SegmentNo(s), self.state.segment_size).to_string()
    }

    fn line(&self, tli: TimelineId) -> Option<&Line> {
        self.lines.get(&tli.get())
    }

    fn archived_at(&self, route: &Route, s: u64) -> Option<i64> {
        self.line(route.tli_of(s))?.archived_at(s)
    }

    /// The last segment of the unbroken chain from `from` along the route.
    fn walk(&self, route: &Route, from: u64) -> Option<u64> {
        let mut last = None;
        for span in route.spans_from(from) {
            let Some(end) = self.line(span.tli).and_then(|l| l.run_end(span.lo)) else { return last };
            match span.hi {
                Some(hi) if end.saturating_add(1) >= hi => last = Some(hi.saturating_sub(1)),
                _ => return Some(end),
            }
        }
        last
    }

    /// The first archived segment on the route from `from` whose archive
    /// time satisfies `ok`.
    fn first_archived(&self, route: &Route, from: u64, ok: impl Fn(i64) -> bool) -> Option<u64> {
        route.spans_from(from).find_map(|sp| {
            let line = self.line(sp.tli)?;
            line.within(sp.lo, sp.hi).iter().find(|p| ok(p.1)).map(|p| p.0)
        })
    }

    /// The newest archived segment on the route.
    fn last_archived(&self, route: &Route) -> Option<u64> {
        route.spans.iter().rev().find_map(|sp| self.line(sp.tli)?.within(sp.lo, sp.hi).last().map(|p| p.0))
    }

    fn describe_latest(&self, route: &Route, last: Option<u64>, target: &Target) -> String {
        let Some(e) = last else { return "nothing archived after the backup's start".into() };
        let name = self.name(route, e);
        match target {
            Target::Time { .. } => match self.archived_at(route, e) {
                Some(at) => format!("'{}', when '{name}' was archived", format_time(at)),
                None => format!("'{name}'"),
            },
            _ => format!("'{}', the end of '{name}'", self.last_lsn(e)),
        }
    }
}

fn time_key(b: &BackupPoint) -> (i64, Lsn, &str) {
    (b.stop_time_us, b.stop_lsn, &b.id)
}

fn lsn_key(b: &BackupPoint) -> (Lsn, i64, &str) {
    (b.stop_lsn, b.stop_time_us, &b.id)
}

/// The backups at or before the target; refuses when there are none.
fn reached<'b>(target: &Target, pool: &[&'b BackupPoint]) -> Result<Vec<&'b BackupPoint>, PlanError> {
    let ok: Vec<&BackupPoint> = pool
        .iter()
        .copied()
        .filter(|b| match target {
            Target::Time { us } => b.stop_time_us <= *us,
            Target::Lsn(l) => b.stop_lsn <= *l,
            Target::Xid(x) => b.next_xid <= *x,
            Target::End | Target::Immediate | Target::Name(_) => true,
        })
        .collect();
    if !ok.is_empty() {
        return Ok(ok);
    }
    let earliest = match target {
        Target::Time { .. } => pool
            .iter()
            .min_by_key(|b| b.stop_time_us)
            .map(|b| format!("'{}', when backup '{}' became consistent", format_time(b.stop_time_us), b.id)),
        Target::Lsn(_) => pool
            .iter()
            .min_by_key(|b| b.stop_lsn)
            .map(|b| format!("'{}', where backup '{}' became consistent", b.stop_lsn, b.id)),
        _ => pool
            .iter()
            .min_by_key(|b| b.next_xid)
            .map(|b| format!("xid '{}', the next xid of backup '{}'", b.next_xid, b.id)),
    };
    Err(PlanError::TargetBeforeBackups {
        target: describe_target(target),
        earliest: earliest.unwrap_or_else(|| "no backup".into()),
    })
}

/// The backup to restore among eligible ones (see [`ArchiveIndex::plan`]).
fn pick<'b>(target: &Target, cands: &[&'b BackupPoint]) -> Option<&'b BackupPoint> {
    let it = cands.iter().copied();
    match target {
        Target::Time { .. } => it.max_by(|x, y| time_key(x).cmp(&time_key(y))),
        Target::Name(_) => it.min_by(|x, y| lsn_key(x).cmp(&lsn_key(y))),
        _ => it.max_by(|x, y| lsn_key(x).cmp(&lsn_key(y))),
    }
}

fn newest(pool: &[&BackupPoint]) -> String {
    pick(&Target::End, pool).map(|b| b.id.clone()).unwrap_or_default()
}

fn describe_target(target: &Target) -> String {
    match target {
        Target::End => "end of WAL".into(),
        Target::Immediate => "immediate".into(),
        Target::Time { us } => format!("time '{}'", format_time(*us)),
        Target::Lsn(l) => format!("lsn '{l}'"),
        Target::Xid(x) => format!("xid '{x}'"),
        Target::Name(n) => format!("restore point '{n}'"),
    }
}

/// Microseconds since the Unix epoch as UTC `YYYY-MM-DD HH:MM:SS.ffffff+00`.
fn format_time(us: i64) -> String {
    walvault_formats::time::Timestamp(us).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashSet;
    use std::ops::RangeInclusive;

    use proptest::collection::vec;
    use proptest::prelude::*;
    use walvault_formats::wal::WalFileName;

    use super::*;

    const SIZE: WalSegmentSize = WalSegmentSize::DEFAULT;
    const SEG: u64 = 0x100_0000;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    fn backup(id: &str, timeline: u32, start: &str, stop: &str, stop_time_us: i64, next_xid: u64) -> BackupPoint {
        BackupPoint { id: id.into(), timeline, start_lsn: lsn(start), stop_lsn: lsn(stop), stop_time_us, next_xid }
    }

    fn entry(parent: u32, switch_point: Lsn) -> HistoryEntry {
        HistoryEntry { parent: TimelineId::new(parent).unwrap(), switch_point, reason: String::new() }
    }

    /// Segments of `timeline`, segment s archived at s * 1000 µs.
    fn segs(timeline: u32, segnos: impl IntoIterator<Item = u64>) -> Vec<ArchivedSegment> {
        segnos
            .into_iter()
            .map(|segno| ArchivedSegment { timeline, segno, archived_at_us: segno as i64 * 1000 })
            .collect()
    }

    fn names(timeline: u32, segnos: RangeInclusive<u64>) -> Vec<String> {
        let tli = TimelineId::new(timeline).unwrap();
        segnos.map(|s| SegmentName::from_segno(tli, SegmentNo(s), SIZE).to_string()).collect()
    }

    fn req(target: Target, timeline: TimelineTarget, backup: Option<&str>) -> Request {
        Request { target, timeline, exclusive: false, backup: backup.map(String::from), force: false }
    }

    fn latest(target: Target) -> Request {
        req(target, TimelineTarget::Latest, None)
    }

    /// Timeline 1; b1 consistent in segment 1 at 1500 µs, b2 in segment 5 at 5500 µs.
    fn linear(segnos: impl IntoIterator<Item = u64>) -> ArchiveState {
        let backups = vec![
            backup("b2", 1, "0/5000028", "0/5000100", 5_500, 500),
            backup("b1", 1, "0/1000028", "0/1000100", 1_500, 100),
        ];
        ArchiveState { segment_size: SIZE, backups, segments: segs(1, segnos), histories: BTreeMap::new() }
    }

    #[test]
    fn targets_choose_the_newest_backup_before_them() {
        use Target::{End, Immediate, Name, Time, Xid};
        let s = linear(1..=9);
        let cases = vec![
            (End, Ok(("b2", 5..=9))),
            (Immediate, Ok(("b2", 5..=5))),
            (Time { us: 3_000 }, Ok(("b1", 1..=3))),
            (Time { us: 6_001 }, Ok(("b2", 5..=7))),
            (Time { us: 9_000 }, Ok(("b2", 5..=9))),
            (Target::Lsn(lsn("0/3000000")), Ok(("b1", 1..=3))),
            (Target::Lsn(lsn("0/7000010")), Ok(("b2", 5..=7))),
            (Target::Lsn(lsn("0/9FFFFFF")), Ok(("b2", 5..=9))),
            (Xid(499), Ok(("b1", 1..=9))),
            (Xid(500), Ok(("b2", 5..=9))),
            // A restore point may lie anywhere: the oldest backup reaches the most.
            (Name("before_upgrade".into()), Ok(("b1", 1..=9))),
            (Time { us: 1_499 }, Err("before")),
            (Target::Lsn(lsn("0/10000FF")), Err("before")),
            (Xid(99), Err("before")),
            (Time { us: 9_001 }, Err("after")),
            (Target::Lsn(lsn("0/A000000")), Err("after")),
        ];
        for (target, want) in cases {
            let got = plan(&s, &latest(target.clone())).map(|p| (p.backup, p.wal)).map_err(|e| match e {
                PlanError::TargetBeforeBackups { .. } => "before",
                PlanError::TargetAfterArchive { .. } => "after",
                _ => "other",
            });
            assert_eq!(got, want.map(|(b, r)| (b.to_string(), names(1, r))), "{target:?}");
        }
        assert_eq!(plan(&s, &latest(End)).unwrap().path, vec![(1, Lsn(u64::MAX))]);
        assert_eq!(
            plan(&s, &latest(Time { us: 1_000 })).unwrap_err().to_string(),
            "recovery target time '1970-01-01 00:00:00.001000+00' is before the earliest reachable point, \
             '1970-01-01 00:00:00.001500+00', when backup 'b1' became consistent: choose a later target"
        );
        let end = "'0/9FFFFFF', the end of '000000010000000000000009'".to_string();
        let after = PlanError::TargetAfterArchive { target: "lsn '0/A000000'".into(), latest: end };
        assert_eq!(plan(&s, &latest(Target::Lsn(lsn("0/A000000")))), Err(after));
    }

    #[test]
    fn a_chosen_backup_is_used_and_checked() {
        let s = linear(1..=9);
        let time = |us, b| req(Target::Time { us }, TimelineTarget::Latest, Some(b));
        assert_eq!(plan(&s, &time(6_000, "b1")).unwrap().wal, names(1, 1..=6));
        assert!(matches!(plan(&s, &time(3_000, "b2")), Err(PlanError::TargetBeforeBackups { .. })));
        assert_eq!(plan(&s, &time(3_000, "b3")), Err(PlanError::BackupNotFound("b3".into())));
        let none = ArchiveState { backups: vec![], ..s };
        assert_eq!(plan(&none, &latest(Target::End)), Err(PlanError::NoBackups));
    }

    #[test]
    fn a_hole_names_the_first_missing_file_and_force_warns() {
        let s = linear((1..=9).filter(|s| *s != 7 && *s != 8));
        let missing = PlanError::MissingWal { name: "000000010000000000000007".into(), backup: "b2".into() };
        for target in [Target::End, Target::Lsn(lsn("0/9000000")), Target::Xid(1_000)] {
            assert_eq!(plan(&s, &latest(target)), Err(missing.clone()));
        }
        assert_eq!(plan(&s, &latest(Target::Lsn(lsn("0/6000000")))).unwrap().wal, names(1, 5..=6));
        let p = plan(&s, &Request { force: true, ..latest(Target::End) }).unwrap();
        assert_eq!((p.wal, p.end_segment), (names(1, 5..=9), names(1, 9..=9).remove(0)));
        let gap =
            "2 of 5 WAL files are not archived: '000000010000000000000007' to '000000010000000000000008' (2 files)";
        assert_eq!(p.warnings, vec![missing.to_string(), gap.to_string()]);
        // A missing start segment is missing WAL, whatever the target.
        let r = req(Target::Time { us: 3_000 }, TimelineTarget::Latest, Some("b1"));
        assert_eq!(
            plan(&linear(2..=9), &r),
            Err(PlanError::MissingWal { name: names(1, 1..=1).remove(0), backup: "b1".into() })
        );
    }

    /// Timeline 2 branched from 1 at 0/3000100; b1 on timeline 1 before the
    /// switch, b9 after it.
    fn branched() -> ArchiveState {
        let mut segments = segs(1, 1..=5);
        segments.extend(segs(2, 3..=6));
        ArchiveState {
            segment_size: SIZE,
            backups: vec![
                backup("b1", 1, "0/1000028", "0/1000100", 1_500, 100),
                backup("b9", 1, "0/3000200", "0/3000300", 3_500, 300),
            ],
            segments,
            histories: BTreeMap::from([(2, vec![entry(1, lsn("0/3000100"))])]),
        }
    }

    #[test]
    fn the_switch_segment_is_read_from_the_new_timeline() {
        let s = branched();
        let p = plan(&s, &req(Target::Lsn(lsn("0/4000100")), TimelineTarget::Id(2), Some("b1"))).unwrap();
        assert_eq!(p.path, vec![(1, lsn("0/3000100")), (2, Lsn(u64::MAX))]);
        let want = ["000000010000000000000001", "000000010000000000000002", "000000020000000000000003"];
        assert_eq!(p.wal, [&want[..], &["000000020000000000000004"]].concat());
        let p = plan(&s, &req(Target::End, TimelineTarget::Latest, Some("b1"))).unwrap();
        assert_eq!((p.target_timeline, p.wal.last()), (2, names(2, 6..=6).first()));
        let p = plan(&s, &req(Target::End, TimelineTarget::Current, Some("b1"))).unwrap();
        assert_eq!((p.target_timeline, p.wal), (1, names(1, 1..=5)));
        // Without a chosen backup, Latest takes the newest backup reaching timeline 2.
        let p = plan(&s, &latest(Target::End)).unwrap();
        assert_eq!((p.backup.as_str(), p.target_timeline), ("b1", 2));
        let w: Vec<(u32, i64)> = windows(&s).iter().map(|w| (w.timeline, w.latest_us)).collect();
        assert_eq!(w, [(1, 5_000), (2, 6_000)]);
    }

    #[test]
    fn a_backup_after_the_branch_cannot_reach_the_new_timeline() {
        let s = branched();
        let on = |t| plan(&s, &req(Target::End, t, Some("b9")));
        assert_eq!(on(TimelineTarget::Id(2)), Err(PlanError::BackupNotOnTimeline { backup: "b9".into(), timeline: 2 }));
        assert_eq!(on(TimelineTarget::Latest).unwrap().target_timeline, 1);
        assert_eq!(on(TimelineTarget::Id(3)), Err(PlanError::TimelineNotFound(3)));
        // A hole on timeline 1 before the switch: timeline 2 is out of reach.
        let mut s = branched();
        s.segments.retain(|g| (g.timeline, g.segno) != (1, 2));
        let err = PlanError::MissingWal { name: names(1, 2..=2).remove(0), backup: "b1".into() };
        assert_eq!(plan(&s, &req(Target::End, TimelineTarget::Id(2), None)), Err(err));
    }

    #[test]
    fn windows_cover_what_time_targets_reach() {
        let full = Window {
            timeline: 1,
            earliest_us: 1_500,
            latest_us: 9_000,
            earliest_lsn: lsn("0/1000100"),
            latest_lsn: lsn("0/9FFFFFF"),
            from_backup: "b1".into(),
        };
        assert_eq!(windows(&linear(1..=9)), vec![full.clone()]);
        // A hole in 3: b1 reaches segment 2 (archived at 2000 µs); b2 reaches the end.
        let cut = Window { latest_us: 2_000, latest_lsn: lsn("0/2FFFFFF"), ..full.clone() };
        let b2 = Window { earliest_us: 5_500, earliest_lsn: lsn("0/5000100"), from_backup: "b2".into(), ..full };
        assert_eq!(windows(&linear((1..=9).filter(|s| *s != 3))), vec![cut, b2]);
    }

    #[test]
    fn times_are_formatted_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00+00");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59.999999+00");
        assert_eq!(format_time(951_782_400_000_000), "2000-02-29 00:00:00+00");
        assert_eq!(format_time(1_709_210_096_789_000), "2024-02-29 12:34:56.789000+00");
        let _ = (format_time(i64::MIN), format_time(i64::MAX));
    }

    /// `(state, timeline count)`: timeline 1 from segment 0, timeline 2
    /// branched from 1, timeline 3 from 1 or 2; 20 segments each with ~10%
    /// holes, archive times increasing along every path, backups on each
    /// timeline whose stop time runs with their LSN (one segment a second).
    fn arb_state() -> impl Strategy<Value = (ArchiveState, u32)> {
        let backups = vec((0..3usize, 0..12u64, 0..SEG, 1..3 * SEG), 0..6);
        (1..=3u32, 2..12u64, 0..SEG, any::<bool>(), 1..8u64, 0..SEG, backups, vec(0..10u8, 60)).prop_map(
            |(n, k2, off2, from1, d3, off3, backups, keep)| {
                let sw2 = Lsn(k2 * SEG + off2);
                let sw3 = Lsn(if from1 { d3 * SEG + off3 } else { sw2.0 + d3 * SEG + off3 });
                let h3 = if from1 { vec![entry(1, sw3)] } else { vec![entry(1, sw2), entry(2, sw3)] };
                let histories = [(2, vec![entry(1, sw2)]), (3, h3)].into_iter().take(n as usize - 1).collect();
                let begin = &[(1, Lsn(0)), (2, sw2), (3, sw3)][..n as usize];
                let mut segments = Vec::new();
                for (i, &(timeline, start)) in begin.iter().enumerate() {
                    let first = SIZE.segment_of(start).0;
                    for segno in (first..first + 20).filter(|s| keep[i * 20 + (s - first) as usize] != 0) {
                        let archived_at_us = (segno as i64 + 1) * 1_000_000 + i64::from(timeline) * 1000;
                        segments.push(ArchivedSegment { timeline, segno, archived_at_us });
                    }
                }
                let backups = backups.into_iter().enumerate().map(|(i, (t, seg, off, len))| {
                    let (timeline, start) = begin[t % begin.len()];
                    let start_lsn = Lsn(start.0.max((SIZE.segment_of(start).0 + seg) * SEG + off));
                    let stop_lsn = Lsn(start_lsn.0 + len);
                    let stop_time_us = (u128::from(stop_lsn.0) * 1_000_000 / u128::from(SEG)) as i64;
                    let next_xid = stop_lsn.0 / 1000;
                    BackupPoint { id: format!("b{i}"), timeline, start_lsn, stop_lsn, stop_time_us, next_xid }
                });
                (ArchiveState { segment_size: SIZE, backups: backups.collect(), segments, histories }, n)
            },
        )
    }

    /// The naive model of a route: `(timeline, first segment)` from `b`'s
    /// timeline to `t`, or None when `b` cannot reach `t`.
    fn oracle_route(s: &ArchiveState, b: &BackupPoint, t: u32) -> Option<Vec<(u32, u64)>> {
        let history = |h: &Vec<HistoryEntry>| h.iter().map(|e| (e.parent.get(), e.switch_point)).collect();
        let mut lineage: Vec<(u32, Lsn)> = if t == 1 { vec![] } else { history(s.histories.get(&t)?) };
        lineage.push((t, Lsn(u64::MAX)));
        let k = lineage.iter().position(|e| e.0 == b.timeline)?;
        let begins = iter::once(0).chain(lineage[k..].iter().map(|e| SIZE.segment_of(e.1).0));
        (b.stop_lsn <= lineage[k].1).then(|| lineage[k..].iter().zip(begins).map(|(e, first)| (e.0, first)).collect())
    }

    fn oracle_tli(route: &[(u32, u64)], s: u64) -> u32 {
        route.iter().rev().find(|e| e.1 <= s).unwrap().0
    }

    /// The last segment of the unbroken chain from `b`'s start.
    fn oracle_end(have: &HashSet<(u32, u64)>, route: &[(u32, u64)], b: &BackupPoint) -> Option<u64> {
        let s0 = SIZE.segment_of(b.start_lsn).0;
        (s0..).find(|&s| !have.contains(&(oracle_tli(route, s), s))).filter(|&s| s > s0).map(|s| s - 1)
    }

    /// Checks that every file of `p` is archived and that they follow each
    /// other; returns their `(timeline, segno)`.
    fn check_wal(have: &HashSet<(u32, u64)>, p: &Plan) -> Result<Vec<(u32, u64)>, TestCaseError> {
        let parse = |n: &String| n.parse::<WalFileName>().unwrap().segment().unwrap();
        let segs: Vec<(u32, u64)> =
            p.wal.iter().map(parse).map(|g| (g.timeline.get(), g.segno(SIZE).unwrap().0)).collect();
        for (name, g) in p.wal.iter().zip(&segs) {
            prop_assert!(have.contains(g), "{} is not archived", name);
        }
        prop_assert!(segs.windows(2).all(|w| w[0].1 + 1 == w[1].1));
        prop_assert_eq!(p.wal.last(), Some(&p.end_segment));
        Ok(segs)
    }

    fn have(s: &ArchiveState) -> HashSet<(u32, u64)> {
        s.segments.iter().map(|g| (g.timeline, g.segno)).collect()
    }

    proptest! {
        #[test]
        fn lsn_targets_inside_a_chain_plan((s, n) in arb_state(), frac in 0..=1000u64) {
            let have = have(&s);
            for (b, t) in s.backups.iter().flat_map(|b| (1..=n).map(move |t| (b, t))) {
                let Some(route) = oracle_route(&s, b, t) else { continue };
                let stop = SIZE.segment_of(b.stop_lsn).0;
                let Some(end) = oracle_end(&have, &route, b).filter(|&e| e >= stop) else {
                    let p = plan(&s, &req(Target::Immediate, TimelineTarget::Id(t), Some(&b.id)));
                    prop_assert!(matches!(p, Err(PlanError::MissingWal { .. })), "{:?}", p);
                    continue;
                };
                let l = Lsn(b.stop_lsn.0 + ((end + 1) * SEG - 1 - b.stop_lsn.0) * frac / 1000);
                let p = plan(&s, &req(Target::Lsn(l), TimelineTarget::Id(t), Some(&b.id))).unwrap();
                prop_assert_eq!((&p.backup, p.target_timeline), (&b.id, t));
                let segs = check_wal(&have, &p)?;
                prop_assert_eq!(segs[0].1, SIZE.segment_of(b.start_lsn).0);
                prop_assert_eq!(segs[segs.len() - 1].1, SIZE.segment_of(l).0);
                prop_assert!(segs.iter().all(|&(tli, segno)| tli == oracle_tli(&route, segno)));
            }
        }

        #[test]
        fn lsn_targets_outside_every_chain_are_refused((s, n) in arb_state(), extra in 0..4 * SEG) {
            let have = have(&s);
            for t in 1..=n {
                let ends = s.backups.iter().filter_map(|b| Some(oracle_end(&have, &oracle_route(&s, b, t)?, b)));
                let past = ends.map(|e| e.map_or(0, |e| e + 1)).max().unwrap_or(0) * SEG + extra;
                prop_assert!(plan(&s, &req(Target::Lsn(Lsn(past)), TimelineTarget::Id(t), None)).is_err());
                if let Some(first) = s.backups.iter().map(|b| b.stop_lsn.0).min().filter(|&l| l > extra) {
                    let p = plan(&s, &req(Target::Lsn(Lsn(first - 1 - extra)), TimelineTarget::Id(t), None));
                    let before = matches!(p, Err(PlanError::TargetBeforeBackups { .. } | PlanError::BackupNotOnTimeline { .. }));
                    prop_assert!(before, "{:?}", p);
                }
            }
        }

        #[test]
        fn time_targets_plan_exactly_inside_windows((s, n) in arb_state(), frac in 0..=1000i64, t in 0..30_000_000i64) {
            let (have, ws) = (have(&s), windows(&s));
            let time = |us, tli| plan(&s, &req(Target::Time { us }, TimelineTarget::Id(tli), None));
            let inside = |us, tli| ws.iter().any(|w| w.timeline == tli && w.earliest_us <= us && us <= w.latest_us);
            for w in &ws {
                prop_assert!(w.earliest_us <= w.latest_us && w.earliest_lsn <= w.latest_lsn);
                let p = time(w.earliest_us + (w.latest_us - w.earliest_us) * frac / 1000, w.timeline);
                prop_assert!(p.is_ok(), "{:?} in {:?}", p, w);
                check_wal(&have, &p.unwrap())?;
                prop_assert_eq!(time(w.latest_us + 1, w.timeline).is_ok(), inside(w.latest_us + 1, w.timeline));
            }
            for tli in (1..=n).filter(|tli| s.segments.iter().any(|g| g.timeline == *tli)) {
                prop_assert_eq!(time(t, tli).is_ok(), inside(t, tli));
            }
        }

        #[test]
        fn planning_never_panics(
            backups in vec((0..4u32, 0..64 * SEG, 0..64 * SEG, any::<i64>(), any::<u64>()), 0..5),
            segments in vec((0..4u32, 0..64u64, any::<i64>()), 0..80),
            histories in vec((0..5u32, vec((1..5u32, 0..64 * SEG), 0..4)), 0..4),
            (kind, v, us, tl, chosen, force) in (0..6usize, any::<u64>(), any::<i64>(), 0..6u32, any::<bool>(), any::<bool>()),
        ) {
            let backups = backups.into_iter().enumerate().map(|(i, (timeline, a, z, stop_time_us, next_xid))| {
                BackupPoint { id: format!("b{i}"), timeline, start_lsn: Lsn(a), stop_lsn: Lsn(z), stop_time_us, next_xid }
            });
            let segments = segments.into_iter().map(|(timeline, segno, archived_at_us)| ArchivedSegment { timeline, segno, archived_at_us });
            let histories = histories.into_iter().map(|(t, h)| (t, h.into_iter().map(|(p, l)| entry(p, Lsn(l))).collect()));
            let s = ArchiveState { segment_size: SIZE, backups: backups.collect(), segments: segments.collect(), histories: histories.collect() };
            let targets = [Target::End, Target::Immediate, Target::Time { us }, Target::Lsn(Lsn(v)), Target::Xid(v), Target::Name("x".into())];
            let timeline = match tl { 0 => TimelineTarget::Latest, 1 => TimelineTarget::Current, t => TimelineTarget::Id(t - 2) };
            let r = Request { force, ..req(targets[kind].clone(), timeline, chosen.then_some("b0")) };
            let _ = (plan(&s, &r), windows(&s));
        }
    }
}
