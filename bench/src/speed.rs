//! walvault-bench-speed: the asynchronous push and the prefetching fetch
//! side by side with `cp` and pgBackRest, on a live PostgreSQL server (see
//! `docs/benchmarks.md`, "Speed: asynchronous push and prefetching fetch"):
//!
//! 1. archive throughput under a pgbench load that writes WAL as fast as
//!    the machine can, and the full-backlog loop (every segment `.ready`,
//!    one archive-push call per segment);
//! 2. recovery speed: replay of ≥ 1 GiB of archived WAL from one base
//!    backup, with each `restore_command`;
//! 3. CPU time (user + system, from `wait4`) of one archive-push and one
//!    archive-fetch per compression level, with the stored size.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p walvault-bench --bin walvault-bench-speed -- [--quick] [--out DIR]
//! ```

// Shared with the other benchmark programs; this one uses only part of them.
#[allow(dead_code)]
mod compare;
#[allow(dead_code)]
mod ctx;
mod host;
#[allow(dead_code)]
mod pg;
mod speed_archive;
mod speed_cpu;
mod speed_recovery;
mod speed_report;
#[allow(dead_code)]
mod stats;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::host::{first_line, source_version};

const USAGE: &str = "\
usage: walvault-bench-speed [--quick] [--load-seconds S] [--jobs J] [--loop-segments N]
                            [--loop-rounds R] [--recovery-segments N] [--recovery-rounds R]
                            [--prefetch P] [--cpu-segments N] [--levels L,L,...]
                            [--parts archive,recovery,cpu] [--out DIR] [--keep]

  --quick                small sizes, to check that everything runs (about 3 minutes)
  --load-seconds S       seconds of pgbench load per archive_command (default 45)
  --jobs J               walvault's jobs and pgBackRest's process-max (default: CPUs)
  --loop-segments N      segments in the full-backlog loop (default 40)
  --loop-rounds R        rounds of the full-backlog loop (default 3)
  --recovery-segments N  WAL segments replayed from the base backup (default 80, 1.25 GiB)
  --recovery-rounds R    replays per restore_command (default 1)
  --prefetch P           walvault's prefetch; pgBackRest's archive-get-queue-max is
                         P segments (default 16)
  --cpu-segments N       segments pushed and fetched per compression level (default 10)
  --levels L,...         compression levels of the CPU part (default 1,3,6,9,19)
  --parts P,...          which parts to run (default archive,recovery,cpu)
  --out DIR              also write DIR/results-speed.md and DIR/samples-speed.csv
  --keep                 keep the work directory under /tmp

Run after `cargo build --release --workspace --bins`: the walvault binaries
are taken from the directory of this executable.";

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Args {
    /// `--quick`.
    pub quick: bool,
    /// Seconds of pgbench load per archive_command.
    pub load_secs: u32,
    /// walvault's `jobs`, pgBackRest's `process-max`.
    pub jobs: u32,
    /// Segments in the full-backlog loop.
    pub loop_segments: usize,
    /// Rounds of the full-backlog loop.
    pub loop_rounds: usize,
    /// Segments of WAL replayed in the recovery part.
    pub recovery_segments: u64,
    /// Replays per restore_command.
    pub recovery_rounds: usize,
    /// walvault's `prefetch`.
    pub prefetch: u32,
    /// Segments per level in the CPU part.
    pub cpu_segments: usize,
    /// Compression levels of the CPU part.
    pub levels: Vec<i32>,
    /// Run the throughput part.
    pub archive: bool,
    /// Run the recovery part.
    pub recovery: bool,
    /// Run the CPU part.
    pub cpu: bool,
    /// `--out DIR`.
    pub out: Option<PathBuf>,
    /// `--keep`.
    pub keep: bool,
}

