//! Everything that works on a local repository works on S3 (moto on
//! 127.0.0.1): expire (with the object lock that keeps it apart from
//! backups), verify, drill and check; and the end-to-end archive and PITR
//! checks of the local tests, with the repository in a bucket.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use walvault::config::S3Settings;
use walvault::lock::{Holder, Lease, LockMode, RepoLock};
use walvault::repo::Repository;
use walvault::storage::Storage;
use walvault::storage::s3::S3Storage;
use walvault_integration::s3::MotoServer;
use walvault_integration::{
    Cmd, Config, PgCluster, TestDir, Walvault, archiving_primary, as_pg_user, assert_same_file, restore_and_start,
    run_with_timeout, superuser, table_checksum,
};

const LONG: Duration = Duration::from_secs(300);

/// A configuration for repository `url` on `moto`, and the storage the
/// test inspects the bucket through.
fn s3_setup(td: &TestDir, moto: &MotoServer, bucket: &str, url: &str) -> (PathBuf, S3Storage, S3Settings) {
    moto.create_bucket(bucket);
    let creds = moto.write_credentials(td.path());
    let mut text = Config::new(url, td.join("catalog.db")).to_toml();
    text.push_str(&moto.config_table(&creds));
    let config = td.write("walvault.toml", text);
    let settings = S3Settings {
        endpoint: Some(moto.endpoint()),
        path_style: true,
        allow_http: true,
        credentials_file: Some(creds),
        request_timeout_secs: 10,
        retry_budget_secs: 20,
        ..S3Settings::default()
    };
    let storage = S3Storage::open(url, &settings).unwrap();
    (config, storage, settings)
}

fn keys(s: &S3Storage, prefix: &str) -> Vec<String> {
    let mut k: Vec<String> = s.list(prefix).unwrap().into_iter().map(|m| m.key).collect();
    k.sort();
    k
}

/// `walvault ARGS…` with the libpq environment of `pg`.
fn with_server(wv: &Walvault, pg: &PgCluster, args: &[&str]) -> Cmd {
    let mut cmd = wv.command("walvault");
    cmd.env("PGHOST", pg.sockdir())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", superuser())
        .env("PGDATABASE", "postgres")
        .args(args);
    as_pg_user(&mut cmd);
    run_with_timeout(cmd, LONG)
}

fn problems(out: &Cmd) -> Vec<String> {
    out.stdout.lines().filter(|l| l.starts_with("problem:")).map(str::to_string).collect()
}

