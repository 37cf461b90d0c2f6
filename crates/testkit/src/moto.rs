//! A KMS for tests: moto's server (PyPI `moto[server]`, installed into
//! `.cache/moto` by `scripts/install-test-deps.sh`) on a free loopback port.
//! It speaks the AWS KMS JSON API (`X-Amz-Target: TrentService.*`) and keeps
//! keys in memory. Stopped on drop, and by the kernel when the test process
//! dies first (parent-death signal), so it never outlives its test.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, workspace_root};

/// The moto installation: env `STRATA_MOTO`, else `<workspace>/.cache/moto`.
pub fn moto_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_MOTO") {
        return PathBuf::from(path);
    }
    workspace_root().join(".cache/moto")
}

/// A running moto server.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Access key id the tests sign with (moto accepts any).
    pub const ACCESS_KEY: &'static str = "AKIDSTRATATEST";
    /// Secret access key the tests sign with.
    pub const SECRET_KEY: &'static str = "strata-test-kms-secret";
    /// Region the tests use.
    pub const REGION: &'static str = "us-east-1";

    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Moto {
        let binary = moto_dir().join("bin/moto_server");
        assert!(
            binary.exists(),
            "{} not found; run scripts/install-test-deps.sh (or set STRATA_MOTO)",
            binary.display()
        );
        for _ in 0..3 {
            let port = free_port();
            let mut command = Command::new(&binary);
            command
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = command.spawn().expect("start moto_server");
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start");
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[kms]` table of a Strata configuration using this server.
    pub fn kms_config(&self) -> String {
        format!(
            "[kms]\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.endpoint(),
            Self::REGION,
            Self::ACCESS_KEY,
            Self::SECRET_KEY
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
