//! `parse_history` on arbitrary bytes: never panics; what it accepts has
//! increasing timelines and reads back the same once written canonically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::wal::parse_history;

fuzz_target!(|data: &[u8]| {
    match parse_history(data) {
        Ok(entries) => {
            for pair in entries.windows(2) {
                assert!(pair[0].parent < pair[1].parent, "timelines not increasing: {pair:?}");
            }
            let mut text = String::new();
            for e in &entries {
                assert_eq!(e.reason, e.reason.trim());
                text.push_str(&format!("{}\t{}\t{}\n", e.parent, e.switch_point, e.reason));
            }
            assert_eq!(parse_history(text.as_bytes()).as_ref(), Ok(&entries), "rewritten: {text:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
