//! PostgreSQL servers started in clones on the database host: configuration, start, stop and
//! status.
//!
//! A clone is a copy of the source's data directory, so its configuration files are the
//! source superuser's. Before a start they go through `pg_conf::neutralize_copy`, exactly as
//! the Strata server's restored copies do: every setting that runs a command, loads code, names
//! a file or opens a listener is commented out, `include`/`@file` lines are dropped. The agent
//! then appends its own settings to `postgresql.auto.conf` (port, `listen_addresses`, a Unix
//! socket in the clone directory, `restore_command = 'false'`, `archive_mode = off`, and the
//! recovery target), writes `recovery.signal` or `standby.signal`, removes copies of
//! `postmaster.pid`/`postmaster.opts`, and runs `pg_ctl` of the clone's major version as the
//! data directory's owner (through `runuser` when the agent is root), with a clean
//! environment. Every file is reached beneath a handle of the clone directory opened without
//! following symlinks.
//!
//! Reference: src/bin/pg_ctl/pg_ctl.c (start/stop, `-w`), src/include/utils/pidfile.h (the
//! lines of `postmaster.pid`), src/backend/access/transam/xlogrecovery.c (recovery targets,
//! signal files), src/backend/tcop/backend_startup.c (57P03 while starting up).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pg_conf::{quote, ConfDir};
use serde::{Deserialize, Serialize};

use crate::names::CloneName;
use crate::snapshot::{io_err, open_dir_beneath, SnapshotError, SnapshotStore};

/// The lowest port a clone may listen on (below are the system's ports).
pub const MIN_PORT: u16 = 1024;
/// How long a start or stop may take before it is reported as failed.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest restore point name (PostgreSQL's MAXFNAMELEN less the terminating NUL).
const MAX_RESTORE_POINT_NAME: usize = 63;
/// The server's log, in the clone directory.
pub const LOG_FILE: &str = "strata-server.log";

/// Where recovery stops, as the caller asks for it: strings the agent checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum TargetRequest {
    /// Replay all WAL there is.
    Latest,
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// The last commit at or before a time (RFC 3339, or `YYYY-MM-DDTHH:MMZ`).
    Time(String),
    /// An LSN (`16/B374D848`): after the first record at or past it.
    Lsn(String),
    /// Just before the record at or past an LSN.
    LsnBefore(String),
    /// Just after a transaction's commit (decimal xid).
    Xid(String),
    /// Just before a transaction's commit (decimal xid).
    XidBefore(String),
    /// A restore point's name.
    Name(String),
}

/// Body of `POST /v1/clones/{name}/start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// The port it listens on (1024–65535).
    pub port: u16,
    /// `listen_addresses` (default `127.0.0.1`).
    #[serde(default)]
    pub listen_addresses: Option<String>,
    /// Recover to this target (`recovery.signal`, `recovery_target_action = promote`); none:
    /// start as the copy is (crash recovery from its `backup_label`, if any).
    #[serde(default)]
    pub target: Option<TargetRequest>,
    /// Stay in recovery as a read-only hot standby (`standby.signal`) instead of promoting.
    #[serde(default)]
    pub stay_in_recovery: bool,
}

/// A clone's server just started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStarted {
    /// The clone.
    pub name: CloneName,
    /// The port it accepts connections on.
    pub port: u16,
    /// The directory of its Unix socket.
    pub socket_dir: PathBuf,
    /// From the request to accepting connections, milliseconds.
    pub elapsed_ms: u64,
    /// The source's settings that were commented out.
    pub neutralized: Vec<String>,
}

/// Whether a clone's server runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStatus {
    /// The clone.
    pub name: CloneName,
    /// Whether its postmaster is alive.
    pub running: bool,
    /// Its postmaster's process id, when running.
    pub pid: Option<u32>,
    /// The port it listens on, when running.
    pub port: Option<u16>,
}

/// A checked recovery target, as configuration lines.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Latest,
    Immediate,
    Time(DateTime<Utc>),
    Lsn { hi: u32, lo: u32, inclusive: bool },
    Xid { xid: u32, inclusive: bool },
    Name(String),
}

