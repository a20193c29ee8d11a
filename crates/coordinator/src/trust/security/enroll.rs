//! The enrollment service: a vehicle trades a one-time token for a certificate.
//!
//! The vehicle generates its key and sends only a CSR; the node id in the certificate is the
//! one the operator bound to the token, whatever the CSR says. A TPM attestation key sent
//! with the request is bound to the node here (and required unless policy allows unattested
//! nodes). Requests are checked before the token is consumed, so a malformed request does
//! not burn it.

use std::sync::Arc;

use tokenfleet_protocol::v1::{self, enrollment_server};
use tonic::{Request, Response, Status};

use super::attest::AttestationKey;
use super::registry::RegistryError;
use super::Security;
use crate::clock::unix_ms_of;

pub struct EnrollmentService {
    pub security: Arc<Security>,
}

pub use enrollment_server::EnrollmentServer;

#[tonic::async_trait]
impl enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        let sec = &self.security;
        if rcgen::CertificateSigningRequestParams::from_pem(&r.csr_pem).is_err() {
            return Err(Status::invalid_argument(
                "csr_pem is not a valid, self-signed PKCS#10 request",
            ));
        }
        let ak = if r.attestation_key.is_empty() {
            if !sec.config.allow_unattested {
                return Err(Status::failed_precondition(
                    "this fleet requires a TPM attestation key at enrollment",
                ));
            }
            None
        } else {
            AttestationKey::from_tpmt_public(&r.attestation_key)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Some(r.attestation_key)
        };
        let redeemed = sec.registry.redeem_token(&r.token).await.map_err(|e| {
            tracing::warn!(?peer, cause = %e, "enrollment refused");
            match e {
                RegistryError::BadToken | RegistryError::Revoked(_) => {
                    Status::permission_denied(e.to_string())
                }
                other => Status::internal(other.to_string()),
            }
        })?;
        let node_id = redeemed.node_id;
        let attested = ak.is_some();
        sec.registry
            .set_attestation_key(&node_id, ak)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let issued = sec
            .issue(&node_id, &r.csr_pem)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(node = %node_id, attested, ?peer, "vehicle enrolled");
        Ok(Response::new(v1::EnrollResponse {
            node_id,
            cert_pem: issued.cert_pem,
            ca_pem: sec.ca.cert_pem().to_string(),
            not_after_unix_ms: unix_ms_of(issued.not_after),
        }))
    }
}
