//! The worker protocol: binary frames over one persistent TCP connection per worker.
//!
//! A frame is `[u32 length][u8 kind][u64 request id][payload]`, little-endian, the
//! length counting everything after itself. The coordinator numbers its requests; the
//! worker answers each with a reply frame carrying the same id, in any order, so many
//! requests (every layer's Q of several queries) are in flight on one connection.
//!
//! The first frame on a connection must be [`Request::Hello`] with the protocol version
//! and the cluster's shared secret; anything else closes the connection after an error
//! reply. Decoding never panics and never allocates more than the frame holds: a frame
//! longer than [`MAX_FRAME_BYTES`] or a payload that does not parse is an error reply.

use std::io::{Read, Write};

/// Bumped on any change of a frame's layout; both ends must agree.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest frame accepted (an encode request carries a document's tokens: 4 bytes each).
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// Frame header after the length: kind and request id.
const HEADER_BYTES: usize = 1 + 8;

/// A content key of a block (the store's `BlockKey` bytes).
pub type Key = [u8; 32];

/// What the coordinator asks a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// The handshake: protocol version and the shared secret.
    Hello { version: u32, secret: Vec<u8> },
    /// Phase 1 of some blocks of a document, kept in the worker's store as its part of
    /// `doc` (replacing the worker's previous part of that document).
    Encode(EncodeRequest),
    /// Holds the blocks `keys` of `doc` ready for attention (on the device) and returns
    /// a session for [`Request::Attend`].
    /// A session over the blocks `keys`, attended at softmax scale
    /// `score_scale / sqrt(d)` (1, or `1 / T` for the tempered group of a merge).
    Open {
        doc: String,
        keys: Vec<Key>,
        score_scale: f32,
    },
    /// One layer's Q (`[m][n_heads * head_dim]` f32) over a session's blocks.
    Attend {
        session: u64,
        layer: u32,
        m: u32,
        q: Vec<f32>,
    },
    /// Ends a session (its blocks may be evicted again).
    Close { session: u64 },
    /// Blocks, bytes and the device this worker holds.
    Stats,
    /// Forgets the worker's part of `doc`.
    Drop { doc: String },
    /// Reads every stored block of the worker's store (with `repair`, re-encodes the
    /// damaged ones from the source tokens it keeps) and reports what it found.
    Verify { repair: bool },
    /// The documents the worker holds a part of (names and the worker's own versions),
    /// so the coordinator can drop parts no catalog entry places there any more.
    List,
}

/// Blocks of one document for a worker to encode and keep.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeRequest {
    pub doc: String,
    pub tenant: String,
    /// The whole document's source tokens (the anchor and every block are cut from them;
    /// the worker also keeps them to repair its blocks).
    pub tokens: Vec<u32>,
    pub block_size: u32,
    pub anchor_size: u32,
    /// The stored KV type's code ([`starkv_cache::DType::code`]): the coordinator's
    /// choice for the document, part of every block key, whatever the worker's device.
    pub dtype: u8,
    /// `(block index, content key)` of every block the worker holds for this document,
    /// including ones it already stores (those are reused, not re-encoded).
    pub blocks: Vec<(u32, Key)>,
    /// Selective global re-encoding after phase 1, in millionths of the tokens (0: off).
    /// A re-encoded block depends on every block before it, so the worker computes the
    /// whole document and keeps its part.
    pub reencode_ppm: u32,
    /// Tokens before each block that its phase 1 encodes in front of it and drops
    /// (protocol 7; see `StarConfig`'s overlap).
    pub block_overlap: u32,
}

/// A worker's own time on one request, in microseconds (saturating at `u32::MAX`):
/// from reading the frame to a thread taking it up, and from there to the reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerTime {
    pub queued_us: u32,
    pub compute_us: u32,
}

impl WorkerTime {
    /// Microseconds of `d`, saturating.
    pub fn micros(d: std::time::Duration) -> u32 {
        u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
    }
}

