//! The benchmark's surroundings: the work directory, the OS user programs
//! run as, and how commands are built and timed.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the PostgreSQL 15 programs live (Debian's layout).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The walvault binaries the benchmark copies next to the data.
pub const WALVAULT_BINS: [&str; 3] = ["archive-push", "archive-fetch", "walvault"];

/// A PATH for every command: PostgreSQL's programs, then the system's.
const PATH: &str = "/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An OS user, as `/etc/passwd` knows it.
#[derive(Debug, Clone)]
pub struct OsUser {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id.
    pub gid: u32,
}

/// Everything the benchmark's steps share.
#[derive(Debug)]
pub struct Ctx {
    /// The work directory (under /tmp), owned by [`Ctx::pg_user`].
    pub work: PathBuf,
    /// `postgres` when the benchmark runs as root; `None` otherwise (every
    /// program then runs as the current user).
    pub pg_user: Option<OsUser>,
    /// Where the copied walvault binaries are.
    pub bin: PathBuf,
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> Result<bool> {
    let meta = fs::metadata("/proc/self").context("unable to stat '/proc/self' to learn the current user")?;
    Ok(meta.uid() == 0)
}

/// Looks `name` up in `/etc/passwd`.
pub fn lookup_user(name: &str) -> Result<Option<OsUser>> {
    let passwd = fs::read_to_string("/etc/passwd").context("unable to read '/etc/passwd'")?;
    Ok(passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(OsUser { name: name.to_string(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()? })
        } else {
            None
        }
    }))
}

impl Ctx {
    /// `<work>/<rel>`.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.work.join(rel)
    }

    /// Creates `<work>/<rel>` owned by the PostgreSQL user.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        let dir = self.path(rel);
        fs::create_dir_all(&dir).with_context(|| format!("unable to create '{}'", dir.display()))?;
        self.chown(&dir)?;
        Ok(dir)
    }

    /// Gives `path` (not recursively) to the PostgreSQL user, when root.
    pub fn chown(&self, path: &Path) -> Result<()> {
        if let Some(u) = &self.pg_user {
            std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
                .with_context(|| format!("unable to give '{}' to user '{}'", path.display(), u.name))?;
        }
        Ok(())
    }

    /// Gives `path` and everything below it to the PostgreSQL user, when root.
    pub fn chown_tree(&self, path: &Path) -> Result<()> {
        if self.pg_user.is_none() {
            return Ok(());
        }
        self.chown(path)?;
        let meta = fs::symlink_metadata(path).with_context(|| format!("unable to stat '{}'", path.display()))?;
        if meta.is_dir() {
            for entry in fs::read_dir(path).with_context(|| format!("unable to list '{}'", path.display()))? {
                let entry = entry.with_context(|| format!("unable to list '{}'", path.display()))?;
                self.chown_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// An administrative (untimed) PostgreSQL command: `initdb`, `pg_ctl`,
    /// `psql`, `pgbench`, run through `runuser -u postgres --` when root.
    pub fn admin(&self, program: &str) -> Command {
        let prog = Path::new(PG_BIN).join(program);
        let mut cmd = match &self.pg_user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(&u.name).arg("--").arg(prog);
                c
            }
            None => Command::new(prog),
        };
        self.clean_env(&mut cmd);
        cmd
    }

    /// A command whose run time is measured. When root it runs as the
    /// PostgreSQL user by switching uid/gid in the child (as the archiver
    /// process does not pay for `runuser`, neither does the measurement).
    pub fn tool(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        if let Some(u) = &self.pg_user {
            cmd.uid(u.uid).gid(u.gid);
        }
        self.clean_env(&mut cmd);
        cmd
    }

    /// One of the copied walvault binaries, as a [`Ctx::tool`].
    pub fn walvault(&self, program: &str) -> Command {
        self.tool(self.bin.join(program))
    }

    fn clean_env(&self, cmd: &mut Command) {
        cmd.env_clear()
            .env("PATH", PATH)
            .env("LC_ALL", "C")
            .env("TZ", "UTC")
            .env("HOME", &self.work)
            .current_dir(&self.work)
            .stdin(Stdio::null());
    }
}

/// Shows a command as a shell would read it, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// Runs `cmd` to completion; fails with its output unless it exits 0.
/// Returns its stdout.
pub fn run(mut cmd: Command) -> Result<String> {
    let shown = describe(&cmd);
    let out = cmd.output().with_context(|| format!("unable to run '{shown}'"))?;
    if !out.status.success() {
        bail!(
            "'{shown}' failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` as PostgreSQL runs `archive_command`: one process, waited
/// for. Returns the wall-clock time from spawn to exit. Fails unless it
/// exits 0 *and* prints nothing: archive commands are quiet on success, so
/// any output is a problem to look at, not noise to time.
pub fn timed(cmd: Command) -> Result<Duration> {
    timed_inner(cmd, true)
}

/// Like [`timed`], but output on stdout is allowed (e.g. `--version`).
pub fn timed_with_output(cmd: Command) -> Result<Duration> {
    timed_inner(cmd, false)
}

fn timed_inner(mut cmd: Command, quiet: bool) -> Result<Duration> {
    let shown = describe(&cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("unable to run '{shown}'"))?;
    let took = start.elapsed();
    if !out.status.success() || (quiet && !out.stdout.is_empty()) || !out.stderr.is_empty() {
        bail!(
            "'{shown}' exited with {} and printed:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// Runs `cmd` and counts the bytes it writes to stdout (e.g. `zstd -c`).
pub fn stdout_len(mut cmd: Command) -> Result<u64> {
    let shown = describe(&cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("unable to run '{shown}'"))?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let n = std::io::copy(&mut stdout, &mut std::io::sink()).with_context(|| format!("reading from '{shown}'"))?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).with_context(|| format!("reading from '{shown}'"))?;
    }
    let status = child.wait().with_context(|| format!("waiting for '{shown}'"))?;
    if !status.success() {
        bail!("'{shown}' failed ({status}): {err}");
    }
    Ok(n)
}

/// Sum of the sizes of the regular files under `dir` (0 if it is absent).
pub fn tree_bytes(dir: &Path) -> Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("unable to list '{}'", dir.display())),
    };
    let mut total = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("unable to list '{}'", dir.display()))?;
        let meta = entry.metadata().with_context(|| format!("unable to stat '{}'", entry.path().display()))?;
        if meta.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Fails loudly unless the files `a` and `b` hold the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> Result<()> {
    let x = fs::read(a).with_context(|| format!("unable to read '{}'", a.display()))?;
    let y = fs::read(b).with_context(|| format!("unable to read '{}'", b.display()))?;
    if x != y {
        bail!(
            "'{}' ({} bytes) differs from the original '{}' ({} bytes): a fetched segment is wrong",
            b.display(),
            y.len(),
            a.display(),
            x.len()
        );
    }
    Ok(())
}

/// Removes a file, ignoring "not found".
pub fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unable to remove '{}'", path.display()))
        }
        _ => Ok(()),
    }
}

/// Flushes every dirty page to disk (`sync`), so that write-back of earlier
/// steps does not land in the next measurement.
pub fn sync_all() -> Result<()> {
    let mut cmd = Command::new("sync");
    cmd.stdin(Stdio::null());
    run(cmd).map(|_| ())
}
