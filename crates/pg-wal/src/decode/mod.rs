//! Streaming WAL decoder: finds transaction commits/aborts, restore points and segment
//! switches in raw WAL bytes, as PostgreSQL's own reader would see them.
//!
//! References: src/include/access/xlog_internal.h (page headers, `XLP_*` flags),
//! src/backend/access/transam/xlogreader.c (`XLogDecodeNextRecord`,
//! `XLogReaderValidatePageHeader`, `ValidXLogRecordHeader`, `ValidXLogRecord`).
//!
//! The end of valid WAL is found the way PostgreSQL finds it: a zero record length, a
//! record whose CRC-32C does not match, a broken `xl_prev` chain, a page that was never
//! written or belongs to an older incarnation of a recycled file, or a missing
//! continuation. Past that point nothing more is reported until the next segment starts,
//! where the decoder re-synchronises on the page header (this is also how the padding
//! after an `XLOG_SWITCH` is skipped). Formats we cannot read (unknown page magic, other
//! segment or page sizes, a file from another position) are errors.
//!
//! Every commit also says what its transaction did that can destroy data
//! ([`TxnChanges`]): the files it dropped (from the commit record itself), and what the
//! records carrying its xid or its committed subtransactions' xids showed along the way:
//! files created (`XLOG_SMGR_CREATE`, main fork) and whether data went into them afterwards
//! (heap inserts, page images: a rewrite by `VACUUM FULL`/`CLUSTER` fills its new file,
//! `TRUNCATE` leaves it empty), files truncated in place (`XLOG_SMGR_TRUNCATE` with an xid),
//! databases dropped (`XLOG_DBASE_DROP`), heap rows deleted and updated per file (the
//! speculative insertions `INSERT … ON CONFLICT` takes back are not deletes), and whether the
//! system catalogs changed (relation or catalog cache invalidations in the commit record). A
//! subtransaction's abort, or its parent's, discards what it did; `XLOG_RUNNING_XACTS`
//! (`oldestRunningXid`) retires transactions whose end was never seen. A transaction that was
//! already running where decoding started reports only what followed. Counting covers system
//! catalogs too (DDL updates `pg_class` rows).
//!
//! Memory is bounded by the records that are reported (commit and abort records, restore
//! points), by the rare records that change a transaction's state (kept whole), and by the
//! per-xid state, which is capped ([`MAX_TRACKED_XIDS`], [`MAX_ENTRIES_PER_XID`],
//! [`MAX_ENTRIES`], which also caps the files one commit reports dropped; a commit whose
//! changes did not all fit says so in [`TxnChanges::incomplete`]). Of heap and page-image records only the first
//! 64 bytes after the record header (block 0's header; a delete's flags are picked up on the
//! way) are kept; all other records are CRC-checked as they stream past and dropped.

mod changes;
mod record;

use chrono::{DateTime, Utc};

use crate::{Lsn, WalError, WalGeometry, XLOG_BLCKSZ};

use changes::ChangeTracker;
pub use changes::{MAX_ENTRIES, MAX_ENTRIES_PER_XID, MAX_TRACKED_XIDS};
use record::{BlockRecordPrefix, Decoded, Kind, RecordHeader, SIZE_OF_XLOG_RECORD, XL_CRC_OFFSET};

