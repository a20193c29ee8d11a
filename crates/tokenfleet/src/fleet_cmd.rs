//! Enrollment and revocation from the command line:
//!
//! - `tokenfleet fleet token --node-id ID`: the operator issues a one-time enrollment token
//!   (stored hashed in the coordinator's store, expiring, single use);
//! - `tokenfleet fleet quarantine list|release|confirm`: vehicles result verification took
//!   out, and failures its circuit breaker held for an operator's decision;
//! - `tokenfleet fleet revoke --node-id ID`: revokes a vehicle (the running coordinator ends
//!   its sessions within its revocation poll interval and refuses it from then on);
//! - `tokenfleet enroll --token T --ca-cert fleet-ca.pem`: on the vehicle, trades the token for
//!   a certificate for a key generated there.
//!
//! Plus [`enroll_local`], the same path for fleets on one machine (`tokenfleet up`, tests).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use tokenfleet_agent::attest::tpm::TpmAttestor;
use tokenfleet_agent::attest::{Attestor, Measured};
use tokenfleet_agent::identity::{enroll, Enrolled, IdentityDir};
use tokenfleet_coordinator::domain::store::Store;
use tokenfleet_coordinator::trust::security::registry::Registry;
use tokenfleet_coordinator::trust::security::Security;

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Issue a one-time enrollment token for a vehicle (printed on stdout).
    Token(TokenArgs),
    /// Revoke a vehicle: its live sessions end and it can never connect again.
    Revoke(RevokeArgs),
    /// Vehicles taken out by result verification: list, release, or confirm a held failure.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Vehicles quarantined, and failures the circuit breaker holds for a decision.
    List(DbArgs),
    /// Let a vehicle back in: it reconnects at its next attempt and is judged afresh (every
    /// job checked again until it earns trust).
    Release(NodeArgs),
    /// Quarantine a vehicle whose failure the circuit breaker held.
    Confirm(NodeArgs),
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// The coordinator's job store (SQLite).
    #[arg(long, env = "TOKENFLEET_DB", default_value = "tokenfleet.db")]
    pub db: PathBuf,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[arg(long)]
    pub node_id: String,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The coordinator's job store (SQLite).
    #[arg(long, env = "TOKENFLEET_DB", default_value = "tokenfleet.db")]
    pub db: PathBuf,
    /// The node id the vehicle's certificate will carry.
    #[arg(long)]
    pub node_id: String,
    /// How long the token stays valid, seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub ttl_s: u64,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[arg(long, env = "TOKENFLEET_DB", default_value = "tokenfleet.db")]
    pub db: PathBuf,
    #[arg(long)]
    pub node_id: String,
    /// Recorded with the revocation.
    #[arg(long, default_value = "revoked by operator")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The coordinator's enrollment service.
    #[arg(
        long,
        env = "TOKENFLEET_ENROLL_URL",
        default_value = "https://127.0.0.1:50052"
    )]
    pub coordinator: String,
    /// The fleet CA certificate (PEM) the operator handed out with the token.
    #[arg(long, env = "TOKENFLEET_FLEET_CA")]
    pub ca_cert: PathBuf,
    /// The one-time enrollment token.
    #[arg(long, env = "TOKENFLEET_ENROLL_TOKEN")]
    pub token: String,
    /// Where the node certificate, key and fleet CA are stored.
    #[arg(long, env = "TOKENFLEET_IDENTITY_DIR", default_value_os_t = default_identity_dir())]
    pub identity_dir: PathBuf,
    /// The vehicle's TPM (TCTI, e.g. `device:/dev/tpmrm0` or `swtpm:host=127.0.0.1,port=2321`):
    /// its attestation key is bound to the node at enrollment.
    #[arg(long, env = "TOKENFLEET_TPM")]
    pub tpm: Option<String>,
    /// The resettable PCR the agent measures into (16 or 23).
    #[arg(long, env = "TOKENFLEET_PCR", default_value_t = 23)]
    pub pcr: u32,
}

pub fn default_identity_dir() -> PathBuf {
    crate::cli::default_cache_dir().join("identity")
}

/// The coordinator's store: PostgreSQL when `TOKENFLEET_DATABASE_URL` is set (as the
/// coordinator reads it), else the SQLite file at `db`. Operator commands write single rows
/// with conditional statements, so they may run beside the coordinator on either backend.
async fn open_store(db: &Path) -> anyhow::Result<Store> {
    use tokenfleet_coordinator::config::{database_url_from_env, DATABASE_URL_ENV, STORE_KEYS_ENV};
    if let Some(url) = database_url_from_env() {
        anyhow::ensure!(
            std::env::var_os(STORE_KEYS_ENV).is_some(),
            "{DATABASE_URL_ENV} is set: give the PostgreSQL store's keys in {STORE_KEYS_ENV} \
             (the coordinator's)"
        );
        let sealer =
            tokenfleet_coordinator::config::store_sealer(db, None).context("the job store keys")?;
        return Store::connect_postgres(&url, sealer)
            .await
            .with_context(|| format!("opening the PostgreSQL job store ({DATABASE_URL_ENV})"));
    }
    let sealer = tokenfleet_coordinator::config::store_sealer(db, None)
        .with_context(|| format!("the job store keys of {}", db.display()))?;
    Store::open(db, sealer).with_context(|| format!("opening {}", db.display()))
}

