//! [`RegistryStore`] on PostgreSQL: the `enrollment_tokens`, `node_certificates`,
//! `node_attestation_keys` and `revoked_nodes` tables. Every call is a step of the queue,
//! durable on return. A token is redeemed by one conditional update that re-checks the row it
//! locks, so two vehicles (or two coordinators) racing with one token cannot both win. Uses
//! the crate's records and tokio-postgres.

use async_trait::async_trait;

use super::PostgresStore;
use crate::{EnrollmentToken, IssuedCertificate, RegistryStore, StoreError};

#[async_trait]
impl RegistryStore for PostgresStore {
    async fn insert_token(&self, token: EnrollmentToken) -> Result<(), StoreError> {
        self.call(move |conn, _| {
            Box::pin(async move {
                conn.execute(
                    "INSERT INTO enrollment_tokens (token_sha256, node_id, created_ms, expires_ms)
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &token.token_sha256,
                        &token.node_id,
                        &(token.created_ms as i64),
                        &(token.expires_ms as i64),
                    ],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn redeem_token(
        &self,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        let hash = token_sha256.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query_opt(
                        "UPDATE enrollment_tokens SET used_ms = $2
                         WHERE token_sha256 = $1 AND used_ms IS NULL AND expires_ms > $2
                         RETURNING node_id",
                        &[&hash, &(now_ms as i64)],
                    )
                    .await?
                    .map(|r| r.get(0)))
            })
        })
        .await
    }

    async fn record_certificate(&self, certificate: IssuedCertificate) -> Result<(), StoreError> {
        self.call(move |conn, _| {
            Box::pin(async move {
                let c = certificate;
                conn.execute(
                    "INSERT INTO node_certificates (serial, node_id, issued_ms, not_after_ms)
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &c.serial,
                        &c.node_id,
                        &(c.issued_ms as i64),
                        &(c.not_after_ms as i64),
                    ],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn certificates_issued_since(
        &self,
        node_id: &str,
        since_ms: u64,
    ) -> Result<u64, StoreError> {
        let node = node_id.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                let n: i64 = conn
                    .query_one(
                        "SELECT count(*) FROM node_certificates
                         WHERE node_id = $1 AND issued_ms >= $2",
                        &[&node, &(since_ms as i64)],
                    )
                    .await?
                    .get(0);
                Ok(n as u64)
            })
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
        self.call(move |conn, _| {
            Box::pin(async move {
                match ak_public {
                    Some(ak) => {
                        conn.execute(
                            "INSERT INTO node_attestation_keys (node_id, ak_public, enrolled_ms)
                             VALUES ($1, $2, $3)
                             ON CONFLICT (node_id)
                             DO UPDATE SET ak_public = $2, enrolled_ms = $3",
                            &[&node, &ak, &(now_ms as i64)],
                        )
                        .await?
                    }
                    None => {
                        conn.execute(
                            "DELETE FROM node_attestation_keys WHERE node_id = $1",
                            &[&node],
                        )
                        .await?
                    }
                };
                Ok(())
            })
        })
        .await
    }

    async fn attestation_key(&self, node_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let node = node_id.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query_opt(
                        "SELECT ak_public FROM node_attestation_keys WHERE node_id = $1",
                        &[&node],
                    )
                    .await?
                    .map(|r| r.get(0)))
            })
        })
        .await
    }

    async fn revoke(&self, node_id: &str, reason: &str, now_ms: u64) -> Result<(), StoreError> {
        let (node, reason) = (node_id.to_string(), reason.to_string());
        // One step: the revocation and its used-up tokens together.
        self.call(move |conn, _| {
            Box::pin(async move {
                let now = now_ms as i64;
                conn.execute(
                    "INSERT INTO revoked_nodes (node_id, revoked_ms, reason) VALUES ($1, $2, $3)
                     ON CONFLICT (node_id) DO NOTHING",
                    &[&node, &now, &reason],
                )
                .await?;
                conn.execute(
                    "UPDATE enrollment_tokens SET used_ms = $2
                     WHERE node_id = $1 AND used_ms IS NULL",
                    &[&node, &now],
                )
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn revoked_reason(&self, node_id: &str) -> Result<Option<String>, StoreError> {
        let node = node_id.to_string();
        self.call(move |conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query_opt(
                        "SELECT reason FROM revoked_nodes WHERE node_id = $1",
                        &[&node],
                    )
                    .await?
                    .map(|r| r.get(0)))
            })
        })
        .await
    }

    async fn revoked(&self) -> Result<Vec<String>, StoreError> {
        self.call(|conn, _| {
            Box::pin(async move {
                Ok(conn
                    .query("SELECT node_id FROM revoked_nodes ORDER BY node_id", &[])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect())
            })
        })
        .await
    }
}
