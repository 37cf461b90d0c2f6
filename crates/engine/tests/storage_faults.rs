//! Backups against storage that misbehaves: errors (transient and
//! permanent), timeouts (some after the write landed) and slow answers on a
//! fraction of calls, injected by `FaultyStorage` under the same retry layer
//! the binary uses, on a local directory and on a real S3 server (s3s-fs).
//!
//! After every run: the backup either succeeded or is recorded `Failed` with
//! its reason (never left `Running`); the repository holds a manifest exactly
//! for the successful sets; `verify` finds no problem, so every block and WAL
//! object a committed set needs is there and intact. At the end the last
//! successful set is restored, started and compared with the source.
//!
//! Several packs stored at once: a backup on S3 keeps more than one pack
//! upload in flight and restores to the same data; one failed pack among
//! those in flight fails the backup with its error and no manifest.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use strata_catalog::{BackupStatus, Catalog, Instance, SqliteCatalog, SslMode};
use strata_engine::{
    BackupOptions, Engine, EngineSettings, NoProgress, RecoveryTarget, RestoreOptions, StartOptions,
};
use strata_repo::storage::fault::{FaultCounts, FaultPlan, FaultyStorage};
use strata_repo::{
    AzureConfig, AzureStorage, GcsConfig, GcsStorage, LocalStorage, ObjectSize, Repository,
    RetryPolicy, RetryingStorage, S3Config, S3Storage, Storage, StorageError,
};
use testkit::{Azurite, Cluster, FakeGcs, S3Server};

/// Retries as the binary does, with short delays so the test stays quick.
fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 16,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }
}

struct Rig {
    store: Arc<dyn Storage>,
    engine: Engine,
    /// The same repository without faults, to inspect what runs left.
    clean: Repository,
    runtime: tokio::runtime::Runtime,
}

impl Rig {
    fn new(store: Arc<dyn Storage>, dir: &std::path::Path, cluster: &Cluster, id: &str) -> Self {
        let catalog: Arc<dyn Catalog> =
            Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
        let clean = Repository::open_or_init(store.clone()).unwrap();
        let settings = EngineSettings {
            os_user: Some("postgres".into()),
            start_timeout: Duration::from_secs(90),
            ..EngineSettings::default()
        };
        let engine = Engine::new(catalog, clean.clone(), settings);
        engine
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
        Rig {
            store,
            engine,
            clean,
            runtime,
        }
    }

    /// One backup through `plan`'s faults under the retry layer; whether it
    /// succeeded and which faults were injected.
    fn backup_with(&mut self, plan: FaultPlan, id: &str) -> (bool, FaultCounts) {
        let faulty = Arc::new(FaultyStorage::new(self.store.clone(), plan));
        let storage: Arc<dyn Storage> =
            Arc::new(RetryingStorage::new(faulty.clone(), retry_policy()));
        self.engine = self.engine.with_repo(Repository::open(storage).unwrap());
        let outcome = self.runtime.block_on(self.engine.backup(
            id,
            &BackupOptions::default(),
            &NoProgress,
        ));
        faulty.set_enabled(false);
        (outcome.is_ok(), faulty.counts())
    }

    /// One backup through `storage`; its error, if it failed.
    fn backup_through(&mut self, storage: Arc<dyn Storage>, id: &str) -> Option<String> {
        self.engine = self.engine.with_repo(Repository::open(storage).unwrap());
        let outcome = self.runtime.block_on(self.engine.backup(
            id,
            &BackupOptions::default(),
            &NoProgress,
        ));
        outcome.err().map(|e| e.to_string())
    }
}

/// The invariants every run must leave behind.
/// Restores set `set_id` of `id` into `dir/restored` as `target` says,
/// starts it, and checks `digest` of it equals the source's.
fn restores_as(
    rig: &Rig,
    id: &str,
    set_id: &str,
    target: RecoveryTarget,
    dir: &std::path::Path,
    digest: impl Fn(&Cluster) -> String,
    source_digest: &str,
) {
    let target_dir = dir.join("restored");
    let port = testkit::free_port();
    rig.engine
        .restore(
            id,
            &RestoreOptions {
                target_dir: target_dir.clone(),
                delta: false,
                backup_id: Some(set_id.into()),
                target,
                start: Some(StartOptions {
                    port,
                    ..Default::default()
                }),
                job_id: None,
                index: None,
            },
            &NoProgress,
        )
        .unwrap();
    let restored = Cluster::adopt(15, target_dir, port);
    assert_eq!(digest(&restored), source_digest);
}