/// What a worker answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Hello {
        version: u32,
        /// The worker's device (`cpu`, `cuda:0`, ...).
        device: String,
        /// SHA-256 of the worker's model file: it must equal the coordinator's.
        model_fingerprint: Vec<u8>,
    },
    Encoded {
        encoded: u32,
        reused: u32,
        stored_bytes: u64,
    },
    Opened {
        session: u64,
        tokens: u64,
    },
    /// Partial attention: `out` `[m][n_heads * head_dim]`, `lse` `[n_heads][m]`, and
    /// where the worker's time went (the rest of a round trip is the network and the
    /// coordinator).
    Partial {
        out: Vec<f32>,
        lse: Vec<f32>,
        time: WorkerTime,
    },
    Closed,
    Stats {
        device: String,
        documents: u64,
        blocks: u64,
        stored_bytes: u64,
    },
    /// A document's part is gone: what deleting it freed on the worker.
    Dropped {
        blocks_deleted: u64,
        bytes_freed: u64,
    },
    /// What a [`Request::Verify`] found and did on the worker.
    Verified(VerifyCounts),
    /// The worker's documents: `(name, version)` of every visible version.
    Listed {
        docs: Vec<(String, u64)>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// A worker's verify result, as the coordinator reports it per worker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyCounts {
    /// Document versions checked.
    pub documents: u64,
    /// Versions with a damaged or missing block (`doc@version: error`).
    pub corrupt: Vec<String>,
    /// Blocks re-encoded from their source tokens (with repair).
    pub repaired_blocks: u64,
    /// Any damage found (blocks, rows, lost manifests), repaired or not.
    pub corruption_found: bool,
    /// Why a repair failed (empty: it did not).
    pub repair_error: String,
}

/// Why a worker refused or failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A frame that does not parse, or arguments that make no sense.
    BadRequest,
    /// Wrong shared secret, or a request before the handshake.
    Unauthorized,
    /// A document, block or session the worker does not hold.
    NotFound,
    /// Protocol versions differ.
    Version,
    /// The worker failed (model, store, device).
    Internal,
}

impl ErrorCode {
    fn code(self) -> u8 {
        match self {
            Self::BadRequest => 1,
            Self::Unauthorized => 2,
            Self::NotFound => 3,
            Self::Version => 4,
            Self::Internal => 5,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::BadRequest,
            2 => Self::Unauthorized,
            3 => Self::NotFound,
            4 => Self::Version,
            5 => Self::Internal,
            _ => return None,
        })
    }
}

/// A frame whose payload does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct WireError(pub String);

// Kinds: requests 1..=63, replies 64..=127.
const HELLO: u8 = 1;
const ENCODE: u8 = 2;
const OPEN: u8 = 3;
const ATTEND: u8 = 4;
const CLOSE: u8 = 5;
const STATS: u8 = 6;
const DROP: u8 = 7;
const VERIFY: u8 = 8;
const LIST: u8 = 9;
const R_HELLO: u8 = 64;
const R_ENCODED: u8 = 65;
const R_OPENED: u8 = 66;
const R_PARTIAL: u8 = 67;
const R_CLOSED: u8 = 68;
const R_STATS: u8 = 69;
const R_DROPPED: u8 = 70;
const R_VERIFIED: u8 = 71;
const R_LISTED: u8 = 72;
const R_ERROR: u8 = 127;

impl Request {
    /// The whole frame (length prefix included) for request `id`.
    pub fn frame(&self, id: u64) -> Vec<u8> {
        let mut w = FrameWriter::new(self.kind(), id);
        match self {
            Request::Hello { version, secret } => {
                w.u32(*version);
                w.bytes(secret);
            }
            Request::Encode(e) => {
                w.str(&e.doc);
                w.str(&e.tenant);
                w.u32(e.block_size);
                w.u32(e.anchor_size);
                w.u8(e.dtype);
                w.u32(e.reencode_ppm);
                w.u32(e.block_overlap);
                w.u32s(&e.tokens);
                w.u32(e.blocks.len() as u32);
                for (i, key) in &e.blocks {
                    w.u32(*i);
                    w.raw(key);
                }
            }
            Request::Open {
                doc,
                keys,
                score_scale,
            } => {
                w.str(doc);
                w.u32(keys.len() as u32);
                for key in keys {
                    w.raw(key);
                }
                w.u32(score_scale.to_bits());
            }
            Request::Attend {
                session,
                layer,
                m,
                q,
            } => {
                w.u64(*session);
                w.u32(*layer);
                w.u32(*m);
                w.f32s(q);
            }
            Request::Close { session } => w.u64(*session),
            Request::Stats => {}
            Request::Drop { doc } => w.str(doc),
            Request::Verify { repair } => w.u8(*repair as u8),
            Request::List => {}
        }
        w.finish()
    }

