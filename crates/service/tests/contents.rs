//! The databases and tables a backup set records, against a real
//! PostgreSQL 15: a set lists what the server held when it was taken (a
//! table dropped afterwards included, templates and temporary tables
//! left out), another instance's set is not found, and a set whose
//! manifest has no list (as every set taken before lists were recorded)
//! is refused with `NoContents` rather than answered empty.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use strata_catalog::{
    BackupMethod, BackupMode, BackupStatus, Catalog, Instance, SqliteCatalog, SslMode,
};
use strata_engine::{Engine, EngineSettings};
use strata_repo::{LocalStorage, Repository};
use strata_service::{ManualClock, Refusal, Service, ServiceError, ServiceSettings};

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

fn tables(svc: &Service, instance: &str, set: &str, db: &str) -> Vec<String> {
    let found = svc.set_contents(instance, set).unwrap();
    let db = found
        .contents
        .databases
        .iter()
        .find(|d| d.name == db)
        .unwrap_or_else(|| panic!("database {db} not in {:?}", found.contents));
    let mut names: Vec<String> = db
        .tables
        .iter()
        .flatten()
        .map(|t| format!("{}.{}:{}", t.schema, t.name, t.kind))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_lists_what_the_server_held_and_an_older_set_is_refused() {
    let cluster = testkit::Cluster::start_default(15);
    cluster.psql("postgres", "CREATE DATABASE \"other db\"");
    cluster.psql(
        "postgres",
        "CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1000) g; \
         CREATE TABLE dropped (id int); CREATE SCHEMA s; CREATE TABLE s.parted (id int) PARTITION BY RANGE (id); \
         CREATE VIEW v AS SELECT 1;",
    );
    let dir = tempfile::tempdir().unwrap();
    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&dir.path().join("catalog.db")).unwrap());
    let repo = Repository::open_or_init(Arc::new(
        LocalStorage::new(dir.path().join("repo")).unwrap(),
    ))
    .unwrap();
    let engine = Engine::new(catalog, repo, EngineSettings::default());
    let svc = Service::new(
        engine,
        Arc::new(ManualClock::new(Utc::now())),
        ServiceSettings {
            instances_dir: dir.path().join("instances"),
            drills: false,
            ..Default::default()
        },
    );
    svc.register_instance(
        Instance::new(
            "ct",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    svc.start_backup("ct", BackupMode::Manual, BackupMethod::Physical)
        .unwrap();
    settle(&svc, "ct").await;
    let set = svc
        .engine()
        .catalog()
        .list_backups("ct")
        .unwrap()
        .into_iter()
        .rev()
        .find(|b| b.status == BackupStatus::Success)
        .expect("a successful set");

    cluster.psql("postgres", "DROP TABLE dropped");
    assert_eq!(
        tables(&svc, "ct", &set.id, "postgres"),
        ["public.dropped:r", "public.kept:r", "s.parted:p"]
    );
    let found = svc.set_contents("ct", &set.id).unwrap();
    let mut dbs: Vec<&str> = found
        .contents
        .databases
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    dbs.sort_unstable();
    assert_eq!(dbs, ["other db", "postgres"]);
    assert_eq!(
        tables(&svc, "ct", &set.id, "other db"),
        Vec::<String>::new()
    );
    let kept = found
        .contents
        .databases
        .iter()
        .flat_map(|d| d.tables.iter().flatten())
        .find(|t| t.name == "kept")
        .unwrap();
    assert!(kept.size >= 8192 * 4, "{kept:?}");

    // Another instance's id finds nothing.
    assert!(svc.set_contents("other", &set.id).is_err());

    // The same set as an older build wrote it: no list, refused as such.
    let repo = svc.engine().repo();
    let mut manifest = repo.read_manifest("ct", &set.id).unwrap();
    manifest.contents = None;
    repo.commit_manifest(&manifest).unwrap();
    match svc.set_contents("ct", &set.id) {
        Err(ServiceError::Policy(e)) => {
            assert_eq!(e.kind, Refusal::NoContents);
            assert!(e.message.contains("taken before"), "{}", e.message);
        }
        other => panic!("expected a NoContents refusal, got {other:?}"),
    }
}
