//! Reaching the agent: its address ([`ServerAddr`]), how TLS trusts it ([`TlsTrust`]), and the
//! [`Dialer`] that opens one fresh transport (TCP, or TLS over TCP) per request or stream
//! connection. This module knows nothing of HTTP.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use backedpipe::{BoxIo, Connector, TlsConnector};
use tokio::net::TcpStream;

use super::error::ClientError;

/// Where the agent listens: a host name or IP address, and a port.
///
/// Parsed from `HOST:PORT`, or `HOST` alone for the agent's default port
/// ([`DEFAULT_PORT`], 7400); an IPv6 address goes in brackets (`[::1]:7400`, `[::1]`).
///
/// ```
/// use immortal::client::ServerAddr;
///
/// let addr: ServerAddr = "[::1]:7400".parse().unwrap();
/// assert_eq!(addr.host(), "::1");
/// assert_eq!(addr.port(), 7400);
/// assert_eq!(addr.to_string(), "[::1]:7400");
/// let addr: ServerAddr = "myhost".parse().unwrap();
/// assert_eq!(addr.to_string(), "myhost:7400");
/// assert!("::1".parse::<ServerAddr>().is_err()); // brackets, please: [::1]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    host: String,
    port: u16,
}

impl ServerAddr {
    /// The host name or IP address (without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for ServerAddr {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadServer(text.to_owned());
        let default_port = DEFAULT_PORT.to_string();
        let (host, port) = match text.rsplit_once(':') {
            // `HOST` or `[V6]` alone: the default port.
            None => (text, default_port.as_str()),
            Some(_) if text.starts_with('[') && text.ends_with(']') => {
                (text, default_port.as_str())
            }
            Some(split) => split,
        };
        let host = match host.strip_prefix('[') {
            Some(inner) => inner.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(ServerAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    /// `HOST:PORT`, with an IPv6 address in brackets: the form of an HTTP `Host` header.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The port the agent listens on unless told otherwise, and the one a `--server HOST` without
/// a port means.
pub const DEFAULT_PORT: u16 = 7400;

/// How the client trusts an agent that serves TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsTrust {
    /// Plain TCP, no TLS.
    None,
    /// The agent's certificate must chain to a CA certificate in this PEM file and be valid
    /// for the host name.
    CaFile(PathBuf),
    /// The agent must present exactly the certificate in this PEM file (for a self-signed
    /// agent).
    PinnedCert(PathBuf),
}

/// How long opening one transport (name lookup, TCP, TLS) may take before the agent counts as
/// unreachable: long enough for a slow link, short enough that a black-holed route fails.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens transports to the agent: TCP with `TCP_NODELAY`, wrapped in TLS when configured.
#[derive(Clone)]
pub struct Dialer {
    server: ServerAddr,
    transport: Arc<Transport>,
}

enum Transport {
    Plain(TcpDialer),
    Tls(TlsConnector<TcpDialer>),
}

impl Dialer {
    /// A dialer for `server`, trusting it as `trust` says.
    ///
    /// # Errors
    /// [`ClientError::TlsConfig`] when a PEM file cannot be loaded or the host is not a valid
    /// TLS server name.
    pub fn new(server: ServerAddr, trust: &TlsTrust) -> Result<Dialer, ClientError> {
        let tcp = TcpDialer {
            server: server.clone(),
        };
        let tls_error = |err| ClientError::TlsConfig(Arc::new(err));
        let transport = match trust {
            TlsTrust::None => Transport::Plain(tcp),
            TlsTrust::CaFile(path) => Transport::Tls(
                TlsConnector::with_ca_file(tcp, server.host(), path).map_err(tls_error)?,
            ),
            TlsTrust::PinnedCert(path) => Transport::Tls(
                TlsConnector::with_pinned_cert(tcp, server.host(), path).map_err(tls_error)?,
            ),
        };
        Ok(Dialer {
            server,
            transport: Arc::new(transport),
        })
    }

    /// The agent's address.
    pub fn server(&self) -> &ServerAddr {
        &self.server
    }

    /// Opens one transport to the agent, within [`DIAL_TIMEOUT`].
    ///
    /// # Errors
    /// [`ClientError::Unreachable`] if the TCP connection could not be made,
    /// [`ClientError::Tls`] if the TLS handshake failed.
    pub async fn dial(&self) -> Result<BoxIo, ClientError> {
        let attempt = async {
            match &*self.transport {
                Transport::Plain(tcp) => tcp.connect().await,
                Transport::Tls(tls) => tls.connect().await,
            }
        };
        match tokio::time::timeout(DIAL_TIMEOUT, attempt).await {
            Ok(Ok(io)) => Ok(io),
            Ok(Err(err)) => Err(self.classify(err)),
            Err(_) => Err(ClientError::Unreachable {
                server: self.server.to_string(),
                reason: format!("no answer within {} s", DIAL_TIMEOUT.as_secs()),
            }),
        }
    }

    /// TCP failures come back marked by [`TcpDialer`]; anything else failed in TLS.
    fn classify(&self, err: io::Error) -> ClientError {
        let server = self.server.to_string();
        match err.get_ref().and_then(|e| e.downcast_ref::<TcpDialError>()) {
            Some(tcp) => ClientError::Unreachable {
                server,
                reason: tcp.to_string(),
            },
            None => ClientError::Tls {
                server,
                reason: err.to_string(),
            },
        }
    }
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tls = matches!(&*self.transport, Transport::Tls(_));
        f.debug_struct("Dialer")
            .field("server", &self.server)
            .field("tls", &tls)
            .finish()
    }
}

/// A TCP connection could not be made (the marker that tells it from a TLS failure).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TcpDialError(io::Error);

/// Resolves the host and connects to the first address that answers: a [`Connector`], so
/// that [`TlsConnector`] can wrap it.
struct TcpDialer {
    server: ServerAddr,
}

impl Connector for TcpDialer {
    async fn connect(&self) -> io::Result<BoxIo> {
        let marked = |err: io::Error| io::Error::new(err.kind(), TcpDialError(err));
        let addrs = tokio::net::lookup_host((self.server.host(), self.server.port()))
            .await
            .map_err(marked)?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(marked)?;
                    return Ok(Box::new(stream));
                }
                Err(err) => last = Some(err),
            }
        }
        Err(marked(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address")
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_parse_and_print() {
        for (text, host, port) in [
            ("127.0.0.1:7400", "127.0.0.1", 7400),
            ("agent.example:443", "agent.example", 443),
            ("[::1]:7400", "::1", 7400),
        ] {
            let addr: ServerAddr = text.parse().unwrap();
            assert_eq!((addr.host(), addr.port()), (host, port));
            assert_eq!(addr.to_string(), text);
        }
        // No port: the agent's default (this was refused).
        for (text, host) in [("host", "host"), ("10.0.0.1", "10.0.0.1"), ("[::1]", "::1")] {
            let addr: ServerAddr = text.parse().unwrap();
            assert_eq!((addr.host(), addr.port()), (host, DEFAULT_PORT), "{text}");
        }
        for bad in [
            "",
            "::1",
            "[]",
            ":7400",
            "host:",
            "host:0",
            "host:99999",
            "::1:7400",
            "[::1:7400",
        ] {
            assert!(
                matches!(bad.parse::<ServerAddr>(), Err(ClientError::BadServer(_))),
                "{bad:?} parsed"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dialer = Dialer::new(addr.to_string().parse().unwrap(), &TlsTrust::None).unwrap();
        assert!(matches!(
            dialer.dial().await,
            Err(ClientError::Unreachable { .. })
        ));
    }
}
