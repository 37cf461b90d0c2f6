//! Progress reporting for long jobs. The CLI draws a bar on a terminal and
//! prints plain lines otherwise; the service records percentages on jobs.

/// Receives progress of one job. `total` is `None` while unknown.
pub trait Progress: Send + Sync {
    fn update(&self, phase: &str, done: u64, total: Option<u64>);
    fn message(&self, text: &str);
    /// WAL streaming position: what is received (`received`, an LSN) against
    /// the end of WAL on the server (`server_end`), for lag reporting.
    fn wal_position(&self, _received: u64, _server_end: u64) {}
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}
    fn message(&self, _: &str) {}
}
