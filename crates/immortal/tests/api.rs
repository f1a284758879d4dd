//! The agent's HTTP API and upgrades, in process: an [`Agent`] on a loopback port, local
//! services in the test, requests over hyper's client, sessions over raw and WebSocket
//! upgrades. Tests wait on the agent's events (or on conditions), never on a guessed delay; a
//! generous guard turns a hang into a failure.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backedpipe::{
    connector_fn, BoxIo, Connector, Session, SessionOptions, TcpConnector, TlsAcceptor,
    TlsConnector,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use immortal::api::{
    ErrorBody, ErrorCode, StreamInfo, StreamList, ATTACH_KEY_HEADER, UPGRADE_PROTOCOL,
};
use immortal::server::{Agent, AgentConfig, RemovalReason, StreamEvent};
use immortal::token::Token;
use immortal::ws_io::WsIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// The longest any test step may take before the test fails as hung.
const GUARD: Duration = Duration::from_secs(20);

async fn guarded<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(GUARD, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// How a test reaches the agent: plain TCP, or TLS trusting the test certificate.
#[derive(Clone)]
struct Dialer {
    addr: SocketAddr,
    tls: Option<Arc<TlsConnector<TcpConnector>>>,
}

impl Dialer {
    async fn dial(&self) -> std::io::Result<BoxIo> {
        match &self.tls {
            None => Ok(Box::new(TcpStream::connect(self.addr).await?)),
            Some(tls) => tls.connect().await,
        }
    }
}

/// The test certificate (self-signed P-256, for localhost and 127.0.0.1, valid for a century)
/// and its key, made with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1
/// -nodes -days 36500 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1`.
/// The key protects nothing: it exists for these tests only.
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A running agent; stopped when dropped.
struct Harness {
    addr: SocketAddr,
    tls: Option<Arc<TlsConnector<TcpConnector>>>,
    token: Token,
    events: broadcast::Receiver<StreamEvent>,
    run: JoinHandle<std::io::Result<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.run.abort();
    }
}

async fn start(configure: impl FnOnce(&mut AgentConfig)) -> Harness {
    // `RUST_LOG=debug` shows the agent's and the sessions' logs with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let token = Token::generate();
    let mut config = AgentConfig::new("127.0.0.1:0".parse().unwrap(), token.clone());
    configure(&mut config);
    let tls_on = config.tls.is_some();
    let agent = Agent::bind(config).await.unwrap();
    let addr = agent.local_addr();
    let events = agent.subscribe();
    let run = tokio::spawn(agent.run());
    let tls = tls_on.then(|| {
        let tcp = TcpConnector::new(addr);
        let tls = TlsConnector::with_pinned_cert(tcp, "localhost", fixture("agent-cert.pem"));
        Arc::new(tls.unwrap())
    });
    Harness {
        addr,
        tls,
        token,
        events,
        run,
    }
}

/// The answer to a request: its status and body.
struct Answer {
    status: u16,
    body: Bytes,
}

impl Answer {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body {:?} is not the expected JSON: {err}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error_code(&self) -> ErrorCode {
        self.json::<ErrorBody>().error.code
    }
}

impl Harness {
    fn dialer(&self) -> Dialer {
        Dialer {
            addr: self.addr,
            tls: self.tls.clone(),
        }
    }

    /// Sends one request with the agent's token.
    async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Answer {
        let token = self.token.to_hex();
        self.call_as(Some(&token), method, path, body).await
    }

    /// Sends one request presenting `token` (or none).
    async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Answer {
        let io = self.dialer().dial().await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let response = guarded(
            "a response",
            sender.send_request(request.body(Full::new(body)).unwrap()),
        )
        .await
        .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer { status, body }
    }

    async fn create(&self, port: u16) -> StreamInfo {
        let answer = self
            .call("POST", "/v1/streams", Some(json!({ "port": port })))
            .await;
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        answer.json()
    }

    async fn list(&self) -> Vec<StreamInfo> {
        let answer = self.call("GET", "/v1/streams", None).await;
        assert_eq!(answer.status, 200);
        answer.json::<StreamList>().streams
    }

