//! One transport of a session-mode pipe: frames on the wire, a byte stream to the pipe.
//!
//! A [`SessionConn`] is what the pipe's reader and writer see: `AsyncRead` yields the payloads
//! of the peer's DATA frames (and end-of-stream at its FIN), `AsyncWrite` turns bytes into DATA
//! frames and shutdown into FIN.
//!
//! The hot path runs in the caller's task, with no task hop and no copy of the stream's bytes:
//! a write goes straight to the transport as one vectored write of the frame header and the
//! caller's bytes (only the unsent rest of a frame the transport took in part is queued); a read
//! takes each DATA payload from the transport straight into the caller's buffer, through the
//! decoder only for frame headers and control frames.
//!
//! Everything else happens in the connection's driver task: it answers pings, sends
//! acknowledgements and heartbeats on the [`SessionCore`]'s timers, writes control frames the
//! application's tasks could not, hands the peer's acknowledgements to the pipe's writer, and
//! declares the path dead when the peer falls silent. Because the driver reads even while the
//! application does not, control frames are never stuck behind unread data, up to a bounded
//! inbound queue.
//!
//! The application's tasks and the driver share one state (holding the transport) behind a
//! mutex; nobody holds it across an await, and nobody holds it while calling into the pipe (the
//! pipe's writer and reader call into this state with their own locks held). The transport is
//! always polled with one of two fan-out wakers (one per direction) that wake every task waiting
//! on that direction, since a transport keeps only the last waker it was given.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::core::{Event, SessionConfig, SessionCore, Transmit};
use super::link::SessionLink;
use crate::error::Error;
use crate::proto::{
    CloseCode, Established, Frame, FrameDecoder, FrameType, HEADER_LEN, MAX_FRAME_PAYLOAD,
};
use crate::transport::BoxIo;

/// Received payload not yet read by the application beyond which the driver stops reading the
/// transport (TCP's own flow control then holds the peer back).
const INBOUND_LIMIT: usize = 1024 * 1024;

/// The most the driver reads from the transport at once. The application's own reads take
/// frame by frame, so this only bounds what an idle or slow reader's connection buffers per
/// read.
const DRIVER_READ: usize = 16 * 1024;

/// How long a CLOSE may take to leave before the transport is dropped anyway.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// One transport of a session-mode pipe (see [`session`](crate::session) for how the parts
/// fit). It is created by the session layer after a handshake; its driver task runs until the
/// pipe drops it or the path fails.
pub struct SessionConn {
    shared: Arc<ConnShared>,
}

impl fmt::Debug for SessionConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConn").finish_non_exhaustive()
    }
}

/// Why a connection stopped carrying the stream.
#[derive(Debug, Clone)]
enum Broken {
    /// The transport was lost (closed, reset, silent too long): the pipe reconnects.
    Lost(io::ErrorKind, String),
    /// The session cannot go on (the peer closed it or broke the protocol, or we closed it).
    Fatal(Error),
}

impl Broken {
    /// The transport failed with `err`: the pipe reconnects.
    fn lost(err: &io::Error) -> Self {
        Broken::Lost(err.kind(), err.to_string())
    }

    fn to_io(&self) -> io::Error {
        match self {
            Broken::Lost(kind, message) => io::Error::new(*kind, message.clone()),
            Broken::Fatal(err) => err.clone().into(),
        }
    }
}

struct ConnShared {
    state: Mutex<ConnState>,
    wakers: Arc<Wakers>,
    /// Given to the transport with every read: wakes the application's reader and the driver.
    read_waker: Waker,
    /// Given to the transport with every write: wakes the application's writer, and the driver
    /// when it has frames waiting to go.
    write_waker: Waker,
    link: Arc<SessionLink>,
    /// Cancelled when the driver has ended and dropped the transport.
    finished: CancellationToken,
}

/// The tasks waiting on the connection. Kept apart from the state lock: a transport may wake
/// the waker it was given from inside a poll, while the state lock is held.
#[derive(Default)]
struct Wakers {
    slots: Mutex<WakerSlots>,
}

