//! The cross-region copier against a real PostgreSQL 15 and a manual clock:
//! backups taken with the policy on are copied with their WAL into the
//! target region's own repository (verified clean there), copies past
//! their retention are deleted from the target with their WAL and its
//! garbage collected, and turning the policy off stops copying.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use strata_catalog::{BackupStatus, Catalog, Instance, SqliteCatalog};
use strata_engine::{Engine, EngineSettings};
use strata_repo::{LocalStorage, Repository, Storage};
use strata_service::{
    CrossPolicyChange, ManualClock, RegionTarget, Regions, Service, ServiceSettings,
};

/// Ticks until `done` holds (the copier runs in the background).
async fn tick_until(svc: &Arc<Service>, what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..600 {
        svc.tick().await;
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within a minute");
}

async fn settle(svc: &Service, id: &str) {
    for _ in 0..600 {
        let sets = svc.engine.catalog.list_backups(id).unwrap();
        if svc.running_backup_job(id).is_none()
            && sets.iter().all(|b| b.status != BackupStatus::Running)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backup of {id} did not finish within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_follow_the_policy_and_their_own_retention() {
    let cluster = testkit::Cluster::start_default(15);
    let dir = tempfile::tempdir().unwrap();
    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap());
    let repo = Repository::open_or_init(Arc::new(
        LocalStorage::new(dir.path().join("repo")).unwrap(),
    ))
    .unwrap();
    let engine = Engine::new(catalog, repo, EngineSettings::default());
    let target_storage: Arc<dyn Storage> =
        Arc::new(LocalStorage::new(dir.path().join("dr")).unwrap());
    let regions = Regions::new(
        "home",
        vec![RegionTarget::new("dr", target_storage.clone(), None, 1)],
    );
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let svc = Service::with_regions(
        engine,
        clock.clone(),
        ServiceSettings {
            instances_dir: dir.path().join("instances"),
            drills: false,
            ..Default::default()
        },
        regions,
    );
    assert_eq!(svc.regions().available(), ["dr"]);
    svc.register_instance(Instance::new(
        "xr",
        cluster.host(),
        cluster.port(),
        "postgres",
        "disable",
    ))
    .await
    .unwrap();
    let p = svc
        .modify_cross_policy(
            "xr",
            CrossPolicyChange {
                region: Some("dr".into()),
                backup_enabled: Some(true),
                log_backup_enabled: Some(true),
                retention_days: Some(7),
            },
        )
        .unwrap();
    assert!(p.backup_enabled && p.log_backup_enabled);

    // The registration's first backup, then a second one: both copied,
    // with the WAL from the first one's start.
    svc.tick().await;
    settle(&svc, "xr").await;
    svc.start_backup("xr", "Manual").unwrap();
    settle(&svc, "xr").await;
    cluster.psql(
        "postgres",
        "CREATE TABLE IF NOT EXISTS xr_t AS SELECT 1 AS a; SELECT pg_switch_wal();",
    );
    let sets = svc.engine.catalog.list_backups("xr").unwrap();
    assert_eq!(sets.len(), 2);
    tick_until(&svc, "two copies and their WAL", || {
        svc.cross_backups("xr").unwrap().len() == 2 && !svc.cross_wal("xr").unwrap().is_empty()
    })
    .await;
    let copies = svc.cross_backups("xr").unwrap();
    assert_eq!(
        copies.iter().map(|c| c.set.id.clone()).collect::<Vec<_>>(),
        sets.iter().map(|b| b.id.clone()).collect::<Vec<_>>()
    );
    assert!(copies[0].id < copies[1].id);
    // The second copy added far less than the first: its blocks were there.
    assert!(
        copies[1].copied_bytes * 4 < copies[0].copied_bytes,
        "{} then {}",
        copies[0].copied_bytes,
        copies[1].copied_bytes
    );
    let target = Repository::open(target_storage.clone()).unwrap();
    assert_eq!(
        target.list_backups("xr").unwrap(),
        sets.iter().map(|b| b.id.clone()).collect::<Vec<_>>()
    );
    let report = target.verify(&|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let first_start = sets[0].start_lsn.unwrap();
    for w in svc.cross_wal("xr").unwrap() {
        assert!(!w.row.partial && w.row.end_lsn > first_start);
        target.read_wal(&w.row.object_key).unwrap();
    }

    // The target stands on its own: a catalog rebuilt from it alone lists
    // both sets.
    let rebuilt = Engine::new(
        Arc::new(SqliteCatalog::open_in_memory().unwrap()),
        target.clone(),
        EngineSettings::default(),
    );
    rebuilt.reindex().unwrap();
    assert_eq!(rebuilt.catalog.list_backups("xr").unwrap().len(), 2);
    assert!(!rebuilt.catalog.list_wal_segments("xr").unwrap().is_empty());

    // Off: a new backup is not copied.
    svc.modify_cross_policy(
        "xr",
        CrossPolicyChange {
            backup_enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    svc.start_backup("xr", "Manual").unwrap();
    settle(&svc, "xr").await;
    for _ in 0..20 {
        svc.tick().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(svc.cross_backups("xr").unwrap().len(), 2);

    // Eight days on, the copies' seven-day retention has passed: copies,
    // their WAL and every pack go from the target.
    clock.set(Utc::now() + chrono::Duration::days(8));
    tick_until(&svc, "copies expiring", || {
        svc.cross_backups("xr").unwrap().is_empty() && svc.cross_wal("xr").unwrap().is_empty()
    })
    .await;
    assert!(target.list_backups("xr").unwrap().is_empty());
    assert!(target.list_wal("xr").unwrap().is_empty());
    assert!(target_storage.list("packs").unwrap().is_empty());
}
