//! The client: the management API over HTTP, and dialing a stream by HTTP upgrade.
