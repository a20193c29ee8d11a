//! The batch runner: one task that owns every batch's lifecycle and is the only writer of
//! batch records once a batch exists.
//!
//! It polls the store (everything it decides from is durable, so a restarted coordinator picks
//! up where the old one stopped) and moves each active batch along:
//! - `validating`: reads the input file, validates each line ([`crate::batch::input`]), writes
//!   a job per valid line and the errors of the others in one transaction, hands the jobs to
//!   the manager (batch class, the completion window as their deadline) → `in_progress`.
//! - `in_progress`: refreshes `request_counts`; when every job has ended → `finalizing` →
//!   `completed`; when the window has passed, the jobs still running are cancelled →
//!   `expired` with what completed.
//! - `cancelling`: the same cancellation → `cancelled`, completed lines kept.
//!
//! Ending writes the output file (one line per completed request) and the error file (one
//! line per other request) and the final record in one transaction, so each `custom_id` is
//! answered exactly once.
//!
//! Batches are independent: an error on one batch (an input that no longer opens, an output
//! the store refuses) never stops the pass over the others. A batch whose step fails
//! [`FAILS_BEFORE_GIVING_UP`] passes in a row ends as `failed` with the error in `errors`, and
//! its jobs still queued are cancelled; a transient error clears on the next pass.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokenfleet_store::FileRecord;
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::input::{metadata_residency, parse_input, validate_line, BatchContext};
use crate::batch::store::{BatchLine, LineResult, NewFile};
use crate::batch::types::{Batch, BatchStatus, RequestCounts, PURPOSE_BATCH_OUTPUT};
use crate::clock::unix_ms;
use crate::clock::unix_s;
use crate::config::CoordinatorConfig;
use crate::domain::error::{ErrorKind, RequestError};
use crate::domain::store::{JobState, Store, StoreError};
use crate::fleet::manager::Manager;
use crate::openai::responses;
use crate::policy::regions::RegionMap;
use crate::policy::tenants::Tenants;
use std::sync::Arc;

/// How often active batches are looked at (a command wakes the runner at once).
const POLL: Duration = Duration::from_millis(250);

/// Consecutive failed passes after which a batch is failed rather than retried: enough to ride
/// out a passing fault (three polls, about 0.75 s), few enough that a batch that can never
/// step is answered promptly.
const FAILS_BEFORE_GIVING_UP: u32 = 3;

enum Cmd {
    Wake,
    Cancel {
        tenant: String,
        id: String,
        reply: oneshot::Sender<Result<Batch, RequestError>>,
    },
}

/// Handle to the batch runner; cheap to clone.
#[derive(Clone)]
pub struct BatchRunner {
    tx: mpsc::Sender<Cmd>,
}

/// What the runner works with.
pub struct Deps {
    pub config: Arc<CoordinatorConfig>,
    pub store: Store,
    pub manager: Manager,
    /// The same tenants (residency, quota) as the HTTP API's.
    pub tenants: Arc<Tenants>,
    pub regions: Arc<RegionMap>,
}

impl BatchRunner {
    pub fn spawn(
        deps: Deps,
        mut shutdown: watch::Receiver<bool>,
    ) -> (BatchRunner, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel(256);
        let mut runner = Runner {
            config: deps.config,
            store: deps.store,
            manager: deps.manager,
            tenants: deps.tenants,
            regions: deps.regions,
            failures: HashMap::new(),
        };
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Wake) => {}
                        Some(Cmd::Cancel { tenant, id, reply }) => {
                            let _ = reply.send(runner.cancel(&tenant, &id).await);
                        }
                        None => break,
                    },
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => break,
                }
                if let Err(e) = runner.step().await {
                    if matches!(e, StoreError::Closed) {
                        break;
                    }
                    tracing::error!(cause = %e, "batch runner pass failed; retrying");
                }
            }
        });
        (BatchRunner { tx }, task)
    }

    /// A new batch is waiting for validation.
    pub fn wake(&self) {
        let _ = self.tx.try_send(Cmd::Wake);
    }

    /// `POST /v1/batches/{id}/cancel`.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<Batch, RequestError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Cancel {
            tenant: tenant.into(),
            id: id.into(),
            reply,
        };
        self.tx
            .send(cmd)
            .await
            .map_err(|_| RequestError::unavailable("the coordinator is shutting down"))?;
        rx.await
            .map_err(|_| RequestError::unavailable("the coordinator is shutting down"))?
    }
}

