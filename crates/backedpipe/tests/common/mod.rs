//! Test doubles shared by the integration tests: transports that fail, stall or record on
//! command, and a reconnector the test drives step by step.
//!
//! Everything here synchronises on events (channels, `Notify`), never on sleeps.

#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use backedpipe::{BoxError, ErrorEvent, Reconnector};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, Notify};

/// Long enough that, with paused time, a timeout firing proves the future is stuck.
pub const HOUR: Duration = Duration::from_secs(3600);

/// Deadline for a whole paused-time test. Virtual time only moves when every task is idle, so
/// this fires only if the test is stuck for good (a broken behaviour then fails instead of
/// hanging); it is far longer than the one-hour proofs a test makes.
pub const STUCK: Duration = Duration::from_secs(1000 * 3600);

/// Runs a paused-time test body, failing if it gets stuck for good.
pub async fn guarded(body: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(STUCK, body)
        .await
        .expect("test stuck: a future that should complete never will");
}

/// Runs a real-time (multi-thread) test body with a generous safety net, so a deadlock fails
/// the test instead of hanging it. It is never used for synchronisation.
pub async fn guarded_rt(body: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("test deadlocked");
}

/// An event channel for a standalone reader or writer.
pub fn events() -> (
    mpsc::UnboundedSender<ErrorEvent>,
    mpsc::UnboundedReceiver<ErrorEvent>,
) {
    mpsc::unbounded_channel()
}

/// A one-shot gate: `wait` until `open`. Also remembers whether anyone reached it.
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicBool,
    reached: AtomicBool,
    notify: Notify,
    reached_notify: Notify,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Gate::default())
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        self.mark_reached();
        loop {
            let notified = self.notify.notified();
            if self.is_open() {
                return;
            }
            notified.await;
        }
    }

    /// Waits until some task has reached the gate.
    pub async fn reached(&self) {
        loop {
            let notified = self.reached_notify.notified();
            if self.reached.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    fn mark_reached(&self) {
        self.reached.store(true, Ordering::SeqCst);
        self.reached_notify.notify_waiters();
    }
}

/// What a [`MockWriter`] does with the next write.
#[derive(Debug, Clone)]
pub enum WriteStep {
    /// Accept everything.
    Accept,
    /// Accept at most n bytes.
    Accept_(usize),
    /// Fail with this message.
    Fail(&'static str),
    /// Accept zero bytes (a short write).
    Zero,
}

/// An `AsyncWrite` that records what it accepts and follows a script; once the script is done
/// it accepts everything. It can be held shut by a [`Gate`].
#[derive(Debug, Clone, Default)]
pub struct MockWriter {
    inner: Arc<Mutex<MockWriterState>>,
}

#[derive(Debug, Default)]
struct MockWriterState {
    data: Vec<u8>,
    script: VecDeque<WriteStep>,
    gate: Option<Arc<Gate>>,
    waiting: Option<Waker>,
    writes: usize,
}

impl MockWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer whose writes follow `script`, then accept everything.
    pub fn scripted(script: impl IntoIterator<Item = WriteStep>) -> Self {
        let w = Self::default();
        w.inner.lock().unwrap().script = script.into_iter().collect();
        w
    }

    /// A writer that fails every write.
    pub fn failing(msg: &'static str) -> Self {
        Self::scripted(std::iter::repeat_n(WriteStep::Fail(msg), 1000))
    }

    /// A writer whose writes stay pending until `gate` opens.
    pub fn gated(gate: Arc<Gate>) -> Self {
        let w = Self::default();
        w.inner.lock().unwrap().gate = Some(gate);
        w
    }

    pub fn data(&self) -> Vec<u8> {
        self.inner.lock().unwrap().data.clone()
    }

    pub fn writes(&self) -> usize {
        self.inner.lock().unwrap().writes
    }
}

impl AsyncWrite for MockWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.inner.lock().unwrap();
        if let Some(gate) = st.gate.clone() {
            if !gate.is_open() {
                gate.mark_reached();
                // Wake the writer when the gate opens.
                let waker = cx.waker().clone();
                tokio::spawn(async move {
                    gate.wait().await;
                    waker.wake();
                });
                return Poll::Pending;
            }
        }
        st.writes += 1;
        let step = st.script.pop_front().unwrap_or(WriteStep::Accept);
        let n = match step {
            WriteStep::Accept => buf.len(),
            WriteStep::Accept_(n) => n.min(buf.len()),
            WriteStep::Fail(msg) => return Poll::Ready(Err(io::Error::other(msg))),
            WriteStep::Zero => 0,
        };
        st.data.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A connection whose transport can be killed from the test: after [`Killer::kill`], pending
/// and later reads and writes fail with `ConnectionReset`. The far end is a plain duplex.
#[derive(Debug)]
pub struct KillableConn {
    inner: DuplexStream,
    killer: Killer,
}

/// Kills a [`KillableConn`].
#[derive(Debug, Clone, Default)]
pub struct Killer {
    killed: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Killer {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    fn poll_killed(&self, cx: &mut Context<'_>) -> bool {
        if self.is_killed() {
            return true;
        }
        let waker = cx.waker().clone();
        let killer = self.clone();
        tokio::spawn(async move {
            let notified = killer.notify.notified();
            if !killer.is_killed() {
                notified.await;
            }
            waker.wake();
        });
        false
    }
}

/// A connection (for the pipe), its far end (for the test) and its kill switch.
pub fn killable(capacity: usize) -> (KillableConn, DuplexStream, Killer) {
    let (ours, theirs) = tokio::io::duplex(capacity);
    let killer = Killer::default();
    (
        KillableConn {
            inner: ours,
            killer: killer.clone(),
        },
        theirs,
        killer,
    )
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "connection killed")
}

impl AsyncRead for KillableConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.killer.is_killed() {
            return Poll::Ready(Err(reset()));
        }
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending if self.killer.poll_killed(cx) => Poll::Ready(Err(reset())),
            other => other,
        }
    }
}

