//! Decode throughput on real WAL from a pgbench run (ignored by default: it measures, it does
//! not check). Run in release mode:
//!
//! ```text
//! STRATA_BENCH_WAL_DIR=/tmp/strata-bench-wal \
//!   cargo test --release -p pg-wal --test decode_throughput -- --ignored --nocapture
//! ```
//!
//! The segments are kept in `STRATA_BENCH_WAL_DIR` (filled from a PostgreSQL 15 pgbench run when
//! empty), so two builds of the decoder can be compared on the same bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pg_wal::decode::{WalDecoder, WalEvent};
use pg_wal::{Lsn, WalGeometry};

fn segments(dir: &Path, geometry: WalGeometry) -> Vec<(Lsn, PathBuf)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("list WAL directory")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let (_, seg) = geometry.parse_segment_file_name(path.file_name()?.to_str()?)?;
            Some((geometry.segment_start(seg), path))
        })
        .collect();
    files.sort();
    files
}

/// Runs pgbench on a fresh cluster and copies the segments its run (not its load) wrote.
fn generate(dir: &Path, geometry: WalGeometry) {
    let cluster = testkit::Cluster::builder(15)
        .conf("max_wal_size = 1GB")
        .start();
    cluster.pgbench("postgres", &["-i", "-q", "-s", "5"]);
    cluster.psql("postgres", "CHECKPOINT");
    let first: Lsn = cluster
        .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .expect("lsn");
    cluster.pgbench("postgres", &["-c", "4", "-j", "2", "-T", "40"]);
    let last: Lsn = cluster
        .psql("postgres", "SELECT pg_switch_wal()")
        .parse()
        .expect("lsn");
    let (first, last) = (geometry.segment_of(first), geometry.segment_of(last));
    std::fs::create_dir_all(dir).expect("create WAL directory");
    for (start, path) in segments(&cluster.data_dir().join("pg_wal"), geometry) {
        let seg = geometry.segment_of(start);
        if seg >= first && seg <= last {
            std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
        }
    }
}

#[test]
#[ignore = "measures decode throughput; run in release mode with --ignored --nocapture"]
fn decode_throughput_on_pgbench_wal() {
    let geometry = WalGeometry::DEFAULT;
    let dir = PathBuf::from(
        std::env::var("STRATA_BENCH_WAL_DIR").unwrap_or_else(|_| "/tmp/strata-bench-wal".into()),
    );
    if !dir.exists() || segments(&dir, geometry).is_empty() {
        generate(&dir, geometry);
    }
    let files: Vec<(Lsn, Vec<u8>)> = segments(&dir, geometry)
        .into_iter()
        .map(|(start, path)| (start, std::fs::read(path).expect("read segment")))
        .collect();
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    // As the replication stream delivers it: at most 128 KiB per message.
    let chunk_size = std::env::var("STRATA_BENCH_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128 * 1024);
    let mut best = f64::MAX;
    let mut commits = 0;
    for _ in 0..10 {
        let began = Instant::now();
        commits = 0;
        let mut decoder = WalDecoder::new(geometry, files[0].0);
        for (_, segment) in &files {
            for chunk in segment.chunks(chunk_size) {
                let events = decoder.feed(chunk).expect("decode");
                commits += events
                    .iter()
                    .filter(|e| matches!(e, WalEvent::Commit { .. }))
                    .count();
            }
        }
        best = best.min(began.elapsed().as_secs_f64());
    }
    println!(
        "decoded {} segments ({:.0} MB, {commits} commits): {:.0} MB/s (best of 10)",
        files.len(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / best
    );
    assert!(commits > 0);
}
