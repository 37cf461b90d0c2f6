//! Fuzz target for the WAL record decoder, which reads bytes from the
//! repository and from the server's replication stream. Seeds: real
//! PostgreSQL 15 WAL pages in `fuzz-corpus/wal/` (a segment's first page;
//! two pages holding commits, an abort and a restore point; two holding row
//! deletes and updates in savepoints; two holding a `TRUNCATE`'s new files,
//! page image and commit). Property:
//! no panic, no allocation sized by a length field, the same result however
//! the bytes are chunked, and events only at positions inside what was fed.
//! Longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p pg-wal --test fuzz`.

use pg_wal::decode::{WalDecoder, WalEvent};
use pg_wal::{Lsn, WalError, WalGeometry};

fn decode(
    geometry: WalGeometry,
    start: Lsn,
    data: &[u8],
    chunk: usize,
) -> Result<Vec<WalEvent>, WalError> {
    let mut decoder = WalDecoder::new(geometry, start);
    let mut events = Vec::new();
    for piece in data.chunks(chunk) {
        events.extend(decoder.feed(piece)?);
    }
    Ok(events)
}

#[test]
fn fuzz_wal_decoder() {
    let geometry = WalGeometry::new(16 << 20).expect("16 MiB segments");
    let start_of = |data: &[u8]| {
        let addr = data
            .get(8..16)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(0)
            % (1 << 40);
        Lsn(addr - addr % 8192)
    };
    // The seeds must decode to commits, some reporting changes, or mutations explore only
    // errors.
    let (mut commits, mut with_changes) = (0, 0);
    for seed in corpus("wal") {
        let events = decode(geometry, start_of(&seed), &seed, usize::MAX).expect("a seed decodes");
        for event in events {
            if let WalEvent::Commit { changes, .. } = event {
                commits += 1;
                with_changes += usize::from(changes.is_some());
            }
        }
    }
    assert!(commits >= 2, "the seeds hold {commits} commits");
    assert!(
        with_changes >= 2,
        "the seeds hold {with_changes} commits with changes"
    );
    fuzz("wal", |data| {
        // Start where the first page says it is (xlp_pageaddr), page aligned
        // and kept far from the end of the LSN space, as a caller's would be.
        let start = start_of(data);
        let whole = decode(geometry, start, data, usize::MAX);
        let pieces = decode(geometry, start, data, 1000);
        match (&whole, &pieces) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "the result depends on the chunking"),
            (Err(_), Err(_)) => {}
            _ => panic!("the chunking changed the outcome: {whole:?} / {pieces:?}"),
        }
        // An event's end is MAXALIGNed: up to 7 bytes past the record's last byte.
        let end = Lsn((start.0 + data.len() as u64 + 7) & !7);
        for event in whole.unwrap_or_default() {
            let at = match event {
                WalEvent::Commit { end_lsn, .. }
                | WalEvent::Abort { end_lsn, .. }
                | WalEvent::RestorePoint { end_lsn, .. }
                | WalEvent::BackupEnd { end_lsn, .. } => end_lsn,
                WalEvent::Switch { lsn } => lsn,
            };
            assert!(
                at > start && at <= end,
                "event at {at} outside {start}..{end}"
            );
        }
    });
}

// ---- the shared mutation harness (testkit::fuzz) ----

#[global_allocator]
static ALLOCATOR: testkit::fuzz::CappedAlloc = testkit::fuzz::CappedAlloc;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    testkit::fuzz::corpus(env!("CARGO_MANIFEST_DIR"), name)
}

fn fuzz(name: &str, check: impl Fn(&[u8])) {
    testkit::fuzz::run(env!("CARGO_MANIFEST_DIR"), name, check)
}
