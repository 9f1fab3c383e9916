//! WAL vocabulary: LSNs, timelines, segment numbers and sizes, WAL file
//! names, the long page header that opens every segment, and timeline
//! history files.
//!
//! Everything here is pure: bytes and strings in, values out. The segment
//! size is always passed explicitly (PostgreSQL chooses it at `initdb`), never
//! kept in a global.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A position in the WAL stream (`XLogRecPtr`), displayed as PostgreSQL does:
/// `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Why a string could not be parsed as an [`Lsn`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid LSN '{0}': expected two hexadecimal numbers separated by '/', such as '16/B374D848'")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Equivalent of `pg_lsn_in()`: `X/X`, each half at most 8 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map_err(|_| err())
        };
        Ok(Lsn((u64::from(half(hi)?) << 32) | u64::from(half(lo)?)))
    }
}

/// A PostgreSQL timeline (`TimeLineID`); timeline 0 does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(u32);

impl TimelineId {
    /// The first timeline of every cluster.
    pub const FIRST: TimelineId = TimelineId(1);

    /// A timeline, or `None` for 0, which PostgreSQL never uses.
    pub fn new(id: u32) -> Option<TimelineId> {
        (id != 0).then_some(TimelineId(id))
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The size of one WAL segment (`wal_segment_size`): a power of two from
/// 1 MiB to 1 GiB, fixed per cluster at `initdb --wal-segsize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalSegmentSize(u32);

impl WalSegmentSize {
    /// PostgreSQL's default, 16 MiB.
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(16 * 1024 * 1024);

    /// Equivalent of `IsValidWalSegSize()` (xlog_internal.h).
    pub fn new(bytes: u64) -> Option<WalSegmentSize> {
        let valid = bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes);
        // The range check above proves the value fits in u32.
        valid.then_some(WalSegmentSize(bytes as u32))
    }

    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// Equivalent of `XLogSegmentsPerXLogId()`: how many segments share one
    /// "log" number, the middle 8 hex digits of a file name.
    pub fn segments_per_log(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }

    /// The segment holding `lsn` (`XLByteToSeg()`).
    pub fn segment_of(self, lsn: Lsn) -> SegmentNo {
        SegmentNo(lsn.0 / self.bytes())
    }

    /// The LSN of the first byte of `segno` (`XLogSegNoOffsetToRecPtr()`).
    pub fn start_of(self, segno: SegmentNo) -> Lsn {
        Lsn(segno.0.wrapping_mul(self.bytes()))
    }
}

impl fmt::Display for WalSegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1 << 30 { write!(f, "{} GiB", self.0 >> 30) } else { write!(f, "{} MiB", self.0 >> 20) }
    }
}

/// A segment's position in the WAL stream (`XLogSegNo`), independent of its
/// timeline. Its file name depends on the segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

/// The three parts of a segment file name: timeline, "log" and "seg", each
/// eight upper-case hexadecimal digits. Kept as written so that a name
/// round-trips without knowing the segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// The timeline the segment belongs to.
    pub timeline: TimelineId,
    /// High 32 bits of the segment's start LSN.
    pub log: u32,
    /// Segment index within `log`.
    pub seg: u32,
}

impl SegmentName {
    /// Equivalent of `XLogFileName()` (xlog_internal.h).
    pub fn from_segno(timeline: TimelineId, segno: SegmentNo, size: WalSegmentSize) -> SegmentName {
        let per_log = size.segments_per_log();
        SegmentName {
            timeline,
            // segno / per_log fits in u32 for every LSN below 2^64.
            log: (segno.0 / per_log) as u32,
            seg: (segno.0 % per_log) as u32,
        }
    }

    /// Equivalent of `XLogFromFileName()`; `None` when `seg` is too large
    /// for this segment size, so the name cannot come from such a cluster.
    pub fn segno(&self, size: WalSegmentSize) -> Option<SegmentNo> {
        let per_log = size.segments_per_log();
        (u64::from(self.seg) < per_log).then(|| SegmentNo(u64::from(self.log) * per_log + u64::from(self.seg)))
    }

    /// The first 16 characters (timeline and log), shared by up to 4096
    /// consecutive segments: a good directory to keep them in.
    pub fn timeline_and_log(&self) -> String {
        format!("{:08X}{:08X}", self.timeline.0, self.log)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline.0, self.log, self.seg)
    }
}

