//! Errors of the WAL layer. Running off the end of valid WAL is not an error (PostgreSQL
//! treats it as the normal end of the log); these are malformed input or formats we do not
//! understand.

use crate::Lsn;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    #[error("invalid LSN {0:?}: expected two hexadecimal halves like \"16/B374D848\"")]
    InvalidLsn(String),

    #[error("invalid WAL segment size {0} bytes: must be a power of two between 1 MiB and 1 GiB")]
    InvalidSegmentSize(u64),

    #[error("invalid size setting {0:?}: expected a number with an optional B/kB/MB/GB/TB unit")]
    InvalidSizeSetting(String),

    #[error("invalid timeline history for timeline {timeline}, line {line}: {reason}")]
    InvalidHistory {
        timeline: u32,
        line: usize,
        reason: String,
    },

    #[error("decoder start {0} is not aligned to a WAL page (8192 bytes)")]
    UnalignedStart(Lsn),

    #[error(
        "unsupported WAL page magic {magic:#06X} at {lsn}: only PostgreSQL 14 to 18 WAL \
         (0xD10D, 0xD110, 0xD113, 0xD116, 0xD118) is understood"
    )]
    UnsupportedPageMagic { lsn: Lsn, magic: u16 },

    #[error("WAL segment at {lsn} was written with segment size {found}, expected {expected}")]
    SegmentSizeMismatch { lsn: Lsn, expected: u64, found: u64 },

    #[error("WAL segment at {lsn} was written with page size {found}, only 8192 is supported")]
    PageSizeMismatch { lsn: Lsn, found: u32 },

    #[error("WAL segment expected at {expected} but its first page claims address {found}")]
    WrongSegment { expected: Lsn, found: Lsn },

    #[error("malformed WAL record at {lsn}: {reason}")]
    MalformedRecord { lsn: Lsn, reason: String },
}
