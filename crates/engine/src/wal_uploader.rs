//! The background uploader of received WAL: a worker on tokio's blocking
//! pool, fed by a bounded queue, that compresses, seals and stores the
//! segments a [`SegmentArchiver`](crate::segment::SegmentArchiver) hands
//! over and records them in the catalog, in the order received.
//!
//! The task that reads a replication socket never waits on storage (the
//! concurrency rule in docs/DESIGN.md): a slow put (S3, a busy disk) only
//! fills the queue, and only a full queue stops the reader (backpressure,
//! so memory stays bounded at [`QUEUE_SEGMENTS`] segments). The worker
//! reports each object stored back to the reader, which acknowledges to the
//! server only WAL that is durable in the repository. The first storing
//! failure stops the worker; [`WalUploader::finish`] returns it. An
//! uploader dropped unfinished (its task aborted) stores nothing more.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Utc;
use pg_wal::{Lsn, TimelineId};
use strata_repo::{wal_segment_key, InstanceId, WalPayload, WalSegmentMeta};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::catalog_retry::retry_busy;
use crate::segment::{record_segment, Summary};
use crate::{Engine, EngineError, EngineResult};

/// Complete segments that may wait in the queue: enough to ride out a slow
/// put, few enough that a stalled store holds a bounded amount of memory.
pub const QUEUE_SEGMENTS: usize = 4;

/// A complete segment, its bytes moved out of the receiver.
pub struct SegmentUpload {
    pub timeline: TimelineId,
    pub seg_start: Lsn,
    pub name: String,
    pub data: Vec<u8>,
    pub summary: Summary,
}

/// A refresh of the current segment's partial object: the bytes received
/// since the previous refresh, which begin `offset` bytes into the segment.
pub struct PartialUpload {
    pub timeline: TimelineId,
    pub seg_start: Lsn,
    pub name: String,
    pub offset: usize,
    pub added: Vec<u8>,
    pub summary: Summary,
}

pub enum Upload {
    Segment(SegmentUpload),
    Partial(PartialUpload),
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
}

fn stopped() -> EngineError {
    // Stands in for the worker's own error, which `finish` returns.
    EngineError::Failed("the WAL uploader stopped".into())
}

impl UploadQueue {
    /// Queues a complete segment, waiting while the queue is full.
    pub async fn segment(&self, upload: SegmentUpload) -> EngineResult<()> {
        self.tx
            .send(Upload::Segment(upload))
            .await
            .map_err(|_| stopped())
    }

    /// Queues a partial refresh, waiting while the queue is full.
    pub async fn partial(&self, upload: PartialUpload) -> EngineResult<()> {
        self.partial_queued.store(true, Ordering::SeqCst);
        self.tx
            .send(Upload::Partial(upload))
            .await
            .map_err(|_| stopped())
    }

