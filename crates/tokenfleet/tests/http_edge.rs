//! The client API's edge under hostile clients (issue 13, hole 7): a slow request head or body
//! is cut off, connections are capped (one over the cap gets a 503 and is counted), every
//! route has a body limit, operator data needs the operator key, and none of it cuts a long
//! generation.

mod common;

use std::time::Duration;

use common::{greedy_chat, metric, sse_events, Fleet, KEY, OPERATOR_KEY};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends on `conn` until it closes it (bounded: a hang guard).
async fn read_until_closed(conn: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut out))
        .await
        .expect("the server never closed the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

fn addr(fleet: &Fleet) -> String {
    fleet.http.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_request_heads_and_bodies_are_cut_off_and_every_route_has_a_body_limit() {
    let fleet = Fleet::start_with(0, 1, |c, _| {
        c.http_header_read_timeout = Duration::from_secs(1);
        c.http_body_read_timeout = Duration::from_secs(1);
    })
    .await;
    // A request head that never ends.
    let mut conn = TcpStream::connect(addr(&fleet)).await.unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut conn).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    // A body that never arrives whole: 408 before any handler (or authentication) runs.
    let mut conn = TcpStream::connect(addr(&fleet)).await.unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // A body over the limit on a route that takes none.
    let resp = fleet
        .client
        .get(format!("{}/v1/models", fleet.http))
        .bearer_auth(KEY)
        .body(vec![b'x'; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_data_needs_the_operator_key_and_liveness_stays_public() {
    let fleet = Fleet::start_with(0, 1, |_, _| {}).await;
    let get = |path: &str, key: Option<&str>| {
        let mut req = fleet.client.get(format!("{}{path}", fleet.http));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    for path in ["/livez", "/healthz"] {
        let resp = get(path, None).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"status": "ok"}), "{path}");
    }
    for key in [None, Some(KEY)] {
        let resp = get("/metrics", key).await.unwrap();
        assert_eq!(resp.status(), 401, "{key:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let text = body.to_string();
        assert!(!text.contains("tokenfleet_queue_depth"), "{text}");
    }
    let resp = get("/metrics", Some(OPERATOR_KEY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("tokenfleet_queue_depth"));
    let details: Value = get("/healthz", Some(OPERATOR_KEY))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(details["queued_jobs"], 0, "{details}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_cap_get_a_503_and_are_counted() {
    let fleet = Fleet::start_with(0, 1, |c, _| c.http_max_connections = 2).await;
    // Two idle connections hold both places (the fleet's own client has none open yet).
    let first = TcpStream::connect(addr(&fleet)).await.unwrap();
    let _second = TcpStream::connect(addr(&fleet)).await.unwrap();
    let mut third = TcpStream::connect(addr(&fleet)).await.unwrap();
    let answer = read_until_closed(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    // A place comes back when a connection ends.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let fresh = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let resp = fresh
            .get(format!("{}/metrics", fleet.http))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await;
        if let Ok(r) = resp {
            if r.status() == 200 {
                break r.text().await.unwrap();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no place came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metric(
            &metrics,
            "tokenfleet_http_connections_refused_total{listener=\"http\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_timeouts_do_not_cut_a_long_generation() {
    // Every timeout at one second; an answer of 200 tokens takes longer on this CPU.
    let fleet = Fleet::start_with(1, 1, |c, _| {
        c.http_header_read_timeout = Duration::from_secs(1);
        c.http_body_read_timeout = Duration::from_secs(1);
        c.http_request_timeout = Duration::from_secs(1);
    })
    .await;
    let mut body = greedy_chat("Tell a long story.", 200, true);
    body["tokenfleet"] = json!({"ignore_eos": true});
    let resp = fleet
        .post("/v1/chat/completions", body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp, Duration::from_secs(300)).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 200, "{usage}");
    body["stream"] = json!(false);
    body["stream_options"] = Value::Null;
    let resp = fleet
        .post("/v1/chat/completions", body)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 200, "{answer}");
}
