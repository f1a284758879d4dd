//! `BackedWriter`: the sending half of a pipe. It keeps every byte it sends in a
//! [`ReplayBuffer`] and, after its transport fails, resends from the offset the peer reports.
//!
//! It owns the replay buffer and the current write transport; it does not choose when to
//! reconnect (that is the pipe's job) and never reads from the network.
//!
//! No lock is held across an await: each poll takes the state lock, polls the transport once
//! and returns, so [`connected`](BackedWriter::connected) and
//! [`sequence_num`](BackedWriter::sequence_num) answer at once even while a write is pending.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::AsyncWrite;

use crate::budget;
use crate::error::{Error, Result};
use crate::event::{Component, ErrorEvent, EventSender};
use crate::ring::ReplayBuffer;
use crate::wake::WaitList;

/// A writer that survives the loss of its transport.
///
/// Bytes go to the replay buffer and to the current transport. When the transport fails, the
/// writer reports an [`ErrorEvent`], becomes disconnected, and writes wait; once
/// [`reconnect`](Self::reconnect) supplies a new transport and the peer's offset, the missing
/// bytes are replayed and writing resumes. Nothing is lost or sent twice.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), backedpipe::Error> {
/// use backedpipe::BackedWriter;
/// use tokio::io::AsyncReadExt;
///
/// let (events, _failures) = tokio::sync::mpsc::unbounded_channel();
/// let writer = BackedWriter::new(1024, events)?;
/// let (transport, mut peer) = tokio::io::duplex(64);
/// writer.reconnect(0, transport).await?;
/// writer.write(b"hello").await?;
/// let mut got = [0; 5];
/// peer.read_exact(&mut got).await.unwrap();
/// assert_eq!(&got, b"hello");
/// assert_eq!(writer.sequence_num(), 5);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BackedWriter<W> {
    state: Mutex<WriterState<W>>,
    waiters: Arc<WaitList>,
    fanout: Waker,
    events: EventSender,
}

#[derive(Debug)]
struct WriterState<W> {
    ring: ReplayBuffer,
    transport: Option<W>,
    link: Link,
    /// Bytes handed to the current transport (meaningful while `link` is not `Down`).
    sent_seq: u64,
    generation: u64,
    /// Set once the writer is closed or has failed for good; what writes then return.
    closed: Option<Error>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No transport: writes wait.
    Down,
    /// A transport is attached and `reconnect` is replaying to it: writes wait.
    Replaying,
    /// Writes go straight to the transport.
    Up,
}

impl<W: AsyncWrite + Unpin> BackedWriter<W> {
    /// Creates a disconnected writer with a replay buffer of `capacity` bytes (committed only as
    /// bytes are written). Transport failures are reported on `events`.
    ///
    /// # Errors
    /// [`Error::InvalidCapacity`] if `capacity` is zero.
    pub fn new(capacity: usize, events: EventSender) -> Result<Self> {
        let (waiters, fanout) = WaitList::new();
        Ok(BackedWriter {
            state: Mutex::new(WriterState {
                ring: ReplayBuffer::new(capacity)?,
                transport: None,
                link: Link::Down,
                sent_seq: 0,
                generation: 0,
                closed: None,
            }),
            waiters,
            fanout,
            events,
        })
    }

    /// The total number of bytes written (accepted into the stream).
    pub fn sequence_num(&self) -> u64 {
        self.lock().ring.end_seq()
    }

    /// True while a transport is attached and fully caught up.
    pub fn connected(&self) -> bool {
        let st = self.lock();
        st.closed.is_none() && st.link == Link::Up
    }

    /// Sets the connection generation carried by this writer's [`ErrorEvent`]s.
    pub fn set_generation(&self, generation: u64) {
        self.lock().generation = generation;
    }

    /// Bytes held for replay, and bytes of memory committed to hold them.
    pub fn buffered(&self) -> (usize, usize) {
        let st = self.lock();
        (st.ring.len(), st.ring.committed())
    }

    /// Writes all of `buf` and returns its length once every byte has been handed to a live
    /// transport, directly or by replay after a reconnect (the Go `Write`). Waits while
    /// disconnected. A zero-length write returns at once.
    ///
    /// # Errors
    /// [`Error::WriterClosed`] after [`close`](Self::close) (or the error the writer failed with).
    pub async fn write(&self, buf: &[u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut written = 0;
        let mut end = 0;
        while written < buf.len() {
            let (n, end_seq) = poll_fn(|cx| self.poll_commit(cx, &buf[written..])).await?;
            written += n;
            end = end_seq;
        }
        poll_fn(|cx| self.poll_sent(cx, end)).await?;
        Ok(written)
    }

    /// The `AsyncWrite` form of a write: `Ready(Ok(n))` once `n` bytes are committed to the
    /// stream. They have reached the transport, or the transport failed while taking them and
    /// they will be replayed after the reconnect. Waits while disconnected.
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<Result<usize>> {
        self.poll_commit(cx, buf).map_ok(|(n, _)| n)
    }

    /// Flushes the current transport; waits while disconnected.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let mut st = self.lock();
        if let Some(err) = &st.closed {
            return Poll::Ready(Err(err.clone()));
        }
        let mut tcx = self.waiters.context(cx, &self.fanout);
        let (Link::Up, Some(transport)) = (st.link, st.transport.as_mut()) else {
            return Poll::Pending;
        };
        match ready!(Pin::new(transport).poll_flush(&mut tcx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(err) => {
                self.transport_failed(&mut st, err);
                Poll::Pending
            }
        }
    }

    /// Ends the stream for writing. Raw mode has no end marker (a transport shutdown would
    /// look like a drop), so this only flushes the transport. Waits while disconnected.
    ///
    /// # Errors
    /// The writer's close or failure error.
    pub fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.poll_flush(cx)
    }

