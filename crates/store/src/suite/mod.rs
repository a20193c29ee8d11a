//! The stores' behaviour, as tests any backend runs through the traits, so that every backend
//! is held to the same contract: jobs (sealing at rest, reopening, idempotency keys, grouped
//! commits, the order of queued writes and discards, re-runs, ids, retention), batches and
//! files (limits, listing, a batch from start to finish, atomic multi-row calls), the registry
//! and reputation.
//!
//! A backend's tests implement [`Harness`] (one fresh database per test) and expand
//! [`store_suite!`] once, which makes one `#[tokio::test]` per suite function. Modules: `jobs`,
//! `batches`, `registry`, `reputation` (the tests of each trait) and this one (the harness,
//! the macro, shared helpers). Uses only the crate's public API.

use async_trait::async_trait;

use crate::{JobState, Outcome, Sealer, StoredToken, Stores};

mod batches;
mod jobs;
mod registry;
mod reputation;

pub(crate) use batches::*;
pub(crate) use jobs::*;
pub(crate) use registry::*;
pub(crate) use reputation::*;

/// A fresh database of one backend, for one test.
#[async_trait]
pub(crate) trait Harness: Send + Sync {
    /// A new, empty database; None when this backend's tests are skipped on purpose (the
    /// harness says so on stderr).
    async fn fresh() -> Option<Self>
    where
        Self: Sized;
    /// The stores of this harness's database, opened (again) with `sealer`.
    async fn open(&self, sealer: Sealer) -> Stores;
    /// Whether `marker` occurs anywhere the backend has put this database's data (its files).
    async fn on_disk(&self, marker: &str) -> bool;
    /// Rows in `table`, counted beside the stores (what is committed).
    async fn rows(&self, table: &str) -> u64;
}

/// One `#[tokio::test]` per suite function, each on a fresh database of harness type `$h`.
macro_rules! store_suite {
    ($h:ty) => {
        $crate::suite::store_suite!(@tests $h;
            // jobs
            prompts_and_outputs_are_sealed_on_disk,
            purge_removes_only_jobs_finished_before_the_cutoff,
            jobs_survive_reopening_with_their_tokens,
            an_idempotency_key_maps_to_the_first_job,
            a_failing_write_does_not_undo_its_group,
            a_failing_call_fails_alone_among_concurrent_calls,
            queued_writes_apply_in_submission_order,
            only_a_cancelled_job_is_reopened,
            only_a_done_job_is_reopened_for_a_rerun_without_its_tokens,
            finished_jobs_are_not_reloaded,
            purge_deletes_a_job_whose_producers_were_recorded,
            ids_increase_across_jobs_and_batches_and_reopening,
            // batches and files
            files_are_per_tenant_and_within_limits,
            files_list_newest_first_in_pages,
            batches_are_per_tenant_limited_and_listed,
            a_batch_runs_from_start_to_finish,
            a_failing_batch_start_writes_nothing,
            a_failing_batch_finish_writes_nothing,
            purge_keeps_the_jobs_of_a_running_batch,
            a_batch_only_moves_forward,
            // registry
            an_enrollment_token_is_redeemed_once_before_it_expires,
            certificates_are_counted_per_node_since_a_time,
            an_attestation_key_is_set_replaced_and_removed,
            a_revocation_keeps_its_first_reason_and_uses_up_tokens,
            // reputation
            reputation_counts_never_overwrite_an_operators_decision,
            operators_release_and_confirm,
            suspect_jobs_are_those_not_verified_good,
        );
    };
    (@tests $h:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some(harness) = <$h as $crate::suite::Harness>::fresh().await else {
                    return;
                };
                $crate::suite::$name(&harness).await;
            }
        )*
    };
}
pub(crate) use store_suite;

pub(crate) fn request() -> Vec<u8> {
    br#"{"prompt":"hi","max_tokens":8,"seed":1}"#.to_vec()
}

/// The same key every time, so a test can reopen its store.
pub(crate) fn test_sealer() -> Sealer {
    Sealer::from_spec("test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
}

pub(crate) fn token(id: i32) -> StoredToken {
    StoredToken {
        id,
        text: format!("t{id}"),
        logprob: -0.1,
        top: vec![],
    }
}

/// A job without idempotency key, durable.
pub(crate) async fn new_job(store: &Stores) -> u64 {
    store
        .jobs
        .insert_job(
            format!("job-{}", rand::random::<u64>()),
            "t".into(),
            None,
            request(),
            1,
        )
        .await
        .unwrap()
        .unwrap()
}

/// An outcome in `state` at `finished_ms`.
pub(crate) fn ended(state: JobState, finished_ms: u64) -> Outcome {
    Outcome {
        state,
        finished_ms,
        finish_reason: Some("stop".into()),
        text_tail: String::new(),
        prompt_tokens: 1,
        error: None,
    }
}

/// A `done` outcome at `finished_ms`.
pub(crate) fn done_at(finished_ms: u64) -> Outcome {
    ended(JobState::Done, finished_ms)
}
