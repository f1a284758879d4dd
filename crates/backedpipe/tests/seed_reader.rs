//! Seed parity for `BackedReader`: one test per item R-1..R-12 of
//! the seed behaviour checklist (`reference/seed-behaviour.md` beside DESIGN.md), section 1.3, plus the code-only lines that can be
//! expressed in Rust.
//!
//! Go's two-phase reconnect maps to `reader.reconnect(seq_tx, new_source).await`; Go's `(0, EOF)`
//! after close maps to `Ok(0)`; a source failure or end-of-stream is an `ErrorEvent` (component
//! `Reader`, EOF as `io::ErrorKind::UnexpectedEof`) and the read keeps waiting.
//!
//! Code-only lines that are not tested, and why:
//! - "a source returning n > 0 together with an error counts the bytes and then disconnects":
//!   unrepresentable, because `AsyncRead::poll_read` returns either bytes or an error, never both.
//! - "a nil event channel panics": unrepresentable, because the event channel is a required, typed
//!   constructor argument (`BackedReader::new(events)`); there is no nil to pass.
//!
//! "Blocks" is always proven deterministically: with paused time the runtime advances the clock
//! only when every task is idle, so a one-hour `timeout` that fires proves the future cannot make
//! progress; the concurrency items use spawned tasks synchronised by channels.

mod common;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use backedpipe::{BackedReader, Component};
use common::*;
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// One step of a [`ScriptSource`].
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Deliver these bytes (as many as fit; the rest stays for the next read).
    Data(&'static [u8]),
    /// Fail with this message.
    Fail(&'static str),
    /// End of stream (`Ok` with no bytes).
    Eof,
}

/// A source that follows a script, then stays pending for ever.
#[derive(Debug)]
struct ScriptSource {
    steps: VecDeque<Step>,
}

fn script(steps: &[Step]) -> ScriptSource {
    ScriptSource {
        steps: steps.iter().copied().collect(),
    }
}

impl AsyncRead for ScriptSource {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.steps.pop_front() {
            Some(Step::Data(data)) => {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                if n < data.len() {
                    self.steps.push_front(Step::Data(&data[n..]));
                }
                Poll::Ready(Ok(()))
            }
            Some(Step::Fail(msg)) => Poll::Ready(Err(io::Error::other(msg))),
            Some(Step::Eof) => Poll::Ready(Ok(())),
            None => Poll::Pending,
        }
    }
}

/// A duplex source that reports every poll on a channel and records being dropped.
#[derive(Debug)]
struct Signalled {
    inner: DuplexStream,
    polled: mpsc::UnboundedSender<()>,
    dropped: Arc<AtomicBool>,
}

impl AsyncRead for Signalled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_read(cx, buf);
        let _ = self.polled.send(());
        outcome
    }
}

impl Drop for Signalled {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// Runs the full two-phase handshake and returns the sequence number the reader published.
async fn handshake<R: AsyncRead + Unpin>(reader: &BackedReader<R>, source: R) -> u64 {
    let (seq_tx, seq_rx) = oneshot::channel();
    let (source_tx, source_rx) = oneshot::channel();
    let drive = async {
        let seq = seq_rx.await.expect("reader published no sequence number");
        assert!(source_tx.send(source).is_ok(), "reader stopped waiting");
        seq
    };
    let ((), seq) = tokio::join!(reader.reconnect(seq_tx, source_rx), drive);
    seq
}

/// a new reader has sequence number 0 and is disconnected.
#[tokio::test(start_paused = true)]
async fn r01_new_reader_is_disconnected_at_seq_zero() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = BackedReader::<DuplexStream>::new(tx);
        assert_eq!(reader.sequence_num(), 0);
        assert!(!reader.connected());
    })
    .await;
}

