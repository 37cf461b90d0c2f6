//! The engine's orchestration on in-memory parts: a catalog in memory and a
//! repository in memory (`MemoryStorage`), no PostgreSQL and no file system
//! but the lock file. Retention deletes what the policy lets go and keeps
//! the newest set; garbage collection then frees exactly the packs of the
//! deleted sets; expired WAL waits while a reader holds the repository.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId};
use strata_catalog::{
    BackupMode, BackupPolicy, BackupSet, BackupStatus, Catalog, Instance, SqliteCatalog, SslMode,
    WalSegmentRow,
};
use strata_engine::{Engine, EngineSettings};
use strata_repo::manifest::{BackupManifest, FileEntry, FileKind};
use strata_repo::{pack_key, BlockIndex, BlockRef, MemoryStorage, Repository, Storage};

struct Rig {
    engine: Engine,
    storage: Arc<MemoryStorage>,
    _lock_dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let lock_dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(MemoryStorage::new());
    let repo = Repository::open_or_init(storage.clone()).unwrap();
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
    catalog
        .add_instance(&Instance::new(
            "i",
            "127.0.0.1",
            5432,
            "postgres",
            SslMode::Disable,
        ))
        .unwrap();
    let settings = EngineSettings {
        gc_grace: Duration::ZERO,
        ..EngineSettings::default()
    };
    Rig {
        engine: Engine::new(catalog, repo, settings),
        storage,
        _lock_dir: lock_dir,
    }
}

fn days_ago(n: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(n)
}

/// A successful set finished `age` days ago, committed with one block of
/// its own (in a pack of its own) covering LSNs [lsn, lsn + 100].
fn backup(rig: &Rig, id: &str, age: i64, lsn: u64) -> BlockRef {
    let repo = rig.engine.repo();
    let mut w = repo.block_writer(BlockIndex::default());
    let block = w.add(&vec![lsn as u8; 4096]).unwrap();
    w.finish().unwrap();
    let mut m: BackupManifest = serde_json::from_value(serde_json::json!({
        "format_version": 1, "backup_id": id, "instance_id": "i", "mode": "Automated",
        "system_identifier": "1", "pg_version_num": 150000, "wal_segment_size": 16777216,
        "label": "t", "start_lsn": Lsn(lsn).to_string(), "start_timeline": 1,
        "stop_lsn": Lsn(lsn + 100).to_string(), "stop_timeline": 1,
        "start_time": days_ago(age), "stop_time": days_ago(age),
        "tablespaces": [], "files": [], "server_manifest": null,
        "stats": {"file_count": 1, "total_bytes": 4096, "new_bytes": 4096, "dedup_bytes": 0,
                  "stored_bytes": 0, "new_blocks": 1, "dedup_blocks": 0, "packs": 1}
    }))
    .unwrap();
    m.files.push(FileEntry {
        tablespace: None,
        path: "base/1/1".into(),
        kind: FileKind::File,
        mode: 0o600,
        size: 4096,
        mtime: 0,
        link_target: None,
        crc32c: None,
        blocks: vec![block.clone()],
    });
    repo.commit_manifest(&m).unwrap();
    let mut set = BackupSet::started(id.into(), "i", BackupMode::Automated, days_ago(age), None);
    set.status = BackupStatus::Success;
    set.finished_at = Some(days_ago(age));
    set.start_lsn = Some(Lsn(lsn));
    set.stop_lsn = Some(Lsn(lsn + 100));
    set.start_timeline = Some(TimelineId(1));
    set.stop_timeline = Some(TimelineId(1));
    rig.engine.catalog().insert_backup(&set).unwrap();
    block
}

