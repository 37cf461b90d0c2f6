//! Strata's catalog: the index of what the repository holds plus operational
//! state (instances, backup sets, WAL segments, restore points, jobs,
//! policies, access keys, storage usage samples, cross-region copies).
//!
//! The repository stays the source of truth for what is stored: backup sets,
//! WAL segments, restore points and instances (without their passwords) can
//! be rebuilt from it (`strata repo reindex`); the rest is operational state
//! kept only here. [`Catalog`] is the interface the engine and service use,
//! made of one trait per aggregate ([`InstanceCatalog`], [`BackupCatalog`],
//! [`WalCatalog`], [`JobCatalog`], [`PolicyCatalog`], [`CrossRegionCatalog`],
//! [`UsageCatalog`], [`AccessCatalog`], [`GcCatalog`], [`IndexCatalog`],
//! [`NodeCatalog`]); [`SqliteCatalog`], one SQLite file per data directory,
//! is the embedded default; [`PgCatalog`], a PostgreSQL database several
//! Strata nodes can share, is the other backend, and
//! [`copy_sqlite_to_postgres`] moves a catalog from the first to the second.
//! Errors are backend-neutral
//! ([`CatalogError`]) and the schema history is one list of versioned steps
//! ([`MIGRATIONS`]) that any backend follows.

#![warn(missing_docs)]

mod interface;
mod lease;
mod migrations;
mod postgres;
mod sqlite;
mod transfer;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
pub use pg_replication::{InvalidSslMode, SslMode};
use pg_wal::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use interface::{
    AccessCatalog, BackupCatalog, Catalog, CrossRegionCatalog, GcCatalog, IndexCatalog,
    InstanceCatalog, JobCatalog, NodeCatalog, PolicyCatalog, UsageCatalog, WalCatalog,
};
pub use lease::{LeaseKeeper, LeaseOwner, DEFAULT_JOB_LEASE};
pub use migrations::{Migration, MIGRATIONS};
pub use postgres::{PgCatalog, PgConnect};
pub use sqlite::SqliteCatalog;
pub use strata_ids::{BackupId, InstanceId, JobId, PackId};
pub use transfer::{copy_sqlite_to_postgres, TableCopy};

/// The statement of [`JobCatalog::prune_jobs`] with a backend's
/// placeholders for the end time and the limit.
pub(crate) fn prune_jobs_sql(ended_before: &str, limit: &str) -> String {
    format!(
        "DELETE FROM jobs WHERE id IN ( \
           SELECT id FROM ( \
             SELECT id, finished_at, row_number() OVER ( \
               PARTITION BY instance_id, kind ORDER BY finished_at DESC, id DESC) AS newest \
             FROM jobs WHERE state IN ('Finished', 'Failed') AND finished_at IS NOT NULL \
           ) ended \
           WHERE newest > 1 AND finished_at < {ended_before} \
             AND id NOT IN (SELECT job_id FROM backup_sets WHERE job_id IS NOT NULL) \
             AND id NOT IN (SELECT job_id FROM backup_drills WHERE job_id IS NOT NULL) \
           ORDER BY id LIMIT {limit})"
    )
}

/// The catalog traits, to call their methods on an `Arc<dyn Catalog>`:
/// `use strata_catalog::prelude::*;`.
pub mod prelude {
    pub use crate::interface::{
        AccessCatalog, BackupCatalog, Catalog, CrossRegionCatalog, GcCatalog, IndexCatalog,
        InstanceCatalog, JobCatalog, NodeCatalog, PolicyCatalog, UsageCatalog, WalCatalog,
    };
}

/// A console session as the catalog keeps it, so every node behind a load
/// balancer knows it. The session's id (the cookie's value) is never
/// stored: only its SHA-256, so reading the catalog does not sign anyone in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// SHA-256 of the session id, hex.
    pub id_hash: String,
    /// The AccessKey the session signed in with.
    pub key_id: String,
    /// Whether that key may only read.
    pub read_only: bool,
    /// The session's CSRF token.
    pub csrf: String,
    /// When it signed in.
    pub created_at: DateTime<Utc>,
    /// Its last request.
    pub last_seen_at: DateTime<Utc>,
    /// A one-time message for its next page (JSON, the console's format).
    pub flash: Option<String>,
}

/// A hold on a repository's packs (see [`GcCatalog`]): shared while a
/// backup writes packs or a reader (restore, download, copy, drill) reads
/// them, exclusive while a garbage collection deletes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoHold {
    /// Random id of this hold.
    pub id: String,
    /// The repository held (its `repository_id`).
    pub repository_id: String,
    /// Exclusive (a collection) or shared (everything else).
    pub exclusive: bool,
    /// The process that holds it.
    pub owner: LeaseOwner,
    /// What the hold is for, for people reading the table.
    pub purpose: String,
    /// How long the hold lives past its last renewal.
    pub ttl: std::time::Duration,
}

impl RepoHold {
    /// A new hold of `repository_id` by `owner`, with a random id.
    pub fn new(
        repository_id: &str,
        exclusive: bool,
        owner: LeaseOwner,
        purpose: &str,
        ttl: std::time::Duration,
    ) -> RepoHold {
        RepoHold {
            id: hex::encode(rand::random::<[u8; 16]>()),
            repository_id: repository_id.to_string(),
            exclusive,
            owner,
            purpose: purpose.to_string(),
            ttl,
        }
    }

    /// When the hold expires if renewed at `now`.
    pub fn expiry(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::days(1))
    }
}

