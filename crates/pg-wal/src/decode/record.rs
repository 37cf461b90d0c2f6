//! Layout of one WAL record and of the few record payloads Strata interprets.
//! References: src/include/access/xlogrecord.h (`XLogRecord`, block headers, `XLR_BLOCK_ID_*`),
//! src/backend/access/transam/xlogreader.c (`DecodeXLogRecord`), src/include/access/xact.h and
//! src/backend/access/rmgrdesc/xactdesc.c (`ParseCommitRecord`, `ParseAbortRecord`),
//! src/include/catalog/pg_control.h (`XLOG_SWITCH`, `XLOG_RESTORE_POINT`) and
//! src/include/access/xlog_internal.h (`xl_restore_point`).

use crate::time::from_pg_micros;
use crate::Lsn;

use super::WalEvent;

/// `SizeOfXLogRecord`: the fixed header every record starts with.
pub(super) const SIZE_OF_XLOG_RECORD: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the CRC covers the header only up to here.
pub(super) const XL_CRC_OFFSET: usize = 20;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
/// `XLR_RMGR_INFO_MASK`: the low four info bits belong to the WAL machinery itself.
const XLR_RMGR_INFO_MASK: u8 = 0xF0;

const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;

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

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PGLZ, LZ4 and ZSTD compression bits (PostgreSQL 15 and later).
pub(super) const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;
/// `BKPIMAGE_IS_COMPRESSED` of PostgreSQL 14 (0x02 means "apply" from 15 on).
pub(super) const BKPIMAGE_IS_COMPRESSED_PG14: u8 = 0x02;

/// What differs between WAL format generations in the parts we decode.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordFormat {
    /// `sizeof(xl_xact_stats_item)` (no such items before PostgreSQL 15).
    pub stats_item_size: usize,
    /// Block image flag bits that mean "compressed".
    pub image_compressed: u8,
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

/// Record types the decoder reports; everything else is only checked and skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Commit { prepared: bool },
    Abort { prepared: bool },
    RestorePoint,
    Switch,
}

pub(super) fn classify(rmid: u8, info: u8) -> Option<Kind> {
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
            _ => None,
        },
        _ => None,
    }
}

/// Turns a complete, CRC-checked record into an event. Errors are reasons for
/// `WalError::MalformedRecord`: the CRC matched, so the layout is not what we expect.
pub(super) fn to_event(
    kind: Kind,
    header: &RecordHeader,
    record: &[u8],
    lsn: Lsn,
    end_lsn: Lsn,
    format: RecordFormat,
) -> Result<WalEvent, String> {
    if kind == Kind::Switch {
        return Ok(WalEvent::Switch { lsn });
    }
    let mut main = Cursor::new(main_data(record, format.image_compressed)?);
    match kind {
        Kind::Commit { prepared } | Kind::Abort { prepared } => {
            let commit = matches!(kind, Kind::Commit { .. });
            let time = from_pg_micros(main.i64()?);
            let xid = if prepared {
                twophase_xid(&mut main, header.info, commit, format.stats_item_size)?
            } else {
                header.xid
            };
            Ok(if commit {
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
            })
        }
        Kind::RestorePoint => {
            let time = from_pg_micros(main.i64()?);
            let raw = main.take(RESTORE_POINT_NAME_LEN)?;
            let name_len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let name = String::from_utf8_lossy(&raw[..name_len]).into_owned();
            Ok(WalEvent::RestorePoint {
                lsn,
                end_lsn,
                name,
                time,
            })
        }
        Kind::Switch => Ok(WalEvent::Switch { lsn }),
    }
}

/// Walks the optional xact sections in `ParseCommitRecord`/`ParseAbortRecord` order up to
/// the two-phase xid, which a *_PREPARED record carries instead of using `xl_xid`.
fn twophase_xid(
    main: &mut Cursor<'_>,
    info: u8,
    commit: bool,
    stats_item_size: usize,
) -> Result<u32, String> {
    let xinfo = if info & XLOG_XACT_HAS_INFO != 0 {
        main.u32()?
    } else {
        0
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        main.take(SIZE_OF_XACT_DBINFO)?;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        main.counted_array(SIZE_OF_TRANSACTION_ID)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        main.counted_array(SIZE_OF_REL_FILE_LOCATOR)?;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        main.counted_array(stats_item_size)?;
    }
    // Abort records never carry invalidation messages.
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        main.counted_array(SIZE_OF_SHARED_INVAL_MESSAGE)?;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return Err("prepared-transaction record without a two-phase xid".into());
    }
    main.u32()
}

/// Finds the record's main data by walking the block reference headers as
/// `DecodeXLogRecord` does; main data is the last thing in the record.
fn main_data(record: &[u8], image_compressed: u8) -> Result<&[u8], String> {
    let body = record
        .get(SIZE_OF_XLOG_RECORD..)
        .ok_or("record shorter than its header")?;
    let mut headers = Cursor::new(body);
    let mut data_total: u64 = 0;
    let mut main_len: u64 = 0;
    let mut have_rel = false;
    while headers.remaining() as u64 > data_total {
        let block_id = headers.u8()?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = u64::from(headers.u8()?);
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = u64::from(headers.u32()?);
                data_total += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                headers.take(2)?;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                headers.take(4)?;
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = headers.u8()?;
                let data_len = headers.u16()?;
                if (fork_flags & BKPBLOCK_HAS_DATA != 0) != (data_len != 0) {
                    return Err(format!(
                        "block {id}: data flag and length {data_len} disagree"
                    ));
                }
                data_total += u64::from(data_len);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let image_len = headers.u16()?;
                    headers.take(2)?; // hole offset
                    let image_info = headers.u8()?;
                    if image_info & BKPIMAGE_HAS_HOLE != 0 && image_info & image_compressed != 0 {
                        headers.take(2)?; // hole length of a compressed image
                    }
                    data_total += u64::from(image_len);
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    headers.take(SIZE_OF_REL_FILE_LOCATOR)?;
                    have_rel = true;
                } else if !have_rel {
                    return Err(format!(
                        "block {id}: BKPBLOCK_SAME_REL without a previous relation"
                    ));
                }
                headers.take(4)?; // block number
            }
            other => return Err(format!("invalid block id {other}")),
        }
    }
    let rest = headers.rest();
    if rest.len() as u64 != data_total {
        return Err(format!(
            "block headers announce {data_total} data bytes but {} remain",
            rest.len()
        ));
    }
    // data_total == rest.len() and main_len <= data_total, so this cannot underflow.
    Ok(&rest[rest.len() - main_len as usize..])
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

    fn rest(&self) -> &'a [u8] {
        self.buf
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

    /// An `int` count followed by that many fixed-size items.
    fn counted_array(&mut self, item_size: usize) -> Result<(), String> {
        let count = i32::from_le_bytes(self.array()?);
        let count = usize::try_from(count).map_err(|_| format!("negative count {count}"))?;
        let len = count
            .checked_mul(item_size)
            .ok_or_else(|| format!("count {count} overflows"))?;
        self.take(len).map(|_| ())
    }
}