#[test]
fn expire_verify_drill_and_check_work_on_s3() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    let (config, s3, _) = s3_setup(&td, &moto, "cmds", "s3://cmds/db");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    wv.backup(&primary, &["--fast"]).expect_success("first backup");
    primary.pgbench(&["-n", "-t", "300"]);
    primary.switch_wal();
    wv.backup(&primary, &["--fast", "--jobs", "2"]).expect_success("second backup");
    primary.pgbench(&["-n", "-t", "300"]);
    let expected = table_checksum(&primary, "pgbench_accounts", "aid");
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);
    let ids = wv.backup_ids();
    assert_eq!(ids.len(), 2, "{ids:?}");

    // check: this server archives into this bucket.
    let out = with_server(&wv, &primary, &["check"]).expect_success("walvault check on s3");
    assert!(out.stdout.contains("check passed"), "{out}");

    // expire --dry-run says what it would do and deletes nothing.
    let wal_before = keys(&s3, "main/wal/");
    let data_before = keys(&s3, "main/data/");
    let out = wv.walvault(&["expire", "--dry-run", "--keep-last", "1"]).expect_success("expire --dry-run on s3");
    assert!(out.stdout.contains(&format!("would delete backup '{}'", ids[0])), "{out}");
    assert_eq!((keys(&s3, "main/wal/"), keys(&s3, "main/data/")), (wal_before.clone(), data_before.clone()));
    assert_eq!(wv.backup_ids(), ids);

    // expire deletes the old backup and the WAL only it needed; no lock
    // object is left behind.
    let out = wv.walvault(&["expire", "--keep-last", "1", "--grace", "0"]).expect_success("expire on s3");
    assert!(out.stdout.contains(&format!("delete backup '{}'", ids[0])), "{out}");
    assert_eq!(wv.backup_ids(), [ids[1].clone()]);
    assert!(keys(&s3, &format!("main/backups/{}/", ids[0])).is_empty());
    let wal_after = keys(&s3, "main/wal/");
    assert!(wal_after.len() < wal_before.len(), "WAL before the kept backup is gone: {wal_after:?}");
    let data_after = keys(&s3, "main/data/");
    assert!(data_after.len() < data_before.len(), "objects only the old backup used are gone");
    assert!(keys(&s3, "main/locks/").is_empty(), "lock objects left: {:?}", keys(&s3, "main/locks/"));

    // The kept backup restores to the same contents.
    let (mut pg, out) = restore_and_start(&td, &wv, "restored", &[], false);
    assert!(out.contains(&ids[1]), "{out}");
    assert_eq!(table_checksum(&pg, "pgbench_accounts", "aid"), expected);
    pg.stop();

    // verify reads everything and passes; then a damaged object is named,
    // alone, with exit code 1.
    let out = wv.walvault(&["verify"]).expect_success("verify on s3");
    assert!(problems(&out).is_empty(), "{out}");
    let victim = data_after.iter().max_by_key(|k| s3.head(k).unwrap().unwrap().size).unwrap().clone();
    let good = s3.get(&victim).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    s3.put_replace(&victim, &bad).unwrap();
    let out = wv.walvault(&["verify"]);
    out.assert_code(1);
    let found = problems(&out);
    let hash = victim.rsplit('/').next().unwrap();
    assert_eq!(found.len(), 1, "{out}");
    assert!(found[0].contains(hash), "names {hash}: {out}");
    s3.put_replace(&victim, &good).unwrap();
    wv.walvault(&["verify"]).expect_success("verify after the repair");

    // drill restores into a throwaway server and records it.
    let drills = td.mkdir("drills");
    let out = wv.walvault(&["drill", "--dir", &drills.display().to_string()]).expect_success("drill on s3");
    let info = wv.info_json();
    assert_eq!(info["last_drill"]["ok"], true, "{out}\n{info:#}");
    assert!(!keys(&s3, "main/drills/").is_empty(), "the drill record is in the bucket");

    // check fails, naming the other repository, when archive_command
    // stores elsewhere.
    let other = td
        .write("other.toml", std::fs::read_to_string(&config).unwrap().replace("s3://cmds/db", "s3://cmds/elsewhere"));
    primary.psql(&format!("ALTER SYSTEM SET archive_command = 'archive-push --config {} %p'", other.display()));
    primary.psql("SELECT pg_reload_conf()");
    let out = with_server(&wv, &primary, &["check"]);
    out.assert_code(1);
    assert!(out.stdout.contains("s3://cmds/elsewhere"), "names the other repository: {out}");
    primary.psql("ALTER SYSTEM RESET archive_command");
    primary.psql("SELECT pg_reload_conf()");
    primary.stop();
}

#[test]
fn the_object_lock_keeps_expire_and_backups_apart_on_s3() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    let (config, s3, settings) = s3_setup(&td, &moto, "locks", "s3://locks/db");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10000) g");
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    let repo = || Arc::new(Repository::open_with("s3://locks/db", "main", &settings).unwrap());
    let me = format!("(pid {} on host {}", std::process::id(), walvault::lock::host_name());

    // A backup holds the lock shared: expire refuses, naming it...
    let shared = RepoLock::acquire_objects(repo(), LockMode::Shared, "backup", Duration::ZERO, Lease::DEFAULT).unwrap();
    let out = wv.walvault(&["expire", "--keep-last", "1"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains(&format!("is locked by backup {me}")), "{out}");
    // ... or waits for it with --wait.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        drop(shared);
    });
    let started = Instant::now();
    wv.walvault(&["expire", "--keep-last", "1", "--wait", "60"]).expect_success("expire --wait");
    assert!(started.elapsed() >= Duration::from_millis(2500), "expire did not wait: {:?}", started.elapsed());
    releaser.join().unwrap();
    assert!(keys(&s3, "main/locks/").is_empty());

    // An expire holds it: a backup waits for it, then runs.
    let exclusive =
        RepoLock::acquire_objects(repo(), LockMode::Exclusive, "expire", Duration::ZERO, Lease::DEFAULT).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        drop(exclusive);
    });
    let started = Instant::now();
    wv.backup(&primary, &["--fast"]).expect_success("backup waiting for expire");
    assert!(started.elapsed() >= Duration::from_millis(3500), "backup did not wait: {:?}", started.elapsed());
    releaser.join().unwrap();
    assert_eq!(wv.backup_ids().len(), 2);

    // A lock object its holder stopped refreshing long ago is stale: the
    // next command says so and removes it.
    let old = walvault::repo::now_ms() - 2 * 3600 * 1000;
    let ghost = Holder {
        command: "expire".into(),
        exclusive: true,
        pid: 4242,
        host: "gone-host".into(),
        since_ms: old,
        refreshed_ms: old,
        token: "ghost".into(),
    };
    s3.put_new("main/locks/exclusive-gone-host-4242-ghost", &serde_json::to_vec(&ghost).unwrap()).unwrap();
    let out = wv.walvault(&["expire", "--keep-last", "1"]).expect_success("expire past a stale lock");
    assert!(
        out.stdout.contains(
            "removed stale lock object 'main/locks/exclusive-gone-host-4242-ghost' of expire (pid 4242 on host \
             gone-host"
        ),
        "{out}"
    );
    assert!(out.stdout.contains("not refreshed for 120 min (stale after 30 min)"), "{out}");
    assert_eq!(wv.backup_ids().len(), 1);
    assert!(keys(&s3, "main/locks/").is_empty());
    // A live one elsewhere is not: expire refuses, naming it.
    let fresh = Holder { since_ms: walvault::repo::now_ms(), refreshed_ms: walvault::repo::now_ms(), ..ghost };
    s3.put_new("main/locks/shared-gone-host-4242-x", &serde_json::to_vec(&fresh).unwrap()).unwrap();
    let out = wv.walvault(&["expire", "--keep-last", "1"]);
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("is locked by expire (pid 4242 on host gone-host"), "{out}");
    assert!(out.stderr.contains("goes stale 30 min after its last refresh"), "{out}");
    // verify does not take lock objects for strays.
    wv.walvault(&["verify"]).expect_success("verify beside a lock object");
    primary.stop();
}

