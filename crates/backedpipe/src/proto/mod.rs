//! The session protocol's wire layer, sans-IO: frames, their streaming decoder, and the
//! handshake state machines.
//!
//! This module owns the bytes on the wire and nothing else. It has no tokio, no sockets and no
//! clock: every input is bytes or a [`Frame`], every output is a frame (or bytes) to send, a
//! state, or a typed error. Given the same inputs it produces the same outputs (the server's
//! randomness can be injected with [`ServerHandshake::with_random`]), so it is tested without a
//! network and fuzzed. `docs/PROTOCOL.md` specifies every byte; its examples are checked against
//! this code by a test.
//!
//! The parts:
//! - [`Frame`] and [`FrameType`]: the wire format as types, with [`Frame::encode`] and
//!   [`Frame::decode`];
//! - [`FrameDecoder`]: bytes in arbitrary chunks to frames, with the hard maximum
//!   [`MAX_FRAME_PAYLOAD`];
//! - [`ClientHandshake`] and [`ServerHandshake`]: the handshake as `Expect*` states that consume
//!   themselves, ending in an [`Established`] session;
//! - [`DecodeError`], [`HandshakeError`] and [`CloseCode`]: what went wrong, and the CLOSE code to
//!   send for it.
//!
//! # Order of use
//!
//! 1. On a new transport, the client calls [`ClientHandshake::new_session`] or
//!    [`ClientHandshake::resume`] and sends the HELLO; the server starts in
//!    [`ServerHandshake::new`].
//! 2. Each side decodes received bytes with its [`FrameDecoder`] and feeds each frame to its current
//!    state's `handle_frame`, sending what it returns, until it holds an [`Established`]: one
//!    frame each way, for a new session and for a resume alike. On a [`HandshakeFailure`], send
//!    its CLOSE (if any) and drop the transport. On the server, a resume passes through
//!    [`ResumeVerified`], where the caller records the attempt and checks the client's offset.
//! 3. Only then does stream data flow: DATA, ACK, PING/PONG, FIN and finally CLOSE, all through the
//!    same decoder. A [`DecodeError`] is answered with CLOSE carrying its
//!    [`close_code`](DecodeError::close_code); end of input inside a frame
//!    ([`FrameDecoder::finish`] returning [`TruncatedFrame`]) is transport loss: reconnect and
//!    resume.
//!
//! ```
//! use backedpipe::proto::*;
//!
//! // Client and server agree on a new session.
//! let (client, hello) = ClientHandshake::new_session();
//! let mut server_decoder = FrameDecoder::new();
//! server_decoder.push(&hello.to_vec());
//! let hello = server_decoder.next_frame()?.expect("a whole frame");
//! let mut no_sessions = |_: &SessionId| SessionLookup::Unknown;
//! let (server, welcome) = ServerHandshake::new()
//!     .handle_frame(hello, &mut no_sessions)?
//!     .into_new_session()
//!     .expect("a new session");
//! let client = client.handle_frame(welcome)?;
//! assert_eq!(client.session_id(), server.session_id());
//!
//! // Data flows.
//! let mut client_decoder = FrameDecoder::new();
//! client_decoder.push(&Frame::data(&b"hi"[..]).to_vec());
//! assert_eq!(client_decoder.next_frame()?, Some(Frame::data(&b"hi"[..])));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod decoder;
mod error;
mod frame;
mod handshake;
mod ids;

pub use decoder::FrameDecoder;
pub use error::{CloseCode, DecodeError, HandshakeError, ProtoError, TruncatedFrame};
pub use frame::{
    Close, Frame, FrameHeader, FrameType, Hello, HEADER_LEN, MAGIC, MAX_CLOSE_REASON,
    MAX_FRAME_PAYLOAD, VERSION,
};
pub use handshake::{
    client_proof, server_proof, ClientHandshake, Established, ExpectHello, ExpectResumed,
    ExpectWelcome, HandshakeFailure, HelloOutcome, ResumeVerified, ServerHandshake, SessionLookup,
    SessionStore, Side, CLIENT_PROOF_LABEL, SERVER_PROOF_LABEL,
};
pub use ids::{Mac, Secret, SessionId};
