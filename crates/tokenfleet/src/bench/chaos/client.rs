//! The chaos bench's clients: interactive chat completions (streaming or not) that retry with
//! their Idempotency-Key, and one batch through `/v1/files` + `/v1/batches`. Every answer is
//! kept token by token (`logprobs: true`) as the client received it, for the comparison with
//! the fault-free reference.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Attempts per interactive request (the first and at most 5 retries).
const MAX_ATTEMPTS: u32 = 6;
/// A request (all its attempts) gives up after this long.
const REQUEST_DEADLINE: Duration = Duration::from_secs(240);
/// A stream with no byte for this long is treated as dead and retried. Longer than a
/// partition (30 s) plus the lease (5 s) plus a re-run: a stalled job moves to another vehicle
/// and its stream goes on, which is what the bench wants to see.
const STREAM_IDLE: Duration = Duration::from_secs(90);
/// Tokens a client reads before it drops a stream it was told to drop.
const DISCONNECT_AFTER_TOKENS: usize = 3;

/// An answer as its client received it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// Token texts in the order received (each stream chunk's `logprobs.content`).
    pub tokens: Vec<String>,
    /// The answer's text (`message.content`, or the stream's concatenated deltas).
    pub text: String,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
    pub finish_reason: Option<String>,
}

/// How one request ended.
#[derive(Debug)]
pub struct Outcome {
    pub answer: Option<Answer>,
    /// The last error, when no attempt produced an answer.
    pub error: Option<String>,
    /// No attempt got an answer and the last one got no reply at all (no error status, no
    /// error event): the request was lost, not refused.
    pub unanswered: bool,
    pub retries: u32,
    /// Streams this client dropped on purpose (the client-side fault).
    pub disconnects: u32,
    pub latency: Duration,
}

pub fn chat_body(model: &str, prompt: &str, max_tokens: u32, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": true,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The answer in a non-streaming chat completion body.
pub fn answer_of(body: &Value) -> anyhow::Result<Answer> {
    let choice = &body["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .context("no message content")?
        .to_string();
    let tokens = choice["logprobs"]["content"]
        .as_array()
        .context("no logprobs.content")?
        .iter()
        .map(|t| t["token"].as_str().unwrap_or_default().to_string())
        .collect();
    Ok(Answer {
        tokens,
        text,
        completion_tokens: body["usage"]["completion_tokens"].as_u64(),
        finish_reason: choice["finish_reason"].as_str().map(String::from),
    })
}

/// One attempt's failure: whether the same request may be sent again, and whether the
/// coordinator said anything (an error status or event) or left the client without a reply.
struct Failure {
    message: String,
    retryable: bool,
    replied: bool,
}

impl Failure {
    /// The connection or stream died, or nothing came in time.
    fn silence(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            replied: false,
        }
    }

    /// The coordinator answered with an error (or a body we cannot read).
    fn reply(message: impl Into<String>, retryable: bool) -> Self {
        Self {
            message: message.into(),
            retryable,
            replied: true,
        }
    }
}

/// Sends one interactive request until it is answered, retrying retryable failures with the
/// same Idempotency-Key (bounded by [`MAX_ATTEMPTS`] and [`REQUEST_DEADLINE`]). With
/// `disconnect_once`, the first attempt's stream is dropped after a few tokens.
pub async fn interactive(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    idempotency_key: &str,
    body: &Value,
    disconnect_once: bool,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + REQUEST_DEADLINE;
    let stream = body["stream"].as_bool().unwrap_or(false);
    let mut out = Outcome {
        answer: None,
        error: None,
        unanswered: false,
        retries: 0,
        disconnects: 0,
        latency: Duration::ZERO,
    };
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            out.retries += 1;
            let backoff = Duration::from_millis(500 << attempt.min(4));
            tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
        let drop_after =
            (disconnect_once && stream && attempt == 0).then_some(DISCONNECT_AFTER_TOKENS);
        let sent = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .header("Idempotency-Key", idempotency_key)
            .json(body)
            .send();
        let result = match tokio::time::timeout_at(deadline, async {
            let resp = sent
                .await
                .map_err(|e| Failure::silence(format!("send: {e}")))?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                let retryable = status.as_u16() == 429 || status.is_server_error();
                return Err(Failure::reply(format!("{status}: {text}"), retryable));
            }
            if stream {
                read_stream(resp, drop_after).await
            } else {
                let body: Value = resp
                    .json()
                    .await
                    .map_err(|e| Failure::silence(format!("body: {e}")))?;
                answer_of(&body).map_err(|e| Failure::reply(format!("{e:#}: {body}"), true))
            }
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Failure {
                message: "no reply before the request deadline".into(),
                retryable: false,
                replied: false,
            }),
        };
        match result {
            Ok(answer) => {
                out.answer = Some(answer);
                break;
            }
            Err(f) => {
                out.unanswered = !f.replied;
                if f.message == DROPPED {
                    out.disconnects += 1;
                } else {
                    tracing::info!(key = idempotency_key, attempt, cause = %f.message, "chaos client: attempt failed");
                    out.error = Some(f.message);
                }
                if !f.retryable || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    if out.answer.is_some() {
        out.error = None;
        out.unanswered = false;
    }
    out.latency = started.elapsed();
    out
}

const DROPPED: &str = "dropped by the client";

/// Reads a chat completion stream chunk by chunk.
async fn read_stream(
    resp: reqwest::Response,
    drop_after: Option<usize>,
) -> Result<Answer, Failure> {
    let mut answer = Answer::default();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    loop {
        let chunk = match tokio::time::timeout(STREAM_IDLE, body.next()).await {
            Err(_) => return Err(Failure::silence("stream idle")),
            Ok(None) => return Err(Failure::silence("stream ended without [DONE]")),
            Ok(Some(Err(e))) => return Err(Failure::silence(format!("stream: {e}"))),
            Ok(Some(Ok(c))) => c,
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    return Ok(answer);
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| Failure::reply(format!("bad event {data:?}: {e}"), true))?;
                if let Some(err) = v.get("error") {
                    return Err(Failure::reply(format!("stream error: {err}"), true));
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    answer.completion_tokens = Some(n);
                }
                let choice = &v["choices"][0];
                if let Some(t) = choice["delta"]["content"].as_str() {
                    answer.text.push_str(t);
                }
                if let Some(tokens) = choice["logprobs"]["content"].as_array() {
                    answer.tokens.extend(
                        tokens
                            .iter()
                            .map(|t| t["token"].as_str().unwrap_or_default().to_string()),
                    );
                }
                if let Some(r) = choice["finish_reason"].as_str() {
                    answer.finish_reason = Some(r.to_string());
                }
            }
            if drop_after.is_some_and(|n| answer.tokens.len() >= n) {
                return Err(Failure::silence(DROPPED));
            }
        }
    }
}

