//! Writing files strictly beneath a directory. A restore turns names read
//! from a repository into files; the names are checked first
//! (`strata_repo::paths`), and on top of that every file and directory is
//! opened relative to a directory handle, one component at a time, with
//! `O_NOFOLLOW`: a symbolic link met on the way (planted by an earlier entry,
//! or by anyone else) fails the open with `ELOOP`/`ENOTDIR` instead of
//! redirecting the write. Reference: openat(2), mkdirat(2), symlinkat(2).
//! (`openat2` with `RESOLVE_BENEATH` would do the walk in one call; the
//! per-component walk works on every Linux and costs a few system calls per
//! file, nothing next to the file's contents.)

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// A directory that files are created beneath.
pub(crate) struct Beneath {
    root: OwnedFd,
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// `openat` returning an owned descriptor.
fn open_at(dir: &OwnedFd, name: &str, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let name = c_name(name)?;
    // SAFETY: `dir` is an open descriptor and `name` a valid C string; the
    // returned descriptor is owned by nobody else.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_at(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Creates directory `name` in `dir` unless it exists (as anything: the
/// open that follows refuses what is not a directory).
fn mkdir_at(dir: &OwnedFd, name: &str, mode: u32) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: `dir` is an open descriptor and `c` a valid C string.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    Ok(())
}

impl Beneath {
    /// Opens `root` (which the caller chose; links in it are followed).
    pub(crate) fn open(root: &Path) -> io::Result<Self> {
        let c = CString::new(root.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: `c` is a valid C string; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open and is not owned elsewhere.
        Ok(Beneath {
            root: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Walks to the directory holding `rel`'s last component, creating
    /// missing directories (mode 0700) on the way; returns it and the name.
    fn parent<'a>(&self, rel: &'a str) -> io::Result<(Option<OwnedFd>, &'a str)> {
        let rel = strata_repo::paths::normalized(rel);
        let mut parts = rel.split('/').collect::<Vec<_>>();
        let last = parts.pop().unwrap_or_default();
        if last.is_empty() || last == "." || last == ".." || parts.iter().any(|p| p.is_empty()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain relative path",
            ));
        }
        let mut dir: Option<OwnedFd> = None;
        for part in parts {
            if part == "." || part == ".." {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a plain relative path",
                ));
            }
            let at = dir.as_ref().unwrap_or(&self.root);
            mkdir_at(at, part, 0o700)?;
            dir = Some(open_dir_at(at, part)?);
        }
        Ok((dir, last))
    }

    /// Creates directory `rel` (and its parents) and sets its mode.
    pub(crate) fn create_dir_all(&self, rel: &str, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let at = dir.as_ref().unwrap_or(&self.root);
        mkdir_at(at, name, 0o700)?;
        let fd = open_dir_at(at, name)?;
        File::from(fd).set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
    }

    /// Creates (or truncates) regular file `rel`, its parents as needed.
    pub(crate) fn create_file(&self, rel: &str) -> io::Result<File> {
        let (dir, name) = self.parent(rel)?;
        let fd = open_at(
            dir.as_ref().unwrap_or(&self.root),
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        )?;
        Ok(File::from(fd))
    }

