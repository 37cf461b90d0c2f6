//! Exercises the harness itself against the Debian PostgreSQL 15.

use testkit::{shared_cluster, Cluster};

#[test]
fn shared_cluster_answers_psql() {
    let c = shared_cluster(15);
    assert_eq!(c.psql("postgres", "SELECT 1 + 1"), "2");
    assert_eq!(c.psql("postgres", "SHOW wal_level"), "replica");
    assert!(c
        .try_psql("postgres", "SELECT * FROM no_such_table")
        .is_err());
    assert!(std::ptr::eq(c, shared_cluster(15)));
}

#[tokio::test]
async fn client_connects_as_superuser() {
    let c = shared_cluster(15);
    let client = c.client("postgres").await;
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "postgres");
}

#[test]
fn crash_restart_standby_and_promote() {
    let mut primary = Cluster::start_default(15);
    primary.psql(
        "postgres",
        "CREATE TABLE t(x int); INSERT INTO t VALUES (1), (2);",
    );
    primary.pgbench("postgres", &["-i", "-s", "1", "-q"]);
    primary.kill9();
    primary.start();
    assert_eq!(primary.psql("postgres", "SELECT count(*) FROM t"), "2");
    assert!(primary.log().contains("database system was interrupted"));

    let standby = primary.create_standby();
    assert_eq!(standby.psql("postgres", "SELECT pg_is_in_recovery()"), "t");
    standby.promote();
    assert_eq!(standby.psql("postgres", "SELECT count(*) FROM t"), "2");

    let port = standby.port();
    let dir = standby.data_dir().to_path_buf();
    let mut adopted = Cluster::adopt(15, dir, port);
    assert_eq!(
        adopted.psql("postgres", "SELECT count(*) FROM pgbench_branches"),
        "1"
    );
    adopted.stop();
    drop(standby);
    primary.restart();
}

#[test]
fn tls_cluster_has_ca() {
    let c = Cluster::builder(15)
        .ssl(true)
        .auth_method("scram-sha-256")
        .start();
    let ca = c.ca_cert().expect("CA path");
    assert!(ca.exists());
    assert_eq!(c.psql("postgres", "SHOW ssl"), "on");
}

#[test]
fn missing_version_panics_with_instructions() {
    let err = std::panic::catch_unwind(|| Cluster::start_default(9)).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("scripts/install-test-deps.sh"), "{msg}");
}