/// A boxed error from the backend underneath, kept as the source.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a catalog call can fail with, whatever the backend: the first
/// variants are the catalog's own rules, the last ones classify what the
/// database reported (see [`CatalogError::is_retryable`]).
#[derive(Debug, Error)]
pub enum CatalogError {
    /// No instance has that id.
    #[error("instance {0:?} not found")]
    InstanceNotFound(String),
    /// An instance with that id is already registered.
    #[error("instance {0:?} already exists")]
    InstanceExists(String),
    /// No backup set has that id.
    #[error("backup set {0:?} not found")]
    BackupNotFound(String),
    /// A backup set with that id exists (ids are unique across instances).
    #[error("backup set {0:?} already exists")]
    BackupExists(String),
    /// No job has that id.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// A backup set of the instance is already running: at most one runs
    /// per instance at a time.
    #[error("a backup of instance {instance_id} is already running (backup {running})")]
    BackupRunning {
        /// The instance.
        instance_id: String,
        /// The set that runs.
        running: String,
    },
    /// Another process took the job over after its lease expired.
    #[error("job {0} was taken over by another process after its lease expired; its outcome is not recorded")]
    LeaseLost(JobId),
    /// The catalog's schema is newer than this build knows.
    #[error("the catalog was written by a newer Strata (schema version {found}; this build knows up to {supported})")]
    NewerSchema {
        /// The schema version the catalog records.
        found: i64,
        /// The newest version this build can migrate to.
        supported: i64,
    },
    /// A row the call needed does not exist (and no variant above names it).
    #[error("catalog row not found: {0}")]
    NotFound(String),
    /// A write would break a uniqueness rule no variant above names.
    #[error("catalog refused a duplicate: {0}")]
    Conflict(#[source] BackendError),
    /// The database is busy or cannot be reached now: the same call may
    /// succeed when retried.
    #[error("catalog database busy or unavailable: {0}")]
    Busy(#[source] BackendError),
    /// The database or a value stored in it is damaged or of the wrong type.
    #[error("catalog database is corrupt: {0}")]
    Corrupt(#[source] BackendError),
    /// Any other failure of the database underneath.
    #[error("catalog database error: {0}")]
    Backend(#[source] BackendError),
    /// A value given to or stored in the catalog breaks its rules.
    #[error("catalog holds an invalid value: {0}")]
    Invalid(String),
}

impl CatalogError {
    /// True when the failure is transient (the database was busy or
    /// unreachable) and the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CatalogError::Busy(_))
    }
}

/// What catalog calls return.
pub type CatalogResult<T> = Result<T, CatalogError>;

/// A `strata serve` node of a fleet sharing this catalog, as its last
/// heartbeat recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's id (`[node] id`, or generated once per data directory).
    pub id: String,
    /// Where its API listens, as it bound it.
    pub api_address: String,
    /// When this run of the node started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat: a node is live while this is recent.
    pub heartbeat_at: DateTime<Utc>,
    /// The Strata version it runs.
    pub version: String,
}

/// The ownership lease of one instance: the node that runs its WAL
/// receiver, scheduled backups, copies, drills and retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceOwner {
    /// The instance.
    pub instance_id: String,
    /// The node holding the lease.
    pub node_id: String,
    /// Counts the lease's changes of hands: 1 for the first owner, one more
    /// at every takeover (a renewal keeps it).
    pub epoch: i64,
    /// When the lease lapses unless its node renews it.
    pub expires_at: DateTime<Utc>,
}

/// An instance's WAL receiver as the node owning the instance last
/// published it, so that every node answers the same about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverStatus {
    /// The instance.
    pub instance_id: String,
    /// The node that published it (the instance's owner then).
    pub node_id: String,
    /// Whether a receiver task ran.
    pub running: bool,
    /// LSN received and stored (flushed to the repository) so far.
    pub received_lsn: u64,
    /// The server's end of WAL at its last status message.
    pub server_end_lsn: u64,
    /// When the server last sent anything.
    pub last_message_at: Option<DateTime<Utc>>,
    /// The last error, kept after recovery for the record.
    pub last_error: Option<String>,
    /// Why the receiver is failing, while it does.
    pub failing: Option<String>,
    /// When the current run of failures began.
    pub failing_since: Option<DateTime<Utc>>,
    /// Since when the server cannot be reached, while that is why the
    /// receiver fails.
    pub unreachable_since: Option<DateTime<Utc>>,
    /// When the owner published this.
    pub published_at: DateTime<Utc>,
}

/// A PostgreSQL server Strata backs up, as registered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    /// Instance id: letters, digits, `-`, `_` and `.` (see [`Instance::valid_id`]).
    pub id: InstanceId,
    /// Host name or address to connect to.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to log in as (needs the REPLICATION attribute).
    pub user: String,
    /// Name of the environment variable holding the password.
    pub password_env: Option<String>,
    /// Password given through the API; kept only in the catalog, never
    /// serialized, logged or written to the repository.
    #[serde(skip)]
    pub password: Option<String>,
    /// Database to connect to for SQL (the server's default when `None`).
    pub dbname: Option<String>,
    /// TLS mode, as libpq's `sslmode`.
    #[serde(with = "sslmode_string")]
    pub sslmode: SslMode,
    /// CA certificate file to verify the server with (`verify-ca`, `verify-full`).
    pub sslrootcert: Option<String>,
    /// Learned from the server on first contact.
    #[serde(with = "opt_u64_string")]
    pub system_identifier: Option<u64>,
    /// `server_version_num`, learned from the server.
    pub pg_version_num: Option<u32>,
    /// WAL segment size in bytes, learned from the server.
    pub wal_segment_size: Option<u64>,
    /// When the instance was registered.
    pub created_at: DateTime<Utc>,
    /// URL of the snapshot agent on the database host (`strata agent`),
    /// when snapshot backups and instant clones go through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// The agent's credential as stored: `plain:<hex>`, or `sealed:<hex>`
    /// under the repository's data key when it is encrypted. Kept only in
    /// the catalog, like the password.
    #[serde(skip)]
    pub agent_key: Option<String>,
    /// Certificate or CA file trusted for the agent's TLS (`https` URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_ca: Option<String>,
}

impl Instance {
    /// A server not contacted yet: no password, nothing learned about it,
    /// registered now.
    pub fn new(id: &str, host: &str, port: u16, user: &str, sslmode: SslMode) -> Instance {
        Instance {
            id: id.into(),
            host: host.to_string(),
            port,
            user: user.to_string(),
            password_env: None,
            password: None,
            dbname: None,
            sslmode,
            sslrootcert: None,
            system_identifier: None,
            pg_version_num: None,
            wal_segment_size: None,
            created_at: Utc::now(),
            agent_url: None,
            agent_key: None,
            agent_ca: None,
        }
    }

