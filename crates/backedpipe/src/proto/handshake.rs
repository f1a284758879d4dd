//! The handshake as sans-IO state machines: each state is a type named for the frame it waits for
//! (`Expect*`), and handling a frame consumes the state and returns the next one, the frame to send,
//! or a [`HandshakeFailure`] carrying the CLOSE to send. Either handshake is one frame each way.
//!
//! ```text
//! client                                   server
//! ClientHandshake::new_session ── HELLO(new) ──▶ ExpectHello
//! ExpectWelcome ◀──────────── WELCOME(id, secret) ── Established
//! Established
//!
//! ClientHandshake::resume ── HELLO(resume, id, attempt, cseq, proof) ──▶ ExpectHello
//!                                                   (looks up id, verifies proof and attempt)
//! ExpectResumed                                     ResumeVerified (caller records the attempt,
//!                                                   checks cseq)
//! Established ◀──────── RESUMED(sseq, mac) ──────── Established
//! ```
//!
//! Only these transitions produce an [`Established`], whose constructor is private, so no stream
//! data can be sent or accepted before the resume was authenticated.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac as _};
use sha2::Sha256;

use super::error::HandshakeError;
use super::frame::{Frame, Hello};
use super::{CloseCode, Mac, Secret, SessionId};

/// The label that opens the input of the client's resume MAC (24 bytes).
pub const CLIENT_PROOF_LABEL: &[u8; 24] = b"backedpipe resume client";
/// The label that opens the input of the server's resume MAC (24 bytes).
pub const SERVER_PROOF_LABEL: &[u8; 24] = b"backedpipe resume server";

fn hmac(secret: &Secret, parts: &[&[u8]]) -> Mac {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    Mac::from_bytes(mac.finalize().into_bytes().into())
}

/// The proof in a resume HELLO: `HMAC-SHA256(secret, "backedpipe resume client" || session id ||
/// attempt as u64 BE || client reader seq as u64 BE)`. Every input has a fixed length, so the
/// concatenation is unambiguous.
///
/// ```
/// use backedpipe::proto::{client_proof, server_proof, Secret, SessionId};
///
/// let (secret, id) = (Secret::from_bytes([1; 32]), SessionId::from_bytes([2; 16]));
/// assert_eq!(client_proof(&secret, &id, 1, 10), client_proof(&secret, &id, 1, 10));
/// assert_ne!(client_proof(&secret, &id, 1, 10), client_proof(&secret, &id, 1, 11));
/// assert_ne!(client_proof(&secret, &id, 1, 10), client_proof(&secret, &id, 2, 10));
/// assert_ne!(client_proof(&secret, &id, 1, 10).as_bytes(),
///            server_proof(&secret, &id, 1, 10, 0).as_bytes());
/// ```
pub fn client_proof(
    secret: &Secret,
    session_id: &SessionId,
    attempt: u64,
    client_reader_seq: u64,
) -> Mac {
    hmac(
        secret,
        &[
            CLIENT_PROOF_LABEL,
            session_id.as_bytes(),
            &attempt.to_be_bytes(),
            &client_reader_seq.to_be_bytes(),
        ],
    )
}

/// The server's RESUMED MAC: `HMAC-SHA256(secret, "backedpipe resume server" || session id ||
/// attempt as u64 BE || client reader seq as u64 BE || server reader seq as u64 BE)`. It binds
/// both sequence numbers, so neither can be altered on the wire, and the client's attempt, so a
/// RESUMED captured from one resume verifies in no other.
pub fn server_proof(
    secret: &Secret,
    session_id: &SessionId,
    attempt: u64,
    client_reader_seq: u64,
    server_reader_seq: u64,
) -> Mac {
    hmac(
        secret,
        &[
            SERVER_PROOF_LABEL,
            session_id.as_bytes(),
            &attempt.to_be_bytes(),
            &client_reader_seq.to_be_bytes(),
            &server_reader_seq.to_be_bytes(),
        ],
    )
}

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that sends HELLO (and reconnects).
    Client,
    /// The side that answers HELLO (and keeps sessions).
    Server,
}

