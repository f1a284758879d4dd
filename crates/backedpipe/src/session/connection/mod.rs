//! The session connection, sans-IO: one per session, across all of its transports. It owns
//! every offset and flag of the session exactly once, and touches no socket and no clock.
//!
//! - [`send`]: the replay buffer (whose start is the peer's acknowledgement and whose end is
//!   what the application wrote) and the in-flight window;
//! - [`recv`]: bytes received and not yet read, what the application read, what we
//!   acknowledged;
//! - [`lifecycle`]: open, each direction's FIN, closing, closed, failed;
//! - [`timer`]: acknowledgement delay, heartbeat, liveness, close linger, expiry;
//! - the current path (here): the transport's frame decoder and what is being written to it.
//!
//! The handshake that opens or resumes a path is not here: it runs before a path exists (see
//! [`proto`](crate::proto)), and its outcome is handed in with
//! [`start_path`](Connection::start_path).

mod lifecycle;
mod recv;
mod send;
mod timer;
mod window;

use std::io::IoSlice;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use self::lifecycle::Lifecycle;
use self::recv::Recv;
use self::send::Send;
use self::timer::{Timer, TimerTable};
use super::options::SessionOptions;
use crate::error::{Error, Result};
use crate::proto::{
    CloseCode, Frame, FrameDecoder, FrameHeader, SessionId, Side, MAX_FRAME_PAYLOAD,
};

/// How long a CLOSE may take to leave before the connection ends anyway.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The most read from the transport at once into the frame decoder. Bounds what one read can
/// add to the decoder (the receive limit bounds the rest).
const READ_CHUNK: usize = 16 * 1024;

/// Something the caller must act on, from [`Connection::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Bytes, the end of the stream or an error wait for the reader.
    Readable,
    /// Writers may go on: the peer acknowledged bytes (room in the replay buffer) or the
    /// session ended.
    Writable,
    /// The transport is to be read again: room was made in the receive buffer, or a new
    /// path started.
    ReceiveRoom,
    /// The path is gone (dead, failed, or replaced): drop its transport. A client resumes; a
    /// server waits for its client to.
    PathLost,
    /// The session ended: closed or failed. Nothing more will happen.
    Ended,
}