impl AsyncWrite for KillableConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.killer.is_killed() {
            return Poll::Ready(Err(reset()));
        }
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending if self.killer.poll_killed(cx) => Poll::Ready(Err(reset())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One connection handed out by a [`MockReconnector`]: the far end and the kill switch.
#[derive(Debug)]
pub struct Dialled {
    /// The reader sequence number the pipe sent with this call.
    pub reader_seq: u64,
    /// The far end of the connection.
    pub peer: DuplexStream,
    pub killer: Killer,
}

/// What a [`MockReconnector`] call does.
#[derive(Debug)]
pub enum Answer {
    /// Hand out a fresh connection, reporting this remote reader sequence number.
    Connect(u64),
    /// Fail with this message.
    Fail(&'static str),
    /// Wait for the gate, then hand out a connection with this remote sequence number.
    Gated(Arc<Gate>, u64),
    /// Never return.
    Hang,
}

/// A reconnector driven by the test: each call takes the next [`Answer`] (the default answer
/// once the script runs out), and each connection it makes is reported on a channel.
#[derive(Debug, Clone)]
pub struct MockReconnector {
    calls: Arc<AtomicUsize>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
    default_remote_seq: Arc<Mutex<Option<u64>>>,
    dialled: mpsc::UnboundedSender<Dialled>,
    entered: Arc<Notify>,
}

impl MockReconnector {
    /// A reconnector that answers `Connect(0)` unless scripted otherwise; the receiver gets
    /// every connection made.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Dialled>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            MockReconnector {
                calls: Arc::new(AtomicUsize::new(0)),
                answers: Arc::default(),
                default_remote_seq: Arc::new(Mutex::new(Some(0))),
                dialled: tx,
                entered: Arc::new(Notify::new()),
            },
            rx,
        )
    }

    /// Queues the answer to a later call.
    pub fn then(&self, answer: Answer) -> &Self {
        self.answers.lock().unwrap().push_back(answer);
        self
    }

    /// What unscripted calls do: connect with this remote sequence number, or fail if `None`.
    pub fn otherwise(&self, remote_seq: Option<u64>) {
        *self.default_remote_seq.lock().unwrap() = remote_seq;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Waits until the reconnector has been called at least `n` times.
    pub async fn wait_calls(&self, n: usize) {
        loop {
            let notified = self.entered.notified();
            if self.calls() >= n {
                return;
            }
            notified.await;
        }
    }
}

impl Reconnector for MockReconnector {
    type Conn = KillableConn;

    async fn reconnect(&self, reader_seq: u64) -> Result<(KillableConn, u64), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.entered.notify_waiters();
        let answer = self.answers.lock().unwrap().pop_front();
        let answer = answer.unwrap_or_else(|| match *self.default_remote_seq.lock().unwrap() {
            Some(seq) => Answer::Connect(seq),
            None => Answer::Fail("refused"),
        });
        let remote_seq = match answer {
            Answer::Connect(seq) => seq,
            Answer::Fail(msg) => return Err(msg.into()),
            Answer::Gated(gate, seq) => {
                gate.wait().await;
                seq
            }
            Answer::Hang => std::future::pending().await,
        };
        let (conn, peer, killer) = killable(1 << 20);
        let _ = self.dialled.send(Dialled {
            reader_seq,
            peer,
            killer,
        });
        Ok((conn, remote_seq))
    }
}
