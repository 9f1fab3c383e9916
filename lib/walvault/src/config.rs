//! Configuration: a TOML file overridden by command-line flags.
//!
//! The file is found by `--config`, else the `WALVAULT_CONFIG` environment
//! variable, else `/etc/walvault/walvault.toml` (skipped if absent). The
//! caller passes the environment value in; nothing here reads process-global
//! state.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The file read when neither `--config` nor `WALVAULT_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "/etc/walvault/walvault.toml";

/// What archive-fetch answers when a file exists but cannot be read or
/// verified, or the repository cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FetchOnError {
    /// Abort recovery unless the data directory has `standby.signal`.
    Auto,
    /// Always abort recovery (exit code above 125).
    Abort,
    /// Answer "not available" (exit 1) with an error in the log: PostgreSQL
    /// tries again later. Safe for standbys only.
    Retry,
}

/// The file's shape; every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    cluster: Option<String>,
    repository: Option<String>,
    catalog: Option<PathBuf>,
    compress_level: Option<i32>,
    compress_workers: Option<u32>,
    fetch_on_error: Option<FetchOnError>,
    #[serde(rename = "async")]
    async_push: Option<bool>,
    jobs: Option<u32>,
    spool_path: Option<PathBuf>,
    queue_max: Option<String>,
    prefetch: Option<u32>,
    prefetch_max: Option<String>,
    retention: Option<FileRetention>,
    pg_bin: Option<PathBuf>,
    s3: Option<FileS3>,
    repositories: Option<Vec<FileRepository>>,
}

/// One `[[repositories]]` entry in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRepository {
    name: String,
    location: String,
    required: Option<bool>,
    catalog: Option<PathBuf>,
    s3: Option<FileS3>,
}

/// One repository of a configuration: where it is, whether archive-push
/// needs it, and its own catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    /// Its name (`default` for the single `repository = …` form).
    pub name: String,
    /// A directory or `s3://bucket/prefix`.
    pub location: String,
    /// archive-push fails unless the file is stored here.
    pub required: bool,
    /// The SQLite catalog that indexes it.
    pub catalog: PathBuf,
    /// How to reach it when it is on S3.
    pub s3: S3Settings,
}

/// The name of the repository of the single `repository = …` form.
pub const DEFAULT_REPO_NAME: &str = "default";

/// `[s3]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileS3 {
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    allow_http: Option<bool>,
    anonymous: Option<bool>,
    credentials_file: Option<PathBuf>,
    request_timeout: Option<String>,
    retry_budget: Option<String>,
    conditional_create: Option<crate::probe::ConditionalCreateSetting>,
}

/// `[s3]`: how to reach an `s3://bucket/prefix` repository. Holds no
/// secret: credentials are read when the repository is opened, from
/// `credentials_file` or the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `endpoint`: URL of an S3-compatible store (`http://127.0.0.1:9000`);
    /// `None` is AWS.
    pub endpoint: Option<String>,
    /// `region`, default `us-east-1`.
    pub region: String,
    /// `path-style`: `http://host/bucket/key` instead of
    /// `http://bucket.host/key` (MinIO, Ceph RGW, Garage).
    pub path_style: bool,
    /// `allow-http`: permit plain HTTP endpoints.
    pub allow_http: bool,
    /// `anonymous`: send unsigned requests (public buckets, tests).
    pub anonymous: bool,
    /// `credentials-file`: TOML with `access-key-id`, `secret-access-key`
    /// and optionally `session-token`.
    pub credentials_file: Option<PathBuf>,
    /// `request-timeout`: deadline of each request, seconds (default 30).
    pub request_timeout_secs: u64,
    /// `retry-budget`: total time transient failures are retried for,
    /// seconds (default 120).
    pub retry_budget_secs: u64,
    /// `conditional-create`: how archive-push keeps create-once on a store
    /// (`auto`: follow the probe `walvault init`/`check` recorded).
    pub conditional_create: crate::probe::ConditionalCreateSetting,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            region: "us-east-1".into(),
            path_style: false,
            allow_http: false,
            anonymous: false,
            credentials_file: None,
            request_timeout_secs: 30,
            retry_budget_secs: 120,
            conditional_create: crate::probe::ConditionalCreateSetting::Auto,
        }
    }
}

/// `[retention]` in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRetention {
    keep_last: Option<u32>,
    keep_within: Option<String>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    grace: Option<String>,
}

