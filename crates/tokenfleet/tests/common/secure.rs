//! A secured fleet for the security tests: a coordinator with a fresh fleet CA, enrollment and
//! mutual TLS, and agents enrolled (or deliberately mis-credentialed) through the real paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_agent::config::SharedAttestor;
use tokenfleet_agent::identity::IdentityDir;
use tokenfleet_agent::{Agent, AgentConfig, SessionStatus, VehicleStatus};
use tokenfleet_coordinator::{config::SecurityConfig, trust::security::Security};
use tokenfleet_engine::{Engine, EngineConfig};

use super::{test_config, KEY, MODEL};

/// A model hash in canonical form for agents whose model is never measured (mutual TLS tests,
/// unattested nodes): the coordinator refuses a Hello with anything else.
pub const UNMEASURED_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub struct SecureFleet {
    pub http: String,
    pub grpc: SocketAddr,
    pub enroll: SocketAddr,
    pub security: Arc<Security>,
    pub db: PathBuf,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SecureFleet {
    /// Starts a coordinator with `security` (its CA directory and enrollment port are set
    /// here) and a queue timeout of `queue_timeout`.
    pub async fn start(mut security: SecurityConfig, queue_timeout: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.db");
        security.ca_dir = dir.path().join("fleet-ca");
        security.enroll_addr = "127.0.0.1:0".parse().unwrap();
        let mut config = test_config(db.clone());
        config.security = Some(security);
        config.queue_timeout = queue_timeout;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokenfleet_coordinator::start(config, async move {
            let _ = rx.await;
        })
        .await
        .expect("coordinator starts");
        SecureFleet {
            http: format!("http://{}", running.bound.http),
            grpc: running.bound.grpc,
            enroll: running.bound.enroll.expect("enrollment port"),
            security: running.security.expect("security"),
            db,
            client: reqwest::Client::new(),
            dir,
            shutdown: Some(tx),
        }
    }

    /// Enrolls `node_id` through a one-time token and the enrollment service.
    pub async fn enroll(
        &self,
        node_id: &str,
        attestor: Option<&dyn tokenfleet_agent::attest::Attestor>,
    ) -> IdentityDir {
        let dir = self.dir.path().join(format!("identity-{node_id}"));
        let (identity, enrolled) = tokenfleet::fleet_cmd::enroll_local(
            &self.security,
            self.enroll,
            node_id,
            &dir,
            attestor,
        )
        .await
        .expect("enrollment");
        assert_eq!(enrolled.node_id, node_id);
        identity
    }

    /// The fleet CA as a file (what an operator hands a vehicle with its token).
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("fleet-ca").join("ca.pem");
        assert!(path.exists());
        path
    }

    /// Nodes with a live session, from the coordinator's metrics.
    pub async fn connected_nodes(&self) -> usize {
        let text = self
            .client
            .get(format!("{}/metrics", self.http))
            .bearer_auth(super::OPERATOR_KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        super::connected_nodes(&text)
    }

    /// A greedy chat request, optionally marked sensitive; returns (status, body).
    pub async fn chat(&self, prompt: &str, sensitive: bool) -> (u16, serde_json::Value) {
        let resp = self
            .client
            .post(format!("{}/v1/chat/completions", self.http))
            .bearer_auth(KEY)
            .json(&serde_json::json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "temperature": 0,
                "tokenfleet": {"sensitive": sensitive},
            }))
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }
}

impl Drop for SecureFleet {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Loads the engine on `model` (1 slot, 1 thread: these tests are about admission).
pub async fn engine(model: &Path) -> Engine {
    let mut ec = EngineConfig::new(model);
    ec.slots = 1;
    ec.ctx_per_slot = 512;
    ec.threads = 1;
    Engine::load_async(ec).await.expect("engine")
}

/// Starts an agent against the fleet's agent port (`https://` unless `plaintext`).
pub fn agent(
    fleet: &SecureFleet,
    engine: &Engine,
    model_sha: &str,
    identity: Option<IdentityDir>,
    attestor: Option<SharedAttestor>,
    configure: impl FnOnce(&mut AgentConfig),
) -> Agent {
    let mut config = AgentConfig::new(format!("https://{}", fleet.grpc), "claimed-name", MODEL);
    config.identity = identity;
    config.attestor = attestor;
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    configure(&mut config);
    Agent::start(
        config,
        engine.clone(),
        model_sha.to_string(),
        VehicleStatus::parked(),
    )
}

/// An agent with `identity` (or none), no TPM and an unmeasured model.
pub fn unattested_agent(
    fleet: &SecureFleet,
    engine: &Engine,
    identity: Option<IdentityDir>,
) -> Agent {
    agent(fleet, engine, UNMEASURED_SHA, identity, None, |_| {})
}

/// Waits (bounded) until the agent's session status satisfies `pred`; returns it.
pub async fn wait_status(
    agent: &Agent,
    what: &str,
    pred: impl Fn(&SessionStatus) -> bool,
) -> SessionStatus {
    let mut rx = agent.session_status();
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let now = rx.borrow_and_update().clone();
            if pred(&now) {
                return now;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    })
    .await;
    match result {
        Ok(status) => status,
        Err(_) => panic!("agent never reached: {what} (now {:?})", rx.borrow()),
    }
}

/// Asserts that the agent was refused for the cause named by any of `causes` (matched without
/// case in its failure text: a TLS alert name, the coordinator's status message).
pub fn assert_refused_for(status: &SessionStatus, causes: &[&str]) {
    let SessionStatus::Failed(why) = status else {
        panic!("not refused: {status:?}");
    };
    let text = why.to_lowercase();
    assert!(
        causes.iter().any(|c| text.contains(&c.to_lowercase())),
        "refused, but not for {causes:?}: {why}"
    );
}

pub fn is_failed(s: &SessionStatus) -> bool {
    matches!(s, SessionStatus::Failed(_))
}

pub fn is_connected(s: &SessionStatus) -> bool {
    *s == SessionStatus::Connected
}

/// Waits (bounded) until a connected node serves the test model (an agent says Connected on
/// Welcome, a moment before the manager has registered it).
pub async fn wait_serving(fleet: &SecureFleet) {
    for _ in 0..600 {
        if !super::model_ids(&fleet.client, &fleet.http)
            .await
            .is_empty()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no node serves the model");
}

/// Waits (bounded) until the coordinator counts `n` live sessions.
pub async fn wait_connected_nodes(fleet: &SecureFleet, n: usize) {
    for _ in 0..600 {
        if fleet.connected_nodes().await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "expected {n} connected nodes, have {}",
        fleet.connected_nodes().await
    );
}