impl Event {
    const ALL: [Event; 5] = [
        Event::Readable,
        Event::Writable,
        Event::ReceiveRoom,
        Event::PathLost,
        Event::Ended,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Bytes ready for the transport, in order: `head` (whole frames, or the start of one), then
/// `payload` (stream bytes straight from the replay buffer, which end the frame `head` opens).
/// Write them with one vectored write; report how many were taken with
/// [`Connection::on_transmitted`].
#[derive(Debug)]
pub struct Transmit<'a> {
    /// Encoded frames, or a DATA header.
    pub head: &'a [u8],
    /// Payload bytes of the DATA frame `head` ends with.
    pub payload: [&'a [u8]; 2],
}

impl<'a> Transmit<'a> {
    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.payload[0].len() + self.payload[1].len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parts, for a vectored write.
    pub fn io_slices(&self) -> [IoSlice<'a>; 3] {
        [
            IoSlice::new(self.head),
            IoSlice::new(self.payload[0]),
            IoSlice::new(self.payload[1]),
        ]
    }
}

/// The transport in use: its decoder and what is being written to it.
#[derive(Debug)]
struct Path {
    decoder: FrameDecoder,
    /// Payload bytes of the DATA frame being received still in the transport: read raw, into
    /// the receive buffer or straight into the application's.
    data_left: usize,
    /// Encoded bytes being written, taken from the front.
    out: BytesMut,
    /// The DATA payload that follows `out`: its offset and how many bytes are left.
    payload: Option<(u64, usize)>,
    /// The offset of the next stream byte to frame on this path.
    next_send: u64,
    fin_sent: bool,
    /// The peer's latest PING, to answer. Only the latest: a flood of PINGs costs nothing.
    pong_due: Option<u64>,
    ping_due: bool,
    /// A probe asked for ([`Connection::probe_path`]): the bound within which the peer must be
    /// heard from, counted once the PING is in the transport's hands.
    probe: Option<Duration>,
    /// A probe's PING encoded: the bytes of `out` up to its end, and the bound, which starts
    /// once the transport has taken them.
    probe_ping: Option<(usize, Duration)>,
}

impl Path {
    fn new(decoder: FrameDecoder, next_send: u64) -> Path {
        Path {
            decoder,
            data_left: 0,
            out: BytesMut::new(),
            payload: None,
            next_send,
            fin_sent: false,
            pong_due: None,
            ping_due: false,
            probe: None,
            probe_ping: None,
        }
    }

    fn at_frame_boundary(&self) -> bool {
        self.out.is_empty() && self.payload.is_none()
    }
}

/// The shortest and longest duration a timer is set for: a zero one would fire again at the
/// instant it fired (the caller's loop spinning), and one near [`Duration::MAX`] would
/// overflow an [`Instant`]. Settings outside are taken as these.
const MIN_TIMER: Duration = Duration::from_millis(1);
const MAX_TIMER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// The most bytes between acknowledgements taken from the settings (the window counts in
/// multiples of it).
const MAX_ACK_EVERY: u64 = 1 << 48;

/// `d` within [`MIN_TIMER`] and [`MAX_TIMER`].
fn timer_duration(d: Duration) -> Duration {
    d.clamp(MIN_TIMER, MAX_TIMER)
}

/// One session, sans-IO: the stream's state across every transport that carries it.
///
/// Methods come in four kinds, as in quinn's `Connection`:
/// - getters (`&self`): [`generation`](Self::generation), [`written`](Self::written),
///   [`delivered`](Self::delivered), [`peer_acked`](Self::peer_acked),
///   [`resume_offset`](Self::resume_offset), [`buffered`](Self::buffered), ...;
/// - inputs from the network or the clock: [`start_path`](Self::start_path),
///   [`receive_buffer`](Self::receive_buffer) then [`on_received`](Self::on_received) (or
///   [`handle_input`](Self::handle_input)), [`direct_read_len`](Self::direct_read_len) then
///   [`on_direct_read`](Self::on_direct_read), [`on_transmitted`](Self::on_transmitted),
///   [`handle_transport_lost`](Self::handle_transport_lost),
///   [`handle_timeout`](Self::handle_timeout);
/// - commands from the application: [`read`](Self::read), [`write`](Self::write),
///   [`shutdown`](Self::shutdown), [`close`](Self::close), [`fail`](Self::fail);
/// - outputs, polled in this order after any input: [`poll_transmit`](Self::poll_transmit),
///   [`poll_timeout`](Self::poll_timeout), [`poll_event`](Self::poll_event).
///
/// Every input carries `now`, and successive `now`s must not go backwards.
///
/// Memory is bounded whatever the peer does: the replay buffer by its capacity, received bytes
/// by the receive limit plus one read (16 KiB), the frame decoder by one
/// read plus a frame header (DATA payloads stream through it), outgoing control frames by one
/// of each kind (ACK, PING, PONG, FIN, CLOSE: at most a few hundred bytes), events by one of
/// each kind.
///
/// ```
/// use std::time::Instant;
/// use backedpipe::proto::{FrameDecoder, SessionId, Side};
/// use backedpipe::session::Connection;
/// use backedpipe::SessionOptions;
///
/// let now = Instant::now();
/// let id = SessionId::from_bytes([7; 16]);
/// let options = SessionOptions::default();
/// let mut client = Connection::new(Side::Client, id, &options, now)?;
/// let mut server = Connection::new(Side::Server, id, &options, now)?;
/// client.start_path(now, FrameDecoder::new(), 0)?;
/// server.start_path(now, FrameDecoder::new(), 0)?;
///
/// assert_eq!(client.write(now, b"hello")?, Some(5));
/// let mut wire = Vec::new();
/// client.poll_transmit_into(now, &mut wire);
/// server.handle_input(now, &wire);
/// let mut buf = [0; 16];
/// assert_eq!(server.read(now, &mut buf)?, Some(5));
/// assert_eq!(&buf[..5], b"hello");
/// # Ok::<(), backedpipe::Error>(())
/// ```
#[derive(Debug)]
pub struct Connection {
    side: Side,
    id: SessionId,
    heartbeat_interval: Duration,
    dead_after: Duration,
    ack_every: u64,
    ack_delay: Duration,
    ttl: Duration,
    send: Send,
    recv: Recv,
    lifecycle: Lifecycle,
    path: Option<Path>,
    /// Paths started so far.
    generation: u64,
    /// The peer sent a frame on the latest path (kept after the path is lost).
    heard_from_peer: bool,
    timers: TimerTable,
    /// A CLOSE to send at the next frame boundary.
    close_frame: Option<Frame>,
    next_ping: u64,
    /// Pending [`Event`]s, one bit each.
    events: u8,
}

impl Connection {
    /// A connection for session `id`, with no path yet.
    ///
    /// # Errors
    /// [`Error::InvalidCapacity`] if the options' buffer capacity is zero.
    pub fn new(side: Side, id: SessionId, options: &SessionOptions, now: Instant) -> Result<Self> {
        let timing = &options.timing;
        let ack_every = timing.ack_every.clamp(1, MAX_ACK_EVERY);
        let mut conn = Connection {
            side,
            id,
            heartbeat_interval: timer_duration(timing.heartbeat_interval),
            dead_after: timer_duration(timing.dead_after),
            ack_every,
            ack_delay: timer_duration(timing.ack_delay),
            ttl: timer_duration(options.ttl),
            send: Send::new(options.pipe.capacity(), ack_every)?,
            recv: Recv::new(options.receive_limit),
            lifecycle: Lifecycle::Open,
            path: None,
            generation: 0,
            heard_from_peer: false,
            timers: TimerTable::default(),
            close_frame: None,
            next_ping: 0,
            events: 0,
        };
        conn.arm_expiry(now);
        Ok(conn)
    }

    // ---- getters ----

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// How many paths (transports) have carried the session: 0 before the first.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a transport is attached.
    pub fn has_path(&self) -> bool {
        self.path.is_some()
    }

    /// Whether the peer sent a frame on the latest path after its handshake (it proved
    /// itself: a client that loses it may resume at once).
    pub fn path_heard_from(&self) -> bool {
        self.heard_from_peer
    }

    /// Whether a CLOSE is queued and has not left yet (it goes out on the current path, or
    /// on the next one if there is none; the linger timer bounds the wait).
    pub fn is_closing(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Closing { .. })
    }

    /// Whether the session ended (closed or failed).
    pub fn is_ended(&self) -> bool {
        self.lifecycle.is_ended()
    }

    /// Why the session ended, if it failed (`None` while it lives and after a local close).
    pub fn error(&self) -> Option<Error> {
        match &self.lifecycle {
            Lifecycle::Failed { error, .. } => Some(error.clone()),
            _ => None,
        }
    }

    /// Bytes the application has written.
    pub fn written(&self) -> u64 {
        self.send.written()
    }

    /// Bytes of the peer's stream the application has read.
    pub fn delivered(&self) -> u64 {
        self.recv.delivered()
    }

    /// Bytes of our stream the peer has acknowledged.
    pub fn peer_acked(&self) -> u64 {
        self.send.acked()
    }

    /// Where a resume continues the peer's stream: every byte received so far (read or not).
    pub fn resume_offset(&self) -> u64 {
        self.recv.received()
    }

    /// Bytes held for replay, and the memory committed to hold them.
    pub fn buffered(&self) -> (usize, usize) {
        self.send.buffered()
    }

    /// Received bytes not yet read, and the memory committed to hold them.
    pub fn received_buffered(&self) -> (usize, usize) {
        (self.recv.buffered(), self.recv.committed())
    }

    /// Whether everything written has been acknowledged by the peer.
    pub fn is_acknowledged(&self) -> bool {
        self.send.acked() == self.send.written()
    }

    /// Whether everything written, and FIN after a shutdown, has been handed to the current
    /// transport (false without one).
    pub fn is_flushed(&self) -> bool {
        self.path.as_ref().is_some_and(|path| {
            path.at_frame_boundary()
                && path.next_send == self.send.written()
                && (!self.lifecycle.fin_sent() || path.fin_sent)
        })
    }

    // ---- paths ----

    /// Checks a resuming peer's offset (how much of our stream it holds) before anything is
    /// touched.
    ///
    /// # Errors
    /// [`Error::InvalidSequenceNumber`] (it claims bytes never sent) or
    /// [`Error::ReplayDataUnavailable`] (it is behind what the replay buffer holds).
    pub fn check_resume(&self, peer_offset: u64) -> Result<()> {
        self.send.check_resume(peer_offset)
    }

    /// A transport was opened and its handshake agreed that the peer holds `peer_offset`
    /// bytes of our stream (it has our [`resume_offset`](Self::resume_offset)). `decoder`
    /// holds whatever the handshake read past its last frame. Any previous path is dropped
    /// (the client roamed). Sending resumes from `peer_offset`, FIN follows again after a
    /// shutdown, and the path counts as alive from `now`.
    ///
    /// # Errors
    /// As for [`check_resume`](Self::check_resume), with nothing changed; and
    /// [`Error::PipeClosed`] (or the session's error) once it has ended.
    pub fn start_path(
        &mut self,
        now: Instant,
        decoder: FrameDecoder,
        peer_offset: u64,
    ) -> Result<()> {
        if let Some(err) = self.ended_error() {
            return Err(err);
        }
        self.send.check_resume(peer_offset)?;
        let mut decoder = decoder;
        decoder.end_handshake();
        self.send.on_new_path(peer_offset);
        self.recv.on_new_path();
        self.path = Some(Path::new(decoder, peer_offset));
        self.generation += 1;
        self.heard_from_peer = false;
        self.timers.stop(Timer::Expiry);
        self.timers.stop(Timer::AckDelay);
        self.timers
            .set(Timer::Heartbeat, now + self.heartbeat_interval);
        self.timers.set(Timer::Idle, now + self.dead_after);
        // The peer's offset acknowledged bytes: writers may have room. The new transport is
        // to be read, by the reader (it waited on the old one) and by whoever drives I/O.
        self.emit(Event::Writable);
        self.emit(Event::Readable);
        self.emit(Event::ReceiveRoom);
        // Frames the handshake read past its own.
        self.process_decoder(now);
        Ok(())
    }

    /// The transport failed, or its peer closed it (EOF, even in the middle of a frame: that
    /// is transport loss, not corruption). The session goes on without a path.
    pub fn handle_transport_lost(&mut self, now: Instant) {
        if self.path.is_none() {
            return;
        }
        if matches!(self.lifecycle, Lifecycle::Closing { .. }) {
            // Nobody is left to tell.
            self.finish_closing();
            return;
        }
        self.drop_path(now);
    }

    /// Checks the current path now, when there is reason to doubt it (the machine's network
    /// changed): a PING goes out with the next transmit, and once it is in the transport's
    /// hands the path is declared dead unless something arrives from the peer within
    /// `within`, instead of only after the liveness bound. Returns whether a path is being
    /// checked (`false` without a path, or while closing, when nothing watches the peer's
    /// silence).
    ///
    /// A path bound to an address that went away loses its packets without a word, so
    /// without this the session would wait out the whole liveness bound before resuming.
    /// Two cases keep the liveness bound: a PING that cannot leave (the transport takes
    /// nothing) starts no probe, and while this side's application leaves the receive limit
    /// full the peer's silence proves nothing (as for the liveness bound itself). A peer
    /// whose own application stopped reading, so that it reads no frames either, answers
    /// only with its heartbeat: a `within` shorter than the heartbeat interval then replaces
    /// a working path (one resume, nothing lost).
    pub fn probe_path(&mut self, within: Duration) -> bool {
        let Some(path) = self.path.as_mut() else {
            return false;
        };
        if self.timers.get(Timer::Idle).is_none() {
            return false;
        }
        let within = timer_duration(within);
        path.ping_due = true;
        path.probe = Some(path.probe.map_or(within, |p| p.min(within)));
        true
    }

    fn drop_path(&mut self, now: Instant) {
        if self.path.take().is_none() {
            return;
        }
        for timer in [Timer::AckDelay, Timer::Heartbeat, Timer::Idle] {
            self.timers.stop(timer);
        }
        self.emit(Event::PathLost);
        self.arm_expiry(now);
    }

    fn arm_expiry(&mut self, now: Instant) {
        if self.side == Side::Server && self.lifecycle.is_live() {
            self.timers.set(Timer::Expiry, now + self.ttl);
        }
    }

    // ---- receiving ----

    /// Where to read the transport's next bytes into, and at most how many: `None` while
    /// nothing should be read (no path, the session ended, or the receive buffer is full).
    /// Append to the buffer, then call [`on_received`](Self::on_received).
    pub fn receive_buffer(&mut self) -> Option<(&mut BytesMut, usize)> {
        let room = self.recv.room();
        let path = self.path.as_mut()?;
        if room == 0 {
            return None;
        }
        if path.data_left > 0 {
            let max = path.data_left.min(room).min(READ_CHUNK);
            return Some((self.recv.buffer(max), max));
        }
        let buf = path.decoder.receive_buffer()?;
        buf.reserve(READ_CHUNK);
        Some((buf, READ_CHUNK))
    }

    /// `n` bytes were appended to the buffer [`receive_buffer`](Self::receive_buffer) gave.
    pub fn on_received(&mut self, now: Instant, n: usize) {
        let Some(path) = self.path.as_mut() else {
            return;
        };
        if n == 0 {
            return;
        }
        self.timers.set(Timer::Idle, now + self.dead_after);
        if path.data_left > 0 {
            // Raw payload, appended to the receive buffer.
            path.data_left -= n;
            self.emit(Event::Readable);
            return;
        }
        self.process_decoder(now);
    }

    /// Feeds received bytes (the way for a caller that has them in a slice: a test harness,
    /// a fuzzer). Returns how many were taken: fewer than given once the receive buffer is
    /// full or the path or session is gone.
    pub fn handle_input(&mut self, now: Instant, mut bytes: &[u8]) -> usize {
        let mut taken = 0;
        while !bytes.is_empty() {
            let Some((buf, max)) = self.receive_buffer() else {
                break;
            };
            let n = max.min(bytes.len());
            buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            taken += n;
            self.on_received(now, n);
        }
        taken
    }

    /// How many more bytes complete the frame header or control frame being received (zero
    /// inside a DATA payload): a reader that wants no byte past the current frame reads at most
    /// this many into [`receive_buffer`](Self::receive_buffer).
    pub fn frame_wanted(&self) -> usize {
        match &self.path {
            Some(path) if path.data_left == 0 => path.decoder.wanted(),
            _ => 0,
        }
    }

    /// How many bytes the application may read straight from the transport into its own
    /// buffer: the rest of the DATA frame being received, when nothing received is waiting to
    /// be read before it. Zero otherwise.
    pub fn direct_read_len(&self) -> usize {
        match &self.path {
            Some(path) if self.recv.buffered() == 0 && !self.lifecycle.closed_locally() => {
                path.data_left
            }
            _ => 0,
        }
    }

    /// The application read `n <= direct_read_len()` bytes straight from the transport.
    pub fn on_direct_read(&mut self, now: Instant, n: usize) {
        let Some(path) = self.path.as_mut() else {
            return;
        };
        let n = n.min(path.data_left);
        path.data_left -= n;
        self.timers.set(Timer::Idle, now + self.dead_after);
        self.recv.delivered_directly(n);
        self.on_delivered(now);
    }

    /// Handles every whole frame the decoder holds, and the start of a DATA frame whose
    /// payload is still arriving.
    fn process_decoder(&mut self, now: Instant) {
        loop {
            let Some(path) = self.path.as_mut() else {
                return;
            };
            match path.decoder.next_frame() {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => {
                    if let Some((held, rest)) = path.decoder.take_partial_data() {
                        path.data_left = rest;
                        self.handle_data(now, &held);
                    }
                    return;
                }
                Err(err) => {
                    tracing::debug!(session = %self.id, error = %err, "peer sent bytes that are not a frame");
                    self.violation(now, err.close_code(), err.to_string());
                    return;
                }
            }
        }
    }

    fn handle_data(&mut self, now: Instant, payload: &[u8]) {
        self.heard_from_peer = true;
        if self.lifecycle.fin_received() {
            self.violation(now, CloseCode::ProtocolViolation, "DATA after FIN".into());
            return;
        }
        if self.lifecycle.closed_locally() {
            return;
        }
        self.recv.push(payload);
        self.emit(Event::Readable);
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame) {
        self.heard_from_peer = true;
        match frame {
            Frame::Data(payload) => self.handle_data(now, &payload),
            Frame::Ack(seq) => match self.send.on_ack(now, seq, self.path_sent()) {
                Ok(true) => self.emit(Event::Writable),
                Ok(false) => {}
                Err(err) => self.violation(now, CloseCode::ProtocolViolation, err.to_string()),
            },
            Frame::Ping(nonce) => {
                if let Some(path) = self.path.as_mut() {
                    path.pong_due = Some(nonce);
                }
            }
            Frame::Pong(_) => {}
            Frame::Fin => {
                // Again after a resume, if the peer could not know it arrived: no news.
                if !self.lifecycle.fin_received() {
                    self.lifecycle.peer_finished();
                    self.emit(Event::Readable);
                }
            }
            Frame::Close(close) => {
                tracing::debug!(session = %self.id, code = %close.code(), reason = close.reason(), "peer sent CLOSE");
                let error = Error::ClosedByPeer {
                    code: close.code(),
                    reason: close.reason().to_owned(),
                };
                if self.lifecycle.closed_locally() && error.is_terminal() {
                    // Both ends closed at once: ours is as done as if it had been answered.
                    self.finish_closing();
                } else if error.is_terminal() {
                    self.end(now, error);
                } else {
                    // The peer is dropping this transport only: resume.
                    self.drop_path(now);
                }
            }
            other => self.violation(
                now,
                CloseCode::ProtocolViolation,
                format!("{} frame after the handshake", other.frame_type().name()),
            ),
        }
    }

    /// The peer broke the protocol: CLOSE with `code`, and fail with [`Error::Protocol`].
    fn violation(&mut self, now: Instant, code: CloseCode, what: String) {
        if !self.lifecycle.is_live() {
            // Already closing: just end.
            self.finish_closing();
            return;
        }
        tracing::warn!(session = %self.id, %code, reason = %what, "closing a session whose peer broke the protocol");
        self.recv.request_ack();
        self.queue_close(now, Frame::close(code, what.clone()), Error::Protocol(what));
    }

    // ---- the application ----

    /// Reads received bytes into `buf`: `Some(n)` with `n > 0` bytes, `Some(0)` at the end of
    /// the stream (the peer's FIN, after every byte before it; or after a local close),
    /// `None` when nothing is there yet.
    ///
    /// # Errors
    /// The session's error, once every byte received before it has been read.
    pub fn read(&mut self, now: Instant, buf: &mut [u8]) -> Result<Option<usize>> {
        if self.lifecycle.closed_locally() {
            return Ok(Some(0));
        }
        if buf.is_empty() {
            return Ok(Some(0));
        }
        if self.recv.buffered() > 0 {
            let was_full = !self.recv.has_room();
            let n = self.recv.read(buf);
            if was_full && self.recv.has_room() {
                self.emit(Event::ReceiveRoom);
            }
            self.on_delivered(now);
            return Ok(Some(n));
        }
        match (self.lifecycle.read_error(), self.lifecycle.fin_received()) {
            // The end of the stream stays the end, even once the peer closed the session
            // after it; anything else that ended the session is reported.
            (None | Some(Error::ClosedByPeer { .. }), true) => Ok(Some(0)),
            (Some(err), _) => Err(err),
            (None, false) => Ok(None),
        }
    }

    /// Acknowledges delivered bytes when due: at once past `ack_every`, else after the ack
    /// delay.
    fn on_delivered(&mut self, now: Instant) {
        let unacked = self.recv.unacked();
        if unacked >= self.ack_every {
            self.recv.request_ack();
            self.timers.stop(Timer::AckDelay);
        } else if unacked > 0 && self.timers.get(Timer::AckDelay).is_none() {
            self.timers.set(Timer::AckDelay, now + self.ack_delay);
        }
    }

    /// Takes as much of `buf` into the stream as the replay buffer's capacity allows:
    /// `Some(n)`, or `None` while the in-flight window or the capacity is full (an
    /// [`Event::Writable`] says when to try again). Bytes taken are sent on the current path
    /// by [`poll_transmit`](Self::poll_transmit), and replayed on the next if need be.
    ///
    /// # Errors
    /// [`Error::WriteAfterShutdown`] after [`shutdown`](Self::shutdown), the session's error
    /// once it ended.
    pub fn write(&mut self, now: Instant, buf: &[u8]) -> Result<Option<usize>> {
        if let Some(err) = self.lifecycle.write_error() {
            return Err(err);
        }
        if buf.is_empty() {
            return Ok(Some(0));
        }
        Ok(self.send.write(now, buf))
    }

    /// Ends our direction: FIN follows every byte written, on this path and after any resume.
    /// Idempotent.
    ///
    /// # Errors
    /// The session's error once it ended.
    pub fn shutdown(&mut self) -> Result<()> {
        if let Some(err) = self.ended_error() {
            return Err(err);
        }
        self.lifecycle.shut_down();
        Ok(())
    }

    /// Closes the session: an ACK of what was read, then CLOSE with `code`, leave at the
    /// next frame boundary (data not yet sent stays unsent), and the session ends. Without a
    /// path the CLOSE waits for the next one ([`start_path`](Self::start_path) then refuses
    /// the path with the session's end, which the caller sends as the CLOSE); the close linger
    /// (1 s) bounds the wait either way. Reads then end and writes fail with
    /// [`Error::PipeClosed`].
    pub fn close(&mut self, now: Instant, code: CloseCode, reason: &str) {
        if !self.lifecycle.is_live() {
            return;
        }
        self.recv.request_ack();
        self.queue_close(now, Frame::close(code, reason), Error::PipeClosed);
    }

    /// Ends the session with `error` at once (a client whose resume was refused for good, a
    /// server that forgot the session), sending nothing.
    pub fn fail(&mut self, now: Instant, error: Error) {
        if !self.lifecycle.is_ended() {
            self.end(now, error);
        }
    }

    /// Queues a CLOSE for the current path, or, without one, for the next (a client dials
    /// to deliver it; a server refuses the resume with it). The linger timer bounds both.
    fn queue_close(&mut self, now: Instant, frame: Frame, reason: Error) {
        self.lifecycle.closing(reason);
        self.close_frame = Some(frame);
        self.timers.set(Timer::Linger, now + CLOSE_LINGER);
        for timer in [
            Timer::AckDelay,
            Timer::Heartbeat,
            Timer::Idle,
            Timer::Expiry,
        ] {
            self.timers.stop(timer);
        }
        self.emit(Event::Readable);
        self.emit(Event::Writable);
    }

    fn end(&mut self, now: Instant, error: Error) {
        self.lifecycle.end(error);
        self.drop_path(now);
        self.close_frame = None;
        self.timers = TimerTable::default();
        for event in [Event::Readable, Event::Writable, Event::Ended] {
            self.emit(event);
        }
    }

    fn finish_closing(&mut self) {
        self.lifecycle.closed();
        self.path = None;
        self.close_frame = None;
        self.timers = TimerTable::default();
        for event in [
            Event::Readable,
            Event::Writable,
            Event::PathLost,
            Event::Ended,
        ] {
            self.emit(event);
        }
    }

    fn ended_error(&self) -> Option<Error> {
        match &self.lifecycle {
            Lifecycle::Closed => Some(Error::PipeClosed),
            Lifecycle::Failed { error, .. } => Some(error.clone()),
            Lifecycle::Closing { reason, .. } => Some(reason.clone()),
            _ => None,
        }
    }

    // ---- the clock ----

    /// Timers due at `now` fire.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.take_expired(now) {
            match timer {
                Timer::AckDelay => self.recv.request_ack(),
                Timer::Heartbeat => {
                    if let Some(path) = self.path.as_mut() {
                        path.ping_due = true;
                        self.timers
                            .set(Timer::Heartbeat, now + self.heartbeat_interval);
                    }
                }
                Timer::Idle => {
                    if !self.recv.has_room() {
                        // We are the ones not reading: the peer's silence says nothing.
                        self.timers.set(Timer::Idle, now + self.dead_after);
                    } else {
                        tracing::debug!(session = %self.id, "no frame from the peer within the liveness bound");
                        self.drop_path(now);
                    }
                }
                Timer::Linger => self.finish_closing(),
                Timer::Expiry => {
                    tracing::info!(session = %self.id, ttl = ?self.ttl, "session expired");
                    self.end(now, Error::SessionExpired(self.id));
                }
            }
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ---- transmitting ----

    /// What to write to the transport next, or `None` if nothing (or no path). Frames are
    /// prepared at a frame boundary: pending control frames (ACK, PONG, PING), then a DATA
    /// frame of unsent stream bytes, or FIN once all have gone, or CLOSE.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<'_>> {
        self.prepare(now);
        let path = self.path.as_ref()?;
        let payload = match path.payload {
            Some((seq, left)) => self.send.payload(seq, left),
            None => [&[][..], &[][..]],
        };
        let transmit = Transmit {
            head: &path.out,
            payload,
        };
        (!transmit.is_empty()).then_some(transmit)
    }

