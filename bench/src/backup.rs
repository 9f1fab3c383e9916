//! The base-backup and restore suite: `walvault backup` and `restore` side
//! by side with `pg_basebackup` and pgBackRest on one pgbench cluster —
//! a full backup, a second one after pgbench traffic, a third after a local
//! update, and restores of the first two, checked against each other (see
//! `docs/benchmarks.md`, "Base backup and restore").

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::compare::{CLUSTER, walvault_init};
use crate::ctx::{Ctx, PG_BIN, describe, run, sync_all, tree_bytes};
use crate::json;
use crate::pg::Server;

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct Options {
    /// `pgbench -i -s SCALE`.
    pub scale: u32,
    /// Processes for walvault (`--jobs`) and pgBackRest (`--process-max`).
    pub jobs: u16,
    /// How many times the whole sequence runs, each time with fresh
    /// repositories and a fresh `pgbench -i`.
    pub rounds: usize,
    /// Seconds of `pgbench -n -c 2 -j 2` before the second backup.
    pub pgbench_secs: u32,
}

impl Default for Options {
    fn default() -> Options {
        Options { scale: 100, jobs: 2, rounds: 1, pgbench_secs: 30 }
    }
}

/// Section of the report a timed operation belongs to.
pub const FULL: &str = "full backup";
/// The backup after pgbench traffic (pgBackRest `--type=incr`).
pub const SECOND: &str = "second backup";
/// The backup after an update of a contiguous few per cent of the rows
/// (pgBackRest `--type=incr` again).
pub const THIRD: &str = "third backup";
/// Restore of the full backup.
pub const RESTORE_FULL: &str = "restore of the full backup";
/// Restore of the second backup.
pub const RESTORE_SECOND: &str = "restore of the second backup";
/// Starting a restored cluster until it accepts connections (untimed by the
/// targets; recovery replays the WAL of the backup through restore_command).
pub const START: &str = "start of the restored second backup until consistent";

/// The share of `pgbench_accounts` updated before the third backup: rows
/// `aid <= scale * 100000 * LOCAL_CHANGE_PERCENT / 100`, which pgbench -i
/// wrote one after the other, so the change is local (the first pages of
/// the table and of its index, and new row versions at the end of the
/// table) — unlike pgbench's uniformly random updates, which touch nearly
/// every 1 MiB of the table within seconds.
pub const LOCAL_CHANGE_PERCENT: u64 = 2;

/// Tool labels, as the tables show them.
pub const WALVAULT: &str = "walvault";
/// pgBackRest.
pub const PGBACKREST: &str = "pgBackRest";
/// `pg_basebackup`, plain format.
pub const PGBB_PLAIN: &str = "pg_basebackup -X none -Fp";

/// One timed operation of one round.
#[derive(Debug, Clone)]
pub struct Row {
    /// [`FULL`], [`SECOND`], [`RESTORE_FULL`], ...
    pub section: &'static str,
    /// [`WALVAULT`], [`PGBACKREST`], or a `pg_basebackup` label.
    pub tool: String,
    /// Wall time from spawn to exit.
    pub secs: f64,
    /// CPU time (user + system) of the command and every process it
    /// waited for; NaN when not measured.
    pub cpu: f64,
    /// Bytes stored (full backup), added (second backup) or written (restore).
    pub bytes: u64,
}

impl Row {
    fn new(section: &'static str, tool: impl Into<String>, t: Took, bytes: u64) -> Row {
        Row { section, tool: tool.into(), secs: t.wall, cpu: t.cpu, bytes }
    }
}

/// How long a command took.
#[derive(Debug, Clone, Copy)]
pub struct Took {
    /// Wall seconds, spawn to exit.
    pub wall: f64,
    /// CPU seconds (user + system) of the command and its waited-for
    /// descendants (threads and worker processes included; not the
    /// PostgreSQL server's work for it).
    pub cpu: f64,
}

/// CPU seconds of this process's waited-for children so far (`cutime` +
/// `cstime` of /proc/self/stat, in USER_HZ = 100 ticks a second on Linux).
fn children_cpu() -> Result<f64> {
    let stat = fs::read_to_string("/proc/self/stat").context("unable to read '/proc/self/stat'")?;
    // Fields after the command name, which is in parentheses: state is
    // field 3, cutime 16, cstime 17.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("unexpected /proc/self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).context("unexpected /proc/self/stat");
    Ok((ticks(13)? + ticks(14)?) as f64 / 100.0)
}

/// What walvault says about one of its backups, and what the repository
/// grew by while it was taken.
#[derive(Debug, Clone)]
pub struct WalvaultBackup {
    /// [`FULL`], [`SECOND`] or [`THIRD`].
    pub section: &'static str,
    /// Backup id.
    pub id: String,
    /// `size` in `walvault info --json`.
    pub size: u64,
    /// `stored_size`.
    pub stored_size: u64,
    /// `new_bytes`.
    pub new_bytes: u64,
    /// Growth of the repository outside `wal/` (data objects and manifest).
    pub repo_growth: u64,
    /// Growth of `<repo>/<cluster>/data` alone.
    pub data_growth: u64,
    /// The line `walvault backup` printed.
    pub summary: String,
}

