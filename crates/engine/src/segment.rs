//! Turns a stream of WAL bytes into stored segment objects: buffers the
//! current segment, decodes its records (commit times, xids, restore points)
//! as they arrive, stores complete segments and, on request, the valid prefix
//! of the current one as a `.partial` object. Used by the continuous archiver
//! and by backups (which stream the WAL they need for consistency).

use chrono::{DateTime, Utc};
use pg_wal::decode::{WalDecoder, WalEvent};
use pg_wal::{Lsn, TimelineId, WalGeometry};
use strata_catalog::{RestorePointRow, WalSegmentRow};
use strata_repo::{wal_segment_key, RestorePointInfo, WalPayload, WalSegmentMeta};

use crate::{Engine, EngineError, EngineResult};

#[derive(Default)]
struct Summary {
    first_commit: Option<DateTime<Utc>>,
    last_commit: Option<DateTime<Utc>>,
    commit_count: u64,
    min_xid: Option<u32>,
    max_xid: Option<u32>,
    restore_points: Vec<RestorePointInfo>,
}

impl Summary {
    fn absorb(&mut self, event: WalEvent) {
        match event {
            WalEvent::Commit { xid, time, .. } => {
                self.first_commit.get_or_insert(time);
                self.last_commit = Some(time);
                self.commit_count += 1;
                self.min_xid = Some(self.min_xid.map_or(xid, |m| m.min(xid)));
                self.max_xid = Some(self.max_xid.map_or(xid, |m| m.max(xid)));
            }
            WalEvent::RestorePoint {
                end_lsn,
                name,
                time,
                ..
            } => self.restore_points.push(RestorePointInfo {
                name,
                lsn: end_lsn,
                time,
            }),
            WalEvent::Abort { .. } | WalEvent::Switch { .. } => {}
        }
    }
}

pub struct SegmentArchiver {
    engine: Engine,
    instance_id: String,
    geometry: WalGeometry,
    timeline: TimelineId,
    seg_start: Lsn,
    buf: Vec<u8>,
    /// `buf` as stored in partial objects, extended at each refresh.
    payload: WalPayload,
    decoder: WalDecoder,
    summary: Summary,
    /// Bytes of the current segment already stored as a partial object.
    partial_len: usize,
    /// Segments this archiver stored whole, oldest first.
    pub stored: Vec<String>,
}

impl SegmentArchiver {
    /// Starts at the segment containing `start` (streaming must begin at
    /// that segment's first byte).
    pub fn new(
        engine: Engine,
        instance_id: &str,
        geometry: WalGeometry,
        timeline: TimelineId,
        start: Lsn,
    ) -> Self {
        let seg_start = geometry.segment_start(geometry.segment_of(start));
        let payload = engine.repo.wal_payload();
        SegmentArchiver {
            engine,
            instance_id: instance_id.to_string(),
            geometry,
            timeline,
            seg_start,
            buf: Vec::with_capacity(geometry.segment_size() as usize),
            payload,
            decoder: WalDecoder::new(geometry, seg_start),
            summary: Summary::default(),
            partial_len: 0,
            stored: Vec::new(),
        }
    }

    /// The first LSN not yet received.
    pub fn position(&self) -> Lsn {
        self.seg_start + self.buf.len() as u64
    }

    /// End of the WAL stored as complete segments.
    pub fn complete_end(&self) -> Lsn {
        self.seg_start
    }

    fn segment_name(&self) -> String {
        self.geometry
            .segment_file_name(self.timeline, self.geometry.segment_of(self.seg_start))
    }

    /// Appends WAL that starts at `start`. Bytes already received are
    /// skipped (servers may resend after a reconnect); a hole is an error.
    pub fn push(&mut self, start: Lsn, mut data: &[u8]) -> EngineResult<()> {
        let pos = self.position();
        if start > pos {
            return Err(EngineError::Failed(format!(
                "WAL stream jumped from {pos} to {start}: a gap would be archived"
            )));
        }
        let overlap = (pos.0 - start.0) as usize;
        if overlap >= data.len() {
            return Ok(());
        }
        data = &data[overlap..];
        let seg_size = self.geometry.segment_size() as usize;
        while !data.is_empty() {
            let take = (seg_size - self.buf.len()).min(data.len());
            let (now, rest) = data.split_at(take);
            self.buf.extend_from_slice(now);
            let events = self.decoder.feed(now).map_err(|e| {
                EngineError::Failed(format!(
                    "cannot decode WAL of segment {}: {e}",
                    self.segment_name()
                ))
            })?;
            for event in events {
                self.summary.absorb(event);
            }
            data = rest;
            if self.buf.len() == seg_size {
                self.store(false)?;
                self.seg_start = self.seg_start + seg_size as u64;
                self.buf.clear();
                self.payload = self.engine.repo.wal_payload();
                self.summary = Summary::default();
                self.partial_len = 0;
            }
        }
        Ok(())
    }

