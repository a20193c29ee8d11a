//! A dishonest agent for the verification tests: it speaks the real `tokenfleet.v1` protocol,
//! claims to serve the real model (its true sha256), and answers every job with uniformly
//! random token ids instead of running a model. It lives only here, on the test side.
//!
//! Given the model's token table it sends the honest texts of its random ids (only a spot
//! check can tell); without one it sends made-up texts (the coordinator's own detokenization
//! tells at once).
//!
//! Its first `hold_first` jobs get half their tokens and are then held (never finished);
//! later ones are answered at once. So a test can have jobs still pending, with the liar's
//! tokens, when the fleet catches it on a finished one.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_protocol::v1::node_session_client::NodeSessionClient;
use tokenfleet_protocol::v1::{self, AgentMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What the liar saw, for the test's assertions.
#[derive(Default)]
pub struct LiarLog {
    pub assigned: AtomicU32,
    pub finished: AtomicU32,
    pub drained: AtomicBool,
    /// A reconnect after the session was closed was refused with PERMISSION_DENIED.
    pub refused: AtomicBool,
}

pub struct RandomTokenLiar {
    pub log: Arc<LiarLog>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RandomTokenLiar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hello(name: &str, model: &str, sha256: &str) -> v1::Hello {
    v1::Hello {
        node_id: name.into(),
        software_version: "liar".into(),
        protocol_version: tokenfleet_protocol::PROTOCOL_VERSION,
        hardware: Some(v1::HardwareProfile {
            compute_class: "cpu".into(),
            cpu_threads: 2,
            memory_bytes: 0,
            decode_tps_single: 100.0,
            decode_tps_batched: 200.0,
        }),
        engine_slots: 8,
        models: vec![v1::ModelInfo {
            name: model.into(),
            sha256: sha256.into(),
            ctx_per_slot: 2048,
            size_bytes: 0,
        }],
        held_jobs: Vec::new(),
    }
}

impl RandomTokenLiar {
    pub async fn start(
        grpc: &str,
        name: &str,
        model: &str,
        sha256: &str,
        n_vocab: i32,
        hold_first: u32,
        table: Option<Arc<tokenfleet_engine::TokenTable>>,
    ) -> RandomTokenLiar {
        let log = Arc::new(LiarLog::default());
        let url = format!("http://{grpc}");
        let hello = hello(name, model, sha256);
        let task_log = Arc::clone(&log);
        let task = tokio::spawn(async move {
            serve(&url, hello.clone(), n_vocab, hold_first, table, &task_log).await;
            // The fleet closed the session: a real liar comes straight back, again and again
            // (bounded here: 40 attempts, 250 ms apart).
            for _ in 0..40 {
                let mut client = NodeSessionClient::new(dial(&url).await);
                let (tx, rx) = mpsc::channel(4);
                tx.send(AgentMessage::new(AgentMsg::Hello(hello.clone())))
                    .await
                    .unwrap();
                let refused = match client.open(ReceiverStream::new(rx)).await {
                    Err(status) => status.code() == tonic::Code::PermissionDenied,
                    Ok(resp) => matches!(resp.into_inner().message().await,
                        Err(s) if s.code() == tonic::Code::PermissionDenied),
                };
                if refused {
                    task_log.refused.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        RandomTokenLiar { log, task }
    }
}

async fn dial(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("coordinator url")
        .connect()
        .await
        .expect("dial the coordinator")
}

async fn serve(
    url: &str,
    hello: v1::Hello,
    n_vocab: i32,
    hold_first: u32,
    table: Option<Arc<tokenfleet_engine::TokenTable>>,
    log: &LiarLog,
) {
    let mut client = NodeSessionClient::new(dial(url).await);
    let (tx, rx) = mpsc::channel(256);
    tx.send(AgentMessage::new(AgentMsg::Hello(hello)))
        .await
        .unwrap();
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    let send = |msg| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(AgentMessage::new(msg)).await;
        }
    };
    send(AgentMsg::State(
        tokenfleet_agent::VehicleStatus::parked().state,
    ))
    .await;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(200));
    let mut draw = 0u64;
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(v1::CoordinatorMessage { msg: Some(m) })) => m,
                    Ok(Some(_)) => continue,
                    _ => return,
                };
                match msg {
                    CoordinatorMsg::Assign(a) => {
                        let n = log.assigned.fetch_add(1, Ordering::SeqCst) + 1;
                        let start = a.resume_token_ids.len() as u32;
                        let finish = n > hold_first;
                        let count = if finish { a.max_tokens } else { a.max_tokens.div_ceil(2) };
                        let ids: Vec<i32> = (0..count)
                            .map(|_| {
                                draw += 1;
                                (tokenfleet_engine::sampling::uniform(0x11A2, draw) * n_vocab as f64) as i32
                            })
                            .collect();
                        let texts: Vec<String> = match &table {
                            Some(table) => {
                                let mut r = tokenfleet_engine::token_text::TextReleaser::new(&a.stop);
                                ids.iter()
                                    .map(|&id| match r.push(table.piece(id).unwrap_or_default()) {
                                        tokenfleet_engine::token_text::Release::Text(t)
                                        | tokenfleet_engine::token_text::Release::Stopped(t) => t,
                                    })
                                    .collect()
                            }
                            None => ids.iter().map(|id| format!("<{id}>")).collect(),
                        };
                        send(AgentMsg::Chunk(v1::TokenChunk {
                            job_id: a.job_id.clone(),
                            start_index: start,
                            texts,
                            logprobs: vec![-0.01; ids.len()],
                            token_ids: ids,
                            top_logprobs: Vec::new(),
                            prompt_tokens: 20,
                        }))
                        .await;
                        if finish {
                            send(AgentMsg::Done(v1::JobDone {
                                job_id: a.job_id,
                                finish_reason: v1::FinishReason::Length as i32,
                                next_index: start + count,
                                prompt_tokens: 20,
                                ..Default::default()
                            }))
                            .await;
                            log.finished.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    CoordinatorMsg::Drain(_) => log.drained.store(true, Ordering::SeqCst),
                    _ => {}
                }
            }
            _ = heartbeat.tick() => {
                send(AgentMsg::Heartbeat(v1::Heartbeat { sent_unix_ms: 0 })).await;
            }
        }
    }
}
