//! Snapshot backups as the service runs them on its own, on real parts: a PostgreSQL 15
//! cluster on a loop-mounted XFS (`reflink=1`), the agent served in-process, a local
//! repository, the scheduler walked through days with a manual clock. With the policy's
//! method `Snapshot` (RDS's `Category` `Flash`) the first backup and the one of the next window
//! are snapshots, each uploaded into the repository in the background; with one snapshot kept
//! on the host (`snapshot_keep_local = 1`) retention deletes the older ones there once
//! uploaded, and the oldest, now only in the repository, restores equal to the source at its
//! backup point. A snapshot whose upload failed is uploaded again by the next retention round.
//! With a `BackupInterval`, the scheduler takes a snapshot every interval on the backup days.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use strata_agent::{Agent, AgentKey, FreeFloor, Layout};
use strata_catalog::{
    BackupId, BackupMethod, BackupMode, BackupSet, BackupStatus, Catalog, Instance, JobKind,
    JobState, SqliteCatalog, SslMode,
};
use strata_engine::{
    BackupOptions, Engine, EngineSettings, NoProgress, RecoveryTarget, RestoreOptions, StartOptions,
};
use strata_repo::{LocalStorage, Repository};
use strata_service::{AgentAccess, ManualClock, PolicyChange, Service, ServiceSettings};
use testkit::{Cluster, FsKind, LoopFs};

const ID: &str = "flash";

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Serves `data_dir` on 127.0.0.1 until the returned sender says stop; returns how to reach it.
async fn start_agent(data_dir: &Path) -> (AgentAccess, PathBuf, tokio::sync::watch::Sender<bool>) {
    let snapshot_dir = data_dir.parent().unwrap().join("strata-snapshots");
    let layout = Layout {
        data_dir: data_dir.to_path_buf(),
        snapshot_dir: snapshot_dir.clone(),
        clone_dir: None,
    };
    let key = AgentKey::generate();
    let agent = Agent::start(layout, key.clone(), FreeFloor::Percent(5)).expect("agent starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(strata_agent::server::serve(
        listener,
        Arc::new(agent),
        None,
        stop_rx,
    ));
    let access = AgentAccess {
        url: format!("http://{addr}"),
        key,
        ca_file: None,
    };
    (access, snapshot_dir, stop)
}

/// Every row of the pgbench tables and the ledger.
fn digest(c: &Cluster) -> String {
    c.psql(
        "postgres",
        "SELECT md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts
         UNION ALL SELECT md5(coalesce(string_agg(id::text || ':' || note, ',' ORDER BY id), '')) FROM ledger",
    )
}

fn set(svc: &Service, id: &BackupId) -> BackupSet {
    svc.engine().catalog().get_backup(id).unwrap()
}

