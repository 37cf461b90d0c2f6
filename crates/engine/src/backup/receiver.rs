//! The consumer of a BASE_BACKUP stream: a state machine fed one
//! [`BaseBackupEvent`] at a time, whatever produced it (the live stream of
//! `strata_pg_replication` in production, a recorded stream in tests).
//!
//! It checks the order the protocol promises (archives one after the other,
//! each a run of members whose data follows its header, then the server's
//! `backup_manifest`, then the end position; see PostgreSQL's
//! src/backend/backup/basebackup_copy.c), hands file contents to the block
//! pipeline, and once the stream is over checks what arrived against the
//! server's manifest and commits the Strata manifest. It never touches the
//! catalog: the caller records progress and outcome.
//!
//! An error leaves the receiver failed (it refuses every later event) and
//! nothing committed: only [`BackupReceiver::commit`] writes a manifest, and
//! a backup without a manifest does not exist (its packs are garbage for GC).

use bytes::Bytes;
use chrono::{DateTime, Utc};
use pg_replication::{BaseBackupEvent, TarEntry};
use pg_wal::{Lsn, TimelineId};
use strata_catalog::BackupSet;
use strata_repo::{BackupManifest, BackupStats, FileEntry, FileKind, Repository, TablespaceEntry};

use super::{
    check_server_manifest, file_entry, manifest_path, BlockPipeline, Content, Ends, OpenFile,
};
use crate::blocking::blocking;
use crate::incremental::{
    full_name, rel_file, rewrite_server_manifest, Fork, HeapChanges, IncrementalBase,
    IncrementalFile,
};
use crate::{EngineError, EngineResult};

/// What the server told when the backup started, and what the Strata
/// manifest records of it.
#[derive(Debug, Clone)]
pub(crate) struct StreamStart {
    pub system_id: u64,
    pub pg_version: u32,
    pub wal_segment_size: u64,
    pub start_lsn: Lsn,
    pub start_timeline: TimelineId,
    pub start_time: DateTime<Utc>,
    /// The server's estimate of the bytes it sends, when it made one.
    pub total: Option<u64>,
}

/// Where the receiver is in the stream.
enum State {
    /// Before the first archive or between two.
    BetweenArchives,
    /// Inside the archive of a tablespace (`None`: the data directory),
    /// between two members.
    InArchive(Option<u32>),
    /// Inside a file's data.
    InFile(Box<OpenFile>),
    /// The server's backup_manifest is arriving.
    Manifest,
    /// The end position arrived; nothing else may.
    Finished(Lsn, TimelineId),
    /// The stream is over and checked.
    Ended(Lsn, TimelineId, DateTime<Utc>),
    /// An event was refused (or its storing failed): every later one is too.
    Failed,
}

impl State {
    fn describe(&self) -> String {
        match self {
            State::BetweenArchives => "between archives".into(),
            State::InArchive(None) => "inside the data directory's archive".into(),
            State::InArchive(Some(oid)) => format!("inside the archive of tablespace {oid}"),
            State::InFile(f) => format!("inside {}", f.manifest_path),
            State::Manifest => "inside the backup_manifest".into(),
            State::Finished(..) | State::Ended(..) => "after the end position".into(),
            State::Failed => "after an error".into(),
        }
    }
}

fn describe_event(event: &BaseBackupEvent) -> String {
    match event {
        BaseBackupEvent::ArchiveStart { name, .. } => format!("the start of archive {name}"),
        BaseBackupEvent::Entry(e) => format!("the archive member {:?}", e.path),
        BaseBackupEvent::Data(_) => "file data".into(),
        BaseBackupEvent::ArchiveEnd => "the end of an archive".into(),
        BaseBackupEvent::Progress { .. } => "a progress report".into(),
        BaseBackupEvent::Manifest(_) => "backup_manifest data".into(),
        BaseBackupEvent::Finished { .. } => "the end position".into(),
    }
}

/// Consumes one BASE_BACKUP stream into the repository; see the module
/// documentation.
pub(crate) struct BackupReceiver {
    state: State,
    repo: Repository,
    pipeline: BlockPipeline,
    base: Option<IncrementalBase>,
    block_size: usize,
    /// The archives begun so far, by tablespace (`None`: the data directory).
    archives: Vec<Option<u32>>,
    tablespaces: Vec<TablespaceEntry>,
    ends: Ends,
    server_manifest: Vec<u8>,
    streamed: u64,
}

