//! Seed parity for the Go `BackedWriter` (`backed_writer_test.go`): checklist section 1.2 of
//! `seed-behaviour.md`, one test per W item plus the code-only lines.
//!
//! "Blocks" is proven without sleeps: under paused time, `timeout(1 hour, fut)` fires only once
//! the runtime has nothing else to do, so an elapsed timeout means the future cannot make
//! progress until the test acts. Where a transport must be caught mid-write, a [`Gate`] and
//! `Gate::reached` synchronise the test with it.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use backedpipe::{BackedWriter, Component, Error, ErrorEvent};
use common::*;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::timeout;

type Writer = Arc<BackedWriter<MockWriter>>;

/// A disconnected writer with a replay buffer of `capacity` bytes, and its error events.
fn writer(capacity: usize) -> (Writer, UnboundedReceiver<ErrorEvent>) {
    let (tx, rx) = events();
    (Arc::new(BackedWriter::new(capacity, tx).unwrap()), rx)
}

/// A writer already connected to `transport` (replaying nothing).
async fn connected_to(
    capacity: usize,
    transport: MockWriter,
) -> (Writer, UnboundedReceiver<ErrorEvent>) {
    let (w, rx) = writer(capacity);
    w.reconnect(0, transport).await.unwrap();
    assert!(w.connected());
    (w, rx)
}

/// Asserts that `fut` cannot complete while the runtime is otherwise idle (needs paused time).
async fn assert_blocked<F: Future + Unpin>(fut: &mut F)
where
    F::Output: std::fmt::Debug,
{
    let res = timeout(Duration::from_secs(3600), fut).await;
    assert!(res.is_err(), "expected to block, completed with {res:?}");
}

/// Awaits `fut`, failing instead of hanging if it never completes (a lost wake-up). Under
/// paused time the hour passes at once when the runtime is idle, so this costs nothing.
async fn finish<F: Future>(fut: F) -> F::Output {
    timeout(Duration::from_secs(3600), fut)
        .await
        .expect("never completed: lost wake-up?")
}

/// Polls `fut` exactly once, with a waker that does nothing.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::pin::Pin::new(fut).poll(&mut Context::from_waker(Waker::noop()))
}

/// Spawns `writer.write(data)`.
fn spawn_write(writer: &Writer, data: &'static [u8]) -> JoinHandle<Result<usize, Error>> {
    let w = writer.clone();
    tokio::spawn(async move { w.write(data).await })
}

/// Spawns `writer.reconnect(from, transport)`.
fn spawn_reconnect(
    writer: &Writer,
    from: u64,
    transport: MockWriter,
) -> JoinHandle<Result<(), Error>> {
    let w = writer.clone();
    tokio::spawn(async move { w.reconnect(from, transport).await })
}

/// Receives the next error event, asserting one is already queued.
fn next_event(rx: &mut UnboundedReceiver<ErrorEvent>) -> ErrorEvent {
    rx.try_recv().expect("an error event was sent")
}

/// W-1: a new writer has sequence 0 and is disconnected.
#[tokio::test]
async fn w01_new_writer_is_disconnected_at_sequence_zero() {
    let (w, mut rx) = writer(1024);
    assert_eq!(w.sequence_num(), 0);
    assert!(!w.connected());
    assert_eq!(w.buffered(), (0, 0));
    assert!(rx.try_recv().is_err());
}

/// W-2: a write while never connected blocks; reconnect(0, w) releases it, it returns the full
/// length, the sequence advances, and `w` holds the bytes exactly once.
#[tokio::test(start_paused = true)]
async fn w02_write_blocks_until_first_connection() {
    let (w, _rx) = writer(1024);
    let mut write = pin!(w.write(b"hello"));
    assert_blocked(&mut write).await;
    assert_eq!(w.sequence_num(), 0, "nothing is committed while waiting");
    let t = MockWriter::new();
    w.reconnect(0, t.clone()).await.unwrap();
    assert_eq!(finish(write).await.unwrap(), 5);
    assert_eq!(w.sequence_num(), 5);
    assert_eq!(t.data(), b"hello");
    assert!(w.connected());
}

