//! Coordinator configuration: what an operator writes once (TOML), with defaults that run a
//! whole fleet on one machine. Every section's type lives here ([`security`], [`policy`]:
//! regions and tenants, [`verification`], [`models`]: the canonical model hash and the
//! name→hash bindings), so the parts that run them import `config` and never the other way.
//!
//! Imports nothing from the crate.

pub mod models;
pub mod policy;
pub mod security;
mod store;
pub mod verification;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokenfleet_scheduler::PolicyKind;
use tokenfleet_store::{SealError, Sealer};

pub use security::SecurityConfig;
pub use store::{
    database_url_from_env, store_sealer, ClusterConfig, DATABASE_URL_ENV, STORE_KEYS_ENV,
};

/// An API key and the tenant it acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key: String,
    pub tenant: String,
}

/// TLS material for a listener (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// OpenAI-compatible HTTP API.
    pub http_addr: SocketAddr,
    /// Agent sessions (gRPC).
    pub grpc_addr: SocketAddr,
    /// Server-only TLS for the agent port with operator-provided files. Superseded by
    /// `[security]` (mutual TLS from the fleet CA); with neither, the port serves plaintext
    /// gRPC, which is allowed on a loopback address only (development and tests).
    pub grpc_tls: Option<TlsFiles>,
    /// Lets `grpc_tls` (server-only TLS: encrypted, but any client may connect and receive
    /// `Assign`s with tenants' prompts) serve a non-loopback address without `[security]`.
    /// Off by default: such a port hands work to anyone who can reach it. Loud by name on
    /// purpose; set only behind a network that admits vehicles alone.
    pub allow_unauthenticated_agents: bool,
    /// HTTPS for the client API (PEM files); plain HTTP without it.
    pub http_tls: Option<TlsFiles>,
    /// Enrollment, mutual TLS on the agent port and attestation (see `security::config`).
    pub security: Option<SecurityConfig>,
    /// SQLite job store (WAL mode), unless `database_url` is set.
    pub db_path: PathBuf,
    /// The job store on PostgreSQL instead of SQLite: a `postgresql://user:password@host/db`
    /// URL or a libpq `host=... dbname=...` string (plaintext connection: keep the database on
    /// the coordinator's host or a private network). One coordinator per database (a second
    /// is refused at start, or waits with `standby`), unless they are a `[cluster]`. Needs the store's keys given explicitly
    /// (`store_key_file` or `TOKENFLEET_STORE_KEYS`), since no file sits beside the database
    /// to default to. `TOKENFLEET_DATABASE_URL` takes precedence, so that a password need not
    /// be written into the config file.
    pub database_url: Option<String>,
    /// With `database_url`: wait for the database's sole-coordinator lock instead of refusing
    /// to start while another coordinator holds it, and take over when that one stops (its
    /// agents, given both addresses, reconnect here; its unfinished jobs resume from the
    /// database). Nothing is bound until then.
    pub standby: bool,
    /// `[cluster]`: one of several active coordinators on `database_url` (see
    /// [`ClusterConfig`]); without it the database has one coordinator.
    pub cluster: Option<ClusterConfig>,
    pub api_keys: Vec<ApiKey>,
    /// Placement policy: random, first-fit, tokenfleet or oracle.
    pub policy: String,
    /// Scheduler tunables (`[scheduler]`, any subset of `tokenfleet_scheduler::SchedulerConfig`:
    /// sample sizes, batch stay probability, `interactive_preempt_after_ms`, ...); the rest keep
    /// their defaults. The simulator's scenarios take the same table.
    pub scheduler: tokenfleet_scheduler::SchedulerConfig,
    /// Agents heartbeat this often.
    #[serde(with = "millis")]
    pub heartbeat_interval: Duration,
    /// A node silent this long loses its jobs (they resume elsewhere).
    #[serde(with = "millis")]
    pub lease_timeout: Duration,
    /// An interactive job no vehicle can take for this long fails with 503.
    #[serde(with = "millis")]
    pub queue_timeout: Duration,
    /// Progress is written to the store at least this often.
    #[serde(with = "millis")]
    pub persist_interval: Duration,
    /// Largest request body on every route but `POST /v1/files` (which takes
    /// `max_file_bytes`).
    pub max_body_bytes: usize,
    /// Bearer key for operator endpoints: `/metrics` and the details of `/healthz`. Without
    /// one they are not served over HTTP (`/livez` and a bare `/healthz` stay public).
    pub operator_key: Option<String>,
    /// Connections the client API (and, with `[security]`, the enrollment port) holds at
    /// once; one more is answered 503 and closed. Each costs a file descriptor: the default
    /// stays under the common 1024 soft limit with room for agents and the store.
    pub http_max_connections: usize,
    /// A client must send a whole request head within this (HTTP/1; it also closes idle
    /// keep-alive connections).
    #[serde(with = "millis")]
    pub http_header_read_timeout: Duration,
    /// A client must send a whole request body within this: 64 MiB (the largest upload) at
    /// 2 MB/s takes 32 s.
    #[serde(with = "millis")]
    pub http_body_read_timeout: Duration,
    /// Handlers other than generation must answer within this (503 otherwise). Generation
    /// answers take as long as the job (bounded by its deadline and the queue timeout) and a
    /// stream is never cut.
    #[serde(with = "millis")]
    pub http_request_timeout: Duration,
    pub max_prompt_chars: usize,
    pub max_tokens_limit: u32,
    pub default_max_tokens: u32,
    /// Jobs queued through the HTTP API (all tenants, either class) beyond which new
    /// requests get 429 (Batch API lines wait for their completion window and are not
    /// counted).
    pub max_queued_jobs: usize,
    /// The deadline of a `"tokenfleet": {"class": "batch"}` request sent to the HTTP API
    /// without its own `tokenfleet.deadline`: its client waits on the connection, so it must
    /// end some time (it fails with 503 if not done by then).
    #[serde(with = "millis")]
    pub http_batch_deadline: Duration,
    /// Keys sealing prompts and outputs in the job store (see `sealing`): one `id base64`
    /// line per key, newest first. Default `<db_path>.keys`, created with a fresh key when
    /// absent. `TOKENFLEET_STORE_KEYS` (`id:base64,...`) takes precedence over the file.
    pub store_key_file: Option<PathBuf>,
    /// Finished jobs (prompt, output, metadata) are deleted this long after they end.
    #[serde(with = "millis")]
    pub retention: Duration,
    /// Named data-residency regions (`[[regions]]`).
    pub regions: Vec<policy::RegionConfig>,
    /// Country boundaries (GeoJSON with ISO alpha-2 properties) for regions listing countries.
    pub country_boundaries: Option<PathBuf>,
    /// Per-tenant residency and rate limits (`[[tenants]]`).
    pub tenants: Vec<policy::TenantConfig>,
    /// Largest file `POST /v1/files` accepts.
    pub max_file_bytes: usize,
    /// Requests one batch may hold.
    pub max_batch_requests: usize,
    /// Per tenant: uploaded files it may hold (400 `file_limit_exceeded` past it; deleting
    /// files frees room). OpenAI allows an organization 10,000 files and 100 GB; this fleet
    /// keeps files in its one SQLite store, so the defaults are smaller.
    pub max_files_per_tenant: u64,
    /// Per tenant: bytes of uploaded files it may hold.
    pub max_file_bytes_per_tenant: u64,
    /// Per tenant: batches not yet ended (429 past it, until one ends).
    pub max_active_batches_per_tenant: u64,
    /// `completion_window` values a batch may ask for (`"24h"`, `"90m"`, `"30s"`).
    pub batch_completion_windows: Vec<String>,
    /// Write every scheduler round (inputs and decisions) to this file as JSON lines, for
    /// replay through the simulator and audits (see `decision_log`). Off by default.
    pub decision_log: Option<PathBuf>,
    /// Result verification (`[verification]`; off unless enabled).
    pub verification: verification::VerificationConfig,
    /// The models this fleet serves, each bound to one file (`[[models]] name = "...",
    /// sha256 = "..."`): a node announcing a bound name with another file, or an unbound name,
    /// is refused at its Hello. Empty: any name (development only; with `[security]` the
    /// attestation allow-list still limits the files, not which name each one serves).
    pub models: Vec<models::ModelBinding>,
    /// Progress deadline of running jobs and node standing (`[progress]`).
    pub progress: ProgressConfig,
    /// Node `State` messages a session accepts per second, sustained, and in a burst; excess
    /// messages are dropped and counted, and a session that keeps flooding is closed.
    pub node_state_rate: StateRate,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".parse().expect("literal address"),
            grpc_addr: "127.0.0.1:50051".parse().expect("literal address"),
            grpc_tls: None,
            allow_unauthenticated_agents: false,
            http_tls: None,
            security: None,
            db_path: PathBuf::from("tokenfleet.db"),
            database_url: None,
            standby: false,
            cluster: None,
            api_keys: Vec::new(),
            policy: "tokenfleet".into(),
            scheduler: tokenfleet_scheduler::SchedulerConfig::default(),
            heartbeat_interval: Duration::from_millis(1000),
            lease_timeout: Duration::from_millis(5000),
            queue_timeout: Duration::from_secs(120),
            persist_interval: Duration::from_millis(100),
            max_body_bytes: 1 << 20,
            operator_key: None,
            http_max_connections: 512,
            http_header_read_timeout: Duration::from_secs(10),
            http_body_read_timeout: Duration::from_secs(60),
            http_request_timeout: Duration::from_secs(60),
            max_prompt_chars: 64 * 1024,
            max_tokens_limit: 4096,
            default_max_tokens: 512,
            max_queued_jobs: 10_000,
            http_batch_deadline: Duration::from_secs(3600),
            store_key_file: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            regions: Vec::new(),
            country_boundaries: None,
            tenants: Vec::new(),
            max_file_bytes: 64 << 20,
            max_batch_requests: 50_000,
            max_files_per_tenant: 1_000,
            max_file_bytes_per_tenant: 1 << 30,
            max_active_batches_per_tenant: 20,
            batch_completion_windows: vec!["24h".into()],
            decision_log: None,
            verification: Default::default(),
            models: Vec::new(),
            progress: Default::default(),
            node_state_rate: Default::default(),
        }
    }
}

