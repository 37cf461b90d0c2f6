//! Importing a backup taken elsewhere: the directory `pg_basebackup -Ft`
//! writes (`base.tar`, one `<oid>.tar` per tablespace, `pg_wal.tar` with
//! `-X stream`, `backup_manifest`), each archive plain, gzip or zstd.
//!
//! Two passes. The first reads every archive without storing anything: the
//! tar structure to its end-of-archive blocks, every member name (the rules
//! of [`strata_repo::paths`], as for a server's stream), each file's size
//! and CRC-32C against `backup_manifest`, `backup_label` (start position,
//! timeline), `global/pg_control` (system identifier) and the first page of
//! every WAL segment (system identifier, address, segment size). Without a
//! `backup_manifest`, the WAL is decoded for the backup-end record that
//! gives the end position, and the set's manifest is written from the
//! files as read (src/backend/access/transam/xlog.c, `XLOG_BACKUP_END`).
//! Only a
//! directory that passes all of it gets a job and a backup set. The second
//! pass replays the archives as the BASE_BACKUP event stream the backup's
//! receiver consumes (so files are cut, deduplicated, checked and committed
//! exactly as a backup's are) and stores the WAL from `pg_wal/` or
//! `pg_wal.tar` through the WAL uploader, as a backup's own WAL stream.
//! Other tools' repositories come through the same passes as tar streams
//! a [`TarSource`] makes (see [`crate::import_pgbackrest`]), with the
//! start and end positions their own records give.
//!
//! References: src/bin/pg_basebackup/pg_basebackup.c (archive names),
//! src/backend/backup/basebackup.c (`backup_label`, members, the manifest's
//! `WAL-Ranges`), src/include/access/xlog_internal.h
//! (`XLogLongPageHeaderData`), src/include/catalog/pg_control.h.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use pg_replication::{BaseBackupEvent, ReplicationError, TarEntry, TarEntryKind, TarReader};
use pg_wal::{Lsn, SegmentNo, TimelineId, WalGeometry};
use strata_catalog::{BackupSet, Instance, Job, JobKind, KeepUntil};
use strata_repo::{FileEntry, FileKind};
use tokio::sync::mpsc;

use crate::backup::{
    check_server_manifest, file_entry, manifest_path, BackupEvents, BackupOptions, BackupRun,
    StreamStart,
};
use crate::blocking::blocking;
use crate::segment::SegmentArchiver;
use crate::wal_uploader::WalUploader;
use crate::{Engine, EngineError, EngineResult, Progress};

/// Bytes read from an archive file at a time.
const CHUNK: usize = 256 * 1024;
/// Largest member whose contents the first pass keeps (backup_label,
/// tablespace_map, pg_control, PG_VERSION).
const SMALL_FILE: u64 = 64 * 1024;
/// Largest `backup_manifest` read (PostgreSQL's is some 150 bytes a file).
pub(crate) const MAX_MANIFEST: u64 = 1 << 30;
/// `XLogLongPageHeaderData`: the first 40 bytes of every segment.
const LONG_HEADER: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;

fn refused(msg: impl Into<String>) -> EngineError {
    EngineError::Refused(msg.into())
}

/// How an archive file is compressed, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What an archive of the directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `base.tar`: the data directory.
    Base,
    /// `<oid>.tar`: a tablespace.
    Tablespace(u32),
    /// `pg_wal.tar`: the WAL `-X stream` received.
    Wal,
}

#[derive(Debug, Clone)]
pub(crate) struct Archive {
    pub(crate) file: String,
    pub(crate) role: Role,
    compression: Compression,
    pub(crate) size: u64,
}

impl Archive {
    /// An archive another module produces as a tar stream.
    pub(crate) fn synthesized(file: String, role: Role, size: u64) -> Archive {
        Archive {
            file,
            role,
            compression: Compression::None,
            size,
        }
    }
}

/// Produces the tar stream of an archive that is not a file of a
/// directory (another tool's repository, read as the stream its files
/// would make).
pub(crate) trait TarSource: Send + Sync {
    fn open(&self, archive: &Archive) -> EngineResult<Box<dyn Read + Send>>;
    /// What the archives are read from, for messages.
    fn describe(&self) -> String;
}

/// Where the archives of an import are read from.
#[derive(Clone)]
pub(crate) enum Origin {
    /// Files of a directory, as `pg_basebackup -Ft` writes them.
    Dir(PathBuf),
    /// Tar streams made on the fly.
    Synthesized(Arc<dyn TarSource>),
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Dir(dir) => dir.display().to_string(),
            Origin::Synthesized(source) => source.describe(),
        }
    }
}

/// What an import reads, classified.
pub(crate) struct ImportDir {
    origin: Origin,
    /// Tablespaces first, the data directory last (the server's order),
    /// then `pg_wal.tar`.
    archives: Vec<Archive>,
    manifest: Option<Vec<u8>>,
    /// Start and end of the backup when its source records them (then no
    /// `backup_manifest` is needed): `backup_label` must agree.
    known_range: Option<(Lsn, Lsn)>,
    /// Whether the WAL that follows the backup's, as far as it runs on
    /// without a gap, is stored too.
    wal_after: bool,
    /// When the backup ended, when its source records it.
    ended_at: Option<DateTime<Utc>>,
}

/// Opens a file of the import directory without following a link in its
/// last component: a link planted there is refused, not read through.
fn open_member(dir: &Path, name: &str) -> EngineResult<File> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| refused(format!("cannot open {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| refused(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

/// The role and compression a file name announces; `None` for a name
/// `pg_basebackup -Ft` does not write.
fn classify(name: &str) -> Option<(Role, Compression)> {
    let (stem, compression) = if let Some(s) = name.strip_suffix(".tar.gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".tgz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".tar.zst") {
        (s, Compression::Zstd)
    } else {
        (name.strip_suffix(".tar")?, Compression::None)
    };
    let role = match stem {
        "base" => Role::Base,
        "pg_wal" => Role::Wal,
        oid if !oid.is_empty()
            && oid.len() <= 10
            && oid.bytes().all(|b| b.is_ascii_digit())
            && !oid.starts_with('0') =>
        {
            Role::Tablespace(oid.parse().ok()?)
        }
        _ => return None,
    };
    Some((role, compression))
}

impl ImportDir {
    fn scan(dir: &Path) -> EngineResult<ImportDir> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| refused(format!("cannot read {}: {e}", dir.display())))?;
        let mut archives = Vec::new();
        let mut manifest = None;
        let mut unknown = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| refused(format!("{}: {e}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "backup_manifest" {
                let mut text = Vec::new();
                open_member(dir, &name)?
                    .take(MAX_MANIFEST + 1)
                    .read_to_end(&mut text)
                    .map_err(|e| refused(format!("reading backup_manifest: {e}")))?;
                if text.len() as u64 > MAX_MANIFEST {
                    return Err(refused(format!(
                        "backup_manifest is over {} MiB: not one PostgreSQL writes",
                        MAX_MANIFEST >> 20
                    )));
                }
                manifest = Some(text);
                continue;
            }
            let Some((role, compression)) = classify(&name) else {
                unknown.push(name);
                continue;
            };
            if name.ends_with(".tgz") && role != Role::Base && role != Role::Wal {
                unknown.push(name);
                continue;
            }
            let size = open_member(dir, &name)?
                .metadata()
                .map(|m| m.len())
                .map_err(|e| refused(format!("{name}: {e}")))?;
            if archives.iter().any(|a: &Archive| a.role == role) {
                return Err(refused(format!(
                    "{} holds two archives of the same kind ({name} and another): keep one",
                    dir.display()
                )));
            }
            archives.push(Archive {
                file: name,
                role,
                compression,
                size,
            });
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(refused(format!(
                "{} holds files pg_basebackup -Ft does not write: {} (expected base.tar, <oid>.tar, pg_wal.tar, each optionally .gz or .zst, and backup_manifest)",
                dir.display(),
                unknown.join(", ")
            )));
        }
        if !archives.iter().any(|a| a.role == Role::Base) {
            return Err(refused(format!(
                "{} has no base.tar (nor base.tar.gz or base.tar.zst): not the output of pg_basebackup -Ft",
                dir.display()
            )));
        }
        archives.sort_by_key(|a| match a.role {
            Role::Tablespace(oid) => (0, oid),
            Role::Base => (1, 0),
            Role::Wal => (2, 0),
        });
        Ok(ImportDir {
            origin: Origin::Dir(dir.to_path_buf()),
            archives,
            manifest,
            known_range: None,
            wal_after: false,
            ended_at: None,
        })
    }

    /// Archives a [`TarSource`] produces, of a backup that starts and
    /// ends at `range`; `wal_after` as the field says.
    pub(crate) fn synthesized(
        source: Arc<dyn TarSource>,
        archives: Vec<Archive>,
        range: (Lsn, Lsn),
        wal_after: bool,
        ended_at: Option<DateTime<Utc>>,
    ) -> ImportDir {
        ImportDir {
            origin: Origin::Synthesized(source),
            archives,
            manifest: None,
            known_range: Some(range),
            wal_after,
            ended_at,
        }
    }

    fn total_size(&self) -> u64 {
        self.archives.iter().map(|a| a.size).sum()
    }
}

