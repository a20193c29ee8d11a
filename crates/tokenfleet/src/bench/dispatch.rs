//! `tokenfleet bench dispatch`: the coordinator's dispatch path at fleet scale.
//!
//! This process runs a real coordinator (`tokenfleet_coordinator::start`, 127.0.0.1, a temporary
//! SQLite store, gRPC over TLS with a self-signed certificate made here). A child process (this
//! binary again, `bench dispatch` with the hidden `--child-*` flags) runs the client side:
//!
//! - N simulated agents, each its own `NodeSession.Open` stream (its own node session) over real
//!   gRPC/TLS on loopback, by default one TLS connection per agent as real vehicles have. They
//!   send Hello (one model, `null-model`), State (eligible, parked, plugged in), heartbeats at
//!   the Welcome interval, and run a **null engine**: no model, each Assign is answered after
//!   `tokens / null_tps` seconds with one chunk of `tokens` tokens and JobDone.
//! - the API clients: non-streaming `POST /v1/completions` through the real HTTP API at a fixed
//!   offered rate (open loop) for a bounded window.
//!
//! Keeping the client side in another process keeps its memory out of the coordinator's RSS,
//! which is read from `/proc/self/status` here. The figures:
//! - `jobs_per_s`: jobs completed (HTTP 200) within the window / window length;
//! - `p99_dispatch_ms`: exact, per job, from the client sending the request to the agent
//!   receiving its Assign (both timestamps taken in the child, one monotonic clock), so it
//!   includes HTTP, validation, the durable insert and the gRPC/TLS hop; the coordinator's
//!   `tokenfleet_dispatch_latency_seconds` histogram (queue entry → Assign sent) is printed
//!   next to it as an upper bucket bound;
//! - `rss_per_agent_kib`: (coordinator RSS with the agents connected and a warm-up done − RSS
//!   before any agent) / N.
//!
//! Parent and child talk over the child's stdin (commands, one per line) and stdout (one JSON
//! object per line). Every wait is bounded.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::procfs::{cpu_seconds, raise_nofile_limit, sched_seconds, status_kib};
use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokenfleet_coordinator::config::ApiKey;
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_protocol::v1::node_session_client::NodeSessionClient;
use tokenfleet_protocol::v1::{self, AgentMessage, CoordinatorMessage};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The model the simulated agents announce.
const NULL_MODEL: &str = "null-model";
const BENCH_KEY: &str = "bench-dispatch-key-0123456789";
/// Reads the coordinator's `/metrics`.
const OPERATOR_KEY: &str = "bench-dispatch-operator-0123456789";
/// Prompts carry the client's sequence number after this prefix, so an agent can match an
/// Assign to the moment its request was sent.
const PROMPT_PREFIX: &str = "dispatch-bench seq=";
/// TLS handshakes in flight while the agents connect.
const CONNECT_CONCURRENCY: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(180);
/// Coordinator CPU is sampled over this long with the fleet connected and no jobs.
const IDLE_WINDOW: Duration = Duration::from_secs(3);
/// Jobs per second and seconds of the priming run.
const PRIME_RATE: f64 = 100.0;
const PRIME_SECONDS: f64 = 1.0;
/// In-flight requests still allowed to finish after the window closes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Args)]
pub struct DispatchArgs {
    /// Simulated agents (each its own node session).
    #[arg(long, env = "TOKENFLEET_BENCH_AGENTS", default_value_t = 10_000)]
    pub agents: usize,
    /// Agents sharing one HTTP/2 + TLS connection (1 = a connection per agent, like vehicles).
    #[arg(long, env = "TOKENFLEET_BENCH_AGENTS_PER_CONN", default_value_t = 1)]
    pub agents_per_conn: usize,
    /// Engine slots each agent announces.
    #[arg(long, env = "TOKENFLEET_BENCH_SLOTS", default_value_t = 4)]
    pub slots: u32,
    /// Offered load: requests per second sent to the HTTP API (open loop).
    #[arg(long, env = "TOKENFLEET_BENCH_RATE", default_value_t = 2500.0)]
    pub rate: f64,
    /// Length of the measured window, seconds.
    #[arg(long, env = "TOKENFLEET_BENCH_SECONDS", default_value_t = 20)]
    pub seconds: u64,
    /// Warm-up before the window (same rate), seconds.
    #[arg(long, env = "TOKENFLEET_BENCH_WARMUP", default_value_t = 3)]
    pub warmup_seconds: u64,
    /// Tokens per job (max_tokens); the null engine emits them as one chunk.
    #[arg(long, env = "TOKENFLEET_BENCH_TOKENS", default_value_t = 8)]
    pub tokens: u32,
    /// Null engine speed, tokens/s per job: a job takes tokens / null_tps seconds.
    #[arg(long, env = "TOKENFLEET_BENCH_NULL_TPS", default_value_t = 1000.0)]
    pub null_tps: f64,
    /// Requests in flight at most on the client side (beyond it a send is counted as dropped).
    #[arg(long, env = "TOKENFLEET_BENCH_MAX_INFLIGHT", default_value_t = 2048)]
    pub max_inflight: usize,
    /// Directory for the job store and the certificate (default: the system temp dir). The
    /// store syncs every commit (synchronous=FULL), so put it on a real disk.
    #[arg(long, env = "TOKENFLEET_BENCH_DIR")]
    pub dir: Option<PathBuf>,
    /// PostgreSQL server for the job store instead of SQLite (`postgresql://user@host:port/db`,
    /// a role that may create databases): the bench makes a database of its own there and
    /// drops it at the end.
    #[arg(long, env = "TOKENFLEET_BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// (internal) Run as the client side: the coordinator's gRPC address.
    #[arg(long, hide = true)]
    pub child_grpc: Option<String>,
    /// (internal) The coordinator's HTTP address.
    #[arg(long, hide = true)]
    pub child_http: Option<String>,
    /// (internal) The CA (self-signed certificate) PEM file.
    #[arg(long, hide = true)]
    pub child_ca: Option<PathBuf>,
}

