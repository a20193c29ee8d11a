//! The inference thread: one llama.cpp context, continuous batching over its slots.
//!
//! Every loop iteration (a "step") admits waiting requests into free slots, drops the sequences
//! whose receiver is gone, builds one `llama_batch` holding the next token of every decoding
//! sequence plus as many prompt tokens of newly admitted sequences as fit, runs one decode, and
//! samples for every sequence whose logits were requested. Decoding sequences go first in the
//! batch so that a long prompt joining never stalls the streams already running (prefill is
//! chunked across steps instead).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, watch};

use crate::request::{FinishReason, Finished, GenerationEvent, GenerationRequest, Timings};
use crate::request::{TokenEvent, TopLogprob};
use crate::sampling::{sample, TokenId};
use crate::score::{next_position, score_position, ScoreMode, ScoreRequest, ScoreResult};
use crate::token_text::{Release, TextReleaser, TokenTable};
use crate::{EngineStats, Limits};

pub(crate) enum Command {
    Generate {
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
        submitted: Instant,
    },
    SetLimits(Limits),
    Score {
        request: ScoreRequest,
        reply: tokio::sync::oneshot::Sender<Result<ScoreResult, String>>,
    },
}

/// Output positions (logit vectors) per decode call while scoring: llama.cpp keeps one
/// vocabulary-sized row per output, so this bounds that buffer (64 x 49k floats = 12.5 MB).
const SCORE_OUTPUTS_PER_DECODE: usize = 64;

/// A request waiting for a slot.
struct Waiting {
    request: GenerationRequest,
    events: mpsc::UnboundedSender<GenerationEvent>,
    submitted: Instant,
}

/// A request holding a slot (a llama.cpp sequence id).
struct Active {
    seq: u32,
    request: GenerationRequest,
    events: mpsc::UnboundedSender<GenerationEvent>,
    /// The prompt, evaluated in fixed-size chunks.
    prefill: Vec<TokenId>,
    prefilled: usize,
    /// Resumed tokens, fed one per step after the prompt exactly as they were generated, so
    /// their KV entries (and hence every later logit) are bit-identical to the original run's:
    /// evaluating them as one prefill batch takes other kernel paths and drifts by rounding,
    /// enough to flip a near-tie greedy choice.
    replay: Vec<TokenId>,
    replayed: usize,
    /// The sampled token to evaluate in the next step, once prefill is done.
    next_input: Option<TokenId>,
    /// Position of the next token in the sequence's KV cache.
    n_past: u32,
    /// Generation index of the next sampled token (resumed tokens count).
    next_index: u32,
    generated: u32,
    text: TextReleaser,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Active {
    /// An interactive prompt not yet fully prefilled: it gets a step of its own (see `step`).
    fn interactive_prefill_pending(&self) -> bool {
        self.request.interactive && self.prefilled < self.prefill.len()
    }
}

pub(crate) struct Worker<'m> {
    /// Pieces and end-of-generation ids (the same table the coordinator releases text from).
    tokens: Arc<TokenTable>,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    batch_capacity: usize,
    /// Prompt tokens per sequence per step (batch capacity minus room for every slot's
    /// decode token).
    prefill_chunk: usize,
    commands: mpsc::Receiver<Command>,
    stats: watch::Sender<EngineStats>,
    free_seqs: Vec<u32>,
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    limits: Limits,
    slots: u32,
    counters: EngineStats,
    /// Teacher-forcing requests waiting for a free sequence.
    scores: VecDeque<(
        ScoreRequest,
        tokio::sync::oneshot::Sender<Result<ScoreResult, String>>,
    )>,
}