async fn open_registry(db: &Path) -> anyhow::Result<Registry> {
    Ok(Registry::new(open_store(db).await?))
}

async fn quarantine(cmd: QuarantineCommand) -> anyhow::Result<()> {
    use tokenfleet_coordinator::trust::reputation::{decide, operator_states, Decision};
    let (db, node, decision) = match &cmd {
        QuarantineCommand::List(a) => {
            let store = open_store(&a.db).await?;
            let states = operator_states(&store).await?;
            let mut any = false;
            for s in states {
                let (what, (ms, why)) = match (s.quarantined, s.held) {
                    (Some(q), _) => ("quarantined", q),
                    (None, Some(h)) => ("held", h),
                    (None, None) => continue,
                };
                any = true;
                println!("{}\t{what}\tsince_unix_ms={ms}\t{why}", s.node);
            }
            if !any {
                eprintln!("no vehicle is quarantined or held");
            }
            return Ok(());
        }
        QuarantineCommand::Release(a) => (&a.db.db, &a.node_id, Decision::Release),
        QuarantineCommand::Confirm(a) => (&a.db.db, &a.node_id, Decision::Confirm),
    };
    let store = open_store(db).await?;
    anyhow::ensure!(
        decide(&store, node, decision).await?,
        "{node} has no verification record in {}",
        db.display()
    );
    store.flush().await?;
    eprintln!(
        "{node}: {} (a running coordinator applies it within seconds)",
        match decision {
            Decision::Release => "released",
            Decision::Confirm => "quarantined",
        }
    );
    Ok(())
}

pub async fn run(cmd: FleetCommand) -> anyhow::Result<()> {
    match cmd {
        FleetCommand::Token(a) => {
            let registry = open_registry(&a.db).await?;
            let token = registry.issue_token(&a.node_id, a.ttl_s * 1000).await?;
            eprintln!(
                "enrollment token for {} (single use, valid {} s):",
                a.node_id, a.ttl_s
            );
            println!("{token}");
        }
        FleetCommand::Revoke(a) => {
            let registry = open_registry(&a.db).await?;
            registry.revoke(&a.node_id, &a.reason).await?;
            eprintln!("revoked {}: a running coordinator disconnects it within its revocation poll interval", a.node_id);
        }
        FleetCommand::Quarantine(cmd) => quarantine(cmd).await?,
    }
    Ok(())
}

pub async fn enroll_cmd(a: EnrollArgs) -> anyhow::Result<()> {
    let ca = std::fs::read(&a.ca_cert).with_context(|| format!("{}", a.ca_cert.display()))?;
    let tpm = match &a.tpm {
        Some(tcti) => Some(TpmAttestor::open(tcti, a.pcr)?),
        None => None,
    };
    let dir = IdentityDir::new(&a.identity_dir);
    let enrolled = enroll(
        &a.coordinator,
        &ca,
        &a.token,
        &dir,
        tpm.as_ref().map(|t| t as &dyn Attestor),
    )
    .await?;
    println!(
        "enrolled as {} ({}); identity in {}",
        enrolled.node_id,
        if enrolled.attested {
            "TPM attestation key bound"
        } else {
            "no TPM"
        },
        a.identity_dir.display()
    );
    Ok(())
}

/// Enrolls a vehicle of a fleet on this machine through the real path: a token from the
/// registry, then the enrollment service over TLS.
pub async fn enroll_local(
    security: &Security,
    enroll_addr: std::net::SocketAddr,
    node_id: &str,
    dir: &Path,
    attestor: Option<&dyn Attestor>,
) -> anyhow::Result<(IdentityDir, Enrolled)> {
    let token = security.registry.issue_token(node_id, 600_000).await?;
    let identity = IdentityDir::new(dir);
    let enrolled = enroll(
        &format!("https://{enroll_addr}"),
        security.ca.cert_pem().as_bytes(),
        &token,
        &identity,
        attestor,
    )
    .await?;
    Ok((identity, enrolled))
}

/// Opens the vehicle's TPM and extends the agent's measurements into it: its own binary, then
/// each served model (name and sha256 hex), in order.
pub fn measured_tpm(
    tcti: &str,
    pcr: u32,
    models: &[(String, String)],
) -> anyhow::Result<TpmAttestor> {
    let tpm = TpmAttestor::open(tcti, pcr)?;
    let mut log = vec![Measured::own_binary()?];
    for (name, sha) in models {
        log.push(Measured::model(name.clone(), sha)?);
    }
    tpm.measure(log)?;
    Ok(tpm)
}
