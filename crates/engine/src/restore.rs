//! Restore: materialize a backup set into a new data directory, stage the WAL
//! recovery needs, write recovery settings and optionally start PostgreSQL
//! and wait until the recovery target is reached.
//!
//! Targets are checked against the catalog before anything is written and
//! confirmed against the decoded WAL while it is staged, so a target outside
//! the recoverable window is refused with a clear message instead of a
//! server that stops with "recovery ended before configured recovery target
//! was reached". Staged WAL goes straight into `pg_wal/` (PostgreSQL falls
//! back to it when `restore_command` finds nothing), so the restored
//! directory needs no Strata to recover. Reference for the recovery
//! settings: PostgreSQL's xlogrecovery.c and the "Recovery Target" docs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pg_wal::decode::{WalDecoder, WalEvent};
use pg_wal::history::TimelineHistory;
use pg_wal::{history_file_name, Lsn, SegmentNo, TimelineId, WalGeometry};
use serde::Serialize;
use strata_catalog::{
    BackupId, BackupSet, BackupStatus, JobId, JobKind, JobState, RestorePointRow, WalSegmentRow,
};
use strata_repo::{BackupManifest, BlockRef, FileEntry, FileKind};

use crate::beneath::Beneath;
use crate::catalog_retry::retry_busy;
use crate::delta::{self, DeltaReport};
use crate::local_server::{self, LocalServer, ServerUse, StartOptions};
use crate::{Engine, EngineError, EngineResult, Progress};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryTarget {
    /// The end of the archived WAL.
    Latest,
    /// Stop as soon as the backup is consistent (`recovery_target = 'immediate'`).
    Immediate,
    /// The last commit at or before a time.
    Time(DateTime<Utc>),
    /// A WAL position (`recovery_target_lsn`).
    Lsn {
        /// The position.
        lsn: Lsn,
        /// Stop after the first record at or past it (PostgreSQL's
        /// default), or just before it.
        inclusive: bool,
    },
    /// A transaction (`recovery_target_xid`).
    Xid {
        /// The transaction id.
        xid: u32,
        /// Stop just after its commit (PostgreSQL's default), or just
        /// before it, leaving it and everything after undone.
        inclusive: bool,
    },
    /// A named restore point (`pg_create_restore_point`).
    Name(String),
}

impl std::fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryTarget::Latest => write!(f, "the end of the archived WAL"),
            RecoveryTarget::Immediate => write!(f, "the backup's consistency point"),
            RecoveryTarget::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            RecoveryTarget::Lsn {
                lsn,
                inclusive: true,
            } => write!(f, "LSN {lsn}"),
            RecoveryTarget::Lsn {
                lsn,
                inclusive: false,
            } => write!(f, "just before LSN {lsn}"),
            RecoveryTarget::Xid {
                xid,
                inclusive: true,
            } => write!(f, "just after transaction {xid}"),
            RecoveryTarget::Xid {
                xid,
                inclusive: false,
            } => write!(f, "just before transaction {xid}"),
            RecoveryTarget::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

/// What to restore, where, and whether to start it.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The new data directory (absent or empty), or with `delta` an
    /// existing data directory of the same cluster.
    pub target_dir: PathBuf,
    /// Restore over the data directory in `target_dir`, writing only the
    /// blocks that differ from the backup and removing what it does not
    /// have (see [`crate::delta`]).
    pub delta: bool,
    /// The set to restore (default: the newest that reaches `target`).
    pub backup_id: Option<BackupId>,
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// Start the restored server and wait for recovery (`None`: files only).
    pub start: Option<StartOptions>,
    /// A job the caller created and will finish itself (clones, scratch
    /// servers); by default the restore records and finishes its own
    /// `restore` job. Either way a failure is recorded on the job.
    pub job_id: Option<JobId>,
    /// The backup sets and WAL to choose from when they are not the
    /// catalog's own rows for the instance (a cross-region copy, read from
    /// the engine's repository); `None` for the catalog's.
    pub index: Option<RestoreIndex>,
}

/// Backup sets, WAL segments and restore points a restore plans with.
#[derive(Debug, Clone, Default)]
pub struct RestoreIndex {
    /// Backup sets to choose from.
    pub backups: Vec<BackupSet>,
    /// WAL objects to stage.
    pub wal: Vec<WalSegmentRow>,
    /// Named restore points, for `Name` targets.
    pub restore_points: Vec<RestorePointRow>,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    /// The set restored.
    pub backup_id: BackupId,
    /// The data directory written.
    pub target_dir: PathBuf,
    /// Where recovery was told to stop, in words.
    pub target: String,
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
    /// WAL segments staged.
    pub wal_segments: u64,
    /// End of the WAL staged for recovery.
    pub wal_end: Lsn,
    /// The port of the started server, when started.
    pub started_port: Option<u16>,
    /// The server's log line saying where recovery stopped, when started.
    pub recovery_stop: Option<String>,
    /// Settings of the source removed before the start (see
    /// [`crate::local_server::is_neutralized`]).
    pub neutralized: Vec<String>,
    /// What a delta restore reused, wrote and removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaReport>,
}

/// A WAL object chosen for staging.
pub(crate) struct StagedSegment {
    pub(crate) row: WalSegmentRow,
    pub(crate) segno: SegmentNo,
}

