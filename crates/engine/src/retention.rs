//! Retention: which backup sets and WAL segments an instance's policy lets
//! go, deleting them, garbage collection with its grace period, and the lock
//! that keeps collections away from running backups and readers (restores,
//! downloads, copies, drills).
//!
//! The rules, in order of precedence:
//! - the newest successful backup set is never deleted (or nothing could be
//!   restored);
//! - with log backup on, the oldest recoverable point (now minus the log
//!   retention) needs the newest set finished before it — its "anchor" — and
//!   every WAL segment after the anchor's start, so both stay;
//! - every kept set keeps the WAL between its start and stop LSN, without
//!   which it cannot reach consistency (with log backup off too);
//! - everything else goes once no rule keeps it: the decision per set, with
//!   the policy's richer rules (sparse rules, high-frequency thinning,
//!   archives, keep by hand, the last N), is [`decide_retention`].

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use strata_catalog::{
    BackupId, BackupPolicy, BackupSet, BackupStatus, Catalog, KeepUntil, RepoHold, WalSegmentRow,
};
use strata_repo::{GcReport, PackId, PendingPacks, RepoError, Repository};

use crate::{Engine, EngineError, EngineResult};

mod decide;

pub use decide::{decide_retention, KeptBy, RetentionDecision, SetDecision};

/// Held while a backup writes packs or a reader reads them (shared), or
/// while garbage is collected (exclusive): a hold row in the catalog, so
/// every process and every node sharing the catalog takes part, whatever
/// machine it runs on. A thread renews the hold while it lives; released
/// on drop, so a reader that ends early (an error, a download whose client
/// went away) releases it too. A holder that dies without releasing loses
/// the hold once it expires (`repo_hold_ttl` after its last renewal).
pub struct GcGuard {
    catalog: Arc<dyn Catalog>,
    hold: RepoHold,
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GcGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcGuard").field("hold", &self.hold).finish()
    }
}

impl GcGuard {
    /// Takes `hold` if no conflicting live hold exists; `None` otherwise.
    fn try_take(catalog: Arc<dyn Catalog>, hold: RepoHold) -> EngineResult<Option<GcGuard>> {
        if !catalog.acquire_repo_hold(&hold, Utc::now())? {
            return Ok(None);
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let interval = (hold.ttl / 4).max(std::time::Duration::from_millis(50));
        let (renewing, h) = (catalog.clone(), hold.clone());
        let renewer = std::thread::Builder::new()
            .name("strata-repo-hold".into())
            .spawn(move || loop {
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => match renewing.renew_repo_hold(&h, Utc::now()) {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(hold = %h.id, "the repository hold expired and was taken over");
                            return;
                        }
                        // Retried at the next interval; only a hold left
                        // unrenewed for its whole lifetime is lost.
                        Err(e) => tracing::warn!(hold = %h.id, "renewing the repository hold: {e}"),
                    },
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })
            .map_err(EngineError::io("starting the repository hold's renewal thread"))?;
        Ok(Some(GcGuard {
            catalog,
            hold,
            stop: Some(stop),
            renewer: Some(renewer),
        }))
    }

    /// Renews the hold now and says whether it is still this process's:
    /// the fence a collection checks before each deletion, so a collector
    /// that stalled past its expiry (and lost the hold to a backup) deletes
    /// nothing more. A catalog that cannot answer counts as lost.
    pub fn still_held(&self) -> bool {
        match self.catalog.renew_repo_hold(&self.hold, Utc::now()) {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(hold = %self.hold.id, "confirming the repository hold: {e}");
                false
            }
        }
    }
}

impl Drop for GcGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        // A hold that cannot be released now expires by itself.
        if let Err(e) = self.catalog.release_repo_hold(&self.hold.id) {
            tracing::warn!(hold = %self.hold.id, "releasing the repository hold: {e}");
        }
    }
}

/// Longest wait for a collection to finish before a shared hold gives up.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
/// How often a waiting shared hold tries again.
const GC_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

fn gc_wait_expired() -> EngineError {
    EngineError::Conflict("garbage collection held the repository lock for 10 minutes".into())
}

