//! A TCP proxy that breaks connections on command, for tests and for `immortal demo`.
//!
//! [`ChaosProxy`] listens on a loopback port and forwards every connection it accepts to one
//! upstream address, byte for byte in both directions, counting what it forwards. On command it
//! breaks what is live the way real networks do:
//!
//! - [`ChaosProxy::cut_reset`]: every live connection is closed with a TCP reset on both sides,
//!   as when a middlebox drops the flow and answers the next packet with RST.
//! - [`ChaosProxy::black_hole`]: every live connection stops forwarding in both directions but
//!   stays open (no FIN, no RST), as after a NAT rebinding or a Wi-Fi change: the peers learn of
//!   the loss only from their own timeouts. Connections made afterwards work normally.
//! - [`ChaosProxy::set_refuse`]: while on, new connections are reset as soon as they arrive, as
//!   when the host is offline.
//!
//! The proxy is event driven: controls reach the connection tasks over watch channels, and
//! [`ChaosProxy::wait_for`] wakes on the counters changing, so a test can cut "after 8 MiB" with
//! no polling. Dropping the proxy ends all its tasks and closes all its sockets.
//!
//! ```no_run
//! # async fn example(agent: std::net::SocketAddr) -> std::io::Result<()> {
//! use immortal::chaos::ChaosProxy;
//!
//! let proxy = ChaosProxy::start(agent).await?;
//! // ... point a client at proxy.local_addr() ...
//! proxy.wait_for(|s| s.bytes_total() >= 8 << 20).await;
//! proxy.cut_reset();
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Size of each read while forwarding.
const CHUNK: usize = 64 * 1024;

/// What the proxy has done so far. Every count only grows, except [`ChaosStats::live`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChaosStats {
    /// Connections accepted and forwarded (refused ones not included).
    pub accepted: u64,
    /// Connections currently forwarding (held, black-holed ones not included).
    pub live: u64,
    /// Connections currently black-holed: open, but forwarding nothing.
    pub held: u64,
    /// Connections refused while [`ChaosProxy::set_refuse`] was on.
    pub refused: u64,
    /// Cuts that broke at least one live connection ([`ChaosProxy::cut_reset`] and
    /// [`ChaosProxy::black_hole`] calls that found something to break).
    pub cuts: u64,
    /// Connections closed with a reset by [`ChaosProxy::cut_reset`].
    pub resets: u64,
    /// Connections black-holed by [`ChaosProxy::black_hole`].
    pub black_holes: u64,
    /// Bytes forwarded from clients to the upstream.
    pub bytes_up: u64,
    /// Bytes forwarded from the upstream to clients.
    pub bytes_down: u64,
}

impl ChaosStats {
    /// Bytes forwarded in both directions together.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
}

/// What a connection task is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward in both directions.
    Forward,
    /// Stop forwarding, keep both sockets open.
    Hold,
    /// Close both sockets with a reset.
    Reset,
}

/// State shared by the proxy handle and its tasks.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    stats: watch::Sender<ChaosStats>,
    refuse: watch::Sender<bool>,
    /// The control channel of every connection not yet closed, by connection number.
    conns: Mutex<Conns>,
}

#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    modes: HashMap<u64, watch::Sender<Mode>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        // The table stays consistent whatever a panicking holder was doing; keep going.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut ChaosStats)) {
        self.stats.send_modify(f);
    }
}

/// A loopback TCP proxy to one upstream address that can reset, black-hole and refuse
/// connections on command. See the [module documentation](self).
///
/// Dropping it stops the listener and ends every connection task (their sockets are closed).
#[derive(Debug)]
pub struct ChaosProxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropped with the proxy: every task watches it and ends when it closes.
    _shutdown: watch::Sender<()>,
}

