//! The stored-object envelope: every object walvault writes to a repository
//! is a fixed 80-byte header followed by the payload.
//!
//! ```text
//! offset size field
//!      0    8 magic            89 57 56 4F 42 4A 0D 0A  ("\x89WVOBJ\r\n")
//!      8    2 format version   u16 little-endian, currently 1
//!     10    1 compression      0 = none, 1 = zstd (one or more concatenated frames)
//!     11    1 encryption       0 = none (other values reserved)
//!     12    4 reserved         zero
//!     16    8 plaintext length u64 little-endian
//!     24    8 payload length   u64 little-endian: bytes after the header
//!     32   32 BLAKE3 of the plaintext
//!     64    8 payload check    first 8 bytes of BLAKE3(payload)
//!     72    8 header check     first 8 bytes of BLAKE3(bytes 0..72)
//! ```
//!
//! The header check lets a reader trust the header (for instance the hash of
//! an existing object, read with a ranged request) without reading the
//! payload. The payload check catches damage that a compressor would
//! tolerate (some bits of a zstd frame do not change its output). Decoding
//! checks every field, so a change to any byte of an object is detected. `docs/repository-format.md` is the normative spec.

use std::fmt;

use thiserror::Error;

/// Length of the envelope header in bytes.
pub const HEADER_LEN: usize = 80;
/// The magic at offset 0: a high byte (catches 7-bit transfers), "WVOBJ",
/// and CR LF (catches line-ending conversion), as PNG does.
pub const MAGIC: [u8; 8] = *b"\x89WVOBJ\r\n";
/// The largest plaintext an object may hold: 1 GiB, the largest WAL
/// segment. A header claiming more is refused before anything is allocated
/// or decompressed, so no object can make a reader exhaust memory.
pub const MAX_PLAIN_LEN: u64 = 1 << 30;
/// The only format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// How the payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (small metadata objects).
    None,
    /// One zstd frame.
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
        }
    }
}

/// Inputs from this size on are hashed by two threads in
/// [`ContentHash::of_filled`].
pub const PARALLEL_HASH_MIN: u64 = 2 << 20;

/// Buffer size of [`ContentHash::of_filled`]: small enough to stay in a
/// core's cache between the read and the hash.
const HASH_BUF: usize = 256 << 10;

/// A BLAKE3 hash of an object's plaintext, shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// BLAKE3 of `bytes`.
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    /// BLAKE3 of `len` bytes that `fill(offset, buf)` reads into `buf`
    /// (a `pread` of a file, say): read through small buffers that stay in
    /// the CPU cache instead of one allocation of the whole length, and,
    /// from [`PARALLEL_HASH_MIN`] bytes on, as two subtrees hashed by two
    /// threads. Same result as [`ContentHash::of`] of those bytes.
    ///
    /// # Errors
    /// The first error `fill` returns.
    pub fn of_filled<F>(len: u64, fill: F) -> std::io::Result<ContentHash>
    where
        F: Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync,
    {
        use blake3::hazmat::{HasherExt, Mode, left_subtree_len, merge_subtrees_root};
        // One hasher over [start, end) of the input, starting at `start`.
        let hash_range = |hasher: &mut blake3::Hasher, start: u64, end: u64| -> std::io::Result<()> {
            let mut buf = vec![0u8; usize::try_from((end - start).min(HASH_BUF as u64)).unwrap_or(HASH_BUF)];
            let mut at = start;
            while at < end {
                let n = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
                fill(at, &mut buf[..n])?;
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            Ok(())
        };
        if len < PARALLEL_HASH_MIN {
            let mut hasher = blake3::Hasher::new();
            hash_range(&mut hasher, 0, len)?;
            return Ok(ContentHash(*hasher.finalize().as_bytes()));
        }
        // The root's left subtree is the largest power-of-two number of
        // chunks that leaves at least one for the right.
        let split = left_subtree_len(len);
        std::thread::scope(|s| {
            let right = s.spawn(|| -> std::io::Result<_> {
                let mut hasher = blake3::Hasher::new();
                hasher.set_input_offset(split);
                hash_range(&mut hasher, split, len)?;
                Ok(hasher.finalize_non_root())
            });
            let mut hasher = blake3::Hasher::new();
            let left = hash_range(&mut hasher, 0, split).map(|()| hasher.finalize_non_root());
            let right = right.join().unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked")))?;
            Ok(ContentHash(*merge_subtrees_root(&left?, &right, Mode::Hash).as_bytes()))
        })
    }

    /// Parses 64 lower- or upper-case hex digits.
    pub fn from_hex(s: &str) -> Option<ContentHash> {
        let h = blake3::Hash::from_hex(s).ok()?;
        Some(ContentHash(*h.as_bytes()))
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({self})")
    }
}

