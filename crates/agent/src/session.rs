//! The agent's session to the coordinator: dial out, Hello, heartbeats, and reconnect with
//! capped exponential backoff when the link drops (vehicles change networks all the time).
//!
//! An enrolled agent dials with its node certificate (mutual TLS), answers the coordinator's
//! attestation challenges with TPM quotes (before Welcome, and periodically), and renews its
//! certificate when asked: a fresh key generated here, a CSR sent, the new certificate and
//! key stored for the next connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_protocol::v1::node_session_client::NodeSessionClient;
use tokenfleet_protocol::v1::{self, AgentMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{AgentConfig, Backoff};
use crate::core::CoreMsg;
use crate::identity::PendingKey;
use crate::AgentError;

/// Where the session stands, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionStatus {
    Connecting,
    /// Welcomed by the coordinator (after attestation, when it asked for one).
    Connected,
    /// The last attempt failed (TLS handshake refused, attestation failed, revoked, ...).
    Failed(String),
}

/// What the session reports outwards.
#[derive(Clone)]
pub(crate) struct SessionReport {
    pub status: watch::Sender<SessionStatus>,
    /// `Assign` messages received over all sessions.
    pub assigns: Arc<AtomicU64>,
}

const OUTBOUND_BUFFER: usize = 1024;

async fn channel(config: &AgentConfig, address: &str) -> Result<Channel, AgentError> {
    let mut endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|e| AgentError::Config(format!("coordinator address {address:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(identity) = &config.identity {
        if !address.starts_with("https://") {
            return Err(AgentError::Config(format!(
                "an enrolled agent connects over mutual TLS: {address:?} is not an https:// address"
            )));
        }
        // Read at every connection: a renewed certificate is used from the next one on.
        endpoint = endpoint
            .tls_config(identity.client_tls()?)
            .map_err(|e| AgentError::Config(e.to_string()))?;
    } else if address.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &config.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| AgentError::Config(e.to_string()))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| AgentError::Connect(e.to_string()))
}

/// A refused session: denied for who the vehicle is (PERMISSION_DENIED, UNAUTHENTICATED), or
/// refused for now (anything else).
fn refusal(status: tonic::Status) -> AgentError {
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            AgentError::Denied(status.message().to_string())
        }
        _ => AgentError::Refused(with_causes(&status)),
    }
}

