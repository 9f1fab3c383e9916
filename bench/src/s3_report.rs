//! The S3 benchmark's samples and its Markdown report: machine, what each
//! row runs, push and fetch tables (wall and CPU per segment), stored
//! bytes, per-round medians and the targets.

use std::fmt::Write as _;

use std::path::Path;

use crate::Took;
use crate::stats::Series;

/// The samples of one row (one tool in one configuration).
#[derive(Debug, Clone)]
pub struct Row {
    /// As the tables show it.
    pub label: &'static str,
    /// Wall time per call, every round.
    pub wall: Series,
    /// CPU time (user + system) per call, every round.
    pub cpu: Series,
    /// Wall time per call, per round (index 0 is round 1).
    pub rounds: Vec<Series>,
}

impl Row {
    /// An empty row.
    pub fn new(label: &'static str) -> Row {
        Row { label, wall: Series::new(label), cpu: Series::new(label), rounds: Vec::new() }
    }

    /// Adds one call: round, segment, position in the interleaved loop.
    pub fn add(&mut self, round: usize, segment: &str, position: usize, t: Took) {
        let tag = format!("{round},{segment},{position}");
        self.wall.push(t.wall, tag.clone());
        self.cpu.push(t.cpu, tag);
        while self.rounds.len() < round {
            self.rounds.push(Series::new(self.label));
        }
        self.rounds[round - 1].push(t.wall, String::new());
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Report {
    /// archive-push side.
    pub push: Vec<Row>,
    /// archive-fetch side.
    pub fetch: Vec<Row>,
    /// Round 1: (row, bytes of the segments' objects, number of objects).
    pub sizes: Vec<(&'static str, u64, usize)>,
    /// (round, load average at its start, at its end).
    pub loads: Vec<(usize, String, String)>,
    /// Segments per round.
    pub segments: usize,
    /// Rounds.
    pub rounds: usize,
    /// Whether the server was moto (else s3s-fs).
    pub moto: bool,
    /// Whether walvault's HTTPS row could be measured.
    pub walvault_https: bool,
    /// (row, its push command for the first segment).
    pub commands: Vec<(&'static str, String)>,
}

impl Report {
    /// Every sample: `side,row,round,segment,position,wall_ms,cpu_ms`.
    pub fn csv(&self) -> String {
        let mut out = String::from("side,row,round,segment,position,wall_ms,cpu_ms\n");
        for (side, rows) in [("push", &self.push), ("fetch", &self.fetch)] {
            for r in rows {
                for ((w, c), tag) in r.wall.ms.iter().zip(&r.cpu.ms).zip(&r.wall.tags) {
                    let _ = writeln!(out, "{side},\"{}\",{tag},{w:.3},{c:.3}", r.label);
                }
            }
        }
        out
    }
}

fn find<'a>(rows: &'a [Row], label: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.label == label)
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 { format!("{:.2}×", a / b) } else { "–".into() }
}

fn table(out: &mut String, rows: &[Row], base: Option<&Row>) {
    let _ = writeln!(
        out,
        "| row | wall median ms | wall p90 ms | CPU median ms | wall ÷ walvault (zstd 3, HTTP) | CPU ÷ walvault (zstd 3, HTTP) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let (w, c) = base.map_or(("–".into(), "–".into()), |b| {
            (ratio(r.wall.median(), b.wall.median()), ratio(r.cpu.median(), b.cpu.median()))
        });
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.1} | {w} | {c} |",
            r.label,
            r.wall.median(),
            r.wall.p90(),
            r.cpu.median()
        );
    }
}

fn per_round(out: &mut String, rows: &[Row], rounds: usize) {
    let _ = write!(out, "| row |");
    for i in 1..=rounds {
        let _ = write!(out, " round {i} |");
    }
    let _ = writeln!(out, "\n|---|{}", "---:|".repeat(rounds));
    for r in rows {
        let _ = write!(out, "| {} |", r.label);
        for s in &r.rounds {
            let _ = write!(out, " {:.1} |", s.median());
        }
        let _ = writeln!(out);
    }
}

/// One target of the issue: what, measured, limit, met.
fn target(out: &mut String, what: &str, measured: f64, limit: &str, met: impl Fn(f64) -> bool) {
    let (m, ok) = if measured.is_finite() {
        (format!("{measured:.2}×"), if met(measured) { "yes" } else { "**no**" })
    } else {
        ("not measured".to_string(), "–")
    };
    let _ = writeln!(out, "| {what} | {m} | {limit} | {ok} |");
}

