//! Several Strata nodes on one PostgreSQL catalog and one repository, as
//! separate `strata` processes with data directories of their own (so no
//! host-local lock file is shared): garbage collection on one node while
//! another backs up and a third restores, and a download link signed by one
//! node served by another.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use testkit::Cluster;

/// The configuration every node shares: the catalog and the repository.
fn shared(url: &str, repo: &Path) -> String {
    format!(
        "catalog = {url:?}\nrepository = {:?}\n",
        repo.display().to_string()
    )
}

/// Waits until the archive holds WAL up to the source's current insert LSN.
fn wait_archived(strata: &Strata, id: &str, pg: &Cluster) {
    let end: pg_wal::Lsn = pg
        .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    wait_for("WAL archived", 60, || {
        strata.wal(id).iter().any(|w| {
            w["end_lsn"].as_str().unwrap().parse::<pg_wal::Lsn>().unwrap() >= end
        })
    });
}

#[test]
fn gc_on_one_node_spares_a_backup_and_a_restore_on_two_others_and_deletes_garbage() {
    let pg = Cluster::start_default(15);
    pg.pgbench("postgres", &["-i", "-q", "-s", "3"]);
    pg.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); INSERT INTO ledger VALUES (1, 'first')",
    );
    let url = testkit::catalog_database("gc_nodes");
    let repo = testkit::temp_dir("strata-shared-repo-");
    // The collector keeps no grace period: only the hold protects packs.
    let gc_node = Strata::with_config("gc-node", &shared(&url, &repo), "[gc]\ngrace_secs = 0\n");
    let backup_node = Strata::with_config("backup-node", &shared(&url, &repo), "");
    let restore_node = Strata::with_config("restore-node", &shared(&url, &repo), "");
    let id = "fleet-gc";
    backup_node.add_instance(id, &pg);
    let mut receiver = backup_node.wal_receiver(id);
    let first = backup_node.backup(id);
    let first_state = state_digest(&pg, "postgres");
    wait_archived(&backup_node, id, &pg);

    // An orphan pack, as a backup that crashed before its manifest leaves.
    let packs = files_under(&repo.join("packs"));
    let orphan_id = "ff".repeat(16);
    let orphan = repo.join("packs/ff").join(format!("{orphan_id}.pack"));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::copy(&packs[0], &orphan).unwrap();

    // New data, so the second backup writes packs of its own for a while
    // (each unreferenced until its manifest is committed).
    pg.pgbench("postgres", &["-t", "300", "-c", "2"]);
    pg.psql(
        "postgres",
        "CREATE TABLE bulk AS SELECT g, md5(random()::text) || md5(random()::text) AS m \
         FROM generate_series(1, 500000) g",
    );
    pg.psql("postgres", "INSERT INTO ledger VALUES (2, 'second')");

    // Node A collects over and over while B backs up and C restores.
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (stop, config) = (stop.clone(), gc_node.config.clone());
        std::thread::spawn(move || {
            let mut reports = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
                    .arg("--config")
                    .arg(&config)
                    .args(["repo", "gc", "--json"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "repo gc failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                reports.push(report);
            }
            reports
        })
    };
    let restored_first = std::thread::scope(|s| {
        let restore = s.spawn(|| {
            restore_node.restore_and_start(id, "first", 15, &["--backup", &first, "--immediate"])
        });
        let second = backup_node.backup(id);
        (restore.join().unwrap(), second)
    });
    let (restored_first, second) = restored_first;
    stop.store(true, Ordering::SeqCst);
    let mut reports = collector.join().unwrap();
    let second_state = state_digest(&pg, "postgres");
    wait_archived(&backup_node, id, &pg);
    receiver.stop();

    // The restore read every block it needed while collections ran.
    assert_eq!(state_digest(&restored_first, "postgres"), first_state);
    drop(restored_first);

    // Once nobody holds the repository the orphan goes, and only it.
    let report: serde_json::Value =
        serde_json::from_str(&gc_node.ok(&["repo", "gc", "--json"])).unwrap();
    reports.push(report);
    assert!(!orphan.exists(), "the orphan pack was not collected");
    let deleted: u64 = reports
        .iter()
        .filter_map(|r| r["packs_deleted"].as_u64())
        .sum();
    assert_eq!(deleted, 1, "only the orphan was garbage: {reports:?}");
    let verify: serde_json::Value =
        serde_json::from_str(&restore_node.ok(&["repo", "verify", "--json"])).unwrap();
    assert!(
        verify["problems"].as_array().unwrap().is_empty(),
        "{verify}"
    );
    assert!(
        verify["unreferenced_packs"].as_array().unwrap().is_empty(),
        "{verify}"
    );

    // The backup taken during the collections restores to its data.
    let restored_second =
        gc_node.restore_and_start(id, "second", 15, &["--backup", &second, "--immediate"]);
    assert_eq!(state_digest(&restored_second, "postgres"), second_state);
    let _ = std::fs::remove_dir_all(&repo);
}
