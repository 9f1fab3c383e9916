//! `archive-push %p`: PostgreSQL's `archive_command`. Exit 0 only when the
//! file is durably stored (or, with `queue-max`, dropped and recorded as a
//! gap, loudly); silent on success. With `async = true` it waits for its
//! file's outcome from a background worker, which it starts as
//! `archive-push --worker <pg_wal>`.

use std::path::PathBuf;

use clap::Parser;
use walvault::async_push::{Launcher, WorkerOptions, archive, run_worker};
use walvault_bins::{CommonArgs, EXIT_FAIL, EXIT_OK, parse_args, report_error, report_warning};

/// Archive one WAL file into the walvault repository (archive_command = 'archive-push %p').
#[derive(Parser)]
#[command(name = "archive-push", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Run the asynchronous push worker for this pg_wal directory (archive-push starts it itself)
    #[arg(long, value_name = "PG_WAL", hide = true)]
    worker: Option<PathBuf>,
    /// The WAL file to archive (PostgreSQL's %p)
    // A String, not a PathBuf: clap refuses an empty path with its own
    // message; walvault's is clearer.
    #[arg(required_unless_present = "worker")]
    wal_path: Option<String>,
}

fn main() {
    let cli: Cli = parse_args("archive-push", EXIT_FAIL);
    let config = match cli.common.load() {
        Ok(config) => config,
        Err(e) => {
            report_error("archive-push", &e);
            std::process::exit(EXIT_FAIL)
        }
    };
    if let Some(pg_wal) = &cli.worker {
        let code = match run_worker(&config, pg_wal, &WorkerOptions::default()) {
            Ok(_) => EXIT_OK,
            Err(e) => {
                report_error("archive-push worker", &e);
                EXIT_FAIL
            }
        };
        std::process::exit(code)
    }
    let launcher = Launcher {
        // /proc/self/exe; should it be unreadable, PATH finds archive-push.
        program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("archive-push")),
        args: cli.common.worker_args(),
    };
    let wal_path = PathBuf::from(cli.wal_path.unwrap_or_default());
    let code = match archive(&config, &wal_path, &launcher) {
        Ok(outcome) => {
            for w in &outcome.warnings {
                report_warning("archive-push", w);
            }
            EXIT_OK
        }
        Err(failure) => {
            eprintln!("archive-push: error: {}", failure.message);
            if let Some(hint) = &failure.hint {
                eprintln!("HINT: {hint}");
            }
            EXIT_FAIL
        }
    };
    std::process::exit(code)
}