/// A failed handshake: the error, and the CLOSE frame to send the peer before dropping the
/// connection (`None` when the peer already closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct HandshakeFailure {
    /// What went wrong.
    #[source]
    pub error: HandshakeError,
    /// The CLOSE to send, if any.
    pub close: Option<Frame>,
}

impl From<HandshakeError> for HandshakeFailure {
    fn from(error: HandshakeError) -> HandshakeFailure {
        let close = error
            .close_code()
            .map(|code| Frame::close(code, error.to_string()));
        HandshakeFailure { error, close }
    }
}

/// The failure for a frame the state did not expect: the peer's CLOSE ends the handshake quietly,
/// anything else is a protocol violation.
fn unexpected(expected: &'static str, frame: Frame) -> HandshakeFailure {
    match frame {
        Frame::Close(close) => HandshakeError::ClosedByPeer {
            code: close.code(),
            reason: close.reason().to_owned(),
        },
        other => HandshakeError::UnexpectedFrame {
            expected,
            got: other.frame_type(),
        },
    }
    .into()
}

/// A completed handshake: the session both sides now share. Stream data may flow only once one
/// exists; it cannot be built outside this module.
///
/// The reader sequence numbers say where each direction resumes. For a new session both are 0.
/// After a resume, [`remote_reader_seq`](Self::remote_reader_seq) is the peer's claim of how much of
/// *our* stream it has delivered: authenticated (bound into the MACs) but still hostile input. The
/// pipe must check it lies within [oldest byte still in its replay buffer, next byte to send] before
/// touching the buffer, and close with [`CloseCode::ReplayUnavailable`] otherwise.
///
/// ```
/// use backedpipe::proto::{ClientHandshake, ServerHandshake, SessionLookup, Side, Frame};
///
/// let (client, hello) = ClientHandshake::new_session();
/// let outcome = ServerHandshake::new()
///     .handle_frame(hello, &mut |_: &_| SessionLookup::Unknown)
///     .unwrap();
/// let (server_side, welcome) = outcome.into_new_session().unwrap();
/// let client_side = client.handle_frame(welcome).unwrap();
/// assert_eq!(client_side.session_id(), server_side.session_id());
/// assert_eq!(client_side.secret(), server_side.secret());
/// assert_eq!((client_side.side(), server_side.side()), (Side::Client, Side::Server));
/// assert!(!client_side.is_resume());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    side: Side,
    session_id: SessionId,
    secret: Secret,
    local_reader_seq: u64,
    remote_reader_seq: u64,
    resumed: bool,
}

impl Established {
    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The session's id.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The session's secret, for authenticating the next resume.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// How many bytes of the peer's stream this side has delivered (and told the peer): the peer
    /// replays from here.
    pub fn local_reader_seq(&self) -> u64 {
        self.local_reader_seq
    }

    /// How many bytes of this side's stream the peer says it has delivered: replay from here,
    /// after checking it against the replay buffer (see the type's docs).
    pub fn remote_reader_seq(&self) -> u64 {
        self.remote_reader_seq
    }

    /// Whether this resumed an existing session (rather than creating one).
    pub fn is_resume(&self) -> bool {
        self.resumed
    }
}

/// The client side's starting point.
///
/// ```
/// use backedpipe::proto::{client_proof, ClientHandshake, Frame, Secret, SessionId};
///
/// let (id, secret) = (SessionId::from_bytes([1; 16]), Secret::from_bytes([2; 32]));
/// let (_state, hello) = ClientHandshake::resume(id, secret.clone(), 3, 99);
/// assert_eq!(hello, Frame::hello_resume(id, 3, 99, client_proof(&secret, &id, 3, 99)));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ClientHandshake;

impl ClientHandshake {
    /// Starts a new session: send the returned HELLO, then feed the server's answer to
    /// [`ExpectWelcome`].
    pub fn new_session() -> (ExpectWelcome, Frame) {
        (ExpectWelcome { _private: () }, Frame::hello_new())
    }

