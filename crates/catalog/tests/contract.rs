//! The catalog contract: what every backend must do, run against each one.
//!
//! Every test below is a function taking a [`Backend`] (a way to open one
//! more handle on the same catalog, as another process or node would) and
//! runs twice: on a SQLite file in a temporary directory and on a database
//! of its own in a real PostgreSQL 15 server that testkit starts once for
//! this test binary. The concurrency tests race handles (and threads) for
//! the same unique row and check that exactly one wins.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use chrono::{DateTime, DurationRound, Utc};
use pg_wal::{Lsn, TimelineId};
use strata_catalog::prelude::*;
use strata_catalog::*;
use testkit::Cluster;

/// Opens handles on one catalog.
trait Backend {
    /// One more handle, with its own lease owner.
    fn open(&self) -> Arc<dyn Catalog>;
    /// Lets `by` go by on the catalog's clock without waiting, from `t`,
    /// and returns `t + by`: the time to pass as `now` from then on.
    fn pass(&self, t: DateTime<Utc>, by: chrono::Duration) -> DateTime<Utc>;
    /// Runs `sql` on the catalog directly, as an older release would have
    /// written it.
    fn exec(&self, sql: &str);
}

struct Sqlite {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Sqlite {
    fn new() -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Sqlite { _dir: dir, path }
    }
}

impl Backend for Sqlite {
    fn open(&self) -> Arc<dyn Catalog> {
        Arc::new(SqliteCatalog::open(&self.path).unwrap())
    }

    /// SQLite judges leases by the `now` it is given: nothing else to do.
    fn pass(&self, t: DateTime<Utc>, by: chrono::Duration) -> DateTime<Utc> {
        t + by
    }

    fn exec(&self, sql: &str) {
        rusqlite::Connection::open(&self.path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }
}

struct Postgres {
    url: String,
}

impl Postgres {
    fn new(test: &str) -> Postgres {
        Postgres {
            url: testkit::catalog_database(test),
        }
    }
}

impl Backend for Postgres {
    fn open(&self) -> Arc<dyn Catalog> {
        Arc::new(PgCatalog::open(&PgConnect::new(&self.url)).unwrap())
    }

    /// PostgreSQL judges leases by its server's clock, which a test cannot
    /// move: every lease time the catalog holds is moved `by` into the
    /// past instead, which is the same to every lease decision.
    fn pass(&self, t: DateTime<Utc>, by: chrono::Duration) -> DateTime<Utc> {
        let us = by.num_microseconds().unwrap();
        psql_url(
            &self.url,
            &format!(
                "UPDATE instance_owners SET expires_at = expires_at - {us} * interval '1 microsecond';
                 UPDATE jobs SET heartbeat_at = heartbeat_at - {us} * interval '1 microsecond' WHERE NOT queued;
                 UPDATE repo_holds SET expires_at = expires_at - {us} * interval '1 microsecond',
                                       acquired_at = acquired_at - {us} * interval '1 microsecond';
                 UPDATE nodes SET heartbeat_at = heartbeat_at - {us} * interval '1 microsecond'
                   WHERE heartbeat_at > 'epoch';
                 UPDATE console_sessions SET last_seen_at = last_seen_at - {us} * interval '1 microsecond',
                                             created_at = created_at - {us} * interval '1 microsecond';
                 UPDATE used_nonces SET used_at = used_at - {us} * interval '1 microsecond';"
            ),
        );
        t + by
    }

    fn exec(&self, sql: &str) {
        psql_url(&self.url, sql);
    }
}

/// Each contract test on both backends: `sqlite::name` and `postgres::name`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Sqlite::new()); })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(&super::Postgres::new(stringify!($name))); })*
        }
    };
}

contract!(
    instances_round_trip_and_refuse_duplicates,
    deleting_an_instance_forgets_its_policy_for_every_handle,
    sets_outlive_their_instance_as_detached,
    backup_sets_round_trip,
    a_job_belongs_to_its_lease_not_to_its_pid,
    a_job_is_judged_by_its_owners_lease_not_the_observers,
    one_backup_set_of_an_instance_runs_at_a_time,
    racing_handles_start_one_backup_of_an_instance,
    jobs_are_read_by_end_time_and_newest_first,
    old_jobs_are_pruned_but_named_and_newest_ones_kept,
    the_lease_keeper_renews_its_owners_unfinished_jobs,
    gc_pending_is_kept_per_repository,
    repo_holds_exclude_a_collection_from_backups_and_readers_on_every_handle,
    racing_handles_take_one_exclusive_hold,
    every_handle_gets_the_first_shared_secret,
    cross_region_policy_copies_and_wal,
    usage_samples_by_time,
    keys_policies_passwords_and_nonces,
    wal_segments_and_restore_points,
    recovery_events_and_names,
    managed_instances_and_drills,
    clear_index_keeps_everything_else,
    duplicates_are_conflicts_with_their_source,
    racing_handles_register_one_backup_id_once,
    racing_handles_admit_a_nonce_once,
    racing_takeovers_fail_an_expired_job_once,
    a_takeover_and_its_owner_never_both_win,
    heartbeats_insert_then_replace_a_node,
    racing_handles_claim_one_instance_lease_once,
    a_lapsed_lease_is_taken_over_and_a_valid_one_is_not,
    renewal_extends_only_the_nodes_own_leases,
    racing_handles_claim_one_queued_job_once,
    a_queued_job_waits_for_its_next_owner_and_is_never_taken_over,
    receiver_states_are_published_and_replaced,
    console_sessions_are_known_to_every_handle,
    racing_handles_take_a_flash_once,
);

/// Now, to the microsecond every backend keeps.
fn now() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(chrono::Duration::microseconds(1))
        .unwrap()
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn instance(id: &str) -> Instance {
    Instance {
        id: id.into(),
        host: "127.0.0.1".into(),
        port: 5432,
        user: "postgres".into(),
        password_env: None,
        password: None,
        dbname: None,
        sslmode: SslMode::Prefer,
        sslrootcert: None,
        system_identifier: Some(u64::MAX - 3),
        pg_version_num: Some(150018),
        wal_segment_size: Some(16 << 20),
        created_at: now(),
        agent_url: None,
        agent_key: None,
        agent_ca: None,
    }
}

fn policy(instance_id: &str) -> BackupPolicy {
    BackupPolicy {
        instance_id: instance_id.into(),
        backup_days: vec!["Monday".into(), "Friday".into()],
        backup_window: "01:00Z-02:00Z".into(),
        backup_retention_days: 30,
        log_backup_enabled: false,
        log_retention_days: 8,
        updated_at: now(),
        last_auto_slot: Some(now()),
        backup_method: BackupMethod::Physical,
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

fn wal_row(instance_id: &str, segment: &str, partial: bool) -> WalSegmentRow {
    let t = at("2026-11-25T10:00:00.123456Z");
    WalSegmentRow {
        instance_id: instance_id.into(),
        timeline: TimelineId(1),
        segment: segment.into(),
        partial,
        begin_lsn: Lsn(0x100_0000),
        end_lsn: Lsn(if partial { 0x180_0000 } else { 0x200_0000 }),
        size: if partial { 8 << 20 } else { 16 << 20 },
        checksum: "ab".into(),
        first_commit: Some(t),
        last_commit: Some(t),
        commit_count: 3,
        min_commit_xid: Some(700),
        max_commit_xid: Some(u32::MAX),
        object_key: format!("instances/{instance_id}/wal/00000001/{segment}"),
        stored_at: t,
    }
}

fn full_set(id: &str, t: DateTime<Utc>) -> BackupSet {
    BackupSet {
        id: id.into(),
        instance_id: "a".into(),
        status: BackupStatus::Success,
        mode: BackupMode::Manual,
        started_at: t,
        finished_at: Some(t),
        // The top bit set: LSNs are unsigned 64-bit everywhere.
        start_lsn: Some(Lsn(0x8000_0001_0000_0028)),
        stop_lsn: Some(Lsn(0x8000_0001_0000_0100)),
        start_timeline: Some(TimelineId(1)),
        stop_timeline: Some(TimelineId(u32::MAX)),
        pg_version_num: Some(150018),
        total_bytes: 1 << 40,
        new_bytes: 1,
        dedup_bytes: 2,
        stored_bytes: 3,
        file_count: 9,
        error: None,
        job_id: None,
        method: BackupMethod::Physical,
        snapshot_local: false,
        snapshot_uploaded: false,
        snapshot_bytes: None,
        keep_until: None,
        keep_note: None,
        taken_under: None,
        snapshot_fingerprint: None,
    }
}

fn instances_round_trip_and_refuse_duplicates(b: &dyn Backend) {
    let cat = b.open();
    let mut i = instance("a");
    i.password = Some("s3cret".into());
    i.sslmode = SslMode::VerifyFull;
    i.sslrootcert = Some("/etc/ca.pem".into());
    i.agent_url = Some("https://db1.example:7432".into());
    i.agent_key = Some(format!("plain:{}", "ab".repeat(32)));
    i.agent_ca = Some("/etc/agent-ca.pem".into());
    cat.add_instance(&i).unwrap();
    assert!(matches!(
        cat.add_instance(&instance("a")),
        Err(CatalogError::InstanceExists(_))
    ));
    // Another handle (another process or node) reads it back whole.
    let other = b.open();
    assert_eq!(other.get_instance("a").unwrap(), i);
    assert!(matches!(
        other.get_instance("b"),
        Err(CatalogError::InstanceNotFound(_))
    ));

    let mut changed = i.clone();
    changed.host = "db.example".into();
    changed.port = 6543;
    changed.password = None;
    changed.agent_url = Some("https://db2.example:7432".into());
    changed.agent_key = None;
    changed.created_at = now() + chrono::Duration::hours(1);
    other.update_instance(&changed).unwrap();
    let got = cat.get_instance("a").unwrap();
    assert_eq!(
        (got.host.as_str(), got.port, got.password),
        ("db.example", 6543, None)
    );
    assert_eq!(
        (got.agent_url.as_deref(), got.agent_key, got.agent_ca),
        (Some("https://db2.example:7432"), None, i.agent_ca.clone())
    );
    assert_eq!(
        got.created_at, i.created_at,
        "the registration time is kept"
    );
    assert!(matches!(
        cat.update_instance(&instance("zz")),
        Err(CatalogError::InstanceNotFound(_))
    ));
    cat.add_instance(&instance("0-first")).unwrap();
    let ids: Vec<InstanceId> = cat
        .list_instances()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["0-first", "a"]);
}

fn deleting_an_instance_forgets_its_policy_for_every_handle(b: &dyn Backend) {
    let a = b.open();
    let other = b.open();
    a.add_instance(&instance("db1")).unwrap();
    a.put_policy(&policy("db1")).unwrap();
    assert!(matches!(
        other.delete_instance("nope"),
        Err(CatalogError::InstanceNotFound(_))
    ));
    other.delete_instance("db1").unwrap();
    assert!(matches!(
        a.get_instance("db1"),
        Err(CatalogError::InstanceNotFound(_))
    ));
    assert_eq!(a.get_policy("db1").unwrap(), None);
}

fn sets_outlive_their_instance_as_detached(b: &dyn Backend) {
    let cat = b.open();
    let t = now();
    cat.add_instance(&instance("a")).unwrap();
    cat.add_instance(&instance("b")).unwrap();
    let older = full_set("10", t - chrono::Duration::hours(1));
    let newer = full_set("11", t);
    let other = BackupSet {
        instance_id: "b".into(),
        ..full_set("12", t)
    };
    for s in [&newer, &older, &other] {
        cat.insert_backup(s).unwrap();
    }
    assert_eq!(cat.list_detached_backups().unwrap(), vec![]);
    cat.delete_instance("a").unwrap();
    // Oldest first; the registered instance's set is not detached.
    assert_eq!(cat.list_detached_backups().unwrap(), vec![older, newer]);
    assert_eq!(cat.list_backups("b").unwrap(), vec![other]);
}

fn backup_sets_round_trip(b: &dyn Backend) {
    let cat = b.open();
    let t = now();
    let set = full_set("1", t);
    cat.insert_backup(&set).unwrap();
    assert_eq!(cat.get_backup("1").unwrap(), set);
    // A keep by hand (forever, then until a time) and the rule a set was
    // taken under read back as written, and a release clears the keep.
    let mut kept = set.clone();
    kept.keep_until = Some(KeepUntil::Forever);
    kept.keep_note = Some("before the migration".into());
    kept.taken_under = Some(TakenUnder {
        rule: "month-ends".into(),
        retention_days: 365,
    });
    cat.update_backup(&kept).unwrap();
    assert_eq!(cat.get_backup("1").unwrap(), kept);
    kept.keep_until = Some(KeepUntil::Until(t + chrono::Duration::days(400)));
    cat.update_backup(&kept).unwrap();
    assert_eq!(cat.get_backup("1").unwrap(), kept);
    cat.update_backup(&BackupSet {
        keep_until: None,
        keep_note: None,
        ..kept.clone()
    })
    .unwrap();
    let released = cat.get_backup("1").unwrap();
    assert_eq!((released.keep_until, released.keep_note), (None, None));
    assert_eq!(released.taken_under, kept.taken_under);
    cat.update_backup(&set).unwrap();
    assert!(matches!(
        cat.insert_backup(&set),
        Err(CatalogError::BackupExists(_))
    ));
    let mut running = BackupSet::started(
        "0".into(),
        "a",
        BackupMode::Automated,
        t - chrono::Duration::hours(1),
        None,
    );
    cat.insert_backup(&running).unwrap();
    assert_eq!(cat.get_backup("0").unwrap(), running);
    running.status = BackupStatus::Failed;
    running.error = Some("disk full".into());
    cat.update_backup(&running).unwrap();
    assert_eq!(cat.get_backup("0").unwrap(), running);
    let ids: Vec<BackupId> = cat
        .list_backups("a")
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["0", "1"], "oldest first");
    assert!(cat.list_backups("b").unwrap().is_empty());

    // A snapshot set: its method and its local and uploaded states.
    let mut snap = full_set("2", t + chrono::Duration::seconds(1));
    snap.method = BackupMethod::Snapshot;
    snap.snapshot_local = true;
    snap.snapshot_bytes = Some(u64::from(u32::MAX) + 7);
    snap.snapshot_fingerprint = Some(format!("v1:1796000000.123456789:{}", "ab".repeat(32)));
    cat.insert_backup(&snap).unwrap();
    assert_eq!(b.open().get_backup("2").unwrap(), snap);
    assert!(!snap.in_repository());
    snap.snapshot_uploaded = true;
    snap.snapshot_local = false;
    cat.update_backup(&snap).unwrap();
    let read = b.open().get_backup("2").unwrap();
    assert_eq!(read, snap);
    assert!(read.in_repository());

    let mut moved = set.clone();
    moved.instance_id = "b".into();
    assert!(matches!(
        cat.update_backup(&moved),
        Err(CatalogError::Invalid(_))
    ));
    assert!(matches!(
        cat.update_backup(&full_set("nope", t)),
        Err(CatalogError::BackupNotFound(_))
    ));
    cat.put_drill(&DrillResult {
        backup_id: "1".into(),
        instance_id: "a".into(),
        status: "Passed".into(),
        detail: "ok".into(),
        started_at: t,
        finished_at: Some(t),
        job_id: None,
    })
    .unwrap();
    cat.delete_backup("1").unwrap();
    assert_eq!(
        cat.get_drill("1").unwrap(),
        None,
        "the drill goes with its set"
    );
    assert!(matches!(
        cat.delete_backup("1"),
        Err(CatalogError::BackupNotFound(_))
    ));
}

