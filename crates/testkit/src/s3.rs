//! A real S3-protocol server for tests: `s3s-fs` (crates.io, built into
//! `.cache/s3s/bin` by `scripts/install-test-deps.sh`) serving a fresh
//! temporary directory on a free loopback port with known credentials.
//! Buckets are directories under that root (s3s-fs's `FileSystem` backend), so
//! tests can look at, damage or remove objects on disk. Stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, keep_test_dirs, workspace_root};

/// The `s3s-fs` binary: env `STRATA_S3S_FS`, else `<workspace>/.cache/s3s/bin/s3s-fs`.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_S3S_FS") {
        return PathBuf::from(path);
    }
    workspace_root().join(".cache/s3s/bin/s3s-fs")
}

/// A running `s3s-fs`.
pub struct S3Server {
    child: Child,
    root: PathBuf,
    port: u16,
}

impl S3Server {
    /// Access key id every test server accepts.
    pub const ACCESS_KEY: &'static str = "strata-test-access";
    /// Secret access key every test server accepts.
    pub const SECRET_KEY: &'static str = "strata-test-secret-key-0123456789";
    /// The bucket [`S3Server::start`] creates.
    pub const BUCKET: &'static str = "strata-test";

    /// Starts a server with one empty bucket, [`S3Server::BUCKET`].
    pub fn start() -> S3Server {
        let binary = s3s_fs_binary();
        assert!(
            binary.exists(),
            "{} not found; run scripts/install-test-deps.sh (or set STRATA_S3S_FS)",
            binary.display()
        );
        let root = tempfile::Builder::new()
            .prefix("strata-s3-")
            .tempdir_in("/tmp")
            .expect("create s3 temp dir")
            .keep();
        let data = root.join("data");
        std::fs::create_dir_all(data.join(Self::BUCKET)).expect("create bucket directory");
        let mut last_log = String::new();
        // A port free a moment ago may be taken by the time the server binds it.
        for _ in 0..3 {
            let port = free_port();
            let log = root.join(format!("s3s-fs-{port}.log"));
            let log_file = std::fs::File::create(&log).expect("create s3s-fs log");
            let mut child = Command::new(&binary)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", Self::ACCESS_KEY])
                .args(["--secret-key", Self::SECRET_KEY])
                .arg(&data)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log handle"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if crate::listening(port) {
                    return S3Server { child, root, port };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("s3s-fs did not start listening:\n{last_log}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding bucket `name` (its objects are files below it).
    pub fn bucket_dir(&self, name: &str) -> PathBuf {
        self.root.join("data").join(name)
    }

    /// Creates another empty bucket.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.bucket_dir(name)).expect("create bucket directory");
    }

    /// The directory it serves buckets from.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !keep_test_dirs() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
