//! Fuzz targets for what the repository crate reads from storage that
//! someone else may have written: manifests (the sealed envelope and, with
//! the seal redone as anyone holding a plain repository's key can, the JSON
//! inside) and packs (header, blob headers, index, trailer; again also
//! re-sealed). Seeds: `fuzz-corpus/manifest/` (manifest payloads shaped as
//! Strata writes them, one with a tablespace and its link) and
//! `fuzz-corpus/pack/` (a pack written by `PackBuilder`). Property: no panic,
//! no allocation sized by a length field, and either a typed error or a
//! value that passes its own checks (`BackupManifest::validate`; every blob
//! of an accepted pack decodes to its length and hash).
//! Longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p strata-repo --test fuzz`.

use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use strata_repo::object::seal;
use strata_repo::pack::{decode_blob, verify_pack};
use strata_repo::{manifest_key, Hasher, Keys, LocalStorage, ObjectKind, RepoError, Repository};

/// The key the pack seeds were sealed with.
const PACK_KEY: [u8; 32] = [0x5a; 32];

/// A plain repository in a temporary directory, and its keys.
fn repository() -> (tempfile::TempDir, Repository, Keys) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let storage = Arc::new(LocalStorage::new(dir.path()).expect("local storage"));
    let repo = Repository::open_or_init(storage).expect("a repository");
    let mut key = [0u8; 32];
    let hex = &repo.config().hash_key;
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    (dir, repo, Keys::plain(key))
}

#[test]
fn fuzz_manifest() {
    let (dir, repo, keys) = repository();
    let key = manifest_key("fuzz", "b");
    let path = dir.path().join(&key);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    let read = |bytes: &[u8]| {
        std::fs::write(&path, bytes).expect("write");
        match repo.read_manifest("fuzz", "b") {
            Ok(m) => assert_eq!(
                m.validate(),
                Ok(()),
                "an accepted manifest fails its checks"
            ),
            Err(RepoError::Storage(e)) => panic!("storage failed: {e}"),
            Err(_) => {}
        }
    };
    // Each seed must be accepted as it is, or the corpus tests nothing.
    for seed in corpus("manifest") {
        let sealed = seal(
            &keys,
            ObjectKind::Manifest,
            &serde_json::json!({}),
            &seed,
            Some(3),
        )
        .expect("seal");
        std::fs::write(&path, &sealed).expect("write");
        let m = repo
            .read_manifest("fuzz", "b")
            .expect("a seed manifest is accepted");
        assert!(!m.files.is_empty());
    }
    fuzz("manifest", |payload| {
        // As a forger would: any JSON, correctly sealed.
        let sealed = seal(
            &keys,
            ObjectKind::Manifest,
            &serde_json::json!({}),
            payload,
            Some(1),
        )
        .expect("seal");
        read(&sealed);
        // And as damage: the same bytes read as a whole sealed object.
        read(payload);
    });
}

#[test]
fn fuzz_pack() {
    let keys = Keys::plain(PACK_KEY);
    let check = |bytes: &[u8]| {
        if let Ok(entries) = verify_pack(&keys, "packs/fuzz", bytes) {
            for e in entries {
                let start = e.offset as usize;
                let data = &bytes[start..start + e.stored_len as usize];
                let raw = decode_blob(&keys, "packs/fuzz", &e, data).expect("an accepted blob");
                assert_eq!(raw.len(), e.raw_len as usize);
            }
        }
    };
    // Each seed must be accepted as it is, or the corpus tests nothing.
    for seed in corpus("pack") {
        assert!(verify_pack(&keys, "packs/fuzz", &seed).is_ok());
    }
    fuzz("pack", |bytes| {
        check(bytes);
        // Re-sealed, as anyone with a plain repository's key could: the
        // parser behind the seal sees the mutation.
        if bytes.len() >= 32 {
            let mut forged = bytes[..bytes.len() - 32].to_vec();
            let seal = Hasher::new(PACK_KEY).hash(&forged);
            forged.extend_from_slice(&seal.0);
            check(&forged);
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
