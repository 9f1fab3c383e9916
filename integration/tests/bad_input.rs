//! Bad input gets a clear error and loses nothing (design invariant 8), and
//! "missing" and "broken" are different answers (invariant 5).
//!
//! Most tests need no server: they push copies of the first WAL segment of a
//! freshly initdb'd cluster. Every test checks the exit code, the message and
//! that nothing was lost or changed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;

use walvault_integration::{
    Cmd, Config, FIRST_SEGMENT, PgCluster, TestDir, Walvault, assert_same_file, assert_same_tree,
    chown_tree_to_pg_user, flip_byte, in_ci, is_root, object_path, overwrite_file, pg_os_user, pseudo_random_bytes,
    read_bytes, read_dir_sorted, run, snapshot_tree,
};

/// A cluster initdb'd (not started), a repository bound to it with
/// `walvault init`, and a copy of its first segment at `<td>/in/<name>`.
struct Fx {
    pg: PgCluster,
    wv: Walvault,
    repo: PathBuf,
    catalog: PathBuf,
    /// `<td>/in/000000010000000000000001`.
    seg: PathBuf,
    /// `<td>/out`, where fetched files go.
    out: PathBuf,
    td: TestDir,
}

impl Fx {
    fn new() -> Fx {
        let td = TestDir::new();
        let pg = PgCluster::initdb(&td, "pg", &[]);
        let repo = td.join("repo");
        let catalog = td.join("catalog.db");
        let config = Config::new(&repo, &catalog).write(&td, "walvault.toml");
        let wv = Walvault::new(&td, &config);
        wv.init(pg.datadir()).expect_success("walvault init");
        let seg = td.copy_in(&pg.datadir().join("pg_wal").join(FIRST_SEGMENT), format!("in/{FIRST_SEGMENT}"));
        let out = td.mkdir("out");
        Fx { pg, wv, repo, catalog, seg, out, td }
    }

    fn config(&self) -> Config {
        Config::new(&self.repo, &self.catalog)
    }

    /// The same binaries with a variant of the configuration written to `rel`.
    fn wv_with(&self, rel: &str, edit: impl FnOnce(&mut Config)) -> Walvault {
        let mut config = self.config();
        edit(&mut config);
        self.wv.with_config(&config.write(&self.td, rel))
    }

    fn object(&self, name: &str) -> PathBuf {
        object_path(&self.repo, "main", name)
    }

    fn dest(&self) -> PathBuf {
        self.out.join("RECOVERYXLOG")
    }

    /// A directory with a `standby.signal`, to run archive-fetch in.
    fn standby_cwd(&self) -> PathBuf {
        let dir = self.td.mkdir("standby");
        self.td.write("standby/standby.signal", b"");
        dir
    }

    /// Pushes the first segment and checks it comes back.
    fn push_first_segment(&self) {
        self.wv.push(&self.seg).assert_silent_success();
        assert!(self.object(FIRST_SEGMENT).is_file(), "no object after a successful push");
    }

    /// The fetch did not leave anything in the output directory.
    #[track_caller]
    fn assert_out_empty(&self, out: &Cmd) {
        let left = read_dir_sorted(&self.out);
        assert!(left.is_empty(), "archive-fetch left files behind after failing: {left:?}\n{out}");
    }

    /// Fetches `name` and checks it is byte-identical to `original`.
    #[track_caller]
    fn assert_fetches_as(&self, wv: &Walvault, name: &str, original: &Path) {
        let dest = self.dest();
        wv.fetch(name, &dest).assert_silent_success();
        assert_same_file(original, &dest);
        fs::remove_file(&dest).expect("remove the fetched file");
    }
}

/// archive-push failed as the contract says: exit 1, nothing on stdout, one
/// `archive-push: error: …` line containing one of `needles`, optionally
/// followed by one `HINT: …` line.
#[track_caller]
fn assert_push_error(out: &Cmd, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "archive-push must exit 1\n{out}");
    assert!(out.stdout.is_empty(), "archive-push printed on stdout\n{out}");
    let lines = out.stderr_lines();
    assert!(
        !lines.is_empty() && lines.len() <= 2,
        "archive-push must print one error line, optionally one HINT line\n{out}"
    );
    assert!(lines[0].starts_with("archive-push: error: "), "first line must be `archive-push: error: …`\n{out}");
    if let Some(hint) = lines.get(1) {
        assert!(hint.starts_with("HINT: "), "second line must be `HINT: …`\n{out}");
    }
    assert!(needles.iter().any(|n| lines[0].contains(n)), "the error line should contain one of {needles:?}\n{out}");
}

