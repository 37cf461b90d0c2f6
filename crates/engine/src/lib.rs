//! Strata's engine: the jobs that move data between PostgreSQL servers and the
//! repository — full backups over the replication protocol, uploads of
//! snapshot backups from the agent on the database host, continuous WAL
//! archiving from a replication slot, restores (latest or point in time),
//! verification and catalog reindexing. The CLI and the service both drive
//! these through [`Engine`].
#![warn(missing_docs)]

mod archive;
mod archive_tar;
mod backup;
mod beneath;
mod blocking;
mod catalog_retry;
mod connect;
mod contents;
mod copy;
mod delta;
mod encryption;
mod entities;
mod error;
mod events;
mod import;
mod import_pgbackrest;
mod incremental;
pub mod local_server;
mod names;
mod progress;
mod reindex;
mod restore;
mod retention;
mod segment;
mod silence;
mod snapshot;
mod snapshot_clone;
mod snapshot_restore;
mod snapshot_upload;
mod wal_uploader;

use std::path::PathBuf;
use std::sync::Arc;

use strata_catalog::Catalog;
use strata_repo::Repository;

pub use archive::{slot_name, WalReceiveOptions};
pub use archive_tar::BackupArchive;
/// Exposed for the fuzz target over the server's backup_manifest.
pub use backup::check_server_manifest;
pub use backup::BackupOptions;
pub use backup::PendingBackup;
pub use catalog_retry::{retry_busy, CATALOG_OUTAGE_WAIT};
pub use connect::{connection_verified, connection_warnings, instance_password, ServerFacts};
pub use copy::{
    copy_backup_set, copy_histories, copy_instance_record, copy_wal_segment, CopiedBlocks,
    CopyReport,
};
pub use delta::DeltaReport;
pub use encryption::{BackupEncryption, LockedDomain};
pub use error::{EngineError, EngineResult};
pub use events::{EventFilter, RecoveryEvent, EVENT_KINDS};
pub use import::PendingImport;
pub use local_server::{as_user, LocalServer, ServerUse, StartOptions};
pub use progress::{NoProgress, Progress};
pub use reindex::{ReindexReport, UnrestoredPasswordEnv};
pub use restore::{chown_tree, RecoveryTarget, RestoreIndex, RestoreOptions, RestoreOutcome};
pub use retention::{
    decide_retention, newest_success, pitr_anchor, plan_retention, GcGuard, KeptBy,
    RetentionDecision, RetentionPlan, SetDecision,
};
pub use snapshot_clone::{AgentCloneOptions, AgentCloneOutcome};
pub use snapshot_restore::open_dir_no_links;
pub use snapshot_restore::LocalSnapshot;
pub use snapshot_upload::{snapshot_label, SnapshotBase, SnapshotUpload, UploadReport};
pub use strata_kms;

/// Hands the allocator's free memory back to the system: glibc keeps up to
/// its trim threshold free at the top of each arena (16 MiB, set by
/// `strata`'s `main`), which a long-running process should not hold on to
/// after work that allocated much, such as a backup.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that is free; it may be
    // called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Engine {
    /// The same engine reading and writing `repo` instead (a cross-region
    /// target).
    pub fn with_repository(&self, repo: Repository) -> Engine {
        Engine {
            repo,
            ..self.clone()
        }
    }

    /// Takes over jobs of other processes whose lease expired (their owner
    /// stopped renewing for longer than `job_lease`), failing them and their
    /// running backup sets; returns how many. Leases are wall-clock facts,
    /// so this uses the real time, never a test clock.
    pub fn fail_expired_jobs(&self) -> EngineResult<usize> {
        let lease =
            chrono::Duration::from_std(self.settings.job_lease).unwrap_or(chrono::Duration::MAX);
        Ok(self.catalog.fail_expired_jobs(chrono::Utc::now(), lease)?)
    }

    /// How often a process renews the leases of the jobs it runs: a sixth
    /// of the lease, so a few missed renewals (a busy catalog) never let a
    /// live job expire.
    pub fn lease_renewal_interval(&self) -> std::time::Duration {
        (self.settings.job_lease / 6).max(std::time::Duration::from_millis(100))
    }
}

