//! A [`Storage`] wrapper that injects failures, for tests (feature
//! `fault-injection`): errors (transient or permanent), timeouts and slow
//! answers on a configurable fraction of calls.
//!
//! Whether a call fails is a pure function of the seed, the operation, the key
//! and how many times that operation was called on that key, so a run is
//! reproducible whatever order threads make their calls in, and a retry of
//! the same call gets a fresh draw. Half of the injected timeouts happen after
//! the call took effect, as a real timeout may: the caller cannot tell whether
//! a put landed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::{ObjectSize, Storage, StorageError, StorageResult};

/// Which failures to inject, and how often (fractions of calls, 0.0–1.0).
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Seed of every draw: the same seed and calls give the same faults.
    pub seed: u64,
    /// Calls answered with an error instead of being carried out.
    pub error_rate: f64,
    /// Of those errors, the fraction that are permanent (not worth a retry).
    pub permanent_share: f64,
    /// Calls that time out after `timeout_after` (half of them having taken effect).
    pub timeout_rate: f64,
    /// How long a timing-out call waits before failing.
    pub timeout_after: Duration,
    /// Calls carried out after an extra `slow_delay`.
    pub slow_rate: f64,
    /// Extra delay of a slow call.
    pub slow_delay: Duration,
    /// Only these operations fail (`put`, `get`, `get_range`, `list`,
    /// `delete`, `exists`); empty = all.
    pub ops: Vec<&'static str>,
    /// Only keys containing this fail (e.g. `.manifest`); `None` = all.
    pub keys_containing: Option<&'static str>,
}

impl FaultPlan {
    /// No faults at all; set the rates wanted on top.
    pub fn none(seed: u64) -> Self {
        FaultPlan {
            seed,
            error_rate: 0.0,
            permanent_share: 0.0,
            timeout_rate: 0.0,
            timeout_after: Duration::from_millis(50),
            slow_rate: 0.0,
            slow_delay: Duration::from_millis(50),
            ops: Vec::new(),
            keys_containing: None,
        }
    }
}

/// How many faults of each kind were injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Calls seen.
    pub calls: u64,
    /// Transient errors injected.
    pub transient_errors: u64,
    /// Permanent errors injected.
    pub permanent_errors: u64,
    /// Timeouts injected before the call took effect.
    pub timeouts_before: u64,
    /// Timeouts injected after the call took effect.
    pub timeouts_after: u64,
    /// Calls slowed down.
    pub slow: u64,
}

