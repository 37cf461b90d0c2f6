//! Layout of one WAL record and of the few record payloads Strata interprets.
//! References: src/include/access/xlogrecord.h (`XLogRecord`, block headers, `XLR_BLOCK_ID_*`),
//! src/backend/access/transam/xlogreader.c (`DecodeXLogRecord`), src/include/access/xact.h and
//! src/backend/access/rmgrdesc/xactdesc.c (`ParseCommitRecord`, `ParseAbortRecord`),
//! src/include/catalog/pg_control.h (`XLOG_SWITCH`, `XLOG_RESTORE_POINT`, `XLOG_FPI`),
//! src/include/access/xlog_internal.h (`xl_restore_point`), src/include/catalog/storage_xlog.h
//! (`xl_smgr_create`, `xl_smgr_truncate`), src/include/commands/dbcommands_xlog.h
//! (`xl_dbase_drop_rec`), src/include/access/heapam_xlog.h (`xl_heap_delete`),
//! src/include/storage/standbydefs.h (`xl_running_xacts`) and src/include/storage/sinval.h
//! (invalidation message ids).

use crate::time::from_pg_micros;
use crate::Lsn;

use super::{RelFile, WalEvent};

/// `SizeOfXLogRecord`: the fixed header every record starts with.
pub(super) const SIZE_OF_XLOG_RECORD: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the CRC covers the header only up to here.
pub(super) const XL_CRC_OFFSET: usize = 20;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const RM_SMGR_ID: u8 = 2;
const RM_DBASE_ID: u8 = 4;
const RM_STANDBY_ID: u8 = 8;
const RM_HEAP2_ID: u8 = 9;
const RM_HEAP_ID: u8 = 10;
/// `XLR_RMGR_INFO_MASK`: the low four info bits belong to the WAL machinery itself.
const XLR_RMGR_INFO_MASK: u8 = 0xF0;

const XLOG_SWITCH: u8 = 0x40;
const XLOG_BACKUP_END: u8 = 0x50;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_FPI_FOR_HINT: u8 = 0xA0;
const XLOG_FPI: u8 = 0xB0;

const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
/// `XLOG_DBASE_DROP` of PostgreSQL 14; from 15 on it is 0x20 (two kinds of create precede it).
pub(super) const XLOG_DBASE_DROP_PG14: u8 = 0x10;
pub(super) const XLOG_DBASE_DROP: u8 = 0x20;
const XLOG_RUNNING_XACTS: u8 = 0x10;

const XLOG_HEAP_OPMASK: u8 = 0x70;
const XLOG_HEAP_INSERT: u8 = 0x00;
const XLOG_HEAP_DELETE: u8 = 0x10;
const XLOG_HEAP_UPDATE: u8 = 0x20;
const XLOG_HEAP_HOT_UPDATE: u8 = 0x40;
const XLOG_HEAP_INPLACE: u8 = 0x70;
const XLOG_HEAP2_MULTI_INSERT: u8 = 0x50;
/// `offsetof(xl_heap_delete, flags)` and the flag of a speculative insertion taken back.
const XL_HEAP_DELETE_FLAGS_OFFSET: usize = 7;
const XLH_DELETE_IS_SUPER: u8 = 1 << 3;

const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

const SIZE_OF_XACT_DBINFO: usize = 8;
const SIZE_OF_TRANSACTION_ID: usize = 4;
const SIZE_OF_REL_FILE_LOCATOR: usize = 12;
const SIZE_OF_SHARED_INVAL_MESSAGE: usize = 16;
/// Invalidation message ids (the first byte, `int8`): catcache ids are `>= 0`; these two are
/// `SHAREDINVALCATALOG_ID` and `SHAREDINVALRELCACHE_ID`. Smgr, relmap and snapshot messages
/// (-3 and below) say nothing about a changed catalog.
const SHAREDINVALRELCACHE_ID: i8 = -2;

/// `offsetof(xl_running_xacts, oldestRunningXid)` (PostgreSQL 14 to 18).
const RUNNING_XACTS_OLDEST_OFFSET: usize = 16;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PGLZ, LZ4 and ZSTD compression bits (PostgreSQL 15 and later).
pub(super) const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;
/// `BKPIMAGE_IS_COMPRESSED` of PostgreSQL 14 (0x02 means "apply" from 15 on).
pub(super) const BKPIMAGE_IS_COMPRESSED_PG14: u8 = 0x02;
/// `MAIN_FORKNUM`.
const MAIN_FORK: u8 = 0;

