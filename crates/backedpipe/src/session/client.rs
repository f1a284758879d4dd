//! The client side of session mode: dial through a [`Connector`], run the new-session or resume
//! handshake, and hand the transport to the session.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use super::establish::{client_new, client_resume, send_close};
use super::options::SessionOptions;
use super::shared::Shared;
use crate::error::Error;
use crate::proto::{CloseCode, Established, Frame, FrameDecoder, Secret, SessionId};
use crate::transport::{BoxIo, Connector};

/// One resume attempt in flight: done once the transport is attached, or failed.
pub(crate) type Resuming = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Dials a new transport for a session and attaches it (a client's resume), for the driver.
pub(crate) trait Dial: Send + Sync + 'static {
    /// One attempt: connect, resume, attach. A terminal error (the server forgot the session,
    /// the proof failed, the offset is a lie) ends the session; any other is retried.
    fn dial(self: Arc<Self>, shared: Arc<Shared>) -> Resuming;
}

/// What a client needs to resume its session.
#[derive(Debug)]
struct Credentials {
    session_id: SessionId,
    secret: Secret,
    /// Resume attempts made so far; each uses the next number, so none repeats.
    attempts: u64,
}

/// Dials and resumes a client session through `connector`.
pub(crate) struct Dialer<C> {
    connector: C,
    options: SessionOptions,
    credentials: Mutex<Credentials>,
}

impl<C: Connector> Dialer<C> {
    /// Opens a new session: the first transport and its handshake. Returns the dialer for
    /// later resumes, what the server agreed, and the transport.
    pub(crate) async fn open(
        connector: C,
        options: SessionOptions,
    ) -> Result<(Dialer<C>, Established, FrameDecoder, BoxIo), Error> {
        let mut io = connect(&connector, &options).await?;
        let handshake_timeout = options.handshake_timeout;
        let (established, decoder) = tokio::time::timeout(handshake_timeout, client_new(&mut io))
            .await
            .map_err(|_| Error::HandshakeTimeout(handshake_timeout))??;
        tracing::debug!(session = %established.session_id(), "new session established");
        let dialer = Dialer {
            connector,
            options,
            credentials: Mutex::new(Credentials {
                session_id: established.session_id(),
                secret: established.secret().clone(),
                attempts: 0,
            }),
        };
        Ok((dialer, established, decoder, io))
    }

    /// One resume attempt.
    async fn resume(self: Arc<Self>, shared: Arc<Shared>) -> Result<(), Error> {
        // The attempt number is taken before dialling: a failed dial wastes a number, which
        // is harmless, and a number never repeats. The offset cannot move while there is no
        // path.
        let (id, secret, attempt) = {
            let mut credentials = self
                .credentials
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            credentials.attempts += 1;
            (
                credentials.session_id,
                credentials.secret.clone(),
                credentials.attempts,
            )
        };
        let reader_seq = shared.lock().conn.resume_offset();
        let mut io = connect(&self.connector, &self.options).await?;
        let handshake_timeout = self.options.handshake_timeout;
        let handshake = client_resume(&mut io, id, secret, attempt, reader_seq);
        let (established, decoder) = tokio::time::timeout(handshake_timeout, handshake)
            .await
            .map_err(|_| Error::HandshakeTimeout(handshake_timeout))??;
        let peer_offset = established.remote_reader_seq();
        // The server's offset is hostile input: it is checked before anything is touched, and
        // a refusal tells the server why.
        let mut io = Some(io);
        let attached = shared.with(|st, now| {
            st.conn.start_path(now, decoder, peer_offset)?;
            if let Some(io) = io.take() {
                st.attach(io);
            }
            Ok(())
        });
        match (attached, io) {
            (Ok(()), _) => {
                tracing::debug!(session = %id, local = reader_seq, remote = peer_offset, "session resumed");
                Ok(())
            }
            (Err(err), io) => {
                if let Some(mut io) = io {
                    let code = match err {
                        Error::PipeClosed => CloseCode::Normal,
                        _ => CloseCode::ReplayUnavailable,
                    };
                    send_close(&mut io, Frame::close(code, err.to_string())).await;
                }
                Err(err)
            }
        }
    }
}

impl<C: Connector> Dial for Dialer<C> {
    fn dial(self: Arc<Self>, shared: Arc<Shared>) -> Resuming {
        Box::pin(self.resume(shared))
    }
}

/// Opens a transport through `connector` within the connect timeout.
async fn connect<C: Connector>(connector: &C, options: &SessionOptions) -> Result<BoxIo, Error> {
    // Boxed as a trait object: the connector's future is opaque, and leaving it so makes the
    // session's own futures too general for the compiler to prove them `Send` when spawned.
    let connecting: Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send + '_>> =
        Box::pin(connector.connect());
    tokio::time::timeout(options.connect_timeout, connecting)
        .await
        .map_err(|_| Error::io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connector_error)
}

/// A connector's failure as the crate error: one of ours that it wrapped in the `io::Error`
/// passes through, so a connector can stop the resume loop with a terminal error (the server
/// said the session is gone); anything else is transport trouble, retried.
fn connector_error(err: std::io::Error) -> Error {
    match Error::from_io(&err) {
        Some(ours) => ours.clone(),
        None => Error::io(err),
    }
}
