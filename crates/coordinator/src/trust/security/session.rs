//! The security side of one node session: admission (certificate identity, then a TPM quote
//! over a fresh nonce before the node is registered with the manager), periodic re-attestation,
//! certificate renewal at half-life (signed only when asked, in the renewal window and under a
//! per-node hourly limit), and the end of the session when its certificate expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenfleet_protocol::v1::{self, AgentMessage, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::attest::{self, AttestationKey};
use super::tls::NodeIdentity;
use super::Security;
use crate::clock::unix_ms_of;

/// The security state of one live session.
pub struct SessionSecurity {
    security: Arc<Security>,
    pub identity: NodeIdentity,
    /// The attestation key bound at enrollment; None for a node admitted unattested.
    ak: Option<AttestationKey>,
    /// The nonce of the challenge in flight and when its answer is due.
    pending: Option<(Vec<u8>, Instant)>,
    renewal_requested: bool,
    /// The renewal this session asked for was signed (one per session).
    renewal_answered: bool,
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
        tx: &mpsc::Sender<Box<CoordinatorMessage>>,
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
            renewal_answered: false,
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
        Some(instant_of(self.renewal_opens()))
    }

    /// When the certificate's renewal window opens: half the configured lifetime before its
    /// expiry.
    fn renewal_opens(&self) -> SystemTime {
        let half = self.security.config.cert_ttl / 2;
        self.identity
            .not_after
            .checked_sub(half)
            .unwrap_or(self.identity.not_before)
    }

    pub fn renewal_request(&mut self) -> CoordinatorMessage {
        self.renewal_requested = true;
        CoordinatorMessage::new(CoordinatorMsg::RenewCertificate(v1::RenewCertificate {}))
    }

    /// When the session's certificate expires (the session ends then).
    pub fn expires_at(&self) -> Instant {
        instant_of(self.identity.not_after)
    }

    /// Signs the node's renewal CSR for the node this session's certificate names, only as
    /// the answer to this session's own renewal request (once), only while the session's
    /// certificate is in its renewal window (its last half, when [`Self::renew_at`] asks), and
    /// only under `max_certificates_per_hour` for the node (issue 13, hole 12: any request was
    /// signed, so a node could mint certificates at will).
    pub async fn renew(&mut self, csr_pem: &str) -> Result<CoordinatorMessage, RenewRefused> {
        if !self.renewal_requested {
            return Err(RenewRefused::NotRequested);
        }
        if self.renewal_answered {
            return Err(RenewRefused::AlreadyRenewed);
        }
        if SystemTime::now() < self.renewal_opens() {
            return Err(RenewRefused::NotInWindow);
        }
        let node = &self.identity.node_id;
        let limit = self.security.config.max_certificates_per_hour;
        let hour_ago = unix_ms_of(SystemTime::now()).saturating_sub(3_600_000);
        let issued = self
            .security
            .registry
            .certificates_issued_since(node, hour_ago)
            .await
            .map_err(|e| RenewRefused::Failed(e.to_string()))?;
        if issued >= u64::from(limit) {
            return Err(RenewRefused::RateLimited { issued, limit });
        }
        let issued = self
            .security
            .issue(node, csr_pem)
            .await
            .map_err(|e| RenewRefused::Failed(e.to_string()))?;
        self.renewal_answered = true;
        Ok(CoordinatorMessage::new(CoordinatorMsg::Certificate(
            v1::CertificateIssued {
                cert_pem: issued.cert_pem,
                not_after_unix_ms: unix_ms_of(issued.not_after),
            },
        )))
    }
}

/// Why a certificate request was not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewRefused {
    #[error("the coordinator did not ask this session for a renewal")]
    NotRequested,
    #[error("this session's renewal was already signed")]
    AlreadyRenewed,
    #[error("the current certificate is not in its renewal window yet")]
    NotInWindow,
    #[error("{issued} certificates issued to this node in the last hour (limit {limit})")]
    RateLimited { issued: u64, limit: u32 },
    #[error("{0}")]
    Failed(String),
}

impl RenewRefused {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            RenewRefused::NotRequested => "not_requested",
            RenewRefused::AlreadyRenewed => "already_renewed",
            RenewRefused::NotInWindow => "not_in_window",
            RenewRefused::RateLimited { .. } => "rate_limited",
            RenewRefused::Failed(_) => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecurityConfig;
    use crate::domain::store::Store;
    use tokenfleet_store::Sealer;

    fn csr() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    /// A session of `vehicle-1` whose certificate has `left` of its `ttl` left.
    async fn session(
        dir: &std::path::Path,
        ttl: Duration,
        left: Duration,
        per_hour: u32,
    ) -> SessionSecurity {
        let config = SecurityConfig {
            ca_dir: dir.join("ca"),
            cert_ttl: ttl,
            max_certificates_per_hour: per_hour,
            ..Default::default()
        };
        let store = Store::open_in_memory(Sealer::ephemeral()).unwrap();
        let security = Security::open(config, store).await.unwrap();
        let now = SystemTime::now();
        SessionSecurity {
            security,
            identity: NodeIdentity {
                node_id: "vehicle-1".into(),
                serial: "01".into(),
                not_before: now + left - ttl,
                not_after: now + left,
            },
            ak: None,
            pending: None,
            renewal_requested: false,
            renewal_answered: false,
        }
    }

    /// Issue 13, hole 12: a CSR is signed only as the answer to the coordinator's own renewal
    /// request, once per session, in the certificate's renewal window.
    #[tokio::test]
    async fn a_certificate_is_signed_only_when_renewal_was_asked_for_in_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let mut s = session(dir.path(), hour, Duration::from_secs(1200), 4).await;
        assert_eq!(
            s.renew(&csr()).await.unwrap_err(),
            RenewRefused::NotRequested
        );
        s.renewal_request();
        assert!(s.renew(&csr()).await.is_ok(), "asked for, in its last half");
        assert_eq!(
            s.renew(&csr()).await.unwrap_err(),
            RenewRefused::AlreadyRenewed
        );
        // Young certificate: asked or not, it is not in its renewal window.
        let mut young = session(dir.path(), hour, Duration::from_secs(3000), 4).await;
        young.renewal_request();
        assert_eq!(
            young.renew(&csr()).await.unwrap_err(),
            RenewRefused::NotInWindow
        );
    }

    /// Issue 13, hole 12: at most `max_certificates_per_hour` per node, however many
    /// sessions ask.
    #[tokio::test]
    async fn certificates_per_node_and_hour_are_limited() {
        let dir = tempfile::tempdir().unwrap();
        // A day's certificate needs 2 an hour (a renewal and the enrollment).
        let day = Duration::from_secs(86_400);
        let first = session(dir.path(), day, Duration::from_secs(600), 2).await;
        let security = Arc::clone(&first.security);
        let mut signed = 0;
        let mut refused = None;
        for _ in 0..4 {
            let mut s = SessionSecurity {
                security: Arc::clone(&security),
                identity: first.identity.clone(),
                ak: None,
                pending: None,
                renewal_requested: false,
                renewal_answered: false,
            };
            s.renewal_request();
            match s.renew(&csr()).await {
                Ok(_) => signed += 1,
                Err(e) => refused = Some(e),
            }
        }
        assert_eq!(signed, 2);
        assert_eq!(
            refused,
            Some(RenewRefused::RateLimited {
                issued: 2,
                limit: 2
            })
        );
    }
}
