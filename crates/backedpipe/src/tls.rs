//! TLS for session mode's transports: a [`TlsConnector`] that wraps any [`Connector`] and a
//! [`TlsAcceptor`] for the server side, both on rustls with the ring provider. This module owns
//! loading certificates and keys from PEM files and the pinned-certificate check; it knows
//! nothing of the session protocol, which runs unchanged over the [`BoxIo`] it returns.
//!
//! A client trusts its server in one of two ways:
//! - [`TlsConnector::with_ca_file`]: the usual web PKI check, a chain to one of the CA
//!   certificates in a PEM file and a certificate valid for the server name;
//! - [`TlsConnector::with_pinned_cert`]: exactly one certificate, whatever its name, issuer or
//!   dates, for agents that make their own self-signed certificate and hand it over out of band.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::transport::{BoxIo, Connector};

/// Why a TLS connector or acceptor could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read: it is missing, unreadable, or not a file.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The file is not well-formed PEM (a section without its end line, or bad base64).
    #[error("{} is not valid PEM: {source}", path.display())]
    InvalidPem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        source: pem::Error,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("no certificate in {}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`).
    #[error("no private key in {}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The server name is neither a valid DNS name nor an IP address.
    #[error("invalid server name {name:?}")]
    InvalidServerName {
        /// The name as given.
        name: String,
    },
    /// rustls refused the configuration: for example a CA certificate it cannot parse, or a
    /// private key that does not match the certificate or that the provider cannot use.
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

/// The client side: dials the inner [`Connector`], then runs the TLS handshake over what it
/// returns. The session protocol sees only the decrypted stream.
///
/// ```no_run
/// # fn build() -> Result<(), backedpipe::TlsError> {
/// use backedpipe::{TcpConnector, TlsConnector};
///
/// let tcp = TcpConnector::new("127.0.0.1:7400".parse().unwrap());
/// let connector = TlsConnector::with_ca_file(tcp, "agent.example", "ca.pem")?;
/// # let _ = connector;
/// # Ok(()) }
/// ```
pub struct TlsConnector<C: Connector> {
    inner: C,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

impl<C: Connector> TlsConnector<C> {
    /// A connector with a configuration of the caller's own: client certificates, ALPN,
    /// another crypto provider, ... `server_name` is sent as SNI and, unless `config` says
    /// otherwise, checked against the server's certificate.
    pub fn new(inner: C, server_name: &str, config: Arc<ClientConfig>) -> Result<Self, TlsError> {
        Ok(TlsConnector {
            inner,
            server_name: parse_server_name(server_name)?,
            tls: tokio_rustls::TlsConnector::from(config),
        })
    }

    /// A connector that trusts the CA certificates in the PEM file at `ca_pem_path`: the
    /// server's chain must lead to one of them and its certificate must be valid for
    /// `server_name` (a DNS name or an IP address).
    pub fn with_ca_file(
        inner: C,
        server_name: &str,
        ca_pem_path: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certificates_in(ca_pem_path.as_ref())? {
            roots.add(ca)?;
        }
        let config = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::new(inner, server_name, Arc::new(config))
    }

    /// A connector that accepts exactly the certificate in the PEM file at `cert_pem_path`
    /// (the first, if there are several), whatever its name, issuer or validity dates: for a
    /// self-signed agent certificate handed to the client out of band. The server must still
    /// prove it holds that certificate's private key. `server_name` is only sent as SNI.
    pub fn with_pinned_cert(
        inner: C,
        server_name: &str,
        cert_pem_path: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let path = cert_pem_path.as_ref();
        let pinned = certificates_in(path)?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::NoCertificate { path: path.into() })?;
        let provider = ring_provider();
        let verifier = PinnedCertVerifier {
            pinned,
            provider: provider.clone(),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Self::new(inner, server_name, Arc::new(config))
    }
}

impl<C: Connector> Connector for TlsConnector<C> {
    async fn connect(&self) -> io::Result<BoxIo> {
        let transport = self.inner.connect().await?;
        let stream = self
            .tls
            .connect(self.server_name.clone(), transport)
            .await?;
        Ok(Box::new(stream))
    }
}

impl<C: Connector + fmt::Debug> fmt::Debug for TlsConnector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("inner", &self.inner)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The server side: runs the TLS handshake over an accepted transport. Cloning is cheap (the
/// configuration is shared), so one acceptor can serve every connection.
///
/// ```no_run
/// # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// use backedpipe::TlsAcceptor;
///
/// let acceptor = TlsAcceptor::from_pem_files("agent.pem", "agent.key")?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:7400").await?;
/// let (tcp, _peer) = listener.accept().await?;
/// let transport = acceptor.accept(Box::new(tcp)).await?;
/// # let _ = transport;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsAcceptor {
    tls: tokio_rustls::TlsAcceptor,
}

impl TlsAcceptor {
    /// An acceptor with a configuration of the caller's own (client authentication, ALPN,
    /// another crypto provider, ...).
    pub fn new(config: Arc<ServerConfig>) -> Self {
        TlsAcceptor {
            tls: tokio_rustls::TlsAcceptor::from(config),
        }
    }

    /// An acceptor presenting the certificate chain in the PEM file at `cert_path` (end-entity
    /// certificate first) with the private key in the PEM file at `key_path` (PKCS#8, PKCS#1
    /// or SEC1; the first key found). Clients are not asked for certificates.
    pub fn from_pem_files(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let chain = certificates_in(cert_path.as_ref())?;
        let key = private_key_in(key_path.as_ref())?;
        let config = ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(Self::new(Arc::new(config)))
    }

    /// Runs the server handshake over `io` and returns the encrypted stream. Fails with the
    /// handshake's error (kind `InvalidData` for a TLS failure) if the client gives up or
    /// misbehaves; bound it with a timeout, as a client that stalls stalls it too.
    pub async fn accept(&self, io: BoxIo) -> io::Result<BoxIo> {
        Ok(Box::new(self.tls.accept(io).await?))
    }
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

/// Accepts one certificate by its DER bytes, in place of the web PKI check, and still verifies
/// the handshake signatures so that the server proves it holds the matching private key.
#[derive(Debug)]
struct PinnedCertVerifier {
    pinned: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

/// The server presented a certificate other than the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate is not the pinned certificate")]
struct NotPinned;

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Certificates are public, so a plain comparison leaks nothing worth a constant-time one.
        if end_entity.as_ref() == self.pinned.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotPinned))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The crypto provider of every configuration built here. Named explicitly rather than taken
/// from the process default, so another crate enabling a second provider changes nothing.
fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned())
        .map_err(|_| TlsError::InvalidServerName { name: name.into() })
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Every certificate in the PEM file, in order; at least one.
fn certificates_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let contents = read_file(path)?;
    let certificates = CertificateDer::pem_slice_iter(&contents)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| invalid_pem(path, source))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certificates)
}

/// The first private key in the PEM file, of any of the formats rustls accepts.
fn private_key_in(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let contents = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&contents).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey { path: path.into() },
        source => invalid_pem(path, source),
    })
}

fn invalid_pem(path: &Path, source: pem::Error) -> TlsError {
    TlsError::InvalidPem {
        path: path.into(),
        source,
    }
}
