//! The agent's HTTP API under hostile requests, on a loop-mounted XFS: unsigned, wrongly
//! signed, stale, replayed and tampered requests are refused with 401 and change nothing;
//! names and paths with `..`, absolute paths and symlinks cannot leave the agent's
//! directories; a request recorded before the agent restarted is refused after; the client
//! tells unreachable, refused credential and refusals apart; TLS.

mod common;

use std::process::Command;

use common::{
    default_layout, fake_data_dir, raw_request, signed, start_agent, start_agent_with_key,
};
use strata_agent::auth::unix_now;
use strata_agent::proto::{ErrorBody, ErrorCode};
use strata_agent::{Agent, AgentClient, AgentError, AgentKey, FreeFloor, RelPath, SnapshotName};
use testkit::{FsKind, LoopFs};

fn name(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

fn code_of(body: &str) -> ErrorCode {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_signature_are_refused_and_change_nothing() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 64 * 1024);
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(1)).await;
    let snapshots = || common::entries_but_state(&agent.layout.snapshot_dir);
    let path = "/v1/snapshots/a";

    // Unsigned.
    let (status, body) = raw_request(agent.addr, "POST", path, &[], b"").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(code_of(&body), ErrorCode::Unauthorized);
    assert!(body.contains("unsigned request"), "{body}");
    assert!(!body.trim_end().contains('\n'), "one line: {body}");

    // Unsigned, announcing a body over the limit and sending none: refused on its head alone,
    // the body never waited for.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n\r\n",
            3 << 20
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut answer))
            .await
            .expect("the agent waited for the body of an unsigned request")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("unsigned request"), "{answer}");
    }

    // Signed with another key.
    let other = AgentKey::generate();
    let (status, body) = raw_request(
        agent.addr,
        "POST",
        path,
        &signed(&other, "POST", path, "", b"", unix_now()),
        b"",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("wrong key"), "{body}");

    // Stale and from the future.
    for skew in [-301, 301, -3600] {
        let h = signed(&agent.key, "POST", path, "", b"", unix_now() + skew);
        let (status, body) = raw_request(agent.addr, "POST", path, &h, b"").await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("away from the agent's clock"), "{body}");
    }

    // Signed for another path, method or query.
    let h = signed(&agent.key, "POST", "/v1/snapshots/b", "", b"", unix_now());
    assert_eq!(raw_request(agent.addr, "POST", path, &h, b"").await.0, 401);
    let h = signed(&agent.key, "GET", path, "", b"", unix_now());
    assert_eq!(raw_request(agent.addr, "POST", path, &h, b"").await.0, 401);
    assert_eq!(snapshots(), 0, "no refused request made a snapshot");

    // A valid request works once; replayed, it is refused and does nothing.
    let h = signed(&agent.key, "POST", path, "", b"", unix_now());
    let (status, body) = raw_request(agent.addr, "POST", path, &h, b"").await;
    assert_eq!(status, 201, "{body}");
    agent.client.delete_snapshot(&name("a")).await.unwrap();
    let (status, body) = raw_request(agent.addr, "POST", path, &h, b"").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("replayed"), "{body}");
    assert_eq!(snapshots(), 0, "the replay made no snapshot");

    // A body other than the signed one.
    agent.client.create_snapshot(&name("a")).await.unwrap();
    let labels_path = "/v1/snapshots/a/labels";
    let good = br#"{"backup_label":"START WAL LOCATION: 0/1\n"}"#;
    let evil = br#"{"backup_label":"START WAL LOCATION: 9/9\n"}"#;
    let h = signed(&agent.key, "PUT", labels_path, "", good, unix_now());
    let (status, body) = raw_request(agent.addr, "PUT", labels_path, &h, evil).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("body does not match"), "{body}");
    assert!(!agent.layout.snapshot_dir.join("a/backup_label").exists());

    // The client with the wrong key: the credential is refused, told apart.
    let wrong = AgentClient::new(&format!("http://{}", agent.addr), other, None).unwrap();
    let err = wrong.snapshots().await.unwrap_err();
    assert!(matches!(err, AgentError::Unauthorized { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "agent at http://{} refused the credential: ",
            agent.addr
        )),
        "{err}"
    );
    let err = wrong.delete_snapshot(&name("a")).await.unwrap_err();
    assert!(matches!(err, AgentError::Unauthorized { .. }), "{err:?}");
    assert!(agent.layout.snapshot_dir.join("a").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_recorded_before_a_restart_are_refused_after_it() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 64 * 1024);
    let layout = default_layout(&data);
    let first = start_agent(layout.clone(), FreeFloor::Percent(1)).await;
    let key = first.key.clone();
    let path = "/v1/snapshots/a";

    // Recorded: one request the first run served, one it never saw, and one it served from
    // a client whose clock runs two minutes ahead (dated after the coming restart).
    let served = signed(&key, "POST", path, "", b"", unix_now());
    let (status, body) = raw_request(first.addr, "POST", path, &served, b"").await;
    assert_eq!(status, 201, "{body}");
    first.client.delete_snapshot(&name("a")).await.unwrap();
    let unsent = signed(&key, "POST", path, "", b"", unix_now());
    let ahead_at = unix_now() + 120;
    let ahead = signed(&key, "POST", path, "", b"", ahead_at);
    let (status, body) = raw_request(first.addr, "POST", path, &ahead, b"").await;
    assert_eq!(status, 201, "{body}");
    first.client.delete_snapshot(&name("a")).await.unwrap();
    drop(first);

    // The same agent (data directory, key file) started again: its memory of nonces is
    // gone, yet no recorded request is accepted.
    let second = start_agent_with_key(layout, FreeFloor::Percent(1), key).await;
    for recorded in [&served, &unsent, &ahead] {
        let (status, body) = raw_request(second.addr, "POST", path, recorded, b"").await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(code_of(&body), ErrorCode::Unauthorized);
        assert!(body.contains("before the agent started"), "{body}");
        let not_before = serde_json::from_str::<ErrorBody>(&body).unwrap().not_before;
        assert_eq!(not_before, Some(ahead_at + 1), "{body}");
    }
    assert_eq!(
        common::entries_but_state(&second.layout.snapshot_dir),
        0,
        "no replay made a snapshot"
    );

    // Freshly signed requests are served: a client whose requests are dated before the
    // first accepted second (here every client on the agent's clock, and one five minutes
    // behind it) signs again with the time the refusal names.
    second.client.create_snapshot(&name("a")).await.unwrap();
    let behind = AgentClient::new(&format!("http://{}", second.addr), second.key.clone(), None)
        .unwrap()
        .with_clock_offset(-290);
    behind.create_snapshot(&name("b")).await.unwrap();
    let names: Vec<String> = second
        .client
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_paths_cannot_leave_the_agents_directories() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 64 * 1024);
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(1)).await;
    agent.client.create_snapshot(&name("s")).await.unwrap();
    let snap = agent.layout.snapshot_dir.join("s");
    // Symlinks planted in the snapshot (as an attacker with some disk access might).
    std::os::unix::fs::symlink("/etc/passwd", snap.join("evil")).unwrap();
    std::os::unix::fs::symlink("/etc", snap.join("base/etc")).unwrap();
    std::os::unix::fs::symlink("../../..", snap.join("base/5/up")).unwrap();
    // A victim directory beside the snapshots that deletion must not reach.
    let victim = fs.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("keep"), b"keep").unwrap();

    let send = |method: &'static str, path: String, query: String, body: Vec<u8>| {
        let key = agent.key.clone();
        let addr = agent.addr;
        async move {
            let h = signed(&key, method, &path, &query, &body, unix_now());
            let target = if query.is_empty() {
                path
            } else {
                format!("{path}?{query}")
            };
            raw_request(addr, method, &target, &h, &body).await
        }
    };
    let file = |p: &str| {
        format!(
            "path={}&offset=0&len=100",
            strata_agent::proto::encode_query_value(p)
        )
    };

    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "base/../../x",
        "./PG_VERSION",
        "a//b",
        "",
    ] {
        let (status, body) = send("GET", "/v1/snapshots/s/file".into(), file(bad), vec![]).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(code_of(&body), ErrorCode::InvalidParameter, "{bad:?}");
    }
    for through_link in ["evil", "base/etc/passwd", "base/5/up/victim/keep"] {
        let (status, body) = send(
            "GET",
            "/v1/snapshots/s/file".into(),
            file(through_link),
            vec![],
        )
        .await;
        assert_eq!(status, 422, "{through_link}: {body}");
        assert_eq!(code_of(&body), ErrorCode::Refused, "{through_link}");
        assert!(!body.contains("root:"), "{body}");
    }
    // Names: percent-encoded dots and slashes are decoded before the check, and refused.
    for bad in ["%2e%2e", "..%2Fvictim", "a%2Fb", "a.b", "%2Fetc"] {
        let (status, body) = send(
            "DELETE",
            format!("/v1/snapshots/{bad}"),
            String::new(),
            vec![],
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        let (status, _) = send(
            "GET",
            format!("/v1/snapshots/{bad}/manifest"),
            String::new(),
            vec![],
        )
        .await;
        assert_eq!(status, 400, "{bad}");
        let (status, _) = send(
            "POST",
            format!("/v1/clones/{bad}"),
            String::new(),
            br#"{"snapshot":"s"}"#.to_vec(),
        )
        .await;
        assert_eq!(status, 400, "{bad}");
    }
    let (status, _) = send(
        "POST",
        "/v1/clones/c".into(),
        String::new(),
        br#"{"snapshot":"../victim"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = send(
        "GET",
        "/v1/snapshots/s/changes".into(),
        "since=..%2Fvictim".into(),
        vec![],
    )
    .await;
    assert_eq!(status, 400);
    assert!(victim.join("keep").exists());

    // A plain file of the snapshot reads fine, and only up to its end.
    let got = agent
        .client
        .read_range_to_vec(&name("s"), &RelPath::new("PG_VERSION").unwrap(), 0, 1 << 20)
        .await
        .unwrap();
    assert_eq!(got, b"15\n");
    let err = agent
        .client
        .read_range_to_vec(&name("s"), &RelPath::new("PG_VERSION").unwrap(), 10, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Refused), "{err}");
    let err = agent.client.manifest(&name("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
}

#[tokio::test]
async fn an_agent_that_is_not_there_is_unreachable() {
    let port = testkit::free_port();
    let client = AgentClient::new(
        &format!("http://127.0.0.1:{port}"),
        AgentKey::generate(),
        None,
    )
    .unwrap();
    let err = client.facts().await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("agent at http://127.0.0.1:{port} unreachable: ")),
        "{err}"
    );
    for bad in ["ftp://h:1", "http://h:1/path", "https://h:1", "not a url"] {
        assert!(matches!(
            AgentClient::new(bad, AgentKey::generate(), None),
            Err(AgentError::Config { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_https_to_a_client_trusting_its_certificate() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 4096);
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (
        certs.path().join("agent.crt"),
        certs.path().join("agent.key"),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_key = AgentKey::generate();
    let agent = Agent::start(
        default_layout(&data),
        agent_key.clone(),
        FreeFloor::Percent(1),
    )
    .unwrap();
    let acceptor = strata_agent::server::tls_acceptor(&strata_agent::TlsFiles {
        cert: cert.clone(),
        key,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(strata_agent::server::serve(
        listener,
        std::sync::Arc::new(agent),
        Some(acceptor),
        stop_rx,
    ));

    let client = AgentClient::new(
        &format!("https://127.0.0.1:{}", addr.port()),
        agent_key.clone(),
        Some(&cert),
    )
    .unwrap();
    let facts = client.facts().await.unwrap();
    assert_eq!(facts.system_identifier, Some(0x0123_4567_89ab_cdef));
    assert_eq!(facts.fs.fs_type, "xfs");
    // A client trusting some other certificate does not talk to it.
    let other_dir = tempfile::tempdir().unwrap();
    let other = other_dir.path().join("other.crt");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(other_dir.path().join("other.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let distrustful = AgentClient::new(
        &format!("https://127.0.0.1:{}", addr.port()),
        agent_key,
        Some(&other),
    )
    .unwrap();
    let err = distrustful.facts().await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err:?}");
    // Plain HTTP to the TLS port gets nothing.
    let (status, _) = raw_request(addr, "GET", "/v1/facts", &[], b"").await;
    assert_ne!(status, 200);
}

/// Run as root, the agent copies nothing the data directory's owner could not read itself: not
/// a root-only file in the data directory, not a root-only directory a planted tablespace
/// symlink points at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_the_postgres_user_cannot_read_are_never_copied() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 4096);
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(1)).await;

    let secret_file = data.join("root_only.conf");
    std::fs::write(&secret_file, b"secret").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = agent.client.create_snapshot(&name("s1")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Refused), "{err}");
    assert!(
        err.to_string()
            .contains("is not readable by the data directory's owner"),
        "{err}"
    );
    std::fs::remove_file(&secret_file).unwrap();

    let secret_dir = fs.path().join("root_secrets");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("shadow"), b"root:hash").unwrap();
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir_all(data.join("pg_tblspc")).unwrap();
    std::os::unix::fs::symlink(&secret_dir, data.join("pg_tblspc/99999")).unwrap();
    let err = agent.client.create_snapshot(&name("s1")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Refused), "{err}");
    assert_eq!(
        common::entries_but_state(&agent.layout.snapshot_dir),
        0,
        "nothing kept"
    );

    // Once the postgres user may read it, it is an ordinary tablespace.
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&secret_dir)
        .status()
        .unwrap();
    assert!(ok.success());
    let s = agent.client.create_snapshot(&name("s1")).await.unwrap();
    assert!(s
        .manifest
        .entries
        .iter()
        .any(|e| e.path.as_str() == "pg_tblspc/99999/shadow"));
}
