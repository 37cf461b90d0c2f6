//! Strata's configuration: one typed struct, read from TOML (`--config FILE`
//! or `./strata.toml`), with environment overrides; with neither, embedded
//! defaults keep everything under `./strata-data`.
//!
//! Every key is optional here; the accessors below resolve it into the
//! settings each crate runs with ([`EngineSettings`], `ServiceSettings` with
//! its `UsageSettings`, [`S3Config`], [`AzureConfig`], [`GcsConfig`], [`RetryPolicy`],
//! [`MinFreeSpace`]).
//! A default is defined once: in that crate's `Default` (or constant), or in
//! an accessor here for what only the binary knows (data directory, listen
//! address, link lifetime). The field comments therefore say what a key
//! does, not its default: the README's configuration table states the
//! defaults, and a test holds the table, these structs and the resolved
//! defaults together.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use strata_catalog::PgConnect;
use strata_engine::EngineSettings;
use strata_repo::{
    AzureConfig, AzureStorage, GcsConfig, GcsStorage, KeySource, LocalStorage, LockMode,
    MinFreeSpace, ObjectLock, RetryPolicy, RetryingStorage, S3Config, S3Storage, Storage, Tuning,
    DEFAULT_COMPRESS_LEVEL,
};

mod notify;
#[cfg(test)]
mod reference_table;

pub use notify::NotifyConfig;

/// Where the catalog lives, as the configuration says.
pub enum CatalogLocation {
    /// The embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, shared by every node that names it.
    Postgres(PgConnect),
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root for the default repository and catalog locations.
    pub data_dir: Option<PathBuf>,
    /// Repository: a directory (default `<data_dir>/repo`), `s3://bucket/prefix`,
    /// `azure://container/prefix` or `gs://bucket/prefix`.
    pub repository: Option<String>,
    /// The catalog: a SQLite file (default `<data_dir>/catalog.db`) or a
    /// `postgres://` URL.
    pub catalog: Option<String>,
    /// Environment variable holding the PostgreSQL catalog's password.
    pub catalog_password_env: Option<String>,
    /// zstd level for new blocks and WAL.
    pub compress_level: Option<i32>,
    pub wal: WalConfig,
    pub restore: RestoreConfig,
    pub postgres: PostgresConfig,
    pub server: ServerConfig,
    pub scheduler: SchedulerConfig,
    pub s3: S3Settings,
    pub azure: AzureSettings,
    pub gcs: GcsSettings,
    pub encryption: EncryptionSettings,
    pub kms: KmsSettings,
    pub instances: InstancesConfig,
    pub drills: DrillsConfig,
    pub downloads: DownloadsConfig,
    /// This server's own region id, as the API reports it.
    pub region_id: Option<String>,
    /// Cross-region backup targets by region id.
    pub regions: std::collections::BTreeMap<String, RegionConfig>,
    pub usage: UsageConfig,
    pub metrics: MetricsConfig,
    pub local_repository: LocalRepositoryConfig,
    pub jobs: JobsConfig,
    pub gc: GcConfig,
    pub node: NodeConfig,
    pub snapshot: SnapshotConfig,
    pub import: ImportConfig,
    pub notify: NotifyConfig,
    /// Read the repository as it was at this time (`restore --repo-as-of`).
    #[serde(skip)]
    pub repo_as_of: Option<chrono::DateTime<chrono::Utc>>,
}

/// `[import]`: backups taken elsewhere, imported over the API.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ImportConfig {
    /// The directory `StrataImportBackupFile` imports from; absent: that
    /// action is refused.
    pub dir: Option<PathBuf>,
}

/// `[snapshot]`: snapshot backups through agents on database hosts.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Snapshots each instance keeps on its database host (older ones are
    /// deleted there once uploaded).
    pub keep_local: Option<usize>,
    /// Files of a snapshot read from the agent at once while it uploads.
    pub upload_parallel: Option<usize>,
    /// Bytes one instance's snapshots may hold on its database host; older
    /// uploaded ones past it are deleted there. Absent or 0: no limit.
    pub local_max_bytes: Option<u64>,
}

/// `[node]`: this server's identity among `strata serve` nodes sharing one
/// catalog, and how long its ownership leases last.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique in the fleet and stable across restarts; default: generated
    /// once and kept in `<data_dir>/node-id`.
    pub id: Option<String>,
    /// Seconds an instance's ownership lease lasts unless renewed.
    pub lease_secs: Option<u64>,
}

/// The range `node.lease_secs` must lie in: a renewal every quarter of the
/// lease must fit a slow catalog round, and a failover should not wait
/// longer than a few minutes.
pub const NODE_LEASE_SECS: std::ops::RangeInclusive<u64> = 8..=300;

/// Bytes as lowercase hex digits.
fn hex_id(bytes: [u8; 6]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `id` can name a node: the rule for every id Strata accepts
/// (1 to 64 letters, digits, `-`, `_`, `.`), as for instances.
fn valid_node_id(id: &str) -> bool {
    strata_catalog::Instance::valid_id(id)
}

/// Free space kept on the file system of a repository in a directory.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LocalRepositoryConfig {
    /// Bytes kept free; the smaller of this and
    /// `min_free_percent` applies, so either at 0 turns the guard off.
    pub min_free_bytes: Option<u64>,
    /// Percent of the file system kept free.
    pub min_free_percent: Option<u8>,
}

