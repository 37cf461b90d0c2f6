//! PostgreSQL servers Strata starts on its own host: restored copies people
//! asked for (clones, `strata restore --start`), scratch servers for its own
//! work (restore drills, table restores) and the `--demo` sandbox. This is
//! the one place that writes their configuration, starts them and stops them.
//!
//! A restored data directory comes from a registered server, whose superuser
//! chose every byte of its configuration. Strata must not let that choice run
//! anything on this host, so before a start:
//! - a **scratch** server gets a configuration written by Strata alone (the
//!   source's files are set aside; only a few integer capacity settings that
//!   recovery needs are carried over), a Unix socket in a private directory
//!   and no TCP listener;
//! - a **copy** keeps the source's settings except every one that runs a
//!   command, loads a library, names a file or directory, opens a listener or
//!   replicates somewhere (see [`is_neutralized`]); what was removed is
//!   reported to the caller.
//!
//! Reference: PostgreSQL's src/backend/utils/misc/guc-file.l (configuration
//! file syntax) and guc_tables.c (the settings and what they do).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Re-exported: the one list of settings a copy loses, shared with the agent's clones.
pub use pg_conf::is_neutralized;
pub(crate) use pg_conf::quote;
use pg_conf::{line_setting, line_value, ConfDir};

use crate::{EngineError, EngineResult};

/// Why Strata starts a server: decides how much of the source's
/// configuration it keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerUse {
    /// A copy someone asked for: the source's settings minus the dangerous ones.
    #[default]
    Copy,
    /// A server for Strata's own work: Strata's configuration only, reached
    /// over a private Unix socket.
    Scratch,
}

/// How a restored server is started.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The port it listens on (and names its socket after).
    pub port: u16,
    /// `listen_addresses` (default: `127.0.0.1` for a copy; a scratch server
    /// never listens on TCP).
    pub listen_addresses: Option<String>,
    /// `unix_socket_directories` (default: the data directory's parent).
    pub socket_dir: Option<PathBuf>,
    /// A copy someone asked for, or a scratch server of Strata's own.
    pub usage: ServerUse,
}

impl StartOptions {
    fn socket_dir_for(&self, data_dir: &Path) -> PathBuf {
        self.socket_dir
            .clone()
            .or_else(|| data_dir.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| data_dir.to_path_buf())
    }
}

/// The configuration files PostgreSQL reads from a data directory.
const CONFIG_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

/// Where a scratch server keeps the source's configuration files, unread.
pub const SET_ASIDE_DIR: &str = "strata-source-config";

/// Capacity settings a server must have at least as high as the source to
/// replay its WAL (xlogrecovery.c: CheckRequiredParameterValues), carried
/// over to scratch servers when they are plain integers.
const CAPACITY_SETTINGS: [&str; 6] = [
    "max_connections",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "max_worker_processes",
    "max_wal_senders",
    "max_pred_locks_per_transaction",
];

/// A configuration file's bytes; `None` when it does not exist. Any other
/// failure to read it stops the start: a file left unread would be left
/// unfiltered.
fn read_config(path: &Path) -> EngineResult<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(format!("reading {}", path.display()))(e)),
    }
}

/// Strata's own values for a server it starts: the listener and, for
/// recovery, the lines the restore computed.
fn strata_settings(opts: &StartOptions, data_dir: &Path, recovery: &str) -> String {
    let socket_dir = opts.socket_dir_for(data_dir);
    let listen = match opts.usage {
        ServerUse::Scratch => String::new(),
        ServerUse::Copy => opts
            .listen_addresses
            .clone()
            .unwrap_or_else(|| "127.0.0.1".into()),
    };
    let mut conf = format!(
        "\n# Written by strata for the server it starts\n\
         port = {}\n\
         listen_addresses = {}\n\
         unix_socket_directories = {}\n",
        opts.port,
        quote(&listen),
        quote(&socket_dir.display().to_string()),
    );
    // Only Strata and the server's OS user reach the socket; clients of a
    // copy connect over TCP, where its pg_hba.conf applies.
    conf.push_str("unix_socket_permissions = 0700\n");
    if opts.usage == ServerUse::Scratch {
        conf.push_str(
            "hot_standby = off\n\
             logging_collector = off\n\
             archive_mode = off\n",
        );
    }
    conf.push_str(recovery);
    conf
}

