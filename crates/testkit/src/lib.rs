//! Test harness that starts real PostgreSQL clusters (and a real S3-protocol server, see
//! [`S3Server`]) for Strata's integration tests.
//!
//! Every cluster lives in its own directory under `/tmp`, listens on `127.0.0.1` on a free port
//! and keeps its unix socket in that directory. `initdb` and `postgres` refuse to run as root
//! (src/backend/main/main.c, `check_root`), and CI runs as root, so the server side runs as the
//! unprivileged `postgres` OS user through `runuser`. Server binaries are found by
//! [`pg_bin_dir`]; client tools (`psql`, `pgbench`, `pg_basebackup`) fall back to the Debian
//! PostgreSQL 15 ones, which talk to any newer server.
//!
//! Failures panic with the server log attached so that CI output explains itself. This crate is a
//! dev-dependency only and knows nothing about Strata's own types.
#![warn(missing_docs)]

mod azurite;
mod emulator;
mod fake_gcs;
pub mod fuzz;
mod loopfs;
mod moto;
mod s3;

pub use azurite::{azurite_blob_binary, Azurite};
pub use fake_gcs::{fake_gcs_server_binary, FakeGcs};
pub use loopfs::{FsKind, LoopFs, LoopFsUnavailable};
pub use moto::{moto_dir, Moto};
pub use s3::{s3s_fs_binary, S3Server};

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The Debian PostgreSQL whose client tools are used when a server bin dir lacks them.
const CLIENT_TOOLS_DIR: &str = "/usr/lib/postgresql/15/bin";
/// OS user the server processes run as when the tests run as root.
const PG_OS_USER: &str = "postgres";

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Directory holding the server binaries of PostgreSQL `major`, if installed.
///
/// Order: env `STRATA_PG{major}_BIN`, `/usr/lib/postgresql/{major}/bin` (if it has `postgres`),
/// `<workspace>/.cache/pg/{major}/bin` (filled by `scripts/install-test-deps.sh`).
pub fn pg_bin_dir(major: u32) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(format!("STRATA_PG{major}_BIN")) {
        let dir = PathBuf::from(dir);
        if dir.join("postgres").exists() {
            return Some(dir);
        }
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("postgres").exists() {
        return Some(debian);
    }
    let cached = workspace_root().join(format!(".cache/pg/{major}/bin"));
    if cached.join("postgres").exists() {
        return Some(cached);
    }
    None
}

/// Like [`pg_bin_dir`] but panics with installation instructions: a missing version is a broken
/// test environment, not a reason to skip.
fn require_bin_dir(major: u32) -> PathBuf {
    pg_bin_dir(major).unwrap_or_else(|| {
        panic!(
            "PostgreSQL {major} server binaries not found (checked $STRATA_PG{major}_BIN, \
             /usr/lib/postgresql/{major}/bin, {}/.cache/pg/{major}/bin); \
             run scripts/install-test-deps.sh",
            workspace_root().display()
        )
    })
}

/// A client tool: from `bin_dir` if present there, else from the Debian PostgreSQL 15.
fn client_tool(bin_dir: &Path, name: &str) -> PathBuf {
    let own = bin_dir.join(name);
    if own.exists() {
        own
    } else {
        Path::new(CLIENT_TOOLS_DIR).join(name)
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Rewrites `cmd` to run as the `postgres` OS user (`runuser -u postgres -- …`) when we are root;
/// leaves it alone otherwise. Environment and working directory carry over.
pub fn run_as_postgres(cmd: &mut Command) {
    if !is_root() {
        return;
    }
    let mut wrapped = Command::new("runuser");
    wrapped.args(["-u", PG_OS_USER, "--"]);
    wrapped.arg(cmd.get_program());
    wrapped.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(key, v),
            None => wrapped.env_remove(key),
        };
    }
    // The postgres user may not be able to enter the caller's cwd (e.g. /root/...).
    wrapped.current_dir(cmd.get_current_dir().unwrap_or(Path::new("/tmp")));
    *cmd = wrapped;
}