fn check_invariants(rig: &Rig, id: &str) {
    let sets = rig.engine.catalog().list_backups(id).unwrap();
    let manifests = rig.clean.list_backups(id).unwrap();
    for set in &sets {
        match set.status {
            BackupStatus::Success => assert!(
                manifests.contains(&set.id),
                "successful backup {} has no manifest",
                set.id
            ),
            BackupStatus::Failed => {
                assert!(
                    !manifests.contains(&set.id),
                    "failed backup {} left a manifest",
                    set.id
                );
                assert!(set.error.as_deref().is_some_and(|e| !e.is_empty()));
            }
            BackupStatus::Running => panic!("backup {} left Running", set.id),
        }
    }
    for m in &manifests {
        assert!(
            sets.iter()
                .any(|s| &s.id == m && s.status == BackupStatus::Success),
            "manifest {m} in the repository for a set not recorded as successful"
        );
    }
    let report = rig.clean.verify(&|_, _| {}).unwrap();
    assert!(report.is_clean(), "verify: {:?}", report.problems);
}

fn scenario(store: Arc<dyn Storage>, name: &str) {
    let cluster = testkit::shared_cluster(15);
    let db = format!("faults_{name}");
    cluster.psql("postgres", &format!("CREATE DATABASE {db}"));
    cluster.pgbench(&db, &["-i", "-q", "-s", "1"]);
    cluster.psql(&db, "CHECKPOINT");
    let digest = |c: &Cluster| {
        c.psql(
            &db,
            "SELECT md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts",
        )
    };
    let source_digest = digest(cluster);
    let dir = testkit::temp_dir(&format!("strata-faults-{name}-"));
    let id = format!("faults-{name}");
    let mut rig = Rig::new(store, &dir, cluster, &id);

    // 1. Transient trouble everywhere: retries absorb it, the backup succeeds.
    // (A small backup makes only a dozen calls, so the rates are high.)
    let mut plan = FaultPlan::none(11);
    plan.error_rate = 0.35;
    plan.timeout_rate = 0.15;
    plan.timeout_after = Duration::from_millis(20);
    plan.slow_rate = 0.1;
    plan.slow_delay = Duration::from_millis(30);
    let (ok, counts) = rig.backup_with(plan, &id);
    assert!(ok, "transient faults were not absorbed: {counts:?}");
    assert!(
        counts.transient_errors + counts.timeouts_before + counts.timeouts_after > 0,
        "{counts:?}"
    );
    check_invariants(&rig, &id);

    // 2. Permanent refusals on some writes: success or a recorded failure.
    let mut plan = FaultPlan::none(22);
    plan.error_rate = 0.3;
    plan.permanent_share = 1.0;
    plan.ops = vec!["put"];
    let (_, counts) = rig.backup_with(plan, &id);
    assert!(counts.calls > 0);
    check_invariants(&rig, &id);

    // 3. Every write refused: the backup must fail, and say why.
    let mut plan = FaultPlan::none(33);
    plan.error_rate = 1.0;
    plan.permanent_share = 1.0;
    plan.ops = vec!["put"];
    let (ok, counts) = rig.backup_with(plan, &id);
    assert!(!ok && counts.permanent_errors > 0, "{counts:?}");
    check_invariants(&rig, &id);
    let last = rig
        .engine
        .catalog()
        .list_backups(&id)
        .unwrap()
        .pop()
        .unwrap();
    assert!(
        last.error
            .as_deref()
            .unwrap_or("")
            .contains("injected fault"),
        "{last:?}"
    );

    // 4. The commit point itself times out, sometimes after landing: the set
    //    is failed and its manifest, if it landed, removed again.
    let mut plan = FaultPlan::none(44);
    plan.timeout_rate = 1.0;
    plan.timeout_after = Duration::from_millis(5);
    plan.ops = vec!["put"];
    plan.keys_containing = Some(".manifest");
    let (ok, counts) = rig.backup_with(plan, &id);
    assert!(!ok, "{counts:?}");
    assert!(
        counts.timeouts_after + counts.timeouts_before >= 10,
        "{counts:?}"
    );
    check_invariants(&rig, &id);

    // 5. Slow storage only: success.
    let mut plan = FaultPlan::none(55);
    plan.slow_rate = 0.6;
    plan.slow_delay = Duration::from_millis(20);
    let (ok, counts) = rig.backup_with(plan, &id);
    assert!(ok && counts.slow > 0, "{counts:?}");
    check_invariants(&rig, &id);

    // The newest successful set restores and matches the source.
    let sets = rig.engine.catalog().list_backups(&id).unwrap();
    assert!(
        sets.iter()
            .filter(|s| s.status == BackupStatus::Success)
            .count()
            >= 2
    );
    let newest = sets
        .iter()
        .rev()
        .find(|s| s.status == BackupStatus::Success)
        .unwrap();
    restores_as(
        &rig,
        &id,
        &newest.id,
        RecoveryTarget::Latest,
        &dir,
        digest,
        &source_digest,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pack puts wait (up to 30 s) until two are in flight at once, so a run
/// shows whether uploads overlap; the `fail`-th pack put is refused.
#[derive(Debug)]
struct TwoPacksAtOnce {
    inner: Arc<dyn Storage>,
    fail: Option<u32>,
    /// (in flight, most at once, pack puts so far)
    state: Mutex<(u32, u32, u32)>,
    changed: Condvar,
}

impl TwoPacksAtOnce {
    fn new(inner: Arc<dyn Storage>, fail: Option<u32>) -> Self {
        TwoPacksAtOnce {
            inner,
            fail,
            state: Mutex::new((0, 0, 0)),
            changed: Condvar::new(),
        }
    }

    fn most_in_flight(&self) -> u32 {
        self.state.lock().unwrap().1
    }

    fn put_pack(
        &self,
        key: &str,
        put: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut st = self.state.lock().unwrap();
        st.0 += 1;
        st.1 = st.1.max(st.0);
        st.2 += 1;
        let n = st.2;
        self.changed.notify_all();
        let deadline = Instant::now() + Duration::from_secs(30);
        while st.1 < 2 && Instant::now() < deadline {
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap()
                .0;
        }
        drop(st);
        let result = if Some(n) == self.fail {
            Err(StorageError::Remote {
                op: "put",
                key: key.into(),
                message: "injected refusal of one pack: 403 AccessDenied".into(),
                transient: false,
            })
        } else {
            put()
        };
        self.state.lock().unwrap().0 -= 1;
        result
    }
}

impl Storage for TwoPacksAtOnce {
    fn put(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        match key.starts_with("packs/") {
            true => self.put_pack(key, || self.inner.put(key, data)),
            false => self.inner.put(key, data),
        }
    }
    fn put_bytes(&self, key: &str, data: bytes::Bytes) -> Result<(), StorageError> {
        match key.starts_with("packs/") {
            true => self.put_pack(key, || self.inner.put_bytes(key, data)),
            false => self.inner.put_bytes(key, data),
        }
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> Result<Vec<ObjectSize>, StorageError> {
        self.inner.list_sizes(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete(key)
    }
    fn exists(&self, key: &str) -> Result<bool, StorageError> {
        self.inner.exists(key)
    }
    fn concurrent_puts(&self) -> usize {
        self.inner.concurrent_puts()
    }
    fn concurrent_reads(&self) -> usize {
        self.inner.concurrent_reads()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn packs_in_flight_on_s3_restore_whole_and_one_failure_fails_the_backup() {
    // A cluster of its own: ~48 MB of random bytes make three packs or more.
    let cluster = Cluster::start_default(15);
    cluster.psql(
        "postgres",
        "CREATE TABLE noise AS SELECT g AS id, \
           (SELECT decode(string_agg(lpad(to_hex(floor(random() * 4294967296)::bigint), 8, '0'), ''), 'hex') \
              FROM generate_series(1, 250) WHERE g > 0) AS data \
         FROM generate_series(1, 48000) g",
    );
    cluster.psql("postgres", "CHECKPOINT");
    let digest = |c: &Cluster| {
        c.psql(
            "postgres",
            "SELECT count(*) || ':' || md5(string_agg(md5(data), ',' ORDER BY id)) FROM noise",
        )
    };
    let source_digest = digest(&cluster);
    let server = S3Server::start();
    let mut config = S3Config::from_url(&format!("s3://{}/in-flight", S3Server::BUCKET)).unwrap();
    config.endpoint = Some(server.endpoint());
    config.access_key_id = Some(S3Server::ACCESS_KEY.into());
    config.secret_access_key = Some(S3Server::SECRET_KEY.into());
    config.path_style = true;
    config.allow_http = true;
    config.tuning.upload_concurrency = 4;
    let store: Arc<dyn Storage> = Arc::new(RetryingStorage::new(
        S3Storage::new(config).unwrap(),
        retry_policy(),
    ));
    let dir = testkit::temp_dir("strata-in-flight-");
    let id = "in-flight";
    let mut rig = Rig::new(store.clone(), &dir, &cluster, id);

    // One pack among those in flight refused: the backup fails with that
    // error, and no manifest names packs that were never stored.
    let refusing = Arc::new(TwoPacksAtOnce::new(store.clone(), Some(2)));
    let error = rig.backup_through(refusing.clone(), id);
    let error = error.expect("a refused pack must fail the backup");
    assert!(error.contains("injected refusal of one pack"), "{error}");
    assert!(refusing.most_in_flight() >= 2);
    assert!(rig.clean.list_backups(id).unwrap().is_empty());
    let failed = rig.engine.catalog().list_backups(id).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].status, BackupStatus::Failed);
    assert!(
        failed[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("injected refusal of one pack")),
        "{failed:?}"
    );
    check_invariants(&rig, id);

    // The same with every pack stored: several at once, and the set restores.
    let counting = Arc::new(TwoPacksAtOnce::new(store.clone(), None));
    assert_eq!(rig.backup_through(counting.clone(), id), None);
    assert!(counting.most_in_flight() >= 2);
    check_invariants(&rig, id);
    let set = rig
        .engine
        .catalog()
        .list_backups(id)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(set.status, BackupStatus::Success);
    assert!(rig.clean.read_manifest(id, &set.id).unwrap().stats.packs >= 3);
    restores_as(
        &rig,
        id,
        &set.id,
        RecoveryTarget::Immediate,
        &dir,
        digest,
        &source_digest,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn backups_under_storage_faults_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
    scenario(store, "local");
}

#[test]
fn backups_under_storage_faults_on_s3() {
    let server = S3Server::start();
    let mut config = S3Config::from_url(&format!("s3://{}/faults", S3Server::BUCKET)).unwrap();
    config.endpoint = Some(server.endpoint());
    config.access_key_id = Some(S3Server::ACCESS_KEY.into());
    config.secret_access_key = Some(S3Server::SECRET_KEY.into());
    config.path_style = true;
    config.allow_http = true;
    scenario(Arc::new(S3Storage::new(config).unwrap()), "s3");
}

#[test]
fn backups_under_storage_faults_on_gcs() {
    let server = FakeGcs::start();
    let mut config = GcsConfig::from_url(&format!("gs://{}/faults", FakeGcs::BUCKET)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(server.endpoint());
    scenario(Arc::new(GcsStorage::new(config).unwrap()), "gcs");
}

#[test]
fn backups_under_storage_faults_on_azure() {
    let azurite = Azurite::start();
    let mut config =
        AzureConfig::from_url(&format!("azure://{}/faults", Azurite::CONTAINER)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(azurite.endpoint());
    scenario(Arc::new(AzureStorage::new(config).unwrap()), "azure");
}
