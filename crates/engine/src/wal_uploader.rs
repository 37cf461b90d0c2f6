//! The background uploader of received WAL: a task fed by a bounded queue
//! that compresses, seals and stores the pieces of WAL a
//! [`SegmentArchiver`](crate::segment::SegmentArchiver) hands over and
//! records them in the catalog, in the order received. Each store runs on
//! tokio's blocking pool for its own duration only, so an idle receiver
//! holds no thread.
//!
//! The task that reads a replication socket never waits on storage (the
//! concurrency rule in docs/DESIGN.md): a slow put (S3, a busy disk) only
//! fills the queue, and only a full queue stops the reader (backpressure,
//! so memory stays bounded at [`QUEUE_SEGMENTS`] pieces). The uploader
//! reports each object stored back to the reader, which acknowledges to the
//! server only WAL that is durable in the repository. The first storing
//! failure stops the uploader; [`WalUploader::finish`] returns it. An
//! uploader dropped unfinished (its task aborted) stores nothing more.
//!
//! The uploader, not the reader, holds the segment being received: as
//! compressed frames ([`WalPayload`]), extended by each piece. A refresh
//! stores only the bytes received since the last one (a tail of the
//! `.partial` object), and the whole prefix again only when the tails
//! would outweigh it, so keeping WAL durable within a fraction of a second
//! costs about the WAL received rather than the segment's size each time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Utc;
use pg_wal::{Lsn, TimelineId};
use strata_repo::{wal_segment_key, InstanceId, WalPayload, WalSegmentMeta};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::catalog_retry::retry_busy;
use crate::segment::{record_events, record_segment_from, Summary};
use crate::{Engine, EngineError, EngineResult};

/// Pieces that may wait in the queue: enough to ride out a slow put, few
/// enough that a stalled store holds a bounded amount of memory.
pub const QUEUE_SEGMENTS: usize = 4;

/// Tails of one size that are merged into one tail of the next size: each
/// byte is rewritten once per size (about three times in a segment of
/// refreshes of a few kilobytes) and a reader joins at most this many tails
/// of each size.
pub const TAIL_FANOUT: usize = 16;

/// Piece buffers the worker hands back for reuse: two, one being filled
/// while one is stored. A buffer larger than [`SPARE_BUFFER_MAX`] is freed
/// instead, so a burst does not stay held.
const SPARE_BUFFERS: usize = 2;
const SPARE_BUFFER_MAX: usize = 64 << 20;

/// Bytes of one segment received since the previous piece: `offset` bytes
/// into the segment, with the summary of the segment's records so far.
pub struct WalPiece {
    /// Timeline of the segment.
    pub timeline: TimelineId,
    /// First LSN of the segment.
    pub seg_start: Lsn,
    /// The segment's file name.
    pub name: String,
    /// Where `bytes` begin in the segment.
    pub offset: usize,
    /// The bytes, moved out of the receiver.
    pub bytes: Vec<u8>,
    /// What the segment's records said up to the end of `bytes`.
    pub summary: Summary,
}

/// One piece, with what it asks of the uploader.
pub enum Upload {
    /// The last piece of a segment: store the segment complete.
    Segment(WalPiece),
    /// A refresh: make the segment's prefix durable as a partial object.
    Partial(WalPiece),
}

/// What the worker did with one upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// WAL up to here is durable in the repository.
    pub end: Lsn,
    /// The complete segment stored, if it was one.
    pub segment: Option<String>,
    /// Whether an object was written (a partial refresh is skipped when a
    /// longer copy of the segment is stored already).
    pub wrote: bool,
}

/// The sending side, held by archivers.
#[derive(Clone)]
pub struct UploadQueue {
    tx: mpsc::Sender<Upload>,
    /// A partial refresh waits in the queue: the next one is not queued, so
    /// refreshes never take the room complete segments need.
    partial_queued: Arc<AtomicBool>,
    /// Emptied piece buffers, their pages still mapped: a receiver that
    /// took a fresh buffer for every piece faulted in all the WAL it
    /// received once more (a tenth of its CPU).
    spare: SpareBuffers,
}

