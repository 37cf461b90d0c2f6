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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use pg_replication::{BaseBackupEvent, BaseBackupOptions, ReplicationMessage, TarEntryKind};
use pg_wal::{Lsn, TimelineId, WalGeometry};
use strata_catalog::{BackupSet, BackupStatus, Instance, Job, JobState};
use strata_repo::{
    BackupManifest, BackupStats, BlockHash, BlockWriter, FileEntry, FileKind, PreparedBlock,
    Repository, TablespaceEntry,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::connect::{explain, open_session, remember_facts, Session};
use crate::segment::SegmentArchiver;
use crate::{Engine, EngineError, EngineResult, Progress};

/// Backup set ids are the start time in milliseconds: numeric like RDS ids,
/// and sorting by id sorts by age. Two backups starting in the same
/// millisecond take the next free one (the catalog refuses duplicates).
fn new_backup_id(attempt: i64) -> String {
    (Utc::now().timestamp_millis() + attempt).to_string()
}

/// How a backup runs.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// "Manual" or "Automated", as RDS names backup modes.
    pub mode: String,
    /// Server-side read limit in kB/s (BASE_BACKUP MAX_RATE, 32..=1048576).
    pub max_rate_kb: Option<u32>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            mode: "Manual".into(),
            max_rate_kb: None,
        }
    }
}

