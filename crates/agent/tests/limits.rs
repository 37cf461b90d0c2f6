//! The agent's connection limits, on real sockets: while 64 connections are held, a 65th is
//! not served until one of them ends; a connection that sends only part of a request head, or
//! nothing, or stays idle after its answer, or stops sending a body it announced is closed
//! once its head time is up; when every slot is taken, one that has signed no request for a
//! while (the flooding peer's first) gives its slot to a new connection, and a refused request
//! closes its connection. Each check waits on what the agent does (an answer, a closed
//! socket), never on how long it takes; the outer time limits only keep a broken agent from
//! hanging the test.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{default_layout, fake_data_dir, signed, start_agent_with_limits, RunningAgent};
use strata_agent::auth::unix_now;
use strata_agent::server::Limits;
use strata_agent::{AgentKey, FreeFloor};
use testkit::{FsKind, LoopFs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any expected event may take before the test gives up.
const GIVE_UP: Duration = Duration::from_secs(120);

/// An agent on a fresh loop-mounted XFS (kept mounted while the first value lives), serving
/// within `limits`; `None` where loop mounts cannot be made.
async fn agent_within(limits: Limits) -> Option<(LoopFs, RunningAgent)> {
    let fs = LoopFs::or_skip(FsKind::Xfs, 300, true)?;
    let data = fake_data_dir(fs.path(), 4096);
    let agent = start_agent_with_limits(
        default_layout(&data),
        FreeFloor::Percent(1),
        AgentKey::generate(),
        limits,
    )
    .await;
    Some((fs, agent))
}

/// Sends a signed `GET /v1/facts`, the connection kept open.
async fn ask_facts(stream: &mut TcpStream, addr: SocketAddr, key: &AgentKey) {
    let mut head = format!("GET /v1/facts HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in signed(key, "GET", "/v1/facts", "", b"", unix_now()) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
}

/// Reads one answer (head and its content-length body): its status line.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("an answer with content-length");
            if got.len() >= end + 4 + len {
                return head.lines().next().unwrap_or("").to_string();
            }
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits for the agent to close `stream`: everything it sent before closing.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(GIVE_UP, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the agent never closed the connection");
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_65th_connection_waits_until_one_of_64_ends() {
    let limits = Limits {
        head_timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    assert_eq!(limits.max_connections, 64);
    let Some((_fs, agent)) = agent_within(limits).await else {
        return;
    };

    // 64 connections, each answered once and kept open: all 64 are being served.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(agent.addr).await.unwrap();
        ask_facts(&mut s, agent.addr, &agent.key).await;
        assert_eq!(read_answer(&mut s).await, "HTTP/1.1 200 OK");
        held.push(s);
    }

    // The 65th is connected by the kernel but not served: no answer while the 64 are held.
    let mut extra = TcpStream::connect(agent.addr).await.unwrap();
    ask_facts(&mut extra, agent.addr, &agent.key).await;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut byte)).await;
    assert!(early.is_err(), "a 65th connection was served: {early:?}");
    // The held ones still are.
    ask_facts(&mut held[0], agent.addr, &agent.key).await;
    assert_eq!(read_answer(&mut held[0]).await, "HTTP/1.1 200 OK");

    // One of the 64 ends: the 65th is served (its request was signed a moment ago, within
    // the agent's five minutes).
    drop(held.pop());
    let answer = tokio::time::timeout(GIVE_UP, read_answer(&mut extra))
        .await
        .expect("the 65th connection was never served");
    assert_eq!(answer, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_finish_a_request_head_are_closed() {
    let limits = Limits {
        max_connections: 4,
        head_timeout: Duration::from_secs(1),
    };
    let Some((_fs, agent)) = agent_within(limits).await else {
        return;
    };

    // Part of a head, never finished.
    let mut partial = TcpStream::connect(agent.addr).await.unwrap();
    partial
        .write_all(b"GET /v1/facts HTTP/1.1\r\nHost: agent\r\nx-strata-nonce: ")
        .await
        .unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(agent.addr).await.unwrap();
    // A signed head announcing a body that stops after ten bytes.
    let mut stalled = TcpStream::connect(agent.addr).await.unwrap();
    let body = vec![b'x'; 1000];
    let mut head = format!(
        "PUT /v1/snapshots/s1/labels HTTP/1.1\r\nHost: {}\r\ncontent-length: {}\r\n",
        agent.addr,
        body.len()
    );
    for (name, value) in signed(
        &agent.key,
        "PUT",
        "/v1/snapshots/s1/labels",
        "",
        &body,
        unix_now(),
    ) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&body[..10]).await.unwrap();
    // One answered request, then idle.
    let mut idle = TcpStream::connect(agent.addr).await.unwrap();
    ask_facts(&mut idle, agent.addr, &agent.key).await;
    assert_eq!(read_answer(&mut idle).await, "HTTP/1.1 200 OK");

    for (what, stream) in [
        ("partial head", &mut partial),
        ("silent", &mut silent),
        ("idle", &mut idle),
    ] {
        let sent = until_closed(stream).await;
        assert!(!sent.contains(" 200 "), "{what}: served {sent}");
    }
    let sent = until_closed(&mut stalled).await;
    assert!(
        sent.starts_with("HTTP/1.1 408 "),
        "stalled body: answered {sent}"
    );

    // The slots they held are free again: as many connections as the limit, held at once,
    // are all served.
    let mut fresh = Vec::new();
    for _ in 0..limits.max_connections {
        let mut s = TcpStream::connect(agent.addr).await.unwrap();
        ask_facts(&mut s, agent.addr, &agent.key).await;
        let answer = tokio::time::timeout(GIVE_UP, read_answer(&mut s))
            .await
            .expect("a closed connection kept its slot");
        assert_eq!(answer, "HTTP/1.1 200 OK");
        fresh.push(s);
    }
}

/// A connection from `ip` (any 127.0.0.0/8 address reaches the agent on 127.0.0.1).
async fn connect_from(ip: &str, agent: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(agent).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_signed_nothing_give_their_slots_to_new_ones() {
    // Head time far beyond the test: only giving up a slot can free one.
    let limits = Limits {
        max_connections: 5,
        head_timeout: Duration::from_secs(600),
    };
    let Some((_fs, agent)) = agent_within(limits).await else {
        return;
    };

    // A refused request closes its connection at once.
    let mut refused = TcpStream::connect(agent.addr).await.unwrap();
    ask_facts(&mut refused, agent.addr, &AgentKey::generate()).await;
    let sent = until_closed(&mut refused).await;
    assert!(sent.starts_with("HTTP/1.1 401 "), "{sent}");

    // One signed connection; one from 127.0.0.1 that says nothing (the oldest unsigned);
    // three from 127.0.0.2 that say nothing.
    let mut held = Vec::new();
    let mut signed = TcpStream::connect(agent.addr).await.unwrap();
    ask_facts(&mut signed, agent.addr, &agent.key).await;
    assert_eq!(read_answer(&mut signed).await, "HTTP/1.1 200 OK");
    let mut quiet = connect_from("127.0.0.1", agent.addr).await;
    // 127.0.0.2 reaches the agent: a request from it is answered (refused).
    let mut probe = connect_from("127.0.0.2", agent.addr).await;
    ask_facts(&mut probe, agent.addr, &AgentKey::generate()).await;
    assert!(until_closed(&mut probe).await.starts_with("HTTP/1.1 401 "));
    let mut flood = Vec::new();
    for _ in 0..3 {
        flood.push(connect_from("127.0.0.2", agent.addr).await);
    }

    // The slots are full: each new signed connection gets the slot of the flooding
    // address's oldest, which the agent closes; the older quiet one stays while the flood
    // holds more.
    for (i, flooding) in flood.iter_mut().take(2).enumerate() {
        let mut new = TcpStream::connect(agent.addr).await.unwrap();
        ask_facts(&mut new, agent.addr, &agent.key).await;
        let answer = tokio::time::timeout(GIVE_UP, read_answer(&mut new))
            .await
            .unwrap_or_else(|_| panic!("no slot was given up for new connection {i}"));
        assert_eq!(answer, "HTTP/1.1 200 OK");
        let sent = until_closed(flooding).await;
        assert!(sent.is_empty(), "{sent}");
        held.push(new);
    }
    // One each now: the older goes first. The quiet one is closed; the flood's last stays.
    let mut new = TcpStream::connect(agent.addr).await.unwrap();
    ask_facts(&mut new, agent.addr, &agent.key).await;
    let answer = tokio::time::timeout(GIVE_UP, read_answer(&mut new))
        .await
        .expect("no slot was given up for a third new connection");
    assert_eq!(answer, "HTTP/1.1 200 OK");
    held.push(new);
    until_closed(&mut quiet).await;
    let mut last = flood.pop().unwrap();
    ask_facts(&mut last, agent.addr, &agent.key).await;
    assert_eq!(read_answer(&mut last).await, "HTTP/1.1 200 OK");
    held.push(last);

    // Every slot is now held by a signed connection: another waits.
    let mut waiting = TcpStream::connect(agent.addr).await.unwrap();
    ask_facts(&mut waiting, agent.addr, &agent.key).await;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(2), waiting.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a signed connection gave up its slot: {early:?}"
    );
    for s in [&mut signed].into_iter().chain(held.iter_mut()) {
        ask_facts(s, agent.addr, &agent.key).await;
        assert_eq!(read_answer(s).await, "HTTP/1.1 200 OK");
    }
}
