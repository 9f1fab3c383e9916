//! The pure parts of naming and describing a backup: its identifier, the
//! fields walvault reads from `backup_label`, and sizes shown to people.

use walvault_formats::time::Timestamp;

/// The identifier of a backup started at `start_ms` (ms since the epoch):
/// its UTC start time as `YYYYMMDDTHHMMSSZ`, then `-2`, `-3`… for the
/// `attempt`-th backup started within the same second (`attempt` counts
/// from 1).
pub(crate) fn backup_id(start_ms: i64, attempt: u32) -> String {
    // Timestamp shows `2026-11-21 14:30:00+00` (microseconds only when not
    // zero, hence the whole seconds): keep its digits.
    let whole = Timestamp::from_ms(start_ms.div_euclid(1000) * 1000).to_string();
    let digits: String = whole.trim_end_matches("+00").chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    if attempt <= 1 { format!("{date}T{time}Z") } else { format!("{date}T{time}Z-{attempt}") }
}

/// The timeline in a `backup_label`'s `START TIMELINE:` line.
pub(crate) fn label_timeline(label: &str) -> Option<u32> {
    label.lines().find_map(|l| l.strip_prefix("START TIMELINE:")).and_then(|v| v.trim().parse().ok()).filter(|t| *t > 0)
}

pub(crate) use crate::info::human_bytes;

/// `bytes` over `secs` seconds as `12.3 MiB/s` (0 when no time passed).
pub(crate) fn human_rate(bytes: u64, secs: f64) -> String {
    let rate = if secs > 0.0 { bytes as f64 / secs / (1024.0 * 1024.0) } else { 0.0 };
    format!("{rate:.1} MiB/s")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_utc_start_seconds() {
        // 2026-11-21 14:30:00.999 UTC
        let ms = 1_795_271_400_999;
        assert_eq!(backup_id(ms, 1), "20261121T143000Z");
        assert_eq!(backup_id(ms, 2), "20261121T143000Z-2");
        assert_eq!(backup_id(ms, 13), "20261121T143000Z-13");
        assert_eq!(backup_id(0, 1), "19700101T000000Z");
        // Identifiers of one second sort in the order they were taken
        // for the first nine, which is all a second ever needs.
        assert!(backup_id(ms, 1) < backup_id(ms, 2) && backup_id(ms, 2) < backup_id(ms + 1000, 1));
    }

    #[test]
    fn timeline_from_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
                     START TIME: 2026-11-21 14:30:00 UTC\nLABEL: walvault\nSTART TIMELINE: 3\n";
        assert_eq!(label_timeline(label), Some(3));
        assert_eq!(label_timeline("START TIMELINE: 0\n"), None);
        assert_eq!(label_timeline("START TIMELINE: x\n"), None);
        assert_eq!(label_timeline(""), None);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_rate(10 << 20, 2.0), "5.0 MiB/s");
        assert_eq!(human_rate(10, 0.0), "0.0 MiB/s");
    }
}
