//! A pipe takes part in tokio's cooperative scheduling budget, as tokio's own sockets do: a
//! task that reads or writes a pipe that is always ready still lets other tasks run.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use backedpipe::{reconnector_fn, BackedPipe, BoxError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A transport that always has bytes to give and room to take, and never yields by itself
/// (unlike tokio's sockets, it spends no scheduling budget).
struct AlwaysReady;

impl AsyncRead for AlwaysReady {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(512);
        buf.put_slice(&[7; 512][..n]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for AlwaysReady {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn always_ready_pipe() -> BackedPipe<AlwaysReady> {
    let pipe = BackedPipe::new(reconnector_fn(|_| async {
        Ok::<_, BoxError>((AlwaysReady, 0))
    }))
    .unwrap();
    pipe.connect().await.unwrap();
    pipe
}

/// A flag another task sets once it gets to run.
fn other_task() -> Arc<AtomicBool> {
    let ran = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let ran = ran.clone();
        async move { ran.store(true, Ordering::SeqCst) }
    });
    ran
}

#[tokio::test(flavor = "current_thread")]
async fn a_reader_that_always_has_data_still_lets_other_tasks_run() {
    let pipe = always_ready_pipe().await;
    let ran = other_task();
    let mut buf = [0u8; 64];
    // tokio's budget is 128 operations a turn; without it this loop never yields.
    for _ in 0..100_000 {
        if ran.load(Ordering::SeqCst) {
            break;
        }
        assert!(pipe.read(&mut buf).await.unwrap() > 0);
    }
    assert!(ran.load(Ordering::SeqCst), "the reading task never yielded");
}

#[tokio::test(flavor = "current_thread")]
async fn a_writer_that_always_has_room_still_lets_other_tasks_run() {
    let pipe = always_ready_pipe().await;
    let ran = other_task();
    for _ in 0..100_000 {
        if ran.load(Ordering::SeqCst) {
            break;
        }
        assert_eq!(pipe.write(b"x").await.unwrap(), 1);
    }
    assert!(ran.load(Ordering::SeqCst), "the writing task never yielded");
}
