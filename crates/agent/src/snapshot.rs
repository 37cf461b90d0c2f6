//! Snapshots of a PostgreSQL data directory by reflink, and clones of those snapshots.
//!
//! A snapshot is `<snapshot-dir>/<name>/`: every file of the data directory cloned by
//! `FICLONE` (seconds whatever the size), with its mode, and each tablespace reached through a
//! `pg_tblspc/<oid>` symlink stored as the directory `pg_tblspc/<oid>/`. What `pg_basebackup`
//! leaves out is left out (src/backend/backup/basebackup.c: `excludeDirContents`,
//! `excludeFiles`, `pgsql_tmp*`, temporary relations, unlogged relations' main forks, the
//! contents of `pg_wal`), so a snapshot holds what a base backup holds. Files may change or
//! vanish during the walk: the caller holds the server in backup mode and the WAL from backup
//! start to stop makes the copy consistent, as for any online backup. The caller then writes
//! the `backup_label`/`tablespace_map` that `pg_backup_stop()` returned ([`Labels`]).
//!
//! A snapshot is built under `.partial-<name>` and renamed when complete, so a killed agent
//! never leaves something that lists as a snapshot; leftovers are removed at start.
//! A clone is `<clone-dir>/<name>/`: the snapshot cloned again, mode 0700, owned by the data
//! directory's owner, ready for a server to start on it.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::cow::{self, ChangedRanges, CowError, FsInfo};
use crate::names::{CloneName, InvalidName, RelPath, SnapshotName};

/// Why a snapshot operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A name or path parameter broke the rules.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The snapshot, clone or file does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The snapshot or clone already exists (or is being made).
    #[error("{0}")]
    Exists(String),
    /// Free space is under the configured floor.
    #[error("{0}")]
    LowSpace(String),
    /// A parameter other than a name broke its rules (a port, a recovery target, a WAL file's
    /// size or range).
    #[error("{0}")]
    InvalidParameter(String),
    /// The request cannot be served as asked (labels written twice, a clone dir not set, …).
    #[error("{0}")]
    Refused(String),
    /// A copy-on-write operation failed.
    #[error(transparent)]
    Cow(#[from] CowError),
    /// Another I/O failure.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The least free space a snapshot leaves: a byte count or a share of the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreeFloor {
    /// At least this many bytes free.
    Bytes(u64),
    /// At least this percentage (0..=100) of the file system free.
    Percent(u8),
}

impl FreeFloor {
    /// Parses `N` (bytes) or `N%`.
    pub fn parse(s: &str) -> Result<FreeFloor, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<u8>() {
                Ok(v) if v <= 100 => Ok(FreeFloor::Percent(v)),
                _ => Err(format!(
                    "free-space floor {s:?}: a percentage is 0% to 100%"
                )),
            }
        } else {
            s.parse::<u64>().map(FreeFloor::Bytes).map_err(|_| {
                format!("free-space floor {s:?}: give a byte count or a percentage (e.g. 10%)")
            })
        }
    }

    /// The floor in bytes on a file system of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            FreeFloor::Bytes(b) => b,
            FreeFloor::Percent(p) => ((total as u128 * p as u128) / 100) as u64,
        }
    }

    /// Why a snapshot in `dir` is refused with `free` of `total` bytes free, or `None` when
    /// the floor is kept. The agent checks before each snapshot; the server checks the same
    /// from the agent's facts before it puts PostgreSQL in backup mode.
    pub fn refusal(&self, dir: &Path, free: u64, total: u64) -> Option<String> {
        let need = self.bytes(total);
        if free >= need {
            return None;
        }
        let pct = if total == 0 {
            0
        } else {
            (free as u128 * 100 / total as u128) as u64
        };
        Some(format!(
            "snapshot refused: the file system of {} has {free} bytes free ({pct}% of {total} bytes), under the floor of {self} ({need} bytes)",
            dir.display()
        ))
    }
}

impl std::fmt::Display for FreeFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FreeFloor::Bytes(b) => write!(f, "{b} bytes"),
            FreeFloor::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What an entry of a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// One file or directory of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the snapshot root (`base/5/1259`, `pg_tblspc/16384/PG_15_…/5/16385`).
    pub path: RelPath,
    /// File or directory.
    pub kind: EntryKind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Permission bits (`0o600`, `0o700`, …).
    pub mode: u32,
    /// Inode and change time as the snapshot holds it now (none: not read, as in the answer
    /// to a snapshot's creation, or an agent older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
}