impl ChaosProxy {
    /// Starts a proxy listening on `127.0.0.1` (an ephemeral port) that forwards each connection
    /// to `upstream`. Must be called within a Tokio runtime; its tasks run there.
    ///
    /// The upstream is dialled once per accepted connection; if that fails, the accepted
    /// connection is reset.
    pub async fn start(upstream: SocketAddr) -> io::Result<ChaosProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            stats: watch::Sender::new(ChaosStats::default()),
            refuse: watch::Sender::new(false),
            conns: Mutex::new(Conns::default()),
        });
        let (shutdown, shutdown_rx) = watch::channel(());
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown_rx));
        Ok(ChaosProxy {
            local_addr,
            shared,
            _shutdown: shutdown,
        })
    }

    /// The address clients should connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Closes every open connection (live or black-holed) with a TCP reset on both sides, and
    /// returns how many live ones it broke. Connections accepted afterwards are not affected.
    ///
    /// The resets are sent by the connection tasks right after this returns.
    pub fn cut_reset(&self) -> usize {
        let mut broken = 0usize;
        let mut held = 0u64;
        {
            let mut conns = self.shared.conns();
            for (_, mode) in conns.modes.drain() {
                match *mode.borrow() {
                    Mode::Forward => broken += 1,
                    Mode::Hold => held += 1,
                    Mode::Reset => {}
                }
                mode.send_replace(Mode::Reset);
            }
        }
        self.shared.update(|s| {
            s.resets += broken as u64 + held;
            s.live = s.live.saturating_sub(broken as u64);
            s.held = s.held.saturating_sub(held);
            if broken > 0 {
                s.cuts += 1;
            }
        });
        broken
    }

    /// Stops every live connection forwarding, in both directions, while keeping both its
    /// sockets open: no FIN, no RST, the peers just hear nothing more. Returns how many it
    /// black-holed. Connections accepted afterwards forward normally.
    ///
    /// Black-holed connections stay open until [`ChaosProxy::cut_reset`] or the proxy is
    /// dropped; nothing more is read from them.
    pub fn black_hole(&self) -> usize {
        let mut broken = 0usize;
        {
            let conns = self.shared.conns();
            for mode in conns.modes.values() {
                if *mode.borrow() == Mode::Forward {
                    mode.send_replace(Mode::Hold);
                    broken += 1;
                }
            }
        }
        self.shared.update(|s| {
            s.black_holes += broken as u64;
            s.live = s.live.saturating_sub(broken as u64);
            s.held += broken as u64;
            if broken > 0 {
                s.cuts += 1;
            }
        });
        broken
    }

    /// While `refuse` is true, every new connection is reset as soon as it is accepted (like an
    /// unreachable host); open connections are not affected.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.refuse.send_replace(refuse);
    }

    /// How many connections the proxy has accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.stats().accepted
    }

    /// How many connections are forwarding right now.
    pub fn live_connections(&self) -> u64 {
        self.stats().live
    }

    /// Bytes forwarded from clients to the upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.stats().bytes_up
    }

    /// Bytes forwarded from the upstream to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.stats().bytes_down
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ChaosStats {
        *self.shared.stats.borrow()
    }

    /// A receiver that sees every change of the counters.
    pub fn subscribe(&self) -> watch::Receiver<ChaosStats> {
        self.shared.stats.subscribe()
    }

    /// Waits until `condition` holds for the counters and returns them as they were then. Wakes
    /// on every change; no polling.
    pub async fn wait_for(&self, mut condition: impl FnMut(&ChaosStats) -> bool) -> ChaosStats {
        let mut rx = self.shared.stats.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we are borrowed.
        let seen = match rx.wait_for(|s| condition(s)).await {
            Ok(stats) => *stats,
            Err(_) => self.stats(),
        };
        seen
    }
}

/// Accepts until the proxy is dropped; one task per connection.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            // A connection aborted before we took it, or resource exhaustion: try the next one,
            // letting the other tasks (which may free descriptors) run first.
            Err(_) => {
                tokio::task::yield_now().await;
                continue;
            }
        };
        if *shared.refuse.borrow() {
            reset(client);
            shared.update(|s| s.refused += 1);
            continue;
        }
        let (mode_tx, mode_rx) = watch::channel(Mode::Forward);
        let id = {
            let mut conns = shared.conns();
            let id = conns.next_id;
            conns.next_id += 1;
            conns.modes.insert(id, mode_tx);
            id
        };
        shared.update(|s| {
            s.accepted += 1;
            s.live += 1;
        });
        let conn = Conn {
            id,
            shared: Arc::clone(&shared),
        };
        tokio::spawn(conn.run(client, mode_rx, shutdown.clone()));
    }
}

/// Closes a socket with a reset rather than a FIN.
fn reset(stream: TcpStream) {
    // If the option cannot be set the socket still closes, with a FIN; nothing better to do.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One proxied connection; unregisters itself when it ends.
struct Conn {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Still registered means it ended by itself (not through cut_reset, which unregisters):
        // take it off the table and the gauges.
        let removed = self.shared.conns().modes.remove(&self.id);
        if let Some(mode) = removed {
            let was = *mode.borrow();
            self.shared.update(|s| match was {
                Mode::Forward => s.live = s.live.saturating_sub(1),
                Mode::Hold => s.held = s.held.saturating_sub(1),
                Mode::Reset => {}
            });
        }
    }
}

