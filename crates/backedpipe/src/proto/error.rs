//! The protocol's errors and close codes: what can go wrong on the wire, and the CLOSE code each
//! failure is reported to the peer with.
//!
//! Errors come in two categories joined by [`ProtoError`]: [`DecodeError`] (the bytes are not a
//! valid frame) and [`HandshakeError`] (valid frames in the wrong order, failed authentication,
//! a refused session). Each maps to a [`CloseCode`] through `close_code()`; the side that detects
//! the error sends a CLOSE with that code and drops the connection.

use std::fmt;

use super::frame::FrameType;
use super::SessionId;

/// Why a connection or session was closed: the code in a CLOSE frame.
///
/// Each variant says what the peer that receives it does. A code not listed here is a
/// [`DecodeError::UnknownCloseCode`] (a newer protocol version must bump [`VERSION`](super::VERSION)
/// before it sends new codes).
///
/// ```
/// use backedpipe::proto::CloseCode;
///
/// assert_eq!(CloseCode::AuthenticationFailed.to_u16(), 3);
/// assert_eq!(CloseCode::from_u16(3), Some(CloseCode::AuthenticationFailed));
/// assert_eq!(CloseCode::from_u16(999), None);
/// assert_eq!(CloseCode::UnknownSession.to_string(), "unknown session (4)");
/// assert!(CloseCode::GoingAway.session_survives());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 0: the session ended deliberately (both directions finished or the application closed).
    /// The receiver ends the session and does not reconnect.
    Normal = 0,
    /// 1: the peer sent something the protocol forbids (a malformed frame, a frame in the wrong
    /// state, an ACK beyond what was sent). The receiver ends the session and reports a bug: a
    /// reconnect would fail the same way.
    ProtocolViolation = 1,
    /// 2: a frame header announced more than [`MAX_FRAME_PAYLOAD`](super::MAX_FRAME_PAYLOAD)
    /// bytes. The receiver ends the session (the sender has a bug or a different limit).
    FrameTooLarge = 2,
    /// 3: a resume proof (in HELLO or RESUMED) did not verify, or a HELLO was replayed. The
    /// receiver ends the session and does not retry with the same secret: either the secret is
    /// wrong or someone is interfering.
    AuthenticationFailed = 3,
    /// 4: the server has no session with the id in HELLO (it restarted or never issued it). The
    /// client gives up on the session with a clear error; it may start a new session.
    UnknownSession = 4,
    /// 5: the server knew the session but forgot it after its time-to-live. As `UnknownSession`:
    /// the client gives up on the session.
    SessionExpired = 5,
    /// 6: the peer asked to resume from an offset its replay buffer no longer holds (or never
    /// held), so the stream cannot continue without loss. The receiver ends the session.
    ReplayUnavailable = 6,
    /// 7: the sender failed for a reason of its own (no randomness, out of resources). The
    /// receiver may reconnect later with backoff; the session may survive.
    InternalError = 7,
    /// 8: the sender is shutting down or dropping this connection (server restart, a newer
    /// connection replaced this one). The session survives: the client reconnects and resumes
    /// with backoff.
    GoingAway = 8,
}

impl CloseCode {
    /// Every close code, in numeric order.
    pub const ALL: [CloseCode; 9] = [
        CloseCode::Normal,
        CloseCode::ProtocolViolation,
        CloseCode::FrameTooLarge,
        CloseCode::AuthenticationFailed,
        CloseCode::UnknownSession,
        CloseCode::SessionExpired,
        CloseCode::ReplayUnavailable,
        CloseCode::InternalError,
        CloseCode::GoingAway,
    ];

    /// The code's value on the wire.
    pub fn to_u16(self) -> u16 {
        self as u16
    }

