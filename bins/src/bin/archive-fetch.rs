//! `archive-fetch %f %p`: PostgreSQL's `restore_command`. Exit 0 with a
//! verified file at `%p`; 1, quietly, when the archive does not have it;
//! 255 (stop recovery) when it exists but cannot be read or verified —
//! unless this is a standby or `fetch-on-error = "retry"` (see
//! docs/errors.md).

use std::path::PathBuf;

use clap::Parser;
use walvault::fetch::{ErrorAnswer, FetchOutcome, error_answer, fetch_all};
use walvault_bins::{CommonArgs, EXIT_ABORT_RECOVERY, EXIT_FAIL, EXIT_OK, parse_args, report_error, report_warning};

/// Restore one WAL file from the walvault repository (restore_command = 'archive-fetch %f %p').
#[derive(Parser)]
#[command(name = "archive-fetch", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The WAL file name (PostgreSQL's %f)
    wal_name: String,
    /// Where to write it (PostgreSQL's %p)
    dest: String,
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
    let report = fetch_all(&config, &cli.wal_name, &PathBuf::from(&cli.dest));
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