/// `[progress]`: what the coordinator measures of each node itself, instead of trusting what
/// the node reports (issue 13, hole 6: a node that heartbeats and never emits a token held its
/// jobs until the clients gave up).
///
/// A running job that gets no new token for its deadline is taken from its node and continues
/// elsewhere from its last token; the node is told to stop it and a stall is counted against
/// it. `stalls_to_cooldown` stalls within `stall_window` give the node no new work for
/// `cooldown`. Separately, each node's decode throughput is measured from its chunks; when it
/// is below `overclaim_ratio` of the decode speed it claims, the scheduler sees the measured
/// speed instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProgressConfig {
    /// No new token for this long on a job a node is decoding. Measured speeds put an honest
    /// gap between chunks far below it: on the 2-core test box one stream decodes at 153
    /// tok/s and 8 streams at 244 tok/s aggregate (30 tok/s each, README "Engine vs
    /// llama.cpp"); an Orin running Llama-3.1-8B at 8 streams does 112 tok/s aggregate (14
    /// each, sim `data/`), one token per 71 ms. Agents send chunks as tokens come. 30 s is
    /// 400x that gap: only a node that stopped working (or lost its network past what the
    /// lease would catch) hits it.
    #[serde(with = "millis")]
    pub stall_timeout: Duration,
    /// Prefill speed assumed for the first token a node owes (the prompt plus any resumed
    /// tokens, estimated from the prompt's characters until the node reports its token
    /// count): 487 tok/s was measured for a 512-token prefill on the 2-core box, idle; 50 is
    /// ten times slower, for a prefill that shares its engine with 7 decoding streams on a
    /// loaded vehicle. The first token's deadline is `stall_timeout` plus this prefill time.
    pub prefill_floor_tps: f64,
    pub stalls_to_cooldown: u32,
    #[serde(with = "millis")]
    pub stall_window: Duration,
    #[serde(with = "millis")]
    pub cooldown: Duration,
    /// Measured decode throughput below this share of the claimed `decode_tps_single`
    /// replaces the claim for scheduling. An honest node's aggregate throughput with any
    /// number of streams is at least its single-stream speed (244 vs 153 tok/s measured), less
    /// the time its engine spends in other jobs' prefills; 0.25 leaves a 4x margin for that.
    pub overclaim_ratio: f32,
    /// Busy time (at least one job decoding) over which a node's throughput is measured.
    #[serde(with = "millis")]
    pub measure_busy: Duration,
}

