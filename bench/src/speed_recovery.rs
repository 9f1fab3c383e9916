//! Recovery speed: one base backup (`walvault backup`), then ≥ 1 GiB of
//! pgbench WAL archived into walvault, pgBackRest and a plain directory at
//! once (one archive_command calling all three), then the same restored
//! data directory replayed to the end of the archive with each
//! `restore_command`: wall time from server start to "ready to accept
//! connections" after the end of recovery, and the end state checked.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Args;
use crate::compare::CLUSTER;
use crate::ctx::{Ctx, run, sync_all};
use crate::pg::{SEGMENT_BYTES, Server};
use crate::speed_archive::{pgbackrest_setup, walvault_setup};
use crate::speed_report::{RecoveryRow, Report};

/// How long one replay may take before the benchmark gives up on it.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(1800);

/// How long pgbench may run to write the WAL of the recovery part.
const GENERATE_TIMEOUT: Duration = Duration::from_secs(900);

/// One `restore_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetcher {
    /// `cp DIR/%f %p` from a directory of the uncompressed segments.
    Cp,
    /// `archive-fetch %f %p`, no prefetch.
    Walvault,
    /// `archive-fetch %f %p` with `prefetch = P`.
    WalvaultPrefetch,
    /// `pgbackrest archive-get` with `--archive-async`.
    PgbrAsync,
}

impl Fetcher {
    /// The row label.
    pub fn label(self, args: &Args) -> String {
        match self {
            Fetcher::Cp => "`cp DIR/%f %p` (uncompressed segments)".into(),
            Fetcher::Walvault => "walvault archive-fetch, no prefetch".into(),
            Fetcher::WalvaultPrefetch => {
                format!("walvault archive-fetch, `prefetch = {}`, `jobs = {}`", args.prefetch, args.jobs)
            }
            Fetcher::PgbrAsync => format!(
                "pgBackRest archive-get, `archive-async=y`, `process-max={}`, `archive-get-queue-max={} MiB`",
                args.jobs,
                (u64::from(args.prefetch) * SEGMENT_BYTES) >> 20
            ),
        }
    }
}

/// A restored cluster being replayed; stopped (immediately) when dropped.
struct Running<'a> {
    ctx: &'a Ctx,
    datadir: PathBuf,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut cmd = self.ctx.admin("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(["-m", "immediate", "-w", "-t", "120", "stop"]);
        // Already stopped (the usual case) or never started: nothing to do.
        let _ = run(cmd);
    }
}

/// Everything the replays share.
struct Prepared {
    template: PathBuf,
    plain: PathBuf,
    walvault: PathBuf,
    walvault_prefetch: PathBuf,
    pgbackrest: Option<PathBuf>,
    expected: String,
    segments: u64,
    port: u16,
    /// What the restore commands read: the plain directory and both
    /// repositories, read through before every replay (see [`warm`]).
    sources: Vec<PathBuf>,
}

fn libpq_env(ctx: &Ctx, cmd: &mut Command, port: u16) {
    let user = match &ctx.pg_user {
        Some(u) => u.name.clone(),
        None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
    };
    cmd.env("PGHOST", &ctx.work).env("PGPORT", port.to_string()).env("PGUSER", user).env("PGDATABASE", "postgres");
}

/// What the recovered cluster must hold: the sum of the balances and the
/// number of history rows.
const END_STATE: &str = "SELECT sum(abalance), (SELECT count(*) FROM pgbench_history) FROM pgbench_accounts";

