//! The catalog interface, one trait per aggregate: each trait owns a set of
//! tables (or, for another backend, their equivalent) and the rules that
//! hold between their rows. [`Catalog`] is all of them together; the engine
//! and the service hold an `Arc<dyn Catalog>`; code that needs one aggregate
//! only can be generic over it (`C: JobCatalog + ?Sized`), which both a
//! `dyn Catalog` and a test fake of just that aggregate satisfy.
//!
//! Every method is one atomic change: a second handle on the same catalog
//! (another process, or another Strata node sharing the database) sees all
//! of it or none of it. Errors are [`CatalogError`]s whatever the backend.
//! The traits are synchronous: callers on an async runtime call them from a
//! blocking pool. Times are kept at least to the microsecond (PostgreSQL's
//! precision; SQLite keeps nanoseconds). `tests/contract.rs` checks every
//! backend against these docs.
//!
//! Leases and expiries (node heartbeats, instance ownership, job leases,
//! queued job claims, repository holds, console sessions, request nonces)
//! are judged by one clock, the catalog's ([`NodeCatalog::now`]). The `now`
//! those methods take is the caller's reading of the time: SQLite, which
//! lives on the caller's host, takes it as the catalog's clock (so tests can
//! walk it); PostgreSQL, shared by the nodes of a fleet, ignores it and
//! reads the server's clock inside the statement that decides, keeping of a
//! `forget_before` only its distance from the caller's `now`. So no node's
//! clock, ahead or behind, ever takes a live lease, keeps a dead one or
//! forgets what another node still needs.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use pg_wal::TimelineId;

use crate::{
    AccessKey, BackupPolicy, BackupSet, CatalogResult, ConsoleSession, CrossBackup,
    CrossBackupPolicy, CrossWalSegment, DatabaseNameRow, DrillResult, Instance, InstanceOwner, Job,
    JobId, JobKind, LeaseOwner, ManagedInstance, Node, ReceiverStatus, RecoveryEventRow,
    RelationNameRow, RepoHold, RestorePointRow, UsageSample, WalSegmentRow,
};

/// Registered instances and the instances Strata itself runs.
///
/// Owns: instances (unique by id), managed instances (unique by instance
/// id). Deleting an instance also forgets its backup policy.
pub trait InstanceCatalog: Send + Sync {
    /// Registers an instance; [`crate::CatalogError::InstanceExists`] when
    /// its id is taken.
    fn add_instance(&self, instance: &Instance) -> CatalogResult<()>;
    /// Replaces everything but the id and registration time;
    /// [`crate::CatalogError::InstanceNotFound`] when unknown.
    fn update_instance(&self, instance: &Instance) -> CatalogResult<()>;
    /// One instance; [`crate::CatalogError::InstanceNotFound`] when unknown.
    fn get_instance(&self, id: &str) -> CatalogResult<Instance>;
    /// Every instance, by id.
    fn list_instances(&self) -> CatalogResult<Vec<Instance>>;
    /// Forgets an instance with its backup policy, its ownership lease and
    /// its published WAL receiver state (one transaction);
    /// [`crate::CatalogError::InstanceNotFound`] when unknown.
    fn delete_instance(&self, id: &str) -> CatalogResult<()>;

    /// Records or replaces a managed instance.
    fn put_managed(&self, m: &ManagedInstance) -> CatalogResult<()>;
    /// The managed instance of that id, if Strata runs one.
    fn get_managed(&self, instance_id: &str) -> CatalogResult<Option<ManagedInstance>>;
    /// Every managed instance, by id.
    fn list_managed(&self) -> CatalogResult<Vec<ManagedInstance>>;
    /// Forgets a managed instance (no error when unknown).
    fn delete_managed(&self, instance_id: &str) -> CatalogResult<()>;
}