/// What the kernel changes whenever a file is written, truncated, chmod-ed, renamed or linked:
/// its change time (which no user but root can set back) and inode. A snapshot's stamps taken
/// when it is complete and again before it is used show whether the files were touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Inode number.
    pub inode: u64,
    /// Change time, seconds since the epoch.
    pub ctime_sec: i64,
    /// Change time, nanoseconds within the second.
    pub ctime_nsec: i64,
}

/// Every entry of a snapshot, parents before children.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The entries.
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Bytes in all files.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of regular files.
    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .count()
    }
}

/// A snapshot just taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreated {
    /// Its name.
    pub name: SnapshotName,
    /// What it holds.
    pub manifest: Manifest,
    /// Wall time of the reflink walk, milliseconds.
    pub elapsed_ms: u64,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: SnapshotName,
    /// When it was completed, Unix seconds.
    pub created_unix: u64,
    /// Regular files in it.
    pub files: u64,
    /// Bytes of its files (their logical size).
    pub bytes: u64,
    /// Whether the label files have been written.
    pub labelled: bool,
}

/// The two label files `pg_backup_stop()` returns, written into a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// Contents of `backup_label`.
    pub backup_label: String,
    /// Contents of `tablespace_map` (absent or empty: no file).
    #[serde(default)]
    pub tablespace_map: Option<String>,
}

/// Longest `backup_label` accepted.
pub const MAX_BACKUP_LABEL: usize = 64 * 1024;
/// Longest `tablespace_map` accepted.
pub const MAX_TABLESPACE_MAP: usize = 1024 * 1024;

/// One file's changes against the previous snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChanges {
    /// The file.
    pub path: RelPath,
    /// Its changed ranges.
    pub changes: ChangedRanges,
}

/// A clone just made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneCreated {
    /// Its name.
    pub name: CloneName,
    /// Its directory on the agent's host (a data directory).
    pub path: PathBuf,
    /// Regular files in it.
    pub files: u64,
    /// Bytes of its files.
    pub bytes: u64,
}

/// The directories an agent serves.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The PostgreSQL data directory (read only).
    pub data_dir: PathBuf,
    /// Where snapshots are made; on the data directory's file system.
    pub snapshot_dir: PathBuf,
    /// Where clones are made (none: clones refused); on the same file system.
    pub clone_dir: Option<PathBuf>,
}

/// Snapshots and clones of one data directory.
#[derive(Debug)]
pub struct SnapshotStore {
    pub(crate) layout: Layout,
    pub(crate) owner: (u32, u32),
    /// The cluster's WAL segment size, learnt from the live `pg_wal` when first needed.
    pub(crate) segment_size: std::sync::OnceLock<u64>,
}

/// Directories whose contents a base backup leaves out (the directory itself is kept), matched
/// by name at any depth as basebackup.c does. `pg_wal` is handled on its own.
const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files a base backup leaves out, matched by name at any depth (basebackup.c `excludeFiles`).
const EXCLUDE_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];

/// Prefixes of names left out at any depth: the relcache init file and temporary files.
const EXCLUDE_PREFIXES: &[&str] = &["pg_internal.init", "pgsql_tmp"];

const PARTIAL_PREFIX: &str = ".partial-";

