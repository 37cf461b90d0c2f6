//! `strata serve` on a PostgreSQL catalog whose server goes away for a few
//! seconds and comes back while the source writes WAL and a backup runs:
//! the service and the backup wait the outage out and carry on. The catalog server here is a cluster of
//! this test's own, so stopping it disturbs no other test.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use pg_wal::Lsn;
use testkit::Cluster;

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

/// Writes a little and switches to a new WAL segment, `n` times.
fn write_segments(pg: &Cluster, n: usize, tag: &str) {
    for i in 0..n {
        pg.psql(
            "postgres",
            &format!("INSERT INTO ledger (note) VALUES ('{tag}-{i}'); SELECT pg_switch_wal()"),
        );
    }
}

#[test]
fn a_catalog_server_restart_is_waited_out_without_gaps_or_duplicates() {
    let mut catalog = Cluster::builder(15)
        .wal_level("minimal")
        .conf("max_connections = 100")
        .start();
    catalog.psql("postgres", "CREATE DATABASE cat");
    let url = format!(
        "postgres://postgres@{}:{}/cat?sslmode=disable",
        catalog.host(),
        catalog.port()
    );
    let pg = Cluster::start_default(15);
    pg.psql(
        "postgres",
        "CREATE TABLE ledger (id serial PRIMARY KEY, note text)",
    );
    // Enough data that a throttled backup is still running during the outage.
    pg.pgbench("postgres", &["-i", "-q", "-s", "5"]);
    let strata = Strata::with_config(
        "outage",
        &format!("catalog = {url:?}\n"),
        "[scheduler]\ntick_secs = 1\n",
    );
    let id = "outage";
    strata.add_instance(id, &pg);
    let server = Server::start(&strata, &[]);
    // The first automatic backup and log backup (on by default).
    wait_for("the first backup", 120, || {
        strata
            .backups(id)
            .iter()
            .any(|b| b["status"].as_str() == Some("Success"))
    });
    write_segments(&pg, 2, "before");
    wait_for("WAL archived", 60, || !strata.wal(id).is_empty());

    // A backup (about 75 MB read at 8 MB/s) is running...
    let running_backup = strata
        .command(&["backup", "create", id, "--max-rate", "8192"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the second backup to run", 60, || {
        strata
            .backups(id)
            .iter()
            .any(|b| b["status"].as_str() == Some("Running"))
    });
    // ...when the catalog server goes away while WAL is written, then
    // comes back.
    catalog.stop();
    write_segments(&pg, 3, "during");
    std::thread::sleep(Duration::from_secs(4));
    write_segments(&pg, 2, "during-late");
    catalog.start();
    write_segments(&pg, 2, "after");

    // The backup waited the outage out and succeeded.
    let out = running_backup.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the backup running through the outage failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let through = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();

    // Everything written is archived by the same service.
    let end: Lsn = pg
        .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    wait_for("WAL archived past the outage", 180, || {
        strata.wal(id).iter().any(|w| lsn(&w["end_lsn"]) >= end)
    });
    let wal = strata.wal(id);
    let complete: Vec<&serde_json::Value> = wal
        .iter()
        .filter(|w| w["partial"] == serde_json::Value::Bool(false))
        .collect();
    // One row per segment and kind: nothing recorded twice.
    let keys: BTreeSet<String> = wal
        .iter()
        .map(|w| format!("{}/{}/{}", w["timeline"], w["segment"], w["partial"]))
        .collect();
    assert_eq!(keys.len(), wal.len(), "duplicate WAL rows: {wal:#?}");
    // Contiguous: each complete segment starts where the one before ended.
    for pair in complete.windows(2) {
        assert_eq!(
            lsn(&pair[0]["end_lsn"]),
            lsn(&pair[1]["begin_lsn"]),
            "a hole in the WAL between {} and {}",
            pair[0]["segment"],
            pair[1]["segment"]
        );
    }
    assert!(complete.len() >= 9, "{} complete segments", complete.len());

    // A backup after the restart succeeds, and the service still archives.
    let after = strata.backup(id);
    let sets = strata.backups(id);
    for id in [&through, &after] {
        let set = sets.iter().find(|b| b["id"].as_str() == Some(id)).unwrap();
        assert_eq!(set["status"].as_str(), Some("Success"), "{set}");
    }
    write_segments(&pg, 1, "last");
    let end: Lsn = pg
        .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    wait_for("WAL archived after the backup", 60, || {
        strata.wal(id).iter().any(|w| lsn(&w["end_lsn"]) >= end)
    });
    let (stopped_cleanly, _, err) = server.stop();
    assert!(stopped_cleanly, "{err}");
}
