//! Full backup over the replication protocol.
//!
//! One connection runs BASE_BACKUP; a second one holds a temporary physical
//! slot (created before the backup starts, so the server keeps every WAL
//! segment the backup needs) and streams that WAL into the repository, the
//! way `pg_basebackup -X stream` does. File contents are cut into blocks,
//! hashed and compressed on a pool of threads and packed by one writer
//! thread, so memory stays bounded whatever the database size. Every file is
//! checked against the CRC-32C the server lists in its backup_manifest, and
//! the Strata manifest is written last: until then the backup does not exist.
//!
//! On PostgreSQL 17 and later with `summarize_wal = on`, the server is given
//! the previous backup's manifest and sends only the blocks changed since
//! (see [`crate::incremental`]); the files are rebuilt whole as they arrive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use pg_replication::{
    BaseBackupEvent, BaseBackupOptions, ReplicationError, ReplicationMessage, TarEntry,
    TarEntryKind,
};
use pg_wal::{Lsn, TimelineId, WalGeometry};
use strata_catalog::{
    BackupId, BackupMethod, BackupMode, BackupSet, BackupStatus, Instance, InstanceId, Job,
    JobKind, JobState, TakenUnder,
};
use strata_repo::{
    AddedBlocks, BackupContents, BackupManifest, BackupStats, BlockIndex, BlockRef, BlockWriter,
    FileEntry, FileKind, PreparedBlock, Repository,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::blocking::blocking;
use crate::catalog_retry::retry_busy;
use crate::connect::{explain, open_session, remember_facts, Session};
use crate::events::EventOptions;
use crate::incremental::{
    full_name, strip_backup_label, BlockPlan, HeapChanges, IncrementalBase, IncrementalFile,
    ManifestChange, RelFile,
};
use crate::segment::SegmentArchiver;
use crate::silence::Silence;

mod receiver;
use crate::wal_uploader::WalUploader;
use crate::{Engine, EngineError, EngineResult, Progress};
use receiver::BackupReceiver;
pub(crate) use receiver::StreamStart;

/// Backup set ids are the start time in milliseconds: numeric like RDS ids,
/// and sorting by id sorts by age. Two backups starting in the same
/// millisecond take the next free one (the catalog refuses duplicates).
pub(crate) fn new_backup_id(attempt: i64) -> BackupId {
    BackupId::new((Utc::now().timestamp_millis() + attempt).to_string())
}

/// How a backup runs.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `Automated` (scheduled) or `Manual` (asked for).
    pub mode: BackupMode,
    /// Server-side read limit in kB/s (BASE_BACKUP MAX_RATE, 32..=1048576).
    pub max_rate_kb: Option<u32>,
    /// Over the replication protocol, or a snapshot through the instance's
    /// agent.
    pub method: BackupMethod,
    /// The policy rule an automatic backup is taken under, stamped on its
    /// set so that it keeps that rule's retention (`None`: manual).
    pub taken_under: Option<TakenUnder>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            mode: BackupMode::Manual,
            max_rate_kb: None,
            method: BackupMethod::Physical,
            taken_under: None,
        }
    }
}

/// A backup whose job and backup set are recorded (job `NoStart`, set
/// `Running`) but whose transfer has not begun: the service answers the
/// caller with the job id, then runs it.
#[derive(Debug)]
pub struct PendingBackup {
    /// The job, `NoStart` until the transfer begins.
    pub job: Job,
    /// The backup set, `Running` until it commits or fails.
    pub set: BackupSet,
    pub(crate) instance: Instance,
}

