//! WAL segments and timeline history files as sealed objects.
//!
//! A segment is stored whole once complete. While it is being received its
//! valid prefix is kept durable as a `.partial` object plus *tails*: each
//! refresh stores only the bytes received since the last one, as an object
//! under `<segment>.partial.d/<begin>-<end>` (LSNs in hex), and now and then
//! the whole prefix is written again as the `.partial` object, which makes
//! the tails it covers redundant (they are deleted). Refreshing every few
//! hundred milliseconds so costs about the WAL received, not the segment's
//! size each time. [`Repository::read_wal`] of a `.partial` key returns the
//! prefix joined from both; storing the complete segment deletes them all.
//! Each object carries what was decoded from its records (commit
//! timestamps, restore points) so time targets can be resolved without
//! reading WAL.

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};

use crate::crypto::KeyDomain;
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

/// What a destructive event did (see [`RecoveryEventInfo`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum RecoveryEventKind {
    /// A table's storage was removed with its definition (`DROP TABLE`).
    DropTable,
    /// A table's rows were all removed at once (`TRUNCATE`).
    Truncate,
    /// A database was dropped (`DROP DATABASE`).
    DropDatabase,
    /// Many rows were deleted from one table in one transaction.
    Delete,
    /// Many rows were updated in one table in one transaction.
    Update,
    /// A table's file was replaced by a filled one (`VACUUM FULL`,
    /// `CLUSTER`, a rewriting `ALTER TABLE`): no data lost, unless the
    /// table turns out gone afterwards (then it was dropped). Kept so that
    /// can be decided once the server's catalog is read again.
    Rewrite,
}

impl RecoveryEventKind {
    /// Every kind, in the order documentation lists them.
    pub const ALL: [RecoveryEventKind; 5] = [
        RecoveryEventKind::DropTable,
        RecoveryEventKind::Truncate,
        RecoveryEventKind::DropDatabase,
        RecoveryEventKind::Delete,
        RecoveryEventKind::Update,
    ];

    /// The kind's name in the API, the CLI and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryEventKind::DropTable => "DropTable",
            RecoveryEventKind::Truncate => "Truncate",
            RecoveryEventKind::DropDatabase => "DropDatabase",
            RecoveryEventKind::Delete => "Delete",
            RecoveryEventKind::Update => "Update",
            RecoveryEventKind::Rewrite => "Rewrite",
        }
    }

    /// The kind [`RecoveryEventKind::as_str`] spells `s` (case-insensitive).
    pub fn parse(s: &str) -> Option<RecoveryEventKind> {
        Self::ALL
            .into_iter()
            .chain([RecoveryEventKind::Rewrite])
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

/// One committed transaction's destructive effect on one table or database,
/// decoded from a segment's WAL. Names are those the relation had when the
/// WAL was received, as far as Strata had read them from the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecoveryEventInfo {
    /// What happened.
    pub kind: RecoveryEventKind,
    /// Transaction that did it.
    pub xid: u32,
    /// Start of its commit record: recovery stops just before it here.
    pub lsn: Lsn,
    /// End of its commit record: recovery to just after it stops here.
    pub end_lsn: Lsn,
    /// Commit time.
    pub time: DateTime<Utc>,
    /// Database OID.
    pub db_oid: u32,
    /// Storage file number of the table (none for a dropped database).
    #[serde(default)]
    pub relfilenode: Option<u32>,
    /// The table's OID, when its name was known.
    #[serde(default)]
    pub rel_oid: Option<u32>,
    /// Database name, when known.
    #[serde(default)]
    pub database: Option<String>,
    /// Schema name, when known.
    #[serde(default)]
    pub schema: Option<String>,
    /// Table name, when known.
    #[serde(default)]
    pub table: Option<String>,
    /// Rows deleted or updated (for `Delete` and `Update`).
    #[serde(default)]
    pub rows: Option<u64>,
    /// Files the transaction created and filled (for `Truncate` and
    /// `Rewrite`): a table whose new file is among them was rewritten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filled: Vec<u32>,
    /// For `DropDatabase`: a position before which the database was intact
    /// (it is marked invalid and its files go before the commit record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_lsn: Option<Lsn>,
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
    /// Destructive transactions committed in the segment.
    #[serde(default)]
    pub events: Vec<RecoveryEventInfo>,
    /// Recovery events of the segment past the most one segment lists
    /// (not in `events`, nor in the catalog).
    #[serde(default, skip_serializing_if = "crate::gc::is_zero")]
    pub events_omitted: u64,
    /// When the object was stored.
    pub stored_at: DateTime<Utc>,
}

