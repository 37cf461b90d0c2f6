//! The local instance provider: PostgreSQL servers Strata restores from
//! backups and runs itself — clones (`CloneDBInstance`, registered as new
//! instances, kept until `DeleteDBInstance`) and scratch servers (for
//! restoring single databases and for restore drills, removed when done).
//! Data directories live under the service's instances directory, servers
//! run as the unprivileged OS user on a port from the configured range.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pg_wal::Lsn;
use strata_catalog::{
    BackupId, BackupStatus, Instance, InstanceId, JobId, JobKind, ManagedInstance, SslMode,
};
use strata_engine::{
    EngineError, LocalServer, NoProgress, RecoveryTarget, RestoreOptions, ServerUse, StartOptions,
};

use crate::pg_client::{ident, ClientConn};
use crate::policy::{invalid, Refusal};
use crate::tables::DbSpec;
use crate::window::{check_restore_time, WindowOf};

use crate::{Service, ServiceResult};

/// What to restore: a backup set, a point in time or an exact target, or
/// a set with either (that set, recovered to that point).
#[derive(Debug, Clone, Default)]
pub struct RestoreSource {
    /// The set to restore.
    pub backup_id: Option<BackupId>,
    /// The time to recover to.
    pub restore_time: Option<DateTime<Utc>>,
    /// A transaction or WAL position to recover to (never with a time).
    pub exact: Option<ExactTarget>,
}

/// A transaction or a WAL position, and the side of it recovery stops on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactTarget {
    /// Where.
    pub point: ExactPoint,
    /// Just after it (PostgreSQL's `recovery_target_inclusive`, on by
    /// default) or just before it.
    pub inclusive: bool,
}

/// A point in the WAL named exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExactPoint {
    /// A transaction's commit.
    Xid(u32),
    /// A WAL position.
    Lsn(Lsn),
}

impl ExactTarget {
    /// The engine's recovery target.
    pub fn recovery_target(&self) -> RecoveryTarget {
        let inclusive = self.inclusive;
        match self.point {
            ExactPoint::Xid(xid) => RecoveryTarget::Xid { xid, inclusive },
            ExactPoint::Lsn(lsn) => RecoveryTarget::Lsn { lsn, inclusive },
        }
    }
}

/// Which backup sets outlive a deleted instance (RDS's
/// `ReleasedKeepPolicy`): they stay detached, listed by
/// `DescribeDetachedBackups` and restorable by `CloneDBInstance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleasedKeep {
    /// None (but sets kept by hand).
    None,
    /// The newest successful set.
    Latest,
    /// Every set.
    All,
}

/// The instance a restore starts from, and whether it is detached: no
/// longer registered, known only by its kept sets and its record in the
/// repository.
struct RestoreSourceInstance {
    instance: Instance,
    detached: bool,
}

/// How to create a new instance from backups: which set and target, and
/// which repository and index to read (the primary's, or a region's copies).
pub(crate) struct CloneRequest {
    pub backup_id: Option<BackupId>,
    pub target: RecoveryTarget,
    pub restore_time: Option<DateTime<Utc>>,
    pub major: u32,
    pub engine: strata_engine::Engine,
    pub index: Option<strata_engine::RestoreIndex>,
    /// Job kind recorded: [`JobKind::Clone`] or [`JobKind::DdrRestore`].
    pub job_kind: JobKind,
    /// The snapshot set still on the database host to clone there through
    /// the source's agent (`None`: a restore from the repository here).
    pub on_host: Option<strata_catalog::BackupSet>,
    /// Only these databases, under their new names (`RecoveryDBInstance`):
    /// the others are dropped before the instance is reported running.
    /// `None`: every database, as it was.
    pub databases: Option<Vec<DbSpec>>,
}

/// A server restored for a short task, stopped and removed by
/// [`Scratch::remove`]. It runs on a configuration Strata wrote, without
/// network, reached over a Unix socket in a directory only Strata and the
/// server's OS user can enter.
pub struct Scratch {
    /// Its directory (Strata's), holding the data and socket directories.
    pub dir: PathBuf,
    /// The private directory of its Unix socket.
    socket_dir: PathBuf,
    /// Its port (names its socket; no TCP listener).
    pub port: u16,
    /// Its PostgreSQL major version.
    pub major: u32,
    /// Bootstrap superuser of the restored cluster.
    pub superuser: String,
    /// The set it was restored from.
    pub backup_id: BackupId,
    bin: PathBuf,
    /// `psql` of the server's major version or newer.
    psql_tool: PathBuf,
    os_user: Option<String>,
}

