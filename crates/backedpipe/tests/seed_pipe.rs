//! Seed parity for `BackedPipe`: one test per item P-1..P-20 of
//! the seed behaviour checklist (`reference/seed-behaviour.md` beside DESIGN.md), section 1.4, the historical concurrent read/write
//! test (`p_hist_`), and the branch-only API (`p_branch_`).
//!
//! Mapping: Go's `io.EOF` from `Write`/`ForceReconnect` after close is `Err(Error::PipeClosed)`;
//! Go's `(0, EOF)` from `Read` is `Ok(0)`; `pipe.write` returns only once the bytes reached a live
//! connection, like Go's `Write`.
//!
//! A transport failure is only noticed while a read or write is in flight on it, so every test
//! that kills a connection has a read or write running on it (or starts one afterwards).
//! "Blocks" is proven deterministically: with paused time the runtime advances the clock only
//! when every task is idle, so a one-hour `timeout` that fires proves the future cannot make
//! progress. The same trick proves that no further reconnector call is coming
//! (`timeout(HOUR, rc.wait_calls(n + 1))` fires).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use backedpipe::{BackedPipe, Error, PipeConfig, PipeState};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::timeout;

type Pipe = BackedPipe<KillableConn>;

/// A pipe over a [`MockReconnector`], not yet connected.
fn new_pipe() -> (Arc<Pipe>, MockReconnector, UnboundedReceiver<Dialled>) {
    let (rc, dialled) = MockReconnector::new();
    let pipe = Arc::new(BackedPipe::new(rc.clone()).unwrap());
    (pipe, rc, dialled)
}

/// A connected pipe and its first connection.
async fn connected_pipe() -> (
    Arc<Pipe>,
    MockReconnector,
    UnboundedReceiver<Dialled>,
    Dialled,
) {
    let (pipe, rc, mut dialled) = new_pipe();
    pipe.connect().await.unwrap();
    let d = dialled.recv().await.unwrap();
    (pipe, rc, dialled, d)
}

/// A passive pipe (no reconnector).
fn passive_pipe() -> Arc<Pipe> {
    Arc::new(Pipe::passive(PipeConfig::default()).unwrap())
}

fn spawn_write(pipe: &Arc<Pipe>, data: &'static [u8]) -> JoinHandle<Result<usize, Error>> {
    let pipe = pipe.clone();
    tokio::spawn(async move { pipe.write(data).await })
}

/// Spawns one read of up to `max` bytes and returns what it read.
fn spawn_read(pipe: &Arc<Pipe>, max: usize) -> JoinHandle<Result<Vec<u8>, Error>> {
    let pipe = pipe.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; max];
        let n = pipe.read(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    })
}

async fn read_exactly(peer: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    peer.read_exact(&mut buf).await.unwrap();
    buf
}

/// Everything the far end still receives until the pipe drops the connection.
async fn read_rest(peer: &mut DuplexStream) -> Vec<u8> {
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).await.unwrap();
    rest
}

/// P-1: a new pipe is not connected and has not called the reconnector.
#[tokio::test(start_paused = true)]
async fn p01_new_pipe_is_not_connected() {
    guarded(async {
        let (pipe, rc, _dialled) = new_pipe();
        assert!(!pipe.connected());
        assert!(matches!(pipe.state(), PipeState::Disconnected));
        assert_eq!(rc.calls(), 0);
    })
    .await;
}

/// P-2: connect calls the reconnector exactly once, and the pipe is then connected.
#[tokio::test(start_paused = true)]
async fn p02_connect_calls_reconnector_once() {
    guarded(async {
        let (pipe, rc, mut dialled) = new_pipe();
        pipe.connect().await.unwrap();
        assert!(pipe.connected());
        assert!(matches!(pipe.state(), PipeState::Connected));
        assert_eq!(dialled.recv().await.unwrap().reader_seq, 0);
        assert!(timeout(HOUR, rc.wait_calls(2)).await.is_err());
        assert_eq!(rc.calls(), 1);
    })
    .await;
}

/// P-3: connect while connected fails with `PipeAlreadyConnected` (no reconnector call).
#[tokio::test(start_paused = true)]
async fn p03_connect_while_connected_fails() {
    guarded(async {
        let (pipe, rc, _dialled, _d) = connected_pipe().await;
        let err = pipe.connect().await.unwrap_err();
        assert!(matches!(err, Error::PipeAlreadyConnected), "{err:?}");
        assert_eq!(rc.calls(), 1);
        assert!(pipe.connected());
    })
    .await;
}

