//! Repositories in Azure Blob Storage (Azurite) and Google Cloud Storage
//! (fake-gcs-server), end to end: `strata backup create` from a real
//! PostgreSQL 15 server into the store, `strata restore` from it, the restored
//! server started and its rows compared, everything found under the prefix in
//! the store and nothing in the data directory, and `strata repo verify`
//! passing, then failing on a damaged pack.

mod common;

use common::Strata;
use strata_repo::{AzureConfig, AzureStorage, GcsConfig, GcsStorage, Storage};
use testkit::{Azurite, FakeGcs};

/// Backs up the shared PostgreSQL 15 server as instance `id` through
/// `strata` (whose repository is `store`'s `prefix`), restores, compares and
/// verifies.
fn round_trip(strata: &Strata, store: &dyn Storage, prefix: &str, id: &str) {
    let db = format!("{id}_e2e");
    let db = db.as_str();
    let pg = testkit::shared_cluster(15);
    pg.psql("postgres", &format!("CREATE DATABASE {db}"));
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, note text); \
         INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
    );
    let digest = |c: &testkit::Cluster| {
        c.psql(
            db,
            "SELECT count(*) || ':' || md5(string_agg(id || '=' || note, ',' ORDER BY id)) FROM items",
        )
    };
    let at_backup = digest(pg);
    strata.add_instance(id, pg);
    let set = strata.backup(id);
    assert_eq!(strata.backups(id).len(), 1, "backup {set} not listed");
    // Changed after the backup: the restore must not see it.
    pg.psql(db, "DELETE FROM items WHERE id <= 100");

    let restored = strata.restore_and_start(id, id, 15, &["--immediate"]);
    assert_eq!(digest(&restored), at_backup);
    assert!(at_backup.starts_with("2000:"), "{at_backup}");
    strata.ok(&["repo", "verify"]);

    // Everything went to the store under the prefix, nothing to the data directory.
    let objects = store.list(prefix).unwrap();
    assert!(objects.iter().any(|k| k.ends_with(".pack")), "{objects:?}");
    assert!(
        objects.iter().any(|k| k.ends_with(".manifest")),
        "{objects:?}"
    );
    assert!(store.exists(&format!("{prefix}/strata-repo.json")).unwrap());
    assert!(!strata.repo_dir().exists());

    // A damaged pack is what verify is for: it must say so.
    let pack = objects.iter().find(|k| k.ends_with(".pack")).unwrap();
    let mut bytes = store.get(pack).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    store.put(pack, &bytes).unwrap();
    let out = strata.run(&["repo", "verify"]);
    assert!(!out.status.success(), "verify passed a damaged pack");
    pg.psql("postgres", &format!("DROP DATABASE {db}"));
}

#[test]
fn backup_and_restore_through_azure_blob_storage() {
    let azurite = Azurite::start();
    let strata = Strata::on_azure("azure-e2e", &azurite, "");
    let mut config = AzureConfig::from_url(&format!("azure://{}", Azurite::CONTAINER)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(azurite.endpoint());
    let container = AzureStorage::new(config).unwrap();
    round_trip(&strata, &container, "azure-e2e", "azure");
}

#[test]
fn backup_and_restore_through_google_cloud_storage() {
    let gcs = FakeGcs::start();
    let strata = Strata::on_gcs("gcs-e2e", &gcs, "");
    let mut config = GcsConfig::from_url(&format!("gs://{}", FakeGcs::BUCKET)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(gcs.endpoint());
    let bucket = GcsStorage::new(config).unwrap();
    round_trip(&strata, &bucket, "gcs-e2e", "gcs");
}
