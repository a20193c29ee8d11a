//! The fleet registry's store: enrollment tokens, issued node certificates, attestation keys
//! and revocations.
//!
//! Owns the [`RegistryStore`] trait and its records. Tokens are stored only as their sha256
//! (computed by the caller: a leaked database does not enroll anyone) and are consumed by a
//! single conditional write, so two vehicles racing with one token cannot both win. Policy
//! (node id rules, who may enroll) is the coordinator's; this is storage. Uses only the crate's
//! [`StoreError`].

use async_trait::async_trait;

use crate::StoreError;

/// A one-time enrollment token, by its hash, bound to the node id the operator chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub token_sha256: String,
    pub node_id: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

/// A certificate the fleet CA issued to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub serial: String,
    pub node_id: String,
    pub issued_ms: u64,
    pub not_after_ms: u64,
}

/// Enrollment tokens, certificates, attestation keys and revocations. Every write is durable
/// on return.
#[async_trait]
pub trait RegistryStore: Send + Sync {
    async fn insert_token(&self, token: EnrollmentToken) -> Result<(), StoreError>;

    /// Consumes the token with this hash at `now_ms` and returns the node id it was bound
    /// to: once, and only before it expires (None otherwise).
    async fn redeem_token(
        &self,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError>;

    async fn record_certificate(&self, certificate: IssuedCertificate) -> Result<(), StoreError>;

    /// How many certificates were issued to `node_id` at or after `since_ms`.
    async fn certificates_issued_since(
        &self,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, StoreError>;

    /// Binds (or replaces) a node's TPM attestation key at `now_ms`; `None` removes it.
    async fn set_attestation_key(
        &self,
        node_id: &str,
        ak_public: Option<Vec<u8>>,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    async fn attestation_key(&self, node_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Records a revocation (the first reason stays) and uses up the node's unused tokens.
    async fn revoke(&self, node_id: &str, reason: &str, now_ms: u64) -> Result<(), StoreError>;

    async fn revoked_reason(&self, node_id: &str) -> Result<Option<String>, StoreError>;

    /// Every revoked node id.
    async fn revoked(&self) -> Result<Vec<String>, StoreError>;
}