/// A decoded envelope header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectHeader {
    /// Payload compression.
    pub compression: Compression,
    /// Length of the plaintext.
    pub plain_len: u64,
    /// Length of the payload that follows the header.
    pub payload_len: u64,
    /// BLAKE3 of the plaintext.
    pub hash: ContentHash,
    /// First 8 bytes of BLAKE3 of the payload.
    pub payload_check: [u8; 8],
}

/// Why bytes are not an intact object.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ObjectError {
    /// Fewer bytes than a header.
    #[error("object is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    /// Not a walvault object at all.
    #[error("bad magic: not a walvault object")]
    Magic,
    /// The header check does not match: the header is damaged.
    #[error("header checksum mismatch")]
    HeaderCheck,
    /// Written by a newer walvault.
    #[error("unsupported object format version {0} (this walvault reads version {FORMAT_VERSION})")]
    Version(u16),
    /// Unknown compression code.
    #[error("unknown compression code {0}")]
    Compression(u8),
    /// Encrypted, or an unknown encryption code.
    #[error("unsupported encryption code {0}")]
    Encryption(u8),
    /// Reserved bytes are not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// The payload is shorter or longer than the header says.
    #[error("payload is {actual} bytes, header says {expected}")]
    PayloadLength {
        /// Present.
        actual: u64,
        /// In the header.
        expected: u64,
    },
    /// The header claims a plaintext larger than [`MAX_PLAIN_LEN`].
    #[error("header claims {0} bytes of plaintext, more than the 1 GiB limit")]
    TooLarge(u64),
    /// The payload's bytes changed since it was written.
    #[error("payload checksum mismatch")]
    PayloadCheck,
    /// The payload does not decompress.
    #[error("payload does not decompress: {0}")]
    Decompress(String),
    /// The plaintext has the wrong length.
    #[error("plaintext is {actual} bytes, header says {expected}")]
    PlainLength {
        /// Decompressed.
        actual: u64,
        /// In the header.
        expected: u64,
    },
    /// The plaintext has the wrong hash.
    #[error("content hash mismatch: header says blake3 {expected}, content has {actual}")]
    Hash {
        /// Of the decoded plaintext.
        actual: ContentHash,
        /// In the header.
        expected: ContentHash,
    },
}

/// How to encode an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Compression of the payload.
    pub compression: Compression,
    /// zstd level (1–19); ignored without compression.
    pub level: i32,
    /// Pieces compressed in parallel, each as its own zstd frame (at most
    /// one per [`MIN_FRAME_INPUT`] bytes); 0 or 1 gives a single frame.
    pub workers: u32,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { compression: Compression::Zstd, level: 3, workers: 0 }
    }
}

fn check8(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

fn encode_header(h: &ObjectHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[10] = h.compression.code();
    b[11] = 0;
    b[16..24].copy_from_slice(&h.plain_len.to_le_bytes());
    b[24..32].copy_from_slice(&h.payload_len.to_le_bytes());
    b[32..64].copy_from_slice(&h.hash.0);
    b[64..72].copy_from_slice(&h.payload_check);
    let check = check8(&b[0..72]);
    b[72..80].copy_from_slice(&check);
    b
}

/// Smallest piece compressed as its own frame: below this, the lost
/// cross-piece matches and thread start-up cost more than they save.
pub const MIN_FRAME_INPUT: usize = 2 << 20;

/// The largest window a frame uses (16 MiB): decoders accept up to 2^27 by
/// default, and a 16 MiB segment fits in one window.
const MAX_WINDOW_LOG: u32 = 24;

/// Compresses `plain` as one zstd frame per piece, the pieces compressed in
/// parallel. Frames are independent, so the payload is simply their
/// concatenation (which any zstd decoder reads as one stream).
fn compress(plain: &[u8], opts: &EncodeOptions) -> std::io::Result<Vec<u8>> {
    if opts.compression == Compression::None {
        return Ok(plain.to_vec());
    }
    let pieces = piece_count(plain.len(), opts);
    if pieces == 1 {
        return compress_piece(plain, opts);
    }
    let piece_len = plain.len().div_ceil(pieces);
    let frames: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            plain.chunks(piece_len).map(|piece| s.spawn(move || compress_piece(piece, opts))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked"))))
            .collect()
    });
    join_frames(frames)
}

/// How many pieces a plaintext of `len` bytes is cut into.
fn piece_count(len: usize, opts: &EncodeOptions) -> usize {
    (opts.workers.max(1) as usize).min(len / MIN_FRAME_INPUT).max(1)
}

/// Compresses one piece as one zstd frame.
fn compress_piece(piece: &[u8], opts: &EncodeOptions) -> std::io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(opts.level)?;
    c.include_checksum(false)?;
    c.include_contentsize(true)?;
    // A window as large as the piece (zstd shrinks it to the input size):
    // WAL repeats itself across megabytes (full-page images of the same
    // pages), so this finds matches level 3's default 2 MiB window misses,
    // at the same speed.
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(MAX_WINDOW_LOG))?;
    c.compress(piece)
}