/// Counts the bytes read from an archive file, for progress.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads one archive to its end, handing every tar event to `visit`. A
/// truncated, corrupt or trailing-garbage archive is refused, naming it.
fn walk(
    origin: &Origin,
    archive: &Archive,
    read: &Arc<AtomicU64>,
    mut visit: impl FnMut(BaseBackupEvent) -> EngineResult<()>,
) -> EngineResult<()> {
    let name = &archive.file;
    let dir = match origin {
        Origin::Dir(dir) => dir,
        Origin::Synthesized(source) => {
            let input = Counted {
                inner: source.open(archive)?,
                read: read.clone(),
            };
            return walk_tar(name, input, visit);
        }
    };
    let file = Counted {
        inner: open_member(dir, name)?,
        read: read.clone(),
    };
    let input: Box<dyn Read> = match archive.compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(|e| refused(format!("{name}: zstd: {e}")))?,
        ),
    };
    walk_tar(name, input, &mut visit)
}

/// Reads the tar stream `input` of archive `name` to its end.
fn walk_tar(
    name: &str,
    mut input: impl Read,
    mut visit: impl FnMut(BaseBackupEvent) -> EngineResult<()>,
) -> EngineResult<()> {
    let mut reader = TarReader::new();
    let mut events = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(refused(format!("{name}: {e}"))),
        };
        reader
            .feed(Bytes::copy_from_slice(&buf[..n]), &mut events)
            .map_err(|e| refused(format!("{name}: {e}")))?;
        for event in events.drain(..) {
            visit(event)?;
        }
        // Read on past the tar's end: a compressed file is checked (its
        // checksum, its length) only at its own end.
    }
    reader
        .finish()
        .map_err(|e| refused(format!("{name} is truncated: {e}")))?;
    if !reader.ended() {
        return Err(refused(format!(
            "{name} is truncated: it ends without the end-of-archive blocks"
        )));
    }
    Ok(())
}

/// What a WAL archive member is.
enum WalMember {
    Segment(TimelineId, SegmentNo),
    History(TimelineId),
    /// `archive_status` and its `.done` files, `.partial` segments: not stored.
    Other,
}

/// `name` relative to `pg_wal/`; refused unless PostgreSQL could have written it there.
fn wal_member(name: &str, kind: &TarEntryKind, geometry: &WalGeometry) -> EngineResult<WalMember> {
    if let Some(tli) = pg_wal::parse_history_file_name(name) {
        if *kind == TarEntryKind::File {
            return Ok(WalMember::History(tli));
        }
    }
    if let Some((tli, seg)) = geometry.parse_segment_file_name(name) {
        if *kind == TarEntryKind::File {
            return Ok(WalMember::Segment(tli, seg));
        }
    }
    let status_file = name.strip_prefix("archive_status/").is_some_and(|f| {
        f.strip_suffix(".done")
            .or_else(|| f.strip_suffix(".ready"))
            .is_some_and(|s| {
                geometry
                    .parse_segment_file_name(s.trim_end_matches(".partial"))
                    .is_some()
                    || pg_wal::parse_history_file_name(s).is_some()
            })
    });
    let partial = name
        .strip_suffix(".partial")
        .is_some_and(|s| geometry.parse_segment_file_name(s).is_some());
    match kind {
        TarEntryKind::Directory if name == "archive_status" => Ok(WalMember::Other),
        TarEntryKind::File if status_file || partial => Ok(WalMember::Other),
        _ => Err(refused(format!(
            "the WAL archive holds {name:?}, which is not a WAL file"
        ))),
    }
}

/// The start of a backup as `backup_label` states it.
#[derive(Debug, Clone, PartialEq)]
struct BackupLabel {
    start_lsn: Lsn,
    timeline: TimelineId,
    start_time: Option<DateTime<Utc>>,
}

fn parse_backup_label(text: &[u8]) -> EngineResult<BackupLabel> {
    let text = std::str::from_utf8(text)
        .map_err(|_| refused("backup_label is not text: not written by PostgreSQL"))?;
    let mut start_lsn = None;
    let mut timeline = None;
    let mut start_time = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        match key {
            // "0/2000028 (file 000000010000000000000002)"
            "START WAL LOCATION" => {
                start_lsn = value.split_whitespace().next().and_then(|v| v.parse().ok())
            }
            "START TIMELINE" => timeline = value.trim().parse().ok().map(TimelineId),
            // "2026-12-06 04:00:00 UTC"
            "START TIME" => {
                start_time = value
                    .trim()
                    .strip_suffix(" UTC")
                    .and_then(|v| NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S").ok())
                    .map(|t| t.and_utc())
            }
            "INCREMENTAL FROM LSN" | "INCREMENTAL FROM TLI" => {
                return Err(refused(
                    "backup_label says this is an incremental backup (pg_basebackup --incremental): it holds only changed blocks and cannot be imported; combine it first with pg_combinebackup",
                ))
            }
            _ => {}
        }
    }
    let start_lsn =
        start_lsn.ok_or_else(|| refused("backup_label has no valid START WAL LOCATION"))?;
    // Labels before PostgreSQL 11 have no START TIMELINE; the file name has it.
    let timeline = timeline
        .or_else(|| {
            let file = text
                .lines()
                .find_map(|l| l.strip_prefix("START WAL LOCATION: "))?
                .split("(file ")
                .nth(1)?
                .get(..8)?;
            u32::from_str_radix(file, 16).ok().map(TimelineId)
        })
        .ok_or_else(|| refused("backup_label has no START TIMELINE"))?;
    Ok(BackupLabel {
        start_lsn,
        timeline,
        start_time,
    })
}

