//! `walvault drill`: a test restore that proves a backup really restores,
//! and measures how long that takes (the recovery time, RTO).
//!
//! In order:
//! 1. refusals that say nothing about the backup, before anything is
//!    written: running as root, no PostgreSQL programs for the cluster's
//!    version, an unreadable or malformed `--sql` file, a drill directory
//!    that is taken or unusable, a target or `--backup` the archive does not
//!    have;
//! 2. `<dir>/walvault-drill-<id>` is created (mode 0700, never reused) and
//!    the backup restored into its `data` with [`restore::restore`] — every
//!    tablespace relocated to `tablespaces/<oid>` inside it, so that nothing
//!    is written anywhere else;
//! 3. the restored configuration is made harmless ([`drill_settings`]): no
//!    archiving into the production repository (a promoted copy would
//!    publish a timeline there), no TCP, a socket in the drill directory
//!    only, no replication, subscriptions, SSL files, external pid file or
//!    recovery hooks of the source host; authentication is `trust` on that
//!    private socket (its directory is readable by this user only);
//! 4. PostgreSQL is started with `pg_ctl`, and the drill waits until
//!    recovery has reached the target and the server accepts connections:
//!    that moment, counted from the start of the restore, is the RTO;
//! 5. the checks ([`Check`]): every table of every database that accepts
//!    connections is read (`count(*)`, index scans disabled so that the
//!    heap is read); where `amcheck` is available, `bt_index_check` on every
//!    B-tree index and `verify_heapam` on every table (PostgreSQL 14 and
//!    later); then the `--sql` file;
//! 6. the server is stopped (`pg_ctl -m immediate`; a guard also stops it
//!    on an error or a panic), the directory removed unless `--keep`, and
//!    the outcome recorded as a [`DrillRecord`]: in the repository (the
//!    truth) and in the catalog (an index; a failure there is a warning).
//!
//! A drill that fails after step 1 — a missing WAL file, a corrupt data
//! object, a server that does not start or does not reach the target, a
//! failed check — is recorded too, and returned as
//! [`DrillError::Failed`], whose message names the file, object or table.
//!
//! The port only names the socket file in the drill's own directory: the
//! server listens on no TCP port, so any port works and none is ever taken.
//! Without `--port` one the system reports free on the loopback is used,
//! which keeps `ps` and logs unambiguous.
//!
//! # The `--sql` file
//!
//! Runs in the `postgres` database as the bootstrap superuser, after the
//! other checks, on the throwaway copy. A line `-- expect: VALUE` starts a
//! check: the SQL after it, up to the next such line, is sent as one query
//! (it may hold several statements) and the **last** statement must return
//! exactly one row of one column whose text is `VALUE`. Values are compared
//! as PostgreSQL prints them (a boolean is `t` or `f`; `true` and `false`
//! are accepted for them), after trimming white space around both; `NULL`
//! expects SQL NULL. SQL before the first `-- expect:` line is setup: it
//! must succeed, and the checks do not run if it fails.
//!
//! ```sql
//! -- setup: anything here must simply succeed
//! SET search_path = shop;
//! -- expect: 1000
//! SELECT count(*) FROM orders;
//! -- expect: t
//! SELECT NOT EXISTS (SELECT 1 FROM orders WHERE total < 0);
//! ```
//!
//! A comment line that begins `-- expect` but is not `-- expect: VALUE` is
//! refused, so that a mistyped expectation is never silently a comment.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, NoTls, SimpleQueryMessage};
use serde::Serialize;
use walvault_formats::time::Timestamp;

use crate::backup::session::effective_user_name;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::plan::PlanError;
use crate::repo::{DrillRecord, Repository, now_ms};
use crate::restore::{self, RestoreError, RestoreOptions, RestoreTarget, TargetAction};

/// How to drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// Where recovery stops; [`RestoreTarget::End`] for the end of the archive.
    pub target: RestoreTarget,
    /// This backup instead of the one the planner chooses (the latest that
    /// reaches the target).
    pub backup: Option<String>,
    /// A file of SQL checks (see the module documentation).
    pub sql: Option<PathBuf>,
    /// The parent of the drill directory; `None` is [`std::env::temp_dir`].
    pub dir: Option<PathBuf>,
    /// The port that names the server's socket; `None` picks a free one.
    pub port: Option<u16>,
    /// Keep the drill directory (data directory and server log) for
    /// inspection; the server is stopped all the same.
    pub keep: bool,
    /// How long the server may take to start and reach the target.
    pub timeout: Duration,
    /// Files restored in parallel.
    pub jobs: usize,
    /// The archive-fetch program for `restore_command` (see
    /// [`RestoreOptions::archive_fetch`]).
    pub archive_fetch: Option<PathBuf>,
}

impl Default for DrillOptions {
    /// The latest backup to the end of the archive, in the temporary
    /// directory, with an hour for recovery and four restore jobs.
    fn default() -> Self {
        DrillOptions {
            target: RestoreTarget::End,
            backup: None,
            sql: None,
            dir: None,
            port: None,
            keep: false,
            timeout: Duration::from_secs(3600),
            jobs: 4,
            archive_fetch: None,
        }
    }
}

/// One kind of check and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked: "tables readable", "amcheck: B-tree indexes",
    /// "amcheck: heap", "sql 'FILE'".
    pub name: String,
    /// How many objects (tables, indexes, SQL checks) were checked.
    pub checked: u64,
    /// How many failed.
    pub failed: u64,
    /// The first failures ([`MAX_FAILURES_SHOWN`]), one line each, naming
    /// the database and the table, index or line.
    pub failures: Vec<String>,
    /// Why the check did not run (or ran only in part), if so.
    pub skipped: Option<String>,
}

/// How many failures of one check a report lists.
pub const MAX_FAILURES_SHOWN: usize = 100;

impl Check {
    fn new(name: impl Into<String>) -> Check {
        Check { name: name.into(), checked: 0, failed: 0, failures: Vec::new(), skipped: None }
    }

    fn fail(&mut self, line: String) {
        self.failed += 1;
        if self.failures.len() < MAX_FAILURES_SHOWN {
            self.failures.push(line);
        }
    }

    fn skip(&mut self, why: String) {
        match &mut self.skipped {
            Some(s) => {
                s.push_str("; ");
                s.push_str(&why);
            }
            None => self.skipped = Some(why),
        }
    }
}

/// Where a drill failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Planning, reading the repository, writing the files.
    Restore,
    /// Starting PostgreSQL on the restored files.
    Start,
    /// Replaying WAL to the target (including running out of time).
    Recovery,
    /// The checks (tables, amcheck, the SQL file).
    Checks,
}

/// What a drill did; serialized as-is for `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillReport {
    /// The drill's id: its UTC start, `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// The backup restored (empty when the failure came before the
    /// planner chose one).
    pub backup: String,
    /// The recovery target, in words.
    pub target: String,
    /// Whether the backup restored, reached the target and passed every check.
    pub ok: bool,
    /// Why not, on one line.
    pub failure: Option<String>,
    /// Where it failed.
    pub failed_at: Option<Stage>,
    /// When the drill started, `YYYY-MM-DD HH:MM:SS+00`.
    pub started_at: String,
    /// When it started, ms since the epoch.
    pub started_at_ms: i64,
    /// When it finished (server stopped, directory removed).
    pub finished_at_ms: i64,
    /// How long writing the files took, ms.
    pub restore_ms: Option<i64>,
    /// From the start of the restore until the server accepted connections
    /// at the target, ms; `None` when it never did.
    pub rto_ms: Option<i64>,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
    /// The port that named the socket.
    pub port: u16,
    /// The drill directory, when kept.
    pub kept: Option<PathBuf>,
    /// The server log, when kept.
    pub log: Option<PathBuf>,
    /// The server log's last lines, after a failure.
    pub log_tail: Vec<String>,
    /// Things worth knowing that did not fail the drill.
    pub warnings: Vec<String>,
}

/// `12.3s`, `4m05s`, `2h03m`.
fn human_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60)
    }
}

