//! The handshake as sans-IO state machines: each state is a type named for the frame it waits for
//! (`Expect*`), and handling a frame consumes the state and returns the next one, the frame to send,
//! or a [`HandshakeFailure`] carrying the CLOSE to send.
//!
//! ```text
//! client                                   server
//! ClientHandshake::new_session ── HELLO(new) ──▶ ExpectHello
//! ExpectWelcome ◀──────────── WELCOME(id, secret) ── Established
//! Established
//!
//! ClientHandshake::resume ─ HELLO(resume, id, cseq) ─▶ ExpectHello (looks up id)
//! ExpectChallenge ◀──────────── CHALLENGE(nonce) ── ExpectProof
//! ExpectResumed ── PROOF(client_proof) ──────────▶ ResumeVerified (caller checks cseq)
//! Established ◀── RESUMED(sseq, server_proof) ─── Established
//! ```
//!
//! Only these transitions produce an [`Established`], whose constructor is private, so no stream
//! data can be sent or accepted before the resume was authenticated.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac as _};
use sha2::Sha256;

use super::error::HandshakeError;
use super::frame::{Frame, Hello};
use super::{CloseCode, Mac, Nonce, Secret, SessionId};

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

/// The client's PROOF: `HMAC-SHA256(secret, "backedpipe resume client" || session id || nonce ||
/// client reader seq as u64 BE)`. Every input has a fixed length, so the concatenation is
/// unambiguous.
///
/// ```
/// use backedpipe::proto::{client_proof, server_proof, Nonce, Secret, SessionId};
///
/// let (secret, id, nonce) = (Secret::from_bytes([1; 32]), SessionId::from_bytes([2; 16]),
///                            Nonce::from_bytes([3; 32]));
/// assert_eq!(client_proof(&secret, &id, &nonce, 10), client_proof(&secret, &id, &nonce, 10));
/// assert_ne!(client_proof(&secret, &id, &nonce, 10), client_proof(&secret, &id, &nonce, 11));
/// assert_ne!(client_proof(&secret, &id, &nonce, 10).as_bytes(),
///            server_proof(&secret, &id, &nonce, 10, 0).as_bytes());
/// ```
pub fn client_proof(
    secret: &Secret,
    session_id: &SessionId,
    nonce: &Nonce,
    client_reader_seq: u64,
) -> Mac {
    hmac(
        secret,
        &[
            CLIENT_PROOF_LABEL,
            session_id.as_bytes(),
            nonce.as_bytes(),
            &client_reader_seq.to_be_bytes(),
        ],
    )
}