/// Which backups (and so which WAL) `walvault expire` keeps. A backup is
/// kept when any rule keeps it; with no rule at all, nothing is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    /// Keep the newest N backups.
    pub keep_last: Option<u32>,
    /// Promise: a restore to any moment in the last N seconds works.
    pub keep_within_secs: Option<u64>,
    /// Keep the newest backup of each of the last N days (UTC) that have one.
    pub keep_daily: Option<u32>,
    /// … of each of the last N ISO weeks.
    pub keep_weekly: Option<u32>,
    /// … of each of the last N months.
    pub keep_monthly: Option<u32>,
    /// … of each of the last N years.
    pub keep_yearly: Option<u32>,
}

impl RetentionPolicy {
    /// Whether any rule is set.
    pub fn is_empty(&self) -> bool {
        *self == RetentionPolicy::default()
    }
}

/// Default grace period before an unreferenced data object may be swept:
/// longer than any backup runs, so a backup in progress (whose manifest
/// does not exist yet) never loses its objects.
pub const DEFAULT_GRACE_SECS: u64 = 24 * 3600;

/// Default of `jobs`.
pub const DEFAULT_JOBS: u32 = 4;

/// Default of `prefetch-max`: 1 GiB.
pub const DEFAULT_PREFETCH_MAX: u64 = 1 << 30;

/// Parses a size such as `512MiB`, `4GiB`, `1G`, `800MB` or `1048576` into
/// bytes (K, M, G, T and their `B`/`iB` forms are all powers of 1024).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("'{text}' is not a size such as 512MiB, 4GiB or 1048576");
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// Parses a duration such as `14d`, `36h`, `90m`, `2w`, `1d12h` or `3600s`
/// into seconds.
pub fn parse_duration(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("'{text}' is not a duration such as 14d, 36h, 90m, 2w or 1d12h");
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// Values given on the command line; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--repository`.
    pub repository: Option<String>,
    /// `--cluster`.
    pub cluster: Option<String>,
    /// `--catalog`.
    pub catalog: Option<PathBuf>,
    /// `--repo`: only this configured repository.
    pub repo: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    /// Cluster name within the repository.
    pub cluster: String,
    /// Repository location (a directory).
    pub repository: String,
    /// SQLite catalog file.
    pub catalog: PathBuf,
    /// zstd level for WAL.
    pub compress_level: i32,
    /// zstd worker threads; 0 = decide from the machine.
    pub compress_workers: u32,
    /// archive-fetch's answer to errors.
    pub fetch_on_error: FetchOnError,
    /// `async`: archive-push hands its file to a background worker that
    /// pushes ahead in parallel (acknowledging only what is stored).
    pub async_push: bool,
    /// `jobs`: files pushed (async) or fetched ahead (prefetch) in
    /// parallel.
    pub jobs: u32,
    /// `spool-path`: local directory for the async push worker's state and
    /// prefetched WAL; on the same file system as `pg_wal`, prefetched
    /// files reach `%p` by a rename.
    pub spool: PathBuf,
    /// `queue-max`: when the WAL waiting in `pg_wal` exceeds this many
    /// bytes because the repositories cannot be reached, archive-push lets
    /// PostgreSQL drop it (and records the gap) instead of filling the
    /// disk. `None`: never.
    pub queue_max: Option<u64>,
    /// `prefetch`: WAL files archive-fetch downloads ahead; 0: none.
    pub prefetch: u32,
    /// `prefetch-max`: bytes the prefetched files may take in the spool.
    pub prefetch_max: u64,
    /// `[retention]`: what `walvault expire` keeps.
    pub retention: RetentionPolicy,
    /// `[retention] grace`: how old an unreferenced data object must be
    /// before expire removes it, in seconds.
    pub grace_secs: u64,
    /// Directory of PostgreSQL's programs (`pg_ctl`, `postgres`) for
    /// `walvault drill`; `None` finds them from the cluster's version.
    pub pg_bin: Option<PathBuf>,
    /// `[s3]`: used when `repository` is an `s3://` URL.
    pub s3: S3Settings,
    /// Every repository, in priority order. `repository`, `catalog` and
    /// `s3` above describe the first; [`Config::each`] gives a view of
    /// each one.
    pub repositories: Vec<RepoSpec>,
}

/// Checks a cluster name: 1–63 ASCII letters, digits, `_`, `-`, `.`,
/// starting with a letter or digit.
pub fn validate_cluster_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Setting(format!(
            "cluster name '{}' must be 1-63 letters, digits, '_', '-' or '.', starting with a letter or digit",
            name.escape_default()
        )))
    }
}

