//! Test harness for running walvault against a real PostgreSQL 15.
//!
//! The integration tests in `integration/tests/` start their own PostgreSQL
//! clusters (one per test, each in its own [`TestDir`] with its own unix
//! socket), point `archive_command` / `restore_command` at the workspace's
//! freshly built binaries, and check what ends up in the repository.
//!
//! # Running as root
//!
//! PostgreSQL refuses to run as root. When the tests run as root (as they do
//! in CI), every PostgreSQL program *and every walvault binary* runs as the
//! `postgres` OS user (created by Debian's `postgresql-15` package), which is
//! also how they run in production: `archive_command` is a child of the
//! server. Test directories are chowned to that user. As an ordinary user,
//! everything runs as that user.
//!
//! # Environment variables
//!
//! - `WALVAULT_PG_BIN`: directory of the PostgreSQL programs
//!   (default `/usr/lib/postgresql/15/bin`).
//! - `WALVAULT_BIN_DIR`: directory holding `archive-push`, `archive-fetch`
//!   and `walvault` (default: the cargo target directory the test was built
//!   in, e.g. `target/debug`).
//! - `WALVAULT_PG_CONFIG_EXAMPLES`: directory of the PostgreSQL configuration
//!   snippets (default: the workspace's `pg-config-examples/`).
//! - `WALVAULT_KEEP_TEST_DIRS`: when set, test directories are kept.
//!
//! # Example
//!
//! ```no_run
//! use walvault_integration::{Config, PgCluster, TestDir, Walvault};
//!
//! let td = TestDir::new();
//! let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
//! let wv = Walvault::new(&td, &config);
//! let mut pg = PgCluster::initdb(&td, "primary", &[]);
//! pg.include_example("archive.conf");
//! wv.init(pg.datadir()).expect_success("walvault init");
//! pg.start(&wv.server_env());
//! pg.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
//! let segment = pg.psql("SELECT pg_walfile_name(pg_switch_wal())");
//! pg.wait_archived(&segment, std::time::Duration::from_secs(60));
//! ```

pub mod proxy;
pub mod s3;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// The default time limit for one command run by the harness.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The name of the first WAL segment of a freshly initdb'd cluster.
pub const FIRST_SEGMENT: &str = "000000010000000000000001";

/// The size of a WAL segment of a cluster initdb'd with default settings.
pub const WAL_SEGMENT_SIZE: usize = 16 * 1024 * 1024;

/// The three binaries under test.
pub const BINARIES: [&str; 3] = ["archive-push", "archive-fetch", "walvault"];

// ---------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------

/// An OS user the harness runs programs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsUser {
    /// The login name.
    pub name: String,
    /// The numeric user id.
    pub uid: u32,
    /// The numeric primary group id.
    pub gid: u32,
}

/// Whether the tests run as root (effective uid 0).
pub fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| match fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => {
            let out = Command::new("id").arg("-u").output().expect("cannot run `id -u`");
            String::from_utf8_lossy(&out.stdout).trim() == "0"
        }
    })
}

/// Looks up `name` in `/etc/passwd`.
fn lookup_user(name: &str) -> Option<OsUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            Some(OsUser { name: name.to_owned(), uid: fields[2].parse().ok()?, gid: fields[3].parse().ok()? })
        } else {
            None
        }
    })
}

/// The user PostgreSQL programs and walvault binaries run as: `postgres`
/// when the tests run as root, else `None` (they run as the current user).
///
/// Panics with a clear message when running as root and no `postgres` user
/// exists.
pub fn pg_os_user() -> Option<&'static OsUser> {
    static USER: OnceLock<Option<OsUser>> = OnceLock::new();
    USER.get_or_init(|| {
        if !is_root() {
            return None;
        }
        Some(lookup_user("postgres").unwrap_or_else(|| {
            panic!(
                "the tests run as root, so PostgreSQL must run as the OS user `postgres`, \
                 which does not exist; install PostgreSQL with `bash scripts/install-deps.sh`"
            )
        }))
    })
    .as_ref()
}

/// The name of the OS user PostgreSQL runs as, which is also the name of the
/// database superuser of every cluster the harness creates.
pub fn superuser() -> String {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| match pg_os_user() {
        Some(user) => user.name.clone(),
        None => {
            let out = Command::new("id").arg("-un").output().expect("cannot run `id -un`");
            let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(!name.is_empty(), "`id -un` printed nothing");
            name
        }
    })
    .clone()
}