    /// Waits for the first event `pick` accepts, skipping the others.
    async fn event<T>(&mut self, what: &str, mut pick: impl FnMut(&StreamEvent) -> Option<T>) -> T {
        guarded(what, async {
            loop {
                match self.events.recv().await {
                    Ok(event) => {
                        if let Some(found) = pick(&event) {
                            return found;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(err) => panic!("event stream ended: {err}"),
                }
            }
        })
        .await
    }

    async fn removed(&mut self, id: &str) -> RemovalReason {
        self.event(&format!("{id} removed"), |event| match event {
            StreamEvent::Removed {
                id: removed,
                reason,
            } if removed == id => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    async fn connected(&mut self, id: &str) {
        self.event(&format!("{id} connected"), |event| match event {
            StreamEvent::Connected { id: which } if which == id => Some(()),
            _ => None,
        })
        .await
    }

    async fn disconnected(&mut self, id: &str) {
        self.event(&format!("{id} disconnected"), |event| match event {
            StreamEvent::Disconnected { id: which } if which == id => Some(()),
            _ => None,
        })
        .await
    }

    /// A connector that upgrades a fresh connection to the stream, through `link`.
    fn connector(&self, stream: &StreamInfo, carrier: Carrier, link: Link) -> impl Connector {
        let dialer = self.dialer();
        let token = self.token.to_hex();
        let id = stream.id.clone();
        let key = stream.attach_key.clone().unwrap_or_default();
        connector_fn(move || {
            let (dialer, token, id, key, link) = (
                dialer.clone(),
                token.clone(),
                id.clone(),
                key.clone(),
                link.clone(),
            );
            async move {
                if link.offline.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("offline"));
                }
                link.attempts.fetch_add(1, Ordering::SeqCst);
                let io = dialer.dial().await?;
                let io: BoxIo = match carrier {
                    Carrier::Raw => {
                        Box::new(upgrade_raw_over(io, dialer.addr, &token, &id, &key).await?)
                    }
                    Carrier::WebSocket => {
                        Box::new(upgrade_websocket(io, dialer.addr, &token, &id, &key).await?)
                    }
                };
                Ok(link.wrap(io))
            }
        })
    }

    async fn attach(&self, stream: &StreamInfo, carrier: Carrier) -> (Session, Link) {
        let link = Link::default();
        let session = guarded(
            "a new session",
            Session::connect(
                self.connector(stream, carrier, link.clone()),
                SessionOptions::default(),
            ),
        )
        .await
        .unwrap();
        (session, link)
    }
}

#[derive(Debug, Clone, Copy)]
enum Carrier {
    Raw,
    WebSocket,
}

/// The client's path to the agent, which the test can cut (and keep down).
#[derive(Debug, Clone, Default)]
struct Link {
    current: Arc<Mutex<Option<CancellationToken>>>,
    offline: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
}

impl Link {
    /// Puts a relay between the session and `io` that [`Link::cut`] drops.
    fn wrap(&self, io: BoxIo) -> BoxIo {
        let cut = CancellationToken::new();
        *self.current.lock().unwrap() = Some(cut.clone());
        let (ours, mut theirs) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            let mut io = io;
            cut.run_until_cancelled(tokio::io::copy_bidirectional(&mut theirs, &mut io))
                .await;
        });
        Box::new(ours)
    }

    /// Drops the current connection at both ends, as a network loss would.
    fn cut(&self) {
        if let Some(cut) = self.current.lock().unwrap().take() {
            cut.cancel();
        }
    }
}

/// Opens a TCP connection and upgrades it to the raw session protocol, presenting `key` as
/// the attach key.
async fn upgrade_raw(
    addr: SocketAddr,
    token: &str,
    id: &str,
    key: &str,
) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    upgrade_raw_over(tcp, addr, token, id, key).await
}

/// Upgrades a connection to the raw session protocol.
async fn upgrade_raw_over<I: AsyncRead + AsyncWrite + Unpin>(
    mut tcp: I,
    addr: SocketAddr,
    token: &str,
    id: &str,
    key: &str,
) -> std::io::Result<I> {
    let request = format!(
        "GET /v1/streams/{id}/connect HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         {ATTACH_KEY_HEADER}: {key}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    // Read the head byte by byte, so nothing after it is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tcp.read_u8().await?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") {
        return Err(std::io::Error::other(format!("upgrade refused: {head}")));
    }
    assert!(head
        .to_ascii_lowercase()
        .contains(&format!("upgrade: {UPGRADE_PROTOCOL}")));
    Ok(tcp)
}

/// Upgrades a connection to a WebSocket.
async fn upgrade_websocket(
    tcp: BoxIo,
    addr: SocketAddr,
    token: &str,
    id: &str,
    key: &str,
) -> std::io::Result<WsIo<BoxIo>> {
    let mut request = format!("ws://{addr}/v1/streams/{id}/connect")
        .into_client_request()
        .map_err(std::io::Error::other)?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
        .headers_mut()
        .insert(ATTACH_KEY_HEADER, key.parse().unwrap());
    let (ws, _response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .map_err(std::io::Error::other)?;
    Ok(WsIo::new(ws))
}

/// A local service that echoes every connection.
async fn echo_service() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    port
}

/// A local service that hands each accepted connection to the test.
async fn service() -> (u16, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if tx.send(tcp).is_err() {
                break;
            }
        }
    });
    (port, rx)
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Writes `data` and reads back as many bytes, concurrently.
async fn echo_through(session: &Session, data: &[u8]) -> Vec<u8> {
    let write = async {
        let mut sent = 0;
        while sent < data.len() {
            let end = (sent + 16 * 1024).min(data.len());
            sent += session.write(&data[sent..end]).await.unwrap();
        }
    };
    let read = async {
        let mut got = vec![0u8; data.len()];
        let mut filled = 0;
        while filled < got.len() {
            let n = session.read(&mut got[filled..]).await.unwrap();
            assert_ne!(n, 0, "end of stream after {filled} bytes");
            filled += n;
        }
        got
    };
    guarded("the echo", async { tokio::join!(write, read).1 }).await
}

