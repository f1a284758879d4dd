//! [`StreamConnector`]: how a [`backedpipe::Session`] reaches its stream on the agent. Each
//! connection is a fresh HTTP request to `/v1/streams/{id}/connect` that upgrades to the raw
//! session protocol, or to a WebSocket carrying it; an answer that says the stream is gone is
//! raised on a [`GoneSignal`], because the session's own reconnect loop would retry it forever.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use backedpipe::{BoxIo, Connector};
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

use super::api_client::{read_body, ApiClient};
use super::error::ClientError;
use super::network::network_changes;
use crate::api::{self, StreamInfo, ATTACH_KEY_HEADER};
use crate::ws_io::WsIo;

/// How a stream's bytes travel over the HTTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Carrier {
    /// `Upgrade: immortal-session/1`: the session protocol straight on the upgraded
    /// connection (the default: no framing on top).
    #[default]
    Upgrade,
    /// `Upgrade: websocket`: the same bytes in binary WebSocket messages, for proxies that
    /// pass nothing else.
    WebSocket,
}

/// A [`Connector`] that opens one connection to a stream of the agent per call: dial (TLS if
/// configured), send the upgrade request with the token, check for `101 Switching Protocols`
/// and hand back the upgraded connection.
///
/// A refusal that can never turn into a success (the stream is unknown or expired: 404; the
/// token is refused: 401) is raised on the connector's [`GoneSignal`] as well as returned. A
/// session retries failed resumes forever, as it should for a network that is down; whoever
/// holds the session watches the signal and closes it.
///
/// ```no_run
/// # async fn run(api: immortal::client::ApiClient) -> Result<(), Box<dyn std::error::Error>> {
/// use backedpipe::{Session, SessionOptions};
/// use immortal::client::{Carrier, StreamConnector};
///
/// let stream = api.create_stream(22, None).await?;
/// let connector = StreamConnector::new(api, &stream, Carrier::Upgrade);
/// let mut gone = connector.gone_signal();
/// let session = Session::connect(connector, SessionOptions::default()).await?;
/// tokio::select! {
///     reason = gone.wait() => {
///         eprintln!("{reason}");
///         session.close().await?;
///     }
///     // ... copy data ...
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StreamConnector {
    api: ApiClient,
    id: String,
    attach_key: Option<HeaderValue>,
    carrier: Carrier,
    gone: Arc<watch::Sender<Option<ClientError>>>,
    /// Grows when the machine gains a network address.
    network: watch::Receiver<u64>,
    /// Since when attempts have been failing (`None` while connected or never tried).
    outage: Mutex<Option<Instant>>,
    /// How long attempts have taken, for the next one's budget.
    history: Mutex<AttemptHistory>,
}

/// What past attempts say about the path to the agent.
#[derive(Debug, Default, Clone, Copy)]
struct AttemptHistory {
    /// How long the latest successful attempt took (`None` before the first).
    last_success: Option<Duration>,
    /// Attempts abandoned at their budget since the last success.
    timeouts: u32,
}

impl AttemptHistory {
    /// How long the next attempt may take: the whole [`MAX_ATTEMPT_TIMEOUT`] before any has
    /// succeeded (the path's delay is unknown); then four times the latest success, at least
    /// [`ATTEMPT_TIMEOUT`], doubled for each attempt abandoned in a row, at most
    /// [`MAX_ATTEMPT_TIMEOUT`]. A slow path (a satellite link, a congested uplink: a TLS
    /// handshake and an upgrade take four round trips) keeps resuming, and a fast one notices a
    /// hung dial in seconds.
    fn budget(&self) -> Duration {
        let Some(last) = self.last_success else {
            return MAX_ATTEMPT_TIMEOUT;
        };
        let base = (last * 4).max(ATTEMPT_TIMEOUT);
        base.saturating_mul(1 << self.timeouts.min(8))
            .min(MAX_ATTEMPT_TIMEOUT)
    }
}

/// How long after the start of an outage attempts follow each other as fast as the session's
/// backoff allows (capped at 1 s, see [`session_options`](crate::cli::common::session_options)):
/// most outages (a Wi-Fi change, a lid closed for a minute) end within it, and every second
/// waited after the network is back is a second the user waits.
pub const FAST_PHASE: Duration = Duration::from_secs(3 * 60);

/// After [`FAST_PHASE`], each attempt first waits up to this long (uniformly drawn), unless
/// the network changes meanwhile: a long outage costs the agent and the network little.
pub const SLOW_PACE: Duration = Duration::from_secs(4);

/// The shortest time one attempt (dial, TLS, the upgrade) is given before it is abandoned, on
/// a path that has answered quickly before; an attempt in progress is also abandoned, and a
/// new one started, when the network changes. See [`MAX_ATTEMPT_TIMEOUT`].
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest one attempt is given: the first one, before the path's delay is known, and
/// later ones on a slow path or after attempts that ran out of time (each doubles the next
/// one's budget, from four times the latest success or [`ATTEMPT_TIMEOUT`]).
pub const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

