//! The agent's streams: creating one (dialling the local port, making room), finding, listing
//! and removing them, and the events that tell the outside what happened.
//!
//! This module owns the table and the limit. A stream's own life (its session, its bytes) is in
//! [`stream`](super::stream); a stream ends by asking the registry to remove it, and is removed
//! exactly once, by whoever comes first (its task, a DELETE, an eviction), with that reason.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use backedpipe::SessionOptions;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::stream::Stream;
use crate::api::StreamInfo;

/// How long the agent waits for a local service to accept a connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// How many events a slow subscriber may fall behind before it misses some.
const EVENT_BACKLOG: usize = 256;

/// Something that happened to a stream, as [`Agent::subscribe`](super::Agent::subscribe)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A stream was created: the agent is connected to the local port.
    Created {
        /// The stream's id.
        id: String,
        /// The local port.
        port: u16,
    },
    /// A client attached (the first time, or resuming after a loss).
    Connected {
        /// The stream's id.
        id: String,
    },
    /// The client's transport went away; the stream waits for a resume until its time to live.
    Disconnected {
        /// The stream's id.
        id: String,
    },
    /// The stream is gone from the agent (it is no longer listed).
    Removed {
        /// The stream's id.
        id: String,
        /// Why.
        reason: RemovalReason,
    },
}

/// A new stream's first attach must come within this many handshake timeouts (see
/// [`Registry::first_attach_window`]).
const FIRST_ATTACH_GRACES: u32 = 12;

/// Why a stream was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemovalReason {
    /// A client asked (`DELETE`).
    Deleted,
    /// It made room for a new stream: it was the oldest stream with no client attached.
    Evicted,
    /// No client was attached for the time to live.
    Expired,
    /// It ended normally: both directions finished, or the client closed its session.
    Ended,
    /// It failed: the local service's connection or the session broke for good.
    Failed(String),
    /// The agent stopped.
    AgentStopped,
}

/// Why a stream could not be created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    /// Every slot holds a stream with a client attached, or one its creator is about to
    /// attach.
    #[error(
        "agent full (--max-streams {0}): every stream has a client attached or was just created \
         for one"
    )]
    Full(usize),
    /// The local port did not accept the connection.
    #[error("cannot connect to port {port} on the loopback interface: {reason}")]
    Dial {
        /// The port.
        port: u16,
        /// Why, in words.
        reason: String,
    },
}

/// The table of streams. Cheap to clone (one shared table).
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max_streams: usize,
    ttl: Duration,
    /// How long a new stream is safe from eviction while its creator attaches.
    attach_grace: Duration,
    metrics: Arc<Metrics>,
    options: SessionOptions,
    shutdown: CancellationToken,
    streams: Mutex<HashMap<String, Arc<Stream>>>,
    next_serial: AtomicU64,
    events: broadcast::Sender<StreamEvent>,
    /// The number of streams held, for [`Registry::wait_empty`].
    count: watch::Sender<usize>,
}