/// The prefix of a segment being received, kept ready to store as a
/// partial object: its keyed checksum and its zstd frames (one per
/// [`WalPayload::extend`]) are extended with each new piece and never
/// recomputed. It also remembers how much of it stored objects hold, so a
/// refresh can store only a *tail*: the bytes from a frame's start on
/// ([`Repository::put_wal_tail`]).
pub struct WalPayload {
    checksum: blake3::Hasher,
    /// One compression context for all the frames: a fresh one per frame
    /// costs its tables' allocation and first touch each time.
    compressor: zstd::bulk::Compressor<'static>,
    /// Where a frame is compressed before it joins `frames`, kept between
    /// frames for the same reason.
    scratch: Vec<u8>,
    frames: Vec<u8>,
    /// Where each frame begins: (raw offset, offset in `frames`).
    starts: Vec<(usize, usize)>,
    len: usize,
    /// The keyed hasher before any byte, to start the next segment's checksum.
    empty: blake3::Hasher,
    /// Raw bytes already in some stored object.
    stored_len: usize,
}

impl WalPayload {
    /// Appends `data` as one more zstd frame.
    pub fn extend(&mut self, data: &[u8]) -> RepoResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.compressor
            .compress_to_buffer(data, &mut self.scratch)
            .map_err(|e| RepoError::Format(e.to_string()))?;
        self.starts.push((self.len, self.frames.len()));
        self.frames.extend_from_slice(&self.scratch);
        self.checksum.update(data);
        self.len += data.len();
        Ok(())
    }

    /// Empties the payload for the next segment, keeping its buffers and
    /// compression context: their pages stay mapped, so a receiver does
    /// not fault a segment's worth of fresh memory in for every segment.
    pub fn reset(&mut self) {
        self.checksum = self.empty.clone();
        self.scratch.clear();
        self.frames.clear();
        self.starts.clear();
        self.len = 0;
        self.stored_len = 0;
    }

    /// Bytes of memory the payload's buffers hold, whatever they hold now.
    pub fn capacity(&self) -> usize {
        self.frames.capacity() + self.scratch.capacity()
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

    /// Whether the frames are too small to store the complete segment as
    /// they are: each frame starts without the history of the one before
    /// and with entropy tables of its own, so frames shorter than zstd's
    /// window at the fast levels compress measurably worse than one frame.
    /// Larger ones lose next to nothing, and storing them as they are
    /// spares decompressing and compressing the segment again.
    pub fn frames_too_small(&self) -> bool {
        self.starts.len() > 1 && self.len / self.starts.len() < WHOLE_FRAME_MIN
    }

    /// The raw bytes held, decompressed.
    pub fn raw(&self) -> RepoResult<Vec<u8>> {
        self.raw_from(0)
    }

    /// Raw bytes held that no stored object has yet.
    pub fn unstored_len(&self) -> usize {
        self.len - self.stored_len
    }

    /// Raw bytes in stored objects.
    pub fn stored_len(&self) -> usize {
        self.stored_len
    }

    /// The frames holding the raw bytes from `from` on; `from` must be
    /// where a frame begins.
    fn frames_from(&self, from: usize) -> RepoResult<&[u8]> {
        if from == self.len {
            return Ok(&[]);
        }
        let at = self
            .starts
            .binary_search_by_key(&from, |&(raw, _)| raw)
            .map_err(|_| RepoError::Format(format!("no WAL frame begins at byte {from}")))?;
        Ok(&self.frames[self.starts[at].1..])
    }

    /// The raw bytes from `from` (a frame's start) on, decompressed.
    fn raw_from(&self, from: usize) -> RepoResult<Vec<u8>> {
        let mut raw = Vec::with_capacity(self.len - from);
        zstd::stream::copy_decode(self.frames_from(from)?, &mut raw)
            .map_err(|e| RepoError::Format(format!("WAL frames do not decompress: {e}")))?;
        Ok(raw)
    }

    /// Records that everything held is now in stored objects.
    pub(crate) fn mark_stored(&mut self) {
        self.stored_len = self.len;
    }
}

