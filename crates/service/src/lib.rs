//! Strata's service core, what `strata serve` runs besides its HTTP front:
//! backup policies per instance, the scheduler that starts automatic backups
//! inside each policy's window, the job workers, one WAL receiver per
//! instance with log backup on (restarted with backoff), retention with
//! garbage collection, storage usage samples against each instance's free
//! quota, and the figures `/metrics` exports.
//!
//! Time comes from a [`Clock`], so tests can walk the scheduler through
//! days and weeks; [`Service::tick`] does one round of everything.
#![warn(missing_docs)]

mod clock;
mod cross_region;
mod drills;
pub mod fleet;
mod local;
mod metrics;
mod pg_client;
pub mod policy;
mod tables;
mod usage;
mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use strata_catalog::{
    BackupMode, BackupPolicy, BackupStatus, CatalogError, Instance, Job, JobState,
};
use strata_engine::{
    BackupOptions, Engine, EngineError, NoProgress, Progress, RetentionPlan, WalReceiveOptions,
};
use strata_repo::GcReport;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use clock::{Clock, ManualClock, SystemClock};
pub use cross_region::{
    recovery_window, CopyChoice, CrossPolicyChange, RegionTarget, Regions, RETENTION_DAYS,
};
pub use local::{RestoreSource, Scratch};
pub use policy::PolicyError;
pub use tables::{parse_table_meta, DbSpec, TableSpec};
pub use usage::{billable_gb_hours, FreeQuota, UsageReport, UsageSettings, DEFAULT_FREE_QUOTA};

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A job or a look-up below failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The request breaks a policy rule.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl From<CatalogError> for ServiceError {
    fn from(e: CatalogError) -> Self {
        ServiceError::Engine(EngineError::Catalog(e))
    }
}

/// What the service's calls return.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// Knobs of the service loop.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// How often the scheduler looks at every instance.
    pub tick: Duration,
    /// How often retention runs (by the service clock).
    pub retention_interval: chrono::Duration,
    /// Longest wait before a failed WAL receiver is started again.
    pub receiver_backoff_max: Duration,
    /// Read limit for automatic backups (kB/s), `None` for no limit.
    pub backup_max_rate_kb: Option<u32>,
    /// Read limit for manual backups (API, console), `None` for no limit.
    pub manual_backup_max_rate_kb: Option<u32>,
    /// Where instances Strata creates (clones, scratch servers) live.
    pub instances_dir: std::path::PathBuf,
    /// Ports those instances may use.
    pub local_ports: (u16, u16),
    /// `listen_addresses` of clones.
    pub local_listen: String,
    /// Drill every successful backup (restore, recover, pg_amcheck).
    pub drills: bool,
    /// Storage usage sampling and free quotas.
    pub usage: UsageSettings,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            tick: Duration::from_secs(1),
            retention_interval: chrono::Duration::minutes(5),
            // The receiver it restarts backs off as long as the engine's own retries.
            receiver_backoff_max: strata_engine::EngineSettings::default().wal_retry_max,
            backup_max_rate_kb: None,
            manual_backup_max_rate_kb: None,
            // Relative to the working directory; `strata serve` puts it under its data directory.
            instances_dir: std::path::PathBuf::from("instances"),
            local_ports: (15432, 15531),
            local_listen: "127.0.0.1".into(),
            drills: true,
            usage: UsageSettings::default(),
        }
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
    anchor: Option<String>,
    newest: Option<String>,
}

impl DeletionRules {
    /// Why `set` may not be deleted now, or `None` when it may.
    pub fn refusal(&self, set: &strata_catalog::BackupSet) -> Option<ServiceError> {
        let id = &set.id;
        if set.status == BackupStatus::Running {
            return Some(EngineError::Conflict(format!("backup {id} is still running")).into());
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
                code: "IncorrectBackupSetState",
                message,
            }
            .into(),
        )
    }
}

