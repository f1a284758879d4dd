//! [`ApiClient`]: the agent's management API (create, list, get, delete streams), one
//! HTTP/1.1 request per connection, and the upgrade request that carries a stream.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::dial::{Dialer, ServerAddr, TlsTrust};
use super::error::ClientError;
use crate::api::{self, CreateStream, StreamInfo, StreamList};
use crate::token::Token;

/// How long one API request may take, dial included, before the agent counts as unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest response body read; the API's answers are a few KiB at most.
const MAX_BODY: usize = 8 << 20;

/// A client of one agent's HTTP API.
///
/// Every call opens its own connection (TLS when configured), sends one request with the
/// bearer token, and reads the answer; errors come back typed ([`ClientError`]). Cloning is
/// cheap and clones share the TLS configuration.
///
/// ```no_run
/// # async fn run(token: immortal::token::Token) -> Result<(), immortal::client::ClientError> {
/// use immortal::client::{ApiClient, TlsTrust};
///
/// let api = ApiClient::new("127.0.0.1:7400".parse()?, &token, &TlsTrust::None)?;
/// let stream = api.create_stream(22, None).await?;
/// for info in api.list().await?.streams {
///     println!("{} {} {}", info.id, info.name, info.port);
/// }
/// api.delete(&stream.id).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ApiClient {
    dialer: Dialer,
    authorization: HeaderValue,
    host: HeaderValue,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("dialer", &self.dialer)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client of the agent at `server`, presenting `token`, trusting TLS as `trust` says.
    ///
    /// # Errors
    /// [`ClientError::TlsConfig`] when the TLS files cannot be loaded;
    /// [`ClientError::BadServer`] when the host cannot go in a `Host` header.
    pub fn new(server: ServerAddr, token: &Token, trust: &TlsTrust) -> Result<Self, ClientError> {
        let host = HeaderValue::from_str(&server.to_string())
            .map_err(|_| ClientError::BadServer(server.to_string()))?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.to_hex()))
            .map_err(|_| ClientError::Protocol("the token is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        Ok(ApiClient {
            dialer: Dialer::new(server, trust)?,
            authorization,
            host,
        })
    }

    /// The agent's address.
    pub fn server(&self) -> &ServerAddr {
        self.dialer.server()
    }

    /// The dialer, for connections other than API requests.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// The `Authorization` header value every request carries.
    pub(crate) fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// `POST /v1/streams`: asks the agent to connect to `port` on its host and expose it as a
    /// new stream.
    ///
    /// # Errors
    /// [`ClientError::DialFailed`] when nothing listens on the port,
    /// [`ClientError::TooManyStreams`] when the agent is full, [`ClientError::Unauthorized`],
    /// [`ClientError::Unreachable`], ...
    pub async fn create_stream(
        &self,
        port: u16,
        name: Option<String>,
    ) -> Result<StreamInfo, ClientError> {
        let body = serde_json::to_vec(&CreateStream { port, name })
            .map_err(|err| ClientError::Protocol(err.to_string()))?;
        self.json(Method::POST, api::STREAMS_PATH, Some(body)).await
    }

    /// `GET /v1/streams`: every stream, oldest first.
    ///
    /// # Errors
    /// [`ClientError::Unauthorized`], [`ClientError::Unreachable`], ...
    pub async fn list(&self) -> Result<StreamList, ClientError> {
        self.json(Method::GET, api::STREAMS_PATH, None).await
    }

    /// `GET /v1/streams/{id}`: one stream.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] when there is no such stream, and as [`list`](Self::list).
    pub async fn get(&self, id: &str) -> Result<StreamInfo, ClientError> {
        self.json(Method::GET, &api::stream_path(&path_segment(id)?), None)
            .await
    }

    /// `DELETE /v1/streams/{id}`: removes a stream (its session is closed).
    ///
    /// # Errors
    /// [`ClientError::NotFound`] when there is no such stream, and as [`list`](Self::list).
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        let path = api::stream_path(&path_segment(id)?);
        self.call(Method::DELETE, &path, None).await.map(drop)
    }

    /// One request whose successful answer is JSON of type `T`.
    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let bytes = self.call(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|err| ClientError::Protocol(err.to_string()))
    }

    /// One request, within [`REQUEST_TIMEOUT`]: the body of a 2xx answer, or the error an
    /// error answer stands for.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let exchange = async {
            let mut builder = self.request(method, path);
            if body.is_some() {
                builder = builder.header(CONTENT_TYPE, "application/json");
            }
            let request = builder
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|err| ClientError::Protocol(err.to_string()))?;
            let response = self.send(request, false).await?;
            let status = response.status();
            let bytes = read_body(response).await?;
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(ClientError::from_response(status.as_u16(), &bytes))
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Unreachable {
                    server: self.server().to_string(),
                    reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
                })
            })
    }

    /// A request to `path` with the headers every request carries.
    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.authorization.clone())
    }

    /// The raw upgrade request for stream `id`.
    pub(crate) fn upgrade_request(&self, id: &str) -> Result<Request<Full<Bytes>>, ClientError> {
        self.request(Method::GET, &api::connect_path(&path_segment(id)?))
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, api::UPGRADE_PROTOCOL)
            .body(Full::new(Bytes::new()))
            .map_err(|err| ClientError::Protocol(err.to_string()))
    }

    /// Dials and sends `request` on a fresh HTTP/1.1 connection. The connection is driven by
    /// its own task, which ends when the exchange is over (or, with `upgrades`, hands the
    /// connection over to [`hyper::upgrade::on`]).
    pub(crate) async fn send(
        &self,
        request: Request<Full<Bytes>>,
        upgrades: bool,
    ) -> Result<Response<Incoming>, ClientError> {
        let io = self.dialer.dial().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(hyper_error)?;
        if upgrades {
            tokio::spawn(async move {
                if let Err(err) = conn.with_upgrades().await {
                    tracing::debug!(%err, "HTTP connection to the agent failed");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::debug!(%err, "HTTP connection to the agent failed");
                }
            });
        }
        sender.send_request(request).await.map_err(hyper_error)
    }
}

/// Reads a response body, at most [`MAX_BODY`] bytes of it.
pub(crate) async fn read_body(response: Response<Incoming>) -> Result<Bytes, ClientError> {
    let collected = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|err| match err.downcast::<hyper::Error>() {
            Ok(err) => hyper_error(*err),
            Err(other) => ClientError::Protocol(other.to_string()),
        })?;
    Ok(collected.to_bytes())
}

/// A hyper failure: the connection broke (an I/O error), or the peer does not speak HTTP.
fn hyper_error(err: hyper::Error) -> ClientError {
    use std::error::Error as _;
    let io = err
        .source()
        .and_then(|source| source.downcast_ref::<std::io::Error>());
    match io {
        Some(io) => ClientError::io(std::io::Error::new(io.kind(), err.to_string())),
        None if err.is_parse() || err.is_parse_status() => ClientError::Protocol(format!(
            "not an HTTP answer ({err}); an agent that serves TLS needs the client to use TLS"
        )),
        None => ClientError::io(std::io::Error::other(err.to_string())),
    }
}

/// A stream id checked to be one path segment, so that no id can reach another endpoint.
fn path_segment(id: &str) -> Result<String, ClientError> {
    let ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(ClientError::NotFound(format!(
            "{id:?} is not a stream id (ids are hex digits; see `immortal ls`)"
        )))
    }
}
