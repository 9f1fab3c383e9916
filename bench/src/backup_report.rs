//! The backup suite's results as Markdown (and CSV): wall times, bytes,
//! walvault's own accounting, checks and targets.

use std::fmt::Write as _;

use crate::backup::{
    FULL, LOCAL_CHANGE_PERCENT, PGBACKREST, RESTORE_FULL, RESTORE_SECOND, Results, SECOND, START, THIRD, WALVAULT,
};

const MIB: f64 = 1024.0 * 1024.0;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median wall seconds, bytes and CPU seconds of (section, tool) over the
/// rounds.
fn figures(r: &Results, section: &str, tool: &str) -> Option<(f64, f64, f64)> {
    let rows: Vec<_> =
        r.rounds.iter().flat_map(|x| &x.rows).filter(|x| x.section == section && x.tool == tool).collect();
    if rows.is_empty() {
        return None;
    }
    Some((
        median(rows.iter().map(|x| x.secs).collect()),
        median(rows.iter().map(|x| x.bytes as f64).collect()),
        median(rows.iter().map(|x| x.cpu).collect()),
    ))
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if a.is_finite() && b.is_finite() && b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// The command line a row stands for.
fn label(r: &Results, section: &str, tool: &str) -> String {
    let j = r.opts.jobs;
    match (section, tool) {
        (FULL | SECOND | THIRD, WALVAULT) => format!("`walvault backup --fast --jobs {j}`"),
        (FULL, PGBACKREST) => format!("`pgbackrest backup --type=full --start-fast --process-max={j}`"),
        (SECOND | THIRD, PGBACKREST) => format!("`pgbackrest backup --type=incr --start-fast --process-max={j}`"),
        (RESTORE_FULL, WALVAULT) => format!("`walvault restore --jobs {j} --target immediate`, full backup"),
        (RESTORE_SECOND, WALVAULT) => format!("`walvault restore --jobs {j} --target immediate`, second backup"),
        (RESTORE_FULL, PGBACKREST) => format!("`pgbackrest restore --process-max={j} --type=immediate`, full backup"),
        (RESTORE_SECOND, PGBACKREST) => {
            format!("`pgbackrest restore --process-max={j} --type=immediate`, incremental backup")
        }
        (START, t) => format!("`pg_ctl start` of {t}'s restore"),
        (_, t) => format!("`{t} -c fast`"),
    }
}

/// One table of `section`: wall time, bytes, and ratios to pgBackRest's row
/// (and, for the second backup, to the same tool's full backup).
fn table(out: &mut String, r: &Results, section: &str, bytes_head: &str, tools: &[String], header: bool) {
    let pgbr = figures(r, section, PGBACKREST);
    let second = section == SECOND || section == THIRD;
    if header {
        let _ = write!(
            out,
            "| operation | wall s | CPU s | {bytes_head} MiB | wall ÷ pgBackRest | CPU ÷ pgBackRest | \
             {bytes_head} ÷ pgBackRest |"
        );
        let _ = writeln!(out, "{}", if second { " wall ÷ its full backup |" } else { "" });
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|{}", if second { "---:|" } else { "" });
    }
    for tool in tools {
        let Some((secs, bytes, cpu)) = figures(r, section, tool) else { continue };
        let _ = write!(
            out,
            "| {} | {secs:.1} | {cpu:.1} | {:.1} | {} | {} | {} |",
            label(r, section, tool),
            bytes / MIB,
            ratio(secs, pgbr.map(|p| p.0)),
            ratio(cpu, pgbr.map(|p| p.2)),
            ratio(bytes, pgbr.map(|p| p.1))
        );
        if second {
            let _ = write!(out, " {} |", ratio(secs, figures(r, FULL, tool).map(|f| f.0)));
        }
        let _ = writeln!(out);
    }
}

/// One target: what, the measured value, the limit, whether it is met.
fn target(out: &mut String, what: &str, x: Option<f64>, limit: f64) {
    let (measured, met) = match x {
        Some(x) if x.is_finite() => (format!("{x:.2}"), if x <= limit { "yes" } else { "**no**" }),
        _ => ("not measured".to_string(), "–"),
    };
    let _ = writeln!(out, "| {what} | {measured} | ≤ {limit} | {met} |");
}

/// The whole report, in Markdown.
pub fn markdown(r: &Results, machine: &[(String, String)], command: &str) -> String {
    let mut out = String::new();
    let o = &r.opts;
    let _ = writeln!(out, "### Machine\n\n| | |\n|---|---|");
    for (k, v) in machine {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    for (i, x) in r.rounds.iter().enumerate() {
        let _ = writeln!(
            out,
            "| load average (1, 5, 15 min), round {}, at start → at end | {} → {} |",
            i + 1,
            x.load.0,
            x.load.1
        );
    }
    let _ = writeln!(out, "\nCommand: `{command}`\n");
    let data = match (r.rounds.first(), r.rounds.last()) {
        (Some(a), Some(b)) if r.rounds.len() > 1 => {
            format!(
                "{:.0} MiB (round 1) to {:.0} MiB (round {})",
                a.data_bytes as f64 / MIB,
                b.data_bytes as f64 / MIB,
                r.rounds.len()
            )
        }
        (Some(a), _) => format!("{:.0} MiB", a.data_bytes as f64 / MIB),
        _ => "?".into(),
    };
    let _ = writeln!(
        out,
        "pgbench scale {}: a data directory of {} without `pg_wal` (`pgbench -i` took {:.0} s). \
         {} processes for walvault (`--jobs`) and pgBackRest (`--process-max`), zstd level 3 for both. \
         {} round(s), each with fresh repositories and a fresh `pgbench -i`; the figures are medians over \
         the rounds. \
         Order in each round: `pg_basebackup` plain, `pg_basebackup` compressed, then walvault and \
         pgBackRest (walvault first in odd rounds, pgBackRest first in even ones). Before each timed \
         command: the archiver idle, `CHECKPOINT`, `sync`; before each command that writes a copy of the \
         data directory, a file as large written, fsynced and removed. CPU s: user + system time of the \
         command and the processes it waited for (threads, pgBackRest's workers), not the server's work \
         for it (which is where `pg_basebackup` reads the files).\n",
        o.scale,
        data,
        r.init_secs,
        o.jobs,
        r.rounds.len()
    );

    if !r.pgbackrest {
        let _ = writeln!(out, "pgBackRest is not installed: its rows and the ratios to it are left out.\n");
    }
    let full_tools =
        [crate::backup::PGBB_PLAIN.to_string(), r.pgbb_compressed.clone(), PGBACKREST.into(), WALVAULT.into()];
    let pair = [PGBACKREST.to_string(), WALVAULT.to_string()];
    let _ = writeln!(out, "### Full backup\n");
    table(&mut out, r, FULL, "stored", &full_tools, true);
    let tx = r.rounds.iter().filter_map(|x| x.transactions).map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
    let _ =
        writeln!(out, "\n### Second backup, after `pgbench -n -c 2 -j 2 -T {}` ({tx} transactions)\n", o.pgbench_secs);
    table(&mut out, r, SECOND, "new", &pair, true);
    let rows = r.rounds.first().and_then(|x| x.updated_rows).unwrap_or(0);
    let _ = writeln!(
        out,
        "\n### Third backup, after `UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= {rows}` \
         ({LOCAL_CHANGE_PERCENT} % of the rows, stored one after the other)\n"
    );
    table(&mut out, r, THIRD, "new", &pair, true);
    let _ = writeln!(out, "\n### Restore (into an empty directory on the same file system)\n");
    table(&mut out, r, RESTORE_FULL, "written", &pair, true);
    table(&mut out, r, RESTORE_SECOND, "written", &pair, false);
    if r.rounds.iter().any(|x| x.rows.iter().any(|row| row.section == START)) {
        let _ = writeln!(
            out,
            "\nStarting the restored second backups (not timed by the targets): `pg_ctl start -w` until \
             the server accepts connections, recovery paused at the consistent point, WAL fetched through \
             each tool's restore_command.\n\n| operation | wall s |\n|---|---:|"
        );
        for tool in &pair {
            if let Some((secs, _, _)) = figures(r, START, tool) {
                let _ = writeln!(out, "| {} | {secs:.1} |", label(r, START, tool));
            }
        }
    }

    let wv: Vec<_> = r.rounds.iter().flat_map(|x| &x.walvault).collect();
    if !wv.is_empty() {
        let _ = writeln!(
            out,
            "\n### walvault's own accounting (`walvault info --json`) and the repository's growth\n\n\
             | backup | id | size MiB | stored_size MiB | new_bytes MiB | repository growth MiB (outside `wal/`) | `data/` growth MiB |\n\
             |---|---|---:|---:|---:|---:|---:|"
        );
        for b in wv {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                b.section,
                b.id,
                b.size as f64 / MIB,
                b.stored_size as f64 / MIB,
                b.new_bytes as f64 / MIB,
                b.repo_growth as f64 / MIB,
                b.data_growth as f64 / MIB
            );
        }
    }

    let lines: Vec<_> = r.rounds.iter().flat_map(|x| &x.walvault).map(|b| format!("- `{}`", b.summary)).collect();
    if !lines.is_empty() {
        let _ = writeln!(out, "\nWhat `walvault backup` printed:\n\n{}", lines.join("\n"));
    }

    if r.rounds.len() > 1 {
        let _ = writeln!(
            out,
            "\n### Every round\n\n| round | operation | tool | wall s | CPU s | MiB |\n|---:|---|---|---:|---:|---:|"
        );
        for (i, x) in r.rounds.iter().enumerate() {
            for row in &x.rows {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.1} | {} | {:.1} |",
                    i + 1,
                    row.section,
                    row.tool,
                    row.secs,
                    if row.cpu.is_finite() { format!("{:.1}", row.cpu) } else { "–".into() },
                    row.bytes as f64 / MIB
                );
            }
        }
    }

    // Each item once, with the rounds it came up in.
    let list = |out: &mut String, title: &str, pick: &dyn Fn(&crate::backup::Round) -> &Vec<String>| {
        let mut items: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, x) in r.rounds.iter().enumerate() {
            for item in pick(x) {
                let item = item.replace('\n', " ");
                match items.iter_mut().find(|(s, _)| *s == item) {
                    Some((_, rounds)) => {
                        if rounds.last() != Some(&(i + 1)) {
                            rounds.push(i + 1);
                        }
                    }
                    None => items.push((item, vec![i + 1])),
                }
            }
        }
        if !items.is_empty() {
            let _ = writeln!(out, "\n### {title}\n");
            for (item, rounds) in items {
                let rounds = rounds.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                let _ = writeln!(out, "- {item} (round {rounds})");
            }
        }
    };
    list(&mut out, "Checks", &|x| &x.checks);
    list(&mut out, "Problems", &|x| &x.problems);
    list(&mut out, "Printed on stderr by commands that succeeded", &|x| &x.notes);

    let secs = |section: &str, tool: &str| figures(r, section, tool).map(|f| f.0);
    let vs = |section: &str| Some(secs(section, WALVAULT)? / secs(section, PGBACKREST)?);
    let _ = writeln!(out, "\n### Targets\n\n| target | measured | limit | met |\n|---|---:|---:|---|");
    target(&mut out, "full backup, walvault ÷ pgBackRest wall time (same processes)", vs(FULL), 1.0);
    target(&mut out, "second backup, walvault ÷ pgBackRest (incr) wall time", vs(SECOND), 1.0);
    target(&mut out, "restore of the full backup, walvault ÷ pgBackRest wall time", vs(RESTORE_FULL), 1.0);
    target(&mut out, "restore of the second backup, walvault ÷ pgBackRest wall time", vs(RESTORE_SECOND), 1.0);
    let own = |section: &str| secs(section, WALVAULT).zip(secs(FULL, WALVAULT)).map(|(a, b)| a / b);
    let well_under = "(\"well under\" read as at most half)";
    target(&mut out, &format!("walvault second backup ÷ its first, after pgbench {well_under}"), own(SECOND), 0.5);
    target(
        &mut out,
        &format!("walvault third backup ÷ its first, after a {LOCAL_CHANGE_PERCENT} % local update {well_under}"),
        own(THIRD),
        0.5,
    );
    out
}

/// Every timed operation of every round:
/// `round,section,tool,seconds,cpu_seconds,bytes` (CPU empty where not
/// measured).
pub fn csv(r: &Results) -> String {
    let mut out = String::from("round,section,tool,seconds,cpu_seconds,bytes\n");
    for (i, x) in r.rounds.iter().enumerate() {
        for row in &x.rows {
            let _ = writeln!(
                out,
                "{},\"{}\",\"{}\",{:.3},{},{}",
                i + 1,
                row.section,
                row.tool,
                row.secs,
                if row.cpu.is_finite() { format!("{:.2}", row.cpu) } else { String::new() },
                row.bytes
            );
        }
    }
    out
}
