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
use strata_repo::{
    BackupContents, BackupManifest, BackupStats, FileEntry, FileKind, Repository, TablespaceEntry,
};

use super::{
    check_server_manifest, file_entry, manifest_path, BlockPipeline, Content, Ends, OpenFile,
};
use crate::blocking::blocking;
use crate::import::MAX_MANIFEST;
use crate::incremental::{
    full_name, rel_file, rewrite_server_manifest, Fork, HeapChanges, IncrementalBase,
    IncrementalFile,
};
use crate::{EngineError, EngineResult};

/// Largest backup_label taken from an incremental transfer (PostgreSQL's
/// is a few hundred bytes; it is held whole to drop its `INCREMENTAL FROM`
/// lines).
const MAX_LABEL: u64 = 1 << 20;

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
    /// When the backup ended, if its source records it (an import of a
    /// backup taken earlier); else the end of the stream is.
    pub stop_time: Option<DateTime<Utc>>,
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
    /// Longest `server_manifest` taken ([`MAX_MANIFEST`]; tests lower it).
    max_manifest: u64,
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
            max_manifest: MAX_MANIFEST,
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
                // Held in memory until the stream ends: its length is the
                // server's to choose, so it is bounded like an imported one.
                if (self.server_manifest.len() + chunk.len()) as u64 > self.max_manifest {
                    return Err(EngineError::Failed(format!(
                        "the server's backup_manifest is over {} MiB: not one PostgreSQL writes",
                        self.max_manifest >> 20
                    )));
                }
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
                // Held in memory until complete: refused before any of it
                // arrives when the server claims more than a label can be.
                if file.size > MAX_LABEL {
                    return Err(EngineError::Failed(format!(
                        "the server sent a backup_label of {} bytes, over the {} KiB a label can be",
                        file.size,
                        MAX_LABEL >> 10
                    )));
                }
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
        let inc = IncrementalFile::new(
            file.size,
            earlier,
            base.page_size,
            self.block_size,
            base.segment_pages,
        )
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

    /// The stream is over: the end position it must have brought (the
    /// backup's stop time is taken now).
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
        mut self,
        set: &BackupSet,
        start: &StreamStart,
        contents: Option<BackupContents>,
    ) -> EngineResult<BackupManifest> {
        let State::Ended(stop_lsn, stop_timeline, stop_time) = self.state else {
            return Err(EngineError::Failed(
                "the backup stream is not complete".into(),
            ));
        };
        let stop_time = start.stop_time.unwrap_or(stop_time);
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
        let (mut files, stats, added) = self.pipeline.finish().await?;
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
            contents,
        };
        let repo = self.repo;
        blocking(move || {
            if let Err(e) = repo.commit_backup(&manifest, added) {
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

/// Backups fed recorded BASE_BACKUP streams (see [`recorded`]), on a
/// repository in memory and a catalog in memory: what is stored, what the
/// catalog says, and that a stream that goes wrong leaves nothing committed.
#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use pg_replication::{ReplicationError, TarReader};
    use strata_catalog::{
        BackupId, BackupStatus, Catalog, Instance, JobId, JobState, SqliteCatalog, SslMode,
    };
    use strata_repo::{MemoryStorage, ObjectSize, Storage, StorageError};

    use super::super::{BackupEvents, BackupOptions, BackupRun, PendingBackup};
    use super::*;
    use crate::{Engine, EngineSettings, NoProgress};

    /// The stream a PostgreSQL 15 server sends for a cluster with one
    /// tablespace, rebuilt member by member: real ustar headers (the
    /// server's layout and modes) run through the real tar parser, and a
    /// backup_manifest in the server's format with its CRC-32C checksums and
    /// SHA-256 Manifest-Checksum.
    mod recorded {
        use super::*;

        pub const END_LSN: Lsn = Lsn(0x0300_0100);
        pub const START_LSN: Lsn = Lsn(0x0300_0028);
        pub const TABLESPACE: u32 = 16384;
        pub const LOCATION: &str = "/srv/pg/ts1";

        /// Deterministic bytes that do not compress to nothing.
        pub fn pages(len: usize, seed: u64) -> Vec<u8> {
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

        pub enum Member {
            Dir(&'static str),
            File(&'static str, Vec<u8>),
        }

        /// The data directory's archive (a shared catalog of three 128 KiB
        /// blocks and a copy of it in a second database, so one is
        /// deduplicated) and the tablespace's.
        pub fn archives() -> Vec<(Option<u32>, Vec<Member>)> {
            use Member::{Dir, File};
            let label = format!(
                "START WAL LOCATION: {START_LSN} (file 000000010000000000000003)\n\
                 CHECKPOINT LOCATION: 0/3000060\nBACKUP METHOD: streamed\n\
                 BACKUP FROM: primary\nSTART TIME: 2026-12-06 04:00:00 UTC\n\
                 LABEL: strata backup 1\nSTART TIMELINE: 1\n"
            );
            let catalog = pages(3 * 131072 + 8192, 7);
            vec![
                (
                    Some(TABLESPACE),
                    vec![
                        Dir("PG_15_202209061"),
                        Dir("PG_15_202209061/5"),
                        File("PG_15_202209061/5/16385", pages(16384, 11)),
                    ],
                ),
                (
                    None,
                    vec![
                        File("backup_label", label.into_bytes()),
                        File(
                            "tablespace_map",
                            format!("{TABLESPACE} {LOCATION}\n").into_bytes(),
                        ),
                        File("PG_VERSION", b"15\n".to_vec()),
                        Dir("global"),
                        File("global/pg_control", pages(8192, 3)),
                        Dir("base"),
                        Dir("base/1"),
                        File("base/1/1259", catalog.clone()),
                        Dir("base/5"),
                        File("base/5/1259", catalog),
                        File("base/5/16390", Vec::new()),
                        Dir("pg_wal"),
                        Dir("pg_tblspc"),
                    ],
                ),
            ]
        }

        fn tar(members: &[Member]) -> Vec<u8> {
            let mut out = Vec::new();
            for m in members {
                let mut h = tar::Header::new_ustar();
                let (path, data): (&str, &[u8]) = match m {
                    Member::Dir(p) => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_mode(0o700);
                        (p, b"")
                    }
                    Member::File(p, d) => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(0o600);
                        (p, d)
                    }
                };
                h.set_path(path).unwrap();
                h.set_size(data.len() as u64);
                h.set_mtime(1_796_529_600);
                h.set_cksum();
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
            // The two zero blocks that end an archive.
            out.resize(out.len() + 1024, 0);
            out
        }

        /// The server's backup_manifest for `archives`.
        pub fn server_manifest(archives: &[(Option<u32>, Vec<Member>)]) -> Vec<u8> {
            let mut files = Vec::new();
            for (ts, members) in archives {
                for m in members {
                    if let Member::File(p, d) = m {
                        let path = manifest_path(*ts, p);
                        let crc = hex::encode(crc32c::crc32c(d).to_le_bytes());
                        files.push(format!(
                            "{{ \"Path\": \"{path}\", \"Size\": {}, \"Last-Modified\": \"2026-12-06 04:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{crc}\" }}",
                            d.len()
                        ));
                    }
                }
            }
            let body = format!(
                "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{}\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \"{START_LSN}\", \"End-LSN\": \"{END_LSN}\" }}\n],\n",
                files.join(",\n")
            );
            use sha2::Digest;
            let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
            format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes()
        }

        /// The whole stream, in the order a PostgreSQL 15 server sends it
        /// (tablespaces first, the data directory last, then the manifest
        /// in two messages and the end position).
        pub fn stream() -> Vec<BaseBackupEvent> {
            let archives = archives();
            let mut events = Vec::new();
            for (ts, members) in &archives {
                events.push(BaseBackupEvent::ArchiveStart {
                    name: match ts {
                        Some(oid) => format!("{oid}.tar"),
                        None => "base.tar".into(),
                    },
                    tablespace_oid: *ts,
                    location: ts.map(|_| LOCATION.to_string()),
                });
                let mut reader = TarReader::new();
                let mut parsed = VecDeque::new();
                // In 64 KiB messages, as the server sends them.
                for chunk in tar(members).chunks(65536) {
                    reader
                        .feed(Bytes::copy_from_slice(chunk), &mut parsed)
                        .unwrap();
                }
                reader.finish().unwrap();
                events.extend(parsed);
                events.push(BaseBackupEvent::ArchiveEnd);
                events.push(BaseBackupEvent::Progress { bytes_done: 65536 });
            }
            let manifest = server_manifest(&archives);
            let (a, b) = manifest.split_at(manifest.len() / 2);
            events.push(BaseBackupEvent::Manifest(Bytes::copy_from_slice(a)));
            events.push(BaseBackupEvent::Manifest(Bytes::copy_from_slice(b)));
            events.push(BaseBackupEvent::Finished {
                end_lsn: END_LSN,
                end_timeline: TimelineId(1),
            });
            events
        }
    }

    /// A store in memory that is full for the keys containing `full`.
    #[derive(Debug)]
    struct Full {
        inner: Arc<MemoryStorage>,
        full: &'static str,
    }

    impl Storage for Full {
        fn put(&self, key: &str, data: &[u8]) -> strata_repo::storage::StorageResult<()> {
            if key.contains(self.full) {
                return Err(StorageError::Io {
                    key: key.to_string(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(
            &self,
            key: &str,
            offset: u64,
            len: u64,
        ) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.inner.get_range(key, offset, len)
        }
        fn list(&self, prefix: &str) -> strata_repo::storage::StorageResult<Vec<String>> {
            self.inner.list(prefix)
        }
        fn list_sizes(&self, prefix: &str) -> strata_repo::storage::StorageResult<Vec<ObjectSize>> {
            self.inner.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> strata_repo::storage::StorageResult<()> {
            self.inner.delete(key)
        }
        fn exists(&self, key: &str) -> strata_repo::storage::StorageResult<bool> {
            self.inner.exists(key)
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    /// Replays a recorded stream; an `Err` is the server's error at that point.
    struct Replay(VecDeque<Result<BaseBackupEvent, ReplicationError>>);

    impl BackupEvents for Replay {
        fn next_event(
            &mut self,
        ) -> impl std::future::Future<Output = Result<Option<BaseBackupEvent>, ReplicationError>> + Send
        {
            let next = self.0.pop_front().transpose();
            async move { next }
        }
    }

    struct Rig {
        engine: Engine,
        memory: Arc<MemoryStorage>,
    }

    /// An engine over a catalog in memory that knows instance `i`, and a
    /// repository in memory, full for keys containing `full` (if any).
    fn rig(full: Option<&'static str>) -> Rig {
        let memory = Arc::new(MemoryStorage::new());
        let storage: Arc<dyn Storage> = match full {
            Some(full) => Arc::new(Full {
                inner: memory.clone(),
                full,
            }),
            None => memory.clone(),
        };
        let repo = Repository::open_or_init(storage).unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        catalog
            .add_instance(&Instance::new(
                "i",
                "127.0.0.1",
                5432,
                "postgres",
                SslMode::Disable,
            ))
            .unwrap();
        Rig {
            engine: Engine::new(catalog, repo, EngineSettings::default()),
            memory,
        }
    }

    fn start() -> StreamStart {
        StreamStart {
            system_id: 7_400_000_000_000_000_001,
            pg_version: 150010,
            wal_segment_size: 16 << 20,
            start_lsn: recorded::START_LSN,
            start_timeline: TimelineId(1),
            start_time: Utc::now(),
            total: Some(500_000),
            stop_time: None,
        }
    }

    /// Runs a backup of instance `i` over `events` as `Engine::backup` does
    /// once connected (the WAL is taken as stored), recording its outcome.
    /// Returns the outcome and the backup's id.
    async fn backup(
        rig: &Rig,
        events: Vec<Result<BaseBackupEvent, ReplicationError>>,
    ) -> (EngineResult<BackupSet>, BackupId, JobId) {
        let engine = &rig.engine;
        let PendingBackup {
            mut job,
            mut set,
            instance,
        } = engine
            .prepare_backup("i", &BackupOptions::default())
            .unwrap();
        let (id, job_id) = (set.id.clone(), job.id);
        let run = BackupRun {
            instance: &instance,
            set: &mut set,
            job: &mut job,
            progress: &NoProgress,
        };
        let mut waited_for = None;
        let outcome = engine
            .consume_backup(run, &start(), None, &mut Replay(events.into()), |lsn| {
                waited_for = Some(lsn);
                async { Ok(None) }
            })
            .await;
        if outcome.is_ok() {
            assert_eq!(waited_for, Some(recorded::END_LSN));
        }
        (engine.record_backup_outcome(set, job, outcome), id, job_id)
    }

    fn ok(events: Vec<BaseBackupEvent>) -> Vec<Result<BaseBackupEvent, ReplicationError>> {
        events.into_iter().map(Ok).collect()
    }

    /// The failure is recorded on the set and the job, and the repository
    /// holds no manifest of it (nor any object naming it).
    fn assert_nothing_committed(
        rig: &Rig,
        outcome: EngineResult<BackupSet>,
        id: &str,
        job: JobId,
        why: &str,
    ) {
        let err = outcome.expect_err("the backup must fail").to_string();
        assert!(err.contains(why), "{err}");
        let set = rig.engine.catalog.get_backup(id).unwrap();
        assert_eq!(set.status, BackupStatus::Failed);
        assert!(set.error.as_deref().unwrap_or_default().contains(why));
        let job = rig.engine.catalog.get_job(job).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.error.as_deref().unwrap_or_default().contains(why));
        assert_eq!(
            rig.engine.repo.list_backups("i").unwrap(),
            Vec::<String>::new()
        );
        let keys = rig.memory.list("").unwrap();
        assert!(
            keys.iter()
                .all(|k| !k.contains(id) && !k.ends_with(".manifest")),
            "{keys:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recorded_stream_commits_every_file_its_tablespace_and_the_catalog_rows() {
        let rig = rig(None);
        let (outcome, id, job_id) = backup(&rig, ok(recorded::stream())).await;
        let set = outcome.unwrap();

        let m = rig.engine.repo.read_manifest("i", &id).unwrap();
        assert_eq!(m.backup_id, id);
        assert_eq!(
            (m.start_lsn, m.stop_lsn),
            (recorded::START_LSN, recorded::END_LSN)
        );
        assert_eq!(m.system_identifier, 7_400_000_000_000_000_001);
        assert_eq!(
            m.tablespaces,
            vec![TablespaceEntry {
                oid: recorded::TABLESPACE,
                location: recorded::LOCATION.into()
            }]
        );
        assert_eq!(m.incremental_from, None);
        // Every member, in stream order, with its bytes as sent.
        let mut expected = Vec::new();
        for (ts, members) in recorded::archives() {
            for member in members {
                expected.push(match member {
                    recorded::Member::Dir(p) => (ts, p.to_string(), FileKind::Dir, Vec::new()),
                    recorded::Member::File(p, d) => (ts, p.to_string(), FileKind::File, d),
                });
            }
        }
        assert_eq!(m.files.len(), expected.len());
        let mut received = 0;
        for (file, (ts, path, kind, data)) in m.files.iter().zip(&expected) {
            assert_eq!((file.tablespace, &file.path, file.kind), (*ts, path, *kind));
            if *kind == FileKind::File {
                assert_eq!(file.size, data.len() as u64, "{path}");
                assert_eq!(file.crc32c, Some(crc32c::crc32c(data)), "{path}");
                let mut got = Vec::new();
                rig.engine
                    .repo
                    .read_blocks(&file.blocks, |b| {
                        got.extend_from_slice(&b);
                        Ok::<(), EngineError>(())
                    })
                    .unwrap();
                assert!(got == *data, "{path}: stored bytes differ");
                received += data.len() as u64;
            }
        }
        assert_eq!(m.received_bytes, Some(received));
        // The server's manifest is kept byte for byte, outside the file list.
        let server = m.server_manifest.as_ref().unwrap();
        let text = recorded::server_manifest(&recorded::archives());
        assert_eq!(server.size, text.len() as u64);
        assert_eq!(server.crc32c, Some(crc32c::crc32c(&text)));
        // The copy of the catalog in base/5 is stored once.
        let copy = 3 * 131072 + 8192;
        assert_eq!(m.stats.dedup_bytes, copy);
        assert_eq!(m.stats.total_bytes, received + text.len() as u64);
        assert_eq!(m.stats.file_count, 9);

        let row = rig.engine.catalog.get_backup(&id).unwrap();
        assert_eq!(row.status, BackupStatus::Success);
        assert_eq!(row.start_lsn, Some(recorded::START_LSN));
        assert_eq!(row.stop_lsn, Some(recorded::END_LSN));
        assert_eq!(row.stop_timeline, Some(TimelineId(1)));
        assert_eq!(row.total_bytes, m.stats.total_bytes);
        assert_eq!(row.dedup_bytes, copy);
        assert_eq!(row.file_count, 9);
        assert_eq!(row.total_bytes, set.total_bytes);
        let job = rig.engine.catalog.get_job(job_id).unwrap();
        assert_eq!((job.state, job.progress), (JobState::Finished, 100));
        assert_eq!(job.backup_id.as_deref(), Some(id.as_str()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_stops_early_commits_nothing() {
        let events = recorded::stream();
        // Cut inside the data directory's archive, and just before the end position.
        let in_base = events
            .iter()
            .position(|e| matches!(e, BaseBackupEvent::Entry(t) if t.path == "base/5/1259"))
            .unwrap()
            + 2;
        for cut in [in_base, events.len() - 1] {
            let rig = rig(None);
            let (outcome, id, job) = backup(&rig, ok(events[..cut].to_vec())).await;
            assert_nothing_committed(
                &rig,
                outcome,
                &id,
                job,
                "the server ended the backup without its end position",
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_out_of_protocol_order_commit_nothing() {
        let stream = recorded::stream();
        let base_start = stream
            .iter()
            .position(|e| {
                matches!(
                    e,
                    BaseBackupEvent::ArchiveStart {
                        tablespace_oid: None,
                        ..
                    }
                )
            })
            .unwrap();
        let first_data = stream
            .iter()
            .position(|e| matches!(e, BaseBackupEvent::Data(_)))
            .unwrap();
        let manifest = stream
            .iter()
            .position(|e| matches!(e, BaseBackupEvent::Manifest(_)))
            .unwrap();
        type Mangle = Box<dyn Fn(&mut Vec<BaseBackupEvent>)>;
        let cases: Vec<(Mangle, &str)> = vec![
            // A member with no archive started.
            (
                Box::new(move |e| {
                    e.remove(base_start);
                }),
                "the server sent the archive member \"backup_label\" between archives",
            ),
            // A file's data with its header missing.
            (
                Box::new(move |e| {
                    e.remove(first_data - 1);
                }),
                "file data outside a file",
            ),
            // The manifest inside an archive.
            (
                Box::new(move |e| {
                    let m = e.remove(manifest);
                    e.insert(base_start + 1, m);
                }),
                "the server sent backup_manifest data inside the data directory's archive",
            ),
            // Anything after the end position.
            (
                Box::new(|e| e.push(BaseBackupEvent::ArchiveEnd)),
                "the server sent the end of an archive after the end position",
            ),
        ];
        for (mangle, why) in cases {
            let mut events = stream.clone();
            mangle(&mut events);
            let rig = rig(None);
            let (outcome, id, job) = backup(&rig, ok(events)).await;
            assert_nothing_committed(&rig, outcome, &id, job, why);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tablespace_sent_twice_commits_nothing() {
        let stream = recorded::stream();
        let base_start = stream
            .iter()
            .position(|e| {
                matches!(
                    e,
                    BaseBackupEvent::ArchiveStart {
                        tablespace_oid: None,
                        ..
                    }
                )
            })
            .unwrap();
        let mut events = stream[..base_start].to_vec();
        events.extend(stream.clone());
        let rig = rig(None);
        let (outcome, id, job) = backup(&rig, ok(events)).await;
        assert_nothing_committed(
            &rig,
            outcome,
            &id,
            job,
            "the server sent the archive of tablespace 16384 twice",
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_error_mid_stream_commits_nothing() {
        let mut events = ok(recorded::stream());
        let at = events.len() / 2;
        events.insert(
            at,
            Err(ReplicationError::Server {
                severity: "ERROR".into(),
                code: "58P01".into(),
                message: "could not open file \"base/5/1259\": No such file or directory".into(),
                detail: None,
                hint: None,
            }),
        );
        let rig = rig(None);
        let (outcome, id, job) = backup(&rig, events).await;
        assert_nothing_committed(
            &rig,
            outcome,
            &id,
            job,
            "could not open file \"base/5/1259\"",
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_differs_from_the_servers_manifest_commits_nothing() {
        let mut events = recorded::stream();
        let data = events
            .iter_mut()
            .find_map(|e| match e {
                BaseBackupEvent::Data(d) if d.len() == 8192 => Some(d),
                _ => None,
            })
            .unwrap();
        let mut flipped = data.to_vec();
        flipped[100] ^= 1;
        *data = Bytes::from(flipped);
        let rig = rig(None);
        let (outcome, id, job) = backup(&rig, ok(events)).await;
        assert_nothing_committed(&rig, outcome, &id, job, "differs from the server's");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_store_commits_nothing() {
        // Full for packs: the blocks cannot be stored.
        let rig = rig(Some("packs/"));
        let (outcome, id, job) = backup(&rig, ok(recorded::stream())).await;
        assert_nothing_committed(&rig, outcome, &id, job, "No space left on device");
        // Full for the manifest only: the packs landed, the backup did not.
        let full_for_manifests = self::rig(Some(".manifest"));
        let (outcome, id, job) = backup(&full_for_manifests, ok(recorded::stream())).await;
        assert_nothing_committed(
            &full_for_manifests,
            outcome,
            &id,
            job,
            "No space left on device",
        );
        assert!(!full_for_manifests.memory.list("packs/").unwrap().is_empty());
    }

    /// The server's backup_manifest is held until the stream ends: one
    /// longer than the cap is refused as it arrives, not collected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_manifest_over_the_cap_is_refused() {
        assert_eq!(MAX_MANIFEST, 1 << 30);
        let rig = rig(None);
        let mut receiver = BackupReceiver::start(&rig.engine.repo, "i", None)
            .await
            .unwrap();
        assert_eq!(receiver.max_manifest, MAX_MANIFEST);
        // The production cap is 1 GiB; the same check at 1 MiB.
        receiver.max_manifest = 1 << 20;
        let half = Bytes::from(vec![b' '; 1 << 19]);
        for _ in 0..2 {
            receiver
                .feed(BaseBackupEvent::Manifest(half.clone()))
                .await
                .unwrap();
        }
        let err = receiver
            .feed(BaseBackupEvent::Manifest(Bytes::from_static(b"}")))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the server's backup_manifest is over 1 MiB"),
            "{err}"
        );
        assert_eq!(receiver.server_manifest.len(), 1 << 20);
    }

    /// An incremental transfer's backup_label is held whole: a member
    /// claiming more than a label can be is refused at its header.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_backup_label_is_refused() {
        let rig = rig(None);
        let earlier = BackupManifest {
            format_version: strata_repo::manifest::MANIFEST_VERSION,
            backup_id: "earlier".into(),
            instance_id: "i".into(),
            system_identifier: 7_400_000_000_000_000_001,
            pg_version_num: 170000,
            wal_segment_size: 16 << 20,
            label: String::new(),
            mode: String::new(),
            start_lsn: recorded::START_LSN,
            start_timeline: TimelineId(1),
            stop_lsn: recorded::END_LSN,
            stop_timeline: TimelineId(1),
            start_time: Utc::now(),
            stop_time: Utc::now(),
            tablespaces: Vec::new(),
            files: Vec::new(),
            server_manifest: None,
            incremental_from: None,
            received_bytes: None,
            stats: BackupStats::default(),
            contents: None,
        };
        let base = IncrementalBase::new(earlier, 8192, 131072);
        let label = |size: u64| {
            BaseBackupEvent::Entry(TarEntry {
                path: "backup_label".into(),
                kind: pg_replication::TarEntryKind::File,
                mode: 0o600,
                size,
                mtime: 1_796_529_600,
            })
        };
        let archive = BaseBackupEvent::ArchiveStart {
            name: "base.tar".into(),
            tablespace_oid: None,
            location: None,
        };
        let mut receiver = BackupReceiver::start(&rig.engine.repo, "i", Some(base))
            .await
            .unwrap();
        receiver.feed(archive.clone()).await.unwrap();
        let err = receiver.feed(label(MAX_LABEL + 1)).await.unwrap_err();
        assert!(
            err.to_string().contains(
                "the server sent a backup_label of 1048577 bytes, over the 1024 KiB a label can be"
            ),
            "{err}"
        );
        // At the cap it is taken.
        let base = IncrementalBase::new(receiver.base.take().unwrap().manifest, 8192, 131072);
        let mut receiver = BackupReceiver::start(&rig.engine.repo, "i", Some(base))
            .await
            .unwrap();
        receiver.feed(archive).await.unwrap();
        receiver.feed(label(MAX_LABEL)).await.unwrap();
        receiver
            .feed(BaseBackupEvent::Data(Bytes::from(vec![
                b'x';
                MAX_LABEL as usize
            ])))
            .await
            .unwrap();
    }

    /// The machine alone: a failed receiver refuses what follows, and a
    /// stream's manifest cannot be committed before the stream is over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_event_fails_the_receiver_for_good() {
        let rig = rig(None);
        let mut receiver = BackupReceiver::start(&rig.engine.repo, "i", None)
            .await
            .unwrap();
        let err = receiver
            .feed(BaseBackupEvent::ArchiveEnd)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the end of an archive between archives"),
            "{err}"
        );
        let err = receiver
            .feed(BaseBackupEvent::ArchiveStart {
                name: "base.tar".into(),
                tablespace_oid: None,
                location: None,
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already refused"), "{err}");
        assert!(receiver.end_of_stream().is_err());
        let set = BackupSet::started(
            "1".into(),
            "i",
            strata_catalog::BackupMode::Manual,
            Utc::now(),
            None,
        );
        let err = receiver.commit(&set, &start(), None).await.unwrap_err();
        assert!(err.to_string().contains("not complete"), "{err}");
        assert!(rig.engine.repo.list_backups("i").unwrap().is_empty());
    }
}