impl Conn {
    async fn run(
        self,
        mut client: TcpStream,
        mut mode: watch::Receiver<Mode>,
        mut shutdown: watch::Receiver<()>,
    ) {
        let _ = client.set_nodelay(true);
        let dialled = tokio::select! {
            dialled = TcpStream::connect(self.shared.upstream) => Some(dialled),
            _ = changed_from_forward(&mut mode) => None,
            _ = shutdown.changed() => return,
        };
        let Some(dialled) = dialled else {
            // Cut before the upstream answered: the dial is abandoned, the client reset now or
            // held like any black-holed connection.
            if held_until_reset(&mut mode, &mut shutdown).await {
                reset(client);
            }
            return;
        };
        let mut upstream = match dialled {
            Ok(upstream) => upstream,
            Err(_) => {
                reset(client);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);

        let ended = {
            let (client_r, client_w) = client.split();
            let (upstream_r, upstream_w) = upstream.split();
            let shared = &self.shared;
            let up = pump(client_r, upstream_w, shared, |s, n| s.bytes_up += n);
            let down = pump(upstream_r, client_w, shared, |s, n| s.bytes_down += n);
            tokio::select! {
                done = async { tokio::try_join!(up, down) } => Ended::Done(done.is_ok()),
                _ = changed_from_forward(&mut mode) => Ended::Told,
                _ = shutdown.changed() => Ended::Shutdown,
            }
        };
        match ended {
            // Both directions finished with FIN: the sockets close normally on drop.
            Ended::Done(true) => {}
            // One side failed (typically reset): pass the reset on to the other side too.
            Ended::Done(false) => {
                reset(client);
                reset(upstream);
            }
            Ended::Told => {
                if held_until_reset(&mut mode, &mut shutdown).await {
                    reset(client);
                    reset(upstream);
                }
            }
            Ended::Shutdown => {}
        }
    }
}

/// Waits until a cut (hold or reset) is ordered, or the order can no longer come.
async fn changed_from_forward(mode: &mut watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m != Mode::Forward).await;
}

/// Waits, reading and writing nothing, until the connection is to be reset (true) or the proxy
/// goes away (false). Returns at once if the reset was already ordered.
async fn held_until_reset(
    mode: &mut watch::Receiver<Mode>,
    shutdown: &mut watch::Receiver<()>,
) -> bool {
    tokio::select! {
        r = mode.wait_for(|m| *m == Mode::Reset) => r.is_ok(),
        _ = shutdown.changed() => false,
    }
}

/// Why forwarding stopped.
enum Ended {
    /// Both directions ended (true) or one failed (false).
    Done(bool),
    /// A cut (hold or reset) was ordered.
    Told,
    /// The proxy was dropped.
    Shutdown,
}