    /// Instance ids become replication slot names and object key parts:
    /// letters, digits, `-`, `_` and `.`, at most 64.
    pub fn valid_id(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    }

    /// What `password_env` may name: a portable environment variable name
    /// (ASCII letters, digits and `_`, not starting with a digit, at most
    /// 255 bytes).
    pub fn valid_env_name(name: &str) -> bool {
        name.len() <= 255
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Whether `id` names the owner of a user backup (RDS's
    /// `ImportUserBackupFile`): an id no registration may take, never in
    /// the instance table, whose only set is the backup imported.
    pub fn owns_user_backup(id: &str) -> bool {
        id.starts_with(USER_BACKUP_OWNER_PREFIX)
    }
}

/// Prefix of the ids that own user backups (see [`Instance::owns_user_backup`]).
pub const USER_BACKUP_OWNER_PREFIX: &str = "userbackup-";

/// Where a backup set stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum BackupStatus {
    /// Being taken.
    Running,
    /// Committed to the repository: usable for restores.
    Success,
    /// Ended without a committed manifest.
    Failed,
}

impl BackupStatus {
    /// The spelling stored in the catalog and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupStatus::Running => "Running",
            BackupStatus::Success => "Success",
            BackupStatus::Failed => "Failed",
        }
    }

    fn parse(s: &str) -> CatalogResult<Self> {
        Ok(match s {
            "Running" => BackupStatus::Running,
            "Success" => BackupStatus::Success,
            "Failed" => BackupStatus::Failed,
            other => return Err(CatalogError::Invalid(format!("backup status {other:?}"))),
        })
    }
}

/// A backup set: one base backup of an instance, as the catalog indexes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupSet {
    /// Backup id (a UTC timestamp, unique across instances).
    pub id: BackupId,
    /// Instance the set was taken from.
    pub instance_id: InstanceId,
    /// Where the backup stands.
    pub status: BackupStatus,
    /// Automated (by policy) or manual.
    pub mode: BackupMode,
    /// When the backup started.
    pub started_at: DateTime<Utc>,
    /// When it ended, successfully or not.
    pub finished_at: Option<DateTime<Utc>>,
    /// LSN the backup starts at (its checkpoint's redo point).
    pub start_lsn: Option<Lsn>,
    /// LSN a restore must replay to for the set to be consistent.
    pub stop_lsn: Option<Lsn>,
    /// Timeline at the start LSN.
    pub start_timeline: Option<TimelineId>,
    /// Timeline at the stop LSN.
    pub stop_timeline: Option<TimelineId>,
    /// `server_version_num` of the server backed up.
    pub pg_version_num: Option<u32>,
    /// Bytes of file data in the set (what a restore writes).
    pub total_bytes: u64,
    /// Raw bytes of blocks this set added to the repository.
    pub new_bytes: u64,
    /// Raw bytes of blocks that were already stored.
    pub dedup_bytes: u64,
    /// Compressed bytes this set added to the repository.
    pub stored_bytes: u64,
    /// Files (and directories and links) in the set.
    pub file_count: u64,
    /// Why the backup failed.
    pub error: Option<String>,
    /// The job that took the backup, when one did.
    pub job_id: Option<JobId>,
    /// How the data was copied (sets recorded before snapshots existed
    /// are physical).
    #[serde(default)]
    pub method: BackupMethod,
    /// A snapshot set: its snapshot is on the database host (the agent's
    /// snapshot directory), so clones from it are instant.
    #[serde(default)]
    pub snapshot_local: bool,
    /// A snapshot set: its files are in the repository too (uploaded), so
    /// it survives the host and restores or downloads like a physical set.
    #[serde(default)]
    pub snapshot_uploaded: bool,
    /// A snapshot set: the space its local snapshot holds on its own
    /// (blocks no other file shares), as the agent estimated it.
    #[serde(default)]
    pub snapshot_bytes: Option<u64>,
    /// Kept by hand (`strata backup keep`): forever or until a time; while
    /// kept, neither retention nor a deletion removes the set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_until: Option<KeepUntil>,
    /// Why the set is kept, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_note: Option<String>,
    /// The policy rule the set was taken under and the retention it had
    /// then (see [`TakenUnder`]); `None` for manual sets and sets taken
    /// before rules were recorded, which follow the regular retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_under: Option<TakenUnder>,
    /// A snapshot set: its snapshot's fingerprint when it was complete
    /// (`strata_agent::Fingerprint` text), checked before the snapshot is
    /// uploaded, cloned or restored from; `None` for sets taken before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_fingerprint: Option<String>,
}

/// How long a set kept by hand stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum KeepUntil {
    /// Until released.
    Forever,
    /// Until this time (then retention decides again).
    Until(DateTime<Utc>),
}

impl KeepUntil {
    /// Whether the keep still holds at `now`.
    pub fn holds_at(self, now: DateTime<Utc>) -> bool {
        match self {
            KeepUntil::Forever => true,
            KeepUntil::Until(t) => now < t,
        }
    }
}

impl fmt::Display for KeepUntil {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepUntil::Forever => f.write_str("forever"),
            KeepUntil::Until(t) => {
                f.write_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }
        }
    }
}

impl FromStr for KeepUntil {
    type Err = CatalogError;

    fn from_str(s: &str) -> CatalogResult<Self> {
        if s.eq_ignore_ascii_case("forever") {
            return Ok(KeepUntil::Forever);
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| KeepUntil::Until(t.with_timezone(&Utc)))
            .map_err(|_| {
                CatalogError::Invalid(format!("keep until {s:?} (forever or an RFC 3339 time)"))
            })
    }
}

impl From<KeepUntil> for String {
    fn from(k: KeepUntil) -> String {
        k.to_string()
    }
}