/// P-4: connect after close fails with `PipeClosed`.
#[tokio::test(start_paused = true)]
async fn p04_connect_after_close_fails() {
    guarded(async {
        let (pipe, rc, _dialled) = new_pipe();
        pipe.close().await.unwrap();
        let err = pipe.connect().await.unwrap_err();
        assert!(matches!(err, Error::PipeClosed), "{err:?}");
        assert_eq!(rc.calls(), 0);
    })
    .await;
}

/// P-5: round trip: write returns the length and the bytes appear on the connection; bytes put
/// into the connection come back from read.
#[tokio::test(start_paused = true)]
async fn p05_round_trip() {
    guarded(async {
        let (pipe, _rc, _dialled, mut d) = connected_pipe().await;
        assert_eq!(pipe.write(b"hello pipe").await.unwrap(), 10);
        assert_eq!(read_exactly(&mut d.peer, 10).await, b"hello pipe");
        d.peer.write_all(b"hello back").await.unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(pipe.read(&mut buf).await.unwrap(), 10);
        assert_eq!(&buf, b"hello back");
        assert_eq!(pipe.writer_sequence_num(), 10);
        assert_eq!(pipe.reader_sequence_num(), 10);
    })
    .await;
}

/// P-6: a write before connect blocks; the bytes are not taken into the stream while blocked
/// (sequence number and replay buffer stay empty). connect releases it, the write returns its
/// length, and the bytes reach the connection exactly once.
#[tokio::test(start_paused = true)]
async fn p06_write_before_connect_blocks_until_connect() {
    guarded(async {
        let (pipe, _rc, mut dialled) = new_pipe();
        let mut write = spawn_write(&pipe, b"early bytes");
        assert!(
            timeout(HOUR, &mut write).await.is_err(),
            "write did not block"
        );
        assert_eq!(pipe.writer_sequence_num(), 0);
        assert_eq!(pipe.buffered().0, 0);

        pipe.connect().await.unwrap();
        assert_eq!(write.await.unwrap().unwrap(), 11);
        let mut d = dialled.recv().await.unwrap();
        assert_eq!(read_exactly(&mut d.peer, 11).await, b"early bytes");
        pipe.close().await.unwrap();
        assert!(read_rest(&mut d.peer).await.is_empty(), "bytes sent twice");
    })
    .await;
}

/// P-7: a read before any connection blocks, and close releases it with end-of-stream.
#[tokio::test(start_paused = true)]
async fn p07_read_before_connect_blocks_until_close() {
    guarded(async {
        let (pipe, _rc, _dialled) = new_pipe();
        let mut read = spawn_read(&pipe, 16);
        assert!(
            timeout(HOUR, &mut read).await.is_err(),
            "read did not block"
        );
        pipe.close().await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b"");
    })
    .await;
}

/// P-8: automatic reconnect after a failure. conn1 dies; the next write detects it and the pipe
/// reconnects by itself. The remote offset is 17, so conn2 gets exactly "***trigger failure "
/// (the tail of the earlier write plus the failed write). The failing write returns only after
/// the reconnection, and later writes append.
///
/// Difference from Go: the Go mock fails conn1's reads too, but nobody reads in the Go test
/// either; here the write alone detects the failure.
#[tokio::test(start_paused = true)]
async fn p08_automatic_reconnect_replays_from_remote_offset() {
    guarded(async {
        let (pipe, rc, mut dialled, mut d1) = connected_pipe().await;
        pipe.write(b"some data written***").await.unwrap();
        assert_eq!(
            read_exactly(&mut d1.peer, 20).await,
            b"some data written***"
        );

        let gate = Gate::new();
        rc.then(Answer::Gated(gate.clone(), 17));
        d1.killer.kill();
        let mut write = spawn_write(&pipe, b"trigger failure ");
        rc.wait_calls(2).await;
        assert!(
            timeout(HOUR, &mut write).await.is_err(),
            "failing write returned before the reconnection"
        );
        assert!(!pipe.connected());
        gate.open();
        assert_eq!(write.await.unwrap().unwrap(), 16);
        assert!(pipe.connected());

        let mut d2 = dialled.recv().await.unwrap();
        assert_eq!(d2.reader_seq, 0);
        assert_eq!(read_exactly(&mut d2.peer, 19).await, b"***trigger failure ");
        pipe.write(b"later").await.unwrap();
        assert_eq!(read_exactly(&mut d2.peer, 5).await, b"later");
        assert_eq!(rc.calls(), 2);
        pipe.close().await.unwrap();
        assert!(read_rest(&mut d2.peer).await.is_empty());
    })
    .await;
}