    fn kind(&self) -> u8 {
        match self {
            Request::Hello { .. } => HELLO,
            Request::Encode(_) => ENCODE,
            Request::Open { .. } => OPEN,
            Request::Attend { .. } => ATTEND,
            Request::Close { .. } => CLOSE,
            Request::Stats => STATS,
            Request::Drop { .. } => DROP,
            Request::Verify { .. } => VERIFY,
            Request::List => LIST,
        }
    }

    /// Parses a frame body (after the length prefix): the request id and the request.
    /// The id is returned even when the payload is malformed, so the error can be
    /// answered to the right caller.
    pub fn parse(body: &[u8]) -> (u64, Result<Request, WireError>) {
        let (kind, id, mut r) = match header(body) {
            Ok(h) => h,
            Err(e) => return (0, Err(e)),
        };
        let parsed = (|| {
            let req = match kind {
                HELLO => Request::Hello {
                    version: r.u32()?,
                    secret: r.bytes()?.to_vec(),
                },
                ENCODE => {
                    let doc = r.str()?;
                    let tenant = r.str()?;
                    let block_size = r.u32()?;
                    let anchor_size = r.u32()?;
                    let dtype = r.u8()?;
                    let reencode_ppm = r.u32()?;
                    let block_overlap = r.u32()?;
                    let tokens = r.u32s()?;
                    let n = r.count(4 + 32)?;
                    let mut blocks = Vec::with_capacity(n);
                    for _ in 0..n {
                        blocks.push((r.u32()?, r.key()?));
                    }
                    Request::Encode(EncodeRequest {
                        doc,
                        tenant,
                        tokens,
                        block_size,
                        anchor_size,
                        dtype,
                        blocks,
                        reencode_ppm,
                        block_overlap,
                    })
                }
                OPEN => {
                    let doc = r.str()?;
                    let n = r.count(32)?;
                    let keys = (0..n).map(|_| r.key()).collect::<Result<_, _>>()?;
                    let score_scale = f32::from_bits(r.u32()?);
                    Request::Open {
                        doc,
                        keys,
                        score_scale,
                    }
                }
                ATTEND => Request::Attend {
                    session: r.u64()?,
                    layer: r.u32()?,
                    m: r.u32()?,
                    q: r.f32s()?,
                },
                CLOSE => Request::Close { session: r.u64()? },
                STATS => Request::Stats,
                DROP => Request::Drop { doc: r.str()? },
                VERIFY => Request::Verify { repair: r.bool()? },
                LIST => Request::List,
                other => return Err(WireError(format!("unknown request kind {other}"))),
            };
            r.end()?;
            Ok(req)
        })();
        (id, parsed)
    }
}

