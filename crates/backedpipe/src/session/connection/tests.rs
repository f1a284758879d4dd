//! The connection without sockets: two peers joined by an in-memory link on simulated time,
//! as quinn's `Pair`. The link can be cut (both sides see the transport fail), held (bytes
//! wait), black-holed (bytes vanish, nobody is told) and rewritten in flight; a new path
//! stands in for a resume handshake.

use std::time::{Duration, Instant};

use super::*;
use crate::proto::CloseCode;

const MS: Duration = Duration::from_millis(1);

/// What the link between the peers does with the bytes in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Bytes are delivered.
    Up,
    /// Bytes wait, in order, until the link is up again.
    Held,
    /// Bytes vanish and nobody is told (a black-holed route).
    BlackHole,
}

/// Rewrites bytes in flight.
type Filter = Box<dyn FnMut(&mut Vec<u8>)>;

/// One end of the pair.
struct Peer {
    conn: Connection,
    /// Bytes on their way to this peer, not yet taken.
    inbound: Vec<u8>,
    /// Rewrites the bytes this peer sends, before they reach the link.
    filter: Option<Filter>,
}

struct Pair {
    now: Instant,
    client: Peer,
    server: Peer,
    link: Link,
}

fn options() -> SessionOptions {
    SessionOptions::default()
}

impl Pair {
    /// Two connected peers with `options`.
    fn new(options: &SessionOptions) -> Pair {
        let now = Instant::now();
        let id = SessionId::from_bytes([3; 16]);
        let peer = |side| Peer {
            conn: Connection::new(side, id, options, now).unwrap(),
            inbound: Vec::new(),
            filter: None,
        };
        let mut pair = Pair {
            now,
            client: peer(Side::Client),
            server: peer(Side::Server),
            link: Link::Up,
        };
        pair.reconnect();
        pair
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    /// Moves bytes both ways until neither side has anything more to send or take.
    fn drive(&mut self) {
        for _ in 0..10_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the pair did not settle: livelock");
    }

    /// One exchange each way; returns whether anything moved.
    fn step(&mut self) -> bool {
        let mut moved = false;
        for (from, to) in [(Side::Client, Side::Server), (Side::Server, Side::Client)] {
            let now = self.now;
            let mut wire = Vec::new();
            let sender = self.peer(from);
            sender.conn.poll_transmit_into(now, &mut wire);
            if let Some(filter) = sender.filter.as_mut() {
                filter(&mut wire);
            }
            moved |= !wire.is_empty();
            if self.link == Link::BlackHole {
                wire.clear();
            }
            let link = self.link;
            let receiver = self.peer(to);
            receiver.inbound.extend_from_slice(&wire);
            if link == Link::Up && !receiver.inbound.is_empty() {
                let taken = receiver.conn.handle_input(now, &receiver.inbound);
                receiver.inbound.drain(..taken);
                moved |= taken > 0;
            }
        }
        moved
    }

    /// Moves time forward by `by`, firing each side's timers in order and exchanging after
    /// each.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        self.drive();
        loop {
            let next = [
                self.client.conn.poll_timeout(),
                self.server.conn.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(at) if at <= end => {
                    self.now = self.now.max(at);
                    let now = self.now;
                    self.client.conn.handle_timeout(now);
                    self.server.conn.handle_timeout(now);
                    self.drive();
                }
                _ => break,
            }
        }
        self.now = end;
        self.drive();
    }

    /// Both transports fail (a reset), and the bytes in flight are lost.
    fn cut(&mut self) {
        let now = self.now;
        for peer in [&mut self.client, &mut self.server] {
            peer.conn.handle_transport_lost(now);
            peer.inbound.clear();
        }
    }

    /// A new transport, as the resume handshake would open it: each side's offset checked by
    /// the other, then both start a path.
    fn reconnect(&mut self) {
        let now = self.now;
        let client_offset = self.client.conn.resume_offset();
        let server_offset = self.server.conn.resume_offset();
        self.server
            .conn
            .start_path(now, FrameDecoder::new(), client_offset)
            .unwrap();
        self.client
            .conn
            .start_path(now, FrameDecoder::new(), server_offset)
            .unwrap();
        self.link = Link::Up;
        self.client.inbound.clear();
        self.server.inbound.clear();
    }

