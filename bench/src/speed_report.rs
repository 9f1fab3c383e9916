//! walvault-bench-speed's figures, and the report: Markdown tables with
//! ratios, the targets of the issue, and a CSV of every sample.

use std::fmt::Write as _;

use crate::Args;
use crate::pg::SEGMENT_BYTES;
use crate::speed_archive::Archiver;
use crate::speed_cpu::Cost;
use crate::speed_recovery::Fetcher;

const MIB: f64 = 1024.0 * 1024.0;

/// One archive_command in the full-backlog loop.
#[derive(Debug, Clone)]
pub struct LoopRow {
    /// As shown.
    pub label: String,
    /// Which archiver.
    pub kind: Archiver,
    /// Per round: wall time of the whole loop ÷ segments, in ms.
    pub per_segment_ms: Vec<f64>,
    /// Segments fetched back (or, for `cp`, compared) byte for byte, over
    /// all rounds.
    pub checked: usize,
}

/// One archive_command under the pgbench load.
#[derive(Debug, Clone)]
pub struct ThroughputRow {
    /// As shown.
    pub label: String,
    /// Which archiver.
    pub kind: Archiver,
    /// Seconds pgbench ran.
    pub load_secs: f64,
    /// WAL written during the load (bytes, from `pg_current_wal_lsn()`).
    pub wal_bytes: u64,
    /// Segments archived during the load (`pg_stat_archiver`).
    pub archived_during: u64,
    /// Segments archived by the time the backlog was worked off.
    pub archived_total: u64,
    /// Seconds from the end of the load until no `.ready` file was left.
    pub drain_secs: f64,
    /// Largest count of `.ready` files sampled during the load.
    pub max_ready: usize,
    /// Mean count of `.ready` files sampled during the load.
    pub mean_ready: f64,
    /// Failed archive_command calls.
    pub failed: u64,
    /// Bytes the archive holds afterwards.
    pub stored: u64,
}

/// One restore_command replaying the same WAL.
#[derive(Debug, Clone)]
pub struct RecoveryRow {
    /// As shown.
    pub label: String,
    /// Which fetcher.
    pub kind: Fetcher,
    /// Seconds from server start to "ready to accept connections", per round.
    pub secs: Vec<f64>,
    /// Seconds to "archive recovery complete", per round.
    pub complete_secs: Vec<f64>,
    /// "restored log file" lines in the server log (last round).
    pub restored: usize,
}

impl Default for RecoveryRow {
    fn default() -> RecoveryRow {
        RecoveryRow {
            label: String::new(),
            kind: Fetcher::Cp,
            secs: Vec::new(),
            complete_secs: Vec::new(),
            restored: 0,
        }
    }
}

/// Cost of push and fetch at one compression level.
#[derive(Debug, Clone, Default)]
pub struct CpuRow {
    /// As shown.
    pub label: String,
    /// zstd level; 0 for the `cp` reference.
    pub level: i32,
    /// One per segment pushed (for `cp`: copied).
    pub push: Vec<Cost>,
    /// One per segment fetched.
    pub fetch: Vec<Cost>,
    /// Bytes stored.
    pub stored: u64,
    /// Bytes of the segments.
    pub plain: u64,
}

/// Everything one run measured.
#[derive(Debug)]
pub struct Report {
    /// The options.
    pub args: Args,
    /// Full-backlog loop.
    pub loops: Vec<LoopRow>,
    /// Throughput under load.
    pub throughput: Vec<ThroughputRow>,
    /// Replays.
    pub recovery: Vec<RecoveryRow>,
    /// Segments in the plain archive of the recovery part.
    pub recovery_segments: u64,
    /// CPU per level.
    pub cpu: Vec<CpuRow>,
    /// Failed checks and tools.
    pub problems: Vec<String>,
    /// CSV lines: part, label, x, y.
    pub samples: Vec<String>,
}

