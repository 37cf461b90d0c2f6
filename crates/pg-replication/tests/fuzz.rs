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
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

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

// ---- mutation harness (the same in every crate's tests/fuzz.rs) ----

/// Any single allocation above this is a length field taken at its word.
const MAX_ALLOCATION: usize = 256 << 20;

/// Refuses single allocations above [`MAX_ALLOCATION`] (the process aborts
/// and the test fails), so a parser that trusts a length field is caught.
struct CappedAlloc;

// SAFETY: every call is forwarded to the system allocator unchanged, except
// that too large a request returns null, which callers must handle anyway.
unsafe impl std::alloc::GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if new > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAlloc = CappedAlloc;

/// Mutation runs per target: `STRATA_FUZZ_CASES` (default 512).
fn cases() -> u32 {
    std::env::var("STRATA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// Every file of `fuzz-corpus/<name>/`, sorted by name.
fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(name);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        byte: u8,
    },
    Truncate {
        at: usize,
    },
    /// Copies a slice of another seed over this one.
    Splice {
        seed: usize,
        from: usize,
        to: usize,
        len: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetByte { at, byte }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..512)
            .prop_map(|(seed, from, to, len)| Mutation::Splice { seed, from, to, len }),
        1 => (any::<usize>(), vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
    ]
}

fn mutate(seeds: &[Vec<u8>], seed: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut data = seeds[seed % seeds.len()].clone();
    for m in mutations {
        let len = data.len().max(1);
        match m {
            Mutation::FlipBit { at, bit } => {
                if let Some(b) = data.get_mut(at % len) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::SetByte { at, byte } => {
                if let Some(b) = data.get_mut(at % len) {
                    *b = *byte;
                }
            }
            Mutation::Truncate { at } => data.truncate(at % len),
            Mutation::Splice {
                seed,
                from,
                to,
                len: n,
            } => {
                let other = &seeds[seed % seeds.len()];
                if other.is_empty() || data.is_empty() {
                    continue;
                }
                let from = from % other.len();
                let to = to % data.len();
                let n = (*n).min(other.len() - from).min(data.len() - to);
                data[to..to + n].copy_from_slice(&other[from..from + n]);
            }
            Mutation::Insert { at, bytes } => {
                let at = at % (data.len() + 1);
                data.splice(at..at, bytes.iter().copied());
            }
        }
    }
    data
}

/// Feeds `check` every seed, then [`cases`] inputs: mutated seeds, and now
/// and then bytes that are random throughout. `check` panics when the
/// property fails; proptest then shrinks the input and reports it.
fn fuzz(name: &str, check: impl Fn(&[u8])) {
    let seeds = corpus(name);
    for seed in &seeds {
        check(seed);
    }
    let input = prop_oneof![
        9 => (any::<usize>(), vec(mutation(), 1..8)).prop_map({
            let seeds = seeds.clone();
            move |(seed, m)| mutate(&seeds, seed, &m)
        }),
        1 => vec(any::<u8>(), 0..4096),
    ];
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new(config)
        .run(&input, |data| {
            check(&data);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("fuzz target {name}: {e}"));
}
