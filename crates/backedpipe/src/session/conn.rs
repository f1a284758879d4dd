//! One transport of a session-mode pipe: frames on the wire, a byte stream to the pipe.
//!
//! A [`SessionConn`] is what the pipe's reader and writer see: `AsyncRead` yields the payloads
//! of the peer's DATA frames (and end-of-stream at its FIN), `AsyncWrite` turns bytes into DATA
//! frames and shutdown into FIN. Everything else happens in the connection's driver task, the
//! only code that touches the transport: it writes the queued frames, reads and decodes incoming
//! ones, answers pings, sends acknowledgements and heartbeats on the [`SessionCore`]'s timers,
//! hands the peer's acknowledgements to the pipe's writer, and declares the path dead when the
//! peer falls silent. Because the driver reads even while the application does not, control
//! frames are never stuck behind unread data, up to a bounded inbound queue.
//!
//! The pipe and the driver share one small state behind a mutex; neither holds it across an
//! await, and the driver never holds it while calling into the pipe (the pipe's writer calls
//! into this state with its own lock held).

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::core::{Event, SessionConfig, SessionCore, Transmit};
use super::link::SessionLink;
use crate::error::Error;
use crate::proto::{CloseCode, Established, Frame, FrameDecoder, FrameType, MAX_FRAME_PAYLOAD};
use crate::transport::BoxIo;

/// Encoded frames waiting for the transport beyond which writes wait: enough to keep a fast
/// link busy between two driver turns, small enough to stay in cache.
const OUTBOUND_LIMIT: usize = 256 * 1024;

/// Received payload not yet read by the application beyond which the driver stops reading the
/// transport (TCP's own flow control then holds the peer back).
const INBOUND_LIMIT: usize = 1024 * 1024;

/// Room the driver makes in the decoder's buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

/// How long a CLOSE may take to leave before the transport is dropped anyway.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The transport of a session-mode pipe (see the [module docs](self)). It is created by the
/// session layer after a handshake; its driver task runs until the pipe drops it or the path
/// fails.
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
    fn to_io(&self) -> io::Error {
        match self {
            Broken::Lost(kind, message) => io::Error::new(*kind, message.clone()),
            Broken::Fatal(err) => err.clone().into(),
        }
    }
}

struct ConnShared {
    state: Mutex<ConnState>,
    link: Arc<SessionLink>,
    /// Cancelled when the driver has ended and dropped the transport.
    finished: CancellationToken,
}

struct ConnState {
    core: SessionCore,
    /// Payloads received and not yet read, oldest first.
    inbound: VecDeque<Bytes>,
    inbound_len: usize,
    /// The peer's FIN arrived (after every byte in `inbound`).
    peer_finished: bool,
    /// Encoded frames for the driver to write.
    outbound: BytesMut,
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
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    driver_waker: Option<Waker>,
}

impl ConnState {
    fn push_frame(&mut self, frame: &Frame) {
        frame.encode(&mut self.outbound);
    }

    fn wake_driver(&mut self) {
        if let Some(waker) = self.driver_waker.take() {
            waker.wake();
        }
    }

