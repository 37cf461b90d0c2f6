//! Garbage collection beside readers. A backup set deleted while a restore
//! or a download reads it keeps every pack the reader needs: the reader
//! holds the repository shared in the catalog for its whole run (a
//! collection through the same catalog, from any node, does nothing
//! meanwhile), and a collection that does not see the hold (an engine on
//! another catalog writing to the same repository) only marks the packs
//! pending for the grace period. Both collections run at the moment the reader fetches its
//! first block, through a storage wrapper; the restored server and the
//! downloaded archive are then checked against the source.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_catalog::{BackupId, BackupMode, Catalog, Instance, SqliteCatalog, SslMode};
use strata_engine::{
    BackupOptions, Engine, EngineSettings, NoProgress, RecoveryTarget, RestoreOptions, StartOptions,
};
use strata_repo::storage::{ObjectSize, StorageResult};
use strata_repo::{GcReport, LocalStorage, Repository, Storage};
use testkit::Cluster;

/// What the collections did when the reader fetched its first block.
#[derive(Debug, Default)]
struct Collections {
    /// The collection sharing the reader's lock.
    same_catalog: Option<Result<Option<GcReport>, String>>,
    /// The collection of an engine that does not see the hold.
    other_node: Option<Result<Option<GcReport>, String>>,
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// Runs `hook` once, before the first read of a pack after it is armed.
#[derive(Default)]
struct OnFirstPackRead {
    inner: Option<Arc<dyn Storage>>,
    hook: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for OnFirstPackRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnFirstPackRead")
    }
}

impl OnFirstPackRead {
    fn inner(&self) -> &dyn Storage {
        self.inner.as_deref().expect("wrapper has a store")
    }

    fn arm(&self, hook: Hook) {
        *self.hook.lock().unwrap() = Some(hook);
    }

    fn reading(&self, key: &str) {
        if key.starts_with("packs/") {
            // Taken out before running: the hook itself reads the store.
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

impl Storage for OnFirstPackRead {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.inner().put(key, data)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.reading(key);
        self.inner().get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.reading(key);
        self.inner().get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        self.inner().list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.inner().list_sizes(prefix)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.inner().delete(key)
    }
    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.inner().exists(key)
    }
    fn describe(&self) -> String {
        self.inner().describe()
    }
}

struct Rig {
    store: Arc<OnFirstPackRead>,
    /// Holds the repository in the catalog, as every process of one
    /// Strata installation does.
    engine: Engine,
    /// Same repository, another catalog: it never sees the holds.
    other_node: Engine,
    collections: Arc<Mutex<Collections>>,
}

impl Rig {
    fn new(dir: &Path) -> Rig {
        let store = Arc::new(OnFirstPackRead {
            inner: Some(Arc::new(LocalStorage::new(dir.join("repo")).unwrap())),
            ..Default::default()
        });
        let repo = Repository::open_or_init(store.clone()).unwrap();
        let catalog: Arc<dyn Catalog> =
            Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
        let settings = EngineSettings {
            os_user: Some("postgres".into()),
            start_timeout: Duration::from_secs(90),
            ..EngineSettings::default()
        };
        let other_catalog: Arc<dyn Catalog> =
            Arc::new(SqliteCatalog::open(&dir.join("other.db")).unwrap());
        Rig {
            store,
            engine: Engine::new(catalog, repo.clone(), settings.clone()),
            other_node: Engine::new(other_catalog, repo, settings),
            collections: Arc::default(),
        }
    }

    /// At the reader's first block: the set is deleted and both kinds of
    /// collection run.
    fn delete_and_collect_at_first_read(&self, backup_id: &str) {
        let engine = self.engine.clone();
        let other = self.other_node.clone();
        let collections = self.collections.clone();
        let id = backup_id.to_string();
        *collections.lock().unwrap() = Collections::default();
        self.store.arm(Box::new(move || {
            engine.delete_backup_set(&id).unwrap();
            let same = engine.collect_garbage().map_err(|e| e.to_string());
            let other = other.collect_garbage().map_err(|e| e.to_string());
            let mut c = collections.lock().unwrap();
            c.same_catalog = Some(same);
            c.other_node = Some(other);
        }));
    }