impl SnapshotStore {
    /// Opens the layout: the data directory must exist; the snapshot and clone directories are
    /// created (mode 0700, owned like the data directory) if missing. Leftovers of snapshots
    /// or clones interrupted by a crash are removed.
    pub fn open(layout: Layout) -> Result<SnapshotStore, SnapshotError> {
        let data_meta = fs::metadata(&layout.data_dir)
            .map_err(io_err("open data directory", &layout.data_dir))?;
        if !data_meta.is_dir() {
            return Err(SnapshotError::Refused(format!(
                "data directory {} is not a directory",
                layout.data_dir.display()
            )));
        }
        let owner = (data_meta.uid(), data_meta.gid());
        let mut dirs = vec![&layout.snapshot_dir];
        dirs.extend(layout.clone_dir.as_ref());
        for dir in dirs {
            if !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_err("create directory", dir))?;
                let opened = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(dir)
                    .map_err(io_err("open directory", dir))?;
                chown_like(&opened, dir, owner)?;
            }
            remove_partials(dir)?;
        }
        Ok(SnapshotStore {
            layout,
            owner,
            segment_size: std::sync::OnceLock::new(),
        })
    }

    /// The directories served.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The data directory's file system: type and space from `statfs`, and whether files of
    /// the data directory can be cloned into the snapshot directory (tried on `PG_VERSION`).
    pub fn probe(&self) -> Result<FsInfo, SnapshotError> {
        let space = cow::fs_space(&self.layout.data_dir)?;
        let mut reflink = cow::probe(&self.layout.snapshot_dir)?.reflink;
        if reflink {
            let src = self.layout.data_dir.join("PG_VERSION");
            let tag: u64 = rand::random();
            let dst = self
                .layout
                .snapshot_dir
                .join(format!(".strata-cross-probe-{tag:016x}"));
            reflink = match cow::reflink(&src, &dst, 0o600) {
                Ok(_) => true,
                Err(e) if e.is_unsupported() => false,
                Err(e) => return Err(e.into()),
            };
            let _ = fs::remove_file(&dst);
        }
        Ok(FsInfo {
            fs_type: cow::fs_type_name(space.magic),
            reflink,
            free_bytes: space.free_bytes,
            total_bytes: space.total_bytes,
        })
    }

    fn snapshot_root(&self, name: &SnapshotName) -> PathBuf {
        self.layout.snapshot_dir.join(name.as_str())
    }

    pub(crate) fn existing_snapshot(&self, name: &SnapshotName) -> Result<PathBuf, SnapshotError> {
        let root = self.snapshot_root(name);
        match fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => Ok(root),
            Ok(_) => Err(SnapshotError::NotFound(format!("no snapshot {name}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SnapshotError::NotFound(format!("no snapshot {name}")))
            }
            Err(e) => Err(io_err("stat", &root)(e)),
        }
    }

    /// Refuses when the snapshot directory's file system has less free space than `floor`.
    pub fn check_free_space(&self, floor: FreeFloor) -> Result<(), SnapshotError> {
        let space = cow::fs_space(&self.layout.snapshot_dir)?;
        match floor.refusal(
            &self.layout.snapshot_dir,
            space.free_bytes,
            space.total_bytes,
        ) {
            Some(why) => Err(SnapshotError::LowSpace(why)),
            None => Ok(()),
        }
    }

    /// Takes snapshot `name` of the data directory (see the module documentation), refusing it
    /// when free space is under `floor`.
    pub fn create(
        &self,
        name: &SnapshotName,
        floor: FreeFloor,
    ) -> Result<SnapshotCreated, SnapshotError> {
        self.check_free_space(floor)?;
        let started = Instant::now();
        let root = self.snapshot_root(name);
        if fs::symlink_metadata(&root).is_ok() {
            return Err(SnapshotError::Exists(format!(
                "snapshot {name} already exists"
            )));
        }
        let partial = self
            .layout
            .snapshot_dir
            .join(format!("{PARTIAL_PREFIX}{name}"));
        make_dir(&partial, 0o700, self.owner).map_err(|e| match e {
            SnapshotError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => {
                SnapshotError::Exists(format!("snapshot {name} is being taken"))
            }
            other => other,
        })?;
        let result = self.fill_snapshot(&partial);
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&partial, &root) {
            let _ = fs::remove_dir_all(&partial);
            return Err(io_err("rename", &root)(e));
        }
        Ok(SnapshotCreated {
            name: name.clone(),
            manifest,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    fn fill_snapshot(&self, target: &Path) -> Result<Manifest, SnapshotError> {
        let mut walk = Walk {
            entries: Vec::new(),
            owner: self.owner,
            filter: Filter::Base,
        };
        walk.dir(&self.layout.data_dir, target, "")?;
        // Tablespaces: every pg_tblspc/<oid> symlink becomes the directory pg_tblspc/<oid>/.
        let tblspc = self.layout.data_dir.join("pg_tblspc");
        let list = match fs::read_dir(&tblspc) {
            Ok(list) => list
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err("read", &tblspc))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("read", &tblspc)(e)),
        };
        for entry in list {
            let oid = entry.file_name();
            let Some(oid) = oid
                .to_str()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let link = entry.path();
            let is_link = fs::symlink_metadata(&link)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            if !is_link {
                continue;
            }
            let location = match fs::canonicalize(&link) {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("resolve tablespace", &link)(e)),
            };
            let location_meta = fs::metadata(&location).map_err(io_err("stat", &location))?;
            owner_may_read(&location_meta, self.owner, &location)?;
            let rel = format!("pg_tblspc/{oid}");
            let dst = target.join(&rel);
            let mode = location_meta.mode() & cow::KEPT_MODE_BITS;
            make_dir(&dst, mode, self.owner)?;
            walk.push(&rel, EntryKind::Dir, 0, mode)?;
            walk.filter = Filter::Tablespace;
            walk.dir(&location, &dst, &rel)?;
        }
        Ok(Manifest {
            entries: walk.entries,
        })
    }

    /// The snapshots, oldest name first.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let dir = &self.layout.snapshot_dir;
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
            let entry = entry.map_err(io_err("read", dir))?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|s| SnapshotName::new(s).ok())
            else {
                continue;
            };
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err("stat", &entry.path()))?;
            if !meta.is_dir() {
                continue;
            }
            let manifest = self.manifest(&name)?;
            let created_unix = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            out.push(SnapshotInfo {
                labelled: manifest
                    .entries
                    .iter()
                    .any(|e| e.path.as_str() == "backup_label"),
                files: manifest.file_count() as u64,
                bytes: manifest.total_bytes(),
                created_unix,
                name,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes snapshot `name` (only ever a directory directly under the snapshot directory).
    pub fn delete(&self, name: &SnapshotName) -> Result<(), SnapshotError> {
        let root = self.existing_snapshot(name)?;
        fs::remove_dir_all(&root).map_err(io_err("delete", &root))
    }

    /// Bytes only snapshot `name` holds (not shared with the data directory or other
    /// snapshots): roughly what deleting it frees.
    pub fn space_estimate(&self, name: &SnapshotName) -> Result<u64, SnapshotError> {
        let root = self.existing_snapshot(name)?;
        let mut total = 0u64;
        for e in self.manifest(name)?.entries {
            if e.kind == EntryKind::File {
                total = total.saturating_add(cow::exclusive_bytes(&root.join(e.path.as_str()))?);
            }
        }
        Ok(total)
    }

    /// Writes `backup_label` (and `tablespace_map` when given) into snapshot `name`, mode 0600,
    /// owned like the data directory. Refused when they are already there.
    pub fn write_labels(&self, name: &SnapshotName, labels: &Labels) -> Result<(), SnapshotError> {
        let root = self.existing_snapshot(name)?;
        if labels.backup_label.is_empty() || labels.backup_label.len() > MAX_BACKUP_LABEL {
            return Err(SnapshotError::Refused(format!(
                "backup_label must hold 1 to {MAX_BACKUP_LABEL} bytes"
            )));
        }
        let map = labels.tablespace_map.as_deref().filter(|m| !m.is_empty());
        if map.is_some_and(|m| m.len() > MAX_TABLESPACE_MAP) {
            return Err(SnapshotError::Refused(format!(
                "tablespace_map must hold at most {MAX_TABLESPACE_MAP} bytes"
            )));
        }
        let mut files = vec![("backup_label", labels.backup_label.as_str())];
        files.extend(map.map(|m| ("tablespace_map", m)));
        for (file, text) in files {
            let path = root.join(file);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&path)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        SnapshotError::Refused(format!("snapshot {name} already has its {file}"))
                    } else {
                        io_err("create", &path)(e)
                    }
                })?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_err("write", &path))?;
            chown_like(&f, &path, self.owner)?;
        }
        Ok(())
    }

    /// Every entry of snapshot `name`, read from the snapshot itself.
    pub fn manifest(&self, name: &SnapshotName) -> Result<Manifest, SnapshotError> {
        manifest_of(&self.existing_snapshot(name)?)
    }

    /// Opens file `path` of snapshot `name` for reading. The path is resolved beneath the
    /// snapshot by the kernel (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so
    /// neither `..` nor a symlink can lead outside it.
    pub fn open_file(&self, name: &SnapshotName, path: &RelPath) -> Result<File, SnapshotError> {
        let root = self.existing_snapshot(name)?;
        let dir = File::open(&root).map_err(io_err("open", &root))?;
        let file = open_beneath(&dir, path).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => {
                SnapshotError::NotFound(format!("snapshot {name} has no file {path}"))
            }
            Some(libc::ELOOP | libc::EXDEV) => SnapshotError::Refused(format!(
                "path {path:?} leads through a symlink or outside snapshot {name}"
            )),
            _ => io_err("open", &root.join(path.as_str()))(e),
        })?;
        let meta = file
            .metadata()
            .map_err(io_err("stat", &root.join(path.as_str())))?;
        if !meta.is_file() {
            return Err(SnapshotError::Refused(format!(
                "{path} in snapshot {name} is not a regular file"
            )));
        }
        Ok(file)
    }

    /// For every file of snapshot `name`, the ranges that differ from the same file in
    /// snapshot `since` (see [`cow::changed_ranges`]).
    pub fn changed_ranges(
        &self,
        name: &SnapshotName,
        since: &SnapshotName,
    ) -> Result<Vec<FileChanges>, SnapshotError> {
        let root = self.existing_snapshot(name)?;
        let old_root = self.existing_snapshot(since)?;
        let mut out = Vec::new();
        for e in self.manifest(name)?.entries {
            if e.kind != EntryKind::File {
                continue;
            }
            let changes =
                cow::changed_ranges(&root.join(e.path.as_str()), &old_root.join(e.path.as_str()))?;
            out.push(FileChanges {
                path: e.path,
                changes,
            });
        }
        Ok(out)
    }

    /// Clones snapshot `snapshot` into `<clone-dir>/<clone>/` (mode 0700, every entry owned
    /// like the data directory).
    pub fn clone_snapshot(
        &self,
        snapshot: &SnapshotName,
        clone: &CloneName,
    ) -> Result<CloneCreated, SnapshotError> {
        let clone_dir = self.clone_dir()?;
        let src_root = self.existing_snapshot(snapshot)?;
        let target = clone_dir.join(clone.as_str());
        if fs::symlink_metadata(&target).is_ok() {
            return Err(SnapshotError::Exists(format!(
                "clone {clone} already exists"
            )));
        }
        let partial = clone_dir.join(format!("{PARTIAL_PREFIX}{clone}"));
        make_dir(&partial, 0o700, self.owner).map_err(|e| match e {
            SnapshotError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => {
                SnapshotError::Exists(format!("clone {clone} is being made"))
            }
            other => other,
        })?;
        let filled = (|| {
            let (mut files, mut bytes) = (0u64, 0u64);
            for e in self.manifest(snapshot)?.entries {
                let src = src_root.join(e.path.as_str());
                let dst = partial.join(e.path.as_str());
                match e.kind {
                    EntryKind::Dir => make_dir(&dst, e.mode, self.owner)?,
                    EntryKind::File => {
                        // The snapshot belongs to the data directory's owner, who could swap
                        // a directory in it for a symlink: check what was actually opened.
                        let source = cow::open_regular(&src)?;
                        let opened = source.metadata().map_err(io_err("stat", &src))?;
                        owner_may_read(&opened, self.owner, &src)?;
                        bytes += cow::reflink_from(&source, &src, &dst, e.mode, Some(self.owner))?;
                        files += 1;
                    }
                }
            }
            Ok::<_, SnapshotError>((files, bytes))
        })();
        let (files, bytes) = match filled {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&partial, &target) {
            let _ = fs::remove_dir_all(&partial);
            return Err(io_err("rename", &target)(e));
        }
        Ok(CloneCreated {
            name: clone.clone(),
            path: target,
            files,
            bytes,
        })
    }

    /// Deletes clone `clone` (only ever a directory directly under the clone directory).
    pub fn delete_clone(&self, clone: &CloneName) -> Result<(), SnapshotError> {
        let target = self.clone_dir()?.join(clone.as_str());
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&target).map_err(io_err("delete", &target)),
            Ok(_) => Err(SnapshotError::NotFound(format!("no clone {clone}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(SnapshotError::NotFound(format!("no clone {clone}")))
            }
            Err(e) => Err(io_err("stat", &target)(e)),
        }
    }

    pub(crate) fn clone_dir(&self) -> Result<&Path, SnapshotError> {
        self.layout.clone_dir.as_deref().ok_or_else(|| {
            SnapshotError::Refused("this agent has no clone directory (--clone-dir)".into())
        })
    }
}

