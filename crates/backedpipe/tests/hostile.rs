//! Hostile input to session mode that `tests/session.rs` does not already cover: resume offsets
//! outside what a side can replay (ahead of what it sent, or behind what it still keeps),
//! oversized or mis-sized frames in the handshake, and handshakes that stall (before HELLO, and
//! halfway through a resume HELLO aimed at a live session). Each test checks the typed error,
//! the close code the hostile peer receives, and that the live sessions carry on undisturbed.
//! In-memory transports, paused time.

mod common;

use std::time::Duration;

use backedpipe::proto::{
    server_proof, ClientHandshake, CloseCode, Frame, FrameDecoder, Hello, Mac, Secret, SessionId,
    HEADER_LEN,
};
use backedpipe::{
    connector_fn, Accepted, BoxIo, Error, PipeConfig, PipeState, Session, SessionOptions,
    SessionServer,
};
use common::{guarded, HOUR};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn options() -> SessionOptions {
    SessionOptions::default()
        .pipe(
            PipeConfig::default()
                .buffer_capacity(64 * 1024)
                .backoff(Duration::from_millis(10), Duration::from_millis(100))
                .backoff_seed(5),
        )
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .ttl(HOUR)
}

/// A well-behaved client session and its server end, on `server`.
async fn live_session(server: &SessionServer) -> (Session, Session) {
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    let server = server.clone();
    let connector = connector_fn(move || {
        let server = server.clone();
        let accepted_tx = accepted_tx.clone();
        async move {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                if let Ok(Accepted::New(session)) = server.accept(theirs).await {
                    let _ = accepted_tx.send(session);
                }
            });
            Ok::<BoxIo, std::io::Error>(Box::new(ours))
        }
    });
    let client = Session::connect(connector, options()).await.unwrap();
    let server_end = accepted.recv().await.unwrap();
    (client, server_end)
}

/// Reads exactly `len` bytes from a session.
async fn read_exactly(session: &Session, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = session.read(&mut buf[got..]).await.unwrap();
        assert_ne!(n, 0, "end of stream");
        got += n;
    }
    buf
}

/// Both ends still carry bytes both ways, over the same connection as before.
async fn assert_undisturbed(client: &Session, server: &Session) {
    let generations = (client.generation(), server.generation());
    client.write_all(b"still here").await.unwrap();
    assert_eq!(read_exactly(server, 10).await, b"still here");
    server.write_all(b"and here").await.unwrap();
    assert_eq!(read_exactly(client, 8).await, b"and here");
    assert_eq!(
        (client.generation(), server.generation()),
        generations,
        "no reconnect happened"
    );
    assert!(matches!(client.state(), PipeState::Connected));
    assert!(matches!(server.state(), PipeState::Connected));
}

/// A hand-driven client speaking frames.
struct RawPeer {
    io: DuplexStream,
    decoder: FrameDecoder,
}

impl RawPeer {
    /// Opens a transport to `server` and returns the peer and the accept's outcome.
    fn open(server: &SessionServer) -> (RawPeer, JoinHandle<Result<Accepted, Error>>) {
        let (ours, theirs) = tokio::io::duplex(4 * 1024 * 1024);
        let server = server.clone();
        let accept = tokio::spawn(async move { server.accept(theirs).await });
        let peer = RawPeer {
            io: ours,
            decoder: FrameDecoder::new(),
        };
        (peer, accept)
    }

