//! Child processes with a deadline: captured output, pipes drained on threads, killed on
//! timeout.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The captured output of a child process.
pub(super) struct Captured {
    pub(super) status: ExitStatus,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

/// Runs `cmd` with stdout (and stderr if `capture_stderr`) captured, killing it if it runs
/// past `timeout`. The pipes are drained on threads so a chatty child cannot block on them.
/// Only the direct child is killed: for the build script, a compiler it started finishes on
/// its own (the script stays in our process group so that Ctrl-C still reaches the build).
pub(super) fn run_bounded(
    mut cmd: Command,
    what: &str,
    timeout: Duration,
    capture_stderr: bool,
) -> Result<Captured> {
    cmd.stdout(Stdio::piped());
    if capture_stderr {
        cmd.stderr(Stdio::piped());
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_thread = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_thread = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out_thread
        .join()
        .map_err(|_| anyhow!("stdout reader of {what} panicked"))?;
    let stderr = err_thread
        .join()
        .map_err(|_| anyhow!("stderr reader of {what} panicked"))?;
    Ok(Captured {
        status,
        stdout,
        stderr,
    })
}
