//! The backup manifest: the commit point of a backup set. It lists every file
//! of the data directory (and of each tablespace) as a list of block
//! references, plus the facts recovery needs (label, LSNs, timeline, version).
//! A backup exists exactly when its manifest exists.

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};

use crate::{BackupId, BlockRef, InstanceId};

/// Version of the manifest format this build writes.
pub const MANIFEST_VERSION: u32 = 1;

/// What a committed backup set holds: where it starts and stops in WAL, and every file with its blocks. Its presence in the repository is what makes the set exist.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupManifest {
    /// Manifest format version ([`MANIFEST_VERSION`]).
    pub format_version: u32,
    /// Backup id.
    pub backup_id: BackupId,
    /// Instance the backup was taken from.
    pub instance_id: InstanceId,
    /// Serialized as a string: 64-bit identifiers lose precision in many JSON readers.
    #[serde(with = "u64_string")]
    pub system_identifier: u64,
    /// `server_version_num` of the server.
    pub pg_version_num: u32,
    /// WAL segment size of the server, bytes.
    pub wal_segment_size: u64,
    /// Backup label sent with BASE_BACKUP.
    pub label: String,
    /// "Manual" or "Automated".
    #[serde(default)]
    pub mode: String,
    /// LSN the backup starts at (its checkpoint's redo point).
    pub start_lsn: Lsn,
    /// Timeline at the start LSN.
    pub start_timeline: TimelineId,
    /// LSN a restore must replay to for the backup to be consistent.
    pub stop_lsn: Lsn,
    /// Timeline at the stop LSN.
    pub stop_timeline: TimelineId,
    /// When the backup started.
    pub start_time: DateTime<Utc>,
    /// When the backup ended.
    pub stop_time: DateTime<Utc>,
    /// Tablespaces of the server, with their locations.
    pub tablespaces: Vec<TablespaceEntry>,
    /// Every file, directory and link of the data directory and tablespaces.
    pub files: Vec<FileEntry>,
    /// The server's own backup_manifest, kept byte for byte (pg_verifybackup reads it);
    /// for a block-level incremental transfer, rewritten to list the whole files stored.
    pub server_manifest: Option<FileEntry>,
    /// The backup whose unchanged blocks this one took by reference when the server
    /// sent only changed blocks (PostgreSQL 17+). The files listed are whole either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<BackupId>,
    /// Bytes the server sent for the files (less than their total when incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<u64>,
    /// What the backup wrote.
    pub stats: BackupStats,
    /// The databases and tables the server listed while the backup ran;
    /// absent for sets taken before Strata recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contents: Option<BackupContents>,
}

/// The databases of a backup set and each one's tables, as the server
/// listed them over SQL sessions once the backup's files were received
/// (`pg_database`, `pg_class`): what a restore of the set can offer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupContents {
    /// When the server was read.
    pub read_at: DateTime<Utc>,
    /// Every database that is not a template, by name.
    pub databases: Vec<DatabaseContents>,
}

/// One database of a backup set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatabaseContents {
    /// `pg_database.oid`.
    pub oid: u32,
    /// Database name.
    pub name: String,
    /// `pg_database_size`, when the role could read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Its tables, by schema and name; absent when the database could not
    /// be read (it refuses connections, or the role may not connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<TableContents>>,
    /// More tables than a set records: the list holds the first ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// One table of a database in a backup set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableContents {
    /// `pg_class.oid`.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `pg_class.relkind`: `r` table, `p` partitioned table, `m`
    /// materialized view, `f` foreign table.
    pub kind: String,
    /// `pg_total_relation_size`: the table with its indexes and TOAST.
    pub size: u64,
}

/// A tablespace of the backed-up server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TablespaceEntry {
    /// Tablespace OID (`pg_tblspc/<oid>`).
    pub oid: u32,
    /// Location on the server.
    pub location: String,
}

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// One file, directory or link of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Tablespace OID, or None for the main data directory.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tablespace: Option<u32>,
    /// Path relative to the data directory or tablespace root.
    pub path: String,
    /// File, directory or link.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (0 for directories and links).
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Where a symbolic link points.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub link_target: Option<String>,
    /// CRC-32C of the whole file, as the server's backup_manifest records it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crc32c: Option<u32>,
    /// The file's blocks, in order.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub blocks: Vec<BlockRef>,
}

/// What a backup wrote, and how much of it was new.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupStats {
    /// Files, directories and links in the backup.
    pub file_count: u64,
    /// Bytes of file data in the backup (what a restore writes).
    pub total_bytes: u64,
    /// Raw bytes of blocks this backup added to the repository.
    pub new_bytes: u64,
    /// Raw bytes of blocks that were already stored.
    pub dedup_bytes: u64,
    /// Compressed bytes this backup added to the repository.
    pub stored_bytes: u64,
    /// Blocks this backup added.
    pub new_blocks: u64,
    /// Blocks that were already stored.
    pub dedup_blocks: u64,
    /// Packs this backup wrote.
    pub packs: u64,
}

impl BackupManifest {
    /// The backup's files and then the server's `backup_manifest`.
    pub fn all_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().chain(self.server_manifest.iter())
    }

    /// Checks every entry's name and kind (see [`crate::paths`]).
    pub fn validate(&self) -> Result<(), crate::paths::EntryError> {
        crate::paths::validate_manifest(self)
    }
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// For the crate's unit tests: the manifest of backup `id` of `instance`
/// holding one file, `base/1/1`, of `size` bytes made of `blocks`.
#[cfg(test)]
pub(crate) fn one_file_manifest(
    instance: &str,
    id: &str,
    blocks: Vec<BlockRef>,
    size: u64,
) -> BackupManifest {
    let mut m: BackupManifest = serde_json::from_value(serde_json::json!({
        "format_version": 1, "backup_id": id, "instance_id": instance, "mode": "Manual",
        "system_identifier": "1", "pg_version_num": 150000, "wal_segment_size": 16777216,
        "label": "t", "start_lsn": "0/2000028", "start_timeline": 1, "stop_lsn": "0/2000100",
        "stop_timeline": 1, "start_time": Utc::now(), "stop_time": Utc::now(),
        "tablespaces": [], "files": [], "server_manifest": null,
        "stats": {"file_count": 1, "total_bytes": size, "new_bytes": 0, "dedup_bytes": 0,
                  "stored_bytes": 0, "new_blocks": 0, "dedup_blocks": 0, "packs": 0}
    }))
    .unwrap();
    m.files.push(FileEntry {
        tablespace: None,
        path: "base/1/1".into(),
        kind: FileKind::File,
        mode: 0o600,
        size,
        mtime: 0,
        link_target: None,
        crc32c: None,
        blocks,
    });
    m
}
