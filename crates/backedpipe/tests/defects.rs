//! The Go package's known defects (seed-behaviour §3, prior-art "Go behaviour seen"), each fixed,
//! each with a test that fails on the Go behaviour. Also the bad inputs that must give a typed
//! error rather than a panic or a hang.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backedpipe::{BackedPipe, BackedWriter, Component, Error, PipeConfig, PipeState};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};

/// Far longer than anything here should take; with paused time the clock jumps to it only when
/// every task is stuck, so hitting it means "hangs".
const FOREVER: Duration = Duration::from_secs(24 * 3600);

fn pipe_with(rc: &MockReconnector, config: PipeConfig) -> Arc<BackedPipe<KillableConn>> {
    Arc::new(BackedPipe::with_config(rc.clone(), config.backoff_seed(1)).unwrap())
}

/// Spawns a read of up to `n` bytes on the pipe.
fn spawn_read(
    pipe: &Arc<BackedPipe<KillableConn>>,
    n: usize,
) -> tokio::task::JoinHandle<Result<Vec<u8>, Error>> {
    let pipe = pipe.clone();
    tokio::spawn(async move {
        let mut buf = vec![0; n];
        let got = pipe.read(&mut buf).await?;
        buf.truncate(got);
        Ok(buf)
    })
}

/// Go: `Close()` takes the pipe lock that the reconnect holds across `Reconnector.Reconnect`, so
/// it hangs while a reconnect is blocked. Here close cancels the reconnect and returns.
#[tokio::test(start_paused = true)]
async fn close_returns_while_the_reconnector_is_blocked() {
    let (rc, mut dialled) = MockReconnector::new();
    rc.then(Answer::Connect(0)).then(Answer::Hang);
    let pipe = pipe_with(&rc, PipeConfig::default());
    pipe.connect().await.unwrap();
    let first = dialled.recv().await.unwrap();
    let read = spawn_read(&pipe, 8);
    first.killer.kill();
    rc.wait_calls(2).await;
    assert!(matches!(pipe.state(), PipeState::Reconnecting));

    timeout(FOREVER, pipe.close())
        .await
        .expect("close hung")
        .unwrap();
    assert_eq!(
        read.await.unwrap().unwrap(),
        b"",
        "the blocked read ends with end-of-stream"
    );
    assert!(matches!(pipe.state(), PipeState::Closed));
}

/// Go: one reconnect attempt per failure; if it fails the pipe stays disconnected and reads and
/// writes block forever. Here it retries with backoff until a connection works.
#[tokio::test(start_paused = true)]
async fn failed_reconnects_are_retried_with_backoff() {
    let (rc, mut dialled) = MockReconnector::new();
    rc.then(Answer::Connect(0))
        .then(Answer::Fail("refused"))
        .then(Answer::Fail("refused"))
        .then(Answer::Fail("refused"))
        .then(Answer::Connect(0));
    let config = PipeConfig::default().backoff(Duration::from_millis(100), Duration::from_secs(5));
    let pipe = pipe_with(&rc, config);
    pipe.connect().await.unwrap();
    let first = dialled.recv().await.unwrap();
    let read = spawn_read(&pipe, 4);
    let lost_at = Instant::now();
    first.killer.kill();

    let mut second = timeout(FOREVER, dialled.recv())
        .await
        .expect("never reconnected")
        .unwrap();
    // Three failures, so three full-jitter delays with ceilings 100, 200 and 400 ms.
    assert!(
        lost_at.elapsed() <= Duration::from_millis(700),
        "{:?}",
        lost_at.elapsed()
    );
    assert_eq!(rc.calls(), 5);
    second.peer.write_all(b"back").await.unwrap();
    assert_eq!(read.await.unwrap().unwrap(), b"back");
    assert!(pipe.connected());
    pipe.close().await.unwrap();
}

