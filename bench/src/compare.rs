//! Side by side: archiving and fetching the same segments with `cp`,
//! `cp` + `sync`, walvault and pgBackRest, one process per call, as
//! PostgreSQL calls `archive_command` and `restore_command`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ctx::{Ctx, remove_file, run, same_bytes, stdout_len, sync_all, timed, timed_with_output, tree_bytes};
use crate::pg::Segment;
use crate::stats::Series;

/// The cluster name walvault and pgBackRest (its stanza) use.
pub const CLUSTER: &str = "bench";

/// The configured archivers.
#[derive(Debug)]
pub struct Archivers {
    /// walvault's configuration file.
    pub walvault: PathBuf,
    /// walvault's repository.
    pub walvault_repo: PathBuf,
    /// pgBackRest's configuration file, if pgBackRest is installed.
    pub pgbackrest: Option<PathBuf>,
    /// pgBackRest's repository.
    pub pgbackrest_repo: PathBuf,
}

/// Timings of the push side and the fetch side.
#[derive(Debug)]
pub struct Timings {
    /// `cp`, `cp + sync`, `archive-push`, `pgbackrest archive-push`.
    pub push: Vec<Series>,
    /// `cp`, `archive-fetch`, `pgbackrest archive-get`.
    pub fetch: Vec<Series>,
    /// Pieces of walvault's push, timed alongside: process start
    /// (`archive-push --version`) and compression alone (`zstd -3` with as
    /// many threads as archive-push uses, no fsync).
    pub reference: Vec<Series>,
}

/// Label prefix of the reference rows, timed with the pushes but reported
/// apart.
pub const REFERENCE: &str = "reference: ";

/// The zstd workers archive-push uses for a 16 MiB segment with
/// `compress-workers = 0` (lib/walvault/src/push.rs: cores, at most 4).
fn zstd_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// Stored sizes of the same segments.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// The segments themselves.
    pub plain: u64,
    /// `zstd -3` of each segment, summed.
    pub zstd3: u64,
    /// walvault's WAL objects.
    pub walvault: u64,
    /// pgBackRest's archive (its WAL files; `archive.info` excluded).
    pub pgbackrest: Option<u64>,
}

/// Writes a walvault configuration file `<work>/<name>.toml` for
/// `repository` and `catalog`; returns its path.
pub fn walvault_config(ctx: &Ctx, name: &str, repository: &Path, catalog: &Path) -> Result<PathBuf> {
    let path = ctx.path(format!("{name}.toml"));
    let text = format!(
        "cluster = \"{CLUSTER}\"\nrepository = \"{}\"\ncatalog = \"{}\"\ncompress-level = 3\n",
        repository.display(),
        catalog.display()
    );
    fs::write(&path, text).with_context(|| format!("unable to write '{}'", path.display()))?;
    ctx.chown(&path)?;
    Ok(path)
}

/// `walvault --config F init --pgdata D`, as the PostgreSQL user.
pub fn walvault_init(ctx: &Ctx, config: &Path, pgdata: &Path) -> Result<()> {
    let mut cmd = ctx.walvault("walvault");
    cmd.arg("--config").arg(config).arg("init").arg("--pgdata").arg(pgdata);
    run(cmd).map(|_| ())
}

/// Whether the `pgbackrest` program can be run.
pub fn pgbackrest_version(ctx: &Ctx) -> Option<String> {
    let mut cmd = ctx.tool("pgbackrest");
    cmd.arg("version");
    run(cmd).ok().map(|v| v.trim().to_string())
}

/// Sets up walvault (`init`) and, if installed, pgBackRest (`stanza-create`)
/// against the (stopped) cluster in `pgdata`.
pub fn setup(ctx: &Ctx, pgdata: &Path, with_pgbackrest: bool) -> Result<Archivers> {
    let walvault_repo = ctx.path("repo");
    let walvault = walvault_config(ctx, "walvault", &walvault_repo, &ctx.path("catalog.db"))?;
    walvault_init(ctx, &walvault, pgdata).context("walvault init failed")?;

    let pgbackrest_repo = ctx.path("pgbr-repo");
    let pgbackrest = if with_pgbackrest {
        let path = ctx.path("pgbackrest.conf");
        // compress-level is left at pgBackRest's default, which is 3 for
        // zst: the same level walvault uses. The file log (log-level-file)
        // stays at its default (info), as a user would have it.
        let text = format!(
            "[global]\nrepo1-path={}\ncompress-type=zst\nlog-level-console=warn\nlog-path={}\nlock-path={}\n\
             spool-path={}\n\n[{CLUSTER}]\npg1-path={}\n",
            pgbackrest_repo.display(),
            ctx.mkdir("pgbr-log")?.display(),
            ctx.mkdir("pgbr-lock")?.display(),
            ctx.mkdir("pgbr-spool")?.display(),
            pgdata.display()
        );
        fs::write(&path, text).with_context(|| format!("unable to write '{}'", path.display()))?;
        ctx.chown(&path)?;
        // --no-online: the server is stopped; pgBackRest reads
        // global/pg_control for the system identifier and version.
        run(pgbackrest(ctx, &path, &["--no-online", "stanza-create"])).context("pgbackrest stanza-create failed")?;
        Some(path)
    } else {
        None
    };
    Ok(Archivers { walvault, walvault_repo, pgbackrest, pgbackrest_repo })
}

