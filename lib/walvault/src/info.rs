//! `walvault info`: what the archive holds, from the catalog.

use serde::Serialize;
use walvault_formats::time::Timestamp;
use walvault_formats::wal::{SegmentName, SegmentNo, TimelineId, WalSegmentSize};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::plan::{self, ArchiveState, ArchivedSegment, BackupPoint};

/// The whole report; serialized as-is for `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Info {
    /// The cluster.
    pub cluster: ClusterReport,
    /// Repository location.
    pub repository: String,
    /// Catalog file.
    pub catalog: String,
    /// Per timeline, what is archived.
    pub timelines: Vec<TimelineReport>,
    /// Timeline history files.
    pub history_files: Vec<String>,
    /// `.partial` files.
    pub partial_files: Vec<String>,
    /// Backup history files.
    pub backup_history_files: Vec<String>,
    /// The most recently archived file.
    pub newest: Option<Newest>,
    /// Base backups, oldest first.
    pub backups: Vec<BackupSummary>,
    /// Per timeline, the span of moments a restore can reach.
    pub recoverable: Vec<RecoverableWindow>,
    /// WAL files archive-push dropped without archiving them (`queue-max`):
    /// the recoverable window is broken at each, PITR across it is
    /// impossible.
    pub dropped_wal: Vec<DroppedWalReport>,
    /// The most recent restore drill.
    pub last_drill: Option<DrillSummary>,
    /// The configured `[retention]` policy, in words (`None`: no policy,
    /// expire deletes nothing).
    pub retention: Option<String>,
    /// What the next `walvault expire` would delete under that policy.
    pub next_expire: Option<crate::expire::ExpirePreview>,
}

/// The outcome of the most recent `walvault drill`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillSummary {
    /// Drill identifier.
    pub id: String,
    /// When it finished (`2026-11-21 14:30:00+00`).
    pub finished_at: String,
    /// The backup it restored.
    pub backup: String,
    /// The recovery target, in words.
    pub target: String,
    /// Whether every check passed.
    pub ok: bool,
    /// Measured recovery time, seconds.
    pub rto_seconds: f64,
    /// What was checked, or what failed.
    pub detail: String,
}

/// One base backup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupSummary {
    /// Identifier (for `restore --backup`).
    pub id: String,
    /// Timeline it was taken on.
    pub timeline: u32,
    /// When it started (`2026-11-21 14:30:00.123+00`).
    pub start_time: String,
    /// When it became consistent: the earliest moment it restores to.
    pub stop_time: String,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// Regular files.
    pub files: u64,
    /// Bytes of the data directory (what a restore writes).
    pub size: u64,
    /// Stored bytes of every object it refers to (shared ones included).
    pub stored_size: u64,
    /// Stored bytes this backup added to the repository.
    pub new_bytes: u64,
    /// Marked with `walvault keep-forever`.
    pub keep_forever: bool,
}

/// A WAL file that was never archived because archive-push dropped it
/// (`queue-max`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DroppedWalReport {
    /// The file name.
    pub name: String,
    /// Its timeline.
    pub timeline: u32,
    /// When it was dropped (`2026-11-21 14:30:00+00`).
    pub dropped_at: String,
    /// Why.
    pub reason: String,
    /// The first backup taken after the drop: PITR from it on is intact.
    /// `None`: no backup since, a new full backup is needed.
    pub intact_from_backup: Option<String>,
}

/// The dropped WAL of the catalog, each with the first backup started
/// after it was dropped (a backup that starts later starts past it).
pub fn dropped_wal(catalog: &Catalog) -> Result<Vec<DroppedWalReport>> {
    let mut backups = catalog.backups()?;
    backups.sort_by_key(|b| b.start_time_ms);
    Ok(catalog
        .dropped()?
        .into_iter()
        .map(|d| DroppedWalReport {
            intact_from_backup: backups.iter().find(|b| b.start_time_ms > d.dropped_at_ms).map(|b| b.id.clone()),
            dropped_at: format_utc(d.dropped_at_ms),
            name: d.name,
            timeline: d.timeline,
            reason: d.reason,
        })
        .collect())
}

/// Consecutive names of `dropped` as `first .. last (n)` runs, for
/// messages: a long outage drops hundreds.
pub fn dropped_runs(dropped: &[DroppedWalReport]) -> Vec<String> {
    name_runs(&dropped.iter().map(|d| d.name.clone()).collect::<Vec<_>>())
}

