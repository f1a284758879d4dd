//! The server side of session mode: runs handshakes on the transports it is given, creates
//! sessions, attaches resumes to them, and forgets sessions that stay disconnected too long.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use super::connection::Connection;
use super::driver::{Driver, Registration};
use super::establish::{fail, read_frame, send_close, write_frame};
use super::options::SessionOptions;
use super::shared::{now, Shared, State};
use super::stream::Session;
use crate::error::{Error, Result};
use crate::proto::{
    CloseCode, Frame, FrameDecoder, HandshakeError, HelloOutcome, ResumeVerified, Secret,
    ServerHandshake, SessionId, SessionLookup, Side,
};
use crate::transport::{BoxIo, Io};

/// How many expired session ids a server remembers, to tell their clients "expired" rather
/// than "unknown".
const EXPIRED_MEMORY: usize = 4096;

/// What [`SessionServer::accept`] did with a transport.
#[derive(Debug)]
#[non_exhaustive]
pub enum Accepted {
    /// A client started a new session: hand it to the application.
    New(Session),
    /// A client resumed this existing session; its [`Session`] carries on over the new
    /// transport and the application has nothing to do.
    Resumed(SessionId),
}

/// Accepts session-mode transports: new sessions go to the application, resumes to their
/// session. Cheap to clone (one shared table).
///
/// Handshakes run in the caller's task, one per [`accept`](Self::accept) call, each bounded by
/// the handshake timeout; spawn a task per transport so a slow client delays nobody else.
/// A resume is checked completely (the client's proof, its offset) before the session's live
/// transport is touched, so a forged or failed resume changes nothing.
///
/// See [`Session`] for an example.
#[derive(Debug, Clone)]
pub struct SessionServer {
    inner: Arc<ServerInner>,
}

#[derive(Debug)]
pub(crate) struct ServerInner {
    options: SessionOptions,
    table: Mutex<Table>,
}

impl ServerInner {
    /// A session's driver ended: forget it (remembering that it expired, if it did).
    pub(crate) fn forget(&self, id: SessionId, expired: bool) {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(id, expired);
    }
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<SessionId, Entry>,
    expired: HashSet<SessionId>,
    expired_order: VecDeque<SessionId>,
}

#[derive(Debug)]
struct Entry {
    secret: Secret,
    /// The largest resume attempt number accepted: a HELLO must carry a larger one.
    last_attempt: u64,
    session: Weak<Shared>,
}

/// What a verified resume finds when it claims its attempt number.
#[derive(Debug)]
enum Claim {
    /// The attempt is recorded as the session's latest: its shared state.
    Live(Arc<Shared>),
    /// The session expired or closed since the lookup.
    Gone,
    /// A resume with this newer attempt number was accepted since the lookup.
    Stale {
        /// The attempt number recorded.
        last_attempt: u64,
    },
}

/// Why a verified resume may not detach its session's path.
#[derive(Debug)]
enum Refusal {
    /// A newer attempt (this one) detached it first.
    Stale(u64),
    /// The session ended.
    Gone,
    /// The session is closing: its client is owed the CLOSE.
    Closed,
    /// The client's offset is outside what the session holds.
    Offset(Error),
}

impl Table {
    /// Records `attempt` as the session's last accepted resume attempt if it is newer than the
    /// one recorded (checked and recorded under one lock, so of two racing resumes only the
    /// newer can win).
    fn claim_attempt(&mut self, id: SessionId, attempt: u64) -> Claim {
        let Some(entry) = self.sessions.get_mut(&id) else {
            return Claim::Gone;
        };
        if attempt <= entry.last_attempt {
            return Claim::Stale {
                last_attempt: entry.last_attempt,
            };
        }
        entry.last_attempt = attempt;
        match entry.session.upgrade() {
            Some(session) => Claim::Live(session),
            None => Claim::Gone,
        }
    }

    fn forget(&mut self, id: SessionId, expired: bool) {
        self.sessions.remove(&id);
        if expired && self.expired.insert(id) {
            self.expired_order.push_back(id);
            if self.expired_order.len() > EXPIRED_MEMORY {
                if let Some(oldest) = self.expired_order.pop_front() {
                    self.expired.remove(&oldest);
                }
            }
        }
    }
}

