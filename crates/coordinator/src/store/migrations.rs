//! The schema, as versioned migrations (`PRAGMA user_version` counts those applied).

use rusqlite::{params, Connection};

use super::{insert_token, request_aad, seal_tail, StoreError, StoredToken};
use crate::sealing::Sealer;

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
    Migration::Sql(crate::batch_store::MIGRATION),
    // 4: the fleet registry (enrollment tokens, certificates, attestation keys, revocations).
    Migration::Sql(crate::security::registry::MIGRATION),
    // 5: node reputation and who produced each finished job (result verification).
    Migration::Sql(crate::reputation::MIGRATION),
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
    Migration::Sql(crate::reputation::MIGRATION_HELD),
];

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
                sealer.seal(&request_aad(id), request.as_bytes()),
                seal_tail(sealer, id, tail.as_deref().unwrap_or(""))
            ],
        )?;
    }
    Ok(())
}