/// P-9: close closes the underlying connection (the far end sees end-of-stream); read after
/// close gives end-of-stream and write gives `PipeClosed` (Go: `io.EOF`).
#[tokio::test(start_paused = true)]
async fn p09_close_closes_conn_and_ends_io() {
    guarded(async {
        let (pipe, _rc, _dialled, mut d) = connected_pipe().await;
        pipe.close().await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(d.peer.read(&mut buf).await.unwrap(), 0, "conn not closed");
        assert!(d.peer.write_all(b"x").await.is_err(), "conn not closed");
        assert_eq!(pipe.read(&mut buf).await.unwrap(), 0);
        let err = pipe.write(b"x").await.unwrap_err();
        assert!(matches!(err, Error::PipeClosed), "{err:?}");
        assert!(!pipe.connected());
    })
    .await;
}

/// P-10: close is idempotent.
#[tokio::test(start_paused = true)]
async fn p10_close_is_idempotent() {
    guarded(async {
        let (pipe, _rc, _dialled, _d) = connected_pipe().await;
        pipe.close().await.unwrap();
        pipe.close().await.unwrap();
        assert!(matches!(pipe.state(), PipeState::Closed));
    })
    .await;
}

/// P-11: a reconnector error during connect gives `ReconnectFailed` carrying the reconnector's
/// error; the pipe stays disconnected (and, never having been connected, does not retry).
#[tokio::test(start_paused = true)]
async fn p11_reconnector_error_on_connect() {
    guarded(async {
        let (pipe, rc, _dialled) = new_pipe();
        rc.then(Answer::Fail("dial refused"));
        let err = pipe.connect().await.unwrap_err();
        let Error::ReconnectFailed(source) = &err else {
            panic!("expected ReconnectFailed, got {err:?}");
        };
        assert_eq!(source.to_string(), "dial refused");
        assert!(!pipe.connected());
        assert!(matches!(pipe.state(), PipeState::Disconnected));
        assert!(timeout(HOUR, rc.wait_calls(2)).await.is_err(), "it retried");
        assert_eq!(rc.calls(), 1);
    })
    .await;
}

