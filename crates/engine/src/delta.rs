//! Delta restore (`strata restore --delta`): a backup restored over a data
//! directory of the same instance that is already there, writing only what
//! differs. Each regular file of the backup that exists is compared block by
//! block with the manifest: a block is read from the disk and hashed with
//! the repository's keyed BLAKE3, and only blocks whose hash differs are
//! read from the repository and written in place; the file is then cut to
//! the backup's length. Files the directory lacks are written whole, and
//! everything the backup does not list is removed, so the directory ends up
//! as a restore into an empty one would have left it (the WAL recovery
//! needs and the recovery settings are then written as any restore writes
//! them).
//!
//! The directory was not created by Strata, so nothing in it is trusted:
//! every entry is listed, opened, renamed and removed relative to its
//! directory's handle without following a link ([`Beneath`]); a link where
//! the backup has a file or directory is removed as a link, its target left
//! alone. For the duration the directory belongs to the user Strata runs as
//! (mode 0700), so its usual owner cannot plant links while it is worked on.
//!
//! While it runs, `global/pg_control` is moved aside to
//! `global/pg_control.strata-delta` ([`DELTA_MARKER`]): PostgreSQL refuses to
//! start a directory without pg_control, so a delta restore that fails half
//! way leaves a directory nobody can start as if it were consistent. The
//! backup's pg_control is written last, after everything else is durable,
//! and the marker removed. A delta restore run again over such a directory
//! takes the system identifier from the marker.
//!
//! Reference: src/include/catalog/pg_control.h (the system identifier is
//! pg_control's first field), src/backend/utils/init/miscinit.c (the lines
//! of postmaster.pid).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use strata_repo::{BackupManifest, FileEntry, FileKind};

use crate::beneath::{Beneath, EntryKind};
use crate::{EngineError, EngineResult};

/// pg_control, where PostgreSQL reads it.
pub(crate) const CONTROL_FILE: &str = "global/pg_control";

/// pg_control of the directory while a delta restore works on it.
pub(crate) const DELTA_MARKER: &str = "global/pg_control.strata-delta";

/// The most of pg_control read (it is 8 KiB: PG_CONTROL_FILE_SIZE).
const CONTROL_MAX: u64 = 64 * 1024;

/// What a delta restore did to the directory.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeltaReport {
    /// Files found with every block as in the backup, left as they were.
    pub files_unchanged: u64,
    /// Files found with some blocks (or their length) different, patched.
    pub files_patched: u64,
    /// Files missing (or not regular files), written whole.
    pub files_written: u64,
    /// Blocks found as in the backup, not written.
    pub blocks_reused: u64,
    /// Blocks read from the repository and written.
    pub blocks_written: u64,
    /// Bytes of file data written (the staged WAL and the recovery
    /// settings, written as by any restore, are not counted).
    pub bytes_written: u64,
    /// Entries the backup does not have, removed (a directory counts with
    /// everything in it).
    pub removed: u64,
}

impl DeltaReport {
    pub(crate) fn add(&mut self, other: &DeltaReport) {
        self.files_unchanged += other.files_unchanged;
        self.files_patched += other.files_patched;
        self.files_written += other.files_written;
        self.blocks_reused += other.blocks_reused;
        self.blocks_written += other.blocks_written;
        self.bytes_written += other.bytes_written;
        self.removed += other.removed;
    }
}