/// One attempt at a shared hold while waiting: a catalog that is briefly
/// unreachable is waited out like a running collection.
fn shared_attempt(r: EngineResult<Option<GcGuard>>) -> EngineResult<Option<GcGuard>> {
    match r {
        Err(EngineError::Catalog(e)) if e.is_retryable() => Ok(None),
        r => r,
    }
}

/// What a retention pass decided (and, once applied, did).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RetentionPlan {
    /// Backup set ids to delete (successful and failed ones).
    pub backups: Vec<BackupId>,
    /// WAL objects to delete.
    pub wal: Vec<WalSegmentRow>,
    /// WAL objects that were due but left for a later pass, because a
    /// backup or a reader on some node held the repository.
    #[serde(skip)]
    pub wal_postponed: usize,
}

impl RetentionPlan {
    /// Whether there is nothing to delete.
    pub fn is_empty(&self) -> bool {
        self.backups.is_empty() && self.wal.is_empty()
    }
}

/// Successful sets, oldest first.
fn successes(backups: &[BackupSet]) -> Vec<&BackupSet> {
    let mut s: Vec<&BackupSet> = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Success)
        .collect();
    s.sort_by_key(|b| (b.started_at, b.id.clone()));
    s
}

/// The newest successful set, which neither retention nor a deletion by
/// hand ever removes.
pub fn newest_success(backups: &[BackupSet]) -> Option<BackupId> {
    successes(backups).last().map(|b| b.id.clone())
}

/// The set the oldest recoverable point restores from: the newest successful
/// set finished at or before `log_start`, else the oldest successful one.
pub fn pitr_anchor(backups: &[BackupSet], log_start: DateTime<Utc>) -> Option<BackupId> {
    let successes = successes(backups);
    successes
        .iter()
        .rev()
        .find(|b| b.finished_at.is_some_and(|f| f <= log_start))
        .or_else(|| successes.first())
        .map(|b| b.id.clone())
}

/// Decides what `policy` lets go at `now` ([`decide_retention`], reduced to
/// the deletions). Pure: the scheduler's tests run it against a fake clock.
pub fn plan_retention(
    policy: &BackupPolicy,
    backups: &[BackupSet],
    wal: &[WalSegmentRow],
    now: DateTime<Utc>,
) -> RetentionPlan {
    let decision = decide_retention(policy, backups, wal, now);
    RetentionPlan {
        backups: decision.deleted().map(|d| d.backup_id.clone()).collect(),
        wal: decision.wal,
        wal_postponed: 0,
    }
}

impl Engine {
    /// One attempt at the repository hold: `None` while it is held the
    /// other way (by any process on any node).
    fn try_gc_lock(&self, exclusive: bool) -> EngineResult<Option<GcGuard>> {
        GcGuard::try_take(self.catalog.clone(), self.repo_hold(exclusive))
    }

    fn repo_hold(&self, exclusive: bool) -> RepoHold {
        RepoHold::new(
            &self.repo.config().repository_id,
            exclusive,
            self.catalog.lease_owner().clone(),
            if exclusive {
                "garbage collection"
            } else {
                "backup or reader"
            },
            self.settings.repo_hold_ttl,
        )
    }

    /// A shared hold that keeps garbage collection off the repository while
    /// the caller writes or reads packs; waits (up to 10 minutes) while a
    /// collection runs or the catalog is unreachable. For async callers:
    /// the catalog is asked on the blocking pool and the wait sleeps on the
    /// runtime's timer, never blocking a worker thread.
    pub async fn hold_gc(&self) -> EngineResult<GcGuard> {
        let deadline = std::time::Instant::now() + GC_WAIT;
        loop {
            let (catalog, hold) = (self.catalog.clone(), self.repo_hold(false));
            let attempt = crate::blocking::blocking(move || GcGuard::try_take(catalog, hold)).await;
            if let Some(guard) = shared_attempt(attempt)? {
                return Ok(guard);
            }
            if std::time::Instant::now() > deadline {
                return Err(gc_wait_expired());
            }
            tokio::time::sleep(GC_RETRY).await;
        }
    }