    fn events(&mut self, side: Side) -> Vec<Event> {
        std::iter::from_fn(|| self.peer(side).conn.poll_event()).collect()
    }

    /// Writes all of `data` from `side`, driving the pair while the writer waits.
    fn write_all(&mut self, side: Side, mut data: &[u8]) {
        while !data.is_empty() {
            let now = self.now;
            match self.peer(side).conn.write(now, data).unwrap() {
                Some(n) => data = &data[n..],
                None => self.advance(20 * MS),
            }
            self.drive();
        }
    }

    /// Reads everything `side` has received.
    fn read_available(&mut self, side: Side) -> Vec<u8> {
        let now = self.now;
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        while let Ok(Some(n @ 1..)) = self.peer(side).conn.read(now, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
}

#[test]
fn bytes_written_before_a_cut_are_replayed_exactly_once() {
    let mut pair = Pair::new(&options());
    let data = pattern(300_000, 1);
    pair.write_all(Side::Client, &data[..100_000]);
    let mut got = pair.read_available(Side::Server);
    // The rest is sent into a held link and lost with it.
    pair.link = Link::Held;
    pair.write_all(Side::Client, &data[100_000..200_000]);
    pair.cut();
    assert!(!pair.client.conn.has_path());
    pair.reconnect();
    pair.write_all(Side::Client, &data[200_000..]);
    pair.drive();
    got.extend(pair.read_available(Side::Server));
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
    assert_eq!(pair.client.conn.generation(), 2);
}

#[test]
fn bytes_received_and_unread_survive_a_cut_and_are_not_sent_again() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, b"kept across the cut");
    let resume_at = pair.server.conn.resume_offset();
    assert_eq!(resume_at, 19, "received, though not read");
    pair.cut();
    pair.reconnect();
    pair.drive();
    assert_eq!(pair.read_available(Side::Server), b"kept across the cut");
    assert_eq!(
        pair.client.conn.buffered().0,
        0,
        "the resume offset acknowledged them"
    );
}

#[test]
fn bulk_reads_are_acknowledged_every_64_kib_and_a_trickle_after_the_ack_delay() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, &pattern(64 * 1024, 2));
    assert_eq!(pair.read_available(Side::Server).len(), 64 * 1024);
    pair.drive();
    assert_eq!(
        pair.client.conn.peer_acked(),
        64 * 1024,
        "acknowledged at once"
    );
    pair.write_all(Side::Client, b"x");
    assert_eq!(pair.read_available(Side::Server), b"x");
    pair.drive();
    assert_eq!(pair.client.conn.peer_acked(), 64 * 1024, "a trickle waits");
    pair.advance(20 * MS);
    assert_eq!(pair.client.conn.peer_acked(), 64 * 1024 + 1);
    assert_eq!(
        pair.client.conn.buffered().0,
        0,
        "the replay buffer is trimmed"
    );
}

#[test]
fn a_writer_waits_at_the_capacity_until_acknowledged() {
    let mut pair = Pair::new(&options().pipe(crate::PipeConfig::default().buffer_capacity(1024)));
    let now = pair.now;
    assert_eq!(pair.client.conn.write(now, &[1; 1000]).unwrap(), Some(1000));
    assert_eq!(pair.client.conn.write(now, &[2; 100]).unwrap(), Some(24));
    assert_eq!(pair.client.conn.write(now, &[2; 76]).unwrap(), None);
    pair.drive();
    assert_eq!(
        pair.client.conn.buffered().0,
        1024,
        "nothing unacknowledged evicted"
    );
    pair.events(Side::Client);
    let mut buf = [0; 500];
    assert_eq!(pair.server.conn.read(now, &mut buf).unwrap(), Some(500));
    pair.advance(20 * MS);
    assert!(pair.events(Side::Client).contains(&Event::Writable));
    assert_eq!(pair.client.conn.buffered().0, 524);
    assert_eq!(
        pair.client.conn.write(pair.now, &[2; 76]).unwrap(),
        Some(76)
    );
}