impl FaultCounts {
    /// Faults of every kind added up.
    pub fn faults(&self) -> u64 {
        self.transient_errors
            + self.permanent_errors
            + self.timeouts_before
            + self.timeouts_after
            + self.slow
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    transient_errors: AtomicU64,
    permanent_errors: AtomicU64,
    timeouts_before: AtomicU64,
    timeouts_after: AtomicU64,
    slow: AtomicU64,
}

enum Fault {
    None,
    Error { permanent: bool },
    Timeout { applied: bool },
    Slow,
}

/// Wraps `inner`, failing calls according to a [`FaultPlan`].
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    plan: FaultPlan,
    enabled: AtomicBool,
    seen: Mutex<HashMap<(&'static str, String), u64>>,
    counters: Counters,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner`, injecting the faults `plan` describes.
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        FaultyStorage {
            inner,
            plan,
            enabled: AtomicBool::new(true),
            seen: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// Turns injection on or off (e.g. off to inspect what a run left behind).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counters;
        FaultCounts {
            calls: c.calls.load(Ordering::SeqCst),
            transient_errors: c.transient_errors.load(Ordering::SeqCst),
            permanent_errors: c.permanent_errors.load(Ordering::SeqCst),
            timeouts_before: c.timeouts_before.load(Ordering::SeqCst),
            timeouts_after: c.timeouts_after.load(Ordering::SeqCst),
            slow: c.slow.load(Ordering::SeqCst),
        }
    }

    /// A uniform draw in [0, 1) from (seed, op, key, n, salt).
    fn draw(&self, op: &str, key: &str, n: u64, salt: u8) -> f64 {
        let mut h = blake3::Hasher::new();
        h.update(&self.plan.seed.to_le_bytes());
        h.update(op.as_bytes());
        h.update(&[0, salt]);
        h.update(key.as_bytes());
        h.update(&n.to_le_bytes());
        let bytes = h.finalize();
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes.as_bytes()[..8]);
        (u64::from_le_bytes(word) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn decide(&self, op: &'static str, key: &str) -> Fault {
        self.counters.calls.fetch_add(1, Ordering::SeqCst);
        let chosen = (self.plan.ops.is_empty() || self.plan.ops.contains(&op))
            && self
                .plan
                .keys_containing
                .is_none_or(|part| key.contains(part));
        if !self.enabled.load(Ordering::SeqCst) || !chosen {
            return Fault::None;
        }
        let n = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let n = seen.entry((op, key.to_string())).or_insert(0);
            *n += 1;
            *n
        };
        let p = &self.plan;
        let x = self.draw(op, key, n, 0);
        if x < p.error_rate {
            let permanent = self.draw(op, key, n, 1) < p.permanent_share;
            Fault::Error { permanent }
        } else if x < p.error_rate + p.timeout_rate {
            Fault::Timeout {
                applied: self.draw(op, key, n, 2) < 0.5,
            }
        } else if x < p.error_rate + p.timeout_rate + p.slow_rate {
            Fault::Slow
        } else {
            Fault::None
        }
    }

    fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        work: impl FnOnce() -> StorageResult<T>,
    ) -> StorageResult<T> {
        let c = &self.counters;
        match self.decide(op, key) {
            Fault::None => work(),
            Fault::Error { permanent } => {
                let (counter, message) = if permanent {
                    (&c.permanent_errors, "injected fault: 403 AccessDenied")
                } else {
                    (&c.transient_errors, "injected fault: 503 SlowDown")
                };
                counter.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::Remote {
                    op,
                    key: key.to_string(),
                    message: message.into(),
                    transient: !permanent,
                })
            }
            Fault::Timeout { applied } => {
                std::thread::sleep(self.plan.timeout_after);
                if applied {
                    c.timeouts_after.fetch_add(1, Ordering::SeqCst);
                    // The answer is lost, not the work.
                    let _ = work();
                } else {
                    c.timeouts_before.fetch_add(1, Ordering::SeqCst);
                }
                Err(StorageError::Timeout {
                    op,
                    key: key.to_string(),
                    after: self.plan.timeout_after,
                })
            }
            Fault::Slow => {
                c.slow.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(self.plan.slow_delay);
                work()
            }
        }
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.call("put", key, || self.inner.put(key, data))
    }

    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        self.call("put", key, || self.inner.put_bytes(key, data))
    }

    fn concurrent_puts(&self) -> usize {
        self.inner.concurrent_puts()
    }

    fn concurrent_reads(&self) -> usize {
        self.inner.concurrent_reads()
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.call("get", key, || self.inner.get(key))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.call("get_range", key, || self.inner.get_range(key, offset, len))
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        self.call("list", prefix, || self.inner.list(prefix))
    }

    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.call("list", prefix, || self.inner.list_sizes(prefix))
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        self.call("delete", key, || self.inner.delete(key))
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.call("exists", key, || self.inner.exists(key))
    }

    fn retain(&self, key: &str) -> StorageResult<()> {
        self.inner.retain(key)
    }

    fn describe(&self) -> String {
        format!("{} (with injected faults)", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStorage;

    fn faulty(plan: FaultPlan) -> (tempfile::TempDir, FaultyStorage<LocalStorage>) {
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStorage::new(LocalStorage::new(dir.path()).unwrap(), plan);
        (dir, s)
    }

    fn outcomes(s: &FaultyStorage<LocalStorage>) -> Vec<bool> {
        (0..200)
            .map(|i| s.put(&format!("k/{i}"), b"x").is_ok())
            .collect()
    }

    #[test]
    fn same_seed_same_faults_and_rates_roughly_hold() {
        let mut plan = FaultPlan::none(42);
        plan.error_rate = 0.3;
        plan.timeout_rate = 0.1;
        plan.timeout_after = Duration::from_millis(1);
        let (_a, s1) = faulty(plan.clone());
        let (_b, s2) = faulty(plan);
        let o1 = outcomes(&s1);
        assert_eq!(o1, outcomes(&s2));
        let failed = o1.iter().filter(|ok| !**ok).count();
        assert!((50..110).contains(&failed), "{failed} of 200 failed");
        let c = s1.counts();
        assert_eq!(c.calls, 200);
        assert_eq!(
            c.transient_errors + c.timeouts_before + c.timeouts_after,
            failed as u64
        );
        // A timeout that took effect left the object behind.
        assert!(c.timeouts_after > 0);
        assert_eq!(
            s1.inner().list("k").unwrap().len() as u64,
            200 - c.transient_errors - c.timeouts_before
        );
    }

    #[test]
    fn disabled_and_filtered_operations_pass() {
        let mut plan = FaultPlan::none(1);
        plan.error_rate = 1.0;
        plan.ops = vec!["get"];
        plan.keys_containing = Some("/x/");
        let (_d, s) = faulty(plan);
        s.put("a/x/b", b"1").unwrap();
        s.put("a/y/b", b"2").unwrap();
        assert!(s.get("a/x/b").unwrap_err().is_transient());
        assert_eq!(s.get("a/y/b").unwrap(), b"2");
        s.set_enabled(false);
        assert_eq!(s.get("a/x/b").unwrap(), b"1");
    }
}
