//! WAL files in snapshots and clones: a segment the server sends (`PUT …/wal/{file}`) and a
//! range of segments reflinked from the live data directory's `pg_wal/` into a snapshot, so a
//! snapshot holds the WAL from its backup's start to its stop without Strata's archive.
//!
//! File names are data: a segment is 24 upper-case hex digits (timeline, log, segment, as
//! `XLogFileName` writes them) and a timeline history `<8 hex>.history`
//! (src/include/access/xlog_internal.h). Segment numbers follow the cluster's segment size,
//! learnt from the files of the live `pg_wal/` (every segment there has exactly that size).
//! Everything is written beneath a directory handle opened without following symlinks, so a
//! `pg_wal` swapped for a symlink by the data directory's owner cannot lead the agent outside.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cow;
use crate::names::{CloneName, InvalidName, RelPath, SnapshotName};
use crate::snapshot::{
    chown_like, io_err, open_beneath, open_dir_beneath, owner_may_read, SnapshotError,
    SnapshotStore,
};

/// Most segments one `POST /v1/snapshots/{name}/wal` reflinks.
pub const MAX_WAL_RANGE: u64 = 64;
/// Smallest and largest segment sizes PostgreSQL allows (`initdb --wal-segsize`).
const MIN_SEGMENT_SIZE: u64 = 1 << 20;
const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// The name of a WAL segment or timeline history file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WalFileName(String);

impl WalFileName {
    /// Checks `value`: 24 upper-case hex digits with a timeline other than 0, or
    /// `<8 upper-case hex>.history`.
    pub fn new(value: &str) -> Result<WalFileName, InvalidName> {
        let refuse = |reason| InvalidName {
            what: "WAL file name",
            shown: format!("{:?}", value.chars().take(80).collect::<String>()),
            reason,
        };
        let upper_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
        let (tli, ok) = match value.strip_suffix(".history") {
            Some(t) => (t, t.len() == 8 && upper_hex(t)),
            None => (
                value.get(..8).unwrap_or(""),
                value.len() == 24 && upper_hex(value),
            ),
        };
        if !ok {
            return Err(refuse(
                "is neither a WAL segment (24 upper-case hex digits) nor <8 hex>.history",
            ));
        }
        if tli == "00000000" {
            return Err(refuse("names timeline 0"));
        }
        Ok(WalFileName(value.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is a timeline history file.
    pub fn is_history(&self) -> bool {
        self.0.ends_with(".history")
    }

    /// The timeline (first 8 hex digits).
    pub fn timeline(&self) -> u32 {
        u32::from_str_radix(&self.0[..8], 16).unwrap_or(0)
    }

    /// A segment's number for a cluster of `segment_size`; `None` for a history file or a
    /// segment field that cannot exist at that size.
    pub fn segment_number(&self, segment_size: u64) -> Option<u64> {
        if self.is_history() {
            return None;
        }
        let per_log = 0x1_0000_0000u64 / segment_size;
        let log = u64::from_str_radix(&self.0[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&self.0[16..24], 16).ok()?;
        (seg < per_log).then_some(log * per_log + seg)
    }

    /// The segment file of timeline `tli`, number `segno`, at `segment_size`
    /// (`XLogFileName`).
    pub fn segment(tli: u32, segno: u64, segment_size: u64) -> WalFileName {
        let per_log = 0x1_0000_0000u64 / segment_size;
        WalFileName(format!(
            "{tli:08X}{:08X}{:08X}",
            segno / per_log,
            segno % per_log
        ))
    }
}

impl TryFrom<String> for WalFileName {
    type Error = InvalidName;
    fn try_from(value: String) -> Result<Self, InvalidName> {
        WalFileName::new(&value)
    }
}

impl From<WalFileName> for String {
    fn from(n: WalFileName) -> String {
        n.0
    }
}

impl std::fmt::Display for WalFileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Body of `POST /v1/snapshots/{name}/wal`: the segments to reflink from the live `pg_wal/`,
/// both ends included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalRangeRequest {
    /// The first segment (the one holding the backup's start LSN).
    pub first: WalFileName,
    /// The last segment (the one holding its stop LSN).
    pub last: WalFileName,
}

/// Segments reflinked into a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalAdded {
    /// The segments, in order.
    pub segments: Vec<WalFileName>,
    /// Their bytes.
    pub bytes: u64,
}

/// Where a WAL file goes.
#[derive(Debug, Clone)]
pub enum WalTarget {
    /// A snapshot's `pg_wal/`.
    Snapshot(SnapshotName),
    /// A clone's `pg_wal/`.
    Clone(CloneName),
}

/// A directory opened by handle, with its path for messages. Paths through
/// `/proc/self/fd/N/` resolve to the opened directory whatever was renamed since.
struct DirHandle {
    dir: File,
    shown: PathBuf,
}

impl DirHandle {
    fn child(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).join(name)
    }
}

impl SnapshotStore {
    /// The cluster's WAL segment size: the most common size of the regular files with a
    /// segment's name in the live `pg_wal/` that PostgreSQL could have made (a power of two from
    /// 1 MiB to 1 GiB), so one file planted there cannot set it.
    pub fn wal_segment_size(&self) -> Result<u64, SnapshotError> {
        if let Some(size) = self.segment_size.get() {
            return Ok(*size);
        }
        let pg_wal = self.layout.data_dir.join("pg_wal");
        let mut seen = std::collections::BTreeMap::<u64, usize>::new();
        for entry in fs::read_dir(&pg_wal).map_err(io_err("read", &pg_wal))? {
            let entry = entry.map_err(io_err("read", &pg_wal))?;
            let is_segment = entry
                .file_name()
                .to_str()
                .and_then(|n| WalFileName::new(n).ok())
                .is_some_and(|n| !n.is_history());
            if !is_segment {
                continue;
            }
            let meta = fs::symlink_metadata(entry.path()).map_err(io_err("stat", &pg_wal))?;
            if meta.is_file() && is_valid_segment_size(meta.len()) {
                *seen.entry(meta.len()).or_default() += 1;
            }
        }
        let size = most_common_size(&seen).ok_or_else(|| {
            SnapshotError::Refused(format!(
                "the WAL segments in {} do not tell the cluster's segment size (count by size: {seen:?})",
                pg_wal.display()
            ))
        })?;
        Ok(*self.segment_size.get_or_init(|| size))
    }

