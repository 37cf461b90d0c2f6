//! The core round trip (backup under pgbench load with concurrent DDL, WAL
//! archiving, restores to latest, time, LSN, xid and restore point compared
//! row by row) with the repository in a local directory, on a real S3 server
//! (s3s-fs), on a Google Cloud Storage emulator (fake-gcs-server), on an Azure
//! Blob Storage emulator (Azurite), and on S3
//! with encryption at rest; and a destructive
//! transaction committed while a backup ran, undone.

mod common;

use std::time::{Duration, Instant};

use common::{files_under, pitr_round_trip, Strata};
use strata_repo::{AzureConfig, AzureStorage, GcsConfig, GcsStorage, Storage};
use testkit::{Azurite, Cluster, FakeGcs, S3Server};

#[test]
fn pitr_under_load_with_ddl() {
    let strata = Strata::new("pitr");
    pitr_round_trip(&strata, "pitr");
}

#[test]
fn pitr_under_load_on_s3() {
    let s3 = S3Server::start();
    let strata = Strata::on_s3("pitr-s3", &s3, "");
    pitr_round_trip(&strata, "pitr-s3");
    // Everything went to the bucket under the prefix, nothing to the data directory.
    let objects = files_under(&s3.bucket_dir(S3Server::BUCKET).join("pitr-s3"));
    assert!(objects
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".pack")));
    assert!(objects
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".manifest")));
    assert!(!strata.repo_dir().exists());
}

/// Backups and archived WAL went to `store`, nothing to the data directory.
fn assert_holds_the_repository(store: &dyn Storage, strata: &Strata) {
    let objects = store.list("").unwrap();
    assert!(objects.iter().any(|k| k.ends_with(".pack")), "{objects:?}");
    assert!(
        objects.iter().any(|k| k.ends_with(".manifest")),
        "{objects:?}"
    );
    assert!(objects.iter().any(|k| k.contains("/wal/")), "{objects:?}");
    assert!(!strata.repo_dir().exists());
}