#[derive(Default)]
struct WakerSlots {
    reader: Option<Waker>,
    writer: Option<Waker>,
    driver: Option<Waker>,
    /// The driver has frames waiting for the transport to take more.
    driver_writes: bool,
    /// The application's reader was woken for incoming bytes and has not read since: the
    /// driver lets it go first (it reads payloads without a copy).
    reader_notified: bool,
}

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, WakerSlots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(slot: &mut Option<Waker>, waker: &Waker) {
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn set_reader(&self, waker: &Waker) {
        let mut slots = self.lock();
        slots.reader_notified = false;
        Self::set(&mut slots.reader, waker);
    }

    fn set_writer(&self, waker: &Waker) {
        Self::set(&mut self.lock().writer, waker);
    }

    /// Registers the driver; with `writes`, it also wants to hear when the transport takes
    /// more bytes. Returns whether the application's reader was woken and has not read since.
    fn set_driver(&self, waker: &Waker, writes: bool) -> bool {
        let mut slots = self.lock();
        Self::set(&mut slots.driver, waker);
        slots.driver_writes |= writes;
        slots.reader_notified
    }

    fn wake_driver(&self) {
        let driver = self.lock().driver.clone();
        if let Some(waker) = driver {
            waker.wake();
        }
    }

    fn wake_app(&self) {
        let (reader, writer) = {
            let mut slots = self.lock();
            (slots.reader.take(), slots.writer.take())
        };
        for waker in [reader, writer].into_iter().flatten() {
            waker.wake();
        }
    }

    fn wake_reader(&self) {
        let reader = self.lock().reader.take();
        if let Some(waker) = reader {
            waker.wake();
        }
    }

    fn clear_reader_notified(&self) {
        self.lock().reader_notified = false;
    }
}

/// The fan-out waker of the read direction.
struct ReadWake(Arc<Wakers>);

impl Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let (reader, driver) = {
            let mut slots = self.0.lock();
            let reader = slots.reader.take();
            slots.reader_notified |= reader.is_some();
            (reader, slots.driver.clone())
        };
        // The driver first: the task woken last tends to run first, and the reader should.
        for waker in [driver, reader].into_iter().flatten() {
            waker.wake();
        }
    }
}

/// The fan-out waker of the write direction.
struct WriteWake(Arc<Wakers>);

impl Wake for WriteWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let (writer, driver) = {
            let mut slots = self.0.lock();
            let driver = std::mem::take(&mut slots.driver_writes)
                .then(|| slots.driver.clone())
                .flatten();
            (slots.writer.take(), driver)
        };
        for waker in [driver, writer].into_iter().flatten() {
            waker.wake();
        }
    }
}

struct ConnState {
    core: SessionCore,
    /// The transport; taken when the driver ends.
    io: Option<BoxIo>,
    decoder: FrameDecoder,
    /// Payload bytes of the DATA frame being received that are still in the transport. They
    /// are read past the decoder: straight into the application's buffer when it is reading.
    data_left: usize,
    /// Payloads received and not yet read, oldest first.
    inbound: VecDeque<Bytes>,
    inbound_len: usize,
    /// The peer's FIN arrived (after every byte in `inbound`).
    peer_finished: bool,
    /// The application has read the end-of-stream that FIN stands for: a CLOSE after it has
    /// nothing left to wait behind.
    fin_delivered: bool,
    /// Encoded bytes to write before anything else: control frames, and the rest of a frame
    /// the transport took only in part. It always ends on a frame boundary.
    outbound: BytesMut,
    /// Bytes were written since the transport was last flushed.
    need_flush: bool,
    /// Offset in our stream of the next byte to frame (starts where the peer resumed).
    sent: u64,
    fin_queued: bool,
    broken: Option<Broken>,
    /// The peer's CLOSE, held back from the pipe until the application has read what came
    /// before it (the pipe fails at once when told).
    deferred_close: Option<Error>,
    /// When a CLOSE has been queued, the latest moment to keep trying to send it.
    linger_until: Option<Instant>,
    /// The pipe dropped this connection: the driver ends at once.
    detached: bool,
    /// The deadline the driver sleeps until (`None`: no timer armed).
    driver_deadline: Option<Instant>,
    /// The peer's latest acknowledgement, taken in by the application's reader, for the driver
    /// to hand to the pipe's writer (the reader must not take the writer's lock).
    pending_ack: Option<u64>,
}

