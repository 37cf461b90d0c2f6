//! Restore drills: every successful backup (and any on demand) is restored
//! to a scratch server, recovered to consistency and checked with
//! `pg_amcheck` over every database, then removed. The outcome is recorded
//! per backup set (`DescribeBackups` reports it, `/metrics` alerts on a
//! failure). Drills run one at a time by default on their own thread at
//! low CPU priority, so scheduled backups are never held up by them.
//!
//! Sets this service did not take (`strata backup create`, a backup that
//! ended while the service was down, sets from before drills were on) are
//! found by the scheduler's round: a successful set with no drill recorded
//! is drilled, newest first, one at a time while no other drill waits.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, Once};

use chrono::Utc;
use strata_catalog::{
    BackupId, BackupSet, BackupStatus, DrillResult, InstanceId, Job, JobId, JobKind,
};
use strata_engine::EngineError;

use crate::local::RestoreSource;
use crate::{fail_job, finish_job, lock, Service, ServiceResult};

/// The drill worker thread, started with the first drill, and its queue.
pub(crate) struct DrillWorker {
    /// Drills waiting: (instance, backup set, job).
    queue: Mutex<VecDeque<(InstanceId, BackupId, JobId)>>,
    /// Wakes the worker when a drill is queued or the service stops.
    pub(crate) wakeup: Condvar,
    started: Once,
    /// Backup sets known to have a drill recorded. Held while an automatic
    /// drill is decided and recorded, so a set is drilled once however it
    /// was found (its backup ending here, or the round).
    recorded: Mutex<HashSet<BackupId>>,
}

impl Default for DrillWorker {
    fn default() -> Self {
        DrillWorker {
            queue: Mutex::new(VecDeque::new()),
            wakeup: Condvar::new(),
            started: Once::new(),
            recorded: Mutex::new(HashSet::new()),
        }
    }
}

impl Service {
    /// Queues a drill of a successful backup set; returns the job id.
    pub fn start_drill(self: &Arc<Self>, backup_id: &str) -> ServiceResult<JobId> {
        let set = self.drillable(backup_id)?;
        let job = self
            .engine
            .catalog()
            .create_job(JobKind::Drill, Some(&set.instance_id))?;
        self.begin_drill(set, job)
    }

    /// Queues the drill of a set that just became drillable here (its
    /// backup or upload ended) unless one is recorded for it already.
    pub(crate) fn drill_new_set(self: &Arc<Self>, backup_id: &BackupId) -> ServiceResult<()> {
        let mut recorded = lock(&self.drill_worker.recorded);
        if recorded.contains(backup_id) || self.engine.catalog().get_drill(backup_id)?.is_some() {
            recorded.insert(backup_id.clone());
            return Ok(());
        }
        self.start_drill(backup_id)?;
        recorded.insert(backup_id.clone());
        Ok(())
    }

    /// The round's share for one instance: queues a drill of its newest
    /// successful set in the repository with no drill recorded, while no
    /// drill waits in this node's queue (a backlog goes one at a time).
    pub(crate) fn drill_undrilled(self: &Arc<Self>, sets: &[BackupSet]) -> ServiceResult<()> {
        if !self.settings.drills {
            return Ok(());
        }
        let mut recorded = lock(&self.drill_worker.recorded);
        let mut unknown: Vec<&BackupSet> = sets
            .iter()
            .filter(|b| b.status == BackupStatus::Success && b.in_repository())
            .filter(|b| !recorded.contains(&b.id))
            .collect();
        let Some(first) = unknown.first() else {
            return Ok(());
        };
        if !lock(&self.drill_worker.queue).is_empty() {
            return Ok(());
        }
        let drilled = self.engine.catalog().list_drills(&first.instance_id)?;
        recorded.extend(drilled.into_iter().map(|d| d.backup_id));
        unknown.retain(|b| !recorded.contains(&b.id));
        let Some(set) = unknown
            .into_iter()
            .max_by_key(|b| (b.finished_at, b.started_at))
        else {
            return Ok(());
        };
        let job = self.start_drill(&set.id)?;
        recorded.insert(set.id.clone());
        tracing::info!(
            instance = %set.instance_id,
            backup = %set.id,
            job = %job,
            "restore drill queued for a backup set not drilled yet"
        );
        Ok(())
    }

    /// Queues the drill of a queued job this node claimed.
    pub(crate) fn start_claimed_drill(self: &Arc<Self>, job: Job) -> ServiceResult<JobId> {
        let Some(backup_id) = job.backup_id.clone() else {
            return Err(
                EngineError::Refused(format!("drill job {} names no backup", job.id)).into(),
            );
        };
        let set = self.drillable(&backup_id)?;
        self.begin_drill(set, job)
    }

    /// The backup set `backup_id`, if a drill may restore it (successful).
    pub(crate) fn drillable(&self, backup_id: &str) -> ServiceResult<BackupSet> {
        let set = self.engine.catalog().get_backup(backup_id)?;
        if set.status != BackupStatus::Success {
            return Err(EngineError::Refused(format!(
                "backup {backup_id} is {}; only successful backups are drilled",
                set.status.as_str()
            ))
            .into());
        }
        if !set.in_repository() {
            return Err(EngineError::Refused(format!(
                "backup {backup_id} is a snapshot not uploaded to the repository yet; it is drilled once uploaded"
            ))
            .into());
        }
        Ok(set)
    }