    /// Queues the refresh `build` makes if there is room and no other
    /// refresh waits; returns whether it was queued.
    pub fn offer_partial(&self, build: impl FnOnce() -> PartialUpload) -> EngineResult<bool> {
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
        let worker = Worker {
            abandoned: abandoned.clone(),
            engine,
            instance_id: instance_id.into(),
            partial: None,
            partial_queued: partial_queued.clone(),
            reports: report_tx,
        };
        let worker = tokio::task::spawn_blocking(move || worker.run(rx));
        WalUploader {
            queue: Some(UploadQueue { tx, partial_queued }),
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

/// The current segment as its partial object holds it.
struct PartialObject {
    timeline: TimelineId,
    seg_start: Lsn,
    /// Bytes in the stored object, compressed frame by frame.
    payload: WalPayload,
    /// Bytes received after those, compressed when the object is next
    /// written.
    waiting: Vec<u8>,
}

impl PartialObject {
    fn len(&self) -> usize {
        self.payload.len() + self.waiting.len()
    }
}

struct Worker {
    engine: Engine,
    instance_id: InstanceId,
    partial: Option<PartialObject>,
    partial_queued: Arc<AtomicBool>,
    abandoned: Arc<AtomicBool>,
    reports: mpsc::UnboundedSender<Stored>,
}

impl Worker {
    fn run(mut self, mut queue: mpsc::Receiver<Upload>) -> EngineResult<()> {
        while let Some(upload) = queue.blocking_recv() {
            if self.abandoned.load(Ordering::SeqCst) {
                return Ok(());
            }
            let stored = match upload {
                Upload::Segment(s) => self.store_segment(s)?,
                Upload::Partial(p) => {
                    self.partial_queued.store(false, Ordering::SeqCst);
                    self.store_partial(p)?
                }
            };
            // The receiver may be gone (shutting down): nothing to tell.
            let _ = self.reports.send(stored);
        }
        Ok(())
    }

    fn store_segment(&mut self, s: SegmentUpload) -> EngineResult<Stored> {
        let repo = &self.engine.repo;
        let end = s.seg_start + s.data.len() as u64;
        if self
            .partial
            .as_ref()
            .is_some_and(|p| p.timeline == s.timeline && p.seg_start == s.seg_start)
        {
            self.partial = None;
        }
        let checksum = repo.wal_checksum(&s.data);
        let done = Stored {
            end,
            segment: Some(s.name.clone()),
            wrote: true,
        };
        // Another writer (a backup's WAL stream) may have stored it already.
        let catalog = &self.engine.catalog;
        let already = retry_busy("looking up a WAL segment", || {
            catalog.find_wal_segment(&self.instance_id, s.timeline, &s.name)
        })?
        .into_iter()
        .any(|w| !w.partial && w.checksum == checksum);
        let key = wal_segment_key(&self.instance_id, s.timeline, &s.name, false);
        if already
            && repo
                .storage()
                .exists(&key)
                .map_err(strata_repo::RepoError::from)?
        {
            return Ok(done);
        }
        let meta = meta(
            &s.name,
            s.timeline,
            s.seg_start,
            end,
            false,
            checksum,
            s.summary,
        );
        let key = repo.put_wal_segment(&self.instance_id, &meta, &s.data)?;
        record_segment(&self.engine, &self.instance_id, &meta, key)?;
        Ok(done)
    }

    fn store_partial(&mut self, p: PartialUpload) -> EngineResult<Stored> {
        let current = self
            .partial
            .take()
            .filter(|o| o.timeline == p.timeline && o.seg_start == p.seg_start);
        let mut object = current.unwrap_or_else(|| PartialObject {
            timeline: p.timeline,
            seg_start: p.seg_start,
            payload: self.engine.repo.wal_payload(),
            waiting: Vec::new(),
        });
        if object.len() != p.offset {
            return Err(EngineError::Failed(format!(
                "WAL segment {}: a partial refresh from byte {} follows {} bytes",
                p.name,
                p.offset,
                object.len()
            )));
        }
        object.waiting.extend_from_slice(&p.added);
        let end = p.seg_start + object.len() as u64;
        // Another writer may have stored more of this segment already;
        // never replace it with less.
        let catalog = &self.engine.catalog;
        let longer = retry_busy("looking up a WAL segment", || {
            catalog.find_wal_segment(&self.instance_id, p.timeline, &p.name)
        })?
        .iter()
        .any(|w| !w.partial || w.end_lsn >= end);
        if !longer {
            object.payload.extend(&object.waiting)?;
            object.waiting.clear();
            let checksum = object.payload.checksum();
            let meta = meta(
                &p.name,
                p.timeline,
                p.seg_start,
                end,
                true,
                checksum,
                p.summary,
            );
            let repo = &self.engine.repo;
            let key = repo.put_wal_payload(&self.instance_id, &meta, &object.payload)?;
            record_segment(&self.engine, &self.instance_id, &meta, key)?;
        }
        self.partial = Some(object);
        Ok(Stored {
            end,
            segment: None,
            wrote: !longer,
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

    fn partial(offset: usize, added: &[u8]) -> PartialUpload {
        PartialUpload {
            timeline: TimelineId(1),
            seg_start: Lsn(SEG),
            name: "000000010000000000000001".into(),
            offset,
            added: added.to_vec(),
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
        q.segment(SegmentUpload {
            timeline: TimelineId(1),
            seg_start: Lsn(SEG),
            name: "000000010000000000000001".into(),
            data: bytes.clone(),
            summary: Summary::default(),
        })
        .await
        .unwrap();
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
        assert!(matches!(outcome, Err(EngineError::Failed(m)) if m.contains("from byte 50")));
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
        };
        assert!(q.offer_partial(|| partial(0, b"a")).unwrap());
        assert!(!q.offer_partial(|| partial(1, b"b")).unwrap());
        assert_eq!(q.tx.capacity(), QUEUE_SEGMENTS - 1);
    }
}