impl Engine {
    /// Restores `instance_id` as `opts` says. Runs on the calling thread
    /// (file writes are spread over `restore_parallelism` threads).
    pub fn restore(
        &self,
        instance_id: &str,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> EngineResult<RestoreOutcome> {
        self.restore_from(instance_id, opts, None, progress)
    }

    /// [`Engine::restore`] of the set `local` found still on this host
    /// (see [`Engine::local_snapshot`]): its files reflinked from the
    /// snapshot instead of read from the repository.
    pub fn restore_local_snapshot(
        &self,
        instance_id: &str,
        opts: &RestoreOptions,
        local: &crate::LocalSnapshot,
        progress: &dyn Progress,
    ) -> EngineResult<RestoreOutcome> {
        self.restore_from(instance_id, opts, Some(local), progress)
    }

    fn restore_from(
        &self,
        instance_id: &str,
        opts: &RestoreOptions,
        local: Option<&crate::LocalSnapshot>,
        progress: &dyn Progress,
    ) -> EngineResult<RestoreOutcome> {
        // Sets and WAL of an instance with encrypted backups open only with
        // its data key, unwrapped by the KMS now.
        self.for_instance_blocking(instance_id)?.restore_in_domain(
            instance_id,
            opts,
            local,
            progress,
        )
    }

    fn restore_in_domain(
        &self,
        instance_id: &str,
        opts: &RestoreOptions,
        local: Option<&crate::LocalSnapshot>,
        progress: &dyn Progress,
    ) -> EngineResult<RestoreOutcome> {
        // A restore from the repository needs the instance's sets only, so
        // sets kept after their instance was deregistered restore too; a
        // snapshot on the database host needs the instance's agent.
        let snapshot = match local {
            Some(local) => Some((local, self.catalog.get_instance(instance_id)?)),
            None => None,
        };
        if snapshot.is_none() {
            if let Err(unknown) = self.catalog.get_instance(instance_id) {
                // Neither registered nor with sets kept: nothing to restore,
                // and no job to record for it.
                if self.catalog.list_backups(instance_id)?.is_empty() {
                    return Err(unknown.into());
                }
            }
        }
        self.fail_expired_jobs()?;
        // Garbage collection stays off the packs this restore reads until
        // it ends, whatever becomes of the set meanwhile.
        let _reading = self.hold_gc_blocking()?;
        // A port that is taken would fail the start only after every file
        // is written: find out first.
        if let Some(start) = &opts.start {
            crate::local_server::check_listen_port(start)?;
        }
        let (created, existing) = if opts.delta {
            if local.is_some() {
                return Err(EngineError::Refused(
                    "a delta restore reads the repository; a snapshot on this host is reflinked into an empty directory instead".into(),
                ));
            }
            (false, Some(delta::check_target(&opts.target_dir)?))
        } else {
            (prepare_target_dir(&opts.target_dir)?, None)
        };
        let (mut job, own_job) = match opts.job_id {
            Some(id) => (self.catalog.get_job(id)?, false),
            None => (
                self.catalog
                    .create_job(JobKind::Restore, Some(instance_id))?,
                true,
            ),
        };
        job.state = JobState::Preparing;
        if own_job {
            job.detail = format!("restore to {}", opts.target_dir.display());
        }
        retry_busy("recording a restore job's start", || {
            self.catalog.update_job(&job)
        })?;
        let result = match &snapshot {
            Some((local, instance)) => {
                self.run_snapshot_restore(instance, opts, local, progress, &mut job)
            }
            None => self.run_restore(instance_id, opts, existing, progress, &mut job),
        };
        // A delta restore cannot take back what it changed in a directory
        // it did not create: it says the directory is left unusable.
        let result = result.map_err(|e| match e {
            e if opts.delta && delta::marker_present(&opts.target_dir) => {
                EngineError::Failed(format!(
                    "{e}; the delta restore left {} unusable: its global/pg_control is moved to {} so that PostgreSQL will not start it; run the delta restore again, or restore into an empty directory",
                    opts.target_dir.display(),
                    delta::DELTA_MARKER
                ))
            }
            e => e,
        });
        match &result {
            Ok(_) if !own_job => {}
            Ok(_) => {
                job.finished_at = Some(Utc::now());
                job.state = JobState::Finished;
                job.progress = 100;
            }
            Err(e) => {
                job.finished_at = Some(Utc::now());
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
                // A failed start keeps the directory for its log; anything
                // earlier leaves nothing behind (but the directory a delta
                // restore went over is the user's).
                if !opts.delta && !matches!(e, EngineError::RestoredServer(_)) {
                    clean_target_dir(&opts.target_dir, created);
                }
            }
        }
        let _ = retry_busy("recording a restore job's end", || {
            self.catalog.update_job(&job)
        });
        result
    }

    fn run_restore(
        &self,
        instance_id: &str,
        opts: &RestoreOptions,
        existing: Option<u64>,
        progress: &dyn Progress,
        job: &mut strata_catalog::Job,
    ) -> EngineResult<RestoreOutcome> {
        let index = match &opts.index {
            Some(index) => index.clone(),
            None => self.restore_index(instance_id)?,
        };
        // Plan the WAL first: refusing a target must not cost a full restore.
        let plan = self.plan_restore(instance_id, index, opts, progress)?;
        let RestorePlan {
            backup,
            manifest,
            geometry,
            histories,
            wal: staged_wal,
            wal_end,
            gap,
        } = &plan;
        if let (Some(g), RecoveryTarget::Latest) = (gap, &opts.target) {
            progress.message(&format!(
                "warning: the archived WAL after backup {} has a gap at {g}; recovering up to the gap",
                backup.id
            ));
        }

        let removed = match existing {
            Some(system_identifier) => {
                delta::check_same_system(&opts.target_dir, system_identifier, manifest)?;
                self.prepare_delta(manifest, &opts.target_dir, progress)?
            }
            None => 0,
        };

        job.state = JobState::Uploading;
        retry_busy("recording a restore job's state", || {
            self.catalog.update_job(job)
        })?;
        // The WAL is staged (and decoded) on its own thread while the files
        // are written: writing waits on the disk, decoding on the CPU.
        let (materialized, staged) = std::thread::scope(|scope| {
            let wal = scope.spawn(|| {
                self.stage_wal(
                    staged_wal,
                    histories,
                    *geometry,
                    &opts.target_dir,
                    &opts.target,
                    manifest,
                )
            });
            let files = self.materialize(manifest, &opts.target_dir, opts.delta, progress);
            let staged = wal
                .join()
                .unwrap_or_else(|_| Err(EngineError::Failed("staging the WAL panicked".into())));
            (files, staged)
        });
        let Materialized {
            files,
            bytes,
            mut delta,
            control,
        } = materialized?;
        let found = staged?;

        job.state = JobState::Checking;
        job.progress = 90;
        retry_busy("recording a restore job's state", || {
            self.catalog.update_job(job)
        })?;
        let target = confirm_target(opts.target.clone(), &found, manifest, *gap)?;

        let neutralized =
            write_recovery_settings(&opts.target_dir, &backup.id, &target, opts.start.as_ref())?;
        self.hand_over(&opts.target_dir, manifest)?;
        if let Some((control, mode)) = control {
            delta::install_control(
                &opts.target_dir,
                &control,
                mode & FILE_MODE_MASK,
                self.os_user().as_deref(),
            )?;
        }
        if let Some(d) = &mut delta {
            d.removed = removed;
        }

        let mut outcome = RestoreOutcome {
            backup_id: backup.id.clone(),
            target_dir: opts.target_dir.clone(),
            target: target.to_string(),
            files,
            bytes,
            wal_segments: staged_wal.len() as u64,
            wal_end: *wal_end,
            started_port: None,
            recovery_stop: None,
            neutralized,
            delta,
        };
        if let Some(start) = &opts.start {
            outcome.recovery_stop =
                self.start_restored(manifest, &opts.target_dir, start, &target, progress)?;
            outcome.started_port = Some(start.port);
        }
        Ok(outcome)
    }

    /// Checks `target` against `instance_id`'s catalog before a restore is
    /// started in the background: the set asked for ends before it, or some
    /// set does; a transaction committed in the archived WAL (as the
    /// segments' commit xid ranges tell). The restore checks it again
    /// against the decoded WAL.
    pub fn check_target(
        &self,
        instance_id: &str,
        backup_id: Option<&str>,
        target: &RecoveryTarget,
    ) -> EngineResult<()> {
        let index = self.restore_index(instance_id)?;
        let backups: Vec<BackupSet> = index
            .backups
            .into_iter()
            .filter(|b| b.status == BackupStatus::Success)
            .collect();
        choose_backup(
            instance_id,
            &backups,
            &index.wal,
            &index.restore_points,
            backup_id,
            target,
            None,
        )?;
        Ok(())
    }

    /// The backup sets, WAL and restore points of `instance_id` in the catalog.
    fn restore_index(&self, instance_id: &str) -> EngineResult<RestoreIndex> {
        Ok(RestoreIndex {
            backups: self.catalog.list_backups(instance_id)?,
            wal: self.catalog.list_wal_segments(instance_id)?,
            restore_points: self.catalog.list_restore_points(instance_id)?,
        })
    }

    /// Chooses the backup for the target and the WAL to stage from `index`,
    /// reading the backup's manifest and the timeline histories from the
    /// repository; refuses a target the archived WAL cannot reach before
    /// anything is written.
    fn plan_restore(
        &self,
        instance_id: &str,
        index: RestoreIndex,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> EngineResult<RestorePlan> {
        let RestoreIndex {
            backups,
            wal,
            restore_points,
        } = index;
        if let Some(local) = backups.iter().find(|b| {
            opts.backup_id.as_deref() == Some(b.id.as_str())
                && b.status == BackupStatus::Success
                && !b.in_repository()
        }) {
            return Err(EngineError::Refused(format!(
                "backup {} is a snapshot on the database host that is not uploaded to the repository yet; clone it through the instance's agent, or restore it once its upload is done",
                local.id
            )));
        }
        // A repository restore reads sets the repository has: a snapshot
        // counts once uploaded.
        let backups: Vec<BackupSet> = backups.into_iter().filter(|b| b.in_repository()).collect();
        let commit = match (&opts.target, backups.last()) {
            (RecoveryTarget::Xid { xid, .. }, Some(newest)) => {
                Some(self.locate_commit(instance_id, newest, &wal, *xid)?)
            }
            _ => None,
        };
        let backup = choose_backup(
            instance_id,
            &backups,
            &wal,
            &restore_points,
            opts.backup_id.as_deref(),
            &opts.target,
            commit,
        )?
        .clone();
        progress.message(&format!(
            "restoring backup {} of {instance_id} to {}, recovering to {}",
            backup.id,
            opts.target_dir.display(),
            opts.target
        ));
        let manifest = self.repo.read_manifest(instance_id, &backup.id)?;
        let geometry = WalGeometry::new(manifest.wal_segment_size)
            .map_err(|e| EngineError::Failed(format!("backup {}: {e}", backup.id)))?;
        let histories = self.load_histories(instance_id)?;
        let staged = plan_wal(&manifest, geometry, &wal, &histories)?;
        let wal_end = staged.last().map(|s| s.row.end_lsn).unwrap_or(Lsn::INVALID);
        let gap = check_wal_reach(&manifest, &wal, wal_end, &opts.target)?;
        Ok(RestorePlan {
            backup,
            manifest,
            geometry,
            histories,
            wal: staged,
            wal_end,
            gap,
        })
    }

    /// Where the newest commit of transaction `xid` in the archived WAL
    /// starts, decoded from the segments whose commit xid range holds it
    /// (newest first). `any_set` gives the WAL geometry.
    fn locate_commit(
        &self,
        instance_id: &str,
        any_set: &BackupSet,
        wal: &[WalSegmentRow],
        xid: u32,
    ) -> EngineResult<Lsn> {
        let candidates = commit_candidates(wal, xid);
        if candidates.is_empty() {
            return Err(EngineError::Refused(format!(
                "transaction {xid} did not commit in the archived WAL"
            )));
        }
        let manifest = self.repo.read_manifest(instance_id, &any_set.id)?;
        let geometry = WalGeometry::new(manifest.wal_segment_size)
            .map_err(|e| EngineError::Failed(format!("backup {}: {e}", any_set.id)))?;
        for row in candidates {
            let (meta, data) = self.read_wal_row(row)?;
            let start = geometry.segment_start(geometry.segment_of(row.begin_lsn));
            let events = WalDecoder::new(geometry, start).feed(&data).map_err(|e| {
                EngineError::Failed(format!("WAL segment {} does not decode: {e}", meta.segment))
            })?;
            let commit = events
                .iter()
                .filter_map(|e| match e {
                    WalEvent::Commit { xid: x, lsn, .. } if *x == xid => Some(*lsn),
                    _ => None,
                })
                .max();
            if let Some(lsn) = commit {
                return Ok(lsn);
            }
        }
        Err(EngineError::Refused(format!(
            "transaction {xid} did not commit in the archived WAL"
        )))
    }

    /// Gives the restored directories to the OS user the server runs as
    /// and makes everything written durable.
    fn hand_over(&self, target_dir: &Path, manifest: &BackupManifest) -> EngineResult<()> {
        if let Some(user) = &self.os_user() {
            chown_tree(target_dir, user)?;
            for ts in &manifest.tablespaces {
                chown_tree(&tablespace_dir(target_dir, ts.oid), user)?;
            }
        }
        // One sync for everything written (files, WAL, settings), so the
        // restore is durable when it returns, started or not.
        sync_filesystem(target_dir)?;
        for ts in &manifest.tablespaces {
            sync_filesystem(&tablespace_dir(target_dir, ts.oid))?;
        }
        Ok(())
    }

    /// Starts the restored server and waits until recovery reached
    /// `target`; returns the server's line saying where it stopped.
    fn start_restored(
        &self,
        manifest: &BackupManifest,
        target_dir: &Path,
        start: &StartOptions,
        target: &RecoveryTarget,
        progress: &dyn Progress,
    ) -> EngineResult<Option<String>> {
        let major = manifest.pg_version_num / 10000;
        let bin = self.pg_bin_dir(major)?;
        progress.message(&format!(
            "starting PostgreSQL {major} on port {} and waiting for recovery",
            start.port
        ));
        let server = LocalServer {
            bin,
            data_dir: target_dir.to_path_buf(),
            os_user: self.os_user(),
        };
        self.start_and_wait(&server, major, start, target)
    }

    /// The OS user owning restored directories: configured, or `postgres`
    /// when running as root (PostgreSQL refuses to run as root).
    pub fn os_user(&self) -> Option<String> {
        self.settings.os_user.clone().or_else(|| {
            // SAFETY: geteuid has no preconditions.
            (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string())
        })
    }

    /// Reads the WAL object of a catalog row. A partial segment completed
    /// by the receiver since the row was read is gone; its complete object
    /// holds the same bytes and more.
    pub(crate) fn read_wal_row(
        &self,
        row: &WalSegmentRow,
    ) -> EngineResult<(strata_repo::WalSegmentMeta, Vec<u8>)> {
        match self.repo.read_wal(&row.object_key) {
            Err(strata_repo::RepoError::Storage(strata_repo::StorageError::NotFound(_)))
                if row.partial =>
            {
                let complete = self
                    .catalog
                    .find_wal_segment(&row.instance_id, row.timeline, &row.segment)?
                    .into_iter()
                    .find(|w| !w.partial)
                    .ok_or_else(|| {
                        EngineError::Failed(format!(
                            "WAL segment {} vanished from the repository while being read",
                            row.segment
                        ))
                    })?;
                Ok(self.repo.read_wal(&complete.object_key)?)
            }
            other => Ok(other?),
        }
    }

    pub(crate) fn load_histories(
        &self,
        instance_id: &str,
    ) -> EngineResult<BTreeMap<TimelineId, (TimelineHistory, Vec<u8>)>> {
        let mut out = BTreeMap::new();
        for tli in self.repo.list_histories(instance_id)? {
            if let Some(bytes) = self.repo.read_history(instance_id, tli)? {
                let history = TimelineHistory::parse(tli, &String::from_utf8_lossy(&bytes))
                    .map_err(|e| EngineError::Failed(format!("history of timeline {tli}: {e}")))?;
                out.insert(tli, (history, bytes));
            }
        }
        Ok(out)
    }

    /// Writes every file of the backup, several at a time, strictly beneath
    /// the target and the restored tablespace directories: names are
    /// checked first (a forged manifest is refused, naming the entry,
    /// before anything is written) and every open is relative to a
    /// directory handle without following links (see [`Beneath`]).
    fn materialize(
        &self,
        manifest: &BackupManifest,
        target: &Path,
        delta: bool,
        progress: &dyn Progress,
    ) -> EngineResult<Materialized> {
        check_manifest(manifest)?;
        let roots = RestoreRoots::open(manifest, target)?;
        for f in manifest.files.iter().filter(|f| f.kind == FileKind::Dir) {
            let (root, shown) = roots.place(f)?;
            root.create_dir_all(&f.path, f.mode & DIR_MODE_MASK)
                .map_err(EngineError::io(format!("creating {}", shown.display())))?;
        }
        for f in manifest
            .files
            .iter()
            .filter(|f| f.kind == FileKind::Symlink)
        {
            let to = tablespace_link(f, target)?;
            let (root, shown) = roots.place(f)?;
            match root.symlink(&f.path, &to) {
                // Kept by the delta restore only when it points there.
                Err(e) if delta && e.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => other.map_err(EngineError::io(format!(
                    "creating link {}",
                    shown.display()
                )))?,
            }
        }
        let mut files = write_order(manifest);
        let total: u64 = files.iter().map(|f| f.size).sum();
        // A delta restore writes pg_control last (see crate::delta).
        let control = match delta {
            true => match files
                .iter()
                .position(|f| f.tablespace.is_none() && f.path == delta::CONTROL_FILE)
            {
                Some(i) => {
                    let f = files.remove(i);
                    // pg_control is 8 KiB: a forged manifest may give it any size or
                    // list a block many times, so what is gathered stops at 64 KiB and
                    // must then have the size and CRC the manifest gives.
                    const MAX_CONTROL: usize = 64 * 1024;
                    let mut bytes = Vec::with_capacity(f.size.min(MAX_CONTROL as u64) as usize);
                    self.repo.read_blocks(&f.blocks, |data| {
                        if bytes.len() + data.len() > MAX_CONTROL {
                            return Err(EngineError::Refused(format!(
                                "backup {}: its {} is over {MAX_CONTROL} bytes",
                                manifest.backup_id,
                                delta::CONTROL_FILE
                            )));
                        }
                        bytes.extend_from_slice(&data);
                        Ok(())
                    })?;
                    if bytes.len() as u64 != f.size
                        || f.crc32c.is_some_and(|c| c != crc32c::crc32c(&bytes))
                    {
                        return Err(EngineError::Refused(format!(
                            "backup {}: its {} does not have the size and checksum its manifest gives",
                            manifest.backup_id,
                            delta::CONTROL_FILE
                        )));
                    }
                    Some((bytes, f.mode))
                }
                None => {
                    return Err(EngineError::Refused(format!(
                        "backup {} has no {}; it cannot be restored over a data directory",
                        manifest.backup_id,
                        delta::CONTROL_FILE
                    )))
                }
            },
            false => None,
        };
        let report = self.write_files(&files, &roots, total, delta, progress)?;
        progress.update("restore", total, Some(total));
        if let Some(map) = tablespace_map(manifest, target) {
            let mut out = roots
                .main
                .create_file("tablespace_map")
                .map_err(EngineError::io("writing tablespace_map"))?;
            out.write_all(map.as_bytes())
                .map_err(EngineError::io("writing tablespace_map"))?;
        }
        let files = files.len() as u64 + u64::from(control.is_some());
        Ok(Materialized {
            files,
            bytes: total,
            delta: delta.then_some(report),
            control,
        })
    }

    /// Readies `target` for a delta restore of `manifest` (see
    /// [`crate::delta`]): takes it over, moves its pg_control aside and
    /// removes what the backup does not have; returns how many entries went.
    fn prepare_delta(
        &self,
        manifest: &BackupManifest,
        target: &Path,
        progress: &dyn Progress,
    ) -> EngineResult<u64> {
        check_manifest(manifest)?;
        let io = |p: &Path| EngineError::io(format!("reading {}", p.display()));
        let mut owned = vec![target.to_path_buf()];
        owned.extend(
            manifest
                .tablespaces
                .iter()
                .map(|ts| tablespace_dir(target, ts.oid))
                .filter(|d| d.is_dir()),
        );
        if self.os_user().is_some() {
            for dir in &owned {
                delta::take_over(dir)?;
            }
        }
        let main = Beneath::open(target).map_err(io(target))?;
        delta::set_marker(&main, target)?;
        let roots = RestoreRoots::open(manifest, target)?;
        let mut removed = delta::remove_extra(
            &roots.main,
            &delta::Expected::of(manifest, None, |f| tablespace_link(f, target))?,
        )
        .map_err(io(target))?;
        for (oid, root) in &roots.tablespaces {
            let expected =
                delta::Expected::of(manifest, Some(*oid), |f| tablespace_link(f, target))?;
            removed +=
                delta::remove_extra(root, &expected).map_err(io(&tablespace_dir(target, *oid)))?;
        }
        // Restored tablespaces the backup does not have.
        let ts_root = tablespace_root(target);
        if ts_root.is_dir() {
            let dir = Beneath::open(&ts_root).map_err(io(&ts_root))?;
            for (name, kind) in dir.list().map_err(io(&ts_root))? {
                let listed = name
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|oid| roots.tablespaces.contains_key(&oid));
                if !listed {
                    removed += dir.remove(&name, kind).map_err(io(&ts_root))?;
                }
            }
        }
        progress.message(&format!(
            "delta restore over {}: removed {removed} entries the backup does not have",
            target.display()
        ));
        Ok(removed)
    }

    /// Writes `files` on `restore_parallelism` threads; the first error
    /// stops them all and is returned.
    fn write_files(
        &self,
        files: &[&FileEntry],
        roots: &RestoreRoots,
        total: u64,
        delta: bool,
        progress: &dyn Progress,
    ) -> EngineResult<DeltaReport> {
        let next = AtomicUsize::new(0);
        let report = Mutex::new(DeltaReport::default());
        let written = AtomicU64::new(0);
        let first_error: Mutex<Option<EngineError>> = Mutex::new(None);
        let threads = self.settings.restore_parallelism.max(1);
        let last_report = Mutex::new(Instant::now());
        let work: Vec<Vec<&FileEntry>> = match delta {
            true => files.iter().map(|f| vec![*f]).collect(),
            false => work_items(files),
        };
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = work.get(i) else { return };
                    let done = match (delta, item.as_slice()) {
                        (true, [f]) => roots
                            .place(f)
                            .and_then(|(root, shown)| self.patch_or_write(f, root, &shown)),
                        _ => self
                            .write_batch(item, roots)
                            .map(|()| DeltaReport::default()),
                    };
                    match done {
                        Ok(r) => report.lock().unwrap_or_else(|p| p.into_inner()).add(&r),
                        Err(e) => {
                            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert(e);
                            return;
                        }
                    }
                    let size: u64 = item.iter().map(|f| f.size).sum();
                    let done = written.fetch_add(size, Ordering::Relaxed) + size;
                    if let Ok(mut last) = last_report.try_lock() {
                        if last.elapsed() >= Duration::from_millis(500) {
                            *last = Instant::now();
                            progress.update("restore", done, Some(total));
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(report.into_inner().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// A delta restore's file: patched where it differs when it is there
    /// (see [`delta::patch_file`]), written whole when it is not.
    fn patch_or_write(
        &self,
        f: &FileEntry,
        root: &Beneath,
        shown: &Path,
    ) -> EngineResult<DeltaReport> {
        let existing = root
            .open_existing(&f.path)
            .map_err(EngineError::io(format!("opening {}", shown.display())))?
            .filter(|file| file.metadata().is_ok_and(|m| m.is_file()));
        match existing {
            Some(file) => {
                let report = delta::patch_file(&self.repo, f, &file, shown)?;
                if report.blocks_written > 0 {
                    start_writeback(&file);
                }
                file.set_permissions(fs::Permissions::from_mode(f.mode & FILE_MODE_MASK))
                    .map_err(EngineError::io(format!(
                        "setting mode of {}",
                        shown.display()
                    )))?;
                Ok(report)
            }
            None => {
                self.write_file(f, root, shown)?;
                Ok(DeltaReport {
                    files_written: 1,
                    blocks_written: f.blocks.len() as u64,
                    bytes_written: f.size,
                    ..Default::default()
                })
            }
        }
    }

    /// Writes one file beneath `root`; `shown` names it in errors.
    fn write_file(&self, f: &FileEntry, root: &Beneath, shown: &Path) -> EngineResult<()> {
        let mut out = OutFile::create(f, root, shown)?;
        self.repo.read_blocks(&f.blocks, |data| out.append(&data))?;
        out.finish()
    }

    /// Writes the files of one work item (see [`work_items`]): their
    /// blocks are read as one list, so the blocks of small files that lie
    /// together in a pack come in one ranged read, and each file is
    /// written and checked as its blocks arrive.
    fn write_batch<'f>(&self, batch: &[&'f FileEntry], roots: &RestoreRoots) -> EngineResult<()> {
        if let [f] = batch {
            let (root, shown) = roots.place(f)?;
            return self.write_file(f, root, &shown);
        }
        let blocks: Vec<BlockRef> = batch.iter().flat_map(|f| f.blocks.clone()).collect();
        // The file being written and the blocks it still waits for; files
        // without blocks are written whole when their turn comes.
        let mut files = batch.iter();
        let mut current: Option<(OutFile<'f>, usize)> = None;
        let mut advance = |current: &mut Option<(OutFile<'f>, usize)>| -> EngineResult<()> {
            if let Some((out, _)) = current.take() {
                out.finish()?;
            }
            for f in files.by_ref() {
                let (root, shown) = roots.place(f)?;
                let out = OutFile::create(f, root, &shown)?;
                if f.blocks.is_empty() {
                    out.finish()?;
                } else {
                    *current = Some((out, f.blocks.len()));
                    break;
                }
            }
            Ok(())
        };
        advance(&mut current)?;
        self.repo.read_blocks(&blocks, |data| {
            let Some((out, left)) = current.as_mut() else {
                return Err(EngineError::Failed(
                    "a batch of restored files received more blocks than its files hold".into(),
                ));
            };
            out.append(&data)?;
            *left -= 1;
            if *left == 0 {
                advance(&mut current)?;
            }
            Ok(())
        })?;
        match current {
            None => Ok(()),
            Some((out, _)) => out.finish(),
        }
    }

    /// Writes the planned WAL (partial segments padded with zeros) and the
    /// timeline histories into pg_wal, decoding as it goes.
    fn stage_wal(
        &self,
        plan: &[StagedSegment],
        histories: &BTreeMap<TimelineId, (TimelineHistory, Vec<u8>)>,
        geometry: WalGeometry,
        target: &Path,
        wanted: &RecoveryTarget,
        manifest: &BackupManifest,
    ) -> EngineResult<WalFindings> {
        let pg_wal = target.join("pg_wal");
        fs::create_dir_all(&pg_wal).map_err(EngineError::io("creating pg_wal"))?;
        for (tli, (_, bytes)) in histories {
            fs::write(pg_wal.join(history_file_name(*tli)), bytes)
                .map_err(EngineError::io("staging a timeline history"))?;
        }
        let mut findings = WalFindings::default();
        let mut decoder: Option<WalDecoder> = None;
        for seg in plan {
            let (meta, mut data) = self.read_wal_row(&seg.row)?;
            let start = geometry.segment_start(seg.segno);
            let dec = decoder.get_or_insert_with(|| WalDecoder::new(geometry, start));
            if dec.position() != start {
                *dec = WalDecoder::new(geometry, start);
            }
            let events = dec.feed(&data).map_err(|e| {
                EngineError::Failed(format!("WAL segment {} does not decode: {e}", meta.segment))
            })?;
            for event in events {
                findings.absorb(event, manifest.stop_lsn, wanted);
            }
            data.resize(geometry.segment_size() as usize, 0);
            let name = geometry.segment_file_name(seg.row.timeline, seg.segno);
            fs::write(pg_wal.join(&name), &data)
                .map_err(EngineError::io(format!("staging WAL segment {name}")))?;
        }
        Ok(findings)
    }

    pub(crate) fn start_and_wait(
        &self,
        server: &LocalServer,
        major: u32,
        start: &StartOptions,
        target: &RecoveryTarget,
    ) -> EngineResult<Option<String>> {
        let dir = server.data_dir.as_path();
        let port = start.port;
        let log = dir.join("strata-restore.log");
        server.start(&log, &server_options(major, port), None, start.usage)?;
        let log_tail = || local_server::log_tail(&log);
        let socket = (start.usage == ServerUse::Scratch)
            .then(|| start.socket_dir.clone())
            .flatten();
        let started = Instant::now();
        let deadline = started + self.settings.start_timeout;
        let mut seen_running = false;
        loop {
            // PostgreSQL removes recovery.signal when archive recovery ends;
            // pg_control alone is not enough (the copy in the backup already
            // says "in production").
            if !dir.join("recovery.signal").exists()
                && control_state(dir) == Some(DB_IN_PRODUCTION)
                && local_server::accepts_connections(socket.as_deref(), port)
            {
                break;
            }
            // pg_ctl -W returns before the postmaster writes its pid file.
            let running = dir.join("postmaster.pid").exists();
            seen_running |= running;
            // A FATAL with no pid file is a server that gave up before it
            // ran (a port in use, a bad setting): no need to wait longer.
            let gave_up = !running && log_tail().contains("FATAL:");
            if !running && (seen_running || gave_up || started.elapsed() > Duration::from_secs(30))
            {
                return Err(EngineError::RestoredServer(format!(
                    "the restored server stopped during recovery (log: {}): {}",
                    log.display(),
                    log_tail()
                )));
            }
            if Instant::now() >= deadline {
                return Err(EngineError::RestoredServer(format!(
                    "the restored server did not finish recovery within {}s (log: {})",
                    self.settings.start_timeout.as_secs(),
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = fs::read_to_string(&log).unwrap_or_default();
        let stop = text
            .lines()
            .find(|l| l.contains("recovery stopping"))
            .map(|l| l.to_string());
        if *target != RecoveryTarget::Latest && stop.is_none() {
            return Err(EngineError::RestoredServer(format!(
                "the restored server finished recovery without reporting the target {target} (log: {})",
                log.display()
            )));
        }
        Ok(stop)
    }
}

/// Command-line options of the restored server's first start. A server
/// whose pg_control does not say it was shut down cleanly (true of every
/// backup) syncs its whole data directory before recovery, by default with
/// one fsync per file: seconds on a directory of a thousand files. The
/// restore has just synced the file system, so from PostgreSQL 14 on the
/// server is told to do it with one syncfs instead (Linux). Only this start
/// uses it; the restored configuration is left alone.
fn server_options(major: u32, port: u16) -> String {
    if cfg!(target_os = "linux") && major >= 14 {
        format!("-p {port} -c recovery_init_sync_method=syncfs")
    } else {
        format!("-p {port}")
    }
}

/// Starts writing a restored file's pages to disk without waiting, so the
/// final sync finds little left to do (Linux; elsewhere the sync does it all).
fn start_writeback(file: &fs::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the whole call; a failure only
        // means the final sync does the work.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Makes the restored files durable: syncfs on the target's file system
/// (Linux) instead of a sync of every file system on the host.
pub(crate) fn sync_filesystem(target: &Path) -> EngineResult<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let dir = fs::File::open(target)
            .map_err(EngineError::io(format!("opening {}", target.display())))?;
        // SAFETY: the descriptor is open for the whole call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(EngineError::io(format!("syncing {}", target.display()))(
                std::io::Error::last_os_error(),
            ));
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = target;
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
    }
    Ok(())
}

/// pg_control's DBState value for a server that finished recovery
/// (src/include/catalog/pg_control.h: DB_IN_PRODUCTION).
const DB_IN_PRODUCTION: u32 = 6;

/// Reads the cluster state from global/pg_control: it follows the 64-bit
/// system identifier and two 32-bit version numbers.
fn control_state(dir: &Path) -> Option<u32> {
    let bytes = fs::read(dir.join("global/pg_control")).ok()?;
    let raw: [u8; 4] = bytes.get(16..20)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// Where restored tablespaces go: beside the target, never at the source's
/// locations (which may be on this very host).
fn tablespace_root(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".tblspc");
    PathBuf::from(name)
}

fn tablespace_dir(target: &Path, oid: u32) -> PathBuf {
    tablespace_root(target).join(oid.to_string())
}

/// The directories a restore writes beneath: the target, and one restored
/// directory per tablespace the manifest lists.
struct RestoreRoots<'a> {
    target: &'a Path,
    main: Beneath,
    tablespaces: BTreeMap<u32, Beneath>,
}

impl<'a> RestoreRoots<'a> {
    fn open(manifest: &BackupManifest, target: &'a Path) -> EngineResult<Self> {
        let mut tablespaces = BTreeMap::new();
        for ts in &manifest.tablespaces {
            let dir = tablespace_dir(target, ts.oid);
            fs::create_dir_all(&dir).map_err(EngineError::io("creating a tablespace directory"))?;
            let handle = Beneath::open(&dir)
                .map_err(EngineError::io(format!("opening {}", dir.display())))?;
            tablespaces.insert(ts.oid, handle);
        }
        let main = Beneath::open(target)
            .map_err(EngineError::io(format!("opening {}", target.display())))?;
        Ok(RestoreRoots {
            target,
            main,
            tablespaces,
        })
    }

    /// The directory an entry is written beneath, and its full path for messages.
    fn place(&self, f: &FileEntry) -> EngineResult<(&Beneath, PathBuf)> {
        match f.tablespace {
            None => Ok((&self.main, self.target.join(&f.path))),
            Some(oid) => {
                let root = self.tablespaces.get(&oid).ok_or_else(|| {
                    EngineError::Refused(format!(
                        "{:?} belongs to tablespace {oid}, which the backup does not list",
                        f.path
                    ))
                })?;
                Ok((root, tablespace_dir(self.target, oid).join(&f.path)))
            }
        }
    }
}

/// Refuses a manifest with a forged or damaged entry before anything is written.
fn check_manifest(manifest: &BackupManifest) -> EngineResult<()> {
    manifest.validate().map_err(|e| {
        EngineError::Refused(format!(
            "backup {} cannot be restored: its manifest has a forged or damaged {e}",
            manifest.backup_id
        ))
    })
}

/// What writing a backup's files did.
struct Materialized {
    files: u64,
    bytes: u64,
    /// What a delta restore reused and wrote.
    delta: Option<DeltaReport>,
    /// A delta restore's pg_control and its mode, written last.
    control: Option<(Vec<u8>, u32)>,
}

/// Refuses a non-empty directory; returns whether the directory was created.
fn prepare_target_dir(dir: &Path) -> EngineResult<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(EngineError::Refused(format!(
                    "target directory {} is not empty",
                    dir.display()
                )));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)
                .map_err(EngineError::io(format!("creating {}", dir.display())))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(
                EngineError::io(format!("setting mode of {}", dir.display())),
            )?;
            Ok(true)
        }
        Err(e) => Err(EngineError::io(format!("reading {}", dir.display()))(e)),
    }
}

fn clean_target_dir(dir: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(dir);
    } else if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
    let _ = fs::remove_dir_all(tablespace_root(dir));
}

