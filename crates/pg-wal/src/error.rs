//! Errors of the WAL layer. Running off the end of valid WAL is not an error (PostgreSQL
//! treats it as the normal end of the log); these are malformed input or formats we do not
//! understand.

use crate::Lsn;

/// What the WAL layer refuses: malformed or unsupported input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// An LSN that is not `X/Y` in hexadecimal.
    #[error("invalid LSN {0:?}: expected two hexadecimal halves like \"16/B374D848\"")]
    InvalidLsn(String),

    /// A segment size PostgreSQL cannot have.
    #[error("invalid WAL segment size {0} bytes: must be a power of two between 1 MiB and 1 GiB")]
    InvalidSegmentSize(u64),

    /// A size setting (`wal_segment_size` as `SHOW` prints it) that does not parse.
    #[error("invalid size setting {0:?}: expected a number with an optional B/kB/MB/GB/TB unit")]
    InvalidSizeSetting(String),

    /// A timeline history file that does not parse.
    #[error("invalid timeline history for timeline {timeline}, line {line}: {reason}")]
    InvalidHistory {
        /// Timeline whose history file it is.
        timeline: u32,
        /// Line number (1-based).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },

    /// A decoder asked to start off a page boundary.
    #[error("decoder start {0} is not aligned to a WAL page (8192 bytes)")]
    UnalignedStart(Lsn),

    /// WAL of a PostgreSQL version this build does not read.
    #[error(
        "unsupported WAL page magic {magic:#06X} at {lsn}: only PostgreSQL 14 to 18 WAL \
         (0xD10D, 0xD110, 0xD113, 0xD116, 0xD118) is understood"
    )]
    UnsupportedPageMagic {
        /// Page address.
        lsn: Lsn,
        /// The magic found.
        magic: u16,
    },

    /// WAL written with another segment size than the decoder expects.
    #[error("WAL segment at {lsn} was written with segment size {found}, expected {expected}")]
    SegmentSizeMismatch {
        /// Segment address.
        lsn: Lsn,
        /// The size the decoder was given.
        expected: u64,
        /// The size the long page header records.
        found: u64,
    },

    /// WAL written with a page size other than 8192.
    #[error("WAL segment at {lsn} was written with page size {found}, only 8192 is supported")]
    PageSizeMismatch {
        /// Segment address.
        lsn: Lsn,
        /// The page size the long page header records.
        found: u32,
    },

    /// A segment that is not the one expected at its position.
    #[error("WAL segment expected at {expected} but its first page claims address {found}")]
    WrongSegment {
        /// Where the segment was expected.
        expected: Lsn,
        /// The address its first page claims.
        found: Lsn,
    },

    /// A WAL record that does not decode.
    #[error("malformed WAL record at {lsn}: {reason}")]
    MalformedRecord {
        /// Record start.
        lsn: Lsn,
        /// What is wrong with it.
        reason: String,
    },
}
