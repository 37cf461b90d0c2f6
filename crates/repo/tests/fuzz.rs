//! Fuzz targets for what the repository crate reads from storage that
//! someone else may have written: manifests (the sealed envelope and, with
//! the seal redone as anyone holding a plain repository's key can, the JSON
//! inside) and packs (header, blob headers, index, trailer; again also
//! re-sealed). Seeds: `fuzz-corpus/manifest/` (manifest payloads shaped as
//! Strata writes them, one with a tablespace and its link, one with the
//! databases and tables of its set) and
//! `fuzz-corpus/pack/` (a pack written by `PackBuilder`). Property: no panic,
//! no allocation sized by a length field, and either a typed error or a
//! value that passes its own checks (`BackupManifest::validate`; every blob
//! of an accepted pack decodes to its length and hash).
//! Longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p strata-repo --test fuzz`.

use std::sync::Arc;

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
        // The reader of the contents alone never panics, and agrees with
        // the whole manifest's reader whenever both accept (it parses the
        // bytes directly, so it refuses duplicate keys the other's JSON
        // tree lets the last one win).
        let contents = repo.read_contents("fuzz", "b");
        match repo.read_manifest("fuzz", "b") {
            Ok(m) => {
                assert_eq!(
                    m.validate(),
                    Ok(()),
                    "an accepted manifest fails its checks"
                );
                if let Ok(c) = contents {
                    assert_eq!(c, m.contents, "the two readers disagree");
                }
            }
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

// ---- the shared mutation harness (testkit::fuzz) ----

#[global_allocator]
static ALLOCATOR: testkit::fuzz::CappedAlloc = testkit::fuzz::CappedAlloc;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    testkit::fuzz::corpus(env!("CARGO_MANIFEST_DIR"), name)
}

fn fuzz(name: &str, check: impl Fn(&[u8])) {
    testkit::fuzz::run(env!("CARGO_MANIFEST_DIR"), name, check)
}
