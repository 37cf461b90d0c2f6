//! Turns a stream of WAL bytes into pieces for a
//! [`WalUploader`](crate::wal_uploader::WalUploader): decodes the records
//! of the current segment (commit times, xids, restore points) as they
//! arrive and hands over the bytes received since the last handover, as a
//! refresh of the segment's `.partial` object when asked and as the last
//! piece when the segment is complete. It keeps no copy of the segment
//! (the uploader holds it, compressed), so a receiver's memory is the WAL
//! of one refresh interval. Used by the continuous archiver and by backups
//! (which stream the WAL they need for consistency).

use chrono::{DateTime, Utc};
use pg_wal::decode::{WalDecoder, WalEvent};
use pg_wal::{Lsn, TimelineId, WalGeometry};
use strata_repo::{RecoveryEventInfo, RestorePointInfo, WalSegmentMeta};

use crate::catalog_retry::retry_busy;
use crate::entities;
use crate::events::{commit_events, event_rows, EventOptions};
use crate::wal_uploader::{UploadQueue, WalPiece};
use crate::{Engine, EngineError, EngineResult};

/// What a segment's records say, stored with it.
#[derive(Default, Clone)]
pub struct Summary {
    pub first_commit: Option<DateTime<Utc>>,
    pub last_commit: Option<DateTime<Utc>>,
    pub commit_count: u64,
    pub min_xid: Option<u32>,
    pub max_xid: Option<u32>,
    pub restore_points: Vec<RestorePointInfo>,
    pub events: Vec<RecoveryEventInfo>,
    /// Events past [`MAX_SEGMENT_EVENTS`], counted but not listed.
    pub events_omitted: u64,
    /// File numbers the `filled` lists of `events` hold in all.
    filled: usize,
}

/// Most recovery events one segment lists. Each refresh of a partial
/// segment stores all of its events so far, so a database user dropping
/// tables in a loop (tens of thousands per segment) would otherwise make
/// every refresh, and the receiver's memory, grow with the segment.
pub const MAX_SEGMENT_EVENTS: usize = 4096;
/// Most file numbers the `filled` lists of one segment's events hold in
/// all (each commit's events hold at most as many): the event that
/// reaches it lists part of its files and those after it none; they are
/// then classified by the catalog's names alone when listed.
pub const MAX_SEGMENT_FILLED: usize = pg_wal::decode::MAX_ENTRIES;

impl Summary {
    /// Takes in one decoded record; answers whether it was a commit that
    /// changed the system catalogs (names may have changed).
    fn absorb(&mut self, event: WalEvent, events: Option<&EventOptions>) -> bool {
        let mut catalog_changed = false;
        match event {
            WalEvent::Commit {
                lsn,
                end_lsn,
                xid,
                time,
                changes,
            } => {
                if let (Some(changes), Some(opts)) = (changes, events) {
                    catalog_changed = changes.catalog_changed;
                    for mut e in commit_events(&changes, xid, (lsn, end_lsn), time, opts) {
                        if self.events.len() >= MAX_SEGMENT_EVENTS {
                            self.events_omitted += 1;
                            continue;
                        }
                        e.filled.truncate(MAX_SEGMENT_FILLED - self.filled);
                        self.filled += e.filled.len();
                        self.events.push(e);
                    }
                }
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
            WalEvent::Abort { .. } | WalEvent::Switch { .. } | WalEvent::BackupEnd { .. } => {}
        }
        catalog_changed
    }
}

pub struct SegmentArchiver {
    geometry: WalGeometry,
    timeline: TimelineId,
    seg_start: Lsn,
    /// Bytes of the current segment received.
    received: usize,
    /// The last of those not handed over yet.
    pending: Vec<u8>,
    decoder: WalDecoder,
    summary: Summary,
    queue: UploadQueue,
    /// Recovery events are decoded when set.
    events: Option<EventOptions>,
    /// A commit changed the system catalogs since [`Self::take_catalog_changed`].
    catalog_changed: bool,
}

impl SegmentArchiver {
    /// Starts at the segment containing `start` (streaming must begin at
    /// that segment's first byte), handing pieces to `queue`.
    pub fn new(
        geometry: WalGeometry,
        timeline: TimelineId,
        start: Lsn,
        queue: UploadQueue,
    ) -> Self {
        let seg_start = geometry.segment_start(geometry.segment_of(start));
        SegmentArchiver {
            geometry,
            timeline,
            seg_start,
            received: 0,
            pending: Vec::new(),
            // Changes are tracked only for recovery events.
            decoder: WalDecoder::new(geometry, seg_start).report_changes(None),
            summary: Summary::default(),
            queue,
            events: None,
            catalog_changed: false,
        }
    }

