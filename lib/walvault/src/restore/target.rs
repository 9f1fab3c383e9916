//! The recovery target and timeline as the operator gives them, checked and
//! parsed before anything is read or written.

use walvault_formats::time::Timestamp;
use walvault_formats::wal::Lsn;

use super::{RestoreError, RestoreTarget};
use crate::plan;

/// Longest restore point name PostgreSQL keeps (`MAXFNAMELEN - 1`).
pub const MAX_RESTORE_POINT_NAME: usize = 63;

/// A parsed recovery target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// The end of the archive.
    End,
    /// The consistency point of the backup.
    Immediate,
    /// A moment.
    Time(Timestamp),
    /// A WAL position.
    Lsn(Lsn),
    /// The commit of a transaction (full 64-bit id, or a plain 32-bit one).
    Xid(u64),
    /// A restore point.
    Name(String),
}

impl Goal {
    /// The planner's form.
    pub fn to_plan(&self) -> plan::Target {
        match self {
            Goal::End => plan::Target::End,
            Goal::Immediate => plan::Target::Immediate,
            Goal::Time(t) => plan::Target::Time { us: t.0 },
            Goal::Lsn(l) => plan::Target::Lsn(*l),
            Goal::Xid(x) => plan::Target::Xid(*x),
            Goal::Name(n) => plan::Target::Name(n.clone()),
        }
    }

    /// Whether `--target-exclusive` means something for this target
    /// (`recovery_target_inclusive` applies to time, LSN and xid only).
    pub fn takes_exclusive(&self) -> bool {
        matches!(self, Goal::Time(_) | Goal::Lsn(_) | Goal::Xid(_))
    }

    /// In words, for messages: "the end of the archive", "time '…+00'".
    pub fn describe(&self) -> String {
        match self {
            Goal::End => "the end of the archive".into(),
            Goal::Immediate => "the end of the backup (target 'immediate')".into(),
            Goal::Time(t) => format!("time '{t}'"),
            Goal::Lsn(l) => format!("LSN '{l}'"),
            Goal::Xid(x) => format!("transaction '{x}'"),
            Goal::Name(n) => format!("restore point '{n}'"),
        }
    }
}

/// A parsed `--target-timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeline {
    /// The newest timeline the archive knows.
    Latest,
    /// The backup's timeline.
    Current,
    /// This timeline.
    Id(u32),
}

impl Timeline {
    /// The planner's form.
    pub fn to_plan(self) -> plan::TimelineTarget {
        match self {
            Timeline::Latest => plan::TimelineTarget::Latest,
            Timeline::Current => plan::TimelineTarget::Current,
            Timeline::Id(t) => plan::TimelineTarget::Id(t),
        }
    }

    /// The value of `recovery_target_timeline`.
    pub fn setting(self) -> String {
        match self {
            Timeline::Latest => "latest".into(),
            Timeline::Current => "current".into(),
            Timeline::Id(t) => t.to_string(),
        }
    }
}

/// Parses the target the operator gave.
///
/// # Errors
/// A time without a zone or otherwise unreadable (the timestamp parser's
/// own message), an invalid LSN, a transaction id that is not a normal one,
/// a restore point name PostgreSQL could not have created.
pub fn parse_target(t: &RestoreTarget) -> Result<Goal, RestoreError> {
    Ok(match t {
        RestoreTarget::End => Goal::End,
        RestoreTarget::Immediate => Goal::Immediate,
        RestoreTarget::Time(s) => Goal::Time(s.parse::<Timestamp>()?),
        RestoreTarget::Lsn(s) => Goal::Lsn(s.trim().parse::<Lsn>()?),
        RestoreTarget::Xid(s) => {
            let bad = |reason: &'static str| RestoreError::Xid { value: s.clone(), reason };
            let xid: u64 = s.trim().parse().map_err(|_| bad("expected a decimal number such as 740"))?;
            // 0 is InvalidTransactionId, 1 and 2 are the bootstrap and frozen
            // ids; no transaction ever commits with them.
            if xid & 0xFFFF_FFFF < 3 {
                return Err(bad("ids 0, 1 and 2 are reserved; a transaction id is 3 or more (txid_current())"));
            }
            Goal::Xid(xid)
        }
        RestoreTarget::Name(n) => {
            let bad = |reason: &'static str| RestoreError::RestorePointName { value: n.clone(), reason };
            if n.is_empty() || n.len() > MAX_RESTORE_POINT_NAME {
                return Err(bad("a restore point name is 1 to 63 bytes long"));
            }
            if n.contains('\0') {
                return Err(bad("a restore point name cannot contain a NUL byte"));
            }
            Goal::Name(n.clone())
        }
    })
}

