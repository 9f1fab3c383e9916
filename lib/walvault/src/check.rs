//! `walvault check`: does this PostgreSQL server archive its WAL into this
//! repository, and how fast?
//!
//! Connects the way `walvault backup` does ([`crate::backup::PgEnv`] and
//! `--dbname`), then checks that the server is the repository's cluster,
//! that `archive_mode`, `wal_level`, `archive_library` and
//! `archive_command` send WAL through `archive-push` to this repository
//! and cluster name, and finally proves it: writes a tiny WAL record,
//! forces a segment switch (`pg_switch_wal()`), and waits until that
//! segment is in the repository. The time it takes is the archiving lag.
//!
//! The settings are read with `SHOW`-equivalents and `archive_command` is
//! parsed as the shell would split it, so `--repository`, `--cluster` and
//! `--config` (and a `WALVAULT_CONFIG=` assignment) are understood; what
//! the server's own environment says (its `WALVAULT_CONFIG`, the default
//! configuration file) cannot be seen from here and is reported as a note.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use walvault_formats::wal::WalFileName;

use crate::backup::session::{self, Session};
use crate::backup::{BackupError, PgEnv, archive_reason};
use crate::catalog::Catalog;
use crate::config::{Config, DEFAULT_CONFIG, Overrides};
use crate::error::{Error, Result};
use crate::info::{Newest, format_utc};
use crate::repo::{ClusterInfo, Repository, now_ms};

/// How often the repository is polled for the switched segment: from
/// `POLL_FIRST`, doubling up to `POLL_MAX`, so that a fast archiver's lag is
/// measured to within a few milliseconds without polling a slow one hard.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(200);

/// How to reach the server, and how long to wait for archiving.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// libpq connection string or URI (`--dbname`); `None` uses the `PG*`
    /// environment.
    pub connection: Option<String>,
    /// The libpq environment ([`PgEnv::from_process`]).
    pub env: PgEnv,
    /// How long to wait for the switched segment to reach the repository.
    pub timeout: Duration,
}

/// Why the checks could not be made at all. A check that fails is not an
/// error: it is a [`CheckStatus::Failed`] item of the report.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The connection settings are unusable or the server cannot be
    /// reached.
    #[error(transparent)]
    Connect(BackupError),
    /// The server refused a query or the session ended.
    #[error("PostgreSQL '{target}' failed while {during}: {detail}")]
    Query {
        /// Where.
        target: String,
        /// What check was doing.
        during: &'static str,
        /// The server's or the driver's message.
        detail: String,
    },
}

impl CheckError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            CheckError::Connect(e) => e.hint(),
            CheckError::Query { .. } => Some(
                "walvault check needs a superuser, or a role that may read pg_control_system() and \
                 pg_stat_archiver (pg_monitor) and is granted EXECUTE on pg_switch_wal and \
                 pg_logical_emit_message"
                    .into(),
            ),
        }
    }
}

/// Until `error.rs` has `Error::Check(#[from] CheckError)`: the closest
/// existing error. Then this becomes `Error::Check(e)`.
fn into_error(e: CheckError) -> Error {
    Error::Check(e)
}

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// Passed.
    Ok,
    /// Failed: archiving into this repository does not work, or will not.
    Failed,
    /// Could not be decided from here, or does not apply; not a failure.
    Note,
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Failed => "failed",
            CheckStatus::Note => "note",
        })
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckItem {
    /// What was checked: `cluster identity`, `archive_mode`, `wal_level`,
    /// `archive_library`, `archive_command`, `archiving`.
    pub check: String,
    /// The verdict.
    pub status: CheckStatus,
    /// What was found, and what to do when it failed.
    pub detail: String,
}

fn item(check: &str, status: CheckStatus, detail: impl Into<String>) -> CheckItem {
    CheckItem { check: check.into(), status, detail: detail.into() }
}

/// `pg_stat_archiver`, as read after the wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiverStats {
    /// Files archived since the statistics were reset.
    pub archived_count: i64,
    /// The last file archived.
    pub last_archived_wal: Option<String>,
    /// When.
    pub last_archived_time: Option<String>,
    /// Failed attempts since the statistics were reset.
    pub failed_count: i64,
    /// The last file that failed.
    pub last_failed_wal: Option<String>,
    /// When.
    pub last_failed_time: Option<String>,
    /// When the statistics were reset.
    pub stats_reset: Option<String>,
}