    /// [`Engine::hold_gc`] for synchronous callers (restores, downloads
    /// and copies run on threads of their own, never on an async worker).
    pub fn hold_gc_blocking(&self) -> EngineResult<GcGuard> {
        let deadline = std::time::Instant::now() + GC_WAIT;
        loop {
            if let Some(guard) = shared_attempt(self.try_gc_lock(false))? {
                return Ok(guard);
            }
            if std::time::Instant::now() > deadline {
                return Err(gc_wait_expired());
            }
            std::thread::sleep(GC_RETRY);
        }
    }

    /// Deletes one backup set: manifest first (so the set stops existing in
    /// the repository), then the catalog row. Its blocks are freed by the
    /// next garbage collection. A set kept by hand is refused until released.
    pub fn delete_backup_set(&self, backup_id: &str) -> EngineResult<()> {
        let set = self.catalog.get_backup(backup_id)?;
        if set.status == BackupStatus::Running {
            return Err(EngineError::Conflict(format!(
                "backup {backup_id} is still running"
            )));
        }
        if set.kept_at(Utc::now()) {
            return Err(EngineError::Conflict(format!(
                "backup {backup_id} is kept ({}); release it first",
                set.keep_until.map(|k| k.to_string()).unwrap_or_default()
            )));
        }
        if set.status == BackupStatus::Success {
            match self.repo.delete_backup(&set.instance_id, &set.id) {
                Err(RepoError::Storage(locked)) if locked.is_kept() => {
                    return Err(EngineError::Conflict(format!(
                        "backup {backup_id} stays: {locked}"
                    )))
                }
                other => other?,
            }
        }
        self.catalog.delete_backup(&set.id)?;
        Ok(())
    }

    /// Deletes WAL segments from the repository, then from the catalog.
    /// Returns the keys the store refused to delete yet (Object Lock): they
    /// stay in the catalog, and the next pass tries again.
    pub fn delete_wal_segments(&self, rows: &[WalSegmentRow]) -> EngineResult<Vec<String>> {
        let mut locked = Vec::new();
        for w in rows {
            match self.repo.delete_wal(&w.object_key) {
                Err(RepoError::Storage(e)) if e.is_kept() => {
                    tracing::info!("retention left a WAL object: {e}");
                    locked.push(w.object_key.clone());
                    continue;
                }
                other => other?,
            }
            self.catalog
                .delete_wal_segment(&w.instance_id, w.timeline, &w.segment, w.partial)?;
        }
        Ok(locked)
    }

    /// What retention decides for an instance's sets and WAL at `now`
    /// (applied by [`Engine::apply_retention`], shown by the dry run).
    pub fn retention_decision(
        &self,
        policy: &BackupPolicy,
        now: DateTime<Utc>,
    ) -> EngineResult<RetentionDecision> {
        let backups = self.catalog.list_backups(&policy.instance_id)?;
        let wal = self.catalog.list_wal_segments(&policy.instance_id)?;
        Ok(decide_retention(policy, &backups, &wal, now))
    }

    /// Keeps a successful set of `instance_id` by hand (`Some`), forever or
    /// until a time, with a note; `None` releases it, and retention decides
    /// again. Returns the set as stored.
    pub fn keep_backup_set(
        &self,
        instance_id: &str,
        backup_id: &str,
        keep: Option<(KeepUntil, Option<String>)>,
    ) -> EngineResult<BackupSet> {
        let mut set = self.catalog.get_backup(backup_id)?;
        if set.instance_id != instance_id {
            return Err(strata_catalog::CatalogError::BackupNotFound(backup_id.to_string()).into());
        }
        if keep.is_some() && set.status != BackupStatus::Success {
            return Err(EngineError::Conflict(format!(
                "backup {backup_id} is {}: only a successful set can be kept",
                set.status.as_str()
            )));
        }
        (set.keep_until, set.keep_note) = match keep {
            Some((until, note)) => (Some(until), note),
            None => (None, None),
        };
        self.catalog.update_backup(&set)?;
        Ok(set)
    }

