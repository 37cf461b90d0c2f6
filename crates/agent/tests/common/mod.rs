//! Shared helpers of the agent's integration tests: an agent served in-process on a loopback
//! port, a data directory on a loop-mounted file system, raw HTTP for hostile requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_agent::server::Limits;
use strata_agent::{Agent, AgentClient, AgentKey, FreeFloor, Layout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An agent serving on 127.0.0.1 until dropped.
pub struct RunningAgent {
    pub client: AgentClient,
    pub key: AgentKey,
    pub addr: SocketAddr,
    pub layout: Layout,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The layout `strata agent` uses by default for `data_dir`.
pub fn default_layout(data_dir: &Path) -> Layout {
    let parent = data_dir.parent().expect("data dir has a parent");
    Layout {
        data_dir: data_dir.to_path_buf(),
        snapshot_dir: parent.join("strata-snapshots"),
        clone_dir: Some(parent.join("strata-clones")),
    }
}

/// Starts an agent for `layout` with a fresh key (panics if it refuses to start).
pub async fn start_agent(layout: Layout, floor: FreeFloor) -> RunningAgent {
    start_agent_with_key(layout, floor, AgentKey::generate()).await
}

/// Starts an agent for `layout` with `key`, as `strata agent` does with an existing key file.
pub async fn start_agent_with_key(layout: Layout, floor: FreeFloor, key: AgentKey) -> RunningAgent {
    start_agent_with_limits(layout, floor, key, Limits::default()).await
}

/// Starts an agent for `layout` with `key`, serving within `limits`.
pub async fn start_agent_with_limits(
    layout: Layout,
    floor: FreeFloor,
    key: AgentKey,
    limits: Limits,
) -> RunningAgent {
    let agent = Agent::start(layout.clone(), key.clone(), floor).expect("agent starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(strata_agent::server::serve_with_limits(
        listener,
        Arc::new(agent),
        None,
        limits,
        stop_rx,
    ));
    let client = AgentClient::new(&format!("http://{addr}"), key.clone(), None).expect("client");
    RunningAgent {
        client,
        key,
        addr,
        layout,
        stop,
    }
}

/// A minimal data directory (no server): PG_VERSION, a relation file of `size` pseudo-random
/// bytes, pg_control, owned by the postgres OS user.
pub fn fake_data_dir(parent: &Path, size: usize) -> PathBuf {
    let root = testkit::temp_dir_in(parent, "strata-fake-");
    let data = root.join("data");
    std::fs::create_dir_all(data.join("base/5")).unwrap();
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(
        data.join("global/pg_control"),
        0x0123_4567_89ab_cdefu64.to_ne_bytes(),
    )
    .unwrap();
    std::fs::write(data.join("base/5/16384"), pseudo_random(size, 7)).unwrap();
    let status = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    data
}

/// Deterministic incompressible bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An HTTP/1.1 exchange with no help from the client library: (status, body).
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Signed headers for a raw request.
pub fn signed(
    key: &AgentKey,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    timestamp: i64,
) -> Vec<(&'static str, String)> {
    strata_agent::auth::sign(
        key,
        method,
        path,
        query,
        body,
        timestamp,
        &strata_agent::auth::new_nonce(),
    )
    .pairs()
    .to_vec()
}

/// Entries of the snapshot directory but the agent's own state file (the latest request time).
pub fn entries_but_state(snapshot_dir: &Path) -> usize {
    std::fs::read_dir(snapshot_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != strata_agent::server::LATEST_REQUEST_FILE)
        .count()
}
