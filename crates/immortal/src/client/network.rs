//! Noticing that the machine's network changed: an address appeared on an interface (Wi-Fi
//! joined, a cable plugged in, a VPN up, a laptop woken). A client in an outage then tries at
//! once instead of waiting out its backoff.
//!
//! One watcher per process ([`network_changes`]), started on first use on the current tokio
//! runtime with the `if-watch` crate (netlink on Linux, the system's notifications on macOS
//! and Windows). Where watching is impossible, the receiver simply never changes.

use std::sync::OnceLock;

use futures_util::StreamExt;
use tokio::sync::watch;

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