/// Knobs the engine takes from the configuration file.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How often the partial WAL segment is written to the repository.
    pub wal_flush_interval: std::time::Duration,
    /// How often a standby status update is sent while streaming.
    pub wal_status_interval: std::time::Duration,
    /// How long a server may send nothing on a WAL stream (or a base
    /// backup's data stream) before the connection is given up; at half of
    /// it Strata asks the server to answer. Zero: never.
    pub wal_receiver_timeout: std::time::Duration,
    /// Longest wait between two attempts of a failing WAL receiver; the
    /// wait doubles from 2 s up to this.
    pub wal_retry_max: std::time::Duration,
    /// Files restored at once.
    pub restore_parallelism: usize,
    /// Directories searched for PostgreSQL server binaries (`postgres`,
    /// `pg_ctl`); `{major}` is replaced by the major version.
    pub pg_bin_dirs: Vec<String>,
    /// OS user that owns restored data directories and runs restored servers
    /// (needed when Strata runs as root; PostgreSQL refuses root).
    pub os_user: Option<String>,
    /// Seconds to wait for a started server to finish recovery.
    pub start_timeout: std::time::Duration,
    /// How long a repository hold (the catalog row keeping garbage
    /// collection and backups or readers apart) outlives its last renewal;
    /// renewed every quarter of it while held.
    pub repo_hold_ttl: std::time::Duration,
    /// How long a job stays owned by a process that stopped renewing its
    /// lease before another process takes it over and fails it.
    pub job_lease: std::time::Duration,
    /// How long a pack must have been unreferenced, as seen by an earlier
    /// garbage collection, before a collection deletes it.
    pub gc_grace: std::time::Duration,
    /// Files of a snapshot read from the agent at once while it is uploaded.
    pub snapshot_upload_parallel: usize,
    /// Whether WAL receivers decode recovery events (destructive
    /// transactions) and read the names of the server's relations.
    pub recovery_events: bool,
    /// Rows one transaction must delete or update in one table to be a
    /// recovery event.
    pub event_min_rows: u64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            wal_flush_interval: std::time::Duration::from_millis(200),
            wal_status_interval: std::time::Duration::from_secs(10),
            wal_receiver_timeout: std::time::Duration::from_secs(60),
            wal_retry_max: std::time::Duration::from_secs(60),
            // Twice the cores: restoring waits on file creation and writes
            // as much as on the CPU.
            restore_parallelism: 2 * std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            pg_bin_dirs: vec!["/usr/lib/postgresql/{major}/bin".into()],
            os_user: None,
            start_timeout: std::time::Duration::from_secs(300),
            repo_hold_ttl: std::time::Duration::from_secs(60),
            job_lease: strata_catalog::DEFAULT_JOB_LEASE,
            gc_grace: std::time::Duration::from_secs(3600),
            snapshot_upload_parallel: 4,
            recovery_events: true,
            event_min_rows: 1000,
        }
    }
}

/// The major version of the `postgres` binary in `dir` (from `--version`,
/// e.g. "postgres (PostgreSQL) 16.4").
fn server_major(dir: &std::path::Path) -> Option<u32> {
    tool_major(&dir.join("postgres"))
}

