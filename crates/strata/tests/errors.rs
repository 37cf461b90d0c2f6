//! Bad input and broken servers: every case must end with one clear
//! `error: ` line on stderr, a non-zero exit and nothing recorded as a
//! success. Unknown instances, an unreachable host, a wrong password, a role
//! without REPLICATION, wal_level = minimal, no free replication slot,
//! impossible restore targets, a repository from a newer Strata and an
//! unknown sslmode.

mod common;

use std::process::Command;

use common::{add_args, path_str, Strata};
use testkit::Cluster;

/// Runs `cmd`, expects it to fail and returns its error line. Progress lines
/// may precede it, but the error must be a single line and the last one: a
/// continuation line would show up after it.
fn error_of(mut cmd: Command) -> String {
    let out = cmd.output().expect("run strata");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{cmd:?}: expected one error line:\n{stderr}"
    );
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert_eq!(
        last, errors[0],
        "{cmd:?}: the error spans several lines:\n{stderr}"
    );
    assert!(last.starts_with("error: "), "{last}");
    last.to_string()
}

/// Expects `strata args` to fail with an error line containing `needle`.
fn fails_with(strata: &Strata, args: &[&str], needle: &str) -> String {
    let line = error_of(strata.command(args));
    assert!(
        line.contains(needle),
        "strata {args:?}: {needle:?} not in {line:?}"
    );
    line
}

fn successes(strata: &Strata, id: &str) -> usize {
    strata
        .backups(id)
        .iter()
        .filter(|b| b["status"] == "Success")
        .count()
}

/// Asserts the instance's only backup set failed, recording an error that
/// contains `needle`.
fn assert_one_failed_backup(strata: &Strata, id: &str, needle: &str) {
    let sets = strata.backups(id);
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0]["status"], "Failed", "{sets:?}");
    let error = sets[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains(needle), "{needle:?} not in {error:?}");
}

