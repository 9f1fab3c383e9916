//! `SegmentHeader::parse` on arbitrary bytes: never panics, and an accepted
//! header encodes to the bytes it was read from and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::wal::{LONG_PAGE_HEADER_LEN, PgVersion, SegmentHeader};

fuzz_target!(|data: &[u8]| {
    match SegmentHeader::parse(data) {
        Ok(header) => {
            let encoded = header.encode();
            assert_eq!(SegmentHeader::parse(&encoded), Ok(header));
            // encode() writes every field parse() reads; bytes 16..24
            // (xlp_rem_len and padding) are not part of the header value.
            assert_eq!(encoded[..16], data[..16]);
            assert_eq!(encoded[24..LONG_PAGE_HEADER_LEN], data[24..LONG_PAGE_HEADER_LEN]);
            let v = header.pg_version;
            assert_eq!(PgVersion::new(v.major()), Some(v));
            assert_eq!(PgVersion::from_page_magic(v.page_magic()), Some(v));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