/// The major version a PostgreSQL program reports with `--version`.
fn tool_major(program: &std::path::Path) -> Option<u32> {
    let out = std::process::Command::new(program)
        .env_clear()
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split(')').nth(1)?.trim();
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The engine: a catalog, a repository and settings, shared by every job.
#[derive(Clone)]
pub struct Engine {
    /// The catalog the jobs record in.
    catalog: Arc<dyn Catalog>,
    /// The repository the jobs read and write.
    repo: Repository,
    /// Knobs from the configuration.
    settings: EngineSettings,
    /// The key management service of instances with encrypted backups.
    kms: Option<Arc<strata_kms::Kms>>,
}

impl Engine {
    /// An engine over `catalog` and `repo`. The catalog handle's owner
    /// keeps `settings.job_lease` on the jobs it runs from now on.
    pub fn new(catalog: Arc<dyn Catalog>, repo: Repository, settings: EngineSettings) -> Self {
        catalog.set_job_lease(settings.job_lease);
        Engine {
            catalog,
            repo,
            settings,
            kms: None,
        }
    }

    /// The catalog the jobs record in (shared with whoever else holds the
    /// `Arc`, e.g. the service's scheduler).
    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.catalog
    }

    /// The repository the jobs read and write.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The knobs this engine was built with.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// This engine with another repository (same catalog and settings), e.g.
    /// the same store seen through a fault-injecting or retrying layer.
    pub fn with_repo(&self, repo: Repository) -> Engine {
        Engine {
            repo,
            ..self.clone()
        }
    }

    /// This engine with `settings` in place of its own (same catalog and
    /// repository; the catalog handle's job lease becomes theirs).
    pub fn with_settings(&self, settings: EngineSettings) -> Engine {
        self.catalog.set_job_lease(settings.job_lease);
        Engine {
            settings,
            ..self.clone()
        }
    }

    /// An instance as the repository recorded it when it was registered
    /// (no password; the variable holding it only from an encrypted
    /// repository): what is known of an instance deregistered since,
    /// whose sets remain. `None` when the repository has no record.
    pub fn recorded_instance(
        &self,
        instance_id: &str,
    ) -> EngineResult<Option<strata_catalog::Instance>> {
        self.repo
            .read_instance(instance_id)?
            .map(|rec| entities::instance_from_record(&rec, self.repo.is_encrypted()))
            .transpose()
    }

    /// Registers an instance in the catalog and records it in the repository
    /// (without its password) so a rebuilt catalog knows it.
    pub fn add_instance(&self, instance: &strata_catalog::Instance) -> EngineResult<()> {
        // Slot names fold case and punctuation (and are cut at 63 bytes):
        // two instances must never share one.
        if strata_catalog::Instance::owns_user_backup(&instance.id) {
            return Err(EngineError::Refused(format!(
                "instance ids starting with {:?} name user backups; choose another id",
                strata_catalog::USER_BACKUP_OWNER_PREFIX
            )));
        }
        let slot = slot_name(&instance.id);
        if let Some(other) = self
            .catalog
            .list_instances()?
            .into_iter()
            .find(|o| o.id != instance.id && slot_name(&o.id) == slot)
        {
            return Err(EngineError::Refused(format!(
                "instance id {:?} would share the replication slot {slot} with instance {:?}; choose an id that differs in more than case and punctuation",
                instance.id, other.id
            )));
        }
        self.catalog.add_instance(instance)?;
        self.repo
            .put_instance(&entities::instance_record(instance))?;
        Ok(())
    }

    /// Names the environment variable `instance_id`'s password is read
    /// from (`None`: the password stored with it, if any), in the catalog
    /// and in the repository's record of it.
    pub fn set_password_env(
        &self,
        instance_id: &str,
        variable: Option<String>,
    ) -> EngineResult<strata_catalog::Instance> {
        if let Some(v) = &variable {
            if !strata_catalog::Instance::valid_env_name(v) {
                return Err(EngineError::Refused(format!(
                    "{v:?} is not an environment variable name (letters, digits and '_', not starting with a digit)"
                )));
            }
        }
        self.change_instance(instance_id, |i| i.password_env = variable)
    }

    /// Changes how the connection to `instance_id` is protected: its
    /// sslmode and, when given, the CA certificate checked (`Some(None)`
    /// removes it), in the catalog and in the repository's record.
    pub fn set_tls(
        &self,
        instance_id: &str,
        sslmode: strata_catalog::SslMode,
        sslrootcert: Option<Option<String>>,
    ) -> EngineResult<strata_catalog::Instance> {
        self.change_instance(instance_id, |i| {
            i.sslmode = sslmode;
            if let Some(cert) = sslrootcert {
                i.sslrootcert = cert;
            }
        })
    }

    /// Changes a registered instance in the catalog and in the
    /// repository's record of it.
    fn change_instance(
        &self,
        instance_id: &str,
        change: impl FnOnce(&mut strata_catalog::Instance),
    ) -> EngineResult<strata_catalog::Instance> {
        let mut instance = self.catalog.get_instance(instance_id)?;
        change(&mut instance);
        self.catalog.update_instance(&instance)?;
        self.repo
            .put_instance(&entities::instance_record(&instance))?;
        Ok(instance)
    }

    /// A PostgreSQL client program (`psql`, `pg_dump`, `pg_restore`,
    /// `pg_amcheck`…) that can work with a server of major version `major`:
    /// the same major's, else the oldest newer one found in the configured
    /// directories.
    pub fn client_tool(&self, name: &str, major: u32) -> EngineResult<PathBuf> {
        for m in major..=major + 10 {
            for pattern in &self.settings.pg_bin_dirs {
                let dir = PathBuf::from(pattern.replace("{major}", &m.to_string()));
                let tool = dir.join(name);
                if tool.is_file() && tool_major(&tool) == Some(m) {
                    return Ok(tool);
                }
            }
        }
        Err(EngineError::Refused(format!(
            "no {name} for PostgreSQL {major} or newer found (searched: {}); set [postgres] bin_dirs in the configuration",
            self.settings.pg_bin_dirs.join(", ")
        )))
    }

    /// Locates the directory with `postgres` and `pg_ctl` for a major version.
    pub fn pg_bin_dir(&self, major: u32) -> EngineResult<PathBuf> {
        for pattern in &self.settings.pg_bin_dirs {
            let dir = PathBuf::from(pattern.replace("{major}", &major.to_string()));
            if dir.join("pg_ctl").is_file() && server_major(&dir) == Some(major) {
                return Ok(dir);
            }
        }
        Err(EngineError::Refused(format!(
            "no PostgreSQL {major} server binaries found (searched: {}); set [postgres] bin_dirs in the configuration",
            self.settings.pg_bin_dirs.join(", ")
        )))
    }
}

