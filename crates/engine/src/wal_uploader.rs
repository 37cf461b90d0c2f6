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
//! failure stops the worker; [`WalUploader::finish`] returns it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Utc;
use pg_wal::{Lsn, TimelineId};
use strata_repo::{wal_segment_key, WalPayload, WalSegmentMeta};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    queue: UploadQueue,
    reports: mpsc::UnboundedReceiver<Stored>,
    worker: JoinHandle<EngineResult<()>>,
    durable: Lsn,
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
        let worker = Worker {
            engine,
            instance_id: instance_id.to_string(),
            partial: None,
            partial_queued: partial_queued.clone(),
            reports: report_tx,
        };
        let worker = tokio::task::spawn_blocking(move || worker.run(rx));
        WalUploader {
            queue: UploadQueue { tx, partial_queued },
            reports,
            worker,
            durable,
        }
    }

    /// A sender for an archiver.
    pub fn queue(&self) -> UploadQueue {
        self.queue.clone()
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
    pub async fn finish(self) -> (Vec<Stored>, EngineResult<()>) {
        let WalUploader {
            queue,
            mut reports,
            worker,
            ..
        } = self;
        drop(queue);
        let outcome = match worker.await {
            Ok(outcome) => outcome,
            Err(e) => Err(EngineError::Failed(format!("the WAL uploader failed: {e}"))),
        };
        let mut left = Vec::new();
        while let Ok(stored) = reports.try_recv() {
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
    instance_id: String,
    partial: Option<PartialObject>,
    partial_queued: Arc<AtomicBool>,
    reports: mpsc::UnboundedSender<Stored>,
}

impl Worker {
    fn run(mut self, mut queue: mpsc::Receiver<Upload>) -> EngineResult<()> {
        while let Some(upload) = queue.blocking_recv() {
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
        let already = self
            .engine
            .catalog
            .find_wal_segment(&self.instance_id, s.timeline, &s.name)?
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
        let longer = self
            .engine
            .catalog
            .find_wal_segment(&self.instance_id, p.timeline, &p.name)?
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
