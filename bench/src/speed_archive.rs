//! Archiving, side by side: the full-backlog loop (every segment already
//! `.ready`, one archive_command call after the other, as PostgreSQL runs
//! them after an outage) and the throughput of each archive_command under a
//! pgbench load that writes WAL as fast as the machine can, with the
//! backlog of `.ready` files sampled every 100 ms.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Args;
use crate::compare::{CLUSTER, walvault_init};
use crate::ctx::{Ctx, remove_file, run, same_bytes, sync_all, timed, tree_bytes};
use crate::pg::{Segment, Server};
use crate::speed_report::{LoopRow, Report, ThroughputRow};

/// How long the archiver may take to work off its backlog once the load
/// stops before the benchmark gives up on that archive_command.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// How often the backlog of `.ready` files is counted.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// One way of archiving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archiver {
    /// `/bin/true`: nothing archived; the WAL rate of the machine without
    /// an archiver's cost.
    Nothing,
    /// Plain `cp`.
    Cp,
    /// `cp` then `sync FILE` (a two-line script).
    CpSync,
    /// walvault archive-push, synchronous (the default).
    WalvaultSync,
    /// walvault archive-push with `async = true` and `jobs`.
    WalvaultAsync,
    /// pgBackRest archive-push, synchronous.
    PgbrSync,
    /// pgBackRest archive-push with `archive-async=y` and `process-max`.
    PgbrAsync,
}

impl Archiver {
    /// The row label.
    pub fn label(self, jobs: u32) -> String {
        match self {
            Archiver::Nothing => "no archiving (`/bin/true`)".into(),
            Archiver::Cp => "`cp`".into(),
            Archiver::CpSync => "`cp` + `sync FILE`".into(),
            Archiver::WalvaultSync => "walvault archive-push, sync".into(),
            Archiver::WalvaultAsync => format!("walvault archive-push, `async = true`, `jobs = {jobs}`"),
            Archiver::PgbrSync => "pgBackRest archive-push, sync".into(),
            Archiver::PgbrAsync => format!("pgBackRest archive-push, `archive-async=y`, `process-max={jobs}`"),
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Archiver::Nothing => "none",
            Archiver::Cp => "cp",
            Archiver::CpSync => "cp-sync",
            Archiver::WalvaultSync => "walvault-sync",
            Archiver::WalvaultAsync => "walvault-async",
            Archiver::PgbrSync => "pgbr-sync",
            Archiver::PgbrAsync => "pgbr-async",
        }
    }
}

/// Writes `<dir>/walvault.toml` (repository `<dir>/repo`, catalog
/// `<dir>/catalog.db`, zstd `level`, then `extra` lines) and runs
/// `walvault init --pgdata`. Returns the file.
pub fn walvault_setup(ctx: &Ctx, dir: &Path, pgdata: &Path, level: i32, extra: &str) -> Result<PathBuf> {
    let path = dir.join("walvault.toml");
    let text = format!(
        "cluster = \"{CLUSTER}\"\nrepository = \"{}\"\ncatalog = \"{}\"\ncompress-level = {level}\n{extra}",
        dir.join("repo").display(),
        dir.join("catalog.db").display()
    );
    fs::write(&path, text).with_context(|| format!("unable to write '{}'", path.display()))?;
    ctx.chown(&path)?;
    walvault_init(ctx, &path, pgdata).with_context(|| format!("walvault init with '{}' failed", path.display()))?;
    Ok(path)
}