#[test]
fn a_peer_that_stops_reading_cannot_grow_the_writer_past_its_capacity() {
    let mut pair = Pair::new(&options().pipe(crate::PipeConfig::default().buffer_capacity(4096)));
    pair.link = Link::Held;
    let now = pair.now;
    let mut taken = 0;
    while let Some(n) = pair.client.conn.write(now, &[7; 1000]).unwrap() {
        taken += n;
        pair.drive();
    }
    assert_eq!(taken, 4096);
    let (held, committed) = pair.client.conn.buffered();
    assert_eq!(held, 4096);
    assert!(committed <= 4096, "{committed} bytes committed");
}

#[test]
fn a_writer_keeps_no_more_than_its_in_flight_window_unacknowledged() {
    const CHUNK: usize = 64 * 1024;
    const WINDOW: u64 = 1 << 20;
    let mut pair =
        Pair::new(&options().pipe(crate::PipeConfig::default().buffer_capacity(16 << 20)));
    pair.link = Link::Held;
    let now = pair.now;
    while pair.client.conn.write(now, &[5; CHUNK]).unwrap().is_some() {
        pair.drive();
    }
    // The window is a threshold: the write that crosses it is taken whole.
    let written = pair.client.conn.written();
    assert!(
        (WINDOW..WINDOW + CHUNK as u64).contains(&written),
        "{written} bytes out for a {WINDOW}-byte window"
    );
    // An acknowledgement of half lets about half as much more through.
    pair.client
        .conn
        .handle_input(now, &Frame::ack(WINDOW / 2).to_vec());
    let mut more = 0;
    while let Some(n) = pair.client.conn.write(now, &[5; CHUNK]).unwrap() {
        more += n as u64;
    }
    assert!(
        (WINDOW / 2 - CHUNK as u64..=WINDOW / 2 + CHUNK as u64).contains(&more),
        "an acknowledgement of {} let {more} more bytes out",
        WINDOW / 2
    );
}

#[test]
fn an_idle_path_is_kept_alive_by_heartbeats() {
    let mut pair = Pair::new(&options());
    pair.events(Side::Client);
    pair.advance(Duration::from_secs(60));
    assert!(pair.client.conn.has_path() && pair.server.conn.has_path());
    assert!(!pair.events(Side::Client).contains(&Event::PathLost));
}

#[test]
fn a_black_holed_path_is_declared_dead_within_the_liveness_bound() {
    let mut pair = Pair::new(&options());
    pair.events(Side::Client);
    pair.link = Link::BlackHole;
    pair.advance(Duration::from_secs(10));
    assert!(
        pair.client.conn.has_path(),
        "not before about two heartbeats"
    );
    pair.advance(Duration::from_millis(1001));
    assert!(!pair.client.conn.has_path() && !pair.server.conn.has_path());
    assert!(pair.events(Side::Client).contains(&Event::PathLost));
    // The session lives on, and resumes.
    pair.reconnect();
    pair.write_all(Side::Server, b"back");
    assert_eq!(pair.read_available(Side::Client), b"back");
}

#[test]
fn a_probed_black_holed_path_is_declared_dead_within_the_probe_bound() {
    let mut pair = Pair::new(&options());
    pair.events(Side::Client);
    pair.link = Link::BlackHole;
    assert!(pair.client.conn.probe_path(Duration::from_secs(2)));
    pair.advance(Duration::from_millis(1999));
    assert!(pair.client.conn.has_path(), "not before the probe's bound");
    pair.advance(Duration::from_millis(2));
    assert!(
        !pair.client.conn.has_path(),
        "dead after 2 s, not the 11 s of the liveness bound"
    );
    assert!(pair.events(Side::Client).contains(&Event::PathLost));
    // Without a path there is nothing to probe.
    assert!(!pair.client.conn.probe_path(Duration::from_secs(2)));
}