/// A moment in the primary's history: its time, LSN and table contents.
struct Checkpoint {
    time: String,
    lsn: String,
    state: Vec<String>,
}

fn state(pg: &PgCluster) -> Vec<String> {
    [("pgbench_accounts", "aid"), ("pgbench_history", "tid, bid, aid, delta, mtime"), ("ledger", "id")]
        .iter()
        .map(|(t, o)| {
            let exists = pg.psql(&format!("SELECT to_regclass('{t}') IS NOT NULL"));
            if exists == "t" { table_checksum(pg, t, o) } else { "absent".to_string() }
        })
        .collect()
}

fn checkpoint(pg: &PgCluster, n: u32) -> Checkpoint {
    pg.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"]);
    pg.psql(&format!("INSERT INTO ledger (v) SELECT 'round {n} row ' || g FROM generate_series(1, 500) g"));
    let lsn = pg.psql("SELECT pg_current_wal_lsn()");
    let time = pg.psql("SELECT clock_timestamp()");
    let state = state(pg);
    std::thread::sleep(Duration::from_millis(20));
    Checkpoint { time, lsn, state }
}

#[test]
fn pgbench_wal_archives_to_s3_byte_identical_and_pitr_is_exact() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    let (config, s3, _) = s3_setup(&td, &moto, "pitr", "s3://pitr/prod");
    let wv = Walvault::new(&td, &config);
    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf("wal_keep_size = '2GB'\nmax_wal_size = '1GB'\ncheckpoint_timeout = '30min'\narchive_timeout = 0");
    // Bound before the server starts: not one archive_command call fails.
    wv.init(pg.datadir()).expect_success("walvault init");
    pg.start(&wv.server_env());
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.psql("CREATE TABLE ledger (id serial PRIMARY KEY, v text NOT NULL)");
    wv.backup(&pg, &["--fast", "--jobs", "2"]).expect_success("backup to s3");
    let cp1 = checkpoint(&pg, 1);
    let cp2 = checkpoint(&pg, 2);
    pg.psql("DROP TABLE ledger");
    pg.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"]);
    let last = pg.switch_wal();
    let stats = pg.wait_archived(&last, LONG);
    assert_eq!(stats.failed_count, 0, "archive-push failed; server log:\n{}", pg.log_tail(40));
    assert_eq!(stats.last_archived_wal, last);

    // Every archived segment is in the bucket and comes back byte-identical.
    let done = pg.archived_done();
    assert!(done.len() >= 3, "{done:?}");
    let in_bucket = keys(&s3, "main/wal/");
    let fetched = td.mkdir("fetched");
    for name in &done {
        assert!(in_bucket.iter().any(|k| k.ends_with(&format!("/{name}"))), "no object for {name}");
        let dest = fetched.join("RECOVERYXLOG");
        wv.fetch(name, &dest).assert_silent_success();
        assert_same_file(&pg.datadir().join("pg_wal").join(name), &dest);
        std::fs::remove_file(&dest).unwrap();
    }

    // PITR from the bucket: a time target and an LSN target give exactly
    // the contents recorded there.
    for (tag, args, cp) in
        [("time", ["--target-time", cp1.time.as_str()], &cp1), ("lsn", ["--target-lsn", cp2.lsn.as_str()], &cp2)]
    {
        let mut all = args.to_vec();
        all.extend(["--target-action", "pause"]);
        let (mut restored, _) = restore_and_start(&td, &wv, tag, &all, true);
        assert_eq!(state(&restored), cp.state, "{tag}: contents at the target");
        restored.stop();
    }
    assert_ne!(cp1.state, cp2.state, "the two targets differ");
    pg.stop();
}