/// Consecutive WAL file names (in order) as `'first' .. 'last' (n files)`
/// runs, single ones as `'name'`.
pub fn name_runs(names: &[String]) -> Vec<String> {
    let mut runs: Vec<(String, String, u64, u64)> = Vec::new();
    for name in names {
        let n = u64::from_str_radix(name.get(8..24).unwrap_or(""), 16).ok();
        match (runs.last_mut(), n) {
            (Some(run), Some(n)) if run.1.get(..8) == name.get(..8) && run.3.checked_add(1) == Some(n) => {
                run.1 = name.clone();
                run.2 += 1;
                run.3 = n;
            }
            _ => runs.push((name.clone(), name.clone(), 1, n.unwrap_or(u64::MAX - 1))),
        }
    }
    runs.into_iter()
        .map(
            |(first, last, count, _)| {
                if count == 1 { format!("'{first}'") } else { format!("'{first}' .. '{last}' ({count} files)") }
            },
        )
        .collect()
}

/// The moments a restore can reach on one timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoverableWindow {
    /// The timeline.
    pub timeline: u32,
    /// Earliest reachable moment (the oldest usable backup's consistency time).
    pub earliest: String,
    /// Latest reachable moment (archive time of the last segment of an
    /// unbroken chain of WAL).
    pub latest: String,
    /// Earliest reachable LSN.
    pub earliest_lsn: String,
    /// End of the unbroken WAL.
    pub latest_lsn: String,
    /// The backup the window starts from.
    pub from_backup: String,
}

/// The planner's view of the archive, from the catalog: backups, every
/// segment with its archive time, and the timeline histories.
pub fn archive_state(catalog: &Catalog, segment_size: WalSegmentSize) -> Result<ArchiveState> {
    let backups = catalog
        .backups()?
        .into_iter()
        .map(|b| BackupPoint {
            id: b.id,
            timeline: b.timeline,
            start_lsn: b.start_lsn,
            stop_lsn: b.stop_lsn,
            stop_time_us: b.stop_time_ms.saturating_mul(1000),
            next_xid: b.next_xid,
        })
        .collect();
    let segments = catalog
        .segments()?
        .into_iter()
        .map(|(timeline, segno, at_ms)| ArchivedSegment { timeline, segno, archived_at_us: at_ms.saturating_mul(1000) })
        .collect();
    Ok(ArchiveState { segment_size, backups, segments, histories: catalog.histories()? })
}

/// Identity of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterReport {
    /// Cluster name.
    pub name: String,
    /// System identifier, as a string (exceeds JSON's safe integers).
    pub system_identifier: String,
    /// Major version.
    pub pg_version: u32,
    /// Segment size in bytes.
    pub wal_segment_size: u64,
}

/// One timeline's archived WAL.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineReport {
    /// The timeline.
    pub timeline: u32,
    /// First archived segment.
    pub first: String,
    /// Last archived segment.
    pub last: String,
    /// Number of archived segments.
    pub segments: u64,
    /// WAL bytes archived.
    pub wal_bytes: u64,
    /// Bytes stored for them.
    pub stored_bytes: u64,
    /// Missing ranges between `first` and `last`.
    pub gaps: Vec<Gap>,
}

/// A range of missing segments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gap {
    /// First missing segment.
    pub first: String,
    /// Last missing segment.
    pub last: String,
    /// How many are missing.
    pub missing: u64,
}

/// The newest archived file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Newest {
    /// File name.
    pub name: String,
    /// When, as `YYYY-MM-DD HH:MM:SS+00`.
    pub archived_at: String,
    /// Seconds since then.
    pub age_seconds: i64,
}

/// Formats ms since the epoch to the second, as PostgreSQL shows a
/// `timestamptz` in UTC: `2026-11-21 12:30:00+00`.
pub fn format_utc(ms: i64) -> String {
    Timestamp::from_ms(ms.div_euclid(1000) * 1000).to_string()
}

