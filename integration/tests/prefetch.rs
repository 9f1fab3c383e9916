//! Prefetching fetch (`prefetch = N`) against a real PostgreSQL: recovery
//! with prefetch (and its worker killed with -9 midway) reaches the same
//! tables as recovery without; a damaged copy in the spool is never handed
//! over (the archived file arrives anyway); a standby polling for a segment
//! that is not archived yet gets it once it is; a restore that crosses a
//! timeline switch reaches the same contents with prefetch.
//!
//! The clusters use 1 MiB WAL segments, so that a modest amount of WAL is
//! many segments (recovery here replays about 60).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, assert_same_file, chown_tree_to_pg_user, flip_byte, object_path, read_bytes,
    restore_and_start, table_checksum, wait_until,
};

const LONG: Duration = Duration::from_secs(600);

/// Tables compared, with a complete ordering for each.
const TABLES: [(&str, &str); 4] =
    [("pgbench_accounts", "aid"), ("pgbench_branches", "bid"), ("pgbench_tellers", "tid"), ("ledger", "id")];

fn state(pg: &PgCluster) -> Vec<String> {
    TABLES
        .iter()
        .map(|(table, order)| {
            let exists = pg.psql(&format!("SELECT to_regclass('{table}') IS NOT NULL"));
            if exists == "t" { table_checksum(pg, table, order) } else { "absent".to_string() }
        })
        .collect()
}

/// The configuration `base` plus prefetching into `spool`.
fn prefetch_config(td: &TestDir, base: &Config, spool: &Path, rel: &str) -> PathBuf {
    let text = format!(
        "{}prefetch = 8\njobs = 3\nprefetch-max = \"64MiB\"\nspool-path = \"{}\"\n",
        base.to_toml(),
        spool.display()
    );
    td.write(rel, text)
}

/// A started primary with 1 MiB segments, archiving through the shipped
/// `archive.conf`, its repository bound with `walvault init`.
fn small_segment_primary(td: &TestDir, wv: &Walvault) -> PgCluster {
    let mut pg = PgCluster::initdb(td, "primary", &["--wal-segsize=1"]);
    pg.include_example("archive.conf");
    pg.append_conf("max_wal_size = '256MB'\nmin_wal_size = '32MB'\ncheckpoint_timeout = '30min'\narchive_timeout = 0");
    pg.start(&wv.server_env());
    wv.init(pg.datadir()).expect_success("walvault init (server running)");
    pg
}

/// Name of the segment after `name` (1 MiB segments: 4096 per "log").
fn next_segment(name: &str, ahead: u64) -> String {
    let tli = &name[0..8];
    let log = u64::from_str_radix(&name[8..16], 16).expect("hex");
    let seg = u64::from_str_radix(&name[16..24], 16).expect("hex");
    let n = log * 4096 + seg + ahead;
    format!("{tli}{:08X}{:08X}", n / 4096, n % 4096)
}

/// The pid of the worker that holds `<spool>/fetch/worker.lock`, if one
/// runs now (its command line is checked: a pid left in the file by a
/// worker that exited may belong to another process by now).
fn running_worker(spool: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(spool.join("fetch/worker.lock")).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_worker = String::from_utf8_lossy(&cmdline).contains("--prefetch-worker")
        && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
    is_worker.then_some(pid)
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").args([signal, &pid.to_string()]).status();
}

/// Stops the worker of `spool` if one runs (the tests start it, through
/// archive-fetch, so they stop it), and waits for it to be gone.
fn stop_worker(spool: &Path) {
    if let Some(pid) = running_worker(spool) {
        kill(pid, "-TERM");
        wait_until(Duration::from_secs(30), "the prefetch worker to exit", || running_worker(spool).is_none());
    }
}

/// A copy of the base backup, owned by the PostgreSQL user, started with
/// `restore_command = 'archive-fetch %f %p'` (configuration `wv`) and
/// `signal` (`recovery.signal` or `standby.signal`), without archiving.
fn start_copy(td: &TestDir, wv: &Walvault, backup: &Path, tag: &str, signal: &str) -> PgCluster {
    let dir = td.join(tag);
    let out = Command::new("cp").arg("-a").arg(backup).arg(&dir).status().expect("cp runs");
    assert!(out.success(), "cp -a {} {}", backup.display(), dir.display());
    chown_tree_to_pg_user(&dir);
    let mut pg = PgCluster::existing(td, tag, &dir);
    pg.include_example("restore.conf");
    pg.append_conf("archive_mode = off");
    pg.touch(signal);
    pg.start(&wv.server_env());
    pg
}

