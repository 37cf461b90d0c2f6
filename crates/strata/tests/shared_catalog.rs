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
            w["end_lsn"]
                .as_str()
                .unwrap()
                .parse::<pg_wal::Lsn>()
                .unwrap()
                >= end
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

/// GETs `url` with curl into `to`; returns the HTTP status.
fn curl(url: &str, to: &Path) -> u16 {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o"])
        .arg(to)
        .args(["-w", "%{http_code}", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_download_link_signed_by_one_node_downloads_from_another() {
    let pg = Cluster::start_default(15);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 20000) g",
    );
    let url = testkit::catalog_database("link_nodes");
    let repo = testkit::temp_dir("strata-shared-repo-");
    // An encrypted repository: the link key is sealed in the catalog.
    let key_file = repo.with_extension("key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
    let encryption = format!(
        "[encryption]\nkey_file = {:?}\n",
        key_file.display().to_string()
    );
    let node_a = Strata::with_config("link-node-a", &shared(&url, &repo), &encryption);
    let node_b = Strata::with_config("link-node-b", &shared(&url, &repo), &encryption);
    let id = "fleet-link";
    node_a.add_instance(id, &pg);
    let backup = node_a.backup(id);
    let pair: serde_json::Value =
        serde_json::from_str(&node_a.ok(&["key", "create", "--json"])).unwrap();
    let key = (
        pair["AccessKeyId"].as_str().unwrap().to_string(),
        pair["AccessKeySecret"].as_str().unwrap().to_string(),
    );
    let server_a = Server::start(&node_a, &[]);
    let server_b = Server::start(&node_b, &[]);

    // Node A lists the set and signs its link.
    let query = acs_signature::sign_v2(
        "POST",
        &[
            ("Version", "2014-08-15"),
            ("Format", "JSON"),
            ("Action", "DescribeBackups"),
            ("DBInstanceId", id),
        ],
        &key.0,
        &key.1,
        chrono::Utc::now(),
        &format!("{:032x}", rand::random::<u128>()),
    );
    let (status, _, body) = http_request(server_a.port, "POST", &format!("/?{query}"), &[], b"");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let item = &listed["Items"]["Backup"][0];
    assert_eq!(item["BackupId"].as_str(), Some(backup.as_str()));
    let link = item["BackupDownloadURL"].as_str().unwrap();
    let prefix = format!("http://127.0.0.1:{}", server_a.port);
    let path = link.strip_prefix(&prefix).expect("a link to node A");

    // Node B serves it, byte for byte what node A serves.
    let dir = testkit::temp_dir("strata-link-download-");
    let (from_a, from_b) = (dir.join("a.tar"), dir.join("b.tar"));
    assert_eq!(curl(link, &from_a), 200);
    let on_b = format!("http://127.0.0.1:{}{path}", server_b.port);
    assert_eq!(
        curl(&on_b, &from_b),
        200,
        "{}",
        std::fs::read_to_string(&from_b).unwrap_or_default()
    );
    let (a, b) = (
        std::fs::read(&from_a).unwrap(),
        std::fs::read(&from_b).unwrap(),
    );
    assert!(a.len() > 100_000);
    assert!(a == b, "node B served other bytes than node A");
    let listing = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&from_b)
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(names.lines().any(|n| n == "base.tar"), "{names}");
    assert!(names.lines().any(|n| n == "backup_manifest"), "{names}");

    // An altered link is refused there too.
    let forged = on_b.replace("Signature=", "Signature=00");
    assert_eq!(curl(&forged, &dir.join("forged")), 403);

    // The key is stored sealed, never in the clear.
    let catalog_server = testkit::catalog_server();
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let stored = catalog_server.psql(
        db,
        "SELECT value FROM shared_secrets WHERE name = 'download-link-key'",
    );
    assert!(stored.starts_with("sealed:"), "{stored}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_file(&key_file);
}
