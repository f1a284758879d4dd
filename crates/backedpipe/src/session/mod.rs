//! Session mode (DESIGN §4): the framed protocol of `docs/PROTOCOL.md` run under a
//! [`BackedPipe`](crate::BackedPipe), with acknowledgements, backpressure, heartbeats, graceful
//! close and authenticated resume.
//!
//! The sans-IO part decides timing and counters only: [`SessionCore`] is fed the frames
//! received and the bytes the application consumes, says what to send
//! ([`SessionCore::poll_transmit`]), when to wake ([`SessionCore::poll_timeout`]) and what to act
//! on ([`SessionCore::poll_event`]). The bytes of the stream live in the writer's replay buffer
//! and the wire format in [`proto`](crate::proto).
//!
//! The tokio part moves bytes and sleeps: each transport is a [`SessionConn`] with a driver
//! task; the application holds a [`Session`], made by
//! [`Session::connect`](crate::Session::connect) on the client and by
//! [`SessionServer::accept`](crate::SessionServer::accept) on the server, or handed over by a
//! [`SessionListener`] that listens.

mod client;
mod conn;
mod core;
mod establish;
mod link;
mod listener;
mod options;
mod server;
mod stream;
mod timer;

pub use self::conn::SessionConn;
pub use self::core::{Event, SessionConfig, SessionCore, SessionViolation, Transmit};
pub use self::listener::{Incoming, ListenerBuilder, SessionListener};
pub use self::options::SessionOptions;
pub use self::server::{Accepted, SessionServer};
pub use self::stream::Session;
pub use self::timer::{Timer, TimerTable};