    /// Attaches `new_writer` and replays every byte from `replay_from` (the number of bytes the
    /// peer has read) before writes resume. Writes issued meanwhile wait for it.
    ///
    /// If the writer is closed during the replay, `close` returns at once, the replay runs to
    /// its end, and the writer then drops the transport and stays closed. Dropping the returned
    /// future abandons the replay and leaves the writer disconnected.
    ///
    /// # Errors
    /// - [`Error::WriterClosed`] if the writer was closed first;
    /// - [`Error::FutureSequence`] / [`Error::ReplayDataUnavailable`] if `replay_from` is outside
    ///   the bytes held; the writer is left exactly as it was;
    /// - [`Error::ReplayFailed`] / [`Error::PartialReplay`] if `new_writer` failed during the
    ///   replay; the writer is then disconnected.
    pub async fn reconnect(&self, replay_from: u64, new_writer: W) -> Result<()> {
        {
            let mut st = self.lock();
            if st.closed.is_some() {
                return Err(Error::WriterClosed);
            }
            st.ring.check_replay_from(replay_from)?;
            st.transport = Some(new_writer);
            st.link = Link::Replaying;
            st.sent_seq = replay_from;
        }
        let mut guard = ReplayGuard {
            writer: self,
            armed: true,
        };
        let result = loop {
            match poll_fn(|cx| self.poll_replay(cx, replay_from)).await {
                Some(result) => break result,
                // A slice is out: let the thread's other tasks run, and the runtime poll for
                // I/O events (the peer's reader may be waiting on this thread for the first
                // replayed bytes), before the next one.
                None => tokio::task::yield_now().await,
            }
        };
        guard.armed = false;
        result
    }

    /// Closes the writer: later writes fail with [`Error::WriterClosed`], blocked writes wake
    /// with it, and the transport is dropped (after a replay in progress, see
    /// [`reconnect`](Self::reconnect)). Idempotent; never blocks.
    pub fn close(&self) -> Result<()> {
        let mut st = self.lock();
        st.closed.get_or_insert(Error::WriterClosed);
        if st.link != Link::Replaying {
            st.transport = None;
            st.link = Link::Down;
        }
        drop(st);
        self.waiters.wake_all();
        Ok(())
    }

    /// Closes the writer at once with `err`, dropping the transport even mid-replay.
    pub(crate) fn fail(&self, err: Error) {
        let mut st = self.lock();
        st.closed.get_or_insert(err);
        st.transport = None;
        st.link = Link::Down;
        drop(st);
        self.waiters.wake_all();
    }

    /// Drops the current transport; writes wait for the next `reconnect`.
    pub(crate) fn detach(&self) {
        let mut st = self.lock();
        st.transport = None;
        st.link = Link::Down;
        drop(st);
        self.waiters.wake_all();
    }

    /// Commits a prefix of `buf` and returns its length and the stream's end offset after it.
    ///
    /// Takes part in tokio's cooperative budget, as tokio's own sockets do: a task writing to
    /// a pipe that always has room still yields now and then.
    fn poll_commit(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<Result<(usize, u64)>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let committed = self.poll_commit_inner(cx, buf);
        if committed.is_ready() {
            coop.made_progress();
        }
        committed
    }

