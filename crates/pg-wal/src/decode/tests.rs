//! Decoder tests against synthetic WAL laid out the way xloginsert.c/xlog.c write it:
//! MAXALIGNed records, page headers (long on segment starts) with continuation lengths.

use super::*;
use crate::time::from_pg_micros;
use crate::SegmentNo;

const MIB: u64 = 1024 * 1024;
const PG15_MAGIC: u16 = 0xD110;

fn geometry() -> WalGeometry {
    WalGeometry::new(MIB).unwrap()
}

/// Writes WAL as PostgreSQL lays it out, so tests can place records across pages/segments.
struct WalWriter {
    geometry: WalGeometry,
    start: Lsn,
    out: Vec<u8>,
    prev: Lsn,
    magic: u16,
}

impl WalWriter {
    fn new(start: Lsn) -> Self {
        WalWriter {
            geometry: geometry(),
            start,
            out: Vec::new(),
            prev: Lsn::INVALID,
            magic: PG15_MAGIC,
        }
    }

    fn pos(&self) -> Lsn {
        self.start + self.out.len() as u64
    }

    fn page_header(&mut self, rem_len: u32) {
        let page = self.pos();
        let long = self.geometry.offset_in_segment(page) == 0;
        let mut info = 0u16;
        if rem_len > 0 {
            info |= XLP_FIRST_IS_CONTRECORD;
        }
        if long {
            info |= XLP_LONG_HEADER;
        }
        self.out.extend_from_slice(&self.magic.to_le_bytes());
        self.out.extend_from_slice(&info.to_le_bytes());
        self.out.extend_from_slice(&1u32.to_le_bytes());
        self.out.extend_from_slice(&page.0.to_le_bytes());
        self.out.extend_from_slice(&rem_len.to_le_bytes());
        self.out.extend_from_slice(&[0; 4]);
        if long {
            self.out
                .extend_from_slice(&0x1234_5678_9ABC_DEF0u64.to_le_bytes());
            self.out
                .extend_from_slice(&(self.geometry.segment_size() as u32).to_le_bytes());
            self.out.extend_from_slice(&8192u32.to_le_bytes());
        }
    }

    /// Pads to the next record start, emitting a page header if that is a page boundary.
    fn align(&mut self) {
        while self.pos().0 % 8 != 0 {
            self.out.push(0);
        }
        if self.pos().0 % XLOG_BLCKSZ == 0 {
            self.page_header(0);
        }
    }