/// The server's RESUMED MAC: `HMAC-SHA256(secret, "backedpipe resume server" || session id ||
/// nonce || client reader seq as u64 BE || server reader seq as u64 BE)`. It binds both sequence
/// numbers, so neither can be altered on the wire.
pub fn server_proof(
    secret: &Secret,
    session_id: &SessionId,
    nonce: &Nonce,
    client_reader_seq: u64,
    server_reader_seq: u64,
) -> Mac {
    hmac(
        secret,
        &[
            SERVER_PROOF_LABEL,
            session_id.as_bytes(),
            nonce.as_bytes(),
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
/// use backedpipe::proto::{ClientHandshake, Frame, Secret, SessionId};
///
/// let (_state, hello) = ClientHandshake::resume(SessionId::from_bytes([1; 16]),
///                                               Secret::from_bytes([2; 32]), 99);
/// assert_eq!(hello, Frame::hello_resume(SessionId::from_bytes([1; 16]), 99));
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
    /// stream: send the returned HELLO, then feed the server's answer to [`ExpectChallenge`].
    pub fn resume(
        session_id: SessionId,
        secret: Secret,
        client_reader_seq: u64,
    ) -> (ExpectChallenge, Frame) {
        (
            ExpectChallenge {
                session_id,
                secret,
                client_reader_seq,
            },
            Frame::hello_resume(session_id, client_reader_seq),
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

/// Client, resume: waiting for CHALLENGE.
#[derive(Debug)]
pub struct ExpectChallenge {
    session_id: SessionId,
    secret: Secret,
    client_reader_seq: u64,
}

impl ExpectChallenge {
    /// Handles the server's frame: CHALLENGE yields the PROOF to send and the next state; a CLOSE
    /// (for instance [`CloseCode::UnknownSession`]) or anything else fails.
    pub fn handle_frame(self, frame: Frame) -> Result<(ExpectResumed, Frame), HandshakeFailure> {
        match frame {
            Frame::Challenge(nonce) => {
                let proof = client_proof(
                    &self.secret,
                    &self.session_id,
                    &nonce,
                    self.client_reader_seq,
                );
                Ok((
                    ExpectResumed {
                        session_id: self.session_id,
                        secret: self.secret,
                        client_reader_seq: self.client_reader_seq,
                        nonce,
                    },
                    Frame::Proof(proof),
                ))
            }
            other => Err(unexpected("CHALLENGE", other)),
        }
    }
}

/// Client, resume: PROOF sent, waiting for RESUMED.
#[derive(Debug)]
pub struct ExpectResumed {
    session_id: SessionId,
    secret: Secret,
    client_reader_seq: u64,
    nonce: Nonce,
}

impl ExpectResumed {
    /// Handles the server's frame: a RESUMED whose MAC verifies (constant-time) establishes the
    /// session; a wrong MAC is [`HandshakeError::ServerAuthenticationFailed`].
    pub fn handle_frame(self, frame: Frame) -> Result<Established, HandshakeFailure> {
        match frame {
            Frame::Resumed {
                server_reader_seq,
                mac,
            } => {
                let expected = server_proof(
                    &self.secret,
                    &self.session_id,
                    &self.nonce,
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
        /// How many bytes of the client's stream the server has delivered.
        server_reader_seq: u64,
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

/// A source of random bytes for the server (session ids, secrets, nonces).
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
    /// The client wants to resume a known session: send `challenge`, then feed the reply to
    /// `next`.
    Challenge {
        /// The next state.
        next: ExpectProof,
        /// The CHALLENGE to send.
        challenge: Frame,
    },
}

impl HelloOutcome {
    /// The new session and its WELCOME, or `None` if this is a resume.
    pub fn into_new_session(self) -> Option<(Established, Frame)> {
        match self {
            HelloOutcome::NewSession {
                established,
                welcome,
            } => Some((established, welcome)),
            HelloOutcome::Challenge { .. } => None,
        }
    }

    /// The resume state and its CHALLENGE, or `None` if this is a new session.
    pub fn into_challenge(self) -> Option<(ExpectProof, Frame)> {
        match self {
            HelloOutcome::Challenge { next, challenge } => Some((next, challenge)),
            HelloOutcome::NewSession { .. } => None,
        }
    }
}

impl ExpectHello {
    /// Handles the client's first frame. A new-session HELLO creates a session (random id and
    /// secret); a resume HELLO looks the id up in `store` and answers with a fresh nonce, or fails
    /// with [`HandshakeError::UnknownSession`] / [`HandshakeError::SessionExpired`].
    ///
    /// The client reader seq in a resume HELLO is accepted as is here; it is checked by the caller
    /// after authentication (see [`ResumeVerified`]).
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
                client_reader_seq,
            }) => {
                let (secret, server_reader_seq) = match store.lookup(&session_id) {
                    SessionLookup::Found {
                        secret,
                        server_reader_seq,
                    } => (secret, server_reader_seq),
                    SessionLookup::Unknown => {
                        return Err(HandshakeError::UnknownSession(session_id).into())
                    }
                    SessionLookup::Expired => {
                        return Err(HandshakeError::SessionExpired(session_id).into())
                    }
                };
                let mut nonce = [0u8; 32];
                (self.random)(&mut nonce)?;
                let nonce = Nonce::from_bytes(nonce);
                Ok(HelloOutcome::Challenge {
                    next: ExpectProof {
                        session_id,
                        secret,
                        client_reader_seq,
                        server_reader_seq,
                        nonce,
                    },
                    challenge: Frame::Challenge(nonce),
                })
            }
            other => Err(unexpected("HELLO", other)),
        }
    }
}

/// Server, resume: CHALLENGE sent, waiting for PROOF.
#[derive(Debug)]
pub struct ExpectProof {
    session_id: SessionId,
    secret: Secret,
    client_reader_seq: u64,
    server_reader_seq: u64,
    nonce: Nonce,
}

impl ExpectProof {
    /// The nonce sent in CHALLENGE.
    pub fn nonce(&self) -> &Nonce {
        &self.nonce
    }

    /// Handles the client's frame: a PROOF that verifies (constant-time, against this attempt's
    /// fresh nonce) yields [`ResumeVerified`]; a wrong one is
    /// [`HandshakeError::AuthenticationFailed`].
    pub fn handle_frame(self, frame: Frame) -> Result<ResumeVerified, HandshakeFailure> {
        match frame {
            Frame::Proof(mac) => {
                let expected = client_proof(
                    &self.secret,
                    &self.session_id,
                    &self.nonce,
                    self.client_reader_seq,
                );
                if mac != expected {
                    return Err(HandshakeError::AuthenticationFailed.into());
                }
                Ok(ResumeVerified { state: self })
            }
            other => Err(unexpected("PROOF", other)),
        }
    }
}

/// Proof that a client authenticated a resume. The only way for the server to an [`Established`]
/// resume.
///
/// Before accepting, the caller must check [`client_reader_seq`](Self::client_reader_seq) against
/// its replay buffer: it must lie in [oldest byte kept, next byte to send]. The MAC proves the
/// client knows the secret, not that its offset is sane. If it is not,
/// [`refuse`](Self::refuse) with [`CloseCode::ReplayUnavailable`].
///
/// ```
/// use backedpipe::proto::*;
///
/// let (id, secret) = (SessionId::from_bytes([1; 16]), Secret::from_bytes([2; 32]));
/// let (client, hello) = ClientHandshake::resume(id, secret.clone(), 5);
/// let mut store = |_: &SessionId| SessionLookup::Found { secret: secret.clone(), server_reader_seq: 9 };
/// let (server, challenge) = ServerHandshake::new().handle_frame(hello, &mut store).unwrap()
///     .into_challenge().unwrap();
/// let (client, proof) = client.handle_frame(challenge).unwrap();
/// let verified = server.handle_frame(proof).unwrap();
/// assert_eq!(verified.client_reader_seq(), 5); // check it against the replay buffer here
/// let (server_side, resumed) = verified.accept();
/// let client_side = client.handle_frame(resumed).unwrap();
/// assert_eq!(client_side.remote_reader_seq(), 9);
/// assert_eq!(server_side.remote_reader_seq(), 5);
/// ```
#[derive(Debug)]
pub struct ResumeVerified {
    state: ExpectProof,
}

impl ResumeVerified {
    /// The session being resumed.
    pub fn session_id(&self) -> SessionId {
        self.state.session_id
    }

    /// How many bytes of the server's stream the client says it delivered (authenticated, but to
    /// be checked against the replay buffer).
    pub fn client_reader_seq(&self) -> u64 {
        self.state.client_reader_seq
    }

    /// Accepts the resume: the established session and the RESUMED frame to send.
    pub fn accept(self) -> (Established, Frame) {
        let server_reader_seq = self.state.server_reader_seq;
        self.accept_at(server_reader_seq)
    }

    /// Accepts the resume with the server's reader offset taken now rather than at the lookup:
    /// a server whose old connection still delivers bytes while the client proves itself detaches
    /// that connection first and sends the offset of that instant (the client's proof does not
    /// cover it, the server's does).
    pub fn accept_at(self, server_reader_seq: u64) -> (Established, Frame) {
        let mut s = self.state;
        s.server_reader_seq = server_reader_seq;
        let mac = server_proof(
            &s.secret,
            &s.session_id,
            &s.nonce,
            s.client_reader_seq,
            s.server_reader_seq,
        );
        (
            Established {
                side: Side::Server,
                session_id: s.session_id,
                secret: s.secret,
                local_reader_seq: s.server_reader_seq,
                remote_reader_seq: s.client_reader_seq,
                resumed: true,
            },
            Frame::Resumed {
                server_reader_seq: s.server_reader_seq,
                mac,
            },
        )
    }

    /// Refuses the resume (typically [`CloseCode::ReplayUnavailable`]): the CLOSE frame to send.
    pub fn refuse(self, code: CloseCode, reason: impl Into<String>) -> Frame {
        Frame::close(code, reason)
    }
}