impl Target {
    /// Checks a target with the rules `strata restore` applies to its options.
    fn parse(req: &TargetRequest) -> Result<Target, SnapshotError> {
        let invalid = |m: String| SnapshotError::InvalidParameter(m);
        Ok(match req {
            TargetRequest::Latest => Target::Latest,
            TargetRequest::Immediate => Target::Immediate,
            TargetRequest::Time(s) => Target::Time(parse_time(s).ok_or_else(|| {
                invalid(format!(
                    "invalid time {:?} (expected RFC 3339, e.g. 2026-11-25T10:00:00Z)",
                    short(s)
                ))
            })?),
            TargetRequest::Lsn(s) => {
                let (hi, lo) = parse_lsn(s)?;
                Target::Lsn {
                    hi,
                    lo,
                    inclusive: true,
                }
            }
            TargetRequest::LsnBefore(s) => {
                let (hi, lo) = parse_lsn(s)?;
                Target::Lsn {
                    hi,
                    lo,
                    inclusive: false,
                }
            }
            TargetRequest::Xid(s) => Target::Xid {
                xid: parse_xid(s)?,
                inclusive: true,
            },
            TargetRequest::XidBefore(s) => Target::Xid {
                xid: parse_xid(s)?,
                inclusive: false,
            },
            TargetRequest::Name(s) => {
                if s.is_empty()
                    || s.len() > MAX_RESTORE_POINT_NAME
                    || s.chars().any(char::is_control)
                {
                    return Err(invalid(format!(
                        "invalid restore point name {:?} (1 to {MAX_RESTORE_POINT_NAME} bytes, no control characters)",
                        short(s)
                    )));
                }
                Target::Name(s.clone())
            }
        })
    }

    /// Its `recovery_target*` line (none for `latest`).
    fn line(&self) -> String {
        match self {
            Target::Latest => String::new(),
            Target::Immediate => "recovery_target = 'immediate'\n".into(),
            Target::Time(t) => format!(
                "recovery_target_time = {}\n",
                quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
            ),
            Target::Lsn { hi, lo, inclusive } => format!(
                "recovery_target_lsn = '{hi:X}/{lo:X}'\nrecovery_target_inclusive = {}\n",
                on_off(*inclusive)
            ),
            Target::Xid { xid, inclusive } => format!(
                "recovery_target_xid = '{xid}'\nrecovery_target_inclusive = {}\n",
                on_off(*inclusive)
            ),
            Target::Name(n) => format!("recovery_target_name = {}\n", quote(n)),
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// An LSN as `strata restore --lsn` takes it (`16/B374D848`).
fn parse_lsn(s: &str) -> Result<(u32, u32), SnapshotError> {
    let half = |p: &str| {
        (!p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(p, 16).ok())
            .flatten()
    };
    s.split_once('/')
        .and_then(|(hi, lo)| Some((half(hi)?, half(lo)?)))
        .ok_or_else(|| {
            SnapshotError::InvalidParameter(format!(
                "invalid LSN {:?} (expected e.g. 0/3000000)",
                short(s)
            ))
        })
}

/// A transaction id in decimal, digits only.
fn parse_xid(s: &str) -> Result<u32, SnapshotError> {
    s.parse::<u32>()
        .ok()
        .filter(|_| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            SnapshotError::InvalidParameter(format!(
                "invalid transaction id {:?} (a decimal number up to 4294967295)",
                short(s)
            ))
        })
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// RFC 3339, or RDS's spelling without seconds (`2026-11-25T10:00Z`), as `strata restore`.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%MZ")
        .ok()
        .map(|t| t.and_utc())
}

/// `listen_addresses`: host names, IP addresses and `*`, separated by commas.
fn check_listen(value: &str) -> Result<(), SnapshotError> {
    let ok = value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:,*-_ ".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidParameter(format!(
            "invalid listen_addresses {:?} (host names, IP addresses or *, separated by commas)",
            short(value)
        )))
    }
}

/// Starts, stops and reports the servers of one agent's clones.
#[derive(Debug, Clone, Default)]
pub struct CloneServers {
    /// `--pg-bin`: the directory of `pg_ctl` for every major (none:
    /// `/usr/lib/postgresql/<major>/bin`).
    pub pg_bin: Option<PathBuf>,
}

/// The clone's directory, opened beneath the clone directory without following symlinks.
fn open_clone(store: &SnapshotStore, clone: &CloneName) -> Result<(File, PathBuf), SnapshotError> {
    let clone_dir = store.clone_dir()?;
    let parent = File::open(clone_dir).map_err(io_err("open", clone_dir))?;
    let path = clone_dir.join(clone.as_str());
    let dir = open_dir_beneath(&parent, clone.as_str()).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => SnapshotError::NotFound(format!("no clone {clone}")),
        Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR) => {
            SnapshotError::Refused(format!("clone {clone} is not a plain directory"))
        }
        _ => io_err("open", &path)(e),
    })?;
    Ok((dir, path))
}