/// One-line description of a TOML error: message plus line and column.
fn toml_detail(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // The line itself names the key, whatever the parser's message says.
            let text_line = text.lines().nth(line - 1).unwrap_or("").trim();
            let lower = text_line.to_ascii_lowercase();
            // Never echo a secret someone put in the wrong file.
            let shown: String = if ["secret", "token", "password", "key-id"].iter().any(|w| lower.contains(w)) {
                "<line not shown: it may hold a secret>".into()
            } else {
                text_line.chars().take(80).collect()
            };
            format!("line {line}, column {col} ('{shown}'): {msg}")
        }
        None => msg,
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config { file: path.to_path_buf(), detail: format!("unable to read: {e}") })?;
    toml::from_str(&text).map_err(|e| Error::Config { file: path.to_path_buf(), detail: toml_detail(&text, &e) })
}

impl Config {
    /// Loads the file (see the module docs for which one) and applies the
    /// overrides. `env_config` is the value of `WALVAULT_CONFIG`.
    pub fn load(overrides: &Overrides, env_config: Option<PathBuf>) -> Result<Config> {
        let explicit = overrides.config.clone().or(env_config.filter(|p| !p.as_os_str().is_empty()));
        let (file, parsed) = match explicit {
            Some(path) => {
                let parsed = read_file(&path)?;
                (Some(path), parsed)
            }
            None if Path::new(DEFAULT_CONFIG).exists() => {
                (Some(PathBuf::from(DEFAULT_CONFIG)), read_file(Path::new(DEFAULT_CONFIG))?)
            }
            None => (None, FileConfig::default()),
        };
        let in_file = |key: &str| match &file {
            Some(f) => format!("key '{key}' in '{}'", f.display()),
            None => format!("--{key}"),
        };
        let cluster = overrides.cluster.clone().or(parsed.cluster).unwrap_or_else(|| "main".to_string());
        validate_cluster_name(&cluster)?;
        let catalog = overrides
            .catalog
            .clone()
            .or(parsed.catalog)
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/walvault/{cluster}/catalog.db")));
        if !catalog.is_absolute() {
            return Err(Error::Setting(format!(
                "{} is '{}': it must be an absolute path (archive-push runs in the data directory)",
                in_file("catalog"),
                catalog.display()
            )));
        }
        let compress_level = parsed.compress_level.unwrap_or(3);
        if !(1..=19).contains(&compress_level) {
            return Err(Error::Setting(format!("{} is {compress_level}, expected 1 to 19", in_file("compress-level"))));
        }
        let compress_workers = parsed.compress_workers.unwrap_or(0);
        if compress_workers > 64 {
            return Err(Error::Setting(format!(
                "{} is {compress_workers}, expected 0 to 64",
                in_file("compress-workers")
            )));
        }
        let r = parsed.retention.unwrap_or_default();
        let duration = |key: &str, v: Option<String>| -> Result<Option<u64>> {
            v.map(|v| parse_duration(&v).map_err(|e| Error::Setting(format!("{}: {e}", in_file(key))))).transpose()
        };
        let retention = RetentionPolicy {
            keep_last: r.keep_last,
            keep_within_secs: duration("retention.keep-within", r.keep_within)?,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
            keep_yearly: r.keep_yearly,
        };
        if retention.keep_last == Some(0) {
            return Err(Error::Setting(format!(
                "{} is 0: it would allow deleting every backup; leave it out instead",
                in_file("retention.keep-last")
            )));
        }
        let grace_secs = duration("retention.grace", r.grace)?.unwrap_or(DEFAULT_GRACE_SECS);
        if let Some(bin) = &parsed.pg_bin
            && !bin.is_absolute()
        {
            return Err(Error::Setting(format!("{} must be an absolute directory", in_file("pg-bin"))));
        }
        let jobs = parsed.jobs.unwrap_or(DEFAULT_JOBS);
        if !(1..=64).contains(&jobs) {
            return Err(Error::Setting(format!("{} is {jobs}, expected 1 to 64", in_file("jobs"))));
        }
        let spool = parsed.spool_path.unwrap_or_else(|| {
            catalog.parent().map_or_else(|| PathBuf::from("/var/lib/walvault"), Path::to_path_buf).join("spool")
        });
        if !spool.is_absolute() {
            return Err(Error::Setting(format!("{} must be an absolute directory", in_file("spool-path"))));
        }
        let size = |key: &str, v: Option<String>| -> Result<Option<u64>> {
            v.map(|v| parse_size(&v).map_err(|e| Error::Setting(format!("{}: {e}", in_file(key))))).transpose()
        };
        let queue_max = size("queue-max", parsed.queue_max)?;
        let prefetch = parsed.prefetch.unwrap_or(0);
        if prefetch > 1024 {
            return Err(Error::Setting(format!("{} is {prefetch}, expected 0 to 1024", in_file("prefetch"))));
        }
        let prefetch_max = size("prefetch-max", parsed.prefetch_max)?.unwrap_or(DEFAULT_PREFETCH_MAX);
        let top_s3 = parsed.s3.unwrap_or_default();
        let s3 = s3_settings(&top_s3, None, "s3", &in_file)?;
        let repositories = repositories(
            overrides,
            parsed.repository,
            parsed.repositories,
            &RepoDefaults { catalog: &catalog, s3: &s3, top_s3: &top_s3, file: file.as_deref() },
            &in_file,
        )?;
        let first = &repositories[0];
        Ok(Config {
            s3: first.s3.clone(),
            repository: first.location.clone(),
            catalog: first.catalog.clone(),
            repositories,
            file,
            cluster,
            compress_level,
            compress_workers,
            fetch_on_error: parsed.fetch_on_error.unwrap_or(FetchOnError::Auto),
            async_push: parsed.async_push.unwrap_or(false),
            jobs,
            spool,
            queue_max,
            prefetch,
            prefetch_max,
            retention,
            grace_secs,
            pg_bin: parsed.pg_bin,
        })
    }

