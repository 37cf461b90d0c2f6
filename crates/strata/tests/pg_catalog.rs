//! Strata on a PostgreSQL catalog, end to end through the `strata` binary: a
//! SQLite catalog with a real backup set and archived WAL is moved with
//! `strata catalog migrate --to postgres://…`, then with `catalog =` set to
//! the URL the sets are listed, WAL is archived and another backup taken
//! through the new catalog, and a restore to a time reads the catalog it now
//! lives in.

mod common;

use std::time::{Duration, Instant};

use common::*;
use testkit::Cluster;

/// Waits until the archive holds WAL up to the source's current insert LSN.
fn wait_archived(strata: &Strata, id: &str, pg: &Cluster, receiver: &mut Receiver) {
    let end: pg_wal::Lsn = pg
        .psql("postgres", "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !strata.wal(id).iter().any(|w| {
        w["end_lsn"]
            .as_str()
            .unwrap()
            .parse::<pg_wal::Lsn>()
            .unwrap()
            >= end
    }) {
        if Instant::now() > deadline {
            panic!(
                "WAL not archived up to {end} within 60 s:\n{}",
                receiver.stop()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What identifies a backup set or WAL row and what a restore relies on.
fn key_fields(rows: &[serde_json::Value]) -> Vec<String> {
    rows.iter()
        .map(|r| {
            [
                "id",
                "status",
                "start_lsn",
                "stop_lsn",
                "total_bytes",
                "file_count",
                "segment",
                "partial",
                "begin_lsn",
                "end_lsn",
                "checksum",
                "object_key",
            ]
            .iter()
            .map(|k| format!("{k}={}", r[*k]))
            .collect::<Vec<_>>()
            .join(" ")
        })
        .collect()
}

fn ledger(c: &Cluster) -> String {
    c.psql(
        "postgres",
        "SELECT coalesce(string_agg(id::text || ':' || note, ',' ORDER BY id), '') FROM ledger",
    )
}

#[test]
fn a_sqlite_catalog_moves_to_postgres_and_backs_up_and_restores_from_there() {
    let pg = Cluster::start_default(15);
    let id = "pgcat";
    pg.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text)",
    );
    pg.psql(
        "postgres",
        "INSERT INTO ledger VALUES (1, 'before the backup')",
    );

    // On SQLite: a backup set and WAL after it, with a time between two commits.
    let strata = Strata::new("pg-catalog");
    strata.add_instance(id, &pg);
    let mut receiver = strata.wal_receiver(id);
    let first = strata.backup(id);
    pg.psql("postgres", "INSERT INTO ledger VALUES (2, 'kept')");
    std::thread::sleep(Duration::from_millis(300));
    let t = pg.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let at_t = ledger(&pg);
    std::thread::sleep(Duration::from_millis(300));
    pg.psql(
        "postgres",
        "INSERT INTO ledger VALUES (3, 'after the target')",
    );
    wait_archived(&strata, id, &pg, &mut receiver);
    receiver.stop();
    let sets_before = strata.backups(id);
    let wal_before = strata.wal(id);
    assert!(!wal_before.is_empty());

    // The move: every table copied and checked, the password never shown.
    let url = testkit::catalog_database("strata_pg_catalog");
    let out = strata.ok(&["catalog", "migrate", "--to", &url]);
    assert!(
        out.contains("backup_sets") && out.contains("wal_segments"),
        "{out}"
    );
    assert!(out.contains("each checked against the source"), "{out}");
    let report: Vec<serde_json::Value> = serde_json::from_str(&strata.ok(&[
        "catalog",
        "migrate",
        "--to",
        &testkit::catalog_database("strata_pg_catalog_json"),
        "--json",
    ]))
    .unwrap();
    let rows = |table: &str| {
        report
            .iter()
            .find(|t| t["table"] == table)
            .unwrap_or_else(|| panic!("{table} in {report:?}"))["rows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(rows("backup_sets"), 1);
    assert_eq!(rows("wal_segments"), wal_before.len() as u64);
    assert_eq!(rows("instances"), 1);
    // A catalog already holding rows is refused.
    let err = strata.fails(&["catalog", "migrate", "--to", &url]);
    assert!(err.contains("not empty"), "{err}");

    // On PostgreSQL from now on.
    let strata = strata.reconfigured(&format!("catalog = {url:?}\n"), "");
    // The same rows (times are kept to the microsecond there).
    assert_eq!(key_fields(&strata.backups(id)), key_fields(&sets_before));
    assert_eq!(key_fields(&strata.wal(id)), key_fields(&wal_before));
    let catalog_db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let server = testkit::catalog_server();
    let count = |table: &str| server.psql(catalog_db, &format!("SELECT count(*) FROM {table}"));
    assert_eq!(count("backup_sets"), "1");

    let mut receiver = strata.wal_receiver(id);
    let second = strata.backup(id);
    assert_ne!(second, first);
    pg.psql(
        "postgres",
        "INSERT INTO ledger VALUES (4, 'on the new catalog')",
    );
    wait_archived(&strata, id, &pg, &mut receiver);
    receiver.stop();
    let sets = strata.backups(id);
    assert_eq!(sets.len(), 2);
    assert!(sets.iter().all(|s| s["status"] == "Success"), "{sets:?}");
    assert_eq!(count("backup_sets"), "2", "the new set is in PostgreSQL");
    assert!(strata.wal(id).len() > wal_before.len());

    // A restore to the time between two commits, found through the new catalog.
    let restored = strata.restore_and_start(id, "time", 15, &["--time", &t]);
    assert_eq!(ledger(&restored), at_t);
    assert_eq!(at_t, "1:before the backup,2:kept");
    let latest = strata.restore_and_start(id, "latest", 15, &[]);
    assert_eq!(ledger(&latest), ledger(&pg));

    // The service runs on it too: its async handlers reach the catalog.
    let server = Server::start(&strata, &[]);
    let (status, body) = http_get(server.port, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains(&format!("\"{id}\"")), "{body}");
    let (ok, _, err) = server.stop();
    assert!(
        ok,
        "serve on a PostgreSQL catalog did not stop cleanly:\n{err}"
    );
}

/// A catalog that cannot be reached names itself without its password,
/// wherever the password came from.
#[test]
fn an_unreachable_postgres_catalog_fails_without_showing_its_password() {
    let port = testkit::free_port();
    let strata = Strata::with_config(
        "pg-catalog-down",
        &format!("catalog = \"postgres://strata:hunter2@127.0.0.1:{port}/cat?sslmode=disable\"\n"),
        "",
    );
    let err = strata.fails(&["instance", "list"]);
    assert!(err.contains(&format!("127.0.0.1:{port}/cat")), "{err}");
    assert!(err.contains("strata:***@"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let strata = strata.reconfigured(
        &format!(
            "catalog = \"postgres://strata@127.0.0.1:{port}/cat\"\ncatalog_password_env = \"STRATA_TEST_UNSET_CATALOG_PW\"\n"
        ),
        "",
    );
    let err = strata.fails(&["instance", "list"]);
    assert!(err.contains("STRATA_TEST_UNSET_CATALOG_PW"), "{err}");
    let out = strata
        .command(&["instance", "list"])
        .env("STRATA_TEST_UNSET_CATALOG_PW", "hunter2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("hunter2"), "{err}");
    assert!(err.contains("busy or unavailable"), "{err}");
}