/// Something in the WAL that Strata acts on (recovery targets, catalog of restore points).
#[derive(Debug, Clone, PartialEq)]
pub enum WalEvent {
    /// `lsn` is the record start; `end_lsn` the MAXALIGNed end, i.e. PostgreSQL's
    /// `EndRecPtr` and what `pg_current_wal_lsn()` would return right after the commit.
    Commit {
        /// Start of the commit record.
        lsn: Lsn,
        /// End of the commit record (`EndRecPtr`).
        end_lsn: Lsn,
        /// Transaction id that committed.
        xid: u32,
        /// Commit time (`xact_time`).
        time: DateTime<Utc>,
        /// What the transaction did that may destroy data; `None` when nothing.
        changes: Option<Box<TxnChanges>>,
    },
    /// A transaction aborted (`XLOG_XACT_ABORT`); fields as for `Commit`.
    Abort {
        /// Start of the abort record.
        lsn: Lsn,
        /// End of the abort record (`EndRecPtr`).
        end_lsn: Lsn,
        /// Transaction id that aborted.
        xid: u32,
        /// Abort time (`xact_time`).
        time: DateTime<Utc>,
    },
    /// A named restore point (`XLOG_RESTORE_POINT`, from `pg_create_restore_point`).
    RestorePoint {
        /// Start of the record.
        lsn: Lsn,
        /// End of the record (`EndRecPtr`): where recovery to this point stops.
        end_lsn: Lsn,
        /// The restore point's name.
        name: String,
        /// Time the record was written (`rp_time`).
        time: DateTime<Utc>,
    },
    /// `XLOG_BACKUP_END`: a backup of a primary that started at `start`
    /// ended; its end position is `end_lsn` (what `pg_backup_stop` returns).
    BackupEnd {
        /// Start of the record.
        lsn: Lsn,
        /// End of the record (`EndRecPtr`).
        end_lsn: Lsn,
        /// The start position of the backup it ends.
        start: Lsn,
    },
    /// `XLOG_SWITCH`: the rest of the segment is padding.
    Switch {
        /// Start of the switch record.
        lsn: Lsn,
    },
}

/// A relation's storage file as the WAL names it (`RelFileLocator`, before
/// PostgreSQL 16 `RelFileNode`): tablespace, database and file number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelFile {
    /// Tablespace OID (1663 for `pg_default`).
    pub spc: u32,
    /// Database OID (0 for shared relations).
    pub db: u32,
    /// `relfilenode`.
    pub rel: u32,
}

/// Rows one transaction deleted and updated in one relation file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowChanges {
    /// The relation file (heap).
    pub rel: RelFile,
    /// Heap `DELETE` records.
    pub deleted: u64,
    /// Heap `UPDATE` and `HOT_UPDATE` records.
    pub updated: u64,
}

/// What a committed transaction (with its subtransactions) did that can
/// destroy data, as far as the WAL shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnChanges {
    /// Database the transaction ran in (from the commit record), when known.
    pub db: Option<u32>,
    /// Relation files the commit removes: dropped tables and indexes, and the
    /// old files of `TRUNCATE` and of rewrites (`VACUUM FULL`, `CLUSTER`). At most
    /// [`MAX_ENTRIES`] (the first the record lists; `incomplete` when it lists more).
    pub dropped: Vec<RelFile>,
    /// Relation files the transaction created (main fork): new tables and the
    /// new files of `TRUNCATE` and rewrites.
    pub created: Vec<RelFile>,
    /// Relation files the transaction created and then filled with data
    /// (page images or heap inserts), which tells a rewrite from a `TRUNCATE`.
    /// Look at the table's own file: a new index file is filled even by
    /// `TRUNCATE`, which writes its metapage at once.
    pub filled: Vec<RelFile>,
    /// Of `filled`, those that got rows inserted (not only page images): a table
    /// truncated and loaded again in one transaction, or one rewritten row by row
    /// (`ALTER TABLE … TYPE`), not a `VACUUM FULL` or `CLUSTER`.
    pub loaded: Vec<RelFile>,
    /// Relation files cut short in place (`XLOG_SMGR_TRUNCATE` with this xid).
    pub truncated: Vec<RelFile>,
    /// Databases dropped (`XLOG_DBASE_DROP`), by OID.
    pub dropped_databases: Vec<u32>,
    /// With a database dropped: a position before which the database was intact. PostgreSQL
    /// marks the database invalid with an in-place update of `pg_database` and removes its
    /// files before the commit, so stopping just before the commit is too late; this is the
    /// start of the last in-place update of a shared catalog before the first
    /// `XLOG_DBASE_DROP` (within 16 MiB of it), or that record's start.
    pub drop_database_lsn: Option<Lsn>,
    /// Heap rows deleted and updated, per relation file.
    pub rows: Vec<RowChanges>,
    /// The commit carries relation or catalog cache invalidations: the system
    /// catalogs changed (DDL), so names may have changed.
    pub catalog_changed: bool,
    /// Not everything was recorded: the decoder's memory caps were reached
    /// ([`MAX_TRACKED_XIDS`] transactions in flight, [`MAX_ENTRIES_PER_XID`] files per
    /// transaction, [`MAX_ENTRIES`] in all or dropped by the commit). `catalog_changed`
    /// comes from the commit record and is always complete, as is `dropped` unless the
    /// record lists more than [`MAX_ENTRIES`] files; the lists are then a lower bound.
    pub incomplete: bool,
}

