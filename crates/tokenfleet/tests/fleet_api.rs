//! The end-to-end path on the real model: OpenAI API → coordinator → agents → llama.cpp.

mod common;

use std::time::Duration;

use common::{chat_stream_text, greedy_chat, metric, model_path, sse_events, Fleet, KEY, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};
use tokenfleet_agent::VehicleStatus;
use tokenfleet_coordinator::config::policy::RegionConfig;
use tokenfleet_coordinator::config::verification::VerificationConfig;

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
    // The coordinator counts prompt tokens with its trusted copy of the model (verification
    // on), so it refuses a prompt over the vehicles' context itself: a vehicle's refusal is
    // never shown to a client.
    let fleet = Fleet::start_with(1, 4, |c, _| {
        c.verification = VerificationConfig {
            enabled: true,
            models: vec![model_path()],
            ..Default::default()
        };
    })
    .await;
    let url = format!("{}/v1/chat/completions", fleet.http);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (fleet.client.post(&url).bearer_auth(KEY).header("content-type", "application/json").body("{not json"), 400, "malformed JSON"),
        (fleet.post("/v1/chat/completions", json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})), 404, "unknown model"),
        (fleet.client.post(&url).bearer_auth("wrong-key-wrong-key").json(&greedy_chat("hi", 4, false)), 401, "wrong key"),
        (fleet.client.post(&url).json(&greedy_chat("hi", 4, false)), 401, "missing key"),
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "hi"}]})), 400, "n > 1"),
        (fleet.client.post(&url).bearer_auth(KEY).header("content-type", "application/json").body(format!("{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(100_000))), 413, "oversized body"),
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "max_tokens": 1000, "messages": [{"role": "user", "content": "word ".repeat(1500)}]})), 400, "prompt over context"),
        // The README says tools and structured output are refused, not silently ignored.
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})), 400, "tools"),
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}})), 400, "response_format"),
        // Issue 13, hole 15: stop strings are bounded in count and length.
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "stop": ["a", "b", "c", "d", "e"]})), 400, "stop"),
        (fleet.post("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "stop": ["x".repeat(300)]})), 400, "stop"),
    ];
    for (req, status, what) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
        assert_openai_error(&body);
        if matches!(what, "tools" | "response_format" | "stop") {
            assert_eq!(body["error"]["param"], what, "{body}");
        }
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

/// Issue 13, hole 9: a chat request with `"tokenfleet": {"class": "batch"}` counts against
/// `max_queued_jobs`, is cancelled when its client goes away, and without a deadline of its
/// own ends at `http_batch_deadline`. Before, it escaped the cap, ran on after its client left
/// and could wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_class_request_is_capped_cancelled_on_disconnect_and_has_a_deadline() {
    // The one vehicle reports no position, so it is in no region: an "EU" request queues.
    let fleet = Fleet::start_with(1, 1, |c, _| {
        c.regions = vec![RegionConfig {
            name: "EU".into(),
            polygon: vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]],
            ..Default::default()
        }];
        c.max_queued_jobs = 1;
        c.http_batch_deadline = Duration::from_secs(2);
    })
    .await;
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let batch_class = |deadline: Option<u64>| {
        let mut b = greedy_chat("Hi", 4, false);
        b["tokenfleet"] = json!({"class": "batch", "residency": ["EU"], "deadline": deadline});
        b
    };
    let queued = "tokenfleet_queue_depth{class=\"batch\"}";
    let wait_queued = |n: f64| {
        let fleet = &fleet;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while metric(&fleet.metrics().await, queued) != n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "queue never held {n}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = tokio::spawn(
        fleet
            .post("/v1/chat/completions", batch_class(Some(far)))
            .timeout(Duration::from_secs(120))
            .send(),
    );
    wait_queued(1.0).await;
    // The cap holds for batch-class requests too.
    let resp = fleet
        .post("/v1/chat/completions", batch_class(Some(far)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    // Its client goes away: the job is cancelled (its own deadline is 10 minutes off).
    first.abort();
    wait_queued(0.0).await;
    let metrics = fleet.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tokenfleet_jobs_finished_total{outcome=\"cancelled\"}"
        ),
        1.0,
        "{metrics}"
    );
    // Without a deadline of its own it fails at the default one (2 s here) with a 503.
    let resp = fleet
        .post("/v1/chat/completions", batch_class(None))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{body}"
    );
}

/// Issue 13, hole 15: an Idempotency-Key sent again with the same request (in any key order
/// or layout) follows the first job; with a different body it is a 422, not the first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_reused_with_another_body_is_a_422() {
    let fleet = Fleet::start(1).await;
    let url = format!("{}/v1/chat/completions", fleet.http);
    let send = |body: String| {
        fleet
            .client
            .post(&url)
            .bearer_auth(KEY)
            .header("Idempotency-Key", "order-42")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first = greedy_chat("Say hi.", 4, false);
    let resp = send(first.to_string()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let job = resp.headers()["x-tokenfleet-job-id"].clone();
    let answer: Value = resp.json().await.unwrap();
    // The same request, keys reordered and spaced out: the same job's answer.
    let mut fields: Vec<(String, Value)> = first.as_object().unwrap().clone().into_iter().collect();
    fields.reverse();
    let reordered = format!(
        "{{ {} }}",
        fields
            .iter()
            .map(|(k, v)| format!("{k:?} : {v}"))
            .collect::<Vec<_>>()
            .join(",\n ")
    );
    let resp = send(reordered).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tokenfleet-job-id"], job);
    let again: Value = resp.json().await.unwrap();
    assert_eq!(again["choices"], answer["choices"]);
    // Another body under the same key.
    let resp = send(greedy_chat("Say bye.", 4, false).to_string())
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "idempotency_key_reused", "{err}");
    assert_eq!(err["error"]["param"], "Idempotency-Key", "{err}");
}