#[tokio::test]
async fn create_list_get_delete() {
    let mut agent = start(|_| {}).await;
    let (port, mut accepted) = service().await;
    let created = agent.create(port).await;
    assert_eq!(created.id.len(), 32);
    assert!(created.id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(created.port, port);
    assert!(!created.name.is_empty());
    assert!(!created.connected);
    assert_eq!(created.last_connected_at, None);
    assert!(humantime::parse_rfc3339(&created.created_at).is_ok());
    // The agent dialled the service at creation.
    let mut local = guarded("the agent's dial", accepted.recv()).await.unwrap();

    let named = agent
        .call(
            "POST",
            "/v1/streams",
            Some(json!({ "port": port, "name": "db" })),
        )
        .await;
    assert_eq!(named.status, 201);
    let named: StreamInfo = named.json();
    assert_eq!(named.name, "db");

    let listed = agent.list().await;
    assert_eq!(
        listed.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&created.id, &named.id],
        "oldest first"
    );
    let one = agent
        .call("GET", &format!("/v1/streams/{}", created.id), None)
        .await;
    assert_eq!(one.status, 200);
    let listed_form = StreamInfo {
        attach_key: None,
        ..created.clone()
    };
    assert_eq!(one.json::<StreamInfo>(), listed_form);

    let deleted = agent
        .call("DELETE", &format!("/v1/streams/{}", created.id), None)
        .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(agent.removed(&created.id).await, RemovalReason::Deleted);
    // The local connection is dropped with the stream.
    let mut rest = Vec::new();
    guarded(
        "the local connection to close",
        local.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.is_empty());
    let gone = agent
        .call("GET", &format!("/v1/streams/{}", created.id), None)
        .await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.error_code(), ErrorCode::StreamNotFound);
    let again = agent
        .call("DELETE", &format!("/v1/streams/{}", created.id), None)
        .await;
    assert_eq!(again.status, 404);
    let named = StreamInfo {
        attach_key: None,
        ..named
    };
    assert_eq!(agent.list().await, vec![named]);
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_and_changes_nothing() {
    let agent = start(|_| {}).await;
    let port = echo_service().await;
    let wrong = Token::generate().to_hex();
    for token in [None, Some(wrong.as_str()), Some("not-hex")] {
        let create = agent
            .call_as(token, "POST", "/v1/streams", Some(json!({ "port": port })))
            .await;
        assert_eq!(create.status, 401);
        assert_eq!(create.error_code(), ErrorCode::Unauthorized);
        let list = agent.call_as(token, "GET", "/v1/streams", None).await;
        assert_eq!(list.status, 401);
    }
    // Authentication comes before the body is even parsed.
    let garbage = agent
        .call_as(Some(&wrong), "POST", "/v1/streams", Some(json!("garbage")))
        .await;
    assert_eq!(garbage.status, 401);
    assert!(agent.list().await.is_empty(), "nothing was created");

    let stream = agent.create(port).await;
    let path = format!("/v1/streams/{}", stream.id);
    for token in [None, Some(wrong.as_str())] {
        assert_eq!(
            agent.call_as(token, "DELETE", &path, None).await.status,
            401
        );
        assert_eq!(agent.call_as(token, "GET", &path, None).await.status, 401);
        let connect = agent
            .call_as(token, "GET", &format!("{path}/connect"), None)
            .await;
        assert_eq!(connect.status, 401);
    }
    let listed_form = StreamInfo {
        attach_key: None,
        ..stream
    };
    assert_eq!(agent.list().await, vec![listed_form], "nothing was deleted");
    // An upgrade with a wrong token is refused too.
    assert!(
        upgrade_raw(agent.addr, &wrong, &agent.list().await[0].id, "")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_refused_port_is_422_dial_failed() {
    let agent = start(|_| {}).await;
    let port = closed_port().await;
    let answer = agent
        .call("POST", "/v1/streams", Some(json!({ "port": port })))
        .await;
    assert_eq!(answer.status, 422);
    let error = answer.json::<ErrorBody>().error;
    assert_eq!(error.code, ErrorCode::DialFailed);
    assert!(
        error.message.contains(&port.to_string()),
        "{}",
        error.message
    );
    assert!(agent.list().await.is_empty());
}

#[tokio::test]
async fn a_service_listening_on_ipv6_loopback_only_is_reached() {
    // A listener on ::1, and the same port on 127.0.0.1 held by a socket that does not listen
    // (so a connection there is refused, and nothing else can take the port meanwhile).
    let (listener, _held) = loop {
        let Ok(listener) = TcpListener::bind("[::1]:0").await else {
            eprintln!("no IPv6 loopback on this machine; nothing to check");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let v4 = tokio::net::TcpSocket::new_v4().unwrap();
        if v4
            .bind((std::net::Ipv4Addr::LOCALHOST, port).into())
            .is_ok()
        {
            break (listener, v4);
        }
    };
    let port = listener.local_addr().unwrap().port();
    let agent = start(|_| {}).await;
    let stream = agent.create(port).await;
    let (mut local, peer) = guarded("the agent's dial", listener.accept())
        .await
        .unwrap();
    assert!(peer.ip().is_loopback() && peer.is_ipv6(), "{peer}");
    let (session, _link) = agent.attach(&stream, Carrier::Raw).await;
    session.write(b"over ::1").await.unwrap();
    let mut got = [0u8; 8];
    guarded("the service to read", local.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"over ::1");
}

#[tokio::test]
async fn bad_requests_are_400() {
    let agent = start(|_| {}).await;
    for body in [
        json!({}),
        json!({ "port": 0 }),
        json!({ "port": 70000 }),
        json!({ "port": 22, "extra": true }),
        json!({ "port": 22, "name": "" }),
    ] {
        let answer = agent.call("POST", "/v1/streams", Some(body.clone())).await;
        assert_eq!(answer.status, 400, "{body}");
        assert_eq!(answer.error_code(), ErrorCode::BadRequest);
    }
    let port = echo_service().await;
    let stream = agent.create(port).await;
    // The connect endpoint without an upgrade.
    let plain = agent
        .call("GET", &format!("/v1/streams/{}/connect", stream.id), None)
        .await;
    assert_eq!(plain.status, 400);
    assert_eq!(plain.error_code(), ErrorCode::BadRequest);
    let nowhere = agent.call("GET", "/v2/elsewhere", None).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.error_code(), ErrorCode::NotFound);
    let wrong_method = agent.call("PUT", "/v1/streams", None).await;
    assert_eq!(wrong_method.status, 405);
}

#[tokio::test]
async fn an_unknown_id_is_404() {
    let agent = start(|_| {}).await;
    let id = "0123456789abcdef0123456789abcdef";
    for (method, path) in [
        ("GET", format!("/v1/streams/{id}")),
        ("DELETE", format!("/v1/streams/{id}")),
        ("GET", format!("/v1/streams/{id}/connect")),
    ] {
        let answer = agent.call(method, &path, None).await;
        assert_eq!(answer.status, 404, "{method} {path}");
        assert_eq!(answer.error_code(), ErrorCode::StreamNotFound);
    }
    let upgrade = upgrade_raw(agent.addr, &agent.token.to_hex(), id, "").await;
    assert!(upgrade.unwrap_err().to_string().contains("404"));
}

#[tokio::test]
async fn when_full_the_oldest_disconnected_is_evicted_and_all_connected_is_503() {
    let mut agent = start(|config| config.max_streams = 2).await;
    let port = echo_service().await;
    let first = agent.create(port).await;
    // Attached once, then gone: evictable (a stream never attached is not, for a while).
    let (session, link) = agent.attach(&first, Carrier::Raw).await;
    agent.connected(&first.id).await;
    link.offline.store(true, Ordering::SeqCst);
    link.cut();
    agent.disconnected(&first.id).await;
    let second = agent.create(port).await;
    let third = agent.create(port).await;
    drop(session);
    assert_eq!(agent.removed(&first.id).await, RemovalReason::Evicted);
    let ids: Vec<String> = agent.list().await.into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![second.id.clone(), third.id.clone()]);

    // With a client on each, nothing can be evicted.
    let (a, _) = agent.attach(&second, Carrier::Raw).await;
    let (b, _) = agent.attach(&third, Carrier::Raw).await;
    assert_eq!(echo_through(&a, b"ping").await, b"ping");
    assert_eq!(echo_through(&b, b"pong").await, b"pong");
    let full = agent
        .call("POST", "/v1/streams", Some(json!({ "port": port })))
        .await;
    assert_eq!(full.status, 503);
    assert_eq!(full.error_code(), ErrorCode::TooManyStreams);
    assert_eq!(agent.list().await.len(), 2);
    assert!(agent.list().await.iter().all(|s| s.connected));
}

#[tokio::test]
async fn a_raw_upgrade_carries_both_ways_and_the_service_close_ends_the_stream() {
    let mut agent = start(|_| {}).await;
    let (port, mut accepted) = service().await;
    let stream = agent.create(port).await;
    let mut local = guarded("the agent's dial", accepted.recv()).await.unwrap();
    let (session, _link) = agent.attach(&stream, Carrier::Raw).await;
    agent.connected(&stream.id).await;

    // Client to service.
    session.write(b"hello").await.unwrap();
    let mut hello = [0u8; 5];
    guarded("the service to read", local.read_exact(&mut hello))
        .await
        .unwrap();
    assert_eq!(&hello, b"hello");
    // Service to client, then the service closes: the client reads every byte, then the end.
    let reply = pattern(300 * 1024, 7);
    local.write_all(&reply).await.unwrap();
    drop(local);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = guarded("the reply", session.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), reply.len());
    assert!(got == reply, "the reply arrived intact");

    let info = agent
        .call("GET", &format!("/v1/streams/{}", stream.id), None)
        .await
        .json::<StreamInfo>();
    assert!(info.connected);
    assert!(info.last_connected_at.is_some());
    assert_eq!(info.bytes_to_service, 5);
    assert_eq!(info.bytes_from_service, reply.len() as u64);

    // The client finishes its direction too, and closes the session once it has read the end:
    // the stream is done and gone.
    session.shutdown().await.unwrap();
    session.close().await.unwrap();
    assert_eq!(agent.removed(&stream.id).await, RemovalReason::Ended);
    assert!(agent.list().await.is_empty());
}

