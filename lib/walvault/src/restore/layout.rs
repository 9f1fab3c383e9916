//! Where a restore writes: the checks on the data directory and the
//! tablespace locations before anything is written, and the mapping from a
//! manifest path to a path on disk.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use walvault_formats::manifest::{Manifest, is_safe_path};

use super::RestoreError;

/// A file in the data directory while a restore is writing it: it lets a
/// later `--delta` recognize a half-restored directory, and is removed last.
pub const MARKER: &str = "walvault.restore-incomplete";

/// Manifest paths never restored from the backup: the restore writes the
/// first two itself, a signal file appears only once the directory is
/// complete, and a stale `postmaster.pid` would stop the server starting.
pub const SKIPPED: [&str; 5] =
    ["backup_label", "tablespace_map", "recovery.signal", "standby.signal", "postmaster.pid"];

/// Written last of the data files, and removed first by `--delta`: without
/// it PostgreSQL refuses to start, so a half-restored directory cannot be
/// started by accident.
pub const HELD_BACK: &str = "global/pg_control";

/// What the target directory looks like before a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgDataState {
    /// It does not exist.
    Missing,
    /// It exists and is empty.
    Empty,
    /// A data directory (or a half-restored one) that `--delta` updates.
    Existing,
}

/// The PID in `postmaster.pid` if that process is alive.
pub fn running_postmaster(pgdata: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok().filter(|p| *p > 0)?;
    // SAFETY: kill with signal 0 only checks that the process exists and may
    // be signalled; it sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    let alive = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(pid)
}

/// Checks the target directory, reading nothing but its listing and
/// `postmaster.pid`: a running server's directory is refused; a non-empty
/// one only with `--delta`, and then only a data directory (`PG_VERSION`)
/// or a half-restored one ([`MARKER`]), so that a mistyped path never gets
/// its contents deleted.
///
/// # Errors
/// See above; also a path that is not a directory or cannot be listed.
pub fn check_pgdata(pgdata: &Path, delta: bool) -> Result<PgDataState, RestoreError> {
    let meta = match std::fs::metadata(pgdata) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PgDataState::Missing),
        Err(source) => return Err(RestoreError::Local { op: "read", path: pgdata.to_path_buf(), source }),
    };
    if !meta.is_dir() {
        return Err(RestoreError::NotADirectory { path: pgdata.to_path_buf() });
    }
    if let Some(pid) = running_postmaster(pgdata) {
        return Err(RestoreError::Running { pgdata: pgdata.to_path_buf(), pid });
    }
    let mut names: Vec<String> = std::fs::read_dir(pgdata)
        .map_err(|source| RestoreError::Local { op: "list", path: pgdata.to_path_buf(), source })?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(PgDataState::Empty);
    }
    names.sort();
    if !delta {
        let example =
            if names.iter().any(|n| n == "PG_VERSION") { "PG_VERSION".to_string() } else { names.swap_remove(0) };
        return Err(RestoreError::NotEmpty { pgdata: pgdata.to_path_buf(), example });
    }
    if !names.iter().any(|n| n == "PG_VERSION" || n == MARKER) {
        return Err(RestoreError::NotPgData { pgdata: pgdata.to_path_buf() });
    }
    Ok(PgDataState::Existing)
}

/// `path` made absolute against the current directory and cleaned of `.`
/// and `..` without touching the file system (it may not exist yet).
pub fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    let joined = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// A location without its trailing slashes (`/` stays `/`).
fn trim_location(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    if t.is_empty() && s.starts_with('/') { "/" } else { t }
}

/// Where one tablespace of the backup is restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTablespace {
    /// Its OID (`pg_tblspc/<oid>`).
    pub oid: u32,
    /// Its name.
    pub name: String,
    /// Where it was when the backup was taken.
    pub original: String,
    /// Where it is restored.
    pub location: PathBuf,
}

