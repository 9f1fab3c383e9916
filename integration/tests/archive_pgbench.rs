//! A real PostgreSQL 15 archives pgbench's WAL through `archive-push`; every
//! archived segment comes back byte-identical through `archive-fetch`, and
//! `walvault info` describes exactly what was archived.

use std::fs;
use std::time::Duration;

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, assert_same_file, info_timeline, json_text, object_path,
};

#[test]
fn pgbench_wal_is_archived_and_fetched_back_byte_identical() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = Config::new(&repo, td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);

    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf(
        "# keep every segment in pg_wal so that the archive can be compared with it\n\
         wal_keep_size = '2GB'\n\
         max_wal_size = '1GB'\n\
         checkpoint_timeout = '30min'\n\
         # no timed segment switches: the test knows which segment is the last\n\
         archive_timeout = 0",
    );
    // Bind the repository before the server starts: not a single
    // archive_command call may fail.
    wv.init(pg.datadir()).expect_success("walvault init (server stopped)");
    pg.start(&wv.server_env());
    assert_eq!(pg.psql("SHOW archive_mode"), "on", "archive.conf sets archive_mode");
    assert_eq!(pg.psql("SHOW archive_command"), "archive-push %p", "archive.conf sets archive_command");
    assert_eq!(pg.psql("SHOW wal_level"), "replica", "archive.conf sets wal_level");

    pg.pgbench(&["-i", "-s", "5", "-q"]);
    pg.pgbench(&["-c", "2", "-j", "2", "-t", "500", "-n"]);
    let last = pg.switch_wal();
    let stats = pg.wait_archived(&last, Duration::from_secs(600));
    assert_eq!(stats.last_archived_wal, last, "nothing after {last} should have been archived");
    assert_eq!(
        stats.failed_count,
        0,
        "archive-push failed {} times (last failure: {}); server log:\n{}",
        stats.failed_count,
        stats.last_failed_wal,
        pg.log_tail(40)
    );

    let done = pg.archived_done();
    assert!(done.len() >= 4, "pgbench -i -s 5 should fill at least 4 segments, archived: {done:?}");
    assert!(done.iter().all(|n| n.len() == 24 && n.starts_with("00000001")), "{done:?}");
    assert_eq!(done.last(), Some(&last));
    assert_eq!(stats.archived_count, done.len() as u64, "archived_count vs .done files");

    let fetched = td.mkdir("fetched");
    for name in &done {
        assert!(object_path(&repo, "main", name).is_file(), "no object for {name} in the repository");
        let dest = fetched.join("RECOVERYXLOG");
        wv.fetch(name, &dest).assert_silent_success();
        assert_same_file(&pg.datadir().join("pg_wal").join(name), &dest);
        fs::remove_file(&dest).expect("remove the fetched copy");
    }

    eprintln!("{} segments ({} … {last}) archived and fetched back byte-identical", done.len(), done[0]);

    // info --json knows exactly what was archived.
    let sysid = pg.psql("SELECT system_identifier FROM pg_control_system()");
    let info = wv.info_json();
    let pretty = serde_json::to_string_pretty(&info).expect("JSON prints");
    assert_eq!(json_text(&info["cluster"]["name"]), "main", "{pretty}");
    assert_eq!(json_text(&info["cluster"]["system_identifier"]), sysid, "{pretty}");
    assert!(
        info["cluster"]["system_identifier"].is_string(),
        "system_identifier must be a string (u64 does not fit a JSON number): {pretty}"
    );
    assert_eq!(json_text(&info["cluster"]["pg_version"]), "15", "{pretty}");
    assert_eq!(json_text(&info["cluster"]["wal_segment_size"]), (16 * 1024 * 1024).to_string(), "{pretty}");
    assert_eq!(json_text(&info["repository"]), repo.to_string_lossy(), "{pretty}");
    let timelines = info["timelines"].as_array().expect("timelines is an array");
    assert_eq!(timelines.len(), 1, "only timeline 1: {pretty}");
    let tl1 = info_timeline(&info, 1).expect("timeline 1 is listed");
    assert_eq!(json_text(&tl1["first"]), done[0], "{pretty}");
    assert_eq!(json_text(&tl1["last"]), last, "{pretty}");
    assert_eq!(json_text(&tl1["segments"]), done.len().to_string(), "{pretty}");
    assert_eq!(tl1["gaps"].as_array().map(Vec::len), Some(0), "no gaps: {pretty}");
    assert_eq!(info["history_files"].as_array().map(Vec::len), Some(0), "{pretty}");
    assert_eq!(json_text(&info["newest"]["name"]), last, "{pretty}");
    let age = info["newest"]["age_seconds"].as_f64().expect("age_seconds is a number");
    assert!((0.0..600.0).contains(&age), "age_seconds {age}: {pretty}");

    // Human-readable info works too.
    let text = wv.walvault(&["info"]).expect_success("walvault info");
    assert!(text.stdout.contains(&last), "walvault info should name the newest segment\n{text}");

    pg.stop();
}