/// Backup sets and the restore drills run on them.
///
/// Owns: backup sets (ids unique across all instances, at most one
/// `Running` per instance), drill results (at most one per backup set). A
/// set's instance never changes, and a set
/// failed by a lease takeover ([`JobCatalog::fail_expired_jobs`]) is never
/// revived by its old owner ([`crate::CatalogError::LeaseLost`]).
pub trait BackupCatalog: Send + Sync {
    /// Records a new set; [`crate::CatalogError::BackupExists`] when its id
    /// is taken (by any instance), [`crate::CatalogError::BackupRunning`]
    /// when it is `Running` and another set of its instance is too.
    fn insert_backup(&self, backup: &BackupSet) -> CatalogResult<()>;
    /// Replaces a set's row; [`crate::CatalogError::BackupNotFound`] when
    /// unknown, [`crate::CatalogError::Invalid`] when it names another
    /// instance, [`crate::CatalogError::LeaseLost`] when it would revive a
    /// set failed by a takeover, [`crate::CatalogError::BackupRunning`] when
    /// it would make a second set of its instance `Running`.
    fn update_backup(&self, backup: &BackupSet) -> CatalogResult<()>;
    /// One set; [`crate::CatalogError::BackupNotFound`] when unknown.
    fn get_backup(&self, id: &str) -> CatalogResult<BackupSet>;
    /// Backup sets of an instance, oldest first.
    fn list_backups(&self, instance_id: &str) -> CatalogResult<Vec<BackupSet>>;
    /// Backup sets whose instance is no longer registered (deregistered or
    /// deleted with its backups kept), oldest first.
    fn list_detached_backups(&self) -> CatalogResult<Vec<BackupSet>>;
    /// Forgets a set and its drill result (one transaction);
    /// [`crate::CatalogError::BackupNotFound`] when unknown.
    fn delete_backup(&self, id: &str) -> CatalogResult<()>;

    /// Records or replaces the drill result of a backup set.
    fn put_drill(&self, d: &DrillResult) -> CatalogResult<()>;
    /// The drill result of a backup set, if it was drilled.
    fn get_drill(&self, backup_id: &str) -> CatalogResult<Option<DrillResult>>;
    /// Drill results of an instance's sets.
    fn list_drills(&self, instance_id: &str) -> CatalogResult<Vec<DrillResult>>;
}