/// archive-fetch refused with exit 255 (abort recovery), saying `needle`.
#[track_caller]
fn assert_fetch_abort(out: &Cmd, needle: &str) {
    assert_eq!(out.status.code(), Some(255), "archive-fetch must exit 255 (abort recovery)\n{out}");
    assert!(out.stdout.is_empty(), "archive-fetch printed on stdout\n{out}");
    assert!(out.stderr.starts_with("archive-fetch: error: "), "stderr must start with `archive-fetch: error: `\n{out}");
    assert!(out.stderr.contains(needle), "stderr should contain {needle:?}\n{out}");
}

/// archive-fetch failed with exit 1 but loudly (standby or retry mode).
#[track_caller]
fn assert_fetch_loud_retry(out: &Cmd, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "archive-fetch must exit 1 (retry later)\n{out}");
    assert!(out.stdout.is_empty(), "archive-fetch printed on stdout\n{out}");
    assert!(out.stderr.contains(needle), "a loud error containing {needle:?} is expected\n{out}");
}

/// archive-fetch said "not in the archive": exit 1, no output at all.
#[track_caller]
fn assert_fetch_missing(out: &Cmd) {
    assert_eq!(out.status.code(), Some(1), "archive-fetch must exit 1 for a missing file\n{out}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "a missing file is not an error: no output\n{out}");
}

// ---------------------------------------------------------------------------

#[test]
fn push_and_fetch_round_trip_silently_and_push_is_idempotent() {
    let fx = Fx::new();
    fx.push_first_segment();
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);

    // PostgreSQL retries after a crash: the same content again is a success
    // that changes nothing.
    let before = snapshot_tree(&fx.repo);
    fx.wv.push(&fx.seg).assert_silent_success();
    // …also with %p relative to the data directory, as the server passes it.
    fx.wv.push_in(fx.pg.datadir(), format!("pg_wal/{FIRST_SEGMENT}")).assert_silent_success();
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
    assert!(fx.seg.is_file(), "archive-push must not remove its input");
}

#[test]
fn partial_backup_and_history_files_round_trip() {
    // PostgreSQL also archives timeline history files, backup history files
    // (after pg_basebackup) and .partial segments (when a standby is promoted).
    let fx = Fx::new();
    let seg_bytes = read_bytes(&fx.seg);
    let files = [
        (format!("{FIRST_SEGMENT}.partial"), seg_bytes),
        (
            "000000010000000000000001.00000028.backup".to_owned(),
            b"START WAL LOCATION: 0/1000028 (file 000000010000000000000001)\n\
              STOP WAL LOCATION: 0/1000100 (file 000000010000000000000001)\n\
              CHECKPOINT LOCATION: 0/1000060\n\
              BACKUP METHOD: streamed\n\
              BACKUP FROM: primary\n\
              START TIME: 2024-01-01 00:00:00 UTC\n\
              LABEL: pg_basebackup base backup\n\
              START TIMELINE: 1\n\
              STOP TIME: 2024-01-01 00:00:01 UTC\n\
              STOP TIMELINE: 1\n"
                .to_vec(),
        ),
        ("00000002.history".to_owned(), b"1\t0/3000000\tno recovery target specified\n".to_vec()),
    ];
    for (name, content) in &files {
        let path = fx.td.write(format!("kinds/{name}"), content);
        fx.wv.push(&path).assert_silent_success();
        fx.wv.push(&path).assert_silent_success();
        fx.assert_fetches_as(&fx.wv, name, &path);
    }
    assert!(fx.object("00000002.history").is_file(), "history files live in wal/history/");
    // The stored history file is listed by info.
    let info = fx.wv.info_json();
    let history = info["history_files"].as_array().expect("history_files is an array");
    assert!(history.iter().any(|h| h == "00000002.history"), "{info}");
}

