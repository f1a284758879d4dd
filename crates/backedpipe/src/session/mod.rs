//! Session mode (DESIGN §4): the framed protocol of `docs/PROTOCOL.md`, with acknowledgements,
//! backpressure, heartbeats, graceful close and authenticated resume.
//!
//! Each session is one sans-IO [`Connection`] that owns every offset and flag of the stream
//! across all of its transports, driven by one tokio task per session:
//!
//! ```text
//!  application ──read/write──► Session ─┐          ┌── Driver task (timers, resume, what the
//!                                       ├─ lock ───┤   application's calls leave undone)
//!                                       │ Connection (sans-IO) + current transport
//!  SessionServer::accept ── attaches a resumed transport ──┘
//! ```
//!
//! The application's reads and writes move bytes between its buffers, the connection and the
//! transport in its own task; the driver sleeps until the connection's next deadline, writes
//! what the transport would not take at once, reads while the application does not, and on a
//! client dials and resumes after a loss. A server's sessions resume through the
//! [`SessionServer`] (or a [`SessionListener`]) that accepted them.

mod client;
mod config;
mod connection;
mod driver;
mod establish;
mod listener;
mod options;
mod server;
mod shared;
mod stream;

pub use self::config::SessionConfig;
pub use self::connection::{Connection, Event, Transmit};
pub use self::listener::{Incoming, ListenerBuilder, SessionListener};
pub use self::options::SessionOptions;
pub use self::server::{Accepted, SessionServer};
pub use self::stream::{ReadHalf, Session, WriteHalf};
