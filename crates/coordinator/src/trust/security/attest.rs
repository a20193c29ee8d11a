//! Verifying a vehicle's TPM 2.0 quote: pure Rust (p256 + sha2), no TSS on the coordinator.
//!
//! A quote is accepted when, in this order: the attestation key registered at enrollment
//! parses; the TPMS_ATTEST is a quote (magic, type) signed by that key (qualifiedSigner is
//! the key's qualified name, the ECDSA P-256 signature over sha256(attest) verifies); its
//! extraData is the nonce this coordinator just sent (so an old quote cannot be replayed);
//! it covers exactly the configured PCR in the sha256 bank; the PCR digest equals the one
//! replayed from the agent's measurement log; and the log names an allowed agent build and
//! only allowed models, including every model the agent offers to serve.

use std::collections::HashSet;

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use tokenfleet_protocol::v1;

use crate::config::models::Sha256Hex;
use crate::config::security::AttestationPolicy;

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_RH_OWNER: u32 = 0x4000_0001;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestFailure {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("the agent has no TPM: {0}")]
    Unavailable(String),
    #[error("the quote is not signed by the node's enrolled attestation key")]
    WrongSigner,
    #[error("the quote's signature does not verify")]
    BadSignature,
    #[error("the quote does not answer this challenge (stale or replayed)")]
    StaleNonce,
    #[error("the quote covers the wrong PCRs")]
    WrongPcrSelection,
    #[error("the PCR digest does not match the measurement log")]
    LogMismatch,
    #[error("agent build {0} is not allowed by policy")]
    AgentNotAllowed(String),
    #[error("the log must start with exactly one agent binary measurement")]
    NoAgentMeasurement,
    #[error("model {name} (sha256 {sha256}) is not allowed by policy")]
    ModelNotAllowed { name: String, sha256: String },
    #[error("model {0} is offered but was not measured")]
    ModelNotMeasured(String),
}

