//! The one PostgreSQL session a backup holds: how to reach the server
//! (libpq's environment variables and `.pgpass`, then `--dbname` on top),
//! and the queries a backup makes, each on that session.
//!
//! The session must stay open from `pg_backup_start` to `pg_backup_stop`:
//! PostgreSQL aborts a non-exclusive backup whose session ends.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use postgres::config::Host;
use postgres::{Client, NoTls};
use walvault_formats::wal::Lsn;

use super::BackupError;

/// libpq's default socket directory on Debian and Ubuntu (`PGHOST` unset).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// libpq's default port.
pub const DEFAULT_PORT: u16 = 5432;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The libpq environment a connection starts from. rust-postgres reads no
/// environment variables, so the binary gathers them
/// ([`PgEnv::from_process`]) and the library stays free of process-global
/// state.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PgEnv {
    /// `PGHOST`: host names or socket directories, comma-separated.
    pub host: Option<String>,
    /// `PGPORT`.
    pub port: Option<String>,
    /// `PGUSER`.
    pub user: Option<String>,
    /// `PGPASSWORD`.
    pub password: Option<String>,
    /// `PGDATABASE`.
    pub database: Option<String>,
    /// `PGPASSFILE`, else `$HOME/.pgpass`.
    pub passfile: Option<PathBuf>,
    /// The name of the operating-system user running walvault (libpq's
    /// default user name).
    pub os_user: Option<String>,
}

impl std::fmt::Debug for PgEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEnv")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("passfile", &self.passfile)
            .field("os_user", &self.os_user)
            .finish()
    }
}

/// The effective user's name from the password database, as libpq finds it.
pub(crate) fn effective_user_name() -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain data; getpwuid_r fills it with pointers into
    // `buf`, which outlives every use below; `result` is null or `&pwd`.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(libc::geteuid(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        CStr::from_ptr(pwd.pw_name).to_str().ok().map(str::to_string)
    }
}

impl PgEnv {
    /// Reads `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`,
    /// `PGPASSFILE` (else `$HOME/.pgpass`) and the effective user's name
    /// (else `$USER`). Empty variables count as unset, as in libpq.
    pub fn from_process() -> PgEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        PgEnv {
            host: var("PGHOST"),
            port: var("PGPORT"),
            user: var("PGUSER"),
            password: var("PGPASSWORD"),
            database: var("PGDATABASE"),
            passfile: var("PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".pgpass"))),
            os_user: effective_user_name().or_else(|| var("USER")),
        }
    }
}

/// The password for a connection in `.pgpass` text: the first line
/// `host:port:database:user:password` whose fields match (`*` matches
/// anything; `\` escapes `:` and `\`).
pub(crate) fn pgpass_lookup(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let wanted = [host, port.as_str(), database, user];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() == 5 && fields.iter().zip(wanted).all(|(f, w)| f == "*" || f == w) {
            return fields.pop();
        }
    }
    None
}

/// Reads the password file if it is safe to use (libpq ignores one that
/// group or others may read).
fn pgpass_password(file: &Path, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return None;
    }
    pgpass_lookup(&std::fs::read_to_string(file).ok()?, host, port, database, user)
}