/// The index of stored WAL: segments and restore points.
///
/// Owns: WAL segment rows, unique by (instance, timeline, segment,
/// partial), so a segment has at most one complete and one partial row;
/// restore points, unique by (instance, LSN).
pub trait WalCatalog: Send + Sync {
    /// Records a stored segment object, replacing the row of the same key.
    fn upsert_wal_segment(&self, row: &WalSegmentRow) -> CatalogResult<()>;
    /// Forgets the complete (`partial` false) or partial row of a segment
    /// (no error when there is none).
    fn delete_wal_segment(
        &self,
        instance_id: &str,
        timeline: TimelineId,
        segment: &str,
        partial: bool,
    ) -> CatalogResult<()>;
    /// The complete and partial rows of one segment.
    fn find_wal_segment(
        &self,
        instance_id: &str,
        timeline: TimelineId,
        segment: &str,
    ) -> CatalogResult<Vec<WalSegmentRow>>;
    /// WAL segments of an instance by timeline and name.
    fn list_wal_segments(&self, instance_id: &str) -> CatalogResult<Vec<WalSegmentRow>>;
    /// Records a restore point, replacing one at the same LSN.
    fn upsert_restore_point(&self, row: &RestorePointRow) -> CatalogResult<()>;
    /// Restore points of an instance by LSN.
    fn list_restore_points(&self, instance_id: &str) -> CatalogResult<Vec<RestorePointRow>>;
    /// Records a recovery event, replacing one with the same key.
    fn upsert_recovery_event(&self, row: &RecoveryEventRow) -> CatalogResult<()>;
    /// Recovery events of an instance committed in `[since, until]` (either
    /// end open when `None`), by timeline, LSN and place.
    fn list_recovery_events(
        &self,
        instance_id: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> CatalogResult<Vec<RecoveryEventRow>>;
    /// Records names read from an instance's server, replacing the earlier
    /// name of the same relation file or database, in one transaction.
    fn upsert_names(
        &self,
        relations: &[RelationNameRow],
        databases: &[DatabaseNameRow],
    ) -> CatalogResult<()>;
    /// Every relation and database name recorded for an instance.
    fn list_names(
        &self,
        instance_id: &str,
    ) -> CatalogResult<(Vec<RelationNameRow>, Vec<DatabaseNameRow>)>;
}

/// Jobs and the leases that say which process runs them.
///
/// Owns: jobs (ids assigned by the catalog, increasing). Every job belongs
/// to the lease of the handle that created it; only that owner may change
/// an unfinished job, and a job another owner took over stays ended
/// ([`crate::CatalogError::LeaseLost`]).
pub trait JobCatalog: Send + Sync {
    /// A new job owned by this catalog handle's lease ([`JobCatalog::lease_owner`]).
    fn create_job(&self, kind: JobKind, instance_id: Option<&str>) -> CatalogResult<Job>;
    /// Records a job's state, progress and outcome;
    /// [`crate::CatalogError::JobNotFound`] when unknown,
    /// [`crate::CatalogError::LeaseLost`] when another owner ended it.
    fn update_job(&self, job: &Job) -> CatalogResult<()>;
    /// One job; [`crate::CatalogError::JobNotFound`] when unknown.
    fn get_job(&self, id: JobId) -> CatalogResult<Job>;
    /// Jobs of an instance (every job with `None`), by id.
    fn list_jobs(&self, instance_id: Option<&str>) -> CatalogResult<Vec<Job>>;
    /// Jobs that ended (`Finished` or `Failed`) at or after `since`, by id:
    /// what a periodic reader has not seen yet, without the whole history.
    fn jobs_ended_since(&self, since: DateTime<Utc>) -> CatalogResult<Vec<Job>>;
    /// Deletes up to `limit` of the jobs that ended before `ended_before`
    /// (the oldest ids first), except those a backup set or a drill still
    /// names and the newest ended job of each instance and kind (what
    /// [`JobCatalog::newest_ended_job`] answers, on which alerts rest);
    /// returns how many.
    fn prune_jobs(&self, ended_before: DateTime<Utc>, limit: usize) -> CatalogResult<usize>;
    /// The job of `kind` of an instance that ended last (by end time, then
    /// id), if any ended.
    fn newest_ended_job(&self, instance_id: &str, kind: JobKind) -> CatalogResult<Option<Job>>;
    /// The `limit` newest jobs of `kind` (every instance's), newest first.
    fn newest_jobs(&self, kind: JobKind, limit: usize) -> CatalogResult<Vec<Job>>;
    /// The lease owner jobs created through this handle belong to: random
    /// per process start, never a PID.
    fn lease_owner(&self) -> &LeaseOwner;
    /// Sets how long this handle's owner's lease on its jobs lasts past
    /// each renewal ([`crate::DEFAULT_JOB_LEASE`] until set). It is stored
    /// on every job the owner creates, claims or renews, and observers judge
    /// the job by it ([`JobCatalog::fail_expired_jobs`]).
    fn set_job_lease(&self, lease: std::time::Duration);
    /// Renews the lease on every unfinished job of [`JobCatalog::lease_owner`]
    /// (heartbeat = `now` on the catalog's clock, see the module
    /// documentation); returns how many jobs were renewed.
    fn renew_leases(&self, now: DateTime<Utc>) -> CatalogResult<usize>;
    /// A new job for `instance_id` that no process owns yet: `NoStart`,
    /// queued until the node owning the instance claims it
    /// ([`JobCatalog::claim_queued_job`]). `backup_id` names the set it
    /// works on, when it needs one (a drill).
    fn queue_job(
        &self,
        kind: JobKind,
        instance_id: &str,
        backup_id: Option<&str>,
    ) -> CatalogResult<Job>;
    /// Every queued job, oldest first.
    fn queued_jobs(&self) -> CatalogResult<Vec<Job>>;
    /// Claims a queued job for this handle's lease owner, run by `node_id`:
    /// it stops being queued, its heartbeat is `now` (on the catalog's
    /// clock). `None`, changing nothing, when it is no longer queued
    /// (another handle claimed it) or unknown. Of several handles claiming
    /// the same job at once, exactly one gets it; a handle never waits for
    /// another's claim.
    fn claim_queued_job(
        &self,
        id: JobId,
        node_id: &str,
        now: DateTime<Utc>,
    ) -> CatalogResult<Option<Job>>;
    /// Takes over the unfinished jobs of other owners whose lease expired
    /// (last heartbeat longer before `now`, on the catalog's clock, than
    /// the lease the owner stored on the job; `lease` for jobs stored
    /// without one): each is marked `Failed` with the reason, with its
    /// running backup set, so new work can start. Jobs of this handle's own
    /// owner are never taken over, nor queued jobs (nobody owns them yet:
    /// the instance's next owner claims them). After a call of this handle
    /// found the catalog busy or unreachable, nothing is taken over for
    /// `lease`, nor any job until its own lease has passed since: the
    /// owners may have been cut off alike and not yet renewed. The look and
    /// the takeover are one transaction. Returns how many were failed.
    fn fail_expired_jobs(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
    ) -> CatalogResult<usize>;
}

/// Backup policies: an instance's own and its cross-region one.
///
/// Owns: at most one backup policy and one cross-region policy per
/// instance (a put replaces).
pub trait PolicyCatalog: Send + Sync {
    /// The policy of an instance, if one was stored.
    fn get_policy(&self, instance_id: &str) -> CatalogResult<Option<BackupPolicy>>;
    /// Records or replaces an instance's policy.
    fn put_policy(&self, policy: &BackupPolicy) -> CatalogResult<()>;
    /// The cross-region policy of an instance, if one was stored.
    fn get_cross_policy(&self, instance_id: &str) -> CatalogResult<Option<CrossBackupPolicy>>;
    /// Records or replaces an instance's cross-region policy.
    fn put_cross_policy(&self, policy: &CrossBackupPolicy) -> CatalogResult<()>;
}

/// What was copied to other regions' repositories.
///
/// Owns: copied backup sets, unique by (region, instance, backup id), and
/// copied WAL segments, unique by (region, instance, timeline, segment);
/// ids assigned by the catalog.
pub trait CrossRegionCatalog: Send + Sync {
    /// Records a committed copy and returns its new id.
    fn insert_cross_backup(
        &self,
        region: &str,
        set: &BackupSet,
        copied_bytes: u64,
        copied_at: DateTime<Utc>,
    ) -> CatalogResult<i64>;
    /// Copies of an instance's backup sets, oldest first.
    fn list_cross_backups(&self, instance_id: &str) -> CatalogResult<Vec<CrossBackup>>;
    /// Forgets a copied set (no error when unknown).
    fn delete_cross_backup(&self, id: i64) -> CatalogResult<()>;
    /// Records a copied WAL segment and returns its new id.
    fn insert_cross_wal(
        &self,
        region: &str,
        row: &WalSegmentRow,
        copied_at: DateTime<Utc>,
    ) -> CatalogResult<i64>;
    /// Copied WAL segments of an instance by timeline and name.
    fn list_cross_wal(&self, instance_id: &str) -> CatalogResult<Vec<CrossWalSegment>>;
    /// Forgets a copied segment (no error when unknown).
    fn delete_cross_wal(&self, id: i64) -> CatalogResult<()>;
}

/// Storage usage samples, from which billable GB-hours are integrated.
///
/// Owns: samples, unique by (instance, time): a second sample at the same
/// moment replaces the first.
pub trait UsageCatalog: Send + Sync {
    /// Records a sample.
    fn add_usage_sample(&self, sample: &UsageSample) -> CatalogResult<()>;
    /// Samples of an instance taken between `from` and `to` (inclusive,
    /// either open), oldest first.
    fn list_usage_samples(
        &self,
        instance_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> CatalogResult<Vec<UsageSample>>;
    /// The newest sample of an instance.
    fn last_usage_sample(&self, instance_id: &str) -> CatalogResult<Option<UsageSample>>;
}

/// API access keys and the request nonces seen with them.
///
/// Owns: access keys (unique by id) and nonces (unique by key and nonce):
/// recording a nonce and learning whether it was new is one atomic step,
/// so a replayed request is refused even when two servers see it at once.
pub trait AccessCatalog: Send + Sync {
    /// Records a new key.
    fn add_access_key(&self, key: &AccessKey) -> CatalogResult<()>;
    /// One key, with its secret.
    fn get_access_key(&self, id: &str) -> CatalogResult<Option<AccessKey>>;
    /// Every key, by id.
    fn list_access_keys(&self) -> CatalogResult<Vec<AccessKey>>;
    /// Returns false when no such key existed.
    fn delete_access_key(&self, id: &str) -> CatalogResult<bool>;
    /// Records a request nonce of a key; false when it was recorded before.
    /// Nonces older than `forget_before` are dropped on the way (by the
    /// catalog's clock, see the module documentation).
    fn admit_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> CatalogResult<bool>;
    /// The secret stored under `name`; when none is stored yet, stores
    /// `candidate` and returns it. Of several nodes asking at once, exactly
    /// one candidate is stored and all of them get it back.
    fn shared_secret(&self, name: &str, candidate: &str) -> CatalogResult<String>;
    /// Records a new console session (its `created_at` and `last_seen_at`
    /// are the caller's `now`); sessions last seen before `forget_before`
    /// are dropped on the way. Judged by the catalog's clock, see the
    /// module documentation.
    fn put_session(
        &self,
        session: &ConsoleSession,
        forget_before: DateTime<Utc>,
    ) -> CatalogResult<()>;
    /// The session with that id hash, its `last_seen_at` moved to `now` on
    /// the catalog's clock (returned as it was before); `None` when there
    /// is none.
    fn touch_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> CatalogResult<Option<ConsoleSession>>;
    /// Ends a session (no error when there is none).
    fn delete_session(&self, id_hash: &str) -> CatalogResult<()>;
    /// Sets the session's one-time message.
    fn set_session_flash(&self, id_hash: &str, flash: &str) -> CatalogResult<()>;
    /// Takes the session's one-time message: of several requests taking it
    /// at once, exactly one gets it.
    fn take_session_flash(&self, id_hash: &str) -> CatalogResult<Option<String>>;
}

/// Packs a garbage collection keeps for the grace period before deleting,
/// and the holds that keep collections away from backups and readers.
///
/// Owns: per repository, the unreferenced packs and since when each was
/// found so; the list is replaced whole, in one transaction. Repository
/// holds (unique by id): at any time a repository has either any number of
/// live shared holds or one live exclusive hold, never both, whichever
/// node took them; a hold past its expiry is removed by the next acquirer.
pub trait GcCatalog: Send + Sync {
    /// Takes `hold` at `now` (on the catalog's clock; expiring `hold.ttl`
    /// later) unless a live hold
    /// of the same repository conflicts (any hold for an exclusive one, an
    /// exclusive one for a shared one): then false and nothing is taken.
    /// Expired holds of the repository are removed first. The look and the
    /// take are one atomic step across every handle on the catalog.
    fn acquire_repo_hold(&self, hold: &RepoHold, now: DateTime<Utc>) -> CatalogResult<bool>;
    /// Moves the hold's expiry to `now` + `hold.ttl` (on the catalog's
    /// clock); false when the hold
    /// is gone (released, or expired and removed by another acquirer): its
    /// holder lost it and must stop relying on it.
    fn renew_repo_hold(&self, hold: &RepoHold, now: DateTime<Utc>) -> CatalogResult<bool>;
    /// Drops a hold (no error when it is gone already).
    fn release_repo_hold(&self, hold_id: &str) -> CatalogResult<()>;