/// Every entry of the snapshot at `root` (its directory, or a `/proc/self/fd/<n>` path of a
/// handle to it) with inode and change time: what `GET manifest` serves and a
/// [`crate::Fingerprint`] is taken of.
pub fn manifest_of(root: &Path) -> Result<Manifest, SnapshotError> {
    let mut entries = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut list = fs::read_dir(&dir)
            .map_err(io_err("read", &dir))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err("read", &dir))?;
        list.sort_by_key(|e| e.file_name());
        for entry in list {
            let Some(file) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let child_rel = join_rel(&rel, &file);
            let Ok(path) = RelPath::new(&child_rel) else {
                continue;
            };
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err("stat", &entry.path()))?;
            let mode = meta.mode() & cow::KEPT_MODE_BITS;
            let stamp = Some(FileStamp {
                inode: meta.ino(),
                ctime_sec: meta.ctime(),
                ctime_nsec: meta.ctime_nsec(),
            });
            if meta.is_dir() {
                entries.push(ManifestEntry {
                    path,
                    kind: EntryKind::Dir,
                    size: 0,
                    mode,
                    stamp,
                });
                stack.push((entry.path(), child_rel));
            } else if meta.is_file() {
                entries.push(ManifestEntry {
                    path,
                    kind: EntryKind::File,
                    size: meta.len(),
                    mode,
                    stamp,
                });
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Manifest { entries })
}

