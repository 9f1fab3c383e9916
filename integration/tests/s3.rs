//! S3 repositories against real S3 servers on 127.0.0.1: the
//! [`S3Storage`] contract and PostgreSQL's WAL archived into a bucket and
//! fetched back, on both moto and s3s-fs; the create-once race on moto
//! (s3s-fs checks `If-None-Match` before writing, not atomically); refused
//! credentials and a missing bucket on s3s-fs, which verifies signatures.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use walvault::config::S3Settings;
use walvault::storage::s3::S3Storage;
use walvault::storage::{PutOutcome, Storage, StorageError};
use walvault_integration::s3::{
    ACCESS_KEY_ID, MotoServer, S3Server, S3sFsServer, SECRET_ACCESS_KEY, write_credentials_file,
};
use walvault_integration::{Config, PgCluster, TestDir, Walvault, assert_same_file};

fn settings(server: &dyn S3Server, td: &TestDir) -> S3Settings {
    S3Settings {
        endpoint: Some(server.endpoint()),
        path_style: true,
        allow_http: true,
        credentials_file: Some(server.write_credentials(td.path())),
        request_timeout_secs: 10,
        retry_budget_secs: 20,
        ..S3Settings::default()
    }
}

#[test]
fn s3_storage_keeps_the_storage_contract_on_moto() {
    let Some(moto) = MotoServer::start() else { return };
    storage_contract(&moto);
}

#[test]
fn s3_storage_keeps_the_storage_contract_on_s3s_fs() {
    let td = TestDir::new();
    let Some(server) = S3sFsServer::start(&td.join("s3s")) else { return };
    storage_contract(&server);
}

/// What every [`Storage`] promises, on `server`, and the conditional-create
/// probe (both servers refuse a second create when it comes after the
/// first).
fn storage_contract(server: &dyn S3Server) {
    let td = TestDir::new();
    server.create_bucket("contract");
    let s = S3Storage::open("s3://contract/some/prefix", &settings(server, &td)).unwrap();
    let loc = s.location();
    assert_eq!(loc, "s3://contract/some/prefix");
    assert!(!loc.contains(SECRET_ACCESS_KEY), "{loc}");

    assert!(s.head("a/b").unwrap().is_none());
    assert!(matches!(s.get("a/b"), Err(StorageError::NotFound { .. })));
    assert!(matches!(s.get_range("a/b", 0, 4), Err(StorageError::NotFound { .. })));
    match s.put_new("a/b", b"hello world").unwrap() {
        PutOutcome::Created(m) => assert_eq!((m.key.as_str(), m.size), ("a/b", 11)),
        PutOutcome::Exists => panic!("first put_new must create"),
    }
    assert_eq!(s.put_new("a/b", b"other bytes").unwrap(), PutOutcome::Exists);
    assert_eq!(s.get("a/b").unwrap(), b"hello world", "an existing object is never modified");
    assert_eq!(s.get_range("a/b", 6, 5).unwrap(), b"world");
    assert_eq!(s.get_range("a/b", 6, 100).unwrap(), b"world", "short object: fewer bytes");
    assert_eq!(s.get_range("a/b", 11, 4).unwrap(), b"", "range at the end");
    assert_eq!(s.get_range("a/b", 50, 4).unwrap(), b"", "range past the end");
    assert_eq!(s.head("a/b").unwrap().unwrap().size, 11);

    s.put_new("a/c", b"x").unwrap();
    s.put_new("ab/d", b"y").unwrap();
    s.put_new("z", b"").unwrap();
    assert_eq!(s.get("z").unwrap(), b"");
    let mut keys: Vec<String> = s.list("a/").unwrap().into_iter().map(|m| m.key).collect();
    keys.sort();
    assert_eq!(keys, ["a/b", "a/c"], "the prefix is a path prefix");
    let mut all: Vec<String> = s.list("").unwrap().into_iter().map(|m| m.key).collect();
    all.sort();
    assert_eq!(all, ["a/b", "a/c", "ab/d", "z"]);

    let m = s.put_replace("a/b", b"replaced").unwrap();
    assert_eq!(m.size, 8);
    assert_eq!(s.get("a/b").unwrap(), b"replaced");
    s.delete("a/b").unwrap();
    s.delete("a/b").unwrap();
    assert!(s.head("a/b").unwrap().is_none());
    assert!(matches!(s.put_new("../x", b""), Err(StorageError::InvalidKey { .. })));

    // The same bucket under another prefix sees nothing of the first.
    let other = S3Storage::open("s3://contract/elsewhere", &settings(server, &td)).unwrap();
    assert!(other.list("").unwrap().is_empty());

    // The store refuses a second create: the probe says so and leaves
    // nothing behind.
    assert!(s.probe_conditional_create().unwrap(), "{} honours If-None-Match: *", server.name());
    let mut left: Vec<String> = s.list("").unwrap().into_iter().map(|m| m.key).collect();
    left.sort();
    assert_eq!(left, ["a/c", "ab/d", "z"], "the probe object is deleted");
}

