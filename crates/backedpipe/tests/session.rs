//! Session mode end to end: a client and a server over in-memory links that the test cuts,
//! holds (a black hole) and replaces, on paused time. Every test is named for the behaviour it
//! checks.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use backedpipe::proto::{CloseCode, Frame, FrameDecoder, Hello, Mac, SessionId, HEADER_LEN};
use backedpipe::session::SessionConfig;
use backedpipe::{
    connector_fn, Accepted, BoxIo, Error, PipeConfig, PipeState, Session, SessionOptions,
    SessionServer,
};
use common::{guarded, HOUR};
use tokio::io::{
    split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf,
    WriteHalf,
};
use tokio::sync::{mpsc, watch};

/// What the test does to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Open,
    /// Nothing passes, nothing closes: a black hole.
    Held,
    /// Both ends see the connection end.
    Cut,
}

/// A client and whichever server its connector reaches, over links the test controls.
struct Harness {
    /// The server new connections reach (replaced to simulate a restart).
    server: Arc<Mutex<SessionServer>>,
    links: Arc<Mutex<Vec<watch::Sender<LinkState>>>>,
    /// Every byte each link carried from the client to the server (a wiretap).
    taps: Arc<Mutex<Vec<Tap>>>,
    refuse: Arc<AtomicBool>,
    /// Cut every link as soon as the server has accepted a resume on it.
    cut_resumed: Arc<AtomicBool>,
    /// How many transports the client has dialled.
    dials: Arc<watch::Sender<usize>>,
    accepted: mpsc::UnboundedReceiver<Session>,
    accepted_tx: mpsc::UnboundedSender<Session>,
    options: SessionOptions,
}

impl Harness {
    fn new(options: SessionOptions) -> Harness {
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        Harness {
            server: Arc::new(Mutex::new(SessionServer::new(options.clone()))),
            links: Arc::default(),
            taps: Arc::default(),
            refuse: Arc::default(),
            cut_resumed: Arc::default(),
            dials: Arc::new(watch::Sender::new(0)),
            accepted,
            accepted_tx,
            options,
        }
    }

    /// Opens a session and returns both ends of it.
    async fn connect(&mut self) -> (Session, Session) {
        let server = self.server.clone();
        let links = self.links.clone();
        let taps = self.taps.clone();
        let refuse = self.refuse.clone();
        let cut_resumed = self.cut_resumed.clone();
        let dials = self.dials.clone();
        let accepted = self.accepted_tx.clone();
        let connector = connector_fn(move || {
            let server = server.lock().unwrap().clone();
            let (state_tx, state_rx) = watch::channel(LinkState::Open);
            let link = state_tx.clone();
            links.lock().unwrap().push(state_tx);
            let cut_resumed = cut_resumed.clone();
            dials.send_modify(|n| *n += 1);
            let tap = Tap::default();
            taps.lock().unwrap().push(tap.clone());
            let refused = refuse.load(Ordering::SeqCst);
            let accepted = accepted.clone();
            async move {
                if refused {
                    return Err(std::io::ErrorKind::ConnectionRefused.into());
                }
                let (client_io, server_io) = relay(state_rx, tap);
                tokio::spawn(async move {
                    // Resumes attach by themselves; refusals are the client's to see.
                    match server.accept(server_io).await {
                        Ok(Accepted::New(session)) => {
                            let _ = accepted.send(session);
                        }
                        Ok(Accepted::Resumed(_)) if cut_resumed.load(Ordering::SeqCst) => {
                            let _ = link.send(LinkState::Cut);
                        }
                        _ => {}
                    }
                });
                Ok::<BoxIo, std::io::Error>(Box::new(client_io))
            }
        });
        let client = Session::connect(connector, self.options.clone())
            .await
            .expect("client connects");
        let server = self.accepted.recv().await.expect("server side accepted");
        (client, server)
    }

    /// Puts every link made so far in `state`.
    fn set_links(&self, state: LinkState) {
        for link in self.links.lock().unwrap().iter() {
            let _ = link.send(state);
        }
    }
}

/// The bytes one link carried from client to server.
type Tap = Arc<Mutex<Vec<u8>>>;