impl LocalRepositoryConfig {
    fn min_free(&self) -> Result<MinFreeSpace> {
        let default = MinFreeSpace::default();
        let percent = self.min_free_percent.unwrap_or(default.percent);
        if percent > 100 {
            bail!("[local_repository] min_free_percent must be between 0 and 100, got {percent}");
        }
        Ok(MinFreeSpace {
            bytes: self.min_free_bytes.unwrap_or(default.bytes),
            percent,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Seconds a running job stays owned by a process that stopped
    /// renewing its lease before another process fails it.
    pub lease_secs: Option<u64>,
    /// Days an ended job no backup set or drill names is kept (0: forever).
    pub keep_days: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Seconds a pack must have been unreferenced, as seen by an earlier
    /// garbage collection, before it is deleted.
    pub grace_secs: Option<u64>,
}

/// A cross-region backup target: a repository of its own, reached and
/// unlocked like the primary one.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegionConfig {
    /// A directory, `s3://bucket/prefix`, `azure://container/prefix` or `gs://bucket/prefix`.
    pub repository: String,
    pub s3: S3Settings,
    pub azure: AzureSettings,
    pub gcs: GcsSettings,
    pub encryption: EncryptionSettings,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Longest time between two storage usage samples.
    pub sample_interval_secs: Option<u64>,
    /// Free backup storage of every instance: `"200%"` of its database
    /// size (the default) or a size such as `"50GiB"`.
    pub free_quota: Option<String>,
    /// Free quotas of single instances, by instance id.
    pub instance_free_quota: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadsConfig {
    /// How long download links stay valid, in seconds.
    pub link_lifetime_secs: Option<u64>,
    /// `scheme://host:port` download links start with (default: the
    /// address `strata serve` listens on).
    pub public_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InstancesConfig {
    /// Where clones and scratch servers live (default `<data_dir>/instances`).
    pub dir: Option<PathBuf>,
    /// Ports they may use, `LOW-HIGH`.
    pub port_range: Option<String>,
    /// `listen_addresses` of clones.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DrillsConfig {
    /// Restore-drill every successful backup.
    pub enabled: Option<bool>,
}

/// The region KMS requests are signed for unless `kms.region` says otherwise.
pub const KMS_DEFAULT_REGION: &str = "us-east-1";

/// `[kms]`: the key management service (AWS KMS API) whose customer master
/// keys wrap the data keys of instances with encrypted backups.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KmsSettings {
    /// `http(s)://host[:port]` of the KMS API.
    pub endpoint: Option<String>,
    /// Region the requests are signed for.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key (never printed).
    pub secret_access_key: Option<String>,
}

/// Everything but the secret, which shows only whether it is set.
impl std::fmt::Debug for KmsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsSettings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

impl KmsSettings {
    /// The KMS client, `None` when no `[kms]` endpoint is set; refuses
    /// incomplete or hostile settings.
    pub fn client(&self) -> Result<Option<strata_engine::strata_kms::Kms>> {
        let Some(endpoint) = &self.endpoint else {
            if self.region.is_some()
                || self.access_key_id.is_some()
                || self.secret_access_key.is_some()
            {
                bail!("[kms] settings without kms.endpoint");
            }
            return Ok(None);
        };
        let region = self
            .region
            .clone()
            .unwrap_or_else(|| KMS_DEFAULT_REGION.into());
        if region.is_empty()
            || region.len() > 64
            || !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            bail!("kms.region must be 1 to 64 characters of a-z, 0-9 and -");
        }
        let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) else {
            bail!("kms.access_key_id and kms.secret_access_key must both be set");
        };
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("kms.access_key_id must be 1 to 128 letters and digits");
        }
        if secret.is_empty()
            || secret.len() > 1024
            || secret.chars().any(|c| c.is_control() || c == ' ')
        {
            bail!("kms.secret_access_key must be 1 to 1024 printable characters without spaces");
        }
        let kms = strata_engine::strata_kms::Kms::new(strata_engine::strata_kms::KmsConfig {
            endpoint: endpoint.clone(),
            region,
            access_key_id: id.clone(),
            secret_access_key: zeroize::Zeroizing::new(secret.clone()),
        })
        .map_err(|e| anyhow::anyhow!("[kms]: {e}"))?;
        Ok(Some(kms))
    }
}

/// How to reach an `s3://` repository.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// Service URL (default: AWS S3 for `region`).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Static credentials (default: the AWS_* environment / instance credentials).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as most non-AWS services want.
    pub path_style: Option<bool>,
    /// Allow a plain-http endpoint.
    pub allow_http: Option<bool>,
    /// `governance` or `compliance`: packs, manifests and WAL objects are
    /// written under an S3 Object Lock retention of `object_lock_days`.
    pub object_lock: Option<String>,
    /// Days each locked object is protected after it is written or
    /// referenced again (the longest retention plus a margin).
    pub object_lock_days: Option<u32>,
    /// Part sizes, concurrency, deadlines and attempts, in the same table.
    #[serde(flatten)]
    pub tuning: TuningSettings,
}

/// The keys every object-store table (`[s3]`, `[azure]`, `[gcs]`) has: how
/// [`Tuning`] and the retries are set. Flattened into those tables, so its
/// keys sit beside the service's own; unknown keys are refused by the table.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TuningSettings {
    /// Objects above this size (MiB) go up as multipart uploads.
    pub multipart_threshold_mb: Option<usize>,
    /// Part size of multipart uploads in MiB (at least 5).
    pub part_size_mb: Option<usize>,
    /// Requests in flight at once.
    pub max_concurrency: Option<usize>,
    /// Packs a backup stores at once.
    pub upload_concurrency: Option<usize>,
    /// Deadline of one request in seconds.
    pub request_timeout_secs: Option<u64>,
    /// Attempts per call on transient errors, the first included.
    pub max_attempts: Option<u32>,
}

impl TuningSettings {
    /// `tuning` with the keys that are set applied (checked when the store is made).
    fn apply(&self, tuning: &mut Tuning) {
        const MIB: usize = 1024 * 1024;
        if let Some(mb) = self.multipart_threshold_mb {
            tuning.multipart_threshold = mb.saturating_mul(MIB);
        }
        if let Some(mb) = self.part_size_mb {
            tuning.part_size = mb.saturating_mul(MIB);
        }
        if let Some(n) = self.max_concurrency {
            tuning.max_concurrency = n;
        }
        if let Some(n) = self.upload_concurrency {
            tuning.upload_concurrency = n;
        }
        if let Some(secs) = self.request_timeout_secs {
            tuning.request_timeout = Duration::from_secs(secs.max(1));
        }
    }

    /// Retries of calls to the store: `max_attempts`, the rest as
    /// [`RetryPolicy`] has it.
    fn retry_policy(&self) -> RetryPolicy {
        let default = RetryPolicy::default();
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(default.max_attempts).max(1),
            ..default
        }
    }
}

/// Everything but the secret, which shows only whether it is set.
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<hidden>"),
            )
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("tuning", &self.tuning)
            .field("object_lock", &self.object_lock)
            .field("object_lock_days", &self.object_lock_days)
            .finish()
    }
}

/// How to reach an `azure://` repository.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AzureSettings {
    /// Storage account name (default with `use_emulator`: `devstoreaccount1`).
    pub account: Option<String>,
    /// File holding the account's Shared Key (surrounding whitespace
    /// ignored); default: the `AZURE_*` environment, then managed identity.
    pub access_key_file: Option<PathBuf>,
    /// The key itself, from `STRATA_AZURE_ACCESS_KEY` only (never from the file).
    #[serde(skip)]
    access_key: Option<String>,
    /// Blob service URL (sovereign clouds, private endpoints, the emulator).
    pub endpoint: Option<String>,
    /// Talk to Azurite: path-style URLs, plain http, its development account.
    pub use_emulator: Option<bool>,
    /// Block sizes, concurrency, deadlines and attempts, in the same table.
    #[serde(flatten)]
    pub tuning: TuningSettings,
}

