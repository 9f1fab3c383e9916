//! S3 repositories under faults, against real S3 servers on 127.0.0.1: a
//! server stopped while PostgreSQL archives (s3s-fs, whose data survives a
//! restart), a slow, dropping or overloaded store (a fault proxy in front
//! of moto), and a store that ignores `If-None-Match` (the proxy strips it).
//! Each ends with a clear outcome within the configured deadline, and
//! nothing lost or overwritten.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use walvault::catalog::Catalog;
use walvault::config::S3Settings;
use walvault::lock::{Lease, LockMode, RepoLock};
use walvault::probe::{self, ConditionalCreateSetting};
use walvault::repo::Repository;
use walvault::storage::s3::S3Storage;
use walvault::storage::{ConditionalCreate, PutOutcome};
use walvault_integration::proxy::{FaultProxy, Mode};
use walvault_integration::s3::{MotoServer, S3Server, S3sFsServer, config_table_for};
use walvault_integration::{Config, PgCluster, TestDir, Walvault, assert_same_file, read_bytes, wait_until};

/// A walvault for `s3://bucket/db` through `endpoint`, with
/// `request-timeout` and `retry-budget` in seconds.
fn walvault(server: &dyn S3Server, td: &TestDir, endpoint: &str, bucket: &str, timeout: u64, budget: u64) -> Walvault {
    let creds = server.write_credentials(td.path());
    let mut text = Config::new(format!("s3://{bucket}/db"), td.join("catalog.db")).to_toml();
    text.push_str(&config_table_for(endpoint, &creds, timeout, budget));
    let config = td.write("walvault.toml", text);
    Walvault::new(td, &config)
}

fn settings(server: &dyn S3Server, td: &TestDir, endpoint: &str) -> S3Settings {
    S3Settings {
        endpoint: Some(endpoint.to_string()),
        path_style: true,
        allow_http: true,
        credentials_file: Some(server.write_credentials(td.path())),
        request_timeout_secs: 5,
        retry_budget_secs: 10,
        ..S3Settings::default()
    }
}

#[test]
fn archiving_fails_while_the_store_is_down_and_resumes_with_nothing_lost() {
    let td = TestDir::new();
    let Some(mut server) = S3sFsServer::start(&td.join("s3s")) else { return };
    server.create_bucket("wal");
    let endpoint = server.endpoint();
    let wv = walvault(&server, &td, &endpoint, "wal", 2, 4);
    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.append_conf("wal_keep_size = '1GB'\narchive_timeout = 0");
    wv.init(pg.datadir()).expect_success("walvault init on s3s-fs");
    pg.start(&wv.server_env());
    pg.psql("CREATE TABLE t AS SELECT generate_series(1, 50000) AS i");
    let before = pg.switch_wal();
    pg.wait_archived(&before, Duration::from_secs(60));

    // The store goes away while PostgreSQL keeps writing.
    server.stop();
    pg.psql("INSERT INTO t SELECT generate_series(1, 50000)");
    let during = pg.switch_wal();
    wait_until(Duration::from_secs(60), "archive-push to fail", || pg.archiver_stats().failed_count > 0);
    let stats = pg.archiver_stats();
    assert!(stats.last_archived_wal < during, "nothing can be archived while the store is down: {stats:?}");
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "100000", "the server keeps running");
    let log = pg.log();
    let line = log
        .lines()
        .find(|l| l.contains("archive-push: error:"))
        .unwrap_or_else(|| panic!("no archive-push error in the server log:\n{}", pg.log_tail(30)));
    assert!(
        line.contains(&endpoint) && line.contains("bucket 'wal'"),
        "the log line names endpoint and bucket: {line}"
    );

    // Back on the same port with the same data: archiving resumes.
    server.start_again();
    pg.psql("INSERT INTO t SELECT generate_series(1, 50000)");
    let after = pg.switch_wal();
    pg.wait_archived(&after, Duration::from_secs(180));

    // Every segment PostgreSQL archived is in the bucket, byte for byte.
    let fetched = td.mkdir("fetched");
    let done: Vec<String> = pg.archived_done().into_iter().filter(|n| n.len() == 24).collect();
    assert!(done.contains(&during) && done.contains(&after), "{done:?}");
    for name in &done {
        let dest = fetched.join("RECOVERYXLOG");
        wv.fetch(name, &dest).assert_silent_success();
        assert_same_file(&pg.datadir().join("pg_wal").join(name), &dest);
        std::fs::remove_file(&dest).unwrap();
    }
    pg.stop();
}

