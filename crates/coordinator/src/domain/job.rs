//! What a job is while the coordinator runs it, and what a client holds to follow one.

use std::sync::Arc;
use tokio::time::Instant;

use tokenfleet_engine::token_text::{Release, TextReleaser};
use tokenfleet_engine::{SamplingParams, TokenTable};
use tokio::sync::watch;

use crate::domain::error::RequestError;
use crate::domain::request::ValidRequest;
use crate::domain::store::StoredToken;

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Done {
        finish_reason: String,
        text_tail: String,
        prompt_tokens: u32,
    },
    Failed(RequestError),
    Cancelled,
}

/// The part of a job clients read: its tokens so far (each index once, in order) and, at the
/// end, its outcome. Published through a `watch` channel, so a slow reader never holds up the
/// coordinator and never misses a token: it reads from its own index onwards.
#[derive(Debug, Clone, Default)]
pub struct JobView {
    pub tokens: Vec<StoredToken>,
    pub prompt_tokens: u32,
    pub outcome: Option<JobOutcome>,
    /// Times the job's tokens were discarded and it started again from scratch (its node
    /// failed result verification); a reader whose count differs starts over from index 0.
    pub restarts: u32,
}

/// A client's handle on a job.
#[derive(Debug, Clone)]
pub struct JobHandle {
    pub id: u64,
    pub public_id: String,
    pub created_s: u64,
    pub request: ValidRequest,
    pub view: watch::Receiver<JobView>,
}

/// Where a job is in its life inside the manager.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    Queued {
        since: Instant,
    },
    Running {
        node: tokenfleet_scheduler::NodeId,
    },
    /// Preempted: the node was told to hand the job back with its tokens (its slot already
    /// counts as free); chunks and the eviction from that node are still taken.
    HandingBack {
        node: tokenfleet_scheduler::NodeId,
        since: Instant,
    },
    Ended,
}

/// The manager's record of a job.
pub struct Job {
    pub id: u64,
    pub public_id: String,
    pub tenant: String,
    pub request: ValidRequest,
    pub created_ms: u64,
    pub accepted: Instant,
    pub view: watch::Sender<JobView>,
    pub placement: Placement,
    /// Tokens already written to the store.
    pub persisted: usize,
    pub first_token_seen: bool,
    /// Vehicles that reported the job failed (`JobFailed`). Hand-offs, evictions and expired
    /// leases are not failures: a job handed across a car park many times is still good.
    pub failures: u32,
    /// Which node produced the tokens from which index on, in order (for result
    /// verification; tokens recovered after a restart have no producer).
    pub producers: Vec<(tokenfleet_scheduler::NodeId, usize)>,
    /// Admitted through the HTTP API with a client waiting on it (whatever its class): counts
    /// against `max_queued_jobs`. A Batch API line is not (it waits for its window).
    pub followed: bool,
    /// The coordinator's own release of the job's text from its token ids, when it holds the
    /// model's token table (result verification on): clients see this text, not a node's.
    pub text: Option<JobText>,
}

/// The sampling parameters a job runs with: what nodes are told and what the verifier
/// judges against (one mapping, so the two cannot differ). OpenAI requests have no top-k.
pub fn engine_sampling(request: &ValidRequest) -> SamplingParams {
    SamplingParams {
        temperature: request.sampling.temperature,
        top_p: request.sampling.top_p,
        top_k: 0,
        seed: request.sampling.seed,
    }
}

/// Releases a job's text from its token ids exactly as an honest agent's engine does (the
/// same [`TextReleaser`] over the same [`TokenTable`]), so the text a node sends is checked,
/// and replaced, rather than trusted.
pub struct JobText {
    table: Arc<TokenTable>,
    stop: Vec<String>,
    releaser: TextReleaser,
    /// Tokens pushed so far.
    pushed: usize,
    /// Index of the token whose text completed a stop string (the job's last token).
    stopped_at: Option<usize>,
}

impl JobText {
    /// A releaser that has already seen `ids` (a resumed or recovered job).
    pub fn new(table: Arc<TokenTable>, stop: &[String], ids: &[i32]) -> Self {
        let mut text = Self {
            table,
            stop: stop.to_vec(),
            releaser: TextReleaser::new(stop),
            pushed: 0,
            stopped_at: None,
        };
        for &id in ids {
            let _ = text.push(id);
        }
        text
    }

    /// Starts over (the job's tokens were discarded).
    pub fn reset(&mut self) {
        *self = Self::new(Arc::clone(&self.table), &self.stop.clone(), &[]);
    }

    /// The text released with token `id`; an error when the token cannot be part of an honest
    /// output (not in the vocabulary, or after a stop string ended the text).
    pub fn push(&mut self, id: i32) -> Result<String, String> {
        if let Some(at) = self.stopped_at {
            return Err(format!(
                "token {} sent after a stop string ended the output at token {at}",
                self.pushed
            ));
        }
        let Some(piece) = self.table.piece(id) else {
            return Err(format!("token id {id} is not in the model's vocabulary"));
        };
        let index = self.pushed;
        self.pushed += 1;
        Ok(match self.releaser.push(piece) {
            Release::Text(t) => t,
            Release::Stopped(t) => {
                self.stopped_at = Some(index);
                t
            }
        })
    }

    /// Whether a stop string ended the output.
    pub fn stopped(&self) -> bool {
        self.stopped_at.is_some()
    }

    /// The text held back at the end (what an honest agent sends as its `text_tail`).
    pub fn tail(&self) -> String {
        if self.stopped() {
            String::new()
        } else {
            self.releaser.clone().finish()
        }
    }

    /// An alternative token's text, as the engine shows top-logprob alternatives.
    pub fn token_text(&self, id: i32) -> Option<String> {
        self.table.piece(id).map(|_| self.table.lossy_text(id))
    }
}

impl Job {
    /// Whether `node` was told to hand this job back and has not yet done so.
    pub fn is_handing_back_from(&self, node: tokenfleet_scheduler::NodeId) -> bool {
        matches!(self.placement, Placement::HandingBack { node: n, .. } if n == node)
    }

    pub fn generated(&self) -> usize {
        self.view.borrow().tokens.len()
    }

    pub fn handle(&self) -> JobHandle {
        JobHandle {
            id: self.id,
            public_id: self.public_id.clone(),
            created_s: self.created_ms / 1000,
            request: self.request.clone(),
            view: self.view.subscribe(),
        }
    }
}
