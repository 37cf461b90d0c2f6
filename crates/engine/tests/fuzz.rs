//! Fuzz target for Strata's reader of the server's `backup_manifest` JSON
//! (sent by the server at the end of BASE_BACKUP and checked against what
//! arrived). Seed: a real PostgreSQL 15 backup_manifest cut to six files,
//! its `Manifest-Checksum` recomputed, in `fuzz-corpus/server_manifest/`.
//! Each mutation is checked as it is and with its checksum redone (as a
//! server would send it), so the parser behind the checksum sees it.
//! Property: no panic, no allocation sized by a field; a typed error or Ok.
//! Longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p strata-engine --test fuzz`.

use std::collections::HashMap;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sha2::{Digest, Sha256};
use strata_engine::check_server_manifest;

/// What arrived for each file the seed lists: its size and CRC-32C.
fn received(seed: &[u8]) -> HashMap<String, (u64, u32)> {
    let doc: serde_json::Value = serde_json::from_slice(seed).expect("a JSON seed");
    doc["Files"]
        .as_array()
        .expect("a Files list")
        .iter()
        .map(|f| {
            let crc = hex::decode(f["Checksum"].as_str().expect("a checksum")).expect("hex");
            (
                f["Path"].as_str().expect("a path").to_string(),
                (
                    f["Size"].as_u64().expect("a size"),
                    u32::from_le_bytes(crc.try_into().expect("4 bytes")),
                ),
            )
        })
        .collect()
}

/// `bytes` with its last `Manifest-Checksum` line replaced by the right one.
fn rechecksummed(bytes: &[u8]) -> Vec<u8> {
    let marker = b"\"Manifest-Checksum\"";
    let cut = bytes
        .windows(marker.len())
        .rposition(|w| w == marker)
        .unwrap_or(bytes.len());
    let mut out = bytes[..cut].to_vec();
    if out.last() != Some(&b'\n') {
        out.push(b'\n');
    }
    let sum = hex::encode(Sha256::digest(&out));
    out.extend_from_slice(format!("\"Manifest-Checksum\": \"{sum}\"}}\n").as_bytes());
    out
}

#[test]
fn fuzz_server_manifest() {
    let seeds = corpus("server_manifest");
    let received = received(&seeds[0]);
    for seed in &seeds {
        check_server_manifest(seed, &received).expect("the seed matches what arrived");
    }
    fuzz("server_manifest", |bytes| {
        let _ = check_server_manifest(bytes, &received);
        let _ = check_server_manifest(&rechecksummed(bytes), &received);
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
