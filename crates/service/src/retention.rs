//! Retention and garbage collection: when the periodic retention pass is
//! due, applying an instance's retention, collecting unreferenced packs once
//! no backup runs, and RDS's rules for deleting backup sets by hand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use strata_catalog::{BackupId, BackupPolicy, BackupSet, BackupStatus, CatalogError, KeepUntil};
use strata_engine::{EngineError, RetentionDecision, RetentionPlan};

use crate::policy::{invalid, PolicyError, Refusal};
use crate::{lock, Lsn, Service, ServiceError, ServiceResult};

/// Whether the periodic retention pass is due at `now`, given when it last
/// ran: the first time, once `interval` has passed, and whenever the clock
/// went back (so a clock set back cannot hold retention off).
pub(crate) fn retention_is_due(
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    interval: chrono::Duration,
) -> bool {
    last.is_none_or(|t| now - t >= interval || now < t)
}

/// The retention pass's and the collector's state.
pub(crate) struct Housekeeping {
    last_retention: Mutex<Option<DateTime<Utc>>>,
    /// A collection is owed (something stored was deleted, or the last one
    /// found the lock taken).
    gc_due: AtomicBool,
    /// The last collection and what it did (for `/metrics`).
    pub(crate) last_gc: Mutex<Option<(DateTime<Utc>, strata_repo::GcReport)>>,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping {
            last_retention: Mutex::new(None),
            // A collection at the first tick cleans up after a crash.
            gc_due: AtomicBool::new(true),
            last_gc: Mutex::new(None),
        }
    }
}

impl Housekeeping {
    /// Whether retention runs in this round; if so, records `now` as its
    /// last run.
    pub(crate) fn claim_retention(&self, now: DateTime<Utc>, interval: chrono::Duration) -> bool {
        let mut last = lock(&self.last_retention);
        let due = retention_is_due(*last, now, interval);
        if due {
            *last = Some(now);
        }
        due
    }

    /// Asks for a collection at the next round.
    pub(crate) fn request_gc(&self) {
        self.gc_due.store(true, Ordering::SeqCst);
    }
}

/// Which backup sets may be deleted by hand: never a running one, never
/// the newest successful one (log backup on or off: without it nothing
/// could be restored; it goes only with its instance); with log backup on,
/// only sets finished before the log retention window, and never the one
/// the oldest recoverable point restores from.
#[derive(Debug, Clone)]
pub struct DeletionRules {
    log_on: bool,
    log_days: u32,
    log_start: DateTime<Utc>,
    anchor: Option<BackupId>,
    newest: Option<BackupId>,
    now: DateTime<Utc>,
}

impl DeletionRules {
    /// The rules for `backups` under `policy` at `now`.
    fn new(policy: &BackupPolicy, backups: &[BackupSet], now: DateTime<Utc>) -> Self {
        let log_start = now - chrono::Duration::days(policy.log_retention_days as i64);
        DeletionRules {
            log_on: policy.log_backup_enabled,
            log_days: policy.log_retention_days,
            log_start,
            anchor: strata_engine::pitr_anchor(backups, log_start),
            newest: strata_engine::newest_success(backups),
            now,
        }
    }

    /// Why `set` may not be deleted now, or `None` when it may.
    pub fn refusal(&self, set: &BackupSet) -> Option<ServiceError> {
        let id = &set.id;
        if set.status == BackupStatus::Running {
            return Some(EngineError::Conflict(format!("backup {id} is still running")).into());
        }
        if set.kept_at(self.now) {
            return Some(
                PolicyError {
                    kind: Refusal::BackupSetKept,
                    message: format!(
                        "backup {id} is kept by hand ({}); release it first",
                        set.keep_until.map(|k| k.to_string()).unwrap_or_default()
                    ),
                }
                .into(),
            );
        }
        if set.status != BackupStatus::Success {
            return None;
        }
        let message = if self.log_on && set.finished_at.unwrap_or(set.started_at) > self.log_start {
            format!(
                "backup {id} is inside the log backup retention period ({} days); with log backup on only older backup sets can be deleted",
                self.log_days
            )
        } else if self.log_on && self.anchor.as_deref() == Some(id.as_str()) {
            format!(
                "backup {id} is the base of the oldest point in time still recoverable; it goes when a newer one leaves the log retention period"
            )
        } else if self.newest.as_deref() == Some(id.as_str()) {
            format!(
                "backup {id} is the newest successful backup set of the instance; it is kept until a newer one succeeds (or the instance is deleted)"
            )
        } else {
            return None;
        };
        Some(
            PolicyError {
                kind: Refusal::BackupSetKept,
                message,
            }
            .into(),
        )
    }
}

