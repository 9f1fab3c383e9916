//! The object envelope: `parse_header` and `decode` on arbitrary bytes never
//! panic and agree with each other; a decoded plaintext re-encodes (same
//! compression) to an object that decodes to the same plaintext.
//!
//! Random bytes almost never carry a valid header check (BLAKE3), so each
//! input is also decoded a second time with its magic, payload length and
//! both checksums fixed up: that lets the fuzzer reach the field checks and
//! the decompressor behind them, as a writer that computes the checksums
//! (a buggy or hostile one) can.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::object::{
    Compression, ContentHash, EncodeOptions, HEADER_LEN, MAGIC, ObjectError, decode, encode, parse_header,
};

fn first8_blake3(bytes: &[u8]) -> [u8; 8] {
    let h = ContentHash::of(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.0[..8]);
    out
}

/// `data` with a valid magic, payload length, payload check and header
/// check; the other header fields are the fuzzer's.
fn fix_up(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HEADER_LEN {
        return None;
    }
    let mut b = data.to_vec();
    b[0..8].copy_from_slice(&MAGIC);
    let payload_len = (b.len() - HEADER_LEN) as u64;
    b[24..32].copy_from_slice(&payload_len.to_le_bytes());
    let payload_check = first8_blake3(&b[HEADER_LEN..]);
    b[64..72].copy_from_slice(&payload_check);
    let header_check = first8_blake3(&b[0..72]);
    b[72..80].copy_from_slice(&header_check);
    Some(b)
}

fn check(data: &[u8]) {
    let header = parse_header(data);
    let decoded = decode(data);
    match (&header, &decoded) {
        (Err(e), Ok(_)) => panic!("parse_header refused ({e}) what decode accepted"),
        (Err(e1), Err(e2)) => assert_eq!(e1, e2, "decode failed differently from parse_header"),
        (Ok(h), Ok((h2, plain))) => {
            assert_eq!(h, h2);
            assert_eq!(plain.len() as u64, h.plain_len);
            assert_eq!(data.len() as u64 - HEADER_LEN as u64, h.payload_len);
            assert_eq!(ContentHash::of(plain), h.hash);
            let opts = EncodeOptions { compression: h.compression, level: 1, workers: 0 };
            let (h3, again) = encode(plain, &opts).expect("encode of a decoded plaintext");
            assert_eq!((h3.compression, h3.plain_len, h3.hash), (h.compression, h.plain_len, h.hash));
            let (h4, plain2) = decode(&again).expect("re-encoded object decodes");
            assert_eq!(h4, h3);
            assert_eq!(&plain2, plain);
            if h.compression == Compression::None {
                // Stored as is: the encoding is unique.
                assert_eq!(again, data);
            }
        }
        (Ok(_), Err(e)) => {
            assert!(
                !matches!(
                    e,
                    ObjectError::Truncated(_)
                        | ObjectError::Magic
                        | ObjectError::HeaderCheck
                        | ObjectError::Version(_)
                        | ObjectError::Compression(_)
                        | ObjectError::Encryption(_)
                        | ObjectError::Reserved
                ),
                "decode refused a header that parse_header accepted: {e}"
            );
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = fix_up(data) {
        check(&fixed);
    }
});
