//! The API as its users meet it: the official Alibaba Cloud RDS SDK for
//! Python (`alibabacloud-rds20140815`, installed into `.cache/venv` by
//! `scripts/install-test-deps.sh`) against a real `strata serve` backing up a
//! real PostgreSQL 15.
//!
//! Each test here starts its own server (own data directory, free port),
//! creates a read-only key next to the admin key the first start wrote, and
//! runs one pytest module of `tests/sdk/` with the endpoint, both key pairs
//! and the PostgreSQL server (its own cluster) in its environment. The
//! modules register their own instance ids (one replication slot each).
//! The crash test kills a server with SIGKILL in the middle of a backup and
//! checks, through the SDK, what the restarted server reports.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{cluster_on, fake_data_dir, AgentProcess, BindMount};
use common::Strata;
use testkit::{Cluster, FsKind, LoopFs, S3Server};

/// Longest a pytest module (or the crash client) may run.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(600);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn sdk_dir() -> PathBuf {
    workspace_root().join("tests/sdk")
}

/// The venv's Python with the SDK and pytest; a missing one fails the test
/// (a broken test environment is not a reason to skip).
fn python() -> PathBuf {
    let py = workspace_root().join(".cache/venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args([
                "-c",
                "import alibabacloud_rds20140815.client, alibabacloud_tea_openapi, pytest",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import the Alibaba Cloud RDS SDK and pytest: run scripts/install-test-deps.sh \
         (it installs alibabacloud-rds20140815 and pytest into .cache/venv)",
        py.display()
    );
    py
}

fn json_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

/// `(AccessKeyId, AccessKeySecret)` of a `{"AccessKeyId", "AccessKeySecret"}` object.
fn key_pair(v: &serde_json::Value) -> (String, String) {
    let field = |name: &str| {
        v[name]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .to_string()
    };
    (field("AccessKeyId"), field("AccessKeySecret"))
}

/// A `strata serve` child process with its own data directory; killed on
/// drop (also when the test panics).
struct ApiServer {
    strata: Strata,
    port: u16,
    child: Option<Child>,
    starts: u32,
    /// Run as PID 1 of a PID namespace of its own (as in a container),
    /// under `unshare --pid --fork --mount-proc --kill-child`: `child` is
    /// `unshare`, and killing it kills the namespace.
    pid_namespace: bool,
    /// Host pid of the `strata serve` process of the current start.
    server_pid: Option<u32>,
}

impl ApiServer {
    fn start_with_drills(name: &str, scheduler: &str, drills: bool) -> ApiServer {
        Self::start_configured(Strata::new(name), scheduler, drills)
    }

    fn start_configured(strata: Strata, scheduler: &str, drills: bool) -> ApiServer {
        let mut server = Self::configured(strata, scheduler, drills);
        server.start();
        server
    }

