//! Noticing that the machine's network changed: an address appeared on an interface (Wi-Fi
//! joined, a cable plugged in, a VPN up, a laptop woken). A client in an outage then tries at
//! once instead of waiting out its backoff, and a connected session checks its transport
//! ([`probe_on_network_changes`]): one bound to the address that went away would otherwise
//! look alive until the session's liveness bound.
//!
//! One watcher per process ([`network_changes`]), started on first use on the current tokio
//! runtime with the `if-watch` crate (netlink on Linux, the system's notifications on macOS
//! and Windows). Where watching is impossible, the receiver simply never changes.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use backedpipe::Session;
use futures_util::StreamExt;
use tokio::sync::watch;

/// How long a session's transport has, after the network changed, to show it still works
/// (any frame from the agent) before it is replaced: a few round trips of a slow link, well
/// under the 11 s liveness bound.
pub const PROBE_WITHIN: Duration = Duration::from_secs(3);

/// The process's network-change counter: it grows by one each time an address appears.
static CHANGES: OnceLock<watch::Sender<u64>> = OnceLock::new();

/// A receiver whose value grows each time the machine gains a network address. The first
/// call starts the watcher on the current tokio runtime.
pub fn network_changes() -> watch::Receiver<u64> {
    CHANGES
        .get_or_init(|| {
            let changes = watch::Sender::new(0);
            start_watcher(changes.clone());
            changes
        })
        .subscribe()
}

/// Checks `session`'s transport (see [`Session::probe_path`], with [`PROBE_WITHIN`]) each time
/// `changes` grows, as [`network_changes`] does when the machine gains an address. Runs until
/// dropped: race it against the work that uses the session.
pub async fn probe_on_network_changes(
    session: &Session,
    mut changes: watch::Receiver<u64>,
) -> Infallible {
    probe_on_changes(session, &mut changes, PROBE_WITHIN).await
}

async fn probe_on_changes(
    session: &Session,
    changes: &mut watch::Receiver<u64>,
    within: Duration,
) -> Infallible {
    // (Not `borrow_and_update` first: a change between the receiver's creation and this
    // first poll must still count.)
    while changes.changed().await.is_ok() {
        tracing::debug!("the network changed: checking the session's transport");
        session.probe_path(within);
    }
    // Nobody will report changes any more.
    std::future::pending().await
}

/// Runs the platform's watcher in a task, if there is a runtime and a watcher.
fn start_watcher(changes: watch::Sender<u64>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut watcher = match if_watch::tokio::IfWatcher::new() {
            Ok(watcher) => watcher,
            Err(err) => {
                tracing::debug!(%err, "cannot watch the network for changes");
                return;
            }
        };
        while let Some(event) = watcher.next().await {
            match event {
                Ok(if_watch::IfEvent::Up(net)) => {
                    tracing::debug!(%net, "network address up");
                    changes.send_modify(|count| *count += 1);
                }
                Ok(if_watch::IfEvent::Down(net)) => {
                    tracing::debug!(%net, "network address down");
                }
                Err(err) => {
                    tracing::debug!(%err, "the network watcher failed");
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::ChaosProxy;
    use backedpipe::{Accepted, SessionOptions, SessionServer, TcpConnector};

    /// A transport black-holed when the network changes is replaced within the probe's bound,
    /// long before the session's 11 s liveness bound would notice.
    #[tokio::test]
    async fn a_network_change_replaces_a_silently_dead_transport_at_once() {
        tokio::time::timeout(
            Duration::from_secs(60),
            replaces_a_silently_dead_transport(),
        )
        .await
        .expect("the test hung");
    }

    async fn replaces_a_silently_dead_transport() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = tcp.local_addr().unwrap();
        let server = SessionServer::new(SessionOptions::default());
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((io, _)) = tcp.accept().await {
                let server = server.clone();
                let accepted_tx = accepted_tx.clone();
                tokio::spawn(async move {
                    if let Ok(Accepted::New(session)) = server.accept(io).await {
                        let _ = accepted_tx.send(session);
                    }
                });
            }
        });
        let proxy = ChaosProxy::start(server_addr).await.unwrap();
        let client = Session::connect(
            TcpConnector::new(proxy.local_addr()),
            SessionOptions::default(),
        )
        .await
        .unwrap();
        let server_side = accepted.recv().await.unwrap();
        let generation = client.generation();
        let (changes_tx, mut changes) = watch::channel(0u64);
        let resumed = async {
            assert_eq!(proxy.black_hole(), 1);
            changes_tx.send_modify(|n| *n += 1);
            client
                .status()
                .wait_for(|_| client.generation() > generation)
                .await
                .unwrap();
        };
        tokio::select! {
            never = probe_on_changes(&client, &mut changes, Duration::from_millis(500)) => match never {},
            outcome = tokio::time::timeout(Duration::from_secs(8), resumed) => {
                assert!(outcome.is_ok(), "not resumed within 8 s of the network change");
            }
        }
        client.write_all(b"moved").await.unwrap();
        let mut buf = [0u8; 5];
        let mut got = 0;
        while got < 5 {
            got += server_side.read(&mut buf[got..]).await.unwrap();
        }
        assert_eq!(&buf, b"moved");
    }
}