/// reconnect is a two-phase handshake: the reader publishes its sequence number (0), then
/// waits for the new source; after that, reads flow and partial-buffer reads work ("hello",
/// then " worl").
#[tokio::test(start_paused = true)]
async fn r02_two_phase_handshake_then_partial_reads() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        let (seq_tx, seq_rx) = oneshot::channel();
        let (source_tx, source_rx) = oneshot::channel();
        let r = reader.clone();
        let mut reconnect = tokio::spawn(async move { r.reconnect(seq_tx, source_rx).await });

        // Phase one: the offset is published.
        assert_eq!(seq_rx.await.unwrap(), 0);
        // Phase two: the reconnect waits for the source and is not connected meanwhile.
        assert!(timeout(HOUR, &mut reconnect).await.is_err());
        assert!(!reader.connected());
        assert!(source_tx
            .send(script(&[Step::Data(b"hello world")]))
            .is_ok());
        reconnect.await.unwrap();
        assert!(reader.connected());

        let mut buf = [0u8; 5];
        assert_eq!(reader.read(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf, b"hello");
        assert_eq!(reader.sequence_num(), 5);
        assert_eq!(reader.read(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf, b" worl");
        assert_eq!(reader.sequence_num(), 10);
    })
    .await;
}

/// a read while disconnected blocks, and completes with "test" once the handshake supplies a
/// source.
#[tokio::test(start_paused = true)]
async fn r03_read_while_disconnected_blocks_until_reconnect() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        let r = reader.clone();
        let mut read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = r.read(&mut buf).await.unwrap();
            buf[..n].to_vec()
        });
        assert!(
            timeout(HOUR, &mut read).await.is_err(),
            "read did not block"
        );

        assert_eq!(handshake(&reader, script(&[Step::Data(b"test")])).await, 0);
        assert_eq!(read.await.unwrap(), b"test");
        assert_eq!(reader.sequence_num(), 4);
    })
    .await;
}

/// a source error is reported as an event (component reader, message kept); the pending read
/// keeps blocking instead of returning the error and the reader is disconnected. The next
/// handshake publishes seq 5, and once the new source arrives the blocked read returns its data
/// and the reader is connected.
#[tokio::test(start_paused = true)]
async fn r04_source_error_is_an_event_and_read_waits_for_next_source() {
    guarded(async {
        let (tx, mut rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        handshake(&reader, script(&[Step::Data(b"hello"), Step::Fail("boom")])).await;
        let mut buf = [0u8; 5];
        assert_eq!(reader.read(&mut buf).await.unwrap(), 5);
        assert_eq!(reader.sequence_num(), 5);

        let r = reader.clone();
        let mut read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = r.read(&mut buf).await.unwrap();
            buf[..n].to_vec()
        });
        let event = rx.recv().await.unwrap();
        assert_eq!(event.component, Component::Reader);
        assert_eq!(event.err.to_string(), "boom");
        assert!(timeout(HOUR, &mut read).await.is_err(), "read returned");
        assert!(!reader.connected());

        assert_eq!(handshake(&reader, script(&[Step::Data(b"world")])).await, 5);
        assert_eq!(read.await.unwrap(), b"world");
        assert!(reader.connected());
        assert_eq!(reader.sequence_num(), 10);
    })
    .await;
}

/// after close, every read returns end-of-stream (Go's `(0, EOF)` is `Ok(0)`), even with
/// data available in the source.
#[tokio::test(start_paused = true)]
async fn r05_reads_after_close_return_eof() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = BackedReader::new(tx);
        handshake(&reader, script(&[Step::Data(b"unread data")])).await;
        reader.close().unwrap();
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
        }
        assert_eq!(reader.sequence_num(), 0);
        assert!(!reader.connected());
    })
    .await;
}

/// close is idempotent: a second close succeeds and reads still return end-of-stream.
#[tokio::test(start_paused = true)]
async fn r06_close_is_idempotent() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = BackedReader::new(tx);
        handshake(&reader, script(&[Step::Data(b"x")])).await;
        reader.close().unwrap();
        reader.close().unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
    })
    .await;
}

/// reconnect on a closed reader signals closure by closing the sequence channel without a
/// value (the sender is dropped), and does not wait for a source: it returns even though the
/// source sender is still alive.
#[tokio::test(start_paused = true)]
async fn r07_reconnect_on_closed_reader_closes_seq_channel() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = BackedReader::<ScriptSource>::new(tx);
        reader.close().unwrap();
        let (seq_tx, seq_rx) = oneshot::channel();
        let (source_tx, source_rx) = oneshot::channel::<ScriptSource>();
        timeout(HOUR, reader.reconnect(seq_tx, source_rx))
            .await
            .expect("reconnect waited for a source on a closed reader");
        assert!(seq_rx.await.is_err(), "a sequence number was published");
        assert!(source_tx.is_closed(), "the source receiver was kept");
        assert!(!reader.connected());
    })
    .await;
}

