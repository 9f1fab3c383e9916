//! `archive-fetch %f %p`: PostgreSQL's `restore_command`. Exit 0 with a
//! verified file at `%p`; 1, quietly, when the archive does not have it;
//! 255 (stop recovery) when it exists but cannot be read or verified —
//! unless this is a standby or `fetch-on-error = "retry"` (see
//! docs/errors.md). With `prefetch = N`, segments come from the prefetch
//! spool when a verified copy is there, and a background worker
//! (`archive-fetch --prefetch-worker`, started on demand) keeps the next N
//! coming.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use walvault::fetch::{ErrorAnswer, FetchOutcome, error_answer};
use walvault::prefetch::{self, Spool, WORKER_FLAG};
use walvault_bins::{CommonArgs, EXIT_ABORT_RECOVERY, EXIT_FAIL, EXIT_OK, parse_args, report_error, report_warning};

/// Restore one WAL file from the walvault repository (restore_command = 'archive-fetch %f %p').
#[derive(Parser)]
#[command(name = "archive-fetch", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Run the prefetch worker of the configured spool (started by archive-fetch itself)
    #[arg(long = "prefetch-worker", hide = true)]
    prefetch_worker: bool,
    /// The WAL file name (PostgreSQL's %f)
    #[arg(required_unless_present = "prefetch_worker")]
    wal_name: Option<String>,
    /// Where to write it (PostgreSQL's %p)
    #[arg(required_unless_present = "prefetch_worker")]
    dest: Option<String>,
}

fn main() {
    let cli: Cli = parse_args("archive-fetch", EXIT_ABORT_RECOVERY);
    let config = match cli.common.load() {
        Ok(c) => c,
        Err(e) => {
            report_error("archive-fetch", &e);
            std::process::exit(EXIT_ABORT_RECOVERY);
        }
    };
    if cli.prefetch_worker {
        let mut log = |line: &str| report_warning("archive-fetch --prefetch-worker", line);
        if let Err(e) = prefetch::run_worker(&config, prefetch::DEFAULT_IDLE, &mut log) {
            report_error("archive-fetch --prefetch-worker", &e);
            std::process::exit(EXIT_FAIL);
        }
        std::process::exit(EXIT_OK);
    }
    let (wal_name, dest) = (cli.wal_name.unwrap_or_default(), PathBuf::from(cli.dest.unwrap_or_default()));
    let start_worker = || {
        let exe = std::env::current_exe()?;
        let mut args: Vec<OsString> = vec![WORKER_FLAG.into()];
        args.extend(cli.common.worker_args());
        prefetch::spawn_detached(&exe, &args, &Spool::of(&config).log_path())
    };
    let report = prefetch::fetch(&config, &wal_name, &dest, &start_worker);
    for note in &report.notes {
        report_warning("archive-fetch", note);
    }
    let code = match report.result {
        Ok(FetchOutcome::Restored) => EXIT_OK,
        Ok(FetchOutcome::Missing) => EXIT_FAIL,
        Err(e) => {
            report_error("archive-fetch", &e);
            let cwd = std::env::current_dir().ok();
            match error_answer(config.fetch_on_error, cwd.as_deref()) {
                ErrorAnswer::Abort => EXIT_ABORT_RECOVERY,
                ErrorAnswer::Retry => {
                    eprintln!("archive-fetch: answering 'not available' so that the standby retries later");
                    EXIT_FAIL
                }
            }
        }
    };
    std::process::exit(code)
}