/// A bounded retry budget ends in a terminal failure that blocked I/O sees, not in a hang.
#[tokio::test(start_paused = true)]
async fn an_exhausted_retry_budget_fails_blocked_io() {
    let (rc, mut dialled) = MockReconnector::new();
    rc.then(Answer::Connect(0));
    rc.otherwise(None);
    let pipe = pipe_with(&rc, PipeConfig::default().max_reconnect_attempts(Some(3)));
    pipe.connect().await.unwrap();
    let first = dialled.recv().await.unwrap();
    let read = spawn_read(&pipe, 4);
    first.killer.kill();
    let err = timeout(FOREVER, read)
        .await
        .expect("read hung")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::ReconnectFailed(_)), "{err}");
    assert_eq!(rc.calls(), 1 + 3);
    assert!(matches!(
        pipe.write(b"x").await,
        Err(Error::ReconnectFailed(_))
    ));
}

/// Go: when the peer asks for bytes the ring no longer holds, every reconnect fails the same way
/// and blocked reads and writes are never released. Here the pipe fails for good and they get
/// the typed error.
#[tokio::test(start_paused = true)]
async fn impossible_replay_fails_blocked_reads_and_writes() {
    let (rc, mut dialled) = MockReconnector::new();
    rc.then(Answer::Connect(0)).then(Answer::Connect(0));
    let pipe = pipe_with(&rc, PipeConfig::default().buffer_capacity(10));
    pipe.connect().await.unwrap();
    let mut first = dialled.recv().await.unwrap();
    pipe.write(b"0123456789abcdef").await.unwrap();
    let mut sink = [0; 16];
    first.peer.read_exact(&mut sink).await.unwrap();

    let read = spawn_read(&pipe, 4);
    first.killer.kill();
    // The peer claims to have read nothing; only the last 10 of 16 bytes are held.
    let err = timeout(FOREVER, read)
        .await
        .expect("read hung")
        .unwrap()
        .unwrap_err();
    let Error::ReconnectWriterFailed(inner) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            **inner,
            Error::ReplayDataUnavailable {
                requested: 0,
                oldest: 6
            }
        ),
        "{inner}"
    );
    assert!(err.is_terminal());
    assert!(matches!(
        pipe.write(b"more").await,
        Err(Error::ReconnectWriterFailed(_))
    ));
    assert!(matches!(pipe.state(), PipeState::Failed(_)));
    assert!(matches!(
        pipe.connect().await,
        Err(Error::ReconnectWriterFailed(_))
    ));
}

/// A peer claiming to have read more than was ever written is hostile input: a typed error
/// before the buffer is touched, and the pipe fails rather than inventing a resume point.
#[tokio::test(start_paused = true)]
async fn a_peer_sequence_from_the_future_fails_the_pipe() {
    let (rc, _dialled) = MockReconnector::new();
    rc.then(Answer::Connect(100));
    let pipe = pipe_with(&rc, PipeConfig::default());
    let err = pipe.connect().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidSequenceNumber {
                remote: 100,
                local: 0
            }
        ),
        "{err}"
    );
    let mut buf = [0; 4];
    assert!(matches!(
        pipe.read(&mut buf).await,
        Err(Error::InvalidSequenceNumber { .. })
    ));
    assert!(matches!(
        pipe.write(b"x").await,
        Err(Error::InvalidSequenceNumber { .. })
    ));
}

