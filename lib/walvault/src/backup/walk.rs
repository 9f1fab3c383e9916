//! What a backup copies: the exclusion rules of PostgreSQL's "Backing Up
//! the Data Directory" and of pg_basebackup (`basebackup.c`), and the walk
//! of the data directory and tablespaces that applies them.
//!
//! The rules ([`verdict`]) are pure: a name and what its directory holds in,
//! a decision out. The walk lists entries parents before children, in byte
//! order of names, so that two backups of the same tree list it alike.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use walvault_formats::manifest::{Entry, EntryKind, FileData};

use super::BackupError;

/// Files never copied, in any directory. From `basebackup.c`'s
/// `excludeFiles`: a running server's lock and options files, the files of
/// a previous backup or of a recovery (restore writes its own), and
/// temporaries of `ALTER SYSTEM` and the logging collector.
const EXCLUDED_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_label.old",
    "tablespace_map.old",
    "backup_manifest",
    "recovery.signal",
    "standby.signal",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// Name prefixes never copied, in any directory: relation cache init files
/// (`pg_internal.init` and its temporaries `pg_internal.init.<pid>`), and
/// temporary files and directories (`pgsql_tmp*`).
const EXCLUDED_PREFIXES: &[&str] = &["pg_internal.init", "pgsql_tmp"];

/// Directories whose contents are never copied (the server recreates or
/// resets them at startup); the directories themselves are kept, empty, so
/// that their permissions are restored. From `excludeDirContents`.
const EMPTIED_DIRS: &[&str] =
    &["pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots", "pg_stat_tmp", "pg_subtrans"];

/// Subdirectories of `pg_wal` kept, empty: recovery expects them.
const WAL_SUBDIRS: &[&str] = &["archive_status", "summaries"];

/// What happens to one directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Copied (a directory: with its contents).
    Copy,
    /// Left out entirely.
    Skip,
    /// A directory recorded without its contents (a symbolic link to one is
    /// recorded as a directory).
    Empty,
}

/// What the rules need to know about the directory being listed.
#[derive(Debug, Default)]
pub(crate) struct DirRules {
    /// The data directory itself.
    top: bool,
    /// A database directory (`base/<oid>`, or `<oid>` in a tablespace's
    /// version directory): it holds relation files.
    database: bool,
    /// Relations of this directory that have an init fork (unlogged).
    unlogged: HashSet<String>,
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `rel` (relative to the data directory) is a database directory:
/// the test of `basebackup.c`'s `isDbDir`.
fn is_database_dir(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        ["base", db] => all_digits(db),
        ["pg_tblspc", ts, version, db] => all_digits(ts) && version.starts_with("PG_") && all_digits(db),
        _ => false,
    }
}

/// Splits a relation file name `<oid>[_<fork>][.<segment>]` (equivalent of
/// `parse_filename_for_nontemp_relation()`): the oid and the fork, if any.
pub(crate) fn parse_relation(name: &str) -> Option<(&str, Option<&str>)> {
    let (base, segment) = match name.split_once('.') {
        Some((b, s)) => (b, Some(s)),
        None => (name, None),
    };
    if segment.is_some_and(|s| !all_digits(s)) {
        return None;
    }
    let (oid, fork) = match base.split_once('_') {
        Some((o, f)) => (o, Some(f)),
        None => (base, None),
    };
    let fork_ok = fork.is_none_or(|f| matches!(f, "fsm" | "vm" | "init"));
    (all_digits(oid) && oid.len() <= 10 && fork_ok).then_some((oid, fork))
}

/// Whether `name` is a temporary relation's file, `t<backend>_<oid>` with an
/// optional fork and segment (equivalent of `looks_like_temp_rel_name()`).
pub(crate) fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else { return false };
    let Some((backend, relation)) = rest.split_once('_') else { return false };
    all_digits(backend) && parse_relation(relation).is_some()
}

impl DirRules {
    /// The rules for the directory `rel` (relative to the data directory,
    /// `""` for the data directory itself) whose entries are `names`.
    pub(crate) fn new<'a>(rel: &str, names: impl IntoIterator<Item = &'a str>) -> DirRules {
        let database = is_database_dir(rel);
        let unlogged = if database {
            names
                .into_iter()
                .filter_map(parse_relation)
                .filter(|(_, fork)| *fork == Some("init"))
                .map(|(oid, _)| oid.to_string())
                .collect()
        } else {
            HashSet::new()
        };
        DirRules { top: rel.is_empty(), database, unlogged }
    }
}

