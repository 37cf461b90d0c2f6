//! Strata's configuration: one typed struct, read from TOML (`--config FILE`
//! or `./strata.toml`), with environment overrides; with neither, embedded
//! defaults keep everything under `./strata-data`. Every key is listed in the
//! README's configuration table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use strata_engine::EngineSettings;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root for the default repository and catalog locations.
    pub data_dir: Option<PathBuf>,
    /// Repository directory (default `<data_dir>/repo`).
    pub repository: Option<PathBuf>,
    /// SQLite catalog file (default `<data_dir>/catalog.db`).
    pub catalog: Option<PathBuf>,
    /// zstd level for new blocks and WAL (default 1).
    pub compress_level: Option<i32>,
    pub wal: WalConfig,
    pub restore: RestoreConfig,
    pub postgres: PostgresConfig,
    pub server: ServerConfig,
    pub scheduler: SchedulerConfig,
    pub instances: InstancesConfig,
    pub drills: DrillsConfig,
    pub downloads: DownloadsConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadsConfig {
    /// How long download links stay valid, in seconds (default 3600).
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
    /// Ports they may use, `LOW-HIGH` (default 15432-15531).
    pub port_range: Option<String>,
    /// `listen_addresses` of clones (default 127.0.0.1).
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DrillsConfig {
    /// Restore-drill every successful backup (default true).
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address `strata serve` listens on (default 127.0.0.1:8080).
    pub listen: Option<String>,
    /// PEM certificate chain; with `tls_key`, the API is served over HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Seconds between scheduler rounds (default 1).
    pub tick_secs: Option<u64>,
    /// Seconds between retention passes (default 300).
    pub retention_interval_secs: Option<u64>,
    /// Read limit for automatic backups in kB/s (default: none).
    pub backup_max_rate_kb: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// How often the partial WAL segment is stored, in milliseconds (default 200).
    pub flush_interval_ms: Option<u64>,
    /// How often the WAL receiver reports its position to the server, in seconds (default 10).
    pub status_interval_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreConfig {
    /// Files written at once (default: twice the number of CPUs).
    pub parallelism: Option<usize>,
    /// OS user owning restored data and running restored servers (default: `postgres` when run as root).
    pub os_user: Option<String>,
    /// Seconds to wait for a started server to finish recovery (default 600).
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
            config.repository = Some(v.into());
        }
        if let Ok(v) = std::env::var("STRATA_CATALOG") {
            config.catalog = Some(v.into());
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
        if config.instances.port_range.is_some() && config.instance_ports().is_none() {
            bail!(
                "[instances] port_range must be LOW-HIGH, e.g. 15432-15531, got {:?}",
                config.instances.port_range.as_deref().unwrap_or_default()
            );
        }
        if config.server.tls_cert.is_some() != config.server.tls_key.is_some() {
            bail!("[server] tls_cert and tls_key must be set together");
        }
        if let Some(level) = config.compress_level {
            if !(1..=19).contains(&level) {
                bail!("compress_level must be between 1 and 19, got {level}");
            }
        }
        Ok(config)
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

    pub fn repository_dir(&self) -> PathBuf {
        self.repository
            .clone()
            .unwrap_or_else(|| self.data_dir().join("repo"))
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.catalog
            .clone()
            .unwrap_or_else(|| self.data_dir().join("catalog.db"))
    }

    pub fn listen(&self) -> String {
        self.server
            .listen
            .clone()
            .unwrap_or_else(|| "127.0.0.1:8080".into())
    }

    pub fn service_settings(&self) -> strata_service::ServiceSettings {
        let mut s = strata_service::ServiceSettings::default();
        if let Some(t) = self.scheduler.tick_secs {
            s.tick = Duration::from_secs(t.max(1));
        }
        if let Some(t) = self.scheduler.retention_interval_secs {
            s.retention_interval = chrono::Duration::seconds(t.max(1) as i64);
        }
        s.backup_max_rate_kb = self.scheduler.backup_max_rate_kb;
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
        s
    }

    /// `[instances] port_range`, checked by [`Config::load`].
    fn instance_ports(&self) -> Option<(u16, u16)> {
        let (lo, hi) = self.instances.port_range.as_deref()?.split_once('-')?;
        let (lo, hi) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
        (lo <= hi && lo > 0).then_some((lo, hi))
    }

    pub fn engine_settings(&self) -> EngineSettings {
        let mut s = EngineSettings::default();
        let mut lock = self.catalog_path().into_os_string();
        lock.push(".lock");
        s.lock_path = Some(lock.into());
        if let Some(ms) = self.wal.flush_interval_ms {
            s.wal_flush_interval = Duration::from_millis(ms.max(100));
        }
        if let Some(secs) = self.wal.status_interval_secs {
            s.wal_status_interval = Duration::from_secs(secs.max(1));
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
        s
    }
}
