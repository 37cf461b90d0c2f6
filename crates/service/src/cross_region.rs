//! Cross-region backup (RDS's cross-region backup policy): named storage
//! targets ("regions") each holding a repository of their own, a policy per
//! instance saying which region gets copies and for how long, the copier
//! that brings new backup sets and their WAL there, retention and garbage
//! collection inside each target, and what a restore from the copies needs.
//!
//! A copy is listed only once complete (its manifest, written last, exists
//! in the target); a failed copy is retried later with backoff. Turning the
//! policy off stops copying; copies made stay until their retention ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pg_wal::Lsn;
use strata_catalog::{
    BackupId, BackupStatus, CrossBackup, CrossBackupPolicy, CrossWalSegment, InstanceId, JobKind,
    JobState, WalSegmentRow,
};
use strata_engine::{
    copy_backup_set, copy_histories, copy_instance_record, copy_wal_segment, CopiedBlocks,
    EngineError, RestoreIndex,
};
use strata_repo::{KeySource, Repository, Storage};

use crate::policy::{invalid, Refusal};
use crate::window::{check_restore_time, WindowOf};
use crate::{fail_job, finish_job, lock, PolicyError, Service, ServiceError, ServiceResult};

/// Fewest and most days copies are kept, as RDS allows.
pub const RETENTION_DAYS: std::ops::RangeInclusive<u32> = 7..=1825;

/// Longest wait before a failed copy is tried again.
const RETRY_MAX: Duration = Duration::from_secs(600);

/// One configured target region: where its repository lives and what
/// unlocks it. The repository is opened (created when empty) on first use,
/// so a target that is down does not keep the server from starting.
pub struct RegionTarget {
    /// The region id.
    pub id: String,
    storage: Arc<dyn Storage>,
    key: Option<KeySource>,
    compress_level: i32,
    repo: Mutex<Option<Repository>>,
}

impl RegionTarget {
    /// A target over `storage`, unlocked by `key` when encrypted.
    pub fn new(
        id: &str,
        storage: Arc<dyn Storage>,
        key: Option<KeySource>,
        compress_level: i32,
    ) -> Self {
        RegionTarget {
            id: id.to_string(),
            storage,
            key,
            compress_level,
            repo: Mutex::new(None),
        }
    }

    /// The region's repository, opened or created on first use.
    pub fn repository(&self) -> ServiceResult<Repository> {
        let mut slot = lock(&self.repo);
        if let Some(repo) = slot.as_ref() {
            return Ok(repo.clone());
        }
        let repo = Repository::open_or_init_with_key(self.storage.clone(), self.key.as_ref())
            .map_err(EngineError::from)?
            .with_compress_level(self.compress_level);
        *slot = Some(repo.clone());
        Ok(repo)
    }
}

/// The primary's region id and the targets copies may go to.
pub struct Regions {
    /// This server's own region id.
    pub primary: String,
    targets: BTreeMap<String, Arc<RegionTarget>>,
}

impl Default for Regions {
    fn default() -> Self {
        Regions {
            primary: "local".into(),
            targets: BTreeMap::new(),
        }
    }
}

impl Regions {
    /// The primary's region and its copy targets.
    pub fn new(primary: &str, targets: Vec<RegionTarget>) -> Self {
        Regions {
            primary: primary.to_string(),
            targets: targets
                .into_iter()
                .filter(|t| t.id != primary)
                .map(|t| (t.id.clone(), Arc::new(t)))
                .collect(),
        }
    }

    /// Ids of the regions copies may go to, sorted.
    pub fn available(&self) -> Vec<String> {
        self.targets.keys().cloned().collect()
    }

    /// The target named `id`, or a refusal naming the targets there are.
    pub fn target(&self, id: &str) -> ServiceResult<Arc<RegionTarget>> {
        self.targets.get(id).cloned().ok_or_else(|| {
            invalid(
                Refusal::UnknownRegion,
                format!(
                    "region {id:?} is not a cross-region backup target here (available: {})",
                    self.available().join(", ")
                ),
            )
        })
    }
}

