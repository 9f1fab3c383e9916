//! S3 repositories against a real S3 server (moto on 127.0.0.1): the
//! [`S3Storage`] contract, the create-once race, and PostgreSQL's WAL
//! archived into a bucket and fetched back.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use walvault::config::S3Settings;
use walvault::storage::s3::S3Storage;
use walvault::storage::{PutOutcome, Storage, StorageError};
use walvault_integration::s3::{MotoServer, SECRET_ACCESS_KEY};
use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, archiving_primary, assert_same_file, restore_and_start, table_checksum,
};

fn settings(moto: &MotoServer, td: &TestDir) -> S3Settings {
    S3Settings {
        endpoint: Some(moto.endpoint()),
        path_style: true,
        allow_http: true,
        credentials_file: Some(moto.write_credentials(td.path())),
        request_timeout_secs: 10,
        retry_budget_secs: 20,
        ..S3Settings::default()
    }
}

#[test]
fn s3_storage_keeps_the_storage_contract() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("contract");
    let s = S3Storage::open("s3://contract/some/prefix", &settings(&moto, &td)).unwrap();
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
    let other = S3Storage::open("s3://contract/elsewhere", &settings(&moto, &td)).unwrap();
    assert!(other.list("").unwrap().is_empty());
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
fn wal_is_archived_to_s3_fetched_back_and_the_catalog_rebuilt_from_the_bucket() {
    let Some(moto) = MotoServer::start() else { return };
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
    let s = S3Storage::open("s3://wal/prod", &settings(&moto, &td)).unwrap();
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
fn backup_to_s3_restores_and_expire_is_refused() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("backups");
    let creds = moto.write_credentials(td.path());
    let mut text = Config::new("s3://backups/db", td.join("catalog.db")).to_toml();
    text.push_str(&moto.config_table(&creds));
    let config = td.write("walvault.toml", text);
    let wv = Walvault::new(&td, &config);
    let mut primary = archiving_primary(&td, &wv, "primary");
    primary.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g");
    wv.backup(&primary, &["--fast", "--jobs", "2"]).expect_success("backup to s3");
    primary.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(50001, 60000) g");
    let expected = table_checksum(&primary, "t", "id");
    let last = primary.switch_wal();
    primary.wait_archived(&last, Duration::from_secs(120));
    assert_eq!(wv.backup_ids().len(), 1);

    let (mut pg, _) = restore_and_start(&td, &wv, "restored", &[], false);
    assert_eq!(table_checksum(&pg, "t", "id"), expected, "restored from s3 to the end of the archive");
    pg.stop();

    let expire = wv.walvault(&["expire", "--keep-last", "1"]);
    assert!(!expire.success(), "expire must refuse on s3 (no exclusive lock yet)");
    assert!(expire.stderr.contains("S3 repositories do not support"), "{}", expire.stderr);
    primary.stop();
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
