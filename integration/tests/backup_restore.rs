//! Base backups store unchanged data once, and restore with tablespaces,
//! relocated or in place.

use std::fs;
use std::path::Path;
use std::time::Duration;

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, archiving_primary, chown_to_pg_user, json_text, restore_and_start,
    table_checksum,
};

const LONG: Duration = Duration::from_secs(300);

fn accounts(pg: &PgCluster) -> String {
    table_checksum(pg, "pgbench_accounts", "aid")
}

fn backup_entry(wv: &Walvault, id: &str) -> serde_json::Value {
    let info = wv.info_json();
    info["backups"]
        .as_array()
        .and_then(|a| a.iter().find(|b| json_text(&b["id"]) == id).cloned())
        .unwrap_or_else(|| panic!("backup {id} is not in info: {info:#}"))
}

fn number(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a number"))
}

#[test]
fn a_second_backup_stores_only_what_changed_and_both_restore() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "5", "-q"]);
    primary.psql("VACUUM FREEZE");
    primary.psql("CHECKPOINT");
    let first_state = accounts(&primary);
    wv.backup(&primary, &["--fast", "--jobs", "2"]).expect_success("first backup");

    // Change 1% of the accounts (5,000 of 500,000 rows).
    primary.psql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 5000");
    primary.psql("CHECKPOINT");
    let second_state = accounts(&primary);
    assert_ne!(first_state, second_state);
    wv.backup(&primary, &["--fast", "--jobs", "2"]).expect_success("second backup");
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);

    let ids = wv.backup_ids();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let (first, second) = (backup_entry(&wv, &ids[0]), backup_entry(&wv, &ids[1]));
    let first_stored = number(&first["stored_size"]);
    let second_new = number(&second["new_bytes"]);
    assert_eq!(number(&first["new_bytes"]), first_stored, "the first backup stores everything it refers to");
    assert!(
        second_new * 10 < first_stored,
        "the second backup must store under 10% of the first: {second_new} new bytes vs {first_stored} ({first:#} {second:#})"
    );
    assert!(number(&second["size"]) > 60 << 20, "both backups cover the whole cluster: {second:#}");

    // Each backup restores on its own, to the state it was taken in.
    let (mut pg, _) = restore_and_start(
        &td,
        &wv,
        "first",
        &["--backup", &ids[0], "--target", "immediate", "--target-action", "promote"],
        false,
    );
    assert_eq!(accounts(&pg), first_state, "first backup");
    pg.stop();
    let (mut pg, _) = restore_and_start(
        &td,
        &wv,
        "second",
        &["--backup", &ids[1], "--target", "immediate", "--target-action", "promote"],
        false,
    );
    assert_eq!(accounts(&pg), second_state, "second backup");
    pg.stop();
    primary.stop();
}

fn make_pg_dir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    chown_to_pg_user(path);
}

fn spaced(pg: &PgCluster) -> String {
    table_checksum(pg, "spaced", "id")
}

#[test]
fn tablespaces_restore_relocated_and_in_place() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    let original = td.join("ts_original");
    make_pg_dir(&original);
    primary.psql(&format!("CREATE TABLESPACE ts LOCATION '{}'", original.display()));
    primary.psql("CREATE TABLE spaced (id int PRIMARY KEY, v text) TABLESPACE ts");
    primary.psql("INSERT INTO spaced SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    wv.backup(&primary, &["--fast"]).expect_success("backup with a tablespace");
    primary.psql("INSERT INTO spaced SELECT g, 'after' FROM generate_series(20001, 25000) g");
    let expected = spaced(&primary);
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);

    // Relocated, while the original is still in use by the primary.
    let relocated = td.join("ts_relocated");
    let map = format!("{}={}", original.display(), relocated.display());
    let (mut pg, _) = restore_and_start(&td, &wv, "relocated", &["--tablespace-map", &map], false);
    assert_eq!(spaced(&pg), expected);
    assert_eq!(
        pg.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts'"),
        relocated.display().to_string()
    );
    pg.stop();

    // In place, after losing the server and its tablespace.
    primary.stop();
    fs::rename(primary.datadir(), td.join("primary_lost")).expect("move the lost data directory aside");
    fs::rename(&original, td.join("ts_lost")).expect("move the lost tablespace aside");
    let (mut pg, _) = restore_and_start(&td, &wv, "in_place", &[], false);
    assert_eq!(spaced(&pg), expected);
    assert_eq!(
        pg.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts'"),
        original.display().to_string()
    );
    let version_dirs: Vec<String> = fs::read_dir(&original)
        .expect("the tablespace is restored in place")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(version_dirs.iter().any(|d| d.starts_with("PG_15_")), "{version_dirs:?}");
    pg.stop();
}