/// Checks that `dir` holds a data directory no server runs in; returns the
/// system identifier its pg_control (or the marker of an interrupted delta
/// restore) names.
pub(crate) fn check_target(dir: &Path) -> EngineResult<u64> {
    let not_data_dir = |why: &str| {
        EngineError::Refused(format!(
            "{} is not a PostgreSQL data directory ({why}); --delta restores over an existing data directory of the same instance, a restore without it into an empty one",
            dir.display()
        ))
    };
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(not_data_dir("not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_data_dir("it does not exist"))
        }
        Err(e) => return Err(EngineError::io(format!("reading {}", dir.display()))(e)),
    }
    let root = Beneath::open(dir).map_err(EngineError::io(format!("opening {}", dir.display())))?;
    let read = |rel: &str| {
        root.read_existing(rel, CONTROL_MAX)
            .map_err(EngineError::io(format!(
                "reading {}",
                dir.join(rel).display()
            )))
    };
    // Whatever it is (a link is replaced like any entry of the wrong kind).
    match root.kind(OsStr::new("PG_VERSION")) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_data_dir("no PG_VERSION"))
        }
        Err(e) => {
            return Err(EngineError::io(format!(
                "reading {}",
                dir.join("PG_VERSION").display()
            ))(e))
        }
    }
    if let Some(pid) =
        read("postmaster.pid")?.and_then(|t| crate::local_server::live_postmaster(&t))
    {
        return Err(EngineError::Refused(format!(
            "a server is running in {} (postmaster.pid names process {pid}); stop it first (or remove a stale postmaster.pid)",
            dir.display()
        )));
    }
    let control = match read(CONTROL_FILE)? {
        Some(c) => c,
        None => read(DELTA_MARKER)?.ok_or_else(|| not_data_dir("no global/pg_control"))?,
    };
    system_identifier(&control).ok_or_else(|| not_data_dir("global/pg_control is too short"))
}

/// pg_control's first field: the 64-bit system identifier, in the byte
/// order of the machine that wrote it (this one).
fn system_identifier(control: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(control.get(0..8)?.try_into().ok()?))
}

/// Refuses a backup of another cluster than the one in the directory.
pub(crate) fn check_same_system(
    dir: &Path,
    found: u64,
    manifest: &BackupManifest,
) -> EngineResult<()> {
    if found != manifest.system_identifier {
        return Err(EngineError::Refused(format!(
            "{} holds the cluster with system identifier {found}, backup {} is of system identifier {}: a delta restore only goes over a data directory of the same cluster (restore without --delta into an empty directory)",
            dir.display(),
            manifest.backup_id,
            manifest.system_identifier
        )));
    }
    Ok(())
}

/// Makes `dir` the restoring user's alone (0700) until the restore hands it
/// over: its owner can no longer reach inside to swap an entry for a link.
pub(crate) fn take_over(dir: &Path) -> EngineResult<()> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .map_err(EngineError::io(format!("taking over {}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(EngineError::io(format!(
        "setting mode of {}",
        dir.display()
    )))
}

/// Moves pg_control aside (see the module comment); an interrupted delta
/// restore already did.
pub(crate) fn set_marker(root: &Beneath, dir: &Path) -> EngineResult<()> {
    match root.rename(CONTROL_FILE, DELTA_MARKER) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(EngineError::io(format!(
                "moving {} aside",
                dir.join(CONTROL_FILE).display()
            ))(e))
        }
    }
    root.sub(OsStr::new("global"))
        .and_then(|g| g.sync())
        .map_err(EngineError::io(format!(
            "syncing {}",
            dir.join("global").display()
        )))
}

/// Whether the marker of an unfinished delta restore is in `dir`.
pub(crate) fn marker_present(dir: &Path) -> bool {
    fs::symlink_metadata(dir.join(DELTA_MARKER)).is_ok()
}

/// Writes the backup's pg_control (`control`), durable, then removes the
/// marker: from here on the directory is what the restore made it.
pub(crate) fn install_control(
    dir: &Path,
    control: &[u8],
    mode: u32,
    owner: Option<&str>,
) -> EngineResult<()> {
    let io = |what: &str| EngineError::io(format!("{what} {}", dir.join(CONTROL_FILE).display()));
    let root = Beneath::open(dir).map_err(io("opening the directory of"))?;
    let mut file = root.create_file(CONTROL_FILE).map_err(io("writing"))?;
    file.write_all(control).map_err(io("writing"))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("setting mode of"))?;
    if let Some(user) = owner {
        let (uid, gid) = crate::restore::user_ids(user)?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io("changing owner of"))?;
    }
    file.sync_all().map_err(io("syncing"))?;
    let global = root.sub(OsStr::new("global")).map_err(io("opening"))?;
    global.sync().map_err(io("syncing the directory of"))?;
    root.remove_existing(DELTA_MARKER)
        .map_err(io("removing the marker beside"))?;
    global.sync().map_err(io("syncing the directory of"))
}