impl fmt::Display for DrillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backup = if self.backup.is_empty() { "(none chosen)".to_string() } else { format!("'{}'", self.backup) };
        writeln!(
            f,
            "drill {} of backup {backup} to {}: {}",
            self.id,
            self.target,
            if self.ok { "passed" } else { "FAILED" }
        )?;
        if let Some(why) = &self.failure {
            let during = match self.failed_at {
                Some(Stage::Restore) => " during the restore",
                Some(Stage::Start) => " starting the server",
                Some(Stage::Recovery) => " during recovery",
                Some(Stage::Checks) => " in the checks",
                None => "",
            };
            writeln!(f, "  failed{during}: {why}")?;
        }
        match (self.restore_ms, self.rto_ms) {
            (Some(r), Some(rto)) => writeln!(
                f,
                "  restored in {}; the server accepted connections at the target after {} (RTO)",
                human_ms(r),
                human_ms(rto)
            )?,
            (Some(r), None) => writeln!(f, "  restored in {}; the server never reached the target", human_ms(r))?,
            _ => {}
        }
        for c in &self.checks {
            match (&c.skipped, c.checked) {
                (Some(s), 0) => write!(f, "  {}: skipped: {s}", c.name)?,
                (skipped, n) => {
                    let status = if c.failed > 0 { format!("{} FAILED", c.failed) } else { "all passed".to_string() };
                    write!(f, "  {}: {n} checked, {status}", c.name)?;
                    if let Some(s) = skipped {
                        write!(f, " (partly skipped: {s})")?;
                    }
                }
            }
            writeln!(f)?;
            for line in c.failures.iter().take(20) {
                writeln!(f, "    {line}")?;
            }
            if c.failed > 20 {
                writeln!(f, "    … and {} more", c.failed - 20)?;
            }
        }
        if !self.log_tail.is_empty() {
            writeln!(f, "  server log, last lines:")?;
            for line in &self.log_tail {
                writeln!(f, "    {line}")?;
            }
        }
        if let Some(dir) = &self.kept {
            write!(f, "  kept '{}'", dir.display())?;
            if let Some(log) = &self.log {
                write!(f, " (server log '{}')", log.display())?;
            }
            writeln!(f, ": remove it when done")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// Why a drill was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Running as root.
    #[error("walvault drill cannot run as root: PostgreSQL refuses to run as root")]
    Root,
    /// No usable PostgreSQL programs.
    #[error("no PostgreSQL {major} programs found: {tried}")]
    NoPgBin {
        /// The cluster's major version.
        major: u32,
        /// What was looked at, and why each was not usable.
        tried: String,
    },
    /// `--port 0`.
    #[error("port 0 cannot name a PostgreSQL socket")]
    Port,
    /// The drill directory already exists.
    #[error("directory taken: '{path}' already exists")]
    DirectoryTaken {
        /// The directory.
        path: PathBuf,
    },
    /// The drill directory cannot be created or used.
    #[error("unable to use drill directory '{path}': {reason}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The `--sql` file cannot be read.
    #[error("unable to read SQL file '{path}': {source}")]
    SqlRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The `--sql` file is malformed.
    #[error("SQL file '{path}'{}: {detail}", if *line > 0 { format!(" line {line}") } else { String::new() })]
    SqlFile {
        /// The file.
        path: PathBuf,
        /// The line (0: the whole file).
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// The drill ran and failed; it was recorded. The report says what
    /// was checked and, when the server ran, ends with its log.
    #[error("{}", failed_message(.0))]
    Failed(Box<DrillReport>),
}

fn failed_message(r: &DrillReport) -> String {
    let of = if r.backup.is_empty() { "the archive".to_string() } else { format!("backup '{}'", r.backup) };
    format!("drill {} of {of} failed: {}", r.id, r.failure.as_deref().unwrap_or("see the report"))
}

impl DrillError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            DrillError::Root => {
                "run it as the user PostgreSQL runs as, e.g. 'runuser -u postgres -- walvault drill …' \
                                 (the systemd unit does)"
                    .into()
            }
            DrillError::NoPgBin { major, .. } => format!(
                "install the PostgreSQL {major} server package, or set 'pg-bin' in the configuration file to the \
                 directory holding its pg_ctl"
            ),
            DrillError::Port => "give a port from 1 to 65535, or leave --port out".into(),
            DrillError::DirectoryTaken { path } => format!(
                "another drill is running or an earlier one was kept or interrupted there: stop its server \
                 (pg_ctl -D '{}' -m immediate stop) and remove the directory, or choose another --dir",
                path.join("data").display()
            ),
            DrillError::Directory { .. } => {
                "--dir must be an existing directory this user can write, with a short plain path (the server's \
                 socket lives there)"
                    .into()
            }
            DrillError::SqlRead { .. } => "give a readable file of SQL checks with --sql".into(),
            DrillError::SqlFile { .. } => "write '-- expect: VALUE' on the line before each query whose one value \
                                           must be VALUE (NULL for SQL NULL); SQL before the first such line is \
                                           setup that must succeed"
                .into(),
            DrillError::Failed(r) => {
                let mut h = match r.failed_at {
                    Some(Stage::Restore) => {
                        "drill another backup with --backup ID to see whether an older one restores; ".to_string()
                    }
                    Some(Stage::Start) => "the restored configuration may need what this host lacks (a library in \
                                           shared_preload_libraries, a file it names): see the server log; "
                        .to_string(),
                    Some(Stage::Recovery) => {
                        "see the server log; if recovery only needs longer, raise --timeout; ".to_string()
                    }
                    Some(Stage::Checks) => "the backup restores but its data fails the checks: run the same checks \
                                            on the primary, and take a new backup once it is sound; "
                        .to_string(),
                    None => String::new(),
                };
                if r.kept.is_none() {
                    h.push_str(
                        "run the drill again with --keep to inspect the data directory and the whole server log",
                    );
                } else {
                    h.push_str("the data directory and the server log are kept (see above)");
                }
                h
            }
        })
    }

    /// The report of a drill that ran and failed.
    pub fn report(&self) -> Option<&DrillReport> {
        match self {
            DrillError::Failed(r) => Some(r),
            _ => None,
        }
    }
}

/// Until `Error::Drill(#[from] DrillError)` exists: a refusal as a
/// configuration error, a failed drill as an unusable data directory.
fn lift(e: DrillError, _tmp: Option<&Path>) -> Error {
    Error::Drill(e)
}

// ---------------------------------------------------------------------------
// The SQL file
// ---------------------------------------------------------------------------

/// One block of a `--sql` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlBlock {
    /// The line of its `-- expect:` (of its first line, for setup).
    pub line: usize,
    /// The expected value; `None` for setup, which only has to succeed.
    pub expected: Option<String>,
    /// The SQL, comments and all.
    pub sql: String,
}

/// What a comment line that starts with `-- expect` says: `Ok(Some(v))`
/// for `-- expect: v`, `Ok(None)` for another comment or SQL, `Err` for
/// something that looks like an expectation and is not one.
fn expect_line(line: &str) -> Result<Option<&str>, String> {
    let Some(rest) = line.trim_start().strip_prefix("--") else { return Ok(None) };
    let rest = rest.trim_start();
    let head = rest.get(..6).unwrap_or("");
    if !head.eq_ignore_ascii_case("expect") {
        return Ok(None);
    }
    let after = &rest[6..];
    // "-- expected results below" is a plain comment.
    if after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
        return Ok(None);
    }
    let Some(value) = after.trim_start().strip_prefix(':') else {
        return Err("write an expectation as '-- expect: VALUE'".into());
    };
    let value = value.trim();
    if value.is_empty() {
        return Err("'-- expect:' without a value (NULL expects SQL NULL)".into());
    }
    Ok(Some(value))
}

/// Whether SQL text holds anything but blank lines and `--` comments.
fn has_sql(sql: &str) -> bool {
    sql.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with("--")
    })
}

/// Parses a `--sql` file (see the module documentation) into setup (if
/// any) and checks. Errors carry the line (0 for the whole file).
pub fn parse_sql_checks(text: &str) -> Result<Vec<SqlBlock>, (usize, String)> {
    let mut blocks = Vec::new();
    let mut cur = SqlBlock { line: 1, expected: None, sql: String::new() };
    let close = |b: SqlBlock, blocks: &mut Vec<SqlBlock>| -> Result<(), (usize, String)> {
        match &b.expected {
            Some(v) if !has_sql(&b.sql) => Err((b.line, format!("'-- expect: {v}' is followed by no query"))),
            Some(_) => {
                blocks.push(b);
                Ok(())
            }
            None => {
                if has_sql(&b.sql) {
                    blocks.push(b);
                }
                Ok(())
            }
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        match expect_line(line).map_err(|e| (n, e))? {
            Some(v) => {
                let next = SqlBlock { line: n, expected: Some(v.to_string()), sql: String::new() };
                close(std::mem::replace(&mut cur, next), &mut blocks)?;
            }
            None => {
                cur.sql.push_str(line);
                cur.sql.push('\n');
            }
        }
    }
    close(cur, &mut blocks)?;
    if blocks.is_empty() {
        return Err((0, "the file holds no query".into()));
    }
    Ok(blocks)
}

/// The result of a query's last statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastResult {
    /// It returned no rows at all (not a query), or nothing ran.
    NoRows,
    /// Its rows: the number of columns and every row's values.
    Rows {
        /// Columns.
        columns: usize,
        /// Values, by row.
        rows: Vec<Vec<Option<String>>>,
    },
}

/// The last statement's result among the messages of a simple query.
fn last_result(messages: &[SimpleQueryMessage]) -> LastResult {
    let mut last = LastResult::NoRows;
    let mut columns: Option<usize> = None;
    let mut rows: Vec<Vec<Option<String>>> = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => columns = Some(cols.len()),
            SimpleQueryMessage::Row(r) => {
                columns.get_or_insert(r.len());
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
            SimpleQueryMessage::CommandComplete(_) => {
                last = match columns.take() {
                    Some(columns) => LastResult::Rows { columns, rows: std::mem::take(&mut rows) },
                    None => LastResult::NoRows,
                };
                rows.clear();
            }
            _ => {}
        }
    }
    last
}

/// Whether a value PostgreSQL returned is the one expected.
pub fn value_matches(expected: &str, actual: Option<&str>) -> bool {
    let expected = expected.trim();
    match actual {
        None => expected == "NULL",
        Some(a) => {
            let a = a.trim();
            a == expected
                || (a == "t" && expected.eq_ignore_ascii_case("true"))
                || (a == "f" && expected.eq_ignore_ascii_case("false"))
        }
    }
}

/// Judges a check's result; `Err` says what came instead.
pub fn judge(expected: &str, result: &LastResult) -> Result<(), String> {
    let got = match result {
        LastResult::NoRows => "no result (the last statement must be a query)".to_string(),
        LastResult::Rows { rows, .. } if rows.len() != 1 => format!("{} rows", rows.len()),
        LastResult::Rows { columns, .. } if *columns != 1 => format!("{columns} columns"),
        LastResult::Rows { rows, .. } => {
            let v = rows.first().and_then(|r| r.first()).cloned().flatten();
            if value_matches(expected, v.as_deref()) {
                return Ok(());
            }
            match v {
                Some(v) => format!("'{v}'"),
                None => "NULL".into(),
            }
        }
    };
    Err(format!("expected '{expected}', got {got}"))
}