/// The most a restored directory or file may allow: what PostgreSQL itself
/// uses (0700/0600, or 0750/0640 with group access). A manifest cannot ask
/// for setuid, setgid or sticky bits, or for anyone else to write.
const DIR_MODE_MASK: u32 = 0o750;
const FILE_MODE_MASK: u32 = 0o640;

/// Gives `root` and everything below it to the OS user `user`, deepest
/// first: until `root` itself changes hands at the end, that user can
/// change nothing inside it, so it cannot swap a directory for a link
/// while the tree is walked.
pub fn chown_tree(root: &Path, user: &str) -> EngineResult<()> {
    let (uid, gid) = user_ids(user)?;
    let mut stack = vec![root.to_path_buf()];
    let mut walked = Vec::new();
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p)
            .map_err(EngineError::io(format!("reading {}", p.display())))?;
        // An entry the user owns already is left alone: a delta restore
        // finds most of them so, and a chown would still dirty each inode.
        if meta.uid() != uid || meta.gid() != gid {
            walked.push(p.clone());
        }
        if meta.is_dir() {
            for entry in
                fs::read_dir(&p).map_err(EngineError::io(format!("reading {}", p.display())))?
            {
                stack.push(
                    entry
                        .map_err(EngineError::io("reading a directory"))?
                        .path(),
                );
            }
        }
    }
    for p in walked.iter().rev() {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(EngineError::io(format!(
            "changing owner of {}",
            p.display()
        )))?;
    }
    Ok(())
}