/// The figures, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct DispatchReport {
    pub agents: usize,
    pub agents_per_conn: usize,
    pub tls_connections: usize,
    pub engine: &'static str,
    pub submit_path: &'static str,
    pub offered_rate: f64,
    pub window_s: f64,
    pub jobs_per_s: f64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub jobs_dropped_client: u64,
    pub jobs_unassigned: u64,
    /// Client sends request → agent receives Assign, exact, per job.
    pub p50_dispatch_ms: f64,
    pub p99_dispatch_ms: f64,
    pub max_dispatch_ms: f64,
    /// Coordinator histogram (queue entry → Assign sent): upper bound of the p99 bucket.
    pub p99_queue_to_assign_ms_bucket: f64,
    /// Client sends request → full response received.
    pub p50_request_ms: f64,
    pub p99_request_ms: f64,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    /// After a few jobs put every node in the scheduler's index.
    pub rss_primed_kib: u64,
    /// After the warm-up at full rate (includes the load's HTTP connections and job state).
    pub rss_warm_kib: u64,
    pub rss_end_kib: u64,
    /// (RSS with the agents connected and indexed − RSS before any agent) / agents.
    pub rss_per_agent_kib: f64,
    /// Same, right after the agents connected (before any job).
    pub rss_per_agent_connect_kib: f64,
    /// Coordinator CPU with the fleet connected and no jobs (sessions, heartbeats), % of a core.
    pub idle_cpu_pct: f64,
    pub connect_s: f64,
    /// CPU time (user + system) of the coordinator process over the load run (window and
    /// drain), and per completed job; heartbeats and sessions included.
    pub coordinator_cpu_s: f64,
    pub coordinator_cpu_us_per_job: f64,
    /// CPU time of the client side (agents and API clients) over the same run.
    pub client_cpu_s: f64,
    /// Time the threads of both processes were runnable but waiting for a CPU over the same
    /// run (from /proc/*/task/*/schedstat): how much other work on the machine held the bench
    /// back. Near 0 on an idle machine.
    pub runq_wait_s: f64,
    pub heartbeat_ms: u64,
    pub tokens_per_job: u32,
    pub null_tps: f64,
    pub store: String,
}