impl TryFrom<String> for KeepUntil {
    type Error = CatalogError;

    fn try_from(s: String) -> CatalogResult<Self> {
        s.parse()
    }
}

/// The policy rule an automatic set was taken under, stamped when it is
/// taken: a set keeps this retention even after its rule is deleted or
/// changed. Where several rules fell on the set's day, the one with the
/// longest retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenUnder {
    /// The rule's id ([`DataRule::id`], or [`REGULAR_RULE_ID`]).
    pub rule: String,
    /// Days the set is kept from its end.
    pub retention_days: u32,
}

/// The id of the regular weekly rule (the policy's backup days and
/// `backup_retention_days`), the first rule of an advanced policy.
pub const REGULAR_RULE_ID: &str = "regular";

/// Minutes between high-frequency snapshots RDS accepts (`BackupInterval`).
pub const BACKUP_INTERVALS_MINUTES: [u32; 9] = [15, 30, 60, 120, 180, 240, 360, 480, 720];

/// A day of the month a monthly rule falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum MonthDay {
    /// The day with this number (1 to 31; a month without it has no backup
    /// by this day).
    Day(u32),
    /// The month's last day, whatever its number.
    Last,
}

impl fmt::Display for MonthDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonthDay::Day(d) => write!(f, "{d}"),
            MonthDay::Last => f.write_str("Last"),
        }
    }
}

impl FromStr for MonthDay {
    type Err = CatalogError;

    fn from_str(s: &str) -> CatalogResult<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("last") {
            return Ok(MonthDay::Last);
        }
        match s.parse::<u32>() {
            Ok(d) if (1..=31).contains(&d) => Ok(MonthDay::Day(d)),
            _ => Err(CatalogError::Invalid(format!(
                "day of the month {s:?} (1 to 31 or Last)"
            ))),
        }
    }
}

impl From<MonthDay> for String {
    fn from(d: MonthDay) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for MonthDay {
    type Error = CatalogError;

    fn try_from(s: String) -> CatalogResult<Self> {
        s.parse()
    }
}

/// When an advanced (sparse) rule takes a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum RuleKind {
    /// On these days of the week.
    Weekly {
        /// The days, in week order.
        days: Vec<chrono::Weekday>,
    },
    /// On these days of the month.
    Monthly {
        /// The days, ascending, `Last` at the end.
        days: Vec<MonthDay>,
    },
    /// Once a year, on this date.
    Yearly {
        /// Month, 1 to 12.
        month: u32,
        /// Day of the month, valid for the month (29 February: leap years only).
        day: u32,
    },
}

impl RuleKind {
    /// The kind's name: `weekly`, `monthly` or `yearly`.
    pub fn name(&self) -> &'static str {
        match self {
            RuleKind::Weekly { .. } => "weekly",
            RuleKind::Monthly { .. } => "monthly",
            RuleKind::Yearly { .. } => "yearly",
        }
    }

    /// Whether the rule falls on `date`.
    pub fn falls_on(&self, date: chrono::NaiveDate) -> bool {
        use chrono::Datelike;
        match self {
            RuleKind::Weekly { days } => days.contains(&date.weekday()),
            RuleKind::Monthly { days } => days.iter().any(|d| match d {
                MonthDay::Day(n) => date.day() == *n,
                MonthDay::Last => date
                    .succ_opt()
                    .is_none_or(|next| next.month() != date.month()),
            }),
            RuleKind::Yearly { month, day } => date.month() == *month && date.day() == *day,
        }
    }
}

/// One rule of an advanced (sparse) backup policy beyond the regular one:
/// when it takes a backup and how long the set is kept (RDS's
/// `AdvancedDataPolicy`, `StrategyId` being the id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRule {
    /// Stable id, unique in the policy: letters, digits, `-` and `_`.
    pub id: String,
    /// When the rule takes a backup.
    pub kind: RuleKind,
    /// Days its sets are kept, 1 to 3650.
    pub retention_days: u32,
}

/// How archived backups are kept beyond the regular retention
/// (`ArchiveBackupKeepPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArchiveKeepPolicy {
    /// The first `archive_keep_count` sets of each calendar month.
    #[default]
    ByMonth,
    /// The first `archive_keep_count` sets of each ISO week.
    ByWeek,
    /// Every set.
    KeepAll,
}

impl ArchiveKeepPolicy {
    /// The spelling RDS uses, stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveKeepPolicy::ByMonth => "ByMonth",
            ArchiveKeepPolicy::ByWeek => "ByWeek",
            ArchiveKeepPolicy::KeepAll => "KeepAll",
        }
    }
}

impl fmt::Display for ArchiveKeepPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArchiveKeepPolicy {
    type Err = CatalogError;

    fn from_str(s: &str) -> CatalogResult<Self> {
        match s {
            "ByMonth" => Ok(ArchiveKeepPolicy::ByMonth),
            "ByWeek" => Ok(ArchiveKeepPolicy::ByWeek),
            "KeepAll" => Ok(ArchiveKeepPolicy::KeepAll),
            other => Err(CatalogError::Invalid(format!(
                "archive keep policy {other:?} (ByMonth, ByWeek or KeepAll)"
            ))),
        }
    }
}

impl BackupSet {
    /// Whether the set's files are in the repository: every successful
    /// physical set, a snapshot set once uploaded.
    pub fn in_repository(&self) -> bool {
        self.status == BackupStatus::Success
            && (self.method == BackupMethod::Physical || self.snapshot_uploaded)
    }

    /// A set just started: `Running`, nothing known of it yet.
    pub fn started(
        id: BackupId,
        instance_id: &str,
        mode: BackupMode,
        started_at: DateTime<Utc>,
        job_id: Option<JobId>,
    ) -> BackupSet {
        BackupSet {
            id,
            instance_id: instance_id.into(),
            status: BackupStatus::Running,
            mode,
            started_at,
            finished_at: None,
            start_lsn: None,
            stop_lsn: None,
            start_timeline: None,
            stop_timeline: None,
            pg_version_num: None,
            total_bytes: 0,
            new_bytes: 0,
            dedup_bytes: 0,
            stored_bytes: 0,
            file_count: 0,
            error: None,
            job_id,
            method: BackupMethod::Physical,
            snapshot_local: false,
            snapshot_uploaded: false,
            snapshot_bytes: None,
            keep_until: None,
            keep_note: None,
            taken_under: None,
            snapshot_fingerprint: None,
        }
    }