/// Which exclusion rules apply: the data directory's, or a tablespace's (no top-level names).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    Base,
    Tablespace,
}

/// The state of one reflink walk.
struct Walk {
    entries: Vec<ManifestEntry>,
    owner: (u32, u32),
    filter: Filter,
}

impl Walk {
    fn push(
        &mut self,
        rel: &str,
        kind: EntryKind,
        size: u64,
        mode: u32,
    ) -> Result<(), SnapshotError> {
        let path = RelPath::new(rel)?;
        self.entries.push(ManifestEntry {
            path,
            kind,
            size,
            mode,
            stamp: None,
        });
        Ok(())
    }

    /// Clones the contents of `src` into the existing directory `dst`; `rel` is `dst`'s path
    /// in the snapshot.
    fn dir(&mut self, src: &Path, dst: &Path, rel: &str) -> Result<(), SnapshotError> {
        let list = match fs::read_dir(src) {
            Ok(list) => list,
            // Vanished during the walk (a dropped database): the WAL replays the drop.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read", src)(e)),
        };
        let mut names = Vec::new();
        for entry in list {
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("read", src)(e)),
            }
        }
        names.sort();
        let unlogged = unlogged_relations(&names);
        for os_name in names {
            let Some(name) = os_name.to_str() else {
                tracing::warn!(dir = %src.display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            if skipped_name(name, &unlogged) {
                continue;
            }
            let child_rel = join_rel(rel, name);
            let at_top = rel.is_empty() && self.filter == Filter::Base;
            if at_top && name == "pg_tblspc" {
                // Its symlinks are followed after the walk; keep the directory.
                let mode = mode_of(&src.join(name))?.unwrap_or(0o700);
                make_dir(&dst.join(name), mode, self.owner)?;
                self.push(&child_rel, EntryKind::Dir, 0, mode)?;
                self.in_place_tablespaces(&src.join(name), &dst.join(name), &child_rel)?;
                continue;
            }
            let src_path = src.join(name);
            let meta = match fs::symlink_metadata(&src_path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &src_path)(e)),
            };
            let dst_path = dst.join(name);
            if at_top && name == "pg_wal" {
                // The WAL comes from the archive or is added by the caller: keep the
                // directory (a symlink becomes one) with an empty archive_status.
                let mode = fs::metadata(&src_path)
                    .map(|m| m.mode() & cow::KEPT_MODE_BITS)
                    .unwrap_or(0o700);
                make_dir(&dst_path, mode, self.owner)?;
                self.push(&child_rel, EntryKind::Dir, 0, mode)?;
                make_dir(&dst_path.join("archive_status"), mode, self.owner)?;
                self.push("pg_wal/archive_status", EntryKind::Dir, 0, mode)?;
                continue;
            }
            let mode = meta.mode() & cow::KEPT_MODE_BITS;
            if meta.is_dir() {
                owner_may_read(&meta, self.owner, &src_path)?;
                make_dir(&dst_path, mode, self.owner)?;
                self.push(&child_rel, EntryKind::Dir, 0, mode)?;
                if !EXCLUDE_DIR_CONTENTS.contains(&name) {
                    self.dir(&src_path, &dst_path, &child_rel)?;
                }
            } else if meta.is_file() {
                // Opened without following a symlink, and checked on the open descriptor, so
                // a path swapped during the walk cannot make the agent copy another file.
                let source = match fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&src_path)
                {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("open", &src_path)(e)),
                };
                let opened = source.metadata().map_err(io_err("stat", &src_path))?;
                if !opened.is_file() {
                    continue;
                }
                owner_may_read(&opened, self.owner, &src_path)?;
                let mode = opened.mode() & cow::KEPT_MODE_BITS;
                let size =
                    cow::reflink_from(&source, &src_path, &dst_path, mode, Some(self.owner))?;
                self.push(&child_rel, EntryKind::File, size, mode)?;
            }
            // Symlinks outside pg_tblspc, sockets and FIFOs are not part of a base backup.
        }
        Ok(())
    }

    /// Directories (not symlinks) in `pg_tblspc`: in-place tablespaces, walked as they are.
    fn in_place_tablespaces(
        &mut self,
        src: &Path,
        dst: &Path,
        rel: &str,
    ) -> Result<(), SnapshotError> {
        let list = match fs::read_dir(src) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("read", src)(e)),
        };
        for entry in list {
            let entry = entry.map_err(io_err("read", src))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let meta = match fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &entry.path())(e)),
            };
            if meta.is_dir() {
                let child_rel = join_rel(rel, &name);
                let mode = meta.mode() & cow::KEPT_MODE_BITS;
                make_dir(&dst.join(&name), mode, self.owner)?;
                self.push(&child_rel, EntryKind::Dir, 0, mode)?;
                let saved = self.filter;
                self.filter = Filter::Tablespace;
                self.dir(&entry.path(), &dst.join(&name), &child_rel)?;
                self.filter = saved;
            }
        }
        Ok(())
    }
}