    /// Both collections ran and neither deleted a pack.
    fn check_nothing_collected(&self) {
        let c = self.collections.lock().unwrap();
        assert!(
            matches!(c.same_catalog, Some(Ok(None))),
            "a collection ran while a reader held the repository: {:?}",
            c.same_catalog
        );
        match &c.other_node {
            Some(Ok(Some(report))) => assert_eq!(
                report.packs_deleted, 0,
                "packs of a set being read were deleted: {report:?}"
            ),
            other => panic!("the other node's collection did not run: {other:?}"),
        }
    }

    fn backup(&self, runtime: &tokio::runtime::Runtime, id: &str) -> BackupId {
        let opts = BackupOptions {
            mode: BackupMode::Manual,
            max_rate_kb: None,
            method: strata_catalog::BackupMethod::Physical,
            taken_under: None,
        };
        runtime
            .block_on(self.engine.backup(id, &opts, &NoProgress))
            .unwrap()
            .id
    }
}

fn digest(c: &Cluster, db: &str) -> String {
    c.psql(
        db,
        "SELECT md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts",
    )
}

#[test]
fn a_restore_and_a_download_of_a_set_deleted_meanwhile_complete() {
    let cluster = testkit::shared_cluster(15);
    let db = "gc_readers";
    cluster.psql("postgres", &format!("CREATE DATABASE {db}"));
    cluster.pgbench(db, &["-i", "-q", "-s", "1"]);
    cluster.psql(db, "CHECKPOINT");
    let source = digest(cluster, db);
    let dir = testkit::temp_dir("strata-gc-readers-");
    let rig = Rig::new(&dir);
    let id = "gc-readers";
    rig.engine
        .add_instance(&Instance::new(
            id,
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1. A restore: the set is deleted and collected under it.
    let restored_set = rig.backup(&runtime, id);
    rig.delete_and_collect_at_first_read(&restored_set);
    let target = dir.join("restored");
    let port = testkit::free_port();
    let outcome = rig.engine.restore(
        id,
        &RestoreOptions {
            target_dir: target.clone(),
            delta: false,
            backup_id: Some(restored_set.clone()),
            target: RecoveryTarget::Latest,
            start: Some(StartOptions {
                port,
                ..Default::default()
            }),
            job_id: None,
            index: None,
        },
        &NoProgress,
    );
    rig.check_nothing_collected();
    outcome.expect("the restore of a set deleted meanwhile failed");
    let restored = Cluster::adopt(15, target, port);
    assert_eq!(digest(&restored, db), source);
    drop(restored);

    // 2. A download: the archive is planned, then the set is deleted and
    // collected while it streams.
    let downloaded_set = rig.backup(&runtime, id);
    let archive = rig.engine.backup_archive(id, &downloaded_set).unwrap();
    let size = archive.size().unwrap();
    rig.delete_and_collect_at_first_read(&downloaded_set);
    let mut bytes = Vec::new();
    let written = archive.write(&mut bytes, None);
    rig.check_nothing_collected();
    written.expect("the download of a set deleted meanwhile broke");
    assert_eq!(bytes.len() as u64, size);
    drop(archive);
    check_with_pg_verifybackup(&bytes, &dir.join("downloaded"));

    // Readers gone: the next collection runs, and keeps the deleted sets'
    // packs for the grace period.
    let report = rig.engine.collect_garbage().unwrap().expect("lock free");
    assert_eq!(report.packs_deleted, 0, "{report:?}");
    assert!(report.packs_pending > 0, "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unpacks the download (`base.tar` and `backup_manifest`) and has
/// PostgreSQL's own checker compare every file with the server's manifest.
fn check_with_pg_verifybackup(download: &[u8], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut outer = tar::Archive::new(download);
    let mut found = Vec::new();
    for entry in outer.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().to_string();
        match name.as_str() {
            "base.tar" => tar::Archive::new(&mut entry).unpack(dir).unwrap(),
            "backup_manifest" => {
                entry.unpack(dir.join("backup_manifest")).unwrap();
            }
            _ => {}
        }
        found.push(name);
    }
    assert!(
        found.contains(&"base.tar".to_string()) && found.contains(&"backup_manifest".to_string()),
        "{found:?}"
    );
    let verify = "/usr/lib/postgresql/15/bin/pg_verifybackup";
    let out = std::process::Command::new(verify)
        .args(["--no-parse-wal", "--quiet"])
        .arg(dir)
        .output()
        .expect("run pg_verifybackup");
    assert!(
        out.status.success(),
        "pg_verifybackup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
