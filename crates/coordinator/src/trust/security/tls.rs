//! TLS for the coordinator's listeners (rustls): the agent port with mandatory client
//! certificates from the fleet CA, and optionally HTTPS for the client API.
//!
//! Handshakes run in their own tasks ([`incoming`]), so a client that stalls its handshake
//! holds up nobody else; only finished handshakes reach the gRPC or HTTP server. Client
//! certificates are checked by webpki (chain to the fleet CA, validity period, client-auth
//! usage) and then against the revocation set, so a revoked vehicle never completes a
//! handshake again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A handshake not finished in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the server to take them.
const ACCEPTED_BUFFER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS material: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Who a client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    /// Hex serial number.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl NodeIdentity {
    /// Reads the node id (common name), serial and validity of a certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let node_id = cert
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string();
        let at = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Some(Self {
            node_id,
            serial: hex::encode(cert.raw_serial()),
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }
}

/// Node ids whose certificates are refused; shared by the verifier and the revocation watcher.
#[derive(Debug, Default, Clone)]
pub struct RevokedNodes(Arc<RwLock<HashSet<String>>>);

impl RevokedNodes {
    pub fn contains(&self, node_id: &str) -> bool {
        self.0.read().expect("revocation lock").contains(node_id)
    }

    /// Adds ids; returns the ones that were not revoked before.
    pub fn extend(&self, ids: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut set = self.0.write().expect("revocation lock");
        ids.into_iter()
            .filter(|id| set.insert(id.clone()))
            .collect()
    }
}

/// webpki's client verification plus the fleet's revocation set.
#[derive(Debug)]
struct FleetClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    revoked: RevokedNodes,
}

impl ClientCertVerifier for FleetClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::warn!(cause = %e, "agent certificate refused"))?;
        let Some(id) = NodeIdentity::from_der(end_entity) else {
            tracing::warn!("agent certificate refused: no common name");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ));
        };
        if self.revoked.contains(&id.node_id) {
            tracing::warn!(node = %id.node_id, serial = %id.serial, "agent certificate refused: node revoked");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem(e.to_string()))
}

/// The agent port: the coordinator's certificate, and client certificates required, chained
/// to `client_ca_pem` and not revoked. HTTP/2 only (gRPC).
pub fn agent_port_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
    revoked: RevokedNodes,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(client_ca_pem)? {
        roots.add(c)?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(FleetClientVerifier { webpki, revoked });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem)?, key(key_pem)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A server-authenticated listener (the client API over HTTPS, the enrollment port).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem)?, key(key_pem)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Accepts TCP connections and completes TLS handshakes concurrently; yields finished ones.
/// Plaintext clients and clients without an acceptable certificate fail their handshake and
/// never reach the server behind. Stops when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    label: &'static str,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(ACCEPTED_BUFFER);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = label, cause = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(listener = label, %peer, cause = %e, "TLS handshake refused")
                    }
                    Err(_) => tracing::info!(listener = label, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