/// A job of `cat`'s owner uploading the running set `id` of `instance`.
fn running_backup(cat: &dyn Catalog, instance: &str, id: &str) -> Job {
    let mut job = cat.create_job(JobKind::Backup, Some(instance)).unwrap();
    job.state = JobState::Uploading;
    job.progress = 49;
    job.backup_id = Some(id.into());
    cat.update_job(&job).unwrap();
    cat.insert_backup(&BackupSet::started(
        id.into(),
        instance,
        BackupMode::Manual,
        now(),
        Some(job.id),
    ))
    .unwrap();
    job
}

/// Two handles on one catalog are two owners in one process (same PID): the
/// PID says nothing, the lease everything.
fn a_job_belongs_to_its_lease_not_to_its_pid(b: &dyn Backend) {
    let dead = b.open();
    let alive = b.open();
    let observer = b.open();
    assert_ne!(dead.lease_owner(), alive.lease_owner());
    assert_eq!(dead.lease_owner().as_str().len(), 32);
    observer.add_instance(&instance("a")).unwrap();
    let lease = chrono::Duration::seconds(30);
    let secs = chrono::Duration::seconds;
    let t0 = now();
    let orphan = running_backup(&*dead, "a", "1");
    let live = running_backup(&*alive, "b", "2");
    assert_eq!(orphan.pid, live.pid);
    assert_eq!(dead.get_job(orphan.id).unwrap(), orphan);
    assert_eq!(dead.get_job(orphan.id).unwrap().owner, *dead.lease_owner());

    // Within the lease nothing is taken over.
    let t = b.pass(t0, lease / 2);
    assert_eq!(observer.fail_expired_jobs(t, lease).unwrap(), 0);

    // `alive` renews, `dead` does not; past the lease only the silent
    // owner's job (same PID as the live one) is failed, with its set.
    let renewed_at = b.pass(t, secs(10));
    assert_eq!(alive.renew_leases(renewed_at).unwrap(), 1);
    let at = b.pass(renewed_at, secs(15));
    assert_eq!(observer.fail_expired_jobs(at, lease).unwrap(), 1);

    let failed = observer.get_job(orphan.id).unwrap();
    assert_eq!(failed.state, JobState::Failed);
    let reason = failed.error.unwrap();
    assert!(
        reason.contains(&format!("its owner {} ", dead.lease_owner()))
            && reason.contains("stopped renewing its lease at"),
        "{reason}"
    );
    let set = observer.get_backup("1").unwrap();
    assert_eq!(set.status, BackupStatus::Failed);
    assert_eq!(set.error.as_deref(), Some(reason.as_str()));

    let kept = observer.get_job(live.id).unwrap();
    assert_eq!(kept.state, JobState::Uploading);
    assert!(
        kept.heartbeat_at > observer.get_job(orphan.id).unwrap().heartbeat_at,
        "the renewal moved the heartbeat"
    );
    assert_eq!(
        observer.get_backup("2").unwrap().status,
        BackupStatus::Running
    );

    // The old owner, waking up, can no longer record an outcome.
    let mut late = dead.get_job(orphan.id).unwrap();
    late.state = JobState::Finished;
    assert!(matches!(
        dead.update_job(&late),
        Err(CatalogError::LeaseLost(id)) if id == orphan.id
    ));
    let mut late_set = dead.get_backup("1").unwrap();
    late_set.status = BackupStatus::Success;
    late_set.error = None;
    assert!(matches!(
        dead.update_backup(&late_set),
        Err(CatalogError::LeaseLost(_))
    ));
    assert_eq!(observer.get_job(orphan.id).unwrap().state, JobState::Failed);
    assert_eq!(
        observer.get_backup("1").unwrap().status,
        BackupStatus::Failed
    );
    let mut ghost = late.clone();
    ghost.id = JobId::new(1 << 40);
    assert!(matches!(
        dead.update_job(&ghost),
        Err(CatalogError::JobNotFound(_))
    ));

    // Renewing touches only unfinished jobs of the owner itself.
    assert_eq!(dead.renew_leases(at).unwrap(), 0);
    // The live one expires too once its owner falls silent; its own owner
    // never takes it over, however old the heartbeat.
    let later = b.pass(at, chrono::Duration::hours(1));
    assert_eq!(
        alive.fail_expired_jobs(later, lease).unwrap(),
        0,
        "own jobs are never taken over"
    );
    assert_eq!(observer.fail_expired_jobs(later, lease).unwrap(), 1);
    assert_eq!(
        observer.get_backup("2").unwrap().status,
        BackupStatus::Failed
    );
    let all: Vec<JobId> = observer
        .list_jobs(None)
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(all, [orphan.id, live.id]);
    assert_eq!(observer.list_jobs(Some("a")).unwrap().len(), 1);
    assert_eq!(observer.list_jobs(Some("b")).unwrap().len(), 1);
    assert!(observer.list_jobs(Some("c")).unwrap().is_empty());
}

/// Owners keep different leases (one node configured with a long one, a
/// CLI with a short one): each job is judged by the lease its owner stored,
/// whatever the observer's own setting.
fn a_job_is_judged_by_its_owners_lease_not_the_observers(b: &dyn Backend) {
    let (long, short, observer) = (b.open(), b.open(), b.open());
    long.set_job_lease(std::time::Duration::from_secs(3600));
    short.set_job_lease(std::time::Duration::from_secs(10));
    let observers_lease = chrono::Duration::seconds(30);
    let patient = running_backup(&*long, "l", "patient");
    let hasty = running_backup(&*short, "s", "hasty");
    assert_eq!(long.get_job(patient.id).unwrap().lease_ms, Some(3_600_000));
    assert_eq!(short.get_job(hasty.id).unwrap().lease_ms, Some(10_000));
    // A job stored before leases were (none recorded) is judged by the
    // observer's lease.
    let old = running_backup(&*short, "o", "from-before");
    b.exec(&format!(
        "UPDATE jobs SET lease_ms = NULL WHERE id = {}",
        old.id.get()
    ));
    assert_eq!(observer.get_job(old.id).unwrap().lease_ms, None);

    // 20 s: past the short owner's lease, within the observer's.
    let t = b.pass(now(), chrono::Duration::seconds(20));
    assert_eq!(observer.fail_expired_jobs(t, observers_lease).unwrap(), 1);
    assert_eq!(observer.get_job(hasty.id).unwrap().state, JobState::Failed);
    assert_eq!(observer.get_job(old.id).unwrap().state, JobState::Uploading);
    // 10 minutes: far past the observer's lease (the old job goes), within
    // the long owner's.
    let t = b.pass(t, chrono::Duration::minutes(10));
    assert_eq!(observer.fail_expired_jobs(t, observers_lease).unwrap(), 1);
    assert_eq!(observer.get_job(old.id).unwrap().state, JobState::Failed);
    assert_eq!(
        observer.get_job(patient.id).unwrap().state,
        JobState::Uploading
    );
    assert_eq!(
        observer.get_backup("patient").unwrap().status,
        BackupStatus::Running
    );
    // A renewal stores the lease the owner keeps now.
    long.set_job_lease(std::time::Duration::from_secs(7200));
    assert_eq!(long.renew_leases(t).unwrap(), 1);
    assert_eq!(long.get_job(patient.id).unwrap().lease_ms, Some(7_200_000));
    let t = b.pass(t, chrono::Duration::minutes(90));
    assert_eq!(observer.fail_expired_jobs(t, observers_lease).unwrap(), 0);
    let t = b.pass(t, chrono::Duration::minutes(31));
    assert_eq!(observer.fail_expired_jobs(t, observers_lease).unwrap(), 1);
    assert_eq!(
        observer.get_backup("patient").unwrap().status,
        BackupStatus::Failed
    );

    // A queued job takes the lease of the owner that claims it.
    let queued = observer.queue_job(JobKind::Backup, "q", None).unwrap();
    assert_eq!(queued.lease_ms, None);
    let claimed = long
        .claim_queued_job(queued.id, "node-1", now())
        .unwrap()
        .unwrap();
    assert_eq!(claimed.lease_ms, Some(7_200_000));
}

/// At most one backup set of an instance is `Running`: a second one is
/// refused on insert and on update, naming the one that runs, and an
/// update never removes the running one to make room.
fn one_backup_set_of_an_instance_runs_at_a_time(b: &dyn Backend) {
    let cat = b.open();
    let running = |id: &str, instance: &str| {
        BackupSet::started(id.into(), instance, BackupMode::Manual, now(), None)
    };
    cat.insert_backup(&running("first", "a")).unwrap();
    match cat.insert_backup(&running("second", "a")) {
        Err(CatalogError::BackupRunning {
            instance_id,
            running,
        }) => assert_eq!((instance_id.as_str(), running.as_str()), ("a", "first")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        cat.get_backup("second"),
        Err(CatalogError::BackupNotFound(_))
    ));
    // Other instances, and sets of the same one that ended, are not in the way.
    cat.insert_backup(&running("other", "b")).unwrap();
    let mut ended = running("ended", "a");
    ended.status = BackupStatus::Failed;
    cat.insert_backup(&ended).unwrap();
    // Reviving the ended set while the first runs is refused, and the
    // first is still there.
    let mut revived = ended.clone();
    revived.status = BackupStatus::Running;
    assert!(matches!(
        cat.update_backup(&revived),
        Err(CatalogError::BackupRunning { ref running, .. }) if running == "first"
    ));
    assert_eq!(
        cat.get_backup("first").unwrap().status,
        BackupStatus::Running
    );
    assert_eq!(
        cat.get_backup("ended").unwrap().status,
        BackupStatus::Failed
    );
    // Progress on the running set itself is no second set.
    let mut first = cat.get_backup("first").unwrap();
    first.total_bytes = 42;
    cat.update_backup(&first).unwrap();
    // Once it ends, the next backup may start.
    first.status = BackupStatus::Success;
    first.finished_at = Some(now());
    cat.update_backup(&first).unwrap();
    cat.insert_backup(&running("second", "a")).unwrap();
    let statuses: Vec<(String, BackupStatus)> = cat
        .list_backups("a")
        .unwrap()
        .into_iter()
        .map(|s| (s.id.to_string(), s.status))
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|(_, s)| *s == BackupStatus::Running)
            .count(),
        1,
        "{statuses:?}"
    );
}