impl std::fmt::Debug for AzureSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureSettings")
            .field("account", &self.account)
            .field("access_key_file", &self.access_key_file)
            .field("access_key", &self.access_key.as_ref().map(|_| "<hidden>"))
            .field("endpoint", &self.endpoint)
            .field("use_emulator", &self.use_emulator)
            .field("tuning", &self.tuning)
            .finish()
    }
}

/// How to reach a `gs://` repository.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GcsSettings {
    /// File holding a service account's JSON key; default: the
    /// `GOOGLE_*` environment, application default credentials, then the
    /// metadata server.
    pub service_account_file: Option<PathBuf>,
    /// Service URL (private endpoints, an emulator).
    pub endpoint: Option<String>,
    /// Talk to an emulator: no credentials, plain http allowed.
    pub use_emulator: Option<bool>,
    /// Part sizes, concurrency, deadlines and attempts, in the same table.
    #[serde(flatten)]
    pub tuning: TuningSettings,
}

impl std::fmt::Debug for GcsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsSettings")
            .field("service_account_file", &self.service_account_file)
            .field("endpoint", &self.endpoint)
            .field("use_emulator", &self.use_emulator)
            .field("tuning", &self.tuning)
            .finish()
    }
}

/// Encryption at rest: what unlocks (or, for a new repository, encrypts) it.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionSettings {
    /// File holding the master key (at least 32 bytes).
    pub key_file: Option<PathBuf>,
    /// Environment variable holding a passphrase (stretched with Argon2id).
    pub passphrase_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address `strata serve` listens on.
    pub listen: Option<String>,
    /// PEM certificate chain; with `tls_key`, the API is served over HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// `/metrics`: where it is served and whether a scrape needs a token.
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of a listener serving only `/metrics` (default: none, it is
    /// served on the API's listener).
    pub listen: Option<String>,
    /// Bearer token a scrape must send (default: none, open).
    pub token: Option<String>,
    /// File holding that token instead (surrounding whitespace ignored).
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl MetricsConfig {
    /// The token a scrape must send, read from `token_file` when that is set.
    pub fn token(&self) -> Result<Option<String>> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                bail!("[metrics] token and token_file are alternatives; set one")
            }
            (Some(t), None) => t.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("[metrics] token_file {}", path.display()))?
                .trim()
                .to_string(),
            (None, None) => return Ok(None),
        };
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("[metrics] the token must be one word of visible characters (e.g. `openssl rand -hex 32`)");
        }
        Ok(Some(token))
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Seconds between scheduler rounds.
    pub tick_secs: Option<u64>,
    /// Seconds between retention passes.
    pub retention_interval_secs: Option<u64>,
    /// Read limit for automatic backups in kB/s (default: none).
    pub backup_max_rate_kb: Option<u32>,
    /// Read limit for backups started by the API or the console in kB/s (default: none).
    pub manual_backup_max_rate_kb: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// How often the partial WAL segment is stored, in milliseconds.
    pub flush_interval_ms: Option<u64>,
    /// How often the WAL receiver reports its position to the server, in seconds.
    pub status_interval_secs: Option<u64>,
    /// Seconds a server may send nothing on a WAL stream or a base backup's
    /// data stream before the connection is given up (0: never).
    pub receiver_timeout_secs: Option<u64>,
    /// Longest pause between two attempts of a failing WAL receiver, in
    /// seconds; the pause doubles from 2 s up to this.
    pub retry_max_secs: Option<u64>,
    /// Whether receivers decode recovery events (default: true).
    pub recovery_events: Option<bool>,
    /// Rows one transaction must delete or update in one table to be a
    /// recovery event (default: 1000).
    pub event_min_rows: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreConfig {
    /// Files written at once (default: twice the number of CPUs).
    pub parallelism: Option<usize>,
    /// OS user owning restored data and running restored servers (default: `postgres` when run as root).
    pub os_user: Option<String>,
    /// Seconds to wait for a started server to finish recovery.
    pub start_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Directories holding `postgres` and `pg_ctl`; `{major}` is replaced by the major version.
    pub bin_dirs: Option<Vec<String>>,
}

