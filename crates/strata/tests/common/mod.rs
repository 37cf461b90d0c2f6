//! Shared helpers for the CLI tests: a Strata data directory with its own
//! configuration, and runners for the real `strata` binary.

#![allow(dead_code)]

pub mod agent;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use testkit::{Azurite, Cluster, FakeGcs, S3Server};

pub struct Strata {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Strata {
    pub fn new(name: &str) -> Strata {
        Self::with_config(name, "", "")
    }

    /// A Strata whose repository is `s3://<test bucket>/<name>` on `server`,
    /// with `sections` (e.g. `[encryption]`) added to the configuration.
    pub fn on_s3(name: &str, server: &S3Server, sections: &str) -> Strata {
        Self::with_config(
            name,
            &format!("repository = \"s3://{}/{name}\"\n", S3Server::BUCKET),
            &format!(
                "[s3]\nendpoint = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\npath_style = true\nallow_http = true\n{sections}",
                server.endpoint(),
                S3Server::ACCESS_KEY,
                S3Server::SECRET_KEY
            ),
        )
    }

    /// A Strata whose repository is `azure://<test container>/<name>` on
    /// `azurite`, with `sections` added to the configuration. The emulator's
    /// key comes from a file, as a real account's would.
    pub fn on_azure(name: &str, azurite: &Azurite, sections: &str) -> Strata {
        let strata = Self::with_config(name, "", "");
        let key_file = strata.dir.join("azure.key");
        std::fs::write(&key_file, format!("{}\n", Azurite::ACCOUNT_KEY)).unwrap();
        let config = std::fs::read_to_string(&strata.config).unwrap();
        std::fs::write(
            &strata.config,
            format!(
                "repository = \"azure://{}/{name}\"\n{config}[azure]\nuse_emulator = true\nendpoint = {:?}\naccess_key_file = {:?}\n{sections}",
                Azurite::CONTAINER,
                azurite.endpoint(),
                path_str(&key_file)
            ),
        )
        .unwrap();
        strata
    }

    /// A Strata whose repository is `gs://<test bucket>/<name>` on the
    /// emulator `gcs`, with `sections` added to the configuration.
    pub fn on_gcs(name: &str, gcs: &FakeGcs, sections: &str) -> Strata {
        Self::with_config(
            name,
            &format!("repository = \"gs://{}/{name}\"\n", FakeGcs::BUCKET),
            &format!(
                "[gcs]\nuse_emulator = true\nendpoint = {:?}\n{sections}",
                gcs.endpoint()
            ),
        )
    }

