//! The systemd units in `pg-config-examples/` run what they say: the
//! service's `ExecStart` (with the unit's user and environment, pointed at a
//! test server) takes a base backup, and the timer starts that service.

use std::collections::BTreeMap;
use std::fs;

use walvault_integration::{
    Config, PgCluster, TestDir, Walvault, as_pg_user, config_example, run_with_timeout, superuser,
};

/// `Key=Value` lines of one `[Section]` of a unit file; repeated keys
/// (`Environment=`) are kept in order.
fn section(unit: &str, name: &str) -> Vec<(String, String)> {
    let text = fs::read_to_string(config_example(unit)).unwrap_or_else(|e| panic!("cannot read {unit}: {e}"));
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s.to_string();
        } else if current == name {
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{unit}: not Key=Value: {line:?}"));
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {key}= in {pairs:?}"))
}

#[test]
fn the_backup_service_takes_a_backup_and_the_timer_starts_it() {
    let timer = section("walvault-backup.timer", "Timer");
    assert_eq!(value(&timer, "Unit"), "walvault-backup.service");
    assert!(!value(&timer, "OnCalendar").is_empty());
    assert_eq!(value(&section("walvault-backup.timer", "Install"), "WantedBy"), "timers.target");

    let service = section("walvault-backup.service", "Service");
    assert_eq!(value(&service, "Type"), "oneshot");
    assert_eq!(value(&service, "User"), "postgres", "backups run as the owner of the data directory");
    let env: BTreeMap<String, String> = service
        .iter()
        .filter(|(k, _)| k == "Environment")
        .map(|(_, v)| {
            let (k, v) = v.split_once('=').unwrap_or_else(|| panic!("Environment={v}"));
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(
        env.keys().map(String::as_str).collect::<Vec<_>>(),
        ["PGDATABASE", "PGHOST", "PGPORT", "WALVAULT_CONFIG"]
    );
    let exec = value(&service, "ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/walvault"), "the README installs walvault there");
    let args: Vec<&str> = words.collect();

    // Run that command line against a test server: the unit's environment,
    // with the server's socket, port and configuration file in place of
    // Debian's.
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut pg = PgCluster::initdb(&td, "primary", &[]);
    pg.include_example("archive.conf");
    pg.start(&wv.server_env());
    wv.init(pg.datadir()).expect_success("walvault init");
    let mut cmd = wv.command("walvault");
    cmd.envs(&env)
        .env("WALVAULT_CONFIG", &config)
        .env("PGHOST", pg.sockdir())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", superuser())
        .args(&args);
    as_pg_user(&mut cmd);
    let out = run_with_timeout(cmd, std::time::Duration::from_secs(300)).expect_success("the unit's ExecStart");
    assert!(out.stdout.contains("complete"), "{out}");
    assert_eq!(wv.backup_ids().len(), 1);
    pg.stop();
}