/// W-3: a connected write goes straight to the transport, returns len, and advances the
/// sequence by len.
#[tokio::test]
async fn w03_connected_write_goes_straight_through() {
    let t = MockWriter::new();
    let (w, mut rx) = connected_to(1024, t.clone()).await;
    assert_eq!(w.write(b"hello").await.unwrap(), 5);
    assert_eq!((t.data(), t.writes()), (b"hello".to_vec(), 1));
    assert_eq!(w.sequence_num(), 5);
    assert_eq!(w.write(b" world").await.unwrap(), 6);
    assert_eq!(t.data(), b"hello world");
    assert_eq!(w.sequence_num(), 11);
    assert!(w.connected());
    assert!(rx.try_recv().is_err());
}

/// W-4: when the transport fails, write does not return the error but blocks; an error event
/// (component writer, generation, original message) goes out and the writer is disconnected.
/// After reconnect(0, w2) the blocked write returns its length, and w2 holds the bytes once:
/// they arrive by the replay inside `reconnect` (before the write is polled again), not by a
/// retry.
#[tokio::test(start_paused = true)]
async fn w04_failed_write_blocks_and_is_replayed() {
    let t1 = MockWriter::failing("connection reset by peer");
    let (w, mut rx) = connected_to(1024, t1.clone()).await;
    w.set_generation(7);
    let mut write = pin!(w.write(b"hello"));
    assert_blocked(&mut write).await;
    let ev = next_event(&mut rx);
    assert_eq!(ev.component, Component::Writer);
    assert_eq!(ev.generation, 7);
    assert_eq!(ev.err.to_string(), "connection reset by peer");
    assert!(rx.try_recv().is_err(), "one event per failure");
    assert!(!w.connected());
    assert_eq!(w.sequence_num(), 5);
    assert!(t1.data().is_empty());

    let t2 = MockWriter::new();
    w.reconnect(0, t2.clone()).await.unwrap();
    assert_eq!(t2.data(), b"hello", "delivered by the replay");
    assert_eq!(t2.writes(), 1);
    assert_eq!(finish(write).await.unwrap(), 5);
    assert_eq!(t2.data(), b"hello", "not sent again by the write");
    assert_eq!(t2.writes(), 1);
    assert!(w.connected());
}

/// W-5: the replay covers earlier successful bytes and the failed write; the blocked write
/// returns its length, and the next write appends.
#[tokio::test(start_paused = true)]
async fn w05_replay_covers_earlier_bytes_and_failed_write() {
    let t1 = MockWriter::scripted([
        WriteStep::Accept,
        WriteStep::Accept,
        WriteStep::Fail("broken pipe"),
    ]);
    let (w, mut rx) = connected_to(1024, t1.clone()).await;
    w.write(b"hello").await.unwrap();
    w.write(b" world").await.unwrap();
    let mut write = pin!(w.write(b"test"));
    assert_blocked(&mut write).await;
    assert_eq!(next_event(&mut rx).err.to_string(), "broken pipe");
    let t2 = MockWriter::new();
    w.reconnect(0, t2.clone()).await.unwrap();
    assert_eq!(t2.data(), b"hello worldtest");
    assert_eq!(finish(write).await.unwrap(), 4);
    assert_eq!(w.write(b"!").await.unwrap(), 1);
    assert_eq!(t2.data(), b"hello worldtest!");
    assert_eq!(t1.data(), b"hello world");
    assert_eq!(w.sequence_num(), 16);
}

/// W-6: reconnect(k) replays from byte offset k only.
#[tokio::test]
async fn w06_reconnect_replays_from_offset() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    for chunk in [&b"hello"[..], b" world", b"!"] {
        w.write(chunk).await.unwrap();
    }
    let t2 = MockWriter::new();
    w.reconnect(5, t2.clone()).await.unwrap();
    assert_eq!(t2.data(), b" world!");
    assert!(w.connected());
    assert_eq!(w.sequence_num(), 12);
}

