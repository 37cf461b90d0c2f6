//! Block-level incremental backups on PostgreSQL 17 and 18: with
//! `summarize_wal = on` the server sends only changed blocks, Strata
//! rebuilds whole files from them, and every backup of the chain restores
//! on its own to exactly the data it was taken from.

mod common;

use std::process::Command;

use common::Strata;
use testkit::Cluster;

/// Digest of every table the scenario touches (tables that do not exist
/// yet or any more read as absent).
fn digest(pg: &Cluster) -> String {
    let main = pg.psql(
        "postgres",
        "SELECT (SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM big), \
                (SELECT count(*) || ':' || sum(g) FROM shrink), \
                (SELECT count(*) || ':' || coalesce(sum(g), 0) FROM fresh), \
                to_regclass('gone') IS NULL, \
                (SELECT count(*) FROM big WHERE v LIKE 'changed%')",
    );
    let later = pg
        .try_psql("later", "SELECT string_agg(x, ',') FROM l")
        .unwrap_or_else(|_| "no database".into());
    format!("{main} / {later}")
}

fn show(strata: &Strata, id: &str, backup: &str) -> serde_json::Value {
    serde_json::from_str(&strata.ok(&["backup", "show", id, backup, "--json"])).unwrap()
}

fn restore(strata: &Strata, id: &str, backup: &str, major: u32) -> Cluster {
    let target = strata.dir.join(format!("restore-{backup}"));
    let port = testkit::free_port();
    strata.ok(&[
        "restore",
        id,
        "--backup",
        backup,
        "--immediate",
        "--target-dir",
        &target.display().to_string(),
        "--start",
        "--port",
        &port.to_string(),
    ]);
    Cluster::adopt(major, target, port)
}

fn chain(major: u32) {
    let pg = Cluster::builder(major)
        .conf("summarize_wal = on")
        .conf("autovacuum = off")
        .start();
    pg.psql(
        "postgres",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS v, repeat('p', 200) AS pad \
           FROM generate_series(1, 40000) g; \
                  CREATE INDEX big_v ON big (v); CREATE INDEX big_id ON big (id); \
         CREATE TABLE shrink AS SELECT g FROM generate_series(1, 20000) g; \
         CREATE TABLE fresh (g int); \
         CREATE TABLE gone AS SELECT 1 AS one; \
         VACUUM (FREEZE, ANALYZE); CHECKPOINT",
    );
    let id = format!("inc{major}");
    let strata = Strata::new(&id);
    strata.add_instance(&id, &pg);

    let first = strata.backup(&id);
    let s1 = show(&strata, &id, &first);
    assert!(s1["incremental_from"].is_null(), "{s1}");
    assert!(
        s1["received_bytes"].as_u64().unwrap() >= s1["total_bytes"].as_u64().unwrap() / 2,
        "{s1}"
    );
    let d1 = digest(&pg);

    // About 1 % of `big` changed, `shrink` truncated by VACUUM, a table
    // dropped, one created, and a database created after the first backup.
    pg.psql(
        "postgres",
        "UPDATE big SET v = 'changed-' || id WHERE id BETWEEN 10000 AND 10400; \
         DELETE FROM shrink WHERE g > 3000; VACUUM shrink; \
         DROP TABLE gone; INSERT INTO fresh SELECT generate_series(1, 5000); \
         CREATE DATABASE later",
    );
    pg.psql(
        "later",
        "CREATE TABLE l AS SELECT 'made after the first backup' AS x",
    );
    pg.psql("postgres", "CHECKPOINT");
    let d2 = digest(&pg);
    assert_ne!(d1, d2);

    let second = strata.backup(&id);
    let s2 = show(&strata, &id, &second);
    assert_eq!(s2["incremental_from"], first.as_str(), "{s2}");
    let (received, total) = (
        s2["received_bytes"].as_u64().unwrap(),
        s2["total_bytes"].as_u64().unwrap(),
    );
    // The new database is sent whole (a few MB of catalogs); `big` alone
    // is larger than everything that changed.
    assert!(received * 3 < total, "received {received} of {total}: {s2}");
    assert!(s2["dedup_bytes"].as_u64().unwrap() > received, "{s2}");

    // A third backup is incremental to the second one (a chain), after
    // changes spread over `big` and a rewrite of `fresh`.
    pg.psql(
        "postgres",
        "UPDATE big SET v = 'changed-again' WHERE id % 500 = 0; \
         TRUNCATE fresh; INSERT INTO fresh SELECT generate_series(1, 100); CHECKPOINT",
    );
    let d3 = digest(&pg);
    let third = strata.backup(&id);
    let s3 = show(&strata, &id, &third);
    assert_eq!(s3["incremental_from"], second.as_str(), "{s3}");

    // Every backup restores to its own state, the incremental ones included.
    for (backup, expected) in [(&second, &d2), (&third, &d3), (&first, &d1)] {
        let restored = restore(&strata, &id, backup, major);
        assert_eq!(&digest(&restored), expected, "backup {backup}");
        // An index-only scan trusts the visibility map: a map page still
        // saying "all visible" for a heap page updated since the earlier
        // backup would count the old row versions too.
        let index_only = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
                          SET enable_indexscan = off;";
        let plan = restored.psql(
            "postgres",
            &format!("{index_only} EXPLAIN (COSTS OFF) SELECT count(*) FROM big WHERE id BETWEEN 9000 AND 11000"),
        );
        assert!(plan.contains("Index Only Scan"), "{plan}");
        assert_eq!(
            restored.psql(
                "postgres",
                &format!("{index_only} SELECT count(*) FROM big WHERE id BETWEEN 9000 AND 11000"),
            ),
            "2001",
            "backup {backup}"
        );
    }

    // The repository is consistent, and a backup's own check of the
    // server's manifest held for each of them.
    strata.ok(&["repo", "verify"]);

    if major == 18 {
        // The rewritten backup_manifest describes the rebuilt files: the
        // server's own checker accepts an unstarted restore of the chain's end.
        let target = strata.dir.join("unstarted");
        strata.ok(&[
            "restore",
            &id,
            "--backup",
            &third,
            "--immediate",
            "--target-dir",
            &target.display().to_string(),
        ]);
        let verify = testkit::workspace_root().join(".cache/pg/18-client/bin/pg_verifybackup");
        let out = Command::new(&verify)
            .args(["--no-parse-wal", "--quiet"])
            .args(["--ignore", "postgresql.auto.conf"])
            .args(["--ignore", "recovery.signal"])
            .args(["--ignore", "pg_wal"])
            .arg(&target)
            .output()
            .expect("run pg_verifybackup");
        assert!(
            out.status.success(),
            "pg_verifybackup: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn postgres_17_incremental_chain() {
    chain(17);
}

#[test]
fn postgres_18_incremental_chain() {
    chain(18);
}

/// With WAL summaries off the same sequence takes full transfers, and says
/// so in what it records.
#[test]
fn summaries_off_sends_everything() {
    let pg = Cluster::builder(17).start();
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g",
    );
    let strata = Strata::new("inc-off");
    strata.add_instance("off", &pg);
    strata.backup("off");
    pg.psql("postgres", "UPDATE t SET g = -g WHERE g < 100");
    let second = strata.backup("off");
    let s = show(&strata, "off", &second);
    assert!(s["incremental_from"].is_null(), "{s}");
    assert!(
        s["received_bytes"].as_u64().unwrap() >= s["total_bytes"].as_u64().unwrap() / 2,
        "{s}"
    );
}
