//! Uploading a snapshot backup from the agent into the repository.
//!
//! A snapshot backup is taken on the database host in seconds: the server is held in backup mode
//! (`pg_backup_start`/`pg_backup_stop`), the agent reflinks the data directory into a snapshot and
//! writes the `backup_label`/`tablespace_map` that `pg_backup_stop()` returned into it (see
//! docs/AGENT.md). Its catalog row is `Success` from then on. This module moves such a snapshot
//! into the repository afterwards, so the set is durable off the host and restorable, downloadable
//! and verifiable exactly like a physical one: the manifest it commits has the format and meaning
//! of a full backup's (files in 128 KiB blocks, modes, sizes, tablespaces from
//! `pg_tblspc/<oid>/`, the label files, and a PostgreSQL `backup_manifest` written the way
//! src/backend/backup/backup_manifest.c writes one, so `pg_verifybackup` checks a download).
//!
//! Snapshot files never change, so they are read straight from the agent, several at a time
//! (`snapshot_upload_parallel` concurrent range reads), a block at a time. With a *base* (the
//! previous snapshot, whose set is already uploaded), the agent says which byte ranges of each
//! file differ from the base snapshot's (extent maps, see `strata_agent::cow`); a block that no
//! changed range touches takes the base manifest's reference for the same block of the same file
//! without being read. Everything read is deduplicated against the whole repository, as backups
//! are. Nothing is visible until the manifest is committed, last; a failed upload leaves only
//! packs no manifest references, which garbage collection removes as for any failed backup.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use pg_wal::{Lsn, TimelineId};
use serde::Serialize;
use sha2::{Digest, Sha256};
use strata_agent::proto::{ByteRange, ChangedRanges, EntryKind, ErrorCode, ManifestEntry};
use strata_agent::{AgentClient, AgentError, RelPath, SnapshotName};
use strata_catalog::{BackupId, BackupSet, BackupStatus, Instance};
use strata_repo::{
    BackupManifest, BackupStats, BlockIndex, BlockRef, BlockWriter, FileEntry, FileKind, RepoError,
    Repository, TablespaceEntry,
};

use crate::blocking::blocking;
use crate::{Engine, EngineError, EngineResult, Progress};

/// Largest label file read from a snapshot (the agent refuses larger ones when they are put).
const MAX_LABEL_FILE: u64 = 1024 * 1024;

/// Most entries a snapshot's manifest may list (files and directories of one cluster).
const MAX_MANIFEST_ENTRIES: usize = 10_000_000;

/// Largest file a snapshot's manifest may list: PostgreSQL cuts relations into 1 GiB segments
/// unless built otherwise; anything near this is not a data directory's file.
const MAX_MANIFEST_FILE: u64 = 1 << 40;
/// Longest wait for the next bytes of a file range: the agent reads a local file, so a stream
/// silent this long is a dead connection (a partition sends no reset), not a slow disk.
const CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// What to upload: a snapshot of an instance whose backup set is already in the catalog.
#[derive(Clone)]
pub struct SnapshotUpload {
    /// The instance the snapshot was taken of.
    pub instance_id: String,
    /// Its backup set: a catalog row with status `Success`, start/stop LSN and timelines.
    pub backup_id: BackupId,
    /// The agent holding the snapshot.
    pub agent: AgentClient,
    /// The snapshot's name on the agent.
    pub snapshot: SnapshotName,
    /// The previous snapshot, already uploaded: only blocks changed since it are read.
    pub base: Option<SnapshotBase>,
}

/// A snapshot uploaded earlier, whose set's manifest in the repository holds its blocks.
#[derive(Debug, Clone)]
pub struct SnapshotBase {
    /// The snapshot's name on the agent.
    pub snapshot: SnapshotName,
    /// The backup set uploaded from it.
    pub backup_id: BackupId,
}

/// What an upload did, in bytes of file data.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct UploadReport {
    /// The set now in the repository.
    pub backup_id: BackupId,
    /// The set whose blocks unchanged ranges were taken from, when there was one to use.
    pub base: Option<BackupId>,
    /// Why the base given could not be used (the whole snapshot was read instead).
    pub base_unused: Option<String>,
    /// Regular files in the set (the generated `backup_manifest` not counted).
    pub files: u64,
    /// Bytes of those files (what a restore writes).
    pub total_bytes: u64,
    /// Bytes read from the agent.
    pub read_bytes: u64,
    /// Bytes taken from the base set's blocks without reading them.
    pub reused_bytes: u64,
    /// What the repository gained and deduplicated (as in every backup's manifest).
    pub stats: BackupStats,
}

/// Where one block of a file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BlockSource {
    /// The base set's block for the same index: no byte of it changed.
    Reuse(BlockRef),
    /// Bytes to read from the agent: a run of whole blocks (the last may be short at the end
    /// of the file).
    Read { offset: u64, len: u64 },
}

/// One regular file to upload.
struct FileJob {
    entry: FileEntry,
    /// The file's path in the snapshot.
    rel: RelPath,
    steps: Vec<BlockSource>,
}

/// Counters shared by the file uploads.
#[derive(Default)]
struct Counters {
    read: AtomicU64,
    reused: AtomicU64,
}

impl Engine {
    /// Uploads snapshot `req.snapshot` as backup set `req.backup_id` and commits its manifest;
    /// see the module documentation. Holds the repository against garbage collection while it
    /// runs, as a backup does. On failure (agent unreachable, snapshot gone, repository full)
    /// the error names the cause and no manifest is written. The catalog is only read, but for
    /// a snapshot changed on the host since it was taken: refused, and recorded as not local.
    pub async fn upload_snapshot(
        &self,
        req: SnapshotUpload,
        progress: &dyn Progress,
    ) -> EngineResult<UploadReport> {
        let hold = self.hold_gc().await?;
        let outcome = self.upload_snapshot_held(&req, progress).await;
        // Releasing the hold is a catalog write: off the runtime.
        blocking(move || {
            drop(hold);
            Ok(())
        })
        .await?;
        outcome
    }