fn conf_err(e: pg_conf::ConfError) -> SnapshotError {
    if e.source.raw_os_error() == Some(libc::ELOOP) {
        return SnapshotError::Refused(format!(
            "{} is a symlink; a clone's configuration files must be plain files",
            e.path.display()
        ));
    }
    SnapshotError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    }
}

impl CloneServers {
    /// Whether clone `clone`'s server runs: its `postmaster.pid` names a live process and
    /// this clone's directory.
    pub fn status(
        &self,
        store: &SnapshotStore,
        clone: &CloneName,
    ) -> Result<CloneStatus, SnapshotError> {
        let (dir, path) = open_clone(store, clone)?;
        let conf = ConfDir::from_dir(dir, &path);
        let mut status = CloneStatus {
            name: clone.clone(),
            running: false,
            pid: None,
            port: None,
        };
        let Some(pidfile) = conf.read("postmaster.pid").map_err(conf_err)? else {
            return Ok(status);
        };
        let text = String::from_utf8_lossy(&pidfile);
        let lines: Vec<&str> = text.lines().collect();
        let pid = lines.first().and_then(|l| l.trim().parse::<i32>().ok());
        let names_us = lines.get(1).is_some_and(|l| Path::new(l.trim()) == path);
        if let (Some(pid), true) = (pid.filter(|p| *p > 0), names_us) {
            if process_alive(pid) {
                status.running = true;
                status.pid = Some(pid as u32);
                status.port = lines.get(3).and_then(|l| l.trim().parse().ok());
            }
        }
        Ok(status)
    }