/// What must be done once the state lock is released.
#[derive(Default)]
struct Effects {
    ack: Option<u64>,
    lost: Option<io::Error>,
}

impl Effects {
    fn apply(self, shared: &ConnShared) {
        if let Some(seq) = self.ack {
            shared.link.acknowledge(seq);
        }
        if let Some(err) = self.lost {
            // A connection the pipe has already dropped reports nothing: its loss is old news
            // and must not pass for a failure of the next one.
            if !shared.lock().detached {
                shared.link.transport_lost(err);
            }
        }
    }
}

/// The current time, from tokio's clock so that paused-time tests control it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl SessionConn {
    /// Starts the driver for a transport on which `established` was just agreed. `decoder`
    /// holds whatever the handshake read past its last frame.
    pub(crate) fn start(
        io: BoxIo,
        decoder: FrameDecoder,
        established: &Established,
        config: SessionConfig,
        link: Arc<SessionLink>,
    ) -> SessionConn {
        let now = now();
        let mut core = SessionCore::new(config, now);
        core.on_new_path(
            now,
            established.local_reader_seq(),
            established.remote_reader_seq(),
        );
        let wakers = Arc::new(Wakers::default());
        let shared = Arc::new(ConnShared {
            state: Mutex::new(ConnState {
                core,
                io: Some(io),
                decoder,
                data_left: 0,
                inbound: VecDeque::new(),
                inbound_len: 0,
                peer_finished: false,
                fin_delivered: false,
                outbound: BytesMut::new(),
                need_flush: false,
                sent: established.remote_reader_seq(),
                fin_queued: false,
                broken: None,
                deferred_close: None,
                linger_until: None,
                detached: false,
                driver_deadline: None,
                pending_ack: None,
            }),
            read_waker: Waker::from(Arc::new(ReadWake(wakers.clone()))),
            write_waker: Waker::from(Arc::new(WriteWake(wakers.clone()))),
            wakers,
            link,
            finished: CancellationToken::new(),
        });
        let driver = Driver {
            shared: shared.clone(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
            started: false,
            yielded: false,
        };
        tokio::spawn(driver.run());
        SessionConn { shared }
    }

    /// Cancelled once the driver has ended and dropped the transport.
    pub(crate) fn finished(&self) -> CancellationToken {
        self.shared.finished.clone()
    }
}

impl ConnShared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for SessionConn {
    fn drop(&mut self) {
        self.shared.lock().detached = true;
        self.shared.wakers.wake_driver();
    }
}

impl ConnState {
    fn push_frame(&mut self, frame: &Frame) {
        frame.encode(&mut self.outbound);
    }

    /// Queues the control frames the core wants sent.
    fn push_transmits(&mut self, now: Instant) {
        while let Some(transmit) = self.core.poll_transmit() {
            let frame = match transmit {
                Transmit::Ack(seq) => Frame::ack(seq),
                Transmit::Ping(nonce) => Frame::ping(nonce),
                Transmit::Pong(nonce) => Frame::pong(nonce),
            };
            self.push_frame(&frame);
            self.core.on_transmit(now);
        }
    }

    /// Stops the connection with `broken`; with `close`, that CLOSE is sent (in place of any
    /// queued data) before the transport is dropped.
    fn break_with(&mut self, broken: Broken, close: Option<Frame>, now: Instant) {
        if self.broken.is_some() {
            return;
        }
        self.broken = Some(broken);
        match close {
            // After what is queued: it may end a frame the transport took in part.
            Some(frame) => {
                self.push_frame(&frame);
                self.linger_until = Some(now + CLOSE_LINGER);
            }
            None => self.outbound.clear(),
        }
    }

