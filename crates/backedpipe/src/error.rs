//! The one public error type of the crate.
//!
//! Every error the Go package declares has a variant here under the same name (without the `Err`
//! prefix); the variants added by this crate cover inputs the Go package accepted silently or
//! panicked on. Each variant says what the caller should do about it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::{CloseCode, SessionId};

/// A boxed error from a [`Reconnector`](crate::Reconnector) or another user-supplied component.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a [`BackedPipe`](crate::BackedPipe), a
/// [`BackedWriter`](crate::BackedWriter), a [`BackedReader`](crate::BackedReader) or a
/// [`ReplayBuffer`](crate::ReplayBuffer).
///
/// The type is cheap to clone (sources are reference counted), so one terminal failure can be
/// handed to every blocked reader and writer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pipe was closed locally. Nothing more can be read or written; create a new pipe.
    #[error("pipe is closed")]
    PipeClosed,

    /// [`connect`](crate::BackedPipe::connect) was called on a pipe that is already connected.
    /// Use [`force_reconnect`](crate::BackedPipe::force_reconnect) to replace the connection.
    #[error("pipe is already connected")]
    PipeAlreadyConnected,

    /// [`connect`](crate::BackedPipe::connect) was called while a reconnection was running.
    /// Wait for it (watch [`status`](crate::BackedPipe::status)) or call
    /// [`force_reconnect`](crate::BackedPipe::force_reconnect), which joins it.
    #[error("reconnection already in progress")]
    ReconnectionInProgress,

    /// The [`Reconnector`](crate::Reconnector) failed, or the pipe has none. The pipe stays
    /// disconnected; an established pipe keeps retrying with backoff by itself.
    #[error("reconnect failed")]
    ReconnectFailed(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),

    /// The peer claims to have read more bytes than this side ever wrote. The peer is confused or
    /// hostile; the pipe fails, because no replay can make the two sides agree.
    #[error("remote sequence number {remote} exceeds local sequence {local}")]
    InvalidSequenceNumber {
        /// The sequence number the peer reported.
        remote: u64,
        /// The number of bytes this side has written.
        local: u64,
    },

    /// The writer could not resume at the peer's offset; the source says why
    /// ([`ReplayDataUnavailable`](Error::ReplayDataUnavailable),
    /// [`FutureSequence`](Error::FutureSequence) or [`ReplayFailed`](Error::ReplayFailed)).
    #[error("reconnect writer failed")]
    ReconnectWriterFailed(#[source] Box<Error>),

    /// [`BackedWriter::reconnect`](crate::BackedWriter::reconnect) was called after the writer
    /// was closed. Create a new writer.
    #[error("cannot reconnect closed writer")]
    WriterClosed,

    /// The peer asked to resume from a byte that was never written. Treat the peer as broken or
    /// hostile; the buffer was not touched.
    #[error("cannot replay from future sequence {requested}: only {written} bytes written")]
    FutureSequence {
        /// The offset the peer asked for.
        requested: u64,
        /// The number of bytes written so far.
        written: u64,
    },

    /// The peer asked to resume from a byte the replay buffer no longer holds, so the stream
    /// cannot continue without loss. Start a new stream; in raw mode, a larger
    /// [`buffer_capacity`](crate::PipeConfig::buffer_capacity) makes this rarer.
    #[error("failed to read replay data: offset {requested} is older than the oldest byte kept ({oldest})")]
    ReplayDataUnavailable {
        /// The offset the peer asked for.
        requested: u64,
        /// The oldest offset still held.
        oldest: u64,
    },

    /// Writing the replayed bytes to the new connection failed. The writer stays disconnected;
    /// reconnect again with another connection.
    #[error("replay failed")]
    ReplayFailed(#[source] Arc<io::Error>),

    /// The new connection accepted no bytes during replay (a zero-length write). The writer
    /// stays disconnected; reconnect again with another connection.
    #[error("partial replay: {written} of {expected} bytes written")]
    PartialReplay {
        /// Bytes the connection accepted.
        written: u64,
        /// Bytes that had to be replayed.
        expected: u64,
    },

    /// More bytes were requested from a [`ReplayBuffer`](crate::ReplayBuffer) than it holds.
    #[error("requested {requested} bytes but only {available} available")]
    NotEnoughData {
        /// Bytes requested.
        requested: usize,
        /// Bytes held.
        available: usize,
    },

    /// A buffer capacity of zero was given. Pass a capacity of at least one byte.
    #[error("buffer capacity must be greater than zero")]
    InvalidCapacity,

    /// The pipe was created outside a tokio runtime, which it needs for its reconnect task.
    /// Create it from within a runtime.
    #[error("backedpipe needs a tokio runtime")]
    NoRuntime,

    /// Writing after [`shutdown`](tokio::io::AsyncWriteExt::shutdown): the stream was ended
    /// for writing (session mode sent FIN). Reading still works.
    #[error("stream was shut down for writing")]
    WriteAfterShutdown,

    /// Session mode: the server does not know the session (it restarted, or the session was
    /// closed). The session cannot continue; start a new one.
    #[error("server does not know session {0}")]
    SessionUnknown(SessionId),

    /// Session mode: the server forgot the session after it stayed disconnected longer than the
    /// server's time to live. Start a new session.
    #[error("session {0} expired on the server")]
    SessionExpired(SessionId),

    /// Session mode: a resume was refused because a side could not prove knowledge of the
    /// session secret (a wrong secret, a replayed handshake, or a server that is not the one the
    /// session was made with). The session cannot continue.
    #[error("session authentication failed: {0}")]
    AuthenticationFailed(&'static str),

    /// Session mode: the peer closed the session with CLOSE (see
    /// [`CloseCode`](crate::proto::CloseCode) for what each code means). Not a transport loss:
    /// the pipe does not reconnect.
    #[error("session closed by peer: {code}: {reason:?}")]
    ClosedByPeer {
        /// The peer's close code.
        code: CloseCode,
        /// The peer's reason, as sent.
        reason: String,
    },

    /// Session mode: the peer broke the protocol (bytes that are not a valid frame, a frame out
    /// of place, an acknowledgement of bytes never sent). The session is closed with the matching
    /// close code; the peer is broken or hostile.
    #[error("peer violated the session protocol: {0}")]
    Protocol(String),

    /// Session mode: the transport failed while a connection was being set up (refused,
    /// reset, closed mid-handshake). A client retries; a server drops that connection.
    #[error("transport failed")]
    Io(#[source] Arc<io::Error>),

    /// Session mode: the handshake did not finish within the configured time.
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
}

impl Error {
    /// True if the error means the stream can never continue (the pipe has failed for good).
    pub fn is_terminal(&self) -> bool {
        match self {
            Error::InvalidSequenceNumber { .. }
            | Error::FutureSequence { .. }
            | Error::ReplayDataUnavailable { .. }
            | Error::SessionUnknown(_)
            | Error::SessionExpired(_)
            | Error::AuthenticationFailed(_)
            | Error::Protocol(_) => true,
            Error::ClosedByPeer { code, .. } => !code.session_survives(),
            Error::ReconnectWriterFailed(inner) => inner.is_terminal(),
            _ => false,
        }
    }

    /// Wraps a reconnector's error; one of ours passes through unchanged, so that a terminal
    /// error (an unknown session, say) stays terminal.
    pub(crate) fn reconnect_failed(source: impl Into<BoxError>) -> Self {
        match source.into().downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => Error::ReconnectFailed(Arc::from(other)),
        }
    }

    /// Wraps a transport error met while setting up a connection.
    pub(crate) fn io(err: io::Error) -> Self {
        Error::Io(Arc::new(err))
    }

    /// The crate error an `io::Error` carries, if it was made from one.
    pub(crate) fn from_io(err: &io::Error) -> Option<&Error> {
        err.get_ref().and_then(|e| e.downcast_ref::<Error>())
    }

    fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::PipeClosed | Error::WriterClosed | Error::WriteAfterShutdown => {
                io::ErrorKind::BrokenPipe
            }
            Error::SessionUnknown(_) | Error::SessionExpired(_) => io::ErrorKind::NotFound,
            Error::AuthenticationFailed(_) => io::ErrorKind::PermissionDenied,
            Error::ClosedByPeer { .. } => io::ErrorKind::ConnectionAborted,
            Error::HandshakeTimeout(_) => io::ErrorKind::TimedOut,
            Error::Io(err) => err.kind(),
            Error::Protocol(_) => io::ErrorKind::InvalidData,
            Error::NotEnoughData { .. } | Error::InvalidCapacity => io::ErrorKind::InvalidInput,
            Error::InvalidSequenceNumber { .. }
            | Error::FutureSequence { .. }
            | Error::ReplayDataUnavailable { .. } => io::ErrorKind::InvalidData,
            Error::ReconnectWriterFailed(inner) => inner.io_kind(),
            _ => io::ErrorKind::Other,
        }
    }
}

