//! Dishonest vehicles for `tokenfleet bench trust`: protocol-level agents that speak the real
//! `tokenfleet.v1` session, run the real model for the jobs they are given, and then lie in
//! one chosen way. They live in the benchmark only (the shipped agent has no way to lie).
//!
//! Each lie is the cheapest version of a real attack: skipping work (zero tokens, a truncated
//! answer claiming `length`), serving something cheaper than asked (samples for greedy
//! requests, greedy answers for sampled ones, another model behind the allowed hash), editing
//! what the client reads (texts that are not the tokens' text), dodging the verifier (an
//! upper-case model hash), or lying rarely (a share of jobs answered with random tokens, whose
//! texts are made consistent so only the statistics can tell).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_engine::token_text::{Release, TextReleaser};
use tokenfleet_engine::{Engine, FinishReason, GenerationEvent, GenerationRequest, SamplingParams};
use tokenfleet_protocol::v1::node_session_client::NodeSessionClient;
use tokenfleet_protocol::v1::{self, AgentMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How a liar lies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lie {
    /// On this share of its jobs, random token ids from a random position on (with their
    /// true texts, so only the statistics can tell).
    Rare(f64),
    /// Honest token ids, edited text.
    ForgedText,
    /// Announces its model's sha256 in upper case, and answers with random tokens.
    UpperCaseHash,
    /// Ends every job at once, claiming the model stopped.
    ZeroTokens,
    /// Stops half way, claiming `length`.
    TruncatedLength,
    /// Answers greedy requests with samples at temperature 0.9.
    WrongTemperature,
    /// Answers sampled requests greedily.
    GreedyOnSampled,
    /// Runs the engine it was given (another model) behind the allowed hash.
    WrongModel,
}

impl Lie {
    pub fn name(&self) -> &'static str {
        match self {
            Lie::Rare(_) => "rare_random_tokens",
            Lie::ForgedText => "forged_text_honest_ids",
            Lie::UpperCaseHash => "upper_case_model_hash",
            Lie::ZeroTokens => "zero_token_answers",
            Lie::TruncatedLength => "truncated_claiming_length",
            Lie::WrongTemperature => "samples_for_greedy",
            Lie::GreedyOnSampled => "greedy_for_sampled",
            Lie::WrongModel => "wrong_model_behind_allowed_hash",
        }
    }
}

/// What a liar saw.
#[derive(Default)]
pub struct LiarStats {
    pub assigned: AtomicU64,
    pub finished: AtomicU64,
    pub lies: AtomicU64,
    /// Jobs finished when the coordinator first drained it (its detection).
    pub finished_at_detection: AtomicU64,
    pub detected: AtomicBool,
    /// Refused at Hello (the coordinator would not let it serve at all).
    pub refused: AtomicBool,
    pub refusal: std::sync::Mutex<String>,
}

pub struct Liar {
    pub stats: Arc<LiarStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Liar {
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site per phase; a struct would only rename them"
    )]
    pub fn start(
        grpc_url: String,
        name: String,
        model: String,
        sha256: String,
        engine: Engine,
        slots: u32,
        lie: Lie,
        seed: u64,
    ) -> Liar {
        let stats = Arc::new(LiarStats::default());
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            let sha = if lie == Lie::UpperCaseHash {
                sha256.to_ascii_uppercase()
            } else {
                sha256
            };
            let hello = v1::Hello {
                node_id: name,
                software_version: "bench-liar".into(),
                protocol_version: tokenfleet_protocol::PROTOCOL_VERSION,
                hardware: Some(v1::HardwareProfile {
                    compute_class: "cpu".into(),
                    cpu_threads: 2,
                    memory_bytes: 0,
                    decode_tps_single: 150.0,
                    decode_tps_batched: 250.0,
                }),
                engine_slots: slots,
                models: vec![v1::ModelInfo {
                    name: model,
                    sha256: sha,
                    ctx_per_slot: engine.info().ctx_per_slot,
                    size_bytes: 0,
                }],
                held_jobs: Vec::new(),
            };
            if let Err(why) = serve(&grpc_url, hello, engine, lie, seed, &task_stats).await {
                task_stats.refused.store(true, Ordering::SeqCst);
                *task_stats.refusal.lock().unwrap_or_else(|e| e.into_inner()) = why;
            }
        });
        Liar { stats, task }
    }
}

async fn serve(
    url: &str,
    hello: v1::Hello,
    engine: Engine,
    lie: Lie,
    seed: u64,
    stats: &Arc<LiarStats>,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = NodeSessionClient::new(channel);
    let (tx, rx) = mpsc::channel(1024);
    let _ = tx.send(AgentMessage::new(AgentMsg::Hello(hello))).await;
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    match inbound.message().await {
        Ok(Some(v1::CoordinatorMessage {
            msg: Some(CoordinatorMsg::Welcome(_)),
        })) => {}
        Ok(other) => return Err(format!("no Welcome: {other:?}")),
        Err(s) => return Err(s.message().to_string()),
    }
    let _ = tx
        .send(AgentMessage::new(AgentMsg::State(
            tokenfleet_agent::VehicleStatus::parked().state,
        )))
        .await;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(v1::CoordinatorMessage { msg: Some(m) })) => m,
                    Ok(Some(_)) => continue,
                    _ => return Ok(()),
                };
                match msg {
                    CoordinatorMsg::Assign(a) => {
                        stats.assigned.fetch_add(1, Ordering::SeqCst);
                        let (engine, tx, stats) = (engine.clone(), tx.clone(), Arc::clone(stats));
                        tokio::spawn(async move { run_job(engine, a, lie, seed, &tx, &stats).await });
                    }
                    CoordinatorMsg::Drain(d)
                        if d.reason.starts_with("quarantined")
                            && !stats.detected.swap(true, Ordering::SeqCst) =>
                    {
                        stats.finished_at_detection.store(stats.finished.load(Ordering::SeqCst), Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                let _ = tx.send(AgentMessage::new(AgentMsg::Heartbeat(v1::Heartbeat { sent_unix_ms: 0 }))).await;
            }
        }
    }
}