/// A cross-region policy change as the API receives it; `None` keeps the
/// current value.
#[derive(Debug, Clone, Default)]
pub struct CrossPolicyChange {
    /// The target region id.
    pub region: Option<String>,
    /// Whether backup sets are copied.
    pub backup_enabled: Option<bool>,
    /// Whether WAL is copied too.
    pub log_backup_enabled: Option<bool>,
    /// Days copies are kept.
    pub retention_days: Option<i64>,
}

/// Which copies a restore from another region starts from.
#[derive(Debug, Clone)]
pub enum CopyChoice {
    /// One copied backup set (its `CrossBackupId`), recovered to its
    /// consistency point.
    BackupSet(i64),
    /// A point in time inside the copies' recoverable window.
    Time(DateTime<Utc>),
}

/// What a restore from another region's copies starts from.
struct CopyRestorePlan {
    region: String,
    /// The copied set, or `None` for a point in time (the engine chooses).
    backup_id: Option<BackupId>,
    target: strata_engine::RecoveryTarget,
    /// PostgreSQL major version of the copies.
    major: u32,
    index: RestoreIndex,
}

/// The copier's state: whether a round runs and the copies to retry.
#[derive(Default)]
pub(crate) struct Copier {
    /// A copy round runs (at most one at a time).
    running: AtomicBool,
    retries: Mutex<CopyRetries>,
}

/// Copies that failed and when to try them again.
#[derive(Default)]
struct CopyRetries {
    due: HashMap<String, (Instant, Duration)>,
}

impl CopyRetries {
    fn ready(&self, key: &str) -> bool {
        self.due
            .get(key)
            .is_none_or(|(at, _)| Instant::now() >= *at)
    }

    fn failed(&mut self, key: &str) {
        let delay = self
            .due
            .get(key)
            .map(|(_, d)| (*d * 2).min(RETRY_MAX))
            .unwrap_or(Duration::from_secs(5));
        self.due
            .insert(key.to_string(), (Instant::now() + delay, delay));
    }

    fn succeeded(&mut self, key: &str) {
        self.due.remove(key);
    }
}

/// The complete segments holding a backup set's WAL from its start to its
/// stop LSN, or `None` while some of it is not archived complete.
fn set_wal(set: &strata_catalog::BackupSet, wal: &[WalSegmentRow]) -> Option<Vec<WalSegmentRow>> {
    let (start, stop) = (set.start_lsn?, set.stop_lsn?);
    let mut rows: Vec<WalSegmentRow> = wal
        .iter()
        .filter(|w| !w.partial && w.begin_lsn < stop && w.end_lsn > start)
        .cloned()
        .collect();
    rows.sort_by_key(|w| (w.begin_lsn, w.timeline));
    let mut reached = start;
    for w in &rows {
        if w.begin_lsn > reached {
            return None;
        }
        reached = reached.max(w.end_lsn);
    }
    (reached >= stop).then_some(rows)
}

/// Start and end of point-in-time recovery over `backups` and `wal`: from
/// the consistency time of the oldest backup whose WAL runs without a gap
/// to the newest WAL, to when that WAL was stored.
pub fn recovery_window(
    backups: &[strata_catalog::BackupSet],
    wal: &[WalSegmentRow],
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let mut wal: Vec<&WalSegmentRow> = wal.iter().collect();
    wal.sort_by_key(|w| (w.begin_lsn, w.end_lsn));
    let mut run_start = None;
    let mut end = Lsn::INVALID;
    for w in &wal {
        if run_start.is_none() || w.begin_lsn > end {
            run_start = Some(w.begin_lsn);
        }
        end = end.max(w.end_lsn);
    }
    let run_start = run_start?;
    let received = wal
        .iter()
        .filter(|w| w.end_lsn > run_start)
        .map(|w| w.stored_at)
        .max();
    let begin = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Success)
        .filter(|b| b.start_lsn.is_some_and(|l| l >= run_start))
        .filter_map(|b| b.finished_at)
        .min();
    match (begin, received) {
        (Some(b), Some(r)) if r >= b => Some((b, r)),
        _ => None,
    }
}

