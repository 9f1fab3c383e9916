//! Point-in-time recovery with `walvault backup` and `walvault restore`:
//! every target type brings back exactly the data recorded at that target,
//! including a table dropped afterwards; and a promoted restore's new
//! timeline archives into the same repository and can itself be restored.

use std::time::Duration;

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, archiving_primary, json_text, restore_and_start, table_checksum, without_age,
};

const LONG: Duration = Duration::from_secs(300);

/// Tables compared, with a complete ordering for each.
const TABLES: [(&str, &str); 4] =
    [("pgbench_accounts", "aid"), ("pgbench_branches", "bid"), ("pgbench_tellers", "tid"), ("ledger", "id")];

/// The contents of every table (a dropped table reads as "absent").
fn state(pg: &PgCluster) -> Vec<String> {
    TABLES
        .iter()
        .map(|(table, order)| {
            let exists = pg.psql(&format!("SELECT to_regclass('{table}') IS NOT NULL"));
            if exists == "t" { table_checksum(pg, table, order) } else { "absent".to_string() }
        })
        .collect()
}

/// A moment in the primary's history, recorded in every form a target can take.
struct Checkpoint {
    time: String,
    lsn: String,
    xid: String,
    name: String,
    state: Vec<String>,
}

/// Writes a little, then records checkpoint `n`: the last transaction's xid,
/// the time and LSN right after it committed, a named restore point, and the
/// tables' contents. Nothing else writes meanwhile, so each form of target
/// designates the same state.
fn checkpoint(pg: &PgCluster, n: u32) -> Checkpoint {
    pg.pgbench(&["-n", "-c", "2", "-t", "100"]);
    pg.psql(&format!("INSERT INTO ledger (v) SELECT 'round {n} row ' || g FROM generate_series(1, 500) g"));
    let xid = pg.psql(&format!("INSERT INTO ledger (v) VALUES ('marker {n}') RETURNING txid_current()"));
    let lsn = pg.psql("SELECT pg_current_wal_lsn()");
    let time = pg.psql("SELECT clock_timestamp()");
    let name = format!("checkpoint_{n}");
    pg.psql(&format!("SELECT pg_create_restore_point('{name}')"));
    let state = state(pg);
    // Later commits must carry a later timestamp than `time`.
    std::thread::sleep(Duration::from_millis(20));
    Checkpoint { time, lsn, xid, name, state }
}

#[test]
fn every_target_type_restores_exactly_the_recorded_data() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.psql("CREATE TABLE ledger (id serial PRIMARY KEY, v text NOT NULL)");

    let at_backup1 = state(&primary);
    wv.backup(&primary, &["--fast"]).expect_success("first backup");
    let cp1 = checkpoint(&primary, 1);
    let at_backup2 = state(&primary);
    wv.backup(&primary, &["--fast", "--jobs", "3"]).expect_success("second backup");
    let cp2 = checkpoint(&primary, 2);
    let cp3 = checkpoint(&primary, 3);

    // The accident, and life going on after it.
    primary.psql("DROP TABLE ledger");
    primary.pgbench(&["-n", "-c", "2", "-t", "100"]);
    let at_end = state(&primary);
    assert_eq!(at_end[3], "absent");
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);

    let ids = wv.backup_ids();
    assert_eq!(ids.len(), 2, "info lists both backups: {ids:?}");
    let info = wv.info_json();
    let window = &info["recoverable"][0];
    assert_eq!(window["timeline"], 1, "{info:#}");
    assert_eq!(window["from_backup"].as_str(), Some(ids[0].as_str()), "{info:#}");

    // Each target type, at a checkpoint before and after the second backup:
    // the planner must pick the backup that precedes the target. The last
    // case is the DBA's: the moment before the DROP, promoted. (Paused there,
    // replay would hold the DROP's lock on the table, and reads would wait.)
    let cases: Vec<(&str, Vec<&str>, &Checkpoint, &str, &str)> = vec![
        ("time", vec!["--target-time", &cp1.time], &cp1, &ids[0], "pause"),
        ("lsn", vec!["--target-lsn", &cp2.lsn], &cp2, &ids[1], "pause"),
        ("xid", vec!["--target-xid", &cp3.xid], &cp3, &ids[1], "pause"),
        ("name", vec!["--target-name", &cp2.name], &cp2, &ids[0], "pause"),
        ("before_drop", vec!["--target-time", &cp3.time], &cp3, &ids[1], "promote"),
    ];
    for (tag, target, cp, expected_backup, action) in cases {
        let mut args = target.clone();
        args.extend(["--target-action", action]);
        let (mut pg, out) = restore_and_start(&td, &wv, tag, &args, action == "pause");
        assert!(out.contains(expected_backup), "{tag}: expected backup {expected_backup} in: {out}");
        assert_eq!(state(&pg), cp.state, "{tag}: contents at the target ({target:?})");
        pg.stop();
    }

    // --target immediate: the newest backup, as it was when it became consistent.
    let (mut pg, _) =
        restore_and_start(&td, &wv, "immediate", &["--target", "immediate", "--target-action", "pause"], true);
    assert_eq!(state(&pg), at_backup2, "--target immediate");
    pg.stop();
    let (mut pg, _) = restore_and_start(
        &td,
        &wv,
        "immediate1",
        &["--target", "immediate", "--backup", &ids[0], "--target-action", "pause"],
        true,
    );
    assert_eq!(state(&pg), at_backup1, "--target immediate --backup <first>");
    pg.stop();

    // No target: the end of the archive, where the table is gone.
    let (mut pg, _) = restore_and_start(&td, &wv, "end", &[], false);
    assert_eq!(state(&pg), at_end, "end of archive");
    pg.stop();
    primary.stop();
}

