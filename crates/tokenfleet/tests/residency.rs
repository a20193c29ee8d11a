//! Residency: EU-bound requests on a mixed fleet never reach a vehicle outside the EU region,
//! including continuations after a departure and after a vehicle drives across the border.
//! Also: tenants' residency comes from their API key, and tenants' rate limits answer 429.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokenfleet_coordinator::config::policy::RegionConfig;
use tokenfleet_coordinator::config::policy::TenantConfig;
use tokenfleet_coordinator::config::ApiKey;

const EU_KEY: &str = "eu-bank-key-0123456789";
const LIMITED_KEY: &str = "limited-key-0123456789";

// Positions (latitude, longitude).
const BERLIN: (f64, f64) = (52.52, 13.40);
const KONSTANZ: (f64, f64) = (47.70, 9.17);
const KREUZLINGEN: (f64, f64) = (47.60, 9.17);
const NEW_YORK: (f64, f64) = (40.71, -74.0);

fn ch_hole_geojson(dir: &std::path::Path) -> std::path::PathBuf {
    // A coarse "EU" for the test: a box over western and central Europe with a hole standing
    // for Switzerland, whose northern border the Konstanz vehicle crosses.
    let path = dir.join("eu.geojson");
    let eu = json!({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[-10.0, 35.0], [30.0, 35.0], [30.0, 60.0], [-10.0, 60.0], [-10.0, 35.0]],
        [[5.9, 45.8], [10.5, 45.8], [10.5, 47.66], [5.9, 47.66], [5.9, 45.8]]
    ]}});
    std::fs::write(&path, eu.to_string()).unwrap();
    path
}

fn set_position(agent: &TestAgent, (lat, lon): (f64, f64)) {
    agent.agent.as_ref().unwrap().status().send_modify(|s| {
        s.state.latitude = Some(lat);
        s.state.longitude = Some(lon);
    });
}

fn depart(agent: &TestAgent) {
    agent.agent.as_ref().unwrap().status().send_replace(
        tokenfleet_agent::VehicleStatus::departing("driver returned"),
    );
}

