//! Snapshot backups uploaded into the repository, on real parts: a PostgreSQL 15 cluster on a
//! loop-mounted XFS (reflink=1) with a tablespace, the agent served in-process, the engine's
//! WAL receiver archiving meanwhile, a local repository. A snapshot taken in backup mode is
//! uploaded, restored from the repository and started (rows equal to the source at the backup
//! point) and downloaded (pg_verifybackup accepts it); after a 1 % change a second snapshot is
//! uploaded against the first reading at most a tenth of the bytes, and restores equal too; a
//! repository that refuses writes, a snapshot deleted mid-upload and an agent stopped
//! mid-upload each fail it, naming the cause, with no manifest in the repository. A snapshot
//! whose file the PostgreSQL OS user rewrote after it was taken is refused and no longer local.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use pg_replication::{ConnectOptions, ReplicationClient};
use strata_agent::{
    Agent, AgentClient, AgentKey, Fingerprint, FreeFloor, Labels, Layout, SnapshotName,
};
use strata_catalog::{
    BackupId, BackupMethod, BackupMode, BackupSet, BackupStatus, Catalog, Instance, SqliteCatalog,
    SslMode,
};
use strata_engine::{
    Engine, EngineSettings, NoProgress, Progress, RecoveryTarget, RestoreOptions, SnapshotBase,
    SnapshotUpload, StartOptions, UploadReport, WalReceiveOptions,
};
use strata_repo::{LocalStorage, MinFreeSpace, RepoError, Repository};
use testkit::{Cluster, FsKind, LoopFs};

const ID: &str = "snap";
const DB: &str = "bench";

/// An agent serving on 127.0.0.1 until stopped.
struct RunningAgent {
    client: AgentClient,
    stop: tokio::sync::watch::Sender<bool>,
}

