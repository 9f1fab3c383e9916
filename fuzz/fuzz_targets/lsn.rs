//! `Lsn::from_str` on arbitrary UTF-8: never panics, and the canonical
//! display of an accepted LSN parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::wal::{Lsn, SegmentName, TimelineId, WalSegmentSize};

/// The display PostgreSQL would give an accepted `hi/lo` string: upper
/// case, no leading zeros.
fn canonical(s: &str) -> String {
    let half = |h: &str| {
        let t = h.trim_start_matches('0');
        if t.is_empty() { "0".to_string() } else { t.to_ascii_uppercase() }
    };
    let (hi, lo) = s.split_once('/').expect("an accepted LSN has a '/'");
    format!("{}/{}", half(hi), half(lo))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match s.parse::<Lsn>() {
        Ok(lsn) => {
            let shown = lsn.to_string();
            assert_eq!(shown.parse::<Lsn>(), Ok(lsn), "display {shown:?} does not parse back");
            assert_eq!(shown, canonical(s), "display of {s:?} is not canonical");
            // Segment arithmetic on the parsed position.
            for shift in 20..=30 {
                let size = WalSegmentSize::new(1 << shift).expect("valid size");
                let segno = size.segment_of(lsn);
                let start = size.start_of(segno);
                assert!(start <= lsn && lsn.0 - start.0 < size.bytes());
                let name = SegmentName::from_segno(TimelineId::FIRST, segno, size);
                assert_eq!(name.segno(size), Some(segno));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
