//! Backups taken on a standby against a real PostgreSQL: one fed from the
//! archive and one streaming from its primary (with archiving off on the
//! standby). Each restores to exactly what the standby held when it was
//! backed up, and to the primary's latest state at the end of the archive;
//! a streaming standby's backup waits for the primary to complete the
//! segment holding its stop point, and says so when it times out.

use std::thread;
use std::time::Duration;

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, archiving_primary, chown_tree_to_pg_user, restore_and_start, table_checksum,
    wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(120);

fn rows(pg: &PgCluster) -> i64 {
    pg.psql("SELECT count(*) FROM t").parse().expect("a count")
}

/// The one backup in `after` that is not in `before`.
fn new_backup(before: &[String], after: &[String]) -> String {
    let new: Vec<&String> = after.iter().filter(|id| !before.contains(id)).collect();
    assert_eq!(new.len(), 1, "one new backup: {before:?} -> {after:?}");
    new[0].clone()
}

/// Restores backup `id` into `<td>/<tag>`, to its consistency point
/// (`--target immediate`) or to the end of the archive, and returns the
/// checksum of table `t` there.
fn restored_checksum(td: &TestDir, wv: &Walvault, tag: &str, id: &str, immediate: bool) -> String {
    let mut args = vec!["--backup", id, "--target-action", "promote"];
    if immediate {
        args.extend(["--target", "immediate"]);
    }
    let (mut pg, _) = restore_and_start(td, wv, tag, &args, false);
    let sum = table_checksum(&pg, "t", "id");
    pg.stop();
    sum
}

/// A local repository and an archiving primary whose table `t` holds
/// 20,000 rows.
fn setup() -> (TestDir, Walvault, PgCluster) {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let primary = archiving_primary(&td, &wv, "primary");
    primary.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    primary.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    (td, wv, primary)
}

#[test]
fn a_backup_of_an_archive_fed_standby_restores_what_the_standby_held() {
    let (td, wv, mut primary) = setup();
    wv.backup(&primary, &["--fast"]).expect_success("backup of the primary");

    // A standby restored by walvault, replaying the archive.
    let dir = td.join("standby");
    wv.restore(&dir, &["--standby"]).expect_success("restore as a standby");
    let mut standby = PgCluster::existing(&td, "standby", &dir);
    standby.start(&wv.server_env());
    primary.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 30000) g");
    let seg = primary.switch_wal();
    primary.wait_archived(&seg, TIMEOUT);
    wait_until(TIMEOUT, "the standby to replay the archive", || rows(&standby) == 30000);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    let held = table_checksum(&standby, "t", "id");

    let before = wv.backup_ids();
    let out = wv.backup(&standby, &["--fast"]).expect_success("backup of the standby");
    let id = new_backup(&before, &wv.backup_ids());
    assert!(out.stdout.contains(&format!("backup '{id}' complete")), "{out}");

    // The primary goes on.
    primary.psql("UPDATE t SET v = 'after' WHERE id % 7 = 0");
    primary.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(30001, 35000) g");
    let latest = table_checksum(&primary, "t", "id");
    let seg = primary.switch_wal();
    primary.wait_archived(&seg, TIMEOUT);
    standby.stop();

    assert_eq!(restored_checksum(&td, &wv, "at-backup", &id, true), held, "the standby's content at its backup");
    assert_eq!(restored_checksum(&td, &wv, "at-end", &id, false), latest, "the primary's latest content");
    primary.stop();
}

#[test]
fn a_streaming_standby_backup_waits_for_the_primary_to_complete_its_segment() {
    let (td, wv, mut primary) = setup();

    // A streaming standby that does not archive (archive_mode = off).
    let dir = td.join("standby");
    primary.pg_basebackup(&dir, &["-R", "-X", "stream", "-c", "fast"]);
    chown_tree_to_pg_user(&dir);
    let mut standby = PgCluster::existing(&td, "standby", &dir);
    standby.append_conf("archive_mode = off");
    standby.start(&wv.server_env());
    primary.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 25000) g");
    wait_until(TIMEOUT, "the standby to stream the rows", || rows(&standby) == 25000);
    let held = table_checksum(&standby, "t", "id");

    // The primary is idle: the segment with the stop point is not complete,
    // and the standby cannot switch WAL.
    let before = wv.backup_ids();
    let out = wv.backup(&standby, &["--fast", "--archive-timeout", "3"]);
    assert!(!out.success(), "{out}");
    for part in [
        "did not reach repository",
        "the server is a standby, which cannot switch WAL",
        "run SELECT pg_switch_wal() on the primary",
    ] {
        assert!(out.stderr.contains(part), "'{part}' missing: {out}");
    }
    assert_eq!(out.stderr.lines().filter(|l| l.starts_with("walvault: error:")).count(), 1, "{out}");
    assert_eq!(wv.backup_ids(), before, "no backup recorded");

    // With the primary switching while it waits, the backup completes.
    let out = thread::scope(|s| {
        let backup = s.spawn(|| wv.backup(&standby, &["--fast"]));
        wait_until(TIMEOUT, "the backup to wait for WAL", || waits_for_wal(&standby) || backup.is_finished());
        let seg = primary.switch_wal();
        primary.wait_archived(&seg, TIMEOUT);
        backup.join().expect("the backup thread")
    });
    out.expect_success("backup of the standby once the primary switched");
    let id = new_backup(&before, &wv.backup_ids());
    standby.stop();

    assert_eq!(restored_checksum(&td, &wv, "at-backup", &id, true), held, "the standby's content at its backup");
    primary.stop();
}

/// Whether a `walvault backup` waits for WAL on `standby`: its session
/// has stopped the backup and read the stop time (the last statement
/// before the wait) and is idle.
fn waits_for_wal(standby: &PgCluster) -> bool {
    standby.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = 'idle' \
         AND query LIKE '%pg_current_snapshot%'",
    ) == "1"
}
