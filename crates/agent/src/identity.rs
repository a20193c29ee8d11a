//! The vehicle's fleet identity: enrollment, the key and certificate on disk, renewal.
//!
//! `tokenfleet enroll` generates an ECDSA P-256 key on the vehicle, sends only a CSR (and,
//! with a TPM, the attestation key's public area) with the operator's one-time token, and
//! stores what comes back in the identity directory:
//!
//! - `node.pem`: the node certificate (short-lived; renewed over the session) followed by its
//!   private key, in one file of mode 0600 so that a renewal replaces both in one rename; the
//!   key is never sent anywhere,
//! - `fleet-ca.pem`: the fleet CA, the only trust anchor for the coordinator,
//! - `node-id`: the node id the operator bound to the token (the certificate's common name).
//!
//! Renewal replaces key and certificate together (a fresh key each time), atomically.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use tokenfleet_protocol::v1::{self, enrollment_client::EnrollmentClient};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::attest::Attestor;
use crate::AgentError;

/// A directory holding one enrolled identity.
#[derive(Debug, Clone)]
pub struct IdentityDir {
    pub dir: PathBuf,
}

/// A key generated on the vehicle and the CSR that asks for its certificate.
pub struct PendingKey {
    key: KeyPair,
    pub csr_pem: String,
}

impl PendingKey {
    pub fn generate() -> Result<Self, AgentError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AgentError::Config(format!("generating the node key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // The coordinator names the certificate after the token's node id, not this.
        dn.push(DnType::CommonName, "tokenfleet vehicle");
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| AgentError::Config(format!("creating the CSR: {e}")))?;
        Ok(Self { key, csr_pem: csr })
    }
}

fn write_atomic(path: &Path, contents: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl IdentityDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Certificate and private key (PEM, mode 0600).
    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("node.pem")
    }
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("fleet-ca.pem")
    }
    pub fn node_id_path(&self) -> PathBuf {
        self.dir.join("node-id")
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, AgentError> {
        std::fs::read(path).map_err(|e| {
            AgentError::Config(format!(
                "{}: {e} (enroll the vehicle first: tokenfleet enroll)",
                path.display()
            ))
        })
    }

    /// The enrolled node id.
    pub fn node_id(&self) -> Result<String, AgentError> {
        let raw = self.read(&self.node_id_path())?;
        Ok(String::from_utf8_lossy(&raw).trim().to_string())
    }

    /// TLS settings for the agent port: this node's certificate and key, and the fleet CA.
    pub fn client_tls(&self) -> Result<ClientTlsConfig, AgentError> {
        // The file holds both: the certificate parser skips the key and the key parser the
        // certificate.
        let pem = self.read(&self.identity_path())?;
        let ca = self.read(&self.ca_path())?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(&pem, &pem)))
    }

    /// Stores a certificate with the key it certifies, replacing both in one rename.
    pub fn store(&self, key: &PendingKey, cert_pem: &str) -> Result<(), AgentError> {
        let io = |e: std::io::Error| AgentError::Config(format!("{}: {e}", self.dir.display()));
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut pem = cert_pem.trim_end().to_string();
        pem.push('\n');
        pem.push_str(&key.key.serialize_pem());
        write_atomic(&self.identity_path(), pem.as_bytes(), true).map_err(io)
    }

    fn store_enrollment(&self, key: &PendingKey, r: &v1::EnrollResponse) -> Result<(), AgentError> {
        let io = |e: std::io::Error| AgentError::Config(format!("{}: {e}", self.dir.display()));
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        write_atomic(&self.ca_path(), r.ca_pem.as_bytes(), false).map_err(io)?;
        write_atomic(&self.node_id_path(), r.node_id.as_bytes(), false).map_err(io)?;
        self.store(key, &r.cert_pem)
    }
}

/// What an enrollment produced.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub node_id: String,
    pub not_after_unix_ms: u64,
    pub attested: bool,
}

/// Enrolls this vehicle: `endpoint` is the coordinator's enrollment service
/// (`https://host:50052`), `ca_pem` the fleet CA the operator handed out with the token (the
/// only certificate trusted for the coordinator), `attestor` the vehicle's TPM if it has one.
pub async fn enroll(
    endpoint: &str,
    ca_pem: &[u8],
    token: &str,
    dir: &IdentityDir,
    attestor: Option<&dyn Attestor>,
) -> Result<Enrolled, AgentError> {
    if !endpoint.starts_with("https://") {
        return Err(AgentError::Config(format!(
            "enrollment needs TLS: {endpoint:?} is not an https:// address"
        )));
    }
    let key = PendingKey::generate()?;
    let attestation_key = match attestor {
        Some(a) => a
            .attestation_key()
            .map_err(|e| AgentError::Config(e.to_string()))?,
        None => Vec::new(),
    };
    let channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| AgentError::Config(format!("enrollment address {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .map_err(|e| AgentError::Config(e.to_string()))?
        .connect()
        .await
        .map_err(|e| AgentError::Connect(format!("{endpoint}: {e}")))?;
    let attested = !attestation_key.is_empty();
    let response = EnrollmentClient::new(channel)
        .enroll(v1::EnrollRequest {
            token: token.to_string(),
            csr_pem: key.csr_pem.clone(),
            attestation_key,
        })
        .await
        .map_err(|s| AgentError::Refused(s.message().to_string()))?
        .into_inner();
    dir.store_enrollment(&key, &response)?;
    tracing::info!(node = %response.node_id, attested, dir = %dir.dir.display(), "enrolled");
    Ok(Enrolled {
        node_id: response.node_id,
        not_after_unix_ms: response.not_after_unix_ms,
        attested,
    })
}