impl Config {
    /// Loads `path`, or `./strata.toml` when present, or the defaults; then
    /// applies `STRATA_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let mut config = match path {
            Some(p) => Self::read(p)?,
            None if Path::new("strata.toml").exists() => Self::read(Path::new("strata.toml"))?,
            None => Config::default(),
        };
        if let Ok(v) = std::env::var("STRATA_DATA_DIR") {
            config.data_dir = Some(v.into());
        }
        if let Ok(v) = std::env::var("STRATA_REPOSITORY") {
            config.repository = Some(v);
        }
        if let Ok(v) = std::env::var("STRATA_REPOSITORY_MIN_FREE_BYTES") {
            config.local_repository.min_free_bytes = Some(v.trim().parse().with_context(|| {
                format!("STRATA_REPOSITORY_MIN_FREE_BYTES must be a byte count, got {v:?}")
            })?);
        }
        if let Ok(v) = std::env::var("STRATA_CATALOG") {
            config.catalog = Some(v);
        }
        if let Ok(v) = std::env::var("STRATA_CATALOG_PASSWORD_ENV") {
            config.catalog_password_env = Some(v);
        }
        if let Ok(v) = std::env::var("STRATA_PG_BIN_DIRS") {
            config.postgres.bin_dirs = Some(v.split(':').map(str::to_string).collect());
        }
        if let Ok(v) = std::env::var("STRATA_OS_USER") {
            config.restore.os_user = Some(v);
        }
        if let Ok(v) = std::env::var("STRATA_LISTEN") {
            config.server.listen = Some(v);
        }
        config.s3.apply_env()?;
        config.azure.apply_env()?;
        config.gcs.apply_env()?;
        if let Ok(v) = std::env::var("STRATA_ENCRYPTION_KEY_FILE") {
            config.encryption.key_file = Some(v.into());
        }
        if let Ok(v) = std::env::var("STRATA_ENCRYPTION_PASSPHRASE_ENV") {
            config.encryption.passphrase_env = Some(v);
        }
        if config.encryption.key_file.is_some() && config.encryption.passphrase_env.is_some() {
            bail!("[encryption] key_file and passphrase_env are alternatives; set one");
        }
        for (id, region) in &config.regions {
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                bail!("[regions.{id}]: a region id uses letters, digits and '-'");
            }
            if region.repository.is_empty() {
                bail!("[regions.{id}] repository is required (a directory, s3://bucket/prefix, azure://container/prefix or gs://bucket/prefix)");
            }
            if region.encryption.key_file.is_some() && region.encryption.passphrase_env.is_some() {
                bail!("[regions.{id}.encryption] key_file and passphrase_env are alternatives; set one");
            }
        }
        if config.instances.port_range.is_some() && config.instance_ports().is_none() {
            bail!(
                "[instances] port_range must be LOW-HIGH, e.g. 15432-15531, got {:?}",
                config.instances.port_range.as_deref().unwrap_or_default()
            );
        }
        if config.server.tls_cert.is_some() != config.server.tls_key.is_some() {
            bail!("[server] tls_cert and tls_key must be set together");
        }
        if config.metrics.token.is_some() && config.metrics.token_file.is_some() {
            bail!("[metrics] token and token_file are alternatives; set one");
        }
        if let Some(level) = config.compress_level {
            if !(1..=19).contains(&level) {
                bail!("compress_level must be between 1 and 19, got {level}");
            }
        }
        if let Some(id) = &config.node.id {
            if !valid_node_id(id) {
                bail!("[node] id must be 1 to 64 letters, digits, '-', '_' or '.', got {id:?}");
            }
        }
        if let Some(secs) = config.node.lease_secs {
            if !NODE_LEASE_SECS.contains(&secs) {
                bail!(
                    "[node] lease_secs must be between {} and {}, got {secs}",
                    NODE_LEASE_SECS.start(),
                    NODE_LEASE_SECS.end()
                );
            }
        }
        config.usage_settings()?;
        config.local_repository.min_free()?;
        Ok(config)
    }

    /// This node's id: `[node] id`, else the one kept in `<data_dir>/node-id`,
    /// generated and written there the first time.
    pub fn node_id(&self) -> Result<String> {
        if let Some(id) = &self.node.id {
            return Ok(id.clone());
        }
        let path = self.data_dir().join("node-id");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim();
                if !valid_node_id(id) {
                    bail!("{} holds no valid node id: {id:?}", path.display());
                }
                return Ok(id.to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let id = format!("node-{}", hex_id(rand::random::<[u8; 6]>()));
        std::fs::create_dir_all(self.data_dir())?;
        // Written whole under a temporary name, then renamed: a crash never
        // leaves a half-written id that a restart would refuse.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{id}\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(id)
    }

    fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid configuration {}", path.display()))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("strata-data"))
    }

    /// The repository as configured: a directory path, an `s3://`, `azure://` or `gs://` URL.
    pub fn repository(&self) -> String {
        self.repository
            .clone()
            .unwrap_or_else(|| self.data_dir().join("repo").display().to_string())
    }

    /// The storage the repository lives in. Object storage is wrapped in
    /// retries with backoff; a local directory fails fast.
    pub fn storage(&self) -> Result<Arc<dyn Storage>> {
        if let Some(time) = self.repo_as_of {
            let location = self.repository();
            if !location.starts_with("s3://") {
                bail!("--repo-as-of needs an s3:// repository in a versioned bucket; {location} is not one");
            }
            let mut c = s3_config(&location, &self.s3)?;
            c.as_of = Some(time);
            return Ok(Arc::new(RetryingStorage::new(
                S3Storage::new(c)?,
                self.s3.tuning.retry_policy(),
            )));
        }
        open_storage(
            &self.repository(),
            ObjectStores {
                s3: &self.s3,
                azure: &self.azure,
                gcs: &self.gcs,
            },
            self.local_repository.min_free()?,
        )
    }

    /// The configured repository key, if any.
    pub fn key_source(&self) -> Result<Option<KeySource>> {
        self.encryption.key_source()
    }

    pub fn region_id(&self) -> String {
        self.region_id
            .clone()
            .unwrap_or_else(|| strata_service::Regions::default().primary)
    }

    /// zstd level for new blocks and WAL.
    pub fn compress_level(&self) -> i32 {
        self.compress_level.unwrap_or(DEFAULT_COMPRESS_LEVEL)
    }

    /// How long download links stay valid.
    pub fn link_lifetime(&self) -> chrono::Duration {
        let secs = self.downloads.link_lifetime_secs.unwrap_or(3600).max(1);
        i64::try_from(secs)
            .ok()
            .and_then(chrono::Duration::try_seconds)
            .unwrap_or(chrono::Duration::MAX)
    }

    /// The cross-region targets, their storage opened (not their
    /// repositories: those are opened on first use).
    pub fn regions(&self) -> Result<strata_service::Regions> {
        let mut targets = Vec::new();
        for (id, region) in &self.regions {
            let storage = open_storage(
                &region.repository,
                ObjectStores {
                    s3: &region.s3,
                    azure: &region.azure,
                    gcs: &region.gcs,
                },
                self.local_repository.min_free()?,
            )
            .with_context(|| format!("[regions.{id}]"))?;
            let key = region
                .encryption
                .key_source()
                .with_context(|| format!("[regions.{id}.encryption]"))?;
            targets.push(strata_service::RegionTarget::new(
                id,
                storage,
                key,
                self.compress_level(),
            ));
        }
        Ok(strata_service::Regions::new(&self.region_id(), targets))
    }

    /// The SQLite catalog file: `catalog` when it is a path, else
    /// `<data_dir>/catalog.db`.
    pub fn catalog_path(&self) -> PathBuf {
        match &self.catalog {
            Some(c) if !PgConnect::is_url(c) => PathBuf::from(c),
            _ => self.data_dir().join("catalog.db"),
        }
    }

    /// Where the catalog is: a SQLite file, or a PostgreSQL database with
    /// the password from `catalog_password_env` (when set) or the URL.
    pub fn catalog_location(&self) -> Result<CatalogLocation> {
        match &self.catalog {
            Some(url) if PgConnect::is_url(url) => {
                Ok(CatalogLocation::Postgres(self.pg_connect(url)?))
            }
            _ => Ok(CatalogLocation::Sqlite(self.catalog_path())),
        }
    }

    /// A PostgreSQL catalog at `url`, logging in with the password of
    /// `catalog_password_env` when that is set.
    pub fn pg_connect(&self, url: &str) -> Result<PgConnect> {
        let password = match &self.catalog_password_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow::anyhow!("catalog_password_env names {var}, which is not set")
            })?),
            None => None,
        };
        Ok(PgConnect::new(url).password(password))
    }

    pub fn listen(&self) -> String {
        self.server
            .listen
            .clone()
            .unwrap_or_else(|| "127.0.0.1:8080".into())
    }

    /// `[usage]`: sampling interval and free quotas (checked by [`Config::load`]).
    fn usage_settings(&self) -> Result<strata_service::UsageSettings> {
        let mut u = strata_service::UsageSettings::default();
        if let Some(secs) = self.usage.sample_interval_secs {
            u.sample_interval = chrono::Duration::seconds(secs.max(1) as i64);
        }
        let parse = |text: &str, key: &str| {
            strata_service::FreeQuota::parse(text)
                .map_err(|e| anyhow::anyhow!("[usage] {key}: {e}"))
        };
        if let Some(q) = &self.usage.free_quota {
            u.default_quota = parse(q, "free_quota")?;
        }
        for (id, q) in &self.usage.instance_free_quota {
            u.instance_quotas
                .insert(id.clone(), parse(q, &format!("instance_free_quota.{id}"))?);
        }
        Ok(u)
    }

    pub fn service_settings(&self) -> Result<strata_service::ServiceSettings> {
        let mut s = strata_service::ServiceSettings {
            usage: self.usage_settings()?,
            ..Default::default()
        };
        if let Some(t) = self.scheduler.tick_secs {
            s.tick = Duration::from_secs(t.max(1));
        }
        if let Some(days) = self.jobs.keep_days {
            s.job_keep = match days {
                0 => None,
                days => Some(chrono::Duration::days(days.min(36_500) as i64)),
            };
        }
        if let Some(t) = self.scheduler.retention_interval_secs {
            s.retention_interval = chrono::Duration::seconds(t.max(1) as i64);
        }
        if let Some(secs) = self.wal.retry_max_secs {
            s.receiver_backoff_max = Duration::from_secs(secs.max(1));
        }
        s.backup_max_rate_kb = self.scheduler.backup_max_rate_kb;
        s.manual_backup_max_rate_kb = self.scheduler.manual_backup_max_rate_kb;
        s.instances_dir = self
            .instances
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("instances"));
        if let Ok(abs) = std::path::absolute(&s.instances_dir) {
            s.instances_dir = abs;
        }
        if let Some(range) = self.instance_ports() {
            s.local_ports = range;
        }
        if let Some(l) = &self.instances.listen {
            s.local_listen = l.clone();
        }
        if let Some(on) = self.drills.enabled {
            s.drills = on;
        }
        if let Some(id) = &self.node.id {
            s.node.id = id.clone();
        }
        if let Some(secs) = self.node.lease_secs {
            s.node.lease = Duration::from_secs(secs);
        }
        if let Some(keep) = self.snapshot.keep_local {
            s.snapshot_keep_local = keep;
        }
        s.snapshot_local_max_bytes = self.snapshot.local_max_bytes.filter(|&b| b > 0);
        s.import_dir = self
            .import
            .dir
            .as_ref()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()));
        s.notify = self.notify.settings()?;
        Ok(s)
    }

    /// `[instances] port_range`, checked by [`Config::load`].
    fn instance_ports(&self) -> Option<(u16, u16)> {
        let (lo, hi) = self.instances.port_range.as_deref()?.split_once('-')?;
        let (lo, hi) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
        (lo <= hi && lo > 0).then_some((lo, hi))
    }

    pub fn engine_settings(&self) -> EngineSettings {
        let mut s = EngineSettings::default();
        if let Some(ms) = self.wal.flush_interval_ms {
            s.wal_flush_interval = Duration::from_millis(ms.max(100));
        }
        if let Some(secs) = self.wal.status_interval_secs {
            s.wal_status_interval = Duration::from_secs(secs.max(1));
        }
        if let Some(secs) = self.wal.receiver_timeout_secs {
            s.wal_receiver_timeout = match secs {
                0 => Duration::ZERO,
                secs => Duration::from_secs(secs.clamp(2, 86_400)),
            };
        }
        if let Some(secs) = self.wal.retry_max_secs {
            s.wal_retry_max = Duration::from_secs(secs.max(1));
        }
        if let Some(p) = self.snapshot.upload_parallel {
            s.snapshot_upload_parallel = p.clamp(1, 64);
        }
        if let Some(on) = self.wal.recovery_events {
            s.recovery_events = on;
        }
        if let Some(rows) = self.wal.event_min_rows {
            s.event_min_rows = rows.max(1);
        }
        if let Some(p) = self.restore.parallelism.filter(|p| *p > 0) {
            s.restore_parallelism = p;
        }
        s.os_user = self.restore.os_user.clone();
        if let Some(secs) = self.restore.start_timeout_secs {
            s.start_timeout = Duration::from_secs(secs);
        }
        if let Some(dirs) = &self.postgres.bin_dirs {
            s.pg_bin_dirs = dirs.clone();
        }
        if let Some(secs) = self.jobs.lease_secs {
            s.job_lease = Duration::from_secs(secs.max(1));
        }
        if let Some(secs) = self.gc.grace_secs {
            s.gc_grace = Duration::from_secs(secs);
        }
        s
    }
}