/// See [`UploadQueue::buffer`].
#[derive(Clone, Default)]
struct SpareBuffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl SpareBuffers {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() == 0 || buffer.capacity() > SPARE_BUFFER_MAX {
            return;
        }
        buffer.clear();
        let mut spare = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(buffer);
        }
    }
}

fn stopped() -> EngineError {
    // Stands in for the worker's own error, which `finish` returns.
    EngineError::Failed("the WAL uploader stopped".into())
}

impl UploadQueue {
    /// An empty buffer for the next piece, one the worker handed back when
    /// there is one, else a new one with room for `capacity` bytes.
    pub fn buffer(&self, capacity: usize) -> Vec<u8> {
        self.spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    /// Queues the last piece of a segment, waiting while the queue is full.
    pub async fn segment(&self, piece: WalPiece) -> EngineResult<()> {
        self.tx
            .send(Upload::Segment(piece))
            .await
            .map_err(|_| stopped())
    }

    /// Queues a partial refresh, waiting while the queue is full.
    pub async fn partial(&self, piece: WalPiece) -> EngineResult<()> {
        self.partial_queued.store(true, Ordering::SeqCst);
        self.tx
            .send(Upload::Partial(piece))
            .await
            .map_err(|_| stopped())
    }

    /// Queues the refresh `build` makes if there is room and no other
    /// refresh waits; returns whether it was queued (`build` runs only
    /// then).
    pub fn offer_partial(&self, build: impl FnOnce() -> WalPiece) -> EngineResult<bool> {
        if self.partial_queued.load(Ordering::SeqCst) {
            return Ok(false);
        }
        match self.tx.try_reserve() {
            Ok(permit) => {
                self.partial_queued.store(true, Ordering::SeqCst);
                permit.send(Upload::Partial(build()));
                Ok(true)
            }
            Err(mpsc::error::TrySendError::Full(())) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(())) => Err(stopped()),
        }
    }
}

/// The receiving end of one uploader: its queue, its reports and its worker.
pub struct WalUploader {
    /// Taken only by [`WalUploader::finish`].
    queue: Option<UploadQueue>,
    reports: mpsc::UnboundedReceiver<Stored>,
    worker: Option<JoinHandle<EngineResult<()>>>,
    durable: Lsn,
    /// Set when the uploader is dropped unfinished (its task was aborted, as
    /// a cancelled backup's is): the worker stores nothing more, so no
    /// object appears after the caller stopped.
    abandoned: Arc<AtomicBool>,
}

impl Drop for WalUploader {
    fn drop(&mut self) {
        if self.worker.is_some() {
            self.abandoned.store(true, Ordering::SeqCst);
        }
    }
}

impl WalUploader {
    /// Starts a worker storing WAL of `instance_id`; WAL before `durable`
    /// is in the repository already.
    pub fn start(engine: Engine, instance_id: &str, durable: Lsn) -> WalUploader {
        let (tx, rx) = mpsc::channel(QUEUE_SEGMENTS);
        // Unbounded, yet small: one report per upload taken from the
        // bounded queue, read by the receiver as they come.
        let (report_tx, reports) = mpsc::unbounded_channel();
        let partial_queued = Arc::new(AtomicBool::new(false));
        let abandoned = Arc::new(AtomicBool::new(false));
        let spare = SpareBuffers::default();
        let worker = Worker {
            abandoned: abandoned.clone(),
            engine,
            instance_id: instance_id.into(),
            current: None,
            spare_payload: None,
            spare_buffers: spare.clone(),
            partial_queued: partial_queued.clone(),
            reports: report_tx,
        };
        let worker = tokio::spawn(worker.run(rx));
        WalUploader {
            queue: Some(UploadQueue {
                tx,
                partial_queued,
                spare,
            }),
            reports,
            worker: Some(worker),
            durable,
            abandoned,
        }
    }

