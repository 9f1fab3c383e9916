//! `walvault check` proves that the running server archives into this
//! repository; `walvault verify` reads everything and names each problem.

use std::fs;
use std::time::Duration;

use walvault_integration::{
    Cmd, Config, PgCluster, TestDir, Walvault, archiving_primary, as_pg_user, flip_byte, object_path, run_with_timeout,
    superuser,
};

/// `walvault ARGS…` with the libpq environment of `pg`.
fn with_server(wv: &Walvault, pg: &PgCluster, args: &[&str]) -> Cmd {
    let mut cmd = wv.command("walvault");
    cmd.env("PGHOST", pg.sockdir())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", superuser())
        .env("PGDATABASE", "postgres")
        .args(args);
    as_pg_user(&mut cmd);
    run_with_timeout(cmd, Duration::from_secs(300))
}

fn problems(out: &Cmd) -> Vec<String> {
    out.stdout.lines().filter(|l| l.starts_with("problem:")).map(str::to_string).collect()
}

#[test]
fn check_sees_archiving_work_and_fail() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");

    let out = with_server(&wv, &primary, &["check"]).expect_success("walvault check");
    assert!(out.stdout.contains("check passed"), "{out}");
    let out = with_server(&wv, &primary, &["check", "--json"]).expect_success("walvault check --json");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let segment = report["switched_segment"].as_str().expect("a switched segment").to_string();
    assert!(object_path(&td.join("repo"), "main", &segment).exists(), "{segment} is in the repository");
    assert!(report["archive_lag_ms"].as_u64().is_some(), "{report:#}");

    // Broken archiving: check fails within its timeout and says why.
    primary.psql("ALTER SYSTEM SET archive_command = 'false'");
    primary.psql("SELECT pg_reload_conf()");
    let out = with_server(&wv, &primary, &["check", "--archive-timeout", "3"]);
    out.assert_code(1);
    assert!(out.stdout.contains("failed") && out.stdout.contains("archive"), "{out}");
    primary.psql("ALTER SYSTEM RESET archive_command");
    primary.psql("SELECT pg_reload_conf()");
    with_server(&wv, &primary, &["check"]).expect_success("check once archiving works again");

    // Archiving into another repository is caught without waiting.
    let other = Config::new(td.join("other-repo"), td.join("other.db")).write(&td, "other.toml");
    primary.psql(&format!("ALTER SYSTEM SET archive_command = 'archive-push --config {} %p'", other.display()));
    primary.psql("SELECT pg_reload_conf()");
    let out = with_server(&wv, &primary, &["check"]);
    out.assert_code(1);
    assert!(out.stdout.contains("other-repo"), "names the other repository: {out}");
    primary.psql("ALTER SYSTEM RESET archive_command");
    primary.psql("SELECT pg_reload_conf()");
    primary.stop();
}

#[test]
fn verify_passes_on_a_sound_repository_and_names_each_problem() {
    let td = TestDir::new();
    let repo = td.join("repo");
    let config = Config::new(&repo, td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    wv.backup(&primary, &["--fast"]).expect_success("backup");
    primary.pgbench(&["-n", "-t", "200"]);
    let middle = primary.switch_wal();
    primary.pgbench(&["-n", "-t", "200"]);
    let last = primary.switch_wal();
    primary.wait_archived(&last, Duration::from_secs(120));
    primary.stop();

    let out = wv.walvault(&["verify"]).expect_success("verify of a sound repository");
    assert!(problems(&out).is_empty(), "{out}");

    // A damaged data object: one problem line, naming it.
    let data = repo.join("main").join("data");
    let object =
        fs::read_dir(fs::read_dir(&data).expect("data").next().expect("a subdirectory").expect("entry").path())
            .expect("objects")
            .next()
            .expect("an object")
            .expect("entry")
            .path();
    let name = object.file_name().and_then(|n| n.to_str()).expect("utf-8").to_string();
    let len = fs::metadata(&object).expect("stat").len();
    flip_byte(&object, len - 1);
    let out = wv.walvault(&["verify"]);
    out.assert_code(1);
    let found = problems(&out);
    assert_eq!(found.len(), 1, "{out}");
    assert!(found[0].contains(&name), "{out}");
    flip_byte(&object, len - 1);
    wv.walvault(&["verify"]).expect_success("verify after the repair");

    // A missing segment after the backup: a gap its recovery must cross.
    let ids = wv.backup_ids();
    let victim = object_path(&repo, "main", &middle);
    let aside = td.join("aside");
    fs::rename(&victim, &aside).expect("remove a segment");
    let out = wv.walvault(&["verify", "--wal"]);
    out.assert_code(1);
    assert!(problems(&out).iter().any(|l| l.contains(&middle)), "names {middle}: {out}");
    fs::rename(&aside, &victim).expect("put it back");
    wv.walvault(&["verify", "--backup", &ids[0]]).expect_success("verify --backup");
}