/// The object-store tables one repository location is opened with.
#[derive(Clone, Copy)]
struct ObjectStores<'a> {
    s3: &'a S3Settings,
    azure: &'a AzureSettings,
    gcs: &'a GcsSettings,
}

/// Opens the storage at `location`: a directory, or an `s3://`, `azure://`
/// or `gs://` URL reached as the matching table of `stores` says. Object
/// storage is wrapped in retries with backoff; a local directory fails fast
/// and keeps `min_free` free.
fn open_storage(
    location: &str,
    stores: ObjectStores<'_>,
    min_free: MinFreeSpace,
) -> Result<Arc<dyn Storage>> {
    if location.starts_with("azure://") {
        let c = azure_config(location, stores.azure)?;
        return Ok(Arc::new(RetryingStorage::new(
            AzureStorage::new(c)?,
            stores.azure.tuning.retry_policy(),
        )));
    }
    if location.starts_with("gs://") {
        let c = gcs_config(location, stores.gcs)?;
        return Ok(Arc::new(RetryingStorage::new(
            GcsStorage::new(c)?,
            stores.gcs.tuning.retry_policy(),
        )));
    }
    if location.starts_with("s3://") {
        let c = s3_config(location, stores.s3)?;
        return Ok(Arc::new(RetryingStorage::new(
            S3Storage::new(c)?,
            stores.s3.tuning.retry_policy(),
        )));
    }
    let dir = PathBuf::from(&location);
    let local = LocalStorage::new(&dir)
        .with_context(|| format!("cannot use repository directory {location}"))?
        .with_min_free(min_free);
    Ok(Arc::new(local))
}

/// `s3://bucket/prefix` reached as `s` says, the rest as [`S3Config`] has it.
fn s3_config(location: &str, s: &S3Settings) -> Result<S3Config> {
    let mut c = S3Config::from_url(location)?;
    c.endpoint = s.endpoint.clone();
    if let Some(region) = &s.region {
        c.region = region.clone();
    }
    c.access_key_id = s.access_key_id.clone();
    c.secret_access_key = s.secret_access_key.clone();
    if c.access_key_id.is_some() != c.secret_access_key.is_some() {
        bail!("[s3] access_key_id and secret_access_key must be set together");
    }
    if let Some(on) = s.path_style {
        c.path_style = on;
    }
    if let Some(on) = s.allow_http {
        c.allow_http = on;
    }
    s.tuning.apply(&mut c.tuning);
    c.object_lock = object_lock(s)?;
    Ok(c)
}