/// Encodes `plain` into an envelope. The hash is computed on the calling
/// thread while the payload is compressed on others, so hashing costs no
/// wall time.
pub fn encode(plain: &[u8], opts: &EncodeOptions) -> Result<(ObjectHeader, Vec<u8>), std::io::Error> {
    if plain.len() as u64 > MAX_PLAIN_LEN {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "object larger than 1 GiB"));
    }
    let (hash, payload) = std::thread::scope(|s| {
        let compressor = s.spawn(|| compress(plain, opts));
        let hash = ContentHash::of(plain);
        let payload = compressor.join().unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked")));
        (hash, payload)
    });
    Ok(assemble(opts.compression, plain.len(), hash, &payload?))
}

/// Encodes `plain` whose BLAKE3 the caller has already computed (a
/// content-addressed writer hashes first to name the object, and must not
/// pay for hashing twice). Compresses on the calling thread unless
/// `opts.workers` asks for more.
///
/// The caller vouches for `hash`: readers verify it against the decoded
/// plaintext, so a wrong hash yields an object that fails every read.
pub fn encode_hashed(
    plain: &[u8],
    hash: ContentHash,
    opts: &EncodeOptions,
) -> Result<(ObjectHeader, Vec<u8>), std::io::Error> {
    if plain.len() as u64 > MAX_PLAIN_LEN {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "object larger than 1 GiB"));
    }
    let payload = compress(plain, opts)?;
    Ok(assemble(opts.compression, plain.len(), hash, &payload))
}

/// The header for a payload, and the stored object: header then payload.
fn assemble(compression: Compression, plain_len: usize, hash: ContentHash, payload: &[u8]) -> (ObjectHeader, Vec<u8>) {
    let header = ObjectHeader {
        compression,
        plain_len: plain_len as u64,
        payload_len: payload.len() as u64,
        hash,
        payload_check: check8(payload),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&encode_header(&header));
    out.extend_from_slice(payload);
    (header, out)
}

/// Concatenates the frames compressed on separate threads, or returns the
/// first error.
fn join_frames(frames: Vec<std::io::Result<Vec<u8>>>) -> std::io::Result<Vec<u8>> {
    let mut payload = Vec::new();
    for frame in frames {
        payload.extend_from_slice(&frame?);
    }
    Ok(payload)
}

/// Encodes a plaintext of `len` bytes that `fill(offset, buf)` produces
/// piece by piece, on the compressing threads: each thread fills its piece
/// (for instance with `pread`) and compresses it at once, while the calling
/// thread hashes the pieces in order as they arrive. Reading thus overlaps
/// compression and hashing. Returns the header, the plaintext and the
/// encoded object; the same bytes as [`encode`] of the plaintext.
pub fn encode_filled(
    len: usize,
    opts: &EncodeOptions,
    fill: impl Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync,
) -> std::io::Result<(ObjectHeader, Vec<u8>, Vec<u8>)> {
    if len as u64 > MAX_PLAIN_LEN {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "object larger than 1 GiB"));
    }
    let mut plain = vec![0u8; len];
    let pieces = piece_count(len, opts);
    if opts.compression == Compression::None || pieces == 1 {
        fill(0, &mut plain)?;
        let (header, stored) = encode(&plain, opts)?;
        return Ok((header, plain, stored));
    }
    let piece_len = len.div_ceil(pieces);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, &[u8])>();
    let (hash, frames) = std::thread::scope(|s| {
        let fill = &fill;
        let handles: Vec<_> = plain
            .chunks_mut(piece_len)
            .enumerate()
            .map(|(i, piece)| {
                let tx = tx.clone();
                s.spawn(move || -> std::io::Result<Vec<u8>> {
                    fill((i * piece_len) as u64, piece)?;
                    let piece: &[u8] = piece;
                    // The hasher may be gone only if this scope is unwinding.
                    let _ = tx.send((i, piece));
                    compress_piece(piece, opts)
                })
            })
            .collect();
        drop(tx);
        let mut hasher = blake3::Hasher::new();
        let mut waiting = std::collections::BTreeMap::new();
        let mut next = 0;
        for (i, piece) in rx {
            waiting.insert(i, piece);
            while let Some(piece) = waiting.remove(&next) {
                hasher.update(piece);
                next += 1;
            }
        }
        let frames: Vec<std::io::Result<Vec<u8>>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked"))))
            .collect();
        (ContentHash(*hasher.finalize().as_bytes()), frames)
    });
    let (header, stored) = assemble(opts.compression, len, hash, &join_frames(frames)?);
    Ok((header, plain, stored))
}

