//! `Manifest::from_json` on arbitrary bytes: never panics; an accepted
//! manifest has only safe paths and sizes that add up, and serializes back
//! to a manifest equal to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault_formats::manifest::{EntryKind, FileData, Manifest, is_safe_path};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::from_json(data) else { return };
    for e in &m.entries {
        assert!(is_safe_path(&e.path), "accepted unsafe path {:?}", e.path);
        if let EntryKind::File { data: FileData::Chunks { chunks } } = &e.kind {
            assert_eq!(chunks.iter().map(|c| c.len).sum::<u64>(), e.size);
        }
    }
    let again = Manifest::from_json(&m.to_json()).expect("a serialized manifest parses");
    assert_eq!(again, m);
});