    /// Applies an instance's policy at `now`; returns what was deleted.
    pub fn apply_retention(
        &self,
        policy: &BackupPolicy,
        now: DateTime<Utc>,
    ) -> EngineResult<RetentionPlan> {
        let backups = self.catalog.list_backups(&policy.instance_id)?;
        let wal = self.catalog.list_wal_segments(&policy.instance_id)?;
        let mut plan = plan_retention(policy, &backups, &wal, now);
        let mut deleted = Vec::new();
        for id in plan.backups {
            match self.delete_backup_set(&id) {
                Ok(()) => deleted.push(id),
                // Kept by hand since the sets were read: it stays, and so
                // does the WAL it needs (decided again at the next pass).
                Err(EngineError::Conflict(why)) => {
                    tracing::info!(backup = %id, "retention left a set: {why}");
                    plan.wal.clear();
                }
                Err(e) => return Err(e),
            }
        }
        plan.backups = deleted;
        // A restore stages WAL while it runs and holds the repository
        // shared: expired WAL waits for the next round rather than vanish
        // under it.
        match self.try_gc_lock(true)? {
            Some(_guard) => {
                let locked = self.delete_wal_segments(&plan.wal)?;
                plan.wal.retain(|w| !locked.contains(&w.object_key));
                plan.wal_postponed = locked.len();
            }
            None => {
                plan.wal_postponed = plan.wal.len();
                plan.wal.clear();
            }
        }
        Ok(plan)
    }

    /// Removes packs no manifest references once they stayed so for the
    /// grace period. Returns `None` without doing anything while a backup or
    /// a reader holds the repository (it will be tried again later). Every
    /// encrypted instance's key domain is unlocked first: while one cannot be
    /// (its KMS key disabled or deleted, the KMS unreachable) nothing is
    /// deleted and the error names the instance and key.
    pub fn collect_garbage(&self) -> EngineResult<Option<GcReport>> {
        let repo = self.whole_repo_blocking("garbage collection")?;
        let Some(guard) = self.try_gc_lock(true)? else {
            return Ok(None);
        };
        self.collect(&repo, &mut || guard.still_held()).map(Some)
    }

    /// Garbage collection of `repo` by the grace period alone, without the
    /// hold: for a repository only this engine writes (a cross-region
    /// target). The packs found unreferenced are remembered in the catalog,
    /// by repository id, between runs.
    pub fn collect_garbage_in(&self, repo: &Repository) -> EngineResult<GcReport> {
        self.collect(repo, &mut || true)
    }