impl Service {
    /// The regions this service knows.
    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    /// The cross-region policy of an instance, if one was ever set.
    pub fn cross_policy(&self, instance_id: &str) -> ServiceResult<Option<CrossBackupPolicy>> {
        self.engine.catalog().get_instance(instance_id)?;
        Ok(self.engine.catalog().get_cross_policy(instance_id)?)
    }

    /// Validates and stores a cross-region policy change.
    pub fn modify_cross_policy(
        &self,
        instance_id: &str,
        change: CrossPolicyChange,
    ) -> ServiceResult<CrossBackupPolicy> {
        let now = self.now();
        let current = self.cross_policy(instance_id)?;
        let mut p = current.clone().unwrap_or(CrossBackupPolicy {
            instance_id: instance_id.into(),
            region: String::new(),
            backup_enabled: false,
            log_backup_enabled: false,
            retention_days: 7,
            backup_enabled_at: None,
            log_backup_enabled_at: None,
            updated_at: now,
        });
        if let Some(days) = change.retention_days {
            if !(*RETENTION_DAYS.start() as i64..=*RETENTION_DAYS.end() as i64).contains(&days) {
                return Err(invalid(
                    Refusal::CopyRetentionMalformed,
                    format!(
                        "Retention must be {} to {} days, got {days}",
                        RETENTION_DAYS.start(),
                        RETENTION_DAYS.end()
                    ),
                ));
            }
            p.retention_days = days as u32;
        }
        if let Some(region) = &change.region {
            self.regions.target(region)?;
            p.region = region.clone();
        }
        let backup_on = change.backup_enabled.unwrap_or(p.backup_enabled);
        // Log copies go with data copies: turning data copies off ends both.
        let log_on = match change.log_backup_enabled {
            Some(on) => on,
            None if !backup_on => false,
            None => p.log_backup_enabled,
        };
        if log_on && !backup_on {
            return Err(invalid(
                Refusal::ConflictingParameters,
                "cross-region log backup needs cross-region backup on (BackupEnabled)",
            ));
        }
        if backup_on && p.region.is_empty() {
            return Err(invalid(
                Refusal::MissingParameter,
                "CrossBackupRegion is required to turn cross-region backup on",
            ));
        }
        if log_on && !p.log_backup_enabled && !self.policy(instance_id)?.log_backup_enabled {
            return Err(invalid(
                Refusal::ConflictingParameters,
                format!("instance {instance_id} has log backup off: turn it on (ModifyBackupPolicy) before copying its logs to another region"),
            ));
        }
        if backup_on && !p.backup_enabled {
            p.backup_enabled_at = Some(now);
        }
        if log_on && !p.log_backup_enabled {
            p.log_backup_enabled_at = Some(now);
        }
        p.backup_enabled = backup_on;
        p.log_backup_enabled = log_on;
        p.updated_at = now;
        self.engine.catalog().put_cross_policy(&p)?;
        Ok(p)
    }

    /// Committed copies of an instance's backup sets, oldest first.
    pub fn cross_backups(&self, instance_id: &str) -> ServiceResult<Vec<CrossBackup>> {
        self.engine.catalog().get_instance(instance_id)?;
        Ok(self.engine.catalog().list_cross_backups(instance_id)?)
    }

    /// Copied WAL segments of an instance.
    pub fn cross_wal(&self, instance_id: &str) -> ServiceResult<Vec<CrossWalSegment>> {
        self.engine.catalog().get_instance(instance_id)?;
        Ok(self.engine.catalog().list_cross_wal(instance_id)?)
    }

