//! The fleet certificate authority: one ECDSA P-256 key that signs every vehicle's
//! certificate and the coordinator's own server certificate.
//!
//! The CA lives in a directory (`ca.pem`, `ca.key`, the key readable by its owner only),
//! created on first use. Vehicle certificates carry the node id as their common name, are
//! valid for client authentication only, and live for the configured TTL (short: they are
//! renewed over the session, so a stolen certificate is useful for hours, not years).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// Hex serial number.
    pub serial: String,
    pub not_after: SystemTime,
}

pub struct FleetCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl FleetCa {
    /// Loads the CA from `dir`, creating it (and `dir`) on first use.
    pub fn open_or_create(dir: &Path, fleet_name: &str) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            return Self::from_pem(&cert_pem, &key_pem);
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = Self::generate(fleet_name)?;
        write_private(&key_path, &ca.issuer_key_pem())?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
        tracing::info!(dir = %dir.display(), "created the fleet CA");
        Ok(ca)
    }

    /// A new CA in memory (tests, and [`Self::open_or_create`]).
    pub fn generate(fleet_name: &str) -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("tokenfleet CA {fleet_name}"));
        dn.push(DnType::OrganizationName, "tokenfleet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 86400)).into();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    fn issuer_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a vehicle's CSR. The certificate names `node_id` (whatever the CSR's subject
    /// says: the node id comes from the enrollment token or the authenticated session) and is
    /// valid from `not_before` to `not_after` for TLS client authentication only.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        dn.push(DnType::OrganizationName, "tokenfleet vehicle");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = rand::random();
        // Positive, as DER integers for serials must be.
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f;
        let serial_hex = hex::encode(&serial);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(Issued {
            cert_pem: signed.pem(),
            serial: serial_hex,
            not_after,
        })
    }

    /// The coordinator's own TLS server certificate for `names` (IP addresses or DNS names),
    /// with its freshly generated key (PEM).
    pub fn server_identity(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "tokenfleet coordinator");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + ttl).into();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a private key readable by its owner only (mode 0600 from creation on).
pub fn write_private(path: &Path, pem: &str) -> Result<(), CaError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(pem.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