/// Whether a base backup leaves out the entry `name` (any depth).
fn skipped_name(name: &str, unlogged: &HashSet<String>) -> bool {
    if EXCLUDE_FILES.contains(&name) || EXCLUDE_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    if is_temp_relation(name) {
        return true;
    }
    // An unlogged relation is reset from its init fork at startup: only that fork is kept.
    if let Some((node, fork)) = relation_file(name) {
        if fork != Some("init") && unlogged.contains(node) {
            return true;
        }
    }
    false
}

/// `<relfilenode>[_<fork>][.<segment>]` → (relfilenode, fork).
fn relation_file(name: &str) -> Option<(&str, Option<&str>)> {
    let base = match name.split_once('.') {
        Some((b, seg)) if !seg.is_empty() && seg.bytes().all(|c| c.is_ascii_digit()) => b,
        Some(_) => return None,
        None => name,
    };
    let (node, fork) = match base.split_once('_') {
        Some((n, f)) => (n, Some(f)),
        None => (base, None),
    };
    if node.is_empty() || !node.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    match fork {
        None | Some("fsm" | "vm" | "init") => Some((node, fork)),
        Some(_) => None,
    }
}

/// Temporary relation files: `t<backend>_<relfilenode>[_<fork>][.<segment>]`
/// (src/backend/storage/file/reinit.c, `looks_like_temp_rel_name`).
fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, file)) = rest.split_once('_') else {
        return false;
    };
    !backend.is_empty()
        && backend.bytes().all(|c| c.is_ascii_digit())
        && relation_file(file).is_some()
}

