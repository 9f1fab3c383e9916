//! `walvault`: the operator's command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use walvault::init::IdentitySource;
use walvault::repo::now_ms;
use walvault_bins::{CommonArgs, EXIT_FAIL, EXIT_OK, parse_args, report_error, report_warning};

/// Keep a PostgreSQL cluster recoverable: WAL archive, catalog and reports.
#[derive(Parser)]
#[command(name = "walvault", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bind the repository and cluster name to a PostgreSQL cluster
    Init {
        /// Data directory to read the identity from (the server may be running)
        #[arg(long, value_name = "DIR", required_unless_present = "system_id")]
        pgdata: Option<PathBuf>,
        /// System identifier, instead of --pgdata
        #[arg(long, requires_all = ["pg_version"], conflicts_with = "pgdata")]
        system_id: Option<u64>,
        /// PostgreSQL major version, with --system-id
        #[arg(long)]
        pg_version: Option<u32>,
        /// WAL segment size in bytes, with --system-id
        #[arg(long, default_value_t = 16 * 1024 * 1024)]
        wal_segment_size: u64,
    },
    /// Show what the archive holds (from the catalog)
    Info {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Take a base backup of the running server (run on the database host)
    Backup {
        /// libpq connection string or URI [default: the PG* environment variables]
        #[arg(long, value_name = "CONNINFO")]
        dbname: Option<String>,
        /// Data directory [default: asked from the server]
        #[arg(long, value_name = "DIR")]
        pgdata: Option<PathBuf>,
        /// Files copied in parallel
        #[arg(long, short = 'j', default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Request an immediate checkpoint instead of waiting for a spread one
        #[arg(long)]
        fast: bool,
        /// Seconds to wait for the WAL the backup needs to be archived
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        archive_timeout: u64,
        /// Read at most this many bytes per second (suffixes k, M, G)
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_rate: Option<u64>,
    },
    /// Restore a base backup and set up recovery to a target
    Restore {
        /// Data directory to restore into (must be empty unless --delta)
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Recover to this time; a zone is required: '2026-11-21 14:30:00+00'
        #[arg(long, value_name = "TIME", group = "target_kind")]
        target_time: Option<String>,
        /// Recover to this LSN ('0/3000060')
        #[arg(long, value_name = "LSN", group = "target_kind")]
        target_lsn: Option<String>,
        /// Recover to the commit of this transaction id
        #[arg(long, value_name = "XID", group = "target_kind")]
        target_xid: Option<String>,
        /// Recover to this restore point (pg_create_restore_point)
        #[arg(long, value_name = "NAME", group = "target_kind")]
        target_name: Option<String>,
        /// 'immediate': stop as soon as the backup is consistent
        #[arg(long, value_name = "immediate", group = "target_kind", value_parser = ["immediate"])]
        target: Option<String>,
        /// Timeline to recover along: latest, current or a number [default: latest]
        #[arg(long, value_name = "TIMELINE")]
        target_timeline: Option<String>,
        /// What the server does at the target: promote, pause or shutdown
        #[arg(long, value_name = "ACTION", value_parser = ["promote", "pause", "shutdown"])]
        target_action: Option<String>,
        /// Stop just before the target rather than just after it
        #[arg(long)]
        target_exclusive: bool,
        /// Restore this backup instead of the one the planner chooses
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Start as a standby (standby.signal) instead of a recovering primary
        #[arg(long)]
        standby: bool,
        /// Restore even when WAL the target needs is missing
        #[arg(long)]
        force: bool,
        /// Restore into a non-empty directory, keeping files that already match
        #[arg(long)]
        delta: bool,
        /// Files written in parallel
        #[arg(long, short = 'j', default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Restore the tablespace at OLD into NEW (repeatable)
        #[arg(long, value_name = "OLD=NEW", value_parser = parse_mapping)]
        tablespace_map: Vec<(String, String)>,
    },
    /// Delete the backups and WAL the retention policy no longer keeps
    Expire {
        /// Show what would be deleted, and why; delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Keep the newest N backups (overrides [retention] keep-last)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// Keep every moment of this window restorable: 14d, 36h… (overrides keep-within)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_within: Option<u64>,
        /// Keep the newest backup of each of the last N days
        #[arg(long, value_name = "N")]
        keep_daily: Option<u32>,
        /// … of each of the last N weeks
        #[arg(long, value_name = "N")]
        keep_weekly: Option<u32>,
        /// … of each of the last N months
        #[arg(long, value_name = "N")]
        keep_monthly: Option<u32>,
        /// … of each of the last N years
        #[arg(long, value_name = "N")]
        keep_yearly: Option<u32>,
        /// Unreferenced data objects younger than this are kept (overrides [retention] grace)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_or_zero)]
        grace: Option<u64>,
        /// Seconds to wait for the repository lock (0: fail at once, naming the holder)
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait: u64,
    },
    /// Read and check every object of the repository; exit 1 on any problem
    Verify {
        /// Only this backup: its manifest, its data objects, its WAL
        #[arg(long, value_name = "ID", conflicts_with = "wal")]
        backup: Option<String>,
        /// Only the WAL (and which gaps matter to which backup)
        #[arg(long)]
        wal: bool,
        /// Objects read in parallel [default: the number of cores]
        #[arg(long, short = 'j', value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: Option<u16>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Check that the running server archives into this repository, and how fast
    Check {
        /// libpq connection string or URI [default: the PG* environment variables]
        #[arg(long, value_name = "CONNINFO")]
        dbname: Option<String>,
        /// Seconds to wait for the switched WAL segment to reach the repository
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        archive_timeout: u64,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Test restore: restore into a throwaway server, check it, record the result
    Drill {
        /// Restore this backup [default: the one the planner picks for the target]
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Recover to this time (zone required) [default: the end of the archive]
        #[arg(long, value_name = "TIME", group = "drill_target")]
        target_time: Option<String>,
        /// Recover to this LSN
        #[arg(long, value_name = "LSN", group = "drill_target")]
        target_lsn: Option<String>,
        /// Recover to the commit of this transaction id
        #[arg(long, value_name = "XID", group = "drill_target")]
        target_xid: Option<String>,
        /// Recover to this restore point
        #[arg(long, value_name = "NAME", group = "drill_target")]
        target_name: Option<String>,
        /// 'immediate': stop as soon as the backup is consistent
        #[arg(long, value_name = "immediate", group = "drill_target", value_parser = ["immediate"])]
        target: Option<String>,
        /// SQL checks: each '-- expect: VALUE' line starts a query whose single value must equal VALUE
        #[arg(long, value_name = "FILE")]
        sql: Option<PathBuf>,
        /// Where to create the temporary directory [default: the system's temporary directory]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Port of the throwaway server (it listens only on a private socket) [default: a free one]
        #[arg(long)]
        port: Option<u16>,
        /// Keep the temporary directory for inspection
        #[arg(long)]
        keep: bool,
        /// Seconds to wait for the server to start and recover
        #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
        timeout: u64,
        /// Files restored in parallel
        #[arg(long, short = 'j', default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Mark a backup that retention must never delete (or --undo the mark)
    KeepForever {
        /// The backup's identifier (see 'walvault info')
        id: String,
        /// Remove the mark instead
        #[arg(long)]
        undo: bool,
    },
    /// Manage the catalog
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Recreate the catalog from the repository alone
    Rebuild,
}

fn run(cli: Cli) -> walvault::Result<()> {
    let config = cli.common.load()?;
    match cli.command {
        Command::Init { pgdata, system_id, pg_version, wal_segment_size } => {
            let source = match (pgdata, system_id, pg_version) {
                (Some(dir), _, _) => IdentitySource::PgData(dir),
                (None, Some(system_id), Some(pg_version)) => {
                    IdentitySource::Explicit { system_id, pg_version, wal_segment_size }
                }
                _ => return Err(walvault::Error::Setting("give --pgdata, or --system-id and --pg-version".into())),
            };
            let identity = source.resolve()?;
            let report = walvault::init::init(&config, &identity)?;
            for w in &report.warnings {
                report_warning("walvault", w);
            }
            let verb = if report.created { "initialized" } else { "already initialized" };
            println!(
                "cluster '{}' in repository '{}' {verb}: system identifier {}, PostgreSQL {}, {} segments",
                config.cluster, config.repository, identity.system_id, identity.pg_version, identity.segment_size
            );
        }
        Command::Info { json } => {
            let info = walvault::info::info(&config, now_ms())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).map_err(|e| walvault::Error::Setting(e.to_string()))?
                );
            } else {
                print!("{info}");
            }
        }
        Command::Backup { dbname, pgdata, jobs, fast, archive_timeout, max_rate } => {
            let opts = walvault::backup::BackupOptions {
                connection: dbname,
                env: walvault::backup::PgEnv::from_process(),
                pgdata,
                jobs: usize::from(jobs),
                fast,
                archive_timeout: Duration::from_secs(archive_timeout),
                max_rate,
                progress: std::io::stderr().is_terminal(),
            };
            let report = walvault::backup::backup(&config, &opts)?;
            for w in &report.warnings {
                report_warning("walvault", w);
            }
            println!("{}", walvault::backup::summary_line(&report));
        }
        Command::Restore {
            pgdata,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target,
            target_timeline,
            target_action,
            target_exclusive,
            backup,
            standby,
            force,
            delta,
            jobs,
            tablespace_map,
        } => {
            use walvault::restore::TargetAction;
            let target = restore_target(target_time, target_lsn, target_xid, target_name, target);
            let target_action = target_action.map(|a| match a.as_str() {
                "promote" => TargetAction::Promote,
                "shutdown" => TargetAction::Shutdown,
                _ => TargetAction::Pause,
            });
            let opts = walvault::restore::RestoreOptions {
                pgdata,
                target,
                target_timeline,
                target_action,
                target_exclusive,
                backup,
                standby,
                force,
                delta,
                jobs: usize::from(jobs),
                tablespace_map,
                archive_fetch: None,
            };
            let report = walvault::restore::restore(&config, &opts)?;
            for w in &report.warnings {
                report_warning("walvault", w);
            }
            println!("{}", walvault::restore::summary_line(&report, &opts));
        }
        Command::Expire {
            dry_run,
            json,
            keep_last,
            keep_within,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            grace,
            wait,
        } => {
            let base = config.retention;
            let policy = walvault::config::RetentionPolicy {
                keep_last: keep_last.or(base.keep_last),
                keep_within_secs: keep_within.or(base.keep_within_secs),
                keep_daily: keep_daily.or(base.keep_daily),
                keep_weekly: keep_weekly.or(base.keep_weekly),
                keep_monthly: keep_monthly.or(base.keep_monthly),
                keep_yearly: keep_yearly.or(base.keep_yearly),
            };
            let opts = walvault::expire::ExpireOptions {
                dry_run,
                policy,
                grace_secs: grace.unwrap_or(config.grace_secs),
                now_ms: now_ms(),
                wait_secs: wait,
            };
            let report = walvault::expire::expire(&config, &opts)?;
            print_report(&report, json)?;
        }
        Command::Verify { backup, wal, jobs, json } => {
            let jobs = jobs.map_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()), usize::from);
            let opts = walvault::verify::VerifyOptions { backup, wal_only: wal, jobs };
            let report = walvault::verify::verify(&config, &opts)?;
            print_report(&report, json)?;
            if !report.ok() {
                eprintln!(
                    "walvault: error: verify found {} problem(s) in repository '{}' (listed above)",
                    report.problems.len(),
                    config.repository
                );
                std::process::exit(EXIT_FAIL);
            }
        }
        Command::Check { dbname, archive_timeout, json } => {
            let opts = walvault::check::CheckOptions {
                connection: dbname,
                env: walvault::backup::PgEnv::from_process(),
                timeout: Duration::from_secs(archive_timeout),
            };
            let report = walvault::check::check(&config, &opts)?;
            print_report(&report, json)?;
            if !report.ok() {
                eprintln!("walvault: error: check failed (see the lines above)");
                std::process::exit(EXIT_FAIL);
            }
        }
        Command::Drill {
            backup,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target,
            sql,
            dir,
            port,
            keep,
            timeout,
            jobs,
            json,
        } => {
            let opts = walvault::drill::DrillOptions {
                target: restore_target(target_time, target_lsn, target_xid, target_name, target),
                backup,
                sql,
                dir,
                port,
                keep,
                timeout: Duration::from_secs(timeout),
                jobs: usize::from(jobs),
                archive_fetch: None,
            };
            match walvault::drill::drill(&config, &opts) {
                Ok(report) => print_report(&report, json)?,
                Err(e) => {
                    if let walvault::Error::Drill(d) = &e
                        && let Some(report) = d.report()
                    {
                        print_report(report, json)?;
                    }
                    return Err(e);
                }
            }
        }
        Command::KeepForever { id, undo } => {
            for w in walvault::keep::keep_forever(&config, &id, !undo)? {
                report_warning("walvault", &w);
            }
            if undo {
                println!("backup '{id}' is no longer kept forever: the retention policy applies to it again");
            } else {
                println!("backup '{id}' is kept forever: expire will never delete it nor the WAL it needs");
            }
        }
        Command::Catalog { command: CatalogCommand::Rebuild } => {
            let report = walvault::rebuild::rebuild(&config)?;
            for key in &report.ignored {
                report_warning("walvault", &format!("ignored '{key}': not a WAL file of this cluster"));
            }
            for d in &report.damaged {
                report_warning("walvault", &format!("not indexed, damaged header: {d}"));
            }
            println!(
                "catalog '{}' rebuilt: {} WAL files and {} backups indexed",
                config.catalog.display(),
                report.wal_files,
                report.backups
            );
            if !report.damaged.is_empty() {
                return Err(walvault::Error::Damaged { repo: config.repository, count: report.damaged.len() });
            }
        }
    }
    Ok(())
}