/// The whole report, in Markdown.
pub fn markdown(
    r: &Report,
    work: &Path,
    versions: &[(String, Option<String>)],
    command: &str,
    load_before: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Machine\n\n| | |\n|---|---|");
    for (k, v) in crate::host::machine(work, &[]) {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    for (k, v) in versions {
        let _ = writeln!(out, "| {k} | {} |", v.as_deref().unwrap_or("not installed"));
    }
    let _ = writeln!(out, "| load average (1, 5, 15 min) at the start | {load_before} |");
    for (round, a, b) in &r.loads {
        let _ = writeln!(out, "| load average, round {round}, at start → at end | {a} → {b} |");
    }
    let _ = writeln!(out, "\nCommand: `{command}`\n");
    let _ = writeln!(
        out,
        "{} segments of 16 MiB per round, {} rounds, fresh prefixes each round; figures over all {} calls per row. \
         S3 server: {}.{}\n",
        r.segments,
        r.rounds,
        r.segments * r.rounds,
        if r.moto { "moto (Python)" } else { "s3s-fs (Rust)" },
        if r.walvault_https { "" } else { " walvault could not use the HTTPS endpoint: its HTTPS row is missing." }
    );

    let _ = writeln!(out, "### What each row runs (push of the first segment)\n\n| row | command |\n|---|---|");
    for (label, cmd) in &r.commands {
        let _ = writeln!(out, "| {label} | `{cmd}` |");
    }

    let base_push = find(&r.push, crate::WV3_HTTP);
    let _ = writeln!(out, "\n### Archiving (archive_command), one process per segment\n");
    table(&mut out, &r.push, base_push);
    let _ = writeln!(out, "\nWall median per round (ms):\n");
    per_round(&mut out, &r.push, r.rounds);

    let base_fetch = find(&r.fetch, crate::WV3_HTTP);
    let _ = writeln!(out, "\n### Fetching (restore_command), one process per segment, each checked byte for byte\n");
    table(&mut out, &r.fetch, base_fetch);
    let _ = writeln!(out, "\nWall median per round (ms):\n");
    per_round(&mut out, &r.fetch, r.rounds);

    let plain = r.segments as f64 * 16.0 * 1024.0 * 1024.0;
    let wv = r.sizes.iter().find(|s| s.0 == crate::WV3_HTTP).map_or(f64::NAN, |s| s.1 as f64);
    let _ = writeln!(
        out,
        "\n### Stored bytes (round 1, the segments' objects only)\n\n\
         | row | objects | bytes | MiB | ÷ WAL | ÷ walvault (zstd 3) |\n|---|---:|---:|---:|---:|---:|"
    );
    for (label, bytes, count) in &r.sizes {
        let b = *bytes as f64;
        let _ =
            writeln!(out, "| {label} | {count} | {bytes} | {:.1} | {:.3} | {:.3} |", b / 1048576.0, b / plain, b / wv);
    }

    let m = |rows: &[Row], l: &str| find(rows, l).map_or(f64::NAN, |x| x.wall.median());
    let (p, f) = (&r.push, &r.fetch);
    let _ = writeln!(
        out,
        "\n### Targets (ratios of wall medians)\n\n| target | measured | limit | met |\n|---|---:|---:|---|"
    );
    use crate::{BARMAN_GZ_HTTP, BARMAN_GZ_HTTPS, BARMAN_NONE_HTTP, PGBR_HTTPS, WV3_HTTP, WV3_HTTPS};
    let twenty = |x: f64| x >= 20.0;
    let faster = |x: f64| x > 1.0;
    target(
        &mut out,
        "push: barman-cloud (gzip, HTTP) ÷ walvault (zstd 3, HTTP)",
        m(p, BARMAN_GZ_HTTP) / m(p, WV3_HTTP),
        "≥ 20×",
        twenty,
    );
    target(
        &mut out,
        "push: barman-cloud (gzip, HTTPS) ÷ walvault (zstd 3, HTTPS)",
        m(p, BARMAN_GZ_HTTPS) / m(p, WV3_HTTPS),
        "≥ 20×",
        twenty,
    );
    target(
        &mut out,
        "push: barman-cloud (no compression, HTTP) ÷ walvault (zstd 3, HTTP)",
        m(p, BARMAN_NONE_HTTP) / m(p, WV3_HTTP),
        "≥ 20×",
        twenty,
    );
    target(
        &mut out,
        "fetch: barman-cloud (gzip, HTTP) ÷ walvault (zstd 3, HTTP)",
        m(f, BARMAN_GZ_HTTP) / m(f, WV3_HTTP),
        "≥ 20×",
        twenty,
    );
    target(
        &mut out,
        "fetch: barman-cloud (gzip, HTTPS) ÷ walvault (zstd 3, HTTPS)",
        m(f, BARMAN_GZ_HTTPS) / m(f, WV3_HTTPS),
        "≥ 20×",
        twenty,
    );
    target(
        &mut out,
        "fetch: barman-cloud (no compression, HTTP) ÷ walvault (zstd 3, HTTP)",
        m(f, BARMAN_NONE_HTTP) / m(f, WV3_HTTP),
        "≥ 20×",
        twenty,
    );
    target(
        &mut out,
        "push: pgBackRest sync (HTTPS) ÷ walvault (zstd 3, HTTPS)",
        m(p, PGBR_HTTPS) / m(p, WV3_HTTPS),
        "> 1×",
        faster,
    );
    target(
        &mut out,
        "push: pgBackRest sync (HTTPS) ÷ walvault (zstd 3, HTTP)",
        m(p, PGBR_HTTPS) / m(p, WV3_HTTP),
        "> 1×",
        faster,
    );
    target(
        &mut out,
        "fetch (reference): pgBackRest (HTTPS) ÷ walvault (zstd 3, HTTPS)",
        m(f, PGBR_HTTPS) / m(f, WV3_HTTPS),
        "> 1×",
        faster,
    );
    out
}
