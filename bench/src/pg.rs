//! A throw-away PostgreSQL 15 server, and real WAL segments made by pgbench.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ctx::{Ctx, run};

/// Size of a WAL segment of a cluster initdb'd with default settings.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// How long pgbench may run in total to produce the segments; past this,
/// the segments of `pgbench -i` make up the rest.
const PGBENCH_BUDGET: Duration = Duration::from_secs(150);

/// One complete WAL segment, copied out of `pg_wal`.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Its file name, e.g. `000000010000000000000012`.
    pub name: String,
    /// The copy under `<work>/segments/`.
    pub path: PathBuf,
}

/// A server the benchmark started; dropping it stops the server, so no
/// postmaster outlives the benchmark, even on error.
pub struct Server<'a> {
    ctx: &'a Ctx,
    datadir: PathBuf,
    port: u16,
    running: bool,
}

impl<'a> Server<'a> {
    /// Runs `initdb` into `<work>/data` and configures the server for
    /// producing WAL: unix socket in the work directory only, archiving on
    /// (to `/bin/true`), and every segment kept.
    pub fn initdb(ctx: &'a Ctx) -> Result<Server<'a>> {
        let datadir = ctx.path("data");
        let mut cmd = ctx.admin("initdb");
        cmd.arg("-D").arg(&datadir).args(["--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"]);
        run(cmd).context("initdb failed")?;
        // Only a unix socket in the (private) work directory: any port is free.
        let port = 20_000 + u16::try_from(std::process::id() % 30_000).unwrap_or(0);
        let conf = format!(
            "\n# added by walvault-bench\n\
             listen_addresses = ''\n\
             port = {port}\n\
             unix_socket_directories = '{}'\n\
             archive_mode = on\n\
             archive_command = '/bin/true'\n\
             wal_keep_size = '16GB'\n\
             max_wal_size = '16GB'\n\
             checkpoint_timeout = '1h'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             max_connections = 20\n",
            ctx.work.display()
        );
        let path = datadir.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("unable to open '{}'", path.display()))?;
        f.write_all(conf.as_bytes()).with_context(|| format!("unable to write '{}'", path.display()))?;
        Ok(Server { ctx, datadir, port, running: false })
    }

    /// The data directory.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    pub fn start(&mut self) -> Result<()> {
        let mut cmd = self.ctx.admin("pg_ctl");
        cmd.arg("-D")
            .arg(&self.datadir)
            .arg("-l")
            .arg(self.ctx.path("postgres.log"))
            .args(["-w", "-t", "120", "start"]);
        // Marked running first: if pg_ctl fails after the postmaster started,
        // Drop still stops it.
        self.running = true;
        run(cmd)
            .with_context(|| format!("the server did not start; see '{}'", self.ctx.path("postgres.log").display()))?;
        Ok(())
    }

    /// `pg_ctl stop -m fast`, waiting until the server is gone.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let mut cmd = self.ctx.admin("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(["-m", "fast", "-w", "-t", "120", "stop"]);
        run(cmd).context("unable to stop the server")?;
        self.running = false;
        Ok(())
    }

    fn conn(&self, cmd: &mut std::process::Command) {
        cmd.arg("-h").arg(&self.ctx.work).arg("-p").arg(self.port.to_string()).arg("-d").arg("postgres");
    }

    /// Runs one SQL statement and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut cmd = self.ctx.admin("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]);
        self.conn(&mut cmd);
        cmd.arg("-c").arg(sql);
        Ok(run(cmd)?.trim().to_string())
    }

    /// Runs pgbench with `args`.
    pub fn pgbench(&self, args: &[&str]) -> Result<()> {
        let mut cmd = self.ctx.admin("pgbench");
        self.conn(&mut cmd);
        cmd.args(args);
        run(cmd).map(|_| ())
    }

    /// The number of the segment WAL is being written to now.
    fn current_segno(&self) -> Result<u64> {
        let name = self.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")?;
        segno_of(&name).with_context(|| format!("the server named its WAL file '{name}'"))
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        if self.running
            && let Err(e) = self.stop()
        {
            eprintln!("walvault-bench: warning: {e:#}");
        }
    }
}

/// The segment number of a 16 MiB segment file name on any timeline.
fn segno_of(name: &str) -> Option<u64> {
    if name.len() != 24 {
        return None;
    }
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    Some(log * 256 + seg)
}

/// The file name of segment `segno` of timeline 1 (16 MiB segments).
pub fn segment_name(timeline: u32, segno: u64) -> String {
    format!("{timeline:08X}{:08X}{:08X}", segno / 256, segno % 256)
}

/// Makes `n` real WAL segments: `pgbench -i -s 20`, a checkpoint (so that
/// the TPC-B run writes full-page images, as a busy server does), then
/// TPC-B (3 s runs, each followed by a checkpoint) until `n` more segments
/// are complete or the time budget is spent, then `pg_switch_wal()`. The
/// `n` complete segments before the switched one are copied to
/// `<work>/segments/`. Returns them and leaves the server stopped.
pub fn make_segments(server: &mut Server<'_>, n: usize) -> Result<Vec<Segment>> {
    let ctx = server.ctx;
    server.start()?;
    let t = Instant::now();
    server.pgbench(&["-i", "-s", "20", "-q"]).context("pgbench -i failed")?;
    eprintln!("walvault-bench: pgbench -i -s 20 took {:.1} s", t.elapsed().as_secs_f64());
    server.psql("CHECKPOINT")?;
    let first = server.current_segno()?;
    let want = u64::try_from(n)?;
    let t = Instant::now();
    let mut current = first;
    while current - first < want && t.elapsed() < PGBENCH_BUDGET {
        server.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"]).context("pgbench failed")?;
        // pgbench_accounts at scale 20 is only ~33,000 pages: without a
        // checkpoint, every page soon has its full-page image in WAL and
        // the WAL rate drops five-fold. A checkpoint every few seconds
        // keeps the mix of a busy server just after its checkpoints.
        server.psql("CHECKPOINT")?;
        current = server.current_segno()?;
    }
    eprintln!("walvault-bench: pgbench TPC-B wrote {} segments in {:.1} s", current - first, t.elapsed().as_secs_f64());
    server.psql("SELECT pg_switch_wal()")?;
    server.stop()?;

    // `current` was being written and is now complete but mostly empty
    // (switched): take the n full segments before it.
    let Some(start) = current.checked_sub(want).filter(|s| *s >= 1) else {
        bail!("only {current} segments were written; ask for fewer with --segments");
    };
    let dir = ctx.mkdir("segments")?;
    let mut out = Vec::with_capacity(n);
    for segno in start..current {
        let name = segment_name(1, segno);
        let from = server.datadir.join("pg_wal").join(&name);
        let len = fs::metadata(&from).with_context(|| format!("segment '{}' is not in pg_wal", from.display()))?.len();
        if len != SEGMENT_BYTES {
            bail!("'{}' is {len} bytes, expected {SEGMENT_BYTES}", from.display());
        }
        let to = dir.join(&name);
        fs::copy(&from, &to).with_context(|| format!("unable to copy '{}' to '{}'", from.display(), to.display()))?;
        ctx.chown(&to)?;
        out.push(Segment { name, path: to });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_name(1, 0x1FF), "0000000100000001000000FF");
        assert_eq!(segno_of("0000000100000001000000FF"), Some(0x1FF));
        assert_eq!(segno_of("00000001"), None);
    }
}