    /// Whether a deadline now due earlier than the driver's sleep needs the driver woken.
    fn deadline_moved_up(&self) -> bool {
        match (self.core.poll_timeout(), self.driver_deadline) {
            (Some(due), Some(armed)) => due < armed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Writes `outbound` to the transport, then flushes it.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, flush: bool) -> Poll<io::Result<()>> {
        let ConnState {
            io,
            outbound,
            need_flush,
            ..
        } = self;
        let Some(io) = io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        while !outbound.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, outbound))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            outbound.advance(n);
            *need_flush = true;
        }
        if flush && *need_flush {
            ready!(Pin::new(io).poll_flush(cx))?;
            *need_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Frames `payload` (at most [`MAX_FRAME_PAYLOAD`] bytes) and writes it through to the
    /// transport, which must have nothing queued before it. Ready once the whole frame is
    /// written or queued; `Pending` with nothing taken.
    fn poll_write_data(&mut self, cx: &mut Context<'_>, payload: &[u8]) -> Poll<io::Result<()>> {
        let mut header = [0u8; HEADER_LEN];
        header[0] = FrameType::Data as u8;
        header[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let mut io = Pin::new(io);
        if !io.is_write_vectored() {
            // One write of the whole frame is still better than two.
            self.outbound.reserve(HEADER_LEN + payload.len());
            self.outbound.put_slice(&header);
            self.outbound.put_slice(payload);
            return match self.poll_write_out(cx, false) {
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                _ => Poll::Ready(Ok(())),
            };
        }
        let slices = [IoSlice::new(&header), IoSlice::new(payload)];
        let written = ready!(io.as_mut().poll_write_vectored(cx, &slices))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.need_flush = true;
        // The transport took part of the frame: the rest goes before anything else.
        if written < HEADER_LEN {
            self.outbound.put_slice(&header[written..]);
            self.outbound.put_slice(payload);
        } else if written < HEADER_LEN + payload.len() {
            self.outbound.put_slice(&payload[written - HEADER_LEN..]);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads from the transport once and handles what arrived. Payload bytes of a DATA frame go
    /// straight into `direct` when given (the application is reading and nothing is queued
    /// before them); otherwise into the inbound queue. Returns how many bytes went to `direct`.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        effects: &mut Effects,
        now: Instant,
        direct: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let io = Pin::new(io);
        if self.data_left > 0 {
            if let Some(buf) = direct {
                // With room to spare, the next frame's header comes in the same read (it is
                // moved to the decoder): one read per frame instead of two.
                let want = (self.data_left + HEADER_LEN).min(buf.remaining());
                let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
                ready!(io.poll_read(cx, &mut part))?;
                let n = part.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(truncated(self.data_left)));
                }
                let payload = n.min(self.data_left);
                if n > payload {
                    let Some(decoder_buf) = self.decoder.receive_buffer() else {
                        return Poll::Ready(Err(io::Error::other("frame decoder failed")));
                    };
                    decoder_buf.extend_from_slice(&part.filled()[payload..]);
                }
                buf.advance(payload);
                self.data_left -= payload;
                self.core.handle_received(now);
                if n > payload {
                    self.on_received(effects, now);
                }
                return Poll::Ready(Ok(payload));
            }
            // The decoder's buffer is empty while a payload is read past it: read into it and
            // hand the bytes to the inbound queue without a copy.
            let want = self.data_left.min(DRIVER_READ);
            let Some(buf) = self.decoder.receive_buffer() else {
                return Poll::Ready(Err(io::Error::other("frame decoder failed")));
            };
            debug_assert!(buf.is_empty());
            buf.reserve(want);
            let n = ready!(tokio_util::io::poll_read_buf(
                io,
                cx,
                &mut BufMut::limit(&mut *buf, want)
            ))?;
            if n == 0 {
                return Poll::Ready(Err(truncated(self.data_left)));
            }
            let payload = buf.split_to(n).freeze();
            self.data_left -= n;
            self.core.handle_received(now);
            self.push_inbound(payload);
            return Poll::Ready(Ok(0));
        }
        // A header or a control frame: through the decoder. The application reads no further
        // than the current frame, so the payload after a DATA header reaches its buffer.
        let want = match direct {
            Some(_) => self.decoder.wanted().max(1),
            None => DRIVER_READ,
        };
        let Some(buf) = self.decoder.receive_buffer() else {
            return Poll::Ready(Err(io::Error::other("frame decoder failed")));
        };
        buf.reserve(want);
        let n = ready!(tokio_util::io::poll_read_buf(
            io,
            cx,
            &mut BufMut::limit(&mut *buf, want)
        ))?;
        if n == 0 {
            let message = match self.decoder.finish() {
                Ok(()) => "transport closed by the peer".to_owned(),
                Err(truncated) => truncated.to_string(),
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, message)));
        }
        self.on_received(effects, now);
        Poll::Ready(Ok(0))
    }

    fn push_inbound(&mut self, payload: Bytes) {
        if !payload.is_empty() {
            self.inbound_len += payload.len();
            self.inbound.push_back(payload);
        }
    }

    /// Handles every whole frame the decoder holds, and the start of a DATA frame whose
    /// payload is still arriving.
    fn on_received(&mut self, effects: &mut Effects, now: Instant) {
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    if let Some((held, rest)) = self.decoder.take_partial_data() {
                        if self.peer_finished {
                            let what = "DATA after FIN".to_owned();
                            let close = Frame::close(CloseCode::ProtocolViolation, what.clone());
                            self.violation(effects, Error::Protocol(what), close, now);
                            return;
                        }
                        self.core.handle_received(now);
                        self.push_inbound(held);
                        self.data_left = rest;
                    }
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "peer sent bytes that are not a frame");
                    let close = Frame::close(err.close_code(), err.to_string());
                    self.violation(effects, Error::Protocol(err.to_string()), close, now);
                    return;
                }
            };
            if let Err((err, close)) = self.on_frame(frame, now) {
                match close {
                    Some(close) => self.violation(effects, err, close, now),
                    None => {
                        if self.inbound_len > 0 || (self.peer_finished && !self.fin_delivered) {
                            // Data (or FIN) came before the CLOSE: the reader gets it first.
                            self.deferred_close = Some(err.clone());
                        } else {
                            effects.lost = Some(err.clone().into());
                        }
                        let broken = match err.is_terminal() {
                            true => Broken::Fatal(err),
                            false => {
                                Broken::Lost(io::ErrorKind::ConnectionAborted, err.to_string())
                            }
                        };
                        self.break_with(broken, None, now);
                    }
                }
                return;
            }
        }
    }

    fn violation(&mut self, effects: &mut Effects, err: Error, close: Frame, now: Instant) {
        effects.lost = Some(err.clone().into());
        self.break_with(Broken::Fatal(err), Some(close), now);
    }

    /// Applies one frame; an error ends the connection, with the CLOSE to send if any.
    fn on_frame(&mut self, frame: Frame, now: Instant) -> Result<(), (Error, Option<Frame>)> {
        let violation = |what: String| {
            let close = Frame::close(CloseCode::ProtocolViolation, what.clone());
            Err((Error::Protocol(what), Some(close)))
        };
        match frame {
            Frame::Data(_) if self.peer_finished => return violation("DATA after FIN".into()),
            Frame::Data(payload) => {
                self.core.handle_received(now);
                self.push_inbound(payload);
            }
            Frame::Ack(seq) => {
                let sent = self.sent;
                if let Err(lie) = self.core.handle_ack(now, seq, sent) {
                    return violation(lie.to_string());
                }
            }
            Frame::Ping(nonce) => self.core.handle_ping(now, nonce),
            Frame::Pong(_) => self.core.handle_received(now),
            Frame::Fin => {
                self.core.handle_received(now);
                self.peer_finished = true;
            }
            Frame::Close(close) => {
                tracing::debug!(code = %close.code(), reason = close.reason(), "peer sent CLOSE");
                return Err((
                    Error::ClosedByPeer {
                        code: close.code(),
                        reason: close.reason().to_owned(),
                    },
                    None,
                ));
            }
            other => {
                return violation(format!(
                    "{} frame after the handshake",
                    other.frame_type().name()
                ))
            }
        }
        Ok(())
    }

    /// Takes the core's events: acknowledgements for the pipe's writer, and a dead path.
    /// Returns false if the path is dead.
    fn take_events(&mut self, effects: &mut Effects, now: Instant) -> bool {
        while let Some(event) = self.core.poll_event() {
            match event {
                Event::PeerAcked(seq) => effects.ack = Some(seq),
                Event::PathDead => {
                    let broken = Broken::Lost(
                        io::ErrorKind::TimedOut,
                        "no frame from the peer within the liveness bound".into(),
                    );
                    effects.lost = Some(broken.to_io());
                    self.break_with(broken, None, now);
                    return false;
                }
            }
        }
        true
    }

    /// Copies queued payload into `buf`; returns how many bytes.
    fn take_inbound(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let mut n = 0;
        while buf.remaining() > 0 {
            let Some(front) = self.inbound.front_mut() else {
                break;
            };
            let take = front.len().min(buf.remaining());
            buf.put_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                self.inbound.pop_front();
            }
            n += take;
        }
        self.inbound_len -= n;
        n
    }
}