    /// `pg_wal/` of a snapshot or clone, opened beneath the agent's directory without
    /// following any symlink.
    fn target_pg_wal(&self, target: &WalTarget) -> Result<DirHandle, SnapshotError> {
        let (parent, name) = match target {
            WalTarget::Snapshot(s) => {
                self.existing_snapshot(s)?;
                (self.layout.snapshot_dir.clone(), s.as_str().to_string())
            }
            WalTarget::Clone(c) => (self.clone_dir()?.to_path_buf(), c.as_str().to_string()),
        };
        let parent_dir = File::open(&parent).map_err(io_err("open", &parent))?;
        let rel = format!("{name}/pg_wal");
        let shown = parent.join(&rel);
        let dir = open_dir_beneath(&parent_dir, &rel).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => SnapshotError::NotFound(format!("no {}", shown.display())),
            Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR) => SnapshotError::Refused(format!(
                "{} is not a plain directory (a symlink?)",
                shown.display()
            )),
            _ => io_err("open", &shown)(e),
        })?;
        Ok(DirHandle { dir, shown })
    }

    /// Stores WAL file `file` (the bytes the server sent) in the `pg_wal/` of a snapshot or
    /// clone: a segment must be exactly the cluster's segment size, a history file at most
    /// that. Written under a temporary name and linked into place, so a reader never sees
    /// half a file; an existing file is not replaced.
    pub fn put_wal(
        &self,
        target: &WalTarget,
        file: &WalFileName,
        bytes: &[u8],
    ) -> Result<(), SnapshotError> {
        let segment_size = self.wal_segment_size()?;
        let len = bytes.len() as u64;
        if file.is_history() {
            if len == 0 || len > segment_size {
                return Err(SnapshotError::InvalidParameter(format!(
                    "history file {file} holds {len} bytes; 1 to {segment_size} are accepted"
                )));
            }
        } else {
            if file.segment_number(segment_size).is_none() {
                return Err(SnapshotError::InvalidParameter(format!(
                    "{file} is not a segment of a cluster with {segment_size}-byte segments"
                )));
            }
            if len != segment_size {
                return Err(SnapshotError::InvalidParameter(format!(
                    "segment {file} holds {len} bytes; this cluster's segments hold {segment_size}"
                )));
            }
        }
        let dir = self.target_pg_wal(target)?;
        let final_path = dir.child(file.as_str());
        if fs::symlink_metadata(&final_path).is_ok() {
            return Err(SnapshotError::Exists(format!(
                "{} already exists",
                dir.shown.join(file.as_str()).display()
            )));
        }
        let tmp_name = format!(".strata-wal-{:016x}", rand::random::<u64>());
        let tmp = dir.child(&tmp_name);
        let shown = dir.shown.join(file.as_str());
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
                .map_err(io_err("create", &shown))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .map_err(io_err("write", &shown))?;
            chown_like(&f, &tmp, self.owner)?;
            // A hard link fails when the name exists: a concurrent writer's file stays.
            fs::hard_link(&tmp, &final_path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    SnapshotError::Exists(format!("{} already exists", shown.display()))
                } else {
                    io_err("link", &shown)(e)
                }
            })
        })();
        let _ = fs::remove_file(&tmp);
        written
    }

    /// Reflinks segments `first` to `last` (same timeline, at most [`MAX_WAL_RANGE`]) from the
    /// live data directory's `pg_wal/` into snapshot `name`'s `pg_wal/`. Nothing is kept when
    /// one is missing or already there.
    pub fn add_wal_range(
        &self,
        name: &SnapshotName,
        first: &WalFileName,
        last: &WalFileName,
    ) -> Result<WalAdded, SnapshotError> {
        let segment_size = self.wal_segment_size()?;
        let invalid = |m: String| SnapshotError::InvalidParameter(m);
        let (Some(a), Some(b)) = (
            first.segment_number(segment_size),
            last.segment_number(segment_size),
        ) else {
            return Err(invalid(format!(
                "{first}..{last}: both ends must be WAL segments of this cluster ({segment_size}-byte segments)"
            )));
        };
        if first.timeline() != last.timeline() {
            return Err(invalid(format!(
                "{first}..{last}: both ends must be on one timeline"
            )));
        }
        if b < a || b - a >= MAX_WAL_RANGE {
            return Err(invalid(format!(
                "{first}..{last}: a range holds 1 to {MAX_WAL_RANGE} segments, first to last"
            )));
        }
        let segments: Vec<WalFileName> = (a..=b)
            .map(|n| WalFileName::segment(first.timeline(), n, segment_size))
            .collect();
        let dst = self.target_pg_wal(&WalTarget::Snapshot(name.clone()))?;
        let src_path = self.layout.data_dir.join("pg_wal");
        // The live pg_wal may be a symlink to another disk (initdb --waldir): followed, then
        // checked like every directory a snapshot reads.
        let src_dir = File::open(&src_path).map_err(io_err("open", &src_path))?;
        let src_meta = src_dir.metadata().map_err(io_err("stat", &src_path))?;
        owner_may_read(&src_meta, self.owner, &src_path)?;
        for s in &segments {
            if fs::symlink_metadata(dst.child(s.as_str())).is_ok() {
                return Err(SnapshotError::Exists(format!(
                    "{} already exists",
                    dst.shown.join(s.as_str()).display()
                )));
            }
        }
        let mut done: Vec<PathBuf> = Vec::new();
        let result = (|| {
            let mut bytes = 0u64;
            for s in &segments {
                let from = src_path.join(s.as_str());
                let rel = RelPath::new(s.as_str())?;
                let source = open_beneath(&src_dir, &rel).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) => SnapshotError::NotFound(format!(
                        "segment {s} is not in {} (already recycled?)",
                        src_path.display()
                    )),
                    Some(libc::ELOOP | libc::EXDEV) => {
                        SnapshotError::Refused(format!("{} is a symlink", from.display()))
                    }
                    _ => io_err("open", &from)(e),
                })?;
                let meta = source.metadata().map_err(io_err("stat", &from))?;
                if !meta.is_file() || meta.len() != segment_size {
                    return Err(SnapshotError::Refused(format!(
                        "{} is not a {segment_size}-byte segment file",
                        from.display()
                    )));
                }
                owner_may_read(&meta, self.owner, &from)?;
                let to = dst.child(s.as_str());
                bytes +=
                    cow::reflink_from(&source, &from, &to, meta.mode() & 0o600, Some(self.owner))?;
                done.push(to.clone());
            }
            Ok(bytes)
        })();
        match result {
            Ok(bytes) => Ok(WalAdded { segments, bytes }),
            Err(e) => {
                for p in done {
                    let _ = fs::remove_file(p);
                }
                Err(e)
            }
        }
    }
}