/// Gives `path` to the `postgres` OS user when we are root.
fn chown_to_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{PG_OS_USER}:{PG_OS_USER}"))
        .arg(path)
        .status()
        .unwrap_or_else(|e| panic!("cannot run chown: {e}"));
    assert!(status.success(), "chown {} failed", path.display());
}

/// Where test ports are handed out: below the kernel's ephemeral range
/// (outgoing connections, many per test, take ports from that range at any
/// moment, and one could take a port between its choice and a server's
/// bind) and above the ports Strata gives its own instances by default
/// (15432–15531). `None` when the ephemeral range leaves no room.
fn test_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = text.split_whitespace().next()?.parse().ok()?;
    let (lo, hi) = (20_000, low.min(32_000));
    (hi > lo + 1_000).then_some((lo, hi))
}

/// A port on 127.0.0.1 that was free a moment ago, and that no other test
/// process on this machine is handed while this one runs: each port is
/// taken under a lock on a file of its own (held until the process ends),
/// from [`test_port_range`] (the kernel's choice when there is none).
pub fn free_port() -> u16 {
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let kernels_choice = || {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.local_addr().expect("local_addr").port()
    };
    let Some((lo, hi)) = test_port_range() else {
        return kernels_choice();
    };
    // Shared by every user's test processes (sticky, like /tmp).
    let dir = Path::new("/tmp/strata-test-ports");
    if std::fs::create_dir(dir).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
    }
    if !dir.is_dir() {
        return kernels_choice();
    }
    let span = u32::from(hi - lo);
    // Each process walks the range from its own place.
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = lo + ((start + n) % span) as u16;
        use std::os::unix::fs::OpenOptionsExt;
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o666)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap().push(file);
        return port;
    }
    panic!("no free port in {lo}..{hi}");
}

/// Whether something listens on `127.0.0.1:port`. A connection the kernel
/// made to itself (a connect from the very port it targets, which polling an
/// unused port in the ephemeral range sometimes does) does not count.
pub fn listening(port: u16) -> bool {
    match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => match (s.local_addr(), s.peer_addr()) {
            (Ok(local), Ok(peer)) => local != peer,
            _ => false,
        },
        Err(_) => false,
    }
}

/// A fresh directory `/tmp/{prefix}XXXXXX`, owned by `postgres` when we are root.
pub fn temp_dir(prefix: &str) -> PathBuf {
    temp_dir_in(Path::new("/tmp"), prefix)
}

/// A fresh directory `{parent}/{prefix}XXXXXX`, owned by `postgres` when we are root.
pub fn temp_dir_in(parent: &Path, prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .expect("create temp dir")
        .keep();
    chown_to_postgres(&dir);
    dir
}

fn keep_test_dirs() -> bool {
    std::env::var_os("STRATA_KEEP_TEST_DIRS").is_some()
}

fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

