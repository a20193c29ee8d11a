//! The schema of every store, as versioned migrations (`PRAGMA user_version` counts those
//! applied). Uses the job SQL of [`super::jobs`] (migration 2 reseals rows) and the crate's
//! records and sealing.

use rusqlite::{params, Connection};

use super::jobs::{insert_token, seal_tail};
use crate::sealing::{place, Sealer};
use crate::{StoreError, StoredToken};

/// A schema migration: SQL, or a step that needs the store's keys.
pub(super) enum Migration {
    Sql(&'static str),
    Sealed(fn(&Connection, &Sealer) -> Result<(), StoreError>),
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub(super) const MIGRATIONS: &[Migration] = &[
    // 1: jobs and their generated tokens.
    Migration::Sql(
        "CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        public_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        idempotency_key TEXT,
        request TEXT NOT NULL,
        state TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        finish_reason TEXT,
        text_tail TEXT,
        prompt_tokens INTEGER,
        error TEXT,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE job_tokens (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        idx INTEGER NOT NULL,
        token_id INTEGER NOT NULL,
        text TEXT NOT NULL,
        logprob REAL NOT NULL,
        top TEXT,
        PRIMARY KEY (job_id, idx)
    ) WITHOUT ROWID;",
    ),
    // 2: prompts and outputs sealed at rest; tokens move to `job_outputs`, one sealed value
    // per token (its id, text, logprob and alternatives).
    Migration::Sealed(seal_plaintext_rows),
    // 3: files and batches (the Batch API).
    Migration::Sql(BATCHES),
    // 4: the fleet registry (enrollment tokens, certificates, attestation keys, revocations).
    Migration::Sql(REGISTRY),
    // 5: node reputation and who produced each finished job (result verification).
    Migration::Sql(REPUTATION),
    // 6: a job's producers go with the job (issue 13, hole 10): version 5's `job_producers`
    // referenced `jobs` without a delete action, so with foreign keys on, the retention purge
    // failed for every job verification had recorded and kept its sealed prompt and output
    // for good. SQLite cannot alter a foreign key, so the table is rebuilt.
    Migration::Sql(
        "CREATE TABLE job_producers_v6 (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        node TEXT NOT NULL,
        finished_ms INTEGER NOT NULL,
        verification TEXT NOT NULL,
        PRIMARY KEY (job_id, node)
    ) WITHOUT ROWID;
    INSERT INTO job_producers_v6 (job_id, node, finished_ms, verification)
        SELECT job_id, node, finished_ms, verification FROM job_producers;
    DROP TABLE job_producers;
    ALTER TABLE job_producers_v6 RENAME TO job_producers;
    CREATE INDEX job_producers_node ON job_producers(node, verification, finished_ms);",
    ),
    // 7: a verification failure held by the circuit breaker for an operator.
    Migration::Sql(
        "ALTER TABLE node_reputation ADD COLUMN held_ms INTEGER;
    ALTER TABLE node_reputation ADD COLUMN held_reason TEXT;",
    ),
];

/// Applies the migrations `conn` has not had yet, each in its own transaction.
pub(super) fn migrate(conn: &mut Connection, sealer: &Sealer) -> Result<(), StoreError> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        match migration {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Sealed(step) => step(&tx, sealer)?,
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "job store migrated");
    }
    Ok(())
}

/// Migration 2: seals every plaintext request, text tail and token written by version 1.
fn seal_plaintext_rows(conn: &Connection, sealer: &Sealer) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE job_outputs (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            idx INTEGER NOT NULL,
            sealed BLOB NOT NULL,
            PRIMARY KEY (job_id, idx)
        ) WITHOUT ROWID;",
    )?;
    let tokens: Vec<(u64, u32, StoredToken)> = conn
        .prepare("SELECT job_id, idx, token_id, text, logprob, top FROM job_tokens")?
        .query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, i32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, f32>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?
        .map(|row| {
            let (job, idx, id, text, logprob, top) = row?;
            let top = match top {
                Some(t) => serde_json::from_str(&t)?,
                None => Vec::new(),
            };
            Ok((
                job,
                idx,
                StoredToken {
                    id,
                    text,
                    logprob,
                    top,
                },
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    for (job, idx, token) in &tokens {
        insert_token(conn, sealer, *job, *idx, token)?;
    }
    conn.execute_batch("DROP TABLE job_tokens;")?;
    let jobs: Vec<(u64, String, Option<String>)> = conn
        .prepare("SELECT id, request, text_tail FROM jobs")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (id, request, tail) in jobs {
        conn.execute(
            "UPDATE jobs SET request = ?2, text_tail = ?3 WHERE id = ?1",
            params![
                id as i64,
                sealer.seal(&place::request(id), request.as_bytes()),
                seal_tail(sealer, id, tail.as_deref().unwrap_or(""))
            ],
        )?;
    }
    Ok(())
}

/// Migration 3: files, batches, batch lines. File contents (batch inputs hold prompts, outputs
/// hold answers) are sealed like the jobs' prompts and outputs.
const BATCHES: &str = "
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_s INTEGER NOT NULL,
        content BLOB NOT NULL
    );
    CREATE INDEX files_tenant ON files(tenant, seq);
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        status TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX batches_tenant ON batches(tenant, seq);
    CREATE INDEX batches_status ON batches(status);
    CREATE TABLE batch_requests (
        batch_id TEXT NOT NULL REFERENCES batches(id),
        line INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        job_id INTEGER REFERENCES jobs(id),
        error TEXT,
        PRIMARY KEY (batch_id, line)
    ) WITHOUT ROWID;
    CREATE INDEX batch_requests_job ON batch_requests(job_id);";

/// Migration 4: the fleet registry. Enrollment tokens are kept only as their sha256.
const REGISTRY: &str = "
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

/// Migration 5: node reputation, and which nodes produced each finished job.
const REPUTATION: &str = "CREATE TABLE node_reputation (
        node TEXT PRIMARY KEY,
        passed INTEGER NOT NULL,
        inconclusive INTEGER NOT NULL,
        sampled_tokens INTEGER NOT NULL,
        sampled_excess REAL NOT NULL,
        sampled_variance REAL NOT NULL,
        sampled_looks INTEGER NOT NULL,
        quarantined_ms INTEGER,
        quarantine_reason TEXT,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE job_producers (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        node TEXT NOT NULL,
        finished_ms INTEGER NOT NULL,
        verification TEXT NOT NULL,
        PRIMARY KEY (job_id, node)
    ) WITHOUT ROWID;
    CREATE INDEX job_producers_node ON job_producers(node, verification, finished_ms);";
