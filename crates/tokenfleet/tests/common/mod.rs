//! A real fleet for tests: a coordinator and agents in this process, each agent with its own
//! llama.cpp engine on the real model. Everything binds 127.0.0.1:0 and stops on drop.

#![allow(
    dead_code,
    reason = "each test binary uses only part of the shared harness"
)]

pub mod batch;
pub mod liar;
pub mod process;
pub mod secure;

use std::path::PathBuf;
use std::time::Duration;

use tokenfleet_agent::{Agent, AgentConfig, VehicleStatus};
use tokenfleet_coordinator::config::ApiKey;
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_engine::{Engine, EngineConfig};

pub const KEY: &str = "test-key-0123456789abcdef";
/// A key of a second tenant ("other"), for isolation tests.
pub const OTHER_KEY: &str = "other-key-0123456789abcdef";
/// The operator key: `/metrics` and `/healthz` details.
pub const OPERATOR_KEY: &str = "operator-key-0123456789abcdef";
pub const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("TOKENFLEET_MODEL") {
        return PathBuf::from(p);
    }
    let path = tokenfleet::cli::default_model_path();
    assert!(
        path.exists(),
        "test model missing at {}: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

pub struct TestAgent {
    pub agent: Option<Agent>,
    pub engine: Engine,
    pub name: String,
}

pub struct Fleet {
    pub http: String,
    pub grpc: String,
    pub agents: Vec<TestAgent>,
    pub client: reqwest::Client,
    pub db: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    coordinator:
        Option<tokio::task::JoinHandle<Result<(), tokenfleet_coordinator::CoordinatorError>>>,
    _dir: tempfile::TempDir,
}

pub fn test_config(db: PathBuf) -> CoordinatorConfig {
    CoordinatorConfig {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        db_path: db,
        api_keys: vec![
            ApiKey {
                key: KEY.into(),
                tenant: "default".into(),
            },
            ApiKey {
                key: OTHER_KEY.into(),
                tenant: "other".into(),
            },
        ],
        heartbeat_interval: Duration::from_millis(250),
        lease_timeout: Duration::from_millis(1500),
        max_body_bytes: 64 * 1024,
        operator_key: Some(OPERATOR_KEY.into()),
        ..Default::default()
    }
}

pub async fn start_agent(grpc: &str, name: &str, slots: u32) -> TestAgent {
    start_agent_with(grpc, name, slots, model_path(), secure::UNMEASURED_SHA).await
}

/// An agent running the GGUF at `model` and claiming `sha256` for it in its Hello.
pub async fn start_agent_with(
    grpc: &str,
    name: &str,
    slots: u32,
    model: PathBuf,
    sha256: &str,
) -> TestAgent {
    let mut ec = EngineConfig::new(model);
    ec.slots = slots;
    ec.ctx_per_slot = 1024;
    ec.threads = 1;
    let engine = Engine::load_async(ec).await.expect("engine");
    let config = AgentConfig::new(format!("http://{grpc}"), name, MODEL);
    let agent = Agent::start(
        config,
        engine.clone(),
        sha256.into(),
        VehicleStatus::parked(),
    );
    TestAgent {
        agent: Some(agent),
        engine,
        name: name.into(),
    }
}

impl Fleet {
    pub async fn start(agents: usize) -> Fleet {
        Self::start_with(agents, 4, |_, _| {}).await
    }

    /// A fleet of `agents` agents with `slots` engine slots each, on [`test_config`] changed
    /// by `configure(config, temp dir)`.
    pub async fn start_with(
        agents: usize,
        slots: u32,
        configure: impl FnOnce(&mut CoordinatorConfig, &std::path::Path),
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.db");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = test_config(db.clone());
        configure(&mut config, dir.path());
        // With `http_tls` the API is HTTPS: the fleet's client trusts that certificate.
        let mut client = reqwest::Client::builder();
        let scheme = match &config.http_tls {
            Some(tls) => {
                let pem = std::fs::read(&tls.cert).expect("the API certificate");
                client =
                    client.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("PEM"));
                "https"
            }
            None => "http",
        };
        let running = tokenfleet_coordinator::start(config, async move {
            let _ = rx.await;
        })
        .await
        .expect("coordinator starts");
        let http = format!("{scheme}://{}", running.bound.http);
        let grpc = running.bound.grpc.to_string();
        let mut list = Vec::new();
        for i in 0..agents {
            list.push(start_agent(&grpc, &format!("vehicle-{}", i + 1), slots).await);
        }
        let fleet = Fleet {
            http,
            grpc,
            agents: list,
            client: client.build().expect("HTTP client"),
            db,
            shutdown: Some(tx),
            coordinator: Some(running.task),
            _dir: dir,
        };
        if agents > 0 {
            fleet.wait_for_nodes(agents).await;
        }
        fleet
    }

    /// Waits until `n` agents are connected (bounded).
    pub async fn wait_for_nodes(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self.metrics().await;
            if connected_nodes(&metrics) >= n && !self.models().await.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agents did not connect: {metrics}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The coordinator's Prometheus text.
    pub async fn metrics(&self) -> String {
        metrics_text(&self.client, &self.http).await
    }

    pub async fn models(&self) -> Vec<String> {
        model_ids(&self.client, &self.http).await
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.http))
            .bearer_auth(KEY)
            .json(&body)
    }
}

impl Fleet {
    /// Shuts the coordinator down gracefully and waits until its store is flushed.
    pub async fn stop_coordinator(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.coordinator.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("coordinator stops within 30 s")
                .expect("coordinator task")
                .expect("coordinator stopped cleanly");
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of the sample `name` (with its labels, e.g. `tokenfleet_x{reason="y"}`) in a
/// Prometheus text, 0 when absent.
/// The Prometheus text of the coordinator at `base`.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Nodes with a live session, from the coordinator's Prometheus text.
pub fn connected_nodes(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("tokenfleet_nodes{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Ids of the models `GET /v1/models` lists.
pub async fn model_ids(client: &reqwest::Client, http: &str) -> Vec<String> {
    let v: serde_json::Value = client
        .get(format!("{http}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or_default();
    v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads an SSE body into its `data:` payloads (bounded by `timeout`).
pub async fn sse_events(resp: reqwest::Response, timeout: Duration) -> Vec<String> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    out.push(data.to_string());
                }
            }
        }
        if out.last().map(String::as_str) == Some("[DONE]") {
            break;
        }
    }
    out
}

/// What a streaming client received before its connection broke: the concatenated content.
pub async fn received_until_cut(resp: reqwest::Response) -> String {
    use futures::StreamExt;
    let mut raw = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Only whole events: the cut may fall inside one.
    let whole = &raw[..raw.rfind("\n\n").map_or(0, |p| p + 2)];
    let events: Vec<String> = whole
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect();
    chat_stream_text(&events)
}

/// The concatenated content of chat-completion SSE chunks.
pub fn chat_stream_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

pub fn greedy_chat(prompt: &str, max_tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": stream},
    })
}
