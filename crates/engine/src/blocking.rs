//! Runs synchronous storage and catalog calls from async code on tokio's
//! blocking pool, so a slow store (S3 answers in tens of milliseconds, a
//! busy disk in seconds) never holds a runtime thread that other tasks —
//! replication streams, API requests — need (the concurrency rule in
//! docs/DESIGN.md).

use crate::{EngineError, EngineResult};

/// Runs `work` on the blocking pool and returns what it returned.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> EngineResult<T> + Send + 'static,
) -> EngineResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EngineError::Failed(format!("a storage task failed: {e}")))?
}