    /// Whether the set is kept by hand at `now`.
    pub fn kept_at(&self, now: DateTime<Utc>) -> bool {
        self.keep_until.is_some_and(|k| k.holds_at(now))
    }
}

/// How a backup set's data was copied, as RDS names backup methods.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum BackupMethod {
    /// Read over the replication protocol into the repository.
    #[default]
    Physical,
    /// A copy-on-write snapshot of the data directory on the database host
    /// (through its agent), uploaded to the repository afterwards.
    Snapshot,
}

impl BackupMethod {
    /// The spelling RDS uses, stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupMethod::Physical => "Physical",
            BackupMethod::Snapshot => "Snapshot",
        }
    }
}

impl fmt::Display for BackupMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackupMethod {
    type Err = CatalogError;

    fn from_str(s: &str) -> CatalogResult<Self> {
        match s {
            "Physical" => Ok(BackupMethod::Physical),
            "Snapshot" => Ok(BackupMethod::Snapshot),
            other => Err(CatalogError::Invalid(format!(
                "backup method {other:?} (Physical or Snapshot)"
            ))),
        }
    }
}

/// A stored WAL object (a complete segment or a segment's `.partial`), as the catalog indexes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WalSegmentRow {
    /// Instance the WAL came from.
    pub instance_id: InstanceId,
    /// Timeline of the segment.
    pub timeline: TimelineId,
    /// The 24-character segment file name.
    pub segment: String,
    /// True for the `.partial` object of a segment still being received.
    pub partial: bool,
    /// First LSN stored.
    pub begin_lsn: Lsn,
    /// End of the bytes stored (exclusive): the segment end when complete.
    pub end_lsn: Lsn,
    /// Bytes of WAL stored (`end_lsn - begin_lsn`).
    pub size: u64,
    /// Keyed BLAKE3 of the raw bytes stored, hex.
    pub checksum: String,
    /// Time of the first commit record in the segment.
    pub first_commit: Option<DateTime<Utc>>,
    /// Time of the last commit record in the segment.
    pub last_commit: Option<DateTime<Utc>>,
    /// Commit records in the segment.
    pub commit_count: u64,
    /// Smallest xid that committed in this segment.
    pub min_commit_xid: Option<u32>,
    /// Largest xid that committed in this segment.
    pub max_commit_xid: Option<u32>,
    /// Key of the WAL object in the repository.
    pub object_key: String,
    /// When the object was stored.
    pub stored_at: DateTime<Utc>,
}

/// A named restore point (`pg_create_restore_point`) found in stored WAL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestorePointRow {
    /// Instance the WAL came from.
    pub instance_id: InstanceId,
    /// Timeline of the record.
    pub timeline: TimelineId,
    /// The name given to `pg_create_restore_point`.
    pub name: String,
    /// LSN of the restore point record.
    pub lsn: Lsn,
    /// Time the record was written.
    pub time: DateTime<Utc>,
}

/// A destructive effect of one committed transaction found in stored WAL
/// (see `strata_repo::RecoveryEventInfo`); `seq` orders the effects of one
/// commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecoveryEventRow {
    /// Instance the WAL came from.
    pub instance_id: InstanceId,
    /// Timeline of the commit record.
    pub timeline: TimelineId,
    /// Start of the commit record.
    pub lsn: Lsn,
    /// Place among the effects of the same commit.
    pub seq: u32,
    /// End of the commit record.
    pub end_lsn: Lsn,
    /// `DropTable`, `Truncate`, `DropDatabase`, `Delete` or `Update`.
    pub kind: String,
    /// Transaction id.
    pub xid: u32,
    /// Commit time.
    pub time: DateTime<Utc>,
    /// Database OID.
    pub db_oid: u32,
    /// Table's storage file number (none for a database).
    pub relfilenode: Option<u32>,
    /// Table's OID when it was known.
    pub rel_oid: Option<u32>,
    /// Database name when it was known.
    pub database: Option<String>,
    /// Schema name when it was known.
    pub schema: Option<String>,
    /// Table name when it was known.
    pub table: Option<String>,
    /// Rows deleted or updated.
    pub rows: Option<u64>,
    /// Files the transaction created and filled.
    pub filled: Vec<u32>,
    /// For a dropped database: a position before which it was intact.
    pub before_lsn: Option<Lsn>,
}

/// `filled` as the catalog stores it: file numbers, comma-separated.
pub fn files_to_text(files: &[u32]) -> String {
    files
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The file numbers [`files_to_text`] wrote.
pub fn files_from_text(text: &str) -> CatalogResult<Vec<u32>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| CatalogError::Corrupt(format!("file number {s:?}").into()))
        })
        .collect()
}

/// The last name seen for a relation file of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelationNameRow {
    /// Instance the relation belongs to.
    pub instance_id: InstanceId,
    /// Database OID.
    pub db_oid: u32,
    /// Storage file number.
    pub relfilenode: u32,
    /// The relation's OID (stays when `TRUNCATE` gives it a new file).
    pub rel_oid: u32,
    /// Schema name.
    pub schema: String,
    /// Relation name.
    pub name: String,
    /// `pg_class.relkind` (`r` table, `m` materialized view, `i` index, `t` TOAST).
    pub kind: String,
    /// When this name was read from the server.
    pub seen_at: DateTime<Utc>,
}

/// The last name seen for a database of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatabaseNameRow {
    /// Instance the database belongs to.
    pub instance_id: InstanceId,
    /// Database OID.
    pub db_oid: u32,
    /// Database name.
    pub name: String,
    /// When this name was read from the server.
    pub seen_at: DateTime<Utc>,
}

