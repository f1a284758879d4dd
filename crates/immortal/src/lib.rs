//! `immortal`: keeps SSH sessions and port-forwards alive across laptop sleep and network
//! changes.
//!
//! An agent ([`server`]) runs on the remote host and exposes its local TCP services as
//! immortal streams: each stream is a [`backedpipe::Session`] carried over an HTTP upgrade (raw
//! or WebSocket) that the client ([`client`]) re-establishes after every network loss, with
//! nothing lost and nothing duplicated. The [`cli`] module holds the subcommands of the
//! `immortal` binary.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, unused_qualifications)]

pub mod api;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod runtime_dir;
pub mod server;
pub mod socket_proto;
pub mod token;
pub mod ws_io;