#[test]
fn concurrent_put_new_creates_exactly_once() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("race");
    let s = Arc::new(S3Storage::open("s3://race/p", &settings(&moto, &td)).unwrap());
    for round in 0..3 {
        let key = format!("k/{round}");
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16u8)
            .map(|i| {
                let (s, barrier, key) = (Arc::clone(&s), Arc::clone(&barrier), key.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (i, s.put_new(&key, &[i; 100]).unwrap())
                })
            })
            .collect();
        let results: Vec<(u8, PutOutcome)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<u8> =
            results.iter().filter(|(_, o)| matches!(o, PutOutcome::Created(_))).map(|(i, _)| *i).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one Created, got {winners:?}");
        assert_eq!(s.get(&key).unwrap(), vec![winners[0]; 100], "the winner's bytes are stored");
    }
}

#[test]
fn no_credentials_is_a_clear_error_not_a_metadata_lookup() {
    if ["AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE"].iter().any(|v| std::env::var_os(v).is_some()) {
        eprintln!("skipping: AWS credentials are set in the environment");
        return;
    }
    let s = S3Settings { endpoint: Some("http://127.0.0.1:9".into()), allow_http: true, ..S3Settings::default() };
    let Err(e) = S3Storage::open("s3://bucket/p", &s) else { panic!("opened without credentials") };
    assert!(e.contains("no credentials"), "{e}");
}

#[test]
fn wal_is_archived_to_moto_fetched_back_and_the_catalog_rebuilt_from_the_bucket() {
    let Some(moto) = MotoServer::start() else { return };
    wal_archive_fetch_rebuild(&moto);
}

#[test]
fn wal_is_archived_to_s3s_fs_fetched_back_and_the_catalog_rebuilt_from_the_bucket() {
    let td = TestDir::new();
    let Some(server) = S3sFsServer::start(&td.join("s3s")) else { return };
    wal_archive_fetch_rebuild(&server);
}

fn wal_archive_fetch_rebuild(moto: &dyn S3Server) {
    let td = TestDir::new();
    moto.create_bucket("wal");
    let creds = moto.write_credentials(td.path());
    let mut text = Config::new("s3://wal/prod", td.join("catalog.db")).to_toml();
    text.push_str(&moto.config_table(&creds));
    let config = td.write("walvault.toml", text);
    let wv = Walvault::new(&td, &config);

    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf("wal_keep_size = '1GB'\narchive_timeout = 0");
    wv.init(pg.datadir()).expect_success("walvault init on s3");
    pg.start(&wv.server_env());
    pg.psql("CREATE TABLE t AS SELECT generate_series(1, 100000) AS i");
    let first = pg.switch_wal();
    pg.psql("INSERT INTO t SELECT generate_series(1, 100000)");
    let last = pg.switch_wal();
    let stats = pg.wait_archived(&last, Duration::from_secs(120));
    assert_eq!(stats.failed_count, 0, "archive-push failed; server log:\n{}", pg.log_tail(40));

    let fetched = td.mkdir("fetched");
    for name in [&first, &last] {
        let dest = fetched.join("RECOVERYXLOG");
        wv.fetch(name, &dest).assert_silent_success();
        assert_same_file(&pg.datadir().join("pg_wal").join(name), &dest);
        fs::remove_file(&dest).unwrap();
    }
    // The objects are in the bucket, under the URL's prefix.
    let s = S3Storage::open("s3://wal/prod", &settings(moto, &td)).unwrap();
    let keys: Vec<String> = s.list("main/wal/").unwrap().into_iter().map(|m| m.key).collect();
    for name in [&first, &last] {
        assert!(keys.iter().any(|k| k.ends_with(name.as_str())), "no object for {name} in {keys:?}");
    }
    assert!(s.head("walvault.repository").unwrap().is_some(), "init wrote the marker");

    // Pushing the same segment again is idempotent (same hash in the header).
    wv.push(pg.datadir().join("pg_wal").join(&last)).expect_success("re-push of an archived segment");

    // The catalog is a cache: the bucket alone rebuilds it.
    fs::remove_file(td.join("catalog.db")).unwrap();
    wv.walvault(&["catalog", "rebuild"]).expect_success("catalog rebuild from s3");
    let info = wv.walvault(&["info"]).expect_success("info");
    let shown = format!("{}{}", info.stdout, info.stderr);
    assert!(!shown.contains(SECRET_ACCESS_KEY), "a secret in info: {shown}");
    pg.stop();
}