/// Writes `<dir>/pgbackrest.conf` (repository `<dir>/pgbr-repo`, zst level
/// 3, its own log, lock and spool directories, then `extra` lines in
/// `[global]`) and runs `stanza-create --no-online` (it reads
/// `global/pg_control` of `pgdata`). Returns the file.
pub fn pgbackrest_setup(ctx: &Ctx, dir: &Path, pgdata: &Path, extra: &str) -> Result<PathBuf> {
    let path = dir.join("pgbackrest.conf");
    let sub = |name: &str| -> Result<PathBuf> {
        let d = dir.join(name);
        fs::create_dir_all(&d).with_context(|| format!("unable to create '{}'", d.display()))?;
        ctx.chown(&d)?;
        Ok(d)
    };
    let text = format!(
        "[global]\nrepo1-path={}\ncompress-type=zst\ncompress-level=3\nlog-level-console=warn\nlog-path={}\n\
         lock-path={}\nspool-path={}\n{extra}\n[{CLUSTER}]\npg1-path={}\n",
        dir.join("pgbr-repo").display(),
        sub("pgbr-log")?.display(),
        sub("pgbr-lock")?.display(),
        sub("pgbr-spool")?.display(),
        pgdata.display()
    );
    fs::write(&path, text).with_context(|| format!("unable to write '{}'", path.display()))?;
    ctx.chown(&path)?;
    run(pgbackrest(ctx, &path, &["--no-online", "stanza-create"])).context("pgbackrest stanza-create failed")?;
    Ok(path)
}

/// `pgbackrest --config=C --stanza=bench ARGS`, as the PostgreSQL user.
pub fn pgbackrest(ctx: &Ctx, config: &Path, args: &[&str]) -> Command {
    let mut cmd = ctx.tool("pgbackrest");
    cmd.arg(format!("--config={}", config.display())).arg(format!("--stanza={CLUSTER}")).args(args);
    cmd
}

