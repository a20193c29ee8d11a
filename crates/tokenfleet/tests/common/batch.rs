//! The Batch API from a client's side: JSONL inputs of greedy chat lines, upload, create,
//! poll until ended, and the output and error files checked (each `custom_id` exactly once).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{KEY, MODEL};

pub const TOPICS: [&str; 10] = [
    "the moon",
    "bicycles",
    "rain",
    "volcanoes",
    "bread",
    "trains",
    "owls",
    "music",
    "glass",
    "rivers",
];

/// The greedy chat request of line `i`: one sentence about `TOPICS[i % 10]`.
pub fn line_body(i: usize, max_tokens: u32) -> Value {
    json!({"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": format!("Write one sentence about {}.", TOPICS[i % TOPICS.len()])}]})
}

/// A JSONL input of `n` chat requests `req-0 … req-{n-1}`.
pub fn input(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": line_body(i, max_tokens)})
            .to_string()
                + "\n"
        })
        .collect()
}

pub async fn upload(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    content: &str,
) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content.as_bytes().to_vec()).file_name("input.jsonl"),
        );
    client
        .post(format!("{base}/v1/files"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

pub async fn create_batch(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    file: &str,
    window: &str,
) -> reqwest::Response {
    client
        .post(format!("{base}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": window}))
        .send()
        .await
        .unwrap()
}

/// Uploads `content` and starts a batch on it; returns the batch id.
pub async fn start_batch(
    client: &reqwest::Client,
    base: &str,
    content: &str,
    window: &str,
) -> String {
    let file = upload(client, base, KEY, content).await;
    assert_eq!(file.status(), 200);
    let file: Value = file.json().await.unwrap();
    let batch = create_batch(client, base, KEY, file["id"].as_str().unwrap(), window).await;
    assert_eq!(batch.status(), 200);
    let batch: Value = batch.json().await.unwrap();
    assert_eq!(batch["status"], "validating");
    batch["id"].as_str().unwrap().to_string()
}

pub async fn get_json(client: &reqwest::Client, url: String, key: &str) -> (u16, Value) {
    let resp = client.get(url).bearer_auth(key).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub async fn batch(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let (status, v) = get_json(client, format!("{base}/v1/batches/{id}"), KEY).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Polls the batch until `until` holds (bounded: a hang guard, not a timing assertion).
pub async fn wait_batch(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let b = batch(client, base, id).await;
        if until(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "batch stuck: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn ended(b: &Value) -> bool {
    matches!(
        b["status"].as_str(),
        Some("completed" | "failed" | "expired" | "cancelled")
    )
}

/// The lines of a file's content (empty for no file).
pub async fn file_lines(client: &reqwest::Client, base: &str, id: &Value) -> Vec<Value> {
    let Some(id) = id.as_str() else {
        return Vec::new();
    };
    let resp = client
        .get(format!("{base}/v1/files/{id}/content"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Output and error lines of an ended batch, checked: each of `n` custom ids exactly once
/// across both files, counts matching. Returns (output lines by custom id, error lines).
pub async fn results(
    client: &reqwest::Client,
    base: &str,
    b: &Value,
    n: usize,
) -> (HashMap<String, Value>, Vec<Value>) {
    let output = file_lines(client, base, &b["output_file_id"]).await;
    let errors = file_lines(client, base, &b["error_file_id"]).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for l in output.iter().chain(&errors) {
        *seen
            .entry(l["custom_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for i in 0..n {
        assert_eq!(seen.get(&format!("req-{i}")), Some(&1), "req-{i} in {b}");
    }
    assert_eq!(seen.len(), n);
    assert_eq!(b["request_counts"]["total"], n);
    assert_eq!(b["request_counts"]["completed"], output.len());
    assert_eq!(b["request_counts"]["failed"], errors.len());
    let mut by_id = HashMap::new();
    for l in output {
        assert_eq!(l["response"]["status_code"], 200, "{l}");
        assert!(l["error"].is_null());
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{l}");
        by_id.insert(l["custom_id"].as_str().unwrap().to_string(), l);
    }
    (by_id, errors)
}
