//! A repository in Google Cloud Storage, end to end: `strata backup create`
//! from a real PostgreSQL 15 server into a fake-gcs-server bucket, `strata
//! restore` from it, the restored server started and its rows compared, and
//! `strata repo verify` run on it.

mod common;

use common::Strata;
use strata_repo::{GcsConfig, GcsStorage, Storage};
use testkit::FakeGcs;

#[test]
fn backup_and_restore_through_google_cloud_storage() {
    let gcs = FakeGcs::start();
    let strata = Strata::on_gcs("gcs-e2e", &gcs, "");
    let pg = testkit::shared_cluster(15);
    let db = "gcs_e2e";
    pg.psql("postgres", &format!("CREATE DATABASE {db}"));
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, note text); \
         INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
    );
    let digest = |sql_db: &str, c: &testkit::Cluster| {
        c.psql(
            sql_db,
            "SELECT count(*) || ':' || md5(string_agg(id || '=' || note, ',' ORDER BY id)) FROM items",
        )
    };
    let at_backup = digest(db, pg);
    let id = "gcs";
    strata.add_instance(id, pg);
    let set = strata.backup(id);
    assert_eq!(strata.backups(id).len(), 1, "backup {set} not listed");
    // Changed after the backup: the restore must not see it.
    pg.psql(db, "DELETE FROM items WHERE id <= 100");

    let restored = strata.restore_and_start(id, "gcs", 15, &["--immediate"]);
    assert_eq!(digest(db, &restored), at_backup);
    assert!(at_backup.starts_with("2000:"), "{at_backup}");
    strata.ok(&["repo", "verify"]);

    // Everything went to the bucket under the prefix, nothing to the data directory.
    let mut config = GcsConfig::from_url(&format!("gs://{}", FakeGcs::BUCKET)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(gcs.endpoint());
    let bucket = GcsStorage::new(config).unwrap();
    let objects = bucket.list("gcs-e2e").unwrap();
    assert!(objects.iter().any(|k| k.ends_with(".pack")), "{objects:?}");
    assert!(
        objects.iter().any(|k| k.ends_with(".manifest")),
        "{objects:?}"
    );
    assert!(bucket.exists("gcs-e2e/strata-repo.json").unwrap());
    assert!(!strata.repo_dir().exists());

    // A damaged pack is what verify is for: it must say so.
    let pack = objects.iter().find(|k| k.ends_with(".pack")).unwrap();
    let mut bytes = bucket.get(pack).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    bucket.put(pack, &bytes).unwrap();
    let out = strata.run(&["repo", "verify"]);
    assert!(!out.status.success(), "verify passed a damaged pack");
    pg.psql("postgres", &format!("DROP DATABASE {db}"));
}
