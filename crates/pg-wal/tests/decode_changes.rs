//! What committed transactions did that can destroy data, as the decoder reports it, checked
//! against real SQL on real clusters of every supported PostgreSQL version: the relation files
//! and database OIDs come from the server itself (`pg_relation_filenode`, `pg_database`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use pg_wal::decode::{RelFile, TxnChanges, WalDecoder, WalEvent};
use pg_wal::{parse_size_setting, Lsn, WalGeometry};
use testkit::Cluster;

/// `pg_default`'s OID: the tablespace of every relation here.
const DEFAULT_TABLESPACE: u32 = 1663;

struct Db {
    cluster: Cluster,
    oid: u32,
}

impl Db {
    fn start(major: u32) -> Db {
        // Keep every segment, so the whole test's WAL is still there to decode.
        let cluster = Cluster::builder(major)
            .conf("wal_keep_size = '1GB'")
            .conf("max_prepared_transactions = 4")
            .start();
        let oid = cluster
            .psql(
                "postgres",
                "SELECT oid FROM pg_database WHERE datname = 'postgres'",
            )
            .parse()
            .expect("database oid");
        Db { cluster, oid }
    }

    fn sql(&self, sql: &str) -> String {
        self.cluster.psql("postgres", sql)
    }

    /// Runs `body` in one transaction and returns its xid, taken at the end so that the body
    /// is what first needs one.
    fn xid_of(&self, body: &str, end: &str) -> u32 {
        let out = self.sql(&format!("BEGIN; {body}; SELECT txid_current(); {end};"));
        let txid: u64 = out
            .lines()
            .last()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("txid from {out:?}"));
        (txid & 0xFFFF_FFFF) as u32
    }

    fn file(&self, table: &str) -> RelFile {
        let rel = self
            .sql(&format!("SELECT pg_relation_filenode('{table}')"))
            .parse()
            .expect("filenode");
        RelFile {
            spc: DEFAULT_TABLESPACE,
            db: self.oid,
            rel,
        }
    }

    fn lsn(&self) -> Lsn {
        self.sql("SELECT pg_current_wal_lsn()")
            .parse()
            .expect("lsn")
    }

    /// Everything decoded from the segment holding `from` to the end of the current one.
    fn decode_since(&self, from: Lsn) -> Vec<WalEvent> {
        let geometry = WalGeometry::new(
            parse_size_setting(&self.sql("SHOW wal_segment_size")).expect("segment size"),
        )
        .expect("geometry");
        let end: Lsn = self.sql("SELECT pg_switch_wal()").parse().expect("lsn");
        let (first, last) = (geometry.segment_of(from), geometry.segment_of(end));
        let dir = self.cluster.data_dir().join("pg_wal");
        let mut files: Vec<(_, PathBuf)> = std::fs::read_dir(&dir)
            .expect("list pg_wal")
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let (_, seg) = geometry.parse_segment_file_name(path.file_name()?.to_str()?)?;
                (seg >= first && seg <= last).then_some((seg, path))
            })
            .collect();
        files.sort();
        assert_eq!(files.first().map(|f| f.0), Some(first), "segments kept");
        let mut decoder = WalDecoder::new(geometry, geometry.segment_start(first));
        let mut events = Vec::new();
        for (_, path) in files {
            let bytes = std::fs::read(&path).expect("read segment");
            for chunk in bytes.chunks(5000) {
                events.extend(decoder.feed(chunk).expect("decode"));
            }
        }
        events
    }
}

/// Commits by xid.
fn commits(events: &[WalEvent]) -> BTreeMap<u32, Option<TxnChanges>> {
    events
        .iter()
        .filter_map(|e| match e {
            WalEvent::Commit { xid, changes, .. } => Some((*xid, changes.as_deref().cloned())),
            _ => None,
        })
        .collect()
}

fn changes_of(commits: &BTreeMap<u32, Option<TxnChanges>>, xid: u32, what: &str) -> TxnChanges {
    match commits.get(&xid) {
        Some(Some(changes)) => changes.clone(),
        Some(None) => panic!("{what}: commit of xid {xid} reports no changes"),
        None => panic!("{what}: no commit of xid {xid}"),
    }
}

fn rows(changes: &TxnChanges, file: RelFile) -> (u64, u64) {
    changes
        .rows
        .iter()
        .find(|r| r.rel == file)
        .map_or((0, 0), |r| (r.deleted, r.updated))
}

