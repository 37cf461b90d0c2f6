//! Notifications end to end: a real PostgreSQL 15 server registered, then
//! stopped; the backup that fails, the WAL receiver that fails (and streams
//! again once the server is back) and the missing backups the dead man's
//! switch notices reach a webhook receiver on 127.0.0.1, signed, once per
//! occurrence, and each delivery is recorded as a `notify` job. A second
//! server's failed restore drill, storage above its free quota, failing
//! cross-region copies and a recovery window shorter than promised reach the
//! sinks routed to its instance or to every instance, and no other; its WAL
//! receiver failing for less than the threshold is not announced.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use strata_catalog::{
    BackupMethod, BackupMode, BackupStatus, Catalog, Instance, JobKind, JobState, SqliteCatalog,
    SslMode,
};
use strata_engine::{Engine, EngineSettings};
use strata_notify::{Notifier, Route, Sink, WebhookSink, WebhookSpec};
use strata_repo::storage::{ObjectSize, StorageResult};
use strata_repo::{LocalStorage, Repository, Storage, StorageError};
use strata_service::{
    CrossPolicyChange, FreeQuota, ManualClock, NotifySettings, RegionTarget, Regions, Service,
    ServiceSettings, UsageSettings,
};
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
            wal_lag_bytes: None,
            window_short_by: None,
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

/// A cross-region target whose manifest writes fail while `refuse` is set,
/// so copies cannot commit.
#[derive(Debug)]
struct RefusingManifests {
    inner: LocalStorage,
    refuse: AtomicBool,
}

impl Storage for RefusingManifests {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        if key.ends_with(".manifest") && self.refuse.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                key: key.to_string(),
                source: std::io::Error::other("injected: the target refuses manifests"),
            });
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        self.inner.list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.inner.list_sizes(prefix)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.inner.delete(key)
    }
    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.inner.exists(key)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A webhook sink named `name` over a fresh receiver, with its own secret.
