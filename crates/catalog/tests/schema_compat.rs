//! A catalog written by an earlier release must open and read back
//! unchanged. `fixtures/catalog-v7.sqlite` was written by the release whose
//! schema ended at migration 7 (leases and GC holds), through [`populate`]
//! below; this test copies it, opens it with the current code (which applies
//! any later migration) and reads every row back. A second test runs
//! [`populate`] on a fresh catalog and checks it stores what the fixture
//! holds, so the fixture and its writer cannot drift apart.
//!
//! To rewrite the fixture (only ever on purpose, with the release that
//! defines its schema): `STRATA_WRITE_CATALOG_FIXTURE=1 cargo test -p
//! strata-catalog --test schema_compat`.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use pg_wal::{Lsn, TimelineId};
use strata_catalog::*;

const FIXTURE: &str = "tests/fixtures/catalog-v7.sqlite";
const INSTANCE: &str = "fixture-db";

fn at(h: u32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 6, h, m, 0).unwrap()
}

fn instance() -> Instance {
    Instance {
        id: INSTANCE.into(),
        host: "db.example".into(),
        port: 5433,
        user: "strata".into(),
        password_env: Some("FIXTURE_PW".into()),
        password: Some("s3cret".into()),
        dbname: Some("postgres".into()),
        sslmode: SslMode::VerifyFull,
        sslrootcert: Some("/etc/ca.pem".into()),
        system_identifier: Some(7_400_000_000_000_000_001),
        pg_version_num: Some(160004),
        wal_segment_size: Some(16 << 20),
        created_at: at(1, 0),
        agent_url: None,
        agent_key: None,
        agent_ca: None,
    }
}

fn backup() -> BackupSet {
    BackupSet {
        id: "20261206T010500Z".into(),
        instance_id: INSTANCE.into(),
        status: BackupStatus::Success,
        mode: BackupMode::Automated,
        started_at: at(1, 5),
        finished_at: Some(at(1, 6)),
        start_lsn: Some(Lsn(0x0300_0028)),
        stop_lsn: Some(Lsn(0x0300_0100)),
        start_timeline: Some(TimelineId(1)),
        stop_timeline: Some(TimelineId(1)),
        pg_version_num: Some(160004),
        total_bytes: 40_000_000,
        new_bytes: 30_000_000,
        dedup_bytes: 10_000_000,
        stored_bytes: 9_000_000,
        file_count: 1200,
        error: None,
        job_id: None,
        method: strata_catalog::BackupMethod::Physical,
        snapshot_local: false,
        snapshot_uploaded: false,
        snapshot_bytes: None,
        keep_until: None,
        keep_note: None,
        taken_under: None,
        snapshot_fingerprint: None,
    }
}

fn wal() -> WalSegmentRow {
    WalSegmentRow {
        instance_id: INSTANCE.into(),
        timeline: TimelineId(1),
        segment: "000000010000000000000003".into(),
        partial: false,
        begin_lsn: Lsn(0x0300_0000),
        end_lsn: Lsn(0x0400_0000),
        size: 16 << 20,
        checksum: "ab".repeat(32),
        first_commit: Some(at(1, 5)),
        last_commit: Some(at(1, 7)),
        commit_count: 42,
        min_commit_xid: Some(700),
        max_commit_xid: Some(741),
        object_key: "wal/fixture-db/00000001/000000010000000000000003".into(),
        stored_at: at(1, 8),
    }
}

fn restore_point() -> RestorePointRow {
    RestorePointRow {
        instance_id: INSTANCE.into(),
        timeline: TimelineId(1),
        name: "before-migration".into(),
        lsn: Lsn(0x0300_0200),
        time: at(1, 6),
    }
}