impl Report {
    /// An empty report for a run with `args`.
    pub fn new(args: Args) -> Report {
        Report {
            args,
            loops: Vec::new(),
            throughput: Vec::new(),
            recovery: Vec::new(),
            recovery_segments: 0,
            cpu: Vec::new(),
            problems: Vec::new(),
            samples: Vec::new(),
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn met(x: Option<bool>) -> &'static str {
    match x {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// The whole report, in Markdown.
pub fn markdown(r: &Report, machine: &[(String, String)], command: &str) -> String {
    let mut out = String::new();
    let a = &r.args;
    let _ = writeln!(out, "### Machine\n\n| | |\n|---|---|");
    for (k, v) in machine {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    let _ = writeln!(out, "\nCommand: `{command}`{}\n", if a.quick { " (a quick validation run)" } else { "" });

    if !r.throughput.is_empty() {
        let _ = writeln!(
            out,
            "### Archive throughput: `pgbench -n -c 2 -j 2 -T {}` of 2,000-row INSERTs\n\n\
             `.ready` files in `pg_wal/archive_status` counted every 100 ms during the load. MiB/s of WAL \
             written (`pg_current_wal_lsn()`) and of segments archived during the load (`pg_stat_archiver`).\n",
            a.load_secs
        );
        let _ = writeln!(
            out,
            "| archive_command | WAL written MiB/s | archived during load MiB/s | archived ÷ written | max backlog \
             (segments) | mean backlog | backlog worked off after s | stored ÷ WAL | failures |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for t in &r.throughput {
            let written = t.wal_bytes as f64 / MIB / t.load_secs;
            let archived = (t.archived_during * SEGMENT_BYTES) as f64 / MIB / t.load_secs;
            let stored = if t.kind == Archiver::Nothing || t.archived_total == 0 {
                "–".into()
            } else {
                format!("{:.3}", t.stored as f64 / (t.archived_total * SEGMENT_BYTES) as f64)
            };
            let _ = writeln!(
                out,
                "| {} | {written:.1} | {} | {} | {} | {:.1} | {:.1} | {stored} | {} |",
                t.label,
                if t.kind == Archiver::Nothing { "–".into() } else { format!("{archived:.1}") },
                if t.kind == Archiver::Nothing { "–".into() } else { ratio(archived, written) },
                t.max_ready,
                t.mean_ready,
                t.drain_secs,
                t.failed
            );
        }
    }

    if !r.loops.is_empty() {
        let find = |k: Archiver| r.loops.iter().find(|l| l.kind == k).map_or(f64::NAN, |l| median(&l.per_segment_ms));
        let (cp, cp_sync) = (find(Archiver::Cp), find(Archiver::CpSync));
        let _ = writeln!(
            out,
            "\n### Full-backlog loop: {} segments, every one `.ready`, one call per segment, {} round(s)\n\n\
             Wall time of the whole loop (first spawn to last exit) ÷ segments; median over the rounds. Afterwards \
             every segment is fetched back (or, for `cp`, compared) byte for byte.\n",
            a.loop_segments, a.loop_rounds
        );
        let _ = writeln!(
            out,
            "| archive_command | ms per segment | rounds (min–max) | ÷ `cp` | ÷ `cp + sync` | segments checked |\n\
             |---|---:|---:|---:|---:|---:|"
        );
        for l in &r.loops {
            let m = median(&l.per_segment_ms);
            let lo = l.per_segment_ms.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = l.per_segment_ms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let _ = writeln!(
                out,
                "| {} | {m:.1} | {lo:.1}–{hi:.1} | {} | {} | {}/{} |",
                l.label,
                ratio(m, cp),
                ratio(m, cp_sync),
                l.checked,
                a.loop_segments * a.loop_rounds
            );
        }
    }

    if !r.recovery.is_empty() {
        let find = |k: Fetcher| r.recovery.iter().find(|l| l.kind == k).map_or(f64::NAN, |l| median(&l.secs));
        let (cp, pgbr) = (find(Fetcher::Cp), find(Fetcher::PgbrAsync));
        let _ = writeln!(
            out,
            "\n### Recovery: {} archived segments ({:.2} GiB) replayed from one base backup, {} round(s)\n\n\
             Wall time from `pg_ctl start` to \"database system is ready to accept connections\" after the end \
             of recovery (the primary is stopped; every replay starts from a copy of the same restored data \
             directory); median over the rounds. Each recovered cluster must hold the primary's final balance \
             sum and history row count.\n",
            r.recovery_segments,
            (r.recovery_segments * SEGMENT_BYTES) as f64 / (1024.0 * MIB),
            a.recovery_rounds
        );
        let _ = writeln!(
            out,
            "| restore_command | wall s | ÷ `cp` | ÷ pgBackRest async | to \"archive recovery complete\" s | files \
             restored |\n|---|---:|---:|---:|---:|---:|"
        );
        for l in &r.recovery {
            let m = median(&l.secs);
            let _ = writeln!(
                out,
                "| {} | {m:.1} | {} | {} | {:.1} | {} |",
                l.label,
                ratio(m, cp),
                ratio(m, pgbr),
                median(&l.complete_secs),
                l.restored
            );
        }
    }

    if !r.cpu.is_empty() {
        let n = r.cpu.first().map_or(0, |c| c.push.len());
        let size3 = r.cpu.iter().find(|c| c.level == 3).map_or(f64::NAN, |c| c.stored as f64);
        let _ = writeln!(
            out,
            "\n### Cost per segment by compression level ({n} segments each; medians)\n\n\
             CPU is user + system time of the process and its threads, from `wait4`.\n"
        );
        let _ = writeln!(
            out,
            "| operation | push wall ms | push CPU ms | fetch wall ms | fetch CPU ms | stored ÷ WAL | stored ÷ level 3 |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        );
        for c in &r.cpu {
            let m = |v: &[Cost], f: fn(&Cost) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            let fetch = |f: fn(&Cost) -> f64| {
                if c.fetch.is_empty() { "–".to_string() } else { format!("{:.1}", m(&c.fetch, f)) }
            };
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} | {} | {} | {:.4} | {} |",
                c.label,
                m(&c.push, |x| ms(x.wall)),
                m(&c.push, |x| ms(x.cpu)),
                fetch(|x| ms(x.wall)),
                fetch(|x| ms(x.cpu)),
                c.stored as f64 / c.plain as f64,
                if c.level == 0 { "–".into() } else { format!("{:.3}", c.stored as f64 / size3) }
            );
        }
    }

    let _ = writeln!(out, "\n### Targets\n\n| target | measured | limit | met |\n|---|---:|---:|---|");
    let tp = |k: Archiver| r.throughput.iter().find(|t| t.kind == k);
    if let Some(t) = tp(Archiver::WalvaultAsync) {
        let rate = tp(Archiver::Nothing).map_or(f64::NAN, |n| n.wal_bytes as f64 / MIB / n.load_secs);
        let _ = writeln!(
            out,
            "| async push: max `pg_wal` backlog at the highest WAL rate ({:.1} MiB/s written with it, {rate:.1} \
             MiB/s without archiving) | {} segments | ≤ 2 | {} |",
            t.wal_bytes as f64 / MIB / t.load_secs,
            t.max_ready,
            met(Some(t.max_ready <= 2 && t.failed == 0))
        );
    } else {
        let _ = writeln!(out, "| async push: max `pg_wal` backlog | – | ≤ 2 | not measured |");
    }
    let lp = |k: Archiver| r.loops.iter().find(|l| l.kind == k).map_or(f64::NAN, |l| median(&l.per_segment_ms));
    let x = lp(Archiver::WalvaultAsync) / lp(Archiver::Cp);
    let _ = writeln!(
        out,
        "| full-backlog loop: async push ÷ plain `cp`, per segment | {} | ≤ 1.2× | {} |",
        if x.is_finite() { format!("{x:.2}×") } else { "–".into() },
        met(x.is_finite().then_some(x <= 1.2))
    );
    let y = lp(Archiver::PgbrAsync) / lp(Archiver::Cp);
    let _ = writeln!(
        out,
        "| reference: pgBackRest async ÷ plain `cp` in the same loop (the issue quotes 2.7× with zst) | {} | – | – |",
        if y.is_finite() { format!("{y:.2}×") } else { "–".into() }
    );
    let rc = |k: Fetcher| r.recovery.iter().find(|l| l.kind == k).map_or(f64::NAN, |l| median(&l.secs));
    let p = rc(Fetcher::WalvaultPrefetch);
    for (what, base, limit, lim) in [
        ("recovery with prefetch ÷ `restore_command = cp`, wall time", rc(Fetcher::Cp), "≤ 0.95×", 0.95),
        ("recovery with prefetch ÷ pgBackRest async archive-get, wall time", rc(Fetcher::PgbrAsync), "≤ 1×", 1.0),
    ] {
        let x = p / base;
        let _ = writeln!(
            out,
            "| {what} | {} | {limit} | {} |",
            if x.is_finite() { format!("{x:.2}×") } else { "–".into() },
            met(x.is_finite().then_some(x <= lim))
        );
    }

    if !r.problems.is_empty() {
        let _ = writeln!(out, "\n### Problems\n");
        for p in &r.problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    out
}

/// Every sample: `part,label,x,y` (loop: round, ms per segment; backlog:
/// seconds, `.ready` files; recovery: round, seconds; cpu-push/cpu-fetch:
/// wall ms, CPU ms).
pub fn csv(r: &Report) -> String {
    let mut out = String::from("part,label,x,y\n");
    for s in &r.samples {
        out.push_str(s);
    }
    out
}