    /// A sender for an archiver.
    pub fn queue(&self) -> UploadQueue {
        self.queue
            .clone()
            .expect("the queue is taken only by finish, which consumes the uploader")
    }

    /// End of the WAL known durable in the repository.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// The next upload done; `None` once the worker stopped (it failed:
    /// [`WalUploader::finish`] says why). Cancel-safe.
    pub async fn next_stored(&mut self) -> Option<Stored> {
        let stored = self.reports.recv().await?;
        self.durable = self.durable.max(stored.end);
        Some(stored)
    }

    /// Waits until everything queued is stored or the worker failed, after
    /// every [`UploadQueue`] handed out was dropped; returns the uploads
    /// done that were not yet seen, and the worker's outcome.
    pub async fn finish(mut self) -> (Vec<Stored>, EngineResult<()>) {
        drop(self.queue.take());
        let outcome = match self.worker.as_mut() {
            Some(worker) => match worker.await {
                Ok(outcome) => outcome,
                Err(e) => Err(EngineError::Failed(format!("the WAL uploader failed: {e}"))),
            },
            None => Ok(()),
        };
        self.worker = None;
        let mut left = Vec::new();
        while let Ok(stored) = self.reports.try_recv() {
            left.push(stored);
        }
        (left, outcome)
    }
}

/// The segment being received, as the worker holds it.
struct Current {
    timeline: TimelineId,
    seg_start: Lsn,
    /// Every byte received of it, compressed frame by frame; knows how much
    /// of it stored objects hold.
    payload: WalPayload,
    /// Whether this worker stored the prefix whole yet (its first refresh
    /// always does: tails need a prefix to extend).
    whole_stored: bool,
    /// The tails stored since, oldest first: where each begins in the
    /// segment, and its level (a merge of [`TAIL_FANOUT`] tails of level
    /// `n` is a tail of level `n + 1`).
    tails: Vec<(usize, u32)>,
    /// Recovery events of the segment already in the catalog (each piece
    /// carries all of the segment's so far).
    events_recorded: usize,
}

struct Worker {
    engine: Engine,
    instance_id: InstanceId,
    current: Option<Current>,
    /// The payload of the last segment finished, emptied for the next one
    /// (see [`WalPayload::reset`]).
    spare_payload: Option<WalPayload>,
    spare_buffers: SpareBuffers,
    partial_queued: Arc<AtomicBool>,
    abandoned: Arc<AtomicBool>,
    reports: mpsc::UnboundedSender<Stored>,
}

impl Worker {
    async fn run(self, mut queue: mpsc::Receiver<Upload>) -> EngineResult<()> {
        let mut worker = self;
        while let Some(upload) = queue.recv().await {
            if worker.abandoned.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Upload::Partial(_) = upload {
                worker.partial_queued.store(false, Ordering::SeqCst);
            }
            // Storing blocks (storage and catalog calls): on the blocking
            // pool, for this upload only.
            let outcome = tokio::task::spawn_blocking(move || {
                let stored = worker.store(upload);
                (worker, stored)
            })
            .await;
            let (back, stored) = match outcome {
                Ok(pair) => pair,
                Err(e) => {
                    queue.close();
                    return Err(EngineError::Failed(format!("the WAL uploader failed: {e}")));
                }
            };
            worker = back;
            let stored = match stored {
                Ok(stored) => stored,
                Err(e) => {
                    // Refuse more before the reports end, so a sender that
                    // saw them end is refused too.
                    queue.close();
                    return Err(e);
                }
            };
            // The receiver may be gone (shutting down): nothing to tell.
            let _ = worker.reports.send(stored);
        }
        Ok(())
    }

    /// Keeps a finished segment's payload for the next one, unless its
    /// buffers grew past [`SPARE_BUFFER_MAX`] (large segments): those are
    /// freed rather than held while the receiver idles.
    fn keep_payload(&mut self, payload: WalPayload) {
        self.spare_payload = (payload.capacity() <= SPARE_BUFFER_MAX).then_some(payload);
    }

