//! Issue #7, TPM 2.0 attestation with a real software TPM (swtpm) per agent: a node proves
//! which agent build and which model files it runs, by a quote over a fresh nonce, before any
//! job is assigned to it. Every refused agent here runs next to an honest one; the tests
//! check that the refused one never received an Assign and that the job ran elsewhere.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::model_path;
use common::secure::{
    agent, engine, is_connected, is_failed, unattested_agent, wait_serving, wait_status,
    SecureFleet,
};
use tokenfleet::swtpm::SoftwareTpm;
use tokenfleet_agent::attest::tpm::TpmAttestor;
use tokenfleet_agent::attest::{AttestError, Attestor, Evidence, Measured};
use tokenfleet_agent::config::SharedAttestor;
use tokenfleet_agent::{Agent, SessionStatus};
use tokenfleet_coordinator::config::SecurityConfig;
use tokenfleet_engine::Engine;
use tokenfleet_protocol::v1::MeasurementKind;

const PCR: u32 = 23;

/// Set to skip the swtpm tests on a machine without swtpm. CI does not set it, so there a
/// missing swtpm fails these tests instead of passing them unrun.
const SKIP_ENV: &str = "TOKENFLEET_SKIP_SWTPM_TESTS";

/// swtpm is installed by scripts/setup.sh. Without it a test fails, unless the run opted out
/// explicitly with `TOKENFLEET_SKIP_SWTPM_TESTS=1` (then it says so loudly and passes).
fn swtpm_or_skip(test: &str) -> bool {
    if tokenfleet::swtpm::available() {
        return true;
    }
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("\n*** SKIPPED {test}: swtpm is not installed and {SKIP_ENV}=1 ***\n");
        return false;
    }
    panic!("{test} needs swtpm (scripts/setup.sh installs it); set {SKIP_ENV}=1 to skip the swtpm tests explicitly");
}

fn model_sha() -> String {
    tokenfleet_engine::gguf::sha256_file(&model_path()).unwrap()
}

fn own_build() -> String {
    hex::encode(Measured::own_binary().unwrap().sha256)
}

/// Only this test binary and the real model are allowed.
fn strict_policy() -> SecurityConfig {
    SecurityConfig {
        allow_unattested: false,
        pcr_index: PCR,
        allowed_agent_builds: vec![own_build()],
        allowed_models: vec![model_sha()],
        ..Default::default()
    }
}

/// A vehicle: its swtpm, the attestor with `log` measured into it, enrolled as `node_id`.
struct Vehicle {
    _tpm: SoftwareTpm,
    attestor: Arc<TpmAttestor>,
    identity: tokenfleet_agent::identity::IdentityDir,
}

async fn vehicle(fleet: &SecureFleet, node_id: &str, log: Vec<Measured>) -> Vehicle {
    let tpm = SoftwareTpm::start(&fleet.dir.path().join(format!("tpm-{node_id}"))).unwrap();
    let attestor = TpmAttestor::open(&tpm.tcti(), PCR).unwrap();
    attestor.measure(log).unwrap();
    let identity = fleet.enroll(node_id, Some(&attestor)).await;
    Vehicle {
        _tpm: tpm,
        attestor: Arc::new(attestor),
        identity,
    }
}

fn honest_log(sha: &str) -> Vec<Measured> {
    vec![
        Measured::own_binary().unwrap(),
        Measured::model(common::MODEL, sha).unwrap(),
    ]
}

/// The honest agent every test runs next to the one under test.
async fn honest(fleet: &SecureFleet, engine: &Engine, sha: &str) -> (Vehicle, Agent) {
    let v = vehicle(fleet, "honest", honest_log(sha)).await;
    let a = agent(
        fleet,
        engine,
        sha,
        Some(v.identity.clone()),
        Some(SharedAttestor(v.attestor.clone())),
        |_| {},
    );
    wait_status(&a, "honest agent attested", is_connected).await;
    wait_serving(fleet).await;
    (v, a)
}

/// Sends a few jobs; all complete, and none reached `refused`.
async fn jobs_run_elsewhere(fleet: &SecureFleet, honest: &Agent, refused: &Agent) {
    for i in 0..3 {
        let (status, body) = fleet.chat(&format!("Count to {i}."), false).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        refused.assignments_received(),
        0,
        "a refused agent got a job"
    );
    assert!(honest.assignments_received() >= 3);
}