/// A policy change as the API receives it; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct PolicyChange {
    /// Weekdays, comma-separated (`Monday,Thursday`).
    pub backup_days: Option<String>,
    /// The window, `HH:mmZ-HH:mmZ`.
    pub backup_window: Option<String>,
    /// Days data backups are kept.
    pub backup_retention_days: Option<String>,
    /// Whether WAL is archived.
    pub log_backup_enabled: Option<bool>,
    /// Days WAL is kept.
    pub log_retention_days: Option<String>,
}

/// Live state of one instance's WAL receiver.
#[derive(Debug, Clone, Default)]
pub struct WalReceiverState {
    /// Whether a receiver task runs.
    pub running: bool,
    /// LSN received and stored so far, and the server's end of WAL.
    pub received: u64,
    /// The server's end of WAL at the last status message.
    pub server_end: u64,
    /// When the server last sent anything.
    pub last_message: Option<DateTime<Utc>>,
    /// The last error, kept after recovery for the record.
    pub last_error: Option<String>,
    /// Reconnections since the service started.
    pub restarts: u64,
    /// Why the receiver is failing (its last error, e.g. a full
    /// repository), until it stores WAL again; `None` while it works.
    pub failing: Option<String>,
    /// Failures in a row behind `failing`.
    pub failures: u32,
    /// When the current run of failures began.
    pub failing_since: Option<DateTime<Utc>>,
}

impl WalReceiverState {
    /// Streaming and not failing: what `strata_wal_receiver_up` reports.
    pub fn is_up(&self) -> bool {
        self.running && self.failing.is_none()
    }
}

/// Records a failure of an instance's receiver and logs it: the first one
/// (and a change of cause) at WARN, a failure that persists at ERROR.
fn note_receiver_failure(
    states: &Mutex<HashMap<String, WalReceiverState>>,
    instance_id: &str,
    error: &str,
    attempt: u32,
    retry_in: Duration,
) {
    let changed = {
        let mut states = lock(states);
        let s = states.entry(instance_id.to_string()).or_default();
        let changed = s.failing.as_deref() != Some(error);
        if s.failing.is_none() {
            s.failing_since = Some(Utc::now());
        }
        s.failing = Some(error.to_string());
        s.failures = attempt.max(s.failures.saturating_add(1));
        changed
    };
    let secs = retry_in.as_secs();
    if attempt <= 1 || changed {
        tracing::warn!(instance = %instance_id, "WAL receiver failing: {error}; retrying in {secs}s");
    } else {
        tracing::error!(
            instance = %instance_id,
            "WAL receiver still failing after {attempt} attempts: {error}; retrying in {secs}s"
        );
    }
}

struct ReceiverTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct BackupTask {
    job_id: i64,
    task: JoinHandle<()>,
}

/// Records a receiver's position for `/metrics`.
struct WalProgress {
    instance_id: String,
    states: Arc<Mutex<HashMap<String, WalReceiverState>>>,
}

impl Progress for WalProgress {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}

    fn message(&self, text: &str) {
        tracing::info!(instance = %self.instance_id, "{text}");
    }

    fn wal_position(&self, received: u64, server_end: u64) {
        let mut states = lock(&self.states);
        let s = states.entry(self.instance_id.clone()).or_default();
        s.received = received;
        s.server_end = server_end.max(received);
        s.last_message = Some(Utc::now());
        s.last_error = None;
    }

    fn wal_failing(&self, error: &str, attempt: u32, retry_in: Duration) {
        note_receiver_failure(&self.states, &self.instance_id, error, attempt, retry_in);
    }

    fn wal_recovered(&self) {
        let was = {
            let mut states = lock(&self.states);
            let s = states.entry(self.instance_id.clone()).or_default();
            s.failing_since = None;
            (s.failing.take(), std::mem::take(&mut s.failures))
        };
        if let (Some(error), failures) = was {
            tracing::warn!(
                instance = %self.instance_id,
                "WAL receiver streaming again after {failures} failed attempts (last: {error})"
            );
        }
    }
}