#[test]
fn a_probed_live_path_answers_and_stays() {
    let mut pair = Pair::new(&options());
    pair.events(Side::Client);
    let generation = pair.client.conn.generation();
    // A quiet path: the probe's PING is all that crosses, and its PONG keeps the path.
    pair.advance(Duration::from_millis(100));
    let server_generation = pair.server.conn.generation();
    let now = pair.now;
    assert!(pair.client.conn.probe_path(Duration::from_secs(2)));
    let mut wire = Vec::new();
    pair.client.conn.poll_transmit_into(now, &mut wire);
    let mut decoder = FrameDecoder::new();
    decoder.push(&wire);
    assert!(
        matches!(decoder.next_frame(), Ok(Some(Frame::Ping(_)))),
        "the probe sends a PING at once"
    );
    pair.server.conn.handle_input(now, &wire);
    pair.advance(Duration::from_secs(5));
    assert!(pair.client.conn.has_path() && pair.server.conn.has_path());
    assert_eq!(pair.client.conn.generation(), generation);
    assert_eq!(pair.server.conn.generation(), server_generation);
    assert!(!pair.events(Side::Client).contains(&Event::PathLost));
}

#[test]
fn a_reader_that_does_not_read_is_not_taken_for_a_dead_path() {
    let mut pair = Pair::new(&options().receive_limit(64 * 1024));
    pair.write_all(Side::Client, &[1; 200 * 1024]);
    // The server's application reads nothing: its buffer is full, it stops taking bytes.
    pair.advance(Duration::from_secs(30));
    assert!(pair.server.conn.has_path() && pair.client.conn.has_path());
    let held = pair.read_available(Side::Server).len();
    assert!(
        (64 * 1024..=64 * 1024 + READ_CHUNK).contains(&held),
        "{held}"
    );
}

#[test]
fn fin_follows_the_data_is_sent_again_after_a_resume_and_read_once() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, b"last words");
    pair.client.conn.shutdown().unwrap();
    pair.drive();
    assert!(matches!(
        pair.client.conn.write(pair.now, b"more"),
        Err(Error::WriteAfterShutdown)
    ));
    pair.cut();
    pair.reconnect();
    pair.drive();
    assert_eq!(pair.read_available(Side::Server), b"last words");
    let mut buf = [0; 8];
    assert_eq!(pair.server.conn.read(pair.now, &mut buf).unwrap(), Some(0));
    assert_eq!(pair.server.conn.read(pair.now, &mut buf).unwrap(), Some(0));
    // The other direction goes on.
    pair.write_all(Side::Server, b"reply");
    assert_eq!(pair.read_available(Side::Client), b"reply");
    assert!(
        pair.server.conn.error().is_none(),
        "a repeated FIN is no violation"
    );
}

#[test]
fn data_after_fin_is_a_protocol_violation() {
    let mut pair = Pair::new(&options());
    pair.client.conn.shutdown().unwrap();
    pair.drive();
    pair.server
        .conn
        .handle_input(pair.now, &Frame::data(&b"late"[..]).to_vec());
    pair.drive();
    assert!(matches!(pair.server.conn.error(), Some(Error::Protocol(_))));
    assert!(matches!(
        pair.client.conn.error(),
        Some(Error::ClosedByPeer {
            code: CloseCode::ProtocolViolation,
            ..
        })
    ));
}

#[test]
fn close_reaches_the_peer_after_the_data_it_had_not_read() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, b"read me first");
    pair.client.conn.close(pair.now, CloseCode::Normal, "done");
    pair.drive();
    assert!(pair.client.conn.is_ended() && pair.client.conn.error().is_none());
    assert!(pair.events(Side::Server).contains(&Event::Ended));
    assert_eq!(pair.read_available(Side::Server), b"read me first");
    let mut buf = [0; 8];
    assert!(matches!(
        pair.server.conn.read(pair.now, &mut buf),
        Err(Error::ClosedByPeer {
            code: CloseCode::Normal,
            ..
        })
    ));
    assert!(matches!(
        pair.server.conn.write(pair.now, b"x"),
        Err(Error::ClosedByPeer { .. })
    ));
    // The closing side's reads end quietly.
    assert_eq!(pair.client.conn.read(pair.now, &mut buf).unwrap(), Some(0));
}

#[test]
fn a_close_after_the_end_of_stream_still_reads_as_the_end() {
    let mut pair = Pair::new(&options());
    pair.client.conn.shutdown().unwrap();
    pair.drive();
    pair.client.conn.close(pair.now, CloseCode::Normal, "done");
    pair.drive();
    let mut buf = [0; 8];
    assert_eq!(pair.server.conn.read(pair.now, &mut buf).unwrap(), Some(0));
    assert!(pair.server.conn.write(pair.now, b"x").is_err());
}