#[test]
fn a_promoted_restore_archives_a_new_timeline_that_restores_too() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    primary.psql("CREATE TABLE ledger (id serial PRIMARY KEY, v text NOT NULL)");
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    let cp1 = checkpoint(&primary, 1);
    let _cp2 = checkpoint(&primary, 2);
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);
    primary.stop();

    // Back to checkpoint 1 and promote: timeline 2 starts there and archives
    // (archive.conf came with the backup) into the same repository.
    let dir = td.join("branch");
    wv.restore(&dir, &["--target-time", &cp1.time, "--target-action", "promote"]).expect_success("restore to cp1");
    let mut branch = PgCluster::existing(&td, "branch", &dir);
    branch.start(&wv.server_env());
    branch.wait_promoted(LONG);
    assert_eq!(branch.psql("SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    assert_eq!(state(&branch), cp1.state);
    let on_tl2 = checkpoint(&branch, 20);
    branch.psql("INSERT INTO ledger (v) VALUES ('after the timeline 2 checkpoint')");
    let at_tl2_end = state(&branch);
    let last2 = branch.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    branch.wait_archived(&last2, LONG);
    branch.stop();

    let info = wv.info_json();
    let history: Vec<String> =
        info["history_files"].as_array().expect("history_files is a list").iter().map(json_text).collect();
    assert_eq!(history, ["00000002.history"], "{info:#}");
    assert!(
        info["recoverable"].as_array().expect("recoverable is a list").iter().any(|w| w["timeline"] == 2),
        "timeline 2 has a recoverable window: {info:#}"
    );

    // A point on timeline 2, reached from the timeline-1 backup through the history.
    let (mut pg, _) = restore_and_start(
        &td,
        &wv,
        "tl2_time",
        &["--target-time", &on_tl2.time, "--target-timeline", "2", "--target-action", "pause"],
        true,
    );
    assert_eq!(state(&pg), on_tl2.state, "a point on timeline 2");
    pg.stop();
    // The catalog is only an index: rebuilt from the repository alone it
    // holds the same backups, timelines and windows.
    let remove_catalog = || {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(td.join(format!("catalog.db{suffix}")));
        }
        assert!(!td.join("catalog.db").exists());
    };
    remove_catalog();
    wv.walvault(&["catalog", "rebuild"]).expect_success("catalog rebuild");
    assert_eq!(without_age(&wv.info_json()), without_age(&info), "info after a rebuild");

    // A restore host without a catalog still restores (it rebuilds one). The
    // end of the archive along the latest timeline is timeline 2's end.
    remove_catalog();
    let (mut pg, _) = restore_and_start(&td, &wv, "tl2_latest", &["--target-timeline", "latest"], false);
    assert_eq!(state(&pg), at_tl2_end, "end of the latest timeline");
    pg.stop();
}
