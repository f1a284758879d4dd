//! `bpbench`: measures backedpipe against the physical limit (raw TCP) in the same process,
//! interleaved, and prints medians. See DESIGN §6 and docs/BENCHMARKS.md.

#![warn(missing_docs)]

mod pin;
mod rig;
mod scale;
mod session;
mod stats;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use rig::Rig;
use session::SessionRig;
use stats::{median, ratio_median, Usage};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks backedpipe against raw TCP in the same process"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
    /// Print exactly one JSON line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Wire mode of the pipe.
    #[arg(long, global = true, value_enum, default_value_t = Mode::Session)]
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The framed session protocol (acks, heartbeats, authenticated resume): a `Session`
    /// client over a `TcpConnector`, a `SessionServer` accepting.
    Session,
    /// The Go-compatible raw byte stream.
    Raw,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Session => "session",
            Mode::Raw => "raw",
        }
    }
}

#[derive(Subcommand)]
enum Bench {
    /// One direction over loopback, 64 KiB writes: raw TCP vs the pipe, interleaved pairs.
    Throughput {
        /// Bytes per run.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Interleaved (raw, pipe) pairs after one warm-up pair.
        #[arg(long, default_value_t = 9)]
        pairs: usize,
        /// CPUs the process may use (1 pins every thread to one CPU, the stable measure).
        #[arg(long, default_value_t = 1)]
        cpus: usize,
        /// Replay-buffer capacity of each pipe (in session mode, the most unacknowledged bytes).
        #[arg(long, default_value_t = backedpipe::DEFAULT_BUFFER_SIZE)]
        capacity: usize,
        /// Session mode: acknowledge every this many delivered bytes instead of the library's
        /// default (64 KiB), to see what acknowledgements cost.
        #[arg(long)]
        ack_every: Option<u64>,
    },
    /// Reconnect latency: a bare TCP connect plus an 8-byte round trip vs a pipe cut while
    /// idle until a small message is delivered; and the first byte after a cut mid-transfer.
    Reconnect {
        /// Samples of each kind.
        #[arg(long, default_value_t = 51)]
        samples: usize,
    },
    /// Resident memory per idle connected pipe pair.
    Memory {
        /// Pairs to hold open.
        #[arg(long, default_value_t = 1000)]
        pairs: usize,
    },
    /// One server holding many idle sessions (the client ends in a child process): its RSS,
    /// then a share of them cut at once and the time until every one has resumed and delivered.
    Scale {
        /// Session pairs to hold connected.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Sessions cut at the same instant.
        #[arg(long, default_value_t = 1000)]
        cut: usize,
        /// The server's listen backlog. The default, 128, is what `tokio::net::TcpListener::bind`
        /// uses (through mio), and with it the immortal agent; the kernel caps it at
        /// net.core.somaxconn.
        #[arg(long, default_value_t = 128)]
        backlog: u32,
    },
    /// The client ends of `scale`, in a process of their own (started by `scale`).
    #[command(hide = true)]
    ScaleClients {
        /// The server's address.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// Sessions to open.
        #[arg(long)]
        sessions: usize,
    },
}