    /// The single-repository view of `spec`: this configuration with only
    /// that repository.
    fn view(&self, spec: &RepoSpec) -> Config {
        Config {
            repository: spec.location.clone(),
            catalog: spec.catalog.clone(),
            s3: spec.s3.clone(),
            repositories: vec![spec.clone()],
            ..self.clone()
        }
    }

    /// One single-repository view per repository, in priority order.
    pub fn each(&self) -> Vec<Config> {
        self.repositories.iter().map(|r| self.view(r)).collect()
    }

    /// The single-repository view of the repository named `name`.
    ///
    /// # Errors
    /// [`Error::Setting`] naming the configured repositories when there is
    /// none by that name.
    pub fn select(&self, name: &str) -> Result<Config> {
        match self.repositories.iter().find(|r| r.name == name) {
            Some(spec) => Ok(self.view(spec)),
            None => Err(Error::Setting(format!(
                "no repository named '{name}' in the configuration (configured: {})",
                self.names().join(", ")
            ))),
        }
    }

    /// The names of the repositories, in priority order, quoted.
    fn names(&self) -> Vec<String> {
        self.repositories.iter().map(|r| format!("'{}'", r.name)).collect()
    }

    /// The name of the (first) repository this configuration describes.
    pub fn repo_name(&self) -> &str {
        self.repositories.first().map_or(DEFAULT_REPO_NAME, |r| r.name.as_str())
    }

    /// Whether several repositories are configured.
    pub fn is_multi(&self) -> bool {
        self.repositories.len() > 1
    }
}

/// What a `[[repositories]]` entry inherits.
struct RepoDefaults<'a> {
    catalog: &'a Path,
    s3: &'a S3Settings,
    top_s3: &'a FileS3,
    file: Option<&'a Path>,
}

/// Resolves the `[s3]` table `own` (a repository's, or the top-level one),
/// key by key over `base` (the top-level table, for a repository's).
fn s3_settings(
    own: &FileS3,
    base: Option<&FileS3>,
    table: &str,
    in_file: &dyn Fn(&str) -> String,
) -> Result<S3Settings> {
    let empty = FileS3::default();
    let base = base.unwrap_or(&empty);
    let d = S3Settings::default();
    let duration = |key: &str, v: Option<&String>| -> Result<Option<u64>> {
        v.map(|v| parse_duration(v).map_err(|e| Error::Setting(format!("{}: {e}", in_file(&format!("{table}.{key}"))))))
            .transpose()
    };
    let request_timeout_secs =
        duration("request-timeout", own.request_timeout.as_ref().or(base.request_timeout.as_ref()))?
            .unwrap_or(d.request_timeout_secs);
    if request_timeout_secs == 0 {
        return Err(Error::Setting(format!("{} must be at least 1s", in_file(&format!("{table}.request-timeout")))));
    }
    let credentials_file = own.credentials_file.clone().or_else(|| base.credentials_file.clone());
    if let Some(p) = &credentials_file
        && !p.is_absolute()
    {
        return Err(Error::Setting(format!(
            "{} must be an absolute path",
            in_file(&format!("{table}.credentials-file"))
        )));
    }
    Ok(S3Settings {
        endpoint: own.endpoint.clone().or_else(|| base.endpoint.clone()),
        region: own.region.clone().or_else(|| base.region.clone()).unwrap_or(d.region),
        path_style: own.path_style.or(base.path_style).unwrap_or(false),
        allow_http: own.allow_http.or(base.allow_http).unwrap_or(false),
        anonymous: own.anonymous.or(base.anonymous).unwrap_or(false),
        credentials_file,
        request_timeout_secs,
        retry_budget_secs: duration("retry-budget", own.retry_budget.as_ref().or(base.retry_budget.as_ref()))?
            .unwrap_or(d.retry_budget_secs),
        conditional_create: own.conditional_create.or(base.conditional_create).unwrap_or_default(),
    })
}