#[test]
fn a_close_that_cannot_leave_ends_the_session_after_the_linger() {
    let mut pair = Pair::new(&options());
    pair.link = Link::Held;
    // A transport that takes nothing: poll_transmit offers, nobody takes.
    let now = pair.now;
    pair.client.conn.close(now, CloseCode::Normal, "bye");
    assert!(!pair.client.conn.is_ended());
    pair.client.conn.handle_timeout(now + CLOSE_LINGER);
    assert!(pair.client.conn.is_ended());
}

#[test]
fn a_closed_peer_whose_code_says_the_session_survives_only_loses_the_path() {
    let mut pair = Pair::new(&options());
    pair.client.conn.handle_input(
        pair.now,
        &Frame::close(CloseCode::GoingAway, "restarting").to_vec(),
    );
    assert!(!pair.client.conn.has_path() && !pair.client.conn.is_ended());
}

#[test]
fn garbage_gets_a_close_with_protocol_violation() {
    let mut pair = Pair::new(&options());
    pair.client.conn.handle_input(pair.now, &[0x7f, 0, 0, 0, 0]);
    let mut wire = Vec::new();
    pair.client.conn.poll_transmit_into(pair.now, &mut wire);
    let mut decoder = FrameDecoder::new();
    decoder.push(&wire);
    let close = std::iter::from_fn(|| decoder.next_frame().ok().flatten()).last();
    assert!(matches!(close, Some(Frame::Close(c)) if c.code() == CloseCode::ProtocolViolation));
    assert!(matches!(pair.client.conn.error(), Some(Error::Protocol(_))));
}

#[test]
fn an_oversized_frame_is_refused_at_its_header() {
    let mut pair = Pair::new(&options());
    pair.client
        .conn
        .handle_input(pair.now, &[0x01, 0x7f, 0xff, 0xff, 0xff]);
    pair.drive();
    assert!(matches!(
        pair.server.conn.error(),
        Some(Error::ClosedByPeer {
            code: CloseCode::FrameTooLarge,
            ..
        })
    ));
}

#[test]
fn a_handshake_frame_after_the_handshake_is_a_violation() {
    let mut pair = Pair::new(&options());
    pair.server
        .conn
        .handle_input(pair.now, &Frame::hello_new().to_vec());
    pair.drive();
    assert!(matches!(pair.server.conn.error(), Some(Error::Protocol(_))));
}

#[test]
fn an_acknowledgement_of_bytes_never_sent_is_a_violation() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, b"12345");
    let mut lied = false;
    pair.server.filter = Some(Box::new(move |wire| {
        if !std::mem::replace(&mut lied, true) {
            wire.extend_from_slice(&Frame::ack(6).to_vec());
        }
    }));
    pair.server.conn.shutdown().unwrap();
    pair.drive();
    assert!(matches!(pair.client.conn.error(), Some(Error::Protocol(_))));
    assert_eq!(
        pair.client.conn.buffered().0,
        5,
        "nothing released by the lie"
    );
}

#[test]
fn an_acknowledgement_of_bytes_sent_only_on_a_lost_path_is_a_violation() {
    let mut pair = Pair::new(&options());
    // The bytes leave on the first path and are lost with it.
    pair.link = Link::BlackHole;
    pair.write_all(Side::Client, b"lost in flight");
    pair.drive();
    pair.cut();
    pair.reconnect();
    // The peer resumed holding none of them; it acknowledges them before this path carried
    // any.
    let now = pair.now;
    pair.client.conn.handle_input(now, &Frame::ack(14).to_vec());
    pair.link = Link::Up;
    pair.drive();
    assert!(matches!(pair.client.conn.error(), Some(Error::Protocol(_))));
    assert!(pair.events(Side::Server).contains(&Event::Ended));
}