    /// What a restore from `region`'s copies of an instance chooses from.
    pub fn cross_restore_index(
        &self,
        instance_id: &str,
        region: &str,
    ) -> ServiceResult<RestoreIndex> {
        Ok(RestoreIndex {
            backups: self
                .cross_backups(instance_id)?
                .into_iter()
                .filter(|c| c.region == region)
                .map(|c| c.set)
                .collect(),
            wal: self
                .cross_wal(instance_id)?
                .into_iter()
                .filter(|w| w.region == region)
                .map(|w| w.row)
                .collect(),
            restore_points: Vec::new(),
        })
    }

    /// The window a restore from one copied set (and the WAL copied to its
    /// region after it) reaches; `None` without copied WAL.
    pub fn cross_recovery_window(
        &self,
        copy: &CrossBackup,
    ) -> ServiceResult<Option<(DateTime<Utc>, DateTime<Utc>)>> {
        let index = self.cross_restore_index(&copy.set.instance_id, &copy.region)?;
        Ok(recovery_window(std::slice::from_ref(&copy.set), &index.wal))
    }

    /// Whether a restore from `region`'s copies of `source_id` as `choice`
    /// says can start: the copy exists (or the time is inside the copies'
    /// window), the region's repository opens and this host has the
    /// PostgreSQL binaries of the copies' version. Returns that major
    /// version; the refusal says why not.
    pub fn check_restore_from_copies(
        &self,
        source_id: &str,
        region: Option<&str>,
        choice: CopyChoice,
    ) -> ServiceResult<u32> {
        let plan = self.plan_copy_restore(source_id, region, choice)?;
        self.regions.target(&plan.region)?.repository()?;
        self.engine.pg_bin_dir(plan.major)?;
        Ok(plan.major)
    }

    /// Starts restoring a new instance from `region`'s copies of
    /// `source_id`, exactly as a clone; returns its id and port at once.
    pub fn restore_from_copies(
        self: &Arc<Self>,
        source_id: &str,
        region: Option<&str>,
        choice: CopyChoice,
    ) -> ServiceResult<(InstanceId, u16)> {
        let plan = self.plan_copy_restore(source_id, region, choice)?;
        let repo = self.regions.target(&plan.region)?.repository()?;
        let restore_time = match &plan.target {
            strata_engine::RecoveryTarget::Time(t) => Some(*t),
            _ => None,
        };
        self.launch_clone(
            source_id,
            crate::local::CloneRequest {
                backup_id: plan.backup_id,
                target: plan.target,
                restore_time,
                major: plan.major,
                engine: self.engine.with_repository(repo),
                index: Some(plan.index),
                job_kind: JobKind::DdrRestore,
                on_host: None,
                databases: None,
            },
        )
        .map(|(id, port, _)| (id, port))
    }

    /// What a restore from copies starts from, or why it cannot.
    fn plan_copy_restore(
        &self,
        source_id: &str,
        region: Option<&str>,
        choice: CopyChoice,
    ) -> ServiceResult<CopyRestorePlan> {
        let copies = self.cross_backups(source_id)?;
        let (region, backup_id, target) = match choice {
            CopyChoice::BackupSet(id) => {
                let copy = copies.iter().find(|c| c.id == id).ok_or_else(|| {
                    invalid::<PolicyError>(
                        Refusal::CopyNotFound,
                        format!("no cross-region backup {id} of instance {source_id}"),
                    )
                })?;
                if region.is_some_and(|r| r != copy.region) {
                    return Err(invalid(
                        Refusal::CopyNotFound,
                        format!(
                            "cross-region backup {id} is in region {}, not {}",
                            copy.region,
                            region.unwrap_or_default()
                        ),
                    ));
                }
                (
                    copy.region.clone(),
                    Some(copy.set.id.clone()),
                    strata_engine::RecoveryTarget::Immediate,
                )
            }
            CopyChoice::Time(t) => {
                let region = match region {
                    Some(r) => r.to_string(),
                    None => self
                        .engine
                        .catalog()
                        .get_cross_policy(source_id)?
                        .map(|p| p.region)
                        .filter(|r| !r.is_empty())
                        .ok_or_else(|| {
                            invalid::<PolicyError>(
                                Refusal::NoLogBackup,
                                format!("instance {source_id} has no cross-region backups"),
                            )
                        })?,
                };
                let index = self.cross_restore_index(source_id, &region)?;
                check_restore_time(
                    recovery_window(&index.backups, &index.wal),
                    t,
                    WindowOf::Copies {
                        instance: source_id,
                        region: &region,
                    },
                )?;
                (region, None, strata_engine::RecoveryTarget::Time(t))
            }
        };
        let index = self.cross_restore_index(source_id, &region)?;
        let version = match &backup_id {
            Some(id) => index
                .backups
                .iter()
                .find(|b| &b.id == id)
                .and_then(|b| b.pg_version_num),
            None => index.backups.iter().filter_map(|b| b.pg_version_num).max(),
        };
        let major = version.map(|v| v / 10000).ok_or_else(|| {
            EngineError::Refused(format!(
                "the PostgreSQL version of the copies of {source_id} is not known"
            ))
        })?;
        Ok(CopyRestorePlan {
            region,
            backup_id,
            target,
            major,
            index,
        })
    }

