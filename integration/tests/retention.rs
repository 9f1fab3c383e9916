//! `walvault expire` deletes what the policy no longer keeps and nothing a
//! kept backup or a restore needs: a week of (backdated) backups under a
//! calendar policy, expire racing archive-push, and expire killed half-way.

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use walvault_integration::{
    Config, TestDir, Walvault, archiving_primary, as_pg_user, backdate_backup, json_text, object_path,
    restore_and_start, segment_of_lsn, table_checksum,
};

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn json(wv: &Walvault, args: &[&str]) -> serde_json::Value {
    let out = wv.walvault(args).expect_success(&format!("walvault {args:?}"));
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{args:?} printed invalid JSON: {e}\n{out}"))
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array().map(|a| a.iter().map(|d| json_text(&d["name"])).collect()).unwrap_or_default()
}

#[test]
fn a_week_of_backups_under_a_calendar_policy() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = Config::new(&repo, td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    let mut lsn_after_6th = String::new();
    let mut state_after_6th = String::new();
    for k in 0..8 {
        primary.pgbench(&["-n", "-t", "100"]);
        wv.backup(&primary, &["--fast"]).expect_success(&format!("backup {k}"));
        if k == 5 {
            primary.pgbench(&["-n", "-t", "100"]);
            lsn_after_6th = primary.psql("SELECT pg_current_wal_lsn()");
            state_after_6th = table_checksum(&primary, "pgbench_accounts", "aid");
        }
        primary.switch_wal();
    }
    let last = primary.switch_wal();
    primary.wait_archived(&last, Duration::from_secs(120));
    let ids = wv.backup_ids();
    assert_eq!(ids.len(), 8);
    let info = wv.info_json();
    let start_wal: Vec<String> = info["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| segment_of_lsn(1, b["start_lsn"].as_str().expect("start_lsn")))
        .collect();

    // Six days at noon, then two backups today.
    let now = now_ms();
    let today = now - now.rem_euclid(DAY_MS);
    let mut when: Vec<i64> = (0..6).map(|k| today - (7 - k) * DAY_MS + DAY_MS / 2).collect();
    when.push(today + (now - today) / 3);
    when.push(today + 2 * (now - today) / 3);
    for (id, at) in ids.iter().zip(&when) {
        backdate_backup(&repo, "main", id, *at);
    }
    // No catalog at all: expire rebuilds it from the repository first.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(td.join(format!("catalog.db{suffix}")));
    }

    // keep-within longer than the archive: everything is kept, and said so.
    let long = json(&wv, &["expire", "--dry-run", "--json", "--keep-within", "30d"]);
    assert!(names(&long["deleted_backups"]).is_empty() && long["wal_files_deleted"] == 0, "{long:#}");
    assert!(!long["notes"].as_array().is_some_and(|n| n.is_empty()), "a note explains it: {long:#}");

    // keep-daily 3: the newest of today (the 8th), of two days ago (6th) and
    // of three days ago (5th).
    let expected_kept = vec![ids[4].clone(), ids[5].clone(), ids[7].clone()];
    let dry = json(&wv, &["expire", "--dry-run", "--json", "--keep-daily", "3", "--grace", "0"]);
    assert_eq!(names(&dry["deleted_backups"]), [ids[0].as_str(), &ids[1], &ids[2], &ids[3], &ids[6]], "{dry:#}");
    assert_eq!(wv.backup_ids().len(), 8, "a dry run deletes nothing");

    let done = json(&wv, &["expire", "--json", "--keep-daily", "3", "--grace", "0"]);
    assert!(done["wal_files_deleted"].as_u64().is_some_and(|n| n > 0), "{done:#}");
    assert!(done["data_objects_deleted"].as_u64().is_some_and(|n| n > 0), "{done:#}");
    assert_eq!(wv.backup_ids(), expected_kept);
    assert!(!object_path(&repo, "main", &start_wal[0]).exists(), "WAL older than every kept backup is gone");
    assert!(object_path(&repo, "main", &start_wal[4]).exists(), "the oldest kept backup's WAL stays");
    wv.walvault(&["verify"]).expect_success("verify after expire");

    // Idempotent: nothing more to delete.
    let again = json(&wv, &["expire", "--json", "--keep-daily", "3", "--grace", "0"]);
    assert!(names(&again["deleted_backups"]).is_empty(), "{again:#}");
    assert_eq!(again["wal_files_deleted"], 0, "{again:#}");
    assert_eq!(again["data_objects_deleted"], 0, "{again:#}");

    // A point between kept backups still restores exactly.
    let (mut pg, out) =
        restore_and_start(&td, &wv, "pitr", &["--target-lsn", &lsn_after_6th, "--target-action", "pause"], true);
    assert!(out.contains(&ids[5]), "{out}");
    assert_eq!(table_checksum(&pg, "pgbench_accounts", "aid"), state_after_6th);
    pg.stop();

    // A policy that keeps no backup is refused, deleting nothing.
    let out = wv.walvault(&["expire", "--keep-daily", "0"]);
    out.assert_code(1);
    assert_eq!(wv.backup_ids(), expected_kept, "{out}");
    primary.stop();
}

