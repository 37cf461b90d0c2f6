//! Recovery events under load: destructive transactions decoded from the
//! WAL as `wal receive` stores it, listed with the right names, times and
//! xids, kept across `repo reindex`, and restorable to just before each.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::{wait_for, Strata};
use serde_json::Value;
use testkit::Cluster;

/// Runs `sql` (which must `SELECT txid_current()` once) as one transaction
/// and answers its xid and the server's clock just before and after.
fn xact(pg: &Cluster, db: &str, sql: &str) -> (u32, String, String) {
    let out = pg.psql(
        db,
        &format!(
            "SELECT clock_timestamp(); BEGIN; SELECT txid_current(); {sql}; COMMIT; SELECT clock_timestamp();"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "unexpected psql output {out:?}");
    (
        lines[1].trim().parse().expect("an xid"),
        lines[0].to_string(),
        lines[2].to_string(),
    )
}

fn digest(pg: &Cluster, db: &str, table: &str) -> String {
    pg.psql(
        db,
        &format!("SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t"),
    )
}

fn events(strata: &Strata, id: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["wal", "events", id, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&strata.ok(&args)).unwrap()
}

fn find<'a>(list: &'a [Value], kind: &str, xid: u32) -> &'a Value {
    list.iter()
        .find(|e| e["kind"] == kind && e["xid"] == xid)
        .unwrap_or_else(|| panic!("no {kind} event of xid {xid} in {list:#?}"))
}

/// Whether `time` (RFC 3339 from the events) lies between two
/// `clock_timestamp()` readings of the server.
fn between(pg: &Cluster, time: &Value, before: &str, after: &str) -> bool {
    let t = time.as_str().expect("a time");
    pg.psql(
        "postgres",
        &format!(
            "SELECT '{t}'::timestamptz BETWEEN '{before}'::timestamptz AND '{after}'::timestamptz"
        ),
    ) == "t"
}

