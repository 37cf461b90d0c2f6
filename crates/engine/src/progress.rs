//! Progress reporting for long jobs. The CLI draws a bar on a terminal and
//! prints plain lines otherwise; the service records percentages on jobs.

/// Receives progress of one job. `total` is `None` while unknown.
pub trait Progress: Send + Sync {
    /// `done` of `total` units of `phase` are finished.
    fn update(&self, phase: &str, done: u64, total: Option<u64>);
    /// A line worth showing as it is.
    fn message(&self, text: &str);
    /// WAL streaming position: what is received (`received`, an LSN) against
    /// the end of WAL on the server (`server_end`), for lag reporting.
    fn wal_position(&self, _received: u64, _server_end: u64) {}
    /// The WAL receiver failed (`error`, the real cause: an
    /// [`crate::EngineError::Unreachable`] when the server cannot be
    /// reached) for the `attempt`-th time since it last stored WAL, and
    /// tries again after `retry_in`.
    fn wal_failing(&self, error: &crate::EngineError, attempt: u32, retry_in: std::time::Duration) {
        self.message(&format!(
            "WAL receiver failed (attempt {attempt}): {error}; reconnecting in {}s",
            retry_in.as_secs()
        ));
    }
    /// The WAL receiver works again after failing: streaming, and WAL
    /// stored when storing was what failed.
    fn wal_recovered(&self) {}
    /// The server accepted START_REPLICATION: WAL streams from now on.
    fn wal_streaming(&self) {}
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}
    fn message(&self, _: &str) {}
}