    async fn upload_snapshot_held(
        &self,
        req: &SnapshotUpload,
        progress: &dyn Progress,
    ) -> EngineResult<UploadReport> {
        let what = format!(
            "uploading snapshot {} as backup {}",
            req.snapshot, req.backup_id
        );
        let agent_err = |doing: &str, e: AgentError| agent_error(&what, doing, e);
        let (set, instance) = self.upload_target(req).await?;
        let (start_lsn, start_tli, stop_lsn, stop_tli) = set_positions(&set)?;
        let system_id = instance.system_identifier.ok_or_else(|| {
            EngineError::Refused(format!(
                "{what}: instance {} has never been connected to (no system identifier recorded)",
                instance.id
            ))
        })?;
        let wal_segment_size = instance.wal_segment_size.ok_or_else(|| {
            EngineError::Refused(format!(
                "{what}: instance {} has no WAL segment size recorded",
                instance.id
            ))
        })?;
        let pg_version = set
            .pg_version_num
            .or(instance.pg_version_num)
            .ok_or_else(|| {
                EngineError::Refused(format!("{what}: no PostgreSQL version recorded"))
            })?;

        let facts = req
            .agent
            .facts()
            .await
            .map_err(|e| agent_err("asking for its facts", e))?;
        if facts.system_identifier != Some(system_id) {
            return Err(EngineError::Refused(format!(
                "{what}: the agent at {} serves cluster {:?}, not instance {}'s {system_id}",
                req.agent.url(),
                facts.system_identifier,
                instance.id
            )));
        }
        let listing = req
            .agent
            .manifest(&req.snapshot)
            .await
            .map_err(|e| agent_err("listing the snapshot", e))?;
        check_listing(&listing.entries, facts.fs.total_bytes)
            .map_err(|why| EngineError::Refused(format!("{what}: the agent's manifest {why}")))?;
        self.check_snapshot_unchanged(&set, &listing).await?;
        let labels = self.snapshot_labels(req, &listing.entries, &what).await?;
        check_label(&labels.backup_label, start_lsn, start_tli)
            .map_err(|why| EngineError::Refused(format!("{what}: {why}")))?;
        let tablespaces = labels
            .tablespace_map
            .as_deref()
            .map(parse_tablespace_map)
            .transpose()
            .map_err(|why| EngineError::Refused(format!("{what}: tablespace_map {why}")))?
            .unwrap_or_default();

        let block_size = self.repo.block_size() as u64;
        let (base, changes, base_unused) = self
            .upload_base(req, system_id, block_size, progress, &what)
            .await?;
        let mtime = set.finished_at.unwrap_or(set.started_at).timestamp();
        // Planning walks every block of every file: on the blocking pool, not a runtime thread.
        let (planned, tablespaces, base) = {
            let failed = what.clone();
            blocking(move || {
                let planned = plan_files(
                    &listing.entries,
                    &tablespaces,
                    mtime,
                    block_size,
                    base.as_ref(),
                    changes.as_ref(),
                )
                .map_err(|why| EngineError::Failed(format!("{failed}: {why}")));
                Ok((planned, tablespaces, base))
            })
            .await?
        };
        let (dirs, jobs) = planned?;
        let total_bytes: u64 = jobs.iter().map(|j| j.entry.size).sum();

        let (repo, id, base_read) = (self.repo.clone(), instance.id.to_string(), base.clone());
        let index = blocking(move || Ok(repo.block_index_with(&id, base_read.as_ref())?)).await?;
        let known = Arc::new(index.clone());
        let writer = Arc::new(Mutex::new(self.repo.block_writer(index)));
        let counters = Arc::new(Counters::default());
        let upload = FileUploads {
            repo: self.repo.clone(),
            agent: req.agent.clone(),
            snapshot: req.snapshot.clone(),
            writer: writer.clone(),
            known,
            counters: counters.clone(),
            block_size: block_size as usize,
            total_bytes,
            what: what.clone(),
        };
        let parallel = self.settings.snapshot_upload_parallel.max(1);
        let mut files: Vec<FileEntry> = futures::stream::iter(jobs)
            .map(|job| upload.file(job, progress))
            .buffered(parallel)
            .try_collect()
            .await?;
        progress.update("snapshot upload", total_bytes, Some(total_bytes));

        let stop_time = set.finished_at.unwrap_or_else(Utc::now);
        // PostgreSQL's manifest names one WAL range per timeline; with a switch inside the
        // backup the ranges would need the history, so such a set is stored without one (a
        // restore does not need it; a download says it has none).
        let server_manifest = if start_tli == stop_tli {
            let text = postgres_manifest(
                pg_version, system_id, &files, stop_time, start_tli, start_lsn, stop_lsn,
            );
            let entry = FileEntry {
                tablespace: None,
                path: "backup_manifest".into(),
                kind: FileKind::File,
                mode: 0o600,
                size: text.len() as u64,
                mtime: stop_time.timestamp(),
                link_target: None,
                crc32c: Some(crc32c::crc32c(&text)),
                blocks: Vec::new(),
            };
            Some(upload.whole(entry, text).await?)
        } else {
            None
        };
        drop(upload);
        let writer = Arc::try_unwrap(writer)
            .map_err(|_| EngineError::Failed(format!("{what}: the block writer is still shared")))?
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let (stats, added) = blocking(move || Ok(writer.finish_indexed()?)).await?;
        let stats = BackupStats {
            file_count: files.iter().filter(|f| f.kind == FileKind::File).count() as u64
                + u64::from(server_manifest.is_some()),
            total_bytes: total_bytes + server_manifest.as_ref().map_or(0, |f| f.size),
            ..stats
        };
        let file_count = files.len() as u64;
        let mut all = dirs;
        all.append(&mut files);
        let read_bytes = counters.read.load(Ordering::Relaxed);
        let reused_bytes = counters.reused.load(Ordering::Relaxed);
        let manifest = BackupManifest {
            format_version: strata_repo::manifest::MANIFEST_VERSION,
            backup_id: set.id.clone(),
            instance_id: set.instance_id.clone(),
            system_identifier: system_id,
            pg_version_num: pg_version,
            wal_segment_size,
            label: snapshot_label(&req.snapshot),
            mode: set.mode.to_string(),
            start_lsn,
            start_timeline: start_tli,
            stop_lsn,
            stop_timeline: stop_tli,
            start_time: set.started_at,
            stop_time,
            tablespaces,
            files: all,
            server_manifest,
            incremental_from: base.as_ref().map(|b| b.backup_id.clone()),
            received_bytes: Some(read_bytes),
            stats: stats.clone(),
            contents: None,
        };
        // Changed while it was read: nothing is committed.
        let listing = req
            .agent
            .manifest(&req.snapshot)
            .await
            .map_err(|e| agent_err("listing the snapshot", e))?;
        self.check_snapshot_unchanged(&set, &listing).await?;
        let repo = self.repo.clone();
        blocking(move || {
            if let Err(e) = repo.commit_backup(&manifest, added) {
                // A put that failed may still have landed: make sure no half-known set stays.
                let _ = repo.delete_backup(&manifest.instance_id, &manifest.backup_id);
                return Err(e.into());
            }
            Ok(())
        })
        .await?;
        progress.message(&format!(
            "snapshot {} uploaded as backup {}: {} MiB read from the agent, {} MiB taken unchanged from backup {}, {} MiB new in the repository",
            req.snapshot,
            set.id,
            read_bytes.div_ceil(1 << 20),
            reused_bytes.div_ceil(1 << 20),
            base.as_ref().map_or("-", |b| b.backup_id.as_str()),
            stats.new_bytes.div_ceil(1 << 20),
        ));
        Ok(UploadReport {
            backup_id: set.id,
            base: base.map(|b| b.backup_id),
            base_unused,
            files: file_count,
            total_bytes,
            read_bytes,
            reused_bytes,
            stats,
        })
    }