/// Builds the report from the catalog. `now_ms` is passed in so that the
/// report is a pure function of the catalog and the clock reading.
pub fn info(config: &Config, now_ms: i64) -> Result<Info> {
    let catalog = Catalog::open_existing(&config.catalog)?;
    let cluster = catalog
        .cluster()?
        .ok_or_else(|| Error::Catalog { path: config.catalog.clone(), detail: "indexes no cluster yet".into() })?;
    let size = cluster.identity.segment_size;
    let seg_name = |tli: u32, segno: u64| {
        TimelineId::new(tli)
            .map_or_else(String::new, |t| SegmentName::from_segno(t, SegmentNo(segno), size).to_string())
    };
    let mut timelines: Vec<TimelineReport> = Vec::new();
    for run in catalog.segment_runs()? {
        let count = run.last - run.first + 1;
        match timelines.last_mut() {
            Some(t) if t.timeline == run.timeline => {
                let prev_last = t.last.clone();
                let gap_first = prev_last_segno(&prev_last, size) + 1;
                t.gaps.push(Gap {
                    first: seg_name(run.timeline, gap_first),
                    last: seg_name(run.timeline, run.first - 1),
                    missing: run.first - gap_first,
                });
                t.last = seg_name(run.timeline, run.last);
                t.segments += count;
                t.wal_bytes += run.plain_bytes;
                t.stored_bytes += run.stored_bytes;
            }
            _ => timelines.push(TimelineReport {
                timeline: run.timeline,
                first: seg_name(run.timeline, run.first),
                last: seg_name(run.timeline, run.last),
                segments: count,
                wal_bytes: run.plain_bytes,
                stored_bytes: run.stored_bytes,
                gaps: Vec::new(),
            }),
        }
    }
    let newest = catalog.newest()?.map(|(name, at)| Newest {
        name,
        archived_at: format_utc(at),
        age_seconds: (now_ms - at).max(0) / 1000,
    });
    let backups = catalog
        .backups()?
        .into_iter()
        .map(|b| BackupSummary {
            start_time: Timestamp::from_ms(b.start_time_ms).to_string(),
            stop_time: Timestamp::from_ms(b.stop_time_ms).to_string(),
            start_lsn: b.start_lsn.to_string(),
            stop_lsn: b.stop_lsn.to_string(),
            id: b.id,
            timeline: b.timeline,
            files: b.totals.files,
            size: b.totals.bytes,
            stored_size: b.totals.stored_bytes,
            new_bytes: b.totals.new_bytes,
            keep_forever: b.keep_forever,
        })
        .collect();
    let recoverable = plan::windows(&archive_state(&catalog, size)?)
        .into_iter()
        .map(|w| RecoverableWindow {
            timeline: w.timeline,
            earliest: Timestamp(w.earliest_us).to_string(),
            latest: Timestamp(w.latest_us).to_string(),
            earliest_lsn: w.earliest_lsn.to_string(),
            latest_lsn: w.latest_lsn.to_string(),
            from_backup: w.from_backup,
        })
        .collect();
    let dropped_wal = dropped_wal(&catalog)?;
    let last_drill = catalog.drills()?.pop().map(|d| DrillSummary {
        finished_at: format_utc(d.finished_at_ms),
        rto_seconds: d.rto_ms as f64 / 1000.0,
        id: d.id,
        backup: d.backup,
        target: d.target,
        ok: d.ok,
        detail: d.detail,
    });
    let next_expire = crate::expire::preview(config, now_ms)?;
    let retention = (!config.retention.is_empty()).then(|| crate::retention::describe_policy(&config.retention));
    Ok(Info {
        backups,
        recoverable,
        dropped_wal,
        last_drill,
        retention,
        next_expire,
        cluster: ClusterReport {
            name: cluster.name,
            system_identifier: cluster.identity.system_id.to_string(),
            pg_version: cluster.identity.pg_version.major(),
            wal_segment_size: size.bytes(),
        },
        repository: cluster.repository,
        catalog: config.catalog.display().to_string(),
        timelines,
        history_files: catalog.names_of_kind("history")?,
        partial_files: catalog.names_of_kind("partial")?,
        backup_history_files: catalog.names_of_kind("backup")?,
        newest,
    })
}

