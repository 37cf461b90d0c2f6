//! Copy-on-write file operations: cloning a file by reflink, probing a directory's file
//! system, and finding the byte ranges in which a clone has diverged from an earlier one.
//!
//! A reflink (`FICLONE`) makes a second file share every data extent of the first; later writes
//! to either file go to new extents. So two files that came from the same source still map an
//! unchanged range to the *same physical extent* at the *same logical offset*, and `FIEMAP`
//! shows it: that is how a snapshot's changed ranges against the previous snapshot are found
//! without reading a byte. Wherever the mapping cannot be trusted (no FIEMAP, delayed
//! allocation, inline or encoded data) the range counts as changed: a false "changed" costs a
//! read, a false "unchanged" would lose data.
//!
//! References: include/uapi/linux/fs.h (`FICLONE`, `FS_IOC_FIEMAP`),
//! include/uapi/linux/fiemap.h and Documentation/filesystems/fiemap.rst (extent flags),
//! statfs(2) and include/uapi/linux/magic.h (file system magic numbers).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An I/O failure of a copy-on-write operation, with what was attempted and on which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct CowError {
    /// What was attempted (`"clone"`, `"statfs"`, `"fiemap"`, …).
    pub op: &'static str,
    /// The path it was attempted on.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl CowError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        CowError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the error means "this file system (or this pair of files) cannot clone":
    /// the operation is unsupported, or the files are on different file systems.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::EXDEV | libc::ENOSYS)
        )
    }

    /// True when the file did not exist (e.g. it vanished while a data directory was walked).
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

/// What a directory's file system is and can do; see [`probe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// The file system's name from its `statfs` magic (`xfs`, `btrfs`, `ext4`, `tmpfs`, …), or
    /// `unknown (0x…)`.
    pub fs_type: String,
    /// Whether a file in the directory could actually be cloned by reflink.
    pub reflink: bool,
    /// Bytes available to unprivileged users.
    pub free_bytes: u64,
    /// The file system's size in bytes.
    pub total_bytes: u64,
}

/// Space of a file system, from `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// The `f_type` magic number.
    pub magic: u64,
    /// Bytes available to unprivileged users.
    pub free_bytes: u64,
    /// The file system's size in bytes.
    pub total_bytes: u64,
}

/// The name of a file system from its `statfs` magic (include/uapi/linux/magic.h). ext2, ext3
/// and ext4 share one magic and are named `ext4`.
pub fn fs_type_name(magic: u64) -> String {
    let name = match magic {
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0xef53 => "ext4",
        0x0102_1994 => "tmpfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x2fc1_2fc1 => "zfs",
        0xf2f5_2010 => "f2fs",
        0xca45_1a4e => "bcachefs",
        0x7461_636f => "ocfs2",
        0x6573_5546 => "fuse",
        0x4d44 => "vfat",
        0x5346_544e => "ntfs",
        _ => return format!("unknown (0x{magic:x})"),
    };
    name.to_string()
}

/// `statfs(2)` of `path`: the file system's magic, free and total bytes.
pub fn fs_space(path: &Path) -> Result<FsSpace, CowError> {
    let c_path = c_path(path).map_err(|e| CowError::new("statfs", path, e))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a NUL-terminated string that outlives the call; st is a valid,
    // writable statfs the kernel fills.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(CowError::new("statfs", path, io::Error::last_os_error()));
    }
    // Block counts are in fragment-size units (statvfs's f_frsize); older kernels leave it 0.
    let unit = if st.f_frsize > 0 {
        st.f_frsize as u64
    } else {
        st.f_bsize as u64
    };
    Ok(FsSpace {
        // The magic is 32 bits; f_type's C type differs between targets.
        magic: (st.f_type as u64) & 0xffff_ffff,
        free_bytes: (st.f_bavail as u64).saturating_mul(unit),
        total_bytes: (st.f_blocks as u64).saturating_mul(unit),
    })
}