/// Configures `cmd` to run as the PostgreSQL OS user when the tests run as
/// root (see [`pg_os_user`]); leaves it unchanged otherwise.
pub fn as_pg_user(cmd: &mut Command) -> &mut Command {
    if let Some(user) = pg_os_user() {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// Runs `cmd` as the PostgreSQL OS user (see [`as_pg_user`]) with the
/// [`DEFAULT_TIMEOUT`], capturing its output.
pub fn run_as_pg_user(mut cmd: Command) -> Cmd {
    as_pg_user(&mut cmd);
    run(cmd)
}

/// Changes the owner of `path` (not recursively) to the PostgreSQL OS user
/// when the tests run as root; does nothing otherwise.
pub fn chown_to_pg_user(path: &Path) {
    if let Some(user) = pg_os_user() {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("cannot chown {} to {}: {e}", path.display(), user.name));
    }
}

/// Changes the owner of `path` and everything below it to the PostgreSQL OS
/// user when the tests run as root; does nothing otherwise.
pub fn chown_tree_to_pg_user(path: &Path) {
    if pg_os_user().is_none() {
        return;
    }
    chown_to_pg_user(path);
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    if meta.is_dir() {
        for entry in read_dir_sorted(path) {
            chown_tree_to_pg_user(&entry);
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// The outcome of a command run by the harness.
#[derive(Clone, Debug)]
pub struct Cmd {
    /// The command line, environment and working directory, for messages.
    pub description: String,
    /// The exit status.
    pub status: ExitStatus,
    /// Everything the command wrote to its standard output.
    pub stdout: String,
    /// Everything the command wrote to its standard error.
    pub stderr: String,
}

impl Cmd {
    /// The exit code; panics (printing the command) when it was killed by a
    /// signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("command was killed by a signal\n{self}"))
    }

    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, naming `what` and printing the command and its output, unless
    /// the command exited with code 0; returns `self` otherwise.
    #[track_caller]
    pub fn expect_success(self, what: &str) -> Self {
        assert!(self.success(), "{what} failed\n{self}");
        self
    }

    /// Panics unless the command exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.status.code(), Some(code), "unexpected exit status\n{self}");
        self
    }

    /// Panics unless the command exited with code 0 and printed nothing at all
    /// (`archive-push` and `archive-fetch` are silent on success).
    #[track_caller]
    pub fn assert_silent_success(&self) -> &Self {
        assert!(
            self.success() && self.stdout.is_empty() && self.stderr.is_empty(),
            "expected a silent success\n{self}"
        );
        self
    }

    /// The non-empty lines of standard error.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| !l.trim().is_empty()).collect()
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.description)?;
        writeln!(f, "status: {}", self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}\n--------------", self.stderr.trim_end())
    }
}

/// A human-readable rendering of `cmd`: program, arguments, environment
/// changes and working directory.
pub fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            s.push_str(&format!("{}={} ", key.to_string_lossy(), value.to_string_lossy()));
        }
    }
    s.push_str(&shell_quote(cmd.get_program()));
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(arg));
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("  (in {})", dir.display()));
    }
    if let Some(user) = pg_os_user() {
        s.push_str(&format!("  (as {})", user.name));
    }
    s
}

fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:%,+@".contains(c)) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with the [`DEFAULT_TIMEOUT`] (see [`run_with_timeout`]).
pub fn run(cmd: Command) -> Cmd {
    run_with_timeout(cmd, DEFAULT_TIMEOUT)
}

/// Runs `cmd` with standard input from `/dev/null`, capturing standard output
/// and error; kills it and panics when it runs longer than `timeout`, and
/// panics when it cannot be started.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Cmd {
    try_run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

fn collect(rx: &mpsc::Receiver<Vec<u8>>) -> String {
    // A grandchild (e.g. a daemon) may keep the pipe open: do not wait forever.
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(buf) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => "<output pipe still open after the command exited>".to_owned(),
    }
}

fn wait_with_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if Instant::now() >= deadline => return Ok(None),
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for child process: {e}")),
        }
    }
}

/// Like [`run_with_timeout`] but returns an error message instead of
/// panicking (for use in `Drop`).
pub fn try_run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Cmd, String> {
    let description = describe(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // ETXTBSY: another test thread of this process was copying an executable
    // while forking, so a child briefly held it open for writing. Retry.
    const TEXT_FILE_BUSY: i32 = 26;
    let mut attempts = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(child) => break child,
            Err(e) if e.raw_os_error() == Some(TEXT_FILE_BUSY) && attempts < 100 => {
                attempts += 1;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot start command: {e}\ncommand: {description}")),
        }
    };
    let out = spawn_reader(child.stdout.take());
    let err = spawn_reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    match wait_with_deadline(&mut child, deadline)? {
        Some(status) => Ok(Cmd { description, status, stdout: collect(&out), stderr: collect(&err) }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "command timed out after {timeout:?} and was killed\ncommand: {description}\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                collect(&out),
                collect(&err)
            ))
        }
    }
}

// ---------------------------------------------------------------------------
// Locations
// ---------------------------------------------------------------------------

/// The root of the cargo workspace.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The directory of the PostgreSQL 15 programs (`WALVAULT_PG_BIN`, default
/// `/usr/lib/postgresql/15/bin`).
///
/// Panics with installation instructions when `initdb` is not there: the
/// integration tests never skip silently.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("WALVAULT_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        let missing: Vec<&str> = ["initdb", "pg_ctl", "postgres", "psql", "pgbench", "pg_basebackup"]
            .into_iter()
            .filter(|p| !dir.join(p).is_file())
            .collect();
        if !missing.is_empty() {
            let ci = if std::env::var_os("CI").is_some() {
                " (CI is set: scripts/test.sh should have installed them as root)"
            } else {
                ""
            };
            panic!(
                "PostgreSQL 15 programs missing in {}: {}{ci}.\n\
                 The integration tests need a real PostgreSQL 15: run `sudo bash scripts/install-deps.sh` \
                 (Debian package postgresql-15), or point WALVAULT_PG_BIN at its bin directory.",
                dir.display(),
                missing.join(", ")
            );
        }
        // Resolve the postgres user early, for a clear message.
        let _ = pg_os_user();
        dir
    })
    .clone()
}

/// The path of the PostgreSQL program `name` (see [`pg_bin_dir`]).
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

/// The path of the example snippet `name` in `pg-config-examples/` (or
/// `WALVAULT_PG_CONFIG_EXAMPLES`); panics when it does not exist.
pub fn config_example(name: &str) -> PathBuf {
    let dir = std::env::var_os("WALVAULT_PG_CONFIG_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("pg-config-examples"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "the example configuration {} does not exist; the tests use the project's examples as they are shipped",
        path.display()
    );
    path
}

