//! The wire format as types: the frame header, every frame, their encoding and their decoding from
//! a byte slice.
//!
//! A frame is a 5-byte header, `[type: u8][length: u32 big-endian]`, then `length` payload bytes.
//! The header alone decides whether a frame is acceptable (known type, a length allowed for that
//! type, at most [`MAX_FRAME_PAYLOAD`]), so a bad frame is rejected before any of its payload is
//! buffered. `docs/PROTOCOL.md` describes every byte; its examples are checked against this code.

use std::fmt;

use bytes::{BufMut, Bytes};

use super::error::DecodeError;
use super::{CloseCode, Mac, Secret, SessionId};

/// The size of a frame header: one type byte and a big-endian `u32` payload length.
pub const HEADER_LEN: usize = 5;

/// The largest payload a frame may carry: 1 MiB.
///
/// Why: a decoder must buffer a whole frame before handing it on, so this bounds the memory a peer
/// can make us commit per connection before we see a single complete frame. 1 MiB is large enough
/// that the per-frame header overhead on a bulk transfer is negligible (5 bytes per MiB) and small
/// enough that it does not delay acks or heartbeats queued behind a large DATA frame by more than
/// about 10 ms on a 1 Gbit/s link. A larger length is [`DecodeError::FrameTooLarge`].
pub const MAX_FRAME_PAYLOAD: u32 = 1 << 20;

/// The four bytes that open every HELLO payload: `b"BKPP"`.
pub const MAGIC: [u8; 4] = *b"BKPP";

/// The protocol version this crate speaks, carried in HELLO. Version 1 resumed in three
/// messages (a server challenge, then the client's proof); a peer speaking it is refused at its
/// first HELLO with [`DecodeError::UnsupportedVersion`].
pub const VERSION: u8 = 2;

/// The longest CLOSE reason, in bytes of UTF-8. Longer reasons are truncated by [`Close::new`].
pub const MAX_CLOSE_REASON: usize = 256;

/// Payload length of HELLO for a new session: magic, version, kind.
const HELLO_NEW_LEN: u32 = 6;
/// Payload length of HELLO for a resume: magic, version, kind, session id, attempt, client
/// reader seq, proof.
const HELLO_RESUME_LEN: u32 = 6 + 16 + 8 + 8 + 32;

/// The kind byte of a HELLO asking for a new session.
const HELLO_KIND_NEW: u8 = 0;
/// The kind byte of a HELLO asking to resume a session.
const HELLO_KIND_RESUME: u8 = 1;

/// The type byte of a frame.
///
/// ```
/// use backedpipe::proto::FrameType;
///
/// assert_eq!(FrameType::from_u8(0x02), Some(FrameType::Ack));
/// assert_eq!(FrameType::Ack as u8, 0x02);
/// assert_eq!(FrameType::from_u8(0x7f), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Stream bytes.
    Data = 0x01,
    /// Cumulative count of stream bytes delivered to the application.
    Ack = 0x02,
    /// A liveness probe carrying a nonce.
    Ping = 0x03,
    /// The answer to a PING, echoing its nonce.
    Pong = 0x04,
    /// The sender is closing the connection, with a code and a reason.
    Close = 0x05,
    /// The sender will send no more stream bytes.
    Fin = 0x06,
    /// The client's first frame: new session or resume.
    Hello = 0x10,
    /// The server's answer to a new-session HELLO: session id and secret.
    Welcome = 0x11,
    /// The server's acceptance of a resume, with its own proof.
    Resumed = 0x12,
}

impl FrameType {
    /// Every frame type, in type-byte order.
    pub const ALL: [FrameType; 9] = [
        FrameType::Data,
        FrameType::Ack,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Close,
        FrameType::Fin,
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Resumed,
    ];

