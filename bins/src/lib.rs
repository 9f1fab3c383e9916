//! What the three binaries share: the common flags, loading the
//! configuration, printing errors, and the one mapping from errors to exit
//! codes. No logic lives here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;
use walvault::config::{Config, Overrides};

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for failure (archive-push, walvault) and for "not in the
/// archive" (archive-fetch).
pub const EXIT_FAIL: i32 = 1;
/// archive-fetch's exit code to stop recovery: PostgreSQL aborts on an exit
/// status above 125 from `restore_command` instead of treating the file as
/// missing and ending recovery early.
pub const EXIT_ABORT_RECOVERY: i32 = 255;

/// Flags every binary accepts; they override the configuration file.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonArgs {
    /// Configuration file [default: $WALVAULT_CONFIG, else /etc/walvault/walvault.toml]
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Repository: a directory or s3://bucket/prefix (replaces the configured ones)
    #[arg(long, value_name = "LOCATION", global = true)]
    pub repository: Option<String>,
    /// Only the configured repository with this name (one of `[[repositories]]`)
    #[arg(long, value_name = "NAME", global = true)]
    pub repo: Option<String>,
    /// Cluster name within the repository (overrides `cluster`)
    #[arg(long, value_name = "NAME", global = true)]
    pub cluster: Option<String>,
    /// Catalog file (overrides `catalog`)
    #[arg(long, value_name = "FILE", global = true)]
    pub catalog: Option<PathBuf>,
}

impl CommonArgs {
    /// Loads the configuration with these overrides and `WALVAULT_CONFIG`.
    pub fn load(&self) -> walvault::Result<Config> {
        let overrides = Overrides {
            config: self.config.clone(),
            repository: self.repository.clone(),
            cluster: self.cluster.clone(),
            catalog: self.catalog.clone(),
            repo: self.repo.clone(),
        };
        Config::load(&overrides, std::env::var_os("WALVAULT_CONFIG").map(PathBuf::from))
    }

    /// The flags that make a background worker (async push, prefetch) load
    /// the same configuration as this call. Relative paths (`--config`,
    /// `WALVAULT_CONFIG`, `--catalog`, a local `--repository`) are made
    /// absolute against the current directory, because a worker outlives
    /// the call and may run elsewhere (the prefetch worker runs in `/`).
    pub fn worker_args(&self) -> Vec<OsString> {
        let env_config = std::env::var_os("WALVAULT_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from);
        worker_args_with(self, env_config.as_deref())
    }
}

/// [`CommonArgs::worker_args`] with `WALVAULT_CONFIG` given.
fn worker_args_with(common: &CommonArgs, env_config: Option<&Path>) -> Vec<OsString> {
    // `absolute` fails only without a current directory; the path is then
    // passed unchanged and the worker reports what it cannot read.
    let absolute = |p: &Path| std::path::absolute(p).map_or_else(|_| p.as_os_str().to_owned(), Into::into);
    let mut args = Vec::new();
    let mut add = |flag: &str, value: Option<OsString>| {
        if let Some(v) = value {
            args.push(OsString::from(flag));
            args.push(v);
        }
    };
    add("--config", common.config.as_deref().or(env_config).map(absolute));
    let repository =
        common.repository.as_ref().map(|r| if r.contains("://") { OsString::from(r) } else { absolute(Path::new(r)) });
    add("--repository", repository);
    add("--repo", common.repo.clone().map(Into::into));
    add("--cluster", common.cluster.clone().map(Into::into));
    add("--catalog", common.catalog.as_deref().map(absolute));
    args
}

/// Prints an error as one line, plus a `HINT:` line when there is advice.
/// stderr of archive-push and archive-fetch goes to the PostgreSQL log.
pub fn report_error(program: &str, e: &walvault::Error) {
    eprintln!("{program}: error: {e}");
    if let Some(hint) = e.hint() {
        eprintln!("HINT: {hint}");
    }
}

/// Prints a warning line.
pub fn report_warning(program: &str, w: &str) {
    eprintln!("{program}: warning: {w}");
}

/// Parses arguments. A usage error is printed in the same one-line format
/// as every other error and exits with `usage_exit` (archive-fetch must not
/// exit 2, which PostgreSQL would read as "file missing").
pub fn parse_args<T: clap::Parser>(program: &str, usage_exit: i32) -> T {
    match T::try_parse() {
        Ok(t) => t,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            std::process::exit(EXIT_OK)
        }
        Err(e) => {
            // clap's message spans lines (the missing arguments, a tip, the
            // usage); keep what precedes the usage, on one line.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            eprintln!("{program}: error: {}", message.trim_start_matches("error: "));
            eprintln!("HINT: see '{program} --help'");
            std::process::exit(usage_exit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_args_make_relative_paths_absolute() {
        let cwd = std::env::current_dir().expect("a current directory");
        let common = CommonArgs {
            config: Some("walvault.toml".into()),
            repository: Some("repo".into()),
            repo: Some("nas".into()),
            cluster: Some("main".into()),
            catalog: Some("/var/lib/walvault/catalog.db".into()),
        };
        let args = worker_args_with(&common, None);
        let expected: Vec<OsString> = vec![
            "--config".into(),
            cwd.join("walvault.toml").into(),
            "--repository".into(),
            cwd.join("repo").into(),
            "--repo".into(),
            "nas".into(),
            "--cluster".into(),
            "main".into(),
            "--catalog".into(),
            "/var/lib/walvault/catalog.db".into(),
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn worker_args_carry_a_relative_walvault_config_and_leave_urls_alone() {
        let cwd = std::env::current_dir().expect("a current directory");
        let common = CommonArgs { repository: Some("s3://bucket/prefix".into()), ..CommonArgs::default() };
        let args = worker_args_with(&common, Some(Path::new("conf/walvault.toml")));
        let expected: Vec<OsString> = vec![
            "--config".into(),
            cwd.join("conf/walvault.toml").into(),
            "--repository".into(),
            "s3://bucket/prefix".into(),
        ];
        assert_eq!(args, expected);
        // --config wins over WALVAULT_CONFIG, as when loading.
        let common = CommonArgs { config: Some("/etc/walvault/a.toml".into()), ..CommonArgs::default() };
        assert_eq!(worker_args_with(&common, Some(Path::new("b.toml")))[1], OsString::from("/etc/walvault/a.toml"));
    }
}