    /// One collection of `repo`; `still_held` is asked before each deletion.
    fn collect(
        &self,
        repo: &Repository,
        still_held: &mut dyn FnMut() -> bool,
    ) -> EngineResult<GcReport> {
        let repository_id = &repo.config().repository_id;
        // The catalog keeps the pending list as plain pack id strings.
        let pending: PendingPacks = self
            .catalog
            .gc_pending(repository_id)?
            .into_iter()
            .map(|(pack, since)| (PackId::from(pack), since))
            .collect();
        let grace = Duration::from_std(self.settings.gc_grace).unwrap_or(Duration::MAX);
        // The grace period runs on the catalog's clock, as leases do: a
        // collecting node whose clock runs ahead must not see a pack another
        // node just wrote as old enough to delete.
        let now = self.catalog.now()?;
        let (report, pending) = repo.collect_garbage_fenced(&pending, now, grace, still_held)?;
        let pending = pending
            .into_iter()
            .map(|(pack, since)| (pack.into_string(), since))
            .collect();
        self.catalog.put_gc_pending(repository_id, &pending)?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_wal::{Lsn, TimelineId};
    use strata_catalog::BackupMode;
    use strata_repo::StorageError;

    fn at(days_ago: i64, now: DateTime<Utc>) -> DateTime<Utc> {
        now - Duration::days(days_ago)
    }

    fn set(id: &str, status: BackupStatus, finished: DateTime<Utc>, lsn: (u64, u64)) -> BackupSet {
        BackupSet {
            id: id.into(),
            instance_id: "i".into(),
            status,
            mode: BackupMode::Automated,
            started_at: finished - Duration::minutes(5),
            finished_at: Some(finished),
            start_lsn: Some(Lsn(lsn.0)),
            stop_lsn: Some(Lsn(lsn.1)),
            start_timeline: Some(TimelineId(1)),
            stop_timeline: Some(TimelineId(1)),
            pg_version_num: Some(150000),
            total_bytes: 1,
            new_bytes: 1,
            dedup_bytes: 0,
            stored_bytes: 1,
            file_count: 1,
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

    /// Segment `n` covers LSNs [n*100, (n+1)*100).
    fn seg(n: u64, stored: DateTime<Utc>) -> WalSegmentRow {
        WalSegmentRow {
            instance_id: "i".into(),
            timeline: TimelineId(1),
            segment: format!("{n:024X}"),
            partial: false,
            begin_lsn: Lsn(n * 100),
            end_lsn: Lsn((n + 1) * 100),
            size: 100,
            checksum: String::new(),
            first_commit: None,
            last_commit: None,
            commit_count: 0,
            min_commit_xid: None,
            max_commit_xid: None,
            object_key: format!("wal/{n}"),
            stored_at: stored,
        }
    }

    fn policy(data: u32, log: u32, log_on: bool, now: DateTime<Utc>) -> BackupPolicy {
        BackupPolicy {
            instance_id: "i".into(),
            backup_days: vec!["Monday".into(), "Thursday".into()],
            backup_window: "02:00Z-03:00Z".into(),
            backup_retention_days: data,
            log_backup_enabled: log_on,
            log_retention_days: log,
            updated_at: now,
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
    fn expired_sets_go_but_the_pitr_anchor_and_its_wal_stay() {
        let now = Utc::now();
        // Backups 20, 12, 8, 3 and 1 days old; segment n written n days... each
        // backup at segment 10*k.
        let backups = vec![
            set("a", BackupStatus::Success, at(20, now), (0, 50)),
            set("b", BackupStatus::Success, at(12, now), (100, 150)),
            set("c", BackupStatus::Success, at(8, now), (200, 250)),
            set("f", BackupStatus::Failed, at(9, now), (0, 0)),
            set("d", BackupStatus::Success, at(3, now), (300, 350)),
            set("e", BackupStatus::Success, at(1, now), (400, 450)),
        ];
        let wal: Vec<_> = (0..5).map(|n| seg(n, at(20 - 4 * n as i64, now))).collect();
        // Data 10 days, log 7 days: a and b expired (f, failed, is 9 days
        // old and stays until day 10). The
        // oldest recoverable point (7 days ago) restores from c (8 days old),
        // which stays, and WAL from c's start (segment 2) on stays.
        let plan = plan_retention(&policy(10, 7, true, now), &backups, &wal, now);
        assert_eq!(plan.backups, vec!["a", "b"]);
        let gone: Vec<u64> = plan.wal.iter().map(|w| w.begin_lsn.0 / 100).collect();
        assert_eq!(gone, vec![0, 1]);

        // Data and log retention equal: c is past data retention (8 > 7)
        // but is the anchor of the oldest recoverable point, so it stays.
        let plan = plan_retention(&policy(7, 7, true, now), &backups, &wal, now);
        assert_eq!(plan.backups, vec!["a", "b", "f"]);

        // Log backup off: WAL goes except what kept sets need to become
        // consistent (segments 3 and 4 for d and e; c is expired now).
        let plan = plan_retention(&policy(7, 7, false, now), &backups, &wal, now);
        assert_eq!(plan.backups, vec!["a", "b", "c", "f"]);
        let gone: Vec<u64> = plan.wal.iter().map(|w| w.begin_lsn.0 / 100).collect();
        assert_eq!(gone, vec![0, 1, 2]);
    }

    #[test]
    fn the_newest_backup_is_never_deleted() {
        let now = Utc::now();
        let backups = vec![
            set("old", BackupStatus::Success, at(400, now), (0, 50)),
            set("older-failed", BackupStatus::Failed, at(500, now), (0, 0)),
            set("running", BackupStatus::Running, at(500, now), (0, 0)),
        ];
        let plan = plan_retention(&policy(7, 7, false, now), &backups, &[], now);
        assert_eq!(plan.backups, vec!["older-failed"]);
    }

    #[test]
    fn wal_without_any_backup_expires_by_age() {
        let now = Utc::now();
        let wal = vec![seg(0, at(9, now)), seg(1, at(2, now))];
        let plan = plan_retention(&policy(7, 7, true, now), &[], &wal, now);
        assert_eq!(plan.wal.len(), 1);
        assert_eq!(plan.wal[0].begin_lsn, Lsn(0));
    }

    /// A store whose manifests and WAL objects are all under a lock that
    /// has not ended (or, with `true`, refused for another reason, as a
    /// legal hold is): it refuses to delete them, as S3 Object Lock does.
    #[derive(Debug)]
    struct LockedStore(strata_repo::MemoryStorage, bool);

    impl strata_repo::Storage for LockedStore {
        fn put(&self, key: &str, data: &[u8]) -> strata_repo::storage::StorageResult<()> {
            self.0.put(key, data)
        }
        fn get(&self, key: &str) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.0.get(key)
        }
        fn get_range(
            &self,
            key: &str,
            offset: u64,
            len: u64,
        ) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.0.get_range(key, offset, len)
        }
        fn list(&self, prefix: &str) -> strata_repo::storage::StorageResult<Vec<String>> {
            self.0.list(prefix)
        }
        fn list_sizes(
            &self,
            prefix: &str,
        ) -> strata_repo::storage::StorageResult<Vec<strata_repo::ObjectSize>> {
            self.0.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> strata_repo::storage::StorageResult<()> {
            if key.ends_with(".manifest") || key.starts_with("wal/") {
                return Err(match self.1 {
                    false => StorageError::Locked {
                        key: key.to_string(),
                        until: Some(Utc::now() + Duration::days(3)),
                    },
                    true => StorageError::DeleteRefused {
                        key: key.to_string(),
                        reason: "an Object Lock legal hold is on".into(),
                    },
                });
            }
            self.0.delete(key)
        }
        fn exists(&self, key: &str) -> strata_repo::storage::StorageResult<bool> {
            self.0.exists(key)
        }
        fn describe(&self) -> String {
            "locked".into()
        }
    }

    #[test]
    fn sets_and_wal_the_store_keeps_locked_stay_and_are_reported() {
        for (refused, says) in [
            (false, "kept by Object Lock until"),
            (true, "cannot be deleted: an Object Lock legal hold is on"),
        ] {
            kept_sets_and_wal_stay(refused, says);
        }
    }

    fn kept_sets_and_wal_stay(refused: bool, says: &str) {
        let now = Utc::now();
        let repo = Repository::open_or_init(Arc::new(LockedStore(
            strata_repo::MemoryStorage::new(),
            refused,
        )))
        .unwrap();
        let catalog = strata_catalog::SqliteCatalog::open_in_memory().unwrap();
        let engine = Engine::new(Arc::new(catalog), repo, crate::EngineSettings::default());
        let catalog = engine.catalog().clone();
        catalog
            .insert_backup(&set("old", BackupStatus::Success, at(20, now), (100, 200)))
            .unwrap();
        for n in 1..=2 {
            catalog.upsert_wal_segment(&seg(n, at(20, now))).unwrap();
        }

        // The set stays in the catalog, and the refusal says until when.
        match engine.delete_backup_set("old") {
            Err(EngineError::Conflict(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("a locked set deleted: {other:?}"),
        }
        assert_eq!(catalog.get_backup("old").unwrap().id, "old");

        // WAL objects the store keeps stay listed, for the next pass.
        let rows = catalog.list_wal_segments("i").unwrap();
        let locked = engine.delete_wal_segments(&rows).unwrap();
        assert_eq!(locked, ["wal/1", "wal/2"]);
        assert_eq!(catalog.list_wal_segments("i").unwrap().len(), 2);
    }
}
