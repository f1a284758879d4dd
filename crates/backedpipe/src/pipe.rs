//! `BackedPipe`: a bidirectional byte stream that reconnects by itself and replays what the peer
//! missed. It joins a [`BackedReader`] and a [`BackedWriter`] over one connection and hands
//! connection management to a background [`Supervisor`](crate::supervisor) task.
//!
//! This module owns the public handle, the shared state and the state transitions visible to
//! users; the supervisor owns the order in which reconnects happen.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{random_seed, Backoff};
use crate::config::PipeConfig;
use crate::error::{Error, Result};
use crate::reader::BackedReader;
use crate::reconnector::Reconnector;
use crate::supervisor::{NoReconnector, Request, Supervisor};
use crate::transport::Io;
use crate::writer::BackedWriter;

/// Where a pipe stands, as seen by [`BackedPipe::state`] and [`BackedPipe::status`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PipeState {
    /// No connection. Reads and writes wait.
    Disconnected,
    /// A reconnect is running (dialling, or replaying to the new connection).
    Reconnecting,
    /// Connected: reads and writes flow.
    Connected,
    /// Closed locally.
    Closed,
    /// Failed for good (the stream cannot continue without loss); reads and writes return the
    /// error.
    Failed(Error),
}

impl PipeState {
    /// True for [`Closed`](Self::Closed) and [`Failed`](Self::Failed): nothing will change again.
    pub fn is_final(&self) -> bool {
        matches!(self, PipeState::Closed | PipeState::Failed(_))
    }
}

/// A reliable bidirectional byte stream over unreliable connections.
///
/// Every byte written is delivered to the peer's pipe exactly once and in order, across any
/// number of reconnects. The pipe starts disconnected; [`connect`](Self::connect) asks the
/// [`Reconnector`] for a first connection, and after that every transport failure is followed by
/// an automatic reconnect (retried with backoff) and a replay of what the peer missed. A server
/// side without a reconnector ([`passive`](Self::passive)) is attached with
/// [`accept_reconnection`](Self::accept_reconnection).
///
/// The pipe implements [`AsyncRead`] and [`AsyncWrite`], can be [split](Self::into_split) into
/// owned halves, and also offers `&self` [`read`](Self::read) and [`write`](Self::write) for
/// concurrent callers. It must be created inside a tokio runtime. Dropping the last handle (the
/// pipe or its halves) closes it.
///
/// This is the raw mode of the Go package: bytes travel as written and the replay buffer evicts
/// by size, so a peer more than [`buffer_capacity`](PipeConfig::buffer_capacity) bytes behind
/// cannot resume, and the pipe then fails with
/// [`ReplayDataUnavailable`](Error::ReplayDataUnavailable) instead of hanging.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use backedpipe::{reconnector_fn, BackedPipe, BoxError};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// // A loopback "network": each reconnect gets a fresh in-memory link whose far end echoes.
/// let pipe = BackedPipe::new(reconnector_fn(|_reader_seq| async {
///     let (ours, theirs) = tokio::io::duplex(1024);
///     tokio::spawn(async move {
///         let (mut r, mut w) = tokio::io::split(theirs);
///         let _ = tokio::io::copy(&mut r, &mut w).await;
///     });
///     Ok::<_, BoxError>((ours, 0))
/// }))?;
/// pipe.connect().await?;
/// let (mut reader, mut writer) = pipe.into_split();
/// writer.write_all(b"ping").await?;
/// let mut buf = [0; 4];
/// reader.read_exact(&mut buf).await?;
/// assert_eq!(&buf, b"ping");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BackedPipe<C: Io> {
    handle: Arc<Handle<C>>,
}

/// The read half of a [`BackedPipe`], from [`BackedPipe::into_split`].
#[derive(Debug)]
pub struct OwnedReadHalf<C: Io> {
    handle: Arc<Handle<C>>,
}

/// The write half of a [`BackedPipe`], from [`BackedPipe::into_split`].
#[derive(Debug)]
pub struct OwnedWriteHalf<C: Io> {
    handle: Arc<Handle<C>>,
}

/// Closes the pipe when the last user handle goes away.
#[derive(Debug)]
struct Handle<C: Io> {
    shared: Arc<Shared<C>>,
}

impl<C: Io> Drop for Handle<C> {
    fn drop(&mut self) {
        self.shared.close_now();
    }
}