    /// The code with this wire value, or `None` if it names no code.
    pub fn from_u16(value: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.to_u16() == value)
    }

    /// Whether the session may be resumed after a CLOSE with this code ([`GoingAway`] and
    /// [`InternalError`]); for every other code the receiver ends the session.
    ///
    /// [`GoingAway`]: CloseCode::GoingAway
    /// [`InternalError`]: CloseCode::InternalError
    pub fn session_survives(self) -> bool {
        matches!(self, CloseCode::GoingAway | CloseCode::InternalError)
    }

    fn description(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal close",
            CloseCode::ProtocolViolation => "protocol violation",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::AuthenticationFailed => "authentication failed",
            CloseCode::UnknownSession => "unknown session",
            CloseCode::SessionExpired => "session expired",
            CloseCode::ReplayUnavailable => "replay unavailable",
            CloseCode::InternalError => "internal error",
            CloseCode::GoingAway => "going away",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.description(), self.to_u16())
    }
}

/// The bytes received are not a valid frame. Every variant names the offending value.
///
/// All are fatal to the connection: the receiver sends CLOSE with [`close_code`](Self::close_code)
/// and drops it. A frame cut short at end of input is *not* a decode error (see
/// [`TruncatedFrame`]).
///
/// ```
/// use backedpipe::proto::{CloseCode, DecodeError, Frame};
///
/// let err = Frame::decode(&[0x01, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
/// assert_eq!(err, DecodeError::FrameTooLarge(u32::MAX));
/// assert_eq!(err.close_code(), CloseCode::FrameTooLarge);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The type byte names no frame.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The header announced a payload larger than
    /// [`MAX_FRAME_PAYLOAD`](super::MAX_FRAME_PAYLOAD); nothing of it was buffered.
    #[error("frame payload of {0} bytes exceeds the maximum")]
    FrameTooLarge(u32),
    /// The payload length is not allowed for this frame type (a fixed-size frame of the wrong
    /// size, an empty DATA, a CLOSE whose reason length disagrees with its frame length).
    #[error("{frame_type} frame with bad payload length {length}")]
    BadLength {
        /// The frame's type.
        frame_type: FrameType,
        /// The length found.
        length: u32,
    },
    /// A HELLO did not start with [`MAGIC`](super::MAGIC): the peer does not speak this protocol.
    #[error("bad magic {0:02x?} (expected \"BKPP\")")]
    BadMagic([u8; 4]),
    /// A HELLO carried a protocol version this crate does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A HELLO's kind byte is neither new session (0) nor resume (1).
    #[error("unknown HELLO kind {0}")]
    UnknownHelloKind(u8),
    /// A CLOSE carried a code this crate does not know.
    #[error("unknown close code {0}")]
    UnknownCloseCode(u16),
    /// A CLOSE announced a reason longer than [`MAX_CLOSE_REASON`](super::MAX_CLOSE_REASON).
    #[error("close reason of {0} bytes exceeds the maximum")]
    CloseReasonTooLong(u16),
    /// A CLOSE reason is not UTF-8.
    #[error("close reason is not valid UTF-8")]
    InvalidUtf8,
    /// Before the handshake finished, the peer began a frame that is neither a handshake frame
    /// nor CLOSE; refused at its header (see [`FrameDecoder::handshake`](super::FrameDecoder::handshake)).
    #[error("{0} frame before the handshake finished")]
    NotAHandshakeFrame(FrameType),
}

impl DecodeError {
    /// The code of the CLOSE to send the peer: [`CloseCode::FrameTooLarge`] for an oversized
    /// frame, [`CloseCode::ProtocolViolation`] for the rest.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::FrameTooLarge(_) => CloseCode::FrameTooLarge,
            _ => CloseCode::ProtocolViolation,
        }
    }
}

impl From<&DecodeError> for CloseCode {
    fn from(err: &DecodeError) -> CloseCode {
        err.close_code()
    }
}

/// The input ended in the middle of a frame.
///
/// Not corruption: the transport was lost mid-frame. The pipe treats it like any other
/// transport loss (reconnect and resume); the partial frame is discarded and will be replayed.
/// Returned by [`FrameDecoder::finish`](super::FrameDecoder::finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("transport lost mid-frame: {buffered} bytes of an incomplete frame buffered")]
pub struct TruncatedFrame {
    /// How many bytes of the incomplete frame were received.
    pub buffered: usize,
}

