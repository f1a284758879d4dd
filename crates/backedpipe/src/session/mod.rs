//! The sans-IO session core of session mode (DESIGN §4): when to acknowledge, when to probe an
//! idle path, when to declare a silent one dead, and which acknowledgements are lies.
//!
//! It owns timing and counters only. The bytes of the stream live in the writer's replay
//! buffer and the wire format in [`proto`](crate::proto); a driver feeds this core the frames it
//! receives and the bytes the application consumes, sends what [`SessionCore::poll_transmit`]
//! returns, sleeps until [`SessionCore::poll_timeout`], and acts on [`SessionCore::poll_event`].

mod core;
mod timer;

pub use self::core::{Event, SessionConfig, SessionCore, SessionViolation, Transmit};
pub use self::timer::{Timer, TimerTable};
