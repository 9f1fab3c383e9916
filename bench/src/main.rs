//! walvault-bench: archives and fetches real WAL segments with `cp`,
//! walvault and pgBackRest side by side, one process per call as
//! PostgreSQL does, and prints the figures as a Markdown table (see
//! `docs/benchmarks.md`). With `--suite backup` it takes base backups and
//! restores them with walvault, `pg_basebackup` and pgBackRest instead
//! (`backup.rs`).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p walvault-bench -- [--suite archive|backup|all] [--segments N] [--out DIR] [--keep]
//! ```

mod backup;
mod backup_report;
mod compare;
mod ctx;
mod host;
mod json;
mod pg;
mod report;
mod scale;
mod stats;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::ctx::Ctx;
use crate::host::{first_line, source_version};

const USAGE: &str = "\
usage: walvault-bench [--suite archive|backup|all] [--segments N] [--scale-segments M]
                      [--scale-rounds R] [--catalog-rows ROWS] [--scale S] [--jobs J]
                      [--rounds N] [--pgbench-seconds T] [--out DIR] [--keep]

  --suite SUITE       archive: archive-push/fetch per segment (the default);
                      backup: base backups and restores; all: both
  --segments N        WAL segments made with pgbench and timed per tool (default 40)
  --scale-segments M  segments pushed per round in the large-catalog test (default 20)
  --scale-rounds R    rounds of the large-catalog test (default 3; 0 skips it)
  --catalog-rows ROWS rows of the large catalog (default 1000000)
  --scale S           backup suite: pgbench scale of the cluster (default 100, ~1.5 GB)
  --jobs J            backup suite: processes for walvault and pgBackRest (default 2)
  --rounds N          backup suite: repeat the sequence N times, each with fresh
                      repositories and a fresh pgbench -i; report medians (default 1)
  --pgbench-seconds T backup suite: pgbench run before the second backup (default 30)
  --out DIR           also write the results to DIR/results.md and every
                      sample to DIR/samples.csv (backup suite: DIR/results-backup.md
                      and DIR/samples-backup.csv)
  --keep              keep the work directory under /tmp

Run after `cargo build --release --workspace --bins`: the walvault binaries
are taken from the directory of this executable.";

/// Which measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    Archive,
    Backup,
    All,
}

