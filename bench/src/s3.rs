//! walvault-bench-s3: archives and fetches real WAL segments through one
//! local S3 server with walvault, barman-cloud and pgBackRest side by side,
//! one process per segment as PostgreSQL runs `archive_command` and
//! `restore_command`, and prints wall time, CPU time and stored bytes per
//! tool as Markdown (see `docs/benchmarks.md`, "S3 repositories").
//!
//! ```text
//! bash scripts/bench-deps.sh        # as root: barman-cli-cloud, stunnel4, ...
//! cargo build --release --workspace --bins
//! cargo run --release -p walvault-bench --bin walvault-bench-s3 -- [--segments N] [--rounds R] [--out DIR]
//! ```

// Shared with the archive and backup suites (src/main.rs); this program
// uses only part of them.
#[allow(dead_code)]
mod ctx;
#[allow(dead_code)]
mod host;
mod pg;
mod s3_env;
mod s3_report;
#[allow(dead_code)]
mod stats;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ctx::{Ctx, describe, is_root, remove_file, run, same_bytes, sync_all};
use crate::host::source_version;
use crate::pg::Segment;
use crate::s3_env::{BUCKET, Flavor, S3Env};
use crate::s3_report::{Report, Row};

const USAGE: &str = "\
usage: walvault-bench-s3 [--segments N] [--rounds R] [--s3-server PATH] [--out DIR] [--keep]

  --segments N      WAL segments made with pgbench, pushed and fetched by every
                    tool in every round (default 20)
  --rounds R        repeat pushing and fetching R times, each into fresh
                    prefixes; the figures are over all rounds (default 3)
  --s3-server PATH  the S3 server to run: s3s-fs or moto_server (default: s3s-fs
                    if scripts/s3-test-servers.sh installed it, else moto)
  --out DIR         also write DIR/results-s3.md and every sample to
                    DIR/samples-s3.csv
  --keep            keep the work directory under /tmp

Run as root after `bash scripts/bench-deps.sh` and
`cargo build --release --workspace --bins`: the walvault binaries are taken
from the directory of this executable.";

/// The cluster name walvault uses, pgBackRest's stanza and barman's server name.
const CLUSTER: &str = "bench";