const SIZE_OF_SHORT_PAGE_HEADER: usize = 24;
const SIZE_OF_LONG_PAGE_HEADER: usize = 40;

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0004;
const XLP_ALL_FLAGS: u16 = 0x0007;

/// Records start at MAXALIGN (8 bytes on every platform PostgreSQL supports for WAL).
const MAXALIGN: u64 = 8;
/// `MaxAllocSize`: PostgreSQL's reader refuses longer records.
const MAX_RECORD_LEN: u32 = 0x3FFF_FFFF;
/// How far before its `XLOG_DBASE_DROP` record a `DROP DATABASE`'s in-place update of
/// `pg_database` is looked for (the buffers of the database are dropped in between, which
/// writes no WAL).
const DROP_DATABASE_INPLACE_WINDOW: u64 = 16 << 20;
/// Initial buffer reservation for a reported record; most are far smaller.
const RECORD_BUFFER_HINT: usize = 64 * 1024;

/// WAL format generation, identified by `XLOG_PAGE_MAGIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalVersion {
    Pg14,
    Pg15,
    Pg16,
    Pg17,
    Pg18,
}

impl WalVersion {
    fn from_magic(magic: u16) -> Option<Self> {
        match magic {
            0xD10D => Some(WalVersion::Pg14),
            0xD110 => Some(WalVersion::Pg15),
            0xD113 => Some(WalVersion::Pg16),
            0xD116 => Some(WalVersion::Pg17),
            0xD118 => Some(WalVersion::Pg18),
            _ => None,
        }
    }

    fn record_format(self) -> record::RecordFormat {
        record::RecordFormat {
            // PostgreSQL 18 widened the stats object id to 64 bits.
            stats_item_size: if self == WalVersion::Pg18 { 16 } else { 12 },
            image_compressed: if self == WalVersion::Pg14 {
                record::BKPIMAGE_IS_COMPRESSED_PG14
            } else {
                record::BKPIMAGE_COMPRESSED
            },
            dbase_drop: if self == WalVersion::Pg14 {
                record::XLOG_DBASE_DROP_PG14
            } else {
                record::XLOG_DBASE_DROP
            },
        }
    }
}

#[derive(Debug)]
enum PageState {
    /// Collecting the page header that starts at the current page boundary.
    Header {
        bytes: [u8; SIZE_OF_LONG_PAGE_HEADER],
        have: usize,
        need: usize,
    },
    Content,
}

#[derive(Debug)]
enum RecordState {
    /// Between records: skip alignment padding, then a record header begins.
    Idle,
    Header {
        start: Lsn,
        bytes: [u8; SIZE_OF_XLOG_RECORD],
        have: usize,
    },
    Body {
        start: Lsn,
        head: [u8; SIZE_OF_XLOG_RECORD],
        header: RecordHeader,
        kind: Option<Kind>,
        got: u32,
        crc: u32,
        /// The whole record, kept only for kinds we report.
        buffer: Option<Vec<u8>>,
    },
    /// The tail of a record that began before our start position.
    SkipContinuation { remaining: u32 },
}

impl RecordState {
    /// Bytes of the current record still to come, for checking `xlp_rem_len`.
    fn remaining(&self) -> Option<u32> {
        match self {
            RecordState::Idle => None,
            RecordState::Header { bytes, have, .. } => {
                // xl_tot_len is always on the record's first page (records are MAXALIGNed).
                (*have >= 4).then(|| {
                    let tot_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    tot_len.saturating_sub(*have as u32)
                })
            }
            RecordState::Body { header, got, .. } => Some(header.tot_len - got),
            RecordState::SkipContinuation { remaining } => Some(*remaining),
        }
    }
}