#[test]
fn init_is_idempotent_and_refuses_another_cluster() {
    let fx = Fx::new();
    let info = fx.wv.info_json();
    assert!(info["newest"].is_null(), "nothing archived yet: {info}");
    assert_eq!(info["timelines"].as_array().map(Vec::len), Some(0), "{info}");

    fx.wv.init(fx.pg.datadir()).expect_success("walvault init again for the same cluster");
    fx.push_first_segment();
    fx.wv.init(fx.pg.datadir()).expect_success("walvault init again after a push");

    let before = snapshot_tree(&fx.repo);
    let other = PgCluster::initdb(&fx.td, "other", &[]);
    let out = fx.wv.init(other.datadir());
    assert!(!out.success(), "init must refuse a different cluster\n{out}");
    assert!(out.stderr.contains("another cluster"), "the error should say it is another cluster\n{out}");

    let not_pgdata = fx.td.mkdir("not-pgdata");
    let out = fx.wv.init(&not_pgdata);
    assert!(!out.success() && !out.stderr.is_empty(), "init of a non-data directory must fail\n{out}");
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));

    // The parent of a new repository must exist.
    let wv = fx.wv_with("deep.toml", |c| c.repository = fx.td.join("no/such/parent/repo"));
    let out = wv.init(fx.pg.datadir());
    assert!(!out.success(), "init must not create missing parents\n{out}");
    assert!(out.stderr.contains("does not exist"), "{out}");
    assert!(!fx.td.join("no").exists(), "init created directories it should not have");

    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn push_of_a_missing_file_fails() {
    let fx = Fx::new();
    let before = snapshot_tree(&fx.repo);
    let missing = fx.td.join("in/000000010000000000000002");
    let out = fx.wv.push(&missing);
    assert_push_error(&out, &["does not exist", "unable to read"]);
    assert!(out.stderr.contains("000000010000000000000002"), "the message should name the file\n{out}");
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
}

#[test]
fn push_of_an_unreadable_path_fails_and_keeps_the_file() {
    let fx = Fx::new();
    let before = snapshot_tree(&fx.repo);

    // A directory named like a segment.
    let dir = fx.td.mkdir("dirs/000000010000000000000002");
    assert_push_error(&fx.wv.push(&dir), &["unable to read"]);

    // A file the postgres user may not read.
    let original = read_bytes(&fx.seg);
    fs::set_permissions(&fx.seg, fs::Permissions::from_mode(0o000)).expect("chmod 000");
    let out = fx.wv.push(&fx.seg);
    fs::set_permissions(&fx.seg, fs::Permissions::from_mode(0o644)).expect("chmod 644");
    assert_push_error(&out, &["unable to read"]);
    assert!(read_bytes(&fx.seg) == original, "the input file was changed");

    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
    // Readable again, it is archived normally.
    fx.push_first_segment();
}

#[test]
fn push_of_a_truncated_segment_fails() {
    let fx = Fx::new();
    let full = read_bytes(&fx.seg);
    let before = snapshot_tree(&fx.repo);
    for len in [0, 20, 8192, full.len() / 2, full.len() - 1] {
        let path = fx.td.write(format!("trunc-{len}/{FIRST_SEGMENT}"), &full[..len]);
        let out = fx.wv.push(&path);
        assert_push_error(&out, &["is not a valid WAL segment"]);
        assert_eq!(read_bytes(&path).len(), len, "the input file was changed");
    }
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
    // The truncated attempts did not poison the name.
    fx.push_first_segment();
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn push_of_a_file_that_is_not_wal_fails() {
    let fx = Fx::new();
    let size = read_bytes(&fx.seg).len();
    let before = snapshot_tree(&fx.repo);
    let text: Vec<u8> = b"this is not a WAL segment\n".iter().copied().cycle().take(size).collect();
    let zeros = vec![0u8; size];
    for (what, content) in [("random", pseudo_random_bytes(size, 42)), ("text", text), ("zeros", zeros)] {
        let path = fx.td.write(format!("{what}/{FIRST_SEGMENT}"), &content);
        assert_push_error(&fx.wv.push(&path), &["is not a valid WAL segment"]);
        assert!(read_bytes(&path) == content, "the input file was changed");
    }
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
}

#[test]
fn push_of_a_segment_of_another_cluster_fails() {
    let fx = Fx::new();
    let other = PgCluster::initdb(&fx.td, "other", &[]);
    let foreign =
        fx.td.copy_in(&other.datadir().join("pg_wal").join(FIRST_SEGMENT), format!("foreign/{FIRST_SEGMENT}"));
    let before = snapshot_tree(&fx.repo);
    assert_push_error(&fx.wv.push(&foreign), &["belongs to another cluster"]);
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));

    // Also when this cluster's segment of the same name is already archived.
    fx.push_first_segment();
    let before = snapshot_tree(&fx.repo);
    assert_push_error(&fx.wv.push(&foreign), &["belongs to another cluster"]);
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn push_of_different_content_under_an_archived_name_fails() {
    let fx = Fx::new();
    fx.push_first_segment();
    let original = read_bytes(&fx.seg);
    let before = snapshot_tree(&fx.repo);

    let changed = fx.td.copy_in(&fx.seg, format!("changed/{FIRST_SEGMENT}"));
    flip_byte(&changed, original.len() as u64 / 2);
    let changed_bytes = read_bytes(&changed);
    let out = fx.wv.push(&changed);
    assert_push_error(&out, &["already archived with different content"]);
    let (old_hash, new_hash) = (blake3::hash(&original).to_hex(), blake3::hash(&changed_bytes).to_hex());
    assert!(
        out.stderr.contains(old_hash.as_str()) && out.stderr.contains(new_hash.as_str()),
        "the message should name both BLAKE3 hashes ({old_hash} archived, {new_hash} new)\n{out}"
    );
    assert!(read_bytes(&changed) == changed_bytes, "the input file was changed");
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);

    // The original is still accepted as already archived.
    fx.wv.push(&fx.seg).assert_silent_success();
}