    /// Configures clone `clone` (see the module documentation) and starts its server; returns
    /// once it accepts connections.
    pub fn start(
        &self,
        store: &SnapshotStore,
        clone: &CloneName,
        req: &StartRequest,
    ) -> Result<CloneStarted, SnapshotError> {
        let started = Instant::now();
        if req.port < MIN_PORT {
            return Err(SnapshotError::InvalidParameter(format!(
                "port {} is not allowed; a clone listens on {MIN_PORT} to 65535",
                req.port
            )));
        }
        let listen = req.listen_addresses.as_deref().unwrap_or("127.0.0.1");
        check_listen(listen)?;
        let target = req.target.as_ref().map(Target::parse).transpose()?;
        let status = self.status(store, clone)?;
        if status.running {
            return Err(SnapshotError::Exists(format!(
                "clone {clone} is already running (port {})",
                status.port.map_or("?".into(), |p| p.to_string())
            )));
        }
        let (dir, path) = open_clone(store, clone)?;
        let conf = ConfDir::from_dir(dir, &path).with_owner(store.owner.0, store.owner.1);
        let bin = self.bin_dir(&conf)?;
        let user = run_as(store.owner.0)?;

        // Copies of the source's process files would make pg_ctl think a server runs.
        for stale in ["postmaster.pid", "postmaster.opts"] {
            conf.remove(stale).map_err(conf_err)?;
        }
        for signal in ["recovery.signal", "standby.signal"] {
            conf.remove(signal).map_err(conf_err)?;
        }
        let mut neutralized = pg_conf::neutralize_copy(&conf).map_err(conf_err)?;
        let socket_dir = store.clone_dir()?.to_path_buf();
        let mut tail = format!(
            "\n# Written by strata agent for clone {clone}\n\
             port = {}\n\
             listen_addresses = {}\n\
             unix_socket_directories = {}\n\
             unix_socket_permissions = 0700\n\
             restore_command = 'false'\n\
             archive_mode = off\n\
             primary_conninfo = ''\n\
             primary_slot_name = ''\n",
            req.port,
            quote(listen),
            quote(&socket_dir.display().to_string()),
        );
        if neutralized.iter().any(|n| n.starts_with("ssl")) {
            // Certificates named outside the data directory are gone.
            tail.push_str("ssl = off\n");
        }
        if target.is_some() || req.stay_in_recovery {
            tail.push_str("recovery_target_timeline = 'latest'\n");
            tail.push_str(if req.stay_in_recovery {
                "recovery_target_action = 'pause'\nhot_standby = on\n"
            } else {
                "recovery_target_action = 'promote'\n"
            });
            tail.push_str(&target.as_ref().map(Target::line).unwrap_or_default());
            let signal = if req.stay_in_recovery {
                "standby.signal"
            } else {
                "recovery.signal"
            };
            conf.write(signal, "").map_err(conf_err)?;
        }
        conf.append("postgresql.auto.conf", &tail)
            .map_err(conf_err)?;
        neutralized.sort();
        neutralized.dedup();

        let out = server_command(user.as_deref(), &bin.join("pg_ctl"))
            .arg("-D")
            .arg(&path)
            .arg("-l")
            .arg(path.join(LOG_FILE))
            .args(["-w", "-t", &SERVER_TIMEOUT.as_secs().to_string(), "start"])
            .output()
            .map_err(io_err("run", &bin.join("pg_ctl")))?;
        if !out.status.success() {
            return Err(SnapshotError::Refused(format!(
                "the server of clone {clone} did not start: {}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; "),
                log_tail(&conf)
            )));
        }
        let deadline = started + SERVER_TIMEOUT;
        let socket = socket_dir.join(format!(".s.PGSQL.{}", req.port));
        while !accepts_connections(&socket) {
            if Instant::now() > deadline {
                return Err(SnapshotError::Refused(format!(
                    "the server of clone {clone} started but does not accept connections on {}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(CloneStarted {
            name: clone.clone(),
            port: req.port,
            socket_dir,
            elapsed_ms: started.elapsed().as_millis() as u64,
            neutralized,
        })
    }

    /// Stops clone `clone`'s server if it runs (`fast`; `immediate` when its data is about to
    /// be deleted) and returns its status afterwards.
    pub fn stop(
        &self,
        store: &SnapshotStore,
        clone: &CloneName,
        immediate: bool,
    ) -> Result<CloneStatus, SnapshotError> {
        if !self.status(store, clone)?.running {
            return self.status(store, clone);
        }
        let (dir, path) = open_clone(store, clone)?;
        let conf = ConfDir::from_dir(dir, &path);
        let bin = self.bin_dir(&conf)?;
        let user = run_as(store.owner.0)?;
        let mode = if immediate { "immediate" } else { "fast" };
        let out = server_command(user.as_deref(), &bin.join("pg_ctl"))
            .arg("-D")
            .arg(&path)
            .args([
                "-m",
                mode,
                "-w",
                "-t",
                &SERVER_TIMEOUT.as_secs().to_string(),
                "stop",
            ])
            .output()
            .map_err(io_err("run", &bin.join("pg_ctl")))?;
        if !out.status.success() {
            return Err(SnapshotError::Refused(format!(
                "the server of clone {clone} did not stop: {}",
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; ")
            )));
        }
        self.status(store, clone)
    }

    /// The `pg_ctl` directory for the clone's major version (from its `PG_VERSION`).
    fn bin_dir(&self, conf: &ConfDir) -> Result<PathBuf, SnapshotError> {
        let text = conf.read("PG_VERSION").map_err(conf_err)?.ok_or_else(|| {
            SnapshotError::Refused("the clone has no PG_VERSION: not a data directory".into())
        })?;
        let major = String::from_utf8_lossy(&text)
            .trim()
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .filter(|m| (9..100).contains(m))
            .ok_or_else(|| {
                SnapshotError::Refused("the clone's PG_VERSION is not a version".into())
            })?;
        let bin = self
            .pg_bin
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
        if !bin.join("pg_ctl").is_file() {
            return Err(SnapshotError::Refused(format!(
                "no pg_ctl in {} for PostgreSQL {major} (give the agent --pg-bin)",
                bin.display()
            )));
        }
        Ok(bin)
    }
}

/// Whether process `pid` exists and has not exited (a zombie waiting for its parent has).
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // The state follows the command name, which is in parentheses and may hold spaces.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, Some('Z' | 'X'))
}

/// The user `pg_ctl` runs as: through `runuser` when the agent is root, itself when it runs as
/// the data directory's owner; anyone else could not start a server on that directory.
fn run_as(owner_uid: u32) -> Result<Option<String>, SnapshotError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == owner_uid {
        return Ok(None);
    }
    if euid != 0 {
        return Err(SnapshotError::Refused(format!(
            "the agent runs as uid {euid}; the clone belongs to uid {owner_uid}, so it cannot start its server"
        )));
    }
    user_name(owner_uid).map(Some).ok_or_else(|| {
        SnapshotError::Refused(format!("uid {owner_uid} has no user name for runuser"))
    })
}

/// The login name of `uid` (`getpwuid_r`).
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: pwd, buf and result are valid for the call and buf's length is passed; on
    // success pw_name points into buf, which outlives its use below.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name is a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_string)
}