/// Bytes after the record header kept of heap and page-image records. Every block header
/// (at most 27 bytes), the origin and top-level xid entries and the main data header fit, so
/// block 0's relation and the main data's position are always known from the prefix.
pub(super) const PREFIX_LEN: usize = 64;

/// What differs between WAL format generations in the parts we decode.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordFormat {
    /// `sizeof(xl_xact_stats_item)` (no such items before PostgreSQL 15).
    pub stats_item_size: usize,
    /// Block image flag bits that mean "compressed".
    pub image_compressed: u8,
    /// Info code of `XLOG_DBASE_DROP`.
    pub dbase_drop: u8,
}

/// `sizeof(xl_restore_point)`: TimestampTz plus a 64-byte NUL-padded name.
const RESTORE_POINT_NAME_LEN: usize = 64;

/// The fixed `XLogRecord` header.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordHeader {
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub crc: u32,
}

impl RecordHeader {
    pub fn parse(bytes: &[u8; SIZE_OF_XLOG_RECORD]) -> Self {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut prev = [0u8; 8];
        prev.copy_from_slice(&bytes[8..16]);
        RecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: Lsn(u64::from_le_bytes(prev)),
            info: bytes[16],
            rmid: bytes[17],
            crc: u32_at(20),
        }
    }
}

/// Records kept whole until their end: the ones reported, and the rare ones that change
/// what a transaction is tracked to have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Commit { prepared: bool },
    Abort { prepared: bool },
    RestorePoint,
    Switch,
    BackupEnd,
    SmgrCreate,
    SmgrTruncate,
    DropDatabase,
    RunningXacts,
}

impl Kind {
    /// Kinds decoded even with change tracking off.
    pub(super) fn reported_without_tracking(self) -> bool {
        matches!(
            self,
            Kind::Commit { .. }
                | Kind::Abort { .. }
                | Kind::RestorePoint
                | Kind::Switch
                | Kind::BackupEnd
        )
    }
}

pub(super) fn classify(rmid: u8, info: u8, format: RecordFormat) -> Option<Kind> {
    match rmid {
        RM_XACT_ID => match info & XLOG_XACT_OPMASK {
            XLOG_XACT_COMMIT => Some(Kind::Commit { prepared: false }),
            XLOG_XACT_COMMIT_PREPARED => Some(Kind::Commit { prepared: true }),
            XLOG_XACT_ABORT => Some(Kind::Abort { prepared: false }),
            XLOG_XACT_ABORT_PREPARED => Some(Kind::Abort { prepared: true }),
            _ => None,
        },
        RM_XLOG_ID => match info & XLR_RMGR_INFO_MASK {
            XLOG_SWITCH => Some(Kind::Switch),
            XLOG_RESTORE_POINT => Some(Kind::RestorePoint),
            XLOG_BACKUP_END => Some(Kind::BackupEnd),
            _ => None,
        },
        RM_SMGR_ID => match info & XLR_RMGR_INFO_MASK {
            XLOG_SMGR_CREATE => Some(Kind::SmgrCreate),
            XLOG_SMGR_TRUNCATE => Some(Kind::SmgrTruncate),
            _ => None,
        },
        RM_DBASE_ID => {
            (info & XLR_RMGR_INFO_MASK == format.dbase_drop).then_some(Kind::DropDatabase)
        }
        RM_STANDBY_ID => {
            (info & XLR_RMGR_INFO_MASK == XLOG_RUNNING_XACTS).then_some(Kind::RunningXacts)
        }
        _ => None,
    }
}

/// Frequent records of which only the first [`PREFIX_LEN`] bytes (and for deletes one flag
/// byte) are kept: heap row changes and page images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockKind {
    Delete,
    Update,
    /// Full-page images: how `VACUUM FULL` and `CLUSTER` write a rewritten table's new
    /// file. Only of interest for relation files created by a transaction still in flight.
    Fill,
    /// Rows inserted into a page (`XLOG_HEAP_INSERT`, `XLOG_HEAP2_MULTI_INSERT`): how a
    /// table emptied by `TRUNCATE` is loaded again in the same transaction. As for `Fill`.
    Insert,
    /// A row overwritten in place, outside any transaction's visibility rules
    /// (`XLOG_HEAP_INPLACE`): how `DROP DATABASE` marks the database invalid in
    /// `pg_database` before it removes its files.
    Inplace,
}