    /// The frame type with this type byte, or `None` if the byte names no frame.
    pub fn from_u8(byte: u8) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| *t as u8 == byte)
    }

    /// The frame's name as written in `docs/PROTOCOL.md` (upper case).
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Data => "DATA",
            FrameType::Ack => "ACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Close => "CLOSE",
            FrameType::Fin => "FIN",
            FrameType::Hello => "HELLO",
            FrameType::Welcome => "WELCOME",
            FrameType::Resumed => "RESUMED",
        }
    }

    /// Whether `length` is an allowed payload length for this type. Checked on the header, before
    /// any payload is read.
    pub fn allows_length(self, length: u32) -> bool {
        match self {
            FrameType::Data => (1..=MAX_FRAME_PAYLOAD).contains(&length),
            FrameType::Ack | FrameType::Ping | FrameType::Pong => length == 8,
            FrameType::Close => (4..=4 + MAX_CLOSE_REASON as u32).contains(&length),
            FrameType::Fin => length == 0,
            FrameType::Hello => length == HELLO_NEW_LEN || length == HELLO_RESUME_LEN,
            FrameType::Welcome => length == 16 + 32,
            FrameType::Resumed => length == 8 + 32,
        }
    }

    /// Whether this frame belongs to the handshake (type bytes `0x10` and up).
    pub fn is_handshake(self) -> bool {
        self as u8 >= 0x10
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.name(), *self as u8)
    }
}

/// A validated frame header: a known type and a length allowed for it.
///
/// ```
/// use backedpipe::proto::{FrameHeader, FrameType, DecodeError};
///
/// let header = FrameHeader::parse([0x02, 0, 0, 0, 8]).unwrap();
/// assert_eq!((header.frame_type, header.length), (FrameType::Ack, 8));
/// assert_eq!(FrameHeader::parse([0x02, 0, 0, 0, 9]).unwrap_err(),
///            DecodeError::BadLength { frame_type: FrameType::Ack, length: 9 });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame's type.
    pub frame_type: FrameType,
    /// The payload length in bytes.
    pub length: u32,
}

impl FrameHeader {
    /// The header of a DATA frame carrying `length` payload bytes (1 to
    /// [`MAX_FRAME_PAYLOAD`]), for a sender that writes the payload itself.
    pub fn data(length: u32) -> FrameHeader {
        FrameHeader {
            frame_type: FrameType::Data,
            length,
        }
    }

    /// The header's five bytes.
    ///
    /// ```
    /// use backedpipe::proto::FrameHeader;
    ///
    /// assert_eq!(FrameHeader::data(3).encode(), [0x01, 0, 0, 0, 3]);
    /// ```
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [a, b, c, d] = self.length.to_be_bytes();
        [self.frame_type as u8, a, b, c, d]
    }

    /// Parses and validates a header. Errors, in the order checked: [`DecodeError::UnknownType`],
    /// [`DecodeError::FrameTooLarge`], [`DecodeError::BadLength`].
    pub fn parse(bytes: [u8; HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
        let frame_type = FrameType::from_u8(bytes[0]).ok_or(DecodeError::UnknownType(bytes[0]))?;
        let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        if length > MAX_FRAME_PAYLOAD {
            return Err(DecodeError::FrameTooLarge(length));
        }
        if !frame_type.allows_length(length) {
            return Err(DecodeError::BadLength { frame_type, length });
        }
        Ok(FrameHeader { frame_type, length })
    }
}

/// What a client asks for in its HELLO.
///
/// ```
/// use backedpipe::proto::{Frame, Hello, Mac, SessionId};
///
/// let hello = Frame::hello_resume(SessionId::from_bytes([7; 16]), 1, 1234, Mac::from_bytes([0; 32]));
/// assert!(matches!(hello, Frame::Hello(Hello::Resume { attempt: 1, client_reader_seq: 1234, .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Start a new session; the server answers WELCOME.
    NewSession,
    /// Resume a session, proving the secret; the server answers RESUMED.
    Resume {
        /// The session to resume.
        session_id: SessionId,
        /// The client's count of its resume attempts for this session (1, 2, ...): each attempt
        /// uses a larger number than any before, and the server accepts only a number larger
        /// than any it accepted, so a captured HELLO cannot be replayed.
        attempt: u64,
        /// How many bytes of the server's stream the client has delivered to its application:
        /// the server replays from here. Hostile input to the server until checked against its
        /// replay buffer.
        client_reader_seq: u64,
        /// The client's MAC over the fields above (see [`client_proof`](super::client_proof)).
        proof: Mac,
    },
}

/// The payload of a CLOSE frame: a code and a short human-readable reason.
///
/// The reason is at most [`MAX_CLOSE_REASON`] bytes of UTF-8; [`Close::new`] truncates a longer one
/// at a character boundary, so every `Close` encodes to a valid frame.
///
/// ```
/// use backedpipe::proto::{Close, CloseCode, MAX_CLOSE_REASON};
///
/// let close = Close::new(CloseCode::GoingAway, "é".repeat(200));
/// assert_eq!(close.code(), CloseCode::GoingAway);
/// assert!(close.reason().len() <= MAX_CLOSE_REASON);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    code: CloseCode,
    reason: String,
}

