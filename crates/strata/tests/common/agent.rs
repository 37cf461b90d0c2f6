//! A snapshot agent's host for the tests: a PostgreSQL 15 cluster on a loop-mounted file
//! system, and `strata agent` serving its data directory as a separate process.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use testkit::{Cluster, LoopFs};

/// A running `strata agent`, SIGKILLed on drop (before its file system is unmounted).
pub struct AgentProcess {
    child: Option<Child>,
    data: PathBuf,
    port: u16,
    args: Vec<String>,
}

impl AgentProcess {
    /// Starts the agent on `data` and waits for its "serving" line.
    pub fn start(data: &Path, port: u16) -> AgentProcess {
        Self::start_with(data, port, &[])
    }

    /// Starts the agent on `data` with more options (e.g. `--min-free-bytes`).
    pub fn start_with(data: &Path, port: u16, args: &[&str]) -> AgentProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["agent", "--data-dir"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env_remove("STRATA_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn strata agent");
        let stderr = child.stderr.take().expect("agent stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent printed nothing");
        assert!(line.contains("strata agent serving"), "{line}");
        AgentProcess {
            child: Some(child),
            data: data.to_path_buf(),
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Its process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where its clones go (the default, beside the data directory).
    pub fn clone_dir(&self) -> PathBuf {
        self.data
            .parent()
            .expect("data dir parent")
            .join("strata-clones")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.data
            .parent()
            .expect("data dir parent")
            .join("strata-snapshots")
    }

    pub fn key_file(&self) -> PathBuf {
        self.snapshot_dir().join("agent.key")
    }

    /// The key as the API takes it (`AgentKey`): the key file's 64 hex digits.
    pub fn key_hex(&self) -> String {
        std::fs::read_to_string(self.key_file())
            .expect("read the agent's key file")
            .trim()
            .to_string()
    }

    /// SIGKILL, as a crash: nothing of the agent runs after it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL strata agent");
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data directory, port and options.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        let args = self.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        *self = AgentProcess::start_with(&self.data.clone(), self.port, &args);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A PostgreSQL 15 cluster on `fs` with pgbench tables (scale 1) and a ledger.
pub fn cluster_on(fs: &LoopFs) -> Cluster {
    // WAL kept small: the file system is too.
    let pg = Cluster::builder(15)
        .in_dir(fs.path())
        .conf("max_wal_size = 128MB")
        .conf("min_wal_size = 32MB")
        .start();
    pg.pgbench("postgres", &["-i", "-q", "-s", "1"]);
    pg.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text)",
    );
    pg
}

/// A directory that looks like a data directory to the agent (PG_VERSION, a pg_control whose
/// system identifier is 42), owned by the postgres OS user.
pub fn fake_data_dir(parent: &Path) -> PathBuf {
    let data = parent.join("data");
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(data.join("global/pg_control"), 42u64.to_ne_bytes()).unwrap();
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(parent)
        .status()
        .unwrap();
    assert!(ok.success());
    data
}

/// `source` bind-mounted over `target` until dropped.
pub struct BindMount {
    target: PathBuf,
}

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> BindMount {
        let ok = Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(target)
            .status()
            .expect("run mount --bind");
        assert!(
            ok.success(),
            "mount --bind {} {}",
            source.display(),
            target.display()
        );
        BindMount {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.target).status();
    }
}