/// Go allocates 64 MiB per pipe up front. Here an idle pipe commits nothing, memory grows with
/// the bytes written, and the capacity is a setting.
#[tokio::test]
async fn memory_is_committed_only_as_bytes_are_written() {
    let (rc, mut dialled) = MockReconnector::new();
    let pipe = pipe_with(&rc, PipeConfig::default());
    pipe.connect().await.unwrap();
    assert_eq!(
        pipe.buffered(),
        (0, 0),
        "an idle connected pipe commits no buffer"
    );
    let mut conn = dialled.recv().await.unwrap();
    pipe.write(b"0123456789").await.unwrap();
    let (held, committed) = pipe.buffered();
    assert_eq!(held, 10);
    assert!(
        committed <= 8 * 1024,
        "{committed} bytes committed for 10 written"
    );
    let mut sink = [0; 10];
    conn.peer.read_exact(&mut sink).await.unwrap();

    let (rc, mut dialled) = MockReconnector::new();
    let small = pipe_with(&rc, PipeConfig::default().buffer_capacity(1 << 16));
    small.connect().await.unwrap();
    let mut conn = dialled.recv().await.unwrap();
    let drain = tokio::spawn(async move {
        let mut sink = vec![0; 1 << 18];
        conn.peer.read_exact(&mut sink).await.map(|_| conn)
    });
    small.write(&vec![7; 1 << 18]).await.unwrap();
    let _conn = drain.await.unwrap().unwrap();
    assert_eq!(
        small.buffered(),
        (1 << 16, 1 << 16),
        "held and committed stop at the capacity"
    );
}

/// An allocator that records the largest allocation made while armed.
struct Watching;

thread_local! {
    /// Armed on the test's own thread only: other tests of this binary run on other threads
    /// at the same time, and their allocations are not the replay's.
    static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only records
// sizes in an atomic, reading a const-initialised thread-local flag (which never allocates).
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(std::cell::Cell::get) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.with(std::cell::Cell::get) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// A transport that counts what it is given and keeps nothing.
#[derive(Default)]
struct CountingSink(usize);

impl AsyncWrite for CountingSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0 += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Go's replay copies the whole tail into a fresh slice (`ReadLast`), up to 64 MiB. Here the
/// replay writes from the ring's own slices: replaying 1 MiB allocates nothing of that size.
#[tokio::test(flavor = "current_thread")]
async fn replay_writes_from_the_buffer_without_copying_the_tail() {
    let (events, _failures) = events();
    let writer = BackedWriter::new(4 << 20, events).unwrap();
    writer.reconnect(0, CountingSink::default()).await.unwrap();
    writer.write(&vec![1; 1 << 20]).await.unwrap();
    writer.write(&vec![2; 1 << 20]).await.unwrap();

    LARGEST.store(0, Ordering::Relaxed);
    ARMED.with(|armed| armed.set(true));
    let replay = writer.reconnect(1 << 20, CountingSink::default()).await;
    ARMED.with(|armed| armed.set(false));
    replay.unwrap();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 64 * 1024,
        "the replay allocated {largest} bytes at once"
    );
    assert_eq!(writer.sequence_num(), 2 << 20);
}

/// Go (branch reader): a late read from the old connection after the offset was published
/// raises the count and the peer sends those bytes twice. Here detaching captures the offset and
/// drops the old source at once: bytes still arriving on it are never delivered or counted.
#[tokio::test(start_paused = true)]
async fn late_bytes_on_the_old_connection_are_neither_counted_nor_delivered() {
    let pipe = Arc::new(BackedPipe::<KillableConn>::passive(PipeConfig::default()).unwrap());
    let (conn, mut old_peer, _) = killable(1024);
    pipe.accept_reconnection(0, conn).await.unwrap();
    old_peer.write_all(b"ab").await.unwrap();
    let mut buf = [0; 2];
    assert_eq!(pipe.read(&mut buf).await.unwrap(), 2);

    let offset = pipe.detach().await.unwrap();
    assert_eq!(offset, 2);
    // The old peer keeps sending after the offset was taken: those bytes must vanish.
    let _ = old_peer.write_all(b"LATE").await;
    let read = spawn_read(&pipe, 8);
    let (conn, mut new_peer, _) = killable(1024);
    pipe.accept_reconnection(0, conn).await.unwrap();
    new_peer.write_all(b"cd").await.unwrap();
    assert_eq!(read.await.unwrap().unwrap(), b"cd");
    assert_eq!(pipe.reader_sequence_num(), 4);
}