impl Engine {
    /// Runs a full backup of `instance_id` now. On failure the backup set
    /// and its job are recorded as failed with the reason, and nothing is
    /// committed to the repository.
    pub async fn backup(
        &self,
        instance_id: &str,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> EngineResult<BackupSet> {
        let pending = self.prepare_backup(instance_id, opts)?;
        self.run_backup_job(pending, opts, progress).await
    }

    /// Validates the request and records the job and the running backup
    /// set. Refuses a second backup of an instance while one runs (in any
    /// process sharing the catalog).
    pub fn prepare_backup(
        &self,
        instance_id: &str,
        opts: &BackupOptions,
    ) -> EngineResult<PendingBackup> {
        let instance = self.check_backup(instance_id, opts)?;
        let kind = match opts.method {
            BackupMethod::Physical => JobKind::Backup,
            BackupMethod::Snapshot => JobKind::SnapshotBackup,
        };
        let job = self.catalog.create_job(kind, Some(instance_id))?;
        self.record_backup_set(job, instance, opts)
    }

    /// [`Engine::prepare_backup`] for a backup job queued earlier and claimed
    /// by this process: the same checks, then its running backup set. The
    /// caller fails the job when this refuses.
    pub fn prepare_claimed_backup(
        &self,
        job: Job,
        opts: &BackupOptions,
    ) -> EngineResult<PendingBackup> {
        let Some(instance_id) = job.instance_id.clone() else {
            return Err(EngineError::Refused(format!(
                "backup job {} names no instance",
                job.id
            )));
        };
        let instance = self.check_backup(&instance_id, opts)?;
        self.record_backup_set(job, instance, opts)
    }

    /// Whether a backup of `instance_id` may start now: its options are
    /// valid, the instance exists and no backup of it runs anywhere.
    pub fn check_backup(&self, instance_id: &str, opts: &BackupOptions) -> EngineResult<Instance> {
        if let Some(rate) = opts.max_rate_kb {
            if !(32..=1_048_576).contains(&rate) {
                return Err(EngineError::Refused(format!(
                    "max rate must be between 32 and 1048576 kB/s, got {rate}"
                )));
            }
        }
        let instance = self.catalog.get_instance(instance_id)?;
        if opts.method == BackupMethod::Snapshot && instance.agent_url.is_none() {
            return Err(EngineError::Refused(format!(
                "instance {instance_id} has no agent: snapshot backups need `strata agent` on the database host, registered with --agent"
            )));
        }
        self.fail_expired_jobs()?;
        if let Some(running) = self
            .catalog
            .list_backups(instance_id)?
            .into_iter()
            .find(|b| b.status == BackupStatus::Running)
        {
            return Err(EngineError::Conflict(format!(
                "a backup of instance {instance_id} is already running (backup {}, job {})",
                running.id,
                running.job_id.map(|j| j.to_string()).unwrap_or_default()
            )));
        }
        Ok(instance)
    }

    /// Records the running backup set of `job` and names it in the job.
    pub(crate) fn record_backup_set(
        &self,
        mut job: Job,
        instance: Instance,
        opts: &BackupOptions,
    ) -> EngineResult<PendingBackup> {
        let mut set = BackupSet::started(
            new_backup_id(0),
            &instance.id,
            opts.mode,
            Utc::now(),
            Some(job.id),
        );
        set.method = opts.method;
        set.taken_under = opts.taken_under.clone();
        let mut attempt = 0;
        loop {
            match self.catalog.insert_backup(&set) {
                Ok(()) => break,
                // Another backup of the instance started since the check:
                // this job ends before it began.
                Err(e @ strata_catalog::CatalogError::BackupRunning { .. }) => {
                    job.state = JobState::Failed;
                    job.error = Some(e.to_string());
                    job.finished_at = Some(Utc::now());
                    if let Err(e) = self.catalog.update_job(&job) {
                        tracing::warn!(job = %job.id, "recording a refused backup job: {e}");
                    }
                    return Err(EngineError::Conflict(e.to_string()));
                }
                Err(strata_catalog::CatalogError::BackupExists(_)) if attempt < 1000 => {
                    attempt += 1;
                    set.id = new_backup_id(attempt);
                }
                Err(e) => return Err(e.into()),
            }
        }
        job.backup_id = Some(set.id.clone());
        self.catalog.update_job(&job)?;
        Ok(PendingBackup { job, set, instance })
    }

    /// Carries out a prepared backup and records its outcome.
    pub async fn run_backup_job(
        &self,
        pending: PendingBackup,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> EngineResult<BackupSet> {
        let PendingBackup {
            mut job,
            mut set,
            mut instance,
        } = pending;
        job.state = JobState::Preparing;
        self.record_job("recording a backup job's start", &job)
            .await?;

        let (outcome, hold) = match self.hold_gc().await {
            Ok(hold) => {
                // An instance with encrypted backups writes in its key
                // domain; its KMS key must be usable now.
                let outcome = match self.for_instance(&instance.id).await {
                    Err(e) => Err(e),
                    Ok(engine) => match set.method {
                        BackupMethod::Physical => {
                            engine
                                .run_backup(&mut instance, &mut set, &mut job, opts, progress)
                                .await
                        }
                        BackupMethod::Snapshot => engine
                            .run_snapshot(&instance, &mut set, &mut job, progress)
                            .await
                            .map(|_| ()),
                    },
                };
                (outcome, Some(hold))
            }
            Err(e) => (Err(e), None),
        };
        // Releasing the hold and recording the outcome are catalog writes
        // that may wait out an outage: off the runtime.
        let engine = self.clone();
        blocking(move || {
            drop(hold);
            engine.record_backup_outcome(set, job, outcome)
        })
        .await
    }

    /// Records how a backup ended on its set and job: `Success` and
    /// `Finished`, or `Failed` with the reason on both (the original error is
    /// returned even when recording it fails).
    pub(crate) fn record_backup_outcome(
        &self,
        mut set: BackupSet,
        mut job: Job,
        outcome: EngineResult<()>,
    ) -> EngineResult<BackupSet> {
        let now = Utc::now();
        set.finished_at = Some(now);
        job.finished_at = Some(now);
        match outcome {
            Ok(()) => {
                set.status = BackupStatus::Success;
                job.state = JobState::Finished;
                job.progress = 100;
                // Whole-row updates: safe to make again after an outage, and
                // a backup that succeeded is not failed for a catalog restart.
                retry_busy("recording a finished backup", || {
                    self.catalog.update_backup(&set)
                })?;
                retry_busy("recording a finished job", || self.catalog.update_job(&job))?;
                Ok(set)
            }
            Err(e) => {
                set.status = BackupStatus::Failed;
                set.error = Some(e.to_string());
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
                // The original error matters more than a failure to record it.
                let _ = retry_busy("recording a failed backup", || {
                    self.catalog.update_backup(&set)
                });
                let _ = retry_busy("recording a failed job", || self.catalog.update_job(&job));
                Err(e)
            }
        }
    }

    async fn run_backup(
        &self,
        instance: &mut Instance,
        set: &mut BackupSet,
        job: &mut Job,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> EngineResult<()> {
        let mut main = open_session(instance).await?;
        remember_facts(self, instance, &main)?;
        let geometry = main.geometry;
        let pg_version = main.client.server_version_num();
        set.pg_version_num = Some(pg_version);

        let (wal_session, slot) = open_wal_slot(instance).await?;
        tracing::debug!("backup {}: connected, slot {slot} created", set.id);
        let mut base = if pg_version >= 170000 {
            self.incremental_base(instance, &mut main, pg_version, progress)
                .await
        } else {
            None
        };
        if let Some(b) = &base {
            progress.message(&format!(
                "backup {}: changed blocks only, relative to backup {}",
                set.id,
                b.backup_id()
            ));
        }

        progress.message(&format!("backup {}: checkpoint requested", set.id));
        let bb_opts = |incremental: bool| base_backup_options(&set.id, opts, incremental);
        // Declared before the stream that may borrow it.
        let mut fallback: Option<Session> = None;
        let first = main.client.base_backup(&bb_opts(base.is_some())).await;
        let mut bb = match first {
            Ok(bb) => bb,
            // Summaries missing or removed, a timeline the server does not
            // know: a full transfer still works.
            Err(e) if base.is_some() && !e.is_transient() => {
                progress.message(&format!(
                    "backup {}: the server refused an incremental transfer ({e}); it sends every file instead",
                    set.id
                ));
                base = None;
                let session = fallback.insert(open_session(instance).await?);
                session
                    .client
                    .base_backup(&bb_opts(false))
                    .await
                    .map_err(|e| explain(instance, e))?
            }
            Err(e) => return Err(explain(instance, e)),
        };
        let start = StreamStart {
            system_id: main.system_id,
            pg_version,
            wal_segment_size: geometry.segment_size(),
            start_lsn: bb.start_lsn(),
            start_timeline: bb.start_timeline(),
            start_time: Utc::now(),
            total: bb.total_size_bytes(),
            stop_time: None,
        };
        tracing::debug!(
            "backup {}: BASE_BACKUP started at {}",
            set.id,
            start.start_lsn
        );

        let wal = BackupWal::start(self, instance, wal_session, slot, &start, geometry);
        let mut live = LiveBackup {
            stream: &mut bb,
            stall: Some(self.settings.wal_receiver_timeout).filter(|t| !t.is_zero()),
            wal_failed: wal.failures(),
            failure: None,
        };
        let reader = instance.clone();
        let backup_id = set.id.clone();
        let run = BackupRun {
            instance: &*instance,
            set,
            job,
            progress,
        };
        self.consume_backup(run, &start, base, &mut live, |stop| async move {
            wal.stored(stop).await?;
            Ok(crate::contents::read_contents_or_none(&reader, &backup_id).await)
        })
        .await
    }

    /// Everything a backup does once the server streams: records the start,
    /// feeds the stream to a [`BackupReceiver`], checks it, waits until
    /// `before_commit` says the WAL up to the end position is stored (it
    /// answers the databases and tables read from the server, if any),
    /// commits the manifest and records its figures in the set. The caller
    /// records the outcome ([`Engine::record_backup_outcome`]).
    pub(crate) async fn consume_backup<W, F>(
        &self,
        run: BackupRun<'_>,
        start: &StreamStart,
        base: Option<IncrementalBase>,
        events: &mut impl BackupEvents,
        before_commit: W,
    ) -> EngineResult<()>
    where
        W: FnOnce(Lsn) -> F,
        F: std::future::Future<Output = EngineResult<Option<BackupContents>>>,
    {
        let BackupRun {
            instance,
            set,
            job,
            progress,
        } = run;
        set.start_lsn = Some(start.start_lsn);
        set.start_timeline = Some(start.start_timeline);
        self.record_set("recording a backup's start position", set)
            .await?;
        job.state = JobState::Uploading;
        self.record_job("recording a backup job's state", job)
            .await?;

        let mut receiver = BackupReceiver::start(&self.repo, &instance.id, base).await?;
        self.feed_stream(instance, job, start.total, events, &mut receiver, progress)
            .await?;
        let (stop_lsn, stop_tli) = receiver.end_of_stream()?;
        let streamed = receiver.streamed();
        progress.update("backup", streamed, Some(streamed));
        set.stop_lsn = Some(stop_lsn);
        set.stop_timeline = Some(stop_tli);

        tracing::debug!("backup {}: files received, stop at {stop_lsn}", set.id);
        job.state = JobState::Checking;
        self.record_job("recording a backup job's state", job)
            .await?;
        receiver.check_server_manifest()?;

        progress.message(&format!(
            "backup {}: waiting for WAL up to {stop_lsn}",
            set.id
        ));
        let contents = before_commit(stop_lsn).await?;
        tracing::debug!("backup {}: WAL up to {stop_lsn} stored", set.id);

        let manifest = receiver.commit(set, start, contents).await?;
        let stats = &manifest.stats;
        if let Some(from) = &manifest.incremental_from {
            progress.message(&format!(
                "backup {}: the server sent {} MiB of {} MiB (blocks changed since backup {from}); the rest was taken from that backup",
                set.id,
                streamed.div_ceil(1 << 20),
                stats.total_bytes.div_ceil(1 << 20)
            ));
        }
        crate::entities::record_stats(set, stats);
        Ok(())
    }

    /// Feeds every event of the stream to `receiver`, reporting progress
    /// (and recording it on the job) every half second.
    async fn feed_stream(
        &self,
        instance: &Instance,
        job: &mut Job,
        total: Option<u64>,
        events: &mut impl BackupEvents,
        receiver: &mut BackupReceiver,
        progress: &dyn Progress,
    ) -> EngineResult<()> {
        let mut last_report = Instant::now();
        while let Some(event) = events
            .next_event()
            .await
            .map_err(|e| events.explain(instance, e))?
        {
            receiver.feed(event).await?;
            if last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                let streamed = receiver.streamed();
                progress.update("backup", streamed, total);
                if let Some(total) = total.filter(|t| *t > 0) {
                    job.progress = ((streamed * 95 / total).min(95)) as u8;
                    // Progress is a hint: while the catalog is unreachable
                    // the backup goes on, and the next report catches up.
                    match self.catalog.update_job(job) {
                        Err(e) if e.is_retryable() => {
                            tracing::debug!("backup progress not recorded: {e}")
                        }
                        r => r?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// BASE_BACKUP's options for backup `id`: a fast checkpoint, progress, the
/// server's manifest with CRC-32C checksums, tablespaces mapped.
fn base_backup_options(id: &str, opts: &BackupOptions, incremental: bool) -> BaseBackupOptions {
    BaseBackupOptions {
        label: format!("strata backup {id}"),
        fast_checkpoint: true,
        progress: true,
        manifest: true,
        max_rate_kb: opts.max_rate_kb,
        tablespace_map: true,
        incremental,
    }
}

/// A second connection with a temporary physical slot, created before the
/// backup starts so the server keeps every WAL segment the backup needs.
pub(crate) async fn open_wal_slot(instance: &Instance) -> EngineResult<(Session, String)> {
    let mut session = open_session(instance).await?;
    let slot = format!("strata_backup_{}_{:08x}", std::process::id(), rand_u32());
    session
        .client
        .create_physical_slot(&slot, true, true)
        .await
        .map_err(|e| explain(instance, e))?;
    Ok((session, slot))
}

/// The task streaming a backup's WAL into the repository, until told the
/// backup's end position.
pub(crate) struct BackupWal {
    stop_tx: watch::Sender<Option<Lsn>>,
    task: tokio::task::JoinHandle<EngineResult<()>>,
    /// Why the stream failed (and whether the server was unreachable), as
    /// soon as it did.
    failed: watch::Receiver<Option<(String, bool)>>,
}

impl BackupWal {
    pub(crate) fn start(
        engine: &Engine,
        instance: &Instance,
        session: Session,
        slot: String,
        start: &StreamStart,
        geometry: WalGeometry,
    ) -> Self {
        let (stop_tx, stop_rx) = watch::channel(None);
        let (failed_tx, failed) = watch::channel(None);
        let streamed = stream_backup_wal(
            engine.clone(),
            instance.id.clone(),
            session,
            slot,
            start.start_lsn,
            start.start_timeline,
            geometry,
            engine.settings.wal_status_interval,
            stop_rx,
        );
        let task = tokio::spawn(async move {
            let result = streamed.await;
            if let Err(e) = &result {
                let unreachable = matches!(e, EngineError::Unreachable(_));
                let _ = failed_tx.send(Some((e.to_string(), unreachable)));
            }
            result
        });
        BackupWal {
            stop_tx,
            task,
            failed,
        }
    }

    /// Why the stream failed, once it did, and whether the server was
    /// unreachable.
    /// It ends without failing only after [`BackupWal::stored`] asked it
    /// to: a sender gone before then is a task that panicked.
    pub(crate) fn failures(&self) -> watch::Receiver<Option<(String, bool)>> {
        self.failed.clone()
    }

    /// Done once the WAL up to `stop` is stored.
    pub(crate) async fn stored(self, stop: Lsn) -> EngineResult<()> {
        let _ = self.stop_tx.send(Some(stop));
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(EngineError::Failed(format!(
                "WAL streaming task failed: {e}"
            ))),
        }
    }
}

/// The rows a running backup updates and where it reports.
pub(crate) struct BackupRun<'a> {
    pub instance: &'a Instance,
    pub set: &'a mut BackupSet,
    pub job: &'a mut Job,
    pub progress: &'a dyn Progress,
}

/// A source of BASE_BACKUP events: the live stream, or a recorded one.
pub(crate) trait BackupEvents {
    /// The next event; `None` once the stream is over.
    fn next_event(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<BaseBackupEvent>, ReplicationError>> + Send;

    /// The failure to report for an error of this source (a server's,
    /// named with the instance, unless the source says otherwise).
    fn explain(&self, instance: &Instance, e: ReplicationError) -> EngineError {
        explain(instance, e)
    }
}

/// A backup's BASE_BACKUP stream, with the two failures that end the
/// backup beside the server's own errors: no data for the receiver timeout
/// (BASE_BACKUP has no keepalives to ask for, so data that stops coming is
/// a stuck server), and the backup's WAL stream failing (found at once,
/// not after the last file).
struct LiveBackup<'s, 'c> {
    stream: &'s mut pg_replication::BaseBackup<'c>,
    /// `None`: no bound.
    stall: Option<Duration>,
    wal_failed: watch::Receiver<Option<(String, bool)>>,
    /// What ended the stream, when not the server's error.
    failure: Option<Failure>,
}

enum Failure {
    Stalled(Duration),
    /// Why, and whether the server was unreachable.
    Wal(String, bool),
}

impl BackupEvents for LiveBackup<'_, '_> {
    fn next_event(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<BaseBackupEvent>, ReplicationError>> + Send
    {
        let LiveBackup {
            stream,
            stall,
            wal_failed,
            failure,
        } = self;
        let stall = *stall;
        async move {
            let stalled = async {
                match stall {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            // In this order: a failure beside the stream is rare and ends
            // the backup; data that is ready wins over the stall's end.
            tokio::select! {
                biased;
                why = wal_failed.wait_for(Option::is_some) => {
                    *failure = Some(match why {
                        Ok(why) => {
                            let (why, unreachable) = why.clone().unwrap_or_default();
                            Failure::Wal(why, unreachable)
                        }
                        // Gone before the backup asked it to stop.
                        Err(_) => Failure::Wal("its task ended early".into(), false),
                    });
                }
                next = stream.next() => return next,
                _ = stalled => *failure = Some(Failure::Stalled(stall.unwrap_or_default())),
            }
            Err(ReplicationError::Io(std::io::ErrorKind::TimedOut.into()))
        }
    }

    fn explain(&self, instance: &Instance, e: ReplicationError) -> EngineError {
        match &self.failure {
            Some(Failure::Stalled(t)) => EngineError::Unreachable(format!(
                "instance {}: the server sent no backup data for {} s (wal.receiver_timeout_secs)",
                instance.id,
                t.as_secs()
            )),
            Some(Failure::Wal(why, unreachable)) => {
                let why = format!("the backup's WAL stream failed: {why}");
                match unreachable {
                    true => EngineError::Unreachable(why),
                    false => EngineError::Failed(why),
                }
            }
            None => explain(instance, e),
        }
    }
}

impl Engine {
    /// The earlier backup a PostgreSQL 17+ server can send changes against,
    /// with its manifest uploaded on `main`: the newest backup of this
    /// server and major version in the repository. `None` (a full
    /// transfer) when WAL summaries are off or anything else is missing;
    /// the reason is reported, never fatal.
    async fn incremental_base(
        &self,
        instance: &Instance,
        main: &mut Session,
        pg_version: u32,
        progress: &dyn Progress,
    ) -> Option<IncrementalBase> {
        let note = |why: String| {
            progress.message(&format!(
                "instance {}: every file is sent in full: {why}",
                instance.id
            ))
        };
        match main.client.show("summarize_wal").await {
            Ok(v) if v == "on" => {}
            Ok(_) => {
                tracing::debug!(
                    "instance {}: summarize_wal is off; full transfer",
                    instance.id
                );
                return None;
            }
            Err(e) => {
                note(format!("cannot read summarize_wal ({e})"));
                return None;
            }
        }
        let block_size = match main.client.show("block_size").await {
            Ok(v) => v,
            Err(e) => {
                note(format!("cannot read block_size ({e})"));
                return None;
            }
        };
        let segment_size = match main.client.show("segment_size").await {
            Ok(v) => v,
            Err(e) => {
                note(format!("cannot read segment_size ({e})"));
                return None;
            }
        };
        let (page_size, segment_pages) =
            match page_geometry(&block_size, &segment_size, self.repo.block_size()) {
                Ok(geometry) => geometry,
                Err(why) => {
                    note(why);
                    return None;
                }
            };
        // Reads manifests and blocks: off the runtime.
        let (repo, id, system_id) = (self.repo.clone(), instance.id.clone(), main.system_id);
        let found =
            blocking(move || Ok(earlier_server_manifest(&repo, &id, system_id, pg_version))).await;
        let (earlier, text) = match found {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return None,
            Ok(Err(why)) => {
                note(why);
                return None;
            }
            Err(e) => {
                note(format!("cannot read earlier backups ({e})"));
                return None;
            }
        };
        if let Err(e) = main.client.upload_manifest(&text).await {
            note(format!(
                "the server did not accept the manifest of backup {} ({e})",
                earlier.backup_id
            ));
            return None;
        }
        Some(IncrementalBase::new(earlier, page_size, segment_pages))
    }
}

/// Smallest and largest `block_size` PostgreSQL can be built with
/// (`--with-blocksize`: a power of two from 1 to 32 KiB).
const MIN_PAGE_SIZE: usize = 1 << 10;
const MAX_PAGE_SIZE: usize = 32 << 10;
/// Largest relation segment (`segment_size`) an incremental transfer is
/// used with. Each `INCREMENTAL.` file may claim a whole segment in a few
/// header bytes, and the rebuilt file is planned block by block in memory,
/// so this bounds what a header can make Strata hold. PostgreSQL's default
/// is 1 GiB; a server built with larger segments sends every file in full.
const MAX_SEGMENT_SIZE: u64 = 64 << 30;

/// The page size and pages per relation segment from the server's
/// `block_size` and `segment_size` (as SHOW prints them), checked against
/// what PostgreSQL can be built with and the repository's block size:
/// arithmetic on pages (visibility map coverage, page offsets) relies on it.
fn page_geometry(
    block_size: &str,
    segment_size: &str,
    repo_block: usize,
) -> Result<(usize, u64), String> {
    let page_size = block_size
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|p| p.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(p))
        .ok_or_else(|| {
            format!(
                "block_size {block_size:?} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
            )
        })?;
    let segment_bytes = pg_wal::parse_size_setting(segment_size)
        .ok()
        .filter(|&s| s > 0 && s <= MAX_SEGMENT_SIZE && s % page_size as u64 == 0)
        .ok_or_else(|| {
            format!(
                "segment_size {segment_size:?} is not a whole number of {page_size}-byte pages up to {} GiB",
                MAX_SEGMENT_SIZE >> 30
            )
        })?;
    if !repo_block.is_multiple_of(page_size) {
        return Err(format!(
            "the repository's {repo_block}-byte blocks are not whole {page_size}-byte pages"
        ));
    }
    Ok((page_size, segment_bytes / page_size as u64))
}

/// The newest backup of this server and major version that kept the
/// server's backup_manifest, with that manifest's text; `Err` says why
/// there is none to use.
fn earlier_server_manifest(
    repo: &strata_repo::Repository,
    instance_id: &str,
    system_id: u64,
    pg_version: u32,
) -> Result<Option<(BackupManifest, Vec<u8>)>, String> {
    let ids = repo
        .list_backups(instance_id)
        .map_err(|e| format!("cannot list earlier backups ({e})"))?;
    let mut found = None;
    for id in ids.iter().rev() {
        let m = repo
            .read_manifest(instance_id, id)
            .map_err(|e| format!("cannot read backup {id} ({e})"))?;
        if m.system_identifier == system_id
            && m.pg_version_num / 10000 == pg_version / 10000
            && m.server_manifest.is_some()
        {
            found = Some(m);
            break;
        }
    }
    let Some(earlier) = found else {
        return Ok(None);
    };
    let Some(entry) = earlier.server_manifest.as_ref() else {
        return Ok(None);
    };
    let mut text = Vec::with_capacity(entry.size as usize);
    repo.read_blocks(&entry.blocks, |d| {
        text.extend_from_slice(&d);
        Ok::<(), EngineError>(())
    })
    .map_err(|e| {
        format!(
            "cannot read the manifest of backup {} ({e})",
            earlier.backup_id
        )
    })?;
    Ok(Some((earlier, text)))
}

fn rand_u32() -> u32 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

/// The manifest entry for a member of the server's tar stream, refused
/// (naming it) unless its name is one a restore may write: see
/// [`strata_repo::paths`]. Checked here, before anything is stored, so a
/// hostile or broken server fails the backup instead of leaving a manifest
/// no restore accepts.
pub(crate) fn file_entry(tablespace: Option<u32>, entry: &TarEntry) -> EngineResult<FileEntry> {
    let (kind, link_target) = match &entry.kind {
        TarEntryKind::File => (FileKind::File, None),
        TarEntryKind::Directory => (FileKind::Dir, None),
        TarEntryKind::Symlink { target } => (FileKind::Symlink, Some(target.clone())),
    };
    strata_repo::paths::check_entry(tablespace, &entry.path, kind).map_err(|e| {
        let archive = match tablespace {
            Some(oid) => format!("the archive of tablespace {oid}"),
            None => "the data directory's archive".to_string(),
        };
        EngineError::Failed(format!(
            "the server sent an entry Strata refuses to store: {:?} in {archive} {e}",
            entry.path
        ))
    })?;
    Ok(FileEntry {
        tablespace,
        path: entry.path.clone(),
        kind,
        mode: entry.mode,
        size: if kind == FileKind::File {
            entry.size
        } else {
            0
        },
        mtime: entry.mtime,
        link_target,
        crc32c: None,
        blocks: Vec::new(),
    })
}

/// The path the server's backup_manifest uses for a file.
pub(crate) fn manifest_path(tablespace: Option<u32>, path: &str) -> String {
    match tablespace {
        Some(oid) => format!("pg_tblspc/{oid}/{path}"),
        None => path.to_string(),
    }
}

struct OpenFile {
    /// The path as the server sent it (an `INCREMENTAL.` name included).
    manifest_path: String,
    tablespace: Option<u32>,
    size: u64,
    remaining: u64,
    /// CRC-32C of the bytes as sent.
    crc: u32,
    block: Vec<u8>,
    content: Content,
}

/// How the bytes of a file being received become stored blocks.
enum Content {
    /// Cut into blocks as they come.
    Plain,
    /// Changed pages, rebuilt into the whole file; `main` names the
    /// relation when this is a main fork, whose changed pages are recorded.
    Incremental {
        inc: Box<IncrementalFile>,
        main: Option<RelFile>,
    },
    /// A visibility map's changed pages: planned as they come but stored
    /// once the tablespace's main forks are all in (see [`HeapChanges`]).
    Map {
        inc: Box<IncrementalFile>,
        rel: RelFile,
        entry: FileEntry,
        plans: Vec<BlockPlan>,
    },
    /// An incremental backup's backup_label: held until complete, then
    /// stored without its `INCREMENTAL FROM` lines.
    Label(FileEntry, Vec<u8>),
}

/// Compares what was received with the server's own manifest: same files,
/// same sizes, same CRC-32C. `received` maps each path as the server's
/// manifest names it to the size and CRC-32C of what arrived.
pub fn check_server_manifest(
    manifest: &[u8],
    received: &HashMap<String, (u64, u32)>,
) -> EngineResult<()> {
    let bad = |why: String| EngineError::Failed(format!("backup_manifest check failed: {why}"));
    let doc: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| bad(format!("not JSON: {e}")))?;
    if !crate::incremental::manifest_checksum_ok(manifest) {
        return Err(bad(
            "its Manifest-Checksum does not match its contents".into()
        ));
    }
    let files = doc
        .get("Files")
        .and_then(|f| f.as_array())
        .ok_or_else(|| bad("no Files list".into()))?;
    for file in files {
        let path = match (file.get("Path"), file.get("Encoded-Path")) {
            (Some(p), _) => p.as_str().unwrap_or_default().to_string(),
            (None, Some(enc)) => {
                let bytes = hex::decode(enc.as_str().unwrap_or_default())
                    .map_err(|e| bad(format!("Encoded-Path: {e}")))?;
                String::from_utf8_lossy(&bytes).into_owned()
            }
            (None, None) => return Err(bad("a file without a path".into())),
        };
        let size = file
            .get("Size")
            .and_then(|s| s.as_u64())
            .unwrap_or(u64::MAX);
        let Some(&(got_size, crc)) = received.get(&path) else {
            return Err(bad(format!("{path} is listed but was not received")));
        };
        if got_size != size {
            return Err(bad(format!(
                "{path}: received {got_size} bytes, the server listed {size}"
            )));
        }
        if file.get("Checksum-Algorithm").and_then(|a| a.as_str()) == Some("CRC32C") {
            let expected = file
                .get("Checksum")
                .and_then(|c| c.as_str())
                .unwrap_or_default();
            // PostgreSQL writes the CRC's in-memory (little-endian) bytes as hex.
            let got = hex::encode(crc.to_le_bytes());
            if !got.eq_ignore_ascii_case(expected) {
                return Err(bad(format!(
                    "{path}: CRC-32C {got} differs from the server's {expected}"
                )));
            }
        }
    }
    Ok(())
}

/// A visibility map held back until the end of its tablespace's archive.
struct DeferredMap {
    entry: FileEntry,
    rel: RelFile,
    tablespace: Option<u32>,
    plans: Vec<BlockPlan>,
    size: u64,
}

/// What [`BlockPipeline::end`] learns of the files received.
struct Ends {
    /// Size and CRC-32C of each file as sent, by the server's manifest path.
    received: HashMap<String, (u64, u32)>,
    /// Entries of the server's manifest that change in the stored backup.
    changes: HashMap<String, ManifestChange>,
    heap: HeapChanges,
    /// Visibility maps waiting for the end of their tablespace's archive.
    maps: Vec<DeferredMap>,
    block_size: usize,
    segment_pages: Option<u64>,
}

/// Plans the last blocks of a file rebuilt from an incremental one and
/// records its whole name and size for the rewritten server manifest;
/// returns the size.
fn finish_rebuilt(
    f: &OpenFile,
    inc: IncrementalFile,
    plans: &mut Vec<BlockPlan>,
    ends: &mut Ends,
) -> EngineResult<u64> {
    let size = inc
        .finish(plans)
        .map_err(|e| EngineError::Failed(format!("{}: {e}", f.manifest_path)))?;
    let full = full_name(&f.manifest_path).expect("an INCREMENTAL. name");
    ends.changes.insert(
        f.manifest_path.clone(),
        ManifestChange {
            path: full,
            size,
            crc32c: None,
        },
    );
    Ok(size)
}

/// The contents of a block for the hashing pool.
enum BlockSource {
    Raw(Vec<u8>),
    /// Rebuilt from an earlier backup's block (read by the pool thread);
    /// see [`BlockPlan::Build`].
    Build {
        base: Option<BlockRef>,
        keep: usize,
        len: usize,
        pages: Vec<(usize, Vec<u8>)>,
    },
}

type Prepared = EngineResult<(PreparedBlock, Vec<u8>)>;

/// A few consecutive blocks for the hashing pool and where to send the
/// prepared results, in the same order.
type PoolJob = (Vec<BlockSource>, oneshot::Sender<Vec<Prepared>>);

/// Work for the writer thread, in stream order.
enum Work {
    Begin(FileEntry),
    /// Consecutive blocks prepared by a pool thread: how many, and where
    /// their results arrive.
    Blocks(usize, oneshot::Receiver<Vec<Prepared>>),
    /// A small block hashed and compressed where it arrived.
    Ready(PreparedBlock, Vec<u8>),
    /// A block of an earlier backup, taken as it is.
    Reuse(BlockRef),
    End {
        size: u64,
        crc32c: Option<u32>,
    },
    Other(FileEntry),
}

/// Work items the network side gathers before handing them to the writer.
const BATCH_ITEMS: usize = 64;
/// Bytes of blocks after which a batch goes to the writer however few its
/// items: with [`WORK_BATCHES`] batches queued this bounds what waits for
/// the writer to about what 64 separate blocks used to.
const BATCH_BYTES: usize = 1 << 20;
/// Batches that may wait for the writer.
const WORK_BATCHES: usize = 8;
/// Blocks up to this size are hashed and compressed on the network task.
const INLINE_BLOCK: usize = 32 * 1024;
/// Bytes of consecutive blocks handed to a pool thread at once (eight
/// blocks of the default 128 KiB, one block of 1 MiB or more): one
/// hand-over and one wake-up of each side for several blocks instead of one
/// per block, and no more in flight than [`BATCH_BYTES`] per job.
const POOL_BATCH_BYTES: usize = 1 << 20;

/// What the writer thread ends with: the files, the packing figures and the
/// blocks the backup's index run must list.
type Written = (Vec<FileEntry>, BackupStats, AddedBlocks);

type WriterThread = std::thread::JoinHandle<EngineResult<Written>>;

/// Hashing and compression on a thread pool; packing, in stream order, on a
/// writer thread. Both channels are bounded: a slow repository slows the
/// network read instead of filling memory.
///
/// Work goes to the writer in batches ([`BATCH_ITEMS`] items or
/// [`BATCH_BYTES`] of blocks, whichever comes first), larger blocks go to
/// the pool [`POOL_BATCH_BYTES`] at a time, and blocks of at most
/// [`INLINE_BLOCK`] bytes are prepared where they arrive: a data directory
/// of many small relations is tens of thousands of one-page files, and
/// handing each to two other threads cost more in wake-ups than hashing and
/// compressing it. At 128 KiB a block, one hand-over per block woke the
/// pool, the network task and the writer some 6,000 times a second.
///
/// A stage that stops on an error hands that error to the network side:
/// when the writer stops (a pack it could not store: a full disk, a refused
/// upload), the next hand-over finds its queue closed and reports the
/// writer's own error, never "the writer stopped".
struct BlockPipeline {
    work_tx: mpsc::Sender<Vec<Work>>,
    batch: Vec<Work>,
    batch_bytes: usize,
    /// Blocks gathered for the next pool job; handed over before any other
    /// work, so the writer sees everything in stream order.
    pool_batch: Vec<BlockSource>,
    /// How many blocks make a pool job.
    pool_blocks: usize,
    repo: Repository,
    known: Arc<BlockIndex>,
    pool_tx: Option<mpsc::Sender<PoolJob>>,
    /// Taken by whoever first learns that the writer ended.
    writer: Mutex<Option<WriterThread>>,
    pool: Vec<std::thread::JoinHandle<()>>,
}

impl BlockPipeline {
    fn start(repo: &Repository, known: BlockIndex) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        // Pool threads only ask whether a block is stored; the index's
        // entries stay in its cache files, so sharing it costs nothing.
        let known_hashes = Arc::new(known.clone());
        // A tokio channel: the network task waits for room asynchronously,
        // the pool threads block on it.
        let (pool_tx, pool_rx) = mpsc::channel::<PoolJob>(threads * 2);
        let pool_rx = Arc::new(Mutex::new(pool_rx));
        let pool = (0..threads)
            .map(|_| {
                let (rx, repo, known) = (pool_rx.clone(), repo.clone(), known_hashes.clone());
                std::thread::spawn(move || prepare_blocks(&rx, &repo, &known))
            })
            .collect();
        let (work_tx, work_rx) = mpsc::channel::<Vec<Work>>(WORK_BATCHES);
        let writer = repo.block_writer(known);
        let writer = std::thread::spawn(move || write_blocks(work_rx, writer));
        BlockPipeline {
            work_tx,
            batch: Vec::with_capacity(BATCH_ITEMS),
            batch_bytes: 0,
            pool_batch: Vec::new(),
            pool_blocks: (POOL_BATCH_BYTES / repo.block_size().max(1)).max(1),
            repo: repo.clone(),
            known: known_hashes,
            pool_tx: Some(pool_tx),
            writer: Mutex::new(Some(writer)),
            pool,
        }
    }

    /// Queues `work` for the writer after the blocks gathered for the pool,
    /// handing the batch over when full.
    async fn send(&mut self, work: Work) -> EngineResult<()> {
        self.submit_pool().await?;
        self.queue(work).await
    }

    /// Hands the blocks gathered for the pool to it, and their place in the
    /// stream to the writer.
    async fn submit_pool(&mut self) -> EngineResult<()> {
        if self.pool_batch.is_empty() {
            return Ok(());
        }
        let sources = std::mem::replace(&mut self.pool_batch, Vec::with_capacity(self.pool_blocks));
        let count = sources.len();
        let (tx, rx) = oneshot::channel();
        let pool_tx = self.pool_tx.as_ref().expect("pool open until finish");
        // The pool queue is short and drains at compression speed; waiting
        // for room here is the backpressure. Pool threads send their errors
        // in the reply and end only when the queue closes, so a closed
        // queue here means they panicked.
        pool_tx
            .send((sources, tx))
            .await
            .map_err(|_| EngineError::Failed("the compression threads panicked".into()))?;
        self.queue(Work::Blocks(count, rx)).await
    }

    /// Queues `work` for the writer as it is, handing the batch over when
    /// full.
    async fn queue(&mut self, work: Work) -> EngineResult<()> {
        self.batch_bytes += match &work {
            Work::Blocks(count, _) => count * self.repo.block_size(),
            Work::Ready(_, raw) => raw.len(),
            _ => 0,
        };
        self.batch.push(work);
        if self.batch.len() >= BATCH_ITEMS || self.batch_bytes >= BATCH_BYTES {
            self.hand_over().await?;
        }
        Ok(())
    }

    /// Hands everything gathered so far to the pool and the writer.
    async fn flush(&mut self) -> EngineResult<()> {
        self.submit_pool().await?;
        self.hand_over().await
    }

    /// Hands the writer's batch over.
    async fn hand_over(&mut self) -> EngineResult<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_ITEMS));
        self.batch_bytes = 0;
        if self.work_tx.send(batch).await.is_ok() {
            return Ok(());
        }
        // The writer dropped its queue, so it has returned (or is
        // returning): its error is the cause to report.
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let stopped = || EngineError::Failed("the block writer stopped without an error".into());
        let Some(writer) = writer else {
            return Err(stopped());
        };
        match join_writer(writer).await {
            Err(e) => Err(e),
            Ok(_) => Err(stopped()),
        }
    }

    async fn begin(&mut self, file: FileEntry) -> EngineResult<()> {
        self.send(Work::Begin(file)).await
    }

    async fn other(&mut self, file: FileEntry) -> EngineResult<()> {
        self.send(Work::Other(file)).await
    }

    async fn block(&mut self, raw: Vec<u8>) -> EngineResult<()> {
        self.source(BlockSource::Raw(raw)).await
    }

    async fn source(&mut self, source: BlockSource) -> EngineResult<()> {
        let source = match source {
            BlockSource::Raw(raw) if raw.len() <= INLINE_BLOCK => {
                let known = &self.known;
                let prepared = BlockWriter::prepare(&self.repo, &raw, |h| known.contains(h));
                return self.send(Work::Ready(prepared, raw)).await;
            }
            other => other,
        };
        self.pool_batch.push(source);
        if self.pool_batch.len() >= self.pool_blocks {
            self.submit_pool().await?;
        }
        Ok(())
    }

    /// One block of a file rebuilt from an incremental one.
    async fn plan(&mut self, plan: BlockPlan) -> EngineResult<()> {
        match plan {
            BlockPlan::Reuse(block) => self.send(Work::Reuse(block)).await,
            BlockPlan::Build {
                base,
                keep,
                len,
                pages,
            } => {
                self.source(BlockSource::Build {
                    base,
                    keep,
                    len,
                    pages,
                })
                .await
            }
        }
    }

    /// Closes the file being received: records what arrived (for the
    /// check against the server's manifest) and what the manifest must
    /// say instead when the stored file differs from the one sent.
    async fn end(&mut self, f: &mut OpenFile, ends: &mut Ends) -> EngineResult<()> {
        let block_size = ends.block_size;
        match std::mem::replace(&mut f.content, Content::Plain) {
            Content::Plain => {
                if !f.block.is_empty() {
                    let last = std::mem::take(&mut f.block);
                    self.block(last).await?;
                }
                self.send(Work::End {
                    size: f.size,
                    crc32c: Some(f.crc),
                })
                .await?;
            }
            Content::Incremental { inc, main } => {
                if let (Some(rel), Some(segment_pages)) = (&main, ends.segment_pages) {
                    ends.heap
                        .listed(f.tablespace, rel, inc.listed_blocks(), segment_pages);
                }
                let mut plans = Vec::new();
                let size = finish_rebuilt(f, *inc, &mut plans, ends)?;
                for plan in plans {
                    self.plan(plan).await?;
                }
                // The CRC of the whole file would need every unchanged
                // block read back; the blocks' own hashes check it instead.
                self.send(Work::End { size, crc32c: None }).await?;
            }
            Content::Label(mut entry, sent) => {
                let label = strip_backup_label(&sent);
                entry.size = label.len() as u64;
                self.whole_file(entry, &label, block_size).await?;
                ends.changes.insert(
                    f.manifest_path.clone(),
                    ManifestChange {
                        path: f.manifest_path.clone(),
                        size: label.len() as u64,
                        crc32c: Some(crc32c::crc32c(&label)),
                    },
                );
            }
            Content::Map {
                inc,
                rel,
                mut entry,
                mut plans,
            } => {
                let size = finish_rebuilt(f, *inc, &mut plans, ends)?;
                entry.size = size;
                ends.maps.push(DeferredMap {
                    entry,
                    rel,
                    tablespace: f.tablespace,
                    plans,
                    size,
                });
            }
        }
        ends.received
            .insert(std::mem::take(&mut f.manifest_path), (f.size, f.crc));
        Ok(())
    }

    /// Stores a visibility map held back by [`BlockPipeline::end`], with
    /// its stale pages zeroed.
    async fn map(
        &mut self,
        map: DeferredMap,
        heap: &HeapChanges,
        base: &IncrementalBase,
        block_size: usize,
    ) -> EngineResult<()> {
        let plans = heap.guard_map(
            map.tablespace,
            &map.rel,
            map.plans,
            base.page_size,
            block_size,
            base.segment_pages,
        );
        self.begin(map.entry).await?;
        for plan in plans {
            self.plan(plan).await?;
        }
        self.send(Work::End {
            size: map.size,
            crc32c: None,
        })
        .await
    }

    /// Stores a file held in memory as one entry.
    async fn whole_file(
        &mut self,
        file: FileEntry,
        data: &[u8],
        block_size: usize,
    ) -> EngineResult<()> {
        self.begin(file).await?;
        for chunk in data.chunks(block_size) {
            self.block(chunk.to_vec()).await?;
        }
        self.send(Work::End {
            size: data.len() as u64,
            crc32c: Some(crc32c::crc32c(data)),
        })
        .await
    }

    async fn finish(mut self) -> EngineResult<Written> {
        self.flush().await?;
        drop(self.work_tx);
        self.pool_tx.take();
        let writer = self
            .writer
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| EngineError::Failed("the block writer was already joined".into()))?;
        let result = join_writer(writer).await;
        let pool = std::mem::take(&mut self.pool);
        let _ = tokio::task::spawn_blocking(move || {
            for t in pool {
                let _ = t.join();
            }
        })
        .await;
        result
    }
}

/// A pool thread: reads or rebuilds each block handed to it, hashes and
/// compresses it, and replies; ends when the queue closes.
fn prepare_blocks(rx: &Mutex<mpsc::Receiver<PoolJob>>, repo: &Repository, known: &BlockIndex) {
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
        let Some((sources, reply)) = next else { break };
        let prepared = sources
            .into_iter()
            .map(|source| prepare_block(source, repo, known))
            .collect();
        let _ = reply.send(prepared);
    }
}

fn prepare_block(source: BlockSource, repo: &Repository, known: &BlockIndex) -> Prepared {
    let raw = match source {
        BlockSource::Raw(raw) => raw,
        BlockSource::Build {
            base,
            keep,
            len,
            pages,
        } => {
            let base = base.map(|b| repo.read_block(&b)).transpose()?;
            BlockPlan::assemble(keep, len, base, pages)
        }
    };
    Ok((BlockWriter::prepare(repo, &raw, |h| known.contains(h)), raw))
}

/// The writer thread: packs the prepared blocks in stream order and builds
/// the file entries; returns them with the packing figures once the work
/// queue closes.
fn write_blocks(
    mut work_rx: mpsc::Receiver<Vec<Work>>,
    mut writer: strata_repo::BlockWriter,
) -> EngineResult<Written> {
    let mut files = Vec::new();
    let mut current: Option<FileEntry> = None;
    while let Some(batch) = work_rx.blocking_recv() {
        for work in batch {
            write_one(work, &mut writer, &mut files, &mut current)?;
        }
    }
    let (stats, added) = writer.finish_indexed()?;
    Ok((files, stats, added))
}

fn write_one(
    work: Work,
    writer: &mut strata_repo::BlockWriter,
    files: &mut Vec<FileEntry>,
    current: &mut Option<FileEntry>,
) -> EngineResult<()> {
    {
        match work {
            Work::Begin(file) => *current = Some(file),
            Work::Blocks(_, reply) => {
                let prepared = reply
                    .blocking_recv()
                    .map_err(|_| EngineError::Failed("a compression thread panicked".into()))?;
                let Some(f) = current.as_mut() else {
                    return Err(EngineError::Failed("block outside a file".into()));
                };
                for one in prepared {
                    let (prepared, raw) = one?;
                    f.blocks.push(writer.add_prepared(prepared, &raw)?);
                }
            }
            Work::Ready(prepared, raw) => {
                let block = writer.add_prepared(prepared, &raw)?;
                match current.as_mut() {
                    Some(f) => f.blocks.push(block),
                    None => return Err(EngineError::Failed("block outside a file".into())),
                }
            }
            Work::Reuse(block) => {
                let block = writer.add_existing(&block);
                match current.as_mut() {
                    Some(f) => f.blocks.push(block),
                    None => return Err(EngineError::Failed("block outside a file".into())),
                }
            }
            Work::End { size, crc32c } => {
                let mut f = current
                    .take()
                    .ok_or_else(|| EngineError::Failed("file end outside a file".into()))?;
                let stored: u64 = f.blocks.iter().map(|b| b.raw_len as u64).sum();
                if stored != size {
                    return Err(EngineError::Failed(format!(
                        "{}: {stored} bytes stored for a file of {size}",
                        f.path
                    )));
                }
                f.size = size;
                f.crc32c = crc32c;
                files.push(f);
            }
            Work::Other(f) => files.push(f),
        }
    }
    Ok(())
}

/// Waits for the writer thread off the async runtime and returns what it
/// returned.
async fn join_writer(writer: WriterThread) -> EngineResult<Written> {
    tokio::task::spawn_blocking(move || {
        writer
            .join()
            .map_err(|_| EngineError::Failed("the block writer panicked".into()))?
    })
    .await
    .map_err(|e| EngineError::Failed(format!("block writer: {e}")))?
}

fn wal_stream_error(e: pg_replication::ReplicationError) -> EngineError {
    let msg = format!("WAL stream for the backup: {e}");
    if e.is_transient() {
        EngineError::Unreachable(msg)
    } else {
        EngineError::Server(msg)
    }
}

/// Streams the WAL from the backup's start until its stop position is
/// stored (complete segments, or a partial one if the server does not
/// finish the segment soon, as on a standby).
#[allow(clippy::too_many_arguments)]
async fn stream_backup_wal(
    engine: Engine,
    instance_id: InstanceId,
    session: Session,
    slot: String,
    start: Lsn,
    timeline: TimelineId,
    geometry: WalGeometry,
    status_interval: Duration,
    stop_rx: watch::Receiver<Option<Lsn>>,
) -> EngineResult<()> {
    let seg_start = geometry.segment_start(geometry.segment_of(start));
    // Segments this stream stores first carry the recovery events too
    // (named when listed: names are the receiver's).
    let events = engine.settings.recovery_events.then_some(EventOptions {
        names: None,
        min_rows: engine.settings.event_min_rows,
    });
    let timeouts = (status_interval, engine.settings.wal_receiver_timeout);
    let uploader = WalUploader::start(engine, &instance_id, seg_start);
    let archiver =
        SegmentArchiver::new(geometry, timeline, start, uploader.queue()).with_events(events);
    let streamed = stream_wal_to(archiver, session, slot, timeline, timeouts, stop_rx).await;
    // Done only once the uploader stored all of it; a storing failure is the cause.
    let (_, stored) = uploader.finish().await;
    stored.and(streamed)
}

/// Feeds `archiver` until its stop position is handed over.
async fn stream_wal_to(
    mut archiver: SegmentArchiver,
    mut session: Session,
    slot: String,
    timeline: TimelineId,
    (status_interval, receiver_timeout): (Duration, Duration),
    mut stop_rx: watch::Receiver<Option<Lsn>>,
) -> EngineResult<()> {
    let seg_start = archiver.position();
    let mut stream = session
        .client
        .start_replication(Some(&slot), seg_start, Some(timeline))
        .await
        .map_err(wal_stream_error)?;
    let mut ticker = tokio::time::interval(status_interval);
    let mut silence = Silence::new(receiver_timeout);
    let mut grace: Option<Instant> = None;
    loop {
        let stop = *stop_rx.borrow();
        if let Some(stop) = stop {
            if archiver.complete_end() >= stop {
                break;
            }
            if archiver.position() >= stop {
                let deadline =
                    *grace.get_or_insert_with(|| Instant::now() + Duration::from_secs(3));
                if Instant::now() >= deadline {
                    archiver.flush_partial().await?;
                    break;
                }
            }
        }
        tokio::select! {
            msg = tokio::time::timeout_at(silence.deadline(), stream.next()) => {
                // A message that is ready wins over the deadline.
                let Ok(msg) = msg else {
                    let pos = archiver.position();
                    let silent = silence.at_deadline(&mut stream, pos, pos).await
                        .map_err(wal_stream_error)?;
                    if let Some(quiet) = silent {
                        return Err(EngineError::Unreachable(format!(
                            "the server sent nothing on the backup's WAL stream for {} s, not even when \
                             asked to answer (wal.receiver_timeout_secs)",
                            quiet.as_secs()
                        )));
                    }
                    continue;
                };
                match msg.map_err(wal_stream_error)? {
                    Some(ReplicationMessage::XLogData { start, data, .. }) => archiver.push(start, &data).await?,
                    Some(ReplicationMessage::Keepalive { reply_requested, .. }) => {
                        if reply_requested {
                            let pos = archiver.position();
                            stream.send_status(pos, pos, Lsn::INVALID, false).await
                                .map_err(wal_stream_error)?;
                        }
                    }
                    Some(ReplicationMessage::EndOfTimeline { next_timeline, .. }) => {
                        return Err(EngineError::Failed(format!(
                            "the server switched to timeline {next_timeline} during the backup"
                        )));
                    }
                    None => return Err(EngineError::Failed("the server ended the backup's WAL stream".into())),
                }
                silence.heard();
            }
            _ = ticker.tick() => {
                let pos = archiver.position();
                stream.send_status(pos, pos, Lsn::INVALID, false).await
                    .map_err(wal_stream_error)?;
            }
            changed = stop_rx.changed() => {
                if changed.is_err() {
                    return Err(EngineError::Interrupted);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)), if grace.is_some() => {}
        }
    }
    // The temporary slot disappears with the connection.
    let _ = stream.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use strata_repo::{LocalStorage, ObjectSize, Storage, StorageError};

    /// What SHOW says of pages and segments is checked before incremental
    /// arithmetic relies on it (a 1-byte page underflowed the visibility
    /// map's page header subtraction).
    #[test]
    fn page_and_segment_sizes_are_checked() {
        let block = 128 * 1024;
        assert_eq!(page_geometry("8192", "1GB", block), Ok((8192, 131072)));
        assert_eq!(page_geometry("1024", "64GB", block), Ok((1024, 64 << 20)));
        assert_eq!(page_geometry("32768", "32kB", block), Ok((32768, 1)));
        for bad in ["1", "0", "24", "512", "3000", "65536", "-8192", "8k", ""] {
            let err = page_geometry(bad, "1GB", block).unwrap_err();
            assert_eq!(
                err,
                format!("block_size {bad:?} is not a power of two from 1024 to 32768")
            );
        }
        for bad in [
            "0",
            "4kB",
            "12289",
            "65GB",
            "1TB",
            "18446744073709551615",
            "x",
        ] {
            let err = page_geometry("8192", bad, block).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "segment_size {bad:?} is not a whole number of 8192-byte pages up to 64 GiB"
                )
            );
        }
        assert_eq!(
            page_geometry("32768", "1GB", 16384).unwrap_err(),
            "the repository's 16384-byte blocks are not whole 32768-byte pages"
        );
    }

