//! TPM 2.0 attestation through tss-esapi (the TSS's ESAPI), e.g. against swtpm.
//!
//! The attestation key (AK) is a restricted ECDSA P-256 signing key created as a primary key
//! in the owner hierarchy from a fixed template: the TPM derives it from its owner seed, so
//! the same TPM yields the same AK on every start without storing a key blob on disk, and the
//! private part never leaves the TPM. Measurements go into a resettable PCR (16 or 23) that
//! [`TpmAttestor::measure`] resets first, so the PCR holds exactly the agent's log.
//!
//! An ESAPI context is not `Send`; each operation opens its own (a quote costs ~20 ms, and
//! the coordinator asks at connect and then once a minute or so).

use std::str::FromStr;
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::{KeyHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme,
    PcrSelectionListBuilder, PcrSlot, Public, PublicBuilder, PublicEccParametersBuilder, Signature,
    SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::{AttestError, Attestor, Evidence, Measured};

fn tpm(e: impl std::fmt::Display) -> AttestError {
    AttestError::Tpm(e.to_string())
}

/// PCRs a process at locality 0 may reset (the debug PCR and the application PCR).
pub const RESETTABLE_PCRS: [u32; 2] = [16, 23];

fn pcr_slot(index: u32) -> Result<(PcrSlot, PcrHandle), AttestError> {
    match index {
        16 => Ok((PcrSlot::Slot16, PcrHandle::Pcr16)),
        23 => Ok((PcrSlot::Slot23, PcrHandle::Pcr23)),
        other => Err(AttestError::Tpm(format!(
            "PCR {other} is not resettable at locality 0 (use 16 or 23)"
        ))),
    }
}

/// The fixed template of the attestation key.
fn ak_template() -> Result<Public, AttestError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(tpm)?;
    let params = PublicEccParametersBuilder::new()
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(true)
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .build()
        .map_err(tpm)?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tpm)
}

/// A vehicle TPM reached through a TCTI (e.g. `swtpm:host=127.0.0.1,port=2321` or
/// `device:/dev/tpmrm0`).
pub struct TpmAttestor {
    tcti: String,
    pcr_index: u32,
    /// What was extended into the PCR since it was reset, in order.
    log: Mutex<Vec<Measured>>,
}

impl TpmAttestor {
    /// Connects once to check the TPM answers; measurements come with [`Self::measure`].
    pub fn open(tcti: &str, pcr_index: u32) -> Result<Self, AttestError> {
        pcr_slot(pcr_index)?;
        let attestor = Self {
            tcti: tcti.to_string(),
            pcr_index,
            log: Mutex::new(Vec::new()),
        };
        attestor.context()?;
        Ok(attestor)
    }

    pub fn pcr_index(&self) -> u32 {
        self.pcr_index
    }

    fn context(&self) -> Result<Context, AttestError> {
        let conf = TctiNameConf::from_str(&self.tcti).map_err(tpm)?;
        Context::new(conf).map_err(|e| AttestError::Tpm(format!("{}: {e}", self.tcti)))
    }

    /// Resets the PCR and extends `log` into it, in order.
    pub fn measure(&self, log: Vec<Measured>) -> Result<(), AttestError> {
        let (_, handle) = pcr_slot(self.pcr_index)?;
        let mut ctx = self.context()?;
        ctx.execute_with_nullauth_session(|ctx| -> Result<(), AttestError> {
            ctx.pcr_reset(handle).map_err(tpm)?;
            for m in &log {
                let mut values = DigestValues::new();
                values.set(
                    HashingAlgorithm::Sha256,
                    Digest::try_from(m.sha256.to_vec()).map_err(tpm)?,
                );
                ctx.pcr_extend(handle, values).map_err(tpm)?;
            }
            Ok(())
        })?;
        *self.log.lock().expect("measurement log lock") = log;
        Ok(())
    }

    fn with_ak<T>(
        &self,
        f: impl FnOnce(&mut Context, KeyHandle, &Public) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        let mut ctx = self.context()?;
        let template = ak_template()?;
        let primary = ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(tpm)?;
        let result = f(&mut ctx, primary.key_handle, &primary.out_public);
        let _ = ctx.flush_context(primary.key_handle.into());
        result
    }
}

impl Attestor for TpmAttestor {
    fn attestation_key(&self) -> Result<Vec<u8>, AttestError> {
        self.with_ak(|_, _, public| public.marshall().map_err(tpm))
    }

    fn quote(&self, nonce: &[u8], pcr_index: u32) -> Result<Evidence, AttestError> {
        if pcr_index != self.pcr_index {
            return Err(AttestError::Tpm(format!(
                "the coordinator asks for PCR {pcr_index}; this agent measures into PCR {}",
                self.pcr_index
            )));
        }
        let (slot, _) = pcr_slot(pcr_index)?;
        let log = self.log.lock().expect("measurement log lock").clone();
        self.with_ak(|ctx, ak, _| {
            let selection = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &[slot])
                .build()
                .map_err(tpm)?;
            let qualifying = Data::try_from(nonce.to_vec()).map_err(tpm)?;
            let (attest, signature) = ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.quote(ak, qualifying, SignatureScheme::Null, selection)
                })
                .map_err(tpm)?;
            let Signature::EcDsa(sig) = signature else {
                return Err(AttestError::Tpm("the AK did not sign with ECDSA".into()));
            };
            Ok(Evidence {
                attest: attest.marshall().map_err(tpm)?,
                signature_r: sig.signature_r().value().to_vec(),
                signature_s: sig.signature_s().value().to_vec(),
                log,
            })
        })
    }
}

/// The PCR value a log replays to from a reset PCR (all zeros): each step is
/// `PCR = sha256(PCR || measurement)`. The coordinator's verifier computes the same.
pub fn replay(log: &[Measured]) -> [u8; 32] {
    log.iter().fold([0u8; 32], |pcr, m| {
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(m.sha256);
        h.finalize().into()
    })
}