/// The connection settings: the libpq environment first, then `conninfo`
/// (a `key=value` string, a `postgres://` URI or a bare database name)
/// whose settings win.
pub(crate) fn connection_config(env: &PgEnv, conninfo: Option<&str>) -> Result<postgres::Config, BackupError> {
    let bad = |detail: String| BackupError::ConnInfo { detail };
    let mut cfg = match conninfo.map(str::trim) {
        None | Some("") => postgres::Config::new(),
        // libpq reads a string without '=' that is not a URI as a database name.
        Some(s) if !s.contains('=') && !s.starts_with("postgres://") && !s.starts_with("postgresql://") => {
            let mut c = postgres::Config::new();
            c.dbname(s);
            c
        }
        Some(s) => postgres::Config::from_str(s).map_err(|e| bad(format!("--dbname: {}", with_causes(&e))))?,
    };
    if cfg.get_hosts().is_empty() && cfg.get_hostaddrs().is_empty() {
        for host in env.host.as_deref().unwrap_or(DEFAULT_SOCKET_DIR).split(',') {
            let host = host.trim();
            if host.starts_with('/') {
                cfg.host_path(host);
            } else if !host.is_empty() {
                cfg.host(host);
            }
        }
    }
    if cfg.get_ports().is_empty() {
        let port = match env.port.as_deref() {
            Some(p) => p.trim().parse::<u16>().map_err(|_| bad(format!("PGPORT '{p}' is not a port number")))?,
            None => DEFAULT_PORT,
        };
        cfg.port(port);
    }
    if cfg.get_user().is_none() {
        let user = env
            .user
            .as_deref()
            .or(env.os_user.as_deref())
            .ok_or_else(|| bad("no user name: set PGUSER or pass --dbname 'user=...'".into()))?;
        cfg.user(user);
    }
    if cfg.get_dbname().is_none() {
        let db = env.database.clone().or_else(|| cfg.get_user().map(str::to_string)).unwrap_or_default();
        cfg.dbname(&db);
    }
    if cfg.get_password().is_none() {
        if let Some(pw) = &env.password {
            cfg.password(pw.as_str());
        } else if let (Some(file), Some(host), Some(port)) =
            (&env.passfile, cfg.get_hosts().first(), cfg.get_ports().first())
        {
            let host = match host {
                // The default socket directory matches `localhost` lines.
                Host::Unix(p) if p == Path::new(DEFAULT_SOCKET_DIR) => "localhost".to_string(),
                Host::Unix(p) => p.display().to_string(),
                Host::Tcp(h) => h.clone(),
            };
            let (db, user) = (cfg.get_dbname().unwrap_or(""), cfg.get_user().unwrap_or(""));
            if let Some(pw) = pgpass_password(file, &host, *port, db, user) {
                cfg.password(pw);
            }
        }
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("walvault");
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(cfg)
}

/// Where a connection goes, for messages: a conninfo string without the
/// password (`host=/var/run/postgresql port=5432 user=postgres dbname=postgres`).
pub(crate) fn describe(cfg: &postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .chain(cfg.get_hostaddrs().iter().map(|a| a.to_string()))
        .collect();
    let ports: Vec<String> = cfg.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} user={} dbname={}",
        hosts.join(","),
        ports.join(","),
        cfg.get_user().unwrap_or(""),
        cfg.get_dbname().unwrap_or("")
    )
}

/// One line from a driver error: the server's message (and detail), or the
/// driver's description of an I/O or protocol failure.
fn error_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        };
    }
    with_causes(e)
}

/// An error and its causes, on one line: the driver's own messages are
/// generic ("error connecting to server") and the cause says why.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text.replace('\n', " ")
}

/// What the server says about itself.
#[derive(Debug, Clone)]
pub(crate) struct ServerInfo {
    /// `server_version_num`, e.g. 150010.
    pub version_num: u32,
    /// `pg_control_system().system_identifier`.
    pub system_id: u64,
    /// `pg_control_system().catalog_version_no`: names tablespace directories.
    pub catalog_version: u32,
    /// `archive_mode`: off, on or always.
    pub archive_mode: String,
    /// `wal_segment_size` in bytes.
    pub segment_size: u64,
    /// `pg_is_in_recovery()`: a standby, which cannot switch WAL; the
    /// primary archives the segments its backups need.
    pub in_recovery: bool,
}

impl ServerInfo {
    /// The major version (15 for 150010).
    pub fn major(&self) -> u32 {
        self.version_num / 10_000
    }
}

/// What `pg_backup_stop` returned.
#[derive(Debug, Clone)]
pub(crate) struct StopResult {
    /// The backup's end: the cluster is consistent once replay reaches it.
    pub lsn: Lsn,
    /// The `backup_label` to restore with.
    pub label: String,
    /// The `tablespace_map` to restore with (empty without tablespaces).
    pub tablespace_map: String,
}

/// The archiver's state, to explain why WAL did not arrive.
#[derive(Debug, Clone, Default)]
pub(crate) struct ArchiverStatus {
    /// `pg_stat_archiver.last_failed_wal`.
    pub last_failed_wal: Option<String>,
    /// `pg_stat_archiver.last_failed_time`, as text.
    pub last_failed_time: Option<String>,
    /// `pg_stat_archiver.failed_count`.
    pub failed_count: i64,
    /// `pg_stat_archiver.last_archived_wal`.
    pub last_archived_wal: Option<String>,
    /// Whether the last failure is more recent than the last success.
    pub failing: bool,
    /// `archive_command` (empty when unset).
    pub archive_command: String,
    /// `archive_library` (PostgreSQL 15 and later; empty when unset).
    pub archive_library: String,
}