    /// An empty payload: the last one finished, or a new one.
    fn payload(&mut self) -> EngineResult<WalPayload> {
        match self.spare_payload.take() {
            Some(mut payload) => {
                payload.reset();
                Ok(payload)
            }
            None => Ok(self.engine.repo.wal_payload()?),
        }
    }

    fn store(&mut self, upload: Upload) -> EngineResult<Stored> {
        let (mut piece, complete) = match upload {
            Upload::Segment(piece) => (piece, true),
            Upload::Partial(piece) => (piece, false),
        };
        let current = match self.current.take() {
            Some(c) if c.timeline == piece.timeline && c.seg_start == piece.seg_start => Some(c),
            Some(c) => {
                self.keep_payload(c.payload);
                None
            }
            None => None,
        };
        let mut current = match current {
            Some(current) => current,
            None => Current {
                timeline: piece.timeline,
                seg_start: piece.seg_start,
                payload: self.payload()?,
                whole_stored: false,
                tails: Vec::new(),
                events_recorded: 0,
            },
        };
        if current.payload.len() != piece.offset {
            return Err(EngineError::Failed(format!(
                "WAL segment {}: a piece from byte {} follows {} bytes",
                piece.name,
                piece.offset,
                current.payload.len()
            )));
        }
        current.payload.extend(&piece.bytes)?;
        self.spare_buffers.give(std::mem::take(&mut piece.bytes));
        if complete {
            let stored = self.store_segment(&mut current, piece);
            self.keep_payload(current.payload);
            stored
        } else {
            let stored = self.store_partial(&mut current, piece);
            self.current = Some(current);
            stored
        }
    }

    fn store_segment(&mut self, current: &mut Current, piece: WalPiece) -> EngineResult<Stored> {
        let repo = &self.engine.repo;
        let end = current.seg_start + current.payload.len() as u64;
        let checksum = current.payload.checksum();
        let done = Stored {
            end,
            segment: Some(piece.name.clone()),
            wrote: true,
        };
        // Another writer (a backup's WAL stream) may have stored it already.
        let catalog = &self.engine.catalog;
        let already = retry_busy("looking up a WAL segment", || {
            catalog.find_wal_segment(&self.instance_id, piece.timeline, &piece.name)
        })?
        .into_iter()
        .any(|w| !w.partial && w.checksum == checksum);
        let key = wal_segment_key(&self.instance_id, piece.timeline, &piece.name, false);
        if already
            && repo
                .storage()
                .exists(&key)
                .map_err(strata_repo::RepoError::from)?
        {
            record_events(
                &self.engine,
                &self.instance_id,
                piece.timeline,
                &piece.summary.events,
                current.events_recorded,
            )?;
            return Ok(done);
        }
        let meta = meta(
            &piece.name,
            piece.timeline,
            current.seg_start,
            end,
            false,
            checksum,
            piece.summary,
        );
        // A segment cut into small frames by refreshes (little WAL per
        // refresh) is compressed again as one frame, as small as it gets;
        // large frames are stored as they are, sparing a second
        // compression of every byte when WAL comes fast.
        let key = if current.payload.frames_too_small() {
            let data = current.payload.raw()?;
            repo.put_wal_segment(&self.instance_id, &meta, &data)?
        } else {
            repo.put_wal_payload(&self.instance_id, &meta, &mut current.payload)?
        };
        record_segment_from(
            &self.engine,
            &self.instance_id,
            &meta,
            key,
            current.events_recorded,
        )?;
        Ok(done)
    }

