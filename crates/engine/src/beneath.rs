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

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
