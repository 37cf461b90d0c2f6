//! What a path in a backup may be. Entry names come from the server's tar
//! stream when a backup is taken and from a manifest when it is restored or
//! downloaded; both are input from outside, so both pass through the checks
//! here before a name is stored or turned into a file.
//!
//! The rule: a name is a plain relative path (`base/5/16384`): not empty,
//! not absolute, no `.`, `..` or empty component (`a//b`, a trailing `/`)
//! except one leading `./` (PostgreSQL's own spelling of two directories,
//! see [`normalized`]), no NUL, at most [`MAX_PATH_LEN`] bytes with components of at most
//! [`MAX_COMPONENT_LEN`]. The only symbolic links are `pg_tblspc/<oid>` in
//! the data directory: PostgreSQL's BASE_BACKUP sends no other (basebackup.c,
//! `sendDir`: "Allow symbolic links in pg_tblspc only"; a `pg_wal` or
//! excluded directory that is a link on the source is sent as a directory
//! by `_tarWriteDir`; other links are skipped as special files), and with
//! the `TABLESPACE_MAP` option Strata asks for it sends none at all. A
//! restore never uses a link's recorded target: it points the link at the
//! restored tablespace directory itself.

use std::collections::{HashMap, HashSet};

use thiserror::Error;

use crate::manifest::{BackupManifest, FileEntry, FileKind};
use crate::{BlockRef, MAX_BLOCK_SIZE};

/// Longest path accepted (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest component accepted (Linux's NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a path or an entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    /// The path is empty.
    #[error("is empty")]
    Empty,
    /// The path starts at `/`.
    #[error("is absolute")]
    Absolute,
    /// The path has a `..` component.
    #[error("contains a `..` component")]
    ParentComponent,
    /// The path has a `.` component.
    #[error("contains a `.` component")]
    CurrentComponent,
    /// The path has an empty component.
    #[error("contains an empty component (`//` or a trailing `/`)")]
    EmptyComponent,
    /// The path holds a NUL byte.
    #[error("contains a NUL byte")]
    Nul,
    /// The path is longer than the limit.
    #[error("is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// A component is longer than the limit.
    #[error("has a component longer than {MAX_COMPONENT_LEN} bytes")]
    ComponentTooLong,
    /// A symbolic link outside `pg_tblspc/`.
    #[error("is a symbolic link outside pg_tblspc/<oid> of the data directory")]
    SymlinkOutsideTablespaces,
    /// A tablespace link for a tablespace the backup does not list.
    #[error("is a link for tablespace {0}, which the backup does not list")]
    UnknownTablespaceLink(u32),
    /// An entry of a tablespace the backup does not list.
    #[error("belongs to tablespace {0}, which the backup does not list")]
    UnknownTablespace(u32),
    /// An entry beneath a symbolic link of the backup.
    #[error("lies beneath the symbolic link {0}")]
    BeneathSymlink(String),
    /// Two entries with the same path.
    #[error("appears twice")]
    Duplicate,
    /// A block reference no backup writes: a reader would size a read or
    /// an allocation from it, or build an object key from its pack id.
    #[error("has block {index} with {why}")]
    BadBlock {
        /// Position of the block in the entry.
        index: usize,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// `path` without the one leading `./` PostgreSQL writes before a few
/// directory names (basebackup.c sends `./pg_wal/archive_status`, and from
/// PostgreSQL 17 `./pg_wal/summaries`, under those literal names).
pub fn normalized(path: &str) -> &str {
    path.strip_prefix("./").unwrap_or(path)
}

/// Checks that `path` is a plain relative path (see the module comment).
pub fn check_relative_path(path: &str) -> Result<(), PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let path = normalized(path);
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    for component in path.split('/') {
        match component {
            "" => return Err(PathError::EmptyComponent),
            "." => return Err(PathError::CurrentComponent),
            ".." => return Err(PathError::ParentComponent),
            c if c.len() > MAX_COMPONENT_LEN => return Err(PathError::ComponentTooLong),
            _ => {}
        }
    }
    Ok(())
}

/// The tablespace OID of a `pg_tblspc/<oid>` link name (the OID written as
/// PostgreSQL writes it: decimal, no sign, no leading zero).
pub fn tablespace_link_oid(path: &str) -> Option<u32> {
    let digits = path.strip_prefix("pg_tblspc/")?;
    let oid: u32 = digits.parse().ok()?;
    (oid.to_string() == digits).then_some(oid)
}

/// Checks one entry on its own: its path, and that a symbolic link is a
/// tablespace link of the data directory. Used on every entry the server
/// sends before it is stored.
pub fn check_entry(tablespace: Option<u32>, path: &str, kind: FileKind) -> Result<(), PathError> {
    check_relative_path(path)?;
    if kind == FileKind::Symlink && (tablespace.is_some() || tablespace_link_oid(path).is_none()) {
        return Err(PathError::SymlinkOutsideTablespaces);
    }
    Ok(())
}