    fn store_partial(&mut self, current: &mut Current, piece: WalPiece) -> EngineResult<Stored> {
        let end = current.seg_start + current.payload.len() as u64;
        // Another writer may have stored more of this segment already;
        // never replace it with less.
        let catalog = &self.engine.catalog;
        let longer = retry_busy("looking up a WAL segment", || {
            catalog.find_wal_segment(&self.instance_id, piece.timeline, &piece.name)
        })?
        .iter()
        .any(|w| !w.partial || w.end_lsn >= end);
        let write = !longer && current.payload.unstored_len() > 0;
        if !write {
            // Stored by another writer: its events are still this one's.
            record_events(
                &self.engine,
                &self.instance_id,
                piece.timeline,
                &piece.summary.events,
                current.events_recorded,
            )?;
            current.events_recorded = piece.summary.events.len();
        }
        if write {
            let meta = meta(
                &piece.name,
                piece.timeline,
                current.seg_start,
                end,
                true,
                current.payload.checksum(),
                piece.summary,
            );
            let repo = &self.engine.repo;
            let key = if current.whole_stored {
                let from = current.payload.stored_len();
                let key =
                    repo.put_wal_tail(&self.instance_id, &meta, &mut current.payload, from)?;
                current.tails.push((from, 0));
                // Merge the newest tails while the last TAIL_FANOUT are of
                // one level: the merged tail ends where the newest does.
                while let Some(&(_, level)) = current.tails.last() {
                    let n = current.tails.len();
                    if n < TAIL_FANOUT
                        || current.tails[n - TAIL_FANOUT..]
                            .iter()
                            .any(|t| t.1 != level)
                    {
                        break;
                    }
                    let from = current.tails[n - TAIL_FANOUT].0;
                    repo.put_wal_tail(&self.instance_id, &meta, &mut current.payload, from)?;
                    current.tails.truncate(n - TAIL_FANOUT);
                    current.tails.push((from, level + 1));
                }
                key
            } else {
                let key = repo.put_wal_payload(&self.instance_id, &meta, &mut current.payload)?;
                current.whole_stored = true;
                current.tails.clear();
                key
            };
            record_segment_from(
                &self.engine,
                &self.instance_id,
                &meta,
                key,
                current.events_recorded,
            )?;
            current.events_recorded = meta.events.len();
        }
        Ok(Stored {
            end,
            segment: None,
            wrote: write,
        })
    }
}