/// Command-line options.
#[derive(Debug)]
struct Args {
    segments: usize,
    rounds: usize,
    s3_server: Option<PathBuf>,
    out: Option<PathBuf>,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { segments: 20, rounds: 3, s3_server: None, out: None, keep: false };
    let mut it = std::env::args().skip(1);
    fn number(flag: &str, v: Option<String>) -> Result<usize> {
        v.and_then(|s| s.parse().ok()).with_context(|| format!("{flag} takes a number"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--segments" => a.segments = number(&arg, it.next())?,
            "--rounds" => a.rounds = number(&arg, it.next())?,
            "--s3-server" => a.s3_server = Some(PathBuf::from(it.next().context("--s3-server needs a path")?)),
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                let _ = writeln!(std::io::stdout(), "{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    if a.segments < 2 || a.rounds < 1 {
        bail!("--segments must be at least 2 and --rounds at least 1");
    }
    Ok(a)
}

/// Wall and CPU time of one command.
#[derive(Debug, Clone, Copy)]
pub struct Took {
    /// From spawn to exit.
    pub wall: Duration,
    /// User + system CPU of the child and everything it waited for.
    pub cpu: Duration,
}

/// CPU time (user + system) of every child this process has waited for.
fn children_cpu() -> Result<Duration> {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage that outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_CHILDREN) failed");
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// Runs `cmd` as PostgreSQL runs `archive_command`: one process, waited for.
/// Fails unless it exits 0 and prints nothing on stderr (and nothing on
/// stdout, when `quiet`). The CPU time is the growth of this process's
/// children's rusage across the call: the benchmark runs one child at a time.
fn timed(mut cmd: Command, quiet: bool) -> Result<Took> {
    let shown = describe(&cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let cpu_before = children_cpu()?;
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("unable to run '{shown}'"))?;
    let wall = start.elapsed();
    let cpu = children_cpu()?.saturating_sub(cpu_before);
    if !out.status.success() || (quiet && !out.stdout.is_empty()) || !out.stderr.is_empty() {
        bail!(
            "'{shown}' exited with {} and printed:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Took { wall, cpu })
}

/// How one client reaches the repository, and with which compression.
#[derive(Debug, Clone)]
enum Kind {
    /// walvault with this configuration file; `ca` is trusted through
    /// `SSL_CERT_FILE` (HTTPS rows).
    Walvault { config: PathBuf, ca: Option<PathBuf> },
    /// barman-cloud: destination URL, endpoint, compression flag, CA bundle.
    Barman { url: String, endpoint: String, flag: Option<&'static str>, ca: Option<PathBuf> },
    /// pgBackRest with this configuration file (always HTTPS).
    Pgbackrest { config: PathBuf },
}

/// One row of the tables: a tool with one configuration.
#[derive(Debug, Clone)]
struct Client {
    label: &'static str,
    /// Its prefix in the bucket, below `r<round>/`.
    slug: &'static str,
    kind: Kind,
}

/// The rows, in the order the tables show them.
pub const WV3_HTTP: &str = "walvault, zstd 3, HTTP";
/// walvault through stunnel.
pub const WV3_HTTPS: &str = "walvault, zstd 3, HTTPS (stunnel)";
/// walvault at its fastest level.
pub const WV1_HTTP: &str = "walvault, zstd 1, HTTP";
/// barman-cloud with gzip.
pub const BARMAN_GZ_HTTP: &str = "barman-cloud, gzip, HTTP";
/// barman-cloud with gzip, through stunnel.
pub const BARMAN_GZ_HTTPS: &str = "barman-cloud, gzip, HTTPS (stunnel)";
/// barman-cloud without compression.
pub const BARMAN_NONE_HTTP: &str = "barman-cloud, no compression, HTTP";
/// pgBackRest, synchronous, through stunnel.
pub const PGBR_HTTPS: &str = "pgBackRest, zst 3, HTTPS (stunnel)";
/// Reference: walvault into a local directory.
pub const WV3_LOCAL: &str = "walvault, zstd 3, local directory (reference)";
/// Reference: process start of archive-push.
pub const WV_VERSION: &str = "archive-push --version (process start)";
/// Reference: process start of barman-cloud-wal-archive (Python, boto3).
pub const BARMAN_VERSION: &str = "barman-cloud-wal-archive --version (process start)";

impl Client {
    fn push(&self, ctx: &Ctx, env: &S3Env, seg: &Segment) -> Command {
        match &self.kind {
            Kind::Walvault { config, ca } => {
                let mut cmd = ctx.walvault("archive-push");
                cmd.arg("--config").arg(config).arg(&seg.path);
                if let Some(ca) = ca {
                    cmd.env("SSL_CERT_FILE", ca);
                }
                cmd
            }
            Kind::Barman { url, endpoint, flag, ca } => {
                let mut cmd = ctx.tool("barman-cloud-wal-archive");
                cmd.args(flag).arg("--endpoint-url").arg(endpoint).arg(url).arg(CLUSTER).arg(&seg.path);
                barman_env(env, &mut cmd, ca.as_deref());
                cmd
            }
            Kind::Pgbackrest { config } => {
                let mut cmd = pgbackrest(ctx, config, "archive-push");
                cmd.arg(&seg.path);
                cmd
            }
        }
    }

    fn fetch(&self, ctx: &Ctx, env: &S3Env, name: &str, dst: &Path) -> Command {
        match &self.kind {
            Kind::Walvault { config, ca } => {
                let mut cmd = ctx.walvault("archive-fetch");
                cmd.arg("--config").arg(config).arg(name).arg(dst);
                if let Some(ca) = ca {
                    cmd.env("SSL_CERT_FILE", ca);
                }
                cmd
            }
            Kind::Barman { url, endpoint, ca, .. } => {
                let mut cmd = ctx.tool("barman-cloud-wal-restore");
                cmd.arg("--endpoint-url").arg(endpoint).arg(url).arg(CLUSTER).arg(name).arg(dst);
                barman_env(env, &mut cmd, ca.as_deref());
                cmd
            }
            Kind::Pgbackrest { config } => {
                let mut cmd = pgbackrest(ctx, config, "archive-get");
                cmd.arg(name).arg(dst);
                cmd
            }
        }
    }
}

fn barman_env(env: &S3Env, cmd: &mut Command, ca: Option<&Path>) {
    env.aws_env(cmd);
    if let Some(ca) = ca {
        cmd.env("AWS_CA_BUNDLE", ca);
    }
}

fn pgbackrest(ctx: &Ctx, config: &Path, command: &str) -> Command {
    let mut cmd = ctx.tool("pgbackrest");
    cmd.arg(format!("--config={}", config.display())).arg(format!("--stanza={CLUSTER}")).arg(command);
    cmd
}

/// Writes a walvault configuration `<work>/<name>.toml`; `repository` is a
/// path or an `s3://` URL, `endpoint` the `[s3]` endpoint for the latter.
fn walvault_config(
    ctx: &Ctx,
    env: &S3Env,
    name: &str,
    repository: &str,
    level: u8,
    endpoint: Option<&str>,
) -> Result<PathBuf> {
    let path = ctx.path(format!("{name}.toml"));
    let mut text = format!(
        "cluster = \"{CLUSTER}\"\nrepository = \"{repository}\"\ncatalog = \"{}\"\ncompress-level = {level}\n",
        ctx.path(format!("{name}.db")).display()
    );
    if let Some(endpoint) = endpoint {
        text.push_str(&format!(
            "\n[s3]\nendpoint = \"{endpoint}\"\nregion = \"{}\"\npath-style = true\nallow-http = {}\n\
             credentials-file = \"{}\"\nrequest-timeout = \"60s\"\nretry-budget = \"60s\"\n",
            s3_env::REGION,
            endpoint.starts_with("http:"),
            env.credentials.display()
        ));
    }
    fs::write(&path, text).with_context(|| format!("unable to write '{}'", path.display()))?;
    ctx.chown(&path)?;
    Ok(path)
}

/// `walvault init --pgdata` for `config`, as the PostgreSQL user.
fn walvault_init(ctx: &Ctx, config: &Path, pgdata: &Path, ca: Option<&Path>) -> Result<()> {
    let mut cmd = ctx.walvault("walvault");
    cmd.arg("--config").arg(config).arg("init").arg("--pgdata").arg(pgdata);
    if let Some(ca) = ca {
        cmd.env("SSL_CERT_FILE", ca);
    }
    run(cmd).map(|_| ())
}

/// Which tools are installed.
#[derive(Debug, Clone, Copy)]
struct Have {
    barman: bool,
    pgbackrest: bool,
    walvault_https: bool,
}

/// Fresh prefixes, configurations and repositories for round `round`.
fn setup_round(ctx: &Ctx, env: &S3Env, pgdata: &Path, round: usize, have: Have) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    let s3 = |slug: &str| format!("s3://{BUCKET}/r{round}/{slug}");
    let http = env.http.clone();
    let https = env.https();
    let mut walvault = |label, slug: &'static str, level, endpoint: Option<&str>, ca: Option<&Path>| -> Result<()> {
        let repository = match endpoint {
            Some(_) => s3(slug),
            None => ctx.path(format!("r{round}-{slug}")).display().to_string(),
        };
        let config = walvault_config(ctx, env, &format!("r{round}-{slug}"), &repository, level, endpoint)?;
        walvault_init(ctx, &config, pgdata, ca).with_context(|| format!("walvault init of '{repository}' failed"))?;
        clients.push(Client { label, slug, kind: Kind::Walvault { config, ca: ca.map(Path::to_path_buf) } });
        Ok(())
    };
    walvault(WV3_HTTP, "walvault-zstd3-http", 3, Some(&http), None)?;
    if have.walvault_https {
        walvault(WV3_HTTPS, "walvault-zstd3-https", 3, Some(&https), Some(&env.ca))?;
    }
    walvault(WV1_HTTP, "walvault-zstd1-http", 1, Some(&http), None)?;
    walvault(WV3_LOCAL, "walvault-zstd3-local", 3, None, None)?;
    if have.barman {
        let mut barman = |label, slug: &'static str, flag, endpoint: &str, ca: Option<&Path>| {
            let kind =
                Kind::Barman { url: s3(slug), endpoint: endpoint.to_string(), flag, ca: ca.map(Path::to_path_buf) };
            clients.push(Client { label, slug, kind });
        };
        barman(BARMAN_GZ_HTTP, "barman-gzip-http", Some("--gzip"), &http, None);
        barman(BARMAN_GZ_HTTPS, "barman-gzip-https", Some("--gzip"), &https, Some(&env.ca));
        barman(BARMAN_NONE_HTTP, "barman-none-http", None, &http, None);
    }
    if have.pgbackrest {
        let slug = "pgbackrest";
        let config = ctx.path(format!("r{round}-pgbackrest.conf"));
        // pgBackRest speaks only HTTPS to S3: through stunnel, certificate
        // not verified. compress-level 3 is its default for zst; stated
        // anyway. The file log stays at its default (info).
        let text = format!(
            "[global]\nrepo1-type=s3\nrepo1-path=/r{round}/{slug}\nrepo1-s3-bucket={BUCKET}\n\
             repo1-s3-endpoint=127.0.0.1\nrepo1-storage-port={}\nrepo1-storage-verify-tls=n\n\
             repo1-s3-uri-style=path\nrepo1-s3-region={}\nrepo1-s3-key={}\nrepo1-s3-key-secret={}\n\
             compress-type=zst\ncompress-level=3\nlog-level-console=warn\nlog-path={}\nlock-path={}\n\
             spool-path={}\n\n[{CLUSTER}]\npg1-path={}\n",
            env.tls_port,
            s3_env::REGION,
            s3_env::ACCESS_KEY_ID,
            s3_env::SECRET_ACCESS_KEY,
            ctx.mkdir("pgbr-log")?.display(),
            ctx.mkdir("pgbr-lock")?.display(),
            ctx.mkdir("pgbr-spool")?.display(),
            pgdata.display()
        );
        fs::write(&config, text).with_context(|| format!("unable to write '{}'", config.display()))?;
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("unable to restrict '{}'", config.display()))?;
        ctx.chown(&config)?;
        // --no-online: the server is stopped; pgBackRest reads pg_control.
        let mut cmd = pgbackrest(ctx, &config, "stanza-create");
        cmd.arg("--no-online");
        run(cmd).context("pgbackrest stanza-create failed")?;
        clients.push(Client { label: PGBR_HTTPS, slug, kind: Kind::Pgbackrest { config } });
    }
    Ok(clients)
}

/// One timed operation on one segment.
type Op<'a> = Box<dyn Fn(&Segment) -> Result<Took> + 'a>;

/// Runs every op on every segment, segment by segment, starting with a
/// different op each time so that machine noise hits all rows alike.
fn interleave(segments: &[Segment], ops: &[(&'static str, Op<'_>)], round: usize, rows: &mut Vec<Row>) -> Result<()> {
    for (i, seg) in segments.iter().enumerate() {
        for k in 0..ops.len() {
            let j = (i + k) % ops.len();
            let (label, op) = &ops[j];
            let took = op(seg).with_context(|| format!("{label}, segment '{}', round {round}", seg.name))?;
            let row = match rows.iter_mut().position(|r| r.label == *label) {
                Some(p) => &mut rows[p],
                None => {
                    rows.push(Row::new(label));
                    let last = rows.len() - 1;
                    &mut rows[last]
                }
            };
            row.add(round, &seg.name, k, took);
        }
    }
    Ok(())
}

/// Pushes every segment with every client, then fetches every segment back
/// with every client (each fetched file checked byte for byte, outside the
/// timed window).
fn measure_round(
    ctx: &Ctx,
    env: &S3Env,
    clients: &[Client],
    segments: &[Segment],
    round: usize,
    report: &mut Report,
) -> Result<()> {
    let mut push: Vec<(&'static str, Op<'_>)> = Vec::new();
    for c in clients {
        push.push((c.label, Box::new(move |s: &Segment| timed(c.push(ctx, env, s), true))));
    }
    push.push((
        WV_VERSION,
        Box::new(|_: &Segment| {
            let mut cmd = ctx.walvault("archive-push");
            cmd.arg("--version");
            timed(cmd, false)
        }),
    ));
    if clients.iter().any(|c| matches!(c.kind, Kind::Barman { .. })) {
        push.push((
            BARMAN_VERSION,
            Box::new(|_: &Segment| {
                let mut cmd = ctx.tool("barman-cloud-wal-archive");
                cmd.arg("--version");
                timed(cmd, false)
            }),
        ));
    }
    sync_all()?;
    eprintln!("walvault-bench-s3: round {round}: {} pushes of {} segments", push.len(), segments.len());
    interleave(segments, &push, round, &mut report.push)?;

    let restore = ctx.mkdir("restore")?;
    let mut fetch: Vec<(&'static str, Op<'_>)> = Vec::new();
    for c in clients {
        let restore = restore.clone();
        fetch.push((
            c.label,
            Box::new(move |s: &Segment| {
                let dst = restore.join(format!("{}.{}", s.name, c.slug));
                let took = timed(c.fetch(ctx, env, &s.name, &dst), true)?;
                same_bytes(&s.path, &dst)?;
                remove_file(&dst)?;
                Ok(took)
            }),
        ));
    }
    sync_all()?;
    eprintln!("walvault-bench-s3: round {round}: {} fetches of {} segments, each checked", fetch.len(), segments.len());
    interleave(segments, &fetch, round, &mut report.fetch)?;
    Ok(())
}

/// Bytes each client stored for `segments` in round 1: every object whose
/// file name starts with one of the segment names (so pgBackRest's
/// `archive.info` and walvault's repository marker are not counted).
fn sizes(ctx: &Ctx, env: &S3Env, clients: &[Client], segments: &[Segment]) -> Result<Vec<(&'static str, u64, usize)>> {
    let names: std::collections::HashSet<&str> = segments.iter().map(|s| s.name.as_str()).collect();
    let mut out = Vec::new();
    for c in clients {
        let objects = match &c.kind {
            Kind::Walvault { config: _, ca: None } if c.label == WV3_LOCAL => {
                let mut v = Vec::new();
                local_files(&ctx.path(format!("r1-{}", c.slug)), &mut v)?;
                v
            }
            _ => env.list(&format!("r1/{}/", c.slug))?,
        };
        let mut bytes = 0;
        let mut count = 0;
        for (key, size) in objects {
            let base = key.rsplit('/').next().unwrap_or(&key);
            if base.get(..24).is_some_and(|n| names.contains(n)) {
                bytes += size;
                count += 1;
            }
        }
        out.push((c.label, bytes, count));
    }
    Ok(out)
}

fn local_files(dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("unable to list '{}'", dir.display()))? {
        let entry = entry.with_context(|| format!("unable to list '{}'", dir.display()))?;
        let meta = entry.metadata().with_context(|| format!("unable to stat '{}'", entry.path().display()))?;
        if meta.is_dir() {
            local_files(&entry.path(), out)?;
        } else {
            out.push((entry.path().display().to_string(), meta.len()));
        }
    }
    Ok(())
}

/// The version line `program ARGS` prints (on stdout or stderr): the first
/// line starting with the program's name, else the first line; `None` when
/// it cannot be run.
fn version_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // stunnel4 -version starts with log lines; its version line names it.
    let name = Path::new(program).file_name().map(|n| n.to_string_lossy().trim_end_matches('4').to_string());
    let lines = || text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines().find(|l| name.as_deref().is_some_and(|n| l.starts_with(n))).or_else(|| lines().next()).map(str::to_string)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walvault-bench-s3: error: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = real_main(&args) {
        eprintln!("walvault-bench-s3: error: {e:#}");
        if !args.keep {
            eprintln!("HINT: run again with --keep to look at the work directory");
        }
        std::process::exit(1);
    }
}

