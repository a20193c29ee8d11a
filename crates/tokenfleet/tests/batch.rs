//! The Batch API on the real model: a batch through two agents with departures and interactive
//! preemption, a coordinator SIGKILL mid-batch, cancel mid-batch, an expiring window, bad
//! input, and tenant isolation. Every batch's output and error files together answer each
//! `custom_id` exactly once.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::batch::{
    create_batch, ended, get_json, input, line_body, results, start_batch, upload, wait_batch,
    TOPICS,
};
use common::process::{wait_models, KillableFleet};
use common::{greedy_chat, metric, metrics_text, start_agent, Fleet, KEY, MODEL, OTHER_KEY};
use serde_json::{json, Value};
use tokenfleet_agent::VehicleStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_runs_through_two_agents_across_departures_and_interactive_preemption() {
    const N: usize = 60;
    let mut fleet = Fleet::start_with(2, 2, |_, _| {}).await;
    let (client, base) = (fleet.client.clone(), fleet.http.clone());
    let id = start_batch(&client, &base, &input(N, 12), "24h").await;
    // Departures once work is under way: vehicle-1 leaves and comes back, vehicle-2 leaves
    // for good and a third vehicle arrives.
    wait_batch(&client, &base, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(5)
    })
    .await;
    let status = |i: usize| fleet.agents[i].agent.as_ref().unwrap().status().clone();
    status(0).send_replace(VehicleStatus::departing("departure: driver returned"));
    // Interactive work while the batch fills every slot left: it preempts batch jobs (three
    // requests for two busy slots, so at least one cannot take a slot a batch job just left).
    let interactive = futures::future::join_all((0..3).map(|i| {
        fleet
            .post(
                "/v1/chat/completions",
                greedy_chat(&format!("Say hello {i}."), 8, false),
            )
            .send()
    }))
    .await;
    for r in interactive {
        assert_eq!(r.unwrap().status(), 200);
    }
    status(0).send_replace(VehicleStatus::parked());
    wait_batch(&client, &base, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(25)
    })
    .await;
    status(1).send_replace(VehicleStatus::departing("departure: driver returned"));
    fleet
        .agents
        .push(start_agent(&fleet.grpc, "vehicle-3", 2).await);
    let b = wait_batch(&client, &base, &id, ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    for stamp in [
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
    ] {
        assert!(b[stamp].as_u64().is_some(), "{stamp} in {b}");
    }
    let (output, errors) = results(&client, &base, &b, N).await;
    assert_eq!(output.len(), N, "errors: {errors:?}");
    // Greedy answers equal the same request answered interactively.
    let line = &output["req-3"];
    let direct: Value = fleet
        .post("/v1/chat/completions", line_body(3, 12))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        line["response"]["body"]["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
    let metrics = fleet.metrics().await;
    assert!(
        metric(&metrics, "tokenfleet_evictions_total{reason=\"departure\"}") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "tokenfleet_evictions_total{reason=\"preempted\"}") >= 1.0,
        "{metrics}"
    );
}

