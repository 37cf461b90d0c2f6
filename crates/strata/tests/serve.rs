//! `strata serve` as a process: the demo sandbox from start to stop, the
//! admin key and its permissions, `strata key`, `/metrics`, HTTPS, and
//! restore drills of backups the CLI takes beside it.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use common::{http_get, signed_call, wait_for, Server, Strata};
use testkit::Cluster;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn demo_sandbox_is_archived_measured_and_stopped() {
    let strata = Strata::new("demo");
    let server = Server::start(&strata, &["--demo"]);
    let data = strata.dir.join("data");
    // The admin key exists, readable by its owner only, and so is the catalog.
    let key: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("admin-key.json")).unwrap())
            .unwrap();
    assert!(key["AccessKeyId"].as_str().unwrap().starts_with("STRATA"));
    assert_eq!(key["AccessKeySecret"].as_str().unwrap().len(), 30);
    assert_eq!(mode(&data.join("admin-key.json")), 0o600);
    assert_eq!(mode(&data.join("catalog.db")), 0o600);

    // The sandbox is registered (after initdb), backed up at once and archived.
    wait_for("the demo's first backup", 120, || {
        let out = strata.run(&["backup", "list", "demo", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .unwrap()
                .iter()
                .any(|b| b["status"] == "Success")
    });
    let backup = strata
        .backups("demo")
        .into_iter()
        .find(|b| b["status"] == "Success")
        .unwrap();
    assert_eq!(backup["mode"], "Automated");
    assert!(backup["total_bytes"].as_u64().unwrap() > 1_000_000);
    wait_for("the demo's WAL", 60, || !strata.wal("demo").is_empty());

    let (status, metrics) = http_get(server.port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{instance=\"demo\"}}")))
            .unwrap_or_else(|| panic!("no {name} for demo in:\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(
        line("strata_last_backup_size_bytes"),
        backup["total_bytes"].as_u64().unwrap() as f64
    );
    assert!(line("strata_last_backup_age_seconds") >= 0.0);
    assert_eq!(line("strata_wal_receiver_up"), 1.0);
    // Registered moments ago: the window promised so far is that short.
    let promised = line("strata_log_retention_promised_seconds");
    assert!((0.0..3600.0).contains(&promised), "{promised}");
    assert!(
        metrics.contains("strata_jobs{state=\"Finished\"} 1"),
        "{metrics}"
    );
    let (status, body) = http_get(server.port, "/healthz");
    assert!(
        status.contains("200") && body.trim() == "ok",
        "{status} {body}"
    );

    let (ok, out, err) = server.stop();
    assert!(ok, "serve exited with an error:\n{out}\n{err}");
    assert!(out.contains("registered as instance \"demo\""), "{out}");
    assert!(
        out.contains(key["AccessKeySecret"].as_str().unwrap()),
        "--demo prints the key: {out}"
    );
    assert!(err.contains("sandbox PostgreSQL stopped"), "{err}");
    assert!(out.contains("its first backup starts now"), "{out}");
    // The SDK hint installs what it needs into a venv of its own.
    assert!(
        out.contains("python3 -m venv strata-sdk && strata-sdk/bin/pip install alibabacloud-rds20140815 alibabacloud-tea-openapi"),
        "{out}"
    );
    let pid_file = data.join("demo/pgdata/postmaster.pid");
    assert!(!pid_file.exists(), "the sandbox still runs");

    // A second start reuses the sandbox and the key, creating no other.
    let server = Server::start(&strata, &["--demo"]);
    wait_for("the sandbox to run again", 60, || pid_file.exists());
    let keys: Vec<serde_json::Value> =
        serde_json::from_str(&strata.ok(&["key", "list", "--json"])).unwrap();
    assert_eq!(keys.len(), 1);
    let (ok, out, err) = server.stop();
    assert!(ok, "{out}\n{err}");
    assert!(!out.contains("AccessKey created"), "{out}");
    // No backup starts on a restart: it says what the sandbox has instead.
    let sets = strata.backups("demo").len();
    assert!(!out.contains("first backup starts now"), "{out}");
    assert!(
        out.contains(&format!(
            "it has {sets} backup set(s), the newest finished "
        )),
        "{out}"
    );
    assert_eq!(
        strata
            .backups("demo")
            .iter()
            .filter(|b| b["mode"] == "Automated")
            .count(),
        1,
        "the restart started no automatic backup"
    );
}

#[test]
fn keys_are_created_listed_and_deleted_without_showing_secrets() {
    let strata = Strata::new("keys");
    let out = strata.ok(&["key", "create", "--read-only", "--json"]);
    let pair: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        pair.keys().collect::<Vec<_>>(),
        ["AccessKeyId", "AccessKeySecret"]
    );
    let id = pair["AccessKeyId"].as_str().unwrap();
    let secret = pair["AccessKeySecret"].as_str().unwrap();
    let list = strata.ok(&["key", "list", "--json"]);
    assert!(list.contains(id) && !list.contains(secret), "{list}");
    assert!(list.contains("\"read_only\": true"), "{list}");
    let table = strata.ok(&["key", "list"]);
    assert!(table.contains(id) && table.contains("read-only") && !table.contains(secret));
    strata.ok(&["key", "delete", id]);
    assert!(!strata.ok(&["key", "list"]).contains(id));
    assert!(strata
        .fails(&["key", "delete", id])
        .contains("no AccessKey"));
}

