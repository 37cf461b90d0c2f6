//! A repository in Azure Blob Storage, end to end: `strata backup create`
//! from a real PostgreSQL 15 server into an Azurite container, `strata
//! restore` from it, the restored server started and its rows compared.

mod common;

use common::Strata;
use strata_repo::{AzureConfig, AzureStorage, Storage};
use testkit::Azurite;

#[test]
fn backup_and_restore_through_azure_blob_storage() {
    let azurite = Azurite::start();
    let strata = Strata::on_azure("azure-e2e", &azurite, "");
    let pg = testkit::shared_cluster(15);
    let db = "azure_e2e";
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
    let id = "azure";
    strata.add_instance(id, pg);
    let set = strata.backup(id);
    assert_eq!(strata.backups(id).len(), 1, "backup {set} not listed");
    // Changed after the backup: the restore must not see it.
    pg.psql(db, "DELETE FROM items WHERE id <= 100");

    let restored = strata.restore_and_start(id, "azure", 15, &["--immediate"]);
    assert_eq!(digest(db, &restored), at_backup);
    assert!(at_backup.starts_with("2000:"), "{at_backup}");
    strata.ok(&["repo", "verify"]);

    // Everything went to the container under the prefix, nothing to the data directory.
    let mut config = AzureConfig::from_url(&format!("azure://{}", Azurite::CONTAINER)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(azurite.endpoint());
    let container = AzureStorage::new(config).unwrap();
    let blobs = container.list("azure-e2e").unwrap();
    assert!(blobs.iter().any(|k| k.ends_with(".pack")), "{blobs:?}");
    assert!(blobs.iter().any(|k| k.ends_with(".manifest")), "{blobs:?}");
    assert!(container.exists("azure-e2e/strata-repo.json").unwrap());
    assert!(!strata.repo_dir().exists());
    pg.psql("postgres", &format!("DROP DATABASE {db}"));
}