/// The sets `ids` names among `backups`, in that order; an unknown id
/// refuses them all, before any other reason does.
fn sets_named<'a>(backups: &'a [BackupSet], ids: &[BackupId]) -> ServiceResult<Vec<&'a BackupSet>> {
    ids.iter()
        .map(|id| {
            backups
                .iter()
                .find(|b| &b.id == id)
                .ok_or_else(|| CatalogError::BackupNotFound(id.to_string()).into())
        })
        .collect()
}

impl Service {
    /// RDS's rules for deleting an instance's backup sets by hand now
    /// (`DeleteBackup`, and `StoreStatus` in `DescribeBackups`).
    pub fn deletion_rules(&self, policy: &BackupPolicy, backups: &[BackupSet]) -> DeletionRules {
        DeletionRules::new(policy, backups, self.now())
    }

    /// Deletes backup sets by [`DeletionRules`]; all or none. The sets of
    /// an instance no longer registered (detached) follow no policy: any
    /// may go but one kept by hand or running, and with the last one its
    /// WAL goes too.
    pub fn delete_backups(&self, instance_id: &str, ids: &[BackupId]) -> ServiceResult<()> {
        match self.engine.catalog().get_instance(instance_id) {
            Ok(_) => {}
            Err(CatalogError::InstanceNotFound(_)) => {
                return self.delete_detached_backups(instance_id, ids)
            }
            Err(e) => return Err(e.into()),
        }
        let p = self.policy(instance_id)?;
        let backups = self.engine.catalog().list_backups(instance_id)?;
        let rules = self.deletion_rules(&p, &backups);
        for set in sets_named(&backups, ids)? {
            if let Some(refusal) = rules.refusal(set) {
                return Err(refusal);
            }
        }
        for id in ids {
            self.engine.delete_backup_set(id)?;
        }
        self.housekeeping.request_gc();
        Ok(())
    }

    /// What retention would do for an instance now, set by set (the dry
    /// run): what keeps each set and until when, and the WAL that would go.
    pub fn retention_dry_run(&self, instance_id: &str) -> ServiceResult<RetentionDecision> {
        let p = self.policy(instance_id)?;
        Ok(self.engine.retention_decision(&p, self.now())?)
    }

    /// Keeps a set by hand, forever or until a time to come, with a note:
    /// neither retention nor a deletion removes it until released.
    pub fn keep_backup(
        &self,
        instance_id: &str,
        backup_id: &str,
        until: KeepUntil,
        note: Option<String>,
    ) -> ServiceResult<BackupSet> {
        self.engine.catalog().get_instance(instance_id)?;
        crate::policy::check_keep(until, note.as_deref(), self.now())?;
        Ok(self
            .engine
            .keep_backup_set(instance_id, backup_id, Some((until, note)))?)
    }

    /// Moves a successful set's expiry to `until` (RDS's
    /// `ModifyBackupSetExpireTime`), as a keep by hand until then: retention,
    /// a deletion and garbage collection leave the set alone until `until`.
    /// An expiry only moves later: `until` must be in the future and no
    /// earlier than the set's current expiry; a set kept forever has none.
    pub fn extend_backup_expiry(
        &self,
        instance_id: &str,
        backup_id: &str,
        until: DateTime<Utc>,
    ) -> ServiceResult<BackupSet> {
        self.engine.catalog().get_instance(instance_id)?;
        let set = self.engine.catalog().get_backup(backup_id)?;
        if set.instance_id != instance_id {
            return Err(CatalogError::BackupNotFound(backup_id.to_string()).into());
        }
        if set.status != BackupStatus::Success {
            return Err(invalid(
                Refusal::BackupSetNotSuccessful,
                format!(
                    "backup {backup_id} is {}: only a successful set has an expiry to move",
                    set.status.as_str()
                ),
            ));
        }
        let now = self.now();
        if until <= now {
            return Err(invalid(
                Refusal::ExpireTimeTooEarly,
                format!(
                    "ExpectExpireTime {} is not in the future",
                    crate::policy::format_seconds(until)
                ),
            ));
        }
        if set.keep_until == Some(KeepUntil::Forever) {
            return Err(invalid(
                Refusal::ExpireTimeTooEarly,
                format!("backup {backup_id} is kept forever, so it has no expiry to move; release it first (StrataReleaseBackup)"),
            ));
        }
        let current = self
            .retention_dry_run(instance_id)?
            .sets
            .into_iter()
            .find(|d| d.backup_id == set.id)
            .and_then(|d| d.expires_at);
        if let Some(current) = current.filter(|c| until < *c) {
            return Err(invalid(
                Refusal::ExpireTimeTooEarly,
                format!(
                    "ExpectExpireTime {} is earlier than the set's current expiry {}; an expiry can only be extended",
                    crate::policy::format_seconds(until),
                    crate::policy::format_seconds(current)
                ),
            ));
        }
        let until_keep = KeepUntil::Until(until);
        crate::policy::check_keep(until_keep, set.keep_note.as_deref(), now)?;
        Ok(self.engine.keep_backup_set(
            instance_id,
            backup_id,
            Some((until_keep, set.keep_note)),
        )?)
    }

