//! Several repositories at once: running an operator command on each
//! configured repository and putting the answers together.
//!
//! archive-push and archive-fetch handle several repositories themselves
//! ([`crate::push`], [`crate::fetch`]); restore falls back by itself
//! ([`crate::restore`]). The commands that report on or maintain one
//! repository at a time (info, verify, expire, catalog rebuild,
//! keep-forever, init) run once per repository through [`each`], in
//! priority order, and a failure in one does not stop the others.

use std::fmt;

use crate::config::{Config, RepoSpec};
use crate::error::{Error, Result};

/// The outcome of a command in one repository.
#[derive(Debug)]
pub struct RepoOutcome<T> {
    /// The repository.
    pub spec: RepoSpec,
    /// What the command returned there.
    pub result: Result<T>,
}

/// Runs `command` on each repository of `config` (a single-repository
/// view each), in priority order.
pub fn each<T>(config: &Config, mut command: impl FnMut(&Config) -> Result<T>) -> Vec<RepoOutcome<T>> {
    config
        .each()
        .into_iter()
        .map(|view| {
            let result = command(&view);
            RepoOutcome { spec: view.repositories[0].clone(), result }
        })
        .collect()
}

/// The first error of `outcomes`, naming its repository when there are
/// several; `Ok` when every repository succeeded.
///
/// # Errors
/// [`Error::InRepository`] summarizing the failures.
pub fn first_failure<T>(outcomes: Vec<RepoOutcome<T>>) -> Result<Vec<(RepoSpec, T)>> {
    let several = outcomes.len() > 1;
    let mut ok = Vec::with_capacity(outcomes.len());
    let mut failed: Vec<(String, Error)> = Vec::new();
    for o in outcomes {
        match o.result {
            Ok(t) => ok.push((o.spec, t)),
            Err(e) => failed.push((o.spec.name, e)),
        }
    }
    if failed.is_empty() {
        return Ok(ok);
    }
    if !several {
        let (_, e) = failed.remove(0);
        return Err(e);
    }
    let names: Vec<String> = failed.iter().map(|(n, _)| format!("'{n}'")).collect();
    let (name, first) = failed.remove(0);
    Err(Error::InRepository { name, count: names.len(), names: names.join(", "), source: Box::new(first) })
}

/// A header line for one repository's section of a report:
/// `repository 'nas' (/mnt/nas/walvault, required)`.
pub fn header(spec: &RepoSpec) -> String {
    let role = if spec.required { "required" } else { "optional" };
    format!("repository '{}' ({}, {role})", spec.name, spec.location)
}

/// `walvault info` over every repository.
#[derive(Debug)]
pub struct AllInfo {
    /// One entry per repository, in priority order.
    pub repositories: Vec<RepoOutcome<crate::info::Info>>,
}

impl AllInfo {
    /// Builds the report of every repository of `config`.
    pub fn collect(config: &Config, now_ms: i64) -> AllInfo {
        AllInfo {
            repositories: each(config, |view| {
                // The report comes from the catalog; one read of the
                // cluster's identity says whether the repository itself
                // still answers.
                crate::repo::Repository::open_config(view)?.cluster_info()?;
                crate::info::info(view, now_ms)
            }),
        }
    }

    /// Whether any repository could not report.
    pub fn any_failed(&self) -> bool {
        self.repositories.iter().any(|r| r.result.is_err())
    }