/// What a job does. Stored in the catalog/// What a job does. Stored in the catalog as [`JobKind::as_str`] spells it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// A backup set taken from an instance.
    Backup,
    /// A restore into a directory (the CLI's `restore`).
    Restore,
    /// A restore to a new instance Strata runs.
    Clone,
    /// A restore to a new instance from another region's copies.
    DdrRestore,
    /// Databases or tables restored into a running instance.
    RestoreTable,
    /// A restore drill: restore, start, check, discard.
    Drill,
    /// Backup sets and WAL copied to another region's repository.
    CrossCopy,
    /// A snapshot backup through the instance's agent (seconds).
    SnapshotBackup,
    /// A snapshot set's files uploaded from the agent to the repository.
    SnapshotUpload,
    /// Databases of a backup restored into an instance or a new one
    /// (`RecoveryDBInstance`).
    RecoverDatabases,
    /// Databases of one instance's backup copied into another instance
    /// (`CopyDatabaseBetweenInstances`).
    CopyDatabases,
    /// A notification delivered to one sink (webhook, email).
    Notify,
}

impl JobKind {
    /// Every kind, in the order above.
    pub const ALL: [JobKind; 12] = [
        JobKind::Backup,
        JobKind::Restore,
        JobKind::Clone,
        JobKind::DdrRestore,
        JobKind::RestoreTable,
        JobKind::Drill,
        JobKind::CrossCopy,
        JobKind::SnapshotBackup,
        JobKind::SnapshotUpload,
        JobKind::RecoverDatabases,
        JobKind::CopyDatabases,
        JobKind::Notify,
    ];

    /// The spelling stored in the catalog and used by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Clone => "clone",
            JobKind::DdrRestore => "ddr-restore",
            JobKind::RestoreTable => "restore-table",
            JobKind::Drill => "drill",
            JobKind::CrossCopy => "cross-copy",
            JobKind::SnapshotBackup => "snapshot",
            JobKind::SnapshotUpload => "snapshot-upload",
            JobKind::RecoverDatabases => "recover-databases",
            JobKind::CopyDatabases => "copy-databases",
            JobKind::Notify => "notify",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = CatalogError;

    fn from_str(s: &str) -> CatalogResult<Self> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| CatalogError::Invalid(format!("job kind {s:?}")))
    }
}

/// How a backup was started, as RDS names backup modes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum BackupMode {
    /// Started by the scheduler from the instance's backup policy.
    Automated,
    /// Started by a user (API, console or CLI).
    Manual,
}

impl BackupMode {
    /// The spelling RDS uses, stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupMode::Automated => "Automated",
            BackupMode::Manual => "Manual",
        }
    }
}

impl fmt::Display for BackupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackupMode {
    type Err = CatalogError;

    fn from_str(s: &str) -> CatalogResult<Self> {
        match s {
            "Automated" => Ok(BackupMode::Automated),
            "Manual" => Ok(BackupMode::Manual),
            other => Err(CatalogError::Invalid(format!(
                "backup mode {other:?} (Automated or Manual)"
            ))),
        }
    }
}

/// Job states as RDS reports backup tasks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JobState {
    /// Created, not started yet.
    NoStart,
    /// Connecting to the server and checking what the job needs.
    Preparing,
    /// Queued behind other work (an RDS state; listed for the API's filters).
    Waiting,
    /// Moving data (streaming a backup, writing a restore).
    Uploading,
    /// Checking what was written.
    Checking,
    /// Ended successfully.
    Finished,
    /// Ended with an error (or taken over after its lease expired).
    Failed,
}

impl JobState {
    /// The spelling RDS uses, stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::NoStart => "NoStart",
            JobState::Preparing => "Preparing",
            JobState::Waiting => "Waiting",
            JobState::Uploading => "Uploading",
            JobState::Checking => "Checking",
            JobState::Finished => "Finished",
            JobState::Failed => "Failed",
        }
    }

    /// True once the job has ended (finished or failed).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Finished | JobState::Failed)
    }

    fn parse(s: &str) -> CatalogResult<Self> {
        Ok(match s {
            "NoStart" => JobState::NoStart,
            "Preparing" => JobState::Preparing,
            "Waiting" => JobState::Waiting,
            "Uploading" => JobState::Uploading,
            "Checking" => JobState::Checking,
            "Finished" => JobState::Finished,
            "Failed" => JobState::Failed,
            other => return Err(CatalogError::Invalid(format!("job state {other:?}"))),
        })
    }
}

/// A unit of work (a backup, a restore, a copy…) and its progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Job id, assigned by the catalog.
    pub id: JobId,
    /// What the job does.
    pub kind: JobKind,
    /// Instance the job works on, when it works on one.
    pub instance_id: Option<InstanceId>,
    /// Where the job stands.
    pub state: JobState,
    /// Percent done, 0 to 100.
    pub progress: u8,
    /// What the job is doing now, for people.
    pub detail: String,
    /// The backup set the job took or restores.
    pub backup_id: Option<BackupId>,
    /// When the job was created.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
    /// The lease the job belongs to: the process (start) running it. A job
    /// whose owner stops renewing is taken over (see [`JobCatalog::fail_expired_jobs`]).
    pub owner: LeaseOwner,
    /// When the owner last renewed its lease on this job.
    pub heartbeat_at: DateTime<Utc>,
    /// How long the owner's lease lasts past each heartbeat, as the owner
    /// stored it: every observer judges the job by this, not by its own
    /// setting. `None` on jobs stored before leases were (judged by the
    /// observer's lease) and on queued jobs nobody owns yet.
    pub lease_ms: Option<i64>,
    /// Process id of the owner, for people reading the job only: a PID says
    /// nothing about liveness across PID namespaces or hosts.
    pub pid: u32,
    /// Waiting for the node owning its instance to claim it
    /// ([`JobCatalog::claim_queued_job`]); no process owns it meanwhile.
    pub queued: bool,
    /// The node that claimed the job and runs (or ran) it, when it was
    /// queued (`StrataNode`).
    pub node_id: Option<String>,
}