struct Runner {
    config: Arc<CoordinatorConfig>,
    store: Store,
    manager: Manager,
    tenants: Arc<Tenants>,
    regions: Arc<RegionMap>,
    /// Consecutive failed steps per batch id (cleared when a step succeeds).
    failures: HashMap<String, u32>,
}

pub fn no_such_batch(id: &str) -> RequestError {
    RequestError::not_found(format!("No such Batch object: {id}"))
}

impl Runner {
    async fn cancel(&self, tenant: &str, id: &str) -> Result<Batch, RequestError> {
        let mut batch = self
            .store
            .batch(tenant, id)
            .await?
            .ok_or_else(|| no_such_batch(id))?;
        match batch.status {
            BatchStatus::Validating | BatchStatus::InProgress => {
                batch.status = BatchStatus::Cancelling;
                batch.cancelling_at = Some(unix_s());
                match self.store.update_batch(batch.clone()).await {
                    // It ended (or another cancel won) between the read and the write.
                    Err(StoreError::Stale { .. }) => {
                        return Box::pin(self.cancel(tenant, id)).await
                    }
                    other => other?,
                }
                tracing::info!(batch = %batch.id, tenant, "batch cancelling");
                Ok(batch)
            }
            BatchStatus::Cancelling | BatchStatus::Cancelled => Ok(batch),
            other => {
                let mut e = RequestError::invalid(
                    format!("Cannot cancel a batch with status {}.", other.as_str()),
                    None,
                );
                e.kind = ErrorKind::Conflict;
                Err(e)
            }
        }
    }

    /// One pass over every active batch. An error on one batch is that batch's (see
    /// [`Runner::step_failed`]); only failing to list the batches fails the pass.
    async fn step(&mut self) -> Result<(), StoreError> {
        let now = unix_s();
        let active = self.store.active_batches().await?;
        self.failures
            .retain(|id, _| active.iter().any(|(_, b)| &b.id == id));
        for (tenant, batch) in active {
            let id = batch.id.clone();
            let result = match batch.status {
                BatchStatus::Validating => self.validate(&tenant, batch.clone()).await,
                BatchStatus::InProgress if now >= batch.expires_at => {
                    self.end(&tenant, batch.clone(), BatchStatus::Expired).await
                }
                BatchStatus::InProgress => self.progress(&tenant, batch.clone()).await,
                BatchStatus::Finalizing => {
                    self.finalize(&tenant, batch.clone(), BatchStatus::Completed)
                        .await
                }
                BatchStatus::Cancelling => {
                    self.end(&tenant, batch.clone(), BatchStatus::Cancelled)
                        .await
                }
                _ => Ok(()),
            };
            match result {
                Ok(()) => {
                    self.failures.remove(&id);
                }
                Err(StoreError::Closed) => return Err(StoreError::Closed),
                // Someone moved the batch first (a client's cancel, another coordinator's
                // runner): the next pass sees where it is now.
                Err(StoreError::Stale { .. }) => {
                    tracing::debug!(batch = %id, tenant, "batch moved on meanwhile; looking again next pass");
                    self.failures.remove(&id);
                }
                Err(e) => self.step_failed(&tenant, batch, e).await,
            }
        }
        Ok(())
    }

