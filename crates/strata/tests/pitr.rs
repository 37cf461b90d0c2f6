//! The core round trip (backup under pgbench load with concurrent DDL, WAL
//! archiving, restores to latest, time, LSN, xid and restore point compared
//! row by row) with the repository in a local directory, on a real S3 server
//! (s3s-fs), and on S3 with encryption at rest.

mod common;

use common::{files_under, pitr_round_trip, Strata};
use testkit::S3Server;

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