/// Session settings Strata's own connections to a scratch server send at
/// start: they win over settings stored for roles and databases in the
/// restored catalog, so that catalog cannot load libraries into the session
/// or (from PostgreSQL 17) fire event triggers on Strata's commands.
fn scratch_session_options(major: u32) -> String {
    let mut o = String::from(
        "-c session_preload_libraries= -c local_preload_libraries= -c jit=off -c search_path=pg_catalog",
    );
    if major >= 17 {
        o.push_str(" -c event_triggers=off");
    }
    o
}

fn random_suffix(n: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

impl Service {
    /// Checks a restore source against the instance's backups and
    /// recoverable window; returns the recovery target to use.
    pub fn check_restore_source(
        &self,
        instance_id: &str,
        src: &RestoreSource,
    ) -> ServiceResult<(Option<BackupId>, RecoveryTarget)> {
        let backups = self.engine.catalog().list_backups(instance_id)?;
        let chosen = match &src.backup_id {
            Some(id) => {
                let b = backups
                    .iter()
                    .find(|b| &b.id == id && b.status == BackupStatus::Success)
                    .ok_or_else(|| strata_catalog::CatalogError::BackupNotFound(id.to_string()))?;
                Some(b.clone())
            }
            None => None,
        };
        let target = match (src.restore_time, src.exact, &chosen) {
            (Some(_), Some(_), _) => {
                return Err(invalid(
                    Refusal::ConflictingParameters,
                    "RestoreTime and a transaction or LSN target name two different points; give one",
                ))
            }
            (None, Some(exact), _) => {
                let target = exact.recovery_target();
                self.engine
                    .check_target(instance_id, src.backup_id.as_deref(), &target)?;
                target
            }
            (Some(t), None, _) => {
                check_restore_time(
                    self.recovery_window(instance_id)?,
                    t,
                    WindowOf::Instance(instance_id),
                )?;
                if let Some(b) = &chosen {
                    if b.finished_at.is_some_and(|f| f > t) {
                        return Err(invalid(
                            Refusal::ConflictingParameters,
                            format!("backup {} ends after RestoreTime; choose an older backup or a later time", b.id),
                        ));
                    }
                }
                RecoveryTarget::Time(t)
            }
            // A backup set alone: recover just to its consistency point.
            (None, None, Some(_)) => RecoveryTarget::Immediate,
            (None, None, None) => {
                return Err(invalid(
                    Refusal::MissingParameter,
                    "specify BackupId, RestoreTime, a transaction or LSN target, or a backup with either",
                ))
            }
        };
        Ok((src.backup_id.clone(), target))
    }

    /// A free port from the configured range, used by no managed instance.
    fn free_port(&self) -> ServiceResult<u16> {
        let taken: Vec<u16> = self
            .engine
            .catalog()
            .list_managed()?
            .iter()
            .map(|m| m.port)
            .collect();
        let (lo, hi) = self.settings.local_ports;
        // A random start keeps two servers being set up at once apart.
        let span = (hi - lo) as u32 + 1;
        let offset = rand::random::<u32>() % span;
        (0..span)
            .map(|i| lo + ((offset + i) % span) as u16)
            .filter(|p| !taken.contains(p))
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .ok_or_else(|| {
                EngineError::Refused(format!("no free port left in {lo}-{hi} for a new instance"))
                    .into()
            })
    }

    pub(crate) fn pg_major(
        &self,
        instance_id: &str,
        backup_id: Option<&str>,
    ) -> ServiceResult<u32> {
        let version = match backup_id {
            Some(b) => self.engine.catalog().get_backup(b)?.pg_version_num,
            None => {
                self.engine
                    .catalog()
                    .get_instance(instance_id)?
                    .pg_version_num
            }
        };
        version.map(|v| v / 10000).ok_or_else(|| {
            EngineError::Refused(format!(
                "the PostgreSQL version of {instance_id} is not known yet"
            ))
            .into()
        })
    }

    /// The instance a restore starts from: a registered one, or one
    /// deregistered since whose backup sets were kept (detached), as the
    /// repository recorded it.
    fn restore_source_instance(&self, source_id: &str) -> ServiceResult<RestoreSourceInstance> {
        let missing = match self.engine.catalog().get_instance(source_id) {
            Ok(instance) => {
                return Ok(RestoreSourceInstance {
                    instance,
                    detached: false,
                })
            }
            Err(e @ strata_catalog::CatalogError::InstanceNotFound(_)) => e,
            Err(e) => return Err(e.into()),
        };
        if self.engine.catalog().list_backups(source_id)?.is_empty() {
            return Err(missing.into());
        }
        match self.engine.recorded_instance(source_id)? {
            Some(instance) => Ok(RestoreSourceInstance {
                instance,
                detached: true,
            }),
            None => Err(missing.into()),
        }
    }

    /// Starts restoring a new instance from `source_id`'s backups and
    /// returns its id at once; the instance shows `Creating` until it runs.
    pub fn clone_instance(
        self: &Arc<Self>,
        source_id: &str,
        src: RestoreSource,
    ) -> ServiceResult<InstanceId> {
        let source = self.restore_source_instance(source_id)?;
        if source.detached
            && (src.backup_id.is_none() || src.restore_time.is_some() || src.exact.is_some())
        {
            return Err(invalid(
                Refusal::ConflictingParameters,
                format!("instance {source_id} is no longer registered: its kept backup sets restore to their consistency point; give BackupId alone"),
            ));
        }
        let (backup_id, target) = self.check_restore_source(source_id, &src)?;
        let major = self.pg_major(source_id, backup_id.as_deref())?;
        let has_agent = source.instance.agent_url.is_some();
        let on_host = if has_agent {
            let backups = self.engine.catalog().list_backups(source_id)?;
            crate::agent_clones::local_snapshot_for(&backups, backup_id.as_ref(), src.restore_time)
        } else {
            None
        };
        let (id, _, _) = self.launch_clone(
            source_id,
            CloneRequest {
                backup_id,
                target,
                restore_time: src.restore_time,
                major,
                engine: self.engine.clone(),
                index: None,
                job_kind: JobKind::Clone,
                on_host,
                databases: None,
            },
        )?;
        Ok(id)
    }

    /// Registers a new instance (`Creating`) and restores it in the
    /// background as `req` says; returns its id, port and job at once.
    pub(crate) fn launch_clone(
        self: &Arc<Self>,
        source_id: &str,
        req: CloneRequest,
    ) -> ServiceResult<(InstanceId, u16, JobId)> {
        let source = self.restore_source_instance(source_id)?.instance;
        let CloneRequest {
            backup_id,
            target,
            restore_time,
            major,
            engine,
            index,
            job_kind,
            on_host,
            databases,
        } = req;
        // The local binaries are needed on the host too: a clone whose
        // snapshot is pruned meanwhile is restored here.
        self.engine.pg_bin_dir(major)?;
        let id = InstanceId::new(format!("pgc-{}", random_suffix(12)));
        let port = self.free_port()?;
        let dir = self.settings.instances_dir.join(id.as_str());
        let host = match &on_host {
            Some(_) => self.agent_host(&source)?,
            None => "127.0.0.1".to_string(),
        };
        let managed = ManagedInstance {
            instance_id: id.clone(),
            source_instance: source_id.into(),
            backup_id: backup_id.clone(),
            restore_time,
            // On the host: the agent's path, recorded once the clone is made.
            data_dir: match &on_host {
                Some(_) => String::new(),
                None => dir.join("pgdata").display().to_string(),
            },
            port,
            pg_major: major,
            status: "Creating".into(),
            error: None,
            created_at: Utc::now(),
            agent_clone: on_host.as_ref().map(|_| id.to_string()),
        };
        // Marked as managed first, so the scheduler leaves it alone until it runs.
        self.engine.catalog().put_managed(&managed)?;
        match self.engine.add_instance(&Instance {
            password_env: source.password_env.clone(),
            password: source.password.clone(),
            dbname: source.dbname.clone(),
            ..Instance::new(&id, &host, port, &source.user, SslMode::Prefer)
        }) {
            Ok(()) => {}
            // Registered in the catalog; only its record in the primary
            // repository is missing. A restore from another region's copies
            // is what runs when the primary repository is lost, so it goes on.
            Err(EngineError::Repo(e)) => tracing::warn!(
                instance = %id,
                "the new instance's record could not be written to the repository: {e}"
            ),
            Err(e) => {
                let _ = self.engine.catalog().delete_managed(&id);
                return Err(e.into());
            }
        }
        let mut job = self
            .engine
            .catalog()
            .create_job(job_kind, Some(source_id))?;
        job.detail = match &on_host {
            Some(set) => format!(
                "clone of snapshot {} on the database host ({host}) to new instance {id} on port {port}",
                set.id
            ),
            None => format!("restore to new instance {id} on port {port}"),
        };
        if let Some(specs) = &databases {
            job.detail = format!(
                "{}, keeping only {}",
                job.detail,
                crate::tables::describe(specs)
            );
        }
        job.backup_id = backup_id.clone();
        self.engine.catalog().update_job(&job)?;
        let job_id = job.id;
        let svc = Arc::clone(self);
        let source_id = source_id.to_string();
        tokio::spawn(async move {
            let listen = svc.settings.local_listen.clone();
            let agent_target = target.clone();
            let restore = move || {
                let socket_dir = prepare_instance_dir(&dir, engine.os_user().as_deref())?;
                engine
                    .restore(
                        &source_id,
                        &RestoreOptions {
                            target_dir: dir.join("pgdata"),
                            delta: false,
                            backup_id,
                            target,
                            start: Some(StartOptions {
                                port,
                                listen_addresses: Some(listen),
                                socket_dir: Some(socket_dir),
                                usage: ServerUse::Copy,
                            }),
                            job_id: Some(job_id),
                            index,
                        },
                        &NoProgress,
                    )
                    .map(|o| crate::agent_clones::Made {
                        backup_id: o.backup_id,
                        neutralized: o.neutralized,
                    })
            };
            let run = match on_host {
                Some(set) => {
                    let made = svc
                        .make_on_agent(
                            &source,
                            &managed.instance_id,
                            set,
                            agent_target,
                            job_id,
                            restore,
                        )
                        .await;
                    if let Err(e) = &made {
                        crate::fail_job(&svc.engine, job_id, &e.to_string());
                    }
                    Ok(made)
                }
                None => tokio::task::spawn_blocking(restore).await,
            };
            let mut m = match svc.engine.catalog().get_managed(&managed.instance_id) {
                Ok(Some(m)) => m,
                _ => return,
            };
            // Databases not asked for go before anyone is told it runs.
            let run = match (run, databases) {
                (Ok(Ok(outcome)), Some(specs)) => {
                    let pruner = Arc::clone(&svc);
                    let id = managed.instance_id.clone();
                    match tokio::task::spawn_blocking(move || {
                        pruner.keep_only_databases(&id, major, &specs)
                    })
                    .await
                    {
                        Ok(Ok(())) => Ok(Ok(outcome)),
                        Ok(Err(e)) => {
                            // Its server does not go on serving what was not asked for.
                            svc.stop_local(&managed);
                            crate::fail_job(&svc.engine, job_id, &e.to_string());
                            Ok(Err(e.to_string()))
                        }
                        Err(e) => Err(e),
                    }
                }
                (run, _) => run.map(|made| made.map_err(|e| e.to_string())),
            };
            match run {
                Ok(Ok(outcome)) => {
                    m.status = "Running".into();
                    m.backup_id = Some(outcome.backup_id.clone());
                    tracing::info!(instance = %m.instance_id, port = m.port, "clone running");
                    if !outcome.neutralized.is_empty() {
                        note_neutralized(&svc.engine, job_id, &outcome.neutralized);
                    }
                    crate::finish_job(&svc.engine, job_id, Some(outcome.backup_id));
                }
                Ok(Err(e)) => {
                    m.status = "Failed".into();
                    m.error = Some(e.to_string());
                    tracing::warn!(instance = %m.instance_id, "clone failed: {e}");
                }
                Err(e) => {
                    m.status = "Failed".into();
                    m.error = Some(format!("restore task: {e}"));
                    crate::fail_job(&svc.engine, job_id, &format!("restore task: {e}"));
                }
            }
            let _ = svc.engine.catalog().put_managed(&m);
        });
        Ok((id, port, job_id))
    }

    /// Stops and removes an instance Strata created; its backup sets and
    /// WAL go too but for what `keep` keeps (and sets kept by hand).
    pub async fn delete_instance(
        &self,
        instance_id: &str,
        keep: ReleasedKeep,
    ) -> ServiceResult<()> {
        let Some(mut m) = self.engine.catalog().get_managed(instance_id)? else {
            self.engine.catalog().get_instance(instance_id)?;
            return Err(invalid(
                Refusal::NotCreatedByStrata,
                format!("instance {instance_id} was registered, not created by Strata: deregister it with StrataDeregisterDBInstance instead"),
            ));
        };
        if m.status == "Creating" {
            return Err(EngineError::Conflict(format!(
                "instance {instance_id} is still being created; delete it once it is Running or Failed"
            ))
            .into());
        }
        let previous = std::mem::replace(&mut m.status, "Deleting".into());
        self.engine.catalog().put_managed(&m)?;
        if let Some(name) = m.agent_clone.clone() {
            // Gone from the host first: a clone Strata forgot would run on.
            if let Err(e) = self.delete_agent_clone(&m, &name).await {
                m.status = previous;
                self.engine.catalog().put_managed(&m)?;
                return Err(e);
            }
        }
        self.deregister_instance(instance_id).await?;
        if m.agent_clone.is_none() {
            self.stop_local(&m);
        }
        let dir = Path::new(&m.data_dir)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&m.data_dir));
        if m.agent_clone.is_none() && dir.starts_with(&self.settings.instances_dir) {
            std::fs::remove_dir_all(&dir)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(EngineError::io(format!("removing {}", dir.display())))?;
        }
        if keep != ReleasedKeep::All {
            // Sets kept by hand stay, with the WAL they need to be consistent.
            let now = Utc::now();
            let backups = self.engine.catalog().list_backups(instance_id)?;
            let newest =
                strata_engine::newest_success(&backups).filter(|_| keep == ReleasedKeep::Latest);
            let mut kept = Vec::new();
            for b in backups {
                if b.kept_at(now) || newest.as_ref() == Some(&b.id) {
                    kept.extend(b.start_lsn.zip(b.stop_lsn));
                } else if b.status != BackupStatus::Running {
                    self.engine.delete_backup_set(&b.id)?;
                }
            }
            self.delete_wal_beyond(instance_id, &kept)?;
            self.housekeeping.request_gc();
        }
        self.engine.catalog().delete_managed(instance_id)?;
        Ok(())
    }

    fn local_server(&self, m: &ManagedInstance) -> ServiceResult<LocalServer> {
        Ok(LocalServer {
            bin: self.engine.pg_bin_dir(m.pg_major)?,
            data_dir: PathBuf::from(&m.data_dir),
            os_user: self.engine.os_user(),
        })
    }

    fn stop_local(&self, m: &ManagedInstance) {
        if let Err(e) = self.local_server(m).and_then(|s| Ok(s.stop(false)?)) {
            tracing::warn!(instance = %m.instance_id, "stopping the server: {e}");
        }
    }

    /// Removes scratch servers a previous process left behind (killed in
    /// the middle of a drill or a table restore): stops them and deletes
    /// their directories.
    pub fn remove_stale_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(&self.settings.instances_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let is_scratch = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("scratch-"));
            if !is_scratch {
                continue;
            }
            let pgdata = dir.join("pgdata");
            if pgdata.join("postmaster.pid").exists() {
                let major = std::fs::read_to_string(pgdata.join("PG_VERSION"))
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
                if let Some(bin) = major.and_then(|m| self.engine.pg_bin_dir(m).ok()) {
                    let server = LocalServer {
                        bin,
                        data_dir: pgdata.clone(),
                        os_user: self.engine.os_user(),
                    };
                    if let Err(e) = server.stop(true) {
                        tracing::warn!(
                            "stopping the stale scratch server in {}: {e}",
                            dir.display()
                        );
                    }
                }
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!("removed stale scratch server {}", dir.display()),
                Err(e) => tracing::warn!("cannot remove {}: {e}", dir.display()),
            }
        }
    }

    /// Starts every `Running` instance Strata created whose server is down
    /// (after a host restart, say).
    pub fn start_local_instances(&self) {
        let Ok(all) = self.engine.catalog().list_managed() else {
            return;
        };
        // One still being created when the last server stopped never will be.
        for mut m in all.iter().filter(|m| m.status == "Creating").cloned() {
            m.status = "Failed".into();
            m.error = Some("the server stopped while this instance was being created".into());
            let _ = self.engine.catalog().put_managed(&m);
        }
        // Clones on database hosts are their agents' to run.
        for m in all
            .into_iter()
            .filter(|m| m.status == "Running" && m.agent_clone.is_none())
        {
            if Path::new(&m.data_dir).join("postmaster.pid").exists() {
                continue;
            }
            let log = Path::new(&m.data_dir).join("strata-restore.log");
            let started = self.local_server(&m).and_then(|s| {
                Ok(s.start(
                    &log,
                    "",
                    Some(std::time::Duration::from_secs(120)),
                    ServerUse::Copy,
                )?)
            });
            match started {
                Ok(()) => tracing::info!(instance = %m.instance_id, "started"),
                Err(e) => tracing::warn!(instance = %m.instance_id, "could not start: {e}"),
            }
        }
    }

    /// Whether the scheduler may back up and archive an instance: instances
    /// Strata is still creating (or failed to create, or is deleting) wait.
    pub(crate) fn is_ready(&self, instance_id: &str) -> bool {
        match self.engine.catalog().get_managed(instance_id) {
            Ok(Some(m)) => m.status == "Running",
            _ => true,
        }
    }

    /// Restores `instance_id` into a scratch server (blocking): a private
    /// socket directory (0700), no TCP listener, no network, a port from the
    /// range.
    pub fn start_scratch(
        &self,
        instance_id: &str,
        src: &RestoreSource,
        job_id: JobId,
    ) -> ServiceResult<Scratch> {
        let (backup_id, target) = self.check_restore_source(instance_id, src)?;
        let major = self.pg_major(instance_id, backup_id.as_deref())?;
        let bin = self.engine.pg_bin_dir(major)?;
        let psql_tool = self.engine.client_tool("psql", major)?;
        let port = self.free_port()?;
        let dir = self
            .settings
            .instances_dir
            .join(format!("scratch-{}", random_suffix(10)));
        let os_user = self.engine.os_user();
        let socket_dir = prepare_instance_dir(&dir, os_user.as_deref())?;
        let outcome = self.engine.restore(
            instance_id,
            &RestoreOptions {
                target_dir: dir.join("pgdata"),
                delta: false,
                backup_id,
                target,
                start: Some(StartOptions {
                    port,
                    listen_addresses: None,
                    socket_dir: Some(socket_dir.clone()),
                    usage: ServerUse::Scratch,
                }),
                job_id: Some(job_id),
                index: None,
            },
            &NoProgress,
        );
        let mut scratch = Scratch {
            dir,
            socket_dir,
            port,
            major,
            superuser: String::new(),
            backup_id: BackupId::default(),
            bin,
            psql_tool,
            os_user,
        };
        match outcome {
            Ok(o) => scratch.backup_id = o.backup_id,
            Err(e) => {
                scratch.remove();
                return Err(e.into());
            }
        }
        let user = self.engine.catalog().get_instance(instance_id)?.user;
        let probe = ClientConn {
            user,
            ..scratch.conn()
        };
        let found = while_starting(|| {
            probe.names(
                &scratch.psql_tool,
                "postgres",
                "SELECT rolname FROM pg_roles WHERE oid = 10",
            )
        });
        match found {
            Ok(names) if names.len() == 1 => scratch.superuser = names[0].clone(),
            other => {
                scratch.remove();
                return Err(match other {
                    Err(e) => e,
                    Ok(_) => {
                        EngineError::Failed("the scratch server has no bootstrap superuser".into())
                            .into()
                    }
                });
            }
        }
        Ok(scratch)
    }
}