/// Everything one round measured.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Timed operations, in the order they ran.
    pub rows: Vec<Row>,
    /// walvault's own accounting of its backups.
    pub walvault: Vec<WalvaultBackup>,
    /// Data directory bytes (without `pg_wal`) at the first backup.
    pub data_bytes: u64,
    /// Transactions pgbench ran between the first two backups.
    pub transactions: Option<u64>,
    /// Rows of `pgbench_accounts` updated between the second and the third
    /// backup (the first [`LOCAL_CHANGE_PERCENT`] % by `aid`).
    pub updated_rows: Option<u64>,
    /// Load average at the start and the end of the round.
    pub load: (String, String),
    /// What passed (relation files compared, restored clusters started).
    pub checks: Vec<String>,
    /// What failed: a tool's error, different restored files, a restored
    /// cluster that did not come up. Any of these fails the run.
    pub problems: Vec<String>,
    /// Anything a tool printed on stderr although it succeeded.
    pub notes: Vec<String>,
}

/// The whole suite's outcome.
#[derive(Debug, Clone)]
pub struct Results {
    /// The options it ran with.
    pub opts: Options,
    /// The compressed `pg_basebackup` row's label.
    pub pgbb_compressed: String,
    /// Whether pgBackRest was measured.
    pub pgbackrest: bool,
    /// Seconds the first `pgbench -i` took.
    pub init_secs: f64,
    /// Per round.
    pub rounds: Vec<Round>,
}

/// A restored cluster started to check it; stopped when dropped.
struct Started<'a> {
    ctx: &'a Ctx,
    datadir: PathBuf,
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        let mut cmd = self.ctx.admin("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(["-m", "immediate", "-w", "-t", "120", "stop"]);
        if let Err(e) = run(cmd) {
            eprintln!("walvault-bench: warning: unable to stop the restored cluster: {e:#}");
        }
    }
}

/// The suite's state: the cluster, the configuration files, this round's
/// repositories.
struct Suite<'a> {
    ctx: &'a Ctx,
    opts: &'a Options,
    server: Server<'a>,
    pgdata: PathBuf,
    port: u16,
    walvault_conf: PathBuf,
    pgbackrest_conf: Option<PathBuf>,
    walvault_repo: PathBuf,
    pgbackrest_repo: PathBuf,
    pgbb_compress: String,
}

/// Runs the suite in `<work>/backup`, prints its report, and writes it to
/// `out/results-backup.md` (and every timing to `out/samples-backup.csv`)
/// when asked. Returns whether every check passed and every tool succeeded.
pub fn main(
    ctx: &Ctx,
    opts: &Options,
    machine: &[(String, String)],
    command: &str,
    out: Option<&Path>,
    with_pgbackrest: bool,
) -> Result<bool> {
    let sub = Ctx { work: ctx.mkdir("backup")?, bin: ctx.bin.clone(), pg_user: ctx.pg_user.clone() };
    eprintln!("walvault-bench: backup suite in '{}'", sub.work.display());
    let results = run_suite(&sub, opts, with_pgbackrest)?;
    let md = crate::backup_report::markdown(&results, machine, command);
    writeln!(std::io::stdout(), "{md}").context("unable to write the results to stdout")?;
    if let Some(dir) = out {
        fs::create_dir_all(dir).with_context(|| format!("unable to create '{}'", dir.display()))?;
        let (file, csv) = (dir.join("results-backup.md"), dir.join("samples-backup.csv"));
        fs::write(&file, &md).with_context(|| format!("unable to write '{}'", file.display()))?;
        fs::write(&csv, crate::backup_report::csv(&results))
            .with_context(|| format!("unable to write '{}'", csv.display()))?;
        eprintln!("walvault-bench: wrote '{}' and '{}'", file.display(), csv.display());
    }
    Ok(results.rounds.iter().all(|r| r.problems.is_empty()))
}