/// Command-line options.
#[derive(Debug)]
struct Args {
    suite: Suite,
    backup: backup::Options,
    segments: usize,
    scale_segments: usize,
    scale_rounds: usize,
    catalog_rows: u64,
    out: Option<PathBuf>,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        suite: Suite::Archive,
        backup: backup::Options::default(),
        segments: 40,
        scale_segments: 20,
        scale_rounds: 3,
        catalog_rows: 1_000_000,
        out: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T> {
        v.and_then(|s| s.parse().ok()).with_context(|| format!("{flag} takes a number"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--segments" => a.segments = number(&arg, it.next())?,
            "--scale-segments" => a.scale_segments = number(&arg, it.next())?,
            "--scale-rounds" => a.scale_rounds = number(&arg, it.next())?,
            "--catalog-rows" => a.catalog_rows = number(&arg, it.next())?,
            "--suite" => {
                a.suite = match it.next().as_deref() {
                    Some("archive") => Suite::Archive,
                    Some("backup") => Suite::Backup,
                    Some("all") => Suite::All,
                    _ => bail!("--suite takes archive, backup or all"),
                }
            }
            "--scale" => a.backup.scale = number(&arg, it.next())?,
            "--jobs" => a.backup.jobs = number(&arg, it.next())?,
            "--rounds" => a.backup.rounds = number(&arg, it.next())?,
            "--pgbench-seconds" => a.backup.pgbench_secs = number(&arg, it.next())?,
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                let _ = writeln!(std::io::stdout(), "{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    if a.segments < 2 {
        bail!("--segments must be at least 2");
    }
    if a.backup.scale == 0 || a.backup.jobs == 0 || a.backup.rounds == 0 {
        bail!("--scale, --jobs and --rounds must be at least 1");
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walvault-bench: error: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = real_main(&args) {
        eprintln!("walvault-bench: error: {e:#}");
        if !args.keep {
            eprintln!("HINT: run again with --keep to look at the work directory");
        }
        std::process::exit(1);
    }
}

fn real_main(args: &Args) -> Result<()> {
    let started = Instant::now();
    let load_before = report::loadavg();
    if load_before.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l > 0.5) {
        eprintln!(
            "walvault-bench: warning: the load average is {load_before}: other work on this machine \
             will make the figures noisy"
        );
    }
    let (work, ctx) = host::setup("walvault-bench", args.keep)?;

    let pgbackrest = compare::pgbackrest_version(&ctx);
    if pgbackrest.is_none() {
        eprintln!(
            "walvault-bench: pgbackrest is not installed ('pgbackrest version' failed): its columns are \
             left out (install it with scripts/install-deps.sh)"
        );
    }
    let mut versions = vec![
        ("PostgreSQL".to_string(), first_line(ctx.admin("postgres"), "--version")),
        (
            "walvault".to_string(),
            format!("{}, {}", first_line(ctx.walvault("archive-push"), "--version"), source_version()),
        ),
        ("pgBackRest".to_string(), pgbackrest.clone().unwrap_or_else(|| "not installed".into())),
        ("zstd".to_string(), first_line(ctx.tool("zstd"), "--version")),
        ("cp".to_string(), first_line(ctx.tool("cp"), "--version")),
    ];
    versions.retain(|(_, v)| !v.is_empty());
    let command = std::iter::once("cargo run --release -p walvault-bench --".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let machine = report::machine(&ctx.work, &versions);

    if args.suite != Suite::Backup {
        archive_suite(&ctx, args, machine.clone(), &command, &load_before, pgbackrest.is_some())?;
    }
    let clean = args.suite == Suite::Archive
        || backup::main(&ctx, &args.backup, &machine, &command, args.out.as_deref(), pgbackrest.is_some())?;
    eprintln!("walvault-bench: done in {:.0} s", started.elapsed().as_secs_f64());
    drop(work);
    if !clean {
        bail!("the backup suite found problems: see 'Problems' in its report");
    }
    Ok(())
}

/// The archive-push/fetch suite (the default): per-segment timings, sizes,
/// and the large-catalog comparison.
fn archive_suite(
    ctx: &Ctx,
    args: &Args,
    mut machine: Vec<(String, String)>,
    command: &str,
    load_before: &str,
    with_pgbackrest: bool,
) -> Result<()> {
    eprintln!("walvault-bench: making {} WAL segments with pgbench in '{}'", args.segments, ctx.work.display());
    let mut server = pg::Server::initdb(ctx)?;
    let segments = pg::make_segments(&mut server, args.segments)?;
    let pgdata = server.datadir().to_path_buf();

    let arch = compare::setup(ctx, &pgdata, with_pgbackrest)?;
    let timings = compare::measure(ctx, &arch, &segments)?;
    let sizes = compare::sizes(ctx, &arch, &segments)?;
    let scale = if args.scale_rounds > 0 {
        let m = args.scale_segments.min(segments.len());
        Some(scale::measure(ctx, &pgdata, &segments[..m], args.catalog_rows, args.scale_rounds)?)
    } else {
        None
    };
    drop(server);

    let results = report::Results { segments: segments.len(), timings, sizes, scale };
    machine.push((
        "load average (1, 5, 15 min), at start → at end".to_string(),
        format!("{load_before} → {}", report::loadavg()),
    ));
    let md = report::markdown(&results, &machine, command);
    writeln!(std::io::stdout(), "{md}").context("unable to write the results to stdout")?;
    if let Some(dir) = &args.out {
        write_out(dir, &md, &results)?;
    }
    Ok(())
}

/// Writes `DIR/results.md` (the report) and `DIR/samples.csv` (every
/// sample: operation, segment, position in the interleaved loop, ms).
fn write_out(dir: &Path, md: &str, r: &report::Results) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("unable to create '{}'", dir.display()))?;
    let file = dir.join("results.md");
    fs::write(&file, md).with_context(|| format!("unable to write '{}'", file.display()))?;
    let mut csv = String::from("operation,segment,position,ms\n");
    let t = &r.timings;
    let scale = r.scale.iter().flat_map(|s| [&s.empty, &s.big]);
    for s in t.push.iter().chain(&t.reference).chain(&t.fetch).chain(scale) {
        csv.push_str(&s.csv());
    }
    let samples = dir.join("samples.csv");
    fs::write(&samples, csv).with_context(|| format!("unable to write '{}'", samples.display()))?;
    eprintln!("walvault-bench: wrote '{}' and '{}'", file.display(), samples.display());
    Ok(())
}