/// Probes the file system holding directory `dir`: its type and space from `statfs`, and
/// whether it can clone files, found by cloning a small probe file inside `dir` (removed again).
/// Needs write access to `dir`.
pub fn probe(dir: &Path) -> Result<FsInfo, CowError> {
    let space = fs_space(dir)?;
    let reflink = probe_reflink(dir)?;
    Ok(FsInfo {
        fs_type: fs_type_name(space.magic),
        reflink,
        free_bytes: space.free_bytes,
        total_bytes: space.total_bytes,
    })
}

fn probe_reflink(dir: &Path) -> Result<bool, CowError> {
    let tag: u64 = rand::random();
    let src = dir.join(format!(".strata-reflink-probe-{tag:016x}"));
    let dst = dir.join(format!(".strata-reflink-probe-{tag:016x}.clone"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&src)
            .map_err(|e| CowError::new("create probe", &src, e))?;
        io::Write::write_all(&mut f, &[0x5a; 4096])
            .and_then(|()| f.sync_all())
            .map_err(|e| CowError::new("write probe", &src, e))?;
        match reflink(&src, &dst, 0o600) {
            Ok(_) => Ok(true),
            Err(e) if e.is_unsupported() => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&src);
    result
}

/// The permission bits a snapshot or clone keeps of its source's: the owner's and the group's
/// (PostgreSQL's group access mode), never the world's, never setuid, setgid or sticky — a
/// copy must not become a way to plant a set-id program.
pub const KEPT_MODE_BITS: u32 = 0o750;

/// Opens `path` for reading without following a symlink in its last component and without
/// blocking on a FIFO (whoever owns the directory may swap a file for one), and refuses
/// anything but a regular file.
pub(crate) fn open_regular(path: &Path) -> Result<File, CowError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| CowError::new("open", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| CowError::new("stat", path, e))?;
    if !meta.is_file() {
        return Err(CowError::new(
            "open",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    Ok(file)
}

/// Clones the file `src` into a new file `dst` (which must not exist) by reflink, with
/// permission bits `mode` (within [`KEPT_MODE_BITS`]). Returns the size of the clone. On
/// failure `dst` is removed.
pub fn reflink(src: &Path, dst: &Path, mode: u32) -> Result<u64, CowError> {
    let source = open_regular(src)?;
    reflink_from(&source, src, dst, mode, None)
}

/// [`reflink`] from an already opened source file (`src_path` only names it in errors), given
/// to `owner` when running as root (through the new file's descriptor, before its mode is set).
pub fn reflink_from(
    source: &File,
    src_path: &Path,
    dst: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<u64, CowError> {
    let mode = mode & KEPT_MODE_BITS;
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode & 0o700)
        .open(dst)
        .map_err(|e| CowError::new("create", dst, e))?;
    let cloned = clone_file(source, &target)
        .map_err(|e| CowError::new("clone", src_path, e))
        .and_then(|()| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if let (Some((uid, gid)), 0) = (owner, unsafe { libc::geteuid() }) {
                std::os::unix::fs::fchown(&target, Some(uid), Some(gid))
                    .map_err(|e| CowError::new("chown", dst, e))?;
            }
            // The umask may have narrowed the mode at creation.
            target
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| CowError::new("chmod", dst, e))?;
            target
                .metadata()
                .map(|m| m.len())
                .map_err(|e| CowError::new("stat", dst, e))
        });
    if cloned.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    cloned
}

/// `ioctl(dst, FICLONE, src)`: makes `dst` share all of `src`'s data (both on one file
/// system that clones files; `EXDEV` or `EOPNOTSUPP` otherwise).
pub fn clone_file(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed Files); FICLONE
    // takes the source descriptor as its integer argument and touches no user memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A range of bytes in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

impl ByteRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Which ranges of a file differ from the same file in an earlier clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedRanges {
    /// The file's size now.
    pub size: u64,
    /// The ranges that changed (or may have), sorted and not overlapping.
    pub ranges: Vec<ByteRange>,
    /// False when the extent maps could not be used and the whole file counts as changed.
    pub exact: bool,
}

impl ChangedRanges {
    fn whole(size: u64, exact: bool) -> Self {
        let ranges = if size == 0 {
            Vec::new()
        } else {
            vec![ByteRange {
                offset: 0,
                len: size,
            }]
        };
        ChangedRanges {
            size,
            ranges,
            exact,
        }
    }

    /// Bytes in the changed ranges.
    pub fn changed_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// One extent of a file's data as `FIEMAP` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Address on the device (file-system specific).
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x80;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x400;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Flags under which the physical address does not identify the data.
const UNTRUSTED: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL;

impl Extent {
    /// Whether another file (e.g. a snapshot) shares this extent.
    pub fn shared(&self) -> bool {
        self.flags & FIEMAP_EXTENT_SHARED != 0
    }

    fn trusted(&self) -> bool {
        self.flags & UNTRUSTED == 0 && self.physical != 0
    }

    fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }
}

/// `struct fiemap` (include/uapi/linux/fiemap.h), without its flexible array.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Extents asked for per ioctl call.
const FIEMAP_BATCH: usize = 256;
/// A file with more extents than this is treated as "no usable map" (bounds memory).
const MAX_EXTENTS: usize = 4_000_000;

#[repr(C)]
struct FiemapBuffer {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// The data extents of `path` (flushed first, `FIEMAP_FLAG_SYNC`), sorted by offset; `None`
/// when the file system has no `FIEMAP` or the file has too many extents to map.
pub fn extents(path: &Path) -> Result<Option<Vec<Extent>>, CowError> {
    let file = open_regular(path)?;
    let mut buf = Box::new(FiemapBuffer {
        header: FiemapHeader::default(),
        extents: [FiemapExtent::default(); FIEMAP_BATCH],
    });
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        buf.header = FiemapHeader {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_extent_count: FIEMAP_BATCH as u32,
            ..FiemapHeader::default()
        };
        // SAFETY: buf is a FiemapBuffer laid out as struct fiemap followed by fm_extent_count
        // extents, which is what the kernel reads and writes; the descriptor is open.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP as _,
                &mut *buf as *mut FiemapBuffer,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::EBADR) => Ok(None),
                _ => Err(CowError::new("fiemap", path, err)),
            };
        }
        let mapped = (buf.header.fm_mapped_extents as usize).min(FIEMAP_BATCH);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for e in &buf.extents[..mapped] {
            out.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last || out.len() > MAX_EXTENTS {
            break;
        }
        let next = buf.extents[mapped - 1]
            .fe_logical
            .saturating_add(buf.extents[mapped - 1].fe_length);
        if next <= start {
            // A map that does not advance cannot be trusted to terminate.
            return Ok(None);
        }
        start = next;
    }
    if out.len() > MAX_EXTENTS {
        return Ok(None);
    }
    out.sort_by_key(|e| e.logical);
    Ok(Some(out))
}