/// Runs the suite in `ctx.work` (its own directory). `with_pgbackrest`:
/// whether the `pgbackrest` program can be run.
pub fn run_suite(ctx: &Ctx, opts: &Options, with_pgbackrest: bool) -> Result<Results> {
    let server = Server::initdb(ctx)?;
    let pgdata = server.datadir().to_path_buf();
    let walvault_conf = ctx.path("walvault.toml");
    let pgbackrest_conf = with_pgbackrest.then(|| ctx.path("pgbackrest.conf"));
    // Every segment goes to both archives, as the issue asks: one
    // archive_command, both in it. Both backups wait for their last WAL to
    // be archived, so neither can finish before the other's push of it.
    let mut archive = format!("{} --config {} %p", ctx.bin.join("archive-push").display(), walvault_conf.display());
    if let Some(conf) = &pgbackrest_conf {
        archive.push_str(&format!(" && pgbackrest --config={} --stanza={CLUSTER} archive-push %p", conf.display()));
    }
    // Later lines override pg::Server's settings. autovacuum is off so that
    // nothing changes the relation files between the backups taken one
    // after the other, which the restore check compares.
    let conf = format!(
        "\n# added by the backup suite\narchive_command = '{archive}'\nwal_keep_size = 0\n\
         max_wal_size = '4GB'\nautovacuum = off\n"
    );
    let path = pgdata.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .with_context(|| format!("unable to write '{}'", path.display()))?;

    let pgbb_compress = pg_basebackup_compression();
    let mut s = Suite {
        ctx,
        opts,
        server,
        pgdata,
        port: 0,
        walvault_conf,
        pgbackrest_conf,
        walvault_repo: PathBuf::new(),
        pgbackrest_repo: PathBuf::new(),
        pgbb_compress,
    };
    s.server.start()?;
    let port = s.server.psql("SHOW port")?;
    s.port = port.parse().with_context(|| format!("the server's port is '{port}'"))?;

    let (mut rounds, mut init_secs) = (Vec::new(), 0.0);
    for r in 0..opts.rounds {
        s.fresh_repositories(r)?;
        // A fresh pgbench -i every round: each round starts from the same
        // compact tables. (A VACUUM instead would leave free space all over
        // pgbench_accounts, and the third backup's update would then write
        // its new row versions all over the table rather than at its end.)
        eprintln!("walvault-bench: round {}: pgbench -i -s {} (about {} MB)", r + 1, opts.scale, opts.scale * 15);
        let t = Instant::now();
        s.server.pgbench(&["-i", "-s", &opts.scale.to_string(), "-q"]).context("pgbench -i failed")?;
        if r == 0 {
            init_secs = t.elapsed().as_secs_f64();
        }
        rounds.push(s.round(r)?);
    }
    let pgbb_compressed = format!("pg_basebackup -X none -Ft --compress={}", s.pgbb_compress);
    s.server.stop()?;
    Ok(Results { opts: opts.clone(), pgbb_compressed, pgbackrest: with_pgbackrest, init_secs, rounds })
}

/// `client-zstd:3` when this PostgreSQL was built with zstd, else gzip.
fn pg_basebackup_compression() -> String {
    let mut cmd = Command::new(Path::new(PG_BIN).join("pg_config"));
    cmd.arg("--configure");
    match run(cmd) {
        Ok(c) if c.contains("--with-zstd") => "client-zstd:3".into(),
        _ => "client-gzip:6".into(),
    }
}

/// Runs `cmd` to completion, timed from spawn to exit; fails unless it
/// exits 0. Returns the times, stdout and stderr.
fn timed_run(mut cmd: Command) -> Result<(Took, String, String)> {
    let shown = describe(&cmd);
    let cpu0 = children_cpu()?;
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("unable to run '{shown}'"))?;
    let secs = start.elapsed().as_secs_f64();
    let took = Took { wall: secs, cpu: children_cpu()? - cpu0 };
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    if !out.status.success() {
        bail!("'{shown}' failed ({}) after {secs:.1} s:\n{stdout}{stderr}", out.status);
    }
    Ok((took, stdout, stderr))
}

/// Records `f`'s error as a problem of the round instead of ending the
/// run, so that the other tools are still measured.
fn attempt<T>(round: &mut Round, what: &str, f: impl FnOnce(&mut Round) -> Result<T>) -> Option<T> {
    match f(round) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("walvault-bench: {what} failed: {e:#}");
            round.problems.push(format!("{what} failed: {e:#}"));
            None
        }
    }
}