fn batch_job_states(db: &Path) -> Vec<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT j.state FROM batch_requests b JOIN jobs j ON j.id = b.job_id ORDER BY b.line",
        )
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_sigkill_mid_batch_then_restart_answers_each_custom_id_once() {
    const N: usize = 40;
    let mut fleet = KillableFleet::start(2).await;
    let (db, base, client) = (fleet.db.clone(), fleet.base.clone(), fleet.client.clone());
    wait_models(&client, &base).await;
    let id = start_batch(&client, &base, &input(N, 24), "24h").await;
    // SIGKILL once some requests are done and others are not.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let states = batch_job_states(&db);
        let done = states.iter().filter(|s| *s == "done").count();
        if (5..N).contains(&done) {
            break;
        }
        assert!(done < N, "the batch finished before the kill");
        assert!(Instant::now() < deadline, "no progress: {states:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.kill_coordinator();
    let at_kill = batch_job_states(&db);
    // Lines without a job yet count as unfinished too.
    let unfinished = N - at_kill.iter().filter(|s| *s == "done").count();
    println!("at SIGKILL: {} of {N} done", N - unfinished);
    fleet.restart_coordinator().await;
    let b = wait_batch(&client, &base, &id, ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (output, _) = results(&client, &base, &b, N).await;
    assert_eq!(output.len(), N);
    // One job per line, every job done once.
    let states = batch_job_states(&db);
    assert_eq!(states.len(), N);
    assert!(states.iter().all(|s| s == "done"), "{states:?}");
    // None started twice: the restarted coordinator sent at most one Assign per line the store
    // did not hold as done (each Assign observes the dispatch latency).
    let metrics = metrics_text(&client, &base).await;
    let assigns = metric(&metrics, "tokenfleet_dispatch_latency_seconds_count");
    println!("{assigns} Assigns after the restart for {unfinished} unfinished lines");
    assert!(
        assigns <= unfinished as f64,
        "{assigns} Assigns for {unfinished} unfinished lines"
    );
    // And every line's answer is the fault-free greedy one, token count included: nothing
    // duplicated or lost across the kill (the store keeps one row per token index, so only the
    // answers can show it).
    for topic in 0..TOPICS.len() {
        let direct: Value = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&line_body(topic, 24))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for i in (topic..N).step_by(TOPICS.len()) {
            let body = &output[&format!("req-{i}")]["response"]["body"];
            let (got, want) = (
                &body["choices"][0]["message"],
                &direct["choices"][0]["message"],
            );
            assert_eq!(got["content"], want["content"], "req-{i}");
            assert_eq!(
                body["usage"]["completion_tokens"], direct["usage"]["completion_tokens"],
                "req-{i}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_mid_batch_keeps_completed_lines_and_starts_no_new_work() {
    const N: usize = 30;
    let fleet = Fleet::start_with(1, 2, |_, _| {}).await;
    let (client, base) = (fleet.client.clone(), fleet.http.clone());
    let id = start_batch(&client, &base, &input(N, 24), "24h").await;
    wait_batch(&client, &base, &id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(3)
    })
    .await;
    let resp = client
        .post(format!("{base}/v1/batches/{id}/cancel"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cancelling: Value = resp.json().await.unwrap();
    assert_eq!(cancelling["status"], "cancelling", "{cancelling}");
    assert!(cancelling["cancelling_at"].as_u64().is_some());
    let b = wait_batch(&client, &base, &id, ended).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    let (output, errors) = results(&client, &base, &b, N).await;
    assert!(
        output.len() >= 3 && output.len() < N,
        "{} completed",
        output.len()
    );
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "batch_cancelled"),
        "{errors:?}"
    );
    // No new work: nothing of the batch is queued, and nothing finishes after the end.
    let finished = metric(
        &fleet.metrics().await,
        "tokenfleet_jobs_finished_total{outcome=\"done\"}",
    );
    let states = batch_job_states(&fleet.db);
    assert!(
        states.iter().all(|s| s == "done" || s == "cancelled"),
        "{states:?}"
    );
    assert_eq!(states.iter().filter(|s| *s == "done").count(), output.len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metric(
            &fleet.metrics().await,
            "tokenfleet_jobs_finished_total{outcome=\"done\"}"
        ),
        finished
    );
    // Cancelling an ended batch is refused.
    let again = client
        .post(format!("{base}/v1/batches/{id}/cancel"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        200,
        "cancel is idempotent on a cancelled batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_batch_reports_what_completed() {
    const N: usize = 12;
    let fleet = Fleet::start_with(1, 1, |c, _| {
        c.batch_completion_windows = vec!["24h".into(), "4s".into()]
    })
    .await;
    let (client, base) = (fleet.client.clone(), fleet.http.clone());
    // Long answers on one slot: far more work than four seconds hold.
    let content: String = (0..N)
        .map(|i| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": MODEL, "max_tokens": 400, "temperature": 0,
                            "tokenfleet": {"ignore_eos": true},
                            "messages": [{"role": "user", "content": "Tell a long story."}]}})
            .to_string()
                + "\n"
        })
        .collect();
    let id = start_batch(&client, &base, &content, "4s").await;
    let b = wait_batch(&client, &base, &id, ended).await;
    assert_eq!(b["status"], "expired", "{b}");
    assert!(b["expired_at"].as_u64().is_some());
    let (output, errors) = results(&client, &base, &b, N).await;
    assert!(output.len() < N);
    assert!(
        errors.iter().all(|e| e["error"]["code"] == "batch_expired"),
        "{errors:?}"
    );
}

fn row_counts(db: &Path) -> Vec<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    ["files", "batches", "batch_requests", "jobs"]
        .iter()
        .map(|t| {
            conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                .unwrap()
        })
        .collect()
}

fn assert_error(status: u16, v: &Value, want_status: u16, code: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    if let Some(code) = code {
        assert_eq!(v["error"]["code"], code, "{v}");
    }
}

