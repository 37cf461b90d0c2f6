//! Clones started on the database host, on a real loop-mounted XFS (reflink=1) with a real
//! PostgreSQL 15 cluster, driven through the agent's signed HTTP API: a snapshot taken in
//! backup mode with its WAL reflinked from `pg_wal` starts as a clone holding the source's rows
//! as of the backup's consistency point, runs nothing the source's configuration names, and is
//! stopped, reported and deleted; hostile ports, recovery targets, WAL file names and sizes
//! are refused with 400 and write nothing.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{default_layout, fake_data_dir, raw_request, signed, start_agent};
use strata_agent::auth::unix_now;
use strata_agent::proto::{ErrorBody, ErrorCode};
use strata_agent::{
    AgentError, CloneName, FreeFloor, Labels, SnapshotName, StartRequest, TargetRequest,
    WalFileName,
};
use testkit::{Cluster, FsKind, LoopFs};

const PG: u32 = 15;

fn snap(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

fn clone_name(s: &str) -> CloneName {
    CloneName::new(s).unwrap()
}

fn wal(s: &str) -> WalFileName {
    WalFileName::new(s).unwrap()
}

/// `psql` over TCP on 127.0.0.1 as `postgres` (the clone keeps the source's trust lines).
fn psql(bin: &Path, port: u16, sql: &str) -> String {
    let out = Command::new(bin.join("psql"))
        .args([
            "-At",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(port.to_string())
        .args(["-U", "postgres", "-d", "postgres", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn refusal(e: &AgentError) -> (u16, ErrorCode) {
    match e {
        AgentError::Refused { status, code, .. } => (*status, *code),
        other => panic!("expected a refusal, got {other}"),
    }
}

/// Whether `pid` runs (a zombie left for its parent to reap does not).
fn process_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    state.is_some_and(|s| s != 'Z' && s != 'X')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_a_snapshot_starts_with_the_backup_rows_and_runs_nothing_of_the_source() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let cluster = Cluster::builder(PG)
        .in_dir(fs.path())
        .conf("autovacuum = off")
        .start();
    let data = cluster.data_dir().to_path_buf();
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'before' FROM generate_series(1, 1000) g;",
    );
    // The source's configuration on disk names programs to run; the running source never
    // loaded it, so only a clone that inherited it would run them.
    let tag = format!("{:016x}", rand::random::<u64>());
    let pwned = |what: &str| PathBuf::from(format!("/tmp/pwned-{tag}-{what}"));
    let hostile = format!(
        "\narchive_mode = on\n\
         archive_command = 'touch {}'\n\
         archive_timeout = 1\n\
         restore_command = 'touch {}'\n\
         recovery_end_command = 'touch {}'\n\
         ssl_passphrase_command = 'touch {}'\n\
         shared_preload_libraries = 'pwned_library'\n\
         include_if_exists = '{}'\n",
        pwned("archive").display(),
        pwned("restore").display(),
        pwned("recovery-end").display(),
        pwned("ssl").display(),
        pwned("include").display(),
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, hostile.as_bytes()))
        .unwrap();
    std::fs::write(
        data.join("postgresql.auto.conf"),
        format!("archive_command = 'touch {}'\n", pwned("auto").display()),
    )
    .unwrap();

    let agent = start_agent(default_layout(&data), FreeFloor::Percent(5)).await;

    // Backup mode on a session held open, the snapshot, rows written during backup mode.
    let session = cluster.client("postgres").await;
    let start: String = session
        .query_one(
            "SELECT pg_walfile_name(pg_backup_start('clone-test', true))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let created = agent.client.create_snapshot(&snap("s1")).await.unwrap();
    cluster.psql(
        "postgres",
        "INSERT INTO t SELECT g, 'during' FROM generate_series(1001, 1100) g;
         UPDATE t SET v = 'updated during' WHERE id <= 10;",
    );
    let stop = session
        .query_one(
            "SELECT pg_walfile_name(lsn), labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(true)",
            &[],
        )
        .await
        .unwrap();
    let (last, label, map): (String, String, String) = (stop.get(0), stop.get(1), stop.get(2));
    // After the backup: not part of the clone recovered to the consistency point.
    cluster.psql(
        "postgres",
        "INSERT INTO t SELECT g, 'after' FROM generate_series(1101, 1200) g;",
    );
    agent
        .client
        .put_labels(
            &snap("s1"),
            &Labels {
                backup_label: label.clone(),
                tablespace_map: Some(map),
            },
        )
        .await
        .unwrap();
    let added = agent
        .client
        .add_snapshot_wal(&snap("s1"), &wal(&start), &wal(&last))
        .await
        .unwrap();
    let snap_dir = agent.layout.snapshot_dir.join("s1");
    assert_eq!(added.segments.first(), Some(&wal(&start)));
    assert_eq!(added.segments.last(), Some(&wal(&last)));
    for s in &added.segments {
        let meta = std::fs::metadata(snap_dir.join("pg_wal").join(s.as_str())).unwrap();
        assert_eq!(meta.len(), 16 << 20, "{s}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{s}");
        let owner = std::fs::metadata(&data).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (owner.uid(), owner.gid()));
    }
    eprintln!(
        "snapshot: {} files in {} ms; WAL {start}..{last}: {} segments reflinked",
        created.manifest.file_count(),
        created.elapsed_ms,
        added.segments.len()
    );

    let c1 = clone_name("c1");
    let clone = agent.client.clone_snapshot(&snap("s1"), &c1).await.unwrap();
    let port = testkit::free_port();
    let started = agent
        .client
        .start_clone(
            &c1,
            &StartRequest {
                port,
                listen_addresses: None,
                target: Some(TargetRequest::Immediate),
                stay_in_recovery: false,
            },
        )
        .await
        .unwrap();
    eprintln!(
        "clone to accepting connections: {} ms ({} files, {} bytes)",
        started.elapsed_ms, clone.files, clone.bytes
    );
    assert_eq!(started.port, port);
    for name in [
        "archive_command",
        "archive_mode",
        "archive_timeout",
        "restore_command",
        "recovery_end_command",
        "ssl_passphrase_command",
        "shared_preload_libraries",
        "include_if_exists",
        "port",
        "listen_addresses",
        "unix_socket_directories",
    ] {
        assert!(
            started.neutralized.iter().any(|n| n == name),
            "{name} not reported neutralized: {:?}",
            started.neutralized
        );
    }

    // The rows as of the backup's consistency point: before and during, not after.
    let bin = cluster.bin_dir().to_path_buf();
    assert_eq!(
        psql(&bin, port, "SELECT count(*), max(id) FROM t"),
        "1100|1100"
    );
    assert_eq!(
        psql(
            &bin,
            port,
            "SELECT count(*) FROM t WHERE v = 'updated during'"
        ),
        "10"
    );
    assert_eq!(psql(&bin, port, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(psql(&bin, port, "SHOW archive_mode"), "off");
    assert_eq!(psql(&bin, port, "SHOW archive_command"), "(disabled)");
    assert_eq!(psql(&bin, port, "SHOW restore_command"), "false");
    assert_eq!(psql(&bin, port, "SHOW recovery_end_command"), "");
    assert_eq!(psql(&bin, port, "SHOW ssl_passphrase_command"), "");
    assert_eq!(psql(&bin, port, "SHOW shared_preload_libraries"), "");
    assert_eq!(psql(&bin, port, "SHOW listen_addresses"), "127.0.0.1");
    // Give an archiver, had there been one, WAL to archive.
    psql(
        &bin,
        port,
        "INSERT INTO t VALUES (5000, 'clone'); SELECT pg_switch_wal(); CHECKPOINT;",
    );
    let conf = std::fs::read_to_string(clone.path.join("postgresql.conf")).unwrap();
    assert!(
        conf.contains("# neutralized by strata: archive_command"),
        "{conf}"
    );

    // Status, a second start refused, stop.
    let status = agent.client.clone_status(&c1).await.unwrap();
    assert!(status.running);
    assert_eq!(status.port, Some(port));
    let pid = status.pid.expect("pid");
    assert!(process_alive(pid));
    let again = agent
        .client
        .start_clone(
            &c1,
            &StartRequest {
                port: testkit::free_port(),
                listen_addresses: None,
                target: None,
                stay_in_recovery: false,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refusal(&again), (409, ErrorCode::Exists), "{again}");
    let stopped = agent.client.stop_clone(&c1).await.unwrap();
    assert!(!stopped.running && stopped.port.is_none());
    assert!(!clone.path.join("postmaster.pid").exists());
    assert!(!process_alive(pid));
    assert!(!agent.client.clone_status(&c1).await.unwrap().running);

    // Started as a read-only standby: it stays in recovery.
    let port_standby = testkit::free_port();
    agent
        .client
        .start_clone(
            &c1,
            &StartRequest {
                port: port_standby,
                listen_addresses: None,
                target: None,
                stay_in_recovery: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(psql(&bin, port_standby, "SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        psql(&bin, port_standby, "SELECT count(*) FROM t WHERE id = 5000"),
        "1"
    );
    assert!(clone.path.join("standby.signal").exists());
    assert!(!agent.client.stop_clone(&c1).await.unwrap().running);

    // Started again (its own configuration written over the previous one), then deleted
    // while running: the server is stopped first.
    let port2 = testkit::free_port();
    agent
        .client
        .start_clone(
            &c1,
            &StartRequest {
                port: port2,
                listen_addresses: None,
                target: None,
                stay_in_recovery: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        psql(&bin, port2, "SELECT count(*) FROM t WHERE id = 5000"),
        "1"
    );
    assert_eq!(psql(&bin, port2, "SELECT pg_is_in_recovery()"), "f");
    assert!(!clone.path.join("standby.signal").exists());
    let pid = agent.client.clone_status(&c1).await.unwrap().pid.unwrap();
    agent.client.delete_clone(&c1).await.unwrap();
    assert!(!clone.path.exists());
    assert!(!process_alive(pid));

    for what in [
        "archive",
        "restore",
        "recovery-end",
        "ssl",
        "include",
        "auto",
    ] {
        assert!(
            !pwned(what).exists(),
            "{} was created",
            pwned(what).display()
        );
    }
    drop(session);
    drop(agent);
    drop(cluster);
}

fn code_of(body: &str) -> ErrorCode {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .code
}

/// Every entry under `dir`, by relative path.
fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_start_requests_and_wal_files_are_refused_and_write_nothing() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 4096);
    let segment = 16u64 << 20;
    std::fs::create_dir_all(data.join("pg_wal/archive_status")).unwrap();
    let live = std::fs::File::create(data.join("pg_wal/000000010000000000000001")).unwrap();
    live.set_len(segment).unwrap();
    std::fs::write(data.join("postgresql.auto.conf"), "archive_command = 'x'\n").unwrap();
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(ok.success());
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(1)).await;
    agent.client.create_snapshot(&snap("s1")).await.unwrap();
    let c1 = clone_name("c1");
    let clone = agent.client.clone_snapshot(&snap("s1"), &c1).await.unwrap();
    let before = listing(&clone.path);
    let auto_conf = std::fs::read(clone.path.join("postgresql.auto.conf")).unwrap();

    // Ports and targets.
    let base = StartRequest {
        port: 15432,
        listen_addresses: None,
        target: None,
        stay_in_recovery: false,
    };
    let hostile = [
        StartRequest {
            port: 22,
            ..base.clone()
        },
        StartRequest {
            port: 0,
            ..base.clone()
        },
        StartRequest {
            target: Some(TargetRequest::Lsn("0/1'\nrestore_command = 'id".into())),
            ..base.clone()
        },
        StartRequest {
            target: Some(TargetRequest::Time(
                "2026-12-06 10:00:00'\narchive_command='id".into(),
            )),
            ..base.clone()
        },
        StartRequest {
            target: Some(TargetRequest::Xid("1; DROP".into())),
            ..base.clone()
        },
        StartRequest {
            target: Some(TargetRequest::Name(
                "x\nshared_preload_libraries = 'evil'".into(),
            )),
            ..base.clone()
        },
        StartRequest {
            listen_addresses: Some("*'\nssl_passphrase_command = 'id".into()),
            ..base.clone()
        },
    ];
    for req in &hostile {
        let e = agent.client.start_clone(&c1, req).await.unwrap_err();
        assert_eq!(
            refusal(&e),
            (400, ErrorCode::InvalidParameter),
            "{req:?}: {e}"
        );
    }
    let path = "/v1/clones/c1/start";
    for body in [
        &br#"{"port": 70000}"#[..],
        br#"{"port": "5432\nport = 1"}"#,
        br#"{"port": -1}"#,
        br#"{"port": 5432, "target": {"kind": "command", "value": "id"}}"#,
    ] {
        let h = signed(&agent.key, "POST", path, "", body, unix_now());
        let (status, text) = raw_request(agent.addr, "POST", path, &h, body).await;
        assert_eq!(status, 400, "{text}");
        assert_eq!(code_of(&text), ErrorCode::InvalidParameter);
    }
    assert_eq!(
        listing(&clone.path),
        before,
        "a refused start wrote nothing"
    );
    assert_eq!(
        std::fs::read(clone.path.join("postgresql.auto.conf")).unwrap(),
        auto_conf
    );

    // WAL file names and sizes.
    let clone_wal = clone.path.join("pg_wal");
    let wal_before = listing(&clone_wal);
    for name in [
        "..%2F..%2Fetc%2Fcron.d%2Fx",
        "000000010000000000000002.partial",
        "00000001000000000000000g",
        "0000000100000000000000ab",
        "000000000000000000000002",
        "x.history",
        "%2E%2E",
    ] {
        let path = format!("/v1/clones/c1/wal/{name}");
        let h = signed(&agent.key, "PUT", &path, "", b"x", unix_now());
        let (status, text) = raw_request(agent.addr, "PUT", &path, &h, b"x").await;
        assert_eq!(status, 400, "{name}: {text}");
        assert_eq!(code_of(&text), ErrorCode::InvalidParameter, "{name}");
    }
    // An unsigned upload announcing a segment-sized body is refused before any byte of the
    // body is read: only a signed request makes the agent buffer a segment.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
        let head = format!(
            "PUT /v1/clones/c1/wal/000000010000000000000002 HTTP/1.1\r\nHost: {}\r\nContent-Length: {segment}\r\nConnection: close\r\n\r\n",
            agent.addr
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut answer))
            .await
            .expect("answered without the body")
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(text.contains("unsigned request"), "{text}");
    }
    let seg2 = wal("000000010000000000000002");
    for len in [0, 1000, segment - 1, segment + 1] {
        let e = agent
            .client
            .put_clone_wal(&c1, &seg2, vec![7u8; len as usize])
            .await
            .unwrap_err();
        assert_eq!(
            refusal(&e),
            (400, ErrorCode::InvalidParameter),
            "{len}: {e}"
        );
    }
    let e = agent
        .client
        .put_clone_wal(
            &c1,
            &wal("00000002.history"),
            vec![b'x'; segment as usize + 1],
        )
        .await
        .unwrap_err();
    assert_eq!(refusal(&e), (400, ErrorCode::InvalidParameter), "{e}");
    assert_eq!(
        listing(&clone_wal),
        wal_before,
        "a refused WAL file wrote nothing"
    );

    // A whole segment and a history file are stored, owned like the data directory, 0600.
    let bytes: Vec<u8> = (0..segment).map(|i| (i % 251) as u8).collect();
    agent
        .client
        .put_clone_wal(&c1, &seg2, bytes.clone())
        .await
        .unwrap();
    assert_eq!(std::fs::read(clone_wal.join(seg2.as_str())).unwrap(), bytes);
    let meta = std::fs::metadata(clone_wal.join(seg2.as_str())).unwrap();
    let owner = std::fs::metadata(&data).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (owner.uid(), owner.gid()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let e = agent
        .client
        .put_clone_wal(&c1, &seg2, bytes.clone())
        .await
        .unwrap_err();
    assert_eq!(refusal(&e), (409, ErrorCode::Exists), "{e}");
    agent
        .client
        .put_snapshot_wal(
            &snap("s1"),
            &wal("00000002.history"),
            b"1\t0/3000000\tno recovery target specified\n".to_vec(),
        )
        .await
        .unwrap();
    assert!(agent
        .layout
        .snapshot_dir
        .join("s1/pg_wal/00000002.history")
        .is_file());

    // Segment ranges from the live pg_wal.
    for (first, last, status) in [
        ("000000010000000000000003", "000000010000000000000002", 400),
        ("000000010000000000000001", "000000010000000000000041", 400),
        ("000000010000000000000001", "000000020000000000000001", 400),
        ("00000001.history", "000000010000000000000001", 400),
        ("000000010000000000000001", "000000010000000000000002", 404),
    ] {
        let e = agent
            .client
            .add_snapshot_wal(&snap("s1"), &wal(first), &wal(last))
            .await
            .unwrap_err();
        assert_eq!(refusal(&e).0, status, "{first}..{last}: {e}");
    }
    assert_eq!(
        listing(&agent.layout.snapshot_dir.join("s1/pg_wal")),
        ["00000002.history", "archive_status"],
        "a refused range left nothing"
    );
    let added = agent
        .client
        .add_snapshot_wal(
            &snap("s1"),
            &wal("000000010000000000000001"),
            &wal("000000010000000000000001"),
        )
        .await
        .unwrap();
    assert_eq!(added.bytes, segment);

    // A clone's pg_wal swapped for a symlink does not lead the agent outside.
    let outside = testkit::temp_dir_in(fs.path(), "outside-");
    std::fs::rename(&clone_wal, clone.path.join("pg_wal.old")).unwrap();
    std::os::unix::fs::symlink(&outside, &clone_wal).unwrap();
    let e = agent
        .client
        .put_clone_wal(&c1, &wal("000000010000000000000003"), bytes.clone())
        .await
        .unwrap_err();
    assert_eq!(refusal(&e), (422, ErrorCode::Refused), "{e}");
    assert!(listing(&outside).is_empty());

    // The clone has no server: status says so, stop is a no-op, delete works.
    assert!(!agent.client.clone_status(&c1).await.unwrap().running);
    assert!(!agent.client.stop_clone(&c1).await.unwrap().running);
    let e = agent
        .client
        .clone_status(&clone_name("absent"))
        .await
        .unwrap_err();
    assert_eq!(refusal(&e), (404, ErrorCode::NotFound));
    agent.client.delete_clone(&c1).await.unwrap();
    assert!(!clone.path.exists());
}
