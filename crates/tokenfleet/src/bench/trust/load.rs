//! The bench's client load: OpenAI chat requests of a fixed mix (greedy and sampled,
//! streamed and not) through the coordinator's API, a bounded number at a bounded
//! concurrency, each failure kept with its reason (status and error code, or the client's
//! error). Uses reqwest and the bench's API key only.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;

use super::KEY;

/// One OpenAI chat request of the bench's mix: `Ok` when it was answered, else why not
/// (the status and the error body's code, or the client's error), so a failure is explained.
async fn request(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    i: usize,
    max_tokens: u32,
) -> Result<(), String> {
    const PROMPTS: [&str; 8] = [
        "Explain why the sky is blue.",
        "Write a haiku about parking lots.",
        "List three facts about batteries.",
        "What is a prime number?",
        "Describe a sunrise in one sentence.",
        "Give me a tip for learning chess.",
        "Why do cats purr?",
        "Summarize the plot of a detective story you invent.",
    ];
    let sampled = i % 2 == 1;
    let stream = i % 3 == 0;
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("{} (request {i})", PROMPTS[i % PROMPTS.len()])}],
        "max_tokens": max_tokens,
        "temperature": if sampled { 0.8 } else { 0.0 },
        "top_p": if sampled { 0.95 } else { 1.0 },
        "seed": i,
        "stream": stream,
    });
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .map_err(|e| client_error(&e))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| client_error(&e))?;
    if !status.is_success() {
        return Err(format!("{} {}", status.as_u16(), error_code(&text)));
    }
    if stream && !text.contains("[DONE]") {
        return Err("stream ended without [DONE]".into());
    }
    if stream && text.contains("\"error\"") {
        return Err(format!("stream error {}", error_code(&text)));
    }
    Ok(())
}

fn client_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "client timeout (300 s)".into()
    } else {
        format!("client error: {e}")
    }
}

/// The OpenAI error body's `code` (or `type`) in `text`, wherever the error object sits.
fn error_code(text: &str) -> String {
    let json = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or(Some(l)))
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("error")
                .cloned()
        });
    json.and_then(|e| {
        e.get("code")
            .and_then(|c| c.as_str())
            .or_else(|| e.get("type").and_then(|t| t.as_str()))
            .map(str::to_string)
    })
    .unwrap_or_else(|| "(no error body)".into())
}

/// Runs `count` requests of the mix, `concurrency` at a time: how many were answered, and
/// the failures counted by reason.
pub(super) async fn drive(
    base: &str,
    model: &str,
    count: usize,
    concurrency: usize,
    offset: usize,
    max_tokens: impl Fn(usize) -> u32,
) -> (usize, BTreeMap<String, usize>) {
    let client = reqwest::Client::new();
    let max_tokens = &max_tokens;
    let results: Vec<Result<(), String>> = futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            async move { request(&client, base, model, offset + i, max_tokens(i)).await }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut failures = BTreeMap::new();
    for reason in results.iter().filter_map(|r| r.as_ref().err()) {
        *failures.entry(reason.clone()).or_insert(0) += 1;
    }
    (count - failures.values().sum::<usize>(), failures)
}