async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_without_changing_the_store_and_tenants_are_isolated() {
    // No agent: nothing here needs the model (a line for a model no vehicle serves is an
    // error-file entry).
    let fleet = Fleet::start_with(0, 1, |c, _| c.max_file_bytes = 4096).await;
    let (client, base) = (fleet.client.clone(), fleet.http.clone());
    let good = input(2, 4);
    let file: Value = upload(&client, &base, KEY, &good)
        .await
        .json()
        .await
        .unwrap();
    let file_id = file["id"].as_str().unwrap().to_string();
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["bytes"], good.len());
    let before = row_counts(&fleet.db);

    let invalid_json = format!("{good}{{\"custom_id\": \"x\",\n");
    let (s, v) = status_json(upload(&client, &base, KEY, &invalid_json).await).await;
    assert_error(s, &v, 400, Some("invalid_json_line"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 3:"),
        "{v}"
    );
    let duplicate = format!("{good}{}", input(1, 4));
    let (s, v) = status_json(upload(&client, &base, KEY, &duplicate).await).await;
    assert_error(s, &v, 400, Some("duplicate_custom_id"));
    let oversized = input(40, 4);
    assert!(oversized.len() > 4096);
    let (s, v) = status_json(upload(&client, &base, KEY, &oversized).await).await;
    assert_error(s, &v, 413, Some("file_too_large"));
    let (s, v) = status_json(create_batch(&client, &base, KEY, "file-missing", "24h").await).await;
    assert_error(s, &v, 404, None);
    let (s, v) = status_json(create_batch(&client, &base, OTHER_KEY, &file_id, "24h").await).await;
    assert_error(s, &v, 404, None);
    let (s, v) = status_json(create_batch(&client, &base, KEY, &file_id, "7d").await).await;
    assert_error(s, &v, 400, Some("unsupported_value"));
    assert_eq!(
        row_counts(&fleet.db),
        before,
        "a refused request changed the store"
    );

    // Lines that are well-formed JSONL but cannot run become error-file entries.
    let mut lines: Vec<Value> = good
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[0]["url"] = json!("/v1/embeddings");
    let content: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    let id = {
        let f: Value = upload(&client, &base, KEY, &content)
            .await
            .json()
            .await
            .unwrap();
        let b: Value = create_batch(&client, &base, KEY, f["id"].as_str().unwrap(), "24h")
            .await
            .json()
            .await
            .unwrap();
        b["id"].as_str().unwrap().to_string()
    };
    let b = wait_batch(&client, &base, &id, ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (output, errors) = results(&client, &base, &b, 2).await;
    assert!(output.is_empty());
    let codes: Vec<&str> = errors
        .iter()
        .map(|e| e["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["invalid_url", "model_not_found"]);

    // Another tenant sees none of it.
    for url in [
        format!("{base}/v1/files/{file_id}"),
        format!("{base}/v1/files/{file_id}/content"),
        format!("{base}/v1/batches/{id}"),
    ] {
        let (s, v) = get_json(&client, url, OTHER_KEY).await;
        assert_error(s, &v, 404, None);
    }
    for url in [format!("{base}/v1/batches/{id}/cancel")] {
        let (s, v) = status_json(
            client
                .post(url)
                .bearer_auth(OTHER_KEY)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(s, &v, 404, None);
    }
    let (s, v) = status_json(
        client
            .delete(format!("{base}/v1/files/{file_id}"))
            .bearer_auth(OTHER_KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(s, &v, 404, None);
    for list in ["files", "batches"] {
        let (s, v) = get_json(&client, format!("{base}/v1/{list}"), OTHER_KEY).await;
        assert_eq!(s, 200);
        assert_eq!(v["data"], json!([]), "{list}: {v}");
        let (_, mine) = get_json(&client, format!("{base}/v1/{list}"), KEY).await;
        assert!(!mine["data"].as_array().unwrap().is_empty(), "{list}");
    }
    // Pagination: newest first, `after` continues.
    let (_, page) = get_json(&client, format!("{base}/v1/files?limit=1"), KEY).await;
    assert_eq!(page["has_more"], true);
    let last = page["last_id"].as_str().unwrap();
    let (_, next) = get_json(
        &client,
        format!("{base}/v1/files?limit=1&after={last}"),
        KEY,
    )
    .await;
    assert_ne!(next["data"][0]["id"], page["data"][0]["id"]);
    // The owner deletes; then it is gone.
    let del: Value = client
        .delete(format!("{base}/v1/files/{file_id}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(del["deleted"], true);
    let (s, _) = get_json(&client, format!("{base}/v1/files/{file_id}"), KEY).await;
    assert_eq!(s, 404);
}

/// Polls `key`'s batch `id` until it has ended, for at most `limit` (a hang guard).
async fn wait_ended(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (status, b) = get_json(client, format!("{base}/v1/batches/{id}"), key).await;
        assert_eq!(status, 200, "{b}");
        if ended(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "batch did not end: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 13, hole 8: a batch the runner cannot process (here its stored input no longer
/// opens; in the field, an output the store refuses) ends as `failed` with an error, and the
/// batches after it, of every tenant, still run. Before, the runner's pass stopped at the first
/// error and every later batch stayed `validating`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_cannot_be_processed_fails_alone_and_later_batches_still_run() {
    // No agent: a line for a model no vehicle serves still ends its batch (an error entry).
    let fleet = Fleet::start_with(0, 1, |_, _| {}).await;
    let (client, base) = (fleet.client.clone(), fleet.http.clone());
    let (s, file) = status_json(upload(&client, &base, OTHER_KEY, &input(2, 4)).await).await;
    assert_eq!(s, 200, "{file}");
    let broken = file["id"].as_str().unwrap().to_string();
    {
        let conn = rusqlite::Connection::open(&fleet.db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let n = conn
            .execute(
                "UPDATE files SET content = x'00' WHERE id = ?1",
                [broken.as_str()],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let (s, first) =
        status_json(create_batch(&client, &base, OTHER_KEY, &broken, "24h").await).await;
    assert_eq!(s, 200, "{first}");
    let first = first["id"].as_str().unwrap().to_string();
    // Created after the broken one, by another tenant.
    let second = start_batch(&client, &base, &input(2, 4), "24h").await;
    let b = wait_ended(&client, &base, KEY, &second, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    results(&client, &base, &b, 2).await;
    let f = wait_ended(&client, &base, OTHER_KEY, &first, Duration::from_secs(60)).await;
    assert_eq!(f["status"], "failed", "{f}");
    assert!(f["failed_at"].as_u64().is_some(), "{f}");
    assert_eq!(f["errors"]["data"][0]["code"], "batch_failed", "{f}");
}

/// Issue 13, hole 13: a tenant's files (count and bytes) and batches not yet ended are
/// limited, with OpenAI-shaped errors; other tenants are not affected, and room comes back
/// when files are deleted or batches end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_files_and_active_batches_are_limited() {
    let fleet = Fleet::start_with(1, 1, |c, _| {
        c.max_files_per_tenant = 2;
        c.max_active_batches_per_tenant = 1;
        // A region no vehicle is in keeps a batch's lines queued: the batch stays active.
        c.regions = vec![tokenfleet_coordinator::config::policy::RegionConfig {
            name: "EU".into(),
            polygon: vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]],
            ..Default::default()
        }];
    })
    .await;
    let (client, base) = (fleet.client.clone(), fleet.http.clone());
    let mut files = Vec::new();
    for _ in 0..2 {
        let (s, f) = status_json(upload(&client, &base, KEY, &input(1, 4)).await).await;
        assert_eq!(s, 200, "{f}");
        files.push(f["id"].as_str().unwrap().to_string());
    }
    let (s, v) = status_json(upload(&client, &base, KEY, &input(1, 4)).await).await;
    assert_error(s, &v, 400, Some("file_limit_exceeded"));
    let (s, _) = status_json(upload(&client, &base, OTHER_KEY, &input(1, 4)).await).await;
    assert_eq!(s, 200, "another tenant's limit is its own");

    let create = |file: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            status_json(
                client
                    .post(format!("{base}/v1/batches"))
                    .bearer_auth(KEY)
                    .json(
                        &json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                                  "completion_window": "24h", "metadata": {"residency": "EU"}}),
                    )
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let (s, first) = create(files[0].clone()).await;
    assert_eq!(s, 200, "{first}");
    let first = first["id"].as_str().unwrap().to_string();
    wait_batch(&client, &base, &first, |b| b["status"] == "in_progress").await;
    let (s, v) = create(files[1].clone()).await;
    assert_error(s, &v, 429, Some("rate_limit_exceeded"));
    // Room comes back: a deleted file, an ended batch.
    let resp = client
        .delete(format!("{base}/v1/files/{}", files[1]))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (s, third) = status_json(upload(&client, &base, KEY, &input(1, 4)).await).await;
    assert_eq!(s, 200, "{third}");
    let resp = client
        .post(format!("{base}/v1/batches/{first}/cancel"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_batch(&client, &base, &first, ended).await;
    let (s, v) = create(third["id"].as_str().unwrap().to_string()).await;
    assert_eq!(s, 200, "{v}");
}