/// Incremental decoder fed consecutive WAL bytes from a page-aligned start position.
#[derive(Debug)]
pub struct WalDecoder {
    geometry: WalGeometry,
    pos: Lsn,
    page: PageState,
    record: RecordState,
    version: WalVersion,
    /// `version.record_format()`, kept at hand for every record.
    format: record::RecordFormat,
    /// At a (re)synchronisation point: continuation data of an earlier record is skipped.
    fresh: bool,
    /// Start of the last valid record, to check the next record's `xl_prev`.
    prev: Option<Lsn>,
    /// After the end of valid WAL: ignore everything up to this segment start.
    skip_until: Option<Lsn>,
    /// Errors are sticky: the stream position is no longer trustworthy.
    failed: Option<WalError>,
    /// What in-flight transactions did so far.
    changes: ChangeTracker,
    /// The beginning of the heap or page-image record in progress.
    prefix: BlockRecordPrefix,
    /// Whether commits report their changes (see [`WalDecoder::report_changes`]).
    tracking: bool,
    /// Start of the last in-place update of a shared catalog (see
    /// [`TxnChanges::drop_database_lsn`]).
    shared_inplace: Option<Lsn>,
}

impl WalDecoder {
    /// `start` must be page aligned (8192 bytes), usually a segment start; otherwise every
    /// `feed` fails with [`WalError::UnalignedStart`]. Records that began before `start` are
    /// skipped.
    pub fn new(geometry: WalGeometry, start: Lsn) -> Self {
        WalDecoder {
            geometry,
            pos: start,
            page: PageState::Content,
            record: RecordState::Idle,
            version: WalVersion::Pg15,
            format: WalVersion::Pg15.record_format(),
            fresh: true,
            prev: None,
            skip_until: None,
            failed: (start.0 % XLOG_BLCKSZ != 0).then_some(WalError::UnalignedStart(start)),
            changes: ChangeTracker::default(),
            prefix: BlockRecordPrefix::new(),
            tracking: true,
            shared_inplace: None,
        }
    }

    /// Whether commits report what their transactions did ([`TxnChanges`]; on by default,
    /// every row change reported), and from how many rows deleted or updated in one file a
    /// file's row counts are worth reporting: below that they are left out, and a commit with
    /// nothing else to report reports nothing, which saves building a report for most commits
    /// of a busy server. `None` turns tracking off: no record but commits, aborts, restore
    /// points and switches is looked at, and `changes` is always `None`.
    pub fn report_changes(mut self, min_rows: Option<u64>) -> Self {
        self.tracking = min_rows.is_some();
        self.changes.set_min_rows(min_rows.unwrap_or(0));
        self
    }

