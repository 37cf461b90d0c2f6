//! TLS per sslmode against a PostgreSQL 15 with a generated CA.

mod common;

use std::process::Command;

use common::opts;
use pg_replication::{ConnectOptions, ReplicationClient, ReplicationError, SslMode};
use testkit::Cluster;

fn tls_opts(cluster: &Cluster, mode: SslMode) -> ConnectOptions {
    let mut o = opts(cluster, "tls_user");
    o.password = Some("tls secret".into());
    o.sslmode = mode;
    o
}

/// A CA that did not sign the server certificate.
fn unrelated_ca() -> std::path::PathBuf {
    let dir = testkit::temp_dir("strata-wrong-ca-");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "1", "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-subj",
            "/CN=Other CA",
        ])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.crt"))
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("ca.crt")
}

#[tokio::test]
async fn sslmodes() {
    let cluster = Cluster::builder(15)
        .ssl(true)
        .auth_method("scram-sha-256")
        .conf("listen_addresses = '127.0.0.1,127.0.0.2'")
        .hba("host replication all 127.0.0.2/32 scram-sha-256")
        .start();
    cluster.psql(
        "postgres",
        "CREATE ROLE tls_user REPLICATION LOGIN PASSWORD 'tls secret'",
    );
    let ca = cluster.ca_cert().expect("CA").to_path_buf();

    // require: encrypted, certificate not checked; SCRAM without channel binding over TLS.
    let mut client = ReplicationClient::connect(&tls_opts(&cluster, SslMode::Require))
        .await
        .unwrap_or_else(|e| panic!("require: {e}\n{}", cluster.log()));
    assert!(client.is_tls());
    client.identify_system().await.expect("identify over TLS");
    assert_eq!(
        cluster.psql("postgres", "SELECT count(*) FROM pg_stat_ssl WHERE ssl"),
        "1"
    );
    drop(client);

    let client = ReplicationClient::connect(&tls_opts(&cluster, SslMode::Prefer))
        .await
        .expect("prefer");
    assert!(client.is_tls());

    let mut o = tls_opts(&cluster, SslMode::VerifyFull);
    o.sslrootcert = Some(ca.clone());
    assert!(ReplicationClient::connect(&o)
        .await
        .expect("verify-full by IP")
        .is_tls());
    o.host = "localhost".into();
    assert!(ReplicationClient::connect(&o)
        .await
        .expect("verify-full by name")
        .is_tls());

    // 127.0.0.2 is not in the certificate: verify-ca ignores the name, verify-full does not.
    let mut o = tls_opts(&cluster, SslMode::VerifyCa);
    o.sslrootcert = Some(ca.clone());
    o.host = "127.0.0.2".into();
    assert!(ReplicationClient::connect(&o)
        .await
        .expect("verify-ca")
        .is_tls());
    o.sslmode = SslMode::VerifyFull;
    match ReplicationClient::connect(&o).await {
        Err(ReplicationError::Tls(msg)) => assert!(msg.contains("not valid for"), "{msg}"),
        other => panic!("verify-full must check the name: {:?}", other.err()),
    }
    // require with a root certificate verifies the chain, as libpq does.
    o.sslmode = SslMode::Require;
    assert!(ReplicationClient::connect(&o)
        .await
        .expect("require+root")
        .is_tls());

    let wrong = unrelated_ca();
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull, SslMode::Require] {
        let mut o = tls_opts(&cluster, mode);
        o.sslrootcert = Some(wrong.clone());
        match ReplicationClient::connect(&o).await {
            Err(ReplicationError::Tls(msg)) => assert!(!msg.is_empty()),
            Err(other) => panic!("{mode}: expected a TLS error, got {other:?}"),
            Ok(_) => panic!("{mode}: a certificate from another CA must be rejected"),
        }
    }

    let mut o = tls_opts(&cluster, SslMode::VerifyFull);
    o.sslrootcert = None;
    assert!(matches!(
        ReplicationClient::connect(&o).await,
        Err(ReplicationError::Tls(_))
    ));

    let client = ReplicationClient::connect(&tls_opts(&cluster, SslMode::Disable))
        .await
        .expect("disable");
    assert!(!client.is_tls());
    if let Some(dir) = wrong.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