/// The session.
pub(crate) struct Session {
    client: Client,
    /// [`describe`] of the connection.
    pub target: String,
    /// The server's major version, once known.
    major: u32,
}

impl Session {
    /// Connects.
    pub fn connect(cfg: &postgres::Config) -> Result<Session, BackupError> {
        let target = describe(cfg);
        let client =
            cfg.connect(NoTls).map_err(|e| BackupError::Connect { target: target.clone(), detail: error_text(&e) })?;
        Ok(Session { client, target, major: 0 })
    }

    /// The error for a failed query: a lost connection (the session, and
    /// with it the backup, is gone) or a refusal.
    fn fail(&self, during: &'static str, e: &postgres::Error) -> BackupError {
        let fatal = e.as_db_error().is_some_and(|d| matches!(d.severity(), "FATAL" | "PANIC"));
        let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || fatal || io || self.client.is_closed() {
            BackupError::ConnectionLost { target: self.target.clone(), during, detail: error_text(e) }
        } else {
            BackupError::Query { target: self.target.clone(), during, detail: error_text(e) }
        }
    }

    fn bad_value(&self, during: &'static str, detail: String) -> BackupError {
        BackupError::Query { target: self.target.clone(), during, detail }
    }

    pub(crate) fn one(
        &mut self,
        during: &'static str,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<postgres::Row, BackupError> {
        self.client.query_one(sql, params).map_err(|e| self.fail(during, &e))
    }

    /// Reads the server's identity and settings, then makes the session
    /// immune to timeouts a DBA may have set for applications: a spread
    /// checkpoint or a long copy must not end it.
    pub fn server_info(&mut self) -> Result<ServerInfo, BackupError> {
        const DURING: &str = "reading the server's identity";
        let row = self.one(
            DURING,
            "SELECT current_setting('server_version_num')::int4, c.system_identifier, c.catalog_version_no, \
                    current_setting('archive_mode'), \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
                    pg_is_in_recovery() \
             FROM pg_control_system() c",
            &[],
        )?;
        let get = |e: postgres::Error| self.bad_value(DURING, error_text(&e));
        let version_num: i32 = row.try_get(0).map_err(get)?;
        let system_id: i64 = row.try_get(1).map_err(get)?;
        let catalog_version: i32 = row.try_get(2).map_err(get)?;
        let archive_mode: String = row.try_get(3).map_err(get)?;
        let segment_size: Option<i64> = row.try_get(4).map_err(get)?;
        let in_recovery: bool = row.try_get(5).map_err(get)?;
        let info = ServerInfo {
            version_num: u32::try_from(version_num).unwrap_or(0),
            // system_identifier is a uint64 that PostgreSQL shows as int8:
            // the same 64 bits.
            system_id: system_id as u64,
            catalog_version: u32::try_from(catalog_version).unwrap_or(0),
            archive_mode,
            segment_size: segment_size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            in_recovery,
        };
        self.major = info.major();
        let mut settings = String::from(
            "SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SET search_path = pg_catalog;",
        );
        if self.major >= 14 {
            settings.push_str(" SET idle_session_timeout = 0;");
        }
        self.client.batch_execute(&settings).map_err(|e| self.fail("configuring the session", &e))?;
        Ok(info)
    }

    /// `data_directory`.
    pub fn data_directory(&mut self) -> Result<PathBuf, BackupError> {
        let row = self.one("reading data_directory", "SELECT current_setting('data_directory')", &[])?;
        let dir: String = row.try_get(0).map_err(|e| self.bad_value("reading data_directory", error_text(&e)))?;
        Ok(PathBuf::from(dir))
    }