/// the sequence number counts bytes delivered to the caller: 3-byte reads give 3, 6, 9.
#[tokio::test(start_paused = true)]
async fn r08_seq_counts_bytes_delivered() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = BackedReader::new(tx);
        handshake(&reader, script(&[Step::Data(b"abcdefghi")])).await;
        let mut buf = [0u8; 3];
        for (want, expect) in [(3, b"abc"), (6, b"def"), (9, b"ghi")] {
            assert_eq!(reader.read(&mut buf).await.unwrap(), 3);
            assert_eq!(&buf, expect);
            assert_eq!(reader.sequence_num(), want);
        }
    })
    .await;
}

/// end-of-stream from the source means disconnect: the event carries EOF (as
/// `UnexpectedEof`) and component reader; EOF never reaches the caller. The read blocks, then
/// returns "more" after the reconnect.
#[tokio::test(start_paused = true)]
async fn r09_source_eof_is_a_disconnect_not_eof() {
    guarded(async {
        let (tx, mut rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        let (source, peer) = tokio::io::duplex(64);
        handshake(&reader, source).await;
        drop(peer); // the source now reads end-of-stream

        let r = reader.clone();
        let mut read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = r.read(&mut buf).await.unwrap();
            buf[..n].to_vec()
        });
        let event = rx.recv().await.unwrap();
        assert_eq!(event.component, Component::Reader);
        assert_eq!(event.err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(timeout(HOUR, &mut read).await.is_err(), "EOF was surfaced");
        assert!(!reader.connected());

        let (source, mut peer) = tokio::io::duplex(64);
        peer.write_all(b"more").await.unwrap();
        assert_eq!(handshake(&reader, source).await, 0);
        assert_eq!(read.await.unwrap(), b"more");
        assert_eq!(reader.sequence_num(), 4);
    })
    .await;
}

/// short source reads (1 byte each) pass through unchanged; seq is 5 after 5 reads.
#[tokio::test(start_paused = true)]
async fn r10_short_source_reads_pass_through() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = BackedReader::new(tx);
        let steps: Vec<Step> = [b"a", b"b", b"c", b"d", b"e"]
            .iter()
            .map(|b| Step::Data(&b[..]))
            .collect();
        handshake(&reader, script(&steps)).await;
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut buf = [0u8; 10];
            assert_eq!(reader.read(&mut buf).await.unwrap(), 1);
            got.push(buf[0]);
        }
        assert_eq!(got, b"abcde");
        assert_eq!(reader.sequence_num(), 5);
    })
    .await;
}

/// R-11 [C]: close while a read is parked *inside* the source. The read then returns
/// end-of-stream (`Ok(0)`), not a transport error; no failure event is sent; later reads give
/// end-of-stream, and the source is released.
///
/// Difference from Go: Go's close blocks until the source read returns, because the reader's
/// lock is held during the source I/O (a locking artefact, seed-behaviour §3.5). Here no lock is
/// held across an await, so `close` is a plain synchronous call that returns at once while the
/// read is still pending in the source; the read task is woken and ends with `Ok(0)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r11_close_while_read_inside_source_gives_eof() {
    guarded_rt(async {
        let (tx, mut rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        let (polled_tx, mut polled) = mpsc::unbounded_channel();
        let dropped = Arc::new(AtomicBool::new(false));
        let (inner, _peer) = tokio::io::duplex(64);
        let source = Signalled {
            inner,
            polled: polled_tx,
            dropped: dropped.clone(),
        };
        handshake(&reader, source).await;

        let r = reader.clone();
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            r.read(&mut buf).await
        });
        // The read task is now inside the source (polled, pending: the peer sends nothing).
        polled.recv().await.unwrap();
        reader.close().unwrap();
        assert!(dropped.load(Ordering::SeqCst), "close kept the source");

        assert_eq!(read.await.unwrap().unwrap(), 0);
        assert!(rx.try_recv().is_err(), "close was reported as a failure");
        let mut buf = [0u8; 4];
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
    })
    .await;
}

