//! WAL segments and timeline history files as sealed objects.
//!
//! A segment is stored whole once complete; while it is being written the
//! archiver refreshes a `.partial` object holding its valid prefix so the
//! recovery point is seconds old, and deletes that object once the complete
//! segment is stored. Each object carries what was decoded from its records
//! (commit timestamps, restore points) so time targets can be resolved
//! without reading WAL.

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};

use crate::object::{open, seal, seal_compressed, ObjectKind};
use crate::{RepoError, RepoResult, Repository, StorageError};

/// A named restore point found in a WAL segment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestorePointInfo {
    /// The name given to `pg_create_restore_point`.
    pub name: String,
    /// End of the restore point record: where recovery to it stops.
    pub lsn: Lsn,
    /// Time the record was written.
    pub time: DateTime<Utc>,
}

/// What a WAL object records about its segment (stored in the sealed object's metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WalSegmentMeta {
    /// Timeline of the segment.
    pub timeline: TimelineId,
    /// The 24-character segment file name.
    pub segment: String,
    /// First LSN stored.
    pub begin_lsn: Lsn,
    /// End of the bytes stored (exclusive): the segment end when complete.
    pub end_lsn: Lsn,
    /// True for the `.partial` object of a segment still being received.
    pub partial: bool,
    /// Keyed BLAKE3 of the raw segment bytes stored, hex.
    pub checksum: String,
    /// Time of the first commit record.
    pub first_commit: Option<DateTime<Utc>>,
    /// Time of the last commit record.
    pub last_commit: Option<DateTime<Utc>>,
    /// Commit records in the segment.
    pub commit_count: u64,
    /// Smallest xid that committed in the segment.
    pub min_commit_xid: Option<u32>,
    /// Largest xid that committed in the segment.
    pub max_commit_xid: Option<u32>,
    /// Restore points created in the segment.
    #[serde(default)]
    pub restore_points: Vec<RestorePointInfo>,
    /// When the object was stored.
    pub stored_at: DateTime<Utc>,
}

/// The prefix of a segment being received, kept ready to store as a
/// partial object: its keyed checksum and its zstd frames are extended with
/// each new piece and never recomputed, so refreshing the partial object
/// often costs only the bytes received since the last refresh.
pub struct WalPayload {
    checksum: blake3::Hasher,
    frames: Vec<u8>,
    len: usize,
    level: i32,
}

impl WalPayload {
    /// Appends `data` as one more zstd frame.
    pub fn extend(&mut self, data: &[u8]) -> RepoResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        let frame =
            zstd::bulk::compress(data, self.level).map_err(|e| RepoError::Format(e.to_string()))?;
        self.frames.extend_from_slice(&frame);
        self.checksum.update(data);
        self.len += data.len();
        Ok(())
    }

    /// Raw bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keyed checksum of the raw bytes held, as [`Repository::wal_checksum`] gives it.
    pub fn checksum(&self) -> String {
        hex::encode(self.checksum.finalize().as_bytes())
    }
}

/// A WAL object as found by listing (nothing read yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    /// Object key.
    pub key: String,
    /// Timeline, from the key.
    pub timeline: TimelineId,
    /// Segment file name, from the key.
    pub segment: String,
    /// True for a `.partial` object.
    pub partial: bool,
}

fn wal_prefix(instance_id: &str) -> String {
    format!("instances/{instance_id}/wal")
}

/// Key of a WAL object.
pub fn wal_segment_key(instance_id: &str, tli: TimelineId, segment: &str, partial: bool) -> String {
    let suffix = if partial { ".partial" } else { "" };
    format!(
        "{}/{:08X}/{segment}{suffix}",
        wal_prefix(instance_id),
        tli.0
    )
}

/// Key of a timeline history object.
pub fn history_key(instance_id: &str, tli: TimelineId) -> String {
    format!("{}/{:08X}.history", wal_prefix(instance_id), tli.0)
}

impl Repository {
    /// Stores a segment (or a partial one). Storing a complete segment
    /// removes its partial object.
    pub fn put_wal_segment(
        &self,
        instance_id: &str,
        meta: &WalSegmentMeta,
        data: &[u8],
    ) -> RepoResult<String> {
        let key = wal_segment_key(instance_id, meta.timeline, &meta.segment, meta.partial);
        let bytes = seal(
            &self.keys,
            ObjectKind::WalSegment,
            meta,
            data,
            Some(self.compress_level),
        )?;
        self.storage.put(&key, &bytes)?;
        if !meta.partial {
            self.storage.delete(&wal_segment_key(
                instance_id,
                meta.timeline,
                &meta.segment,
                true,
            ))?;
        }
        Ok(key)
    }