impl StreamConnector {
    /// A connector for `stream`, as the agent `api` talks to answered its creation: every
    /// connection presents the stream's attach key (only its creator has it).
    pub fn new(api: ApiClient, stream: &StreamInfo, carrier: Carrier) -> Self {
        let attach_key = stream.attach_key.as_deref().and_then(|key| {
            let mut value = HeaderValue::from_str(key).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        StreamConnector {
            api,
            id: stream.id.clone(),
            attach_key,
            carrier,
            gone: Arc::new(watch::Sender::new(None)),
            network: network_changes(),
            outage: Mutex::new(None),
            history: Mutex::new(AttemptHistory::default()),
        }
    }

    /// The same connector, told of network changes by `network` instead of the machine's
    /// watcher (for tests, or a caller with its own notion of "the network changed").
    pub fn with_network_changes(mut self, network: watch::Receiver<u64>) -> Self {
        self.network = network;
        self
    }

    /// One attempt, paced and restarted as the outage so far calls for: see [`FAST_PHASE`],
    /// [`SLOW_PACE`], [`ATTEMPT_TIMEOUT`] and [`MAX_ATTEMPT_TIMEOUT`].
    async fn attempt(&self) -> Result<BoxIo, ClientError> {
        let mut network = self.network.clone();
        network.borrow_and_update();
        let outage = *self.outage.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = outage {
            if since.elapsed() >= FAST_PHASE {
                let pause = SLOW_PACE.mul_f64(random_fraction());
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = network.changed() => {
                        tracing::debug!(stream = %self.id, "network changed: trying now");
                    }
                }
            }
        }
        loop {
            let budget = self
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .budget();
            let started = Instant::now();
            let attempt = tokio::time::timeout(budget, self.open());
            let result = if outage.is_some() {
                tokio::select! {
                    result = attempt => result,
                    _ = network.changed() => {
                        // A dial on the old path may hang until its timeout: start afresh, with
                        // no count of the old path's timeouts against the new one.
                        tracing::debug!(stream = %self.id, "network changed: a new attempt");
                        self.history.lock().unwrap_or_else(PoisonError::into_inner).timeouts = 0;
                        continue;
                    }
                }
            } else {
                attempt.await
            };
            {
                let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
                match &result {
                    Ok(Ok(_)) => {
                        let took = started.elapsed();
                        history.last_success = Some(took);
                        history.timeouts = 0;
                    }
                    Ok(Err(_)) => {}
                    Err(_) => history.timeouts = history.timeouts.saturating_add(1),
                }
            }
            let result = result.unwrap_or_else(|_| {
                Err(ClientError::Unreachable {
                    server: self.api.server().to_string(),
                    reason: format!("no answer within {:.1} s", budget.as_secs_f64()),
                })
            });
            let mut outage = self.outage.lock().unwrap_or_else(PoisonError::into_inner);
            match &result {
                Ok(_) => *outage = None,
                Err(_) => {
                    outage.get_or_insert_with(Instant::now);
                }
            }
            return result;
        }
    }

    /// The stream's id.
    pub fn stream_id(&self) -> &str {
        &self.id
    }

    /// Where this connector reports that the stream is gone for good.
    pub fn gone_signal(&self) -> GoneSignal {
        GoneSignal(self.gone.subscribe())
    }

    /// Opens one connection to the stream.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] when the agent no longer has the stream,
    /// [`ClientError::Unauthorized`], [`ClientError::Unreachable`], ...
    pub async fn open(&self) -> Result<BoxIo, ClientError> {
        match self.carrier {
            Carrier::Upgrade => self.open_upgrade().await,
            Carrier::WebSocket => self.open_websocket().await,
        }
    }

    async fn open_upgrade(&self) -> Result<BoxIo, ClientError> {
        let mut request = self.api.upgrade_request(&self.id)?;
        if let Some(key) = &self.attach_key {
            request.headers_mut().insert(ATTACH_KEY_HEADER, key.clone());
        }
        let response = self.api.send(request, true).await?;
        let status = response.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let body = read_body(response).await.unwrap_or_default();
            return Err(ClientError::from_response(status.as_u16(), &body));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|err| ClientError::io(io::Error::other(err.to_string())))?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }

    async fn open_websocket(&self) -> Result<BoxIo, ClientError> {
        let url = format!("ws://{}{}", self.api.server(), api::connect_path(&self.id));
        let mut request = url
            .into_client_request()
            .map_err(|err| ClientError::Protocol(err.to_string()))?;
        request
            .headers_mut()
            .insert(AUTHORIZATION, self.api.authorization().clone());
        if let Some(key) = &self.attach_key {
            request.headers_mut().insert(ATTACH_KEY_HEADER, key.clone());
        }
        let io = self.api.dialer().dial().await?;
        match tokio_tungstenite::client_async(request, io).await {
            Ok((websocket, _response)) => Ok(Box::new(WsIo::new(websocket))),
            Err(WsError::Http(response)) => {
                let body = response.body().as_deref().unwrap_or_default();
                Err(ClientError::from_response(response.status().as_u16(), body))
            }
            Err(WsError::Io(err)) => Err(ClientError::io(err)),
            Err(other) => Err(ClientError::Protocol(other.to_string())),
        }
    }
}