impl Reply {
    /// The whole frame (length prefix included) answering request `id`.
    pub fn frame(&self, id: u64) -> Vec<u8> {
        let kind = match self {
            Reply::Hello { .. } => R_HELLO,
            Reply::Encoded { .. } => R_ENCODED,
            Reply::Opened { .. } => R_OPENED,
            Reply::Partial { .. } => R_PARTIAL,
            Reply::Closed => R_CLOSED,
            Reply::Stats { .. } => R_STATS,
            Reply::Dropped { .. } => R_DROPPED,
            Reply::Verified(_) => R_VERIFIED,
            Reply::Listed { .. } => R_LISTED,
            Reply::Error { .. } => R_ERROR,
        };
        let mut w = FrameWriter::new(kind, id);
        match self {
            Reply::Hello {
                version,
                device,
                model_fingerprint,
            } => {
                w.u32(*version);
                w.str(device);
                w.bytes(model_fingerprint);
            }
            Reply::Encoded {
                encoded,
                reused,
                stored_bytes,
            } => {
                w.u32(*encoded);
                w.u32(*reused);
                w.u64(*stored_bytes);
            }
            Reply::Opened { session, tokens } => {
                w.u64(*session);
                w.u64(*tokens);
            }
            Reply::Partial { out, lse, time } => {
                w.f32s(out);
                w.f32s(lse);
                w.u32(time.queued_us);
                w.u32(time.compute_us);
            }
            Reply::Closed => {}
            Reply::Dropped {
                blocks_deleted,
                bytes_freed,
            } => {
                w.u64(*blocks_deleted);
                w.u64(*bytes_freed);
            }
            Reply::Stats {
                device,
                documents,
                blocks,
                stored_bytes,
            } => {
                w.str(device);
                w.u64(*documents);
                w.u64(*blocks);
                w.u64(*stored_bytes);
            }
            Reply::Verified(v) => {
                w.u64(v.documents);
                w.u32(v.corrupt.len() as u32);
                for c in &v.corrupt {
                    w.str(c);
                }
                w.u64(v.repaired_blocks);
                w.u8(v.corruption_found as u8);
                w.str(&v.repair_error);
            }
            Reply::Listed { docs } => {
                w.u32(docs.len() as u32);
                for (doc, version) in docs {
                    w.str(doc);
                    w.u64(*version);
                }
            }
            Reply::Error { code, message } => {
                w.u8(code.code());
                w.str(message);
            }
        }
        w.finish()
    }

    /// Parses a reply frame body: the request id it answers and the reply.
    pub fn parse(body: &[u8]) -> (u64, Result<Reply, WireError>) {
        let (kind, id, mut r) = match header(body) {
            Ok(h) => h,
            Err(e) => return (0, Err(e)),
        };
        let parsed = (|| {
            let reply = match kind {
                R_HELLO => Reply::Hello {
                    version: r.u32()?,
                    device: r.str()?,
                    model_fingerprint: r.bytes()?.to_vec(),
                },
                R_ENCODED => Reply::Encoded {
                    encoded: r.u32()?,
                    reused: r.u32()?,
                    stored_bytes: r.u64()?,
                },
                R_OPENED => Reply::Opened {
                    session: r.u64()?,
                    tokens: r.u64()?,
                },
                R_PARTIAL => Reply::Partial {
                    out: r.f32s()?,
                    lse: r.f32s()?,
                    time: WorkerTime {
                        queued_us: r.u32()?,
                        compute_us: r.u32()?,
                    },
                },
                R_CLOSED => Reply::Closed,
                R_STATS => Reply::Stats {
                    device: r.str()?,
                    documents: r.u64()?,
                    blocks: r.u64()?,
                    stored_bytes: r.u64()?,
                },
                R_DROPPED => Reply::Dropped {
                    blocks_deleted: r.u64()?,
                    bytes_freed: r.u64()?,
                },
                R_VERIFIED => {
                    let documents = r.u64()?;
                    // Each string takes at least its 4-byte length.
                    let n = r.count(4)?;
                    let corrupt = (0..n).map(|_| r.str()).collect::<Result<_, _>>()?;
                    Reply::Verified(VerifyCounts {
                        documents,
                        corrupt,
                        repaired_blocks: r.u64()?,
                        corruption_found: r.bool()?,
                        repair_error: r.str()?,
                    })
                }
                R_LISTED => {
                    // Each entry takes at least a 4-byte length and an 8-byte version.
                    let n = r.count(4 + 8)?;
                    let docs = (0..n)
                        .map(|_| Ok((r.str()?, r.u64()?)))
                        .collect::<Result<_, WireError>>()?;
                    Reply::Listed { docs }
                }
                R_ERROR => Reply::Error {
                    code: ErrorCode::from_code(r.u8()?)
                        .ok_or_else(|| WireError("unknown error code".into()))?,
                    message: r.str()?,
                },
                other => return Err(WireError(format!("unknown reply kind {other}"))),
            };
            r.end()?;
            Ok(reply)
        })();
        (id, parsed)
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::Error {
            code,
            message: message.into(),
        }
    }
}

fn header(body: &[u8]) -> Result<(u8, u64, FrameReader<'_>), WireError> {
    if body.len() < HEADER_BYTES {
        return Err(WireError(format!(
            "{} bytes is shorter than a header",
            body.len()
        )));
    }
    let id = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
    Ok((body[0], id, FrameReader { rest: &body[9..] }))
}