/// The end of the backup from the manifest's `WAL-Ranges` (its last range),
/// checked against the start `backup_label` gives.
fn manifest_wal_end(manifest: &[u8], label: &BackupLabel) -> EngineResult<(Lsn, TimelineId)> {
    let bad = |why: &str| refused(format!("backup_manifest: {why}"));
    let doc: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let ranges = doc
        .get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .filter(|r| !r.is_empty())
        .ok_or_else(|| bad("no WAL-Ranges"))?;
    let field = |range: &serde_json::Value, key: &str| -> EngineResult<Lsn> {
        range
            .get(key)
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(&format!("a WAL range without a valid {key}")))
    };
    let first = &ranges[0];
    let last = &ranges[ranges.len() - 1];
    if ranges.len() > 1 {
        return Err(refused(
            "the backup spans a timeline switch (a standby promoted during it): Strata imports backups of one timeline",
        ));
    }
    let start = field(first, "Start-LSN")?;
    let end = field(last, "End-LSN")?;
    let tli = last
        .get("Timeline")
        .and_then(|t| t.as_u64())
        .and_then(|t| u32::try_from(t).ok())
        .map(TimelineId)
        .ok_or_else(|| bad("a WAL range without a timeline"))?;
    if start != label.start_lsn || tli != label.timeline {
        return Err(bad(&format!(
            "its WAL range starts at {start} on timeline {}, backup_label at {} on timeline {}: they are not of the same backup",
            tli.0, label.start_lsn, label.timeline.0
        )));
    }
    if end < start {
        return Err(bad("its WAL range ends before it starts"));
    }
    Ok((end, tli))
}