    /// Appends everything there is to transmit to `out` (for a caller that wants the bytes:
    /// a test harness); returns how many.
    pub fn poll_transmit_into(&mut self, now: Instant, out: &mut Vec<u8>) -> usize {
        let mut total = 0;
        while let Some(transmit) = self.poll_transmit(now) {
            let n = transmit.len();
            out.extend_from_slice(transmit.head);
            out.extend_from_slice(transmit.payload[0]);
            out.extend_from_slice(transmit.payload[1]);
            self.on_transmitted(now, n);
            total += n;
        }
        total
    }

    /// The transport took the first `n` bytes of the last [`Transmit`].
    pub fn on_transmitted(&mut self, now: Instant, n: usize) {
        let Some(path) = self.path.as_mut() else {
            return;
        };
        if n == 0 {
            return;
        }
        let from_head = n.min(path.out.len());
        if let Some((left, within)) = path.probe_ping {
            if from_head >= left {
                path.probe_ping = None;
                if let Some(deadline) = self.timers.get(Timer::Idle) {
                    self.timers.set(Timer::Idle, deadline.min(now + within));
                }
            } else {
                path.probe_ping = Some((left - from_head, within));
            }
        }
        path.out.advance(from_head);
        if path.out.is_empty() {
            path.out.clear();
        }
        let mut rest = n - from_head;
        if let Some((seq, left)) = path.payload.as_mut() {
            let taken = rest.min(*left);
            *seq += taken as u64;
            *left -= taken;
            rest -= taken;
            self.send.on_sent(*seq);
            if *left == 0 {
                path.payload = None;
            }
        }
        debug_assert_eq!(rest, 0, "more transmitted than was offered");
        self.timers
            .set(Timer::Heartbeat, now + self.heartbeat_interval);
        if self.close_frame.is_none()
            && matches!(self.lifecycle, Lifecycle::Closing { .. })
            && path.at_frame_boundary()
        {
            // The CLOSE has left.
            self.finish_closing();
        }
    }