/// The first line of SQL that is not a comment, shortened, for messages.
fn sql_summary(sql: &str) -> String {
    let first = sql.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("--")).unwrap_or("");
    if first.chars().count() > 60 { format!("{}…", first.chars().take(60).collect::<String>()) } else { first.into() }
}

// ---------------------------------------------------------------------------
// PostgreSQL's programs and the server's configuration
// ---------------------------------------------------------------------------

/// What a candidate directory of PostgreSQL programs holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinProbe {
    /// `pg_ctl` and `postgres` are there; the major version `pg_ctl
    /// --version` reports, if it could be read.
    Usable(Option<u32>),
    /// Not usable, and why.
    Unusable(String),
}

/// Chooses the directory of PostgreSQL's programs: `configured` (the
/// `pg-bin` setting) if given — and then only it —, else Debian's
/// `/usr/lib/postgresql/<major>/bin`, the PGDG packages'
/// `/usr/pgsql-<major>/bin`, then what `pg_config --bindir` says. A
/// directory whose `pg_ctl` is of another major version is refused: that
/// server would not start on the restored files.
pub fn resolve_bin_dir(
    configured: Option<&Path>,
    major: u32,
    probe: &dyn Fn(&Path) -> BinProbe,
    pg_config_bindir: &dyn Fn() -> Option<PathBuf>,
) -> Result<PathBuf, DrillError> {
    let mut tried = Vec::new();
    let consider = |dir: &Path, tried: &mut Vec<String>| match probe(dir) {
        BinProbe::Usable(Some(v)) if v != major => {
            tried.push(format!("'{}' holds PostgreSQL {v}", dir.display()));
            false
        }
        BinProbe::Usable(_) => true,
        BinProbe::Unusable(why) => {
            tried.push(format!("'{}' {why}", dir.display()));
            false
        }
    };
    if let Some(dir) = configured {
        if consider(dir, &mut tried) {
            return Ok(dir.to_path_buf());
        }
        return Err(DrillError::NoPgBin { major, tried: format!("pg-bin {}", tried.join("; ")) });
    }
    for dir in [format!("/usr/lib/postgresql/{major}/bin"), format!("/usr/pgsql-{major}/bin")] {
        if consider(Path::new(&dir), &mut tried) {
            return Ok(PathBuf::from(dir));
        }
    }
    match pg_config_bindir() {
        Some(dir) => {
            if consider(&dir, &mut tried) {
                return Ok(dir);
            }
        }
        None => tried.push("no pg_config in PATH".into()),
    }
    Err(DrillError::NoPgBin { major, tried: tried.join("; ") })
}

/// The major version in `pg_ctl --version` output
/// (`pg_ctl (PostgreSQL) 15.10 (Debian 15.10-1)`, `… 16beta1`).
pub fn version_major(output: &str) -> Option<u32> {
    let after = output.split(')').nth(1)?.trim_start();
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Looks at a directory on this host.
fn probe_bin_dir(dir: &Path) -> BinProbe {
    for program in ["pg_ctl", "postgres"] {
        if !is_executable(&dir.join(program)) {
            return BinProbe::Unusable(format!("has no '{program}'"));
        }
    }
    let version = Command::new(dir.join("pg_ctl"))
        .arg("--version")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| version_major(&String::from_utf8_lossy(&o.stdout)));
    BinProbe::Usable(version)
}

/// `pg_config --bindir`, if there is a `pg_config` in `PATH`.
fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).output().ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && dir.starts_with('/')).then(|| PathBuf::from(dir))
}

/// The minimums that recovery with `hot_standby = on` requires, from
/// `pg_controldata` (the source server's settings): PostgreSQL pauses
/// recovery when a setting is lower than the source's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlLimits {
    /// `max_connections setting`.
    pub max_connections: Option<u32>,
    /// `max_worker_processes setting`.
    pub max_worker_processes: Option<u32>,
    /// `max_wal_senders setting`.
    pub max_wal_senders: Option<u32>,
    /// `max_prepared_xacts setting`.
    pub max_prepared_transactions: Option<u32>,
    /// `max_locks_per_xact setting`.
    pub max_locks_per_transaction: Option<u32>,
}

/// Reads the limits from `pg_controldata` output (run with `LC_ALL=C`).
pub fn parse_controldata(text: &str) -> ControlLimits {
    let mut l = ControlLimits::default();
    for line in text.lines() {
        let Some((label, value)) = line.split_once(':') else { continue };
        let value = value.trim().parse::<u32>().ok();
        match label.trim() {
            "max_connections setting" => l.max_connections = value,
            "max_worker_processes setting" => l.max_worker_processes = value,
            "max_wal_senders setting" => l.max_wal_senders = value,
            "max_prepared_xacts setting" => l.max_prepared_transactions = value,
            "max_locks_per_xact setting" => l.max_locks_per_transaction = value,
            _ => {}
        }
    }
    l
}

/// Quotes a value for PostgreSQL's configuration files.
fn quote_conf(value: &str) -> String {
    crate::restore::settings::quote_setting(value)
}

/// The first line of the block a drill appends to `postgresql.auto.conf`.
pub const DRILL_BLOCK_COMMENT: &str = "# added by walvault drill: a throwaway server that reaches nothing outside";

/// The connections a drill server allows at least.
pub const DRILL_MAX_CONNECTIONS: u32 = 20;

/// Where the drill server lives and what it must allow.
#[derive(Debug, Clone)]
pub struct DrillServer<'a> {
    /// The drill directory: socket, `pg_hba.conf`, `pg_ident.conf`.
    pub dir: &'a Path,
    /// The port naming the socket.
    pub port: u16,
    /// The source server's settings that recovery needs at least.
    pub limits: ControlLimits,
}

/// The block appended to the restored `postgresql.auto.conf` (read last,
/// so it wins over `postgresql.conf` and whatever it includes).
pub fn drill_settings(s: &DrillServer<'_>) -> String {
    let mut out = format!("{DRILL_BLOCK_COMMENT}\n");
    let mut set = |name: &str, value: String| {
        out.push_str(name);
        out.push_str(" = ");
        out.push_str(&value);
        out.push('\n');
    };
    let q = |v: &str| quote_conf(v);
    // Never archive: a promoted copy would publish its timeline into the
    // production repository.
    set("archive_mode", "off".into());
    // Reachable through the private socket only.
    set("listen_addresses", q(""));
    set("unix_socket_directories", q(&s.dir.to_string_lossy()));
    set("port", s.port.to_string());
    set("hba_file", q(&s.dir.join("pg_hba.conf").to_string_lossy()));
    set("ident_file", q(&s.dir.join("pg_ident.conf").to_string_lossy()));
    set("ssl", "off".into());
    // Nothing of the source host: no replication, no subscription workers
    // pulling from (and advancing) production slots, no commands that act
    // on a shared archive, no pid file elsewhere, no synchronous standby to
    // wait for.
    set("primary_conninfo", q(""));
    set("primary_slot_name", q(""));
    set("max_logical_replication_workers", "0".into());
    set("archive_cleanup_command", q(""));
    set("recovery_end_command", q(""));
    set("synchronous_standby_names", q(""));
    set("external_pid_file", q(""));
    set("log_destination", q("stderr"));
    set("logging_collector", "off".into());
    set("cluster_name", q("walvault-drill"));
    // Small, and no surprises.
    set("shared_buffers", q("128MB"));
    set("huge_pages", "off".into());
    set("autovacuum", "off".into());
    // A crash while checking is a failure to report, not to hide.
    set("restart_after_crash", "off".into());
    set("hot_standby", "on".into());
    let l = &s.limits;
    set("max_connections", l.max_connections.unwrap_or(0).max(DRILL_MAX_CONNECTIONS).to_string());
    for (name, v) in [
        ("max_worker_processes", l.max_worker_processes),
        ("max_wal_senders", l.max_wal_senders),
        ("max_prepared_transactions", l.max_prepared_transactions),
        ("max_locks_per_transaction", l.max_locks_per_transaction),
    ] {
        if let Some(v) = v {
            set(name, v.to_string());
        }
    }
    out
}

/// `pg_hba.conf` of a drill server: trust on the socket, whose directory
/// only this user can enter.
pub const DRILL_HBA: &str = "# walvault drill: the socket directory is private (mode 0700)\nlocal all all trust\n";

/// The path an `include` or `include_dir` line of a configuration file
/// names, if the line is one (`include_if_exists` never fails).
fn include_target(line: &str) -> Option<String> {
    let t = line.trim_start();
    let end = t.find(|c: char| c.is_whitespace() || c == '=' || c == '\'').unwrap_or(t.len());
    let keyword = t[..end].to_ascii_lowercase();
    if keyword != "include" && keyword != "include_dir" {
        return None;
    }
    let rest = t[end..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    if let Some(q) = rest.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = q.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    out.push('\'');
                }
                '\'' => return Some(out),
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        None
    } else {
        let v: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '#').collect();
        (!v.is_empty()).then_some(v)
    }
}

/// `postgresql.conf` with every `include`/`include_dir` of a file that does
/// not exist on this host commented out (they were the source host's; the
/// server would refuse to start), and the lines commented out.
pub fn neutralize_includes(conf: &str, base: &Path, exists: &dyn Fn(&Path) -> bool) -> (String, Vec<String>) {
    let mut out = String::with_capacity(conf.len());
    let mut removed = Vec::new();
    for line in conf.lines() {
        match include_target(line) {
            Some(target) if !exists(&base.join(&target)) => {
                out.push_str("# walvault drill: not on this host: ");
                removed.push(line.trim().to_string());
            }
            _ => {}
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, removed)
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// One line from a driver error: the server's message, or the driver's
/// description with its causes.
fn pg_error_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        };
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text.replace('\n', " ")
}