    async fn send(&mut self, frame: &Frame) {
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

    /// The next DATA frame's bytes, skipping control frames.
    async fn recv_data(&mut self) -> Vec<u8> {
        loop {
            match self.recv().await {
                Some(Frame::Data(bytes)) => return bytes.to_vec(),
                Some(Frame::Close(close)) => panic!("closed: {close:?}"),
                Some(_) => {}
                None => panic!("the connection ended"),
            }
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

/// A session opened by a raw peer, which thereby knows its secret (as a client that turned
/// hostile, or stole it, would) and can make resume proofs for any offset.
async fn raw_session(table: &SessionServer) -> (RawPeer, Session, SessionId, Secret) {
    let (mut peer, accept) = RawPeer::open(table);
    let (state, hello) = ClientHandshake::new_session();
    peer.send(&hello).await;
    let welcome = peer.recv().await.expect("WELCOME");
    let established = state.handle_frame(welcome).expect("a valid WELCOME");
    let Ok(Accepted::New(session)) = accept.await.unwrap() else {
        panic!("no session");
    };
    let id = established.session_id();
    assert_eq!(session.id(), id);
    (peer, session, id, established.secret().clone())
}

/// Runs the first resume of `id` with a genuine proof for `client_reader_seq` on a new
/// transport, and returns the close code the server answers it with and the accept's outcome.
async fn resume_at(
    table: &SessionServer,
    id: SessionId,
    secret: Secret,
    client_reader_seq: u64,
) -> (CloseCode, Result<Accepted, Error>) {
    let (mut peer, accept) = RawPeer::open(table);
    let (_expect_resumed, hello) = ClientHandshake::resume(id, secret, 1, client_reader_seq);
    peer.send(&hello).await;
    let code = peer.close_code().await;
    (code, accept.await.unwrap())
}

/// The raw session's first connection still works both ways: the server end's bytes reach the
/// raw peer as DATA and the raw peer's DATA reaches the server end.
async fn assert_raw_connection_live(peer: &mut RawPeer, session: &Session, generation: u64) {
    session.write_all(b"more").await.unwrap();
    assert_eq!(peer.recv_data().await, b"more");
    peer.send(&Frame::data(&b"from the peer"[..])).await;
    assert_eq!(read_exactly(session, 13).await, b"from the peer");
    assert_eq!(session.generation(), generation, "not detached");
    assert!(matches!(session.state(), PipeState::Connected));
}

#[tokio::test(start_paused = true)]
async fn a_resume_claiming_bytes_the_server_never_sent_is_refused_before_the_buffer_is_touched() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        let (mut peer, session, id, secret) = raw_session(&table).await;
        session.write_all(b"0123456789").await.unwrap();
        assert_eq!(peer.recv_data().await, b"0123456789");
        let buffered = session.buffered();
        assert_eq!(buffered.0, 10, "unacknowledged, so still held");
        let generation = session.generation();

        // A valid proof, for an offset 990 bytes past the end of what the server wrote.
        let (code, outcome) = resume_at(&table, id, secret, 1000).await;
        assert_eq!(code, CloseCode::ReplayUnavailable);
        match outcome {
            // The same typed error a client gets for a server's lie (one check serves both).
            Err(Error::InvalidSequenceNumber { remote, local }) => {
                assert_eq!((remote, local), (1000, 10));
            }
            other => panic!("expected InvalidSequenceNumber, got {other:?}"),
        }
        assert_eq!(session.buffered(), buffered, "the buffer is untouched");
        assert_raw_connection_live(&mut peer, &session, generation).await;
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_before_the_oldest_byte_kept_is_refused_and_the_session_carries_on() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        let (mut peer, session, id, secret) = raw_session(&table).await;
        session.write_all(b"0123456789").await.unwrap();
        assert_eq!(peer.recv_data().await, b"0123456789");
        // The peer acknowledges all ten bytes, so the server lets them go ...
        peer.send(&Frame::ack(10)).await;
        while session.buffered().0 != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let generation = session.generation();

        // ... then claims, with a valid proof, to have read only four of them.
        let (code, outcome) = resume_at(&table, id, secret, 4).await;
        assert_eq!(code, CloseCode::ReplayUnavailable);
        match outcome {
            Err(Error::ReplayDataUnavailable { requested, oldest }) => {
                assert_eq!((requested, oldest), (4, 10));
            }
            other => panic!("expected ReplayDataUnavailable, got {other:?}"),
        }
        assert_eq!(session.buffered().0, 0);
        assert_raw_connection_live(&mut peer, &session, generation).await;
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_oversized_frame_in_place_of_hello_gets_frame_too_large() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        let (mut peer, accept) = RawPeer::open(&table);
        // A HELLO header announcing 2 MiB: refused on the header, before any payload is read.
        let mut header = [0u8; HEADER_LEN];
        header[0] = 0x10;
        header[1..].copy_from_slice(&(2u32 << 20).to_be_bytes());
        peer.io.write_all(&header).await.unwrap();
        assert_eq!(peer.close_code().await, CloseCode::FrameTooLarge);
        match accept.await.unwrap() {
            Err(Error::Protocol(message)) => assert!(!message.is_empty()),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert_eq!(table.session_count(), 1, "no session was made");
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

/// A peer that has proved nothing cannot make the server buffer a frame a handshake never
/// needs: a DATA header announcing 1 MiB (a size DATA may have) in place of HELLO is refused on
/// its five bytes.
#[tokio::test(start_paused = true)]
async fn a_data_frame_in_place_of_hello_is_refused_at_its_header() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        let (mut peer, accept) = RawPeer::open(&table);
        let mut header = [0u8; HEADER_LEN];
        header[0] = 0x01;
        header[1..].copy_from_slice(&(1u32 << 20).to_be_bytes());
        peer.io.write_all(&header).await.unwrap();
        assert_eq!(peer.close_code().await, CloseCode::ProtocolViolation);
        match accept.await.unwrap() {
            Err(Error::Protocol(message)) => assert!(message.contains("DATA"), "{message}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert_eq!(table.session_count(), 1, "no session was made");
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_resume_hello_with_a_lying_length_aimed_at_a_live_session_is_refused_from_its_header() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        for (length, code) in [
            (2u32 << 20, CloseCode::FrameTooLarge),
            (71, CloseCode::ProtocolViolation),
        ] {
            let (mut peer, accept) = RawPeer::open(&table);
            // The start of a resume HELLO naming the live session, under a header announcing
            // more than a HELLO holds: refused before the rest is read.
            let mut hello =
                Frame::hello_resume(client.id(), 1, 0, Mac::from_bytes([0; 32])).to_vec();
            hello[1..HEADER_LEN].copy_from_slice(&length.to_be_bytes());
            peer.io.write_all(&hello).await.unwrap();
            assert_eq!(peer.close_code().await, code);
            assert!(matches!(accept.await.unwrap(), Err(Error::Protocol(_))));
            assert_undisturbed(&client, &server).await;
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_sends_hello_gets_a_close_when_the_handshake_times_out() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        let started = tokio::time::Instant::now();
        let (mut peer, accept) = RawPeer::open(&table);
        assert_eq!(peer.close_code().await, CloseCode::ProtocolViolation);
        assert_eq!(started.elapsed(), HANDSHAKE_TIMEOUT);
        match accept.await.unwrap() {
            Err(Error::HandshakeTimeout(after)) => assert_eq!(after, HANDSHAKE_TIMEOUT),
            other => panic!("expected HandshakeTimeout, got {other:?}"),
        }
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_resume_hello_that_stalls_halfway_times_out_and_leaves_the_session_attached() {
    guarded(async {
        let table = SessionServer::new(options());
        let (client, server) = live_session(&table).await;
        let started = tokio::time::Instant::now();
        let (mut peer, accept) = RawPeer::open(&table);
        // Names the live session, then never sends the rest of its HELLO (the proof).
        let hello = Frame::hello_resume(client.id(), 1, 0, Mac::from_bytes([0; 32])).to_vec();
        peer.io.write_all(&hello[..HEADER_LEN + 30]).await.unwrap();
        // The live session goes on meanwhile ...
        assert_undisturbed(&client, &server).await;
        assert_eq!(peer.close_code().await, CloseCode::ProtocolViolation);
        assert_eq!(started.elapsed(), HANDSHAKE_TIMEOUT);
        assert!(matches!(
            accept.await.unwrap(),
            Err(Error::HandshakeTimeout(_))
        ));
        // ... and after it, the ten seconds having spanned two heartbeats, on the same
        // connection.
        assert_undisturbed(&client, &server).await;
    })
    .await;
}

/// Reads the next frame from a raw transport; `None` at its end.
async fn next_frame(io: &mut DuplexStream, decoder: &mut FrameDecoder) -> Option<Frame> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return Some(frame);
        }
        let n = io.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        decoder.push(&buf[..n]);
    }
}

/// A server of the test's own, for session `id` with `secret`. Its first connection opens the
/// session and is dropped once the client's first `first_bytes` bytes arrived; every later one
/// answers a resume with a RESUMED whose MAC is genuine but whose offset is `claimed`, and
/// reports the close code the client then sends.
async fn lying_server(
    mut transports: mpsc::UnboundedReceiver<DuplexStream>,
    id: SessionId,
    secret: Secret,
    first_bytes: usize,
    claimed: u64,
    closes: mpsc::UnboundedSender<Option<CloseCode>>,
) {
    let mut first = true;
    while let Some(mut io) = transports.recv().await {
        let mut decoder = FrameDecoder::new();
        if std::mem::take(&mut first) {
            assert!(matches!(
                next_frame(&mut io, &mut decoder).await,
                Some(Frame::Hello(Hello::NewSession))
            ));
            let welcome = Frame::Welcome {
                session_id: id,
                secret: secret.clone(),
            };
            io.write_all(&welcome.to_vec()).await.unwrap();
            let mut seen = 0;
            while seen < first_bytes {
                match next_frame(&mut io, &mut decoder).await {
                    Some(Frame::Data(bytes)) => seen += bytes.len(),
                    Some(_) => {}
                    None => panic!("the client left"),
                }
            }
            continue; // drops the transport: the client must resume
        }
        while let Some(frame) = next_frame(&mut io, &mut decoder).await {
            let answer = match frame {
                Frame::Hello(Hello::Resume {
                    attempt,
                    client_reader_seq,
                    ..
                }) => {
                    assert_eq!(client_reader_seq, 0, "the client read nothing");
                    Frame::Resumed {
                        server_reader_seq: claimed,
                        mac: server_proof(&secret, &id, attempt, 0, claimed),
                    }
                }
                Frame::Close(close) => {
                    let _ = closes.send(Some(close.code()));
                    break;
                }
                _ => continue,
            };
            if io.write_all(&answer.to_vec()).await.is_err() {
                break;
            }
        }
        // The connection ended: report it if no CLOSE came first.
        let _ = closes.send(None);
    }
}

/// A client session against [`lying_server`], resumed once the client wrote `hello`: returns
/// the client after its read failed, and the close codes the lying server saw.
async fn lied_to() -> (Session, mpsc::UnboundedReceiver<Option<CloseCode>>) {
    let id = SessionId::from_bytes([4; 16]);
    let (closes_tx, closes) = mpsc::unbounded_channel();
    let (transports_tx, transports) = mpsc::unbounded_channel::<DuplexStream>();
    tokio::spawn(lying_server(
        transports,
        id,
        Secret::from_bytes([3; 32]),
        5,
        1000,
        closes_tx,
    ));
    let connector = connector_fn(move || {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let _ = transports_tx.send(theirs);
        async move { Ok::<BoxIo, std::io::Error>(Box::new(ours)) }
    });
    let client = Session::connect(connector, options()).await.unwrap();
    assert_eq!(client.id(), id);
    client.write_all(b"hello").await.unwrap();
    let buffered = client.buffered();
    let mut buf = [0u8; 8];
    match client.read(&mut buf).await {
        Err(Error::InvalidSequenceNumber { remote, local }) => {
            assert_eq!((remote, local), (1000, 5));
        }
        other => panic!("expected InvalidSequenceNumber, got {other:?}"),
    }
    assert!(matches!(client.state(), PipeState::Failed(_)));
    assert_eq!(client.buffered(), buffered, "the buffer is untouched");
    (client, closes)
}

#[tokio::test(start_paused = true)]
async fn a_resumed_claiming_bytes_the_client_never_sent_fails_the_client_with_a_typed_error() {
    guarded(async {
        lied_to().await;
    })
    .await;
}

/// The client refuses the lying RESUMED (above) with a CLOSE that says why, so the server can
/// tell the refusal from a network drop, as the server does in the mirror case
/// (`a_resume_claiming_bytes_the_server_never_sent_is_refused_before_the_buffer_is_touched`).
#[tokio::test(start_paused = true)]
async fn a_client_refusing_a_resumed_offset_tells_the_server_why() {
    guarded(async {
        let (_client, mut closes) = lied_to().await;
        assert_eq!(
            closes.recv().await,
            Some(Some(CloseCode::ReplayUnavailable)),
            "the lying server was told why"
        );
    })
    .await;
}