/// Runs `args` with the right password in STRATA_TEST_PW; it must succeed.
fn succeeds_with_password(strata: &Strata, args: &[&str], what: &str) {
    let out = strata
        .command(args)
        .env("STRATA_TEST_PW", "right")
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn instances(strata: &Strata) -> Vec<serde_json::Value> {
    serde_json::from_str(&strata.ok(&["instance", "list", "--json"])).unwrap()
}

#[test]
fn unknown_instance() {
    let strata = Strata::new("err-unknown");
    let target = strata.dir.join("restore-nope");
    let target_s = path_str(&target);
    for args in [
        &["backup", "create", "nope"][..],
        &["backup", "list", "nope"],
        &["wal", "list", "nope"],
        &["restore", "nope", "--target-dir", &target_s],
    ] {
        fails_with(&strata, args, "instance \"nope\" not found");
    }
    assert!(
        !target.exists(),
        "restore of an unknown instance created its target"
    );
    assert!(instances(&strata).is_empty());
}

/// An sslmode libpq does not know is refused before anything is recorded,
/// with the accepted values named.
#[test]
fn unknown_sslmode() {
    let strata = Strata::new("err-sslmode");
    let mut add = add_args("tls", "5432", "postgres");
    add.extend(["--sslmode", "verify-none"]);
    let line = fails_with(&strata, &add, "invalid sslmode \"verify-none\"");
    assert!(
        line.contains("disable, allow, prefer, require, verify-ca or verify-full"),
        "{line}"
    );
    assert!(instances(&strata).is_empty());
}

#[test]
fn unreachable_host() {
    let strata = Strata::new("err-unreachable");
    let port = testkit::free_port().to_string();
    let add = add_args("down", &port, "postgres");
    fails_with(&strata, &add, "cannot reach");
    assert!(
        instances(&strata).is_empty(),
        "a failed check registered the instance"
    );

    strata.ok(&[&add[..], &["--no-check"]].concat());
    fails_with(&strata, &["backup", "create", "down"], "cannot reach");
    assert_one_failed_backup(&strata, "down", "cannot reach");
}

#[test]
fn wrong_password_is_refused_and_right_one_works_with_scram() {
    let pg = Cluster::builder(15).auth_method("scram-sha-256").start();
    pg.psql(
        "postgres",
        "CREATE ROLE r LOGIN REPLICATION PASSWORD 'right'",
    );
    let strata = Strata::new("err-password");
    let port = pg.port().to_string();
    let add = [
        &add_args("scram", &port, "r")[..],
        &["--password-env", "STRATA_TEST_PW"],
    ]
    .concat();
    let mut cmd = strata.command(&add);
    cmd.env("STRATA_TEST_PW", "wrong");
    assert!(error_of(cmd).contains("authentication failed"));
    assert!(instances(&strata).is_empty());

    succeeds_with_password(&strata, &add, "instance add with the right password");

    let backup = ["backup", "create", "scram"];
    let mut cmd = strata.command(&backup);
    cmd.env("STRATA_TEST_PW", "wrong");
    assert!(error_of(cmd).contains("authentication failed"));
    assert_one_failed_backup(&strata, "scram", "authentication failed");

    let mut cmd = strata.command(&backup);
    cmd.env_remove("STRATA_TEST_PW");
    let line = error_of(cmd);
    assert!(
        line.contains("STRATA_TEST_PW") && line.contains("not set"),
        "{line}"
    );
    assert_eq!(successes(&strata, "scram"), 0);

    succeeds_with_password(&strata, &backup, "backup with the right password");
    assert_eq!(successes(&strata, "scram"), 1);

    // A catalog rebuilt from this unencrypted repository does not take the
    // variable's name from the instance's record: whoever can write there
    // could have named another. No password is sent until it is named again.
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(strata.dir.join("data").join(f));
    }
    let out = strata
        .command(&["repo", "reindex"])
        .output()
        .expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "reindex: {stderr}");
    assert!(
        stderr.contains(
            "warning: instance scram: registered without its password variable STRATA_TEST_PW"
        ) && stderr.contains(&format!("127.0.0.1:{port} as r with sslmode=prefer"))
            && stderr.contains("strata instance modify scram --password-env STRATA_TEST_PW"),
        "{stderr}"
    );
    assert_eq!(
        instances(&strata)[0]["password_env"],
        serde_json::Value::Null
    );
    let mut cmd = strata.command(&backup);
    cmd.env("STRATA_TEST_PW", "right");
    assert!(error_of(cmd).contains("password"));
    assert_eq!(successes(&strata, "scram"), 1);

    fails_with(
        &strata,
        &["instance", "modify", "scram"],
        "nothing to change",
    );
    // The recorded sslmode can be changed too; a bad one changes nothing.
    fails_with(
        &strata,
        &[
            "instance",
            "modify",
            "scram",
            "--password-env",
            "STRATA_TEST_PW",
            "--sslmode",
            "sometimes",
        ],
        "sometimes",
    );
    assert_eq!(
        instances(&strata)[0]["password_env"],
        serde_json::Value::Null
    );
    strata.ok(&["instance", "modify", "scram", "--sslmode", "disable"]);
    assert_eq!(instances(&strata)[0]["sslmode"], "disable");
    fails_with(
        &strata,
        &[
            "instance",
            "modify",
            "scram",
            "--password-env",
            "STRATA_TEST_PW;x",
        ],
        "not an environment variable name",
    );
    fails_with(
        &strata,
        &[
            "instance",
            "modify",
            "nobody",
            "--password-env",
            "STRATA_TEST_PW",
        ],
        "nobody",
    );
    strata.ok(&[
        "instance",
        "modify",
        "scram",
        "--password-env",
        "STRATA_TEST_PW",
    ]);
    assert_eq!(instances(&strata)[0]["password_env"], "STRATA_TEST_PW");
    succeeds_with_password(&strata, &backup, "backup once the variable is named again");
    assert_eq!(successes(&strata, "scram"), 2);
}

#[test]
fn role_without_replication() {
    let pg = testkit::shared_cluster(15);
    pg.psql("postgres", "CREATE ROLE strata_norepl LOGIN");
    let strata = Strata::new("err-norepl");
    let port = pg.port().to_string();
    let add = add_args("norepl", &port, "strata_norepl");
    fails_with(&strata, &add, "REPLICATION");
    assert!(instances(&strata).is_empty());

    strata.ok(&[&add[..], &["--no-check"]].concat());
    fails_with(&strata, &["backup", "create", "norepl"], "REPLICATION");
    assert_one_failed_backup(&strata, "norepl", "REPLICATION");
}

#[test]
fn wal_level_minimal() {
    let pg = Cluster::builder(15).wal_level("minimal").start();
    assert_eq!(pg.psql("postgres", "SHOW max_wal_senders"), "0");
    let strata = Strata::new("err-minimal");
    let port = pg.port().to_string();
    let add = add_args("minimal", &port, "postgres");
    let line = error_of(strata.command(&add));
    assert!(
        line.contains("wal_level") || line.contains("max_wal_senders"),
        "{line}"
    );
    assert!(instances(&strata).is_empty());

    strata.ok(&[&add[..], &["--no-check"]].concat());
    let line = error_of(strata.command(&["backup", "create", "minimal"]));
    assert!(line.contains("wal_level"), "{line}");
    assert_one_failed_backup(&strata, "minimal", "wal_level");
}

