//! Several repositories at once (`[[repositories]]`): archive-push stores
//! into every repository and fails only on a required one; archive-fetch
//! and restore fall back in priority order; info and verify report each
//! repository; `walvault repo sync` fills a repository that missed
//! something. Against a real PostgreSQL, through the binaries.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use walvault_integration::{
    Cmd, PgCluster, TestDir, Walvault, archiving_primary, assert_same_file, flip_byte, object_path, restore_and_start,
    table_checksum, toml_string, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// One `[[repositories]]` entry: name, location, required.
type Spec<'a> = (&'a str, &'a Path, bool);

/// Writes a configuration listing `repos` in this order (the first one's
/// catalog is `<td>/catalog.db`, the others' `catalog-<name>.db` beside
/// it, by default) to `<td>/<rel>`.
fn write_config(td: &TestDir, rel: &str, repos: &[Spec]) -> PathBuf {
    let mut text = String::from("cluster = \"main\"\n");
    text.push_str(&format!("catalog = {}\n", toml_string(&td.join("catalog.db").to_string_lossy())));
    for (name, location, required) in repos {
        text.push_str(&format!(
            "\n[[repositories]]\nname = {}\nlocation = {}\nrequired = {required}\n",
            toml_string(name),
            toml_string(&location.to_string_lossy())
        ));
    }
    td.write(rel, text)
}

/// The WAL segments (not history or backup files) the server has archived.
fn archived_segments(pg: &PgCluster) -> Vec<String> {
    pg.archived_done().into_iter().filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())).collect()
}

/// A table with some rows, then `n` completed and archived segments;
/// returns the name of the last one.
fn make_wal(pg: &PgCluster, n: usize) -> String {
    pg.psql("CREATE TABLE IF NOT EXISTS t (id int primary key, v text)");
    let mut last = String::new();
    for i in 0..n {
        pg.psql(&format!(
            "INSERT INTO t SELECT m + g, md5(g::text) || '{i}' \
             FROM (SELECT coalesce(max(id), 0) AS m FROM t) s, generate_series(1, 1000) g"
        ));
        last = pg.switch_wal();
    }
    pg.wait_archived(&last, TIMEOUT);
    last
}

/// `archive-fetch [--repo NAME] FILE DEST`.
fn fetch(wv: &Walvault, repo: Option<&str>, name: &str, dest: &Path) -> Cmd {
    let dest = dest.to_string_lossy().into_owned();
    match repo {
        Some(r) => wv.run("archive-fetch", &["--repo", r, name, &dest]),
        None => wv.run("archive-fetch", &[name, &dest]),
    }
}