/// The uid and primary gid of OS user `user`.
pub(crate) fn user_ids(user: &str) -> EngineResult<(u32, u32)> {
    let name = std::ffi::CString::new(user)
        .map_err(|_| EngineError::Refused(format!("invalid OS user name {user:?}")))?;
    // SAFETY: getpwnam gets a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(EngineError::Refused(format!(
            "OS user {user:?} does not exist"
        )));
    }
    // SAFETY: pw was checked to be non-null.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A restored file being written: counts what it received, and checks it
/// against the manifest when finished.
struct OutFile<'a> {
    f: &'a FileEntry,
    out: fs::File,
    shown: PathBuf,
    size: u64,
    crc: u32,
}

impl<'a> OutFile<'a> {
    fn create(f: &'a FileEntry, root: &Beneath, shown: &Path) -> EngineResult<Self> {
        let out = root
            .create_file(&f.path)
            .map_err(EngineError::io(format!("creating {}", shown.display())))?;
        Ok(OutFile {
            f,
            out,
            shown: shown.to_path_buf(),
            size: 0,
            crc: 0,
        })
    }

    fn append(&mut self, data: &[u8]) -> EngineResult<()> {
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.size += data.len() as u64;
        self.out
            .write_all(data)
            .map_err(EngineError::io(format!("writing {}", self.shown.display())))
    }

    fn finish(self) -> EngineResult<()> {
        start_writeback(&self.out);
        let f = self.f;
        if self.size != f.size || f.crc32c.is_some_and(|c| c != self.crc) {
            return Err(EngineError::Failed(format!(
                "{} restored with the wrong size or checksum; the repository is damaged (run `strata repo verify`)",
                f.path
            )));
        }
        self.out
            .set_permissions(fs::Permissions::from_mode(f.mode & FILE_MODE_MASK))
            .map_err(EngineError::io(format!(
                "setting mode of {}",
                self.shown.display()
            )))
    }
}

/// Files up to this size are restored in batches (see [`work_items`]).
const BATCH_FILE_MAX: u64 = 1024 * 1024;

/// Stored bytes one batch of small files reads at most: one ranged read
/// when its blocks lie together.
const BATCH_STORED_MAX: u64 = strata_repo::READ_RUN_MAX;

/// Files one batch holds at most, so many empty or tiny files (they store
/// next to nothing) are still spread over the writers.
const BATCH_FILES_MAX: usize = 256;

