//! Continuous WAL archiving: a restart of the source server leaves no gap,
//! and a promoted standby's new timeline is followed (history file stored,
//! point-in-time restore on the new timeline works).

mod common;

use std::time::Duration;

use common::{wait_for, Strata};
use pg_wal::Lsn;
use testkit::Cluster;

/// Segment numbers of complete segments on `tli` must have no holes.
fn assert_contiguous(wal: &[serde_json::Value], tli: u64) {
    let mut segs: Vec<u64> = wal
        .iter()
        .filter(|w| w["timeline"] == tli && w["partial"] == false)
        .map(|w| u64::from_str_radix(&w["segment"].as_str().unwrap()[8..], 16).unwrap())
        .collect();
    segs.sort();
    assert!(!segs.is_empty(), "no complete segment on timeline {tli}");
    for pair in segs.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "gap in archived WAL on timeline {tli}: {segs:?}"
        );
    }
}

fn archived_up_to(strata: &Strata, id: &str, lsn: &str) -> bool {
    let lsn: Lsn = lsn.parse().unwrap();
    strata.wal(id).iter().any(|w| {
        let end: Lsn = w["end_lsn"].as_str().unwrap().parse().unwrap();
        end >= lsn
    })
}

#[test]
fn server_restart_leaves_no_gap() {
    let mut pg = Cluster::start_default(15);
    let strata = Strata::new("restart");
    strata.add_instance("restart", &pg);
    pg.psql("postgres", "CREATE TABLE t (i int)");
    strata.backup("restart");
    let mut receiver = strata.wal_receiver("restart");
    for round in 0..3 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t SELECT generate_series(1, 1000) + {round} * 1000; SELECT pg_switch_wal()"),
        );
        if round == 1 {
            pg.restart();
        }
    }
    pg.psql("postgres", "INSERT INTO t VALUES (-1)");
    let end = pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    wait_for("WAL after the restart to be archived", 60, || {
        archived_up_to(&strata, "restart", &end)
    });
    let log = receiver.stop();
    assert!(
        log.contains("reconnecting"),
        "the receiver never saw the restart:\n{log}"
    );
    assert_contiguous(&strata.wal("restart"), 1);
    let restored = strata.restore_and_start("restart", "latest", 15, &[]);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), min(i), max(i) FROM t"),
        "3001|-1|3000"
    );
}

#[test]
fn promoted_standby_timeline_is_followed() {
    let primary = Cluster::start_default(15);
    primary.psql("postgres", "CREATE TABLE t (i int, phase text)");
    let standby = primary.create_standby();
    let strata = Strata::new("promote");
    strata.add_instance("std", &standby);
    primary.psql("postgres", "INSERT INTO t VALUES (1, 'before backup')");
    let caught_up = |lsn: &str| {
        let lsn = lsn.to_string();
        let standby = &standby;
        move || {
            standby.psql(
                "postgres",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"),
            ) == "t"
        }
    };
    let lsn = primary.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    wait_for("standby replay", 60, caught_up(&lsn));
    // A backup taken from the standby (no segment switch at its end).
    strata.backup("std");
    let mut receiver = strata.wal_receiver("std");
    primary.psql(
        "postgres",
        "INSERT INTO t VALUES (2, 'timeline 1'); SELECT pg_switch_wal()",
    );
    let lsn = primary.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    wait_for("standby replay", 60, caught_up(&lsn));

    standby.promote();
    standby.psql(
        "postgres",
        "INSERT INTO t VALUES (3, 'timeline 2 before T')",
    );
    std::thread::sleep(Duration::from_millis(400));
    let t = standby.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(400));
    standby.psql("postgres", "INSERT INTO t VALUES (4, 'timeline 2 after T')");
    let end = standby.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    wait_for("timeline 2 WAL to be archived", 60, || {
        strata.wal("std").iter().any(|w| w["timeline"] == 2) && archived_up_to(&strata, "std", &end)
    });
    let log = receiver.stop();
    assert!(log.contains("following timeline 2"), "{log}");
    assert!(
        strata
            .repo_dir()
            .join("instances/std/wal/00000002.history")
            .exists(),
        "history file of timeline 2 not stored"
    );
    assert_contiguous(&strata.wal("std"), 1);

    let at_t = strata.restore_and_start("std", "time-on-tl2", 15, &["--time", &t]);
    assert_eq!(
        at_t.psql(
            "postgres",
            "SELECT string_agg(i::text, ',' ORDER BY i) FROM t"
        ),
        "1,2,3"
    );
    drop(at_t);
    let latest = strata.restore_and_start("std", "latest", 15, &[]);
    assert_eq!(
        latest.psql(
            "postgres",
            "SELECT string_agg(i::text, ',' ORDER BY i) FROM t"
        ),
        "1,2,3,4"
    );
}