/// `[s3] object_lock` and `object_lock_days`, checked together.
fn object_lock(s: &S3Settings) -> Result<Option<ObjectLock>> {
    let mode = match s.object_lock.as_deref() {
        None => {
            if s.object_lock_days.is_some() {
                bail!("[s3] object_lock_days is set without object_lock");
            }
            return Ok(None);
        }
        Some("governance") => LockMode::Governance,
        Some("compliance") => LockMode::Compliance,
        Some(other) => {
            bail!("[s3] object_lock must be \"governance\" or \"compliance\", got {other:?}")
        }
    };
    let days = match s.object_lock_days {
        Some(days) if (1..=36500).contains(&days) => days,
        Some(days) => bail!("[s3] object_lock_days must be between 1 and 36500, got {days}"),
        None => bail!(
            "[s3] object_lock needs object_lock_days: the longest backup or log retention of the repository's instances plus a margin"
        ),
    };
    Ok(Some(ObjectLock { mode, days }))
}

/// `azure://container/prefix` reached as `s` says, the rest as [`AzureConfig`] has it.
fn azure_config(location: &str, s: &AzureSettings) -> Result<AzureConfig> {
    let mut c = AzureConfig::from_url(location)?;
    c.account = s.account.clone();
    c.endpoint = s.endpoint.clone();
    c.use_emulator = s.use_emulator.unwrap_or(false);
    c.access_key = match (&s.access_key, &s.access_key_file) {
        (Some(_), Some(_)) => {
            bail!("[azure] access_key_file and STRATA_AZURE_ACCESS_KEY are alternatives; set one")
        }
        (Some(key), None) => Some(key.trim().to_string()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("[azure] access_key_file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(key) = &c.access_key {
        // A Shared Key is base64; say so without echoing any of it.
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(key);
        if key.is_empty() || decoded.is_err() {
            bail!("[azure] the access key is not a base64 Shared Key (as the portal shows it)");
        }
    }
    s.tuning.apply(&mut c.tuning);
    Ok(c)
}

/// `gs://bucket/prefix` reached as `s` says, the rest as [`GcsConfig`] has it.
fn gcs_config(location: &str, s: &GcsSettings) -> Result<GcsConfig> {
    let mut c = GcsConfig::from_url(location)?;
    c.endpoint = s.endpoint.clone();
    c.use_emulator = s.use_emulator.unwrap_or(false);
    if let Some(path) = &s.service_account_file {
        // Read here so an endpoint can be written into it; its text is
        // never shown, a parse error names only a line and column.
        let key = std::fs::read_to_string(path)
            .with_context(|| format!("[gcs] service_account_file {}", path.display()))?;
        c.service_account_key = Some(key);
    }
    s.tuning.apply(&mut c.tuning);
    Ok(c)
}

impl EncryptionSettings {
    /// What unlocks the repository, if anything is configured.
    pub fn key_source(&self) -> Result<Option<KeySource>> {
        if let Some(path) = &self.key_file {
            return Ok(Some(KeySource::KeyFile(path.clone())));
        }
        match &self.passphrase_env {
            Some(var) => passphrase_from_env(var).map(Some),
            None => Ok(None),
        }
    }
}

/// Reads a passphrase from the environment variable `var`.
pub fn passphrase_from_env(var: &str) -> Result<KeySource> {
    let value = std::env::var(var)
        .with_context(|| format!("the encryption passphrase variable {var} is not set"))?;
    if value.is_empty() {
        bail!("the encryption passphrase variable {var} is empty");
    }
    Ok(KeySource::Passphrase(value.into()))
}

impl S3Settings {
    fn apply_env(&mut self) -> Result<()> {
        let text = |name: &str| std::env::var(name).ok();
        let flag = |name: &str| -> Result<Option<bool>> {
            match std::env::var(name) {
                Ok(v) => match v.as_str() {
                    "1" | "true" | "yes" | "on" => Ok(Some(true)),
                    "0" | "false" | "no" | "off" => Ok(Some(false)),
                    _ => bail!("{name} must be true or false, got {v:?}"),
                },
                Err(_) => Ok(None),
            }
        };
        if let Some(v) = text("STRATA_S3_ENDPOINT") {
            self.endpoint = Some(v);
        }
        if let Some(v) = text("STRATA_S3_REGION") {
            self.region = Some(v);
        }
        if let Some(v) = text("STRATA_S3_ACCESS_KEY_ID") {
            self.access_key_id = Some(v);
        }
        if let Some(v) = text("STRATA_S3_SECRET_ACCESS_KEY") {
            self.secret_access_key = Some(v);
        }
        if let Some(v) = flag("STRATA_S3_PATH_STYLE")? {
            self.path_style = Some(v);
        }
        if let Some(v) = flag("STRATA_S3_ALLOW_HTTP")? {
            self.allow_http = Some(v);
        }
        Ok(())
    }
}

impl GcsSettings {
    fn apply_env(&mut self) -> Result<()> {
        let text = |name: &str| std::env::var(name).ok();
        if let Some(v) = text("STRATA_GCS_SERVICE_ACCOUNT_FILE") {
            self.service_account_file = Some(v.into());
        }
        if let Some(v) = text("STRATA_GCS_ENDPOINT") {
            self.endpoint = Some(v);
        }
        if let Ok(v) = std::env::var("STRATA_GCS_USE_EMULATOR") {
            self.use_emulator = Some(match v.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => bail!("STRATA_GCS_USE_EMULATOR must be true or false, got {v:?}"),
            });
        }
        Ok(())
    }
}

impl AzureSettings {
    fn apply_env(&mut self) -> Result<()> {
        let text = |name: &str| std::env::var(name).ok();
        if let Some(v) = text("STRATA_AZURE_ACCOUNT") {
            self.account = Some(v);
        }
        if let Some(v) = text("STRATA_AZURE_ACCESS_KEY") {
            self.access_key = Some(v);
        }
        if let Some(v) = text("STRATA_AZURE_ACCESS_KEY_FILE") {
            self.access_key_file = Some(v.into());
        }
        if let Some(v) = text("STRATA_AZURE_ENDPOINT") {
            self.endpoint = Some(v);
        }
        if let Ok(v) = std::env::var("STRATA_AZURE_USE_EMULATOR") {
            self.use_emulator = Some(match v.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => bail!("STRATA_AZURE_USE_EMULATOR must be true or false, got {v:?}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod azure_settings_tests {
    use super::*;

    #[test]
    fn azure_settings_reach_the_storage_and_the_key_stays_hidden() {
        let dir = testkit::temp_dir("strata-azure-conf-");
        let key_file = dir.join("azure.key");
        std::fs::write(&key_file, "c2VjcmV0LWtleS1ieXRlcw==\n").unwrap();
        let text = format!(
            "repository = \"azure://backups/prod\"\n[azure]\naccount = \"acct\"\n\
             access_key_file = \"{}\"\nendpoint = \"https://acct.blob.core.chinacloudapi.cn\"\n\
             upload_concurrency = 2\nmax_attempts = 3\n",
            key_file.display()
        );
        let path = dir.join("strata.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        let c = azure_config(&config.repository(), &config.azure).unwrap();
        assert_eq!(
            (c.container.as_str(), c.prefix.as_str()),
            ("backups", "prod")
        );
        assert_eq!(c.account.as_deref(), Some("acct"));
        assert_eq!(c.access_key.as_deref(), Some("c2VjcmV0LWtleS1ieXRlcw=="));
        assert_eq!(c.tuning.upload_concurrency, 2);
        assert_eq!(config.azure.tuning.retry_policy().max_attempts, 3);
        let storage = config.storage().unwrap();
        assert_eq!(
            storage.describe(),
            "azure://backups/prod at https://acct.blob.core.chinacloudapi.cn"
        );
        let shown = format!("{config:?} {c:?} {storage:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");

        // A key that is not base64 is refused without being echoed.
        std::fs::write(&key_file, "not a key!").unwrap();
        let err = format!("{:#}", config.storage().unwrap_err());
        assert!(
            err.contains("not a base64 Shared Key") && !err.contains("not a key!"),
            "{err}"
        );
        // Unknown keys and bad containers are refused.
        std::fs::write(&path, "[azure]\naccess_key = \"x\"\n").unwrap();
        assert!(Config::load(Some(&path)).is_err());
        let bad = AzureSettings::default();
        assert!(azure_config("azure://Bad_Container", &bad).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod object_store_settings_tests {
    use super::*;

    fn load(dir: &Path, text: &str) -> Result<Config> {
        let path = dir.join("strata.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    #[test]
    fn configuration_files_written_before_the_shared_tuning_table_still_parse() {
        let dir = testkit::temp_dir("strata-tuning-conf-");
        let config = load(
            &dir,
            "repository = \"s3://backups/prod\"\n\
             [s3]\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"eu-west-1\"\n\
             path_style = true\nallow_http = true\nmultipart_threshold_mb = 32\n\
             part_size_mb = 16\nmax_concurrency = 3\nupload_concurrency = 2\n\
             request_timeout_secs = 30\nmax_attempts = 4\n\
             [azure]\naccount = \"acct\"\nuse_emulator = true\nmax_concurrency = 5\n\
             upload_concurrency = 6\nrequest_timeout_secs = 7\nmax_attempts = 2\n\
             [regions.eu]\nrepository = \"s3://eu-backups\"\n\
             [regions.eu.s3]\npart_size_mb = 12\nmax_attempts = 9\n",
        )
        .unwrap();
        let s3 = s3_config(&config.repository(), &config.s3).unwrap();
        assert_eq!(s3.region, "eu-west-1");
        const MIB: usize = 1024 * 1024;
        assert_eq!(
            s3.tuning,
            Tuning {
                multipart_threshold: 32 * MIB,
                part_size: 16 * MIB,
                max_concurrency: 3,
                upload_concurrency: 2,
                request_timeout: Duration::from_secs(30),
                ..Tuning::default()
            }
        );
        assert_eq!(config.s3.tuning.retry_policy().max_attempts, 4);
        let azure = azure_config("azure://backups", &config.azure).unwrap();
        assert_eq!(
            azure.tuning,
            Tuning {
                max_concurrency: 5,
                upload_concurrency: 6,
                request_timeout: Duration::from_secs(7),
                ..Tuning::default()
            }
        );
        assert_eq!(config.azure.tuning.retry_policy().max_attempts, 2);
        let region = &config.regions["eu"];
        assert_eq!(region.s3.tuning.part_size_mb, Some(12));
        assert_eq!(region.s3.tuning.retry_policy().max_attempts, 9);
        // Unknown keys are still refused, beside the shared ones or among them.
        for bad in [
            "[s3]\nmax_concurency = 3\n",
            "[azure]\npart_size = 5\n",
            "[gcs]\naccess_key = \"x\"\n",
            "[regions.eu]\nrepository = \"gs://eu-backups\"\n[regions.eu.gcs]\nbucket = \"x\"\n",
        ] {
            let err = format!("{:#}", load(&dir, bad).unwrap_err());
            assert!(err.contains("unknown field"), "{bad}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gcs_settings_reach_the_storage_and_the_key_stays_hidden() {
        let dir = testkit::temp_dir("strata-gcs-conf-");
        let key_file = dir.join("sa.json");
        std::fs::write(
            &key_file,
            "{\"type\": \"service_account\", \"client_email\": \"strata@p.iam.gserviceaccount.com\", \
             \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nc2VjcmV0LWtleS1ieXRlcw==\\n-----END PRIVATE KEY-----\\n\"}",
        )
        .unwrap();
        let text = format!(
            "repository = \"gs://backups/prod\"\n[gcs]\nservice_account_file = \"{}\"\n\
             upload_concurrency = 3\nmax_attempts = 5\n",
            key_file.display()
        );
        let config = load(&dir, &text).unwrap();
        let c = gcs_config(&config.repository(), &config.gcs).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("backups", "prod"));
        assert!(c
            .service_account_key
            .as_deref()
            .unwrap()
            .contains("c2VjcmV0"));
        assert_eq!(c.tuning.upload_concurrency, 3);
        assert_eq!(config.gcs.tuning.retry_policy().max_attempts, 5);
        // The key holds no usable RSA key: refused, and never echoed.
        let shown = match config.storage() {
            Ok(storage) => format!("{config:?} {c:?} {storage:?} {}", storage.describe()),
            Err(e) => format!("{config:?} {c:?} {e:#}"),
        };
        assert!(!shown.contains("c2VjcmV0"), "{shown}");

        // An emulator: no key, its endpoint.
        let config = load(
            &dir,
            "repository = \"gs://backups/prod\"\n[gcs]\nuse_emulator = true\n\
             endpoint = \"http://127.0.0.1:4443\"\n",
        )
        .unwrap();
        assert_eq!(
            config.storage().unwrap().describe(),
            "gs://backups/prod at http://127.0.0.1:4443"
        );
        // Hostile buckets and prefixes are refused before anything is sent.
        for repository in [
            "gs://Backups",
            "gs://goog-backups",
            "gs://back..ups",
            "gs://backups/../other",
            "gs://backups/a\u{1b}[2Jb",
        ] {
            assert!(
                gcs_config(repository, &GcsSettings::default()).is_err(),
                "{repository:?}"
            );
        }
        // A missing key file is named, not guessed at.
        let missing = GcsSettings {
            service_account_file: Some(dir.join("absent.json")),
            ..GcsSettings::default()
        };
        let err = format!("{:#}", gcs_config("gs://backups", &missing).unwrap_err());
        assert!(err.contains("service_account_file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod node_id_tests {
    use super::*;

    #[test]
    fn a_node_id_is_generated_once_and_kept_in_the_data_dir() {
        let dir = testkit::temp_dir("strata-node-id-");
        let config = Config {
            data_dir: Some(dir.join("data")),
            ..Config::default()
        };
        let id = config.node_id().unwrap();
        assert!(valid_node_id(&id) && id.starts_with("node-"), "{id}");
        let stored = std::fs::read_to_string(dir.join("data/node-id")).unwrap();
        assert_eq!(stored.trim(), id);
        assert_eq!(config.node_id().unwrap(), id, "a restart keeps its id");
        // A configured id wins and writes nothing; a damaged file is refused.
        let named = Config {
            node: NodeConfig {
                id: Some("backup-1".into()),
                lease_secs: None,
            },
            ..config.clone()
        };
        assert_eq!(named.node_id().unwrap(), "backup-1");
        std::fs::write(dir.join("data/node-id"), "bad id\n").unwrap();
        assert!(config.node_id().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn node_settings_are_checked() {
        let dir = testkit::temp_dir("strata-node-conf-");
        let load = |text: &str| {
            let path = dir.join("strata.toml");
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path))
        };
        for bad in [
            "[node]\nlease_secs = 7\n",
            "[node]\nlease_secs = 301\n",
            "[node]\nid = \"a b\"\n",
            "[node]\nid = \"a=b\"\n",
            "[node]\nid = \"../x\"\n",
            "[node]\nid = \"a'b\"\n",
            "[node]\nid = \"a\\nb\"\n",
            "[node]\nid = \"\"\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
        let long = format!("[node]\nid = \"{}\"\n", "n".repeat(65));
        assert!(load(&long).is_err(), "a 65-byte node id was accepted");
        let longest = format!("[node]\nid = \"{}\"\n", "n".repeat(64));
        assert_eq!(load(&longest).unwrap().node.id, Some("n".repeat(64)));
        let c = load("[node]\nid = \"n-1\"\nlease_secs = 8\n").unwrap();
        let s = c.service_settings().unwrap();
        assert_eq!((s.node.id.as_str(), s.node.lease.as_secs()), ("n-1", 8));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod kms_tests {
    use super::*;

    #[test]
    fn kms_settings_never_print_their_secret_and_refuse_hostile_values() {
        let good = KmsSettings {
            endpoint: Some("http://127.0.0.1:4566".into()),
            region: Some("eu-west-1".into()),
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("kms-very-secret".into()),
        };
        assert!(!format!("{good:?}").contains("very-secret"));
        let kms = good.client().unwrap().unwrap();
        assert!(!format!("{kms:?}").contains("very-secret"));
        assert!(KmsSettings::default().client().unwrap().is_none());
        let bad = |f: &dyn Fn(&mut KmsSettings)| {
            let mut s = good.clone();
            f(&mut s);
            s.client().err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(bad(&|s| s.endpoint = Some("file:///etc/passwd".into())).contains("http"));
        assert!(bad(&|s| s.region = Some("eu\nwest".into())).contains("kms.region"));
        assert!(bad(&|s| s.access_key_id = Some("AK\"ID".into())).contains("access_key_id"));
        assert!(bad(&|s| s.secret_access_key = None).contains("both"));
        assert!(bad(&|s| s.secret_access_key = Some("a\nb".into())).contains("secret_access_key"));
        let orphan = KmsSettings {
            region: Some("us-east-1".into()),
            ..Default::default()
        };
        assert!(orphan.client().is_err());
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn object_lock_settings_are_checked_together() {
        let s = |lock: Option<&str>, days: Option<u32>| S3Settings {
            object_lock: lock.map(str::to_string),
            object_lock_days: days,
            ..S3Settings::default()
        };
        assert_eq!(object_lock(&s(None, None)).unwrap(), None);
        assert_eq!(
            object_lock(&s(Some("compliance"), Some(40))).unwrap(),
            Some(ObjectLock {
                mode: LockMode::Compliance,
                days: 40
            })
        );
        for (lock, days, why) in [
            (Some("governance"), None, "needs object_lock_days"),
            (Some("governance"), Some(0), "between 1 and 36500"),
            (
                Some("Governance"),
                Some(5),
                "\"governance\" or \"compliance\"",
            ),
            (None, Some(5), "without object_lock"),
        ] {
            let err = object_lock(&s(lock, days)).unwrap_err().to_string();
            assert!(err.contains(why), "{lock:?} {days:?}: {err}");
        }
    }

    #[test]
    fn s3_settings_never_print_their_secret() {
        let settings = S3Settings {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI-very-secret".into()),
            ..S3Settings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(
            shown.contains("<hidden>") && shown.contains("AKIDEXAMPLE"),
            "{shown}"
        );
        let unset = format!("{:?}", S3Settings::default());
        assert!(unset.contains("secret_access_key: None"), "{unset}");
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<Config> {
        let dir = testkit::temp_dir("strata-limits-conf-");
        let path = dir.join("strata.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(Some(&path));
        let _ = std::fs::remove_dir_all(&dir);
        config
    }

    #[test]
    fn stream_and_job_limits_are_bounded_and_zero_turns_them_off() {
        let huge = load(&format!(
            "[wal]\nreceiver_timeout_secs = {}\n[jobs]\nkeep_days = {}\n",
            i64::MAX,
            i64::MAX
        ))
        .unwrap();
        assert_eq!(
            huge.engine_settings().wal_receiver_timeout,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            huge.service_settings().unwrap().job_keep,
            Some(chrono::Duration::days(36_500))
        );
        let small = load("[wal]\nreceiver_timeout_secs = 1\n").unwrap();
        assert_eq!(
            small.engine_settings().wal_receiver_timeout,
            Duration::from_secs(2)
        );
        let off = load("[wal]\nreceiver_timeout_secs = 0\n[jobs]\nkeep_days = 0\n").unwrap();
        assert_eq!(off.engine_settings().wal_receiver_timeout, Duration::ZERO);
        assert_eq!(off.service_settings().unwrap().job_keep, None);
        // Not numbers, or below zero: refused, not read as something else.
        for bad in [
            "[wal]\nreceiver_timeout_secs = -1\n",
            "[wal]\nreceiver_timeout_secs = \"60\"\n",
            "[jobs]\nkeep_days = \"../90\"\n",
            "[jobs]\nkeep_days = 1e3\n",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }
}
