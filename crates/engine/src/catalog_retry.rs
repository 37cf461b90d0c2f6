//! Catalog writes that must not be lost to a short catalog outage (a
//! PostgreSQL catalog server restarting, a failover, a full connection
//! pool): a call that fails as retryable
//! ([`strata_catalog::CatalogError::is_retryable`])
//! is made again with backoff for up to [`CATALOG_OUTAGE_WAIT`]. Only
//! calls that are idempotent go through here (upserts, updates of a whole
//! row, deletes by key, reads), so a call whose commit succeeded but whose
//! answer was lost does no harm when it is made again.

use std::time::{Duration, Instant};

use strata_catalog::{BackupSet, CatalogResult, Job};

use crate::blocking::blocking;
use crate::{Engine, EngineResult};

/// How long a write waits for the catalog to come back before its caller
/// sees the error.
pub const CATALOG_OUTAGE_WAIT: Duration = Duration::from_secs(300);
/// The first wait; it doubles up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Makes `call` until it succeeds, fails for good, or the catalog stayed
/// unreachable for [`CATALOG_OUTAGE_WAIT`]. Sleeps on the calling thread:
/// for blocking contexts only.
pub fn retry_busy<T>(what: &str, mut call: impl FnMut() -> CatalogResult<T>) -> CatalogResult<T> {
    let deadline = Instant::now() + CATALOG_OUTAGE_WAIT;
    let mut delay = FIRST_DELAY;
    loop {
        match call() {
            Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                tracing::warn!("{what}: {e}; retrying in {} ms", delay.as_millis());
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_DELAY);
            }
            r => return r,
        }
    }
}

impl Engine {
    /// Records a job's whole row, waiting out a catalog outage on the
    /// blocking pool (never on a runtime thread).
    pub(crate) async fn record_job(&self, what: &'static str, job: &Job) -> EngineResult<()> {
        let (catalog, job) = (self.catalog.clone(), job.clone());
        blocking(move || Ok(retry_busy(what, || catalog.update_job(&job))?)).await
    }

    /// Records a backup set's whole row, like [`Engine::record_job`].
    pub(crate) async fn record_set(&self, what: &'static str, set: &BackupSet) -> EngineResult<()> {
        let (catalog, set) = (self.catalog.clone(), set.clone());
        blocking(move || Ok(retry_busy(what, || catalog.update_backup(&set))?)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_catalog::CatalogError;

    #[test]
    fn busy_is_retried_until_it_answers_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retry_busy("test", || {
            calls += 1;
            if calls < 3 {
                Err(CatalogError::Busy("down".into()))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: CatalogResult<()> = retry_busy("test", || {
            calls += 1;
            Err(CatalogError::NotFound("x".into()))
        });
        assert!(matches!(r, Err(CatalogError::NotFound(_))));
        assert_eq!(calls, 1);
    }
}