/// P-12: force_reconnect swaps in a fresh connection (reconnector call 2). The remote offset
/// equals all bytes written (9), so nothing is replayed; later reads and writes use conn2, and
/// conn1 is closed without receiving anything more.
#[tokio::test(start_paused = true)]
async fn p12_force_reconnect_swaps_connection() {
    guarded(async {
        let (pipe, rc, mut dialled, mut d1) = connected_pipe().await;
        pipe.write(b"123456789").await.unwrap();
        assert_eq!(read_exactly(&mut d1.peer, 9).await, b"123456789");

        rc.then(Answer::Connect(9));
        pipe.force_reconnect().await.unwrap();
        assert_eq!(rc.calls(), 2);
        assert!(pipe.connected());
        let mut d2 = dialled.recv().await.unwrap();
        assert!(read_rest(&mut d1.peer).await.is_empty(), "conn1 still used");

        pipe.write(b"next").await.unwrap();
        assert_eq!(
            read_exactly(&mut d2.peer, 4).await,
            b"next",
            "bytes replayed"
        );
        d2.peer.write_all(b"from2").await.unwrap();
        let mut buf = [0u8; 5];
        assert_eq!(pipe.read(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf, b"from2");
    })
    .await;
}

/// P-13: force_reconnect on a closed pipe returns `PipeClosed` (Go: `io.EOF`).
#[tokio::test(start_paused = true)]
async fn p13_force_reconnect_after_close() {
    guarded(async {
        let (pipe, rc, _dialled, _d) = connected_pipe().await;
        pipe.close().await.unwrap();
        let err = pipe.force_reconnect().await.unwrap_err();
        assert!(matches!(err, Error::PipeClosed), "{err:?}");
        assert_eq!(rc.calls(), 1);
    })
    .await;
}

/// P-14: full lifecycle: disconnected, connect (1 call), automatic reconnect after a failure (2),
/// force_reconnect (3), close (not connected); then connect gives `PipeClosed` and
/// force_reconnect gives `PipeClosed` (Go: `io.EOF`).
#[tokio::test(start_paused = true)]
async fn p14_full_lifecycle() {
    guarded(async {
        let (pipe, rc, mut dialled) = new_pipe();
        assert!(!pipe.connected());
        assert_eq!(rc.calls(), 0);

        pipe.connect().await.unwrap();
        assert!(pipe.connected());
        assert_eq!(rc.calls(), 1);
        let mut d1 = dialled.recv().await.unwrap();

        d1.killer.kill();
        rc.otherwise(Some(0));
        assert_eq!(pipe.write(b"abc").await.unwrap(), 3);
        assert_eq!(rc.calls(), 2);
        assert!(pipe.connected());
        let mut d2 = dialled.recv().await.unwrap();
        assert_eq!(read_exactly(&mut d2.peer, 3).await, b"abc");
        assert!(read_rest(&mut d1.peer).await.is_empty());

        rc.then(Answer::Connect(3));
        pipe.force_reconnect().await.unwrap();
        assert_eq!(rc.calls(), 3);
        assert!(pipe.connected());

        pipe.close().await.unwrap();
        assert!(!pipe.connected());
        assert!(matches!(pipe.connect().await, Err(Error::PipeClosed)));
        assert!(matches!(
            pipe.force_reconnect().await,
            Err(Error::PipeClosed)
        ));
        assert_eq!(rc.calls(), 3);
    })
    .await;
}

/// P-15 [C]: two concurrent writes in flight on the same connection when it fails cause exactly
/// one reconnection (2 reconnector calls, generation +1); both writes complete and their bytes
/// reach conn2 exactly once, each contiguous.
///
/// Difference from Go: in Go both writes get an error and send an event with the same
/// generation, which the pipe deduplicates. Here the writer reports at most one failure per
/// connection (the first write to see it detaches the transport; the other then just waits), so
/// the dedup happens earlier; the pipe-level outcome asserted is the same.
#[tokio::test(start_paused = true)]
async fn p15_concurrent_write_failures_cause_one_reconnection() {
    guarded(async {
        let (pipe, rc, mut dialled, d1) = connected_pipe().await;
        // Fill conn1 (1 MiB buffer, peer not reading) so the next writes stay in flight on it.
        let fill = vec![b'.'; 1 << 20];
        pipe.write(&fill).await.unwrap();
        let mut wa = spawn_write(&pipe, b"AAAA");
        let mut wb = spawn_write(&pipe, b"BBBB");
        assert!(timeout(HOUR, &mut wa).await.is_err());
        assert!(timeout(HOUR, &mut wb).await.is_err());
        let generation = pipe.generation();

        // The peer had read the fill before the connection died.
        rc.then(Answer::Connect(1 << 20));
        d1.killer.kill();
        assert_eq!(wa.await.unwrap().unwrap(), 4);
        assert_eq!(wb.await.unwrap().unwrap(), 4);
        assert!(
            timeout(HOUR, rc.wait_calls(3)).await.is_err(),
            "second reconnection"
        );
        assert_eq!(rc.calls(), 2);
        assert_eq!(pipe.generation(), generation + 1);
        assert!(pipe.connected());

        let mut d2 = dialled.recv().await.unwrap();
        pipe.close().await.unwrap();
        let got = read_rest(&mut d2.peer).await;
        assert!(got == b"AAAABBBB" || got == b"BBBBAAAA", "{got:?}");
    })
    .await;
}

/// P-16 [C]: single flight: three force_reconnect calls made while the leader's reconnector call
/// is blocked produce exactly one reconnector call (2 in total) and all three succeed.
///
/// force_reconnect registers its request when called, before its future is polled, so calling
/// it for the followers after `wait_calls(2)` (the leader is inside the gated reconnector) and
/// before opening the gate proves they joined while the leader was blocked. Had a follower
/// started its own flight, it would have answered only after a third call. (This test found a
/// race: a request sent just before the reconnector returned could miss the flight and start a
/// second one; the supervisor now drains queued requests when a reconnect finishes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p16_single_flight_force_reconnect() {
    guarded_rt(async {
        let (pipe, rc, mut dialled, _d1) = connected_pipe().await;
        let generation = pipe.generation();
        let gate = Gate::new();
        rc.then(Answer::Gated(gate.clone(), 0));

        let leader = tokio::spawn(pipe.force_reconnect());
        rc.wait_calls(2).await;
        gate.reached().await;
        let follower1 = tokio::spawn(pipe.force_reconnect());
        let follower2 = tokio::spawn(pipe.force_reconnect());
        assert!(!gate.is_open());
        gate.open();

        for task in [leader, follower1, follower2] {
            task.await.unwrap().unwrap();
        }
        assert_eq!(rc.calls(), 2);
        assert_eq!(pipe.generation(), generation + 1);
        assert!(pipe.connected());
        dialled.recv().await.unwrap();
        assert!(dialled.try_recv().is_err(), "more than one new connection");
    })
    .await;
}

