//! Remote attestation on the vehicle: what the agent measures and how it proves it.
//!
//! At start the agent measures its own executable and every model it serves (sha256) and
//! extends them, in order, into a resettable PCR of the vehicle's TPM. When the coordinator
//! sends a fresh nonce ([`v1::AttestChallenge`]) the agent answers with a TPM quote over that
//! PCR signed by its attestation key, plus the measurement log; the coordinator replays the log
//! into the quoted PCR digest and checks it against its policy before assigning any job.
//!
//! - [`Attestor`]: the agent's view of a TPM (quote a nonce, tell the attestation key).
//! - [`tpm`]: the TPM 2.0 implementation (tss-esapi; a software TPM such as swtpm in tests).
//! - [`Measured`]: one entry of the log.

pub mod tpm;

use sha2::{Digest, Sha256};
use tokenfleet_protocol::v1;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("TPM: {0}")]
    Tpm(String),
    #[error("TPM: {0}")]
    Tss(#[from] tss_esapi::Error),
    #[error("cannot measure {path}: {source}")]
    Measure {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// One measurement extended into the PCR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    pub kind: v1::MeasurementKind,
    pub name: String,
    pub sha256: [u8; 32],
}

impl Measured {
    /// Measures a file by streaming it through sha256.
    pub fn file(
        kind: v1::MeasurementKind,
        name: impl Into<String>,
        path: &std::path::Path,
    ) -> Result<Self, AttestError> {
        let err = |source| AttestError::Measure {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(err)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(err)?;
        Ok(Self {
            kind,
            name: name.into(),
            sha256: h.finalize().into(),
        })
    }

    /// The agent's own executable.
    pub fn own_binary() -> Result<Self, AttestError> {
        let exe = std::env::current_exe().map_err(|source| AttestError::Measure {
            path: "/proc/self/exe".into(),
            source,
        })?;
        Self::file(v1::MeasurementKind::AgentBinary, "tokenfleet-agent", &exe)
    }

    /// A model whose sha256 is already known (the agent hashes its GGUF when it loads it).
    pub fn model(name: impl Into<String>, sha256_hex: &str) -> Result<Self, AttestError> {
        let bytes = hex::decode(sha256_hex)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| AttestError::Tpm(format!("model sha256 {sha256_hex:?} is not hex")))?;
        Ok(Self {
            kind: v1::MeasurementKind::Model,
            name: name.into(),
            sha256: bytes,
        })
    }

    pub fn to_wire(&self) -> v1::Measurement {
        v1::Measurement {
            kind: self.kind as i32,
            name: self.name.clone(),
            sha256: self.sha256.to_vec(),
        }
    }
}

/// What an attestor returns for one nonce: the signed quote and the log it covers.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub attest: Vec<u8>,
    pub signature_r: Vec<u8>,
    pub signature_s: Vec<u8>,
    pub log: Vec<Measured>,
}

impl Evidence {
    pub fn to_wire(&self) -> v1::AttestQuote {
        v1::AttestQuote {
            attest: self.attest.clone(),
            signature_r: self.signature_r.clone(),
            signature_s: self.signature_s.clone(),
            log: self.log.iter().map(Measured::to_wire).collect(),
            unavailable: String::new(),
        }
    }
}

/// A TPM as the agent uses it. Calls block (a TPM command takes milliseconds): the session
/// runs them on the blocking pool.
pub trait Attestor: Send + Sync + 'static {
    /// The attestation key's public area (marshalled TPMT_PUBLIC), registered at enrollment.
    fn attestation_key(&self) -> Result<Vec<u8>, AttestError>;
    /// A quote over the measurement PCR with `nonce` as qualifying data.
    fn quote(&self, nonce: &[u8], pcr_index: u32) -> Result<Evidence, AttestError>;
}
