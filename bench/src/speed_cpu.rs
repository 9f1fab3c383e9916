//! CPU time of one archive-push and one archive-fetch per compression
//! level: user + system time of the child and its threads, from `wait4`,
//! with the stored size, so that the default level is chosen by data.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Args;
use crate::compare::CLUSTER;
use crate::ctx::{Ctx, describe, remove_file, same_bytes, sync_all, tree_bytes};
use crate::pg::{SEGMENT_BYTES, Segment};
use crate::speed_archive::walvault_setup;
use crate::speed_report::{CpuRow, Report};

/// Wall and CPU (user + system) time of one command.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Spawn to exit.
    pub wall: Duration,
    /// User + system time of the process and its threads (`wait4`'s rusage).
    pub cpu: Duration,
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

/// Runs `cmd` as PostgreSQL runs `archive_command`, and returns its wall
/// time and the CPU time `wait4` reports for it. Fails unless it exits 0
/// and prints nothing (its output goes to `log`, shown on failure).
pub fn costed(mut cmd: Command, log: &Path) -> Result<Cost> {
    let shown = describe(&cmd);
    let out = fs::File::create(log).with_context(|| format!("unable to create '{}'", log.display()))?;
    let err = out.try_clone().with_context(|| format!("unable to reopen '{}'", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("unable to run '{shown}'"))?;
    let pid = i32::try_from(child.id()).context("a process id beyond i32")?;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child, with pointers to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("waiting for '{shown}'"));
        }
    }
    let wall = start.elapsed();
    // The child was reaped by wait4; std's handle must not wait again.
    drop(child);
    let printed = fs::read_to_string(log).unwrap_or_default();
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !exited_ok || !printed.is_empty() {
        bail!("'{shown}' ended with wait status {status} and printed:\n{printed}");
    }
    Ok(Cost { wall, cpu: timeval(ru.ru_utime) + timeval(ru.ru_stime) })
}

/// For each level: a fresh repository at that level, every segment pushed
/// (timed, with its CPU time), then every segment fetched back (timed,
/// compared byte for byte). `cp` of the same segments is the reference row.
pub fn measure(ctx: &Ctx, pgdata: &Path, segments: &[Segment], args: &Args, report: &mut Report) -> Result<()> {
    let log = ctx.path("cpu-child.log");
    let out = ctx.mkdir("cpu-out")?;
    let mut cp = CpuRow { label: "`cp` (reference)".into(), level: 0, ..CpuRow::default() };
    for s in segments {
        let dst = out.join(&s.name);
        let mut cmd = ctx.tool("cp");
        cmd.arg(&s.path).arg(&dst);
        let c = costed(cmd, &log)?;
        cp.push.push(c);
        remove_file(&dst)?;
    }
    cp.stored = segments.len() as u64 * SEGMENT_BYTES;
    cp.plain = cp.stored;
    report.cpu.push(cp);
    for &level in &args.levels {
        eprintln!("walvault-bench-speed: CPU per segment at compression level {level}");
        let dir = ctx.mkdir(format!("cpu-{level}"))?;
        let conf = walvault_setup(ctx, &dir, pgdata, level, "")?;
        sync_all()?;
        let mut row = CpuRow { label: format!("walvault, `compress-level = {level}`"), level, ..CpuRow::default() };
        for s in segments {
            let mut cmd = ctx.walvault("archive-push");
            cmd.arg("--config").arg(&conf).arg(&s.path);
            row.push.push(costed(cmd, &log).with_context(|| format!("archive-push at level {level}"))?);
        }
        row.stored = tree_bytes(&dir.join("repo").join(CLUSTER).join("wal"))?;
        row.plain = segments.len() as u64 * SEGMENT_BYTES;
        for s in segments {
            let dst = out.join(&s.name);
            let mut cmd = ctx.walvault("archive-fetch");
            cmd.arg("--config").arg(&conf).arg(&s.name).arg(&dst);
            row.fetch.push(costed(cmd, &log).with_context(|| format!("archive-fetch at level {level}"))?);
            same_bytes(&s.path, &dst)?;
            remove_file(&dst)?;
        }
        for (what, v) in [("push", &row.push), ("fetch", &row.fetch)] {
            for c in v {
                report.samples.push(format!(
                    "cpu-{what},level {level},{:.3},{:.3}\n",
                    c.wall.as_secs_f64() * 1000.0,
                    c.cpu.as_secs_f64() * 1000.0
                ));
            }
        }
        report.cpu.push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("walvault-bench-costed-{}.log", std::process::id()))
    }

    #[test]
    fn costed_counts_the_childs_cpu_and_wants_silence() -> Result<()> {
        let mut busy = Command::new("sh");
        busy.args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"]);
        let c = costed(busy, &log())?;
        // The loop runs on the CPU: user + system time is most of its wall time.
        assert!(c.cpu >= Duration::from_millis(50), "{c:?}");
        assert!(c.cpu <= c.wall + Duration::from_millis(20), "{c:?}");

        let mut sleepy = Command::new("sleep");
        sleepy.arg("0.2");
        let c = costed(sleepy, &log())?;
        assert!(c.wall >= Duration::from_millis(200) && c.cpu < Duration::from_millis(50), "{c:?}");

        let mut noisy = Command::new("echo");
        noisy.arg("hello");
        let Err(e) = costed(noisy, &log()) else { bail!("a command that printed counted as quiet") };
        assert!(e.to_string().contains("hello"), "{e}");
        let Err(e) = costed(Command::new("false"), &log()) else { bail!("a failed command counted as a success") };
        assert!(e.to_string().contains("false"), "{e}");
        let _ = fs::remove_file(log());
        Ok(())
    }
}