/// Reads and checks the header at the start of `bytes` (at least
/// [`HEADER_LEN`] bytes; the payload is not needed).
pub fn parse_header(bytes: &[u8]) -> Result<ObjectHeader, ObjectError> {
    if bytes.len() < HEADER_LEN {
        return Err(ObjectError::Truncated(bytes.len()));
    }
    if bytes[0..8] != MAGIC {
        return Err(ObjectError::Magic);
    }
    if bytes[72..80] != check8(&bytes[0..72]) {
        return Err(ObjectError::HeaderCheck);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(ObjectError::Version(version));
    }
    let compression = match bytes[10] {
        0 => Compression::None,
        1 => Compression::Zstd,
        c => return Err(ObjectError::Compression(c)),
    };
    if bytes[11] != 0 {
        return Err(ObjectError::Encryption(bytes[11]));
    }
    if bytes[12..16] != [0; 4] {
        return Err(ObjectError::Reserved);
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[32..64]);
    let mut payload_check = [0u8; 8];
    payload_check.copy_from_slice(&bytes[64..72]);
    if u64_at(16) > MAX_PLAIN_LEN {
        return Err(ObjectError::TooLarge(u64_at(16)));
    }
    Ok(ObjectHeader {
        compression,
        plain_len: u64_at(16),
        payload_len: u64_at(24),
        hash: ContentHash(hash),
        payload_check,
    })
}

/// Decodes a whole object and verifies it: header, payload length,
/// decompression, plaintext length and hash. Returns the plaintext only if
/// every check passes.
pub fn decode(bytes: &[u8]) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let (header, payload) = checked_payload(bytes)?;
    let plain = match header.compression {
        Compression::None => payload.to_vec(),
        Compression::Zstd => {
            let limit = usize::try_from(header.plain_len)
                .map_err(|_| ObjectError::PlainLength { actual: 0, expected: header.plain_len })?;
            decompress_exact(payload, limit)?
        }
    };
    if plain.len() as u64 != header.plain_len {
        return Err(ObjectError::PlainLength { actual: plain.len() as u64, expected: header.plain_len });
    }
    let actual = ContentHash::of(&plain);
    if actual != header.hash {
        return Err(ObjectError::Hash { actual, expected: header.hash });
    }
    Ok((header, plain))
}

