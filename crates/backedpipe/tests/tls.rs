//! TLS over session mode's transports: which servers each kind of client trusts, and the typed
//! errors for bad certificate and key files. Certificates are made fresh by rcgen and written to
//! a temporary directory; servers listen on loopback TCP or an in-memory duplex.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backedpipe::{
    connector_fn, BoxIo, Connector, TcpConnector, TlsAcceptor, TlsConnector, TlsError,
};
use common::guarded_rt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const AGENT_NAME: &str = "agent.test";
const PING: &[u8] = b"ping over tls";

/// A certificate and its key, written as PEM files.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
}

/// A certificate authority that signs server certificates.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    cert: PathBuf,
}

fn write(dir: &TempDir, file: &str, contents: &str) -> PathBuf {
    let path = dir.path().join(file);
    std::fs::write(&path, contents).expect("write to the temporary directory");
    path
}

fn authority(dir: &TempDir, common_name: &str) -> Authority {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let cert = write(dir, &format!("{common_name}.pem"), &issuer.pem());
    Authority { issuer, cert }
}

fn issued_by(dir: &TempDir, ca: &Authority, name: &str, file: &str) -> Identity {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    Identity {
        cert: write(dir, &format!("{file}.pem"), &cert.pem()),
        key: write(dir, &format!("{file}.key"), &key.serialize_pem()),
    }
}

fn self_signed(dir: &TempDir, name: &str, file: &str) -> Identity {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    Identity {
        cert: write(dir, &format!("{file}.pem"), &certified.cert.pem()),
        key: write(
            dir,
            &format!("{file}.key"),
            &certified.signing_key.serialize_pem(),
        ),
    }
}

fn acceptor(identity: &Identity) -> TlsAcceptor {
    TlsAcceptor::from_pem_files(&identity.cert, &identity.key).expect("server identity loads")
}

/// Serves one TLS connection on loopback TCP: completes the handshake, then echoes one `PING`.
async fn serve_once(acceptor: TlsAcceptor) -> (SocketAddr, JoinHandle<io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _peer) = listener.accept().await?;
        echo_one_ping(acceptor.accept(Box::new(tcp)).await?).await
    });
    (addr, server)
}

async fn echo_one_ping(mut stream: BoxIo) -> io::Result<()> {
    let mut buf = [0; PING.len()];
    stream.read_exact(&mut buf).await?;
    stream.write_all(&buf).await?;
    stream.shutdown().await
}

/// Connects, sends `PING` and checks it comes back.
async fn ping(connector: &impl Connector) -> io::Result<()> {
    let mut stream = connector.connect().await?;
    stream.write_all(PING).await?;
    stream.flush().await?;
    let mut echoed = [0; PING.len()];
    stream.read_exact(&mut echoed).await?;
    assert_eq!(echoed, PING);
    Ok(())
}

/// The rustls error a failed handshake carries.
fn tls_cause(err: &io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {err:?}"))
}

fn tcp(addr: SocketAddr) -> TcpConnector {
    TcpConnector::new(addr)
}

#[tokio::test]
async fn ca_file_client_completes_handshake_and_bytes_round_trip() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let ca = authority(&dir, "test-ca");
        let agent = issued_by(&dir, &ca, AGENT_NAME, "agent");
        let (addr, server) = serve_once(acceptor(&agent)).await;

        let client = TlsConnector::with_ca_file(tcp(addr), AGENT_NAME, &ca.cert).unwrap();
        ping(&client).await.expect("round trip over TLS");
        server
            .await
            .unwrap()
            .expect("server side of the round trip");
    })
    .await;
}

#[tokio::test]
async fn ca_file_client_verifies_an_ip_address_name() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let ca = authority(&dir, "test-ca");
        let agent = issued_by(&dir, &ca, "127.0.0.1", "agent");
        let (addr, server) = serve_once(acceptor(&agent)).await;

        let client = TlsConnector::with_ca_file(tcp(addr), "127.0.0.1", &ca.cert).unwrap();
        ping(&client).await.expect("round trip over TLS");
        server.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn ca_file_client_rejects_a_server_from_another_ca() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let trusted = authority(&dir, "trusted-ca");
        let other = authority(&dir, "other-ca");
        let agent = issued_by(&dir, &other, AGENT_NAME, "agent");
        let (addr, server) = serve_once(acceptor(&agent)).await;

        let client = TlsConnector::with_ca_file(tcp(addr), AGENT_NAME, &trusted.cert).unwrap();
        let err = client.connect().await.err().expect("handshake must fail");
        assert!(
            matches!(tls_cause(&err), rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
        assert!(server.await.unwrap().is_err(), "server sees the failure");
    })
    .await;
}

