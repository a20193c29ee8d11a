//! At-rest encryption of what clients send and receive: every prompt, output token and text
//! the job store writes is sealed with XChaCha20-Poly1305 before it reaches the database, so the
//! database file, its WAL and its backups hold no plaintext prompt or output.
//!
//! Keys have short ids and live outside the database: in `TOKENFLEET_STORE_KEYS` (`id:base64`
//! entries separated by commas, newest first) or in a key file (one `id base64` line per key,
//! newest first; created with one fresh key, mode 0600, when absent). The newest key seals; any
//! listed key opens, so rotation is: put a new key first, restart, and drop the old key once the
//! retention period has purged everything sealed with it.
//!
//! A sealed value is `0x01 | id length | id | 24-byte random nonce | ciphertext+tag`, and the
//! associated data names the row and column it belongs to, so a sealed value copied into
//! another row or column fails to open instead of being served as someone else's data.
//!
//! Owns [`Sealer`], [`SealError`] and the owner-only key file helpers ([`check_private`]); uses
//! nothing else of this crate (every backend seals through it).

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("store key {0:?}: {1}")]
    BadKey(String, String),
    #[error("no store key given")]
    NoKey,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed with key {0:?}, which is not configured (was it rotated out too early?)")]
    UnknownKey(String),
    #[error("sealed value does not authenticate (wrong key, or tampered / moved data)")]
    Forged,
    #[error("key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
}

/// The store's keys: the newest seals, all open.
#[derive(Clone)]
pub struct Sealer {
    current: String,
    keys: HashMap<String, XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Sealer")
            .field("current", &self.current)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Sealer {
    /// Keys from `(id, 32 raw bytes)` pairs, newest first.
    pub fn new(keys: Vec<(String, Vec<u8>)>) -> Result<Self, SealError> {
        let current = keys.first().ok_or(SealError::NoKey)?.0.clone();
        let mut map = HashMap::new();
        for (id, key) in keys {
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(SealError::BadKey(
                    id,
                    "ids are 1-64 printable characters".into(),
                ));
            }
            if key.len() != KEY_LEN {
                return Err(SealError::BadKey(
                    id,
                    format!("keys are {KEY_LEN} bytes, got {}", key.len()),
                ));
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&key)
                .map_err(|e| SealError::BadKey(id.clone(), e.to_string()))?;
            map.insert(id, cipher);
        }
        Ok(Self { current, keys: map })
    }