fn truncated(missing: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("transport closed inside a DATA frame, {missing} payload bytes short"),
    )
}

impl AsyncRead for SessionConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        shared.wakers.clear_reader_notified();
        let mut effects = Effects::default();
        let mut wake_driver = false;
        let result = {
            let mut st = shared.lock();
            loop {
                if st.inbound_len > 0 || buf.remaining() == 0 {
                    let was_full = st.inbound_len >= INBOUND_LIMIT;
                    let n = st.take_inbound(buf);
                    wake_driver |= was_full;
                    wake_driver |= delivered(&mut st, shared, n);
                    break Poll::Ready(Ok(()));
                }
                if st.peer_finished {
                    st.fin_delivered = true;
                    if let Some(close) = st.deferred_close.take() {
                        effects.lost = Some(close.into());
                    }
                    break Poll::Ready(Ok(()));
                }
                if let Some(broken) = &st.broken {
                    break Poll::Ready(Err(broken.to_io()));
                }
                shared.wakers.set_reader(cx.waker());
                let mut rcx = Context::from_waker(&shared.read_waker);
                let now = now();
                match st.poll_receive(&mut rcx, &mut effects, now, Some(buf)) {
                    Poll::Pending => break Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        // Frames were handled (an ack for our writer, a ping to answer, ...):
                        // the driver acts on them.
                        let mut events = Effects::default();
                        let alive = st.take_events(&mut events, now);
                        if let Some(seq) = events.ack {
                            st.pending_ack = Some(seq);
                        }
                        effects.lost = events.lost.or(effects.lost.take());
                        wake_driver |= !alive
                            || events.ack.is_some()
                            || st.core.has_transmit()
                            || st.broken.is_some();
                    }
                    Poll::Ready(Ok(n)) => {
                        wake_driver |= delivered(&mut st, shared, n);
                        break Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(err)) => {
                        tracing::debug!(error = %err, "session transport lost");
                        st.break_with(Broken::lost(&err), None, now);
                        wake_driver = true;
                    }
                }
            }
        };
        if wake_driver {
            shared.wakers.wake_driver();
        }
        effects.apply(shared);
        result
    }
}