/// The `cp` + `sync` script, `<work>/bin/cp-sync.sh SRC DST`.
fn cp_sync_script(ctx: &Ctx) -> Result<PathBuf> {
    let path = ctx.bin.join("cp-sync.sh");
    if !path.exists() {
        // sync FILE fsyncs the copy, not its directory: a little less
        // durable than walvault and pgBackRest, never more.
        fs::write(&path, "#!/bin/sh\ncp \"$1\" \"$2\" && exec sync \"$2\"\n")
            .with_context(|| format!("unable to write '{}'", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("unable to make '{}' executable", path.display()))?;
    }
    Ok(path)
}

/// One archiver, set up in a directory of its own.
struct Setup {
    kind: Archiver,
    dir: PathBuf,
    /// Where `cp` copies to.
    archive: PathBuf,
    walvault: Option<PathBuf>,
    pgbackrest: Option<PathBuf>,
    script: PathBuf,
}

impl Setup {
    fn new(ctx: &Ctx, kind: Archiver, rel: &str, pgdata: &Path, jobs: u32) -> Result<Setup> {
        let dir = ctx.mkdir(rel)?;
        let archive = ctx.mkdir(format!("{rel}/archive"))?;
        let spool = ctx.mkdir(format!("{rel}/spool"))?;
        let walvault = match kind {
            Archiver::WalvaultSync => Some(walvault_setup(ctx, &dir, pgdata, 3, "")?),
            Archiver::WalvaultAsync => Some(walvault_setup(
                ctx,
                &dir,
                pgdata,
                3,
                &format!("async = true\njobs = {jobs}\nspool-path = \"{}\"\n", spool.display()),
            )?),
            _ => None,
        };
        let pgbackrest = match kind {
            Archiver::PgbrSync => Some(pgbackrest_setup(ctx, &dir, pgdata, "")?),
            Archiver::PgbrAsync => {
                Some(pgbackrest_setup(ctx, &dir, pgdata, &format!("archive-async=y\nprocess-max={jobs}\n"))?)
            }
            _ => None,
        };
        Ok(Setup { kind, dir, archive, walvault, pgbackrest, script: cp_sync_script(ctx)? })
    }

    /// The command archiving `src` (a file in a `pg_wal` directory).
    fn push(&self, ctx: &Ctx, src: &Path) -> Result<Command> {
        let name = src.file_name().context("a segment path without a file name")?;
        let mut cmd = match self.kind {
            Archiver::Nothing => ctx.tool("true"),
            Archiver::Cp => {
                let mut c = ctx.tool("cp");
                c.arg(src).arg(self.archive.join(name));
                c
            }
            Archiver::CpSync => {
                let mut c = ctx.tool(&self.script);
                c.arg(src).arg(self.archive.join(name));
                c
            }
            Archiver::WalvaultSync | Archiver::WalvaultAsync => {
                let mut c = ctx.walvault("archive-push");
                c.arg("--config").arg(self.walvault.as_deref().context("walvault is not set up")?).arg(src);
                c
            }
            Archiver::PgbrSync | Archiver::PgbrAsync => {
                let mut c =
                    pgbackrest(ctx, self.pgbackrest.as_deref().context("pgBackRest is not set up")?, &["archive-push"]);
                c.arg(src);
                c
            }
        };
        cmd.current_dir(src.parent().unwrap_or(Path::new("/")));
        Ok(cmd)
    }

    /// The `archive_command` for the server.
    fn archive_command(&self, ctx: &Ctx) -> String {
        let archive = self.archive.display();
        match self.kind {
            Archiver::Nothing => "/bin/true".into(),
            Archiver::Cp => format!("cp %p {archive}/%f"),
            Archiver::CpSync => format!("{} %p {archive}/%f", self.script.display()),
            Archiver::WalvaultSync | Archiver::WalvaultAsync => format!(
                "{} --config {} %p",
                ctx.bin.join("archive-push").display(),
                self.walvault.as_deref().unwrap_or(Path::new("?")).display()
            ),
            Archiver::PgbrSync | Archiver::PgbrAsync => format!(
                "pgbackrest --config={} --stanza={CLUSTER} archive-push %p",
                self.pgbackrest.as_deref().unwrap_or(Path::new("?")).display()
            ),
        }
    }

    /// Checks that `seg` was archived byte for byte: the copy for `cp`, a
    /// fetch (archive-fetch or archive-get) for the others.
    fn check(&self, ctx: &Ctx, seg: &Segment) -> Result<()> {
        let got = self.dir.join(format!("check-{}", seg.name));
        let mut cmd = match self.kind {
            Archiver::Nothing => return Ok(()),
            Archiver::Cp | Archiver::CpSync => return same_bytes(&seg.path, &self.archive.join(&seg.name)),
            Archiver::WalvaultSync | Archiver::WalvaultAsync => {
                let mut c = ctx.walvault("archive-fetch");
                c.arg("--config").arg(self.walvault.as_deref().context("walvault is not set up")?);
                c
            }
            Archiver::PgbrSync | Archiver::PgbrAsync => {
                pgbackrest(ctx, self.pgbackrest.as_deref().context("pgBackRest is not set up")?, &["archive-get"])
            }
        };
        cmd.arg(&seg.name).arg(&got);
        run(cmd).with_context(|| format!("fetching '{}' back from {}", seg.name, self.kind.label(0)))?;
        same_bytes(&seg.path, &got)?;
        remove_file(&got)
    }

    /// Bytes stored: the copies, walvault's WAL objects, or pgBackRest's
    /// archive directory.
    fn stored(&self) -> Result<u64> {
        match self.kind {
            Archiver::Nothing => Ok(0),
            Archiver::Cp | Archiver::CpSync => tree_bytes(&self.archive),
            Archiver::WalvaultSync | Archiver::WalvaultAsync => {
                tree_bytes(&self.dir.join("repo").join(CLUSTER).join("wal"))
            }
            Archiver::PgbrSync | Archiver::PgbrAsync => tree_bytes(&self.dir.join("pgbr-repo").join("archive")),
        }
    }
}

/// Mode 0700 on a directory (PostgreSQL and pgBackRest want it for pg_wal
/// and data directories).
fn private(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("unable to set the mode of '{}'", dir.display()))
}