#[tokio::test]
async fn a_websocket_upgrade_carries_messages_larger_than_the_read_buffer() {
    let agent = start(|_| {}).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let (session, _link) = agent.attach(&stream, Carrier::WebSocket).await;
    // Every WebSocket message (64 KiB) is larger than the session's frame-header reads, and a
    // frame spans messages: only reads that keep a message's remainder get this back intact.
    let data = pattern(2 * 1024 * 1024, 3);
    assert!(echo_through(&session, &data).await == data);
    session.close().await.unwrap();
}

#[tokio::test]
async fn a_resume_after_cuts_continues_the_stream_exactly_once() {
    for carrier in [Carrier::Raw, Carrier::WebSocket] {
        let mut agent = start(|_| {}).await;
        let port = echo_service().await;
        let stream = agent.create(port).await;
        let (session, link) = agent.attach(&stream, carrier).await;
        agent.connected(&stream.id).await;
        // Cut the connection three times in the middle of a transfer both ways.
        let data = pattern(1024 * 1024, 1);
        let write = async {
            let mut sent = 0;
            while sent < data.len() {
                let end = (sent + 16 * 1024).min(data.len());
                sent += session.write(&data[sent..end]).await.unwrap();
            }
        };
        let read = async {
            let mut got = Vec::with_capacity(data.len());
            let mut buf = vec![0u8; 32 * 1024];
            let mut cut_at = vec![768 * 1024, 512 * 1024, 256 * 1024];
            while got.len() < data.len() {
                let n = session.read(&mut buf).await.unwrap();
                assert_ne!(n, 0, "end of stream after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
                if cut_at.last().is_some_and(|&at| got.len() >= at) {
                    cut_at.pop();
                    // Cut, and go on reading only once the client has resumed, so every cut
                    // really lands in the middle of the transfer.
                    let generation = session.generation();
                    link.cut();
                    let mut status = session.status();
                    status
                        .wait_for(|state| {
                            matches!(state, backedpipe::PipeState::Connected)
                                && session.generation() > generation
                        })
                        .await
                        .unwrap();
                }
            }
            got
        };
        let got = guarded("the transfer", async { tokio::join!(write, read).1 }).await;
        assert!(
            got == data,
            "{carrier:?}: every byte exactly once, in order"
        );
        assert!(
            link.attempts.load(Ordering::SeqCst) >= 4,
            "{carrier:?}: a resume per cut"
        );
        let info = agent.list().await.remove(0);
        assert_eq!(info.bytes_to_service, data.len() as u64);
        assert_eq!(info.bytes_from_service, data.len() as u64);
        // A CLOSE can only reach the agent over a live connection (else the stream waits for
        // a resume until its time to live): let the client finish resuming first.
        let mut status = session.status();
        guarded(
            "the client to resume",
            status.wait_for(|state| matches!(state, backedpipe::PipeState::Connected)),
        )
        .await
        .unwrap();
        session.close().await.unwrap();
        assert_eq!(agent.removed(&stream.id).await, RemovalReason::Ended);
    }
}

#[tokio::test]
async fn a_stream_disconnected_beyond_the_ttl_expires() {
    let mut agent = start(|config| config.ttl = Duration::from_millis(300)).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let (session, link) = agent.attach(&stream, Carrier::Raw).await;
    agent.connected(&stream.id).await;
    assert_eq!(echo_through(&session, b"before").await, b"before");
    link.offline.store(true, Ordering::SeqCst);
    link.cut();
    agent.disconnected(&stream.id).await;
    assert_eq!(agent.removed(&stream.id).await, RemovalReason::Expired);
    assert!(agent.list().await.is_empty());
    // A client coming back finds the stream gone: its resume is refused with 404.
    let resume = upgrade_raw(
        agent.addr,
        &agent.token.to_hex(),
        &stream.id,
        stream.attach_key.as_deref().unwrap(),
    )
    .await;
    assert!(resume.unwrap_err().to_string().contains("404"));
    drop(session);
}

/// Creates a stream on an agent set up by `configure`, never attaches it, and checks that it
/// expires and its connection to the local service is closed.
async fn a_stream_never_attached_expires(configure: impl FnOnce(&mut AgentConfig)) {
    let mut agent = start(configure).await;
    let (port, mut accepted) = service().await;
    let stream = agent.create(port).await;
    let mut local = guarded("the agent's dial", accepted.recv()).await.unwrap();
    assert_eq!(agent.removed(&stream.id).await, RemovalReason::Expired);
    let mut rest = Vec::new();
    guarded(
        "the local connection to close",
        local.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(agent.list().await.is_empty());
}

#[tokio::test]
async fn a_stream_never_attached_expires_after_the_ttl() {
    a_stream_never_attached_expires(|config| config.ttl = Duration::from_millis(200)).await;
}

/// A creator that never attaches (it died between the create and the upgrade) leaves its
/// stream, and the stream's connection to the local service, for twelve handshake timeouts,
/// not for the whole time to live.
#[tokio::test]
async fn a_stream_whose_creator_never_attaches_goes_long_before_its_ttl() {
    a_stream_never_attached_expires(|config| config.handshake_timeout = Duration::from_millis(100))
        .await;
}

/// A stream whose directions have both ended waits for its client's CLOSE; a client that
/// vanishes meanwhile is reported gone, and the stream can be evicted, not held as connected.
#[tokio::test]
async fn a_finished_stream_whose_client_vanishes_is_reported_disconnected() {
    let mut agent = start(|config| config.max_streams = 1).await;
    let (port, mut accepted) = service().await;
    let stream = agent.create(port).await;
    let mut local = guarded("the agent's dial", accepted.recv()).await.unwrap();
    let (session, link) = agent.attach(&stream, Carrier::Raw).await;
    agent.connected(&stream.id).await;
    // The service ends its output; the client reads the end and ends its own.
    local.shutdown().await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(guarded("the end", session.read(&mut buf)).await.unwrap(), 0);
    session.shutdown().await.unwrap();
    // The service sees the client's end: the agent has carried both, and waits for a CLOSE.
    assert_eq!(
        guarded("the client's end", local.read(&mut buf))
            .await
            .unwrap(),
        0
    );
    link.offline.store(true, Ordering::SeqCst);
    link.cut();
    agent.disconnected(&stream.id).await;
    let other = agent
        .call("POST", "/v1/streams", Some(json!({ "port": port })))
        .await;
    assert_eq!(other.status, 201, "the finished stream was not evictable");
}

#[tokio::test]
async fn a_second_new_session_is_refused_and_the_live_one_keeps_working() {
    let agent = start(|_| {}).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let (live, _link) = agent.attach(&stream, Carrier::Raw).await;
    assert_eq!(echo_through(&live, b"one").await, b"one");
    let second = guarded(
        "the second handshake",
        Session::connect(
            agent.connector(&stream, Carrier::Raw, Link::default()),
            SessionOptions::default(),
        ),
    )
    .await;
    let err = second.expect_err("a second new session on the stream");
    assert!(
        matches!(err, backedpipe::Error::ClosedByPeer { .. }),
        "{err}"
    );
    assert_eq!(echo_through(&live, b"two").await, b"two");
    assert!(agent.list().await[0].connected);
}

#[tokio::test]
async fn deleting_an_attached_stream_closes_the_client_session() {
    let mut agent = start(|_| {}).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let (session, _link) = agent.attach(&stream, Carrier::Raw).await;
    assert_eq!(echo_through(&session, b"x").await, b"x");
    let deleted = agent
        .call("DELETE", &format!("/v1/streams/{}", stream.id), None)
        .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(agent.removed(&stream.id).await, RemovalReason::Deleted);
    let err = guarded("the client to see the close", session.read(&mut [0u8; 8]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, backedpipe::Error::ClosedByPeer { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn stopping_the_agent_closes_every_stream_then_returns() {
    let token = Token::generate();
    let config = AgentConfig::new("127.0.0.1:0".parse().unwrap(), token.clone());
    let agent = Agent::bind(config).await.unwrap();
    let addr = agent.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run_until(async {
        let _ = stopped.await;
    }));
    // A harness view of the same agent, for its helpers (it does not own this agent's task).
    let view = Harness {
        addr,
        tls: None,
        token,
        events: broadcast::channel(1).1,
        run: tokio::spawn(async { Ok(()) }),
    };
    let port = echo_service().await;
    let attached = view.create(port).await;
    let _idle = view.create(port).await;
    let (session, _link) = view.attach(&attached, Carrier::Raw).await;
    assert_eq!(echo_through(&session, b"x").await, b"x");

    stop.send(()).unwrap();
    guarded("the agent to stop", run).await.unwrap().unwrap();
    let err = guarded("the client to see the close", session.read(&mut [0u8; 8]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, backedpipe::Error::ClosedByPeer { .. }),
        "{err}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn over_tls_the_api_and_both_upgrades_work() {
    let agent = start(|config| {
        let acceptor =
            TlsAcceptor::from_pem_files(fixture("agent-cert.pem"), fixture("agent-key.pem"));
        config.tls = Some(acceptor.unwrap());
    })
    .await;
    let port = echo_service().await;
    for carrier in [Carrier::Raw, Carrier::WebSocket] {
        let stream = agent.create(port).await;
        let (session, _link) = agent.attach(&stream, carrier).await;
        let data = pattern(200 * 1024, 9);
        assert!(echo_through(&session, &data).await == data, "{carrier:?}");
        session.close().await.unwrap();
    }
    // Plain HTTP to the TLS port gets no answer, only a closed connection.
    let mut plain = TcpStream::connect(agent.addr).await.unwrap();
    plain
        .write_all(b"GET /v1/streams HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = guarded("the agent to hang up", plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
}

/// With a 64 KiB stream buffer (`--stream-buffer`), the agent never holds more than that of
/// what the service sent and the client has not read: it stops reading the service meanwhile,
/// and every byte still arrives once, in order.
#[tokio::test]
async fn a_stream_holds_no_more_of_the_service_than_its_stream_buffer() {
    const BUFFER: usize = 64 * 1024;
    const SENT: usize = 2 * 1024 * 1024;
    let agent = start(|config| config.stream_buffer = BUFFER).await;
    let (port, mut services) = service().await;
    let stream = agent.create(port).await;
    let (session, _link) = agent.attach(&stream, Carrier::Raw).await;
    let mut local = guarded("the service's connection", services.recv())
        .await
        .unwrap();
    let data = pattern(SENT, 5);
    let service = tokio::spawn({
        let data = data.clone();
        async move {
            local.write_all(&data).await.unwrap();
            local
        }
    });
    let from_service = || async {
        let streams = agent.list().await;
        let info = streams.iter().find(|info| info.id == stream.id).unwrap();
        info.bytes_from_service
    };
    // The client reads nothing yet: the agent takes some of the service's bytes, then waits.
    guarded("the agent to read from the service", async {
        while from_service().await < (BUFFER / 2) as u64 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // Whatever the moment, the agent holds at most the buffer beyond what the client read.
    let mut got = vec![0u8; SENT];
    let mut read = 0;
    while read < SENT {
        let carried = from_service().await;
        assert!(
            carried <= (read + BUFFER) as u64,
            "{carried} bytes taken from the service when the client had read {read}"
        );
        let end = (read + 16 * 1024).min(SENT);
        let n = guarded("the stream", session.read(&mut got[read..end]))
            .await
            .unwrap();
        assert_ne!(n, 0, "end of stream after {read} bytes");
        read += n;
    }
    assert!(got == data, "the bytes arrived altered");
    let _local = guarded("the service's write", service).await.unwrap();
}

#[tokio::test]
async fn a_stream_not_yet_attached_is_never_evicted_and_a_full_agent_says_so() {
    let mut agent = start(|config| config.max_streams = 1).await;
    let port = echo_service().await;
    let first = agent.create(port).await;
    // Its creator has not attached yet: the next create must not take its place.
    let second = agent
        .call("POST", "/v1/streams", Some(json!({ "port": port })))
        .await;
    assert_eq!(second.status, 503);
    assert_eq!(second.error_code(), ErrorCode::TooManyStreams);
    let message = second.json::<ErrorBody>().error.message;
    assert!(
        message.contains("agent full (--max-streams 1)"),
        "{message}"
    );
    // ... and the creator attaches as it meant to.
    let (session, _link) = agent.attach(&first, Carrier::Raw).await;
    agent.connected(&first.id).await;
    assert_eq!(echo_through(&session, b"mine").await, b"mine");
}

#[tokio::test]
async fn only_the_creator_can_attach() {
    let mut agent = start(|_| {}).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let key = stream
        .attach_key
        .clone()
        .expect("the create answer carries the attach key");
    assert!(
        agent.list().await[0].attach_key.is_none(),
        "listings never show the attach key"
    );
    let token = agent.token.to_hex();
    // Another holder of the token, without the key or with a wrong one, is refused: 403.
    for wrong in ["", "0123456789abcdef0123456789abcdef"] {
        let refused = upgrade_raw(agent.addr, &token, &stream.id, wrong).await;
        let refused = refused.unwrap_err().to_string();
        assert!(refused.contains("403"), "{refused}");
    }
    let metrics = agent.call("GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains("immortal_refused_handshakes_total 2\n"),
        "{text}"
    );
    // The creator attaches.
    assert!(upgrade_raw(agent.addr, &token, &stream.id, &key)
        .await
        .is_ok());
    let (session, _link) = agent.attach(&stream, Carrier::Raw).await;
    drop(session);
    let _ = agent.removed(&stream.id).await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_before_it_is_all_sent() {
    let agent = start(|config| config.handshake_timeout = Duration::from_secs(60)).await;
    let token = agent.token.to_hex();
    // Announced too large: refused on the head, nothing of the body read.
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    let head = format!(
        "POST /v1/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 1000000\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let answer = guarded("the 413", read_answer(&mut tcp)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Chunked, with no length announced: refused once past the limit.
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    let head = format!(
        "POST /v1/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("1000\r\n{}\r\n", " ".repeat(0x1000));
    tcp.write_all(chunk.as_bytes()).await.unwrap();
    tcp.write_all(chunk.as_bytes()).await.unwrap();
    let answer = guarded("the 413", read_answer(&mut tcp)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

#[tokio::test]
async fn a_body_that_trickles_in_is_cut_off_at_the_time_limit() {
    let agent = start(|config| config.handshake_timeout = Duration::from_millis(500)).await;
    let token = agent.token.to_hex();
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    let head = format!(
        "POST /v1/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 100\r\n\r\n{{"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The rest never comes: the agent answers 408 and closes.
    let answer = guarded("the 408", read_answer(&mut tcp)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[tokio::test]
async fn at_the_connection_cap_strangers_give_way_to_clients() {
    let agent = start(|config| {
        config.max_connections = 3;
        config.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    // Three connections that say nothing fill the agent.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(agent.addr).await.unwrap());
    }
    // A client with the token still gets in: the oldest stranger is closed for it.
    assert!(guarded("a listing", agent.list()).await.is_empty());
    let mut oldest = idle.remove(0);
    let mut byte = [0u8; 1];
    let read = guarded(
        "the oldest idle connection to close",
        oldest.read(&mut byte),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let metrics = agent.call("GET", "/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(text.contains("immortal_connections_shed_total"), "{text}");
}

#[tokio::test]
async fn healthz_needs_no_token_and_metrics_count_what_happened() {
    let mut agent = start(|_| {}).await;
    let health = agent.call_as(None, "GET", "/healthz", None).await;
    assert_eq!((health.status, &health.body[..]), (200, &b"ok\n"[..]));
    let metrics = agent.call_as(None, "GET", "/metrics", None).await;
    assert_eq!(metrics.status, 401, "metrics need the token");

    let port = echo_service().await;
    let stream = agent.create(port).await;
    let (session, link) = agent.attach(&stream, Carrier::Raw).await;
    agent.connected(&stream.id).await;
    assert_eq!(echo_through(&session, b"hello").await, b"hello");
    link.cut();
    agent.disconnected(&stream.id).await;
    agent.connected(&stream.id).await;
    let metrics = agent.call("GET", "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "immortal_streams 1\n",
        "immortal_streams_connected 1\n",
        "immortal_resumes_total 1\n",
        "immortal_bytes_to_services_total 5\n",
        "immortal_bytes_from_services_total 5\n",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
}

#[tokio::test]
async fn a_first_frame_announcing_more_than_a_hello_is_refused_at_its_header() {
    let agent = start(|config| config.handshake_timeout = Duration::from_secs(60)).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let key = stream.attach_key.clone().unwrap();
    let mut tcp = upgrade_raw(agent.addr, &agent.token.to_hex(), &stream.id, &key)
        .await
        .unwrap();
    // A DATA header announcing 1 MiB, and nothing more: the agent answers CLOSE at once.
    tcp.write_all(&[0x01, 0x00, 0x10, 0x00, 0x00])
        .await
        .unwrap();
    let mut answer = Vec::new();
    guarded("the CLOSE", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    let (frame, _) = backedpipe::proto::Frame::decode(&answer).unwrap().unwrap();
    assert!(
        matches!(frame, backedpipe::proto::Frame::Close(_)),
        "{frame:?}"
    );
}

#[tokio::test]
async fn a_websocket_peer_that_pings_and_never_reads_is_dropped() {
    let agent = start(|config| config.handshake_timeout = Duration::from_secs(1)).await;
    let port = echo_service().await;
    let stream = agent.create(port).await;
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    let head = format!(
        "GET /v1/streams/{}/connect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         {ATTACH_KEY_HEADER}: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        stream.id,
        agent.token.to_hex(),
        stream.attach_key.as_deref().unwrap()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // Masked pings with 125-byte payloads, sent before any HELLO, and nothing ever read. The
    // agent's pongs fill its write buffer up to the cap (later ones replace each other), the
    // handshake timeout passes, and the refusal, which cannot be sent, gives up in time: the
    // connection is dropped. Before, the pongs grew without bound and the refusal blocked
    // forever.
    let mut ping = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    ping.extend_from_slice(&[0u8; 125]);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 512)
        .collect();
    let mut sent = 0usize;
    let flood = async {
        while tcp.write_all(&batch).await.is_ok() {
            sent += batch.len();
        }
    };
    guarded("the agent to drop the flooding peer", flood).await;
    assert!(sent > 0);
}

/// Reads an HTTP answer until the agent closes the connection.
async fn read_answer(tcp: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_request_head_over_16_kib_is_refused() {
    let agent = start(|config| config.handshake_timeout = Duration::from_secs(60)).await;
    let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
    let head = format!(
        "GET /v1/streams HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    // The agent may close before it has read all of it.
    let _ = tcp.write_all(head.as_bytes()).await;
    let answer = guarded("the refusal", read_answer(&mut tcp)).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}
