//! What a session's handles and its driver task share: the [`Connection`] and the transport
//! carrying it, behind one lock (quinn's `ConnectionRef`), and the tasks waiting on them.
//!
//! The application's reads and writes run here, in the caller's task with no task hop: a write
//! takes bytes into the connection's replay buffer and hands the frame straight to the
//! transport as one vectored write; a read takes received bytes, or reads the rest of a DATA
//! frame from the transport straight into the caller's buffer. Whatever the caller's task does
//! not finish (a transport that takes no more, timers, control frames, a resume) is the
//! driver's.
//!
//! Nobody holds the lock across an await. The transport is always polled with one of two
//! fan-out wakers (one per direction) that wake every task waiting on that direction, since a
//! transport keeps only the last waker it was given; the waker lists have their own lock,
//! since a transport may wake from inside a poll while the state lock is held.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Event};
use crate::budget;
use crate::error::Error;
use crate::pipe::PipeState;
use crate::proto::CloseCode;
use crate::transport::BoxIo;

/// The current time, from tokio's clock so that paused-time tests control it.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// One session's shared state.
pub(crate) struct Shared {
    state: Mutex<State>,
    wakers: Arc<Wakers>,
    /// Given to the transport with every read: wakes the application's reader and the driver.
    read_waker: Waker,
    /// Given to the transport with every write: wakes the application's writers and the driver.
    write_waker: Waker,
    /// Cancelled when the driver has ended and dropped the transport.
    pub(crate) finished: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The state behind the lock.
pub(crate) struct State {
    pub(crate) conn: Connection,
    /// The transport of the connection's current path: present exactly while it has one.
    io: Option<BoxIo>,
    /// A client is dialling a new transport.
    pub(crate) dialing: bool,
    /// A client should dial at once, skipping the backoff.
    pub(crate) dial_now: bool,
    /// A server's newest resume attempt that detached the path (0: none): only it may attach
    /// the next transport, and an older attempt that comes later is refused.
    pub(crate) latest_attempt: u64,
    status: watch::Sender<PipeState>,
    /// The deadline the driver sleeps until.
    pub(crate) driver_deadline: Option<Instant>,
}

/// The tasks waiting on a session. Kept apart from the state lock.
#[derive(Default)]
pub(crate) struct Wakers {
    slots: Mutex<WakerSlots>,
}

#[derive(Default)]
struct WakerSlots {
    /// Tasks waiting to read: one per task that reads concurrently (reads take `&self`).
    readers: Vec<Waker>,
    /// Tasks waiting to write, flush, shut down or see acknowledgements: one per task that
    /// writes concurrently (the application decides how many).
    writers: Vec<Waker>,
    driver: Option<Waker>,
    /// The reader was woken for incoming bytes and has not read since: the driver lets it go
    /// first (it reads payloads without a copy).
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

    fn add_reader(&self, waker: &Waker) {
        let mut slots = self.lock();
        slots.reader_notified = false;
        Self::add(&mut slots.readers, waker);
    }

    fn add_writer(&self, waker: &Waker) {
        Self::add(&mut self.lock().writers, waker);
    }

    fn add(list: &mut Vec<Waker>, waker: &Waker) {
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    /// Registers the driver; returns whether the reader was woken and has not read since.
    pub(crate) fn set_driver(&self, waker: &Waker) -> bool {
        let mut slots = self.lock();
        Self::set(&mut slots.driver, waker);
        slots.reader_notified
    }

    pub(crate) fn clear_reader_notified(&self) {
        self.lock().reader_notified = false;
    }

    pub(crate) fn clear_driver(&self) {
        self.lock().driver = None;
    }

    fn wake(&self, wakes: Wakes) {
        if !(wakes.reader || wakes.writers || wakes.driver) {
            return;
        }
        let (readers, writers, driver) = {
            let mut slots = self.lock();
            let take = |wanted: bool, list: &mut Vec<Waker>| match wanted {
                true => std::mem::take(list),
                false => Vec::new(),
            };
            let readers = take(wakes.reader, &mut slots.readers);
            slots.reader_notified |= !readers.is_empty();
            let writers = take(wakes.writers, &mut slots.writers);
            let driver = wakes.driver.then(|| slots.driver.clone()).flatten();
            (readers, writers, driver)
        };
        for waker in driver.into_iter().chain(readers).chain(writers) {
            waker.wake();
        }
    }
}

/// Who must be woken once the state lock is released.
#[derive(Debug, Default, Clone, Copy)]
#[must_use]
pub(crate) struct Wakes {
    reader: bool,
    writers: bool,
    driver: bool,
}

impl Wakes {
    pub(crate) fn all() -> Wakes {
        Wakes {
            reader: true,
            writers: true,
            driver: true,
        }
    }

