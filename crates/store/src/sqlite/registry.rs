//! [`RegistryStore`] on SQLite: the `enrollment_tokens`, `node_certificates`,
//! `node_attestation_keys` and `revoked_nodes` tables. Every call runs in its place in the
//! store thread's queue and commits on its own. Uses the crate's records and rusqlite.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::{EnrollmentToken, IssuedCertificate, RegistryStore, StoreError};

#[async_trait]
impl RegistryStore for SqliteStore {
    async fn insert_token(&self, token: EnrollmentToken) -> Result<(), StoreError> {
        self.with_conn(move |conn, _| {
            conn.execute(
                "INSERT INTO enrollment_tokens (token_sha256, node_id, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    token.token_sha256,
                    token.node_id,
                    token.created_ms as i64,
                    token.expires_ms as i64
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn redeem_token(
        &self,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let hash = token_sha256.to_string();
        self.with_conn(move |conn, _| {
            Ok(conn
                .query_row(
                    "UPDATE enrollment_tokens SET used_ms = ?2
                     WHERE token_sha256 = ?1 AND used_ms IS NULL AND expires_ms > ?2
                     RETURNING node_id",
                    params![hash, now_ms as i64],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }

    async fn record_certificate(&self, certificate: IssuedCertificate) -> Result<(), StoreError> {
        self.with_conn(move |conn, _| {
            let c = certificate;
            conn.execute(
                "INSERT INTO node_certificates (serial, node_id, issued_ms, not_after_ms)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    c.serial,
                    c.node_id,
                    c.issued_ms as i64,
                    c.not_after_ms as i64
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn certificates_issued_since(
        &self,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, StoreError> {
        let node = node_id.to_string();
        self.with_conn(move |conn, _| {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM node_certificates WHERE node_id = ?1 AND issued_ms >= ?2",
                params![node, since_ms as i64],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn set_attestation_key(
        &self,
        node_id: &str,
        ak_public: Option<Vec<u8>>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let node = node_id.to_string();
        self.with_conn(move |conn, _| {
            match ak_public {
                Some(ak) => conn.execute(
                    "INSERT INTO node_attestation_keys (node_id, ak_public, enrolled_ms)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (node_id) DO UPDATE SET ak_public = ?2, enrolled_ms = ?3",
                    params![node, ak, now_ms as i64],
                )?,
                None => conn.execute(
                    "DELETE FROM node_attestation_keys WHERE node_id = ?1",
                    params![node],
                )?,
            };
            Ok(())
        })
        .await
    }

    async fn attestation_key(&self, node_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let node = node_id.to_string();
        self.with_conn(move |conn, _| {
            Ok(conn
                .query_row(
                    "SELECT ak_public FROM node_attestation_keys WHERE node_id = ?1",
                    params![node],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }

    async fn revoke(&self, node_id: &str, reason: &str, now_ms: u64) -> Result<(), StoreError> {
        let (node, reason) = (node_id.to_string(), reason.to_string());
        self.with_conn(move |conn, _| {
            conn.execute(
                "INSERT INTO revoked_nodes (node_id, revoked_ms, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT (node_id) DO NOTHING",
                params![node, now_ms as i64, reason],
            )?;
            conn.execute(
                "UPDATE enrollment_tokens SET used_ms = ?2 WHERE node_id = ?1 AND used_ms IS NULL",
                params![node, now_ms as i64],
            )?;
            Ok(())
        })
        .await
    }

    async fn revoked_reason(&self, node_id: &str) -> Result<Option<String>, StoreError> {
        let node = node_id.to_string();
        self.with_conn(move |conn, _| {
            Ok(conn
                .query_row(
                    "SELECT reason FROM revoked_nodes WHERE node_id = ?1",
                    params![node],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }

    async fn revoked(&self) -> Result<Vec<String>, StoreError> {
        self.with_conn(|conn, _| {
            let mut stmt = conn.prepare_cached("SELECT node_id FROM revoked_nodes")?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(ids)
        })
        .await
    }
}