    /// Appends a complete record (header CRC filled in) and returns its start.
    fn record(&mut self, rmid: u8, info: u8, xid: u32, payload: &[u8]) -> Lsn {
        self.align();
        let start = self.pos();
        let tot_len = (SIZE_OF_XLOG_RECORD + payload.len()) as u32;
        let mut rec = Vec::new();
        rec.extend_from_slice(&tot_len.to_le_bytes());
        rec.extend_from_slice(&xid.to_le_bytes());
        rec.extend_from_slice(&self.prev.0.to_le_bytes());
        rec.extend_from_slice(&[info, rmid, 0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(payload), &rec[..XL_CRC_OFFSET]);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(payload);
        self.put_spanning(&rec);
        self.prev = start;
        start
    }

    fn put_spanning(&mut self, mut rec: &[u8]) {
        while !rec.is_empty() {
            if self.pos().0 % XLOG_BLCKSZ == 0 {
                self.page_header(rec.len() as u32);
            }
            let room = (XLOG_BLCKSZ - self.pos().0 % XLOG_BLCKSZ) as usize;
            let n = room.min(rec.len());
            self.out.extend_from_slice(&rec[..n]);
            rec = &rec[n..];
        }
    }

    /// Zero-fills to the end of the current segment, as after XLOG_SWITCH or unused WAL.
    fn pad_segment(&mut self) {
        let offset = self.geometry.offset_in_segment(self.pos());
        if offset != 0 {
            let n = self.geometry.segment_size() - offset;
            self.out.resize(self.out.len() + n as usize, 0);
        }
    }

    fn end(&self) -> Lsn {
        Lsn(self.pos().0.next_multiple_of(8))
    }
}

/// Main data only, preceded by the short or long data block id.
fn with_main_data(main: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if main.len() < 256 {
        out.extend_from_slice(&[255, main.len() as u8]);
    } else {
        out.push(254);
        out.extend_from_slice(&(main.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(main);
    out
}

fn commit_payload(time: i64) -> Vec<u8> {
    with_main_data(&time.to_le_bytes())
}

/// A heap-like record: one block with a full-page image and data, so main data sits
/// behind block payloads.
fn record_with_block(image_len: u16, data_len: u16, main: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8, 0x10 | 0x20];
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&image_len.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.push(0x01 | 0x04); // compressed image with a hole: hole length follows
    out.extend_from_slice(&100u16.to_le_bytes());
    out.extend_from_slice(&[7; 12]); // RelFileLocator
    out.extend_from_slice(&42u32.to_le_bytes());
    out.extend_from_slice(&[255, main.len() as u8]);
    out.extend(std::iter::repeat_n(
        0xAB,
        image_len as usize + data_len as usize,
    ));
    out.extend_from_slice(main);
    out
}

fn decode_in_chunks(start: Lsn, bytes: &[u8], chunk: usize) -> Vec<WalEvent> {
    let mut decoder = WalDecoder::new(geometry(), start);
    let mut events = Vec::new();
    for piece in bytes.chunks(chunk) {
        events.extend(decoder.feed(piece).unwrap());
    }
    assert_eq!(decoder.position(), start + bytes.len() as u64);
    events
}

fn commit(lsn: Lsn, end_lsn: Lsn, xid: u32, us: i64) -> WalEvent {
    WalEvent::Commit {
        lsn,
        end_lsn,
        xid,
        time: from_pg_micros(us),
        changes: None,
    }
}

#[test]
fn records_spanning_pages_and_segments_in_any_chunking() {
    let seg0 = Lsn(5 * MIB);
    let mut w = WalWriter::new(seg0);
    let mut expected = Vec::new();
    let mut xid = 700;
    // Enough filler (with block images) that commits land on page and segment edges.
    while w.pos().0 < seg0.0 + MIB + 3 * XLOG_BLCKSZ {
        w.record(10, 0x00, xid, &record_with_block(3000, 17, b"heap-insert"));
        let at = w.record(
            1,
            XLOG_XACT_COMMIT_TEST,
            xid,
            &commit_payload(1_000 + xid as i64),
        );
        expected.push(commit(at, w.end(), xid, 1_000 + xid as i64));
        xid += 1;
    }
    let rp = {
        let mut main = 123_456i64.to_le_bytes().to_vec();
        let mut name = [0u8; 64];
        name[..3].copy_from_slice(b"rp1");
        main.extend_from_slice(&name);
        w.record(0, 0x70, 0, &with_main_data(&main))
    };
    expected.push(WalEvent::RestorePoint {
        lsn: rp,
        end_lsn: w.end(),
        name: "rp1".into(),
        time: from_pg_micros(123_456),
    });
    assert!(expected.len() > 100);

    for chunk in [1, 7, 777, 8192, 1 << 20, usize::MAX] {
        let chunk = chunk.min(w.out.len());
        assert_eq!(
            decode_in_chunks(seg0, &w.out, chunk),
            expected,
            "chunk {chunk}"
        );
    }
    assert_eq!(
        decode_segment(geometry(), seg0, &w.out).unwrap(),
        expected,
        "decode_segment"
    );
}

const XLOG_XACT_COMMIT_TEST: u8 = 0x00;

#[test]
fn starting_mid_record_skips_the_continuation() {
    let seg0 = Lsn(2 * MIB);
    let mut w = WalWriter::new(seg0);
    // Fill the first segment so a big record straddles into the second.
    while w.pos().0 < seg0.0 + MIB - 2 * XLOG_BLCKSZ {
        w.record(10, 0, 1, &record_with_block(4000, 8, b"x"));
    }
    w.record(10, 0, 1, &record_with_block(40_000, 8, b"straddler"));
    assert!(w.pos().0 > seg0.0 + MIB + XLOG_BLCKSZ);
    let at = w.record(1, 0x00, 99, &commit_payload(5));
    let seg1 = seg0 + MIB;
    let tail = &w.out[MIB as usize..];
    let events = decode_in_chunks(seg1, tail, 777);
    assert_eq!(events, vec![commit(at, w.end(), 99, 5)]);

    // Starting at a later page inside the continuation works the same.
    let page = seg1 + XLOG_BLCKSZ;
    let events = decode_in_chunks(page, &w.out[(MIB + XLOG_BLCKSZ) as usize..], 1000);
    assert_eq!(events, vec![commit(at, w.end(), 99, 5)]);
}

#[test]
fn zero_tail_and_switch_resume_at_next_segment() {
    let seg0 = Lsn(MIB);
    let mut w = WalWriter::new(seg0);
    let first = w.record(1, 0x00, 10, &commit_payload(1));
    let first_end = w.end();
    let switch = w.record(0, 0x40, 0, &[]);
    w.pad_segment();
    let second = w.record(1, 0x20, 11, &commit_payload(2));
    let second_end = w.end();
    // Unused remainder of the segment is zeros: end of valid WAL.
    w.pad_segment();
    let third = w.record(1, 0x00, 12, &commit_payload(3));
    let third_end = w.end();
    let events = decode_in_chunks(seg0, &w.out, 4096);
    assert_eq!(
        events,
        vec![
            commit(first, first_end, 10, 1),
            WalEvent::Switch { lsn: switch },
            WalEvent::Abort {
                lsn: second,
                end_lsn: second_end,
                xid: 11,
                time: from_pg_micros(2)
            },
            commit(third, third_end, 12, 3),
        ]
    );
}

#[test]
fn bad_crc_ends_valid_wal_for_the_segment() {
    let seg0 = Lsn(MIB);
    let mut w = WalWriter::new(seg0);
    let good = w.record(1, 0x00, 10, &commit_payload(1));
    let good_end = w.end();
    let bad = w.record(1, 0x00, 11, &commit_payload(2));
    w.record(1, 0x00, 12, &commit_payload(3));
    w.pad_segment();
    w.prev = Lsn::INVALID;
    let next = w.record(1, 0x00, 13, &commit_payload(4));
    let next_end = w.end();
    // Flip one payload byte of the second commit.
    let offset = (bad.0 - seg0.0) as usize + SIZE_OF_XLOG_RECORD + 3;
    w.out[offset] ^= 0xFF;
    let events = decode_in_chunks(seg0, &w.out, 333);
    assert_eq!(
        events,
        vec![commit(good, good_end, 10, 1), commit(next, next_end, 13, 4)]
    );
}

#[test]
fn broken_prev_link_ends_valid_wal() {
    let mut w = WalWriter::new(Lsn(MIB));
    w.record(1, 0x00, 10, &commit_payload(1));
    w.prev = Lsn(12345);
    w.record(1, 0x00, 11, &commit_payload(2));
    let events = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap();
    assert_eq!(events.len(), 1);
}

#[test]
fn stale_page_in_recycled_segment_ends_valid_wal() {
    let seg0 = Lsn(65 * MIB);
    let mut w = WalWriter::new(seg0);
    let good = w.record(1, 0x00, 10, &commit_payload(1));
    let good_end = w.end();
    // Spans from the first page into the second, which we then replace.
    w.record(10, 0, 1, &record_with_block(9000, 8, b"spanning"));
    while w.pos().0 < seg0.0 + 3 * XLOG_BLCKSZ {
        w.record(1, 0x00, 11, &commit_payload(2));
    }
    let mut bytes = w.out.clone();
    // Second page as left behind by the file's previous use: an older page address.
    let mut old = WalWriter::new(Lsn(seg0.0 + XLOG_BLCKSZ - 64 * MIB));
    old.record(1, 0x00, 5, &commit_payload(9));
    old.out.resize(XLOG_BLCKSZ as usize, 0);
    bytes[XLOG_BLCKSZ as usize..2 * XLOG_BLCKSZ as usize].copy_from_slice(&old.out);
    let events = decode_segment(geometry(), seg0, &bytes).unwrap();
    assert_eq!(events, vec![commit(good, good_end, 10, 1)]);
    // Untouched, every commit is found.
    let all = decode_segment(geometry(), seg0, &w.out).unwrap();
    assert!(all.len() > 100, "{}", all.len());
}

#[test]
fn prepared_transactions_take_the_twophase_xid() {
    let mut main = 77i64.to_le_bytes().to_vec();
    let xinfo = (1u32 << 0) | (1 << 1) | (1 << 2) | (1 << 8) | (1 << 3) | (1 << 4) | (1 << 7);
    main.extend_from_slice(&xinfo.to_le_bytes());
    main.extend_from_slice(&[1; 8]); // dbinfo
    main.extend_from_slice(&2i32.to_le_bytes());
    main.extend_from_slice(&[2; 8]); // subxacts
    main.extend_from_slice(&1i32.to_le_bytes());
    main.extend_from_slice(&[3; 12]); // relfilelocators
    main.extend_from_slice(&1i32.to_le_bytes());
    main.extend_from_slice(&[4; 12]); // dropped stats (PG15 layout)
    main.extend_from_slice(&1i32.to_le_bytes());
    main.extend_from_slice(&[5; 16]); // invalidation messages
    main.extend_from_slice(&4242u32.to_le_bytes()); // twophase xid
    main.extend_from_slice(b"gid\0");

    let mut w = WalWriter::new(Lsn(MIB));
    // COMMIT_PREPARED with XLOG_XACT_HAS_INFO; the header xid is the committing backend's.
    let at = w.record(1, 0x30 | 0x80, 0, &with_main_data(&main));
    let end = w.end();
    // ABORT_PREPARED has no invalidation section.
    let mut abort = 78i64.to_le_bytes().to_vec();
    abort.extend_from_slice(&(1u32 << 4).to_le_bytes());
    abort.extend_from_slice(&4343u32.to_le_bytes());
    let abort_at = w.record(1, 0x40 | 0x80, 0, &with_main_data(&abort));
    let abort_end = w.end();
    let events = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap();
    let three = 0x0303_0303;
    let changes = TxnChanges {
        db: Some(0x0101_0101),
        dropped: vec![RelFile {
            spc: three,
            db: three,
            rel: three,
        }],
        // Message id 5 is a catalog cache's.
        catalog_changed: true,
        ..TxnChanges::default()
    };
    assert_eq!(
        events,
        vec![
            WalEvent::Commit {
                lsn: at,
                end_lsn: end,
                xid: 4242,
                time: from_pg_micros(77),
                changes: Some(Box::new(changes)),
            },
            WalEvent::Abort {
                lsn: abort_at,
                end_lsn: abort_end,
                xid: 4343,
                time: from_pg_micros(78)
            }
        ]
    );
}

#[test]
fn pg18_dropped_stats_items_are_wider() {
    let mut main = 1i64.to_le_bytes().to_vec();
    main.extend_from_slice(&((1u32 << 8) | (1 << 4)).to_le_bytes());
    main.extend_from_slice(&1i32.to_le_bytes());
    main.extend_from_slice(&[4; 16]);
    main.extend_from_slice(&555u32.to_le_bytes());
    let mut w = WalWriter::new(Lsn(MIB));
    w.magic = 0xD118;
    let at = w.record(1, 0x30 | 0x80, 0, &with_main_data(&main));
    let events = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap();
    assert_eq!(events, vec![commit(at, w.end(), 555, 1)]);
}

#[test]
fn other_records_and_xact_kinds_are_not_reported() {
    let mut w = WalWriter::new(Lsn(MIB));
    w.record(1, 0x10, 5, &commit_payload(1)); // PREPARE
    w.record(1, 0x50, 5, &commit_payload(1)); // ASSIGNMENT
    w.record(0, 0x10, 0, &with_main_data(&[0; 88])); // CHECKPOINT_ONLINE
    w.record(10, 0x00, 5, &with_main_data(&[1; 300])); // long main data
    assert_eq!(
        decode_segment(geometry(), Lsn(MIB), &w.out).unwrap(),
        vec![]
    );
}

#[test]
fn malformed_payload_with_valid_crc_is_an_error() {
    let mut w = WalWriter::new(Lsn(MIB));
    // A commit whose block id 100 cannot exist.
    w.record(1, 0x00, 5, &[100, 0, 0, 0]);
    let err = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap_err();
    assert!(matches!(err, WalError::MalformedRecord { .. }), "{err}");
}

#[test]
fn format_errors() {
    let mut w = WalWriter::new(Lsn(MIB));
    w.magic = 0xD106; // PostgreSQL 13
    w.record(1, 0x00, 5, &commit_payload(1));
    let err = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap_err();
    assert_eq!(
        err,
        WalError::UnsupportedPageMagic {
            lsn: Lsn(MIB),
            magic: 0xD106
        }
    );

    let mut w = WalWriter::new(Lsn(MIB));
    w.record(1, 0x00, 5, &commit_payload(1));
    let sixteen = WalGeometry::DEFAULT;
    let err = decode_segment(sixteen, Lsn(16 * MIB), &w.out).unwrap_err();
    assert!(matches!(err, WalError::WrongSegment { .. }), "{err}");
    let mut decoder = WalDecoder::new(geometry(), Lsn(2 * MIB));
    assert!(matches!(
        decoder.feed(&w.out),
        Err(WalError::WrongSegment { .. })
    ));
    // Errors are sticky.
    assert!(decoder.feed(&[0]).is_err());

    let g2 = WalGeometry::new(2 * MIB).unwrap();
    let mut w = WalWriter::new(Lsn(2 * MIB));
    w.record(1, 0x00, 5, &commit_payload(1));
    let err = decode_segment(g2, Lsn(2 * MIB), &w.out).unwrap_err();
    assert!(matches!(err, WalError::SegmentSizeMismatch { .. }), "{err}");

    let mut decoder = WalDecoder::new(geometry(), Lsn(MIB + 8));
    assert_eq!(
        decoder.feed(&[0]),
        Err(WalError::UnalignedStart(Lsn(MIB + 8)))
    );
}

#[test]
fn zeroed_segment_yields_nothing() {
    let zeros = vec![0u8; MIB as usize];
    let start = geometry().segment_start(SegmentNo(3));
    assert_eq!(decode_segment(geometry(), start, &zeros).unwrap(), vec![]);
}

// ---- what committed transactions did ----

const RM_SMGR: u8 = 2;
const RM_DBASE: u8 = 4;
const RM_STANDBY: u8 = 8;
const RM_HEAP: u8 = 10;
const HEAP_DELETE: u8 = 0x10;
const HEAP_UPDATE: u8 = 0x20;
const HEAP_HOT_UPDATE: u8 = 0x40;
const XLH_DELETE_IS_SUPER: u8 = 0x08;

fn rel(n: u32) -> RelFile {
    RelFile {
        spc: 1663,
        db: 5,
        rel: n,
    }
}

fn locator(rel: RelFile) -> Vec<u8> {
    [rel.spc, rel.db, rel.rel]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// A record referencing block 0 of `rel` (with a full-page image of `image_len` bytes if not
/// zero), then `main` as main data.
fn block_record(rel: RelFile, fork: u8, image_len: u16, main: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8, fork | if image_len > 0 { 0x10 } else { 0 }];
    out.extend_from_slice(&0u16.to_le_bytes());
    if image_len > 0 {
        out.extend_from_slice(&image_len.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.push(0); // no hole, not compressed
    }
    out.extend_from_slice(&locator(rel));
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&[255, main.len() as u8]);
    out.extend(std::iter::repeat_n(0xCD, image_len as usize));
    out.extend_from_slice(main);
    out
}

/// `xl_heap_delete` with `flags`.
fn heap_delete(rel: RelFile, image_len: u16, flags: u8) -> Vec<u8> {
    let mut main = 77u32.to_le_bytes().to_vec();
    main.extend_from_slice(&[1, 0, 0, flags]);
    block_record(rel, 0, image_len, &main)
}

fn heap_update(rel: RelFile) -> Vec<u8> {
    block_record(rel, 0, 0, &[0; 14])
}

/// A commit (or abort) main data with dbinfo, subtransactions, dropped files and
/// invalidation messages of the given ids.
fn xact_payload(time: i64, subxacts: &[u32], rels: &[RelFile], inval_ids: &[i8]) -> Vec<u8> {
    let xinfo: u32 = 1 | 2 | 4 | if inval_ids.is_empty() { 0 } else { 8 };
    let mut main = time.to_le_bytes().to_vec();
    main.extend_from_slice(&xinfo.to_le_bytes());
    main.extend_from_slice(&5u32.to_le_bytes());
    main.extend_from_slice(&1663u32.to_le_bytes());
    main.extend_from_slice(&(subxacts.len() as i32).to_le_bytes());
    for xid in subxacts {
        main.extend_from_slice(&xid.to_le_bytes());
    }
    main.extend_from_slice(&(rels.len() as i32).to_le_bytes());
    for rel in rels {
        main.extend_from_slice(&locator(*rel));
    }
    if !inval_ids.is_empty() {
        main.extend_from_slice(&(inval_ids.len() as i32).to_le_bytes());
        for id in inval_ids {
            let mut message = [0u8; 16];
            message[0] = *id as u8;
            main.extend_from_slice(&message);
        }
    }
    with_main_data(&main)
}

fn changes_of(events: &[WalEvent], xid: u32) -> Option<TxnChanges> {
    events
        .iter()
        .find_map(|e| match e {
            WalEvent::Commit {
                xid: x, changes, ..
            } if *x == xid => Some(changes.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no commit of {xid} in {events:#?}"))
        .map(|c| *c)
}

#[test]
fn rows_are_counted_per_file_with_committed_subtransactions_only() {
    let (a, b) = (rel(16384), rel(16390));
    let mut w = WalWriter::new(Lsn(MIB));
    w.record(RM_HEAP, HEAP_DELETE, 100, &heap_delete(a, 0, 0));
    // A page image puts the delete's flags far past the kept prefix.
    w.record(RM_HEAP, HEAP_DELETE, 100, &heap_delete(a, 5000, 0));
    w.record(RM_HEAP, HEAP_UPDATE, 100, &heap_update(a));
    w.record(RM_HEAP, HEAP_HOT_UPDATE | 0x80, 100, &heap_update(a));
    // Speculative insertions taken back are not deletes, with or without an image.
    w.record(
        RM_HEAP,
        HEAP_DELETE,
        100,
        &heap_delete(a, 0, XLH_DELETE_IS_SUPER),
    );
    w.record(
        RM_HEAP,
        HEAP_DELETE,
        100,
        &heap_delete(a, 3000, XLH_DELETE_IS_SUPER | 1),
    );
    for _ in 0..3 {
        w.record(RM_HEAP, HEAP_DELETE, 101, &heap_delete(a, 0, 0));
    }
    w.record(RM_HEAP, HEAP_DELETE, 101, &heap_delete(b, 0, 0));
    // Subtransaction 102 rolls back; 103 is never mentioned again.
    for _ in 0..5 {
        w.record(RM_HEAP, HEAP_DELETE, 102, &heap_delete(a, 0, 0));
    }
    w.record(1, 0x20 | 0x80, 102, &xact_payload(1, &[], &[], &[]));
    w.record(RM_HEAP, HEAP_DELETE, 103, &heap_delete(b, 0, 0));
    // Another transaction's rows stay its own.
    w.record(RM_HEAP, HEAP_DELETE, 200, &heap_delete(a, 0, 0));
    w.record(1, 0x80, 100, &xact_payload(2, &[101], &[], &[]));
    w.record(1, 0x80, 200, &xact_payload(3, &[], &[], &[]));
    // A transaction that rolls back reports nothing, and its state is gone.
    w.record(RM_HEAP, HEAP_DELETE, 300, &heap_delete(a, 0, 0));
    w.record(1, 0x20 | 0x80, 300, &xact_payload(4, &[], &[], &[]));

    let expected = TxnChanges {
        db: Some(5),
        rows: vec![
            RowChanges {
                rel: a,
                deleted: 5,
                updated: 2,
            },
            RowChanges {
                rel: b,
                deleted: 1,
                updated: 0,
            },
        ],
        ..TxnChanges::default()
    };
    let mut reference = None;
    for chunk in [1, 7, 100, 777, usize::MAX] {
        let chunk = chunk.min(w.out.len());
        let mut decoder = WalDecoder::new(geometry(), Lsn(MIB));
        let mut events = Vec::new();
        for piece in w.out.chunks(chunk) {
            events.extend(decoder.feed(piece).unwrap());
        }
        assert_eq!(
            changes_of(&events, 100),
            Some(expected.clone()),
            "chunk {chunk}"
        );
        assert_eq!(changes_of(&events, 200).unwrap().rows.len(), 1);
        // Only 103 (never ended) is still tracked.
        assert_eq!(decoder.changes.tracked(), 1, "chunk {chunk}");
        if let Some(reference) = &reference {
            assert_eq!(&events, reference, "chunk {chunk}");
        }
        reference = Some(events);
    }
}

#[test]
fn files_created_filled_truncated_and_databases_dropped() {
    let (created, empty, other_fork, truncated, vacuumed) =
        (rel(20000), rel(20001), rel(20002), rel(20003), rel(20004));
    let dropped = [rel(16384), rel(16385)];
    for (magic, drop_info) in [(PG15_MAGIC, 0x20), (0xD10D, 0x10)] {
        let mut w = WalWriter::new(Lsn(MIB));
        w.magic = magic;
        let create = |rel: RelFile, fork: u32| {
            let mut main = locator(rel);
            main.extend_from_slice(&fork.to_le_bytes());
            with_main_data(&main)
        };
        let truncate = |rel: RelFile, flags: u32| {
            let mut main = 0u32.to_le_bytes().to_vec();
            main.extend_from_slice(&locator(rel));
            main.extend_from_slice(&flags.to_le_bytes());
            with_main_data(&main)
        };
        w.record(RM_SMGR, 0x10, 500, &create(created, 0));
        w.record(RM_SMGR, 0x10, 500, &create(empty, 0));
        w.record(RM_SMGR, 0x10, 500, &create(other_fork, 2));
        // A page image into the new file, as VACUUM FULL and CLUSTER write it.
        w.record(0, 0xB0, 500, &block_record(created, 0, 8000, &[]));
        // Pages of another fork do not fill the main fork.
        w.record(0, 0xB0, 500, &block_record(empty, 1, 100, &[]));
        w.record(RM_SMGR, 0x20, 500, &truncate(truncated, 7));
        // VACUUM's truncation has no xid.
        w.record(RM_SMGR, 0x20, 0, &truncate(vacuumed, 7));
        // DROP DATABASE marks the database invalid in pg_database (a shared catalog) first,
        // outside the transaction; an in-place update in a database is not that.
        let pg_database = RelFile {
            spc: 1664,
            db: 0,
            rel: 1262,
        };
        let invalid_at = w.record(RM_HEAP, 0x70, 0, &block_record(pg_database, 0, 0, &[1]));
        w.record(RM_HEAP, 0x70, 0, &block_record(rel(1259), 0, 0, &[1]));
        let mut drop = 16999u32.to_le_bytes().to_vec();
        drop.extend_from_slice(&0i32.to_le_bytes());
        w.record(RM_DBASE, drop_info, 500, &with_main_data(&drop));
        // Only smgr and snapshot invalidations: no catalog change.
        w.record(1, 0x80, 500, &xact_payload(9, &[], &dropped, &[-3, -5]));
        // With tracking off the same WAL yields the same commits, without changes.
        let plain = WalDecoder::new(geometry(), Lsn(MIB))
            .report_changes(None)
            .feed(&w.out)
            .unwrap();
        assert_eq!(changes_of(&plain, 500), None, "magic {magic:#x}");
        assert_eq!(plain.len(), 1);
        let events = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap();
        assert_eq!(
            changes_of(&events, 500),
            Some(TxnChanges {
                db: Some(5),
                dropped: dropped.to_vec(),
                created: vec![created, empty],
                filled: vec![created],
                truncated: vec![truncated],
                dropped_databases: vec![16999],
                drop_database_lsn: Some(invalid_at),
                ..TxnChanges::default()
            }),
            "magic {magic:#x}"
        );
    }
}

/// A commit record's dropped-file list is as long as the record says; one file past
/// [`MAX_ENTRIES`] is not collected, and the report says it is incomplete.
#[test]
fn dropped_files_past_the_cap_make_the_commit_incomplete() {
    let files: Vec<RelFile> = (0..MAX_ENTRIES as u32 + 1)
        .map(|n| rel(16384 + n))
        .collect();
    let mut w = WalWriter::new(Lsn(MIB));
    w.record(1, 0x80, 700, &xact_payload(1, &[], &files, &[]));
    w.record(
        1,
        0x80,
        701,
        &xact_payload(2, &[], &files[..MAX_ENTRIES], &[]),
    );
    let events = decode_in_chunks(Lsn(MIB), &w.out, 1 << 16);
    let over = changes_of(&events, 700).expect("changes");
    assert_eq!(over.dropped.len(), MAX_ENTRIES);
    assert_eq!(over.dropped, files[..MAX_ENTRIES]);
    assert!(over.incomplete);
    // At the cap the list is whole.
    let at = changes_of(&events, 701).expect("changes");
    assert_eq!(at.dropped, files[..MAX_ENTRIES]);
    assert!(!at.incomplete);
}

#[test]
fn catalog_invalidations_and_empty_commits() {
    let mut w = WalWriter::new(Lsn(MIB));
    w.record(1, 0x80, 600, &xact_payload(1, &[], &[], &[-2]));
    w.record(1, 0x80, 601, &xact_payload(1, &[], &[], &[42]));
    w.record(1, 0x80, 602, &xact_payload(1, &[], &[], &[]));
    w.record(1, 0x00, 603, &commit_payload(1));
    let events = decode_segment(geometry(), Lsn(MIB), &w.out).unwrap();
    assert!(changes_of(&events, 600).unwrap().catalog_changed);
    assert!(changes_of(&events, 601).unwrap().catalog_changed);
    assert_eq!(changes_of(&events, 602), None);
    assert_eq!(changes_of(&events, 603), None);
}

#[test]
fn running_xacts_forgets_transactions_that_ended_unseen() {
    let running = |oldest: u32| {
        let mut main = vec![0u8; 24];
        main[16..20].copy_from_slice(&oldest.to_le_bytes());
        with_main_data(&main)
    };
    let mut w = WalWriter::new(Lsn(MIB));
    // Near wraparound: 0xFFFF_FFF0 is older than 5.
    w.record(
        RM_HEAP,
        HEAP_DELETE,
        0xFFFF_FFF0,
        &heap_delete(rel(1), 0, 0),
    );
    w.record(RM_HEAP, HEAP_DELETE, 4, &heap_delete(rel(1), 0, 0));
    w.record(RM_HEAP, HEAP_DELETE, 10, &heap_delete(rel(1), 0, 0));
    let mut decoder = WalDecoder::new(geometry(), Lsn(MIB));
    decoder.feed(&w.out).unwrap();
    assert_eq!(decoder.changes.tracked(), 3);
    let from = w.out.len();
    w.record(RM_STANDBY, 0x10, 0, &running(5));
    decoder.feed(&w.out[from..]).unwrap();
    assert_eq!(decoder.changes.tracked(), 1);
}

#[test]
fn malformed_change_records_are_errors() {
    let bad_count = |count: i32| {
        let mut main = 1i64.to_le_bytes().to_vec();
        main.extend_from_slice(&2u32.to_le_bytes()); // subxacts
        main.extend_from_slice(&count.to_le_bytes());
        main.extend_from_slice(&[0; 8]);
        with_main_data(&main)
    };
    let mut block_7 = heap_delete(rel(1), 0, 0);
    block_7[0] = 7;
    let short_delete = block_record(rel(1), 0, 0, &[0; 5]);
    let cases: Vec<(&str, u8, u8, Vec<u8>)> = vec![
        ("negative subxact count", 1, 0x80, bad_count(-1)),
        ("huge subxact count", 1, 0x80, bad_count(i32::MAX)),
        ("count past the end", 1, 0x80, bad_count(3)),
        ("delete without block 0", RM_HEAP, HEAP_DELETE, block_7),
        (
            "update with only main data",
            RM_HEAP,
            HEAP_UPDATE,
            with_main_data(&[0; 14]),
        ),
        (
            "delete with short main data",
            RM_HEAP,
            HEAP_DELETE,
            short_delete,
        ),
        ("short smgr create", RM_SMGR, 0x10, with_main_data(&[0; 10])),
        (
            "short smgr truncate",
            RM_SMGR,
            0x20,
            with_main_data(&[0; 16]),
        ),
        (
            "short database drop",
            RM_DBASE,
            0x20,
            with_main_data(&[0; 3]),
        ),
        (
            "short running xacts",
            RM_STANDBY,
            0x10,
            with_main_data(&[0; 18]),
        ),
        ("empty record", RM_HEAP, HEAP_DELETE, Vec::new()),
    ];
    for (what, rmid, info, payload) in cases {
        let mut w = WalWriter::new(Lsn(MIB));
        w.record(rmid, info, 42, &payload);
        for chunk in [1, 13, usize::MAX] {
            let chunk = chunk.min(w.out.len());
            let mut decoder = WalDecoder::new(geometry(), Lsn(MIB));
            let err = w
                .out
                .chunks(chunk)
                .find_map(|piece| decoder.feed(piece).err())
                .unwrap_or_else(|| panic!("{what}: decoded"));
            assert!(
                matches!(err, WalError::MalformedRecord { .. }),
                "{what}: {err}"
            );
        }
    }
}