/// A size `initdb --wal-segsize` allows: a power of two from 1 MiB to 1 GiB
/// (`IsValidWalSegSize`, src/include/access/xlog_internal.h).
fn is_valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size)
}

/// The size counted most often; `None` when there is none or two sizes tie for it.
fn most_common_size(seen: &std::collections::BTreeMap<u64, usize>) -> Option<u64> {
    let top = seen.values().copied().max()?;
    let mut leaders = seen.iter().filter(|(_, n)| **n == top);
    let (size, _) = leaders.next()?;
    leaders.next().is_none().then_some(*size)
}

/// Whether `path` is a WAL upload (`PUT /v1/{snapshots|clones}/{name}/wal/{file}`), whose body
/// may be as large as a segment.
pub fn is_wal_upload(method: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    method == "PUT"
        && parts.len() == 6
        && parts[..2] == ["", "v1"]
        && matches!(parts[2], "snapshots" | "clones")
        && parts[4] == "wal"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_file_names_follow_postgres() {
        for ok in [
            "000000010000000000000001",
            "0000000A00000001000000FF",
            "00000002.history",
        ] {
            assert!(WalFileName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "00000001000000000000001",
            "0000000100000000000000010",
            "000000010000000000000001.partial",
            "00000001000000000000000g",
            "0000000100000000000000aa",
            "000000000000000000000001",
            "00000000.history",
            "0000001.history",
            "../00000001.history",
            "00000001.history/x",
            "x/000000010000000000000001",
        ] {
            assert!(WalFileName::new(bad).is_err(), "{bad:?}");
        }
        let seg = 16u64 << 20;
        let n = WalFileName::new("0000000100000001000000FF").unwrap();
        assert_eq!(n.segment_number(seg), Some(0x1FF));
        assert_eq!(WalFileName::segment(1, 0x1FF, seg), n);
        assert_eq!(
            WalFileName::segment(3, 0x100, seg).as_str(),
            "000000030000000100000000"
        );
        // 1 GiB segments: only 4 per log file.
        assert_eq!(n.segment_number(1 << 30), None);
        assert!(WalFileName::new("00000002.history")
            .unwrap()
            .segment_number(seg)
            .is_none());
    }

    #[test]
    fn the_segment_size_is_the_most_common_valid_one() {
        assert!(is_valid_segment_size(16 << 20));
        assert!(is_valid_segment_size(1 << 20) && is_valid_segment_size(1 << 30));
        assert!(!is_valid_segment_size(0));
        assert!(!is_valid_segment_size(1 << 19));
        assert!(!is_valid_segment_size(1 << 31));
        assert!(!is_valid_segment_size((16 << 20) + 1));
        let counts = |pairs: &[(u64, usize)]| pairs.iter().copied().collect();
        assert_eq!(most_common_size(&counts(&[])), None);
        // One planted file does not outvote the cluster's segments.
        assert_eq!(
            most_common_size(&counts(&[(1 << 20, 1), (16 << 20, 5)])),
            Some(16 << 20)
        );
        assert_eq!(
            most_common_size(&counts(&[(1 << 20, 2), (16 << 20, 2)])),
            None
        );
    }

    #[test]
    fn wal_uploads_are_recognised_by_path() {
        assert!(is_wal_upload(
            "PUT",
            "/v1/clones/c1/wal/000000010000000000000001"
        ));
        assert!(is_wal_upload("PUT", "/v1/snapshots/s/wal/x"));
        assert!(!is_wal_upload("POST", "/v1/snapshots/s/wal"));
        assert!(!is_wal_upload("PUT", "/v1/snapshots/s/labels"));
        assert!(!is_wal_upload("PUT", "/v1/snapshots/s/wal/x/y"));
    }
}