impl Default for ProgressConfig {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(30),
            prefill_floor_tps: 50.0,
            stalls_to_cooldown: 3,
            stall_window: Duration::from_secs(600),
            cooldown: Duration::from_secs(300),
            overclaim_ratio: 0.25,
            measure_busy: Duration::from_secs(10),
        }
    }
}

impl ProgressConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.stall_timeout.is_zero()
            || !(self.prefill_floor_tps.is_finite() && self.prefill_floor_tps > 0.0)
            || self.stalls_to_cooldown == 0
            || self.measure_busy.is_zero()
            || !(0.0..=1.0).contains(&self.overclaim_ratio)
        {
            return Err("[progress]: stall_timeout, prefill_floor_tps, stalls_to_cooldown and measure_busy must be positive, overclaim_ratio within 0..=1".into());
        }
        Ok(())
    }

    /// How long a node may go without a new token on a job: `owed_prefill` is the number of
    /// tokens it must prefill before its first one (0 once it has produced one).
    pub fn deadline(&self, owed_prefill: u64) -> Duration {
        self.stall_timeout + Duration::from_secs_f64(owed_prefill as f64 / self.prefill_floor_tps)
    }
}

/// `node_state_rate` in the coordinator's TOML: how many `State` messages one session may send.
///
/// An honest agent sends a State when its governor's status changes and when a job starts or
/// ends (`agent::core`): an 8-slot vehicle running 1 s jobs sends about 16 a second, so the
/// default sustained rate (20/s, burst 50) does not drop an honest agent's updates, and when
/// it does (a burst), nothing is lost that matters: the newest State waits for the next token
/// and supersedes the dropped ones. A session still over the limit after
/// `close_after_dropped` superseded messages within `window_s` floods on purpose and is closed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateRate {
    pub per_s: f64,
    pub burst: u32,
    pub close_after_dropped: u32,
    pub window_s: u64,
}

