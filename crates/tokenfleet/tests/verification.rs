//! Result verification end to end (issue #7): a trusted engine on the coordinator re-scores
//! finished jobs; a node caught returning tokens the claimed model would not produce is
//! quarantined, its session closed and refused, and its work re-run on honest nodes.
//!
//! The dishonest nodes live here, on the test side: a protocol-level agent that returns
//! random tokens (`common::liar`), and the real agent library running a perturbed copy of the
//! model while claiming the real model's sha256 (`common::perturb`).
//!
//! Figures: `cargo test -p tokenfleet --test verification -- --nocapture --test-threads 1`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::liar::RandomTokenLiar;
use common::{greedy_chat, model_path, start_agent_with, Fleet, MODEL};
use tokenfleet::bench::trust::perturb::perturbed_copy;
use tokenfleet_coordinator::config::verification::VerificationConfig;

/// Sum of every sample of `name` (any labels) whose label set contains `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with(' ') || rest.starts_with('{')
        })
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// A fleet whose coordinator verifies with the real model. Every finished job is checked
/// (min_rate 1): these tests count spot checks, so none may be skipped by the adaptive draw
/// (the rate's decay is unit-tested in the coordinator's `reputation` module).
async fn verifying_fleet() -> Fleet {
    Fleet::start_with(0, 4, |c, _| {
        c.verification = VerificationConfig {
            enabled: true,
            models: vec![model_path()],
            min_rate: Some(1.0),
            ..Default::default()
        };
    })
    .await
}

async fn token_table() -> std::sync::Arc<tokenfleet_engine::TokenTable> {
    let mut ec = tokenfleet_engine::EngineConfig::new(model_path());
    ec.slots = 1;
    ec.ctx_per_slot = 64;
    tokenfleet_engine::Engine::load_async(ec)
        .await
        .unwrap()
        .token_table()
}

async fn real_sha() -> String {
    tokio::task::spawn_blocking(|| tokenfleet_engine::gguf::sha256_file(&model_path()))
        .await
        .unwrap()
        .unwrap()
}

