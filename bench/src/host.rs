//! What every benchmark program does around its measurements: the work
//! directory, the walvault binaries copied into it, and the facts about the
//! machine and the sources the figures come from.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::ctx::{Ctx, WALVAULT_BINS, is_root, lookup_user, run};

/// The work directory; removed when dropped unless kept. Declare it before
/// any server living in it, so that the server is stopped first.
pub struct WorkDir {
    /// The directory.
    pub path: PathBuf,
    /// Keep it (`--keep`).
    pub keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("walvault-bench: kept '{}'", self.path.display());
        } else if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("walvault-bench: warning: unable to remove '{}': {e}", self.path.display());
        }
    }
}

/// What every program does before measuring: checks that PostgreSQL 15 is
/// installed, creates the work directory `<tmp>/<name>-<pid>` (owned by
/// `postgres` when running as root, who then runs every server and timed
/// command) and copies the walvault binaries into it. Bind the work
/// directory before any server living in it.
pub fn setup(name: &str, keep: bool) -> Result<(WorkDir, Ctx)> {
    let initdb = Path::new(crate::ctx::PG_BIN).join("initdb");
    if !initdb.is_file() {
        bail!("'{}' does not exist: install PostgreSQL 15 with scripts/install-deps.sh", initdb.display());
    }
    let pg_user = if is_root()? {
        Some(lookup_user("postgres")?.context("running as root, but the OS user 'postgres' does not exist")?)
    } else {
        None
    };
    let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    fs::create_dir(&path).with_context(|| format!("unable to create '{}'", path.display()))?;
    let work = WorkDir { path: path.clone(), keep };
    let ctx = Ctx { bin: path.join("bin"), work: path, pg_user };
    ctx.chown(&ctx.work)?;
    copy_binaries(&ctx)?;
    Ok((work, ctx))
}

/// Copies the release binaries next to this executable into `<work>/bin`,
/// where the PostgreSQL user can run them.
pub fn copy_binaries(ctx: &Ctx) -> Result<()> {
    let exe = std::env::current_exe().context("unable to find this executable")?;
    let from = exe.parent().context("this executable has no directory")?;
    ctx.mkdir("bin")?;
    for name in WALVAULT_BINS {
        let src = from.join(name);
        if !src.is_file() {
            bail!(
                "'{}' does not exist; build the binaries first: cargo build --release --workspace --bins",
                src.display()
            );
        }
        let dst = ctx.bin.join(name);
        fs::copy(&src, &dst).with_context(|| format!("unable to copy '{}' to '{}'", src.display(), dst.display()))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("unable to make '{}' executable", dst.display()))?;
    }
    Ok(())
}

/// The commit the walvault sources are at, and whether `lib/`, `bins/` or
/// the lock file differ from it (the binaries measured are built from them).
pub fn source_version() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        let mut cmd = std::process::Command::new("git");
        cmd.arg("-C").arg(&root).args(args).stdin(std::process::Stdio::null());
        run(cmd).ok().map(|s| s.trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--", "lib", "bins", "Cargo.toml", "Cargo.lock"])
                .is_none_or(|s| !s.is_empty());
            if dirty { format!("git {head} with uncommitted changes") } else { format!("git {head}") }
        }
        None => "unknown (not a git checkout)".to_string(),
    }
}

/// The first line `cmd ARG` prints (a version), or why there is none.
pub fn first_line(mut cmd: std::process::Command, arg: &str) -> String {
    cmd.arg(arg);
    run(cmd).map(|s| s.lines().next().unwrap_or("").trim().to_string()).unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The load average (1, 5, 15 minutes), as /proc/loadavg has it.
pub fn loadavg() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Facts about the machine the figures come from.
pub fn machine(work: &Path, versions: &[(String, String)]) -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mut out = vec![
        ("CPU".to_string(), format!("{cpu} ({nproc} CPUs online)")),
        ("memory".to_string(), mem),
        ("kernel".to_string(), kernel),
        ("file system of the work directory".to_string(), filesystem_of(work)),
    ];
    out.extend(versions.iter().cloned());
    out
}

/// `device (type, options)` of the mount holding `path`, from /proc/self/mounts.
fn filesystem_of(path: &Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && path.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} on {} ({}, {})", f[0], f[1], f[2], f[3])))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, s)| s)
}