/// Records a job the service ran itself as finished, naming the backup set
/// it used when that was chosen only while it ran.
pub(crate) fn finish_job(engine: &Engine, job_id: i64, backup_id: Option<String>) {
    if let Ok(mut job) = engine.catalog.get_job(job_id) {
        job.state = JobState::Finished;
        job.progress = 100;
        job.finished_at = Some(Utc::now());
        if backup_id.is_some() {
            job.backup_id = backup_id;
        }
        let _ = engine.catalog.update_job(&job);
    }
}

/// Records a job as failed (best effort: the error matters more).
pub(crate) fn fail_job(engine: &Engine, job_id: i64, reason: &str) {
    if let Ok(mut job) = engine.catalog.get_job(job_id) {
        if !job.state.is_terminal() {
            job.state = JobState::Failed;
            job.error = Some(reason.to_string());
            job.finished_at = Some(Utc::now());
            let _ = engine.catalog.update_job(&job);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The service: policies, the scheduler and everything it runs on its own.
pub struct Service {
    /// The engine the jobs run on (reached from outside through the
    /// queries below).
    engine: Engine,
    clock: Arc<dyn Clock>,
    settings: ServiceSettings,
    receivers: Mutex<HashMap<String, ReceiverTask>>,
    wal_states: Arc<Mutex<HashMap<String, WalReceiverState>>>,
    backups: Mutex<HashMap<String, BackupTask>>,
    last_retention: Mutex<Option<DateTime<Utc>>>,
    gc_due: AtomicBool,
    last_gc: Mutex<Option<(DateTime<Utc>, GcReport)>>,
    /// A usage sample is owed at the next tick (what is stored changed).
    usage_due: AtomicBool,
    last_usage_sample: Mutex<Option<DateTime<Utc>>>,
    usage_cache: Mutex<strata_repo::UsageCache>,
    /// The same, per target region measured for cross-region figures.
    cross_usage_caches: Mutex<HashMap<String, strata_repo::UsageCache>>,
    started: Instant,
    /// Drills waiting: (instance, backup set, job).
    drill_queue: Mutex<std::collections::VecDeque<(String, String, i64)>>,
    drill_wakeup: std::sync::Condvar,
    drill_worker: std::sync::Once,
    stopping: AtomicBool,
    /// Instances being deregistered or deleted: the scheduler leaves them
    /// alone (no new receiver may recreate a dropped slot).
    leaving: Mutex<std::collections::HashSet<String>>,
    /// Cross-region targets, the copier's state and its failed copies.
    regions: cross_region::Regions,
    copying: AtomicBool,
    copy_retries: Mutex<cross_region::CopyRetries>,
}

impl Service {
    /// A service over `engine`, timed by `clock`.
    pub fn new(engine: Engine, clock: Arc<dyn Clock>, settings: ServiceSettings) -> Arc<Self> {
        Self::with_regions(engine, clock, settings, Regions::default())
    }

    /// A service that also copies backups to the cross-region `regions`.
    pub fn with_regions(
        engine: Engine,
        clock: Arc<dyn Clock>,
        settings: ServiceSettings,
        regions: Regions,
    ) -> Arc<Self> {
        Arc::new(Service {
            engine,
            clock,
            settings,
            receivers: Mutex::new(HashMap::new()),
            wal_states: Arc::new(Mutex::new(HashMap::new())),
            backups: Mutex::new(HashMap::new()),
            last_retention: Mutex::new(None),
            gc_due: AtomicBool::new(true),
            last_gc: Mutex::new(None),
            usage_due: AtomicBool::new(true),
            last_usage_sample: Mutex::new(None),
            usage_cache: Mutex::new(strata_repo::UsageCache::default()),
            cross_usage_caches: Mutex::new(HashMap::new()),
            started: Instant::now(),
            drill_queue: Mutex::new(std::collections::VecDeque::new()),
            drill_wakeup: std::sync::Condvar::new(),
            drill_worker: std::sync::Once::new(),
            stopping: AtomicBool::new(false),
            leaving: Mutex::new(std::collections::HashSet::new()),
            regions,
            copying: AtomicBool::new(false),
            copy_retries: Mutex::new(cross_region::CopyRetries::default()),
        })
    }

    /// The engine underneath, for work a caller streams itself (downloads)
    /// and for tests; everything else goes through the service's methods.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The catalog, for what lives there alone: AccessKeys and nonces
    /// (authentication), console sessions, and read-only listings.
    pub fn catalog(&self) -> &dyn strata_catalog::Catalog {
        self.engine.catalog.as_ref()
    }

    /// A registered instance.
    pub fn instance(&self, id: &str) -> strata_catalog::CatalogResult<Instance> {
        self.engine.catalog.get_instance(id)
    }

    /// A backup set.
    pub fn backup_set(&self, id: &str) -> strata_catalog::CatalogResult<strata_catalog::BackupSet> {
        self.engine.catalog.get_backup(id)
    }

    /// The backup sets of an instance, oldest first.
    pub fn backup_sets(
        &self,
        instance_id: &str,
    ) -> strata_catalog::CatalogResult<Vec<strata_catalog::BackupSet>> {
        self.engine.catalog.list_backups(instance_id)
    }

    /// A job.
    pub fn job(&self, id: i64) -> strata_catalog::CatalogResult<strata_catalog::Job> {
        self.engine.catalog.get_job(id)
    }

    /// The archived WAL of an instance.
    pub fn wal_segments(
        &self,
        instance_id: &str,
    ) -> strata_catalog::CatalogResult<Vec<strata_catalog::WalSegmentRow>> {
        self.engine.catalog.list_wal_segments(instance_id)
    }

    /// Strata's record of an instance it created (a clone), if it is one.
    pub fn managed_instance(
        &self,
        id: &str,
    ) -> strata_catalog::CatalogResult<Option<strata_catalog::ManagedInstance>> {
        self.engine.catalog.get_managed(id)
    }

    /// The repository's configuration and whether it is encrypted.
    pub fn repository(&self) -> &strata_repo::Repository {
        &self.engine.repo
    }

    /// The service clock's time.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The policy of an instance; an instance without one gets the default.
    pub fn policy(&self, instance_id: &str) -> ServiceResult<BackupPolicy> {
        self.engine.catalog.get_instance(instance_id)?;
        if let Some(p) = self.engine.catalog.get_policy(instance_id)? {
            return Ok(p);
        }
        let p = policy::default_policy(instance_id, self.now());
        self.engine.catalog.put_policy(&p)?;
        Ok(p)
    }

    /// Validates and stores a policy change. Turning log backup off stops
    /// the WAL receiver, drops its replication slot and deletes every log
    /// backup no data backup needs, ending point-in-time recovery.
    pub async fn modify_policy(
        &self,
        instance_id: &str,
        change: PolicyChange,
    ) -> ServiceResult<BackupPolicy> {
        let mut p = self.policy(instance_id)?;
        if let Some(days) = &change.backup_days {
            p.backup_days = policy::parse_days(days)?;
        }
        if let Some(window) = &change.backup_window {
            policy::parse_window(window)?;
            p.backup_window = window.trim().to_string();
        }
        if let Some(days) = &change.backup_retention_days {
            p.backup_retention_days = policy::check_data_retention(policy::parse_days_count(
                days,
                "InvalidBackupRetentionPeriod.Malformed",
                "BackupRetentionPeriod",
            )?)?;
        }
        if let Some(days) = &change.log_retention_days {
            p.log_retention_days = policy::parse_days_count(
                days,
                "InvalidLogBackupRetentionPeriod.Malformed",
                "LogBackupRetentionPeriod",
            )?;
        }
        policy::check_log_retention(p.log_retention_days, p.backup_retention_days)?;
        let turning_off = p.log_backup_enabled && change.log_backup_enabled == Some(false);
        if let Some(on) = change.log_backup_enabled {
            p.log_backup_enabled = on;
        }
        p.updated_at = self.now();
        self.engine.catalog.put_policy(&p)?;
        if turning_off {
            // The policy is stored first and the instance marked, so the
            // scheduler starts no new receiver once this one has stopped.
            lock(&self.leaving).insert(instance_id.to_string());
            self.stop_archiving(instance_id).await;
            lock(&self.leaving).remove(instance_id);
            let plan = self.engine.apply_retention(&p, self.now())?;
            tracing::info!(
                instance = %instance_id,
                "log backup turned off: {} WAL segments deleted",
                plan.wal.len()
            );
            self.gc_due.store(true, Ordering::SeqCst);
        }
        Ok(p)
    }

    /// Checks the server can be backed up, then registers it with the
    /// default policy. Its first backup and WAL receiver start at the next
    /// tick.
    pub async fn register_instance(&self, mut instance: Instance) -> ServiceResult<Instance> {
        if self.engine.catalog.get_instance(&instance.id).is_ok() {
            return Err(CatalogError::InstanceExists(instance.id.clone()).into());
        }
        let facts = self.engine.probe(&instance).await?;
        instance.system_identifier = Some(facts.system_id);
        instance.pg_version_num = Some(facts.pg_version_num);
        instance.wal_segment_size = Some(facts.wal_segment_size);
        self.engine.add_instance(&instance)?;
        self.policy(&instance.id)?;
        Ok(instance)
    }

    /// Stops archiving an instance and forgets it. Its backup sets stay in
    /// the repository (and in the catalog) until deleted.
    pub async fn deregister_instance(&self, instance_id: &str) -> ServiceResult<()> {
        self.engine.catalog.get_instance(instance_id)?;
        lock(&self.leaving).insert(instance_id.to_string());
        // A backup this server runs for the instance is cancelled (recorded
        // as failed); one another process runs cannot be, so it is waited for.
        self.cancel_backup(
            instance_id,
            "the instance was deregistered while the backup ran",
        )
        .await;
        if let Some(b) = self
            .engine
            .catalog
            .list_backups(instance_id)?
            .into_iter()
            .find(|b| b.status == BackupStatus::Running)
        {
            lock(&self.leaving).remove(instance_id);
            return Err(EngineError::Conflict(format!(
                "backup {} of instance {instance_id} is running in another process; wait for it to finish",
                b.id
            ))
            .into());
        }
        let outcome = async {
            self.stop_archiving(instance_id).await;
            self.engine.catalog.delete_instance(instance_id)?;
            lock(&self.wal_states).remove(instance_id);
            Ok(())
        }
        .await;
        lock(&self.leaving).remove(instance_id);
        outcome
    }

    /// Stops the backup this server runs for an instance, if any, and
    /// records it as failed with `reason`. Waits for the task to end first:
    /// a task busy on another thread runs on to its next await and may still
    /// record progress, which must not outlive the cancellation.
    async fn cancel_backup(&self, instance_id: &str, reason: &str) {
        let Some(task) = lock(&self.backups).remove(instance_id) else {
            return;
        };
        task.task.abort();
        if task.task.await.is_ok() {
            // It finished (and recorded its outcome) before the abort landed.
            return;
        }
        fail_job(&self.engine, task.job_id, reason);
        if let Ok(job) = self.engine.catalog.get_job(task.job_id) {
            if let Some(bid) = &job.backup_id {
                if let Ok(mut set) = self.engine.catalog.get_backup(bid) {
                    if set.status == BackupStatus::Running {
                        set.status = BackupStatus::Failed;
                        set.error = Some(reason.to_string());
                        set.finished_at = Some(Utc::now());
                        let _ = self.engine.catalog.update_backup(&set);
                    }
                }
            }
        }
    }

    /// Starts a backup job and returns it at once; the backup runs in the
    /// background. Refused while another backup of the instance runs.
    pub fn start_backup(
        self: &Arc<Self>,
        instance_id: &str,
        mode: BackupMode,
    ) -> ServiceResult<Job> {
        let opts = BackupOptions {
            mode,
            max_rate_kb: if mode == BackupMode::Automated {
                self.settings.backup_max_rate_kb
            } else {
                self.settings.manual_backup_max_rate_kb
            },
        };
        let pending = self.engine.prepare_backup(instance_id, &opts)?;
        let job = pending.job.clone();
        let svc = Arc::clone(self);
        let id = instance_id.to_string();
        let task = tokio::spawn(async move {
            match svc.engine.run_backup_job(pending, &opts, &NoProgress).await {
                Ok(set) => {
                    tracing::info!(instance = %id, backup = %set.id, "backup finished");
                    if svc.settings.drills {
                        if let Err(e) = svc.start_drill(&set.id) {
                            tracing::warn!(instance = %id, "cannot queue a restore drill: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!(instance = %id, "backup failed: {e}"),
            }
            lock(&svc.backups).remove(&id);
            svc.gc_due.store(true, Ordering::SeqCst);
            // What is stored changed; the collection may wait for readers.
            svc.usage_changed();
        });
        lock(&self.backups).insert(
            instance_id.to_string(),
            BackupTask {
                job_id: job.id,
                task,
            },
        );
        Ok(job)
    }

    /// RDS's rules for deleting an instance's backup sets by hand now
    /// (`DeleteBackup`, and `StoreStatus` in `DescribeBackups`).
    pub fn deletion_rules(
        &self,
        policy: &BackupPolicy,
        backups: &[strata_catalog::BackupSet],
    ) -> DeletionRules {
        let log_start = self.now() - chrono::Duration::days(policy.log_retention_days as i64);
        DeletionRules {
            log_on: policy.log_backup_enabled,
            log_days: policy.log_retention_days,
            log_start,
            anchor: strata_engine::pitr_anchor(backups, log_start),
            newest: strata_engine::newest_success(backups),
        }
    }

    /// Deletes backup sets by [`DeletionRules`]; all or none.
    pub fn delete_backups(&self, instance_id: &str, ids: &[String]) -> ServiceResult<()> {
        let p = self.policy(instance_id)?;
        let backups = self.engine.catalog.list_backups(instance_id)?;
        let rules = self.deletion_rules(&p, &backups);
        for id in ids {
            let Some(set) = backups.iter().find(|b| &b.id == id) else {
                return Err(CatalogError::BackupNotFound(id.clone()).into());
            };
            if let Some(refusal) = rules.refusal(set) {
                return Err(refusal);
            }
        }
        for id in ids {
            self.engine.delete_backup_set(id)?;
        }
        self.gc_due.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// One round: automatic backups due, WAL receivers, retention, garbage
    /// collection, a storage usage sample when one is due.
    pub async fn tick(self: &Arc<Self>) {
        // A write transaction that may wait for the catalog: off the runtime.
        let engine = self.engine.clone();
        match tokio::task::spawn_blocking(move || engine.fail_expired_jobs()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::warn!("failed {n} job(s) whose owner stopped renewing its lease"),
            Ok(Err(e)) => tracing::warn!("checking for jobs with an expired lease: {e}"),
            Err(e) => tracing::warn!("checking for jobs with an expired lease: {e}"),
        }
        let instances = match self.engine.catalog.list_instances() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("listing instances: {e}");
                return;
            }
        };
        let now = self.now();
        let retention_due = {
            let mut last = lock(&self.last_retention);
            let due = last.is_none_or(|t| now - t >= self.settings.retention_interval || now < t);
            if due {
                *last = Some(now);
            }
            due
        };
        for instance in &instances {
            if let Err(e) = self.tick_instance(instance, now, retention_due).await {
                tracing::warn!(instance = %instance.id, "scheduler: {e}");
            }
        }
        self.reap_receivers();
        self.start_copy_round();
        if self.gc_due.load(Ordering::SeqCst) && lock(&self.backups).is_empty() {
            self.gc_due.store(false, Ordering::SeqCst);
            let engine = self.engine.clone();
            match tokio::task::spawn_blocking(move || engine.collect_garbage()).await {
                Ok(Ok(Some(report))) => {
                    if report.packs_deleted > 0 {
                        tracing::info!("garbage collection deleted {} packs", report.packs_deleted);
                    }
                    *lock(&self.last_gc) = Some((now, report));
                    // Collections follow every change of what is stored.
                    self.usage_changed();
                }
                // A backup in another process holds the lock: try again later.
                Ok(Ok(None)) => self.gc_due.store(true, Ordering::SeqCst),
                Ok(Err(e)) => tracing::warn!("garbage collection: {e}"),
                Err(e) => tracing::warn!("garbage collection task: {e}"),
            }
        }
        if let Err(e) = self.sample_usage_if_due().await {
            tracing::warn!("storage usage sample: {e}");
        }
    }

    async fn tick_instance(
        self: &Arc<Self>,
        instance: &Instance,
        now: DateTime<Utc>,
        retention_due: bool,
    ) -> ServiceResult<()> {
        if !self.is_ready(&instance.id) || lock(&self.leaving).contains(&instance.id) {
            return Ok(());
        }
        let mut p = self.policy(&instance.id)?;
        let running_here = lock(&self.backups).contains_key(&instance.id);
        if !running_here {
            let backups = self.engine.catalog.list_backups(&instance.id)?;
            let running_elsewhere = backups.iter().any(|b| b.status == BackupStatus::Running);
            let first = backups.is_empty() && p.last_auto_slot.is_none();
            let due = policy::due_slot(&p, now);
            if !running_elsewhere && (first || due.is_some()) {
                // Recorded before starting, so a failing backup is not
                // retried in a loop; the next window tries again.
                p.last_auto_slot = Some(due.unwrap_or(now));
                self.engine.catalog.put_policy(&p)?;
                match self.start_backup(&instance.id, BackupMode::Automated) {
                    Ok(job) => tracing::info!(
                        instance = %instance.id,
                        job = job.id,
                        "automatic backup started{}",
                        if first { " (first backup)" } else { "" }
                    ),
                    Err(e) => tracing::warn!(instance = %instance.id, "automatic backup: {e}"),
                }
            }
        }
        if p.log_backup_enabled {
            self.ensure_receiver(&instance.id);
        } else if lock(&self.receivers).contains_key(&instance.id) {
            // Log backup went off while this round ran: the slot a racing
            // receiver may have recreated goes too.
            self.stop_archiving(&instance.id).await;
        }
        if retention_due {
            let plan: RetentionPlan = self.engine.apply_retention(&p, now)?;
            if !plan.is_empty() {
                tracing::info!(
                    instance = %instance.id,
                    "retention deleted {} backup sets and {} WAL segments",
                    plan.backups.len(),
                    plan.wal.len()
                );
                self.gc_due.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn ensure_receiver(&self, instance_id: &str) {
        let mut receivers = lock(&self.receivers);
        if receivers.contains_key(instance_id) || lock(&self.leaving).contains(instance_id) {
            return;
        }
        let (stop, stop_rx) = watch::channel(false);
        let engine = self.engine.clone();
        let states = Arc::clone(&self.wal_states);
        let id = instance_id.to_string();
        let backoff_max = self.settings.receiver_backoff_max;
        let task = tokio::spawn(async move {
            let progress = WalProgress {
                instance_id: id.clone(),
                states: Arc::clone(&states),
            };
            let mut delay = Duration::from_secs(2).min(backoff_max);
            loop {
                lock(&states).entry(id.clone()).or_default().running = true;
                let outcome = engine
                    .receive_wal(
                        &id,
                        stop_rx.clone(),
                        WalReceiveOptions::default(),
                        &progress,
                    )
                    .await;
                {
                    let mut st = lock(&states);
                    let s = st.entry(id.clone()).or_default();
                    s.running = false;
                    if let Err(e) = &outcome {
                        s.last_error = Some(e.to_string());
                        s.restarts += 1;
                    }
                }
                if *stop_rx.borrow() {
                    return;
                }
                if let Err(e) = outcome {
                    let attempt = lock(&states).get(&id).map_or(0, |s| s.failures) + 1;
                    note_receiver_failure(&states, &id, &e.to_string(), attempt, delay);
                }
                let mut stop_wait = stop_rx.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop_wait.changed() => return,
                }
                delay = (delay * 2).min(backoff_max);
            }
        });
        receivers.insert(instance_id.to_string(), ReceiverTask { stop, task });
    }

    /// Forgets receivers whose task ended on its own (instance gone).
    fn reap_receivers(&self) {
        lock(&self.receivers).retain(|_, r| !r.task.is_finished());
    }

    /// Stops the WAL receiver and drops its replication slot, so the server
    /// keeps no WAL for Strata. A slot that cannot be dropped is logged: the
    /// caller's change (policy off, instance gone) stands either way.
    async fn stop_archiving(&self, instance_id: &str) {
        self.stop_receiver(instance_id).await;
        if let Err(e) = self.engine.drop_wal_slot(instance_id).await {
            tracing::warn!(instance = %instance_id, "could not drop the replication slot: {e}");
        }
    }

    async fn stop_receiver(&self, instance_id: &str) {
        let task = lock(&self.receivers).remove(instance_id);
        if let Some(r) = task {
            let _ = r.stop.send(true);
            if tokio::time::timeout(Duration::from_secs(30), r.task)
                .await
                .is_err()
            {
                tracing::warn!(instance = %instance_id, "WAL receiver did not stop within 30 s");
            }
        }
    }

    /// Runs the scheduler until `shutdown` turns true, then stops every WAL
    /// receiver (flushing the partial segment) and records running backups
    /// as failed.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
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
    }

    /// Stops the WAL receivers (flushing partial segments) and fails running backups.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.drill_wakeup.notify_all();
        let ids: Vec<String> = lock(&self.receivers).keys().cloned().collect();
        for id in ids {
            self.stop_receiver(&id).await;
        }
        let running: Vec<String> = lock(&self.backups).keys().cloned().collect();
        for id in running {
            self.cancel_backup(&id, "the server shut down while the backup ran")
                .await;
        }
    }

    /// WAL receiver state of an instance (default when none ran).
    pub fn wal_state(&self, instance_id: &str) -> WalReceiverState {
        lock(&self.wal_states)
            .get(instance_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The job of the backup running for an instance in this process.
    pub fn running_backup_job(&self, instance_id: &str) -> Option<i64> {
        lock(&self.backups).get(instance_id).map(|t| t.job_id)
    }

    /// How long the service has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Service {
    /// The window point-in-time recovery can reach: from the consistency
    /// time of the oldest successful backup whose WAL runs without a gap to
    /// the newest archived WAL, to when that WAL was received. `None` without
    /// a backup, or with log backup off (then only backup sets restore).
    pub fn recovery_window(
        &self,
        instance_id: &str,
    ) -> ServiceResult<Option<(DateTime<Utc>, DateTime<Utc>)>> {
        let p = self.policy(instance_id)?;
        if !p.log_backup_enabled {
            return Ok(None);
        }
        let wal = self.engine.catalog.list_wal_segments(instance_id)?;
        let backups = self.engine.catalog.list_backups(instance_id)?;
        Ok(recovery_window(&backups, &wal))
    }
}
