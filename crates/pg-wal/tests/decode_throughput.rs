//! The decoder's three change-tracking modes on real WAL from a pgbench run: tracking off
//! reports nothing, every row change reports (nearly) every commit, the recovery events'
//! threshold leaves pgbench's three-row transactions out. Each mode's throughput is printed.
//!
//! In the suite the WAL comes from a few seconds of pgbench, decoded once per mode. As a
//! benchmark, in release mode, on a larger run kept between builds and the best of ten:
//!
//! ```text
//! STRATA_BENCH_WAL_DIR=/tmp/strata-bench-wal STRATA_BENCH_REPEAT=10 \
//!   cargo test --release -p pg-wal --test decode_throughput -- --nocapture
//! ```
//!
//! `STRATA_BENCH_WAL_DIR` is filled from a 40 s PostgreSQL 15 pgbench run (scale 5, 4 clients)
//! when empty, so two builds of the decoder can be compared on the same bytes.

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

/// Runs pgbench (scale 5, 4 clients, `secs` seconds) on a fresh cluster and copies the
/// segments its run (not its load) wrote.
fn generate(dir: &Path, geometry: WalGeometry, secs: u32) {
    let cluster = testkit::Cluster::builder(15)
        .conf("max_wal_size = 1GB")
        .start();
    cluster.pgbench("postgres", &["-i", "-q", "-s", "5"]);
    cluster.psql("postgres", "CHECKPOINT");
    let first: Lsn = cluster
        .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .expect("lsn");
    let secs = secs.to_string();
    cluster.pgbench("postgres", &["-c", "4", "-j", "2", "-T", &secs]);
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
fn tracking_modes_on_pgbench_wal() {
    let geometry = WalGeometry::DEFAULT;
    let kept = std::env::var_os("STRATA_BENCH_WAL_DIR").map(PathBuf::from);
    let scratch = tempfile::tempdir().expect("scratch directory");
    let dir = kept.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    if !dir.exists() || segments(&dir, geometry).is_empty() {
        generate(&dir, geometry, if kept.is_some() { 40 } else { 3 });
    }
    let repeat: usize = std::env::var("STRATA_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
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
    // Change tracking off (what a restore needs), with the recovery events' default
    // threshold (what a WAL receiver does), and every row change reported.
    let mut counts = Vec::new();
    for (label, report) in [
        ("tracking off", None),
        ("rows >= 1000", Some(1000)),
        ("every row", Some(0)),
    ] {
        let mut best = f64::MAX;
        let (mut commits, mut reports) = (0usize, 0usize);
        for _ in 0..repeat {
            let began = Instant::now();
            (commits, reports) = (0, 0);
            let mut decoder = WalDecoder::new(geometry, files[0].0).report_changes(report);
            for (_, segment) in &files {
                for chunk in segment.chunks(chunk_size) {
                    for event in decoder.feed(chunk).expect("decode") {
                        if let WalEvent::Commit { changes, .. } = event {
                            commits += 1;
                            reports += usize::from(changes.is_some());
                        }
                    }
                }
            }
            best = best.min(began.elapsed().as_secs_f64());
        }
        println!(
            "{label}: decoded {} segments ({:.0} MB, {commits} commits, {reports} with changes): {:.0} MB/s (best of {repeat})",
            files.len(),
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / best
        );
        counts.push((commits, reports));
    }
    let [(off_commits, off), (threshold_commits, threshold), (every_commits, every)] = counts[..]
    else {
        unreachable!("three modes")
    };
    // The same commits whatever is tracked.
    assert!(off_commits > 100, "{counts:?}");
    assert_eq!(
        (threshold_commits, every_commits),
        (off_commits, off_commits)
    );
    assert_eq!(off, 0, "tracking off reports nothing");
    // pgbench's transactions each update three rows: all reported, none above the threshold
    // (a catalog change of the cluster may be).
    assert!(every * 10 >= off_commits * 9, "{counts:?}");
    assert!(threshold * 100 <= off_commits, "{counts:?}");
}