/// Copies one direction until end of stream (then half-closes the writer) or an error, counting
/// the bytes into the shared stats.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    shared: &Shared,
    count: impl Fn(&mut ChaosStats, u64),
) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        shared.update(|s| count(s, n as u64));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A test can never hang: each waits at most this long for any one event.
    const PATIENCE: Duration = Duration::from_secs(20);

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(PATIENCE, f)
            .await
            .expect("timed out waiting for an event")
    }

    /// An upstream that echoes every connection back, and reports each connection's end: `Ok`
    /// with the bytes echoed on FIN, `Err` with the error kind on failure.
    async fn echo_server() -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<Result<u64, io::ErrorKind>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut total = 0u64;
                    let result = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break Ok(total),
                            Ok(n) => {
                                if let Err(e) = s.write_all(&buf[..n]).await {
                                    break Err(e.kind());
                                }
                                total += n as u64;
                            }
                            Err(e) => break Err(e.kind()),
                        }
                    };
                    let _ = tx.send(result);
                });
            }
        });
        (addr, rx)
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within(s.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts() {
        let (upstream, mut ends) = echo_server().await;
        let proxy = ChaosProxy::start(upstream).await.unwrap();
        assert_eq!(proxy.upstream(), upstream);
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut c, b"hello through the proxy").await;
        let stats = within(proxy.wait_for(|s| s.bytes_down == 23)).await;
        assert_eq!(stats.bytes_up, 23);
        assert_eq!(stats.accepted, 1);
        assert_eq!(stats.live, 1);
        assert_eq!(proxy.connections(), 1);

        // A FIN passes through as a FIN, and the connection leaves the live gauge.
        c.shutdown().await.unwrap();
        assert_eq!(within(ends.recv()).await, Some(Ok(23)));
        let mut rest = Vec::new();
        within(c.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        within(proxy.wait_for(|s| s.live == 0)).await;
        assert_eq!(proxy.stats().cuts, 0);
    }

    #[tokio::test]
    async fn cut_reset_resets_both_sides_and_new_connections_work() {
        let (upstream, mut ends) = echo_server().await;
        let proxy = ChaosProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut c, b"before").await;

        assert_eq!(proxy.cut_reset(), 1);
        let mut buf = [0u8; 16];
        let err = within(c.read(&mut buf))
            .await
            .expect_err("a reset, not data or EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            within(ends.recv()).await,
            Some(Err(io::ErrorKind::ConnectionReset))
        );
        let stats = proxy.stats();
        assert_eq!((stats.cuts, stats.resets, stats.live), (1, 1, 0));

        // Nothing live: a cut with nothing to break is not counted.
        assert_eq!(proxy.cut_reset(), 0);
        assert_eq!(proxy.stats().cuts, 1);

        let mut c2 = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut c2, b"after").await;
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn black_hole_forwards_nothing_closes_nothing() {
        let (upstream, mut ends) = echo_server().await;
        let proxy = ChaosProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut c, b"ping").await;

        assert_eq!(proxy.black_hole(), 1);
        within(proxy.wait_for(|s| s.held == 1 && s.live == 0)).await;
        let before = proxy.stats();
        c.write_all(b"into the void").await.unwrap();

        // A fresh connection works while the old one is held, which proves the held one had
        // its chance to forward: the proxy serves connections concurrently.
        let mut c2 = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut c2, b"new path").await;
        let after = within(proxy.wait_for(|s| s.bytes_down == before.bytes_down + 8)).await;
        assert_eq!(after.bytes_up, before.bytes_up + 8, "held bytes forwarded");

        // The held connection neither got data nor EOF nor a reset.
        let mut buf = [0u8; 16];
        let pending = c.try_read(&mut buf);
        assert!(
            matches!(&pending, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "held connection must stay silent: {pending:?}"
        );
        assert!(ends.try_recv().is_err(), "upstream side must stay open");

        // A later reset releases held connections too.
        assert_eq!(proxy.cut_reset(), 1, "only the new live connection counts");
        let err = within(c.read(&mut buf)).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let stats = within(proxy.wait_for(|s| s.held == 0)).await;
        assert_eq!((stats.cuts, stats.black_holes, stats.resets), (2, 1, 2));
    }

    #[tokio::test]
    async fn refuse_then_accept_again() {
        let (upstream, _ends) = echo_server().await;
        let proxy = ChaosProxy::start(upstream).await.unwrap();
        proxy.set_refuse(true);
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 4];
        let got = within(c.read(&mut buf)).await;
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
        assert_eq!(proxy.stats().refused, 1);
        assert_eq!(proxy.connections(), 0);

        proxy.set_refuse(false);
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut c, b"back online").await;
    }

    #[tokio::test]
    async fn unreachable_upstream_resets_the_client() {
        // A port nothing listens on: bind, learn it, close.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let proxy = ChaosProxy::start(dead).await.unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 4];
        let got = within(c.read(&mut buf)).await;
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
        within(proxy.wait_for(|s| s.live == 0)).await;
    }

    #[tokio::test]
    async fn dropping_the_proxy_ends_everything() {
        let (upstream, mut ends) = echo_server().await;
        let proxy = ChaosProxy::start(upstream).await.unwrap();
        let addr = proxy.local_addr();
        let mut live = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut live, b"a").await;
        let mut held = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut held, b"b").await;
        // Make the first one held by black-holing both, then open a third, live one.
        assert_eq!(proxy.black_hole(), 2);
        let mut live2 = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut live2, b"c").await;
        drop(live);

        drop(proxy);
        // Every upstream connection sees its end, and the clients see theirs.
        for _ in 0..3 {
            assert!(within(ends.recv()).await.is_some());
        }
        let mut rest = Vec::new();
        let _ = within(held.read_to_end(&mut rest)).await;
        let _ = within(live2.read_to_end(&mut rest)).await;
        // The listener is gone too.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