/// What `walvault check` found; serialized as-is for `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    /// The server (a conninfo string without password).
    pub server: String,
    /// Repository location.
    pub repository: String,
    /// Cluster name.
    pub cluster: String,
    /// Every check, in order.
    pub checks: Vec<CheckItem>,
    /// The segment `pg_switch_wal()` completed, when the switch was made.
    pub switched_segment: Option<String>,
    /// How long after the switch the segment was in the repository, ms:
    /// the archiving lag (polled at most 200 ms apart, more often at first).
    pub archive_lag_ms: Option<u64>,
    /// The archiver's statistics.
    pub archiver: Option<ArchiverStats>,
    /// The newest file the catalog knows, if the catalog indexes this
    /// repository's cluster.
    pub newest_archived: Option<Newest>,
}

impl CheckReport {
    /// Whether no check failed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != CheckStatus::Failed)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "server '{}', repository '{}', cluster '{}'", self.server, self.repository, self.cluster)?;
        for c in &self.checks {
            writeln!(f, "{}: {}: {}", c.status, c.check, c.detail)?;
        }
        if let Some(a) = &self.archiver {
            let when = |wal: &Option<String>, time: &Option<String>| match (wal, time) {
                (Some(w), Some(t)) => format!(", last '{w}' at {t}"),
                (Some(w), None) => format!(", last '{w}'"),
                _ => String::new(),
            };
            writeln!(
                f,
                "archiver: {} archived{}; {} failed{}{}",
                a.archived_count,
                when(&a.last_archived_wal, &a.last_archived_time),
                a.failed_count,
                when(&a.last_failed_wal, &a.last_failed_time),
                a.stats_reset.as_ref().map(|r| format!(" (since {r})")).unwrap_or_default()
            )?;
        }
        if let Some(n) = &self.newest_archived {
            writeln!(f, "newest in the catalog: '{}', archived {} ({} s ago)", n.name, n.archived_at, n.age_seconds)?;
        }
        let failed = self.checks.iter().filter(|c| c.status == CheckStatus::Failed).count();
        match failed {
            0 => write!(f, "check passed"),
            1 => write!(f, "check failed: 1 check failed"),
            n => write!(f, "check failed: {n} checks failed"),
        }
    }
}

/// The archive-push call an `archive_command` makes, as far as its
/// arguments tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PushCall {
    /// `--config FILE`.
    pub config: Option<String>,
    /// A `WALVAULT_CONFIG=FILE` assignment before the command.
    pub env_config: Option<String>,
    /// `--repository PATH`.
    pub repository: Option<String>,
    /// `--cluster NAME`.
    pub cluster: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    /// `;`, `&`, `|`, `&&`, `||`, `(`, `)`, a newline: ends a simple command.
    Separator,
}

