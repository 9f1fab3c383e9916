//! Pure formats of walvault: bytes and strings in, values out, no I/O.
//!
//! - [`wal`]: [`wal::Lsn`], [`wal::TimelineId`], [`wal::SegmentNo`],
//!   [`wal::WalSegmentSize`], [`wal::WalFileName`], the segment's long page
//!   header ([`wal::SegmentHeader`], [`wal::validate_segment`]) and timeline
//!   history files ([`wal::parse_history`]).
//! - [`object`]: the envelope every stored object is wrapped in
//!   ([`object::encode`], [`object::decode`]).
//! - [`manifest`]: a base backup's [`manifest::Manifest`].
//! - [`time`]: [`time::Timestamp`], parsed with a required zone.
//!
//! ```
//! use walvault_formats::wal::{WalFileName, WalSegmentSize};
//! use walvault_formats::object::{decode, encode, EncodeOptions};
//!
//! let name: WalFileName = "0000000100000002000000FF".parse().unwrap();
//! let seg = name.segment().unwrap().segno(WalSegmentSize::DEFAULT).unwrap();
//! assert_eq!(seg.0, 0x2FF);
//! assert_eq!(name.to_string(), "0000000100000002000000FF");
//!
//! let (header, stored) = encode(b"some WAL bytes", &EncodeOptions::default()).unwrap();
//! assert_eq!(decode(&stored).unwrap().1, b"some WAL bytes");
//! assert_eq!(header.plain_len, 14);
//! ```

pub mod manifest;
pub mod object;
pub mod time;
pub mod wal;