impl From<Error> for io::Error {
    /// Wraps the error so that `io::Error::get_ref` can be downcast back to [`Error`].
    fn from(err: Error) -> Self {
        io::Error::new(err.io_kind(), err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats every variant, so a broken `Display` or `Debug` shows up here.
    #[test]
    fn smoke_every_variant_formats() {
        let all = [
            Error::PipeClosed,
            Error::PipeAlreadyConnected,
            Error::ReconnectionInProgress,
            Error::reconnect_failed("dial refused"),
            Error::InvalidSequenceNumber {
                remote: 9,
                local: 3,
            },
            Error::ReconnectWriterFailed(Box::new(Error::WriterClosed)),
            Error::WriterClosed,
            Error::FutureSequence {
                requested: 9,
                written: 3,
            },
            Error::ReplayDataUnavailable {
                requested: 0,
                oldest: 6,
            },
            Error::ReplayFailed(Arc::new(io::Error::other("boom"))),
            Error::PartialReplay {
                written: 0,
                expected: 4,
            },
            Error::NotEnoughData {
                requested: 15,
                available: 10,
            },
            Error::InvalidCapacity,
            Error::NoRuntime,
            Error::WriteAfterShutdown,
            Error::SessionUnknown(SessionId::from_bytes([1; 16])),
            Error::SessionExpired(SessionId::from_bytes([2; 16])),
            Error::AuthenticationFailed("wrong proof"),
            Error::ClosedByPeer {
                code: CloseCode::Normal,
                reason: "bye".into(),
            },
            Error::Protocol("unknown frame type 0x7f".into()),
            Error::HandshakeTimeout(Duration::from_secs(10)),
            Error::Io(Arc::new(io::ErrorKind::ConnectionRefused.into())),
        ];
        for err in all {
            assert!(!err.to_string().is_empty());
            assert!(!format!("{err:?}").is_empty());
            let io: io::Error = err.clone().into();
            let back = io.get_ref().and_then(|e| e.downcast_ref::<Error>());
            assert_eq!(back.map(ToString::to_string), Some(err.to_string()));
        }
    }
}
