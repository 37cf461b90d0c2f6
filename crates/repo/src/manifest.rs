//! The backup manifest: the commit point of a backup set. It lists every file
//! of the data directory (and of each tablespace) as a list of block
//! references, plus the facts recovery needs (label, LSNs, timeline, version).
//! A backup exists exactly when its manifest exists.

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};

use crate::BlockRef;

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackupManifest {
    pub format_version: u32,
    pub backup_id: String,
    pub instance_id: String,
    /// Serialized as a string: 64-bit identifiers lose precision in many JSON readers.
    #[serde(with = "u64_string")]
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
    pub label: String,
    /// "Manual" or "Automated".
    #[serde(default)]
    pub mode: String,
    pub start_lsn: Lsn,
    pub start_timeline: TimelineId,
    pub stop_lsn: Lsn,
    pub stop_timeline: TimelineId,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub tablespaces: Vec<TablespaceEntry>,
    pub files: Vec<FileEntry>,
    /// The server's own backup_manifest, kept byte for byte (pg_verifybackup reads it);
    /// for a block-level incremental transfer, rewritten to list the whole files stored.
    pub server_manifest: Option<FileEntry>,
    /// The backup whose unchanged blocks this one took by reference when the server
    /// sent only changed blocks (PostgreSQL 17+). The files listed are whole either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_from: Option<String>,
    /// Bytes the server sent for the files (less than their total when incremental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<u64>,
    pub stats: BackupStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TablespaceEntry {
    pub oid: u32,
    pub location: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Tablespace OID, or None for the main data directory.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tablespace: Option<u32>,
    pub path: String,
    pub kind: FileKind,
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub link_target: Option<String>,
    /// CRC-32C of the whole file, as the server's backup_manifest records it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crc32c: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub blocks: Vec<BlockRef>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupStats {
    pub file_count: u64,
    /// Bytes of file data in the backup (what a restore writes).
    pub total_bytes: u64,
    /// Raw bytes of blocks this backup added to the repository.
    pub new_bytes: u64,
    /// Raw bytes of blocks that were already stored.
    pub dedup_bytes: u64,
    /// Compressed bytes this backup added to the repository.
    pub stored_bytes: u64,
    pub new_blocks: u64,
    pub dedup_blocks: u64,
    pub packs: u64,
}

impl BackupManifest {
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