impl Close {
    /// A close with this code and reason (truncated to [`MAX_CLOSE_REASON`] bytes).
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Close {
        let mut reason = reason.into();
        if reason.len() > MAX_CLOSE_REASON {
            let mut end = MAX_CLOSE_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Close { code, reason }
    }

    /// The close code.
    pub fn code(&self) -> CloseCode {
        self.code
    }

    /// The reason, for humans and logs; never parsed.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// One frame of the session protocol.
///
/// Build frames with the constructors, which say what they mean ([`Frame::ack`],
/// [`Frame::ping`], [`Frame::fin`], ...); send them with [`encode`](Frame::encode); read them with
/// [`Frame::decode`] or, from a stream, a [`FrameDecoder`](super::FrameDecoder).
///
/// ```
/// use backedpipe::proto::Frame;
///
/// let mut wire = Vec::new();
/// Frame::data(&b"hello"[..]).encode(&mut wire);
/// Frame::ack(5).encode(&mut wire);
/// assert_eq!(&wire[..10], b"\x01\x00\x00\x00\x05hello");
///
/// let (first, used) = Frame::decode(&wire).unwrap().unwrap();
/// assert_eq!(first, Frame::data(&b"hello"[..]));
/// let (second, _) = Frame::decode(&wire[used..]).unwrap().unwrap();
/// assert_eq!(second, Frame::ack(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// DATA: stream bytes. The payload must hold between 1 and [`MAX_FRAME_PAYLOAD`] bytes; use
    /// [`Frame::data_frames`] to cut a larger buffer.
    Data(Bytes),
    /// ACK: the cumulative count of stream bytes the sender has delivered to its application.
    Ack(u64),
    /// PING: a liveness probe; the peer answers PONG with the same nonce.
    Ping(u64),
    /// PONG: the answer to a PING.
    Pong(u64),
    /// CLOSE: the sender closes the connection (and, unless the code says otherwise, the session).
    Close(Close),
    /// FIN: the sender will send no more stream bytes; it follows the last DATA.
    Fin,
    /// HELLO: the client's first frame.
    Hello(Hello),
    /// WELCOME: the server created a session.
    Welcome {
        /// The new session's id.
        session_id: SessionId,
        /// The new session's secret, which both sides keep to authenticate resumes.
        secret: Secret,
    },
    /// RESUMED: the server accepts a resume.
    Resumed {
        /// How many bytes of the client's stream the server has delivered to its application: the
        /// client replays from here. Hostile input to the client until checked against its buffer.
        server_reader_seq: u64,
        /// The server's MAC (see [`server_proof`](super::server_proof)).
        mac: Mac,
    },
}

impl Frame {
    /// DATA carrying `bytes` (1 to [`MAX_FRAME_PAYLOAD`] bytes).
    pub fn data(bytes: impl Into<Bytes>) -> Frame {
        Frame::Data(bytes.into())
    }

    /// DATA frames carrying `bytes` in order, each at most [`MAX_FRAME_PAYLOAD`] bytes; none for
    /// an empty buffer. Cutting is zero-copy.
    ///
    /// ```
    /// use backedpipe::proto::{Frame, MAX_FRAME_PAYLOAD};
    ///
    /// let big = vec![0u8; MAX_FRAME_PAYLOAD as usize + 1];
    /// assert_eq!(Frame::data_frames(big.into()).count(), 2);
    /// assert_eq!(Frame::data_frames(Vec::new().into()).count(), 0);
    /// ```
    pub fn data_frames(mut bytes: Bytes) -> impl Iterator<Item = Frame> {
        std::iter::from_fn(move || {
            if bytes.is_empty() {
                return None;
            }
            let n = bytes.len().min(MAX_FRAME_PAYLOAD as usize);
            Some(Frame::Data(bytes.split_to(n)))
        })
    }

    /// ACK: `delivered` stream bytes have reached the application so far.
    pub fn ack(delivered: u64) -> Frame {
        Frame::Ack(delivered)
    }

    /// PING with this nonce.
    pub fn ping(nonce: u64) -> Frame {
        Frame::Ping(nonce)
    }