/// The handshake failed. Each variant says who is at fault and what to do.
///
/// ```
/// use backedpipe::proto::{CloseCode, HandshakeError};
///
/// assert_eq!(HandshakeError::AuthenticationFailed.close_code(),
///            Some(CloseCode::AuthenticationFailed));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer sent a valid frame the handshake does not allow here (DATA before
    /// authentication, a second HELLO, ...). Protocol violation; do not retry.
    #[error("unexpected {got} frame while waiting for {expected}")]
    UnexpectedFrame {
        /// What the state machine was waiting for.
        expected: &'static str,
        /// What arrived.
        got: FrameType,
    },
    /// The proof in the client's resume HELLO did not verify (a wrong secret, or fields altered
    /// on the way). The server closes with [`CloseCode::AuthenticationFailed`]; the live session,
    /// if any, is not touched.
    #[error("client failed to prove knowledge of the session secret")]
    AuthenticationFailed,
    /// A resume HELLO with a valid proof but an attempt number the server already accepted (or
    /// a smaller one): a captured HELLO sent again, or an older attempt that lost a race with a
    /// newer one. The server closes with [`CloseCode::AuthenticationFailed`]; the live session,
    /// if any, is not touched.
    #[error("resume attempt {attempt} is not newer than attempt {last_attempt}, already accepted")]
    ReplayedResume {
        /// The attempt number in the HELLO.
        attempt: u64,
        /// The largest attempt number the server has accepted for the session.
        last_attempt: u64,
    },
    /// The server's RESUMED MAC did not verify: the server is not who it claims, or someone altered
    /// the sequence numbers. The client closes with [`CloseCode::AuthenticationFailed`] and does
    /// not send data.
    #[error("server failed to prove knowledge of the session secret")]
    ServerAuthenticationFailed,
    /// The server has no session with this id. The server closes with
    /// [`CloseCode::UnknownSession`]; the client gives up on the session.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// The server's session with this id has expired. The server closes with
    /// [`CloseCode::SessionExpired`]; the client gives up on the session.
    #[error("session {0} expired")]
    SessionExpired(SessionId),
    /// The peer closed the connection during the handshake. Nothing is sent back; what to do
    /// depends on the code (see [`CloseCode`]).
    #[error("peer closed the handshake: {code}: {reason:?}")]
    ClosedByPeer {
        /// The peer's close code.
        code: CloseCode,
        /// The peer's reason.
        reason: String,
    },
    /// The operating system's random number generator failed. Closes with
    /// [`CloseCode::InternalError`]; retry later.
    #[error("random number generator failed: {0}")]
    Random(String),
}

impl HandshakeError {
    /// The code of the CLOSE to send the peer, or `None` when the peer already closed.
    pub fn close_code(&self) -> Option<CloseCode> {
        Some(match self {
            HandshakeError::UnexpectedFrame { .. } => CloseCode::ProtocolViolation,
            HandshakeError::AuthenticationFailed
            | HandshakeError::ReplayedResume { .. }
            | HandshakeError::ServerAuthenticationFailed => CloseCode::AuthenticationFailed,
            HandshakeError::UnknownSession(_) => CloseCode::UnknownSession,
            HandshakeError::SessionExpired(_) => CloseCode::SessionExpired,
            HandshakeError::ClosedByPeer { .. } => return None,
            HandshakeError::Random(_) => CloseCode::InternalError,
        })
    }
}

/// Any error of the wire layer: the frame could not be decoded, or the handshake failed.
///
/// ```
/// use backedpipe::proto::{CloseCode, DecodeError, ProtoError};
///
/// let err = ProtoError::from(DecodeError::BadMagic(*b"HTTP"));
/// assert_eq!(err.close_code(), Some(CloseCode::ProtocolViolation));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The peer's bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

impl ProtoError {
    /// The code of the CLOSE to send the peer, or `None` when the peer already closed.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ProtoError::Decode(e) => Some(e.close_code()),
            ProtoError::Handshake(e) => e.close_code(),
        }
    }
}