fn main() -> Result<(), BoxError> {
    let cli = Cli::parse();
    let cpus = match cli.bench {
        Bench::Throughput { cpus, .. } => cpus,
        _ => 2,
    };
    if cpus == 1 {
        // Before the runtime starts, so every thread it spawns inherits the mask.
        pin::pin_to_one_cpu()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Bench::ScaleClients { addr, sessions } = cli.bench {
        return runtime.block_on(scale::clients(addr, sessions));
    }
    let mode = cli.mode;
    let report = runtime.block_on(async {
        match cli.bench {
            Bench::Throughput {
                bytes,
                pairs,
                cpus,
                capacity,
                ack_every,
            } => throughput(mode, bytes, pairs, cpus, capacity, ack_every).await,
            Bench::Reconnect { samples } => reconnect(mode, samples).await,
            Bench::Memory { pairs } => memory(mode, pairs).await,
            Bench::Scale {
                sessions,
                cut,
                backlog,
            } => scale::scale(sessions, cut, backlog).await,
            Bench::ScaleClients { .. } => unreachable!("handled above"),
        }
    })?;
    if cli.json {
        println!("{}", report.json);
    } else {
        println!("{}", report.text);
    }
    Ok(())
}

struct Report {
    json: serde_json::Value,
    text: String,
}

async fn throughput(
    mode: Mode,
    bytes: u64,
    pairs: usize,
    cpus: usize,
    capacity: usize,
    ack_every: Option<u64>,
) -> Result<Report, BoxError> {
    let mut raw = Vec::new();
    let mut pipe = Vec::new();
    let (mut raw_usage, mut pipe_usage) = (Vec::new(), Vec::new());
    for i in 0..=pairs {
        let before = Usage::now();
        let r = raw_throughput(bytes).await?;
        let between = Usage::now();
        let p = match mode {
            Mode::Session => session_throughput(bytes, capacity, ack_every).await?,
            Mode::Raw => pipe_throughput(bytes, capacity).await?,
        };
        let (ru, pu) = (between.since(before), Usage::now().since(between));
        eprintln!(
            "pair {i}: raw {r:.0} MB/s, pipe {p:.0} MB/s, ratio {:.3}; user/sys ms, minor faults, voluntary switches: raw {:.0}/{:.0}, {:.0}, {:.0}; pipe {:.0}/{:.0}, {:.0}, {:.0}",
            p / r,
            ru.user_ms,
            ru.sys_ms,
            ru.minflt,
            ru.nvcsw,
            pu.user_ms,
            pu.sys_ms,
            pu.minflt,
            pu.nvcsw
        );
        if i > 0 {
            // Pair 0 warms pages and caches; it is not counted.
            raw.push(r);
            pipe.push(p);
            raw_usage.push(ru);
            pipe_usage.push(pu);
        }
    }
    let ratio = ratio_median(&pipe, &raw);
    let (raw_mb_s, pipe_mb_s) = (median(&raw), median(&pipe));
    let (ru, pu) = (Usage::median(&raw_usage), Usage::median(&pipe_usage));
    Ok(Report {
        json: json!({
            "bench": "throughput", "mode": mode.name(), "bytes": bytes, "cpus": cpus,
            "raw_tcp_mb_s": round(raw_mb_s), "pipe_mb_s": round(pipe_mb_s), "ratio": round3(ratio),
            "raw_user_ms": round(ru.user_ms), "raw_sys_ms": round(ru.sys_ms), "raw_minflt": round(ru.minflt),
            "pipe_user_ms": round(pu.user_ms), "pipe_sys_ms": round(pu.sys_ms), "pipe_minflt": round(pu.minflt),
            "raw_nvcsw": round(ru.nvcsw), "pipe_nvcsw": round(pu.nvcsw),
        }),
        text: format!(
            "throughput ({} mode, {cpus} cpu, {bytes} bytes, {pairs} pairs): raw TCP {raw_mb_s:.0} MB/s, pipe {pipe_mb_s:.0} MB/s, ratio {ratio:.3}\n\
             per run (medians, the whole process, setup and teardown included): raw TCP {:.0} ms user, {:.0} ms sys, {:.0} minor faults, {:.0} voluntary switches; pipe {:.0} ms user, {:.0} ms sys, {:.0} minor faults, {:.0} voluntary switches",
            mode.name(),
            ru.user_ms,
            ru.sys_ms,
            ru.minflt,
            ru.nvcsw,
            pu.user_ms,
            pu.sys_ms,
            pu.minflt,
            pu.nvcsw
        ),
    })
}

/// The writer task of every throughput layout: `bytes` bytes in [`CHUNK`]-sized writes; gives
/// the write half back.
async fn write_bytes<W: AsyncWrite + Unpin>(mut tx: W, bytes: u64) -> std::io::Result<W> {
    let chunk = vec![7u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        tx.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    Ok(tx)
}

/// A writer task and a reader task on a plain TCP connection.
async fn raw_throughput(bytes: u64) -> Result<f64, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (tx, (mut rx, _)) = (client?, accepted?);
    let start = Instant::now();
    let writer = tokio::spawn(write_bytes(tx, bytes));
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < bytes {
            let n = rx.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok::<_, std::io::Error>(got)
    });
    let got = reader.await??;
    let elapsed = start.elapsed();
    drop(writer.await??);
    check_count(got, bytes)?;
    Ok(mb_per_s(bytes, elapsed))
}