/// The application took `n` bytes: acknowledge them when due, right away if the transport
/// takes it. Returns whether the driver must be woken.
fn delivered(st: &mut ConnState, shared: &ConnShared, n: usize) -> bool {
    if n == 0 {
        return false;
    }
    let now = now();
    st.core.on_delivered(now, n as u64);
    if st.core.has_transmit() && st.broken.is_none() {
        st.push_transmits(now);
        let mut wcx = Context::from_waker(&shared.write_waker);
        if let Poll::Ready(Err(err)) = st.poll_write_out(&mut wcx, true) {
            st.break_with(Broken::lost(&err), None, now);
            return true;
        }
        if !st.outbound.is_empty() || st.need_flush {
            return true;
        }
    }
    st.deadline_moved_up()
}

impl AsyncWrite for SessionConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if let Some(broken) = &st.broken {
            return Poll::Ready(Err(broken.to_io()));
        }
        if st.fin_queued {
            return Poll::Ready(Err(Error::WriteAfterShutdown.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        shared.wakers.set_writer(cx.waker());
        let mut wcx = Context::from_waker(&shared.write_waker);
        let now = now();
        let n = buf.len().min(MAX_FRAME_PAYLOAD as usize);
        // Whatever is queued goes first, then this frame straight from `buf`.
        let outcome = match st.poll_write_out(&mut wcx, false) {
            Poll::Ready(Ok(())) => st.poll_write_data(&mut wcx, &buf[..n]),
            other => other,
        };
        match outcome {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(err)) => {
                st.break_with(Broken::lost(&err), None, now);
                drop(st);
                shared.wakers.wake_driver();
                return Poll::Ready(Err(err));
            }
            Poll::Ready(Ok(())) => {}
        }
        st.sent += n as u64;
        st.core.on_transmit(now);
        // Free for TCP; a TLS transport pushes its record out here.
        if let Poll::Ready(Err(err)) = st.poll_write_out(&mut wcx, true) {
            st.break_with(Broken::lost(&err), None, now);
        }
        let leftover = !st.outbound.is_empty() || st.need_flush || st.broken.is_some();
        drop(st);
        if leftover {
            // The rest goes out even if the application writes nothing more.
            shared.wakers.wake_driver();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        if let Some(broken) = &st.broken {
            return Poll::Ready(Err(broken.to_io()));
        }
        if st.outbound.is_empty() && !st.need_flush {
            return Poll::Ready(Ok(()));
        }
        shared.wakers.set_writer(cx.waker());
        let mut wcx = Context::from_waker(&shared.write_waker);
        match ready!(st.poll_write_out(&mut wcx, true)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(err) => {
                st.break_with(Broken::lost(&err), None, now());
                drop(st);
                shared.wakers.wake_driver();
                Poll::Ready(Err(err))
            }
        }
    }

    /// Sends FIN after everything written, once; ready when it has left.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut st = self.shared.lock();
            if st.broken.is_none() && !st.fin_queued {
                st.fin_queued = true;
                st.push_frame(&Frame::fin());
                st.core.on_transmit(now());
            }
        }
        self.as_mut().poll_flush(cx)
    }
}