impl Connector for StreamConnector {
    async fn connect(&self) -> io::Result<BoxIo> {
        self.attempt().await.map_err(|err| {
            tracing::debug!(stream = %self.id, %err, "connecting to the stream failed");
            if err.ends_stream() {
                tracing::debug!(stream = %self.id, %err, "the stream is gone for good");
                // The first reason is the one reported.
                self.gone.send_if_modified(|gone| {
                    let first = gone.is_none();
                    if first {
                        *gone = Some(err.clone());
                    }
                    first
                });
            }
            err.into()
        })
    }
}

/// Raised by a [`StreamConnector`] when the agent answers that its stream is gone (404) or
/// that the token is refused (401): no later attempt can succeed.
#[derive(Debug, Clone)]
pub struct GoneSignal(watch::Receiver<Option<ClientError>>);

impl GoneSignal {
    /// A signal raised through `sender`.
    pub(super) fn new(sender: &watch::Sender<Option<ClientError>>) -> GoneSignal {
        GoneSignal(sender.subscribe())
    }

    /// Raises `err` on `sender` if it ends the stream and nothing was raised before (the first
    /// reason is the one reported).
    pub(super) fn raise(sender: &watch::Sender<Option<ClientError>>, err: &ClientError) {
        if err.ends_stream() {
            sender.send_if_modified(|gone| {
                let first = gone.is_none();
                if first {
                    *gone = Some(err.clone());
                }
                first
            });
        }
    }

    /// The reason, if the stream is already known to be gone.
    pub fn get(&self) -> Option<ClientError> {
        self.0.borrow().clone()
    }

    /// Waits until the stream is known to be gone and returns why. Never returns if the
    /// connector is dropped first.
    pub async fn wait(&mut self) -> ClientError {
        if let Ok(reason) = self.0.wait_for(Option::is_some).await {
            if let Some(reason) = reason.clone() {
                return reason;
            }
        }
        std::future::pending().await
    }
}

/// A number drawn uniformly from [0, 1), for jitter.
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempts_budget_follows_the_paths_delay() {
        let secs = Duration::from_secs;
        let history = |last: Option<u64>, timeouts| AttemptHistory {
            last_success: last.map(Duration::from_millis),
            timeouts,
        };
        // Nothing known yet: all of it.
        assert_eq!(history(None, 0).budget(), MAX_ATTEMPT_TIMEOUT);
        // A fast path: the floor; a slow one (1.6 s for TLS and the upgrade): four times that.
        assert_eq!(history(Some(20), 0).budget(), ATTEMPT_TIMEOUT);
        assert_eq!(history(Some(1600), 0).budget(), Duration::from_millis(6400));
        // Attempts that ran out of time double it, up to the most.
        assert_eq!(history(Some(20), 1).budget(), secs(6));
        assert_eq!(history(Some(20), 2).budget(), secs(12));
        assert_eq!(history(Some(20), 3).budget(), MAX_ATTEMPT_TIMEOUT);
        assert_eq!(history(Some(20), u32::MAX).budget(), MAX_ATTEMPT_TIMEOUT);
    }
    use crate::client::TlsTrust;
    use crate::token::Token;

    /// In an outage, a network change abandons the attempt in progress (a dial into a path
    /// that answers nothing) and starts a new one at once.
    #[tokio::test]
    async fn a_network_change_in_an_outage_starts_a_new_attempt_at_once() {
        // Accepts connections and never answers: every attempt hangs until its timeout.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = accepted_tx.send(tcp);
            }
        });
        let api = ApiClient::new(
            addr.to_string().parse().unwrap(),
            &Token::generate(),
            &TlsTrust::None,
        )
        .unwrap();
        let info = StreamInfo {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "test".into(),
            port: 1,
            created_at: String::new(),
            last_connected_at: None,
            last_disconnected_at: None,
            connected: false,
            bytes_to_service: 0,
            bytes_from_service: 0,
            attach_key: None,
        };
        let (network_tx, network) = watch::channel(0u64);
        let connector =
            StreamConnector::new(api, &info, Carrier::Upgrade).with_network_changes(network);
        // A path known to answer fast: attempts get the shortest budget.
        connector.history.lock().unwrap().last_success = Some(Duration::from_millis(1));
        // The first attempt fails by its timeout: an outage has begun.
        assert!(connector.connect().await.is_err());
        let _first = accepted.recv().await.unwrap();
        // The second hangs too, until the network changes: then a new dial goes out at once.
        let second = tokio::spawn(async move { connector.connect().await.map(drop) });
        let _dialled = accepted.recv().await.unwrap();
        network_tx.send_modify(|n| *n += 1);
        // (Without the change, this call would make no other attempt: the wait would hang.)
        let redialled = tokio::time::timeout(Duration::from_secs(20), accepted.recv()).await;
        assert!(matches!(redialled, Ok(Some(_))), "no new attempt");
        second.abort();
    }
}
