//! At rest: a real request through the fleet leaves no plaintext prompt or output in the
//! coordinator's SQLite store (database file and WAL), and the agents keep nothing on disk.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Whether `needle` occurs in the store's database file or its WAL.
fn in_store_files(db: &std::path::Path, needle: &str) -> bool {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.to_path_buf(), std::path::PathBuf::from(wal)]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .any(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_job_store_holds_no_plaintext_prompt_or_output() {
    let mut fleet = Fleet::start(1).await;
    let marker = "QUOKKA-MARKER-5521";
    let resp = fleet
        .post(
            "/v1/chat/completions",
            json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": format!("Repeat this code word: {marker}. Then describe a quokka.")}],
                "max_tokens": 32,
                "temperature": 0,
                "logprobs": true,
            }),
        )
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let job_id = resp.headers()["x-tokenfleet-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 32, "{body}");
    // Tokens are stored one per row, so the strictest probe for the output is the longest
    // single token's text (plaintext-per-token storage would contain it verbatim).
    let longest_token = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["token"].as_str())
        .max_by_key(|t| t.len())
        .unwrap()
        .to_string();
    assert!(longest_token.len() >= 4, "{body}");
    // Everything the coordinator will ever write about this job is on disk after a
    // graceful stop (the store is flushed before the coordinator reports stopped).
    fleet.stop_coordinator().await;
    // Control: metadata is stored in clear (the job id), so the search does see the files.
    assert!(in_store_files(&fleet.db, &job_id), "search control failed");
    assert!(
        !in_store_files(&fleet.db, marker),
        "the prompt marker is in the store in plaintext"
    );
    assert!(
        !in_store_files(&fleet.db, &longest_token),
        "output token {longest_token:?} is in the store in plaintext"
    );
}
