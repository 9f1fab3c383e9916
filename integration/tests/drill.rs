//! `walvault drill` proves a backup restores: it passes on a good backup,
//! runs the user's SQL expectations, fails loudly on a corrupted chunk, and
//! `info` shows the last drill either way. Nothing is left behind.

use std::fs;
use std::time::Duration;

use walvault_integration::{Config, TestDir, Walvault, archiving_primary, flip_byte, largest_file};

#[test]
fn drill_passes_on_a_good_backup_and_fails_loudly_on_a_corrupt_one() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = Config::new(&repo, td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    primary.psql("CREATE TABLE after_backup AS SELECT g AS id FROM generate_series(1, 1234) g");
    let last = primary.switch_wal();
    primary.wait_archived(&last, Duration::from_secs(120));
    let drills = td.mkdir("drills");
    let sql = td.write(
        "checks.sql",
        "-- expect: 100000\nSELECT count(*) FROM pgbench_accounts;\n-- expect: 1234\nSELECT count(*) FROM after_backup;\n",
    );
    let dir = drills.display().to_string();
    let sql_arg = sql.display().to_string();

    let out = wv.walvault(&["drill", "--dir", &dir, "--sql", &sql_arg]).expect_success("drill of a good backup");
    assert!(fs::read_dir(&drills).expect("drills dir").next().is_none(), "the drill removed its directory: {out}");
    let info = wv.info_json();
    let last_drill = &info["last_drill"];
    assert_eq!(last_drill["ok"], true, "{info:#}");
    assert!(last_drill["rto_seconds"].as_f64().is_some_and(|s| s > 0.0), "{info:#}");
    assert!(primary.archiver_stats().failed_count == 0);

    // A wrong expectation fails the drill, naming the check.
    let wrong = td.write("wrong.sql", "-- expect: 99\nSELECT count(*) FROM after_backup;\n");
    let out = wv.walvault(&["drill", "--dir", &dir, "--sql", &wrong.display().to_string()]);
    out.assert_code(1);
    assert!(format!("{}{}", out.stdout, out.stderr).contains("99"), "{out}");
    assert_eq!(wv.info_json()["last_drill"]["ok"], false);

    // A corrupt chunk: the drill fails, names the object, and is recorded.
    let object = largest_file(&repo.join("main").join("data"));
    let len = fs::metadata(&object).expect("stat").len();
    flip_byte(&object, len / 2);
    let out = wv.walvault(&["drill", "--dir", &dir]);
    out.assert_code(1);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("corrupt"), "{out}");
    let name = object.file_name().and_then(|n| n.to_str()).expect("utf-8");
    assert!(text.contains(name), "names the object: {out}");
    let info = wv.info_json();
    assert_eq!(info["last_drill"]["ok"], false, "{info:#}");
    assert!(fs::read_dir(&drills).expect("drills dir").next().is_none(), "nothing left behind: {out}");
    // The production server was never touched, and no timeline was published.
    assert_eq!(primary.psql("SELECT count(*) FROM after_backup"), "1234");
    assert!(info["history_files"].as_array().is_some_and(|h| h.is_empty()), "{info:#}");
    primary.stop();
}