    /// An empty [`WalPayload`] for the segment being received.
    pub fn wal_payload(&self) -> WalPayload {
        WalPayload {
            checksum: self.keys.hasher.incremental(),
            frames: Vec::new(),
            len: 0,
            level: self.compress_level,
        }
    }

    /// Stores a (partial) segment whose bytes were gathered in `payload`;
    /// `meta.checksum` must be [`WalPayload::checksum`]. Costs no
    /// compression: the payload's frames are written as they are.
    pub fn put_wal_payload(
        &self,
        instance_id: &str,
        meta: &WalSegmentMeta,
        payload: &WalPayload,
    ) -> RepoResult<String> {
        let key = wal_segment_key(instance_id, meta.timeline, &meta.segment, meta.partial);
        let bytes = seal_compressed(&self.keys, ObjectKind::WalSegment, meta, &payload.frames)?;
        self.storage.put(&key, &bytes)?;
        Ok(key)
    }

    /// The checksum recorded in [`WalSegmentMeta::checksum`] for `data`.
    pub fn wal_checksum(&self, data: &[u8]) -> String {
        self.keys.hasher.hash(data).to_string()
    }

    /// Reads a WAL object and checks its seal and its content checksum.
    pub fn read_wal(&self, key: &str) -> RepoResult<(WalSegmentMeta, Vec<u8>)> {
        let bytes = self.storage.get(key)?;
        let opened = open::<WalSegmentMeta>(&self.keys, key, ObjectKind::WalSegment, &bytes)?;
        if self.wal_checksum(&opened.payload) != opened.meta.checksum {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: "segment bytes do not match their checksum".into(),
            });
        }
        Ok((opened.meta, opened.payload))
    }

    /// All WAL objects of an instance, by timeline then segment name.
    pub fn list_wal(&self, instance_id: &str) -> RepoResult<Vec<WalObject>> {
        let prefix = wal_prefix(instance_id);
        let mut out = Vec::new();
        for key in self.storage.list(&prefix)? {
            let Some(rest) = key.strip_prefix(&format!("{prefix}/")) else {
                continue;
            };
            let Some((tli_dir, file)) = rest.split_once('/') else {
                continue;
            };
            let Ok(tli) = u32::from_str_radix(tli_dir, 16) else {
                continue;
            };
            let (segment, partial) = match file.strip_suffix(".partial") {
                Some(s) => (s, true),
                None => (file, false),
            };
            if segment.len() != 24 || !segment.chars().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            out.push(WalObject {
                key: key.clone(),
                timeline: TimelineId(tli),
                segment: segment.to_string(),
                partial,
            });
        }
        out.sort_by(|a, b| {
            (a.timeline, &a.segment, a.partial).cmp(&(b.timeline, &b.segment, b.partial))
        });
        Ok(out)
    }

    /// Stores the history file of timeline `tli`.
    pub fn put_history(
        &self,
        instance_id: &str,
        tli: TimelineId,
        content: &[u8],
    ) -> RepoResult<()> {
        let bytes = seal(
            &self.keys,
            ObjectKind::TimelineHistory,
            &serde_json::json!({"timeline": tli.0}),
            content,
            None,
        )?;
        self.storage.put(&history_key(instance_id, tli), &bytes)?;
        Ok(())
    }

    /// The history file of timeline `tli`, if the repository has it.
    pub fn read_history(&self, instance_id: &str, tli: TimelineId) -> RepoResult<Option<Vec<u8>>> {
        let key = history_key(instance_id, tli);
        match self.storage.get(&key) {
            Ok(bytes) => Ok(Some(
                open::<serde_json::Value>(&self.keys, &key, ObjectKind::TimelineHistory, &bytes)?
                    .payload,
            )),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Timelines that have a history file stored.
    pub fn list_histories(&self, instance_id: &str) -> RepoResult<Vec<TimelineId>> {
        let prefix = wal_prefix(instance_id);
        let mut out: Vec<TimelineId> = self
            .storage
            .list(&prefix)?
            .iter()
            .filter_map(|k| {
                let file = k.strip_prefix(&format!("{prefix}/"))?;
                let hex = file.strip_suffix(".history")?;
                u32::from_str_radix(hex, 16).ok().map(TimelineId)
            })
            .collect();
        out.sort();
        Ok(out)
    }
}
