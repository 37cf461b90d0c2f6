//! Strata's service core, what `strata serve` runs besides its HTTP front:
//! backup policies per instance, the scheduler that starts automatic backups
//! inside each policy's window, the job workers, one WAL receiver per
//! instance with log backup on (restarted with backoff), retention with
//! garbage collection, storage usage samples against each instance's free
//! quota, and the figures `/metrics` exports.
//!
//! Time comes from a [`Clock`], so tests can walk the scheduler through
//! days and weeks; [`Service::tick`] does one round of everything.
//!
//! This file holds the [`Service`] itself, its errors, settings, queries and
//! instance lifecycle; each responsibility keeps its state in its own module:
//! `scheduler` (the round and its decisions), `wal_supervisor`, `retention`
//! (retention, garbage collection, deletion rules), `jobs` (backup tasks and
//! job records), `queue` (work any node's API starts for the instance's
//! owner), `receivers` (WAL receiver states every node answers with),
//! `usage`, `drills`, `cross_region` (the copier), `local` (clones
//! and scratch servers), `tables`, `recovery` (databases restored into
//! another instance or a new one), `alerts` (notifications: which events are
//! due, delivered through `strata_notify`'s sinks) and `metrics`. Refusals are typed
//! ([`PolicyError`] with a [`Refusal`] kind); RDS's codes are the API's.
#![warn(missing_docs)]

mod agent_clones;
mod alerts;
mod clock;
mod contents;
mod cross_region;
mod drills;
mod encryption;
pub mod fleet;
mod import;
mod jobs;
mod local;
mod local_snapshots;
mod membership;
mod metrics;
mod pg_client;
pub mod policy;
mod queue;
mod receivers;
mod recovery;
mod retention;
mod scheduler;
mod tables;
mod usage;
pub mod user_backups;
mod wal_supervisor;
mod window;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use strata_catalog::{
    ArchiveKeepPolicy, BackupMethod, BackupPolicy, BackupStatus, CatalogError, DataRule, Instance,
    JobId,
};
use strata_engine::{Engine, EngineError};

pub use alerts::NotifySettings;
pub use clock::{Clock, ManualClock, SystemClock};
pub use contents::SetContents;
pub use cross_region::{
    recovery_window, CopyChoice, CrossPolicyChange, RegionTarget, Regions, RETENTION_DAYS,
};
pub use local::{ExactPoint, ExactTarget, ReleasedKeep, RestoreSource, Scratch};
pub use membership::{NodeHealth, NodeState, DEFAULT_NODE_LEASE};
pub use pg_wal::Lsn;
pub use policy::{PolicyError, Refusal};
pub use retention::DeletionRules;
pub use strata_repo::{BackupContents, DatabaseContents, TableContents};
pub use wal_supervisor::WalReceiverState;

use cross_region::Copier;
use drills::DrillWorker;
use jobs::BackupTasks;
pub(crate) use jobs::{fail_job, finish_job};
pub use recovery::parse_db_names;
use retention::Housekeeping;
use scheduler::Leaving;
pub use tables::{parse_table_meta, DbSpec, TableSpec};
use usage::UsageState;
pub use usage::{billable_gb_hours, FreeQuota, UsageReport, UsageSettings, DEFAULT_FREE_QUOTA};
use wal_supervisor::WalSupervisor;

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
    /// Snapshots each instance keeps on its database host (the newest;
    /// older ones go once uploaded).
    pub snapshot_keep_local: usize,
    /// Bytes the snapshots of one instance may hold on its database host
    /// (what only they hold, as the agent measures it); uploaded ones past
    /// it are deleted there, oldest first. `None`: no limit.
    pub snapshot_local_max_bytes: Option<u64>,
    /// Storage usage sampling and free quotas.
    pub usage: UsageSettings,
    /// This node's identity in a fleet sharing the catalog.
    pub node: NodeSettings,
    /// The directory `StrataImportBackupFile` imports from (one name
    /// beneath it per import); `None`: imports over the API are off.
    pub import_dir: Option<std::path::PathBuf>,
    /// Notifications and their sinks.
    pub notify: NotifySettings,
    /// How long the Task Center keeps an ended job (by the wall clock)
    /// that no backup set or drill names; `None`: forever.
    pub job_keep: Option<chrono::Duration>,
}