impl Default for StateRate {
    fn default() -> Self {
        Self {
            per_s: 20.0,
            burst: 50,
            // 20/s of excess for 30 s.
            close_after_dropped: 600,
            window_s: 30,
        }
    }
}

impl StateRate {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.per_s.is_finite() && self.per_s > 0.0) || self.burst == 0 || self.window_s == 0 {
            return Err("node_state_rate: per_s, burst and window_s must be positive".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid coordinator config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid coordinator config: {0}")]
    Invalid(String),
}

impl CoordinatorConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        // A file holding API or operator keys is a secret like a private key.
        if !config.api_keys.is_empty() || config.operator_key.is_some() {
            tokenfleet_store::sealing::check_private(path)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Every rule a configuration must meet before a coordinator starts on it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy_kind()?;
        self.validate_keys()?;
        if self.http_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "http_max_connections must be at least 1".into(),
            ));
        }
        if self.lease_timeout < self.heartbeat_interval * 2 {
            return Err(ConfigError::Invalid(
                "lease_timeout must be at least two heartbeat intervals".into(),
            ));
        }
        // Names only: the regions' polygons are loaded once, when the coordinator starts
        // (`crate::policy::regions::RegionMap::load`).
        for t in &self.tenants {
            if let Some(unknown) = t
                .residency
                .iter()
                .find(|r| !self.regions.iter().any(|region| &region.name == *r))
            {
                return Err(ConfigError::Invalid(format!(
                    "tenant {:?}: residency region {unknown:?} is not defined in [[regions]]",
                    t.name
                )));
            }
        }
        if self.retention < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "retention must be at least a minute".into(),
            ));
        }
        self.validate_agent_port()?;
        self.verification.validate().map_err(ConfigError::Invalid)?;
        models::binding_map(&self.models).map_err(ConfigError::Invalid)?;
        self.progress.validate().map_err(ConfigError::Invalid)?;
        self.node_state_rate
            .validate()
            .map_err(ConfigError::Invalid)?;
        if self.default_max_tokens > self.max_tokens_limit {
            return Err(ConfigError::Invalid(
                "default_max_tokens exceeds max_tokens_limit".into(),
            ));
        }
        self.validate_batch_windows()?;
        Ok(())
    }

    /// API keys and the operator key: long enough, and the operator's its own.
    fn validate_keys(&self) -> Result<(), ConfigError> {
        if self.api_keys.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one api key is required".into(),
            ));
        }
        if self.api_keys.iter().any(|k| k.key.len() < 16) {
            return Err(ConfigError::Invalid(
                "api keys must be at least 16 characters".into(),
            ));
        }
        if self.database_url().is_some()
            && self.store_key_file.is_none()
            && std::env::var_os(STORE_KEYS_ENV).is_none()
        {
            return Err(ConfigError::Invalid(format!(
                "a PostgreSQL job store (database_url) needs its keys given: set store_key_file \
                 (the same file on every coordinator of that database) or {STORE_KEYS_ENV}"
            )));
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(ConfigError::Invalid)?;
            if self.database_url().is_none() {
                return Err(ConfigError::Invalid(
                    "[cluster] needs a PostgreSQL job store (database_url or \
                     TOKENFLEET_DATABASE_URL) shared by the coordinators"
                        .into(),
                ));
            }
            if self.standby {
                return Err(ConfigError::Invalid(
                    "standby and [cluster] exclude each other: in a cluster every coordinator \
                     is active"
                        .into(),
                ));
            }
        }
        if self.standby && self.database_url().is_none() {
            return Err(ConfigError::Invalid(
                "standby needs a PostgreSQL job store (database_url or TOKENFLEET_DATABASE_URL): \
                 a SQLite file has one coordinator"
                    .into(),
            ));
        }
        if let Some(op) = &self.operator_key {
            if op.len() < 16 {
                return Err(ConfigError::Invalid(
                    "operator_key must be at least 16 characters".into(),
                ));
            }
            if self.api_keys.iter().any(|k| &k.key == op) {
                return Err(ConfigError::Invalid(
                    "operator_key must differ from every API key".into(),
                ));
            }
        }
        Ok(())
    }

    /// The agent port is authenticated (mutual TLS with `[security]`), on loopback, or opened
    /// to any client only by the operator's explicit choice.
    fn validate_agent_port(&self) -> Result<(), ConfigError> {
        if let Some(sec) = &self.security {
            if self.grpc_tls.is_some() {
                return Err(ConfigError::Invalid(
                    "grpc_tls and [security] exclude each other: with [security] the agent port uses a certificate from the fleet CA".into(),
                ));
            }
            let policy = sec.policy().map_err(ConfigError::Invalid)?;
            if let Some(b) = self
                .models
                .iter()
                .find(|b| !policy.models.contains(&b.sha256.to_bytes()))
            {
                return Err(ConfigError::Invalid(format!(
                    "[[models]] binds {:?} to {}, which [security].allowed_models does not allow (no node could attest it)",
                    b.name, b.sha256
                )));
            }
        } else if !self.grpc_addr.ip().is_loopback() {
            if self.grpc_tls.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "the agent port {} would serve plaintext: configure [security], or bind a loopback address",
                    self.grpc_addr
                )));
            }
            // Server-only TLS authenticates the coordinator, not the agent: anyone reaching
            // the port would be handed jobs (issue 13, hole 11).
            if !self.allow_unauthenticated_agents {
                return Err(ConfigError::Invalid(format!(
                    "the agent port {} would accept any client (grpc_tls checks no client certificate): configure [security] for mutual TLS, bind a loopback address, or set allow_unauthenticated_agents = true to accept that risk",
                    self.grpc_addr
                )));
            }
            tracing::warn!(addr = %self.grpc_addr, "allow_unauthenticated_agents: any client reaching the agent port receives jobs");
        }
        Ok(())
    }

    fn validate_batch_windows(&self) -> Result<(), ConfigError> {
        for w in &self.batch_completion_windows {
            let window = parse_window(w).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "batch completion window {w:?} is not a duration like \"24h\""
                ))
            })?;
            if window >= self.retention {
                return Err(ConfigError::Invalid(format!(
                    "batch completion window {w:?} must be shorter than retention"
                )));
            }
        }
        Ok(())
    }

    /// The PostgreSQL job store's connection string: `TOKENFLEET_DATABASE_URL` when set, else
    /// `database_url`; None for the SQLite store at `db_path`.
    pub fn database_url(&self) -> Option<String> {
        database_url_from_env().or_else(|| self.database_url.clone())
    }

    /// The job store's keys: `TOKENFLEET_STORE_KEYS` when set, else the key file.
    pub fn store_sealer(&self) -> Result<Sealer, SealError> {
        store_sealer(&self.db_path, self.store_key_file.as_deref())
    }

    pub fn policy_kind(&self) -> Result<PolicyKind, ConfigError> {
        self.policy
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("unknown policy {:?}", self.policy)))
    }
}