/// Splits a command line as `sh` would, enough to find a program and its
/// arguments: quotes, backslashes and command separators. Expansions are
/// left as written.
fn shell_words(cmd: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = cmd.chars().peekable();
    let flush = |out: &mut Vec<Token>, cur: &mut String, in_word: &mut bool| {
        if *in_word {
            out.push(Token::Word(std::mem::take(cur)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            ';' | '&' | '|' | '(' | ')' | '\n' => {
                flush(&mut out, &mut cur, &mut in_word);
                out.push(Token::Separator);
            }
            c if c.is_whitespace() => flush(&mut out, &mut cur, &mut in_word),
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.peek() {
                            Some(&n @ ('"' | '\\' | '$' | '`')) => {
                                cur.push(n);
                                chars.next();
                            }
                            _ => cur.push('\\'),
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next().filter(|&n| n != '\n') {
                    cur.push(n);
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    flush(&mut out, &mut cur, &mut in_word);
    out
}

fn is_assignment(word: &str) -> Option<(&str, &str)> {
    let (name, value) = word.split_once('=')?;
    let ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then_some((name, value))
}

/// Finds the `archive-push` call in an `archive_command`: the first word
/// named `archive-push` (any directory), its options, and a
/// `WALVAULT_CONFIG=` assignment before it in the same simple command (as
/// in `WALVAULT_CONFIG=/etc/x.toml archive-push %p` or `env ...`). A word
/// holding a whole command (`sh -c "archive-push %p"`) is searched too.
pub(crate) fn find_push(cmd: &str) -> Option<PushCall> {
    let tokens = shell_words(cmd);
    let mut env_config: Option<String> = None;
    let mut i = 0;
    while let Some(tok) = tokens.get(i) {
        i += 1;
        let word = match tok {
            Token::Separator => {
                env_config = None;
                continue;
            }
            Token::Word(w) => w,
        };
        if let Some((name, value)) = is_assignment(word) {
            if name == "WALVAULT_CONFIG" {
                env_config = Some(value.to_string()).filter(|v| !v.is_empty());
            }
            continue;
        }
        if word.rsplit('/').next() != Some("archive-push") {
            if word.contains(char::is_whitespace)
                && let Some(inner) = find_push(word)
            {
                return Some(PushCall { env_config: inner.env_config.or(env_config), ..inner });
            }
            continue;
        }
        let mut call = PushCall { env_config, ..PushCall::default() };
        let mut args = tokens[i..].iter().map_while(|t| match t {
            Token::Word(w) => Some(w.as_str()),
            Token::Separator => None,
        });
        while let Some(arg) = args.next() {
            for (flag, slot) in [
                ("--config", &mut call.config),
                ("--repository", &mut call.repository),
                ("--cluster", &mut call.cluster),
            ] {
                if arg == flag {
                    *slot = args.next().map(str::to_string);
                } else if let Some(v) = arg.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
                    *slot = Some(v.to_string());
                }
            }
        }
        return Some(call);
    }
    None
}

/// Whether two repository locations are the same directory.
fn same_location(a: &str, b: &str) -> bool {
    let trim = |s: &str| {
        let t = s.trim_end_matches('/');
        if t.is_empty() { "/".to_string() } else { t.to_string() }
    };
    if trim(a) == trim(b) {
        return true;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Judges `archive_command` against the repository and cluster of
/// `config`. Returns the item and whether WAL certainly goes elsewhere
/// (then waiting for it is pointless).
pub(crate) fn judge_archive_command(cmd: &str, config: &Config) -> (CheckItem, bool) {
    const CHECK: &str = "archive_command";
    let cmd = cmd.trim();
    if cmd.is_empty() {
        let detail = "is empty, so PostgreSQL archives nothing: set archive_command = 'archive-push %p' and reload \
                      PostgreSQL";
        return (item(CHECK, CheckStatus::Failed, detail), true);
    }
    let Some(call) = find_push(cmd) else {
        let detail = format!(
            "'{cmd}' does not call archive-push: set archive_command = 'archive-push %p' (a script that calls it \
             cannot be checked; the WAL switch shows whether WAL arrives)"
        );
        return (item(CHECK, CheckStatus::Failed, detail), false);
    };
    let file = call.config.clone().or(call.env_config.clone());
    let (repository, cluster) = match &file {
        Some(f) => {
            let overrides = Overrides {
                config: Some(PathBuf::from(f)),
                repository: call.repository.clone(),
                cluster: call.cluster.clone(),
                catalog: None,
                repo: None,
            };
            match Config::load(&overrides, None) {
                // With several repositories, archive-push stores into each:
                // the one checked here is the one that counts.
                Ok(c) => {
                    let mine = c.repositories.iter().find(|r| same_location(&r.location, &config.repository));
                    (Some(mine.map_or(c.repository.clone(), |r| r.location.clone())), Some(c.cluster))
                }
                Err(e) => {
                    let detail = format!("'{cmd}' runs archive-push with a configuration check cannot load: {e}");
                    return (item(CHECK, CheckStatus::Failed, detail), false);
                }
            }
        }
        None => (call.repository.clone(), call.cluster.clone()),
    };
    if let Some(r) = repository.as_deref().filter(|r| !same_location(r, &config.repository)) {
        let detail =
            format!("'{cmd}' stores WAL into repository '{r}', not '{}': fix archive_command", config.repository);
        return (item(CHECK, CheckStatus::Failed, detail), true);
    }
    if let Some(c) = cluster.as_deref().filter(|c| *c != config.cluster) {
        let detail = format!(
            "'{cmd}' stores WAL under cluster name '{c}', not '{}' (repository '{}'): fix archive_command",
            config.cluster, config.repository
        );
        return (item(CHECK, CheckStatus::Failed, detail), true);
    }
    let unseen = format!(
        "which check cannot see (the server's WALVAULT_CONFIG, else '{DEFAULT_CONFIG}'); the WAL switch shows \
         where WAL goes"
    );
    let judged = match (repository, cluster) {
        (Some(r), Some(c)) => {
            item(CHECK, CheckStatus::Ok, format!("'{cmd}' stores WAL into repository '{r}', cluster '{c}'"))
        }
        (Some(r), None) => item(
            CHECK,
            CheckStatus::Note,
            format!(
                "'{cmd}' stores WAL into repository '{r}', under the cluster name of the server's configuration, {unseen}"
            ),
        ),
        (None, _) => item(
            CHECK,
            CheckStatus::Note,
            format!(
                "'{cmd}' gives archive-push neither --config nor --repository: it uses the server's configuration, {unseen}"
            ),
        ),
    };
    (judged, false)
}

/// The server is the repository's cluster: same system identifier, major
/// version and segment size.
fn judge_identity(server: &session::ServerInfo, cluster: &ClusterInfo, repo: &str) -> CheckItem {
    const CHECK: &str = "cluster identity";
    let ours = &cluster.identity;
    let failed = if server.system_id != ours.system_id.0 {
        Some(format!(
            "the server's system identifier is {}, cluster '{}' of repository '{repo}' holds {}: this server \
             archives into the wrong cluster name, or check talks to the wrong server",
            server.system_id, cluster.name, ours.system_id
        ))
    } else if server.major() != ours.pg_version.major() {
        Some(format!(
            "the server runs PostgreSQL {}, cluster '{}' holds PostgreSQL {}: after a major upgrade, initialize a \
             new cluster name",
            server.major(),
            cluster.name,
            ours.pg_version
        ))
    } else if server.segment_size != ours.segment_size.bytes() {
        Some(format!(
            "the server's WAL segments are {} bytes, cluster '{}' holds {}",
            server.segment_size, cluster.name, ours.segment_size
        ))
    } else {
        None
    };
    match failed {
        Some(detail) => item(CHECK, CheckStatus::Failed, detail),
        None => item(
            CHECK,
            CheckStatus::Ok,
            format!(
                "system identifier {}, PostgreSQL {}, {} WAL segments: cluster '{}' of repository '{repo}'",
                server.system_id,
                server.major(),
                ours.segment_size,
                cluster.name
            ),
        ),
    }
}

fn judge_archive_mode(mode: &str, in_recovery: bool) -> CheckItem {
    const CHECK: &str = "archive_mode";
    match (mode, in_recovery) {
        ("always", _) | ("on", false) => item(CHECK, CheckStatus::Ok, mode),
        ("on", true) => item(
            CHECK,
            CheckStatus::Note,
            "on, and the server is a standby: only the primary archives ('always' makes a standby archive too)",
        ),
        _ => item(
            CHECK,
            CheckStatus::Failed,
            format!("{mode}: PostgreSQL archives nothing; set archive_mode = on and restart PostgreSQL"),
        ),
    }
}

fn judge_wal_level(level: &str) -> CheckItem {
    const CHECK: &str = "wal_level";
    match level {
        "replica" | "logical" => item(CHECK, CheckStatus::Ok, level),
        _ => item(
            CHECK,
            CheckStatus::Failed,
            format!("{level}: a base backup cannot be restored from such WAL; set wal_level = replica and restart"),
        ),
    }
}

fn judge_archive_library(library: &str) -> CheckItem {
    const CHECK: &str = "archive_library";
    if library.trim().is_empty() {
        item(CHECK, CheckStatus::Ok, "not set: archive_command is used")
    } else {
        item(
            CHECK,
            CheckStatus::Failed,
            format!(
                "'{library}': PostgreSQL archives through it instead of archive_command; set archive_library = '' \
                 and reload PostgreSQL"
            ),
        )
    }
}

/// A failed query, as a [`CheckError`].
fn server_err(e: BackupError) -> CheckError {
    match e {
        BackupError::Query { target, during, detail } | BackupError::ConnectionLost { target, during, detail } => {
            CheckError::Query { target, during, detail }
        }
        e => CheckError::Connect(e),
    }
}

/// Runs a one-row query and reads its columns with `get`.
fn query<T>(
    db: &mut Session,
    during: &'static str,
    sql: &str,
    get: impl FnOnce(&postgres::Row) -> std::result::Result<T, postgres::Error>,
) -> std::result::Result<T, CheckError> {
    let row = db.one(during, sql, &[]).map_err(server_err)?;
    get(&row).map_err(|e| CheckError::Query { target: db.target.clone(), during, detail: e.to_string() })
}

/// Writes a WAL record, so that the switch that follows really completes a
/// segment: with nothing written since the last switch, `pg_switch_wal()`
/// does nothing and names a segment archived long ago. A role that may not
/// emit a logical message assigns a transaction id instead (its commit
/// record is WAL); asking first keeps an ERROR out of the server's log.
fn write_wal(db: &mut Session) -> std::result::Result<(), CheckError> {
    query(
        db,
        "writing a WAL record",
        "SELECT CASE WHEN has_function_privilege('pg_catalog.pg_logical_emit_message(boolean, text, text)', \
                                                 'EXECUTE') \
                THEN pg_logical_emit_message(false, 'walvault', 'check')::text \
                ELSE txid_current()::text END",
        |_| Ok(()),
    )
}

/// `pg_stat_archiver`. The archiver counts a file only after
/// archive_command returned, a moment after the file is in the repository:
/// when `arrived` is known to be, wait up to a second for the count.
fn archiver_stats(db: &mut Session, arrived: Option<&str>) -> std::result::Result<ArchiverStats, CheckError> {
    let mut stats = read_archiver(db)?;
    for _ in 0..10 {
        match (arrived, &stats.last_archived_wal) {
            (Some(name), Some(last)) if last.as_str() < name => {}
            (Some(_), None) => {}
            _ => break,
        }
        std::thread::sleep(Duration::from_millis(100));
        stats = read_archiver(db)?;
    }
    Ok(stats)
}

fn read_archiver(db: &mut Session) -> std::result::Result<ArchiverStats, CheckError> {
    query(
        db,
        "reading pg_stat_archiver",
        "SELECT archived_count, last_archived_wal, last_archived_time::text, failed_count, last_failed_wal, \
                last_failed_time::text, stats_reset::text \
         FROM pg_stat_archiver",
        |r| {
            Ok(ArchiverStats {
                archived_count: r.try_get(0)?,
                last_archived_wal: r.try_get(1)?,
                last_archived_time: r.try_get(2)?,
                failed_count: r.try_get(3)?,
                last_failed_wal: r.try_get(4)?,
                last_failed_time: r.try_get(5)?,
                stats_reset: r.try_get(6)?,
            })
        },
    )
}

/// The newest file of the catalog, if it indexes this repository's cluster.
fn newest_in_catalog(config: &Config, repo: &Repository, now: i64) -> Option<Newest> {
    let catalog = Catalog::open_existing(&config.catalog).ok()?;
    let bound = catalog.cluster().ok()??;
    if bound.name != repo.cluster() || bound.repository != repo.location() {
        return None;
    }
    let (name, at) = catalog.newest().ok()??;
    Some(Newest { name, archived_at: format_utc(at), age_seconds: (now - at).max(0) / 1000 })
}

/// Checks that the server archives into the configured repository; see the
/// module docs.
///
/// # Errors
/// Only what prevents checking: the repository or its cluster identity
/// cannot be read, the server cannot be reached, or it refuses a query
/// (see [`CheckError`]). Failed checks are items of the report.
pub fn check(config: &Config, opts: &CheckOptions) -> Result<CheckReport> {
    let repo = Repository::open_config(config)?;
    let cluster = repo.cluster_info()?;
    let pg = session::connection_config(&opts.env, opts.connection.as_deref()).map_err(Error::Backup)?;
    let mut db = Session::connect(&pg).map_err(Error::Backup)?;
    let mut report = run(config, &repo, &cluster, &mut db, opts.timeout).map_err(into_error)?;
    if repo.is_object_store() {
        report.checks.push(judge_conditional_create(config, &repo));
    }
    report.checks.extend(judge_dropped_wal(config));
    Ok(report)
}

/// WAL that archive-push dropped (`queue-max`), from the catalog: a failed
/// check until a backup taken since makes PITR from it on intact again,
/// then a note (PITR across the gap stays impossible). Nothing when no WAL
/// was dropped.
fn judge_dropped_wal(config: &Config) -> Option<CheckItem> {
    const CHECK: &str = "dropped WAL";
    let catalog = Catalog::open_existing(&config.catalog).ok()?;
    let dropped = crate::info::dropped_wal(&catalog).ok()?;
    let latest = dropped.iter().max_by(|a, b| a.dropped_at.cmp(&b.dropped_at))?;
    let what = format!(
        "{} WAL file(s) were dropped without being archived (queue-max), last at {}: {}; PITR across them is \
         impossible",
        dropped.len(),
        latest.dropped_at,
        crate::info::dropped_runs(&dropped).join(", ")
    );
    Some(match &latest.intact_from_backup {
        None => item(
            CHECK,
            CheckStatus::Failed,
            format!("{what}: run 'walvault backup', a new full backup is needed for PITR past the gap"),
        ),
        Some(id) => item(CHECK, CheckStatus::Note, format!("{what}; PITR from backup {id} on is intact")),
    })
}

/// Probes whether the object store honours `If-None-Match: *` and records
/// the answer (the repository and the catalog), which archive-push follows.
fn judge_conditional_create(config: &Config, repo: &Repository) -> CheckItem {
    const CHECK: &str = "conditional create";
    let catalog = crate::catalog::Catalog::open(&config.catalog).ok();
    match crate::probe::probe_and_record(repo, catalog.as_ref()) {
        Ok(r) if r.honoured => item(
            CHECK,
            CheckStatus::Ok,
            "the store honours If-None-Match: archive-push stores each file with one create-only request",
        ),
        Ok(r) => item(CHECK, CheckStatus::Note, r.warnings.join("; ")),
        Err(e) => {
            item(CHECK, CheckStatus::Failed, format!("unable to probe whether the store honours If-None-Match: {e}"))
        }
    }
}

fn run(
    config: &Config,
    repo: &Repository,
    cluster: &ClusterInfo,
    db: &mut Session,
    timeout: Duration,
) -> std::result::Result<CheckReport, CheckError> {
    let server = db.server_info().map_err(server_err)?;
    let in_recovery = server.in_recovery;
    let wal_level =
        query(db, "reading wal_level", "SELECT current_setting('wal_level')", |r| r.try_get::<_, String>(0))?;
    let status = db.archiver().map_err(server_err)?;

    let identity = judge_identity(&server, cluster, &repo.location());
    let mut ready = identity.status == CheckStatus::Ok;
    let mut checks = vec![identity, judge_archive_mode(&server.archive_mode, in_recovery), judge_wal_level(&wal_level)];
    ready &= server.archive_mode != "off";
    if server.major() >= 15 {
        let library = judge_archive_library(&status.archive_library);
        ready &= library.status == CheckStatus::Ok;
        checks.push(library);
    }
    let (command, elsewhere) = judge_archive_command(&status.archive_command, config);
    ready &= !elsewhere;
    checks.push(command);

    let mut report = CheckReport {
        server: db.target.clone(),
        repository: repo.location(),
        cluster: repo.cluster().to_string(),
        checks,
        switched_segment: None,
        archive_lag_ms: None,
        archiver: None,
        newest_archived: None,
    };
    const CHECK: &str = "archiving";
    if in_recovery {
        report.checks.push(item(
            CHECK,
            CheckStatus::Note,
            "not tested: a standby cannot switch WAL segments (run check against the primary)",
        ));
    } else if !ready {
        report.checks.push(item(CHECK, CheckStatus::Note, "not tested: a check above failed"));
    } else if let (false, user) = query(
        db,
        "reading privileges",
        "SELECT has_function_privilege('pg_catalog.pg_switch_wal()', 'EXECUTE'), current_user::text",
        |r| Ok((r.try_get::<_, bool>(0)?, r.try_get::<_, String>(1)?)),
    )? {
        report.checks.push(item(
            CHECK,
            CheckStatus::Failed,
            format!(
                "not tested: role '{user}' may not execute pg_switch_wal(); run check as a superuser, or GRANT \
                 EXECUTE ON FUNCTION pg_switch_wal() TO \"{user}\""
            ),
        ));
    } else {
        write_wal(db)?;
        let name: String =
            query(db, "switching WAL segments (pg_switch_wal)", "SELECT pg_walfile_name(pg_switch_wal())", |r| {
                r.try_get(0)
            })?;
        let switched = Instant::now();
        let parsed: WalFileName = match name.parse() {
            Ok(n) => n,
            Err(e) => {
                return Err(CheckError::Query {
                    target: db.target.clone(),
                    during: "switching WAL segments (pg_switch_wal)",
                    detail: format!("pg_walfile_name returned {e}"),
                });
            }
        };
        let key = repo.wal_key(&parsed);
        let deadline = switched + timeout;
        let mut poll = POLL_FIRST;
        let arrived = loop {
            match repo.storage().head(&key) {
                Ok(Some(_)) => break Ok(switched.elapsed()),
                Ok(None) => {}
                Err(e) => break Err(Some(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(None);
            }
            std::thread::sleep(poll.min(deadline - now));
            poll = (poll * 2).min(POLL_MAX);
        };
        report.switched_segment = Some(name.clone());
        match arrived {
            Err(Some(e)) => report.checks.push(item(
                CHECK,
                CheckStatus::Failed,
                format!("unable to look for '{name}' in repository '{}': {e}", repo.location()),
            )),
            Ok(lag) => {
                report.archive_lag_ms = Some(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX));
                report.checks.push(item(
                    CHECK,
                    CheckStatus::Ok,
                    format!("'{name}' reached the repository {:.2} s after pg_switch_wal()", lag.as_secs_f64()),
                ));
            }
            Err(None) => {
                let reason = match db.archiver() {
                    Ok(s) => archive_reason(&s, &name, &repo.location(), repo.cluster()),
                    Err(e) => format!("the archiver's state could not be read ({e})"),
                };
                report.checks.push(item(
                    CHECK,
                    CheckStatus::Failed,
                    format!(
                        "'{name}' did not reach the repository within {:.0} s of pg_switch_wal(): {reason}",
                        timeout.as_secs_f64()
                    ),
                ));
            }
        }
    }
    report.archiver = Some(archiver_stats(db, report.archive_lag_ms.and(report.switched_segment.as_deref()))?);
    report.newest_archived = newest_in_catalog(config, repo, now_ms());
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(repo: &str, cluster: &str) -> Config {
        let overrides = Overrides {
            repository: Some(repo.into()),
            cluster: Some(cluster.into()),
            catalog: Some("/tmp/c.db".into()),
            ..Default::default()
        };
        Config::load(&overrides, None).unwrap()
    }

    fn call(config: Option<&str>, env: Option<&str>, repo: Option<&str>, cluster: Option<&str>) -> Option<PushCall> {
        let s = |v: Option<&str>| v.map(str::to_string);
        Some(PushCall { config: s(config), env_config: s(env), repository: s(repo), cluster: s(cluster) })
    }

    #[test]
    fn finds_archive_push_and_its_options() {
        assert_eq!(find_push("archive-push %p"), call(None, None, None, None));
        assert_eq!(find_push("/opt/walvault/bin/archive-push %p"), call(None, None, None, None));
        assert_eq!(
            find_push("archive-push --repository /mnt/nas/wal --cluster=db1 %p"),
            call(None, None, Some("/mnt/nas/wal"), Some("db1"))
        );
        assert_eq!(
            find_push("'/usr/local/bin/archive-push' --config \"/etc/walvault/my file.toml\" %p"),
            call(Some("/etc/walvault/my file.toml"), None, None, None)
        );
        assert_eq!(
            find_push("WALVAULT_CONFIG=/etc/w.toml archive-push %p"),
            call(None, Some("/etc/w.toml"), None, None)
        );
        assert_eq!(
            find_push("env LANG=C WALVAULT_CONFIG=/etc/w.toml nice archive-push --repository=/r %p"),
            call(None, Some("/etc/w.toml"), Some("/r"), None)
        );
        // Options of another command in the line are not archive-push's.
        assert_eq!(
            find_push("test ! -f /x/%f && archive-push %p; echo --repository /elsewhere"),
            call(None, None, None, None)
        );
        // An assignment applies to its own simple command only.
        assert_eq!(find_push("WALVAULT_CONFIG=/a true; archive-push %p"), call(None, None, None, None));
        assert_eq!(find_push("sh -c 'archive-push --cluster c2 %p'"), call(None, None, None, Some("c2")));
        assert_eq!(find_push("cp %p /mnt/archive/%f"), None);
        assert_eq!(find_push("/usr/local/bin/archive-push-wrapper.sh %p"), None);
        assert_eq!(find_push(""), None);
    }

    #[test]
    fn shell_words_follow_sh_quoting() {
        let words = |s| {
            shell_words(s)
                .into_iter()
                .map(|t| match t {
                    Token::Word(w) => w,
                    Token::Separator => "<sep>".into(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(words(r#"a 'b c' "d \"e\" \$f \g" h\ i"#), ["a", "b c", r#"d "e" $f \g"#, "h i"]);
        assert_eq!(
            words("a&&b || c;d|e"),
            ["a", "<sep>", "<sep>", "b", "<sep>", "<sep>", "c", "<sep>", "d", "<sep>", "e"]
        );
        assert_eq!(words("''"), [""]);
        assert_eq!(words("  "), Vec::<String>::new());
    }

    #[test]
    fn archive_command_must_designate_this_repository() {
        let ours = config("/srv/wal", "main");
        let judge = |cmd: &str| judge_archive_command(cmd, &ours);
        let (i, elsewhere) = judge("archive-push --repository /srv/wal/ --cluster main %p");
        assert_eq!((i.status, elsewhere), (CheckStatus::Ok, false), "{i:?}");
        let (i, elsewhere) = judge("archive-push --repository /srv/other %p");
        assert_eq!((i.status, elsewhere), (CheckStatus::Failed, true));
        assert!(i.detail.contains("into repository '/srv/other', not '/srv/wal'"), "{}", i.detail);
        let (i, elsewhere) = judge("archive-push --repository /srv/wal --cluster db2 %p");
        assert_eq!((i.status, elsewhere), (CheckStatus::Failed, true));
        assert!(i.detail.contains("cluster name 'db2', not 'main'"), "{}", i.detail);
        // What the server's environment says cannot be seen: a note.
        let (i, elsewhere) = judge("archive-push %p");
        assert_eq!((i.status, elsewhere), (CheckStatus::Note, false));
        assert!(i.detail.contains("neither --config nor --repository"), "{}", i.detail);
        let (i, _) = judge("archive-push --repository /srv/wal %p");
        assert_eq!(i.status, CheckStatus::Note);
        let (i, elsewhere) = judge("cp %p /mnt/%f");
        assert_eq!((i.status, elsewhere), (CheckStatus::Failed, false));
        assert!(i.detail.contains("does not call archive-push"), "{}", i.detail);
        let (i, elsewhere) = judge("  ");
        assert_eq!((i.status, elsewhere), (CheckStatus::Failed, true));
    }

    #[test]
    fn archive_command_configuration_files_are_read() {
        let dir = std::env::temp_dir().join(format!("walvault-check-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("repo")).unwrap();
        let repo = dir.join("repo").display().to_string();
        let file = dir.join("walvault.toml");
        std::fs::write(&file, format!("repository = \"{repo}\"\ncluster = \"db1\"\n")).unwrap();
        let f = file.display().to_string();
        let judge = |cmd: &str, cluster: &str| judge_archive_command(cmd, &config(&repo, cluster));
        let (i, _) = judge(&format!("archive-push --config {f} %p"), "db1");
        assert_eq!(i.status, CheckStatus::Ok, "{i:?}");
        let (i, _) = judge(&format!("WALVAULT_CONFIG={f} archive-push %p"), "db1");
        assert_eq!(i.status, CheckStatus::Ok, "{i:?}");
        // The same directory by another path.
        let alias = format!("{}/../{}/repo/", dir.display(), dir.file_name().unwrap().to_string_lossy());
        let (i, _) = judge_archive_command(&format!("archive-push --config {f} %p"), &config(&alias, "db1"));
        assert_eq!(i.status, CheckStatus::Ok, "{i:?}");
        let (i, elsewhere) = judge(&format!("archive-push --config {f} %p"), "main");
        assert_eq!((i.status, elsewhere), (CheckStatus::Failed, true), "{i:?}");
        // Flags win over the file, as in archive-push.
        let (i, _) = judge(&format!("archive-push --config {f} --cluster main %p"), "main");
        assert_eq!(i.status, CheckStatus::Ok, "{i:?}");
        let (i, elsewhere) = judge(&format!("archive-push --config {}/missing.toml %p", dir.display()), "db1");
        assert_eq!((i.status, elsewhere), (CheckStatus::Failed, false), "{i:?}");
        assert!(i.detail.contains("cannot load"), "{i:?}");
        assert!(!same_location(&repo, &dir.display().to_string()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_are_judged() {
        assert_eq!(judge_archive_mode("on", false).status, CheckStatus::Ok);
        assert_eq!(judge_archive_mode("always", true).status, CheckStatus::Ok);
        assert_eq!(judge_archive_mode("on", true).status, CheckStatus::Note);
        assert_eq!(judge_archive_mode("off", false).status, CheckStatus::Failed);
        assert_eq!(judge_wal_level("replica").status, CheckStatus::Ok);
        assert_eq!(judge_wal_level("logical").status, CheckStatus::Ok);
        assert_eq!(judge_wal_level("minimal").status, CheckStatus::Failed);
        assert_eq!(judge_archive_library("").status, CheckStatus::Ok);
        assert_eq!(judge_archive_library("basic_archive").status, CheckStatus::Failed);
    }

    #[test]
    fn the_report_reads_and_decides() {
        let mut r = CheckReport {
            server: "host=/tmp port=5432 user=postgres dbname=postgres".into(),
            repository: "/srv/wal".into(),
            cluster: "main".into(),
            checks: vec![
                item("archive_mode", CheckStatus::Ok, "on"),
                item("archive_command", CheckStatus::Note, "'archive-push %p' gives ..."),
                item("archiving", CheckStatus::Ok, "'000000010000000000000003' reached the repository 0.4 s after"),
            ],
            switched_segment: Some("000000010000000000000003".into()),
            archive_lag_ms: Some(400),
            archiver: Some(ArchiverStats {
                archived_count: 3,
                last_archived_wal: Some("000000010000000000000003".into()),
                last_archived_time: Some("2026-11-21 14:30:00+00".into()),
                failed_count: 0,
                last_failed_wal: None,
                last_failed_time: None,
                stats_reset: None,
            }),
            newest_archived: None,
        };
        assert!(r.ok());
        let text = r.to_string();
        assert!(text.starts_with("server 'host=/tmp port=5432 user=postgres dbname=postgres', repository"), "{text}");
        assert!(text.contains("\nok: archive_mode: on\nnote: archive_command: "), "{text}");
        assert!(
            text.contains(
                "archiver: 3 archived, last '000000010000000000000003' at 2026-11-21 14:30:00+00; 0 failed\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("check passed"), "{text}");
        r.checks.push(item("wal_level", CheckStatus::Failed, "minimal: ..."));
        assert!(!r.ok());
        assert!(r.to_string().ends_with("check failed: 1 check failed"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][3]["status"], "failed");
        assert_eq!(json["archive_lag_ms"], 400);
    }
}