/// Replaces `<repo>/main/wal` by a file, so that every store of WAL fails
/// there (even for root, unlike a chmod); returns what undoes it.
fn break_wal_dir(repo: &Path) -> impl FnOnce() {
    let wal = repo.join("main").join("wal");
    let aside = repo.join("main").join("wal.aside");
    fs::rename(&wal, &aside).expect("move the wal directory aside");
    fs::write(&wal, b"not a directory").expect("a file in its place");
    move || {
        fs::remove_file(&wal).expect("remove the file");
        fs::rename(&aside, &wal).expect("put the wal directory back");
    }
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// (a) Two required repositories: every archived segment is in both, and
/// each gives back the very bytes of pg_wal.
#[test]
fn two_required_repositories_each_hold_every_segment() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    let config = write_config(&td, "walvault.toml", &[("a", &a, true), ("b", &b, true)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 3);
    let segments = archived_segments(&pg);
    assert!(segments.len() >= 3, "{segments:?}");
    for seg in &segments {
        let (from_a, from_b) = (td.join(format!("{seg}.a")), td.join(format!("{seg}.b")));
        fetch(&wv, Some("a"), seg, &from_a).assert_silent_success();
        fetch(&wv, Some("b"), seg, &from_b).assert_silent_success();
        assert_same_file(&from_a, &from_b);
        let original = pg.datadir().join("pg_wal").join(seg);
        if original.exists() {
            assert_same_file(&from_a, &original);
        }
    }
    assert_eq!(pg.archiver_stats().failed_count, 0);
    pg.stop();
}

/// (b) A required repository that cannot store: archiving fails (the
/// server keeps running, its log names the repository), and resumes once
/// it is repaired, with nothing missing in either repository.
#[test]
fn a_failing_required_repository_stops_archiving_until_repaired() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    let config = write_config(&td, "walvault.toml", &[("a", &a, true), ("b", &b, true)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 1);

    let repair = break_wal_dir(&b);
    pg.psql("INSERT INTO t SELECT g, 'x' FROM generate_series(100000, 100999) g");
    let stuck = pg.switch_wal();
    wait_until(TIMEOUT, "a failed archive attempt", || pg.archiver_stats().failed_count > 0);
    assert!(pg.server_alive(), "the server keeps running");
    let stats = pg.archiver_stats();
    assert!(stats.last_archived_wal < stuck, "{stuck} must not count as archived: {stats:?}");
    let log = pg.log();
    assert!(
        log.contains(&stuck) && (log.contains("'b'") || log.contains(&b.display().to_string())),
        "the log names the file and repository 'b':\n{}",
        pg.log_tail(20)
    );

    repair();
    pg.wait_archived(&stuck, TIMEOUT);
    let last = make_wal(&pg, 1);
    for seg in archived_segments(&pg) {
        for repo in [&a, &b] {
            assert!(object_path(repo, "main", &seg).exists(), "{seg} missing in {}", repo.display());
        }
    }
    assert!(archived_segments(&pg).contains(&last));
    pg.stop();
}

/// (c) An optional repository that cannot store: archiving goes on with a
/// warning in the server log; `repo sync` then fills the repository and
/// both verify.
#[test]
fn a_failing_optional_repository_warns_and_sync_fills_it() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    let config = write_config(&td, "walvault.toml", &[("a", &a, true), ("b", &b, false)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 1);

    let repair = break_wal_dir(&b);
    let last = make_wal(&pg, 2);
    let stats = pg.archiver_stats();
    assert_eq!(stats.failed_count, 0, "an optional repository never fails archiving: {stats:?}");
    let log = pg.log();
    let warned = log.lines().any(|l| contains_ci(l, "warning") && l.contains("'b'") && l.contains(&last));
    assert!(warned, "a warning naming {last} and repository 'b':\n{}", pg.log_tail(30));
    assert!(log.contains("walvault repo sync --from a --to b"), "the hint says how to catch up:\n{}", pg.log_tail(30));
    pg.stop();
    repair();
    assert!(!object_path(&b, "main", &last).exists(), "{last} was not stored in 'b'");

    let out = wv.walvault(&["repo", "sync", "--from", "a", "--to", "b"]).expect_success("repo sync");
    assert!(out.stdout.contains("synced 'a' -> 'b': copied "), "{out}");
    assert!(!out.stdout.contains("problem:"), "{out}");
    for seg in archived_segments(&pg) {
        let (from_a, from_b) = (td.join(format!("{seg}.a")), td.join(format!("{seg}.b")));
        fetch(&wv, Some("a"), &seg, &from_a).assert_silent_success();
        fetch(&wv, Some("b"), &seg, &from_b).assert_silent_success();
        assert_same_file(&from_a, &from_b);
    }
    let out = wv.walvault(&["verify"]).expect_success("verify of both repositories");
    assert!(!out.stdout.contains("problem:"), "{out}");
    // Nothing left to copy.
    let out = wv.walvault(&["repo", "sync", "--from", "a", "--to", "b"]).expect_success("second repo sync");
    assert!(out.stdout.contains("copied 0 objects"), "{out}");
}

/// (d) archive-fetch falls back to the next repository when the first
/// lacks the file or holds a corrupt copy, answers "missing" only when
/// every repository does, and never when one of them cannot answer.
#[test]
fn fetch_falls_back_and_missing_means_missing_everywhere() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    let config = write_config(&td, "walvault.toml", &[("a", &a, true), ("b", &b, true)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 3);
    let segments = archived_segments(&pg);
    pg.stop();
    let (deleted, corrupted) = (&segments[0], &segments[1]);

    // Deleted from 'a': restored from 'b', identical.
    fs::remove_file(object_path(&a, "main", deleted)).expect("delete from a");
    let (got, want) = (td.join("deleted"), td.join("deleted.b"));
    let out = fetch(&wv, None, deleted, &got);
    out.assert_code(0);
    fetch(&wv, Some("b"), deleted, &want).assert_silent_success();
    assert_same_file(&got, &want);

    // Corrupt in 'a': restored from 'b', with a warning naming 'a'.
    let object = object_path(&a, "main", corrupted);
    let len = fs::metadata(&object).expect("stat").len();
    flip_byte(&object, len - 2);
    let (got, want) = (td.join("corrupted"), td.join("corrupted.b"));
    let out = fetch(&wv, None, corrupted, &got);
    out.assert_code(0);
    assert!(contains_ci(&out.stderr, "warning") && out.stderr.contains("'a'"), "{out}");
    fetch(&wv, Some("b"), corrupted, &want).assert_silent_success();
    assert_same_file(&got, &want);

    // In neither: "missing", quietly.
    let absent = "0000000100000000000000F0";
    let out = fetch(&wv, None, absent, &td.join("absent"));
    out.assert_code(1);
    assert!(out.stderr.is_empty(), "missing is a quiet answer: {out}");
    assert!(!td.join("absent").exists());

    // 'a' unreachable and 'b' without the file: not "missing" (which
    // would end recovery early), an error that names 'a'.
    let moved = td.join("a.moved");
    fs::rename(&a, &moved).expect("take 'a' away");
    let out = fetch(&wv, None, absent, &td.join("absent"));
    assert!(out.code() != 1 && out.code() != 0, "must not answer missing nor success: {out}");
    assert!(out.stderr.contains("'a'") || out.stderr.contains(&a.display().to_string()), "{out}");
    // … while a file 'b' has is still restored.
    let (got, want) = (td.join("fallback"), td.join("fallback.b"));
    fetch(&wv, None, &segments[2], &got).assert_code(0);
    fetch(&wv, Some("b"), &segments[2], &want).assert_silent_success();
    assert_same_file(&got, &want);
    fs::rename(&moved, &a).expect("bring 'a' back");
}

/// (e) restore plans from the first repository and, when that one cannot
/// serve (no backup; unreachable), says so and restores from the next.
#[test]
fn restore_falls_back_to_the_next_repository() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    let config = write_config(&td, "walvault.toml", &[("a", &a, true), ("b", &b, true)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 1);
    // Backups go into the first repository; 'b' gets its own.
    wv.backup(&pg, &["--fast"]).expect_success("backup into a");
    wv.backup(&pg, &["--fast", "--repo", "b"]).expect_success("backup into b");
    pg.psql("INSERT INTO t SELECT g, 'after the backups' FROM generate_series(500000, 500999) g");
    make_wal(&pg, 1);
    let expected = table_checksum(&pg, "t", "id");
    pg.stop();

    // 'a' has no backup any more: restore says so and uses 'b'.
    let backups = a.join("main").join("backups");
    let backups_aside = td.join("a-backups");
    fs::rename(&backups, &backups_aside).expect("take a's backups away");
    let out = wv.restore(&td.join("r1"), &[]);
    assert!(out.success(), "{out}");
    assert!(out.stderr.contains("repository 'a'") && out.stderr.contains("trying 'b'"), "{out}");
    let mut r1 = start_restored(&td, &wv, "r1");
    assert_eq!(table_checksum(&r1, "t", "id"), expected);
    r1.stop();
    fs::rename(&backups_aside, &backups).expect("give a its backups back");

    // 'a' unreachable (the NAS is gone): the same, end to end, the WAL
    // coming from 'b' through restore_command.
    fs::rename(&a, td.join("a.gone")).expect("take 'a' away");
    let out = wv.restore(&td.join("r2"), &[]);
    assert!(out.success(), "{out}");
    assert!(out.stderr.contains("repository 'a'") && out.stderr.contains("trying 'b'"), "{out}");
    let mut r2 = start_restored(&td, &wv, "r2");
    assert_eq!(table_checksum(&r2, "t", "id"), expected);
    r2.stop();
}

/// Starts a data directory `walvault restore` wrote, without archiving,
/// and waits until recovery has finished.
fn start_restored(td: &TestDir, wv: &Walvault, tag: &str) -> PgCluster {
    let mut pg = PgCluster::existing(td, tag, &td.join(tag));
    pg.append_conf("archive_mode = off");
    pg.start(&wv.server_env());
    pg.wait_promoted(Duration::from_secs(300));
    pg
}

/// (f) info has a section per repository (and `repositories` in JSON);
/// verify names the repository of a problem and fails.
#[test]
fn info_and_verify_report_each_repository() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    let config = write_config(&td, "walvault.toml", &[("a", &a, true), ("b", &b, false)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    let last = make_wal(&pg, 2);
    pg.stop();

    let out = wv.walvault(&["info"]).expect_success("info");
    assert!(out.stdout.contains(&format!("repository 'a' ({}, required)", a.display())), "{out}");
    assert!(out.stdout.contains(&format!("repository 'b' ({}, optional)", b.display())), "{out}");
    let info = wv.info_json();
    let repos = info["repositories"].as_array().expect("repositories");
    assert_eq!(repos.len(), 2, "{info:#}");
    assert_eq!((repos[0]["name"].as_str(), repos[1]["name"].as_str()), (Some("a"), Some("b")));
    assert_eq!((repos[0]["required"].as_bool(), repos[1]["required"].as_bool()), (Some(true), Some(false)));
    assert!(repos.iter().all(|r| r["info"].is_object()), "{info:#}");

    wv.walvault(&["verify"]).expect_success("verify of two sound repositories");
    let object = object_path(&b, "main", &last);
    let len = fs::metadata(&object).expect("stat").len();
    flip_byte(&object, len - 2);
    let out = wv.walvault(&["verify"]);
    out.assert_code(1);
    let problems: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("problem:")).collect();
    assert_eq!(problems.len(), 1, "{out}");
    assert!(problems[0].starts_with("problem: [b] ") && problems[0].contains(&last), "{out}");
    wv.walvault(&["verify", "--repo", "a"]).expect_success("verify of the sound repository alone");

    // An unreachable repository: its section shows the error; info fails.
    fs::rename(&b, td.join("b.gone")).expect("take 'b' away");
    let out = wv.walvault(&["info"]);
    out.assert_code(1);
    assert!(out.stdout.contains("repository 'a' (") && out.stdout.contains("repository 'b' ("), "{out}");
}

/// (g) `repo sync` copies a backup and its WAL into a new, empty
/// repository, which then restores on its own; `--dry-run` writes nothing.
#[test]
fn sync_seeds_a_new_repository_that_restores_alone() {
    let td = TestDir::new();
    let (a, b) = (td.join("a"), td.join("b"));
    // The server archives into 'a' alone; 'b' is added later (a new
    // offsite copy).
    let config = write_config(&td, "walvault.toml", &[("a", &a, true)]);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 1);
    wv.backup(&pg, &["--fast"]).expect_success("backup");
    pg.psql("INSERT INTO t SELECT g, 'after the backup' FROM generate_series(700000, 700999) g");
    make_wal(&pg, 1);
    let expected = table_checksum(&pg, "t", "id");
    pg.stop();

    let both = write_config(&td, "both.toml", &[("a", &a, true), ("b", &b, false)]);
    let wv = wv.with_config(&both);
    let out = wv.walvault(&["repo", "sync", "--from", "a", "--to", "b", "--dry-run"]).expect_success("dry run");
    assert!(out.stdout.contains("would"), "{out}");
    assert!(!b.exists() || fs::read_dir(&b).expect("list b").next().is_none(), "a dry run writes nothing");

    let out = wv.walvault(&["repo", "sync", "--from", "a", "--to", "b"]).expect_success("repo sync");
    assert!(out.stdout.contains("synced 'a' -> 'b': copied ") && out.stdout.contains("1 backup"), "{out}");
    let out = wv.walvault(&["repo", "sync", "--from", "a", "--to", "b", "--json"]).expect_success("sync --json");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(report["copied"]["backups"].as_u64(), Some(0), "{report:#}");
    wv.walvault(&["verify", "--repo", "b"]).expect_success("verify of the new copy");

    // 'a' is gone; 'b' alone restores.
    fs::rename(&a, td.join("a.gone")).expect("take 'a' away");
    let (mut restored, _) = restore_and_start(&td, &wv, "restored", &["--repo", "b"], false);
    assert_eq!(table_checksum(&restored, "t", "id"), expected);
    restored.stop();
}