/// A completion window such as `"24h"`, `"90m"` or `"30s"`.
pub fn parse_window(window: &str) -> Option<Duration> {
    let unit = window.chars().last()?;
    let n: u64 = window[..window.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        'h' => n.checked_mul(3600)?,
        'm' => n.checked_mul(60)?,
        's' => n,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CoordinatorConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn scheduler_table_sets_tunables_and_keeps_the_other_defaults() {
        let c = parse("policy = \"tokenfleet\"\n[scheduler]\ninteractive_preempt_after_ms = 250\n")
            .expect("valid config");
        assert_eq!(c.scheduler.interactive_preempt_after_ms, 250);
        let defaults = tokenfleet_scheduler::SchedulerConfig::default();
        assert_eq!(c.scheduler.sample_size, defaults.sample_size);
        assert_eq!(parse("").expect("empty config").scheduler, defaults);
    }

    /// Issue 13, hole 11: server-only TLS on a reachable address, without `[security]`, would
    /// hand jobs to any client; it needs the loudly named opt-in.
    #[test]
    fn grpc_tls_off_loopback_needs_mutual_tls_or_an_explicit_opt_in() {
        let base = "api_keys = [{ key = \"0123456789abcdef\", tenant = \"t\" }]\n\
                    grpc_tls = { cert = \"c.pem\", key = \"k.pem\" }\n";
        let public = parse(&format!("{base}grpc_addr = \"0.0.0.0:50051\"\n")).unwrap();
        let err = public.validate().expect_err("any client would get jobs");
        assert!(
            err.to_string().contains("would accept any client")
                && err.to_string().contains("allow_unauthenticated_agents"),
            "{err}"
        );
        let opted_in = parse(&format!(
            "{base}grpc_addr = \"0.0.0.0:50051\"\nallow_unauthenticated_agents = true\n"
        ))
        .unwrap();
        opted_in.validate().expect("the operator accepted the risk");
        let loopback = parse(&format!("{base}grpc_addr = \"127.0.0.1:50051\"\n")).unwrap();
        loopback
            .validate()
            .expect("loopback stays allowed for the demo and tests");
    }

    /// Issue 13, hole 15: a config file holding keys that others may read is refused, as ssh
    /// refuses such a private key; made private, it loads.
    #[cfg(unix)]
    #[test]
    fn a_config_file_with_keys_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(
            &path,
            "[[api_keys]]\nkey = \"0123456789abcdef-key\"\ntenant = \"t\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = CoordinatorConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("too open") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = CoordinatorConfig::from_file(&path).unwrap();
        assert_eq!(config.api_keys.len(), 1);
    }

    #[test]
    fn a_misspelt_scheduler_tunable_is_refused() {
        let err =
            parse("[scheduler]\ninteractive_preempt_after = 250\n").expect_err("unknown field");
        assert!(
            err.to_string().contains("interactive_preempt_after"),
            "{err}"
        );
    }
}
