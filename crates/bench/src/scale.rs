//! `bpbench scale`: one server holding many idle sessions, and a reconnect storm.
//!
//! The bench process is the agent: one [`SessionServer`] behind one [`SessionListener`] on one
//! TCP listener, with the library's default options. The clients run in a child process
//! (`bpbench scale-clients`, started by the bench): 10,000 pairs need 20,000 sockets, more than
//! a common hard limit on open files (20,000 on the project's guest) allows one unprivileged
//! process, and an agent does not share its process with its clients anyway. Each client is a
//! [`Session`] dialling loopback TCP with the library's default options.
//!
//! 1. `rss_mib`: the server process's resident set (/proc/self/statm) once every session is
//!    connected on both ends and has been idle for 100 ms: the agent's memory, the server ends
//!    only. `client_rss_mib` is the child's, holding the client ends, read at the same moment.
//! 2. `storm_recover_ms`: `--cut` sessions, spread evenly over the N, lose their connections at
//!    the same instant: the server's end of each connection is shut down in both directions
//!    (shutdown(2) on a duplicate of the server's socket, as the reconnect bench does), so both
//!    ends see it end at once, as after a reset. Right after the last shutdown the child is told
//!    to write 8 bytes on every cut client. The figure runs from just before the first shutdown
//!    until, for the last of them, the server has read its 8 bytes and its status is `Connected`
//!    on a new connection. The server end's socket was shut down for reading, so the bytes can
//!    only arrive through the client's resume: delivery proves the client resumed. Everything is
//!    waited on as events (reads, status watches, pipe messages); nothing polls.
//!
//! To find the server's socket of a given session, the listener's source of transports
//! ([`Recording`]) keeps a duplicate of every socket it accepts while the sessions are being set
//! up, keyed by the client's address; the child reports each session's local port and id as it
//! comes up (its connector is [`backedpipe::TcpConnector`]'s plus noting the local address).
//! Duplicates of sessions that will not be cut are closed at once.
//!
//! The parent and the child talk in lines over the child's stdin and stdout:
//! child `<port> <id>` per session, then `ready`; parent `cut <port>` per session to cut, then
//! `arm`; child `armed` (a writer per cut session waiting); parent `go` right after the cut;
//! child `written` once every cut client has written and is connected again; the parent closes
//! the child's stdin to end it.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backedpipe::session::Incoming;
use backedpipe::{
    connector_fn, BoxError, BoxIo, PipeState, Session, SessionListener, SessionOptions,
    SessionServer,
};
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Barrier};
use tokio::task::JoinSet;

use crate::rig::StdClone;
use crate::stats::{median, rss_bytes};
use crate::Report;

/// Clients dialling at once while the sessions are set up (not measured).
const SETUP_CONCURRENCY: usize = 64;

/// Descriptors beyond the sessions' own: listener, runtime, stdio, connections in flight.
const FD_SLACK: usize = SETUP_CONCURRENCY + 256;

/// How long the storm may take before the bench gives up (far beyond the 2 s bar).
const STORM_TIMEOUT: Duration = Duration::from_secs(60);

/// The message each cut client writes after the cut.
const MESSAGE: [u8; 8] = *b"resumed!";

/// Duplicates of the server's accepted sockets, keyed by the client's address.
type Twins = Arc<Mutex<HashMap<SocketAddr, std::net::TcpStream>>>;