/// The fate of entry `name` of a directory with `rules`; `dir_like` when it
/// is a directory or a symbolic link (to one, presumably).
pub(crate) fn verdict(rules: &DirRules, name: &str, dir_like: bool) -> Verdict {
    if EXCLUDED_FILES.contains(&name) || EXCLUDED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Verdict::Skip;
    }
    if rules.database {
        if is_temp_relation(name) {
            return Verdict::Skip;
        }
        // An unlogged relation is reset from its init fork at the end of
        // recovery: its other forks are useless, the init fork is needed.
        if let Some((oid, fork)) = parse_relation(name)
            && fork != Some("init")
            && rules.unlogged.contains(oid)
        {
            return Verdict::Skip;
        }
    }
    if dir_like && (EMPTIED_DIRS.contains(&name) || (rules.top && name == "pg_wal")) {
        return Verdict::Empty;
    }
    Verdict::Copy
}

/// A file to copy.
#[derive(Debug, Clone)]
pub(crate) struct FileJob {
    /// Its entry in [`Tree::entries`].
    pub entry: usize,
    /// Where to read it.
    pub path: PathBuf,
    /// Its size when listed: at most this many bytes are read (what is
    /// appended later is WAL-logged and replayed).
    pub size: u64,
}

/// A tablespace to walk.
#[derive(Debug, Clone)]
pub(crate) struct TablespaceDir {
    /// Its OID, the name of its link in `pg_tblspc`.
    pub oid: u32,
    /// Its name, for messages.
    pub name: String,
    /// Its location (the link's target).
    pub location: PathBuf,
    /// This server's directory inside the location: `PG_<major>_<catversion>`.
    pub version_dir: String,
}

/// The result of the walk.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    /// Every entry, parents before children; files with placeholder data.
    pub entries: Vec<Entry>,
    /// Every regular file, in entry order.
    pub files: Vec<FileJob>,
    /// Entries left out for a reason the operator should know.
    pub warnings: Vec<String>,
}

fn mtime_ms(meta: &std::fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1000).saturating_add(meta.mtime_nsec() / 1_000_000)
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") }
}

fn read_err(path: &Path, source: io::Error) -> BackupError {
    BackupError::Read { path: path.to_path_buf(), source }
}

impl Tree {
    fn dir(&mut self, rel: String, meta: &std::fs::Metadata) {
        self.entries.push(Entry {
            path: rel,
            mode: meta.mode() & 0o7777,
            size: 0,
            mtime_ms: mtime_ms(meta),
            kind: EntryKind::Dir,
        });
    }

