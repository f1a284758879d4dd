//! Running the handshake state machines of [`proto`](crate::proto) over a transport: read
//! frames, feed them, write answers, and turn failures into the crate's [`Error`] after sending
//! the peer its CLOSE.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::Error;
use crate::proto::{
    ClientHandshake, CloseCode, Established, Frame, FrameDecoder, HandshakeError, HandshakeFailure,
    Secret, SessionId,
};
use crate::transport::BoxIo;

/// Room made in the decoder's buffer for each handshake read.
const HANDSHAKE_READ: usize = 4096;

/// Reads until the decoder yields a frame. A decode error is answered with its CLOSE.
pub(crate) async fn read_frame(io: &mut BoxIo, decoder: &mut FrameDecoder) -> Result<Frame, Error> {
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(err) => {
                send_close(io, Frame::close(err.close_code(), err.to_string())).await;
                return Err(Error::Protocol(err.to_string()));
            }
        }
        let Some(buf) = decoder.receive_buffer() else {
            return Err(Error::Protocol("decoder failed".into()));
        };
        buf.reserve(HANDSHAKE_READ);
        let n = io.read_buf(buf).await.map_err(Error::io)?;
        if n == 0 {
            return Err(Error::io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Writes one frame and flushes it.
pub(crate) async fn write_frame(io: &mut BoxIo, frame: &Frame) -> Result<(), Error> {
    io.write_all(&frame.to_vec()).await.map_err(Error::io)?;
    io.flush().await.map_err(Error::io)
}

/// Sends a CLOSE as a courtesy; the connection is being dropped anyway, so failures are ignored.
pub(crate) async fn send_close(io: &mut BoxIo, close: Frame) {
    let _ = write_frame(io, &close).await;
}

/// Sends the failure's CLOSE (if any) and returns the error it stands for. `session` is the
/// session a client tried to resume, so that the server's refusal names it.
pub(crate) async fn fail(
    io: &mut BoxIo,
    failure: HandshakeFailure,
    session: Option<SessionId>,
) -> Error {
    if let Some(close) = failure.close {
        send_close(io, close).await;
    }
    handshake_error(failure.error, session)
}

/// The crate error for a failed handshake.
fn handshake_error(err: HandshakeError, session: Option<SessionId>) -> Error {
    match err {
        HandshakeError::UnknownSession(id) => Error::SessionUnknown(id),
        HandshakeError::SessionExpired(id) => Error::SessionExpired(id),
        HandshakeError::AuthenticationFailed => {
            Error::AuthenticationFailed("the client's proof did not verify")
        }
        HandshakeError::ReplayedResume { .. } => {
            Error::AuthenticationFailed("a resume was replayed (its attempt number was used)")
        }
        HandshakeError::ServerAuthenticationFailed => {
            Error::AuthenticationFailed("the server's proof did not verify")
        }
        HandshakeError::ClosedByPeer { code, reason } => match (code, session) {
            (CloseCode::UnknownSession, Some(id)) => Error::SessionUnknown(id),
            (CloseCode::SessionExpired, Some(id)) => Error::SessionExpired(id),
            (CloseCode::AuthenticationFailed, _) => {
                Error::AuthenticationFailed("the server refused the proof")
            }
            _ => Error::ClosedByPeer { code, reason },
        },
        HandshakeError::Random(message) => Error::io(std::io::Error::other(message)),
        other => Error::Protocol(other.to_string()),
    }
}

/// Client: asks for a new session.
pub(crate) async fn client_new(io: &mut BoxIo) -> Result<(Established, FrameDecoder), Error> {
    let (state, hello) = ClientHandshake::new_session();
    write_frame(io, &hello).await?;
    let mut decoder = FrameDecoder::handshake();
    let frame = read_frame(io, &mut decoder).await?;
    match state.handle_frame(frame) {
        Ok(established) => Ok((established, decoder)),
        Err(failure) => Err(fail(io, failure, None).await),
    }
}

/// Client: resumes `session_id` with this attempt number, having delivered `reader_seq` bytes of
/// the server's stream. One round trip: the HELLO carries the proof.
pub(crate) async fn client_resume(
    io: &mut BoxIo,
    session_id: SessionId,
    secret: Secret,
    attempt: u64,
    reader_seq: u64,
) -> Result<(Established, FrameDecoder), Error> {
    let (state, hello) = ClientHandshake::resume(session_id, secret, attempt, reader_seq);
    write_frame(io, &hello).await?;
    let mut decoder = FrameDecoder::handshake();
    let frame = read_frame(io, &mut decoder).await?;
    match state.handle_frame(frame) {
        Ok(established) => Ok((established, decoder)),
        Err(failure) => Err(fail(io, failure, Some(session_id)).await),
    }
}