    /// Parses `id:base64,id:base64` (newest first), the `TOKENFLEET_STORE_KEYS` format.
    pub fn from_spec(spec: &str) -> Result<Self, SealError> {
        let mut keys = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, b64) = entry
                .split_once(':')
                .ok_or_else(|| SealError::BadKey(entry.into(), "expected id:base64".into()))?;
            keys.push((id.to_string(), decode_key(id, b64)?));
        }
        Self::new(keys)
    }

    /// Reads a key file (`id base64` per line, newest first; `#` comments), creating it with
    /// one fresh key when it does not exist.
    pub fn from_key_file(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        if !path.exists() {
            let mut key = [0u8; KEY_LEN];
            rand::fill(&mut key);
            let id = format!("k{}", unix_s());
            let line = format!(
                "# tokenfleet job-store keys, newest first: <id> <base64 32 bytes>\n{id} {}\n",
                base64::engine::general_purpose::STANDARD.encode(key)
            );
            write_private(path, line.as_bytes()).map_err(io)?;
            tracing::warn!(path = %path.display(), "created a job-store encryption key; keep it (and backups of it) away from the database's backups");
        }
        check_private(path).map_err(io)?;
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut keys = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, b64) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| SealError::BadKey(line.into(), "expected `id base64`".into()))?;
            keys.push((id.to_string(), decode_key(id, b64.trim())?));
        }
        Self::new(keys)
    }

    /// A sealer with one random key (tests).
    pub fn ephemeral() -> Self {
        let mut key = vec![0u8; KEY_LEN];
        rand::fill(&mut key[..]);
        Self::new(vec![("ephemeral".into(), key)]).expect("a valid key")
    }

    /// The id of the key new values are sealed with.
    pub fn current_key_id(&self) -> &str {
        &self.current
    }

    /// Seals `plaintext` for the place named by `aad` (table, column and row).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = &self.keys[&self.current];
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let id = self.current.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + ct.len());
        out.push(FORMAT_V1);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a value sealed for the place named by `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Malformed)?;
        let (&id_len, rest) = rest.split_first().ok_or(SealError::Malformed)?;
        if version != FORMAT_V1 || rest.len() < id_len as usize + NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (id, rest) = rest.split_at(id_len as usize);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let id = std::str::from_utf8(id).map_err(|_| SealError::Malformed)?;
        let cipher = self
            .keys
            .get(id)
            .ok_or_else(|| SealError::UnknownKey(id.to_string()))?;
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| SealError::Forged)
    }

    /// Opens a value sealed from UTF-8 text.
    pub fn open_string(&self, aad: &[u8], sealed: &[u8]) -> Result<String, SealError> {
        String::from_utf8(self.open(aad, sealed)?).map_err(|_| SealError::Malformed)
    }
}

/// The associated data naming each sealed value's place (table, column, row), shared by every
/// backend so that a value copied elsewhere does not open.
pub(crate) mod place {
    pub fn request(job: u64) -> Vec<u8> {
        format!("jobs.request:{job}").into_bytes()
    }

    pub fn text_tail(job: u64) -> Vec<u8> {
        format!("jobs.text_tail:{job}").into_bytes()
    }

    pub fn token(job: u64, idx: u32) -> Vec<u8> {
        format!("job_outputs:{job}:{idx}").into_bytes()
    }

    pub fn file(id: &str) -> Vec<u8> {
        format!("files.content:{id}").into_bytes()
    }
}

/// Unix seconds now (the id of a key created with a key file).
fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode_key(id: &str, b64: &str) -> Result<Vec<u8>, SealError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| SealError::BadKey(id.into(), format!("not base64: {e}")))
}

/// Creates `path` readable by its owner only.
/// Refuses a secret file (a key) that its group or others may read, as ssh refuses such a
/// private key: whoever else can read it holds the secret. Unix only; elsewhere a no-op.
pub fn check_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "permissions {mode:04o} for {} are too open: it holds a secret, and group or others may read it (run `chmod 600 {}`)",
                    path.display(),
                    path.display()
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding_to_the_place() {
        let s = Sealer::ephemeral();
        let sealed = s.seal(b"jobs.request:7", b"secret prompt");
        assert!(!sealed
            .windows(b"secret".len())
            .any(|w| w == b"secret".as_slice()));
        assert_eq!(
            s.open(b"jobs.request:7", &sealed).unwrap(),
            b"secret prompt"
        );
        // Moved to another row: refused.
        assert!(matches!(
            s.open(b"jobs.request:8", &sealed),
            Err(SealError::Forged)
        ));
        // One flipped bit: refused.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            s.open(b"jobs.request:7", &bad),
            Err(SealError::Forged)
        ));
        assert!(matches!(s.open(b"x", &[1]), Err(SealError::Malformed)));
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_seals_with_the_newest() {
        let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
        let old = Sealer::from_spec(&format!("k1:{}", b64(&[1u8; 32]))).unwrap();
        let sealed_old = old.seal(b"a", b"v1");
        let rotated =
            Sealer::from_spec(&format!("k2:{},k1:{}", b64(&[2u8; 32]), b64(&[1u8; 32]))).unwrap();
        assert_eq!(rotated.current_key_id(), "k2");
        assert_eq!(rotated.open(b"a", &sealed_old).unwrap(), b"v1");
        let sealed_new = rotated.seal(b"a", b"v2");
        // The old key alone cannot open what the new key sealed.
        assert!(matches!(
            old.open(b"a", &sealed_new),
            Err(SealError::UnknownKey(id)) if id == "k2"
        ));
        assert!(Sealer::from_spec("k1:AAAA").is_err(), "short key accepted");
        assert!(Sealer::from_spec("").is_err());
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.keys");
        let a = Sealer::from_key_file(&path).unwrap();
        let sealed = a.seal(b"p", b"hello");
        let b = Sealer::from_key_file(&path).unwrap();
        assert_eq!(b.open(b"p", &sealed).unwrap(), b"hello");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
