//! The free space a local repository keeps: a write that would leave its
//! file system with less than the minimum is refused before any byte is
//! written, so a full repository never takes the disk down to 0 bytes
//! (which also stops the catalog, logs and any database on the same disk).
//! Reference: statvfs(3); `f_bavail` is what an unprivileged writer may
//! still use, which is what the repository's files compete for.

use std::path::Path;

use super::{StorageError, StorageResult};

/// How much free space a local repository keeps: the smaller of `bytes`
/// and `percent` of the file system's size, so a small file system is not
/// refused outright by a fixed figure meant for a large one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinFreeSpace {
    /// Absolute minimum, bytes.
    pub bytes: u64,
    /// Minimum as a percentage of the file system's size.
    pub percent: u8,
}

impl Default for MinFreeSpace {
    /// 1 GiB or 5 %, whichever is smaller.
    fn default() -> Self {
        MinFreeSpace {
            bytes: 1 << 30,
            percent: 5,
        }
    }
}

impl MinFreeSpace {
    /// No minimum: writes go on until the file system refuses them.
    pub const NONE: MinFreeSpace = MinFreeSpace {
        bytes: 0,
        percent: 0,
    };

    /// The minimum in bytes for a file system of `total` bytes.
    pub fn minimum(&self, total: u64) -> u64 {
        let share = (total as u128 * self.percent.min(100) as u128 / 100) as u64;
        self.bytes.min(share)
    }

    /// Refuses writing `needed` bytes under `key` into the file system
    /// holding `dir` when that would leave less than the minimum free.
    pub(crate) fn check(&self, dir: &Path, key: &str, needed: u64) -> StorageResult<()> {
        if *self == MinFreeSpace::NONE {
            return Ok(());
        }
        let (free, total) = free_space(dir).map_err(|source| StorageError::Io {
            key: format!("{key} (free space of {})", dir.display()),
            source,
        })?;
        let minimum = self.minimum(total);
        if free.saturating_sub(needed) < minimum {
            return Err(StorageError::BelowMinFree {
                key: key.to_string(),
                needed,
                free,
                minimum,
            });
        }
        Ok(())
    }
}

/// Bytes available to unprivileged writers and the file system's size.
// The statvfs fields are 32-bit on some targets, 64-bit on others.
#[allow(clippy::unnecessary_cast)]
fn free_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call and
    // `st` points to writable memory of the struct's size.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the whole struct.
    let st = unsafe { st.assume_init() };
    let unit = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(unit),
        (st.f_blocks as u64).saturating_mul(unit),
    ))
}

/// A byte count for messages: `3.2 MiB`, `812 B`.
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smaller_of_bytes_and_percent() {
        let m = MinFreeSpace::default();
        assert_eq!(m.minimum(100 << 30), 1 << 30);
        assert_eq!(m.minimum(64 << 20), (64 << 20) * 5 / 100);
        assert_eq!(MinFreeSpace::NONE.minimum(1 << 40), 0);
        let fixed = MinFreeSpace {
            bytes: 8 << 20,
            percent: 100,
        };
        assert_eq!(fixed.minimum(64 << 20), 8 << 20);
    }

    #[test]
    fn refuses_a_write_that_would_cross_the_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let (_, total) = free_space(dir.path()).unwrap();
        let all = MinFreeSpace {
            bytes: u64::MAX,
            percent: 100,
        };
        let err = all.check(dir.path(), "packs/ab/x.pack", 10).unwrap_err();
        match err {
            StorageError::BelowMinFree {
                key,
                needed,
                free,
                minimum,
            } => {
                assert_eq!((key.as_str(), needed), ("packs/ab/x.pack", 10));
                assert_eq!(minimum, total);
                assert!(free <= total);
            }
            other => panic!("{other}"),
        }
        MinFreeSpace::NONE
            .check(dir.path(), "packs/ab/x.pack", u64::MAX)
            .unwrap();
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(812), "812 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(human((1 << 30) + (1 << 29)), "1.5 GiB");
    }
}
