//! `strata agent`: the snapshot agent on the database host (command-line wiring of
//! `strata-agent`; the protocol is described in docs/AGENT.md).

use std::path::PathBuf;
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
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(strata_agent::server::tls_acceptor(&TlsFiles { cert, key })?)
        }
        _ => None,
    };
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
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "strata agent serving {} on {scheme}://{addr} (snapshots in {}, clones in {}, key file {}{})",
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