impl Scratch {
    /// Strata's connection to the scratch server: its private socket, as
    /// the bootstrap superuser, with [`scratch_session_options`].
    pub(crate) fn conn(&self) -> ClientConn {
        ClientConn {
            host: self.socket_dir.display().to_string(),
            port: self.port,
            user: self.superuser.clone(),
            password: None,
            sslmode: None,
            sslrootcert: None,
            options: Some(scratch_session_options(self.major)),
            label: "the scratch server".into(),
        }
    }

    /// Runs SQL as the superuser; returns psql's unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> ServiceResult<String> {
        self.conn().run(&self.psql_tool, db, sql, false)
    }

    /// The text values of a one-column query, read back exactly.
    pub fn names(&self, db: &str, sql: &str) -> ServiceResult<Vec<String>> {
        self.conn().names(&self.psql_tool, db, sql)
    }

    /// Disables the restored catalog's event triggers in `db` before Strata
    /// runs DDL there (commands on event triggers fire none themselves).
    /// From PostgreSQL 17 the session setting `event_triggers` already does.
    pub fn disarm(&self, db: &str) -> ServiceResult<()> {
        let triggers = self.names(
            db,
            "SELECT evtname FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D'",
        )?;
        if triggers.is_empty() {
            return Ok(());
        }
        let sql: String = triggers
            .iter()
            .map(|t| format!("ALTER EVENT TRIGGER {} DISABLE;", ident(t)))
            .collect();
        self.conn().run(&self.psql_tool, db, &sql, true)?;
        Ok(())
    }

    /// The `psql` Strata uses on this server.
    pub(crate) fn psql_tool(&self) -> &Path {
        &self.psql_tool
    }

    /// Stops the server and removes everything.
    pub fn remove(self) {
        let pgdata = self.dir.join("pgdata");
        let server = LocalServer {
            bin: self.bin.clone(),
            data_dir: pgdata.clone(),
            os_user: self.os_user.clone(),
        };
        if let Err(e) = server.stop(true) {
            tracing::warn!("stopping the scratch server in {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let tblspc = PathBuf::from(format!("{}.tblspc", pgdata.display()));
        let _ = std::fs::remove_dir_all(tblspc);
    }
}

/// Asks `ask` again for a while as long as the server answers that it is
/// still starting: recovery has ended when a restore returns, but the
/// postmaster may refuse sessions for a moment more ("not yet accepting
/// connections").
pub(crate) fn while_starting<T>(mut ask: impl FnMut() -> ServiceResult<T>) -> ServiceResult<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let answer = ask();
        let starting = matches!(&answer, Err(e) if e.to_string().contains("accepting connections")
            || e.to_string().contains("Hot standby mode is disabled")
            || e.to_string().contains("starting up"));
        if !starting || std::time::Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Creates the directory of an instance Strata restores: owned by Strata
/// (0711: the server's OS user may pass, not change it), so nobody else can
/// swap the data directory Strata writes as root for a link; and inside it
/// the server's socket directory (0700, the server's OS user's). Returns
/// the socket directory.
fn prepare_instance_dir(dir: &Path, os_user: Option<&str>) -> Result<PathBuf, EngineError> {
    use std::os::unix::fs::DirBuilderExt;
    let mode = if os_user.is_some() { 0o711 } else { 0o700 };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir.parent().unwrap_or(dir))
        .map_err(EngineError::io(format!("creating {}", dir.display())))?;
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .map_err(EngineError::io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(
        EngineError::io(format!("setting mode of {}", dir.display())),
    )?;
    let socket_dir = dir.join("socket");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&socket_dir)
        .map_err(EngineError::io(format!(
            "creating {}",
            socket_dir.display()
        )))?;
    if let Some(user) = os_user {
        strata_engine::chown_tree(&socket_dir, user)?;
    }
    Ok(socket_dir)
}

/// Adds what was removed from a clone's configuration to its job's detail.
fn note_neutralized(engine: &strata_engine::Engine, job_id: JobId, names: &[String]) {
    if let Ok(mut job) = engine.catalog().get_job(job_id) {
        job.detail = format!(
            "{}; source settings not kept (they run commands, load code, name paths or open listeners): {}",
            job.detail,
            names.join(", ")
        );
        let _ = engine.catalog().update_job(&job);
    }
}
