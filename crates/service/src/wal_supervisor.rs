//! WAL-receiver supervision: one receiver task per instance with log backup
//! on, restarted with exponential backoff when it fails, and the live state
//! (`received`, `failing`…) that `/metrics` reads and the owner publishes
//! for every node's API (see `receivers`).
//!
//! The receiver itself (START_REPLICATION, sealing and storing segments)
//! lives in the engine; this module only starts, watches and stops it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use strata_engine::{Engine, EngineError, Progress, WalReceiveOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::lock;

/// Live state of one instance's WAL receiver.
#[derive(Debug, Clone, Default)]
pub struct WalReceiverState {
    /// Whether a receiver task runs.
    pub running: bool,
    /// LSN received and stored so far, and the server's end of WAL.
    pub received: u64,
    /// The server's end of WAL at the last status message.
    pub server_end: u64,
    /// When the server last sent anything (its acceptance of
    /// START_REPLICATION included): `None` until the receiver streams.
    pub last_message: Option<DateTime<Utc>>,
    /// The last error, kept after recovery for the record.
    pub last_error: Option<String>,
    /// Reconnections since the service started.
    pub restarts: u64,
    /// Why the receiver is failing (its last error, e.g. a full
    /// repository), until it stores WAL again; `None` while it works.
    pub failing: Option<String>,
    /// Failures in a row behind `failing`.
    pub failures: u32,
    /// When the current run of failures began.
    pub failing_since: Option<DateTime<Utc>>,
    /// Since when the server cannot be reached (refused, timed out, the
    /// connection lost), while that is why the receiver fails.
    pub unreachable_since: Option<DateTime<Utc>>,
}

impl WalReceiverState {
    /// Streaming and not failing: what `strata_wal_receiver_up` reports.
    /// A receiver still connecting is not up: a server that is gone must
    /// not look healthy until the first attempt gives up.
    pub fn is_up(&self) -> bool {
        self.running && self.failing.is_none() && self.last_message.is_some()
    }
}

/// The receiver states of every instance, shared with the receiver tasks.
type States = Arc<Mutex<HashMap<String, WalReceiverState>>>;

/// Records a failure of an instance's receiver and logs it: the first one
/// (and a change of cause) at WARN, a failure that persists at ERROR.
/// `unreachable`: the cause is that the server cannot be reached.
fn note_receiver_failure(
    states: &Mutex<HashMap<String, WalReceiverState>>,
    instance_id: &str,
    (error, unreachable): (&str, bool),
    attempt: u32,
    retry_in: Duration,
) {
    let changed = {
        let mut states = lock(states);
        let s = states.entry(instance_id.to_string()).or_default();
        let changed = s.failing.as_deref() != Some(error);
        let now = Utc::now();
        if s.failing.is_none() {
            s.failing_since = Some(now);
        }
        s.unreachable_since = if unreachable {
            s.unreachable_since.or(Some(now))
        } else {
            None
        };
        s.failing = Some(error.to_string());
        s.failures = attempt.max(s.failures.saturating_add(1));
        changed
    };
    let secs = retry_in.as_secs();
    if attempt <= 1 || changed {
        tracing::warn!(instance = %instance_id, "WAL receiver failing: {error}; retrying in {secs}s");
    } else {
        tracing::error!(
            instance = %instance_id,
            "WAL receiver still failing after {attempt} attempts: {error}; retrying in {secs}s"
        );
    }
}

/// Records that a receiver streams again; returns the failure it recovered
/// from and how many attempts failed, if it was failing.
fn note_receiver_recovered(
    states: &Mutex<HashMap<String, WalReceiverState>>,
    instance_id: &str,
) -> Option<(String, u32)> {
    let mut states = lock(states);
    let s = states.entry(instance_id.to_string()).or_default();
    s.failing_since = None;
    s.unreachable_since = None;
    let failures = std::mem::take(&mut s.failures);
    s.failing.take().map(|error| (error, failures))
}

/// Whether `e` says the server cannot be reached (as opposed to refusing,
/// or Strata's storage failing).
fn is_unreachable(e: &EngineError) -> bool {
    matches!(e, EngineError::Unreachable(_))
}

/// Records a receiver's position for `/metrics`.
struct WalProgress {
    instance_id: String,
    states: States,
}

