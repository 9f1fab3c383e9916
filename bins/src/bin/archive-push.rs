//! `archive-push %p`: PostgreSQL's `archive_command`. Exit 0 only when the
//! file is durably stored; silent on success.

use std::path::PathBuf;

use clap::Parser;
use walvault_bins::{CommonArgs, EXIT_FAIL, EXIT_OK, parse_args, report_error, report_warning};

/// Archive one WAL file into the walvault repository (archive_command = 'archive-push %p').
#[derive(Parser)]
#[command(name = "archive-push", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// The WAL file to archive (PostgreSQL's %p)
    // A String, not a PathBuf: clap refuses an empty path with its own
    // message; walvault's is clearer.
    wal_path: String,
}

fn main() {
    let cli: Cli = parse_args("archive-push", EXIT_FAIL);
    let result = cli.common.load().and_then(|config| walvault::push::push(&config, &PathBuf::from(&cli.wal_path)));
    let code = match result {
        Ok(outcome) => {
            for w in &outcome.warnings {
                report_warning("archive-push", w);
            }
            EXIT_OK
        }
        Err(e) => {
            report_error("archive-push", &e);
            EXIT_FAIL
        }
    };
    std::process::exit(code)
}