// ------------------------------------------------------------------------ parent/child lines

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum ChildEvent {
    Connected { agents: usize, seconds: f64 },
    Loaded(LoadResult),
    Failed { message: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LoadResult {
    window_s: f64,
    submitted: u64,
    completed: u64,
    completed_in_window: u64,
    failed: u64,
    dropped: u64,
    unassigned: u64,
    dispatch_ms: Percentiles,
    request_ms: Percentiles,
    first_error: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Percentiles {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| super::percentile(&v, p);
        Self {
            n: v.len(),
            p50: at(50.0),
            p99: at(99.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

pub async fn run(args: DispatchArgs) -> anyhow::Result<()> {
    if args.child_grpc.is_some() {
        return child::run(args).await;
    }
    if args.agents == 0 || args.agents_per_conn == 0 || args.slots == 0 || args.tokens == 0 {
        bail!("--agents, --agents-per-conn, --slots and --tokens must be at least 1");
    }
    if !(args.rate > 0.0 && args.null_tps > 0.0) || args.seconds == 0 {
        bail!("--rate, --null-tps and --seconds must be positive");
    }
    raise_nofile_limit(args.agents as u64 + 4096);
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("tokenfleet-bench-dispatch-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))?;
    let tls = crate::tls::write_self_signed(dir.path())?;
    let db = dir.path().join("jobs.db");
    let scratch = match &args.database_url {
        Some(url) => {
            Some(super::scratch_db::ScratchDatabase::create(url, "tokenfleet_bench").await?)
        }
        None => None,
    };
    let store = match &scratch {
        Some(_) => "PostgreSQL (group commit, synchronous_commit as the server sets it; the \
                    server's CPU is not in coordinator_cpu_s)"
            .to_string(),
        None => format!("SQLite WAL, synchronous=FULL, in {}", base.display()),
    };
    let config = CoordinatorConfig {
        database_url: scratch.as_ref().map(|s| s.url.clone()),
        // A PostgreSQL store needs its keys named; a fresh file here (created when absent).
        store_key_file: Some(dir.path().join("store.keys")),
        http_addr: "127.0.0.1:0".parse()?,
        grpc_addr: "127.0.0.1:0".parse()?,
        grpc_tls: Some(tls.clone()),
        db_path: db.clone(),
        api_keys: vec![ApiKey {
            key: BENCH_KEY.into(),
            tenant: "bench".into(),
        }],
        operator_key: Some(OPERATOR_KEY.into()),
        // The load client may hold up to `max_inflight` connections, plus the bench's own
        // `/metrics` reads: an operator sizes the cap to the clients they expect (the
        // default, 512, refused the default 2,048 at accept and broke the bench).
        http_max_connections: args.max_inflight + 16,
        ..Default::default()
    };
    let heartbeat_ms = config.heartbeat_interval.as_millis() as u64;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokenfleet_coordinator::start(config, async move {
        let _ = stop_rx.await;
    })
    .await
    .context("starting the coordinator")?;
    let http = format!("http://{}", running.bound.http);
    let grpc = format!("https://{}", running.bound.grpc);
    let metrics_client = reqwest::Client::new();
    // Let the coordinator settle before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib()?;

    let exe = std::env::current_exe().context("locating this binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["bench", "dispatch"])
        .args(["--agents", &args.agents.to_string()])
        .args(["--agents-per-conn", &args.agents_per_conn.to_string()])
        .args(["--slots", &args.slots.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--warmup-seconds", &args.warmup_seconds.to_string()])
        .args(["--tokens", &args.tokens.to_string()])
        .args(["--null-tps", &args.null_tps.to_string()])
        .args(["--max-inflight", &args.max_inflight.to_string()])
        .args(["--child-grpc", &grpc])
        .args(["--child-http", &http])
        .arg("--child-ca")
        .arg(&tls.cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "error");
    }
    let mut child = cmd.spawn().context("starting the agents' process")?;
    let mut to_child = child.stdin.take().context("child stdin")?;
    let mut from_child = BufReader::new(child.stdout.take().context("child stdout")?).lines();

    if !args.json {
        eprintln!(
            "connecting {} simulated agents ({} per TLS connection) ...",
            args.agents, args.agents_per_conn
        );
    }
    let connect_s = match read_event(&mut from_child, CONNECT_TIMEOUT).await? {
        ChildEvent::Connected { agents, seconds } if agents == args.agents => seconds,
        other => bail!("the agents' process did not connect: {other:?}"),
    };
    wait_for_nodes(&metrics_client, &http, args.agents).await?;
    // Two heartbeat rounds, so every session has sent and received on its stream.
    tokio::time::sleep(Duration::from_millis(2 * heartbeat_ms + 500)).await;
    let rss_connected = rss_kib()?;
    // What a connected, idle fleet costs: sessions and heartbeats only.
    let idle_before = cpu_seconds("self");
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu_pct = (cpu_seconds("self") - idle_before) * 100.0 / IDLE_WINDOW.as_secs_f64();

    // A few jobs, so the scheduler holds every node in its index, at a rate low enough to
    // open few HTTP connections: the memory measured next is the fleet's, not the load's.
    to_child.write_all(b"prime\n").await?;
    match read_event(&mut from_child, DRAIN_TIMEOUT * 2).await? {
        ChildEvent::Loaded(_) => {}
        other => bail!("priming failed: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(heartbeat_ms + 500)).await;
    let rss_primed = rss_kib()?;

    if !args.json {
        eprintln!("warm-up: {} s at {}/s ...", args.warmup_seconds, args.rate);
    }
    to_child.write_all(b"warmup\n").await?;
    let warm_timeout = Duration::from_secs(args.warmup_seconds) + DRAIN_TIMEOUT * 2;
    match read_event(&mut from_child, warm_timeout).await? {
        ChildEvent::Loaded(_) => {}
        other => bail!("warm-up failed: {other:?}"),
    }
    let rss_warm = rss_kib()?;
    let hist_before = dispatch_histogram(&metrics_client, &http).await?;

    if !args.json {
        eprintln!(
            "measuring: {} s at {}/s offered ...",
            args.seconds, args.rate
        );
    }
    let child_pid = child.id();
    let cpu_before = (
        cpu_seconds("self"),
        child_pid.map(|p| cpu_seconds(&p.to_string())),
    );
    let sched_before = (
        sched_seconds("self"),
        child_pid.map(|p| sched_seconds(&p.to_string())),
    );
    to_child.write_all(b"load\n").await?;
    let load_timeout = Duration::from_secs(args.seconds) + DRAIN_TIMEOUT * 2;
    let load = match read_event(&mut from_child, load_timeout).await? {
        ChildEvent::Loaded(r) => r,
        other => bail!("the load run failed: {other:?}"),
    };
    let cpu_after = (
        cpu_seconds("self"),
        child_pid.map(|p| cpu_seconds(&p.to_string())),
    );
    let sched_after = (
        sched_seconds("self"),
        child_pid.map(|p| sched_seconds(&p.to_string())),
    );
    let runq_wait_s = (sched_after.0 .1 - sched_before.0 .1)
        + match (sched_before.1, sched_after.1) {
            (Some(b), Some(a)) => a.1 - b.1,
            _ => 0.0,
        };
    let hist_after = dispatch_histogram(&metrics_client, &http).await?;
    let rss_end = rss_kib()?;
    let coordinator_cpu_s = cpu_after.0 - cpu_before.0;
    let client_cpu_s = match (cpu_before.1, cpu_after.1) {
        (Some(b), Some(a)) => a - b,
        _ => 0.0,
    };

    to_child.write_all(b"exit\n").await?;
    drop(to_child);
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                tracing::warn!(%status, "the agents' process exited with an error");
            }
        }
        Err(_) => {
            let _ = child.kill().await;
        }
    }
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(30), running.task)
        .await
        .is_err()
    {
        tracing::warn!("the coordinator did not stop within 30 s");
    }

    let n = args.agents as f64;
    let report = DispatchReport {
        agents: args.agents,
        agents_per_conn: args.agents_per_conn,
        tls_connections: args.agents.div_ceil(args.agents_per_conn),
        engine: "null engine (no model: one chunk of `tokens_per_job` tokens after tokens/null_tps s, then JobDone)",
        submit_path: "HTTP API: POST /v1/completions, non-streaming, one request per job",
        offered_rate: args.rate,
        window_s: load.window_s,
        jobs_per_s: load.completed_in_window as f64 / load.window_s.max(1e-9),
        jobs_completed: load.completed,
        jobs_failed: load.failed,
        jobs_dropped_client: load.dropped,
        jobs_unassigned: load.unassigned,
        p50_dispatch_ms: load.dispatch_ms.p50,
        p99_dispatch_ms: load.dispatch_ms.p99,
        max_dispatch_ms: load.dispatch_ms.max,
        p99_queue_to_assign_ms_bucket: histogram_quantile(&hist_before, &hist_after, 0.99)
            * 1000.0,
        p50_request_ms: load.request_ms.p50,
        p99_request_ms: load.request_ms.p99,
        rss_before_kib: rss_before,
        rss_connected_kib: rss_connected,
        rss_primed_kib: rss_primed,
        rss_warm_kib: rss_warm,
        rss_end_kib: rss_end,
        rss_per_agent_kib: rss_primed.saturating_sub(rss_before) as f64 / n,
        rss_per_agent_connect_kib: rss_connected.saturating_sub(rss_before) as f64 / n,
        idle_cpu_pct,
        connect_s,
        coordinator_cpu_s,
        coordinator_cpu_us_per_job: coordinator_cpu_s * 1e6 / (load.completed.max(1) as f64),
        client_cpu_s,
        runq_wait_s,
        heartbeat_ms,
        tokens_per_job: args.tokens,
        null_tps: args.null_tps,
        store,
    };
    if let Some(scratch) = scratch {
        scratch.drop_now().await?;
    }
    if let Some(e) = &load.first_error {
        tracing::warn!(cause = %e, "some requests failed");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &DispatchReport) {
    println!(
        "tokenfleet bench dispatch: coordinator in this process; {} simulated agents in a child \
         process over gRPC/TLS on loopback ({} TLS connections, {} agent(s) each)",
        r.agents, r.tls_connections, r.agents_per_conn
    );
    println!("  agents run a {}", r.engine);
    println!(
        "  jobs: {}; {} tokens each; offered {}/s for {:.1} s",
        r.submit_path, r.tokens_per_job, r.offered_rate, r.window_s
    );
    println!("  store: {}", r.store);
    println!();
    println!("{:<58} {:>12} {:>10}", "figure", "measured", "target");
    let row = |name: &str, value: String, target: &str| {
        println!("{name:<58} {value:>12} {target:>10}");
    };
    row("agents connected", r.agents.to_string(), "10000");
    row(
        "sustained jobs/s (completed in window / window)",
        format!("{:.0}", r.jobs_per_s),
        ">= 2000",
    );
    row(
        "p99 enqueue->Assign, exact: request sent -> Assign at agent",
        format!("{:.2} ms", r.p99_dispatch_ms),
        "<= 20 ms",
    );
    row(
        "  p50 / max of the same",
        format!("{:.2}/{:.0}", r.p50_dispatch_ms, r.max_dispatch_ms),
        "",
    );
    row(
        "  p99 queue->Assign sent (coordinator histogram, bucket)",
        format!("<= {:.1} ms", r.p99_queue_to_assign_ms_bucket),
        "",
    );
    row(
        "p50 / p99 full request (sent -> response received)",
        format!("{:.1}/{:.1} ms", r.p50_request_ms, r.p99_request_ms),
        "",
    );
    row(
        "coordinator RSS per connected agent",
        format!("{:.1} KiB", r.rss_per_agent_kib),
        "<= 64 KiB",
    );
    row(
        "  same, right after connecting (before any job)",
        format!("{:.1} KiB", r.rss_per_agent_connect_kib),
        "",
    );
    row(
        "  RSS before agents/connected/indexed/warm/end (MiB)",
        format!(
            "{}/{}/{}/{}/{}",
            r.rss_before_kib / 1024,
            r.rss_connected_kib / 1024,
            r.rss_primed_kib / 1024,
            r.rss_warm_kib / 1024,
            r.rss_end_kib / 1024
        ),
        "",
    );
    row(
        "coordinator CPU, fleet connected and idle (heartbeats)",
        format!("{:.0}% core", r.idle_cpu_pct),
        "",
    );
    row(
        "jobs completed / failed / dropped by client / unassigned",
        format!(
            "{}/{}/{}/{}",
            r.jobs_completed, r.jobs_failed, r.jobs_dropped_client, r.jobs_unassigned
        ),
        "",
    );
    row(
        "CPU during the run: coordinator / client side (s)",
        format!("{:.1}/{:.1}", r.coordinator_cpu_s, r.client_cpu_s),
        "",
    );
    row(
        "  threads runnable but waiting for a CPU (both, s)",
        format!("{:.1}", r.runq_wait_s),
        "",
    );
    row(
        "  coordinator CPU per completed job",
        format!("{:.0} us", r.coordinator_cpu_us_per_job),
        "",
    );
    row(
        "time to connect all agents",
        format!("{:.1} s", r.connect_s),
        "",
    );
}

/// Waits for a line from the child and parses it.
async fn read_event(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    timeout: Duration,
) -> anyhow::Result<ChildEvent> {
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .context("timed out waiting for the agents' process")??
        .context("the agents' process exited")?;
    let event: ChildEvent = serde_json::from_str(&line)
        .with_context(|| format!("unexpected line from the agents' process: {line}"))?;
    if let ChildEvent::Failed { message } = &event {
        bail!("the agents' process failed: {message}");
    }
    Ok(event)
}

/// Waits (bounded) until the coordinator counts `n` eligible nodes.
async fn wait_for_nodes(client: &reqwest::Client, http: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = client
            .get(format!("{http}/metrics"))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await?
            .text()
            .await?;
        let eligible = metric_value(&text, "tokenfleet_nodes{state=\"eligible\"}").unwrap_or(0.0);
        if eligible as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the coordinator sees {eligible} eligible nodes of {n} after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().parse().ok())
}

/// Cumulative (upper bound seconds, count) pairs of the dispatch latency histogram.
async fn dispatch_histogram(
    client: &reqwest::Client,
    http: &str,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = client
        .get(format!("{http}/metrics"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await?
        .text()
        .await?;
    let prefix = "tokenfleet_dispatch_latency_seconds_bucket{le=\"";
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// Upper bound of the bucket holding quantile `q` of the observations between two snapshots.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c);
            (le, c - b)
        })
        .collect();
    let total = counts.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::INFINITY, |(le, _)| *le)
}

/// Resident set size of this process, KiB.
fn rss_kib() -> anyhow::Result<u64> {
    status_kib("VmRSS").context("no VmRSS in /proc/self/status")
}

// ------------------------------------------------------------------------------ child side

mod child;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantile_picks_the_bucket_holding_the_quantile() {
        let before = vec![(0.001, 10.0), (0.01, 10.0), (f64::INFINITY, 10.0)];
        let after = vec![(0.001, 100.0), (0.01, 109.0), (f64::INFINITY, 110.0)];
        // 100 new observations: 90 under 1 ms, 99 under 10 ms, 100 in total.
        assert_eq!(histogram_quantile(&before, &after, 0.5), 0.001);
        assert_eq!(histogram_quantile(&before, &after, 0.99), 0.01);
        assert_eq!(histogram_quantile(&before, &after, 1.0), f64::INFINITY);
        assert_eq!(histogram_quantile(&after, &after, 0.99), 0.0);
    }

    #[test]
    fn metric_values_are_read_by_full_name() {
        let text =
            "tokenfleet_nodes{state=\"eligible\"} 42\ntokenfleet_nodes{state=\"draining\"} 1\n";
        assert_eq!(
            metric_value(text, "tokenfleet_nodes{state=\"eligible\"}"),
            Some(42.0)
        );
        assert_eq!(metric_value(text, "tokenfleet_nodes{state=\"x\"}"), None);
    }
}
