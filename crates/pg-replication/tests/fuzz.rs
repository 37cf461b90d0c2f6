//! Fuzz target for the reader of BASE_BACKUP's tar streams (the bytes a
//! server sends). Seeds: real PostgreSQL 15 `base.tar` members in
//! `fuzz-corpus/tar/`. Property: no panic, no allocation sized by a header,
//! the same events however the bytes are chunked, and on success a
//! consistent stream: non-empty names, each file followed by exactly its
//! size in data, no data chunk above 1 MiB.
//! Longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p pg-replication --test fuzz`.

use std::collections::VecDeque;

use bytes::Bytes;
use pg_replication::{BaseBackupEvent, ReplicationError, TarEntryKind, TarReader};

fn parse(data: &[u8], chunk: usize) -> Result<Vec<BaseBackupEvent>, ReplicationError> {
    let mut reader = TarReader::new();
    let mut events = VecDeque::new();
    for piece in data.chunks(chunk) {
        reader.feed(Bytes::copy_from_slice(piece), &mut events)?;
    }
    reader.finish()?;
    Ok(events.into())
}

/// Data bytes per entry, so chunkings can be compared (data events split
/// wherever the input was split).
fn shape(events: &[BaseBackupEvent]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for e in events {
        match e {
            BaseBackupEvent::Entry(t) => out.push((format!("{t:?}"), 0)),
            BaseBackupEvent::Data(d) => {
                assert!(d.len() <= 1 << 20, "a data chunk of {} bytes", d.len());
                let last = out.last_mut().expect("data before any entry");
                last.1 += d.len() as u64;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    out
}

#[test]
fn fuzz_tar_stream() {
    // The seeds must parse, or mutations explore only errors.
    for seed in corpus("tar") {
        let events = parse(&seed, usize::MAX).expect("a seed parses");
        assert!(events.len() >= 2);
    }
    fuzz("tar", |data| {
        let whole = parse(data, usize::MAX);
        let pieces = parse(data, 7);
        match (&whole, &pieces) {
            (Ok(a), Ok(b)) => assert_eq!(shape(a), shape(b), "the result depends on the chunking"),
            (Err(_), Err(_)) => {}
            _ => panic!("the chunking changed the outcome: {whole:?} / {pieces:?}"),
        }
        let Ok(events) = whole else { return };
        let mut expected: Option<u64> = None;
        for e in &events {
            match e {
                BaseBackupEvent::Entry(t) => {
                    assert!(!t.path.is_empty() && !t.path.contains('\0'), "{t:?}");
                    if t.kind != TarEntryKind::File {
                        assert_eq!(t.size, 0, "{t:?}");
                    }
                    assert!(expected.unwrap_or(0) == 0, "a file cut short before {t:?}");
                    expected = Some(t.size);
                }
                BaseBackupEvent::Data(d) => {
                    let left = expected.as_mut().expect("data outside a file");
                    *left = left
                        .checked_sub(d.len() as u64)
                        .expect("more data than the size");
                }
                _ => {}
            }
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