/// Raw bytes a frame of a [`WalPayload`] averages at least for a complete
/// segment to be stored as its frames are (see
/// [`WalPayload::frames_too_small`]): zstd's window at levels 1 to 3.
pub const WHOLE_FRAME_MIN: usize = 512 * 1024;

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

/// Where the tails of the partial object `partial_key` are stored.
fn tails_prefix(partial_key: &str) -> String {
    format!("{partial_key}.d/")
}

/// Key of the tail of a partial object holding WAL from `begin` to `end`.
fn tail_key(partial_key: &str, begin: Lsn, end: Lsn) -> String {
    format!(
        "{}{:016X}-{:016X}",
        tails_prefix(partial_key),
        begin.0,
        end.0
    )
}

/// The WAL range a tail's key names; `None` for any other key.
fn parse_tail_key(partial_key: &str, key: &str) -> Option<(Lsn, Lsn)> {
    let name = key.strip_prefix(&tails_prefix(partial_key))?;
    let (begin, end) = name.split_once('-')?;
    if begin.len() != 16 || end.len() != 16 {
        return None;
    }
    let begin = u64::from_str_radix(begin, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    (begin < end).then_some((Lsn(begin), Lsn(end)))
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
        self.after_whole_write(instance_id, meta)?;
        Ok(key)
    }

    /// What storing a segment's bytes whole makes redundant: a complete
    /// segment replaces its partial object and tails; a whole partial
    /// object replaces the tails it covers.
    fn after_whole_write(&self, instance_id: &str, meta: &WalSegmentMeta) -> RepoResult<()> {
        let partial_key = wal_segment_key(instance_id, meta.timeline, &meta.segment, true);
        if meta.partial {
            self.delete_tails(&partial_key, Some(meta.end_lsn))
        } else {
            self.delete_wal(&partial_key)
        }
    }

    /// Deletes the tails of `partial_key` that end at or before `upto`
    /// (all of them for `None`). Tails are deleted before the object they
    /// extend, so an interrupted deletion never leaves a gap behind a prefix.
    fn delete_tails(&self, partial_key: &str, upto: Option<Lsn>) -> RepoResult<()> {
        for key in self.storage.list(&tails_prefix(partial_key))? {
            let Some((_, end)) = parse_tail_key(partial_key, &key) else {
                continue;
            };
            if upto.is_none_or(|upto| end <= upto) {
                self.storage.delete(&key)?;
            }
        }
        Ok(())
    }

    /// Deletes a WAL object; for a `.partial` one, its tails with it.
    pub fn delete_wal(&self, key: &str) -> RepoResult<()> {
        if key.ends_with(".partial") {
            self.delete_tails(key, None)?;
        }
        self.storage.delete(key)?;
        Ok(())
    }

    /// An empty [`WalPayload`] for the segment being received.
    pub fn wal_payload(&self) -> RepoResult<WalPayload> {
        let empty = self.keys.hasher.incremental();
        let compressor = zstd::bulk::Compressor::new(self.compress_level)
            .map_err(|e| RepoError::Format(format!("zstd level {}: {e}", self.compress_level)))?;
        Ok(WalPayload {
            checksum: empty.clone(),
            compressor,
            scratch: Vec::new(),
            frames: Vec::new(),
            starts: Vec::new(),
            len: 0,
            empty,
            stored_len: 0,
        })
    }

    /// Stores a segment, complete or partial, whose bytes were gathered in
    /// `payload`, whole; `meta` describes all of them (its checksum is
    /// [`WalPayload::checksum`]). Costs no compression: the payload's frames
    /// are written as they are. Marks the payload stored.
    pub fn put_wal_payload(
        &self,
        instance_id: &str,
        meta: &WalSegmentMeta,
        payload: &mut WalPayload,
    ) -> RepoResult<String> {
        let key = wal_segment_key(instance_id, meta.timeline, &meta.segment, meta.partial);
        let bytes = seal_compressed(&self.keys, ObjectKind::WalSegment, meta, &payload.frames)?;
        self.storage.put(&key, &bytes)?;
        payload.mark_stored();
        self.after_whole_write(instance_id, meta)?;
        Ok(key)
    }

    /// Stores the tail of a partial segment's `payload` from raw byte
    /// `from` (where a frame begins, at most what is stored already) to its
    /// end, next to the partial object; `meta` describes the whole prefix,
    /// as for [`Repository::put_wal_payload`], and so does the tail's own
    /// meta: its checksum is the prefix's, which the payload keeps anyway
    /// (a checksum of the tail's bytes alone would hash every byte twice,
    /// and a merged tail's bytes a third time), and readers check it once
    /// the prefix is joined. A tail from before the end of what is stored
    /// merges the tails it covers, which are then deleted. Returns the
    /// partial object's key, the one the catalog records. Marks the payload
    /// stored.
    pub fn put_wal_tail(
        &self,
        instance_id: &str,
        meta: &WalSegmentMeta,
        payload: &mut WalPayload,
        from: usize,
    ) -> RepoResult<String> {
        if !meta.partial || from > payload.stored_len || from >= payload.len {
            return Err(RepoError::Format(format!(
                "WAL segment {}: a tail from byte {from} of {} ({} stored) cannot be stored",
                meta.segment, payload.len, payload.stored_len
            )));
        }
        if meta.end_lsn.0 != meta.begin_lsn.0 + payload.len as u64 {
            return Err(RepoError::Format(format!(
                "WAL segment {}: {} bytes held end past {}",
                meta.segment, payload.len, meta.end_lsn
            )));
        }
        let partial_key = wal_segment_key(instance_id, meta.timeline, &meta.segment, true);
        let mut tail_meta = meta.clone();
        tail_meta.begin_lsn = Lsn(meta.end_lsn.0 - payload.len as u64);
        tail_meta.checksum = payload.checksum();
        let bytes = seal_compressed(
            &self.keys,
            ObjectKind::WalSegment,
            &tail_meta,
            payload.frames_from(from)?,
        )?;
        let begin = Lsn(meta.end_lsn.0 - (payload.len - from) as u64);
        let key = tail_key(&partial_key, begin, tail_meta.end_lsn);
        let merges = from < payload.stored_len;
        self.storage.put(&key, &bytes)?;
        payload.mark_stored();
        if merges {
            for covered in self.storage.list(&tails_prefix(&partial_key))? {
                let Some((b, e)) = parse_tail_key(&partial_key, &covered) else {
                    continue;
                };
                let inside = b >= begin && e <= tail_meta.end_lsn;
                if inside && covered != key {
                    self.storage.delete(&covered)?;
                }
            }
        }
        Ok(partial_key)
    }

    /// The checksum recorded in [`WalSegmentMeta::checksum`] for `data`.
    pub fn wal_checksum(&self, data: &[u8]) -> String {
        self.keys.hasher.hash(data).to_string()
    }

    /// Reads a WAL object and checks its seal and its content checksum. A
    /// `.partial` object is returned joined with its tails: the longest
    /// contiguous prefix they hold, with the metadata of the newest piece
    /// (its summary covers the whole prefix).
    pub fn read_wal(&self, key: &str) -> RepoResult<(WalSegmentMeta, Vec<u8>)> {
        if !key.ends_with(".partial") {
            return self.read_wal_object(key);
        }
        // A writer that stores the prefix whole deletes the tails it covers;
        // a tail gone between the listing and the read means that happened,
        // and reading again finds the longer prefix.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.read_partial(key) {
                Err(RepoError::Storage(StorageError::NotFound(_))) if attempt < 4 => continue,
                other => return other,
            }
        }
    }

    fn read_partial(&self, key: &str) -> RepoResult<(WalSegmentMeta, Vec<u8>)> {
        let (mut meta, mut data) = self.read_wal_object(key)?;
        // The keyed hash of `data` so far, in one key domain, and how many
        // of its bytes it has taken: carried from tail to tail, so checking
        // each tail's prefix checksum hashes every byte once.
        let mut prefix_hash: Option<(KeyDomain, blake3::Hasher, usize)> = None;
        let mut tails: Vec<(Lsn, Lsn, String)> = self
            .storage
            .list(&tails_prefix(key))?
            .into_iter()
            .filter_map(|k| parse_tail_key(key, &k).map(|(b, e)| (b, e, k)))
            .collect();
        tails.sort();
        let mut joined = false;
        for (begin, end, tail) in tails {
            if end <= meta.end_lsn {
                continue;
            }
            if begin > meta.end_lsn {
                break;
            }
            let (tail_meta, bytes, domain) = self.open_wal_object(&tail)?;
            // Its meta describes either its own bytes (as tails were first
            // written) or the whole prefix it ends.
            let of_prefix = tail_meta.begin_lsn == meta.begin_lsn && begin != meta.begin_lsn;
            if (tail_meta.begin_lsn != begin && !of_prefix)
                || tail_meta.end_lsn != end
                || bytes.len() as u64 != end.0 - begin.0
                || tail_meta.segment != meta.segment
                || tail_meta.timeline != meta.timeline
            {
                return Err(RepoError::Corrupt {
                    object: tail,
                    reason: "the tail does not hold the WAL its key names".into(),
                });
            }
            if !of_prefix {
                self.check_wal_checksum(&tail, &tail_meta, &bytes, domain)?;
            }
            data.extend_from_slice(&bytes[(meta.end_lsn.0 - begin.0) as usize..]);
            if of_prefix {
                let (domain, mut hasher, hashed) = match prefix_hash.take() {
                    Some(running) if running.0 == domain => running,
                    _ => (domain, self.keys_of_domain(domain).hasher.incremental(), 0),
                };
                hasher.update(&data[hashed..]);
                if hex::encode(hasher.finalize().as_bytes()) != tail_meta.checksum {
                    return Err(RepoError::Corrupt {
                        object: tail,
                        reason:
                            "the segment's bytes up to the tail's end do not match its checksum"
                                .into(),
                    });
                }
                prefix_hash = Some((domain, hasher, data.len()));
            }
            meta = WalSegmentMeta {
                begin_lsn: meta.begin_lsn,
                ..tail_meta
            };
            joined = true;
        }
        if joined {
            meta.checksum = self.wal_checksum(&data);
        }
        Ok((meta, data))
    }

    /// Checks a tail object on its own (`repo verify`): its seal, and that
    /// it holds the range its key names. A tail whose checksum is its
    /// prefix's is checked against it when the partial object is read
    /// ([`Repository::read_wal`] of the `.partial` key); one describing its
    /// own bytes is checked here.
    pub fn check_wal_tail(&self, key: &str) -> RepoResult<()> {
        let (partial_key, _) = key
            .split_once(".partial.d/")
            .map(|(segment, _)| (format!("{segment}.partial"), ()))
            .ok_or_else(|| RepoError::Format(format!("{key} is not a WAL tail")))?;
        let Some((begin, end)) = parse_tail_key(&partial_key, key) else {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: "not a tail's key".into(),
            });
        };
        let (meta, payload, domain) = self.open_wal_object(key)?;
        if meta.end_lsn != end
            || payload.len() as u64 != end.0 - begin.0
            || meta.begin_lsn > begin
            || !meta.partial
        {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: "the tail does not hold the WAL its key names".into(),
            });
        }
        if meta.begin_lsn == begin {
            self.check_wal_checksum(key, &meta, &payload, domain)?;
        }
        Ok(())
    }

    fn read_wal_object(&self, key: &str) -> RepoResult<(WalSegmentMeta, Vec<u8>)> {
        let (meta, payload, domain) = self.open_wal_object(key)?;
        self.check_wal_checksum(key, &meta, &payload, domain)?;
        Ok((meta, payload))
    }

    /// A WAL object opened (its seal checked), with the key domain it was
    /// written in; its content checksum is not checked yet.
    fn open_wal_object(&self, key: &str) -> RepoResult<(WalSegmentMeta, Vec<u8>, KeyDomain)> {
        let bytes = self.storage.get(key)?;
        let opened = open::<WalSegmentMeta>(&self.keys, key, ObjectKind::WalSegment, &bytes)?;
        let domain = crate::object::object_domain(&bytes).0;
        Ok((opened.meta, opened.payload, domain))
    }

    /// The keys of `domain` when this repository reads it, else its own.
    fn keys_of_domain(&self, domain: KeyDomain) -> &crate::crypto::Keys {
        self.keys.for_domain(domain).unwrap_or(&self.keys)
    }

    /// Checks that `payload` is what `meta`'s checksum describes. The
    /// checksum is keyed with the hash key of the object's own domain (a
    /// segment archived before the instance's key domain existed).
    fn check_wal_checksum(
        &self,
        key: &str,
        meta: &WalSegmentMeta,
        payload: &[u8],
        domain: KeyDomain,
    ) -> RepoResult<()> {
        if self.keys_of_domain(domain).hasher.hash(payload).to_string() != meta.checksum {
            return Err(RepoError::Corrupt {
                object: key.to_string(),
                reason: "segment bytes do not match their checksum".into(),
            });
        }
        Ok(())
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
