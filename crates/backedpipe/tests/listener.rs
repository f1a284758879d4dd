//! `SessionListener` over real sockets: new sessions over TCP, Unix sockets and TLS, a resume
//! after the test kills the TCP connection under a session, and a silent client that cannot
//! stall anyone else. Real time (sockets), so every wait is on an event; `guarded_rt` only turns
//! a deadlock into a failure.

mod common;

use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backedpipe::proto::{Frame, FrameDecoder};
use backedpipe::session::Incoming;
use backedpipe::{
    connector_fn, BoxIo, Connector, PipeConfig, PipeState, Session, SessionListener,
    SessionOptions, SessionServer, TcpConnector, TlsAcceptor, TlsConnector, UnixConnector,
};
use common::{guarded_rt, HOUR};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// Options whose handshake timeout is an hour: a listener that waited for one client's
/// handshake before taking the next could only be caught by `guarded_rt`'s deadline.
fn options() -> SessionOptions {
    SessionOptions::default()
        .pipe(
            PipeConfig::default()
                .backoff(Duration::from_millis(5), Duration::from_millis(50))
                .backoff_seed(3),
        )
        .handshake_timeout(HOUR)
}

async fn tcp_listener() -> (TcpListener, SocketAddr) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    (tcp, addr)
}

/// Reads exactly `len` bytes from a session.
async fn read_exactly(session: &Session, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = session.read(&mut buf[got..]).await.expect("read");
        assert_ne!(n, 0, "end of stream after {got} of {len} bytes");
        got += n;
    }
    buf
}

/// Sends `message` each way between `client` and `server` and checks it arrived.
async fn round_trip(client: &Session, server: &Session, message: &[u8]) {
    client.write_all(message).await.unwrap();
    assert_eq!(read_exactly(server, message.len()).await, message);
    server.write_all(message).await.unwrap();
    assert_eq!(read_exactly(client, message.len()).await, message);
}