/// An instance's backup policy, as RDS defines one (validated by the service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupPolicy {
    /// Instance the policy belongs to.
    pub instance_id: InstanceId,
    /// Days of the week, e.g. `["Monday", "Thursday"]`, in week order.
    pub backup_days: Vec<String>,
    /// Daily window, `HH:mmZ-HH:mmZ` (UTC).
    pub backup_window: String,
    /// Days automated backup sets are kept.
    pub backup_retention_days: u32,
    /// Whether WAL is archived continuously (point-in-time recovery).
    pub log_backup_enabled: bool,
    /// Days archived WAL is kept.
    pub log_retention_days: u32,
    /// When the policy last changed: backups due before it are not "missed".
    pub updated_at: DateTime<Utc>,
    /// Start of the last window the scheduler ran an automatic backup for.
    pub last_auto_slot: Option<DateTime<Utc>>,
    /// How automatic backups copy the data: `Snapshot` is RDS's "backup
    /// within seconds" (`Category` `Flash`).
    #[serde(default)]
    pub backup_method: BackupMethod,
    /// Minutes between high-frequency snapshots on the backup days
    /// (`BackupInterval`, one of [`BACKUP_INTERVALS_MINUTES`]); `None`: one
    /// backup in the window.
    #[serde(default)]
    pub backup_interval_minutes: Option<u32>,
    /// The advanced (sparse) policy is on: `advanced_data_rules` take
    /// backups beside the regular rule, and `advanced_log_retention_days`
    /// replaces `log_retention_days`.
    #[serde(default)]
    pub advanced_enabled: bool,
    /// The advanced policy's rules beyond the regular one.
    #[serde(default)]
    pub advanced_data_rules: Vec<DataRule>,
    /// Days WAL is kept under the advanced policy (`AdvancedLogPolicies`).
    #[serde(default)]
    pub advanced_log_retention_days: Option<u32>,
    /// Days archived sets are kept, 30 to 1095; 0: archiving off.
    #[serde(default)]
    pub archive_retention_days: u32,
    /// Which sets are archived past the regular retention.
    #[serde(default)]
    pub archive_keep_policy: ArchiveKeepPolicy,
    /// Sets kept per month (1–31) or week (1–7).
    #[serde(default = "default_archive_keep_count")]
    pub archive_keep_count: u32,
    /// Also keep the last N successful sets, whatever their age.
    #[serde(default)]
    pub keep_last: Option<u32>,
}

fn default_archive_keep_count() -> u32 {
    1
}

impl BackupPolicy {
    /// The regular policy of `instance_id` with every newer option off:
    /// what a policy stored before those options existed reads as.
    pub fn regular(
        instance_id: &str,
        backup_days: Vec<String>,
        backup_window: &str,
        backup_retention_days: u32,
        log_retention_days: u32,
        updated_at: DateTime<Utc>,
    ) -> BackupPolicy {
        BackupPolicy {
            instance_id: instance_id.into(),
            backup_days,
            backup_window: backup_window.to_string(),
            backup_retention_days,
            log_backup_enabled: true,
            log_retention_days,
            updated_at,
            last_auto_slot: None,
            backup_method: BackupMethod::Physical,
            backup_interval_minutes: None,
            advanced_enabled: false,
            advanced_data_rules: Vec::new(),
            advanced_log_retention_days: None,
            archive_retention_days: 0,
            archive_keep_policy: ArchiveKeepPolicy::ByMonth,
            archive_keep_count: 1,
            keep_last: None,
        }
    }

    /// Days WAL is kept: the advanced log policy's when it is on.
    pub fn effective_log_retention_days(&self) -> u32 {
        match (self.advanced_enabled, self.advanced_log_retention_days) {
            (true, Some(days)) => days,
            _ => self.log_retention_days,
        }
    }

    /// The rule a set taken at `started_at` by the scheduler is taken
    /// under: of the rules falling on that day (the regular one on its
    /// backup days, high-frequency snapshots included, and with the
    /// advanced policy on, its rules), the one with the longest
    /// retention. `None` when no rule falls on the day. The scheduler stamps
    /// the result on the set ([`BackupSet::taken_under`]).
    pub fn rule_for(&self, started_at: DateTime<Utc>) -> Option<TakenUnder> {
        use chrono::Datelike;
        let date = started_at.date_naive();
        let weekday = WEEKDAY_NAMES[date.weekday().num_days_from_monday() as usize];
        let regular = self.backup_days.iter().any(|d| d == weekday);
        let mut best = regular.then(|| TakenUnder {
            rule: REGULAR_RULE_ID.to_string(),
            retention_days: self.backup_retention_days,
        });
        if self.advanced_enabled {
            for r in &self.advanced_data_rules {
                if r.kind.falls_on(date)
                    && best
                        .as_ref()
                        .is_none_or(|b| r.retention_days > b.retention_days)
                {
                    best = Some(TakenUnder {
                        rule: r.id.clone(),
                        retention_days: r.retention_days,
                    });
                }
            }
        }
        best
    }
}

/// Weekday names as RDS spells them, Monday first.
const WEEKDAY_NAMES: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A PostgreSQL server Strata itself created and runs (a clone restored
/// from a backup): only these can be deleted through the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManagedInstance {
    /// Id of the new instance (also registered as an [`Instance`]).
    pub instance_id: InstanceId,
    /// Instance the data came from.
    pub source_instance: InstanceId,
    /// Backup set the data was restored from.
    pub backup_id: Option<BackupId>,
    /// Point in time it was restored to, if not the backup's end.
    pub restore_time: Option<DateTime<Utc>>,
    /// Data directory of the server.
    pub data_dir: String,
    /// Port the server listens on.
    pub port: u16,
    /// PostgreSQL major version the server runs.
    pub pg_major: u32,
    /// `Creating`, `Running`, `Failed`, `Deleting`.
    pub status: String,
    /// Why the server failed to be created or started.
    pub error: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The clone's name on the source instance's agent when it was cloned
    /// from a snapshot and runs on the database host (`data_dir` is then the
    /// agent's path); `None` for a server under Strata's instances directory.
    #[serde(default)]
    pub agent_clone: Option<String>,
}

