//! One stream's life: the connection to the local service, the session a client attaches, the
//! bytes carried between them, and the end.
//!
//! A stream is created with its local connection already open and no session. The first
//! new-session handshake on it (see [`upgrade`](super::upgrade)) hands its [`Session`] to the
//! stream's task, which then carries bytes both ways with half-close: the service's end of
//! output becomes the session's FIN (the client reads end-of-stream after every byte), and the
//! client's FIN becomes a shutdown of the local socket's write side. When both directions are
//! done (or the client closes the session, or it expires, or the stream is deleted) the task
//! removes the stream from the registry. Resumes go to the stream's own [`SessionServer`], which
//! scopes session ids to the stream.

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use backedpipe::{PipeState, Session, SessionOptions, SessionServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::registry::{Registry, RemovalReason, StreamEvent};
use crate::api::StreamInfo;

/// The copy buffer of each direction, allocated when a client first attaches.
const COPY_BUF_LEN: usize = 64 * 1024;

/// The longest name a client may give a stream.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// A stream: what the API reports about it, and the handles to its task.
#[derive(Debug)]
pub(crate) struct Stream {
    id: String,
    name: String,
    port: u16,
    serial: u64,
    created: Instant,
    created_at: SystemTime,
    /// The stream's sessions: the first, and every resume of it.
    sessions: SessionServer,
    status: Mutex<Status>,
    bytes_to_service: AtomicU64,
    bytes_from_service: AtomicU64,
    /// Cancelled to stop the stream (deleted, evicted, agent stopping).
    stop: CancellationToken,
    /// Where the first new session goes; taken by the handshake that creates it.
    first_session: Mutex<Option<oneshot::Sender<Session>>>,
    /// The secret every upgrade must present: given to the creator only.
    attach_key: String,
    /// Counters of the whole agent, which this stream's bytes add to.
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Status {
    connected: bool,
    last_connected_at: Option<SystemTime>,
    last_disconnected: Option<(Instant, SystemTime)>,
}

/// How the carrying of bytes ended badly.
#[derive(Debug)]
enum CarryError {
    /// The session failed for good (the client closed it, it expired, ...).
    Session(backedpipe::Error),
    /// The local service's connection failed.
    Local(io::Error),
}

impl Stream {
    /// A new stream with no session yet, and the receiver its task waits on for the first one.
    pub(crate) fn new(
        serial: u64,
        port: u16,
        name: Option<String>,
        options: SessionOptions,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> (Arc<Stream>, oneshot::Receiver<Session>) {
        let id = new_id();
        let attach_key = new_id();
        let name = name.unwrap_or_else(|| format!("port-{port}-{}", &id[..6]));
        let (first_session, session_rx) = oneshot::channel();
        let stream = Stream {
            id,
            name,
            port,
            serial,
            created: Instant::now(),
            created_at: SystemTime::now(),
            sessions: SessionServer::new(options),
            status: Mutex::new(Status::default()),
            bytes_to_service: AtomicU64::new(0),
            bytes_from_service: AtomicU64::new(0),
            stop,
            first_session: Mutex::new(Some(first_session)),
            attach_key,
            metrics,
        };
        (Arc::new(stream), session_rx)
    }

    /// The stream's id: 32 hex digits.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Creation order.
    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    /// The stream's session server, for the handshakes of its upgrades.
    pub(crate) fn sessions(&self) -> &SessionServer {
        &self.sessions
    }

    /// Whether a client is attached now.
    pub(crate) fn is_connected(&self) -> bool {
        self.status().connected
    }

    /// Whether `presented` is this stream's attach key (compared in constant time).
    pub(crate) fn verify_attach_key(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        presented.len() == self.attach_key.len()
            && bool::from(presented.as_bytes().ct_eq(self.attach_key.as_bytes()))
    }

    /// Whether the stream may be evicted to make room: no client attached now, and not a
    /// stream created less than `grace` ago that its creator has yet to attach (evicting that
    /// one would fail a client that did nothing wrong).
    pub(crate) fn is_evictable(&self, grace: Duration) -> bool {
        let status = self.status();
        if status.connected {
            return false;
        }
        status.last_connected_at.is_some() || self.created.elapsed() >= grace
    }

    /// The answer to the create request: the stream's description with its attach key.
    pub(crate) fn creation_info(&self) -> StreamInfo {
        StreamInfo {
            attach_key: Some(self.attach_key.clone()),
            ..self.info()
        }
    }

    /// Since when the stream has had no client: the later of its creation and its last
    /// disconnection.
    pub(crate) fn idle_since(&self) -> Instant {
        match self.status().last_disconnected {
            Some((at, _)) => at.max(self.created),
            None => self.created,
        }
    }

    /// Stops the stream's task: the session gets CLOSE and the local connection is dropped.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// Claims the right to create the stream's session, for a new-session handshake; `None` if
    /// the stream already has (or had) one. Give the claim back with [`Stream::unclaim`] if the
    /// handshake fails.
    pub(crate) fn claim_first_session(&self) -> Option<oneshot::Sender<Session>> {
        lock(&self.first_session).take()
    }

    /// Whether no new-session handshake has succeeded or is under way: the stream has never
    /// had a session.
    pub(crate) fn awaits_first_session(&self) -> bool {
        lock(&self.first_session).is_some()
    }

    /// Returns an unused claim, so a later new-session handshake may try again.
    pub(crate) fn unclaim(&self, claim: oneshot::Sender<Session>) {
        *lock(&self.first_session) = Some(claim);
    }

    /// What the API reports.
    pub(crate) fn info(&self) -> StreamInfo {
        let status = self.status();
        StreamInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            port: self.port,
            created_at: rfc3339(self.created_at),
            last_connected_at: status.last_connected_at.map(rfc3339),
            last_disconnected_at: status.last_disconnected.map(|(_, at)| rfc3339(at)),
            connected: status.connected,
            bytes_to_service: self.bytes_to_service.load(Ordering::Relaxed),
            bytes_from_service: self.bytes_from_service.load(Ordering::Relaxed),
            attach_key: None,
        }
    }

    /// The stream's task: waits for the first session, carries bytes, and removes the stream
    /// from `registry` when it ends, whatever the reason.
    pub(crate) async fn run(
        self: Arc<Self>,
        local: TcpStream,
        first_session: oneshot::Receiver<Session>,
        registry: Registry,
    ) {
        let reason = self.live(local, first_session, &registry).await;
        registry.remove(&self.id, reason);
    }

    async fn live(
        &self,
        local: TcpStream,
        first_session: oneshot::Receiver<Session>,
        registry: &Registry,
    ) -> RemovalReason {
        let ttl = registry.ttl();
        let window = registry.first_attach_window();
        let session = tokio::select! {
            _ = self.stop.cancelled() => return RemovalReason::AgentStopped,
            _ = tokio::time::sleep(window) => {
                tracing::info!(id = %self.id, ?window, "its creator did not attach in time");
                return RemovalReason::Expired;
            }
            session = first_session => match session {
                Ok(session) => session,
                Err(_) => return RemovalReason::Failed("the session was lost".into()),
            },
        };
        let ended = tokio::select! {
            _ = self.stop.cancelled() => None,
            ended = self.carry(&session, local) => Some(ended),
            never = self.track_status(session.status(), registry) => match never {},
        };
        let Some(ended) = ended else {
            // Deleted, or the agent is stopping: close at once (dropping the session sends
            // CLOSE) rather than wait for a client that may be away.
            drop(session);
            return RemovalReason::AgentStopped;
        };
        let reason = match ended {
            Ok(()) => {
                // Both directions are done. Keep the session until the client has everything
                // (or goes away for good), so the close cannot overtake the last bytes; its
                // connection is tracked meanwhile (a client gone is reported, and the stream
                // evictable).
                let drained = async {
                    tokio::select! {
                        () = self.drain(&session, ttl) => {}
                        never = self.track_status(session.status(), registry) => match never {},
                    }
                };
                self.stop.run_until_cancelled(drained).await;
                RemovalReason::Ended
            }
            Err(CarryError::Session(err)) => match err {
                backedpipe::Error::SessionExpired(_) => RemovalReason::Expired,
                backedpipe::Error::ClosedByPeer { .. } => RemovalReason::Ended,
                err => RemovalReason::Failed(format!("session: {err}")),
            },
            Err(CarryError::Local(err)) => RemovalReason::Failed(format!("local service: {err}")),
        };
        let _ = session.close().await;
        reason
    }

    /// Carries bytes both ways until both directions have ended, or either fails.
    async fn carry(&self, session: &Session, local: TcpStream) -> Result<(), CarryError> {
        let (mut local_read, mut local_write) = local.into_split();
        let to_service = async {
            let mut buf = vec![0u8; COPY_BUF_LEN];
            loop {
                let n = session.read(&mut buf).await.map_err(CarryError::Session)?;
                if n == 0 {
                    // The client's FIN: pass it on, keep the other direction going.
                    let _ = local_write.shutdown().await;
                    return Ok(());
                }
                local_write
                    .write_all(&buf[..n])
                    .await
                    .map_err(CarryError::Local)?;
                self.bytes_to_service.fetch_add(n as u64, Ordering::Relaxed);
                self.metrics
                    .bytes_to_services
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        };
        let from_service = async {
            let mut buf = vec![0u8; COPY_BUF_LEN];
            loop {
                let n = local_read.read(&mut buf).await.map_err(CarryError::Local)?;
                if n == 0 {
                    session.shutdown().await.map_err(CarryError::Session)?;
                    return Ok(());
                }
                let mut sent = 0;
                while sent < n {
                    match session.write(&buf[sent..n]).await {
                        Ok(0) => {
                            return Err(CarryError::Local(io::ErrorKind::WriteZero.into()));
                        }
                        Ok(written) => sent += written,
                        Err(err) => return Err(CarryError::Session(err)),
                    }
                }
                self.bytes_from_service
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.metrics
                    .bytes_from_services
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        };
        tokio::try_join!(to_service, from_service).map(|_| ())
    }

    /// Records the session's connections and disconnections, forever.
    async fn track_status(
        &self,
        mut status: watch::Receiver<PipeState>,
        registry: &Registry,
    ) -> Infallible {
        loop {
            let (connected, ended) = {
                let state = status.borrow_and_update();
                (matches!(*state, PipeState::Connected), state.is_final())
            };
            let event = self.set_connected(connected);
            if !ended && matches!(event, Some(StreamEvent::Disconnected { .. })) {
                // A session that ended is about to be removed, and says why then.
                tracing::info!(id = %self.id, "client detached; waiting for it to resume");
            }
            if let Some(event) = event {
                registry.emit(event);
            }
            if status.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Records a connection state; returns the event to report if it changed.
    pub(crate) fn set_connected(&self, connected: bool) -> Option<StreamEvent> {
        let mut status = self.status();
        if status.connected == connected {
            return None;
        }
        status.connected = connected;
        let id = self.id.clone();
        if connected {
            status.last_connected_at = Some(SystemTime::now());
            tracing::info!(id = %self.id, "client attached");
            Some(StreamEvent::Connected { id })
        } else {
            status.last_disconnected = Some((Instant::now(), SystemTime::now()));
            Some(StreamEvent::Disconnected { id })
        }
    }

    /// Waits until the client has everything, the end of the stream included, which it says
    /// by closing the session (`connect` and `forward` close once they have read the end), or
    /// the session ends otherwise, or `limit` passes. Acknowledged bytes alone do not say it: a
    /// FIN is not acknowledged, and a path lost just after it would leave the client resuming
    /// a stream that is gone.
    async fn drain(&self, session: &Session, limit: Duration) {
        let mut status = session.status();
        let ended =
            status.wait_for(|state| matches!(state, PipeState::Closed | PipeState::Failed(_)));
        let _ = tokio::time::timeout(limit, ended).await;
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        lock(&self.status)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fresh stream id: 16 random bytes as 32 hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness (the kernel refused it: not seen on a supported system): fall back to
        // the clock and a counter, unique if guessable. The id names a stream, and the bearer
        // token and the session secret protect it; the attach key, made here too, is then
        // guessable, and only the token keeps others from a stream not yet attached.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        bytes[..8].copy_from_slice(&nanos.to_be_bytes());
        bytes[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    }
    hex::encode(bytes)
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}