/// The full-backlog loop: for each archiver and round, a `pg_wal` of hard
/// links to the segments, every one with its `.ready` file; then one call
/// per segment, in order, each marked `.done` when it exits 0 (as the
/// archiver does). Timed from the first spawn to the last exit; every
/// segment is fetched back and compared afterwards.
pub fn loop_part(
    ctx: &Ctx,
    pgdata: &Path,
    segments: &[Segment],
    args: &Args,
    with_pgbr: bool,
    report: &mut Report,
) -> Result<()> {
    let mut kinds = vec![Archiver::Cp, Archiver::CpSync, Archiver::WalvaultSync, Archiver::WalvaultAsync];
    if with_pgbr {
        kinds.extend([Archiver::PgbrSync, Archiver::PgbrAsync]);
    }
    let mut rows: Vec<LoopRow> = kinds
        .iter()
        .map(|k| LoopRow { label: k.label(args.jobs), kind: *k, per_segment_ms: Vec::new(), checked: 0 })
        .collect();
    for round in 0..args.loop_rounds {
        for k in 0..kinds.len() {
            let i = (round + k) % kinds.len();
            let kind = kinds[i];
            eprintln!("walvault-bench-speed: full-backlog loop, round {}: {}", round + 1, kind.label(args.jobs));
            let rel = format!("loop-{round}-{}", kind.tag());
            // pgBackRest's async mode insists that pg_wal is inside its
            // pg1-path: a data directory of its own, holding only what the
            // archivers read (PG_VERSION, global/pg_control) and pg_wal.
            let data = ctx.mkdir(format!("{rel}/pgdata"))?;
            private(&data)?;
            ctx.mkdir(format!("{rel}/pgdata/global"))?;
            for f in ["PG_VERSION", "global/pg_control"] {
                let (from, to) = (pgdata.join(f), data.join(f));
                fs::copy(&from, &to)
                    .with_context(|| format!("unable to copy '{}' to '{}'", from.display(), to.display()))?;
                ctx.chown(&to)?;
            }
            let wal = ctx.mkdir(format!("{rel}/pgdata/pg_wal"))?;
            let status = ctx.mkdir(format!("{rel}/pgdata/pg_wal/archive_status"))?;
            private(&wal)?;
            for s in segments {
                let link = wal.join(&s.name);
                fs::hard_link(&s.path, &link)
                    .with_context(|| format!("unable to link '{}' to '{}'", s.path.display(), link.display()))?;
                let ready = status.join(format!("{}.ready", s.name));
                fs::write(&ready, b"").with_context(|| format!("unable to create '{}'", ready.display()))?;
                ctx.chown(&ready)?;
            }
            // After the segments: walvault init reads one from pg_wal.
            let setup = Setup::new(ctx, kind, &rel, &data, args.jobs)?;
            sync_all()?;
            let start = Instant::now();
            for s in segments {
                let cmd = setup.push(ctx, &wal.join(&s.name))?;
                timed(cmd)
                    .with_context(|| format!("{} of '{}' in the full-backlog loop", kind.label(args.jobs), s.name))?;
                let ready = status.join(format!("{}.ready", s.name));
                let done = status.join(format!("{}.done", s.name));
                fs::rename(&ready, &done)
                    .with_context(|| format!("unable to rename '{}' to '{}'", ready.display(), done.display()))?;
            }
            let took = start.elapsed();
            rows[i].per_segment_ms.push(took.as_secs_f64() * 1000.0 / segments.len() as f64);
            report.samples.push(format!(
                "loop,\"{}\",{round},{:.3}\n",
                kind.label(args.jobs),
                took.as_secs_f64() * 1000.0 / segments.len() as f64
            ));
            for s in segments {
                match setup.check(ctx, s) {
                    Ok(()) => rows[i].checked += 1,
                    Err(e) => report.problems.push(format!(
                        "full-backlog loop, {}: '{}' not archived intact: {e:#}",
                        kind.label(args.jobs),
                        s.name
                    )),
                }
            }
            if matches!(kind, Archiver::Cp | Archiver::CpSync) {
                // Uncompressed copies: 16 MiB each, not needed any more.
                fs::remove_dir_all(&setup.archive)
                    .with_context(|| format!("unable to remove '{}'", setup.archive.display()))?;
            }
        }
    }
    report.loops = rows;
    Ok(())
}

