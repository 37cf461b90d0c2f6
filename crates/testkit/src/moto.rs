//! moto's S3 server for tests of what s3s-fs does not have: versioned
//! buckets and Object Lock. `moto_server` (PyPI `moto[server]`, installed into
//! `.cache/moto` by `scripts/install-test-deps.sh`) runs on a free loopback
//! port; buckets are made, and attacks on them carried out, with the boto3
//! that moto's environment brings, a client independent of Strata's.
//! Stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::emulator::start_on_free_port;
use crate::workspace_root;

/// The environment moto is installed in: env `STRATA_MOTO`, else
/// `<workspace>/.cache/moto`.
pub fn moto_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("STRATA_MOTO") {
        return PathBuf::from(path);
    }
    workspace_root().join(".cache/moto")
}

/// A running `moto_server`.
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Moto {
    /// Access key id the tests use (moto accepts any).
    pub const ACCESS_KEY: &'static str = "STRATAMOTOACCESS";
    /// Its secret.
    pub const SECRET_KEY: &'static str = "strata-moto-secret-key-0123456789";
    /// Region the tests use.
    pub const REGION: &'static str = "us-east-1";

    /// Starts a server without buckets.
    pub fn start() -> Moto {
        let binary = moto_dir().join("bin/moto_server");
        assert!(
            binary.exists(),
            "{} not found; run scripts/install-test-deps.sh (or set STRATA_MOTO)",
            binary.display()
        );
        let started = start_on_free_port(
            "strata-moto",
            &std::env::temp_dir(),
            Duration::from_secs(60),
            |port| {
                let mut command = Command::new(&binary);
                command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                command
            },
        );
        Moto {
            child: started.child,
            port: started.port,
            log: started.log,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[kms]` table of a Strata configuration using this server's KMS.
    pub fn kms_config(&self) -> String {
        format!(
            "[kms]\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.endpoint(),
            Self::REGION,
            Self::ACCESS_KEY,
            Self::SECRET_KEY
        )
    }

    /// Creates bucket `name`: plain, versioned, or with Object Lock (which
    /// makes it versioned too).
    pub fn create_bucket(&self, name: &str, versioned: bool, object_lock: bool) {
        let script = format!(
            "s3.create_bucket(Bucket={name:?}, ObjectLockEnabledForBucket={})\n\
             if {}:\n    s3.put_bucket_versioning(Bucket={name:?}, \
             VersioningConfiguration={{'Status': 'Enabled'}})\n",
            if object_lock { "True" } else { "False" },
            if versioned { "True" } else { "False" },
        );
        self.boto3(&script);
    }

    /// Runs `script` with `s3`, a boto3 client of this server with the
    /// test credentials, in scope; returns what it printed. Panics when
    /// the script fails.
    pub fn boto3(&self, script: &str) -> String {
        let prelude = format!(
            "import boto3, json, sys\n\
             s3 = boto3.client('s3', endpoint_url={:?}, region_name='us-east-1', \
             aws_access_key_id={:?}, aws_secret_access_key={:?})\n",
            self.endpoint(),
            Self::ACCESS_KEY,
            Self::SECRET_KEY
        );
        let out = Command::new(moto_dir().join("bin/python3"))
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .stdin(Stdio::null())
            .output()
            .expect("run moto's python");
        assert!(
            out.status.success(),
            "boto3 script failed:\n{script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