/// Checks a repository name: 1–32 of `[a-z0-9_-]`.
fn validate_repo_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The repository list: `--repository` (one ad-hoc repository), else the
/// file's `repository` or `[[repositories]]`; then `--repo` picks one.
fn repositories(
    overrides: &Overrides,
    single: Option<String>,
    list: Option<Vec<FileRepository>>,
    d: &RepoDefaults<'_>,
    in_file: &dyn Fn(&str) -> String,
) -> Result<Vec<RepoSpec>> {
    let single_spec = |location: String, what: &str| -> Result<RepoSpec> {
        if location.is_empty() {
            return Err(Error::Setting(format!("{what} is empty")));
        }
        Ok(RepoSpec {
            name: DEFAULT_REPO_NAME.into(),
            location,
            required: true,
            catalog: d.catalog.to_path_buf(),
            s3: d.s3.clone(),
        })
    };
    if let Some(location) = overrides.repository.clone() {
        if overrides.repo.is_some() {
            return Err(Error::Setting("--repository and --repo both choose a repository: give one of them".into()));
        }
        return Ok(vec![single_spec(location, "--repository")?]);
    }
    let specs = match (single, list) {
        (Some(_), Some(_)) => {
            return Err(Error::Setting(format!(
                "{} and [[repositories]] are both set: use one form",
                in_file("repository")
            )));
        }
        (Some(location), None) => vec![single_spec(location, &in_file("repository"))?],
        (None, Some(list)) => {
            if list.is_empty() {
                return Err(Error::Setting(format!("{} lists no repository", in_file("repositories"))));
            }
            let mut specs: Vec<RepoSpec> = Vec::with_capacity(list.len());
            for (i, r) in list.into_iter().enumerate() {
                let at = |key: &str| in_file(&format!("repositories[{i}].{key}"));
                if !validate_repo_name(&r.name) {
                    return Err(Error::Setting(format!(
                        "{} is '{}': expected 1-32 lowercase letters, digits, '_' or '-'",
                        at("name"),
                        r.name.escape_default()
                    )));
                }
                if specs.iter().any(|s| s.name == r.name) {
                    return Err(Error::Setting(format!("{}: the name '{}' is used twice", at("name"), r.name)));
                }
                if r.location.is_empty() {
                    return Err(Error::Setting(format!("{} is empty", at("location"))));
                }
                let catalog = match r.catalog {
                    Some(c) => c,
                    None if i == 0 => d.catalog.to_path_buf(),
                    None => d.catalog.with_file_name(format!("catalog-{}.db", r.name)),
                };
                if !catalog.is_absolute() {
                    return Err(Error::Setting(format!("{} must be an absolute path", at("catalog"))));
                }
                let s3 = match &r.s3 {
                    Some(own) => s3_settings(own, Some(d.top_s3), &format!("repositories[{i}].s3"), in_file)?,
                    None => d.s3.clone(),
                };
                specs.push(RepoSpec {
                    name: r.name,
                    location: r.location,
                    required: r.required.unwrap_or(true),
                    catalog,
                    s3,
                });
            }
            if !specs.iter().any(|s| s.required) {
                return Err(Error::Setting(format!(
                    "no repository in {} is required: archive-push would succeed without storing anything; \
                     set required = true on at least one",
                    in_file("repositories")
                )));
            }
            let mut catalogs: Vec<&Path> = specs.iter().map(|s| s.catalog.as_path()).collect();
            catalogs.sort();
            if catalogs.windows(2).any(|w| w[0] == w[1]) {
                return Err(Error::Setting(format!(
                    "two repositories in {} share a catalog file: give each its own 'catalog'",
                    in_file("repositories")
                )));
            }
            specs
        }
        (None, None) => {
            return Err(Error::Setting(match d.file {
                Some(f) => format!(
                    "no repository: set 'repository' (or [[repositories]]) in '{}' or pass --repository",
                    f.display()
                ),
                None => format!(
                    "no repository: no configuration file ('{DEFAULT_CONFIG}' does not exist, WALVAULT_CONFIG \
                     is not set) and no --repository"
                ),
            }));
        }
    };
    match &overrides.repo {
        None => Ok(specs),
        Some(name) => match specs.iter().find(|s| &s.name == name) {
            Some(spec) => Ok(vec![spec.clone()]),
            None => Err(Error::Setting(format!(
                "--repo '{name}': no repository by that name in the configuration (configured: {})",
                specs.iter().map(|s| format!("'{}'", s.name)).collect::<Vec<_>>().join(", ")
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("walvault-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn retention_section_and_durations() {
        let p = write(
            "retention",
            "repository = \"/r\"\npg-bin = \"/usr/lib/postgresql/15/bin\"\n[retention]\nkeep-last = 2\nkeep-within = \"14d\"\nkeep-daily = 7\ngrace = \"2h\"\n",
        );
        let c = Config::load(&Overrides::default(), Some(p.clone())).unwrap();
        std::fs::remove_file(p).unwrap();
        assert_eq!(c.retention.keep_last, Some(2));
        assert_eq!(c.retention.keep_within_secs, Some(14 * 86_400));
        assert_eq!(c.retention.keep_daily, Some(7));
        assert_eq!(c.grace_secs, 7200);
        assert_eq!(c.pg_bin, Some(PathBuf::from("/usr/lib/postgresql/15/bin")));
        assert_eq!(parse_duration("1d12h"), Ok(129_600));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512 MB"), Ok(512 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "0", "GiB", "4XB", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("2w"), Ok(1_209_600));
        for bad in ["", "14", "d", "1x", "0d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let p = write("keep0", "repository = \"/r\"\n[retention]\nkeep-last = 0\n");
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        std::fs::remove_file(p).unwrap();
        assert!(e.contains("every backup"), "{e}");
        let p = write("badwithin", "repository = \"/r\"\n[retention]\nkeep-within = \"forever\"\n");
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        std::fs::remove_file(p).unwrap();
        assert!(e.contains("retention.keep-within") && e.contains("forever"), "{e}");
    }

    #[test]
    fn file_and_overrides() {
        let p = write("ok", "cluster = \"db1\"\nrepository = \"/r\"\ncompress-level = 5\nfetch-on-error = \"retry\"\n");
        let c = Config::load(&Overrides::default(), Some(p.clone())).unwrap();
        assert_eq!((c.cluster.as_str(), c.repository.as_str(), c.compress_level), ("db1", "/r", 5));
        assert_eq!(c.catalog, PathBuf::from("/var/lib/walvault/db1/catalog.db"));
        assert_eq!(c.fetch_on_error, FetchOnError::Retry);
        let o = Overrides { repository: Some("/other".into()), config: Some(p.clone()), ..Default::default() };
        assert_eq!(Config::load(&o, None).unwrap().repository, "/other");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn errors_name_file_and_key() {
        let p = write("bad", "repository = \"/r\"\ncompres-level = 3\n");
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("compres-level") && e.contains("line 2"), "{e}");
        std::fs::write(&p, "repository = [\n").unwrap();
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        assert!(e.contains("invalid configuration file") && !e.contains('\n'), "{e}");
        std::fs::write(&p, "repository = \"/r\"\ncompress-level = 40\n").unwrap();
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        assert!(e.contains("compress-level") && e.contains("40"), "{e}");
        std::fs::write(&p, "repository = \"/r\"\ncluster = \"../x\"\n").unwrap();
        assert!(Config::load(&Overrides::default(), Some(p.clone())).is_err());
        std::fs::remove_file(&p).unwrap();
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        assert!(e.contains("unable to read"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// pg-config-examples/walvault.toml is the documented configuration:
    /// it must load, and say what the docs say it says.
    #[test]
    fn shipped_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pg-config-examples/walvault.toml");
        let c = Config::load(&Overrides::default(), Some(path)).unwrap();
        assert_eq!(c.cluster, "main");
        assert_eq!(c.repository, "/var/lib/walvault/repo");
        assert_eq!(c.catalog, PathBuf::from("/var/lib/walvault/main/catalog.db"));
        assert_eq!((c.compress_level, c.compress_workers, c.fetch_on_error), (3, 0, FetchOnError::Auto));
        let r = c.retention;
        assert_eq!((r.keep_last, r.keep_within_secs), (Some(2), Some(14 * 86_400)));
        assert_eq!((r.keep_daily, r.keep_weekly, r.keep_monthly, r.keep_yearly), (Some(7), Some(4), Some(12), None));
        assert_eq!(c.grace_secs, 24 * 3600);
        assert_eq!(c.pg_bin, None);
        assert_eq!(c.s3, S3Settings::default(), "[s3] is commented out in the example");
        assert_eq!((c.async_push, c.jobs, c.queue_max, c.prefetch), (false, DEFAULT_JOBS, None, 0));
        assert_eq!((c.spool.as_path(), c.prefetch_max), (Path::new("/var/lib/walvault/main/spool"), 1 << 30));
    }

    /// pg-config-examples/walvault-offsite.toml: a NAS and an optional
    /// offsite bucket.
    #[test]
    fn shipped_offsite_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pg-config-examples/walvault-offsite.toml");
        let c = Config::load(&Overrides::default(), Some(path)).unwrap();
        let r: Vec<(&str, &str, bool)> =
            c.repositories.iter().map(|r| (r.name.as_str(), r.location.as_str(), r.required)).collect();
        assert_eq!(r, [("nas", "/mnt/nas/walvault", true), ("offsite", "s3://walvault-offsite/db1", false)]);
        let off = &c.repositories[1];
        assert_eq!(off.catalog, PathBuf::from("/var/lib/walvault/main/catalog-offsite.db"));
        assert_eq!(off.s3.endpoint.as_deref(), Some("https://s3.eu-central-1.amazonaws.com"));
        assert_eq!(
            (off.s3.region.as_str(), off.s3.request_timeout_secs, off.s3.retry_budget_secs),
            ("eu-central-1", 20, 60)
        );
    }

    #[test]
    fn s3_table() {
        let dir = std::env::temp_dir().join(format!("walvault-s3cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(
            &p,
            "repository = \"s3://bucket/prefix\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"\n\
             path-style = true\nallow-http = true\ncredentials-file = \"/etc/walvault/s3.toml\"\n\
             request-timeout = \"5s\"\nretry-budget = \"2m\"\n",
        )
        .unwrap();
        let c = Config::load(&Overrides::default(), Some(p.clone())).unwrap();
        assert_eq!(c.repository, "s3://bucket/prefix");
        let s = &c.s3;
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((s.region.as_str(), s.path_style, s.allow_http, s.anonymous), ("eu-west-1", true, true, false));
        assert_eq!(s.credentials_file.as_deref(), Some(Path::new("/etc/walvault/s3.toml")));
        assert_eq!((s.request_timeout_secs, s.retry_budget_secs), (5, 120));
        std::fs::write(&p, "repository = \"s3://b/p\"\n[s3]\nsecret-access-key = \"TOPSECRET\"\n").unwrap();
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        assert!(!e.contains("TOPSECRET"), "secrets do not go in the config, nor in its errors: {e}");
        std::fs::write(&p, "repository = \"s3://b/p\"\n[s3]\ncredentials-file = \"rel.toml\"\n").unwrap();
        assert!(Config::load(&Overrides::default(), Some(p.clone())).is_err());
        std::fs::write(&p, "repository = \"s3://b/p\"\n[s3]\nrequest-timeout = \"0s\"\n").unwrap();
        assert!(Config::load(&Overrides::default(), Some(p)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod repositories_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn load(tag: &str, text: &str, overrides: Overrides) -> Result<Config> {
        let p = std::env::temp_dir().join(format!("walvault-config-{}-repos-{tag}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        let r = Config::load(&Overrides { config: Some(p.clone()), ..overrides }, None);
        std::fs::remove_file(&p).unwrap();
        r
    }

    const TWO: &str = "catalog = \"/var/lib/wv/catalog.db\"\n[s3]\nregion = \"eu-west-1\"\nrequest-timeout = \"7s\"\n\
                       [[repositories]]\nname = \"nas\"\nlocation = \"/mnt/nas\"\n\
                       [[repositories]]\nname = \"offsite\"\nlocation = \"s3://b/p\"\nrequired = false\n\
                       [repositories.s3]\nendpoint = \"http://127.0.0.1:9000\"\nallow-http = true\n";

    #[test]
    fn a_list_of_repositories_in_priority_order() {
        let c = load("two", TWO, Overrides::default()).unwrap();
        assert!(c.is_multi());
        let names: Vec<&str> = c.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["nas", "offsite"]);
        assert_eq!((c.repository.as_str(), c.repo_name()), ("/mnt/nas", "nas"), "the first is the default view");
        let (nas, off) = (&c.repositories[0], &c.repositories[1]);
        assert!(nas.required && !off.required, "required by default");
        assert_eq!(nas.catalog, PathBuf::from("/var/lib/wv/catalog.db"));
        assert_eq!(off.catalog, PathBuf::from("/var/lib/wv/catalog-offsite.db"));
        // A repository's own [s3] keys win, the others come from [s3].
        assert_eq!(off.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((off.s3.region.as_str(), off.s3.request_timeout_secs, off.s3.allow_http), ("eu-west-1", 7, true));
        assert_eq!(nas.s3.endpoint, None);
        let v = c.select("offsite").unwrap();
        assert_eq!((v.repository.as_str(), v.catalog.clone(), v.is_multi()), ("s3://b/p", off.catalog.clone(), false));
        assert_eq!(v.s3, off.s3);
        let e = c.select("tape").unwrap_err().to_string();
        assert!(e.contains("'tape'") && e.contains("'nas', 'offsite'"), "{e}");
        let each: Vec<String> = c.each().into_iter().map(|v| v.repository).collect();
        assert_eq!(each, ["/mnt/nas", "s3://b/p"]);
    }

    #[test]
    fn repo_and_repository_flags() {
        let c = load("pick", TWO, Overrides { repo: Some("offsite".into()), ..Default::default() }).unwrap();
        assert_eq!((c.repositories.len(), c.repo_name(), c.repository.as_str()), (1, "offsite", "s3://b/p"));
        let e = load("pick-bad", TWO, Overrides { repo: Some("x".into()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("--repo 'x'"), "{e}");
        let c = load("adhoc", TWO, Overrides { repository: Some("/other".into()), ..Default::default() }).unwrap();
        assert_eq!((c.repositories.len(), c.repo_name(), c.repository.as_str()), (1, DEFAULT_REPO_NAME, "/other"));
        let both = Overrides { repository: Some("/o".into()), repo: Some("nas".into()), ..Default::default() };
        assert!(load("both", TWO, both).is_err());
    }

    #[test]
    fn bad_lists_are_refused_with_the_key() {
        let cases = [
            ("both-forms", "repository = \"/r\"\n[[repositories]]\nname = \"a\"\nlocation = \"/a\"\n", "both set"),
            (
                "dup",
                "[[repositories]]\nname = \"a\"\nlocation = \"/a\"\n[[repositories]]\nname = \"a\"\nlocation = \"/b\"\n",
                "used twice",
            ),
            ("badname", "[[repositories]]\nname = \"A B\"\nlocation = \"/a\"\n", "repositories[0].name"),
            ("none-required", "[[repositories]]\nname = \"a\"\nlocation = \"/a\"\nrequired = false\n", "required"),
            ("empty", "[[repositories]]\nname = \"a\"\nlocation = \"\"\n", "repositories[0].location"),
            (
                "same-catalog",
                "[[repositories]]\nname = \"a\"\nlocation = \"/a\"\ncatalog = \"/c.db\"\n\
                 [[repositories]]\nname = \"b\"\nlocation = \"/b\"\ncatalog = \"/c.db\"\n",
                "share a catalog",
            ),
            ("unknown-key", "[[repositories]]\nname = \"a\"\nlocation = \"/a\"\npriority = 1\n", "priority"),
        ];
        for (tag, text, expect) in cases {
            let e = load(tag, text, Overrides::default()).unwrap_err().to_string();
            assert!(e.contains(expect) && !e.contains('\n'), "{tag}: {e}");
        }
    }
}

#[cfg(test)]
mod type_error_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn type_errors_name_the_key() {
        let p = std::env::temp_dir().join(format!("walvault-config-{}-type.toml", std::process::id()));
        std::fs::write(&p, "repository = \"/r\"\ncompress-level = \"high\"\n").unwrap();
        let e = Config::load(&Overrides::default(), Some(p.clone())).unwrap_err().to_string();
        assert!(e.contains("compress-level") && e.contains("line 2") && e.contains(&p.display().to_string()), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}