    /// Tablespaces with a location outside the data directory: (oid, name,
    /// location).
    pub fn tablespaces(&mut self) -> Result<Vec<(u32, String, String)>, BackupError> {
        const DURING: &str = "listing tablespaces";
        let rows = self
            .client
            .query(
                "SELECT oid::int8, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace \
                 WHERE pg_tablespace_location(oid) <> '' ORDER BY oid",
                &[],
            )
            .map_err(|e| self.fail(DURING, &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let get = |e: postgres::Error| self.bad_value(DURING, error_text(&e));
            let oid: i64 = row.try_get(0).map_err(get)?;
            let oid = u32::try_from(oid).map_err(|_| self.bad_value(DURING, format!("tablespace oid {oid}")))?;
            out.push((oid, row.try_get(1).map_err(get)?, row.try_get(2).map_err(get)?));
        }
        Ok(out)
    }

    /// The server's clock, ms since the epoch.
    pub fn clock_ms(&mut self, during: &'static str) -> Result<i64, BackupError> {
        let row = self.one(during, "SELECT (extract(epoch from clock_timestamp()) * 1000)::int8", &[])?;
        row.try_get(0).map_err(|e| self.bad_value(during, error_text(&e)))
    }

    fn lsn(&self, during: &'static str, text: &str) -> Result<Lsn, BackupError> {
        text.parse().map_err(|e: walvault_formats::wal::LsnParseError| self.bad_value(during, e.to_string()))
    }

    /// Starts a non-exclusive backup; returns its start LSN.
    pub fn start(&mut self, label: &str, fast: bool) -> Result<Lsn, BackupError> {
        const DURING: &str = "starting the backup (pg_backup_start)";
        let sql = if self.major >= 15 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        let row = self.one(DURING, sql, &[&label, &fast])?;
        let text: String = row.try_get(0).map_err(|e| self.bad_value(DURING, error_text(&e)))?;
        self.lsn(DURING, &text)
    }

    /// Stops the backup without waiting for archiving (walvault waits
    /// itself, with a timeout and a reason).
    pub fn stop(&mut self) -> Result<StopResult, BackupError> {
        const DURING: &str = "stopping the backup (pg_backup_stop)";
        let sql = if self.major >= 15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = self.one(DURING, sql, &[])?;
        let get = |e: postgres::Error| self.bad_value(DURING, error_text(&e));
        let lsn: String = row.try_get(0).map_err(get)?;
        let label: Option<String> = row.try_get(1).map_err(get)?;
        let map: Option<String> = row.try_get(2).map_err(get)?;
        Ok(StopResult {
            lsn: self.lsn(DURING, &lsn)?,
            label: label.unwrap_or_default(),
            tablespace_map: map.unwrap_or_default(),
        })
    }

    /// The server's clock (ms since the epoch) and the next transaction id,
    /// read after the stop: any transaction from that id on began after
    /// the backup's consistency point. A statement of its own, as its
    /// snapshot must be taken after `pg_backup_stop` returned.
    pub fn after_stop(&mut self) -> Result<(i64, u64), BackupError> {
        const DURING: &str = "reading the stop time and the next transaction id";
        let xid = if self.major >= 13 {
            "pg_snapshot_xmax(pg_current_snapshot())::text::int8"
        } else {
            "txid_snapshot_xmax(txid_current_snapshot())::int8"
        };
        let sql = format!("SELECT (extract(epoch from clock_timestamp()) * 1000)::int8, {xid}");
        let row = self.one(DURING, &sql, &[])?;
        let get = |e: postgres::Error| self.bad_value(DURING, error_text(&e));
        let ms: i64 = row.try_get(0).map_err(get)?;
        let xid: i64 = row.try_get(1).map_err(get)?;
        let xid = u64::try_from(xid).map_err(|_| self.bad_value(DURING, format!("transaction id {xid}")))?;
        Ok((ms, xid))
    }

    /// The timeline of the last checkpoint.
    pub fn checkpoint_timeline(&mut self) -> Result<u32, BackupError> {
        const DURING: &str = "reading the timeline";
        let row = self.one(DURING, "SELECT timeline_id FROM pg_control_checkpoint()", &[])?;
        let tli: i32 = row.try_get(0).map_err(|e| self.bad_value(DURING, error_text(&e)))?;
        u32::try_from(tli).map_err(|_| self.bad_value(DURING, format!("timeline {tli}")))
    }

    /// A round trip, to learn early that the session is gone.
    pub fn ping(&mut self, during: &'static str) -> Result<(), BackupError> {
        self.client.simple_query("").map(|_| ()).map_err(|e| self.fail(during, &e))
    }

    /// The archiver's state and settings.
    pub fn archiver(&mut self) -> Result<ArchiverStatus, BackupError> {
        const DURING: &str = "reading pg_stat_archiver";
        let library = if self.major >= 15 { "current_setting('archive_library')" } else { "''" };
        let sql = format!(
            "SELECT last_failed_wal, last_failed_time::text, failed_count, last_archived_wal, \
                    coalesce(last_failed_time > last_archived_time, last_failed_time IS NOT NULL), \
                    current_setting('archive_command'), {library} \
             FROM pg_stat_archiver"
        );
        let row = self.one(DURING, &sql, &[])?;
        let get = |e: postgres::Error| self.bad_value(DURING, error_text(&e));
        Ok(ArchiverStatus {
            last_failed_wal: row.try_get(0).map_err(get)?,
            last_failed_time: row.try_get(1).map_err(get)?,
            failed_count: row.try_get(2).map_err(get)?,
            last_archived_wal: row.try_get(3).map_err(get)?,
            failing: row.try_get(4).map_err(get)?,
            archive_command: row.try_get(5).map_err(get)?,
            archive_library: row.try_get(6).map_err(get)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env() -> PgEnv {
        PgEnv { os_user: Some("postgres".into()), ..Default::default() }
    }

    #[test]
    fn defaults_are_libpq_s() {
        let c = connection_config(&env(), None).unwrap();
        assert_eq!(c.get_hosts(), [Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))]);
        assert_eq!(c.get_ports(), [5432]);
        assert_eq!((c.get_user(), c.get_dbname()), (Some("postgres"), Some("postgres")));
        assert_eq!(c.get_application_name(), Some("walvault"));
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(describe(&c), "host=/var/run/postgresql port=5432 user=postgres dbname=postgres");
    }

    #[test]
    fn environment_then_conninfo() {
        let e = PgEnv {
            host: Some("/tmp/sock".into()),
            port: Some("5499".into()),
            user: Some("backup".into()),
            password: Some("secret".into()),
            database: Some("app".into()),
            ..env()
        };
        let c = connection_config(&e, None).unwrap();
        assert_eq!(c.get_hosts(), [Host::Unix(PathBuf::from("/tmp/sock"))]);
        assert_eq!((c.get_ports(), c.get_user(), c.get_dbname()), (&[5499][..], Some("backup"), Some("app")));
        assert_eq!(c.get_password(), Some(&b"secret"[..]));
        assert!(!describe(&c).contains("secret"));
        assert!(!format!("{e:?}").contains("secret"));

        let c = connection_config(&e, Some("host=db1 user=other application_name=nightly")).unwrap();
        assert_eq!(c.get_hosts(), [Host::Tcp("db1".into())]);
        assert_eq!((c.get_ports(), c.get_user(), c.get_dbname()), (&[5499][..], Some("other"), Some("app")));
        assert_eq!(c.get_application_name(), Some("nightly"));

        let c = connection_config(&e, Some("postgresql://u2@localhost:6000/db2")).unwrap();
        assert_eq!((c.get_ports(), c.get_user(), c.get_dbname()), (&[6000][..], Some("u2"), Some("db2")));
        let c = connection_config(&e, Some("db3")).unwrap();
        assert_eq!((c.get_user(), c.get_dbname()), (Some("backup"), Some("db3")));

        assert!(matches!(connection_config(&e, Some("host=x bogus=1")), Err(BackupError::ConnInfo { .. })));
        let bad_port = PgEnv { port: Some("54x".into()), ..env() };
        assert!(matches!(connection_config(&bad_port, None), Err(BackupError::ConnInfo { .. })));
        assert!(matches!(connection_config(&PgEnv::default(), None), Err(BackupError::ConnInfo { .. })));
    }

    #[test]
    fn pgpass() {
        let text = "# comment\n\
                    db1:5432:*:alice:pw1\n\
                    localhost:*:app:*:pw\\:2\n\
                    *:*:*:*:fallback\n";
        assert_eq!(pgpass_lookup(text, "db1", 5432, "x", "alice").as_deref(), Some("pw1"));
        assert_eq!(pgpass_lookup(text, "localhost", 1, "app", "bob").as_deref(), Some("pw:2"));
        assert_eq!(pgpass_lookup(text, "db2", 1, "x", "y").as_deref(), Some("fallback"));
        assert_eq!(pgpass_lookup("a:1:b:c\n", "a", 1, "b", "c"), None);

        let dir = std::env::temp_dir().join(format!("walvault-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgpass");
        std::fs::write(&file, "localhost:5432:postgres:postgres:s3\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PgEnv { passfile: Some(file.clone()), ..env() };
        // Readable by others: ignored, as libpq does.
        assert_eq!(connection_config(&e, None).unwrap().get_password(), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(connection_config(&e, None).unwrap().get_password(), Some(&b"s3"[..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