/// Decides where each tablespace goes (its original location, or NEW for
/// `--tablespace-map OLD=NEW`) and checks each location before anything is
/// written: absolute, not inside the data directory or another tablespace,
/// usable in `tablespace_map`, and empty or absent — with `--delta`, a
/// non-empty location must already be this data directory's tablespace.
///
/// # Errors
/// An OLD that matches no tablespace, and every failed check above.
pub fn place_tablespaces(
    m: &Manifest,
    map: &[(String, String)],
    pgdata: &Path,
    delta: bool,
) -> Result<Vec<PlacedTablespace>, RestoreError> {
    let mut relocated: BTreeMap<u32, &str> = BTreeMap::new();
    for (old, new) in map {
        let ts = m.tablespaces.iter().find(|t| trim_location(&t.location) == trim_location(old)).ok_or_else(|| {
            RestoreError::TablespaceMapping {
                old: old.clone(),
                backup: m.id.clone(),
                known: m.tablespaces.iter().map(|t| format!("'{}' at '{}'", t.name, t.location)).collect(),
            }
        })?;
        if relocated.insert(ts.oid, new).is_some() {
            return Err(RestoreError::TablespaceLocation {
                name: ts.name.clone(),
                location: PathBuf::from(new),
                reason: "--tablespace-map names its old location twice".into(),
            });
        }
    }
    let mut placed: Vec<PlacedTablespace> = Vec::with_capacity(m.tablespaces.len());
    for ts in &m.tablespaces {
        let chosen = relocated.get(&ts.oid).copied().unwrap_or(&ts.location);
        let fail = |reason: &str| RestoreError::TablespaceLocation {
            name: ts.name.clone(),
            location: PathBuf::from(chosen),
            reason: reason.into(),
        };
        if !chosen.starts_with('/') {
            return Err(fail("a tablespace location must be an absolute path"));
        }
        if chosen.contains(['\n', '\r', '\\']) {
            return Err(fail("a location with a backslash or a line break cannot be written to 'tablespace_map'"));
        }
        let location = absolute(Path::new(chosen)).map_err(|e| fail(&e.to_string()))?;
        if location.starts_with(pgdata) || pgdata.starts_with(&location) {
            return Err(fail("it overlaps the data directory"));
        }
        if let Some(other) =
            placed.iter().find(|p| p.location.starts_with(&location) || location.starts_with(&p.location))
        {
            return Err(fail(&format!("tablespace '{}' is restored there too", other.name)));
        }
        check_location(ts.oid, &ts.name, &location, pgdata, delta)?;
        placed.push(PlacedTablespace { oid: ts.oid, name: ts.name.clone(), original: ts.location.clone(), location });
    }
    Ok(placed)
}

fn check_location(oid: u32, name: &str, location: &Path, pgdata: &Path, delta: bool) -> Result<(), RestoreError> {
    let meta = match std::fs::metadata(location) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(RestoreError::Local { op: "read", path: location.to_path_buf(), source }),
    };
    if !meta.is_dir() {
        return Err(RestoreError::TablespaceLocation {
            name: name.into(),
            location: location.to_path_buf(),
            reason: "it exists and is not a directory".into(),
        });
    }
    let mut listing = std::fs::read_dir(location).map_err(|source| RestoreError::Local {
        op: "list",
        path: location.to_path_buf(),
        source,
    })?;
    if listing.next().is_none() {
        return Ok(());
    }
    if !delta {
        return Err(RestoreError::TablespaceNotEmpty { name: name.into(), location: location.to_path_buf() });
    }
    // With --delta, only this data directory's own tablespace may be
    // updated in place: never another cluster's (on the same host, the
    // original location may be the live server's).
    let link = pgdata.join("pg_tblspc").join(oid.to_string());
    let ours = std::fs::read_link(&link).is_ok_and(|target| {
        target == location
            || matches!((std::fs::canonicalize(&link), std::fs::canonicalize(location)), (Ok(a), Ok(b)) if a == b)
    });
    if ours {
        Ok(())
    } else {
        Err(RestoreError::TablespaceNotOurs {
            name: name.into(),
            location: location.to_path_buf(),
            pgdata: pgdata.to_path_buf(),
        })
    }
}

/// Where manifest paths go.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The data directory (absolute).
    pub pgdata: PathBuf,
    /// Tablespace OID → where its contents go.
    pub tablespaces: BTreeMap<u32, PathBuf>,
}

/// Where one manifest path goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// This path on disk.
    Disk(PathBuf),
    /// `pg_tblspc/<oid>` of a tablespace: the link to its location.
    TablespaceLink(u32),
}

impl Layout {
    /// A layout for `pgdata` and the placed tablespaces.
    pub fn new(pgdata: PathBuf, tablespaces: &[PlacedTablespace]) -> Layout {
        Layout { pgdata, tablespaces: tablespaces.iter().map(|t| (t.oid, t.location.clone())).collect() }
    }