/// Options every check session starts with: no timeout of the source's
/// configuration cuts a long read short, writes are allowed (amcheck's
/// `CREATE EXTENSION`), and tables are read through their heap.
const CHECK_OPTIONS: &str = "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0 \
                             -c default_transaction_read_only=off -c enable_indexscan=off -c \
                             enable_indexonlyscan=off -c enable_bitmapscan=off";
/// For the `--sql` file: only the timeouts and writability.
const SQL_OPTIONS: &str = "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0 \
                           -c default_transaction_read_only=off";

/// A drill server: stopped when dropped, whatever happened.
struct Server {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// Role names to connect as, in order; once connected, the bootstrap
    /// superuser's alone.
    users: Vec<String>,
    started: bool,
}

/// Why a connection failed, and whether waiting may help.
struct ConnectFailure {
    text: String,
    retry: bool,
}

impl Server {
    /// The postmaster's PID, if it runs.
    fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok().filter(|p| *p > 0)?;
        // SAFETY: signal 0 sends nothing; it checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        let alive = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        alive.then_some(pid)
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    /// `pg_ctl start`, waiting until the server accepts connections (a
    /// hot standby does once consistent). `Err` is the reason, one line.
    fn start(&mut self, timeout: Duration) -> std::result::Result<(), (Stage, String)> {
        let secs = timeout.as_secs().max(1).to_string();
        let mut cmd = self.pg_ctl();
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", &secs])
            // A data_directory set in a configuration file of the source
            // host must not send this server to the production directory;
            // the command line wins over every file.
            .arg("-o")
            .arg(format!("-c data_directory='{}'", self.data.display()))
            .arg("start");
        self.started = true;
        let out = cmd
            .output()
            .map_err(|e| (Stage::Start, format!("unable to run '{}': {e}", self.bin.join("pg_ctl").display())))?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ");
        if self.pid().is_some() {
            return Err((Stage::Recovery, format!("timed out after {secs}s waiting for the server to start ({said})")));
        }
        Err((Stage::Start, format!("the server did not start: {}", self.last_error().unwrap_or(said))))
    }

