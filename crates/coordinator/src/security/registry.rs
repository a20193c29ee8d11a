//! The fleet registry in the coordinator's SQLite store: enrollment tokens, issued node
//! certificates, attestation keys and revocations.
//!
//! Tokens are stored only as their sha256 (a leaked database does not enroll anyone), are
//! bound to the node id the operator chose, expire, and are consumed by a single conditional
//! UPDATE, so two vehicles racing with one token cannot both win. Revocation is by node id:
//! every certificate of a revoked vehicle is refused, and a revoked id cannot be enrolled again.

use rand::RngCore;
use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::manager::unix_ms;
use crate::store::{Store, StoreError};

/// Schema for the registry (one migration of the job store's list).
pub const MIGRATION: &str = "
    CREATE TABLE enrollment_tokens (
        token_sha256 TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        used_ms INTEGER
    );
    CREATE TABLE node_certificates (
        serial TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        issued_ms INTEGER NOT NULL,
        not_after_ms INTEGER NOT NULL
    );
    CREATE INDEX node_certificates_node ON node_certificates(node_id);
    CREATE TABLE node_attestation_keys (
        node_id TEXT PRIMARY KEY,
        ak_public BLOB NOT NULL,
        enrolled_ms INTEGER NOT NULL
    );
    CREATE TABLE revoked_nodes (
        node_id TEXT PRIMARY KEY,
        revoked_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
    );";

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

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(StoreError::from(e))
    }
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

    /// Issues a one-time token that enrolls `node_id`, valid for `ttl_ms`.
    pub async fn issue_token(&self, node_id: &str, ttl_ms: u64) -> Result<String, RegistryError> {
        check_node_id(node_id)?;
        if self.revoked_reason(node_id).await?.is_some() {
            return Err(RegistryError::Revoked(node_id.into()));
        }
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!("tfe1_{}", hex::encode(secret));
        let hash = token_hash(&token);
        let node = node_id.to_string();
        let now = unix_ms();
        self.store
            .with_conn(move |conn, _| {
                conn.execute(
                    "INSERT INTO enrollment_tokens (token_sha256, node_id, created_ms, expires_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![hash, node, now as i64, (now + ttl_ms) as i64],
                )?;
                Ok(())
            })
            .await?;
        Ok(token)
    }

    /// Consumes a token: succeeds once, before it expires, for a node that is not revoked.
    pub async fn redeem_token(&self, token: &str) -> Result<Redeemed, RegistryError> {
        let hash = token_hash(token);
        let now = unix_ms() as i64;
        let node: Option<String> = self
            .store
            .with_conn(move |conn, _| {
                let node: Option<String> = conn
                    .query_row(
                        "UPDATE enrollment_tokens SET used_ms = ?2
                         WHERE token_sha256 = ?1 AND used_ms IS NULL AND expires_ms > ?2
                         RETURNING node_id",
                        params![hash, now],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok(node)
            })
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
        let (node, serial) = (node_id.to_string(), serial.to_string());
        self.store
            .with_conn(move |conn, _| {
                conn.execute(
                    "INSERT INTO node_certificates (serial, node_id, issued_ms, not_after_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![serial, node, unix_ms() as i64, not_after_ms as i64],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// How many certificates were issued to `node_id` at or after `since_ms` (unix ms),
    /// enrollment included: the renewal rate limit counts these.
    pub async fn certificates_issued_since(
        &self,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, RegistryError> {
        let node = node_id.to_string();
        let n = self
            .store
            .with_conn(move |conn, _| {
                Ok(conn.query_row(
                    "SELECT COUNT(*) FROM node_certificates WHERE node_id = ?1 AND issued_ms >= ?2",
                    params![node, since_ms as i64],
                    |r| r.get(0),
                )?)
            })
            .await?;
        Ok(n)
    }

    /// Binds (or, at re-enrollment, replaces) a node's TPM attestation key; `None` removes
    /// it (the vehicle enrolled without a TPM).
    pub async fn set_attestation_key(
        &self,
        node_id: &str,
        ak_public: Option<Vec<u8>>,
    ) -> Result<(), RegistryError> {
        let node = node_id.to_string();
        self.store
            .with_conn(move |conn, _| {
                match ak_public {
                    Some(ak) => conn.execute(
                        "INSERT INTO node_attestation_keys (node_id, ak_public, enrolled_ms)
                         VALUES (?1, ?2, ?3)
                         ON CONFLICT (node_id) DO UPDATE SET ak_public = ?2, enrolled_ms = ?3",
                        params![node, ak, unix_ms() as i64],
                    )?,
                    None => conn.execute(
                        "DELETE FROM node_attestation_keys WHERE node_id = ?1",
                        params![node],
                    )?,
                };
                Ok(())
            })
            .await?;
        Ok(())
    }

    pub async fn attestation_key(&self, node_id: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let node = node_id.to_string();
        Ok(self
            .store
            .with_conn(move |conn, _| {
                Ok(conn
                    .query_row(
                        "SELECT ak_public FROM node_attestation_keys WHERE node_id = ?1",
                        params![node],
                        |r| r.get(0),
                    )
                    .optional()?)
            })
            .await?)
    }

    /// Revokes a node: its certificates are refused from now on (a running coordinator
    /// applies it within its revocation poll interval, and at once when it revokes itself).
    pub async fn revoke(&self, node_id: &str, reason: &str) -> Result<(), RegistryError> {
        check_node_id(node_id)?;
        let (node, reason) = (node_id.to_string(), reason.to_string());
        self.store
            .with_conn(move |conn, _| {
                conn.execute(
                    "INSERT INTO revoked_nodes (node_id, revoked_ms, reason) VALUES (?1, ?2, ?3)
                     ON CONFLICT (node_id) DO NOTHING",
                    params![node, unix_ms() as i64, reason],
                )?;
                conn.execute(
                    "UPDATE enrollment_tokens SET used_ms = ?2 WHERE node_id = ?1 AND used_ms IS NULL",
                    params![node, unix_ms() as i64],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    pub async fn revoked_reason(&self, node_id: &str) -> Result<Option<String>, RegistryError> {
        let node = node_id.to_string();
        Ok(self
            .store
            .with_conn(move |conn, _| {
                Ok(conn
                    .query_row(
                        "SELECT reason FROM revoked_nodes WHERE node_id = ?1",
                        params![node],
                        |r| r.get(0),
                    )
                    .optional()?)
            })
            .await?)
    }

    /// Every revoked node id.
    pub async fn revoked(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .store
            .with_conn(|conn, _| {
                let mut stmt = conn.prepare_cached("SELECT node_id FROM revoked_nodes")?;
                let ids = stmt
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(ids)
            })
            .await?)
    }
}