#[test]
fn no_free_replication_slot() {
    let pg = Cluster::builder(15)
        .conf("max_replication_slots = 1")
        .start();
    pg.psql(
        "postgres",
        "SELECT pg_create_physical_replication_slot('taken')",
    );
    let strata = Strata::new("err-slots");
    strata.add_instance("slots", &pg);
    fails_with(
        &strata,
        &["backup", "create", "slots"],
        "no free replication slot",
    );
    assert_one_failed_backup(&strata, "slots", "replication slot");
    strata.ok(&["repo", "verify"]);
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT string_agg(slot_name, ',') FROM pg_replication_slots"
        ),
        "taken"
    );
}

#[test]
fn restore_refuses_impossible_targets() {
    let pg = testkit::shared_cluster(15);
    let strata = Strata::new("err-restore");
    strata.add_instance("targets", pg);
    strata.backup("targets");

    let restore = |name: &str, extra: &[&str], needle: &str| {
        let target = strata.dir.join(format!("restore-{name}"));
        let target_s = path_str(&target);
        fails_with(
            &strata,
            &[
                &["restore", "targets", "--target-dir", &target_s][..],
                extra,
            ]
            .concat(),
            needle,
        );
        assert!(!target.exists(), "a refused restore left {target_s} behind");
    };
    restore(
        "early",
        &["--time", "2000-01-01T00:00:00Z"],
        "before the oldest backup",
    );
    restore(
        "late",
        &["--time", "2099-01-01T00:00:00Z"],
        "after the newest archived WAL",
    );
    restore(
        "no-such-name",
        &["--name", "no-such-point"],
        "no-such-point",
    );
    restore(
        "no-such-xid",
        &["--xid", "4000000000", "--exclusive"],
        "transaction 4000000000 did not commit in the archived WAL",
    );
    restore(
        "early-lsn",
        &["--lsn", "0/10", "--exclusive"],
        "recovery target just before LSN 0/10 is before the oldest backup",
    );

    let occupied = strata.dir.join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    let keep = occupied.join("keep.txt");
    std::fs::write(&keep, "precious").unwrap();
    fails_with(
        &strata,
        &["restore", "targets", "--target-dir", &path_str(&occupied)],
        "not empty",
    );
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "precious");
    assert_eq!(std::fs::read_dir(&occupied).unwrap().count(), 1);

    // A port taken (here by the source server) is refused before anything
    // is written.
    let busy = strata.dir.join("restore-busy-port");
    fails_with(
        &strata,
        &[
            "restore",
            "targets",
            "--target-dir",
            &path_str(&busy),
            "--start",
            "--port",
            &pg.port().to_string(),
        ],
        &format!("port {} on 127.0.0.1 is in use", pg.port()),
    );
    assert!(
        !busy.exists(),
        "a restore refused for its port left {busy:?}"
    );

    let jobs: Vec<serde_json::Value> =
        serde_json::from_str(&strata.ok(&["task", "list", "targets", "--json"])).unwrap();
    let restores: Vec<_> = jobs.iter().filter(|j| j["kind"] == "restore").collect();
    assert!(
        restores.iter().all(|j| j["state"] != "Finished"),
        "a refused restore was recorded as finished: {restores:?}"
    );
    assert_eq!(successes(&strata, "targets"), 1);
}

#[test]
fn repository_from_a_newer_strata() {
    let pg = testkit::shared_cluster(15);
    let strata = Strata::new("err-newer");
    strata.add_instance("newer", pg);
    strata.backup("newer");

    let config = strata.repo_dir().join("strata-repo.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let mut repo = original.clone();
    repo["format_version"] = 99.into();
    std::fs::write(&config, serde_json::to_vec_pretty(&repo).unwrap()).unwrap();

    for args in [
        &["backup", "list", "newer"][..],
        &["backup", "create", "newer"],
        &["repo", "verify"],
        &["instance", "list"],
    ] {
        let line = fails_with(&strata, args, "newer");
        assert!(line.contains("99"), "{line}");
    }
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(
        after["format_version"], 99,
        "the newer repository was rewritten"
    );

    // Back at its real version, the repository shows no trace of the refused backup.
    std::fs::write(&config, serde_json::to_vec_pretty(&original).unwrap()).unwrap();
    let sets = strata.backups("newer");
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0]["status"], "Success");
}
