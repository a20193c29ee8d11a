//! `tokenfleet up`: a whole fleet on one machine, secured like a real one.
//!
//! The coordinator runs with a fresh fleet CA; every vehicle is enrolled through the real
//! path (a one-time token from the registry, a key generated for the vehicle, a CSR to the
//! enrollment service over TLS) and connects with mutual TLS. With `swtpm` installed each
//! vehicle gets its own software TPM: the agent measures itself and its model into it and the
//! coordinator verifies its quotes against a policy of exactly this build and this model.
//! Without swtpm the fleet runs with a policy that allows unattested nodes, said loudly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokenfleet_agent::attest::tpm::TpmAttestor;
use tokenfleet_agent::attest::{Attestor, Measured};
use tokenfleet_coordinator::config::ApiKey;
use tokenfleet_coordinator::config::SecurityConfig;
use tokenfleet_coordinator::CoordinatorConfig;

use crate::cli::{default_cache_dir, EngineArgs};
use crate::serve::{ctrl_c, model_name_of, start_agent, AgentArgs, VehicleMode};

/// The PCR the demo's agents measure into.
const PCR: u32 = 23;

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Number of vehicles (agents) on this machine.
    #[arg(long, env = "TOKENFLEET_AGENTS", default_value_t = 3)]
    pub agents: u32,
    /// OpenAI-compatible API address.
    #[arg(long, env = "TOKENFLEET_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// API key to accept (default: a random one, printed).
    #[arg(long, env = "TOKENFLEET_API_KEY")]
    pub api_key: Option<String>,
    /// Operator key for `/metrics` and `/healthz` details (default: a random one, printed).
    #[arg(long, env = "TOKENFLEET_OPERATOR_KEY")]
    pub operator_key: Option<String>,
    /// Job store (default: a fresh file under the cache dir).
    #[arg(long, env = "TOKENFLEET_DB")]
    pub db: Option<PathBuf>,
    /// Concurrent sequences per vehicle.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Keep every vehicle parked (no departures).
    #[arg(long)]
    pub always_parked: bool,
    /// Virtual seconds per real second for the simulated vehicles.
    #[arg(long, default_value_t = 120.0)]
    pub speedup: f64,
    /// Run without software TPMs even when swtpm is installed (nodes join unattested).
    #[arg(long)]
    pub no_tpm: bool,
    /// Active coordinators (a cluster on one PostgreSQL database, `--database-url`): their
    /// APIs on consecutive ports from `--http`, the vehicles spread over them, each with the
    /// others' addresses to fail over to. 1: one coordinator (SQLite unless a database is
    /// given).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub coordinators: u32,
    /// The PostgreSQL job store (`postgresql://...`); needed with `--coordinators` above 1
    /// (`scripts/pg.sh start` gives a throwaway one; `scripts/demo.sh --coordinators 3` does it
    /// all).
    #[arg(long, env = "TOKENFLEET_DATABASE_URL")]
    pub database_url: Option<String>,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let key = args
        .api_key
        .clone()
        .unwrap_or_else(|| format!("tf-{}", hex::encode(rand::random::<[u8; 16]>())));
    let operator_key = args
        .operator_key
        .clone()
        .unwrap_or_else(|| format!("tfop-{}", hex::encode(rand::random::<[u8; 16]>())));
    let run_dir = default_cache_dir()
        .join("up")
        .join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let db = args.db.clone().unwrap_or_else(|| run_dir.join("fleet.db"));
    let model_path = args.engine.model.clone();
    let model_sha =
        tokio::task::spawn_blocking(move || tokenfleet_engine::gguf::sha256_file(&model_path))
            .await??;
    let agent_build = hex::encode(Measured::own_binary()?.sha256);
    let use_tpm = !args.no_tpm && crate::swtpm::available();
    if !use_tpm {
        tracing::warn!("no software TPM (swtpm missing or --no-tpm): the demo fleet runs with a policy that ALLOWS UNATTESTED nodes; requests marked sensitive will not be placed");
    }
    if args.coordinators > 1 && args.database_url.is_none() {
        anyhow::bail!(
            "--coordinators {} needs a PostgreSQL database shared by them: give --database-url \
             (or TOKENFLEET_DATABASE_URL); `eval \"$(scripts/pg.sh start)\"` starts a throwaway \
             one, and `scripts/demo.sh --coordinators {}` does it all",
            args.coordinators,
            args.coordinators
        );
    }
    let config = CoordinatorConfig {
        http_addr: args.http,
        grpc_addr: "127.0.0.1:0".parse()?,
        db_path: db.clone(),
        database_url: args.database_url.clone(),
        // On PostgreSQL the store's keys cannot sit beside the database: one file, shared.
        store_key_file: args
            .database_url
            .as_ref()
            .map(|_| run_dir.join("store.keys")),
        cluster: (args.coordinators > 1).then(|| tokenfleet_coordinator::config::ClusterConfig {
            id: Some("coordinator-1".into()),
            ..Default::default()
        }),
        api_keys: vec![ApiKey {
            key: key.clone(),
            tenant: "default".into(),
        }],
        operator_key: Some(operator_key.clone()),
        security: Some(SecurityConfig {
            ca_dir: run_dir.join("fleet-ca"),
            enroll_addr: "127.0.0.1:0".parse()?,
            allow_unattested: !use_tpm,
            pcr_index: PCR,
            allowed_agent_builds: vec![agent_build],
            allowed_models: vec![model_sha.clone()],
            cert_ttl: Duration::from_secs(3600),
            ..Default::default()
        }),
        // The demo fleet verifies its own vehicles: a trusted copy of the model on the
        // coordinator re-scores their finished jobs (every job of a new vehicle, fewer as it
        // earns trust).
        // The one name the demo's vehicles serve, bound to the one file they must load.
        models: vec![tokenfleet_coordinator::config::models::ModelBinding {
            name: model_name_of(&args.engine.model),
            sha256: tokenfleet_coordinator::config::models::Sha256Hex::parse(&model_sha)?,
        }],
        verification: tokenfleet_coordinator::config::verification::VerificationConfig {
            enabled: true,
            models: vec![args.engine.model.clone()],
            ..Default::default()
        },
        ..Default::default()
    };
    // The first coordinator creates the fleet CA and the store's keys; the others find them.
    let mut cluster = vec![tokenfleet_coordinator::start(config.clone(), ctrl_c()).await?];
    for i in 1..args.coordinators {
        let mut member = config.clone();
        member.http_addr = SocketAddr::new(args.http.ip(), args.http.port() + i as u16);
        if let (Some(c), Some(s)) = (member.cluster.as_mut(), member.security.as_mut()) {
            c.id = Some(format!("coordinator-{}", i + 1));
            s.enroll_addr = "127.0.0.1:0".parse()?;
        }
        cluster.push(tokenfleet_coordinator::start(member, ctrl_c()).await?);
    }
    let grpc: Vec<String> = cluster
        .iter()
        .map(|r| format!("https://{}", r.bound.grpc))
        .collect();
    let running = &cluster[0];
    let security = running
        .security
        .clone()
        .expect("the demo coordinator runs with [security]");
    let enroll_addr = running
        .bound
        .enroll
        .expect("the enrollment service runs with [security]");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2);
    let threads = (cores / args.agents.max(1)).max(1);
    let mut agents = Vec::new();
    let mut tpms = Vec::new();
    for i in 0..args.agents {
        let node_id = format!("vehicle-{}", i + 1);
        let tpm = if use_tpm {
            Some(crate::swtpm::SoftwareTpm::start(
                &run_dir.join(format!("tpm-{node_id}")),
            )?)
        } else {
            None
        };
        let tcti = tpm.as_ref().map(|t| t.tcti());
        let attestor = match tcti.clone() {
            Some(t) => {
                Some(tokio::task::spawn_blocking(move || TpmAttestor::open(&t, PCR)).await??)
            }
            None => None,
        };
        let identity_dir = run_dir.join(&node_id);
        crate::fleet_cmd::enroll_local(
            &security,
            enroll_addr,
            &node_id,
            &identity_dir,
            attestor.as_ref().map(|a| a as &dyn Attestor),
        )
        .await?;
        let a = AgentArgs {
            engine: EngineArgs {
                model: args.engine.model.clone(),
                threads: args.engine.threads,
            },
            // Each vehicle starts at its own coordinator and knows the others to fail over.
            coordinator: (0..grpc.len())
                .map(|k| grpc[(i as usize + k) % grpc.len()].clone())
                .collect::<Vec<_>>()
                .join(","),
            ca_cert: None,
            node_id: None,
            identity_dir: Some(identity_dir),
            tpm: tcti,
            pcr: PCR,
            model_name: None,
            slots: args.slots,
            ctx: 2048,
            vehicle: if args.always_parked {
                VehicleMode::Parked
            } else {
                VehicleMode::Simulated
            },
            speedup: args.speedup,
            // Spread the fleet over the day so some cars come and go while others stay.
            start_hour: 16.0 + 1.3 * i as f64,
            replay: Default::default(),
        };
        agents.push(start_agent(&a, threads).await?);
        tpms.extend(tpm);
    }
    print_banner(&Banner {
        args: &args,
        cluster: &cluster,
        grpc: &grpc,
        enroll_addr,
        key: &key,
        operator_key: &operator_key,
        use_tpm,
        run_dir: &run_dir,
        db: &db,
    });
    for r in cluster {
        r.task.await??;
    }
    for a in agents {
        a.stop().await;
    }
    drop(tpms);
    Ok(())
}

