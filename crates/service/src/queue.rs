//! Work started through the API of any node and run by the node owning the
//! instance.
//!
//! A manual backup (`CreateBackup`) or a restore drill
//! (`StrataStartRestoreDrill`) is recorded as a queued job row; the API
//! answers with its id at once. The node holding the instance's ownership
//! lease claims the row ([`strata_catalog::JobCatalog::claim_queued_job`]:
//! exactly one claimer wins) and runs the job, so an instance's backups,
//! drills and WAL receiver stay on one node whichever node was asked. The
//! node that received the request claims it on the spot when it owns the
//! instance (a single node always does: no delay there); otherwise the
//! owner's next scheduler round does, and a job whose owner died before
//! claiming it waits, queued, for the instance's next owner.
//!
//! Clones and restores that start a local server are not queued: the server
//! they start lives on the node that received the request (its data
//! directory and port are that machine's), so they run there.

use std::sync::Arc;

use chrono::Utc;
use strata_catalog::{BackupMethod, BackupMode, BackupSet, Job, JobId, JobKind};
use strata_engine::EngineError;

use crate::{fail_job, Service, ServiceResult};

impl Service {
    /// Queues a manual backup of `instance_id` for its owner and returns the
    /// job. Refused at once, as before, when the options are invalid, the
    /// instance is unknown, or a backup of it runs or waits already.
    pub fn request_backup(
        self: &Arc<Self>,
        instance_id: &str,
        method: BackupMethod,
    ) -> ServiceResult<Job> {
        if method == BackupMethod::Snapshot {
            self.require_agent(
                instance_id,
                "snapshot backups need `strata agent` on the database host, registered with the instance (AgentUrl, AgentKey)",
            )?;
        }
        self.engine.check_backup(
            instance_id,
            &self.backup_options(BackupMode::Manual, method),
        )?;
        let catalog = self.engine.catalog();
        let is_backup = |k: JobKind| matches!(k, JobKind::Backup | JobKind::SnapshotBackup);
        if let Some(waiting) = catalog
            .queued_jobs()?
            .into_iter()
            .find(|j| is_backup(j.kind) && j.instance_id.as_deref() == Some(instance_id))
        {
            return Err(EngineError::Conflict(format!(
                "a backup of instance {instance_id} is already queued (job {})",
                waiting.id
            ))
            .into());
        }
        let kind = match method {
            BackupMethod::Physical => JobKind::Backup,
            BackupMethod::Snapshot => JobKind::SnapshotBackup,
        };
        let job = catalog.queue_job(kind, instance_id, None)?;
        self.take_if_mine(&job);
        Ok(catalog.get_job(job.id)?)
    }

    /// Queues a restore drill of the successful backup set `backup_id` for
    /// its instance's owner; returns the job id.
    pub fn request_drill(self: &Arc<Self>, backup_id: &str) -> ServiceResult<JobId> {
        let set = self.drillable(backup_id)?;
        let job =
            self.engine
                .catalog()
                .queue_job(JobKind::Drill, &set.instance_id, Some(&set.id))?;
        self.take_if_mine(&job);
        Ok(job.id)
    }

    /// Queues the upload of the snapshot set `set` to the repository for its
    /// instance's owner (the node that reaches its agent for it).
    pub(crate) fn request_snapshot_upload(
        self: &Arc<Self>,
        set: &BackupSet,
    ) -> ServiceResult<JobId> {
        let job = self.engine.catalog().queue_job(
            JobKind::SnapshotUpload,
            &set.instance_id,
            Some(&set.id),
        )?;
        self.take_if_mine(&job);
        Ok(job.id)
    }

    /// Runs the snapshot upload of a queued job this node claimed.
    fn start_claimed_upload(self: &Arc<Self>, job: Job) {
        let svc = Arc::clone(self);
        tokio::spawn(async move {
            let id = job.id;
            match svc
                .engine
                .run_snapshot_upload(job, &strata_engine::NoProgress)
                .await
            {
                Ok((set, report)) => {
                    tracing::info!(
                        instance = %set.instance_id,
                        backup = %set.id,
                        job = %id,
                        read = report.read_bytes,
                        reused = report.reused_bytes,
                        "snapshot uploaded to the repository"
                    );
                    if svc.settings.drills {
                        if let Err(e) = svc.drill_new_set(&set.id) {
                            tracing::warn!(backup = %set.id, "cannot queue a restore drill: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!(job = %id, "snapshot upload failed: {e}"),
            }
            svc.housekeeping.request_gc();
            svc.usage_changed();
        });
    }

    /// Whether queued work for `instance_id` runs on this node: it holds the
    /// instance's lease, or no node validly does and this node is the one
    /// that will (a single node right after registering an instance).
    fn runs_here(&self, instance_id: &str) -> bool {
        if self.owns(instance_id) {
            return true;
        }
        let Ok(owners) = self.instance_owners() else {
            return false;
        };
        if owners.contains_key(instance_id) {
            return false;
        }
        let Ok(instances) = self.engine.catalog().list_instances() else {
            return false;
        };
        self.desired_owners(&instances).is_ok_and(|desired| {
            desired.get(instance_id).map(String::as_str) == Some(self.node_id())
        })
    }

    /// Claims and runs a job just queued here when this node runs its
    /// instance's work; otherwise the owner's round takes it.
    fn take_if_mine(self: &Arc<Self>, job: &Job) {
        if job
            .instance_id
            .as_deref()
            .is_some_and(|i| self.runs_here(i))
        {
            self.claim_and_run(job);
        }
    }

    /// Claims the queued jobs of the instances this node owns and runs them,
    /// oldest first (a scheduler round's first step after the fleet round).
    pub(crate) async fn take_queued_jobs(self: &Arc<Self>) {
        let svc = Arc::clone(self);
        let queued = tokio::task::spawn_blocking(move || svc.engine.catalog().queued_jobs()).await;
        let queued = match queued {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                tracing::warn!("listing queued jobs: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("listing queued jobs: {e}");
                return;
            }
        };
        for job in queued {
            if job.instance_id.as_deref().is_some_and(|i| self.owns(i)) {
                self.claim_and_run(&job);
            }
        }
    }

    /// Claims a queued job for this node and starts it; a job another node
    /// claimed first is left to it. A job that cannot start is failed with
    /// the reason (the requester reads it in `DescribeBackupTasks`).
    fn claim_and_run(self: &Arc<Self>, job: &Job) {
        let claimed =
            match self
                .engine
                .catalog()
                .claim_queued_job(job.id, self.node_id(), Utc::now())
            {
                Ok(Some(claimed)) => claimed,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(job = %job.id, "claiming a queued job: {e}");
                    return;
                }
            };
        let id = claimed.id;
        let instance = claimed.instance_id.clone().unwrap_or_default();
        let started = match claimed.kind {
            JobKind::Backup | JobKind::SnapshotBackup => {
                self.start_claimed_backup(claimed).map(|_| ())
            }
            JobKind::Drill => self.start_claimed_drill(claimed).map(|_| ()),
            JobKind::SnapshotUpload => {
                self.start_claimed_upload(claimed);
                Ok(())
            }
            other => Err(EngineError::Refused(format!(
                "{} jobs are not run through the queue",
                other.as_str()
            ))
            .into()),
        };
        match started {
            Ok(()) => tracing::info!(instance = %instance, job = %id, "started a queued job"),
            Err(e) => {
                tracing::warn!(instance = %instance, job = %id, "queued job refused: {e}");
                fail_job(&self.engine, id, &e.to_string());
            }
        }
    }
}