#[test]
fn unusable_repositories_are_errors_for_push_and_fetch() {
    let fx = Fx::new();
    fx.push_first_segment();
    let standby = fx.standby_cwd();

    // A repository path that does not exist: push fails, fetch aborts (it must
    // not look like "missing" to PostgreSQL), and nothing is created.
    let gone = fx.td.join("gone");
    let wv = fx.wv_with("gone.toml", |c| c.repository = gone.clone());
    let out = wv.push(&fx.seg);
    assert_push_error(&out, &["does not exist"]);
    assert!(out.stderr.contains(&*gone.to_string_lossy()), "the message should name the repository\n{out}");
    let out = wv.fetch(FIRST_SEGMENT, fx.dest());
    assert_fetch_abort(&out, "does not exist");
    fx.assert_out_empty(&out);
    let out = wv.fetch_in(&standby, FIRST_SEGMENT, fx.dest());
    assert_fetch_loud_retry(&out, "does not exist");
    fx.assert_out_empty(&out);
    let out = wv.fetch("00000002.history", fx.dest());
    assert_fetch_abort(&out, "does not exist");
    assert!(!gone.exists(), "push or fetch created the missing repository");

    // A directory that is not a repository.
    let plain = fx.td.mkdir("plain");
    fx.td.write("plain/some-file", b"hello");
    let before = snapshot_tree(&plain);
    let wv = fx.wv_with("plain.toml", |c| c.repository = plain.clone());
    assert_push_error(&wv.push(&fx.seg), &["is not a walvault repository"]);
    let out = wv.fetch(FIRST_SEGMENT, fx.dest());
    assert_fetch_abort(&out, "is not a walvault repository");
    fx.assert_out_empty(&out);
    assert_same_tree("the plain directory", &before, &snapshot_tree(&plain));

    // A repository in which this cluster name was never initialized.
    let before = snapshot_tree(&fx.repo);
    let wv = fx.wv_with("other-cluster.toml", |c| c.cluster = Some("other".to_owned()));
    assert_push_error(&wv.push(&fx.seg), &["is not initialized"]);
    let out = wv.fetch(FIRST_SEGMENT, fx.dest());
    assert_fetch_abort(&out, "is not initialized");
    fx.assert_out_empty(&out);
    // Same through the --cluster flag.
    let out = fx.wv.run("archive-push", &["--cluster".as_ref(), "other".as_ref(), fx.seg.as_os_str()]);
    assert_push_error(&out, &["is not initialized"]);
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));

    // A configuration file that does not exist.
    let wv = fx.wv.with_config(&fx.td.join("no-such.toml"));
    let out = wv.push(&fx.seg);
    assert_push_error(&out, &["does not exist", "unable to read"]);
    assert!(out.stderr.contains("no-such.toml"), "the message should name the configuration file\n{out}");
    let out = wv.fetch(FIRST_SEGMENT, fx.dest());
    assert_eq!(out.status.code(), Some(255), "{out}");
    assert!(out.stderr.contains("no-such.toml"), "{out}");
    fx.assert_out_empty(&out);

    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn push_to_a_repository_that_is_not_writable_fails() {
    let fx = Fx::new();
    // Make every directory of the repository unwritable for the user the
    // binaries run as.
    let dirs: Vec<PathBuf> = snapshot_tree(&fx.repo)
        .iter()
        .filter(|(_, content)| content.is_none())
        .map(|(rel, _)| fx.repo.join(rel))
        .chain(std::iter::once(fx.repo.clone()))
        .collect();
    if is_root() {
        let out = run({
            let mut c = Command::new("chown");
            c.arg("-R").arg("root:root").arg(&fx.repo);
            c
        });
        assert!(out.success(), "{out}");
        for dir in &dirs {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod 755");
        }
    } else {
        for dir in &dirs {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).expect("chmod 555");
        }
    }
    let before = snapshot_tree(&fx.repo);
    let out = fx.wv.push(&fx.seg);
    assert_push_error(&out, &["Permission denied", "permission denied"]);
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));

    // Writable again: the push succeeds (no stale lock or temporary file).
    if is_root() {
        chown_tree_to_pg_user(&fx.repo);
    } else {
        for dir in &dirs {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod 755");
        }
    }
    fx.push_first_segment();
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