/// Handles (nodes, a CLI) starting a backup of one instance at once: one
/// set runs, every other start is refused as running beside it.
fn racing_handles_start_one_backup_of_an_instance(b: &dyn Backend) {
    for round in 0..5 {
        let instance = format!("raced-{round}");
        let results = race(b, 4, move |cat, n| {
            let set = BackupSet::started(
                format!("{instance}-by-{n}").into(),
                &instance,
                BackupMode::Manual,
                now(),
                None,
            );
            cat.insert_backup(&set).map(|()| n)
        });
        let winners: Vec<usize> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, CatalogError::BackupRunning { running, .. }
                        if *running == format!("raced-{round}-by-{}", winners[0])),
                    "{e:?}"
                );
            }
        }
    }
}

fn old_jobs_are_pruned_but_named_and_newest_ones_kept(b: &dyn Backend) {
    let catalog = b.open();
    let t0 = now();
    let end = |kind: JobKind, instance: Option<&str>, days_ago: i64| {
        let mut j = catalog.create_job(kind, instance).unwrap();
        j.state = JobState::Finished;
        j.finished_at = Some(t0 - chrono::Duration::days(days_ago));
        catalog.update_job(&j).unwrap();
        j.id
    };
    // Old, and the backup set or the drill still names it.
    let named_backup = end(JobKind::Backup, Some("a"), 200);
    let mut set = full_set("pruned-1", t0);
    set.job_id = Some(named_backup);
    catalog.insert_backup(&set).unwrap();
    // A set naming no job keeps nothing (a NULL among the names).
    catalog.insert_backup(&full_set("pruned-2", t0)).unwrap();
    let named_drill = end(JobKind::Drill, Some("a"), 200);
    catalog
        .put_drill(&DrillResult {
            backup_id: "pruned-1".into(),
            instance_id: "a".into(),
            status: "Passed".into(),
            detail: "ok".into(),
            started_at: t0,
            finished_at: Some(t0),
            job_id: Some(named_drill),
        })
        .unwrap();
    // Old, and the newest of their instance and kind.
    let older_copy = end(JobKind::CrossCopy, Some("a"), 120);
    let newest_copy = end(JobKind::CrossCopy, Some("a"), 110);
    let lone_ddr = end(JobKind::DdrRestore, None, 100);
    // Old, a newer one of the same instance and kind beside them.
    let old_restores = [
        end(JobKind::Restore, Some("a"), 300),
        end(JobKind::Restore, Some("a"), 91),
    ];
    let old_backup = end(JobKind::Backup, Some("a"), 150);
    let old_notify = end(JobKind::Notify, None, 95);
    let recent_notify = end(JobKind::Notify, None, 89);
    let recent_restore = end(JobKind::Restore, Some("a"), 2);
    let recent_drill = end(JobKind::Drill, Some("a"), 3);
    let unnamed_recent_backup = end(JobKind::Backup, Some("a"), 1);
    // Another instance's jobs are judged apart.
    let b_restore = end(JobKind::Restore, Some("b"), 100);
    let mut running = catalog.create_job(JobKind::Restore, Some("a")).unwrap();
    running.state = JobState::Uploading;
    catalog.update_job(&running).unwrap();

    // At most `limit` a call, the oldest first.
    let other = b.open();
    let before = t0 - chrono::Duration::days(90);
    assert_eq!(other.prune_jobs(before, 2).unwrap(), 2);
    let jobs_left = || -> std::collections::BTreeSet<JobId> {
        catalog
            .list_jobs(None)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect()
    };
    let left = jobs_left();
    assert!(!left.contains(&older_copy) && !left.contains(&old_restores[0]));
    assert!(left.contains(&old_restores[1]) && left.contains(&old_backup));
    assert_eq!(other.prune_jobs(before, 100).unwrap(), 3);
    let left = jobs_left();
    for gone in [
        old_restores[0],
        old_restores[1],
        older_copy,
        old_backup,
        old_notify,
    ] {
        assert!(!left.contains(&gone), "{gone:?} is still there: {left:?}");
    }
    let kept = [
        named_backup,
        named_drill,
        newest_copy,
        lone_ddr,
        recent_notify,
        recent_drill,
        recent_restore,
        unnamed_recent_backup,
        b_restore,
        running.id,
    ];
    assert_eq!(left, kept.into_iter().collect());
    assert_eq!(
        catalog
            .newest_ended_job("a", JobKind::CrossCopy)
            .unwrap()
            .map(|j| j.id),
        Some(newest_copy)
    );
    assert_eq!(catalog.prune_jobs(before, 100).unwrap(), 0);
}

fn jobs_are_read_by_end_time_and_newest_first(b: &dyn Backend) {
    let catalog = b.open();
    let t0 = now();
    let end = |kind: JobKind, instance: &str, state: JobState, secs: i64| {
        let mut j = catalog.create_job(kind, Some(instance)).unwrap();
        j.state = state;
        j.finished_at = Some(t0 + chrono::Duration::seconds(secs));
        catalog.update_job(&j).unwrap();
        j.id
    };
    let old_copy = end(JobKind::CrossCopy, "a", JobState::Failed, -60);
    // Ended last though created first: the end time decides.
    let late_copy = end(JobKind::CrossCopy, "a", JobState::Finished, 30);
    let copy = end(JobKind::CrossCopy, "a", JobState::Failed, 10);
    let drill = end(JobKind::Drill, "a", JobState::Failed, 0);
    let other = end(JobKind::CrossCopy, "b", JobState::Failed, 5);
    let running = catalog.create_job(JobKind::CrossCopy, Some("a")).unwrap();
    let mut running = running;
    running.state = JobState::Uploading;
    catalog.update_job(&running).unwrap();

    let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let observer = b.open();
    assert_eq!(
        ids(observer.jobs_ended_since(t0).unwrap()),
        [late_copy, copy, drill, other],
        "only what ended at or after the time, by id"
    );
    assert_eq!(
        ids(observer
            .jobs_ended_since(t0 + chrono::Duration::seconds(11))
            .unwrap()),
        [late_copy]
    );
    assert!(observer
        .jobs_ended_since(t0 + chrono::Duration::hours(1))
        .unwrap()
        .is_empty());
    let all = ids(observer
        .jobs_ended_since(t0 - chrono::Duration::hours(1))
        .unwrap());
    assert_eq!(all, [old_copy, late_copy, copy, drill, other]);

    let newest = |instance: &str, kind: JobKind| {
        observer
            .newest_ended_job(instance, kind)
            .unwrap()
            .map(|j| j.id)
    };
    assert_eq!(newest("a", JobKind::CrossCopy), Some(late_copy));
    assert_eq!(newest("b", JobKind::CrossCopy), Some(other));
    assert_eq!(newest("a", JobKind::Drill), Some(drill));
    assert_eq!(newest("a", JobKind::Backup), None);
    assert_eq!(newest("c", JobKind::CrossCopy), None);
    // The newest of a kind, running ones included, newest first.
    assert_eq!(
        ids(observer.newest_jobs(JobKind::CrossCopy, 3).unwrap()),
        [running.id, other, copy]
    );
    assert_eq!(
        ids(observer.newest_jobs(JobKind::Drill, 10).unwrap()),
        [drill]
    );
    assert!(observer
        .newest_jobs(JobKind::Notify, 10)
        .unwrap()
        .is_empty());
    assert!(observer
        .newest_jobs(JobKind::CrossCopy, 0)
        .unwrap()
        .is_empty());
    let got = observer
        .newest_ended_job("b", JobKind::CrossCopy)
        .unwrap()
        .unwrap();
    assert_eq!(got.state, JobState::Failed);
    assert_eq!(got.finished_at, Some(t0 + chrono::Duration::seconds(5)));
}