    fn poll_commit_inner(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<Result<(usize, u64)>> {
        let mut st = self.lock();
        if let Some(err) = &st.closed {
            return Poll::Ready(Err(err.clone()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok((0, st.ring.end_seq())));
        }
        let mut tcx = self.waiters.context(cx, &self.fanout);
        // While up, everything committed has been handed over, so the chunk below is the only
        // unsent data and the ring can never evict a byte the peer has not been sent.
        let room = st.ring.capacity();
        let chunk = &buf[..buf.len().min(room)];
        let (Link::Up, Some(transport)) = (st.link, st.transport.as_mut()) else {
            return Poll::Pending;
        };
        let outcome = ready!(budget::poll_transport(&mut tcx, |tcx| {
            Pin::new(transport).poll_write(tcx, chunk)
        }));
        let n = match outcome {
            Ok(n) if n > 0 => {
                st.sent_seq += n as u64;
                n
            }
            failed => {
                // The bytes are committed anyway: the replay after the reconnect delivers them.
                let err = failed.err().unwrap_or_else(short_write);
                st.commit(chunk);
                self.transport_failed(&mut st, err);
                return Poll::Ready(Ok((chunk.len(), st.ring.end_seq())));
            }
        };
        st.commit(&chunk[..n]);
        Poll::Ready(Ok((n, st.ring.end_seq())))
    }

    /// Ready once the bytes up to `end` have been handed to a live transport.
    fn poll_sent(&self, cx: &mut Context<'_>, end: u64) -> Poll<Result<()>> {
        let st = self.lock();
        if let Some(err) = &st.closed {
            return Poll::Ready(Err(err.clone()));
        }
        if st.link == Link::Up && st.sent_seq >= end {
            return Poll::Ready(Ok(()));
        }
        self.waiters.register(cx.waker());
        Poll::Pending
    }

    /// Replays up to [`REPLAY_SLICE`] bytes: `Ready(None)` if more remain, otherwise the
    /// outcome of the whole replay.
    fn poll_replay(&self, cx: &mut Context<'_>, replay_from: u64) -> Poll<Option<Result<()>>> {
        let mut st = self.lock();
        if st.link != Link::Replaying {
            // Only `fail` (the pipe closing) takes a transport away mid-replay.
            return Poll::Ready(Some(Err(st.closed.clone().unwrap_or(Error::WriterClosed))));
        }
        let outcome = match ready!(self.poll_drain(&mut st, cx, REPLAY_SLICE)) {
            Ok(false) => return Poll::Ready(None),
            Ok(true) => Ok(()),
            Err(err) => Err(err),
        };
        let result = match outcome {
            Ok(()) if st.closed.is_some() => {
                st.transport = None;
                st.link = Link::Down;
                Ok(())
            }
            Ok(()) => {
                st.link = Link::Up;
                Ok(())
            }
            Err(err) => {
                st.transport = None;
                st.link = Link::Down;
                if err.kind() == io::ErrorKind::WriteZero {
                    Err(Error::PartialReplay {
                        written: st.sent_seq - replay_from,
                        expected: st.ring.end_seq() - replay_from,
                    })
                } else {
                    Err(Error::ReplayFailed(Arc::new(err)))
                }
            }
        };
        drop(st);
        self.waiters.wake_all();
        Poll::Ready(Some(result))
    }

    /// Writes the committed bytes the transport has not had yet, straight from the ring, at
    /// most `limit` of them: `Ready(Ok(true))` once all are written, `Ready(Ok(false))` when
    /// the limit stopped it first.
    fn poll_drain(
        &self,
        st: &mut WriterState<W>,
        cx: &mut Context<'_>,
        limit: usize,
    ) -> Poll<io::Result<bool>> {
        let mut tcx = self.waiters.context(cx, &self.fanout);
        let mut left = limit;
        while st.sent_seq < st.ring.end_seq() {
            if left == 0 {
                return Poll::Ready(Ok(false));
            }
            let WriterState {
                ring,
                transport,
                sent_seq,
                ..
            } = st;
            let Some(transport) = transport.as_mut() else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let (first, second) = match ring.slices_from(*sent_seq) {
                Ok(slices) => slices,
                Err(err) => return Poll::Ready(Err(io::Error::other(err))),
            };
            let chunk = if first.is_empty() { second } else { first };
            let chunk = &chunk[..chunk.len().min(left)];
            match ready!(Pin::new(transport).poll_write(&mut tcx, chunk)) {
                Ok(0) => return Poll::Ready(Err(short_write())),
                Ok(n) => {
                    *sent_seq += n as u64;
                    left -= n.min(left);
                }
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        Poll::Ready(Ok(true))
    }

    fn transport_failed(&self, st: &mut WriterState<W>, err: io::Error) {
        tracing::debug!(generation = st.generation, error = %err, "writer transport failed");
        st.transport = None;
        st.link = Link::Down;
        // The receiver may be gone (a standalone writer whose owner stopped listening); the
        // writer is disconnected either way.
        let _ = self.events.send(ErrorEvent {
            err,
            component: Component::Writer,
            generation: st.generation,
        });
        self.waiters.wake_all();
    }

    fn lock(&self) -> MutexGuard<'_, WriterState<W>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<W> WriterState<W> {
    /// Adds bytes to the replay buffer, evicting the oldest beyond the capacity (as Go's ring).
    fn commit(&mut self, bytes: &[u8]) {
        self.ring.write(bytes);
    }
}

/// The most a replay writes in one go before it yields to the other tasks of its thread. A
/// replay can be as large as the buffer's capacity (on loopback several MiB are typically
/// unacknowledged, about 130 us of writing per MiB); written in one poll it would hold its
/// worker thread that long, and the runtime would deliver no I/O event on that thread
/// meanwhile.
const REPLAY_SLICE: usize = 256 * 1024;

fn short_write() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "short write")
}

/// Leaves the writer disconnected if a replay is abandoned (its future dropped).
struct ReplayGuard<'a, W: AsyncWrite + Unpin> {
    writer: &'a BackedWriter<W>,
    armed: bool,
}

impl<W: AsyncWrite + Unpin> Drop for ReplayGuard<'_, W> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.writer.lock();
            if st.link == Link::Replaying {
                st.transport = None;
                st.link = Link::Down;
            }
            drop(st);
            self.writer.waiters.wake_all();
        }
    }
}
