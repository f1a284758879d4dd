//! [`StreamConnector`]: how a [`backedpipe::Session`] reaches its stream on the agent. Each
//! connection is a fresh HTTP request to `/v1/streams/{id}/connect` that upgrades to the raw
//! session protocol, or to a WebSocket carrying it; an answer that says the stream is gone is
//! raised on a [`GoneSignal`], because the session's own reconnect loop would retry it forever.

use std::io;
use std::sync::Arc;

use backedpipe::{BoxIo, Connector};
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

use super::api_client::{read_body, ApiClient};
use super::error::ClientError;
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
}

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
        self.open().await.map_err(|err| {
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