/// Bytes of `path`'s data that no other file shares (what deleting it would free, roughly);
/// its allocated size when `FIEMAP` is not available.
pub fn exclusive_bytes(path: &Path) -> Result<u64, CowError> {
    match extents(path)? {
        Some(list) => Ok(list.iter().filter(|e| !e.shared()).map(|e| e.length).sum()),
        None => {
            use std::os::unix::fs::MetadataExt;
            let meta =
                std::fs::symlink_metadata(path).map_err(|e| CowError::new("stat", path, e))?;
            Ok(meta.blocks().saturating_mul(512))
        }
    }
}

/// The ranges of `new` that differ from `old` (an earlier clone of the same file). A range is
/// unchanged only where both files map it to the same physical extent at the same offset, or
/// both have a hole there; a file without `old` is wholly changed. When either map is unusable
/// the whole file counts as changed (`exact: false`).
pub fn changed_ranges(new: &Path, old: &Path) -> Result<ChangedRanges, CowError> {
    let new_size = std::fs::symlink_metadata(new)
        .map_err(|e| CowError::new("stat", new, e))?
        .len();
    let old_size = match std::fs::symlink_metadata(old) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return Ok(ChangedRanges::whole(new_size, true)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(ChangedRanges::whole(new_size, true))
        }
        Err(e) => return Err(CowError::new("stat", old, e)),
    };
    let (Some(new_map), Some(old_map)) = (extents(new)?, extents(old)?) else {
        return Ok(ChangedRanges::whole(new_size, false));
    };
    let common = new_size.min(old_size);
    let same = same_ranges(&new_map, &old_map, common);
    Ok(ChangedRanges {
        size: new_size,
        ranges: complement(&same, new_size),
        exact: true,
    })
}