    /// Lists directory `abs` (known as `rel`) and everything below it.
    fn walk_dir(&mut self, abs: &Path, rel: &str) -> Result<(), BackupError> {
        let listing = match std::fs::read_dir(abs) {
            Ok(l) => l,
            // Dropped (a database, a temporary directory) since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.is_empty() => return Ok(()),
            Err(e) => return Err(read_err(abs, e)),
        };
        let mut names = Vec::new();
        for entry in listing {
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(read_err(abs, e)),
            }
        }
        names.sort_unstable();
        let rules = DirRules::new(rel, names.iter().filter_map(|n| n.to_str()));
        for name in names {
            self.walk_entry(abs, rel, &rules, name)?;
        }
        Ok(())
    }

    fn walk_entry(&mut self, dir: &Path, rel: &str, rules: &DirRules, name: OsString) -> Result<(), BackupError> {
        let abs = dir.join(&name);
        let Some(name) = name.to_str() else {
            self.warnings.push(format!("skipped '{}': the name is not UTF-8", abs.display()));
            return Ok(());
        };
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(read_err(&abs, e)),
        };
        let ft = meta.file_type();
        let rel_child = join(rel, name);
        match verdict(rules, name, ft.is_dir() || ft.is_symlink()) {
            Verdict::Skip => return Ok(()),
            Verdict::Empty => {
                // A link (pg_wal, pg_stat_tmp on a RAM disk) becomes a
                // directory with its target's permissions.
                let target = if ft.is_symlink() { std::fs::metadata(&abs).unwrap_or(meta) } else { meta };
                self.dir(rel_child.clone(), &target);
                if rules.top && name == "pg_wal" {
                    for sub in WAL_SUBDIRS {
                        let sub_meta = std::fs::metadata(abs.join(sub));
                        match sub_meta {
                            Ok(m) if m.is_dir() => self.dir(join(&rel_child, sub), &m),
                            // Recovery needs archive_status, even if it was lost.
                            _ if *sub == "archive_status" => self.dir(join(&rel_child, sub), &target),
                            _ => {}
                        }
                    }
                }
                return Ok(());
            }
            Verdict::Copy => {}
        }
        if ft.is_dir() {
            self.dir(rel_child.clone(), &meta);
            self.walk_dir(&abs, &rel_child)
        } else if ft.is_file() {
            self.files.push(FileJob { entry: self.entries.len(), path: abs, size: meta.len() });
            self.entries.push(Entry {
                path: rel_child,
                mode: meta.mode() & 0o7777,
                size: meta.len(),
                mtime_ms: mtime_ms(&meta),
                kind: EntryKind::File { data: FileData::Empty },
            });
            Ok(())
        } else if ft.is_symlink() {
            if rel == "pg_tblspc" {
                // A tablespace: walked from its location, see walk().
                return Ok(());
            }
            let target = match std::fs::read_link(&abs) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(read_err(&abs, e)),
            };
            let Some(target) = target.to_str() else {
                self.warnings.push(format!("skipped link '{}': its target is not UTF-8", abs.display()));
                return Ok(());
            };
            self.entries.push(Entry {
                path: rel_child,
                mode: meta.mode() & 0o7777,
                size: 0,
                mtime_ms: mtime_ms(&meta),
                kind: EntryKind::Link { target: target.to_string() },
            });
            Ok(())
        } else {
            self.warnings.push(format!("skipped special file '{}' (a socket, FIFO or device)", abs.display()));
            Ok(())
        }
    }

    /// Lists tablespace `ts` under `pg_tblspc/<oid>/`: only this server's
    /// version directory of its location belongs to this cluster.
    fn walk_tablespace(&mut self, ts: &TablespaceDir) -> Result<(), BackupError> {
        let fail = |detail: String| BackupError::Tablespace {
            oid: ts.oid,
            name: ts.name.clone(),
            location: ts.location.clone(),
            detail,
        };
        let meta = std::fs::metadata(&ts.location).map_err(|e| fail(format!("unable to read the location: {e}")))?;
        if !meta.is_dir() {
            return Err(fail("the location is not a directory".into()));
        }
        let rel = format!("pg_tblspc/{}", ts.oid);
        self.dir(rel.clone(), &meta);
        let version = ts.location.join(&ts.version_dir);
        let vmeta = std::fs::metadata(&version)
            .map_err(|e| fail(format!("unable to read this server's directory '{}': {e}", ts.version_dir)))?;
        let rel = join(&rel, &ts.version_dir);
        self.dir(rel.clone(), &vmeta);
        self.walk_dir(&version, &rel)
    }
}