/// Who this node is among the `strata serve` nodes sharing a catalog, and
/// how long its ownership leases last.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's id, unique in the fleet and stable across restarts.
    pub id: String,
    /// Where its API listens, recorded with its heartbeat.
    pub api_address: String,
    /// How long an ownership lease lasts unless renewed (renewed every
    /// quarter of it): a node that stops lets its instances go this long
    /// after its last renewal.
    pub lease: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            id: "local".into(),
            api_address: String::new(),
            lease: DEFAULT_NODE_LEASE,
        }
    }
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
            snapshot_keep_local: 2,
            snapshot_local_max_bytes: None,
            usage: UsageSettings::default(),
            node: NodeSettings::default(),
            import_dir: None,
            notify: NotifySettings::default(),
            job_keep: Some(chrono::Duration::days(DEFAULT_JOB_KEEP_DAYS)),
        }
    }
}

/// Days an ended job is kept unless configured (`jobs.keep_days`).
pub const DEFAULT_JOB_KEEP_DAYS: i64 = 90;

/// How to reach an instance's snapshot agent, as given at registration.
pub struct AgentAccess {
    /// The agent's URL (`http://` or `https://`).
    pub url: String,
    /// Its key.
    pub key: strata_agent::AgentKey,
    /// Certificate or CA file to trust for `https`.
    pub ca_file: Option<String>,
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
    /// How automatic backups copy the data (`Snapshot`: RDS's `Category`
    /// `Flash`).
    pub backup_method: Option<BackupMethod>,
    /// Minutes between high-frequency snapshots; `Some(None)` turns them off.
    pub backup_interval_minutes: Option<Option<u32>>,
    /// Whether the advanced (sparse) policy is on.
    pub advanced_enabled: Option<bool>,
    /// The advanced policy's rules beyond the regular one, replacing the
    /// current ones.
    pub advanced_data_rules: Option<Vec<DataRule>>,
    /// Days WAL is kept under the advanced policy; `Some(None)` removes it.
    pub advanced_log_retention_days: Option<Option<u32>>,
    /// Days archived sets are kept (0: off).
    pub archive_retention_days: Option<u32>,
    /// Which sets are archived.
    pub archive_keep_policy: Option<ArchiveKeepPolicy>,
    /// Sets archived per month or week.
    pub archive_keep_count: Option<u32>,
    /// Keep the last N sets; `Some(None)` turns count-based retention off.
    pub keep_last: Option<Option<u32>>,
}