/// P-17 [C]: a read and a write (the write in a background task), both in flight on one
/// connection when it fails, cause one reconnection (generation +1, 2 calls); the pipe ends
/// connected and both operations then complete over conn2.
///
/// Both tasks are proven parked on conn1 before it dies (the write because conn1's buffer is
/// full), so both see the failure; their two reports carry the same generation and only one
/// reconnection follows.
#[tokio::test(start_paused = true)]
async fn p17_read_and_write_failures_cause_one_reconnection() {
    guarded(async {
        let (pipe, rc, mut dialled, d1) = connected_pipe().await;
        let generation = pipe.generation();
        // Fill conn1 (1 MiB buffer, peer not reading) so the background write stays in flight on it.
        pipe.write(&vec![b'.'; 1 << 20]).await.unwrap();
        let mut read = spawn_read(&pipe, 16);
        let mut write = spawn_write(&pipe, b"bg");
        assert!(
            timeout(HOUR, &mut read).await.is_err(),
            "read not parked on conn1"
        );
        assert!(
            timeout(HOUR, &mut write).await.is_err(),
            "write not parked on conn1"
        );

        // The peer had read the fill before the connection died.
        rc.then(Answer::Connect(1 << 20));
        d1.killer.kill();
        let mut d2 = dialled.recv().await.unwrap();
        assert_eq!(write.await.unwrap().unwrap(), 2);
        assert_eq!(read_exactly(&mut d2.peer, 2).await, b"bg");
        d2.peer.write_all(b"data2").await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b"data2");

        assert!(
            timeout(HOUR, rc.wait_calls(3)).await.is_err(),
            "second reconnection"
        );
        assert_eq!(rc.calls(), 2);
        assert_eq!(pipe.generation(), generation + 1);
        assert!(pipe.connected());
    })
    .await;
}

