//! Answers must be sealed by the agent: a fake "agent" on loopback that answers without the
//! MAC, with a wrong one, or with an honest answer recorded for another request is refused by
//! the client with a clear error, while the honest agent's answers (JSON, streamed file ranges,
//! refusals) are taken.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{default_layout, fake_data_dir, signed, start_agent};
use strata_agent::auth::unix_now;
use strata_agent::proto::ErrorCode;
use strata_agent::{AgentClient, AgentError, AgentKey, FreeFloor, RelPath, SnapshotName, Timeouts};
use testkit::{FsKind, LoopFs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A fake agent answering every connection with `answer`, verbatim, after reading the request
/// head.
async fn fake_agent(answer: Vec<u8>) -> SocketAddr {
    fake_agent_holding(answer, false).await
}

/// [`fake_agent`], keeping each connection open after the answer when `hold` (an answer that
/// stalls mid-body).
async fn fake_agent_holding(answer: Vec<u8>, hold: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(&answer).await;
                if hold {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// The raw bytes of the agent's answer to one signed request.
async fn record(addr: SocketAddr, key: &AgentKey, path: &str, query: &str) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let target = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let mut head =
        format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nTE: trailers\r\n");
    for (name, value) in signed(key, "GET", path, query, b"", unix_now()) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    answer
}

fn http_answer(status: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

fn assert_forged(err: &AgentError, says: &str) {
    assert!(matches!(err, AgentError::Forged { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("refused an answer claiming to be from agent at http://127.0.0.1:"),
        "{text}"
    );
    assert!(text.contains(says), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_the_agents_mac_are_refused() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 64 * 1024);
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(1)).await;
    let snap = SnapshotName::new("a").unwrap();
    let rel = RelPath::new("base/5/16384").unwrap();

    // The honest agent: JSON, a streamed range with its trailer, a sealed refusal.
    let facts = agent.client.facts().await.unwrap();
    assert_eq!(facts.system_identifier, Some(0x0123_4567_89ab_cdef));
    agent.client.create_snapshot(&snap).await.unwrap();
    let bytes = agent
        .client
        .read_range_to_vec(&snap, &rel, 100, 5000)
        .await
        .unwrap();
    assert_eq!(bytes, common::pseudo_random(64 * 1024, 7)[100..5100]);
    let err = agent
        .client
        .manifest(&SnapshotName::new("nothing").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");

    let client_of = |addr: SocketAddr| {
        AgentClient::new(&format!("http://{addr}"), agent.key.clone(), None).unwrap()
    };
    let facts_json = serde_json::to_string(&facts).unwrap();

    // The right body, no MAC.
    let fake = client_of(fake_agent(http_answer("200 OK", &[], &facts_json)).await);
    assert_forged(
        &fake.facts().await.unwrap_err(),
        "carries no x-strata-response-mac",
    );

    // The right body, a MAC made up or made with another key.
    let made_up = "ab".repeat(32);
    let fake = client_of(
        fake_agent(http_answer(
            "200 OK",
            &[("x-strata-response-mac", &made_up)],
            &facts_json,
        ))
        .await,
    );
    assert_forged(&fake.facts().await.unwrap_err(), "does not verify");
    let fake = client_of(
        fake_agent(http_answer(
            "200 OK",
            &[("x-strata-response-mac", "not hex")],
            &facts_json,
        ))
        .await,
    );
    assert_forged(&fake.facts().await.unwrap_err(), "not hex");

    // The honest agent's sealed answer to another request, replayed: its MAC binds that
    // request's nonce.
    let recorded = record(agent.addr, &agent.key, "/v1/facts", "").await;
    assert!(
        String::from_utf8_lossy(&recorded).contains("x-strata-response-mac: "),
        "{}",
        String::from_utf8_lossy(&recorded)
    );
    let fake = client_of(fake_agent(recorded).await);
    assert_forged(&fake.facts().await.unwrap_err(), "does not verify");

    // A refusal without a MAC is not believed either (it is not a 401).
    let fake = client_of(
        fake_agent(http_answer(
            "404 Not Found",
            &[],
            r#"{"code":"NotFound","message":"no such snapshot"}"#,
        ))
        .await,
    );
    assert_forged(&fake.manifest(&snap).await.unwrap_err(), "carries no");

    // A file range: its bytes arrive, but the end without the trailer (or with another
    // request's) fails the read, so nothing read may be kept.
    let chunked = b"HTTP/1.1 200 OK\r\nx-strata-range-length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec();
    let fake = client_of(fake_agent(chunked).await);
    let err = fake.read_range_to_vec(&snap, &rel, 0, 5).await.unwrap_err();
    assert_forged(&err, "without its x-strata-response-mac trailer");
    let query = "path=base%2F5%2F16384&offset=0&len=5";
    let recorded = record(agent.addr, &agent.key, "/v1/snapshots/a/file", query).await;
    assert!(
        String::from_utf8_lossy(&recorded).contains("x-strata-response-mac: "),
        "the trailer is sent: {}",
        String::from_utf8_lossy(&recorded)
    );
    let fake = client_of(fake_agent(recorded).await);
    let err = fake.read_range_to_vec(&snap, &rel, 0, 5).await.unwrap_err();
    assert_forged(&err, "does not verify");

    // And the honest agent still answers after all that.
    let again = agent.client.facts().await.unwrap();
    assert_eq!(again.system_identifier, facts.system_identifier);
}

/// What a fake agent sends can neither grow the client's memory past what it asked for nor
/// hold it forever: a file range longer than announced, an announcement longer than asked,
/// and answers that stop halfway are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_longer_than_asked_or_stalled_are_refused() {
    let key = AgentKey::generate();
    let snap = SnapshotName::new("a").unwrap();
    let rel = RelPath::new("base/5/16384").unwrap();
    let client_of = |addr: SocketAddr| {
        AgentClient::new(&format!("http://{addr}"), key.clone(), None)
            .unwrap()
            .with_timeouts(Timeouts {
                connect: Duration::from_secs(5),
                request: Duration::from_secs(1),
            })
    };
    let protocol = |err: &AgentError, says: &str| {
        assert!(matches!(err, AgentError::Protocol { .. }), "{err:?}");
        assert!(err.to_string().contains(says), "{err}");
    };
    let unreachable = |err: &AgentError, says: &str| {
        assert!(err.is_unreachable(), "{err:?}");
        assert!(err.to_string().contains(says), "{err}");
    };
    let within = |secs| Duration::from_secs(secs);

    // Five bytes announced, more sent: refused at the first byte past them.
    let longer = b"HTTP/1.1 200 OK\r\nx-strata-range-length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nhel\r\n7\r\nlo, and\r\n0\r\n\r\n".to_vec();
    let mut reader = client_of(fake_agent(longer).await)
        .read_range(&snap, &rel, 0, 5)
        .await
        .unwrap();
    assert_eq!(&reader.next_chunk().await.unwrap().unwrap()[..], b"hel");
    protocol(
        &reader.next_chunk().await.unwrap_err(),
        "ran past its announced 5 bytes",
    );

    // More announced than asked for.
    let announced = b"HTTP/1.1 200 OK\r\nx-strata-range-length: 1000000\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
    let err = client_of(fake_agent(announced).await)
        .read_range_to_vec(&snap, &rel, 0, 5)
        .await
        .unwrap_err();
    protocol(&err, "1000000 bytes announced for 5 asked");

    // A range that stops sending: refused after the idle time, not waited on forever.
    let stalled = b"HTTP/1.1 200 OK\r\nx-strata-range-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n".to_vec();
    let fake = client_of(fake_agent_holding(stalled, true).await);
    let err = tokio::time::timeout(within(20), fake.read_range_to_vec(&snap, &rel, 0, 5))
        .await
        .expect("the stalled range is given up")
        .unwrap_err();
    unreachable(&err, "stalled after 2 of 5 bytes");

    // A JSON answer whose body stops halfway.
    let half = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"agent_version\":".to_vec();
    let fake = client_of(fake_agent_holding(half, true).await);
    let err = tokio::time::timeout(within(20), fake.facts())
        .await
        .expect("the stalled answer is given up")
        .unwrap_err();
    protocol(&err, "stalled after");
}

/// A FIFO put in a snapshot where a file was (its owner may) makes a read fail at once instead
/// of holding one of the agent's threads, and the agent still serves the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_a_snapshot_is_refused_without_blocking() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 64 * 1024);
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(1)).await;
    let snap = SnapshotName::new("a").unwrap();
    agent.client.create_snapshot(&snap).await.unwrap();
    let planted = agent.layout.snapshot_dir.join("a/base/5/16384");
    std::fs::remove_file(&planted).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&planted)
        .status()
        .unwrap();
    assert!(status.success());
    let rel = RelPath::new("base/5/16384").unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        agent.client.read_range_to_vec(&snap, &rel, 0, 10),
    )
    .await
    .expect("the read of a FIFO does not block")
    .unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let facts = agent.client.facts().await.unwrap();
    assert_eq!(facts.system_identifier, Some(0x0123_4567_89ab_cdef));
}

/// The CA file named for an agent is read as a certificate file only: a device or a FIFO in
/// its place is refused at once instead of being read without end.
#[test]
fn a_ca_file_that_is_not_a_regular_file_is_refused() {
    let key = AgentKey::generate();
    let err = AgentClient::new(
        "https://127.0.0.1:7070",
        key.clone(),
        Some(std::path::Path::new("/dev/zero")),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let dir = testkit::temp_dir("strata-agent-ca-");
    let fifo = dir.join("ca.pem");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let err = AgentClient::new("https://127.0.0.1:7070", key, Some(&fifo)).expect_err("refused");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
