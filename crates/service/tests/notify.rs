//! Notifications end to end: a real PostgreSQL 15 server registered, then
//! stopped; the backup that fails, the WAL receiver that fails (and streams
//! again once the server is back) and the missing backups the dead man's
//! switch notices reach a webhook receiver on 127.0.0.1, signed, once per
//! occurrence, and each delivery is recorded as a `notify` job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use strata_catalog::{
    BackupMethod, BackupMode, BackupStatus, Catalog, Instance, JobKind, JobState, SqliteCatalog,
    SslMode,
};
use strata_engine::{Engine, EngineSettings};
use strata_notify::{Notifier, Route, Sink, WebhookSink, WebhookSpec};
use strata_repo::{LocalStorage, Repository};
use strata_service::{ManualClock, NotifySettings, Service, ServiceSettings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A request body and its timestamp and signature headers.
type Received = (Vec<u8>, String, String);

/// An HTTP receiver answering 200 to every POST; returns its URL and what
/// it received.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let (mut len, mut ts, mut sig) = (0usize, String::new(), String::new());
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => len = value.trim().parse().unwrap(),
                        "x-strata-timestamp" => ts = value.trim().into(),
                        "x-strata-signature" => sig = value.trim().into(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).await.unwrap();
            log.lock().unwrap().push((body, ts, sig));
            let mut stream = reader.into_inner();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    (url, seen)
}

/// The bodies received so far, parsed.
fn bodies(seen: &Mutex<Vec<Received>>) -> Vec<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(b, _, _)| serde_json::from_slice(b).unwrap())
        .collect()
}

fn of_kind(seen: &Mutex<Vec<Received>>, kind: &str) -> Vec<serde_json::Value> {
    bodies(seen)
        .into_iter()
        .filter(|b| b["kind"] == kind)
        .collect()
}

/// Waits (up to two minutes) until `done` holds.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within two minutes");
}