/// P-18: force_reconnect on a never-connected pipe behaves like connect (one call), and I/O then
/// works.
#[tokio::test(start_paused = true)]
async fn p18_force_reconnect_on_new_pipe_connects() {
    guarded(async {
        let (pipe, rc, mut dialled) = new_pipe();
        pipe.force_reconnect().await.unwrap();
        assert_eq!(rc.calls(), 1);
        assert!(pipe.connected());
        let mut d = dialled.recv().await.unwrap();
        pipe.write(b"ping").await.unwrap();
        assert_eq!(read_exactly(&mut d.peer, 4).await, b"ping");
        d.peer.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        pipe.read(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    })
    .await;
}

/// P-19: end-of-stream on read reconnects transparently. The first read returns "world"; the
/// next read does not return end-of-stream but "newdata" from conn2. The remote offset is 5, so
/// "hello" is not replayed; the reconnector ran twice (the second time told our reader offset,
/// 5); new writes go only to conn2.
#[tokio::test(start_paused = true)]
async fn p19_eof_on_read_reconnects_transparently() {
    guarded(async {
        let (pipe, rc, mut dialled, mut d1) = connected_pipe().await;
        pipe.write(b"hello").await.unwrap();
        assert_eq!(read_exactly(&mut d1.peer, 5).await, b"hello");
        d1.peer.write_all(b"world").await.unwrap();
        let mut buf = [0u8; 5];
        assert_eq!(pipe.read(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf, b"world");

        rc.then(Answer::Connect(5));
        let mut read = spawn_read(&pipe, 16);
        assert!(timeout(HOUR, &mut read).await.is_err());
        d1.peer.shutdown().await.unwrap(); // conn1 now reads end-of-stream

        let mut d2 = dialled.recv().await.unwrap();
        assert_eq!(d2.reader_seq, 5);
        d2.peer.write_all(b"newdata").await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b"newdata");
        assert_eq!(rc.calls(), 2);

        pipe.write(b"aftereof").await.unwrap();
        assert_eq!(read_exactly(&mut d2.peer, 8).await, b"aftereof", "replayed");
        assert!(read_rest(&mut d1.peer).await.is_empty(), "conn1 still used");
    })
    .await;
}

/// P-20 (goleak): once every pipe is closed, no task of theirs remains: the background task
/// exits on close, including when close interrupts a reconnector call that never returns.
///
/// The test doubles of `common` spawn helper tasks only when a `KillableConn` is polled while it
/// has nothing to give; this test keeps every read and write immediately ready (data is in the
/// connection before each read), so any task still alive belongs to the pipes.
#[tokio::test(start_paused = true)]
async fn p20_close_leaves_no_tasks() {
    guarded(async {
        let metrics = tokio::runtime::Handle::current().metrics();
        let baseline = metrics.num_alive_tasks();

        // Never connected.
        let (idle, _rc0, _dialled0) = new_pipe();
        // Connected, with traffic both ways.
        let (busy, _rc1, _dialled1, mut d) = connected_pipe().await;
        busy.write(b"out").await.unwrap();
        assert_eq!(read_exactly(&mut d.peer, 3).await, b"out");
        d.peer.write_all(b"in").await.unwrap();
        let mut buf = [0u8; 2];
        busy.read(&mut buf).await.unwrap();
        // Stuck in a reconnector call that never returns.
        let (stuck, rc2, _dialled2) = new_pipe();
        rc2.then(Answer::Hang);
        let connect = tokio::spawn(stuck.force_reconnect());
        rc2.wait_calls(1).await;
        // Passive, attached.
        let passive = passive_pipe();
        let (conn, _peer, _killer) = killable(64);
        passive.accept_reconnection(0, conn).await.unwrap();

        assert_eq!(
            metrics.num_alive_tasks(),
            baseline + 5,
            "4 pipes + 1 caller"
        );
        for pipe in [&idle, &busy, &stuck, &passive] {
            pipe.close().await.unwrap();
        }
        assert!(matches!(connect.await.unwrap(), Err(Error::PipeClosed)));
        assert_eq!(metrics.num_alive_tasks(), baseline);
    })
    .await;
}

/// Historical (@0a24f26) [C]: 3 writers × 10 one-byte writes run alongside 2 readers without
/// deadlock; every written byte appears on the connection (each writer's bytes in its order),
/// and the readers together get every byte the peer sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p_hist_concurrent_read_write() {
    guarded_rt(async {
        let (pipe, _rc, _dialled, mut d) = connected_pipe().await;
        // Each reader reports how many bytes it got, so the test knows when all have arrived.
        let (counts_tx, mut counts) = tokio::sync::mpsc::unbounded_channel();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let pipe = pipe.clone();
                let counts = counts_tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4];
                    loop {
                        match pipe.read(&mut buf).await.unwrap() {
                            0 => return got,
                            n => {
                                got.extend_from_slice(&buf[..n]);
                                counts.send(n).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0u8..3)
            .map(|w| {
                let pipe = pipe.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        assert_eq!(pipe.write(&[w * 10 + i]).await.unwrap(), 1);
                    }
                })
            })
            .collect();
        let inbound: Vec<u8> = (100..120).collect();
        d.peer.write_all(&inbound).await.unwrap();

        let mut seen = read_exactly(&mut d.peer, 30).await;
        for w in writers {
            w.await.unwrap();
        }
        // Each writer's bytes arrive in the order written.
        let mut per_writer: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
        for &b in &seen {
            per_writer.entry(b / 10).or_default().push(b);
        }
        for (w, bytes) in per_writer {
            assert_eq!(bytes, (w * 10..w * 10 + 10).collect::<Vec<u8>>());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<u8>>());

        // Wait until the readers have taken every inbound byte, then close to release them.
        let mut total = 0;
        while total < inbound.len() {
            total += counts.recv().await.unwrap();
        }
        assert_eq!(total, inbound.len());
        pipe.close().await.unwrap();
        let mut read_back = Vec::new();
        for r in readers {
            read_back.extend(r.await.unwrap());
        }
        read_back.sort_unstable();
        assert_eq!(read_back, inbound);
    })
    .await;
}