impl Engine {
    /// A 32-byte key every node sharing the catalog agrees on (the download
    /// link key), kept in the catalog under `name`. Sealed there under the
    /// repository's data key when the repository is encrypted
    /// (`sealed:<hex>`), so the catalog alone does not reveal it; otherwise
    /// `plain:<hex>`, as readable as the access keys' secrets beside it.
    /// The first node to ask stores `candidate`; every node gets that one.
    pub fn shared_key(&self, name: &str, candidate: &[u8; 32]) -> EngineResult<[u8; 32]> {
        let stored = match self.repo.seal_secret(candidate, name)? {
            Some(sealed) => format!("sealed:{}", hex::encode(sealed)),
            None => format!("plain:{}", hex::encode(candidate)),
        };
        let value = self.catalog.shared_secret(name, &stored)?;
        let bad = |why: &str| {
            EngineError::Catalog(strata_catalog::CatalogError::Invalid(format!(
                "shared secret {name}: {why}"
            )))
        };
        let (form, text) = value.split_once(':').ok_or_else(|| bad("no form prefix"))?;
        let bytes = hex::decode(text).map_err(|_| bad("not hex"))?;
        let key = match form {
            "sealed" => self.repo.open_secret(&bytes, name)?,
            "plain" => bytes,
            other => return Err(bad(&format!("unknown form {other:?}"))),
        };
        key.try_into().map_err(|_| bad("not 32 bytes"))
    }
}