#[test]
fn a_close_without_a_path_leaves_on_the_next_one_as_its_refusal() {
    let mut pair = Pair::new(&options());
    pair.cut();
    let now = pair.now;
    pair.client.conn.close(now, CloseCode::Normal, "bye");
    assert!(pair.client.conn.is_closing() && !pair.client.conn.is_ended());
    // The resume that follows is refused with the session's end, which the caller sends.
    assert!(matches!(
        pair.client.conn.start_path(now, FrameDecoder::new(), 0),
        Err(Error::PipeClosed)
    ));
    // If no transport comes, the linger ends it.
    pair.client.conn.handle_timeout(now + CLOSE_LINGER);
    assert!(pair.client.conn.is_ended() && pair.client.conn.error().is_none());
}

#[test]
fn the_peer_is_heard_from_on_a_path_once_it_sends_a_frame() {
    let mut pair = Pair::new(&options());
    assert!(!pair.client.conn.path_heard_from());
    pair.write_all(Side::Server, b"x");
    pair.drive();
    assert!(pair.client.conn.path_heard_from());
    pair.cut();
    assert!(pair.client.conn.path_heard_from(), "kept after the loss");
    pair.reconnect();
    assert!(
        !pair.client.conn.path_heard_from(),
        "each path proves itself"
    );
}

#[test]
fn a_resume_offset_outside_what_is_held_is_refused_and_changes_nothing() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, &[1; 1000]);
    let _ = pair.read_available(Side::Server);
    pair.advance(20 * MS);
    pair.write_all(Side::Client, &[2; 10]);
    assert_eq!(pair.client.conn.peer_acked(), 1000);
    let before = (pair.client.conn.generation(), pair.client.conn.buffered());
    assert!(matches!(
        pair.client.conn.check_resume(2000),
        Err(Error::InvalidSequenceNumber {
            remote: 2000,
            local: 1010
        })
    ));
    assert!(matches!(
        pair.client
            .conn
            .start_path(pair.now, FrameDecoder::new(), 999),
        Err(Error::ReplayDataUnavailable {
            requested: 999,
            oldest: 1000
        })
    ));
    assert_eq!(
        (pair.client.conn.generation(), pair.client.conn.buffered()),
        before
    );
    assert!(pair.client.conn.has_path(), "the live path is untouched");
}

#[test]
fn a_server_session_left_without_a_path_expires_after_its_ttl() {
    let mut pair = Pair::new(&options().ttl(Duration::from_secs(60)));
    pair.cut();
    pair.advance(Duration::from_secs(59));
    assert!(!pair.server.conn.is_ended());
    pair.advance(Duration::from_secs(2));
    assert!(matches!(
        pair.server.conn.error(),
        Some(Error::SessionExpired(_))
    ));
    assert!(!pair.client.conn.is_ended(), "a client does not expire");
}

// ---- floods: memory bounded whatever the peer does ----

#[test]
fn a_flood_of_pings_from_a_peer_that_reads_nothing_queues_one_pong() {
    let mut pair = Pair::new(&options());
    let ping = Frame::ping(9).to_vec();
    let flood: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 100_000)
        .collect();
    // The server's transport takes nothing: it never transmits during the flood.
    assert_eq!(pair.server.conn.handle_input(pair.now, &flood), flood.len());
    let mut wire = Vec::new();
    pair.server.conn.poll_transmit_into(pair.now, &mut wire);
    assert_eq!(
        wire,
        Frame::pong(9).to_vec(),
        "one PONG, for the latest PING"
    );
}

#[test]
fn a_flood_of_one_byte_data_frames_costs_no_more_than_the_receive_limit() {
    const LIMIT: usize = 256 * 1024;
    let mut pair = Pair::new(&options().receive_limit(LIMIT));
    let frame = Frame::data(&b"x"[..]).to_vec();
    let flood: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() << 20)
        .collect();
    let taken = pair.server.conn.handle_input(pair.now, &flood);
    assert!(taken < flood.len(), "the server stops taking bytes");
    let (held, committed) = pair.server.conn.received_buffered();
    assert!(
        (LIMIT..=LIMIT + READ_CHUNK).contains(&held),
        "{held} bytes held"
    );
    assert!(
        committed <= LIMIT + READ_CHUNK,
        "{committed} bytes committed for a {LIMIT}-byte limit"
    );
    assert!(pair.server.conn.receive_buffer().is_none());
}