/// Polls `metrics` until `done` holds (a hang guard, not a timing assertion).
async fn wait_for(fleet: &Fleet, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let m = fleet.metrics().await;
        if done(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn content(v: &serde_json::Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

async fn chat(fleet: &Fleet, prompt: &str, key: Option<&str>) -> serde_json::Value {
    let mut req = fleet.post("/v1/chat/completions", greedy_chat(prompt, 24, false));
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    resp.json().await.unwrap()
}

fn reruns(m: &str, kind: &str) -> f64 {
    metric(
        m,
        "tokenfleet_verification_reruns_total",
        &format!("kind=\"{kind}\""),
    )
}

/// A finished job a liar answered with `lie` was re-run: retrying it with its idempotency
/// key now reads what an honest vehicle answers to the same prompt.
async fn assert_rerun_honestly(fleet: &Fleet, prompt: &str, key: &str, lie: &str) {
    let reference = content(&chat(fleet, prompt, None).await);
    assert_ne!(lie, reference, "the liar's output equals the honest one");
    let retried = chat(fleet, prompt, Some(key)).await;
    assert_eq!(content(&retried), reference);
}

fn quarantined(m: &str) -> f64 {
    metric(m, "tokenfleet_quarantined_nodes", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_random_token_liar_is_caught_quarantined_and_its_jobs_rerun() {
    let fleet = verifying_fleet().await;
    let sha = real_sha().await;
    // Holds its first two jobs half done; answers later ones at once, with the true texts of
    // its random ids (so that only the spot check can tell).
    let table = token_table().await;
    let liar = RandomTokenLiar::start(
        &fleet.grpc,
        "liar-random",
        MODEL,
        &sha,
        49152,
        2,
        Some(table),
    )
    .await;
    fleet.wait_for_nodes(1).await;
    let pending_prompts = ["Write a haiku about parking lots.", "Name three colors."];
    let mut pending = Vec::new();
    for p in pending_prompts {
        let f = (fleet.http.clone(), fleet.client.clone());
        pending.push(tokio::spawn(async move {
            let resp =
                f.1.post(format!("{}/v1/chat/completions", f.0))
                    .bearer_auth(common::KEY)
                    .json(&greedy_chat(p, 24, false))
                    .send()
                    .await
                    .unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<serde_json::Value>().await.unwrap()
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while liar.log.assigned.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the liar never got both jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The third job the liar answers at once, with random tokens: the client gets them (it
    // is done before any check), and the spot check that follows catches the liar.
    let finished_prompt = "Explain why the sky is blue.";
    let lie = chat(&fleet, finished_prompt, Some("finished-by-liar")).await;
    let m = wait_for(&fleet, "quarantine", |m| quarantined(m) >= 1.0).await;
    let checks = metric(&m, "tokenfleet_verification_checks_total", "");
    let fails = metric(
        &m,
        "tokenfleet_verification_checks_total",
        "result=\"fail\"",
    );
    println!(
        "random-token liar: detected at spot check {checks} ({fails} failed), after {} finished job(s)",
        liar.log.finished.load(Ordering::SeqCst)
    );
    assert_eq!(fails, 1.0);
    assert_eq!(
        checks, 1.0,
        "the first spot check of a new node catches random tokens"
    );

    // An honest vehicle arrives; everything the liar touched runs again on it.
    let _honest = start_agent_with(&fleet.grpc, "honest-1", 4, model_path(), &sha).await;
    let mut outputs = Vec::new();
    for p in pending {
        let v = tokio::time::timeout(Duration::from_secs(180), p)
            .await
            .expect("pending job hangs")
            .unwrap();
        outputs.push(content(&v));
    }
    for (prompt, got) in pending_prompts.iter().zip(&outputs) {
        let reference = content(&chat(&fleet, prompt, None).await);
        assert_eq!(
            got, &reference,
            "pending job for {prompt:?} did not get the honest output"
        );
    }
    // The liar's finished job was re-run: a retry with its key now reads the honest answer.
    assert_rerun_honestly(&fleet, finished_prompt, "finished-by-liar", &content(&lie)).await;

    let m = fleet.metrics().await;
    assert!(reruns(&m, "pending") >= 2.0, "{m}");
    assert!(reruns(&m, "finished") >= 1.0, "{m}");
    assert!(
        liar.log.drained.load(Ordering::SeqCst),
        "the liar was not told to drain"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !liar.log.refused.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the liar's reconnect was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_running_a_different_model_is_caught_and_its_jobs_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let perturbed = dir.path().join("perturbed.gguf");
    let changed = perturbed_copy(&model_path(), &perturbed, 0.3, 7).unwrap();
    assert!(changed > 100_000, "only {changed} bytes perturbed");
    let fleet = verifying_fleet().await;
    let sha = real_sha().await;
    // The real agent library on the perturbed weights, claiming the real model's sha256.
    let liar = start_agent_with(&fleet.grpc, "liar-perturbed", 2, perturbed, &sha).await;
    fleet.wait_for_nodes(1).await;
    let prompts = [
        "Explain why the sky is blue.",
        "Write a haiku about parking lots.",
        "What is the capital of Italy?",
        "Give me a tip for cooking rice.",
        "Describe a cat in one sentence.",
        "Why do we sleep?",
        "List two uses of copper.",
        "What is a battery?",
    ];
    let mut served = Vec::new();
    let mut detected_at = None;
    for (k, prompt) in prompts.iter().enumerate() {
        let key = format!("perturbed-{k}");
        let v = chat(&fleet, prompt, Some(key.as_str())).await;
        served.push((prompt, key, content(&v)));
        // Each job's spot check completes before the next job (new nodes are checked always).
        let m = wait_for(&fleet, "the spot check", |m| {
            metric(m, "tokenfleet_verification_checks_total", "") >= (k + 1) as f64
        })
        .await;
        if quarantined(&m) >= 1.0 {
            detected_at = Some(k + 1);
            break;
        }
    }
    let detected_at = detected_at.expect("a different model was never detected in 8 jobs");
    println!(
        "different-model agent (ffn_down weights 30% randomized, {changed} bytes): detected at spot check {detected_at}"
    );
    assert!(
        detected_at <= 3,
        "detected only at spot check {detected_at}"
    );
    // The liar stays up (and is refused): from now on only the honest vehicle serves.
    let _liar = liar;

    let _honest = start_agent_with(&fleet.grpc, "honest-1", 4, model_path(), &sha).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fleet.models().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the honest vehicle never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The job that failed its check was re-run: its retry reads the honest answer.
    let (prompt, key, lie) = served.last().unwrap();
    assert_rerun_honestly(&fleet, prompt, key, lie).await;
    let m = fleet.metrics().await;
    assert!(reruns(&m, "finished") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_honest_node_passes_greedy_and_sampled_checks() {
    let fleet = verifying_fleet().await;
    let sha = real_sha().await;
    let _honest = start_agent_with(&fleet.grpc, "honest-1", 4, model_path(), &sha).await;
    fleet.wait_for_nodes(1).await;
    let prompts = [
        "Write a short poem about electric cars.",
        "Tell me a story about a robot.",
        "Explain how rain forms.",
        "Describe a sunny day at the beach.",
    ];
    for (i, p) in prompts.iter().enumerate() {
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": 64,
            "temperature": 0.8,
            "top_p": 0.95,
            "seed": 100 + i,
        });
        let resp = fleet
            .post("/v1/chat/completions", body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = chat(&fleet, p, None).await;
    }
    let m = wait_for(&fleet, "eight spot checks", |m| {
        metric(m, "tokenfleet_verification_checks_total", "") >= 8.0
    })
    .await;
    let pass = metric(
        &m,
        "tokenfleet_verification_checks_total",
        "result=\"pass\"",
    );
    let inconclusive = metric(
        &m,
        "tokenfleet_verification_checks_total",
        "result=\"inconclusive\"",
    );
    println!("honest node, 4 greedy + 4 sampled jobs: {pass} passed, {inconclusive} inconclusive, 0 failed");
    assert_eq!(
        metric(
            &m,
            "tokenfleet_verification_checks_total",
            "result=\"fail\""
        ),
        0.0
    );
    assert_eq!(quarantined(&m), 0.0);
    // Greedy checks always decide; the sampled test decides once it has enough tokens.
    assert!(pass >= 5.0, "{m}");
}

/// Issue 13, hole 1: what the client reads was never checked. A node whose texts are not the
/// detokenization of its token ids is refused on its first chunk, before any spot check; the
/// client never reads the forged text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_forged_texts_are_caught_before_any_spot_check() {
    let fleet = verifying_fleet().await;
    let sha = real_sha().await;
    // Answers at once, with made-up texts ("<id>") for its token ids.
    let liar = RandomTokenLiar::start(&fleet.grpc, "liar-texts", MODEL, &sha, 49152, 0, None).await;
    fleet.wait_for_nodes(1).await;
    let f = (fleet.http.clone(), fleet.client.clone());
    let pending = tokio::spawn(async move {
        f.1.post(format!("{}/v1/chat/completions", f.0))
            .bearer_auth(common::KEY)
            .json(&greedy_chat("Name three colors.", 16, false))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let m = wait_for(&fleet, "quarantine", |m| quarantined(m) >= 1.0).await;
    assert_eq!(
        metric(&m, "tokenfleet_forged_outputs_total", ""),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "tokenfleet_verification_checks_total", ""),
        0.0,
        "caught by the coordinator's own detokenization, not a spot check"
    );
    // An honest vehicle answers the job afresh; nothing the liar wrote reaches the client.
    let _honest = start_agent_with(&fleet.grpc, "honest-1", 4, model_path(), &sha).await;
    let body = tokio::time::timeout(Duration::from_secs(180), pending)
        .await
        .expect("the job hangs")
        .unwrap();
    assert!(
        !body.contains('<'),
        "forged text reached the client: {body}"
    );
    assert!(liar.log.drained.load(Ordering::SeqCst));
}

/// Issue 13: under a dozen concurrent greedy requests the verifier quarantined all three
/// honest vehicles (a 0.31-nat near-tie against a hand-picked 0.25 tolerance) and the fleet
/// stopped. Three honest vehicles with different slot counts, every job checked, twelve
/// requests at a time: none is quarantined or held, no check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_honest_vehicles_under_concurrent_load_keep_their_standing() {
    let fleet = verifying_fleet().await;
    let sha = real_sha().await;
    let _a = start_agent_with(&fleet.grpc, "honest-a", 4, model_path(), &sha).await;
    let _b = start_agent_with(&fleet.grpc, "honest-b", 2, model_path(), &sha).await;
    let _c = start_agent_with(&fleet.grpc, "honest-c", 1, model_path(), &sha).await;
    fleet.wait_for_nodes(3).await;
    let topics = [
        "electric cars",
        "the moon",
        "bread",
        "rivers",
        "jazz",
        "volcanoes",
        "bees",
        "chess",
        "tea",
        "glaciers",
        "batteries",
        "owls",
    ];
    let mut clients = Vec::new();
    for round in 0..3 {
        for t in topics {
            let f = (fleet.http.clone(), fleet.client.clone());
            let prompt = format!("Write two sentences about {t} (round {round}).");
            clients.push(tokio::spawn(async move {
                f.1.post(format!("{}/v1/chat/completions", f.0))
                    .bearer_auth(common::KEY)
                    .json(&greedy_chat(&prompt, 48, false))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        for c in clients.drain(..) {
            assert_eq!(c.await.unwrap(), 200);
        }
    }
    let m = wait_for(&fleet, "36 spot checks", |m| {
        metric(m, "tokenfleet_verification_checks_total", "") >= 36.0
    })
    .await;
    println!(
        "honest fleet under load: {} checks, {} false alarms cleared",
        metric(&m, "tokenfleet_verification_checks_total", ""),
        metric(&m, "tokenfleet_verification_false_alarms_total", "")
    );
    assert_eq!(
        metric(
            &m,
            "tokenfleet_verification_checks_total",
            "result=\"fail\""
        ),
        0.0,
        "{m}"
    );
    assert_eq!(quarantined(&m), 0.0);
    assert_eq!(metric(&m, "tokenfleet_verification_held_nodes", ""), 0.0);
}

/// Issue 13: the circuit breaker. The verifier may quarantine at most its share of the live
/// fleet (here 1 of 2) within its window without an operator; a second failure is held (the
/// node keeps serving, every job checked) until an operator confirms or releases it, through
/// the store as `tokenfleet fleet quarantine` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue13_the_circuit_breaker_holds_failures_beyond_its_share_for_an_operator() {
    use tokenfleet_coordinator::trust::reputation::{decide, operator_states, Decision};
    let fleet = verifying_fleet().await;
    let sha = real_sha().await;
    let table = token_table().await;
    let _liars = [
        RandomTokenLiar::start(
            &fleet.grpc,
            "liar-a",
            MODEL,
            &sha,
            49152,
            0,
            Some(table.clone()),
        )
        .await,
        RandomTokenLiar::start(&fleet.grpc, "liar-b", MODEL, &sha, 49152, 0, Some(table)).await,
    ];
    fleet.wait_for_nodes(2).await;
    let held = |m: &str| metric(m, "tokenfleet_verification_held_nodes", "");
    let mut round = 0;
    let m = loop {
        // Jobs go to both liars; each is checked (new nodes, and held ones, always are): wait
        // for each job's check before the next (a hang guard, not a timing assertion).
        let _ = chat(&fleet, &format!("Say something ({round})."), None).await;
        round += 1;
        let m = wait_for(&fleet, "the spot check", |m| {
            metric(m, "tokenfleet_verification_seconds_count", "") >= round as f64
                || quarantined(m) >= 1.0 && held(m) >= 1.0
        })
        .await;
        if quarantined(&m) >= 1.0 && held(&m) >= 1.0 {
            break m;
        }
        assert!(round < 40, "the breaker never held the second liar:\n{m}");
    };
    assert_eq!(
        quarantined(&m),
        1.0,
        "the breaker let a second quarantine through"
    );
    let store = tokenfleet_coordinator::domain::store::Store::open(
        &fleet.db,
        tokenfleet_coordinator::config::store_sealer(&fleet.db, None).unwrap(),
    )
    .unwrap();
    let states = operator_states(&store).await.unwrap();
    let held_node = states
        .iter()
        .find(|s| s.held.is_some())
        .map(|s| s.node.clone())
        .expect("the held node is listed for the operator");
    // The operator confirms: the coordinator quarantines it within its poll.
    assert!(decide(&store, &held_node, Decision::Confirm).await.unwrap());
    wait_for(&fleet, "the confirmed quarantine", |m| {
        quarantined(m) >= 2.0 && held(m) == 0.0
    })
    .await;
    // And releases one: it may come back.
    assert!(decide(&store, &held_node, Decision::Release).await.unwrap());
    wait_for(&fleet, "the release", |m| quarantined(m) == 1.0).await;
}