/// Ranges below `limit` where both maps are equal: same physical address at the same offset
/// (encoded extents only when identical), or a hole in both. Sorted, merged.
fn same_ranges(new: &[Extent], old: &[Extent], limit: u64) -> Vec<ByteRange> {
    let mut same = Vec::new();
    // Shared data: a two-pointer walk over both sorted maps.
    let (mut i, mut j) = (0, 0);
    while i < new.len() && j < old.len() {
        let (a, b) = (&new[i], &old[j]);
        let lo = a.logical.max(b.logical);
        let hi = a.end().min(b.end()).min(limit);
        if lo < hi && a.trusted() && b.trusted() {
            let encoded = (a.flags | b.flags) & FIEMAP_EXTENT_ENCODED != 0;
            let equal = if encoded {
                a.logical == b.logical && a.physical == b.physical && a.length == b.length
            } else {
                a.physical.wrapping_sub(a.logical) == b.physical.wrapping_sub(b.logical)
            };
            if equal {
                same.push(ByteRange {
                    offset: lo,
                    len: hi - lo,
                });
            }
        }
        if a.end() <= b.end() {
            i += 1;
        } else {
            j += 1;
        }
    }
    // Holes in both read as zeros in both.
    let new_holes = complement(&to_ranges(new), limit);
    let old_holes = complement(&to_ranges(old), limit);
    same.extend(intersect(&new_holes, &old_holes));
    merge(same)
}

fn to_ranges(map: &[Extent]) -> Vec<ByteRange> {
    merge(
        map.iter()
            .map(|e| ByteRange {
                offset: e.logical,
                len: e.length,
            })
            .collect(),
    )
}

/// Sorts and merges overlapping or touching ranges.
fn merge(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    ranges.retain(|r| r.len > 0);
    ranges.sort_by_key(|r| r.offset);
    let mut out: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
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

/// `[0, limit)` minus the sorted, merged `ranges`.
fn complement(ranges: &[ByteRange], limit: u64) -> Vec<ByteRange> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for r in ranges {
        if r.offset >= limit {
            break;
        }
        if r.offset > at {
            out.push(ByteRange {
                offset: at,
                len: r.offset - at,
            });
        }
        at = at.max(r.end());
    }
    if at < limit {
        out.push(ByteRange {
            offset: at,
            len: limit - at,
        });
    }
    out
}

