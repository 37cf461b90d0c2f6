//! WAL receiver states every node can answer with.
//!
//! A receiver runs on its instance's owner only, and its live state
//! (streaming, failing and why, last message, LSNs) is in that node's
//! memory. Each scheduler round the owner publishes the states of the
//! instances it owns into the catalog: at once when the state's shape
//! changes (started, stopped, first message, a failure or recovery), and
//! otherwise at most every [`PUBLISH_INTERVAL`] while only its progress
//! moves. A node that does not own an instance answers `DescribeDBInstances`
//! from the published row; the owner answers from memory. `/metrics` stays
//! per node and reads memory only.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use strata_catalog::{CatalogResult, ReceiverStatus};

use crate::{lock, Service, WalReceiverState};

/// How often an owner republishes a receiver whose only change is progress.
pub(crate) const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

/// What this node last published, per instance, and when.
#[derive(Default)]
pub(crate) struct Published(Mutex<HashMap<String, (WalReceiverState, Instant)>>);

/// The parts of a state whose change is published at once: those that
/// change the state word (`Starting`, `Streaming`, `Failing`), the error,
/// or whether the server is reachable.
fn shape(s: &WalReceiverState) -> (bool, bool, Option<&str>, Option<&str>, bool) {
    (
        s.running,
        s.last_message.is_some(),
        s.failing.as_deref(),
        s.last_error.as_deref(),
        s.unreachable_since.is_some(),
    )
}

/// Whether `current` is to be published at `now`, given what was last
/// published and when.
fn publish_due(
    last: Option<&(WalReceiverState, Instant)>,
    current: &WalReceiverState,
    now: Instant,
) -> bool {
    let Some((published, at)) = last else {
        return true;
    };
    if shape(published) != shape(current) {
        return true;
    }
    let moved = published.received != current.received
        || published.server_end != current.server_end
        || published.last_message != current.last_message;
    moved && now.duration_since(*at) >= PUBLISH_INTERVAL
}

fn to_row(node_id: &str, instance_id: &str, s: &WalReceiverState) -> ReceiverStatus {
    ReceiverStatus {
        instance_id: instance_id.to_string(),
        node_id: node_id.to_string(),
        running: s.running,
        received_lsn: s.received,
        server_end_lsn: s.server_end,
        last_message_at: s.last_message,
        last_error: s.last_error.clone(),
        failing: s.failing.clone(),
        failing_since: s.failing_since,
        unreachable_since: s.unreachable_since,
        published_at: Utc::now(),
    }
}

fn from_row(r: ReceiverStatus) -> WalReceiverState {
    WalReceiverState {
        running: r.running,
        received: r.received_lsn,
        server_end: r.server_end_lsn,
        last_message: r.last_message_at,
        last_error: r.last_error,
        failing: r.failing,
        failing_since: r.failing_since,
        unreachable_since: r.unreachable_since,
        ..WalReceiverState::default()
    }
}

impl Service {
    /// Publishes the receiver states of the instances this node owns that
    /// are due ([`publish_due`]); forgets what it published for instances it
    /// no longer owns, so it publishes afresh if they come back.
    pub(crate) async fn publish_receivers(self: &Arc<Self>, instance_ids: &[String]) {
        let now = Instant::now();
        let due: Vec<(String, WalReceiverState)> = {
            let mut published = lock(&self.published.0);
            published.retain(|id, _| self.owns(id));
            instance_ids
                .iter()
                .filter(|id| self.owns(id))
                .map(|id| (id.clone(), self.wal.state(id)))
                .filter(|(id, s)| publish_due(published.get(id), s, now))
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let svc = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || {
            let mut done = Vec::new();
            for (id, s) in due {
                let row = to_row(svc.node_id(), &id, &s);
                match svc.engine.catalog().publish_receiver(&row) {
                    Ok(()) => done.push((id, s)),
                    Err(e) => {
                        tracing::warn!(instance = %id, "publishing the WAL receiver state: {e}");
                        break;
                    }
                }
            }
            done
        })
        .await;
        if let Ok(done) = written {
            let mut published = lock(&self.published.0);
            for (id, s) in done {
                published.insert(id, (s, now));
            }
        }
    }

    /// The WAL receiver state of an instance as every node answers it: this
    /// node's own when it owns the instance, else what its owner published
    /// (default when nothing was).
    pub fn wal_state(&self, instance_id: &str) -> CatalogResult<WalReceiverState> {
        if self.owns(instance_id) {
            return Ok(self.wal.state(instance_id));
        }
        Ok(self
            .engine
            .catalog()
            .get_receiver(instance_id)?
            .map(from_row)
            .unwrap_or_default())
    }

    /// [`Service::wal_state`] of every instance with a state to tell, by id,
    /// in one catalog read.
    pub fn wal_states(&self) -> CatalogResult<BTreeMap<String, WalReceiverState>> {
        let mut states: BTreeMap<String, WalReceiverState> = self
            .engine
            .catalog()
            .list_receivers()?
            .into_iter()
            .filter(|r| !self.owns(&r.instance_id))
            .map(|r| (r.instance_id.clone(), from_row(r)))
            .collect();
        for id in self.wal.instances_with_state() {
            if self.owns(&id) {
                let s = self.wal.state(&id);
                states.insert(id, s);
            }
        }
        Ok(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaming(received: u64) -> WalReceiverState {
        WalReceiverState {
            running: true,
            received,
            server_end: received,
            last_message: Some(chrono::DateTime::UNIX_EPOCH),
            ..WalReceiverState::default()
        }
    }

    #[test]
    fn a_change_of_state_is_published_at_once_and_progress_at_most_every_interval() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_secs(1);
        let later = t0 + PUBLISH_INTERVAL;
        assert!(publish_due(None, &WalReceiverState::default(), t0));
        let last = (streaming(100), t0);
        // Unchanged: never republished.
        assert!(!publish_due(Some(&last), &streaming(100), later));
        // Progress only: not before the interval.
        assert!(!publish_due(Some(&last), &streaming(200), soon));
        assert!(publish_due(Some(&last), &streaming(200), later));
        // A failure, a recovery's error, a stop: at once.
        let failing = WalReceiverState {
            failing: Some("disk full".into()),
            ..streaming(100)
        };
        assert!(publish_due(Some(&last), &failing, soon));
        let stopped = WalReceiverState {
            running: false,
            ..streaming(100)
        };
        assert!(publish_due(Some(&last), &stopped, soon));
        let unreachable = WalReceiverState {
            unreachable_since: Some(chrono::DateTime::UNIX_EPOCH),
            ..streaming(100)
        };
        assert!(publish_due(Some(&last), &unreachable, soon));
    }

    #[test]
    fn a_published_row_reads_back_as_the_owners_state() {
        let since = chrono::DateTime::UNIX_EPOCH + chrono::Duration::seconds(60);
        let s = WalReceiverState {
            failing: Some("could not connect".into()),
            last_error: Some("could not connect".into()),
            failing_since: Some(since),
            unreachable_since: Some(since),
            ..streaming(0x1_0000_0028)
        };
        let back = from_row(to_row("node-a", "pg-1", &s));
        assert_eq!(
            (
                back.running,
                back.received,
                back.server_end,
                back.last_message,
                back.failing.as_deref(),
                back.last_error.as_deref(),
                back.failing_since,
                back.unreachable_since
            ),
            (
                s.running,
                s.received,
                s.server_end,
                s.last_message,
                s.failing.as_deref(),
                s.last_error.as_deref(),
                s.failing_since,
                s.unreachable_since
            )
        );
    }
}