impl BackupReceiver {
    /// A receiver storing into `repo`, deduplicating against the blocks the
    /// instance's backups hold (read off the runtime) and, with `base`,
    /// rebuilding the files an incremental transfer sends as changes.
    pub async fn start(
        repo: &Repository,
        instance_id: &str,
        base: Option<IncrementalBase>,
    ) -> EngineResult<Self> {
        let (r, id) = (repo.clone(), instance_id.to_string());
        let (known, base) = blocking(move || {
            let known = r.block_index_with(&id, base.as_ref().map(|b| &b.manifest))?;
            Ok((known, base))
        })
        .await?;
        tracing::debug!("instance {instance_id}: {} blocks known", known.len());
        let block_size = repo.block_size();
        Ok(BackupReceiver {
            state: State::BetweenArchives,
            repo: repo.clone(),
            pipeline: BlockPipeline::start(repo, known),
            block_size,
            archives: Vec::new(),
            tablespaces: Vec::new(),
            ends: Ends {
                received: Default::default(),
                changes: Default::default(),
                heap: HeapChanges::default(),
                maps: Vec::new(),
                block_size,
                segment_pages: base.as_ref().map(|b| b.segment_pages),
            },
            base,
            server_manifest: Vec::new(),
            streamed: 0,
        })
    }

    /// File bytes received so far.
    pub fn streamed(&self) -> u64 {
        self.streamed
    }