/// Counts the `.ready` files in `status`.
fn count_ready(status: &Path) -> usize {
    fs::read_dir(status)
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".ready")).count())
        .unwrap_or(0)
}

/// The archiver's counters and the WAL position.
fn archiver_stats(server: &Server<'_>) -> Result<(u64, u64, u64)> {
    let out = server
        .psql("SELECT archived_count, failed_count, (pg_current_wal_lsn() - '0/0')::bigint FROM pg_stat_archiver")?;
    let f: Vec<u64> = out.split('|').filter_map(|v| v.trim().parse().ok()).collect();
    match f.as_slice() {
        [a, b, c] => Ok((*a, *b, *c)),
        _ => bail!("unexpected answer from pg_stat_archiver: '{out}'"),
    }
}

/// Sets `archive_command` with ALTER SYSTEM and reloads.
fn set_archive_command(server: &Server<'_>, command: &str) -> Result<()> {
    server.psql(&format!("ALTER SYSTEM SET archive_command = '{}'", command.replace('\'', "''")))?;
    server.psql("SELECT pg_reload_conf()")?;
    // The archiver reads the new setting when it next wakes up; it does
    // so on the reload signal, well within this.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// The pgbench script of the load: 2,000 rows of 128 characters per
/// transaction (an md5 repeated four times, so that WAL compresses about as
/// well as a real table's, not as well as a constant).
const LOAD_SCRIPT: &str =
    "INSERT INTO speed_load SELECT g, repeat(md5(random()::text), 4) FROM generate_series(1, 2000) g;\n";

/// Throughput: the server runs with `max_wal_size = 1GB` (WAL recycled, as
/// in production), `wal_compression = off`, `synchronous_commit = off`;
/// for each archive_command, `pgbench -n -c 2 -j 2 -T S -f insert.sql`
/// while a thread counts `.ready` files every 100 ms, then the wait until
/// the archiver has worked off its backlog.
pub fn throughput(ctx: &Ctx, server: &mut Server<'_>, args: &Args, with_pgbr: bool, report: &mut Report) -> Result<()> {
    let pgdata = server.datadir().to_path_buf();
    let conf = pgdata.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut f| {
            f.write_all(
                b"\n# added by walvault-bench-speed (throughput)\nwal_keep_size = 0\nmax_wal_size = '1GB'\n\
                  min_wal_size = '256MB'\nwal_compression = off\nautovacuum = off\n",
            )
        })
        .with_context(|| format!("unable to write '{}'", conf.display()))?;
    let script = ctx.path("insert.sql");
    fs::write(&script, LOAD_SCRIPT).with_context(|| format!("unable to write '{}'", script.display()))?;
    ctx.chown(&script)?;
    server.start()?;
    server.psql("CREATE TABLE IF NOT EXISTS speed_load (id int, payload text)")?;
    let status = pgdata.join("pg_wal").join("archive_status");

    let mut kinds = vec![Archiver::Nothing, Archiver::CpSync, Archiver::WalvaultSync, Archiver::WalvaultAsync];
    if with_pgbr {
        kinds.extend([Archiver::PgbrSync, Archiver::PgbrAsync]);
    }
    for kind in kinds {
        let label = kind.label(args.jobs);
        eprintln!("walvault-bench-speed: throughput, {label}: {} s of pgbench", args.load_secs);
        let setup = Setup::new(ctx, kind, &format!("tp-{}", kind.tag()), &pgdata, args.jobs)?;
        set_archive_command(server, &setup.archive_command(ctx))?;
        server.psql("TRUNCATE speed_load")?;
        server.psql("CHECKPOINT")?;
        wait_drained(&status, Duration::from_secs(120), &label)?;
        sync_all()?;

        let (a0, f0, l0) = archiver_stats(server)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (stop, status) = (Arc::clone(&stop), status.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    samples.push((t.elapsed().as_secs_f64(), count_ready(&status)));
                    std::thread::sleep(SAMPLE_EVERY);
                }
                samples
            })
        };
        let t = Instant::now();
        let load = server.pgbench(&[
            "-n",
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            &args.load_secs.to_string(),
            "-f",
            &script.display().to_string(),
        ]);
        let load_secs = t.elapsed().as_secs_f64();
        let after_load = archiver_stats(server);
        let drained = wait_drained(&status, DRAIN_TIMEOUT, &label);
        let total_secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().map_err(|_| anyhow::anyhow!("the backlog sampler thread panicked"))?;
        load.context("pgbench failed")?;
        let (a1, _, l1) = after_load?;
        drained?;
        let (a2, f2, _) = archiver_stats(server)?;
        let during: Vec<usize> = samples.iter().filter(|(s, _)| *s <= load_secs).map(|(_, n)| *n).collect();
        for (s, n) in &samples {
            report.samples.push(format!("backlog,\"{label}\",{s:.2},{n}\n"));
        }
        let stored = setup.stored()?;
        let row = ThroughputRow {
            label,
            kind,
            load_secs,
            wal_bytes: l1.saturating_sub(l0),
            archived_during: a1.saturating_sub(a0),
            archived_total: a2.saturating_sub(a0),
            drain_secs: total_secs - load_secs,
            max_ready: during.iter().copied().max().unwrap_or(0),
            mean_ready: during.iter().sum::<usize>() as f64 / during.len().max(1) as f64,
            failed: f2.saturating_sub(f0),
            stored,
        };
        if row.failed > 0 {
            report.problems.push(format!(
                "throughput, {}: archive_command failed {} times (see '{}')",
                row.label,
                row.failed,
                ctx.path("postgres.log").display()
            ));
        }
        report.throughput.push(row);
        if matches!(kind, Archiver::Cp | Archiver::CpSync) {
            fs::remove_dir_all(&setup.archive)
                .with_context(|| format!("unable to remove '{}'", setup.archive.display()))?;
        }
    }
    set_archive_command(server, "/bin/true")?;
    server.psql("DROP TABLE speed_load")?;
    server.psql("CHECKPOINT")?;
    server.stop()?;
    Ok(())
}

