//! The mutation harness of the fuzz targets (each parser's crate has a
//! `tests/fuzz.rs`): a seed corpus, mutations of it (bit flips, bytes set,
//! cuts, splices of other seeds, insertions) and now and then random bytes,
//! run through proptest on stable Rust, so a failure is shrunk and printed.
//! [`CappedAlloc`] makes a single allocation above 256 MiB fail, so a parser
//! that sizes a buffer from a length field it did not check is caught; a
//! target installs it with `#[global_allocator]`.

use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Any single allocation above this is a length field taken at its word.
const MAX_ALLOCATION: usize = 256 << 20;

/// Refuses single allocations above 256 MiB (the process aborts
/// and the test fails), so a parser that trusts a length field is caught.
pub struct CappedAlloc;

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

/// Mutation runs per target: `STRATA_FUZZ_CASES` (default 512).
fn cases() -> u32 {
    std::env::var("STRATA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

/// Every file of `<crate_dir>/fuzz-corpus/<name>/`, sorted by name.
pub fn corpus(crate_dir: &str, name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(crate_dir).join("fuzz-corpus").join(name);
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

/// Feeds `check` every seed, then `STRATA_FUZZ_CASES` (default 512) inputs: mutated seeds, and now
/// and then bytes that are random throughout. `check` panics when the
/// property fails; proptest then shrinks the input and reports it.
pub fn run(crate_dir: &str, name: &str, check: impl Fn(&[u8])) {
    let seeds = corpus(crate_dir, name);
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