/// The same layout through a pair of pipes: the client pipe's write half on a writer task,
/// the server pipe on a reader task.
async fn pipe_throughput(bytes: u64, capacity: usize) -> Result<f64, BoxError> {
    let Rig {
        client,
        server,
        cutter: _,
        accept_task,
    } = Rig::new(capacity).await?;
    let (client_read, tx) = client.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(write_bytes(tx, bytes));
    let reader = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            while got < bytes {
                let n = server.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok::<_, backedpipe::Error>(got)
        })
    };
    let got = reader.await??;
    let elapsed = start.elapsed();
    let tx = writer.await??;
    check_count(got, bytes)?;
    tx.close().await?;
    drop(client_read);
    server.close().await?;
    accept_task.abort();
    Ok(mb_per_s(bytes, elapsed))
}

/// The same layout in session mode: the client session's write half on a writer task, the
/// server session read on a reader task.
async fn session_throughput(
    bytes: u64,
    capacity: usize,
    ack_every: Option<u64>,
) -> Result<f64, BoxError> {
    let rig = SessionRig::with_ack_every(capacity, ack_every).await?;
    let (client_read, tx) = rig.client.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(write_bytes(tx, bytes));
    let reader = {
        let server = rig.server.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            while got < bytes {
                let n = server.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok::<_, backedpipe::Error>(got)
        })
    };
    let got = reader.await??;
    let elapsed = start.elapsed();
    let tx = writer.await??;
    check_count(got, bytes)?;
    drop((tx, client_read));
    rig.server.close().await?;
    rig.accept_task.abort();
    Ok(mb_per_s(bytes, elapsed))
}

fn check_count(got: u64, want: u64) -> Result<(), BoxError> {
    if got == want {
        Ok(())
    } else {
        Err(format!("received {got} bytes, expected {want}").into())
    }
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn round(x: f64) -> f64 {
    x.round()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn reconnect(mode: Mode, samples: usize) -> Result<Report, BoxError> {
    let (echo_addr, echo_task) = echo_server().await?;
    let (bare, pipe, first_byte) = match mode {
        Mode::Raw => reconnect_raw(echo_addr, samples).await?,
        Mode::Session => reconnect_session(echo_addr, samples).await?,
    };
    echo_task.abort();
    let ratio = ratio_median(&pipe, &bare);
    let (bare_us, pipe_us, first_us) = (median(&bare), median(&pipe), median(&first_byte));
    let (first_min, first_max) = min_max(&first_byte);
    Ok(Report {
        json: json!({
            "bench": "reconnect", "mode": mode.name(), "bare_us": round(bare_us), "pipe_us": round(pipe_us),
            "ratio": round3(ratio), "stream_first_byte_us": round(first_us),
        }),
        text: format!(
            "reconnect ({} mode, {samples} samples): bare connect+RTT {bare_us:.0} us, pipe cut->delivered {pipe_us:.0} us, ratio {ratio:.3}; cut mid-stream -> first byte {first_us:.0} us (range {first_min:.0}-{first_max:.0})",
            mode.name()
        ),
    })
}

/// Samples in microseconds: bare connects, idle reconnects, first bytes after a cut mid-stream.
type ReconnectSamples = (Vec<f64>, Vec<f64>, Vec<f64>);

async fn reconnect_raw(
    echo_addr: std::net::SocketAddr,
    samples: usize,
) -> Result<ReconnectSamples, BoxError> {
    let mut bare = Vec::new();
    let mut pipe = Vec::new();
    let rig = Rig::new(1 << 20).await?;
    for i in 0..=samples {
        let b = bare_connect_round_trip(echo_addr).await?;
        let p = pipe_idle_reconnect(&rig).await?;
        if i > 0 {
            bare.push(b);
            pipe.push(p);
        }
    }
    let mut first_byte = Vec::new();
    for _ in 0..samples.min(21) {
        first_byte.push(stream_first_byte().await?);
    }
    let Rig {
        client,
        server,
        accept_task,
        ..
    } = rig;
    client.close().await?;
    server.close().await?;
    accept_task.abort();
    Ok((bare, pipe, first_byte))
}

async fn reconnect_session(
    echo_addr: std::net::SocketAddr,
    samples: usize,
) -> Result<ReconnectSamples, BoxError> {
    let mut bare = Vec::new();
    let mut pipe = Vec::new();
    let rig = SessionRig::new(1 << 20).await?;
    for i in 0..=samples {
        let b = bare_connect_round_trip(echo_addr).await?;
        let p = session_idle_reconnect(&rig).await?;
        if i > 0 {
            bare.push(b);
            pipe.push(p);
        }
    }
    rig.close().await?;
    let mut first_byte = Vec::new();
    for _ in 0..samples.min(21) {
        first_byte.push(session_stream_first_byte().await?);
    }
    Ok((bare, pipe, first_byte))
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

async fn echo_server() -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 8];
                if conn.read_exact(&mut buf).await.is_ok() {
                    let _ = conn.write_all(&buf).await;
                }
            });
        }
    });
    Ok((addr, task))
}