/// Branch-only: a passive pipe (Go: nil reconnector) cannot connect by itself: connect and
/// force_reconnect give `ReconnectFailed` and it stays disconnected.
#[tokio::test(start_paused = true)]
async fn p_branch_passive_connect_fails() {
    guarded(async {
        let pipe = passive_pipe();
        let err = pipe.connect().await.unwrap_err();
        assert!(matches!(err, Error::ReconnectFailed(_)), "{err:?}");
        let err = pipe.force_reconnect().await.unwrap_err();
        assert!(matches!(err, Error::ReconnectFailed(_)), "{err:?}");
        assert!(matches!(pipe.state(), PipeState::Disconnected));
    })
    .await;
}

/// Branch-only: on a passive pipe a transport error only marks it disconnected (no reconnect
/// attempt, no failure); the blocked read waits and completes once a new connection is
/// accepted.
#[tokio::test(start_paused = true)]
async fn p_branch_passive_transport_error_only_disconnects() {
    guarded(async {
        let pipe = passive_pipe();
        let (conn, _peer1, killer) = killable(64);
        pipe.accept_reconnection(0, conn).await.unwrap();
        assert!(pipe.connected());
        let mut read = spawn_read(&pipe, 16);
        assert!(timeout(HOUR, &mut read).await.is_err());

        let mut status = pipe.status();
        killer.kill();
        status
            .wait_for(|s| matches!(s, PipeState::Disconnected))
            .await
            .unwrap();
        assert!(
            timeout(
                HOUR,
                status.wait_for(|s| !matches!(s, PipeState::Disconnected))
            )
            .await
            .is_err(),
            "state left Disconnected by itself"
        );
        assert!(timeout(HOUR, &mut read).await.is_err(), "read gave up");

        let (conn, mut peer2, _killer2) = killable(64);
        peer2.write_all(b"again").await.unwrap();
        pipe.accept_reconnection(0, conn).await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b"again");
        assert!(pipe.connected());
    })
    .await;
}

/// Branch-only: accept_reconnection attaches a peer-opened connection and replays from the
/// peer's reader offset; it replaces a live connection (the old one is closed) and bumps the
/// generation.
#[tokio::test(start_paused = true)]
async fn p_branch_accept_reconnection_replays_and_replaces() {
    guarded(async {
        let pipe = passive_pipe();
        let (conn1, mut peer1, _k1) = killable(64);
        pipe.accept_reconnection(0, conn1).await.unwrap();
        let generation = pipe.generation();
        pipe.write(b"hello world").await.unwrap();
        assert_eq!(read_exactly(&mut peer1, 11).await, b"hello world");

        // The peer got only "hello " before it lost conn1; conn1 is still live here.
        let (conn2, mut peer2, _k2) = killable(64);
        pipe.accept_reconnection(6, conn2).await.unwrap();
        assert_eq!(pipe.generation(), generation + 1);
        assert!(
            read_rest(&mut peer1).await.is_empty(),
            "old conn not closed"
        );
        assert_eq!(read_exactly(&mut peer2, 5).await, b"world");
        pipe.write(b"!").await.unwrap();
        assert_eq!(read_exactly(&mut peer2, 1).await, b"!");
        peer2.write_all(b"in").await.unwrap();
        let mut buf = [0u8; 2];
        pipe.read(&mut buf).await.unwrap();
        assert_eq!(&buf, b"in");
    })
    .await;
}

