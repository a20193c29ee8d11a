//! A software TPM 2.0 (Debian's `swtpm`) for vehicles without one: `tokenfleet up` and the
//! attestation tests start one per agent on free loopback ports.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running swtpm, killed (by its own pid) and reaped on drop.
pub struct SoftwareTpm {
    child: Child,
    port: u16,
}

/// Whether the `swtpm` binary is installed (scripts/setup.sh installs it).
pub fn available() -> bool {
    Command::new("swtpm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two consecutive free loopback ports (server, control).
fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..64 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no two consecutive free loopback ports")
}

impl SoftwareTpm {
    /// Starts swtpm with its state in `state_dir` (created), serving on loopback.
    pub fn start(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let mut last_err = None;
        // A port found free can be taken by someone else before swtpm binds it: retry.
        for _ in 0..5 {
            let port = free_port_pair()?;
            let mut cmd = Command::new("swtpm");
            cmd.args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state_dir.display()))
                .args(["--server"])
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .args(["--ctrl"])
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                // Without startup-clear every command fails with TPM_RC_INITIALIZE.
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // If we die without running Drop (SIGKILL), the kernel ends swtpm too. The signal
            // follows the *thread* that spawned it: callers start swtpm from a thread that
            // lives as long as the TPM is needed (not the blocking pool).
            //
            // swtpm serves one connection at a time. libtss2's swtpm TCTI opens its sockets
            // without close-on-exec, so a TPM connection that another vehicle of this process
            // has open at the fork would live on in this child, and that vehicle's swtpm would
            // wait on it forever, never reading its next connection: seen in `tokenfleet up`
            // (vehicle-1's quote hung, its session was refused and it never came back). Every
            // descriptor above stdio is closed at exec (`CLOSE_RANGE_CLOEXEC`: std's own
            // exec-error pipe is close-on-exec already, so spawn still reports a failed exec).
            // SAFETY: prctl and close_range are async-signal-safe system calls that touch no
            // memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32)
                        != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn().context("starting swtpm")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Self { child, port });
                }
                if let Some(status) = child.try_wait()? {
                    last_err = Some(anyhow::anyhow!("swtpm exited at start: {status}"));
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = Some(anyhow::anyhow!("swtpm did not listen within 10 s"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("swtpm did not start")))
    }

    /// The swtpm process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The TCTI string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for SoftwareTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
