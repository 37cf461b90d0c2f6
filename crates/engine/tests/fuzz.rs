//! Fuzz target for Strata's reader of the server's `backup_manifest` JSON
//! (sent by the server at the end of BASE_BACKUP and checked against what
//! arrived). Seed: a real PostgreSQL 15 backup_manifest cut to six files,
//! its `Manifest-Checksum` recomputed, in `fuzz-corpus/server_manifest/`.
//! Each mutation is checked as it is and with its checksum redone (as a
//! server would send it), so the parser behind the checksum sees it.
//! Property: no panic, no allocation sized by a field; a typed error or Ok.
//! Longer run: `STRATA_FUZZ_CASES=1000000 cargo test -p strata-engine --test fuzz`.

use std::collections::HashMap;

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

// ---- the shared mutation harness (testkit::fuzz) ----

#[global_allocator]
static ALLOCATOR: testkit::fuzz::CappedAlloc = testkit::fuzz::CappedAlloc;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    testkit::fuzz::corpus(env!("CARGO_MANIFEST_DIR"), name)
}

fn fuzz(name: &str, check: impl Fn(&[u8])) {
    testkit::fuzz::run(env!("CARGO_MANIFEST_DIR"), name, check)
}
