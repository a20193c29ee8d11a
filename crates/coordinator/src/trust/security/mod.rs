//! Fleet security: who may connect to the agent port and what they must prove first.
//!
//! - [`ca`]: the fleet CA (rcgen) that signs vehicle and coordinator certificates.
//! - [`registry`]: enrollment tokens, issued certificates, attestation keys, revocations
//!   (tables in the job store, one migration).
//! - [`enroll`]: the enrollment gRPC service (token + CSR → node certificate).
//! - [`tls`]: rustls for the agent port (client certificates required, revocation checked in
//!   the handshake) and for HTTPS.
//! - [`attest`]: TPM 2.0 quote verification against the attestation policy.
//! - [`session`]: what a node session does with all this: identity from the certificate,
//!   attestation before registration and periodically, renewal, disconnect on revocation.
//!
//! [`Security`] ties them together for one running coordinator.

pub(crate) mod attest;
pub mod ca;
pub(crate) mod enroll;
pub mod registry;
pub(crate) mod session;
pub(crate) mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::clock::unix_ms_of;

pub use crate::config::SecurityConfig;
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::config::security::AttestationPolicy;
use crate::domain::store::Store;
use ca::{FleetCa, Issued};
use registry::Registry;
use tls::{NodeIdentity, RevokedNodes};

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("security config: {0}")]
    Config(String),
}

/// How a live session is ended from outside (revocation): the status goes to the agent as
/// the stream's error, and the session task stops reading.
pub struct SessionKill {
    status: mpsc::Sender<Status>,
    notify: Notify,
}

impl SessionKill {
    pub fn new(status: mpsc::Sender<Status>) -> Arc<Self> {
        Arc::new(Self {
            status,
            notify: Notify::new(),
        })
    }

    pub fn kill(&self, status: Status) {
        let _ = self.status.try_send(status);
        self.notify.notify_one();
    }

    pub async fn killed(&self) {
        self.notify.notified().await
    }
}

/// Per node id: each live session's key and kill switch.
type LiveSessions = HashMap<String, Vec<(u64, Arc<SessionKill>)>>;

/// The security state of one running coordinator.
pub struct Security {
    pub config: SecurityConfig,
    pub ca: FleetCa,
    pub registry: Registry,
    pub revoked: RevokedNodes,
    pub policy: AttestationPolicy,
    /// Live sessions per node id, so that a revocation can end them.
    sessions: Mutex<LiveSessions>,
    next_session: AtomicU64,
}

impl Security {
    /// Opens the fleet CA (creating it on first start) and loads the revocation set.
    pub async fn open(config: SecurityConfig, store: Store) -> Result<Arc<Self>, SecurityError> {
        let policy = config.policy().map_err(SecurityError::Config)?;
        let ca = FleetCa::open_or_create(&config.ca_dir, &config.fleet_name)?;
        let registry = Registry::new(store);
        let revoked = RevokedNodes::default();
        revoked.extend(registry.revoked().await?);
        if config.allow_unattested {
            tracing::warn!("policy allows unattested nodes: they join without a TPM quote and only get requests not marked sensitive");
        }
        Ok(Arc::new(Self {
            config,
            ca,
            registry,
            revoked,
            policy,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        }))
    }

    /// Follows revocations written to the store by other processes (`tokenfleet fleet
    /// revoke`) until the returned task is aborted.
    pub fn watch_revocations(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.config.revocation_poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match this.registry.revoked().await {
                    Ok(ids) => this.apply_revocations(ids),
                    Err(e) => tracing::warn!(cause = %e, "cannot read revocations"),
                }
            }
        })
    }

    /// Revokes a node now: the store first (durable), then live sessions are ended.
    pub async fn revoke(&self, node_id: &str, reason: &str) -> Result<(), SecurityError> {
        self.registry.revoke(node_id, reason).await?;
        self.apply_revocations([node_id.to_string()]);
        Ok(())
    }

    fn apply_revocations(&self, ids: impl IntoIterator<Item = String>) {
        for id in self.revoked.extend(ids) {
            let sessions = self
                .sessions
                .lock()
                .expect("sessions lock")
                .remove(&id)
                .unwrap_or_default();
            tracing::warn!(node = %id, sessions = sessions.len(), "node revoked; disconnecting");
            for (_, kill) in sessions {
                kill.kill(Status::permission_denied(
                    "this node's certificate is revoked",
                ));
            }
        }
    }

    /// The node a client certificate names (the first of the TLS peer chain).
    pub fn identify(
        &self,
        peer_certs: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
    ) -> Result<NodeIdentity, Status> {
        let certs = peer_certs
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let id = NodeIdentity::from_der(leaf)
            .ok_or_else(|| Status::unauthenticated("the client certificate names no node"))?;
        if self.revoked.contains(&id.node_id) {
            return Err(Status::permission_denied(
                "this node's certificate is revoked",
            ));
        }
        Ok(id)
    }

    /// Registers a live session so that a revocation can end it; unregistered on drop.
    pub fn register_session(
        self: &Arc<Self>,
        node_id: &str,
        kill: Arc<SessionKill>,
    ) -> SessionEntry {
        let key = self.next_session.fetch_add(1, Ordering::Relaxed);
        let revoked = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            sessions
                .entry(node_id.to_string())
                .or_default()
                .push((key, Arc::clone(&kill)));
            // A revocation between the handshake and now must still end this session.
            self.revoked.contains(node_id)
        };
        if revoked {
            kill.kill(Status::permission_denied(
                "this node's certificate is revoked",
            ));
        }
        SessionEntry {
            security: Arc::clone(self),
            node_id: node_id.to_string(),
            key,
        }
    }

    /// Signs a node certificate for `node_id` valid for the configured TTL.
    pub async fn issue(&self, node_id: &str, csr_pem: &str) -> Result<Issued, SecurityError> {
        let now = SystemTime::now();
        // A little slack before "now" for vehicle clocks that run behind.
        let issued = self.ca.sign_node_csr(
            csr_pem,
            node_id,
            now - Duration::from_secs(300),
            now + self.config.cert_ttl,
        )?;
        self.registry
            .record_certificate(node_id, &issued.serial, unix_ms_of(issued.not_after))
            .await?;
        tracing::info!(node = %node_id, serial = %issued.serial, ttl_s = self.config.cert_ttl.as_secs(), "node certificate issued");
        Ok(issued)
    }
}

/// A session's place in [`Security`]'s registry of live sessions.
pub struct SessionEntry {
    security: Arc<Security>,
    node_id: String,
    key: u64,
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        let mut sessions = self.security.sessions.lock().expect("sessions lock");
        if let Some(list) = sessions.get_mut(&self.node_id) {
            list.retain(|(k, _)| *k != self.key);
            if list.is_empty() {
                sessions.remove(&self.node_id);
            }
        }
    }
}