/// W-7: reconnect with an offset beyond the bytes written fails with FutureSequence and sends
/// nothing to the new transport.
#[tokio::test]
async fn w07_reconnect_past_end_is_future_sequence() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    w.write(b"hello").await.unwrap();
    let t2 = MockWriter::new();
    let err = w.reconnect(6, t2.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::FutureSequence {
                requested: 6,
                written: 5
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        w.reconnect(100, t2.clone()).await,
        Err(Error::FutureSequence { .. })
    ));
    assert_eq!(t2.writes(), 0);
    // Exactly the end is allowed.
    w.reconnect(5, t2.clone()).await.unwrap();
    assert!(t2.data().is_empty());
}

/// W-8: reconnect with an offset older than the retained window fails with
/// ReplayDataUnavailable (capacity 10, 16 bytes written, reconnect(0)).
#[tokio::test]
async fn w08_reconnect_before_window_is_unavailable() {
    let (w, _rx) = connected_to(10, MockWriter::new()).await;
    w.write(b"01234567").await.unwrap();
    w.write(b"89abcdef").await.unwrap();
    assert_eq!(w.sequence_num(), 16);
    let t2 = MockWriter::new();
    let err = w.reconnect(0, t2.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReplayDataUnavailable {
                requested: 0,
                oldest: 6
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("failed to read replay data"));
    assert_eq!(t2.writes(), 0);
}

/// W-9: eviction: capacity 5, "abcde" then "fg" gives seq 7; reconnect(0) is unavailable;
/// reconnect(2) replays "cdefg" and the writer is connected.
#[tokio::test]
async fn w09_eviction_limits_replay_window() {
    let (w, _rx) = connected_to(5, MockWriter::new()).await;
    w.write(b"abcde").await.unwrap();
    w.write(b"fg").await.unwrap();
    assert_eq!(w.sequence_num(), 7);
    assert!(matches!(
        w.reconnect(0, MockWriter::new()).await,
        Err(Error::ReplayDataUnavailable {
            requested: 0,
            oldest: 2
        })
    ));
    let t3 = MockWriter::new();
    w.reconnect(2, t3.clone()).await.unwrap();
    assert_eq!(t3.data(), b"cdefg");
    assert!(w.connected());
}

/// W-10: after close, write fails with a "closed" error and reconnect fails with WriterClosed.
/// (Go's write returns os.ErrClosed; Rust uses Error::WriterClosed for both.)
#[tokio::test]
async fn w10_close_fails_writes_and_reconnects() {
    let t = MockWriter::new();
    let (w, _rx) = connected_to(1024, t.clone()).await;
    w.write(b"hi").await.unwrap();
    w.close().unwrap();
    assert!(!w.connected());
    let err = w.write(b"more").await.unwrap_err();
    assert!(matches!(err, Error::WriterClosed), "{err:?}");
    assert!(err.to_string().contains("closed"));
    assert!(matches!(
        w.reconnect(0, MockWriter::new()).await,
        Err(Error::WriterClosed)
    ));
    assert_eq!(t.data(), b"hi");
    assert_eq!(w.sequence_num(), 2);
}

/// W-11: close is idempotent.
#[tokio::test]
async fn w11_close_is_idempotent() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    w.close().unwrap();
    w.close().unwrap();
    w.close().unwrap();
    assert!(!w.connected());
    assert!(matches!(w.write(b"x").await, Err(Error::WriterClosed)));
}

/// W-12: if the new transport fails during the replay, reconnect returns ReplayFailed (with
/// the transport's message) and the writer stays disconnected; a later reconnect recovers.
#[tokio::test(start_paused = true)]
async fn w12_replay_failure_leaves_writer_disconnected() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    w.write(b"hello").await.unwrap();
    let err = w
        .reconnect(0, MockWriter::failing("replay boom"))
        .await
        .unwrap_err();
    let Error::ReplayFailed(io) = &err else {
        panic!("expected ReplayFailed, got {err:?}");
    };
    assert_eq!(io.to_string(), "replay boom");
    assert!(!w.connected());
    let mut write = pin!(w.write(b"!"));
    assert_blocked(&mut write).await;
    let t3 = MockWriter::new();
    w.reconnect(0, t3.clone()).await.unwrap();
    assert_eq!(finish(write).await.unwrap(), 1);
    assert_eq!(t3.data(), b"hello!");
}