/// The one target among the mutually exclusive `--target*` flags.
fn restore_target(
    time: Option<String>,
    lsn: Option<String>,
    xid: Option<String>,
    name: Option<String>,
    immediate: Option<String>,
) -> walvault::restore::RestoreTarget {
    use walvault::restore::RestoreTarget;
    match (time, lsn, xid, name, immediate) {
        (Some(t), ..) => RestoreTarget::Time(t),
        (_, Some(l), ..) => RestoreTarget::Lsn(l),
        (_, _, Some(x), ..) => RestoreTarget::Xid(x),
        (_, _, _, Some(n), _) => RestoreTarget::Name(n),
        (_, _, _, _, Some(_)) => RestoreTarget::Immediate,
        _ => RestoreTarget::End,
    }
}

/// Prints a report as JSON or as its text form.
fn print_report<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) -> walvault::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(report).map_err(|e| walvault::Error::Setting(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{report}");
    }
    Ok(())
}

/// `14d`, `36h`, `1d12h` → seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    walvault::config::parse_duration(s)
}

/// Like [`parse_duration`], and `0` for none at all.
fn parse_duration_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" { Ok(0) } else { walvault::config::parse_duration(s) }
}

/// `100M` → 104857600.
fn parse_rate(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    match digits.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n.saturating_mul(mult)),
        _ => Err(format!("'{s}' is not a rate such as 500k, 100M or 1G")),
    }
}

/// `OLD=NEW` → (OLD, NEW), both absolute.
fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if old.starts_with('/') && new.starts_with('/') => Ok((old.into(), new.into())),
        _ => Err(format!("'{s}' is not OLD=NEW with two absolute directories")),
    }
}

fn main() {
    let cli: Cli = parse_args("walvault", 2);
    let code = match run(cli) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            report_error("walvault", &e);
            EXIT_FAIL
        }
    };
    std::process::exit(code)
}