    /// Backup sets kept after their instance was deregistered or deleted
    /// (RDS's backups of released instances), oldest first. No retention
    /// applies to them: they stay until deleted.
    /// User backups are listed by `ListUserBackupFiles` instead.
    pub fn detached_backups(&self) -> ServiceResult<Vec<BackupSet>> {
        Ok(self
            .engine
            .catalog()
            .list_detached_backups()?
            .into_iter()
            .filter(|b| !strata_catalog::Instance::owns_user_backup(&b.instance_id))
            .collect())
    }

    fn delete_detached_backups(&self, instance_id: &str, ids: &[BackupId]) -> ServiceResult<()> {
        let backups = self.engine.catalog().list_backups(instance_id)?;
        if backups.is_empty() {
            return Err(CatalogError::InstanceNotFound(instance_id.to_string()).into());
        }
        let now = self.now();
        for set in sets_named(&backups, ids)? {
            let id = &set.id;
            if set.status == BackupStatus::Running {
                return Err(EngineError::Conflict(format!("backup {id} is still running")).into());
            }
            if set.kept_at(now) {
                return Err(invalid(
                    Refusal::BackupSetKept,
                    format!(
                        "backup {id} is kept by hand ({}); release it first",
                        set.keep_until.map(|k| k.to_string()).unwrap_or_default()
                    ),
                ));
            }
        }
        for id in ids {
            self.engine.delete_backup_set(id)?;
        }
        let remaining: Vec<(Lsn, Lsn)> = backups
            .iter()
            .filter(|b| !ids.contains(&b.id))
            .filter_map(|b| b.start_lsn.zip(b.stop_lsn))
            .collect();
        self.delete_wal_beyond(instance_id, &remaining)?;
        self.housekeeping.request_gc();
        Ok(())
    }

    /// Deletes an instance's WAL but the segments the sets spanning
    /// `needed` (start and stop LSNs) need to be consistent.
    pub(crate) fn delete_wal_beyond(
        &self,
        instance_id: &str,
        needed: &[(Lsn, Lsn)],
    ) -> ServiceResult<()> {
        let wal: Vec<_> = self
            .engine
            .catalog()
            .list_wal_segments(instance_id)?
            .into_iter()
            .filter(|w| {
                !needed
                    .iter()
                    .any(|&(start, stop)| w.begin_lsn <= stop && w.end_lsn > start)
            })
            .collect();
        self.engine.delete_wal_segments(&wal)?;
        Ok(())
    }

    /// Releases a set kept by hand: retention decides its fate again.
    pub fn release_backup(&self, instance_id: &str, backup_id: &str) -> ServiceResult<BackupSet> {
        self.engine.catalog().get_instance(instance_id)?;
        Ok(self.engine.keep_backup_set(instance_id, backup_id, None)?)
    }

    /// Applies an instance's retention at `now`; asks for a collection when
    /// it deleted anything.
    pub(crate) fn apply_retention(
        &self,
        policy: &BackupPolicy,
        now: DateTime<Utc>,
    ) -> ServiceResult<()> {
        let plan: RetentionPlan = self.engine.apply_retention(policy, now)?;
        if !plan.is_empty() {
            tracing::info!(
                instance = %policy.instance_id,
                "retention deleted {} backup sets and {} WAL segments",
                plan.backups.len(),
                plan.wal.len()
            );
            self.housekeeping.request_gc();
        }
        Ok(())
    }

