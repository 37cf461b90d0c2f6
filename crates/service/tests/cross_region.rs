//! The cross-region copier against a real PostgreSQL 15 and a manual clock:
//! backups taken with the policy on are copied with their WAL into the
//! target region's own repository (verified clean there), copies past
//! their retention are deleted from the target with their WAL and its
//! garbage collected, a copy whose manifest cannot be written is never
//! listed and is retried, and turning the policy off stops copying. The
//! usage samples' cross-region figure equals the bytes the target directory
//! holds for the instance by the attribution rule of docs/DESIGN.md (its
//! `instances/<id>/` files and the packs its copied manifests reference;
//! `strata-repo.json` and unreferenced packs are nobody's), keeps its last
//! value while the target cannot be reached, and drops when the copies'
//! retention removes them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use strata_catalog::{
    BackupMode, BackupStatus, Catalog, Instance, JobKind, SqliteCatalog, SslMode,
};
use strata_engine::{Engine, EngineSettings};
use strata_repo::storage::{ObjectSize, StorageResult};
use strata_repo::{pack_key, LocalStorage, Repository, Storage, StorageError};
use strata_service::{
    CrossPolicyChange, ManualClock, RegionTarget, Regions, Service, ServiceSettings,
};

/// A target whose manifest writes fail while `refuse` is set (copies
/// cannot commit), and whose listings fail while `unreachable` is set.
#[derive(Debug)]
struct RefusingManifests {
    inner: LocalStorage,
    refuse: AtomicBool,
    unreachable: AtomicBool,
}

impl RefusingManifests {
    fn reach(&self, key: &str) -> StorageResult<()> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                key: key.to_string(),
                source: std::io::Error::other("injected: the target cannot be reached"),
            });
        }
        Ok(())
    }
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
        self.reach(prefix)?;
        self.inner.list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.reach(prefix)?;
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

fn files_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.map(Result::unwrap) {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata().unwrap().len();
            }
        }
    }
    total
}

/// What the target directory `root` holds for `instance` by the rule: its
/// `instances/<id>/` files (record, manifests, WAL, histories) and the pack
/// files its manifests there reference (one instance: no shared packs).
fn attributed_bytes(root: &Path, target: &Repository, instance: &str) -> u64 {
    let mut packs = std::collections::BTreeSet::new();
    for id in target.list_backups(instance).unwrap() {
        let m = target.read_manifest(instance, &id).unwrap();
        packs.extend(
            m.all_files()
                .flat_map(|f| f.blocks.iter().map(|b| b.pack.clone())),
        );
    }
    let pack_bytes: u64 = packs
        .iter()
        .map(|p| std::fs::metadata(root.join(pack_key(p))).unwrap().len())
        .sum();
    files_size(&root.join("instances").join(instance)) + pack_bytes
}

fn cross_figure(svc: &Service, instance: &str) -> Option<u64> {
    svc.engine()
        .catalog()
        .last_usage_sample(instance)
        .unwrap()
        .and_then(|s| s.cross_region_bytes)
}

