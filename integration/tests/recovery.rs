//! A base backup taken with `pg_basebackup -X none` is restored with
//! `restore_command = 'archive-fetch %f %p'` and replays everything written
//! after it; a corrupt segment aborts recovery instead of ending it early; the
//! catalog can be rebuilt from the repository alone.

use std::fs;
use std::path::Path;
use std::time::Duration;

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, archiving_primary, assert_same_file, flip_byte, info_timeline, json_text,
    object_path, overwrite_file, read_bytes, table_checksum, wait_until, without_age,
};

const LONG: Duration = Duration::from_secs(600);

/// Tables and the column list that orders each one completely.
const TABLES: [(&str, &str); 5] = [
    ("pgbench_accounts", "aid"),
    ("pgbench_branches", "bid"),
    ("pgbench_tellers", "tid"),
    ("pgbench_history", "t::text"),
    ("after_backup", "id"),
];

fn checksums(pg: &PgCluster) -> Vec<(String, String)> {
    TABLES.iter().map(|(table, order)| (table.to_string(), table_checksum(pg, table, order))).collect()
}

#[test]
fn base_backup_plus_archive_restores_everything_and_corruption_aborts_recovery() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let catalog = td.join("catalog.db");
    let config = Config::new(&repo, &catalog).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);

    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    let backup = td.join("restored");
    // -X none: the backup holds no WAL; pg_basebackup waits until the WAL it
    // needs is archived, so this also proves archive-push works.
    primary.pg_basebackup(&backup, &["-X", "none", "-c", "fast", "--no-sync"]);

    primary.pgbench(&["-c", "2", "-j", "2", "-t", "300", "-n"]);
    primary.psql("CREATE TABLE after_backup AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g");
    primary.psql("UPDATE pgbench_branches SET bbalance = bbalance + 1");
    let expected = checksums(&primary);
    let last = primary.switch_wal();
    let stats = primary.wait_archived(&last, LONG);
    assert_eq!(stats.failed_count, 0, "archive-push failed: {stats:?}\n{}", primary.log_tail(40));
    primary.stop();

    // 1. The last segment (the one holding after_backup) is corrupt in the
    //    repository: recovery must stop with an error, not end early and
    //    promote a cluster that silently lacks the newest data.
    let object = object_path(&repo, "main", &last);
    let original = read_bytes(&object);
    flip_byte(&object, original.len() as u64 / 2);

    let mut restored = PgCluster::existing(&td, "restored", &backup);
    restored.include_example("restore.conf");
    restored.touch("recovery.signal");
    let start = restored.try_start(&wv.server_env());
    wait_until(LONG, "the restored server to stop at the corrupt segment", || !restored.server_alive());
    restored.mark_stopped();
    let log = restored.log();
    assert!(
        log.contains("is corrupt"),
        "the server log should show archive-fetch's error for {last}\n{start}\n--- log ---\n{log}"
    );
    assert!(
        !log.contains("archive recovery complete") && !backup.join("pg_wal/00000002.history").exists(),
        "recovery ended early and promoted a new timeline although a segment was corrupt\n--- log ---\n{log}"
    );

    // 2. Repaired, the same data directory recovers to the end of the archive.
    overwrite_file(&object, &original);
    restored.start(&wv.server_env());
    wait_until(LONG, "the restored cluster to finish recovery", || restored.psql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(checksums(&restored), expected, "restored tables differ from the primary's");
    assert_eq!(restored.psql("SELECT count(*) FROM after_backup"), "50000");
    let current = restored.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(current.starts_with("00000002"), "recovery should end with a switch to timeline 2, now at {current}");

    // 3. The promoted cluster keeps archiving to the same repository on
    //    timeline 2, history file first.
    restored.psql("CREATE TABLE on_timeline_2 AS SELECT generate_series(1, 1000) AS i");
    let tl2_segment = restored.switch_wal();
    assert!(tl2_segment.starts_with("00000002"), "{tl2_segment}");
    let stats = restored.wait_archived(&tl2_segment, LONG);
    assert_eq!(stats.failed_count, 0, "archive-push failed after promotion: {stats:?}\n{}", restored.log_tail(40));
    let history = object_path(&repo, "main", "00000002.history");
    assert!(history.is_file(), "00000002.history was not archived to {}", history.display());
    let fetched = td.mkdir("fetched").join("RECOVERYHISTORY");
    wv.fetch("00000002.history", &fetched).assert_silent_success();
    assert_same_file(&fetched, &backup.join("pg_wal/00000002.history"));

    let info = wv.info_json();
    let pretty = serde_json::to_string_pretty(&info).expect("JSON prints");
    let names: Vec<String> =
        info["history_files"].as_array().expect("history_files is an array").iter().map(json_text).collect();
    assert_eq!(names, ["00000002.history"], "{pretty}");
    assert!(info_timeline(&info, 1).is_some(), "timeline 1 listed: {pretty}");
    let tl2 = info_timeline(&info, 2).expect("timeline 2 is listed");
    assert_eq!(json_text(&tl2["last"]), tl2_segment, "{pretty}");
    assert_eq!(json_text(&info["newest"]["name"]), tl2_segment, "{pretty}");
    restored.stop();

    // 4. The catalog is only an index: rebuilt from the repository, it says
    //    the same (two timelines and a history file included).
    assert_rebuild_keeps_info(&wv, &catalog);
}

/// `walvault catalog rebuild` gives the same `info --json` (but
/// `newest.age_seconds`), with the old catalog in place and without one.
fn assert_rebuild_keeps_info(wv: &Walvault, catalog: &Path) {
    let before = without_age(&wv.info_json());
    wv.walvault(&["catalog", "rebuild"]).expect_success("walvault catalog rebuild");
    let after = without_age(&wv.info_json());
    assert_eq!(
        after,
        before,
        "info --json differs after catalog rebuild\nbefore: {}\nafter: {}",
        serde_json::to_string_pretty(&before).expect("JSON prints"),
        serde_json::to_string_pretty(&after).expect("JSON prints")
    );

    // A restore host that never had a catalog.
    fs::remove_file(catalog).expect("remove the catalog");
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut side = catalog.as_os_str().to_owned();
        side.push(suffix);
        let _ = fs::remove_file(side);
    }
    wv.walvault(&["catalog", "rebuild"]).expect_success("walvault catalog rebuild without a catalog");
    let rebuilt = without_age(&wv.info_json());
    assert_eq!(
        rebuilt,
        before,
        "info --json differs after rebuilding a deleted catalog\nbefore: {}\nafter: {}",
        serde_json::to_string_pretty(&before).expect("JSON prints"),
        serde_json::to_string_pretty(&rebuilt).expect("JSON prints")
    );
}

#[test]
fn catalog_rebuild_reproduces_info() {
    let td = TestDir::new();
    let catalog = td.join("catalog.db");
    let config = Config::new(td.join("repo"), &catalog).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");

    pg.psql("CREATE TABLE t (i int)");
    let mut last = String::new();
    for i in 0..4 {
        pg.psql(&format!("INSERT INTO t SELECT generate_series(1, 1000) + {i} * 1000"));
        last = pg.switch_wal();
    }
    let stats = pg.wait_archived(&last, LONG);
    assert_eq!(stats.failed_count, 0, "{stats:?}\n{}", pg.log_tail(40));
    pg.stop();

    let info = wv.info_json();
    let tl1 = info_timeline(&info, 1).expect("timeline 1 is listed");
    assert_eq!(json_text(&tl1["last"]), last);
    assert_eq!(json_text(&tl1["segments"]), stats.archived_count.to_string());
    assert_rebuild_keeps_info(&wv, &catalog);
}