/// Every kind of file PostgreSQL hands to `archive_command` or asks of
/// `restore_command`. `Display` and `FromStr` round-trip exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    /// A complete segment: `000000010000000A000000FF`.
    Segment(SegmentName),
    /// The incomplete last segment of a timeline, kept at promotion or by
    /// `pg_receivewal`: `000000010000000A000000FF.partial`.
    Partial(SegmentName),
    /// A timeline history file: `00000002.history`.
    History(TimelineId),
    /// A backup history file: `000000010000000A000000FF.00000028.backup`;
    /// the second number is the backup's start offset within the segment.
    BackupHistory(SegmentName, u32),
}

/// Why a string is not a WAL file name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid WAL file name '{shown}': {reason}")]
pub struct WalFileNameError {
    /// The offending name, shortened and escaped for display.
    pub shown: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The longest name PostgreSQL produces (`MAXFNAMELEN`).
pub const MAX_WAL_FILE_NAME_LEN: usize = 64;

fn upper_hex_u32(s: &str) -> Option<u32> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn parse_segment_name(s: &str) -> Option<SegmentName> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    Some(SegmentName {
        timeline: TimelineId::new(upper_hex_u32(&s[0..8])?)?,
        log: upper_hex_u32(&s[8..16])?,
        seg: upper_hex_u32(&s[16..24])?,
    })
}

impl FromStr for WalFileName {
    type Err = WalFileNameError;

    /// Accepts exactly the names PostgreSQL writes (upper-case hexadecimal;
    /// see `IsXLogFileName()` and friends in xlog_internal.h), nothing else:
    /// no paths, no lower case, no extra characters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| {
            let mut shown: String = s.chars().take(MAX_WAL_FILE_NAME_LEN).flat_map(char::escape_default).collect();
            if s.chars().count() > MAX_WAL_FILE_NAME_LEN {
                shown.push('…');
            }
            WalFileNameError { shown, reason }
        };
        if s.is_empty() {
            return Err(err("the name is empty"));
        }
        if s.len() > MAX_WAL_FILE_NAME_LEN {
            return Err(err("the name is too long"));
        }
        if s.contains('/') || s.contains('\\') || s.contains('\0') {
            return Err(err("a WAL file name contains no path separators"));
        }
        let expected = "expected a segment ('000000010000000000000001'), a '.partial' segment, \
                        a timeline history file ('00000002.history') or a backup history file";
        if let Some(tli) = s.strip_suffix(".history") {
            let id = upper_hex_u32(tli).and_then(TimelineId::new).ok_or_else(|| err(expected))?;
            return Ok(WalFileName::History(id));
        }
        if let Some(seg) = s.strip_suffix(".partial") {
            return parse_segment_name(seg).map(WalFileName::Partial).ok_or_else(|| err(expected));
        }
        if let Some(rest) = s.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.').ok_or_else(|| err(expected))?;
            let seg = parse_segment_name(seg).ok_or_else(|| err(expected))?;
            let offset = upper_hex_u32(offset).ok_or_else(|| err(expected))?;
            return Ok(WalFileName::BackupHistory(seg, offset));
        }
        parse_segment_name(s).map(WalFileName::Segment).ok_or_else(|| err(expected))
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(t) => write!(f, "{:08X}.history", t.0),
            WalFileName::BackupHistory(s, off) => write!(f, "{s}.{off:08X}.backup"),
        }
    }
}

impl WalFileName {
    /// The timeline the file belongs to.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) => s.timeline,
            WalFileName::History(t) => *t,
        }
    }

    /// The segment the file names or refers to; `None` for history files.
    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::BackupHistory(s, _) => Some(*s),
            WalFileName::History(_) => None,
        }
    }

    /// A short lower-case word for the kind: `segment`, `partial`,
    /// `history` or `backup`.
    pub fn kind(&self) -> &'static str {
        match self {
            WalFileName::Segment(_) => "segment",
            WalFileName::Partial(_) => "partial",
            WalFileName::History(_) => "history",
            WalFileName::BackupHistory(..) => "backup",
        }
    }
}

/// A PostgreSQL major version that walvault knows the WAL format of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgVersion(u32);

/// `XLOG_PAGE_MAGIC` of each supported major version (xlog_internal.h).
const PAGE_MAGICS: [(u32, u16); 7] =
    [(12, 0xD101), (13, 0xD106), (14, 0xD10D), (15, 0xD110), (16, 0xD113), (17, 0xD116), (18, 0xD118)];