#[test]
fn an_unreachable_or_silent_store_fails_within_the_budget() {
    let td = TestDir::new();
    // A listener that never answers: connections succeed, requests hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let creds = td.write("creds.toml", "access-key-id = \"k\"\nsecret-access-key = \"s\"\n");
    for endpoint in [format!("http://{}", silent.local_addr().unwrap()), format!("http://127.0.0.1:{refused}")] {
        let s = S3Settings {
            endpoint: Some(endpoint.clone()),
            path_style: true,
            allow_http: true,
            credentials_file: Some(creds.clone()),
            request_timeout_secs: 1,
            retry_budget_secs: 3,
            ..S3Settings::default()
        };
        let st = S3Storage::open("s3://bucket/p", &s).unwrap();
        let started = std::time::Instant::now();
        let e = st.head("k").unwrap_err();
        let took = started.elapsed();
        assert!(e.is_transient(), "{endpoint}: {e}");
        assert!(took < Duration::from_secs(20), "{endpoint}: took {took:?}");
        assert!(!e.to_string().contains("\"s\""), "{e}");
    }
}

/// A walvault whose `[s3]` credentials are `key_id`/`secret`, for bucket
/// `bucket` on `server`.
fn walvault_with_credentials(
    server: &dyn S3Server,
    td: &TestDir,
    bucket: &str,
    key_id: &str,
    secret: &str,
) -> Walvault {
    let creds = write_credentials_file(&td.mkdir("wrong-creds"), key_id, secret);
    let mut text = Config::new(format!("s3://{bucket}/db"), td.join("catalog.db")).to_toml();
    text.push_str(&server.config_table(&creds));
    let config = td.write("walvault.toml", text);
    Walvault::new(td, &config)
}

/// One line naming what failed, plus at most a `HINT:` line; never a secret.
#[track_caller]
fn assert_one_clear_line(out: &walvault_integration::Cmd, secret: &str, must_contain: &[&str]) {
    assert!(!out.success(), "expected a failure\n{out}");
    let lines = out.stderr_lines();
    assert!(!lines.is_empty() && lines.len() <= 2, "one line plus an optional HINT\n{out}");
    if let Some(hint) = lines.get(1) {
        assert!(hint.starts_with("HINT: "), "second line must be a hint\n{out}");
    }
    for part in must_contain {
        assert!(lines[0].contains(part), "'{part}' missing from the error line\n{out}");
    }
    assert!(!out.stderr.contains(secret) && !out.stdout.contains(secret), "the secret is shown\n{out}");
}

