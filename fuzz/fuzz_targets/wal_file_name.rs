//! `WalFileName::from_str` on arbitrary UTF-8: never panics, and every name
//! it accepts is displayed back exactly as written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::wal::{MAX_WAL_FILE_NAME_LEN, SegmentName, WalFileName, WalSegmentSize};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match s.parse::<WalFileName>() {
        Ok(name) => {
            let shown = name.to_string();
            assert_eq!(shown, s, "accepted name does not round-trip: {name:?}");
            assert!(shown.len() <= MAX_WAL_FILE_NAME_LEN);
            assert_eq!(shown.parse::<WalFileName>(), Ok(name));
            let _ = name.kind();
            assert_ne!(name.timeline().get(), 0);
            if let Some(seg) = name.segment() {
                assert_eq!(seg.timeline, name.timeline());
                assert!(shown.starts_with(&seg.timeline_and_log()));
                // For every segment size the name either cannot exist or
                // maps to a segment number that maps back to it.
                for shift in 20..=30 {
                    let size = WalSegmentSize::new(1 << shift).expect("valid size");
                    if let Some(segno) = seg.segno(size) {
                        assert_eq!(SegmentName::from_segno(seg.timeline, segno, size), seg);
                    }
                }
            }
        }
        Err(e) => {
            // The error shows a shortened, escaped copy of the input.
            let _ = e.to_string();
        }
    }
});