    /// Encodes the next frames, at a frame boundary.
    fn prepare(&mut self, now: Instant) {
        let Some(path) = self.path.as_mut() else {
            return;
        };
        if !path.at_frame_boundary() {
            return;
        }
        if self.recv.ack_due() {
            self.timers.stop(Timer::AckDelay);
            Frame::ack(self.recv.take_ack()).encode(&mut path.out);
        }
        if let Some(nonce) = path.pong_due.take() {
            Frame::pong(nonce).encode(&mut path.out);
        }
        if std::mem::take(&mut path.ping_due) {
            Frame::ping(self.next_ping).encode(&mut path.out);
            self.next_ping = self.next_ping.wrapping_add(1);
            if let Some(within) = path.probe.take() {
                // Its bound starts once the transport has taken the PING (`on_transmitted`).
                path.probe_ping = Some((path.out.len(), within));
            }
        }
        if let Some(close) = self.close_frame.take() {
            // Nothing follows a CLOSE; unsent data stays unsent.
            close.encode(&mut path.out);
            return;
        }
        if matches!(self.lifecycle, Lifecycle::Closing { .. }) {
            return;
        }
        let written = self.send.written();
        if path.next_send < written {
            let len = (written - path.next_send).min(u64::from(MAX_FRAME_PAYLOAD)) as usize;
            path.out
                .extend_from_slice(&FrameHeader::data(len as u32).encode());
            path.payload = Some((path.next_send, len));
            path.next_send += len as u64;
            self.send.on_framed(now, path.next_send);
        } else if self.lifecycle.fin_sent() && !path.fin_sent {
            Frame::fin().encode(&mut path.out);
            path.fin_sent = true;
        }
    }

    // ---- events ----

    /// The end of the stream bytes handed to the current transport: all the peer can have
    /// received on this path, so the most it may acknowledge.
    fn path_sent(&self) -> u64 {
        self.path.as_ref().map_or(0, |path| match path.payload {
            Some((seq, _)) => seq,
            None => path.next_send,
        })
    }

    fn emit(&mut self, event: Event) {
        self.events |= event.bit();
    }

    /// The next thing the caller must act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = Event::ALL
            .into_iter()
            .find(|event| self.events & event.bit() != 0)?;
        self.events &= !event.bit();
        Some(event)
    }
}

#[cfg(test)]
mod tests;
