//! Where the job store is and how it is unlocked: the environment variables that override the
//! config file (`TOKENFLEET_DATABASE_URL`, `TOKENFLEET_STORE_KEYS`) and the store's keys.
//! Shared by the coordinator and the operator's `tokenfleet fleet ...` commands, so both open
//! the same store the same way. Uses tokenfleet-store's sealing only.

use std::path::{Path, PathBuf};

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