/// `program` as `user` (through `runuser`) or as ourselves, with a clean environment: nothing
/// of the agent's reaches PostgreSQL but the locale and time zone.
fn server_command(user: Option<&str>, program: &Path) -> Command {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for (k, v) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str == "LANG" || k_str == "TZ" || k_str.starts_with("LC_") {
            cmd.env(&k, v);
        }
    }
    cmd.current_dir("/");
    cmd
}

/// The log's last FATAL/PANIC line (or last line), for a one-line error.
fn log_tail(conf: &ConfDir) -> String {
    let text = conf.read(LOG_FILE).ok().flatten().unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .rev()
        .find(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        .or_else(|| text.lines().last())
        .unwrap_or_default()
        .to_string()
}

/// Whether the server behind `socket` accepts connections, as `pg_isready` decides: it answers
/// a startup packet with anything but SQLSTATE 57P03 (starting up, shutting down, not yet
/// consistent). An authentication request or refusal means it accepts.
pub fn accepts_connections(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut packet = Vec::with_capacity(8 + params.len());
    packet.extend_from_slice(&((8 + params.len()) as u32).to_be_bytes());
    packet.extend_from_slice(&196608u32.to_be_bytes()); // protocol 3.0
    packet.extend_from_slice(params);
    if s.write_all(&packet).is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    match head[0] {
        b'R' => true,
        b'E' => {
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len.saturating_sub(4).min(64 * 1024)];
            if s.read_exact(&mut body).is_err() {
                return false;
            }
            !body.split(|&b| b == 0).any(|field| field == b"C57P03")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_targets_are_checked_like_strata_restore() {
        let t = |r: TargetRequest| Target::parse(&r).map(|t| t.line());
        assert_eq!(t(TargetRequest::Latest).unwrap(), "");
        assert_eq!(
            t(TargetRequest::Time("2026-11-25T10:00:00Z".into())).unwrap(),
            "recovery_target_time = '2026-11-25 10:00:00.000000+00'\n"
        );
        assert_eq!(
            t(TargetRequest::Time("2026-11-25T10:00Z".into())).unwrap(),
            "recovery_target_time = '2026-11-25 10:00:00.000000+00'\n"
        );
        assert_eq!(
            t(TargetRequest::Lsn("16/b374d848".into())).unwrap(),
            "recovery_target_lsn = '16/B374D848'\nrecovery_target_inclusive = on\n"
        );
        assert_eq!(
            t(TargetRequest::LsnBefore("16/b374d848".into())).unwrap(),
            "recovery_target_lsn = '16/B374D848'\nrecovery_target_inclusive = off\n"
        );
        assert_eq!(
            t(TargetRequest::Xid("742".into())).unwrap(),
            "recovery_target_xid = '742'\nrecovery_target_inclusive = on\n"
        );
        assert_eq!(
            t(TargetRequest::XidBefore("742".into())).unwrap(),
            "recovery_target_xid = '742'\nrecovery_target_inclusive = off\n"
        );
        assert_eq!(
            t(TargetRequest::Name("it's".into())).unwrap(),
            "recovery_target_name = 'it''s'\n"
        );
        for bad in [
            TargetRequest::Time("yesterday".into()),
            TargetRequest::Time("2026-11-25 10:00:00'\narchive_command='x".into()),
            TargetRequest::Lsn("0/1'\nrestore_command='id".into()),
            TargetRequest::Lsn("123456789/0".into()),
            TargetRequest::Lsn("0".into()),
            TargetRequest::Xid("-1".into()),
            TargetRequest::Xid("+1".into()),
            TargetRequest::Xid("4294967296".into()),
            TargetRequest::Xid("1 or 1".into()),
            TargetRequest::XidBefore("".into()),
            TargetRequest::XidBefore("7'\nrestore_command='id".into()),
            TargetRequest::LsnBefore("0/1'\nrestore_command='id".into()),
            TargetRequest::Name("".into()),
            TargetRequest::Name("a\nrestore_command = 'id'".into()),
            TargetRequest::Name("x".repeat(64)),
        ] {
            assert!(
                matches!(Target::parse(&bad), Err(SnapshotError::InvalidParameter(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn listen_addresses_hold_only_addresses() {
        for ok in ["127.0.0.1", "*", "::1, 10.0.0.5", "db-host.example"] {
            assert!(check_listen(ok).is_ok(), "{ok}");
        }
        for bad in ["a'b", "x\nport = 1", "a#b", "a=b", &"a".repeat(256)] {
            assert!(check_listen(bad).is_err(), "{bad:?}");
        }
    }
}