fn check(major: u32) {
    let db = Db::start(major);
    for table in [
        "t_drop", "t_trunc", "t_vac", "t_del", "t_upd", "t_small", "t_rb", "t_sp", "t_ren",
        "t_ins", "t_2pc",
    ] {
        db.sql(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text); \
             INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 600) g"
        ));
    }
    db.sql("CREATE DATABASE doomed");
    let doomed: u32 = db
        .sql("SELECT oid FROM pg_database WHERE datname = 'doomed'")
        .parse()
        .expect("oid");
    let from = db.lsn();

    let drop_file = db.file("t_drop");
    let drop_xid = db.xid_of("DROP TABLE t_drop", "COMMIT");

    let trunc_old = db.file("t_trunc");
    let trunc_xid = db.xid_of("TRUNCATE t_trunc", "COMMIT");
    let trunc_new = db.file("t_trunc");

    // VACUUM cannot run in a transaction block: its commit is found by the file it drops.
    let vac_old = db.file("t_vac");
    db.sql("VACUUM FULL t_vac");
    let vac_new = db.file("t_vac");

    let del_file = db.file("t_del");
    let del_xid = db.xid_of(
        "DELETE FROM t_del WHERE id <= 300; SAVEPOINT a; \
         DELETE FROM t_del WHERE id > 300 AND id <= 500; RELEASE a",
        "COMMIT",
    );
    let upd_file = db.file("t_upd");
    let upd_xid = db.xid_of(
        "UPDATE t_upd SET note = 'changed' WHERE id <= 300",
        "COMMIT",
    );
    let small_file = db.file("t_small");
    let small_xid = db.xid_of("DELETE FROM t_small WHERE id <= 10", "COMMIT");
    let rb_xid = db.xid_of("DELETE FROM t_rb", "ROLLBACK");
    let sp_file = db.file("t_sp");
    let sp_xid = db.xid_of(
        "DELETE FROM t_sp WHERE id <= 10; SAVEPOINT s; DELETE FROM t_sp WHERE id > 10; \
         ROLLBACK TO s",
        "COMMIT",
    );
    db.sql("DROP DATABASE doomed");
    let ren_file = db.file("t_ren");
    let ren_xid = db.xid_of("ALTER TABLE t_ren RENAME TO t_renamed", "COMMIT");
    let ins_xid = db.xid_of("INSERT INTO t_ins VALUES (1000, 'new')", "COMMIT");
    // Two-phase: the commit comes later, from another session, and names the prepared xid.
    let twopc_file = db.file("t_2pc");
    let twopc_xid = db.xid_of(
        "DELETE FROM t_2pc WHERE id <= 5; SAVEPOINT a; \
         DELETE FROM t_2pc WHERE id > 5 AND id <= 8; RELEASE a",
        "PREPARE TRANSACTION 'p1'",
    );
    // Rows p1 does not hold: a prepared transaction keeps its row locks.
    let twopc_rb_xid = db.xid_of("DELETE FROM t_2pc WHERE id > 8", "PREPARE TRANSACTION 'p2'");
    db.sql("COMMIT PREPARED 'p1'");
    db.sql("ROLLBACK PREPARED 'p2'");

    let events = db.decode_since(from);
    let commits = commits(&events);

    let dropped = changes_of(&commits, drop_xid, "DROP TABLE");
    assert!(dropped.dropped.contains(&drop_file), "{dropped:?}");
    assert_eq!(dropped.db, Some(db.oid));
    assert!(dropped.catalog_changed);

    let truncated = changes_of(&commits, trunc_xid, "TRUNCATE");
    assert_ne!(trunc_old, trunc_new);
    assert!(truncated.dropped.contains(&trunc_old), "{truncated:?}");
    assert!(truncated.created.contains(&trunc_new), "{truncated:?}");
    assert!(!truncated.filled.contains(&trunc_new), "{truncated:?}");

    let vacuumed: Vec<&TxnChanges> = commits
        .values()
        .flatten()
        .filter(|c| c.dropped.contains(&vac_old))
        .collect();
    assert_eq!(vacuumed.len(), 1, "VACUUM FULL commits: {vacuumed:?}");
    assert!(vacuumed[0].created.contains(&vac_new), "{vacuumed:?}");
    assert!(vacuumed[0].filled.contains(&vac_new), "{vacuumed:?}");
    // Written as page images, not row by row.
    assert!(!vacuumed[0].loaded.contains(&vac_new), "{vacuumed:?}");

    let deleted = changes_of(&commits, del_xid, "DELETE with a savepoint");
    assert_eq!(rows(&deleted, del_file), (500, 0));
    assert!(deleted.dropped.is_empty() && deleted.created.is_empty());
    assert!(!deleted.catalog_changed);

    let updated = changes_of(&commits, upd_xid, "UPDATE");
    assert_eq!(rows(&updated, upd_file), (0, 300));

    let small = changes_of(&commits, small_xid, "small DELETE");
    assert_eq!(small.rows.len(), 1, "{small:?}");
    assert_eq!(rows(&small, small_file), (10, 0));

    assert!(!commits.contains_key(&rb_xid), "rolled back, yet committed");
    assert!(events
        .iter()
        .any(|e| matches!(e, WalEvent::Abort { xid, .. } if *xid == rb_xid)));

    let savepoint = changes_of(&commits, sp_xid, "rolled-back savepoint");
    assert_eq!(rows(&savepoint, sp_file), (10, 0));

    let dropped_db: Vec<&TxnChanges> = commits
        .values()
        .flatten()
        .filter(|c| !c.dropped_databases.is_empty())
        .collect();
    assert_eq!(dropped_db.len(), 1, "{dropped_db:?}");
    assert_eq!(dropped_db[0].dropped_databases, vec![doomed]);
    // Every supported release marks the database invalid in place first.
    assert!(dropped_db[0].drop_database_lsn.is_some(), "{dropped_db:?}");

    let renamed = changes_of(&commits, ren_xid, "RENAME");
    assert!(renamed.catalog_changed);
    assert!(renamed.dropped.is_empty(), "{renamed:?}");
    assert_eq!(rows(&renamed, ren_file), (0, 0));

    assert_eq!(commits.get(&ins_xid), Some(&None), "INSERT-only commit");

    let prepared = changes_of(&commits, twopc_xid, "COMMIT PREPARED");
    assert_eq!(rows(&prepared, twopc_file), (8, 0));
    assert!(
        !commits.contains_key(&twopc_rb_xid),
        "ROLLBACK PREPARED, yet committed"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, WalEvent::Abort { xid, .. } if *xid == twopc_rb_xid)));
}

#[test]
fn reports_destructive_changes_pg14() {
    check(14);
}

#[test]
fn reports_destructive_changes_pg15() {
    check(15);
}

#[test]
fn reports_destructive_changes_pg16() {
    check(16);
}

#[test]
fn reports_destructive_changes_pg17() {
    check(17);
}

#[test]
fn reports_destructive_changes_pg18() {
    check(18);
}