fn real_main(args: &Args) -> Result<()> {
    let started = Instant::now();
    let load_before = host::loadavg();
    if !is_root()? {
        bail!("run walvault-bench-s3 as root: it starts PostgreSQL as 'postgres', stunnel and an S3 server");
    }
    if version_of("stunnel4", &["-version"]).is_none() && !Path::new("/usr/bin/stunnel4").is_file() {
        bail!("stunnel4 is not installed: run scripts/bench-deps.sh");
    }
    let (flavor, program) = s3_env::choose_server(args.s3_server.as_deref())?;
    let barman = version_of("barman-cloud-wal-archive", &["--version"]);
    let pgbackrest = version_of("pgbackrest", &["version"]);
    for (what, v) in [("barman-cloud-wal-archive", &barman), ("pgbackrest", &pgbackrest)] {
        if v.is_none() {
            eprintln!("walvault-bench-s3: {what} is not installed: its rows are left out (scripts/bench-deps.sh)");
        }
    }

    let (work, ctx) = host::setup("walvault-bench-s3", args.keep)?;

    eprintln!("walvault-bench-s3: making {} WAL segments with pgbench in '{}'", args.segments, ctx.work.display());
    let mut server = pg::Server::initdb(&ctx)?;
    let segments = pg::make_segments(&mut server, args.segments)?;
    let pgdata = server.datadir().to_path_buf();

    let env = S3Env::start(&ctx, flavor, &program)?;
    eprintln!("walvault-bench-s3: {} at {}, stunnel at {}", env.version(), env.http, env.https());
    // Can walvault reach the server through stunnel, trusting the CA
    // through SSL_CERT_FILE? (object_store's TLS takes the system's roots,
    // which honour that variable.)
    let probe = walvault_config(&ctx, &env, "probe-https", &format!("s3://{BUCKET}/probe"), 3, Some(&env.https()))?;
    let walvault_https = match walvault_init(&ctx, &probe, &pgdata, Some(&env.ca)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("walvault-bench-s3: walvault cannot use the HTTPS endpoint, its row is left out: {e:#}");
            false
        }
    };
    let have = Have { barman: barman.is_some(), pgbackrest: pgbackrest.is_some(), walvault_https };

    let mut report = Report::default();
    let mut clients = Vec::new();
    for round in 1..=args.rounds {
        let load = host::loadavg();
        clients = setup_round(&ctx, &env, &pgdata, round, have)?;
        measure_round(&ctx, &env, &clients, &segments, round, &mut report)?;
        report.loads.push((round, load, host::loadavg()));
        if round == 1 {
            report.sizes = sizes(&ctx, &env, &clients, &segments)?;
        }
    }
    drop(server);

    let wv = ctx.walvault("archive-push");
    let versions = vec![
        ("PostgreSQL".to_string(), version_of(&format!("{}/postgres", ctx::PG_BIN), &["--version"])),
        (
            "walvault".to_string(),
            version_of(&wv.get_program().to_string_lossy(), &["--version"])
                .map(|v| format!("{v}, {}", source_version())),
        ),
        ("barman-cloud".to_string(), barman),
        ("pgBackRest".to_string(), pgbackrest),
        ("S3 server".to_string(), Some(format!("{} ({})", env.version(), env.program.display()))),
        ("TLS terminator".to_string(), version_of("stunnel4", &["-version"])),
        ("Python (barman-cloud)".to_string(), version_of("python3", &["--version"])),
    ];
    let command = std::iter::once("cargo run --release -p walvault-bench --bin walvault-bench-s3 --".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    report.segments = segments.len();
    report.rounds = args.rounds;
    report.moto = env.flavor == Flavor::Moto;
    report.walvault_https = walvault_https;
    report.commands = clients.iter().map(|c| (c.label, describe_client(&ctx, &env, c, &segments[0]))).collect();
    let md = s3_report::markdown(&report, &ctx.work, &versions, &command, &load_before);
    writeln!(std::io::stdout(), "{md}").context("unable to write the results to stdout")?;
    if let Some(dir) = &args.out {
        fs::create_dir_all(dir).with_context(|| format!("unable to create '{}'", dir.display()))?;
        let file = dir.join("results-s3.md");
        fs::write(&file, &md).with_context(|| format!("unable to write '{}'", file.display()))?;
        let csv = dir.join("samples-s3.csv");
        fs::write(&csv, report.csv()).with_context(|| format!("unable to write '{}'", csv.display()))?;
        eprintln!("walvault-bench-s3: wrote '{}' and '{}'", file.display(), csv.display());
    }
    drop(env);
    eprintln!("walvault-bench-s3: done in {:.0} s", started.elapsed().as_secs_f64());
    drop(work);
    Ok(())
}

/// The push command of `c` for one segment, as the report shows it (paths
/// shortened to their file names; the environment named, secrets left out).
fn describe_client(ctx: &Ctx, env: &S3Env, c: &Client, seg: &Segment) -> String {
    let cmd = c.push(ctx, env, seg);
    let shown =
        describe(&cmd).replace(&format!("{}/", ctx.work.display()), "").replace(&format!("{}/", ctx.bin.display()), "");
    let extra = match &c.kind {
        Kind::Barman { ca: Some(_), .. } => "AWS_* credentials, AWS_CA_BUNDLE=ca.pem",
        Kind::Barman { .. } => "AWS_* credentials",
        Kind::Walvault { ca: Some(_), .. } => "SSL_CERT_FILE=ca.pem",
        _ => "",
    };
    if extra.is_empty() { shown } else { format!("{shown} (environment: {extra})") }
}