/// What the writer threads take one at a time: each large file alone, in
/// `files`' order (largest first), then the small ones in batches, ordered
/// by where their first block is stored. A data directory is mostly small
/// files (catalogs, free space and visibility maps) written one after the
/// other by the backup, so their blocks lie side by side in a few packs: a
/// batch reads many of them with one request instead of one request each,
/// which an object store answers in tens of milliseconds.
fn work_items<'a>(files: &[&'a FileEntry]) -> Vec<Vec<&'a FileEntry>> {
    let (small, large): (Vec<&FileEntry>, Vec<&FileEntry>) =
        files.iter().partition(|f| f.size <= BATCH_FILE_MAX);
    let mut items: Vec<Vec<&FileEntry>> = large.into_iter().map(|f| vec![f]).collect();
    let mut small = small;
    small.sort_by(|a, b| {
        fn at(f: &FileEntry) -> Option<(&str, u64)> {
            f.blocks.first().map(|b| (b.pack.as_str(), b.offset))
        }
        at(a).cmp(&at(b))
    });
    let mut batch: Vec<&FileEntry> = Vec::new();
    let mut stored = 0u64;
    for f in small {
        let size: u64 = f.blocks.iter().map(|b| u64::from(b.stored_len)).sum();
        if !batch.is_empty() && (stored + size > BATCH_STORED_MAX || batch.len() == BATCH_FILES_MAX)
        {
            items.push(std::mem::take(&mut batch));
            stored = 0;
        }
        stored += size;
        batch.push(f);
    }
    if !batch.is_empty() {
        items.push(batch);
    }
    items
}

/// The regular files of a backup (the server's backup_manifest included),
/// largest first, so no thread is left alone with a big file at the end.
fn write_order(manifest: &BackupManifest) -> Vec<&FileEntry> {
    let mut files: Vec<&FileEntry> = manifest
        .all_files()
        .filter(|f| f.kind == FileKind::File)
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.size));
    files
}

/// Where a tablespace link of the backup points in the restore: at the
/// restored tablespace, never at the target recorded in the manifest (the
/// source's location, or anything a forger wrote).
fn tablespace_link(f: &FileEntry, target: &Path) -> EngineResult<PathBuf> {
    let oid = strata_repo::paths::tablespace_link_oid(&f.path).ok_or_else(|| {
        EngineError::Refused(format!("link {:?} is not a tablespace link", f.path))
    })?;
    Ok(tablespace_dir(target, oid))
}

/// The tablespace_map a restore writes (each tablespace at its restored
/// directory), or `None` for a backup without tablespaces.
fn tablespace_map(manifest: &BackupManifest, target: &Path) -> Option<String> {
    if manifest.tablespaces.is_empty() {
        return None;
    }
    Some(
        manifest
            .tablespaces
            .iter()
            .map(|ts| format!("{} {}\n", ts.oid, tablespace_dir(target, ts.oid).display()))
            .collect(),
    )
}

/// What a restore reads, decided before anything is written.
struct RestorePlan {
    backup: BackupSet,
    manifest: BackupManifest,
    geometry: WalGeometry,
    histories: BTreeMap<TimelineId, (TimelineHistory, Vec<u8>)>,
    /// The WAL objects staged, in order.
    wal: Vec<StagedSegment>,
    /// The end of the staged WAL.
    wal_end: Lsn,
    /// Where the archived WAL has a hole (WAL archived past `wal_end`).
    gap: Option<Lsn>,
}

/// Refuses a restore whose staged WAL (ending at `wal_end`) cannot make the
/// backup consistent or reach an LSN target; returns where the archived WAL
/// has a gap, if it has one.
fn check_wal_reach(
    manifest: &BackupManifest,
    wal: &[WalSegmentRow],
    wal_end: Lsn,
    target: &RecoveryTarget,
) -> EngineResult<Option<Lsn>> {
    if wal_end < manifest.stop_lsn {
        return Err(EngineError::Refused(format!(
            "the WAL needed to make backup {} consistent (up to {}) is not in the archive (archived WAL ends at {wal_end})",
            manifest.backup_id, manifest.stop_lsn
        )));
    }
    // WAL archived past the end of the usable run means a hole: a
    // receiver started after the server had dropped the WAL in between.
    let gap = wal.iter().any(|w| w.begin_lsn > wal_end).then_some(wal_end);
    if let RecoveryTarget::Lsn { lsn: l, .. } = target {
        if *l > wal_end {
            return Err(EngineError::Refused(match gap {
                Some(g) => format!(
                    "target LSN {l} lies beyond a gap in the archived WAL at {g}; restore from a backup taken after the gap"
                ),
                None => format!("target LSN {l} is after the newest archived WAL ({wal_end})"),
            }));
        }
    }
    Ok(gap)
}

/// The latest backup end a target allows, as an LSN or a time (`None`:
/// any), as far as the catalog's WAL rows and restore points tell.
/// `commit`: where the commit of a transaction target was decoded; without
/// it the bound is the end of the newest segment that may hold the commit.
fn target_limit(
    instance_id: &str,
    wal: &[WalSegmentRow],
    restore_points: &[strata_catalog::RestorePointRow],
    target: &RecoveryTarget,
    commit: Option<Lsn>,
) -> EngineResult<(Option<Lsn>, Option<DateTime<Utc>>)> {
    Ok(match target {
        RecoveryTarget::Latest | RecoveryTarget::Immediate => (None, None),
        RecoveryTarget::Time(t) => {
            let newest = wal.iter().map(|w| w.stored_at).max();
            match newest {
                Some(n) if *t > n => {
                    return Err(EngineError::Refused(format!(
                        "target time {} is after the newest archived WAL (received {})",
                        t.to_rfc3339(),
                        n.to_rfc3339()
                    )))
                }
                None => {
                    return Err(EngineError::Refused(format!(
                        "instance {instance_id} has no archived WAL; only a backup can be restored"
                    )))
                }
                _ => {}
            }
            (None, Some(*t))
        }
        // Recovery can stop before a record only once consistent, so the
        // backup must end at or before it, whichever side is asked for.
        RecoveryTarget::Lsn { lsn, .. } => (Some(*lsn), None),
        RecoveryTarget::Name(n) => {
            let rp = restore_points
                .iter()
                .filter(|r| &r.name == n)
                .max_by_key(|r| r.lsn)
                .ok_or_else(|| {
                    EngineError::Refused(format!(
                        "no restore point named {n:?} in the archived WAL"
                    ))
                })?;
            (Some(rp.lsn), None)
        }
        // The backup must end before the commit record, both to stop
        // before it and to stop after it (recovery reads it consistent).
        RecoveryTarget::Xid { xid, .. } => match commit {
            Some(c) => (Some(c), None),
            None => {
                let seg = commit_candidates(wal, *xid)
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        EngineError::Refused(format!(
                            "transaction {xid} did not commit in the archived WAL"
                        ))
                    })?;
                (Some(seg.end_lsn), None)
            }
        },
    })
}

/// The archived WAL objects that may hold the commit of `xid` (their
/// commit xid range holds it), newest first; a complete segment stands
/// for its partial objects.
fn commit_candidates(wal: &[WalSegmentRow], xid: u32) -> Vec<&WalSegmentRow> {
    let complete: std::collections::HashSet<(TimelineId, &str)> = wal
        .iter()
        .filter(|w| !w.partial)
        .map(|w| (w.timeline, w.segment.as_str()))
        .collect();
    let mut rows: Vec<&WalSegmentRow> = wal
        .iter()
        .filter(|w| {
            w.min_commit_xid.is_some_and(|m| m <= xid) && w.max_commit_xid.is_some_and(|m| m >= xid)
        })
        .filter(|w| !w.partial || !complete.contains(&(w.timeline, w.segment.as_str())))
        .collect();
    rows.sort_by_key(|w| std::cmp::Reverse((w.begin_lsn, w.end_lsn)));
    rows
}

/// Picks the backup to restore for `target` and checks the target lies in
/// the recoverable window as far as the catalog can tell.
fn choose_backup<'a>(
    instance_id: &str,
    backups: &'a [BackupSet],
    wal: &[WalSegmentRow],
    restore_points: &[strata_catalog::RestorePointRow],
    backup_id: Option<&str>,
    target: &RecoveryTarget,
    commit: Option<Lsn>,
) -> EngineResult<&'a BackupSet> {
    if backups.is_empty() {
        return Err(EngineError::Refused(format!(
            "instance {instance_id} has no successful backup to restore"
        )));
    }
    let stop = |b: &BackupSet| b.stop_lsn.unwrap_or(Lsn(u64::MAX));
    let done = |b: &BackupSet| b.finished_at.unwrap_or(b.started_at);
    let (limit_lsn, limit_time) = target_limit(instance_id, wal, restore_points, target, commit)?;
    let fits = |b: &BackupSet| {
        limit_lsn.is_none_or(|l| stop(b) <= l) && limit_time.is_none_or(|t| done(b) <= t)
    };
    let what = match (target, commit) {
        (RecoveryTarget::Xid { .. }, Some(c)) => format!("{target} (committed at {c})"),
        _ => target.to_string(),
    };
    let chosen = match backup_id {
        Some(id) => {
            let b = backups.iter().find(|b| b.id == id).ok_or_else(|| {
                EngineError::Refused(format!(
                    "backup set {id} is not a successful backup of instance {instance_id}"
                ))
            })?;
            if !fits(b) {
                return Err(EngineError::Refused(format!(
                    "recovery target {what} is before the end of backup {id}; choose an older backup or a later target"
                )));
            }
            b
        }
        None => backups.iter().rev().find(|b| fits(b)).ok_or_else(|| {
            let oldest = &backups[0];
            EngineError::Refused(format!(
                "recovery target {what} is before the oldest backup (backup {} ended at {} / LSN {})",
                oldest.id,
                done(oldest).to_rfc3339(),
                stop(oldest)
            ))
        })?,
    };
    Ok(chosen)
}

/// The WAL objects recovery reads, in order: from the backup's start along
/// the newest timeline descending from the backup's, up to the first gap.
pub(crate) fn plan_wal(
    manifest: &BackupManifest,
    geometry: WalGeometry,
    wal: &[WalSegmentRow],
    histories: &BTreeMap<TimelineId, (TimelineHistory, Vec<u8>)>,
) -> EngineResult<Vec<StagedSegment>> {
    Ok(plan_wal_from(
        manifest.start_lsn,
        manifest.start_timeline,
        geometry,
        wal,
        histories,
    ))
}

