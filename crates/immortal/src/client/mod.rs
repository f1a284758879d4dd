//! The client side of the agent: its HTTP management API ([`ApiClient`]) and the connections
//! that carry a stream ([`StreamConnector`], a [`backedpipe::Connector`]).
//!
//! This module owns how a client talks to an agent: the address and TLS trust
//! ([`dial`](Dialer)), one HTTP/1.1 request per connection, the typed errors of
//! [`ClientError`], and the upgrade to the session protocol. It knows nothing of the command
//! line (see [`crate::cli`]) and nothing of the agent's internals: the contract between the two
//! is [`crate::api`].

mod api_client;
mod dial;
mod error;
mod network;
mod ssh;
mod stream;

pub use self::api_client::{ApiClient, REQUEST_TIMEOUT};
pub use self::dial::{Dialer, ServerAddr, TlsTrust, DEFAULT_PORT, DIAL_TIMEOUT};
pub use self::error::ClientError;
pub use self::network::{network_changes, probe_on_network_changes, PROBE_WITHIN};
pub use self::ssh::{
    inside_carrier, Carriers, SshCarrier, SshCommand, SshCommandError, SshConnector, CARRIER_ENV,
    CARRIER_LINGER, SSH_COMMAND_ENV,
};
pub use self::stream::{
    Carrier, GoneSignal, StreamConnector, ATTEMPT_TIMEOUT, FAST_PHASE, MAX_ATTEMPT_TIMEOUT,
    SLOW_PACE,
};