/// R-12 [C]: close while a read waits for reconnection (its source failed) makes the read return
/// end-of-stream. The failure event tells the test the read has handled the failure and is
/// waiting for the next source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r12_close_releases_read_waiting_for_reconnection() {
    guarded_rt(async {
        let (tx, mut rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        handshake(&reader, script(&[Step::Fail("gone")])).await;
        let r = reader.clone();
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            r.read(&mut buf).await
        });
        let event = rx.recv().await.unwrap();
        assert_eq!(event.err.to_string(), "gone");
        assert!(!reader.connected());
        reader.close().unwrap();
        assert_eq!(read.await.unwrap().unwrap(), 0);
    })
    .await;
}

/// R-12 [C], second form: close releases a read on a reader that never had a source.
#[tokio::test(start_paused = true)]
async fn r12_close_releases_read_that_never_had_a_source() {
    guarded(async {
        let (tx, _rx) = events();
        let reader = Arc::new(BackedReader::<DuplexStream>::new(tx));
        let r = reader.clone();
        let mut read = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            r.read(&mut buf).await
        });
        assert!(timeout(HOUR, &mut read).await.is_err(), "read did not wait");
        reader.close().unwrap();
        assert_eq!(read.await.unwrap().unwrap(), 0);
    })
    .await;
}

/// Code-only: events carry the reader's current generation (set by its owner before each
/// connection), so the owner can ignore failures of an old connection.
#[tokio::test(start_paused = true)]
async fn r_code_only_events_carry_generation() {
    guarded(async {
        let (tx, mut rx) = events();
        let reader = BackedReader::new(tx);
        let mut buf = [0u8; 8];

        reader.set_generation(3);
        handshake(&reader, script(&[Step::Data(b"a"), Step::Fail("first")])).await;
        assert_eq!(reader.read(&mut buf).await.unwrap(), 1);
        // The next read fails in the source; the event is sent during that poll.
        assert!(
            poll_once(reader.read(&mut buf)).await.is_none(),
            "read returned after a source failure"
        );
        let event = rx.recv().await.unwrap();
        assert_eq!(
            (event.generation, event.err.to_string()),
            (3, "first".into())
        );

        reader.set_generation(4);
        handshake(&reader, script(&[Step::Eof])).await;
        assert!(poll_once(reader.read(&mut buf)).await.is_none());
        let event = rx.recv().await.unwrap();
        assert_eq!(event.generation, 4);
        assert_eq!(event.err.kind(), io::ErrorKind::UnexpectedEof);
    })
    .await;
}

/// Code-only (Go detaches under the lock on failure): a failed source is dropped, so reads do not
/// touch it again; the published offset stays the bytes delivered before the failure.
#[tokio::test(start_paused = true)]
async fn r_code_only_failed_source_is_dropped() {
    guarded(async {
        let (tx, mut rx) = events();
        let reader = Arc::new(BackedReader::new(tx));
        let dropped = Arc::new(AtomicBool::new(false));
        let (polled_tx, _polled) = mpsc::unbounded_channel();
        let (inner, mut peer) = tokio::io::duplex(64);
        peer.write_all(b"xy").await.unwrap();
        drop(peer);
        handshake(
            &reader,
            Signalled {
                inner,
                polled: polled_tx,
                dropped: dropped.clone(),
            },
        )
        .await;
        let r = reader.clone();
        let mut read_all = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = r.read(&mut buf).await.unwrap();
            let m = r.read(&mut buf[n..]).await.unwrap();
            (n, m)
        });
        assert_eq!(
            rx.recv().await.unwrap().err.kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(dropped.load(Ordering::SeqCst), "failed source kept");
        assert!(timeout(HOUR, &mut read_all).await.is_err());
        assert_eq!(reader.sequence_num(), 2);
        reader.close().unwrap();
        assert_eq!(read_all.await.unwrap(), (2, 0));
    })
    .await;
}

/// Polls `fut` once: `Some(output)` if it completed, `None` if it is pending.
async fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}
