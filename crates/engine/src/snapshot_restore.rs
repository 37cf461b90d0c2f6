//! `strata restore` of a snapshot set on the database host itself: when the
//! set's snapshot is still in the agent's snapshot directory, readable from
//! here and on the target directory's file system, its files are reflinked
//! into the target (seconds, whatever the size) instead of read from the
//! repository; the archived WAL and the recovery settings are written as any
//! restore writes them.
//!
//! The snapshot belongs to the PostgreSQL OS user, who could plant links in
//! it while it is read. Every entry is opened relative to its directory's
//! handle with `O_NOFOLLOW`, and each opened file must be a directory or a
//! regular file owned by the snapshot's owner: a symlink, or a hard link to
//! somebody else's file, fails the restore instead of being copied. Writes
//! go beneath the target only ([`Beneath`]).
//! Reference: ioctl_ficlone(2), openat(2).

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pg_wal::history_file_name;
use strata_agent::proto::Manifest;
use strata_agent::snapshot::manifest_of;
use strata_catalog::{BackupMethod, BackupSet, BackupStatus, Instance, Job, JobState};

use crate::beneath::Beneath;
use crate::catalog_retry::retry_busy;
use crate::local_server::LocalServer;
use crate::restore::{chown_tree, sync_filesystem, write_recovery_settings};
use crate::{Engine, EngineError, EngineResult, Progress, RestoreOptions, RestoreOutcome};

/// The most a restored directory or file may allow (as a repository restore).
const DIR_MODE_MASK: u32 = 0o750;
const FILE_MODE_MASK: u32 = 0o640;

/// A snapshot set found on this host, ready to be reflinked (see
/// [`Engine::local_snapshot`]).
#[derive(Debug, Clone)]
pub struct LocalSnapshot {
    /// The snapshot's directory, as shown to people.
    pub dir: PathBuf,
    /// The set.
    pub set: BackupSet,
    /// The directory itself, opened without following a link anywhere on
    /// its path: what is read, whatever is renamed after the check.
    root: std::sync::Arc<File>,
}

impl LocalSnapshot {
    /// The snapshot's entries with inode and change time, read through the opened directory.
    fn listing(&self) -> EngineResult<Manifest> {
        let through = PathBuf::from(format!("/proc/self/fd/{}", self.root.as_raw_fd()));
        manifest_of(&through).map_err(|e| {
            EngineError::Failed(format!("listing the snapshot {}: {e}", self.dir.display()))
        })
    }
}

/// Opens the directory `path` for reading, refusing a symbolic link in any
/// component of the path (`openat2` with `RESOLVE_NO_SYMLINKS`): the
/// PostgreSQL OS user owns the snapshot directory and its parents may be
/// its too, so a component swapped for a link must not lead the read to a
/// directory of root's.
pub fn open_dir_no_links(path: &Path) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
    // SAFETY: an all-zero open_how is the documented "no flags" value; fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `c` is a NUL-terminated string and `how` a valid open_how whose
    // size is passed; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat2 and is not owned elsewhere.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// The uid of the OS user `name`, if it exists.
fn uid_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: getpwnam gets a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    // SAFETY: pw is checked to be non-null before it is read.
    (!pw.is_null()).then(|| unsafe { (*pw).pw_uid })
}

/// The most of a snapshot's `tablespace_map` read (it lists one line per
/// tablespace).
const TABLESPACE_MAP_MAX: u64 = 1 << 20;

/// The device of `path`, or of its nearest existing ancestor.
fn device_of(path: &Path) -> Option<u64> {
    path.ancestors()
        .find_map(|p| fs::metadata(p).ok())
        .map(|m| m.dev())
}

/// `openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK)`: a link fails
/// with `ELOOP`, a FIFO does not block.
fn open_entry(dir: &File, name: &std::ffi::OsStr) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))?;
    // SAFETY: `dir` is an open descriptor and `c` a valid C string; the
    // returned descriptor is owned by nobody else.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The names in the directory `dir` is open on, sorted.