    /// Collects garbage when a collection is owed and no backup runs in this
    /// process (a backup in another one holds the lock: then it stays owed).
    pub(crate) async fn collect_garbage_if_due(self: &Arc<Self>, now: DateTime<Utc>) {
        if !self.housekeeping.gc_due.load(Ordering::SeqCst) || !self.backups.is_idle() {
            return;
        }
        self.housekeeping.gc_due.store(false, Ordering::SeqCst);
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || engine.collect_garbage()).await {
            Ok(Ok(Some(report))) => {
                if report.packs_deleted > 0 {
                    tracing::info!("garbage collection deleted {} packs", report.packs_deleted);
                }
                *lock(&self.housekeeping.last_gc) = Some((now, report));
                // Collections follow every change of what is stored.
                self.usage_changed();
            }
            Ok(Ok(None)) => self.housekeeping.request_gc(),
            Ok(Err(e)) => tracing::warn!("garbage collection: {e}"),
            Err(e) => tracing::warn!("garbage collection task: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use strata_catalog::BackupMode;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
    }

    #[test]
    fn retention_runs_first_then_every_interval_and_after_a_clock_step_back() {
        let every = Duration::minutes(5);
        let t = at(10, 12);
        assert!(retention_is_due(None, t, every));
        assert!(!retention_is_due(Some(t), t, every));
        assert!(!retention_is_due(Some(t), t + Duration::minutes(4), every));
        assert!(retention_is_due(Some(t), t + Duration::minutes(5), every));
        assert!(retention_is_due(Some(t), t - Duration::seconds(1), every));

        let h = Housekeeping::default();
        assert!(h.claim_retention(t, every));
        assert!(!h.claim_retention(t + Duration::minutes(1), every));
        assert!(h.claim_retention(t + Duration::minutes(5), every));
        // The claim moved the last run: five minutes from the second one now.
        assert!(!h.claim_retention(t + Duration::minutes(9), every));
    }

    fn set(id: &str, status: BackupStatus, finished: DateTime<Utc>) -> BackupSet {
        let mut s = BackupSet::started(id.into(), "a", BackupMode::Automated, finished, None);
        s.status = status;
        s.finished_at = Some(finished);
        s
    }

    fn kept(rules: &DeletionRules, s: &BackupSet) -> Option<Refusal> {
        match rules.refusal(s)? {
            ServiceError::Policy(p) => Some(p.kind),
            other => panic!("{}: not a policy refusal: {other}", s.id),
        }
    }

    #[test]
    fn deletion_keeps_the_newest_the_running_and_what_log_backup_needs() {
        let now = at(30, 12);
        let sets = [
            set("old", BackupStatus::Success, at(1, 2)),
            set("anchor", BackupStatus::Success, at(10, 2)),
            set("recent", BackupStatus::Success, at(25, 2)),
            set("failed", BackupStatus::Failed, at(28, 2)),
            set("newest", BackupStatus::Success, at(29, 2)),
        ];
        let mut running = set("running", BackupStatus::Running, at(30, 2));
        running.finished_at = None;
        let mut policy = crate::policy::default_policy("a", at(1, 0));
        policy.log_retention_days = 14;

        policy.log_backup_enabled = true;
        let rules = DeletionRules::new(&policy, &sets, now);
        assert_eq!(kept(&rules, &sets[0]), None, "older than the anchor");
        assert_eq!(
            kept(&rules, &sets[1]),
            Some(Refusal::BackupSetKept),
            "PITR anchor"
        );
        assert_eq!(
            kept(&rules, &sets[2]),
            Some(Refusal::BackupSetKept),
            "inside log retention"
        );
        assert_eq!(kept(&rules, &sets[3]), None, "a failed set may always go");
        assert_eq!(
            kept(&rules, &sets[4]),
            Some(Refusal::BackupSetKept),
            "newest"
        );
        assert!(matches!(
            rules.refusal(&running),
            Some(ServiceError::Engine(EngineError::Conflict(_)))
        ));

        policy.log_backup_enabled = false;
        let rules = DeletionRules::new(&policy, &sets, now);
        for s in &sets[..4] {
            assert_eq!(kept(&rules, s), None, "{}: log backup off", s.id);
        }
        // Kept by hand: refused until released or until its time passed.
        let mut held = sets[0].clone();
        held.keep_until = Some(KeepUntil::Forever);
        assert_eq!(kept(&rules, &held), Some(Refusal::BackupSetKept));
        held.keep_until = Some(KeepUntil::Until(now - Duration::hours(1)));
        assert_eq!(kept(&rules, &held), None);
        assert_eq!(
            kept(&rules, &sets[4]),
            Some(Refusal::BackupSetKept),
            "newest"
        );
    }
}