    /// Where the manifest path `rel` goes: `pg_tblspc/<oid>/…` of a
    /// tablespace under its location, anything else under the data
    /// directory. `None` for a path that could leave them (absolute, `..`,
    /// empty components): the manifest parser refuses those already; this
    /// is the second lock on the door.
    pub fn place(&self, rel: &str) -> Option<Place> {
        if !is_safe_path(rel) {
            return None;
        }
        if let Some(rest) = rel.strip_prefix("pg_tblspc/") {
            let (first, sub) = match rest.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (rest, None),
            };
            if let Some(oid) = first.parse::<u32>().ok().filter(|o| o.to_string() == first)
                && let Some(loc) = self.tablespaces.get(&oid)
            {
                return Some(match sub {
                    None => Place::TablespaceLink(oid),
                    Some(sub) => Place::Disk(loc.join(sub)),
                });
            }
        }
        Some(Place::Disk(self.pgdata.join(rel)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walvault_formats::manifest::Tablespace;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walvault-layout-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn paths_stay_inside() {
        let layout = Layout {
            pgdata: PathBuf::from("/pg"),
            tablespaces: [(16384, PathBuf::from("/ts/one"))].into_iter().collect(),
        };
        assert_eq!(layout.place("base/1/1259"), Some(Place::Disk("/pg/base/1/1259".into())));
        assert_eq!(layout.place("pg_tblspc/16384"), Some(Place::TablespaceLink(16384)));
        assert_eq!(layout.place("pg_tblspc/16384/PG_15_1/5/6"), Some(Place::Disk("/ts/one/PG_15_1/5/6".into())));
        // Not a tablespace of the backup (an in-place one), or not its exact name.
        assert_eq!(layout.place("pg_tblspc/99/x"), Some(Place::Disk("/pg/pg_tblspc/99/x".into())));
        assert_eq!(layout.place("pg_tblspc/016384/x"), Some(Place::Disk("/pg/pg_tblspc/016384/x".into())));
        for bad in ["", "/etc/passwd", "../x", "base/../../x", "a//b", "./a", "pg_tblspc/16384/../../etc", "a\0b"] {
            assert_eq!(layout.place(bad), None, "{bad:?}");
        }
        assert_eq!(absolute(Path::new("/a/./b/../c/")).unwrap(), PathBuf::from("/a/c"));
        assert!(absolute(Path::new("rel")).unwrap().is_absolute());
    }

    #[test]
    fn target_directory_checks() {
        let d = temp("pgdata");
        assert_eq!(check_pgdata(&d.join("new"), false).unwrap(), PgDataState::Missing);
        assert_eq!(check_pgdata(&d, false).unwrap(), PgDataState::Empty);
        std::fs::write(d.join("notes.txt"), b"x").unwrap();
        let e = check_pgdata(&d, false).unwrap_err();
        assert!(e.to_string().contains("notes.txt") && e.hint().unwrap().contains("--delta"), "{e}");
        // --delta refuses a directory that is not a data directory.
        let e = check_pgdata(&d, true).unwrap_err().to_string();
        assert!(e.contains("PG_VERSION"), "{e}");
        std::fs::write(d.join("PG_VERSION"), b"15\n").unwrap();
        assert_eq!(check_pgdata(&d, true).unwrap(), PgDataState::Existing);
        // A live postmaster (this very process) is refused; a stale pid file is not.
        std::fs::write(d.join("postmaster.pid"), format!("{}\n{}\n", std::process::id(), d.display())).unwrap();
        let e = check_pgdata(&d, true).unwrap_err().to_string();
        assert!(e.contains("running PostgreSQL") && e.contains(&std::process::id().to_string()), "{e}");
        std::fs::write(d.join("postmaster.pid"), "2147483646\n").unwrap();
        assert_eq!(check_pgdata(&d, true).unwrap(), PgDataState::Existing);
        let file = d.join("notes.txt");
        assert!(matches!(check_pgdata(&file, true), Err(RestoreError::NotADirectory { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn tablespaces_placed_and_checked() {
        let d = temp("ts");
        let pgdata = d.join("pgdata");
        let mut m = crate::restore::files::tests::manifest_with(&[]);
        m.tablespaces = vec![
            Tablespace { oid: 16384, name: "one".into(), location: d.join("one").display().to_string() },
            Tablespace { oid: 16385, name: "two".into(), location: format!("{}/", d.join("two").display()) },
        ];
        let map = vec![(d.join("two").display().to_string(), d.join("moved").display().to_string())];
        let placed = place_tablespaces(&m, &map, &pgdata, false).unwrap();
        assert_eq!(placed[0].location, d.join("one"));
        assert_eq!(placed[1].location, d.join("moved"));

        let e = place_tablespaces(&m, &[("/nowhere".into(), "/x".into())], &pgdata, false).unwrap_err().to_string();
        assert!(e.contains("'/nowhere'") && e.contains("'one'"), "{e}");
        let inside = vec![(d.join("one").display().to_string(), pgdata.join("ts").display().to_string())];
        assert!(place_tablespaces(&m, &inside, &pgdata, false).unwrap_err().to_string().contains("data directory"));
        let same = vec![(d.join("one").display().to_string(), d.join("two").display().to_string())];
        let e = place_tablespaces(&m, &same, &pgdata, false).unwrap_err().to_string();
        assert!(e.contains("'two'") || e.contains("'one'"), "{e}");

        // Not empty: refused; with --delta only when it is this data directory's own.
        std::fs::create_dir_all(d.join("one/PG_15_1")).unwrap();
        assert!(matches!(place_tablespaces(&m, &map, &pgdata, false), Err(RestoreError::TablespaceNotEmpty { .. })));
        assert!(matches!(place_tablespaces(&m, &map, &pgdata, true), Err(RestoreError::TablespaceNotOurs { .. })));
        std::fs::create_dir_all(pgdata.join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(d.join("one"), pgdata.join("pg_tblspc/16384")).unwrap();
        assert_eq!(place_tablespaces(&m, &map, &pgdata, true).unwrap().len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