    fn wake_app(&mut self) {
        for waker in [self.read_waker.take(), self.write_waker.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
    }

    /// Stops the connection with `broken`; with `close`, that CLOSE is sent (in place of any
    /// queued data) before the transport is dropped.
    fn break_with(&mut self, broken: Broken, close: Option<Frame>, now: Instant) {
        if self.broken.is_some() {
            return;
        }
        self.broken = Some(broken);
        self.outbound.clear();
        if let Some(frame) = close {
            self.push_frame(&frame);
            self.linger_until = Some(now + CLOSE_LINGER);
        }
        self.wake_app();
    }
}

/// What the driver must do once it has released the state lock.
#[derive(Default)]
struct Effects {
    ack: Option<u64>,
    lost: Option<io::Error>,
}

impl Effects {
    fn apply(self, shared: &ConnShared, link: &SessionLink) {
        if let Some(seq) = self.ack {
            link.acknowledge(seq);
        }
        if let Some(err) = self.lost {
            // A connection the pipe has already dropped reports nothing: its loss is old news
            // and must not pass for a failure of the next one.
            if !shared.lock().detached {
                link.transport_lost(err);
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
        let shared = Arc::new(ConnShared {
            state: Mutex::new(ConnState {
                core,
                inbound: VecDeque::new(),
                inbound_len: 0,
                peer_finished: false,
                outbound: BytesMut::new(),
                sent: established.remote_reader_seq(),
                fin_queued: false,
                broken: None,
                deferred_close: None,
                linger_until: None,
                detached: false,
                read_waker: None,
                write_waker: None,
                driver_waker: None,
            }),
            link: link.clone(),
            finished: CancellationToken::new(),
        });
        let driver = Driver {
            shared: shared.clone(),
            io,
            decoder,
            link,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            need_flush: false,
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
        let mut st = self.shared.lock();
        st.detached = true;
        st.wake_driver();
    }
}

impl AsyncRead for SessionConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if st.inbound_len > 0 {
            let was_full = st.inbound_len >= INBOUND_LIMIT;
            let mut n = 0;
            while buf.remaining() > 0 {
                let Some(front) = st.inbound.front_mut() else {
                    break;
                };
                let take = front.len().min(buf.remaining());
                buf.put_slice(&front[..take]);
                front.advance(take);
                if front.is_empty() {
                    st.inbound.pop_front();
                }
                n += take;
            }
            st.inbound_len -= n;
            let deadline = st.core.poll_timeout();
            st.core.on_delivered(now(), n as u64);
            // Wake the driver only when it has something new to do: an ack to send, an earlier
            // deadline to sleep to, or room to read again.
            if st.core.has_transmit() || st.core.poll_timeout() < deadline || was_full {
                st.wake_driver();
            }
            return Poll::Ready(Ok(()));
        }
        if st.peer_finished {
            if let Some(close) = st.deferred_close.take() {
                self.shared.link.transport_lost(close.into());
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(broken) = &st.broken {
            return Poll::Ready(Err(broken.to_io()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for SessionConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(broken) = &st.broken {
            return Poll::Ready(Err(broken.to_io()));
        }
        if st.fin_queued {
            return Poll::Ready(Err(Error::WriteAfterShutdown.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.outbound.len() >= OUTBOUND_LIMIT {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(MAX_FRAME_PAYLOAD as usize);
        let was_empty = st.outbound.is_empty();
        st.outbound.reserve(crate::proto::HEADER_LEN + n);
        st.outbound.put_u8(FrameType::Data as u8);
        st.outbound.put_u32(n as u32);
        st.outbound.put_slice(&buf[..n]);
        st.sent += n as u64;
        st.core.on_transmit(now());
        if was_empty {
            st.wake_driver();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if let Some(broken) = &st.broken {
            return Poll::Ready(Err(broken.to_io()));
        }
        if st.outbound.is_empty() {
            return Poll::Ready(Ok(()));
        }
        st.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Sends FIN after everything written, once; ready when it has left.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut st = self.shared.lock();
            if st.broken.is_none() && !st.fin_queued {
                st.fin_queued = true;
                st.push_frame(&Frame::fin());
                st.core.on_transmit(now());
                st.wake_driver();
            }
        }
        self.as_mut().poll_flush(cx)
    }
}

/// The task that owns the transport of one [`SessionConn`].
struct Driver {
    shared: Arc<ConnShared>,
    io: BoxIo,
    decoder: FrameDecoder,
    link: Arc<SessionLink>,
    sleep: Pin<Box<Sleep>>,
    /// Bytes were written since the transport was last flushed.
    need_flush: bool,
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
        let mut st = self.shared.lock();
        if st.broken.is_none() {
            st.broken = Some(Broken::Lost(
                io::ErrorKind::ConnectionAborted,
                "session connection dropped".into(),
            ));
        }
        st.wake_app();
        drop(st);
        self.shared.finished.cancel();
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut effects = Effects::default();
            let turn = self.turn(cx, &mut effects);
            effects.apply(&self.shared, &self.link);
            match turn {
                Turn::Again => continue,
                Turn::Done => return Poll::Ready(()),
                Turn::Park => {}
            }
            let deadline = {
                let st = self.shared.lock();
                match st.linger_until {
                    Some(linger) => Some(linger),
                    None => st.core.poll_timeout(),
                }
            };
            let Some(deadline) = deadline else {
                return Poll::Pending;
            };
            self.sleep.as_mut().reset(deadline.into());
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
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
            if st.broken.is_some() || !self.link.pipe_closed() {
                return Turn::Done;
            }
            st.broken = Some(Broken::Fatal(Error::PipeClosed));
            st.push_frame(&Frame::close(CloseCode::Normal, "closed"));
            st.linger_until = Some(now + CLOSE_LINGER);
        }
        if !st
            .driver_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.driver_waker = Some(cx.waker().clone());
        }
        if let Some(linger_until) = st.linger_until {
            // Closing: send the CLOSE, then end.
            return match self.poll_write_out(&mut st, cx) {
                Poll::Ready(Ok(())) => {
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
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

        // Timers. A full inbound queue means we are the ones not reading: the peer's silence
        // is then not evidence of a dead path.
        if st.inbound_len >= INBOUND_LIMIT {
            st.core.handle_received(now);
        }
        st.core.handle_timeout(now);
        while let Some(transmit) = st.core.poll_transmit() {
            let frame = match transmit {
                Transmit::Ack(seq) => Frame::ack(seq),
                Transmit::Ping(nonce) => Frame::ping(nonce),
                Transmit::Pong(nonce) => Frame::pong(nonce),
            };
            st.push_frame(&frame);
            st.core.on_transmit(now);
        }
        while let Some(event) = st.core.poll_event() {
            match event {
                Event::PeerAcked(seq) => effects.ack = Some(seq),
                Event::PathDead => {
                    let broken = Broken::Lost(
                        io::ErrorKind::TimedOut,
                        "no frame from the peer within the liveness bound".into(),
                    );
                    effects.lost = Some(broken.to_io());
                    st.break_with(broken, None, now);
                    return Turn::Done;
                }
            }
        }

        // Outgoing.
        if let Poll::Ready(Err(err)) = self.poll_write_out(&mut st, cx) {
            return self.lost(&mut st, effects, err, now);
        }

        // Incoming.
        if st.inbound_len >= INBOUND_LIMIT {
            return Turn::Park;
        }
        let Some(buf) = self.decoder.receive_buffer() else {
            return Turn::Done;
        };
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, buf) {
            Poll::Pending => Turn::Park,
            Poll::Ready(Err(err)) => self.lost(&mut st, effects, err, now),
            Poll::Ready(Ok(0)) => {
                let message = match self.decoder.finish() {
                    Ok(()) => "transport closed by the peer".to_owned(),
                    Err(truncated) => truncated.to_string(),
                };
                let err = io::Error::new(io::ErrorKind::UnexpectedEof, message);
                self.lost(&mut st, effects, err, now)
            }
            Poll::Ready(Ok(_)) => {
                self.on_received(&mut st, effects, now);
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
        st.break_with(Broken::Lost(err.kind(), err.to_string()), None, now);
        effects.lost = Some(err);
        Turn::Done
    }

    /// Handles every whole frame the decoder holds.
    fn on_received(&mut self, st: &mut ConnState, effects: &mut Effects, now: Instant) {
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "peer sent bytes that are not a frame");
                    let close = Frame::close(err.close_code(), err.to_string());
                    self.violation(st, effects, Error::Protocol(err.to_string()), close, now);
                    return;
                }
            };
            if let Err((err, close)) = self.on_frame(st, frame, now) {
                match close {
                    Some(close) => self.violation(st, effects, err, close, now),
                    None => {
                        if st.inbound_len > 0 || st.peer_finished {
                            // Data (or FIN) came before the CLOSE: the reader gets it first.
                            st.deferred_close = Some(err.clone());
                        } else {
                            effects.lost = Some(err.clone().into());
                        }
                        let broken = match err.is_terminal() {
                            true => Broken::Fatal(err),
                            false => {
                                Broken::Lost(io::ErrorKind::ConnectionAborted, err.to_string())
                            }
                        };
                        st.break_with(broken, None, now);
                    }
                }
                return;
            }
        }
    }

    fn violation(
        &mut self,
        st: &mut ConnState,
        effects: &mut Effects,
        err: Error,
        close: Frame,
        now: Instant,
    ) {
        effects.lost = Some(err.clone().into());
        st.break_with(Broken::Fatal(err), Some(close), now);
    }

    /// Applies one frame; an error ends the connection, with the CLOSE to send if any.
    fn on_frame(
        &mut self,
        st: &mut ConnState,
        frame: Frame,
        now: Instant,
    ) -> Result<(), (Error, Option<Frame>)> {
        let violation = |what: String| {
            let close = Frame::close(CloseCode::ProtocolViolation, what.clone());
            Err((Error::Protocol(what), Some(close)))
        };
        match frame {
            Frame::Data(_) if st.peer_finished => return violation("DATA after FIN".into()),
            Frame::Data(payload) => {
                st.core.handle_received(now);
                if !payload.is_empty() {
                    st.inbound_len += payload.len();
                    st.inbound.push_back(payload);
                    if let Some(waker) = st.read_waker.take() {
                        waker.wake();
                    }
                }
            }
            Frame::Ack(seq) => {
                let sent = st.sent;
                if let Err(lie) = st.core.handle_ack(now, seq, sent) {
                    return violation(lie.to_string());
                }
            }
            Frame::Ping(nonce) => st.core.handle_ping(now, nonce),
            Frame::Pong(_) => st.core.handle_received(now),
            Frame::Fin => {
                st.core.handle_received(now);
                st.peer_finished = true;
                if let Some(waker) = st.read_waker.take() {
                    waker.wake();
                }
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

    /// Writes the queued frames, then flushes.
    fn poll_write_out(&mut self, st: &mut ConnState, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !st.outbound.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &st.outbound))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            st.outbound.advance(n);
            self.need_flush = true;
            if st.outbound.len() < OUTBOUND_LIMIT {
                if let Some(waker) = st.write_waker.take() {
                    waker.wake();
                }
            }
        }
        if self.need_flush {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.need_flush = false;
        }
        if let Some(waker) = st.write_waker.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }
}