#[test]
fn wrong_credentials_are_one_clear_line_naming_endpoint_and_bucket_never_the_secret() {
    let td = TestDir::new();
    let Some(server) = S3sFsServer::start(&td.join("s3s")) else { return };
    server.create_bucket("creds");
    let endpoint = server.endpoint();
    let pg = PgCluster::initdb(&td, "primary", &[]);
    let segment = pg.datadir().join("pg_wal/000000010000000000000001");

    // The right credentials first, so that the catalog exists and `info`
    // has something to show.
    let good = walvault_with_credentials(&server, &td, "creds", ACCESS_KEY_ID, SECRET_ACCESS_KEY);
    good.init(pg.datadir()).expect_success("init with the right credentials");
    let bucket_dir = server.root().join("creds");
    let before = walvault_integration::snapshot_tree(&bucket_dir);

    // The right key id with a wrong secret: the signature does not match.
    let wrong_secret = "wrong-secret-never-shown-4711";
    let wv = walvault_with_credentials(&server, &td, "creds", ACCESS_KEY_ID, wrong_secret);
    let expected = [endpoint.as_str(), "bucket 'creds'", "access denied", "credentials were refused"];
    let push = wv.push(&segment);
    assert_eq!(push.code(), 1);
    assert_one_clear_line(&push, wrong_secret, &expected);
    assert_one_clear_line(&wv.init(pg.datadir()), wrong_secret, &expected);
    // `info` answers from the catalog without the store; what reads the
    // bucket says the same as the others.
    wv.walvault(&["info"]).expect_success("info from the catalog");
    assert_one_clear_line(&wv.walvault(&["catalog", "rebuild"]), wrong_secret, &expected);
    let dest = td.mkdir("fetch").join("RECOVERYXLOG");
    let fetch = wv.fetch("000000010000000000000001", &dest);
    assert!(fetch.code() > 125, "refused credentials are not 'missing'\n{fetch}");
    assert_one_clear_line(&fetch, wrong_secret, &expected);
    assert!(!dest.exists());

    // An unknown key id.
    let wv = walvault_with_credentials(&server, &td, "creds", "no-such-key-id", SECRET_ACCESS_KEY);
    assert_one_clear_line(&wv.push(&segment), SECRET_ACCESS_KEY, &expected);

    // Nothing was written with either.
    assert!(walvault_integration::snapshot_tree(&bucket_dir) == before, "the bucket changed under refused credentials");

    // With the right secret the same push works.
    let wv = walvault_with_credentials(&server, &td, "creds", ACCESS_KEY_ID, SECRET_ACCESS_KEY);
    wv.push(&segment).assert_silent_success();
    wv.fetch("000000010000000000000001", &dest).assert_silent_success();
    assert_same_file(&segment, &dest);
}

#[test]
fn a_missing_bucket_is_never_a_missing_file_on_moto() {
    let Some(moto) = MotoServer::start() else { return };
    // moto answers NoSuchBucket, and the message says so.
    let endpoint = moto.endpoint();
    missing_bucket(&moto, &["bucket 'no-such-bucket' does not exist", endpoint.as_str()], true);
}

#[test]
fn a_missing_bucket_is_never_a_missing_file_on_s3s_fs() {
    let td = TestDir::new();
    let Some(server) = S3sFsServer::start(&td.join("s3s")) else { return };
    // s3s-fs answers NoSuchKey for an object of a missing bucket (and HEAD
    // has no body to tell): the repository marker is then missing too, and
    // that is what is reported.
    // Writing into it creates it (a bucket is a directory there), so init
    // succeeds.
    missing_bucket(&server, &["'s3://no-such-bucket/db' does not exist"], false);
}

/// Invariant 5: archive-fetch must not answer "not in the archive" (exit 1,
/// which ends recovery) when the bucket is not there; push and init fail
/// with one clear line.
fn missing_bucket(server: &dyn S3Server, expected: &[&str], init_fails: bool) {
    let td = TestDir::new();
    let pg = PgCluster::initdb(&td, "primary", &[]);
    let wv = walvault_with_credentials(server, &td, "no-such-bucket", ACCESS_KEY_ID, SECRET_ACCESS_KEY);
    let dest = td.mkdir("fetch").join("RECOVERYXLOG");
    let fetch = wv.fetch("000000010000000000000001", &dest);
    assert!(fetch.code() > 125, "a missing bucket must stop recovery, not end it\n{fetch}");
    assert_one_clear_line(&fetch, SECRET_ACCESS_KEY, expected);
    assert!(!dest.exists());

    let push = wv.push(pg.datadir().join("pg_wal/000000010000000000000001"));
    assert_eq!(push.code(), 1);
    assert_one_clear_line(&push, SECRET_ACCESS_KEY, expected);
    if init_fails {
        assert_one_clear_line(&wv.init(pg.datadir()), SECRET_ACCESS_KEY, expected);
    }
}