    /// Starts resuming `session_id`, having delivered `client_reader_seq` bytes of the server's
    /// stream: send the returned HELLO (which carries the proof), then feed the server's answer
    /// to [`ExpectResumed`].
    ///
    /// `attempt` must be larger than in any earlier resume of this session by this client
    /// (count them from 1): the server refuses an attempt number it has seen, which is what
    /// defeats a replayed HELLO.
    pub fn resume(
        session_id: SessionId,
        secret: Secret,
        attempt: u64,
        client_reader_seq: u64,
    ) -> (ExpectResumed, Frame) {
        let proof = client_proof(&secret, &session_id, attempt, client_reader_seq);
        (
            ExpectResumed {
                session_id,
                secret,
                attempt,
                client_reader_seq,
            },
            Frame::hello_resume(session_id, attempt, client_reader_seq, proof),
        )
    }
}

/// Client, new session: waiting for WELCOME.
#[derive(Debug)]
pub struct ExpectWelcome {
    _private: (),
}

impl ExpectWelcome {
    /// Handles the server's frame: WELCOME establishes the session; anything else fails.
    pub fn handle_frame(self, frame: Frame) -> Result<Established, HandshakeFailure> {
        match frame {
            Frame::Welcome { session_id, secret } => Ok(Established {
                side: Side::Client,
                session_id,
                secret,
                local_reader_seq: 0,
                remote_reader_seq: 0,
                resumed: false,
            }),
            other => Err(unexpected("WELCOME", other)),
        }
    }
}

/// Client, resume: HELLO sent, waiting for RESUMED.
#[derive(Debug)]
pub struct ExpectResumed {
    session_id: SessionId,
    secret: Secret,
    attempt: u64,
    client_reader_seq: u64,
}

impl ExpectResumed {
    /// Handles the server's frame: a RESUMED whose MAC verifies (constant-time) establishes the
    /// session; a wrong MAC is [`HandshakeError::ServerAuthenticationFailed`]; a CLOSE (for
    /// instance [`CloseCode::UnknownSession`]) or any other frame fails.
    pub fn handle_frame(self, frame: Frame) -> Result<Established, HandshakeFailure> {
        match frame {
            Frame::Resumed {
                server_reader_seq,
                mac,
            } => {
                let expected = server_proof(
                    &self.secret,
                    &self.session_id,
                    self.attempt,
                    self.client_reader_seq,
                    server_reader_seq,
                );
                if mac != expected {
                    return Err(HandshakeError::ServerAuthenticationFailed.into());
                }
                Ok(Established {
                    side: Side::Client,
                    session_id: self.session_id,
                    secret: self.secret,
                    local_reader_seq: self.client_reader_seq,
                    remote_reader_seq: server_reader_seq,
                    resumed: true,
                })
            }
            other => Err(unexpected("RESUMED", other)),
        }
    }
}

/// What the server knows about a session id, as answered by a [`SessionStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionLookup {
    /// The session exists.
    Found {
        /// Its secret.
        secret: Secret,
        /// The largest resume attempt number accepted for it so far (0 before the first
        /// resume): a HELLO must carry a larger one.
        last_attempt: u64,
    },
    /// No such session.
    Unknown,
    /// The session existed but has expired.
    Expired,
}

/// The server's sessions, as the handshake needs them. Implemented for any
/// `FnMut(&SessionId) -> SessionLookup`.
pub trait SessionStore {
    /// Looks up a session by id.
    fn lookup(&mut self, session_id: &SessionId) -> SessionLookup;
}

impl<F: FnMut(&SessionId) -> SessionLookup> SessionStore for F {
    fn lookup(&mut self, session_id: &SessionId) -> SessionLookup {
        self(session_id)
    }
}

/// A source of random bytes for the server (session ids and secrets).
type RandomFn = Box<dyn FnMut(&mut [u8]) -> Result<(), HandshakeError> + Send>;

/// The server side's starting point: [`ServerHandshake::new`] gives the [`ExpectHello`] state.
#[derive(Debug, Clone, Copy)]
pub struct ServerHandshake;