/// The outcome of a restore drill of one backup set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillResult {
    /// Backup set drilled (at most one result per set).
    pub backup_id: BackupId,
    /// Instance the set belongs to.
    pub instance_id: InstanceId,
    /// `Running`, `Passed` or `Failed`.
    pub status: String,
    /// What the drill found, for people.
    pub detail: String,
    /// When the drill started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// The drill's job.
    pub job_id: Option<JobId>,
}

/// Cross-region backup of an instance (RDS's cross-region backup policy):
/// new backup sets, and with `log_backup_enabled` their WAL, are copied to
/// the repository of the named region and kept there `retention_days`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrossBackupPolicy {
    /// Instance the policy belongs to.
    pub instance_id: InstanceId,
    /// Target region id, a `[regions.<id>]` of the configuration.
    pub region: String,
    /// Whether new backup sets are copied.
    pub backup_enabled: bool,
    /// Whether WAL is copied (point-in-time recovery in the target region).
    pub log_backup_enabled: bool,
    /// Days copies are kept in the target region.
    pub retention_days: u32,
    /// When copying was last turned on: backup sets finished before are not copied.
    pub backup_enabled_at: Option<DateTime<Utc>>,
    /// When WAL copying was last turned on: WAL stored before is not copied.
    pub log_backup_enabled_at: Option<DateTime<Utc>>,
    /// When the policy last changed.
    pub updated_at: DateTime<Utc>,
}

/// A backup set copied to another region, listed once its manifest is
/// committed there. `id` is the integer `CrossBackupId` of the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrossBackup {
    /// Copy id, assigned by the catalog.
    pub id: i64,
    /// Target region id.
    pub region: String,
    /// The source set as it was copied (same id, LSNs, times and sizes).
    pub set: BackupSet,
    /// Compressed bytes the copy added to the target repository.
    pub copied_bytes: u64,
    /// When the copy was committed.
    pub copied_at: DateTime<Utc>,
}

/// A complete WAL segment copied to another region. `row.object_key` and
/// `row.checksum` are the target repository's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrossWalSegment {
    /// Copy id, assigned by the catalog.
    pub id: i64,
    /// Target region id.
    pub region: String,
    /// The segment as stored in the target repository.
    pub row: WalSegmentRow,
    /// When the copy was committed.
    pub copied_at: DateTime<Utc>,
}

/// Bytes stored for an instance at one moment, and the free quota then
/// (recorded by the scheduler; billable GB-hours are integrated from these).
/// A new figure the quota covers is one more field here, one more column,
/// and one more term in [`UsageSample::stored_bytes`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageSample {
    /// Instance measured.
    pub instance_id: InstanceId,
    /// When it was measured.
    pub at: DateTime<Utc>,
    /// Data size of the instance's backup sets added up.
    pub logical_bytes: u64,
    /// Backup data stored (pack share, manifests, instance record).
    pub data_bytes: u64,
    /// WAL stored.
    pub wal_bytes: u64,
    /// The free quota in force when sampled.
    pub quota_bytes: u64,
    /// What the instance's copies (data and WAL) hold in the target
    /// regions' repositories; `None` when not known (a target holding its
    /// copies was never measured). Outside the free quota, as RDS bills
    /// cross-region backup storage on its own.
    pub cross_region_bytes: Option<u64>,
}

impl UsageSample {
    /// Everything stored for the instance in its own region: what the quota
    /// is compared with (cross-region copies are not).
    pub fn stored_bytes(&self) -> u64 {
        self.data_bytes + self.wal_bytes
    }

    /// Bytes above the free quota (0 within it).
    pub fn excess_bytes(&self) -> u64 {
        self.stored_bytes().saturating_sub(self.quota_bytes)
    }
}

/// An API access key. The secret is needed in clear to verify HMAC signatures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccessKey {
    /// Key id, sent with each request.
    pub id: String,
    /// Shared secret (HMAC key); never serialized.
    #[serde(skip_serializing)]
    pub secret: String,
    /// True for a key that may only read.
    pub read_only: bool,
    /// What the key is for, for people.
    pub description: String,
    /// When the key was created.
    pub created_at: DateTime<Utc>,
}

/// A set's keep as the `kept` and `keep_until` columns hold it (kept with
/// no time: forever); both backends read and write it so.
pub(crate) fn keep_from_sql(kept: bool, until: Option<DateTime<Utc>>) -> Option<KeepUntil> {
    match (kept, until) {
        (false, _) => None,
        (true, None) => Some(KeepUntil::Forever),
        (true, Some(t)) => Some(KeepUntil::Until(t)),
    }
}

/// The `keep_until` column of a keep.
pub(crate) fn keep_until_sql(keep: Option<KeepUntil>) -> Option<DateTime<Utc>> {
    match keep {
        Some(KeepUntil::Until(t)) => Some(t),
        _ => None,
    }
}

/// The rule a set was taken under, from its two columns.
pub(crate) fn taken_from_sql(rule: Option<String>, days: Option<u32>) -> Option<TakenUnder> {
    Some(TakenUnder {
        rule: rule?,
        retention_days: days?,
    })
}

/// An advanced policy's rules as stored: a JSON list.
pub(crate) fn rules_to_sql(rules: &[DataRule]) -> CatalogResult<String> {
    serde_json::to_string(rules).map_err(|e| CatalogError::Invalid(format!("backup rules: {e}")))
}

/// The rules back from their JSON.
pub(crate) fn rules_from_sql(text: &str) -> CatalogResult<Vec<DataRule>> {
    serde_json::from_str(text)
        .map_err(|e| CatalogError::Corrupt(format!("backup rules: {e}").into()))
}

/// `sslmode` as libpq spells it.
mod sslmode_string {
    use pg_replication::SslMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &SslMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SslMode, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod opt_u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}
