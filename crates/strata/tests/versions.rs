//! Backup and restore round trip on PostgreSQL 14, 16, 17 and 18 (server
//! binaries installed by scripts/install-test-deps.sh).

mod common;

use common::Strata;
use testkit::Cluster;

fn round_trip(major: u32) {
    // Compressed full-page images exercise the version-specific block
    // header layout of the WAL decoder.
    let pg = Cluster::builder(major).conf("wal_compression = on").start();
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g; \
         CREATE INDEX t_v ON t (v); CREATE DATABASE second",
    );
    pg.psql("second", "CREATE TABLE s AS SELECT 'in second' AS x");
    let strata = Strata::new(&format!("pg{major}"));
    let id = format!("pg{major}");
    strata.add_instance(&id, &pg);
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&strata.ok(&["instance", "list", "--json"])).unwrap();
    assert_eq!(
        list[0]["pg_version_num"].as_u64().unwrap() / 10000,
        major as u64
    );
    strata.backup(&id);
    // Committed after the backup: reaches the restore through archived WAL.
    let mut receiver = strata.wal_receiver(&id);
    pg.psql(
        "postgres",
        "CHECKPOINT; UPDATE t SET v = md5(v) WHERE id % 7 = 0; INSERT INTO t VALUES (0, 'after backup')",
    );
    let end = pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    common::wait_for("WAL archived", 60, || {
        strata.wal(&id).iter().any(|w| {
            let e: pg_wal::Lsn = w["end_lsn"].as_str().unwrap().parse().unwrap();
            e >= end.parse().unwrap()
        })
    });
    receiver.stop();
    // Commit records of this version's WAL were decoded.
    assert!(
        strata
            .wal(&id)
            .iter()
            .any(|w| w["commit_count"].as_u64().unwrap() > 0 && !w["last_commit"].is_null()),
        "no commit decoded from PostgreSQL {major} WAL"
    );
    let expected = pg.psql(
        "postgres",
        "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t",
    );
    let restored = strata.restore_and_start(&id, "latest", major, &[]);
    assert_eq!(
        restored.psql(
            "postgres",
            "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t"
        ),
        expected
    );
    assert_eq!(restored.psql("second", "SELECT x FROM s"), "in second");
    assert!(restored
        .psql("postgres", "SELECT version()")
        .contains(&format!("PostgreSQL {major}.")));
}

/// PostgreSQL 14 speaks the older BASE_BACKUP form (one COPY stream per
/// tablespace, then the manifest) and has no READ_REPLICATION_SLOT.
#[test]
fn postgres_14_round_trip() {
    round_trip(14);
}

#[test]
fn postgres_16_round_trip() {
    round_trip(16);
}

#[test]
fn postgres_17_round_trip() {
    round_trip(17);
}

#[test]
fn postgres_18_round_trip() {
    round_trip(18);
}

#[test]
fn tablespace_round_trip() {
    let pg = testkit::shared_cluster(15);
    let location = testkit::temp_dir("strata-tblspc-");
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLESPACE strata_ts LOCATION '{}'; \
             CREATE TABLE in_ts TABLESPACE strata_ts AS SELECT g FROM generate_series(1, 1000) g",
            location.display()
        ),
    );
    let strata = Strata::new("tblspc");
    strata.add_instance("tblspc", pg);
    strata.backup("tblspc");
    let restored = strata.restore_and_start("tblspc", "latest", 15, &[]);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), sum(g) FROM in_ts"),
        "1000|500500"
    );
    // The restored tablespace lives beside the restored directory, never
    // in the source's location.
    let link = std::fs::read_link(
        restored
            .data_dir()
            .join("pg_tblspc")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(
        link.starts_with(format!("{}.tblspc", restored.data_dir().display())),
        "tablespace restored to {}",
        link.display()
    );
    drop(restored);
    pg.psql("postgres", "DROP TABLE in_ts; DROP TABLESPACE strata_ts");
}

/// A restored directory recovers with plain `pg_ctl start`: the WAL it needs
/// is staged in pg_wal and no Strata command is involved.
#[test]
fn restored_directory_starts_without_strata() {
    let pg = testkit::shared_cluster(15);
    pg.psql(
        "postgres",
        "CREATE TABLE plain_start AS SELECT g FROM generate_series(1, 500) g",
    );
    let strata = Strata::new("plain");
    strata.add_instance("plain", pg);
    strata.backup("plain");
    let target = strata.dir.join("restored");
    strata.ok(&[
        "restore",
        "plain",
        "--target-dir",
        &common::path_str(&target),
    ]);
    let port = testkit::free_port();
    let mut cmd = std::process::Command::new(testkit::pg_bin_dir(15).unwrap().join("pg_ctl"));
    cmd.arg("-D")
        .arg(&target)
        .arg("-l")
        .arg(target.join("plain-start.log"))
        .arg("-o")
        .arg(format!("-p {port}"))
        .args(["-w", "-t", "120", "start"]);
    testkit::run_as_postgres(&mut cmd);
    assert!(cmd.status().unwrap().success(), "pg_ctl start failed");
    let restored = Cluster::adopt(15, target, port);
    common::wait_for("recovery to end", 60, || {
        restored.try_psql("postgres", "SELECT pg_is_in_recovery()") == Ok("f".to_string())
    });
    assert_eq!(
        restored.psql("postgres", "SELECT count(*) FROM plain_start"),
        "500"
    );
    drop(restored);
    pg.psql("postgres", "DROP TABLE plain_start");
}