/// Checks a block reference against what a backup can have written: a
/// pack id of 32 hex digits, lengths no larger than the largest block (plus
/// the AEAD's 40 bytes when stored), a known compression.
fn check_block(b: &BlockRef) -> Result<(), &'static str> {
    if b.pack.len() != 32
        || !b
            .pack
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err("a pack id that is not 32 lower-case hex digits");
    }
    if b.raw_len > MAX_BLOCK_SIZE {
        return Err("a raw length above the largest block size");
    }
    if b.stored_len > MAX_BLOCK_SIZE + 40 {
        return Err("a stored length above the largest block size");
    }
    if b.offset > 1 << 48 {
        return Err("an offset beyond any pack");
    }
    if b.compression > crate::pack::COMPRESSION_ZSTD {
        return Err("an unknown compression");
    }
    Ok(())
}

/// An entry refused by [`validate_manifest`], named as the manifest names it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("entry {entry} {reason}")]
pub struct EntryError {
    /// The entry's path, quoted and escaped (`"../x"`, `"a\nb"`), prefixed
    /// with its tablespace when it has one.
    pub entry: String,
    /// Why it is refused.
    pub reason: PathError,
}

impl EntryError {
    fn new(f: &FileEntry, reason: PathError) -> Self {
        let entry = match f.tablespace {
            Some(oid) => format!("{:?} of tablespace {oid}", f.path),
            None => format!("{:?}", f.path),
        };
        EntryError { entry, reason }
    }
}