/// Keeps a session up until `shutdown` flips. With several coordinator addresses (an active
/// coordinator and its standby), a session that ends or fails moves on to the next address at
/// once; the backoff applies after a whole round failed, so a vehicle whose coordinator died
/// reaches the one taking over within its first retries.
pub(crate) async fn run(
    config: AgentConfig,
    core: mpsc::Sender<CoreMsg>,
    mut shutdown: watch::Receiver<bool>,
    report: SessionReport,
) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut denied = Backoff::new(config.denied_backoff_initial, config.denied_backoff_max);
    let addresses = config.coordinators.len().max(1);
    let mut attempt = 0usize;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let address = config.coordinator(attempt).to_string();
        attempt = attempt.wrapping_add(1);
        report.status.send_replace(SessionStatus::Connecting);
        let mut delay = None;
        match one_session(
            &config,
            &address,
            &core,
            &mut shutdown,
            &mut backoff,
            &report,
        )
        .await
        {
            Ok(()) => {
                tracing::info!(node = %config.node_id, coordinator = %address, "session ended")
            }
            Err(AgentError::Denied(why)) => {
                // Never less than the initial wait (full jitter could make it ~0).
                let wait = denied.next_delay().max(config.denied_backoff_initial);
                tracing::error!(node = %config.node_id, coordinator = %address, cause = %why, retry_in_s = wait.as_secs(),
                    "the coordinator denies this vehicle (an operator must act: release from quarantine, re-enroll); asking again later");
                report
                    .status
                    .send_replace(SessionStatus::Failed(format!("denied: {why}")));
                delay = Some(wait);
            }
            Err(e) => {
                denied.reset();
                tracing::warn!(node = %config.node_id, coordinator = %address, cause = %e, "session failed");
                report
                    .status
                    .send_replace(SessionStatus::Failed(e.to_string()));
            }
        }
        let _ = core.send(CoreMsg::Detach).await;
        let round_done = attempt % addresses == 0;
        let delay = delay.unwrap_or_else(|| {
            if round_done {
                backoff.next_delay()
            } else {
                Duration::ZERO
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A refusal's message with its chain of causes: a TLS refusal surfaces as "transport error"
/// and only its sources say why (the alert: certificate required, unknown CA, revoked, ...),
/// which is what an operator looking at the agent's log needs.
fn with_causes(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

async fn one_session(
    config: &AgentConfig,
    address: &str,
    core: &mpsc::Sender<CoreMsg>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
    report: &SessionReport,
) -> Result<(), AgentError> {
    let channel = channel(config, address).await?;
    let mut client = NodeSessionClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(OUTBOUND_BUFFER);
    let (hello_tx, hello_rx) = oneshot::channel();
    core.send(CoreMsg::Hello(hello_tx))
        .await
        .map_err(|_| AgentError::Stopped)?;
    let hello = hello_rx.await.map_err(|_| AgentError::Stopped)?;
    out_tx
        .send(AgentMessage::new(AgentMsg::Hello(hello)))
        .await
        .map_err(|_| AgentError::Stopped)?;
    let response = client
        .open(ReceiverStream::new(out_rx))
        .await
        .map_err(refusal)?;
    let mut inbound = response.into_inner();
    // An attestation challenge may come before Welcome: the coordinator registers the node
    // only once its quote verifies.
    let welcome = loop {
        match inbound.message().await.map_err(refusal)? {
            Some(v1::CoordinatorMessage {
                msg: Some(CoordinatorMsg::Welcome(w)),
            }) => break w,
            Some(v1::CoordinatorMessage {
                msg: Some(CoordinatorMsg::Attest(challenge)),
            }) => {
                let quote = answer_challenge(config, challenge).await;
                out_tx
                    .send(AgentMessage::new(AgentMsg::Quote(quote)))
                    .await
                    .map_err(|_| AgentError::Stopped)?;
            }
            _ => {
                return Err(AgentError::Refused(
                    "the coordinator did not answer Hello with Welcome".into(),
                ))
            }
        }
    };
    backoff.reset();
    report.status.send_replace(SessionStatus::Connected);
    tracing::info!(node = %config.node_id, coordinator = %address, "session established");
    core.send(CoreMsg::Attach(out_tx.clone()))
        .await
        .map_err(|_| AgentError::Stopped)?;
    let mut pending_key: Option<PendingKey> = None;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(
        welcome.heartbeat_interval_ms.max(100) as u64,
    ));
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(v1::CoordinatorMessage { msg: Some(msg) })) => match msg {
                    CoordinatorMsg::Attest(challenge) => {
                        let quote = answer_challenge(config, challenge).await;
                        if out_tx.try_send(AgentMessage::new(AgentMsg::Quote(quote))).is_err() {
                            tracing::warn!(node = %config.node_id, "attestation quote not sent: session buffer full");
                        }
                    }
                    CoordinatorMsg::RenewCertificate(_) => {
                        if config.identity.is_none() {
                            continue;
                        }
                        let key = PendingKey::generate()?;
                        let csr = v1::CertificateRequest { csr_pem: key.csr_pem.clone() };
                        pending_key = Some(key);
                        if out_tx.try_send(AgentMessage::new(AgentMsg::CertificateRequest(csr))).is_err() {
                            tracing::warn!(node = %config.node_id, "certificate request not sent: session buffer full");
                        }
                    }
                    CoordinatorMsg::Certificate(issued) => {
                        match (&config.identity, pending_key.take()) {
                            (Some(identity), Some(key)) => {
                                identity.store(&key, &issued.cert_pem)?;
                                tracing::info!(node = %config.node_id, not_after_unix_ms = issued.not_after_unix_ms, "certificate renewed");
                            }
                            _ => tracing::warn!(node = %config.node_id, "unrequested certificate ignored"),
                        }
                    }
                    msg => {
                        if matches!(msg, CoordinatorMsg::Assign(_)) {
                            report.assigns.fetch_add(1, Ordering::Relaxed);
                        }
                        core.send(CoreMsg::FromCoordinator(msg)).await.map_err(|_| AgentError::Stopped)?;
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(status) => return Err(AgentError::Connect(status.message().to_string())),
            },
            _ = heartbeat.tick() => {
                let sent_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                if out_tx.try_send(AgentMessage::new(AgentMsg::Heartbeat(v1::Heartbeat { sent_unix_ms }))).is_err() {
                    tracing::debug!("heartbeat not sent: session buffer full");
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// How long a quote may take. In `tokenfleet up` on a loaded 2-core machine a vehicle's
/// session was attested 65 ms after it measured its model into its swtpm (challenge, quote:
/// create the ECC attestation key, quote, flush; the demo's log), and discrete TPMs take up to
/// a few seconds to create an ECC primary; the coordinator waits
/// `attest_timeout` (10 s by default) for the answer. Past this the TPM is hung, not slow.
const QUOTE_TIMEOUT: Duration = Duration::from_secs(20);

/// A quote for the coordinator's nonce from the vehicle's TPM (run on the blocking pool), or
/// an "unavailable" answer saying why there is none.
async fn answer_challenge(config: &AgentConfig, challenge: v1::AttestChallenge) -> v1::AttestQuote {
    let unavailable = |why: String| v1::AttestQuote {
        unavailable: why,
        ..Default::default()
    };
    let Some(attestor) = config.attestor.clone() else {
        return unavailable("this vehicle has no TPM".into());
    };
    let quoted = tokio::time::timeout(
        QUOTE_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            attestor.0.quote(&challenge.nonce, challenge.pcr_index)
        }),
    )
    .await;
    match quoted {
        Ok(Ok(Ok(evidence))) => evidence.to_wire(),
        Ok(Ok(Err(e))) => {
            tracing::warn!(node = %config.node_id, cause = %e, "cannot quote");
            unavailable(e.to_string())
        }
        Ok(Err(e)) => unavailable(format!("quote task failed: {e}")),
        Err(_) => {
            // The session must not wait on the TPM forever: the coordinator has refused us
            // by now, and only a reconnect brings the vehicle back.
            tracing::error!(node = %config.node_id, timeout_s = QUOTE_TIMEOUT.as_secs(),
                "the TPM did not answer a quote in time; check the TPM (or its swtpm); answering unavailable");
            unavailable(format!(
                "the TPM did not answer within {} s",
                QUOTE_TIMEOUT.as_secs()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: a quarantined agent retried its permanent refusal about once a second. Being
    /// denied for who the vehicle is must take the long backoff; anything else the short one.
    #[test]
    fn a_denial_is_told_apart_from_a_passing_refusal() {
        let denied = refusal(tonic::Status::permission_denied("this node is quarantined"));
        assert!(matches!(denied, AgentError::Denied(m) if m.contains("quarantined")));
        assert!(matches!(
            refusal(tonic::Status::unauthenticated("unknown certificate")),
            AgentError::Denied(_)
        ));
        assert!(matches!(
            refusal(tonic::Status::unavailable("coordinator shutting down")),
            AgentError::Refused(_)
        ));
    }
}
