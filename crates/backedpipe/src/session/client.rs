//! The client side of session mode: a [`Reconnector`] that dials through a [`Connector`] and
//! runs the new-session or resume handshake.

use std::sync::{Arc, Mutex, PoisonError};

use super::conn::SessionConn;
use super::establish::{client_new, client_resume, send_close};
use super::link::SessionLink;
use super::options::SessionOptions;
use crate::error::{BoxError, Error};
use crate::proto::{CloseCode, Frame, Secret, SessionId};
use crate::reconnector::Reconnector;
use crate::transport::Connector;

/// The session's credentials, learnt from the server's WELCOME, shared by the dialer and the
/// [`Session`](super::Session) that reports the id.
pub(crate) type Credentials = Arc<Mutex<Option<Resumable>>>;

/// What a client needs to resume its session.
#[derive(Debug, Clone)]
pub(crate) struct Resumable {
    pub(crate) session_id: SessionId,
    secret: Secret,
    /// Resume attempts made so far; each uses the next number, so none repeats.
    attempts: u64,
}

impl Resumable {
    /// The next attempt's number (from 1), with what the handshake needs.
    fn next_attempt(&mut self) -> (SessionId, Secret, u64) {
        self.attempts += 1;
        (self.session_id, self.secret.clone(), self.attempts)
    }
}

/// Dials and handshakes for a client session: the first call asks for a new session, every
/// later one resumes it.
pub(crate) struct SessionDialer<C> {
    pub(crate) connector: C,
    pub(crate) options: SessionOptions,
    pub(crate) link: Arc<SessionLink>,
    pub(crate) credentials: Credentials,
}

impl<C: Connector> Reconnector for SessionDialer<C> {
    type Conn = SessionConn;

    async fn reconnect(&self, reader_seq: u64) -> Result<(SessionConn, u64), BoxError> {
        // The attempt number is taken before dialling: a failed dial wastes a number, which is
        // harmless, and a number never repeats.
        let resume = self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .map(Resumable::next_attempt);
        let connect_timeout = self.options.connect_timeout;
        let mut io = tokio::time::timeout(connect_timeout, self.connector.connect())
            .await
            .map_err(|_| Error::io(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connector_error)?;
        let handshake = async {
            match resume {
                None => client_new(&mut io).await,
                Some((id, secret, attempt)) => {
                    client_resume(&mut io, id, secret, attempt, reader_seq).await
                }
            }
        };
        let handshake_timeout = self.options.handshake_timeout;
        let (established, decoder) = tokio::time::timeout(handshake_timeout, handshake)
            .await
            .map_err(|_| Error::HandshakeTimeout(handshake_timeout))??;
        // The server's offset is hostile input: refuse it, and tell the server why, before the
        // pipe's buffer is touched.
        if let Err(err) = self.link.check_replay_from(established.remote_reader_seq()) {
            send_close(
                &mut io,
                Frame::close(CloseCode::ReplayUnavailable, err.to_string()),
            )
            .await;
            return Err(err.into());
        }
        if !established.is_resume() {
            *self
                .credentials
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Resumable {
                session_id: established.session_id(),
                secret: established.secret().clone(),
                attempts: 0,
            });
        }
        tracing::debug!(
            session = %established.session_id(),
            resumed = established.is_resume(),
            local = established.local_reader_seq(),
            remote = established.remote_reader_seq(),
            "session connection established"
        );
        let conn = SessionConn::start(
            io,
            decoder,
            &established,
            self.options.timing.clone(),
            self.link.clone(),
        );
        self.link.set_current(conn.finished());
        Ok((conn, established.remote_reader_seq()))
    }
}

/// A connector's failure as the crate error: one of ours that it wrapped in the `io::Error`
/// passes through, so a connector can stop the reconnect loop with a terminal error (the
/// server said the session is gone); anything else is transport trouble, retried.
fn connector_error(err: std::io::Error) -> Error {
    match Error::from_io(&err) {
        Some(ours) => ours.clone(),
        None => Error::io(err),
    }
}