/// A receiver started after the server dropped WAL it never held: it starts
/// where its new slot holds WAL, says so, and restores refuse targets in the
/// hole instead of silently recovering less.
#[test]
fn late_receiver_reports_the_unarchived_gap() {
    let pg = Cluster::builder(15).conf("wal_keep_size = 0").start();
    pg.psql("postgres", "CREATE TABLE t (i int)");
    let strata = Strata::new("late");
    strata.add_instance("late", &pg);
    strata.backup("late");
    let first_wal = strata.wal("late").len();
    for i in 0..4 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t VALUES ({i}); SELECT pg_switch_wal(); CHECKPOINT"),
        );
    }
    let mut receiver = strata.wal_receiver("late");
    pg.psql(
        "postgres",
        "INSERT INTO t VALUES (100); SELECT pg_switch_wal()",
    );
    let end = pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    wait_for("WAL after the gap", 60, || {
        archived_up_to(&strata, "late", &end)
    });
    let log = receiver.stop();
    assert!(log.contains("was not held by a replication slot"), "{log}");
    assert!(strata.wal("late").len() > first_wal);
    let target = strata.dir.join("beyond-gap");
    let err = strata.fails(&[
        "restore",
        "late",
        "--target-dir",
        &target.display().to_string(),
        "--lsn",
        &end,
    ]);
    assert!(err.contains("gap in the archived WAL"), "{err}");
}

/// Commits arriving over many refreshes of one segment are stored as tails
/// of its partial object; a restore to "latest" joins them and loses none.
#[test]
fn latest_commits_in_partial_tails_are_restored() {
    let pg = Cluster::start_default(15);
    let strata = Strata::new("tails");
    strata.add_instance("tails", &pg);
    pg.psql("postgres", "CREATE TABLE t (i int)");
    strata.backup("tails");
    let mut receiver = strata.wal_receiver("tails");
    let segment = pg.psql(
        "postgres",
        "SELECT pg_walfile_name(pg_current_wal_insert_lsn())",
    );
    let timeline = &segment[..8];
    let tails = strata.repo_dir().join(format!(
        "instances/tails/wal/{timeline}/{segment}.partial.d"
    ));
    // Each commit waits for the refresh after it (200 ms), so each becomes
    // a tail of its own until tails are merged.
    let mut seen_tails = 0;
    for i in 1..=40 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({i})"));
        let end = pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
        wait_for("the commit to be archived", 30, || {
            archived_up_to(&strata, "tails", &end)
        });
        let now = std::fs::read_dir(&tails).map(|d| d.count()).unwrap_or(0);
        seen_tails = seen_tails.max(now);
    }
    let now_segment = pg.psql(
        "postgres",
        "SELECT pg_walfile_name(pg_current_wal_insert_lsn())",
    );
    assert_eq!(now_segment, segment, "the test's WAL left its segment");
    assert!(
        seen_tails >= 2,
        "no tails were stored (at most {seen_tails} at once)"
    );
    assert!(
        seen_tails <= 16,
        "{seen_tails} tails at once: they were not merged"
    );
    receiver.stop();
    // The tails left (each describing the prefix it ends) pass verification.
    assert!(std::fs::read_dir(&tails).map(|d| d.count()).unwrap_or(0) >= 1);
    let verified = strata.ok(&["repo", "verify"]);
    assert!(!verified.contains("problem"), "{verified}");
    let restored = strata.restore_and_start("tails", "latest", 15, &[]);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), sum(i) FROM t"),
        "40|820"
    );
}