impl PgVersion {
    /// A supported major version (12 to 18), or `None`.
    pub fn new(major: u32) -> Option<PgVersion> {
        PAGE_MAGICS.iter().any(|&(v, _)| v == major).then_some(PgVersion(major))
    }

    /// The major version number, such as 15.
    pub fn major(self) -> u32 {
        self.0
    }

    /// The `XLOG_PAGE_MAGIC` of this version's WAL.
    pub fn page_magic(self) -> u16 {
        PAGE_MAGICS.iter().find(|&&(v, _)| v == self.0).map_or(0, |&(_, m)| m)
    }

    /// The version whose WAL carries `magic`.
    pub fn from_page_magic(magic: u16) -> Option<PgVersion> {
        PAGE_MAGICS.iter().find(|&&(_, m)| m == magic).map(|&(v, _)| PgVersion(v))
    }
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster's system identifier (`pg_control.system_identifier`), unique
/// per `initdb`, printed in decimal as `pg_controldata` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemId(pub u64);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `SizeOfXLogLongPHD`: the long page header that opens every segment.
pub const LONG_PAGE_HEADER_LEN: usize = 40;
/// `XLP_LONG_HEADER` flag of `xlp_info`.
const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_ALL_FLAGS`: every defined `xlp_info` bit.
const XLP_ALL_FLAGS: u16 = 0x0007;

/// The long page header at the start of a segment
/// (`XLogLongPageHeaderData`, xlog_internal.h), in the byte order of the
/// machine that wrote it (walvault reads little-endian WAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The PostgreSQL version, from `xlp_magic`.
    pub pg_version: PgVersion,
    /// `xlp_info` flag bits.
    pub info: u16,
    /// `xlp_tli`: the timeline of the first record on the page.
    pub timeline: u32,
    /// `xlp_pageaddr`: the LSN of the page, the segment's start.
    pub page_address: Lsn,
    /// `xlp_sysid`: the cluster's system identifier.
    pub system_id: SystemId,
    /// `xlp_seg_size`.
    pub segment_size: u32,
    /// `xlp_xlog_blcksz`: the WAL block size.
    pub block_size: u32,
}

/// Why bytes are not an acceptable segment for a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SegmentError {
    /// Too short to hold a long page header.
    #[error("only {0} bytes, shorter than a WAL page header")]
    Truncated(usize),
    /// Too short, too long.
    #[error("size is {actual} bytes, expected {expected} (the segment size of the cluster)")]
    Size {
        /// Bytes present.
        actual: u64,
        /// The cluster's segment size.
        expected: u64,
    },
    /// The first two bytes are not a known `XLOG_PAGE_MAGIC`.
    #[error("unknown page magic 0x{0:04X}: not WAL of PostgreSQL 12 to 18")]
    Magic(u16),
    /// The page header is not a long header or has unknown flags.
    #[error("the first page has flags 0x{0:04X}, expected a long page header")]
    Flags(u16),
    /// The WAL was written by another major version than the repository's.
    #[error("written by PostgreSQL {actual}, the repository holds PostgreSQL {expected}")]
    Version {
        /// Version in the header.
        actual: PgVersion,
        /// Version of the repository's cluster.
        expected: PgVersion,
    },
    /// The header names another segment size.
    #[error("header says the segment size is {actual} bytes, expected {expected}")]
    HeaderSegmentSize {
        /// In the header.
        actual: u32,
        /// The cluster's.
        expected: u64,
    },
    /// The WAL block size is not a power of two from 1 to 64 KiB.
    #[error("implausible WAL block size {0}")]
    BlockSize(u32),
    /// The page address does not match the position the file name implies.
    #[error("header page address {actual} does not match the file name, which starts at {expected}")]
    PageAddress {
        /// In the header.
        actual: Lsn,
        /// From the file name.
        expected: Lsn,
    },
    /// The header's timeline is newer than the file name's.
    #[error("header timeline {actual} is newer than the file name's timeline {expected}")]
    Timeline {
        /// In the header.
        actual: u32,
        /// From the file name.
        expected: TimelineId,
    },
    /// The name cannot be a segment of this segment size.
    #[error("the name is not a valid segment for {0} segments")]
    NameForSize(WalSegmentSize),
    /// A segment of another cluster.
    #[error("belongs to another cluster: system identifier {actual}, the repository's cluster has {expected}")]
    SystemId {
        /// In the header.
        actual: SystemId,
        /// The repository's.
        expected: SystemId,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl SegmentHeader {
    /// Reads the long page header from the start of a segment; checks only
    /// what needs no context (magic, flags, block size).
    pub fn parse(bytes: &[u8]) -> Result<SegmentHeader, SegmentError> {
        if bytes.len() < LONG_PAGE_HEADER_LEN {
            return Err(SegmentError::Truncated(bytes.len()));
        }
        let magic = u16_at(bytes, 0);
        let pg_version = PgVersion::from_page_magic(magic).ok_or(SegmentError::Magic(magic))?;
        let info = u16_at(bytes, 2);
        if info & XLP_LONG_HEADER == 0 || info & !XLP_ALL_FLAGS != 0 {
            return Err(SegmentError::Flags(info));
        }
        let block_size = u32_at(bytes, 36);
        if !block_size.is_power_of_two() || !(1024..=65536).contains(&block_size) {
            return Err(SegmentError::BlockSize(block_size));
        }
        Ok(SegmentHeader {
            pg_version,
            info,
            timeline: u32_at(bytes, 4),
            page_address: Lsn(u64_at(bytes, 8)),
            system_id: SystemId(u64_at(bytes, 24)),
            segment_size: u32_at(bytes, 32),
            block_size,
        })
    }

    /// Writes this header as the first [`LONG_PAGE_HEADER_LEN`] bytes of a
    /// page (the inverse of [`SegmentHeader::parse`]); useful to build test
    /// segments.
    pub fn encode(&self) -> [u8; LONG_PAGE_HEADER_LEN] {
        let mut b = [0u8; LONG_PAGE_HEADER_LEN];
        b[0..2].copy_from_slice(&self.pg_version.page_magic().to_le_bytes());
        b[2..4].copy_from_slice(&self.info.to_le_bytes());
        b[4..8].copy_from_slice(&self.timeline.to_le_bytes());
        b[8..16].copy_from_slice(&self.page_address.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.system_id.0.to_le_bytes());
        b[32..36].copy_from_slice(&self.segment_size.to_le_bytes());
        b[36..40].copy_from_slice(&self.block_size.to_le_bytes());
        b
    }
}

/// What a segment must match: the identity of the repository's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterIdentity {
    /// `pg_control.system_identifier`.
    pub system_id: SystemId,
    /// The major version.
    pub pg_version: PgVersion,
    /// `wal_segment_size`.
    pub segment_size: WalSegmentSize,
}

/// Accepts `bytes` as segment `name` of `cluster` only if its size is the
/// segment size, its header is a long page header of the cluster's
/// PostgreSQL version, its page address is where the name says, and its
/// system identifier is the cluster's.
pub fn validate_segment(
    bytes: &[u8],
    name: SegmentName,
    cluster: &ClusterIdentity,
) -> Result<SegmentHeader, SegmentError> {
    let expected = cluster.segment_size.bytes();
    if bytes.len() as u64 != expected {
        return Err(SegmentError::Size { actual: bytes.len() as u64, expected });
    }
    let header = SegmentHeader::parse(bytes)?;
    if header.pg_version != cluster.pg_version {
        return Err(SegmentError::Version { actual: header.pg_version, expected: cluster.pg_version });
    }
    if u64::from(header.segment_size) != expected {
        return Err(SegmentError::HeaderSegmentSize { actual: header.segment_size, expected });
    }
    let segno = name.segno(cluster.segment_size).ok_or(SegmentError::NameForSize(cluster.segment_size))?;
    let start = cluster.segment_size.start_of(segno);
    if header.page_address != start {
        return Err(SegmentError::PageAddress { actual: header.page_address, expected: start });
    }
    // The first segment of a new timeline starts with a copy of the old
    // timeline's last segment, so its first page may carry an older
    // timeline; never a newer one.
    if header.timeline > name.timeline.get() || header.timeline == 0 {
        return Err(SegmentError::Timeline { actual: header.timeline, expected: name.timeline });
    }
    if header.system_id != cluster.system_id {
        return Err(SegmentError::SystemId { actual: header.system_id, expected: cluster.system_id });
    }
    Ok(header)
}

/// A segment of `cluster` that passes [`validate_segment`]: a valid long
/// page header for segment `segno` of timeline `timeline`, the rest of the
/// segment filled with `fill`. For tests and benchmarks.
pub fn synthetic_segment(cluster: &ClusterIdentity, timeline: TimelineId, segno: SegmentNo, fill: u8) -> Vec<u8> {
    let mut bytes = vec![fill; cluster.segment_size.bytes() as usize];
    let header = SegmentHeader {
        pg_version: cluster.pg_version,
        info: XLP_LONG_HEADER,
        timeline: timeline.get(),
        page_address: cluster.segment_size.start_of(segno),
        system_id: cluster.system_id,
        // WalSegmentSize is at most 1 GiB.
        segment_size: cluster.segment_size.bytes() as u32,
        block_size: 8192,
    };
    bytes[..LONG_PAGE_HEADER_LEN].copy_from_slice(&header.encode());
    bytes
}

/// One line of a timeline history file: `parent_tli<TAB>switch_lsn<TAB>reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The timeline that ended.
    pub parent: TimelineId,
    /// Where it ended: the first LSN of the next timeline.
    pub switch_point: Lsn,
    /// Free text PostgreSQL wrote (such as "no recovery target specified").
    pub reason: String,
}

