//! Asynchronous archive-push (`async = true`) and `queue-max` against a
//! real PostgreSQL: a pgbench load archived while the background worker is
//! killed with kill -9 again and again loses nothing and acknowledges
//! nothing early; with the repository unreachable, `queue-max` keeps
//! pg_wal small, records the dropped WAL, and info, check and backup say
//! so; archiving resumes when the repository returns.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use walvault_integration::s3::MotoServer;
use walvault_integration::{
    Cmd, Config, PgCluster, TestDir, Walvault, as_pg_user, assert_same_file, json_text, object_path, run_with_timeout,
    superuser, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(300);

/// A configuration with `async = true` and `extra` lines.
fn async_config(td: &TestDir, extra: &str) -> PathBuf {
    let base = Config::new(td.join("repo"), td.join("catalog.db")).to_toml();
    td.write("walvault.toml", format!("{base}async = true\njobs = 2\n{extra}"))
}

/// The async push worker's lock file (the default spool is beside the
/// catalog).
fn lock_file(td: &TestDir) -> PathBuf {
    td.join("spool").join("push").join("worker.lock")
}

/// The pid of the running worker, if its lock file names a live
/// `archive-push --worker` process.
fn worker_pid(td: &TestDir) -> Option<u32> {
    let pid: u32 = fs::read_to_string(lock_file(td)).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&cmdline);
    (text.contains("archive-push") && text.contains("--worker")).then_some(pid)
}

fn kill_9(pid: u32) -> bool {
    Command::new("kill").args(["-9", &pid.to_string()]).status().is_ok_and(|s| s.success())
}

/// Kills the worker (end of a test: it would exit when idle anyway).
fn stop_worker(td: &TestDir) {
    if let Some(pid) = worker_pid(td) {
        kill_9(pid);
    }
}

fn with_server(wv: &Walvault, pg: &PgCluster, args: &[&str]) -> Cmd {
    let mut cmd = wv.command("walvault");
    cmd.env("PGHOST", pg.sockdir())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", superuser())
        .env("PGDATABASE", "postgres")
        .args(args);
    as_pg_user(&mut cmd);
    run_with_timeout(cmd, TIMEOUT)
}

/// Replaces the repository's WAL directory by a file: every push fails,
/// as with an unreachable repository. Returns the repair.
fn break_wal_dir(repo: &Path) -> impl FnOnce() {
    let wal = repo.join("main").join("wal");
    let aside = repo.join("main").join("wal.aside");
    fs::rename(&wal, &aside).expect("move the wal directory aside");
    fs::write(&wal, b"not a directory").expect("a file in its place");
    move || {
        fs::remove_file(&wal).expect("remove the file");
        fs::rename(&aside, &wal).expect("put the wal directory back");
    }
}

fn ready_count(pg: &PgCluster) -> usize {
    fs::read_dir(pg.datadir().join("pg_wal/archive_status"))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".ready")).count())
        .unwrap_or(0)
}

/// WAL segment files in pg_wal (24 hex digits).
fn segment_files(pg: &PgCluster) -> usize {
    fs::read_dir(pg.datadir().join("pg_wal"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())
                })
                .count()
        })
        .unwrap_or(0)
}

/// Writes about one segment of WAL and switches; returns the completed
/// segment.
fn one_segment(pg: &PgCluster) -> String {
    pg.psql("INSERT INTO filler SELECT g, repeat('x', 900) FROM generate_series(1, 15000) g");
    pg.switch_wal()
}