/// A WAL object received `age` days ago covering [begin, end).
fn wal(rig: &Rig, age: i64, begin: u64, end: u64) -> WalSegmentRow {
    let key = format!("instances/i/wal/{begin:016X}");
    rig.storage.put(&key, b"wal bytes").unwrap();
    let row = WalSegmentRow {
        instance_id: "i".into(),
        timeline: TimelineId(1),
        segment: format!("{begin:024X}"),
        partial: false,
        begin_lsn: Lsn(begin),
        end_lsn: Lsn(end),
        size: 9,
        checksum: String::new(),
        first_commit: None,
        last_commit: None,
        commit_count: 0,
        min_commit_xid: None,
        max_commit_xid: None,
        object_key: key,
        stored_at: days_ago(age),
    };
    rig.engine.catalog().upsert_wal_segment(&row).unwrap();
    row
}

fn policy(days: u32) -> BackupPolicy {
    BackupPolicy {
        instance_id: "i".into(),
        backup_days: vec!["Monday".into()],
        backup_window: "02:00Z-03:00Z".into(),
        backup_retention_days: days,
        log_backup_enabled: false,
        log_retention_days: days,
        updated_at: Utc::now(),
        last_auto_slot: None,
        backup_method: strata_catalog::BackupMethod::Physical,
        backup_interval_minutes: None,
        advanced_enabled: false,
        advanced_data_rules: Vec::new(),
        advanced_log_retention_days: None,
        archive_retention_days: 0,
        archive_keep_policy: strata_catalog::ArchiveKeepPolicy::ByMonth,
        archive_keep_count: 1,
        keep_last: None,
    }
}

#[test]
fn retention_then_collection_frees_exactly_the_deleted_sets() {
    let rig = rig();
    let old = backup(&rig, "100", 20, 1000);
    let older = backup(&rig, "50", 30, 500);
    let newest = backup(&rig, "200", 1, 2000);
    let plan = rig.engine.apply_retention(&policy(7), Utc::now()).unwrap();
    let mut gone = plan.backups.clone();
    gone.sort();
    assert_eq!(gone, ["100", "50"]);
    let left: Vec<String> = rig
        .engine
        .catalog()
        .list_backups("i")
        .unwrap()
        .into_iter()
        .map(|b| b.id.into_string())
        .collect();
    assert_eq!(left, ["200"]);

    let report = rig
        .engine
        .collect_garbage()
        .unwrap()
        .expect("no reader holds the repository");
    assert_eq!(report.packs_deleted, 2);
    let packs = |b: &BlockRef| rig.storage.exists(&pack_key(&b.pack)).unwrap();
    assert!(!packs(&old) && !packs(&older) && packs(&newest));
    assert_eq!(
        rig.engine.repo().read_block(&newest).unwrap(),
        vec![2000u64 as u8; 4096]
    );

    // Even long expired, the newest set stays.
    let plan = rig
        .engine
        .apply_retention(&policy(0), Utc::now() + chrono::Duration::days(90))
        .unwrap();
    assert!(plan.backups.is_empty(), "{plan:?}");
}

#[test]
fn expired_wal_waits_while_a_reader_holds_the_repository() {
    let rig = rig();
    backup(&rig, "300", 1, 3000);
    let expired = wal(&rig, 20, 100, 200);
    let needed = wal(&rig, 1, 3000, 3100);

    let reader = rig.engine.hold_gc_blocking().unwrap();
    let plan = rig.engine.apply_retention(&policy(7), Utc::now()).unwrap();
    assert!(plan.wal.is_empty(), "deleted under a reader: {plan:?}");
    assert!(rig.storage.exists(&expired.object_key).unwrap());
    assert!(rig.engine.collect_garbage().unwrap().is_none());
    drop(reader);

    let plan = rig.engine.apply_retention(&policy(7), Utc::now()).unwrap();
    assert_eq!(plan.wal.len(), 1, "{plan:?}");
    assert!(!rig.storage.exists(&expired.object_key).unwrap());
    assert!(rig.storage.exists(&needed.object_key).unwrap());
    let rows = rig.engine.catalog().list_wal_segments("i").unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].begin_lsn, Lsn(3000));
}
