//! `walvault`: the operator's command.

mod cli;

use std::io::IsTerminal;
use std::time::Duration;

use walvault::init::IdentitySource;
use walvault::repo::now_ms;
use walvault_bins::{EXIT_FAIL, EXIT_OK, parse_args, report_error, report_warning};

use cli::{CatalogCommand, Cli, Command, RepoCommand};
use walvault::multi;

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
            let outcomes = multi::each(&config, |view| {
                let report = walvault::init::init(view, &identity)?;
                for w in &report.warnings {
                    report_warning("walvault", w);
                }
                let verb = if report.created { "initialized" } else { "already initialized" };
                println!(
                    "cluster '{}' in repository '{}' {verb}: system identifier {}, PostgreSQL {}, {} segments",
                    view.cluster, view.repository, identity.system_id, identity.pg_version, identity.segment_size
                );
                Ok(())
            });
            multi::first_failure(outcomes)?;
        }
        Command::Info { json } => {
            if !config.is_multi() {
                let info = walvault::info::info(&config, now_ms())?;
                return print_report(&info, json);
            }
            let all = multi::AllInfo::collect(&config, now_ms());
            if json {
                print_json(&all.to_json()?)?;
            } else {
                print!("{all}");
            }
            if all.any_failed() {
                multi::first_failure(all.repositories)?;
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
            let several = config.is_multi();
            let outcomes = multi::each(&config, |view| {
                if several && !json {
                    println!("== {} ==", multi::header(&view.repositories[0]));
                }
                let report = walvault::expire::expire(view, &opts)?;
                print_report(&report, json)
            });
            multi::first_failure(outcomes)?;
        }
        Command::Verify { backup, wal, jobs, json } => {
            let jobs = jobs.map_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()), usize::from);
            let opts = walvault::verify::VerifyOptions { backup, wal_only: wal, jobs };
            if !config.is_multi() {
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
                return Ok(());
            }
            let all = multi::AllVerify::run(&config, &opts);
            if json {
                print_json(&all.to_json()?)?;
            } else {
                print!("{all}");
            }
            if all.problem_count() > 0 {
                eprintln!(
                    "walvault: error: verify found {} problem(s) in {} repositories (listed above)",
                    all.problem_count(),
                    all.repositories.len()
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
            // Each required repository must receive the WAL; an optional
            // one is checked too when it is the only one asked for.
            let several = config.is_multi();
            let mut failed = false;
            let outcomes = multi::each(&config, |view| {
                let spec = &view.repositories[0];
                if several && !spec.required {
                    return Ok(());
                }
                if several && !json {
                    println!("== {} ==", multi::header(spec));
                }
                let report = walvault::check::check(view, &opts)?;
                print_report(&report, json)?;
                failed |= !report.ok();
                Ok(())
            });
            multi::first_failure(outcomes)?;
            if failed {
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
            let outcomes = multi::each(&config, |view| {
                for w in walvault::keep::keep_forever(view, &id, !undo)? {
                    report_warning("walvault", &w);
                }
                let place = format!("in repository '{}'", view.repository);
                if undo {
                    println!(
                        "backup '{id}' {place} is no longer kept forever: the retention policy applies to it again"
                    );
                } else {
                    println!("backup '{id}' {place} is kept forever: expire will never delete it nor the WAL it needs");
                }
                Ok(())
            });
            multi::first_failure(outcomes)?;
        }
        Command::Catalog { command: CatalogCommand::Rebuild } => {
            let outcomes = multi::each(&config, |view| {
                let report = walvault::rebuild::rebuild(view)?;
                for key in &report.ignored {
                    report_warning("walvault", &format!("ignored '{key}': not a WAL file of this cluster"));
                }
                for d in &report.damaged {
                    report_warning("walvault", &format!("not indexed, damaged header: {d}"));
                }
                println!(
                    "catalog '{}' rebuilt: {} WAL files and {} backups indexed",
                    view.catalog.display(),
                    report.wal_files,
                    report.backups
                );
                if !report.damaged.is_empty() {
                    return Err(walvault::Error::Damaged {
                        repo: view.repository.clone(),
                        count: report.damaged.len(),
                    });
                }
                Ok(())
            });
            multi::first_failure(outcomes)?;
        }
        Command::Repo { command: RepoCommand::List } => {
            for r in &config.repositories {
                let role = if r.required { "required" } else { "optional" };
                println!("{}\t{}\t{role}\tcatalog {}", r.name, r.location, r.catalog.display());
            }
        }
        Command::Repo { command: RepoCommand::Sync { from, to, dry_run, json, jobs } } => {
            repo_sync(&config, &from, &to, dry_run, json, jobs)?;
        }
    }
    Ok(())
}

/// `walvault repo sync`.
fn repo_sync(
    config: &walvault::config::Config,
    from: &str,
    to: &str,
    dry_run: bool,
    json: bool,
    jobs: u16,
) -> walvault::Result<()> {
    let opts = walvault::sync::SyncOptions { dry_run, jobs: usize::from(jobs) };
    let report = walvault::sync::sync(&config.select(from)?, &config.select(to)?, &opts)?;
    print_report(&report, json)?;
    if !report.ok() {
        eprintln!(
            "walvault: error: repo sync found {} problem(s) (listed above); everything else was copied",
            report.problems.len()
        );
        std::process::exit(EXIT_FAIL);
    }
    Ok(())
}

/// Prints a JSON value, pretty.
fn print_json(value: &serde_json::Value) -> walvault::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| walvault::Error::Setting(e.to_string()))?;
    println!("{text}");
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