    /// Stops the server (immediate mode: the copy is thrown away), by PID
    /// if `pg_ctl` cannot.
    fn stop(&mut self) -> std::result::Result<(), String> {
        if !self.started {
            return Ok(());
        }
        if self.pid().is_none() {
            self.started = false;
            return Ok(());
        }
        let out = self.pg_ctl().arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "-t", "60", "stop"]).output();
        let said = match &out {
            Ok(o) if o.status.success() => {
                self.started = false;
                return Ok(());
            }
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().replace('\n', " "),
            Err(e) => e.to_string(),
        };
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory-safety preconditions; SIGQUIT is
            // PostgreSQL's immediate shutdown.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.pid().is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(pid) = self.pid() {
                return Err(format!(
                    "unable to stop the drill server (pid {pid}) on '{}': {said}",
                    self.data.display()
                ));
            }
        }
        self.started = false;
        Ok(())
    }

    /// The last `n` lines of the server log.
    fn log_tail(&self, n: usize) -> Vec<String> {
        let Ok(bytes) = std::fs::read(&self.log) else { return Vec::new() };
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let lines: Vec<&str> = lines.into_iter().map(str::trim_end).filter(|l| !l.is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
    }

    /// The last FATAL or PANIC line of the log (else its last line): why
    /// the server stopped.
    fn last_error(&self) -> Option<String> {
        let tail = self.log_tail(200);
        tail.iter().rev().find(|l| l.contains("FATAL:") || l.contains("PANIC:")).or(tail.last()).map(|l| {
            // From the severity on: the log line prefix is the source's.
            let from = ["FATAL:", "PANIC:"].iter().filter_map(|s| l.find(s)).min().unwrap_or(0);
            l[from..].split_whitespace().collect::<Vec<_>>().join(" ")
        })
    }

    fn connect(&self, db: &str, options: &str) -> std::result::Result<Client, ConnectFailure> {
        let mut last = ConnectFailure { text: "no role to connect as".into(), retry: false };
        for user in &self.users {
            let mut cfg = postgres::Config::new();
            cfg.host_path(&self.dir)
                .port(self.port)
                .user(user)
                .dbname(db)
                .application_name("walvault drill")
                .connect_timeout(Duration::from_secs(10));
            if !options.is_empty() {
                cfg.options(options);
            }
            match cfg.connect(NoTls) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    let code = e.code();
                    // Starting up, or no socket yet: waiting helps.
                    let retry = code == Some(&SqlState::CANNOT_CONNECT_NOW) || e.as_db_error().is_none();
                    last = ConnectFailure { text: format!("as '{user}': {}", pg_error_text(&e)), retry };
                    if code != Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// Waits until the server has left recovery and accepts connections.
    fn wait_promoted(&mut self, deadline: Instant) -> std::result::Result<(), String> {
        let mut client: Option<Client> = None;
        let mut last = String::from("no connection yet");
        let mut replay = String::new();
        loop {
            if self.pid().is_none() {
                return Err(format!(
                    "the server stopped before reaching the target: {}",
                    self.last_error().unwrap_or_else(|| "see its log".into())
                ));
            }
            if client.is_none() {
                match self.connect("postgres", "").or_else(|e| match e.retry {
                    // A cluster without a `postgres` database.
                    false if e.text.contains("does not exist") => self.connect("template1", ""),
                    _ => Err(e),
                }) {
                    Ok(c) => client = Some(c),
                    Err(e) if e.retry => last = e.text,
                    Err(e) => return Err(format!("cannot connect to the drill server {}", e.text)),
                }
            }
            if let Some(c) = client.as_mut() {
                let q = c.query_one(
                    "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() \
                     ELSE false END, coalesce(pg_last_wal_replay_lsn()::text, '')",
                    &[],
                );
                match q {
                    Ok(row) => {
                        let (in_recovery, paused): (bool, bool) = (row.get(0), row.get(1));
                        replay = row.get(2);
                        if !in_recovery {
                            self.adopt_superuser(c);
                            return Ok(());
                        }
                        if paused {
                            return Err(format!(
                                "recovery paused at {replay} before reaching the target: {}",
                                self.last_error().unwrap_or_else(|| "see the server log".into())
                            ));
                        }
                        last = format!("still in recovery, replayed up to {replay}");
                    }
                    Err(e) => {
                        last = pg_error_text(&e);
                        client = None;
                    }
                }
            }
            if Instant::now() >= deadline {
                let at = if replay.is_empty() { String::new() } else { format!(" (replayed up to {replay})") };
                return Err(format!("timed out waiting for recovery to reach the target{at}: {last}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// From now on connect as the bootstrap superuser (OID 10): trust lets
    /// us, and the role named after this OS user may not be a superuser.
    fn adopt_superuser(&mut self, c: &mut Client) {
        if let Ok(row) = c.query_one("SELECT rolname::text FROM pg_roles WHERE oid = 10", &[]) {
            let name: String = row.get(0);
            self.users = vec![name];
        }
    }
}

impl Drop for Server {
    /// The normal path stops the server itself and reports a failure to;
    /// this is for errors and panics in between.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The drill directory: removed when dropped unless kept.
struct DrillDir {
    path: PathBuf,
    keep: bool,
    removed: bool,
}

impl DrillDir {
    fn remove(&mut self) -> std::result::Result<(), String> {
        if self.keep || self.removed {
            return Ok(());
        }
        self.removed = true;
        std::fs::remove_dir_all(&self.path).map_err(|e| format!("unable to remove '{}': {e}", self.path.display()))
    }
}

impl Drop for DrillDir {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

// ---------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------

/// Why the checks stopped before the end.
struct Abort(String);

/// Runs a statement, turning a lost connection into a reconnection — or,
/// when the server is gone, an abort naming what was being read.
fn guarded<T>(
    server: &Server,
    client: &mut Client,
    db: &str,
    what: &str,
    run: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error>,
) -> std::result::Result<std::result::Result<T, String>, Abort> {
    match run(client) {
        Ok(v) => Ok(Ok(v)),
        Err(e) => {
            let text = pg_error_text(&e);
            if client.is_closed() {
                if server.pid().is_none() {
                    return Err(Abort(format!(
                        "the server stopped while checking {what} in database '{db}': {}",
                        server.last_error().unwrap_or(text)
                    )));
                }
                match server.connect(db, CHECK_OPTIONS) {
                    Ok(c) => *client = c,
                    Err(c) => {
                        return Err(Abort(format!("lost the connection to database '{db}' ({text}): {}", c.text)));
                    }
                }
            }
            Ok(Err(text))
        }
    }
}

/// A name and OID from a catalog listing.
struct Rel {
    oid: u32,
    name: String,
}

fn list_rels(client: &mut Client, sql: &str) -> std::result::Result<Vec<Rel>, postgres::Error> {
    Ok(client.query(sql, &[])?.iter().map(|r| Rel { oid: r.get(0), name: r.get(1) }).collect())
}

const USER_TABLES: &str = "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated)) AND c.relpersistence <> 't' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' \
     ORDER BY 2";
const ALL_TABLES: &str = "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't' ORDER BY 2";
/// Databases that accept connections (-2: left invalid by an interrupted
/// DROP DATABASE), but template0.
const DATABASES: &str = "SELECT datname::text FROM pg_database \
     WHERE datallowconn AND datconnlimit <> -2 AND datname <> 'template0' ORDER BY 1";
const BTREE_INDEXES: &str = "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
     FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
       JOIN pg_am a ON a.oid = c.relam \
     WHERE a.amname = 'btree' AND c.relkind = 'i' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready \
     ORDER BY 2";

/// The outcome of the checks.
struct Checks {
    tables: Check,
    btree: Check,
    heap: Check,
    amcheck: bool,
}

/// Checks one database. `Err` stops every check (the server is gone).
fn check_database(server: &Server, db: &str, c: &mut Checks) -> std::result::Result<(), Abort> {
    let mut client = match server.connect(db, CHECK_OPTIONS) {
        Ok(cl) => cl,
        Err(e) => {
            c.tables.fail(format!("database '{db}': cannot connect {}", e.text));
            return Ok(());
        }
    };
    match guarded(server, &mut client, db, "its tables", |cl| list_rels(cl, USER_TABLES))? {
        Ok(tables) => {
            for t in tables {
                let sql = format!("SELECT count(*) FROM {}", t.name);
                let what = format!("table {}", t.name);
                c.tables.checked += 1;
                if let Err(e) = guarded(server, &mut client, db, &what, |cl| cl.batch_execute(&sql))? {
                    c.tables.fail(format!("database '{db}': table {}: {e}", t.name));
                }
            }
        }
        Err(e) => c.tables.fail(format!("database '{db}': cannot list its tables: {e}")),
    }
    if !c.amcheck {
        return Ok(());
    }
    // On the throwaway copy only. pg_catalog keeps it clear of the
    // database's own schemas and search_path.
    let created = guarded(server, &mut client, db, "amcheck", |cl| {
        cl.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck SCHEMA pg_catalog")?;
        // An old version installed at the source may lack verify_heapam.
        let _ = cl.batch_execute("ALTER EXTENSION amcheck UPDATE");
        let row = cl.query_one(
            "SELECT quote_ident(n.nspname), EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid \
               AND p.proname = 'verify_heapam') \
             FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'amcheck'",
            &[],
        )?;
        Ok((row.get::<_, String>(0), row.get::<_, bool>(1)))
    })?;
    let (schema, heapam) = match created {
        Ok(v) => v,
        Err(e) => {
            c.btree.skip(format!("database '{db}': {e}"));
            c.heap.skip(format!("database '{db}': {e}"));
            return Ok(());
        }
    };
    match guarded(server, &mut client, db, "its indexes", |cl| list_rels(cl, BTREE_INDEXES))? {
        Ok(indexes) => {
            for i in indexes {
                let sql = format!("SELECT {schema}.bt_index_check({}::regclass)", i.oid);
                let what = format!("index {}", i.name);
                c.btree.checked += 1;
                if let Err(e) = guarded(server, &mut client, db, &what, |cl| cl.batch_execute(&sql))? {
                    c.btree.fail(format!("database '{db}': index {}: {e}", i.name));
                }
            }
        }
        Err(e) => c.btree.fail(format!("database '{db}': cannot list its indexes: {e}")),
    }
    if !heapam {
        c.heap.skip(format!("database '{db}': amcheck has no verify_heapam (PostgreSQL 14 and later)"));
        return Ok(());
    }
    match guarded(server, &mut client, db, "its tables", |cl| list_rels(cl, ALL_TABLES))? {
        Ok(tables) => {
            for t in tables {
                let sql = format!(
                    "SELECT blkno, offnum, attnum, msg FROM {schema}.verify_heapam({}::regclass, check_toast => true) \
                     LIMIT 3",
                    t.oid
                );
                let what = format!("table {}", t.name);
                c.heap.checked += 1;
                match guarded(server, &mut client, db, &what, |cl| cl.query(&sql, &[]))? {
                    Ok(rows) if rows.is_empty() => {}
                    Ok(rows) => {
                        let found: Vec<String> = rows
                            .iter()
                            .map(|r| {
                                let (blk, off, msg): (Option<i64>, Option<i32>, Option<String>) =
                                    (r.get(0), r.get(1), r.get(3));
                                format!(
                                    "block {} offset {}: {}",
                                    blk.map_or("?".into(), |b| b.to_string()),
                                    off.map_or("?".into(), |o| o.to_string()),
                                    msg.unwrap_or_default()
                                )
                            })
                            .collect();
                        c.heap.fail(format!("database '{db}': table {}: {}", t.name, found.join("; ")));
                    }
                    Err(e) => c.heap.fail(format!("database '{db}': table {}: {e}", t.name)),
                }
            }
        }
        Err(e) => c.heap.fail(format!("database '{db}': cannot list its tables: {e}")),
    }
    Ok(())
}

/// Every automatic check, database by database.
fn run_checks(server: &Server, checks: &mut Vec<Check>) -> std::result::Result<(), String> {
    let mut c = Checks {
        tables: Check::new("tables readable"),
        btree: Check::new("amcheck: B-tree indexes"),
        heap: Check::new("amcheck: heap"),
        amcheck: false,
    };
    let listed = server.connect("postgres", CHECK_OPTIONS).or_else(|_| server.connect("template1", CHECK_OPTIONS));
    let mut client = listed.map_err(|e| format!("cannot connect to the drill server {}", e.text))?;
    let dbs: Vec<String> = client
        .query(DATABASES, &[])
        .map_err(|e| format!("cannot list the databases: {}", pg_error_text(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.amcheck = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck')", &[])
        .map(|r| r.get(0))
        .unwrap_or(false);
    drop(client);
    if !c.amcheck {
        let why = "the amcheck extension is not installed on this host (postgresql-contrib)".to_string();
        c.btree.skip(why.clone());
        c.heap.skip(why);
    }
    let mut aborted = None;
    for db in &dbs {
        if let Err(Abort(why)) = check_database(server, db, &mut c) {
            aborted = Some(why);
            break;
        }
    }
    checks.extend([c.tables, c.btree, c.heap]);
    aborted.map_or(Ok(()), Err)
}

/// The `--sql` file's checks, in the `postgres` database.
fn run_sql(server: &Server, file: &Path, blocks: &[SqlBlock], checks: &mut Vec<Check>) {
    let mut c = Check::new(format!("sql '{}'", file.display()));
    let mut client = match server.connect("postgres", SQL_OPTIONS) {
        Ok(cl) => cl,
        Err(e) => {
            c.fail(format!("cannot connect to database 'postgres' {}", e.text));
            checks.push(c);
            return;
        }
    };
    for b in blocks {
        let at = format!("line {} ({})", b.line, sql_summary(&b.sql));
        let result = client.simple_query(&b.sql);
        match (&b.expected, result) {
            (None, Ok(_)) => {}
            (None, Err(e)) => {
                c.fail(format!("{at}: setup failed: {}", pg_error_text(&e)));
                c.skip("the checks after a failed setup did not run".into());
                break;
            }
            (Some(expected), Ok(messages)) => {
                c.checked += 1;
                if let Err(e) = judge(expected, &last_result(&messages)) {
                    c.fail(format!("{at}: {e}"));
                }
            }
            (Some(_), Err(e)) => {
                c.checked += 1;
                c.fail(format!("{at}: {}", pg_error_text(&e)));
                if client.is_closed() {
                    match server.connect("postgres", SQL_OPTIONS) {
                        Ok(cl) => client = cl,
                        Err(_) => {
                            c.skip("the server stopped".into());
                            break;
                        }
                    }
                }
            }
        }
    }
    checks.push(c);
}

// ---------------------------------------------------------------------------
// The drill
// ---------------------------------------------------------------------------

/// `YYYYMMDDTHHMMSSZ` of a moment (ms since the epoch).
pub fn drill_id(ms: i64) -> String {
    let whole = Timestamp::from_ms(ms.div_euclid(1000) * 1000).to_string();
    let digits: String = whole.trim_end_matches("+00").chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    format!("{date}T{time}Z")
}

/// The target in words, as the user gave it (the restore's own words
/// replace it once it has parsed it).
fn target_words(t: &RestoreTarget) -> String {
    match t {
        RestoreTarget::End => "the end of the archive".into(),
        RestoreTarget::Immediate => "the end of the backup (target 'immediate')".into(),
        RestoreTarget::Time(v) => format!("time '{v}'"),
        RestoreTarget::Lsn(v) => format!("LSN '{v}'"),
        RestoreTarget::Xid(v) => format!("transaction '{v}'"),
        RestoreTarget::Name(v) => format!("restore point '{v}'"),
    }
}

/// Errors that come from what the user asked for — a target, a backup the
/// archive does not have — rather than from the archive: refused, not
/// recorded as a failed drill.
fn is_input_error(e: &Error) -> bool {
    match e {
        Error::Restore(r) => matches!(
            r,
            RestoreError::Time(_)
                | RestoreError::Lsn(_)
                | RestoreError::Xid { .. }
                | RestoreError::RestorePointName { .. }
                | RestoreError::Timeline { .. }
                | RestoreError::Exclusive { .. }
                | RestoreError::Plan(
                    PlanError::BackupNotFound(_)
                        | PlanError::TargetBeforeBackups { .. }
                        | PlanError::TargetAfterArchive { .. }
                )
        ),
        _ => false,
    }
}

/// Where a tablespace mapping can never point: a restore given it fails
/// with [`RestoreError::TablespaceMapping`] after planning and before
/// writing anything, naming the backup the planner chose.
const PROBE_LOCATION: &str = "/nonexistent/walvault-drill-probe";

/// How a drill ended early.
enum Stop {
    /// Bad input: nothing to record.
    Refused(Error),
    /// The drill failed: recorded. Where, and why on one line.
    Failed(Stage, String),
}

/// The drill under way.
struct Run<'a> {
    config: &'a Config,
    opts: &'a DrillOptions,
    repo: &'a Repository,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    backup: Option<String>,
    target: String,
    restore_ms: Option<i64>,
    rto_ms: Option<i64>,
    checks: Vec<Check>,
    warnings: Vec<String>,
    log_tail: Vec<String>,
    server: Option<Server>,
}

impl Run<'_> {
    fn restore_options(&self, data: &Path, backup: Option<String>, map: Vec<(String, String)>) -> RestoreOptions {
        RestoreOptions {
            pgdata: data.to_path_buf(),
            target: self.opts.target.clone(),
            target_timeline: None,
            // Promote at a target, so that amcheck's CREATE EXTENSION can
            // run; at the end of the archive PostgreSQL promotes anyway.
            target_action: (self.opts.target != RestoreTarget::End).then_some(TargetAction::Promote),
            target_exclusive: false,
            backup,
            standby: false,
            force: false,
            delta: false,
            jobs: self.opts.jobs.max(1),
            tablespace_map: map,
            archive_fetch: self.opts.archive_fetch.clone(),
        }
    }

    fn classify(&mut self, e: Error) -> Stop {
        if is_input_error(&e) {
            return Stop::Refused(e);
        }
        if self.backup.is_none() {
            self.backup = match &e {
                Error::Restore(RestoreError::Plan(
                    PlanError::MissingWal { backup, .. } | PlanError::BackupNotOnTimeline { backup, .. },
                )) => Some(backup.clone()),
                _ => None,
            };
        }
        Stop::Failed(Stage::Restore, e.to_string().replace('\n', " "))
    }

    fn go(&mut self, sql: Option<&(PathBuf, Vec<SqlBlock>)>) -> std::result::Result<(), Stop> {
        let data = self.dir.join("data");

        // Which backup the planner chooses, to relocate its tablespaces
        // into the drill directory before anything is written.
        let probe = self.restore_options(
            &data,
            self.opts.backup.clone(),
            vec![(PROBE_LOCATION.to_string(), self.dir.join("probe").display().to_string())],
        );
        let backup = match restore::restore(self.config, &probe) {
            Err(Error::Restore(RestoreError::TablespaceMapping { backup, .. })) => backup,
            Err(e) => return Err(self.classify(e)),
            Ok(_) => {
                return Err(Stop::Failed(
                    Stage::Restore,
                    "internal error: the restore ignored the probe's tablespace map".into(),
                ));
            }
        };
        self.backup = Some(backup.clone());
        let manifest = match self.repo.get_manifest(&backup) {
            Ok((m, _)) => m,
            Err(e) => return Err(self.classify(e)),
        };
        let map: Vec<(String, String)> = manifest
            .tablespaces
            .iter()
            .map(|t| (t.location.clone(), self.dir.join("tablespaces").join(t.oid.to_string()).display().to_string()))
            .collect();

        // The restore: the RTO starts here.
        let started = Instant::now();
        let report = match restore::restore(self.config, &self.restore_options(&data, Some(backup), map)) {
            Ok(r) => r,
            Err(e) => return Err(self.classify(e)),
        };
        self.restore_ms = Some(elapsed_ms(started));
        self.target = report.target.clone();
        self.warnings.extend(report.warnings.iter().cloned());

        self.prepare(&data).map_err(|why| Stop::Failed(Stage::Restore, why))?;

        // The server.
        let deadline = Instant::now() + self.opts.timeout;
        let server = self.server.insert(Server {
            bin: self.bin.clone(),
            dir: self.dir.clone(),
            data: data.clone(),
            log: self.dir.join("server.log"),
            port: self.port,
            users: effective_user_name().into_iter().chain(["postgres".to_string()]).fold(Vec::new(), |mut v, u| {
                if !v.contains(&u) {
                    v.push(u);
                }
                v
            }),
            started: false,
        });
        server.start(self.opts.timeout).map_err(|(stage, why)| Stop::Failed(stage, why))?;
        server.wait_promoted(deadline).map_err(|why| Stop::Failed(Stage::Recovery, why))?;
        self.rto_ms = Some(elapsed_ms(started));

        // The checks.
        let aborted = run_checks(server, &mut self.checks).err();
        if let (None, Some((file, blocks))) = (&aborted, sql) {
            run_sql(server, file, blocks, &mut self.checks);
        }
        if let Some(why) = aborted {
            return Err(Stop::Failed(Stage::Checks, why));
        }
        let failed: Vec<&Check> = self.checks.iter().filter(|c| c.failed > 0).collect();
        if let Some(first) = failed.first() {
            let total: u64 = failed.iter().map(|c| c.failed).sum();
            let line = first.failures.first().cloned().unwrap_or_default();
            let more = match total {
                1 => String::new(),
                2 => " (and 1 more failure)".into(),
                n => format!(" (and {} more failures)", n - 1),
            };
            return Err(Stop::Failed(Stage::Checks, format!("{}: {line}{more}", first.name)));
        }
        Ok(())
    }

    /// Makes the restored configuration a drill server's.
    fn prepare(&mut self, data: &Path) -> std::result::Result<(), String> {
        let io = |what: &str, path: &Path, e: std::io::Error| format!("unable to {what} '{}': {e}", path.display());
        let conf = data.join("postgresql.conf");
        match std::fs::read_to_string(&conf) {
            Ok(text) => {
                let (text, removed) = neutralize_includes(&text, data, &|p| p.exists());
                if !removed.is_empty() {
                    std::fs::write(&conf, text).map_err(|e| io("write", &conf, e))?;
                    self.warnings.push(format!(
                        "the restored 'postgresql.conf' includes what this host does not have, left out for the \
                         drill: {}",
                        removed.join("; ")
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Debian keeps the configuration in /etc/postgresql.
                std::fs::write(
                    &conf,
                    "# written by walvault drill: the backup has no postgresql.conf (its configuration lives \
                     elsewhere, e.g. /etc/postgresql); the drill's settings are in postgresql.auto.conf\n",
                )
                .map_err(|e| io("write", &conf, e))?;
            }
            Err(e) => return Err(io("read", &conf, e)),
        }
        let hba = self.dir.join("pg_hba.conf");
        std::fs::write(&hba, DRILL_HBA).map_err(|e| io("write", &hba, e))?;
        let ident = self.dir.join("pg_ident.conf");
        std::fs::write(&ident, "").map_err(|e| io("write", &ident, e))?;

        let limits = match Command::new(self.bin.join("pg_controldata"))
            .arg("-D")
            .arg(data)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => parse_controldata(&String::from_utf8_lossy(&o.stdout)),
            Ok(o) => {
                self.warnings.push(format!(
                    "pg_controldata failed ({}): the drill server keeps the restored connection and worker limits",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                ControlLimits::default()
            }
            Err(e) => {
                self.warnings.push(format!(
                    "cannot run '{}' ({e}): the drill server keeps the restored connection and worker limits",
                    self.bin.join("pg_controldata").display()
                ));
                ControlLimits::default()
            }
        };
        let auto = data.join("postgresql.auto.conf");
        let block = drill_settings(&DrillServer { dir: &self.dir, port: self.port, limits });
        let mut f =
            std::fs::OpenOptions::new().append(true).create(true).open(&auto).map_err(|e| io("open", &auto, e))?;
        f.write_all(format!("\n{block}").as_bytes()).map_err(|e| io("write", &auto, e))?;
        Ok(())
    }
}

fn elapsed_ms(since: Instant) -> i64 {
    i64::try_from(since.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// A port the system reports free on the loopback (the server listens on
/// no TCP port; a free one just keeps names unambiguous).
fn pick_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).map_or(54_329, |a| a.port())
}

/// The longest socket path PostgreSQL accepts: `sun_path` minus its NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Checks that a drill directory path can be handed to `pg_ctl` (which
/// puts it in double quotes for a shell), to `unix_socket_directories`
/// (a comma-separated list) and to the kernel (socket path length).
pub fn check_drill_path(dir: &Path, port: u16) -> std::result::Result<(), String> {
    let text = dir.to_str().ok_or("the path is not UTF-8")?;
    if let Some(c) = text.chars().find(|c| !(c.is_ascii_alphanumeric() || "/._-+@:~".contains(*c))) {
        return Err(format!(
            "the path holds {c:?}: only letters, digits and / . _ - + @ : ~ are safe for pg_ctl and the socket"
        ));
    }
    let socket = format!("{text}/.s.PGSQL.{port}");
    if socket.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the server's socket '{socket}' would be {} bytes long, over the {MAX_SOCKET_PATH} a unix socket allows",
            socket.len()
        ));
    }
    Ok(())
}

fn load_sql(path: &Path) -> std::result::Result<Vec<SqlBlock>, DrillError> {
    let text = std::fs::read_to_string(path).map_err(|source| DrillError::SqlRead { path: path.into(), source })?;
    parse_sql_checks(&text).map_err(|(line, detail)| DrillError::SqlFile { path: path.into(), line, detail })
}

/// Records a drill: in the repository (the truth), then in the catalog
/// when it indexes this repository and cluster (a failure is a warning).
fn record(config: &Config, repo: &Repository, d: &DrillRecord, warnings: &mut Vec<String>) -> Result<()> {
    repo.put_drill(d)?;
    let location = repo.location();
    match Catalog::open_existing(&config.catalog) {
        Ok(catalog) => match catalog.cluster() {
            Ok(Some(c)) if c.name == repo.cluster() && c.repository == location => {
                if let Err(e) = catalog.record_drill(d) {
                    warnings.push(format!(
                        "{e}: the drill is recorded in the repository; 'walvault catalog rebuild' indexes it"
                    ));
                }
            }
            Ok(_) => warnings.push(format!(
                "catalog '{}' does not index cluster '{}' of repository '{location}': the drill is recorded in the \
                 repository only",
                config.catalog.display(),
                repo.cluster()
            )),
            Err(e) => warnings.push(format!("{e}: the drill is recorded in the repository only")),
        },
        Err(e) => warnings.push(format!("{e}: the drill is recorded in the repository only")),
    }
    Ok(())
}

/// Restores a backup into a temporary directory, starts PostgreSQL on it,
/// waits until recovery reaches the target, checks the data, throws it all
/// away and records the outcome (see the module documentation).
///
/// # Errors
/// Before anything is written: running as root, no PostgreSQL programs of
/// the cluster's version, an unreadable or malformed `--sql` file, a drill
/// directory that exists or cannot be used, a target or backup the archive
/// does not have, an unreachable repository. Those are not recorded. After
/// that, a failed drill is recorded and returned as [`DrillError::Failed`]
/// (until `Error::Drill` exists, inside an [`Error::PgData`]); a drill that
/// passed but cannot be recorded in the repository returns that error.
pub fn drill(config: &Config, opts: &DrillOptions) -> Result<DrillReport> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Err(lift(DrillError::Root, None));
    }
    if opts.port == Some(0) {
        return Err(lift(DrillError::Port, None));
    }
    let sql = match &opts.sql {
        Some(p) => Some((p.clone(), load_sql(p).map_err(|e| lift(e, None))?)),
        None => None,
    };
    let repo = Repository::open_config(config)?;
    let cluster = repo.cluster_info()?;
    // Held for the whole drill, not just its restore: the recovery reads
    // WAL from the repository until the server is checked, and an expire
    // that removed the backup meanwhile would fail the drill for nothing.
    let mut lock_warnings = Vec::new();
    let _lock = crate::lock::shared_for_reading(config, "drill", &mut lock_warnings)?;
    let major = cluster.identity.pg_version.major();
    let bin = resolve_bin_dir(config.pg_bin.as_deref(), major, &probe_bin_dir, &pg_config_bindir)
        .map_err(|e| lift(e, None))?;

    let parent = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let parent = if parent.is_absolute() {
        parent
    } else {
        std::env::current_dir()
            .map(|d| d.join(&parent))
            .map_err(|e| lift(DrillError::Directory { path: parent.clone(), reason: e.to_string() }, None))?
    };
    let port = opts.port.unwrap_or_else(pick_port);
    let started_at_ms = now_ms();
    let id = drill_id(started_at_ms);
    let path = parent.join(format!("walvault-drill-{id}"));
    check_drill_path(&path, port).map_err(|reason| lift(DrillError::Directory { path: path.clone(), reason }, None))?;
    match std::fs::DirBuilder::new().mode(0o700).create(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(lift(DrillError::DirectoryTaken { path }, None));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(lift(DrillError::Directory { path: parent, reason: "it does not exist".into() }, None));
        }
        Err(e) => return Err(lift(DrillError::Directory { path, reason: e.to_string() }, None)),
    }
    let mut dir = DrillDir { path: path.clone(), keep: opts.keep, removed: false };

    let mut run = Run {
        config,
        opts,
        repo: &repo,
        bin,
        dir: path.clone(),
        port,
        backup: opts.backup.clone(),
        target: target_words(&opts.target),
        restore_ms: None,
        rto_ms: None,
        checks: Vec::new(),
        warnings: lock_warnings,
        log_tail: Vec::new(),
        server: None,
    };
    let outcome = run.go(sql.as_ref());
    let (failed_at, failure) = match outcome {
        Ok(()) => (None, None),
        Err(Stop::Refused(e)) => {
            // Nothing worth keeping was written.
            dir.keep = false;
            return Err(e);
        }
        Err(Stop::Failed(stage, why)) => (Some(stage), Some(why)),
    };
    if let Some(server) = run.server.as_mut() {
        // The log explains a server that did not start, did not reach the
        // target or stopped; failed checks are listed one by one already.
        if matches!(failed_at, Some(Stage::Start | Stage::Recovery)) || (failure.is_some() && server.pid().is_none()) {
            run.log_tail = server.log_tail(20);
        }
        if let Err(e) = server.stop() {
            run.warnings.push(e);
        }
    }
    drop(run.server.take());
    if let Err(e) = dir.remove() {
        run.warnings.push(e);
    }
    let finished_at_ms = now_ms();
    let ok = failure.is_none();
    let checked: Vec<String> = run
        .checks
        .iter()
        .map(|c| format!("{} {}{}", c.name, c.checked, if c.skipped.is_some() { " (partly skipped)" } else { "" }))
        .collect();
    let detail = match &failure {
        Some(f) => f.clone(),
        None => format!("passed: {}", checked.join(", ")),
    };
    let mut report = DrillReport {
        id: id.clone(),
        backup: run.backup.clone().unwrap_or_default(),
        target: run.target.clone(),
        ok,
        failure,
        failed_at,
        started_at: Timestamp::from_ms(started_at_ms.div_euclid(1000) * 1000).to_string(),
        started_at_ms,
        finished_at_ms,
        restore_ms: run.restore_ms,
        rto_ms: run.rto_ms,
        checks: std::mem::take(&mut run.checks),
        port,
        kept: opts.keep.then(|| path.clone()),
        log: (opts.keep && path.join("server.log").exists()).then(|| path.join("server.log")),
        log_tail: std::mem::take(&mut run.log_tail),
        warnings: std::mem::take(&mut run.warnings),
    };
    let rec = DrillRecord {
        id,
        backup: report.backup.clone(),
        target: report.target.clone(),
        started_at_ms,
        finished_at_ms,
        ok,
        rto_ms: report.rto_ms.unwrap_or(0),
        detail,
    };
    match record(config, &repo, &rec, &mut report.warnings) {
        Ok(()) => {}
        Err(e) if ok => return Err(e),
        Err(e) => report.warnings.push(format!("the failed drill could not be recorded: {e}")),
    }
    if ok { Ok(report) } else { Err(lift(DrillError::Failed(Box::new(report)), Some(&path))) }
}

/// One line about a recorded drill, for `walvault info`:
/// `2026-11-21 14:30:00+00 backup '…' to the end of the archive: passed, RTO 12.3s`.
pub fn describe_record(d: &DrillRecord) -> String {
    let when = Timestamp::from_ms(d.started_at_ms.div_euclid(1000) * 1000);
    let outcome = if d.ok { format!("passed, RTO {}", human_ms(d.rto_ms)) } else { format!("FAILED: {}", d.detail) };
    format!("{when} backup '{}' to {}: {outcome}", d.backup, d.target)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sql_file_blocks() {
        let text = "-- a comment\nSET search_path = shop;\n-- expect: 1000\nSELECT count(*)\n  FROM orders;\n\
                    -- Expect : t\nSELECT true;\n-- expected results end here\n";
        let b = parse_sql_checks(text).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].line, b[0].expected.as_deref()), (1, None));
        assert!(b[0].sql.contains("SET search_path"));
        assert_eq!((b[1].line, b[1].expected.as_deref()), (3, Some("1000")));
        assert_eq!(b[1].sql, "SELECT count(*)\n  FROM orders;\n");
        assert_eq!((b[2].line, b[2].expected.as_deref()), (6, Some("t")));
        assert!(b[2].sql.contains("-- expected results end here"), "a plain comment stays SQL");
        assert_eq!(sql_summary(&b[1].sql), "SELECT count(*)");
    }

    #[test]
    fn sql_file_without_setup_and_errors() {
        let b = parse_sql_checks("-- only comments\n\n-- expect: NULL\nSELECT NULL").unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].expected.as_deref(), Some("NULL"));
        assert_eq!(parse_sql_checks("").unwrap_err().0, 0);
        assert_eq!(parse_sql_checks("-- nothing\n").unwrap_err().0, 0);
        let (line, e) = parse_sql_checks("SELECT 1;\n-- expect: 1\n-- expect: 2\nSELECT 2;").unwrap_err();
        assert_eq!(line, 2);
        assert!(e.contains("no query"), "{e}");
        let (line, e) = parse_sql_checks("-- expect 5\nSELECT 5;").unwrap_err();
        assert_eq!(line, 1);
        assert!(e.contains("-- expect: VALUE"), "{e}");
        let (line, e) = parse_sql_checks("SELECT 1;\n--expect:   \nSELECT 2;").unwrap_err();
        assert_eq!(line, 2);
        assert!(e.contains("without a value"), "{e}");
        assert!(parse_sql_checks("-- expect: 1\n-- just a comment\n").is_err());
        // Only setup: it must succeed, nothing to compare.
        assert_eq!(parse_sql_checks("SELECT 1;").unwrap()[0].expected, None);
    }

    fn rows(v: &[&[Option<&str>]]) -> LastResult {
        LastResult::Rows {
            columns: v.first().map_or(1, |r| r.len()),
            rows: v.iter().map(|r| r.iter().map(|c| c.map(str::to_string)).collect()).collect(),
        }
    }

    #[test]
    fn expectations() {
        assert!(judge("1000", &rows(&[&[Some("1000")]])).is_ok());
        assert!(judge("ab", &rows(&[&[Some("ab   ")]])).is_ok(), "char(n) padding");
        assert!(judge("t", &rows(&[&[Some("t")]])).is_ok());
        assert!(judge("true", &rows(&[&[Some("t")]])).is_ok());
        assert!(judge("FALSE", &rows(&[&[Some("f")]])).is_ok());
        assert!(judge("NULL", &rows(&[&[None]])).is_ok());
        assert_eq!(judge("t", &rows(&[&[None]])).unwrap_err(), "expected 't', got NULL");
        assert_eq!(judge("1000", &rows(&[&[Some("999")]])).unwrap_err(), "expected '1000', got '999'");
        assert_eq!(judge("1", &rows(&[&[Some("1")], &[Some("2")]])).unwrap_err(), "expected '1', got 2 rows");
        assert_eq!(judge("1", &LastResult::Rows { columns: 1, rows: vec![] }).unwrap_err(), "expected '1', got 0 rows");
        assert_eq!(judge("1", &rows(&[&[Some("1"), Some("2")]])).unwrap_err(), "expected '1', got 2 columns");
        assert!(judge("1", &LastResult::NoRows).unwrap_err().contains("must be a query"));
        assert!(!value_matches("t", Some("true")), "only PostgreSQL's own boolean text is widened");
    }

    #[test]
    fn settings_block() {
        let limits = ControlLimits {
            max_connections: Some(200),
            max_worker_processes: Some(16),
            max_wal_senders: Some(10),
            max_prepared_transactions: Some(0),
            max_locks_per_transaction: None,
        };
        let s = drill_settings(&DrillServer { dir: Path::new("/tmp/walvault-drill-X"), port: 54321, limits });
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], DRILL_BLOCK_COMMENT);
        for want in [
            "archive_mode = off",
            "listen_addresses = ''",
            "unix_socket_directories = '/tmp/walvault-drill-X'",
            "port = 54321",
            "hba_file = '/tmp/walvault-drill-X/pg_hba.conf'",
            "primary_conninfo = ''",
            "max_logical_replication_workers = 0",
            "archive_cleanup_command = ''",
            "synchronous_standby_names = ''",
            "log_destination = 'stderr'",
            "logging_collector = off",
            "shared_buffers = '128MB'",
            "hot_standby = on",
            "max_connections = 200",
            "max_worker_processes = 16",
            "max_prepared_transactions = 0",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{s}");
        }
        assert!(!s.contains("max_locks_per_transaction"), "unknown limits are left alone");
        let small = drill_settings(&DrillServer { dir: Path::new("/d"), port: 1, limits: ControlLimits::default() });
        assert!(small.lines().any(|l| l == "max_connections = 20"), "{small}");
        assert_eq!(quote_conf("it's a\\b\n"), "'it''s a\\\\b\\n'");
    }

    #[test]
    fn controldata() {
        let text = "pg_control version number:            1300\n\
                    max_connections setting:              100\n\
                    max_worker_processes setting:         8\n\
                    max_wal_senders setting:              10\n\
                    max_prepared_xacts setting:           0\n\
                    max_locks_per_xact setting:           64\n\
                    Latest checkpoint's REDO WAL file:    000000010000000000000002\n";
        let l = parse_controldata(text);
        assert_eq!(
            l,
            ControlLimits {
                max_connections: Some(100),
                max_worker_processes: Some(8),
                max_wal_senders: Some(10),
                max_prepared_transactions: Some(0),
                max_locks_per_transaction: Some(64),
            }
        );
    }

    #[test]
    fn includes_of_the_source_host_are_left_out() {
        let conf = "shared_buffers = 1GB\ninclude 'here.conf'\ninclude_dir = '/etc/postgresql/15/main/conf.d'\n\
                    INCLUDE /etc/missing.conf # trailing\ninclude_if_exists '/nope.conf'\n#include 'x'\n\
                    include 'it''s.conf'\n";
        let exists = |p: &Path| p == Path::new("/data/here.conf");
        let (out, removed) = neutralize_includes(conf, Path::new("/data"), &exists);
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(out.contains("\ninclude 'here.conf'\n"));
        assert!(out.contains("# walvault drill: not on this host: include_dir = '/etc/postgresql/15/main/conf.d'"));
        assert!(out.contains("# walvault drill: not on this host: INCLUDE /etc/missing.conf"));
        assert!(out.contains("\ninclude_if_exists '/nope.conf'\n"));
        assert!(out.contains("\n#include 'x'\n"));
        assert_eq!(include_target("include 'it''s.conf'").as_deref(), Some("it's.conf"));
        assert_eq!(include_target("include_dir='conf.d'").as_deref(), Some("conf.d"));
        assert_eq!(include_target("included_setting = 1"), None);
    }

    #[test]
    fn bin_dir_resolution() {
        let none = || None;
        let debian = |d: &Path| {
            if d == Path::new("/usr/lib/postgresql/15/bin") {
                BinProbe::Usable(Some(15))
            } else {
                BinProbe::Unusable("has no 'pg_ctl'".into())
            }
        };
        assert_eq!(resolve_bin_dir(None, 15, &debian, &none).unwrap(), PathBuf::from("/usr/lib/postgresql/15/bin"));
        // Configured: only it, and its version must match.
        let e = resolve_bin_dir(Some(Path::new("/opt/pg")), 15, &debian, &none).unwrap_err().to_string();
        assert!(e.contains("pg-bin '/opt/pg' has no 'pg_ctl'"), "{e}");
        let any16 = |_: &Path| BinProbe::Usable(Some(16));
        let e = resolve_bin_dir(Some(Path::new("/opt/pg")), 15, &any16, &none).unwrap_err().to_string();
        assert!(e.contains("holds PostgreSQL 16"), "{e}");
        let unknown = |_: &Path| BinProbe::Usable(None);
        assert_eq!(resolve_bin_dir(Some(Path::new("/opt/pg")), 15, &unknown, &none).unwrap(), PathBuf::from("/opt/pg"));
        // pg_config as the last resort.
        let only_local = |d: &Path| {
            if d == Path::new("/usr/local/pgsql/bin") {
                BinProbe::Usable(Some(17))
            } else {
                BinProbe::Unusable("does not exist".into())
            }
        };
        let local = || Some(PathBuf::from("/usr/local/pgsql/bin"));
        assert_eq!(resolve_bin_dir(None, 17, &only_local, &local).unwrap(), PathBuf::from("/usr/local/pgsql/bin"));
        let e = resolve_bin_dir(None, 15, &only_local, &local).unwrap_err().to_string();
        assert!(
            e.contains("no PostgreSQL 15 programs")
                && e.contains("/usr/lib/postgresql/15/bin")
                && e.contains("/usr/pgsql-15/bin")
                && e.contains("holds PostgreSQL 17"),
            "{e}"
        );
        let e = resolve_bin_dir(None, 15, &only_local, &none).unwrap_err().to_string();
        assert!(e.contains("no pg_config in PATH"), "{e}");
        assert_eq!(version_major("pg_ctl (PostgreSQL) 15.10 (Debian 15.10-1.pgdg120+1)\n"), Some(15));
        assert_eq!(version_major("pg_ctl (PostgreSQL) 16beta1"), Some(16));
        assert_eq!(version_major("nonsense"), None);
    }

    #[test]
    fn ids_paths_and_words() {
        assert_eq!(drill_id(0), "19700101T000000Z");
        assert_eq!(drill_id(1_795_271_400_123), "20261121T143000Z");
        assert!(check_drill_path(Path::new("/tmp/walvault-drill-20261121T143000Z"), 65535).is_ok());
        assert!(check_drill_path(Path::new("/tmp/my drills/x"), 5432).unwrap_err().contains("' '"));
        assert!(check_drill_path(Path::new("/tmp/a'b"), 5432).is_err());
        let long = format!("/{}", "d".repeat(100));
        assert!(check_drill_path(Path::new(&long), 5432).unwrap_err().contains("107"));
        assert_eq!(human_ms(12_345), "12.3s");
        assert_eq!(human_ms(245_000), "4m05s");
        assert_eq!(human_ms(7_380_000), "2h03m");
        let d = DrillRecord {
            id: "20261121T143000Z".into(),
            backup: "20261121T120000Z".into(),
            target: "the end of the archive".into(),
            started_at_ms: 1_795_271_400_123,
            finished_at_ms: 1_795_271_460_000,
            ok: true,
            rto_ms: 12_345,
            detail: "passed".into(),
        };
        assert_eq!(
            describe_record(&d),
            "2026-11-21 14:30:00+00 backup '20261121T120000Z' to the end of the archive: passed, RTO 12.3s"
        );
    }

    #[test]
    fn failed_report_message_and_hint() {
        let report = DrillReport {
            id: "20261121T143000Z".into(),
            backup: "20261121T120000Z".into(),
            target: "the end of the archive".into(),
            ok: false,
            failure: Some("unable to restore 'base/5/1259': data object 'x' is corrupt".into()),
            failed_at: Some(Stage::Restore),
            started_at: "2026-11-21 14:30:00+00".into(),
            started_at_ms: 0,
            finished_at_ms: 0,
            restore_ms: None,
            rto_ms: None,
            checks: vec![],
            port: 5432,
            kept: None,
            log: None,
            log_tail: vec![],
            warnings: vec![],
        };
        let e = DrillError::Failed(Box::new(report));
        assert_eq!(
            e.to_string(),
            "drill 20261121T143000Z of backup '20261121T120000Z' failed: unable to restore 'base/5/1259': data \
             object 'x' is corrupt"
        );
        assert!(e.hint().unwrap().contains("--backup ID"));
        assert!(e.report().unwrap().to_string().contains("FAILED"));
        assert!(DrillError::Root.hint().unwrap().contains("runuser -u postgres"));
    }
}
