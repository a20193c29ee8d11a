//! `tokenfleet bench e2e --with-batch`: what a running batch costs interactive users. The same
//! sequential streaming client measures TTFT on an idle vehicle, then while a batch keeps
//! every slot busy (interactive requests preempt batch jobs, which resume later from their
//! tokens). Prints both medians and their ratio (the target: at most 2).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::e2e::{E2eArgs, OursFleet, PROMPT};
use super::median;
use super::reference;

#[derive(Debug, Serialize)]
pub struct BatchE2eReport {
    pub model: String,
    pub threads: u32,
    pub ttft_p50_ms_alone: f64,
    pub ttft_p50_ms_with_batch: f64,
    pub ratio: f64,
    pub batch_requests: usize,
    /// Batch requests completed while the interactive client was measured.
    pub batch_completed_during: u64,
    pub preemptions: f64,
}

async fn batch_status(
    client: &reqwest::Client,
    fleet: &OursFleet,
    id: &str,
) -> anyhow::Result<Value> {
    Ok(client
        .get(format!("{}/v1/batches/{id}", fleet.base))
        .bearer_auth(fleet.key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn start_batch(
    client: &reqwest::Client,
    fleet: &OursFleet,
    model: &str,
    n: usize,
    n_gen: u32,
) -> anyhow::Result<String> {
    let lines: Vec<(String, Value)> = (0..n)
        .map(|i| {
            (
                format!("bench-{i}"),
                json!({"model": model, "max_tokens": n_gen, "temperature": 0,
                       "tokenfleet": {"ignore_eos": true},
                       "messages": [{"role": "user", "content": PROMPT}]}),
            )
        })
        .collect();
    let id = super::chaos::client::submit_batch(client, &fleet.base, fleet.key, &lines).await?;
    // Wait until the batch has filled the vehicle (in progress, nothing finished yet is fine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let b = batch_status(client, fleet, &id).await?;
        if b["status"] == "in_progress" {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the batch did not start: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(id)
}

fn preemptions(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("tokenfleet_evictions_total{reason=\"preempted\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

pub async fn run(
    args: &E2eArgs,
    model_path: &Path,
    model: &str,
    threads: u32,
) -> anyhow::Result<()> {
    let fleet = OursFleet::start(model_path, model, threads).await?;
    let client = reqwest::Client::new();
    let key = Some(fleet.key);
    // Warm-up, then the idle vehicle.
    reference::drive_openai_streams(&fleet.base, key, model, PROMPT, 1, 1, 8).await?;
    let alone = reference::drive_openai_streams(
        &fleet.base,
        key,
        model,
        PROMPT,
        1,
        args.requests,
        args.n_gen,
    )
    .await
    .context("interactive TTFT alone")?;
    let id = start_batch(&client, &fleet, model, args.batch_requests, args.n_gen).await?;
    let before = batch_status(&client, &fleet, &id).await?;
    let with_batch = reference::drive_openai_streams(
        &fleet.base,
        key,
        model,
        PROMPT,
        1,
        args.requests,
        args.n_gen,
    )
    .await
    .context("interactive TTFT with a batch")?;
    let after = batch_status(&client, &fleet, &id).await?;
    ensure!(
        after["status"] == "in_progress",
        "the batch ended during the measurement ({}); raise --batch-requests",
        after["status"]
    );
    let metrics = client
        .get(format!("{}/metrics", fleet.base))
        .bearer_auth(super::e2e::OPERATOR_KEY)
        .send()
        .await?
        .text()
        .await?;
    client
        .post(format!("{}/v1/batches/{id}/cancel", fleet.base))
        .bearer_auth(fleet.key)
        .send()
        .await?
        .error_for_status()?;
    fleet.stop().await;
    let completed = |b: &Value| b["request_counts"]["completed"].as_u64().unwrap_or(0);
    let report = BatchE2eReport {
        model: model_path.display().to_string(),
        threads,
        ttft_p50_ms_alone: median(&alone.ttft_ms),
        ttft_p50_ms_with_batch: median(&with_batch.ttft_ms),
        ratio: median(&with_batch.ttft_ms) / median(&alone.ttft_ms),
        batch_requests: args.batch_requests,
        batch_completed_during: completed(&after).saturating_sub(completed(&before)),
        preemptions: preemptions(&metrics),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {}  threads {}  one vehicle, 8 slots; batch of {} requests x {} tokens",
            report.model, threads, report.batch_requests, args.n_gen
        );
        println!(
            "{:<44} {:>10.1}",
            "interactive TTFT p50 ms, idle vehicle", report.ttft_p50_ms_alone
        );
        println!(
            "{:<44} {:>10.1}",
            "interactive TTFT p50 ms, batch running", report.ttft_p50_ms_with_batch
        );
        println!("{:<44} {:>10.3}  (target <= 2)", "ratio", report.ratio);
        println!(
            "{:<44} {:>10}",
            "batch requests completed meanwhile", report.batch_completed_during
        );
        println!(
            "{:<44} {:>10}",
            "batch jobs preempted (handed back)", report.preemptions
        );
    }
    Ok(())
}