    /// Records the drill of `set` as pending under `job` and hands it to the
    /// drill worker.
    fn begin_drill(self: &Arc<Self>, set: BackupSet, mut job: Job) -> ServiceResult<JobId> {
        job.backup_id = Some(set.id.clone());
        job.detail = format!("restore drill of backup {}", set.id);
        self.engine.catalog().update_job(&job)?;
        self.engine.catalog().put_drill(&DrillResult {
            backup_id: set.id.clone(),
            instance_id: set.instance_id.clone(),
            status: "Pending".into(),
            detail: String::new(),
            started_at: Utc::now(),
            finished_at: None,
            job_id: Some(job.id),
        })?;
        lock(&self.drill_worker.queue).push_back((set.instance_id, set.id, job.id));
        self.drill_worker
            .started
            .call_once(|| self.spawn_drill_worker());
        self.drill_worker.wakeup.notify_one();
        Ok(job.id)
    }

    /// Queues again the drills a previous process did not finish.
    pub(crate) fn resume_drills(self: &Arc<Self>) {
        let Ok(instances) = self.engine.catalog().list_instances() else {
            return;
        };
        for i in instances.iter().filter(|i| self.owns(&i.id)) {
            for d in self.engine.catalog().list_drills(&i.id).unwrap_or_default() {
                if matches!(d.status.as_str(), "Pending" | "Running") {
                    if let Err(e) = self.start_drill(&d.backup_id) {
                        tracing::warn!(backup = %d.backup_id, "cannot resume the restore drill: {e}");
                    }
                }
            }
        }
    }

    /// The drill worker: takes queued drills one by one until shutdown.
    fn spawn_drill_worker(self: &Arc<Self>) {
        let svc = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("strata-drills".into())
            .spawn(move || {
                // Low priority for this thread and everything it starts
                // (the scratch server inherits it). SAFETY: setpriority on
                // the calling thread only.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 10);
                }
                loop {
                    if svc.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let next = lock(&svc.drill_worker.queue).pop_front();
                    match next {
                        Some((instance, backup, job)) => svc.run_drill(&instance, &backup, job),
                        None => {
                            let guard = lock(&svc.drill_worker.queue);
                            let _ = svc
                                .drill_worker
                                .wakeup
                                .wait_timeout(guard, std::time::Duration::from_secs(1));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the drill worker: {e}");
        }
    }

    fn run_drill(&self, instance_id: &str, backup_id: &str, job_id: JobId) {
        let mut result = match self.engine.catalog().get_drill(backup_id) {
            Ok(Some(r)) => r,
            _ => return, // the backup set was deleted meanwhile
        };
        if self.engine.catalog().get_instance(instance_id).is_err() {
            // Deregistered while the drill waited: nothing to prove it for.
            result.status = "Skipped".into();
            result.detail = "the instance was deregistered before the drill ran".into();
            result.finished_at = Some(Utc::now());
            let _ = self.engine.catalog().put_drill(&result);
            fail_job(&self.engine, job_id, &result.detail);
            return;
        }
        result.status = "Running".into();
        result.started_at = Utc::now();
        let _ = self.engine.catalog().put_drill(&result);
        let outcome = self.drill(instance_id, backup_id, job_id);
        result.finished_at = Some(Utc::now());
        match outcome {
            Ok(summary) => {
                result.status = "Passed".into();
                result.detail = summary;
                finish_job(&self.engine, job_id, None);
                tracing::info!(instance = %instance_id, backup = %backup_id, "restore drill passed");
            }
            Err(e) => {
                result.status = "Failed".into();
                result.detail = e.to_string();
                fail_job(&self.engine, job_id, &e.to_string());
                tracing::warn!(instance = %instance_id, backup = %backup_id, "restore drill FAILED: {e}");
            }
        }
        if self.engine.catalog().get_backup(backup_id).is_ok() {
            let _ = self.engine.catalog().put_drill(&result);
        }
    }

    /// Restores, checks, removes; returns what was checked.
    fn drill(&self, instance_id: &str, backup_id: &str, job_id: JobId) -> ServiceResult<String> {
        let src = RestoreSource {
            backup_id: Some(backup_id.into()),
            restore_time: None,
            exact: None,
        };
        let scratch = self.start_scratch(instance_id, &src, job_id)?;
        let checked = (|| {
            let amcheck = self.engine.client_tool("pg_amcheck", scratch.major)?;
            // amcheck must exist in every database pg_amcheck visits, and be the one this
            // installation's script creates: the backup's own (its functions replaced by the
            // source's superuser with SQL of theirs) would run as this server's superuser.
            let dbs = scratch.names(
                "postgres",
                "SELECT datname FROM pg_catalog.pg_database WHERE datallowconn",
            )?;
            for db in &dbs {
                scratch.disarm(db)?;
                scratch.psql(
                    db,
                    "DROP EXTENSION IF EXISTS amcheck CASCADE; \
                     DROP SCHEMA IF EXISTS strata_amcheck CASCADE; \
                     CREATE SCHEMA strata_amcheck; \
                     CREATE EXTENSION amcheck SCHEMA strata_amcheck",
                )?;
            }
            let conn = scratch.conn();
            let out = conn
                .bare_command(&amcheck)
                .arg(format!("--maintenance-db={}", conn.conninfo("postgres")))
                .args(["--all", "--no-strict-names"])
                .output()
                .map_err(EngineError::io("running pg_amcheck"))?;
            if !out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                let first: Vec<&str> = text.lines().take(5).collect();
                return Err(EngineError::Failed(format!(
                    "pg_amcheck found corruption: {}{}",
                    first.join("; "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
                .into());
            }
            Ok(format!(
                "recovered to consistency; pg_amcheck clean over {} databases",
                dbs.len()
            ))
        })();
        scratch.remove();
        checked
    }
}