/// The task that keeps one [`SessionConn`] alive between the application's reads and writes.
struct Driver {
    shared: Arc<ConnShared>,
    sleep: Pin<Box<Sleep>>,
    /// The deadline `sleep` is set to.
    armed: Option<Instant>,
    /// The frames the handshake read past its end have been handled.
    started: bool,
    /// The driver left a read to the application's reader once; next time it reads itself.
    yielded: bool,
}

/// What one turn of the driver ended with.
enum Turn {
    /// Progress was made; turn again.
    Again,
    /// Everything is waiting on the transport, the application or the clock.
    Park,
    /// The connection is over: drop the transport.
    Done,
}

impl Driver {
    async fn run(mut self) {
        poll_fn(|cx| self.poll(cx)).await;
        let io = {
            let mut st = self.shared.lock();
            if st.broken.is_none() {
                st.broken = Some(Broken::Lost(
                    io::ErrorKind::ConnectionAborted,
                    "session connection dropped".into(),
                ));
            }
            st.io.take()
        };
        drop(io);
        self.shared.wakers.lock().driver = None;
        self.shared.wakers.wake_app();
        self.shared.finished.cancel();
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut effects = Effects::default();
            let turn = self.turn(cx, &mut effects);
            effects.apply(&self.shared);
            match turn {
                Turn::Again => continue,
                Turn::Done => return Poll::Ready(()),
                Turn::Park => {}
            }
            let deadline = {
                let mut st = self.shared.lock();
                let deadline = match st.linger_until {
                    Some(linger) => Some(linger),
                    None => st.core.poll_timeout(),
                };
                st.driver_deadline = deadline;
                deadline
            };
            let Some(deadline) = deadline else {
                return Poll::Pending;
            };
            if self.armed != Some(deadline) {
                self.sleep.as_mut().reset(deadline.into());
                self.armed = Some(deadline);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.armed = None;
        }
    }

