//! The scheduler: the service loop and one round of it ([`Service::tick`]):
//! jobs whose owner died, queued jobs of owned instances, automatic backups
//! due by each policy, restore drills of sets not drilled yet, WAL
//! receivers for instances with log backup on,
//! retention, cross-region copies, garbage collection, usage samples and
//! notifications.
//! Time comes from the service's [`crate::Clock`], so tests walk it through
//! days and weeks.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use strata_catalog::{BackupMode, BackupPolicy, BackupSet, BackupStatus, Instance};
use tokio::sync::watch;

use crate::{lock, policy, Service, ServiceResult};

/// Most jobs one retention pass deletes.
const JOB_PRUNE_BATCH: usize = 5_000;

/// An automatic backup the scheduler starts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AutoBackup {
    /// The instance has no backup and has never had an automatic one.
    first: bool,
    /// The slot recorded as served before the backup starts, so a failing
    /// backup is not retried in a loop (the next window tries again): the
    /// start of the window owed one, else `now`.
    slot: DateTime<Utc>,
}

/// Whether an instance gets an automatic backup at `now`, given its policy
/// and its backup sets: its first one, or one for a window owed
/// ([`policy::due_slot`]); `None` while any of its backups runs (in any
/// process).
pub(crate) fn auto_backup(
    policy: &BackupPolicy,
    backups: &[BackupSet],
    now: DateTime<Utc>,
) -> Option<AutoBackup> {
    if backups.iter().any(|b| b.status == BackupStatus::Running) {
        return None;
    }
    let first = backups.is_empty() && policy.last_auto_slot.is_none();
    let due = policy::due_slot(policy, now);
    (first || due.is_some()).then(|| AutoBackup {
        first,
        slot: due.unwrap_or(now),
    })
}

/// Instances being deregistered or deleted, or whose log backup is being
/// turned off: the scheduler leaves them alone (no new receiver may
/// recreate a dropped slot).
#[derive(Default)]
pub(crate) struct Leaving(Mutex<HashSet<String>>);

impl Leaving {
    /// Marks `instance_id` as leaving.
    pub(crate) fn mark(&self, instance_id: &str) {
        lock(&self.0).insert(instance_id.to_string());
    }

    /// Clears the mark.
    pub(crate) fn unmark(&self, instance_id: &str) {
        lock(&self.0).remove(instance_id);
    }

    /// Whether `instance_id` is marked.
    pub(crate) fn contains(&self, instance_id: &str) -> bool {
        lock(&self.0).contains(instance_id)
    }
}

