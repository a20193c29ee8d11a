//! The schema of every store on PostgreSQL, as versioned migrations; `tokenfleet_migrations`
//! records those applied.
//!
//! The logical schema is the SQLite backend's after its migrations (`super::super::sqlite`'s
//! `migrations.rs`: the same tables, columns and keys), in PostgreSQL's types: `BIGINT` for
//! ids, counts and every time (unix ms, or unix s for files, as the records have them),
//! `BYTEA` for sealed values and keys, `DOUBLE PRECISION` for the reputation sums, identity
//! columns for the list order of files and batches. Version 1 is that whole schema (PostgreSQL
//! never held a plaintext version, so SQLite's resealing step has no counterpart); later
//! changes are new entries in [`MIGRATIONS`], never edits of old ones.
//!
//! Migrations run when a store connects, all pending ones in one transaction that first takes
//! a transaction advisory lock: coordinators starting together on one database wait for each
//! other, and the second finds the schema current. PostgreSQL's DDL is transactional, so a
//! migration that fails leaves the database as it was. Uses tokio-postgres through the pool's
//! client and the crate's [`StoreError`].

use super::Conn;
use crate::StoreError;

/// The advisory lock key that serializes migrations on one database (`"tkfleet\x01"`).
const MIGRATION_LOCK: i64 = 0x746b_666c_6565_7401;

/// Schema migrations, applied in order; version `i + 1` is `MIGRATIONS[i]`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: jobs and their sealed tokens; files, batches, batch lines; the fleet registry; node
    // reputation and the producers of each job.
    SCHEMA_V1,
    // 2: job ownership across coordinators (`claims`): owner, lease (the database's epoch
    // ms), epoch (raised by every claim; owned writes are fenced on it).
    "ALTER TABLE jobs ADD COLUMN owner TEXT, ADD COLUMN lease_until_ms BIGINT,
         ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
     CREATE INDEX jobs_queued_owner ON jobs (owner, lease_until_ms) WHERE state = 'queued';",
];

const SCHEMA_V1: &str = "
    -- Job ids are handed out in blocks: each nextval is the first id of a block of 64 that
    -- belongs to the store that drew it (see ids.rs).
    CREATE SEQUENCE job_ids AS BIGINT INCREMENT BY 64 MINVALUE 1 START WITH 1;
    CREATE TABLE jobs (
        id BIGINT PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        idempotency_key TEXT,
        request BYTEA NOT NULL,
        state TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        finished_ms BIGINT,
        finish_reason TEXT,
        text_tail BYTEA,
        prompt_tokens BIGINT,
        error TEXT,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX jobs_state ON jobs (state);
    CREATE TABLE job_outputs (
        job_id BIGINT NOT NULL REFERENCES jobs (id),
        idx BIGINT NOT NULL,
        sealed BYTEA NOT NULL,
        PRIMARY KEY (job_id, idx)
    );

    CREATE TABLE files (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_s BIGINT NOT NULL,
        content BYTEA NOT NULL
    );
    CREATE INDEX files_tenant ON files (tenant, seq);
    CREATE TABLE batches (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX batches_tenant ON batches (tenant, seq);
    CREATE INDEX batches_status ON batches (status);
    CREATE TABLE batch_requests (
        batch_id TEXT NOT NULL REFERENCES batches (id),
        line BIGINT NOT NULL,
        custom_id TEXT NOT NULL,
        job_id BIGINT REFERENCES jobs (id),
        error TEXT,
        PRIMARY KEY (batch_id, line)
    );
    CREATE INDEX batch_requests_job ON batch_requests (job_id);

    CREATE TABLE enrollment_tokens (
        token_sha256 TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        used_ms BIGINT
    );
    CREATE INDEX enrollment_tokens_node ON enrollment_tokens (node_id);
    CREATE TABLE node_certificates (
        serial TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        issued_ms BIGINT NOT NULL,
        not_after_ms BIGINT NOT NULL
    );
    CREATE INDEX node_certificates_node ON node_certificates (node_id);
    CREATE TABLE node_attestation_keys (
        node_id TEXT PRIMARY KEY,
        ak_public BYTEA NOT NULL,
        enrolled_ms BIGINT NOT NULL
    );
    CREATE TABLE revoked_nodes (
        node_id TEXT PRIMARY KEY,
        revoked_ms BIGINT NOT NULL,
        reason TEXT NOT NULL
    );

    CREATE TABLE node_reputation (
        node TEXT PRIMARY KEY,
        passed BIGINT NOT NULL,
        inconclusive BIGINT NOT NULL,
        sampled_tokens BIGINT NOT NULL,
        sampled_excess DOUBLE PRECISION NOT NULL,
        sampled_variance DOUBLE PRECISION NOT NULL,
        sampled_looks BIGINT NOT NULL,
        quarantined_ms BIGINT,
        quarantine_reason TEXT,
        updated_ms BIGINT NOT NULL,
        held_ms BIGINT,
        held_reason TEXT
    );
    CREATE TABLE job_producers (
        job_id BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        node TEXT NOT NULL,
        finished_ms BIGINT NOT NULL,
        verification TEXT NOT NULL,
        PRIMARY KEY (job_id, node)
    );
    CREATE INDEX job_producers_node ON job_producers (node, verification, finished_ms);
";

/// Applies the migrations the database has not had yet, in one transaction under the
/// migration lock. Refuses a database migrated by a newer build.
pub(super) async fn migrate(conn: &mut Conn) -> Result<(), StoreError> {
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tokenfleet_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let version: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM tokenfleet_migrations",
            &[],
        )
        .await?
        .get(0);
    let known = MIGRATIONS.len();
    let version = usize::try_from(version).unwrap_or(0);
    if version > known {
        return Err(super::backend_error(format!(
            "the database's schema is version {version}, newer than this build's {known}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tokenfleet_migrations (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
        tracing::info!(version = i + 1, "job store migrated");
    }
    tx.commit().await?;
    Ok(())
}