/// The retention options of `change` set on `p` (checked afterwards as a
/// whole by [`policy::check_retention_options`]).
fn apply_retention_options(p: &mut BackupPolicy, change: PolicyChange) {
    if let Some(interval) = change.backup_interval_minutes {
        p.backup_interval_minutes = interval;
    }
    if let Some(on) = change.advanced_enabled {
        p.advanced_enabled = on;
    }
    if let Some(rules) = change.advanced_data_rules {
        p.advanced_data_rules = rules;
    }
    if let Some(days) = change.advanced_log_retention_days {
        p.advanced_log_retention_days = days;
    }
    if let Some(days) = change.archive_retention_days {
        p.archive_retention_days = days;
    }
    if let Some(keep) = change.archive_keep_policy {
        p.archive_keep_policy = keep;
    }
    if let Some(count) = change.archive_keep_count {
        p.archive_keep_count = count;
    }
    if let Some(n) = change.keep_last {
        p.keep_last = n;
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
    /// The WAL receivers and their states.
    wal: WalSupervisor,
    /// The backups this process runs.
    backups: BackupTasks,
    /// When retention last ran and whether a collection is owed.
    housekeeping: Housekeeping,
    /// Storage usage sampling.
    usage: UsageState,
    started: Instant,
    /// The restore drills queued and their worker.
    drill_worker: DrillWorker,
    /// The service is shutting down: background workers stop.
    stopping: AtomicBool,
    /// Instances the scheduler leaves alone while they go.
    leaving: Leaving,
    /// Cross-region targets.
    regions: cross_region::Regions,
    /// The cross-region copier's state and its failed copies.
    copier: Copier,
    /// The instances this node holds ownership leases on.
    membership: membership::Membership,
    /// The WAL receiver states this node last published, for every node.
    published: receivers::Published,
    /// When this service started (recorded with the node's heartbeat).
    started_at: DateTime<Utc>,
    /// What notifications announced.
    occurrences: Mutex<alerts::Occurrences>,
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
            wal: WalSupervisor::new(settings.receiver_backoff_max),
            settings,
            backups: BackupTasks::default(),
            housekeeping: Housekeeping::default(),
            usage: UsageState::default(),
            started: Instant::now(),
            drill_worker: DrillWorker::default(),
            stopping: AtomicBool::new(false),
            leaving: Leaving::default(),
            regions,
            copier: Copier::default(),
            membership: membership::Membership::default(),
            published: receivers::Published::default(),
            started_at: Utc::now(),
            occurrences: Mutex::default(),
        })
    }

    /// The engine underneath, for tests that drive a job directly;
    /// everything else goes through the service's methods.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The catalog, for what lives there alone: AccessKeys and nonces
    /// (authentication) and console sessions. Domain look-ups go through the
    /// service's own queries ([`Service::instance`], [`Service::jobs`]…).
    pub fn catalog(&self) -> &dyn strata_catalog::Catalog {
        self.engine.catalog().as_ref()
    }

    /// Refuses (`SnapshotNeedsAgent`) when `instance_id` has no agent;
    /// `need` says what asked for one.
    pub(crate) fn require_agent(&self, instance_id: &str, need: &str) -> ServiceResult<()> {
        if self
            .engine
            .catalog()
            .get_instance(instance_id)?
            .agent_url
            .is_some()
        {
            return Ok(());
        }
        Err(PolicyError {
            kind: Refusal::SnapshotNeedsAgent,
            message: format!("instance {instance_id} has no agent: {need}"),
        }
        .into())
    }

    /// Every registered instance.
    pub fn instances(&self) -> strata_catalog::CatalogResult<Vec<Instance>> {
        self.engine.catalog().list_instances()
    }

    /// The jobs of an instance (`None`: of every instance and none), oldest
    /// first.
    pub fn jobs(
        &self,
        instance_id: Option<&str>,
    ) -> strata_catalog::CatalogResult<Vec<strata_catalog::Job>> {
        self.engine.catalog().list_jobs(instance_id)
    }

    /// The restore drills of an instance's backups.
    pub fn drills(
        &self,
        instance_id: &str,
    ) -> strata_catalog::CatalogResult<Vec<strata_catalog::DrillResult>> {
        self.engine.catalog().list_drills(instance_id)
    }

    /// A registered instance.
    pub fn instance(&self, id: &str) -> strata_catalog::CatalogResult<Instance> {
        self.engine.catalog().get_instance(id)
    }

    /// A backup set.
    pub fn backup_set(&self, id: &str) -> strata_catalog::CatalogResult<strata_catalog::BackupSet> {
        self.engine.catalog().get_backup(id)
    }

    /// The backup sets of an instance, oldest first.
    pub fn backup_sets(
        &self,
        instance_id: &str,
    ) -> strata_catalog::CatalogResult<Vec<strata_catalog::BackupSet>> {
        self.engine.catalog().list_backups(instance_id)
    }

    /// A job.
    pub fn job(&self, id: JobId) -> strata_catalog::CatalogResult<strata_catalog::Job> {
        self.engine.catalog().get_job(id)
    }

    /// The archived WAL of an instance.
    pub fn wal_segments(
        &self,
        instance_id: &str,
    ) -> strata_catalog::CatalogResult<Vec<strata_catalog::WalSegmentRow>> {
        self.engine.catalog().list_wal_segments(instance_id)
    }

    /// The bytes of one archived WAL file of an instance (`partial` for the
    /// `.partial` segment a timeline ended with); `None` when the catalog
    /// lists no such file. Reads the repository: call it off the runtime.
    pub fn wal_file(
        &self,
        instance_id: &str,
        segment: &str,
        partial: bool,
    ) -> ServiceResult<Option<Vec<u8>>> {
        let Some(row) = self
            .engine
            .catalog()
            .list_wal_segments(instance_id)?
            .into_iter()
            .find(|w| w.segment == segment && w.partial == partial)
        else {
            return Ok(None);
        };
        // The instance's own key domain when its backups are encrypted.
        let (_, data) = self
            .engine
            .for_instance_blocking(instance_id)?
            .repo()
            .read_wal(&row.object_key)
            .map_err(EngineError::from)?;
        Ok(Some(data))
    }

    /// The archive of a backup set as a download streams it (planned, not
    /// yet read). Blocks while a garbage collection runs: call it off the
    /// runtime.
    pub fn backup_archive(
        &self,
        instance_id: &str,
        backup_id: &str,
    ) -> ServiceResult<strata_engine::BackupArchive> {
        // The instance's own key domain when its backups are encrypted.
        let engine = self.engine.for_instance_blocking(instance_id)?;
        Ok(engine.backup_archive(instance_id, backup_id)?)
    }

    /// Strata's record of an instance it created (a clone), if it is one.
    pub fn managed_instance(
        &self,
        id: &str,
    ) -> strata_catalog::CatalogResult<Option<strata_catalog::ManagedInstance>> {
        self.engine.catalog().get_managed(id)
    }

    /// The repository's configuration and whether it is encrypted.
    pub fn repository(&self) -> &strata_repo::Repository {
        self.engine.repo()
    }

    /// The service clock's time.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The policy of an instance; an instance without one gets the default.
    pub fn policy(&self, instance_id: &str) -> ServiceResult<BackupPolicy> {
        self.engine.catalog().get_instance(instance_id)?;
        if let Some(p) = self.engine.catalog().get_policy(instance_id)? {
            return Ok(p);
        }
        let p = policy::default_policy(instance_id, self.now());
        self.engine.catalog().put_policy(&p)?;
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
                Refusal::DataRetentionMalformed,
                "BackupRetentionPeriod",
            )?)?;
        }
        if let Some(days) = &change.log_retention_days {
            p.log_retention_days = policy::parse_days_count(
                days,
                Refusal::LogRetentionMalformed,
                "LogBackupRetentionPeriod",
            )?;
        }
        policy::check_log_retention(p.log_retention_days, p.backup_retention_days)?;
        if let Some(method) = change.backup_method {
            if method == BackupMethod::Snapshot {
                self.require_agent(
                    instance_id,
                    "snapshot backups (Category Flash) need `strata agent` on the database host, registered with the instance",
                )?;
            }
            p.backup_method = method;
        }
        let turning_off = p.log_backup_enabled && change.log_backup_enabled == Some(false);
        if let Some(on) = change.log_backup_enabled {
            p.log_backup_enabled = on;
        }
        apply_retention_options(&mut p, change);
        // Checked as a whole, before anything is stored: a refused change
        // changes nothing.
        policy::check_retention_options(&p)?;
        p.updated_at = self.now();
        self.engine.catalog().put_policy(&p)?;
        if turning_off {
            // The policy is stored first and the instance marked, so the
            // scheduler starts no new receiver once this one has stopped.
            self.leaving.mark(instance_id);
            self.stop_archiving(instance_id).await;
            self.leaving.unmark(instance_id);
            // The WAL no backup needs goes now: while a backup or a reader
            // on some node holds the repository, wait for it (up to a
            // minute) rather than leave the deletion to a later round.
            let mut plan = self.engine.apply_retention(&p, self.now())?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while plan.wal_postponed > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                plan = self.engine.apply_retention(&p, self.now())?;
            }
            tracing::info!(
                instance = %instance_id,
                "log backup turned off: {} WAL segments deleted",
                plan.wal.len()
            );
            self.housekeeping.request_gc();
        }
        Ok(p)
    }

    /// Checks the server can be backed up, then registers it with the
    /// default policy. Its first backup and WAL receiver start at the next
    /// tick.
    pub async fn register_instance(
        &self,
        mut instance: Instance,
        agent: Option<AgentAccess>,
    ) -> ServiceResult<Instance> {
        if self.engine.catalog().get_instance(&instance.id).is_ok() {
            return Err(CatalogError::InstanceExists(instance.id.to_string()).into());
        }
        let facts = self.engine.probe(&instance).await?;
        instance.system_identifier = Some(facts.system_id);
        instance.pg_version_num = Some(facts.pg_version_num);
        instance.wal_segment_size = Some(facts.wal_segment_size);
        if let Some(agent) = agent {
            self.engine
                .attach_agent(&mut instance, &agent.url, &agent.key, agent.ca_file)
                .await?;
        }
        self.engine.add_instance(&instance)?;
        self.policy(&instance.id)?;
        Ok(instance)
    }

    /// Stops archiving an instance and forgets it. Its backup sets stay in
    /// the repository (and in the catalog) until deleted. Refused on a node
    /// other than the instance's owner: the WAL receiver and the
    /// replication slot it must drop are in use there, and a slot left
    /// behind would keep WAL on the server for ever.
    pub async fn deregister_instance(&self, instance_id: &str) -> ServiceResult<()> {
        self.engine.catalog().get_instance(instance_id)?;
        if let Some(owner) = self
            .instance_owners()?
            .remove(instance_id)
            .filter(|n| n != self.node_id())
        {
            let address = self
                .engine
                .catalog()
                .list_nodes()?
                .into_iter()
                .find(|n| n.id == owner)
                .map(|n| format!(" (API at {})", n.api_address))
                .unwrap_or_default();
            return Err(EngineError::Conflict(format!(
                "instance {instance_id} is run by node {owner}{address}, which holds its WAL receiver and replication slot; deregister it there"
            ))
            .into());
        }
        self.leaving.mark(instance_id);
        // A backup this server runs for the instance is cancelled (recorded
        // as failed); one another process runs cannot be, so it is waited for.
        self.cancel_backup(
            instance_id,
            "the instance was deregistered while the backup ran",
        )
        .await;
        if let Some(b) = self
            .engine
            .catalog()
            .list_backups(instance_id)?
            .into_iter()
            .find(|b| b.status == BackupStatus::Running)
        {
            self.leaving.unmark(instance_id);
            return Err(EngineError::Conflict(format!(
                "backup {} of instance {instance_id} is running in another process; wait for it to finish",
                b.id
            ))
            .into());
        }
        let outcome = async {
            self.stop_archiving(instance_id).await;
            self.engine.catalog().delete_instance(instance_id)?;
            self.wal.forget(instance_id);
            self.fail_queued_jobs(
                instance_id,
                "the instance was deregistered before the job started",
            )?;
            Ok(())
        }
        .await;
        self.leaving.unmark(instance_id);
        outcome
    }

    /// Fails the jobs queued for `instance_id` that no node took yet: with
    /// the instance gone, no owner would ever claim them. Each is claimed
    /// first, so a node starting it at this moment keeps it instead.
    fn fail_queued_jobs(&self, instance_id: &str, reason: &str) -> ServiceResult<()> {
        let catalog = self.engine.catalog();
        let queued = catalog
            .queued_jobs()?
            .into_iter()
            .filter(|j| j.instance_id.as_deref() == Some(instance_id));
        for job in queued {
            if catalog
                .claim_queued_job(job.id, self.node_id(), Utc::now())?
                .is_some()
            {
                jobs::fail_job(&self.engine, job.id, reason);
            }
        }
        Ok(())
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
        let wal = self.engine.catalog().list_wal_segments(instance_id)?;
        let backups = self.engine.catalog().list_backups(instance_id)?;
        Ok(recovery_window(&backups, &wal))
    }

    /// Recovery events of an instance (see `strata_engine::RecoveryEvent`).
    pub fn recovery_events(
        &self,
        instance_id: &str,
        filter: &strata_engine::EventFilter,
    ) -> ServiceResult<Vec<strata_engine::RecoveryEvent>> {
        self.engine.catalog().get_instance(instance_id)?;
        Ok(self.engine.recovery_events(instance_id, filter)?)
    }
}

