//! The agent: the HTTP server, its stream registry, and the upgrades that carry streams.