impl Progress for WalProgress {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}

    fn message(&self, text: &str) {
        tracing::info!(instance = %self.instance_id, "{text}");
    }

    fn wal_position(&self, received: u64, server_end: u64) {
        let mut states = lock(&self.states);
        let s = states.entry(self.instance_id.clone()).or_default();
        s.received = received;
        s.server_end = server_end.max(received);
        s.last_message = Some(Utc::now());
        s.last_error = None;
    }

    fn wal_failing(&self, error: &EngineError, attempt: u32, retry_in: Duration) {
        note_receiver_failure(
            &self.states,
            &self.instance_id,
            (&error.to_string(), is_unreachable(error)),
            attempt,
            retry_in,
        );
    }

    fn wal_streaming(&self) {
        let mut states = lock(&self.states);
        let s = states.entry(self.instance_id.clone()).or_default();
        s.last_message = Some(Utc::now());
    }

    fn wal_recovered(&self) {
        if let Some((error, failures)) = note_receiver_recovered(&self.states, &self.instance_id) {
            tracing::warn!(
                instance = %self.instance_id,
                "WAL receiver streaming again after {failures} failed attempts (last: {error})"
            );
        }
    }
}

struct ReceiverTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The receiver tasks this process runs and their states.
pub(crate) struct WalSupervisor {
    receivers: Mutex<HashMap<String, ReceiverTask>>,
    states: States,
    /// Longest wait before a failed receiver is started again.
    backoff_max: Duration,
}

impl WalSupervisor {
    /// No receivers yet; failed ones wait at most `backoff_max` to restart.
    pub(crate) fn new(backoff_max: Duration) -> Self {
        WalSupervisor {
            receivers: Mutex::new(HashMap::new()),
            states: Arc::new(Mutex::new(HashMap::new())),
            backoff_max,
        }
    }

    /// Starts a receiver for `instance_id` unless one runs or `refused()`
    /// says the instance is on its way out. `refused` is asked while the
    /// receiver table is locked, so a caller that marks the instance and
    /// then stops its receiver cannot miss one started concurrently.
    pub(crate) fn ensure(
        &self,
        engine: &Engine,
        instance_id: &str,
        refused: impl FnOnce() -> bool,
    ) {
        let mut receivers = lock(&self.receivers);
        if receivers.contains_key(instance_id) || refused() {
            return;
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(
            engine.clone(),
            Arc::clone(&self.states),
            instance_id.to_string(),
            stop_rx,
            self.backoff_max,
        ));
        receivers.insert(instance_id.to_string(), ReceiverTask { stop, task });
    }

    /// Whether this process runs a receiver for `instance_id`.
    pub(crate) fn runs(&self, instance_id: &str) -> bool {
        lock(&self.receivers).contains_key(instance_id)
    }

    /// The instances with a receiver task.
    pub(crate) fn instances(&self) -> Vec<String> {
        lock(&self.receivers).keys().cloned().collect()
    }

    /// Forgets receivers whose task ended on its own (instance gone).
    pub(crate) fn reap(&self) {
        lock(&self.receivers).retain(|_, r| !r.task.is_finished());
    }

    /// Stops the receiver of `instance_id` (it flushes its partial segment)
    /// and waits up to 30 s for it.
    pub(crate) async fn stop(&self, instance_id: &str) {
        let task = lock(&self.receivers).remove(instance_id);
        if let Some(r) = task {
            let _ = r.stop.send(true);
            if tokio::time::timeout(Duration::from_secs(30), r.task)
                .await
                .is_err()
            {
                tracing::warn!(instance = %instance_id, "WAL receiver did not stop within 30 s");
            }
        }
    }

    /// The receiver state of an instance (default when none ran).
    pub(crate) fn state(&self, instance_id: &str) -> WalReceiverState {
        lock(&self.states)
            .get(instance_id)
            .cloned()
            .unwrap_or_default()
    }

    /// The instances with a state in memory (their receiver runs or ran).
    pub(crate) fn instances_with_state(&self) -> Vec<String> {
        lock(&self.states).keys().cloned().collect()
    }

    /// Drops the state of an instance that is gone.
    pub(crate) fn forget(&self, instance_id: &str) {
        lock(&self.states).remove(instance_id);
    }
}