/// The `notify` jobs of event `kind` that ended.
fn deliveries(catalog: &dyn Catalog, kind: &str) -> Vec<strata_catalog::Job> {
    catalog
        .list_jobs(None)
        .unwrap()
        .into_iter()
        .filter(|j| j.kind == JobKind::Notify && j.state.is_terminal())
        .filter(|j| j.detail.starts_with(&format!("{kind} to ")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_an_overdue_backup_reach_the_webhook_once() {
    let mut cluster = testkit::Cluster::start_default(15);
    let dir = tempfile::tempdir().unwrap();
    let (url, seen) = receiver().await;
    let secret = b"webhook secret".to_vec();
    let sink = WebhookSink::new(WebhookSpec {
        name: "ops".into(),
        url,
        secret: secret.clone(),
        route: Route {
            instances: vec!["pg".into()],
            events: Vec::new(),
        },
        retries: 2,
        backoff: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&dir.path().join("c.db")).unwrap());
    let repo = Repository::open_or_init(Arc::new(
        LocalStorage::new(dir.path().join("repo")).unwrap(),
    ))
    .unwrap();
    let quick_retries = EngineSettings {
        wal_retry_max: Duration::from_secs(2),
        ..EngineSettings::default()
    };
    let engine = Engine::new(catalog.clone(), repo, quick_retries);
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let settings = ServiceSettings {
        instances_dir: dir.path().join("instances"),
        drills: false,
        receiver_backoff_max: Duration::from_secs(2),
        notify: NotifySettings {
            notifier: Notifier::new(vec![Sink::Webhook(sink)]).unwrap(),
            backup_overdue: Some(chrono::Duration::hours(6)),
            // Announced at the first failure the round sees.
            wal_failing_after: Duration::ZERO,
        },
        ..Default::default()
    };
    let svc = Service::new(engine, clock.clone(), settings);
    svc.register_instance(
        Instance::new(
            "pg",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();

    // The first backup succeeds: nothing to tell.
    svc.tick().await;
    wait_for("the first backup", || {
        svc.running_backup_job("pg").is_none()
            && catalog
                .list_backups("pg")
                .unwrap()
                .iter()
                .any(|b| b.status == BackupStatus::Success)
    })
    .await;
    svc.tick().await;

    // The server goes away; a manual backup fails.
    cluster.stop();
    let job = svc
        .start_backup("pg", BackupMode::Manual, BackupMethod::Physical)
        .unwrap();
    wait_for("the backup to fail", || {
        catalog.get_job(job.id).unwrap().state == JobState::Failed
    })
    .await;
    svc.tick().await;
    wait_for("the backup-failed delivery", || {
        !of_kind(&seen, "backup-failed").is_empty()
    })
    .await;
    let failed = of_kind(&seen, "backup-failed");
    assert_eq!(failed[0]["instance"], "pg");
    assert_eq!(failed[0]["details"]["job_id"], job.id.get());
    assert!(
        failed[0]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("backup job {} of instance pg failed", job.id)),
        "{}",
        failed[0]
    );
    {
        let seen = seen.lock().unwrap();
        let (body, ts, sig) = &seen[0];
        let ts: i64 = ts.parse().unwrap();
        assert!(strata_notify::verify(&secret, ts, body, sig));
        assert!(!strata_notify::verify(b"not the secret", ts, body, sig));
    }

    // Later rounds announce nothing new: one delivery per occurrence.
    for _ in 0..3 {
        svc.tick().await;
    }
    wait_for("the recorded delivery", || {
        deliveries(catalog.as_ref(), "backup-failed").len() == 1
    })
    .await;
    assert_eq!(of_kind(&seen, "backup-failed").len(), 1);

    // The WAL receiver lost its server too: announced once while it fails.
    for _ in 0..1200 {
        svc.tick().await;
        if !of_kind(&seen, "wal-receiver-failing").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failing = of_kind(&seen, "wal-receiver-failing");
    assert_eq!(failing.len(), 1, "{failing:?}");
    assert_eq!(failing[0]["instance"], "pg");
    assert!(!failing[0]["details"]["error"].as_str().unwrap().is_empty());
    svc.tick().await;
    svc.tick().await;

    // The server is back and writes WAL: the receiver streams again.
    cluster.start();
    for _ in 0..1200 {
        svc.tick().await;
        if !of_kind(&seen, "wal-receiver-recovered").is_empty() {
            break;
        }
        cluster.psql(
            "postgres",
            "CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1)",
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(of_kind(&seen, "wal-receiver-recovered").len(), 1);
    assert_eq!(of_kind(&seen, "wal-receiver-failing").len(), 1);

    // Seven hours on, the last success is too old: the dead man's switch
    // fires once, though nothing runs.
    clock.set(Utc::now() + chrono::Duration::hours(7));
    svc.tick().await;
    wait_for("the backup-overdue delivery", || {
        !of_kind(&seen, "backup-overdue").is_empty()
    })
    .await;
    svc.tick().await;
    svc.tick().await;
    wait_for("the overdue delivery recorded", || {
        deliveries(catalog.as_ref(), "backup-overdue").len() == 1
    })
    .await;
    let overdue = of_kind(&seen, "backup-overdue");
    assert_eq!(overdue.len(), 1, "{overdue:?}");
    assert_eq!(overdue[0]["details"]["hours"], 6);

    let jobs = [
        deliveries(catalog.as_ref(), "backup-failed"),
        deliveries(catalog.as_ref(), "backup-overdue"),
    ]
    .concat();
    let details: Vec<&str> = jobs.iter().map(|j| j.detail.as_str()).collect();
    assert!(
        jobs.iter().all(|j| j.state == JobState::Finished),
        "{jobs:?}"
    );
    assert!(jobs.iter().all(|j| j.instance_id.as_deref() == Some("pg")));
    assert!(
        details.contains(&"backup-failed to webhook ops: HTTP 200 after 1 attempt(s)"),
        "{details:?}"
    );
    assert!(
        details.contains(&"backup-overdue to webhook ops: HTTP 200 after 1 attempt(s)"),
        "{details:?}"
    );
    svc.shutdown().await;
}