fn failure(s: &SessionStatus) -> String {
    match s {
        SessionStatus::Failed(why) => why.clone(),
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_agent_serves_sensitive_requests() {
    if !swtpm_or_skip("attested_agent_serves_sensitive_requests") {
        return;
    }
    let fleet = SecureFleet::start(strict_policy(), Duration::from_secs(60)).await;
    let sha = model_sha();
    let engine = engine(&model_path()).await;
    let (_v, a) = honest(&fleet, &engine, &sha).await;
    let (status, body) = fleet.chat("Say hi.", true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.assignments_received(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattested_node_gets_no_sensitive_requests() {
    let fleet = SecureFleet::start(
        SecurityConfig {
            allow_unattested: true,
            ..Default::default()
        },
        Duration::from_secs(3),
    )
    .await;
    let identity = fleet.enroll("no-tpm", None).await;
    let engine = engine(&model_path()).await;
    let a = unattested_agent(&fleet, &engine, Some(identity));
    wait_status(&a, "connected unattested", is_connected).await;
    wait_serving(&fleet).await;
    let (status, body) = fleet.chat("Say hi.", false).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = fleet.chat("A secret.", true).await;
    assert_eq!(
        status, 503,
        "a sensitive request ran on an unattested node: {body}"
    );
    assert_eq!(a.assignments_received(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_tpm_is_refused_where_policy_requires_attestation() {
    let fleet = SecureFleet::start(strict_policy(), Duration::from_secs(60)).await;
    // Enrollment already refuses a vehicle without an attestation key.
    let token = fleet
        .security
        .registry
        .issue_token("no-tpm", 60_000)
        .await
        .unwrap();
    let dir = tokenfleet_agent::identity::IdentityDir::new(fleet.dir.path().join("no-tpm"));
    let url = format!("https://{}", fleet.enroll);
    let ca = fleet.security.ca.cert_pem().as_bytes().to_vec();
    assert!(
        tokenfleet_agent::identity::enroll(&url, &ca, &token, &dir, None)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_differing_by_one_byte_is_refused() {
    if !swtpm_or_skip("model_differing_by_one_byte_is_refused") {
        return;
    }
    let fleet = SecureFleet::start(strict_policy(), Duration::from_secs(60)).await;
    let sha = model_sha();
    let engine_ok = engine(&model_path()).await;
    let (_h, honest_agent) = honest(&fleet, &engine_ok, &sha).await;
    // The same model with its last byte (tensor data) flipped: it still loads and runs.
    let tampered = fleet.dir.path().join("tampered.gguf");
    std::fs::copy(model_path(), &tampered).unwrap();
    flip_last_byte(&tampered);
    // The vehicle is enrolled with its TPM's key; what gets measured is then up to the
    // agent itself: `tokenfleet agent` loads the file, hashes what it loaded and measures
    // that into the TPM (the test does not compute the measurement for it).
    let tpm = SoftwareTpm::start(&fleet.dir.path().join("tpm-tampered")).unwrap();
    let enrolled = TpmAttestor::open(&tpm.tcti(), PCR).unwrap();
    fleet.enroll("tampered", Some(&enrolled)).await;
    drop(enrolled);
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        agent: tokenfleet::serve::AgentArgs,
    }
    let cli = <Cli as clap::Parser>::parse_from([
        "tokenfleet-agent".to_string(),
        format!("--model={}", tampered.display()),
        format!("--coordinator=https://{}", fleet.grpc),
        format!(
            "--identity-dir={}",
            fleet.dir.path().join("identity-tampered").display()
        ),
        format!("--tpm={}", tpm.tcti()),
        format!("--pcr={PCR}"),
        format!("--model-name={}", common::MODEL),
        "--slots=1".to_string(),
        "--ctx=512".to_string(),
    ]);
    let bad = tokenfleet::serve::start_agent(&cli.agent, 1)
        .await
        .expect("the tampered model loads and runs");
    let why = failure(&wait_status(&bad, "refused", is_failed).await);
    assert!(why.contains("not allowed"), "{why}");
    jobs_run_elsewhere(&fleet, &honest_agent, &bad).await;
}

fn flip_last_byte(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::End(-1)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::End(-1)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_not_allowed_is_refused() {
    if !swtpm_or_skip("agent_binary_not_allowed_is_refused") {
        return;
    }
    let fleet = SecureFleet::start(strict_policy(), Duration::from_secs(60)).await;
    let sha = model_sha();
    let engine = engine(&model_path()).await;
    let (_h, honest_agent) = honest(&fleet, &engine, &sha).await;
    // A different agent build: this vehicle's measured binary is not on the allow-list.
    let other_build = Measured::file(
        MeasurementKind::AgentBinary,
        "tokenfleet-agent",
        Path::new("/bin/sh"),
    )
    .unwrap();
    let log = vec![other_build, Measured::model(common::MODEL, &sha).unwrap()];
    let v = vehicle(&fleet, "other-build", log).await;
    let bad = agent(
        &fleet,
        &engine,
        &sha,
        Some(v.identity.clone()),
        Some(SharedAttestor(v.attestor.clone())),
        |_| {},
    );
    let why = failure(&wait_status(&bad, "refused", is_failed).await);
    assert!(why.contains("agent build"), "{why}");
    jobs_run_elsewhere(&fleet, &honest_agent, &bad).await;
}

/// Reports an allowed log whatever the TPM measured (the PCR digest gives it away).
struct LyingLog {
    tpm: Arc<TpmAttestor>,
    claimed: Vec<Measured>,
}

impl Attestor for LyingLog {
    fn attestation_key(&self) -> Result<Vec<u8>, AttestError> {
        self.tpm.attestation_key()
    }
    fn quote(&self, nonce: &[u8], pcr: u32) -> Result<Evidence, AttestError> {
        let mut e = self.tpm.quote(nonce, pcr)?;
        e.log = self.claimed.clone();
        Ok(e)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measurement_log_that_does_not_match_the_pcr_is_refused() {
    if !swtpm_or_skip("measurement_log_that_does_not_match_the_pcr_is_refused") {
        return;
    }
    let fleet = SecureFleet::start(strict_policy(), Duration::from_secs(60)).await;
    let sha = model_sha();
    let engine = engine(&model_path()).await;
    let (_h, honest_agent) = honest(&fleet, &engine, &sha).await;
    let mut tampered = [0u8; 32];
    tampered[0] = 1;
    let measured = vec![
        Measured::own_binary().unwrap(),
        Measured::model(common::MODEL, &hex::encode(tampered)).unwrap(),
    ];
    let v = vehicle(&fleet, "liar", measured).await;
    let liar = LyingLog {
        tpm: v.attestor.clone(),
        claimed: honest_log(&sha),
    };
    let bad = agent(
        &fleet,
        &engine,
        &sha,
        Some(v.identity.clone()),
        Some(SharedAttestor(Arc::new(liar))),
        |_| {},
    );
    let why = failure(&wait_status(&bad, "refused", is_failed).await);
    assert!(why.contains("measurement log"), "{why}");
    jobs_run_elsewhere(&fleet, &honest_agent, &bad).await;
}

/// Records every quote, or answers every challenge with the first one it recorded.
struct Recorder {
    tpm: Arc<TpmAttestor>,
    recorded: Mutex<Vec<Evidence>>,
    replay: bool,
}

impl Attestor for Recorder {
    fn attestation_key(&self) -> Result<Vec<u8>, AttestError> {
        self.tpm.attestation_key()
    }
    fn quote(&self, nonce: &[u8], pcr: u32) -> Result<Evidence, AttestError> {
        let mut recorded = self.recorded.lock().unwrap();
        if self.replay {
            return Ok(recorded[0].clone());
        }
        let e = self.tpm.quote(nonce, pcr)?;
        recorded.push(e.clone());
        Ok(e)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_quote_is_refused() {
    if !swtpm_or_skip("replayed_quote_is_refused") {
        return;
    }
    let fleet = SecureFleet::start(strict_policy(), Duration::from_secs(60)).await;
    let sha = model_sha();
    let engine = engine(&model_path()).await;
    let (_h, honest_agent) = honest(&fleet, &engine, &sha).await;
    let v = vehicle(&fleet, "replayer", honest_log(&sha)).await;
    // A genuine session first, recording its quote...
    let recorder = Arc::new(Recorder {
        tpm: v.attestor.clone(),
        recorded: Mutex::new(Vec::new()),
        replay: false,
    });
    let genuine = agent(
        &fleet,
        &engine,
        &sha,
        Some(v.identity.clone()),
        Some(SharedAttestor(recorder.clone())),
        |_| {},
    );
    wait_status(&genuine, "genuine session", is_connected).await;
    genuine.stop().await;
    let recorded = recorder.recorded.lock().unwrap().clone();
    assert!(!recorded.is_empty());
    // ...then the same vehicle answers new challenges with that old quote.
    let replayer = Arc::new(Recorder {
        tpm: v.attestor.clone(),
        recorded: Mutex::new(recorded),
        replay: true,
    });
    let bad = agent(
        &fleet,
        &engine,
        &sha,
        Some(v.identity.clone()),
        Some(SharedAttestor(replayer)),
        |_| {},
    );
    let why = failure(&wait_status(&bad, "refused", is_failed).await);
    assert!(why.contains("stale or replayed"), "{why}");
    jobs_run_elsewhere(&fleet, &honest_agent, &bad).await;
}

/// `tokenfleet up` lost a vehicle for good: the TPM connection one vehicle had open while the
/// next vehicle's swtpm started lived on in that child (libtss2's swtpm TCTI opens sockets
/// without close-on-exec), and the first vehicle's swtpm, which serves one connection at a
/// time, never read its next one; the vehicle's quote hung. A started swtpm holds no
/// descriptor of ours.
#[test]
fn a_started_swtpm_holds_no_descriptor_of_its_parent() {
    if !swtpm_or_skip("a_started_swtpm_holds_no_descriptor_of_its_parent") {
        return;
    }
    use std::os::fd::AsRawFd;
    // A socket without close-on-exec, as libtss2's swtpm TCTI opens them.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let fd = stream.as_raw_fd();
    // SAFETY: F_SETFD on a descriptor this test owns (alive until the end); it only clears
    // close-on-exec.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let ours = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpm = SoftwareTpm::start(dir.path()).unwrap();
    let theirs: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", tpm.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(
        !theirs.contains(&ours),
        "swtpm holds our socket {ours:?} (its descriptors: {theirs:?})"
    );
    drop(stream);
}