    /// Decodes recovery events too (see [`crate::events`]).
    pub fn with_events(mut self, events: Option<EventOptions>) -> Self {
        debug_assert_eq!(self.received, 0, "set before any WAL is pushed");
        self.decoder = WalDecoder::new(self.geometry, self.seg_start)
            .report_changes(events.as_ref().map(|e| e.min_rows));
        self.events = events;
        self
    }

    /// Whether a commit changed the system catalogs since the last call.
    pub fn take_catalog_changed(&mut self) -> bool {
        std::mem::take(&mut self.catalog_changed)
    }

    /// The first LSN not yet received.
    pub fn position(&self) -> Lsn {
        self.seg_start + self.received as u64
    }

    /// End of the WAL handed over as complete segments.
    pub fn complete_end(&self) -> Lsn {
        self.seg_start
    }

    fn segment_name(&self) -> String {
        self.geometry
            .segment_file_name(self.timeline, self.geometry.segment_of(self.seg_start))
    }

    /// The bytes not handed over yet, as a piece; they leave the archiver.
    fn take_piece(&mut self) -> WalPiece {
        // The next piece is about as long: room for it at once, not grown
        // (and its pages faulted in) by doubling; a buffer the uploader
        // handed back, its pages mapped already, when there is one.
        let room = self.queue.buffer(self.pending.len());
        WalPiece {
            timeline: self.timeline,
            seg_start: self.seg_start,
            name: self.segment_name(),
            offset: self.received - self.pending.len(),
            bytes: std::mem::replace(&mut self.pending, room),
            summary: self.summary.clone(),
        }
    }

    /// Appends WAL that starts at `start`. Bytes already received are
    /// skipped (servers may resend after a reconnect); a hole is an error.
    /// Waits only when the uploader's queue is full.
    pub async fn push(&mut self, start: Lsn, mut data: &[u8]) -> EngineResult<()> {
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
            let take = (seg_size - self.received).min(data.len());
            let (now, rest) = data.split_at(take);
            self.pending.extend_from_slice(now);
            self.received += take;
            let events = self.decoder.feed(now).map_err(|e| {
                EngineError::Failed(format!(
                    "cannot decode WAL of segment {}: {e}",
                    self.segment_name()
                ))
            })?;
            let omitted = self.summary.events_omitted;
            for event in events {
                self.catalog_changed |= self.summary.absorb(event, self.events.as_ref());
            }
            if omitted == 0 && self.summary.events_omitted > 0 {
                tracing::warn!(
                    "WAL segment {}: more than {MAX_SEGMENT_EVENTS} recovery events; the \
                     segment's later ones are not listed (its WAL is stored whole, and \
                     restores to any point in it still work)",
                    self.segment_name()
                );
            }
            data = rest;
            if self.received == seg_size {
                let mut piece = self.take_piece();
                piece.summary = std::mem::take(&mut self.summary);
                self.seg_start = self.seg_start + seg_size as u64;
                self.received = 0;
                self.queue.segment(piece).await?;
            }
        }
        Ok(())
    }

    /// Hands over a refresh of the partial object if bytes arrived since the
    /// last handover and the queue has room; never waits. Returns whether a
    /// refresh was queued.
    pub fn offer_partial(&mut self) -> EngineResult<bool> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let queue = self.queue.clone();
        queue.offer_partial(|| self.take_piece())
    }

    /// Hands over a refresh of the partial object if bytes arrived since the
    /// last handover, waiting for room in the queue.
    pub async fn flush_partial(&mut self) -> EngineResult<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let piece = self.take_piece();
        self.queue.partial(piece).await
    }
}

/// Indexes a stored WAL object in the catalog (also used by reindex).
pub fn record_segment(
    engine: &Engine,
    instance_id: &str,
    meta: &WalSegmentMeta,
    object_key: String,
) -> EngineResult<()> {
    record_segment_from(engine, instance_id, meta, object_key, 0)
}