    fn or(self, other: Wakes) -> Wakes {
        Wakes {
            reader: self.reader || other.reader,
            writers: self.writers || other.writers,
            driver: self.driver || other.driver,
        }
    }
}

/// The fan-out waker of the read direction.
struct ReadWake(Arc<Wakers>);

impl Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake(Wakes {
            reader: true,
            writers: false,
            driver: true,
        });
    }
}

/// The fan-out waker of the write direction.
struct WriteWake(Arc<Wakers>);

impl Wake for WriteWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake(Wakes {
            reader: false,
            writers: true,
            driver: true,
        });
    }
}

/// Shuts `io` down as far as it goes without waiting (TLS close_notify, TCP FIN after a
/// CLOSE), and drops it.
fn courtesy_shutdown(mut io: BoxIo) {
    let mut cx = Context::from_waker(Waker::noop());
    let _ = Pin::new(&mut io).poll_shutdown(&mut cx);
}

/// What a read of the transport came to.
enum Received {
    /// Bytes arrived and were handed to the connection.
    Bytes,
    /// The transport failed or ended: the path is gone.
    Lost,
    /// Nothing to read, or nothing wanted.
    Nothing,
}

impl Shared {
    /// Shared state for `conn`, carried by `io` if it has a path.
    pub(crate) fn new(conn: Connection, io: Option<BoxIo>) -> Arc<Shared> {
        let wakers = Arc::new(Wakers::default());
        let state = State {
            conn,
            io,
            dialing: false,
            dial_now: false,
            latest_attempt: 0,
            status: watch::Sender::new(PipeState::Disconnected),
            driver_deadline: None,
        };
        let status = state.derive_status();
        state.status.send_replace(status);
        Arc::new(Shared {
            state: Mutex::new(state),
            read_waker: Waker::from(Arc::new(ReadWake(wakers.clone()))),
            write_waker: Waker::from(Arc::new(WriteWake(wakers.clone()))),
            wakers,
            finished: CancellationToken::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn wakers(&self) -> &Wakers {
        &self.wakers
    }

    /// Runs `f` on the state, then settles it (events, status) and wakes whoever must be.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State, Instant) -> R) -> R {
        let now = now();
        let (result, wakes) = {
            let mut st = self.lock();
            let result = f(&mut st, now);
            (result, st.settle())
        };
        self.wakers.wake(wakes);
        result
    }

    /// Wakes whoever `wakes` names (after the lock was released).
    pub(crate) fn wake(&self, wakes: Wakes) {
        self.wakers.wake(wakes);
    }

    /// Closes the session with `code` (see [`Connection::close`]). The driver sends the
    /// CLOSE, dialling at once first if a client has no transport. (Not sent from here: a
    /// session dropped as its runtime shuts down sends nothing, as a crashed process would
    /// not.)
    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        self.with(|st, now| {
            st.conn.close(now, code, reason);
            if st.conn.is_closing() && !st.conn.has_path() {
                st.dial_now = true;
            }
        });
        self.wakers.wake(Wakes {
            driver: true,
            ..Wakes::default()
        });
    }

    /// A receiver that sees every state transition.
    pub(crate) fn status(&self) -> watch::Receiver<PipeState> {
        self.lock().status.subscribe()
    }

    /// The application's read.
    ///
    /// Takes part in tokio's cooperative budget as tokio's sockets do, one unit per read
    /// whatever the transport spends (see [`budget`](crate::budget)): a task reading a session
    /// that always has bytes buffered still yields now and then.
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let result = budget::poll_transport(cx, |cx| {
            let now = now();
            let (result, wakes) = {
                let mut st = self.lock();
                let result = st.poll_read_app(self, cx, buf, now);
                // An acknowledgement the read made due goes out now, if the transport takes it.
                st.transmit(&self.write_waker, now);
                (result, st.settle())
            };
            self.wakers.wake(wakes);
            result
        });
        if result.is_ready() {
            coop.made_progress();
        }
        result
    }

