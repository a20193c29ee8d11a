//! Node message handling: an enrolled node's decoded `tokenfleet.v1` messages fed to the
//! coordinator's job manager. Each input starts a real manager through
//! `tokenfleet_coordinator::fuzzing::harness` (in-memory SQLite job store, the configured
//! scheduler), registers two nodes with a Hello and an eligible State, queues two jobs (which
//! the scheduler assigns), then plays the input's messages: structured ones
//! aimed at the jobs and nodes (chunks, done, evicted, failed, state, reconnects with held
//! jobs) and raw protobuf bytes decoded as `AgentMessage`. The manager must not panic, and
//! no Assign asks for more than a job's `max_tokens`, and afterwards no job has more tokens than
//! its `max_tokens` and every job either ended or is still held by the manager (none lost).
#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tokenfleet_coordinator::fuzzing::harness::{chunk, eligible, Harness};
use tokenfleet_protocol::v1;
use tokenfleet_protocol::AgentMsg;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
});

/// `max_tokens` of the jobs the harness queues.
const MAX_TOKENS: [u32; 2] = [4, 7];
const NODES: usize = 2;
/// Set to keep fuzzing past the known hole 5 of issue 13 (a node's chunk is not capped at the
/// job's max_tokens) until its fix lands: the token-count invariant is then not checked.
const SKIP_TOKEN_CAP: &str = "FUZZ_SKIP_TOKEN_CAP";

#[derive(Arbitrary, Debug)]
enum Op {
    Chunk {
        node: u8,
        job: u8,
        start: u8,
        n: u8,
        prompt_tokens: u16,
        /// Fewer texts than ids (a malformed chunk).
        short_texts: bool,
        top_logprobs: u8,
    },
    Done {
        node: u8,
        job: u8,
        next_index: u8,
        length: bool,
    },
    Evicted {
        node: u8,
        job: u8,
        next_index: u8,
    },
    Failed {
        node: u8,
        job: u8,
        retryable: bool,
    },
    State {
        node: u8,
        governor: u8,
        eligible: bool,
        slots_free: u8,
        position: Option<(f64, f64)>,
    },
    /// The session drops and the node comes back holding these jobs (job, next index).
    Reconnect {
        node: u8,
        held: Vec<(u8, u8)>,
    },
    /// A message on the node's previous session after it reconnected.
    Stale {
        node: u8,
        job: u8,
    },
    Raw {
        node: u8,
        bytes: Vec<u8>,
    },
}

/// Plays [`Op`]s on a [`Harness`].
struct Player(Harness);

impl Player {
    /// A job of the harness, or an id no job has.
    fn job_id(&self, job: u8) -> String {
        let jobs = self.0.jobs.len();
        match job as usize % (jobs + 2) {
            j if j < jobs => self.0.job_id(j),
            j if j == jobs => "999".into(),
            _ => "not a number".into(),
        }
    }

    fn node(&self, node: u8) -> usize {
        node as usize % self.0.nodes.len()
    }

    async fn send(&self, node: u8, msg: AgentMsg) {
        self.0.send(self.node(node), msg).await
    }

    async fn play(&mut self, op: Op) {
        match op {
            Op::Chunk {
                node,
                job,
                start,
                n,
                prompt_tokens,
                short_texts,
                top_logprobs,
            } => {
                let mut c = chunk(&self.job_id(job), u32::from(start % 16), n as usize % 12);
                if short_texts {
                    c.texts.pop();
                }
                c.prompt_tokens = u32::from(prompt_tokens);
                c.top_logprobs = (0..top_logprobs % 4)
                    .map(|_| v1::TokenLogprobs {
                        top: vec![v1::TopLogprob {
                            token_id: 1,
                            text: "u".into(),
                            logprob: -1.0,
                        }],
                    })
                    .collect();
                self.send(node, AgentMsg::Chunk(c)).await
            }
            Op::Done {
                node,
                job,
                next_index,
                length,
            } => {
                let reason = if length {
                    v1::FinishReason::Length
                } else {
                    v1::FinishReason::Stop
                };
                let done = v1::JobDone {
                    job_id: self.job_id(job),
                    finish_reason: reason as i32,
                    next_index: u32::from(next_index % 16),
                    prompt_tokens: 5,
                    ..Default::default()
                };
                self.send(node, AgentMsg::Done(done)).await
            }
            Op::Evicted {
                node,
                job,
                next_index,
            } => {
                let ev = v1::JobEvicted {
                    job_id: self.job_id(job),
                    reason: "driver is back".into(),
                    next_index: u32::from(next_index % 16),
                };
                self.send(node, AgentMsg::Evicted(ev)).await
            }
            Op::Failed {
                node,
                job,
                retryable,
            } => {
                let f = v1::JobFailed {
                    job_id: self.job_id(job),
                    message: "engine error".into(),
                    retryable,
                };
                self.send(node, AgentMsg::Failed(f)).await
            }
            Op::State {
                node,
                governor,
                eligible: ok,
                slots_free,
                position,
            } => {
                let mut s = eligible();
                s.governor = i32::from(governor % 7);
                s.eligible = ok;
                s.slots_free = u32::from(slots_free % 10);
                if let Some((lat, lon)) = position {
                    s.latitude = Some(lat);
                    s.longitude = Some(lon);
                }
                self.send(node, AgentMsg::State(s)).await
            }
            Op::Reconnect { node, held } => {
                let i = self.node(node);
                self.0.down(i).await;
                let held = held
                    .iter()
                    .take(4)
                    .map(|&(job, next)| v1::HeldJob {
                        job_id: self.job_id(job),
                        next_index: u32::from(next % 16),
                    })
                    .collect();
                if self.0.up(i, held).await {
                    self.0.send(i, AgentMsg::State(eligible())).await;
                }
            }
            Op::Stale { node, job } => {
                let c = chunk(&self.job_id(job), 0, 1);
                self.0.send_stale(self.node(node), AgentMsg::Chunk(c)).await
            }
            Op::Raw { node, bytes } => {
                if let Ok(v1::AgentMessage { msg: Some(msg) }) =
                    v1::AgentMessage::decode(bytes.as_slice())
                {
                    self.send(node, msg).await
                }
            }
        }
        self.0.settle().await;
    }
}

async fn run(ops: Vec<Op>) {
    let mut player = Player(Harness::start(NODES, &MAX_TOKENS).await);
    for op in ops.into_iter().take(64) {
        player.play(op).await;
    }
    let h = player.0;
    if std::env::var_os(SKIP_TOKEN_CAP).is_some() {
        for handle in &h.jobs {
            if handle.view.borrow().outcome.is_none() {
                assert!(
                    h.manager.attach(handle.id).await.is_some(),
                    "a job was lost"
                );
            }
        }
    } else {
        h.check().await;
    }
    h.stop().await;
}

fuzz_target!(|ops: Vec<Op>| {
    RT.block_on(run(ops));
});