#[test]
fn serves_https_with_a_configured_certificate() {
    let strata = Strata::new("tls");
    let cert = strata.dir.join("server.crt");
    let key = strata.dir.join("server.key");
    let gen = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(&strata.config)
        .unwrap();
    writeln!(
        config,
        "[server]\ntls_cert = {:?}\ntls_key = {:?}",
        cert.display().to_string(),
        key.display().to_string()
    )
    .unwrap();
    drop(config);
    let server = Server::start(&strata, &[]);
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .arg(format!("https://127.0.0.1:{}/healthz", server.port))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP on the TLS port gets no answer.
    let plain = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/healthz", server.port))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "ok");
    let (ok, out, err) = server.stop();
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("https://"), "{out}");
}

/// The drill of set `backup` as `DescribeBackups` reports it, once it ended.
fn finished_drill(strata: &Strata, port: u16, id: &str, backup: &str) -> Option<serde_json::Value> {
    let answer = signed_call(
        strata,
        port,
        &[
            ("Action", "DescribeBackups"),
            ("DBInstanceId", id),
            ("BackupId", backup),
        ],
    );
    let item = answer["Items"]["Backup"][0].clone();
    matches!(
        item["StrataDrillStatus"].as_str(),
        Some("Passed" | "Failed")
    )
    .then_some(item)
}

#[test]
fn a_backup_taken_with_the_cli_beside_the_service_is_drilled() {
    let pg = Cluster::start_default(15);
    pg.psql(
        "postgres",
        "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept SELECT generate_series(1, 100)",
    );
    let strata = Strata::new("cli-drill");
    let id = "cli-drill";
    strata.add_instance(id, &pg);
    let server = Server::start(&strata, &[]);
    // The service's own first backup ends (and is drilled as it ends)
    // before the CLI takes one: two backups of an instance never overlap.
    wait_for("the first automatic backup", 120, || {
        strata.backups(id).iter().any(|b| b["status"] == "Success")
    });
    let auto = strata.backups(id)[0]["id"].as_str().unwrap().to_string();
    let cli = strata.backup(id);
    assert_ne!(cli, auto);
    let mut drill = None;
    wait_for("the drill of the CLI's backup", 240, || {
        drill = finished_drill(&strata, server.port, id, &cli);
        drill.is_some()
    });
    let drill = drill.unwrap();
    assert_eq!(drill["StrataDrillStatus"], "Passed", "{drill}");
    let message = drill["StrataDrillMessage"].as_str().unwrap();
    assert!(message.contains("pg_amcheck clean"), "{message}");
    let mut first = None;
    wait_for("the drill of the automatic backup", 240, || {
        first = finished_drill(&strata, server.port, id, &auto);
        first.is_some()
    });
    assert_eq!(first.unwrap()["StrataDrillStatus"], "Passed");
    let (ok, out, err) = server.stop();
    assert!(ok, "{out}\n{err}");
}

