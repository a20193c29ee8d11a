//! `llama-server`: started on a free loopback port, health-checked, and killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::tools::RefTools;
use super::{http_client, tail};

/// How long llama-server may take to load the model and answer `GET /health` with 200.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running llama-server bound to 127.0.0.1. Dropping it kills that one child process (by its
/// pid, SIGKILL) and reaps it.
pub struct LlamaServer {
    child: Child,
    pub base_url: String,
    pub port: u16,
    /// The server's stdout and stderr, kept for diagnosis.
    pub log_path: PathBuf,
}

impl LlamaServer {
    /// The server process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        // Already reaped: nothing to kill (and the pid may have been reused).
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts llama-server on a free 127.0.0.1 port with `parallel` slots of `ctx_per_slot` tokens
/// each (llama-server's `-c` is the total, split across the slots) and waits, at most 60 s,
/// until `GET /health` answers 200.
pub async fn start_llama_server(
    tools: &RefTools,
    model: &Path,
    threads: u32,
    parallel: u32,
    ctx_per_slot: u32,
) -> Result<LlamaServer> {
    if parallel == 0 || ctx_per_slot == 0 {
        bail!("llama-server needs parallel and ctx_per_slot above 0");
    }
    let port = free_loopback_port()?;
    let log_path = std::env::temp_dir().join(format!("tokenfleet-llama-server-{port}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("duplicating {}", log_path.display()))?;
    let ctx_total = u64::from(ctx_per_slot) * u64::from(parallel);
    let mut cmd = Command::new(&tools.llama_server);
    cmd.arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &threads.to_string()])
        .args(["--parallel", &parallel.to_string()])
        .args(["-c", &ctx_total.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", tools.llama_server.display()))?;
    // From here on the server is owned by the guard, so every error path below kills it.
    let mut server = LlamaServer {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
        port,
        log_path,
    };

    let client = http_client()?;
    let health = format!("{}/health", server.base_url);
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    loop {
        if let Some(status) = server.child.try_wait().context("polling llama-server")? {
            bail!(
                "llama-server exited during start-up ({status}); log {}:\n{}",
                server.log_path.display(),
                log_tail(&server.log_path)
            );
        }
        let ok = client
            .get(&health)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false);
        if ok {
            return Ok(server);
        }
        if Instant::now() >= deadline {
            bail!(
                "llama-server did not answer GET /health with 200 within {:?}; log {}:\n{}",
                SERVER_START_TIMEOUT,
                server.log_path.display(),
                log_tail(&server.log_path)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A port that was free on 127.0.0.1 a moment ago (the OS picks it). Another process could
/// take it before llama-server binds; start-up then fails with the server's log in the error.
fn free_loopback_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr().context("reading the free port")?.port())
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => tail(&s, 3000).to_string(),
        Err(e) => format!("(cannot read the log: {e})"),
    }
}