/// Go: the error channel has capacity 1 and sends without blocking, so a stale event can make the
/// current generation's failure vanish. Here each failure is kept: a writer that fails in many
/// generations in a row, with nobody draining the channel, still reports every one, the last
/// with the current generation.
#[tokio::test(flavor = "current_thread")]
async fn the_current_generations_failure_is_never_dropped() {
    let (events, mut failures) = events();
    let writer = BackedWriter::new(1024, events).unwrap();
    for generation in 1..=50 {
        writer.set_generation(generation);
        writer
            .reconnect(writer.sequence_num(), MockWriter::failing("gone"))
            .await
            .unwrap();
        writer.poll_commit_once(b"x").await;
    }
    let mut seen = Vec::new();
    while let Ok(event) = failures.try_recv() {
        assert_eq!(event.component, Component::Writer);
        seen.push(event.generation);
    }
    assert_eq!(seen, (1..=50).collect::<Vec<_>>());
}

/// Writes one committed chunk through `poll_write` (which returns once the bytes are committed,
/// even if the transport failed taking them).
trait CommitOnce {
    async fn poll_commit_once(&self, buf: &[u8]);
}

impl<W: AsyncWrite + Unpin> CommitOnce for BackedWriter<W> {
    async fn poll_commit_once(&self, buf: &[u8]) {
        std::future::poll_fn(|cx| self.poll_write(cx, buf))
            .await
            .unwrap();
    }
}

/// Go holds the reader's lock across the source read, so `Connected()` and the sequence numbers
/// wait for the next inbound byte. Here they answer while a read is in flight.
#[tokio::test(start_paused = true)]
async fn status_queries_answer_while_a_read_is_in_flight() {
    let (rc, mut dialled) = MockReconnector::new();
    let pipe = pipe_with(&rc, PipeConfig::default());
    pipe.connect().await.unwrap();
    let mut conn = dialled.recv().await.unwrap();
    let read = spawn_read(&pipe, 4);
    // On this single-threaded runtime one yield lets the spawned read run until it parks on
    // the transport.
    tokio::task::yield_now().await;
    assert!(!read.is_finished());
    assert!(pipe.connected());
    assert_eq!(pipe.reader_sequence_num(), 0);
    assert_eq!(pipe.writer_sequence_num(), 0);
    assert!(matches!(pipe.state(), PipeState::Connected));
    conn.peer.write_all(b"done").await.unwrap();
    assert_eq!(read.await.unwrap().unwrap(), b"done");
}

/// Bad input gets a typed error, never a panic: a zero capacity, a pipe made outside a runtime,
/// a reconnect on a closed pipe, a reconnector that fails.
#[test]
fn bad_input_gets_typed_errors() {
    let (events, _failures) = events();
    assert!(matches!(
        BackedWriter::<MockWriter>::new(0, events),
        Err(Error::InvalidCapacity)
    ));
    let (rc, _dialled) = MockReconnector::new();
    assert!(matches!(BackedPipe::new(rc.clone()), Err(Error::NoRuntime)));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let zero = BackedPipe::with_config(rc.clone(), PipeConfig::default().buffer_capacity(0));
        assert!(matches!(zero, Err(Error::InvalidCapacity)));

        rc.then(Answer::Fail("dial refused"));
        let pipe = BackedPipe::new(rc.clone()).unwrap();
        let err = pipe.connect().await.unwrap_err();
        assert!(matches!(err, Error::ReconnectFailed(_)));
        assert!(std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("dial refused"));
        assert!(!pipe.connected());

        pipe.close().await.unwrap();
        assert!(matches!(
            pipe.force_reconnect().await,
            Err(Error::PipeClosed)
        ));
        assert!(matches!(pipe.connect().await, Err(Error::PipeClosed)));
        assert!(matches!(pipe.detach().await, Err(Error::PipeClosed)));
        let (conn, _peer, _) = killable(16);
        assert!(matches!(
            pipe.accept_reconnection(0, conn).await,
            Err(Error::PipeClosed)
        ));
    });
}