/// Waits until no backup of the instance runs; returns its sets, oldest first.
async fn settle(svc: &Service) -> Vec<BackupSet> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut sets = svc.engine().catalog().list_backups(ID).unwrap();
        if svc.running_backup_job(ID).is_none()
            && sets.iter().all(|b| b.status != BackupStatus::Running)
        {
            sets.sort_by_key(|b| b.started_at);
            return sets;
        }
        assert!(Instant::now() < deadline, "backups still running: {sets:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_uploaded(svc: &Service, id: &BackupId) -> BackupSet {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let b = set(svc, id);
        if b.snapshot_uploaded {
            return b;
        }
        let jobs = svc.jobs(Some(ID)).unwrap();
        assert!(
            Instant::now() < deadline,
            "{id} not uploaded: {b:?}\n{jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The states of the upload jobs of set `id`, oldest first.
fn uploads(svc: &Service, id: &BackupId) -> Vec<JobState> {
    svc.jobs(Some(ID))
        .unwrap()
        .into_iter()
        .filter(|j| j.kind == JobKind::SnapshotUpload && j.backup_id.as_ref() == Some(id))
        .map(|j| j.state)
        .collect()
}

/// A new snapshot set the scheduler took in this round.
async fn new_snapshot(svc: &Service, before: usize) -> BackupSet {
    let sets = settle(svc).await;
    assert_eq!(sets.len(), before + 1, "{sets:?}");
    let b = sets.last().unwrap().clone();
    assert_eq!(
        (b.status, b.mode, b.method),
        (
            BackupStatus::Success,
            BackupMode::Automated,
            BackupMethod::Snapshot
        ),
        "{b:?}"
    );
    assert!(b.snapshot_local, "{b:?}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_snapshots_upload_leave_the_host_and_restore_from_the_repository() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let pg = Cluster::builder(15)
        .in_dir(fs.path())
        .conf("max_wal_size = 128MB")
        .conf("min_wal_size = 32MB")
        .start();
    pg.pgbench("postgres", &["-i", "-q", "-s", "1"]);
    pg.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); INSERT INTO ledger VALUES (1, 'before the first snapshot')",
    );
    let (access, snapshot_dir, stop_agent) = start_agent(pg.data_dir()).await;

    let dir = tempfile::tempdir().unwrap();
    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap());
    let repo = Repository::open_or_init(Arc::new(
        LocalStorage::new(dir.path().join("repo")).unwrap(),
    ))
    .unwrap();
    let engine = Engine::new(catalog, repo, EngineSettings::default());
    // 2027-01-06 is a Wednesday, in the future of every backup taken here.
    let clock = Arc::new(ManualClock::new(at("2027-01-06T10:00:00Z")));
    let settings = ServiceSettings {
        instances_dir: dir.path().join("instances"),
        drills: false,
        snapshot_keep_local: 1,
        ..Default::default()
    };
    let svc = Service::new(engine, clock.clone(), settings);
    svc.register_instance(
        Instance::new(ID, pg.host(), pg.port(), "postgres", SslMode::Disable),
        Some(access),
    )
    .await
    .unwrap();
    let p = svc
        .modify_policy(
            ID,
            PolicyChange {
                backup_method: Some(BackupMethod::Snapshot),
                backup_days: Some("Thursday,Monday".into()),
                backup_window: Some("02:00Z-03:00Z".into()),
                // The clock runs weeks ahead of the backups' real times.
                backup_retention_days: Some("730".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(p.backup_method, BackupMethod::Snapshot);

    // The first backup: a snapshot, uploaded in the background.
    let d1 = digest(&pg);
    svc.tick().await;
    let first = new_snapshot(&svc, 0).await;
    let first = wait_uploaded(&svc, &first.id).await;
    assert!(first.snapshot_local && first.stored_bytes > 0, "{first:?}");
    assert!(snapshot_dir.join(first.id.as_str()).is_dir());

    // Thursday's window: the second snapshot, uploaded too; the first stays on the host
    // until the next retention round.
    pg.psql(
        "postgres",
        "INSERT INTO ledger VALUES (2, 'after the first snapshot')",
    );
    pg.pgbench("postgres", &["-n", "-c", "1", "-t", "50"]);
    assert_ne!(digest(&pg), d1);
    clock.set(at("2027-01-07T02:00:00Z"));
    svc.tick().await;
    let second = new_snapshot(&svc, 1).await;
    wait_uploaded(&svc, &second.id).await;
    assert!(set(&svc, &first.id).snapshot_local);

    // A third snapshot whose upload failed (taken and its upload recorded as failed here, as
    // when the agent was away during the upload).
    let third = svc
        .engine()
        .backup(
            ID,
            &BackupOptions {
                mode: BackupMode::Manual,
                method: BackupMethod::Snapshot,
                ..Default::default()
            },
            &NoProgress,
        )
        .await
        .unwrap();
    let catalog = svc.engine().catalog();
    let mut failed = catalog
        .create_job(JobKind::SnapshotUpload, Some(ID))
        .unwrap();
    failed.backup_id = Some(third.id.clone());
    failed.state = JobState::Failed;
    failed.finished_at = Some(Utc::now());
    failed.error = Some("agent unreachable".into());
    catalog.update_job(&failed).unwrap();
    assert!(!set(&svc, &third.id).snapshot_uploaded);

    // The next retention round: the two uploaded snapshots past the newest leave the host;
    // the third is uploaded again.
    clock.set(at("2027-01-07T02:06:00Z"));
    svc.tick().await;
    for old in [&first, &second] {
        let b = set(&svc, &old.id);
        assert!(!b.snapshot_local && b.snapshot_uploaded, "{b:?}");
        assert_eq!(b.snapshot_bytes, None);
        assert!(!snapshot_dir.join(old.id.as_str()).exists());
    }
    let third = wait_uploaded(&svc, &third.id).await;
    assert!(third.snapshot_local && snapshot_dir.join(third.id.as_str()).is_dir());
    assert_eq!(
        uploads(&svc, &third.id),
        [JobState::Failed, JobState::Finished]
    );

    // The first set, only in the repository now, restores equal to the source at its
    // backup point.
    // In a directory the postgres OS user may use (the server's socket goes next to it).
    let restore_parent = testkit::temp_dir("strata-flash-restore-");
    let target = restore_parent.join("restored");
    let port = testkit::free_port();
    let engine = svc.engine().clone();
    let id = first.id.clone();
    let restore_dir = target.clone();
    tokio::task::spawn_blocking(move || {
        engine.restore(
            ID,
            &RestoreOptions {
                target_dir: restore_dir,
                delta: false,
                backup_id: Some(id),
                target: RecoveryTarget::Immediate,
                start: Some(StartOptions {
                    port,
                    ..Default::default()
                }),
                job_id: None,
                index: None,
            },
            &NoProgress,
        )
    })
    .await
    .unwrap()
    .expect("the restore of the first snapshot from the repository");
    let restored = Cluster::adopt(15, target, port);
    assert_eq!(digest(&restored), d1);
    assert_eq!(
        restored.psql(
            "postgres",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger"
        ),
        "1"
    );
    drop(restored);
    let _ = std::fs::remove_dir_all(&restore_parent);

    svc.shutdown().await;
    let _ = stop_agent.send(true);
}

/// High-frequency snapshots (`BackupInterval`): on the backup days one every interval from
/// midnight UTC besides the window's, none on the other days, each stamped with the regular
/// rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_frequency_snapshots_run_every_interval_on_the_backup_days() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let pg = Cluster::builder(15).in_dir(fs.path()).start();
    let (access, _snapshot_dir, stop_agent) = start_agent(pg.data_dir()).await;
    let dir = tempfile::tempdir().unwrap();
    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap());
    let repo = Repository::open_or_init(Arc::new(
        LocalStorage::new(dir.path().join("repo")).unwrap(),
    ))
    .unwrap();
    let engine = Engine::new(catalog, repo, EngineSettings::default());
    // 2027-01-06 is a Wednesday, in the future of every backup taken here.
    let clock = Arc::new(ManualClock::new(at("2027-01-06T10:00:00Z")));
    let settings = ServiceSettings {
        instances_dir: dir.path().join("instances"),
        drills: false,
        // Retention's high-frequency thinning would judge these sets by their real times,
        // weeks before the clock: it runs only in the first round here.
        retention_interval: chrono::Duration::days(30),
        ..Default::default()
    };
    let svc = Service::new(engine, clock.clone(), settings);
    svc.register_instance(
        Instance::new(ID, pg.host(), pg.port(), "postgres", SslMode::Disable),
        Some(access),
    )
    .await
    .unwrap();
    // The interval needs snapshots: refused with physical backups, taken with the method.
    let physical = svc
        .modify_policy(
            ID,
            PolicyChange {
                backup_interval_minutes: Some(Some(240)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        physical.to_string().contains("BackupInterval"),
        "{physical}"
    );
    svc.modify_policy(
        ID,
        PolicyChange {
            backup_method: Some(BackupMethod::Snapshot),
            backup_interval_minutes: Some(Some(240)),
            backup_days: Some("Thursday,Monday".into()),
            backup_window: Some("02:00Z-03:00Z".into()),
            // The clock runs weeks ahead of the backups' real times.
            backup_retention_days: Some("730".into()),
            log_backup_enabled: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    svc.tick().await;
    let first = new_snapshot(&svc, 0).await;
    wait_uploaded(&svc, &first.id).await;
    let mut taken = 1;
    // Thursday: midnight, the window at 02:00, 04:00; a round between slots takes nothing.
    for (now, due) in [
        ("2027-01-06T23:00:00Z", false),
        ("2027-01-07T00:00:00Z", true),
        ("2027-01-07T00:10:00Z", false),
        ("2027-01-07T02:00:00Z", true),
        ("2027-01-07T03:59:00Z", false),
        ("2027-01-07T04:00:00Z", true),
        // Friday is no backup day: its first round makes up Thursday's missed slots once.
        ("2027-01-08T04:00:00Z", true),
        ("2027-01-08T12:00:00Z", false),
    ] {
        clock.set(at(now));
        svc.tick().await;
        if due {
            let b = new_snapshot(&svc, taken).await;
            wait_uploaded(&svc, &b.id).await;
            let stamp = b.taken_under.clone().map(|t| (t.rule, t.retention_days));
            assert_eq!(stamp, Some(("regular".into(), 730)), "{now}");
            taken += 1;
        } else {
            assert_eq!(settle(&svc).await.len(), taken, "{now}");
        }
    }
    assert_eq!(
        svc.policy(ID).unwrap().last_auto_slot,
        Some(at("2027-01-07T20:00:00Z"))
    );

    svc.shutdown().await;
    let _ = stop_agent.send(true);
}