/// The directory the workspace's binaries were built into: `WALVAULT_BIN_DIR`
/// when set, else the profile directory of the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>`), else
/// `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
pub fn built_binaries_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALVAULT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe.parent()
        && deps.file_name() == Some(OsStr::new("deps"))
        && let Some(profile) = deps.parent()
    {
        candidates.push(profile.to_path_buf());
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("debug"));
    }
    candidates.push(workspace_root().join("target").join("debug"));
    candidates.iter().find(|dir| dir.join(BINARIES[0]).is_file()).unwrap_or(&candidates[0]).clone()
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() { newest_mtime(&path) } else { entry.metadata().ok().and_then(|m| m.modified().ok()) };
        newest = newest.max(t);
    }
    newest
}

/// Copies the binaries under test (`archive-push`, `archive-fetch`,
/// `walvault`) from [`built_binaries_dir`] into `<td>/bin` (so that the
/// `postgres` user can run them even when the checkout is under `/root`) and
/// returns that directory. Idempotent.
///
/// Panics when a binary is missing. Warns (on stderr) when a binary looks
/// older than the workspace's sources.
pub fn bin_dir(td: &TestDir) -> PathBuf {
    let target = td.join("bin");
    if BINARIES.iter().all(|b| target.join(b).is_file()) {
        return target;
    }
    let source = built_binaries_dir();
    let sources_mtime = ["lib", "bins"].iter().filter_map(|d| newest_mtime(&workspace_root().join(d))).max();
    let target = td.mkdir("bin");
    for name in BINARIES {
        let from = source.join(name);
        let meta = fs::metadata(&from).unwrap_or_else(|e| {
            panic!(
                "the binary {} is missing ({e}): run `cargo build --workspace --bins` first \
                 (or set WALVAULT_BIN_DIR)",
                from.display()
            )
        });
        if let (Some(src), Ok(bin)) = (sources_mtime, meta.modified())
            && src > bin
        {
            eprintln!(
                "warning: {} is older than the sources in lib/ or bins/: run `cargo build --workspace --bins`",
                from.display()
            );
        }
        let to = target.join(name);
        fs::copy(&from, &to).unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", to.display()));
    }
    target
}

// ---------------------------------------------------------------------------
// Test directories
// ---------------------------------------------------------------------------

