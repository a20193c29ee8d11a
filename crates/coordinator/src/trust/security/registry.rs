//! The fleet registry: enrollment tokens, issued node certificates, attestation keys and
//! revocations, kept in the registry store ([`tokenfleet_store::RegistryStore`]).
//!
//! Tokens are stored only as their sha256 (a leaked database does not enroll anyone), are
//! bound to the node id the operator chose, expire, and are consumed by a single conditional
//! UPDATE, so two vehicles racing with one token cannot both win. Revocation is by node id:
//! every certificate of a revoked vehicle is refused, and a revoked id cannot be enrolled again.
//!
//! The rules (node ids, token format and hashing, revoked ids) are here; the storage is the
//! store crate's. Uses it, [`crate::domain::store`] and the clock in [`crate::fleet::manager`].

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokenfleet_store::{EnrollmentToken, IssuedCertificate, RegistryStore};

use crate::clock::unix_ms;
use crate::domain::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid node id {0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    InvalidNodeId(String),
    #[error("node {0} is revoked; enroll the vehicle under a new node id")]
    Revoked(String),
    #[error("the enrollment token is unknown, expired or already used")]
    BadToken,
}

/// Node ids end up in certificate names, logs and metrics: keep them plain.
pub fn check_node_id(id: &str) -> Result<(), RegistryError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidNodeId(id.to_string()))
    }
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What a consumed token was bound to.
#[derive(Debug, Clone)]
pub struct Redeemed {
    pub node_id: String,
}

/// The registry tables of one store.
#[derive(Clone)]
pub struct Registry {
    store: Store,
}

impl Registry {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    fn stored(&self) -> &dyn RegistryStore {
        self.store.registry()
    }

    /// Issues a one-time token that enrolls `node_id`, valid for `ttl_ms`.
    pub async fn issue_token(&self, node_id: &str, ttl_ms: u64) -> Result<String, RegistryError> {
        check_node_id(node_id)?;
        if self.revoked_reason(node_id).await?.is_some() {
            return Err(RegistryError::Revoked(node_id.into()));
        }
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!("tfe1_{}", hex::encode(secret));
        let now = unix_ms();
        self.stored()
            .insert_token(EnrollmentToken {
                token_sha256: token_hash(&token),
                node_id: node_id.to_string(),
                created_ms: now,
                expires_ms: now + ttl_ms,
            })
            .await?;
        Ok(token)
    }

    /// Consumes a token: succeeds once, before it expires, for a node that is not revoked.
    pub async fn redeem_token(&self, token: &str) -> Result<Redeemed, RegistryError> {
        let node = self
            .stored()
            .redeem_token(&token_hash(token), unix_ms())
            .await?;
        let node_id = node.ok_or(RegistryError::BadToken)?;
        if self.revoked_reason(&node_id).await?.is_some() {
            return Err(RegistryError::Revoked(node_id));
        }
        Ok(Redeemed { node_id })
    }

    /// Records a certificate the CA issued (for audit and operators' listings).
    pub async fn record_certificate(
        &self,
        node_id: &str,
        serial: &str,
        not_after_ms: u64,
    ) -> Result<(), RegistryError> {
        let certificate = IssuedCertificate {
            serial: serial.to_string(),
            node_id: node_id.to_string(),
            issued_ms: unix_ms(),
            not_after_ms,
        };
        Ok(self.stored().record_certificate(certificate).await?)
    }

    /// How many certificates were issued to `node_id` at or after `since_ms` (unix ms),
    /// enrollment included: the renewal rate limit counts these.
    pub async fn certificates_issued_since(
        &self,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, RegistryError> {
        Ok(self
            .stored()
            .certificates_issued_since(node_id, since_ms)
            .await?)
    }

    /// Binds (or, at re-enrollment, replaces) a node's TPM attestation key; `None` removes
    /// it (the vehicle enrolled without a TPM).
    pub async fn set_attestation_key(
        &self,
        node_id: &str,
        ak_public: Option<Vec<u8>>,
    ) -> Result<(), RegistryError> {
        Ok(self
            .stored()
            .set_attestation_key(node_id, ak_public, unix_ms())
            .await?)
    }

    pub async fn attestation_key(&self, node_id: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        Ok(self.stored().attestation_key(node_id).await?)
    }

    /// Revokes a node: its certificates are refused from now on (a running coordinator
    /// applies it within its revocation poll interval, and at once when it revokes itself).
    pub async fn revoke(&self, node_id: &str, reason: &str) -> Result<(), RegistryError> {
        check_node_id(node_id)?;
        Ok(self.stored().revoke(node_id, reason, unix_ms()).await?)
    }

    pub async fn revoked_reason(&self, node_id: &str) -> Result<Option<String>, RegistryError> {
        Ok(self.stored().revoked_reason(node_id).await?)
    }

    /// Every revoked node id.
    pub async fn revoked(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.stored().revoked().await?)
    }
}