/// W-13: a short write counts as a failure. In Rust the short write is a transport accepting
/// zero bytes (`Ok(0)`); a partial write of n > 0 bytes is normal `AsyncWrite` behaviour and is
/// continued (see `w_rust_partial_transport_write_is_continued`). The write blocks, the event
/// says "short write", the writer is disconnected; after reconnect(0) the write returns the full
/// length and the new transport holds every byte.
#[tokio::test(start_paused = true)]
async fn w13_short_write_is_a_failure() {
    let (w, mut rx) = connected_to(1024, MockWriter::scripted([WriteStep::Zero])).await;
    w.set_generation(3);
    let mut write = pin!(w.write(b"hello"));
    assert_blocked(&mut write).await;
    let ev = next_event(&mut rx);
    assert_eq!(ev.component, Component::Writer);
    assert_eq!(ev.generation, 3);
    assert!(ev.err.to_string().contains("short write"), "{}", ev.err);
    assert_eq!(ev.err.kind(), std::io::ErrorKind::WriteZero);
    assert!(!w.connected());
    let t2 = MockWriter::new();
    w.reconnect(0, t2.clone()).await.unwrap();
    assert_eq!(finish(write).await.unwrap(), 5);
    assert_eq!(t2.data(), b"hello");
}

/// W-14: a write waiting (in its own task) for the first connection completes on reconnect,
/// and the data lands on the new transport.
#[tokio::test(start_paused = true)]
async fn w14_waiting_write_completes_on_reconnect() {
    let (w, _rx) = writer(1024);
    let mut task = spawn_write(&w, b"payload");
    assert_blocked(&mut task).await;
    assert!(!w.connected());
    let t = MockWriter::new();
    w.reconnect(0, t.clone()).await.unwrap();
    assert_eq!(finish(task).await.unwrap().unwrap(), 7);
    assert_eq!(t.data(), b"payload");
    assert_eq!(w.sequence_num(), 7);
}

/// W-15: close wakes blocked writers, which fail with WriterClosed (Go: (0, closed)). Covers
/// both kinds of waiter: writes waiting for a connection and a write whose bytes failed and
/// wait for a replay.
#[tokio::test(start_paused = true)]
async fn w15_close_wakes_blocked_writers() {
    let (w, _rx) = connected_to(1024, MockWriter::failing("gone")).await;
    let mut failed = spawn_write(&w, b"abc");
    assert_blocked(&mut failed).await;
    assert_eq!(
        w.sequence_num(),
        3,
        "the failed write's bytes are committed"
    );
    let mut waiting: Vec<_> = (0..3).map(|_| spawn_write(&w, b"x")).collect();
    for t in &mut waiting {
        assert_blocked(t).await;
    }
    w.close().unwrap();
    assert!(matches!(
        finish(failed).await.unwrap(),
        Err(Error::WriterClosed)
    ));
    for t in waiting {
        assert!(matches!(finish(t).await.unwrap(), Err(Error::WriterClosed)));
    }
    assert_eq!(w.sequence_num(), 3);
}

/// W-16: no duplication: "hello" is delivered, "world" fails, and reconnect(5, w2) sends only
/// "world".
#[tokio::test(start_paused = true)]
async fn w16_no_duplication_after_partial_delivery() {
    let t1 = MockWriter::scripted([WriteStep::Accept, WriteStep::Fail("reset")]);
    let (w, _rx) = connected_to(1024, t1.clone()).await;
    w.write(b"hello").await.unwrap();
    let mut write = pin!(w.write(b"world"));
    assert_blocked(&mut write).await;
    let t2 = MockWriter::new();
    w.reconnect(5, t2.clone()).await.unwrap();
    assert_eq!(finish(write).await.unwrap(), 5);
    assert_eq!(t1.data(), b"hello");
    assert_eq!(t2.data(), b"world");
}

/// W-17 [C]: a write blocked (in another task) waiting for a connection, then close: the write
/// fails with WriterClosed, and later writes and reconnects fail with it too.
#[tokio::test(start_paused = true)]
async fn w17_close_releases_write_waiting_for_connection() {
    let (w, _rx) = writer(1024);
    let mut task = spawn_write(&w, b"hello");
    assert_blocked(&mut task).await;
    let closer = {
        let w = w.clone();
        tokio::spawn(async move { w.close() })
    };
    finish(closer).await.unwrap().unwrap();
    assert!(matches!(
        finish(task).await.unwrap(),
        Err(Error::WriterClosed)
    ));
    assert!(matches!(w.write(b"later").await, Err(Error::WriterClosed)));
    assert!(matches!(
        w.reconnect(0, MockWriter::new()).await,
        Err(Error::WriterClosed)
    ));
    assert_eq!(w.sequence_num(), 0);
}