impl SessionServer {
    /// A server with no sessions.
    pub fn new(options: SessionOptions) -> Self {
        SessionServer {
            inner: Arc::new(ServerInner {
                options,
                table: Mutex::new(Table::default()),
            }),
        }
    }

    /// The number of sessions held (connected or waiting for their client).
    pub fn session_count(&self) -> usize {
        self.table().sessions.len()
    }

    /// Runs the server handshake on `io`, a transport a client just opened.
    ///
    /// # Errors
    /// The handshake's failure, after the client was sent the matching CLOSE:
    /// [`Error::SessionUnknown`], [`Error::SessionExpired`], [`Error::AuthenticationFailed`],
    /// [`Error::ReplayDataUnavailable`] (the client is further behind than the session can
    /// replay), [`Error::PipeClosed`] (the session is closing: the client was sent its CLOSE),
    /// [`Error::ReconnectionInProgress`] (a newer resume of the session took over),
    /// [`Error::Protocol`], [`Error::HandshakeTimeout`], [`Error::Io`]. None of them affects
    /// any session but the one that was closing.
    pub async fn accept(&self, io: impl Io) -> Result<Accepted> {
        let timeout = self.inner.options.handshake_timeout;
        let mut io: BoxIo = Box::new(io);
        match tokio::time::timeout(timeout, self.handshake(&mut io)).await {
            Ok(result) => result,
            Err(_) => {
                send_close(
                    &mut io,
                    Frame::close(CloseCode::ProtocolViolation, "handshake timed out"),
                )
                .await;
                Err(Error::HandshakeTimeout(timeout))
            }
        }
    }

    async fn handshake(&self, io: &mut BoxIo) -> Result<Accepted> {
        let mut decoder = FrameDecoder::handshake();
        let hello = read_frame(io, &mut decoder).await?;
        let mut lookup = |id: &SessionId| {
            let table = self.table();
            match table.sessions.get(id) {
                Some(entry) => SessionLookup::Found {
                    secret: entry.secret.clone(),
                    last_attempt: entry.last_attempt,
                },
                None if table.expired.contains(id) => SessionLookup::Expired,
                None => SessionLookup::Unknown,
            }
        };
        let outcome = match ServerHandshake::new().handle_frame(hello, &mut lookup) {
            Ok(outcome) => outcome,
            Err(failure) => return Err(fail(io, failure, None).await),
        };
        match outcome {
            HelloOutcome::NewSession {
                established,
                welcome,
            } => {
                write_frame(io, &welcome).await?;
                let id = established.session_id();
                let options = &self.inner.options;
                let now = now();
                let mut conn = Connection::new(Side::Server, id, options, now)?;
                conn.start_path(now, decoder, established.remote_reader_seq())?;
                let io = std::mem::replace(io, Box::new(tokio::io::empty()));
                let shared = Shared::new(conn, Some(io));
                self.table().sessions.insert(
                    id,
                    Entry {
                        secret: established.secret().clone(),
                        last_attempt: 0,
                        session: Arc::downgrade(&shared),
                    },
                );
                let registration = Registration {
                    server: Arc::downgrade(&self.inner),
                };
                tokio::spawn(Driver::new(shared.clone(), None, Some(registration)).run());
                tracing::debug!(session = %id, "new session");
                Ok(Accepted::New(Session::new(shared, options.close_timeout)))
            }
            HelloOutcome::Resume(verified) => self.resume(io, decoder, verified).await,
        }
    }