#[test]
fn expire_racing_archive_push_and_killed_half_way_loses_nothing() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = Config::new(&repo, td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    for _ in 0..5 {
        primary.pgbench(&["-n", "-t", "200"]);
        wv.backup(&primary, &["--fast"]).expect_success("backup");
    }

    // Expire runs again and again while the server writes and archives.
    thread::scope(|s| {
        let writer = s.spawn(|| {
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                primary.pgbench(&["-n", "-t", "100"]);
                primary.switch_wal();
            }
        });
        while !writer.is_finished() {
            wv.walvault(&["expire", "--keep-last", "3", "--grace", "0", "--wait", "30"]).expect_success("expire");
        }
        writer.join().expect("writer");
    });
    let last = primary.switch_wal();
    let stats = primary.wait_archived(&last, Duration::from_secs(120));
    assert_eq!(stats.failed_count, 0, "archive-push never failed during expire");
    wv.walvault(&["catalog", "rebuild"]).expect_success("rebuild");
    wv.walvault(&["verify"]).expect_success("verify after racing expires");
    let info = wv.info_json();
    assert!(info["timelines"][0]["gaps"].as_array().is_some_and(|g| g.is_empty()), "{info:#}");
    assert_eq!(wv.backup_ids().len(), 3);

    // An expire while a backup runs is refused, naming the backup; the
    // backup completes.
    thread::scope(|s| {
        let backup = s.spawn(|| wv.backup(&primary, &["--fast", "--max-rate", "2M"]));
        let holders = repo.join("main").join("lock.d");
        let until = Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(&holders).map_or(true, |mut d| d.next().is_none()) && Instant::now() < until {
            thread::sleep(Duration::from_millis(50));
        }
        let out = wv.walvault(&["expire", "--keep-last", "1", "--grace", "0"]);
        out.assert_code(1);
        assert!(out.stderr.contains("locked by backup"), "{out}");
        backup.join().expect("backup thread").expect_success("the backup that held the lock");
    });

    // A restore, a drill and a verify share the lock too: while an expire
    // holds it (here this test, exclusively, as expire does), they wait
    // before reading anything, and go on once it is released.
    let lock =
        std::fs::OpenOptions::new().read(true).write(true).open(repo.join("main").join("lock")).expect("lock file");
    lock.lock().expect("take the repository lock exclusively, as expire does");
    let restored = td.join("restored-under-lock");
    let drills = td.mkdir("drills");
    let drill_dir = drills.display().to_string();
    thread::scope(|s| {
        let restore = s.spawn(|| wv.restore(&restored, &[]));
        let drill = s.spawn(|| wv.walvault(&["drill", "--dir", &drill_dir]));
        let verify = s.spawn(|| wv.walvault(&["verify"]));
        thread::sleep(Duration::from_secs(3));
        // Look, then release the lock before asserting: a failed assertion
        // must not leave the others waiting an hour for it.
        let finished = [restore.is_finished(), drill.is_finished(), verify.is_finished()];
        let written = std::fs::read_dir(&restored).map_or(0, |d| d.count());
        let drilled = std::fs::read_dir(&drills).map_or(0, |d| d.count());
        lock.unlock().expect("release the lock");
        assert_eq!(finished, [false; 3], "restore, drill and verify wait for the lock (finished: true)");
        assert_eq!(written, 0, "the restore wrote nothing while expire held the lock");
        assert_eq!(drilled, 0, "the drill made no directory while expire held the lock");
        restore.join().expect("restore thread").expect_success("restore once the lock is free");
        drill.join().expect("drill thread").expect_success("drill once the lock is free");
        let verified = verify.join().expect("verify thread").expect_success("verify once the lock is free");
        assert!(!verified.to_string().contains("repository lock"), "{verified}");
    });
    assert!(restored.join("PG_VERSION").is_file(), "the restore completed");

    // kill -9 at several points, each followed by verify (consistent), then
    // one run finishes the job.
    primary.pgbench(&["-n", "-t", "200"]);
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    primary.switch_wal();
    for delay_ms in [2, 10, 30, 80] {
        let mut cmd = wv.command("walvault");
        cmd.args(["expire", "--keep-last", "1", "--grace", "0"]).stdout(Stdio::null()).stderr(Stdio::null());
        as_pg_user(&mut cmd);
        let mut child = cmd.spawn().expect("spawn expire");
        thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let out = wv.walvault(&["verify"]);
        assert!(out.success(), "verify after expire was killed after {delay_ms} ms\n{out}");
    }
    let done = json(&wv, &["expire", "--json", "--keep-last", "1", "--grace", "0"]);
    assert_eq!(wv.backup_ids().len(), 1, "{done:#}");
    let again = json(&wv, &["expire", "--json", "--keep-last", "1", "--grace", "0"]);
    assert!(names(&again["deleted_backups"]).is_empty() && again["wal_files_deleted"] == 0, "{again:#}");
    wv.walvault(&["verify"]).expect_success("verify at the end");
    primary.stop();
}
