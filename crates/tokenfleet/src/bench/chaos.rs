//! `tokenfleet bench chaos`: a real fleet (a coordinator and three agents on the real model, in
//! this process) under network faults between each agent and the coordinator, while clients
//! send greedy chat completions (streaming and not, each with an Idempotency-Key, retried on
//! failure) and one batch.
//!
//! The faults come from a TCP proxy per vehicle ([`proxy`]: `tc netem` needs a kernel module
//! that machines like ours lack): 300 ± 100 ms one way, 5 % segment loss as TCP experiences it
//! (a stall of one retransmission timeout, nothing lost or reordered), 30 s partitions that
//! black-hole a vehicle's link without closing it, and address changes (cellular to Wi-Fi):
//! every connection reset, the old address gone for a moment, the vehicle back from a new one.
//! Some streaming clients also drop their connection after a few tokens and retry with the
//! same key (a client-side fault, counted apart).
//!
//! Phase 1 asks the same fleet every distinct prompt once without faults: the reference
//! answers. Phase 2 turns the faults on and runs the workload. Each answer, token by token as
//! its client received it (stream chunks included), is compared with the reference:
//! - `lost`: sent (or accepted in the batch) and never answered, neither with a completion nor
//!   with an error, even after retries (`failed` counts both: the requests without an answer);
//! - `duplicated_tokens` / `missing_tokens`: tokens received that the reference does not have
//!   at that place / reference tokens not received (from a longest common subsequence);
//! - `greedy_mismatches`: answers whose tokens or text differ from the reference;
//! - `usage_mismatches`: answers whose `usage.completion_tokens` is not the number of tokens
//!   the client received.
//!
//! The command exits non-zero when any of those, or a failed request, is non-zero.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokenfleet_agent::{Agent, AgentConfig, VehicleStatus};
use tokenfleet_coordinator::config::ApiKey;
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_engine::{Engine, EngineConfig};
use tokio::time::Instant;

use crate::cli::EngineArgs;
use crate::serve::model_name_of;
use client::{chat_body, Answer, Outcome};
use proxy::{FaultCounters, FaultCounts, FaultProfile, FaultProxy};

pub(super) mod client;
pub mod proxy;

const KEY: &str = "bench-chaos-key-0123456789";
const OPERATOR_KEY: &str = "bench-chaos-operator-0123456789";
const VEHICLES: usize = 3;
/// The whole fault phase gives up after this long (the run takes about 3 minutes here).
const PHASE_DEADLINE: Duration = Duration::from_secs(12 * 60);
/// The hand-over gap of an address change: Wi-Fi association and DHCP take 1-3 s.
const HANDOVER_GAP: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Requests in all (interactive and batch lines); at least 200 for the figure.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Of those, lines of the one batch.
    #[arg(long, default_value_t = 60)]
    pub batch_lines: usize,
    /// Distinct prompts (each has one fault-free reference answer).
    #[arg(long, default_value_t = 40)]
    pub prompts: usize,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 40)]
    pub max_tokens: u32,
    /// Concurrent sequences per vehicle.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Length of each partition, seconds.
    #[arg(long, default_value_t = 30)]
    pub partition_s: u64,
    /// One streaming client in this many drops its connection after a few tokens and retries.
    #[arg(long, default_value_t = 8)]
    pub disconnect_every: usize,
    /// Seed of the fault draws.
    #[arg(long, default_value_t = 13)]
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct FaultsInjected {
    #[serde(flatten)]
    pub wire: FaultCounts,
    pub client_disconnects: u64,
    /// Delayed reads + lost segments + partitions + address changes + client disconnects
    /// (resets and held reads are their consequences, not counted again).
    pub total: u64,
}

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub model: String,
    pub vehicles: usize,
    pub requests: usize,
    pub interactive: usize,
    pub streaming: usize,
    pub batch_lines: usize,
    pub max_tokens: u32,
    pub faults_injected: FaultsInjected,
    pub answered: usize,
    /// Ended with an error after every retry (or never accepted).
    pub failed: usize,
    pub lost: usize,
    pub duplicated_tokens: usize,
    pub missing_tokens: usize,
    pub greedy_mismatches: usize,
    pub usage_mismatches: usize,
    pub retries: u64,
    /// From the coordinator's metrics over the fault phase.
    pub lease_expiries: f64,
    pub resumes: f64,
    pub interactive_latency_p50_s: f64,
    pub interactive_latency_max_s: f64,
    pub reference_wall_s: f64,
    pub chaos_wall_s: f64,
    pub wall_time_s: f64,
    /// The first few differences, for a diagnosis.
    pub examples: Vec<String>,
}