/// Reads one frame body (after its length prefix) from a blocking stream.
pub fn read_frame(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    read_frame_within(stream, MAX_FRAME_BYTES)
}

/// [`read_frame`] refusing frames longer than `max` bytes before allocating them: a
/// connection that has not yet shown the cluster secret may send only a handshake.
pub fn read_frame_within(stream: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = check_len(u32::from_le_bytes(len), max)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn check_len(len: u32, max: usize) -> std::io::Result<usize> {
    let len = len as usize;
    if !(HEADER_BYTES..=max).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame length {len} outside {HEADER_BYTES}..={max}"),
        ));
    }
    Ok(len)
}

/// Writes a whole frame (as built by `frame`) to a blocking stream.
pub fn write_frame(stream: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(frame)
}

struct FrameWriter(Vec<u8>);

impl FrameWriter {
    fn new(kind: u8, id: u64) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0; 4]);
        buf.push(kind);
        buf.extend_from_slice(&id.to_le_bytes());
        Self(buf)
    }

    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.raw(b);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn u32s(&mut self, v: &[u32]) {
        self.u32(v.len() as u32);
        self.0.reserve(v.len() * 4);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }

    fn f32s(&mut self, v: &[f32]) {
        self.u32(v.len() as u32);
        self.0.reserve(v.len() * 4);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

struct FrameReader<'a> {
    rest: &'a [u8],
}