/// The header and the payload of `bytes`, once the header, the payload's
/// length and its check are right.
fn checked_payload(bytes: &[u8]) -> Result<(ObjectHeader, &[u8]), ObjectError> {
    let header = parse_header(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != header.payload_len {
        return Err(ObjectError::PayloadLength { actual: payload.len() as u64, expected: header.payload_len });
    }
    if check8(payload) != header.payload_check {
        return Err(ObjectError::PayloadCheck);
    }
    Ok((header, payload))
}

/// Why [`decode_to`] failed.
#[derive(Debug, Error)]
pub enum DecodeToError {
    /// The object failed a check.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// The writer failed.
    #[error("{0}")]
    Write(std::io::Error),
}

/// Size of the pieces [`decode_to`] hands to the writer.
const STREAM_CHUNK: usize = 1 << 20;

/// Fills `buf` from `r` unless the stream ends first; returns bytes read.
fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Decodes and verifies an object like [`decode`], but streams the
/// plaintext into `out` while decompressing and hashing on a second thread,
/// so that writing overlaps with decompression.
///
/// The verdict comes at the end: on any error `out` holds unverified bytes
/// and the caller must discard them (write to a temporary, rename only on
/// success).
pub fn decode_to<W: std::io::Write>(bytes: &[u8], out: &mut W) -> Result<ObjectHeader, DecodeToError> {
    let (header, payload) = checked_payload(bytes)?;
    if header.compression == Compression::None {
        let actual = ContentHash::of(payload);
        if actual != header.hash {
            return Err(ObjectError::Hash { actual, expected: header.hash }.into());
        }
        out.write_all(payload).map_err(DecodeToError::Write)?;
        return Ok(header);
    }
    if let Some(frames) = frame_plan(payload, header.plain_len) {
        return decode_frames_parallel(&header, frames, out);
    }
    let limit = header.plain_len;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    std::thread::scope(|s| {
        let producer = s.spawn(move || -> Result<(u64, ContentHash), ObjectError> {
            let dec_err = |e: std::io::Error| ObjectError::Decompress(e.to_string());
            let mut dec = zstd::stream::read::Decoder::with_buffer(payload).map_err(dec_err)?;
            let mut hasher = blake3::Hasher::new();
            let mut total = 0u64;
            loop {
                let mut buf = vec![0u8; STREAM_CHUNK];
                let n = read_full(&mut dec, &mut buf).map_err(dec_err)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > limit {
                    return Err(ObjectError::PlainLength { actual: total, expected: limit });
                }
                buf.truncate(n);
                hasher.update(&buf);
                if tx.send(buf).is_err() {
                    break; // the writer failed and reports it
                }
            }
            Ok((total, ContentHash(*hasher.finalize().as_bytes())))
        });
        let mut write_result = Ok(());
        for chunk in &rx {
            if let Err(e) = out.write_all(&chunk) {
                write_result = Err(DecodeToError::Write(e));
                break;
            }
        }
        drop(rx);
        let produced =
            producer.join().unwrap_or_else(|_| Err(ObjectError::Decompress("decoder thread panicked".into())));
        write_result?;
        let (total, actual) = produced?;
        if total != limit {
            return Err(ObjectError::PlainLength { actual: total, expected: limit }.into());
        }
        if actual != header.hash {
            return Err(ObjectError::Hash { actual, expected: header.hash }.into());
        }
        Ok(header)
    })
}

/// Decodes objects one after another on the calling thread, frame by
/// frame into one buffer it keeps: for a process that decodes many
/// objects (the prefetch worker), no allocation and no page faults per
/// object once warm, and no threads. CPU time per object is lower than
/// [`decode_to`]'s, wall time higher. The buffer grows to the largest frame
/// met (at most the largest plaintext, [`MAX_PLAIN_LEN`]).
pub struct Decoder {
    dctx: zstd::bulk::Decompressor<'static>,
    plain: Vec<u8>,
}

impl Decoder {
    /// A decoder with an empty buffer.
    ///
    /// # Errors
    /// zstd cannot allocate its context.
    pub fn new() -> std::io::Result<Decoder> {
        Ok(Decoder { dctx: zstd::bulk::Decompressor::new()?, plain: Vec::new() })
    }

    /// Like [`decode_to`]: decodes and verifies `bytes`, writing the
    /// plaintext to `out` as it goes; on any error `out` holds unverified
    /// bytes that the caller must discard.
    ///
    /// # Errors
    /// As [`decode_to`].
    pub fn decode_to<W: std::io::Write>(&mut self, bytes: &[u8], out: &mut W) -> Result<ObjectHeader, DecodeToError> {
        self.decode(bytes, out, true)
    }

    /// [`Decoder::decode_to`] with every check but the last: the plaintext's
    /// BLAKE3 is not computed (when the payload is frames of declared
    /// sizes; otherwise it is). The caller must compare the BLAKE3 of what
    /// was written with the returned `hash` before the bytes are used: the
    /// prefetch spool does that at the handover, so that one hash covers
    /// the download, the decode and the spool.
    ///
    /// # Errors
    /// As [`decode_to`], but never [`ObjectError::Hash`] for framed
    /// payloads.
    pub fn decode_to_hash_deferred<W: std::io::Write>(
        &mut self,
        bytes: &[u8],
        out: &mut W,
    ) -> Result<ObjectHeader, DecodeToError> {
        self.decode(bytes, out, false)
    }

    fn decode<W: std::io::Write>(
        &mut self,
        bytes: &[u8],
        out: &mut W,
        hash: bool,
    ) -> Result<ObjectHeader, DecodeToError> {
        let (header, payload) = checked_payload(bytes)?;
        // Stored objects, and frames that do not declare their sizes (not
        // written by walvault), take the general path.
        let frames = match header.compression {
            Compression::Zstd => frames_of(payload, header.plain_len),
            Compression::None => None,
        };
        let Some(frames) = frames else {
            return decode_to(bytes, out);
        };
        let largest = frames.iter().map(|(_, n)| *n).max().unwrap_or(0);
        if self.plain.len() < largest {
            self.plain.resize(largest, 0);
        }
        let mut hasher = blake3::Hasher::new();
        for (frame, size) in frames {
            let dst = &mut self.plain[..size];
            let n = self.dctx.decompress_to_buffer(frame, dst).map_err(|e| ObjectError::Decompress(e.to_string()))?;
            if n != size {
                return Err(ObjectError::PlainLength { actual: n as u64, expected: size as u64 }.into());
            }
            // Hash and write each piece while it is still in the cache.
            for piece in dst.chunks(HASH_BUF) {
                if hash {
                    hasher.update(piece);
                }
                out.write_all(piece).map_err(DecodeToError::Write)?;
            }
        }
        if !hash {
            return Ok(header);
        }
        let actual = ContentHash(*hasher.finalize().as_bytes());
        if actual != header.hash {
            return Err(ObjectError::Hash { actual, expected: header.hash }.into());
        }
        Ok(header)
    }
}

/// Most frames [`decode_to`] decompresses at once, one thread each.
const MAX_PARALLEL_FRAMES: usize = 16;

/// Splits a payload into its frames with their declared content sizes, if
/// it has several (up to [`MAX_PARALLEL_FRAMES`]), each declares its size,
/// and the sizes add up to `plain_len`. Anything else gets `None` and the
/// streaming path, which checks it all the slow way.
fn frame_plan(payload: &[u8], plain_len: u64) -> Option<Vec<(&[u8], usize)>> {
    frames_of(payload, plain_len).filter(|frames| frames.len() > 1)
}

/// The payload's frames with their declared content sizes, if there are at
/// most [`MAX_PARALLEL_FRAMES`], each declares its size, and the sizes add
/// up to `plain_len`.
fn frames_of(payload: &[u8], plain_len: u64) -> Option<Vec<(&[u8], usize)>> {
    let mut frames = Vec::new();
    let mut rest = payload;
    let mut total = 0u64;
    while !rest.is_empty() {
        if frames.len() == MAX_PARALLEL_FRAMES {
            return None;
        }
        let len = zstd::zstd_safe::find_frame_compressed_size(rest).ok()?;
        if len == 0 || len > rest.len() {
            return None;
        }
        let (frame, tail) = rest.split_at(len);
        let size = zstd::zstd_safe::get_frame_content_size(frame).ok()??;
        total = total.checked_add(size)?;
        if total > plain_len {
            return None;
        }
        frames.push((frame, usize::try_from(size).ok()?));
        rest = tail;
    }
    (total == plain_len).then_some(frames)
}

/// Decompresses independent frames on one thread each, straight into their
/// places in one buffer, then hashes while writing. The buffer is sized by
/// the frames' declared sizes, which [`frame_plan`] checked against the
/// header's length (at most [`MAX_PLAIN_LEN`]).
fn decode_frames_parallel<W: std::io::Write>(
    header: &ObjectHeader,
    frames: Vec<(&[u8], usize)>,
    out: &mut W,
) -> Result<ObjectHeader, DecodeToError> {
    let mut plain = vec![0u8; frames.iter().map(|(_, n)| n).sum()];
    let decoded: Result<(), ObjectError> = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(frames.len());
        let mut rest: &mut [u8] = &mut plain;
        for (frame, size) in frames {
            let (dst, tail) = rest.split_at_mut(size);
            rest = tail;
            handles.push(s.spawn(move || -> Result<(), ObjectError> {
                let mut d = zstd::bulk::Decompressor::new().map_err(|e| ObjectError::Decompress(e.to_string()))?;
                let n = d.decompress_to_buffer(frame, dst).map_err(|e| ObjectError::Decompress(e.to_string()))?;
                if n != size {
                    return Err(ObjectError::PlainLength { actual: n as u64, expected: size as u64 });
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join().unwrap_or_else(|_| Err(ObjectError::Decompress("decoder thread panicked".into())))?;
        }
        Ok(())
    });
    decoded?;
    let plain = &plain;
    std::thread::scope(|s| {
        let hasher = s.spawn(|| ContentHash::of(plain));
        let written = out.write_all(plain).map_err(DecodeToError::Write);
        let actual = hasher.join().unwrap_or_else(|_| ContentHash::of(plain));
        written?;
        if actual != header.hash {
            return Err(ObjectError::Hash { actual, expected: header.hash }.into());
        }
        Ok(*header)
    })
}

/// Decompresses the payload's frames, refusing to produce more than
/// `limit` bytes. Memory grows with the bytes actually produced, never with
/// a length claimed by the header or a frame (whoever can write to the
/// repository can craft those): a damaged or hostile length cannot exhaust
/// memory.
fn decompress_exact(payload: &[u8], limit: usize) -> Result<Vec<u8>, ObjectError> {
    use std::io::Read;
    let dec_err = |e: std::io::Error| ObjectError::Decompress(e.to_string());
    let dec = zstd::stream::read::Decoder::with_buffer(payload).map_err(dec_err)?;
    // Reserve up front only what a real segment needs (1 GiB at most is a
    // valid segment size; 64 MiB covers the common sizes in one step).
    let mut out = Vec::with_capacity(limit.min(64 << 20));
    // One byte more than allowed lets an over-long stream show itself.
    dec.take((limit as u64).saturating_add(1)).read_to_end(&mut out).map_err(dec_err)?;
    if out.len() > limit {
        return Err(ObjectError::PlainLength { actual: out.len() as u64, expected: limit as u64 });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encode_hashed_equals_encode() {
        let plain = b"the same bytes, hashed by the caller".repeat(1000);
        let opts = EncodeOptions::default();
        let (h1, a) = encode(&plain, &opts).unwrap();
        let (h2, b) = encode_hashed(&plain, ContentHash::of(&plain), &opts).unwrap();
        assert_eq!((h1, a), (h2, b.clone()));
        assert_eq!(decode(&b).unwrap().1, plain);
        // A wrong hash is caught by every reader.
        let (_, bad) = encode_hashed(&plain, ContentHash::of(b"other"), &opts).unwrap();
        assert!(matches!(decode(&bad), Err(ObjectError::Hash { .. })));
    }
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..2000u32 {
            v.extend_from_slice(format!("record {i} of a WAL-like stream\n").as_bytes());
        }
        v
    }

    #[test]
    fn round_trip_both_compressions() {
        for compression in [Compression::None, Compression::Zstd] {
            let plain = sample();
            let opts = EncodeOptions { compression, ..Default::default() };
            let (h, bytes) = encode(&plain, &opts).unwrap();
            assert_eq!(h.hash, ContentHash::of(&plain));
            let (h2, back) = decode(&bytes).unwrap();
            assert_eq!(h, h2);
            assert_eq!(back, plain);
        }
    }

    #[test]
    fn multi_frame_output_decodes_both_ways() {
        let plain = sample().repeat(200); // ~11 MB: several frames
        for workers in [0, 2, 3] {
            let (h, bytes) = encode(&plain, &EncodeOptions { workers, ..Default::default() }).unwrap();
            assert_eq!(decode(&bytes).unwrap().1, plain);
            let mut streamed = Vec::new();
            assert_eq!(decode_to(&bytes, &mut streamed).unwrap(), h);
            assert_eq!(streamed, plain);
        }
    }

    /// The parallel multi-frame path verifies the content hash too: a header
    /// that lies about it (with valid checks) is refused.
    #[test]
    fn multi_frame_hash_mismatch_is_detected() {
        let plain = sample().repeat(200);
        let (mut h, bytes) = encode(&plain, &EncodeOptions { workers: 2, ..Default::default() }).unwrap();
        assert!(frame_plan(&bytes[HEADER_LEN..], h.plain_len).is_some(), "expected several frames");
        h.hash = ContentHash::of(b"something else");
        let mut forged = encode_header(&h).to_vec();
        forged.extend_from_slice(&bytes[HEADER_LEN..]);
        assert!(matches!(decode_to(&forged, &mut Vec::new()), Err(DecodeToError::Object(ObjectError::Hash { .. }))));
        assert!(matches!(decode(&forged), Err(ObjectError::Hash { .. })));
    }

    #[test]
    fn encode_filled_matches_encode() {
        let plain = sample().repeat(200);
        for workers in [0, 1, 2, 3] {
            let opts = EncodeOptions { workers, ..Default::default() };
            let (h1, stored1) = encode(&plain, &opts).unwrap();
            let (h2, plain2, stored2) = encode_filled(plain.len(), &opts, |off, buf| {
                let off = off as usize;
                buf.copy_from_slice(&plain[off..off + buf.len()]);
                Ok(())
            })
            .unwrap();
            assert_eq!((h1, &stored1, &plain), (h2, &stored2, &plain2), "workers {workers}");
        }
        let failing = encode_filled(plain.len(), &EncodeOptions { workers: 2, ..Default::default() }, |off, _| {
            if off > 0 { Err(std::io::Error::other("read failed")) } else { Ok(()) }
        });
        assert!(failing.is_err());
    }

    #[test]
    fn a_reused_decoder_gives_what_decode_gives_and_refuses_what_it_refuses() {
        let mut decoder = Decoder::new().unwrap();
        let big = sample().repeat(100);
        let small = sample().repeat(3);
        // Several frames, one frame, stored uncompressed, then several
        // again: the buffer is reused across sizes.
        let objects = [
            encode(&big, &EncodeOptions { workers: 4, ..Default::default() }).unwrap(),
            encode(&small, &EncodeOptions { workers: 1, ..Default::default() }).unwrap(),
            encode(&small, &EncodeOptions { compression: Compression::None, ..Default::default() }).unwrap(),
            encode(&big[..big.len() / 3], &EncodeOptions { workers: 2, ..Default::default() }).unwrap(),
        ];
        for (i, (header, stored)) in objects.iter().enumerate() {
            let mut out = Vec::new();
            assert_eq!(decoder.decode_to(stored, &mut out).unwrap(), *header, "object {i}");
            assert_eq!(out, decode(stored).unwrap().1, "object {i}");
        }
        let (_, stored) = &objects[0];
        // A flipped payload byte fails the payload check; a header whose
        // hash is another file's fails the plaintext hash.
        let mut flipped = stored.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            decoder.decode_to(&flipped, &mut Vec::new()),
            Err(DecodeToError::Object(ObjectError::PayloadCheck))
        ));
        // A well-formed header naming another file's hash.
        let mut claimed = parse_header(stored).unwrap();
        claimed.hash.0[0] ^= 1;
        let mut other = encode_header(&claimed).to_vec();
        other.extend_from_slice(&stored[HEADER_LEN..]);
        assert!(matches!(
            decoder.decode_to(&other, &mut Vec::new()),
            Err(DecodeToError::Object(ObjectError::Hash { .. }))
        ));
        let mut out = Vec::new();
        decoder.decode_to(stored, &mut out).unwrap();
        assert_eq!(out, big, "the decoder still works after refusing");
        // Deferred: the same bytes come out, the claimed hash is returned
        // for the caller to check, and every other check still applies.
        let mut out = Vec::new();
        assert_eq!(decoder.decode_to_hash_deferred(&other, &mut out).unwrap().hash, claimed.hash);
        assert_eq!(out, big);
        assert_ne!(ContentHash::of(&out), claimed.hash, "the caller's check is what catches it");
        assert!(matches!(
            decoder.decode_to_hash_deferred(&flipped, &mut Vec::new()),
            Err(DecodeToError::Object(ObjectError::PayloadCheck))
        ));
    }

    #[test]
    fn hash_of_filled_equals_hash_of_bytes() {
        // Around the chunk (1 KiB), buffer (256 KiB) and parallel (2 MiB)
        // boundaries, odd lengths, and a 16 MiB segment.
        let base: Vec<u8> = (0..(16u32 << 20) + 3).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in [0, 1, 1023, 1024, 1025, 256 << 10, (256 << 10) + 1, (2 << 20) - 1, 2 << 20, (2 << 20) + 1, 3 << 20]
            .into_iter()
            .chain([(5 << 20) + 7, 16 << 20, (16 << 20) + 3])
        {
            let plain = &base[..len];
            let filled = ContentHash::of_filled(len as u64, |off, buf| {
                let off = off as usize;
                buf.copy_from_slice(&plain[off..off + buf.len()]);
                Ok(())
            })
            .unwrap();
            assert_eq!(filled, ContentHash::of(plain), "length {len}");
        }
    }

    #[test]
    fn hash_of_filled_reports_read_errors_from_either_half() {
        for bad_at in [0u64, 1 << 20, 12 << 20] {
            let r = ContentHash::of_filled(16 << 20, |off, _| {
                if off == bad_at { Err(std::io::Error::other("read failed")) } else { Ok(()) }
            });
            assert_eq!(r.unwrap_err().to_string(), "read failed", "error at {bad_at}");
        }
    }

    #[test]
    fn decode_to_reports_writer_errors() {
        struct Full;
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let plain = sample().repeat(100);
        let (_, bytes) = encode(&plain, &EncodeOptions::default()).unwrap();
        assert!(matches!(decode_to(&bytes, &mut Full), Err(DecodeToError::Write(_))));
    }

    #[test]
    fn every_corrupted_byte_is_detected() {
        for compression in [Compression::None, Compression::Zstd] {
            let plain = &sample()[..3000];
            let (_, bytes) = encode(plain, &EncodeOptions { compression, ..Default::default() }).unwrap();
            for i in 0..bytes.len() {
                for flip in [0x01u8, 0x80, 0xFF] {
                    let mut bad = bytes.clone();
                    bad[i] ^= flip;
                    assert!(decode(&bad).is_err(), "flip {flip:#x} at byte {i} ({compression:?}) not detected");
                    assert!(decode_to(&bad, &mut Vec::new()).is_err(), "decode_to: flip {flip:#x} at byte {i}");
                }
            }
            for len in 0..bytes.len() {
                assert!(decode(&bytes[..len]).is_err(), "truncation to {len} not detected");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer).is_err(), "trailing byte not detected");
        }
    }

    /// Found by fuzzing: a valid header claiming a huge plaintext over a
    /// frame without a content size made decode allocate the claimed size.
    #[test]
    fn huge_claimed_length_is_an_error_not_an_allocation() {
        for hex in [
            "8957564f424a0d0a010001000000000000000000000000800e00000000000000ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200fcdbfa02af92a25103094d19803e4877228b52ffd000029000068656c6c6f",
            "8957564f424a0d0a010001000000000000000000001000000e00000000000000ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200fcdbfa02af92a2510db2887e1dbc481d528b52ffd000029000068656c6c6f",
        ] {
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            assert!(matches!(parse_header(&bytes), Err(ObjectError::TooLarge(_))));
            assert!(decode(&bytes).is_err());
            assert!(decode_to(&bytes, &mut Vec::new()).is_err());
        }
    }

    /// A header whose (allowed) length is larger than what the frames hold
    /// is refused, with memory bounded by what the frames produce.
    #[test]
    fn claimed_length_larger_than_content_is_an_error() {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_contentsize(false).unwrap();
        let payload = c.compress(b"hello").unwrap();
        let header = ObjectHeader {
            compression: Compression::Zstd,
            plain_len: MAX_PLAIN_LEN,
            payload_len: payload.len() as u64,
            hash: ContentHash::of(b"hello"),
            payload_check: check8(&payload),
        };
        let mut bytes = encode_header(&header).to_vec();
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode(&bytes), Err(ObjectError::PlainLength { actual: 5, .. })));
        assert!(matches!(
            decode_to(&bytes, &mut Vec::new()),
            Err(DecodeToError::Object(ObjectError::PlainLength { .. }))
        ));
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = ContentHash::of(b"abc");
        assert_eq!(h.to_string().len(), 64);
        assert_eq!(ContentHash::from_hex(&h.to_string()), Some(h));
        assert_eq!(ContentHash::from_hex("zz"), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&b);
        }

        #[test]
        fn round_trips(plain in proptest::collection::vec(any::<u8>(), 0..5000), level in 1i32..6) {
            let (_, bytes) = encode(&plain, &EncodeOptions { level, ..Default::default() }).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap().1, plain);
        }
    }
}