pub(super) fn classify_block(rmid: u8, info: u8) -> Option<BlockKind> {
    match rmid {
        RM_HEAP_ID => match info & XLOG_HEAP_OPMASK {
            XLOG_HEAP_DELETE => Some(BlockKind::Delete),
            XLOG_HEAP_UPDATE | XLOG_HEAP_HOT_UPDATE => Some(BlockKind::Update),
            XLOG_HEAP_INSERT => Some(BlockKind::Insert),
            XLOG_HEAP_INPLACE => Some(BlockKind::Inplace),
            _ => None,
        },
        RM_HEAP2_ID => {
            (info & XLOG_HEAP_OPMASK == XLOG_HEAP2_MULTI_INSERT).then_some(BlockKind::Insert)
        }
        RM_XLOG_ID => match info & XLR_RMGR_INFO_MASK {
            XLOG_FPI | XLOG_FPI_FOR_HINT => Some(BlockKind::Fill),
            _ => None,
        },
        _ => None,
    }
}

/// The optional sections of a commit or abort record that say what it finishes.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct XactParts<'a> {
    /// Database (`xl_xact_dbinfo.dbId`).
    pub db: Option<u32>,
    /// Raw `TransactionId` array of the subtransactions it finishes with it.
    subxacts: &'a [u8],
    /// Raw `RelFileLocator` array of the files removed at commit (or abort).
    rels: &'a [u8],
    /// A catalog or relation cache invalidation is among the messages.
    pub catalog_changed: bool,
}

impl<'a> XactParts<'a> {
    /// Parts listing only these subtransactions (raw little-endian xids).
    #[cfg(test)]
    pub fn with_subxacts(subxacts: &'a [u8]) -> Self {
        XactParts {
            subxacts,
            ..XactParts::default()
        }
    }

    pub fn subxacts(&self) -> impl Iterator<Item = u32> + 'a {
        self.subxacts
            .chunks_exact(SIZE_OF_TRANSACTION_ID)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn removes_files(&self) -> bool {
        !self.rels.is_empty()
    }

    pub fn rels(&self) -> impl Iterator<Item = RelFile> + 'a {
        self.rels
            .chunks_exact(SIZE_OF_REL_FILE_LOCATOR)
            .map(rel_file)
    }
}

/// A record decoded into what the decoder acts on.
#[derive(Debug)]
pub(super) enum Decoded<'a> {
    /// An event to report as it is.
    Event(WalEvent),
    /// A commit or abort (`changes` still unset) and what it finishes.
    XactEnd {
        event: WalEvent,
        parts: XactParts<'a>,
    },
    /// `XLOG_SMGR_CREATE` of a main fork.
    Create(RelFile),
    /// `XLOG_SMGR_TRUNCATE` of a main fork.
    Truncate(RelFile),
    /// `XLOG_DBASE_DROP`.
    DropDatabase(u32),
    /// `XLOG_RUNNING_XACTS`: every xid before this one has finished.
    OldestRunning(u32),
    /// A record that changes nothing we track (e.g. the creation of another fork).
    Nothing,
}