    /// Writes `[scheduler] retention_interval_secs = 2` plus `scheduler`
    /// (more lines of that table) into the configuration, without starting.
    /// Restore drills run only with `drills`: each would restore and start
    /// a scratch server after every backup, which is not what most tests
    /// are about and would compete with them for the two cores.
    fn configured(strata: Strata, scheduler: &str, drills: bool) -> ApiServer {
        let mut config = std::fs::OpenOptions::new()
            .append(true)
            .open(&strata.config)
            .expect("open strata.toml");
        write!(
            config,
            "[drills]\nenabled = {drills}\n[scheduler]\nretention_interval_secs = 2\n{scheduler}"
        )
        .expect("write strata.toml");
        ApiServer {
            strata,
            port: testkit::free_port(),
            child: None,
            starts: 0,
            pid_namespace: false,
            server_pid: None,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.strata.dir.join("data")
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.strata.dir.join("serve.log")
    }

    /// Everything the server wrote to stderr (all starts).
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the server on its port and data directory and
    /// waits until `/healthz` answers.
    fn start(&mut self) {
        assert!(self.child.is_none(), "server already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open serve.log");
        let out = std::fs::File::create(self.strata.dir.join(format!("serve-{}.out", self.starts)))
            .expect("create serve.out");
        let listen = self.endpoint();
        let mut command = if self.pid_namespace {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                .arg(env!("CARGO_BIN_EXE_strata"))
                .arg("--config")
                .arg(&self.strata.config)
                .args(["serve", "--listen", &listen])
                .stdin(Stdio::null());
            c
        } else {
            self.strata.command(&["serve", "--listen", &listen])
        };
        let child = command
            .env("STRATA_LOG", "info")
            .env("STRATA_DATA_DIR", self.data_dir())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn strata serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("strata serve exited with {status}:\n{}", self.log());
            }
            if self.healthz() {
                let pid = self.child.as_ref().map(Child::id);
                self.server_pid = match (self.pid_namespace, pid) {
                    (true, Some(unshare)) => Some(only_child(unshare)),
                    (_, pid) => pid,
                };
                return;
            }
            assert!(
                Instant::now() < deadline,
                "strata serve not healthy after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn healthz(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.endpoint()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let req = format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.endpoint()
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.starts_with("HTTP/1.1 200") && resp.trim_end().ends_with("ok")
    }

    /// SIGKILL, as a crash would; waits for (and reaps) the process. In a
    /// PID namespace, `unshare` dies and takes its namespace with it; the
    /// server's end is waited for before returning.
    fn kill9(&mut self) {
        let mut child = self.child.take().expect("server running");
        child.kill().expect("SIGKILL strata serve");
        let status = child.wait().expect("wait for strata serve");
        assert!(!status.success(), "killed server exited with {status}");
        if let Some(pid) = self.server_pid.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while process_running(pid) {
                assert!(
                    Instant::now() < deadline,
                    "strata serve (pid {pid}) outlived SIGKILL"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The server's pid as its own PID namespace numbers it (the last
    /// `NSpid` field of its status).
    fn pid_in_namespace(&self) -> u32 {
        let pid = self.server_pid.expect("server running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("status of pid {pid}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no NSpid in /proc/{pid}/status:\n{status}"))
    }

    /// SIGTERM (graceful), SIGKILL after 20 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: a signal to the pid of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn admin_key(&self) -> (String, String) {
        let path = self.data_dir().join("admin-key.json");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} must be private", path.display());
        key_pair(&json_file(&path))
    }

    fn create_read_only_key(&self) -> (String, String) {
        let out = self
            .strata
            .command(&["key", "create", "--read-only", "--json"])
            .env("STRATA_DATA_DIR", self.data_dir())
            .output()
            .expect("run strata key create");
        assert!(
            out.status.success(),
            "strata key create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        key_pair(
            &serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("key create --json printed {stdout:?}: {e}")),
        )
    }

    /// What the Python side needs: the endpoint, both key pairs, the
    /// PostgreSQL server.
    fn python_env(&self, cluster: &Cluster) -> Vec<(String, String)> {
        let (id, secret) = self.admin_key();
        let (ro_id, ro_secret) = self.create_read_only_key();
        assert_ne!(id, ro_id);
        [
            ("STRATA_ENDPOINT", self.endpoint()),
            ("STRATA_KEY_ID", id),
            ("STRATA_KEY_SECRET", secret),
            ("STRATA_RO_KEY_ID", ro_id),
            ("STRATA_RO_KEY_SECRET", ro_secret),
            ("STRATA_PG_HOST", cluster.host().to_string()),
            ("STRATA_PG_PORT", cluster.port().to_string()),
            ("STRATA_PG_USER", "postgres".to_string()),
            ("STRATA_DATA_DIR", self.data_dir().display().to_string()),
            ("STRATA_BIN", env!("CARGO_BIN_EXE_strata").to_string()),
            ("STRATA_CONFIG", self.strata.config.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Runs `python args…` in the workspace root with `env`; fails the test
    /// with Python's output and the server log unless it exits 0. Returns
    /// Python's output.
    fn run_python(&self, what: &str, args: &[&str], env: &[(String, String)]) -> String {
        let out_path = self.strata.dir.join(format!("{what}.out"));
        let out = std::fs::File::create(&out_path).expect("create python output file");
        let mut child = Command::new(python())
            .args(args)
            .current_dir(workspace_root())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup output file"))
            .stderr(out)
            .spawn()
            .expect("spawn python");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for python") {
                break Some(status);
            }
            if started.elapsed() > PYTHON_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        match status {
            Some(s) if s.success() => {
                println!(
                    "--- {what} ({:.1} s) ---\n{output}",
                    started.elapsed().as_secs_f64()
                );
                output
            }
            other => panic!(
                "{what} {}:\n{output}\n--- strata serve log ---\n{}",
                match other {
                    Some(s) => format!("failed ({s})"),
                    None => format!("timed out after {} s", PYTHON_TIMEOUT.as_secs()),
                },
                self.log()
            ),
        }
    }

    /// A 5xx is a server bug whatever the test expected.
    fn assert_no_internal_errors(&self) {
        let log = self.log();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("internal error") || l.contains("panicked"))
            .collect();
        assert!(
            bad.is_empty(),
            "the server logged internal errors:\n{}",
            bad.join("\n")
        );
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// One pytest module of `tests/sdk/` against a fresh server and its own
/// PostgreSQL 15 cluster (not the shared one: the modules register several
/// instances, each with a replication slot, and switch WAL; on their own
/// cluster they neither run out of slots nor see each other's WAL).
fn run_module(module: &str) {
    run_module_with_drills(module, false);
}

fn run_module_with_drills(module: &str, drills: bool) {
    run_module_configured(module, drills, "");
}

/// `config` is appended to the server's configuration after its
/// `[scheduler]` table (start it with a table header of its own).
fn run_module_configured(module: &str, drills: bool, config: &str) {
    python();
    let cluster = Cluster::start_default(15);
    run_module_on(module, &cluster, drills, config, &[]);
}

/// One pytest module against a fresh server and `cluster`, with `extra`
/// in its environment besides what [`ApiServer::python_env`] sets.
fn run_module_on(
    module: &str,
    cluster: &Cluster,
    drills: bool,
    config: &str,
    extra: &[(&str, String)],
) {
    python();
    assert!(
        sdk_dir().join(module).is_file(),
        "tests/sdk/{module} missing"
    );
    let name = module.trim_start_matches("test_").trim_end_matches(".py");
    let server = ApiServer::start_with_drills(&format!("api-{name}"), config, drills);
    let mut env = server.python_env(cluster);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let path = format!("tests/sdk/{module}");
    let output = server.run_python(
        &format!("pytest-{name}"),
        &["-m", "pytest", "-q", &path],
        &env,
    );
    assert!(
        output.contains(" passed") && !output.contains(" skipped"),
        "pytest ran nothing or skipped tests:\n{output}"
    );
    server.assert_no_internal_errors();
}

/// User backups: a pg_basebackup directory placed in the import
/// directory, imported, listed, changed, cloned and deleted; hostile
/// BackupFile names refused.
#[test]
fn sdk_user_backups() {
    let import_dir = testkit::temp_dir("strata-user-backups-");
    let cluster = Cluster::start_default(15);
    let dir = import_dir.display().to_string();
    run_module_on(
        "test_user_backup.py",
        &cluster,
        false,
        &format!("[import]\ndir = {dir:?}\n"),
        &[("STRATA_IMPORT_DIR", dir.clone())],
    );
    let _ = std::fs::remove_dir_all(&import_dir);
}

#[test]
fn sdk_backups_tasks_instances_read_only_key() {
    run_module("test_backups.py");
}

#[test]
fn sdk_recovery_events_and_undo() {
    run_module("test_events.py");
}

#[test]
fn sdk_backup_policy() {
    run_module("test_policy.py");
}

#[test]
fn sdk_advanced_backup_policy_and_keep() {
    run_module("test_policy_advanced.py");
}

/// ModifyBackupSetExpireTime, DescribeLogBackupFiles and
/// DescribeDetachedBackups (a deregistered instance's set listed and cloned).
#[test]
fn sdk_backup_set_expiry_log_files_and_detached_sets() {
    run_module("test_backup_ops.py");
}

#[test]
fn sdk_log_backups_recovery_window_and_delete() {
    run_module("test_wal.py");
}

/// Clones, RestoreTable, downloads and restore drills (drills on here).
#[test]
fn sdk_restores_downloads_and_drills() {
    run_module_with_drills("test_restore.py", true);
}

/// RecoveryDBInstance and CopyDatabaseBetweenInstances: databases of a set
/// or a point in time into a clone Strata runs and into a new instance,
/// taken names refused, failures leaving nothing, hostile names.
#[test]
fn sdk_recovery_and_copy_between_instances() {
    run_module("test_recovery.py");
}

/// RestoreTable and CloneDBInstance just before and just after one
/// destructive transaction (by xid and by its commit LSN) while another
/// session commits beside it; malformed and conflicting targets refused.
#[test]
fn sdk_restores_exact_to_a_transaction() {
    run_module("test_restore_targets.py");
}

/// Hostile names (conninfo strings, quotes, long and multibyte names) in
/// RestoreTable and restore drills, a source whose settings run commands,
/// scratch servers closed to other users, table restores that fail cleanly.
#[test]
fn sdk_hostile_names_and_source_settings() {
    run_module("test_hostile_source.py");
}

/// CloneDBInstance of a snapshot backup on the database host: PostgreSQL
/// on an XFS loop file system with `strata agent` beside it, registered
/// with the agent through the API.
#[test]
fn sdk_clone_of_a_snapshot_on_the_database_host() {
    python();
    let Some(fs) = testkit::LoopFs::or_skip(testkit::FsKind::Xfs, 600, true) else {
        return;
    };
    let cluster = Cluster::builder(15)
        .in_dir(fs.path())
        .conf("max_wal_size = 128MB")
        .conf("min_wal_size = 32MB")
        .start();
    let agent = AgentProcess::start(cluster.data_dir(), testkit::free_port());
    let server = ApiServer::start_with_drills("api-snapshot-clone", "", false);
    let mut env = server.python_env(&cluster);
    env.extend([
        ("STRATA_AGENT_URL".to_string(), agent.url()),
        ("STRATA_AGENT_KEY".to_string(), agent.key_hex()),
        (
            "STRATA_AGENT_CLONE_DIR".to_string(),
            agent.clone_dir().display().to_string(),
        ),
    ]);
    let output = server.run_python(
        "pytest-snapshot-clone",
        &["-m", "pytest", "-q", "tests/sdk/test_snapshot_clone.py"],
        &env,
    );
    assert!(
        output.contains(" passed") && !output.contains(" skipped"),
        "pytest ran nothing or skipped tests:\n{output}"
    );
    server.assert_no_internal_errors();
}

/// Storage usage with a 1 KiB free quota and an hour between samples (so
/// samples follow changes only): StrataDescribeBackupStorageUsage,
/// TotalEcsSnapshotSize and Encryption.
#[test]
fn sdk_storage_usage_and_free_quota() {
    run_module_configured(
        "test_usage.py",
        false,
        "[usage]\nfree_quota = \"1KiB\"\nsample_interval_secs = 3600\n",
    );
}

/// Snapshot backups through the API: the PostgreSQL server on a
/// loop-mounted XFS (`reflink=1`) served by `strata agent`, a second agent
/// whose data directory is on ext4 (refused at registration), and one
/// snapshot kept on the host (`snapshot.keep_local = 1`), so retention
/// deletes the older one there once the newer is uploaded.
#[test]
fn sdk_snapshot_backups() {
    python();
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let cluster = cluster_on(&fs);
    let agent = AgentProcess::start(cluster.data_dir(), testkit::free_port());
    // An agent started on XFS whose data directory is then covered by one on ext4 (an agent
    // refuses to start on ext4 itself).
    let other_data = fake_data_dir(&fs.path().join("other"));
    let other = AgentProcess::start(&other_data, testkit::free_port());
    let Some(ext4) = LoopFs::or_skip(FsKind::Ext4, 64, true) else {
        return;
    };
    let ext4_data = fake_data_dir(&ext4.path().join("pg"));
    let covered = BindMount::new(&ext4_data, &other_data);
    let extra = [
        ("STRATA_AGENT_URL", agent.url()),
        ("STRATA_AGENT_KEY", agent.key_hex()),
        (
            "STRATA_AGENT_SNAPSHOT_DIR",
            agent.snapshot_dir().display().to_string(),
        ),
        ("STRATA_EXT4_AGENT_URL", other.url()),
        ("STRATA_EXT4_AGENT_KEY", other.key_hex()),
        ("STRATA_EXT4_DATA_DIR", other_data.display().to_string()),
    ];
    run_module_on(
        "test_snapshot.py",
        &cluster,
        false,
        "[snapshot]\nkeep_local = 1\n",
        &extra,
    );
    drop(covered);
}

#[test]
fn sdk_authentication() {
    run_module("test_auth.py");
}

/// The one child of process `pid` (`unshare --fork` has exactly one).
fn only_child(pid: u32) -> u32 {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let children: Vec<u32> = text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(children.len(), 1, "children of {pid}: {text:?}");
    children[0]
}

/// Whether any thread of `pid` still runs. A killed process's leader can
/// be a zombie while its other threads are still exiting (and holding its
/// sockets), so every thread is looked at.
fn process_running(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            })
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// SIGKILL during a (throttled, automatic) backup: after a restart on the
/// same data directory the job is Failed with a reason, the set is Failed,
/// never Success, a replayed request stays refused, and a new backup works.
/// With `pid_namespace`, the server runs as PID 1 of its own PID namespace
/// (as in a container), so the restarted server has the dead one's PID:
/// the job must be taken over because its lease expired, not because a PID
/// disappeared.
fn crash_during_backup(name: &str, pid_namespace: bool) {
    python();
    let cluster = Cluster::start_default(15);
    // About 100 MB of data directory: at 2 MB/s the automatic first backup
    // takes close to a minute, so the kill lands in the middle of it.
    cluster.pgbench("postgres", &["-i", "-s", "5", "-q"]);
    // A short lease, so the takeover comes within the client's wait.
    let mut server = ApiServer::configured(
        Strata::new(name),
        "backup_max_rate_kb = 2048\n[jobs]\nlease_secs = 4\n",
        false,
    );
    server.pid_namespace = pid_namespace;
    server.start();
    if pid_namespace {
        assert_eq!(server.pid_in_namespace(), 1, "strata serve is not PID 1");
    }
    let env = server.python_env(&cluster);
    let state = server.strata.dir.join("crash-state.json");
    let state_s = state.display().to_string();
    let client = sdk_dir().join("crash_client.py").display().to_string();
    server.run_python(
        "crash-start",
        &[&client, "start", "crash-1", &state_s],
        &env,
    );
    let job = json_file(&state);
    server.kill9();

    server.start();
    if pid_namespace {
        assert_eq!(
            server.pid_in_namespace(),
            1,
            "the restarted server is not PID 1"
        );
    }
    let output = server.run_python(
        "crash-after-restart",
        &[
            &client,
            "after-restart",
            &state_s,
            "stopped renewing its lease",
        ],
        &env,
    );
    assert!(output.contains("Failed:"), "{output}");
    let log = server.log();
    assert!(
        log.contains("automatic backup started (first backup)"),
        "the first backup was the automatic one:\n{log}"
    );
    assert!(
        log.contains("whose owner stopped renewing its lease"),
        "the restarted server did not take the job over:\n{log}"
    );
    server.assert_no_internal_errors();
    println!(
        "crashed job {} (backup set {}) reported Failed after the restart",
        job["job"], job["backup"]
    );
}

#[test]
fn crash_during_backup_leaves_a_failed_job_and_the_server_recovers() {
    crash_during_backup("api-crash", false);
}

/// The same crash in a container: `strata serve` is PID 1 before and after.
#[test]
fn crash_as_pid_1_of_a_pid_namespace_fails_the_job_when_its_lease_expires() {
    crash_during_backup("api-crash-pidns", true);
}

/// What backup sets hold: DescribeBackupDatabase and DescribeMetaList by
/// set and by point in time, DescribeCrossBackupMetaList of a copy in
/// `cn-beijing` (a directory repository); this server is `cn-hangzhou`.
#[test]
fn sdk_backup_contents_by_set_time_and_copy() {
    python();
    let cluster = Cluster::start_default(15);
    let strata = Strata::with_config("api-meta", "region_id = \"cn-hangzhou\"\n", "");
    let regions = format!(
        "[regions.cn-beijing]\nrepository = {:?}\n",
        strata.dir.join("beijing").display().to_string()
    );
    let server = ApiServer::start_configured(strata, &regions, false);
    let env = server.python_env(&cluster);
    let output = server.run_python(
        "pytest-meta",
        &["-m", "pytest", "-q", "tests/sdk/test_meta.py"],
        &env,
    );
    assert!(
        output.contains(" passed") && !output.contains(" skipped"),
        "pytest ran nothing or skipped tests:\n{output}"
    );
    server.assert_no_internal_errors();
}

/// Cross-region backup: this server is region `cn-hangzhou`; copies go to
/// `cn-shanghai`, an encrypted repository on a real S3 server (so every
/// block is re-hashed and re-sealed with another key), and `cn-beijing`
/// (a directory) is a second choice. The module wipes the primary
/// repository and restores from the copies alone.
#[test]
fn sdk_cross_region_backups_and_restore_from_copies() {
    python();
    let s3 = S3Server::start();
    let cluster = Cluster::start_default(15);
    let name = "api-cross-region";
    let strata = Strata::with_config(name, "region_id = \"cn-hangzhou\"\n", "");
    let key_file = strata.dir.join("shanghai.key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).expect("write key file");
    let regions = format!(
        "[regions.cn-shanghai]\nrepository = \"s3://{bucket}/cross\"\n\
         [regions.cn-shanghai.s3]\nendpoint = {endpoint:?}\naccess_key_id = {ak:?}\nsecret_access_key = {sk:?}\npath_style = true\nallow_http = true\n\
         [regions.cn-shanghai.encryption]\nkey_file = {key:?}\n\
         [regions.cn-beijing]\nrepository = {beijing:?}\n\
         [regions.cn-hangzhou]\nrepository = {hangzhou:?}\n",
        bucket = S3Server::BUCKET,
        endpoint = s3.endpoint(),
        ak = S3Server::ACCESS_KEY,
        sk = S3Server::SECRET_KEY,
        key = key_file.display().to_string(),
        beijing = strata.dir.join("beijing").display().to_string(),
        hangzhou = strata.dir.join("hangzhou").display().to_string(),
    );
    let server = ApiServer::start_configured(strata, &regions, false);
    let mut env = server.python_env(&cluster);
    env.push((
        "STRATA_PRIMARY_REPOSITORY".into(),
        server.data_dir().join("repo").display().to_string(),
    ));
    env.push((
        "STRATA_CROSS_REPOSITORY".into(),
        s3.bucket_dir(S3Server::BUCKET)
            .join("cross")
            .display()
            .to_string(),
    ));
    let output = server.run_python(
        "pytest-cross-region",
        &["-m", "pytest", "-q", "tests/sdk/test_cross_region.py"],
        &env,
    );
    assert!(
        output.contains(" passed") && !output.contains(" skipped"),
        "pytest ran nothing or skipped tests:\n{output}"
    );
    server.assert_no_internal_errors();
}

/// Per-instance backup encryption with moto's KMS: EnableBackupEncryption,
/// an encrypted backup restored and compared, no plaintext in the
/// repository, a disabled key refusing backups and restores until enabled
/// again, rotation without rewriting packs, hostile key ids refused.
#[test]
fn sdk_backup_encryption_with_kms() {
    python();
    let moto = testkit::Moto::start();
    let cluster = Cluster::start_default(15);
    run_module_on(
        "test_encryption.py",
        &cluster,
        false,
        // Garbage collection deletes what it finds unreferenced at once.
        &format!("{}[gc]\ngrace_secs = 0\n", moto.kms_config()),
        &[("STRATA_KMS_ENDPOINT", moto.endpoint())],
    );
}
