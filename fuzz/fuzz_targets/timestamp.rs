//! `Timestamp::from_str` on arbitrary UTF-8: never panics, and the display of
//! an accepted time parses back to the same moment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::time::Timestamp;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(t) = s.parse::<Timestamp>() {
        let shown = t.to_string();
        assert_eq!(shown.parse::<Timestamp>(), Ok(t), "display {shown:?} of {s:?} does not parse back");
    }
});