/// The listener's source of transports: a TCP listener (`TCP_NODELAY` on every connection, as
/// the library's own `Incoming` for `TcpListener` does) that, while `recording`, keeps a
/// duplicate of every accepted socket so the bench can cut it later.
struct Recording {
    listener: TcpListener,
    twins: Twins,
    recording: Arc<AtomicBool>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl Incoming for Recording {
    async fn next(&mut self) -> Option<io::Result<BoxIo>> {
        let accepted = async {
            let (stream, peer) = self.listener.accept().await?;
            stream.set_nodelay(true)?;
            self.accepted.fetch_add(1, Ordering::Relaxed);
            if self.recording.load(Ordering::Acquire) {
                let twin = stream.as_ref_std_clone()?;
                lock(&self.twins).insert(peer, twin);
            }
            Ok(Box::new(stream) as BoxIo)
        };
        Some(accepted.await)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The child process holding the client ends, and its two pipes.
struct Clients {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Clients {
    fn start(addr: SocketAddr, sessions: usize) -> Result<Clients, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["scale-clients", "--addr", &addr.to_string()])
            .args(["--sessions", &sessions.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or("no pipe from the client process")?;
        Ok(Clients {
            child,
            stdin,
            lines: forward_lines(io::BufReader::new(stdout)),
        })
    }

    async fn expect_line(&mut self) -> Result<String, BoxError> {
        self.lines
            .recv()
            .await
            .ok_or_else(|| "the client process ended early".into())
    }

    async fn expect(&mut self, word: &str) -> Result<(), BoxError> {
        let line = self.expect_line().await?;
        if line == word {
            Ok(())
        } else {
            Err(format!("the client process said {line:?}, expected {word:?}").into())
        }
    }

    fn send(&mut self, line: &str) -> Result<(), BoxError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or("the client process's stdin is closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    fn finish(mut self) -> Result<(), BoxError> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the client process failed: {status}").into())
        }
    }
}

/// Forwards the lines of a blocking reader to a channel, from a thread of its own.
fn forward_lines(reader: impl BufRead + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The agent's side of the bench: `sessions` connected pairs, `cut` of them cut at once.
pub async fn scale(sessions: usize, cut: usize, backlog: u32) -> Result<Report, BoxError> {
    if sessions == 0 || cut > sessions {
        return Err(format!("need 0 < --cut <= --sessions (got {cut} of {sessions})").into());
    }
    raise_fd_limit(sessions + cut + FD_SLACK, sessions)?;

    // The server, as an agent holds it: one SessionServer behind one listener.
    let tcp = {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        socket.listen(backlog)?
    };
    let addr = tcp.local_addr()?;
    let twins: Twins = Arc::default();
    let recording = Arc::new(AtomicBool::new(true));
    let accepted_count = Arc::new(AtomicUsize::new(0));
    let server = SessionServer::new(SessionOptions::default());
    let mut listener = SessionListener::new(
        Recording {
            listener: tcp,
            twins: Arc::clone(&twins),
            recording: Arc::clone(&recording),
            accepted: Arc::clone(&accepted_count),
        },
        server.clone(),
    )?;
    // The application's side: take every new session. The listener goes on attaching resumes.
    let collector = tokio::spawn(async move {
        let mut accepted = HashMap::with_capacity(sessions);
        while accepted.len() < sessions {
            let session = listener.accept().await?;
            accepted.insert(session.id().to_string(), Arc::new(session));
        }
        Ok::<_, backedpipe::Error>((listener, accepted))
    });

    let setup = Instant::now();
    let mut clients = Clients::start(addr, sessions)?;
    let to_cut = cut_set(sessions, cut);
    let mut victims = Vec::with_capacity(cut);
    for &cut in &to_cut {
        let line = clients.expect_line().await?;
        let (port, id) = line
            .split_once(' ')
            .ok_or_else(|| format!("unexpected line from the client process: {line:?}"))?;
        let peer = SocketAddr::from(([127, 0, 0, 1], port.parse()?));
        if cut {
            victims.push((port.to_string(), id.to_string()));
        } else {
            lock(&twins).remove(&peer);
        }
    }
    clients.expect("ready").await?;
    recording.store(false, Ordering::Release);
    let (_listener, accepted) = collector.await??;
    for session in accepted.values() {
        wait_connected(session).await?;
    }
    let setup_s = setup.elapsed().as_secs_f64();
    eprintln!(
        "scale: {sessions} session pairs connected in {setup_s:.1} s; the server holds {}",
        server.session_count()
    );
    // Idle, past the handshakes' transient buffers (as the memory bench).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss_mib = rss_bytes()? as f64 / (1 << 20) as f64;
    let client_rss_mib = child_rss_bytes(clients.child.id())? as f64 / (1 << 20) as f64;

    let mut cut_sessions = Vec::with_capacity(cut);
    {
        let mut twins = lock(&twins);
        for (port, id) in &victims {
            let peer = SocketAddr::from(([127, 0, 0, 1], port.parse()?));
            let socket = twins
                .remove(&peer)
                .ok_or("no server socket recorded for a session to cut")?;
            let session = accepted
                .get(id)
                .ok_or("a client's session never reached the server's application")?;
            cut_sessions.push((Arc::clone(session), socket));
        }
        twins.clear();
    }
    let generations: HashMap<&String, u64> = accepted
        .iter()
        .map(|(id, s)| (id, s.generation()))
        .collect();
    for (port, _) in &victims {
        clients.send(&format!("cut {port}"))?;
    }
    clients.send("arm")?;
    clients.expect("armed").await?;
    let accepted_before = accepted_count.load(Ordering::Relaxed);
    let storm = storm(&cut_sessions, &mut clients).await?;
    let storm_accepts = accepted_count.load(Ordering::Relaxed) - accepted_before;
    clients.expect("written").await?;
    clients.finish()?;

    // Sessions that were not cut must not have noticed anything.
    let cut_ids: std::collections::HashSet<&String> = victims.iter().map(|(_, id)| id).collect();
    let disturbed = accepted
        .iter()
        .filter(|(id, s)| !cut_ids.contains(id) && s.generation() != generations[id])
        .count();
    let storm_ms = storm.total.as_secs_f64() * 1e3;
    let p50_ms = median(&storm.each_ms);
    Ok(Report {
        json: json!({
            "bench": "scale", "sessions": sessions,
            "rss_mib": round1(rss_mib), "client_rss_mib": round1(client_rss_mib),
            "storm_recover_ms": round1(storm_ms),
        }),
        text: format!(
            "scale: {sessions} idle connected session pairs -> server (agent) RSS {rss_mib:.1} MiB, \
             client process RSS {client_rss_mib:.1} MiB; {cut} cut at once (the shutdowns took \
             {:.2} ms) -> all resumed and delivered in {storm_ms:.1} ms (median session \
             {p50_ms:.1} ms, {storm_accepts} connections accepted meanwhile); {disturbed} uncut \
             sessions reconnected; listen backlog {backlog}",
            storm.cut_took.as_secs_f64() * 1e3
        ),
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Which sessions are cut: `cut` of them spread evenly over the `sessions`, by the order in
/// which they came up.
fn cut_set(sessions: usize, cut: usize) -> Vec<bool> {
    let mut set = vec![false; sessions];
    for k in 0..cut {
        set[k * sessions / cut] = true;
    }
    set
}

/// The resident set of another process, from `/proc/<pid>/statm`.
fn child_rss_bytes(pid: u32) -> io::Result<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::other("unexpected statm"))?;
    Ok(pages * 4096)
}

async fn wait_connected(session: &Session) -> Result<(), BoxError> {
    session
        .status()
        .wait_for(|s| matches!(s, PipeState::Connected))
        .await?;
    Ok(())
}

/// What the storm measured.
struct Storm {
    /// From the first shutdown to the last session resumed with its message delivered.
    total: Duration,
    /// The same per session, in milliseconds.
    each_ms: Vec<f64>,
    /// How long issuing the shutdowns took.
    cut_took: Duration,
}

/// Cuts the given sessions at once, tells the clients to write, and waits until each server
/// session has its message over a new connection.
async fn storm(
    victims: &[(Arc<Session>, std::net::TcpStream)],
    clients: &mut Clients,
) -> Result<Storm, BoxError> {
    // Every watcher's read is in flight before the cut.
    let ready = Arc::new(Barrier::new(victims.len() + 1));
    let mut watchers = JoinSet::new();
    let mut sockets = Vec::with_capacity(victims.len());
    for (session, socket) in victims {
        sockets.push(socket);
        let session = Arc::clone(session);
        let ready = Arc::clone(&ready);
        let generation = session.generation();
        watchers.spawn(async move {
            let read = async {
                let mut buf = [0u8; MESSAGE.len()];
                let mut got = 0;
                while got < buf.len() {
                    match session.read(&mut buf[got..]).await? {
                        0 => {
                            return Err::<_, BoxError>("the session ended during the storm".into())
                        }
                        n => got += n,
                    }
                }
                if buf != MESSAGE {
                    return Err("a wrong message arrived".into());
                }
                Ok(())
            };
            let (read, ()) = tokio::join!(read, async {
                // `join!` polls the read first: once this runs, the read is in flight.
                ready.wait().await;
            });
            read?;
            wait_connected(&session).await?;
            let resumed = Instant::now();
            if session.generation() == generation {
                return Err("a message was delivered without a resume".into());
            }
            Ok::<_, BoxError>(resumed)
        });
    }
    ready.wait().await;
    let start = Instant::now();
    for socket in &sockets {
        socket.shutdown(std::net::Shutdown::Both)?;
    }
    let cut_took = start.elapsed();
    clients.send("go")?;
    let mut each_ms = Vec::with_capacity(victims.len());
    let mut last = start;
    let all = async {
        while let Some(done) = watchers.join_next().await {
            let resumed = done??;
            each_ms.push(resumed.duration_since(start).as_secs_f64() * 1e3);
            last = last.max(resumed);
        }
        Ok::<_, BoxError>(())
    };
    match tokio::time::timeout(STORM_TIMEOUT, all).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(format!(
                "{} of {} cut sessions had not resumed after {STORM_TIMEOUT:?}",
                victims.len() - each_ms.len(),
                victims.len()
            )
            .into())
        }
    }
    Ok(Storm {
        total: last.duration_since(start),
        each_ms,
        cut_took,
    })
}

/// The child process: `sessions` client sessions to `addr`, driven by the parent's lines on
/// stdin (see the module documentation). Prints only protocol lines on stdout.
pub async fn clients(addr: SocketAddr, sessions: usize) -> Result<(), BoxError> {
    raise_fd_limit(sessions + FD_SLACK, sessions)?;
    let options = SessionOptions::default();
    let mut by_port: HashMap<u16, Session> = HashMap::with_capacity(sessions);
    let mut out = io::stdout().lock();
    let mut dialling = JoinSet::new();
    let mut next = 0;
    while next < sessions || !dialling.is_empty() {
        while next < sessions && dialling.len() < SETUP_CONCURRENCY {
            dialling.spawn(connect_one(addr, options.clone()));
            next += 1;
        }
        if let Some(done) = dialling.join_next().await {
            let (session, port) = done??;
            writeln!(out, "{port} {}", session.id())?;
            by_port.insert(port, session);
        }
    }
    writeln!(out, "ready")?;
    out.flush()?;
    let mut lines = forward_lines(io::BufReader::new(io::stdin()));
    let mut armed = Vec::new();
    let (go_tx, go) = watch::channel(false);
    let mut writers = JoinSet::new();
    while let Some(line) = lines.recv().await {
        match line.split_once(' ') {
            Some(("cut", port)) => {
                let session = by_port
                    .remove(&port.parse()?)
                    .ok_or_else(|| format!("no session on port {port}"))?;
                armed.push(Arc::new(session));
            }
            None if line == "arm" => {
                for session in &armed {
                    let (session, mut go) = (Arc::clone(session), go.clone());
                    writers.spawn(async move {
                        go.wait_for(|go| *go).await?;
                        session.write(&MESSAGE).await?;
                        wait_connected(&session).await?;
                        Ok::<_, BoxError>(())
                    });
                }
                writeln!(out, "armed")?;
                out.flush()?;
            }
            None if line == "go" => {
                go_tx.send(true)?;
                while let Some(done) = writers.join_next().await {
                    done??;
                }
                writeln!(out, "written")?;
                out.flush()?;
            }
            _ => return Err(format!("unexpected line from the bench: {line:?}").into()),
        }
    }
    // The parent closed stdin: drop every session and leave.
    Ok(())
}

/// One client session over loopback TCP, and its local port on the first connection. The
/// connector is [`backedpipe::TcpConnector`]'s (connect, `TCP_NODELAY`) plus noting that port.
async fn connect_one(
    addr: SocketAddr,
    options: SessionOptions,
) -> Result<(Session, u16), BoxError> {
    let local = Arc::new(Mutex::new(None));
    let noted = Arc::clone(&local);
    let connector = connector_fn(move || {
        let noted = Arc::clone(&noted);
        async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            *lock(&noted) = Some(stream.local_addr()?.port());
            Ok::<BoxIo, io::Error>(Box::new(stream))
        }
    });
    let session = Session::connect(connector, options).await?;
    let port = lock(&local).ok_or("the connector never reported its local address")?;
    Ok((session, port))
}

/// Raises the soft limit on open files to the hard limit, and past it when the process may
/// (`CAP_SYS_RESOURCE`); fails with the numbers if `wanted` descriptors stay out of reach.
fn raise_fd_limit(wanted: usize, sessions: usize) -> Result<(), BoxError> {
    let wanted = wanted as libc::rlim_t;
    // SAFETY: `rlimit` is plain data; getrlimit/setrlimit read and write exactly one of them.
    let (ok, hard) = unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let hard = limit.rlim_max;
        limit.rlim_cur = hard.max(wanted);
        limit.rlim_max = hard.max(wanted);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            (true, hard)
        } else {
            // Unprivileged: the hard limit is as far as it goes.
            limit.rlim_cur = hard;
            limit.rlim_max = hard;
            let raised = libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0;
            (raised && hard >= wanted, hard)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{sessions} sessions need about {wanted} open files in this process (a socket per \
             session, one more per cut session, {FD_SLACK} spare) but RLIMIT_NOFILE's hard \
             limit is {hard} and this process may not raise it: raise it (ulimit -Hn, as root) \
             or pass fewer --sessions"
        )
        .into())
    }
}
