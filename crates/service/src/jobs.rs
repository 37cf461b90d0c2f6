//! Job bookkeeping: the backup tasks this process runs (one per instance at
//! most), starting and cancelling them, and recording the outcome of jobs
//! the service runs itself (drills, copies, restores) in the catalog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use strata_catalog::{
    BackupId, BackupMethod, BackupMode, BackupStatus, Job, JobId, JobKind, JobState,
};
use strata_engine::{BackupOptions, Engine, NoProgress, PendingBackup};
use tokio::task::JoinHandle;

use crate::{lock, Service, ServiceResult};

/// Records a job the service ran itself as finished, naming the backup set
/// it used when that was chosen only while it ran.
pub(crate) fn finish_job(engine: &Engine, job_id: JobId, backup_id: Option<BackupId>) {
    if let Ok(mut job) = engine.catalog().get_job(job_id) {
        job.state = JobState::Finished;
        job.progress = 100;
        job.finished_at = Some(Utc::now());
        if backup_id.is_some() {
            job.backup_id = backup_id;
        }
        let _ = engine.catalog().update_job(&job);
    }
}

/// Records a job as failed (best effort: the error matters more).
pub(crate) fn fail_job(engine: &Engine, job_id: JobId, reason: &str) {
    if let Ok(mut job) = engine.catalog().get_job(job_id) {
        if !job.state.is_terminal() {
            job.state = JobState::Failed;
            job.error = Some(reason.to_string());
            job.finished_at = Some(Utc::now());
            let _ = engine.catalog().update_job(&job);
        }
    }
}

struct BackupTask {
    job_id: JobId,
    task: JoinHandle<()>,
}

/// The backups this process runs, by instance.
#[derive(Default)]
pub(crate) struct BackupTasks {
    tasks: Mutex<HashMap<String, BackupTask>>,
}

impl BackupTasks {
    /// Whether a backup of `instance_id` runs in this process.
    pub(crate) fn runs(&self, instance_id: &str) -> bool {
        lock(&self.tasks).contains_key(instance_id)
    }

    /// Whether no backup runs in this process.
    pub(crate) fn is_idle(&self) -> bool {
        lock(&self.tasks).is_empty()
    }

    /// The job of the backup running for `instance_id`.
    pub(crate) fn job(&self, instance_id: &str) -> Option<JobId> {
        lock(&self.tasks).get(instance_id).map(|t| t.job_id)
    }

    /// The instances with a running backup.
    pub(crate) fn instances(&self) -> Vec<String> {
        lock(&self.tasks).keys().cloned().collect()
    }

    /// Runs `work` (the backup of `job_id`) as the instance's task. It
    /// starts only once recorded here, so that when it calls
    /// [`BackupTasks::forget`] at its end the entry is there to forget.
    fn spawn(
        &self,
        instance_id: &str,
        job_id: JobId,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (go, recorded) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if recorded.await.is_ok() {
                work.await;
            }
        });
        let earlier =
            lock(&self.tasks).insert(instance_id.to_string(), BackupTask { job_id, task });
        if let Some(earlier) = earlier {
            // The catalog lets one set run per instance, so this is a task
            // whose end is imminent; it is no longer tracked.
            tracing::warn!(instance = instance_id, job = %earlier.job_id, "a second backup task replaced the instance's first");
        }
        let _ = go.send(());
    }

    /// Forgets the task of `job_id` (not a later one of the instance).
    fn forget(&self, instance_id: &str, job_id: JobId) {
        let mut tasks = lock(&self.tasks);
        if tasks.get(instance_id).is_some_and(|t| t.job_id == job_id) {
            tasks.remove(instance_id);
        }
    }

    fn remove(&self, instance_id: &str) -> Option<BackupTask> {
        lock(&self.tasks).remove(instance_id)
    }
}

impl Service {
    /// The options of a backup of `mode` by `method` on this node.
    pub(crate) fn backup_options(&self, mode: BackupMode, method: BackupMethod) -> BackupOptions {
        BackupOptions {
            mode,
            method,
            taken_under: None,
            max_rate_kb: if mode == BackupMode::Automated {
                self.settings.backup_max_rate_kb
            } else {
                self.settings.manual_backup_max_rate_kb
            },
        }
    }

    /// Starts a backup job and returns it at once; the backup runs in the
    /// background. Refused while another backup of the instance runs.
    pub fn start_backup(
        self: &Arc<Self>,
        instance_id: &str,
        mode: BackupMode,
        method: BackupMethod,
    ) -> ServiceResult<Job> {
        self.start_backup_under(instance_id, mode, method, None)
    }

    /// [`Service::start_backup`] of a backup taken under a policy rule
    /// (see [`strata_catalog::BackupPolicy::rule_for`]), stamped on its set.
    pub fn start_backup_under(
        self: &Arc<Self>,
        instance_id: &str,
        mode: BackupMode,
        method: BackupMethod,
        taken_under: Option<strata_catalog::TakenUnder>,
    ) -> ServiceResult<Job> {
        let opts = BackupOptions {
            taken_under,
            ..self.backup_options(mode, method)
        };
        let pending = self.engine.prepare_backup(instance_id, &opts)?;
        Ok(self.spawn_backup(pending, opts))
    }