fn the_lease_keeper_renews_its_owners_unfinished_jobs(b: &dyn Backend) {
    use std::time::{Duration, Instant};
    let catalog = b.open();
    let job = catalog.create_job(JobKind::Backup, None).unwrap();
    let mut done = catalog.create_job(JobKind::Restore, None).unwrap();
    done.state = JobState::Finished;
    catalog.update_job(&done).unwrap();
    let created = catalog.get_job(job.id).unwrap().heartbeat_at;

    let keeper = LeaseKeeper::start(catalog.clone(), Duration::from_millis(20)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while catalog.get_job(job.id).unwrap().heartbeat_at == created {
        assert!(Instant::now() < deadline, "the lease was never renewed");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(keeper);
    assert!(catalog.get_job(job.id).unwrap().heartbeat_at > created);
    assert_eq!(
        catalog.get_job(done.id).unwrap().heartbeat_at,
        done.heartbeat_at
    );
    assert_eq!(Arc::strong_count(&catalog), 1, "the keeper's thread ended");
}

fn gc_pending_is_kept_per_repository(b: &dyn Backend) {
    let cat = b.open();
    let t = now();
    let mut a = BTreeMap::new();
    a.insert("p1".to_string(), t);
    a.insert("p2".to_string(), t + chrono::Duration::seconds(5));
    cat.put_gc_pending("repo-a", &a).unwrap();
    let mut other = BTreeMap::new();
    other.insert("p9".to_string(), t);
    cat.put_gc_pending("repo-b", &other).unwrap();
    assert_eq!(cat.gc_pending("repo-a").unwrap(), a);
    a.remove("p1");
    cat.put_gc_pending("repo-a", &a).unwrap();
    assert_eq!(b.open().gc_pending("repo-a").unwrap(), a);
    assert_eq!(cat.gc_pending("repo-b").unwrap(), other);
    cat.put_gc_pending("repo-b", &BTreeMap::new()).unwrap();
    assert!(cat.gc_pending("repo-b").unwrap().is_empty());
}

fn hold(cat: &Arc<dyn Catalog>, repo: &str, exclusive: bool, ttl_secs: u64) -> RepoHold {
    RepoHold::new(
        repo,
        exclusive,
        cat.lease_owner().clone(),
        if exclusive { "gc" } else { "backup" },
        std::time::Duration::from_secs(ttl_secs),
    )
}

fn repo_holds_exclude_a_collection_from_backups_and_readers_on_every_handle(b: &dyn Backend) {
    let (node_a, node_b) = (b.open(), b.open());
    let t = now();
    // Two shared holds on two nodes live together; a collection waits.
    let backup = hold(&node_a, "r", false, 60);
    let reader = hold(&node_b, "r", false, 60);
    assert!(node_a.acquire_repo_hold(&backup, t).unwrap());
    assert!(node_b.acquire_repo_hold(&reader, t).unwrap());
    let gc = hold(&node_b, "r", true, 60);
    assert!(!node_b.acquire_repo_hold(&gc, t).unwrap());
    // Another repository is not held.
    assert!(node_b
        .acquire_repo_hold(&hold(&node_b, "other", true, 60), t)
        .unwrap());
    node_a.release_repo_hold(&backup.id).unwrap();
    assert!(
        !node_a.acquire_repo_hold(&gc, t).unwrap(),
        "the reader still holds"
    );
    node_b.release_repo_hold(&reader.id).unwrap();
    assert!(node_a.acquire_repo_hold(&gc, t).unwrap());
    // While collected, no shared hold is given, on any handle.
    let late = hold(&node_b, "r", false, 60);
    assert!(!node_b.acquire_repo_hold(&late, t).unwrap());
    let secs = chrono::Duration::seconds;
    let t = b.pass(t, secs(30));
    assert!(node_a.renew_repo_hold(&gc, t).unwrap());
    // Renewed at t+30 s with 60 s: still live at t+80 s.
    let t = b.pass(t, secs(50));
    assert!(!node_b.acquire_repo_hold(&late, t).unwrap());
    // A collector that stopped renewing loses its hold to the next
    // acquirer, and learns so at its next renewal (its fence).
    let t = b.pass(t, secs(11));
    assert!(node_b.acquire_repo_hold(&late, t).unwrap());
    let t = b.pass(t, secs(1));
    assert!(!node_a.renew_repo_hold(&gc, t).unwrap());
    node_b.release_repo_hold(&late.id).unwrap();
    node_b.release_repo_hold(&late.id).unwrap();
}

fn racing_handles_take_one_exclusive_hold(b: &dyn Backend) {
    let handles: Vec<Arc<dyn Catalog>> = (0..4).map(|_| b.open()).collect();
    let barrier = Arc::new(Barrier::new(handles.len()));
    let t = now();
    let won: Vec<bool> = handles
        .into_iter()
        .map(|cat| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let h = hold(&cat, "race", true, 60);
                barrier.wait();
                cat.acquire_repo_hold(&h, t).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
}

fn every_handle_gets_the_first_shared_secret(b: &dyn Backend) {
    let (a, c) = (b.open(), b.open());
    assert_eq!(
        a.shared_secret("download-link-key", "first").unwrap(),
        "first"
    );
    assert_eq!(
        c.shared_secret("download-link-key", "second").unwrap(),
        "first"
    );
    assert_eq!(c.shared_secret("other", "x").unwrap(), "x");
}

fn cross_region_policy_copies_and_wal(b: &dyn Backend) {
    let cat = b.open();
    assert_eq!(cat.get_cross_policy("a").unwrap(), None);
    let t = at("2026-11-25T10:00:00Z");
    let mut p = CrossBackupPolicy {
        instance_id: "a".into(),
        region: "cn-shanghai".into(),
        backup_enabled: true,
        log_backup_enabled: false,
        retention_days: 30,
        backup_enabled_at: Some(t),
        log_backup_enabled_at: None,
        updated_at: t,
    };
    cat.put_cross_policy(&p).unwrap();
    assert_eq!(cat.get_cross_policy("a").unwrap(), Some(p.clone()));
    p.log_backup_enabled = true;
    p.log_backup_enabled_at = Some(t);
    cat.put_cross_policy(&p).unwrap();
    assert_eq!(cat.get_cross_policy("a").unwrap(), Some(p));

    let first = cat
        .insert_cross_backup("cn-shanghai", &full_set("1", t), 512, t)
        .unwrap();
    let second = cat
        .insert_cross_backup("cn-beijing", &full_set("2", t), 64, t)
        .unwrap();
    assert!(second > first);
    // One copy of a set per region.
    assert!(matches!(
        cat.insert_cross_backup("cn-shanghai", &full_set("1", t), 1, t),
        Err(CatalogError::Conflict(_))
    ));
    let listed = cat.list_cross_backups("a").unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (listed[0].id, listed[0].region.as_str()),
        (first, "cn-shanghai")
    );
    assert_eq!(
        (listed[0].set.clone(), listed[0].copied_bytes),
        (full_set("1", t), 512)
    );
    cat.delete_cross_backup(first).unwrap();
    assert_eq!(cat.list_cross_backups("a").unwrap()[0].id, second);
    assert!(cat.list_cross_backups("b").unwrap().is_empty());

    let row = wal_row("a", "000000010000000000000001", false);
    let id = cat.insert_cross_wal("cn-shanghai", &row, t).unwrap();
    let wal = cat.list_cross_wal("a").unwrap();
    assert_eq!(
        (wal[0].id, wal[0].row.clone(), wal[0].copied_at),
        (id, row, t)
    );
    cat.delete_cross_wal(id).unwrap();
    assert!(cat.list_cross_wal("a").unwrap().is_empty());
}

fn usage_samples_by_time(b: &dyn Backend) {
    let cat = b.open();
    let t0 = at("2026-11-25T10:00:00Z");
    for (i, instance) in [(0, "a"), (1, "a"), (2, "a"), (1, "b")] {
        cat.add_usage_sample(&UsageSample {
            instance_id: instance.into(),
            at: t0 + chrono::Duration::hours(i),
            logical_bytes: 10 * i as u64,
            data_bytes: i as u64,
            wal_bytes: 2,
            quota_bytes: 5,
            cross_region_bytes: (instance == "a").then_some(100 * i as u64),
        })
        .unwrap();
    }
    let all = cat.list_usage_samples("a", None, None).unwrap();
    assert_eq!(
        all.iter().map(|s| s.data_bytes).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let some = cat
        .list_usage_samples(
            "a",
            Some(t0 + chrono::Duration::minutes(30)),
            Some(t0 + chrono::Duration::hours(1)),
        )
        .unwrap();
    assert_eq!(some.len(), 1);
    assert_eq!(some[0].at, t0 + chrono::Duration::hours(1));
    let from = cat
        .list_usage_samples("a", Some(t0 + chrono::Duration::hours(1)), None)
        .unwrap();
    assert_eq!(from.len(), 2);
    let last = cat.last_usage_sample("a").unwrap().unwrap();
    assert_eq!((last.data_bytes, last.cross_region_bytes), (2, Some(200)));
    // A second sample at the same moment replaces the first.
    let mut again = last.clone();
    again.data_bytes = 7;
    cat.add_usage_sample(&again).unwrap();
    assert_eq!(cat.list_usage_samples("a", None, None).unwrap().len(), 3);
    assert_eq!(cat.last_usage_sample("a").unwrap().unwrap().data_bytes, 7);
    // Not known: NULL, read back as such.
    let other = cat.list_usage_samples("b", None, None).unwrap();
    assert_eq!(other[0].cross_region_bytes, None);
    assert_eq!(cat.last_usage_sample("c").unwrap(), None);
}

fn keys_policies_passwords_and_nonces(b: &dyn Backend) {
    let cat = b.open();
    let mut i = instance("a");
    i.password = Some("s3cret".into());
    cat.add_instance(&i).unwrap();
    assert!(!serde_json::to_string(&cat.get_instance("a").unwrap())
        .unwrap()
        .contains("s3cret"));

    assert_eq!(cat.get_policy("a").unwrap(), None);
    let p = policy("a");
    cat.put_policy(&p).unwrap();
    assert_eq!(cat.get_policy("a").unwrap(), Some(p.clone()));
    let mut p2 = p.clone();
    p2.backup_days = vec!["Sunday".into()];
    p2.log_backup_enabled = true;
    p2.last_auto_slot = None;
    cat.put_policy(&p2).unwrap();
    assert_eq!(cat.get_policy("a").unwrap(), Some(p2.clone()));
    // Every retention option, the sparse rules included, reads back as written.
    let p3 = BackupPolicy {
        backup_interval_minutes: Some(15),
        advanced_enabled: true,
        advanced_data_rules: vec![
            DataRule {
                id: "month-ends".into(),
                kind: RuleKind::Monthly {
                    days: vec![MonthDay::Day(1), MonthDay::Day(15), MonthDay::Last],
                },
                retention_days: 365,
            },
            DataRule {
                id: "new-year".into(),
                kind: RuleKind::Yearly { month: 1, day: 1 },
                retention_days: 3650,
            },
            DataRule {
                id: "weekends".into(),
                kind: RuleKind::Weekly {
                    days: vec![chrono::Weekday::Sat, chrono::Weekday::Sun],
                },
                retention_days: 30,
            },
        ],
        advanced_log_retention_days: Some(14),
        archive_retention_days: 1095,
        archive_keep_policy: ArchiveKeepPolicy::ByWeek,
        archive_keep_count: 7,
        keep_last: Some(5),
        ..p2
    };
    cat.put_policy(&p3).unwrap();
    assert_eq!(cat.get_policy("a").unwrap(), Some(p3));

    let t = now();
    let k = AccessKey {
        id: "AK1".into(),
        secret: "sec".into(),
        read_only: true,
        description: "ro".into(),
        created_at: t,
    };
    cat.add_access_key(&k).unwrap();
    assert!(matches!(
        cat.add_access_key(&k),
        Err(CatalogError::Conflict(_))
    ));
    assert_eq!(cat.get_access_key("AK1").unwrap(), Some(k.clone()));
    assert_eq!(cat.list_access_keys().unwrap(), [k]);
    assert!(cat.delete_access_key("AK1").unwrap());
    assert!(!cat.delete_access_key("AK1").unwrap());
    assert_eq!(cat.get_access_key("AK1").unwrap(), None);

    let horizon = chrono::Duration::minutes(30);
    assert!(cat.admit_nonce("AK1", "n1", t, t - horizon).unwrap());
    assert!(!b.open().admit_nonce("AK1", "n1", t, t - horizon).unwrap());
    assert!(cat.admit_nonce("AK2", "n1", t, t - horizon).unwrap());
    // Forgotten once older than the horizon.
    let t = b.pass(t, chrono::Duration::hours(1));
    assert!(cat.admit_nonce("AK1", "n1", t, t - horizon).unwrap());
}

fn wal_segments_and_restore_points(b: &dyn Backend) {
    let cat = b.open();
    let seg = "000000010000000000000002";
    let partial = wal_row("a", seg, true);
    let complete = wal_row("a", seg, false);
    cat.upsert_wal_segment(&partial).unwrap();
    cat.upsert_wal_segment(&complete).unwrap();
    cat.upsert_wal_segment(&wal_row("a", "000000010000000000000001", false))
        .unwrap();
    cat.upsert_wal_segment(&wal_row("b", seg, false)).unwrap();
    assert_eq!(
        cat.find_wal_segment("a", TimelineId(1), seg).unwrap(),
        [complete.clone(), partial.clone()]
    );
    // The same key replaces its row.
    let mut grown = partial.clone();
    grown.end_lsn = Lsn(0x1c0_0000);
    grown.size = 12 << 20;
    cat.upsert_wal_segment(&grown).unwrap();
    let listed = cat.list_wal_segments("a").unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].segment, "000000010000000000000001");
    assert_eq!((&listed[1], &listed[2]), (&complete, &grown));
    cat.delete_wal_segment("a", TimelineId(1), seg, true)
        .unwrap();
    cat.delete_wal_segment("a", TimelineId(1), seg, true)
        .unwrap();
    assert_eq!(
        cat.find_wal_segment("a", TimelineId(1), seg).unwrap(),
        [complete]
    );

    let rp = |lsn: u64, name: &str| RestorePointRow {
        instance_id: "a".into(),
        timeline: TimelineId(1),
        name: name.into(),
        lsn: Lsn(lsn),
        time: at("2026-11-25T10:00:00.000001Z"),
    };
    cat.upsert_restore_point(&rp(0x300, "later")).unwrap();
    cat.upsert_restore_point(&rp(0x200, "first")).unwrap();
    cat.upsert_restore_point(&rp(0x200, "renamed")).unwrap();
    assert_eq!(
        cat.list_restore_points("a").unwrap(),
        [rp(0x200, "renamed"), rp(0x300, "later")]
    );
    assert!(cat.list_restore_points("b").unwrap().is_empty());
}

fn recovery_events_and_names(b: &dyn Backend) {
    let cat = b.open();
    let ev = |lsn: u64, seq: u32, time: &str, table: Option<&str>| RecoveryEventRow {
        instance_id: "a".into(),
        timeline: TimelineId(1),
        lsn: Lsn(lsn),
        seq,
        end_lsn: Lsn(lsn + 0x40),
        kind: "DropTable".into(),
        xid: 4_000_000_000,
        time: at(time),
        db_oid: 16384,
        relfilenode: Some(3_000_000_000),
        rel_oid: Some(16390),
        database: Some("shop".into()),
        schema: Some("public".into()),
        table: table.map(Into::into),
        rows: Some(u64::from(u32::MAX) + 7),
        filled: vec![3_000_000_001, 17],
        before_lsn: Some(Lsn(u64::MAX - 5)),
    };
    let late = ev(0x300, 0, "2026-11-25T12:00:00.000001Z", Some("b"));
    let early = ev(0x200, 1, "2026-11-25T10:00:00.000001Z", None);
    cat.upsert_recovery_event(&late).unwrap();
    cat.upsert_recovery_event(&ev(0x200, 1, "2026-11-25T10:00:00.000001Z", Some("x")))
        .unwrap();
    // The same key replaces its row.
    cat.upsert_recovery_event(&early).unwrap();
    assert_eq!(
        cat.list_recovery_events("a", None, None).unwrap(),
        [early.clone(), late.clone()]
    );
    let since = at("2026-11-25T11:00:00Z");
    assert_eq!(
        cat.list_recovery_events("a", Some(since), None).unwrap(),
        std::slice::from_ref(&late)
    );
    assert_eq!(
        cat.list_recovery_events("a", None, Some(since)).unwrap(),
        std::slice::from_ref(&early)
    );
    assert!(cat
        .list_recovery_events("b", None, None)
        .unwrap()
        .is_empty());
    // A reindex rebuilds events from the repository: they go with the index.
    cat.clear_index().unwrap();
    assert!(cat
        .list_recovery_events("a", None, None)
        .unwrap()
        .is_empty());

    let rel = |relfilenode: u32, name: &str| RelationNameRow {
        instance_id: "a".into(),
        db_oid: 16384,
        relfilenode,
        rel_oid: 16390,
        schema: "public".into(),
        name: name.into(),
        kind: "r".into(),
        seen_at: at("2026-11-25T10:00:00.000001Z"),
    };
    let db = |name: &str| DatabaseNameRow {
        instance_id: "a".into(),
        db_oid: 16384,
        name: name.into(),
        seen_at: at("2026-11-25T10:00:00.000001Z"),
    };
    cat.upsert_names(&[rel(16390, "orders"), rel(16400, "x")], &[db("shop")])
        .unwrap();
    cat.upsert_names(&[rel(16390, "orders_old")], &[db("store")])
        .unwrap();
    let (relations, databases) = cat.list_names("a").unwrap();
    assert_eq!(relations, [rel(16390, "orders_old"), rel(16400, "x")]);
    assert_eq!(databases, [db("store")]);
    assert_eq!(cat.list_names("b").unwrap(), (vec![], vec![]));
}

fn managed_instances_and_drills(b: &dyn Backend) {
    let cat = b.open();
    let t = now();
    let mut m = ManagedInstance {
        instance_id: "clone-1".into(),
        source_instance: "a".into(),
        backup_id: Some("1".into()),
        restore_time: Some(t),
        data_dir: "/srv/clone-1".into(),
        port: 15432,
        pg_major: 16,
        status: "Creating".into(),
        error: None,
        created_at: t,
        agent_clone: None,
    };
    cat.put_managed(&m).unwrap();
    m.status = "Running".into();
    cat.put_managed(&m).unwrap();
    assert_eq!(cat.get_managed("clone-1").unwrap(), Some(m.clone()));
    // A clone on the database host keeps its agent clone's name.
    let on_host = ManagedInstance {
        instance_id: "clone-2".into(),
        data_dir: "/srv/pg/strata-clones/clone-2".into(),
        agent_clone: Some("clone-2".into()),
        created_at: t + chrono::Duration::seconds(1),
        ..m.clone()
    };
    cat.put_managed(&on_host).unwrap();
    assert_eq!(cat.get_managed("clone-2").unwrap(), Some(on_host.clone()));
    assert_eq!(cat.list_managed().unwrap(), [m, on_host]);
    cat.delete_managed("clone-2").unwrap();
    cat.delete_managed("clone-1").unwrap();
    cat.delete_managed("clone-1").unwrap();
    assert_eq!(cat.get_managed("clone-1").unwrap(), None);

    let mut d = DrillResult {
        backup_id: "1".into(),
        instance_id: "a".into(),
        status: "Running".into(),
        detail: String::new(),
        started_at: t,
        finished_at: None,
        job_id: Some(JobId::new(3)),
    };
    cat.put_drill(&d).unwrap();
    d.status = "Passed".into();
    d.finished_at = Some(t);
    cat.put_drill(&d).unwrap();
    assert_eq!(cat.get_drill("1").unwrap(), Some(d.clone()));
    assert_eq!(cat.list_drills("a").unwrap(), [d]);
    assert!(cat.list_drills("b").unwrap().is_empty());
}

fn clear_index_keeps_everything_else(b: &dyn Backend) {
    let cat = b.open();
    cat.add_instance(&instance("a")).unwrap();
    cat.insert_backup(&full_set("1", now())).unwrap();
    cat.upsert_wal_segment(&wal_row("a", "000000010000000000000001", false))
        .unwrap();
    let job = cat.create_job(JobKind::Backup, Some("a")).unwrap();
    cat.clear_index().unwrap();
    assert!(cat.list_backups("a").unwrap().is_empty());
    assert!(cat.list_wal_segments("a").unwrap().is_empty());
    assert_eq!(cat.list_instances().unwrap().len(), 1);
    assert_eq!(cat.get_job(job.id).unwrap(), job);
}

fn duplicates_are_conflicts_with_their_source(b: &dyn Backend) {
    use std::error::Error as _;
    let cat = b.open();
    let set = BackupSet::started("b1".into(), "db1", BackupMode::Manual, now(), None);
    cat.insert_cross_backup("eu", &set, 1, now()).unwrap();
    let err = cat.insert_cross_backup("eu", &set, 1, now()).unwrap_err();
    assert!(matches!(err, CatalogError::Conflict(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert!(
        err.source().is_some(),
        "the driver's error stays the source"
    );
}

/// Runs `f(handle, thread)` on `threads` threads at once, spread over two
/// handles, and returns what each returned.
fn race<T: Send + 'static>(
    b: &dyn Backend,
    threads: usize,
    f: impl Fn(&dyn Catalog, usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let handles = [b.open(), b.open()];
    let barrier = Arc::new(Barrier::new(threads));
    let f = Arc::new(f);
    let joins: Vec<_> = (0..threads)
        .map(|n| {
            let (cat, barrier, f) = (handles[n % 2].clone(), barrier.clone(), f.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(&*cat, n)
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

fn racing_handles_register_one_backup_id_once(b: &dyn Backend) {
    for round in 0..10 {
        let id = format!("race-{round}");
        let results = race(b, 4, move |cat, n| {
            let mut set =
                BackupSet::started(id.as_str().into(), "a", BackupMode::Manual, now(), None);
            // Ids only: one set of an instance may run, any number may have ended.
            set.status = BackupStatus::Failed;
            set.error = Some(format!("writer {n}"));
            cat.insert_backup(&set).map(|()| n)
        });
        let winners: Vec<usize> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, CatalogError::BackupExists(_)), "{e:?}");
            }
        }
        // The row is the winner's, whole.
        let stored = b.open().get_backup(&format!("race-{round}")).unwrap();
        assert_eq!(stored.error, Some(format!("writer {}", winners[0])));
    }
}

fn racing_handles_admit_a_nonce_once(b: &dyn Backend) {
    let t = now();
    for round in 0..10 {
        let nonce = format!("nonce-{round}");
        let admitted = race(b, 4, move |cat, _| {
            cat.admit_nonce("AK1", &nonce, t, t - chrono::Duration::minutes(15))
                .unwrap()
        });
        assert_eq!(
            admitted.iter().filter(|a| **a).count(),
            1,
            "round {round}: {admitted:?}"
        );
    }
}

fn racing_takeovers_fail_an_expired_job_once(b: &dyn Backend) {
    let dead = b.open();
    let lease = chrono::Duration::seconds(30);
    let jobs: Vec<JobId> = (0..6)
        .map(|n| running_backup(&*dead, &format!("i-{n}"), &format!("expired-{n}")).id)
        .collect();
    let later = b.pass(now(), chrono::Duration::hours(1));
    let taken = race(b, 4, move |cat, _| {
        cat.fail_expired_jobs(later, lease).unwrap()
    });
    assert_eq!(taken.iter().sum::<usize>(), jobs.len(), "{taken:?}");
    let check = b.open();
    for id in jobs {
        let job = check.get_job(id).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_ne!(job.owner, *dead.lease_owner());
    }
}

/// The owner finishing its job and another handle taking it over race:
/// exactly one of them wins, and the catalog agrees with the winner.
fn a_takeover_and_its_owner_never_both_win(b: &dyn Backend) {
    let owner = b.open();
    let observer = b.open();
    let lease = chrono::Duration::seconds(30);
    for round in 0..10 {
        let job = running_backup(
            &*owner,
            &format!("i-{round}"),
            &format!("contested-{round}"),
        );
        let later = b.pass(now(), chrono::Duration::hours(1));
        let barrier = Arc::new(Barrier::new(2));
        let (o, bar) = (owner.clone(), barrier.clone());
        let mut done = job.clone();
        let finisher = std::thread::spawn(move || {
            done.state = JobState::Finished;
            done.progress = 100;
            bar.wait();
            o.update_job(&done)
        });
        let (obs, bar) = (observer.clone(), barrier);
        let taker = std::thread::spawn(move || {
            bar.wait();
            obs.fail_expired_jobs(later, lease).unwrap()
        });
        let finished = finisher.join().unwrap();
        let taken = taker.join().unwrap();
        let stored = observer.get_job(job.id).unwrap();
        match finished {
            Ok(()) => {
                assert_eq!(taken, 0, "round {round}");
                assert_eq!(stored.state, JobState::Finished);
            }
            Err(CatalogError::LeaseLost(id)) => {
                assert_eq!((id, taken), (job.id, 1), "round {round}");
                assert_eq!(stored.state, JobState::Failed);
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
    }
}

// PostgreSQL only: opening, migrating and classifying its errors.

fn psql_url(url: &str, sql: &str) -> String {
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    testkit::catalog_server().psql(db, sql)
}

/// Nodes whose clocks are an hour off, passing their own time as `now`:
/// the server's clock decides every lease, so the one ahead takes no live
/// lease, job or hold, and the one behind neither keeps a dead one nor
/// writes one that lapses early.
#[test]
fn a_skewed_node_clock_decides_no_lease() {
    let b = Postgres::new("skewed_clocks");
    let (honest, ahead, behind) = (b.open(), b.open(), b.open());
    let skew = chrono::Duration::hours(1);
    let ttl = chrono::Duration::seconds(60);
    let lease = chrono::Duration::seconds(30);
    honest.add_instance(&instance("a")).unwrap();

    // Live leases, a live job and a live shared hold of the honest node.
    assert!(honest.claim_instance("db", "honest", now(), ttl).unwrap());
    let job = running_backup(&*honest, "a", "live");
    let shared = hold(&honest, "r", false, 60);
    assert!(honest.acquire_repo_hold(&shared, now()).unwrap());

    // Ahead: it believes all of them lapsed an hour ago.
    assert!(!ahead
        .claim_instance("db", "ahead", now() + skew, ttl)
        .unwrap());
    assert_eq!(ahead.fail_expired_jobs(now() + skew, lease).unwrap(), 0);
    let gc = hold(&ahead, "r", true, 60);
    assert!(!ahead.acquire_repo_hold(&gc, now() + skew).unwrap());
    let owner = &honest.list_owners().unwrap()[0];
    assert_eq!((owner.node_id.as_str(), owner.epoch), ("honest", 1));
    assert_eq!(honest.get_job(job.id).unwrap().state, JobState::Uploading);

    // Behind: what it writes lasts `ttl` from the server's now, not from
    // an hour ago, so nobody may take it meanwhile.
    let before = behind.now().unwrap();
    assert!(behind
        .claim_instance("db2", "behind", now() - skew, ttl)
        .unwrap());
    assert_eq!(
        behind.renew_instances("behind", now() - skew, ttl).unwrap(),
        1
    );
    let its_job = running_backup(&*behind, "b", "behind");
    assert_eq!(behind.renew_leases(now() - skew).unwrap(), 1);
    let its_hold = hold(&behind, "q", false, 60);
    assert!(behind.acquire_repo_hold(&its_hold, now() - skew).unwrap());
    assert!(behind.renew_repo_hold(&its_hold, now() - skew).unwrap());
    let mut its_node = node("behind", now() - skew);
    behind.heartbeat(&its_node).unwrap();
    let after = behind.now().unwrap();
    let row = honest
        .list_owners()
        .unwrap()
        .into_iter()
        .find(|o| o.instance_id == "db2")
        .unwrap();
    assert!(
        before + ttl <= row.expires_at && row.expires_at <= after + ttl,
        "{before} {} {after}",
        row.expires_at
    );
    assert!(!honest.claim_instance("db2", "honest", now(), ttl).unwrap());
    assert_eq!(honest.fail_expired_jobs(now(), lease).unwrap(), 0);
    assert_eq!(
        honest.get_job(its_job.id).unwrap().state,
        JobState::Uploading
    );
    let gc = hold(&honest, "q", true, 60);
    assert!(!honest.acquire_repo_hold(&gc, now()).unwrap());
    let heartbeat = honest.list_nodes().unwrap()[0].heartbeat_at;
    assert!(before <= heartbeat && heartbeat <= after, "{heartbeat}");
    its_node.heartbeat_at = heartbeat;
    assert_eq!(honest.list_nodes().unwrap(), [its_node]);

    // Once the honest node's leases lapse on the server's clock, the node
    // behind sees them lapsed at once, though its clock says an hour less.
    let t = b.pass(now(), chrono::Duration::seconds(61));
    assert!(behind
        .claim_instance("db", "behind", t - skew, ttl)
        .unwrap());
    assert_eq!(behind.fail_expired_jobs(t - skew, lease).unwrap(), 1);
    assert_eq!(honest.get_job(job.id).unwrap().state, JobState::Failed);
    let gc = hold(&behind, "r", true, 60);
    assert!(behind.acquire_repo_hold(&gc, t - skew).unwrap());

    // Console sessions and request nonces: the node ahead forgets neither
    // a session idle for less than the horizon nor a nonce still inside
    // the replay window, though both look an hour old to it.
    let horizon = chrono::Duration::minutes(30);
    honest
        .put_session(&session("live", now()), now() - horizon)
        .unwrap();
    assert!(honest
        .admit_nonce("AK1", "used", now(), now() - horizon)
        .unwrap());
    let t = now() + skew;
    ahead.put_session(&session("new", t), t - horizon).unwrap();
    assert!(ahead.admit_nonce("AK1", "other", t, t - horizon).unwrap());
    assert!(honest.touch_session("live", now()).unwrap().is_some());
    assert!(!honest
        .admit_nonce("AK1", "used", now(), now() - horizon)
        .unwrap());
    // Its session is stamped with the server's time: live for the others.
    let stamped = honest.touch_session("new", now()).unwrap().unwrap();
    assert!(stamped.last_seen_at <= honest.now().unwrap());
}

#[test]
fn nodes_opening_an_empty_database_at_once_migrate_it_once() {
    let url = testkit::catalog_database("migrate_once");
    let joins: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgCatalog::open(&PgConnect::new(&url)).map(|_| ()))
        })
        .collect();
    for j in joins {
        j.join().unwrap().unwrap();
    }
    let versions = psql_url(
        &url,
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM strata_schema_migrations",
    );
    let expected: Vec<String> = MIGRATIONS.iter().map(|m| m.version.to_string()).collect();
    assert_eq!(versions, expected.join(","));
    // Reopening applies nothing and keeps rows.
    let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
    cat.add_instance(&instance("kept")).unwrap();
    drop(cat);
    let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
    assert_eq!(cat.list_instances().unwrap().len(), 1);
}

#[test]
fn a_newer_postgres_schema_is_refused() {
    let url = testkit::catalog_database("newer_schema");
    drop(PgCatalog::open(&PgConnect::new(&url)).unwrap());
    psql_url(
        &url,
        "INSERT INTO strata_schema_migrations (version, description) VALUES (99, 'future')",
    );
    assert!(matches!(
        PgCatalog::open(&PgConnect::new(&url)),
        Err(CatalogError::NewerSchema { found: 99, .. })
    ));
}

#[test]
fn an_unreachable_server_is_retryable_and_a_bad_value_is_corrupt() {
    let port = testkit::free_port();
    let err = PgCatalog::open(&PgConnect::new(&format!(
        "postgres://strata:hunter2@127.0.0.1:{port}/nowhere?sslmode=disable"
    )))
    .err()
    .expect("nothing listens there");
    assert!(err.is_retryable(), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");

    let url = testkit::catalog_database("corrupt_value");
    let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
    cat.insert_backup(&BackupSet::started(
        "b1".into(),
        "a",
        BackupMode::Manual,
        now(),
        None,
    ))
    .unwrap();
    psql_url(&url, "UPDATE backup_sets SET mode = 'Sideways'");
    let err = cat.get_backup("b1").unwrap_err();
    assert!(matches!(err, CatalogError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("Sideways"), "{err}");
}

/// Catalog calls from inside an async runtime (as some handlers still make
/// them) neither panic nor deadlock, and dropping the catalog there is fine.
#[test]
fn calls_from_inside_an_async_runtime_work() {
    let url = testkit::catalog_database("async_caller");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
        cat.add_instance(&instance("a")).unwrap();
        assert_eq!(cat.get_instance("a").unwrap().id, "a");
        drop(cat);
    });
}

/// A SQLite catalog with a row in every table, times with nanoseconds
/// SQLite keeps and PostgreSQL does not.
fn populated_sqlite(path: &std::path::Path) -> SqliteCatalog {
    let cat = SqliteCatalog::open(path).unwrap();
    let t = Utc::now();
    let mut i = instance("a");
    i.password = Some("s3cret".into());
    i.created_at = t;
    cat.add_instance(&i).unwrap();
    cat.add_instance(&instance("b")).unwrap();
    cat.heartbeat(&node("n1", t)).unwrap();
    cat.put_session(&session("h1", t), t).unwrap();
    assert!(cat
        .claim_instance("a", "n1", t, chrono::Duration::seconds(20))
        .unwrap());
    let job = running_backup(&cat, "a", "running");
    let mut done = cat.create_job(JobKind::Restore, None).unwrap();
    done.state = JobState::Finished;
    done.finished_at = Some(t);
    cat.update_job(&done).unwrap();
    cat.insert_backup(&full_set("full", t)).unwrap();
    cat.upsert_wal_segment(&wal_row("a", "000000010000000000000001", false))
        .unwrap();
    cat.upsert_wal_segment(&wal_row("a", "000000010000000000000002", true))
        .unwrap();
    cat.upsert_restore_point(&RestorePointRow {
        instance_id: "a".into(),
        timeline: TimelineId(1),
        name: "before".into(),
        lsn: Lsn(0x100_0100),
        time: t,
    })
    .unwrap();
    cat.upsert_recovery_event(&RecoveryEventRow {
        instance_id: "a".into(),
        timeline: TimelineId(1),
        lsn: Lsn(0x100_0200),
        seq: 0,
        end_lsn: Lsn(0x100_0240),
        kind: "DropDatabase".into(),
        xid: 900,
        time: t,
        db_oid: 16500,
        relfilenode: None,
        rel_oid: None,
        database: Some("shop".into()),
        schema: None,
        table: None,
        rows: None,
        filled: vec![16600, 16601],
        before_lsn: Some(Lsn(0x100_01c0)),
    })
    .unwrap();
    cat.upsert_names(
        &[RelationNameRow {
            instance_id: "a".into(),
            db_oid: 16500,
            relfilenode: 16600,
            rel_oid: 16590,
            schema: "public".into(),
            name: "orders".into(),
            kind: "r".into(),
            seen_at: t,
        }],
        &[DatabaseNameRow {
            instance_id: "a".into(),
            db_oid: 16500,
            name: "shop".into(),
            seen_at: t,
        }],
    )
    .unwrap();
    cat.put_policy(&policy("a")).unwrap();
    cat.put_cross_policy(&CrossBackupPolicy {
        instance_id: "a".into(),
        region: "eu".into(),
        backup_enabled: true,
        log_backup_enabled: true,
        retention_days: 3,
        backup_enabled_at: Some(t),
        log_backup_enabled_at: None,
        updated_at: t,
    })
    .unwrap();
    cat.insert_cross_backup("eu", &full_set("full", t), 10, t)
        .unwrap();
    cat.insert_cross_wal("eu", &wal_row("a", "000000010000000000000001", false), t)
        .unwrap();
    cat.add_usage_sample(&UsageSample {
        instance_id: "a".into(),
        at: t,
        logical_bytes: 1,
        data_bytes: 2,
        wal_bytes: 3,
        quota_bytes: 4,
        cross_region_bytes: None,
    })
    .unwrap();
    cat.add_access_key(&AccessKey {
        id: "AK1".into(),
        secret: "sec".into(),
        read_only: false,
        description: String::new(),
        created_at: t,
    })
    .unwrap();
    assert!(cat
        .admit_nonce("AK1", "seen", t, t - chrono::Duration::hours(1))
        .unwrap());
    cat.put_managed(&ManagedInstance {
        instance_id: "clone".into(),
        source_instance: "a".into(),
        backup_id: Some("full".into()),
        restore_time: None,
        data_dir: "/srv/clone".into(),
        port: 15432,
        pg_major: 15,
        status: "Running".into(),
        error: None,
        created_at: t,
        agent_clone: None,
    })
    .unwrap();
    cat.put_drill(&DrillResult {
        backup_id: "full".into(),
        instance_id: "a".into(),
        status: "Passed".into(),
        detail: "12 tables".into(),
        started_at: t,
        finished_at: Some(t),
        job_id: Some(job.id),
    })
    .unwrap();
    let mut pending = BTreeMap::new();
    pending.insert("pack-1".to_string(), t);
    cat.put_gc_pending("repo", &pending).unwrap();
    let hold = RepoHold::new(
        "repo",
        false,
        cat.lease_owner().clone(),
        "backup",
        std::time::Duration::from_secs(60),
    );
    assert!(cat.acquire_repo_hold(&hold, t).unwrap());
    cat.shared_secret("download-link-key", "plain:00").unwrap();
    let queued = cat.queue_job(JobKind::Drill, "a", Some("full")).unwrap();
    cat.claim_queued_job(queued.id, "n1", t).unwrap().unwrap();
    cat.queue_job(JobKind::Backup, "b", None).unwrap();
    cat.publish_receiver(&receiver("a", "n1", t)).unwrap();
    cat
}

/// What the catalog answers, with times cut to the microsecond.
fn everything(cat: &dyn Catalog) -> String {
    let mut out = serde_json::json!({
        "instances": cat.list_instances().unwrap(),
        "passwords": cat.list_instances().unwrap().iter().map(|i| i.password.clone()).collect::<Vec<_>>(),
        "managed": cat.list_managed().unwrap(),
        "jobs": cat.list_jobs(None).unwrap(),
        "keys": cat.list_access_keys().unwrap().iter().map(|k| (k.id.clone(), k.secret.clone())).collect::<Vec<_>>(),
        "gc": cat.gc_pending("repo").unwrap(),
        "nodes": cat.list_nodes().unwrap().iter().map(|n| {
            (n.id.clone(), n.api_address.clone(), n.started_at, n.heartbeat_at, n.version.clone())
        }).collect::<Vec<_>>(),
        "session": cat.touch_session("h1", Utc::now()).unwrap().map(|s| {
            (s.key_id, s.read_only, s.csrf, s.created_at, s.flash)
        }),
        "owners": cat.list_owners().unwrap().iter().map(|o| {
            (o.instance_id.clone(), o.node_id.clone(), o.epoch, o.expires_at)
        }).collect::<Vec<_>>(),
        "secret": cat.shared_secret("download-link-key", "other").unwrap(),
        "receivers": cat.list_receivers().unwrap(),
    });
    for id in ["a", "b"] {
        out[id] = serde_json::json!({
            "backups": cat.list_backups(id).unwrap(),
            "drills": cat.list_drills(id).unwrap(),
            "wal": cat.list_wal_segments(id).unwrap(),
            "points": cat.list_restore_points(id).unwrap(),
            "events": cat.list_recovery_events(id, None, None).unwrap(),
            "names": cat.list_names(id).unwrap(),
            "policy": cat.get_policy(id).unwrap(),
            "cross_policy": cat.get_cross_policy(id).unwrap(),
            "cross": cat.list_cross_backups(id).unwrap(),
            "cross_wal": cat.list_cross_wal(id).unwrap(),
            "usage": cat.list_usage_samples(id, None, None).unwrap(),
        });
    }
    // RFC 3339 with nanoseconds: keep six digits of the fraction.
    let text = out.to_string();
    let re_cut = |s: &str| -> String {
        let mut r = String::new();
        let mut digits = 0;
        let mut in_fraction = false;
        for ch in s.chars() {
            if in_fraction && ch.is_ascii_digit() {
                digits += 1;
                if digits > 6 {
                    continue;
                }
            } else {
                in_fraction = false;
            }
            if ch == '.' {
                in_fraction = true;
                digits = 0;
            }
            r.push(ch);
        }
        r
    };
    re_cut(&text)
}

#[test]
fn a_sqlite_catalog_moves_to_an_empty_postgres_catalog_whole() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = populated_sqlite(&dir.path().join("catalog.db"));
    let url = testkit::catalog_database("transfer");
    let pg = PgCatalog::open(&PgConnect::new(&url)).unwrap();

    let report = copy_sqlite_to_postgres(&sqlite, &pg).unwrap();
    let tables: Vec<&str> = report.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(tables.len(), 24, "{tables:?}");
    assert!(
        report.iter().all(|t| t.rows > 0),
        "a row in every table: {report:?}"
    );
    assert_eq!(everything(&sqlite), everything(&pg));
    // Nonces and ids carry over: a replay stays refused, new ids go on.
    let t = Utc::now();
    assert!(!pg
        .admit_nonce("AK1", "seen", t, t - chrono::Duration::hours(1))
        .unwrap());
    let max = sqlite
        .list_jobs(None)
        .unwrap()
        .iter()
        .map(|j| j.id)
        .max()
        .unwrap();
    assert!(pg.create_job(JobKind::Backup, None).unwrap().id > max);
    let cross = pg
        .insert_cross_backup("us", &full_set("full", now()), 1, now())
        .unwrap();
    assert!(cross > sqlite.list_cross_backups("a").unwrap()[0].id);

    // A catalog in use is never overwritten; nothing of a refused copy lands.
    let before = everything(&pg);
    let err = copy_sqlite_to_postgres(&sqlite, &pg).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(everything(&pg), before);
}

/// A pooled connection the server dropped costs at most the call that finds
/// it (as retryable); the next call connects afresh.
#[test]
fn a_dropped_connection_is_retryable_and_replaced() {
    let url = testkit::catalog_database("dropped_connection");
    let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
    cat.add_instance(&instance("a")).unwrap();
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let killed = testkit::catalog_server().psql(
        "postgres",
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}'"
        ),
    );
    assert_ne!(killed, "0", "the catalog's connection was there to drop");
    match cat.list_instances() {
        Ok(list) => assert_eq!(list.len(), 1),
        Err(e) => assert!(e.is_retryable(), "{e:?}"),
    }
    assert_eq!(cat.list_instances().unwrap().len(), 1);
}