impl<'m> Worker<'m> {
    pub(crate) fn new(
        tokens: Arc<TokenTable>,
        ctx: LlamaContext<'m>,
        slots: u32,
        batch_capacity: u32,
        commands: mpsc::Receiver<Command>,
        stats: watch::Sender<EngineStats>,
    ) -> Self {
        Self {
            tokens,
            ctx,
            batch: LlamaBatch::new(batch_capacity as usize, 1),
            batch_capacity: batch_capacity as usize,
            prefill_chunk: (batch_capacity.saturating_sub(slots) as usize).max(1),
            commands,
            stats,
            free_seqs: (0..slots).rev().collect(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            limits: Limits {
                max_active: slots,
                duty_cycle: 1.0,
            },
            slots,
            counters: EngineStats {
                slots_total: slots,
                ..Default::default()
            },
            scores: VecDeque::new(),
        }
    }

    /// Runs until every engine handle is dropped.
    pub(crate) fn run(mut self) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() && self.scores.is_empty() {
                // Idle: block until there is something to do.
                match self.commands.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        if self.active.is_empty()
                            && self.waiting.is_empty()
                            && self.scores.is_empty()
                        {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.run_scores();
            self.admit();
            if self.active.is_empty() {
                self.publish(0, 0);
                continue;
            }
            let started = Instant::now();
            self.step();
            self.throttle(started.elapsed());
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate {
                request,
                events,
                submitted,
            } => self.waiting.push_back(Waiting {
                request,
                events,
                submitted,
            }),
            Command::Score { request, reply } => self.scores.push_back((request, reply)),
            Command::SetLimits(limits) => {
                self.limits = Limits {
                    max_active: limits.max_active.clamp(1, self.slots),
                    duty_cycle: limits.duty_cycle.clamp(0.05, 1.0),
                }
            }
        }
        self.counters.queued = self.waiting.len() as u32;
    }

    /// Frees the slot of every sequence whose consumer has gone away, before the next decode.
    fn drop_cancelled(&mut self) {
        self.waiting.retain(|w| !w.events.is_closed());
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                let a = self.active.swap_remove(i);
                self.counters.cancelled += 1;
                self.release(a.seq);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        while (self.active.len() as u32) < self.limits.max_active {
            let Some(seq) = self.take_free_seq() else {
                break;
            };
            // Interactive requests go first; otherwise arrival order.
            let next = self
                .waiting
                .iter()
                .position(|w| w.request.interactive)
                .unwrap_or(0);
            let Some(w) = self.waiting.remove(next) else {
                self.free_seqs.push(seq);
                break;
            };
            let mut text = TextReleaser::new(&w.request.stop);
            for &id in &w.request.resume {
                text.push(self.piece(id));
            }
            let prefill = w.request.prompt.clone();
            let replay = w.request.resume.clone();
            self.active.push(Active {
                seq,
                next_index: w.request.resume.len() as u32,
                request: w.request,
                events: w.events,
                prefill,
                prefilled: 0,
                replay,
                replayed: 0,
                next_input: None,
                n_past: 0,
                generated: 0,
                text,
                submitted: w.submitted,
                admitted: Instant::now(),
                first_token: None,
            });
        }
        self.counters.queued = self.waiting.len() as u32;
    }

    fn step(&mut self) {
        self.batch.clear();
        // llama.cpp splits a batch for per-sequence KV streams into ubatches of consecutive,
        // increasing sequence ids; a batch in any other order runs as several smaller graph
        // computations (measured: 8 streams fell from 218 to 152 tok/s once slots had been
        // reused in another order). So the batch goes in sequence-id order, and new work
        // takes the lowest free id (`take_free_seq`) to keep the ids dense.
        self.active.sort_unstable_by_key(|a| a.seq);
        // (index into self.active, index of its logits in the batch)
        let mut wants_logits: Vec<(usize, i32)> = Vec::with_capacity(self.active.len());
        // One token per decoding (or replaying) sequence is always reserved: at most `slots`
        // such tokens, and slots <= batch capacity. Prompt chunks share what is left.
        let decoding = self
            .active
            .iter()
            .filter(|a| a.next_input.is_some() || a.prefilled == a.prefill.len())
            .count();
        let mut prefill_budget = self.batch_capacity.saturating_sub(decoding);
        let mut seqs_in_batch = 0u32;
        // An interactive prompt waiting for prefill gets a step of its own: its first token
        // then waits for one prefill, not for a decode step of everything else as well.
        let urgent = self.active.iter().any(Active::interactive_prefill_pending);
        if urgent {
            prefill_budget = self.batch_capacity;
            if self.active.len() > 1 {
                self.counters.interactive_prefill_steps += 1;
            }
        }
        for (ai, a) in self.active.iter_mut().enumerate() {
            if urgent && !a.interactive_prefill_pending() {
                continue;
            }
            if let Some(tok) = a.next_input.take() {
                let _ = self
                    .batch
                    .add(LlamaToken(tok), a.n_past as i32, &[a.seq as i32], true);
                a.n_past += 1;
                seqs_in_batch += 1;
                wants_logits.push((ai, self.batch.n_tokens() - 1));
            } else if a.prefilled == a.prefill.len() {
                if a.replayed >= a.replay.len() {
                    continue;
                }
                a.replayed += 1;
                let logits = a.replayed == a.replay.len();
                let _ = self.batch.add(
                    LlamaToken(a.replay[a.replayed - 1]),
                    a.n_past as i32,
                    &[a.seq as i32],
                    logits,
                );
                a.n_past += 1;
                seqs_in_batch += 1;
                if logits {
                    wants_logits.push((ai, self.batch.n_tokens() - 1));
                }
            } else {
                // Prompt chunks at fixed boundaries (multiples of `prefill_chunk`), whatever
                // else is in the batch: a chunk that does not fit waits for the next step
                // rather than being split, so a sequence's computation does not depend on what
                // it was batched with.
                let take = (a.prefill.len() - a.prefilled).min(self.prefill_chunk);
                if take > prefill_budget {
                    continue;
                }
                let end = a.prefilled + take;
                for (k, &tok) in a.prefill[a.prefilled..end].iter().enumerate() {
                    let last = a.prefilled + k + 1 == a.prefill.len() && a.replay.is_empty();
                    let _ = self
                        .batch
                        .add(LlamaToken(tok), a.n_past as i32, &[a.seq as i32], last);
                    a.n_past += 1;
                    if last {
                        wants_logits.push((ai, self.batch.n_tokens() - 1));
                    }
                }
                a.prefilled = end;
                prefill_budget -= take;
                seqs_in_batch += 1;
            }
        }
        let batch_tokens = self.batch.n_tokens() as u32;
        if batch_tokens == 0 {
            return;
        }
        if let Err(err) = self.ctx.decode(&mut self.batch) {
            tracing::error!(cause = %err, sequences = self.active.len(), "llama.cpp decode failed; failing the batch");
            for a in std::mem::take(&mut self.active) {
                let _ = a
                    .events
                    .send(GenerationEvent::Failed(format!("decode failed: {err}")));
                self.free_seqs.push(a.seq);
                let _ = self.ctx.clear_kv_cache_seq(Some(a.seq), None, None);
            }
            self.publish(seqs_in_batch, batch_tokens);
            return;
        }
        self.counters.steps += 1;
        let mut finished: Vec<usize> = Vec::new();
        for (ai, batch_index) in wants_logits {
            if self.sample_into(ai, batch_index) {
                finished.push(ai);
            }
        }
        // Remove from the back so earlier indices stay valid.
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for ai in finished {
            let a = self.active.swap_remove(ai);
            self.release(a.seq);
        }
        self.publish(seqs_in_batch, batch_tokens);
    }

    /// Samples the next token of active sequence `ai`; returns true when it has finished.
    fn sample_into(&mut self, ai: usize, batch_index: i32) -> bool {
        let logits = self.ctx.get_logits_ith(batch_index);
        let a = &mut self.active[ai];
        let n_top = if a.request.logprobs {
            a.request.top_logprobs as usize
        } else {
            0
        };
        let s = sample(logits, &a.request.sampling, a.next_index as u64, n_top);
        let now = Instant::now();
        let first = *a.first_token.get_or_insert(now);
        if !a.request.ignore_eos && self.tokens.is_eog(s.token) {
            let tail = a.text.finish();
            finish(a, FinishReason::Stop, tail, first, now);
            return true;
        }
        let piece = self.tokens.piece(s.token).unwrap_or_default();
        let (text, stopped) = match a.text.push(piece) {
            Release::Text(t) => (t, false),
            Release::Stopped(t) => (t, true),
        };
        let top_logprobs = s
            .top
            .iter()
            .map(|&(id, logprob)| TopLogprob {
                id,
                text: self.tokens.lossy_text(id),
                logprob,
            })
            .collect();
        let _ = a.events.send(GenerationEvent::Token(TokenEvent {
            index: a.next_index,
            id: s.token,
            text,
            logprob: s.logprob,
            top_logprobs,
        }));
        a.next_index += 1;
        a.generated += 1;
        self.counters.tokens_generated += 1;
        if stopped {
            finish(a, FinishReason::Stop, String::new(), first, now);
            return true;
        }
        if a.generated >= a.request.max_tokens {
            let tail = a.text.finish();
            finish(a, FinishReason::Length, tail, first, now);
            return true;
        }
        a.next_input = Some(s.token);
        false
    }

    /// Runs every waiting teacher-forcing request, one at a time on a free sequence (a score
    /// is a prefill: it holds the thread for its length, between decode steps of the running
    /// generations). Requests wait while every sequence is busy.
    fn run_scores(&mut self) {
        while !self.scores.is_empty() {
            let Some(seq) = self.take_free_seq() else {
                return;
            };
            let (request, reply) = self.scores.pop_front().expect("checked non-empty");
            if !reply.is_closed() {
                let result = self.score(seq, &request);
                let _ = reply.send(result);
            }
            self.release(seq);
        }
    }

    /// One batched prefill of prompt + claimed tokens on sequence `seq`, with logits at every
    /// position that predicts a claimed token (and the one after the last).
    fn score(&mut self, seq: u32, request: &ScoreRequest) -> Result<ScoreResult, String> {
        let all: Vec<TokenId> = request
            .prompt
            .iter()
            .chain(&request.claimed)
            .copied()
            .collect();
        let first_output = request.prompt.len() - 1;
        // Stepwise: one claimed token per decode call, as a generating node evaluates them.
        let outputs_per_decode = match request.mode {
            ScoreMode::Prefill => SCORE_OUTPUTS_PER_DECODE,
            ScoreMode::Stepwise => 1,
        };
        let mut tokens = Vec::with_capacity(request.claimed.len());
        let mut next = None;
        let mut pos = 0;
        while pos < all.len() {
            self.batch.clear();
            let start = pos;
            let mut outputs = 0;
            while pos < all.len()
                && pos - start < self.batch_capacity
                && outputs < outputs_per_decode
            {
                let logits = pos >= first_output;
                self.batch
                    .add(LlamaToken(all[pos]), pos as i32, &[seq as i32], logits)
                    .map_err(|e| format!("batch: {e}"))?;
                outputs += logits as usize;
                pos += 1;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| format!("decode failed while scoring: {e}"))?;
            self.counters.steps += 1;
            for p in start.max(first_output)..pos {
                let logits = self.ctx.get_logits_ith((p - start) as i32);
                match all.get(p + 1) {
                    Some(&claimed) => {
                        tokens.push(score_position(logits, claimed, &request.sampling))
                    }
                    None => next = Some(next_position(logits, self.tokens.eog_tokens())),
                }
            }
        }
        Ok(ScoreResult {
            tokens,
            next: next.expect("the last position always has logits"),
        })
    }

    fn piece(&self, id: TokenId) -> &[u8] {
        self.tokens.piece(id).unwrap_or_default()
    }

    /// The lowest free sequence id: dense ids keep each step's batch one ubatch (see `step`).
    fn take_free_seq(&mut self) -> Option<u32> {
        let (i, _) = self.free_seqs.iter().enumerate().min_by_key(|(_, s)| **s)?;
        Some(self.free_seqs.swap_remove(i))
    }

    /// Returns a sequence's KV cells and slot at once.
    fn release(&mut self, seq: u32) {
        if let Err(err) = self.ctx.clear_kv_cache_seq(Some(seq), None, None) {
            tracing::error!(cause = %err, seq, "could not clear a sequence's KV cache");
        }
        self.free_seqs.push(seq);
    }

    /// Duty-cycle throttling (set by the vehicle governor): idle for as long as needed so the
    /// busy fraction of wall time equals `duty_cycle`.
    fn throttle(&self, busy: Duration) {
        let duty = self.limits.duty_cycle;
        if duty < 1.0 {
            std::thread::sleep(busy.mul_f32((1.0 - duty) / duty));
        }
    }

    fn publish(&mut self, seqs: u32, tokens: u32) {
        self.counters.slots_busy = self.active.len() as u32;
        self.counters.queued = self.waiting.len() as u32;
        self.counters.last_batch_sequences = seqs;
        self.counters.last_batch_tokens = tokens;
        self.counters.max_active = self.limits.max_active;
        let snapshot = self.counters.clone();
        self.stats.send_replace(snapshot);
    }
}

fn finish(a: &mut Active, reason: FinishReason, text_tail: String, first: Instant, now: Instant) {
    let timings = Timings {
        queue: a.admitted.duration_since(a.submitted),
        prefill: first.duration_since(a.admitted),
        decode: now.duration_since(first),
        prefill_tokens: (a.prefill.len() + a.replay.len()) as u32,
    };
    let _ = a.events.send(GenerationEvent::Finished(Finished {
        reason,
        text_tail,
        prompt_tokens: a.request.prompt.len() as u32,
        completion_tokens: a.generated,
        timings,
    }));
}
