//! Helpers shared by the integration tests.

use std::time::Duration;

use pg_replication::{ConnectOptions, ReplicationClient, SslMode};
use testkit::Cluster;

/// Options for `user` on `cluster` over TCP, plaintext unless changed.
pub fn opts(cluster: &Cluster, user: &str) -> ConnectOptions {
    ConnectOptions {
        host: cluster.host().to_string(),
        port: cluster.port(),
        user: user.to_string(),
        password: None,
        dbname: None,
        sslmode: SslMode::Disable,
        sslrootcert: None,
        application_name: "strata-test".into(),
        connect_timeout: Duration::from_secs(20),
        replication: true,
    }
}

#[allow(dead_code)] // not every test binary connects as the superuser
pub async fn connect_superuser(cluster: &Cluster) -> ReplicationClient {
    match ReplicationClient::connect(&opts(cluster, "postgres")).await {
        Ok(c) => c,
        Err(e) => panic!("connect: {e}\n--- server log ---\n{}", cluster.log()),
    }
}
