//! `strata restore --delta`: a backup restored over the data directory of a
//! restored copy that ran and changed afterwards. The result starts, holds
//! exactly the backup's data recovered to the target, and cost only the
//! blocks that changed; files the backup does not have are gone; links
//! planted in the directory never lead a write or a removal outside it;
//! another cluster's directory, a running server and a directory that is
//! not a data directory are refused; a delta restore that fails leaves a
//! directory PostgreSQL will not start, and a second run completes it.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{path_str, state_digest, Strata};
use serde_json::Value;
use testkit::Cluster;

const DB: &str = "postgres";

/// Every file below `dir` with its contents, for "nothing changed here".
fn snapshot_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    common::files_under(dir)
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Waits until the archived WAL reaches the source's current insert position.
fn wait_archived(strata: &Strata, id: &str, pg: &Cluster) {
    let end: pg_wal::Lsn = pg
        .psql(DB, "SELECT pg_current_wal_insert_lsn()")
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
        assert!(Instant::now() < deadline, "WAL not archived up to {end}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `strata restore --delta --json` into `dir`, started on a new port.
fn delta_restore(strata: &Strata, id: &str, dir: &Path, extra: &[&str]) -> (Value, Cluster) {
    let port = testkit::free_port().to_string();
    let dir_s = path_str(dir);
    let mut args = vec![
        "restore",
        id,
        "--target-dir",
        &dir_s,
        "--delta",
        "--start",
        "--port",
        &port,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out: Value = serde_json::from_str(&strata.ok(&args)).unwrap();
    let cluster = Cluster::adopt(15, dir.to_path_buf(), port.parse().unwrap());
    (out, cluster)
}

#[test]
fn delta_restore_writes_only_changed_blocks_and_equals_the_backup() {
    let strata = Strata::new("delta");
    let pg = Cluster::start_default(15);
    pg.pgbench(DB, &["-i", "-q", "-s", "2"]);
    pg.psql(
        DB,
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); VACUUM (FREEZE, ANALYZE)",
    );
    let id = "deltadb";
    strata.add_instance(id, &pg);
    let mut receiver = strata.wal_receiver(id);
    strata.backup(id);
    let at_backup = state_digest(&pg, DB);
    pg.psql(DB, "INSERT INTO ledger VALUES (1, 'after the backup')");
    let latest = state_digest(&pg, DB);
    assert_ne!(at_backup, latest);
    wait_archived(&strata, id, &pg);
    receiver.stop();

    // A copy at the backup's consistency point, then changed by its users.
    let mut copy = strata.restore_and_start(id, "copy", 15, &["--immediate"]);
    let dir = copy.data_dir().to_path_buf();
    assert_eq!(state_digest(&copy, DB), at_backup);
    copy.psql(
        DB,
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 2000; \
         CREATE TABLE extra AS SELECT g FROM generate_series(1, 5000) g; \
         INSERT INTO ledger VALUES (99, 'only in the copy')",
    );

    // No delta restore while its server runs.
    let err = strata.fails(&["restore", id, "--target-dir", &path_str(&dir), "--delta"]);
    assert!(err.contains("a server is running in"), "{err}");
    assert_eq!(copy.psql(DB, "SELECT count(*) FROM extra"), "5000");
    // The relation file of `extra`, which the backup does not have.
    let extra_file = dir.join(copy.psql(DB, "SELECT pg_relation_filepath('extra')"));
    assert!(extra_file.is_file());
    copy.stop();
    drop(copy);
    std::fs::write(dir.join("base/stray_file"), b"not in the backup").unwrap();
    std::fs::create_dir_all(dir.join("stray_dir/deeper")).unwrap();
    std::fs::write(dir.join("stray_dir/deeper/f"), b"x").unwrap();

    let (out, restored) = delta_restore(&strata, id, &dir, &[]);
    assert_eq!(state_digest(&restored, DB), latest);
    assert_eq!(
        restored.psql(
            DB,
            "SELECT to_regclass('extra') IS NULL, pg_is_in_recovery()"
        ),
        "t|f"
    );
    assert!(!dir.join("base/stray_file").exists());
    assert!(!dir.join("stray_dir").exists());
    assert!(!extra_file.exists(), "{} is left", extra_file.display());
    assert!(!dir.join("global/pg_control.strata-delta").exists());

    let delta = &out["delta"];
    let bytes = out["bytes"].as_u64().unwrap();
    let written = delta["bytes_written"].as_u64().unwrap();
    assert!(bytes > 20 << 20, "{out}");
    assert!(
        written * 10 < bytes,
        "a delta restore after a 1 % change wrote {written} of {bytes} bytes: {out}"
    );
    assert!(delta["blocks_reused"].as_u64().unwrap() > 100, "{out}");
    assert!(delta["blocks_written"].as_u64().unwrap() > 0, "{out}");
    assert!(delta["files_patched"].as_u64().unwrap() > 0, "{out}");
    assert!(delta["removed"].as_u64().unwrap() >= 4, "{out}");
    drop(restored);

    // Again, to the backup's consistency point: only what the server wrote
    // on its last run differs.
    let (again, restored) = delta_restore(&strata, id, &dir, &["--immediate"]);
    assert_eq!(state_digest(&restored, DB), at_backup);
    assert!(
        again["delta"]["bytes_written"].as_u64().unwrap() * 10 < bytes,
        "{again}"
    );
}

#[test]
fn delta_restore_never_follows_links_out_of_the_directory() {
    let strata = Strata::new("delta-links");
    let pg = Cluster::start_default(15);
    pg.pgbench(DB, &["-i", "-q", "-s", "1"]);
    pg.psql(DB, "CREATE TABLE ledger (id int PRIMARY KEY, note text)");
    let id = "linkdb";
    strata.add_instance(id, &pg);
    strata.backup(id);
    let at_backup = state_digest(&pg, DB);
    let mut copy = strata.restore_and_start(id, "copy", 15, &["--immediate"]);
    let dir = copy.data_dir().to_path_buf();
    copy.stop();
    drop(copy);

    // Outside the directory: a file and two directories a hostile copy
    // points links at.
    let outside = testkit::temp_dir("strata-delta-outside-");
    std::fs::write(outside.join("victim"), b"precious").unwrap();
    std::fs::create_dir_all(outside.join("db/sub")).unwrap();
    std::fs::write(outside.join("db/PG_VERSION"), b"precious too").unwrap();
    std::fs::write(outside.join("db/sub/1259"), vec![7u8; 300_000]).unwrap();
    std::fs::create_dir_all(outside.join("wal")).unwrap();
    std::fs::write(outside.join("wal/000000010000000000000001"), b"wal").unwrap();
    let before = snapshot_of(&outside);

    // A file of the backup replaced by a link to a file outside.
    std::fs::remove_file(dir.join("PG_VERSION")).unwrap();
    symlink(outside.join("victim"), dir.join("PG_VERSION")).unwrap();
    // A database directory replaced by a link to a directory outside.
    let template1 = dir.join("base/1");
    std::fs::remove_dir_all(&template1).unwrap();
    symlink(outside.join("db"), &template1).unwrap();
    // pg_wal, and a tablespace the backup does not have, pointing outside.
    std::fs::remove_dir_all(dir.join("pg_wal")).unwrap();
    symlink(outside.join("wal"), dir.join("pg_wal")).unwrap();
    symlink(&outside, dir.join("pg_tblspc/99999")).unwrap();
    // A link the backup does not have inside a directory it has.
    symlink(outside.join("db"), dir.join("base/escape")).unwrap();

    let (out, restored) = delta_restore(&strata, id, &dir, &["--immediate"]);
    assert_eq!(state_digest(&restored, DB), at_backup);
    assert_eq!(
        restored.psql("template1", "SELECT current_database()"),
        "template1"
    );
    assert_eq!(snapshot_of(&outside), before, "{out}");
    for (p, dir_expected) in [("PG_VERSION", false), ("base/1", true), ("pg_wal", true)] {
        let m = std::fs::symlink_metadata(dir.join(p)).unwrap();
        assert!(!m.file_type().is_symlink(), "{p} is still a link");
        assert_eq!(m.is_dir(), dir_expected, "{p}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("PG_VERSION")).unwrap(),
        "15\n"
    );
    assert!(std::fs::symlink_metadata(dir.join("pg_tblspc/99999")).is_err());
    assert!(std::fs::symlink_metadata(dir.join("base/escape")).is_err());
    assert!(out["delta"]["files_written"].as_u64().unwrap() > 0, "{out}");
    drop(restored);
    let _ = std::fs::remove_dir_all(&outside);
}

#[test]
fn delta_restore_refuses_other_directories_and_marks_a_failed_one_unusable() {
    let strata = Strata::new("delta-refusals");
    let pg = Cluster::start_default(15);
    pg.pgbench(DB, &["-i", "-q", "-s", "1"]);
    pg.psql(DB, "CREATE TABLE ledger (id int PRIMARY KEY, note text)");
    let id = "refusedb";
    strata.add_instance(id, &pg);
    strata.backup(id);
    let at_backup = state_digest(&pg, DB);
    let restore_delta = |dir: &Path| {
        strata.run(&[
            "restore",
            id,
            "--target-dir",
            &path_str(dir),
            "--delta",
            "--immediate",
        ])
    };
    let stderr = |o: &std::process::Output| {
        assert!(!o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    // Another cluster (initdb gave it its own system identifier), stopped.
    let mut other = Cluster::start_default(15);
    other.stop();
    let control = std::fs::read(other.data_dir().join("global/pg_control")).unwrap();
    let listing = common::files_under(other.data_dir());
    let err = stderr(&restore_delta(other.data_dir()));
    assert!(
        err.contains("holds the cluster with system identifier"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(other.data_dir().join("global/pg_control")).unwrap(),
        control
    );
    assert_eq!(common::files_under(other.data_dir()), listing);

    // Not a data directory, and a missing one.
    let plain = testkit::temp_dir("strata-delta-plain-");
    std::fs::write(plain.join("notes.txt"), b"mine").unwrap();
    let err = stderr(&restore_delta(&plain));
    assert!(
        err.contains("is not a PostgreSQL data directory (no PG_VERSION)"),
        "{err}"
    );
    assert_eq!(std::fs::read(plain.join("notes.txt")).unwrap(), b"mine");
    let err = stderr(&restore_delta(&plain.join("absent")));
    assert!(err.contains("it does not exist"), "{err}");
    let _ = std::fs::remove_dir_all(&plain);

    // A delta restore that fails half way (the repository's blocks gone)
    // leaves the directory without pg_control and says so; run again, it
    // completes from the marker.
    let mut copy = strata.restore_and_start(id, "copy", 15, &["--immediate"]);
    let dir = copy.data_dir().to_path_buf();
    copy.psql(
        DB,
        "UPDATE pgbench_accounts SET abalance = 1 WHERE aid <= 500",
    );
    copy.stop();
    drop(copy);
    let packs = strata.repo_dir().join("packs");
    let away = strata.repo_dir().join("packs.away");
    std::fs::rename(&packs, &away).unwrap();
    let err = stderr(&restore_delta(&dir));
    std::fs::rename(&away, &packs).unwrap();
    assert!(err.contains("the delta restore left"), "{err}");
    assert!(err.contains("unusable"), "{err}");
    assert!(!dir.join("global/pg_control").exists());
    assert!(dir.join("global/pg_control.strata-delta").exists());

    let (_, restored) = delta_restore(&strata, id, &dir, &["--immediate"]);
    assert_eq!(state_digest(&restored, DB), at_backup);
    assert!(!dir.join("global/pg_control.strata-delta").exists());
}

#[test]
fn delta_restore_of_a_tablespace_goes_where_a_restore_puts_it() {
    let strata = Strata::new("delta-tblspc");
    let pg = Cluster::start_default(15);
    let location = testkit::temp_dir("strata-delta-tblspc-");
    pg.psql(
        DB,
        &format!(
            "CREATE TABLESPACE ts LOCATION '{}'; \
             CREATE TABLE in_ts TABLESPACE ts AS SELECT g, md5(g::text) AS v FROM generate_series(1, 20000) g",
            location.display()
        ),
    );
    let id = "tsdb";
    strata.add_instance(id, &pg);
    strata.backup(id);
    let digest = "SELECT count(*) || ':' || md5(string_agg(g || v, ',' ORDER BY g)) FROM in_ts";
    let at_backup = pg.psql(DB, digest);
    let mut copy = strata.restore_and_start(id, "copy", 15, &["--immediate"]);
    let dir = copy.data_dir().to_path_buf();
    copy.psql(
        DB,
        "UPDATE in_ts SET v = 'changed' WHERE g <= 100; \
         CREATE TABLE also_in_ts TABLESPACE ts AS SELECT g FROM generate_series(1, 1000) g",
    );
    let also = copy.psql(DB, "SELECT pg_relation_filepath('also_in_ts')");
    copy.stop();
    drop(copy);
    let ts_root = PathBuf::from(format!("{}.tblspc", dir.display()));
    let oid_dir = std::fs::read_dir(&ts_root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(oid_dir.join("stray"), b"x").unwrap();
    std::fs::create_dir(ts_root.join("99999")).unwrap();
    let also = dir.join(also);
    assert!(also.exists(), "{}", also.display());

    let (out, restored) = delta_restore(&strata, id, &dir, &["--immediate"]);
    assert_eq!(restored.psql(DB, digest), at_backup, "{out}");
    assert_eq!(
        restored.psql(DB, "SELECT to_regclass('also_in_ts') IS NULL"),
        "t"
    );
    assert!(!also.exists(), "{}", also.display());
    assert!(!oid_dir.join("stray").exists());
    assert!(!ts_root.join("99999").exists());
    assert!(out["delta"]["blocks_reused"].as_u64().unwrap() > 0, "{out}");
    drop(restored);
    let _ = std::fs::remove_dir_all(&location);
    let _ = std::fs::remove_dir_all(&ts_root);
}