    /// One pass over timers, outgoing frames and incoming frames.
    fn turn(&mut self, cx: &mut Context<'_>, effects: &mut Effects) -> Turn {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let now = now();
        if st.detached && st.linger_until.is_none() {
            // Dropped by the pipe. If the pipe was closed (not just moving to a new
            // connection), tell the peer: a close must never look like a drop.
            if st.broken.is_some() || !shared.link.pipe_closed() {
                return Turn::Done;
            }
            st.broken = Some(Broken::Fatal(Error::PipeClosed));
            // What we read is acknowledged first: the peer then knows its bytes arrived.
            st.core.flush_ack();
            while let Some(transmit) = st.core.poll_transmit() {
                if let Transmit::Ack(seq) = transmit {
                    st.push_frame(&Frame::ack(seq));
                }
            }
            st.push_frame(&Frame::close(CloseCode::Normal, "closed"));
            st.linger_until = Some(now + CLOSE_LINGER);
        }
        let wants_write = !st.outbound.is_empty() || st.need_flush;
        let reader_notified = shared.wakers.set_driver(cx.waker(), wants_write);
        let mut wcx = Context::from_waker(&shared.write_waker);
        if let Some(linger_until) = st.linger_until {
            // Closing: send the CLOSE, then end.
            return match st.poll_write_out(&mut wcx, true) {
                Poll::Ready(Ok(())) => {
                    if let Some(io) = st.io.as_mut() {
                        let _ = Pin::new(io).poll_shutdown(&mut wcx);
                    }
                    Turn::Done
                }
                Poll::Ready(Err(_)) => Turn::Done,
                Poll::Pending if now >= linger_until => Turn::Done,
                Poll::Pending => Turn::Park,
            };
        }
        if st.broken.is_some() {
            return Turn::Done;
        }
        if !self.started {
            // Frames the handshake read past its own.
            self.started = true;
            st.on_received(effects, now);
            if st.broken.is_some() {
                return Turn::Again;
            }
        }

        // Timers. A full inbound queue means we are the ones not reading: the peer's silence
        // is then not evidence of a dead path.
        if st.inbound_len >= INBOUND_LIMIT {
            st.core.handle_received(now);
        }
        st.core.handle_timeout(now);
        st.push_transmits(now);
        effects.ack = st.pending_ack.take();
        if !st.take_events(effects, now) {
            return Turn::Done;
        }

        // Outgoing.
        if !st.outbound.is_empty() || st.need_flush {
            shared.wakers.set_driver(cx.waker(), true);
            if let Poll::Ready(Err(err)) = st.poll_write_out(&mut wcx, true) {
                return self.lost(&mut st, effects, err, now);
            }
        }

        // Incoming.
        if st.inbound_len >= INBOUND_LIMIT {
            return Turn::Park;
        }
        if reader_notified && !self.yielded {
            // The application's reader was woken for these bytes and takes payloads without a
            // copy: let it run first, and read after it if it did not.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Turn::Park;
        }
        if self.yielded {
            self.yielded = false;
            shared.wakers.clear_reader_notified();
        }
        let mut rcx = Context::from_waker(&shared.read_waker);
        match st.poll_receive(&mut rcx, effects, now, None) {
            Poll::Pending => Turn::Park,
            Poll::Ready(Err(err)) => self.lost(&mut st, effects, err, now),
            Poll::Ready(Ok(_)) => {
                if st.broken.is_some() {
                    drop(st);
                    shared.wakers.wake_app();
                } else if st.inbound_len > 0 || st.peer_finished {
                    drop(st);
                    shared.wakers.wake_reader();
                    // Yield before reading on: the application's reader (woken here or by the
                    // pipe) may be queued behind this task, and it takes the bytes queued.
                    cx.waker().wake_by_ref();
                    return Turn::Park;
                }
                Turn::Again
            }
        }
    }

    fn lost(
        &mut self,
        st: &mut ConnState,
        effects: &mut Effects,
        err: io::Error,
        now: Instant,
    ) -> Turn {
        tracing::debug!(error = %err, "session transport lost");
        st.break_with(Broken::lost(&err), None, now);
        effects.lost = Some(err);
        Turn::Done
    }
}