/// Checks the first page of a WAL segment (`XLogLongPageHeaderData`):
/// written by the cluster `system_id`, at the segment's own address, in
/// segments of `size` bytes. Returns the segment size it states.
fn check_segment_header(
    name: &str,
    header: &[u8],
    system_id: u64,
    start: Lsn,
    size: u64,
) -> EngineResult<u64> {
    let bad = |why: String| refused(format!("WAL segment {name}: {why}"));
    if header.len() < LONG_HEADER {
        return Err(bad("shorter than a page header".into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
    if u16_at(2) & XLP_LONG_HEADER == 0 {
        return Err(bad("its first page has no long header".into()));
    }
    let seg_size = u64::from(u32_at(32));
    if seg_size != size {
        return Err(bad(format!(
            "{size} bytes, its header says segments are {seg_size}"
        )));
    }
    let addr = Lsn(u64_at(8));
    if addr != start {
        return Err(bad(format!("its first page is at {addr}, not {start}")));
    }
    let sysid = u64_at(24);
    if sysid != system_id {
        return Err(bad(format!(
            "written by the cluster with system identifier {sysid}, the backup's is {system_id}"
        )));
    }
    Ok(seg_size)
}

/// What a member of `role`'s archive is on the WAL side: `None` for a file
/// of the backup set. In the data directory's archive only segments and
/// history files directly in `pg_wal/` are WAL (`-X fetch`); everything
/// else there is an ordinary member, checked as any. `pg_wal.tar` holds
/// WAL files only.
fn wal_kind(
    role: Role,
    entry: &TarEntry,
    geometry: &WalGeometry,
) -> EngineResult<Option<WalMember>> {
    let member = wal_kind_unsized(role, entry, geometry)?;
    // Both passes ask (the file may have been swapped between them): what the second one
    // gathers in memory is bounded by what the header says, so the header is bounded here.
    let max = match member {
        Some(WalMember::Segment(..)) => MAX_WAL_SEGMENT,
        Some(WalMember::History(_)) => MAX_HISTORY_FILE,
        _ => return Ok(member),
    };
    if entry.size > max {
        return Err(refused(format!(
            "{} is {} bytes; a WAL {} is at most {max}",
            entry.path,
            entry.size,
            if max == MAX_WAL_SEGMENT {
                "segment"
            } else {
                "history file"
            }
        )));
    }
    Ok(member)
}

/// Largest WAL segment PostgreSQL writes (`--wal-segsize` 1024).
const MAX_WAL_SEGMENT: u64 = 1 << 30;
/// Largest timeline history file taken: one line per earlier timeline, a few dozen bytes each.
const MAX_HISTORY_FILE: u64 = 16 << 20;

/// [`wal_kind`] before the member's size is checked.
fn wal_kind_unsized(
    role: Role,
    entry: &TarEntry,
    geometry: &WalGeometry,
) -> EngineResult<Option<WalMember>> {
    match role {
        Role::Tablespace(_) => Ok(None),
        Role::Wal => wal_member(&entry.path, &entry.kind, geometry).map(Some),
        Role::Base => {
            let Some(name) = entry.path.strip_prefix("pg_wal/") else {
                return Ok(None);
            };
            Ok(match wal_member(name, &entry.kind, geometry) {
                Ok(m @ (WalMember::Segment(..) | WalMember::History(_))) => Some(m),
                _ => None,
            })
        }
    }
}

/// The name a WAL member is stored and reported under.
fn wal_file_name(role: Role, path: &str) -> &str {
    match role {
        Role::Base => path.strip_prefix("pg_wal/").unwrap_or(path),
        _ => path,
    }
}

/// A WAL segment seen by the first pass.
struct SeenSegment {
    name: String,
    tli: TimelineId,
    seg: SegmentNo,
    size: u64,
    header: Vec<u8>,
}

/// What the first pass learned.
struct Survey {
    label: BackupLabel,
    system_id: u64,
    pg_major: u32,
    tablespace_map: HashMap<u32, String>,
    /// Size and CRC-32C of every file but WAL, by manifest path.
    received: HashMap<String, (u64, u32)>,
    /// Bytes of those files.
    total: u64,
    segments: Vec<SeenSegment>,
    /// The end position the WAL's backup-end record gives (looked for only
    /// without a `backup_manifest`).
    backup_end: Option<Lsn>,
}

/// The member being read in the first pass.
struct Reading {
    path: String,
    tablespace: Option<u32>,
    size: u64,
    remaining: u64,
    crc: u32,
    /// The contents, for the few small files the checks read.
    keep: Option<Vec<u8>>,
    /// Not a file of the set: a WAL segment (its index in the survey's
    /// list) or a history file (`None` inside).
    wal: Option<Option<usize>>,
    /// A segment the [`EndFinder`] decodes.
    decode: bool,
}

/// Files of the data directory whose contents the checks read.
fn kept(tablespace: Option<u32>, entry: &TarEntry) -> bool {
    tablespace.is_none()
        && entry.size <= SMALL_FILE
        && matches!(
            entry.path.as_str(),
            "backup_label" | "tablespace_map" | "global/pg_control" | "PG_VERSION"
        )
}

/// What the first pass gathers while reading.
#[derive(Default)]
struct Gathered {
    received: HashMap<String, (u64, u32)>,
    small: HashMap<String, Vec<u8>>,
    segments: Vec<SeenSegment>,
    total: u64,
    /// Set when there is no `backup_manifest` to give the end position.
    end: Option<EndFinder>,
}

/// Looks for the backup's end in its WAL: the `XLOG_BACKUP_END` record
/// naming its start, which a primary writes when the backup stops (its end
/// is the position `pg_backup_stop` returns). Segments are decoded from the
/// one holding the start, on its timeline, while they follow each other.
#[derive(Default)]
struct EndFinder {
    decoder: Option<pg_wal::decode::WalDecoder>,
    /// The segment the decoder expects next.
    next: Lsn,
    start: Option<Lsn>,
    found: Option<Lsn>,
    /// A gap, another timeline or undecodable WAL: nothing more is looked at.
    stopped: bool,
}

impl EndFinder {
    /// Whether the segment `name` of `size` bytes is to be decoded, given
    /// the backup's label (read before any WAL: it leads base.tar).
    fn begin(&mut self, name: &str, size: u64, label: Option<&[u8]>) -> bool {
        if self.stopped || self.found.is_some() {
            return false;
        }
        let Some(label) = label.and_then(|l| parse_backup_label(l).ok()) else {
            self.stopped = true;
            return false;
        };
        let Ok(geometry) = WalGeometry::new(size) else {
            self.stopped = true;
            return false;
        };
        let Some((tli, seg)) = geometry.parse_segment_file_name(name) else {
            return false;
        };
        let seg_start = geometry.segment_start(seg);
        if tli != label.timeline {
            return false;
        }
        if self.decoder.is_none() {
            let first = geometry.segment_start(geometry.segment_of(label.start_lsn));
            if seg_start != first {
                return false;
            }
            self.decoder = Some(pg_wal::decode::WalDecoder::new(geometry, seg_start));
            self.start = Some(label.start_lsn);
        } else if seg_start != self.next {
            self.stopped = true;
            return false;
        }
        self.next = seg_start + size;
        true
    }

    fn feed(&mut self, data: &[u8]) {
        let (Some(decoder), Some(start)) = (self.decoder.as_mut(), self.start) else {
            return;
        };
        match decoder.feed(data) {
            Ok(events) => {
                for event in events {
                    if let pg_wal::decode::WalEvent::BackupEnd {
                        end_lsn,
                        start: ended,
                        ..
                    } = event
                    {
                        if ended == start {
                            self.found = Some(end_lsn);
                        }
                    }
                }
            }
            Err(_) => self.stopped = true,
        }
    }
}

impl Gathered {
    fn close(&mut self, f: Reading) {
        if f.wal.is_some() {
            return;
        }
        self.received
            .insert(manifest_path(f.tablespace, &f.path), (f.size, f.crc));
        if let Some(data) = f.keep {
            self.small.insert(f.path, data);
        }
    }

    /// A new member of `archive`; `Some` when its data follows.
    fn entry(&mut self, archive: &Archive, entry: TarEntry) -> EngineResult<Option<Reading>> {
        let tablespace = match archive.role {
            Role::Tablespace(oid) => Some(oid),
            _ => None,
        };
        // Names only: the segment size is checked against each header.
        let geometry = WalGeometry::new(16 << 20).map_err(|e| refused(e.to_string()))?;
        let mut decode = false;
        let wal = match wal_kind(archive.role, &entry, &geometry)? {
            Some(WalMember::Segment(tli, seg)) => {
                let name = wal_file_name(archive.role, &entry.path);
                let label = self.small.get("backup_label").map(Vec::as_slice);
                decode = self
                    .end
                    .as_mut()
                    .is_some_and(|end| end.begin(name, entry.size, label));
                self.segments.push(SeenSegment {
                    name: name.to_string(),
                    tli,
                    seg,
                    size: entry.size,
                    header: Vec::new(),
                });
                Some(Some(self.segments.len() - 1))
            }
            Some(WalMember::History(_) | WalMember::Other) => Some(None),
            None => None,
        };
        if wal.is_none() {
            import_entry(tablespace, &entry)?;
        }
        if entry.kind != TarEntryKind::File {
            return Ok(None);
        }
        if wal.is_none() {
            self.total += entry.size;
        }
        let f = Reading {
            keep: kept(tablespace, &entry).then(Vec::new),
            path: entry.path,
            tablespace,
            size: entry.size,
            remaining: entry.size,
            crc: 0,
            wal,
            decode,
        };
        if f.remaining == 0 {
            self.close(f);
            return Ok(None);
        }
        Ok(Some(f))
    }

    /// The next bytes of `f`; true once it is complete (and closed).
    fn data(&mut self, f: &mut Reading, data: &[u8]) -> bool {
        f.remaining = f.remaining.saturating_sub(data.len() as u64);
        f.crc = crc32c::crc32c_append(f.crc, data);
        if let Some(keep) = f.keep.as_mut() {
            keep.extend_from_slice(data);
        }
        if f.decode {
            if let Some(end) = self.end.as_mut() {
                end.feed(data);
            }
        }
        if let Some(Some(i)) = f.wal {
            let header = &mut self.segments[i].header;
            let need = LONG_HEADER.saturating_sub(header.len()).min(data.len());
            header.extend_from_slice(&data[..need]);
        }
        f.remaining == 0
    }
}

/// The manifest entry check of a backup's stream, worded for an import.
fn import_entry(tablespace: Option<u32>, entry: &TarEntry) -> EngineResult<()> {
    file_entry(tablespace, entry).map(|_| ()).map_err(|e| {
        refused(
            e.to_string()
                .replace("the server sent", "the archive holds"),
        )
    })
}

/// The first pass: see the module documentation.
fn survey(dir: &ImportDir, read: &Arc<AtomicU64>) -> EngineResult<Survey> {
    let mut gathered = Gathered {
        end: (dir.manifest.is_none() && dir.known_range.is_none()).then(EndFinder::default),
        ..Gathered::default()
    };
    for archive in &dir.archives {
        let mut current: Option<Reading> = None;
        walk(&dir.origin, archive, read, |event| {
            match event {
                BaseBackupEvent::Entry(entry) => {
                    current = gathered.entry(archive, entry)?;
                }
                BaseBackupEvent::Data(data) => {
                    let Some(f) = current.as_mut() else {
                        return Err(refused(format!("{}: data outside a file", archive.file)));
                    };
                    if gathered.data(f, &data) {
                        if let Some(f) = current.take() {
                            gathered.close(f);
                        }
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
    }
    conclude(dir, gathered)
}

/// The checks on what the first pass read, into the facts of the backup.
fn conclude(dir: &ImportDir, g: Gathered) -> EngineResult<Survey> {
    let label = g
        .small
        .get("backup_label")
        .ok_or_else(|| refused("base.tar has no backup_label: not a base backup"))?;
    let label = parse_backup_label(label)?;
    let control = g
        .small
        .get("global/pg_control")
        .filter(|c| c.len() >= 16)
        .ok_or_else(|| refused("base.tar has no global/pg_control"))?;
    let system_id = u64::from_le_bytes(control[..8].try_into().unwrap_or([0; 8]));
    let pg_major = g
        .small
        .get("PG_VERSION")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| refused("base.tar has no readable PG_VERSION"))?;
    let mut tablespace_map = HashMap::new();
    if let Some(map) = g.small.get("tablespace_map") {
        let text = String::from_utf8_lossy(map);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (oid, location) = line
                .split_once(' ')
                .and_then(|(o, l)| Some((o.parse::<u32>().ok()?, l)))
                .ok_or_else(|| refused(format!("tablespace_map: bad line {line:?}")))?;
            tablespace_map.insert(oid, location.to_string());
        }
    }
    for archive in &dir.archives {
        if let Role::Tablespace(oid) = archive.role {
            if !tablespace_map.contains_key(&oid) {
                return Err(refused(format!(
                    "{} is a tablespace archive, but tablespace_map does not list tablespace {oid}",
                    archive.file
                )));
            }
        }
    }
    for oid in tablespace_map.keys() {
        if !dir
            .archives
            .iter()
            .any(|a| a.role == Role::Tablespace(*oid))
        {
            return Err(refused(format!(
                "tablespace_map lists tablespace {oid}, but there is no {oid}.tar"
            )));
        }
    }
    Ok(Survey {
        label,
        system_id,
        pg_major,
        tablespace_map,
        received: g.received,
        total: g.total,
        segments: g.segments,
        backup_end: g.end.and_then(|e| e.found),
    })
}

/// Everything settled before anything is stored.
struct Plan {
    survey: Survey,
    manifest: Vec<u8>,
    stop_lsn: Lsn,
    geometry: WalGeometry,
    /// The segments the backup needs, on its timeline.
    first: SegmentNo,
    last: SegmentNo,
}

/// Checks the survey against the instance and the manifest, and that the
/// WAL the backup needs is all there.
fn plan(dir: &ImportDir, survey: Survey, instance: &Instance) -> EngineResult<Plan> {
    if let Some(known) = instance.system_identifier {
        if known != survey.system_id {
            return Err(refused(format!(
                "this is a backup of the cluster with system identifier {}, but instance {} is the cluster {known}: refusing to mix them",
                survey.system_id, instance.id
            )));
        }
    }
    if let Some(version) = instance.pg_version_num {
        if version / 10000 != survey.pg_major {
            return Err(refused(format!(
                "this is a backup of PostgreSQL {}, but instance {} runs PostgreSQL {}",
                survey.pg_major,
                instance.id,
                version / 10000
            )));
        }
    }
    if let Some((start, _)) = dir.known_range {
        if start != survey.label.start_lsn {
            return Err(refused(format!(
                "the backup is recorded as starting at {start}, but its backup_label says {}: they are not of the same backup",
                survey.label.start_lsn
            )));
        }
    }
    let (manifest, stop_lsn) = match (dir.manifest.clone(), dir.known_range) {
        (None, Some((_, stop))) => (written_manifest(&survey, stop), stop),
        (Some(manifest), _) => {
            check_server_manifest(&manifest, &survey.received)
                .map_err(|e| refused(e.to_string()))?;
            let (stop, _) = manifest_wal_end(&manifest, &survey.label)?;
            (manifest, stop)
        }
        (None, None) => {
            let stop = survey.backup_end.ok_or_else(|| {
                refused(
                    "no backup_manifest, and no backup-end record for this backup in its WAL: nothing records where it ends (a backup of a standby writes none; take it with a manifest, pg_basebackup's default)",
                )
            })?;
            (written_manifest(&survey, stop), stop)
        }
    };
    let Some(seg_size) = survey.segments.first().map(|s| s.size) else {
        return Err(refused(
            "the backup holds no WAL: take it with -X fetch or -X stream (the default), so that it can be restored on its own",
        ));
    };
    let geometry = WalGeometry::new(seg_size).map_err(|e| {
        refused(format!(
            "WAL segment {}: {seg_size} bytes is no WAL segment size: {e}",
            survey.segments[0].name
        ))
    })?;
    for s in &survey.segments {
        // Names parse the same whatever the size; the segment number does not.
        let (tli, seg) = geometry
            .parse_segment_file_name(&s.name)
            .unwrap_or((s.tli, s.seg));
        check_segment_header(
            &s.name,
            &s.header,
            survey.system_id,
            geometry.segment_start(seg),
            s.size,
        )?;
        debug_assert_eq!(tli, s.tli);
    }
    let tli = survey.label.timeline;
    let first = geometry.segment_of(survey.label.start_lsn);
    let mut last =
        geometry.segment_of(Lsn(stop_lsn.0.saturating_sub(1)).max(survey.label.start_lsn));
    for seg in first.0..=last.0 {
        let have = survey
            .segments
            .iter()
            .any(|s| geometry.parse_segment_file_name(&s.name) == Some((tli, SegmentNo(seg))));
        if !have {
            return Err(refused(format!(
                "the backup needs WAL segment {} (from {} to {stop_lsn}), which is not in it",
                geometry.segment_file_name(tli, SegmentNo(seg)),
                survey.label.start_lsn
            )));
        }
    }
    while dir.wal_after
        && survey.segments.iter().any(|s| {
            geometry.parse_segment_file_name(&s.name) == Some((tli, SegmentNo(last.0 + 1)))
        })
    {
        last = SegmentNo(last.0 + 1);
    }
    Ok(Plan {
        survey,
        manifest,
        stop_lsn,
        geometry,
        first,
        last,
    })
}

/// A `backup_manifest` in PostgreSQL's layout for a backup that came
/// without one: every file the first pass read, with its size and CRC-32C,
/// and the WAL range from `backup_label` to the backup-end record.
fn written_manifest(survey: &Survey, stop: Lsn) -> Vec<u8> {
    let mut files: Vec<FileEntry> = survey
        .received
        .iter()
        .map(|(path, (size, crc))| FileEntry {
            tablespace: None,
            path: path.clone(),
            kind: FileKind::File,
            mode: 0o600,
            size: *size,
            mtime: 0,
            link_target: None,
            crc32c: Some(*crc),
            blocks: Vec::new(),
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    crate::snapshot_upload::postgres_manifest(
        survey.pg_major * 10000,
        survey.system_id,
        &files,
        survey.label.start_time.unwrap_or_else(Utc::now),
        survey.label.timeline,
        survey.label.start_lsn,
        stop,
    )
}

/// WAL the second pass read, for the task storing it.
enum WalItem {
    Segment(TimelineId, SegmentNo, Vec<u8>),
    History(TimelineId, Vec<u8>),
    Failed(String),
}

/// The second pass's events, from the thread reading the archives.
struct Replayed(mpsc::Receiver<Result<BaseBackupEvent, ReplicationError>>);

impl BackupEvents for Replayed {
    #[allow(clippy::manual_async_fn)] // the trait's signature requires `Send`
    fn next_event(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<BaseBackupEvent>, ReplicationError>> + Send
    {
        async move { self.0.recv().await.transpose() }
    }

    fn explain(&self, _instance: &Instance, e: ReplicationError) -> EngineError {
        match e {
            ReplicationError::Protocol(msg) => EngineError::Failed(msg),
            other => EngineError::Failed(other.to_string()),
        }
    }
}

/// Aborts a task when dropped: the WAL task of an import that failed
/// before waiting for it stores nothing more.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the reader thread needs of the plan.
struct ReplayPlan {
    origin: Origin,
    archives: Vec<Archive>,
    tablespace_map: HashMap<u32, String>,
    manifest: Vec<u8>,
    stop_lsn: Lsn,
    timeline: TimelineId,
    system_id: u64,
    geometry: WalGeometry,
}

/// The WAL member being collected by the reader thread.
struct CollectingWal {
    member: WalMember,
    name: String,
    size: u64,
    data: Vec<u8>,
}

/// The reader thread of the second pass: every archive again, as the
/// events of a BASE_BACKUP stream (WAL members go to `wal_tx` instead).
fn replay(
    plan: ReplayPlan,
    events_tx: mpsc::Sender<Result<BaseBackupEvent, ReplicationError>>,
    wal_tx: mpsc::Sender<WalItem>,
    read: Arc<AtomicU64>,
) {
    let mut events_tx = Some(events_tx);
    let outcome = replay_archives(&plan, &mut events_tx, &wal_tx, &read);
    if let Err(e) = outcome {
        let msg = e.to_string();
        match events_tx {
            Some(tx) => {
                let _ = tx.blocking_send(Err(ReplicationError::Protocol(msg)));
            }
            None => {
                let _ = wal_tx.blocking_send(WalItem::Failed(msg));
            }
        }
    }
}

fn replay_archives(
    plan: &ReplayPlan,
    events_tx: &mut Option<mpsc::Sender<Result<BaseBackupEvent, ReplicationError>>>,
    wal_tx: &mpsc::Sender<WalItem>,
    read: &Arc<AtomicU64>,
) -> EngineResult<()> {
    let stopped = || EngineError::Failed("the import stopped".into());
    for archive in &plan.archives {
        let tablespace = match archive.role {
            Role::Tablespace(oid) => Some(oid),
            _ => None,
        };
        let send = |tx: &Option<mpsc::Sender<_>>, event| -> EngineResult<()> {
            tx.as_ref()
                .ok_or_else(stopped)?
                .blocking_send(Ok(event))
                .map_err(|_| stopped())
        };
        if archive.role != Role::Wal {
            send(
                events_tx,
                BaseBackupEvent::ArchiveStart {
                    name: archive.file.clone(),
                    tablespace_oid: tablespace,
                    location: tablespace.and_then(|oid| plan.tablespace_map.get(&oid).cloned()),
                },
            )?;
        }
        let mut wal: Option<CollectingWal> = None;
        let mut skipping = false;
        walk(&plan.origin, archive, read, |event| match event {
            BaseBackupEvent::Entry(entry) => {
                skipping = false;
                match wal_kind(archive.role, &entry, &plan.geometry)? {
                    Some(member @ (WalMember::Segment(..) | WalMember::History(_))) => {
                        let collecting = CollectingWal {
                            member,
                            name: wal_file_name(archive.role, &entry.path).to_string(),
                            size: entry.size,
                            data: Vec::with_capacity(entry.size as usize),
                        };
                        if entry.size == 0 {
                            return send_wal(plan, wal_tx, collecting);
                        }
                        wal = Some(collecting);
                        Ok(())
                    }
                    Some(WalMember::Other) => {
                        skipping = true;
                        Ok(())
                    }
                    None => send(events_tx, BaseBackupEvent::Entry(entry)),
                }
            }
            BaseBackupEvent::Data(data) => {
                if skipping {
                    return Ok(());
                }
                let Some(w) = wal.as_mut() else {
                    return send(events_tx, BaseBackupEvent::Data(data));
                };
                w.data.extend_from_slice(&data);
                if w.data.len() as u64 >= w.size {
                    if let Some(w) = wal.take() {
                        send_wal(plan, wal_tx, w)?;
                    }
                }
                Ok(())
            }
            other => send(events_tx, other),
        })?;
        if archive.role != Role::Wal {
            send(events_tx, BaseBackupEvent::ArchiveEnd)?;
        }
        if archive.role == Role::Base {
            send(
                events_tx,
                BaseBackupEvent::Manifest(Bytes::from(plan.manifest.clone())),
            )?;
            send(
                events_tx,
                BaseBackupEvent::Finished {
                    end_lsn: plan.stop_lsn,
                    end_timeline: plan.timeline,
                },
            )?;
            // The stream is over; only WAL follows.
            *events_tx = None;
        }
    }
    Ok(())
}

/// Hands a complete WAL member to the WAL task, its header checked again
/// (the file may have changed since the first pass).
fn send_wal(
    plan: &ReplayPlan,
    wal_tx: &mpsc::Sender<WalItem>,
    w: CollectingWal,
) -> EngineResult<()> {
    let item = match w.member {
        WalMember::Segment(tli, seg) => {
            check_segment_header(
                &w.name,
                &w.data,
                plan.system_id,
                plan.geometry.segment_start(seg),
                w.data.len() as u64,
            )
            .map_err(|e| EngineError::Failed(e.to_string()))?;
            WalItem::Segment(tli, seg, w.data)
        }
        WalMember::History(tli) => WalItem::History(tli, w.data),
        WalMember::Other => return Ok(()),
    };
    wal_tx
        .blocking_send(item)
        .map_err(|_| EngineError::Failed("the import stopped".into()))
}

/// Stores the segments from `first` to `last` on `timeline` (others are
/// left out) and the history files as the reader thread sends them;
/// returns the end of the complete segments stored.
async fn store_wal(
    engine: Engine,
    instance_id: strata_catalog::InstanceId,
    geometry: WalGeometry,
    timeline: TimelineId,
    (first, last): (SegmentNo, SegmentNo),
    mut rx: mpsc::Receiver<WalItem>,
) -> EngineResult<Lsn> {
    let start = geometry.segment_start(first);
    let events = engine
        .settings
        .recovery_events
        .then_some(crate::events::EventOptions {
            names: None,
            min_rows: engine.settings.event_min_rows,
        });
    let uploader = WalUploader::start(engine.clone(), &instance_id, start);
    let mut archiver =
        SegmentArchiver::new(geometry, timeline, start, uploader.queue()).with_events(events);
    let mut fed = Ok(());
    while let Some(item) = rx.recv().await {
        let step = match item {
            WalItem::Segment(tli, seg, data) => {
                if tli != timeline || seg < first || seg > last {
                    continue;
                }
                archiver.push(geometry.segment_start(seg), &data).await
            }
            WalItem::History(tli, data) => {
                let (repo, id) = (engine.repo.clone(), instance_id.clone());
                blocking(move || Ok(repo.put_history(&id, tli, &data)?)).await
            }
            WalItem::Failed(msg) => Err(EngineError::Failed(msg)),
        };
        if let Err(e) = step {
            fed = Err(e);
            break;
        }
    }
    let end = archiver.complete_end();
    drop(archiver);
    let (_, stored) = uploader.finish().await;
    stored.and(fed).map(|()| end)
}

/// Runs `work` on the blocking pool, reporting `read` of `total` bytes
/// under `phase` every half second meanwhile.
async fn with_progress<T: Send + 'static>(
    work: impl FnOnce() -> EngineResult<T> + Send + 'static,
    read: &AtomicU64,
    total: u64,
    phase: &str,
    progress: &dyn Progress,
) -> EngineResult<T> {
    let work = blocking(work);
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            outcome = &mut work => {
                progress.update(phase, read.load(Ordering::Relaxed), Some(total));
                return outcome;
            }
            _ = ticker.tick() => progress.update(phase, read.load(Ordering::Relaxed), Some(total)),
        }
    }
}

/// An import whose first pass found nothing to refuse; nothing is
/// recorded yet.
pub(crate) struct CheckedImport {
    import: ImportDir,
    plan: Plan,
}

impl CheckedImport {
    /// Where the backup starts and ends.
    pub(crate) fn range(&self) -> (Lsn, Lsn) {
        (self.plan.survey.label.start_lsn, self.plan.stop_lsn)
    }
}

/// An import whose directory passed every check and whose job and backup
/// set are recorded (job `NoStart`, set `Running`); nothing is stored yet.
pub struct PendingImport {
    job: Job,
    set: BackupSet,
    instance: Instance,
    import: ImportDir,
    plan: Plan,
}

impl PendingImport {
    /// The import's job.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// The backup set it is storing.
    pub fn set(&self) -> &BackupSet {
        &self.set
    }
}

impl Engine {
    /// Imports the output directory of `pg_basebackup -Ft` as a backup set
    /// of `instance_id`: [`Engine::prepare_import`], then
    /// [`Engine::run_import`].
    pub async fn import_basebackup(
        &self,
        instance_id: &str,
        dir: &Path,
        progress: &dyn Progress,
    ) -> EngineResult<BackupSet> {
        let pending = self.prepare_import(instance_id, dir, progress).await?;
        self.run_import(pending, progress).await
    }

    /// The first pass (see the module documentation) and, when it finds
    /// nothing to refuse, the job and the running backup set. A refusal
    /// records nothing, but for a backup of the instance that started
    /// between the check and the set: the job is then recorded as failed.
    pub async fn prepare_import(
        &self,
        instance_id: &str,
        dir: &Path,
        progress: &dyn Progress,
    ) -> EngineResult<PendingImport> {
        let instance = self.catalog.get_instance(instance_id)?;
        let import = ImportDir::scan(dir)?;
        let checked = self.check_import(&instance, import, progress).await?;
        self.record_import(instance_id, checked)
    }

    /// The first pass over `import` (see the module documentation) and the
    /// checks of what it read against `instance`. Records nothing.
    pub(crate) async fn check_import(
        &self,
        instance: &Instance,
        import: ImportDir,
        progress: &dyn Progress,
    ) -> EngineResult<CheckedImport> {
        let total = import.total_size();
        progress.message(&format!(
            "import into {}: checking {} archives ({} MiB) in {}",
            instance.id,
            import.archives.len(),
            total.div_ceil(1 << 20),
            import.origin.describe()
        ));
        let read = Arc::new(AtomicU64::new(0));
        let (survey, import) = {
            let counter = read.clone();
            with_progress(
                move || survey(&import, &counter).map(|s| (s, import)),
                &read,
                total,
                "check",
                progress,
            )
            .await?
        };
        let plan = plan(&import, survey, instance)?;
        Ok(CheckedImport { import, plan })
    }

    /// The job and the running backup set of a checked import.
    pub(crate) fn record_import(
        &self,
        instance_id: &str,
        checked: CheckedImport,
    ) -> EngineResult<PendingImport> {
        let instance = self.catalog.get_instance(instance_id)?;
        self.check_backup(instance_id, &BackupOptions::default())?;
        self.record_checked(instance, checked, None)
    }

    /// Records the job and the running set of `checked` for `instance`,
    /// the set annotated with `keep` (until when, and a note).
    fn record_checked(
        &self,
        instance: Instance,
        checked: CheckedImport,
        keep: Option<(Option<KeepUntil>, Option<String>)>,
    ) -> EngineResult<PendingImport> {
        let CheckedImport { import, plan } = checked;
        let job = self
            .catalog
            .create_job(JobKind::Backup, Some(&instance.id))?;
        let pending = self.record_backup_set(job, instance, &BackupOptions::default())?;
        let (job, mut set, instance) = (pending.job, pending.set, pending.instance);
        if let Some(at) = plan.survey.label.start_time {
            set.started_at = at;
        }
        if let Some((until, note)) = keep {
            (set.keep_until, set.keep_note) = (until, note);
            self.catalog.update_backup(&set)?;
        }
        Ok(PendingImport {
            job,
            set,
            instance,
            import,
            plan,
        })
    }

    /// A user backup (RDS's `ImportUserBackupFile`): the first pass over
    /// `dir`, then the job and the running set of `owner_id`, an id of
    /// [`Instance::owns_user_backup`] never registered. The owner is
    /// recorded in the repository only, with what the backup says of its
    /// cluster, so the set restores as a detached instance's does.
    /// `engine_major`, when given, must be the backup's PostgreSQL major
    /// version. A refusal records nothing.
    pub async fn prepare_user_import(
        &self,
        owner_id: &str,
        dir: &Path,
        engine_major: Option<u32>,
        keep: (Option<KeepUntil>, Option<String>),
        progress: &dyn Progress,
    ) -> EngineResult<PendingImport> {
        if !Instance::owns_user_backup(owner_id) || !Instance::valid_id(owner_id) {
            return Err(refused(format!(
                "{owner_id:?} is not the id of a user backup's owner"
            )));
        }
        let mut owner = Instance::new(owner_id, "", 0, "", strata_catalog::SslMode::Disable);
        let import = ImportDir::scan(dir)?;
        let checked = self.check_import(&owner, import, progress).await?;
        let survey = &checked.plan.survey;
        if let Some(major) = engine_major.filter(|m| *m != survey.pg_major) {
            return Err(refused(format!(
                "EngineVersion is {major}, but this is a backup of PostgreSQL {} (its PG_VERSION)",
                survey.pg_major
            )));
        }
        owner.system_identifier = Some(survey.system_id);
        owner.pg_version_num = Some(survey.pg_major * 10000);
        owner.wal_segment_size = Some(checked.plan.geometry.segment_size());
        self.repo
            .put_instance(&crate::entities::instance_record(&owner))?;
        self.record_checked(owner, checked, Some(keep))
    }

    /// The second pass of a prepared import; its outcome is recorded on
    /// the set and the job, as a backup's. A failure commits nothing.
    pub async fn run_import(
        &self,
        pending: PendingImport,
        progress: &dyn Progress,
    ) -> EngineResult<BackupSet> {
        let PendingImport {
            mut job,
            mut set,
            instance,
            import,
            plan,
        } = pending;
        let ended_at = import.ended_at;
        progress.message(&format!(
            "import into {}: backup {} of the cluster {}, WAL from {} to {}",
            instance.id, set.id, plan.survey.system_id, plan.survey.label.start_lsn, plan.stop_lsn
        ));
        job.state = strata_catalog::JobState::Preparing;
        self.record_job("recording an import's start", &job).await?;
        let (outcome, hold) = match self.hold_gc().await {
            Ok(hold) => {
                let run = BackupRun {
                    instance: &instance,
                    set: &mut set,
                    job: &mut job,
                    progress,
                };
                (self.store_import(run, import, plan).await, Some(hold))
            }
            Err(e) => (Err(e), None),
        };
        let engine = self.clone();
        blocking(move || {
            drop(hold);
            let mut set = engine.record_backup_outcome(set, job, outcome)?;
            // A backup taken earlier ended when its source says, not now:
            // restores to a time pick it by that.
            if let Some(ended) = ended_at {
                set.finished_at = Some(ended);
                crate::retry_busy("recording an imported backup's end", || {
                    engine.catalog.update_backup(&set)
                })?;
            }
            Ok(set)
        })
        .await
    }

    /// The second pass: the archives replayed into the backup's receiver,
    /// the WAL into the repository.
    async fn store_import(
        &self,
        run: BackupRun<'_>,
        import: ImportDir,
        plan: Plan,
    ) -> EngineResult<()> {
        let survey = plan.survey;
        let timeline = survey.label.timeline;
        let start = StreamStart {
            system_id: survey.system_id,
            pg_version: survey.pg_major * 10000,
            wal_segment_size: plan.geometry.segment_size(),
            start_lsn: survey.label.start_lsn,
            start_timeline: timeline,
            start_time: survey.label.start_time.unwrap_or_else(Utc::now),
            total: Some(survey.total),
            stop_time: import.ended_at,
        };
        run.set.pg_version_num = Some(start.pg_version);
        let (events_tx, events_rx) = mpsc::channel(64);
        let (wal_tx, wal_rx) = mpsc::channel(2);
        let replay_plan = ReplayPlan {
            origin: import.origin,
            archives: import.archives,
            tablespace_map: survey.tablespace_map,
            manifest: plan.manifest,
            stop_lsn: plan.stop_lsn,
            timeline,
            system_id: survey.system_id,
            geometry: plan.geometry,
        };
        let read = Arc::new(AtomicU64::new(0));
        let reader = std::thread::spawn(move || replay(replay_plan, events_tx, wal_tx, read));
        let wal = AbortOnDrop(tokio::spawn(store_wal(
            self.clone(),
            run.instance.id.clone(),
            plan.geometry,
            timeline,
            (plan.first, plan.last),
            wal_rx,
        )));
        let mut events = Replayed(events_rx);
        let outcome = self
            .consume_backup(run, &start, None, &mut events, |stop| async move {
                let end = match (&mut { wal }.0).await {
                    Ok(stored) => stored?,
                    Err(e) => return Err(EngineError::Failed(format!("the WAL task failed: {e}"))),
                };
                if end < stop {
                    return Err(EngineError::Failed(format!(
                        "the WAL stored ends at {end}, before the backup's end {stop}"
                    )));
                }
                // No server to ask: an imported set lists no databases.
                Ok(None)
            })
            .await;
        // The reader stops at its next hand-over once its queues are gone.
        drop(events);
        let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn archive_names_say_their_role_and_compression() {
        assert_eq!(classify("base.tar"), Some((Role::Base, Compression::None)));
        assert_eq!(
            classify("base.tar.gz"),
            Some((Role::Base, Compression::Gzip))
        );
        assert_eq!(
            classify("pg_wal.tar.zst"),
            Some((Role::Wal, Compression::Zstd))
        );
        assert_eq!(
            classify("16384.tar"),
            Some((Role::Tablespace(16384), Compression::None))
        );
        for other in [
            "base.tar.lz4",
            "01.tar",
            ".tar",
            "../base.tar",
            "x.tar",
            "99999999999.tar",
        ] {
            assert_eq!(classify(other), None, "{other}");
        }
    }

    const LABEL: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
        CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
        START TIME: 2026-12-06 19:40:12 UTC\nLABEL: pg_basebackup base backup\n\
        START TIMELINE: 1\n";

    #[test]
    fn backup_label_gives_the_start() {
        let label = parse_backup_label(LABEL.as_bytes()).unwrap();
        assert_eq!(label.start_lsn, Lsn(0x0200_0028));
        assert_eq!(label.timeline, TimelineId(1));
        assert_eq!(
            label.start_time.unwrap().to_rfc3339(),
            "2026-12-06T19:40:12+00:00"
        );
        let incremental = format!("{LABEL}INCREMENTAL FROM LSN: 0/1000028\n");
        let err = parse_backup_label(incremental.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("pg_combinebackup"), "{err}");
        let err = parse_backup_label(b"LABEL: x\n").unwrap_err();
        assert!(err.to_string().contains("START WAL LOCATION"), "{err}");
    }

    #[test]
    fn the_manifest_must_describe_the_same_backup() {
        let label = parse_backup_label(LABEL.as_bytes()).unwrap();
        let manifest = |start: &str| {
            format!(
                "{{\"Files\": [], \"WAL-Ranges\": [{{ \"Timeline\": 1, \"Start-LSN\": \"{start}\", \"End-LSN\": \"0/2000100\" }}]}}"
            )
        };
        assert_eq!(
            manifest_wal_end(manifest("0/2000028").as_bytes(), &label).unwrap(),
            (Lsn(0x0200_0100), TimelineId(1))
        );
        let err = manifest_wal_end(manifest("0/5000028").as_bytes(), &label).unwrap_err();
        assert!(err.to_string().contains("not of the same backup"), "{err}");
    }

    fn long_header(sysid: u64, addr: u64, seg_size: u32) -> Vec<u8> {
        let mut h = vec![0u8; LONG_HEADER];
        h[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        h[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&addr.to_le_bytes());
        h[24..32].copy_from_slice(&sysid.to_le_bytes());
        h[32..36].copy_from_slice(&seg_size.to_le_bytes());
        h[36..40].copy_from_slice(&8192u32.to_le_bytes());
        h
    }

    #[test]
    fn wal_of_another_cluster_or_place_is_refused() {
        let size = 16u64 << 20;
        let ok = long_header(7, size * 2, size as u32);
        assert_eq!(
            check_segment_header("s", &ok, 7, Lsn(size * 2), size).unwrap(),
            size
        );
        let err = check_segment_header("s", &ok, 8, Lsn(size * 2), size).unwrap_err();
        assert!(err.to_string().contains("system identifier 7"), "{err}");
        let err = check_segment_header("s", &ok, 7, Lsn(size * 3), size).unwrap_err();
        assert!(err.to_string().contains("first page is at"), "{err}");
        let err = check_segment_header("s", &ok[..20], 7, Lsn(size * 2), size).unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
    }

    #[test]
    fn the_wal_archive_holds_only_wal_files() {
        let g = WalGeometry::new(16 << 20).unwrap();
        let file = TarEntryKind::File;
        assert!(matches!(
            wal_member("000000010000000000000002", &file, &g),
            Ok(WalMember::Segment(TimelineId(1), SegmentNo(2)))
        ));
        assert!(matches!(
            wal_member("00000002.history", &file, &g),
            Ok(WalMember::History(TimelineId(2)))
        ));
        assert!(matches!(
            wal_member("archive_status/000000010000000000000002.done", &file, &g),
            Ok(WalMember::Other)
        ));
        for bad in [
            "../000000010000000000000002",
            "/etc/passwd",
            "postgresql.conf",
        ] {
            assert!(wal_member(bad, &file, &g).is_err(), "{bad}");
        }
        let link = TarEntryKind::Symlink {
            target: "/tmp".into(),
        };
        assert!(wal_member("000000010000000000000002", &link, &g).is_err());
    }

    #[test]
    fn only_wal_files_in_pg_wal_leave_the_data_directory() {
        let g = WalGeometry::new(16 << 20).unwrap();
        let entry = |path: &str, kind: TarEntryKind| TarEntry {
            path: path.into(),
            kind,
            mode: 0o600,
            size: 0,
            mtime: 0,
        };
        let file = TarEntryKind::File;
        let dir = TarEntryKind::Directory;
        let kind = |role, e: &TarEntry| wal_kind(role, e, &g).unwrap();
        assert!(matches!(
            kind(
                Role::Base,
                &entry("pg_wal/000000010000000000000003", file.clone())
            ),
            Some(WalMember::Segment(TimelineId(1), SegmentNo(3)))
        ));
        for ordinary in ["pg_wal/archive_status", "./pg_wal/summaries", "pg_wal"] {
            assert!(
                kind(Role::Base, &entry(ordinary, dir.clone())).is_none(),
                "{ordinary}"
            );
        }
        assert!(kind(Role::Base, &entry("pg_wal/x.done", file.clone())).is_none());
        assert!(kind(
            Role::Tablespace(1),
            &entry("000000010000000000000003", file.clone())
        )
        .is_none());
        assert!(matches!(
            kind(
                Role::Wal,
                &entry("000000010000000000000003.partial", file.clone())
            ),
            Some(WalMember::Other)
        ));
        assert!(wal_kind(Role::Wal, &entry("base/1/1259", file.clone()), &g).is_err());

        // Sizes a header claims for WAL members are bounded before anything is gathered.
        let sized = |path: &str, size: u64| TarEntry {
            size,
            ..entry(path, file.clone())
        };
        let history = "00000002.history";
        assert!(wal_kind(Role::Wal, &sized(history, 100), &g).is_ok());
        let err = wal_kind(Role::Wal, &sized(history, 1 << 40), &g)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("at most 16777216"), "{err}");
        let segment = "pg_wal/000000010000000000000003";
        assert!(wal_kind(Role::Base, &sized(segment, 1 << 30), &g).is_ok());
        let err = wal_kind(Role::Base, &sized(segment, (1 << 30) + 1), &g)
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("a WAL segment is at most"),
            "{err}"
        );
    }

    /// A gzip archive cut short, or one whose tar ends without its
    /// end-of-archive blocks, is refused as truncated.
    #[test]
    fn truncated_compressed_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_path("PG_VERSION").unwrap();
        header.set_size(3);
        header.set_mode(0o600);
        header.set_cksum();
        let mut whole = header.as_bytes().to_vec();
        whole.extend_from_slice(b"15\n");
        whole.resize(1024, 0);
        let no_end = whole.clone();
        whole.resize(2048, 0);
        let gz = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let compressed = gz(&whole);
        let read = Arc::new(AtomicU64::new(0));
        let archive = |file: &str| Archive {
            file: file.into(),
            role: Role::Base,
            compression: Compression::Gzip,
            size: 0,
        };
        for (name, bytes, ok) in [
            ("whole.tar.gz", compressed.clone(), true),
            (
                "cut.tar.gz",
                compressed[..compressed.len() - 12].to_vec(),
                false,
            ),
            ("no_end.tar.gz", gz(&no_end), false),
        ] {
            std::fs::write(dir.path().join(name), bytes).unwrap();
            let mut members = 0;
            let origin = Origin::Dir(dir.path().to_path_buf());
            let outcome = walk(&origin, &archive(name), &read, |e| {
                members += matches!(e, BaseBackupEvent::Entry(_)) as usize;
                Ok(())
            });
            match (ok, outcome) {
                (true, Ok(())) => assert_eq!(members, 1),
                (false, Err(e)) => assert!(
                    e.to_string().contains(name) && !e.to_string().is_empty(),
                    "{name}: {e}"
                ),
                (_, outcome) => panic!("{name}: {outcome:?}"),
            }
        }
        // A link in the directory is not followed.
        std::os::unix::fs::symlink(
            dir.path().join("whole.tar.gz"),
            dir.path().join("base.tar.gz"),
        )
        .unwrap();
        let origin = Origin::Dir(dir.path().to_path_buf());
        let err = walk(&origin, &archive("base.tar.gz"), &read, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }
}