#[test]
fn pitr_under_load_on_gcs() {
    let gcs = FakeGcs::start();
    let strata = Strata::on_gcs("pitr-gcs", &gcs, "");
    pitr_round_trip(&strata, "pitr-gcs");
    let mut config = GcsConfig::from_url(&format!("gs://{}/pitr-gcs", FakeGcs::BUCKET)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(gcs.endpoint());
    assert_holds_the_repository(&GcsStorage::new(config).unwrap(), &strata);
}

#[test]
fn pitr_under_load_on_azure() {
    let azurite = Azurite::start();
    let strata = Strata::on_azure("pitr-azure", &azurite, "");
    pitr_round_trip(&strata, "pitr-azure");
    let mut config =
        AzureConfig::from_url(&format!("azure://{}/pitr-azure", Azurite::CONTAINER)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(azurite.endpoint());
    assert_holds_the_repository(&AzureStorage::new(config).unwrap(), &strata);
}

#[test]
fn pitr_under_load_on_s3_encrypted() {
    let s3 = S3Server::start();
    let key = testkit::temp_dir("strata-key-").join("repo.key");
    std::fs::write(
        &key,
        "6f1d0c5e2b8a47d39e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d\n",
    )
    .unwrap();
    let strata = Strata::on_s3(
        "pitr-s3-enc",
        &s3,
        &format!("[encryption]\nkey_file = {:?}\n", key.display().to_string()),
    );
    pitr_round_trip(&strata, "pitr-enc");
    // Every object is sealed: format 2 in the configuration, version 2
    // envelopes and packs, no hash key in the clear.
    let root = s3.bucket_dir(S3Server::BUCKET).join("pitr-s3-enc");
    let config = std::fs::read_to_string(root.join("strata-repo.json")).unwrap();
    assert!(config.contains("\"format_version\": 2"), "{config}");
    assert!(config.contains("xchacha20-poly1305") && !config.contains("hash_key"));
    let objects = files_under(&root);
    assert!(objects.len() > 5);
    for path in objects.iter().filter(|p| !p.ends_with("strata-repo.json")) {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            (bytes.starts_with(b"STRATAOB") || bytes.starts_with(b"STRATAPK"))
                && bytes[8..10] == [2, 0],
            "{} is not an encrypted object",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(key.parent().unwrap());
}

/// A transaction that deletes a table's rows commits while a (throttled)
/// backup streams its files. That set ends after the commit, in the same
/// WAL segment: it cannot stop just before the transaction (recovery is
/// not consistent there yet), so the restore takes the set before it,
/// and the table comes back as committed just before the transaction.
#[test]
fn just_before_a_transaction_committed_during_a_backup() {
    let strata = Strata::new("pitr-during");
    let pg = Cluster::start_default(15);
    let db = "postgres";
    let digest = |c: &Cluster| {
        c.psql(
            db,
            "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM t1 t",
        )
    };
    pg.psql(
        db,
        "CREATE EXTENSION pg_walinspect; \
         CREATE TABLE t1 (id int PRIMARY KEY, note text); \
         INSERT INTO t1 SELECT g, md5(g::text) FROM generate_series(1, 40) g",
    );
    let id = "during";
    strata.add_instance(id, &pg);
    let mut receiver = strata.wal_receiver(id);
    let before = strata.backup(id);
    pg.psql(
        db,
        "UPDATE t1 SET note = 'after the first backup' WHERE id % 3 = 0",
    );

    let (during, pre, xid, start) = std::thread::scope(|s| {
        let backup = s.spawn(|| strata.ok(&["backup", "create", id, "--max-rate", "2048"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while pg.psql(
            db,
            "SELECT count(*) FROM pg_stat_progress_basebackup WHERE phase = 'streaming database files'",
        ) != "1"
        {
            assert!(Instant::now() < deadline, "the backup never streamed files");
            std::thread::sleep(Duration::from_millis(20));
        }
        let pre = digest(&pg);
        let start = pg.psql(db, "SELECT pg_current_wal_insert_lsn()");
        let out = pg.psql(
            db,
            "BEGIN; DELETE FROM t1; SELECT txid_current() % 4294967296; COMMIT;",
        );
        let xid = out
            .lines()
            .find(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()))
            .expect("the transaction's xid")
            .to_string();
        let during = backup.join().expect("backup thread");
        let during = during
            .lines()
            .last()
            .expect("backup id line")
            .trim()
            .to_string();
        (during, pre, xid, start)
    });
    pg.psql(db, "INSERT INTO t1 VALUES (1001, 'after T')");
    let commit: pg_wal::Lsn = pg
        .psql(
            db,
            &format!(
                "SELECT start_lsn FROM pg_get_wal_records_info('{start}', pg_current_wal_flush_lsn()) \
                 WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT' AND xid = '{xid}'"
            ),
        )
        .parse()
        .expect("the commit record's LSN");
    // The premise: the second set started before the commit and ended after it.
    let sets = strata.backups(id);
    let lsn = |id: &str, field: &str| -> pg_wal::Lsn {
        let set = sets.iter().find(|b| b["id"] == id).expect("the set");
        set[field].as_str().expect(field).parse().expect("an LSN")
    };
    assert!(
        lsn(&during, "start_lsn") < commit && commit < lsn(&during, "stop_lsn"),
        "the transaction (committed at {commit}) did not commit during backup {during}: {sets:?}"
    );
    assert!(lsn(&before, "stop_lsn") < commit);

    let end_lsn: pg_wal::Lsn = pg
        .psql(
            db,
            "SELECT pg_switch_wal(); SELECT pg_current_wal_insert_lsn()",
        )
        .lines()
        .last()
        .expect("an LSN")
        .parse()
        .expect("an LSN");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !strata.wal(id).iter().any(|w| {
        w["end_lsn"]
            .as_str()
            .unwrap()
            .parse::<pg_wal::Lsn>()
            .unwrap()
            >= end_lsn
    }) {
        assert!(
            Instant::now() < deadline,
            "WAL not archived up to {end_lsn}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    receiver.stop();

    let restored = strata.restore_and_start(id, "before-t", 15, &["--xid", &xid, "--exclusive"]);
    assert_eq!(digest(&restored), pre);
    let restored = strata.restore_and_start(id, "after-t", 15, &["--xid", &xid]);
    assert_eq!(digest(&restored), "0:");
    let restored = strata.restore_and_start(
        id,
        "before-commit-lsn",
        15,
        &["--lsn", &commit.to_string(), "--exclusive"],
    );
    assert_eq!(digest(&restored), pre);
    // The set taken during the transaction, asked for by name, is refused
    // before anything is written.
    let dir = strata.repo_dir().with_file_name("restore-refused");
    let err = strata.fails(&[
        "restore",
        id,
        "--target-dir",
        &dir.display().to_string(),
        "--backup",
        &during,
        "--xid",
        &xid,
        "--exclusive",
    ]);
    assert!(
        err.contains(&format!("just before transaction {xid} (committed at {commit}) is before the end of backup {during}")),
        "{err}"
    );
    assert!(!dir.exists());
}