#[tokio::test]
async fn a_tcp_listener_hands_each_new_session_to_accept() {
    guarded_rt(async {
        let (tcp, addr) = tcp_listener().await;
        let server = SessionServer::new(options());
        let mut listener = SessionListener::new(tcp, server.clone()).unwrap();
        let first = Session::connect(TcpConnector::new(addr), options())
            .await
            .unwrap();
        let second = Session::connect(TcpConnector::new(addr), options())
            .await
            .unwrap();
        let a = listener.accept().await.unwrap();
        let b = listener.accept().await.unwrap();
        // Each accepted session is the server end of one client's session.
        let (first_server, second_server) = if a.id() == first.id() { (a, b) } else { (b, a) };
        assert_eq!(first_server.id(), first.id());
        assert_eq!(second_server.id(), second.id());
        assert_ne!(first.id(), second.id());
        round_trip(&first, &first_server, b"first").await;
        round_trip(&second, &second_server, b"second").await;
        assert_eq!(server.session_count(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_unix_socket_listener_hands_over_a_new_session() {
    guarded_rt(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.sock");
        let unix = UnixListener::bind(&path).unwrap();
        let mut listener = SessionListener::new(unix, SessionServer::new(options())).unwrap();
        let client = Session::connect(UnixConnector::new(&path), options())
            .await
            .unwrap();
        let server = listener.accept().await.unwrap();
        assert_eq!(server.id(), client.id());
        round_trip(&client, &server, b"over a unix socket").await;
        client.shutdown().await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            0,
            "FIN reads as Ok(0)"
        );
    })
    .await;
}

/// A TCP connector that keeps a handle on every connection it opens, so the test can kill the
/// one under a session (both directions, as a dying network would).
#[derive(Clone, Default)]
struct Killable {
    sockets: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Killable {
    fn connector(&self, addr: SocketAddr) -> impl Connector {
        let sockets = self.sockets.clone();
        connector_fn(move || {
            let sockets = sockets.clone();
            async move {
                let stream = TcpStream::connect(addr).await?.into_std()?;
                sockets.lock().unwrap().push(stream.try_clone()?);
                Ok::<BoxIo, std::io::Error>(Box::new(TcpStream::from_std(stream)?))
            }
        })
    }

    fn kill_all(&self) {
        for socket in self.sockets.lock().unwrap().iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    fn opened(&self) -> usize {
        self.sockets.lock().unwrap().len()
    }
}

#[tokio::test]
async fn a_killed_tcp_connection_resumes_through_the_listener_without_accept() {
    guarded_rt(async {
        let (tcp, addr) = tcp_listener().await;
        let server = SessionServer::new(options());
        let mut listener = SessionListener::new(tcp, server.clone()).unwrap();
        let killable = Killable::default();
        let client = Session::connect(killable.connector(addr), options())
            .await
            .unwrap();
        let server_side = listener.accept().await.unwrap();
        round_trip(&client, &server_side, b"before").await;
        let generation = client.generation();

        // Bytes written while the connection dies must arrive exactly once, by replay.
        killable.kill_all();
        client.write_all(b"during").await.unwrap();
        let mut status = client.status();
        status
            .wait_for(|state| {
                matches!(state, PipeState::Connected) && client.generation() > generation
            })
            .await
            .unwrap();
        assert!(killable.opened() >= 2, "over a new TCP connection");
        assert_eq!(read_exactly(&server_side, 6).await, b"during");
        round_trip(&client, &server_side, b"after").await;
        assert_eq!(server.session_count(), 1, "the resume made no new session");

        // The resume never surfaced as a new session: the next accept gets the next client.
        let other = Session::connect(TcpConnector::new(addr), options())
            .await
            .unwrap();
        let next = listener.accept().await.unwrap();
        assert_eq!(next.id(), other.id());
    })
    .await;
}

#[tokio::test]
async fn a_silent_client_does_not_stop_the_next_one_being_accepted() {
    guarded_rt(async {
        let (tcp, addr) = tcp_listener().await;
        let mut listener = SessionListener::new(tcp, SessionServer::new(options())).unwrap();
        // Connects and never sends a byte; the server's handshake timeout is an hour.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let client = Session::connect(TcpConnector::new(addr), options())
            .await
            .unwrap();
        let server = listener.accept().await.unwrap();
        assert_eq!(server.id(), client.id());
        round_trip(&client, &server, b"not stalled").await;
        // The silent client's handshake was waiting all along: it can still finish it.
        silent
            .write_all(&Frame::hello_new().to_vec())
            .await
            .unwrap();
        let mut decoder = FrameDecoder::new();
        let welcome = loop {
            if let Some(frame) = decoder.next_frame().unwrap() {
                break frame;
            }
            let mut buf = [0u8; 1024];
            let n = silent.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "the server dropped the silent client");
            decoder.push(&buf[..n]);
        };
        let Frame::Welcome { session_id, .. } = welcome else {
            panic!("expected WELCOME, got {welcome:?}");
        };
        assert_eq!(listener.accept().await.unwrap().id(), session_id);
    })
    .await;
}

#[tokio::test]
async fn a_failed_handshake_is_not_an_accept_error() {
    guarded_rt(async {
        let (tcp, addr) = tcp_listener().await;
        let mut listener = SessionListener::new(tcp, SessionServer::new(options())).unwrap();
        // Garbage gets a CLOSE and the connection ends; the listener carries on.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        garbage.read_to_end(&mut answer).await.unwrap();
        assert!(!answer.is_empty(), "a CLOSE came back");
        let client = Session::connect(TcpConnector::new(addr), options())
            .await
            .unwrap();
        let server = listener.accept().await.unwrap();
        assert_eq!(server.id(), client.id());
    })
    .await;
}

#[tokio::test]
async fn a_tls_listener_runs_tls_then_the_session_handshake() {
    guarded_rt(async {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["agent.test".into()]).unwrap();
        let cert = dir.path().join("agent.pem");
        let key = dir.path().join("agent.key");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();

        let (tcp, addr) = tcp_listener().await;
        let acceptor = TlsAcceptor::from_pem_files(&cert, &key).unwrap();
        let mut listener = SessionListener::builder(tcp, SessionServer::new(options()))
            .tls(acceptor)
            .start()
            .unwrap();
        // A plain-TCP client cannot start a session on a TLS listener ...
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(&Frame::hello_new().to_vec()).await.unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer).await;
        assert!(
            !matches!(Frame::decode(&answer), Ok(Some((Frame::Welcome { .. }, _)))),
            "a session was opened in clear"
        );
        // ... a TLS client can, and its bytes go both ways.
        let connector =
            TlsConnector::with_pinned_cert(TcpConnector::new(addr), "agent.test", &cert).unwrap();
        let client = Session::connect(connector, options()).await.unwrap();
        let server = listener.accept().await.unwrap();
        assert_eq!(server.id(), client.id());
        round_trip(&client, &server, b"encrypted").await;
    })
    .await;
}

#[tokio::test]
async fn a_channel_of_transports_is_a_source_and_its_end_ends_accept() {
    guarded_rt(async {
        let (transports, incoming) = tokio::sync::mpsc::unbounded_channel::<BoxIo>();
        let mut listener = SessionListener::new(incoming, SessionServer::new(options())).unwrap();
        let connector = connector_fn(move || {
            let transports = transports.clone();
            async move {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                transports
                    .send(Box::new(theirs))
                    .map_err(|_| std::io::ErrorKind::ConnectionRefused)?;
                Ok::<BoxIo, std::io::Error>(Box::new(ours))
            }
        });
        let client = Session::connect(connector, options()).await.unwrap();
        let server = listener.accept().await.unwrap();
        round_trip(&client, &server, b"in memory").await;
        // The connector holds the only sender; once it is gone, no transport can come.
        drop(client);
        match listener.accept().await {
            Err(backedpipe::Error::Io(err)) => {
                assert_eq!(err.kind(), std::io::ErrorKind::NotConnected)
            }
            other => panic!("expected the end of the source, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_session_opened_over_tcp_resumes_through_a_unix_listener_of_the_same_server() {
    guarded_rt(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume.sock");
        let (tcp, addr) = tcp_listener().await;
        let server = SessionServer::new(options());
        let mut over_tcp = SessionListener::new(tcp, server.clone()).unwrap();
        let _over_unix = SessionListener::new(UnixListener::bind(&path).unwrap(), server).unwrap();
        // The first connection goes over TCP, every later one over the Unix socket: the client
        // roams from one transport to the other.
        let dialled = Arc::new(Mutex::new(0));
        let connector = {
            let dialled = dialled.clone();
            let path = path.clone();
            connector_fn(move || {
                let first = {
                    let mut dialled = dialled.lock().unwrap();
                    *dialled += 1;
                    *dialled == 1
                };
                let path = path.clone();
                async move {
                    if first {
                        TcpConnector::new(addr).connect().await
                    } else {
                        UnixConnector::new(path).connect().await
                    }
                }
            })
        };
        let client = Session::connect(connector, options()).await.unwrap();
        let server_side = over_tcp.accept().await.unwrap();
        round_trip(&client, &server_side, b"over tcp").await;
        let generation = client.generation();
        client.force_reconnect().await.unwrap();
        assert!(client.generation() > generation);
        assert_eq!(*dialled.lock().unwrap(), 2);
        round_trip(&client, &server_side, b"over the unix socket").await;
    })
    .await;
}

/// Transports made in memory and handed to a listener through a channel, for paused time.
fn in_memory(transports: tokio::sync::mpsc::UnboundedSender<BoxIo>) -> impl Connector {
    connector_fn(move || {
        let transports = transports.clone();
        async move {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            transports
                .send(Box::new(theirs))
                .map_err(|_| std::io::ErrorKind::ConnectionRefused)?;
            Ok::<BoxIo, std::io::Error>(Box::new(ours))
        }
    })
}

/// How long (in paused time) a client waits for its session while one silent transport, sent
/// first, holds a handshake open, on a listener running at most `max_handshakes` at once.
async fn wait_behind_a_silent_client(max_handshakes: usize) -> Duration {
    const TIMEOUT: Duration = Duration::from_secs(10);
    // The server gives up on a handshake after ten seconds; the client waits an hour.
    let server = SessionServer::new(options().handshake_timeout(TIMEOUT));
    let (transports, incoming) = tokio::sync::mpsc::unbounded_channel::<BoxIo>();
    let mut listener = SessionListener::builder(incoming, server)
        .max_handshakes(max_handshakes)
        .start()
        .unwrap();
    let (_silent, theirs) = tokio::io::duplex(1024);
    transports.send(Box::new(theirs)).unwrap();
    let started = tokio::time::Instant::now();
    let client = Session::connect(in_memory(transports), options())
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(listener.accept().await.unwrap().id(), client.id());
    waited
}

#[tokio::test(start_paused = true)]
async fn handshakes_run_concurrently_up_to_the_configured_bound() {
    common::guarded(async {
        // Room for two: the client is served at once, beside the silent one.
        assert_eq!(wait_behind_a_silent_client(2).await, Duration::ZERO);
        // Room for one: the client waits until the silent handshake times out.
        assert_eq!(
            wait_behind_a_silent_client(1).await,
            Duration::from_secs(10)
        );
    })
    .await;
}

/// A source of transports that can also fail, as the test says.
struct Scripted(tokio::sync::mpsc::UnboundedReceiver<std::io::Result<BoxIo>>);

impl Incoming for Scripted {
    async fn next(&mut self) -> Option<std::io::Result<BoxIo>> {
        self.0.recv().await
    }
}

#[tokio::test(start_paused = true)]
async fn accept_errors_are_logged_and_the_listener_carries_on() {
    common::guarded(async {
        let (script, incoming) = tokio::sync::mpsc::unbounded_channel();
        let mut listener =
            SessionListener::new(Scripted(incoming), SessionServer::new(options())).unwrap();
        // A client that gave up before being accepted: no pause. The listener's own trouble
        // (here, out of file descriptors): a short pause, then it goes on.
        script
            .send(Err(std::io::ErrorKind::ConnectionAborted.into()))
            .unwrap();
        script
            .send(Err(std::io::Error::other("too many open files")))
            .unwrap();
        let started = tokio::time::Instant::now();
        let connector = connector_fn(move || {
            let script = script.clone();
            async move {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                script
                    .send(Ok(Box::new(theirs)))
                    .map_err(|_| std::io::ErrorKind::ConnectionRefused)?;
                Ok::<BoxIo, std::io::Error>(Box::new(ours))
            }
        });
        let client = Session::connect(connector, options()).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(100), "one pause");
        let server = listener.accept().await.unwrap();
        assert_eq!(server.id(), client.id());
        round_trip(&client, &server, b"after the errors").await;
    })
    .await;
}

#[tokio::test]
async fn dropping_the_listener_stops_accepting_and_cancels_handshakes_in_flight() {
    guarded_rt(async {
        let (tcp, addr) = tcp_listener().await;
        let listener = SessionListener::new(tcp, SessionServer::new(options())).unwrap();
        // A client whose handshake is in flight (it never sends HELLO; the timeout is an hour).
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // Once a session has been served, the silent connection's handshake task surely exists.
        let client = Session::connect(TcpConnector::new(addr), options())
            .await
            .unwrap();
        drop(client);
        drop(listener);
        let mut buf = [0u8; 16];
        match silent.read(&mut buf).await {
            Ok(0) => {}
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("the server sent {n} bytes to a client that said nothing"),
        }
        // The socket went with the listener's task.
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "the port still accepts connections");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn new_sessions_nobody_accepts_neither_hold_up_resumes_nor_pile_up() {
    common::guarded(async {
        let (transports, incoming) = tokio::sync::mpsc::unbounded_channel::<BoxIo>();
        let mut listener = SessionListener::builder(incoming, SessionServer::new(options()))
            .backlog(1)
            .max_handshakes(1)
            .start()
            .unwrap();
        let client = Session::connect(in_memory(transports.clone()), options())
            .await
            .unwrap();
        let server_side = listener.accept().await.unwrap();
        // Three new sessions the application does not accept: one fills the backlog, one
        // waits for room, the third is closed with a reason.
        let mut unaccepted = Vec::new();
        for _ in 0..3 {
            let session = Session::connect(in_memory(transports.clone()), options())
                .await
                .unwrap();
            unaccepted.push(session);
        }
        let mut buf = [0u8; 1];
        match unaccepted[2].read(&mut buf).await {
            Err(backedpipe::Error::ClosedByPeer { code, reason }) => {
                assert_eq!(code, backedpipe::proto::CloseCode::Normal);
                assert!(reason.contains("busy"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The first session still resumes through the one handshake slot.
        let generation = client.generation();
        client.force_reconnect().await.unwrap();
        assert!(client.generation() > generation);
        round_trip(&client, &server_side, b"resumed").await;
        // The two that waited are accepted in order.
        assert_eq!(listener.accept().await.unwrap().id(), unaccepted[0].id());
        assert_eq!(listener.accept().await.unwrap().id(), unaccepted[1].id());
    })
    .await;
}