    /// Creates symbolic link `rel` pointing at `to`.
    pub(crate) fn symlink(&self, rel: &str, to: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        let c_to = CString::new(to.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        let c_name = c_name(name)?;
        let at = dir.as_ref().unwrap_or(&self.root);
        // SAFETY: `at` is an open descriptor; both strings are valid C strings.
        if unsafe { libc::symlinkat(c_to.as_ptr(), at.as_raw_fd(), c_name.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What an existing entry is, as `fstatat` without following a link sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A socket, FIFO or device: never part of a data directory Strata restores.
    Other,
}

fn c_os_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// The kind of `name` in `dir`, without following a link.
fn kind_at(dir: &OwnedFd, name: &CString) -> io::Result<EntryKind> {
    // SAFETY: an all-zero stat is a valid value for fstatat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is open, `name` a valid C string and `st` writable.
    if unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    })
}

fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Existing entries beneath a directory: listed, read, changed and removed
/// without following a link anywhere (what a delta restore needs from a
/// directory it did not create). A link is only ever read or unlinked.
impl Beneath {
    /// Walks to the directory holding `rel`'s last component without
    /// creating anything; `None` when a directory on the way is missing.
    fn existing_parent<'a>(&self, rel: &'a str) -> io::Result<Option<(Option<OwnedFd>, &'a str)>> {
        let rel = strata_repo::paths::normalized(rel);
        let mut parts = rel.split('/').collect::<Vec<_>>();
        let last = parts.pop().unwrap_or_default();
        let plain = |p: &str| !p.is_empty() && p != "." && p != "..";
        if !plain(last) || !parts.iter().all(|p| plain(p)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain relative path",
            ));
        }
        let mut dir: Option<OwnedFd> = None;
        for part in parts {
            let at = dir.as_ref().unwrap_or(&self.root);
            match not_found_is_none(open_dir_at(at, part))? {
                Some(fd) => dir = Some(fd),
                None => return Ok(None),
            }
        }
        Ok(Some((dir, last)))
    }

    /// Opens existing regular file `rel` for reading and writing; `None`
    /// when it (or a directory on the way) does not exist. A link anywhere
    /// on the way fails the open.
    pub(crate) fn open_existing(&self, rel: &str) -> io::Result<Option<File>> {
        let Some((dir, name)) = self.existing_parent(rel)? else {
            return Ok(None);
        };
        let at = dir.as_ref().unwrap_or(&self.root);
        let fd = not_found_is_none(open_at(at, name, libc::O_RDWR | libc::O_NONBLOCK, 0))?;
        Ok(fd.map(File::from))
    }

    /// Opens existing file `rel` for reading; `None` when it (or a
    /// directory on the way) does not exist. A link anywhere on the way
    /// fails the open.
    pub(crate) fn open_read(&self, rel: &str) -> io::Result<Option<File>> {
        let Some((dir, name)) = self.existing_parent(rel)? else {
            return Ok(None);
        };
        let at = dir.as_ref().unwrap_or(&self.root);
        let fd = not_found_is_none(open_at(at, name, libc::O_RDONLY | libc::O_NONBLOCK, 0))?;
        Ok(fd.map(File::from))
    }

    /// Reads existing regular file `rel` (at most `max` bytes); `None` when
    /// it does not exist.
    pub(crate) fn read_existing(&self, rel: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let Some((dir, name)) = self.existing_parent(rel)? else {
            return Ok(None);
        };
        let at = dir.as_ref().unwrap_or(&self.root);
        let Some(fd) = not_found_is_none(open_at(at, name, libc::O_RDONLY | libc::O_NONBLOCK, 0))?
        else {
            return Ok(None);
        };
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let mut out = Vec::new();
        file.take(max).read_to_end(&mut out)?;
        Ok(Some(out))
    }

    /// Renames `from` to `to`, both beneath this directory.
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let missing = || io::Error::new(io::ErrorKind::NotFound, "no such directory");
        let (from_dir, from_name) = self.existing_parent(from)?.ok_or_else(missing)?;
        let (to_dir, to_name) = self.existing_parent(to)?.ok_or_else(missing)?;
        let (f, t) = (c_name(from_name)?, c_name(to_name)?);
        let from_at = from_dir.as_ref().unwrap_or(&self.root);
        let to_at = to_dir.as_ref().unwrap_or(&self.root);
        // SAFETY: both descriptors are open and both names valid C strings.
        if unsafe {
            libc::renameat(
                from_at.as_raw_fd(),
                f.as_ptr(),
                to_at.as_raw_fd(),
                t.as_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `rel` (a file or a link; a directory with everything in
    /// it) if it exists.
    pub(crate) fn remove_existing(&self, rel: &str) -> io::Result<bool> {
        let Some((dir, name)) = self.existing_parent(rel)? else {
            return Ok(false);
        };
        let at = Beneath {
            root: match dir {
                Some(d) => d,
                None => self.root.try_clone()?,
            },
        };
        let name = OsStr::new(name);
        match not_found_is_none(at.kind(name))? {
            Some(kind) => at.remove(name, kind).map(|_| true),
            None => Ok(false),
        }
    }

    /// Directory `name` of this directory, opened without following a link.
    pub(crate) fn sub(&self, name: &OsStr) -> io::Result<Beneath> {
        let c = c_os_name(name)?;
        // SAFETY: `root` is open and `c` a valid C string; the descriptor is owned below.
        let fd = unsafe {
            libc::openat(
                self.root.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
        Ok(Beneath {
            root: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// What `name` in this directory is, without following a link.
    pub(crate) fn kind(&self, name: &OsStr) -> io::Result<EntryKind> {
        kind_at(&self.root, &c_os_name(name)?)
    }

    /// The entries of this directory with their kinds, sorted by name.
    pub(crate) fn list(&self) -> io::Result<Vec<(OsString, EntryKind)>> {
        // The descriptor's /proc link names the very directory opened.
        let mut names = std::fs::read_dir(format!("/proc/self/fd/{}", self.root.as_raw_fd()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            // Gone since it was listed: nothing to do about it.
            if let Some(kind) = not_found_is_none(self.kind(&name))? {
                out.push((name, kind));
            }
        }
        Ok(out)
    }

    /// Where link `name` of this directory points.
    pub(crate) fn read_link(&self, name: &OsStr) -> io::Result<PathBuf> {
        let c = c_os_name(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `root` is open, `c` a valid C string and `buf` writable for its length.
        let n = unsafe {
            libc::readlinkat(
                self.root.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(PathBuf::from(OsString::from_vec(buf)))
    }

    /// Removes `name` of this directory: a file or link is unlinked (a
    /// link's target is never touched), a directory emptied the same way
    /// first. Returns how many entries went.
    pub(crate) fn remove(&self, name: &OsStr, kind: EntryKind) -> io::Result<u64> {
        let c = c_os_name(name)?;
        let mut removed = 1;
        let flags = if kind == EntryKind::Dir {
            let sub = self.sub(name)?;
            for (child, kind) in sub.list()? {
                removed += sub.remove(&child, kind)?;
            }
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: `root` is open and `c` a valid C string.
        if unsafe { libc::unlinkat(self.root.as_raw_fd(), c.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(removed)
    }

    /// Flushes this directory's entries (names created, renamed, removed).
    pub(crate) fn sync(&self) -> io::Result<()> {
        // SAFETY: `root` is an open descriptor.
        if unsafe { libc::fsync(self.root.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_on_the_way_are_not_followed() {
        let target = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let b = Beneath::open(target.path()).unwrap();
        b.create_dir_all("base/5", 0o700).unwrap();
        b.create_file("base/5/1").unwrap();
        assert!(target.path().join("base/5/1").is_file());
        b.create_dir_all("./pg_wal/archive_status", 0o700).unwrap();
        assert!(target.path().join("pg_wal/archive_status").is_dir());

        // A link planted beneath the target, by an entry or by anyone.
        std::os::unix::fs::symlink(outside.path(), target.path().join("base/evil")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("f"),
            target.path().join("base/evil_file"),
        )
        .unwrap();
        assert!(b.create_file("base/evil/x").is_err());
        assert!(b.create_dir_all("base/evil/d", 0o700).is_err());
        assert!(b.create_dir_all("base/evil", 0o700).is_err());
        assert!(b.create_file("base/evil_file").is_err());
        assert!(b.symlink("base/evil/l", Path::new("/")).is_err());
        for bad in ["../x", "base/../../x", "/abs", "base//x", "base/."] {
            assert!(b.create_file(bad).is_err(), "{bad}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