/// Moves the clock past the sampling interval and ticks until a usage
/// sample of `instance` is taken at the new time.
async fn sample_at(svc: &Arc<Service>, clock: &ManualClock, instance: &str) {
    let at = svc.now() + chrono::Duration::minutes(11);
    clock.set(at);
    tick_until(svc, "a usage sample", || {
        svc.engine()
            .catalog()
            .last_usage_sample(instance)
            .unwrap()
            .is_some_and(|s| s.at == at)
    })
    .await;
}

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
        let sets = svc.engine().catalog().list_backups(id).unwrap();
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
    // The target's collections are checked for what they remove at once.
    let settings = EngineSettings {
        gc_grace: Duration::ZERO,
        ..EngineSettings::default()
    };
    let engine = Engine::new(catalog, repo, settings);
    let refusing = Arc::new(RefusingManifests {
        inner: LocalStorage::new(dir.path().join("dr")).unwrap(),
        refuse: AtomicBool::new(true),
        unreachable: AtomicBool::new(false),
    });
    let target_storage: Arc<dyn Storage> = refusing.clone();
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
    svc.register_instance(
        Instance::new(
            "xr",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    let p = svc
        .modify_cross_policy(
            "xr",
            CrossPolicyChange {
                region: Some("dr".into()),
                backup_enabled: Some(true),
                log_backup_enabled: Some(false),
                retention_days: Some(7),
            },
        )
        .unwrap();
    assert!(p.backup_enabled && !p.log_backup_enabled);

    // The registration's first backup, then a second one: both copied,
    // each with its own WAL although log copies are off.
    svc.tick().await;
    settle(&svc, "xr").await;
    svc.start_backup(
        "xr",
        BackupMode::Manual,
        strata_catalog::BackupMethod::Physical,
    )
    .unwrap();
    settle(&svc, "xr").await;
    cluster.psql(
        "postgres",
        "CREATE TABLE IF NOT EXISTS xr_t AS SELECT 1 AS a; SELECT pg_switch_wal();",
    );
    let sets = svc.engine().catalog().list_backups("xr").unwrap();
    assert_eq!(sets.len(), 2);
    // The target refuses manifests: the copies fail, are recorded failed
    // and are not listed; the target holds no backup set.
    tick_until(&svc, "a failed copy job", || {
        svc.engine()
            .catalog()
            .list_jobs(Some("xr"))
            .unwrap()
            .iter()
            .any(|j| j.kind == JobKind::CrossCopy && j.state == strata_catalog::JobState::Failed)
    })
    .await;
    assert!(svc.cross_backups("xr").unwrap().is_empty());
    let target = Repository::open(target_storage.clone()).unwrap();
    assert!(target.list_backups("xr").unwrap().is_empty());
    // Once the target accepts them again, the copies are retried.
    refusing.refuse.store(false, Ordering::SeqCst);
    tick_until(&svc, "two copies and their WAL", || {
        svc.cross_backups("xr").unwrap().len() == 2 && !svc.cross_wal("xr").unwrap().is_empty()
    })
    .await;
    let copies = svc.cross_backups("xr").unwrap();
    assert_eq!(
        copies.iter().map(|c| c.set.id.clone()).collect::<Vec<_>>(),
        sets.iter().map(|b| b.id.clone()).collect::<Vec<_>>()
    );
    // Whichever copy committed second added far less: its blocks were there.
    let (earlier, later) = if copies[0].id < copies[1].id {
        (&copies[0], &copies[1])
    } else {
        (&copies[1], &copies[0])
    };
    assert!(
        later.copied_bytes * 4 < earlier.copied_bytes,
        "{} then {}",
        earlier.copied_bytes,
        later.copied_bytes
    );
    assert_eq!(
        target.list_backups("xr").unwrap(),
        sets.iter().map(|b| b.id.clone()).collect::<Vec<_>>()
    );
    let report = target.verify(&|_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let wal = svc.cross_wal("xr").unwrap();
    for set in &sets {
        let (start, stop) = (set.start_lsn.unwrap(), set.stop_lsn.unwrap());
        assert!(
            wal.iter()
                .any(|w| w.row.begin_lsn <= start && start < w.row.end_lsn),
            "no copied WAL at the start of {}",
            set.id
        );
        assert!(
            wal.iter()
                .any(|w| w.row.begin_lsn < stop && stop <= w.row.end_lsn),
            "no copied WAL at the stop of {}",
            set.id
        );
    }
    for w in &wal {
        assert!(!w.row.partial);
        target.read_wal(&w.row.object_key).unwrap();
    }

    // A sample counts what the target holds for the instance: not
    // unreferenced packs (one as an interrupted copy leaves, beside any the
    // refused copies left), nor strata-repo.json.
    let dr = dir.path().join("dr");
    let pack = target
        .read_manifest("xr", &sets[0].id)
        .unwrap()
        .all_files()
        .find_map(|f| f.blocks.first().map(|b| b.pack.clone()))
        .unwrap();
    let garbage = dr.join("packs/ff").join(format!("{}.pack", "f".repeat(32)));
    std::fs::create_dir_all(garbage.parent().unwrap()).unwrap();
    std::fs::copy(dr.join(pack_key(&pack)), &garbage).unwrap();
    sample_at(&svc, &clock, "xr").await;
    let copied = cross_figure(&svc, "xr").unwrap();
    assert_eq!(copied, attributed_bytes(&dr, &target, "xr"));
    // A target that cannot be reached does not fail the sample: the last
    // figure stands.
    refusing.unreachable.store(true, Ordering::SeqCst);
    sample_at(&svc, &clock, "xr").await;
    assert_eq!(cross_figure(&svc, "xr"), Some(copied));
    refusing.unreachable.store(false, Ordering::SeqCst);

    // The target stands on its own: a catalog rebuilt from it alone lists
    // both sets.
    let rebuilt = Engine::new(
        Arc::new(SqliteCatalog::open_in_memory().unwrap()),
        target.clone(),
        EngineSettings::default(),
    );
    rebuilt.reindex().unwrap();
    assert_eq!(rebuilt.catalog().list_backups("xr").unwrap().len(), 2);
    assert!(!rebuilt
        .catalog()
        .list_wal_segments("xr")
        .unwrap()
        .is_empty());

    // Off: a new backup is not copied.
    svc.modify_cross_policy(
        "xr",
        CrossPolicyChange {
            backup_enabled: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    // The rounds above may have started a scheduled backup meanwhile.
    settle(&svc, "xr").await;
    svc.start_backup(
        "xr",
        BackupMode::Manual,
        strata_catalog::BackupMethod::Physical,
    )
    .unwrap();
    settle(&svc, "xr").await;
    for _ in 0..20 {
        svc.tick().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(svc.cross_backups("xr").unwrap().len(), 2);

    // Eight days on, the copies' seven-day retention has passed: copies,
    // their WAL and every pack go from the target.
    clock.set(Utc::now() + chrono::Duration::days(8));
    // The catalog rows go first and the target's garbage collection runs
    // after them in the same copier round, so wait for the packs as well.
    tick_until(&svc, "copies expiring and their packs collected", || {
        svc.cross_backups("xr").unwrap().is_empty()
            && svc.cross_wal("xr").unwrap().is_empty()
            && target_storage.list("packs").unwrap().is_empty()
    })
    .await;
    assert!(target.list_backups("xr").unwrap().is_empty());
    assert!(target.list_wal("xr").unwrap().is_empty());
    // The instance record and timeline histories are what remains there.
    sample_at(&svc, &clock, "xr").await;
    let left = cross_figure(&svc, "xr").unwrap();
    assert_eq!(left, attributed_bytes(&dr, &target, "xr"));
    assert_eq!(left, files_size(&dr.join("instances/xr")));
    assert!(left < copied / 100, "{left} of {copied} left");
}
