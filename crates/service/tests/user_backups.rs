//! User backups against a real PostgreSQL 15 with a manual clock: a
//! `pg_basebackup -Ft` directory imported with a retention, its set and WAL
//! stored under an owner no registration holds, and deleted with its WAL
//! by the retention round once the retention has passed.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use strata_catalog::{BackupStatus, Catalog, Instance, KeepUntil, SqliteCatalog};
use strata_engine::{Engine, EngineSettings};
use strata_repo::{LocalStorage, Repository};
use strata_service::user_backups::UserBackupRequest;
use strata_service::{ManualClock, Service, ServiceSettings};

fn engine(dir: &Path) -> Engine {
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let repo =
        Repository::open_or_init(Arc::new(LocalStorage::new(dir.join("repo")).unwrap())).unwrap();
    Engine::new(catalog, repo, EngineSettings::default())
}

/// `pg_basebackup -Ft` of `pg` into `import_dir/name`.
fn basebackup(pg: &testkit::Cluster, import_dir: &Path, name: &str) {
    let mut cmd = Command::new(pg.bin_dir().join("pg_basebackup"));
    cmd.args([
        "-h",
        pg.host(),
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
    ])
    .args(["-Ft", "-c", "fast", "--no-sync", "-D"])
    .arg(import_dir.join(name));
    testkit::run_as_postgres(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_backups_import_and_expire_with_their_wal() {
    let cluster = testkit::shared_cluster(15);
    let dir = tempfile::tempdir().unwrap();
    let import_dir = testkit::temp_dir("strata-user-backups-");
    basebackup(cluster, &import_dir, "nightly");
    let now = Utc::now();
    let clock = Arc::new(ManualClock::new(now));
    let settings = ServiceSettings {
        instances_dir: dir.path().join("instances"),
        drills: false,
        import_dir: Some(import_dir.clone()),
        ..Default::default()
    };
    let svc = Service::new(engine(dir.path()), clock.clone(), settings);
    let job = svc
        .import_user_backup(
            "nightly",
            UserBackupRequest {
                comment: Some("audit".into()),
                retention_days: Some(2),
                engine_major: Some(15),
            },
        )
        .await
        .unwrap();
    let id = job.backup_id.clone().unwrap();
    let set = loop {
        let set = svc.user_backup(&id).unwrap();
        if set.status != BackupStatus::Running {
            break set;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(set.status, BackupStatus::Success, "{:?}", set.error);
    assert!(Instance::owns_user_backup(&set.instance_id));
    assert_eq!(set.keep_note.as_deref(), Some("audit"));
    let until: DateTime<Utc> = match set.keep_until {
        Some(KeepUntil::Until(t)) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(until, now + chrono::Duration::days(2));
    let owner = set.instance_id.to_string();
    let catalog = svc.engine().catalog();
    assert!(!catalog.list_wal_segments(&owner).unwrap().is_empty());
    assert!(
        catalog.get_instance(&owner).is_err(),
        "the owner is never registered"
    );
    assert_eq!(svc.user_backups().unwrap().len(), 1);

    // Within its retention, the round keeps it.
    clock.set(now + chrono::Duration::days(1));
    svc.tick().await;
    assert_eq!(svc.user_backup(&id).unwrap().id, set.id);

    // Past it, the round deletes the set and its WAL.
    clock.set(now + chrono::Duration::days(3));
    svc.tick().await;
    assert!(svc.user_backup(&id).is_err());
    assert!(svc.user_backups().unwrap().is_empty());
    assert!(catalog.list_wal_segments(&owner).unwrap().is_empty());
    assert!(catalog.list_backups(&owner).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&import_dir);
}