    /// The JSON form: the first repository's report at the top level (the
    /// shape of a single repository's), plus `repositories`, one entry per
    /// repository with its `info` or its `error`.
    ///
    /// # Errors
    /// When a report cannot be serialized (never in practice).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let json_err = |e: serde_json::Error| Error::Setting(format!("unable to write JSON: {e}"));
        let mut list = Vec::with_capacity(self.repositories.len());
        let mut top = serde_json::Map::new();
        for (i, r) in self.repositories.iter().enumerate() {
            let mut entry = serde_json::Map::new();
            entry.insert("name".into(), r.spec.name.clone().into());
            entry.insert("location".into(), r.spec.location.clone().into());
            entry.insert("required".into(), r.spec.required.into());
            match &r.result {
                Ok(info) => {
                    let value = serde_json::to_value(info).map_err(json_err)?;
                    if i == 0
                        && let serde_json::Value::Object(fields) = &value
                    {
                        top = fields.clone();
                    }
                    entry.insert("info".into(), value);
                }
                Err(e) => {
                    entry.insert("error".into(), e.to_string().into());
                }
            }
            list.push(serde_json::Value::Object(entry));
        }
        top.insert("repositories".into(), serde_json::Value::Array(list));
        Ok(serde_json::Value::Object(top))
    }
}

