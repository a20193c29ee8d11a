//! Development TLS material: a self-signed certificate for 127.0.0.1 and localhost, so that a
//! fleet on one machine (`tokenfleet up`, the dispatch benchmark) runs its agent sessions over
//! TLS exactly like a real deployment. Production fleets bring their own CA.

use std::path::Path;

use anyhow::Context;
use tokenfleet_coordinator::config::TlsFiles;

/// Writes `cert.pem` and `key.pem` (self-signed, 127.0.0.1 and localhost) into `dir`. The
/// certificate is also the CA file agents trust.
pub fn write_self_signed(dir: &Path) -> anyhow::Result<TlsFiles> {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .context("generating a self-signed certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem())?;
    // Private: the coordinator refuses a key file its group or others may read.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    std::io::Write::write_all(
        &mut options.open(&key)?,
        ck.signing_key.serialize_pem().as_bytes(),
    )?;
    Ok(TlsFiles { cert, key })
}