/// One instance's value of metric `name` in a `/metrics` answer.
fn metric(metrics: &str, name: &str, id: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{instance=\"{id}\"}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_server_that_goes_away_shows_as_unreachable_with_the_reason_and_since_when() {
    let mut pg = Cluster::start_default(15);
    let strata = Strata::with_config("gone", "", "[drills]\nenabled = false\n");
    let id = "gone";
    strata.add_instance(id, &pg);
    let server = Server::start(&strata, &[]);
    let describe = || {
        let answer = signed_call(
            &strata,
            server.port,
            &[
                ("Action", "DescribeDBInstanceAttribute"),
                ("DBInstanceId", id),
            ],
        );
        answer["Items"]["DBInstanceAttribute"][0].clone()
    };
    let metrics = || http_get(server.port, "/metrics").1;
    wait_for("the WAL receiver to stream", 120, || {
        describe()["StrataWalReceiverState"] == "Streaming"
            && metric(&metrics(), "strata_wal_receiver_up", id) == Some(1.0)
    });
    let up = describe();
    assert_eq!(up["DBInstanceStatus"], "Running", "{up}");
    assert_eq!(up["StrataUnreachableSince"], "", "{up}");
    assert_eq!(
        metric(&metrics(), "strata_instance_unreachable_seconds", id),
        Some(0.0)
    );

    let stopped_at = chrono::Utc::now();
    pg.stop();
    // The stream breaks at once; the receiver then retries with a pause
    // that grows up to a minute: its first retry already tells.
    let mut gone = serde_json::Value::Null;
    wait_for("the instance to show as unreachable", 120, || {
        gone = describe();
        gone["DBInstanceStatus"] == "Unreachable"
    });
    let reason = gone["StrataUnreachableReason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("instance {id}")) && reason.contains("127.0.0.1"),
        "the reason names the server: {gone}"
    );
    let since =
        chrono::DateTime::parse_from_rfc3339(gone["StrataUnreachableSince"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{e}: {gone}"));
    // Whole seconds: the stop began within the second `since` names or before it.
    assert!(
        since.timestamp() >= stopped_at.timestamp(),
        "unreachable since {since}, stopped at {stopped_at}"
    );
    assert_eq!(gone["StrataWalReceiverState"], "Failing", "{gone}");
    let failing_since = gone["StrataWalReceiverFailingSince"].as_str().unwrap();
    assert!(!failing_since.is_empty(), "{gone}");
    wait_for("the metrics to say so", 60, || {
        let m = metrics();
        metric(&m, "strata_wal_receiver_up", id) == Some(0.0)
            && metric(&m, "strata_instance_unreachable_seconds", id).is_some_and(|s| s > 0.0)
    });
    // DescribeDBInstances says the same.
    let listed = signed_call(&strata, server.port, &[("Action", "DescribeDBInstances")]);
    assert_eq!(
        common::instances_field(&listed, "DBInstanceStatus")
            .get(id)
            .map(String::as_str),
        Some("Unreachable"),
        "{listed}"
    );
    assert_eq!(
        common::instances_field(&listed, "StrataUnreachableReason")
            .get(id)
            .map(String::as_str),
        Some(reason),
        "{listed}"
    );

    // Back: running and streaming again, and nothing unreachable left.
    pg.start();
    wait_for("the instance to be reached again", 120, || {
        let d = describe();
        d["DBInstanceStatus"] == "Running" && d["StrataWalReceiverState"] == "Streaming"
    });
    let back = describe();
    assert_eq!(back["StrataUnreachableReason"], "", "{back}");
    assert_eq!(back["StrataWalReceiverFailingSince"], "", "{back}");
    wait_for("the metrics to say so", 60, || {
        let m = metrics();
        metric(&m, "strata_wal_receiver_up", id) == Some(1.0)
            && metric(&m, "strata_instance_unreachable_seconds", id) == Some(0.0)
    });
    let (ok, out, err) = server.stop();
    assert!(ok, "{out}\n{err}");
}
