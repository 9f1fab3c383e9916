//! The schedules in `pg-config-examples/` run what they say: every systemd
//! service's `ExecStart`, and every line of the cron file, is run (with the
//! unit's user and environment, pointed at a test server) and succeeds; every
//! timer starts its service.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use walvault_integration::{
    Cmd, Config, PgCluster, TestDir, Walvault, archiving_primary, as_pg_user, config_example, run_with_timeout,
    superuser,
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

/// Runs a documented command line (`/usr/local/bin/walvault ARGS…`) as the
/// PostgreSQL user with `env`, redirected to the test's server, repository
/// and scratch space.
fn run_documented(
    wv: &Walvault,
    td: &TestDir,
    pg: &PgCluster,
    config: &std::path::Path,
    env: &BTreeMap<String, String>,
    line: &str,
) -> Cmd {
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/walvault"), "{line}: the README installs walvault there");
    let scratch = td.mkdir("scratch").display().to_string();
    let args: Vec<String> = words.map(|w| if w == "/var/tmp" { scratch.clone() } else { w.to_string() }).collect();
    let mut cmd = wv.command("walvault");
    cmd.envs(env)
        .env("WALVAULT_CONFIG", config)
        .env("PGHOST", pg.sockdir())
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", superuser())
        .args(&args);
    as_pg_user(&mut cmd);
    run_with_timeout(cmd, Duration::from_secs(600))
}

#[test]
fn every_service_timer_and_cron_line_runs() {
    let td = TestDir::new();
    let config = Config::new(td.join("repo"), td.join("catalog.db")).write(&td, "walvault.toml");
    let wv = Walvault::new(&td, &config);
    let mut pg = archiving_primary(&td, &wv, "primary");
    pg.pgbench(&["-i", "-s", "1", "-q"]);

    for name in ["backup", "expire", "verify", "drill"] {
        let timer = section(&format!("walvault-{name}.timer"), "Timer");
        assert_eq!(value(&timer, "Unit"), format!("walvault-{name}.service"));
        assert!(!value(&timer, "OnCalendar").is_empty());
        assert_eq!(value(&section(&format!("walvault-{name}.timer"), "Install"), "WantedBy"), "timers.target");

        let service = section(&format!("walvault-{name}.service"), "Service");
        assert_eq!(value(&service, "Type"), "oneshot");
        assert_eq!(value(&service, "User"), "postgres", "{name} runs as the owner of the data directory");
        let env: BTreeMap<String, String> = service
            .iter()
            .filter(|(k, _)| k == "Environment")
            .map(|(_, v)| {
                let (k, v) = v.split_once('=').unwrap_or_else(|| panic!("Environment={v}"));
                (k.to_string(), v.to_string())
            })
            .collect();
        assert_eq!(env.get("WALVAULT_CONFIG").map(String::as_str), Some("/etc/walvault/walvault.toml"));
        let exec = value(&service, "ExecStart");
        assert!(exec.starts_with(&format!("/usr/local/bin/walvault {name}")), "{exec}");
        let out =
            run_documented(&wv, &td, &pg, &config, &env, exec).expect_success(&format!("walvault-{name}.service"));
        if name == "backup" {
            assert!(out.stdout.contains("complete"), "{out}");
            assert_eq!(wv.backup_ids().len(), 1);
        }
    }

    // The cron file: valid fields, the postgres user, and commands that run.
    let text = fs::read_to_string(config_example("walvault.cron")).expect("walvault.cron");
    let mut env = BTreeMap::new();
    let mut lines = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some((k, v)) = line.split_once('=')
            && !k.contains(' ')
        {
            env.insert(k.to_string(), v.to_string());
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 7, "{line}");
        for (field, max) in fields[..5].iter().zip([59, 23, 31, 12, 7]) {
            assert!(*field == "*" || field.parse::<u32>().is_ok_and(|n| n <= max), "{line}: field {field}");
        }
        assert_eq!(fields[5], "postgres", "{line}");
        let command = line.split_whitespace().skip(6).collect::<Vec<_>>().join(" ");
        run_documented(&wv, &td, &pg, &config, &env, &command).expect_success(&format!("cron: {command}"));
        lines += 1;
    }
    assert_eq!(lines, 4, "backup, expire, verify and drill");
    assert_eq!(wv.backup_ids().len(), 2, "the cron backup ran too");
    pg.stop();
}