/// [`plan_wal`] for a backup starting at `start_lsn` on `base`.
pub(crate) fn plan_wal_from(
    start_lsn: Lsn,
    base: TimelineId,
    geometry: WalGeometry,
    wal: &[WalSegmentRow],
    histories: &BTreeMap<TimelineId, (TimelineHistory, Vec<u8>)>,
) -> Vec<StagedSegment> {
    // Newest timeline whose history contains the backup's timeline.
    let (target_tli, path): (TimelineId, Vec<(TimelineId, Lsn)>) = histories
        .iter()
        .rev()
        .find_map(|(tli, (h, _))| {
            h.switchpoint_of(base)?;
            let mut path = Vec::new();
            let mut begin = Lsn::INVALID;
            for e in &h.entries {
                path.push((e.timeline, begin));
                begin = e.switchpoint;
            }
            path.push((*tli, begin));
            Some((*tli, path))
        })
        .unwrap_or((base, vec![(base, Lsn::INVALID)]));
    let tli_for = |seg: SegmentNo| -> TimelineId {
        path.iter()
            .rev()
            .find(|(_, begin)| geometry.segment_of(*begin) <= seg)
            .map(|(t, _)| *t)
            .unwrap_or(target_tli)
    };
    let mut by_key: BTreeMap<(TimelineId, String), Vec<&WalSegmentRow>> = BTreeMap::new();
    for w in wal {
        by_key
            .entry((w.timeline, w.segment.clone()))
            .or_default()
            .push(w);
    }
    let mut plan = Vec::new();
    let mut seg = geometry.segment_of(start_lsn);
    loop {
        let tli = tli_for(seg);
        let name = geometry.segment_file_name(tli, seg);
        let Some(rows) = by_key.get(&(tli, name)) else {
            break;
        };
        let best = rows
            .iter()
            .find(|r| !r.partial)
            .or_else(|| rows.iter().max_by_key(|r| r.end_lsn));
        let Some(row) = best else { break };
        let partial = row.partial;
        plan.push(StagedSegment {
            row: (*row).clone(),
            segno: seg,
        });
        if partial {
            break;
        }
        seg = SegmentNo(seg.0 + 1);
    }
    plan
}

#[derive(Default)]
struct WalFindings {
    /// A commit after the backup's end and after the target time exists.
    commit_after_time: bool,
    xid_found: bool,
    /// Recovery can stop at the target LSN: a decoded record ends past it
    /// (just after it) or starts at or past it (just before it).
    passed_lsn: bool,
}

impl WalFindings {
    fn absorb(&mut self, event: WalEvent, stop_lsn: Lsn, wanted: &RecoveryTarget) {
        let end = match &event {
            WalEvent::Commit { end_lsn, .. }
            | WalEvent::Abort { end_lsn, .. }
            | WalEvent::RestorePoint { end_lsn, .. }
            | WalEvent::BackupEnd { end_lsn, .. } => *end_lsn,
            WalEvent::Switch { lsn } => *lsn,
        };
        let start = match &event {
            WalEvent::Commit { lsn, .. }
            | WalEvent::Abort { lsn, .. }
            | WalEvent::RestorePoint { lsn, .. }
            | WalEvent::BackupEnd { lsn, .. }
            | WalEvent::Switch { lsn } => *lsn,
        };
        // Just before the LSN: no commit starting at or past it means
        // nothing committed there, and replaying everything is the same.
        match wanted {
            RecoveryTarget::Lsn {
                lsn,
                inclusive: true,
            } if end > *lsn => self.passed_lsn = true,
            RecoveryTarget::Lsn {
                lsn,
                inclusive: false,
            } if start >= *lsn => self.passed_lsn = true,
            _ => {}
        }
        if let WalEvent::Commit { xid, time, lsn, .. } = event {
            if lsn < stop_lsn {
                return;
            }
            match wanted {
                RecoveryTarget::Time(t) if time > *t => self.commit_after_time = true,
                RecoveryTarget::Xid { xid: x, .. } if xid == *x => self.xid_found = true,
                _ => {}
            }
        }
    }
}

/// Checks the target against what the staged WAL really holds. A time
/// after the last commit, or an LSN after the last record, means "replay
/// everything": PostgreSQL would otherwise refuse to finish recovery.
fn confirm_target(
    target: RecoveryTarget,
    found: &WalFindings,
    manifest: &BackupManifest,
    gap: Option<Lsn>,
) -> EngineResult<RecoveryTarget> {
    let beyond_gap = |what: String| {
        match gap {
        Some(g) => Err(EngineError::Refused(format!(
            "{what} lies beyond a gap in the archived WAL at {g}; restore from a backup taken after the gap"
        ))),
        None => Ok(RecoveryTarget::Latest),
    }
    };
    Ok(match target {
        RecoveryTarget::Time(t) if !found.commit_after_time => {
            if t < manifest.stop_time {
                return Err(EngineError::Refused(format!(
                    "target time {} is before the end of backup {}",
                    t.to_rfc3339(),
                    manifest.backup_id
                )));
            }
            beyond_gap(format!("target time {}", t.to_rfc3339()))?
        }
        RecoveryTarget::Xid { xid, .. } if !found.xid_found => {
            return Err(EngineError::Refused(format!(
                "transaction {xid} did not commit in the archived WAL after backup {}",
                manifest.backup_id
            )))
        }
        RecoveryTarget::Lsn { lsn, .. } if !found.passed_lsn => {
            beyond_gap(format!("target LSN {lsn}"))?
        }
        other => other,
    })
}