    /// The set and its instance, checked: the set belongs to the instance, succeeded, has its
    /// positions, and is not in the repository yet.
    async fn upload_target(&self, req: &SnapshotUpload) -> EngineResult<(BackupSet, Instance)> {
        let (engine, id, instance_id) =
            (self.clone(), req.backup_id.clone(), req.instance_id.clone());
        blocking(move || {
            let set = engine.catalog.get_backup(&id)?;
            if set.instance_id != instance_id.as_str() {
                return Err(EngineError::Refused(format!(
                    "backup {id} belongs to instance {}, not {instance_id}",
                    set.instance_id
                )));
            }
            if set.status != BackupStatus::Success {
                return Err(EngineError::Refused(format!(
                    "backup {id} is {:?}: only a successful snapshot is uploaded",
                    set.status
                )));
            }
            match engine.repo.read_manifest(&instance_id, &id) {
                Err(RepoError::BackupNotFound(_)) => {}
                Ok(_) => {
                    return Err(EngineError::Conflict(format!(
                        "backup {id} is already in the repository"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
            let instance = engine.catalog.get_instance(&instance_id)?;
            Ok((set, instance))
        })
        .await
    }

    /// The snapshot's `backup_label` (required: without it a restore would start from the
    /// wrong checkpoint) and `tablespace_map`, read from the agent.
    async fn snapshot_labels(
        &self,
        req: &SnapshotUpload,
        entries: &[ManifestEntry],
        what: &str,
    ) -> EngineResult<strata_agent::Labels> {
        let read = |name: &'static str| async move {
            let Some(e) = entries
                .iter()
                .find(|e| e.kind == EntryKind::File && e.path.as_str() == name)
            else {
                return Ok(None);
            };
            if e.size > MAX_LABEL_FILE {
                return Err(EngineError::Failed(format!(
                    "{what}: its {name} is {} bytes long",
                    e.size
                )));
            }
            let bytes = req
                .agent
                .read_range_to_vec(&req.snapshot, &e.path, 0, e.size)
                .await
                .map_err(|err| agent_error(what, &format!("reading {name}"), err))?;
            String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| EngineError::Failed(format!("{what}: its {name} is not UTF-8")))
        };
        let backup_label = read("backup_label").await?.ok_or_else(|| {
            EngineError::Refused(format!(
                "{what}: the snapshot has no backup_label (the labels from pg_backup_stop were never put)"
            ))
        })?;
        let tablespace_map = read("tablespace_map").await?;
        Ok(strata_agent::Labels {
            backup_label,
            tablespace_map,
        })
    }

    /// The base set's manifest and the changes since its snapshot, or why the whole snapshot
    /// is read instead. A base whose manifest or snapshot is gone is not an error (the upload
    /// is whole); one that is not what the caller says it is, is.
    async fn upload_base(
        &self,
        req: &SnapshotUpload,
        system_id: u64,
        block_size: u64,
        progress: &dyn Progress,
        what: &str,
    ) -> EngineResult<(
        Option<BackupManifest>,
        Option<HashMap<String, ChangedRanges>>,
        Option<String>,
    )> {
        let Some(base) = &req.base else {
            return Ok((None, None, None));
        };
        let unused = |why: String| {
            progress.message(&format!("{what}: every block is read: {why}"));
            Ok((None, None, Some(why)))
        };
        let (repo, instance_id, id) = (
            self.repo.clone(),
            req.instance_id.clone(),
            base.backup_id.clone(),
        );
        let manifest = match blocking(move || Ok(repo.read_manifest(&instance_id, &id)?)).await {
            Ok(m) => m,
            Err(EngineError::Repo(RepoError::BackupNotFound(_))) => {
                return unused(format!(
                    "backup {} is not in the repository",
                    base.backup_id
                ))
            }
            Err(e) => return Err(e),
        };
        if manifest.label != snapshot_label(&base.snapshot)
            || manifest.system_identifier != system_id
        {
            return Err(EngineError::Refused(format!(
                "{what}: backup {} was not uploaded from snapshot {} of this cluster (its label is {:?})",
                base.backup_id, base.snapshot, manifest.label
            )));
        }
        if block_size == 0 {
            return unused("the repository has no block size".into());
        }
        let changes = match req
            .agent
            .changed_ranges(&req.snapshot, &base.snapshot)
            .await
        {
            Ok(c) => c,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                return unused(format!(
                    "the agent no longer has snapshot {} ({e})",
                    base.snapshot
                ))
            }
            Err(e) => return Err(agent_error(what, "asking for the changed ranges", e)),
        };
        let changes = changes
            .into_iter()
            .map(|c| (c.path.as_str().to_string(), c.changes))
            .collect();
        Ok((Some(manifest), Some(changes), None))
    }
}

/// What the uploads of single files share.
struct FileUploads {
    repo: Repository,
    agent: AgentClient,
    snapshot: SnapshotName,
    writer: Arc<Mutex<BlockWriter>>,
    known: Arc<BlockIndex>,
    counters: Arc<Counters>,
    block_size: usize,
    total_bytes: u64,
    what: String,
}

impl FileUploads {
    /// Uploads one file: its unchanged blocks by reference, the others read from the agent a
    /// block at a time. The CRC-32C is recorded only when every byte was read.
    async fn file(&self, job: FileJob, progress: &dyn Progress) -> EngineResult<FileEntry> {
        let FileJob {
            mut entry,
            rel,
            steps,
        } = job;
        let mut crc = Some(0u32);
        for step in steps {
            match step {
                BlockSource::Reuse(block) => {
                    let block = self.lock().add_existing(&block);
                    self.counters
                        .reused
                        .fetch_add(block.raw_len as u64, Ordering::Relaxed);
                    entry.blocks.push(block);
                    crc = None;
                }
                BlockSource::Read { offset, len } => {
                    let doing = || format!("reading {rel} from offset {offset}");
                    let mut reader = self
                        .agent
                        .read_range(&self.snapshot, &rel, offset, len)
                        .await
                        .map_err(|e| agent_error(&self.what, &doing(), e))?;
                    if reader.len() != len {
                        return Err(EngineError::Failed(format!(
                            "{}: the agent sends {} bytes of {rel} from offset {offset}, the snapshot lists {len}",
                            self.what,
                            reader.len()
                        )));
                    }
                    let mut block = Vec::with_capacity(self.block_size);
                    while let Some(chunk) = tokio::time::timeout(CHUNK_TIMEOUT, reader.next_chunk())
                        .await
                        .map_err(|_| {
                            EngineError::Unreachable(format!(
                                "{}: {}: agent at {} sent nothing for {CHUNK_TIMEOUT:?}",
                                self.what,
                                doing(),
                                self.agent.url()
                            ))
                        })?
                        .map_err(|e| agent_error(&self.what, &doing(), e))?
                    {
                        crc = crc.map(|c| crc32c::crc32c_append(c, &chunk));
                        let mut rest = &chunk[..];
                        while !rest.is_empty() {
                            let take = (self.block_size - block.len()).min(rest.len());
                            block.extend_from_slice(&rest[..take]);
                            rest = &rest[take..];
                            if block.len() == self.block_size {
                                let full = std::mem::replace(
                                    &mut block,
                                    Vec::with_capacity(self.block_size),
                                );
                                entry.blocks.push(self.store(full, progress).await?);
                            }
                        }
                    }
                    if !block.is_empty() {
                        entry.blocks.push(self.store(block, progress).await?);
                    }
                }
            }
        }
        let stored: u64 = entry.blocks.iter().map(|b| b.raw_len as u64).sum();
        if stored != entry.size {
            return Err(EngineError::Failed(format!(
                "{}: {stored} bytes stored for {rel}, which the snapshot lists at {}",
                self.what, entry.size
            )));
        }
        entry.crc32c = crc;
        Ok(entry)
    }

    /// Stores a file held in memory (the generated `backup_manifest`).
    async fn whole(&self, mut entry: FileEntry, data: Vec<u8>) -> EngineResult<FileEntry> {
        for chunk in data.chunks(self.block_size) {
            let block = self.store_quiet(chunk.to_vec()).await?;
            entry.blocks.push(block);
        }
        Ok(entry)
    }

    /// Hashes, compresses and stores one block read from the agent, off the runtime.
    async fn store(&self, raw: Vec<u8>, progress: &dyn Progress) -> EngineResult<BlockRef> {
        let len = raw.len() as u64;
        let block = self.store_quiet(raw).await?;
        let read = self.counters.read.fetch_add(len, Ordering::Relaxed) + len;
        let done = read + self.counters.reused.load(Ordering::Relaxed);
        progress.update("snapshot upload", done, Some(self.total_bytes));
        Ok(block)
    }

    async fn store_quiet(&self, raw: Vec<u8>) -> EngineResult<BlockRef> {
        let (repo, known, writer) = (self.repo.clone(), self.known.clone(), self.writer.clone());
        blocking(move || {
            let prepared = BlockWriter::prepare(&repo, &raw, |h| known.contains(h));
            let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
            Ok(writer.add_prepared(prepared, &raw)?)
        })
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BlockWriter> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An agent error in words that name the upload, what it was doing and the agent; an agent
/// that cannot be reached is worth a retry later, anything else fails the upload.
fn agent_error(what: &str, doing: &str, e: AgentError) -> EngineError {
    let text = format!("{what}: {doing}: {e}");
    if e.is_unreachable() {
        EngineError::Unreachable(text)
    } else {
        EngineError::Failed(text)
    }
}

/// The manifest label of a set uploaded from snapshot `name` (a physical set's is
/// `strata backup <id>`): how the format, unchanged, records where a set came from.
pub fn snapshot_label(name: &SnapshotName) -> String {
    format!("{SNAPSHOT_LABEL_PREFIX}{name}")
}

const SNAPSHOT_LABEL_PREFIX: &str = "strata snapshot ";

/// Whether a manifest's `label` is one [`snapshot_label`] wrote.
pub fn is_snapshot_label(label: &str) -> bool {
    label.starts_with(SNAPSHOT_LABEL_PREFIX)
}

/// The set's start and stop positions, which a snapshot set has from the moment it succeeded.
fn set_positions(set: &BackupSet) -> EngineResult<(Lsn, TimelineId, Lsn, TimelineId)> {
    match (
        set.start_lsn,
        set.start_timeline,
        set.stop_lsn,
        set.stop_timeline,
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => Ok((a, b, c, d)),
        _ => Err(EngineError::Refused(format!(
            "backup {} has no start and stop positions recorded",
            set.id
        ))),
    }
}

/// Checks that `backup_label` is the label of the backup that started at `start` on timeline
/// `tli` (its `START WAL LOCATION` and `START TIMELINE` lines, as
/// src/backend/access/transam/xlogbackup.c writes them): the snapshot belongs to this set.
fn check_label(label: &str, start: Lsn, tli: TimelineId) -> Result<(), String> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let location = field("START WAL LOCATION:")
        .and_then(|v| v.split_whitespace().next())
        .ok_or("its backup_label has no START WAL LOCATION")?;
    let lsn: Lsn = location
        .parse()
        .map_err(|_| format!("its backup_label's START WAL LOCATION {location:?} is not an LSN"))?;
    if lsn != start {
        return Err(format!(
            "its backup_label starts at {lsn}, the backup set at {start}: the snapshot is not this set's"
        ));
    }
    if let Some(t) = field("START TIMELINE:") {
        if t.parse::<u32>().ok() != Some(tli.0) {
            return Err(format!(
                "its backup_label is on timeline {t}, the backup set on {tli}"
            ));
        }
    }
    Ok(())
}

/// The tablespaces a `tablespace_map` lists: `<oid> <location>` per line (the location may hold
/// spaces; see `pg_backup_stop` in src/backend/access/transam/xlogfuncs.c).
fn parse_tablespace_map(text: &str) -> Result<Vec<TablespaceEntry>, String> {
    let mut out: Vec<TablespaceEntry> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (oid, location) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {line:?} is not `<oid> <location>`"))?;
        let oid: u32 = oid
            .parse()
            .map_err(|_| format!("line {line:?} does not start with an OID"))?;
        if out.iter().any(|t| t.oid == oid) {
            return Err(format!("lists tablespace {oid} twice"));
        }
        out.push(TablespaceEntry {
            oid,
            location: location.to_string(),
        });
    }
    Ok(out)
}

/// Where a snapshot path goes in the manifest: `pg_tblspc/<oid>/rest` is `rest` in tablespace
/// `oid`; `None` for the `pg_tblspc/<oid>` directory itself (a restore makes the tablespace's
/// directory and PostgreSQL its link, from `tablespace_map`).
fn place(path: &str) -> Result<Option<(Option<u32>, String)>, String> {
    let Some(rest) = path.strip_prefix("pg_tblspc/") else {
        return Ok(Some((None, path.to_string())));
    };
    let (oid, inner) = match rest.split_once('/') {
        Some((oid, inner)) => (oid, Some(inner)),
        None => (rest, None),
    };
    let oid = strata_repo::paths::tablespace_link_oid(&format!("pg_tblspc/{oid}"))
        .ok_or_else(|| format!("{path:?} is under pg_tblspc/ but not in a tablespace"))?;
    Ok(inner.map(|inner| (Some(oid), inner.to_string())))
}

/// The manifest's directories and the files to upload, in the snapshot's order, every name
/// checked as a backup's are (`strata_repo::paths`).
fn plan_files(
    entries: &[ManifestEntry],
    tablespaces: &[TablespaceEntry],
    mtime: i64,
    block_size: u64,
    base: Option<&BackupManifest>,
    changes: Option<&HashMap<String, ChangedRanges>>,
) -> Result<(Vec<FileEntry>, Vec<FileJob>), String> {
    let listed: HashSet<u32> = tablespaces.iter().map(|t| t.oid).collect();
    let base_files: HashMap<(Option<u32>, &str), &FileEntry> = base
        .map(|m| {
            m.files
                .iter()
                .filter(|f| f.kind == FileKind::File)
                .map(|f| ((f.tablespace, f.path.as_str()), f))
                .collect()
        })
        .unwrap_or_default();
    let mut dirs = Vec::new();
    let mut jobs = Vec::new();
    for e in entries {
        let Some((tablespace, path)) = place(e.path.as_str())? else {
            continue;
        };
        if let Some(oid) = tablespace.filter(|o| !listed.contains(o)) {
            return Err(format!(
                "{} belongs to tablespace {oid}, which its tablespace_map does not list",
                e.path
            ));
        }
        let kind = match e.kind {
            EntryKind::File => FileKind::File,
            EntryKind::Dir => FileKind::Dir,
        };
        strata_repo::paths::check_entry(tablespace, &path, kind)
            .map_err(|why| format!("{} cannot be stored: it {why}", e.path))?;
        let entry = FileEntry {
            tablespace,
            path,
            kind,
            mode: e.mode,
            size: if kind == FileKind::File { e.size } else { 0 },
            mtime,
            link_target: None,
            crc32c: None,
            blocks: Vec::new(),
        };
        if kind == FileKind::Dir {
            dirs.push(entry);
            continue;
        }
        let base_file = base_files
            .get(&(entry.tablespace, entry.path.as_str()))
            .copied();
        let changed = changes
            .and_then(|c| c.get(e.path.as_str()))
            .filter(|c| c.exact && c.size == e.size)
            .map(|c| c.ranges.as_slice());
        let steps = plan_blocks(e.size, block_size, changed, base_file);
        jobs.push(FileJob {
            entry,
            rel: e.path.clone(),
            steps,
        });
    }
    Ok((dirs, jobs))
}

/// Where each block of a file of `size` bytes comes from. Block `i` (bytes `i*block_size ..`)
/// reuses the base file's block `i` only when no `changed` range touches it and the base file
/// is cut the same way (every block but the last exactly `block_size` long, the sizes adding
/// up, block `i` as long as this one): then the base block holds exactly these bytes. Without
/// `changed` (a new file, or one the agent cannot vouch for) or a usable base, every block is
/// read. Consecutive reads are merged into runs, each one range request.
fn plan_blocks(
    size: u64,
    block_size: u64,
    changed: Option<&[ByteRange]>,
    base: Option<&FileEntry>,
) -> Vec<BlockSource> {
    let max_run = (strata_agent::proto::MAX_READ_LEN / block_size.max(1)).max(1) * block_size;
    let base_blocks = base
        .filter(|b| cut_evenly(b, block_size))
        .map(|b| b.blocks.as_slice());
    let changed = changed.map(merged);
    let mut out: Vec<BlockSource> = Vec::new();
    let blocks = size.div_ceil(block_size.max(1));
    let mut cursor = 0;
    for i in 0..blocks {
        let offset = i * block_size;
        let len = block_size.min(size - offset);
        let reuse = match (&changed, base_blocks) {
            (Some(ranges), Some(base)) => base
                .get(i as usize)
                .filter(|b| b.raw_len as u64 == len)
                .filter(|_| !touches(ranges, &mut cursor, offset, offset + len)),
            _ => None,
        };
        match (reuse, out.last_mut()) {
            (Some(b), _) => out.push(BlockSource::Reuse(b.clone())),
            (None, Some(BlockSource::Read { offset: o, len: l }))
                if *o + *l == offset && *l + len <= max_run =>
            {
                *l += len
            }
            (None, _) => out.push(BlockSource::Read { offset, len }),
        }
    }
    out
}

/// How many times its file system's size a snapshot's files may add up to. Reflinked files
/// share their extents, but one snapshot's files hold at most what the file system does
/// unless they are sparse or the file system compresses; a cluster's files are neither
/// sparse nor compressed past this. Files of many terabytes planted as holes by whoever owns
/// the data directory would otherwise be read (zeros) and planned for (memory) in full.
const MAX_LISTING_PER_FS_BYTE: u64 = 16;

/// Refuses a manifest no cluster could produce, before anything is planned from it: too many
/// entries, a file over [`MAX_MANIFEST_FILE`], sizes whose sum overflows or passes
/// [`MAX_LISTING_PER_FS_BYTE`] times `fs_total_bytes` (the size of the file system the agent
/// says the data directory is on).
fn check_listing(entries: &[ManifestEntry], fs_total_bytes: u64) -> Result<(), String> {
    check_listing_within(
        entries,
        MAX_MANIFEST_ENTRIES,
        MAX_MANIFEST_FILE,
        fs_total_bytes.saturating_mul(MAX_LISTING_PER_FS_BYTE),
    )
}

/// [`check_listing`] with its limits as values.
fn check_listing_within(
    entries: &[ManifestEntry],
    max_entries: usize,
    max_file: u64,
    max_total: u64,
) -> Result<(), String> {
    if entries.len() > max_entries {
        return Err(format!(
            "lists {} entries; at most {max_entries} are accepted",
            entries.len()
        ));
    }
    let mut total: u64 = 0;
    for e in entries {
        if e.size > max_file {
            return Err(format!(
                "gives {} {} bytes; at most {max_file} are accepted",
                e.path.as_str(),
                e.size
            ));
        }
        total = total
            .checked_add(e.size)
            .ok_or_else(|| "sizes add up to more than 2^64 bytes".to_string())?;
    }
    if total > max_total {
        return Err(format!(
            "lists files of {total} bytes in all, more than {max_total} (sixteen times the size of the data directory's file system): sparse files planted in the data directory?"
        ));
    }
    Ok(())
}

/// Whether a base file's blocks cover it as this repository cuts files.
fn cut_evenly(f: &FileEntry, block_size: u64) -> bool {
    let Some((last, rest)) = f.blocks.split_last() else {
        return f.size == 0;
    };
    rest.iter().all(|b| b.raw_len as u64 == block_size)
        && (1..=block_size).contains(&(last.raw_len as u64))
        && f.blocks.iter().map(|b| b.raw_len as u64).sum::<u64>() == f.size
}

/// `ranges` sorted and merged (the agent promises it; the plan does not rely on it).
fn merged(ranges: &[ByteRange]) -> Vec<ByteRange> {
    let mut sorted: Vec<ByteRange> = ranges.iter().filter(|r| r.len > 0).copied().collect();
    sorted.sort_by_key(|r| r.offset);
    let mut out: Vec<ByteRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.offset <= last.end() => {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

/// Whether any of the sorted, merged `ranges` overlaps `start..end`; `cursor` moves forward as
/// blocks are asked in order.
fn touches(ranges: &[ByteRange], cursor: &mut usize, start: u64, end: u64) -> bool {
    while *cursor < ranges.len() && ranges[*cursor].end() <= start {
        *cursor += 1;
    }
    ranges.get(*cursor).is_some_and(|r| r.offset < end)
}

/// A PostgreSQL `backup_manifest` for the set's files, laid out as
/// src/backend/backup/backup_manifest.c writes it (version 1, or 2 with the system identifier
/// from PostgreSQL 17), with a CRC-32C for every file read whole and none for files that took
/// blocks by reference (pg_verifybackup then checks their size), and the `Manifest-Checksum`
/// over everything before its own line.
pub(crate) fn postgres_manifest(
    pg_version: u32,
    system_id: u64,
    files: &[FileEntry],
    modified: DateTime<Utc>,
    tli: TimelineId,
    start: Lsn,
    stop: Lsn,
) -> Vec<u8> {
    let mut out = String::new();
    if pg_version >= 170000 {
        out.push_str("{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n");
        out.push_str(&format!("\"System-Identifier\": {system_id},\n"));
    } else {
        out.push_str("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n");
    }
    out.push_str("\"Files\": [");
    let stamp = modified.format("%Y-%m-%d %H:%M:%S GMT").to_string();
    let mut first = true;
    for f in files.iter().filter(|f| f.kind == FileKind::File) {
        out.push_str(if first { "\n" } else { ",\n" });
        first = false;
        let path = match f.tablespace {
            Some(oid) => format!("pg_tblspc/{oid}/{}", f.path),
            None => f.path.clone(),
        };
        let name = serde_json::to_string(&path).unwrap_or_else(|_| "\"\"".into());
        out.push_str(&format!(
            "{{ \"Path\": {name}, \"Size\": {}, \"Last-Modified\": \"{stamp}\"",
            f.size
        ));
        if let Some(crc) = f.crc32c {
            out.push_str(&format!(
                ", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\"",
                hex::encode(crc.to_le_bytes())
            ));
        }
        out.push_str(" }");
    }
    out.push_str("\n],\n\"WAL-Ranges\": [\n");
    out.push_str(&format!(
        "{{ \"Timeline\": {}, \"Start-LSN\": \"{start}\", \"End-LSN\": \"{stop}\" }}",
        tli.0
    ));
    out.push_str("\n],\n");
    let sum = hex::encode(Sha256::digest(out.as_bytes()));
    out.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_repo::{BlockHash, PackId};

    const BS: u64 = 131072;

    fn listed(path: &str, size: u64) -> ManifestEntry {
        ManifestEntry {
            path: RelPath::new(path).unwrap(),
            kind: EntryKind::File,
            size,
            mode: 0o600,
            stamp: None,
        }
    }

    #[test]
    fn absurd_manifests_are_refused_before_planning() {
        let fine = [
            listed("base/5/1259", 8192),
            listed("global/pg_control", 8192),
        ];
        let fs = 1 << 30;
        assert_eq!(check_listing(&fine, fs), Ok(()));
        let huge = [listed("base/5/1259", MAX_MANIFEST_FILE + 1)];
        let why = check_listing(&huge, u64::MAX).unwrap_err();
        assert!(why.contains("base/5/1259"), "{why}");
        let three = [listed("a", 1), listed("b", 1), listed("c", 1)];
        assert_eq!(check_listing_within(&three, 3, 1, 3), Ok(()));
        assert_eq!(
            check_listing_within(&three, 2, 1, 3),
            Err("lists 3 entries; at most 2 are accepted".to_string())
        );
        // Sizes whose sum passes 2^64: refused, no overflow.
        let big = [listed("a", u64::MAX / 2 + 1), listed("b", u64::MAX / 2 + 1)];
        assert_eq!(
            check_listing_within(&big, 2, u64::MAX, u64::MAX),
            Err("sizes add up to more than 2^64 bytes".to_string())
        );
        // Many files of a terabyte each (holes) on a 1 GiB file system: refused before any
        // plan is made, however few bytes they take on disk.
        let holes: Vec<ManifestEntry> = (0..100_000)
            .map(|i| listed(&format!("base/1/z{i}"), 1 << 40))
            .collect();
        let why = check_listing(&holes, fs).unwrap_err();
        assert!(why.contains("sparse files planted"), "{why}");
        // Up to sixteen times the file system's size passes (a compressing file system).
        let dense = [listed("base/5/1", 8 << 30), listed("base/5/2", 8 << 30)];
        assert_eq!(check_listing(&dense, fs), Ok(()));
        let over = [
            listed("base/5/1", 8 << 30),
            listed("base/5/2", (8 << 30) + 1),
        ];
        assert!(check_listing(&over, fs).is_err());
    }

    fn block(n: u8, len: u64) -> BlockRef {
        BlockRef {
            hash: BlockHash([n; 32]),
            pack: PackId::new("0".repeat(32)),
            offset: 0,
            stored_len: len as u32,
            raw_len: len as u32,
            compression: 0,
        }
    }

    fn file(size: u64, blocks: Vec<BlockRef>) -> FileEntry {
        FileEntry {
            tablespace: None,
            path: "base/5/16384".into(),
            kind: FileKind::File,
            mode: 0o600,
            size,
            mtime: 0,
            link_target: None,
            crc32c: None,
            blocks,
        }
    }

    fn range(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    #[test]
    fn only_blocks_a_changed_range_touches_are_read() {
        let size = 4 * BS + 100;
        let base = file(
            size,
            vec![
                block(0, BS),
                block(1, BS),
                block(2, BS),
                block(3, BS),
                block(4, 100),
            ],
        );
        // One page in block 1, the last byte of block 2 and the first of block 3.
        let changed = [range(BS + 8192, 8192), range(3 * BS - 1, 2)];
        let plan = plan_blocks(size, BS, Some(&changed), Some(&base));
        assert_eq!(
            plan,
            vec![
                BlockSource::Reuse(block(0, BS)),
                BlockSource::Read {
                    offset: BS,
                    len: 3 * BS
                },
                BlockSource::Reuse(block(4, 100)),
            ]
        );
        // Nothing changed: nothing read.
        let plan = plan_blocks(size, BS, Some(&[]), Some(&base));
        assert!(plan.iter().all(|s| matches!(s, BlockSource::Reuse(_))));
        assert_eq!(plan.len(), 5);
    }

    #[test]
    fn a_file_without_vouched_changes_or_evenly_cut_base_is_read_whole() {
        let size = 2 * BS;
        let whole = vec![BlockSource::Read {
            offset: 0,
            len: size,
        }];
        let base = file(size, vec![block(0, BS), block(1, BS)]);
        assert_eq!(plan_blocks(size, BS, None, Some(&base)), whole);
        assert_eq!(plan_blocks(size, BS, Some(&[]), None), whole);
        // A base cut into other blocks (another block size) is never reused.
        let other = file(size, vec![block(0, BS / 2); 4]);
        assert_eq!(plan_blocks(size, BS, Some(&[]), Some(&other)), whole);
        // Sizes that do not add up to the file's.
        let short = file(size + 1, vec![block(0, BS), block(1, BS)]);
        assert_eq!(plan_blocks(size, BS, Some(&[]), Some(&short)), whole);
    }

    #[test]
    fn a_grown_or_shrunk_file_reads_its_last_blocks() {
        // Grown: the base's short last block does not cover the new block 1.
        let base = file(BS + 10, vec![block(0, BS), block(1, 10)]);
        assert_eq!(
            plan_blocks(BS + 20, BS, Some(&[range(BS + 10, 10)]), Some(&base)),
            vec![
                BlockSource::Reuse(block(0, BS)),
                BlockSource::Read {
                    offset: BS,
                    len: 20
                }
            ]
        );
        // Shrunk: the base's full block 1 is longer than the new one.
        let base = file(2 * BS, vec![block(0, BS), block(1, BS)]);
        assert_eq!(
            plan_blocks(BS + 5, BS, Some(&[]), Some(&base)),
            vec![
                BlockSource::Reuse(block(0, BS)),
                BlockSource::Read { offset: BS, len: 5 }
            ]
        );
        assert!(plan_blocks(0, BS, Some(&[]), Some(&base)).is_empty());
    }

    #[test]
    fn unsorted_or_overlapping_ranges_count_as_given() {
        let size = 3 * BS;
        let base = file(size, vec![block(0, BS), block(1, BS), block(2, BS)]);
        let changed = [range(2 * BS, 5), range(0, 1), range(0, 1)];
        assert_eq!(
            plan_blocks(size, BS, Some(&changed), Some(&base)),
            vec![
                BlockSource::Read { offset: 0, len: BS },
                BlockSource::Reuse(block(1, BS)),
                BlockSource::Read {
                    offset: 2 * BS,
                    len: BS
                },
            ]
        );
    }

    #[test]
    fn tablespace_paths_and_maps() {
        assert_eq!(place("base/1/2").unwrap(), Some((None, "base/1/2".into())));
        assert_eq!(place("pg_tblspc/16384").unwrap(), None);
        assert_eq!(
            place("pg_tblspc/16384/PG_15_202209061/5/16385").unwrap(),
            Some((Some(16384), "PG_15_202209061/5/16385".into()))
        );
        assert!(place("pg_tblspc/016384/x").is_err());
        assert!(place("pg_tblspc/evil/x").is_err());
        let map = parse_tablespace_map("16384 /srv/ts one\n16385 /srv/two\n").unwrap();
        assert_eq!(map[0].location, "/srv/ts one");
        assert_eq!(map[1].oid, 16385);
        assert!(parse_tablespace_map("16384 /a\n16384 /b\n").is_err());
        assert!(parse_tablespace_map("x /a\n").is_err());
    }

    #[test]
    fn the_label_must_be_the_sets() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nSTART TIMELINE: 1\n";
        let start: Lsn = "0/2000028".parse().unwrap();
        assert!(check_label(label, start, TimelineId(1)).is_ok());
        let other: Lsn = "0/3000028".parse().unwrap();
        assert!(check_label(label, other, TimelineId(1))
            .unwrap_err()
            .contains("not this set's"));
        assert!(check_label(label, start, TimelineId(2)).is_err());
        assert!(check_label("BACKUP METHOD: streamed\n", start, TimelineId(1)).is_err());
    }

    #[test]
    fn the_postgres_manifest_checks_out() {
        let mut a = file(3, vec![block(0, 3)]);
        a.crc32c = Some(crc32c::crc32c(b"abc"));
        let mut b = file(BS, vec![block(1, BS)]);
        b.tablespace = Some(16384);
        b.path = "PG_15_202209061/5/1".into();
        let files = vec![a, b];
        let start: Lsn = "0/2000028".parse().unwrap();
        let stop: Lsn = "0/2000100".parse().unwrap();
        let text = postgres_manifest(150000, 7, &files, Utc::now(), TimelineId(1), start, stop);
        assert!(crate::incremental::manifest_checksum_ok(&text));
        let doc: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(doc["PostgreSQL-Backup-Manifest-Version"], 1);
        assert_eq!(
            doc["Files"][0]["Checksum"],
            hex::encode(crc32c::crc32c(b"abc").to_le_bytes())
        );
        assert_eq!(
            doc["Files"][1]["Path"],
            "pg_tblspc/16384/PG_15_202209061/5/1"
        );
        assert!(doc["Files"][1].get("Checksum").is_none());
        assert_eq!(doc["WAL-Ranges"][0]["End-LSN"], "0/2000100");
        let received = [
            ("base/5/16384".to_string(), (3, crc32c::crc32c(b"abc"))),
            ("pg_tblspc/16384/PG_15_202209061/5/1".to_string(), (BS, 0)),
        ]
        .into_iter()
        .collect();
        crate::check_server_manifest(&text, &received).unwrap();
        let v17 = postgres_manifest(170000, 7, &files, Utc::now(), TimelineId(1), start, stop);
        let doc: serde_json::Value = serde_json::from_slice(&v17).unwrap();
        assert_eq!(doc["System-Identifier"], 7);
        assert!(crate::incremental::manifest_checksum_ok(&v17));
    }
}