fn pgbackrest(ctx: &Ctx, config: &Path, args: &[&str]) -> Command {
    let mut cmd = ctx.tool("pgbackrest");
    cmd.arg(format!("--config={}", config.display())).arg(format!("--stanza={CLUSTER}")).args(args);
    cmd
}

/// `cp SRC DST`, timed.
fn cp(ctx: &Ctx, src: &Path, dst: &Path) -> Result<Duration> {
    let mut cmd = ctx.tool("cp");
    cmd.arg(src).arg(dst);
    timed(cmd)
}

/// `cp SRC DST && sync DST`, timed together (two processes; `sync FILE`
/// fsyncs the file, not its directory).
fn cp_sync(ctx: &Ctx, src: &Path, dst: &Path) -> Result<Duration> {
    let copy = cp(ctx, src, dst)?;
    let mut cmd = ctx.tool("sync");
    cmd.arg(dst);
    Ok(copy + timed(cmd)?)
}

/// One way of archiving or fetching, applied to one segment.
type Op<'a> = Box<dyn Fn(&Segment) -> Result<Duration> + 'a>;

/// Runs every op on every segment, interleaved: segment by segment, each
/// op once, starting with a different op each segment so that no op
/// always follows the same one. Machine noise then hits all columns alike.
fn interleave(segments: &[Segment], ops: &[(String, Op<'_>)]) -> Result<Vec<Series>> {
    let mut series: Vec<Series> = ops.iter().map(|(l, _)| Series::new(l.clone())).collect();
    for (i, seg) in segments.iter().enumerate() {
        for k in 0..ops.len() {
            let j = (i + k) % ops.len();
            let took = (ops[j].1)(seg).with_context(|| format!("{} of segment '{}'", ops[j].0, seg.name))?;
            series[j].push(took, format!("{},{k}", seg.name));
        }
    }
    Ok(series)
}

/// Runs every program once, untimed, so that the first timed call does
/// not pay for loading it from disk.
fn warm_up(ctx: &Ctx, arch: &Archivers) -> Result<()> {
    let mut cmds = vec![ctx.walvault("archive-push"), ctx.walvault("archive-fetch"), ctx.tool("cp"), ctx.tool("sync")];
    cmds.iter_mut().for_each(|c| {
        c.arg("--version");
    });
    let mut zstd = ctx.tool("zstd");
    zstd.arg("-V");
    cmds.push(zstd);
    if arch.pgbackrest.is_some() {
        let mut c = ctx.tool("pgbackrest");
        c.arg("version");
        cmds.push(c);
    }
    for cmd in cmds {
        run(cmd)?;
    }
    Ok(())
}

/// Times archiving every segment with each tool, then fetching every
/// segment back with each, checking each fetched file byte for byte.
pub fn measure(ctx: &Ctx, arch: &Archivers, segments: &[Segment]) -> Result<Timings> {
    let plain = ctx.mkdir("cp-plain")?;
    let synced = ctx.mkdir("cp-sync")?;
    let restore = ctx.mkdir("restore")?;
    let scratch = ctx.mkdir("scratch")?;
    let threads = zstd_workers();
    warm_up(ctx, arch)?;
    sync_all()?;

    let mut push_ops: Vec<(String, Op<'_>)> = vec![
        (
            "cp".into(),
            Box::new(|s: &Segment| {
                let dst = plain.join(&s.name);
                let t = cp(ctx, &s.path, &dst)?;
                // Every full-size copy is removed at once: its dirty pages
                // stay out of later write-back, and the next call reuses its
                // memory. (On the VM these figures come from, writing into
                // memory the kernel had not used for a while made `cp` up to
                // 5× slower, all of it on-CPU in the kernel's memcpy; copies
                // left behind made every later `cp` pay that.)
                remove_file(&dst)?;
                Ok(t)
            }),
        ),
        (
            "cp + sync".into(),
            Box::new(|s: &Segment| {
                let dst = synced.join(&s.name);
                let t = cp_sync(ctx, &s.path, &dst)?;
                remove_file(&dst)?;
                Ok(t)
            }),
        ),
        (
            "walvault archive-push".into(),
            Box::new(|s: &Segment| {
                let mut cmd = ctx.walvault("archive-push");
                cmd.arg("--config").arg(&arch.walvault).arg(&s.path);
                timed(cmd)
            }),
        ),
    ];
    if let Some(conf) = &arch.pgbackrest {
        push_ops.push((
            "pgbackrest archive-push".into(),
            Box::new(move |s: &Segment| {
                let mut cmd = pgbackrest(ctx, conf, &["archive-push"]);
                cmd.arg(&s.path);
                timed(cmd)
            }),
        ));
    }
    push_ops.push((
        format!("{REFERENCE}archive-push --version (process start)"),
        Box::new(|_: &Segment| {
            let mut cmd = ctx.walvault("archive-push");
            cmd.arg("--version");
            timed_with_output(cmd)
        }),
    ));
    push_ops.push((
        format!("{REFERENCE}zstd -3 -T{threads} SRC -o DST (compression only, no fsync)"),
        Box::new(|s: &Segment| {
            let dst = scratch.join(format!("{}.zst", s.name));
            let mut cmd = ctx.tool("zstd");
            cmd.args(["-3", "-q", &format!("-T{threads}")]).arg(&s.path).arg("-o").arg(&dst);
            let t = timed(cmd)?;
            remove_file(&dst)?;
            Ok(t)
        }),
    ));
    eprintln!("walvault-bench: timing {} operations on {} segments", push_ops.len(), segments.len());
    let (reference, push): (Vec<Series>, Vec<Series>) =
        interleave(segments, &push_ops)?.into_iter().partition(|s| s.label.starts_with(REFERENCE));
    sync_all()?;

    // Each fetched file is compared with the original, then removed
    // (outside the timed window).
    let checked = |s: &Segment, tag: &str, f: &dyn Fn(&Path) -> Result<Duration>| -> Result<Duration> {
        let dst = restore.join(format!("{}.{tag}", s.name));
        let t = f(&dst)?;
        same_bytes(&s.path, &dst)?;
        remove_file(&dst)?;
        Ok(t)
    };
    let mut fetch_ops: Vec<(String, Op<'_>)> = vec![
        ("cp".into(), Box::new(|s: &Segment| checked(s, "cp", &|dst| cp(ctx, &s.path, dst)))),
        (
            "walvault archive-fetch".into(),
            Box::new(|s: &Segment| {
                checked(s, "walvault", &|dst| {
                    let mut cmd = ctx.walvault("archive-fetch");
                    cmd.arg("--config").arg(&arch.walvault).arg(&s.name).arg(dst);
                    timed(cmd)
                })
            }),
        ),
    ];
    if let Some(conf) = &arch.pgbackrest {
        fetch_ops.push((
            "pgbackrest archive-get".into(),
            Box::new(move |s: &Segment| {
                checked(s, "pgbackrest", &|dst| {
                    let mut cmd = pgbackrest(ctx, conf, &["archive-get"]);
                    cmd.arg(&s.name).arg(dst);
                    timed(cmd)
                })
            }),
        ));
    }
    eprintln!("walvault-bench: timing {} fetches of {} segments (each checked)", fetch_ops.len(), segments.len());
    let fetch = interleave(segments, &fetch_ops)?;
    Ok(Timings { push, fetch, reference })
}

/// Stored sizes: walvault's WAL objects, pgBackRest's archived WAL, and
/// `zstd -3` of each segment.
pub fn sizes(ctx: &Ctx, arch: &Archivers, segments: &[Segment]) -> Result<Sizes> {
    let mut zstd3 = 0;
    for s in segments {
        let mut cmd = ctx.tool("zstd");
        cmd.args(["-3", "-q", "-c"]).arg(&s.path);
        zstd3 += stdout_len(cmd).context("the zstd CLI is needed for the size comparison")?;
    }
    let walvault = tree_bytes(&arch.walvault_repo.join(CLUSTER).join("wal"))?;
    let pgbackrest = match &arch.pgbackrest {
        // archive/<stanza>/<pg version>-<id>/<timeline+log>/<segment>-<sha1>.zst
        Some(_) => {
            let dir = arch.pgbackrest_repo.join("archive").join(CLUSTER);
            let mut total = 0;
            for entry in fs::read_dir(&dir).with_context(|| format!("unable to list '{}'", dir.display()))? {
                let entry = entry.with_context(|| format!("unable to list '{}'", dir.display()))?;
                if entry.path().is_dir() {
                    total += tree_bytes(&entry.path())?;
                }
            }
            Some(total)
        }
        None => None,
    };
    let plain = segments.len() as u64 * crate::pg::SEGMENT_BYTES;
    Ok(Sizes { plain, zstd3, walvault, pgbackrest })
}