/// Base backup, WAL, template data directory.
fn prepare(ctx: &Ctx, server: &mut Server<'_>, args: &Args, with_pgbr: bool) -> Result<Prepared> {
    let pgdata = server.datadir().to_path_buf();
    let dir = ctx.mkdir("rec")?;
    let plain = ctx.mkdir("rec/plain")?;
    let walvault = walvault_setup(ctx, &dir, &pgdata, 3, "")?;
    let spool = dir.join("spool-prefetch");
    let walvault_prefetch = dir.join("walvault-prefetch.toml");
    let text = format!(
        "cluster = \"{CLUSTER}\"\nrepository = \"{}\"\ncatalog = \"{}\"\ncompress-level = 3\nprefetch = {}\n\
         jobs = {}\nspool-path = \"{}\"\n",
        dir.join("repo").display(),
        dir.join("catalog.db").display(),
        args.prefetch,
        args.jobs,
        spool.display()
    );
    fs::write(&walvault_prefetch, text)
        .with_context(|| format!("unable to write '{}'", walvault_prefetch.display()))?;
    ctx.chown(&walvault_prefetch)?;
    let pgbackrest = if with_pgbr { Some(pgbackrest_setup(ctx, &dir, &pgdata, "")?) } else { None };

    let mut archive = format!("{} --config {} %p", ctx.bin.join("archive-push").display(), walvault.display());
    if let Some(conf) = &pgbackrest {
        archive.push_str(&format!(" && pgbackrest --config={} --stanza={CLUSTER} archive-push %p", conf.display()));
    }
    archive.push_str(&format!(" && cp %p {}/%f", plain.display()));

    server.start()?;
    server.psql(&format!("ALTER SYSTEM SET archive_command = '{}'", archive.replace('\'', "''")))?;
    server.psql("SELECT pg_reload_conf()")?;
    let port: u16 = server.psql("SHOW port")?.parse().context("the server's port is not a number")?;
    std::thread::sleep(Duration::from_millis(500));

    eprintln!("walvault-bench-speed: recovery: walvault backup");
    let mut cmd = ctx.walvault("walvault");
    cmd.arg("--config").arg(&walvault).args(["backup", "--fast", "--pgdata"]).arg(&pgdata);
    libpq_env(ctx, &mut cmd, port);
    run(cmd).context("walvault backup failed")?;

    let segno = |s: &Server<'_>| -> Result<u64> {
        let v = s.psql("SELECT (pg_current_wal_lsn() - '0/0')::bigint")?;
        Ok(v.parse::<u64>().with_context(|| format!("unexpected WAL position '{v}'"))? / SEGMENT_BYTES)
    };
    let first = segno(server)?;
    let t = Instant::now();
    eprintln!("walvault-bench-speed: recovery: pgbench until {} segments are written", args.recovery_segments);
    while segno(server)? - first < args.recovery_segments {
        if t.elapsed() > GENERATE_TIMEOUT {
            bail!(
                "pgbench wrote only {} of {} segments in {} s; ask for fewer with --recovery-segments",
                segno(server)? - first,
                args.recovery_segments,
                GENERATE_TIMEOUT.as_secs()
            );
        }
        server.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"]).context("pgbench failed")?;
        // As in pg::make_segments: checkpoints keep full-page images in
        // the WAL, as on a busy server.
        server.psql("CHECKPOINT")?;
    }
    let expected = server.psql(END_STATE)?;
    server.psql("SELECT pg_switch_wal()")?;
    let status = pgdata.join("pg_wal").join("archive_status");
    let t = Instant::now();
    loop {
        let ready = fs::read_dir(&status)
            .with_context(|| format!("unable to list '{}'", status.display()))?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".ready"));
        if !ready {
            break;
        }
        if t.elapsed() > GENERATE_TIMEOUT {
            bail!("the WAL of the recovery part is not archived after {} s", GENERATE_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    server.psql("ALTER SYSTEM SET archive_command = '/bin/true'")?;
    server.stop()?;
    let segments = fs::read_dir(&plain)
        .with_context(|| format!("unable to list '{}'", plain.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().len() == 24)
        .count() as u64;

    eprintln!("walvault-bench-speed: recovery: walvault restore into the template data directory");
    let template = dir.join("template");
    let mut cmd = ctx.walvault("walvault");
    cmd.arg("--config").arg(&walvault).args(["restore", "--pgdata"]).arg(&template);
    run(cmd).context("walvault restore failed")?;
    let plain_dir = plain.clone();
    Ok(Prepared {
        template,
        plain,
        walvault,
        walvault_prefetch,
        pgbackrest,
        expected,
        segments,
        port: port.checked_add(1).context("no port left for the restored cluster")?,
        sources: [Some(plain_dir), Some(dir.join("repo")), with_pgbr.then(|| dir.join("pgbr-repo"))]
            .into_iter()
            .flatten()
            .collect(),
    })
}

/// Reads every file under `dirs` once, so that each replay starts with all
/// the restore commands' sources in the page cache, as documented. Without
/// it, the host's proactive reclaim (DAMON `pageout` of pages idle for a
/// minute, on this machine) evicted some of them between rounds, and
/// `cp`'s 1.6 GiB of plain segments — read once a round — came from the
/// disk in some rounds and not in others (4.2-6.7 s against 3.0 s).
fn warm(dirs: &[PathBuf]) -> Result<u64> {
    let mut bytes = 0;
    let mut todo: Vec<PathBuf> = dirs.to_vec();
    let mut buf = vec![0u8; 1 << 20];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path).with_context(|| format!("unable to look at '{}'", path.display()))?;
        if meta.is_dir() {
            for e in fs::read_dir(&path).with_context(|| format!("unable to list '{}'", path.display()))? {
                todo.push(e.with_context(|| format!("unable to list '{}'", path.display()))?.path());
            }
        } else if meta.is_file() {
            let mut f = fs::File::open(&path).with_context(|| format!("unable to open '{}'", path.display()))?;
            loop {
                let n = f.read(&mut buf).with_context(|| format!("unable to read '{}'", path.display()))?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
        }
    }
    Ok(bytes)
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

/// One replay of the template with `fetcher`; returns (seconds to ready,
/// seconds to "archive recovery complete", files restored from the archive).
fn replay(ctx: &Ctx, p: &Prepared, fetcher: Fetcher, args: &Args) -> Result<(f64, f64, usize)> {
    let dir = ctx.path("rec/run");
    remove_tree(&dir)?;
    let mut cp = ctx.tool("cp");
    cp.arg("-a").arg(&p.template).arg(&dir);
    run(cp)?;
    for spool in ["rec/spool-prefetch", "rec/pgbr-spool-run"] {
        remove_tree(&ctx.path(spool))?;
        ctx.mkdir(spool)?;
    }
    let restore_command = match fetcher {
        Fetcher::Cp => format!("cp {}/%f %p", p.plain.display()),
        Fetcher::Walvault => {
            format!("{} --config {} %f %p", ctx.bin.join("archive-fetch").display(), p.walvault.display())
        }
        Fetcher::WalvaultPrefetch => {
            format!("{} --config {} %f %p", ctx.bin.join("archive-fetch").display(), p.walvault_prefetch.display())
        }
        Fetcher::PgbrAsync => format!(
            "pgbackrest --config={} --stanza={CLUSTER} --pg1-path={} --archive-async --process-max={} \
             --archive-get-queue-max={} --spool-path={} archive-get %f \"%p\"",
            p.pgbackrest.as_deref().context("pgBackRest is not set up")?.display(),
            dir.display(),
            args.jobs,
            u64::from(args.prefetch) * SEGMENT_BYTES,
            ctx.path("rec/pgbr-spool-run").display()
        ),
    };
    let auto = dir.join("postgresql.auto.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&auto)
        .and_then(|mut f| {
            write!(
                f,
                "\n# walvault-bench-speed: this replay\nport = {}\narchive_mode = off\nhot_standby = off\n\
                 restore_command = '{}'\n",
                p.port,
                restore_command.replace('\'', "''")
            )
        })
        .with_context(|| format!("unable to write '{}'", auto.display()))?;
    sync_all()?;
    warm(&p.sources)?;

    let log = ctx.path("rec/run.log");
    let _ = fs::remove_file(&log);
    let mut cmd = ctx.admin("pg_ctl");
    cmd.arg("-D").arg(&dir).arg("-l").arg(&log).args(["-W", "start"]);
    let guard = Running { ctx, datadir: dir.clone() };
    let t = Instant::now();
    run(cmd).context("pg_ctl start of the restored cluster failed")?;
    let mut complete = None;
    let ready = loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if complete.is_none() && text.contains("archive recovery complete") {
            complete = Some(t.elapsed().as_secs_f64());
        }
        if text.lines().any(|l| l.ends_with("database system is ready to accept connections")) {
            break t.elapsed().as_secs_f64();
        }
        if let Some(l) = text.lines().find(|l| l.contains("FATAL:") || l.contains("PANIC:")) {
            bail!("the restored cluster failed: {l} (see '{}')", log.display());
        }
        if t.elapsed() > REPLAY_TIMEOUT {
            bail!("recovery did not end within {} s; see '{}'", REPLAY_TIMEOUT.as_secs(), log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = fs::read_to_string(&log).with_context(|| format!("unable to read '{}'", log.display()))?;
    let restored = text.lines().filter(|l| l.contains("restored log file")).count();

    let mut psql = ctx.admin("psql");
    psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"]).arg(&ctx.work);
    psql.arg("-p").arg(p.port.to_string()).args(["-d", "postgres", "-c"]);
    psql.arg(format!("SELECT pg_is_in_recovery(), q.* FROM ({END_STATE}) q"));
    let got = run(psql)?.trim().to_string();
    let want = format!("f|{}", p.expected);
    let mut stop = ctx.admin("pg_ctl");
    stop.arg("-D").arg(&dir).args(["-m", "fast", "-w", "-t", "120", "stop"]);
    run(stop).context("unable to stop the restored cluster")?;
    drop(guard);
    if got != want {
        bail!("the recovered cluster answered '{got}' (in recovery, balance sum, history rows), expected '{want}'");
    }
    remove_tree(&dir)?;
    Ok((ready, complete.unwrap_or(f64::NAN), restored))
}

/// The recovery part: prepare once, then every fetcher, rotated across
/// rounds.
pub fn measure(ctx: &Ctx, server: &mut Server<'_>, args: &Args, with_pgbr: bool, report: &mut Report) -> Result<()> {
    let p = prepare(ctx, server, args, with_pgbr)?;
    report.recovery_segments = p.segments;
    let mut kinds = vec![Fetcher::Cp, Fetcher::Walvault, Fetcher::WalvaultPrefetch];
    if p.pgbackrest.is_some() {
        kinds.push(Fetcher::PgbrAsync);
    }
    let mut rows: Vec<RecoveryRow> =
        kinds.iter().map(|k| RecoveryRow { label: k.label(args), kind: *k, ..RecoveryRow::default() }).collect();
    // The first replay after the preparation ran 1.5-2.3× slower than the
    // same replay later (the virtual disk still absorbing the preparation's
    // gigabytes of writes, whatever `sync` says): one replay with `cp`
    // first, checked like the others and not recorded.
    eprintln!("walvault-bench-speed: recovery, settling replay (not recorded): {}", Fetcher::Cp.label(args));
    match replay(ctx, &p, Fetcher::Cp, args) {
        Ok((ready, _, _)) => {
            report.samples.push(format!("recovery-settling,\"{}\",-1,{ready:.3}\n", Fetcher::Cp.label(args)))
        }
        Err(e) => report.problems.push(format!("recovery, settling replay with {}: {e:#}", Fetcher::Cp.label(args))),
    }
    for round in 0..args.recovery_rounds {
        for k in 0..kinds.len() {
            let i = (round + k) % kinds.len();
            eprintln!("walvault-bench-speed: recovery, round {}: {}", round + 1, kinds[i].label(args));
            match replay(ctx, &p, kinds[i], args) {
                Ok((ready, complete, restored)) => {
                    report.samples.push(format!("recovery,\"{}\",{round},{ready:.3}\n", rows[i].label));
                    rows[i].secs.push(ready);
                    rows[i].complete_secs.push(complete);
                    rows[i].restored = restored;
                }
                Err(e) => report.problems.push(format!("recovery with {}: {e:#}", kinds[i].label(args))),
            }
        }
    }
    report.recovery = rows;
    Ok(())
}
