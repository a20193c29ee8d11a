//! Cheap checks on a model file before llama.cpp sees it, so that an operator's wrong path or
//! a half-copied file gets a clear error instead of a C++ exception deep in the loader.

use std::io::Read;
use std::path::Path;

use crate::EngineError;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Checks that `path` exists, is readable and starts with a GGUF header of a known version.
/// Truncation beyond the header is caught by llama.cpp's own bounds checks at load time.
pub fn check_gguf_file(path: &Path) -> Result<(), EngineError> {
    if !path.exists() {
        return Err(EngineError::ModelNotFound {
            path: path.to_path_buf(),
        });
    }
    let unreadable = |source| EngineError::ModelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(EngineError::NotGguf {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let mut header = [0u8; 24];
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..]).map_err(unreadable)? {
            0 => break,
            n => read += n,
        }
    }
    let not_gguf = |reason: String| EngineError::NotGguf {
        path: path.to_path_buf(),
        reason,
    };
    if read < header.len() {
        return Err(not_gguf(format!(
            "only {read} bytes, shorter than a GGUF header"
        )));
    }
    if &header[..4] != GGUF_MAGIC {
        return Err(not_gguf("missing the GGUF magic bytes".into()));
    }
    let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(2..=3).contains(&version) {
        return Err(not_gguf(format!("unsupported GGUF version {version}")));
    }
    Ok(())
}

/// The demo/test model where `scripts/fetch-model.sh` puts it: `$TOKENFLEET_MODEL` if set,
/// else [`default_cache_dir`]`/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> std::path::PathBuf {
    match std::env::var_os("TOKENFLEET_MODEL") {
        Some(p) => p.into(),
        None => default_cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

/// Where tokenfleet caches models and built tools: `$TOKENFLEET_CACHE`, default
/// `~/.cache/tokenfleet` (the same place `scripts/fetch-model.sh` uses).
pub fn default_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("TOKENFLEET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tokenfleet")
        })
}

/// The sha256 of a file, hex encoded (models are identified by it across the fleet).
pub fn sha256_file(path: &Path) -> Result<String, EngineError> {
    use sha2::Digest;
    let unreadable = |source| EngineError::ModelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
