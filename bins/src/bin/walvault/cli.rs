//! The command line of `walvault`: every subcommand and flag, with the
//! parsers of flag values. `main.rs` maps them to library calls.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use walvault_bins::CommonArgs;

/// Keep a PostgreSQL cluster recoverable: WAL archive, catalog and reports.
#[derive(Parser)]
#[command(name = "walvault", version)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// The configured repositories: list them, copy between them
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum RepoCommand {
    /// One line per configured repository: name, location, role, catalog
    List,
    /// Copy what one repository has and another lacks (never deletes)
    Sync {
        /// The repository to copy from (a name from [[repositories]])
        #[arg(long, value_name = "NAME")]
        from: String,
        /// The repository to copy into
        #[arg(long, value_name = "NAME")]
        to: String,
        /// Say what would be copied; write nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        /// Objects copied in parallel
        #[arg(long, short = 'j', default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
    },
}

#[derive(Subcommand)]
pub(crate) enum CatalogCommand {
    /// Recreate the catalog from the repository alone
    Rebuild,
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