/// Two in-memory pipes joined by relay tasks that obey `state`; `tap` records what the client
/// sends.
fn relay(state: watch::Receiver<LinkState>, tap: Tap) -> (DuplexStream, DuplexStream) {
    let (client, a) = tokio::io::duplex(64 * 1024);
    let (b, server) = tokio::io::duplex(64 * 1024);
    let (a_read, a_write) = split(a);
    let (b_read, b_write) = split(b);
    tokio::spawn(pump(a_read, b_write, state.clone(), Some(tap)));
    tokio::spawn(pump(b_read, a_write, state, None));
    (client, server)
}

async fn pump(
    mut from: ReadHalf<DuplexStream>,
    mut to: WriteHalf<DuplexStream>,
    mut state: watch::Receiver<LinkState>,
    tap: Option<Tap>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.wait_for(|s| *s == LinkState::Cut) => return,
        };
        match state.wait_for(|s| *s != LinkState::Held).await {
            Ok(s) if *s == LinkState::Open => {}
            _ => return,
        }
        if let Some(tap) = &tap {
            tap.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        tokio::select! {
            written = to.write_all(&buf[..n]) => if written.is_err() { return },
            _ = state.wait_for(|s| *s == LinkState::Cut) => return,
        }
    }
}

/// The byte at `offset` of a test stream: position-dependent, so loss, duplication and
/// reordering all show.
fn pattern(offset: u64, salt: u8) -> u8 {
    (offset ^ (offset >> 8) ^ (offset >> 16)) as u8 ^ salt
}

async fn send_pattern(session: &Session, total: u64, salt: u8) {
    let mut offset = 0u64;
    let mut chunk = Vec::new();
    while offset < total {
        let len = (total - offset).min(7919 + (offset % 5000)) as usize;
        chunk.clear();
        chunk.extend((0..len as u64).map(|i| pattern(offset + i, salt)));
        session.write_all(&chunk).await.expect("write");
        offset += len as u64;
    }
}

/// Reads until end-of-stream, checking every byte; returns how many arrived. `on_progress`
/// is told the running total after every read.
async fn expect_pattern_then_end(
    session: &Session,
    salt: u8,
    mut on_progress: impl FnMut(u64),
) -> u64 {
    let mut buf = vec![0u8; 32 * 1024];
    let mut offset = 0u64;
    loop {
        let n = session.read(&mut buf).await.expect("read");
        if n == 0 {
            return offset;
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            assert_eq!(
                *byte,
                pattern(offset + i as u64, salt),
                "byte {}",
                offset + i as u64
            );
        }
        offset += n as u64;
        on_progress(offset);
    }
}

/// Reads until end-of-stream and returns everything read.
async fn read_to_end(session: &Session) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        let n = session.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

fn small_options() -> SessionOptions {
    SessionOptions::default()
        .pipe(
            PipeConfig::default()
                .buffer_capacity(256 * 1024)
                .backoff(Duration::from_millis(10), Duration::from_millis(100))
                .backoff_seed(7),
        )
        .ttl(HOUR)
}

