//! Backups asked through the API run on the instance's owner: on the node
//! that owns the instance (or will, a single node) they start during the
//! call; asked of another node they wait, queued, until the owner's round
//! claims them. Two services on one SQLite catalog and one repository,
//! against a real PostgreSQL 15.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use strata_catalog::prelude::*;
use strata_catalog::{BackupStatus, Instance, JobState, SqliteCatalog, SslMode};
use strata_engine::{Engine, EngineSettings};
use strata_repo::{LocalStorage, Repository};
use strata_service::{NodeSettings, Service, ServiceSettings, SystemClock};

fn node(dir: &std::path::Path, id: &str) -> Arc<Service> {
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let repo =
        Repository::open_or_init(Arc::new(LocalStorage::new(dir.join("repo")).unwrap())).unwrap();
    let engine = Engine::new(catalog, repo, EngineSettings::default());
    let settings = ServiceSettings {
        instances_dir: dir.join(format!("instances-{id}")),
        drills: false,
        node: NodeSettings {
            id: id.into(),
            ..NodeSettings::default()
        },
        ..Default::default()
    };
    Service::new(engine, Arc::new(SystemClock), settings)
}

/// Waits until the backup of `job` ended and its task left the node;
/// returns its set's status.
async fn finished(svc: &Service, job: strata_catalog::JobId) -> BackupStatus {
    for _ in 0..600 {
        let j = svc.job(job).unwrap();
        let instance = j.instance_id.as_deref().unwrap();
        let task_gone = svc.running_backup_job(instance) != Some(job);
        if j.state.is_terminal() && task_gone {
            let set = svc.backup_set(j.backup_id.as_deref().unwrap()).unwrap();
            return set.status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job} did not end within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_runs_on_the_instances_owner_whichever_node_is_asked() {
    let cluster = testkit::shared_cluster(15);
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "node-a");
    let b = node(dir.path(), "node-b");
    a.register_instance(
        Instance::new(
            "queued",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();

    // No round ran anywhere: node a is alone and will own the instance, so
    // it starts the backup during the call, as a single node always did.
    let job = a
        .request_backup("queued", strata_catalog::BackupMethod::Physical)
        .unwrap();
    assert!(!job.queued);
    assert_eq!(job.node_id.as_deref(), Some("node-a"));
    assert_eq!(a.running_backup_job("queued"), Some(job.id));
    assert_eq!(finished(&a, job.id).await, BackupStatus::Success);

    // Node b takes the instance; asked of node a, a backup waits for b.
    let catalog = a.engine().catalog();
    let lease = chrono::Duration::seconds(60);
    assert!(catalog
        .claim_instance("queued", "node-b", Utc::now(), lease)
        .unwrap());
    let job = a
        .request_backup("queued", strata_catalog::BackupMethod::Physical)
        .unwrap();
    assert!(job.queued);
    assert_eq!(
        (job.state, job.node_id.as_deref()),
        (JobState::NoStart, None)
    );
    assert_eq!(a.running_backup_job("queued"), None);
    // A second one while it waits is refused, as while one runs.
    assert!(a
        .request_backup("queued", strata_catalog::BackupMethod::Physical)
        .is_err());

    b.tick().await;
    let taken = b.job(job.id).unwrap();
    assert!(!taken.queued);
    assert_eq!(taken.node_id.as_deref(), Some("node-b"));
    assert_eq!(b.running_backup_job("queued"), Some(job.id));
    assert_eq!(finished(&b, job.id).await, BackupStatus::Success);

    // A job still queued when its instance is deregistered fails with the
    // reason instead of waiting for an owner that will never come.
    let job = a
        .request_backup("queued", strata_catalog::BackupMethod::Physical)
        .unwrap();
    assert!(job.queued);
    b.deregister_instance("queued").await.unwrap();
    let ended = a.job(job.id).unwrap();
    assert_eq!(ended.state, JobState::Failed);
    assert!(!ended.queued);
    assert!(
        ended
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("deregistered"),
        "{ended:?}"
    );
    assert!(a.engine().catalog().queued_jobs().unwrap().is_empty());
    b.shutdown().await;
    a.shutdown().await;
}