/// A batch's lines as the client gets them back: custom id -> answer or error.
pub struct BatchResult {
    pub answers: HashMap<String, Answer>,
    pub errors: HashMap<String, String>,
    pub status: String,
}

/// Uploads `lines` ((custom id, chat completion body)) as a batch and returns its id.
pub async fn submit_batch(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    lines: &[(String, Value)],
) -> anyhow::Result<String> {
    let content: String = lines
        .iter()
        .map(|(id, body)| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
                .to_string()
                + "\n"
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content.into_bytes()).file_name("bench.jsonl"),
        );
    let file: Value = client
        .post(format!("{base}/v1/files"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let batch: Value = client
        .post(format!("{base}/v1/batches"))
        .bearer_auth(key)
        .json(
            &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(batch["id"]
        .as_str()
        .context("batch without id")?
        .to_string())
}

/// Polls the batch until it ends (bounded by `deadline`) and reads its output and error files.
pub async fn collect_batch(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    deadline: Instant,
) -> anyhow::Result<BatchResult> {
    let batch = loop {
        let b: Value = client
            .get(format!("{base}/v1/batches/{id}"))
            .bearer_auth(key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let status = b["status"].as_str().unwrap_or_default();
        if matches!(status, "completed" | "failed" | "expired" | "cancelled") {
            break b;
        }
        if Instant::now() >= deadline {
            tracing::warn!(batch = id, %status, "chaos: the batch did not end in time");
            break b;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let mut result = BatchResult {
        answers: HashMap::new(),
        errors: HashMap::new(),
        status: batch["status"].as_str().unwrap_or_default().to_string(),
    };
    for line in file_lines(client, base, key, &batch["output_file_id"]).await? {
        let custom_id = line["custom_id"].as_str().unwrap_or_default().to_string();
        match answer_of(&line["response"]["body"]) {
            Ok(a) => {
                result.answers.insert(custom_id, a);
            }
            Err(e) => {
                result.errors.insert(custom_id, format!("{e:#}: {line}"));
            }
        }
    }
    for line in file_lines(client, base, key, &batch["error_file_id"]).await? {
        let custom_id = line["custom_id"].as_str().unwrap_or_default().to_string();
        result.errors.insert(custom_id, line["error"].to_string());
    }
    Ok(result)
}

async fn file_lines(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    file_id: &Value,
) -> anyhow::Result<Vec<Value>> {
    let Some(id) = file_id.as_str() else {
        return Ok(Vec::new());
    };
    let resp = client
        .get(format!("{base}/v1/files/{id}/content"))
        .bearer_auth(key)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("file {id}: {}", resp.status());
    }
    resp.text()
        .await?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("batch output line"))
        .collect()
}