/// A TCP connect plus one 8-byte round trip, in microseconds.
async fn bare_connect_round_trip(addr: std::net::SocketAddr) -> Result<f64, BoxError> {
    let start = Instant::now();
    let mut conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    conn.write_all(&42u64.to_be_bytes()).await?;
    let mut buf = [0u8; 8];
    conn.read_exact(&mut buf).await?;
    Ok(start.elapsed().as_secs_f64() * 1e6)
}

/// A stream read through `&self`: a raw-mode pipe or a session.
trait SharedRead {
    async fn read(&self, buf: &mut [u8]) -> Result<usize, backedpipe::Error>;
}

impl<C: backedpipe::Io> SharedRead for backedpipe::BackedPipe<C> {
    async fn read(&self, buf: &mut [u8]) -> Result<usize, backedpipe::Error> {
        backedpipe::BackedPipe::read(self, buf).await
    }
}

impl SharedRead for backedpipe::Session {
    async fn read(&self, buf: &mut [u8]) -> Result<usize, backedpipe::Error> {
        backedpipe::Session::read(self, buf).await
    }
}

/// Reads the 8-byte message of a reconnect sample and returns when it had arrived.
async fn read_eight_bytes(stream: &impl SharedRead) -> Result<Instant, backedpipe::Error> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(backedpipe::Error::PipeClosed);
        }
        got += n;
    }
    Ok(Instant::now())
}

/// Cuts an idle connected pair and times until a small message written right after the cut is
/// read on the other side, in microseconds.
async fn pipe_idle_reconnect(rig: &Rig) -> Result<f64, BoxError> {
    let mut status = rig.server.status();
    status
        .wait_for(|s| matches!(s, backedpipe::PipeState::Connected))
        .await?;
    let server = rig.server.clone();
    // The reader is in flight before the cut, as in a live session.
    let reader = tokio::spawn(async move { read_eight_bytes(&*server).await });
    tokio::task::yield_now().await;
    let start = Instant::now();
    rig.cutter.cut();
    rig.client.write(&7u64.to_be_bytes()).await?;
    let delivered = reader.await??;
    Ok(delivered.duration_since(start).as_secs_f64() * 1e6)
}

/// Cuts a pair during a bulk transfer and times until the first byte arrives over the new
/// connection, in microseconds.
async fn stream_first_byte() -> Result<f64, BoxError> {
    let Rig {
        client,
        server,
        cutter,
        accept_task,
    } = Rig::new(8 << 20).await?;
    let (_client_read, mut tx) = client.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![3u8; CHUNK];
        while tx.write_all(&chunk).await.is_ok() {}
    });
    // The receiver is a task on the runtime, as in session mode (see there).
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        // Let the transfer reach full speed.
        let mut got = 0u64;
        while got < 16 << 20 {
            got += server.read(&mut buf).await? as u64;
        }
        let generation = server.generation();
        let start = Instant::now();
        cutter.cut();
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                return Err::<_, BoxError>("pipe closed during the measurement".into());
            }
            if server.generation() != generation {
                break;
            }
        }
        Ok((start.elapsed(), server))
    });
    let (elapsed, server) = receiver.await??;
    writer.abort();
    server.close().await?;
    accept_task.abort();
    Ok(elapsed.as_secs_f64() * 1e6)
}

