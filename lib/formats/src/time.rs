//! Timestamps: microseconds since the Unix epoch, parsed from and shown in
//! the form PostgreSQL uses for `recovery_target_time`.
//!
//! The rule for input: **a time must carry its zone** — `Z`, `UTC`, or a
//! numeric offset (`+00`, `+02:00`, `-0530`). PostgreSQL would read a bare
//! `2026-11-21 14:30:00` in the server's `timezone` setting, which the
//! machine running `walvault restore` cannot know for sure; guessing wrong
//! restores to the wrong hour, so walvault refuses instead of guessing.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A moment, in microseconds since 1970-01-01 00:00:00 UTC (PostgreSQL's
/// `timestamptz` resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// Why a string is not a timestamp walvault accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid time '{input}': {reason}")]
pub struct TimestampError {
    /// What was given.
    pub input: String,
    /// What is wrong, and the expected form.
    pub reason: &'static str,
}

const EXPECTED: &str = "expected 'YYYY-MM-DD HH:MM:SS[.ffffff]' followed by a zone: '+00', '+02:00', 'Z' or 'UTC'";

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl Timestamp {
    /// From milliseconds since the epoch.
    pub fn from_ms(ms: i64) -> Timestamp {
        Timestamp(ms.saturating_mul(1000))
    }

    /// Milliseconds since the epoch (rounded down).
    pub fn as_ms(self) -> i64 {
        self.0.div_euclid(1000)
    }
}

impl fmt::Display for Timestamp {
    /// `2026-11-21 14:30:00.123456+00`, always UTC, microseconds shown only
    /// when not zero; PostgreSQL and [`Timestamp::from_str`] both read it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        write!(f, "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", sod / 3600, sod % 3600 / 60, sod % 60)?;
        if micros != 0 {
            write!(f, ".{micros:06}")?;
        }
        f.write_str("+00")
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<i64> {
        let part = self.s.get(self.pos..self.pos + n)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.pos += n;
        Some(part.iter().fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0')))
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn rest(&self) -> &[u8] {
        &self.s[self.pos.min(self.s.len())..]
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;

    /// Reads `YYYY-MM-DD HH:MM[:SS[.f…]]` (or with `T`) and a required zone.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &'static str| TimestampError { input: input.to_string(), reason };
        let trimmed = input.trim();
        let mut c = Cursor { s: trimmed.as_bytes(), pos: 0 };
        let date = (|| {
            let y = c.digits(4)?;
            c.eat(b'-').then_some(())?;
            let m = c.digits(2)?;
            c.eat(b'-').then_some(())?;
            let d = c.digits(2)?;
            Some((y, m, d))
        })();
        let (y, m, d) = date.ok_or_else(|| err(EXPECTED))?;
        if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
            return Err(err("no such date"));
        }
        if !(c.eat(b' ') || c.eat(b'T')) {
            return Err(err(EXPECTED));
        }
        let hh = c.digits(2).ok_or_else(|| err(EXPECTED))?;
        if !c.eat(b':') {
            return Err(err(EXPECTED));
        }
        let mi = c.digits(2).ok_or_else(|| err(EXPECTED))?;
        let mut ss = 0;
        let mut micros = 0;
        if c.eat(b':') {
            ss = c.digits(2).ok_or_else(|| err(EXPECTED))?;
            if c.eat(b'.') {
                let mut n = 0;
                while let Some(dg) = c.digits(1) {
                    if n < 6 {
                        micros = micros * 10 + dg;
                    }
                    n += 1;
                }
                if n == 0 {
                    return Err(err(EXPECTED));
                }
                for _ in n..6 {
                    micros *= 10;
                }
            }
        }
        if hh > 23 || mi > 59 || ss > 59 {
            return Err(err("hour, minute or second out of range"));
        }
        while c.eat(b' ') {}
        let zone = c.rest();
        let offset_secs = match zone {
            [] => {
                return Err(err(
                    "the time has no zone; add one, such as '+00' for UTC ('2026-11-21 14:30:00+00'), because the server's timezone setting cannot be known here",
                ));
            }
            b"Z" | b"z" | b"UTC" | b"utc" | b"GMT" => 0,
            [sign @ (b'+' | b'-'), ..] => {
                let mut z = Cursor { s: zone, pos: 1 };
                let oh = z.digits(2).ok_or_else(|| err(EXPECTED))?;
                let om =
                    if z.eat(b':') || z.rest().len() == 2 { z.digits(2).ok_or_else(|| err(EXPECTED))? } else { 0 };
                if !z.rest().is_empty() || oh > 15 || om > 59 {
                    return Err(err(EXPECTED));
                }
                let off = oh * 3600 + om * 60;
                if *sign == b'-' { -off } else { off }
            }
            _ => return Err(err("only numeric zones ('+02:00'), 'Z' and 'UTC' are understood")),
        };
        let secs = days_from_civil(y, m, d) * 86_400 + hh * 3600 + mi * 60 + ss - offset_secs;
        Ok(Timestamp(secs * 1_000_000 + micros))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn postgresql_forms() {
        let t: Timestamp = "2026-11-21 14:30:00+00".parse().unwrap();
        assert_eq!(t.0, 1_795_271_400 * 1_000_000);
        assert_eq!(t.to_string(), "2026-11-21 14:30:00+00");
        assert_eq!("2026-11-21T14:30:00Z".parse::<Timestamp>().unwrap(), t);
        assert_eq!("2026-11-21 16:30:00+02:00".parse::<Timestamp>().unwrap(), t);
        assert_eq!("2026-11-21 09:00:00-0530".parse::<Timestamp>().unwrap(), t);
        assert_eq!("2026-11-21 14:30:00 UTC".parse::<Timestamp>().unwrap(), t);
        let f: Timestamp = "2026-11-21 14:30:00.123456789+00".parse().unwrap();
        assert_eq!(f.0 - t.0, 123_456);
        assert_eq!(f.to_string(), "2026-11-21 14:30:00.123456+00");
        assert_eq!("1970-01-01 00:00:00+00".parse::<Timestamp>().unwrap(), Timestamp(0));
        assert_eq!("2024-02-29 00:00+00".parse::<Timestamp>().unwrap().to_string(), "2024-02-29 00:00:00+00");
    }

    #[test]
    fn refused_with_a_reason() {
        let e = "2026-11-21 14:30:00".parse::<Timestamp>().unwrap_err();
        assert!(e.to_string().contains("no zone"), "{e}");
        for bad in [
            "",
            "yesterday",
            "2026-13-01 00:00+00",
            "2026-02-30 00:00+00",
            "2026-11-21 24:00+00",
            "2026-11-21 14:30+25",
            "2026-11-21 14:30 Europe/Paris",
            "2026-11-21",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(us in -62_135_596_800_000_000i64..253_402_300_799_999_999i64) {
            let t = Timestamp(us);
            prop_assert_eq!(t.to_string().parse::<Timestamp>().unwrap(), t);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Timestamp>();
        }
    }
}