/// Relfilenodes in a directory listing that have an init fork (unlogged relations).
fn unlogged_relations(names: &[std::ffi::OsString]) -> HashSet<String> {
    names
        .iter()
        .filter_map(|n| n.to_str())
        .filter_map(relation_file)
        .filter(|(_, fork)| *fork == Some("init"))
        .map(|(node, _)| node.to_string())
        .collect()
}

fn join_rel(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

fn mode_of(path: &Path) -> Result<Option<u32>, SnapshotError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m.mode() & cow::KEPT_MODE_BITS)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// Refuses an entry the data directory's owner could not read (a directory: enter). Running
/// as root, the agent would otherwise copy files the PostgreSQL OS user cannot read (through a
/// tablespace symlink it planted, say) into a snapshot that user owns; as that user, the
/// kernel enforces this already. `pg_basebackup`, running as the server, could not read such
/// files either.
pub(crate) fn owner_may_read(
    meta: &fs::Metadata,
    owner: (u32, u32),
    path: &Path,
) -> Result<(), SnapshotError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let mode = meta.mode();
    let bits = if meta.uid() == owner.0 {
        (mode >> 6) & 0o7
    } else if meta.gid() == owner.1 {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    let need = if meta.is_dir() { 0o5 } else { 0o4 };
    if bits & need == need {
        return Ok(());
    }
    Err(SnapshotError::Refused(format!(
        "{} is not readable by the data directory's owner (uid {}); a base backup could not read it either",
        path.display(),
        owner.0
    )))
}

/// Creates directory `path` with exactly `mode` (within [`cow::KEPT_MODE_BITS`]), owned by
/// `owner` when we may give files away. Owner and mode are set through the new directory's
/// descriptor, owner first: a path swapped meanwhile cannot redirect them.
pub(crate) fn make_dir(path: &Path, mode: u32, owner: (u32, u32)) -> Result<(), SnapshotError> {
    let mode = mode & cow::KEPT_MODE_BITS;
    fs::DirBuilder::new()
        .mode(mode & 0o700)
        .create(path)
        .map_err(io_err("create directory", path))?;
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("open directory", path))?;
    chown_like(&dir, path, owner)?;
    dir.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}