/// What the backup has at each path of one restore root.
#[derive(Debug, Default)]
pub(crate) struct Expected {
    entries: HashMap<String, Expect>,
}

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Dir,
    File,
    /// A tablespace link, pointing where the restore points it.
    Link(PathBuf),
}

impl Expected {
    /// The entries of `manifest` in tablespace `tablespace` (`None`: the
    /// data directory), their parent directories included; `link_to`
    /// tells where each tablespace link of the restore points.
    pub(crate) fn of(
        manifest: &BackupManifest,
        tablespace: Option<u32>,
        link_to: impl Fn(&FileEntry) -> EngineResult<PathBuf>,
    ) -> EngineResult<Expected> {
        let mut entries = HashMap::new();
        for f in manifest.all_files().filter(|f| f.tablespace == tablespace) {
            let path = strata_repo::paths::normalized(&f.path).to_string();
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                entries.entry(p.to_string()).or_insert(Expect::Dir);
                parent = p;
            }
            let expect = match f.kind {
                FileKind::Dir => Expect::Dir,
                FileKind::File => Expect::File,
                FileKind::Symlink => Expect::Link(link_to(f)?),
            };
            entries.insert(path, expect);
        }
        if tablespace.is_none() {
            // The marker stays until the restore's pg_control is in place.
            entries.insert(DELTA_MARKER.to_string(), Expect::File);
        }
        Ok(Expected { entries })
    }
}

/// Removes every entry beneath `root` the backup does not have (or has as
/// another kind of entry, or a link pointing elsewhere); returns how many
/// went. Nothing is followed: a link is unlinked, never entered.
pub(crate) fn remove_extra(root: &Beneath, expected: &Expected) -> std::io::Result<u64> {
    remove_extra_in(root, "", expected)
}

fn remove_extra_in(dir: &Beneath, prefix: &str, expected: &Expected) -> std::io::Result<u64> {
    let mut removed = 0;
    for (name, kind) in dir.list()? {
        let rel = name
            .to_str()
            .map(|n| match prefix {
                "" => n.to_string(),
                p => format!("{p}/{n}"),
            })
            .unwrap_or_default();
        let keep = match (expected.entries.get(&rel), kind) {
            (Some(Expect::Dir), EntryKind::Dir) => {
                removed += remove_extra_in(&dir.sub(&name)?, &rel, expected)?;
                true
            }
            (Some(Expect::File), EntryKind::File) => true,
            (Some(Expect::Link(to)), EntryKind::Symlink) => dir.read_link(&name)? == *to,
            _ => false,
        };
        if !keep {
            removed += dir.remove(&name, kind)?;
        }
    }
    Ok(removed)
}

