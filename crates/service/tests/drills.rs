//! Restore drills of a source whose catalog fights back, on the oldest and
//! newest supported PostgreSQL: an event trigger that fails every DDL
//! command and a per-role `session_preload_libraries` naming a library that
//! does not exist. A drill runs DDL (`CREATE EXTENSION amcheck`) and
//! connects to every database, so it passes only if Strata's sessions on
//! the scratch server override per-role settings and disarm event triggers
//! (by disabling them up to PostgreSQL 16, with `event_triggers = off` from
//! 17). The scratch server runs without network, so this also proves that
//! a server started in its own network namespace recovers and answers on
//! its socket.

use std::sync::Arc;
use std::time::Duration;

use strata_catalog::{BackupStatus, Catalog, Instance, SqliteCatalog, SslMode};
use strata_engine::{Engine, EngineSettings};
use strata_repo::{LocalStorage, Repository};
use strata_service::{ManualClock, Service, ServiceSettings};
use testkit::Cluster;

fn engine(dir: &std::path::Path) -> Engine {
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let repo =
        Repository::open_or_init(Arc::new(LocalStorage::new(dir.join("repo")).unwrap())).unwrap();
    let mut bin_dirs: Vec<String> = [14, 15, 16, 17, 18]
        .into_iter()
        .filter_map(testkit::pg_bin_dir)
        .map(|d| d.display().to_string())
        .collect();
    // Client tools of PostgreSQL 18 (pg_amcheck, psql) live apart from its server.
    bin_dirs.push(
        testkit::workspace_root()
            .join(".cache/pg/18-client/bin")
            .display()
            .to_string(),
    );
    let settings = EngineSettings {
        pg_bin_dirs: bin_dirs,
        ..EngineSettings::default()
    };
    Engine::new(catalog, repo, settings)
}

async fn drill_of_a_hostile_catalog(major: u32) {
    let cluster = Cluster::start_default(major);
    cluster.psql("postgres", "CREATE DATABASE app");
    cluster.psql(
        "app",
        "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept SELECT generate_series(1, 50);\
         CREATE FUNCTION refuse() RETURNS event_trigger LANGUAGE plpgsql AS \
           $$BEGIN RAISE EXCEPTION 'event trigger of the source fired'; END$$;\
         CREATE EVENT TRIGGER refuse_ddl ON ddl_command_start EXECUTE FUNCTION refuse();\
         ALTER EVENT TRIGGER refuse_ddl ENABLE ALWAYS;",
    );
    cluster.psql(
        "postgres",
        "ALTER ROLE postgres IN DATABASE app SET session_preload_libraries = 'strata_missing_library'",
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let svc = Service::new(
        engine(dir.path()),
        clock,
        ServiceSettings {
            instances_dir: dir.path().join("instances"),
            drills: false,
            ..Default::default()
        },
    );
    let id = format!("drill{major}");
    svc.register_instance(
        Instance::new(
            &id,
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    svc.tick().await;
    let set = wait_for(|| {
        svc.engine()
            .catalog()
            .list_backups(&id)
            .unwrap()
            .into_iter()
            .find(|b| b.status != BackupStatus::Running)
    })
    .await;
    assert_eq!(set.status, BackupStatus::Success, "{set:?}");
    svc.start_drill(&set.id).unwrap();
    let drill = wait_for(|| {
        svc.engine()
            .catalog()
            .get_drill(&set.id)
            .unwrap()
            .filter(|d| d.status == "Passed" || d.status == "Failed")
    })
    .await;
    assert_eq!(
        (drill.status.as_str(), major),
        ("Passed", major),
        "{}",
        drill.detail
    );
    assert!(
        drill.detail.contains("pg_amcheck clean"),
        "{}",
        drill.detail
    );
    // Nothing of the scratch server is left.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("instances"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    svc.shutdown().await;
}

async fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..1800 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not done within three minutes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_postgres_14_ignores_the_source_catalog_hooks() {
    drill_of_a_hostile_catalog(14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_postgres_18_ignores_the_source_catalog_hooks() {
    drill_of_a_hostile_catalog(18).await;
}