/// A backup whose job and backup set are recorded (job `NoStart`, set
/// `Running`) but whose transfer has not begun: the service answers the
/// caller with the job id, then runs it.
#[derive(Debug)]
pub struct PendingBackup {
    pub job: Job,
    pub set: BackupSet,
    instance: Instance,
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
        if let Some(rate) = opts.max_rate_kb {
            if !(32..=1_048_576).contains(&rate) {
                return Err(EngineError::Refused(format!(
                    "max rate must be between 32 and 1048576 kB/s, got {rate}"
                )));
            }
        }
        let instance = self.catalog.get_instance(instance_id)?;
        self.catalog.fail_orphaned_jobs()?;
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
        let mut job = self.catalog.create_job("backup", Some(instance_id))?;
        let mut set = BackupSet::started(
            new_backup_id(0),
            instance_id,
            &opts.mode,
            Utc::now(),
            Some(job.id),
        );
        let mut attempt = 0;
        loop {
            match self.catalog.insert_backup(&set) {
                Ok(()) => break,
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
        self.catalog.update_job(&job)?;

        let outcome = match self.gc_guard(false) {
            Ok(_guard) => {
                self.run_backup(&mut instance, &mut set, &mut job, opts, progress)
                    .await
            }
            Err(e) => Err(e),
        };
        let now = Utc::now();
        set.finished_at = Some(now);
        job.finished_at = Some(now);
        match outcome {
            Ok(()) => {
                set.status = BackupStatus::Success;
                job.state = JobState::Finished;
                job.progress = 100;
                self.catalog.update_backup(&set)?;
                self.catalog.update_job(&job)?;
                Ok(set)
            }
            Err(e) => {
                set.status = BackupStatus::Failed;
                set.error = Some(e.to_string());
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
                // The original error matters more than a failure to record it.
                let _ = self.catalog.update_backup(&set);
                let _ = self.catalog.update_job(&job);
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

        let mut wal_session = open_session(instance).await?;
        let slot = format!("strata_backup_{}_{:08x}", std::process::id(), rand_u32());
        wal_session
            .client
            .create_physical_slot(&slot, true, true)
            .await
            .map_err(|e| explain(instance, e))?;

        progress.message(&format!("backup {}: checkpoint requested", set.id));
        let mut bb = main
            .client
            .base_backup(&BaseBackupOptions {
                label: format!("strata backup {}", set.id),
                fast_checkpoint: true,
                progress: true,
                manifest: true,
                max_rate_kb: opts.max_rate_kb,
                tablespace_map: true,
            })
            .await
            .map_err(|e| explain(instance, e))?;
        let start_lsn = bb.start_lsn();
        let start_tli = bb.start_timeline();
        let start_time = Utc::now();
        let total = bb.total_size_bytes();
        set.start_lsn = Some(start_lsn);
        set.start_timeline = Some(start_tli);
        self.catalog.update_backup(set)?;
        job.state = JobState::Uploading;
        self.catalog.update_job(job)?;

        let (stop_tx, stop_rx) = watch::channel(None);
        let wal_task = tokio::spawn(stream_backup_wal(
            self.clone(),
            instance.id.clone(),
            wal_session,
            slot,
            start_lsn,
            start_tli,
            geometry,
            self.settings.wal_status_interval,
            stop_rx,
        ));

        let known = self.repo.block_index(&instance.id)?;
        let pipeline = BlockPipeline::start(&self.repo, known);
        let mut tablespaces = Vec::new();
        let mut tablespace: Option<u32> = None;
        let mut open: Option<OpenFile> = None;
        let mut received: HashMap<String, (u64, u32)> = HashMap::new();
        let mut server_manifest = Vec::new();
        let mut finished: Option<(Lsn, TimelineId)> = None;
        let mut last_report = Instant::now();
        let mut streamed: u64 = 0;
        let block_size = self.repo.block_size();

        while let Some(event) = bb.next().await.map_err(|e| explain(instance, e))? {
            match event {
                BaseBackupEvent::ArchiveStart {
                    tablespace_oid,
                    location,
                    ..
                } => {
                    tablespace = tablespace_oid;
                    if let (Some(oid), Some(location)) = (tablespace_oid, location) {
                        tablespaces.push(TablespaceEntry { oid, location });
                    }
                }
                BaseBackupEvent::Entry(entry) => {
                    if open.is_some() {
                        return Err(EngineError::Failed(
                            "the server started a new file before finishing the previous one"
                                .into(),
                        ));
                    }
                    let path = entry.path.trim_end_matches('/').to_string();
                    let (kind, link_target) = match &entry.kind {
                        TarEntryKind::File => (FileKind::File, None),
                        TarEntryKind::Directory => (FileKind::Dir, None),
                        TarEntryKind::Symlink { target } => {
                            (FileKind::Symlink, Some(target.clone()))
                        }
                    };
                    let file = FileEntry {
                        tablespace,
                        path: path.clone(),
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
                    };
                    if kind == FileKind::File {
                        pipeline.begin(file).await?;
                        let mut f = OpenFile {
                            manifest_path: manifest_path(tablespace, &path),
                            size: entry.size,
                            remaining: entry.size,
                            crc: 0,
                            block: Vec::with_capacity(block_size),
                        };
                        if f.remaining == 0 {
                            pipeline.end(&mut f, &mut received).await?;
                        } else {
                            open = Some(f);
                        }
                    } else {
                        pipeline.other(file).await?;
                    }
                }
                BaseBackupEvent::Data(mut data) => {
                    let Some(f) = open.as_mut() else {
                        return Err(EngineError::Failed(
                            "the server sent file data outside a file".into(),
                        ));
                    };
                    if data.len() as u64 > f.remaining {
                        return Err(EngineError::Failed(format!(
                            "the server sent more data than the size of {}",
                            f.manifest_path
                        )));
                    }
                    streamed += data.len() as u64;
                    f.remaining -= data.len() as u64;
                    f.crc = crc32c::crc32c_append(f.crc, &data);
                    while !data.is_empty() {
                        let take = (block_size - f.block.len()).min(data.len());
                        f.block.extend_from_slice(&data.split_to(take));
                        if f.block.len() == block_size {
                            let full =
                                std::mem::replace(&mut f.block, Vec::with_capacity(block_size));
                            pipeline.block(full).await?;
                        }
                    }
                    if f.remaining == 0 {
                        let mut f = open.take().expect("open file checked above");
                        pipeline.end(&mut f, &mut received).await?;
                    }
                    if last_report.elapsed() >= Duration::from_millis(500) {
                        last_report = Instant::now();
                        progress.update("backup", streamed, total);
                        if let Some(total) = total.filter(|t| *t > 0) {
                            job.progress = ((streamed * 95 / total).min(95)) as u8;
                            self.catalog.update_job(job)?;
                        }
                    }
                }
                BaseBackupEvent::ArchiveEnd => {
                    if let Some(f) = &open {
                        return Err(EngineError::Failed(format!(
                            "archive ended in the middle of {}",
                            f.manifest_path
                        )));
                    }
                }
                BaseBackupEvent::Progress { .. } => {}
                BaseBackupEvent::Manifest(chunk) => server_manifest.extend_from_slice(&chunk),
                BaseBackupEvent::Finished {
                    end_lsn,
                    end_timeline,
                } => finished = Some((end_lsn, end_timeline)),
            }
        }
        drop(bb);
        let (stop_lsn, stop_tli) = finished.ok_or_else(|| {
            EngineError::Failed("the server ended the backup without its end position".into())
        })?;
        let stop_time = Utc::now();
        progress.update("backup", streamed, Some(streamed));
        set.stop_lsn = Some(stop_lsn);
        set.stop_timeline = Some(stop_tli);

        job.state = JobState::Checking;
        self.catalog.update_job(job)?;
        check_server_manifest(&server_manifest, &received)?;

        progress.message(&format!(
            "backup {}: waiting for WAL up to {stop_lsn}",
            set.id
        ));
        let _ = stop_tx.send(Some(stop_lsn));
        match wal_task.await {
            Ok(result) => result?,
            Err(e) => {
                return Err(EngineError::Failed(format!(
                    "WAL streaming task failed: {e}"
                )))
            }
        }

        let manifest_entry = FileEntry {
            tablespace: None,
            path: "backup_manifest".into(),
            kind: FileKind::File,
            mode: 0o600,
            size: server_manifest.len() as u64,
            mtime: stop_time.timestamp(),
            link_target: None,
            crc32c: None,
            blocks: Vec::new(),
        };
        pipeline
            .whole_file(manifest_entry, &server_manifest, block_size)
            .await?;
        let (mut files, stats) = pipeline.finish().await?;
        let stats = BackupStats {
            // Everything a restore writes, the server's backup_manifest included,
            // so that new + deduplicated bytes add up to the total.
            file_count: files.iter().filter(|f| f.kind == FileKind::File).count() as u64,
            total_bytes: files.iter().map(|f| f.size).sum(),
            ..stats
        };
        let server_manifest_entry = files.pop();
        let manifest = BackupManifest {
            format_version: strata_repo::manifest::MANIFEST_VERSION,
            backup_id: set.id.clone(),
            instance_id: instance.id.clone(),
            system_identifier: main.system_id,
            pg_version_num: pg_version,
            wal_segment_size: geometry.segment_size(),
            label: format!("strata backup {}", set.id),
            mode: set.mode.clone(),
            start_lsn,
            start_timeline: start_tli,
            stop_lsn,
            stop_timeline: stop_tli,
            start_time,
            stop_time,
            tablespaces,
            files,
            server_manifest: server_manifest_entry,
            stats: stats.clone(),
        };
        if let Err(e) = self.repo.commit_manifest(&manifest) {
            // A put that failed may still have landed (a timeout after the
            // store accepted it); this backup is being recorded as failed, so
            // make sure the repository does not hold it either.
            if let Err(cleanup) = self.repo.delete_backup(&instance.id, &set.id) {
                tracing::warn!(
                    "backup {}: removing the manifest after a failed commit: {cleanup}",
                    set.id
                );
            }
            return Err(e.into());
        }
        set.total_bytes = stats.total_bytes;
        set.new_bytes = stats.new_bytes;
        set.dedup_bytes = stats.dedup_bytes;
        set.stored_bytes = stats.stored_bytes;
        set.file_count = stats.file_count;
        Ok(())
    }
}

fn rand_u32() -> u32 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now()) as u32
}

/// The path the server's backup_manifest uses for a file.
fn manifest_path(tablespace: Option<u32>, path: &str) -> String {
    match tablespace {
        Some(oid) => format!("pg_tblspc/{oid}/{path}"),
        None => path.to_string(),
    }
}

struct OpenFile {
    manifest_path: String,
    size: u64,
    remaining: u64,
    crc: u32,
    block: Vec<u8>,
}

/// Compares what was received with the server's own manifest: same files,
/// same sizes, same CRC-32C.
fn check_server_manifest(
    manifest: &[u8],
    received: &HashMap<String, (u64, u32)>,
) -> EngineResult<()> {
    let bad = |why: String| EngineError::Failed(format!("backup_manifest check failed: {why}"));
    let doc: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| bad(format!("not JSON: {e}")))?;
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

/// A block for the hashing pool and where to send the prepared result.
type PoolJob = (Vec<u8>, oneshot::Sender<(PreparedBlock, Vec<u8>)>);

/// Work for the writer thread, in stream order.
enum Work {
    Begin(FileEntry),
    Block(oneshot::Receiver<(PreparedBlock, Vec<u8>)>),
    End(u32),
    Other(FileEntry),
}

/// Hashing and compression on a thread pool; packing, in stream order, on a
/// writer thread. Both channels are bounded: a slow repository slows the
/// network read instead of filling memory.
struct BlockPipeline {
    work_tx: mpsc::Sender<Work>,
    pool_tx: Option<mpsc::Sender<PoolJob>>,
    writer: std::thread::JoinHandle<EngineResult<(Vec<FileEntry>, BackupStats)>>,
    pool: Vec<std::thread::JoinHandle<()>>,
}

impl BlockPipeline {
    fn start(repo: &Repository, known: strata_repo::BlockIndex) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let known_hashes: Arc<HashSet<BlockHash>> = Arc::new(known.hashes().collect());
        // A tokio channel: the network task waits for room asynchronously,
        // the pool threads block on it.
        let (pool_tx, pool_rx) = mpsc::channel::<PoolJob>(threads * 2);
        let pool_rx = Arc::new(Mutex::new(pool_rx));
        let pool = (0..threads)
            .map(|_| {
                let rx = pool_rx.clone();
                let repo = repo.clone();
                let known = known_hashes.clone();
                std::thread::spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
                    let Some((raw, reply)) = next else { break };
                    let prepared = BlockWriter::prepare(&repo, &raw, |h| known.contains(h));
                    let _ = reply.send((prepared, raw));
                })
            })
            .collect();
        let (work_tx, mut work_rx) = mpsc::channel::<Work>(64);
        let mut writer = repo.block_writer(known);
        let writer = std::thread::spawn(move || {
            let mut files = Vec::new();
            let mut current: Option<FileEntry> = None;
            while let Some(work) = work_rx.blocking_recv() {
                match work {
                    Work::Begin(file) => current = Some(file),
                    Work::Block(reply) => {
                        let (prepared, raw) = reply.blocking_recv().map_err(|_| {
                            EngineError::Failed("a compression thread stopped".into())
                        })?;
                        let block = writer.add_prepared(prepared, &raw)?;
                        match current.as_mut() {
                            Some(f) => f.blocks.push(block),
                            None => return Err(EngineError::Failed("block outside a file".into())),
                        }
                    }
                    Work::End(crc) => {
                        let mut f = current
                            .take()
                            .ok_or_else(|| EngineError::Failed("file end outside a file".into()))?;
                        f.crc32c = Some(crc);
                        files.push(f);
                    }
                    Work::Other(f) => files.push(f),
                }
            }
            Ok((files, writer.finish()?))
        });
        BlockPipeline {
            work_tx,
            pool_tx: Some(pool_tx),
            writer,
            pool,
        }
    }

    async fn send(&self, work: Work) -> EngineResult<()> {
        self.work_tx
            .send(work)
            .await
            .map_err(|_| EngineError::Failed("the block writer stopped".into()))
    }

    async fn begin(&self, file: FileEntry) -> EngineResult<()> {
        self.send(Work::Begin(file)).await
    }

    async fn other(&self, file: FileEntry) -> EngineResult<()> {
        self.send(Work::Other(file)).await
    }

    async fn block(&self, raw: Vec<u8>) -> EngineResult<()> {
        let (tx, rx) = oneshot::channel();
        let pool_tx = self.pool_tx.as_ref().expect("pool open until finish");
        // The pool queue is short and drains at compression speed; waiting
        // for room here is the backpressure.
        pool_tx
            .send((raw, tx))
            .await
            .map_err(|_| EngineError::Failed("the compression pool stopped".into()))?;
        self.send(Work::Block(rx)).await
    }

    async fn end(
        &self,
        f: &mut OpenFile,
        received: &mut HashMap<String, (u64, u32)>,
    ) -> EngineResult<()> {
        if !f.block.is_empty() {
            let last = std::mem::take(&mut f.block);
            self.block(last).await?;
        }
        self.send(Work::End(f.crc)).await?;
        received.insert(std::mem::take(&mut f.manifest_path), (f.size, f.crc));
        Ok(())
    }

    /// Stores a file held in memory as one entry.
    async fn whole_file(
        &self,
        file: FileEntry,
        data: &[u8],
        block_size: usize,
    ) -> EngineResult<()> {
        self.begin(file).await?;
        for chunk in data.chunks(block_size) {
            self.block(chunk.to_vec()).await?;
        }
        self.send(Work::End(crc32c::crc32c(data))).await
    }

    async fn finish(mut self) -> EngineResult<(Vec<FileEntry>, BackupStats)> {
        drop(self.work_tx);
        self.pool_tx.take();
        let writer = self.writer;
        let pool = std::mem::take(&mut self.pool);
        tokio::task::spawn_blocking(move || {
            let result = writer
                .join()
                .map_err(|_| EngineError::Failed("the block writer panicked".into()))?;
            for t in pool {
                let _ = t.join();
            }
            result
        })
        .await
        .map_err(|e| EngineError::Failed(format!("block writer: {e}")))?
    }
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
    instance_id: String,
    mut session: Session,
    slot: String,
    start: Lsn,
    timeline: TimelineId,
    geometry: WalGeometry,
    status_interval: Duration,
    mut stop_rx: watch::Receiver<Option<Lsn>>,
) -> EngineResult<()> {
    let mut archiver = SegmentArchiver::new(engine, &instance_id, geometry, timeline, start);
    let seg_start = geometry.segment_start(geometry.segment_of(start));
    let mut stream = session
        .client
        .start_replication(Some(&slot), seg_start, Some(timeline))
        .await
        .map_err(wal_stream_error)?;
    let mut ticker = tokio::time::interval(status_interval);
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
                    archiver.flush_partial()?;
                    break;
                }
            }
        }
        tokio::select! {
            msg = stream.next() => {
                match msg.map_err(wal_stream_error)? {
                    Some(ReplicationMessage::XLogData { start, data, .. }) => archiver.push(start, &data)?,
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
