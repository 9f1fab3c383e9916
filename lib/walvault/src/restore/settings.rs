//! The text a restore writes for PostgreSQL: the recovery settings in
//! `postgresql.auto.conf`, the `restore_command` inside them, and the
//! `tablespace_map` with the locations rewritten. Pure: strings in, strings
//! out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::TargetAction;
use super::target::{Goal, Timeline};

/// The first line of the block a restore appends to `postgresql.auto.conf`.
pub const BLOCK_COMMENT: &str = "# added by walvault restore of backup";

/// Quotes a value for PostgreSQL's configuration file syntax: in single
/// quotes, a quote doubled, and a backslash doubled (the configuration
/// scanner reads backslash escapes inside quoted values, `GUC_scanstr()`);
/// line breaks and tabs are written as `\n`, `\r`, `\t`, other control
/// characters as octal escapes, so that a value always stays on one line.
pub fn quote_setting(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\{:03o}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes one argument for the shell that runs `restore_command`, and
/// doubles `%` so that PostgreSQL does not read it as a placeholder (`%f`,
/// `%p`, `%r`).
pub fn shell_arg(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+' | b':' | b',' | b'@' | b'=')
        });
    let quoted = if plain { arg.to_string() } else { format!("'{}'", arg.replace('\'', "'\\''")) };
    quoted.replace('%', "%%")
}

/// The `restore_command`: archive-fetch with the configuration file (when
/// there is one), the flag choosing the repository (`("--repository",
/// location)` or `("--repo", name)`; `None`: every repository of the file,
/// in its order) and the cluster of this restore, so that recovery reads
/// from exactly the repositories the backup came from.
pub fn restore_command(
    program: &Path,
    config_file: Option<&Path>,
    repository: Option<(&str, &str)>,
    cluster: &str,
) -> String {
    let mut parts = vec![shell_arg(&program.to_string_lossy())];
    if let Some(f) = config_file {
        parts.push("--config".into());
        parts.push(shell_arg(&f.to_string_lossy()));
    }
    if let Some((flag, value)) = repository {
        parts.extend([flag.to_string(), shell_arg(value)]);
    }
    parts.extend(["--cluster".into(), shell_arg(cluster)]);
    parts.extend(["%f".into(), "%p".into()]);
    parts.join(" ")
}

/// What goes into the recovery block.
#[derive(Debug, Clone)]
pub struct Recovery<'a> {
    /// The backup restored.
    pub backup: &'a str,
    /// The shell command (unquoted for the configuration file).
    pub restore_command: &'a str,
    /// Where to stop.
    pub goal: &'a Goal,
    /// Which timeline to follow.
    pub timeline: Timeline,
    /// `recovery_target_action`, if given.
    pub action: Option<TargetAction>,
    /// `recovery_target_inclusive = off`.
    pub exclusive: bool,
}

/// The block of settings appended to `postgresql.auto.conf`.
pub fn recovery_block(r: &Recovery<'_>) -> String {
    let mut out = format!("{BLOCK_COMMENT} '{}'\n", r.backup);
    let set = |out: &mut String, name: &str, value: &str| {
        let _ = writeln!(out, "{name} = {}", quote_setting(value));
    };
    set(&mut out, "restore_command", r.restore_command);
    match r.goal {
        Goal::End => {}
        Goal::Immediate => set(&mut out, "recovery_target", "immediate"),
        Goal::Time(t) => set(&mut out, "recovery_target_time", &t.to_string()),
        Goal::Lsn(l) => set(&mut out, "recovery_target_lsn", &l.to_string()),
        Goal::Xid(x) => set(&mut out, "recovery_target_xid", &x.to_string()),
        Goal::Name(n) => set(&mut out, "recovery_target_name", n),
    }
    if r.exclusive {
        // A boolean: unquoted, as PostgreSQL's documentation writes it.
        out.push_str("recovery_target_inclusive = off\n");
    }
    set(&mut out, "recovery_target_timeline", &r.timeline.setting());
    if let Some(a) = r.action {
        set(
            &mut out,
            "recovery_target_action",
            match a {
                TargetAction::Promote => "promote",
                TargetAction::Pause => "pause",
                TargetAction::Shutdown => "shutdown",
            },
        );
    }
    out
}

/// The parameter a configuration line sets, lower-cased, or `None` for a
/// comment, a blank line or an `include`.
fn setting_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    let end = t.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(t.len());
    let name = &t[..end];
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    ok.then(|| name.to_ascii_lowercase())
}

/// Whether a parameter is one the restore sets: `restore_command` and every
/// `recovery_target*`.
pub fn is_recovery_setting(name: &str) -> bool {
    name == "restore_command" || name.starts_with("recovery_target")
}