/// Why a history file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {reason}")]
pub struct HistoryError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
}

/// Equivalent of `readTimeLineHistory()` (timeline.c): blank lines and
/// lines starting with `#` are skipped; timelines must increase.
pub fn parse_history(bytes: &[u8]) -> Result<Vec<HistoryEntry>, HistoryError> {
    let text = std::str::from_utf8(bytes).map_err(|_| HistoryError { line: 0, reason: "not UTF-8 text" })?;
    let mut entries: Vec<HistoryEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut fields = trimmed.splitn(3, ['\t', ' ']);
        let tli = fields.next().and_then(|t| t.parse::<u32>().ok()).and_then(TimelineId::new);
        let parent = tli.ok_or(HistoryError { line, reason: "expected a timeline number" })?;
        let lsn = fields.next().map(str::trim).and_then(|l| l.parse::<Lsn>().ok());
        let switch_point = lsn.ok_or(HistoryError { line, reason: "expected a switch point LSN" })?;
        if entries.last().is_some_and(|e| e.parent >= parent) {
            return Err(HistoryError { line, reason: "timeline IDs must be in increasing sequence" });
        }
        let reason = fields.next().unwrap_or("").trim().to_string();
        entries.push(HistoryEntry { parent, switch_point, reason });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const MIB16: WalSegmentSize = WalSegmentSize::DEFAULT;

    #[test]
    fn lsn_display_and_parse() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        for bad in ["", "/", "1/", "/1", "1/2/3", "123456789/0", "g/0", "1 /2", "-1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn segment_size_bounds() {
        assert!(WalSegmentSize::new(1 << 19).is_none());
        assert!(WalSegmentSize::new(1 << 20).is_some());
        assert!(WalSegmentSize::new(1 << 30).is_some());
        assert!(WalSegmentSize::new(1 << 31).is_none());
        assert!(WalSegmentSize::new(3 << 20).is_none());
        assert_eq!(MIB16.segments_per_log(), 256);
    }

    #[test]
    fn names_match_postgresql() {
        let n = SegmentName::from_segno(TimelineId::new(1).unwrap(), SegmentNo(0x1FF), MIB16);
        assert_eq!(n.to_string(), "0000000100000001000000FF");
        let one_gib = WalSegmentSize::new(1 << 30).unwrap();
        let n = SegmentName::from_segno(TimelineId::new(3).unwrap(), SegmentNo(9), one_gib);
        assert_eq!(n.to_string(), "000000030000000200000001");
        // "seg" 0x100 cannot exist with 16 MiB segments
        let big: WalFileName = "000000010000000000000100".parse().unwrap();
        assert_eq!(big.segment().unwrap().segno(MIB16), None);
    }

    #[test]
    fn every_kind_parses() {
        for (name, kind) in [
            ("000000010000000000000001", "segment"),
            ("000000010000000000000001.partial", "partial"),
            ("0000000A.history", "history"),
            ("000000010000000000000002.00000028.backup", "backup"),
        ] {
            let parsed: WalFileName = name.parse().unwrap();
            assert_eq!(parsed.kind(), kind);
            assert_eq!(parsed.to_string(), name);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "../x",
            "00000001000000000000000",
            "0000000100000000000000011",
            "000000010000000000000001/../../x",
            "00000001000000000000000a",
            "000000000000000000000001",
            "00000000.history",
            "0000001.history",
            "000000010000000000000001.backup",
            "000000010000000000000001.0000028.backup",
            "000000010000000000000001.partial.partial",
            "RECOVERYXLOG",
            "x\0",
        ] {
            assert!(bad.parse::<WalFileName>().is_err(), "{bad:?} must not parse");
        }
        let long = "0".repeat(200);
        let e = long.parse::<WalFileName>().unwrap_err();
        assert!(e.to_string().contains("too long"));
        assert!(e.shown.len() < 80);
    }

    fn cluster() -> ClusterIdentity {
        ClusterIdentity {
            system_id: SystemId(7_300_000_000_000_000_001),
            pg_version: PgVersion::new(15).unwrap(),
            segment_size: MIB16,
        }
    }

    fn segment(segno: u64, tli: u32, c: &ClusterIdentity) -> Vec<u8> {
        synthetic_segment(c, TimelineId::new(tli).unwrap(), SegmentNo(segno), 0)
    }

    #[test]
    fn segment_validation() {
        let c = cluster();
        let name = SegmentName::from_segno(TimelineId::new(2).unwrap(), SegmentNo(5), MIB16);
        let good = segment(5, 2, &c);
        assert!(validate_segment(&good, name, &c).is_ok());
        // first segment of a new timeline carries the parent's timeline
        assert!(validate_segment(&segment(5, 1, &c), name, &c).is_ok());
        assert!(matches!(validate_segment(&segment(5, 3, &c), name, &c), Err(SegmentError::Timeline { .. })));
        assert!(matches!(validate_segment(&good[..1000], name, &c), Err(SegmentError::Size { .. })));
        assert!(matches!(validate_segment(&segment(6, 2, &c), name, &c), Err(SegmentError::PageAddress { .. })));
        let other = ClusterIdentity { system_id: SystemId(42), ..c };
        assert!(matches!(validate_segment(&good, name, &other), Err(SegmentError::SystemId { .. })));
        let v16 = ClusterIdentity { pg_version: PgVersion::new(16).unwrap(), ..c };
        assert!(matches!(validate_segment(&good, name, &v16), Err(SegmentError::Version { .. })));
        let text = vec![b'x'; MIB16.bytes() as usize];
        assert!(matches!(validate_segment(&text, name, &c), Err(SegmentError::Magic(_))));
    }

    #[test]
    fn history_files() {
        let text = b"1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tbefore 2026-11-21 14:30:00+00\n";
        let h = parse_history(text).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].parent, TimelineId::new(2).unwrap());
        assert_eq!(h[1].switch_point, Lsn(0x500_0000));
        assert!(parse_history(b"2\t0/1\tx\n1\t0/2\ty\n").is_err());
        assert!(parse_history(b"one\t0/1\n").is_err());
        assert!(parse_history(b"1\tnope\n").is_err());
        assert_eq!(parse_history(b"").unwrap(), vec![]);
    }

    proptest! {
        #[test]
        fn lsn_round_trips(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>().unwrap(), Lsn(v));
        }

        #[test]
        fn file_names_round_trip(tli in 1u32.., log in any::<u32>(), seg in any::<u32>(), off in any::<u32>(), kind in 0..4u8) {
            let s = SegmentName { timeline: TimelineId::new(tli).unwrap(), log, seg };
            let name = match kind {
                0 => WalFileName::Segment(s),
                1 => WalFileName::Partial(s),
                2 => WalFileName::History(s.timeline),
                _ => WalFileName::BackupHistory(s, off),
            };
            prop_assert_eq!(name.to_string().parse::<WalFileName>().unwrap(), name);
        }

        #[test]
        fn segno_round_trips(shift in 20u32..=30, segno in 0u64..(1 << 40)) {
            let size = WalSegmentSize::new(1 << shift).unwrap();
            let segno = SegmentNo(segno % (u64::MAX / size.bytes()));
            let n = SegmentName::from_segno(TimelineId::FIRST, segno, size);
            prop_assert_eq!(n.segno(size), Some(segno));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,80}", b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = s.parse::<WalFileName>();
            let _ = s.parse::<Lsn>();
            let _ = SegmentHeader::parse(&b);
            let _ = parse_history(&b);
        }
    }
}