impl Service {
    /// One round: the fleet round (this node's ownership leases), then for
    /// the instances this node owns automatic backups due, WAL receivers,
    /// retention; garbage collection, a storage usage sample when one is
    /// due.
    pub async fn tick(self: &Arc<Self>) {
        let instances = match self.engine.catalog().list_instances() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("listing instances: {e}");
                return;
            }
        };
        self.fail_orphaned_jobs().await;
        self.fleet_round(
            instances
                .iter()
                .map(|i| String::from(i.id.clone()))
                .collect(),
        )
        .await;
        self.take_queued_jobs().await;
        let now = self.now();
        let retention_due = self
            .housekeeping
            .claim_retention(now, self.settings.retention_interval);
        for instance in &instances {
            if let Err(e) = self.tick_instance(instance, now, retention_due).await {
                tracing::warn!(instance = %instance.id, "scheduler: {e}");
            }
        }
        if retention_due {
            if let Err(e) = self.expire_user_backups(now) {
                tracing::warn!("user backup retention: {e}");
            }
            self.prune_jobs().await;
        }
        self.wal.reap();
        let ids: Vec<String> = instances.iter().map(|i| i.id.to_string()).collect();
        self.publish_receivers(&ids).await;
        self.start_copy_round();
        self.collect_garbage_if_due(now).await;
        if let Err(e) = self.sample_usage_if_due().await {
            tracing::warn!("storage usage sample: {e}");
        }
        self.notify_round(&instances, now);
    }

    /// Fails the jobs whose owner stopped renewing its lease (a process that
    /// died mid-job). A write transaction that may wait for the catalog: off
    /// the runtime. Not within one lease of a catalog outage this process
    /// saw (the catalog handle keeps track, see
    /// `JobCatalog::fail_expired_jobs`): the other processes could not renew
    /// their leases either.
    async fn fail_orphaned_jobs(&self) {
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || engine.fail_expired_jobs()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::warn!("failed {n} job(s) whose owner stopped renewing its lease"),
            Ok(Err(e)) => tracing::warn!("checking for jobs with an expired lease: {e}"),
            Err(e) => tracing::warn!("checking for jobs with an expired lease: {e}"),
        }
    }

    /// Deletes the ended jobs older than `job_keep` that nothing names
    /// (see `JobCatalog::prune_jobs`), at most [`JOB_PRUNE_BATCH`] a pass,
    /// lowest ids first: a catalog with years of jobs is pruned over a few
    /// hours of passes, none of which holds the catalog (or this round)
    /// for long. Ages are wall-clock facts, like the
    /// jobs' end times: the real time, never the service clock. Off the
    /// runtime: a write that may wait for the catalog.
    async fn prune_jobs(&self) {
        let Some(keep) = self.settings.job_keep else {
            return;
        };
        let before = chrono::Utc::now() - keep;
        let catalog = self.engine.catalog().clone();
        match tokio::task::spawn_blocking(move || catalog.prune_jobs(before, JOB_PRUNE_BATCH)).await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!("deleted {n} job(s) that ended before {before}"),
            Ok(Err(e)) => tracing::warn!("deleting old jobs: {e}"),
            Err(e) => tracing::warn!("deleting old jobs: {e}"),
        }
    }

    /// One instance's share of a round.
    async fn tick_instance(
        self: &Arc<Self>,
        instance: &Instance,
        now: DateTime<Utc>,
        retention_due: bool,
    ) -> ServiceResult<()> {
        if !self.owns(&instance.id) {
            // Another node runs it now (its lease lapsed here, or it was
            // given up): the receiver stops, the slot stays and keeps the
            // WAL for the new owner.
            if self.wal.runs(&instance.id) {
                self.wal.stop(&instance.id).await;
            }
            return Ok(());
        }
        if !self.is_ready(&instance.id) || self.leaving.contains(&instance.id) {
            return Ok(());
        }
        let mut p = self.policy(&instance.id)?;
        let backups = self.engine.catalog().list_backups(&instance.id)?;
        if !self.backups.runs(&instance.id) {
            self.start_auto_backup_if_due(instance, &mut p, &backups, now)?;
        }
        if let Err(e) = self.drill_undrilled(&backups) {
            tracing::warn!(instance = %instance.id, "cannot queue a restore drill: {e}");
        }
        if p.log_backup_enabled {
            self.ensure_receiver(&instance.id);
        } else if self.wal.runs(&instance.id) {
            // Log backup went off while this round ran: the slot a racing
            // receiver may have recreated goes too.
            self.stop_archiving(&instance.id).await;
        }
        if retention_due {
            self.apply_retention(&p, now)?;
            if instance.agent_url.is_some() {
                if let Err(e) = self.prune_local_snapshots(instance).await {
                    tracing::warn!(instance = %instance.id, "local snapshot retention: {e}");
                }
                if let Err(e) = self.retry_failed_uploads(instance) {
                    tracing::warn!(instance = %instance.id, "snapshot uploads to retry: {e}");
                }
            }
        }
        Ok(())
    }

    /// Starts an automatic backup when [`auto_backup`] says one is owed
    /// given the instance's `backups`, recording the slot in the policy
    /// first.
    fn start_auto_backup_if_due(
        self: &Arc<Self>,
        instance: &Instance,
        p: &mut BackupPolicy,
        backups: &[BackupSet],
        now: DateTime<Utc>,
    ) -> ServiceResult<()> {
        let Some(why) = auto_backup(p, backups, now) else {
            return Ok(());
        };
        p.last_auto_slot = Some(why.slot);
        self.engine.catalog().put_policy(p)?;
        // The set keeps the retention of the rule its window belongs to.
        let rule = p.rule_for(why.slot);
        match self.start_backup_under(&instance.id, BackupMode::Automated, p.backup_method, rule) {
            Ok(job) => tracing::info!(
                instance = %instance.id,
                job = %job.id,
                "automatic backup started{}",
                if why.first { " (first backup)" } else { "" }
            ),
            Err(e) => tracing::warn!(instance = %instance.id, "automatic backup: {e}"),
        }
        Ok(())
    }

    /// Runs the scheduler until `shutdown` turns true, then stops every WAL
    /// receiver (flushing the partial segment) and records running backups
    /// as failed.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Leases first: drills resumed below are only this node's.
        if let Ok(instances) = self.instances() {
            self.fleet_round(instances.into_iter().map(|i| String::from(i.id)).collect())
                .await;
        }
        let svc = Arc::clone(&self);
        let _ = tokio::task::spawn_blocking(move || {
            svc.remove_stale_scratch();
            svc.start_local_instances();
            svc.resume_drills();
        })
        .await;
        loop {
            self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(self.settings.tick) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        self.shutdown().await;
        // Receivers stopped and backups ended: the other nodes may take the
        // instances at once rather than when the leases lapse.
        self.release_all().await;
    }

    /// Stops the WAL receivers (flushing partial segments) and fails running backups.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.drill_worker.wakeup.notify_all();
        for id in self.wal.instances() {
            self.wal.stop(&id).await;
        }
        for id in self.backups.instances() {
            self.cancel_backup(&id, "the server shut down while the backup ran")
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
    }

    /// Monday and Thursday, 02:00-03:00 UTC, changed on Friday 20 November.
    fn policy() -> BackupPolicy {
        BackupPolicy {
            backup_days: vec!["Monday".into(), "Thursday".into()],
            backup_window: "02:00Z-03:00Z".into(),
            ..policy::default_policy("a", at(20, 0))
        }
    }

    fn set(status: BackupStatus) -> BackupSet {
        let mut s = BackupSet::started("1".into(), "a", BackupMode::Manual, at(21, 0), None);
        s.status = status;
        s
    }

    fn first(slot: DateTime<Utc>) -> Option<AutoBackup> {
        Some(AutoBackup { first: true, slot })
    }

    fn due(slot: DateTime<Utc>) -> Option<AutoBackup> {
        Some(AutoBackup { first: false, slot })
    }

    #[test]
    fn a_new_instance_is_backed_up_at_once_and_only_once() {
        let p = policy();
        // Saturday: no window owed, but nothing was ever backed up.
        assert_eq!(auto_backup(&p, &[], at(21, 9)), first(at(21, 9)));
        // Once recorded (even if that backup failed), "first" is spent.
        let served = BackupPolicy {
            last_auto_slot: Some(at(21, 9)),
            backup_method: strata_catalog::BackupMethod::Physical,
            ..p.clone()
        };
        assert_eq!(auto_backup(&served, &[], at(21, 10)), None);
        // A manual backup, successful or not, counts as a backup.
        assert_eq!(
            auto_backup(&p, &[set(BackupStatus::Success)], at(21, 9)),
            None
        );
        assert_eq!(
            auto_backup(&p, &[set(BackupStatus::Failed)], at(21, 9)),
            None
        );
        // A first backup inside a window records that window's start.
        assert_eq!(
            auto_backup(&p, &[], at(23, 2) + chrono::Duration::minutes(20)),
            first(at(23, 2))
        );
    }

    #[test]
    fn windows_start_backups_unless_one_runs() {
        let p = BackupPolicy {
            last_auto_slot: Some(at(21, 9)),
            backup_method: strata_catalog::BackupMethod::Physical,
            ..policy()
        };
        let done = [set(BackupStatus::Success)];
        // Monday 23 November, before and inside the window.
        assert_eq!(auto_backup(&p, &done, at(23, 1)), None);
        assert_eq!(auto_backup(&p, &done, at(23, 2)), due(at(23, 2)));
        assert_eq!(
            auto_backup(&p, &done, at(23, 2) + chrono::Duration::minutes(5)),
            due(at(23, 2))
        );
        // A backup running anywhere (another process included) defers it.
        let running = [set(BackupStatus::Success), set(BackupStatus::Running)];
        assert_eq!(auto_backup(&p, &running, at(23, 2)), None);
        assert_eq!(
            auto_backup(&policy(), &[set(BackupStatus::Running)], at(21, 9)),
            None
        );
        // Served: nothing until Thursday's window.
        let served = BackupPolicy {
            last_auto_slot: Some(at(23, 2)),
            backup_method: strata_catalog::BackupMethod::Physical,
            ..p
        };
        assert_eq!(auto_backup(&served, &done, at(25, 23)), None);
        assert_eq!(auto_backup(&served, &done, at(26, 2)), due(at(26, 2)));
    }
}
