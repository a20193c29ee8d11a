//! The client API over HTTPS (`http_tls`): a client trusting the certificate gets answers, a
//! plaintext HTTP client on the same port gets none.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_api_serves_https_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tokenfleet::tls::write_self_signed(&dir.path().join("tls")).unwrap();
    let fleet = Fleet::start_with(1, 2, |c, _| c.http_tls = Some(tls)).await;
    assert!(fleet.http.starts_with("https://"));
    let port = fleet.http.rsplit(':').next().unwrap().to_string();
    let https = fleet.http.clone();
    // The fleet's client trusts the API certificate.
    let resp = fleet
        .post("/v1/chat/completions", greedy_chat("Say hi.", 4, false))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");

    // Plain HTTP to the same port is not served.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plaintext HTTP was served on the HTTPS port"
    );
    // A client that does not trust the certificate refuses the connection.
    let untrusting = reqwest::Client::new()
        .get(format!("{https}/healthz"))
        .send()
        .await;
    assert!(untrusting.is_err());
}