/// W-18 [C]: a write issued while reconnect is mid-replay (the replay held inside the new
/// transport by a gate) waits until the replay finishes, then succeeds; its bytes follow the
/// replayed ones and the writer ends connected.
#[tokio::test(start_paused = true)]
async fn w18_write_during_replay_waits_for_it() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    w.write(b"hello").await.unwrap();
    let gate = Gate::new();
    let t2 = MockWriter::gated(gate.clone());
    let reconnect = spawn_reconnect(&w, 0, t2.clone());
    finish(gate.reached()).await;
    let mut write = spawn_write(&w, b"1234567");
    assert_blocked(&mut write).await;
    assert!(!reconnect.is_finished());
    assert!(!w.connected(), "not connected while replaying");
    assert_eq!(w.sequence_num(), 5, "the waiting write committed nothing");
    assert!(t2.data().is_empty());

    gate.open();
    finish(reconnect).await.unwrap().unwrap();
    assert_eq!(finish(write).await.unwrap().unwrap(), 7);
    assert!(w.connected());
    assert_eq!(t2.data(), b"hello1234567");
    assert_eq!(w.sequence_num(), 12);
}

/// W-19 [C]: close mid-replay. Go holds its lock during the replay, so close blocks until the
/// replay ends; Rust holds no lock across I/O, so `close()` returns at once while the replay is
/// still blocked in the transport, and writes fail with WriterClosed immediately. The replay
/// then runs to its end, `reconnect` returns Ok (as in Go), and the writer ends disconnected
/// and closed (as in Go): the observable end state is the same.
#[tokio::test(start_paused = true)]
async fn w19_close_mid_replay_lets_replay_finish_then_ends_closed() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    w.write(b"hello").await.unwrap();
    let gate = Gate::new();
    let t2 = MockWriter::gated(gate.clone());
    let mut reconnect = spawn_reconnect(&w, 0, t2.clone());
    finish(gate.reached()).await;

    w.close().unwrap();
    assert!(!gate.is_open() && !reconnect.is_finished());
    assert!(matches!(w.write(b"x").await, Err(Error::WriterClosed)));
    assert_blocked(&mut reconnect).await;

    gate.open();
    finish(reconnect).await.unwrap().unwrap();
    assert_eq!(t2.data(), b"hello", "the replay ran to its end");
    assert!(!w.connected());
    assert!(matches!(w.write(b"y").await, Err(Error::WriterClosed)));
    assert!(matches!(
        w.reconnect(0, MockWriter::new()).await,
        Err(Error::WriterClosed)
    ));
    assert_eq!(t2.data(), b"hello");
}

/// W-20 [C]: five concurrent 1-byte writes racing a gated reconnect, on a multi-threaded
/// runtime, all succeed; every byte reaches the new transport exactly once and the writer ends
/// connected. Repeated to exercise different interleavings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn w20_concurrent_writes_race_gated_reconnect() {
    for _ in 0..50 {
        // A safety net only (real time): a lost wake-up fails here instead of hanging.
        timeout(Duration::from_secs(30), one_race())
            .await
            .expect("race did not finish");
    }
}