#[test]
fn async_push_under_pgbench_with_the_worker_killed_loses_nothing() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = async_config(&td, "");
    let wv = Walvault::new(&td, &config);
    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf(
        "# keep every segment in pg_wal to compare the archive with it\n\
         wal_keep_size = '2GB'\nmax_wal_size = '1GB'\ncheckpoint_timeout = '30min'\narchive_timeout = 0",
    );
    wv.init(pg.datadir()).expect_success("walvault init (server stopped)");
    pg.start(&wv.server_env());

    // kill -9 the worker every 1.5 s for the whole load.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let killer = {
        let (stop, kills, td_lock) = (stop.clone(), kills.clone(), lock_file(&td));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(1500));
                let pid = fs::read_to_string(&td_lock).ok().and_then(|t| t.trim().parse::<u32>().ok());
                if let Some(pid) = pid
                    && fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--worker"))
                    && kill_9(pid)
                {
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // At least 25 s of load, in 5 s rounds each ending with a segment
    // switch, and more rounds until the worker has been killed six times:
    // a worker runs only while there is WAL to archive, and a slow disk
    // completes few segments (CI once saw four kills in 25 s).
    let load = Instant::now();
    pg.pgbench(&["-i", "-s", "5", "-q"]);
    while load.elapsed() < Duration::from_secs(25)
        || (kills.load(Ordering::Relaxed) < 6 && load.elapsed() < Duration::from_secs(150))
    {
        pg.pgbench(&["-c", "2", "-j", "2", "-T", "5", "-n"]);
        pg.switch_wal();
    }
    stop.store(true, Ordering::Relaxed);
    killer.join().expect("the killer thread");
    let last = pg.switch_wal();
    let stats = pg.wait_archived(&last, TIMEOUT);
    let kills = kills.load(Ordering::Relaxed);
    assert!(kills >= 6, "the worker should have been killed repeatedly, killed {kills} times in {:?}", load.elapsed());
    assert_eq!(
        stats.failed_count,
        0,
        "a killed worker must cost a restart, not a failed archive_command: {stats:?}\n{}",
        pg.log_tail(40)
    );

    // Everything PostgreSQL considers archived is in the repository and
    // byte-identical to pg_wal.
    let done = pg.archived_done();
    assert!(done.len() >= 5, "pgbench should fill several segments: {done:?}");
    assert_eq!(done.last(), Some(&last));
    let fetched = td.mkdir("fetched");
    for name in &done {
        assert!(object_path(&repo, "main", name).is_file(), "{name} is .done but not in the repository");
        let dest = fetched.join("RECOVERYXLOG");
        wv.fetch(name, &dest).assert_silent_success();
        assert_same_file(&pg.datadir().join("pg_wal").join(name), &dest);
        fs::remove_file(&dest).expect("remove the fetched copy");
    }
    eprintln!("{} segments archived asynchronously, worker killed {kills} times", done.len());

    // With the repository unreachable, no acknowledgement: PostgreSQL
    // retries and the segment is not archived.
    let repair = break_wal_dir(&repo);
    pg.psql("CREATE TABLE after_break AS SELECT g FROM generate_series(1, 1000) g");
    let stuck = pg.switch_wal();
    wait_until(TIMEOUT, "a failed archive attempt", || pg.archiver_stats().failed_count > 0);
    thread::sleep(Duration::from_secs(2));
    let stats = pg.archiver_stats();
    assert!(stats.last_archived_wal < stuck, "{stuck} acknowledged while unreachable: {stats:?}");
    assert!(!pg.archived_done().contains(&stuck));
    let log = pg.log();
    assert!(log.contains("archive-push: error:") && log.contains(&stuck), "{}", pg.log_tail(20));
    repair();
    // A new segment wakes the archiver, which otherwise retries in a minute.
    pg.psql("CREATE TABLE wake AS SELECT 1 AS one");
    pg.switch_wal();
    pg.wait_archived(&stuck, TIMEOUT);
    let dest = fetched.join("RECOVERYXLOG");
    wv.fetch(&stuck, &dest).assert_silent_success();
    assert_same_file(&pg.datadir().join("pg_wal").join(&stuck), &dest);

    pg.stop();
    stop_worker(&td);
}