/// Decodes a complete, CRC-checked record of a [`Kind`]. Errors are reasons for
/// `WalError::MalformedRecord`: the CRC matched, so the layout is not what we expect.
pub(super) fn decode<'a>(
    kind: Kind,
    header: &RecordHeader,
    record: &'a [u8],
    lsn: Lsn,
    end_lsn: Lsn,
    format: RecordFormat,
) -> Result<Decoded<'a>, String> {
    if kind == Kind::Switch {
        return Ok(Decoded::Event(WalEvent::Switch { lsn }));
    }
    let mut main = Cursor::new(main_data(record, format.image_compressed)?);
    match kind {
        Kind::Commit { prepared } | Kind::Abort { prepared } => {
            let commit = matches!(kind, Kind::Commit { .. });
            let time = from_pg_micros(main.i64()?);
            let (parts, twophase_xid) =
                xact_parts(&mut main, header.info, commit, format.stats_item_size)?;
            let xid = match (prepared, twophase_xid) {
                (false, _) => header.xid,
                (true, Some(xid)) => xid,
                (true, None) => {
                    return Err("prepared-transaction record without a two-phase xid".into())
                }
            };
            let event = if commit {
                WalEvent::Commit {
                    lsn,
                    end_lsn,
                    xid,
                    time,
                    changes: None,
                }
            } else {
                WalEvent::Abort {
                    lsn,
                    end_lsn,
                    xid,
                    time,
                }
            };
            Ok(Decoded::XactEnd { event, parts })
        }
        Kind::RestorePoint => {
            let time = from_pg_micros(main.i64()?);
            let raw = main.take(RESTORE_POINT_NAME_LEN)?;
            let name_len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = String::from_utf8_lossy(&raw[..name_len]).into_owned();
            Ok(Decoded::Event(WalEvent::RestorePoint {
                lsn,
                end_lsn,
                name,
                time,
            }))
        }
        Kind::BackupEnd => {
            // The record's main data is the backup's start position.
            let start = Lsn(main.i64()? as u64);
            Ok(Decoded::Event(WalEvent::BackupEnd {
                lsn,
                end_lsn,
                start,
            }))
        }
        Kind::SmgrCreate => {
            // xl_smgr_create: RelFileLocator, ForkNumber.
            let rel = rel_file(main.take(SIZE_OF_REL_FILE_LOCATOR)?);
            let fork = main.u32()?;
            Ok(if fork == u32::from(MAIN_FORK) {
                Decoded::Create(rel)
            } else {
                Decoded::Nothing
            })
        }
        Kind::SmgrTruncate => {
            // xl_smgr_truncate: BlockNumber, RelFileLocator, flags.
            main.take(4)?;
            let rel = rel_file(main.take(SIZE_OF_REL_FILE_LOCATOR)?);
            let flags = main.u32()?;
            Ok(if flags & SMGR_TRUNCATE_HEAP != 0 {
                Decoded::Truncate(rel)
            } else {
                Decoded::Nothing
            })
        }
        Kind::DropDatabase => Ok(Decoded::DropDatabase(main.u32()?)),
        Kind::RunningXacts => {
            main.take(RUNNING_XACTS_OLDEST_OFFSET)?;
            Ok(Decoded::OldestRunning(main.u32()?))
        }
        Kind::Switch => Ok(Decoded::Event(WalEvent::Switch { lsn })),
    }
}

/// Walks the optional xact sections in `ParseCommitRecord`/`ParseAbortRecord` order up to
/// the two-phase xid (which a *_PREPARED record carries instead of using `xl_xid`).
fn xact_parts<'a>(
    main: &mut Cursor<'a>,
    info: u8,
    commit: bool,
    stats_item_size: usize,
) -> Result<(XactParts<'a>, Option<u32>), String> {
    let xinfo = if info & XLOG_XACT_HAS_INFO != 0 {
        main.u32()?
    } else {
        0
    };
    let mut parts = XactParts::default();
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        parts.db = Some(main.u32()?);
        main.take(SIZE_OF_XACT_DBINFO - 4)?; // tablespace
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        parts.subxacts = main.counted_array(SIZE_OF_TRANSACTION_ID)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        parts.rels = main.counted_array(SIZE_OF_REL_FILE_LOCATOR)?;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        main.counted_array(stats_item_size)?;
    }
    // Abort records never carry invalidation messages.
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        let messages = main.counted_array(SIZE_OF_SHARED_INVAL_MESSAGE)?;
        parts.catalog_changed = messages
            .chunks_exact(SIZE_OF_SHARED_INVAL_MESSAGE)
            .any(|m| m[0] as i8 >= SHAREDINVALRELCACHE_ID);
    }
    let twophase_xid = if xinfo & XACT_XINFO_HAS_TWOPHASE != 0 {
        Some(main.u32()?)
    } else {
        None
    };
    Ok((parts, twophase_xid))
}

#[inline]
fn rel_file(b: &[u8]) -> RelFile {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    RelFile {
        spc: u32_at(0),
        db: u32_at(4),
        rel: u32_at(8),
    }
}

/// Where a record's parts lie, from its block reference headers (`DecodeXLogRecord`).
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Bytes of headers after the record header (block headers, origin, xid, data header).
    headers_len: usize,
    /// Block data and images plus main data, which follow the headers in that order.
    data_total: u64,
    main_len: u64,
}

