//! A byte stream that survives the loss of its transport.
//!
//! A TCP connection dies when a laptop sleeps, the Wi-Fi changes or a NAT forgets it. This crate
//! gives a bidirectional byte stream that outlives any of its connections: every byte written
//! is delivered exactly once and in order across any number of reconnects, memory is bounded,
//! and when recovery is truly impossible the stream fails with a typed [`Error`] instead of
//! hanging.
//!
//! # Two worlds: pick one
//!
//! | | [`BackedPipe`] (raw mode) | [`Session`] (session mode) |
//! |---|---|---|
//! | use it when | you need Coder's Go `backedpipe` behaviour and wire format, or you own the reconnect handshake | anything else |
//! | on the wire | the bytes as written, nothing added (interoperates with the Go pipe) | frames of [`docs/PROTOCOL.md`](proto): DATA, ACK, PING/PONG, FIN, CLOSE |
//! | reconnecting | your [`Reconnector`] dials and exchanges offsets | built in: a [`Connector`] dials, the resume is proved with the session's secret (HMAC), one round trip |
//! | replay buffer | keeps the newest `capacity` bytes; a peer further behind cannot resume ([`Error::ReplayDataUnavailable`]) | keeps every unacknowledged byte; writes wait at the capacity, nothing is ever evicted |
//! | dead path | noticed when the OS gives up | heartbeats: a silent path is replaced within about two intervals |
//! | end of stream | none (the Go pipe has none) | [`Session::shutdown`] sends FIN, [`Session::close`] sends CLOSE |
//! | server side | [`BackedPipe::passive`] + [`BackedPipe::accept_reconnection`] | [`SessionServer`] or [`SessionListener`] |
//! | memory | the replay buffer's capacity | capacity + receive limit + a few KiB, whatever the peer does |
//!
//! The two share the replay buffer ([`ReplayBuffer`]) and the retry timing ([`Backoff`]) and
//! nothing else.
//!
//! The parts, each in its own module:
//! - raw mode: [`ReplayBuffer`], [`BackedWriter`] and [`BackedReader`] (the two halves, each
//!   surviving transport loss), [`BackedPipe`] (both halves over one connection, with a
//!   background task that reconnects through a [`Reconnector`]), [`PipeConfig`];
//! - [`session`]: session mode, a sans-IO [`session::Connection`] per session driven by one
//!   task, with [`Session`], [`SessionServer`] and [`SessionListener`];
//! - [`proto`]: the session protocol's wire layer (frames, decoder, handshake), sans-IO;
//! - transports: [`Io`], [`Connector`], [`TcpConnector`], `UnixConnector`, [`TlsConnector`] and
//!   [`TlsAcceptor`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use backedpipe::{reconnector_fn, BackedPipe, BoxError};
//!
//! let pipe = BackedPipe::new(reconnector_fn(|_reader_seq| async {
//!     let (ours, _theirs) = tokio::io::duplex(1024);
//!     Ok::<_, BoxError>((ours, 0))
//! }))?;
//! pipe.connect().await?;
//! assert!(pipe.connected());
//! pipe.close().await?;
//! # Ok(()) }
//! ```

// Unsafe code is denied everywhere but in `cold_copy` (streaming stores for the replay
// buffer's copy, which have no safe interface; its module docs give the measurements).
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub, unused_qualifications)]

mod backoff;
mod budget;
mod cold_copy;
mod config;
mod error;
mod event;
mod pipe;
pub mod proto;
mod reader;
mod reconnector;
mod ring;
pub mod session;
mod supervisor;
mod tls;
mod transport;
mod wake;
mod writer;

pub use backoff::Backoff;
pub use config::{PipeConfig, DEFAULT_BUFFER_SIZE};
pub use error::{BoxError, Error, Result};
pub use event::{Component, ErrorEvent, EventSender};
pub use pipe::{BackedPipe, OwnedReadHalf, OwnedWriteHalf, PipeState};
pub use reader::BackedReader;
pub use reconnector::{reconnector_fn, FnReconnector, Reconnector};
pub use ring::ReplayBuffer;
pub use session::{Accepted, Session, SessionListener, SessionOptions, SessionServer};
pub use tls::{TlsAcceptor, TlsConnector, TlsError};
#[cfg(unix)]
pub use transport::UnixConnector;
pub use transport::{connector_fn, BoxIo, Connector, FnConnector, Io, TcpConnector};
pub use writer::BackedWriter;
