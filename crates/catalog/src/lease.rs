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

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::{Catalog, Job};

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