    /// LSN just after the last byte fed.
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Consumes the next bytes of the stream (any chunking) and returns the events of all
    /// records completed by them. After an error the decoder keeps returning that error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<WalEvent>, WalError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let mut events = Vec::new();
        let mut input = bytes;
        while !input.is_empty() {
            if let Err(err) = self.step(&mut input, &mut events) {
                self.failed = Some(err.clone());
                return Err(err);
            }
        }
        Ok(events)
    }

    /// Takes up to `max` bytes off the input and moves the stream position past them.
    fn take<'a>(&mut self, input: &mut &'a [u8], max: u64) -> &'a [u8] {
        let n = usize::try_from(max).unwrap_or(usize::MAX).min(input.len());
        let (chunk, rest) = input.split_at(n);
        *input = rest;
        self.pos = self.pos + n as u64;
        chunk
    }

    fn step(&mut self, input: &mut &[u8], events: &mut Vec<WalEvent>) -> Result<(), WalError> {
        if let Some(target) = self.skip_until {
            self.take(input, target - self.pos);
            if self.pos == target {
                self.skip_until = None;
                self.page = PageState::Content;
                self.record = RecordState::Idle;
                self.fresh = true;
            }
            return Ok(());
        }

        if self.pos.0 % XLOG_BLCKSZ == 0 && matches!(self.page, PageState::Content) {
            self.page = PageState::Header {
                bytes: [0; SIZE_OF_LONG_PAGE_HEADER],
                have: 0,
                need: SIZE_OF_SHORT_PAGE_HEADER,
            };
        }
        if let PageState::Header { have, need, .. } = self.page {
            let chunk = self.take(input, (need - have) as u64);
            let PageState::Header {
                bytes, have, need, ..
            } = &mut self.page
            else {
                return Ok(());
            };
            bytes[*have..*have + chunk.len()].copy_from_slice(chunk);
            *have += chunk.len();
            if *have == SIZE_OF_SHORT_PAGE_HEADER && *need == SIZE_OF_SHORT_PAGE_HEADER {
                let info = u16::from_le_bytes([bytes[2], bytes[3]]);
                if info & XLP_LONG_HEADER != 0 {
                    *need = SIZE_OF_LONG_PAGE_HEADER;
                }
            }
            if *have == *need {
                let header = *bytes;
                self.page = PageState::Content;
                self.on_page_header(&header)?;
            }
            return Ok(());
        }

        let page_left = XLOG_BLCKSZ - self.pos.0 % XLOG_BLCKSZ;
        match &mut self.record {
            RecordState::Idle => {
                let padding = (MAXALIGN - self.pos.0 % MAXALIGN) % MAXALIGN;
                if padding > 0 {
                    self.take(input, padding);
                } else {
                    self.record = RecordState::Header {
                        start: self.pos,
                        bytes: [0; SIZE_OF_XLOG_RECORD],
                        have: 0,
                    };
                }
            }
            RecordState::Header { have, .. } => {
                let want = ((SIZE_OF_XLOG_RECORD - *have) as u64).min(page_left);
                let chunk = self.take(input, want);
                if let RecordState::Header { start, bytes, have } = &mut self.record {
                    bytes[*have..*have + chunk.len()].copy_from_slice(chunk);
                    *have += chunk.len();
                    let (start, bytes, have) = (*start, *bytes, *have);
                    self.on_record_header_bytes(start, &bytes, have, events)?;
                }
            }
            RecordState::Body { header, got, .. } => {
                let want = u64::from(header.tot_len - *got).min(page_left);
                let chunk = self.take(input, want);
                if let RecordState::Body {
                    header,
                    got,
                    crc,
                    buffer,
                    ..
                } = &mut self.record
                {
                    *crc = crc32c::crc32c_append(*crc, chunk);
                    if let Some(buffer) = buffer {
                        buffer.extend_from_slice(chunk);
                    }
                    if self.prefix.active() {
                        let compressed = self.format.image_compressed;
                        self.prefix.feed(*got, chunk, header.tot_len, compressed);
                    }
                    *got += chunk.len() as u32;
                    if *got == header.tot_len {
                        self.finish_record(events)?;
                    }
                }
            }
            RecordState::SkipContinuation { remaining } => {
                let want = u64::from(*remaining).min(page_left);
                let skipped = self.take(input, want).len() as u32;
                if let RecordState::SkipContinuation { remaining } = &mut self.record {
                    *remaining -= skipped;
                    if *remaining == 0 {
                        self.record = RecordState::Idle;
                    }
                }
            }
        }
        Ok(())
    }

    /// Validates a page header like `XLogReaderValidatePageHeader` and checks that it
    /// continues (or does not continue) the record in progress.
    fn on_page_header(&mut self, header: &[u8; SIZE_OF_LONG_PAGE_HEADER]) -> Result<(), WalError> {
        let page_start = Lsn(self.pos.0 - self.pos.0 % XLOG_BLCKSZ);
        let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let magic = u16_at(0);
        let info = u16_at(2);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&header[8..16]);
        let page_addr = Lsn(u64::from_le_bytes(addr));
        let rem_len = u32_at(16);

        if magic == 0 {
            // A page that was never written (pre-zeroed segment or unused tail).
            self.end_of_valid_wal();
            return Ok(());
        }
        self.version = WalVersion::from_magic(magic).ok_or(WalError::UnsupportedPageMagic {
            lsn: page_start,
            magic,
        })?;
        self.format = self.version.record_format();
        if info & !XLP_ALL_FLAGS != 0 {
            self.end_of_valid_wal();
            return Ok(());
        }
        if self.geometry.offset_in_segment(page_start) == 0 {
            if page_addr != page_start {
                return Err(WalError::WrongSegment {
                    expected: page_start,
                    found: page_addr,
                });
            }
            if info & XLP_LONG_HEADER == 0 {
                self.end_of_valid_wal();
                return Ok(());
            }
        } else if page_addr != page_start {
            // Left over from the file's previous life before it was recycled.
            self.end_of_valid_wal();
            return Ok(());
        }
        if info & XLP_LONG_HEADER != 0 {
            let segment_size = u64::from(u32_at(32));
            if segment_size != self.geometry.segment_size() {
                return Err(WalError::SegmentSizeMismatch {
                    lsn: page_start,
                    expected: self.geometry.segment_size(),
                    found: segment_size,
                });
            }
            let block_size = u32_at(36);
            if u64::from(block_size) != XLOG_BLCKSZ {
                return Err(WalError::PageSizeMismatch {
                    lsn: page_start,
                    found: block_size,
                });
            }
        }

        let continues = info & XLP_FIRST_IS_CONTRECORD != 0;
        let fresh = std::mem::replace(&mut self.fresh, false);
        match self.record.remaining() {
            Some(remaining) => {
                if continues && rem_len == remaining && rem_len != 0 {
                    return Ok(());
                }
                if !continues && info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                    // Crash recovery abandoned the torn record and wrote new WAL here.
                    self.record = RecordState::Idle;
                    self.prev = None;
                    return Ok(());
                }
                self.end_of_valid_wal();
            }
            None if matches!(self.record, RecordState::Idle) => {
                if continues {
                    if fresh && rem_len != 0 {
                        self.record = RecordState::SkipContinuation { remaining: rem_len };
                    } else {
                        self.end_of_valid_wal();
                    }
                }
            }
            None => self.end_of_valid_wal(),
        }
        Ok(())
    }

    /// Checks the record header as soon as enough of it is present (`ValidXLogRecordHeader`).
    fn on_record_header_bytes(
        &mut self,
        start: Lsn,
        bytes: &[u8; SIZE_OF_XLOG_RECORD],
        have: usize,
        events: &mut Vec<WalEvent>,
    ) -> Result<(), WalError> {
        if have < 4 {
            return Ok(());
        }
        let tot_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if tot_len < SIZE_OF_XLOG_RECORD as u32 || tot_len > MAX_RECORD_LEN {
            // Zero here is the usual end of WAL: the unwritten remainder of the last page.
            self.end_of_valid_wal();
            return Ok(());
        }
        if have < SIZE_OF_XLOG_RECORD {
            return Ok(());
        }
        let header = RecordHeader::parse(bytes);
        if self.prev.is_some_and(|prev| prev != header.prev) {
            self.end_of_valid_wal();
            return Ok(());
        }
        let kind = record::classify(header.rmid, header.info, self.format)
            .filter(|k| self.tracking || k.reported_without_tracking());
        // Row changes and fills need an xid; fills only matter while a created file is open.
        let block_kind = record::classify_block(header.rmid, header.info).filter(|k| {
            self.tracking
                && (header.xid != 0 || *k == record::BlockKind::Inplace)
                && (!matches!(k, record::BlockKind::Fill | record::BlockKind::Insert)
                    || self.changes.watching_fills())
        });
        self.prefix.start(block_kind);
        let buffer = kind.map(|_| {
            let mut buffer = Vec::with_capacity((tot_len as usize).min(RECORD_BUFFER_HINT));
            buffer.extend_from_slice(bytes);
            buffer
        });
        self.record = RecordState::Body {
            start,
            head: *bytes,
            header,
            kind,
            got: SIZE_OF_XLOG_RECORD as u32,
            crc: 0,
            buffer,
        };
        if tot_len == SIZE_OF_XLOG_RECORD as u32 {
            self.finish_record(events)?;
        }
        Ok(())
    }

    /// Verifies the CRC like `ValidXLogRecord` (payload first, then the header up to
    /// `xl_crc`) and reports the record if it is one we care about.
    fn finish_record(&mut self, events: &mut Vec<WalEvent>) -> Result<(), WalError> {
        let RecordState::Body {
            start,
            head,
            header,
            kind,
            crc,
            buffer,
            ..
        } = std::mem::replace(&mut self.record, RecordState::Idle)
        else {
            return Ok(());
        };
        let crc = crc32c::crc32c_append(crc, &head[..XL_CRC_OFFSET]);
        if crc != header.crc {
            self.end_of_valid_wal();
            return Ok(());
        }
        self.prev = Some(start);
        let format = self.format;
        let malformed = |reason| WalError::MalformedRecord { lsn: start, reason };
        if self.prefix.active() {
            self.finish_block_record(start, &header)?;
        }
        let Some(kind) = kind else {
            return Ok(());
        };
        let end_lsn = Lsn(self.pos.0.next_multiple_of(MAXALIGN));
        let record = buffer.as_deref().unwrap_or(&head);
        let decoded =
            record::decode(kind, &header, record, start, end_lsn, format).map_err(malformed)?;
        match decoded {
            Decoded::Event(event) => events.push(event),
            Decoded::XactEnd { mut event, parts } => {
                match &mut event {
                    WalEvent::Commit { xid, changes, .. } if self.tracking => {
                        *changes = self.changes.commit(*xid, &parts);
                    }
                    WalEvent::Abort { xid, .. } if self.tracking => {
                        self.changes.abort(*xid, &parts)
                    }
                    _ => {}
                }
                events.push(event);
            }
            Decoded::Create(rel) => self.changes.on_create(header.xid, rel),
            Decoded::Truncate(rel) => self.changes.on_truncate(header.xid, rel),
            Decoded::DropDatabase(db) => {
                let before = self
                    .shared_inplace
                    .take()
                    .filter(|l| start.0 - l.0 <= DROP_DATABASE_INPLACE_WINDOW)
                    .unwrap_or(start);
                self.changes.on_drop_database(header.xid, db, before)
            }
            Decoded::OldestRunning(xid) => self.changes.oldest_running(xid),
            Decoded::Nothing => {}
        }
        if kind == Kind::Switch {
            self.skip_to_next_segment();
        }
        Ok(())
    }

    /// A heap or page-image record ended: count what it changed.
    fn finish_block_record(&mut self, start: Lsn, header: &RecordHeader) -> Result<(), WalError> {
        let change = self
            .prefix
            .finish(header.tot_len, self.format.image_compressed)
            .map_err(|reason| WalError::MalformedRecord { lsn: start, reason })?;
        match change {
            // Shared catalogs live in no database (`pg_database` is one).
            Some(change) if change.kind == record::BlockKind::Inplace && change.rel.db == 0 => {
                self.shared_inplace = Some(start);
            }
            Some(change) if change.kind == record::BlockKind::Inplace => {}
            Some(change) => self.changes.on_block(header.xid, change),
            None => {}
        }
        Ok(())
    }

    /// Nothing after this point of the segment is trusted; resume at the next segment.
    fn end_of_valid_wal(&mut self) {
        self.prev = None;
        self.skip_to_next_segment();
    }

    fn skip_to_next_segment(&mut self) {
        let offset = self.geometry.offset_in_segment(self.pos);
        let target = if offset == 0 {
            self.pos
        } else {
            self.pos + (self.geometry.segment_size() - offset)
        };
        self.record = RecordState::Idle;
        self.skip_until = Some(target);
    }
}

/// Decodes one whole (or partial, e.g. `.partial`) segment file starting at its segment start.
pub fn decode_segment(
    geometry: WalGeometry,
    segment_start: Lsn,
    bytes: &[u8],
) -> Result<Vec<WalEvent>, WalError> {
    WalDecoder::new(geometry, segment_start).feed(bytes)
}

#[cfg(test)]
mod tests;