impl fmt::Display for AllInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let several = self.repositories.len() > 1;
        for (i, r) in self.repositories.iter().enumerate() {
            if several {
                if i > 0 {
                    writeln!(f)?;
                }
                writeln!(f, "== {} ==", header(&r.spec))?;
            }
            match &r.result {
                Ok(info) => write!(f, "{info}")?,
                Err(e) => {
                    writeln!(f, "error: {e}")?;
                    if let Some(hint) = e.hint() {
                        writeln!(f, "HINT: {hint}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// `walvault verify` over every repository.
#[derive(Debug)]
pub struct AllVerify {
    /// One entry per repository, in priority order.
    pub repositories: Vec<RepoOutcome<crate::verify::VerifyReport>>,
}

impl AllVerify {
    /// Verifies every repository of `config`.
    pub fn run(config: &Config, opts: &crate::verify::VerifyOptions) -> AllVerify {
        AllVerify { repositories: each(config, |view| crate::verify::verify(view, opts)) }
    }

    /// Problems found, over all repositories; a repository that could not
    /// be verified counts as one.
    pub fn problem_count(&self) -> usize {
        self.repositories.iter().map(|r| r.result.as_ref().map_or(1, |rep| rep.problems.len())).sum()
    }

    /// The JSON form: with one repository, its report as it is; with
    /// several, `{"repositories": [{"name", "location", "report" | "error"}]}`.
    ///
    /// # Errors
    /// When a report cannot be serialized (never in practice).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let json_err = |e: serde_json::Error| Error::Setting(format!("unable to write JSON: {e}"));
        if let [only] = self.repositories.as_slice()
            && let Ok(report) = &only.result
        {
            return serde_json::to_value(report).map_err(json_err);
        }
        let mut list = Vec::new();
        for r in &self.repositories {
            let mut entry = serde_json::Map::new();
            entry.insert("name".into(), r.spec.name.clone().into());
            entry.insert("location".into(), r.spec.location.clone().into());
            match &r.result {
                Ok(report) => entry.insert("report".into(), serde_json::to_value(report).map_err(json_err)?),
                Err(e) => entry.insert("error".into(), e.to_string().into()),
            };
            list.push(serde_json::Value::Object(entry));
        }
        Ok(serde_json::json!({ "repositories": list }))
    }
}

impl fmt::Display for AllVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let several = self.repositories.len() > 1;
        for (i, r) in self.repositories.iter().enumerate() {
            if several && i > 0 {
                writeln!(f)?;
            }
            if several {
                writeln!(f, "== {} ==", header(&r.spec))?;
            }
            match &r.result {
                // Each problem line names its repository, so that a log
                // filtered on "problem:" still says where.
                Ok(report) if several => {
                    let text = report.to_string();
                    write!(f, "{}", text.replace("problem: ", &format!("problem: [{}] ", r.spec.name)))?;
                }
                Ok(report) => write!(f, "{report}")?,
                Err(e) => writeln!(f, "problem: [{}] unable to verify: {e}", r.spec.name)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Overrides;

    fn two_repos(dir: &std::path::Path) -> Config {
        let text = format!(
            "catalog = \"{d}/catalog.db\"\n[[repositories]]\nname = \"nas\"\nlocation = \"{d}/a\"\n\
             [[repositories]]\nname = \"offsite\"\nlocation = \"{d}/b\"\nrequired = false\n",
            d = dir.display()
        );
        let p = dir.join("walvault.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&Overrides::default(), Some(p)).unwrap()
    }

    #[test]
    fn each_runs_in_priority_order_and_first_failure_names_the_repository() {
        let dir = std::env::temp_dir().join(format!("walvault-multi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = two_repos(&dir);
        let mut seen = Vec::new();
        let outcomes = each(&config, |v| {
            seen.push((v.repository.clone(), v.catalog.clone(), v.repositories.len()));
            if v.repo_name() == "offsite" { Err(Error::Setting("boom".into())) } else { Ok(()) }
        });
        assert_eq!(
            seen,
            [
                (format!("{}/a", dir.display()), dir.join("catalog.db"), 1),
                (format!("{}/b", dir.display()), dir.join("catalog-offsite.db"), 1)
            ]
        );
        let e = first_failure(outcomes).unwrap_err().to_string();
        assert!(e.contains("'offsite'") && e.contains("boom"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod push_fetch_tests {
    //! archive-push and archive-fetch over two local repositories.
    #![allow(clippy::unwrap_used)]

    use walvault_formats::wal::{ClusterIdentity, PgVersion, SegmentNo, SystemId, TimelineId, WalSegmentSize};

    use crate::config::{Config, Overrides};
    use crate::fetch::{FetchOutcome, fetch_all};
    use crate::push::{PushStatus, push};

    const SEGMENT: &str = "000000010000000000000005";

    struct Two {
        dir: std::path::PathBuf,
        config: Config,
        identity: ClusterIdentity,
    }

    /// Repositories `a` (required) and `b` (`b_required`), both
    /// initialized, and a segment file in the directory.
    fn two(tag: &str, b_required: bool) -> Two {
        let dir = std::env::temp_dir().join(format!("walvault-multi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "catalog = \"{d}/catalog.db\"\n[[repositories]]\nname = \"a\"\nlocation = \"{d}/a\"\n\
             [[repositories]]\nname = \"b\"\nlocation = \"{d}/b\"\nrequired = {b_required}\n",
            d = dir.display()
        );
        let p = dir.join("walvault.toml");
        std::fs::write(&p, text).unwrap();
        let config = Config::load(&Overrides::default(), Some(p)).unwrap();
        let identity = ClusterIdentity {
            system_id: SystemId(4242),
            pg_version: PgVersion::new(15).unwrap(),
            segment_size: WalSegmentSize::new(1 << 20).unwrap(),
        };
        for view in config.each() {
            crate::init::init(&view, &identity).unwrap();
        }
        let bytes = walvault_formats::wal::synthetic_segment(&identity, TimelineId::FIRST, SegmentNo(5), 9);
        std::fs::write(dir.join(SEGMENT), bytes).unwrap();
        Two { dir, config, identity }
    }

    fn object(t: &Two, repo: &str) -> std::path::PathBuf {
        t.dir.join(repo).join("main/wal/0000000100000000").join(SEGMENT)
    }

    /// Makes a repository's WAL directory unwritable for anyone, root
    /// included: a file where the directory should be.
    fn break_wal_dir(t: &Two, repo: &str) {
        let wal = t.dir.join(repo).join("main/wal");
        let _ = std::fs::remove_dir_all(&wal);
        std::fs::write(&wal, b"not a directory").unwrap();
    }

    #[test]
    fn push_stores_in_every_repository() {
        let t = two("both", true);
        let out = push(&t.config, &t.dir.join(SEGMENT)).unwrap();
        assert_eq!(out.status, PushStatus::Stored);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(std::fs::read(object(&t, "a")).unwrap(), std::fs::read(object(&t, "b")).unwrap());
        // A retry is idempotent in both.
        assert_eq!(push(&t.config, &t.dir.join(SEGMENT)).unwrap().status, PushStatus::AlreadyArchived);
        let _ = t.identity;
        std::fs::remove_dir_all(&t.dir).unwrap();
    }

    #[test]
    fn a_required_repository_that_fails_fails_the_push() {
        let t = two("required", true);
        break_wal_dir(&t, "b");
        let e = push(&t.config, &t.dir.join(SEGMENT)).unwrap_err().to_string();
        assert!(e.contains(&format!("{}/b", t.dir.display())), "the error names the repository: {e}");
        assert!(object(&t, "a").exists(), "the other repository still got it");
        std::fs::remove_dir_all(&t.dir).unwrap();
    }

    #[test]
    fn an_optional_repository_that_fails_is_a_warning() {
        let t = two("optional", false);
        break_wal_dir(&t, "b");
        let out = push(&t.config, &t.dir.join(SEGMENT)).unwrap();
        assert_eq!(out.status, PushStatus::Stored);
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        let w = &out.warnings[0];
        assert!(w.contains("optional repository 'b'") && w.contains("walvault repo sync --from a --to b"), "{w}");
        assert!(object(&t, "a").exists());
        std::fs::remove_dir_all(&t.dir).unwrap();
    }

    #[test]
    fn a_conflict_in_an_optional_repository_fails_the_push() {
        let t = two("conflict", false);
        // Another file under the same name in b only.
        let other = walvault_formats::wal::synthetic_segment(&t.identity, TimelineId::FIRST, SegmentNo(5), 1);
        let elsewhere = t.dir.join("other");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join(SEGMENT), other).unwrap();
        push(&t.config.select("b").unwrap(), &elsewhere.join(SEGMENT)).unwrap();
        let e = push(&t.config, &t.dir.join(SEGMENT)).unwrap_err().to_string();
        assert!(e.contains("different content"), "{e}");
        std::fs::remove_dir_all(&t.dir).unwrap();
    }

    #[test]
    fn fetch_falls_back_in_priority_order_and_says_missing_only_when_all_do() {
        let t = two("fetch", true);
        push(&t.config, &t.dir.join(SEGMENT)).unwrap();
        let dest = t.dir.join("RECOVERYXLOG");
        let original = std::fs::read(t.dir.join(SEGMENT)).unwrap();

        // Gone from a: b gives it, quietly (a "not there" is no failure).
        std::fs::remove_file(object(&t, "a")).unwrap();
        let r = fetch_all(&t.config, SEGMENT, &dest);
        assert_eq!(r.result.unwrap(), FetchOutcome::Restored);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert_eq!(std::fs::read(&dest).unwrap(), original);
        std::fs::remove_file(&dest).unwrap();

        // Corrupt in a: b gives it, and a note names a.
        std::fs::copy(object(&t, "b"), object(&t, "a")).unwrap();
        let mut bytes = std::fs::read(object(&t, "a")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(object(&t, "a"), bytes).unwrap();
        let r = fetch_all(&t.config, SEGMENT, &dest);
        assert_eq!(r.result.unwrap(), FetchOutcome::Restored);
        assert!(r.notes.len() == 1 && r.notes[0].contains("repository 'a'"), "{:?}", r.notes);
        assert_eq!(std::fs::read(&dest).unwrap(), original);
        std::fs::remove_file(&dest).unwrap();

        // Missing everywhere: missing.
        let r = fetch_all(&t.config, "000000010000000000000009", &dest);
        assert_eq!(r.result.unwrap(), FetchOutcome::Missing);

        // a unreachable, b does not have it: an error, never "missing".
        std::fs::rename(t.dir.join("a"), t.dir.join("a-away")).unwrap();
        let r = fetch_all(&t.config, "000000010000000000000009", &dest);
        let e = r.result.unwrap_err().to_string();
        assert!(e.contains(&format!("{}/a", t.dir.display())), "{e}");
        assert!(!dest.exists());
        std::fs::remove_dir_all(&t.dir).unwrap();
    }
}