impl<'a> FrameReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError(format!(
                "needs {n} more bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(WireError(format!("{other} is not a boolean"))),
        }
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn key(&mut self) -> Result<Key, WireError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }

    /// A count of items of `item_bytes` each, checked against the bytes left so a
    /// forged count cannot make the reader allocate more than the frame holds.
    fn count(&mut self, item_bytes: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_bytes) > self.rest.len() {
            return Err(WireError(format!(
                "{n} items of {item_bytes} bytes do not fit in {} bytes",
                self.rest.len()
            )));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.count(1)?;
        self.take(n)
    }

    fn str(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| WireError("a string is not UTF-8".into()))
    }

    fn u32s(&mut self) -> Result<Vec<u32>, WireError> {
        let n = self.count(4)?;
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    fn f32s(&mut self) -> Result<Vec<f32>, WireError> {
        let n = self.count(4)?;
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    fn end(&self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(WireError(format!("{} trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        let requests = vec![
            Request::Hello {
                version: PROTOCOL_VERSION,
                secret: b"s3cret".to_vec(),
            },
            Request::Encode(EncodeRequest {
                doc: "t/doc".into(),
                tenant: "t".into(),
                tokens: vec![1, 2, 3, 70000],
                block_size: 2,
                anchor_size: 1,
                dtype: 1,
                blocks: vec![(0, [7; 32]), (1, [9; 32])],
                reencode_ppm: 50_000,
                block_overlap: 16,
            }),
            Request::Open {
                doc: "t/doc".into(),
                keys: vec![[1; 32], [2; 32]],
                score_scale: 0.8,
            },
            Request::Attend {
                session: 42,
                layer: 29,
                m: 2,
                q: vec![0.5, -1.25, f32::MIN_POSITIVE, 3.0],
            },
            Request::Close { session: 42 },
            Request::Stats,
            Request::Drop {
                doc: "t/doc".into(),
            },
            Request::Verify { repair: true },
            Request::Verify { repair: false },
            Request::List,
        ];
        for (i, req) in requests.into_iter().enumerate() {
            let frame = req.frame(i as u64 + 100);
            assert_eq!(Request::parse(body(&frame)), (i as u64 + 100, Ok(req)));
        }
        let replies = vec![
            Reply::Hello {
                version: 1,
                device: "cpu".into(),
                model_fingerprint: vec![3; 32],
            },
            Reply::Encoded {
                encoded: 3,
                reused: 1,
                stored_bytes: 1 << 40,
            },
            Reply::Opened {
                session: 7,
                tokens: 4096,
            },
            Reply::Partial {
                out: vec![1.0, 2.0],
                lse: vec![f32::NEG_INFINITY],
                time: WorkerTime {
                    queued_us: 17,
                    compute_us: u32::MAX,
                },
            },
            Reply::Closed,
            Reply::Stats {
                device: "cuda:0".into(),
                documents: 1,
                blocks: 2,
                stored_bytes: 3,
            },
            Reply::Dropped {
                blocks_deleted: 4,
                bytes_freed: 5,
            },
            Reply::Verified(VerifyCounts {
                documents: 3,
                corrupt: vec!["t/doc@2: checksum".into(), "t/b@1: missing".into()],
                repaired_blocks: 2,
                corruption_found: true,
                repair_error: "disk full".into(),
            }),
            Reply::Verified(VerifyCounts::default()),
            Reply::Listed {
                docs: vec![("t/doc".into(), 2), ("u/other".into(), u64::MAX)],
            },
            Reply::Listed { docs: vec![] },
            Reply::error(ErrorCode::NotFound, "no such session"),
        ];
        for (i, reply) in replies.into_iter().enumerate() {
            let frame = reply.frame(i as u64);
            assert_eq!(Reply::parse(body(&frame)), (i as u64, Ok(reply)));
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let good = Request::Encode(EncodeRequest {
            doc: "d".into(),
            tenant: "t".into(),
            tokens: vec![1, 2, 3],
            block_size: 2,
            anchor_size: 2,
            dtype: 4,
            blocks: vec![(1, [0; 32])],
            reencode_ppm: 0,
            block_overlap: 0,
        })
        .frame(5);
        let good = body(&good).to_vec();
        // Every truncation, and every single-byte corruption of the counts, parses to
        // an error or to some request, never a panic or a huge allocation.
        for cut in 0..good.len() {
            let (_, parsed) = Request::parse(&good[..cut]);
            assert!(parsed.is_err(), "truncated at {cut}");
        }
        for at in 0..good.len() {
            for value in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = Request::parse(&bad);
                let _ = Reply::parse(&bad);
            }
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Request::parse(&trailing).1.is_err());
        let (id, parsed) = Request::parse(&[200, 9, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(id, 9);
        assert!(parsed.is_err());
        assert!(check_len(3, MAX_FRAME_BYTES).is_err());
        assert!(check_len(u32::MAX, MAX_FRAME_BYTES).is_err());
        assert!(check_len(4097, 4096).is_err());
        assert_eq!(check_len(4096, 4096).ok(), Some(4096));
        let mut stream: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 1, 2];
        assert!(read_frame(&mut stream).is_err());
    }

    #[test]
    fn malformed_verify_and_list_frames_are_errors_not_panics() {
        let replies = [
            Reply::Verified(VerifyCounts {
                documents: 2,
                corrupt: vec!["t/d@1: checksum".into(), "t/e@3: missing".into()],
                repaired_blocks: 1,
                corruption_found: true,
                repair_error: String::new(),
            }),
            Reply::Listed {
                docs: vec![("t/d".into(), 1), ("t/e".into(), 3)],
            },
        ];
        for reply in replies {
            let frame = reply.frame(11);
            let good = body(&frame).to_vec();
            for cut in 0..good.len() {
                assert!(Reply::parse(&good[..cut]).1.is_err(), "truncated at {cut}");
            }
            // A forged list count cannot allocate beyond the frame, and no byte value
            // anywhere panics.
            for at in 0..good.len() {
                for value in [0u8, 1, 2, 0x7f, 0xff] {
                    let mut bad = good.clone();
                    bad[at] = value;
                    let _ = Reply::parse(&bad);
                    let _ = Request::parse(&bad);
                }
            }
            let mut trailing = good.clone();
            trailing.push(0);
            assert!(Reply::parse(&trailing).1.is_err());
        }
        // A boolean is 0 or 1, nothing else.
        let frame = Request::Verify { repair: true }.frame(4);
        let mut bad = body(&frame).to_vec();
        *bad.last_mut().unwrap() = 2;
        assert!(Request::parse(&bad).1.is_err());
        let (id, parsed) = Request::parse(body(&Request::List.frame(9)));
        assert_eq!((id, parsed), (9, Ok(Request::List)));
    }
}