/// TLS: verified against the URL's `sslrootcert`; a server the roots do not
/// vouch for is refused.
#[test]
fn tls_is_verified_against_sslrootcert() {
    let server = Cluster::builder(15).ssl(true).wal_level("minimal").start();
    let ca = server.ca_cert().unwrap().display().to_string();
    let base = format!("postgres://postgres@localhost:{}/postgres", server.port());
    let cat = PgCatalog::open(&PgConnect::new(&format!(
        "{base}?sslmode=verify-full&sslrootcert={ca}"
    )))
    .unwrap();
    cat.add_instance(&instance("over-tls")).unwrap();
    let ssl = server.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.application_name = 'strata'",
    );
    assert_ne!(ssl, "0", "the catalog's connections use TLS");
    drop(cat);
    // The system's roots do not know the test CA.
    let err = PgCatalog::open(&PgConnect::new(&format!("{base}?sslmode=require")))
        .err()
        .expect("an unknown CA is refused");
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
}

/// Both backends hold the same tables and columns, in the same order, with
/// types that mean the same: SQLite TEXT is PostgreSQL text or (times)
/// timestamptz, INTEGER is bigint or (truth values) boolean.
#[test]
fn both_backends_have_the_same_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    drop(SqliteCatalog::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut sqlite: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for t in tables {
        let cols = conn
            .prepare(&format!(
                "SELECT name, type FROM pragma_table_info('{t}') ORDER BY cid"
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        sqlite.insert(t, cols);
    }

    let url = testkit::catalog_database("same_schema");
    drop(PgCatalog::open(&PgConnect::new(&url)).unwrap());
    let listing = psql_url(
        &url,
        "SELECT table_name || '|' || column_name || '|' || data_type FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name <> 'strata_schema_migrations' \
         ORDER BY table_name, ordinal_position",
    );
    let mut postgres: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for line in listing.lines() {
        let mut parts = line.split('|');
        let (t, c, ty) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        postgres
            .entry(t.to_string())
            .or_default()
            .push((c.to_string(), ty.to_string()));
    }
    assert_eq!(
        sqlite.keys().collect::<Vec<_>>(),
        postgres.keys().collect::<Vec<_>>()
    );
    for (table, cols) in &sqlite {
        let pg = &postgres[table];
        let names = |c: &[(String, String)]| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(cols), names(pg), "columns of {table}");
        for ((name, lite), (_, big)) in cols.iter().zip(pg) {
            let same = match lite.as_str() {
                "TEXT" => big == "text" || big == "timestamp with time zone",
                "INTEGER" => big == "bigint" || big == "boolean",
                _ => false,
            };
            assert!(same, "{table}.{name}: SQLite {lite}, PostgreSQL {big}");
        }
    }
}

/// A TCP relay to the shared catalog server that can be cut: while cut,
/// every relayed connection is shut down and new ones are closed at once,
/// as when the network between a node and its catalog fails.
struct Relay {
    port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start() -> Relay {
        use std::net::{TcpListener, TcpStream};
        let server = testkit::catalog_server();
        let target = (server.host().to_string(), server.port());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (is_cut, streams) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if is_cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let server = TcpStream::connect((target.0.as_str(), target.1)).unwrap();
                streams
                    .lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, cut, open }
    }

    /// `url` with the relay in place of the server.
    fn url(&self, url: &str) -> String {
        let server = testkit::catalog_server();
        let direct = format!("@{}:{}/", server.host(), server.port());
        assert!(url.contains(&direct), "{url}");
        url.replace(&direct, &format!("@127.0.0.1:{}/", self.port))
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn mend(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A handle that found the catalog unreachable takes no job over for one
/// lease: the owners were likely cut off too and have not renewed yet,
/// however old their heartbeats look.
#[test]
fn no_job_is_taken_over_within_a_lease_of_an_outage() {
    let b = Postgres::new("outage_guard");
    let relay = Relay::start();
    let observer = PgCatalog::open(&PgConnect::new(&relay.url(&b.url))).unwrap();
    let (owner, patient) = (b.open(), b.open());
    owner.set_job_lease(std::time::Duration::from_secs(1));
    patient.set_job_lease(std::time::Duration::from_secs(3600));
    let job = running_backup(&*owner, "a", "through-the-outage");
    let long = running_backup(&*patient, "b", "with-a-long-lease");
    observer.list_instances().unwrap();
    let t = b.pass(now(), chrono::Duration::hours(2));

    relay.cut();
    let err = observer.list_instances().unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    relay.mend();

    let lease = chrono::Duration::seconds(30);
    assert_eq!(observer.fail_expired_jobs(t, lease).unwrap(), 0);
    assert_eq!(owner.get_job(job.id).unwrap().state, JobState::Uploading);
    // The catalog answers again. Once the observer's lease (here 1 s) has
    // passed, a job whose own lease has passed since the outage is taken
    // over; one whose owner keeps a longer lease is not, however old its
    // heartbeat: its owner renews only every sixth of that lease.
    let short = chrono::Duration::seconds(1);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(observer.fail_expired_jobs(t, short).unwrap(), 1);
    assert_eq!(owner.get_job(job.id).unwrap().state, JobState::Failed);
    assert_eq!(patient.get_job(long.id).unwrap().state, JobState::Uploading);
}

/// Sets a race left running side by side before the rule of one running
/// set per instance: the upgrade keeps the newest running and fails the
/// others, on both backends.
#[test]
fn sets_left_running_side_by_side_are_failed_by_the_upgrade() {
    let before = MIGRATIONS.len() - 1;
    let rows = "INSERT INTO jobs (id, kind, instance_id, state, started_at, pid, owner, heartbeat_at, backup_id) VALUES \
        (7, 'backup', 'a', 'Uploading', '2026-12-01T01:00:00.000000000Z', 1, 'old-owner', '2026-12-01T01:00:00.000000000Z', 'older'); \
        INSERT INTO backup_sets (id, instance_id, status, mode, started_at, job_id) VALUES \
        ('older', 'a', 'Running', 'Manual', '2026-12-01T01:00:00.000000000Z', 7), \
        ('newer', 'a', 'Running', 'Manual', '2026-12-01T02:00:00.000000000Z', NULL), \
        ('alone', 'b', 'Running', 'Manual', '2026-12-01T01:30:00.000000000Z', NULL), \
        ('done', 'a', 'Success', 'Manual', '2026-11-30T01:00:00.000000000Z', NULL);";
    let check = |cat: &dyn Catalog, backend: &str| {
        let status = |id: &str| cat.get_backup(id).unwrap().status;
        assert_eq!(status("older"), BackupStatus::Failed, "{backend}");
        assert!(
            cat.get_backup("older")
                .unwrap()
                .error
                .unwrap()
                .contains("running at the same time"),
            "{backend}"
        );
        assert!(
            cat.get_backup("older").unwrap().finished_at.is_some(),
            "{backend}"
        );
        assert_eq!(status("newer"), BackupStatus::Running, "{backend}");
        assert_eq!(status("alone"), BackupStatus::Running, "{backend}");
        assert_eq!(status("done"), BackupStatus::Success, "{backend}");
        // Its job failed with it and changed hands: the old owner cannot
        // record it as running or finished again.
        let job = cat.get_job(JobId::new(7)).unwrap();
        assert_eq!(job.state, JobState::Failed, "{backend}");
        assert_eq!(job.owner.as_str(), "catalog-upgrade", "{backend}");
        let finished = cat.get_backup("older").unwrap().finished_at.unwrap();
        assert!(
            finished > at("2026-12-01T00:00:00Z"),
            "{backend}: {finished}"
        );
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        for step in &MIGRATIONS[..before] {
            c.execute_batch(step.sqlite).unwrap();
        }
        c.pragma_update(None, "user_version", MIGRATIONS[before - 1].version)
            .unwrap();
        c.execute_batch(rows).unwrap();
    }
    check(&SqliteCatalog::open(&path).unwrap(), "sqlite");

    let url = testkit::catalog_database("upgrade_running_sets");
    let mut sql = String::from(
        "CREATE TABLE strata_schema_migrations (version bigint PRIMARY KEY, \
         description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());\n",
    );
    for step in &MIGRATIONS[..before] {
        sql.push_str(step.postgres);
        sql.push_str(&format!(
            "\nINSERT INTO strata_schema_migrations (version, description) VALUES ({}, 'old');\n",
            step.version
        ));
    }
    sql.push_str(rows);
    psql_url(&url, &sql);
    check(&PgCatalog::open(&PgConnect::new(&url)).unwrap(), "postgres");
}

/// A PostgreSQL catalog left at any earlier step (built from the migration
/// list itself) upgrades on open and keeps its rows.
#[test]
fn a_postgres_catalog_at_every_earlier_step_upgrades_and_keeps_its_rows() {
    for reached in 1..MIGRATIONS.len() {
        let url = testkit::catalog_database(&format!("upgrade_from_{reached}"));
        let mut sql = String::from(
            "CREATE TABLE strata_schema_migrations (version bigint PRIMARY KEY, \
             description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());\n",
        );
        for step in &MIGRATIONS[..reached] {
            sql.push_str(step.postgres);
            sql.push_str(&format!(
                "\nINSERT INTO strata_schema_migrations (version, description) VALUES ({}, 'old');\n",
                step.version
            ));
        }
        sql.push_str(
            "INSERT INTO instances (id, host, port, user_name, sslmode, created_at) \
             VALUES ('old', 'db.example', 5433, 'strata', 'verify-full', '2026-01-02T03:04:05.678901Z');\n",
        );
        psql_url(&url, &sql);
        let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
        let old = cat.get_instance("old").unwrap();
        assert_eq!(
            (old.host.as_str(), old.port, old.sslmode, old.password),
            ("db.example", 5433, SslMode::VerifyFull, None),
            "from step {reached}"
        );
        assert_eq!(old.created_at, at("2026-01-02T03:04:05.678901Z"));
        let versions = psql_url(&url, "SELECT count(*) FROM strata_schema_migrations");
        assert_eq!(
            versions,
            MIGRATIONS.len().to_string(),
            "from step {reached}"
        );
        // Everything the newest steps added works.
        cat.put_gc_pending("r", &BTreeMap::from([("p".to_string(), now())]))
            .unwrap();
        assert!(cat.create_job(JobKind::Backup, None).unwrap().id.get() > 0);
    }
}

fn node(id: &str, at: DateTime<Utc>) -> Node {
    Node {
        id: id.into(),
        api_address: format!("{id}.example:8080"),
        started_at: at,
        heartbeat_at: at,
        version: "1.0.0".into(),
    }
}

fn heartbeats_insert_then_replace_a_node(b: &dyn Backend) {
    let cat = b.open();
    let t0 = now();
    cat.heartbeat(&node("b", t0)).unwrap();
    cat.heartbeat(&node("a", t0)).unwrap();
    let later = Node {
        heartbeat_at: t0 + chrono::Duration::seconds(5),
        api_address: "10.0.0.2:8080".into(),
        ..node("a", t0)
    };
    cat.heartbeat(&later).unwrap();
    let nodes = b.open().list_nodes().unwrap();
    // Heartbeat times are the catalog's clock's: compared, not matched.
    let without_heartbeat = |n: &Node| Node {
        heartbeat_at: DateTime::UNIX_EPOCH,
        ..n.clone()
    };
    assert_eq!(
        nodes.iter().map(without_heartbeat).collect::<Vec<_>>(),
        [without_heartbeat(&later), without_heartbeat(&node("b", t0))]
    );
    assert!(nodes[0].heartbeat_at > nodes[1].heartbeat_at);
    // A node leaving records the epoch, kept as given on every backend.
    let left = Node {
        heartbeat_at: DateTime::UNIX_EPOCH,
        ..node("b", t0)
    };
    cat.heartbeat(&left).unwrap();
    assert_eq!(b.open().list_nodes().unwrap()[1], left);
}

fn racing_handles_claim_one_instance_lease_once(b: &dyn Backend) {
    let ttl = chrono::Duration::seconds(15);
    let handles = [b.open(), b.open()];
    for round in 0..20 {
        let id = format!("pg-{round}");
        let t = now();
        let barrier = Arc::new(Barrier::new(2));
        let claims: Vec<_> = ["a", "b"]
            .into_iter()
            .zip(handles.iter().cloned())
            .map(|(n, cat)| {
                let (id, barrier) = (id.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (n, cat.claim_instance(&id, n, t, ttl).unwrap())
                })
            })
            .collect();
        let won: Vec<&str> = claims
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|(_, won)| *won)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {won:?} won");
        let owners = b.open().list_owners().unwrap();
        let row = owners.iter().find(|o| o.instance_id == id).unwrap();
        assert_eq!((row.node_id.as_str(), row.epoch), (won[0], 1));
    }
}

fn a_lapsed_lease_is_taken_over_and_a_valid_one_is_not(b: &dyn Backend) {
    let cat = b.open();
    let ttl = chrono::Duration::seconds(100);
    let secs = chrono::Duration::seconds;
    let t0 = now();
    assert!(cat.claim_instance("db", "a", t0, ttl).unwrap());
    let claimed = cat.list_owners().unwrap()[0].clone();
    assert_eq!((claimed.node_id.as_str(), claimed.epoch), ("a", 1));
    // Valid: b is refused and nothing changes.
    let t = b.pass(t0, secs(50));
    let before = cat.list_owners().unwrap();
    assert!(!cat.claim_instance("db", "b", t, ttl).unwrap());
    assert_eq!(cat.list_owners().unwrap(), before);
    // a renews by claiming again: same epoch, later expiry.
    let t1 = b.pass(t, secs(10));
    let before = cat.list_owners().unwrap()[0].clone();
    assert!(cat.claim_instance("db", "a", t1, ttl).unwrap());
    let row = cat.list_owners().unwrap()[0].clone();
    assert_eq!(row.epoch, 1);
    assert!(row.expires_at > before.expires_at);
    // Lapsed: b takes it, the epoch goes up, a's renewals miss it.
    let t2 = b.pass(t1, ttl);
    let lapsed = cat.list_owners().unwrap()[0].clone();
    assert!(cat.claim_instance("db", "b", t2, ttl).unwrap());
    assert_eq!(cat.renew_instances("a", t2, ttl).unwrap(), 0);
    assert!(!cat.release_instance("db", "a").unwrap());
    let row = &cat.list_owners().unwrap()[0];
    assert_eq!((row.node_id.as_str(), row.epoch), ("b", 2));
    assert!(row.expires_at > lapsed.expires_at);
    // Released, it is free for anyone (a fresh lease).
    assert!(cat.release_instance("db", "b").unwrap());
    assert!(cat.list_owners().unwrap().is_empty());
    assert!(cat.claim_instance("db", "a", t2, ttl).unwrap());
    assert_eq!(cat.list_owners().unwrap()[0].epoch, 1);
}

fn renewal_extends_only_the_nodes_own_leases(b: &dyn Backend) {
    let cat = b.open();
    let ttl = chrono::Duration::seconds(10);
    let t0 = now();
    for (i, n) in [("x", "a"), ("y", "a"), ("z", "b")] {
        assert!(cat.claim_instance(i, n, t0, ttl).unwrap());
    }
    let expiries = || -> BTreeMap<String, DateTime<Utc>> {
        cat.list_owners()
            .unwrap()
            .into_iter()
            .map(|o| (o.instance_id, o.expires_at))
            .collect()
    };
    let t1 = b.pass(t0, chrono::Duration::seconds(4));
    let before = expiries();
    assert_eq!(cat.renew_instances("a", t1, ttl).unwrap(), 2);
    let expiry = expiries();
    assert!(expiry["x"] > before["x"]);
    assert!(expiry["y"] > before["y"]);
    assert_eq!(expiry["z"], before["z"], "another node's lease moved");
    // Deleting an instance forgets its lease.
    cat.add_instance(&instance("x")).unwrap();
    cat.delete_instance("x").unwrap();
    let left: Vec<String> = cat
        .list_owners()
        .unwrap()
        .into_iter()
        .map(|o| o.instance_id)
        .collect();
    assert_eq!(left, ["y", "z"]);
}

/// A job queued through one node's API: exactly one of several claimers
/// gets it, named as its runner, and it leaves the queue.
fn racing_handles_claim_one_queued_job_once(b: &dyn Backend) {
    let api = b.open();
    for round in 0..10 {
        let queued = api.queue_job(JobKind::Backup, "a", None).unwrap();
        assert!(queued.queued && queued.state == JobState::NoStart);
        let t = now();
        let id = queued.id;
        let claims = race(b, 4, move |cat, n| {
            cat.claim_queued_job(id, &format!("node-{n}"), t)
                .unwrap()
                .map(|job| (n, job, cat.lease_owner().clone()))
        });
        let won: Vec<_> = claims.into_iter().flatten().collect();
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        let (n, claimed, owner) = &won[0];
        let stored = b.open().get_job(id).unwrap();
        assert_eq!(&stored, claimed);
        assert!(!stored.queued);
        assert_eq!(
            stored.node_id.as_deref(),
            Some(format!("node-{n}").as_str())
        );
        assert_eq!(&stored.owner, owner);
        assert_eq!(stored.state, JobState::NoStart);
        assert!(api.queued_jobs().unwrap().iter().all(|j| j.id != id));
        assert_eq!(api.claim_queued_job(id, "late", t).unwrap(), None);
    }
}

/// Nobody owns a queued job: the handle that queued it going away fails
/// nothing, the instance's next owner claims it and owns it from then on.
fn a_queued_job_waits_for_its_next_owner_and_is_never_taken_over(b: &dyn Backend) {
    let lease = chrono::Duration::seconds(30);
    let api = b.open();
    let job = api.queue_job(JobKind::Drill, "a", Some("full")).unwrap();
    assert_eq!(job.backup_id.as_deref(), Some("full"));
    assert_eq!(job.node_id, None);
    api.renew_leases(now()).unwrap();
    drop(api);
    let later = b.pass(now(), chrono::Duration::hours(1));
    let other = b.open();
    assert_eq!(other.fail_expired_jobs(later, lease).unwrap(), 0);
    let queue = other.queued_jobs().unwrap();
    assert_eq!(queue, vec![job.clone()]);
    assert_eq!(other.list_jobs(Some("a")).unwrap(), vec![job.clone()]);

    let owner = b.open();
    let claimed = owner
        .claim_queued_job(job.id, "node-b", later)
        .unwrap()
        .unwrap();
    assert_eq!(&claimed.owner, owner.lease_owner());
    assert_eq!(owner.renew_leases(later).unwrap(), 1);
    assert_eq!(other.fail_expired_jobs(later, lease).unwrap(), 0);
    // Claimed, it is an ordinary job: its owner stopping fails it.
    let much_later = b.pass(later, chrono::Duration::hours(1));
    assert_eq!(other.fail_expired_jobs(much_later, lease).unwrap(), 1);
    assert_eq!(other.get_job(job.id).unwrap().state, JobState::Failed);
}

fn receiver(instance: &str, node: &str, t: DateTime<Utc>) -> ReceiverStatus {
    ReceiverStatus {
        instance_id: instance.into(),
        node_id: node.into(),
        running: true,
        received_lsn: 0x1_0000_0028,
        server_end_lsn: u64::MAX - 1,
        last_message_at: Some(t),
        last_error: Some("connection reset".into()),
        failing: None,
        failing_since: None,
        unreachable_since: None,
        published_at: t,
    }
}

fn receiver_states_are_published_and_replaced(b: &dyn Backend) {
    let a = b.open();
    let t = now();
    a.publish_receiver(&receiver("pg-2", "node-a", t)).unwrap();
    a.publish_receiver(&receiver("pg-1", "node-a", t)).unwrap();
    let reader = b.open();
    assert_eq!(
        reader.list_receivers().unwrap(),
        vec![receiver("pg-1", "node-a", t), receiver("pg-2", "node-a", t)]
    );
    // The next owner's row replaces the last one's, whole.
    let moved = ReceiverStatus {
        running: false,
        last_message_at: None,
        last_error: None,
        failing: Some("could not connect".into()),
        failing_since: Some(t - chrono::Duration::seconds(40)),
        unreachable_since: Some(t - chrono::Duration::seconds(20)),
        published_at: t + chrono::Duration::seconds(3),
        ..receiver("pg-1", "node-b", t)
    };
    b.open().publish_receiver(&moved).unwrap();
    assert_eq!(reader.get_receiver("pg-1").unwrap(), Some(moved.clone()));
    assert_eq!(reader.get_receiver("pg-3").unwrap(), None);
    assert_eq!(
        reader.list_receivers().unwrap(),
        vec![moved, receiver("pg-2", "node-a", t)]
    );
    // Deleting an instance forgets its published state with it.
    a.add_instance(&instance("pg-2")).unwrap();
    a.delete_instance("pg-2").unwrap();
    assert_eq!(reader.get_receiver("pg-2").unwrap(), None);
    assert_eq!(reader.list_receivers().unwrap().len(), 1);
}

fn session(id_hash: &str, t: DateTime<Utc>) -> ConsoleSession {
    ConsoleSession {
        id_hash: id_hash.into(),
        key_id: "AK1".into(),
        read_only: true,
        csrf: "c".repeat(64),
        created_at: t,
        last_seen_at: t,
        flash: Some(r#"{"Done":{"text":"signed in"}}"#.into()),
    }
}

fn console_sessions_are_known_to_every_handle(b: &dyn Backend) {
    let (a, other) = (b.open(), b.open());
    let t0 = now();
    a.put_session(&session("old", t0), t0).unwrap();
    let t1 = b.pass(t0, chrono::Duration::minutes(10));
    a.put_session(&session("new", t1), t1 - chrono::Duration::minutes(5))
        .unwrap();
    // Putting "new" forgot "old" (last seen before the horizon).
    assert_eq!(other.touch_session("old", t1).unwrap(), None);
    // Another handle (node) finds it whole, and its touch is seen by all.
    // Its times are the catalog's clock's: compared, not matched.
    let t2 = b.pass(t1, chrono::Duration::seconds(30));
    let untimed = |s: ConsoleSession| ConsoleSession {
        created_at: DateTime::UNIX_EPOCH,
        last_seen_at: DateTime::UNIX_EPOCH,
        ..s
    };
    let first = other.touch_session("new", t2).unwrap().unwrap();
    assert_eq!(untimed(first.clone()), untimed(session("new", t1)));
    assert_eq!(first.created_at, first.last_seen_at);
    let second = a.touch_session("new", t2).unwrap().unwrap();
    assert!(second.last_seen_at > first.last_seen_at);
    assert_eq!(second.created_at, first.created_at);
    // The flash is taken once, wherever; a new one replaces nothing else.
    assert!(a.take_session_flash("new").unwrap().is_some());
    assert_eq!(other.take_session_flash("new").unwrap(), None);
    other.set_session_flash("new", "again").unwrap();
    assert_eq!(
        a.take_session_flash("new").unwrap().as_deref(),
        Some("again")
    );
    // Deleted on one handle, gone for every handle; deleting twice is fine.
    a.delete_session("new").unwrap();
    a.delete_session("new").unwrap();
    assert_eq!(other.touch_session("new", t2).unwrap(), None);
    assert_eq!(other.take_session_flash("new").unwrap(), None);
}

fn racing_handles_take_a_flash_once(b: &dyn Backend) {
    let handles: Vec<_> = (0..4).map(|_| b.open()).collect();
    let t = now();
    handles[0].put_session(&session("s", t), t).unwrap();
    for round in 0..10 {
        handles[0]
            .set_session_flash("s", &format!("message {round}"))
            .unwrap();
        let barrier = Arc::new(Barrier::new(handles.len()));
        let takers: Vec<_> = handles
            .iter()
            .cloned()
            .map(|cat| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    cat.take_session_flash("s").unwrap()
                })
            })
            .collect();
        let got: Vec<String> = takers
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(got, vec![format!("message {round}")], "round {round}");
    }
}