async fn start_agent(data_dir: &Path) -> RunningAgent {
    let parent = data_dir.parent().expect("data dir has a parent");
    let layout = Layout {
        data_dir: data_dir.to_path_buf(),
        snapshot_dir: parent.join("strata-snapshots"),
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
    let client = AgentClient::new(&format!("http://{addr}"), key, None).unwrap();
    RunningAgent { client, stop }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the test compares: every pgbench table and the table in the tablespace.
fn digest(c: &Cluster) -> String {
    c.psql(
        DB,
        "SELECT md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts
         UNION ALL SELECT md5(string_agg(bid::text || ':' || bbalance, ',' ORDER BY bid)) FROM pgbench_branches
         UNION ALL SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM in_ts",
    )
}

/// A snapshot backup as the server side takes one: backup mode on a plain session, a write
/// while in it (replayed from WAL by the restore), the snapshot, backup mode ended, the labels
/// put into the snapshot, the set recorded as a success in the catalog. Returns the set and
/// the source's digest at its consistency point.
async fn snapshot_backup(
    cluster: &Cluster,
    engine: &Engine,
    agent: &AgentClient,
    name: &str,
) -> (BackupId, String) {
    let mut session = ReplicationClient::connect(&ConnectOptions {
        host: cluster.host().to_string(),
        port: cluster.port(),
        dbname: Some("postgres".into()),
        sslmode: pg_replication::SslMode::Disable,
        replication: false,
        ..ConnectOptions::default()
    })
    .await
    .unwrap();
    let started_at = Utc::now();
    let label = format!("strata snapshot {name}");
    let start = session
        .simple_query(&format!("SELECT pg_backup_start('{label}', true)"))
        .await
        .unwrap()[0][0]
        .clone()
        .unwrap();
    cluster.psql(DB, "UPDATE pgbench_branches SET bbalance = bbalance + 1");
    let snapshot = SnapshotName::new(name).unwrap();
    agent.create_snapshot(&snapshot).await.unwrap();
    let stop = session
        .simple_query("SELECT lsn, labelfile, spcmapfile FROM pg_backup_stop(false)")
        .await
        .unwrap()
        .remove(0);
    let (stop_lsn, backup_label, map) = (
        stop[0].clone().unwrap(),
        stop[1].clone().unwrap(),
        stop[2].clone().unwrap_or_default(),
    );
    agent
        .put_labels(
            &snapshot,
            &Labels {
                backup_label,
                tablespace_map: (!map.is_empty()).then_some(map),
            },
        )
        .await
        .unwrap();
    let version: u32 = cluster
        .psql("postgres", "SHOW server_version_num")
        .trim()
        .parse()
        .unwrap();
    let id = BackupId::new(format!("{}", started_at.timestamp_millis()));
    let mut set = BackupSet::started(id.clone(), ID, BackupMode::Manual, started_at, None);
    set.status = BackupStatus::Success;
    set.finished_at = Some(Utc::now());
    set.start_lsn = Some(start.parse().unwrap());
    set.stop_lsn = Some(stop_lsn.parse().unwrap());
    set.start_timeline = Some(pg_wal::TimelineId(1));
    set.stop_timeline = Some(pg_wal::TimelineId(1));
    set.pg_version_num = Some(version);
    engine.catalog().insert_backup(&set).unwrap();
    let source = digest(cluster);
    // The WAL up to the stop position archived, as a snapshot set needs for a restore.
    cluster.psql("postgres", "SELECT pg_switch_wal()");
    let stop_lsn = set.stop_lsn.unwrap();
    wait_for("the WAL up to the backup's end is archived", || {
        engine
            .catalog()
            .list_wal_segments(ID)
            .unwrap()
            .iter()
            .any(|w| w.end_lsn >= stop_lsn)
    });
    (id, source)
}

fn upload(
    runtime: &tokio::runtime::Runtime,
    engine: &Engine,
    agent: &AgentClient,
    id: &BackupId,
    name: &str,
    base: Option<(&str, &BackupId)>,
    progress: &dyn Progress,
) -> Result<UploadReport, strata_engine::EngineError> {
    runtime.block_on(engine.upload_snapshot(
        SnapshotUpload {
            instance_id: ID.into(),
            backup_id: id.clone(),
            agent: agent.clone(),
            snapshot: SnapshotName::new(name).unwrap(),
            base: base.map(|(snapshot, backup_id)| SnapshotBase {
                snapshot: SnapshotName::new(snapshot).unwrap(),
                backup_id: backup_id.clone(),
            }),
        },
        progress,
    ))
}

/// Restores set `id` from the repository to its consistency point, starts it and returns its
/// digest.
fn restore_digest(engine: &Engine, dir: &Path, id: &BackupId) -> String {
    let target = dir.join(format!("restored-{id}"));
    let port = testkit::free_port();
    engine
        .restore(
            ID,
            &RestoreOptions {
                target_dir: target.clone(),
                delta: false,
                backup_id: Some(id.clone()),
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
        .expect("the restore of an uploaded snapshot failed");
    let restored = Cluster::adopt(15, target, port);
    digest(&restored)
}

/// Downloads set `id` and has pg_verifybackup check the files against the set's
/// backup_manifest.
fn verify_download(engine: &Engine, dir: &Path, id: &BackupId) {
    let archive = engine.backup_archive(ID, id).unwrap();
    let mut bytes = Vec::new();
    archive.write(&mut bytes, None).unwrap();
    drop(archive);
    let out_dir = dir.join(format!("downloaded-{id}"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut found = Vec::new();
    for entry in tar::Archive::new(&bytes[..]).entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().to_string();
        match name.as_str() {
            "base.tar" => tar::Archive::new(&mut entry).unpack(&out_dir).unwrap(),
            "backup_manifest" => {
                entry.unpack(out_dir.join("backup_manifest")).unwrap();
            }
            n if n.ends_with(".tar") && n != "pg_wal.tar" => {
                // A tablespace: where its link in the manifest says it goes.
                let oid = n.trim_end_matches(".tar");
                let ts = out_dir.join("pg_tblspc").join(oid);
                std::fs::create_dir_all(&ts).unwrap();
                tar::Archive::new(&mut entry).unpack(&ts).unwrap();
            }
            _ => {}
        }
        found.push(name);
    }
    assert!(found.contains(&"backup_manifest".to_string()), "{found:?}");
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_verifybackup")
        .args(["--no-parse-wal", "--quiet"])
        .arg(&out_dir)
        .output()
        .expect("run pg_verifybackup");
    assert!(
        out.status.success(),
        "pg_verifybackup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the agent once the upload has read `after` bytes.
struct StopAgentAfter {
    after: u64,
    stop: tokio::sync::watch::Sender<bool>,
    stopped: AtomicBool,
}

impl Progress for StopAgentAfter {
    fn update(&self, _: &str, done: u64, _: Option<u64>) {
        if done >= self.after && !self.stopped.swap(true, Ordering::SeqCst) {
            let _ = self.stop.send(true);
        }
    }
    fn message(&self, _: &str) {}
}

/// Deletes a snapshot directory on the host once the upload has read `after` bytes.
struct DeleteAfter {
    after: u64,
    dir: PathBuf,
    done: AtomicBool,
}

impl Progress for DeleteAfter {
    fn update(&self, _: &str, done: u64, _: Option<u64>) {
        if done >= self.after && !self.done.swap(true, Ordering::SeqCst) {
            std::fs::remove_dir_all(&self.dir).unwrap();
        }
    }
    fn message(&self, _: &str) {}
}

/// No manifest of set `id` in the repository: nothing half-uploaded can be restored.
fn assert_not_committed(repo: &Repository, id: &BackupId) {
    assert!(matches!(
        repo.read_manifest(ID, id),
        Err(RepoError::BackupNotFound(_))
    ));
    assert!(!repo.list_backups(ID).unwrap().contains(id));
}

#[test]
fn a_snapshot_uploads_restores_and_the_next_reads_only_changed_blocks() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 500, true) else {
        return;
    };
    let cluster = Cluster::builder(15)
        .in_dir(fs.path())
        .conf("autovacuum = off")
        .conf("checkpoint_timeout = 1h")
        .conf("max_wal_size = 96MB")
        .conf("min_wal_size = 32MB")
        .start();
    cluster.psql("postgres", &format!("CREATE DATABASE {DB}"));
    cluster.pgbench(DB, &["-i", "-q", "-s", "1"]);
    let ts_dir = fs.path().join("tablespace");
    std::fs::create_dir(&ts_dir).unwrap();
    let ok = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&ts_dir)
        .status()
        .unwrap();
    assert!(ok.success());
    cluster.psql(
        "postgres",
        &format!("CREATE TABLESPACE ts LOCATION '{}'", ts_dir.display()),
    );
    cluster.psql(
        DB,
        "CREATE TABLE in_ts (id int) TABLESPACE ts; INSERT INTO in_ts SELECT generate_series(1, 5000)",
    );
    // Hint bits and visibility set now, so later reads dirty no page of the first snapshot.
    cluster.psql(DB, "VACUUM (FREEZE, ANALYZE)");
    cluster.psql("postgres", "CHECKPOINT");

    let dir: PathBuf = testkit::temp_dir("strata-snapshot-upload-");
    let storage = Arc::new(LocalStorage::new(dir.join("repo")).unwrap());
    let repo = Repository::open_or_init(storage).unwrap();
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let engine = Engine::new(
        catalog,
        repo.clone(),
        EngineSettings {
            os_user: Some("postgres".into()),
            start_timeout: Duration::from_secs(90),
            ..EngineSettings::default()
        },
    );
    engine
        .add_instance(&Instance::new(
            ID,
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
    let (stop_wal, shutdown) = tokio::sync::watch::channel(false);
    let receiver = {
        let engine = engine.clone();
        runtime.spawn(async move {
            engine
                .receive_wal(ID, shutdown, WalReceiveOptions::default(), &NoProgress)
                .await
        })
    };
    let slot = strata_engine::slot_name(ID);
    wait_for("the WAL receiver streams from its slot", || {
        cluster
            .psql(
                "postgres",
                &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"),
            )
            .trim()
            == "t"
    });
    let agent = runtime.block_on(start_agent(cluster.data_dir()));

    // 1. The first snapshot, uploaded whole, restored and downloaded.
    let (first, source1) =
        runtime.block_on(snapshot_backup(&cluster, &engine, &agent.client, "s1"));
    let r1 = upload(
        &runtime,
        &engine,
        &agent.client,
        &first,
        "s1",
        None,
        &NoProgress,
    )
    .unwrap();
    eprintln!("first upload: {r1:?}");
    assert_eq!(r1.reused_bytes, 0);
    assert_eq!(r1.read_bytes, r1.total_bytes);
    assert!(r1.total_bytes > 20 << 20, "{r1:?}");
    let m1 = repo.read_manifest(ID, &first).unwrap();
    assert_eq!(m1.label, "strata snapshot s1");
    assert_eq!(m1.mode, "Manual");
    assert_eq!(m1.tablespaces.len(), 1);
    assert!(m1.files.iter().any(|f| f.tablespace.is_some()));
    assert!(m1.files.iter().any(|f| f.path == "backup_label"));
    assert_eq!(
        m1.stats.new_bytes + m1.stats.dedup_bytes,
        m1.stats.total_bytes
    );
    assert_eq!(restore_digest(&engine, &dir, &first), source1);
    verify_download(&engine, &dir, &first);

    // 2. About 1 % of pgbench_accounts' pages changed, a second snapshot uploaded against
    // the first.
    let pages: u64 = cluster
        .psql(DB, "SELECT pg_relation_size('pgbench_accounts') / 8192")
        .trim()
        .parse()
        .unwrap();
    let rows = pages * 61 / 100;
    cluster.psql(
        DB,
        &format!("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= {rows}"),
    );
    let (second, source2) =
        runtime.block_on(snapshot_backup(&cluster, &engine, &agent.client, "s2"));
    assert_ne!(source1, source2);
    let r2 = upload(
        &runtime,
        &engine,
        &agent.client,
        &second,
        "s2",
        Some(("s1", &first)),
        &NoProgress,
    )
    .unwrap();
    eprintln!("second upload: {r2:?}");
    eprintln!(
        "bytes read from the agent: first upload {} ({} MiB), after a 1 % change {} ({:.2} % of the first)",
        r1.read_bytes,
        r1.read_bytes >> 20,
        r2.read_bytes,
        r2.read_bytes as f64 * 100.0 / r1.read_bytes as f64
    );
    assert_eq!(r2.base.as_ref(), Some(&first));
    assert!(
        r2.read_bytes * 10 <= r1.read_bytes,
        "read {} bytes after a 1 % change, the first upload {}",
        r2.read_bytes,
        r1.read_bytes
    );
    assert_eq!(r2.read_bytes + r2.reused_bytes, r2.total_bytes);
    let m2 = repo.read_manifest(ID, &second).unwrap();
    assert_eq!(m2.incremental_from.as_ref(), Some(&first));
    assert_eq!(m2.received_bytes, Some(r2.read_bytes));
    assert_eq!(restore_digest(&engine, &dir, &second), source2);
    verify_download(&engine, &dir, &second);

    // 3. The repository refuses writes (its file system under the free-space minimum): the
    // upload fails with the repository's reason, and no set is committed.
    let (third, _) = runtime.block_on(snapshot_backup(&cluster, &engine, &agent.client, "s3"));
    let full = LocalStorage::new(dir.join("repo"))
        .unwrap()
        .with_min_free(MinFreeSpace {
            bytes: u64::MAX,
            percent: 100,
        });
    let full_engine = engine.with_repo(Repository::open(Arc::new(full)).unwrap());
    let err = upload(
        &runtime,
        &full_engine,
        &agent.client,
        &third,
        "s3",
        None,
        &NoProgress,
    )
    .expect_err("an upload into a full repository succeeded");
    eprintln!("upload into a full repository: {err}");
    assert!(err.to_string().contains("below the minimum"), "{err}");
    assert_not_committed(&repo, &third);

    // 4. The snapshot is deleted on the host mid-upload: the upload fails naming it.
    let snapshot_dir = cluster
        .data_dir()
        .parent()
        .unwrap()
        .join("strata-snapshots/s3");
    let deleter = DeleteAfter {
        after: 1 << 20,
        dir: snapshot_dir.clone(),
        done: AtomicBool::new(false),
    };
    let err = upload(
        &runtime,
        &engine,
        &agent.client,
        &third,
        "s3",
        None,
        &deleter,
    )
    .expect_err("an upload of a deleted snapshot succeeded");
    eprintln!("upload of a snapshot deleted meanwhile: {err}");
    assert!(deleter.done.load(Ordering::SeqCst) && !snapshot_dir.exists());
    // Caught whole or while its files are going: either names the snapshot.
    let text = err.to_string();
    assert!(
        text.contains("no snapshot s3") || text.contains("snapshot s3 has no file"),
        "{err}"
    );
    assert!(err.to_string().contains(agent.client.url()), "{err}");
    assert_not_committed(&repo, &third);

    // 5. The agent stops mid-upload: the upload fails naming it, and no set is committed.
    let (fourth, _) = runtime.block_on(snapshot_backup(&cluster, &engine, &agent.client, "s4"));
    let stopper = StopAgentAfter {
        after: 1 << 20,
        stop: agent.stop.clone(),
        stopped: AtomicBool::new(false),
    };
    let err = upload(
        &runtime,
        &engine,
        &agent.client,
        &fourth,
        "s4",
        None,
        &stopper,
    )
    .expect_err("an upload from a stopped agent succeeded");
    eprintln!("upload with the agent stopped: {err}");
    assert!(stopper.stopped.load(Ordering::SeqCst));
    assert!(
        err.to_string().contains(agent.client.url()),
        "the error does not name the agent: {err}"
    );
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(err.to_string().contains("snapshot s4"), "{err}");
    assert_not_committed(&repo, &fourth);
    // What is committed is exactly the two uploaded sets, every block they name intact.
    assert_eq!(repo.list_backups(ID).unwrap(), vec![first, second]);
    let verified = repo.verify(&|_, _| {}).unwrap();
    assert!(verified.problems.is_empty(), "{:?}", verified.problems);
    assert_eq!(verified.backups_checked, 2);

    stop_wal.send(true).unwrap();
    runtime.block_on(receiver).unwrap().unwrap();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Records the snapshot's fingerprint on set `id`, as a snapshot backup does once its labels
/// are in, and the set as local.
fn fingerprint_set(
    runtime: &tokio::runtime::Runtime,
    engine: &Engine,
    agent: &AgentClient,
    id: &BackupId,
    name: &str,
) {
    let listing = runtime
        .block_on(agent.manifest(&SnapshotName::new(name).unwrap()))
        .unwrap();
    let mut set = engine.catalog().get_backup(id).unwrap();
    set.method = BackupMethod::Snapshot;
    set.snapshot_local = true;
    set.snapshot_fingerprint = Some(Fingerprint::of(&listing).unwrap().to_string());
    engine.catalog().update_backup(&set).unwrap();
}

fn run_as_postgres(args: &[&str]) {
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_snapshot_changed_on_the_host_after_it_was_taken_is_not_uploaded() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let cluster = Cluster::builder(15)
        .in_dir(fs.path())
        .conf("autovacuum = off")
        .start();
    cluster.psql("postgres", &format!("CREATE DATABASE {DB}"));
    cluster.pgbench(DB, &["-i", "-q", "-s", "1"]);
    cluster.psql(DB, "CREATE TABLE in_ts (id int)");
    cluster.psql("postgres", "CHECKPOINT");

    let dir: PathBuf = testkit::temp_dir("strata-snapshot-tamper-");
    let storage = Arc::new(LocalStorage::new(dir.join("repo")).unwrap());
    let repo = Repository::open_or_init(storage).unwrap();
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let engine = Engine::new(
        catalog,
        repo.clone(),
        EngineSettings {
            os_user: Some("postgres".into()),
            ..EngineSettings::default()
        },
    );
    engine
        .add_instance(&Instance::new(
            ID,
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
    let (stop_wal, shutdown) = tokio::sync::watch::channel(false);
    let receiver = {
        let engine = engine.clone();
        runtime.spawn(async move {
            engine
                .receive_wal(ID, shutdown, WalReceiveOptions::default(), &NoProgress)
                .await
        })
    };
    let slot = strata_engine::slot_name(ID);
    wait_for("the WAL receiver streams from its slot", || {
        cluster
            .psql(
                "postgres",
                &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"),
            )
            .trim()
            == "t"
    });
    let agent = runtime.block_on(start_agent(cluster.data_dir()));
    let relation = cluster
        .psql(DB, "SELECT pg_relation_filepath('pgbench_accounts')")
        .trim()
        .to_string();

    // One byte of a relation in the snapshot rewritten by the PostgreSQL OS user, its mtime
    // put back: the upload is refused naming the file, and nothing is committed.
    let (changed, _) = runtime.block_on(snapshot_backup(&cluster, &engine, &agent.client, "t1"));
    fingerprint_set(&runtime, &engine, &agent.client, &changed, "t1");
    let file = cluster
        .data_dir()
        .parent()
        .unwrap()
        .join("strata-snapshots/t1")
        .join(&relation)
        .display()
        .to_string();
    let stamp = fs.path().join("mtime-ref").display().to_string();
    let ok = std::process::Command::new("touch")
        .args(["-r", &file, &stamp])
        .status()
        .unwrap();
    assert!(ok.success());
    let before = std::fs::read(&file).unwrap();
    run_as_postgres(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={file}"),
        "bs=1",
        "count=1",
        "seek=8200",
        "conv=notrunc",
    ]);
    run_as_postgres(&["touch", "-r", &stamp, &file]);
    let after = std::fs::read(&file).unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        std::fs::metadata(&stamp).unwrap().modified().unwrap(),
        "the mtime is put back"
    );
    let err = upload(
        &runtime,
        &engine,
        &agent.client,
        &changed,
        "t1",
        None,
        &NoProgress,
    )
    .expect_err("a changed snapshot was uploaded");
    eprintln!("upload of a changed snapshot: {err}");
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot {changed} changed on the database host after it was taken ({relation}: ctime); it is not used: restore from another backup"
        )
    );
    assert_not_committed(&repo, &changed);
    assert!(
        !engine
            .catalog()
            .get_backup(&changed)
            .unwrap()
            .snapshot_local
    );

    // An untouched snapshot still uploads, and its set stays local.
    let (kept, _) = runtime.block_on(snapshot_backup(&cluster, &engine, &agent.client, "t2"));
    fingerprint_set(&runtime, &engine, &agent.client, &kept, "t2");
    let report = upload(
        &runtime,
        &engine,
        &agent.client,
        &kept,
        "t2",
        None,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.read_bytes, report.total_bytes);
    assert_eq!(repo.list_backups(ID).unwrap(), vec![kept.clone()]);
    assert!(engine.catalog().get_backup(&kept).unwrap().snapshot_local);

    stop_wal.send(true).unwrap();
    runtime.block_on(receiver).unwrap().unwrap();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
