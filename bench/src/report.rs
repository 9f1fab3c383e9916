//! The results as Markdown: machine, timings, sizes, scale, targets.

use std::fmt::Write as _;

use crate::compare::{Sizes, Timings};
use crate::scale::Scale;
use crate::stats::Series;

pub use crate::host::{loadavg, machine};

/// Everything measured in one run.
#[derive(Debug)]
pub struct Results {
    /// Segments archived and fetched per tool.
    pub segments: usize,
    /// Push and fetch timings.
    pub timings: Timings,
    /// Stored sizes.
    pub sizes: Sizes,
    /// The growing-archive comparison, unless skipped.
    pub scale: Option<Scale>,
}

fn find<'a>(series: &'a [Series], label: &str) -> Option<&'a Series> {
    series.iter().find(|s| s.label == label)
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn table(out: &mut String, rows: &[Series], cp: Option<&Series>, cp_sync: Option<&Series>) {
    let _ = writeln!(out, "| operation | median ms | p90 ms | median ÷ cp | median ÷ (cp + sync) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for s in rows {
        let vs_cp = cp.map_or_else(|| "–".into(), |c| ratio(s.median(), c.median()));
        let vs_sync = cp_sync.map_or_else(|| "–".into(), |c| ratio(s.median(), c.median()));
        let label = s.label.strip_prefix(crate::compare::REFERENCE).unwrap_or(&s.label);
        let _ = writeln!(out, "| `{label}` | {:.1} | {:.1} | {vs_cp} | {vs_sync} |", s.median(), s.p90());
    }
}

/// One target: what, the measured value, the limit, whether it is met.
struct Target {
    what: &'static str,
    measured: String,
    limit: &'static str,
    met: Option<bool>,
}

fn targets(r: &Results) -> Vec<Target> {
    let (push, fetch) = (&r.timings.push, &r.timings.fetch);
    let median = |v: &[Series], l: &str| find(v, l).map_or(f64::NAN, Series::median);
    let push_ratio = median(push, "walvault archive-push") / median(push, "cp");
    let fetch_ratio = median(fetch, "walvault archive-fetch") / median(fetch, "cp");
    let pgbr_ratio = median(push, "pgbackrest archive-push") / median(push, "cp");
    let size_ratio = r.sizes.walvault as f64 / r.sizes.zstd3 as f64;
    let known = |x: f64| x.is_finite().then_some(x);
    let mut t = vec![
        Target {
            what: "synchronous archive-push of a 16 MiB segment, median ÷ plain `cp` median",
            measured: format!("{push_ratio:.2}×"),
            limit: "≤ 2×",
            met: known(push_ratio).map(|x| x <= 2.0),
        },
        Target {
            what: "archive-fetch, median ÷ plain `cp` median",
            measured: format!("{fetch_ratio:.2}×"),
            limit: "≤ 1.2×",
            met: known(fetch_ratio).map(|x| x <= 1.2),
        },
        Target {
            what: "stored size, walvault ÷ `zstd -3`",
            measured: format!("{size_ratio:.3}"),
            limit: "≤ 1",
            met: known(size_ratio).map(|x| x <= 1.0),
        },
    ];
    if let Some(s) = &r.scale {
        let x = s.big.median() / s.empty.median();
        t.push(Target {
            what: "archive-push with a large catalog ÷ with an empty one (medians; 1,000,000 rows by default)",
            measured: format!("{x:.3} ({} rows)", s.rows),
            limit: "≤ 1.1",
            met: known(x).map(|x| x <= 1.1),
        });
    }
    t.push(Target {
        what: "reference: pgBackRest synchronous archive-push ÷ `cp` (expected about 4×)",
        measured: if pgbr_ratio.is_finite() { format!("{pgbr_ratio:.2}×") } else { "not measured".into() },
        limit: "–",
        met: None,
    });
    t
}

/// The whole report, in Markdown.
pub fn markdown(r: &Results, machine: &[(String, String)], command: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Machine\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    for (k, v) in machine {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    let _ = writeln!(out, "\nCommand: `{command}`\n");

    let _ = writeln!(out, "### Archiving (archive_command), {} segments of 16 MiB, one process per call\n", r.segments);
    let (push, fetch) = (&r.timings.push, &r.timings.fetch);
    table(&mut out, push, find(push, "cp"), find(push, "cp + sync"));
    if !r.timings.reference.is_empty() {
        let _ = writeln!(out, "\nWhere a push's time goes, timed in the same interleaved loop:\n");
        table(&mut out, &r.timings.reference, find(push, "cp"), find(push, "cp + sync"));
    }
    let _ = writeln!(out, "\n### Fetching (restore_command), same segments, each checked byte for byte\n");
    table(&mut out, fetch, find(fetch, "cp"), None);

    let s = &r.sizes;
    let _ = writeln!(out, "\n### Stored size of the same segments\n");
    let _ = writeln!(out, "| store | bytes | size | ÷ WAL | ÷ `zstd -3` |\n|---|---:|---:|---:|---:|");
    let mut row = |name: &str, b: u64| {
        let _ = writeln!(
            out,
            "| {name} | {b} | {} | {:.3} | {:.3} |",
            mib(b),
            b as f64 / s.plain as f64,
            b as f64 / s.zstd3 as f64
        );
    };
    row("WAL segments", s.plain);
    row("`zstd -3` of each segment", s.zstd3);
    row("walvault repository (WAL objects)", s.walvault);
    if let Some(p) = s.pgbackrest {
        row("pgBackRest archive (zst, default level 3)", p);
    }

    if let Some(sc) = &r.scale {
        let _ = writeln!(
            out,
            "\n### Cost per segment with a large archive\n\n\
             Catalog of {} segments: built in {:.1} s, {}. {} pushes per column, fresh repositories each round.\n",
            sc.rows,
            sc.build_secs,
            mib(sc.catalog_bytes),
            sc.big.ms.len()
        );
        let _ = writeln!(out, "| operation | median ms | p90 ms | ÷ empty catalog |\n|---|---:|---:|---:|");
        for x in [&sc.empty, &sc.big] {
            let _ = writeln!(
                out,
                "| `{}` | {:.1} | {:.1} | {} |",
                x.label,
                x.median(),
                x.p90(),
                ratio(x.median(), sc.empty.median())
            );
        }
    }

    let _ = writeln!(out, "\n### Targets\n\n| target | measured | limit | met |\n|---|---:|---:|---|");
    for t in targets(r) {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(out, "| {} | {} | {} | {met} |", t.what, t.measured, t.limit);
    }
    out
}