    /// Stores the received prefix of the current segment, if it grew since
    /// the last call. Returns whether anything was written.
    pub fn flush_partial(&mut self) -> EngineResult<bool> {
        if self.buf.len() <= self.partial_len {
            return Ok(false);
        }
        // Another writer (a backup's WAL stream, or the archiver) may have
        // stored more of this segment already; never replace it with less.
        let name = self.segment_name();
        let existing =
            self.engine
                .catalog
                .find_wal_segment(&self.instance_id, self.timeline, &name)?;
        let longer = existing
            .iter()
            .any(|w| !w.partial || w.end_lsn >= self.position());
        if !longer {
            self.store(true)?;
        }
        self.partial_len = self.buf.len();
        Ok(!longer)
    }

    fn store(&mut self, partial: bool) -> EngineResult<()> {
        let name = self.segment_name();
        let repo = &self.engine.repo;
        // A partial object only adds the bytes received since the last one;
        // a complete segment is compressed whole, as one frame.
        let checksum = if partial {
            self.payload.extend(&self.buf[self.payload.len()..])?;
            self.payload.checksum()
        } else {
            repo.wal_checksum(&self.buf)
        };
        if !partial {
            let already = self
                .engine
                .catalog
                .find_wal_segment(&self.instance_id, self.timeline, &name)?
                .into_iter()
                .any(|w| !w.partial && w.checksum == checksum);
            let key = wal_segment_key(&self.instance_id, self.timeline, &name, false);
            if already
                && repo
                    .storage()
                    .exists(&key)
                    .map_err(strata_repo::RepoError::from)?
            {
                self.stored.push(name);
                return Ok(());
            }
        }
        let meta = WalSegmentMeta {
            timeline: self.timeline,
            segment: name.clone(),
            begin_lsn: self.seg_start,
            end_lsn: self.position(),
            partial,
            checksum,
            first_commit: self.summary.first_commit,
            last_commit: self.summary.last_commit,
            commit_count: self.summary.commit_count,
            min_commit_xid: self.summary.min_xid,
            max_commit_xid: self.summary.max_xid,
            restore_points: self.summary.restore_points.clone(),
            stored_at: Utc::now(),
        };
        let key = if partial {
            repo.put_wal_payload(&self.instance_id, &meta, &self.payload)?
        } else {
            repo.put_wal_segment(&self.instance_id, &meta, &self.buf)?
        };
        record_segment(&self.engine, &self.instance_id, &meta, key)?;
        if !partial {
            self.stored.push(name);
        }
        Ok(())
    }
}

/// Indexes a stored WAL object in the catalog (also used by reindex).
pub fn record_segment(
    engine: &Engine,
    instance_id: &str,
    meta: &WalSegmentMeta,
    object_key: String,
) -> EngineResult<()> {
    let catalog = &engine.catalog;
    catalog.upsert_wal_segment(&WalSegmentRow {
        instance_id: instance_id.to_string(),
        timeline: meta.timeline,
        segment: meta.segment.clone(),
        partial: meta.partial,
        begin_lsn: meta.begin_lsn,
        end_lsn: meta.end_lsn,
        size: meta.end_lsn - meta.begin_lsn,
        checksum: meta.checksum.clone(),
        first_commit: meta.first_commit,
        last_commit: meta.last_commit,
        commit_count: meta.commit_count,
        min_commit_xid: meta.min_commit_xid,
        max_commit_xid: meta.max_commit_xid,
        object_key,
        stored_at: meta.stored_at,
    })?;
    if !meta.partial {
        catalog.delete_wal_segment(instance_id, meta.timeline, &meta.segment, true)?;
    }
    for rp in &meta.restore_points {
        catalog.upsert_restore_point(&RestorePointRow {
            instance_id: instance_id.to_string(),
            timeline: meta.timeline,
            name: rp.name.clone(),
            lsn: rp.lsn,
            time: rp.time,
        })?;
    }
    Ok(())
}