fn tokens_generated(agent: &TestAgent) -> u64 {
    agent.engine.stats().tokens_generated
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eu_requests_never_run_outside_the_eu() {
    let dir = tempfile::tempdir().unwrap();
    let eu_geojson = ch_hole_geojson(dir.path());
    let fleet = Fleet::start_with(3, 4, |c, _| {
        c.regions = vec![RegionConfig {
            name: "EU".into(),
            geojson: Some(eu_geojson),
            ..Default::default()
        }];
        c.api_keys.push(ApiKey {
            key: EU_KEY.into(),
            tenant: "eu-bank".into(),
        });
        c.tenants = vec![TenantConfig {
            name: "eu-bank".into(),
            residency: vec!["EU".into()],
            ..Default::default()
        }];
    })
    .await;
    let (de1, de2, us) = (&fleet.agents[0], &fleet.agents[1], &fleet.agents[2]);
    set_position(de1, BERLIN);
    set_position(de2, KONSTANZ);
    set_position(us, NEW_YORK);

    // Eight EU-bound requests: half by the tenant's key, half by the request extension.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = fleet.client.clone();
        let url = format!("{}/v1/chat/completions", fleet.http);
        let mut body = greedy_chat(&format!("Tell me fact number {i} about bees."), 48, false);
        let key = if i % 2 == 0 {
            EU_KEY
        } else {
            body["tokenfleet"] = json!({"residency": ["EU"]});
            KEY
        };
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .timeout(Duration::from_secs(300))
                .send()
                .await
                .unwrap()
        }));
    }

    // The Konstanz vehicle drives into Switzerland while it runs EU jobs.
    wait_until("the Konstanz vehicle to run EU jobs", || {
        de2.engine.stats().slots_busy > 0 && tokens_generated(de2) > 0
    })
    .await;
    set_position(de2, KREUZLINGEN);
    // Berlin now holds the EU work; once it runs some, its driver returns, and the other
    // vehicle comes back into Germany.
    let berlin_before = tokens_generated(de1);
    wait_until("Berlin to take over", || {
        tokens_generated(de1) > berlin_before + 8
    })
    .await;
    set_position(de2, KONSTANZ);
    depart(de1);

    let mut answers = Vec::new();
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        answers.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        tokens_generated(us),
        0,
        "an EU-bound job ran on the New York vehicle"
    );
    let metrics = fleet.metrics().await;
    let residency_evictions = metric(&metrics, "tokenfleet_evictions_total{reason=\"residency\"}");
    assert!(
        residency_evictions >= 1.0,
        "no job was taken back at the border: {metrics}"
    );

    // Control: the New York vehicle was usable all along; unbound work runs there once the
    // European vehicles are gone. The same prompts, uninterrupted there, give the same
    // answers: the continuations across the border and the departure lost nothing.
    depart(de2);
    for (i, answer) in answers.iter().enumerate() {
        let resp = fleet
            .post(
                "/v1/chat/completions",
                greedy_chat(&format!("Tell me fact number {i} about bees."), 48, false),
            )
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], answer.as_str());
    }
    assert!(tokens_generated(us) > 0);

    // An EU-bound request with only a non-EU vehicle left waits rather than running there:
    // queued (not refused, not run in New York) until an EU vehicle is back, then answered.
    let us_before = tokens_generated(us);
    let waiting = {
        let request = fleet
            .client
            .post(format!("{}/v1/chat/completions", fleet.http))
            .bearer_auth(EU_KEY)
            .json(&greedy_chat("Tell me fact number 0 about bees.", 48, false))
            .timeout(Duration::from_secs(300))
            .send();
        tokio::spawn(request)
    };
    let queued = "tokenfleet_queue_depth{class=\"interactive\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&fleet.metrics().await, queued) < 1.0 {
        assert!(Instant::now() < deadline, "the EU request never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Dispatch rounds run on every change and at least every tick: give the scheduler many
    // chances to (wrongly) place it on the only vehicle left.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "the EU request ended without an EU vehicle"
        );
    }
    assert_eq!(metric(&fleet.metrics().await, queued), 1.0);
    assert_eq!(
        tokens_generated(us),
        us_before,
        "the EU request ran in New York"
    );
    de2.agent
        .as_ref()
        .unwrap()
        .status()
        .send_replace(tokenfleet_agent::VehicleStatus::parked());
    set_position(de2, KONSTANZ);
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        answers[0].as_str()
    );
    assert_eq!(
        tokens_generated(us),
        us_before,
        "the EU request ran in New York"
    );

    // A request naming an unknown region, or the tenant asking outside its regions, is a 400.
    for (key, ext) in [
        (KEY, json!({"residency": ["Atlantis"]})),
        (EU_KEY, json!({"residency": ["US"]})),
    ] {
        let mut body = greedy_chat("Hi", 4, false);
        body["tokenfleet"] = ext;
        let resp = fleet
            .client
            .post(format!("{}/v1/chat/completions", fleet.http))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], "tokenfleet.residency");
    }

    // Issue 13, hole 4: the same for a batch's metadata.residency, at batch creation.
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(
                (json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                        "body": greedy_chat("Hi", 4, false)})
                .to_string()
                    + "\n")
                    .into_bytes(),
            )
            .file_name("input.jsonl"),
        );
    let file: Value = fleet
        .client
        .post(format!("{}/v1/files", fleet.http))
        .bearer_auth(EU_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for residency in ["Atlantis", "EU,US"] {
        let resp = fleet
            .client
            .post(format!("{}/v1/batches", fleet.http))
            .bearer_auth(EU_KEY)
            .json(
                &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                          "completion_window": "24h", "metadata": {"residency": residency}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{residency}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], "metadata.residency", "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains(if residency == "EU,US" {
                    "US"
                } else {
                    "Atlantis"
                }),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_rate_limit_gets_openai_429s_and_others_do_not() {
    let fleet = Fleet::start_with(1, 4, |c, _| {
        c.api_keys.push(ApiKey {
            key: LIMITED_KEY.into(),
            tenant: "limited".into(),
        });
        c.tenants = vec![TenantConfig {
            name: "limited".into(),
            requests_per_minute: 2,
            ..Default::default()
        }];
    })
    .await;
    let send = |key: &'static str| {
        fleet
            .client
            .post(format!("{}/v1/chat/completions", fleet.http))
            .bearer_auth(key)
            .json(&greedy_chat("Hi", 2, false))
            .timeout(Duration::from_secs(120))
            .send()
    };
    assert_eq!(send(LIMITED_KEY).await.unwrap().status(), 200);
    assert_eq!(send(LIMITED_KEY).await.unwrap().status(), 200);
    let resp = send(LIMITED_KEY).await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert_eq!(err["error"]["type"], "requests");
    // Another tenant is unaffected.
    for _ in 0..3 {
        assert_eq!(send(KEY).await.unwrap().status(), 200);
    }
}