/// Parses `--target-timeline`: `latest` (the default), `current` or a
/// timeline number.
///
/// # Errors
/// Anything else, or timeline 0.
pub fn parse_timeline(s: Option<&str>) -> Result<Timeline, RestoreError> {
    let Some(raw) = s else { return Ok(Timeline::Latest) };
    let v = raw.trim();
    if v.eq_ignore_ascii_case("latest") {
        return Ok(Timeline::Latest);
    }
    if v.eq_ignore_ascii_case("current") {
        return Ok(Timeline::Current);
    }
    match v.parse::<u32>() {
        Ok(t) if t > 0 => Ok(Timeline::Id(t)),
        _ => Err(RestoreError::Timeline { value: raw.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_parse_or_explain() {
        assert_eq!(parse_target(&RestoreTarget::End).unwrap(), Goal::End);
        assert_eq!(parse_target(&RestoreTarget::Immediate).unwrap(), Goal::Immediate);
        let t = parse_target(&RestoreTarget::Time("2026-11-21 16:30:00+02".into())).unwrap();
        assert_eq!(t, Goal::Time("2026-11-21 14:30:00+00".parse().unwrap()));
        assert_eq!(t.describe(), "time '2026-11-21 14:30:00+00'");

        // The zone rule, in the timestamp parser's own words.
        let e = parse_target(&RestoreTarget::Time("2026-11-21 14:30:00".into())).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("no zone") && msg.contains("2026-11-21 14:30:00"), "{msg}");
        assert!(e.hint().unwrap().contains("+00"));

        assert_eq!(parse_target(&RestoreTarget::Lsn("0/3000060".into())).unwrap(), Goal::Lsn(Lsn(0x300_0060)));
        let e = parse_target(&RestoreTarget::Lsn("3000060".into())).unwrap_err().to_string();
        assert!(e.contains("invalid LSN '3000060'"), "{e}");

        assert_eq!(parse_target(&RestoreTarget::Xid("740".into())).unwrap(), Goal::Xid(740));
        assert_eq!(parse_target(&RestoreTarget::Xid("4294968036".into())).unwrap(), Goal::Xid((1 << 32) + 740));
        assert!(parse_target(&RestoreTarget::Xid("4294967296".into())).is_err(), "epoch 1, xid 0");
        for bad in ["", "-1", "abc", "0", "2", "1.5"] {
            let e = parse_target(&RestoreTarget::Xid(bad.into())).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid transaction id '{bad}'")), "{e}");
        }

        assert_eq!(parse_target(&RestoreTarget::Name("a".repeat(63))).unwrap(), Goal::Name("a".repeat(63)));
        for bad in [String::new(), "a".repeat(64), "é".repeat(32)] {
            let e = parse_target(&RestoreTarget::Name(bad.clone())).unwrap_err().to_string();
            assert!(e.contains("1 to 63 bytes"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn timelines() {
        assert_eq!(parse_timeline(None).unwrap(), Timeline::Latest);
        assert_eq!(parse_timeline(Some("latest")).unwrap(), Timeline::Latest);
        assert_eq!(parse_timeline(Some("CURRENT")).unwrap(), Timeline::Current);
        assert_eq!(parse_timeline(Some("2")).unwrap(), Timeline::Id(2));
        assert_eq!(Timeline::Id(2).setting(), "2");
        assert_eq!(Timeline::Latest.setting(), "latest");
        for bad in ["0", "-1", "two", "", "0x2"] {
            let e = parse_timeline(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")) && e.contains("latest"), "{e}");
        }
    }
}