    /// Attaches a verified resume to its session: the attempt is recorded, the client's offset
    /// checked, and only then is the live transport dropped and the server's offset taken at
    /// that instant.
    async fn resume(
        &self,
        io: &mut BoxIo,
        decoder: FrameDecoder,
        verified: ResumeVerified,
    ) -> Result<Accepted> {
        let id = verified.session_id();
        let attempt = verified.attempt();
        // Record the attempt, so this HELLO is never accepted again, checking it against the
        // number recorded now: a resume racing this one may have been newer.
        let claim = self.table().claim_attempt(id, attempt);
        let shared = match claim {
            Claim::Live(shared) => shared,
            Claim::Stale { last_attempt } => {
                let error = HandshakeError::ReplayedResume {
                    attempt,
                    last_attempt,
                };
                return Err(fail(io, error.into(), None).await);
            }
            Claim::Gone => {
                let close = verified.refuse(CloseCode::UnknownSession, "unknown session");
                send_close(io, close).await;
                return Err(Error::SessionUnknown(id));
            }
        };
        let client_offset = verified.client_reader_seq();
        let detached = shared.with(|st, now| detach(st, now, attempt, client_offset));
        let server_offset = match detached {
            Ok(offset) => offset,
            Err(Refusal::Stale(last_attempt)) => {
                let error = HandshakeError::ReplayedResume {
                    attempt,
                    last_attempt,
                };
                return Err(fail(io, error.into(), None).await);
            }
            Err(Refusal::Gone) => {
                send_close(
                    io,
                    verified.refuse(CloseCode::UnknownSession, "unknown session"),
                )
                .await;
                return Err(Error::SessionUnknown(id));
            }
            Err(Refusal::Closed) => {
                // The CLOSE the session owed its client, delivered in place of RESUMED.
                send_close(io, verified.refuse(CloseCode::Normal, "closed")).await;
                return Err(Error::PipeClosed);
            }
            Err(Refusal::Offset(err)) => {
                let close = verified.refuse(CloseCode::ReplayUnavailable, err.to_string());
                send_close(io, close).await;
                return Err(err);
            }
        };
        let (established, resumed) = verified.accept(server_offset);
        write_frame(io, &resumed).await?;
        let mut transport = Some(std::mem::replace(io, Box::new(tokio::io::empty())));
        let peer_offset = established.remote_reader_seq();
        let attached =
            shared.with(|st, now| attach(st, now, attempt, decoder, peer_offset, &mut transport));
        if let Err(err) = attached {
            if let (Error::PipeClosed, Some(mut transport)) = (&err, transport) {
                // Closed while RESUMED was on its way: the CLOSE the session owes its client
                // goes on this transport, as it would have in place of RESUMED.
                send_close(&mut transport, Frame::close(CloseCode::Normal, "closed")).await;
            }
            return Err(err);
        }
        tracing::debug!(session = %id, client = client_offset, server = server_offset, "session resumed");
        Ok(Accepted::Resumed(id))
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A verified resume's first step on its session: the live path is detached (the server's
/// offset is taken at that instant and returned), unless a newer resume already did (the two
/// raced from the claim to here) or the session is over.
fn detach(st: &mut State, now: Instant, attempt: u64, client_offset: u64) -> Result<u64, Refusal> {
    if attempt <= st.latest_attempt {
        return Err(Refusal::Stale(st.latest_attempt));
    }
    if st.conn.is_ended() {
        return Err(Refusal::Gone);
    }
    if st.conn.is_closing() {
        return Err(Refusal::Closed);
    }
    st.conn
        .check_resume(client_offset)
        .map_err(Refusal::Offset)?;
    st.latest_attempt = attempt;
    st.conn.handle_transport_lost(now);
    Ok(st.conn.resume_offset())
}

/// The resume's last step, once RESUMED was sent: its transport becomes the session's path,
/// unless a newer resume detached the path since.
///
/// # Errors
/// [`Error::ReconnectionInProgress`] if a newer resume took over; the session's end if it
/// ended meanwhile.
fn attach(
    st: &mut State,
    now: Instant,
    attempt: u64,
    decoder: FrameDecoder,
    peer_offset: u64,
    io: &mut Option<BoxIo>,
) -> Result<()> {
    if st.latest_attempt != attempt {
        return Err(Error::ReconnectionInProgress);
    }
    st.conn.start_path(now, decoder, peer_offset)?;
    if let Some(io) = io.take() {
        st.attach(io);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn of_two_racing_resumes_only_the_newer_attempt_can_claim_the_session() {
        let id = SessionId::from_bytes([1; 16]);
        let options = SessionOptions::default();
        let conn = Connection::new(Side::Server, id, &options, now()).unwrap();
        let shared = Shared::new(conn, None);
        let mut table = Table::default();
        table.sessions.insert(
            id,
            Entry {
                secret: Secret::from_bytes([2; 32]),
                last_attempt: 0,
                session: Arc::downgrade(&shared),
            },
        );
        // Both were verified against the lookup's 0; the newer one claims first.
        assert!(matches!(table.claim_attempt(id, 6), Claim::Live(..)));
        assert!(matches!(
            table.claim_attempt(id, 5),
            Claim::Stale { last_attempt: 6 }
        ));
        // Nor can the winner's HELLO be claimed twice.
        assert!(matches!(
            table.claim_attempt(id, 6),
            Claim::Stale { last_attempt: 6 }
        ));
        assert!(matches!(table.claim_attempt(id, 7), Claim::Live(..)));
        assert!(matches!(
            table.claim_attempt(SessionId::from_bytes([9; 16]), 1),
            Claim::Gone
        ));
        drop(shared);
        assert!(matches!(table.claim_attempt(id, 8), Claim::Gone));
    }

    /// A server session with a live path over an in-memory transport.
    fn live_session() -> Arc<Shared> {
        let options = SessionOptions::default();
        let now = now();
        let mut conn =
            Connection::new(Side::Server, SessionId::from_bytes([1; 16]), &options, now).unwrap();
        conn.start_path(now, FrameDecoder::handshake(), 0).unwrap();
        let (io, _far) = tokio::io::duplex(64);
        Shared::new(conn, Some(Box::new(io)))
    }

    fn transport() -> BoxIo {
        Box::new(tokio::io::duplex(64).0)
    }

    /// A resume's attach, for attempt `attempt`, of a fresh transport at offset 0.
    fn attach_fresh(st: &mut State, now: Instant, attempt: u64) -> Result<()> {
        attach(
            st,
            now,
            attempt,
            FrameDecoder::handshake(),
            0,
            &mut Some(transport()),
        )
    }

    #[tokio::test]
    async fn of_two_racing_resumes_the_older_cannot_detach_after_the_newer_nor_attach() {
        let shared = live_session();
        let mut st = shared.lock();
        let now = now();
        // Both claimed their numbers (6 last); 6 detaches first, then 5 arrives.
        assert_eq!(detach(&mut st, now, 6, 0).unwrap(), 0);
        assert!(matches!(detach(&mut st, now, 5, 0), Err(Refusal::Stale(6))));
        assert!(matches!(
            attach_fresh(&mut st, now, 5),
            Err(Error::ReconnectionInProgress)
        ));
        attach_fresh(&mut st, now, 6).unwrap();
        assert!(st.conn.has_path());
        assert_eq!(st.conn.generation(), 2);
        // The other order: 7 detaches, 8 takes over before 7 attaches; 7 then cannot attach.
        detach(&mut st, now, 7, 0).unwrap();
        detach(&mut st, now, 8, 0).unwrap();
        assert!(matches!(
            attach_fresh(&mut st, now, 7),
            Err(Error::ReconnectionInProgress)
        ));
        attach_fresh(&mut st, now, 8).unwrap();
        assert_eq!(st.conn.generation(), 3);
    }

    /// A session closed between a resume's detach and its attach (while RESUMED was being
    /// written) refuses the transport and hands it back, so the CLOSE it owes goes on it.
    #[tokio::test]
    async fn a_session_closed_during_a_resume_hands_the_transport_back() {
        let shared = live_session();
        let mut st = shared.lock();
        let now = now();
        detach(&mut st, now, 1, 0).unwrap();
        st.conn.close(now, CloseCode::Normal, "closed");
        let mut transport = Some(transport());
        assert!(matches!(
            attach(
                &mut st,
                now,
                1,
                FrameDecoder::handshake(),
                0,
                &mut transport
            ),
            Err(Error::PipeClosed)
        ));
        assert!(transport.is_some(), "the transport was not handed back");
    }

    #[tokio::test]
    async fn a_resume_of_a_closing_session_is_refused_and_leaves_it_closing() {
        let shared = live_session();
        let mut st = shared.lock();
        let now = now();
        st.conn.handle_transport_lost(now);
        st.conn.close(now, CloseCode::Normal, "closed");
        assert!(st.conn.is_closing());
        assert!(matches!(detach(&mut st, now, 1, 0), Err(Refusal::Closed)));
        assert_eq!(st.latest_attempt, 0, "a refused attempt records nothing");
        assert!(st.conn.is_closing());
        st.conn.fail(now, Error::PipeClosed);
        assert!(matches!(detach(&mut st, now, 2, 0), Err(Refusal::Gone)));
    }
}