/// Walks the headers of a record body (the bytes after `XLogRecord`) that is `body_len` bytes
/// long; `headers` may be only its beginning, as long as it holds all the headers.
fn layout(headers: &[u8], body_len: usize, image_compressed: u8) -> Result<Layout, String> {
    let mut cursor = Cursor::new(headers);
    let mut data_total: u64 = 0;
    let mut main_len: u64 = 0;
    let mut have_rel = false;
    let consumed = |c: &Cursor<'_>| headers.len() - c.remaining();
    while body_len.saturating_sub(consumed(&cursor)) as u64 > data_total {
        let block_id = cursor.u8()?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = u64::from(cursor.u8()?);
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = u64::from(cursor.u32()?);
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                cursor.take(2)?;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                cursor.take(4)?;
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = cursor.u8()?;
                let data_len = cursor.u16()?;
                if (fork_flags & BKPBLOCK_HAS_DATA != 0) != (data_len != 0) {
                    return Err(format!(
                        "block {id}: data flag and length {data_len} disagree"
                    ));
                }
                data_total += u64::from(data_len);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_len = cursor.u16()?;
                    cursor.take(2)?; // hole offset
                    let image_info = cursor.u8()?;
                    if image_info & BKPIMAGE_HAS_HOLE != 0 && image_info & image_compressed != 0 {
                        cursor.take(2)?; // hole length of a compressed image
                    }
                    data_total += u64::from(image_len);
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    cursor.take(SIZE_OF_REL_FILE_LOCATOR)?;
                    have_rel = true;
                } else if !have_rel {
                    return Err(format!(
                        "block {id}: BKPBLOCK_SAME_REL without a previous relation"
                    ));
                }
                cursor.take(4)?; // block number
            }
            other => return Err(format!("invalid block id {other}")),
        }
    }
    let headers_len = consumed(&cursor);
    let rest = body_len.saturating_sub(headers_len);
    if rest as u64 != data_total {
        return Err(format!(
            "block headers announce {data_total} data bytes but {rest} remain"
        ));
    }
    Ok(Layout {
        headers_len,
        data_total,
        main_len,
    })
}

/// Block 0's relation and fork from the first block header, which heap records and page
/// images always start with (`XLogRecordAssemble` writes block headers in block id order).
fn block0(headers: &[u8], image_compressed: u8) -> Result<(RelFile, u8), String> {
    // id, fork_flags, data_length; then the image header, the RelFileLocator, the block number.
    let (&[id, fork_flags, ..], after) = (headers, headers.get(4..).unwrap_or_default()) else {
        return Err("record too short for a block header".into());
    };
    if id != 0 {
        return Err(format!("expected block 0 first, found block id {id}"));
    }
    let mut at = 0;
    if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
        // Image length, hole offset, bimg_info, and the hole length of a compressed image.
        let image_info = *after.get(4).ok_or("record too short for an image header")?;
        at = if image_info & BKPIMAGE_HAS_HOLE != 0 && image_info & image_compressed != 0 {
            7
        } else {
            5
        };
    }
    if fork_flags & BKPBLOCK_SAME_REL != 0 {
        return Err("block 0: BKPBLOCK_SAME_REL without a previous relation".into());
    }
    let rel = after
        .get(at..at + SIZE_OF_REL_FILE_LOCATOR)
        .ok_or("record too short for a block header")?;
    Ok((rel_file(rel), fork_flags & BKPBLOCK_FORK_MASK))
}

/// Finds the record's main data; it is the last thing in the record.
fn main_data(record: &[u8], image_compressed: u8) -> Result<&[u8], String> {
    let body = record
        .get(SIZE_OF_XLOG_RECORD..)
        .ok_or("record shorter than its header")?;
    let layout = layout(body, body.len(), image_compressed)?;
    // data_total == body.len() - headers_len and main_len <= data_total: no underflow.
    Ok(&body[body.len() - layout.main_len as usize..])
}

/// The beginning of a heap or page-image record, collected as the record streams past, and
/// the one byte further on that a delete's flags live in.
#[derive(Debug)]
pub(super) struct BlockRecordPrefix {
    kind: Option<BlockKind>,
    bytes: [u8; PREFIX_LEN],
    len: usize,
    /// Record offset of a byte to pick up past the prefix (a delete's flags), once known.
    pick_at: Option<u32>,
    picked: Option<u8>,
}