pub(crate) fn write_recovery_settings(
    dir: &Path,
    backup_id: &str,
    target: &RecoveryTarget,
    start: Option<&StartOptions>,
) -> EngineResult<Vec<String>> {
    let quote = local_server::quote;
    let mut conf = format!(
        "\n# Recovery settings written by strata restore of backup {backup_id}\n\
         restore_command = 'false'\n\
         recovery_target_timeline = 'latest'\n\
         recovery_target_action = 'promote'\n\
         archive_mode = 'off'\n\
         primary_conninfo = ''\n\
         primary_slot_name = ''\n"
    );
    match target {
        RecoveryTarget::Latest => {}
        RecoveryTarget::Immediate => conf.push_str("recovery_target = 'immediate'\n"),
        RecoveryTarget::Time(t) => conf.push_str(&format!(
            "recovery_target_time = {}\n",
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        )),
        RecoveryTarget::Lsn { lsn, inclusive } => conf.push_str(&format!(
            "recovery_target_lsn = '{lsn}'\nrecovery_target_inclusive = {}\n",
            on_off(*inclusive)
        )),
        RecoveryTarget::Xid { xid, inclusive } => conf.push_str(&format!(
            "recovery_target_xid = '{xid}'\nrecovery_target_inclusive = {}\n",
            on_off(*inclusive)
        )),
        RecoveryTarget::Name(n) => conf.push_str(&format!("recovery_target_name = {}\n", quote(n))),
    }
    let neutralized = match start {
        Some(s) => local_server::configure(dir, s, &conf)?,
        None => {
            write_unstarted_settings(dir, &conf)?;
            Vec::new()
        }
    };
    // A backup of a standby carries standby.signal: the restored copy is a
    // new instance that must recover and promote, not follow the old primary.
    match fs::remove_file(dir.join("standby.signal")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io("removing standby.signal")(e)),
    }
    fs::write(dir.join("recovery.signal"), "")
        .map_err(EngineError::io("writing recovery.signal"))?;
    Ok(neutralized)
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Recovery settings of a directory Strata does not start: appended to the
/// source's own configuration, which the operator starts as they see fit.
fn write_unstarted_settings(dir: &Path, conf: &str) -> EngineResult<()> {
    let auto = dir.join("postgresql.auto.conf");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&auto)
        .map_err(EngineError::io("opening postgresql.auto.conf"))?;
    f.write_all(conf.as_bytes())
        .map_err(EngineError::io("writing postgresql.auto.conf"))?;
    if !dir.join("postgresql.conf").exists() {
        // Clusters laid out the Debian way keep their configuration outside
        // the data directory; give the restored one a minimal, safe one.
        fs::write(
            dir.join("postgresql.conf"),
            "listen_addresses = '127.0.0.1'\n",
        )
        .map_err(EngineError::io("writing postgresql.conf"))?;
    }
    if !dir.join("pg_hba.conf").exists() {
        fs::write(
            dir.join("pg_hba.conf"),
            "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        .map_err(EngineError::io("writing pg_hba.conf"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The restore's planning without a server: which backup a target
    //! restores from, and what the staged WAL must show before a target is
    //! kept as given.
    use super::*;
    use chrono::TimeZone;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 10, minute, 0).unwrap()
    }

    /// Backup `b` of instance `i`, from `start` to `stop` (LSNs as text),
    /// ended at minute 20.
    fn manifest(start: &str, stop: &str) -> BackupManifest {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "backup_id": "b", "instance_id": "i", "mode": "Manual",
            "system_identifier": "1", "pg_version_num": 150000, "wal_segment_size": 16777216,
            "label": "t", "start_lsn": start, "start_timeline": 1, "stop_lsn": stop,
            "stop_timeline": 1, "start_time": t(19), "stop_time": t(20),
            "tablespaces": [], "files": [], "server_manifest": null,
            "stats": {"file_count": 0, "total_bytes": 0, "new_bytes": 0, "dedup_bytes": 0,
                      "stored_bytes": 0, "new_blocks": 0, "dedup_blocks": 0, "packs": 0}
        }))
        .expect("a manifest")
    }

    fn xid(xid: u32, inclusive: bool) -> RecoveryTarget {
        RecoveryTarget::Xid { xid, inclusive }
    }

    fn lsn(lsn: u64, inclusive: bool) -> RecoveryTarget {
        RecoveryTarget::Lsn {
            lsn: Lsn(lsn),
            inclusive,
        }
    }

    /// A successful set that ended at `minute` at LSN `stop`.
    fn set(id: &str, minute: u32, stop: u64) -> BackupSet {
        let mut b = BackupSet::started(
            id.into(),
            "i",
            strata_catalog::BackupMode::Automated,
            t(minute) - chrono::Duration::minutes(1),
            None,
        );
        b.status = BackupStatus::Success;
        b.finished_at = Some(t(minute));
        b.start_lsn = Some(Lsn(stop - 10));
        b.stop_lsn = Some(Lsn(stop));
        b
    }

    /// WAL received at `minute`, covering [begin, end), with commits of xids.
    fn wal(minute: u32, begin: u64, end: u64, xids: Option<(u32, u32)>) -> WalSegmentRow {
        WalSegmentRow {
            instance_id: "i".into(),
            timeline: TimelineId(1),
            segment: format!("{begin:024X}"),
            partial: false,
            begin_lsn: Lsn(begin),
            end_lsn: Lsn(end),
            size: end - begin,
            checksum: String::new(),
            first_commit: None,
            last_commit: None,
            commit_count: 0,
            min_commit_xid: xids.map(|x| x.0),
            max_commit_xid: xids.map(|x| x.1),
            object_key: String::new(),
            stored_at: t(minute),
        }
    }

    #[test]
    fn the_backup_for_each_target() {
        let backups = [set("a", 10, 1000), set("b", 20, 2000), set("c", 30, 3000)];
        let segments = [
            wal(15, 1000, 2000, Some((100, 199))),
            wal(25, 2000, 3000, Some((200, 299))),
            wal(40, 3000, 4000, Some((300, 399))),
        ];
        let points = [RestorePointRow {
            instance_id: "i".into(),
            timeline: TimelineId(1),
            name: "before-migration".into(),
            lsn: Lsn(2500),
            time: t(22),
        }];
        let pick = |id: Option<&str>, target: RecoveryTarget| {
            choose_backup("i", &backups, &segments, &points, id, &target, None)
                .map(|b| b.id.clone())
                .map_err(|e| e.to_string())
        };
        let cases: Vec<(Option<&str>, RecoveryTarget, Result<&str, &str>)> = vec![
            (None, RecoveryTarget::Latest, Ok("c")),
            (None, RecoveryTarget::Immediate, Ok("c")),
            (Some("a"), RecoveryTarget::Latest, Ok("a")),
            (None, RecoveryTarget::Time(t(25)), Ok("b")),
            (None, RecoveryTarget::Time(t(20)), Ok("b")),
            (
                None,
                RecoveryTarget::Time(t(5)),
                Err("before the oldest backup"),
            ),
            (
                None,
                RecoveryTarget::Time(t(45)),
                Err("after the newest archived WAL"),
            ),
            (
                Some("c"),
                RecoveryTarget::Time(t(25)),
                Err("before the end of backup c"),
            ),
            (None, lsn(2999, true), Ok("b")),
            (None, lsn(3000, true), Ok("c")),
            // Just before a record: the backup must be consistent by then.
            (None, lsn(2999, false), Ok("b")),
            (None, lsn(3000, false), Ok("c")),
            (None, lsn(999, false), Err("before the oldest backup")),
            (
                Some("c"),
                lsn(2999, false),
                Err("before the end of backup c"),
            ),
            (
                None,
                RecoveryTarget::Name("before-migration".into()),
                Ok("b"),
            ),
            (
                None,
                RecoveryTarget::Name("nope".into()),
                Err("no restore point named"),
            ),
            // Before the commit is decoded: the newest segment that may
            // hold it bounds the backup.
            (None, xid(150, true), Ok("b")),
            (None, xid(350, false), Ok("c")),
            (None, xid(999, true), Err("did not commit")),
            (None, xid(999, false), Err("did not commit")),
            (
                Some("zz"),
                RecoveryTarget::Latest,
                Err("not a successful backup"),
            ),
        ];
        for (id, target, want) in cases {
            let got = pick(id, target.clone());
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{id:?} {target:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{id:?} {target:?}: {g}"),
                _ => panic!("{id:?} {target:?}: wanted {want:?}, got {got:?}"),
            }
        }
        // Once the commit is decoded, the backup ends before it, the same
        // for either side of it: a set ending later in its segment cannot
        // stop there (recovery would not be consistent yet).
        let at = |id: Option<&str>, target: RecoveryTarget, commit: u64| {
            choose_backup(
                "i",
                &backups,
                &segments,
                &points,
                id,
                &target,
                Some(Lsn(commit)),
            )
            .map(|b| b.id.clone())
            .map_err(|e| e.to_string())
        };
        assert_eq!(at(None, xid(150, false), 1500).unwrap(), "a");
        assert_eq!(at(None, xid(150, true), 1500).unwrap(), "a");
        assert_eq!(at(None, xid(150, false), 2000).unwrap(), "b");
        assert_eq!(at(None, xid(250, false), 2999).unwrap(), "b");
        let e = at(Some("b"), xid(150, false), 1500).unwrap_err();
        assert!(
            e.contains(
                "just before transaction 150 (committed at 0/5DC) is before the end of backup b"
            ),
            "{e}"
        );
        let e = at(None, xid(120, false), 900).unwrap_err();
        assert!(e.contains("before the oldest backup"), "{e}");

        let none: [BackupSet; 0] = [];
        assert!(choose_backup(
            "i",
            &none,
            &segments,
            &points,
            None,
            &RecoveryTarget::Latest,
            None
        )
        .unwrap_err()
        .to_string()
        .contains("no successful backup"));
        assert!(choose_backup(
            "i",
            &backups,
            &[],
            &points,
            None,
            &RecoveryTarget::Time(t(25)),
            None
        )
        .unwrap_err()
        .to_string()
        .contains("no archived WAL"));
    }

    #[test]
    fn what_the_staged_wal_shows_of_each_target() {
        let commit = |lsn: u64, end: u64, xid: u32| WalEvent::Commit {
            lsn: Lsn(lsn),
            end_lsn: Lsn(end),
            xid,
            time: t(25),
            changes: None,
        };
        let stop = Lsn(1000);
        let found = |wanted: RecoveryTarget, events: Vec<WalEvent>| {
            let mut f = WalFindings::default();
            for e in events {
                f.absorb(e, stop, &wanted);
            }
            (f.xid_found, f.passed_lsn)
        };
        // A record spanning the LSN: recovery stops after it, but there is
        // no record at or past it to stop before.
        let spanning = || vec![commit(1990, 2010, 7)];
        assert_eq!(found(lsn(2000, true), spanning()), (false, true));
        assert_eq!(found(lsn(2000, false), spanning()), (false, false));
        assert_eq!(
            found(lsn(2000, false), vec![commit(2000, 2040, 7)]),
            (false, true)
        );
        // Commits before the backup's end do not count.
        assert_eq!(
            found(xid(7, false), vec![commit(900, 940, 7)]),
            (false, false)
        );
        assert_eq!(found(xid(7, false), spanning()), (true, false));
        assert_eq!(found(xid(8, true), spanning()), (false, false));
    }

    #[test]
    fn recovery_settings_of_each_side_of_a_target() {
        let settings = |target: RecoveryTarget| {
            let dir = tempfile::tempdir().unwrap();
            write_recovery_settings(dir.path(), "b", &target, None).unwrap();
            fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap()
        };
        let conf = settings(xid(742, false));
        assert!(
            conf.contains("recovery_target_xid = '742'\nrecovery_target_inclusive = off\n"),
            "{conf}"
        );
        let conf = settings(xid(742, true));
        assert!(conf.contains("recovery_target_inclusive = on\n"), "{conf}");
        let conf = settings(lsn(0x3000028, false));
        assert!(
            conf.contains("recovery_target_lsn = '0/3000028'\nrecovery_target_inclusive = off\n"),
            "{conf}"
        );
        assert!(!settings(RecoveryTarget::Immediate).contains("inclusive"));
    }

    #[test]
    fn targets_the_staged_wal_does_not_reach() {
        let manifest = manifest("0/7C6", "0/7D0");
        let seen = |commit_after_time, xid_found, passed_lsn| WalFindings {
            commit_after_time,
            xid_found,
            passed_lsn,
        };
        /// Target, what the WAL showed, a gap, and the target kept (or why not).
        type Case<'a> = (
            RecoveryTarget,
            WalFindings,
            Option<Lsn>,
            Result<RecoveryTarget, &'a str>,
        );
        let cases: Vec<Case> = vec![
            // A time after the last commit replays everything.
            (
                RecoveryTarget::Time(t(30)),
                seen(false, false, false),
                None,
                Ok(RecoveryTarget::Latest),
            ),
            (
                RecoveryTarget::Time(t(30)),
                seen(true, false, false),
                None,
                Ok(RecoveryTarget::Time(t(30))),
            ),
            (
                RecoveryTarget::Time(t(10)),
                seen(false, false, false),
                None,
                Err("before the end of backup b"),
            ),
            (
                RecoveryTarget::Time(t(30)),
                seen(false, false, false),
                Some(Lsn(5000)),
                Err("beyond a gap"),
            ),
            (
                xid(7, true),
                seen(false, false, false),
                None,
                Err("did not commit"),
            ),
            (
                xid(7, true),
                seen(false, true, false),
                None,
                Ok(xid(7, true)),
            ),
            (
                xid(7, false),
                seen(false, true, false),
                None,
                Ok(xid(7, false)),
            ),
            (
                xid(7, false),
                seen(false, false, false),
                None,
                Err("did not commit"),
            ),
            (
                lsn(9000, true),
                seen(false, false, false),
                None,
                Ok(RecoveryTarget::Latest),
            ),
            (
                lsn(9000, true),
                seen(false, false, true),
                None,
                Ok(lsn(9000, true)),
            ),
            (
                RecoveryTarget::Latest,
                seen(false, false, false),
                Some(Lsn(5000)),
                Ok(RecoveryTarget::Latest),
            ),
        ];
        for (target, found, gap, want) in cases {
            let got =
                confirm_target(target.clone(), &found, &manifest, gap).map_err(|e| e.to_string());
            match (&want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{target:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{target:?}: {g}"),
                _ => panic!("{target:?}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn the_wal_a_restore_stages() {
        let g = WalGeometry::new(16 << 20).unwrap();
        let manifest = manifest("0/1000028", "0/1000100");
        let row = |tli: u32, seg: u64, partial: bool| {
            let mut w = wal(20, seg << 24, (seg + 1) << 24, None);
            w.timeline = TimelineId(tli);
            w.segment = g.segment_file_name(TimelineId(tli), SegmentNo(seg));
            w.partial = partial;
            w
        };
        let staged = |rows: &[WalSegmentRow], histories| -> Vec<(u32, u64, bool)> {
            plan_wal(&manifest, g, rows, histories)
                .unwrap()
                .iter()
                .map(|s| (s.row.timeline.0, s.segno.0, s.row.partial))
                .collect()
        };
        let none = BTreeMap::new();
        // From the backup's segment on, complete segments, then the partial one.
        let rows = [
            row(1, 0, false),
            row(1, 1, false),
            row(1, 2, false),
            row(1, 3, true),
        ];
        assert_eq!(
            staged(&rows, &none),
            [(1, 1, false), (1, 2, false), (1, 3, true)]
        );
        // A complete segment wins over a partial of the same name; a gap ends the run.
        let rows = [
            row(1, 1, true),
            row(1, 1, false),
            row(1, 2, false),
            row(1, 4, false),
        ];
        assert_eq!(staged(&rows, &none), [(1, 1, false), (1, 2, false)]);
        // Timeline 2 branched off in segment 2: its segments from there on.
        let history = TimelineHistory::parse(TimelineId(2), "1\t0/2000100\tno reason\n").unwrap();
        let histories = BTreeMap::from([(TimelineId(2), (history, Vec::new()))]);
        let rows = [
            row(1, 1, false),
            row(1, 2, false),
            row(1, 3, false),
            row(2, 2, false),
            row(2, 3, false),
        ];
        assert_eq!(
            staged(&rows, &histories),
            [(1, 1, false), (2, 2, false), (2, 3, false)]
        );
    }

    /// An engine over a catalog and a repository in memory that holds
    /// `manifest` (of instance `i`) and a history for each of `histories`.
    fn engine_with(manifest: &BackupManifest, histories: &[(u32, &str)]) -> Engine {
        let repo = strata_repo::Repository::open_or_init(std::sync::Arc::new(
            strata_repo::MemoryStorage::new(),
        ))
        .unwrap();
        repo.commit_manifest(manifest).unwrap();
        for (tli, text) in histories {
            repo.put_history("i", TimelineId(*tli), text.as_bytes())
                .unwrap();
        }
        let catalog = strata_catalog::SqliteCatalog::open_in_memory().unwrap();
        Engine::new(
            std::sync::Arc::new(catalog),
            repo,
            crate::EngineSettings::default(),
        )
    }

    fn options(target: RecoveryTarget) -> RestoreOptions {
        RestoreOptions {
            target_dir: PathBuf::from("/restore/here"),
            backup_id: None,
            target,
            delta: false,
            start: None,
            job_id: None,
            index: None,
        }
    }

    /// Segment `seg` (16 MiB segments) of timeline `tli` as the catalog lists it.
    fn segment(tli: u32, seg: u64, partial: bool) -> WalSegmentRow {
        let g = WalGeometry::new(16 << 20).unwrap();
        let mut w = wal(20, seg << 24, (seg + 1) << 24, None);
        w.timeline = TimelineId(tli);
        w.segment = g.segment_file_name(TimelineId(tli), SegmentNo(seg));
        w.partial = partial;
        w
    }

    /// The plan a restore makes from the repository and the catalog rows,
    /// before writing anything: the backup, the WAL objects in order (along
    /// the newest timeline, from the history stored in the repository), the
    /// WAL's end and the gap after it.
    #[test]
    fn a_restore_plans_its_backup_and_wal_from_the_repository() {
        let manifest = manifest("0/1000028", "0/1000100");
        let engine = engine_with(&manifest, &[(2, "1\t0/2000100\tno reason\n")]);
        let mut b = set("b", 20, 0x100_0100);
        b.start_lsn = Some(Lsn(0x100_0028));
        let index = RestoreIndex {
            backups: vec![b],
            wal: vec![
                segment(1, 1, false),
                segment(1, 2, false),
                segment(2, 2, false),
                segment(2, 3, true),
                // After a hole: archived, but recovery cannot reach it.
                segment(2, 5, false),
            ],
            restore_points: Vec::new(),
        };
        let plan = engine
            .plan_restore(
                "i",
                index.clone(),
                &options(RecoveryTarget::Latest),
                &crate::NoProgress,
            )
            .unwrap();
        assert_eq!(plan.backup.id, "b");
        assert_eq!(plan.manifest.backup_id, "b");
        let staged: Vec<_> = plan
            .wal
            .iter()
            .map(|s| (s.row.timeline.0, s.segno.0, s.row.partial))
            .collect();
        assert_eq!(staged, [(1, 1, false), (2, 2, false), (2, 3, true)]);
        assert_eq!(plan.wal_end, Lsn(4 << 24));
        assert_eq!(plan.gap, Some(Lsn(4 << 24)));
        assert_eq!(
            plan.histories.keys().copied().collect::<Vec<_>>(),
            [TimelineId(2)]
        );

        // An LSN past the hole is refused before anything is written.
        let err = engine
            .plan_restore(
                "i",
                index.clone(),
                &options(lsn(5 << 24, true)),
                &crate::NoProgress,
            )
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("lies beyond a gap in the archived WAL at 0/4000000"),
            "{err}"
        );

        // A failed set is never chosen, even when asked for by id.
        let mut failed = index;
        failed.backups[0].status = BackupStatus::Failed;
        let err = engine
            .plan_restore(
                "i",
                failed,
                &options(RecoveryTarget::Latest),
                &crate::NoProgress,
            )
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("has no successful backup"), "{err}");
    }

    #[test]
    fn how_far_the_staged_wal_must_reach() {
        let manifest = manifest("0/1000028", "0/1000100");
        let rows = [segment(1, 1, false), segment(1, 3, false)];
        let end = Lsn(2 << 24);
        for (wal_end, rows, target, expected) in [
            // Not even to the backup's end: refused whatever the target.
            (
                Lsn(0x100_0080),
                &rows[..1],
                RecoveryTarget::Immediate,
                Err("consistent (up to 0/1000100) is not in the archive (archived WAL ends at 0/1000080)"),
            ),
            (end, &rows[..1], RecoveryTarget::Latest, Ok(None)),
            (end, &rows[..], RecoveryTarget::Latest, Ok(Some(end))),
            (end, &rows[..1], lsn(end.0, false), Ok(None)),
            (
                end,
                &rows[..1],
                lsn(end.0 + 1, true),
                Err("target LSN 0/2000001 is after the newest archived WAL (0/2000000)"),
            ),
            (
                end,
                &rows[..],
                lsn(end.0 + 1, true),
                Err("lies beyond a gap in the archived WAL at 0/2000000"),
            ),
            // Other targets are checked against the decoded WAL later.
            (end, &rows[..], xid(5, false), Ok(Some(end))),
        ] {
            let got = check_wal_reach(&manifest, rows, wal_end, &target).map_err(|e| e.to_string());
            match (got, expected) {
                (Ok(gap), Ok(want)) => assert_eq!(gap, want, "{target}"),
                (Err(e), Err(want)) => assert!(e.contains(want), "{target}: {e}"),
                (got, want) => panic!("{target}: {got:?}, expected {want:?}"),
            }
        }
    }

    /// A batch hands each file exactly its own blocks, in order, writes
    /// the empty ones between them, gives each its mode, and fails on the
    /// first file whose bytes do not match the manifest, leaving the files
    /// before it complete.
    #[test]
    fn a_batch_writes_each_file_its_own_bytes_and_checks_them() {
        let m = manifest("0/1000028", "0/1000100");
        let engine = engine_with(&m, &[]);
        let mut w = engine.repo.block_writer(strata_repo::BlockIndex::default());
        let mut file = |path: &str, mode: u32, parts: &[&[u8]]| {
            let blocks: Vec<BlockRef> = parts.iter().map(|p| w.add(p).unwrap()).collect();
            let whole = parts.concat();
            FileEntry {
                tablespace: None,
                path: path.into(),
                kind: FileKind::File,
                mode,
                size: whole.len() as u64,
                mtime: 0,
                link_target: None,
                crc32c: Some(crc32c::crc32c(&whole)),
                blocks,
            }
        };
        let a = file("base/5/a", 0o600, &[&[1u8; 4096], b"tail of a"]);
        let empty = file("base/5/empty", 0o600, &[]);
        let b = file("base/5/b", 0o640, &[&[2u8; 8192]]);
        let c = file("base/5/c", 0o600, &[b"c1", b"c2", b"c3"]);
        let mut damaged = file("base/5/d", 0o600, &[b"d's bytes"]);
        damaged.crc32c = Some(damaged.crc32c.unwrap() ^ 1);
        let mut blockless = file("base/5/e", 0o600, &[]);
        blockless.size = 10;
        w.finish().unwrap();

        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("base/5")).unwrap();
        let roots = RestoreRoots::open(&m, dir.path()).unwrap();
        engine.write_batch(&[&a, &empty, &b, &c], &roots).unwrap();
        let read = |name: &str| fs::read(dir.path().join("base/5").join(name)).unwrap();
        assert_eq!(read("a"), [&[1u8; 4096][..], b"tail of a"].concat());
        assert_eq!(read("empty"), b"");
        assert_eq!(read("b"), vec![2u8; 8192]);
        assert_eq!(read("c"), b"c1c2c3");
        let mode = |name: &str| {
            fs::metadata(dir.path().join("base/5").join(name))
                .unwrap()
                .mode()
                & 0o777
        };
        assert_eq!((mode("a"), mode("b")), (0o600, 0o640));

        for (bad, says) in [
            (
                &damaged,
                "base/5/d restored with the wrong size or checksum",
            ),
            (
                &blockless,
                "base/5/e restored with the wrong size or checksum",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("base/5")).unwrap();
            let roots = RestoreRoots::open(&m, dir.path()).unwrap();
            let err = engine.write_batch(&[&c, bad, &b], &roots).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
            assert_eq!(fs::read(dir.path().join("base/5/c")).unwrap(), b"c1c2c3");
        }
    }

    /// Large files are written alone, largest first; small ones in
    /// batches ordered by where their blocks lie, each batch reading at
    /// most one run's worth of stored bytes; every file is in exactly one
    /// item.
    #[test]
    fn small_files_are_written_in_batches_by_where_they_are_stored() {
        let block = |pack: &str, offset: u64, stored: u32| BlockRef {
            hash: strata_repo::BlockHash([0; 32]),
            pack: strata_repo::PackId::new(pack),
            offset,
            stored_len: stored,
            raw_len: stored,
            compression: 0,
        };
        let file = |path: &str, size: u64, blocks: Vec<BlockRef>| FileEntry {
            tablespace: None,
            path: path.into(),
            kind: FileKind::File,
            mode: 0o600,
            size,
            mtime: 0,
            link_target: None,
            crc32c: None,
            blocks,
        };
        let mib = 1024 * 1024;
        let files = [
            file("big", 3 * mib, vec![block("p2", 0, 3 << 20)]),
            file("bigger", 5 * mib, vec![block("p1", 0, 5 << 20)]),
            file("c", 8192, vec![block("p3", 9000, 8192)]),
            file("a", 8192, vec![block("p3", 100, 8192)]),
            file("empty", 0, vec![]),
            file("b", 8192, vec![block("p3", 8400, 600)]),
            // Stored bytes past one run start a new batch.
            file("fat", mib, vec![block("p4", 0, (8 << 20) - 1000)]),
            file("d", 8192, vec![block("p5", 0, 8192)]),
        ];
        let mut refs: Vec<&FileEntry> = files.iter().collect();
        refs.sort_by_key(|f| std::cmp::Reverse(f.size));
        let items: Vec<Vec<&str>> = work_items(&refs)
            .iter()
            .map(|item| item.iter().map(|f| f.path.as_str()).collect())
            .collect();
        assert_eq!(
            items,
            vec![
                vec!["bigger"],
                vec!["big"],
                vec!["empty", "a", "b", "c"],
                vec!["fat"],
                vec!["d"],
            ]
        );
    }

    /// Which files a restore writes, in which order, and where its
    /// tablespaces go: beside the target, never where the source had them.
    #[test]
    fn files_and_tablespaces_a_restore_writes() {
        let mut m = manifest("0/1000028", "0/1000100");
        let entry = |ts: Option<u32>, path: &str, kind: FileKind, size: u64| FileEntry {
            tablespace: ts,
            path: path.into(),
            kind,
            mode: 0o600,
            size,
            mtime: 0,
            link_target: (kind == FileKind::Symlink).then(|| "/srv/source/ts".to_string()),
            crc32c: None,
            blocks: Vec::new(),
        };
        m.files = vec![
            entry(None, "base", FileKind::Dir, 0),
            entry(None, "PG_VERSION", FileKind::File, 3),
            entry(None, "base/5/1259", FileKind::File, 900),
            entry(None, "pg_tblspc/16384", FileKind::Symlink, 0),
            entry(Some(16384), "PG_15_202209061/5/16385", FileKind::File, 5000),
            entry(None, "base/5/16390", FileKind::File, 0),
        ];
        m.server_manifest = Some(entry(None, "backup_manifest", FileKind::File, 1200));
        let order: Vec<_> = write_order(&m)
            .iter()
            .map(|f| (f.tablespace, f.path.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (Some(16384), "PG_15_202209061/5/16385"),
                (None, "backup_manifest"),
                (None, "base/5/1259"),
                (None, "PG_VERSION"),
                (None, "base/5/16390"),
            ]
        );

        let target = Path::new("/restore/here");
        assert_eq!(tablespace_map(&m, target), None);
        m.tablespaces = vec![
            strata_repo::TablespaceEntry {
                oid: 16384,
                location: "/srv/source/ts".into(),
            },
            strata_repo::TablespaceEntry {
                oid: 16390,
                location: "/srv/source/ts2".into(),
            },
        ];
        assert_eq!(
            tablespace_map(&m, target).as_deref(),
            Some("16384 /restore/here.tblspc/16384\n16390 /restore/here.tblspc/16390\n")
        );
        assert_eq!(
            tablespace_link(&m.files[3], target).unwrap(),
            PathBuf::from("/restore/here.tblspc/16384")
        );
        let err = tablespace_link(&entry(None, "base/evil", FileKind::Symlink, 0), target)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"base/evil\" is not a tablespace link"),
            "{err}"
        );
    }
}
