//! Job ownership as a lease: every job row names its owner (a random id
//! drawn once per process start) and carries a heartbeat the owner renews
//! while it runs. Whoever looks at the jobs and finds one whose heartbeat is
//! older than the lease takes it over (fails it, with its backup set).
//!
//! A PID is no owner: in a container the server is PID 1 of its namespace,
//! so a restarted server has the dead one's PID, and two hosts or two PID
//! namespaces sharing a catalog see unrelated processes under the same
//! number. An owner id plus a heartbeat means the same on SQLite and on a
//! catalog shared by several nodes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogResult, Job};

/// The lease a handle's owner keeps on its jobs until told otherwise
/// ([`crate::interface::JobCatalog::set_job_lease`]).
pub const DEFAULT_JOB_LEASE: Duration = Duration::from_secs(30);

/// What one catalog handle knows about leases besides its owner id: the
/// lease its owner keeps on its jobs (stored on each job it creates, claims
/// or renews, so that every observer judges the job by it and not by its
/// own setting), and when a call of this handle last found the catalog busy
/// or unreachable.
pub(crate) struct LeaseState {
    lease_ms: AtomicU64,
    unreachable_at: Mutex<Option<Instant>>,
}

impl LeaseState {
    pub(crate) fn new() -> LeaseState {
        LeaseState {
            lease_ms: AtomicU64::new(DEFAULT_JOB_LEASE.as_millis() as u64),
            unreachable_at: Mutex::new(None),
        }
    }

    pub(crate) fn set_lease(&self, lease: Duration) {
        // At most about 34 years: the catalog multiplies it into microseconds.
        let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        self.lease_ms.store(ms.clamp(1, 1 << 40), Ordering::Relaxed);
    }

    /// The owner's lease in milliseconds, as stored on its jobs.
    pub(crate) fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease_ms.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
    }

    /// Remembers when a call's answer says the catalog could not be used.
    pub(crate) fn note<T>(&self, answer: &CatalogResult<T>) {
        if matches!(answer, Err(e) if e.is_retryable()) {
            *self
                .unreachable_at
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    /// How long ago a call last found the catalog busy or unreachable
    /// (`None`: never). Until a job's whole lease has passed since, its
    /// owner may not have been able to renew either, and a heartbeat that
    /// looks expired proves nothing.
    pub(crate) fn since_unreachable(&self) -> Option<chrono::Duration> {
        self.unreachable_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| chrono::Duration::from_std(at.elapsed()).unwrap_or(chrono::Duration::MAX))
    }
}

/// A lease owner: 128 random bits as 32 hex digits, one per process start
/// (per catalog handle).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseOwner(String);

impl LeaseOwner {
    /// A fresh owner id.
    pub fn random() -> LeaseOwner {
        LeaseOwner(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// An owner id read back from the catalog.
    pub fn from_stored(id: String) -> LeaseOwner {
        LeaseOwner(id)
    }

    /// The owner id as stored in the catalog.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for LeaseOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a job was taken over from `owner`.
pub(crate) fn lease_expired_reason(job: &Job) -> String {
    let owner = if job.owner.as_str().is_empty() {
        "(none recorded)"
    } else {
        job.owner.as_str()
    };
    format!(
        "its owner {owner} (pid {}) stopped renewing its lease at {}; the job was taken over and failed",
        job.pid,
        job.heartbeat_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// Renews the leases of one catalog handle's jobs on a background thread,
/// every `interval`, until dropped. A process that runs jobs (the server,
/// or a CLI command backing up or restoring by itself) keeps one alive for
/// as long as it runs; the renewal is a single `UPDATE` that touches only
/// unfinished jobs of this owner.
pub struct LeaseKeeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Starts renewing `catalog`'s leases every `interval`.
    pub fn start(catalog: Arc<dyn Catalog>, interval: Duration) -> std::io::Result<LeaseKeeper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("strata-lease".into())
            .spawn(move || loop {
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {
                        // A failed renewal is retried at the next interval;
                        // only a lease that stays unrenewed expires.
                        let _ = catalog.renew_leases(Utc::now());
                    }
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })?;
        Ok(LeaseKeeper {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