/// Branch-only: accept_reconnection refuses a peer claiming more bytes than were written
/// (`InvalidSequenceNumber`), and refuses after close (`PipeClosed`).
#[tokio::test(start_paused = true)]
async fn p_branch_accept_reconnection_errors() {
    guarded(async {
        let pipe = passive_pipe();
        let (conn, _peer, _k) = killable(64);
        let err = pipe.accept_reconnection(1, conn).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidSequenceNumber {
                    remote: 1,
                    local: 0
                }
            ),
            "{err:?}"
        );

        let pipe = passive_pipe();
        pipe.close().await.unwrap();
        let (conn, _peer, _k) = killable(64);
        let err = pipe.accept_reconnection(0, conn).await.unwrap_err();
        assert!(matches!(err, Error::PipeClosed), "{err:?}");
    })
    .await;
}

/// Branch-only (Go: the disconnected callback): `status()` observes the connected, disconnected
/// and closed transitions, including the connected → disconnected one caused by a transport
/// failure.
#[tokio::test(start_paused = true)]
async fn p_branch_status_reports_transitions() {
    guarded(async {
        let pipe = passive_pipe();
        let mut status = pipe.status();
        assert!(matches!(
            *status.borrow_and_update(),
            PipeState::Disconnected
        ));

        let (conn, _peer, killer) = killable(64);
        pipe.accept_reconnection(0, conn).await.unwrap();
        assert!(status.has_changed().unwrap());
        assert!(matches!(*status.borrow_and_update(), PipeState::Connected));

        let read = spawn_read(&pipe, 8);
        killer.kill();
        status.changed().await.unwrap();
        assert!(matches!(
            *status.borrow_and_update(),
            PipeState::Disconnected
        ));

        pipe.close().await.unwrap();
        assert!(status.has_changed().unwrap());
        assert!(matches!(*status.borrow_and_update(), PipeState::Closed));
        assert_eq!(read.await.unwrap().unwrap(), b"");
    })
    .await;
}

/// Branch-only: `status()` also shows an automatic reconnect in progress and its end.
#[tokio::test(start_paused = true)]
async fn p_branch_status_reports_reconnecting() {
    guarded(async {
        let (pipe, rc, _dialled, d1) = connected_pipe().await;
        let mut status = pipe.status();
        assert!(matches!(*status.borrow_and_update(), PipeState::Connected));
        let gate = Gate::new();
        rc.then(Answer::Gated(gate.clone(), 0));
        let _read = spawn_read(&pipe, 8);
        d1.killer.kill();
        status
            .wait_for(|s| matches!(s, PipeState::Reconnecting))
            .await
            .unwrap();
        gate.open();
        status
            .wait_for(|s| matches!(s, PipeState::Connected))
            .await
            .unwrap();
        assert_eq!(rc.calls(), 2);
    })
    .await;
}

/// Branch-only: `reader_sequence_num()` counts the bytes read from the peer, and is the offset
/// handed to the reconnector on the next reconnect.
#[tokio::test(start_paused = true)]
async fn p_branch_reader_sequence_num() {
    guarded(async {
        let (pipe, _rc, mut dialled, mut d1) = connected_pipe().await;
        assert_eq!(pipe.reader_sequence_num(), 0);
        d1.peer.write_all(b"abcdefg").await.unwrap();
        let mut buf = [0u8; 3];
        pipe.read(&mut buf).await.unwrap();
        assert_eq!(pipe.reader_sequence_num(), 3);
        let mut buf = [0u8; 4];
        pipe.read(&mut buf).await.unwrap();
        assert_eq!(pipe.reader_sequence_num(), 7);
        pipe.force_reconnect().await.unwrap();
        assert_eq!(dialled.recv().await.unwrap().reader_seq, 7);
    })
    .await;
}

/// Branch-only: once the pipe is closed, reads return end-of-stream, through `read`, through
/// `AsyncRead` and through the read half of `into_split`.
#[tokio::test(start_paused = true)]
async fn p_branch_read_returns_eof_once_closed() {
    guarded(async {
        let (rc, _dialled) = MockReconnector::new();
        let mut pipe = BackedPipe::new(rc).unwrap();
        pipe.connect().await.unwrap();
        pipe.close().await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(pipe.read(&mut buf).await.unwrap(), 0);
        let mut all = Vec::new();
        assert_eq!(
            AsyncReadExt::read_to_end(&mut pipe, &mut all)
                .await
                .unwrap(),
            0
        );
        let (mut read_half, _write_half) = pipe.into_split();
        assert_eq!(read_half.read(&mut buf).await.unwrap(), 0);
    })
    .await;
}