    /// Starts a copy round in the background unless one runs.
    pub(crate) fn start_copy_round(self: &Arc<Self>) {
        if self.copier.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let svc = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            svc.copy_round();
            svc.copier.running.store(false, Ordering::SeqCst);
        });
    }

    /// One pass of the copier over every instance with a cross-region
    /// policy: copies what is missing, then applies the copies' retention.
    fn copy_round(&self) {
        let instances = match self.engine.catalog().list_instances() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("copier: listing instances: {e}");
                return;
            }
        };
        for instance in instances {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            if !self.owns(&instance.id) {
                continue; // another node copies it
            }
            let policy = match self.engine.catalog().get_cross_policy(&instance.id) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(instance = %instance.id, "copier: {e}");
                    continue;
                }
            };
            // A target that cannot be reached is tried again with backoff,
            // not every tick.
            let key = format!("{}/{}", policy.region, instance.id);
            if policy.backup_enabled && lock(&self.copier.retries).ready(&key) {
                match self.copy_instance(&policy) {
                    Ok(()) => lock(&self.copier.retries).succeeded(&key),
                    Err(e) => {
                        lock(&self.copier.retries).failed(&key);
                        tracing::warn!(instance = %instance.id, region = %policy.region, "cross-region copy: {e}");
                    }
                }
            }
            let key = format!("retention/{}", instance.id);
            if lock(&self.copier.retries).ready(&key) {
                match self.apply_copy_retention(&policy) {
                    Ok(()) => lock(&self.copier.retries).succeeded(&key),
                    Err(e) => {
                        lock(&self.copier.retries).failed(&key);
                        tracing::warn!(instance = %instance.id, "cross-region retention: {e}");
                    }
                }
            }
        }
    }

    fn copy_instance(&self, policy: &CrossBackupPolicy) -> ServiceResult<()> {
        let id = &policy.instance_id;
        let target = self.regions.target(&policy.region)?;
        let repo = target.repository()?;
        let copies: Vec<CrossBackup> = self
            .engine
            .catalog()
            .list_cross_backups(id)?
            .into_iter()
            .filter(|c| c.region == policy.region)
            .collect();
        let copied: HashSet<&str> = copies.iter().map(|c| c.set.id.as_str()).collect();
        // Sets from before the policy went on are not copied, nor sets
        // already past the copies' retention (retention would delete them).
        let since = policy
            .backup_enabled_at
            .unwrap_or(policy.updated_at)
            .max(self.now() - chrono::Duration::days(policy.retention_days as i64));
        let due: Vec<_> = self
            .engine
            .catalog()
            .list_backups(id)?
            .into_iter()
            .filter(|b| b.status == BackupStatus::Success)
            .filter(|b| b.finished_at.is_some_and(|f| f >= since))
            .filter(|b| !copied.contains(b.id.as_str()))
            .collect();
        if !due.is_empty() {
            // Read in the instance's key domain when its backups are
            // encrypted; the copy is written under the target repository's
            // own keys (docs/REPOSITORY.md, "Instance key domains").
            let source = self.engine.for_instance_blocking(id)?;
            let source = source.repo();
            let registered = match self.engine.catalog().get_instance(id) {
                Ok(instance) => Some(instance),
                Err(strata_catalog::CatalogError::InstanceNotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            copy_instance_record(source, &repo, id, registered.as_ref())?;
            let ids: Vec<BackupId> = copies.iter().map(|c| c.set.id.clone()).collect();
            let known = CopiedBlocks::learn(source, &repo, id, &ids)?;
            let wal = self.engine.catalog().list_wal_segments(id)?;
            for set in due {
                let key = format!("{}/{}/{}", policy.region, id, set.id);
                if !lock(&self.copier.retries).ready(&key) {
                    continue;
                }
                // A copy carries the WAL that makes it consistent, whether
                // or not log copies are on; it waits until that WAL is
                // archived as complete segments.
                let Some(own_wal) = set_wal(&set, &wal) else {
                    tracing::debug!(instance = %id, backup = %set.id, "copy waits for the backup's WAL segments to complete");
                    continue;
                };
                let mut job = self
                    .engine
                    .catalog()
                    .create_job(JobKind::CrossCopy, Some(id))?;
                job.state = JobState::Uploading;
                job.backup_id = Some(set.id.clone());
                job.detail = format!("copy backup {} to region {}", set.id, policy.region);
                self.engine.catalog().update_job(&job)?;
                // Primary garbage collection waits while the copy reads.
                let outcome = self
                    .engine
                    .hold_gc_blocking()
                    .map_err(ServiceError::from)
                    .and_then(|_guard| {
                        self.copy_segments(&policy.region, &repo, &own_wal)?;
                        Ok(copy_backup_set(source, &repo, id, &set.id, &known)?)
                    });
                match outcome {
                    Ok(report) => {
                        let cross_id = self.engine.catalog().insert_cross_backup(
                            &policy.region,
                            &set,
                            report.stats.stored_bytes,
                            Utc::now(),
                        )?;
                        lock(&self.copier.retries).succeeded(&key);
                        self.usage_changed();
                        finish_job(&self.engine, job.id, None);
                        tracing::info!(
                            instance = %id,
                            backup = %set.id,
                            cross_backup = cross_id,
                            region = %policy.region,
                            "backup copied: {} blocks read, {} known from earlier copies, {} bytes stored",
                            report.blocks_read,
                            report.blocks_known,
                            report.stats.stored_bytes
                        );
                    }
                    Err(e) => {
                        lock(&self.copier.retries).failed(&key);
                        fail_job(&self.engine, job.id, &e.to_string());
                        tracing::warn!(instance = %id, backup = %set.id, "copy to region {} failed: {e}", policy.region);
                    }
                }
            }
        }
        if policy.log_backup_enabled {
            self.copy_wal(policy, &repo)?;
        }
        Ok(())
    }

    /// Copies the segments of `rows` the region does not hold yet (with the
    /// timeline histories), recording each copy.
    fn copy_segments(
        &self,
        region: &str,
        repo: &Repository,
        rows: &[WalSegmentRow],
    ) -> ServiceResult<()> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let id = &first.instance_id;
        let have: HashSet<(u32, String)> = self
            .engine
            .catalog()
            .list_cross_wal(id)?
            .into_iter()
            .filter(|w| w.region == region)
            .map(|w| (w.row.timeline.0, w.row.segment))
            .collect();
        let source = self.engine.for_instance_blocking(id)?;
        let source = source.repo();
        copy_histories(source, repo, id)?;
        for row in rows {
            if have.contains(&(row.timeline.0, row.segment.clone())) {
                continue;
            }
            let copy = copy_wal_segment(source, repo, row)?;
            self.engine
                .catalog()
                .insert_cross_wal(region, &copy, Utc::now())?;
        }
        Ok(())
    }

    /// Copies the complete WAL segments from the start of the region's
    /// oldest copied backup on: older WAL restores nothing there.
    fn copy_wal(&self, policy: &CrossBackupPolicy, repo: &Repository) -> ServiceResult<()> {
        let id = &policy.instance_id;
        let Some(anchor) = self
            .engine
            .catalog()
            .list_cross_backups(id)?
            .iter()
            .filter(|c| c.region == policy.region)
            .filter_map(|c| c.set.start_lsn)
            .min()
        else {
            return Ok(());
        };
        let have: HashSet<(u32, String)> = self
            .engine
            .catalog()
            .list_cross_wal(id)?
            .into_iter()
            .filter(|w| w.region == policy.region)
            .map(|w| (w.row.timeline.0, w.row.segment))
            .collect();
        let due: Vec<WalSegmentRow> = self
            .engine
            .catalog()
            .list_wal_segments(id)?
            .into_iter()
            .filter(|w| !w.partial && w.end_lsn > anchor)
            .filter(|w| !have.contains(&(w.timeline.0, w.segment.clone())))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let source = self.engine.for_instance_blocking(id)?;
        let source = source.repo();
        copy_histories(source, repo, id)?;
        for row in due {
            let key = format!("{}/{}/{}", policy.region, id, row.object_key);
            if !lock(&self.copier.retries).ready(&key) {
                continue;
            }
            match copy_wal_segment(source, repo, &row) {
                Ok(copy) => {
                    self.engine
                        .catalog()
                        .insert_cross_wal(&policy.region, &copy, Utc::now())?;
                    lock(&self.copier.retries).succeeded(&key);
                    self.usage_changed();
                }
                Err(e) => {
                    lock(&self.copier.retries).failed(&key);
                    tracing::warn!(instance = %id, segment = %row.segment, "WAL copy to region {} failed: {e}", policy.region);
                }
            }
        }
        Ok(())
    }

    /// Deletes copies older than the policy's retention from their region,
    /// with the copied WAL no remaining copy needs, then collects garbage
    /// in each region that lost something.
    fn apply_copy_retention(&self, policy: &CrossBackupPolicy) -> ServiceResult<()> {
        let id = &policy.instance_id;
        let cutoff = self.now() - chrono::Duration::days(policy.retention_days as i64);
        let copies = self.engine.catalog().list_cross_backups(id)?;
        let wal = self.engine.catalog().list_cross_wal(id)?;
        let regions: HashSet<&str> = copies
            .iter()
            .map(|c| c.region.as_str())
            .chain(wal.iter().map(|w| w.region.as_str()))
            .collect();
        for region in regions {
            let (expired, kept): (Vec<&CrossBackup>, Vec<&CrossBackup>) = copies
                .iter()
                .filter(|c| c.region == region)
                .partition(|c| c.set.finished_at.unwrap_or(c.set.started_at) < cutoff);
            let keep_from = kept.iter().filter_map(|c| c.set.start_lsn).min();
            let stale_wal: Vec<&CrossWalSegment> = wal
                .iter()
                .filter(|w| w.region == region)
                .filter(|w| keep_from.is_none_or(|l| w.row.end_lsn <= l))
                .collect();
            if expired.is_empty() && stale_wal.is_empty() {
                continue;
            }
            let repo = self.regions.target(region)?.repository()?;
            for c in &expired {
                repo.delete_backup(id, &c.set.id)
                    .map_err(EngineError::from)?;
                self.engine.catalog().delete_cross_backup(c.id)?;
            }
            for w in &stale_wal {
                repo.delete_wal(&w.row.object_key)
                    .map_err(EngineError::from)?;
                self.engine.catalog().delete_cross_wal(w.id)?;
            }
            let report = self.engine.collect_garbage_in(&repo)?;
            self.usage_changed();
            tracing::info!(
                instance = %id,
                region = %region,
                "cross-region retention deleted {} copies and {} WAL segments, {} packs",
                expired.len(),
                stale_wal.len(),
                report.packs_deleted
            );
        }
        Ok(())
    }
}
