//! Encryption at rest through the command line: a repository created
//! encrypted under a key file, its key rotated to a passphrase and then to
//! another passphrase without rewriting data, old backups restored with the
//! rotated key, and every wrong or missing key refused with a clear message.

mod common;

use common::{files_under, state_digest, Strata};
use testkit::Cluster;

#[test]
fn rotated_key_restores_old_backups_and_wrong_keys_are_refused() {
    let pg = Cluster::start_default(15);
    pg.pgbench("postgres", &["-i", "-q", "-s", "1"]);
    pg.psql(
        "postgres",
        "CREATE TABLE ledger (id int PRIMARY KEY, note text)",
    );
    pg.psql(
        "postgres",
        "INSERT INTO ledger VALUES (1, 'secret-ledger-entry')",
    );
    let keys = testkit::temp_dir("strata-keys-");
    let key_file = keys.join("repo.key");
    std::fs::write(&key_file, format!("{}\n", "9c".repeat(32))).unwrap();
    let with_key_file = format!(
        "[encryption]\nkey_file = {:?}\n",
        key_file.display().to_string()
    );
    let strata = Strata::with_config("enc", "", &with_key_file);
    strata.add_instance("enc", &pg);
    let backup = strata.backup("enc");
    let digest = state_digest(&pg, "postgres");
    assert!(strata.ok(&["repo", "verify"]).contains("clean"));
    for path in files_under(&strata.repo_dir()) {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(19).any(|w| w == b"secret-ledger-entry"),
            "{} holds plaintext",
            path.display()
        );
    }

    // Rotate to a passphrase: the configuration's key file no longer unlocks it.
    let rotated = strata
        .command(&["repo", "rotate-key", "--new-passphrase-env", "NEW_PASS"])
        .env("NEW_PASS", "first passphrase")
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{rotated:?}");
    let err = strata.fails(&["backup", "list", "enc"]);
    assert!(
        err.contains("unlocked by a passphrase, not a key file"),
        "{err}"
    );

    // With the passphrase configured, the old backup restores and matches.
    let with_pass = "[encryption]\npassphrase_env = \"STRATA_TEST_PASS\"\n";
    let strata = strata.reconfigured("", with_pass);
    let run = |pass: &str, args: &[&str]| {
        strata
            .command(args)
            .env("STRATA_TEST_PASS", pass)
            .output()
            .unwrap()
    };
    let out = run(
        "first passphrase",
        &["repo", "rotate-key", "--new-passphrase-env", "NEXT"],
    );
    assert!(!out.status.success(), "NEXT is unset, rotation must refuse");
    let out = strata
        .command(&["repo", "rotate-key", "--new-passphrase-env", "NEXT"])
        .env("STRATA_TEST_PASS", "first passphrase")
        .env("NEXT", "second passphrase")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // The previous passphrase is now wrong: refused, nothing decrypted.
    let out = run("first passphrase", &["backup", "list", "enc"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not unlock repository") && err.contains("wrong key or passphrase"),
        "{err}"
    );
    let out = strata.command(&["backup", "list", "enc"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("STRATA_TEST_PASS is not set"),
        "{out:?}"
    );

    let target = strata.dir.join("restored");
    let port = testkit::free_port();
    let out = run(
        "second passphrase",
        &[
            "restore",
            "enc",
            "--backup",
            &backup,
            "--target-dir",
            &target.display().to_string(),
            "--start",
            "--port",
            &port.to_string(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let restored = Cluster::adopt(15, target, port);
    assert_eq!(state_digest(&restored, "postgres"), digest);
    drop(restored);
    let out = run("second passphrase", &["repo", "verify"]);
    assert!(out.status.success(), "{out:?}");

    // A key configured for a repository created without encryption is refused.
    let plain = Strata::new("enc-plain");
    plain.ok(&["instance", "list"]);
    let plain = plain.reconfigured("", &with_key_file);
    let err = plain.fails(&["instance", "list"]);
    assert!(err.contains("is not encrypted"), "{err}");
    let _ = std::fs::remove_dir_all(&keys);
}