static DIR_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory `/tmp/walvault-it-<pid>-<n>`, mode 0755, owned by the
/// PostgreSQL OS user when running as root, removed on drop (unless
/// `WALVAULT_KEEP_TEST_DIRS` is set).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates the directory; panics on failure.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/walvault-it-{}-{n}", std::process::id()));
        if path.exists() {
            // Left over by an earlier process with the same pid.
            make_tree_writable(&path);
            fs::remove_dir_all(&path).unwrap_or_else(|e| panic!("cannot remove stale {}: {e}", path.display()));
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
        chown_to_pg_user(&path);
        TestDir { path }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` below the directory (nothing is created).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates the directory `rel` (and missing parents) below the test
    /// directory, owned by the PostgreSQL OS user; returns its path.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        let mut current = self.path.clone();
        for component in rel.components() {
            current.push(component);
            if !current.is_dir() {
                fs::create_dir(&current).unwrap_or_else(|e| panic!("cannot create {}: {e}", current.display()));
                fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                    .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", current.display()));
                chown_to_pg_user(&current);
            }
        }
        current
    }

    /// Writes `contents` to `rel` (creating parent directories), owned by the
    /// PostgreSQL OS user, mode 0644; returns its path.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let rel = rel.as_ref();
        if let Some(parent) = rel.parent()
            && !parent.as_os_str().is_empty()
        {
            self.mkdir(parent);
        }
        let path = self.path.join(rel);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
        chown_to_pg_user(&path);
        path
    }

    /// Copies the file `from` to `rel` (see [`TestDir::write`]); returns the
    /// new path.
    pub fn copy_in(&self, from: &Path, rel: impl AsRef<Path>) -> PathBuf {
        self.write(rel, read_bytes(from))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("WALVAULT_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test directory {}", self.path.display());
            return;
        }
        make_tree_writable(&self.path);
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Gives the owner rwx on every directory below `path` (tests take
/// permissions away; removal needs them back). Errors are ignored.
fn make_tree_writable(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else { return };
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                make_tree_writable(&entry.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// walvault configuration and binaries
// ---------------------------------------------------------------------------

/// A walvault configuration file (TOML).
#[derive(Clone, Debug)]
pub struct Config {
    /// `cluster` (omitted when `None`: the default "main").
    pub cluster: Option<String>,
    /// `repository`.
    pub repository: PathBuf,
    /// `catalog` (always set by the tests, inside the test directory).
    pub catalog: PathBuf,
    /// `compress-level` (omitted when `None`).
    pub compress_level: Option<i32>,
    /// `fetch-on-error`: "auto", "abort" or "retry" (omitted when `None`).
    pub fetch_on_error: Option<String>,
}

/// Quotes `s` as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Config {
    /// A configuration with only `repository` and `catalog`.
    pub fn new(repository: impl Into<PathBuf>, catalog: impl Into<PathBuf>) -> Config {
        Config {
            cluster: None,
            repository: repository.into(),
            catalog: catalog.into(),
            compress_level: None,
            fetch_on_error: None,
        }
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let mut s = String::from("# written by walvault-integration\n");
        if let Some(cluster) = &self.cluster {
            s.push_str(&format!("cluster = {}\n", toml_string(cluster)));
        }
        s.push_str(&format!("repository = {}\n", toml_string(&self.repository.to_string_lossy())));
        s.push_str(&format!("catalog = {}\n", toml_string(&self.catalog.to_string_lossy())));
        if let Some(level) = self.compress_level {
            s.push_str(&format!("compress-level = {level}\n"));
        }
        if let Some(mode) = &self.fetch_on_error {
            s.push_str(&format!("fetch-on-error = {}\n", toml_string(mode)));
        }
        s
    }

    /// Writes the file to `rel` in `td`; returns its path.
    pub fn write(&self, td: &TestDir, rel: impl AsRef<Path>) -> PathBuf {
        td.write(rel, self.to_toml())
    }
}

/// Runs the binaries under test, as the PostgreSQL OS user, with a clean
/// environment: `PATH=<testdir>/bin:…`, `HOME=<testdir>`, `LC_ALL=C` and
/// `WALVAULT_CONFIG=<config>`.
#[derive(Clone, Debug)]
pub struct Walvault {
    bin_dir: PathBuf,
    home: PathBuf,
    config: Option<PathBuf>,
    cwd: PathBuf,
}

impl Walvault {
    /// Copies the binaries into `td` (see [`bin_dir`]) and uses the
    /// configuration file `config`; commands run in `td`.
    pub fn new(td: &TestDir, config: &Path) -> Walvault {
        Walvault {
            bin_dir: bin_dir(td),
            home: td.path().to_path_buf(),
            config: Some(config.to_path_buf()),
            cwd: td.path().to_path_buf(),
        }
    }

    /// The same binaries with another configuration file.
    pub fn with_config(&self, config: &Path) -> Walvault {
        Walvault { config: Some(config.to_path_buf()), ..self.clone() }
    }

    /// The same binaries without `WALVAULT_CONFIG` in the environment.
    pub fn without_config(&self) -> Walvault {
        Walvault { config: None, ..self.clone() }
    }

    /// The configuration file passed in `WALVAULT_CONFIG`.
    pub fn config(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The directory holding the binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// `PATH` for the binaries and for a server that runs them.
    pub fn path_env(&self) -> OsString {
        let mut path = OsString::from(self.bin_dir.as_os_str());
        path.push(":");
        path.push(pg_bin_dir().as_os_str());
        path.push(":/usr/local/bin:/usr/bin:/bin");
        path
    }

    /// The environment to start a server with so that its `archive_command`
    /// and `restore_command` find the binaries and the configuration.
    pub fn server_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("PATH".to_owned(), self.path_env().to_string_lossy().into_owned())];
        if let Some(config) = &self.config {
            env.push(("WALVAULT_CONFIG".to_owned(), config.to_string_lossy().into_owned()));
        }
        env
    }

    /// A command for the binary `program`, ready to run with
    /// [`run_as_pg_user`], in the default working directory.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.env_clear().env("PATH", self.path_env()).env("HOME", &self.home).env("LC_ALL", "C").current_dir(&self.cwd);
        if let Some(config) = &self.config {
            cmd.env("WALVAULT_CONFIG", config);
        }
        if let Some(bt) = std::env::var_os("RUST_BACKTRACE") {
            cmd.env("RUST_BACKTRACE", bt);
        }
        cmd
    }

    /// Runs `program args…` as the PostgreSQL OS user.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Cmd {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_as_pg_user(cmd)
    }

    /// Runs `program args…` as the PostgreSQL OS user in the directory `cwd`.
    pub fn run_in<S: AsRef<OsStr>>(&self, cwd: &Path, program: &str, args: &[S]) -> Cmd {
        let mut cmd = self.command(program);
        cmd.args(args).current_dir(cwd);
        run_as_pg_user(cmd)
    }

    /// `archive-push WAL_PATH`.
    pub fn push(&self, wal_path: impl AsRef<OsStr>) -> Cmd {
        self.run("archive-push", &[wal_path.as_ref()])
    }

    /// `archive-push WAL_PATH` run in `cwd` (PostgreSQL runs it in the data
    /// directory with a relative `%p`).
    pub fn push_in(&self, cwd: &Path, wal_path: impl AsRef<OsStr>) -> Cmd {
        self.run_in(cwd, "archive-push", &[wal_path.as_ref()])
    }

    /// `archive-fetch NAME DEST`.
    pub fn fetch(&self, name: impl AsRef<OsStr>, dest: impl AsRef<OsStr>) -> Cmd {
        self.run("archive-fetch", &[name.as_ref(), dest.as_ref()])
    }

    /// `archive-fetch NAME DEST` run in `cwd` (a `standby.signal` there changes
    /// the exit code on errors in the default "auto" mode).
    pub fn fetch_in(&self, cwd: &Path, name: impl AsRef<OsStr>, dest: impl AsRef<OsStr>) -> Cmd {
        self.run_in(cwd, "archive-fetch", &[name.as_ref(), dest.as_ref()])
    }

    /// `walvault ARGS…`.
    pub fn walvault<S: AsRef<OsStr>>(&self, args: &[S]) -> Cmd {
        self.run("walvault", args)
    }

    /// `walvault init --pgdata PGDATA`.
    pub fn init(&self, pgdata: &Path) -> Cmd {
        self.walvault(&[OsStr::new("init"), OsStr::new("--pgdata"), pgdata.as_os_str()])
    }

    /// `walvault backup ARGS…` against the server `pg`, connected through the
    /// libpq environment variables (`PGHOST` = its socket directory, `PGPORT`,
    /// `PGUSER`, `PGDATABASE`), as a cron job would run it. Not judged.
    pub fn backup(&self, pg: &PgCluster, args: &[&str]) -> Cmd {
        let mut cmd = self.command("walvault");
        cmd.env("PGHOST", pg.sockdir())
            .env("PGPORT", pg.port().to_string())
            .env("PGUSER", superuser())
            .env("PGDATABASE", "postgres")
            .arg("backup")
            .args(args);
        as_pg_user(&mut cmd);
        run_with_timeout(cmd, Duration::from_secs(900))
    }

    /// `walvault restore --pgdata PGDATA ARGS…`. Not judged.
    pub fn restore(&self, pgdata: &Path, args: &[&str]) -> Cmd {
        let mut cmd = self.command("walvault");
        cmd.arg("restore").arg("--pgdata").arg(pgdata).args(args);
        as_pg_user(&mut cmd);
        run_with_timeout(cmd, Duration::from_secs(900))
    }

    /// The identifiers of the backups `info --json` lists, oldest first.
    pub fn backup_ids(&self) -> Vec<String> {
        let info = self.info_json();
        info["backups"].as_array().map(|a| a.iter().map(|b| json_text(&b["id"])).collect()).unwrap_or_default()
    }

    /// `walvault info --json`, parsed; panics when it fails or prints
    /// something that is not JSON.
    pub fn info_json(&self) -> serde_json::Value {
        let out = self.walvault(&["info", "--json"]).expect_success("walvault info --json");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("walvault info --json printed invalid JSON: {e}\n{out}"))
    }
}

/// The path of the stored object for the WAL file `name` in a repository:
/// `<repo>/<cluster>/wal/<first 16 hex digits>/<name>`, or
/// `<repo>/<cluster>/wal/history/<name>` for a timeline history file.
pub fn object_path(repository: &Path, cluster: &str, name: &str) -> PathBuf {
    let wal = repository.join(cluster).join("wal");
    if name.ends_with(".history") {
        wal.join("history").join(name)
    } else {
        wal.join(name.get(..16).unwrap_or(name)).join(name)
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL clusters
// ---------------------------------------------------------------------------

static PORT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A port for a new cluster: unique within this process, spread across
/// processes by pid; the socket file must not exist in `sockdir`. (Servers
/// only listen on their own unix socket directory, so ports never clash.)
fn pick_port(sockdir: &Path) -> u16 {
    let base = 20_000 + (std::process::id() % 2_000) * 16;
    loop {
        let n = PORT_COUNTER.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (base - 20_000 + n) % 40_000;
        let port = u16::try_from(port).unwrap_or(20_000);
        if !sockdir.join(format!(".s.PGSQL.{port}")).exists() && !sockdir.join(format!(".s.PGSQL.{port}.lock")).exists()
        {
            return port;
        }
    }
}

/// The counters of `pg_stat_archiver`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiverStats {
    /// `archived_count`.
    pub archived_count: u64,
    /// `last_archived_wal` ("" when none).
    pub last_archived_wal: String,
    /// `failed_count`.
    pub failed_count: u64,
    /// `last_failed_wal` ("" when none).
    pub last_failed_wal: String,
}

/// A PostgreSQL cluster in a test directory, run as the PostgreSQL OS user,
/// listening only on a unix socket in the test directory.
///
/// Dropping it stops the server (immediate mode) if it is running; when the
/// test is panicking, the tail of the server log is printed first.
#[derive(Debug)]
pub struct PgCluster {
    name: String,
    datadir: PathBuf,
    sockdir: PathBuf,
    logfile: PathBuf,
    home: PathBuf,
    port: u16,
    running: bool,
}

/// Settings every test cluster gets: small, fast, verbose enough.
const BASE_SETTINGS: &str = "\
# added by walvault-integration
shared_buffers = 32MB
max_connections = 20
fsync = off
log_line_prefix = '%m [%p] '
log_checkpoints = on
";

impl PgCluster {
    /// Runs `initdb` (trust authentication, superuser [`superuser`], no sync,
    /// plus `extra_args`) into `<td>/<name>` and appends a few base settings
    /// (small shared_buffers, fsync off). The server is not started.
    pub fn initdb(td: &TestDir, name: &str, extra_args: &[&str]) -> PgCluster {
        let cluster = PgCluster::existing(td, name, &td.join(name));
        let mut cmd = cluster.pg_command("initdb");
        cmd.arg("-D")
            .arg(&cluster.datadir)
            .args(["--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C", "-U"])
            .arg(superuser())
            .args(extra_args);
        run_as_pg_user(cmd).expect_success("initdb");
        cluster.append_conf(BASE_SETTINGS);
        cluster
    }

    /// A cluster whose data directory `datadir` already exists (e.g. made by
    /// [`PgCluster::pg_basebackup`]); its socket directory and log file are
    /// `<td>/<name>.sock` and `<td>/<name>.log`.
    pub fn existing(td: &TestDir, name: &str, datadir: &Path) -> PgCluster {
        pg_bin_dir();
        let sockdir = td.mkdir(format!("{name}.sock"));
        let port = pick_port(&sockdir);
        PgCluster {
            name: name.to_owned(),
            datadir: datadir.to_path_buf(),
            logfile: td.join(format!("{name}.log")),
            home: td.path().to_path_buf(),
            sockdir,
            port,
            running: false,
        }
    }

    /// The data directory.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// The port (which only names the socket file).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The unix socket directory.
    pub fn sockdir(&self) -> &Path {
        &self.sockdir
    }

    /// The server log file.
    pub fn logfile(&self) -> &Path {
        &self.logfile
    }

    /// Whether the harness started the server and has not stopped it.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// A command for the PostgreSQL program `program`, with a clean
    /// environment, run in the test directory.
    fn pg_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(pg_bin(program));
        cmd.env_clear()
            .env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", pg_bin_dir().display()))
            .env("HOME", &self.home)
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .current_dir(&self.home);
        cmd
    }

    /// Appends `text` (and a newline) to `postgresql.conf`.
    pub fn append_conf(&self, text: &str) {
        let path = self.datadir.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        writeln!(file, "\n{text}").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Copies the project's example snippet `pg-config-examples/<name>` into
    /// the data directory and adds `include '<name>'` to `postgresql.conf`.
    pub fn include_example(&self, name: &str) {
        let to = self.datadir.join(name);
        fs::copy(config_example(name), &to).unwrap_or_else(|e| panic!("cannot copy {name} to {}: {e}", to.display()));
        chown_to_pg_user(&to);
        self.append_conf(&format!("include '{name}'"));
    }

    /// Creates the empty file `name` (e.g. `recovery.signal`) in the data
    /// directory.
    pub fn touch(&self, name: &str) {
        let path = self.datadir.join(name);
        fs::write(&path, b"").unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        chown_to_pg_user(&path);
    }

    /// Runs `pg_ctl start` and returns its outcome without judging it. The
    /// server's environment is the harness's clean one plus `env` (which may
    /// override `PATH`).
    pub fn try_start<K: AsRef<OsStr>, V: AsRef<OsStr>>(&mut self, env: &[(K, V)]) -> Cmd {
        let mut cmd = self.pg_command("pg_ctl");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.arg("-D")
            .arg(&self.datadir)
            .arg("-l")
            .arg(&self.logfile)
            .args(["-w", "-t", "300", "-o"])
            .arg(format!("-p {} -k {} -c listen_addresses=''", self.port, self.sockdir.display()))
            .arg("start");
        let out = run_as_pg_user(cmd);
        // pg_ctl may fail although the postmaster runs (e.g. timeout); treat
        // a live pid file as running so that Drop stops it.
        self.running = out.success() || self.datadir.join("postmaster.pid").exists();
        out
    }

    /// Starts the server (see [`PgCluster::try_start`]) and waits until it
    /// accepts connections; panics with the server log's tail on failure.
    pub fn start<K: AsRef<OsStr>, V: AsRef<OsStr>>(&mut self, env: &[(K, V)]) {
        let out = self.try_start(env);
        assert!(
            out.success(),
            "cannot start the cluster {}\n{out}\n--- server log (tail) ---\n{}",
            self.name,
            self.log_tail(60)
        );
    }

    /// Stops the server (fast mode) and waits for it; panics on failure.
    pub fn stop(&mut self) {
        let out = self.pg_ctl_stop("fast");
        assert!(
            out.success(),
            "cannot stop the cluster {}\n{out}\n--- server log (tail) ---\n{}",
            self.name,
            self.log_tail(60)
        );
        self.running = false;
    }

    fn pg_ctl_stop(&self, mode: &str) -> Cmd {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(["-m", mode, "-w", "-t", "120", "stop"]);
        as_pg_user(&mut cmd);
        run_with_timeout(cmd, Duration::from_secs(180))
    }

    /// Whether a postmaster is alive for this data directory (`pg_ctl status`).
    pub fn server_alive(&self) -> bool {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).arg("status");
        run_as_pg_user(cmd).success()
    }

    /// Forgets that the server was started (after checking that it exited on
    /// its own, e.g. because recovery failed).
    pub fn mark_stopped(&mut self) {
        self.running = false;
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        match fs::read(&self.logfile) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("<cannot read {}: {e}>", self.logfile.display()),
        }
    }

    /// The whole server log.
    pub fn log(&self) -> String {
        fs::read(&self.logfile).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn conn_args(&self, cmd: &mut Command) {
        cmd.arg("-h").arg(&self.sockdir).arg("-p").arg(self.port.to_string()).arg("-U").arg(superuser());
    }

    /// Runs `sql` with psql (`-X -A -t -q -v ON_ERROR_STOP=1`) and returns the
    /// outcome without judging it.
    pub fn try_psql(&self, sql: &str) -> Cmd {
        let mut cmd = self.pg_command("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]);
        self.conn_args(&mut cmd);
        cmd.args(["-d", "postgres", "-c", sql]);
        run_as_pg_user(cmd)
    }

    /// Runs `sql` and returns its unaligned, tuples-only output without the
    /// trailing newline; panics (with the log tail) on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        assert!(
            out.success(),
            "psql failed on cluster {}\n{out}\n--- server log (tail) ---\n{}",
            self.name,
            self.log_tail(30)
        );
        out.stdout.trim_end_matches('\n').to_owned()
    }

    /// Runs `pgbench ARGS… postgres`; panics on failure.
    pub fn pgbench(&self, args: &[&str]) -> Cmd {
        let mut cmd = self.pg_command("pgbench");
        self.conn_args(&mut cmd);
        cmd.args(args).arg("postgres");
        run_as_pg_user(cmd).expect_success("pgbench")
    }

    /// Runs `pg_basebackup -D TARGET ARGS…` (as the PostgreSQL OS user);
    /// panics on failure. With `-X none` it waits until the backup's WAL is
    /// archived.
    pub fn pg_basebackup(&self, target: &Path, args: &[&str]) -> Cmd {
        let mut cmd = self.pg_command("pg_basebackup");
        self.conn_args(&mut cmd);
        cmd.arg("-D").arg(target).args(args);
        as_pg_user(&mut cmd);
        let out = run_with_timeout(cmd, Duration::from_secs(600));
        assert!(out.success(), "pg_basebackup failed\n{out}\n--- server log (tail) ---\n{}", self.log_tail(40));
        out
    }

    /// The counters of `pg_stat_archiver`.
    pub fn archiver_stats(&self) -> ArchiverStats {
        let row = self.psql(
            "SELECT archived_count, coalesce(last_archived_wal, ''), failed_count, \
             coalesce(last_failed_wal, '') FROM pg_stat_archiver",
        );
        let fields: Vec<&str> = row.split('|').collect();
        assert_eq!(fields.len(), 4, "unexpected pg_stat_archiver row {row:?}");
        ArchiverStats {
            archived_count: fields[0].parse().expect("archived_count is a number"),
            last_archived_wal: fields[1].to_owned(),
            failed_count: fields[2].parse().expect("failed_count is a number"),
            last_failed_wal: fields[3].to_owned(),
        }
    }

    /// Forces a switch to a new WAL segment and returns the name of the
    /// segment just completed.
    pub fn switch_wal(&self) -> String {
        self.psql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Waits until `pg_stat_archiver.last_archived_wal >= wal_name` (names of
    /// one timeline sort in WAL order); panics after `timeout` with the
    /// archiver's counters and the server log's tail.
    pub fn wait_archived(&self, wal_name: &str, timeout: Duration) -> ArchiverStats {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.archiver_stats();
            if stats.last_archived_wal.as_str() >= wal_name {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting until {wal_name} is archived by cluster {}; \
                 pg_stat_archiver: {stats:?}\n--- server log (tail) ---\n{}",
                self.name,
                self.log_tail(40)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until a restored server has replayed to its target and paused
    /// (`recovery_target_action = 'pause'`): it then answers read-only
    /// queries on the state at the target.
    pub fn wait_paused_at_target(&self, timeout: Duration) {
        wait_until(timeout, &format!("cluster {} to pause at its recovery target", self.name), || {
            let out = self.try_psql("SELECT pg_get_wal_replay_pause_state()");
            assert!(self.server_alive(), "cluster {} stopped during recovery\n{}", self.name, self.log_tail(40));
            out.success() && out.stdout.trim() == "paused"
        });
    }

    /// Waits until a restored server has finished recovery and accepts writes.
    pub fn wait_promoted(&self, timeout: Duration) {
        wait_until(timeout, &format!("cluster {} to finish recovery", self.name), || {
            let out = self.try_psql("SELECT pg_is_in_recovery()");
            assert!(self.server_alive(), "cluster {} stopped during recovery\n{}", self.name, self.log_tail(40));
            out.success() && out.stdout.trim() == "f"
        });
    }

    /// The names of the files in `pg_wal/archive_status` that end in `.done`
    /// (without the suffix), sorted.
    pub fn archived_done(&self) -> Vec<String> {
        read_dir_sorted(&self.datadir.join("pg_wal").join("archive_status"))
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.strip_suffix(".done").map(str::to_owned))
            .collect()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if thread::panicking() && self.logfile.exists() {
            eprintln!(
                "--- server log of cluster {} ({}), tail ---\n{}\n---",
                self.name,
                self.logfile.display(),
                self.log_tail(60)
            );
        }
        if !self.running && !self.datadir.join("postmaster.pid").exists() {
            return;
        }
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        as_pg_user(&mut cmd);
        match try_run_with_timeout(cmd, Duration::from_secs(90)) {
            Ok(out) if out.success() || !self.running => {}
            Ok(out) => eprintln!("warning: cannot stop cluster {}\n{out}", self.name),
            Err(e) => eprintln!("warning: cannot stop cluster {}: {e}", self.name),
        }
        self.running = false;
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Moves backup `id`'s start and stop times so that it became consistent at
/// `stop_ms` (ms since the epoch), as if it had been taken then: the manifest
/// in the repository is rewritten in place (tests only; walvault never
/// rewrites a manifest). Run `walvault catalog rebuild` afterwards.
pub fn backdate_backup(repository: &Path, cluster: &str, id: &str, stop_ms: i64) {
    use walvault_formats::manifest::Manifest;
    use walvault_formats::object::{EncodeOptions, decode, encode};
    let path = repository.join(cluster).join("backups").join(id).join("manifest");
    let bytes = read_bytes(&path);
    let (_, plain) = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut m = Manifest::from_json(&plain).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shift = stop_ms - m.stop_time_ms;
    m.start_time_ms += shift;
    m.stop_time_ms += shift;
    let (_, stored) = encode(&m.to_json(), &EncodeOptions::default()).expect("encode the manifest");
    overwrite_file(&path, &stored);
}

/// The largest file under `dir` (in a repository's `data/`: a chunk or
/// bundle of the biggest relation).
pub fn largest_file(dir: &Path) -> PathBuf {
    let mut best = (0, dir.to_path_buf());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display())) {
            let e = e.unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
            let meta = e.metadata().unwrap_or_else(|e| panic!("cannot stat {}: {e}", e));
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.len() > best.0 {
                best = (meta.len(), e.path());
            }
        }
    }
    best.1
}

/// The name of the 16 MiB WAL segment of timeline `timeline` holding `lsn`
/// (`X/X`), like `pg_walfile_name()`.
pub fn segment_of_lsn(timeline: u32, lsn: &str) -> String {
    let (hi, lo) = lsn.split_once('/').unwrap_or_else(|| panic!("not an LSN: {lsn}"));
    let lsn = (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex");
    let segno = lsn / WAL_SEGMENT_SIZE as u64;
    format!("{timeline:08X}{:08X}{:08X}", segno / 256, segno % 256)
}

/// A started primary named `name` that archives through
/// `pg-config-examples/archive.conf` (no timed WAL switches, no early
/// recycling), its repository bound with `walvault init` while it runs.
pub fn archiving_primary(td: &TestDir, wv: &Walvault, name: &str) -> PgCluster {
    let mut pg = PgCluster::initdb(td, name, &[]);
    pg.include_example("archive.conf");
    pg.append_conf("max_wal_size = '1GB'\ncheckpoint_timeout = '30min'\narchive_timeout = 0");
    pg.start(&wv.server_env());
    wv.init(pg.datadir()).expect_success("walvault init (server running)");
    pg
}

/// `walvault restore --pgdata <td>/<tag> ARGS…`, then starts the restored
/// server without archiving (a test restore must not publish timelines into
/// the archive) and waits until recovery has paused at its target (`paused`,
/// for `--target-action pause`) or finished. Returns the server and what
/// restore printed.
pub fn restore_and_start(td: &TestDir, wv: &Walvault, tag: &str, args: &[&str], paused: bool) -> (PgCluster, String) {
    let dir = td.join(tag);
    let out = wv.restore(&dir, args).expect_success(&format!("walvault restore {args:?}"));
    let mut pg = PgCluster::existing(td, tag, &dir);
    pg.append_conf("archive_mode = off");
    pg.start(&wv.server_env());
    let timeout = Duration::from_secs(300);
    if paused {
        pg.wait_paused_at_target(timeout);
    } else {
        pg.wait_promoted(timeout);
    }
    (pg, out.stdout)
}

/// Polls `condition` every 100 ms until it returns true; panics after
/// `timeout` naming `what` was awaited.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// The whole content of `path`; panics naming the path on failure.
pub fn read_bytes(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Panics, naming both files and the first differing offset, unless `a` and
/// `b` have the same content.
#[track_caller]
pub fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (read_bytes(a), read_bytes(b));
    if x != y {
        let first = x.iter().zip(&y).position(|(p, q)| p != q).unwrap_or(x.len().min(y.len()));
        panic!(
            "{} ({} bytes) and {} ({} bytes) differ, first at offset {first}",
            a.display(),
            x.len(),
            b.display(),
            y.len()
        );
    }
}

/// The entries of the directory `dir`, sorted; empty when it does not exist.
pub fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    };
    entries.sort();
    entries
}

/// Every file and directory below `dir`, relative to it, with the content
/// of files (`None` for directories and other non-files); empty when `dir`
/// does not exist. Used to check that a failed command changed nothing.
pub fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for path in read_dir_sorted(dir) {
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                out.insert(rel, None);
                walk(root, &path, out);
            } else if meta.is_file() {
                out.insert(rel, Some(read_bytes(&path)));
            } else {
                out.insert(rel, None);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Panics, listing the added, removed and changed paths, unless two
/// snapshots from [`snapshot_tree`] are equal.
#[track_caller]
pub fn assert_same_tree(
    what: &str,
    before: &BTreeMap<PathBuf, Option<Vec<u8>>>,
    after: &BTreeMap<PathBuf, Option<Vec<u8>>>,
) {
    if before == after {
        return;
    }
    let mut diff = Vec::new();
    for (path, content) in after {
        match before.get(path) {
            None => diff.push(format!("added: {}", path.display())),
            Some(old) if old != content => diff.push(format!("changed: {}", path.display())),
            Some(_) => {}
        }
    }
    for path in before.keys().filter(|p| !after.contains_key(*p)) {
        diff.push(format!("removed: {}", path.display()));
    }
    panic!("{what} changed:\n  {}", diff.join("\n  "));
}

/// Flips (xor 0xff) the byte at `offset` of the file `path`, even when the
/// file is read-only (its mode is restored afterwards); returns the old byte.
pub fn flip_byte(path: &Path, offset: u64) -> u8 {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    let mode = meta.permissions().mode();
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o600))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut byte))
        .and_then(|_| file.seek(SeekFrom::Start(offset)))
        .and_then(|_| file.write_all(&[byte[0] ^ 0xff]))
        .and_then(|_| file.sync_all())
        .unwrap_or_else(|e| panic!("cannot flip byte {offset} of {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    byte[0]
}

/// Replaces the content of the existing file `path` with `contents`, even
/// when it is read-only, keeping its mode and owner.
pub fn overwrite_file(path: &Path, contents: &[u8]) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    let mode = meta.permissions().mode();
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o600))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

/// `md5(string_agg(t::text, '|' ORDER BY order_by))` over `table` on
/// `cluster`: a checksum of the table's whole content.
pub fn table_checksum(cluster: &PgCluster, table: &str, order_by: &str) -> String {
    cluster.psql(&format!("SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY {order_by})), 'empty') FROM {table} t"))
}

/// `value` as a string, whether it is a JSON string or a number (`15` and
/// `"15"` both give "15"); panics for other JSON types.
#[track_caller]
pub fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => panic!("expected a string or a number, got {other}"),
    }
}

/// The entry for `timeline` in the `timelines` array of `walvault info
/// --json` (whose `timeline` may be a number or a hexadecimal string such
/// as "00000001"), if any.
pub fn info_timeline(info: &serde_json::Value, timeline: u32) -> Option<&serde_json::Value> {
    info["timelines"].as_array()?.iter().find(|entry| {
        let text = json_text(&entry["timeline"]);
        text.parse::<u32>().ok() == Some(timeline) || u32::from_str_radix(&text, 16).ok() == Some(timeline)
    })
}

/// `info` without `newest.age_seconds`, the one field of `walvault info
/// --json` that changes with the clock.
pub fn without_age(info: &serde_json::Value) -> serde_json::Value {
    let mut info = info.clone();
    if let Some(newest) = info.get_mut("newest").and_then(|n| n.as_object_mut()) {
        newest.remove("age_seconds");
    }
    info
}

/// Deterministic pseudo-random bytes (xorshift), for non-WAL test files.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether the CI environment variable is set (tests that cannot run here
/// fail in CI instead of being skipped).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}