/// One round of W-20: five 1-byte writes and a gated reconnect, all spawned at once.
async fn one_race() {
    const BYTES: [&[u8]; 5] = [b"1", b"2", b"3", b"4", b"5"];
    // The old transport takes "abc", then fails whichever write comes next (if any does
    // before the reconnect replaces it).
    let t1 = MockWriter::scripted([WriteStep::Accept, WriteStep::Fail("dropped")]);
    let (w, _rx) = connected_to(1024, t1.clone()).await;
    w.write(b"abc").await.unwrap();
    let gate = Gate::new();
    let t2 = MockWriter::gated(gate.clone());
    let writes: Vec<_> = BYTES.iter().map(|b| spawn_write(&w, b)).collect();
    let reconnect = spawn_reconnect(&w, 3, t2.clone());
    // Bytes reach t2 either by replay or directly; either way someone hits the gate.
    gate.reached().await;
    gate.open();
    reconnect.await.unwrap().unwrap();
    for t in writes {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    assert!(w.connected());
    assert_eq!(w.sequence_num(), 8);
    assert_eq!(t1.data(), b"abc");
    let mut got = t2.data();
    got.sort_unstable();
    assert_eq!(got, b"12345");
}

/// The 1 KiB block number `k` of the W-21 workload.
fn block(k: u64) -> Vec<u8> {
    let mut b = vec![(k % 251) as u8; 1024];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

/// W-21: the Go benchmark workloads (1 KiB writes; a reconnect replaying 32 KiB) deliver
/// exactly the right bytes, including a replay that crosses the ring's wrap point.
#[tokio::test]
async fn w21_bulk_writes_and_32k_replay_are_exact() {
    const BLOCKS: u64 = 200;
    let t1 = MockWriter::new();
    let (w, _rx) = connected_to(48 * 1024, t1.clone()).await;
    for k in 0..BLOCKS {
        assert_eq!(w.write(&block(k)).await.unwrap(), 1024);
    }
    let all: Vec<u8> = (0..BLOCKS).flat_map(block).collect();
    assert_eq!(t1.data(), all);
    assert_eq!(w.sequence_num(), BLOCKS * 1024);
    assert!(w.buffered().1 <= 48 * 1024);

    let from = w.sequence_num() - 32 * 1024;
    // The same writes into a bare ring of the same capacity show that this replay range
    // wraps around the end of the storage (so the replay is written from two slices).
    let mut mirror = backedpipe::ReplayBuffer::new(48 * 1024).unwrap();
    for k in 0..BLOCKS {
        mirror.write(&block(k));
    }
    assert!(!mirror.slices_from(from).unwrap().1.is_empty());
    let t2 = MockWriter::new();
    w.reconnect(from, t2.clone()).await.unwrap();
    assert_eq!(t2.data(), &all[from as usize..]);
    assert!(w.connected());
}

/// Code-only: a zero-length write returns Ok(0) at once (on its first poll), even while
/// disconnected, and commits nothing.
#[tokio::test]
async fn w_code_only_zero_length_write_returns_at_once() {
    let (w, _rx) = writer(1024);
    let mut write = pin!(w.write(b""));
    assert!(matches!(poll_once(&mut write), Poll::Ready(Ok(0))));
    assert_eq!(w.sequence_num(), 0);
    assert!(!w.connected());
}

/// Code-only: sending an error event never blocks. Go drops the event when its capacity-1
/// channel is full; Rust deliberately uses an unbounded channel, so nothing is dropped: five
/// failures with nobody reading leave five events, in order, with their generations. A
/// dropped receiver does not stop the writer either.
#[tokio::test(start_paused = true)]
async fn w_code_only_error_event_send_never_blocks() {
    let (w, mut rx) = writer(1024);
    for gen in 1..=5u64 {
        w.set_generation(gen);
        w.reconnect(w.sequence_num(), MockWriter::failing("flaky"))
            .await
            .unwrap();
        let mut write = pin!(w.write(b"x"));
        assert_blocked(&mut write).await;
        assert!(!w.connected());
        w.reconnect(w.sequence_num() - 1, MockWriter::new())
            .await
            .unwrap();
        assert_eq!(finish(write).await.unwrap(), 1);
    }
    for gen in 1..=5u64 {
        let ev = next_event(&mut rx);
        assert_eq!((ev.component, ev.generation), (Component::Writer, gen));
        assert_eq!(ev.err.to_string(), "flaky");
    }
    assert!(rx.try_recv().is_err());

    drop(rx);
    w.reconnect(w.sequence_num(), MockWriter::failing("unheard"))
        .await
        .unwrap();
    let mut write = pin!(w.write(b"y"));
    assert_blocked(&mut write).await;
    assert!(!w.connected());
    let t = MockWriter::new();
    w.reconnect(5, t.clone()).await.unwrap();
    assert_eq!(finish(write).await.unwrap(), 1);
    assert_eq!(t.data(), b"y");
}

/// Code-only: on FutureSequence or ReplayDataUnavailable the previous transport is kept (the
/// writer stays connected and later writes still go to it); only a replay I/O failure
/// clears it.
#[tokio::test(start_paused = true)]
async fn w_code_only_invalid_offset_keeps_previous_transport() {
    let t1 = MockWriter::new();
    let (w, _rx) = connected_to(5, t1.clone()).await;
    w.write(b"hello").await.unwrap();
    w.write(b"!!").await.unwrap(); // evicts "he": window is [2, 7)
    assert!(matches!(
        w.reconnect(8, MockWriter::new()).await,
        Err(Error::FutureSequence { .. })
    ));
    assert!(w.connected());
    assert!(matches!(
        w.reconnect(1, MockWriter::new()).await,
        Err(Error::ReplayDataUnavailable { .. })
    ));
    assert!(w.connected());
    w.write(b"?").await.unwrap();
    assert_eq!(t1.data(), b"hello!!?");

    assert!(matches!(
        w.reconnect(3, MockWriter::failing("replay io")).await,
        Err(Error::ReplayFailed(_))
    ));
    assert!(!w.connected());
    let mut write = pin!(w.write(b"z"));
    assert_blocked(&mut write).await;
    assert_eq!(
        t1.data(),
        b"hello!!?",
        "the old transport is no longer used"
    );
}

/// Code-only: Go appends bytes to the ring *before* the transport write, so a failed write's
/// bytes are replayed. Rust keeps that outcome (a failed or short write's bytes are committed
/// and replayed: W-4, W-13) but commits a chunk only once the transport has accepted or
/// rejected it: while the transport write is still pending, the sequence number has not
/// advanced, so a write future dropped mid-flight leaves nothing half-committed.
#[tokio::test(start_paused = true)]
async fn w_code_only_bytes_committed_when_transport_answers() {
    let gate = Gate::new();
    let t = MockWriter::gated(gate.clone());
    let (w, _rx) = connected_to(1024, t.clone()).await;
    let task = spawn_write(&w, b"hello");
    finish(gate.reached()).await;
    assert_eq!(w.sequence_num(), 0);
    gate.open();
    assert_eq!(finish(task).await.unwrap().unwrap(), 5);
    assert_eq!(w.sequence_num(), 5);
    assert_eq!(t.data(), b"hello");

    // A rejected write is committed anyway, ready for the replay.
    let (w, _rx) = connected_to(1024, MockWriter::failing("nope")).await;
    let mut write = pin!(w.write(b"abc"));
    assert_blocked(&mut write).await;
    assert_eq!(w.sequence_num(), 3);
    assert_eq!(w.buffered().0, 3);
}

/// Rust-only: a transport that accepts part of a chunk (n > 0) is not a failure, unlike Go's
/// short write: `AsyncWrite` allows partial writes, so the writer keeps writing the rest.
#[tokio::test]
async fn w_rust_partial_transport_write_is_continued() {
    let t = MockWriter::scripted([WriteStep::Accept_(2), WriteStep::Accept_(1)]);
    let (w, mut rx) = connected_to(1024, t.clone()).await;
    assert_eq!(w.write(b"hello").await.unwrap(), 5);
    assert_eq!(t.data(), b"hello");
    assert_eq!(t.writes(), 3);
    assert!(w.connected());
    assert!(rx.try_recv().is_err());
}

/// Rust-only: a new transport that accepts zero bytes during the replay fails the reconnect
/// with PartialReplay (how much of how much) and leaves the writer disconnected.
#[tokio::test]
async fn w_rust_zero_length_replay_write_is_partial_replay() {
    let (w, _rx) = connected_to(1024, MockWriter::new()).await;
    w.write(b"hello").await.unwrap();
    let t2 = MockWriter::scripted([WriteStep::Accept_(2), WriteStep::Zero]);
    let err = w.reconnect(0, t2.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PartialReplay {
                written: 2,
                expected: 5
            }
        ),
        "{err:?}"
    );
    assert!(!w.connected());
    assert_eq!(t2.data(), b"he");
}
