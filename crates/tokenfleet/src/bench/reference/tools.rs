//! The reference tools: finds `scripts/llama-ref.sh`, runs it (a cached build of llama-bench
//! and llama-server) and reads the VERSION file it writes next to them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::process::run_bounded;

/// The two reference binaries and which llama.cpp they were built from.
#[derive(Debug, Clone)]
pub struct RefTools {
    pub llama_bench: PathBuf,
    pub llama_server: PathBuf,
    pub llama_cpp_python_version: String,
    /// The upstream llama.cpp commit named by the sdist's changelog ("unknown" if none).
    pub llama_cpp_build: String,
}

/// A cold build takes a few minutes on 2 cores; this only stops a hung build from blocking
/// a benchmark forever.
const BUILD_TIMEOUT: Duration = Duration::from_secs(90 * 60);

/// Where `scripts/llama-ref.sh` is: next to the workspace this crate was built from, or under
/// the current directory (a binary run from a checkout).
fn find_script() -> Result<PathBuf> {
    let mut candidates =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llama-ref.sh")];
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join("scripts/llama-ref.sh"));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| anyhow!("scripts/llama-ref.sh not found (looked at {candidates:?})"))
}

/// Builds (once, cached) llama-bench and llama-server by running `scripts/llama-ref.sh` and
/// returns their paths. Blocking, and minutes long on a cold cache: call it from
/// `spawn_blocking` in async code. The script's progress goes to our stderr.
pub fn ensure_reference_tools(cache_dir: &Path) -> Result<RefTools> {
    let script = find_script()?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(cache_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let what = format!("bash {} {}", script.display(), cache_dir.display());
    let out = run_bounded(cmd, &what, BUILD_TIMEOUT, false)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}); its output is above on stderr",
            out.status
        );
    }
    let bin_dir = out
        .stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{what} printed no bin directory on stdout"))?;
    tools_from_bin_dir(&bin_dir)
}

/// Reads `<bin>/../VERSION` (key=value lines written by the script) and checks both binaries.
fn tools_from_bin_dir(bin_dir: &Path) -> Result<RefTools> {
    let llama_bench = bin_dir.join("llama-bench");
    let llama_server = bin_dir.join("llama-server");
    for p in [&llama_bench, &llama_server] {
        if !p.is_file() {
            bail!(
                "llama-ref.sh reported {} but {} is missing",
                bin_dir.display(),
                p.display()
            );
        }
    }
    let version_path = bin_dir
        .parent()
        .ok_or_else(|| anyhow!("bin directory {} has no parent", bin_dir.display()))?
        .join("VERSION");
    let text = std::fs::read_to_string(&version_path)
        .with_context(|| format!("reading {}", version_path.display()))?;
    let (python, build) =
        parse_version_file(&text).with_context(|| format!("parsing {}", version_path.display()))?;
    Ok(RefTools {
        llama_bench,
        llama_server,
        llama_cpp_python_version: python,
        llama_cpp_build: build,
    })
}

/// `(llama_cpp_python, llama_cpp_build)` from the script's VERSION file.
fn parse_version_file(text: &str) -> Result<(String, String)> {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .ok_or_else(|| anyhow!("no {key}= line"))
    };
    Ok((get("llama_cpp_python")?, get("llama_cpp_build")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_file_is_parsed() {
        let text = "llama_cpp_python=0.3.36\nllama_cpp_build=0c1e57098\nllama_cpp_version=0.5.0\n";
        assert_eq!(
            parse_version_file(text).unwrap(),
            ("0.3.36".to_string(), "0c1e57098".to_string())
        );
        assert!(parse_version_file("llama_cpp_python=0.3.36\n").is_err());
    }
}