async fn run_job(
    engine: Engine,
    a: v1::Assign,
    lie: Lie,
    seed: u64,
    tx: &mpsc::Sender<AgentMessage>,
    stats: &LiarStats,
) {
    let job_key = a.job_id.parse::<u64>().unwrap_or(0);
    let draw = |i: u64| tokenfleet_engine::sampling::uniform(seed ^ job_key.rotate_left(17), i);
    let Some(prompt) = a.prompt.clone().map(tokenfleet_agent::prompt_input) else {
        return;
    };
    let prompt = engine.prompt_tokens_async(prompt).await.unwrap_or_default();
    let s = a.sampling.unwrap_or_default();
    let mut sampling = SamplingParams {
        temperature: s.temperature,
        top_p: if s.top_p > 0.0 { s.top_p } else { 1.0 },
        top_k: s.top_k,
        seed: s.seed,
    };
    match lie {
        Lie::WrongTemperature if sampling.is_greedy() => {
            sampling.temperature = 0.9;
            sampling.seed = job_key ^ seed;
        }
        Lie::GreedyOnSampled => sampling.temperature = 0.0,
        _ => {}
    }
    let start = a.resume_token_ids.len() as u32;
    let table = engine.token_table();
    let done = |next_index: u32, finish: v1::FinishReason, tail: String| {
        AgentMessage::new(AgentMsg::Done(v1::JobDone {
            job_id: a.job_id.clone(),
            finish_reason: finish as i32,
            text_tail: tail,
            next_index,
            prompt_tokens: prompt.len() as u32,
            ..Default::default()
        }))
    };
    if lie == Lie::ZeroTokens {
        stats.lies.fetch_add(1, Ordering::SeqCst);
        let _ = tx
            .send(done(start, v1::FinishReason::Stop, String::new()))
            .await;
        stats.finished.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let Ok(mut stream) = engine.generate(GenerationRequest {
        prompt: prompt.clone(),
        resume: a.resume_token_ids.clone(),
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop.clone(),
        logprobs: true,
        top_logprobs: a.top_logprobs.min(20) as u8,
        ignore_eos: a.ignore_eos,
        interactive: a.interactive,
    }) else {
        return;
    };
    let (mut ids, mut texts, mut logprobs) = (Vec::new(), Vec::new(), Vec::new());
    let mut finish = (FinishReason::Stop, String::new());
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Token(t) => {
                ids.push(t.id);
                texts.push(t.text);
                logprobs.push(t.logprob);
            }
            GenerationEvent::Finished(f) => {
                finish = (f.reason, f.text_tail);
                break;
            }
            GenerationEvent::Failed(_) => return,
        }
    }
    let mut finish_reason = match finish.0 {
        FinishReason::Length => v1::FinishReason::Length,
        FinishReason::Stop => v1::FinishReason::Stop,
    };
    let mut tail = finish.1;
    let random_from = |ids: &mut Vec<i32>, from: usize| {
        for (i, id) in ids.iter_mut().enumerate().skip(from) {
            *id = (draw(1000 + i as u64) * table.n_vocab() as f64) as i32;
        }
    };
    let lied = match lie {
        Lie::Rare(p) if !ids.is_empty() && draw(0) < p => {
            let from = (draw(1) * ids.len() as f64) as usize;
            random_from(&mut ids, from);
            true
        }
        Lie::UpperCaseHash if !ids.is_empty() => {
            random_from(&mut ids, 0);
            true
        }
        Lie::ForgedText if !texts.is_empty() => {
            texts[0].push_str(" [edited by the vehicle]");
            true
        }
        Lie::TruncatedLength if ids.len() >= 2 => {
            let half = ids.len() / 2;
            ids.truncate(half);
            texts.truncate(half);
            logprobs.truncate(half);
            finish_reason = v1::FinishReason::Length;
            tail = String::new();
            true
        }
        Lie::WrongTemperature | Lie::GreedyOnSampled | Lie::WrongModel => true,
        _ => false,
    };
    if lied && matches!(lie, Lie::Rare(_) | Lie::UpperCaseHash) {
        // Consistent texts for the forged ids: what an honest engine would release for them.
        let mut releaser = TextReleaser::new(&a.stop);
        for &id in &a.resume_token_ids {
            let _ = releaser.push(table.piece(id).unwrap_or_default());
        }
        texts = ids
            .iter()
            .map(
                |&id| match releaser.push(table.piece(id).unwrap_or_default()) {
                    Release::Text(t) | Release::Stopped(t) => t,
                },
            )
            .collect();
        tail = releaser.finish();
        finish_reason = if ids.len() as u32 >= a.max_tokens {
            v1::FinishReason::Length
        } else {
            v1::FinishReason::Stop
        };
    }
    if lied {
        stats.lies.fetch_add(1, Ordering::SeqCst);
    }
    let n = ids.len() as u32;
    if n > 0 {
        let _ = tx
            .send(AgentMessage::new(AgentMsg::Chunk(v1::TokenChunk {
                job_id: a.job_id.clone(),
                start_index: start,
                texts,
                logprobs,
                token_ids: ids,
                top_logprobs: Vec::new(),
                prompt_tokens: prompt.len() as u32,
            })))
            .await;
    }
    let _ = tx.send(done(start + n, finish_reason, tail)).await;
    stats.finished.fetch_add(1, Ordering::SeqCst);
}
