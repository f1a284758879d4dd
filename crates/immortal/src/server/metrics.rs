//! The agent's counters and `GET /metrics` in the Prometheus text exposition format.
//!
//! This module owns the counters that no single stream holds (resumes, refused handshakes,
//! bytes carried by streams since removed) and the text format; the registry supplies the
//! gauges (streams held, streams with a client attached) at the time of the request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the whole agent. Every field only grows, except [`Metrics::connections`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Sessions resumed by a client after a transport loss.
    pub(crate) resumes: AtomicU64,
    /// Upgrades or session handshakes refused: a wrong attach key, a bad or late hello, a
    /// forged or replayed resume, a second new session.
    pub(crate) refused_handshakes: AtomicU64,
    /// Bytes carried from clients to local services.
    pub(crate) bytes_to_services: AtomicU64,
    /// Bytes carried from local services to clients.
    pub(crate) bytes_from_services: AtomicU64,
    /// Client connections open now (HTTP and upgraded).
    pub(crate) connections: AtomicU64,
    /// Client connections closed by the connection cap (the oldest unauthenticated one to let
    /// a new one in, or a new one when every slot was authenticated).
    pub(crate) connections_shed: AtomicU64,
}

impl Metrics {
    /// Adds one to `counter`.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text, with the gauges the registry reports now.
    pub(crate) fn render(&self, streams: usize, connected: usize) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "immortal_streams",
            "gauge",
            "Streams the agent holds.",
            streams as u64,
        );
        metric(
            "immortal_streams_connected",
            "gauge",
            "Streams with a client attached.",
            connected as u64,
        );
        metric(
            "immortal_resumes_total",
            "counter",
            "Sessions resumed after a transport loss.",
            get(&self.resumes),
        );
        metric(
            "immortal_refused_handshakes_total",
            "counter",
            "Upgrades and session handshakes refused.",
            get(&self.refused_handshakes),
        );
        metric(
            "immortal_bytes_to_services_total",
            "counter",
            "Bytes carried from clients to local services.",
            get(&self.bytes_to_services),
        );
        metric(
            "immortal_bytes_from_services_total",
            "counter",
            "Bytes carried from local services to clients.",
            get(&self.bytes_from_services),
        );
        metric(
            "immortal_connections",
            "gauge",
            "Client connections open.",
            get(&self.connections),
        );
        metric(
            "immortal_connections_shed_total",
            "counter",
            "Client connections closed by the connection cap.",
            get(&self.connections_shed),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_help_type_and_value_for_each_metric() {
        let metrics = Metrics::default();
        Metrics::bump(&metrics.resumes);
        metrics.bytes_to_services.fetch_add(10, Ordering::Relaxed);
        let text = metrics.render(3, 2);
        assert!(text.contains("# TYPE immortal_streams gauge\nimmortal_streams 3\n"));
        assert!(text.contains("immortal_streams_connected 2\n"));
        assert!(text.contains("# TYPE immortal_resumes_total counter\nimmortal_resumes_total 1\n"));
        assert!(text.contains("immortal_bytes_to_services_total 10\n"));
        for line in text.lines() {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.split(' ').count() == 2,
                "{line}"
            );
        }
    }
}