    /// A local directory whose file system is full for packs.
    #[derive(Debug)]
    struct FullForPacks(LocalStorage);

    impl Storage for FullForPacks {
        fn put(&self, key: &str, data: &[u8]) -> strata_repo::storage::StorageResult<()> {
            if key.starts_with("packs/") {
                return Err(StorageError::Io {
                    key: key.to_string(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            self.0.put(key, data)
        }
        fn get(&self, key: &str) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.0.get(key)
        }
        fn get_range(
            &self,
            key: &str,
            offset: u64,
            len: u64,
        ) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.0.get_range(key, offset, len)
        }
        fn list(&self, prefix: &str) -> strata_repo::storage::StorageResult<Vec<String>> {
            self.0.list(prefix)
        }
        fn list_sizes(&self, prefix: &str) -> strata_repo::storage::StorageResult<Vec<ObjectSize>> {
            self.0.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> strata_repo::storage::StorageResult<()> {
            self.0.delete(key)
        }
        fn exists(&self, key: &str) -> strata_repo::storage::StorageResult<bool> {
            self.0.exists(key)
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
    }

    /// Random bytes, so every block is new and packs fill.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The writer thread stops on the pack it cannot store; the side that
    /// feeds it reports that error, not that the writer went away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writers_error_reaches_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(FullForPacks(
            LocalStorage::new(dir.path())
                .unwrap()
                .with_min_free(strata_repo::MinFreeSpace::NONE),
        ));
        let repo = Repository::open_or_init(storage).unwrap();
        let mut pipeline = BlockPipeline::start(&repo, strata_repo::BlockIndex::default());
        let block = repo.block_size();
        let file = FileEntry {
            tablespace: None,
            path: "base/1/1".into(),
            kind: FileKind::File,
            mode: 0o600,
            size: 0,
            mtime: 0,
            link_target: None,
            crc32c: None,
            blocks: Vec::new(),
        };
        let mut outcome = pipeline.begin(file).await;
        // Far more than the packs the writer and its upload queue hold.
        for i in 0..(8 * strata_repo::DEFAULT_PACK_SIZE / block) as u64 {
            if outcome.is_err() {
                break;
            }
            outcome = pipeline.block(noise(block, i)).await;
        }
        let err = match outcome {
            Err(e) => e,
            Ok(()) => pipeline.finish().await.map(|_| ()).unwrap_err(),
        };
        let text = err.to_string();
        assert!(text.contains("No space left on device"), "{text}");
        assert!(text.contains("packs/"), "{text}");
        assert!(!text.contains("stopped"), "{text}");
    }