/// Waits until `status` holds no `.ready` file.
fn wait_drained(status: &Path, timeout: Duration, what: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let n = count_ready(status);
        if n == 0 {
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!(
                "{what}: {n} WAL files still waiting to be archived after {} s; see pg_stat_archiver and the \
                 server log",
                timeout.as_secs()
            );
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// Processes of the archivers (walvault's async worker, pgBackRest's async
/// process, a stray archive-push or archive-fetch) still running from the
/// work directory.
fn stray_workers(ctx: &Ctx) -> Vec<(i32, String)> {
    let me = std::process::id();
    let work = ctx.work.to_string_lossy().into_owned();
    let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
    procs
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).is_ok_and(|p| p != me))
        .filter_map(|pid| {
            let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let prog = Path::new(args.first()?).file_name()?.to_string_lossy().into_owned();
            let ours = ["archive-push", "archive-fetch", "walvault", "pgbackrest"].contains(&prog.as_str());
            (ours && args.iter().any(|a| a.contains(&work))).then(|| (pid, args.join(" ")))
        })
        .collect()
}

/// Waits up to `timeout` for the archivers' background processes to exit
/// on their own (they exit when idle); kills, by process id, any still
/// running then. Returns what had to be killed, as problems.
pub fn reap_workers(ctx: &Ctx, timeout: Duration) -> Vec<String> {
    let t = Instant::now();
    let mut left = stray_workers(ctx);
    while !left.is_empty() && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(200));
        left = stray_workers(ctx);
    }
    let mut problems = Vec::new();
    for (pid, cmdline) in left {
        // SAFETY: kill(2) with a process id read from /proc; no memory is involved.
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        problems.push(format!(
            "process {pid} ('{cmdline}') was still running {} s after the last measurement{}",
            timeout.as_secs(),
            if r == 0 { "; killed" } else { "; unable to kill it" }
        ));
    }
    problems
}
