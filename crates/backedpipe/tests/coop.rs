//! A pipe takes part in tokio's cooperative scheduling budget, as tokio's own sockets do: a
//! task that reads or writes a pipe that is always ready still lets other tasks run.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use backedpipe::{reconnector_fn, BackedPipe, BackedWriter, BoxError};
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

/// A transport that takes every write whole and counts the bytes it took before `ran` was set.
struct Probe {
    ran: Arc<AtomicBool>,
    taken_before: Arc<AtomicUsize>,
}

impl AsyncWrite for Probe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.ran.load(Ordering::SeqCst) {
            self.taken_before.fetch_add(buf.len(), Ordering::SeqCst);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A replay of several MiB to a transport that never pushes back is written in slices, with
/// the other tasks of the thread (a reader waiting for those bytes, the runtime's I/O events)
/// let in between, not in one go.
#[tokio::test(flavor = "current_thread")]
async fn a_long_replay_lets_other_tasks_run_before_it_ends() {
    const REPLAYED: usize = 8 << 20;
    let (events, _failures) = tokio::sync::mpsc::unbounded_channel();
    let writer = BackedWriter::new(REPLAYED, events).unwrap();
    let first = Probe {
        ran: Arc::new(AtomicBool::new(true)),
        taken_before: Arc::default(),
    };
    writer.reconnect(0, first).await.unwrap();
    writer.write(&vec![7; REPLAYED]).await.unwrap();

    let ran = other_task();
    let taken_before = Arc::new(AtomicUsize::new(0));
    let second = Probe {
        ran: ran.clone(),
        taken_before: taken_before.clone(),
    };
    writer.reconnect(0, second).await.unwrap();
    assert!(ran.load(Ordering::SeqCst));
    let taken = taken_before.load(Ordering::SeqCst);
    assert!(
        taken < REPLAYED,
        "the replay wrote all {taken} bytes before another task could run"
    );
}

/// Over a transport that spends the budget itself (tokio's sockets and duplex do), a pipe
/// operation still costs the task one unit of its budget, not two: a writing task yields after
/// about as many writes as it would make to the bare transport (tokio's budget is 128), not
/// after half as many. Counted twice, the budget made the runtime's workers trade the tasks
/// of a throughput run between them thousands of times per GiB.
#[tokio::test(flavor = "current_thread")]
async fn a_pipe_write_over_a_tokio_transport_spends_one_unit_of_budget() {
    let (ours, _theirs) = tokio::io::duplex(1 << 20);
    let conn = std::sync::Mutex::new(Some(ours));
    let pipe = BackedPipe::new(reconnector_fn(move |_| {
        let conn = conn.lock().unwrap().take();
        async move {
            conn.map(|c| (c, 0))
                .ok_or_else(|| BoxError::from("dialled twice"))
        }
    }))
    .unwrap();
    pipe.connect().await.unwrap();
    let ran = other_task();
    let mut writes = 0;
    while !ran.load(Ordering::SeqCst) && writes < 1000 {
        assert_eq!(pipe.write(b"x").await.unwrap(), 1);
        writes += 1;
    }
    assert!(ran.load(Ordering::SeqCst), "the writing task never yielded");
    assert!(
        writes > 100,
        "yielded after {writes} writes: the budget was spent twice per write"
    );
}
