//! The scheduler against a real PostgreSQL 15, walked through days with a
//! manual clock: the first backup on registration, backups at the start of
//! the window on the chosen days only, a missed window made up once after
//! "downtime", the WAL receiver kept running, and retention deleting what
//! the policy lets go (with garbage collection leaving a clean repository).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use strata_catalog::{
    BackupId, BackupMode, BackupStatus, Catalog, Instance, SqliteCatalog, SslMode,
};
use strata_engine::{Engine, EngineSettings};
use strata_repo::{LocalStorage, Repository};
use strata_service::{policy, ManualClock, PolicyChange, Service, ServiceSettings};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn engine(dir: &std::path::Path) -> Engine {
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let repo =
        Repository::open_or_init(Arc::new(LocalStorage::new(dir.join("repo")).unwrap())).unwrap();
    // These tests check what a collection removes, so packs go at once
    // rather than after the grace period.
    let settings = EngineSettings {
        gc_grace: Duration::ZERO,
        ..EngineSettings::default()
    };
    Engine::new(catalog, repo, settings)
}

fn settings(dir: &std::path::Path) -> ServiceSettings {
    ServiceSettings {
        instances_dir: dir.join("instances"),
        drills: false,
        ..Default::default()
    }
}

/// Waits until no backup of the instance is running; returns all sets.
async fn settle(svc: &Service, id: &str) -> Vec<strata_catalog::BackupSet> {
    for _ in 0..600 {
        let sets = svc.engine().catalog().list_backups(id).unwrap();
        if svc.running_backup_job(id).is_none()
            && sets.iter().all(|b| b.status != BackupStatus::Running)
        {
            return sets;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("backup of {id} did not finish within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_follows_days_windows_downtime_and_retention() {
    let cluster = testkit::shared_cluster(15);
    let dir = tempfile::tempdir().unwrap();
    // 2027-01-06 is a Wednesday, in the future of every backup taken here.
    let clock = Arc::new(ManualClock::new(at("2027-01-06T10:00:00Z")));
    let svc = Service::new(engine(dir.path()), clock.clone(), settings(dir.path()));
    svc.register_instance(
        Instance::new(
            "sched",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    let p = svc
        .modify_policy(
            "sched",
            PolicyChange {
                backup_days: Some("Thursday,Monday".into()),
                backup_window: Some("02:00Z-03:00Z".into()),
                // Long retention while walking through the windows: the
                // clock runs weeks ahead of the backups' real times.
                backup_retention_days: Some("730".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(p.backup_days, ["Monday", "Thursday"]);
    assert_eq!(
        policy::next_backup_time(&p, strata_service::Clock::now(clock.as_ref())),
        Some(at("2027-01-07T02:00:00Z"))
    );

    // Registration: the first backup runs at once, whatever the window.
    svc.tick().await;
    let sets = settle(&svc, "sched").await;
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(
        (sets[0].status, sets[0].mode),
        (BackupStatus::Success, BackupMode::Automated)
    );

    // Wednesday: nothing due (Monday's window was before the policy changed).
    svc.tick().await;
    assert_eq!(settle(&svc, "sched").await.len(), 1);

    // Thursday, a second before the window: nothing; at its start: a backup.
    clock.set(at("2027-01-07T01:59:59Z"));
    svc.tick().await;
    assert_eq!(settle(&svc, "sched").await.len(), 1);
    clock.set(at("2027-01-07T02:00:00Z"));
    svc.tick().await;
    assert_eq!(settle(&svc, "sched").await.len(), 2);
    clock.set(at("2027-01-07T02:40:00Z"));
    svc.tick().await;
    assert_eq!(
        settle(&svc, "sched").await.len(),
        2,
        "one backup per window"
    );

    // Saturday is not a backup day.
    clock.set(at("2027-01-09T02:00:00Z"));
    svc.tick().await;
    assert_eq!(settle(&svc, "sched").await.len(), 2);

    // Down over Monday's window: Tuesday's first round makes it up, once.
    clock.set(at("2027-01-12T09:00:00Z"));
    svc.tick().await;
    assert_eq!(settle(&svc, "sched").await.len(), 3);
    svc.tick().await;
    let sets = settle(&svc, "sched").await;
    assert_eq!(sets.len(), 3);
    assert!(
        sets.iter().all(|b| b.status == BackupStatus::Success),
        "{sets:?}"
    );
    let p = svc.policy("sched").unwrap();
    assert_eq!(p.last_auto_slot, Some(at("2027-01-11T02:00:00Z")));

    // The WAL receiver runs and stores WAL.
    cluster.psql(
        "postgres",
        "CREATE TABLE sched_t AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal();",
    );
    let mut stored = false;
    for _ in 0..100 {
        if !svc
            .engine()
            .catalog()
            .list_wal_segments("sched")
            .unwrap()
            .is_empty()
            && svc.wal_state("sched").unwrap().running
        {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored, "WAL receiver stored nothing");

    // A month later with 7-day retentions, everything but the newest set
    // (the base of the oldest recoverable point) goes; WAL before it too.
    let before = sets.clone();
    let newest = sets.iter().max_by_key(|b| b.started_at).unwrap().clone();
    let wal_before = svc.engine().catalog().list_wal_segments("sched").unwrap();
    svc.modify_policy(
        "sched",
        PolicyChange {
            backup_retention_days: Some("7".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    clock.set(at("2027-02-15T09:00:00Z"));
    svc.tick().await;
    let sets = settle(&svc, "sched").await;
    svc.tick().await;
    let kept = settle(&svc, "sched").await;
    let ids: Vec<&str> = kept.iter().map(|b| b.id.as_str()).collect();
    let newest_now = sets.iter().max_by_key(|b| b.started_at).unwrap();
    assert!(ids.contains(&newest_now.id.as_str()), "{ids:?}");
    // The two older sets went; the newest of before (the anchor of the
    // oldest recoverable point) and Monday's new one stay.
    assert_eq!(
        ids,
        [newest.id.as_str(), newest_now.id.as_str()],
        "{before:?}"
    );
    // Expired WAL waits while a backup holds the repository (Monday's ran
    // during that pass, on any node sharing the catalog): the next pass
    // trims it.
    clock.set(at("2027-02-15T09:06:00Z"));
    svc.tick().await;
    let kept = settle(&svc, "sched").await;
    let wal_after = svc.engine().catalog().list_wal_segments("sched").unwrap();
    assert!(
        wal_after.len() < wal_before.len() + 3,
        "WAL should have been trimmed"
    );
    let anchor = kept.iter().min_by_key(|b| b.started_at).unwrap();
    assert!(
        wal_after
            .iter()
            .all(|w| w.end_lsn > anchor.start_lsn.unwrap()),
        "WAL before the oldest kept set should be gone"
    );
    // Garbage collection ran: no unreferenced pack, nothing damaged.
    svc.tick().await;
    let report = svc.engine().repo().verify(&|_, _| {}).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report.unreferenced_packs.is_empty(),
        "{:?}",
        report.unreferenced_packs
    );
    assert_eq!(report.backups_checked as usize, kept.len());

    svc.shutdown().await;
    assert!(!svc.wal_state("sched").unwrap().running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_waits_for_running_backups() {
    let cluster = testkit::shared_cluster(15);
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    cluster.psql(
        "postgres",
        "CREATE TABLE gc_t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 200000) g;",
    );
    let svc = Service::new(
        engine,
        Arc::new(ManualClock::new(Utc::now())),
        settings(dir.path()),
    );
    svc.register_instance(
        Instance::new(
            "gc",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    let first = svc
        .engine()
        .backup("gc", &Default::default(), &strata_engine::NoProgress)
        .await
        .unwrap();
    let base = svc
        .engine()
        .backup("gc", &Default::default(), &strata_engine::NoProgress)
        .await
        .unwrap();
    svc.delete_backups("gc", std::slice::from_ref(&first.id))
        .unwrap_err(); // inside log retention
    svc.modify_policy(
        "gc",
        PolicyChange {
            log_backup_enabled: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // A throttled backup holds the shared lock; collection must not run.
    let opts = strata_engine::BackupOptions {
        mode: BackupMode::Manual,
        max_rate_kb: Some(4096),
        method: strata_catalog::BackupMethod::Physical,
        taken_under: None,
    };
    let pending = svc.engine().prepare_backup("gc", &opts).unwrap();
    let engine = svc.engine().clone();
    let running = tokio::spawn(async move {
        engine
            .run_backup_job(pending, &opts, &strata_engine::NoProgress)
            .await
    });
    let mut uploading = false;
    for _ in 0..200 {
        let jobs = svc.engine().catalog().list_jobs(Some("gc")).unwrap();
        if jobs
            .last()
            .is_some_and(|j| j.state == strata_catalog::JobState::Uploading)
        {
            uploading = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(uploading, "the third backup never started uploading");
    // The newest successful set stays, log backup off or not.
    let refused = svc
        .delete_backups("gc", std::slice::from_ref(&base.id))
        .unwrap_err();
    assert!(
        refused.to_string().contains("newest successful backup set"),
        "{refused}"
    );
    svc.delete_backups("gc", std::slice::from_ref(&first.id))
        .unwrap();
    assert_eq!(
        svc.engine().collect_garbage().unwrap(),
        None,
        "collection ran beside a backup"
    );
    let third = running.await.unwrap().unwrap();

    // Now it runs: the first set's packs that the others did not reuse go,
    // and the other sets are intact.
    let report = svc.engine().collect_garbage().unwrap().expect("lock free");
    assert_eq!(report.manifests_scanned, 2);
    let verify = svc.engine().repo().verify(&|_, _| {}).unwrap();
    assert!(verify.is_clean(), "{:?}", verify.problems);
    assert!(verify.unreferenced_packs.is_empty());
    assert_eq!(
        svc.engine().repo().list_backups("gc").unwrap(),
        vec![base.id.clone(), third.id.clone()]
    );

    // With log backup off every set but the newest successful one can go;
    // the newest stays until a newer one succeeds.
    svc.delete_backups("gc", std::slice::from_ref(&base.id))
        .unwrap();
    let refused = svc
        .delete_backups("gc", std::slice::from_ref(&third.id))
        .unwrap_err();
    assert!(
        matches!(
            &refused,
            strata_service::ServiceError::Policy(p) if p.kind == strata_service::Refusal::BackupSetKept
        ),
        "{refused:?}"
    );
    let left: Vec<BackupId> = svc
        .engine()
        .catalog()
        .list_backups("gc")
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(left, vec![third.id.clone()]);
    assert_eq!(
        svc.engine().repo().list_backups("gc").unwrap(),
        vec![third.id]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_drill_raises_the_alert() {
    let cluster = testkit::shared_cluster(15);
    let dir = tempfile::tempdir().unwrap();
    // The scratch server runs as the postgres OS user: its directory must be
    // reachable by it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut settings = settings(dir.path());
    settings.drills = true;
    let engine = engine(dir.path());
    let mut engine_settings = engine.settings().clone();
    engine_settings.pg_bin_dirs = [14, 15, 16, 17, 18]
        .into_iter()
        .filter_map(testkit::pg_bin_dir)
        .map(|d| d.display().to_string())
        .collect();
    let engine = engine.with_settings(engine_settings);
    let svc = Service::new(engine, Arc::new(ManualClock::new(Utc::now())), settings);
    svc.register_instance(
        Instance::new(
            "drill",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    let wait_drill = |backup: BackupId| {
        let svc = Arc::clone(&svc);
        async move {
            for _ in 0..1200 {
                if let Some(d) = svc.engine().catalog().get_drill(&backup).unwrap() {
                    if d.status == "Passed" || d.status == "Failed" {
                        return d;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("drill of {backup} did not finish in two minutes");
        }
    };
    let good = svc
        .engine()
        .backup("drill", &Default::default(), &strata_engine::NoProgress)
        .await
        .unwrap();
    svc.start_drill(&good.id).unwrap();
    let d = wait_drill(good.id.clone()).await;
    assert_eq!(d.status, "Passed", "{d:?}");
    let metrics = svc.metrics().unwrap();
    assert!(
        metrics.contains("strata_drill_failed{instance=\"drill\"} 0"),
        "{metrics}"
    );

    // Damage one stored block of a second backup: its drill must fail and
    // the alert turn on.
    let bad = svc
        .engine()
        .backup("drill", &Default::default(), &strata_engine::NoProgress)
        .await
        .unwrap();
    let manifest = svc.engine().repo().read_manifest("drill", &bad.id).unwrap();
    let block = manifest
        .files
        .iter()
        .find(|f| f.blocks.len() > 2)
        .unwrap()
        .blocks[1]
        .clone();
    let pack = dir
        .path()
        .join("repo")
        .join(strata_repo::pack_key(&block.pack));
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[block.offset as usize + 10] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    svc.start_drill(&bad.id).unwrap();
    let d = wait_drill(bad.id.clone()).await;
    assert_eq!(d.status, "Failed", "{d:?}");
    assert!(!d.detail.is_empty());
    let metrics = svc.metrics().unwrap();
    assert!(
        metrics.contains("strata_drill_failed{instance=\"drill\"} 1"),
        "{metrics}"
    );
    assert!(
        !dir.path().join("instances").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("scratch-")),
        "scratch servers must be removed"
    );
    svc.shutdown().await;
}

/// The advanced policy through the scheduler: a monthly rule takes a backup
/// on the month's last day although it is no regular backup day, a weekly
/// rule falling on a regular day gives that day's set the longer retention,
/// and deleting the rules leaves the sets the retention they were taken with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advanced_rules_take_and_stamp_their_backups() {
    use strata_catalog::DataRule;
    let cluster = testkit::shared_cluster(15);
    let dir = tempfile::tempdir().unwrap();
    // 2027-01-27 is a Wednesday; the 31st, January's last day, a Sunday.
    let clock = Arc::new(ManualClock::new(at("2027-01-27T10:00:00Z")));
    let svc = Service::new(engine(dir.path()), clock.clone(), settings(dir.path()));
    svc.register_instance(
        Instance::new(
            "sparse",
            cluster.host(),
            cluster.port(),
            "postgres",
            SslMode::Disable,
        ),
        None,
    )
    .await
    .unwrap();
    let rule = |id: &str, kind: &str, value: &str, days| DataRule {
        id: id.into(),
        kind: policy::parse_rule_kind(kind, value).unwrap(),
        retention_days: days,
    };
    svc.modify_policy(
        "sparse",
        PolicyChange {
            backup_days: Some("Monday,Thursday".into()),
            backup_window: Some("02:00Z-03:00Z".into()),
            // Long retentions: the clock runs weeks ahead of the backups' real times.
            backup_retention_days: Some("730".into()),
            log_backup_enabled: Some(false),
            advanced_enabled: Some(true),
            advanced_data_rules: Some(vec![
                rule("month-end", "Monthly", "Last", 3650),
                rule("thursdays", "Weekly", "Thursday", 1000),
                rule("tuesdays", "Weekly", "Tuesday", 800),
            ]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    svc.tick().await;
    assert_eq!(settle(&svc, "sparse").await.len(), 1, "the first backup");

    let stamped = |sets: &[strata_catalog::BackupSet]| {
        let newest = sets.iter().max_by_key(|b| b.started_at).unwrap();
        newest
            .taken_under
            .clone()
            .map(|t| (t.rule, t.retention_days))
    };
    // Thursday 28th: regular (730 days) and "thursdays" (1000 days) fall on it.
    clock.set(at("2027-01-28T02:00:00Z"));
    svc.tick().await;
    let sets = settle(&svc, "sparse").await;
    assert_eq!(sets.len(), 2);
    assert_eq!(stamped(&sets), Some(("thursdays".into(), 1000)));
    // Saturday 30th: no rule.
    clock.set(at("2027-01-30T02:00:00Z"));
    svc.tick().await;
    assert_eq!(settle(&svc, "sparse").await.len(), 2);
    // Sunday 31st: only the monthly rule.
    clock.set(at("2027-01-31T02:00:00Z"));
    svc.tick().await;
    let sets = settle(&svc, "sparse").await;
    assert_eq!(sets.len(), 3);
    assert_eq!(stamped(&sets), Some(("month-end".into(), 3650)));
    // Monday 1 February: the regular rule alone.
    clock.set(at("2027-02-01T02:00:00Z"));
    svc.tick().await;
    let sets = settle(&svc, "sparse").await;
    assert_eq!(sets.len(), 4);
    assert_eq!(stamped(&sets), Some(("regular".into(), 730)));

    // The rules deleted (and the policy off): the sets keep their stamps,
    // and Tuesday is no backup day any more.
    svc.modify_policy(
        "sparse",
        PolicyChange {
            advanced_enabled: Some(false),
            advanced_data_rules: Some(Vec::new()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    clock.set(at("2027-02-02T02:00:00Z"));
    svc.tick().await;
    let sets = settle(&svc, "sparse").await;
    assert_eq!(sets.len(), 4);
    let mut stamps: Vec<_> = sets
        .iter()
        .filter_map(|b| b.taken_under.clone())
        .map(|t| (t.rule, t.retention_days))
        .collect();
    stamps.sort();
    // The first backup of a registration belongs to no window.
    assert_eq!(
        stamps,
        [
            ("month-end".into(), 3650),
            ("regular".into(), 730),
            ("thursdays".into(), 1000)
        ]
    );
    svc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_round_deletes_old_jobs_nothing_names() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    // The service clock runs 100 days ahead: ages are wall-clock facts, as
    // the jobs' end times are, so it must not matter.
    let service = |keep: Option<chrono::Duration>| {
        Service::new(
            engine.clone(),
            Arc::new(ManualClock::new(Utc::now() + chrono::Duration::days(100))),
            ServiceSettings {
                job_keep: keep,
                ..settings(dir.path())
            },
        )
    };
    let catalog = engine.catalog().clone();
    let end = |days_ago: i64| {
        let mut j = catalog
            .create_job(strata_catalog::JobKind::Restore, Some("pg"))
            .unwrap();
        j.state = strata_catalog::JobState::Finished;
        j.finished_at = Some(Utc::now() - chrono::Duration::days(days_ago));
        catalog.update_job(&j).unwrap();
        j.id
    };
    let ids = || -> Vec<_> {
        catalog
            .list_jobs(None)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect()
    };
    let gone = [end(45), end(31)];
    let kept = [end(20), end(29)];
    assert_eq!(ids().len(), 4);

    // `jobs.keep_days = 0`: every job stays.
    service(None).tick().await;
    assert_eq!(ids().len(), 4);

    // The first round's retention pass runs at once.
    service(Some(chrono::Duration::days(30))).tick().await;
    assert_eq!(ids(), kept, "{gone:?} should be gone");
}