/// Removes a directory tree, ignoring "not found".
fn remove_tree(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unable to remove '{}'", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Bytes under `repo` outside `<cluster>/wal/` (WAL is archived all along).
fn repo_bytes_but_wal(repo: &Path) -> Result<u64> {
    Ok(tree_bytes(repo)? - tree_bytes(&repo.join(CLUSTER).join("wal"))?)
}

impl Suite<'_> {
    /// Points both configuration files at new repositories under
    /// `<work>/round-<r>/`, then `walvault init` and `stanza-create`.
    fn fresh_repositories(&mut self, r: usize) -> Result<()> {
        let ctx = self.ctx;
        let dir = ctx.mkdir(format!("round-{r}"))?;
        if r > 0 {
            // The previous round's repositories are no longer needed.
            remove_tree(&ctx.path(format!("round-{}", r - 1)))?;
        }
        self.walvault_repo = dir.join("walvault-repo");
        self.pgbackrest_repo = dir.join("pgbackrest-repo");
        let text = format!(
            "cluster = \"{CLUSTER}\"\nrepository = \"{}\"\ncatalog = \"{}\"\ncompress-level = 3\n",
            self.walvault_repo.display(),
            dir.join("catalog.db").display()
        );
        fs::write(&self.walvault_conf, text)
            .with_context(|| format!("unable to write '{}'", self.walvault_conf.display()))?;
        ctx.chown(&self.walvault_conf)?;
        walvault_init(ctx, &self.walvault_conf, &self.pgdata).context("walvault init failed")?;
        if let Some(conf) = &self.pgbackrest_conf {
            // zst level 3, as walvault; retention set only to silence the
            // warning that it is not.
            let text = format!(
                "[global]\nrepo1-path={}\nrepo1-retention-full=99\ncompress-type=zst\ncompress-level=3\n\
                 log-level-console=warn\nlog-path={}\nlock-path={}\nspool-path={}\n\n\
                 [{CLUSTER}]\npg1-path={}\npg1-socket-path={}\npg1-port={}\n",
                self.pgbackrest_repo.display(),
                ctx.mkdir("pgbr-log")?.display(),
                ctx.mkdir("pgbr-lock")?.display(),
                ctx.mkdir("pgbr-spool")?.display(),
                self.pgdata.display(),
                ctx.work.display(),
                self.port
            );
            fs::write(conf, text).with_context(|| format!("unable to write '{}'", conf.display()))?;
            ctx.chown(conf)?;
            run(self.pgbackrest(&["stanza-create"])).context("pgbackrest stanza-create failed")?;
        }
        Ok(())
    }

    fn pgbackrest(&self, args: &[&str]) -> Command {
        let conf = self.pgbackrest_conf.as_deref().unwrap_or(Path::new("/nonexistent"));
        let mut cmd = self.ctx.tool("pgbackrest");
        cmd.arg(format!("--config={}", conf.display())).arg(format!("--stanza={CLUSTER}")).args(args);
        cmd
    }

    fn walvault(&self, args: &[&str]) -> Command {
        let mut cmd = self.ctx.walvault("walvault");
        cmd.arg("--config").arg(&self.walvault_conf).args(args);
        cmd
    }

    /// The libpq environment `walvault backup` connects with.
    fn libpq_env(&self, cmd: &mut Command) {
        let user = match &self.ctx.pg_user {
            Some(u) => u.name.clone(),
            None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        };
        cmd.env("PGHOST", &self.ctx.work)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", user)
            .env("PGDATABASE", "postgres");
    }

    /// Before each timed operation: nothing left for the archiver, a
    /// checkpoint, and every dirty page written back, so that no earlier
    /// step's work lands in the measurement.
    fn settle(&self) -> Result<()> {
        let status = self.pgdata.join("pg_wal").join("archive_status");
        let t = Instant::now();
        loop {
            let ready = fs::read_dir(&status)
                .with_context(|| format!("unable to list '{}'", status.display()))?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().ends_with(".ready"));
            if !ready {
                break;
            }
            if t.elapsed() > Duration::from_secs(600) {
                let stat = self.server.psql("SELECT last_failed_wal, failed_count FROM pg_stat_archiver")?;
                bail!("WAL is still waiting to be archived after 600 s (last failed, failures: {stat})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.server.psql("CHECKPOINT")?;
        sync_all()
    }

    /// Before an operation that writes a copy of the data directory: writes
    /// a file as large as the data directory (fsynced), removes it, and
    /// `sync`s. On the VM these figures come from, writing into blocks the
    /// file system has not used for a while is about 4× slower than writing
    /// into blocks just freed (`dd conv=fsync` of 1.5 GB: 4.4 s against
    /// 1.1 s); without this, whichever restore came first after a quiet
    /// spell paid for it, and the restores of the second backups (which
    /// reused the blocks of the first ones) looked twice as fast.
    fn prime_disk(&self) -> Result<()> {
        let bytes = tree_bytes(&self.pgdata)? - tree_bytes(&self.pgdata.join("pg_wal"))?;
        let path = self.ctx.path("prime.tmp");
        let chunk = vec![0xA5u8; 1 << 20];
        let mut f = fs::File::create(&path).with_context(|| format!("unable to create '{}'", path.display()))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64);
            // n <= chunk.len(), which is a usize.
            f.write_all(&chunk[..usize::try_from(n).unwrap_or(chunk.len())])
                .and_then(|()| f.flush())
                .with_context(|| format!("unable to write '{}'", path.display()))?;
            left -= n;
        }
        f.sync_all().with_context(|| format!("unable to fsync '{}'", path.display()))?;
        drop(f);
        fs::remove_file(&path).with_context(|| format!("unable to remove '{}'", path.display()))?;
        sync_all()
    }

    /// An empty directory `<work>/<name>` for a restore or pg_basebackup.
    fn empty_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.ctx.path(name);
        remove_tree(&dir)?;
        let dir = self.ctx.mkdir(name)?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("unable to set the mode of '{}'", dir.display()))?;
        Ok(dir)
    }

    fn note(round: &mut Round, tool: &str, stderr: &str) {
        if !stderr.trim().is_empty() {
            round.notes.push(format!("{tool} printed on stderr: {}", stderr.trim()));
        }
    }

    /// `pg_basebackup` into a fresh directory; returns (seconds, bytes).
    fn pg_basebackup(&self, round: &mut Round, compressed: bool) -> Result<(Took, u64)> {
        let out = self.empty_dir("pg_basebackup")?;
        if !compressed {
            self.prime_disk()?;
        }
        let mut cmd = self.ctx.tool("pg_basebackup");
        cmd.arg("-h").arg(&self.ctx.work).arg("-p").arg(self.port.to_string()).arg("-D").arg(&out);
        cmd.args(["-X", "none", "-c", "fast"]);
        if compressed {
            cmd.arg("-Ft").arg(format!("--compress={}", self.pgbb_compress));
        } else {
            cmd.arg("-Fp");
        }
        let (secs, _, err) = timed_run(cmd)?;
        Self::note(round, "pg_basebackup", &err);
        let bytes = tree_bytes(&out)?;
        remove_tree(&out)?;
        Ok((secs, bytes))
    }

    /// The ids and sizes of walvault's backups, from `walvault info --json`.
    fn walvault_backups(&self) -> Result<Vec<json::Value>> {
        let text = run(self.walvault(&["info", "--json"]))?;
        let doc = json::parse(&text).context("unable to read the output of 'walvault info --json'")?;
        Ok(doc.get("backups").and_then(json::Value::array).context("'walvault info --json' has no 'backups'")?.to_vec())
    }

    /// `walvault backup`; returns the seconds and walvault's accounting.
    fn walvault_backup(&self, round: &mut Round, section: &'static str) -> Result<(Took, WalvaultBackup)> {
        let before = self.walvault_backups()?;
        let known: BTreeSet<String> =
            before.iter().filter_map(|b| b.get("id").and_then(json::Value::str)).map(String::from).collect();
        let (repo0, data0) =
            (repo_bytes_but_wal(&self.walvault_repo)?, tree_bytes(&self.walvault_repo.join(CLUSTER).join("data"))?);
        let jobs = self.opts.jobs.to_string();
        let mut cmd =
            self.walvault(&["backup", "--fast", "--jobs", &jobs, "--pgdata", &self.pgdata.display().to_string()]);
        self.libpq_env(&mut cmd);
        let (secs, out, err) = timed_run(cmd)?;
        Self::note(round, "walvault backup", &err);
        let after = self.walvault_backups()?;
        let new: Vec<&json::Value> = after
            .iter()
            .filter(|b| b.get("id").and_then(json::Value::str).is_some_and(|id| !known.contains(id)))
            .collect();
        let [b] = new.as_slice() else {
            bail!("'walvault info --json' lists {} new backups after one 'walvault backup', expected 1", new.len());
        };
        let field = |k: &str| b.get(k).and_then(json::Value::u64).with_context(|| format!("backup has no '{k}'"));
        let backup = WalvaultBackup {
            section,
            id: b.get("id").and_then(json::Value::str).unwrap_or_default().to_string(),
            size: field("size")?,
            stored_size: field("stored_size")?,
            new_bytes: field("new_bytes")?,
            repo_growth: repo_bytes_but_wal(&self.walvault_repo)?.saturating_sub(repo0),
            data_growth: tree_bytes(&self.walvault_repo.join(CLUSTER).join("data"))?.saturating_sub(data0),
            summary: out.trim().to_string(),
        };
        Ok((secs, backup))
    }

    /// The backup labels in pgBackRest's repository.
    fn pgbackrest_labels(&self) -> Result<BTreeSet<String>> {
        let dir = self.pgbackrest_repo.join("backup").join(CLUSTER);
        let mut out = BTreeSet::new();
        for e in fs::read_dir(&dir).with_context(|| format!("unable to list '{}'", dir.display()))? {
            let e = e.with_context(|| format!("unable to list '{}'", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Labels are 20261121-143000F or 20261121-143000F_20261121-150000I.
            if e.file_type().is_ok_and(|t| t.is_dir()) && name.starts_with(|c: char| c.is_ascii_digit()) {
                out.insert(name);
            }
        }
        Ok(out)
    }

    /// `pgbackrest backup --type=TYPE`; returns (seconds, label, bytes of
    /// the new backup's directory).
    fn pgbackrest_backup(&self, round: &mut Round, kind: &str) -> Result<(Took, String, u64)> {
        let before = self.pgbackrest_labels()?;
        let process_max = format!("--process-max={}", self.opts.jobs);
        let cmd = self.pgbackrest(&[&format!("--type={kind}"), "--start-fast", &process_max, "backup"]);
        let (secs, _, err) = timed_run(cmd)?;
        Self::note(round, "pgbackrest backup", &err);
        let new: Vec<String> = self.pgbackrest_labels()?.difference(&before).cloned().collect();
        let [label] = new.as_slice() else {
            bail!("pgBackRest's repository has {} new backups after one backup, expected 1", new.len());
        };
        let bytes = tree_bytes(&self.pgbackrest_repo.join("backup").join(CLUSTER).join(label))?;
        Ok((secs, label.clone(), bytes))
    }

    /// `walvault restore` of backup `id` into a fresh `<work>/<name>`.
    fn walvault_restore(&self, round: &mut Round, id: &str, name: &str) -> Result<(Took, PathBuf)> {
        let dir = self.empty_dir(name)?;
        let jobs = self.opts.jobs.to_string();
        let dir_s = dir.display().to_string();
        let cmd = self.walvault(&[
            "restore",
            "--pgdata",
            &dir_s,
            "--jobs",
            &jobs,
            "--target",
            "immediate",
            "--target-action",
            "pause",
            "--backup",
            id,
        ]);
        self.prime_disk()?;
        let (secs, _, err) = timed_run(cmd)?;
        Self::note(round, "walvault restore", &err);
        Ok((secs, dir))
    }

    /// `pgbackrest restore` of backup `label` into a fresh `<work>/<name>`.
    fn pgbackrest_restore(&self, round: &mut Round, label: &str, name: &str) -> Result<(Took, PathBuf)> {
        let dir = self.empty_dir(name)?;
        let cmd = self.pgbackrest(&[
            &format!("--pg1-path={}", dir.display()),
            &format!("--process-max={}", self.opts.jobs),
            "--type=immediate",
            "--target-action=pause",
            &format!("--set={label}"),
            "restore",
        ]);
        self.prime_disk()?;
        let (secs, _, err) = timed_run(cmd)?;
        Self::note(round, "pgbackrest restore", &err);
        Ok((secs, dir))
    }

    /// Starts the restored cluster in `dir` on another port with archiving
    /// off, waits until it accepts connections (recovery paused at the
    /// consistent point), checks pgbench's accounts, stops it. Returns the
    /// seconds until it accepted connections.
    fn start_restored(&self, dir: &Path, what: &str) -> Result<f64> {
        let port = self.port.checked_add(1).context("no port left for the restored cluster")?;
        let log = self.ctx.path(format!("{what}.log"));
        let mut cmd = self.ctx.admin("pg_ctl");
        cmd.arg("-D").arg(dir).arg("-l").arg(&log).args(["-w", "-t", "600", "-o"]);
        cmd.arg(format!("-p {port} -c archive_mode=off"));
        cmd.arg("start");
        let guard = Started { ctx: self.ctx, datadir: dir.to_path_buf() };
        let t = Instant::now();
        run(cmd).with_context(|| format!("the restored cluster did not start; see '{}'", log.display()))?;
        let secs = t.elapsed().as_secs_f64();
        let mut psql = self.ctx.admin("psql");
        psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"]).arg(&self.ctx.work);
        psql.arg("-p").arg(port.to_string()).args(["-d", "postgres", "-c"]);
        psql.arg("SELECT pg_is_in_recovery(), count(*) FROM pgbench_accounts");
        let got = run(psql)?.trim().to_string();
        let want = format!("t|{}", u64::from(self.opts.scale) * 100_000);
        drop(guard);
        if got != want {
            bail!("the restored cluster answered '{got}' (in recovery, accounts), expected '{want}'");
        }
        Ok(secs)
    }

    /// Runs one round: full backups, pgbench, second backups, restores.
    fn round(&self, r: usize) -> Result<Round> {
        let step = |what: &str| eprintln!("walvault-bench: round {}: {what}", r + 1);
        let mut round = Round { load: (crate::report::loadavg(), String::new()), ..Round::default() };
        round.data_bytes = tree_bytes(&self.pgdata)? - tree_bytes(&self.pgdata.join("pg_wal"))?;
        let have_pgbr = self.pgbackrest_conf.is_some();
        // pg_basebackup first (it also brings the whole cluster into the
        // page cache), then walvault and pgBackRest, in turns across rounds.
        let walvault_first = r.is_multiple_of(2);

        for compressed in [false, true] {
            let tool = if compressed {
                format!("pg_basebackup -X none -Ft --compress={}", self.pgbb_compress)
            } else {
                PGBB_PLAIN.to_string()
            };
            step(&tool);
            self.settle()?;
            if let Some((secs, bytes)) = attempt(&mut round, &tool, |rd| self.pg_basebackup(rd, compressed)) {
                round.rows.push(Row::new(FULL, tool, secs, bytes));
            }
        }
        let mut ids: [Option<String>; 3] = [None, None, None];
        let mut labels: [Option<String>; 3] = [None, None, None];
        for (i, section) in [FULL, SECOND, THIRD].into_iter().enumerate() {
            if section == SECOND {
                step(&format!("pgbench -n -c 2 -j 2 -T {}", self.opts.pgbench_secs));
                round.transactions = Some(self.pgbench_traffic()?);
            } else if section == THIRD {
                let n = u64::from(self.opts.scale) * 100_000 * LOCAL_CHANGE_PERCENT / 100;
                step(&format!("UPDATE of {n} rows"));
                self.server.psql(&format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= {n}"))?;
                round.updated_rows = Some(n);
            }
            for walvault_turn in [walvault_first, !walvault_first] {
                self.settle()?;
                if walvault_turn {
                    step(&format!("walvault backup ({section})"));
                    if let Some((secs, b)) = attempt(&mut round, &format!("walvault backup ({section})"), |rd| {
                        self.walvault_backup(rd, section)
                    }) {
                        let bytes = if section == FULL { b.stored_size } else { b.new_bytes };
                        round.rows.push(Row::new(section, WALVAULT, secs, bytes));
                        ids[i] = Some(b.id.clone());
                        round.walvault.push(b);
                    }
                } else if have_pgbr {
                    let kind = if section == FULL { "full" } else { "incr" };
                    step(&format!("pgbackrest backup --type={kind}"));
                    if let Some((secs, label, bytes)) =
                        attempt(&mut round, &format!("pgbackrest backup --type={kind}"), |rd| {
                            self.pgbackrest_backup(rd, kind)
                        })
                    {
                        round.rows.push(Row::new(section, PGBACKREST, secs, bytes));
                        labels[i] = Some(label);
                    }
                }
            }
        }

        for (i, section) in [RESTORE_FULL, RESTORE_SECOND].into_iter().enumerate() {
            let mut dirs: [Option<PathBuf>; 2] = [None, None];
            for walvault_turn in [walvault_first, !walvault_first] {
                if walvault_turn {
                    let Some(id) = ids[i].clone() else { continue };
                    step(&format!("walvault restore ({section})"));
                    let what = format!("walvault restore ({section})");
                    if let Some((secs, dir)) =
                        attempt(&mut round, &what, |rd| self.walvault_restore(rd, &id, "restore-walvault"))
                    {
                        round.rows.push(Row::new(section, WALVAULT, secs, tree_bytes(&dir)?));
                        dirs[0] = Some(dir);
                    }
                } else {
                    let Some(label) = labels[i].clone() else { continue };
                    step(&format!("pgbackrest restore ({section})"));
                    let what = format!("pgbackrest restore ({section})");
                    if let Some((secs, dir)) =
                        attempt(&mut round, &what, |rd| self.pgbackrest_restore(rd, &label, "restore-pgbackrest"))
                    {
                        round.rows.push(Row::new(section, PGBACKREST, secs, tree_bytes(&dir)?));
                        dirs[1] = Some(dir);
                    }
                }
            }
            if let [Some(a), Some(b)] = &dirs {
                step("comparing the two restores");
                match compare_restores(a, b).and_then(|c| Ok((c, self.pgbench_files()?))) {
                    Ok((c, pgbench)) => self.judge(&mut round, section, &c, &pgbench),
                    Err(e) => round.problems.push(format!("{section}: unable to compare the restores: {e:#}")),
                }
            }
            if section == RESTORE_SECOND {
                for (k, tool) in [(0, WALVAULT), (1, PGBACKREST)] {
                    let Some(dir) = &dirs[k] else { continue };
                    step(&format!("starting {tool}'s restore ({section})"));
                    let what = format!("start of {tool}'s restored second backup");
                    if let Some(secs) =
                        attempt(&mut round, &what, |_| self.start_restored(dir, &format!("restored-{k}")))
                    {
                        round.checks.push(format!(
                            "{tool}'s restored second backup started, reached consistency and counts {} accounts",
                            u64::from(self.opts.scale) * 100_000
                        ));
                        round.rows.push(Row::new(START, tool, Took { wall: secs, cpu: f64::NAN }, 0));
                    }
                }
            }
            for d in dirs.iter().flatten() {
                remove_tree(d)?;
            }
        }
        round.load.1 = crate::report::loadavg();
        Ok(round)
    }

    /// The relation files of pgbench's tables and indexes
    /// (`base/5/16397`), each also the prefix of its other forks and
    /// segments.
    fn pgbench_files(&self) -> Result<Vec<String>> {
        let names = ["accounts", "branches", "tellers", "history", "accounts_pkey", "branches_pkey", "tellers_pkey"];
        let list = names.iter().map(|n| format!("'pgbench_{n}'")).collect::<Vec<_>>().join(",");
        let out =
            self.server.psql(&format!("SELECT pg_relation_filepath(c) FROM unnest(ARRAY[{list}]::regclass[]) c"))?;
        Ok(out.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
    }

    /// Records what the comparison of two restores of the same state says.
    /// The two backups were taken one after the other with nothing but
    /// checkpoints and the tools' own sessions in between, so pgbench's
    /// relations must match byte for byte; a system catalog may differ
    /// (hint bits set by a tool's queries).
    fn judge(&self, round: &mut Round, section: &str, c: &Comparison, pgbench: &[String]) {
        let of_pgbench = |f: &String| {
            pgbench.iter().any(|p| f == p || f.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with(['.', '_'])))
        };
        let (bad, other): (Vec<String>, Vec<String>) = c.content.iter().cloned().partition(of_pgbench);
        if !c.shape.is_empty() {
            round.problems.push(format!(
                "{section}: walvault's and pgBackRest's restores differ in their files under base/ and global/: {}",
                first_ten(&c.shape)
            ));
        }
        if !bad.is_empty() {
            round.problems.push(format!(
                "{section}: files of pgbench's relations differ in content between walvault's and pgBackRest's \
                 restores: {}",
                first_ten(&bad)
            ));
        }
        if c.shape.is_empty() && bad.is_empty() {
            let mut msg = format!(
                "{section}: walvault's and pgBackRest's restores hold the same {} files under base/ and global/, \
                 {} of them byte for byte (every file of pgbench's {} tables and indexes among them)",
                c.files,
                c.identical,
                pgbench.len()
            );
            if !other.is_empty() {
                msg.push_str(&format!("; differing in content (not pgbench's): {}", first_ten(&other)));
            }
            round.checks.push(msg);
        }
    }

    /// `pgbench -n -c 2 -j 2 -T S`; returns the transactions it ran.
    fn pgbench_traffic(&self) -> Result<u64> {
        let mut cmd = self.ctx.admin("pgbench");
        cmd.arg("-h").arg(&self.ctx.work).arg("-p").arg(self.port.to_string()).arg("-d").arg("postgres");
        cmd.args(["-n", "-c", "2", "-j", "2", "-T", &self.opts.pgbench_secs.to_string()]);
        let out = run(cmd).context("pgbench failed")?;
        out.lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
            .and_then(|n| n.trim().split('/').next()?.parse().ok())
            .context("pgbench did not say how many transactions it ran")
    }
}

/// Relation files (under `base/` and `global/`) of a data directory, by
/// relative path, with their sizes. `pg_internal.init` and temporary files
/// are left out: backups skip them by design.
fn relation_files(root: &Path) -> Result<BTreeMap<String, u64>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) -> Result<()> {
        for e in fs::read_dir(dir).with_context(|| format!("unable to list '{}'", dir.display()))? {
            let e = e.with_context(|| format!("unable to list '{}'", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "pg_internal.init" || name.starts_with("pgsql_tmp") {
                continue;
            }
            let meta = e.metadata().with_context(|| format!("unable to stat '{}'", e.path().display()))?;
            if meta.is_dir() {
                walk(root, &e.path(), out)?;
            } else {
                let rel = e.path().strip_prefix(root).map(|p| p.display().to_string()).unwrap_or(name);
                out.insert(rel, meta.len());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    for top in ["base", "global"] {
        walk(root, &root.join(top), &mut out)?;
    }
    Ok(out)
}

/// How two restored data directories compare, file by file, under
/// `base/` and `global/`.
#[derive(Debug, Default)]
struct Comparison {
    /// Files in the first.
    files: usize,
    /// Files of equal size and equal bytes.
    identical: usize,
    /// Files only in one, or of different sizes.
    shape: Vec<String>,
    /// Files of equal size whose bytes differ.
    content: Vec<String>,
}

/// Compares the relation files of walvault's restore `a` and pgBackRest's
/// restore `b`: names and sizes, then bytes.
fn compare_restores(a: &Path, b: &Path) -> Result<Comparison> {
    let (x, y) = (relation_files(a)?, relation_files(b)?);
    let mut c = Comparison { files: x.len(), ..Comparison::default() };
    for (k, v) in &x {
        match y.get(k) {
            None => c.shape.push(format!("{k} only in walvault's ({v} bytes)")),
            Some(w) if w != v => c.shape.push(format!("{k}: {v} bytes in walvault's, {w} in pgBackRest's")),
            _ if same_content(&a.join(k), &b.join(k))? => c.identical += 1,
            _ => c.content.push(k.clone()),
        }
    }
    for (k, w) in &y {
        if !x.contains_key(k) {
            c.shape.push(format!("{k} only in pgBackRest's ({w} bytes)"));
        }
    }
    Ok(c)
}

/// Whether two files of the same size hold the same bytes.
fn same_content(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let open = |p: &Path| fs::File::open(p).with_context(|| format!("unable to open '{}'", p.display()));
    let (mut f, mut g) = (open(a)?, open(b)?);
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = f.read(&mut x).with_context(|| format!("unable to read '{}'", a.display()))?;
        if n == 0 {
            return Ok(true);
        }
        g.read_exact(&mut y[..n]).with_context(|| format!("unable to read '{}'", b.display()))?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// At most ten items, and how many more there were.
fn first_ten(v: &[String]) -> String {
    let mut s = v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > 10 {
        s.push_str(&format!(" and {} more", v.len() - 10));
    }
    s
}
