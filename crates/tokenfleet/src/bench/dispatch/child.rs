//! The client side of `bench dispatch`, run in a child process (this binary again, with the
//! hidden `--child-*` flags): the simulated agents with their null engine over gRPC/TLS, and
//! the open-loop API clients; it reports to the parent over stdout (see the parent module).

use super::*;

/// What agents and API clients share: per job (by sequence number) the moment its request
/// was sent and the moment its Assign reached an agent, in ns since `base` (0 = not yet).
pub(super) struct Shared {
    base: Instant,
    sent_ns: Vec<AtomicU64>,
    assigned_ns: Vec<AtomicU64>,
    pub null_tps: f64,
    pub connected: AtomicUsize,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn assigned(&self, prompt: &str) {
        let Some(seq) = prompt
            .strip_prefix(PROMPT_PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
        else {
            return;
        };
        if let Some(slot) = self.assigned_ns.get(seq) {
            // First Assign only (a requeued job may be assigned again).
            let _ = slot.compare_exchange(0, self.now_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

pub(super) async fn run(args: DispatchArgs) -> anyhow::Result<()> {
    let result = run_inner(args).await;
    if let Err(e) = &result {
        emit(&ChildEvent::Failed {
            message: format!("{e:#}"),
        });
    }
    result
}

fn emit(event: &ChildEvent) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, event);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

async fn run_inner(args: DispatchArgs) -> anyhow::Result<()> {
    let grpc = args.child_grpc.clone().context("--child-grpc")?;
    let http = args.child_http.clone().context("--child-http")?;
    let ca = args.child_ca.clone().context("--child-ca")?;
    raise_nofile_limit(args.agents as u64 + args.max_inflight as u64 + 4096);
    let ca = Certificate::from_pem(std::fs::read(&ca)?);
    let max_jobs = ((args.rate * (args.seconds + args.warmup_seconds) as f64
        + PRIME_RATE * PRIME_SECONDS) as usize
        + 16)
        .min(50_000_000);
    let shared = Arc::new(Shared {
        base: Instant::now(),
        sent_ns: (0..max_jobs).map(|_| AtomicU64::new(0)).collect(),
        assigned_ns: (0..max_jobs).map(|_| AtomicU64::new(0)).collect(),
        null_tps: args.null_tps,
        connected: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Connect the agents, CONNECT_CONCURRENCY handshakes at a time.
    let started = Instant::now();
    let conns = args.agents.div_ceil(args.agents_per_conn);
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (err_tx, mut err_rx) = mpsc::channel::<String>(16);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let first = c * args.agents_per_conn;
        let last = (first + args.agents_per_conn).min(args.agents);
        let (grpc, ca, gate, shared, stop, err_tx) = (
            grpc.clone(),
            ca.clone(),
            Arc::clone(&gate),
            Arc::clone(&shared),
            stop_rx.clone(),
            err_tx.clone(),
        );
        let slots = args.slots;
        let tokens = args.tokens;
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await;
            let channel = match connect(&grpc, ca).await {
                Ok(ch) => ch,
                Err(e) => {
                    let _ = err_tx.try_send(format!("connect: {e:#}"));
                    return;
                }
            };
            // The handshake is the expensive part; opening the sessions is not.
            drop(permit);
            let mut agents = tokio::task::JoinSet::new();
            for i in first..last {
                let agent = NullAgent {
                    name: format!("bench-{i:06}"),
                    slots,
                    max_tokens: tokens,
                    shared: Arc::clone(&shared),
                };
                let (channel, stop, err_tx) = (channel.clone(), stop.clone(), err_tx.clone());
                agents.spawn(async move {
                    if let Err(e) = agent.run(channel, stop).await {
                        let _ = err_tx.try_send(format!("{}: {e:#}", agent.name));
                    }
                });
            }
            while agents.join_next().await.is_some() {}
        });
    }
    drop(err_tx);
    let deadline = Instant::now() + CONNECT_TIMEOUT - Duration::from_secs(5);
    while shared.connected.load(Ordering::Relaxed) < args.agents {
        if let Ok(e) = err_rx.try_recv() {
            let _ = stop_tx.send(true);
            bail!("an agent failed: {e}");
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} agents connected",
                shared.connected.load(Ordering::Relaxed),
                args.agents
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    emit(&ChildEvent::Connected {
        agents: args.agents,
        seconds: started.elapsed().as_secs_f64(),
    });

    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.max_inflight)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("{http}/v1/completions");
    let mut next_seq = 0usize;
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(cmd) = commands.next_line().await? {
        let (rate, secs) = match cmd.trim() {
            "prime" => (PRIME_RATE, PRIME_SECONDS),
            "warmup" => (args.rate, args.warmup_seconds as f64),
            "load" => (args.rate, args.seconds as f64),
            _ => break,
        };
        let r = load(&client, &url, &args, &shared, &mut next_seq, rate, secs).await;
        emit(&ChildEvent::Loaded(r));
        if let Ok(e) = err_rx.try_recv() {
            tracing::warn!(cause = %e, "an agent failed");
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

async fn connect(grpc: &str, ca: Certificate) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(grpc.to_string())?
        .connect_timeout(Duration::from_secs(20))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .tls_config(ClientTlsConfig::new().ca_certificate(ca))?;
    Ok(endpoint.connect().await?)
}

/// One simulated vehicle: a node session and a null engine.
struct NullAgent {
    name: String,
    slots: u32,
    max_tokens: u32,
    shared: Arc<Shared>,
}

impl NullAgent {
    async fn run(&self, channel: Channel, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut client = NodeSessionClient::new(channel);
        let (out, out_rx) = mpsc::channel::<AgentMessage>(2 * self.slots as usize + 8);
        out.send(AgentMessage::new(AgentMsg::Hello(self.hello())))
            .await?;
        let mut inbound = client
            .open(tokio_stream::wrappers::ReceiverStream::new(out_rx))
            .await?
            .into_inner();
        let welcome = match inbound.message().await? {
            Some(CoordinatorMessage {
                msg: Some(CoordinatorMsg::Welcome(w)),
            }) => w,
            other => bail!("expected Welcome, got {other:?}"),
        };
        out.send(AgentMessage::new(AgentMsg::State(self.state())))
            .await?;
        self.shared.connected.fetch_add(1, Ordering::Relaxed);
        let period = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
        // Spread the fleet's heartbeats over the interval, as independent vehicles are.
        let phase = period.mul_f64(rand::random::<f64>());
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = inbound.message() => match msg? {
                    Some(CoordinatorMessage { msg: Some(msg) }) => self.on_message(msg, &out),
                    Some(_) => {}
                    None => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    let sent_unix_ms = tokenfleet_coordinator::clock::unix_ms();
                    let _ = out.try_send(AgentMessage::new(AgentMsg::Heartbeat(v1::Heartbeat { sent_unix_ms })));
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    fn on_message(&self, msg: CoordinatorMsg, out: &mpsc::Sender<AgentMessage>) {
        let CoordinatorMsg::Assign(a) = msg else {
            // HeartbeatAck, Cancel (the job's timer just runs out), Drain, Resend: no
            // state to keep for a null engine.
            return;
        };
        if let Some(v1::assign::Prompt::Text(p)) = &a.prompt {
            self.shared.assigned(p);
        }
        let n = a.max_tokens.min(self.max_tokens).max(1);
        let start = a.resume_token_ids.len() as u32;
        let delay = Duration::from_secs_f64(n as f64 / self.shared.null_tps);
        let out = out.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let chunk = v1::TokenChunk {
                job_id: a.job_id.clone(),
                start_index: start,
                token_ids: (0..n as i32).map(|i| 100 + i).collect(),
                texts: (0..n).map(|_| " tok".to_string()).collect(),
                logprobs: vec![0.0; n as usize],
                top_logprobs: Vec::new(),
                prompt_tokens: 4,
            };
            let done = v1::JobDone {
                job_id: a.job_id,
                finish_reason: v1::FinishReason::Length as i32,
                next_index: start + n,
                prompt_tokens: 4,
                decode_ms: delay.as_millis() as u32,
                ..Default::default()
            };
            if out
                .send(AgentMessage::new(AgentMsg::Chunk(chunk)))
                .await
                .is_ok()
            {
                let _ = out.send(AgentMessage::new(AgentMsg::Done(done))).await;
            }
        });
    }

    fn hello(&self) -> v1::Hello {
        v1::Hello {
            node_id: self.name.clone(),
            software_version: format!("bench-null/{}", env!("CARGO_PKG_VERSION")),
            protocol_version: tokenfleet_protocol::PROTOCOL_VERSION,
            hardware: Some(v1::HardwareProfile {
                compute_class: "null".into(),
                cpu_threads: 4,
                memory_bytes: 8 << 30,
                decode_tps_single: self.shared.null_tps as f32,
                decode_tps_batched: self.shared.null_tps as f32 * self.slots as f32,
            }),
            engine_slots: self.slots,
            models: vec![v1::ModelInfo {
                name: NULL_MODEL.into(),
                sha256: "0".repeat(64),
                ctx_per_slot: 4096,
                size_bytes: 0,
            }],
            held_jobs: Vec::new(),
        }
    }

    fn state(&self) -> v1::State {
        v1::State {
            governor: v1::GovernorState::Eligible as i32,
            eligible: true,
            reason: String::new(),
            parked: true,
            plugged_in: true,
            soc_pct: Some(80.0),
            soc_reserve_pct: 20.0,
            link_rtt_ms: 1.0,
            slots_free: self.slots,
            ..Default::default()
        }
    }
}

/// Sends requests at `rate` per second for `secs` seconds (open loop), then waits (bounded) for
/// the ones in flight.
async fn load(
    client: &reqwest::Client,
    url: &str,
    args: &DispatchArgs,
    shared: &Arc<Shared>,
    next_seq: &mut usize,
    rate: f64,
    secs: f64,
) -> LoadResult {
    #[derive(Default)]
    struct Counters {
        completed: AtomicU64,
        completed_in_window: AtomicU64,
        failed: AtomicU64,
    }
    let counters = Arc::new(Counters::default());
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let request_ms: Arc<std::sync::Mutex<Vec<f64>>> = Arc::default();
    let inflight = Arc::new(Semaphore::new(args.max_inflight));
    let start = Instant::now();
    let window = Duration::from_secs_f64(secs);
    let end = start + window;
    let total = ((rate * secs) as usize).min(shared.sent_ns.len() - *next_seq);
    let first_seq = *next_seq;
    let mut sent = 0usize;
    let mut dropped = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total && Instant::now() < end {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
        while sent < due {
            let seq = *next_seq;
            *next_seq += 1;
            sent += 1;
            let Ok(permit) = Arc::clone(&inflight).try_acquire_owned() else {
                dropped += 1;
                continue;
            };
            let body = serde_json::json!({
                "model": NULL_MODEL,
                "prompt": format!("{PROMPT_PREFIX}{seq}"),
                "max_tokens": args.tokens,
                "temperature": 0.0,
            });
            let req = client.post(url).bearer_auth(BENCH_KEY).json(&body);
            let (shared, counters, first_error, request_ms) = (
                Arc::clone(shared),
                Arc::clone(&counters),
                Arc::clone(&first_error),
                Arc::clone(&request_ms),
            );
            tasks.spawn(async move {
                let _permit = permit;
                let t0 = shared.now_ns();
                shared.sent_ns[seq].store(t0.max(1), Ordering::Relaxed);
                let outcome = match req.send().await {
                    Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    },
                    Ok(resp) => {
                        let status = resp.status();
                        let text = resp.text().await.unwrap_or_default();
                        Err(format!("HTTP {status}: {text}"))
                    }
                    Err(e) => Err(e.to_string()),
                };
                let done = Instant::now();
                match outcome {
                    Ok(()) => {
                        counters.completed.fetch_add(1, Ordering::Relaxed);
                        if done <= end {
                            counters.completed_in_window.fetch_add(1, Ordering::Relaxed);
                        }
                        let ms = (shared.now_ns() - t0) as f64 / 1e6;
                        if let Ok(mut v) = request_ms.lock() {
                            v.push(ms);
                        }
                    }
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut fe) = first_error.lock() {
                            fe.get_or_insert(e);
                        }
                    }
                }
            });
        }
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let mut dispatch_ms = Vec::with_capacity(sent);
    let mut unassigned = 0u64;
    for seq in first_seq..first_seq + sent {
        let s = shared.sent_ns[seq].load(Ordering::Relaxed);
        if s == 0 {
            continue; // dropped on the client side
        }
        let a = shared.assigned_ns[seq].load(Ordering::Relaxed);
        if a == 0 {
            unassigned += 1;
        } else {
            dispatch_ms.push(a.saturating_sub(s) as f64 / 1e6);
        }
    }
    let request_ms = request_ms.lock().map(|v| v.clone()).unwrap_or_default();
    LoadResult {
        window_s: window.as_secs_f64(),
        submitted: sent as u64 - dropped,
        completed: counters.completed.load(Ordering::Relaxed),
        completed_in_window: counters.completed_in_window.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        dropped,
        unassigned,
        dispatch_ms: Percentiles::of(dispatch_ms),
        request_ms: Percentiles::of(request_ms),
        first_error: first_error.lock().ok().and_then(|e| e.clone()),
    }
}
