//! Bad input to `walvault backup` and `walvault restore`: one clear error,
//! and nothing lost — no half backup in `info`, no half-restored directory
//! that could be started by accident, no file of the user's overwritten.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, archiving_primary, flip_byte, largest_file, object_path, table_checksum,
};

const LONG: Duration = Duration::from_secs(300);

fn dir_is_empty_or_absent(dir: &Path) -> bool {
    fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[test]
fn restore_refuses_bad_targets_and_directories_and_stops_on_corruption() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = Config::new(&repo, td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    primary.pgbench(&["-n", "-t", "200"]);
    let mut chain = vec![primary.switch_wal()];
    primary.pgbench(&["-n", "-t", "200"]);
    chain.push(primary.switch_wal());
    primary.wait_archived(&chain[1], LONG);
    let target = td.join("target");

    let refused = |args: &[&str], expect: &str| {
        let out = wv.restore(&target, args);
        out.assert_code(1);
        let err = out.stderr_lines().join("\n");
        assert!(err.contains(expect), "restore {args:?}: expected {expect:?} in:\n{out}");
        assert!(dir_is_empty_or_absent(&target), "restore {args:?} wrote into the target");
    };
    refused(&["--target-time", "2026-11-21 14:30:00"], "zone");
    refused(&["--target-time", "2000-01-01 00:00:00+00"], "before");
    refused(&["--target-time", "2999-01-01 00:00:00+00"], "after");
    refused(&["--target-lsn", "FFFF/0"], "after");
    refused(&["--target-lsn", "not-an-lsn"], "LSN");
    refused(&["--backup", "19990101T000000Z"], "19990101T000000Z");

    // The running primary's own directory.
    let out = wv.restore(primary.datadir(), &[]);
    out.assert_code(1);
    assert!(out.stderr.contains("running"), "{out}");
    assert_eq!(primary.psql("SELECT 1"), "1", "the primary is untouched");

    // A directory holding something of the user's.
    fs::create_dir_all(&target).expect("mkdir");
    fs::write(target.join("precious.txt"), b"mine").expect("write");
    let out = wv.restore(&target, &[]);
    out.assert_code(1);
    assert!(out.stderr.contains("not empty") && out.stderr.contains("--delta"), "{out}");
    assert_eq!(fs::read(target.join("precious.txt")).expect("still there"), b"mine");
    fs::remove_dir_all(&target).expect("cleanup");

    // A segment missing inside the chain (a hole in archiving, as the
    // catalog sees it after a rebuild): refused, naming the file.
    let hole = object_path(&repo, "main", &chain[0]);
    let aside = td.join("hole");
    fs::rename(&hole, &aside).expect("make a hole");
    wv.walvault(&["catalog", "rebuild"]).expect_success("catalog rebuild");
    refused(&[], &chain[0]);
    // --force restores anyway, and warns.
    let out = wv.restore(&target, &["--force"]).expect_success("restore --force");
    assert!(out.stderr.contains(&chain[0]), "the warning names the missing file: {out}");
    fs::remove_dir_all(&target).expect("cleanup");
    fs::rename(&aside, &hole).expect("fill the hole");
    wv.walvault(&["catalog", "rebuild"]).expect_success("catalog rebuild");

    // A corrupt chunk: restore stops and names the file it was restoring,
    // and leaves no recovery.signal behind.
    let object = largest_file(&repo.join("main").join("data"));
    let len = fs::metadata(&object).expect("stat").len();
    flip_byte(&object, len / 2);
    let out = wv.restore(&target, &[]);
    out.assert_code(1);
    // It names the data-directory file it was restoring and the object.
    assert!(out.stderr.contains("unable to restore '") && out.stderr.contains("is corrupt"), "{out}");
    assert!(out.stderr.contains(object.file_name().and_then(|n| n.to_str()).unwrap_or("?")), "{out}");
    assert!(!target.join("recovery.signal").exists() && !target.join("backup_label").exists());
    // Repaired, a --delta restore into the same directory completes.
    flip_byte(&object, len / 2);
    wv.restore(&target, &["--delta"]).expect_success("restore --delta after the repair");
    assert!(target.join("recovery.signal").exists());
    let expected = table_checksum(&primary, "pgbench_accounts", "aid");
    let mut restored = PgCluster::existing(&td, "restored", &target);
    restored.append_conf("archive_mode = off");
    restored.start(&wv.server_env());
    restored.wait_promoted(LONG);
    assert_eq!(table_checksum(&restored, "pgbench_accounts", "aid"), expected);
    restored.stop();
    primary.stop();
}

#[test]
fn a_failed_backup_leaves_nothing_behind_and_the_next_one_works() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "3", "-q"]);

    // 1. The connection dies half-way (a DBA's pg_terminate_backend, a
    //    restarted server): no backup appears, and the next one works.
    std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let killed = primary.psql(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'walvault'",
                );
                if killed != "0" || Instant::now() > deadline {
                    return killed;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        // ~45 MB at 4 MB/s: long enough for the killer to find it.
        let out = wv.backup(&primary, &["--fast", "--max-rate", "4M"]);
        let killed = killer.join().expect("killer thread");
        assert_eq!(killed, "1", "the backup's connection was found and terminated");
        out.assert_code(1);
        assert!(out.stderr.contains("connection"), "{out}");
    });
    assert!(wv.backup_ids().is_empty(), "no half backup in info");
    wv.backup(&primary, &["--fast"]).expect_success("the next backup");
    assert_eq!(wv.backup_ids().len(), 1);

    // 2. Archiving is broken: pg_backup_stop's WAL never reaches the
    //    repository; the backup gives up after its timeout, saying why.
    primary.psql("ALTER SYSTEM SET archive_command = 'false'");
    primary.psql("SELECT pg_reload_conf()");
    let started = Instant::now();
    let out = wv.backup(&primary, &["--fast", "--archive-timeout", "5"]);
    out.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(120), "the timeout is honoured");
    assert!(out.stderr.contains("did not reach repository") && out.stderr.contains("archive_command"), "{out}");
    assert_eq!(wv.backup_ids().len(), 1, "the failed backup is not listed");
    primary.psql("ALTER SYSTEM RESET archive_command");
    primary.psql("SELECT pg_reload_conf()");
    wv.backup(&primary, &["--fast"]).expect_success("a backup once archiving works again");
    assert_eq!(wv.backup_ids().len(), 2);

    // 3. A server that is not the repository's cluster.
    let other_td = TestDir::new();
    let mut other = PgCluster::initdb(&other_td, "other", &[]);
    other.start(&wv.server_env());
    let out = wv.backup(&other, &["--fast"]);
    out.assert_code(1);
    assert!(out.stderr.contains("system identifier"), "{out}");
    other.stop();
    primary.stop();
}