fn meta(
    name: &str,
    timeline: TimelineId,
    begin_lsn: Lsn,
    end_lsn: Lsn,
    partial: bool,
    checksum: String,
    summary: Summary,
) -> WalSegmentMeta {
    WalSegmentMeta {
        timeline,
        segment: name.to_string(),
        begin_lsn,
        end_lsn,
        partial,
        checksum,
        first_commit: summary.first_commit,
        last_commit: summary.last_commit,
        commit_count: summary.commit_count,
        min_commit_xid: summary.min_xid,
        max_commit_xid: summary.max_xid,
        restore_points: summary.restore_points,
        events: summary.events,
        events_omitted: summary.events_omitted,
        stored_at: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_catalog::{Catalog, Instance, SqliteCatalog};
    use strata_repo::{LocalStorage, Repository, Storage};

    const SEG: u64 = 1 << 20;

    fn engine(dir: &std::path::Path) -> Engine {
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
        let engine = Engine::new(
            catalog,
            Repository::open_or_init(storage).unwrap(),
            crate::EngineSettings::default(),
        );
        engine
            .add_instance(&Instance::new(
                "i",
                "localhost",
                5432,
                "postgres",
                strata_catalog::SslMode::Disable,
            ))
            .unwrap();
        engine
    }

    fn partial(offset: usize, added: &[u8]) -> WalPiece {
        WalPiece {
            timeline: TimelineId(1),
            seg_start: Lsn(SEG),
            name: "000000010000000000000001".into(),
            offset,
            bytes: added.to_vec(),
            summary: Summary::default(),
        }
    }

    fn rows(engine: &Engine) -> Vec<(bool, Lsn)> {
        let mut rows: Vec<_> = engine
            .catalog
            .list_wal_segments("i")
            .unwrap()
            .into_iter()
            .map(|w| (w.partial, w.end_lsn))
            .collect();
        rows.sort();
        rows
    }

    /// Refreshes extend the partial object; a refresh shorter than what
    /// another writer stored is skipped; the complete segment replaces the
    /// partial one; each is reported with the end of what is durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_rules_hold_and_stores_are_reported_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let bytes: Vec<u8> = (0..SEG).map(|i| (i % 251) as u8).collect();

        let mut up = WalUploader::start(engine.clone(), "i", Lsn(SEG));
        let q = up.queue();
        q.partial(partial(0, &bytes[..100])).await.unwrap();
        q.partial(partial(100, &bytes[100..300])).await.unwrap();
        let first = up.next_stored().await.unwrap();
        let second = up.next_stored().await.unwrap();
        assert_eq!((first.end, first.wrote), (Lsn(SEG + 100), true));
        assert_eq!((second.end, second.wrote), (Lsn(SEG + 300), true));
        assert_eq!(up.durable(), Lsn(SEG + 300));
        assert_eq!(rows(&engine), vec![(true, Lsn(SEG + 300))]);
        // The partial object holds exactly the 300 bytes, checksum and all.
        let key = wal_segment_key("i", TimelineId(1), "000000010000000000000001", true);
        let (_, stored) = engine.repo.read_wal(&key).unwrap();
        assert_eq!(stored, &bytes[..300]);
        drop(q);
        let (left, outcome) = up.finish().await;
        assert!(left.is_empty());
        outcome.unwrap();

        // Another uploader (a new connection) starting the segment over
        // never replaces the 300 bytes with 200.
        let mut up = WalUploader::start(engine.clone(), "i", Lsn(SEG));
        let q = up.queue();
        q.partial(partial(0, &bytes[..200])).await.unwrap();
        let skipped = up.next_stored().await.unwrap();
        assert_eq!((skipped.end, skipped.wrote), (Lsn(SEG + 200), false));
        assert_eq!(rows(&engine), vec![(true, Lsn(SEG + 300))]);
        assert_eq!(engine.repo.read_wal(&key).unwrap().1, &bytes[..300]);

        // The complete segment deletes the partial object and its row.
        q.segment(partial(200, &bytes[200..])).await.unwrap();
        drop(q);
        let (left, outcome) = up.finish().await;
        outcome.unwrap();
        assert_eq!(
            left,
            vec![Stored {
                end: Lsn(2 * SEG),
                segment: Some("000000010000000000000001".into()),
                wrote: true
            }]
        );
        assert_eq!(rows(&engine), vec![(false, Lsn(2 * SEG))]);
        assert!(!engine.repo.storage().exists(&key).unwrap());
        let complete = wal_segment_key("i", TimelineId(1), "000000010000000000000001", false);
        assert_eq!(engine.repo.read_wal(&complete).unwrap().1, bytes);
    }

    /// A segment received in large pieces is stored complete from the
    /// frames the refreshes compressed, one received in small pieces as one
    /// new frame; either way the stored segment holds exactly the bytes
    /// received, and its partial object is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn complete_segments_hold_the_bytes_whatever_the_pieces() {
        let bytes: Vec<u8> = (0..SEG).map(|i| (i % 251) as u8).collect();
        let partial_key = wal_segment_key("i", TimelineId(1), "000000010000000000000001", true);
        let complete = wal_segment_key("i", TimelineId(1), "000000010000000000000001", false);
        for piece in [SEG as usize / 2, SEG as usize / 64] {
            let dir = tempfile::tempdir().unwrap();
            let engine = engine(dir.path());
            let mut up = WalUploader::start(engine.clone(), "i", Lsn(SEG));
            let q = up.queue();
            let mut offset = 0;
            while offset + piece < SEG as usize {
                q.partial(partial(offset, &bytes[offset..offset + piece]))
                    .await
                    .unwrap();
                offset += piece;
                assert_eq!(
                    up.next_stored().await.unwrap().end,
                    Lsn(SEG + offset as u64)
                );
            }
            q.segment(partial(offset, &bytes[offset..])).await.unwrap();
            drop(q);
            let (left, outcome) = up.finish().await;
            outcome.unwrap();
            assert_eq!(left[0].end, Lsn(2 * SEG));
            assert_eq!(engine.repo.read_wal(&complete).unwrap().1, bytes);
            assert!(!engine.repo.storage().exists(&partial_key).unwrap());
            assert_eq!(rows(&engine), vec![(false, Lsn(2 * SEG))]);
        }
    }

    /// A local store that counts the bytes put into it.
    #[derive(Debug)]
    struct Counting {
        inner: LocalStorage,
        put: std::sync::atomic::AtomicU64,
    }

    impl Storage for Counting {
        fn put(&self, key: &str, data: &[u8]) -> strata_repo::storage::StorageResult<()> {
            self.put.fetch_add(data.len() as u64, Ordering::SeqCst);
            self.inner.put(key, data)
        }
        fn get(&self, key: &str) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(
            &self,
            key: &str,
            o: u64,
            l: u64,
        ) -> strata_repo::storage::StorageResult<Vec<u8>> {
            self.inner.get_range(key, o, l)
        }
        fn list(&self, prefix: &str) -> strata_repo::storage::StorageResult<Vec<String>> {
            self.inner.list(prefix)
        }
        fn list_sizes(
            &self,
            prefix: &str,
        ) -> strata_repo::storage::StorageResult<Vec<strata_repo::ObjectSize>> {
            self.inner.list_sizes(prefix)
        }
        fn delete(&self, key: &str) -> strata_repo::storage::StorageResult<()> {
            self.inner.delete(key)
        }
        fn exists(&self, key: &str) -> strata_repo::storage::StorageResult<bool> {
            self.inner.exists(key)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    /// Many small refreshes store tails, not the prefix each time: the
    /// bytes written stay within a small multiple of the WAL received, the
    /// objects a reader joins stay bounded, and the joined prefix is exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refreshes_store_tails_and_cost_about_the_wal_received() {
        let dir = tempfile::tempdir().unwrap();
        let counting = Arc::new(Counting {
            inner: LocalStorage::new(dir.path()).unwrap(),
            put: Default::default(),
        });
        let storage: Arc<dyn Storage> = counting.clone();
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open_in_memory().unwrap());
        let engine = Engine::new(
            catalog,
            Repository::open_or_init(storage).unwrap(),
            crate::EngineSettings::default(),
        );
        // Random bytes: compression does not hide what is written.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let bytes: Vec<u8> = (0..SEG)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut up = WalUploader::start(engine.clone(), "i", Lsn(SEG));
        let q = up.queue();
        let key = wal_segment_key("i", TimelineId(1), "000000010000000000000001", true);
        let piece = 4096;
        let refreshes = 200;
        let put_before = counting.put.load(Ordering::SeqCst);
        let mut most_objects = 0;
        for n in 0..refreshes {
            q.partial(partial(n * piece, &bytes[n * piece..(n + 1) * piece]))
                .await
                .unwrap();
            let stored = up.next_stored().await.unwrap();
            assert_eq!(stored.end, Lsn(SEG + ((n + 1) * piece) as u64));
            assert!(stored.wrote);
            let tails = engine
                .repo
                .storage()
                .list(&format!("{key}.d/"))
                .unwrap()
                .len();
            most_objects = most_objects.max(tails + 1);
        }
        let written = counting.put.load(Ordering::SeqCst) - put_before;
        let received = (refreshes * piece) as u64;
        let (meta, read) = engine.repo.read_wal(&key).unwrap();
        assert_eq!(read, &bytes[..refreshes * piece]);
        assert_eq!(meta.end_lsn, Lsn(SEG + received));
        // 200 tails: 12 of the second level and 8 of the first at most.
        assert!(
            most_objects <= 1 + 2 * TAIL_FANOUT,
            "{most_objects} objects"
        );
        // Rewriting the whole prefix each time would write ~100 times the
        // WAL received (the sum of 1..=200 pieces); tails write each byte
        // once per level.
        assert!(
            written < 3 * received,
            "{written} bytes put for {received} bytes of WAL received"
        );
        drop(q);
        up.finish().await.1.unwrap();
    }

    /// One uploader storing segment after segment reuses the first one's
    /// payload for the next: the second segment, stored in small refreshes
    /// (tails) and then complete, holds exactly its own bytes, its partial
    /// object and tails begin at its own start, and nothing of the first
    /// segment's checksum or stored length carries over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payload_reused_for_the_next_segment_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let first: Vec<u8> = (0..SEG).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = (0..SEG).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        let name2 = "000000010000000000000002";
        let piece2 = |offset: usize, added: &[u8]| WalPiece {
            seg_start: Lsn(2 * SEG),
            name: name2.into(),
            ..partial(offset, added)
        };
        let mut up = WalUploader::start(engine.clone(), "i", Lsn(SEG));
        let q = up.queue();
        q.partial(partial(0, &first[..1000])).await.unwrap();
        q.segment(partial(1000, &first[1000..])).await.unwrap();
        let n = 40;
        let step = 4096;
        for k in 0..n {
            q.partial(piece2(k * step, &second[k * step..(k + 1) * step]))
                .await
                .unwrap();
        }
        let partial2 = wal_segment_key("i", TimelineId(1), name2, true);
        // Wait for every refresh: the partial object is the prefix so far.
        let mut durable = Lsn(0);
        while durable < Lsn(2 * SEG + (n * step) as u64) {
            durable = up.next_stored().await.unwrap().end;
        }
        let (meta, read) = engine.repo.read_wal(&partial2).unwrap();
        assert_eq!(read, &second[..n * step]);
        assert_eq!(meta.begin_lsn, Lsn(2 * SEG));
        assert_eq!(meta.checksum, engine.repo.wal_checksum(&second[..n * step]));
        q.segment(piece2(n * step, &second[n * step..]))
            .await
            .unwrap();
        drop(q);
        let (_, outcome) = up.finish().await;
        outcome.unwrap();
        let complete = |name: &str| wal_segment_key("i", TimelineId(1), name, false);
        assert_eq!(
            engine
                .repo
                .read_wal(&complete("000000010000000000000001"))
                .unwrap()
                .1,
            first
        );
        let (meta, read) = engine.repo.read_wal(&complete(name2)).unwrap();
        assert_eq!(read, second);
        assert_eq!(meta.checksum, engine.repo.wal_checksum(&second));
        assert!(!engine.repo.storage().exists(&partial2).unwrap());
        assert_eq!(
            rows(&engine),
            vec![(false, Lsn(2 * SEG)), (false, Lsn(3 * SEG))]
        );
    }

    /// A refresh that does not continue where the last one ended stops the
    /// worker with an error, which `finish` returns; the queue refuses more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_out_of_step_stops_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path());
        let mut up = WalUploader::start(engine.clone(), "i", Lsn(SEG));
        let q = up.queue();
        q.partial(partial(50, b"late")).await.unwrap();
        assert!(up.next_stored().await.is_none());
        assert!(q.partial(partial(0, b"more")).await.is_err());
        drop(q);
        let (_, outcome) = up.finish().await;
        assert!(
            matches!(outcome, Err(EngineError::Failed(m)) if m.contains("from byte 50 follows 0 bytes"))
        );
        assert!(rows(&engine).is_empty());
    }

    /// One refresh waits in the queue at most: the next is not queued, so
    /// refreshes never take the room complete segments need.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_one_refresh_waits_in_the_queue() {
        let (tx, _rx) = mpsc::channel(QUEUE_SEGMENTS);
        let q = UploadQueue {
            tx,
            partial_queued: Arc::new(AtomicBool::new(false)),
            spare: SpareBuffers::default(),
        };
        assert!(q.offer_partial(|| partial(0, b"a")).unwrap());
        assert!(!q.offer_partial(|| partial(1, b"b")).unwrap());
        assert_eq!(q.tx.capacity(), QUEUE_SEGMENTS - 1);
    }
}