/// Compares existing file `f` with the backup block by block and writes
/// the blocks that differ (read from the repository) in place, then cuts it
/// to the backup's length. `None` when the file is not there.
pub(crate) fn patch_file(
    repo: &strata_repo::Repository,
    f: &FileEntry,
    file: &File,
    shown: &Path,
) -> EngineResult<DeltaReport> {
    let io = |what: &str| EngineError::io(format!("{what} {}", shown.display()));
    let meta = file.metadata().map_err(io("reading"))?;
    let on_disk = meta.len();
    let mut offsets = Vec::with_capacity(f.blocks.len());
    let mut at = 0u64;
    for b in &f.blocks {
        offsets.push(at);
        at += b.raw_len as u64;
    }
    if at != f.size {
        return Err(EngineError::Failed(format!(
            "{}: its blocks add up to {at} bytes, the backup lists {}; the manifest is damaged (run `strata repo verify`)",
            f.path, f.size
        )));
    }
    let mut buf = Vec::new();
    // The blocks that differ, and where each goes.
    let mut differ = Vec::new();
    let mut differ_at = Vec::new();
    for (b, &offset) in f.blocks.iter().zip(&offsets) {
        let len = b.raw_len as u64;
        let same = offset + len <= on_disk && {
            buf.resize(len as usize, 0);
            file.read_exact_at(&mut buf, offset)
                .map_err(io("reading"))?;
            repo.hasher().hash(&buf) == b.hash
        };
        if !same {
            differ.push(b.clone());
            differ_at.push(offset);
        }
    }
    let mut report = DeltaReport {
        blocks_reused: (f.blocks.len() - differ.len()) as u64,
        blocks_written: differ.len() as u64,
        ..Default::default()
    };
    let mut at = differ_at.into_iter();
    repo.read_blocks(&differ, |data| {
        let offset = at.next().ok_or_else(|| {
            EngineError::Failed(format!("{}: more blocks read than asked for", f.path))
        })?;
        report.bytes_written += data.len() as u64;
        file.write_all_at(&data, offset).map_err(io("writing"))
    })?;
    if on_disk != f.size {
        file.set_len(f.size).map_err(io("setting the length of"))?;
    }
    if differ.is_empty() && on_disk == f.size {
        report.files_unchanged = 1;
    } else {
        report.files_patched = 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// What the backup has: `base/5/1`, `PG_VERSION`, an empty `pg_wal`
    /// and a tablespace link to `link_to`.
    fn expected(link_to: &Path) -> Expected {
        let mut entries = HashMap::new();
        for d in ["base", "base/5", "pg_wal", "pg_tblspc"] {
            entries.insert(d.to_string(), Expect::Dir);
        }
        for f in ["base/5/1", "PG_VERSION"] {
            entries.insert(f.to_string(), Expect::File);
        }
        entries.insert(
            "pg_tblspc/16384".to_string(),
            Expect::Link(link_to.to_path_buf()),
        );
        Expected { entries }
    }

    #[test]
    fn what_the_backup_does_not_have_goes_without_following_links() {
        let target = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let t = target.path();
        let o = outside.path();
        fs::write(o.join("victim"), b"keep").unwrap();
        fs::create_dir(o.join("dir")).unwrap();
        fs::write(o.join("dir/f"), b"keep").unwrap();
        fs::create_dir_all(t.join("base/5")).unwrap();
        fs::write(t.join("base/5/1"), b"data").unwrap();
        fs::write(t.join("base/5/2"), b"not in the backup").unwrap();
        // Where a file belongs, a link to a file outside.
        symlink(o.join("victim"), t.join("PG_VERSION")).unwrap();
        // Where a directory belongs, a link to a directory outside.
        symlink(o.join("dir"), t.join("pg_wal")).unwrap();
        fs::create_dir_all(t.join("pg_tblspc")).unwrap();
        symlink(o.join("ts"), t.join("pg_tblspc/16384")).unwrap();
        symlink(o.join("dir"), t.join("pg_tblspc/16390")).unwrap();
        fs::create_dir_all(t.join("log/old")).unwrap();
        fs::write(t.join("log/old/server.log"), b"x").unwrap();
        symlink(o.join("dir"), t.join("log/old/into")).unwrap();

        let root = Beneath::open(t).unwrap();
        let removed = remove_extra(&root, &expected(&o.join("ts"))).unwrap();
        let mut left: Vec<_> = walk(t);
        left.sort();
        assert_eq!(
            left,
            ["base", "base/5", "base/5/1", "pg_tblspc", "pg_tblspc/16384"]
        );
        // base/5/2, PG_VERSION, pg_wal, pg_tblspc/16390, log (with old,
        // server.log and into).
        assert_eq!(removed, 8);
        assert_eq!(fs::read(o.join("victim")).unwrap(), b"keep");
        assert_eq!(fs::read(o.join("dir/f")).unwrap(), b"keep");

        // A link pointing elsewhere than the restore points it goes too.
        let removed = remove_extra(&root, &expected(&o.join("other"))).unwrap();
        assert_eq!(removed, 1);
        assert!(fs::symlink_metadata(t.join("pg_tblspc/16384")).is_err());
    }

    /// Paths below `dir`, relative, links not followed.
    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        out
    }

    #[test]
    fn the_system_identifier_is_pg_controls_first_field() {
        let mut control = vec![0u8; 8192];
        control[..8].copy_from_slice(&7_400_000_000_000_000_123u64.to_ne_bytes());
        assert_eq!(system_identifier(&control), Some(7_400_000_000_000_000_123));
        assert_eq!(system_identifier(&control[..7]), None);
    }
}
