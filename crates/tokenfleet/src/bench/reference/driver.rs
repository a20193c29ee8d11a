//! The streaming load driver: concurrent clients against any loopback OpenAI-compatible
//! `POST /v1/chat/completions`, measuring TTFT and generated tokens.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;

use super::sse::{parse_sse_line, SseEvent, SseLineBuffer};
use super::{http_client, truncate};

/// Upper bounds on the request loop, so a mistyped argument cannot turn into a flood.
const MAX_CLIENTS: usize = 1024;
const MAX_REQUESTS_PER_CLIENT: usize = 100_000;
/// How much of an error response body is quoted in the error message.
const MAX_ERROR_BODY: usize = 2048;

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
        // llama-server would reuse the previous identical prompt's KV cache (TTFT ~10 ms);
        // tokenfleet evaluates every prompt, so the reference must too.
        "cache_prompt": false,
        // The same "generate exactly n_gen tokens" request in tokenfleet's extension object.
        "tokenfleet": { "ignore_eos": true },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::reference::sse::ChunkInfo;

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
}
