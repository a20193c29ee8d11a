//! The security side of one node session: admission (certificate identity, then a TPM quote
//! over a fresh nonce before the node is registered with the manager), periodic re-attestation,
//! certificate renewal at half-life, and the end of the session when its certificate expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenfleet_protocol::v1::{self, AgentMessage, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::attest::{self, AttestationKey};
use super::tls::NodeIdentity;
use super::{unix_ms_of, Security};
use crate::nodes::NodeSender;

/// The security state of one live session.
pub struct SessionSecurity {
    security: Arc<Security>,
    pub identity: NodeIdentity,
    /// The attestation key bound at enrollment; None for a node admitted unattested.
    ak: Option<AttestationKey>,
    /// The nonce of the challenge in flight and when its answer is due.
    pending: Option<(Vec<u8>, Instant)>,
    renewal_requested: bool,
}

fn instant_of(t: SystemTime) -> Instant {
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(_) => Instant::now(),
    }
}

fn challenge_msg(nonce: &[u8], pcr_index: u32) -> CoordinatorMessage {
    CoordinatorMessage::new(CoordinatorMsg::Attest(v1::AttestChallenge {
        nonce: nonce.to_vec(),
        pcr_index,
    }))
}

impl SessionSecurity {
    /// Admits a node: with an attestation key on record, it must answer a fresh challenge
    /// with a valid quote before anything else happens on the session; without one, only if
    /// the policy allows unattested nodes. Returns the session state and whether the node is
    /// attested.
    pub async fn admit(
        security: Arc<Security>,
        identity: NodeIdentity,
        hello: &v1::Hello,
        tx: &NodeSender,
        inbound: &mut Streaming<AgentMessage>,
    ) -> Result<(Self, bool), Status> {
        let node = identity.node_id.clone();
        let ak = security
            .registry
            .attestation_key(&node)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut this = Self {
            security: Arc::clone(&security),
            identity,
            ak: None,
            pending: None,
            renewal_requested: false,
        };
        let Some(ak) = ak else {
            if !security.config.allow_unattested {
                tracing::warn!(node = %node, "refused: no attestation key and policy requires attestation");
                return Err(Status::permission_denied(
                    "this fleet requires TPM attestation; enroll the vehicle with its TPM",
                ));
            }
            tracing::warn!(node = %node, "node joins unattested (policy allows it): no sensitive requests");
            return Ok((this, false));
        };
        this.ak = Some(
            AttestationKey::from_tpmt_public(&ak)
                .map_err(|e| Status::internal(format!("stored attestation key of {node}: {e}")))?,
        );
        let challenge = this.challenge().expect("attestation key set above");
        tx.send(Box::new(challenge))
            .await
            .map_err(|_| Status::internal("session closed"))?;
        let timeout = security.config.attest_timeout;
        let answer = tokio::time::timeout(timeout, inbound.message())
            .await
            .map_err(|_| {
                tracing::warn!(node = %node, "refused: no attestation quote in time");
                Status::deadline_exceeded("no attestation quote in time")
            })??;
        match answer.and_then(|m| m.msg) {
            Some(AgentMsg::Quote(q)) => this.check_quote(&q, hello)?,
            _ => {
                return Err(Status::permission_denied(
                    "the answer to an attestation challenge must be a quote",
                ))
            }
        }
        Ok((this, true))
    }

    /// A new challenge (None for an unattested node).
    pub fn challenge(&mut self) -> Option<CoordinatorMessage> {
        self.ak.as_ref()?;
        let nonce: [u8; 32] = rand::random();
        self.pending = Some((
            nonce.to_vec(),
            Instant::now() + self.security.config.attest_timeout,
        ));
        Some(challenge_msg(&nonce, self.security.policy.pcr_index))
    }

    /// Checks a quote against the challenge in flight; any failure ends the session.
    pub fn check_quote(
        &mut self,
        quote: &v1::AttestQuote,
        hello: &v1::Hello,
    ) -> Result<(), Status> {
        let node = &self.identity.node_id;
        let (Some(ak), Some((nonce, _))) = (&self.ak, self.pending.take()) else {
            return Err(Status::permission_denied("unsolicited attestation quote"));
        };
        match attest::verify(ak, &nonce, quote, &hello.models, &self.security.policy) {
            Ok(build) => {
                tracing::info!(node = %node, agent_build = %build, models = hello.models.len(), "attestation verified");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(node = %node, cause = %e, "attestation failed");
                Err(Status::permission_denied(format!(
                    "attestation failed: {e}"
                )))
            }
        }
    }

    /// When the challenge in flight is due (None when there is none).
    pub fn quote_due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, due)| *due)
    }

    pub fn is_attested(&self) -> bool {
        self.ak.is_some()
    }

    pub fn reattest_interval(&self) -> Duration {
        self.security.config.reattest_interval
    }

    /// When to ask for a new certificate: when half of the configured lifetime is left (None
    /// once asked). Measured back from expiry, not forward from `not_before`, which is
    /// backdated for slow vehicle clocks: a renewal must outlive the current certificate.
    pub fn renew_at(&self) -> Option<Instant> {
        if self.renewal_requested {
            return None;
        }
        let half = self.security.config.cert_ttl / 2;
        let at = self
            .identity
            .not_after
            .checked_sub(half)
            .unwrap_or(self.identity.not_before);
        Some(instant_of(at))
    }

    pub fn renewal_request(&mut self) -> CoordinatorMessage {
        self.renewal_requested = true;
        CoordinatorMessage::new(CoordinatorMsg::RenewCertificate(v1::RenewCertificate {}))
    }

    /// When the session's certificate expires (the session ends then).
    pub fn expires_at(&self) -> Instant {
        instant_of(self.identity.not_after)
    }

    /// Signs the node's renewal CSR for the node this session's certificate names.
    pub async fn renew(&self, csr_pem: &str) -> Result<CoordinatorMessage, Status> {
        let issued = self
            .security
            .issue(&self.identity.node_id, csr_pem)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(CoordinatorMessage::new(CoordinatorMsg::Certificate(
            v1::CertificateIssued {
                cert_pem: issued.cert_pem,
                not_after_unix_ms: unix_ms_of(issued.not_after),
            },
        )))
    }
}
