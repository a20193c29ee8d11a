//! The agent core: one task that owns the running jobs and the current session's sender.
//!
//! Assigned jobs run on the engine; their tokens are kept in memory (never on disk) so a
//! reconnecting session can resend what the coordinator missed, and are forwarded as
//! `TokenChunk`s, coalesced: everything that arrived while the core was busy goes out as one
//! chunk per job. A departure evicts every job at once: the engine streams are dropped (the
//! engine frees their slots before its next decode step), the tokens not yet sent go out, and
//! `JobEvicted` says how far each got. A `Cancel` with `hand_back` (interactive work preempting
//! a batch job) evicts that one job the same way.

use std::collections::HashMap;
use std::time::Instant;

use tokenfleet_engine::{
    ChatMessage, Engine, EngineError, GenerationEvent, GenerationRequest, GenerationStream,
    PromptInput, SamplingParams,
};
use tokenfleet_protocol::v1::{self, AgentMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::{mpsc, oneshot, watch};

use crate::energy::{JobEnergyLedger, JOULES_PER_KWH};
use crate::status::VehicleStatus;

pub(crate) enum CoreMsg {
    FromCoordinator(CoordinatorMsg),
    Attach(mpsc::Sender<AgentMessage>),
    Detach,
    Hello(oneshot::Sender<v1::Hello>),
    Engine(String, GenerationEvent),
    /// A job's prompt was tokenized and the engine took it (prompt tokens).
    Started(String, u32),
    /// A job could not start (message, whether another vehicle could run it).
    Refused(String, String, bool),
}

/// One generated token as kept in memory: id, released text, logprob, top alternatives.
type HeldToken = (i32, String, f32, Vec<(i32, String, f32)>);

struct RunningJob {
    /// Generation index of history[0] (the number of resumed tokens).
    base: u32,
    prompt_tokens: u32,
    history: Vec<HeldToken>,
    /// Tokens already handed to a session.
    sent: usize,
    top_logprobs: bool,
    task: tokio::task::JoinHandle<()>,
}

impl RunningJob {
    fn next_index(&self) -> u32 {
        self.base + self.history.len() as u32
    }

    fn chunk(&self, job_id: &str, from: usize) -> v1::TokenChunk {
        let slice = &self.history[from..];
        v1::TokenChunk {
            job_id: job_id.to_string(),
            start_index: self.base + from as u32,
            token_ids: slice.iter().map(|t| t.0).collect(),
            texts: slice.iter().map(|t| t.1.clone()).collect(),
            logprobs: slice.iter().map(|t| t.2).collect(),
            top_logprobs: if self.top_logprobs {
                slice
                    .iter()
                    .map(|t| v1::TokenLogprobs {
                        top: t
                            .3
                            .iter()
                            .map(|(id, text, lp)| v1::TopLogprob {
                                token_id: *id,
                                text: text.clone(),
                                logprob: *lp,
                            })
                            .collect(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            prompt_tokens: self.prompt_tokens,
        }
    }
}

pub(crate) struct Core {
    pub engine: Engine,
    pub hello_template: v1::Hello,
    pub rx: mpsc::Receiver<CoreMsg>,
    pub tx: mpsc::Sender<CoreMsg>,
    pub status: watch::Receiver<VehicleStatus>,
    jobs: HashMap<String, RunningJob>,
    out: Option<mpsc::Sender<AgentMessage>>,
    draining: bool,
    energy: JobEnergyLedger,
}

impl Core {
    pub fn new(
        engine: Engine,
        hello_template: v1::Hello,
        rx: mpsc::Receiver<CoreMsg>,
        tx: mpsc::Sender<CoreMsg>,
        status: watch::Receiver<VehicleStatus>,
        energy: JobEnergyLedger,
    ) -> Self {
        Self {
            engine,
            hello_template,
            rx,
            tx,
            status,
            jobs: HashMap::new(),
            out: None,
            draining: false,
            energy,
        }
    }

    pub async fn run(mut self) {
        loop {
            tokio::select! {
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                    // Coalesce: take everything already waiting before flushing chunks.
                    while let Ok(msg) = self.rx.try_recv() {
                        self.handle(msg);
                    }
                    self.flush();
                }
                changed = self.status.changed() => {
                    if changed.is_err() { break; }
                    self.on_status();
                }
            }
        }
        for (_, job) in self.jobs.drain() {
            job.task.abort();
        }
    }

    /// Sends on the current session; false when there is none or its buffer is full (the
    /// coordinator resyncs on reconnect: Hello lists our jobs and it asks for a resend).
    fn send(&self, msg: AgentMsg) -> bool {
        match &self.out {
            Some(out) => out.try_send(AgentMessage::new(msg)).is_ok(),
            None => false,
        }
    }

    /// Attributes compute energy since the last call to the running jobs; called before
    /// anything can change the set of running jobs or the vehicle's power state.
    fn account_energy(&mut self) {
        self.energy.account(&self.status.borrow(), Instant::now());
    }

    /// Removes a job that stopped running, with the energy it used.
    fn remove_job(&mut self, job_id: &str) -> Option<(RunningJob, tokenfleet_vehicle::JobEnergy)> {
        let job = self.jobs.remove(job_id)?;
        Some((job, self.energy.end(job_id)))
    }

    fn on_status(&mut self) {
        self.account_energy();
        let status = self.status.borrow_and_update().clone();
        if let Some(limits) = status.limits {
            let _ = self.engine.set_limits(limits);
        }
        if status.must_evict {
            self.evict_all(&status.state.reason);
        }
        self.send_state();
    }

    fn send_state(&self) {
        let mut state = self.status.borrow().state.clone();
        if self.draining {
            state.eligible = false;
        }
        let stats = self.engine.stats();
        state.slots_free = stats.slots_total.saturating_sub(self.jobs.len() as u32);
        let _ = self.send(AgentMsg::State(state));
    }

    fn evict_all(&mut self, reason: &str) {
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        for id in ids {
            self.evict(&id, reason);
        }
    }

    /// Gives a job back: its stream is dropped now, the tokens not yet sent go out first (so no
    /// work is thrown away), and the coordinator learns how far it got.
    fn evict(&mut self, job_id: &str, reason: &str) {
        self.flush_job(job_id);
        if let Some((job, _)) = self.remove_job(job_id) {
            job.task.abort();
            // Tokens the session could not take (buffer full, no session) are not reported:
            // the next vehicle regenerates them.
            let next_index = job.base + job.sent as u32;
            tracing::info!(job = job_id, next_index, reason, "job evicted");
            let _ = self.send(AgentMsg::Evicted(v1::JobEvicted {
                job_id: job_id.to_string(),
                reason: reason.to_string(),
                next_index,
            }));
            // (If the session is down the lease expires instead and the job resumes the same way.)
        }
    }

    fn handle(&mut self, msg: CoreMsg) {
        self.account_energy();
        match msg {
            CoreMsg::Attach(out) => {
                self.out = Some(out);
                self.send_state();
            }
            CoreMsg::Detach => self.out = None,
            CoreMsg::Hello(reply) => {
                let mut hello = self.hello_template.clone();
                hello.held_jobs = self
                    .jobs
                    .iter()
                    .map(|(id, j)| v1::HeldJob {
                        job_id: id.clone(),
                        next_index: j.next_index(),
                    })
                    .collect();
                let _ = reply.send(hello);
            }
            CoreMsg::Engine(job_id, event) => self.on_engine(job_id, event),
            CoreMsg::Started(job_id, prompt_tokens) => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    job.prompt_tokens = prompt_tokens;
                }
            }
            CoreMsg::Refused(job_id, message, retryable) => {
                if self.remove_job(&job_id).is_some() {
                    tracing::warn!(job = %job_id, %message, "cannot run assigned job");
                    let _ = self.send(AgentMsg::Failed(v1::JobFailed {
                        job_id,
                        message,
                        retryable,
                    }));
                }
            }
            CoreMsg::FromCoordinator(msg) => self.on_coordinator(msg),
        }
    }

    fn on_coordinator(&mut self, msg: CoordinatorMsg) {
        match msg {
            CoordinatorMsg::Assign(a) => self.assign(a),
            CoordinatorMsg::Cancel(c) if c.hand_back => self.evict(&c.job_id, &c.reason),
            CoordinatorMsg::Cancel(c) => {
                if let Some((job, _)) = self.remove_job(&c.job_id) {
                    job.task.abort();
                    tracing::info!(job = %c.job_id, reason = %c.reason, "job cancelled by coordinator");
                }
            }
            CoordinatorMsg::Drain(d) => {
                self.draining = true;
                if d.evict {
                    self.evict_all(&format!("drain: {}", d.reason));
                }
                self.send_state();
            }
            CoordinatorMsg::Resend(r) => {
                if let Some(job) = self.jobs.get_mut(&r.job_id) {
                    let from = r.from_index.saturating_sub(job.base) as usize;
                    if from <= job.history.len() {
                        job.sent = from;
                    }
                }
            }
            // Session-level messages (the session handles them; they never reach the core).
            CoordinatorMsg::Welcome(_)
            | CoordinatorMsg::HeartbeatAck(_)
            | CoordinatorMsg::Attest(_)
            | CoordinatorMsg::RenewCertificate(_)
            | CoordinatorMsg::Certificate(_) => {}
        }
    }

    fn assign(&mut self, a: v1::Assign) {
        let job_id = a.job_id.clone();
        if self.draining || self.status.borrow().must_evict {
            // The Assign crossed the departure on the wire: hand the job straight back, from
            // where it was, as an eviction (a hand-off, not a failure of the job).
            let reason = if self.draining { "drain" } else { "departure" };
            tracing::info!(job = %job_id, reason, "assigned job handed back: vehicle is leaving");
            let _ = self.send(AgentMsg::Evicted(v1::JobEvicted {
                job_id,
                reason: format!("{reason}: vehicle is leaving"),
                next_index: a.resume_token_ids.len() as u32,
            }));
            return;
        }
        let base = a.resume_token_ids.len() as u32;
        let top_logprobs = a.top_logprobs > 0;
        // Rendering and tokenizing the prompt is CPU work (milliseconds for a long prompt): the
        // job's own task does it off the executor, then streams the engine's events here.
        let engine = self.engine.clone();
        let tx = self.tx.clone();
        let id = job_id.clone();
        let task = tokio::spawn(async move {
            let mut stream = match start_generation(&engine, a).await {
                Ok((stream, prompt_tokens)) => {
                    let _ = tx.send(CoreMsg::Started(id.clone(), prompt_tokens)).await;
                    stream
                }
                Err((message, retryable)) => {
                    let _ = tx.send(CoreMsg::Refused(id, message, retryable)).await;
                    return;
                }
            };
            while let Some(ev) = stream.next().await {
                let last = !matches!(ev, GenerationEvent::Token(_));
                if tx.send(CoreMsg::Engine(id.clone(), ev)).await.is_err() || last {
                    break;
                }
            }
        });
        tracing::debug!(job = %job_id, resume = base, "job started");
        // The coordinator re-assigns a job id only after taking it back; if our copy is still
        // running (its Cancel was lost with a session), stop it so one job never has two
        // streams.
        if let Some((old, _)) = self.remove_job(&job_id) {
            old.task.abort();
            tracing::warn!(job = %job_id, "job re-assigned while still running here; restarted");
        }
        self.energy.begin(&job_id);
        self.jobs.insert(
            job_id,
            RunningJob {
                base,
                prompt_tokens: 0,
                history: Vec::new(),
                sent: 0,
                top_logprobs,
                task,
            },
        );
    }

    fn on_engine(&mut self, job_id: String, event: GenerationEvent) {
        match event {
            GenerationEvent::Token(t) => {
                if let Some(job) = self.jobs.get_mut(&job_id) {
                    let top = t
                        .top_logprobs
                        .into_iter()
                        .map(|a| (a.id, a.text, a.logprob))
                        .collect();
                    job.history.push((t.id, t.text, t.logprob, top));
                }
            }
            GenerationEvent::Finished(f) => {
                self.flush_job(&job_id);
                if let Some((job, energy)) = self.remove_job(&job_id) {
                    let finish_reason = match f.reason {
                        tokenfleet_engine::FinishReason::Stop => v1::FinishReason::Stop,
                        tokenfleet_engine::FinishReason::Length => v1::FinishReason::Length,
                    };
                    let _ = self.send(AgentMsg::Done(v1::JobDone {
                        job_id,
                        finish_reason: finish_reason as i32,
                        text_tail: f.text_tail,
                        next_index: job.next_index(),
                        prompt_tokens: f.prompt_tokens,
                        queue_ms: f.timings.queue.as_millis() as u32,
                        prefill_ms: f.timings.prefill.as_millis() as u32,
                        decode_ms: f.timings.decode.as_millis() as u32,
                        energy_j: energy.total().kwh * JOULES_PER_KWH,
                        energy_measured: energy.total().kwh > 0.0
                            && energy.total().quality == tokenfleet_vehicle::Quality::Measured,
                        grid_energy_j: energy.grid.kwh * JOULES_PER_KWH,
                        battery_energy_j: energy.battery.kwh * JOULES_PER_KWH,
                        battery_wear_usd: energy.wear.usd,
                    }));
                }
            }
            GenerationEvent::Failed(message) => {
                if self.remove_job(&job_id).is_some() {
                    let _ = self.send(AgentMsg::Failed(v1::JobFailed {
                        job_id,
                        message,
                        retryable: true,
                    }));
                }
            }
        }
    }

    fn flush_job(&mut self, job_id: &str) {
        if self.out.is_none() {
            return;
        }
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        if job.sent >= job.history.len() {
            return;
        }
        let chunk = job.chunk(job_id, job.sent);
        let len = job.history.len();
        if self.send(AgentMsg::Chunk(chunk)) {
            if let Some(job) = self.jobs.get_mut(job_id) {
                job.sent = len;
            }
        }
    }

    fn flush(&mut self) {
        let ids: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.sent < j.history.len())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.flush_job(&id);
        }
    }
}

