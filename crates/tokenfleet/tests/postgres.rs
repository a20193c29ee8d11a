//! The coordinator on PostgreSQL (`TOKENFLEET_DATABASE_URL`), as a process on the real model:
//! it serves, a second coordinator on the same database is refused while the first runs, and
//! after a SIGKILL mid-job a restarted coordinator resumes the job from the database and the
//! client's `Idempotency-Key` retry gets the same greedy answer as an uninterrupted run, from
//! one stored job. A standby (`--standby`) waits for the database and takes over when the
//! active coordinator is killed: the agent, given both addresses, moves to it, and the
//! client's retry there gets the whole answer.
//!
//! Needs a PostgreSQL cluster, as the store's PostgreSQL suite does: `TOKENFLEET_TEST_PG_URL`
//! (a superuser URL, `postgresql://user@host:port/db`; `scripts/test.sh` starts one), or
//! `TOKENFLEET_TEST_PG=skip` to skip.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::batch::{ended, input, line_body, results, start_batch, wait_batch, TOPICS};
use common::process::{free_port, wait_http, wait_models, Proc, BIN};
use common::{
    chat_stream_text, greedy_chat, received_until_cut, sse_events, start_agent, KEY, OPERATOR_KEY,
};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

const URL_VAR: &str = "TOKENFLEET_TEST_PG_URL";
const SKIP_VAR: &str = "TOKENFLEET_TEST_PG";
/// A fixed job-store key (32 bytes, base64) in the `TOKENFLEET_STORE_KEYS` format.
const STORE_KEYS: &str = "test:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A fresh database in the test cluster, dropped on drop.
struct Database {
    url: String,
    admin_url: String,
    name: String,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test cluster ({URL_VAR}): {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl Database {
    async fn fresh() -> Option<Self> {
        let admin_url = match std::env::var(URL_VAR) {
            Ok(url) => url,
            Err(_) if std::env::var(SKIP_VAR).as_deref() == Ok("skip") => {
                eprintln!("skipped: the coordinator-on-PostgreSQL tests ({SKIP_VAR}=skip)");
                return None;
            }
            Err(_) => panic!(
                "these tests need a PostgreSQL server: set {URL_VAR} (`eval \"$(scripts/pg.sh \
                 start)\"` starts a throwaway one; scripts/test.sh does that), or {SKIP_VAR}=skip"
            ),
        };
        let (base, _) = admin_url
            .split('?')
            .next()
            .and_then(|u| u.rsplit_once('/'))
            .unwrap_or_else(|| panic!("{URL_VAR} must be a URL ending in /<database>"));
        let name = format!(
            "tokenfleet_coord_{}",
            hex::encode(rand::random::<[u8; 6]>())
        );
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(Self {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    /// (state, stored output tokens) of the jobs with this idempotency key.
    async fn jobs_with_key(&self, key: &str) -> Vec<(String, i64)> {
        connect(&self.url)
            .await
            .query(
                "SELECT j.state, (SELECT count(*) FROM job_outputs o WHERE o.job_id = j.id)
                 FROM jobs j WHERE j.idempotency_key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

impl Database {
    /// (jobs whose idempotency key starts with `prefix`, how many of them hold tokens, batch
    /// lines done, batch lines in all).
    async fn progress(&self, prefix: &str) -> (i64, i64, i64, i64) {
        let row = connect(&self.url)
            .await
            .query_one(
                "SELECT
                   (SELECT count(*) FROM jobs WHERE idempotency_key LIKE $1 || '%'),
                   (SELECT count(*) FROM jobs j WHERE idempotency_key LIKE $1 || '%'
                      AND EXISTS (SELECT 1 FROM job_outputs o WHERE o.job_id = j.id)),
                   (SELECT count(*) FROM batch_requests b JOIN jobs j ON j.id = b.job_id
                      WHERE j.state = 'done'),
                   (SELECT count(*) FROM batch_requests)",
                &[&prefix],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }

    /// One stored job for `key`, done. The client's answer ends as the job's end is queued
    /// for the store's group commit, so its row may say `done` a flush later: waited for,
    /// bounded.
    async fn assert_one_done_job(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = self.jobs_with_key(key).await;
            assert_eq!(
                rows.len(),
                1,
                "one stored job per idempotency key: {rows:?}"
            );
            if rows[0].0 == "done" {
                return;
            }
            assert!(Instant::now() < deadline, "the job never ended: {rows:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime: a thread of its own for the last statement.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = connect(&admin).await;
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

fn coordinator(db: &Database, http: u16, grpc: u16, stderr: Stdio) -> Child {
    coordinator_with(db, http, grpc, stderr, &[])
}

fn coordinator_with(db: &Database, http: u16, grpc: u16, stderr: Stdio, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["coordinator", "--http", &format!("127.0.0.1:{http}")])
        .args(extra)
        .args(["--grpc", &format!("127.0.0.1:{grpc}")])
        .args(["--api-key", KEY, "--operator-key", OPERATOR_KEY])
        .args(["--lease-timeout-ms", "2000"])
        .env("TOKENFLEET_DATABASE_URL", &db.url)
        .env("TOKENFLEET_STORE_KEYS", STORE_KEYS)
        .env_remove("TOKENFLEET_DB")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the coordinator")
}

/// Starts the coordinator and waits for its API. Right after a SIGKILL the server may not
/// yet have closed the dead coordinator's lock session, and the new one exits refused: it is
/// started again (bounded).
async fn start_coordinator(client: &reqwest::Client, db: &Database, http: u16, grpc: u16) -> Proc {
    let base = format!("http://127.0.0.1:{http}");
    for _ in 0..20 {
        let mut child = coordinator(db, http, grpc, Stdio::null());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                eprintln!("coordinator exited at start ({status}); starting it again");
                tokio::time::sleep(Duration::from_millis(250)).await;
                break;
            }
            if client.get(format!("{base}/livez")).send().await.is_ok() {
                return Proc(child);
            }
            assert!(Instant::now() < deadline, "coordinator did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("the coordinator on PostgreSQL did not start in 20 tries");
}

async fn chat(client: &reqwest::Client, base: &str, key: &str, body: &Value) -> (u16, Value) {
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", key)
        .json(body)
        .timeout(Duration::from_secs(180))
        .send()
        .await
        .expect("the coordinator answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends `body` with `key` to the coordinator at `base` and SIGKILLs it once the database
/// holds some of the job's tokens; returns the job's rows at the kill.
async fn kill_mid_job(
    client: &reqwest::Client,
    db: &Database,
    base: &str,
    body: &Value,
    key: &str,
    coordinator: &mut Proc,
) -> Vec<(String, i64)> {
    let request = {
        let (client, url, body, key) = (
            client.clone(),
            format!("{base}/v1/chat/completions"),
            body.clone(),
            key.to_string(),
        );
        tokio::spawn(async move {
            let _ = client
                .post(url)
                .bearer_auth(KEY)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await;
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let rows = db.jobs_with_key(key).await;
        if rows.iter().any(|(_, tokens)| *tokens >= 2) {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the job stored no tokens: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    coordinator.0.kill().unwrap();
    let _ = coordinator.0.wait();
    let _ = request.await;
    at_kill
}

/// A long greedy request (so a kill lands mid-job) and its uninterrupted answer, asked with
/// Idempotency-Key `key`.
async fn long_story_reference(client: &reqwest::Client, base: &str, key: &str) -> (Value, String) {
    let body = greedy_chat(
        "Tell a long story about a lighthouse keeper and the sea, in many sentences.",
        160,
        false,
    );
    let (status, reference) = chat(client, base, key, &body).await;
    assert_eq!(status, 200, "{reference}");
    let reference = text(&reference);
    assert!(!reference.is_empty());
    (body, reference)
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_postgres_is_alone_on_its_database_and_resumes_after_sigkill() {
    let Some(db) = Database::fresh().await else {
        return;
    };
    let client = reqwest::Client::new();
    let (http, grpc) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{http}");
    let mut first = start_coordinator(&client, &db, http, grpc).await;
    wait_http(&client, &base).await;

    // A second coordinator on the same database is refused and says why.
    let second = coordinator(&db, free_port(), free_port(), Stdio::piped());
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second coordinator must not run");
    assert!(
        stderr.contains("another coordinator is running on this database"),
        "{stderr}"
    );

    let _agent = start_agent(&format!("127.0.0.1:{grpc}"), "vehicle-pg", 2).await;
    wait_models(&client, &base).await;
    let (body, reference) = long_story_reference(&client, &base, "pg-reference").await;

    // The same request again, killed mid-job once the database holds some of its tokens.
    let at_kill = kill_mid_job(&client, &db, &base, &body, "pg-crash", &mut first).await;
    eprintln!("killed with the job at {at_kill:?}");

    let _restarted = start_coordinator(&client, &db, http, grpc).await;
    wait_models(&client, &base).await;
    let (status, retried) = chat(&client, &base, "pg-crash", &body).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(text(&retried), reference);
    db.assert_one_done_job("pg-crash").await;
}

/// An active coordinator (serving) and a standby (waiting for the database) on `db`.
struct Pair {
    active: Proc,
    standby: Proc,
    base_a: String,
    base_b: String,
    /// The agents' address list: the active coordinator, then the standby (`start_agent`
    /// puts `http://` before the first).
    agent_addresses: String,
}

impl Pair {
    async fn start(client: &reqwest::Client, db: &Database) -> Self {
        let (http_a, grpc_a) = (free_port(), free_port());
        let (http_b, grpc_b) = (free_port(), free_port());
        let active = start_coordinator(client, db, http_a, grpc_a).await;
        let standby = Proc(coordinator_with(
            db,
            http_b,
            grpc_b,
            Stdio::null(),
            &["--standby"],
        ));
        Self {
            active,
            standby,
            base_a: format!("http://127.0.0.1:{http_a}"),
            base_b: format!("http://127.0.0.1:{http_b}"),
            agent_addresses: format!("127.0.0.1:{grpc_a},http://127.0.0.1:{grpc_b}"),
        }
    }
}

/// Active-passive failover: a standby waits (binding nothing) while the active coordinator
/// holds the database; kill -9 of the active one mid-job, and the standby takes the lock,
/// resumes the job from the database, the agent (given both addresses) reconnects to it, and
/// the client's Idempotency-Key retry there gets the uninterrupted greedy answer, from one
/// stored job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_coordinator_is_killed() {
    let Some(db) = Database::fresh().await else {
        return;
    };
    let client = reqwest::Client::new();
    let Pair {
        mut active,
        mut standby,
        base_a,
        base_b,
        agent_addresses,
    } = Pair::start(&client, &db).await;
    let _agent = start_agent(&agent_addresses, "vehicle-failover", 2).await;
    wait_models(&client, &base_a).await;
    let (body, reference) = long_story_reference(&client, &base_a, "failover-reference").await;
    // The standby is still waiting, and serves nothing while it waits.
    assert!(
        standby.0.try_wait().unwrap().is_none(),
        "the standby must wait, not exit"
    );
    assert!(client.get(format!("{base_b}/livez")).send().await.is_err());

    let at_kill = kill_mid_job(&client, &db, &base_a, &body, "failover", &mut active).await;
    let killed = Instant::now();

    wait_http(&client, &base_b).await;
    wait_models(&client, &base_b).await;
    eprintln!(
        "killed with the job at {at_kill:?}; the standby served the agent again {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    let (status, retried) = chat(&client, &base_b, "failover", &body).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(text(&retried), reference);
    db.assert_one_done_job("failover").await;
    assert!(
        standby.0.try_wait().unwrap().is_none(),
        "the standby runs on"
    );
}

/// Failover under load: kill -9 of the active coordinator while 30 streaming requests and a
/// 100-line batch run on two agents. Every stream, retried with its Idempotency-Key on the
/// standby, completes with the uninterrupted greedy answer (what the client had before the
/// kill is its start), and every batch line is answered exactly once, with the greedy answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_under_load_answers_every_stream_and_batch_line_once() {
    const STREAMS: usize = 30;
    const LINES: usize = 100;
    const STREAM_TOKENS: u32 = 32;
    const LINE_TOKENS: u32 = 16;
    let Some(db) = Database::fresh().await else {
        return;
    };
    let client = reqwest::Client::new();
    let Pair {
        mut active,
        standby: _standby,
        base_a,
        base_b,
        agent_addresses,
    } = Pair::start(&client, &db).await;
    let _agents = (
        start_agent(&agent_addresses, "vehicle-a", 4).await,
        start_agent(&agent_addresses, "vehicle-b", 4).await,
    );
    wait_models(&client, &base_a).await;

    let batch_id = start_batch(&client, &base_a, &input(LINES, LINE_TOKENS), "24h").await;
    let streams = spawn_streams(
        &client,
        std::slice::from_ref(&base_a),
        STREAMS,
        STREAM_TOKENS,
    );
    let at_kill = wait_for_kill_point(&db, STREAMS, LINES).await;
    active.0.kill().unwrap();
    let _ = active.0.wait();
    let killed = Instant::now();
    let mut received = Vec::new();
    for s in streams {
        received.push(s.await.unwrap());
    }
    wait_http(&client, &base_b).await;
    wait_models(&client, &base_b).await;
    eprintln!(
        "killed with {} streams stored, {} with tokens, {} of {} batch lines done; the standby \
         served again {:.1} s later",
        at_kill.0,
        at_kill.1,
        at_kill.2,
        at_kill.3,
        killed.elapsed().as_secs_f64()
    );

    // Every stream, retried on the standby with its key, ends with the whole answer; every
    // batch line is answered once; all as the fault-free greedy answers.
    check_answers(
        &client,
        &base_b,
        &batch_id,
        &received,
        STREAM_TOKENS,
        LINE_TOKENS,
    )
    .await;
    for i in 0..STREAMS {
        db.assert_one_done_job(&format!("stream-{i}")).await;
    }
}

/// Where a coordinator's log goes: the file `$TOKENFLEET_TEST_LOG_DIR/<name>.log` when that
/// is set (to read a failing run's logs), else nowhere.
fn log_to(name: &str) -> Stdio {
    match std::env::var_os("TOKENFLEET_TEST_LOG_DIR") {
        Some(dir) => std::fs::File::create(std::path::Path::new(&dir).join(format!("{name}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        None => Stdio::null(),
    }
}

/// Waits until all `streams` keyed streams are stored, some hold tokens, and the batch of
/// `lines` is under way but not done: the moment the failover tests kill a coordinator.
/// Returns [`Database::progress`] then.
async fn wait_for_kill_point(db: &Database, streams: usize, lines: usize) -> (i64, i64, i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = db.progress("stream-").await;
        if p.0 == streams as i64 && p.1 > 0 && p.2 > 0 && p.2 < lines as i64 {
            return p;
        }
        assert!(Instant::now() < deadline, "no progress to kill at: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `n` streaming requests (`stream-{i}` keys), stream `i` at `bases[i % bases.len()]`;
/// each task returns what its client received until the stream ended or was cut, or None
/// when the request was not accepted.
fn spawn_streams(
    client: &reqwest::Client,
    bases: &[String],
    n: usize,
    tokens: u32,
) -> Vec<tokio::task::JoinHandle<Option<String>>> {
    (0..n)
        .map(|i| {
            let req = client
                .post(format!("{}/v1/chat/completions", bases[i % bases.len()]))
                .bearer_auth(KEY)
                .header("Idempotency-Key", format!("stream-{i}"))
                .json(&failover_stream_body(i, tokens));
            tokio::spawn(async move {
                match req.send().await {
                    Ok(r) if r.status() == 200 => Some(received_until_cut(r).await),
                    _ => None,
                }
            })
        })
        .collect()
}

/// The streaming request of stream `i` in the failover tests.
fn failover_stream_body(i: usize, tokens: u32) -> Value {
    greedy_chat(
        &format!("Write two sentences about {}.", TOPICS[i % TOPICS.len()]),
        tokens,
        true,
    )
}

/// After a failover: every stream `i` (what its client had received before the cut in
/// `received[i]`), retried at `base` with its Idempotency-Key, ends with its whole answer, and
/// the batch completes with every line answered once; each the fault-free greedy answer
/// (asked at `base` without a key).
async fn check_answers(
    client: &reqwest::Client,
    base: &str,
    batch_id: &str,
    received: &[Option<String>],
    stream_tokens: u32,
    line_tokens: u32,
) {
    let streams = received.len();
    let mut answers = Vec::new();
    for i in 0..streams {
        let resp = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", format!("stream-{i}"))
            .json(&failover_stream_body(i, stream_tokens))
            .timeout(Duration::from_secs(180))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "stream-{i}");
        let events = sse_events(resp, Duration::from_secs(180)).await;
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "stream-{i}"
        );
        answers.push(chat_stream_text(&events));
    }
    let b = wait_batch(client, base, batch_id, ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    let lines = b["request_counts"]["total"].as_u64().unwrap() as usize;
    let (output, errors) = results(client, base, &b, lines).await;
    assert!(errors.is_empty(), "{errors:?}");
    for topic in 0..TOPICS.len() {
        let (status, direct) = chat(client, base, &format!("reference-stream-{topic}"), &{
            let mut body = failover_stream_body(topic, stream_tokens);
            body["stream"] = false.into();
            body
        })
        .await;
        assert_eq!(status, 200, "{direct}");
        for i in (topic..streams).step_by(TOPICS.len()) {
            assert_eq!(answers[i], text(&direct), "stream-{i}");
            if let Some(part) = &received[i] {
                assert!(
                    answers[i].starts_with(part.as_str()),
                    "stream-{i}: {part:?} before the kill, then {:?}",
                    answers[i]
                );
            }
        }
        let (status, direct) = chat(
            client,
            base,
            &format!("reference-line-{topic}"),
            &line_body(topic, line_tokens),
        )
        .await;
        assert_eq!(status, 200, "{direct}");
        for i in (topic..lines).step_by(TOPICS.len()) {
            let body = &output[&format!("req-{i}")]["response"]["body"];
            assert_eq!(
                body["choices"][0]["message"]["content"],
                direct["choices"][0]["message"]["content"],
                "req-{i}"
            );
        }
    }
}

/// Active-active: two coordinators in a cluster on one database, each with its own agent
/// (and the other's address to fall back to), streams sent to both, a 100-line batch. kill -9
/// of one mid-load: its agent moves to the survivor, which takes over the jobs the agent
/// brings and, once their lease runs out, the dead one's queued jobs; its clients retry with
/// their keys on the survivor and get the rest. The survivor's own streams never notice.
/// Every stream ends with the greedy answer, every batch line is answered once, one stored
/// job per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_survives_kill_9_of_a_coordinator_under_load() {
    const STREAMS: usize = 30;
    const LINES: usize = 100;
    const STREAM_TOKENS: u32 = 32;
    const LINE_TOKENS: u32 = 16;
    let Some(db) = Database::fresh().await else {
        return;
    };
    let client = reqwest::Client::new();
    let (http_a, grpc_a) = (free_port(), free_port());
    let (http_b, grpc_b) = (free_port(), free_port());
    let member = |id: &'static str| ["--cluster-id", id, "--cluster-lease-ms", "2000"];
    let mut a = Proc(coordinator_with(
        &db,
        http_a,
        grpc_a,
        log_to("a"),
        &member("a"),
    ));
    let _b = Proc(coordinator_with(
        &db,
        http_b,
        grpc_b,
        log_to("b"),
        &member("b"),
    ));
    let (base_a, base_b) = (
        format!("http://127.0.0.1:{http_a}"),
        format!("http://127.0.0.1:{http_b}"),
    );
    wait_http(&client, &base_a).await;
    wait_http(&client, &base_b).await;
    let _agents = (
        start_agent(
            &format!("127.0.0.1:{grpc_a},http://127.0.0.1:{grpc_b}"),
            "vehicle-a",
            4,
        )
        .await,
        start_agent(
            &format!("127.0.0.1:{grpc_b},http://127.0.0.1:{grpc_a}"),
            "vehicle-b",
            4,
        )
        .await,
    );
    wait_models(&client, &base_a).await;
    wait_models(&client, &base_b).await;

    let batch_id = start_batch(&client, &base_a, &input(LINES, LINE_TOKENS), "24h").await;
    let streams = spawn_streams(
        &client,
        &[base_a.clone(), base_b.clone()],
        STREAMS,
        STREAM_TOKENS,
    );
    let at_kill = wait_for_kill_point(&db, STREAMS, LINES).await;
    a.0.kill().unwrap();
    let _ = a.0.wait();
    let mut received = Vec::new();
    let mut accepted_on_b = 0;
    for (i, s) in streams.into_iter().enumerate() {
        let got = s.await.unwrap();
        if i % 2 == 1 && got.is_some() {
            accepted_on_b += 1;
        }
        received.push(got);
    }
    eprintln!(
        "killed a with {} streams stored, {} with tokens, {} of {} batch lines done",
        at_kill.0, at_kill.1, at_kill.2, at_kill.3
    );
    assert_eq!(
        accepted_on_b,
        STREAMS / 2,
        "every stream sent to the survivor was accepted"
    );
    check_answers(
        &client,
        &base_b,
        &batch_id,
        &received,
        STREAM_TOKENS,
        LINE_TOKENS,
    )
    .await;
    for i in 0..STREAMS {
        db.assert_one_done_job(&format!("stream-{i}")).await;
    }
}