impl ServerHandshake {
    /// Waits for a HELLO, drawing randomness from the operating system (`getrandom`).
    // Returns the state, not `Self`: the handshake starts in `ExpectHello`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> ExpectHello {
        ExpectHello {
            random: Box::new(|buf| {
                getrandom::fill(buf).map_err(|e| HandshakeError::Random(e.to_string()))
            }),
        }
    }

    /// Waits for a HELLO, drawing randomness from `random` (for deterministic tests and fuzzing;
    /// in production use [`new`](Self::new)). `random` must fill the whole buffer.
    pub fn with_random(random: impl FnMut(&mut [u8]) + Send + 'static) -> ExpectHello {
        let mut random = random;
        ExpectHello {
            random: Box::new(move |buf| {
                random(buf);
                Ok(())
            }),
        }
    }
}

/// Server: waiting for the client's HELLO.
pub struct ExpectHello {
    random: RandomFn,
}

impl fmt::Debug for ExpectHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpectHello").finish_non_exhaustive()
    }
}

/// What the server does after HELLO.
#[derive(Debug)]
pub enum HelloOutcome {
    /// A new session was created: send `welcome`; the session is established.
    NewSession {
        /// The new session (its secret must be stored for later resumes).
        established: Established,
        /// The WELCOME to send.
        welcome: Frame,
    },
    /// The client proved it holds a known session: record the attempt, check the offset and
    /// accept or refuse (see [`ResumeVerified`]).
    Resume(ResumeVerified),
}

impl HelloOutcome {
    /// The new session and its WELCOME, or `None` if this is a resume.
    pub fn into_new_session(self) -> Option<(Established, Frame)> {
        match self {
            HelloOutcome::NewSession {
                established,
                welcome,
            } => Some((established, welcome)),
            HelloOutcome::Resume(_) => None,
        }
    }

    /// The verified resume, or `None` if this is a new session.
    pub fn into_resume(self) -> Option<ResumeVerified> {
        match self {
            HelloOutcome::Resume(verified) => Some(verified),
            HelloOutcome::NewSession { .. } => None,
        }
    }
}

impl ExpectHello {
    /// Handles the client's first frame. A new-session HELLO creates a session (random id and
    /// secret). A resume HELLO looks the id up in `store` and verifies its proof (constant-time)
    /// and its attempt number; it fails with [`HandshakeError::UnknownSession`],
    /// [`HandshakeError::SessionExpired`], [`HandshakeError::AuthenticationFailed`] (a wrong
    /// proof) or [`HandshakeError::ReplayedResume`] (an attempt number not above the last one
    /// accepted: a captured HELLO sent again).
    ///
    /// The client reader seq in a resume HELLO is authenticated here but not judged; the caller
    /// checks it against its replay buffer (see [`ResumeVerified`]).
    pub fn handle_frame(
        mut self,
        frame: Frame,
        store: &mut impl SessionStore,
    ) -> Result<HelloOutcome, HandshakeFailure> {
        match frame {
            Frame::Hello(Hello::NewSession) => {
                let mut id = [0u8; 16];
                let mut secret = [0u8; 32];
                (self.random)(&mut id)?;
                (self.random)(&mut secret)?;
                let (session_id, secret) = (SessionId::from_bytes(id), Secret::from_bytes(secret));
                Ok(HelloOutcome::NewSession {
                    welcome: Frame::Welcome {
                        session_id,
                        secret: secret.clone(),
                    },
                    established: Established {
                        side: Side::Server,
                        session_id,
                        secret,
                        local_reader_seq: 0,
                        remote_reader_seq: 0,
                        resumed: false,
                    },
                })
            }
            Frame::Hello(Hello::Resume {
                session_id,
                attempt,
                client_reader_seq,
                proof,
            }) => {
                let (secret, last_attempt) = match store.lookup(&session_id) {
                    SessionLookup::Found {
                        secret,
                        last_attempt,
                    } => (secret, last_attempt),
                    SessionLookup::Unknown => {
                        return Err(HandshakeError::UnknownSession(session_id).into())
                    }
                    SessionLookup::Expired => {
                        return Err(HandshakeError::SessionExpired(session_id).into())
                    }
                };
                if proof != client_proof(&secret, &session_id, attempt, client_reader_seq) {
                    return Err(HandshakeError::AuthenticationFailed.into());
                }
                if attempt <= last_attempt {
                    return Err(HandshakeError::ReplayedResume {
                        attempt,
                        last_attempt,
                    }
                    .into());
                }
                Ok(HelloOutcome::Resume(ResumeVerified {
                    session_id,
                    secret,
                    attempt,
                    client_reader_seq,
                }))
            }
            other => Err(unexpected("HELLO", other)),
        }
    }
}

