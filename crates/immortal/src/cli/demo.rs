//! `immortal demo`: the whole thing in one process, with nothing set up.
//!
//! The "remote host" (an [`Agent`] and a local service) runs on a thread and runtime of its
//! own, as it would in another process, with its logs at warnings only so that the progress
//! bars stay readable. Between the client and the agent sits a [`ChaosProxy`] that the demo
//! tells to reset or black-hole the connection at points spread over the transfer. Both ends
//! send deterministic pseudo-random bytes and hash what they send and what they receive; the
//! demo succeeds only if each side received exactly what the other sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backedpipe::{BoxIo, Connector, PipeState, Session};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::common::{seconds, session_error, session_options, write_all};
use super::CliError;
use crate::chaos::ChaosProxy;
use crate::client::{ApiClient, Carrier, StreamConnector, TlsTrust};
use crate::server::{Agent, AgentConfig};
use crate::token::Token;

/// Show it working: an agent, a local service and a client in one process, data pushed both
/// ways through a connection that is cut again and again, every byte checked.
///
/// The connection between client and agent goes through a proxy that resets it (as a
/// middlebox dropping the flow would) or black-holes it (as a Wi-Fi change would: no reset, the
/// peers notice only by their heartbeats), at points spread over the transfer. Both sides
/// hash what they send and receive; the summary on stdout compares them. Exits 0 only if every
/// byte arrived exactly once.
///
/// Example: immortal demo --mib 256 --cuts 20
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// MiB to send each way.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub mib: u64,
    /// How many times to cut the connection (every third cut is a black hole).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub cuts: u32,
}

/// The heartbeat of both sides: short, so that a black hole is noticed within about 3 s.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The size of each write.
const CHUNK: usize = 64 * 1024;

/// Seeds of the two byte streams, different so that a stream echoed back would not pass.
const CLIENT_SEED: u64 = 0x1111_2222_3333_4444;
const SERVICE_SEED: u64 = 0x5555_6666_7777_8888;

/// If no byte moves for this long, the demo gives up instead of hanging.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// How often the progress bars and the stall check are updated.
const TICK: Duration = Duration::from_millis(100);

/// Runs the demo; fails unless every byte arrived exactly once.
pub async fn run(args: DemoArgs) -> Result<(), CliError> {
    let total = args.mib << 20;
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let token = Token::try_generate().map_err(|err| CliError::Other(err.to_string()))?;
    let mut remote = Remote::start(token.clone(), total, counters.clone()).await?;
    let proxy = ChaosProxy::start(remote.agent)
        .await
        .map_err(|err| other("cannot start the cutting proxy", err))?;
    let api = ApiClient::new(
        proxy.local_addr().to_string().parse()?,
        &token,
        &TlsTrust::None,
    )?;
    let stream = api
        .create_stream(remote.service_port, Some("demo".into()))
        .await?;
    let connector = StreamConnector::new(api, &stream, Carrier::Upgrade);
    let mut gone = connector.gone_signal();
    let opened = Arc::new(AtomicU64::new(0));
    let counting = Counting {
        inner: connector,
        opened: opened.clone(),
    };
    let session = Session::connect(counting, session_options(HEARTBEAT))
        .await
        .map_err(|err| {
            gone.get()
                .map(CliError::from)
                .unwrap_or_else(|| session_error(&err))
        })?;
    let progress = Progress::new(total);
    let cuts = CutCount::default();

    // Each half on a task of its own: a session that is always ready to read or write would
    // otherwise keep the cutter and the progress bars in this task from running.
    let session = Arc::new(session);
    let sending = tokio::spawn({
        let (session, counters) = (session.clone(), counters.clone());
        async move { send(&session, total, &counters.client_sent).await }
    });
    let receiving = tokio::spawn({
        let (session, counters) = (session.clone(), counters.clone());
        async move { receive(&session, &counters.client_received).await }
    });
    let transfer = async {
        let (sent, received) = tokio::join!(sending, receiving);
        let sent = joined(sent)?.map_err(|err| session_error(&err))?;
        let received = joined(received)?.map_err(|err| session_error(&err))?;
        Ok((sent, received))
    };
    let outcome = tokio::select! {
        result = transfer => result,
        reason = gone.wait() => Err(reason.into()),
        () = cut_repeatedly(&proxy, session.status(), total * 2, args.cuts, &cuts) => {
            unreachable_cutter()
        }
        stalled = watch_progress(&counters, &progress, &cuts, &opened) => Err(stalled),
    };
    let (sent_hash, (received, received_hash)) = outcome?;
    // The client has sent its FIN, but the agent may not have it yet (a cut can hold it up):
    // close only once the service has seen the end, or CLOSE could overtake it; and stop the
    // agent only after that.
    let service = remote.report().await;
    let _ = session.close().await;
    remote.stop_now();
    let service = service?;
    progress.update(&counters, &cuts, &opened);
    progress.finish();

    let report = Report {
        mib: args.mib,
        up: Direction {
            sent: total,
            sent_hash,
            received: service.received,
            received_hash: service.received_hash,
        },
        down: Direction {
            sent: total,
            sent_hash: service.sent_hash,
            received,
            received_hash,
        },
        resets: cuts.resets.load(Ordering::Relaxed),
        black_holes: cuts.black_holes.load(Ordering::Relaxed),
        cuts_asked: args.cuts,
        reconnects: reconnects(&opened),
        generation: session.generation(),
        elapsed: started.elapsed(),
    };
    print!("{report}");
    if report.exact() {
        Ok(())
    } else {
        Err(CliError::Other(
            "bytes were lost, altered or duplicated: the hashes or counts differ".into(),
        ))
    }
}