/// Gives the open `file` (named `path` in errors) to `owner` when running as root (the agent's
/// library may run as root in-process; `strata agent` runs as the PostgreSQL OS user, which
/// owns what it creates already). Through the descriptor: a swapped path cannot redirect it.
pub(crate) fn chown_like(
    file: &fs::File,
    path: &Path,
    owner: (u32, u32),
) -> Result<(), SnapshotError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(owner.0), Some(owner.1)).map_err(io_err("chown", path))
}

fn remove_partials(dir: &Path) -> Result<(), SnapshotError> {
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let entry = entry.map_err(io_err("read", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PARTIAL_PREFIX) || name.starts_with(".strata-") {
            let path = entry.path();
            let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.map_err(io_err("remove leftover", &path))?;
        }
    }
    Ok(())
}

/// `openat2(dir, path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)` resolved beneath `dir`
/// without following any symlink. `O_NONBLOCK` (no effect on regular files) keeps a FIFO put
/// where a file was from blocking the open; callers check the kind of what they opened.
pub(crate) fn open_beneath(dir: &File, path: &RelPath) -> io::Result<File> {
    openat2_beneath(dir, path.as_str(), 0)
}

/// The directory `path` beneath `dir`, opened without following any symlink.
pub(crate) fn open_dir_beneath(dir: &File, path: &str) -> io::Result<File> {
    openat2_beneath(dir, path, libc::O_DIRECTORY)
}

fn openat2_beneath(dir: &File, path: &str, extra_flags: i32) -> io::Result<File> {
    let c_path = CString::new(path.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: an all-zero open_how is the documented "no flags" value; fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags =
        (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | extra_flags)
            as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: dir is an open descriptor, c_path a NUL-terminated string and how a valid
    // open_how whose size is passed; all outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basebackup_exclusions() {
        let none = HashSet::new();
        for skipped in [
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "tablespace_map",
            "backup_manifest",
            "pg_internal.init",
            "pg_internal.init.1234",
            "pgsql_tmp",
            "pgsql_tmp1234.0",
            "postgresql.auto.conf.tmp",
            "current_logfiles.tmp",
            "t3_16384",
            "t3_16384_fsm",
            "t12_16384.1",
        ] {
            assert!(skipped_name(skipped, &none), "{skipped}");
        }
        for kept in [
            "16384",
            "16384_fsm",
            "16384.2",
            "PG_VERSION",
            "pg_control",
            "t3",
            "tx_1",
            "postgresql.conf",
        ] {
            assert!(!skipped_name(kept, &none), "{kept}");
        }
        let names: Vec<std::ffi::OsString> =
            ["16390", "16390_init", "16390_fsm", "16390.1", "16391"]
                .iter()
                .map(Into::into)
                .collect();
        let unlogged = unlogged_relations(&names);
        assert!(skipped_name("16390", &unlogged));
        assert!(skipped_name("16390.1", &unlogged));
        assert!(skipped_name("16390_fsm", &unlogged));
        assert!(!skipped_name("16390_init", &unlogged));
        assert!(!skipped_name("16391", &unlogged));
    }

    #[test]
    fn free_floor_parses_bytes_and_percent() {
        assert_eq!(FreeFloor::parse("10%"), Ok(FreeFloor::Percent(10)));
        assert_eq!(FreeFloor::parse("1048576"), Ok(FreeFloor::Bytes(1 << 20)));
        assert!(FreeFloor::parse("101%").is_err());
        assert!(FreeFloor::parse("-1").is_err());
        assert!(FreeFloor::parse("ten").is_err());
        assert_eq!(FreeFloor::Percent(10).bytes(1000), 100);
        let dir = Path::new("/srv/pg/strata-snapshots");
        assert_eq!(FreeFloor::Percent(10).refusal(dir, 100, 1000), None);
        assert_eq!(
            FreeFloor::Percent(10).refusal(dir, 30, 1000).as_deref(),
            Some("snapshot refused: the file system of /srv/pg/strata-snapshots has 30 bytes free (3% of 1000 bytes), under the floor of 10% (100 bytes)")
        );
        assert_eq!(
            FreeFloor::Bytes(5).refusal(dir, 4, 0).as_deref(),
            Some("snapshot refused: the file system of /srv/pg/strata-snapshots has 4 bytes free (0% of 0 bytes), under the floor of 5 bytes (5 bytes)")
        );
    }
}