#[test]
fn queue_max_drops_wal_with_an_audit_trail_and_archiving_resumes() {
    const SEGMENT: u64 = 16 << 20;
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = async_config(&td, "queue-max = \"64MiB\"\n");
    let wv = Walvault::new(&td, &config);
    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf("min_wal_size = '32MB'\nmax_wal_size = '128MB'\ncheckpoint_timeout = '30min'\narchive_timeout = 0");
    wv.init(pg.datadir()).expect_success("walvault init");
    pg.start(&wv.server_env());
    pg.psql("CREATE TABLE filler (id int, pad text)");
    let before = one_segment(&pg);
    pg.wait_archived(&before, TIMEOUT);

    let repair = break_wal_dir(&repo);
    let mut produced = Vec::new();
    let mut max_ready = 0;
    for _ in 0..16 {
        produced.push(one_segment(&pg));
        max_ready = max_ready.max(ready_count(&pg));
        thread::sleep(Duration::from_millis(300));
    }
    assert!(pg.server_alive(), "PostgreSQL keeps running");
    // The backlog is held near queue-max (4 segments) instead of growing
    // to 16 segments.
    wait_until(TIMEOUT, "the backlog to come down to queue-max", || ready_count(&pg) <= 5);
    pg.psql("CHECKPOINT");
    let on_disk = segment_files(&pg);
    eprintln!("max .ready {max_ready}, segments in pg_wal after a checkpoint {on_disk}, produced {}", produced.len());
    assert!(max_ready <= 4 + 4, "pg_wal backlog {max_ready} segments, queue-max is 4");
    assert!((on_disk as u64) * SEGMENT <= 64 * (1 << 20) + 8 * SEGMENT, "{on_disk} segments kept in pg_wal");
    let log = pg.log();
    assert!(log.contains("archive-push: warning:") && log.contains("DROPPED"), "{}", pg.log_tail(30));

    // The gap is recorded: info --json lists the dropped files, none of
    // which is in the repository.
    let info = wv.info_json();
    let dropped: Vec<String> = info["dropped_wal"]
        .as_array()
        .unwrap_or_else(|| panic!("info --json has dropped_wal: {info}"))
        .iter()
        .map(|d| json_text(&d["name"]))
        .collect();
    assert!(dropped.len() >= 8, "16 segments with room for 4: most are dropped: {dropped:?}");
    for name in &dropped {
        assert!(produced.contains(name), "{name} was not produced while unreachable");
        let aside = repo.join("main/wal.aside").join(&name[..16]).join(name);
        assert!(!aside.exists(), "{name} was dropped yet is in the repository");
        assert!(log.contains(name), "the log names {name}");
    }
    assert!(info["dropped_wal"][0]["intact_from_backup"].is_null(), "{info}");
    let text = wv.walvault(&["info"]).expect_success("walvault info");
    assert!(text.stdout.contains("DROPPED WAL") && text.stdout.contains("PITR across them is impossible"), "{text}");

    // Archiving resumes when the repository returns.
    repair();
    let resumed = one_segment(&pg);
    pg.wait_archived(&resumed, TIMEOUT);
    assert!(object_path(&repo, "main", &resumed).is_file());

    // check fails, naming the gap.
    let out = with_server(&wv, &pg, &["check"]);
    assert_ne!(out.code(), 0, "check must fail with dropped WAL\n{out}");
    let line = out.stdout.lines().find(|l| l.starts_with("failed: dropped WAL")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&dropped[0]), "{line}");

    // The next backup says a new full backup is needed, and is one.
    let out = wv.backup(&pg, &["--fast"]).expect_success("walvault backup");
    assert!(
        out.stderr.contains("new full backup is needed") && out.stderr.contains(&dropped[0]),
        "backup must warn about the gap\n{out}"
    );
    let id = wv.backup_ids().pop().expect("a backup");
    let info = wv.info_json();
    assert_eq!(json_text(&info["dropped_wal"][0]["intact_from_backup"]), id, "{info}");
    let text = wv.walvault(&["info"]).expect_success("walvault info");
    assert!(text.stdout.contains(&format!("PITR from backup {id} on is intact")), "{text}");
    let out = with_server(&wv, &pg, &["check"]);
    assert!(out.stdout.contains("note: dropped WAL"), "{out}");
    assert_eq!(out.code(), 0, "after a new backup, check passes (the gap stays a note)\n{out}");

    pg.stop();
    stop_worker(&td);
}

#[test]
fn async_push_into_an_s3_repository() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("wal");
    let creds = moto.write_credentials(td.path());
    let mut text = Config::new("s3://wal/async", td.join("catalog.db")).to_toml();
    text.push_str("async = true\njobs = 3\n");
    text.push_str(&moto.config_table(&creds));
    let config = td.write("walvault.toml", text);
    let wv = Walvault::new(&td, &config);
    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf("wal_keep_size = '1GB'\nmax_wal_size = '1GB'\ncheckpoint_timeout = '30min'\narchive_timeout = 0");
    wv.init(pg.datadir()).expect_success("walvault init");
    pg.start(&wv.server_env());
    pg.psql("CREATE TABLE filler (id int, pad text)");
    let mut last = String::new();
    for _ in 0..4 {
        last = one_segment(&pg);
    }
    let stats = pg.wait_archived(&last, TIMEOUT);
    assert_eq!(stats.failed_count, 0, "{stats:?}\n{}", pg.log_tail(30));
    assert!(worker_pid(&td).is_some() || lock_file(&td).is_file(), "the async worker ran");
    let fetched = td.mkdir("fetched");
    for name in pg.archived_done() {
        let dest = fetched.join("RECOVERYXLOG");
        wv.fetch(&name, &dest).assert_silent_success();
        assert_same_file(&pg.datadir().join("pg_wal").join(&name), &dest);
        fs::remove_file(&dest).expect("remove the fetched copy");
    }
    pg.stop();
    stop_worker(&td);
}
