//! Crashes on the real model: a coordinator killed with SIGKILL mid-work loses no accepted job
//! and runs none to completion twice; an agent killed with SIGKILL mid-job has its job finished
//! by another agent.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::batch::TOPICS;
use common::process::{wait_models, KillableFleet, Proc, BIN};
use common::{
    chat_stream_text, greedy_chat, metric, metrics_text, model_path, received_until_cut,
    sse_events, start_agent, Fleet, KEY,
};
use futures::StreamExt;
use serde_json::Value;

fn job_rows(db: &Path) -> Vec<(String, String, i64)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT j.idempotency_key, j.state, (SELECT count(*) FROM job_outputs t WHERE t.job_id = j.id) FROM jobs j ORDER BY j.id")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?.unwrap_or_default(),
            r.get(1)?,
            r.get(2)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// [`job_rows`] once `n` jobs are stored and all done, or after 30 s (then as they are).
async fn rows_once_all_done(db: &Path, n: usize) -> Vec<(String, String, i64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = job_rows(db);
        let done = rows.len() == n && rows.iter().all(|(_, state, _)| state == "done");
        if done || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn prompt(i: usize) -> String {
    format!("Write two sentences about {}.", TOPICS[i % TOPICS.len()])
}

/// The text and `usage.completion_tokens` of a chat answer, streamed or not.
async fn answer(resp: reqwest::Response, stream: bool) -> (String, u64) {
    if stream {
        let events = sse_events(resp, Duration::from_secs(180)).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let usage = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find_map(|v| v["usage"]["completion_tokens"].as_u64());
        (
            chat_stream_text(&events),
            usage.expect("usage in the stream"),
        )
    } else {
        let v: Value = resp.json().await.unwrap();
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            v["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    }
}

/// Assigns the coordinator has sent since it started (each one observes the dispatch latency).
async fn assigns_sent(client: &reqwest::Client, base: &str) -> f64 {
    let text = metrics_text(client, base).await;
    metric(&text, "tokenfleet_dispatch_latency_seconds_count")
}

/// Fault-free answers to `greedy_chat(prompt(i), max_tokens, false)` for the ten prompts,
/// without Idempotency-Key, all at once (greedy answers do not depend on batch composition:
/// engine/tests/batching.rs).
async fn reference_answers(
    client: &reqwest::Client,
    base: &str,
    max_tokens: u32,
) -> Vec<(String, u64)> {
    let requests = (0..10).map(|i| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&greedy_chat(&prompt(i), max_tokens, false))
            .timeout(Duration::from_secs(180))
            .send()
    });
    let mut out = Vec::new();
    for resp in futures::future::join_all(requests).await {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 200);
        out.push(answer(resp, false).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_sigkill_loses_no_accepted_job_and_finishes_none_twice() {
    let mut fleet = KillableFleet::start(4).await;
    let (db, base, client) = (fleet.db.clone(), fleet.base.clone(), fleet.client.clone());

    // 20 jobs, half streaming, each with an Idempotency-Key; 8 slots, so some queue.
    let mut inflight = Vec::new();
    for i in 0..20 {
        let body = greedy_chat(&prompt(i), 48, i % 2 == 0);
        let req = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", format!("job-{i}"))
            .json(&body);
        let stream = i % 2 == 0;
        inflight.push(tokio::spawn(async move {
            match req.send().await {
                Ok(r) if stream && r.status() == 200 => Some(received_until_cut(r).await),
                _ => None,
            }
        }));
    }
    // Kill once all 20 are stored (accepted) and some tokens exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = job_rows(&db);
        if rows.len() == 20 && rows.iter().any(|r| r.2 > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "jobs not accepted: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.kill_coordinator();
    let before = job_rows(&db);
    let mut received = Vec::new();
    for t in inflight {
        received.push(t.await.unwrap());
    }
    let unfinished = before.iter().filter(|r| r.1 != "done").count();
    println!(
        "at SIGKILL: {} jobs stored, {} done, {} with tokens; {} streaming clients had {} characters",
        before.len(),
        before.len() - unfinished,
        before.iter().filter(|r| r.2 > 0).count(),
        received.iter().flatten().count(),
        received.iter().flatten().map(String::len).sum::<usize>(),
    );

    // Restart on the same store and ports; agents reconnect by themselves.
    fleet.restart_coordinator().await;
    wait_models(&client, &base).await;
    let mut answers = Vec::new();
    for i in 0..20 {
        let body = greedy_chat(&prompt(i), 48, i % 2 == 0);
        let resp = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", format!("job-{i}"))
            .json(&body)
            .timeout(Duration::from_secs(180))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "job-{i}");
        let (text, tokens) = answer(resp, i % 2 == 0).await;
        assert!(!text.is_empty(), "job-{i}");
        answers.push((text, tokens));
    }
    // Exactly 20 jobs, all done once: no duplicate row, each job's tokens stored once. A job's
    // outcome is written after its answer (the store queues it behind the answer; an outcome
    // lost to a crash means a re-run from the stored tokens), so the last one may still be on
    // its way: wait for it, a bounded while.
    let rows = rows_once_all_done(&db, 20).await;
    assert_eq!(rows.len(), 20, "{rows:?}");
    for (key, state, tokens) in &rows {
        assert_eq!(state, "done", "{key}");
        assert!(*tokens > 0 && *tokens <= 48, "{key}: {tokens} tokens");
    }
    // None ran twice: the restarted coordinator sent at most one Assign per job the store did
    // not hold as done (a job finished before the kill and run again, or a job started twice,
    // would need more).
    let assigns = assigns_sent(&client, &base).await;
    println!("{assigns} Assigns after the restart for {unfinished} unfinished jobs");
    assert!(
        assigns <= unfinished as f64,
        "{assigns} Assigns for {unfinished} unfinished jobs"
    );
    // Every answer, resumed or not, is the fault-free greedy answer: no token duplicated, lost
    // or changed across the kill (job_outputs keeps one row per index, so only the answers can
    // show a duplicate), with the same token count.
    let reference = reference_answers(&client, &base, 48).await;
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got, &reference[i % 10], "job-{i}");
    }
    // What streaming clients received before the kill is the start of that same answer.
    for (i, part) in received.iter().enumerate() {
        if let Some(part) = part {
            assert!(
                answers[i].0.starts_with(part.as_str()),
                "job-{i}: {part:?} then {:?}",
                answers[i].0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_sigkill_mid_job_finishes_on_another_agent() {
    let mut fleet = Fleet::start(0).await;
    let grpc = fleet.grpc.clone();
    let victim = Proc(
        Command::new(BIN)
            .args([
                "agent",
                "--coordinator",
                &format!("http://{grpc}"),
                "--node-id",
                "doomed",
                "--slots",
                "2",
                "--ctx",
                "1024",
                "--threads",
                "1",
            ])
            .arg("--model")
            .arg(model_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    fleet.wait_for_nodes(1).await;
    let reference_prompt = "Write a long essay about the history of electric cars.";
    let resp = fleet
        .post(
            "/v1/chat/completions",
            greedy_chat(reference_prompt, 96, true),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut raw = String::new();
    let mut killed_at = None;
    let mut victim = Some(victim);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        let events: Vec<String> = raw
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect();
        if killed_at.is_none() && chat_stream_text(&events).len() >= 60 {
            drop(victim.take()); // SIGKILL
            killed_at = Some(Instant::now());
            fleet.agents.push(start_agent(&grpc, "rescuer", 2).await);
        }
        if raw.contains("data: [DONE]") {
            break;
        }
    }
    let killed_at = killed_at.expect("stream ended before the kill");
    println!(
        "finished {:.1} s after the SIGKILL (lease timeout 1.5 s)",
        killed_at.elapsed().as_secs_f64()
    );
    let events: Vec<String> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect();
    let text = chat_stream_text(&events);
    let reference: Value = fleet
        .post(
            "/v1/chat/completions",
            greedy_chat(reference_prompt, 96, false),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        text,
        reference["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains("tokenfleet_lease_expiries_total 1"),
        "{metrics}"
    );
}
