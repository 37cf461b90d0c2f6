//! Progress reporting for long jobs. The CLI draws a bar on a terminal and
//! prints plain lines otherwise; the service records percentages on jobs.

/// Receives progress of one job. `total` is `None` while unknown.
pub trait Progress: Send + Sync {
    fn update(&self, phase: &str, done: u64, total: Option<u64>);
    fn message(&self, text: &str);
}

/// Discards progress.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}
    fn message(&self, _: &str) {}
}