    use std::collections::VecDeque;

    use bytes::Bytes;
    use pg_replication::TarReader;

    /// A ustar member whose name and link are written byte for byte, as a
    /// hostile server could (the `tar` crate's own setters refuse `..`).
    fn member(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        let ustar = h.as_ustar_mut().expect("a ustar header");
        ustar.name[..name.len()].copy_from_slice(name.as_bytes());
        ustar.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    /// Files of every size class around the inline limit and the block
    /// size, many of them, some repeated: each comes back from the
    /// repository whole, in stream order, whichever path its blocks took.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_and_large_files_keep_their_order_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path())
            .unwrap()
            .with_min_free(strata_repo::MinFreeSpace::NONE);
        let repo = Repository::open_or_init(Arc::new(storage)).unwrap();
        let mut pipeline = BlockPipeline::start(&repo, strata_repo::BlockIndex::default());
        let block = repo.block_size();
        let sizes = [
            0,
            1,
            8192,
            INLINE_BLOCK,
            INLINE_BLOCK + 1,
            block,
            block + 8192,
            3 * block,
        ];
        // Every seventh file repeats an earlier one: deduplicated blocks.
        let mut plan: Vec<(String, usize, u64)> = (0..400u64)
            .map(|i| {
                let len = sizes[i as usize % sizes.len()];
                let seed = if i % 7 == 0 { i / 7 } else { i + 1000 };
                (format!("base/5/{i}"), len, seed)
            })
            .collect();
        // Files of exactly one pool job and of two jobs and a remainder,
        // between small ones.
        for (i, len) in [8 * block, 1, 17 * block + 8192, 8192, 9 * block]
            .into_iter()
            .enumerate()
        {
            plan.push((format!("base/6/{i}"), len, 5000 + i as u64));
        }
        let mut expected = Vec::new();
        for (path, len, seed) in plan {
            let data = noise(len, seed);
            let entry = FileEntry {
                tablespace: None,
                path: path.clone(),
                kind: FileKind::File,
                mode: 0o600,
                size: len as u64,
                mtime: 0,
                link_target: None,
                crc32c: None,
                blocks: Vec::new(),
            };
            pipeline.whole_file(entry, &data, block).await.unwrap();
            expected.push((path, data));
        }
        let (files, stats, _) = pipeline.finish().await.unwrap();
        assert_eq!(files.len(), expected.len());
        assert!(stats.dedup_blocks > 0, "{stats:?}");
        for (file, (path, data)) in files.iter().zip(&expected) {
            assert_eq!(&file.path, path);
            assert_eq!(file.size, data.len() as u64);
            let mut back = Vec::new();
            for b in &file.blocks {
                back.extend(repo.read_block(b).unwrap());
            }
            assert_eq!(&back, data, "{path}");
        }
    }