impl ChaosReport {
    pub fn clean(&self) -> bool {
        self.failed == 0
            && self.lost == 0
            && self.duplicated_tokens == 0
            && self.missing_tokens == 0
            && self.greedy_mismatches == 0
            && self.usage_mismatches == 0
    }
}

/// A coordinator and its vehicles, each behind its own fault proxy.
struct ChaosFleet {
    base: String,
    proxies: Vec<FaultProxy>,
    agents: Vec<Agent>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tokenfleet_coordinator::CoordinatorError>>,
    _dir: tempfile::TempDir,
}

impl ChaosFleet {
    async fn start(
        model_path: &Path,
        model: &str,
        slots: u32,
        counters: &Arc<FaultCounters>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // Production heartbeat and lease (1 s, 5 s): what the faults are up against.
        let config = CoordinatorConfig {
            http_addr: "127.0.0.1:0".parse()?,
            grpc_addr: "127.0.0.1:0".parse()?,
            db_path: dir.path().join("chaos.db"),
            api_keys: vec![ApiKey {
                key: KEY.into(),
                tenant: "bench".into(),
            }],
            operator_key: Some(OPERATOR_KEY.into()),
            ..Default::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokenfleet_coordinator::start(config, async move {
            let _ = stopped.await;
        })
        .await?;
        let mut proxies = Vec::new();
        let mut agents = Vec::new();
        let sha = super::model_sha256(model_path).await?;
        for i in 0..VEHICLES {
            let proxy =
                FaultProxy::start(running.bound.grpc, Arc::clone(counters), seed + i as u64)
                    .await?;
            let mut ec = EngineConfig::new(model_path);
            ec.slots = slots;
            ec.ctx_per_slot = 512;
            // Three vehicles share this machine's cores.
            ec.threads = 1;
            let engine = Engine::load_async(ec).await?;
            agents.push(Agent::start(
                AgentConfig::new(
                    format!("http://{}", proxy.addr),
                    format!("vehicle-{}", i + 1),
                    model,
                ),
                engine,
                sha.clone(),
                VehicleStatus::parked(),
            ));
            proxies.push(proxy);
        }
        let fleet = Self {
            base: format!("http://{}", running.bound.http),
            proxies,
            agents,
            stop,
            task: running.task,
            _dir: dir,
        };
        fleet.wait_for_vehicles().await?;
        Ok(fleet)
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::Client::new()
            .get(format!("{}/metrics", self.base))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await?
            .text()
            .await?)
    }