/// What a heap or page-image record did to block 0's relation file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlockChange {
    pub kind: BlockKind,
    pub rel: RelFile,
}

impl BlockRecordPrefix {
    pub fn new() -> Self {
        BlockRecordPrefix {
            kind: None,
            bytes: [0; PREFIX_LEN],
            len: 0,
            pick_at: None,
            picked: None,
        }
    }

    pub fn start(&mut self, kind: Option<BlockKind>) {
        self.kind = kind;
        if kind.is_some() {
            self.len = 0;
            self.pick_at = None;
            self.picked = None;
        }
    }

    pub fn active(&self) -> bool {
        self.kind.is_some()
    }

    /// Takes the record bytes `chunk`, which start at record offset `at`.
    pub fn feed(&mut self, at: u32, chunk: &[u8], tot_len: u32, image_compressed: u8) {
        if self.len < PREFIX_LEN {
            let n = (PREFIX_LEN - self.len).min(chunk.len());
            self.bytes[self.len..self.len + n].copy_from_slice(&chunk[..n]);
            self.len += n;
            let ended = at as usize + chunk.len() == tot_len as usize;
            if self.kind == Some(BlockKind::Delete) && (self.len == PREFIX_LEN || ended) {
                let body_len = tot_len as usize - SIZE_OF_XLOG_RECORD;
                // A malformed record is reported when it ends; until then nothing to pick.
                if let Ok(layout) = layout(&self.bytes[..self.len], body_len, image_compressed) {
                    let main_at =
                        SIZE_OF_XLOG_RECORD as u64 + layout.headers_len as u64 + layout.data_total
                            - layout.main_len;
                    self.pick_at = u32::try_from(main_at + XL_HEAP_DELETE_FLAGS_OFFSET as u64).ok();
                }
            }
        }
        if let Some(pick) = self.pick_at {
            if let Some(offset) = pick.checked_sub(at) {
                if let Some(&byte) = chunk.get(offset as usize) {
                    self.picked = Some(byte);
                }
            }
        }
    }

    /// At the end of a CRC-checked record: what it changed, if anything we track.
    pub fn finish(
        &mut self,
        tot_len: u32,
        image_compressed: u8,
    ) -> Result<Option<BlockChange>, String> {
        let Some(kind) = self.kind.take() else {
            return Ok(None);
        };
        let prefix = &self.bytes[..self.len];
        let (rel, fork) = block0(prefix, image_compressed)?;
        if fork != MAIN_FORK {
            return Ok(None);
        }
        if kind == BlockKind::Delete {
            // A delete references block 0 only: all its headers are in the prefix.
            let body_len = tot_len as usize - SIZE_OF_XLOG_RECORD;
            let layout = layout(prefix, body_len, image_compressed)?;
            if layout.main_len < XL_HEAP_DELETE_FLAGS_OFFSET as u64 + 1 {
                return Err(format!(
                    "heap delete with {} bytes of main data",
                    layout.main_len
                ));
            }
            // The flags were picked up on the way, or lie within the prefix.
            let flags = match self.picked {
                Some(flags) => flags,
                None => {
                    let at = self.pick_at.ok_or("heap delete flags not found")? as usize;
                    *at.checked_sub(SIZE_OF_XLOG_RECORD)
                        .and_then(|i| prefix.get(i))
                        .ok_or("heap delete flags not found")?
                }
            };
            if flags & XLH_DELETE_IS_SUPER != 0 {
                return Ok(None);
            }
        }
        Ok(Some(BlockChange { kind, rel }))
    }
}

/// Bounds-checked little-endian reader; fields in WAL records are not aligned.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err(format!(
                "needed {n} more bytes but only {} remain",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// An `int` count followed by that many fixed-size items, returned as raw bytes.
    fn counted_array(&mut self, item_size: usize) -> Result<&'a [u8], String> {
        let count = i32::from_le_bytes(self.array()?);
        let count = usize::try_from(count).map_err(|_| format!("negative count {count}"))?;
        let len = count
            .checked_mul(item_size)
            .ok_or_else(|| format!("count {count} overflows"))?;
        self.take(len)
    }
}