    /// Runs a crafted archive through the tar parser and the backup's entry
    /// check, as the backup does with the server's stream.
    fn store(tablespace: Option<u32>, archive: Vec<u8>) -> EngineResult<Vec<FileEntry>> {
        let mut reader = TarReader::new();
        let mut events = VecDeque::new();
        reader
            .feed(Bytes::from(archive), &mut events)
            .expect("a well-formed archive");
        reader.finish().expect("a complete archive");
        events
            .into_iter()
            .filter_map(|e| match e {
                BaseBackupEvent::Entry(entry) => Some(file_entry(tablespace, &entry)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hostile_tar_names_fail_the_backup_naming_the_entry() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let good = [
            member("./pg_wal/archive_status", Directory, "", b""),
            member("base", Directory, "", b""),
            member("base/1/1259", Regular, "", b"x"),
            member("pg_tblspc/16384", Symlink, "/srv/ts", b""),
        ]
        .concat();
        let stored = store(None, good).unwrap();
        assert_eq!(stored.len(), 4);
        assert_eq!(stored[3].kind, FileKind::Symlink);

        for (tablespace, name, kind, link) in [
            (None, "/tmp/pwned", Regular, ""),
            (None, "../../pwned", Regular, ""),
            (None, "base/../../pwned", Directory, ""),
            (None, "base//x", Regular, ""),
            (None, "././base", Regular, ""),
            (None, "base/evil", Symlink, "/tmp"),
            (None, "pg_wal", Symlink, "/tmp"),
            (Some(16384), "pg_tblspc/16384", Symlink, "/tmp"),
            (Some(16384), "../x", Regular, ""),
        ] {
            let archive = [
                member("PG_VERSION", Regular, "", b"15\n"),
                member(name, kind, link, b""),
            ]
            .concat();
            let err = store(tablespace, archive).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{name:?}")) && err.contains("refuses"),
                "{name}: {err}"
            );
        }
    }
}