/// Checks every entry of a manifest (files and the server's manifest) as
/// [`check_entry`] does, its block references, and across entries: each tablespace is listed,
/// each tablespace link names a listed tablespace, no entry lies beneath a
/// link, no path appears twice.
pub fn validate_manifest(m: &BackupManifest) -> Result<(), EntryError> {
    let listed: HashSet<u32> = m.tablespaces.iter().map(|t| t.oid).collect();
    let mut seen: HashSet<(Option<u32>, &str)> = HashSet::new();
    let mut links: HashMap<&str, &FileEntry> = HashMap::new();
    for f in m.all_files() {
        check_entry(f.tablespace, &f.path, f.kind).map_err(|e| EntryError::new(f, e))?;
        for (index, b) in f.blocks.iter().enumerate() {
            check_block(b).map_err(|why| EntryError::new(f, PathError::BadBlock { index, why }))?;
        }
        if let Some(oid) = f.tablespace.filter(|o| !listed.contains(o)) {
            return Err(EntryError::new(f, PathError::UnknownTablespace(oid)));
        }
        if f.kind == FileKind::Symlink {
            let oid = tablespace_link_oid(&f.path).unwrap_or_default();
            if !listed.contains(&oid) {
                return Err(EntryError::new(f, PathError::UnknownTablespaceLink(oid)));
            }
            links.insert(&f.path, f);
        }
        if !seen.insert((f.tablespace, normalized(&f.path))) {
            return Err(EntryError::new(f, PathError::Duplicate));
        }
    }
    // A second pass: a link may come after the entries beneath it.
    for f in m.all_files().filter(|f| f.tablespace.is_none()) {
        let mut prefix = normalized(&f.path);
        while let Some((parent, _)) = prefix.rsplit_once('/') {
            if links.contains_key(parent) {
                return Err(EntryError::new(
                    f,
                    PathError::BeneathSymlink(parent.to_string()),
                ));
            }
            prefix = parent;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::TablespaceEntry;

    #[test]
    fn plain_relative_paths_pass() {
        for ok in [
            "PG_VERSION",
            "base/5/16384",
            "base/5/16384.1",
            "pg_wal",
            "..x",
            "x..",
            ".hidden",
            "a b/ü",
            "INCREMENTAL.16384",
            "./pg_wal/archive_status",
        ] {
            assert_eq!(check_relative_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        let long_component = "x".repeat(256);
        let long_path = vec!["x"; 2100].join("/");
        for (bad, why) in [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("/", PathError::Absolute),
            ("..", PathError::ParentComponent),
            ("../x", PathError::ParentComponent),
            ("base/../../x", PathError::ParentComponent),
            ("base/..", PathError::ParentComponent),
            (".", PathError::CurrentComponent),
            ("././base", PathError::CurrentComponent),
            ("./", PathError::Empty),
            ("base/./x", PathError::CurrentComponent),
            ("base//x", PathError::EmptyComponent),
            ("base/", PathError::EmptyComponent),
            ("a\0b", PathError::Nul),
            (long_component.as_str(), PathError::ComponentTooLong),
            (long_path.as_str(), PathError::TooLong),
        ] {
            assert_eq!(check_relative_path(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn symlinks_only_as_tablespace_links() {
        assert_eq!(
            check_entry(None, "pg_tblspc/16384", FileKind::Symlink),
            Ok(())
        );
        for (ts, bad) in [
            (None, "base/evil"),
            (None, "pg_wal"),
            (None, "pg_tblspc/016384"),
            (None, "pg_tblspc/+1"),
            (None, "pg_tblspc/99999999999"),
            (None, "pg_tblspc/1/x"),
            (None, "pg_tblspc"),
            (Some(16384), "pg_tblspc/16384"),
        ] {
            assert_eq!(
                check_entry(ts, bad, FileKind::Symlink),
                Err(PathError::SymlinkOutsideTablespaces),
                "{bad}"
            );
        }
        assert_eq!(check_entry(None, "base/evil", FileKind::File), Ok(()));
    }

    fn entry(tablespace: Option<u32>, path: &str, kind: FileKind) -> FileEntry {
        FileEntry {
            tablespace,
            path: path.into(),
            kind,
            mode: 0o600,
            size: 0,
            mtime: 0,
            link_target: (kind == FileKind::Symlink).then(|| "/anywhere".into()),
            crc32c: None,
            blocks: Vec::new(),
        }
    }

    fn manifest(files: Vec<FileEntry>) -> BackupManifest {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "backup_id": "b", "instance_id": "i",
            "system_identifier": "1", "pg_version_num": 150000,
            "wal_segment_size": 16777216, "label": "l",
            "start_lsn": "0/2000028", "start_timeline": 1,
            "stop_lsn": "0/2000100", "stop_timeline": 1,
            "start_time": "2026-01-01T00:00:00Z", "stop_time": "2026-01-01T00:00:01Z",
            "tablespaces": [TablespaceEntry { oid: 16384, location: "/srv/ts".into() }],
            "files": files, "server_manifest": null, "stats": {
                "file_count": 0, "total_bytes": 0, "new_bytes": 0, "dedup_bytes": 0,
                "stored_bytes": 0, "new_blocks": 0, "dedup_blocks": 0, "packs": 0}
        }))
        .expect("a manifest")
    }

    #[test]
    fn manifests_are_checked_across_entries() {
        let good = manifest(vec![
            entry(None, "base", FileKind::Dir),
            entry(None, "base/1", FileKind::File),
            entry(None, "pg_tblspc/16384", FileKind::Symlink),
            entry(Some(16384), "PG_15_202209061/5/1", FileKind::File),
        ]);
        assert_eq!(validate_manifest(&good), Ok(()));

        let refused = |files: Vec<FileEntry>| validate_manifest(&manifest(files)).unwrap_err();
        let e = refused(vec![entry(None, "../../x", FileKind::File)]);
        assert_eq!(e.reason, PathError::ParentComponent);
        assert_eq!(e.to_string(), "entry \"../../x\" contains a `..` component");
        let e = refused(vec![entry(None, "pg_tblspc/9999", FileKind::Symlink)]);
        assert_eq!(e.reason, PathError::UnknownTablespaceLink(9999));
        let e = refused(vec![
            entry(None, "pg_tblspc/16384/x", FileKind::File),
            entry(None, "pg_tblspc/16384", FileKind::Symlink),
        ]);
        assert_eq!(
            e.reason,
            PathError::BeneathSymlink("pg_tblspc/16384".into())
        );
        assert_eq!(e.entry, "\"pg_tblspc/16384/x\"");
        let e = refused(vec![
            entry(None, "pg_tblspc/16384", FileKind::Symlink),
            entry(None, "./pg_tblspc/16384/x", FileKind::File),
        ]);
        assert_eq!(
            e.reason,
            PathError::BeneathSymlink("pg_tblspc/16384".into())
        );
        let e = refused(vec![
            entry(None, "pg_wal", FileKind::Dir),
            entry(None, "./pg_wal", FileKind::Dir),
        ]);
        assert_eq!(e.reason, PathError::Duplicate);
        let e = refused(vec![entry(Some(7), "x", FileKind::File)]);
        assert_eq!(e.reason, PathError::UnknownTablespace(7));
        assert_eq!(e.entry, "\"x\" of tablespace 7");
        let e = refused(vec![
            entry(None, "x", FileKind::Dir),
            entry(None, "x", FileKind::File),
        ]);
        assert_eq!(e.reason, PathError::Duplicate);
        let mut forged = entry(None, "base/1", FileKind::File);
        forged.blocks.push(crate::BlockRef {
            hash: crate::BlockHash([0; 32]),
            pack: "../../../etc/passwd".into(),
            offset: 0,
            stored_len: 1,
            raw_len: 1,
            compression: 0,
        });
        let e = refused(vec![forged.clone()]);
        assert!(
            matches!(e.reason, PathError::BadBlock { index: 0, .. }),
            "{e}"
        );
        forged.blocks[0].pack = "0123456789abcdef0123456789abcdef".into();
        forged.blocks[0].raw_len = u32::MAX;
        assert!(matches!(
            refused(vec![forged]).reason,
            PathError::BadBlock { .. }
        ));
        let e = refused(vec![entry(None, "a\nb/../c", FileKind::File)]);
        assert_eq!(e.entry, "\"a\\nb/../c\"");
    }
}