/// What the banner printed once the fleet is up shows.
struct Banner<'a> {
    args: &'a UpArgs,
    cluster: &'a [tokenfleet_coordinator::Running],
    grpc: &'a [String],
    enroll_addr: SocketAddr,
    key: &'a str,
    operator_key: &'a str,
    use_tpm: bool,
    run_dir: &'a std::path::Path,
    db: &'a std::path::Path,
}

/// Where the fleet's APIs are, its keys, and a request to try.
fn print_banner(b: &Banner<'_>) {
    let model = model_name_of(&b.args.engine.model);
    println!(
        "tokenfleet is up: {} vehicles serving {model}",
        b.args.agents
    );
    for (k, r) in b.cluster.iter().enumerate() {
        let role = if b.cluster.len() > 1 {
            format!(" (coordinator-{}, active)", k + 1)
        } else {
            String::new()
        };
        println!(
            "  API       http://{}/v1   (OpenAI-compatible){role}",
            r.bound.http
        );
    }
    println!("  API key   {}", b.key);
    println!(
        "  agents    {} (gRPC, mutual TLS; enrolled via https://{})",
        b.grpc.join(", "),
        b.enroll_addr
    );
    println!(
        "  attest    {}",
        if b.use_tpm {
            "TPM 2.0 quotes (one swtpm per vehicle), verified before any job"
        } else {
            "NONE: policy allows unattested nodes (install swtpm for attestation)"
        }
    );
    println!("  fleet CA  {}", b.run_dir.join("fleet-ca").display());
    match &b.args.database_url {
        Some(_) => println!("  job store PostgreSQL (--database-url), shared by every coordinator"),
        None => println!("  job store {}", b.db.display()),
    }
    println!(
        "  metrics   http://{}/metrics   (operator key {})",
        b.cluster[0].bound.http, b.operator_key
    );
    println!();
    println!("try:");
    println!(
        "  curl -s http://{}/v1/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Explain why the sky is blue.\"}}], \"max_tokens\": 64}}'",
        b.cluster[0].bound.http, b.key
    );
    println!("Ctrl-C stops the fleet.");
}