/// Lists what a backup of `pgdata` with `tablespaces` copies.
///
/// # Errors
/// [`BackupError::Read`] when a directory or file cannot be listed or
/// examined for another reason than having been removed meanwhile;
/// [`BackupError::Tablespace`] when a tablespace's location is unusable.
pub(crate) fn walk(pgdata: &Path, tablespaces: &[TablespaceDir]) -> Result<Tree, BackupError> {
    let mut tree = Tree::default();
    tree.walk_dir(pgdata, "")?;
    for ts in tablespaces {
        tree.walk_tablespace(ts)?;
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Applies the rules to a list of paths (directories end with `/`), as
    /// the walk would; returns what is kept, with `(empty)` after directories
    /// kept without their contents.
    fn kept(paths: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let mut dropped: Vec<String> = Vec::new();
        for p in paths {
            let is_dir = p.ends_with('/');
            let path = p.trim_end_matches('/');
            if dropped.iter().any(|d| path.starts_with(&format!("{d}/"))) {
                continue;
            }
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
            let siblings = paths.iter().map(|q| q.trim_end_matches('/')).filter_map(|q| {
                let (qp, qn) = q.rsplit_once('/').unwrap_or(("", q));
                (qp == parent).then_some(qn)
            });
            let rules = DirRules::new(parent, siblings);
            match verdict(&rules, name, is_dir) {
                Verdict::Copy => out.push(path.to_string()),
                Verdict::Skip => dropped.push(path.to_string()),
                Verdict::Empty => {
                    out.push(format!("{path} (empty)"));
                    dropped.push(path.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn exclusions_follow_basebackup() {
        let paths = [
            "PG_VERSION",
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "backup_label.old",
            "tablespace_map",
            "tablespace_map.old",
            "backup_manifest",
            "recovery.signal",
            "standby.signal",
            "postgresql.auto.conf",
            "postgresql.auto.conf.tmp",
            "current_logfiles",
            "current_logfiles.tmp",
            "global/",
            "global/pg_control",
            "global/pg_internal.init",
            "global/1262",
            "pg_wal/",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/",
            "pg_xact/",
            "pg_xact/0000",
            "pg_stat_tmp/",
            "pg_stat_tmp/global.stat",
            "pg_replslot/",
            "pg_replslot/slot1/",
            "pg_replslot/slot1/state",
            "pg_dynshmem/",
            "pg_dynshmem/mmap.1",
            "pg_notify/",
            "pg_notify/0000",
            "pg_serial/",
            "pg_serial/0000",
            "pg_snapshots/",
            "pg_snapshots/00000003-1",
            "pg_subtrans/",
            "pg_subtrans/0000",
            "base/",
            "base/1/",
            "base/1/1259",
            "base/1/1259_fsm",
            "base/1/1259_vm",
            "base/1/pg_internal.init",
            "base/1/pg_internal.init.123",
            "base/1/PG_VERSION",
            "base/1/16384",
            "base/1/16384.1",
            "base/1/16384_fsm",
            "base/1/16384_vm",
            "base/1/16384_init",
            "base/1/t3_16390",
            "base/1/t3_16390_fsm",
            "base/1/t3_16390.2",
            "base/pgsql_tmp/",
            "base/pgsql_tmp/pgsql_tmp123.0",
            "base/1/pgsql_tmp99",
            "pg_tblspc/",
            "pg_tblspc/16500/",
            "pg_tblspc/16500/PG_15_202209061/",
            "pg_tblspc/16500/PG_15_202209061/5/",
            "pg_tblspc/16500/PG_15_202209061/5/20000",
            "pg_tblspc/16500/PG_15_202209061/5/20000_init",
            "pg_tblspc/16500/PG_15_202209061/5/t4_20001",
            "pg_tblspc/16500/PG_15_202209061/5/20002",
            "pg_tblspc/16500/PG_15_202209061/pgsql_tmp/",
            "pg_tblspc/16500/PG_15_202209061/pgsql_tmp/pgsql_tmp1.1",
            "log/",
            "log/pg_wal/",
            "log/pg_wal/x",
        ];
        let expected = [
            "PG_VERSION",
            "postgresql.auto.conf",
            "current_logfiles",
            "global",
            "global/pg_control",
            "global/1262",
            "pg_wal (empty)",
            "pg_xact",
            "pg_xact/0000",
            "pg_stat_tmp (empty)",
            "pg_replslot (empty)",
            "pg_dynshmem (empty)",
            "pg_notify (empty)",
            "pg_serial (empty)",
            "pg_snapshots (empty)",
            "pg_subtrans (empty)",
            "base",
            "base/1",
            "base/1/1259",
            "base/1/1259_fsm",
            "base/1/1259_vm",
            "base/1/PG_VERSION",
            "base/1/16384_init",
            "pg_tblspc",
            "pg_tblspc/16500",
            "pg_tblspc/16500/PG_15_202209061",
            "pg_tblspc/16500/PG_15_202209061/5",
            "pg_tblspc/16500/PG_15_202209061/5/20000_init",
            "pg_tblspc/16500/PG_15_202209061/5/20002",
            "log",
            // pg_wal is special only at the top; elsewhere it is a name.
            "log/pg_wal",
            "log/pg_wal/x",
        ];
        assert_eq!(kept(&paths), expected);
    }

    #[test]
    fn relation_names() {
        assert_eq!(parse_relation("16384"), Some(("16384", None)));
        assert_eq!(parse_relation("16384_fsm.3"), Some(("16384", Some("fsm"))));
        assert_eq!(parse_relation("16384.12"), Some(("16384", None)));
        assert_eq!(parse_relation("16384_init"), Some(("16384", Some("init"))));
        for not in ["", "16384_main", "16384.", "16384.x", "PG_VERSION", "12345678901", "_fsm", "t1_2"] {
            assert_eq!(parse_relation(not), None, "{not}");
        }
        for temp in ["t3_16390", "t3_16390_vm", "t3_16390.1", "t12_1_init.4"] {
            assert!(is_temp_relation(temp), "{temp}");
        }
        for not in ["t_16390", "t3_", "t3", "tx_1", "3_16390", "t3_16390_main"] {
            assert!(!is_temp_relation(not), "{not}");
        }
        assert!(is_database_dir("base/1") && is_database_dir("pg_tblspc/16500/PG_15_202209061/5"));
        assert!(!is_database_dir("base") && !is_database_dir("global") && !is_database_dir("base/1/x"));
    }

    #[test]
    fn walks_a_tree() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("walvault-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pgdata = dir.join("data");
        let wal = dir.join("wal");
        let ts = dir.join("ts");
        for d in [&pgdata.join("base/1"), &pgdata.join("pg_tblspc"), &wal.join("archive_status"), &ts] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(ts.join("PG_15_202209061/1")).unwrap();
        std::fs::create_dir_all(ts.join("PG_14_202107181")).unwrap();
        std::fs::write(ts.join("PG_15_202209061/1/16400"), b"abc").unwrap();
        std::fs::write(ts.join("PG_14_202107181/other"), b"x").unwrap();
        std::fs::write(wal.join("000000010000000000000001"), b"wal").unwrap();
        symlink(&wal, pgdata.join("pg_wal")).unwrap();
        symlink(&ts, pgdata.join("pg_tblspc/16500")).unwrap();
        symlink("/etc/postgresql/postgresql.conf", pgdata.join("postgresql.conf")).unwrap();
        std::fs::write(pgdata.join("PG_VERSION"), b"15\n").unwrap();
        std::fs::write(pgdata.join("postmaster.pid"), b"1").unwrap();
        std::fs::write(pgdata.join("base/1/1259"), vec![0u8; 8192]).unwrap();
        let tablespaces = [TablespaceDir {
            oid: 16500,
            name: "fast".into(),
            location: ts.clone(),
            version_dir: "PG_15_202209061".into(),
        }];
        let tree = walk(&pgdata, &tablespaces).unwrap();
        let listed: Vec<(&str, &str)> = tree
            .entries
            .iter()
            .map(|e| {
                let kind = match &e.kind {
                    EntryKind::Dir => "dir",
                    EntryKind::File { .. } => "file",
                    EntryKind::Link { .. } => "link",
                };
                (e.path.as_str(), kind)
            })
            .collect();
        assert_eq!(
            listed,
            [
                ("PG_VERSION", "file"),
                ("base", "dir"),
                ("base/1", "dir"),
                ("base/1/1259", "file"),
                ("pg_tblspc", "dir"),
                ("pg_wal", "dir"),
                ("pg_wal/archive_status", "dir"),
                ("postgresql.conf", "link"),
                ("pg_tblspc/16500", "dir"),
                ("pg_tblspc/16500/PG_15_202209061", "dir"),
                ("pg_tblspc/16500/PG_15_202209061/1", "dir"),
                ("pg_tblspc/16500/PG_15_202209061/1/16400", "file"),
            ]
        );
        let sizes: Vec<u64> = tree.files.iter().map(|f| f.size).collect();
        assert_eq!(sizes, [3, 8192, 3]);
        assert_eq!(tree.entries[tree.files[1].entry].path, "base/1/1259");
        let missing = TablespaceDir { location: dir.join("nowhere"), ..tablespaces[0].clone() };
        assert!(matches!(walk(&pgdata, &[missing]), Err(BackupError::Tablespace { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
