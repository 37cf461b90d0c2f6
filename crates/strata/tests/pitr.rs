//! Backup under pgbench load with concurrent DDL, then restores to latest,
//! to a time, an LSN, an xid and a named restore point, each compared row by
//! row (by digest) with what was committed at that target.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::{state_digest, wait_for, Strata};
use testkit::Cluster;

#[test]
fn pitr_under_load_with_ddl() {
    let pg = Cluster::start_default(15);
    let db = "postgres";
    pg.pgbench(db, &["-i", "-q", "-s", "4"]);
    pg.psql(db, "CREATE TABLE ledger (id int PRIMARY KEY, note text)");

    let strata = Strata::new("pitr");
    strata.add_instance("pitr", &pg);
    let mut receiver = strata.wal_receiver("pitr");

    // Load and DDL run for the whole backup.
    let stop = AtomicBool::new(false);
    let ddl_rounds = AtomicU32::new(0);
    let (backup_id, during) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                pg.pgbench(db, &["-n", "-c", "2", "-T", "1"]);
            }
        });
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                pg.psql(
                    db,
                    &format!(
                        "CREATE TABLE ddl_{i} AS SELECT g AS x, md5(g::text) AS y FROM generate_series(1, 20000) g; \
                         CREATE INDEX ddl_{i}_y ON ddl_{i} (y); \
                         DROP TABLE IF EXISTS ddl_{}",
                        i - 1
                    ),
                );
                ddl_rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
        wait_for("DDL to start", 60, || {
            ddl_rounds.load(Ordering::Relaxed) >= 2
        });
        let before = ddl_rounds.load(Ordering::Relaxed);
        let id = strata.backup("pitr");
        // Let one more DDL round finish so it surely overlapped the backup.
        wait_for("a DDL round after the backup", 60, || {
            ddl_rounds.load(Ordering::Relaxed) > before + 1
        });
        let during = ddl_rounds.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        (id, during)
    });
    assert!(during >= 1, "no DDL ran during the backup");
    let sets = strata.backups("pitr");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["id"], backup_id.as_str());
    assert_eq!(sets[0]["status"], "Success");

    // Phases of committed work, each followed by a marker.
    let phase = |k: u32| {
        pg.pgbench(db, &["-n", "-c", "2", "-t", "50"]);
        pg.psql(db, &format!("INSERT INTO ledger VALUES ({k}, 'phase {k}')"));
    };
    phase(1);
    std::thread::sleep(Duration::from_millis(300));
    let t1 = pg.psql(
        db,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let d1 = state_digest(&pg, db);
    std::thread::sleep(Duration::from_millis(300));

    phase(2);
    let lsn2 = pg.psql(db, "SELECT pg_current_wal_insert_lsn()");
    let d2 = state_digest(&pg, db);

    phase(3);
    let xid3 = pg.psql(
        db,
        "BEGIN; INSERT INTO ledger VALUES (300, 'xid marker'); SELECT txid_current(); COMMIT;",
    );
    let d3 = state_digest(&pg, db);

    phase(4);
    pg.psql(db, "SELECT pg_create_restore_point('before-phase-5')");
    let d4 = state_digest(&pg, db);

    phase(5);
    let d5 = state_digest(&pg, db);
    // Every distinct target must be a distinct state, or the test proves nothing.
    let all = [&d1, &d2, &d3, &d4, &d5];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // The partial segment is flushed every 200 ms; give it time, then stop.
    let end_lsn = pg.psql(db, "SELECT pg_current_wal_insert_lsn()");
    wait_for("WAL archived up to the last commit", 30, || {
        strata.wal("pitr").iter().any(|w| {
            let end: pg_wal::Lsn = w["end_lsn"].as_str().unwrap().parse().unwrap();
            end >= end_lsn.parse().unwrap()
        })
    });
    receiver.stop();

    let xid3 = xid3
        .lines()
        .find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty())
        .unwrap()
        .to_string();
    let cases: Vec<(&str, Vec<&str>, &String)> = vec![
        ("latest", vec![], &d5),
        ("time", vec!["--time", &t1], &d1),
        ("lsn", vec!["--lsn", &lsn2], &d2),
        ("xid", vec!["--xid", &xid3], &d3),
        ("name", vec!["--name", "before-phase-5"], &d4),
    ];
    for (name, args, expected) in cases {
        let restored = strata.restore_and_start("pitr", name, 15, &args);
        assert_eq!(
            &state_digest(&restored, db),
            expected,
            "restore to {name} {args:?} does not match the data committed at that target"
        );
        assert_eq!(restored.psql(db, "SELECT pg_is_in_recovery()"), "f");
    }
}