#[tokio::test]
async fn ca_file_client_rejects_a_certificate_for_another_name() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let ca = authority(&dir, "test-ca");
        let agent = issued_by(&dir, &ca, "someone-else.test", "agent");
        let (addr, server) = serve_once(acceptor(&agent)).await;

        let client = TlsConnector::with_ca_file(tcp(addr), AGENT_NAME, &ca.cert).unwrap();
        let err = client.connect().await.err().expect("handshake must fail");
        assert!(
            matches!(
                tls_cause(&err),
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
        assert!(server.await.unwrap().is_err(), "server sees the failure");
    })
    .await;
}

#[tokio::test]
async fn pinned_client_accepts_the_pinned_self_signed_certificate() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let agent = self_signed(&dir, AGENT_NAME, "agent");
        let (addr, server) = serve_once(acceptor(&agent)).await;

        let client = TlsConnector::with_pinned_cert(tcp(addr), AGENT_NAME, &agent.cert).unwrap();
        ping(&client).await.expect("round trip over TLS");
        server.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn pinned_client_accepts_the_pinned_certificate_whatever_its_name() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let agent = self_signed(&dir, "named-otherwise.test", "agent");
        let (addr, server) = serve_once(acceptor(&agent)).await;

        let client = TlsConnector::with_pinned_cert(tcp(addr), AGENT_NAME, &agent.cert).unwrap();
        ping(&client).await.expect("round trip over TLS");
        server.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn pinned_client_rejects_a_different_certificate_for_the_same_name() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let pinned = self_signed(&dir, AGENT_NAME, "pinned");
        let impostor = self_signed(&dir, AGENT_NAME, "impostor");
        let (addr, server) = serve_once(acceptor(&impostor)).await;

        let client = TlsConnector::with_pinned_cert(tcp(addr), AGENT_NAME, &pinned.cert).unwrap();
        let err = client.connect().await.err().expect("handshake must fail");
        assert!(
            matches!(tls_cause(&err), rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
        assert!(server.await.unwrap().is_err(), "server sees the failure");
    })
    .await;
}

#[tokio::test]
async fn tls_connector_wraps_any_connector_such_as_an_in_memory_duplex() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let agent = self_signed(&dir, AGENT_NAME, "agent");
        let (client_end, server_end) = tokio::io::duplex(4096);
        let server_acceptor = acceptor(&agent);
        let server = tokio::spawn(async move {
            echo_one_ping(server_acceptor.accept(Box::new(server_end)).await?).await
        });

        let slot = Arc::new(Mutex::new(Some(client_end)));
        let duplex = connector_fn(move || {
            let end = slot.lock().unwrap().take();
            async move {
                let end = end.ok_or_else(|| io::Error::other("the duplex was used already"))?;
                Ok::<BoxIo, io::Error>(Box::new(end))
            }
        });
        let client = TlsConnector::with_pinned_cert(duplex, AGENT_NAME, &agent.cert).unwrap();
        ping(&client).await.expect("round trip over TLS");
        server.await.unwrap().unwrap();
    })
    .await;
}

fn unused_connector() -> TcpConnector {
    tcp("127.0.0.1:9".parse().unwrap())
}