    /// A batch's step failed: retried on the next pass, until it has failed
    /// [`FAILS_BEFORE_GIVING_UP`] times in a row; then the batch ends as `failed` with the
    /// error, its queued jobs cancelled.
    async fn step_failed(&mut self, tenant: &str, mut batch: Batch, cause: StoreError) {
        let count = self.failures.entry(batch.id.clone()).or_default();
        *count += 1;
        if *count < FAILS_BEFORE_GIVING_UP {
            tracing::warn!(batch = %batch.id, tenant, cause = %cause, attempt = *count, "batch step failed; retrying on the next pass");
            return;
        }
        tracing::error!(batch = %batch.id, tenant, cause = %cause, "batch step failed repeatedly; failing the batch");
        let stopped = async {
            for id in self
                .store
                .batches()
                .unfinished_batch_jobs(&batch.id)
                .await?
            {
                self.manager.cancel(id).await;
            }
            self.store
                .batches()
                .cancel_batch_jobs(&batch.id, unix_ms())
                .await
        }
        .await;
        if let Err(e) = stopped {
            tracing::error!(batch = %batch.id, tenant, cause = %e, "could not stop the jobs of a failing batch");
        }
        batch.status = BatchStatus::Failed;
        batch.failed_at = Some(unix_s());
        // The client sees what failed, not the store's internals (which stay in the log).
        batch.errors = Some(json!({"object": "list", "data": [{
            "code": "batch_failed",
            "message": "the batch could not be processed (its input or output could not be read or written); its requests were stopped",
        }]}));
        let id = batch.id.clone();
        match self.store.update_batch(batch).await {
            Ok(()) => {
                self.failures.remove(&id);
            }
            Err(e) => {
                tracing::error!(batch = %id, tenant, cause = %e, "could not record a batch as failed")
            }
        }
    }

    async fn validate(&self, tenant: &str, mut batch: Batch) -> Result<(), StoreError> {
        let now = unix_s();
        let content = self
            .store
            .batches()
            .file_content(tenant, &batch.input_file_id)
            .await?;
        let parsed = match content {
            None => Err(json!({"code": "file_not_found",
                "message": format!("the input file {} was deleted before the batch started", batch.input_file_id)})),
            Some(c) => parse_input(&c, self.config.max_batch_requests).map_err(
                |e| json!({"code": e.code.unwrap_or("invalid_file"), "message": e.message}),
            ),
        };
        let input = match parsed {
            Ok(lines) => lines,
            Err(error) => {
                batch.status = BatchStatus::Failed;
                batch.failed_at = Some(now);
                batch.errors = Some(json!({"object": "list", "data": [error]}));
                tracing::warn!(batch = %batch.id, tenant, "batch failed validation");
                return self.store.update_batch(batch).await;
            }
        };
        let manager = self.manager.clone();
        let has_model = move |m: &str| manager.has_model(m);
        let ctx = BatchContext {
            endpoint: &batch.endpoint,
            deadline_ms: batch.expires_at * 1000,
            residency: metadata_residency(batch.metadata.as_ref()),
            config: &self.config,
            has_model: &has_model,
            tenant,
            tenants: &self.tenants,
            regions: &self.regions,
            unix_s: now,
        };
        let lines: Vec<BatchLine> = input
            .iter()
            .map(|l| BatchLine {
                line: l.line,
                custom_id: l.custom_id.clone(),
                outcome: validate_line(l, &ctx),
            })
            .collect();
        let invalid = lines.iter().filter(|l| l.outcome.is_err()).count() as u64;
        batch.status = BatchStatus::InProgress;
        batch.in_progress_at = Some(now);
        batch.request_counts.total = lines.len() as u64;
        batch.request_counts.failed = invalid;
        let jobs = self.store.start_batch(tenant, batch.clone(), lines).await?;
        tracing::info!(batch = %batch.id, tenant, jobs = jobs.len(), invalid, "batch in progress");
        self.manager.adopt(jobs).await;
        Ok(())
    }

    async fn progress(&self, tenant: &str, mut batch: Batch) -> Result<(), StoreError> {
        let p = self.store.batches().batch_progress(&batch.id).await?;
        let counts = RequestCounts::from(p);
        if p.unfinished == 0 {
            batch.status = BatchStatus::Finalizing;
            batch.finalizing_at = Some(unix_s());
            batch.request_counts = counts;
            self.store.update_batch(batch.clone()).await?;
            return self.finalize(tenant, batch, BatchStatus::Completed).await;
        }
        if counts != batch.request_counts {
            batch.request_counts = counts;
            self.store.update_batch(batch).await?;
        }
        Ok(())
    }