/// Cuts an idle connected session pair and times until a small message written right after the
/// cut is read on the other side (through the client's authenticated resume), in microseconds.
async fn session_idle_reconnect(rig: &SessionRig) -> Result<f64, BoxError> {
    for mut status in [rig.client.status(), rig.server.status()] {
        status
            .wait_for(|s| matches!(s, backedpipe::PipeState::Connected))
            .await?;
    }
    let server = rig.server.clone();
    // The reader is in flight before the cut, as in a live session.
    let reader = tokio::spawn(async move { read_eight_bytes(&*server).await });
    tokio::task::yield_now().await;
    let start = Instant::now();
    rig.cutter.cut();
    rig.client.write(&7u64.to_be_bytes()).await?;
    let delivered = reader.await??;
    Ok(delivered.duration_since(start).as_secs_f64() * 1e6)
}

/// Cuts a session pair during a bulk transfer and times until the first byte arrives over the
/// resumed connection, in microseconds.
async fn session_stream_first_byte() -> Result<f64, BoxError> {
    let rig = SessionRig::new(backedpipe::DEFAULT_BUFFER_SIZE).await?;
    let (client_read, mut tx) = rig.client.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![3u8; CHUNK];
        while tx.write_all(&chunk).await.is_ok() {}
    });
    let server = rig.server;
    let cutter = rig.cutter;
    // The receiver is a task on the runtime, as the idle sample's reader and the throughput
    // bench's reader are: read on the thread blocked on the whole bench, the first byte would
    // wait for the OS to give that thread (a third one on two CPUs) a CPU that the runtime's
    // workers, busy with the replay and the resumed transfer, are holding.
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        // Let the transfer reach full speed.
        let mut got = 0u64;
        while got < 16 << 20 {
            got += server.read(&mut buf).await? as u64;
        }
        let generation = server.generation();
        let start = Instant::now();
        cutter.cut();
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                return Err::<_, BoxError>("session ended during the measurement".into());
            }
            if server.generation() != generation {
                break;
            }
        }
        Ok((start.elapsed(), server))
    });
    let (elapsed, server) = receiver.await??;
    writer.abort();
    drop(client_read);
    server.close().await?;
    rig.accept_task.abort();
    Ok(elapsed.as_secs_f64() * 1e6)
}

async fn memory(mode: Mode, pairs: usize) -> Result<Report, BoxError> {
    pin::raise_fd_limit(pairs * 3 + 64);
    let per_pair_kib = match mode {
        Mode::Raw => {
            let before = stats::rss_bytes()?;
            let mut rigs = Vec::with_capacity(pairs);
            for _ in 0..pairs {
                rigs.push(Rig::new(backedpipe::DEFAULT_BUFFER_SIZE).await?);
            }
            let after = stats::rss_bytes()?;
            for rig in rigs {
                rig.client.close().await?;
                rig.server.close().await?;
                rig.accept_task.abort();
            }
            per_pair(before, after, pairs)
        }
        Mode::Session => {
            let before = stats::rss_bytes()?;
            let mut rigs = Vec::with_capacity(pairs);
            for _ in 0..pairs {
                rigs.push(SessionRig::new(backedpipe::DEFAULT_BUFFER_SIZE).await?);
            }
            // Idle, but past the handshake's and the first exchange's transient buffers.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = stats::rss_bytes()?;
            for rig in rigs {
                rig.close().await?;
            }
            per_pair(before, after, pairs)
        }
    };
    Ok(Report {
        json: json!({"bench": "memory", "mode": mode.name(), "pairs": pairs, "rss_per_pair_kib": (per_pair_kib * 10.0).round() / 10.0}),
        text: format!(
            "memory ({} mode): {pairs} idle connected pairs, {per_pair_kib:.1} KiB RSS per pair",
            mode.name()
        ),
    })
}

fn per_pair(before: u64, after: u64, pairs: usize) -> f64 {
    after.saturating_sub(before) as f64 / pairs as f64 / 1024.0
}