#[test]
fn a_missing_ca_file_gives_a_read_error_naming_it() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = TlsConnector::with_ca_file(unused_connector(), AGENT_NAME, &missing).unwrap_err();
    match &err {
        TlsError::Read { path, source } => {
            assert_eq!(path, &missing);
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[test]
fn a_missing_key_file_gives_a_read_error_naming_it() {
    let dir = TempDir::new().unwrap();
    let agent = self_signed(&dir, AGENT_NAME, "agent");
    let missing = dir.path().join("missing.key");
    let err = TlsAcceptor::from_pem_files(&agent.cert, &missing).unwrap_err();
    assert!(
        matches!(&err, TlsError::Read { path, .. } if path == &missing),
        "{err:?}"
    );
}

#[test]
fn a_key_file_without_a_key_gives_no_private_key() {
    let dir = TempDir::new().unwrap();
    let agent = self_signed(&dir, AGENT_NAME, "agent");
    // The certificate file holds a certificate but no key.
    let err = TlsAcceptor::from_pem_files(&agent.cert, &agent.cert).unwrap_err();
    assert!(
        matches!(&err, TlsError::NoPrivateKey { path } if path == &agent.cert),
        "{err:?}"
    );
}

#[test]
fn a_certificate_file_without_a_certificate_gives_no_certificate() {
    let dir = TempDir::new().unwrap();
    let agent = self_signed(&dir, AGENT_NAME, "agent");
    // The key file holds a key but no certificate.
    let err = TlsAcceptor::from_pem_files(&agent.key, &agent.key).unwrap_err();
    assert!(
        matches!(&err, TlsError::NoCertificate { path } if path == &agent.key),
        "{err:?}"
    );
    let err =
        TlsConnector::with_pinned_cert(unused_connector(), AGENT_NAME, &agent.key).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    let err = TlsConnector::with_ca_file(unused_connector(), AGENT_NAME, &agent.key).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
}

#[test]
fn a_truncated_pem_section_gives_invalid_pem() {
    let dir = TempDir::new().unwrap();
    let truncated = write(&dir, "truncated.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
    let err = TlsConnector::with_ca_file(unused_connector(), AGENT_NAME, &truncated).unwrap_err();
    assert!(
        matches!(&err, TlsError::InvalidPem { path, .. } if path == &truncated),
        "{err:?}"
    );
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_a_config_error() {
    let dir = TempDir::new().unwrap();
    let agent = self_signed(&dir, AGENT_NAME, "agent");
    let other = self_signed(&dir, AGENT_NAME, "other");
    let err = TlsAcceptor::from_pem_files(&agent.cert, &other.key).unwrap_err();
    assert!(matches!(err, TlsError::Config(_)), "{err:?}");
}

#[test]
fn an_invalid_server_name_is_rejected() {
    let dir = TempDir::new().unwrap();
    let agent = self_signed(&dir, AGENT_NAME, "agent");
    let err =
        TlsConnector::with_pinned_cert(unused_connector(), "not a name!", &agent.cert).unwrap_err();
    assert!(
        matches!(&err, TlsError::InvalidServerName { name } if name == "not a name!"),
        "{err:?}"
    );
}

/// A server presenting the pinned certificate but signing with another key: only the
/// handshake signature check can catch it, as the certificate bytes match.
fn acceptor_with_the_wrong_key(cert_pem: &Path) -> TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

    let provider = rustls::crypto::ring::default_provider();
    let wrong_key = KeyPair::generate().unwrap().serialize_der();
    let signing_key = provider
        .key_provider
        .load_private_key(PrivatePkcs8KeyDer::from(wrong_key).into())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(cert_pem).unwrap()];
    let resolver =
        rustls::sign::SingleCertAndKey::from(rustls::sign::CertifiedKey::new(chain, signing_key));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    TlsAcceptor::new(Arc::new(config))
}

#[tokio::test]
async fn pinned_client_rejects_a_server_without_the_pinned_certificates_key() {
    guarded_rt(async {
        let dir = TempDir::new().unwrap();
        let pinned = self_signed(&dir, AGENT_NAME, "pinned");
        let (addr, server) = serve_once(acceptor_with_the_wrong_key(&pinned.cert)).await;

        let client = TlsConnector::with_pinned_cert(tcp(addr), AGENT_NAME, &pinned.cert).unwrap();
        let err = client.connect().await.err().expect("handshake must fail");
        assert!(
            matches!(
                tls_cause(&err),
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
            ),
            "{err:?}"
        );
        assert!(server.await.unwrap().is_err(), "server sees the failure");
    })
    .await;
}