    /// A Strata with `top` (top-level keys) and `sections` added to the
    /// test configuration.
    pub fn with_config(name: &str, top: &str, sections: &str) -> Strata {
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
                "data_dir = {:?}\n{top}[wal]\nflush_interval_ms = 200\nstatus_interval_secs = 1\n[restore]\nstart_timeout_secs = 90\n[postgres]\nbin_dirs = [{}]\n{sections}",
                dir.join("data").display().to_string(),
                bin_dirs.join(", ")
            ),
        )
        .unwrap();
        Strata { dir, config }
    }

    /// The same data directory with a configuration rewritten with `top`
    /// and `sections` in place of what was added before.
    pub fn reconfigured(mut self, top: &str, sections: &str) -> Strata {
        let fresh = Self::with_config("reconfig", top, sections);
        let text = std::fs::read_to_string(&fresh.config)
            .unwrap()
            .replace(&path_str(&fresh.dir), &path_str(&self.dir));
        std::fs::write(&self.config, text).unwrap();
        // `fresh` removes its own directory on drop; `self` keeps its data.
        drop(fresh);
        self.config = self.dir.join("strata.toml");
        self
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
        let mut child = self
            .command(&["wal", "receive", id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wal receive");
        let (stderr, reader) = collect(child.stderr.take().unwrap());
        Receiver {
            child: Some(child),
            stderr,
            reader: Some(reader),
        }
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

/// Everything `pipe` gives, read as it comes into the string returned
/// (complete once the thread ends).
fn collect(
    mut pipe: impl Read + Send + 'static,
) -> (
    std::sync::Arc<std::sync::Mutex<String>>,
    std::thread::JoinHandle<()>,
) {
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = std::sync::Arc::clone(&text);
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    (text, reader)
}

/// A running `strata wal receive`; stopped with SIGINT on drop.
pub struct Receiver {
    child: Option<Child>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// What the receiver has printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

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
        let status = child.wait().expect("receiver status");
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        let err = self.stderr();
        assert!(status.success(), "wal receive exited with {status}: {err}");
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

/// The core round trip: a backup under pgbench load with concurrent DDL and
/// WAL archived by `wal receive`, then restores to latest, to a time, an LSN
/// (and just before it), an xid (and just before it) and a named restore point, each started and compared row by row
/// (by digest) with what was committed at that target.
pub fn pitr_round_trip(strata: &Strata, id: &str) {
    let pg = Cluster::start_default(15);
    let db = "postgres";
    pg.pgbench(db, &["-i", "-q", "-s", "4"]);
    pg.psql(db, "CREATE TABLE ledger (id int PRIMARY KEY, note text)");

    strata.add_instance(id, &pg);
    let mut receiver = strata.wal_receiver(id);

    // Load and DDL run for the whole backup.
    let (backup_id, during) = under_load_with_ddl(
        &pg,
        db,
        2,
        |i| {
            format!(
                "CREATE TABLE ddl_{i} AS SELECT g AS x, md5(g::text) AS y FROM generate_series(1, 20000) g; \
                 CREATE INDEX ddl_{i}_y ON ddl_{i} (y); \
                 DROP TABLE IF EXISTS ddl_{}",
                i - 1
            )
        },
        || strata.backup(id),
    );
    assert!(during >= 1, "no DDL ran during the backup");
    let sets = strata.backups(id);
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["id"], backup_id.as_str());
    assert_eq!(sets[0]["status"], "Success");

    // Phases of committed work, each followed by a marker.
    let phase = |k: u32| {
        pg.pgbench(db, &["-n", "-c", "2", "-t", "50"]);
        pg.psql(db, &format!("INSERT INTO ledger VALUES ({k}, 'phase {k}')"));
    };
    phase(1);
    std::thread::sleep(Duration::from_millis(300));
    let t1 = pg.psql(
        db,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let d1 = state_digest(&pg, db);
    std::thread::sleep(Duration::from_millis(300));

    phase(2);
    let lsn2 = pg.psql(db, "SELECT pg_current_wal_insert_lsn()");
    let d2 = state_digest(&pg, db);

    phase(3);
    let d3_before = state_digest(&pg, db);
    let xid3 = pg.psql(
        db,
        "BEGIN; INSERT INTO ledger VALUES (300, 'xid marker'); SELECT txid_current(); COMMIT;",
    );
    let d3 = state_digest(&pg, db);

    phase(4);
    pg.psql(db, "SELECT pg_create_restore_point('before-phase-5')");
    let d4 = state_digest(&pg, db);

    phase(5);
    let d5 = state_digest(&pg, db);
    // Every distinct target must be a distinct state, or the test proves nothing.
    let all = [&d1, &d2, &d3_before, &d3, &d4, &d5];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // The partial segment is flushed every 200 ms; give it time, then stop.
    let end_lsn = pg.psql(db, "SELECT pg_current_wal_insert_lsn()");
    let archived = || {
        strata.wal(id).iter().any(|w| {
            let end: pg_wal::Lsn = w["end_lsn"].as_str().unwrap().parse().unwrap();
            end >= end_lsn.parse().unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !archived() {
        if Instant::now() > deadline {
            // A receiver that died says why when stopped.
            let log = receiver.stop();
            panic!("WAL not archived up to {end_lsn} within 60 s; receiver log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    receiver.stop();

    let xid3 = xid3
        .lines()
        .find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty())
        .unwrap()
        .to_string();
    let cases: Vec<(&str, Vec<&str>, &String)> = vec![
        ("latest", vec![], &d5),
        ("time", vec!["--time", &t1], &d1),
        ("lsn", vec!["--lsn", &lsn2], &d2),
        ("xid", vec!["--xid", &xid3], &d3),
        // Just before the marker transaction: phase 3 without it.
        (
            "before-xid",
            vec!["--xid", &xid3, "--exclusive"],
            &d3_before,
        ),
        // Nothing ran between phase 2 and the LSN: either side is phase 2.
        ("before-lsn", vec!["--lsn", &lsn2, "--exclusive"], &d2),
        ("name", vec!["--name", "before-phase-5"], &d4),
    ];
    for (name, args, expected) in cases {
        let restored = strata.restore_and_start(id, name, 15, &args);
        assert_eq!(
            &state_digest(&restored, db),
            expected,
            "restore to {name} {args:?} does not match the data committed at that target"
        );
        assert_eq!(restored.psql(db, "SELECT pg_is_in_recovery()"), "f");
    }
    let report: serde_json::Value =
        serde_json::from_str(&strata.ok(&["repo", "verify", "--json"])).unwrap();
    assert!(
        report["problems"].as_array().unwrap().is_empty(),
        "{report}"
    );
}

/// Every file under `dir`, recursively, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A running `strata serve`, stopped with SIGTERM when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    /// Everything the server printed on stdout and stderr, read as it
    /// comes (a full pipe would stop the server).
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(strata: &Strata, extra: &[&str]) -> Server {
        Self::start_env(strata, extra, &[])
    }

    /// Like [`Server::start`] with `env` added to the server's environment.
    /// Returns once the server has said it listens (after its signal
    /// handlers are in place), so a SIGTERM right after is an orderly stop.
    pub fn start_env(strata: &Strata, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let port = testkit::free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--listen", &listen];
        args.extend_from_slice(extra);
        let mut child = strata
            .command(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start strata serve");
        let (stdout, out_reader) = collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect(child.stderr.take().unwrap());
        let mut server = Server {
            child,
            port,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        let said = "strata: API listening on ";
        wait_for("the API to listen", 60, || {
            if let Ok(Some(status)) = server.child.try_wait() {
                for reader in server.readers.drain(..) {
                    reader.join().unwrap();
                }
                panic!(
                    "strata serve exited ({status}) before listening:\n{}\n{}",
                    server.stdout.lock().unwrap(),
                    server.stderr.lock().unwrap()
                );
            }
            server.stdout.lock().unwrap().contains(said) && testkit::listening(port)
        });
        server
    }

    /// SIGKILL, as a crash or a lost machine: nothing runs after it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status and everything printed.
    pub fn stop(mut self) -> (bool, String, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let ok = self.child.wait().unwrap().success();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let out = self.stdout.lock().unwrap().clone();
        let err = self.stderr.lock().unwrap().clone();
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

/// A plain HTTP/1.1 request with `headers` (`Host` and `Content-Length` are
/// added); returns the status code, the response head and the body.
pub fn http_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// One string field of every instance in a `DescribeDBInstances` answer,
/// by instance id (an absent field reads as empty).
pub fn instances_field(
    describe: &serde_json::Value,
    field: &str,
) -> std::collections::BTreeMap<String, String> {
    describe["Items"]["DBInstance"]
        .as_array()
        .expect("DescribeDBInstances lists Items.DBInstance")
        .iter()
        .map(|i| {
            let id = i["DBInstanceId"].as_str().unwrap_or_default().to_string();
            (id, i[field].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// Signs an RPC call (V2) with the admin key `strata serve` wrote to
/// `data/admin-key.json`, sends it to the server on `port` and returns the
/// JSON answer, which must be a 200.
pub fn signed_call(strata: &Strata, port: u16, params: &[(&str, &str)]) -> serde_json::Value {
    let (status, v) = signed_call_status(strata, port, params);
    assert!(status.contains("200"), "{status}: {v}");
    v
}

/// [`signed_call`] whatever the answer: its status line and JSON body.
pub fn signed_call_status(
    strata: &Strata,
    port: u16,
    params: &[(&str, &str)],
) -> (String, serde_json::Value) {
    signed_call_with_key(&strata.dir.join("data/admin-key.json"), port, params)
}

/// [`signed_call_status`] with the admin key pair in `key_file` (an
/// `admin-key.json` written by `strata serve`).
pub fn signed_call_with_key(
    key_file: &Path,
    port: u16,
    params: &[(&str, &str)],
) -> (String, serde_json::Value) {
    wait_for("the admin key", 30, || key_file.exists());
    let key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(key_file).unwrap()).unwrap();
    let mut all = vec![("Version", "2014-08-15"), ("Format", "JSON")];
    all.extend_from_slice(params);
    let nonce = format!("{:032x}", rand::random::<u128>());
    let query = acs_signature::sign_v2(
        "GET",
        &all,
        key["AccessKeyId"].as_str().unwrap(),
        key["AccessKeySecret"].as_str().unwrap(),
        chrono::Utc::now(),
        &nonce,
    );
    let (status, body) = http_get(port, &format!("/?{query}"));
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status}: {e}: {body}"));
    (status, v)
}

/// Runs `during` while pgbench (`clients` connections) and a loop of the DDL
/// `ddl(i)` (round i = 1, 2, …) write to `db`: it starts once two DDL rounds
/// ended and returns once another round ended after it, so at least one
/// overlapped it. Returns its result and the DDL rounds that ended meanwhile.
pub fn under_load_with_ddl<T: Send>(
    pg: &Cluster,
    db: &str,
    clients: u32,
    ddl: impl Fn(u32) -> String + Sync,
    during: impl FnOnce() -> T + Send,
) -> (T, u32) {
    let stop = AtomicBool::new(false);
    let ddl_rounds = AtomicU32::new(0);
    let clients = clients.to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                pg.pgbench(db, &["-n", "-c", &clients, "-T", "1"]);
            }
        });
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                pg.psql(db, &ddl(i));
                ddl_rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
        wait_for("DDL to start", 60, || {
            ddl_rounds.load(Ordering::Relaxed) >= 2
        });
        let before = ddl_rounds.load(Ordering::Relaxed);
        let result = during();
        wait_for("a DDL round after it", 60, || {
            ddl_rounds.load(Ordering::Relaxed) > before + 1
        });
        let rounds = ddl_rounds.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        (result, rounds)
    })
}