impl crate::Service {
    /// Starts the receiver of `instance_id` unless one runs or the instance
    /// is leaving.
    pub(crate) fn ensure_receiver(&self, instance_id: &str) {
        self.wal.ensure(&self.engine, instance_id, || {
            self.leaving.contains(instance_id)
        });
    }

    /// Stops the WAL receiver and drops its replication slot, so the server
    /// keeps no WAL for Strata. A slot that cannot be dropped is logged: the
    /// caller's change (policy off, instance gone) stands either way.
    pub(crate) async fn stop_archiving(&self, instance_id: &str) {
        self.wal.stop(instance_id).await;
        if let Err(e) = self.engine.drop_wal_slot(instance_id).await {
            tracing::warn!(instance = %instance_id, "could not drop the replication slot: {e}");
        }
    }
}

/// One instance's receiver: runs it until `stop_rx` turns true, restarting
/// it after a failure with a doubling delay capped at `backoff_max`.
async fn supervise(
    engine: Engine,
    states: States,
    id: String,
    stop_rx: watch::Receiver<bool>,
    backoff_max: Duration,
) {
    let progress = WalProgress {
        instance_id: id.clone(),
        states: Arc::clone(&states),
    };
    let mut delay = Duration::from_secs(2).min(backoff_max);
    loop {
        lock(&states).entry(id.clone()).or_default().running = true;
        let outcome = engine
            .receive_wal(
                &id,
                stop_rx.clone(),
                WalReceiveOptions::default(),
                &progress,
            )
            .await;
        {
            let mut st = lock(&states);
            let s = st.entry(id.clone()).or_default();
            s.running = false;
            if let Err(e) = &outcome {
                s.last_error = Some(e.to_string());
                s.restarts += 1;
            }
        }
        if *stop_rx.borrow() {
            return;
        }
        if let Err(e) = outcome {
            let attempt = lock(&states).get(&id).map_or(0, |s| s.failures) + 1;
            let text = e.to_string();
            note_receiver_failure(&states, &id, (&text, is_unreachable(&e)), attempt, delay);
        }
        let mut stop_wait = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_wait.changed() => return,
        }
        delay = (delay * 2).min(backoff_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_up_and_recovery_clears_them() {
        let states = Mutex::new(HashMap::new());
        let retry = Duration::from_secs(2);
        note_receiver_failure(&states, "a", ("repository full", false), 1, retry);
        note_receiver_failure(&states, "a", ("repository full", false), 2, retry);
        let s = lock(&states).get("a").cloned().unwrap();
        assert_eq!(s.failing.as_deref(), Some("repository full"));
        assert_eq!(s.failures, 2);
        assert_eq!(
            s.unreachable_since, None,
            "a full repository is no unreachable server"
        );
        let since = s.failing_since.expect("a failing receiver says since when");
        // A new cause keeps the start of the run of failures; the server
        // is unreachable from its first such failure on.
        note_receiver_failure(&states, "a", ("connection refused", true), 1, retry);
        let s = lock(&states).get("a").cloned().unwrap();
        assert_eq!(s.failing.as_deref(), Some("connection refused"));
        assert_eq!(s.failures, 3);
        assert_eq!(s.failing_since, Some(since));
        let unreachable = s.unreachable_since.expect("unreachable since when");
        note_receiver_failure(&states, "a", ("connection timed out", true), 4, retry);
        let s = lock(&states).get("a").cloned().unwrap();
        assert_eq!(s.unreachable_since, Some(unreachable));
        assert!(!WalReceiverState {
            running: true,
            last_message: Some(Utc::now()),
            ..s
        }
        .is_up());
        assert_eq!(
            note_receiver_recovered(&states, "a"),
            Some(("connection timed out".to_string(), 4))
        );
        let s = lock(&states).get("a").cloned().unwrap();
        assert_eq!(
            (
                s.failing.clone(),
                s.failures,
                s.failing_since,
                s.unreachable_since
            ),
            (None, 0, None, None)
        );
        // Up only once the server streams, not while still connecting.
        assert!(!WalReceiverState {
            running: true,
            ..s.clone()
        }
        .is_up());
        assert!(WalReceiverState {
            running: true,
            last_message: Some(Utc::now()),
            ..s
        }
        .is_up());
        // Recovering without a failure reports nothing; other instances are untouched.
        assert_eq!(note_receiver_recovered(&states, "a"), None);
        assert!(!lock(&states).contains_key("b"));
    }
}
