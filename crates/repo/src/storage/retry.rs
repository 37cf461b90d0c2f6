//! Retries with exponential backoff around any [`Storage`].
//!
//! A call is retried when, and only when, its error says
//! [`StorageError::is_transient`]. Delays grow exponentially from
//! `base_delay` up to `max_delay`, with "full jitter" (a random delay between
//! zero and the exponential bound, as in the AWS Architecture Blog's
//! "Exponential Backoff and Jitter") so that many writers failing together do
//! not retry in lockstep. Every trait method is idempotent (a put replaces
//! the whole object, a delete of an absent key succeeds), so repeating a call
//! whose first attempt did take effect is harmless.

use std::time::Duration;

use bytes::Bytes;

use super::{ObjectSize, Storage, StorageResult};

/// How hard to retry transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Upper bound of the first delay.
    pub base_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` (attempt counts from 1).
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let bound = exp.min(self.max_delay);
        bound.mul_f64(rand::random::<f64>())
    }
}

/// A [`Storage`] that retries transient failures of the one it wraps.
#[derive(Debug)]
pub struct RetryingStorage<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S: Storage> RetryingStorage<S> {
    /// Wraps `inner`, retrying transient failures as `policy` says.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        RetryingStorage { inner, policy }
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn retry<T>(
        &self,
        op: &str,
        key: &str,
        call: impl Fn() -> StorageResult<T>,
    ) -> StorageResult<T> {
        let mut attempt = 1;
        loop {
            match call() {
                Err(e) if e.is_transient() && attempt < self.policy.max_attempts => {
                    let delay = self.policy.delay(attempt);
                    tracing::warn!(
                        "storage {op} {key}: {e}; retrying in {} ms (attempt {} of {})",
                        delay.as_millis(),
                        attempt + 1,
                        self.policy.max_attempts
                    );
                    std::thread::sleep(delay);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl<S: Storage> Storage for RetryingStorage<S> {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.retry("put", key, || self.inner.put(key, data))
    }

    fn put_bytes(&self, key: &str, data: Bytes) -> StorageResult<()> {
        // A clone shares the buffer: every attempt sends the same bytes.
        self.retry("put", key, || self.inner.put_bytes(key, data.clone()))
    }

    fn concurrent_puts(&self) -> usize {
        self.inner.concurrent_puts()
    }

    fn concurrent_reads(&self) -> usize {
        self.inner.concurrent_reads()
    }

    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.retry("get", key, || self.inner.get(key))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.retry("get_range", key, || self.inner.get_range(key, offset, len))
    }

    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        self.retry("list", prefix, || self.inner.list(prefix))
    }

    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.retry("list", prefix, || self.inner.list_sizes(prefix))
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        self.retry("delete", key, || self.inner.delete(key))
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.retry("exists", key, || self.inner.exists(key))
    }

    fn retain(&self, key: &str) -> StorageResult<()> {
        self.retry("retain", key, || self.inner.retain(key))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::StorageError;

    /// Fails the first `failures` calls with `error()`, then answers.
    #[derive(Debug)]
    struct Flaky {
        failures: u32,
        calls: AtomicU32,
        transient: bool,
    }

    impl Flaky {
        fn answer(&self) -> StorageResult<Vec<u8>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                Err(StorageError::Remote {
                    op: "get",
                    key: "k".into(),
                    message: "503 Slow Down".into(),
                    transient: self.transient,
                })
            } else {
                Ok(b"ok".to_vec())
            }
        }
    }

    impl Storage for Flaky {
        fn put(&self, _: &str, _: &[u8]) -> StorageResult<()> {
            self.answer().map(|_| ())
        }
        fn get(&self, _: &str) -> StorageResult<Vec<u8>> {
            self.answer()
        }
        fn get_range(&self, _: &str, _: u64, _: u64) -> StorageResult<Vec<u8>> {
            self.answer()
        }
        fn list(&self, _: &str) -> StorageResult<Vec<String>> {
            self.answer().map(|_| Vec::new())
        }
        fn list_sizes(&self, _: &str) -> StorageResult<Vec<ObjectSize>> {
            self.answer().map(|_| Vec::new())
        }
        fn delete(&self, _: &str) -> StorageResult<()> {
            self.answer().map(|_| ())
        }
        fn exists(&self, _: &str) -> StorageResult<bool> {
            self.answer().map(|_| true)
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn transient_errors_are_retried_until_success() {
        let s = RetryingStorage::new(
            Flaky {
                failures: 3,
                calls: AtomicU32::new(0),
                transient: true,
            },
            fast(4),
        );
        assert_eq!(s.get("k").unwrap(), b"ok");
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn attempts_are_bounded() {
        let s = RetryingStorage::new(
            Flaky {
                failures: 10,
                calls: AtomicU32::new(0),
                transient: true,
            },
            fast(3),
        );
        assert!(s.put("k", b"").unwrap_err().is_transient());
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let s = RetryingStorage::new(
            Flaky {
                failures: 1,
                calls: AtomicU32::new(0),
                transient: false,
            },
            fast(5),
        );
        assert!(s.delete("k").is_err());
        assert_eq!(s.inner().calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn delays_grow_and_stay_bounded() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        for _ in 0..100 {
            assert!(p.delay(1) <= Duration::from_millis(100));
            assert!(p.delay(3) <= Duration::from_millis(400));
            assert!(p.delay(30) <= Duration::from_millis(1000));
        }
    }
}