/// State shared by the user handles and the supervisor task.
#[derive(Debug)]
pub(crate) struct Shared<C: Io> {
    pub(crate) reader: BackedReader<ReadHalf<C>>,
    pub(crate) writer: BackedWriter<WriteHalf<C>>,
    generation: AtomicU64,
    status: watch::Sender<PipeState>,
    requests: mpsc::UnboundedSender<Request<C>>,
    pub(crate) closed: CancellationToken,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl<C: Io> BackedPipe<C> {
    /// Creates a disconnected pipe with default settings that gets its connections from
    /// `reconnector`.
    ///
    /// # Errors
    /// [`Error::NoRuntime`] outside a tokio runtime.
    pub fn new<R: Reconnector<Conn = C>>(reconnector: R) -> Result<Self> {
        Self::with_config(reconnector, PipeConfig::default())
    }

    /// Creates a disconnected pipe with the given settings.
    ///
    /// # Errors
    /// [`Error::InvalidCapacity`] for a zero buffer capacity; [`Error::NoRuntime`] outside a
    /// tokio runtime.
    pub fn with_config<R: Reconnector<Conn = C>>(
        reconnector: R,
        config: PipeConfig,
    ) -> Result<Self> {
        Self::build(Some(reconnector), config)
    }

    /// Creates a pipe with no reconnector, for the side that accepts connections: it is
    /// attached only by [`accept_reconnection`](Self::accept_reconnection), and a transport
    /// failure just leaves it disconnected until the next one. [`connect`](Self::connect) and
    /// [`force_reconnect`](Self::force_reconnect) fail with [`Error::ReconnectFailed`].
    ///
    /// # Errors
    /// As for [`with_config`](Self::with_config).
    pub fn passive(config: PipeConfig) -> Result<Self> {
        Self::build(None::<NoReconnector<C>>, config)
    }

    fn build<R: Reconnector<Conn = C>>(reconnector: Option<R>, config: PipeConfig) -> Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let (request_tx, request_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            writer: BackedWriter::new(config.buffer_capacity, event_tx.clone())?,
            reader: BackedReader::new(event_tx.clone()),
            generation: AtomicU64::new(0),
            status: watch::Sender::new(PipeState::Disconnected),
            requests: request_tx,
            closed: CancellationToken::new(),
            supervisor: Mutex::new(None),
        });
        let backoff = Backoff::new(
            config.backoff_initial,
            config.backoff_max,
            config.backoff_seed.unwrap_or_else(random_seed),
        );
        let supervisor = Supervisor::new(
            shared.clone(),
            reconnector,
            request_rx,
            event_rx,
            backoff,
            config.max_reconnect_attempts,
        );
        // A per-pipe id in every log line of the pipe, so the lines of one pipe can be matched.
        let span = tracing::debug_span!("pipe", id = %format_args!("{:08x}", random_seed() as u32));
        let task = runtime.spawn(supervisor.run().instrument(span));
        *shared
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(BackedPipe {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Shared<C> {
        &self.handle.shared
    }

    /// Establishes the first connection through the reconnector (one call).
    ///
    /// # Errors
    /// [`Error::PipeAlreadyConnected`] if connected, [`Error::ReconnectionInProgress`] while a
    /// reconnect runs, [`Error::PipeClosed`] after close, [`Error::ReconnectFailed`] if the
    /// reconnector failed (the pipe stays disconnected and does not retry until it has been
    /// connected once), or a replay error.
    pub async fn connect(&self) -> Result<()> {
        self.shared()
            .request(|reply| Request::Connect { reply })
            .await
    }

    /// Replaces the connection now with a fresh one from the reconnector (or makes the first
    /// one). Concurrent calls, and calls made while a reconnect is running, share a single
    /// reconnector call and all get its result.
    ///
    /// The request is registered when this method is called, before the returned future is
    /// first polled.
    ///
    /// # Errors
    /// [`Error::PipeClosed`] after close (Go returns `io.EOF`); otherwise as for
    /// [`connect`](Self::connect). After a failure on a pipe that was connected before, the
    /// pipe keeps retrying by itself.
    pub fn force_reconnect(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.shared()
            .request(|reply| Request::ForceReconnect { reply })
    }

    /// Attaches `conn`, a connection the peer opened, replacing any current one (the passive,
    /// server-side reconnect). `remote_reader_seq` is how many of our bytes the peer has read;
    /// the writer replays from there.
    ///
    /// # Errors
    /// [`Error::PipeClosed`] after close; [`Error::InvalidSequenceNumber`] if the peer claims
    /// more than was written, or [`Error::ReconnectWriterFailed`] if the replay is impossible
    /// (both fail the pipe) or failed (the pipe stays disconnected).
    pub fn accept_reconnection(
        &self,
        remote_reader_seq: u64,
        conn: C,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        self.shared().request(move |reply| Request::Accept {
            remote_seq: remote_reader_seq,
            conn,
            reply,
        })
    }

    /// Drops the current connection and returns the number of bytes read from the peer at that
    /// instant: the offset to send a peer that is about to resume, before handing its connection
    /// to [`accept_reconnection`](Self::accept_reconnection).
    ///
    /// Reading [`reader_sequence_num`](Self::reader_sequence_num) instead would race with bytes
    /// still arriving on the old connection (the Go handler's defect): they would be counted
    /// after the offset was sent, and the peer would send them twice.
    ///
    /// # Errors
    /// [`Error::PipeClosed`] after close, or the pipe's terminal error.
    pub async fn detach(&self) -> Result<u64> {
        self.shared()
            .request(|reply| Request::Detach { reply })
            .await
    }

    /// Closes the pipe and its connection, interrupting any reconnect in progress, and waits for
    /// the pipe's background task to end. Blocked and later reads return end-of-stream
    /// (`Ok(0)`); writes fail with [`Error::PipeClosed`]. Idempotent.
    pub async fn close(&self) -> Result<()> {
        self.shared().close().await
    }

    /// True while connected (answers at once, even while a read or write is in flight).
    pub fn connected(&self) -> bool {
        matches!(*self.shared().status.borrow(), PipeState::Connected)
    }

    /// The current state.
    pub fn state(&self) -> PipeState {
        self.shared().status.borrow().clone()
    }

    /// A receiver that sees every state transition (connected, disconnected, closed, ...).
    pub fn status(&self) -> watch::Receiver<PipeState> {
        self.shared().status.subscribe()
    }

    /// The number of bytes read from the peer (the offset the peer replays from).
    pub fn reader_sequence_num(&self) -> u64 {
        self.shared().reader.sequence_num()
    }

    /// The number of bytes written to the pipe.
    pub fn writer_sequence_num(&self) -> u64 {
        self.shared().writer.sequence_num()
    }

    /// The current connection generation: it increases with every (re)connect.
    pub fn generation(&self) -> u64 {
        self.shared().generation()
    }

    /// Bytes held for replay, and bytes of memory committed to hold them.
    pub fn buffered(&self) -> (usize, usize) {
        self.shared().writer.buffered()
    }

    /// Reads into `buf`, waiting while disconnected; `Ok(0)` after close or for an empty `buf`.
    ///
    /// # Errors
    /// The pipe's terminal error if it failed for good.
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize> {
        self.shared().reader.read(buf).await
    }

    /// Writes all of `buf`, returning once every byte has been handed to a live connection
    /// (directly or by replay after a reconnect). Waits while disconnected.
    ///
    /// # Errors
    /// [`Error::PipeClosed`] after close, or the pipe's terminal error.
    pub async fn write(&self, buf: &[u8]) -> Result<usize> {
        self.shared().writer.write(buf).await
    }

    /// Splits the pipe into halves that can move to different tasks. The pipe closes when both
    /// are dropped.
    pub fn into_split(self) -> (OwnedReadHalf<C>, OwnedWriteHalf<C>) {
        let read = OwnedReadHalf {
            handle: self.handle.clone(),
        };
        (
            read,
            OwnedWriteHalf {
                handle: self.handle,
            },
        )
    }
}

impl<C: Io> OwnedWriteHalf<C> {
    /// Closes the whole pipe, as [`BackedPipe::close`].
    pub async fn close(&self) -> Result<()> {
        self.handle.shared.close().await
    }
}

impl<C: Io> Shared<C> {
    /// Sends a request to the supervisor now and returns a future for its answer.
    fn request<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request<C>,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = !self.closed.is_cancelled() && self.requests.send(make(reply)).is_ok();
        async move {
            if !sent {
                return Err(Error::PipeClosed);
            }
            answer.await.unwrap_or(Err(Error::PipeClosed))
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn state(&self) -> PipeState {
        self.status.borrow().clone()
    }

    /// Publishes a state unless the pipe already reached a final one.
    pub(crate) fn set_state(&self, state: PipeState) {
        self.status.send_if_modified(|current| {
            if current.is_final() {
                return false;
            }
            let changed = std::mem::discriminant(current) != std::mem::discriminant(&state);
            *current = state;
            changed
        });
    }

    /// Drops the current connection and starts a new generation, returning the read offset at
    /// the moment the old connection was dropped.
    ///
    /// The old transport goes first: a failure it reports before that carries the old
    /// generation and is ignored, and afterwards it can report nothing. (Bumping first would
    /// let a late failure of the old transport pass for one of the new.)
    pub(crate) fn begin_generation(&self) -> Result<u64> {
        let reader_seq = self.reader.detach().ok_or(Error::PipeClosed)?;
        self.writer.detach();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.reader.set_generation(generation);
        self.writer.set_generation(generation);
        self.set_state(PipeState::Reconnecting);
        Ok(reader_seq)
    }

    /// Attaches a new connection: reads flow at once (so two sides replaying to each other
    /// cannot deadlock), then the writer replays from `remote_seq`.
    pub(crate) async fn attach(&self, conn: C, remote_seq: u64) -> Result<()> {
        let local = self.writer.sequence_num();
        if remote_seq > local {
            return Err(Error::InvalidSequenceNumber {
                remote: remote_seq,
                local,
            });
        }
        let (read, write) = tokio::io::split(conn);
        self.reader.attach(read);
        if let Err(err) = self.writer.reconnect(remote_seq, write).await {
            self.reader.detach();
            return Err(Error::ReconnectWriterFailed(Box::new(err)));
        }
        self.set_state(PipeState::Connected);
        Ok(())
    }

    /// Fails the pipe for good: every blocked and later read and write gets `err`.
    pub(crate) fn fail(&self, err: Error) {
        tracing::warn!(error = %err, "pipe failed for good");
        self.set_state(PipeState::Failed(err.clone()));
        self.reader.fail(err.clone());
        self.writer.fail(err);
    }

    /// Closes without waiting: usable from `Drop`.
    fn close_now(&self) {
        self.status.send_if_modified(|current| {
            let changed = !matches!(current, PipeState::Closed);
            *current = PipeState::Closed;
            changed
        });
        self.closed.cancel();
        let _ = self.reader.close();
        self.writer.fail(Error::PipeClosed);
    }

    async fn close(&self) -> Result<()> {
        self.close_now();
        let task = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // The supervisor only ends by seeing the cancellation; a panic in it has already
            // been reported by the runtime, and the pipe is closed either way.
            let _ = task.await;
        }
        Ok(())
    }
}

fn read_half_poll<C: Io>(
    shared: &Shared<C>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    shared.reader.poll_read(cx, buf).map_err(io::Error::from)
}

fn write_half_poll<C: Io>(
    shared: &Shared<C>,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    shared.writer.poll_write(cx, buf).map_err(io::Error::from)
}

fn flush_poll<C: Io>(shared: &Shared<C>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    shared.writer.poll_flush(cx).map_err(io::Error::from)
}

fn shutdown_poll<C: Io>(shared: &Shared<C>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    shared.writer.poll_shutdown(cx).map_err(io::Error::from)
}

/// Implements `AsyncRead` and `AsyncWrite` for a handle type by delegating to the shared pipe.
macro_rules! impl_io {
    (read: $($ty:ident),*) => {$(
        impl<C: Io> AsyncRead for $ty<C> {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                read_half_poll(&self.handle.shared, cx, buf)
            }
        }
    )*};
    (write: $($ty:ident),*) => {$(
        /// Writes complete once the bytes are committed to the stream (see
        /// [`BackedWriter::poll_write`]). Raw mode has no end-of-stream marker, so
        /// `poll_shutdown` only flushes there (the peer would take a transport shutdown for a
        /// drop); in session mode it sends FIN (see [`BackedWriter::poll_shutdown`]).
        impl<C: Io> AsyncWrite for $ty<C> {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                write_half_poll(&self.handle.shared, cx, buf)
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                flush_poll(&self.handle.shared, cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                shutdown_poll(&self.handle.shared, cx)
            }
        }
    )*};
}

impl_io!(read: BackedPipe, OwnedReadHalf);
impl_io!(write: BackedPipe, OwnedWriteHalf);