    /// Stops what is left of a batch (cancelled or past its window) and ends it as `status`.
    async fn end(&self, tenant: &str, batch: Batch, status: BatchStatus) -> Result<(), StoreError> {
        let unfinished = self
            .store
            .batches()
            .unfinished_batch_jobs(&batch.id)
            .await?;
        for id in &unfinished {
            self.manager.cancel(*id).await;
        }
        // The manager has handled every cancel once it answers; its outcome writes are then in
        // the store's queue, committed by the flush. Jobs it did not hold are marked here.
        self.manager.queue_len().await;
        self.store.flush().await?;
        self.store
            .batches()
            .cancel_batch_jobs(&batch.id, unix_ms())
            .await?;
        tracing::info!(batch = %batch.id, tenant, stopped = unfinished.len(), status = status.as_str(), "batch ending");
        self.finalize(tenant, batch, status).await
    }

    /// Writes the output and error files and the final record, in one transaction.
    async fn finalize(
        &self,
        tenant: &str,
        mut batch: Batch,
        status: BatchStatus,
    ) -> Result<(), StoreError> {
        let results = self.store.batch_results(&batch.id).await?;
        let (mut output, mut errors) = (String::new(), String::new());
        let (mut completed, mut failed) = (0, 0);
        for r in &results {
            match answer_line(r, status) {
                Answer::Output(line) => {
                    completed += 1;
                    output.push_str(&line.to_string());
                    output.push('\n');
                }
                Answer::Error(line) => {
                    failed += 1;
                    errors.push_str(&line.to_string());
                    errors.push('\n');
                }
            }
        }
        let now = unix_s();
        let mut files = Vec::new();
        for (content, kind) in [(output, "output"), (errors, "error")] {
            if content.is_empty() {
                continue;
            }
            let id = format!("file-{}", hex::encode(rand::random::<[u8; 12]>()));
            let file = FileRecord {
                id: id.clone(),
                bytes: content.len() as u64,
                created_s: now,
                filename: format!("{}_{kind}.jsonl", batch.id),
                purpose: PURPOSE_BATCH_OUTPUT.into(),
            };
            match kind {
                "output" => batch.output_file_id = Some(id),
                _ => batch.error_file_id = Some(id),
            }
            files.push(NewFile {
                file,
                tenant: tenant.to_string(),
                content: content.into_bytes(),
            });
        }
        batch.request_counts.total = results.len() as u64;
        batch.request_counts.completed = completed;
        batch.request_counts.failed = failed;
        batch.status = status;
        match status {
            BatchStatus::Completed => batch.completed_at = Some(now),
            BatchStatus::Expired => batch.expired_at = Some(now),
            _ => batch.cancelled_at = Some(now),
        }
        tracing::info!(batch = %batch.id, tenant, completed, failed, status = status.as_str(), "batch ended");
        self.store.finish_batch(batch, files).await
    }
}

enum Answer {
    Output(Value),
    Error(Value),
}

/// A batch line's entry in the output file (completed) or the error file (anything else), in
/// OpenAI's line format.
fn answer_line(r: &LineResult, batch_status: BatchStatus) -> Answer {
    let error_line = |id: &str, code: &str, message: &str| {
        Answer::Error(json!({
            "id": id, "custom_id": r.custom_id, "response": null,
            "error": {"code": code, "message": message},
        }))
    };
    let Some(job) = &r.job else {
        let e = r.error.clone().unwrap_or_else(|| json!({}));
        return Answer::Error(json!({
            "id": format!("batch_req_line_{}", r.custom_id), "custom_id": r.custom_id,
            "response": null, "error": e,
        }));
    };
    match (job.state, batch_status) {
        (JobState::Done, _) => {
            let reason = job.finish_reason.as_deref().unwrap_or("stop");
            let body = responses::full(
                &job.request,
                &job.public_id,
                job.created_ms / 1000,
                &job.tokens,
                &job.text_tail,
                reason,
                job.prompt_tokens,
            );
            Answer::Output(json!({
                "id": job.public_id, "custom_id": r.custom_id,
                "response": {"status_code": 200, "request_id": job.public_id, "body": body},
                "error": null,
            }))
        }
        (_, BatchStatus::Expired) => error_line(
            &job.public_id,
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
        (JobState::Failed, _) => error_line(
            &job.public_id,
            "request_failed",
            job.error.as_deref().unwrap_or("the request failed"),
        ),
        _ => error_line(
            &job.public_id,
            "batch_cancelled",
            "This request was not executed because the batch was cancelled.",
        ),
    }
}
