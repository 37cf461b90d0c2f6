//! Startup and authentication against a real PostgreSQL 15.

mod common;

use common::{connect_superuser, opts};
use pg_replication::{ReplicationClient, ReplicationError, SslMode};
use testkit::{shared_cluster, Cluster};

#[tokio::test]
async fn trust_connects_and_reports_version() {
    let cluster = shared_cluster(15);
    let client = connect_superuser(cluster).await;
    let version = client.server_version_num();
    assert!((150000..160000).contains(&version), "{version}");
    assert!(!client.is_tls());
}

#[tokio::test]
async fn role_without_replication_is_refused() {
    let cluster = shared_cluster(15);
    cluster.psql("postgres", "CREATE ROLE plain_login LOGIN");
    let err = ReplicationClient::connect(&opts(cluster, "plain_login"))
        .await
        .err()
        .expect("walsender must refuse a role without REPLICATION");
    match &err {
        ReplicationError::Server {
            severity,
            code,
            message,
            ..
        } => {
            assert_eq!(severity, "FATAL");
            assert_eq!(code, "42501");
            assert!(message.contains("replication"), "{message}");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert!(!err.is_transient());
}

#[tokio::test]
async fn prefer_falls_back_and_require_fails_without_ssl() {
    let cluster = shared_cluster(15);
    let mut o = opts(cluster, "postgres");
    o.sslmode = SslMode::Prefer;
    let client = ReplicationClient::connect(&o).await.expect("prefer");
    assert!(!client.is_tls());

    o.sslmode = SslMode::Require;
    match ReplicationClient::connect(&o).await {
        Err(ReplicationError::Tls(msg)) => assert!(msg.contains("does not support SSL"), "{msg}"),
        Err(other) => panic!("expected a TLS error, got {other:?}"),
        Ok(_) => panic!("sslmode=require must fail against ssl=off"),
    }
}

#[tokio::test]
async fn password_md5_and_scram() {
    let cluster = Cluster::builder(15)
        .hba("host replication cleartext_user 127.0.0.1/32 password")
        .hba("host replication md5_user 127.0.0.1/32 md5")
        .hba("host replication scram_user 127.0.0.1/32 scram-sha-256")
        .hba("host replication nopass_user 127.0.0.1/32 scram-sha-256")
        .start();
    cluster.psql(
        "postgres",
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE cleartext_user REPLICATION LOGIN PASSWORD 'clear secret';
         CREATE ROLE scram_user REPLICATION LOGIN PASSWORD 'scr''am secret';
         CREATE ROLE nopass_user REPLICATION LOGIN PASSWORD 'x';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user REPLICATION LOGIN PASSWORD 'md5 secret';",
    );
    assert!(cluster
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'"
        )
        .starts_with("md5"));

    for (user, password) in [
        ("cleartext_user", "clear secret"),
        ("md5_user", "md5 secret"),
        ("scram_user", "scr'am secret"),
    ] {
        let mut o = opts(&cluster, user);
        o.password = Some(password.into());
        let mut client = ReplicationClient::connect(&o)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}\n{}", cluster.log()));
        client.identify_system().await.expect("identify_system");

        o.password = Some("wrong".into());
        let err = ReplicationClient::connect(&o)
            .await
            .err()
            .expect("wrong password");
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err}");
        assert_eq!(
            err.to_string(),
            format!("FATAL: password authentication failed for user \"{user}\" (SQLSTATE 28P01)")
        );
        assert!(!err.is_transient());
    }

    let err = ReplicationClient::connect(&opts(&cluster, "nopass_user"))
        .await
        .err()
        .expect("no password configured");
    assert!(
        matches!(err, ReplicationError::UnsupportedAuth(_)),
        "{err:?}"
    );
}