fn policy() -> BackupPolicy {
    BackupPolicy {
        instance_id: INSTANCE.into(),
        backup_days: vec!["Monday".into(), "Thursday".into()],
        backup_window: "01:00Z-02:00Z".into(),
        backup_retention_days: 7,
        log_backup_enabled: true,
        log_retention_days: 3,
        updated_at: at(0, 30),
        last_auto_slot: Some(at(1, 0)),
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

fn managed() -> ManagedInstance {
    ManagedInstance {
        instance_id: "fixture-clone".into(),
        source_instance: INSTANCE.into(),
        backup_id: Some(backup().id),
        restore_time: Some(at(1, 7)),
        data_dir: "/var/lib/strata/clones/fixture-clone".into(),
        port: 6543,
        pg_major: 16,
        status: "Running".into(),
        error: None,
        created_at: at(2, 0),
        agent_clone: None,
    }
}

fn drill() -> DrillResult {
    DrillResult {
        backup_id: backup().id,
        instance_id: INSTANCE.into(),
        status: "Passed".into(),
        detail: "1 database checked".into(),
        started_at: at(3, 0),
        finished_at: Some(at(3, 2)),
        job_id: None,
    }
}

fn cross_policy() -> CrossBackupPolicy {
    CrossBackupPolicy {
        instance_id: INSTANCE.into(),
        region: "eu-2".into(),
        backup_enabled: true,
        log_backup_enabled: true,
        retention_days: 14,
        backup_enabled_at: Some(at(0, 40)),
        log_backup_enabled_at: Some(at(0, 41)),
        updated_at: at(0, 41),
    }
}

fn usage() -> UsageSample {
    UsageSample {
        instance_id: INSTANCE.into(),
        at: at(4, 0),
        logical_bytes: 40_000_000,
        data_bytes: 9_000_000,
        wal_bytes: 16 << 20,
        quota_bytes: 1 << 30,
        cross_region_bytes: Some(25_000_000),
    }
}

fn key() -> AccessKey {
    AccessKey {
        id: "AKFIXTURE".into(),
        secret: "fixture-secret".into(),
        read_only: true,
        description: "read-only key".into(),
        created_at: at(0, 10),
    }
}

fn gc_pending() -> BTreeMap<String, DateTime<Utc>> {
    BTreeMap::from([("ab".repeat(32), at(5, 0)), ("cd".repeat(32), at(5, 1))])
}

/// Writes one row of every kind the catalog keeps.
fn populate(cat: &SqliteCatalog) {
    cat.add_instance(&instance()).unwrap();
    cat.insert_backup(&backup()).unwrap();
    cat.upsert_wal_segment(&wal()).unwrap();
    cat.upsert_restore_point(&restore_point()).unwrap();
    let mut job = cat.create_job(JobKind::Backup, Some(INSTANCE)).unwrap();
    job.state = JobState::Finished;
    job.progress = 100;
    job.detail = "done".into();
    job.backup_id = Some(backup().id);
    job.finished_at = Some(at(1, 6));
    cat.update_job(&job).unwrap();
    cat.put_policy(&policy()).unwrap();
    cat.put_managed(&managed()).unwrap();
    cat.put_drill(&drill()).unwrap();
    cat.put_cross_policy(&cross_policy()).unwrap();
    cat.insert_cross_backup("eu-2", &backup(), 8_000_000, at(1, 10))
        .unwrap();
    cat.insert_cross_wal("eu-2", &wal(), at(1, 11)).unwrap();
    cat.add_usage_sample(&usage()).unwrap();
    cat.add_access_key(&key()).unwrap();
    assert!(cat
        .admit_nonce(&key().id, "nonce-1", at(5, 0), at(4, 0))
        .unwrap());
    cat.put_gc_pending("repo-fixture", &gc_pending()).unwrap();
}

/// Reads back every row [`populate`] wrote and compares it with what was
/// written.
fn check(cat: &SqliteCatalog) {
    assert_eq!(cat.list_instances().unwrap(), vec![instance()]);
    assert_eq!(cat.list_backups(INSTANCE).unwrap(), vec![backup()]);
    assert_eq!(cat.list_wal_segments(INSTANCE).unwrap(), vec![wal()]);
    assert_eq!(
        cat.list_restore_points(INSTANCE).unwrap(),
        vec![restore_point()]
    );
    let jobs = cat.list_jobs(Some(INSTANCE)).unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.kind, JobKind::Backup);
    assert_eq!(job.state, JobState::Finished);
    assert_eq!(job.progress, 100);
    assert_eq!(job.detail, "done");
    assert_eq!(job.backup_id, Some(backup().id));
    assert_eq!(job.finished_at, Some(at(1, 6)));
    assert_eq!(job.owner.as_str().len(), 32, "owner {:?}", job.owner);
    assert_eq!(cat.get_policy(INSTANCE).unwrap(), Some(policy()));
    assert_eq!(cat.list_managed().unwrap(), vec![managed()]);
    assert_eq!(cat.list_drills(INSTANCE).unwrap(), vec![drill()]);
    assert_eq!(
        cat.get_cross_policy(INSTANCE).unwrap(),
        Some(cross_policy())
    );
    let copies = cat.list_cross_backups(INSTANCE).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(
        (
            copies[0].region.as_str(),
            &copies[0].set,
            copies[0].copied_bytes
        ),
        ("eu-2", &backup(), 8_000_000)
    );
    assert_eq!(copies[0].copied_at, at(1, 10));
    let wal_copies = cat.list_cross_wal(INSTANCE).unwrap();
    assert_eq!(wal_copies.len(), 1);
    assert_eq!(
        (wal_copies[0].region.as_str(), &wal_copies[0].row),
        ("eu-2", &wal())
    );
    assert_eq!(
        cat.list_usage_samples(INSTANCE, None, None).unwrap(),
        vec![usage()]
    );
    assert_eq!(cat.list_access_keys().unwrap(), vec![key()]);
    assert_eq!(
        cat.get_access_key(&key().id).unwrap().unwrap().secret,
        key().secret
    );
    // The nonce recorded then is still known: a replay is refused.
    assert!(!cat
        .admit_nonce(&key().id, "nonce-1", at(5, 0), at(4, 0))
        .unwrap());
    assert_eq!(cat.gc_pending("repo-fixture").unwrap(), gc_pending());
}

fn schema_version(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_catalog_from_the_previous_release_opens_upgrades_and_reads_back() {
    if std::env::var_os("STRATA_WRITE_CATALOG_FIXTURE").is_some() {
        let _ = std::fs::remove_file(FIXTURE);
        let cat = SqliteCatalog::open(Path::new(FIXTURE)).unwrap();
        populate(&cat);
        drop(cat);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    std::fs::copy(FIXTURE, &path).unwrap();
    assert_eq!(schema_version(&path), 7, "the fixture's own schema version");
    let cat = SqliteCatalog::open(&path).unwrap();
    check(&cat);
    drop(cat);
    assert!(schema_version(&path) >= 7);
}

#[test]
fn todays_writer_stores_what_the_fixture_holds() {
    let cat = SqliteCatalog::open_in_memory().unwrap();
    populate(&cat);
    check(&cat);
}

/// A catalog left at any earlier step of [`MIGRATIONS`] (built here from the
/// list itself, as another backend would follow it) upgrades to the newest
/// version on open and keeps its rows.
#[test]
fn a_catalog_at_every_earlier_version_upgrades_and_keeps_its_rows() {
    let newest = MIGRATIONS.last().unwrap().version;
    for reached in 1..newest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            for step in MIGRATIONS.iter().take_while(|m| m.version <= reached) {
                conn.execute_batch(step.sqlite).unwrap();
            }
            conn.pragma_update(None, "user_version", reached).unwrap();
            conn.execute(
                "INSERT INTO instances (id, host, port, user_name, sslmode, created_at) \
                 VALUES ('old-db', 'db.example', 5432, 'strata', 'prefer', '2026-12-06T01:00:00Z')",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO jobs (kind, instance_id, state, started_at, pid) \
                 VALUES ('backup', 'old-db', 'Finished', '2026-12-06T01:00:00Z', 42)",
                [],
            )
            .unwrap();
        }
        let cat = SqliteCatalog::open(&path).unwrap();
        assert_eq!(schema_version(&path), newest, "from version {reached}");
        let i = cat.get_instance("old-db").unwrap();
        assert_eq!(
            (i.host.as_str(), i.port, i.sslmode, i.created_at, i.password),
            ("db.example", 5432, SslMode::Prefer, at(1, 0), None)
        );
        let jobs = cat.list_jobs(Some("old-db")).unwrap();
        assert_eq!(jobs.len(), 1, "from version {reached}");
        assert_eq!(
            (jobs[0].kind, jobs[0].state),
            (JobKind::Backup, JobState::Finished)
        );
        // Every table of the newest schema is there and usable.
        populate(&cat);
    }
}