/// Intersection of two sorted, merged range lists.
fn intersect(a: &[ByteRange], b: &[ByteRange]) -> Vec<ByteRange> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let lo = a[i].offset.max(b[j].offset);
        let hi = a[i].end().min(b[j].end());
        if lo < hi {
            out.push(ByteRange {
                offset: lo,
                len: hi - lo,
            });
        }
        if a[i].end() <= b[j].end() {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO where a file was listed is refused at once by every open of a listed file
    /// (extent maps, clones): it would otherwise hold an agent thread until a writer came.
    #[test]
    fn a_fifo_in_place_of_a_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("16384");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = extents(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = reflink(&fifo, &dir.path().join("copy"), 0o600).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(!dir.path().join("copy").exists());
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(extents(&plain).is_ok());
    }

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    fn r(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    #[test]
    fn identical_maps_leave_nothing_changed() {
        let map = [
            ext(0, 4096, 8192, 0),
            ext(8192, 65536, 4096, FIEMAP_EXTENT_LAST),
        ];
        let same = same_ranges(&map, &map, 12288);
        assert_eq!(complement(&same, 12288), vec![]);
    }

    #[test]
    fn a_rewritten_block_in_the_middle_is_the_only_change() {
        let old = [ext(0, 1 << 20, 3 * 4096, 0)];
        let new = [
            ext(0, 1 << 20, 4096, 0),
            ext(4096, 9 << 20, 4096, 0),
            ext(8192, (1 << 20) + 8192, 4096, 0),
        ];
        let same = same_ranges(&new, &old, 3 * 4096);
        assert_eq!(complement(&same, 3 * 4096), vec![r(4096, 4096)]);
    }

    #[test]
    fn same_physical_at_another_offset_is_a_change() {
        let old = [ext(0, 1 << 20, 8192, 0)];
        let new = [ext(4096, 1 << 20, 4096, 0), ext(0, 1 << 21, 4096, 0)];
        let mut new = new.to_vec();
        new.sort_by_key(|e| e.logical);
        let same = same_ranges(&new, &old, 8192);
        assert_eq!(complement(&same, 8192), vec![r(0, 8192)]);
    }

    #[test]
    fn untrusted_extents_count_as_changed() {
        for flags in [
            FIEMAP_EXTENT_DELALLOC,
            FIEMAP_EXTENT_UNKNOWN,
            FIEMAP_EXTENT_DATA_INLINE,
            FIEMAP_EXTENT_NOT_ALIGNED,
        ] {
            let map = [ext(0, 4096, 4096, flags)];
            let same = same_ranges(&map, &map, 4096);
            assert_eq!(
                complement(&same, 4096),
                vec![r(0, 4096)],
                "flags {flags:#x}"
            );
        }
        // Physical 0 is "no address", never a match.
        let map = [ext(0, 0, 4096, 0)];
        assert_eq!(same_ranges(&map, &map, 4096), vec![]);
    }

    #[test]
    fn encoded_extents_match_only_when_identical() {
        let old = [ext(0, 1 << 20, 128 << 10, FIEMAP_EXTENT_ENCODED)];
        let new = [ext(0, 1 << 20, 128 << 10, FIEMAP_EXTENT_ENCODED)];
        assert_eq!(
            complement(&same_ranges(&new, &old, 128 << 10), 128 << 10),
            vec![]
        );
        let new = [ext(4096, 1 << 20, 124 << 10, FIEMAP_EXTENT_ENCODED)];
        assert_eq!(
            complement(&same_ranges(&new, &old, 128 << 10), 128 << 10),
            vec![r(0, 128 << 10)]
        );
    }

    #[test]
    fn holes_in_both_are_unchanged_and_a_hole_against_data_is_a_change() {
        let old = [ext(8192, 1 << 20, 4096, 0)];
        let new: [Extent; 0] = [];
        // [0, 8192) hole in both; [8192, 12288) data became a hole.
        let same = same_ranges(&new, &old, 12288);
        assert_eq!(complement(&same, 12288), vec![r(8192, 4096)]);
    }

    #[test]
    fn growth_beyond_the_old_size_is_a_change() {
        let old = [ext(0, 1 << 20, 4096, 0)];
        let new = [ext(0, 1 << 20, 4096, 0), ext(4096, 1 << 22, 4096, 0)];
        // limit is the smaller size: everything after it is changed by construction.
        let same = same_ranges(&new, &old, 4096);
        assert_eq!(complement(&same, 8192), vec![r(4096, 4096)]);
    }

    #[test]
    fn range_helpers() {
        assert_eq!(
            merge(vec![r(5, 5), r(0, 5), r(20, 1), r(8, 4)]),
            vec![r(0, 12), r(20, 1)]
        );
        assert_eq!(complement(&[r(2, 2), r(6, 10)], 10), vec![r(0, 2), r(4, 2)]);
        assert_eq!(intersect(&[r(0, 10)], &[r(5, 10)]), vec![r(5, 5)]);
        assert_eq!(fs_type_name(0x5846_5342), "xfs");
        assert_eq!(fs_type_name(0xef53), "ext4");
        assert_eq!(fs_type_name(0x1234), "unknown (0x1234)");
    }
}