impl Registry {
    /// An empty registry. Its streams' tasks end when `shutdown` is cancelled.
    pub(crate) fn new(
        max_streams: usize,
        ttl: Duration,
        attach_grace: Duration,
        options: SessionOptions,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                max_streams,
                ttl,
                attach_grace,
                metrics,
                options,
                shutdown,
                streams: Mutex::new(HashMap::new()),
                next_serial: AtomicU64::new(0),
                events: broadcast::channel(EVENT_BACKLOG).0,
                count: watch::Sender::new(0),
            }),
        }
    }

    /// A receiver of every later event.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<StreamEvent> {
        self.inner.events.subscribe()
    }

    /// Reports an event (to nobody, if nobody listens).
    pub(crate) fn emit(&self, event: StreamEvent) {
        let _ = self.inner.events.send(event);
    }

    /// The time to live of a stream with no client attached.
    pub(crate) fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// How long a new stream waits for its creator's first attach before it is dropped:
    /// twelve handshake timeouts (two minutes by default), or the time to live if shorter. A
    /// creator attaches at once, and gives up (deleting the stream) if it cannot within its
    /// connect timeout; one that died in between would otherwise leave the stream, and its
    /// connection to the local service, for the whole time to live.
    pub(crate) fn first_attach_window(&self) -> Duration {
        self.inner
            .attach_grace
            .saturating_mul(FIRST_ATTACH_GRACES)
            .min(self.inner.ttl)
    }

    /// The stream with this id.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Stream>> {
        self.table().get(id).cloned()
    }

    /// How many streams are held, and how many of them have a client attached.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let table = self.table();
        let connected = table.values().filter(|s| s.is_connected()).count();
        (table.len(), connected)
    }

    /// Every stream, oldest first.
    pub(crate) fn list(&self) -> Vec<StreamInfo> {
        let mut streams: Vec<Arc<Stream>> = self.table().values().cloned().collect();
        streams.sort_by_key(|stream| stream.serial());
        streams.iter().map(|stream| stream.info()).collect()
    }

    /// Creates a stream to `port` on the loopback interface: dials it, makes room (evicting the
    /// oldest stream with no client attached if the table is full), registers the stream and
    /// starts its task.
    pub(crate) async fn create(
        &self,
        port: u16,
        name: Option<String>,
    ) -> Result<StreamInfo, CreateError> {
        // Refuse before dialling when no room can be made, so a full agent does not open and
        // drop connections to the local service.
        if !self.has_room() {
            return Err(CreateError::Full(self.inner.max_streams));
        }
        let local = dial(port).await?;
        let serial = self.inner.next_serial.fetch_add(1, Ordering::Relaxed);
        let (stream, session_rx) = Stream::new(
            serial,
            port,
            name,
            self.inner.options.clone(),
            self.inner.shutdown.child_token(),
            self.inner.metrics.clone(),
        );
        let evicted = {
            let mut table = self.table();
            let evicted = if table.len() >= self.inner.max_streams {
                // The room seen above may have been taken meanwhile; look again.
                match oldest_evictable(&table, self.inner.attach_grace) {
                    Some(id) => table.remove(&id),
                    None => return Err(CreateError::Full(self.inner.max_streams)),
                }
            } else {
                None
            };
            table.insert(stream.id().to_owned(), stream.clone());
            self.inner.count.send_replace(table.len());
            evicted
        };
        if let Some(evicted) = evicted {
            tracing::info!(id = evicted.id(), "stream evicted to make room");
            evicted.stop();
            self.emit(StreamEvent::Removed {
                id: evicted.id().to_owned(),
                reason: RemovalReason::Evicted,
            });
        }
        let info = stream.creation_info();
        tracing::info!(id = %info.id, name = %info.name, port, "stream created");
        self.emit(StreamEvent::Created {
            id: info.id.clone(),
            port,
        });
        tokio::spawn(stream.run(local, session_rx, self.clone()));
        Ok(info)
    }

    /// Removes the stream and stops it, if it is still here; reports it with `reason`.
    /// Returns whether it was here (so exactly one caller sees `true`).
    pub(crate) fn remove(&self, id: &str, reason: RemovalReason) -> bool {
        let removed = {
            let mut table = self.table();
            let removed = table.remove(id);
            self.inner.count.send_replace(table.len());
            removed
        };
        let Some(stream) = removed else {
            return false;
        };
        stream.stop();
        tracing::info!(id, ?reason, "stream removed");
        self.emit(StreamEvent::Removed {
            id: id.to_owned(),
            reason,
        });
        true
    }

    /// Resolves once no stream is held.
    pub(crate) async fn wait_empty(&self) {
        let mut count = self.inner.count.subscribe();
        let _ = count.wait_for(|&count| count == 0).await;
    }

    /// The number of streams held, as it changes.
    pub(crate) fn held(&self) -> watch::Receiver<usize> {
        self.inner.count.subscribe()
    }

    /// Whether a new stream would fit, evicting if need be.
    fn has_room(&self) -> bool {
        let table = self.table();
        table.len() < self.inner.max_streams
            || oldest_evictable(&table, self.inner.attach_grace).is_some()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<Stream>>> {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The stream to evict: among those with no client attached (leaving out streams created less
/// than `grace` ago that were never attached: their creator is on its way), the one idle
/// longest, by the later of its creation and its last disconnection (oldest first, creation
/// order on ties).
fn oldest_evictable(table: &HashMap<String, Arc<Stream>>, grace: Duration) -> Option<String> {
    table
        .values()
        .filter(|stream| stream.is_evictable(grace))
        .min_by_key(|stream| (stream.idle_since(), stream.serial()))
        .map(|stream| stream.id().to_owned())
}

/// Connects to the local service on `127.0.0.1`, or on `::1` if nothing listens there (a
/// service may listen on IPv6 loopback only).
async fn dial(port: u16) -> Result<TcpStream, CreateError> {
    let failed = |reason: String| CreateError::Dial { port, reason };
    let connect = async {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                TcpStream::connect((Ipv6Addr::LOCALHOST, port))
                    .await
                    .map_err(|v6| match v6.kind() {
                        // Nothing on either, or no IPv6 at all: the IPv4 refusal says it best.
                        std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::AddrNotAvailable
                        | std::io::ErrorKind::Unsupported => err,
                        _ => v6,
                    })
            }
            other => other,
        }
    };
    match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => Err(failed(
            "connection refused (is anything listening on that port?)".into(),
        )),
        Ok(Err(err)) => Err(failed(err.to_string())),
        Err(_) => Err(failed(format!(
            "no answer within {}",
            humantime::format_duration(DIAL_TIMEOUT)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(serial: u64) -> Arc<Stream> {
        let options = SessionOptions::default();
        let metrics = Arc::new(Metrics::default());
        Stream::new(
            serial,
            1000,
            None,
            options,
            CancellationToken::new(),
            metrics,
        )
        .0
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_idle_longest_is_evicted_first() {
        let second = Duration::from_secs(1);
        let a = stream(0);
        tokio::time::advance(second).await;
        let b = stream(1);
        tokio::time::advance(second).await;
        let c = stream(2);
        let table: HashMap<String, Arc<Stream>> = [&a, &b, &c]
            .into_iter()
            .map(|s| (s.id().to_owned(), s.clone()))
            .collect();
        assert_eq!(
            oldest_evictable(&table, Duration::ZERO).as_deref(),
            Some(a.id())
        );
        // `a` had a client until after `b` was created: `b` has been idle longest.
        a.set_connected(true);
        tokio::time::advance(second).await;
        a.set_connected(false);
        assert_eq!(
            oldest_evictable(&table, Duration::ZERO).as_deref(),
            Some(b.id())
        );
        // Streams with a client attached are never evicted.
        b.set_connected(true);
        assert_eq!(
            oldest_evictable(&table, Duration::ZERO).as_deref(),
            Some(c.id())
        );
        c.set_connected(true);
        assert_eq!(
            oldest_evictable(&table, Duration::ZERO).as_deref(),
            Some(a.id())
        );
        a.set_connected(true);
        assert_eq!(oldest_evictable(&table, Duration::ZERO), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_not_yet_attached_is_safe_from_eviction_for_the_grace() {
        let grace = Duration::from_secs(10);
        let a = stream(0);
        let table: HashMap<String, Arc<Stream>> = [(a.id().to_owned(), a.clone())].into();
        assert_eq!(
            oldest_evictable(&table, grace),
            None,
            "its creator is on its way"
        );
        tokio::time::advance(grace).await;
        assert_eq!(oldest_evictable(&table, grace).as_deref(), Some(a.id()));
        let b = stream(1);
        b.set_connected(true);
        b.set_connected(false);
        let table: HashMap<String, Arc<Stream>> = [(b.id().to_owned(), b.clone())].into();
        assert_eq!(
            oldest_evictable(&table, grace).as_deref(),
            Some(b.id()),
            "a stream whose client came and went is evictable at once"
        );
    }

    #[test]
    fn a_stream_reports_its_connections() {
        let s = stream(0);
        assert!(s.set_connected(false).is_none(), "no change, no event");
        assert!(matches!(
            s.set_connected(true),
            Some(StreamEvent::Connected { .. })
        ));
        assert!(matches!(
            s.set_connected(false),
            Some(StreamEvent::Disconnected { .. })
        ));
        let info = s.info();
        assert!(!info.connected);
        assert!(info.last_connected_at.is_some());
        assert!(info.last_disconnected_at.is_some());
        assert_eq!(info.name, format!("port-1000-{}", &info.id[..6]));
    }
}
