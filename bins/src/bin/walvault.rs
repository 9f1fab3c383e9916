//! `walvault`: the operator's command.

use std::path::PathBuf;

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
        Command::Catalog { command: CatalogCommand::Rebuild } => {
            let report = walvault::rebuild::rebuild(&config)?;
            for key in &report.ignored {
                report_warning("walvault", &format!("ignored '{key}': not a WAL file of this cluster"));
            }
            for d in &report.damaged {
                report_warning("walvault", &format!("not indexed, damaged header: {d}"));
            }
            println!("catalog '{}' rebuilt: {} WAL files indexed", config.catalog.display(), report.wal_files);
            if !report.damaged.is_empty() {
                return Err(walvault::Error::Damaged { repo: config.repository, count: report.damaged.len() });
            }
        }
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