#[test]
fn destructive_transactions_are_listed_under_load_and_survive_reindex() {
    let pg = Cluster::start_default(15);
    let db = "postgres";
    pg.pgbench(db, &["-i", "-q", "-s", "1"]);
    pg.psql(
        db,
        "CREATE TABLE victim_drop AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 2000) g; \
         CREATE TABLE victim_trunc AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 1500) g; \
         CREATE TABLE victim_delete (id int PRIMARY KEY, v text); \
         INSERT INTO victim_delete SELECT g, md5(g::text) FROM generate_series(1, 3000) g; \
         CREATE TABLE small AS SELECT g AS id FROM generate_series(1, 100) g; \
         CREATE TABLE keeps_changing (id serial PRIMARY KEY, v text); \
         CREATE TABLE renamed_old AS SELECT g AS id FROM generate_series(1, 1200) g; \
         CREATE TABLE rewritten AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 1500) g; \
         CREATE TABLE reloaded AS SELECT g AS id FROM generate_series(1, 1500) g; \
         CREATE DATABASE doomed",
    );
    pg.psql(
        "doomed",
        "CREATE TABLE d AS SELECT g AS id FROM generate_series(1, 10) g",
    );
    let strata = Strata::new("undo");
    strata.add_instance("u", &pg);
    let mut receiver = strata.wal_receiver("u");
    strata.backup("u");

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                pg.pgbench(db, &["-n", "-c", "2", "-T", "1"]);
            }
        });
        // Names are read when the receiver starts: wait until the tables
        // are known before destroying them.
        std::thread::sleep(std::time::Duration::from_secs(2));

        let dropped_digest = digest(&pg, db, "victim_drop");
        let (drop_xid, d0, d1) = xact(&pg, db, "DROP TABLE victim_drop");
        let truncated_digest = digest(&pg, db, "victim_trunc");
        let (trunc_xid, t0, t1) = xact(&pg, db, "TRUNCATE victim_trunc");
        let deleted_digest = digest(&pg, db, "victim_delete");
        let (delete_xid, _, _) = xact(&pg, db, "DELETE FROM victim_delete");
        pg.psql(db, "INSERT INTO victim_delete VALUES (1, 'after')");
        let (small_xid, _, _) = xact(&pg, db, "DELETE FROM small WHERE id <= 10");
        let (update_xid, _, _) = xact(
            &pg,
            db,
            "UPDATE pgbench_accounts SET filler = 'x' WHERE aid <= 1500",
        );
        pg.psql(db, "VACUUM FULL rewritten");
        // Emptied and loaded again in one transaction: the old rows are gone.
        let (reload_xid, _, _) = xact(
            &pg,
            db,
            "TRUNCATE reloaded; INSERT INTO reloaded SELECT g FROM generate_series(1, 5) g",
        );
        pg.psql(db, "ALTER TABLE renamed_old RENAME TO renamed_new");
        // The rename is read from the server before the drop comes.
        std::thread::sleep(std::time::Duration::from_secs(3));
        let (renamed_xid, _, _) = xact(&pg, db, "DROP TABLE renamed_new");
        pg.psql(db, "SELECT pg_create_restore_point('after-cleanup')");
        let doomed_oid = pg.psql(db, "SELECT oid FROM pg_database WHERE datname = 'doomed'");
        let doomed_digest = digest(&pg, "doomed", "d");
        pg.psql(db, "DROP DATABASE doomed");
        pg.psql(db, "INSERT INTO keeps_changing (v) VALUES ('last')");

        let mut list = Vec::new();
        wait_for("the events to be stored", 60, || {
            list = events(&strata, "u", &[]);
            list.iter().any(|e| e["kind"] == "DropDatabase")
                && list.iter().any(|e| e["kind"] == "RestorePoint")
        });
        stop.store(true, Ordering::Relaxed);

        let e = find(&list, "DropTable", drop_xid);
        assert_eq!(e["table"], "victim_drop");
        assert_eq!(e["schema"], "public");
        assert_eq!(e["database"], "postgres");
        assert!(
            between(&pg, &e["time"], &d0, &d1),
            "{e:#?} not in [{d0}, {d1}]"
        );

        let e = find(&list, "Truncate", trunc_xid);
        assert_eq!(e["table"], "victim_trunc");
        assert!(
            between(&pg, &e["time"], &t0, &t1),
            "{e:#?} not in [{t0}, {t1}]"
        );

        let e = find(&list, "Delete", delete_xid);
        assert_eq!(e["table"], "victim_delete");
        assert_eq!(e["rows"], 3000);

        let e = find(&list, "Update", update_xid);
        assert_eq!(e["table"], "pgbench_accounts");
        assert_eq!(e["rows"], 1500);

        // Below the threshold, and a rewrite that lost nothing: not listed.
        assert!(!list.iter().any(|e| e["xid"] == small_xid), "{list:#?}");
        assert!(!list.iter().any(|e| e["table"] == "rewritten"), "{list:#?}");
        assert!(!list.iter().any(|e| e["table"] == "small"), "{list:#?}");

        let e = find(&list, "Truncate", reload_xid);
        assert_eq!(e["table"], "reloaded");

        let e = find(&list, "DropTable", renamed_xid);
        assert_eq!(e["table"], "renamed_new", "the name it had when dropped");

        let e = list
            .iter()
            .find(|e| e["kind"] == "DropDatabase")
            .expect("a DropDatabase event");
        assert_eq!(e["database"], "doomed");
        assert_eq!(e["db_oid"].to_string(), doomed_oid);

        let e = list
            .iter()
            .find(|e| e["kind"] == "RestorePoint")
            .expect("the restore point");
        assert_eq!(e["name"], "after-cleanup");

        // Filters.
        let only = events(&strata, "u", &["--table", "public.victim_delete"]);
        assert_eq!(only.len(), 1, "{only:#?}");
        assert_eq!(only[0]["xid"], delete_xid);
        let kinds = events(&strata, "u", &["--kind", "droptable,DropDatabase"]);
        assert_eq!(kinds.len(), 3, "{kinds:#?}");
        let err = strata.fails(&["wal", "events", "u", "--kind", "Explode"]);
        assert!(err.contains("unknown event kind"), "{err}");

        // The events are in the repository: a reindex finds them again.
        receiver.stop();
        let before = events(&strata, "u", &[]);
        strata.ok(&["repo", "reindex"]);
        assert_eq!(events(&strata, "u", &[]), before);

        // Undo: each restore stops just before its transaction, so the
        // table is as committed right before it while what came before
        // the transaction (an earlier event) stays done.
        let undo = |xid: u32, name: &str| {
            let xid = xid.to_string();
            strata.restore_and_start("u", name, 15, &["--xid", &xid, "--exclusive"])
        };
        let r = undo(drop_xid, "before-drop");
        assert_eq!(digest(&r, db, "victim_drop"), dropped_digest);
        drop(r);
        let r = undo(trunc_xid, "before-truncate");
        assert_eq!(digest(&r, db, "victim_trunc"), truncated_digest);
        assert!(r.try_psql(db, "SELECT 1 FROM victim_drop").is_err());
        drop(r);
        let r = undo(delete_xid, "before-delete");
        assert_eq!(digest(&r, db, "victim_delete"), deleted_digest);
        assert_eq!(r.psql(db, "SELECT count(*) FROM victim_trunc"), "0");
        drop(r);
        // A dropped database is marked invalid and its files removed
        // before the commit: the event says where it was still intact.
        let before = list
            .iter()
            .find(|e| e["kind"] == "DropDatabase")
            .and_then(|e| e["before_lsn"].as_str())
            .expect("the DropDatabase event's position before it")
            .to_string();
        let r = strata.restore_and_start(
            "u",
            "before-drop-database",
            15,
            &["--lsn", &before, "--exclusive"],
        );
        assert_eq!(digest(&r, "doomed", "d"), doomed_digest);
    });
}
