//! `BackedReader`: the receiving half of a pipe. It counts every byte delivered to the caller
//! (the offset the peer must resume from) and, when its transport fails or ends, waits for the
//! next one instead of surfacing the failure.
//!
//! It owns the read transport and the read sequence number; it does not choose when to
//! reconnect and never writes to the network.
//!
//! Detaching captures the sequence number and drops the old transport under one lock, so a late
//! read or error from an old connection can neither add bytes after the offset was published
//! nor disturb the new connection.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::budget;
use crate::error::{Error, Result};
use crate::event::{Component, ErrorEvent, EventSender};
use crate::wake::WaitList;

/// A reader that survives the loss of its transport.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use backedpipe::BackedReader;
/// use tokio::io::AsyncWriteExt;
/// use tokio::sync::oneshot;
///
/// let (events, _failures) = tokio::sync::mpsc::unbounded_channel();
/// let reader = BackedReader::new(events);
/// let (seq_tx, seq_rx) = oneshot::channel();
/// let (source_tx, source_rx) = oneshot::channel();
/// let (source, mut peer) = tokio::io::duplex(64);
/// let reconnect = reader.reconnect(seq_tx, source_rx);
/// let handshake = async {
///     assert_eq!(seq_rx.await.unwrap(), 0); // phase one: the reader publishes its offset
///     source_tx.send(source).unwrap(); // phase two: it receives the new source
/// };
/// tokio::join!(reconnect, handshake);
/// peer.write_all(b"hello").await.unwrap();
/// let mut buf = [0; 5];
/// assert_eq!(reader.read(&mut buf).await.unwrap(), 5);
/// assert_eq!(reader.sequence_num(), 5);
/// # }
/// ```
#[derive(Debug)]
pub struct BackedReader<R> {
    state: Mutex<ReaderState<R>>,
    waiters: Arc<WaitList>,
    fanout: Waker,
    events: EventSender,
    closed: CancellationToken,
}

#[derive(Debug)]
struct ReaderState<R> {
    source: Option<R>,
    /// Bytes delivered to the caller.
    seq: u64,
    generation: u64,
    end: End,
}

#[derive(Debug)]
enum End {
    Open,
    /// Closed locally: reads return end-of-stream.
    Closed,
    /// Failed for good: reads return the error.
    Failed(Error),
}

impl<R: AsyncRead + Unpin> BackedReader<R> {
    /// Creates a disconnected reader; transport failures are reported on `events`.
    pub fn new(events: EventSender) -> Self {
        let (waiters, fanout) = WaitList::new();
        BackedReader {
            state: Mutex::new(ReaderState {
                source: None,
                seq: 0,
                generation: 0,
                end: End::Open,
            }),
            waiters,
            fanout,
            events,
            closed: CancellationToken::new(),
        }
    }

    /// The number of bytes delivered to the caller.
    pub fn sequence_num(&self) -> u64 {
        self.lock().seq
    }

    /// True while a source is attached and the reader is open.
    pub fn connected(&self) -> bool {
        let st = self.lock();
        matches!(st.end, End::Open) && st.source.is_some()
    }

    /// Sets the connection generation carried by this reader's [`ErrorEvent`]s.
    pub fn set_generation(&self, generation: u64) {
        self.lock().generation = generation;
    }

    /// Reads into `buf`, waiting while disconnected. A failure or end-of-stream of the source is
    /// reported as an [`ErrorEvent`] and the read keeps waiting for the next source. Returns
    /// `Ok(0)` once the reader is closed (or `buf` is empty).
    ///
    /// # Errors
    /// Only the error the reader failed with for good (see [`BackedPipe`](crate::BackedPipe)).
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize> {
        let mut buf = ReadBuf::new(buf);
        poll_fn(|cx| self.poll_read(cx, &mut buf)).await?;
        Ok(buf.filled().len())
    }

    /// The `AsyncRead` form of [`read`](Self::read). Takes part in tokio's cooperative
    /// budget, as tokio's own sockets do: a task reading a pipe that always has data still
    /// yields now and then.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<Result<()>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let read = self.poll_read_inner(cx, buf);
        if read.is_ready() {
            coop.made_progress();
        }
        read
    }

    fn poll_read_inner(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<Result<()>> {
        let mut st = self.lock();
        match &st.end {
            End::Open => {}
            End::Closed => return Poll::Ready(Ok(())),
            End::Failed(err) => return Poll::Ready(Err(err.clone())),
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut tcx = self.waiters.context(cx, &self.fanout);
        let Some(source) = st.source.as_mut() else {
            return Poll::Pending;
        };
        let before = buf.filled().len();
        match budget::poll_transport(&mut tcx, |tcx| Pin::new(source).poll_read(tcx, buf)) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                st.seq += (buf.filled().len() - before) as u64;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(outcome) => {
                let err = outcome
                    .err()
                    .unwrap_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF"));
                self.source_failed(&mut st, err);
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The Go two-phase reconnect: detaches the current source, sends the sequence number on
    /// `seq_tx`, then waits for the new source on `new_source` and attaches it.
    ///
    /// On a closed reader `seq_tx` is dropped without a value and nothing is awaited. If the
    /// reader is closed while waiting, or `new_source` is dropped, the reader stays detached.
    pub async fn reconnect(&self, seq_tx: oneshot::Sender<u64>, new_source: oneshot::Receiver<R>) {
        let Some(seq) = self.detach() else {
            return;
        };
        if seq_tx.send(seq).is_err() {
            return;
        }
        let source = tokio::select! {
            source = new_source => source,
            () = self.closed.cancelled() => return,
        };
        if let Ok(source) = source {
            self.attach(source);
        }
    }

    /// Closes the reader: reads return end-of-stream (`Ok(0)`), blocked reads wake, and the
    /// source is dropped. Idempotent; never blocks, even while a read waits inside the source.
    pub fn close(&self) -> Result<()> {
        self.end(End::Closed);
        Ok(())
    }

    /// Fails the reader for good: reads return `err`.
    pub(crate) fn fail(&self, err: Error) {
        self.end(End::Failed(err));
    }

    /// Drops the current source and returns the sequence number at that instant; `None` if the
    /// reader is closed.
    pub(crate) fn detach(&self) -> Option<u64> {
        let mut st = self.lock();
        st.source = None;
        let seq = matches!(st.end, End::Open).then_some(st.seq);
        drop(st);
        self.waiters.wake_all();
        seq
    }

    /// Attaches a new source; ignored if the reader is closed.
    pub(crate) fn attach(&self, source: R) {
        let mut st = self.lock();
        if matches!(st.end, End::Open) {
            st.source = Some(source);
        }
        drop(st);
        self.waiters.wake_all();
    }

    fn end(&self, end: End) {
        let mut st = self.lock();
        if matches!(st.end, End::Open) {
            st.end = end;
        }
        st.source = None;
        drop(st);
        self.closed.cancel();
        self.waiters.wake_all();
    }

    fn source_failed(&self, st: &mut ReaderState<R>, err: io::Error) {
        tracing::debug!(generation = st.generation, error = %err, "reader transport failed");
        st.source = None;
        // A standalone reader's owner may have stopped listening; the reader is disconnected
        // either way.
        let _ = self.events.send(ErrorEvent {
            err,
            component: Component::Reader,
            generation: st.generation,
        });
    }

    fn lock(&self) -> MutexGuard<'_, ReaderState<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