/// Proof that a client authenticated a resume. The only way for the server to an [`Established`]
/// resume.
///
/// Before accepting, the caller must
/// - record [`attempt`](Self::attempt) as the session's last accepted attempt, atomically with
///   checking that it is still larger than the one recorded (two resumes may race; the older
///   one is refused with [`HandshakeError::ReplayedResume`]'s close code), so that this HELLO
///   can never be accepted again;
/// - check [`client_reader_seq`](Self::client_reader_seq) against its replay buffer: it must lie
///   in [oldest byte kept, next byte to send]. The MAC proves the client knows the secret, not
///   that its offset is sane. If it is not, [`refuse`](Self::refuse) with
///   [`CloseCode::ReplayUnavailable`].
///
/// ```
/// use backedpipe::proto::*;
///
/// let (id, secret) = (SessionId::from_bytes([1; 16]), Secret::from_bytes([2; 32]));
/// let (client, hello) = ClientHandshake::resume(id, secret.clone(), 1, 5);
/// let mut store = |_: &SessionId| SessionLookup::Found { secret: secret.clone(), last_attempt: 0 };
/// let verified = ServerHandshake::new().handle_frame(hello, &mut store).unwrap()
///     .into_resume().unwrap();
/// assert_eq!(verified.attempt(), 1); // record it as the session's last attempt here
/// assert_eq!(verified.client_reader_seq(), 5); // check it against the replay buffer here
/// let (server_side, resumed) = verified.accept(9);
/// let client_side = client.handle_frame(resumed).unwrap();
/// assert_eq!(client_side.remote_reader_seq(), 9);
/// assert_eq!(server_side.remote_reader_seq(), 5);
/// ```
#[derive(Debug)]
pub struct ResumeVerified {
    session_id: SessionId,
    secret: Secret,
    attempt: u64,
    client_reader_seq: u64,
}

impl ResumeVerified {
    /// The session being resumed.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The client's attempt number, larger than any accepted before for this session.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// How many bytes of the server's stream the client says it delivered (authenticated, but to
    /// be checked against the replay buffer).
    pub fn client_reader_seq(&self) -> u64 {
        self.client_reader_seq
    }

    /// Accepts the resume: the established session and the RESUMED frame to send.
    /// `server_reader_seq` is the number of bytes of the client's stream the server has delivered
    /// to its application, taken once the session's previous transport was detached (so no more
    /// bytes arrive through it).
    pub fn accept(self, server_reader_seq: u64) -> (Established, Frame) {
        let mac = server_proof(
            &self.secret,
            &self.session_id,
            self.attempt,
            self.client_reader_seq,
            server_reader_seq,
        );
        (
            Established {
                side: Side::Server,
                session_id: self.session_id,
                secret: self.secret,
                local_reader_seq: server_reader_seq,
                remote_reader_seq: self.client_reader_seq,
                resumed: true,
            },
            Frame::Resumed {
                server_reader_seq,
                mac,
            },
        )
    }

    /// Refuses the resume (typically [`CloseCode::ReplayUnavailable`]): the CLOSE frame to send.
    pub fn refuse(self, code: CloseCode, reason: impl Into<String>) -> Frame {
        Frame::close(code, reason)
    }
}
