//! Where the job store is and how it is unlocked: the environment variables that override the
//! config file (`TOKENFLEET_DATABASE_URL`, `TOKENFLEET_STORE_KEYS`) and the store's keys.
//! Shared by the coordinator and the operator's `tokenfleet fleet ...` commands, so both open
//! the same store the same way. Uses tokenfleet-store's sealing only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenfleet_store::{SealError, Sealer};

/// Environment variable holding the job store's keys (`id:base64,...`, newest first).
pub const STORE_KEYS_ENV: &str = "TOKENFLEET_STORE_KEYS";
/// Environment variable holding the PostgreSQL job store's connection string (see
/// `CoordinatorConfig::database_url`).
pub const DATABASE_URL_ENV: &str = "TOKENFLEET_DATABASE_URL";

/// `TOKENFLEET_DATABASE_URL`, when set and not empty: it overrides the config file's
/// `database_url` for the coordinator, and points `tokenfleet fleet ...` at the same store.
pub fn database_url_from_env() -> Option<String> {
    std::env::var(DATABASE_URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
}

/// The keys of the job store at `db_path`: `TOKENFLEET_STORE_KEYS` when set, else the key
/// file (`key_file`, default `<db_path>.keys`, created when absent). Every process opening the
/// store (the coordinator, `tokenfleet fleet ...`) resolves them this way.
pub fn store_sealer(db_path: &Path, key_file: Option<&Path>) -> Result<Sealer, SealError> {
    if let Some(spec) = std::env::var_os(STORE_KEYS_ENV) {
        return Sealer::from_spec(&spec.to_string_lossy());
    }
    let path = key_file.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut p = db_path.to_path_buf().into_os_string();
        p.push(".keys");
        PathBuf::from(p)
    });
    Sealer::from_key_file(&path)
}

/// `[cluster]`: this coordinator is one of several active ones on the same PostgreSQL
/// database. Each owns the jobs it accepts or claims, under a lease it renews; the others take
/// them over when it stops renewing (killed, partitioned from the database), or at once when
/// a vehicle running one comes over to them. Without `[cluster]` a coordinator is its
/// database's only one (held by the sole-coordinator lock; `standby` waits for it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This coordinator's name among those of the database: unique, and the same across its
    /// restarts (a restarted coordinator takes its own jobs back at once). Default: the host
    /// name and the HTTP port.
    pub id: Option<String>,
    /// How long a coordinator that stops renewing keeps its jobs before the others sweep
    /// them. Renewed every fifth of it. Shorter fails over queued jobs faster; running jobs
    /// move with their vehicles at once whatever it is.
    #[serde(with = "super::millis")]
    pub lease: Duration,
    /// How often the database is swept for jobs nobody holds (a dead coordinator's).
    #[serde(with = "super::millis")]
    pub sweep_interval: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            id: None,
            // A dead coordinator's queued jobs wait at most this plus a sweep interval; 5 s
            // keeps failover well inside issue 15's 10 s and is 25 renewals' worth of a
            // PostgreSQL round trip under load (~200 ms at worst seen in `bench dispatch`).
            lease: Duration::from_secs(5),
            sweep_interval: Duration::from_millis(500),
        }
    }
}

impl ClusterConfig {
    /// This coordinator's id, defaulting to `<host name>:<http port>`.
    pub fn coordinator_id(&self, http_port: u16) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "coordinator".into());
            format!("{host}:{http_port}")
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.lease < Duration::from_millis(500) {
            return Err("cluster.lease must be at least 500 ms".into());
        }
        if self.sweep_interval.is_zero() || self.sweep_interval > self.lease {
            return Err("cluster.sweep_interval must be positive and at most cluster.lease".into());
        }
        if self
            .id
            .as_deref()
            .is_some_and(|id| id.is_empty() || id.len() > 200)
        {
            return Err("cluster.id must be 1-200 characters".into());
        }
        Ok(())
    }
}