#[test]
fn control_frames_and_events_stay_bounded_whatever_is_received() {
    let mut pair = Pair::new(&options());
    pair.write_all(Side::Client, &[1; 100]);
    let mut flood = Vec::new();
    for i in 0..10_000u64 {
        flood.extend_from_slice(&Frame::ping(i).to_vec());
        flood.extend_from_slice(&Frame::ack(100).to_vec());
        flood.extend_from_slice(&Frame::pong(i).to_vec());
    }
    pair.client.conn.handle_input(pair.now, &flood);
    pair.client
        .conn
        .handle_timeout(pair.now + Duration::from_secs(5));
    let transmit = pair.client.conn.poll_transmit(pair.now).unwrap();
    assert!(transmit.len() <= 3 * 13, "{} bytes queued", transmit.len());
    assert!(pair.events(Side::Client).len() <= Event::ALL.len());
}

/// Runs `f` on a thread of its own and says whether it returned within a few seconds (a
/// spinning loop never would).
fn returns(f: impl FnOnce() + std::marker::Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).is_ok()
}

#[test]
fn settings_out_of_range_neither_spin_nor_overflow() {
    use crate::session::SessionConfig;
    // A zero heartbeat would re-arm its timer at the instant it fired.
    let zero_heartbeat = options().timing(SessionConfig {
        heartbeat_interval: Duration::ZERO,
        ..SessionConfig::default()
    });
    assert!(returns(move || {
        let mut pair = Pair::new(&zero_heartbeat);
        let now = pair.now;
        pair.client.conn.handle_timeout(now);
    }));
    // So would a zero liveness bound while this side's receive buffer is full.
    let zero_dead_after = options().receive_limit(1024).timing(SessionConfig {
        dead_after: Duration::ZERO,
        ..SessionConfig::default()
    });
    assert!(returns(move || {
        let mut pair = Pair::new(&zero_dead_after);
        let now = pair.now;
        let frame = Frame::data(vec![0u8; 2048]).to_vec();
        pair.server.conn.handle_input(now, &frame);
        pair.server.conn.handle_timeout(now);
    }));
    // Huge values: no overflow of the window's arithmetic or of an Instant.
    let huge = options()
        .timing(SessionConfig {
            ack_every: u64::MAX,
            ..SessionConfig::default()
        })
        .ttl(Duration::MAX);
    let mut pair = Pair::new(&huge);
    let now = pair.now;
    pair.client.conn.write(now, b"x").unwrap();
    assert!(pair.client.conn.probe_path(Duration::MAX));
    pair.drive();
}

#[test]
fn a_probe_whose_ping_the_transport_has_not_taken_has_not_started() {
    let mut pair = Pair::new(&options());
    pair.advance(100 * MS);
    pair.events(Side::Client);
    let now = pair.now;
    assert!(pair.client.conn.probe_path(500 * MS));
    // The PING is encoded but the transport takes nothing.
    assert!(pair.client.conn.poll_transmit(now).is_some());
    pair.client.conn.handle_timeout(now + 600 * MS);
    assert!(
        pair.client.conn.has_path(),
        "declared dead by a probe whose PING never left"
    );
    // Once taken, the bound runs from then.
    let taken = now + 700 * MS;
    let mut wire = Vec::new();
    pair.client.conn.poll_transmit_into(taken, &mut wire);
    pair.client.conn.handle_timeout(taken + 400 * MS);
    assert!(pair.client.conn.has_path());
    pair.client.conn.handle_timeout(taken + 500 * MS);
    assert!(
        !pair.client.conn.has_path(),
        "the probe's bound passed unanswered"
    );
}

#[test]
fn closes_that_cross_end_both_sides_as_closed() {
    let mut pair = Pair::new(&options());
    let now = pair.now;
    pair.client.conn.close(now, CloseCode::Normal, "bye");
    pair.server.conn.close(now, CloseCode::Normal, "bye");
    // The server's CLOSE reaches the client before the client's own has left.
    let mut wire = Vec::new();
    pair.server.conn.poll_transmit_into(now, &mut wire);
    pair.client.conn.handle_input(now, &wire);
    let mut buf = [0u8; 8];
    assert!(matches!(pair.client.conn.read(now, &mut buf), Ok(Some(0))));
    assert!(pair.client.conn.is_ended());
    assert!(pair.client.conn.error().is_none());
}
