//! A byte stream that survives the loss of its transport.
//!
//! A TCP connection dies when a laptop sleeps, the Wi-Fi changes or a NAT forgets it. A
//! [`BackedPipe`] gives a bidirectional byte stream that outlives any of its connections: every
//! byte written is delivered exactly once and in order across any number of reconnects, memory
//! is bounded by a configurable replay buffer, and when recovery is truly impossible the pipe
//! fails with a typed [`Error`] instead of hanging.
//!
//! This crate reimplements the behaviour of Coder's Go `backedpipe` package (the README maps
//! every Go item to its Rust counterpart) and fixes its known defects: close interrupts a
//! reconnect in progress, failed reconnects are retried with backoff, an impossible replay fails
//! reads and writes instead of hanging them, memory is committed only as bytes are written, and
//! no lock is held across network I/O.
//!
//! The parts, each in its own module:
//! - [`ReplayBuffer`]: the bytes sent, kept for replay;
//! - [`BackedWriter`] and [`BackedReader`]: the two halves, each surviving transport loss;
//! - [`BackedPipe`]: both halves over one connection, with a background task that reconnects
//!   through a [`Reconnector`];
//! - [`Backoff`] and [`PipeConfig`]: retry timing and settings;
//! - [`session`]: the sans-IO core of session mode (acks, heartbeats, liveness);
//! - [`proto`]: the session protocol's wire layer (frames, decoder, handshake), sans-IO.
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