/// [`record_segment`] for an object whose first `events_recorded` recovery
/// events are in the catalog already (an earlier refresh of the segment).
pub fn record_segment_from(
    engine: &Engine,
    instance_id: &str,
    meta: &WalSegmentMeta,
    object_key: String,
    events_recorded: usize,
) -> EngineResult<()> {
    // Each write is keyed (one row per segment and kind, one per restore
    // point LSN): made again after an outage, it records nothing twice.
    let catalog = &engine.catalog;
    let row = entities::wal_segment_row(instance_id, meta, object_key);
    retry_busy("recording a WAL segment", || {
        catalog.upsert_wal_segment(&row)
    })?;
    if !meta.partial {
        retry_busy("forgetting a replaced partial segment", || {
            catalog.delete_wal_segment(instance_id, meta.timeline, &meta.segment, true)
        })?;
    }
    for row in entities::restore_point_rows(instance_id, meta) {
        retry_busy("recording a restore point", || {
            catalog.upsert_restore_point(&row)
        })?;
    }
    record_events(
        engine,
        instance_id,
        meta.timeline,
        &meta.events,
        events_recorded,
    )
}

/// Records a segment's recovery events after the first `events_recorded`
/// in the catalog (also when another writer stored the segment itself,
/// e.g. a backup's WAL stream).
pub fn record_events(
    engine: &Engine,
    instance_id: &str,
    timeline: TimelineId,
    events: &[RecoveryEventInfo],
    events_recorded: usize,
) -> EngineResult<()> {
    for row in event_rows(instance_id, timeline, events).skip(events_recorded) {
        retry_busy("recording a recovery event", || {
            engine.catalog.upsert_recovery_event(&row)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pg_wal::decode::{RelFile, TxnChanges};
    use strata_repo::RecoveryEventKind;

    use super::*;
    use crate::events::tests::{file, opts};

    fn commit(xid: u32, changes: TxnChanges) -> WalEvent {
        WalEvent::Commit {
            lsn: Lsn(u64::from(xid) * 0x100),
            end_lsn: Lsn(u64::from(xid) * 0x100 + 0x40),
            xid,
            time: Utc::now(),
            changes: Some(Box::new(changes)),
        }
    }

    #[test]
    fn a_segment_lists_a_bounded_number_of_events_and_counts_the_rest() {
        let mut summary = Summary::default();
        let drops = MAX_SEGMENT_EVENTS as u32 + 25;
        for xid in 1..=drops {
            let changes = TxnChanges {
                dropped: vec![file(20_000 + xid)],
                ..Default::default()
            };
            summary.absorb(commit(xid, changes), Some(&opts(1)));
        }
        assert_eq!(summary.events.len(), MAX_SEGMENT_EVENTS);
        assert_eq!(summary.events_omitted, 25);
        assert_eq!(summary.commit_count, u64::from(drops));
        // The first ones are listed, in order.
        assert!(summary
            .events
            .iter()
            .zip(1..)
            .all(|(e, xid)| e.xid == xid && e.kind == RecoveryEventKind::DropTable));
        assert_eq!(summary.max_xid, Some(drops));
    }

    #[test]
    fn the_filled_files_of_a_segments_events_are_bounded_in_all() {
        // Rewrites of 1,000 files each: every dropped file's event carries
        // the database's new files, up to a commit's bound.
        let mut summary = Summary::default();
        for xid in 1..=4u32 {
            let new: Vec<RelFile> = (0..1000).map(|i| file(xid * 100_000 + i)).collect();
            let changes = TxnChanges {
                dropped: (0..100).map(|i| file(xid * 20_000 + i)).collect(),
                created: new.clone(),
                filled: new,
                ..Default::default()
            };
            summary.absorb(commit(xid, changes), Some(&opts(1)));
        }
        assert_eq!(summary.events.len(), 400);
        assert!(summary
            .events
            .iter()
            .all(|e| e.kind == RecoveryEventKind::Rewrite));
        let carried: usize = summary.events.iter().map(|e| e.filled.len()).sum();
        assert_eq!(carried, MAX_SEGMENT_FILLED);
        assert_eq!(summary.filled, MAX_SEGMENT_FILLED);
        assert!(summary.events.last().unwrap().filled.is_empty());
        assert_eq!(summary.events_omitted, 0);
    }
}