/// Unmounts a tmpfs on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        for args in [&["umount"][..], &["umount", "-l"][..]] {
            let mut cmd = Command::new(args[0]);
            cmd.args(&args[1..]).arg(&self.0);
            if run(cmd).success() {
                return;
            }
        }
        eprintln!("warning: cannot unmount {}", self.0.display());
    }
}

#[test]
fn push_to_a_full_disk_fails_cleanly_and_succeeds_once_there_is_space() {
    if !is_root() {
        assert!(!in_ci(), "the full-disk test mounts a tmpfs and must run as root in CI");
        eprintln!("note: push_to_a_full_disk… needs root (to mount a tmpfs); not run");
        return;
    }
    let fx = Fx::new();
    // How big is the stored object? (Pushed to the normal repository.)
    fx.push_first_segment();
    let object_size = fs::metadata(fx.object(FIRST_SEGMENT)).expect("stat object").len();

    let mnt = fx.td.mkdir("small");
    let user = pg_os_user().expect("root runs PostgreSQL as postgres");
    let size_kib = (3 * 1024).max((2 * object_size) / 1024 + 1024);
    let out = run({
        let mut c = Command::new("mount");
        c.args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_kib}k,mode=0755,uid={},gid={}", user.uid, user.gid))
            .arg("tmpfs")
            .arg(&mnt);
        c
    });
    if !out.success() {
        // Root without CAP_SYS_ADMIN (an unprivileged container).
        assert!(!in_ci(), "cannot mount a tmpfs (CI must run as root on a machine that allows it)\n{out}");
        eprintln!("note: push_to_a_full_disk… cannot mount a tmpfs here; not run\n{out}");
        return;
    }
    let _mount = Mount(mnt.clone());

    let repo = mnt.join("repo");
    let wv = fx.wv_with("small.toml", |c| {
        c.repository = repo.clone();
        c.catalog = fx.td.join("small-catalog.db");
    });
    wv.init(fx.pg.datadir()).expect_success("walvault init on the tmpfs");

    // Fill the file system, then leave half an object's worth of space.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).expect("create filler");
        let chunk = vec![0xa5u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().expect("stat filler").len();
        f.set_len(len.saturating_sub(object_size / 2)).expect("shrink filler");
    }
    // Empty directories it may create are fine; files are not.
    let files = |repo: &Path| {
        let mut tree = snapshot_tree(repo);
        tree.retain(|_, content| content.is_some());
        tree
    };
    let before = files(&repo);
    let out = wv.push(&fx.seg);
    assert_push_error(&out, &["No space left on device"]);
    assert_same_tree(
        "the files of the repository on the full disk (no object, no temporary file)",
        &before,
        &files(&repo),
    );
    assert_eq!(read_dir_sorted(&mnt), [filler.clone(), repo.clone()], "files left on the full disk");
    assert!(fx.seg.is_file());

    fs::remove_file(&filler).expect("remove filler");
    wv.push(&fx.seg).assert_silent_success();
    assert!(object_path(&repo, "main", FIRST_SEGMENT).is_file());
    fx.assert_fetches_as(&wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn fetch_of_a_corrupt_object_aborts_unless_standby_or_retry() {
    let fx = Fx::new();
    fx.push_first_segment();
    let object = fx.object(FIRST_SEGMENT);
    let original = read_bytes(&object);
    let standby = fx.standby_cwd();
    let abort = fx.wv_with("abort.toml", |c| c.fetch_on_error = Some("abort".to_owned()));
    let retry = fx.wv_with("retry.toml", |c| c.fetch_on_error = Some("retry".to_owned()));
    let auto = fx.wv_with("auto.toml", |c| c.fetch_on_error = Some("auto".to_owned()));

    let len = original.len();
    let corruptions: Vec<(&str, Vec<u8>)> = vec![
        ("a flipped byte in the middle", {
            let mut b = original.clone();
            b[len / 2] ^= 0xff;
            b
        }),
        ("a flipped last byte", {
            let mut b = original.clone();
            b[len - 1] ^= 0x01;
            b
        }),
        ("a flipped first byte", {
            let mut b = original.clone();
            b[0] ^= 0xff;
            b
        }),
        ("truncated to half", original[..len / 2].to_vec()),
        ("truncated to 10 bytes", original[..10.min(len)].to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in corruptions {
        overwrite_file(&object, &bytes);
        let ctx = format!("object {what}");
        eprintln!("corruption: {ctx}");

        let out = fx.wv.fetch(FIRST_SEGMENT, fx.dest());
        assert_fetch_abort(&out, "is corrupt");
        fx.assert_out_empty(&out);
        let out = auto.fetch(FIRST_SEGMENT, fx.dest());
        assert_fetch_abort(&out, "is corrupt");
        fx.assert_out_empty(&out);

        // On a standby, exit 1 keeps it retrying instead of shutting down.
        let out = fx.wv.fetch_in(&standby, FIRST_SEGMENT, fx.dest());
        assert_fetch_loud_retry(&out, "is corrupt");
        fx.assert_out_empty(&out);
        let out = abort.fetch_in(&standby, FIRST_SEGMENT, fx.dest());
        assert_fetch_abort(&out, "is corrupt");
        fx.assert_out_empty(&out);
        let out = retry.fetch(FIRST_SEGMENT, fx.dest());
        assert_fetch_loud_retry(&out, "is corrupt");
        fx.assert_out_empty(&out);

        assert!(read_bytes(&object) == bytes, "archive-fetch changed the corrupt object ({ctx})");
    }

    overwrite_file(&object, &original);
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn push_does_not_take_a_corrupt_object_for_an_identical_one() {
    // PostgreSQL pushes a segment again after a crash. If the stored object of
    // that name is damaged, "already archived" would be a lie: the push must
    // either replace it with the genuine content or fail.
    let fx = Fx::new();
    fx.push_first_segment();
    let object = fx.object(FIRST_SEGMENT);
    let original = read_bytes(&object);
    let len = original.len();
    for (what, offset) in [("middle", len / 2), ("last byte", len - 1)] {
        overwrite_file(&object, &original);
        flip_byte(&object, offset as u64);
        let out = fx.wv.push(&fx.seg);
        if out.success() {
            assert!(
                read_bytes(&object) == original,
                "archive-push exited 0 over an object with a flipped byte ({what}) without repairing it\n{out}"
            );
        } else {
            assert_push_error(&out, &["is corrupt"]);
        }
    }
}

#[test]
fn fetch_of_a_missing_file_is_quiet() {
    let fx = Fx::new();
    // Nothing archived yet, then one segment archived.
    for pushed in [false, true] {
        if pushed {
            fx.push_first_segment();
        }
        for name in ["000000010000000000000002", "00000002.history", "000000020000000000000001"] {
            let out = fx.wv.fetch(name, fx.dest());
            assert_fetch_missing(&out);
            fx.assert_out_empty(&out);
            // Also on a standby, and in every mode.
            let out = fx.wv.fetch_in(&fx.standby_cwd(), name, fx.dest());
            assert_fetch_missing(&out);
            fx.assert_out_empty(&out);
        }
    }
    let retry = fx.wv_with("retry.toml", |c| c.fetch_on_error = Some("retry".to_owned()));
    let out = retry.fetch("000000010000000000000002", fx.dest());
    assert_fetch_missing(&out);
    fx.assert_out_empty(&out);
}

#[test]
fn malicious_and_unknown_names_are_refused() {
    let fx = Fx::new();
    fx.push_first_segment();
    let seg_bytes = read_bytes(&fx.seg);
    let before = snapshot_tree(&fx.repo);
    let long = "0".repeat(200);

    // archive-push: the name comes from %p's last component.
    fx.td.write("x", &seg_bytes);
    fx.td.write(format!("in/{long}"), &seg_bytes);
    fx.td.write("in/00000001000000000000000G", &seg_bytes);
    fx.td.write("in/00000001000000000000000a", &seg_bytes);
    let in_dir = fx.td.join("in");
    for (p, needles) in [
        (in_dir.join("../x"), &["invalid WAL file name"][..]),
        (in_dir.join(&long), &["invalid WAL file name"][..]),
        (in_dir.join("00000001000000000000000G"), &["invalid WAL file name"][..]),
        (in_dir.join("00000001000000000000000a"), &["invalid WAL file name"][..]),
        (
            in_dir.join(format!("{FIRST_SEGMENT}/../../x")),
            &["invalid WAL file name", "unable to read", "does not exist"][..],
        ),
    ] {
        let out = fx.wv.push(&p);
        assert_push_error(&out, needles);
    }
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));

    // archive-fetch: %f is used to build paths; it must never escape.
    let dest_root_before = read_dir_sorted(fx.td.path());
    for name in [
        "../x".to_owned(),
        long.clone(),
        format!("{FIRST_SEGMENT}/../../x"),
        "../../../../../../etc/passwd".to_owned(),
        "00000001000000000000000G".to_owned(),
        "0000000100000000/000000010000000000000001".to_owned(),
    ] {
        let out = fx.wv.fetch(&name, fx.dest());
        assert!(matches!(out.status.code(), Some(1) | Some(255)), "archive-fetch {name:?} must exit 1 or 255\n{out}");
        assert!(
            out.stderr.contains("invalid WAL file name"),
            "archive-fetch {name:?}: a clear error is expected\n{out}"
        );
        fx.assert_out_empty(&out);
    }
    assert_eq!(read_dir_sorted(fx.td.path()), dest_root_before, "archive-fetch created files");
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
}

#[test]
fn empty_arguments_get_the_standard_error_format() {
    let fx = Fx::new();
    fx.push_first_segment();
    let before = snapshot_tree(&fx.repo);
    assert_push_error(&fx.wv.push(""), &["invalid WAL file name", "unable to read", "does not exist"]);
    let out = fx.wv.fetch("", fx.dest());
    assert!(matches!(out.status.code(), Some(1) | Some(255)), "archive-fetch '' must exit 1 or 255\n{out}");
    assert!(out.stderr.contains("invalid WAL file name"), "{out}");
    fx.assert_out_empty(&out);
    let out = fx.wv.fetch(FIRST_SEGMENT, "");
    assert!(matches!(out.status.code(), Some(1) | Some(255)), "archive-fetch NAME '' must fail\n{out}");
    assert!(out.stderr.starts_with("archive-fetch: error: "), "{out}");
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
}

#[test]
fn invalid_configuration_files_are_reported_with_path_and_detail() {
    let fx = Fx::new();
    fx.push_first_segment();
    let good = fx.config().to_toml();
    let syntax_line = good.lines().count() + 1;
    // (what, file content, the message must contain one of these)
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        ("syntax", format!("{good}compress-level = \n"), vec![format!("line {syntax_line}")]),
        (
            "type",
            format!("{good}compress-level = \"high\"\n"),
            vec!["compress-level".to_owned(), format!("line {syntax_line}")],
        ),
        ("unknown-key", good.replace("repository", "repositry"), vec!["repositry".to_owned()]),
        (
            "mode",
            format!("{good}fetch-on-error = \"sometimes\"\n"),
            vec!["fetch-on-error".to_owned(), format!("line {syntax_line}")],
        ),
        ("norepo", format!("catalog = \"{}\"\n", fx.catalog.display()), vec!["repository".to_owned()]),
    ];
    let before = snapshot_tree(&fx.repo);
    let config = fx.wv.config().expect("a config file").to_path_buf();
    for (what, text, detail) in cases {
        let path = fx.td.write(format!("bad-{what}.toml"), text);
        let wv = fx.wv.with_config(&path);
        let path_text = path.to_string_lossy();

        // A missing key may be given by a flag: "invalid configuration" is
        // enough there; anything wrong in the file itself is "invalid
        // configuration file".
        let kind = if what == "norepo" { "invalid configuration" } else { "invalid configuration file" };
        let out = wv.push(&fx.seg);
        assert_push_error(&out, &[kind]);
        assert!(out.stderr.contains(&*path_text), "{what}: the message should name {path_text}\n{out}");
        assert!(
            detail.iter().any(|d| out.stderr.contains(d.as_str())),
            "{what}: the message should mention one of {detail:?}\n{out}"
        );

        let out = wv.fetch(FIRST_SEGMENT, fx.dest());
        assert_fetch_abort(&out, kind);
        fx.assert_out_empty(&out);

        let out = wv.walvault(&["info"]);
        assert!(!out.success() && out.stderr.contains(kind), "{what}: walvault info must fail\n{out}");

        // --config wins over WALVAULT_CONFIG: the bad file is not read.
        let out = wv.run("archive-push", &["--config".as_ref(), config.as_os_str(), fx.seg.as_os_str()]);
        out.assert_silent_success();
    }
    assert_same_tree("the repository", &before, &snapshot_tree(&fx.repo));
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
}

#[test]
fn flags_override_the_configuration_file() {
    let fx = Fx::new();
    // The file points at a repository that does not exist; --repository and
    // --catalog fix that.
    let wv = fx.wv_with("elsewhere.toml", |c| {
        c.repository = fx.td.join("nowhere");
        c.catalog = fx.td.join("nowhere.db");
    });
    let flags = ["--repository".as_ref(), fx.repo.as_os_str(), "--catalog".as_ref(), fx.catalog.as_os_str()];
    let mut args = flags.to_vec();
    args.push(fx.seg.as_os_str());
    wv.run("archive-push", &args).assert_silent_success();
    let dest = fx.dest();
    let mut args = flags.to_vec();
    args.push(FIRST_SEGMENT.as_ref());
    args.push(dest.as_os_str());
    wv.run("archive-fetch", &args).assert_silent_success();
    assert_same_file(&fx.seg, &dest);
    assert!(!fx.td.join("nowhere").exists() && !fx.td.join("nowhere.db").exists());

    // No WALVAULT_CONFIG at all: --config is enough.
    let config = fx.wv.config().expect("a config file").to_path_buf();
    let out = fx
        .wv
        .without_config()
        .run("walvault", &["--config".as_ref(), config.as_os_str(), "info".as_ref(), "--json".as_ref()]);
    let out = out.expect_success("walvault --config … info --json");
    assert!(out.stdout.contains(FIRST_SEGMENT), "{out}");
}

#[test]
fn concurrent_pushes_of_the_same_file_store_one_object() {
    const ROUNDS: usize = 20;
    const PROCESSES: usize = 6;
    let mut fx = Fx::new();

    // Real, distinct, complete segments of this cluster.
    fx.pg.append_conf("wal_keep_size = '2GB'\nmax_wal_size = '2GB'");
    fx.pg.start(&[("TZ", "UTC")]);
    fx.pg.psql("CREATE TABLE t (i int)");
    let mut names = Vec::new();
    for i in 0..ROUNDS {
        fx.pg.psql(&format!("INSERT INTO t VALUES ({i})"));
        names.push(fx.pg.switch_wal());
    }
    fx.pg.stop();
    let pg_wal = fx.pg.datadir().join("pg_wal");

    for name in &names {
        let path = pg_wal.join(name);
        let barrier = Arc::new(Barrier::new(PROCESSES));
        let outs: Vec<Cmd> = (0..PROCESSES)
            .map(|_| {
                let (wv, path, barrier) = (fx.wv.clone(), path.clone(), Arc::clone(&barrier));
                thread::spawn(move || {
                    barrier.wait();
                    wv.push(&path)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("push thread"))
            .collect();
        for out in &outs {
            out.assert_silent_success();
        }
        let dir = fx.object(name).parent().expect("object dir").to_path_buf();
        let entries: Vec<String> =
            read_dir_sorted(&dir).iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
        let expected: Vec<String> =
            names.iter().take_while(|n| *n <= name).filter(|n| n[..16] == name[..16]).cloned().collect();
        assert_eq!(entries, expected, "exactly one object per pushed segment, no temporary files");
        fx.assert_fetches_as(&fx.wv, name, &path);
    }
}

#[test]
fn an_unwritable_catalog_does_not_fail_the_push() {
    let fx = Fx::new();
    fx.td.write("afile", b"a regular file, not a directory");
    let wv = fx.wv_with("bad-catalog.toml", |c| c.catalog = fx.td.join("afile/catalog.db"));
    let out = wv.push(&fx.seg);
    assert_eq!(out.status.code(), Some(0), "the catalog is only an index: the push must succeed\n{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.to_lowercase().contains("warning"), "an unusable catalog deserves a warning\n{out}");
    assert!(fx.object(FIRST_SEGMENT).is_file(), "the object must be stored");
    // Again (already archived): still a success.
    assert_eq!(wv.push(&fx.seg).status.code(), Some(0));
    fx.assert_fetches_as(&fx.wv, FIRST_SEGMENT, &fx.seg);
    fx.assert_fetches_as(&wv, FIRST_SEGMENT, &fx.seg);
}