#[tokio::test(start_paused = true)]
async fn bytes_cross_repeated_cuts_exactly_once_in_both_directions() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        const TOTAL: u64 = 3 * 1024 * 1024;
        const CUT_EVERY: u64 = 300 * 1024;
        let (client, server) = (Arc::new(client), Arc::new(server));
        let links = harness.links.clone();
        let cuts = Arc::new(AtomicU64::new(0));
        // The client's reader cuts every link whenever it has read another 300 KiB.
        let mut next_cut = CUT_EVERY;
        let cut_on_progress = {
            let cuts = cuts.clone();
            move |read: u64| {
                if read >= next_cut {
                    next_cut += CUT_EVERY;
                    cuts.fetch_add(1, Ordering::SeqCst);
                    for link in links.lock().unwrap().iter() {
                        let _ = link.send(LinkState::Cut);
                    }
                }
            }
        };
        let tasks = [
            tokio::spawn({
                let c = client.clone();
                async move {
                    send_pattern(&c, TOTAL, 1).await;
                    c.shutdown().await.unwrap();
                    TOTAL
                }
            }),
            tokio::spawn({
                let s = server.clone();
                async move { expect_pattern_then_end(&s, 1, |_| {}).await }
            }),
            tokio::spawn({
                let s = server.clone();
                async move {
                    send_pattern(&s, TOTAL, 2).await;
                    s.shutdown().await.unwrap();
                    TOTAL
                }
            }),
            tokio::spawn({
                let c = client.clone();
                async move { expect_pattern_then_end(&c, 2, cut_on_progress).await }
            }),
        ];
        for task in tasks {
            assert_eq!(task.await.unwrap(), TOTAL);
        }
        let cuts = cuts.load(Ordering::SeqCst);
        assert!(cuts >= 5, "only {cuts} cuts happened");
        assert!(client.generation() > 5, "the client resumed after each cut");
        // Everything read is acknowledged within the ack delay (virtual time: deterministic),
        // and the writers then hold nothing.
        tokio::time::sleep(SessionConfig::default().ack_delay * 2).await;
        assert_eq!(client.buffered().0, 0);
        assert_eq!(server.buffered().0, 0);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_black_holed_path_is_detected_by_heartbeats_and_the_session_resumes() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        let generation = client.generation();
        let held_at = tokio::time::Instant::now();
        harness.set_links(LinkState::Held);
        // Watch the generation in 100 ms steps of virtual time (state changes can be too quick
        // for a watch receiver to see each one).
        while client.generation() == generation {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                held_at.elapsed() < Duration::from_secs(60),
                "never noticed, state {:?}",
                client.state()
            );
        }
        let detected = held_at.elapsed();
        let timing = SessionConfig::default();
        assert!(
            detected >= timing.dead_after && detected <= timing.dead_after + Duration::from_secs(1),
            "dead path noticed after {detected:?}"
        );
        let mut status = client.status();
        status
            .wait_for(|s| matches!(s, PipeState::Connected))
            .await
            .unwrap();
        assert!(client.generation() > generation);
        client.write_all(b"after the hole").await.unwrap();
        let mut buf = [0u8; 14];
        let mut got = 0;
        while got < buf.len() {
            got += server.read(&mut buf[got..]).await.unwrap();
        }
        assert_eq!(&buf, b"after the hole");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_session_stays_up_on_heartbeats_alone() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, _server) = harness.connect().await;
        let generation = client.generation();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(client.connected());
        assert_eq!(client.generation(), generation, "no reconnect while idle");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_sends_fin_after_the_data_and_the_other_direction_goes_on() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let got = read_to_end(&server).await;
        assert_eq!(got, b"last words");
        let mut buf = [0u8; 8];
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            0,
            "end-of-stream stays"
        );
        // Half-close: the server still talks to the client.
        server.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        let mut n = 0;
        while n < 5 {
            n += client.read(&mut reply[n..]).await.unwrap();
        }
        assert_eq!(&reply, b"reply");
        assert!(matches!(
            client.write_all(b"more").await,
            Err(Error::WriteAfterShutdown)
        ));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn fin_is_sent_again_after_a_reconnect_and_read_once() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        // The link is held, so the data and FIN never reach the server on this connection.
        harness.set_links(LinkState::Held);
        client.write_all(b"0123456789").await.unwrap();
        let shutdown = tokio::spawn(async move {
            client.shutdown().await.unwrap();
            client
        });
        harness.set_links(LinkState::Cut);
        let got = read_to_end(&server).await;
        assert_eq!(got, b"0123456789");
        let client = shutdown.await.unwrap();
        assert!(client.generation() >= 2, "the data came by replay");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_drop_is_never_end_of_stream() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 3];
            let n = server.read(&mut buf).await.unwrap();
            (n, buf, server)
        });
        harness.set_links(LinkState::Cut);
        client.write_all(b"abc").await.unwrap();
        let (n, buf, _server) = reader.await.unwrap();
        assert!(n > 0, "a cut link must not read as end-of-stream");
        assert_eq!(&buf[..n], &b"abc"[..n]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn close_is_never_a_drop_the_peer_gets_closed_by_peer_and_the_server_forgets() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        let table = harness.server.lock().unwrap().clone();
        assert_eq!(table.session_count(), 1);
        client.close().await.unwrap();
        let mut buf = [0u8; 8];
        match server.read(&mut buf).await {
            Err(Error::ClosedByPeer { code, .. }) => assert_eq!(code, CloseCode::Normal),
            other => panic!("expected ClosedByPeer, got {other:?}"),
        }
        let mut status = server.status();
        status.wait_for(PipeState::is_final).await.unwrap();
        drop(server);
        // The table entry goes once the session has ended.
        while table.session_count() != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_blocks_the_writer_at_the_capacity() {
    guarded(async {
        const CAPACITY: usize = 64 * 1024;
        let options = small_options().pipe(
            PipeConfig::default()
                .buffer_capacity(CAPACITY)
                .backoff_seed(1),
        );
        let mut harness = Harness::new(options);
        let (client, server) = harness.connect().await;
        let client = Arc::new(client);
        let data = vec![7u8; 4 * 1024 * 1024];
        let writer = tokio::spawn({
            let client = client.clone();
            async move { client.write_all(&data).await }
        });
        // Paused time only advances when every task is idle: if the write could make progress
        // it would have, so this timeout proves it is blocked.
        let blocked = tokio::time::timeout(HOUR, async {
            while !writer.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            blocked.is_err(),
            "the writer finished without the peer reading"
        );
        let (held, committed) = client.buffered();
        assert!(held <= CAPACITY, "{held} bytes unacknowledged");
        assert!(committed <= CAPACITY, "{committed} bytes of replay memory");
        // Reading releases it.
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < 4 * 1024 * 1024 {
            total += server.read(&mut buf).await.unwrap();
        }
        writer.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_server_answers_session_unknown_and_the_client_stops() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, _server) = harness.connect().await;
        *harness.server.lock().unwrap() = SessionServer::new(small_options());
        harness.set_links(LinkState::Cut);
        let mut buf = [0u8; 1];
        match client.read(&mut buf).await {
            Err(Error::SessionUnknown(id)) => assert_eq!(id, client.id()),
            other => panic!("expected SessionUnknown, got {other:?}"),
        }
        assert!(matches!(client.state(), PipeState::Failed(_)));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_session_left_disconnected_past_its_ttl_expires() {
    guarded(async {
        let mut harness = Harness::new(small_options().ttl(Duration::from_secs(30)));
        let (client, server) = harness.connect().await;
        harness.refuse.store(true, Ordering::SeqCst);
        harness.set_links(LinkState::Cut);
        let mut buf = [0u8; 1];
        match server.read(&mut buf).await {
            Err(Error::SessionExpired(id)) => assert_eq!(id, server.id()),
            other => panic!("expected SessionExpired on the server, got {other:?}"),
        }
        harness.refuse.store(false, Ordering::SeqCst);
        match client.read(&mut buf).await {
            Err(Error::SessionExpired(id)) => assert_eq!(id, client.id()),
            other => panic!("expected SessionExpired on the client, got {other:?}"),
        }
    })
    .await;
}

/// A hand-driven peer speaking frames, for hostile input.
struct RawPeer {
    io: DuplexStream,
    decoder: FrameDecoder,
}

impl RawPeer {
    /// Opens a transport to `server` and returns the peer and the accept's outcome.
    fn open(server: &SessionServer) -> (RawPeer, tokio::task::JoinHandle<Result<Accepted, Error>>) {
        let (ours, theirs) = tokio::io::duplex(4 * 1024 * 1024);
        let server = server.clone();
        let accept = tokio::spawn(async move { server.accept(theirs).await });
        (
            RawPeer {
                io: ours,
                decoder: FrameDecoder::new(),
            },
            accept,
        )
    }

    async fn send(&mut self, frame: Frame) {
        self.io.write_all(&frame.to_vec()).await.unwrap();
    }

    async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(frame);
            }
            let mut buf = [0u8; 4096];
            let n = self.io.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Reads frames until a CLOSE and returns its code.
    async fn close_code(&mut self) -> CloseCode {
        loop {
            match self.recv().await {
                Some(Frame::Close(close)) => return close.code(),
                Some(_) => {}
                None => panic!("connection ended without CLOSE"),
            }
        }
    }
}

/// A live session and its server, for checking that hostile input leaves it alone.
async fn live_session() -> (Harness, Session, Session, SessionServer) {
    let mut harness = Harness::new(small_options());
    let (client, server) = harness.connect().await;
    let table = harness.server.lock().unwrap().clone();
    (harness, client, server, table)
}

async fn assert_undisturbed(client: &Session, server: &Session) {
    let generation = client.generation();
    client.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    let mut n = 0;
    while n < 10 {
        n += server.read(&mut buf[n..]).await.unwrap();
    }
    assert_eq!(&buf, b"still here");
    assert_eq!(client.generation(), generation, "no reconnect happened");
}

#[tokio::test(start_paused = true)]
async fn a_resume_with_a_wrong_secret_is_refused_and_the_live_session_is_untouched() {
    guarded(async {
        let (_harness, client, server, table) = live_session().await;
        let (mut peer, accept) = RawPeer::open(&table);
        peer.send(Frame::hello_resume(
            client.id(),
            1,
            0,
            Mac::from_bytes([0x42; 32]),
        ))
        .await;
        assert_eq!(peer.close_code().await, CloseCode::AuthenticationFailed);
        assert!(matches!(
            accept.await.unwrap(),
            Err(Error::AuthenticationFailed(_))
        ));
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_captured_resume_handshake_replayed_is_refused() {
    guarded(async {
        let (harness, client, server, table) = live_session().await;
        // Force a genuine resume and capture its HELLO off the wire.
        harness.set_links(LinkState::Cut);
        client.write_all(b"x").await.unwrap();
        let mut x = [0u8; 1];
        server.read(&mut x).await.unwrap();
        let captured = harness.taps.lock().unwrap()[1].lock().unwrap().clone();
        let mut decoder = FrameDecoder::new();
        decoder.push(&captured);
        let hello = decoder.next_frame().unwrap().expect("captured HELLO");
        assert!(matches!(
            hello,
            Frame::Hello(Hello::Resume { attempt: 1, .. })
        ));
        // An attacker replays it on a new connection: its attempt number is spent.
        let (mut peer, accept) = RawPeer::open(&table);
        peer.send(hello).await;
        assert_eq!(peer.close_code().await, CloseCode::AuthenticationFailed);
        assert!(matches!(
            accept.await.unwrap(),
            Err(Error::AuthenticationFailed(_))
        ));
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_resume_of_an_unknown_session_gets_session_unknown() {
    guarded(async {
        let (_harness, client, server, table) = live_session().await;
        let (mut peer, accept) = RawPeer::open(&table);
        let stranger = SessionId::from_bytes([9; 16]);
        peer.send(Frame::hello_resume(
            stranger,
            1,
            0,
            Mac::from_bytes([0; 32]),
        ))
        .await;
        assert_eq!(peer.close_code().await, CloseCode::UnknownSession);
        match accept.await.unwrap() {
            Err(Error::SessionUnknown(id)) => assert_eq!(id, stranger),
            other => panic!("expected SessionUnknown, got {other:?}"),
        }
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn garbage_instead_of_a_handshake_gets_protocol_violation() {
    guarded(async {
        let (_harness, client, server, table) = live_session().await;
        let (mut peer, accept) = RawPeer::open(&table);
        peer.io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(peer.close_code().await, CloseCode::ProtocolViolation);
        assert!(matches!(accept.await.unwrap(), Err(Error::Protocol(_))));
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_handshake_that_never_finishes_times_out_without_stalling_others() {
    guarded(async {
        let (mut harness, client, server, table) = live_session().await;
        let started = tokio::time::Instant::now();
        let (_silent, accept) = RawPeer::open(&table);
        // Another client connects while the silent one holds its handshake open.
        let (other_client, other_server) = harness.connect().await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "nobody waited for the silent peer"
        );
        assert!(matches!(
            accept.await.unwrap(),
            Err(Error::HandshakeTimeout(_))
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_undisturbed(&client, &server).await;
        assert_undisturbed(&other_client, &other_server).await;
    })
    .await;
}

/// A session made by hand, so the test can send what a real client never would.
async fn raw_session(table: &SessionServer) -> (RawPeer, Session) {
    let (mut peer, accept) = RawPeer::open(table);
    peer.send(Frame::hello_new()).await;
    assert!(matches!(peer.recv().await, Some(Frame::Welcome { .. })));
    let Ok(Accepted::New(session)) = accept.await.unwrap() else {
        panic!("no session")
    };
    (peer, session)
}

#[tokio::test(start_paused = true)]
async fn an_oversized_frame_gets_frame_too_large_and_other_sessions_carry_on() {
    guarded(async {
        let (_harness, client, server, table) = live_session().await;
        let (mut peer, hostile) = raw_session(&table).await;
        let mut header = [0u8; HEADER_LEN];
        header[0] = 0x01;
        header[1..].copy_from_slice(&(2u32 << 20).to_be_bytes());
        peer.io.write_all(&header).await.unwrap();
        assert_eq!(peer.close_code().await, CloseCode::FrameTooLarge);
        let mut buf = [0u8; 4];
        assert!(matches!(
            hostile.read(&mut buf).await,
            Err(Error::Protocol(_))
        ));
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_ack_of_bytes_never_sent_is_a_protocol_violation() {
    guarded(async {
        let (_harness, client, server, table) = live_session().await;
        let (mut peer, hostile) = raw_session(&table).await;
        peer.send(Frame::ack(1000)).await;
        assert_eq!(peer.close_code().await, CloseCode::ProtocolViolation);
        let mut buf = [0u8; 4];
        assert!(matches!(
            hostile.read(&mut buf).await,
            Err(Error::Protocol(_))
        ));
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn data_after_the_peers_fin_is_a_protocol_violation() {
    guarded(async {
        let (_harness, client, server, table) = live_session().await;
        let (mut peer, hostile) = raw_session(&table).await;
        peer.send(Frame::fin()).await;
        peer.send(Frame::data(&b"late"[..])).await;
        assert_eq!(peer.close_code().await, CloseCode::ProtocolViolation);
        let mut buf = [0u8; 4];
        assert!(matches!(
            hostile.read(&mut buf).await,
            Err(Error::Protocol(_))
        ));
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_connector_reporting_the_session_gone_stops_the_reconnect_loop() {
    guarded(async {
        let server = SessionServer::new(small_options());
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        // The first transport reaches the server; every later attempt is answered, as an HTTP
        // upgrade in front of the session would answer it, with "that session is gone".
        let gone: Arc<Mutex<Option<SessionId>>> = Arc::default();
        let dials = Arc::new(AtomicU64::new(0));
        let (link, link_state) = watch::channel(LinkState::Open);
        let connector = connector_fn({
            let (gone, dials) = (gone.clone(), dials.clone());
            move || {
                let link_state = link_state.clone();
                let (server, accepted_tx) = (server.clone(), accepted_tx.clone());
                let attempt = dials.fetch_add(1, Ordering::SeqCst);
                let gone = *gone.lock().unwrap();
                async move {
                    if attempt > 0 {
                        let id = gone.expect("the test names the session before cutting");
                        return Err(std::io::Error::other(Error::SessionExpired(id)));
                    }
                    let (client_io, server_io) = relay(link_state, Tap::default());
                    tokio::spawn(async move {
                        if let Ok(Accepted::New(session)) = server.accept(server_io).await {
                            let _ = accepted_tx.send(session);
                        }
                    });
                    Ok::<BoxIo, std::io::Error>(Box::new(client_io))
                }
            }
        });
        let client = Session::connect(connector, small_options()).await.unwrap();
        *gone.lock().unwrap() = Some(client.id());
        let _server_side = accepted.recv().await.unwrap();
        link.send(LinkState::Cut).unwrap();
        let mut buf = [0u8; 1];
        match client.read(&mut buf).await {
            Err(Error::SessionExpired(id)) => assert_eq!(id, client.id()),
            other => panic!("expected SessionExpired, got {other:?}"),
        }
        assert_eq!(
            dials.load(Ordering::SeqCst),
            2,
            "no retry after the verdict"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_close_after_the_end_of_stream_was_read_ends_the_session_at_once() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let got = read_to_end(&client).await;
        assert_eq!(got, b"bye");
        // The client has read everything and will not read again: the CLOSE must still end
        // its session (an agent watching the state would otherwise hold it until its TTL).
        server.close().await.unwrap();
        let mut status = client.status();
        let state = status.wait_for(PipeState::is_final).await.unwrap().clone();
        assert!(
            matches!(&state, PipeState::Failed(Error::ClosedByPeer { code, .. }) if *code == CloseCode::Normal),
            "{state:?}"
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn close_waits_for_the_peer_to_acknowledge_what_was_written() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        // The bytes are stuck in a black hole when close is called.
        harness.set_links(LinkState::Held);
        client.write_all(b"last words").await.unwrap();
        let closing = tokio::spawn(async move {
            client.close().await.unwrap();
            client
        });
        // The client notices the dead path, resumes and replays; only after the server has
        // read the bytes does the CLOSE follow them.
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let end = loop {
            match server.read(&mut buf).await {
                Ok(0) => break Ok(0),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(err) => break Err(err),
            }
        };
        assert_eq!(got, b"last words");
        assert!(
            matches!(
                end,
                Err(Error::ClosedByPeer {
                    code: CloseCode::Normal,
                    ..
                })
            ),
            "{end:?}"
        );
        let client = closing.await.unwrap();
        assert!(client.generation() >= 2, "the bytes came by replay");
        assert_eq!(client.buffered().0, 0, "all acknowledged before CLOSE");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_close_while_the_client_is_disconnected_reaches_the_server_on_the_next_transport() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        // The client loses its transport and cannot get another for now.
        harness.refuse.store(true, Ordering::SeqCst);
        harness.set_links(LinkState::Cut);
        let mut status = client.status();
        status
            .wait_for(|state| !matches!(state, PipeState::Connected))
            .await
            .unwrap();
        // The network comes back just as the application closes: the CLOSE goes out on the
        // next transport, as the answer to its RESUMED.
        harness.refuse.store(false, Ordering::SeqCst);
        client.close().await.unwrap();
        assert!(
            matches!(client.state(), PipeState::Closed),
            "{:?}",
            client.state()
        );
        let mut buf = [0u8; 8];
        match server.read(&mut buf).await {
            Err(Error::ClosedByPeer { code, .. }) => assert_eq!(code, CloseCode::Normal),
            other => panic!("expected the client's CLOSE, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_readers_of_one_session_are_each_woken() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        let server = Arc::new(server);
        let (done_tx, mut done) = mpsc::unbounded_channel();
        for _ in 0..2 {
            let server = server.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                let n = server.read(&mut byte).await.unwrap();
                let _ = done_tx.send((n, byte[0]));
            });
        }
        // Both readers wait (spawned tasks run before this one comes back).
        tokio::task::yield_now().await;
        client.write_all(b"a").await.unwrap();
        let first = done.recv().await.unwrap();
        client.write_all(b"b").await.unwrap();
        let second = done.recv().await.unwrap();
        let mut got = [first, second];
        got.sort();
        assert_eq!(got, [(1, b'a'), (1, b'b')]);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transports_that_die_at_once_after_resuming_are_redialled_with_backoff() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, _server) = harness.connect().await;
        harness.cut_resumed.store(true, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        harness.set_links(LinkState::Cut);
        // Every resume is accepted and its transport dies before the server sends anything.
        let mut dials = harness.dials.subscribe();
        dials.wait_for(|n| *n >= 21).await.unwrap();
        let elapsed = start.elapsed();
        // Twenty redials: each waited a backoff delay (10 ms doubling to 100 ms, jittered,
        // seed 7), not a tight loop of handshakes.
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(!client.state().is_final());
    })
    .await;
}

/// A flag another task sets once it gets to run.
fn other_task_ran() -> Arc<AtomicBool> {
    let ran = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let ran = ran.clone();
        async move { ran.store(true, Ordering::SeqCst) }
    });
    ran
}

/// A session spends tokio's cooperative budget as a socket does: writes that always find
/// room (here, in the buffer of a session with no transport) still let other tasks run.
#[tokio::test(start_paused = true)]
async fn a_writer_that_always_finds_room_still_lets_other_tasks_run() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, _server) = harness.connect().await;
        harness.refuse.store(true, Ordering::SeqCst);
        harness.set_links(LinkState::Cut);
        client
            .status()
            .wait_for(|s| !matches!(s, PipeState::Connected))
            .await
            .unwrap();
        let ran = other_task_ran();
        let mut writes = 0;
        // 10,000 bytes fit in the 256 KiB buffer: without the budget this loop never yields.
        while !ran.load(Ordering::SeqCst) && writes < 10_000 {
            assert_eq!(client.write(b"x").await.unwrap(), 1);
            writes += 1;
        }
        assert!(ran.load(Ordering::SeqCst), "the writing task never yielded");
    })
    .await;
}

/// Reads served from bytes the session already holds spend the budget too.
#[tokio::test(start_paused = true)]
async fn a_reader_that_always_finds_bytes_still_lets_other_tasks_run() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, server) = harness.connect().await;
        client.write_all(&[7; 10_000]).await.unwrap();
        // Paused time moves only once every task is idle: by then the server's driver has
        // taken all 10,000 bytes off the transport into the session.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ran = other_task_ran();
        let mut byte = [0u8; 1];
        let mut reads = 0;
        while !ran.load(Ordering::SeqCst) && reads < 10_000 {
            assert_eq!(server.read(&mut byte).await.unwrap(), 1);
            reads += 1;
        }
        assert!(ran.load(Ordering::SeqCst), "the reading task never yielded");
    })
    .await;
}

/// Over a transport that spends the budget itself (tokio's duplex does), a session write still
/// costs one unit, not two: counted twice, the budget would have a throughput run's tasks
/// traded between the runtime's workers twice as often.
#[tokio::test(start_paused = true)]
async fn a_session_write_over_a_tokio_transport_spends_one_unit_of_budget() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, _server) = harness.connect().await;
        let ran = other_task_ran();
        let mut writes = 0;
        while !ran.load(Ordering::SeqCst) && writes < 1000 {
            assert_eq!(client.write(b"x").await.unwrap(), 1);
            writes += 1;
        }
        assert!(ran.load(Ordering::SeqCst), "the writing task never yielded");
        assert!(
            writes > 100,
            "yielded after {writes} writes: the budget was spent twice per write"
        );
    })
    .await;
}

/// A probe after a network change finds a black-holed path dead within its own bound, not the
/// liveness bound, and the client resumes at once; a healthy path is only pinged.
#[tokio::test(start_paused = true)]
async fn a_probed_black_hole_is_resumed_within_the_probe_bound() {
    guarded(async {
        let mut harness = Harness::new(small_options());
        let (client, mut server) = harness.connect().await;
        let generation = client.generation();
        // Healthy: the probe is answered, and the transport kept.
        client.probe_path(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(client.generation(), generation);
        harness.set_links(LinkState::Held);
        let start = tokio::time::Instant::now();
        client.probe_path(Duration::from_secs(2));
        let mut status = client.status();
        status
            .wait_for(|_| client.generation() > generation)
            .await
            .unwrap();
        let elapsed = start.elapsed();
        assert!(
            elapsed <= Duration::from_millis(2100),
            "resumed after {elapsed:?}"
        );
        client.write_all(b"after the probe").await.unwrap();
        let mut buf = [0u8; 15];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after the probe");
    })
    .await;
}

/// A transport that hands what it receives to a read only from a given instant on, and
/// wakes nobody at that instant: only a task that polls it then by itself finds the bytes.
struct LateReads {
    inner: DuplexStream,
    /// Until when received bytes are held back (`None`: passed through).
    until: Arc<Mutex<Option<tokio::time::Instant>>>,
    held: Vec<u8>,
}

impl AsyncRead for LateReads {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let until = *this.until.lock().unwrap();
        if until.is_some_and(|until| tokio::time::Instant::now() < until) {
            // Take what arrives (so its wake is used up) and keep it back.
            loop {
                let mut chunk = [0u8; 4096];
                let mut chunk = ReadBuf::new(&mut chunk);
                match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                    Poll::Ready(Ok(())) if !chunk.filled().is_empty() => {
                        this.held.extend_from_slice(chunk.filled())
                    }
                    Poll::Ready(result) => return Poll::Ready(result),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        if !this.held.is_empty() {
            let n = this.held.len().min(buf.remaining());
            buf.put_slice(&this.held[..n]);
            this.held.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LateReads {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A PONG that is already in the transport when a probe's bound runs out counts: the driver
/// reads what came before it judges its deadlines, so the answered probe keeps the path.
#[tokio::test(start_paused = true)]
async fn a_pong_waiting_in_the_transport_at_the_probe_bound_keeps_the_path() {
    guarded(async {
        let server = SessionServer::new(small_options());
        let until = Arc::new(Mutex::new(None));
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        let connector = connector_fn({
            let until = until.clone();
            move || {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                let server = server.clone();
                let accepted = accepted_tx.clone();
                tokio::spawn(async move {
                    if let Ok(Accepted::New(session)) = server.accept(theirs).await {
                        let _ = accepted.send(session);
                    }
                });
                let io = LateReads {
                    inner: ours,
                    until: until.clone(),
                    held: Vec::new(),
                };
                async move { Ok::<BoxIo, std::io::Error>(Box::new(io)) }
            }
        });
        let client = Session::connect(connector, small_options()).await.unwrap();
        let _server_side = accepted.recv().await.unwrap();
        let generation = client.generation();
        let within = Duration::from_secs(2);
        // The server answers the probe's PING at once; the client's transport hands the
        // PONG to a read exactly at the probe's bound, when only the driver's deadline wakes it.
        *until.lock().unwrap() = Some(tokio::time::Instant::now() + within);
        client.probe_path(within);
        tokio::time::sleep(within * 2).await;
        assert_eq!(
            client.generation(),
            generation,
            "a probe answered by its bound cost the path"
        );
        assert!(matches!(*client.status().borrow(), PipeState::Connected));
    })
    .await;
}