async fn routed_sink(
    name: &str,
    instances: &[&str],
    events: &[&str],
) -> (Sink, Vec<u8>, Arc<Mutex<Vec<Received>>>) {
    let (url, seen) = receiver().await;
    let secret = format!("secret of {name}").into_bytes();
    let sink = WebhookSink::new(WebhookSpec {
        name: name.into(),
        url,
        secret: secret.clone(),
        route: Route {
            instances: instances.iter().map(|i| i.to_string()).collect(),
            events: events.iter().map(|e| e.parse().unwrap()).collect(),
        },
        retries: 2,
        backoff: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    (Sink::Webhook(sink), secret, seen)
}

/// Every body `seen` received carries a valid signature under `secret` and
/// none under `other`; returns the kinds, in arrival order.
fn signed_kinds(seen: &Mutex<Vec<Received>>, secret: &[u8], other: &[u8]) -> Vec<String> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .map(|(body, ts, sig)| {
            let ts: i64 = ts.parse().unwrap();
            assert!(strata_notify::verify(secret, ts, body, sig), "{sig}");
            assert!(!strata_notify::verify(other, ts, body, sig));
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            v["kind"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_the_quota_copies_and_a_short_window_reach_their_routed_sinks_once() {
    let mut cluster = testkit::Cluster::start_default(15);
    let dir = tempfile::tempdir().unwrap();
    let (pager, pager_secret, pager_seen) = routed_sink("pager", &["pg"], &[]).await;
    let (global, global_secret, global_seen) = routed_sink(
        "global",
        &[],
        &["storage-over-quota", "cross-region-copy-failing"],
    )
    .await;
    let (elsewhere, _, elsewhere_seen) = routed_sink("elsewhere", &["other"], &[]).await;

    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&dir.path().join("c.db")).unwrap());
    let repo = Repository::open_or_init(Arc::new(
        LocalStorage::new(dir.path().join("repo")).unwrap(),
    ))
    .unwrap();
    let engine = Engine::new(catalog.clone(), repo, EngineSettings::default());
    let target = Arc::new(RefusingManifests {
        inner: LocalStorage::new(dir.path().join("dr")).unwrap(),
        refuse: AtomicBool::new(true),
    });
    let regions = Regions::new(
        "home",
        vec![RegionTarget::new(
            "dr",
            target.clone() as Arc<dyn Storage>,
            None,
            1,
        )],
    );
    // The drill's scratch server may only use a port held here: it fails.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let settings = ServiceSettings {
        instances_dir: dir.path().join("instances"),
        drills: true,
        local_ports: (port, port),
        usage: UsageSettings {
            default_quota: FreeQuota::Bytes(1),
            ..UsageSettings::default()
        },
        notify: NotifySettings {
            notifier: Notifier::new(vec![pager, global, elsewhere]).unwrap(),
            wal_lag_bytes: None,
            window_short_by: Some(chrono::Duration::hours(1)),
            ..NotifySettings::default()
        },
        ..Default::default()
    };
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let svc = Service::with_regions(engine, clock.clone(), settings, regions);
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
    svc.modify_cross_policy(
        "pg",
        CrossPolicyChange {
            region: Some("dr".into()),
            backup_enabled: Some(true),
            log_backup_enabled: Some(false),
            retention_days: Some(7),
        },
    )
    .unwrap();

    // The first backup: its drill fails, it is above the one-byte quota and
    // its copy cannot commit.
    let expected = [
        "drill-failed",
        "storage-over-quota",
        "cross-region-copy-failing",
    ];
    for _ in 0..1200 {
        svc.tick().await;
        let kinds = signed_kinds(&pager_seen, &pager_secret, &global_secret);
        if expected.iter().all(|k| kinds.iter().any(|x| x == k)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More rounds while all three still hold announce nothing new.
    for _ in 0..5 {
        svc.tick().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("the deliveries recorded", || {
        deliveries(catalog.as_ref(), "cross-region-copy-failing").len() == 2
            && deliveries(catalog.as_ref(), "storage-over-quota").len() == 2
            && deliveries(catalog.as_ref(), "drill-failed").len() == 1
    })
    .await;
    let mut pager_kinds = signed_kinds(&pager_seen, &pager_secret, &global_secret);
    pager_kinds.sort();
    assert_eq!(
        pager_kinds,
        [
            "cross-region-copy-failing",
            "drill-failed",
            "storage-over-quota"
        ],
        "the instance's sink: each event once"
    );
    let mut global_kinds = signed_kinds(&global_seen, &global_secret, &pager_secret);
    global_kinds.sort();
    assert_eq!(
        global_kinds,
        ["cross-region-copy-failing", "storage-over-quota"],
        "every instance's sink: only its kinds, once"
    );
    assert!(
        elsewhere_seen.lock().unwrap().is_empty(),
        "routed to another instance"
    );

    let drill = &of_kind(&pager_seen, "drill-failed")[0];
    let drill_job = catalog
        .get_job(strata_catalog::JobId::new(
            drill["details"]["job_id"].as_i64().unwrap(),
        ))
        .unwrap();
    assert_eq!(drill_job.kind, JobKind::Drill);
    assert_eq!(drill_job.state, JobState::Failed);
    assert_eq!(drill["instance"], "pg");
    assert!(
        drill["details"]["error"]
            .as_str()
            .unwrap()
            .contains("no free port"),
        "{drill}"
    );
    let sets = catalog.list_backups("pg").unwrap();
    assert_eq!(
        drill["details"]["backup_id"].as_str(),
        drill_job.backup_id.as_deref()
    );
    assert!(sets
        .iter()
        .any(|b| Some(b.id.as_ref()) == drill_job.backup_id.as_deref()));

    let quota = &of_kind(&global_seen, "storage-over-quota")[0];
    assert_eq!(quota["instance"], "pg");
    assert_eq!(quota["details"]["quota_bytes"], 1);
    let stored = quota["details"]["stored_bytes"].as_u64().unwrap();
    assert!(stored > 1, "{quota}");
    assert_eq!(quota["details"]["excess_bytes"], stored - 1);
    assert_eq!(of_kind(&pager_seen, "storage-over-quota")[0], *quota);

    let copy = &of_kind(&global_seen, "cross-region-copy-failing")[0];
    assert_eq!(copy["instance"], "pg");
    assert!(
        copy["details"]["error"]
            .as_str()
            .unwrap()
            .contains("refuses manifests"),
        "{copy}"
    );
    let copy_job = catalog
        .get_job(strata_catalog::JobId::new(
            copy["details"]["job_id"].as_i64().unwrap(),
        ))
        .unwrap();
    assert_eq!(
        (copy_job.kind, copy_job.state),
        (JobKind::CrossCopy, JobState::Failed)
    );

    // The target takes manifests again: a copy succeeds, the condition
    // ends without a message of its own.
    target.refuse.store(false, Ordering::SeqCst);
    for _ in 0..1200 {
        svc.tick().await;
        let copied = catalog
            .newest_ended_job("pg", JobKind::CrossCopy)
            .unwrap()
            .is_some_and(|j| j.state == JobState::Finished);
        if copied {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        catalog
            .newest_ended_job("pg", JobKind::CrossCopy)
            .unwrap()
            .map(|j| j.state),
        Some(JobState::Finished),
        "a copy succeeded once the target took manifests"
    );
    for _ in 0..3 {
        svc.tick().await;
    }
    assert_eq!(of_kind(&global_seen, "cross-region-copy-failing").len(), 1);
    assert_eq!(of_kind(&pager_seen, "cross-region-copy-failing").len(), 1);

    let jobs = deliveries(catalog.as_ref(), "drill-failed");
    assert_eq!(jobs[0].state, JobState::Finished);
    assert_eq!(
        jobs[0].detail,
        "drill-failed to webhook pager: HTTP 200 after 1 attempt(s)"
    );

    // Three hours on by the service clock, the window still begins at the
    // first backup and ends at the newest WAL: shorter than the three hours
    // since registration promise, by more than the hour allowed. Only the
    // instance's sink takes that kind.
    let window_events = |seen: &Mutex<Vec<Received>>| of_kind(seen, "recovery-window-short");
    clock.set(Utc::now() + chrono::Duration::hours(3));
    svc.tick().await;
    wait_for("the recovery-window-short delivery", || {
        !window_events(&pager_seen).is_empty()
    })
    .await;
    for _ in 0..3 {
        svc.tick().await;
    }
    let short = window_events(&pager_seen);
    assert_eq!(short.len(), 1, "{short:?}");
    assert_eq!(short[0]["instance"], "pg");
    let promised = short[0]["details"]["promised_seconds"].as_i64().unwrap();
    let short_by = short[0]["details"]["short_by_seconds"].as_i64().unwrap();
    assert!((3 * 3600..4 * 3600).contains(&promised), "{}", short[0]);
    assert!(short_by > 3600 && short_by <= promised, "{}", short[0]);
    signed_kinds(&pager_seen, &pager_secret, &global_secret);
    assert!(window_events(&global_seen).is_empty());

    // Back to the wall clock the promise is met: the condition ends
    // silently, and the next shortfall is a new occurrence.
    clock.set(Utc::now());
    svc.tick().await;
    svc.tick().await;
    assert_eq!(window_events(&pager_seen).len(), 1);
    clock.set(Utc::now() + chrono::Duration::hours(3));
    svc.tick().await;
    wait_for("the second recovery-window-short delivery", || {
        window_events(&pager_seen).len() == 2
    })
    .await;
    assert!(window_events(&global_seen).is_empty());
    assert!(elsewhere_seen.lock().unwrap().is_empty());

    // The server goes away: the receiver fails, but for less than the five
    // minutes this service waits before announcing it.
    cluster.stop();
    for _ in 0..1200 {
        svc.tick().await;
        if svc.wal_state("pg").unwrap().failing_since.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = svc.wal_state("pg").unwrap();
    assert!(state.failing.is_some(), "{state:?}");
    for _ in 0..5 {
        svc.tick().await;
    }
    assert!(of_kind(&pager_seen, "wal-receiver-failing").is_empty());

    drop(held);
    svc.shutdown().await;
}
