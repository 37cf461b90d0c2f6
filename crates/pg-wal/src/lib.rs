//! PostgreSQL write-ahead log knowledge that Strata needs without talking to a server:
//! LSN and segment arithmetic, WAL and timeline-history file names, timeline history
//! parsing, and a streaming decoder that finds commit/abort/restore-point records.
//!
//! Everything here mirrors PostgreSQL's on-disk formats; each module cites the source
//! files it follows. Reference: src/include/access/xlogdefs.h,
//! src/include/access/xlog_internal.h.
//!
//! Nothing is process-global: the WAL segment size travels as a [`WalGeometry`] value so
//! instances with different `wal_segment_size` settings can share one process.

#![warn(missing_docs)]

pub mod decode;
mod error;
mod geometry;
pub mod history;
mod lsn;
pub mod time;

pub use error::WalError;
pub use geometry::{
    history_file_name, parse_history_file_name, parse_size_setting, WalGeometry, XLOG_BLCKSZ,
};
pub use lsn::{Lsn, SegmentNo, TimelineId};
