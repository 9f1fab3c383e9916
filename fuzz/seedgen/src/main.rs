//! Writes the seed corpora of the fuzz targets into `fuzz/seeds/<target>/`
//! (or into the directory given as the only argument): a few valid inputs
//! per target, deterministic and tiny, built with walvault-formats itself.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p walvault-fuzz-seedgen`

use std::path::PathBuf;

use walvault_formats::object::{Compression, EncodeOptions, decode, encode};
use walvault_formats::wal::{Lsn, PgVersion, SegmentHeader, SystemId, parse_history};

fn main() -> std::io::Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../seeds"));
    let mut written = 0usize;
    let mut put = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
        written += bytes.len();
        Ok(())
    };

    for (file, name) in [
        ("segment", "000000010000000000000001"),
        ("partial", "000000010000000A000000FF.partial"),
        ("history", "0000000A.history"),
        ("backup", "000000010000000000000002.00000028.backup"),
    ] {
        assert!(name.parse::<walvault_formats::wal::WalFileName>().is_ok());
        put("wal_file_name", file, name.as_bytes())?;
    }

    for (file, lsn) in [("typical", "16/B374D848"), ("zero", "0/0"), ("max", "FFFFFFFF/FFFFFFFF")] {
        assert!(lsn.parse::<Lsn>().is_ok());
        put("lsn", file, lsn.as_bytes())?;
    }

    for (file, major, info, block_size) in [("pg15", 15, 0x0002, 8192), ("pg18", 18, 0x0007, 1024)] {
        let header = SegmentHeader {
            pg_version: PgVersion::new(major).expect("supported version"),
            info,
            timeline: 2,
            page_address: Lsn(0x0000_0001_0500_0000),
            system_id: SystemId(7_300_000_000_000_000_001),
            segment_size: 16 << 20,
            block_size,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::parse(&bytes), Ok(header));
        put("segment_header", file, &bytes)?;
    }

    for (file, text) in [
        ("one", "1\t0/3000158\tno recovery target specified\n"),
        (
            "two",
            "# comment\n1\t0/3000158\tno recovery target specified\n\n2\t16/B374D848\tbefore 2026-11-21 14:30:00+00\n",
        ),
    ] {
        assert!(parse_history(text.as_bytes()).is_ok());
        put("history", file, text.as_bytes())?;
    }

    let plain = b"1\t0/3000158\tno recovery target specified\n1\t0/3000158\tno recovery target specified\n";
    for (file, compression) in [("none", Compression::None), ("zstd", Compression::Zstd)] {
        let (_, bytes) = encode(plain, &EncodeOptions { compression, level: 3, workers: 0 })?;
        assert_eq!(decode(&bytes).expect("decodes").1, plain);
        put("object_decode", file, &bytes)?;
    }

    println!("wrote {written} bytes of seeds under {}", root.display());
    Ok(())
}