#[test]
fn recovery_with_prefetch_matches_recovery_without_and_the_spool_is_never_trusted() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let base = Config::new(&repo, td.join("catalog.db"));
    let config = base.write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let spool = td.mkdir("spool");
    let wv_prefetch = wv.with_config(&prefetch_config(&td, &base, &spool, "prefetch.toml"));

    let mut primary = small_segment_primary(&td, &wv);
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.psql("CREATE TABLE ledger (id serial PRIMARY KEY, v text NOT NULL)");
    let backup = td.join("backup");
    primary.pg_basebackup(&backup, &["-X", "none", "-c", "fast", "--no-sync"]).expect_success("pg_basebackup");
    let first = primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");

    // About 60 segments of WAL after the backup.
    primary.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "1500"]);
    primary.psql("INSERT INTO ledger (v) SELECT md5(g::text) || repeat('x', 200) FROM generate_series(1, 120000) g");
    primary.psql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 3 = 0");
    let expected = state(&primary);
    let last = primary.switch_wal();
    let stats = primary.wait_archived(&last, LONG);
    assert_eq!(stats.failed_count, 0, "archive-push failed: {stats:?}\n{}", primary.log_tail(40));
    let segments = (u64::from_str_radix(&last[16..24], 16).expect("hex")
        - u64::from_str_radix(&first[16..24], 16).expect("hex")) as usize;
    assert!(segments >= 40, "only {segments} segments between {first} and {last}: the test needs more WAL");

    // 1. The spool by hand: a restore of segment K starts the worker, which
    //    brings K+1.. into the spool.
    let manual_spool = td.mkdir("manual-spool");
    let wv_manual = wv.with_config(&prefetch_config(&td, &base, &manual_spool, "manual.toml"));
    let k = next_segment(&first, 2);
    let (k1, k2) = (next_segment(&k, 1), next_segment(&k, 2));
    let out_dir = td.mkdir("out");
    // The reference: what the repository holds, fetched without prefetch.
    for name in [&k1, &k2] {
        wv.fetch(name, out_dir.join(format!("{name}.direct"))).assert_silent_success();
    }
    // The configuration named relative to the caller's directory (as
    // `WALVAULT_CONFIG=manual.toml`): the worker, which runs in `/`, must
    // still find it.
    let wv_relative = wv.with_config(Path::new("manual.toml"));
    wv_relative.fetch_in(td.path(), &k, out_dir.join("K")).assert_silent_success();
    wait_until(LONG, "the worker to prefetch K+1 and K+2", || {
        manual_spool.join("fetch").join(&k1).is_file() && manual_spool.join("fetch").join(&k2).is_file()
    });
    // The worker yields the CPU to replay.
    let pid = running_worker(&manual_spool).expect("a prefetch worker holds the lock");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("the worker's /proc stat");
    // Field 19 is the nice value; the command (field 2) ends at the last ')'.
    let nice = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().nth(16)).and_then(|f| f?.parse().ok());
    assert_eq!(nice, Some(walvault::prefetch::WORKER_NICE), "the worker's nice value: {stat}");
    // K+1 comes from the spool: it arrives while the repository lacks it.
    let object1 = object_path(&repo, "main", &k1);
    let aside = td.join("aside");
    fs::rename(&object1, &aside).expect("move the object aside");
    let served = out_dir.join("K1");
    wv_manual.fetch(&k1, &served).assert_silent_success();
    fs::rename(&aside, &object1).expect("put the object back");
    assert_same_file(&served, &out_dir.join(format!("{k1}.direct")));
    // K+2 is damaged in the spool: it is discarded, and the archived file
    // arrives, byte for byte, from the repository, with a warning.
    let spooled = manual_spool.join("fetch").join(&k2);
    flip_byte(&spooled, read_bytes(&spooled).len() as u64 / 3);
    let fetched = out_dir.join("K2");
    let out = wv_manual.fetch(&k2, &fetched);
    out.assert_code(0);
    assert!(out.stderr.contains("discarded the prefetched copy"), "a warning names the damaged copy\n{out}");
    assert_same_file(&fetched, &out_dir.join(format!("{k2}.direct")));
    assert!(!spooled.exists(), "the damaged copy left the spool");
    stop_worker(&manual_spool);

    // 2. Recovery without prefetch: the reference end state.
    let mut plain = start_copy(&td, &wv, &backup, "plain", "recovery.signal");
    plain.wait_promoted(LONG);
    assert_eq!(state(&plain), expected, "recovery without prefetch");
    plain.stop();

    // 3. Recovery with prefetch, its worker killed with -9 midway: a new
    //    one is started by the next archive-fetch, nothing is lost.
    let mut fast = start_copy(&td, &wv_prefetch, &backup, "prefetch", "recovery.signal");
    let killed_at = Instant::now();
    let mut killed = false;
    while !killed && killed_at.elapsed() < LONG && fast.psql("SELECT pg_is_in_recovery()") == "t" {
        if let Some(pid) = running_worker(&spool) {
            kill(pid, "-KILL");
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fast.wait_promoted(LONG);
    assert!(killed, "no prefetch worker was seen during the recovery of {segments} segments");
    assert_eq!(state(&fast), expected, "recovery with prefetch reaches the same tables");
    // Replay was served from the spool: the worker logged no failure, and
    // the restarted worker found the segments it was asked for.
    let worker_log = fs::read_to_string(spool.join("fetch/worker.log")).unwrap_or_default();
    assert!(!worker_log.contains("unable to"), "the worker failed\n{worker_log}");
    let request = fs::read_to_string(spool.join("fetch/request")).expect("archive-fetch recorded its last segment");
    assert!(request.starts_with("00000001"), "the spool followed the recovery: request {request}");
    assert!(!fast.log().contains("archive-fetch: error"), "no error on the way\n--- log ---\n{}", fast.log_tail(60));
    fast.stop();
    stop_worker(&spool);

    // 4. A standby with prefetch polls for the next segment, which is not
    //    archived yet; it gets it once the primary archives it.
    let standby_spool = td.mkdir("standby-spool");
    let wv_standby = wv.with_config(&prefetch_config(&td, &base, &standby_spool, "standby.toml"));
    let mut standby = start_copy(&td, &wv_standby, &backup, "standby", "standby.signal");
    wait_until(LONG, "the standby to replay the archive", || state(&standby) == expected);
    let next = next_segment(&last, 1);
    let fail_log = standby.log();
    assert!(!fail_log.contains("archive-fetch: error"), "polling is quiet\n{fail_log}");
    primary.psql("INSERT INTO ledger (v) VALUES ('after the standby caught up')");
    let after = state(&primary);
    let archived = primary.switch_wal();
    assert_eq!(archived, next, "the segment the standby polls for");
    primary.wait_archived(&archived, LONG);
    wait_until(LONG, "the standby to replay the newly archived segment", || state(&standby) == after);
    standby.stop();
    stop_worker(&standby_spool);
    primary.stop();
}

#[test]
fn a_restore_across_a_timeline_switch_with_prefetch_reaches_the_same_contents() {
    let td = TestDir::new();
    let base = Config::new(td.join("repo"), td.join("catalog.db"));
    let config = base.write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let spool = td.mkdir("spool");
    let wv_prefetch = wv.with_config(&prefetch_config(&td, &base, &spool, "prefetch.toml"));

    let mut primary = small_segment_primary(&td, &wv);
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    primary.psql("CREATE TABLE ledger (id serial PRIMARY KEY, v text NOT NULL)");
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    primary.pgbench(&["-n", "-c", "2", "-t", "500"]);
    primary.psql("INSERT INTO ledger (v) SELECT 'timeline 1 row ' || g FROM generate_series(1, 20000) g");
    let switch_time = primary.psql("SELECT clock_timestamp()");
    std::thread::sleep(Duration::from_millis(20));
    // Timeline 1 goes on past the switch point: segments the worker may
    // prefetch, which the restore must not use.
    primary.pgbench(&["-n", "-c", "2", "-t", "1500"]);
    primary.psql("INSERT INTO ledger (v) SELECT 'lost on timeline 1 ' || g FROM generate_series(1, 40000) g");
    let last1 = primary.switch_wal();
    primary.wait_archived(&last1, LONG);
    primary.stop();

    // Back to the switch point and promote: timeline 2 starts there, and
    // archives into the same repository.
    let dir = td.join("branch");
    wv.restore(&dir, &["--target-time", &switch_time, "--target-action", "promote"]).expect_success("restore");
    let mut branch = PgCluster::existing(&td, "branch", &dir);
    branch.start(&wv.server_env());
    branch.wait_promoted(LONG);
    assert_eq!(branch.psql("SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    branch.pgbench(&["-n", "-c", "2", "-t", "800"]);
    branch.psql("INSERT INTO ledger (v) SELECT 'timeline 2 row ' || g FROM generate_series(1, 20000) g");
    let at_tl2_end = state(&branch);
    let last2 = branch.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    branch.wait_archived(&last2, LONG);
    branch.stop();

    // From the timeline-1 backup, through the history, to timeline 2's end,
    // with prefetch.
    let (mut pg, _) = restore_and_start(&td, &wv_prefetch, "latest", &["--target-timeline", "latest"], false);
    assert_eq!(state(&pg), at_tl2_end, "the end of timeline 2, restored with prefetch");
    assert_eq!(pg.psql("SELECT count(*) FROM ledger WHERE v LIKE 'lost on timeline 1%'"), "0");
    let request = fs::read_to_string(spool.join("fetch/request")).expect("archive-fetch used the spool");
    assert!(request.starts_with("00000002"), "the spool followed the switch to timeline 2: {request}");
    pg.stop();
    stop_worker(&spool);
}