/// An `Assign`'s prompt as the engine takes it.
pub fn prompt_input(prompt: v1::assign::Prompt) -> PromptInput {
    match prompt {
        v1::assign::Prompt::Chat(c) => PromptInput::Chat(
            c.messages
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect(),
        ),
        v1::assign::Prompt::Text(t) => PromptInput::Text(t),
        v1::assign::Prompt::Tokens(t) => PromptInput::Tokens(t.ids),
    }
}

/// Tokenizes an assigned job's prompt (off the executor) and queues its generation; the
/// stream and the prompt's token count, or why it cannot run and whether another vehicle
/// could.
async fn start_generation(
    engine: &Engine,
    a: v1::Assign,
) -> Result<(GenerationStream, u32), (String, bool)> {
    let prompt = a
        .prompt
        .map(prompt_input)
        .ok_or_else(|| ("Assign without a prompt".to_string(), false))?;
    let prompt = engine
        .prompt_tokens_async(prompt)
        .await
        .map_err(|e| (e.to_string(), false))?;
    let sampling = a.sampling.unwrap_or_default();
    let request = GenerationRequest {
        prompt,
        resume: a.resume_token_ids,
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            top_p: if sampling.top_p > 0.0 {
                sampling.top_p
            } else {
                1.0
            },
            top_k: sampling.top_k,
            seed: sampling.seed,
        },
        stop: a.stop,
        logprobs: a.logprobs,
        top_logprobs: a.top_logprobs.min(20) as u8,
        ignore_eos: a.ignore_eos,
        interactive: a.interactive,
    };
    let prompt_tokens = request.prompt.len() as u32;
    engine
        .generate(request)
        .map(|stream| (stream, prompt_tokens))
        .map_err(|e| {
            let retryable = matches!(e, EngineError::Overloaded(_) | EngineError::Shutdown);
            let message = match e {
                EngineError::ContextOverflow { .. } => {
                    format!("This model's maximum context length is exceeded: {e}")
                }
                other => other.to_string(),
            };
            (message, retryable)
        })
}