    /// PONG answering a PING with this nonce.
    pub fn pong(nonce: u64) -> Frame {
        Frame::Pong(nonce)
    }

    /// CLOSE with this code and reason (truncated to [`MAX_CLOSE_REASON`] bytes).
    pub fn close(code: CloseCode, reason: impl Into<String>) -> Frame {
        Frame::Close(Close::new(code, reason))
    }

    /// FIN: no more stream bytes follow.
    pub fn fin() -> Frame {
        Frame::Fin
    }

    /// HELLO asking for a new session.
    pub fn hello_new() -> Frame {
        Frame::Hello(Hello::NewSession)
    }

    /// HELLO asking to resume `session_id` with this attempt number, having delivered
    /// `client_reader_seq` bytes of the server's stream; `proof` is the
    /// [`client_proof`](super::client_proof) over them.
    pub fn hello_resume(
        session_id: SessionId,
        attempt: u64,
        client_reader_seq: u64,
        proof: Mac,
    ) -> Frame {
        Frame::Hello(Hello::Resume {
            session_id,
            attempt,
            client_reader_seq,
            proof,
        })
    }

    /// This frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Data(_) => FrameType::Data,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Close(_) => FrameType::Close,
            Frame::Fin => FrameType::Fin,
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome { .. } => FrameType::Welcome,
            Frame::Resumed { .. } => FrameType::Resumed,
        }
    }

    /// The payload length this frame encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::Data(b) => b.len(),
            Frame::Ack(_) | Frame::Ping(_) | Frame::Pong(_) => 8,
            Frame::Close(c) => 4 + c.reason.len(),
            Frame::Fin => 0,
            Frame::Hello(Hello::NewSession) => HELLO_NEW_LEN as usize,
            Frame::Hello(Hello::Resume { .. }) => HELLO_RESUME_LEN as usize,
            Frame::Welcome { .. } => 48,
            Frame::Resumed { .. } => 40,
        }
    }

    /// The number of bytes [`encode`](Frame::encode) appends: header plus payload.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Appends the frame, header and payload, to `out` (a `Vec<u8>`, a `BytesMut`, ...).
    ///
    /// Encoding cannot fail. A DATA frame must carry 1 to [`MAX_FRAME_PAYLOAD`] bytes (the peer
    /// rejects anything else); this is checked in debug builds.
    pub fn encode<B: BufMut>(&self, out: &mut B) {
        let len = self.payload_len();
        debug_assert!(
            self.frame_type().allows_length(len as u32),
            "{} frame with a payload of {len} bytes",
            self.frame_type()
        );
        out.put_u8(self.frame_type() as u8);
        out.put_u32(len as u32);
        match self {
            Frame::Data(b) => out.put_slice(b),
            Frame::Ack(n) | Frame::Ping(n) | Frame::Pong(n) => out.put_u64(*n),
            Frame::Close(c) => {
                out.put_u16(c.code.to_u16());
                out.put_u16(c.reason.len() as u16);
                out.put_slice(c.reason.as_bytes());
            }
            Frame::Fin => {}
            Frame::Hello(hello) => {
                out.put_slice(&MAGIC);
                out.put_u8(VERSION);
                match hello {
                    Hello::NewSession => out.put_u8(HELLO_KIND_NEW),
                    Hello::Resume {
                        session_id,
                        attempt,
                        client_reader_seq,
                        proof,
                    } => {
                        out.put_u8(HELLO_KIND_RESUME);
                        out.put_slice(session_id.as_bytes());
                        out.put_u64(*attempt);
                        out.put_u64(*client_reader_seq);
                        out.put_slice(proof.as_bytes());
                    }
                }
            }
            Frame::Welcome { session_id, secret } => {
                out.put_slice(session_id.as_bytes());
                out.put_slice(secret.as_bytes());
            }
            Frame::Resumed {
                server_reader_seq,
                mac,
            } => {
                out.put_u64(*server_reader_seq);
                out.put_slice(mac.as_bytes());
            }
        }
    }

    /// The frame encoded into a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// Decodes the frame at the start of `input`.
    ///
    /// Returns `Ok(Some((frame, consumed)))` for a whole frame, `Ok(None)` if `input` holds only
    /// part of one (more bytes are needed: this is not an error), and an error as soon as the bytes
    /// present prove the frame bad. The header is checked before the payload, so an oversized or
    /// mis-sized frame is rejected from its first five bytes.
    ///
    /// ```
    /// use backedpipe::proto::{Frame, DecodeError};
    ///
    /// assert_eq!(Frame::decode(&[0x06, 0, 0]).unwrap(), None); // truncated: need more bytes
    /// assert_eq!(Frame::decode(&[0x06, 0, 0, 0, 0]).unwrap(), Some((Frame::Fin, 5)));
    /// assert_eq!(Frame::decode(&[0x99]).unwrap_err(), DecodeError::UnknownType(0x99));
    /// ```
    pub fn decode(input: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        if input.is_empty() {
            return Ok(None);
        }
        // The type byte alone can already be rejected.
        if FrameType::from_u8(input[0]).is_none() {
            return Err(DecodeError::UnknownType(input[0]));
        }
        let Some(head) = input.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let header = FrameHeader::parse(head.try_into().expect("five bytes"))?;
        let end = HEADER_LEN + header.length as usize;
        let Some(payload) = input.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let frame = Frame::decode_payload(header, Bytes::copy_from_slice(payload))?;
        Ok(Some((frame, end)))
    }

    /// Decodes the payload of a frame whose header was validated by [`FrameHeader::parse`].
    /// `payload` must be exactly `header.length` bytes. DATA takes `payload` without copying.
    pub fn decode_payload(header: FrameHeader, payload: Bytes) -> Result<Frame, DecodeError> {
        let bad_length = || DecodeError::BadLength {
            frame_type: header.frame_type,
            length: payload.len() as u32,
        };
        if payload.len() != header.length as usize
            || !header.frame_type.allows_length(header.length)
        {
            return Err(bad_length());
        }
        let p = &payload[..];
        let frame = match header.frame_type {
            FrameType::Data => Frame::Data(payload.clone()),
            FrameType::Ack => Frame::Ack(be_u64(p)),
            FrameType::Ping => Frame::Ping(be_u64(p)),
            FrameType::Pong => Frame::Pong(be_u64(p)),
            FrameType::Close => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                let code = CloseCode::from_u16(code).ok_or(DecodeError::UnknownCloseCode(code))?;
                let reason_len = u16::from_be_bytes([p[2], p[3]]);
                if reason_len as usize > MAX_CLOSE_REASON {
                    return Err(DecodeError::CloseReasonTooLong(reason_len));
                }
                if reason_len as usize != p.len() - 4 {
                    return Err(bad_length());
                }
                let reason = std::str::from_utf8(&p[4..]).map_err(|_| DecodeError::InvalidUtf8)?;
                Frame::Close(Close {
                    code,
                    reason: reason.to_owned(),
                })
            }
            FrameType::Fin => Frame::Fin,
            FrameType::Hello => {
                let magic: [u8; 4] = p[..4].try_into().expect("length checked");
                if magic != MAGIC {
                    return Err(DecodeError::BadMagic(magic));
                }
                if p[4] != VERSION {
                    return Err(DecodeError::UnsupportedVersion(p[4]));
                }
                match (p[5], p.len() as u32) {
                    (HELLO_KIND_NEW, HELLO_NEW_LEN) => Frame::Hello(Hello::NewSession),
                    (HELLO_KIND_RESUME, HELLO_RESUME_LEN) => Frame::Hello(Hello::Resume {
                        session_id: SessionId::from_bytes(array(&p[6..22])),
                        attempt: be_u64(&p[22..30]),
                        client_reader_seq: be_u64(&p[30..38]),
                        proof: Mac::from_bytes(array(&p[38..70])),
                    }),
                    (HELLO_KIND_NEW | HELLO_KIND_RESUME, _) => return Err(bad_length()),
                    (kind, _) => return Err(DecodeError::UnknownHelloKind(kind)),
                }
            }
            FrameType::Welcome => Frame::Welcome {
                session_id: SessionId::from_bytes(array(&p[..16])),
                secret: Secret::from_bytes(array(&p[16..48])),
            },
            FrameType::Resumed => Frame::Resumed {
                server_reader_seq: be_u64(&p[..8]),
                mac: Mac::from_bytes(array(&p[8..40])),
            },
        };
        Ok(frame)
    }
}

/// A big-endian `u64` from exactly eight bytes (lengths are validated before this is called).
fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(array(bytes))
}

/// A fixed-size array from a slice of exactly that size (lengths are validated before this is
/// called).
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes.try_into().expect("length validated by the header")
}
