//! Shared helpers for the CLI tests: a Strata data directory with its own
//! configuration, and runners for the real `strata` binary.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::Cluster;

pub struct Strata {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Strata {
    pub fn new(name: &str) -> Strata {
        let dir = testkit::temp_dir(&format!("strata-{name}-"));
        let bin_dirs: Vec<String> = [14, 15, 16, 17, 18]
            .into_iter()
            .filter_map(testkit::pg_bin_dir)
            .map(|d| format!("{:?}", d.display().to_string()))
            .collect();
        let config = dir.join("strata.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[wal]\nflush_interval_ms = 200\nstatus_interval_secs = 1\n[restore]\nstart_timeout_secs = 90\n[postgres]\nbin_dirs = [{}]\n",
                dir.join("data").display().to_string(),
                bin_dirs.join(", ")
            ),
        )
        .unwrap();
        Strata { dir, config }
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.dir.join("data/repo")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run strata")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "strata {args:?} should have failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn add_instance(&self, id: &str, cluster: &Cluster) {
        self.ok(&add_args(id, &cluster.port().to_string(), "postgres"));
    }

    /// Runs a backup; returns the backup set id (the last stdout line).
    pub fn backup(&self, id: &str) -> String {
        let out = self.ok(&["backup", "create", id]);
        out.lines()
            .last()
            .expect("backup id line")
            .trim()
            .to_string()
    }

    pub fn backups(&self, id: &str) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["backup", "list", id, "--json"])).unwrap()
    }

    pub fn wal(&self, id: &str) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["wal", "list", id, "--json"])).unwrap()
    }

    /// Starts `wal receive` in the background.
    pub fn wal_receiver(&self, id: &str) -> Receiver {
        let child = self
            .command(&["wal", "receive", id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wal receive");
        Receiver { child: Some(child) }
    }

    /// Restores with `extra` arguments, starts the server and adopts it.
    pub fn restore_and_start(&self, id: &str, name: &str, major: u32, extra: &[&str]) -> Cluster {
        let target = self.dir.join(format!("restore-{name}"));
        let port = testkit::free_port();
        let port_s = port.to_string();
        let target_s = target.display().to_string();
        let mut args = vec![
            "restore",
            id,
            "--target-dir",
            &target_s,
            "--start",
            "--port",
            &port_s,
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
        Cluster::adopt(major, target, port)
    }
}

impl Drop for Strata {
    fn drop(&mut self) {
        if std::env::var_os("STRATA_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `strata wal receive`; stopped with SIGINT on drop.
pub struct Receiver {
    child: Option<Child>,
}

impl Receiver {
    /// Sends SIGINT and waits; returns the receiver's stderr.
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("receiver output");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "wal receive exited with {}: {err}",
            out.status
        );
        err
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `instance add` arguments for `user` at `port` on 127.0.0.1.
pub fn add_args<'a>(id: &'a str, port: &'a str, user: &'a str) -> Vec<&'a str> {
    vec![
        "instance",
        "add",
        id,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--user",
        user,
    ]
}

/// Waits until `cond` holds, failing the test after `secs`.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A digest of every row of the pgbench tables and the test's ledger.
pub fn state_digest(c: &Cluster, db: &str) -> String {
    c.psql(
        db,
        "SELECT md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts; \
         SELECT count(*) || ':' || coalesce(sum(delta), 0) FROM pgbench_history; \
         SELECT md5(coalesce(string_agg(id::text || ':' || note, ',' ORDER BY id), '')) FROM ledger",
    )
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A running `strata serve`, stopped with SIGTERM when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(strata: &Strata, extra: &[&str]) -> Server {
        let port = testkit::free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--listen", &listen];
        args.extend_from_slice(extra);
        let child = strata
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start strata serve");
        let server = Server { child, port };
        wait_for("the API to listen", 60, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }

    /// SIGTERM, then the exit status and everything printed.
    pub fn stop(mut self) -> (bool, String, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut out = String::new();
        let mut err = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let ok = self.child.wait().unwrap().success();
        (ok, out, err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET; returns status line and body.
pub fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