    /// The application's write; spends the task's budget as [`poll_read`](Self::poll_read)
    /// does, so a writer that always finds room (a disconnected session filling its buffer)
    /// still yields.
    pub(crate) fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let result = budget::poll_transport(cx, |cx| {
            let now = now();
            let (result, wakes) = {
                let mut st = self.lock();
                let result = match st.conn.write(now, buf) {
                    Err(err) => Poll::Ready(Err(err.into())),
                    Ok(None) => {
                        self.wakers.add_writer(cx.waker());
                        Poll::Pending
                    }
                    Ok(Some(n)) => {
                        st.transmit(&self.write_waker, now);
                        Poll::Ready(Ok(n))
                    }
                };
                (result, st.settle())
            };
            self.wakers.wake(wakes);
            result
        });
        if result.is_ready() {
            coop.made_progress();
        }
        result
    }

    /// Ready once everything written (and FIN after a shutdown) is in the current transport
    /// and the transport flushed: waits while disconnected.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let now = now();
        let (result, wakes) = {
            let mut st = self.lock();
            st.transmit(&self.write_waker, now);
            let result = st.poll_flushed(self, cx);
            (result, st.settle())
        };
        self.wakers.wake(wakes);
        result
    }

    /// Shuts our direction down (FIN after the data); ready once FIN is in the transport.
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(err) = self.with(|st, _| st.conn.shutdown()) {
            return Poll::Ready(Err(err.into()));
        }
        self.poll_flush(cx)
    }

    /// Ready once the peer acknowledged everything written, or the session ended.
    pub(crate) fn poll_acknowledged(&self, cx: &mut Context<'_>) -> Poll<()> {
        let st = self.lock();
        if st.conn.is_acknowledged() || st.conn.is_ended() {
            return Poll::Ready(());
        }
        self.wakers.add_writer(cx.waker());
        Poll::Pending
    }

    /// The driver's turn on the transport: reads what came, fires the timers that are due,
    /// and writes what is due. When the application's reader was just woken for what came
    /// (`read` false) it reads first, and the timers wait for the driver's next turn.
    /// Returns whether anything happened.
    ///
    /// Reading before the timers fire means a frame already in the transport when a deadline
    /// passes (the PONG a probe waits for, at its bound) counts, instead of the path being
    /// declared dead with the answer unread.
    pub(crate) fn drive_io(&self, st: &mut State, now: Instant, read: bool) -> bool {
        let mut progress = false;
        if read {
            let mut cx = Context::from_waker(&self.read_waker);
            progress = !matches!(
                st.poll_receive(&mut cx, now, usize::MAX),
                Poll::Pending | Poll::Ready(Received::Nothing)
            );
            st.conn.handle_timeout(now);
        }
        progress | st.transmit(&self.write_waker, now)
    }
}

impl State {
    /// Installs `io` as the transport of the path the connection just started. The path may
    /// already be over (the frames that came with the handshake closed the session): the
    /// transport is then shut down and dropped.
    pub(crate) fn attach(&mut self, io: BoxIo) {
        self.dialing = false;
        self.dial_now = false;
        if self.conn.has_path() {
            self.io = Some(io);
        } else {
            courtesy_shutdown(io);
        }
    }

    /// Drains the connection's events and keeps the invariants: the transport is dropped
    /// with its path, the status follows the state. Returns who must be woken.
    pub(crate) fn settle(&mut self) -> Wakes {
        let mut wakes = Wakes::default();
        while let Some(event) = self.conn.poll_event() {
            wakes = wakes.or(match event {
                Event::Readable => Wakes {
                    reader: true,
                    ..Wakes::default()
                },
                Event::Writable => Wakes {
                    writers: true,
                    ..Wakes::default()
                },
                Event::PathLost | Event::Ended => Wakes::all(),
                _ => Wakes {
                    driver: true,
                    ..Wakes::default()
                },
            });
        }
        if !self.conn.has_path() {
            if let Some(io) = self.io.take() {
                courtesy_shutdown(io);
            }
        }
        let deadline = self.conn.poll_timeout();
        if deadline.is_some_and(|due| self.driver_deadline.is_none_or(|armed| due < armed)) {
            wakes.driver = true;
        }
        let status = self.derive_status();
        self.status.send_if_modified(|current| {
            let changed = std::mem::discriminant(current) != std::mem::discriminant(&status);
            if changed {
                *current = status;
            }
            changed
        });
        wakes
    }

    fn derive_status(&self) -> PipeState {
        if self.conn.is_ended() {
            return match self.conn.error() {
                Some(err) => PipeState::Failed(err),
                None => PipeState::Closed,
            };
        }
        if self.conn.has_path() {
            PipeState::Connected
        } else if self.dialing {
            PipeState::Reconnecting
        } else {
            PipeState::Disconnected
        }
    }