#[test]
fn a_slow_dropping_or_overloaded_store_gives_clear_answers_within_the_deadline() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("slow");
    let mut proxy = FaultProxy::start(moto.port());
    let endpoint = proxy.endpoint();
    let (timeout, budget) = (1, 3);
    let wv = walvault(&moto, &td, &endpoint, "slow", timeout, budget);
    let pg = PgCluster::initdb(&td, "primary", &[]);
    wv.init(pg.datadir()).expect_success("walvault init through the proxy");
    let name = "000000010000000000000001";
    let segment = pg.datadir().join("pg_wal").join(name);
    // request-timeout × attempts within the retry budget, plus the start of
    // the process and one last request.
    let deadline = Duration::from_secs(budget + 2 * timeout + 5);

    // Slower than request-timeout: archive-push fails, in time, saying why.
    proxy.set_mode(Mode::Delay(Duration::from_secs(timeout + 3)));
    let started = Instant::now();
    let push = wv.push(&segment);
    let took = started.elapsed();
    assert_eq!(push.code(), 1, "{push}");
    assert!(took < deadline, "archive-push took {took:?}, deadline {deadline:?}\n{push}");
    let line = push.stderr_lines()[0].to_string();
    assert!(line.contains("timed out") && line.contains(&endpoint), "{push}");

    // The store is fast again: PostgreSQL's retry succeeds (whether or not
    // the slow PUT landed: an identical object is success).
    proxy.set_mode(Mode::PassThrough);
    wv.push(&segment).assert_silent_success();
    let fetched = td.mkdir("fetched");
    let dest = fetched.join("RECOVERYXLOG");

    // archive-fetch of an archived file through a slow or dropping store:
    // recovery is stopped (> 125), never told "missing" (1).
    for mode in [Mode::Delay(Duration::from_secs(timeout + 3)), Mode::Drop] {
        proxy.set_mode(mode);
        let started = Instant::now();
        let fetch = wv.fetch(name, &dest);
        let took = started.elapsed();
        assert!(fetch.code() > 125, "{mode:?}: must stop recovery\n{fetch}");
        assert!(took < deadline, "{mode:?}: archive-fetch took {took:?}\n{fetch}");
        assert!(fetch.stderr_lines()[0].contains(&endpoint), "{mode:?}: names the endpoint\n{fetch}");
        assert!(!dest.exists(), "{mode:?}: nothing at %p");
    }

    // Only a file that is really not there is "missing".
    proxy.set_mode(Mode::PassThrough);
    wv.fetch("000000010000000000000009", &dest).assert_code(1);
    assert!(wv.fetch("000000010000000000000009", &dest).stderr.is_empty(), "missing is quiet");

    // A few 503s are retried transparently.
    proxy.set_mode(Mode::Fail503(3));
    let before = proxy.requests();
    wv.fetch(name, &dest).assert_silent_success();
    assert_same_file(&segment, &dest);
    assert!(proxy.requests() >= before + 4, "the 503s were answered and retried");
    std::fs::remove_file(&dest).unwrap();
    proxy.set_mode(Mode::Fail503(2));
    wv.push(&segment).assert_silent_success();
    assert_eq!(proxy.mode(), Mode::PassThrough, "every 503 was used");

    // A stopped proxy (connection refused) is an error too, not "missing".
    proxy.stop();
    let fetch = wv.fetch(name, &dest);
    assert!(fetch.code() > 125, "{fetch}");
    assert!(fetch.stderr_lines()[0].contains(&endpoint), "{fetch}");
    proxy.resume();
    wv.fetch(name, &dest).assert_silent_success();
    assert_same_file(&segment, &dest);
}