fn prev_last_segno(name: &str, size: walvault_formats::wal::WalSegmentSize) -> u64 {
    name.parse::<walvault_formats::wal::WalFileName>()
        .ok()
        .and_then(|n| n.segment())
        .and_then(|s| s.segno(size))
        .map_or(0, |s| s.0)
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.cluster;
        writeln!(
            f,
            "cluster '{}': system identifier {}, PostgreSQL {}, {} MiB segments",
            c.name,
            c.system_identifier,
            c.pg_version,
            c.wal_segment_size >> 20
        )?;
        writeln!(f, "repository: {}", self.repository)?;
        if self.timelines.is_empty() {
            writeln!(f, "no WAL segments archived yet")?;
        }
        for t in &self.timelines {
            writeln!(
                f,
                "timeline {}: {} .. {}  {} segment{}, {} WAL, {} stored",
                t.timeline,
                t.first,
                t.last,
                t.segments,
                if t.segments == 1 { "" } else { "s" },
                human_bytes(t.wal_bytes),
                human_bytes(t.stored_bytes)
            )?;
            for g in &t.gaps {
                writeln!(f, "  gap: {} .. {}  ({} missing)", g.first, g.last, g.missing)?;
            }
        }
        if !self.history_files.is_empty() {
            writeln!(f, "history files: {}", self.history_files.join(", "))?;
        }
        if !self.partial_files.is_empty() {
            writeln!(f, "partial files: {}", self.partial_files.join(", "))?;
        }
        if !self.backup_history_files.is_empty() {
            writeln!(f, "backup history files: {}", self.backup_history_files.len())?;
        }
        match &self.newest {
            Some(n) => writeln!(f, "newest: {}, archived {} ({})", n.name, n.archived_at, human_age(n.age_seconds))?,
            None => writeln!(f, "newest: nothing archived")?,
        }
        if self.backups.is_empty() {
            writeln!(f, "no base backups yet: run 'walvault backup'")?;
        } else {
            writeln!(f, "backups:")?;
        }
        for b in &self.backups {
            writeln!(
                f,
                "  {}{}  timeline {}  {} .. {}  LSN {} .. {}  {} in {} files, {} stored, {} new",
                b.id,
                if b.keep_forever { " (kept forever)" } else { "" },
                b.timeline,
                b.start_time,
                b.stop_time,
                b.start_lsn,
                b.stop_lsn,
                human_bytes(b.size),
                b.files,
                human_bytes(b.stored_size),
                human_bytes(b.new_bytes)
            )?;
        }
        for w in &self.recoverable {
            writeln!(
                f,
                "recoverable on timeline {}: {} .. {}  (LSN {} .. {}, from backup {})",
                w.timeline, w.earliest, w.latest, w.earliest_lsn, w.latest_lsn, w.from_backup
            )?;
        }
        if !self.dropped_wal.is_empty() {
            writeln!(
                f,
                "DROPPED WAL: {} file(s) were never archived (queue-max): PITR across them is impossible",
                self.dropped_wal.len()
            )?;
            for run in dropped_runs(&self.dropped_wal) {
                writeln!(f, "  dropped: {run}")?;
            }
            // The latest drop decides: a backup started after it is past
            // every gap.
            if let Some(last) = self.dropped_wal.iter().max_by(|a, b| a.dropped_at.cmp(&b.dropped_at)) {
                writeln!(f, "  last dropped at {}: {}", last.dropped_at, last.reason)?;
                match &last.intact_from_backup {
                    Some(id) => writeln!(f, "  PITR from backup {id} on is intact")?,
                    None => writeln!(f, "  a new full backup is needed for PITR past the gap: run 'walvault backup'")?,
                }
            }
        }
        match &self.last_drill {
            Some(d) => writeln!(
                f,
                "last drill: {} {} at {}, backup {} to {}, recovery time {:.1} s: {}",
                d.id,
                if d.ok { "passed" } else { "FAILED" },
                d.finished_at,
                d.backup,
                d.target,
                d.rto_seconds,
                d.detail
            )?,
            None => writeln!(f, "last drill: never ('walvault drill' proves that a backup restores)")?,
        }
        match (&self.retention, &self.next_expire) {
            (None, _) => {
                writeln!(f, "retention: no policy ([retention] in the configuration): expire deletes nothing")?
            }
            (Some(policy), preview) => {
                writeln!(f, "retention: {policy}")?;
                if let Some(p) = preview {
                    if let Some(why) = &p.refused {
                        writeln!(f, "  next expire would refuse: {why}")?;
                    } else {
                        let ids: Vec<&str> = p.delete_backups.iter().map(|d| d.name.as_str()).collect();
                        writeln!(
                            f,
                            "  next expire would delete {} backup(s){}{} and {} WAL file(s) ({})",
                            ids.len(),
                            if ids.is_empty() { "" } else { ": " },
                            ids.join(", "),
                            p.wal_files,
                            human_bytes(p.wal_bytes)
                        )?;
                        if !p.gap_records.is_empty() {
                            writeln!(
                                f,
                                "  and {} dropped-WAL record(s), as every backup it keeps started after the drop: {}",
                                p.gap_records.len(),
                                name_runs(&p.gap_records).join(", ")
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00+00");
        assert_eq!(format_utc(1_795_264_200_999), "2026-11-21 12:30:00+00");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00+00");
    }
}
