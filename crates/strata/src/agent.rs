//! `strata agent`: the snapshot agent on the database host (command-line wiring of
//! `strata-agent`; the protocol is described in docs/AGENT.md).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use strata_agent::{Agent, AgentKey, FreeFloor, Layout, TlsFiles};

/// Options of `strata agent`.
#[derive(Args)]
pub struct AgentArgs {
    /// The PostgreSQL data directory to serve.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long)]
    listen: String,
    /// Where snapshots are made, on the data directory's file system
    /// (default: <data-dir>/../strata-snapshots).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// Where clones are made, on the same file system (default: <data-dir>/../strata-clones).
    #[arg(long)]
    clone_dir: Option<PathBuf>,
    /// The agent's credential, written (mode 0600) on first start
    /// (default: <snapshot-dir>/agent.key).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key the agent serves HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Free space a snapshot must leave on the file system: bytes, or a percentage like 10%.
    #[arg(long, default_value = "10%")]
    min_free_bytes: String,
    /// Directory of pg_ctl for starting clones' servers
    /// (default: /usr/lib/postgresql/<major>/bin, the major from the clone's PG_VERSION).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// Started as root, it first does what needs root (creating missing snapshot and clone
/// directories, reading the TLS files, binding the listener) and then becomes the data
/// directory's owner for good, before any thread exists: every later file operation runs with
/// PostgreSQL's rights, so nothing the PostgreSQL OS user plants (symlinks, renames) can make
/// it act as root.
pub fn run(args: AgentArgs) -> Result<()> {
    let min_free = FreeFloor::parse(&args.min_free_bytes).map_err(anyhow::Error::msg)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("data directory {}", args.data_dir.display()))?;
    let Some(parent) = data_dir.parent() else {
        bail!(
            "data directory {} has no parent directory",
            data_dir.display()
        );
    };
    let snapshot_dir = args
        .snapshot_dir
        .unwrap_or_else(|| parent.join("strata-snapshots"));
    let clone_dir = args
        .clone_dir
        .unwrap_or_else(|| parent.join("strata-clones"));
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(strata_agent::server::tls_acceptor(&TlsFiles { cert, key })?)
        }
        _ => None,
    };
    let listener = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let runs_as = become_data_dir_owner(&data_dir, &[&snapshot_dir, &clone_dir])?;
    let layout = Layout {
        data_dir: data_dir.clone(),
        snapshot_dir: snapshot_dir.clone(),
        clone_dir: Some(clone_dir.clone()),
    };
    // The file system is checked before any key is written: a refused start leaves nothing.
    let check = Agent::start(layout.clone(), AgentKey::generate(), min_free)?;
    drop(check);
    let key_file = args
        .key_file
        .unwrap_or_else(|| snapshot_dir.join("agent.key"));
    let (key, created) = AgentKey::load_or_create(&key_file)?;
    let mut agent = Agent::start(layout, key, min_free)?;
    if let Some(bin) = args.pg_bin {
        agent = agent.with_pg_bin(bin);
    }
    let agent = Arc::new(agent);
    let scheme = if tls.is_some() { "https" } else { "http" };
    crate::runtime()?.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        eprintln!(
            "strata agent serving {} on {scheme}://{addr} as {runs_as} (snapshots in {}, clones in {}, key file {}{})",
            data_dir.display(),
            snapshot_dir.display(),
            clone_dir.display(),
            key_file.display(),
            if created { ", just created" } else { "" }
        );
        strata_agent::server::serve(listener, agent, tls, stop_rx).await?;
        Ok(())
    })
}

/// The user the agent runs as, for its serving line: `uid 26 (gid 26)`.
struct RunsAs {
    uid: u32,
    gid: u32,
}

impl std::fmt::Display for RunsAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} (gid {})", self.uid, self.gid)
    }
}

/// Refuses a data directory owned by root (PostgreSQL never runs as root). As root: creates the
/// missing `dirs` (mode 0700, given to the data directory's owner) and switches to that owner
/// (supplementary groups dropped, then gid, then uid), verified. Not root: nothing to switch.
fn become_data_dir_owner(data_dir: &Path, dirs: &[&Path]) -> Result<RunsAs> {
    let meta = std::fs::metadata(data_dir)
        .with_context(|| format!("data directory {}", data_dir.display()))?;
    if meta.uid() == 0 {
        bail!(
            "data directory {} is owned by root; PostgreSQL never runs as root: the agent serves a data directory owned by the PostgreSQL OS user",
            data_dir.display()
        );
    }
    let owner = RunsAs {
        uid: meta.uid(),
        gid: meta.gid(),
    };
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        return Ok(RunsAs {
            uid: euid,
            gid: egid,
        });
    }
    for dir in dirs {
        create_owned_dir(dir, &owner)?;
    }
    // SAFETY: plain system calls on integers (and a null list of length 0); the process has a
    // single thread here (no runtime yet), so every thread changes identity.
    let switched = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setgid(owner.gid) == 0
            && libc::setuid(owner.uid) == 0
    };
    if !switched {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot switch to the data directory's owner, {owner}"));
    }
    // SAFETY: as above; getgroups with a zero length only counts.
    let (uid, euid, gid, egid, groups) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
            libc::getgroups(0, std::ptr::null_mut()),
        )
    };
    // SAFETY: as above; must fail once root is left for good.
    let regained = unsafe { libc::setuid(0) } == 0;
    if (uid, euid) != (owner.uid, owner.uid)
        || (gid, egid) != (owner.gid, owner.gid)
        || groups != 0
        || regained
    {
        bail!("switching to {owner} did not take (uid {uid}, euid {euid}, gid {gid}, egid {egid}, {groups} supplementary groups)");
    }
    Ok(owner)
}

/// Creates `dir` and its missing ancestors as root, each mode 0700 and given to `owner`. The
/// first existing ancestor is opened with no symlink anywhere on its (canonical) path and each
/// new directory is made and given away relative to its parent's descriptor, so a path the
/// PostgreSQL OS user swaps meanwhile (say, a directory it owns replaced by a symlink to /etc)
/// cannot make root create or chown anything elsewhere.
fn create_owned_dir(dir: &Path, owner: &RunsAs) -> Result<()> {
    let mut existing = dir;
    let mut missing = Vec::new();
    while std::fs::symlink_metadata(existing).is_err() {
        let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
            bail!(
                "cannot create directory {}: no parent to create it in",
                dir.display()
            );
        };
        missing.push(name);
        existing = parent;
    }
    if missing.is_empty() {
        return Ok(());
    }
    let canonical = std::fs::canonicalize(existing)
        .with_context(|| format!("directory {}", existing.display()))?;
    let mut parent = strata_engine::open_dir_no_links(&canonical)
        .with_context(|| format!("open directory {} (symlinks refused)", canonical.display()))?;
    for name in missing.into_iter().rev() {
        let c_name = std::ffi::CString::new(name.as_bytes())
            .with_context(|| format!("directory {}: NUL in name", dir.display()))?;
        // SAFETY: parent is an open directory descriptor and c_name a NUL-terminated string,
        // both alive for the call.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), c_name.as_ptr(), 0o700) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("create directory {}", dir.display()));
        }
        // SAFETY: as above; the result is checked before use.
        let fd = unsafe {
            libc::openat(
                parent.as_raw_fd(),
                c_name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("open directory {}", dir.display()));
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let child = unsafe { std::fs::File::from_raw_fd(fd) };
        std::os::unix::fs::fchown(&child, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("give directory {} to {owner}", dir.display()))?;
        parent = child;
    }
    Ok(())
}
