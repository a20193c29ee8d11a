//! The end-to-end path on the real model: OpenAI API → coordinator → agents → llama.cpp.

mod common;

use std::time::Duration;

use common::{chat_stream_text, greedy_chat, metric, sse_events, Fleet, KEY, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};
use tokenfleet_agent::VehicleStatus;

const STORY: &str = "Write a long essay about the history of electric cars.";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_stream_and_non_stream_agree_with_correct_usage() {
    let fleet = Fleet::start(2).await;
    assert_eq!(fleet.models().await, vec![MODEL.to_string()]);
    let resp = fleet
        .post(
            "/v1/chat/completions",
            greedy_chat("Explain why the sky is blue.", 40, false),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-tokenfleet-job-id"));
    let body: Value = resp.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("sky"), "{text}");
    assert_eq!(body["object"], "chat.completion");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 40);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 20);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 40
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let resp = fleet
        .post(
            "/v1/chat/completions",
            greedy_chat("Explain why the sky is blue.", 40, true),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp, Duration::from_secs(60)).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(chat_stream_text(&events), text);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 40);
    assert_eq!(usage["choices"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_endpoint_works() {
    let fleet = Fleet::start(1).await;
    let resp = fleet
        .post("/v1/completions", json!({"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(body["usage"]["completion_tokens"], 12);
    // The agent reported the job's compute energy in JobDone (estimated from its power model
    // here, or measured where RAPL is readable); plugged in, so all of it is grid energy.
    let metrics = fleet.metrics().await;
    let joules = |source: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("tokenfleet_job_energy_joules_total{"))
            .filter(|l| l.contains(&format!("source=\"{source}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(joules("grid") > 0.0, "{metrics}");
    assert_eq!(joules("battery"), 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn departure_mid_stream_is_invisible_to_the_client() {
    let mut fleet = Fleet::start(2).await;
    // The uninterrupted answer.
    let reference: Value = fleet
        .post("/v1/chat/completions", greedy_chat(STORY, 128, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reference_text = reference["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let reference_tokens = reference["usage"]["completion_tokens"].as_u64().unwrap();

    let resp = fleet
        .post("/v1/chat/completions", greedy_chat(STORY, 128, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut raw = String::new();
    let mut departed = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        let so_far: Vec<String> = raw
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect();
        if departed.is_none() && chat_stream_text(&so_far).len() >= 120 {
            // About 30 tokens in: the driver of the vehicle running it comes back.
            let busy = fleet
                .agents
                .iter()
                .position(|a| a.engine.stats().slots_busy > 0)
                .expect("one agent runs the job");
            fleet.agents[busy]
                .agent
                .as_ref()
                .unwrap()
                .status()
                .send_replace(VehicleStatus::departing("departure: driver returned"));
            departed = Some(busy);
        }
        if raw.contains("data: [DONE]") {
            break;
        }
    }
    assert!(departed.is_some(), "the stream ended before 30 tokens");
    let events: Vec<String> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect();
    assert_eq!(
        chat_stream_text(&events),
        reference_text,
        "the continued stream must equal the uninterrupted answer"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["completion_tokens"].as_u64().unwrap(),
        reference_tokens
    );
    let metrics = fleet.metrics().await;
    // At least one resume after the departure (a loaded machine may add a lease expiry).
    assert!(
        metric(&metrics, "tokenfleet_resumes_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "tokenfleet_evictions_total{reason=\"departure\"}") >= 1.0,
        "{metrics}"
    );
    fleet.agents[departed.unwrap()].agent.take();
}

/// The value of one Prometheus sample (0 when absent).
fn assert_openai_error(body: &Value) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_openai_errors_and_the_fleet_keeps_serving() {
    let fleet = Fleet::start(1).await;
    let url = format!("{}/v1/chat/completions", fleet.http);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (fleet.client.post(&url).bearer_auth(KEY).header("content-type", "application/json").body("{not json"), 400, "malformed JSON"),
        (fleet.post("/v1/chat/completions", json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})), 404, "unknown model"),
        (fleet.client.post(&url).bearer_auth("wrong-key-wrong-key").json(&greedy_chat("hi", 4, false)), 401, "wrong key"),
        (fleet.client.post(&url).json(&greedy_chat("hi", 4, false)), 401, "missing key"),
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "hi"}]})), 400, "n > 1"),
        (fleet.client.post(&url).bearer_auth(KEY).header("content-type", "application/json").body(format!("{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(100_000))), 413, "oversized body"),
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "word ".repeat(1500)}]})), 400, "prompt over context"),
    ];
    for (req, status, what) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
        assert_openai_error(&body);
        if what == "prompt over context" {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("context"),
                "{body}"
            );
        }
    }
    // Still serving.
    let resp = fleet
        .post("/v1/chat/completions", greedy_chat("Say hi.", 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnecting_stream_client_cancels_its_job_on_the_agent() {
    let fleet = Fleet::start(1).await;
    let resp = fleet
        .post("/v1/chat/completions", greedy_chat(STORY, 900, true))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(60), body.next())
        .await
        .unwrap();
    assert!(first.is_some());
    let engine = fleet.agents[0].engine.clone();
    let mut stats = engine.watch_stats();
    tokio::time::timeout(
        Duration::from_secs(10),
        stats.wait_for(|s| s.slots_busy == 1),
    )
    .await
    .expect("the job runs on the agent")
    .unwrap();
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while engine.stats().slots_busy != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot not freed: {:?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        engine.stats().tokens_generated < 900,
        "the job ran to the end"
    );
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains("tokenfleet_jobs_finished_total{outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
}