/// Refuses a start whose TCP port is already taken on one of the
/// addresses the server would listen on, so a restore can say so before it
/// writes anything (PostgreSQL itself would find out only once every file
/// is in place). Addresses that do not resolve or cannot be bound for
/// another reason are left to the server to report.
pub fn check_listen_port(opts: &StartOptions) -> EngineResult<()> {
    use std::net::{TcpListener, ToSocketAddrs};
    if opts.usage == ServerUse::Scratch {
        return Ok(());
    }
    let listen = opts.listen_addresses.as_deref().unwrap_or("127.0.0.1");
    for entry in listen.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let host = if entry == "*" { "0.0.0.0" } else { entry };
        let Ok(addrs) = (host, opts.port).to_socket_addrs() else {
            continue;
        };
        for addr in addrs {
            if let Err(e) = TcpListener::bind(addr) {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    return Err(EngineError::Refused(format!(
                        "port {} on {} is in use: choose another port",
                        opts.port,
                        addr.ip()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Writes the configuration a restored server starts on (see the module
/// documentation) and returns the names of the source's settings that were
/// removed. `recovery` holds the recovery settings to add.
pub fn configure(
    data_dir: &Path,
    opts: &StartOptions,
    recovery: &str,
) -> EngineResult<Vec<String>> {
    let io = |what: String| EngineError::io(what);
    let path = |name: &str| data_dir.join(name);
    match opts.usage {
        ServerUse::Scratch => {
            let aside = data_dir.join(SET_ASIDE_DIR);
            fs::create_dir_all(&aside).map_err(io(format!("creating {}", aside.display())))?;
            fs::set_permissions(&aside, fs::Permissions::from_mode(0o700))
                .map_err(io(format!("setting mode of {}", aside.display())))?;
            let mut capacity = String::new();
            for name in CONFIG_FILES {
                let from = path(name);
                let Some(text) = read_config(&from)? else {
                    continue;
                };
                if name.starts_with("postgresql") {
                    capacity.push_str(&capacity_lines(&String::from_utf8_lossy(&text)));
                }
                fs::rename(&from, aside.join(name))
                    .map_err(io(format!("setting aside {}", from.display())))?;
            }
            let conf = format!(
                "# A server strata runs for itself; the source's configuration is in {SET_ASIDE_DIR}/\n{capacity}{}",
                strata_settings(opts, data_dir, recovery)
            );
            write_private(&path("postgresql.conf"), &conf)?;
            write_private(&path("postgresql.auto.conf"), "")?;
            // The socket's directory is private to Strata and the server's
            // OS user, and nothing listens on TCP.
            write_private(&path("pg_hba.conf"), "local all all trust\n")?;
            write_private(&path("pg_ident.conf"), "")?;
            Ok(Vec::new())
        }
        ServerUse::Copy => {
            let dir = ConfDir::open(data_dir).map_err(conf_error)?;
            let mut removed = pg_conf::neutralize_copy(&dir).map_err(conf_error)?;
            let mut tail = strata_settings(opts, data_dir, recovery);
            if removed.iter().any(|n| n.starts_with("ssl")) {
                // Certificates named outside the data directory are gone.
                tail.push_str("ssl = off\n");
            }
            dir.append("postgresql.auto.conf", tail)
                .map_err(conf_error)?;
            removed.sort();
            removed.dedup();
            Ok(removed)
        }
    }
}

fn conf_error(e: pg_conf::ConfError) -> EngineError {
    EngineError::io(format!("{} {}", e.op, e.path.display()))(e.source)
}

/// The capacity settings of a source file, as lines, when plain integers.
fn capacity_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let Some(lower) = line_setting(line.as_bytes()) else {
            continue;
        };
        if !CAPACITY_SETTINGS.contains(&lower.as_str()) {
            continue;
        }
        if let Some(v) = line_value(line, &lower) {
            if !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit()) {
                out.push_str(&format!("{lower} = {v}\n"));
            }
        }
    }
    out
}

fn write_private(path: &Path, text: impl AsRef<[u8]>) -> EngineResult<()> {
    fs::write(path, text).map_err(EngineError::io(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(EngineError::io(format!(
        "setting mode of {}",
        path.display()
    )))
}

/// A command running `program` as `user` (through `runuser`) or as
/// ourselves.
pub fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A server binary run with a clean environment: nothing of Strata's own
/// (passwords, keys) reaches PostgreSQL or the commands it runs.
fn server_command(os_user: Option<&str>, program: &Path, isolate: bool) -> Command {
    let mut cmd = if isolate && can_isolate_network() {
        // A scratch server gets a network namespace of its own: whatever
        // runs inside it reaches no network, only its Unix socket is used.
        let mut c = Command::new("unshare");
        c.arg("--net").arg("--");
        if let Some(u) = os_user {
            c.arg("runuser").arg("-u").arg(u).arg("--");
        }
        c.arg(program);
        c
    } else {
        as_user(os_user, program)
    };
    cmd.env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    // The locale and time zone are all the server takes from Strata.
    for (k, v) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str == "LANG" || k_str == "TZ" || k_str.starts_with("LC_") {
            cmd.env(&k, v);
        }
    }
    cmd
}

/// Network namespaces need root (or a user namespace, which PostgreSQL's
/// ownership checks would not survive).
fn can_isolate_network() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/usr/bin/unshare").exists()
}

/// A local server: its binaries, data directory and OS user.
#[derive(Debug, Clone)]
pub struct LocalServer {
    /// The directory of `pg_ctl` and `postgres`.
    pub bin: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The OS user it runs as (`None`: Strata's own).
    pub os_user: Option<String>,
}

impl LocalServer {
    fn pg_ctl(&self, isolate: bool) -> Command {
        let mut cmd = server_command(self.os_user.as_deref(), &self.bin.join("pg_ctl"), isolate);
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    /// Starts the server with `pg_ctl`, logging to `log`, with `options`
    /// given to `postgres`; `wait` waits up to that long for it to accept
    /// connections (`None`: returns as soon as it is launched). A scratch
    /// server runs without network.
    pub fn start(
        &self,
        log: &Path,
        options: &str,
        wait: Option<Duration>,
        usage: ServerUse,
    ) -> EngineResult<()> {
        let mut cmd = self.pg_ctl(usage == ServerUse::Scratch);
        cmd.arg("-l").arg(log);
        if !options.is_empty() {
            cmd.arg("-o").arg(options);
        }
        match wait {
            Some(t) => cmd.args(["-w", "-t", &t.as_secs().max(1).to_string()]),
            None => cmd.arg("-W"),
        };
        let out = cmd
            .arg("start")
            .output()
            .map_err(EngineError::io("running pg_ctl start"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(EngineError::RestoredServer(format!(
            "the server in {} did not start: {}: {}",
            self.data_dir.display(),
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', "; "),
            log_tail(log)
        )))
    }

    /// Stops the server if it runs (`fast`, or `immediate` when its data is
    /// about to be removed).
    pub fn stop(&self, immediate: bool) -> EngineResult<()> {
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let mode = if immediate { "immediate" } else { "fast" };
        let out = self
            .pg_ctl(false)
            .args(["-m", mode, "-w", "stop"])
            .output()
            .map_err(EngineError::io("running pg_ctl stop"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(EngineError::Failed(format!(
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The postmaster a data directory's `postmaster.pid` (its bytes) names,
/// when that process is alive: its first line is the pid (miscinit.c).
pub(crate) fn live_postmaster(pidfile: &[u8]) -> Option<i32> {
    let text = String::from_utf8_lossy(pidfile);
    let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
    (pid > 0 && process_alive(pid)).then_some(pid)
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // The state follows the command name, which is in parentheses and may hold spaces.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

/// The server's last FATAL/PANIC line (or last line) of a log, for errors
/// that stay on one line.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        .or_else(|| text.lines().last())
        .unwrap_or_default()
        .to_string()
}

/// Whether a server accepts connections on its Unix socket (`socket_dir`)
/// or, without one, on loopback TCP.
pub fn accepts_connections(socket_dir: Option<&Path>, port: u16) -> bool {
    match socket_dir {
        Some(dir) => {
            std::os::unix::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).is_ok()
        }
        None => std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(500),
        )
        .is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_conf::{neutralize_hba, neutralize_text};

    #[test]
    fn dangerous_settings_are_neutralized_as_a_class() {
        for name in [
            "archive_command",
            "restore_command",
            "recovery_end_command",
            "archive_cleanup_command",
            "ssl_passphrase_command",
            "shared_preload_libraries",
            "session_preload_libraries",
            "local_preload_libraries",
            "dynamic_library_path",
            "jit_provider",
            "archive_library",
            "include",
            "include_if_exists",
            "include_dir",
            "hba_file",
            "ident_file",
            "config_file",
            "external_pid_file",
            "ssl_cert_file",
            "ssl_crl_dir",
            "krb_server_keyfile",
            "data_directory",
            "listen_addresses",
            "port",
            "unix_socket_directories",
            "unix_socket_group",
            "unix_socket_permissions",
            "log_directory",
            "log_filename",
            "stats_temp_directory",
            "promote_trigger_file",
            "primary_conninfo",
            "primary_slot_name",
            "recovery_target_time",
            "Archive_Command",
            "SHARED_PRELOAD_LIBRARIES",
            "plperl.on_init",
            "pltcl.start_proc",
            "myext.setting",
        ] {
            assert!(is_neutralized(name), "{name}");
        }
        for name in [
            "shared_buffers",
            "work_mem",
            "max_connections",
            "wal_level",
            "timezone",
            "lc_messages",
            "log_min_messages",
        ] {
            assert!(!is_neutralized(name), "{name}");
        }
    }

    #[test]
    fn configuration_lines_are_read_as_postgres_reads_them() {
        let text = "# comment\n\
                    shared_buffers = 128MB\n\
                    \tarchive_command='touch /tmp/x' # run me\n\
                    recovery_end_command 'id > /tmp/y'\n\
                    include_dir 'conf.d'\n\
                    Shared_Preload_Libraries='./evil.so'\n\
                    max_connections = 150\n\
                    plperl.on_init = 'system(\"id\")'\n\
                    ssl_passphrase_command='/bin/sh -c x'";
        let (out, removed) = neutralize_text(text.as_bytes());
        assert_eq!(
            removed,
            [
                "archive_command",
                "recovery_end_command",
                "include_dir",
                "shared_preload_libraries",
                "plperl.on_init",
                "ssl_passphrase_command"
            ]
        );
        let out = String::from_utf8(out).unwrap();
        let live: Vec<&str> = out
            .lines()
            .filter(|l| line_setting(l.as_bytes()).is_some() && !l.starts_with('#'))
            .collect();
        assert_eq!(live, ["shared_buffers = 128MB", "max_connections = 150"]);
        assert_eq!(capacity_lines(text), "max_connections = 150\n");
        assert_eq!(
            capacity_lines("max_connections = '100; archive_command=x'\nmax_wal_senders=10"),
            "max_wal_senders = 10\n"
        );
    }

    #[test]
    fn files_that_are_not_utf8_are_filtered_too() {
        let text = b"# \xff\xfe Latin-1 comment \xe9\n\
                     recovery_end_command = 'touch /tmp/x'\n\
                     work_mem = '4MB' # \xe9\n";
        let (out, removed) = neutralize_text(text);
        assert_eq!(removed, ["recovery_end_command"]);
        assert!(out.starts_with(b"# \xff\xfe"));
        assert!(out
            .windows(b"# neutralized by strata: recovery_end_command".len())
            .any(|w| w == b"# neutralized by strata: recovery_end_command"));
        assert!(out.ends_with(b"work_mem = '4MB' # \xe9\n"));
    }

    #[test]
    fn configuration_strings_cannot_end_early() {
        assert_eq!(quote("a'b"), "'a''b'");
        assert_eq!(quote("a\\'b"), "'a\\\\''b'");
        assert_eq!(quote("x\nport = 1"), "'x\\012port = 1'");
    }

    #[test]
    fn hba_lines_that_read_files_are_dropped() {
        let (out, dropped) = neutralize_hba(
            b"local all all peer\ninclude_dir 'x'\nhost all @admins 0.0.0.0/0 md5\nincl\\\nude_file /etc/x\n",
        );
        assert!(dropped);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            ["local all all peer"]
        );
    }

    #[test]
    fn scratch_servers_start_on_strata_configuration_only() {
        let dir = std::env::temp_dir().join(format!("strata-ls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("postgresql.conf"),
            "max_connections = 300\nshared_preload_libraries = 'x'\n",
        )
        .unwrap();
        fs::write(
            dir.join("postgresql.auto.conf"),
            "recovery_end_command = 'id > /tmp/x'\n",
        )
        .unwrap();
        fs::write(dir.join("pg_hba.conf"), "host all all 0.0.0.0/0 trust\n").unwrap();
        let opts = StartOptions {
            port: 5999,
            socket_dir: Some(dir.clone()),
            usage: ServerUse::Scratch,
            ..Default::default()
        };
        configure(&dir, &opts, "restore_command = 'false'\n").unwrap();
        let conf = fs::read_to_string(dir.join("postgresql.conf")).unwrap();
        assert!(conf.contains("max_connections = 300\n"));
        assert!(conf.contains("listen_addresses = ''\n"));
        assert!(conf.contains("unix_socket_permissions = 0700\n"));
        assert!(!conf.contains("shared_preload"));
        assert_eq!(
            fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap(),
            ""
        );
        assert_eq!(
            fs::read_to_string(dir.join("pg_hba.conf")).unwrap(),
            "local all all trust\n"
        );
        assert!(
            fs::read_to_string(dir.join(SET_ASIDE_DIR).join("postgresql.auto.conf"))
                .unwrap()
                .contains("recovery_end_command")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