#[cfg(test)]
mod tests {
    //! The service's own rules, over an in-memory catalog and repository
    //! (no PostgreSQL server).

    use strata_catalog::{BackupId, BackupMode, BackupSet, Catalog, SqliteCatalog, SslMode};
    use strata_engine::EngineSettings;
    use strata_repo::{MemoryStorage, Repository};

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A service with one registered instance "a", at Monday 30 November 2026 noon.
    fn service() -> (Arc<Service>, Arc<dyn Catalog>) {
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let repo = Repository::open_or_init(Arc::new(MemoryStorage::default())).unwrap();
        let engine = Engine::new(catalog.clone(), repo, EngineSettings::default());
        catalog
            .add_instance(&Instance::new(
                "a",
                "127.0.0.1",
                5432,
                "postgres",
                SslMode::Disable,
            ))
            .unwrap();
        let clock = Arc::new(ManualClock::new(at("2026-11-30T12:00:00Z")));
        let settings = ServiceSettings {
            drills: false,
            ..Default::default()
        };
        (Service::new(engine, clock, settings), catalog)
    }

    fn refusal<T: std::fmt::Debug>(r: ServiceResult<T>) -> Refusal {
        match r {
            Err(ServiceError::Policy(p)) => p.kind,
            other => panic!("not a policy refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn policy_changes_are_checked_before_anything_is_stored() {
        let (svc, _) = service();
        let before = svc.policy("a").unwrap();
        let change = |f: fn(&mut PolicyChange)| {
            let mut c = PolicyChange::default();
            f(&mut c);
            c
        };
        let cases: [(PolicyChange, Refusal); 6] = [
            (
                change(|c| c.backup_retention_days = Some("6".into())),
                Refusal::DataRetentionMalformed,
            ),
            (
                change(|c| c.backup_retention_days = Some("a week".into())),
                Refusal::DataRetentionMalformed,
            ),
            (
                change(|c| c.log_retention_days = Some("x".into())),
                Refusal::LogRetentionMalformed,
            ),
            (
                change(|c| {
                    c.backup_retention_days = Some("30".into());
                    c.log_retention_days = Some("40".into());
                }),
                Refusal::ConflictingParameters,
            ),
            (
                change(|c| c.backup_days = Some("Monday".into())),
                Refusal::BackupDaysMalformed,
            ),
            (
                change(|c| {
                    c.backup_days = Some("Tuesday,Friday".into());
                    c.backup_window = Some("02:00Z-04:00Z".into());
                }),
                Refusal::BackupWindowMalformed,
            ),
        ];
        for (i, (c, kind)) in cases.into_iter().enumerate() {
            assert_eq!(refusal(svc.modify_policy("a", c).await), kind, "case {i}");
            assert_eq!(
                svc.policy("a").unwrap(),
                before,
                "case {i} stored something"
            );
        }
        assert!(matches!(
            svc.modify_policy("nope", PolicyChange::default()).await,
            Err(ServiceError::Engine(EngineError::Catalog(
                CatalogError::InstanceNotFound(_)
            )))
        ));

        let stored = svc
            .modify_policy(
                "a",
                PolicyChange {
                    backup_days: Some("friday, Tuesday".into()),
                    backup_window: Some(" 23:30Z-00:30Z ".into()),
                    backup_retention_days: Some(" 30 ".into()),
                    log_retention_days: Some("30".into()),
                    log_backup_enabled: None,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(stored.backup_days, ["Tuesday", "Friday"]);
        assert_eq!(stored.backup_window, "23:30Z-00:30Z");
        assert_eq!(
            (stored.backup_retention_days, stored.log_retention_days),
            (30, 30)
        );
        assert_eq!(stored.updated_at, at("2026-11-30T12:00:00Z"));
        assert_eq!(svc.policy("a").unwrap(), stored);
    }

    #[tokio::test]
    async fn only_the_owning_node_deregisters_an_instance() {
        let (svc, catalog) = service();
        let now = Utc::now();
        let ttl = chrono::Duration::seconds(60);
        assert!(catalog.claim_instance("a", "other", now, ttl).unwrap());
        catalog
            .heartbeat(&strata_catalog::Node {
                id: "other".into(),
                api_address: "10.0.0.9:8080".into(),
                started_at: now,
                heartbeat_at: now,
                version: "x".into(),
            })
            .unwrap();
        let err = svc.deregister_instance("a").await.unwrap_err().to_string();
        assert!(
            err.contains("node other") && err.contains("10.0.0.9:8080"),
            "{err}"
        );
        assert!(svc.instance("a").is_ok(), "the instance stays registered");
        // Once that node lets it go (its lease lapses), this node may.
        assert!(catalog.release_instance("a", "other").unwrap());
        svc.deregister_instance("a").await.unwrap();
        assert!(svc.instance("a").is_err());
    }

    #[test]
    fn backup_deletion_is_all_or_none() {
        let (svc, catalog) = service();
        let done = |id: &str, day: &str| {
            let t = at(&format!("2026-11-{day}T02:00:00Z"));
            let mut s = BackupSet::started(id.into(), "a", BackupMode::Automated, t, None);
            s.status = BackupStatus::Success;
            s.finished_at = Some(t);
            catalog.insert_backup(&s).unwrap();
        };
        done("old", "01");
        done("anchor", "10");
        done("newest", "29");
        let ids = |v: &[&str]| v.iter().map(|s| BackupId::from(*s)).collect::<Vec<_>>();
        // "old" alone could go; with the newest in the request nothing goes.
        assert_eq!(
            refusal(svc.delete_backups("a", &ids(&["old", "newest"]))),
            Refusal::BackupSetKept
        );
        assert!(matches!(
            svc.delete_backups("a", &ids(&["old", "missing"])),
            Err(ServiceError::Engine(EngineError::Catalog(
                CatalogError::BackupNotFound(id)
            ))) if id == "missing"
        ));
        let left: Vec<BackupId> = svc
            .backup_sets("a")
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(left, ["old", "anchor", "newest"]);
    }
}