/// `postgresql.auto.conf` with every `restore_command` and
/// `recovery_target*` line (and the comment of an earlier walvault block)
/// removed and `block` appended. Everything else is kept as it was.
pub fn rewrite_auto_conf(existing: &str, block: &str) -> String {
    let mut out = String::with_capacity(existing.len() + block.len() + 1);
    for line in existing.lines() {
        if line.trim_start().starts_with(BLOCK_COMMENT) {
            continue;
        }
        if setting_name(line).is_some_and(|n| is_recovery_setting(&n)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n");
    }
    out.push_str(block);
    out
}

/// The recovery settings a `postgresql.conf` sets itself, with their line
/// numbers: a different kind of target there would conflict with the one
/// the restore writes.
pub fn recovery_settings_in(conf: &str) -> Vec<(usize, String)> {
    conf.lines()
        .enumerate()
        .filter_map(|(i, l)| setting_name(l).filter(|n| is_recovery_setting(n)).map(|n| (i + 1, n)))
        .collect()
}

/// Splits a `tablespace_map` into its lines' OIDs, as PostgreSQL's
/// `read_tablespace_map()` does: a backslash escapes the next character
/// (a line break inside a path), an unescaped `\n` or `\r` ends a line, and
/// the OID is what precedes the first space.
fn map_oids(map: &str) -> Result<Vec<u32>, String> {
    let mut oids = Vec::new();
    let mut line = String::new();
    let mut escaped = false;
    let mut finish = |line: &mut String| -> Result<(), String> {
        if !line.is_empty() {
            let oid = line.split(' ').next().unwrap_or_default();
            let parsed = oid.parse::<u32>().ok().filter(|o| o.to_string() == oid && line.len() > oid.len() + 1);
            oids.push(
                parsed
                    .ok_or_else(|| format!("has a line '{}' that is not '<oid> <location>'", line.escape_default()))?,
            );
            line.clear();
        }
        Ok(())
    };
    for c in map.chars() {
        match c {
            _ if escaped => {
                line.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            '\n' | '\r' => finish(&mut line)?,
            c => line.push(c),
        }
    }
    finish(&mut line)?;
    Ok(oids)
}

/// The backup's `tablespace_map` with every location replaced by where the
/// tablespace was restored (`locations`: OID → directory), in the map's
/// order; tablespaces the map lacks are added. An empty string when there is
/// no tablespace (then no file is written).
///
/// # Errors
/// A line that cannot be read, or an OID the restore did not place: left
/// as it was, PostgreSQL would link it to the original location, which on
/// this host may be another cluster's tablespace.
pub fn rewrite_tablespace_map(map: &str, locations: &BTreeMap<u32, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut seen = Vec::new();
    for oid in map_oids(map)? {
        let loc =
            locations.get(&oid).ok_or_else(|| format!("names tablespace OID {oid}, which the backup does not hold"))?;
        if !seen.contains(&oid) {
            let _ = writeln!(out, "{oid} {loc}");
            seen.push(oid);
        }
    }
    for (oid, loc) in locations {
        if !seen.contains(oid) {
            let _ = writeln!(out, "{oid} {loc}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::PathBuf;
    use walvault_formats::wal::Lsn;

    #[test]
    fn quoting_for_the_configuration_file() {
        assert_eq!(quote_setting("latest"), "'latest'");
        assert_eq!(quote_setting("it's"), "'it''s'");
        assert_eq!(quote_setting(r"C:\x"), r"'C:\\x'");
        assert_eq!(quote_setting("a\nb\tc\u{1}"), r"'a\nb\tc\001'");
    }

    #[test]
    fn quoting_for_the_shell_and_placeholders() {
        assert_eq!(shell_arg("/usr/bin/archive-fetch"), "/usr/bin/archive-fetch");
        assert_eq!(shell_arg("/srv/my repo"), "'/srv/my repo'");
        assert_eq!(shell_arg("/srv/it's"), r"'/srv/it'\''s'");
        assert_eq!(shell_arg("/srv/100%"), "'/srv/100%%'");
        assert_eq!(shell_arg(""), "''");
        let cmd = restore_command(
            &PathBuf::from("/opt/wv/archive-fetch"),
            Some(&PathBuf::from("/etc/walvault/it's.toml")),
            Some(("--repository", "/mnt/nas/repo")),
            "main",
        );
        assert_eq!(
            cmd,
            r"/opt/wv/archive-fetch --config '/etc/walvault/it'\''s.toml' --repository /mnt/nas/repo --cluster main %f %p"
        );
        // Both layers: the configuration file reads back exactly `cmd`.
        assert_eq!(
            quote_setting(&cmd),
            r"'/opt/wv/archive-fetch --config ''/etc/walvault/it''\\''''s.toml'' --repository /mnt/nas/repo --cluster main %f %p'"
        );
        let no_config = restore_command(&PathBuf::from("archive-fetch"), None, Some(("--repository", "/r")), "db1");
        assert_eq!(no_config, "archive-fetch --repository /r --cluster db1 %f %p");
        let all = restore_command(&PathBuf::from("archive-fetch"), Some(&PathBuf::from("/etc/w.toml")), None, "db1");
        assert_eq!(all, "archive-fetch --config /etc/w.toml --cluster db1 %f %p");
        let named = restore_command(
            &PathBuf::from("archive-fetch"),
            Some(&PathBuf::from("/w.toml")),
            Some(("--repo", "nas")),
            "c",
        );
        assert_eq!(named, "archive-fetch --config /w.toml --repo nas --cluster c %f %p");
    }

    fn block(goal: &Goal, timeline: Timeline, action: Option<TargetAction>, exclusive: bool) -> String {
        recovery_block(&Recovery { backup: "B1", restore_command: "fetch %f %p", goal, timeline, action, exclusive })
    }

    #[test]
    fn recovery_blocks() {
        let t = Goal::Time("2026-11-21 16:30:00+02".parse().unwrap());
        assert_eq!(
            block(&t, Timeline::Latest, Some(TargetAction::Promote), true),
            "# added by walvault restore of backup 'B1'\n\
             restore_command = 'fetch %f %p'\n\
             recovery_target_time = '2026-11-21 14:30:00+00'\n\
             recovery_target_inclusive = off\n\
             recovery_target_timeline = 'latest'\n\
             recovery_target_action = 'promote'\n"
        );
        let b = block(&Goal::End, Timeline::Id(3), None, false);
        assert!(b.ends_with("restore_command = 'fetch %f %p'\nrecovery_target_timeline = '3'\n"), "{b}");
        assert!(block(&Goal::Immediate, Timeline::Current, None, false).contains("recovery_target = 'immediate'\n"));
        assert!(
            block(&Goal::Lsn(Lsn(0x300_0060)), Timeline::Latest, None, false)
                .contains("recovery_target_lsn = '0/3000060'\n")
        );
        assert!(block(&Goal::Xid(740), Timeline::Latest, None, false).contains("recovery_target_xid = '740'\n"));
        let n = block(&Goal::Name("before 'upgrade'".into()), Timeline::Latest, Some(TargetAction::Pause), false);
        assert!(n.contains("recovery_target_name = 'before ''upgrade'''\n"), "{n}");
        assert!(n.contains("recovery_target_action = 'pause'\n"), "{n}");
    }

    #[test]
    fn auto_conf_loses_old_recovery_settings_only() {
        let existing = "# Do not edit this file manually!\n\
                        work_mem = '64MB'\n\
                        restore_command = 'cp /old/%f %p'\n\
                        Recovery_Target_Time='2020-01-01 00:00:00+00'\n\
                        recovery_target_timeline = 'latest'\n\
                        # added by walvault restore of backup 'OLD'\n\
                        # recovery_target_name = 'kept: a comment'\n\
                        primary_conninfo = 'host=x'";
        let out = rewrite_auto_conf(existing, "NEW BLOCK\n");
        assert_eq!(
            out,
            "# Do not edit this file manually!\n\
             work_mem = '64MB'\n\
             # recovery_target_name = 'kept: a comment'\n\
             primary_conninfo = 'host=x'\n\
             NEW BLOCK\n"
        );
        // Restoring again over the result keeps a single block.
        let again =
            rewrite_auto_conf(&rewrite_auto_conf(existing, &block(&Goal::End, Timeline::Latest, None, false)), "X\n");
        assert_eq!(again, out.replace("NEW BLOCK\n", "X\n"));
        assert!(rewrite_auto_conf("", "X\n").starts_with("# Do not edit this file manually!\n"));
        assert_eq!(
            recovery_settings_in("a = 1\n  recovery_target_lsn = '0/1'\n#restore_command = 'x'\n"),
            vec![(2, "recovery_target_lsn".to_string())]
        );
    }

    #[test]
    fn tablespace_map_relocated() {
        let locations: BTreeMap<u32, String> =
            [(16384, "/new/ts1".to_string()), (16390, "/ts2".to_string())].into_iter().collect();
        let map = "16390 /old/two\n16384 /old/with\\\nnewline\n";
        assert_eq!(rewrite_tablespace_map(map, &locations).unwrap(), "16390 /ts2\n16384 /new/ts1\n");
        // A tablespace the map lacks is added; none at all is an empty map.
        assert_eq!(rewrite_tablespace_map("16384 /a\r\n", &locations).unwrap(), "16384 /new/ts1\n16390 /ts2\n");
        assert_eq!(rewrite_tablespace_map("", &BTreeMap::new()).unwrap(), "");
        let e = rewrite_tablespace_map("99 /elsewhere\n", &locations).unwrap_err();
        assert!(e.contains("99"), "{e}");
        assert!(rewrite_tablespace_map("nonsense\n", &locations).is_err());
        assert!(rewrite_tablespace_map("16384\n", &locations).is_err());
    }
}