fn describe_failure(what: &str, out: &Output) -> String {
    format!(
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Builds and starts a [`Cluster`]; see [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    major: u32,
    auth_method: String,
    ssl: bool,
    wal_level: String,
    conf: Vec<String>,
    hba: Vec<String>,
    parent: Option<PathBuf>,
}

impl ClusterBuilder {
    /// Puts the cluster's directory (data directory, socket, log) under `parent` instead of
    /// `/tmp`, e.g. on a [`LoopFs`]; `parent` must be reachable by the `postgres` OS user.
    pub fn in_dir(mut self, parent: &Path) -> Self {
        self.parent = Some(parent.to_path_buf());
        self
    }

    /// Authentication method of the `host` lines in pg_hba.conf (`trust`, `scram-sha-256`, `md5`,
    /// `password`). Unix-socket connections (used by the harness itself) are always `trust`.
    /// With `md5`, `password_encryption` is set to `md5` so stored passwords really are MD5.
    pub fn auth_method(mut self, method: &str) -> Self {
        self.auth_method = method.to_string();
        self
    }

    /// Turns on TLS with a freshly generated CA and a server certificate for
    /// `localhost`/`127.0.0.1`; see [`Cluster::ca_cert`].
    pub fn ssl(mut self, on: bool) -> Self {
        self.ssl = on;
        self
    }

    /// Sets `wal_level`; `minimal` also sets `max_wal_senders = 0` as the server requires.
    pub fn wal_level(mut self, level: &str) -> Self {
        self.wal_level = level.to_string();
        self
    }

    /// An extra `postgresql.conf` line, e.g. `"archive_mode = on"`. Later lines win.
    pub fn conf(mut self, line: &str) -> Self {
        self.conf.push(line.to_string());
        self
    }

    /// An extra pg_hba.conf line, placed before the generated `host` lines.
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.to_string());
        self
    }

    /// Runs initdb, writes the configuration and starts the server.
    pub fn start(self) -> Cluster {
        let bin_dir = require_bin_dir(self.major);
        let root = match &self.parent {
            Some(parent) => temp_dir_in(parent, "strata-pg-"),
            None => temp_dir("strata-pg-"),
        };
        let data_dir = root.join("data");
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run_as_postgres(&mut initdb);
        let out = run_output(&mut initdb);
        if !out.status.success() {
            panic!("{}", describe_failure("initdb", &out));
        }

        let ca_cert = if self.ssl {
            Some(generate_certificates(&root, &data_dir))
        } else {
            None
        };
        let mut conf = String::new();
        let _ = writeln!(conf, "\n# written by testkit");
        let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(conf, "unix_socket_directories = '{}'", root.display());
        let _ = writeln!(conf, "wal_level = {}", self.wal_level);
        if self.wal_level == "minimal" {
            let _ = writeln!(conf, "max_wal_senders = 0");
        } else {
            let _ = writeln!(conf, "max_wal_senders = 10");
        }
        let _ = writeln!(conf, "max_replication_slots = 10");
        let _ = writeln!(conf, "fsync = off");
        let _ = writeln!(conf, "synchronous_commit = off");
        let _ = writeln!(conf, "full_page_writes = on");
        let _ = writeln!(conf, "shared_buffers = 16MB");
        let _ = writeln!(conf, "max_connections = 40");
        let _ = writeln!(conf, "logging_collector = off");
        let _ = writeln!(conf, "log_line_prefix = '%m [%p] %q%u@%d '");
        let _ = writeln!(conf, "log_connections = on");
        if self.auth_method == "md5" {
            let _ = writeln!(conf, "password_encryption = md5");
        }
        if self.ssl {
            // Relative to the data directory, so a base backup of this cluster carries them.
            let _ = writeln!(conf, "ssl = on");
            let _ = writeln!(conf, "ssl_cert_file = 'server.crt'");
            let _ = writeln!(conf, "ssl_key_file = 'server.key'");
        }
        for line in &self.conf {
            let _ = writeln!(conf, "{line}");
        }
        append_file(&data_dir.join("postgresql.conf"), &conf);

        let mut hba = String::from("# written by testkit\n");
        hba.push_str("local all all trust\nlocal replication all trust\n");
        for line in &self.hba {
            let _ = writeln!(hba, "{line}");
        }
        for addr in ["127.0.0.1/32", "::1/128"] {
            let _ = writeln!(hba, "host all all {addr} {}", self.auth_method);
            let _ = writeln!(hba, "host replication all {addr} {}", self.auth_method);
        }
        std::fs::write(data_dir.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        chown_to_postgres(&data_dir);

        let mut cluster = Cluster {
            major: self.major,
            bin_dir,
            root: Some(root.clone()),
            data_dir,
            socket_dir: Some(root.clone()),
            log_file: root.join("server.log"),
            host: "127.0.0.1".to_string(),
            port: 0,
            ca_cert,
            running: false,
        };
        cluster.start_on_free_port();
        cluster
    }
}

fn append_file(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Creates a CA and a server certificate with the `openssl` CLI. The server key and certificate go
/// into the data directory; the CA certificate stays in `root`. Returns the CA certificate path.
fn generate_certificates(root: &Path, data_dir: &Path) -> PathBuf {
    let ca_key = root.join("ca.key");
    let ca_crt = root.join("ca.crt");
    let csr = root.join("server.csr");
    let ext = root.join("server.ext");
    let key = data_dir.join("server.key");
    let crt = data_dir.join("server.crt");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write server.ext");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let steps: Vec<(&str, Vec<OsString>)> = vec![
        (
            "openssl req (CA)",
            [
                &["req", "-x509", "-nodes", "-days", "3650"][..],
                &ec[..],
                &["-subj", "/CN=Strata Test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat()
            .into_iter()
            .map(OsString::from)
            .chain(["-keyout".into(), ca_key.clone().into()])
            .chain(["-out".into(), ca_crt.clone().into()])
            .collect(),
        ),
        (
            "openssl req (server)",
            [&["req", "-nodes"][..], &ec[..], &["-subj", "/CN=localhost"]]
                .concat()
                .into_iter()
                .map(OsString::from)
                .chain(["-keyout".into(), key.clone().into()])
                .chain(["-out".into(), csr.clone().into()])
                .collect(),
        ),
        (
            "openssl x509 (sign)",
            ["x509", "-req", "-days", "3650", "-CAcreateserial"]
                .into_iter()
                .map(OsString::from)
                .chain(["-in".into(), csr.clone().into()])
                .chain(["-CA".into(), ca_crt.clone().into()])
                .chain(["-CAkey".into(), ca_key.clone().into()])
                .chain(["-extfile".into(), ext.clone().into()])
                .chain(["-out".into(), crt.clone().into()])
                .collect(),
        ),
    ];
    for (what, args) in steps {
        let out = run_output(Command::new("openssl").args(args));
        if !out.status.success() {
            panic!("{}", describe_failure(what, &out));
        }
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    chown_to_postgres(root);
    ca_crt
}

/// A running (or stopped) PostgreSQL cluster owned by the test. Dropping it stops the server
/// (`-m immediate`) and removes its directory unless `STRATA_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct Cluster {
    major: u32,
    bin_dir: PathBuf,
    /// Directory the harness created and removes on drop (`None` for adopted clusters).
    root: Option<PathBuf>,
    data_dir: PathBuf,
    socket_dir: Option<PathBuf>,
    log_file: PathBuf,
    host: String,
    port: u16,
    ca_cert: Option<PathBuf>,
    running: bool,
}

impl Cluster {
    /// A builder with the defaults of [`Cluster::start_default`].
    pub fn builder(major: u32) -> ClusterBuilder {
        ClusterBuilder {
            major,
            auth_method: "trust".to_string(),
            ssl: false,
            wal_level: "replica".to_string(),
            conf: Vec::new(),
            hba: Vec::new(),
            parent: None,
        }
    }

    /// Trust auth, `wal_level = replica`, 10 WAL senders and slots, `fsync = off`, small buffers.
    pub fn start_default(major: u32) -> Cluster {
        Cluster::builder(major).start()
    }

    /// Takes over a cluster someone else started (e.g. a restored one) so that tests can query
    /// and stop it. It is reached over TCP on 127.0.0.1 and stopped on drop; its directory is left.
    pub fn adopt(major: u32, data_dir: PathBuf, port: u16) -> Cluster {
        let bin_dir = require_bin_dir(major);
        let log_dir = temp_dir("strata-adopted-");
        Cluster {
            major,
            bin_dir,
            root: None,
            data_dir,
            socket_dir: None,
            log_file: log_dir.join("server.log"),
            host: "127.0.0.1".to_string(),
            port,
            ca_cert: None,
            running: true,
        }
    }

    /// Host the cluster listens on (127.0.0.1).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of its server binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Its PostgreSQL major version.
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The CA certificate that signed the server certificate, when built with `.ssl(true)`.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// Server log contents (empty if there is none yet).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Host argument for client tools: the socket directory when we know it (trust), else TCP.
    fn conn_host(&self) -> String {
        match &self.socket_dir {
            Some(dir) => dir.display().to_string(),
            None => self.host.clone(),
        }
    }

    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n--- server log ({}) ---\n{}",
            self.log_file.display(),
            self.log()
        )
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    /// Starts with the current port; returns the failure text instead of panicking.
    fn try_start(&mut self) -> Result<(), String> {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "60", "-l"])
            .arg(&self.log_file)
            .arg("-o")
            .arg(format!("-p {}", self.port))
            .arg("start");
        run_as_postgres(&mut cmd);
        let out = run_output(&mut cmd);
        if out.status.success() {
            self.running = true;
            Ok(())
        } else {
            Err(describe_failure("pg_ctl start", &out))
        }
    }

    /// First start: picks a free port, retrying if another process grabbed it meanwhile.
    fn start_on_free_port(&mut self) {
        let mut last_err = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.try_start() {
                Ok(()) => {
                    // Make the port permanent so a plain `pg_ctl start` (or a standby copy) keeps it.
                    append_file(
                        &self.data_dir.join("postgresql.conf"),
                        &format!("port = {}\n", self.port),
                    );
                    return;
                }
                Err(e) => {
                    last_err = e;
                    if !self.log().contains("could not bind") {
                        break;
                    }
                }
            }
        }
        self.fail(&last_err)
    }

    /// Starts a stopped cluster on its port (`pg_ctl -w -t 60 start`).
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            self.fail(&e)
        }
    }

    /// Fast shutdown (`pg_ctl -w -t 60 stop -m fast`).
    pub fn stop(&mut self) {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "60", "-m", "fast", "stop"]);
        run_as_postgres(&mut cmd);
        let out = run_output(&mut cmd);
        if !out.status.success() {
            self.fail(&describe_failure("pg_ctl stop", &out));
        }
        self.running = false;
    }

    /// Stops the cluster (fast) and starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// SIGKILLs the postmaster and its children, as a crash would, and waits until they are gone.
    pub fn kill9(&mut self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| self.fail(&format!("read {}: {e}", pid_file.display())));
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| self.fail("postmaster.pid has no pid"));
        let mut victims = child_pids(pid);
        victims.push(pid);
        for &p in &victims {
            // SAFETY: sending a signal to a pid has no memory-safety preconditions.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while victims.iter().any(|&p| process_alive(p)) {
            if Instant::now() > deadline {
                self.fail("processes survived SIGKILL for 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A zombie postmaster (nobody reaps it here) would make the next start believe it runs.
        // The socket lock files are checked the same way.
        let _ = std::fs::remove_file(&pid_file);
        if let Some(dir) = &self.socket_dir {
            let _ = std::fs::remove_file(dir.join(format!(".s.PGSQL.{}.lock", self.port)));
            let _ = std::fs::remove_file(dir.join(format!(".s.PGSQL.{}", self.port)));
        }
        self.running = false;
    }

    /// `psql -At -X -v ON_ERROR_STOP=1` as superuser `postgres`; the SQL is read from stdin so that
    /// statements such as `CREATE DATABASE` may follow others. Returns trimmed stdout.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(client_tool(&self.bin_dir, "psql"));
        cmd.args(["-At", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .arg("-h")
            .arg(self.conn_host())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run psql: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| format!("write to psql: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Like [`Cluster::try_psql`] but panics (with the server log) on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| self.fail(&format!("{e}\n--- sql ---\n{sql}")))
    }

    /// A tokio-postgres client as superuser `postgres`; the connection task is spawned.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        match &self.socket_dir {
            Some(dir) => config.host_path(dir),
            None => config.host(&self.host),
        };
        config
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .application_name("testkit");
        let (client, connection) = match config.connect(tokio_postgres::NoTls).await {
            Ok(pair) => pair,
            Err(e) => self.fail(&format!("tokio-postgres connect to {db}: {e}")),
        };
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Runs `pgbench` against `db` with `args` (e.g. `["-i", "-s", "1"]`); returns its stdout.
    pub fn pgbench(&self, db: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(client_tool(&self.bin_dir, "pgbench"));
        cmd.arg("-h")
            .arg(self.conn_host())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres"])
            .args(args)
            .arg(db);
        run_as_postgres(&mut cmd);
        let out = run_output(&mut cmd);
        if !out.status.success() {
            self.fail(&describe_failure("pgbench", &out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Clones this primary with `pg_basebackup -R` into a new directory and starts the standby.
    pub fn create_standby(&self) -> Cluster {
        let root = temp_dir("strata-pg-standby-");
        let data_dir = root.join("data");
        let mut cmd = Command::new(client_tool(&self.bin_dir, "pg_basebackup"));
        cmd.arg("-h")
            .arg(self.conn_host())
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ])
            .arg("-D")
            .arg(&data_dir);
        run_as_postgres(&mut cmd);
        let out = run_output(&mut cmd);
        if !out.status.success() {
            self.fail(&describe_failure("pg_basebackup", &out));
        }
        append_file(
            &data_dir.join("postgresql.conf"),
            &format!(
                "\n# standby (testkit)\nunix_socket_directories = '{}'\nhot_standby = on\n",
                root.display()
            ),
        );
        let ca_cert = self.ca_cert.as_ref().map(|ca| {
            let copy = root.join("ca.crt");
            std::fs::copy(ca, &copy).expect("copy CA certificate");
            copy
        });
        chown_to_postgres(&root);
        let mut standby = Cluster {
            major: self.major,
            bin_dir: self.bin_dir.clone(),
            root: Some(root.clone()),
            data_dir,
            socket_dir: Some(root.clone()),
            log_file: root.join("server.log"),
            host: self.host.clone(),
            port: 0,
            ca_cert,
            running: false,
        };
        standby.start_on_free_port();
        standby
    }

    /// `pg_ctl promote -w`, then waits until `pg_is_in_recovery()` is false.
    pub fn promote(&self) {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "60", "promote"]);
        run_as_postgres(&mut cmd);
        let out = run_output(&mut cmd);
        if !out.status.success() {
            self.fail(&describe_failure("pg_ctl promote", &out));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.psql("postgres", "SELECT pg_is_in_recovery()") != "f" {
            if Instant::now() > deadline {
                self.fail("still in recovery 60 s after promote");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Immediate shutdown and directory removal, never panicking (for Drop and process exit).
    fn cleanup(&self) {
        if self.running {
            let mut cmd = self.pg_ctl();
            cmd.args(["-w", "-t", "60", "-m", "immediate", "stop"]);
            run_as_postgres(&mut cmd);
            let _ = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if keep_test_dirs() {
            return;
        }
        match &self.root {
            Some(root) => {
                let _ = std::fs::remove_dir_all(root);
            }
            None => {
                if let Some(dir) = self.log_file.parent() {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Direct children of `pid` (from `/proc/*/stat`).
fn child_pids(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| proc_stat(p).map(|(_, ppid)| ppid) == Some(pid))
        .collect()
}

/// `(state, ppid)` of a process; the command name in parentheses may contain spaces.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn process_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Shared clusters, one per major, leaked for the life of the test process.
static SHARED: OnceLock<Mutex<HashMap<u32, &'static Cluster>>> = OnceLock::new();

/// One cluster per major version per test process, created on first use and stopped at process
/// exit (statics are never dropped, so an `atexit` hook does it). Tests in one binary share it,
/// so they must not assume exclusive use (create own roles, slots and databases with unique names).
pub fn shared_cluster(major: u32) -> &'static Cluster {
    let map = SHARED.get_or_init(|| {
        // SAFETY: registers a plain extern "C" function that captures nothing.
        unsafe { libc::atexit(stop_shared_clusters) };
        Mutex::new(HashMap::new())
    });
    let mut guard = map.lock().unwrap_or_else(|p| p.into_inner());
    guard
        .entry(major)
        .or_insert_with(|| Box::leak(Box::new(Cluster::start_default(major))))
}

/// The PostgreSQL 15 server this test process keeps Strata catalogs in, started on first use and
/// stopped at process exit. Separate from [`shared_cluster`] (more connections: every catalog
/// handle keeps a pool); tests get a database each from [`catalog_database`].
pub fn catalog_server() -> &'static Cluster {
    static SERVER: OnceLock<&'static Cluster> = OnceLock::new();
    SERVER.get_or_init(|| {
        // SAFETY: registers a plain extern "C" function that captures nothing.
        unsafe { libc::atexit(stop_catalog_server) };
        let cluster = Cluster::builder(15)
            .wal_level("minimal")
            .conf("max_connections = 300")
            .start();
        let cluster: &'static Cluster = Box::leak(Box::new(cluster));
        let _ = CATALOG_SERVER.set(cluster);
        cluster
    })
}

static CATALOG_SERVER: OnceLock<&'static Cluster> = OnceLock::new();

/// Stops [`catalog_server`] (fast shutdown), as a catalog outage: every
/// Strata process of this test process using it loses its catalog until
/// [`catalog_server_start`]. Only for a test binary whose tests all expect it.
pub fn catalog_server_stop() {
    let server = catalog_server();
    let mut cmd = server.pg_ctl();
    cmd.args(["-w", "-t", "60", "-m", "fast", "stop"]);
    run_as_postgres(&mut cmd);
    let out = run_output(&mut cmd);
    if !out.status.success() {
        server.fail(&describe_failure("pg_ctl stop", &out));
    }
}

/// Starts [`catalog_server`] again on its port after [`catalog_server_stop`].
pub fn catalog_server_start() {
    let server = catalog_server();
    let mut cmd = server.pg_ctl();
    cmd.args(["-w", "-t", "60", "-l"])
        .arg(&server.log_file)
        .arg("start");
    run_as_postgres(&mut cmd);
    let out = run_output(&mut cmd);
    if !out.status.success() {
        server.fail(&describe_failure("pg_ctl start", &out));
    }
}

extern "C" fn stop_catalog_server() {
    if let Some(cluster) = CATALOG_SERVER.get() {
        cluster.cleanup();
    }
}

/// A new, empty database on [`catalog_server`] and its URL
/// (`postgres://postgres@127.0.0.1:PORT/NAME?sslmode=disable`, trust authentication), so tests
/// that each need their own catalog run in parallel.
pub fn catalog_database(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let server = catalog_server();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let name = format!("{clean}_{}_{n}", std::process::id());
    server.psql("postgres", &format!("CREATE DATABASE {name}"));
    format!(
        "postgres://postgres@{}:{}/{name}?sslmode=disable",
        server.host(),
        server.port()
    )
}

extern "C" fn stop_shared_clusters() {
    if let Some(map) = SHARED.get() {
        let guard = map.lock().unwrap_or_else(|p| p.into_inner());
        for cluster in guard.values() {
            cluster.cleanup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port();
        assert!(port > 0);
        TcpListener::bind(("127.0.0.1", port)).expect("port should be free");
    }

    #[test]
    fn free_ports_differ_and_stay_out_of_the_ephemeral_range() {
        let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        if let Some((lo, hi)) = test_port_range() {
            assert!(ports.iter().all(|p| (lo..hi).contains(p)), "{ports:?}");
        }
    }

    #[test]
    fn listening_sees_a_listener_and_not_a_free_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening(port));
        drop(listener);
        assert!(!listening(port));
    }

    #[test]
    fn proc_stat_reads_own_process() {
        let (state, ppid) = proc_stat(std::process::id() as i32).expect("own stat");
        assert!(state == 'R' || state == 'S');
        assert!(ppid > 0);
    }
}