    async fn wait_for_vehicles(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connected: f64 = self
                .metrics()
                .await?
                .lines()
                .filter(|l| l.starts_with("tokenfleet_nodes{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if connected as usize >= VEHICLES {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the vehicles did not connect within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        drop(self.proxies);
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The sum of a metric's samples (all label sets) in a Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Short prompts with short, varied answers.
fn prompt(i: usize) -> String {
    const TOPICS: [&str; 10] = [
        "the sea",
        "a city at night",
        "electric cars",
        "winter",
        "a library",
        "the moon",
        "a train station",
        "bread",
        "a thunderstorm",
        "a garden",
    ];
    const ASKS: [&str; 4] = [
        "Write two sentences about",
        "List three facts about",
        "Describe in one sentence",
        "Give a short title for a story about",
    ];
    format!(
        "{} {}.",
        ASKS[(i / TOPICS.len()) % ASKS.len()],
        TOPICS[i % TOPICS.len()]
    )
}

/// Tokens received that the reference does not have at that place, and reference tokens not
/// received: both lengths minus their longest common subsequence.
fn token_diff(received: &[String], reference: &[String]) -> (usize, usize) {
    let (n, m) = (received.len(), reference.len());
    let mut row = vec![0usize; m + 1];
    for r in received {
        let mut diag = 0;
        for j in 0..m {
            let up = row[j + 1];
            row[j + 1] = if *r == reference[j] {
                diag + 1
            } else {
                up.max(row[j])
            };
            diag = up;
        }
    }
    let common = row[m];
    (n - common, m - common)
}

/// One request of the fault phase and how it ended.
struct Checked {
    label: String,
    prompt: usize,
    outcome: Outcome,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    ensure!(
        args.batch_lines < args.requests && args.prompts > 0,
        "--batch-lines must leave interactive requests, --prompts must be positive"
    );
    let started = Instant::now();
    let model_path = args.engine.model.clone();
    let model = model_name_of(&model_path);
    let counters = Arc::new(FaultCounters::default());
    let mut fleet =
        ChaosFleet::start(&model_path, &model, args.slots, &counters, args.seed).await?;
    let result = measure(&args, &model, &model_path, &mut fleet, &counters, started).await;
    fleet.stop().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    ensure!(
        report.clean(),
        "faults cost answers: {} failed, {} lost, {} duplicated and {} missing tokens, {} greedy and {} usage mismatches",
        report.failed,
        report.lost,
        report.duplicated_tokens,
        report.missing_tokens,
        report.greedy_mismatches,
        report.usage_mismatches
    );
    Ok(())
}

async fn measure(
    args: &ChaosArgs,
    model: &str,
    model_path: &Path,
    fleet: &mut ChaosFleet,
    counters: &Arc<FaultCounters>,
    started: Instant,
) -> anyhow::Result<ChaosReport> {
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()?;
    let base = fleet.base.clone();

    // Phase 1: reference answers, no faults.
    let t = Instant::now();
    let reference = reference_answers(&client, &base, model, args).await?;
    let reference_wall_s = t.elapsed().as_secs_f64();
    tracing::info!(
        prompts = reference.len(),
        secs = reference_wall_s,
        "chaos: reference answers"
    );

    // Phase 2: the same fleet through faults.
    let before = fleet.metrics().await?;
    let t = Instant::now();
    let phase_deadline = t + PHASE_DEADLINE;
    for p in &fleet.proxies {
        p.set_faults(Some(FaultProfile::lossy_cellular()));
    }
    let schedule = fault_schedule(Duration::from_secs(args.partition_s));
    let schedule_len = schedule.last().map(|e| e.at).unwrap_or_default();
    let run_id = hex::encode(rand::random::<[u8; 4]>());
    let batch: Vec<(String, Value)> = (0..args.batch_lines)
        .map(|i| {
            (
                format!("chaos-batch-{i}"),
                chat_body(model, &prompt(i % args.prompts), args.max_tokens, false),
            )
        })
        .collect();
    let batch_id = client::submit_batch(&client, &base, KEY, &batch).await?;

    // Interactive requests arrive evenly over the fault schedule (and 10 s past it).
    let interactive = args.requests - args.batch_lines;
    let spacing = (schedule_len + Duration::from_secs(10)) / interactive as u32;
    let disconnects = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let faults = tokio::spawn(run_schedule(
        std::mem::take(&mut fleet.proxies),
        schedule,
        t,
    ));
    for i in 0..interactive {
        tokio::time::sleep_until(t + spacing * i as u32).await;
        let stream = i % 2 == 0;
        let prompt_ix = (i * 7 + 3) % args.prompts;
        let body = chat_body(model, &prompt(prompt_ix), args.max_tokens, stream);
        let disconnect =
            stream && args.disconnect_every > 0 && (i / 2) % args.disconnect_every == 1;
        let (client, base, key) = (client.clone(), base.clone(), format!("chaos-{run_id}-{i}"));
        tasks.spawn(async move {
            let outcome = client::interactive(&client, &base, KEY, &key, &body, disconnect).await;
            Checked {
                label: format!("{} {key}", if stream { "stream" } else { "plain" }),
                prompt: prompt_ix,
                outcome,
            }
        });
    }
    let mut checked = Vec::new();
    while let Some(done) = tokio::time::timeout_at(phase_deadline, tasks.join_next())
        .await
        .ok()
        .flatten()
    {
        checked.push(done.context("a client task panicked")?);
    }
    let unfinished = tasks.len();
    tasks.abort_all();
    let batch_result =
        client::collect_batch(&client, &base, KEY, &batch_id, phase_deadline).await?;
    fleet.proxies = faults.await.context("the fault schedule")??;
    let chaos_wall_s = t.elapsed().as_secs_f64();
    let after = fleet.metrics().await?;

    // Compare.
    let mut r = Tally::default();
    r.failed += unfinished;
    r.lost += unfinished;
    for c in &checked {
        disconnects.fetch_add(c.outcome.disconnects as u64, Ordering::Relaxed);
        r.retries += c.outcome.retries as u64;
        r.latencies.push(c.outcome.latency.as_secs_f64());
        match &c.outcome.answer {
            Some(a) => r.compare(&c.label, a, &reference[c.prompt]),
            None => {
                r.failed += 1;
                if c.outcome.unanswered {
                    r.lost += 1;
                }
                r.example(format!(
                    "{}: no answer ({})",
                    c.label,
                    c.outcome.error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    for (i, (id, _)) in batch.iter().enumerate() {
        match (batch_result.answers.get(id), batch_result.errors.get(id)) {
            (Some(a), _) => r.compare(id, a, &reference[i % args.prompts]),
            (None, Some(e)) => {
                r.failed += 1;
                r.example(format!("{id}: {e}"));
            }
            (None, None) => {
                // The batch accepted the line and never answered it.
                r.failed += 1;
                r.lost += 1;
                r.example(format!("{id}: no output (batch {})", batch_result.status));
            }
        }
    }
    let wire = counters.snapshot();
    let client_disconnects = disconnects.load(Ordering::Relaxed);
    let total = wire.delayed_reads
        + wire.lost_segments
        + wire.partitions
        + wire.address_changes
        + client_disconnects;
    let mut latencies = r.latencies.clone();
    latencies.sort_by(f64::total_cmp);
    Ok(ChaosReport {
        model: model_path.display().to_string(),
        vehicles: VEHICLES,
        requests: args.requests,
        interactive,
        streaming: interactive.div_ceil(2),
        batch_lines: args.batch_lines,
        max_tokens: args.max_tokens,
        faults_injected: FaultsInjected {
            wire,
            client_disconnects,
            total,
        },
        answered: r.answered,
        failed: r.failed,
        lost: r.lost,
        duplicated_tokens: r.duplicated,
        missing_tokens: r.missing,
        greedy_mismatches: r.mismatches,
        usage_mismatches: r.usage_mismatches,
        retries: r.retries,
        lease_expiries: metric_sum(&after, "tokenfleet_lease_expiries_total")
            - metric_sum(&before, "tokenfleet_lease_expiries_total"),
        resumes: metric_sum(&after, "tokenfleet_resumes_total")
            - metric_sum(&before, "tokenfleet_resumes_total"),
        interactive_latency_p50_s: super::median(&latencies),
        interactive_latency_max_s: latencies.last().copied().unwrap_or(0.0),
        reference_wall_s,
        chaos_wall_s,
        wall_time_s: started.elapsed().as_secs_f64(),
        examples: r.examples,
    })
}

#[derive(Default)]
struct Tally {
    answered: usize,
    failed: usize,
    lost: usize,
    duplicated: usize,
    missing: usize,
    mismatches: usize,
    usage_mismatches: usize,
    retries: u64,
    latencies: Vec<f64>,
    examples: Vec<String>,
}

impl Tally {
    fn example(&mut self, e: String) {
        if self.examples.len() < 8 {
            self.examples.push(e);
        }
    }

    fn compare(&mut self, label: &str, got: &Answer, reference: &Answer) {
        self.answered += 1;
        let (dup, miss) = token_diff(&got.tokens, &reference.tokens);
        self.duplicated += dup;
        self.missing += miss;
        if got.completion_tokens != Some(got.tokens.len() as u64) {
            self.usage_mismatches += 1;
            self.example(format!(
                "{label}: usage says {:?} tokens, received {}",
                got.completion_tokens,
                got.tokens.len()
            ));
        }
        if got.tokens != reference.tokens || got.text != reference.text {
            self.mismatches += 1;
            self.example(format!(
                "{label}: {dup} extra, {miss} missing tokens; got {:?}, reference {:?}",
                got.text, reference.text
            ));
        }
    }
}

/// Asks every distinct prompt once, without faults, a few at a time.
async fn reference_answers(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    args: &ChaosArgs,
) -> anyhow::Result<Vec<Answer>> {
    let answers = futures::stream::iter(0..args.prompts)
        .map(|i| {
            let body = chat_body(model, &prompt(i), args.max_tokens, false);
            let key = format!("chaos-reference-{}-{i}", std::process::id());
            async move {
                let out = client::interactive(client, base, KEY, &key, &body, false).await;
                out.answer.with_context(|| {
                    format!("reference answer {i}: {}", out.error.unwrap_or_default())
                })
            }
        })
        .buffered(3 * VEHICLES)
        .collect::<Vec<_>>()
        .await;
    answers.into_iter().collect()
}

/// A fault at an offset from the start of the fault phase.
struct Event {
    at: Duration,
    vehicle: usize,
    fault: Fault,
}

enum Fault {
    Partition(Duration),
    AddressChange,
}

/// One partition per vehicle, one at a time, and two address changes (one of them while
/// another vehicle is partitioned, leaving one vehicle with a clean link).
fn fault_schedule(partition: Duration) -> Vec<Event> {
    let s = Duration::from_secs;
    let p1 = s(8);
    let a3 = p1 + partition + s(5);
    let p2 = a3 + s(10);
    let p3 = p2 + partition + s(10);
    let a1 = p3 + s(5);
    vec![
        Event {
            at: p1,
            vehicle: 0,
            fault: Fault::Partition(partition),
        },
        Event {
            at: a3,
            vehicle: 2,
            fault: Fault::AddressChange,
        },
        Event {
            at: p2,
            vehicle: 1,
            fault: Fault::Partition(partition),
        },
        Event {
            at: p3,
            vehicle: 2,
            fault: Fault::Partition(partition),
        },
        Event {
            at: a1,
            vehicle: 0,
            fault: Fault::AddressChange,
        },
    ]
}

async fn run_schedule(
    mut proxies: Vec<FaultProxy>,
    schedule: Vec<Event>,
    start: Instant,
) -> anyhow::Result<Vec<FaultProxy>> {
    for e in schedule {
        tokio::time::sleep_until(start + e.at).await;
        let vehicle = e.vehicle + 1;
        match e.fault {
            Fault::Partition(d) => {
                tracing::info!(vehicle, secs = d.as_secs(), "chaos: partition");
                proxies[e.vehicle].partition(d);
            }
            Fault::AddressChange => {
                tracing::info!(vehicle, "chaos: address change");
                proxies[e.vehicle]
                    .change_address(HANDOVER_GAP)
                    .await
                    .with_context(|| format!("re-binding vehicle-{vehicle}'s proxy"))?;
            }
        }
    }
    Ok(proxies)
}

fn print_table(r: &ChaosReport) {
    println!(
        "model {}  {} vehicles behind fault proxies (300 ± 100 ms, 5 % loss, {}x partition, {}x address change)",
        r.model, r.vehicles, r.faults_injected.wire.partitions, r.faults_injected.wire.address_changes
    );
    println!(
        "{} requests: {} interactive ({} streaming), {} batch lines, max {} tokens",
        r.requests, r.interactive, r.streaming, r.batch_lines, r.max_tokens
    );
    let row = |name: &str, v: String| println!("{name:<36} {v:>10}");
    row("faults injected", r.faults_injected.total.to_string());
    row("answered", r.answered.to_string());
    row("failed", r.failed.to_string());
    row("lost", r.lost.to_string());
    row("duplicated tokens", r.duplicated_tokens.to_string());
    row("missing tokens", r.missing_tokens.to_string());
    row("greedy mismatches", r.greedy_mismatches.to_string());
    row("usage mismatches", r.usage_mismatches.to_string());
    row("client retries", r.retries.to_string());
    row("lease expiries", r.lease_expiries.to_string());
    row("resumes (hand-offs)", r.resumes.to_string());
    row(
        "interactive latency p50 / max s",
        format!(
            "{:.1} / {:.1}",
            r.interactive_latency_p50_s, r.interactive_latency_max_s
        ),
    );
    row("wall time s", format!("{:.0}", r.wall_time_s));
    for e in &r.examples {
        println!("  {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn token_diff_counts_repeats_as_duplicated_and_gaps_as_missing() {
        let reference = toks("a b c d e");
        assert_eq!(token_diff(&toks("a b c d e"), &reference), (0, 0));
        // A resend delivered twice.
        assert_eq!(token_diff(&toks("a b c b c d e"), &reference), (2, 0));
        // A chunk lost in a hand-off.
        assert_eq!(token_diff(&toks("a b e"), &reference), (0, 2));
        // A different greedy choice counts on both sides.
        assert_eq!(token_diff(&toks("a b x d e"), &reference), (1, 1));
        assert_eq!(token_diff(&[], &reference), (0, 5));
    }

    #[test]
    fn the_schedule_partitions_every_vehicle_and_changes_two_addresses() {
        let s = fault_schedule(Duration::from_secs(30));
        let partitioned: Vec<usize> = s
            .iter()
            .filter(|e| matches!(e.fault, Fault::Partition(_)))
            .map(|e| e.vehicle)
            .collect();
        assert_eq!(partitioned, vec![0, 1, 2]);
        assert!(s.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(
            s.iter()
                .filter(|e| matches!(e.fault, Fault::AddressChange))
                .count(),
            2
        );
    }
}