/// A transfer task's result, or why the task itself failed.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> Result<T, CliError> {
    result.map_err(|err| CliError::Other(format!("a transfer task failed: {err}")))
}

/// Never reached: the cutter waits forever once its work is done,
/// so that only the transfer (or a failure) ends the demo.
fn unreachable_cutter<T>() -> Result<T, CliError> {
    Err(CliError::Other(
        "internal error: a helper task ended early".into(),
    ))
}

fn other(what: &str, err: impl std::fmt::Display) -> CliError {
    CliError::Other(format!("{what}: {err}"))
}

/// Bytes moved so far, for the progress bars and the stall check.
#[derive(Debug, Default)]
struct Counters {
    client_sent: AtomicU64,
    client_received: AtomicU64,
    service_sent: AtomicU64,
    service_received: AtomicU64,
}

impl Counters {
    fn sum(&self) -> u64 {
        [
            &self.client_sent,
            &self.client_received,
            &self.service_sent,
            &self.service_received,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Cuts made, by kind.
#[derive(Debug, Default)]
struct CutCount {
    resets: AtomicU64,
    black_holes: AtomicU64,
}

/// The remote host: an agent and a local service on their own thread and runtime.
struct Remote {
    agent: SocketAddr,
    service_port: u16,
    report: oneshot::Receiver<std::io::Result<ServiceReport>>,
    stop: Option<oneshot::Sender<()>>,
}

/// What the service sent and received.
#[derive(Debug)]
struct ServiceReport {
    sent_hash: String,
    received: u64,
    received_hash: String,
}

impl Remote {
    async fn start(token: Token, total: u64, counters: Arc<Counters>) -> Result<Remote, CliError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (report_tx, report) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("immortal-demo-remote".into())
            .spawn(move || remote_host(token, total, counters, ready_tx, report_tx, stop_rx))
            .map_err(|err| other("cannot start the agent's thread", err))?;
        let ready = ready_rx
            .await
            .map_err(|_| CliError::Other("the agent's thread stopped".into()))?;
        let (agent, service_port) = ready.map_err(|err| other("cannot start the agent", err))?;
        Ok(Remote {
            agent,
            service_port,
            report,
            stop: Some(stop),
        })
    }

    /// Waits for the service's report (the agent keeps serving).
    async fn report(&mut self) -> Result<ServiceReport, CliError> {
        match tokio::time::timeout(STALL_LIMIT, &mut self.report).await {
            Ok(Ok(Ok(report))) => Ok(report),
            Ok(Ok(Err(err))) => Err(other("the service failed", err)),
            Ok(Err(_)) => Err(CliError::Other("the agent's thread stopped".into())),
            Err(_) => Err(CliError::Other(
                "the service never saw the end of the client's data".into(),
            )),
        }
    }

    /// Tells the remote host to stop: its runtime ends, dropping the agent and the service.
    /// The thread is not joined (that would block this runtime); it ends by itself.
    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The remote host's thread: binds the service and the agent, reports their addresses, runs
/// both until told to stop.
fn remote_host(
    token: Token,
    total: u64,
    counters: Arc<Counters>,
    ready: oneshot::Sender<std::io::Result<(SocketAddr, u16)>>,
    report: oneshot::Sender<std::io::Result<ServiceReport>>,
    stop: oneshot::Receiver<()>,
) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let quiet = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .finish();
    let _logs = tracing::subscriber::set_default(quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    runtime.block_on(async move {
        let bound = async {
            let service = TcpListener::bind("127.0.0.1:0").await?;
            let mut config = AgentConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), token);
            config.heartbeat = HEARTBEAT;
            let agent = Agent::bind(config).await?;
            std::io::Result::Ok((service, agent))
        };
        let (service, agent) = match bound.await {
            Ok(bound) => bound,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let service_port = service.local_addr().map(|a| a.port()).unwrap_or(0);
        if ready.send(Ok((agent.local_addr(), service_port))).is_err() {
            return;
        }
        let serve = async {
            let (tcp, _) = service.accept().await?;
            tcp.set_nodelay(true)?;
            let (input, output) = tcp.into_split();
            let (sent_hash, (received, received_hash)) = tokio::try_join!(
                pump_pattern(output, total, SERVICE_SEED, &counters.service_sent),
                hash_until_eof(input, &counters.service_received),
            )?;
            Ok(ServiceReport {
                sent_hash,
                received,
                received_hash,
            })
        };
        let reporting = async {
            let _ = report.send(serve.await);
            // Keep the agent serving until the client has closed its side.
            let _ = stop.await;
        };
        tokio::select! {
            result = agent.run() => {
                if let Err(err) = result {
                    tracing::warn!(%err, "the demo's agent stopped");
                }
            }
            () = reporting => {}
        }
    });
}

/// Writes `total` pattern bytes from `seed` to `output`, then shuts it down; returns their
/// SHA-256.
async fn pump_pattern(
    mut output: impl AsyncWrite + Unpin,
    total: u64,
    seed: u64,
    counter: &AtomicU64,
) -> std::io::Result<String> {
    let mut pattern = Pattern(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    output.shutdown().await?;
    Ok(hex::encode(hasher.finalize()))
}

/// Reads `input` to its end; returns the byte count and the SHA-256.
async fn hash_until_eof(
    mut input: impl AsyncRead + Unpin,
    counter: &AtomicU64,
) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut count = 0;
    loop {
        let n = input.read(&mut buf).await?;
        if n == 0 {
            return Ok((count, hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
        count += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The client's sending half: `total` pattern bytes, then FIN.
async fn send(session: &Session, total: u64, counter: &AtomicU64) -> backedpipe::Result<String> {
    let mut pattern = Pattern(CLIENT_SEED);
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        write_all(session, &buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    session.shutdown().await?;
    Ok(hex::encode(hasher.finalize()))
}

/// The client's receiving half: everything until the service's FIN.
async fn receive(session: &Session, counter: &AtomicU64) -> backedpipe::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut count = 0;
    loop {
        let n = session.read(&mut buf).await?;
        if n == 0 {
            return Ok((count, hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
        count += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Deterministic pseudo-random bytes (splitmix64), cheap enough not to slow the transfer.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Cuts the connection `cuts` times, the i-th once the proxy has carried i/(cuts+1) of
/// `total`, each time while the session is connected (so that every cut breaks a live
/// connection); every third cut is a black hole, the others resets. Then waits forever.
async fn cut_repeatedly(
    proxy: &ChaosProxy,
    mut status: watch::Receiver<PipeState>,
    total: u64,
    cuts: u32,
    count: &CutCount,
) {
    for i in 0..u64::from(cuts) {
        let threshold = total * (i + 1) / (u64::from(cuts) + 1);
        proxy.wait_for(|s| s.bytes_total() >= threshold).await;
        loop {
            if status
                .wait_for(|state| matches!(state, PipeState::Connected))
                .await
                .is_err()
            {
                return std::future::pending().await;
            }
            // Mark the current state seen, so that any change after the cut wakes us, even
            // one back to `Connected` that the watch folds into a single update.
            status.borrow_and_update();
            let broken = if i % 3 == 1 {
                proxy.black_hole()
            } else {
                proxy.cut_reset()
            };
            if broken > 0 {
                break;
            }
            // Between connections (the session may not have noticed the last one go yet):
            // try again on the next live one.
            proxy.wait_for(|s| s.live > 0).await;
        }
        let counter = if i % 3 == 1 {
            &count.black_holes
        } else {
            &count.resets
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(cut = i, "cut");
        // Let the session notice before the next cut is considered.
        if status.changed().await.is_err() {
            break;
        }
    }
    std::future::pending().await
}

/// A connector that counts the transports it opens: every one after the first is a
/// reconnect. (Watching the session's state would miss a loss and recovery that happen
/// between two looks.)
struct Counting<C> {
    inner: C,
    opened: Arc<AtomicU64>,
}

impl<C: Connector> Connector for Counting<C> {
    async fn connect(&self) -> std::io::Result<BoxIo> {
        let io = self.inner.connect().await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(io)
    }
}

/// Reconnects so far, from the count of transports opened.
fn reconnects(opened: &AtomicU64) -> u64 {
    opened.load(Ordering::Relaxed).saturating_sub(1)
}

/// Updates the progress bars until no byte has moved for [`STALL_LIMIT`]; returns that failure.
async fn watch_progress(
    counters: &Counters,
    progress: &Progress,
    cuts: &CutCount,
    opened: &AtomicU64,
) -> CliError {
    let mut last_sum = counters.sum();
    let mut last_move = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        progress.update(counters, cuts, opened);
        let sum = counters.sum();
        if sum != last_sum {
            last_sum = sum;
            last_move = Instant::now();
        } else if last_move.elapsed() >= STALL_LIMIT {
            return CliError::Other(format!(
                "the transfer stalled: no byte moved for {}",
                seconds(STALL_LIMIT)
            ));
        }
    }
}

/// The progress bars on stderr (drawn only when stderr is a terminal).
struct Progress {
    _bars: MultiProgress,
    up: ProgressBar,
    down: ProgressBar,
    status: ProgressBar,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix:>17} [{bar:32}] {binary_bytes:>10}/{binary_total_bytes} {binary_bytes_per_sec:>12}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = |prefix: &'static str| {
            let bar = bars.add(ProgressBar::new(total));
            bar.set_style(style.clone());
            bar.set_prefix(prefix);
            bar
        };
        let up = bar("client -> service");
        let down = bar("service -> client");
        let status = bars.add(ProgressBar::new_spinner());
        status.set_style(
            ProgressStyle::with_template("{prefix:>17} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        status.set_prefix("connection");
        Progress {
            _bars: bars,
            up,
            down,
            status,
        }
    }

    fn update(&self, counters: &Counters, cuts: &CutCount, opened: &AtomicU64) {
        self.up
            .set_position(counters.service_received.load(Ordering::Relaxed));
        self.down
            .set_position(counters.client_received.load(Ordering::Relaxed));
        let resets = cuts.resets.load(Ordering::Relaxed);
        let black_holes = cuts.black_holes.load(Ordering::Relaxed);
        self.status.set_message(format!(
            "cut {} ({}, {}), reconnected {}",
            count(resets + black_holes, "time"),
            count(resets, "reset"),
            count(black_holes, "black hole"),
            count(reconnects(opened), "time"),
        ));
    }

    fn finish(&self) {
        self.up.finish();
        self.down.finish();
        self.status.finish_and_clear();
    }
}

/// One direction of the transfer, as both ends saw it.
#[derive(Debug)]
struct Direction {
    sent: u64,
    sent_hash: String,
    received: u64,
    received_hash: String,
}

impl Direction {
    fn exact(&self) -> bool {
        self.sent == self.received && self.sent_hash == self.received_hash
    }
}

/// The demo's outcome, printed as its summary.
#[derive(Debug)]
struct Report {
    mib: u64,
    up: Direction,
    down: Direction,
    resets: u64,
    black_holes: u64,
    cuts_asked: u32,
    reconnects: u64,
    generation: u64,
    elapsed: Duration,
}

impl Report {
    fn exact(&self) -> bool {
        self.up.exact() && self.down.exact()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let direction = |f: &mut std::fmt::Formatter<'_>, name: &str, d: &Direction| {
            let verdict = if d.exact() {
                "SHA-256 equal"
            } else {
                "MISMATCH"
            };
            writeln!(
                f,
                "  {name:<18} {} bytes sent, {} received, {verdict}",
                d.sent, d.received
            )?;
            writeln!(f, "  {:<18} sent     {}", "", d.sent_hash)?;
            writeln!(f, "  {:<18} received {}", "", d.received_hash)
        };
        writeln!(
            f,
            "immortal demo: {} MiB each way through a connection cut {}",
            self.mib,
            count(self.resets + self.black_holes, "time")
        )?;
        direction(f, "client -> service", &self.up)?;
        direction(f, "service -> client", &self.down)?;
        let cuts = self.resets + self.black_holes;
        write!(
            f,
            "  {:<18} {cuts} ({}, {})",
            "cuts",
            count(self.resets, "reset"),
            count(self.black_holes, "black hole")
        )?;
        if cuts < u64::from(self.cuts_asked) {
            write!(f, "; {} asked, the transfer ended first", self.cuts_asked)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  {:<18} {} (connection generation {})",
            "reconnects", self.reconnects, self.generation
        )?;
        write!(f, "  {:<18} {}", "elapsed", seconds(self.elapsed))?;
        if self.black_holes > 0 {
            write!(
                f,
                " (each black hole stalls the stream until the heartbeat notices, about {})",
                seconds(HEARTBEAT * 2 + Duration::from_secs(1))
            )?;
        }
        writeln!(f)?;
        if self.exact() {
            writeln!(f, "every byte arrived exactly once.")
        } else {
            writeln!(f, "FAILED: bytes were lost, altered or duplicated.")
        }
    }
}

/// "1 reset", "3 resets".
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_deterministic_and_differs_by_seed() {
        let (mut a, mut b, mut c) = (Pattern(1), Pattern(1), Pattern(2));
        let (mut x, mut y, mut z) = ([0u8; 21], [0u8; 21], [0u8; 21]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
    }

    #[test]
    fn a_report_with_a_difference_is_not_exact() {
        let same = || Direction {
            sent: 5,
            sent_hash: "h".into(),
            received: 5,
            received_hash: "h".into(),
        };
        let mut report = Report {
            mib: 1,
            up: same(),
            down: same(),
            resets: 2,
            black_holes: 1,
            cuts_asked: 3,
            reconnects: 3,
            generation: 4,
            elapsed: Duration::from_secs(2),
        };
        assert!(report.exact());
        assert!(report
            .to_string()
            .contains("every byte arrived exactly once"));
        report.down.received = 6;
        assert!(!report.exact());
        assert!(report.to_string().contains("MISMATCH"));
    }
}