/// The setup the feature is for: a local repository (required) and an
/// offsite bucket (optional, with its own `[repositories.s3]` table).
/// archive-push writes both; a backup taken into the local one reaches the
/// bucket with `repo sync`; with the local repository lost, `restore` falls
/// back to the bucket by itself and PostgreSQL replays from it to the same
/// table contents.
#[test]
fn a_local_and_an_offsite_s3_repository() {
    use walvault_integration::s3::MotoServer;
    let Some(moto) = MotoServer::start() else { return };
    moto.create_bucket("offsite");
    let td = TestDir::new();
    let local = td.join("nas");
    let creds = moto.write_credentials(td.path());
    let text = format!(
        "cluster = \"main\"\ncatalog = {}\n\n[[repositories]]\nname = \"nas\"\nlocation = {}\n\n\
         [[repositories]]\nname = \"offsite\"\nlocation = \"s3://offsite/db1\"\nrequired = false\n\
         [repositories.s3]\nendpoint = \"{}\"\npath-style = true\nallow-http = true\ncredentials-file = {}\n\
         request-timeout = \"10s\"\nretry-budget = \"20s\"\n",
        toml_string(&td.join("catalog.db").to_string_lossy()),
        toml_string(&local.to_string_lossy()),
        moto.endpoint(),
        toml_string(&creds.to_string_lossy()),
    );
    let config = td.write("walvault.toml", text);
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    make_wal(&pg, 1);
    wv.backup(&pg, &["--fast"]).expect_success("backup into the first repository");
    pg.psql("INSERT INTO t SELECT g, 'after the backup' FROM generate_series(800000, 800999) g");
    let last = make_wal(&pg, 1);
    let expected = table_checksum(&pg, "t", "id");
    let segments = archived_segments(&pg);
    pg.stop();

    // Every segment is in the bucket too, byte-identical to the NAS's copy.
    let (dest, from_nas) = (td.join("fetched"), td.join("from-nas"));
    for name in &segments {
        fetch(&wv, Some("offsite"), name, &dest).assert_silent_success();
        fetch(&wv, Some("nas"), name, &from_nas).assert_silent_success();
        assert_same_file(&from_nas, &dest);
        fs::remove_file(&dest).expect("remove");
        fs::remove_file(&from_nas).expect("remove");
    }
    assert!(segments.contains(&last), "{segments:?}");

    // The backup reaches the bucket with repo sync; a second sync copies
    // nothing.
    let out = wv.walvault(&["repo", "sync", "--from", "nas", "--to", "offsite"]).expect_success("repo sync");
    assert!(out.stdout.contains("1 backup"), "{out}");
    let out = wv.walvault(&["repo", "sync", "--from", "nas", "--to", "offsite", "--json"]).expect_success("again");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(report["copied"]["backups"].as_u64(), Some(0), "{report:#}");
    wv.walvault(&["verify", "--repo", "offsite"]).expect_success("verify of the bucket");
    let info = wv.info_json();
    let repos = info["repositories"].as_array().expect("repositories");
    assert_eq!(repos[1]["info"]["backups"].as_array().map(Vec::len), Some(1), "{info:#}");

    // The NAS is lost: restore falls back to the bucket, and recovery
    // reads WAL from it alone.
    fs::rename(&local, td.join("nas.lost")).expect("lose the NAS");
    let restore = wv.restore(&td.join("restored"), &[]);
    assert!(restore.success(), "restore from the bucket: {restore}");
    assert!(restore.stderr.contains("trying 'offsite'"), "{restore}");
    let mut restored = start_restored(&td, &wv, "restored");
    assert_eq!(table_checksum(&restored, "t", "id"), expected, "restored from the offsite bucket");
    restored.stop();
}