    /// Starts the manual backup of a queued job this node claimed.
    pub(crate) fn start_claimed_backup(self: &Arc<Self>, job: Job) -> ServiceResult<Job> {
        let method = if job.kind == JobKind::SnapshotBackup {
            BackupMethod::Snapshot
        } else {
            BackupMethod::Physical
        };
        let opts = self.backup_options(BackupMode::Manual, method);
        let pending = self.engine.prepare_claimed_backup(job, &opts)?;
        Ok(self.spawn_backup(pending, opts))
    }

    /// Runs a prepared backup in the background.
    fn spawn_backup(self: &Arc<Self>, pending: PendingBackup, opts: BackupOptions) -> Job {
        let job = pending.job.clone();
        let id = pending.set.instance_id.to_string();
        let svc = Arc::clone(self);
        let task_id = id.clone();
        let job_id = job.id;
        let work = async move {
            let id = task_id;
            match svc.engine.run_backup_job(pending, &opts, &NoProgress).await {
                Ok(set) => {
                    tracing::info!(instance = %id, backup = %set.id, "backup finished");
                    if set.method == BackupMethod::Snapshot {
                        // Durable off the host once uploaded, in the background.
                        if let Err(e) = svc.request_snapshot_upload(&set) {
                            tracing::warn!(instance = %id, "cannot queue the snapshot's upload: {e}");
                        }
                    }
                    if svc.settings.drills && set.in_repository() {
                        if let Err(e) = svc.drill_new_set(&set.id) {
                            tracing::warn!(instance = %id, "cannot queue a restore drill: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!(instance = %id, "backup failed: {e}"),
            }
            svc.backups.forget(&id, job_id);
            strata_engine::return_free_memory();
            svc.housekeeping.request_gc();
            // What is stored changed; the collection may wait for readers.
            svc.usage_changed();
        };
        self.backups.spawn(&id, job.id, work);
        job
    }

    /// Runs the second pass of a checked import in the background, as a
    /// backup of its instance (one at a time, cancelled alike).
    pub(crate) fn spawn_import(self: &Arc<Self>, pending: strata_engine::PendingImport) -> Job {
        let job = pending.job().clone();
        let id = pending.set().instance_id.to_string();
        let svc = Arc::clone(self);
        let task_id = id.clone();
        let job_id = job.id;
        let work = async move {
            let id = task_id;
            match svc.engine.run_import(pending, &NoProgress).await {
                Ok(set) => tracing::info!(instance = %id, backup = %set.id, "import finished"),
                Err(e) => tracing::warn!(instance = %id, "import failed: {e}"),
            }
            svc.backups.forget(&id, job_id);
            strata_engine::return_free_memory();
            svc.housekeeping.request_gc();
            svc.usage_changed();
        };
        self.backups.spawn(&id, job.id, work);
        job
    }

    /// Stops the backup this server runs for an instance, if any, and
    /// records it as failed with `reason`. Waits for the task to end first:
    /// a task busy on another thread runs on to its next await and may still
    /// record progress, which must not outlive the cancellation.
    pub(crate) async fn cancel_backup(&self, instance_id: &str, reason: &str) {
        let Some(task) = self.backups.remove(instance_id) else {
            return;
        };
        task.task.abort();
        if task.task.await.is_ok() {
            // It finished (and recorded its outcome) before the abort landed.
            return;
        }
        fail_job(&self.engine, task.job_id, reason);
        if let Ok(job) = self.engine.catalog().get_job(task.job_id) {
            if let Some(bid) = &job.backup_id {
                if let Ok(mut set) = self.engine.catalog().get_backup(bid) {
                    if set.status == BackupStatus::Running {
                        set.status = BackupStatus::Failed;
                        set.error = Some(reason.to_string());
                        set.finished_at = Some(Utc::now());
                        let _ = self.engine.catalog().update_backup(&set);
                    }
                }
            }
        }
    }

    /// The job of the backup running for an instance in this process.
    pub fn running_backup_job(&self, instance_id: &str) -> Option<JobId> {
        self.backups.job(instance_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_idle(tasks: &BackupTasks) -> bool {
        for _ in 0..400 {
            if !tasks.runs("a") {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    }

    /// A backup that ends at once (refused by the server, say) is forgotten
    /// all the same: an entry left behind would keep the scheduler from
    /// ever starting the instance's next backup.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_ends_at_once_is_forgotten() {
        let tasks = Arc::new(BackupTasks::default());
        for n in 1..=200 {
            let (t, job) = (tasks.clone(), JobId::new(n));
            tasks.spawn("a", job, async move { t.forget("a", job) });
            assert!(until_idle(&tasks).await, "task {n} stayed recorded");
        }
    }

    /// The end of an earlier task does not forget a later one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_earlier_task_does_not_forget_a_later_one() {
        let tasks = Arc::new(BackupTasks::default());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let t = tasks.clone();
        tasks.spawn("a", JobId::new(1), async move {
            let _ = released.await;
            t.forget("a", JobId::new(1));
        });
        let (t, (stop, stopped)) = (tasks.clone(), tokio::sync::oneshot::channel::<()>());
        tasks.spawn("a", JobId::new(2), async move {
            let _ = stopped.await;
            t.forget("a", JobId::new(2));
        });
        release.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(tasks.job("a"), Some(JobId::new(2)));
        stop.send(()).unwrap();
        assert!(until_idle(&tasks).await);
    }
}