/// A reader over TPM wire structures (big-endian, sized buffers).
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], AttestFailure> {
        if self.0.len() < n {
            return Err(AttestFailure::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, AttestFailure> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, AttestFailure> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, AttestFailure> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A TPM2B: u16 size, then that many bytes.
    fn sized(&mut self, what: &'static str) -> Result<&'a [u8], AttestFailure> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
}

/// The parts of a registered attestation key the verifier needs.
pub struct AttestationKey {
    key: VerifyingKey,
    /// TPM qualified name under the owner hierarchy (the key is a primary key there).
    qualified_name: Vec<u8>,
}

impl AttestationKey {
    /// Parses a marshalled TPMT_PUBLIC of an ECC P-256 restricted signing key.
    pub fn from_tpmt_public(public: &[u8]) -> Result<Self, AttestFailure> {
        const WHAT: &str = "attestation key";
        let mut w = Wire(public);
        if w.u16(WHAT)? != TPM_ALG_ECC {
            return Err(AttestFailure::Malformed(WHAT));
        }
        if w.u16(WHAT)? != TPM_ALG_SHA256 {
            return Err(AttestFailure::Malformed(WHAT));
        }
        let attributes = w.u32(WHAT)?;
        const RESTRICTED: u32 = 1 << 16;
        const SIGN: u32 = 1 << 18;
        const FIXED_TPM: u32 = 1 << 1;
        if attributes & (RESTRICTED | SIGN | FIXED_TPM) != RESTRICTED | SIGN | FIXED_TPM {
            // Only a restricted key guarantees the TPM signed its own attestation structure.
            return Err(AttestFailure::Malformed(
                "attestation key (not a restricted TPM signing key)",
            ));
        }
        w.sized(WHAT)?; // authPolicy
        if w.u16(WHAT)? != 0x0010 {
            return Err(AttestFailure::Malformed(WHAT)); // symmetric must be TPM_ALG_NULL
        }
        let scheme = w.u16(WHAT)?;
        if scheme != 0x0010 {
            w.u16(WHAT)?; // the scheme's hash
        }
        if w.u16(WHAT)? != 0x0003 {
            return Err(AttestFailure::Malformed("attestation key (not NIST P-256)"));
        }
        if w.u16(WHAT)? != 0x0010 {
            w.u16(WHAT)?; // kdf hash
        }
        let x = w.sized(WHAT)?;
        let y = w.sized(WHAT)?;
        if x.len() != 32 || y.len() != 32 {
            return Err(AttestFailure::Malformed(WHAT));
        }
        let mut sec1 = vec![0x04];
        sec1.extend_from_slice(x);
        sec1.extend_from_slice(y);
        let key =
            VerifyingKey::from_sec1_bytes(&sec1).map_err(|_| AttestFailure::Malformed(WHAT))?;
        // Name = nameAlg || H(TPMT_PUBLIC); qualified name = nameAlg || H(QN(parent) || Name),
        // and the qualified name of a hierarchy is its handle.
        let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&Sha256::digest(public));
        let mut qn = Sha256::new();
        qn.update(TPM_RH_OWNER.to_be_bytes());
        qn.update(&name);
        let mut qualified_name = TPM_ALG_SHA256.to_be_bytes().to_vec();
        qualified_name.extend_from_slice(&qn.finalize());
        Ok(Self {
            key,
            qualified_name,
        })
    }
}

/// Replays a measurement log into a PCR reset to zeros.
pub fn replay(log: &[v1::Measurement]) -> Result<[u8; 32], AttestFailure> {
    log.iter().try_fold([0u8; 32], |pcr, m| {
        if m.sha256.len() != 32 {
            return Err(AttestFailure::Malformed("measurement"));
        }
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(&m.sha256);
        Ok(h.finalize().into())
    })
}

/// Verifies `quote` against the node's key, the nonce just sent, the policy and the models
/// the agent offers (its Hello). Returns the agent build's sha256 (hex) on success.
pub fn verify(
    ak: &AttestationKey,
    nonce: &[u8],
    quote: &v1::AttestQuote,
    offered_models: &[v1::ModelInfo],
    policy: &AttestationPolicy,
) -> Result<String, AttestFailure> {
    if !quote.unavailable.is_empty() {
        return Err(AttestFailure::Unavailable(quote.unavailable.clone()));
    }
    // Signature first: nothing else in the structure is trusted before it verifies.
    let r: [u8; 32] = left_pad(&quote.signature_r).ok_or(AttestFailure::BadSignature)?;
    let s: [u8; 32] = left_pad(&quote.signature_s).ok_or(AttestFailure::BadSignature)?;
    let sig = Signature::from_scalars(r, s).map_err(|_| AttestFailure::BadSignature)?;
    ak.key
        .verify(&quote.attest, &sig)
        .map_err(|_| AttestFailure::BadSignature)?;
    const WHAT: &str = "TPMS_ATTEST";
    let mut w = Wire(&quote.attest);
    if w.u32(WHAT)? != TPM_GENERATED_VALUE || w.u16(WHAT)? != TPM_ST_ATTEST_QUOTE {
        return Err(AttestFailure::Malformed(
            "TPMS_ATTEST (not a TPM-generated quote)",
        ));
    }
    if w.sized(WHAT)? != ak.qualified_name.as_slice() {
        return Err(AttestFailure::WrongSigner);
    }
    if w.sized(WHAT)? != nonce {
        return Err(AttestFailure::StaleNonce);
    }
    w.take(17, WHAT)?; // clockInfo
    w.take(8, WHAT)?; // firmwareVersion
                      // TPML_PCR_SELECTION: exactly one bank (sha256) with exactly the policy's PCR.
    if w.u32(WHAT)? != 1 || w.u16(WHAT)? != TPM_ALG_SHA256 {
        return Err(AttestFailure::WrongPcrSelection);
    }
    let size = w.u8(WHAT)? as usize;
    let select = w.take(size, WHAT)?;
    let mut expected = vec![0u8; size];
    let (byte, bit) = (policy.pcr_index as usize / 8, policy.pcr_index % 8);
    if byte >= size {
        return Err(AttestFailure::WrongPcrSelection);
    }
    expected[byte] = 1 << bit;
    if select != expected.as_slice() {
        return Err(AttestFailure::WrongPcrSelection);
    }
    let digest = w.sized(WHAT)?;
    let pcr = replay(&quote.log)?;
    if digest != Sha256::digest(pcr).as_slice() {
        return Err(AttestFailure::LogMismatch);
    }
    check_log(&quote.log, offered_models, policy)
}

/// The policy half: the log's contents against allowed builds and models.
fn check_log(
    log: &[v1::Measurement],
    offered_models: &[v1::ModelInfo],
    policy: &AttestationPolicy,
) -> Result<String, AttestFailure> {
    let is_agent = |m: &v1::Measurement| m.kind == v1::MeasurementKind::AgentBinary as i32;
    let Some(agent) = log.first().filter(|m| is_agent(m)) else {
        return Err(AttestFailure::NoAgentMeasurement);
    };
    if log.iter().filter(|m| is_agent(m)).count() != 1 {
        return Err(AttestFailure::NoAgentMeasurement);
    }
    let build = hex::encode(&agent.sha256);
    if !policy.agent_builds.contains(agent.sha256.as_slice()) {
        return Err(AttestFailure::AgentNotAllowed(build));
    }
    let mut measured_models = HashSet::new();
    for m in &log[1..] {
        if m.kind != v1::MeasurementKind::Model as i32 {
            return Err(AttestFailure::Malformed("measurement kind"));
        }
        if !policy.models.contains(m.sha256.as_slice()) {
            return Err(AttestFailure::ModelNotAllowed {
                name: m.name.clone(),
                sha256: hex::encode(&m.sha256),
            });
        }
        measured_models.insert(m.sha256.as_slice());
    }
    // The offered hash must be the canonical spelling the verifier and the bindings use: a
    // node that attests "ABC…" and announces it must not be looked up as another model.
    for offered in offered_models {
        let measured = Sha256Hex::parse(&offered.sha256)
            .is_ok_and(|h| measured_models.contains(h.to_bytes().as_slice()));
        if !measured {
            return Err(AttestFailure::ModelNotMeasured(offered.name.clone()));
        }
    }
    Ok(build)
}

/// TPM ECC parameters drop leading zeros; p256 wants 32 bytes.
fn left_pad(b: &[u8]) -> Option<[u8; 32]> {
    if b.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: v1::MeasurementKind, byte: u8) -> v1::Measurement {
        v1::Measurement {
            kind: kind as i32,
            name: format!("m{byte}"),
            sha256: vec![byte; 32],
        }
    }

    fn policy() -> AttestationPolicy {
        AttestationPolicy {
            pcr_index: 23,
            agent_builds: [[1u8; 32]].into(),
            models: [[2u8; 32]].into(),
        }
    }

    fn offered(byte: u8) -> v1::ModelInfo {
        v1::ModelInfo {
            name: "model".into(),
            sha256: hex::encode([byte; 32]),
            ..Default::default()
        }
    }

    #[test]
    fn replay_matches_the_pcr_extend_rule() {
        let log = [m(v1::MeasurementKind::AgentBinary, 1)];
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update([1u8; 32]);
        assert_eq!(replay(&log).unwrap(), <[u8; 32]>::from(h.finalize()));
    }

    #[test]
    fn log_policy_accepts_allowed_and_refuses_the_rest() {
        let agent = m(v1::MeasurementKind::AgentBinary, 1);
        let model = m(v1::MeasurementKind::Model, 2);
        let p = policy();
        assert!(check_log(&[agent.clone(), model.clone()], &[offered(2)], &p).is_ok());
        let bad_agent = m(v1::MeasurementKind::AgentBinary, 9);
        assert!(matches!(
            check_log(&[bad_agent, model.clone()], &[offered(2)], &p),
            Err(AttestFailure::AgentNotAllowed(_))
        ));
        let bad_model = m(v1::MeasurementKind::Model, 3);
        assert!(matches!(
            check_log(&[agent.clone(), bad_model], &[offered(3)], &p),
            Err(AttestFailure::ModelNotAllowed { .. })
        ));
        assert_eq!(
            check_log(&[agent.clone(), model], &[offered(3)], &p),
            Err(AttestFailure::ModelNotMeasured("model".into()))
        );
        assert_eq!(
            check_log(&[], &[], &p),
            Err(AttestFailure::NoAgentMeasurement)
        );
    }

    /// Issue 13, hole 2: attestation no longer folds the case of an offered hash (the verifier
    /// looked it up as sent and skipped the job as an unknown model).
    #[test]
    fn an_upper_case_offered_hash_is_not_measured() {
        let agent = m(v1::MeasurementKind::AgentBinary, 1);
        let model = m(v1::MeasurementKind::Model, 0xab);
        let p = AttestationPolicy {
            models: [[0xab; 32]].into(),
            ..policy()
        };
        let lower = offered(0xab);
        assert!(check_log(
            &[agent.clone(), model.clone()],
            std::slice::from_ref(&lower),
            &p
        )
        .is_ok());
        let upper = v1::ModelInfo {
            sha256: lower.sha256.to_uppercase(),
            ..lower
        };
        assert_eq!(
            check_log(&[agent, model], &[upper], &p),
            Err(AttestFailure::ModelNotMeasured("model".into()))
        );
        assert_eq!(
            crate::config::security::parse_sha256_hex(&"AB".repeat(32)),
            None
        );
        assert_eq!(
            crate::config::security::parse_sha256_hex(&format!(" {}", "ab".repeat(32))),
            None
        );
    }
}
