//! The coordinator as a child process (to kill it with SIGKILL), on fixed loopback ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::KEY;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenfleet");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_coordinator(http: u16, grpc: u16, db: &Path) -> Proc {
    Proc(
        Command::new(BIN)
            .args([
                "coordinator",
                "--http",
                &format!("127.0.0.1:{http}"),
                "--grpc",
                &format!("127.0.0.1:{grpc}"),
            ])
            .arg("--db")
            .arg(db)
            .args(["--api-key", KEY, "--lease-timeout-ms", "2000"])
            .args(["--operator-key", super::OPERATOR_KEY])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the coordinator"),
    )
}

pub async fn wait_http(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "coordinator did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until at least one agent serves a model (agents reconnect with backoff after a
/// coordinator restart; until then requests get 404 model_not_found).
pub async fn wait_models(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served = match client
            .get(format!("{base}/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await
        {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["data"].as_array().map(|d| !d.is_empty()))
                .unwrap_or(false),
            Err(_) => false,
        };
        if served {
            return;
        }
        assert!(Instant::now() < deadline, "no agent reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A coordinator process on fixed loopback ports with a job store that outlives it, and two
/// in-process agents (`vehicle-a`, `vehicle-b`) that reconnect by themselves: what a test that
/// kills the coordinator with SIGKILL and restarts it needs.
pub struct KillableFleet {
    pub db: PathBuf,
    pub base: String,
    pub client: reqwest::Client,
    http: u16,
    grpc: u16,
    coordinator: Option<Proc>,
    _agents: [super::TestAgent; 2],
    _dir: tempfile::TempDir,
}

impl KillableFleet {
    /// Starts the coordinator, waits for its HTTP API, then starts the agents with `slots`
    /// each (it does not wait for them to register).
    pub async fn start(slots: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.db");
        let (http, grpc) = (free_port(), free_port());
        let base = format!("http://127.0.0.1:{http}");
        let client = reqwest::Client::new();
        let coordinator = spawn_coordinator(http, grpc, &db);
        wait_http(&client, &base).await;
        let grpc_addr = format!("127.0.0.1:{grpc}");
        let agents = [
            super::start_agent(&grpc_addr, "vehicle-a", slots).await,
            super::start_agent(&grpc_addr, "vehicle-b", slots).await,
        ];
        Self {
            db,
            base,
            client,
            http,
            grpc,
            coordinator: Some(coordinator),
            _agents: agents,
            _dir: dir,
        }
    }

    /// SIGKILL, and reap the process.
    pub fn kill_coordinator(&mut self) {
        drop(self.coordinator.take());
    }

    /// A new coordinator on the same store and ports; returns once its HTTP API answers.
    pub async fn restart_coordinator(&mut self) {
        self.coordinator = Some(spawn_coordinator(self.http, self.grpc, &self.db));
        wait_http(&self.client, &self.base).await;
    }
}