    fn poll_read_app(
        &mut self,
        shared: &Shared,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        now: Instant,
    ) -> Poll<io::Result<()>> {
        shared.wakers.clear_reader_notified();
        loop {
            match self.conn.read(now, buf.initialize_unfilled()) {
                Ok(Some(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) => return Poll::Ready(Err(err.into())),
                Ok(None) => {}
            }
            shared.wakers.add_reader(cx.waker());
            let mut rcx = Context::from_waker(&shared.read_waker);
            let direct = self.conn.direct_read_len();
            if direct > 0 {
                let Some(io) = self.io.as_mut() else {
                    return Poll::Pending;
                };
                let unfilled = buf.initialize_unfilled();
                let len = unfilled.len().min(direct);
                let mut into = ReadBuf::new(&mut unfilled[..len]);
                match Pin::new(io).poll_read(&mut rcx, &mut into) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if !into.filled().is_empty() => {
                        let n = into.filled().len();
                        self.conn.on_direct_read(now, n);
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(result) => self.lost(now, result.err()),
                }
                continue;
            }
            // No further than the current frame: the payload after a DATA header then goes
            // straight into the caller's buffer.
            let wanted = self.conn.frame_wanted().max(1);
            match self.poll_receive(&mut rcx, now, wanted) {
                Poll::Pending | Poll::Ready(Received::Nothing) => return Poll::Pending,
                Poll::Ready(Received::Bytes | Received::Lost) => {}
            }
        }
    }

    /// Reads the transport into the connection's receive buffer once, at most `limit` bytes.
    fn poll_receive(&mut self, cx: &mut Context<'_>, now: Instant, limit: usize) -> Poll<Received> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Received::Nothing);
        };
        let Some((buf, max)) = self.conn.receive_buffer() else {
            return Poll::Ready(Received::Nothing);
        };
        let max = max.min(limit);
        let before = buf.len();
        let result = {
            let mut limited = bytes::BufMut::limit(&mut *buf, max);
            tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut limited)
        };
        match result {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(n)) if n > 0 => {
                debug_assert_eq!(buf.len(), before + n);
                self.conn.on_received(now, n);
                Poll::Ready(Received::Bytes)
            }
            Poll::Ready(result) => {
                self.lost(now, result.err());
                Poll::Ready(Received::Lost)
            }
        }
    }

    /// The transport failed with `err`, or ended (`None`).
    fn lost(&mut self, now: Instant, err: Option<io::Error>) {
        match err {
            Some(err) => {
                tracing::debug!(session = %self.conn.id(), error = %err, "session transport lost")
            }
            None => {
                tracing::debug!(session = %self.conn.id(), "session transport closed by the peer")
            }
        }
        self.conn.handle_transport_lost(now);
    }

    /// Writes what the connection has to send until the transport takes no more. Returns
    /// whether anything was written.
    fn transmit(&mut self, write_waker: &Waker, now: Instant) -> bool {
        let mut cx = Context::from_waker(write_waker);
        let mut wrote = false;
        loop {
            let Some(io) = self.io.as_mut() else {
                return wrote;
            };
            let Some(transmit) = self.conn.poll_transmit(now) else {
                break;
            };
            let slices = transmit.io_slices();
            match Pin::new(&mut *io).poll_write_vectored(&mut cx, &slices) {
                Poll::Pending => return wrote,
                Poll::Ready(Ok(0)) => {
                    let err = io::Error::new(io::ErrorKind::WriteZero, "transport took no bytes");
                    self.lost(now, Some(err));
                    return wrote;
                }
                Poll::Ready(Ok(n)) => {
                    self.conn.on_transmitted(now, n);
                    wrote = true;
                }
                Poll::Ready(Err(err)) => {
                    self.lost(now, Some(err));
                    return wrote;
                }
            }
        }
        if wrote {
            // Free for TCP; a TLS transport pushes its record out here.
            if let Some(io) = self.io.as_mut() {
                if let Poll::Ready(Err(err)) = Pin::new(io).poll_flush(&mut cx) {
                    self.lost(now, Some(err));
                }
            }
        }
        wrote
    }

    fn poll_flushed(&mut self, shared: &Shared, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(err) = self.conn.error() {
            return Poll::Ready(Err(err.into()));
        }
        if self.conn.is_ended() {
            return Poll::Ready(Err(Error::PipeClosed.into()));
        }
        shared.wakers.add_writer(cx.waker());
        if !self.conn.is_flushed() {
            return Poll::Pending;
        }
        let Some(io) = self.io.as_mut() else {
            return Poll::Pending;
        };
        let mut wcx = Context::from_waker(&shared.write_waker);
        match Pin::new(io).poll_flush(&mut wcx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(err)) => {
                self.lost(now(), Some(err));
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{FrameDecoder, SessionId, Side};
    use crate::session::SessionOptions;

    #[tokio::test]
    async fn a_transport_whose_path_ended_with_its_handshake_is_dropped_not_attached() {
        let options = SessionOptions::default();
        let now = now();
        let mut conn =
            Connection::new(Side::Client, SessionId::from_bytes([1; 16]), &options, now).unwrap();
        // RESUMED and a CLOSE came in one segment: the path ends as it starts.
        let mut decoder = FrameDecoder::handshake();
        decoder.push(&crate::proto::Frame::close(CloseCode::Normal, "bye").to_vec());
        conn.start_path(now, decoder, 0).unwrap();
        assert!(!conn.has_path());
        let shared = Shared::new(conn, None);
        let (io, _far) = tokio::io::duplex(64);
        let mut st = shared.lock();
        st.dialing = true;
        st.attach(Box::new(io));
        assert!(st.io.is_none() && !st.dialing);
        assert!(matches!(st.derive_status(), PipeState::Failed(_)));
    }
}