#[test]
fn a_store_that_ignores_if_none_match_is_detected_and_never_overwrites() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("inm");
    let garage_like = FaultProxy::start(moto.port());
    garage_like.set_mode(Mode::IgnoreIfNoneMatch);
    let open = |endpoint: &str| {
        let s = S3Storage::open("s3://inm/p", &settings(&moto, &td, endpoint)).unwrap();
        Repository::with_storage(Box::new(s), "main").unwrap()
    };

    // moto itself honours it.
    let honest = open(&moto.endpoint());
    assert!(probe::probe_and_record(&honest, None).unwrap().honoured);

    // Through the proxy the second create overwrites: the probe says so,
    // and records it in the bucket and the catalog.
    let repo = open(&garage_like.endpoint());
    let catalog = Catalog::open(&td.join("catalog.db")).unwrap();
    let report = probe::probe_and_record(&repo, Some(&catalog)).unwrap();
    assert!(!report.honoured, "{report:?}");
    assert_eq!(report.mode, ConditionalCreate::CheckFirst);
    let warning = &report.warnings[0];
    for part in ["ignores conditional create", "If-None-Match", "check-then-write", "race", "s3://inm/p"] {
        assert!(warning.contains(part), "'{part}' missing from: {warning}");
    }
    assert_eq!(catalog.store_probe("s3://inm/p").unwrap().map(|r| r.0), Some(false));
    assert_eq!(probe::recorded(&repo).unwrap().map(|r| r.0), Some(false));
    let keys: Vec<String> = repo.storage().list("").unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(keys, [probe::PROBE_RECORD_KEY], "the probe object is deleted, its record kept");

    // With the fallback, create-once holds on this store.
    let s = repo.storage();
    assert_eq!(s.conditional_create(), ConditionalCreate::CheckFirst);
    assert!(matches!(s.put_new("main/wal/x", b"first").unwrap(), PutOutcome::Created(_)));
    assert_eq!(s.put_new("main/wal/x", b"second").unwrap(), PutOutcome::Exists);
    assert_eq!(s.get("main/wal/x").unwrap(), b"first", "never overwritten");
    // Without it, the store overwrites: what the fallback is for.
    s.set_conditional_create(ConditionalCreate::Trust);
    assert!(matches!(s.put_new("main/wal/x", b"second").unwrap(), PutOutcome::Created(_)));
    assert_eq!(s.get("main/wal/x").unwrap(), b"second", "trusting this store loses the first copy");

    // The repository lock needs no conditional create (a key per holder):
    // on this store an expire's lock still excludes a second one and a
    // backup's.
    let locked = Arc::new(open(&garage_like.endpoint()));
    let take =
        |mode, command| RepoLock::acquire_objects(Arc::clone(&locked), mode, command, Duration::ZERO, Lease::DEFAULT);
    let expire = take(LockMode::Exclusive, "expire").expect("the exclusive lock on a store ignoring If-None-Match");
    for (mode, command) in [(LockMode::Exclusive, "expire"), (LockMode::Shared, "backup")] {
        let e = take(mode, command).expect_err("a second holder beside expire");
        assert!(e.to_string().contains("is locked by expire (pid"), "{e}");
    }
    drop(expire);
    assert!(locked.storage().list("main/locks/").unwrap().is_empty(), "released");

    // archive-push's choice: from the catalog (no request), or from the
    // bucket's record when the catalog has none (then cached).
    let counted = FaultProxy::start(garage_like_port(&garage_like));
    counted.set_mode(Mode::PassThrough);
    let fresh = open(&counted.endpoint());
    let warnings = probe::configure_for_push(&fresh, Some(&catalog), ConditionalCreateSetting::Auto);
    assert_eq!(fresh.storage().conditional_create(), ConditionalCreate::CheckFirst);
    assert!(warnings[0].contains("ignores conditional create"), "{warnings:?}");
    assert_eq!(counted.requests(), 0, "the catalog answers without a request");
    let empty = Catalog::open(&td.join("other-catalog.db")).unwrap();
    probe::configure_for_push(&fresh, Some(&empty), ConditionalCreateSetting::Auto);
    assert_eq!(fresh.storage().conditional_create(), ConditionalCreate::CheckFirst);
    assert_eq!(counted.requests(), 1, "one GET of the record");
    assert_eq!(empty.store_probe("s3://inm/p").unwrap().map(|r| r.0), Some(false), "cached in the catalog");
    probe::configure_for_push(&fresh, Some(&empty), ConditionalCreateSetting::Trust);
    assert_eq!(fresh.storage().conditional_create(), ConditionalCreate::Trust, "the setting overrides");
}

/// The port of a proxy, from its endpoint.
fn garage_like_port(p: &FaultProxy) -> u16 {
    p.endpoint().rsplit(':').next().unwrap().parse().unwrap()
}

/// archive-push through a store that ignores `If-None-Match` follows the
/// recorded probe (`probe::configure_for_push`): a different file under an archived name is refused with both
/// checksums and the archived copy stays.
#[test]
fn archive_push_through_a_store_that_ignores_if_none_match_never_overwrites() {
    let Some(moto) = MotoServer::start() else { return };
    let td = TestDir::new();
    moto.create_bucket("inm");
    let proxy = FaultProxy::start(moto.port());
    proxy.set_mode(Mode::IgnoreIfNoneMatch);
    let wv = walvault(&moto, &td, &proxy.endpoint(), "inm", 5, 10);
    let pg = PgCluster::initdb(&td, "primary", &[]);
    wv.init(pg.datadir()).expect_success("walvault init");
    let repo = {
        let s = S3Storage::open("s3://inm/db", &settings(&moto, &td, &proxy.endpoint())).unwrap();
        Repository::with_storage(Box::new(s), "main").unwrap()
    };
    probe::probe_and_record(&repo, Some(&Catalog::open(&td.join("catalog.db")).unwrap())).unwrap();

    let name = "000000010000000000000001";
    let original = pg.datadir().join("pg_wal").join(name);
    wv.push(&original).expect_success("first push");
    // The same name, other content (past the page headers).
    let mut other = read_bytes(&original);
    other[1 << 20] ^= 0xff;
    let forged = td.write(format!("forged/{name}"), &other);
    let push = wv.push(&forged);
    assert_eq!(push.code(), 1, "{push}");
    assert!(push.stderr.contains("different content") && push.stderr.matches("blake3").count() >= 2, "{push}");
    let dest = td.mkdir("fetched").join("RECOVERYXLOG");
    wv.fetch(name, &dest).assert_silent_success();
    assert_same_file(&original, &dest);
}