    /// Takes the next event of the stream.
    pub async fn feed(&mut self, event: BaseBackupEvent) -> EngineResult<()> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        self.state = self.step(state, event).await?;
        Ok(())
    }

    async fn step(&mut self, state: State, event: BaseBackupEvent) -> EngineResult<State> {
        use BaseBackupEvent as E;
        Ok(match (state, event) {
            (State::Failed, _) => {
                return Err(EngineError::Failed(
                    "the backup stream was already refused".into(),
                ))
            }
            (
                State::BetweenArchives,
                E::ArchiveStart {
                    tablespace_oid,
                    location,
                    ..
                },
            ) => self.archive_start(tablespace_oid, location)?,
            (State::InArchive(tablespace), E::Entry(entry)) => {
                self.entry(tablespace, entry).await?
            }
            (State::InFile(_), E::Entry(_)) => {
                return Err(EngineError::Failed(
                    "the server started a new file before finishing the previous one".into(),
                ))
            }
            (State::InFile(f), E::Data(data)) => self.data(f, data).await?,
            (_, E::Data(_)) => {
                return Err(EngineError::Failed(
                    "the server sent file data outside a file".into(),
                ))
            }
            (State::InArchive(_), E::ArchiveEnd) => {
                self.archive_end().await?;
                State::BetweenArchives
            }
            (State::InFile(f), E::ArchiveEnd) => {
                return Err(EngineError::Failed(format!(
                    "archive ended in the middle of {}",
                    f.manifest_path
                )))
            }
            (State::Finished(..) | State::Ended(..), E::Progress { .. }) => {
                return Err(EngineError::Failed(
                    "the server sent a progress report after the end position".into(),
                ))
            }
            (state, E::Progress { .. }) => state,
            (State::BetweenArchives | State::Manifest, E::Manifest(chunk)) => {
                self.server_manifest.extend_from_slice(&chunk);
                State::Manifest
            }
            (
                State::BetweenArchives | State::Manifest,
                E::Finished {
                    end_lsn,
                    end_timeline,
                },
            ) => State::Finished(end_lsn, end_timeline),
            (state, event) => {
                return Err(EngineError::Failed(format!(
                    "the server sent {} {}",
                    describe_event(&event),
                    state.describe()
                )))
            }
        })
    }

    fn archive_start(
        &mut self,
        tablespace: Option<u32>,
        location: Option<String>,
    ) -> EngineResult<State> {
        if self.archives.contains(&tablespace) {
            return Err(EngineError::Failed(match tablespace {
                Some(oid) => format!("the server sent the archive of tablespace {oid} twice"),
                None => "the server sent the data directory's archive twice".into(),
            }));
        }
        self.archives.push(tablespace);
        if let (Some(oid), Some(location)) = (tablespace, location) {
            self.tablespaces.push(TablespaceEntry { oid, location });
        }
        Ok(State::InArchive(tablespace))
    }

    /// A new member: directories and links are recorded at once, a file is
    /// opened (and closed at once when empty).
    async fn entry(&mut self, tablespace: Option<u32>, entry: TarEntry) -> EngineResult<State> {
        let file = file_entry(tablespace, &entry)?;
        if file.kind != FileKind::File {
            self.pipeline.other(file).await?;
            return Ok(State::InArchive(tablespace));
        }
        let path = file.path.clone();
        let (file, content) = self.content(tablespace, file)?;
        if matches!(content, Content::Plain | Content::Incremental { .. }) {
            self.pipeline.begin(file).await?;
        }
        let mut f = OpenFile {
            manifest_path: manifest_path(tablespace, &path),
            tablespace,
            size: entry.size,
            remaining: entry.size,
            crc: 0,
            block: Vec::with_capacity(self.block_size),
            content,
        };
        if f.remaining == 0 {
            self.pipeline.end(&mut f, &mut self.ends).await?;
            return Ok(State::InArchive(tablespace));
        }
        Ok(State::InFile(Box::new(f)))
    }

    /// How a file's bytes become blocks: as they come, or (in an
    /// incremental transfer) rebuilt from the earlier backup's blocks. The
    /// entry comes back renamed to the whole file's name when the server
    /// sent changes.
    fn content(
        &mut self,
        tablespace: Option<u32>,
        mut file: FileEntry,
    ) -> EngineResult<(FileEntry, Content)> {
        let Some(base) = &self.base else {
            return Ok((file, Content::Plain));
        };
        let path = file.path.clone();
        let Some(full) = full_name(&path) else {
            if tablespace.is_none() && path == "backup_label" {
                return Ok((file.clone(), Content::Label(file, Vec::new())));
            }
            if let Some(rel) = rel_file(&path).filter(|r| r.fork == Fork::Main) {
                self.ends.heap.whole(tablespace, &rel);
            }
            return Ok((file, Content::Plain));
        };
        // `INCREMENTAL..` would name the parent directory.
        strata_repo::paths::check_relative_path(&full).map_err(|e| {
            EngineError::Failed(format!(
                "the server sent {path:?}, changes to a file whose name {e}"
            ))
        })?;
        let earlier = base.file(tablespace, &full).ok_or_else(|| {
            EngineError::Failed(format!(
                "the server sent {path} as changes to {full}, which backup {} does not hold",
                base.backup_id()
            ))
        })?;
        let inc = IncrementalFile::new(file.size, earlier, base.page_size, self.block_size)
            .map_err(|e| EngineError::Failed(format!("{path}: {e}")))?;
        let rel = rel_file(&full);
        file.path = full;
        let content = match rel {
            Some(rel) if rel.fork == Fork::VisibilityMap => Content::Map {
                inc: Box::new(inc),
                rel,
                entry: file.clone(),
                plans: Vec::new(),
            },
            rel => Content::Incremental {
                inc: Box::new(inc),
                main: rel.filter(|r| r.fork == Fork::Main),
            },
        };
        Ok((file, content))
    }

    /// The next bytes of the open file.
    async fn data(&mut self, mut f: Box<OpenFile>, mut data: Bytes) -> EngineResult<State> {
        if data.len() as u64 > f.remaining {
            return Err(EngineError::Failed(format!(
                "the server sent more data than the size of {}",
                f.manifest_path
            )));
        }
        let block_size = self.block_size;
        self.streamed += data.len() as u64;
        f.remaining -= data.len() as u64;
        f.crc = crc32c::crc32c_append(f.crc, &data);
        match &mut f.content {
            Content::Plain => {
                while !data.is_empty() {
                    let take = (block_size - f.block.len()).min(data.len());
                    f.block.extend_from_slice(&data.split_to(take));
                    if f.block.len() == block_size {
                        let full = std::mem::replace(&mut f.block, Vec::with_capacity(block_size));
                        self.pipeline.block(full).await?;
                    }
                }
            }
            Content::Incremental { inc, .. } => {
                let mut plans = Vec::new();
                inc.push(&data, &mut plans)
                    .map_err(|e| EngineError::Failed(format!("{}: {e}", f.manifest_path)))?;
                for plan in plans {
                    self.pipeline.plan(plan).await?;
                }
            }
            Content::Map { inc, plans, .. } => {
                inc.push(&data, plans)
                    .map_err(|e| EngineError::Failed(format!("{}: {e}", f.manifest_path)))?;
            }
            Content::Label(_, buf) => buf.extend_from_slice(&data),
        }
        if f.remaining > 0 {
            return Ok(State::InFile(f));
        }
        self.pipeline.end(&mut f, &mut self.ends).await?;
        Ok(State::InArchive(f.tablespace))
    }

    /// Every main fork of the archive's tablespace is in: the visibility
    /// maps held back can be checked against their heap changes.
    async fn archive_end(&mut self) -> EngineResult<()> {
        if let Some(base) = &self.base {
            for map in std::mem::take(&mut self.ends.maps) {
                self.pipeline
                    .map(map, &self.ends.heap, base, self.block_size)
                    .await?;
            }
        }
        Ok(())
    }

    /// The stream is over: the end position it must have brought, and the
    /// time the backup stopped.
    pub fn end_of_stream(&mut self) -> EngineResult<(Lsn, TimelineId)> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let State::Finished(lsn, tli) = state else {
            return Err(EngineError::Failed(format!(
                "the server ended the backup without its end position (the stream stopped {})",
                state.describe()
            )));
        };
        if !self.ends.maps.is_empty() {
            return Err(EngineError::Failed(
                "visibility map files arrived outside an archive".into(),
            ));
        }
        self.state = State::Ended(lsn, tli, Utc::now());
        Ok((lsn, tli))
    }

    /// Checks what arrived against the server's backup_manifest (and, in an
    /// incremental transfer, rewrites it to describe the whole files stored).
    pub fn check_server_manifest(&mut self) -> EngineResult<()> {
        check_server_manifest(&self.server_manifest, &self.ends.received)?;
        if self.base.is_some() {
            self.server_manifest =
                rewrite_server_manifest(&self.server_manifest, &self.ends.changes)
                    .map_err(|e| EngineError::Failed(format!("rewriting backup_manifest: {e}")))?;
        }
        Ok(())
    }

    /// Stores the server's backup_manifest, waits for every block to be
    /// stored, and commits the Strata manifest of `set`: the backup exists
    /// from here on. A commit that fails leaves no manifest behind.
    pub async fn commit(
        self,
        set: &BackupSet,
        start: &StreamStart,
    ) -> EngineResult<BackupManifest> {
        let State::Ended(stop_lsn, stop_timeline, stop_time) = self.state else {
            return Err(EngineError::Failed(
                "the backup stream is not complete".into(),
            ));
        };
        let manifest_entry = FileEntry {
            tablespace: None,
            path: "backup_manifest".into(),
            kind: FileKind::File,
            mode: 0o600,
            size: self.server_manifest.len() as u64,
            mtime: stop_time.timestamp(),
            link_target: None,
            crc32c: None,
            blocks: Vec::new(),
        };
        self.pipeline
            .whole_file(manifest_entry, &self.server_manifest, self.block_size)
            .await?;
        let (mut files, stats) = self.pipeline.finish().await?;
        let stats = BackupStats {
            // Everything a restore writes, the server's backup_manifest included,
            // so that new + deduplicated bytes add up to the total.
            file_count: files.iter().filter(|f| f.kind == FileKind::File).count() as u64,
            total_bytes: files.iter().map(|f| f.size).sum(),
            ..stats
        };
        let server_manifest = files.pop();
        let manifest = BackupManifest {
            format_version: strata_repo::manifest::MANIFEST_VERSION,
            backup_id: set.id.clone(),
            instance_id: set.instance_id.clone(),
            system_identifier: start.system_id,
            pg_version_num: start.pg_version,
            wal_segment_size: start.wal_segment_size,
            label: format!("strata backup {}", set.id),
            mode: set.mode.to_string(),
            start_lsn: start.start_lsn,
            start_timeline: start.start_timeline,
            stop_lsn,
            stop_timeline,
            start_time: start.start_time,
            stop_time,
            tablespaces: self.tablespaces,
            files,
            server_manifest,
            incremental_from: self.base.map(|b| b.manifest.backup_id),
            received_bytes: Some(self.streamed),
            stats,
        };
        let repo = self.repo;
        blocking(move || {
            if let Err(e) = repo.commit_manifest(&manifest) {
                // A put that failed may still have landed (a timeout after the
                // store accepted it); this backup is being recorded as failed, so
                // make sure the repository does not hold it either.
                let (instance_id, id) = (&manifest.instance_id, &manifest.backup_id);
                if let Err(cleanup) = repo.delete_backup(instance_id, id) {
                    tracing::warn!(
                        "backup {id}: removing the manifest after a failed commit: {cleanup}"
                    );
                }
                return Err(e.into());
            }
            Ok(manifest)
        })
        .await
    }
}