fn names_in(dir: &File) -> io::Result<Vec<std::ffi::OsString>> {
    // The descriptor's /proc link names the very directory opened.
    let mut names = fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// Reflinks every directory and regular file of the snapshot `src` into
/// `dst`; returns the files and bytes.
fn reflink_tree(src: &Path, root: &File, dst: &Beneath) -> EngineResult<(u64, u64)> {
    let root = root
        .try_clone()
        .map_err(EngineError::io(format!("opening {}", src.display())))?;
    let meta = root
        .metadata()
        .map_err(EngineError::io(format!("reading {}", src.display())))?;
    if !meta.is_dir() {
        return Err(EngineError::Refused(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let owner = meta.uid();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut stack = vec![(root, String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let shown = src.join(&rel);
        for name in
            names_in(&dir).map_err(EngineError::io(format!("reading {}", shown.display())))?
        {
            let Some(text) = name.to_str() else {
                return Err(EngineError::Refused(format!(
                    "snapshot {} holds a name that is not UTF-8 in {}",
                    src.display(),
                    shown.display()
                )));
            };
            let child = if rel.is_empty() {
                text.to_string()
            } else {
                format!("{rel}/{text}")
            };
            let path = src.join(&child);
            let entry = open_entry(&dir, &name).map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => EngineError::Refused(format!(
                    "{} in the snapshot is a symbolic link; a snapshot holds none (restore from the repository)",
                    path.display()
                )),
                _ => EngineError::io(format!("opening {}", path.display()))(e),
            })?;
            let meta = entry
                .metadata()
                .map_err(EngineError::io(format!("reading {}", path.display())))?;
            if meta.uid() != owner {
                return Err(EngineError::Refused(format!(
                    "{} in the snapshot belongs to another user than the snapshot; refused",
                    path.display()
                )));
            }
            if meta.is_dir() {
                dst.create_dir_all(&child, meta.mode() & DIR_MODE_MASK)
                    .map_err(EngineError::io(format!("creating {child}")))?;
                stack.push((entry, child));
            } else if meta.is_file() {
                let out = dst
                    .create_file(&child)
                    .map_err(EngineError::io(format!("creating {child}")))?;
                strata_agent::cow::clone_file(&entry, &out)
                    .map_err(EngineError::io(format!("cloning {}", path.display())))?;
                out.set_permissions(fs::Permissions::from_mode(meta.mode() & FILE_MODE_MASK))
                    .map_err(EngineError::io(format!("setting mode of {child}")))?;
                files += 1;
                bytes += meta.len();
            } else {
                return Err(EngineError::Refused(format!(
                    "{} in the snapshot is neither a directory nor a regular file",
                    path.display()
                )));
            }
        }
    }
    Ok((files, bytes))
}

impl Engine {
    /// The snapshot of set `opts.backup_id` of `instance_id` when a restore
    /// to `opts.target_dir` can reflink it: a successful snapshot set still
    /// on the database host, its directory (`snapshot_dir/<set>`, the
    /// agent's) readable here and on the target's file system, without a
    /// tablespace map (tablespaces are relocated by the repository restore
    /// only). `Ok(None)`: restore from the repository.
    pub fn local_snapshot(
        &self,
        instance_id: &str,
        opts: &RestoreOptions,
        snapshot_dir: &Path,
    ) -> EngineResult<Option<LocalSnapshot>> {
        let Some(id) = &opts.backup_id else {
            return Ok(None);
        };
        let Some(set) = self
            .catalog
            .list_backups(instance_id)?
            .into_iter()
            .find(|b| &b.id == id)
        else {
            return Ok(None);
        };
        if set.method != BackupMethod::Snapshot
            || !set.snapshot_local
            || set.status != BackupStatus::Success
        {
            return Ok(None);
        }
        let dir = snapshot_dir.join(set.id.as_str());
        let root = match open_dir_no_links(&dir) {
            Ok(root) => root,
            Err(e) => {
                tracing::info!(backup = %set.id, "snapshot {} not reflinked: {e}", dir.display());
                return Ok(None);
            }
        };
        let meta = root
            .metadata()
            .map_err(EngineError::io(format!("reading {}", dir.display())))?;
        // The snapshot is the PostgreSQL OS user's: never root's, and the
        // user restored servers run as when that is known.
        let owner_ok = meta.uid() != 0
            && self
                .os_user()
                .is_none_or(|user| uid_of(&user) == Some(meta.uid()));
        if !owner_ok {
            tracing::warn!(backup = %set.id, uid = meta.uid(), "snapshot {} belongs to an unexpected user; restoring from the repository", dir.display());
            return Ok(None);
        }
        if Some(meta.dev()) != device_of(&opts.target_dir) {
            return Ok(None);
        }
        let map = match open_entry(&root, std::ffi::OsStr::new("tablespace_map")) {
            Ok(f) => {
                let mut map = Vec::new();
                io::Read::read_to_end(&mut io::Read::take(f, TABLESPACE_MAP_MAX), &mut map)
                    .map_err(EngineError::io(format!(
                        "reading {}/tablespace_map",
                        dir.display()
                    )))?;
                map
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::info!(backup = %set.id, "snapshot {} not reflinked: tablespace_map: {e}", dir.display());
                return Ok(None);
            }
        };
        if !map.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Ok(Some(LocalSnapshot {
            dir,
            set,
            root: std::sync::Arc::new(root),
        }))
    }

    /// Restores `local` into `opts.target_dir` (empty, prepared by the
    /// caller): reflinks, WAL, recovery settings, and the start if asked.
    pub(crate) fn run_snapshot_restore(
        &self,
        instance: &Instance,
        opts: &RestoreOptions,
        local: &LocalSnapshot,
        progress: &dyn Progress,
        job: &mut Job,
    ) -> EngineResult<RestoreOutcome> {
        let set = &local.set;
        // Planned first: refusing a target must not cost the copy.
        let (plan, geometry, histories) = self.snapshot_wal_plan(instance, set, &opts.target)?;
        progress.message(&format!(
            "restoring backup {} of {} to {} by reflink from the snapshot {}, recovering to {}",
            set.id,
            instance.id,
            opts.target_dir.display(),
            local.dir.display(),
            plan.target
        ));
        job.state = JobState::Uploading;
        retry_busy("recording a restore job's state", || {
            self.catalog.update_job(job)
        })?;
        let root = Beneath::open(&opts.target_dir).map_err(EngineError::io(format!(
            "opening {}",
            opts.target_dir.display()
        )))?;
        // Checked before the copy, and after it for a change made while it ran.
        self.refuse_changed_snapshot(set, &local.listing()?)?;
        let (files, bytes) = reflink_tree(&local.dir, &local.root, &root)?;
        self.refuse_changed_snapshot(set, &local.listing()?)?;
        progress.update("restore", bytes, Some(bytes));

        root.create_dir_all("pg_wal", 0o700)
            .map_err(EngineError::io("creating pg_wal"))?;
        for (tli, (_, data)) in &histories {
            let name = history_file_name(*tli);
            write_beneath(&root, &format!("pg_wal/{name}"), data)?;
        }
        for seg in &plan.segments {
            let (_, mut data) = self.read_wal_row(&seg.row)?;
            data.resize(geometry.segment_size() as usize, 0);
            let name = geometry.segment_file_name(seg.row.timeline, seg.segno);
            write_beneath(&root, &format!("pg_wal/{name}"), &data)?;
        }

        job.state = JobState::Checking;
        job.progress = 90;
        retry_busy("recording a restore job's state", || {
            self.catalog.update_job(job)
        })?;
        let neutralized =
            write_recovery_settings(&opts.target_dir, &set.id, &plan.target, opts.start.as_ref())?;
        if let Some(user) = &self.os_user() {
            chown_tree(&opts.target_dir, user)?;
        }
        sync_filesystem(&opts.target_dir)?;
        let mut outcome = RestoreOutcome {
            backup_id: set.id.clone(),
            target_dir: opts.target_dir.clone(),
            target: plan.target.to_string(),
            files,
            bytes,
            wal_segments: plan.segments.len() as u64,
            wal_end: plan
                .segments
                .last()
                .map_or(pg_wal::Lsn::INVALID, |s| s.row.end_lsn),
            started_port: None,
            recovery_stop: None,
            neutralized,
            delta: None,
        };
        if let Some(start) = &opts.start {
            let major = set.pg_version_num.map(|v| v / 10000).ok_or_else(|| {
                EngineError::Failed(format!("backup {} has no PostgreSQL version", set.id))
            })?;
            progress.message(&format!(
                "starting PostgreSQL {major} on port {} and waiting for recovery",
                start.port
            ));
            let server = LocalServer {
                bin: self.pg_bin_dir(major)?,
                data_dir: opts.target_dir.clone(),
                os_user: self.os_user(),
            };
            outcome.recovery_stop = self.start_and_wait(&server, major, start, &plan.target)?;
            outcome.started_port = Some(start.port);
        }
        Ok(outcome)
    }
}

/// Writes `data` to file `rel` beneath `root` (mode 0600).
fn write_beneath(root: &Beneath, rel: &str, data: &[u8]) -> EngineResult<()> {
    let mut f = root
        .create_file(rel)
        .map_err(EngineError::io(format!("creating {rel}")))?;
    f.write_all(data)
        .map_err(EngineError::io(format!("writing {rel}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_link_planted_in_a_snapshot_fails_the_copy() {
        let base = std::env::temp_dir().join(format!("strata-snaplink-{}", std::process::id()));
        let snap = base.join("snap");
        let target = base.join("target");
        fs::create_dir_all(snap.join("base/1")).unwrap();
        fs::create_dir_all(&target).unwrap();
        symlink("/etc", snap.join("base/1/escape")).unwrap();
        let root = Beneath::open(&target).unwrap();
        let snap_root = open_dir_no_links(&snap).unwrap();
        let err = match reflink_tree(&snap, &snap_root, &root) {
            Ok(done) => panic!("copied {done:?} through a link"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("is a symbolic link"), "{err}");
        assert!(!target.join("base/1/escape").exists());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_snapshot_reached_through_a_link_is_not_opened() {
        let base = std::env::temp_dir().join(format!("strata-snapswap-{}", std::process::id()));
        let real = base.join("elsewhere");
        fs::create_dir_all(&real).unwrap();
        fs::create_dir_all(base.join("snapshots")).unwrap();
        // The set's directory swapped for a link, and a parent swapped for one.
        symlink(&real, base.join("snapshots/1796547563402")).unwrap();
        symlink(base.join("snapshots"), base.join("via-link")).unwrap();
        for path in [
            base.join("snapshots/1796547563402"),
            base.join("via-link/1796547563402"),
        ] {
            let err = open_dir_no_links(&path).expect_err("opened through a link");
            // A link as the last component fails as "not a directory".
            assert!(
                matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
                "{}: {err}",
                path.display()
            );
        }
        assert!(open_dir_no_links(&real).is_ok());
        let _ = fs::remove_dir_all(&base);
    }
}