    /// Packs of the repository `repository_id` that a garbage collection
    /// found unreferenced and kept for the grace period, each with when it
    /// was first found so.
    fn gc_pending(&self, repository_id: &str) -> CatalogResult<BTreeMap<String, DateTime<Utc>>>;
    /// Replaces that list after a collection, in one transaction.
    fn put_gc_pending(
        &self,
        repository_id: &str,
        pending: &BTreeMap<String, DateTime<Utc>>,
    ) -> CatalogResult<()>;
}

/// The part of the catalog that can be rebuilt from the repository.
pub trait IndexCatalog: Send + Sync {
    /// Forgets backup sets, WAL segments and restore points in one
    /// transaction (before a reindex); instances, jobs and everything else
    /// are kept.
    fn clear_index(&self) -> CatalogResult<()>;
}

/// The nodes of a fleet sharing this catalog and which of them owns each
/// instance.
///
/// Owns: nodes (unique by id), and at most one ownership lease per
/// instance. A lease changes hands only by [`NodeCatalog::claim_instance`],
/// a compare-and-set: of two nodes claiming the same free or lapsed lease
/// at once, exactly one gets it.
pub trait NodeCatalog: Send + Sync {
    /// The catalog's clock, by which every lease and expiry is judged (see
    /// the module documentation): a node reads it once per round and judges
    /// heartbeats and lease rows by it, never by its own clock.
    fn now(&self) -> CatalogResult<DateTime<Utc>>;
    /// Records a node's heartbeat: inserts its row or replaces its address,
    /// start, heartbeat time and version. `node.heartbeat_at` is the
    /// caller's `now` (the catalog's clock decides, as for leases), except
    /// [`DateTime::UNIX_EPOCH`], which is kept as given: the mark of a node
    /// that left.
    fn heartbeat(&self, node: &Node) -> CatalogResult<()>;
    /// Every node that ever heartbeated, by id (live or not: the caller
    /// judges by `heartbeat_at`).
    fn list_nodes(&self) -> CatalogResult<Vec<Node>>;
    /// Takes or renews the lease of `instance_id` for `node_id` until
    /// `now + ttl` (on the catalog's clock): succeeds when no node holds it, when its lease lapsed
    /// (`expires_at <= now`; the epoch goes up), or when `node_id` holds it
    /// already (a renewal). False, changing nothing, when another node holds
    /// a valid lease. The look and the write are one transaction.
    fn claim_instance(
        &self,
        instance_id: &str,
        node_id: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> CatalogResult<bool>;
    /// Extends every lease `node_id` holds to `now + ttl` (on the catalog's
    /// clock); returns how many.
    /// Leases of other nodes are untouched.
    fn renew_instances(
        &self,
        node_id: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> CatalogResult<usize>;
    /// Gives up the lease of `instance_id` if `node_id` holds it; false when
    /// it does not (another node took it, or nobody held it).
    fn release_instance(&self, instance_id: &str, node_id: &str) -> CatalogResult<bool>;
    /// Every lease, by instance id.
    fn list_owners(&self) -> CatalogResult<Vec<InstanceOwner>>;
    /// Records an instance's WAL receiver state as its owner sees it,
    /// replacing the instance's previous row (whichever node wrote it).
    fn publish_receiver(&self, status: &ReceiverStatus) -> CatalogResult<()>;
    /// Every published receiver state, by instance id.
    fn list_receivers(&self) -> CatalogResult<Vec<ReceiverStatus>>;
    /// The published receiver state of one instance, if any.
    fn get_receiver(&self, instance_id: &str) -> CatalogResult<Option<ReceiverStatus>>;
}

/// The whole catalog: every aggregate trait. Implemented for any type that
/// implements them all, so a backend implements the aggregates and callers
/// hold `Arc<dyn Catalog>`. Bring [`crate::prelude`] into scope to call the
/// aggregates' methods on it.
pub trait Catalog:
    InstanceCatalog
    + BackupCatalog
    + WalCatalog
    + JobCatalog
    + PolicyCatalog
    + CrossRegionCatalog
    + UsageCatalog
    + AccessCatalog
    + GcCatalog
    + IndexCatalog
    + NodeCatalog
{
}

impl<T> Catalog for T where
    T: ?Sized
        + InstanceCatalog
        + BackupCatalog
        + WalCatalog
        + JobCatalog
        + PolicyCatalog
        + CrossRegionCatalog
        + UsageCatalog
        + AccessCatalog
        + GcCatalog
        + IndexCatalog
        + NodeCatalog
{
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{JobState, SqliteCatalog};

    /// Needs jobs only: any job store will do.
    fn open_jobs<C: JobCatalog + ?Sized>(jobs: &C) -> usize {
        jobs.list_jobs(None)
            .unwrap()
            .iter()
            .filter(|j| !j.state.is_terminal())
            .count()
    }

    #[test]
    fn one_aggregate_is_reachable_through_the_whole_catalog() {
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let mut job = catalog.create_job(JobKind::Backup, None).unwrap();
        catalog.create_job(JobKind::Restore, None).unwrap();
        job.state = JobState::Finished;
        catalog.update_job(&job).unwrap();
        assert_eq!(open_jobs(&*catalog), 1);
    }
}