fn parse_args() -> Result<Args> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut a = Args {
        quick: false,
        load_secs: 45,
        jobs: u32::try_from(cpus).unwrap_or(2),
        loop_segments: 40,
        loop_rounds: 3,
        recovery_segments: 80,
        recovery_rounds: 1,
        prefetch: 16,
        cpu_segments: 10,
        levels: vec![1, 3, 6, 9, 19],
        archive: true,
        recovery: true,
        cpu: true,
        out: None,
        keep: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--quick") {
        a.quick = true;
        a.load_secs = 8;
        a.loop_segments = 8;
        a.loop_rounds = 1;
        a.recovery_segments = 6;
        a.cpu_segments = 2;
    }
    let mut it = args.into_iter();
    fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T> {
        v.and_then(|s| s.parse().ok()).with_context(|| format!("{flag} takes a number"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {}
            "--load-seconds" => a.load_secs = number(&arg, it.next())?,
            "--jobs" => a.jobs = number(&arg, it.next())?,
            "--loop-segments" => a.loop_segments = number(&arg, it.next())?,
            "--loop-rounds" => a.loop_rounds = number(&arg, it.next())?,
            "--recovery-segments" => a.recovery_segments = number(&arg, it.next())?,
            "--recovery-rounds" => a.recovery_rounds = number(&arg, it.next())?,
            "--prefetch" => a.prefetch = number(&arg, it.next())?,
            "--cpu-segments" => a.cpu_segments = number(&arg, it.next())?,
            "--levels" => {
                let v = it.next().context("--levels takes a list such as 1,3,6")?;
                a.levels = v
                    .split(',')
                    .map(|l| l.trim().parse::<i32>().ok().filter(|l| (1..=19).contains(l)))
                    .collect::<Option<Vec<_>>>()
                    .with_context(|| format!("--levels '{v}': expected levels 1 to 19 separated by commas"))?;
            }
            "--parts" => {
                let v = it.next().context("--parts takes a list such as archive,cpu")?;
                (a.archive, a.recovery, a.cpu) = (false, false, false);
                for p in v.split(',') {
                    match p.trim() {
                        "archive" => a.archive = true,
                        "recovery" => a.recovery = true,
                        "cpu" => a.cpu = true,
                        other => bail!("--parts: unknown part '{other}' (archive, recovery, cpu)"),
                    }
                }
            }
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                let _ = writeln!(std::io::stdout(), "{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    if a.loop_segments < 2 || a.cpu_segments < 1 || a.recovery_segments < 2 {
        bail!("--loop-segments and --recovery-segments must be at least 2, --cpu-segments at least 1");
    }
    if a.jobs == 0 || a.jobs > 64 || a.loop_rounds == 0 || a.recovery_rounds == 0 || a.load_secs == 0 {
        bail!("--jobs (1 to 64), --loop-rounds, --recovery-rounds and --load-seconds must be at least 1");
    }
    if a.prefetch == 0 || a.prefetch > 1024 {
        bail!("--prefetch must be 1 to 1024");
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walvault-bench-speed: error: {e:#}");
            std::process::exit(2);
        }
    };
    match real_main(&args) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("walvault-bench-speed: error: a check failed: see 'Problems' in the report");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("walvault-bench-speed: error: {e:#}");
            if !args.keep {
                eprintln!("HINT: run again with --keep to look at the work directory");
            }
            std::process::exit(1);
        }
    }
}

/// Runs the parts asked for; returns whether every check held.
fn real_main(args: &Args) -> Result<bool> {
    let started = Instant::now();
    let load_before = host::loadavg();
    let (work, ctx) = host::setup("walvault-bench-speed", args.keep)?;
    let pgbackrest = compare::pgbackrest_version(&ctx);
    if pgbackrest.is_none() {
        eprintln!(
            "walvault-bench-speed: pgbackrest is not installed ('pgbackrest version' failed): its rows are \
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
        ("cp".to_string(), first_line(ctx.tool("cp"), "--version")),
    ];
    versions.retain(|(_, v)| !v.is_empty());
    let command = std::iter::once("cargo run --release -p walvault-bench --bin walvault-bench-speed --".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut machine = host::machine(&ctx.work, &versions);
    let with_pgbr = pgbackrest.is_some();

    let mut report = speed_report::Report::new(args.clone());
    let result = (|| -> Result<()> {
        eprintln!(
            "walvault-bench-speed: making {} WAL segments with pgbench in '{}'",
            args.loop_segments,
            ctx.work.display()
        );
        let mut server = pg::Server::initdb(&ctx)?;
        let want = args.loop_segments.max(args.cpu_segments);
        let segments = pg::make_segments(&mut server, want)?;
        if args.archive {
            speed_archive::loop_part(
                &ctx,
                server.datadir(),
                &segments[..args.loop_segments],
                args,
                with_pgbr,
                &mut report,
            )?;
        }
        if args.cpu {
            speed_cpu::measure(&ctx, server.datadir(), &segments[..args.cpu_segments], args, &mut report)?;
        }
        if args.archive {
            speed_archive::throughput(&ctx, &mut server, args, with_pgbr, &mut report)?;
        }
        if args.recovery {
            speed_recovery::measure(&ctx, &mut server, args, with_pgbr, &mut report)?;
        }
        server.stop()?;
        Ok(())
    })();
    // Workers the archivers left (walvault's async worker, pgBackRest's
    // async process) exit once idle; none may outlive the benchmark.
    report.problems.extend(speed_archive::reap_workers(&ctx, Duration::from_secs(120)));
    result?;

    machine.push((
        "load average (1, 5, 15 min), at start → at end".to_string(),
        format!("{load_before} → {}", host::loadavg()),
    ));
    let md = speed_report::markdown(&report, &machine, &command);
    writeln!(std::io::stdout(), "{md}").context("unable to write the results to stdout")?;
    if let Some(dir) = &args.out {
        fs::create_dir_all(dir).with_context(|| format!("unable to create '{}'", dir.display()))?;
        let (file, csv) = (dir.join("results-speed.md"), dir.join("samples-speed.csv"));
        fs::write(&file, &md).with_context(|| format!("unable to write '{}'", file.display()))?;
        fs::write(&csv, speed_report::csv(&report)).with_context(|| format!("unable to write '{}'", csv.display()))?;
        eprintln!("walvault-bench-speed: wrote '{}' and '{}'", file.display(), csv.display());
    }
    eprintln!("walvault-bench-speed: done in {:.0} s", started.elapsed().as_secs_f64());
    drop(work);
    Ok(report.problems.is_empty())
}
