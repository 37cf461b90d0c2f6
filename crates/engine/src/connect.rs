//! Connecting to an instance: connection options from the catalog row, and
//! server errors turned into messages a DBA can act on.

use std::time::Duration;

use pg_replication::{ConnectOptions, ReplicationClient, ReplicationError, SslMode};
use pg_wal::{parse_size_setting, WalGeometry};
use strata_catalog::Instance;

use crate::{EngineError, EngineResult};

/// An instance's password: the one stored with it, or read from the
/// environment variable it names, for this one server only.
pub fn instance_password(instance: &Instance) -> EngineResult<Option<String>> {
    match &instance.password_env {
        Some(var) => std::env::var(var).map(Some).map_err(|_| {
            EngineError::Refused(format!(
                "instance {}: environment variable {var} (its password) is not set",
                instance.id
            ))
        }),
        None => Ok(instance.password.clone()),
    }
}

pub fn connect_options(instance: &Instance) -> EngineResult<ConnectOptions> {
    let password = instance_password(instance)?;
    Ok(ConnectOptions {
        host: instance.host.clone(),
        port: instance.port,
        user: instance.user.clone(),
        password,
        dbname: instance.dbname.clone(),
        sslmode: instance.sslmode,
        sslrootcert: instance.sslrootcert.clone().map(Into::into),
        application_name: "strata".into(),
        connect_timeout: Duration::from_secs(10),
        replication: true,
    })
}

/// Whether Strata checks that it talks to the registered server: the
/// certificate chain against `sslrootcert` (`verify-ca`, `verify-full`, or
/// `require` with a root certificate, as libpq does), and with
/// `verify-full` the host name too.
pub fn connection_verified(instance: &Instance) -> bool {
    match instance.sslmode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        SslMode::Require => instance.sslrootcert.is_some(),
        _ => false,
    }
}

/// What a DBA must know about how Strata reaches `instance`: said at
/// registration (CLI, API) and on the console's instance page. Empty when
/// the server's certificate is verified.
pub fn connection_warnings(instance: &Instance) -> Vec<String> {
    if connection_verified(instance) {
        return Vec::new();
    }
    let what = match instance.sslmode {
        SslMode::Disable => "the connection is not encrypted",
        SslMode::Require => "the connection is encrypted but the server's certificate is not checked",
        _ => "the server's certificate is not checked and the connection falls back to plain text when the server offers no TLS",
    };
    vec![format!(
        "sslmode={}: {what}; anyone on the network path to {}:{} can pose as the server and receive the password and every backed-up byte. Register with sslmode=verify-full and the server's CA certificate (sslrootcert) to verify it.",
        instance.sslmode, instance.host, instance.port
    )]
}

/// Describes a replication-protocol failure for `instance`.
pub fn explain(instance: &Instance, err: ReplicationError) -> EngineError {
    let who = format!(
        "instance {} ({}:{} as {})",
        instance.id, instance.host, instance.port, instance.user
    );
    let transient = err.is_transient();
    let msg = match err.sqlstate() {
        Some("28P01") | Some("28000") if err.to_string().contains("password") => {
            format!("{who}: authentication failed: {err}")
        }
        Some("28000") => format!(
            "{who}: the server refused the connection: {err} (check pg_hba.conf allows `replication` connections for this user)"
        ),
        Some("42501") => format!(
            "{who}: the role lacks the REPLICATION attribute: {err} (ALTER ROLE {} REPLICATION)",
            instance.user
        ),
        Some("53300") => format!(
            "{who}: the server has no free WAL sender (max_wal_senders is reached, or 0 because wal_level is minimal): {err}"
        ),
        Some("53400") => format!(
            "{who}: no free replication slot: {err} (raise max_replication_slots or drop unused slots)"
        ),
        Some(_) => format!("{who}: {err}"),
        None => match err {
            ReplicationError::Io(_) | ReplicationError::ConnectTimeout => {
                format!("cannot reach {who}: {err}")
            }
            other => format!("{who}: {other}"),
        },
    };
    if transient {
        EngineError::Unreachable(msg)
    } else {
        EngineError::Server(msg)
    }
}

/// A replication connection plus the facts every job needs.
pub struct Session {
    pub client: ReplicationClient,
    pub system_id: u64,
    pub timeline: pg_wal::TimelineId,
    pub geometry: WalGeometry,
}

/// Connects, identifies the system and checks it can be backed up.
pub async fn open_session(instance: &Instance) -> EngineResult<Session> {
    let opts = connect_options(instance)?;
    let mut client = ReplicationClient::connect(&opts)
        .await
        .map_err(|e| explain(instance, e))?;
    let ident = client
        .identify_system()
        .await
        .map_err(|e| explain(instance, e))?;
    if let Some(known) = instance.system_identifier {
        if known != ident.system_id {
            return Err(EngineError::Refused(format!(
                "instance {} now answers with system identifier {} but was registered with {}; it is a different cluster (register it as a new instance)",
                instance.id, ident.system_id, known
            )));
        }
    }
    let wal_level = client
        .show("wal_level")
        .await
        .map_err(|e| explain(instance, e))?;
    if wal_level == "minimal" {
        return Err(EngineError::Refused(format!(
            "instance {}: wal_level is minimal; set wal_level = replica (or logical) and restart the server",
            instance.id
        )));
    }
    let seg = client
        .show("wal_segment_size")
        .await
        .map_err(|e| explain(instance, e))?;
    let geometry = parse_size_setting(&seg)
        .ok()
        .and_then(|s| WalGeometry::new(s).ok())
        .ok_or_else(|| {
            EngineError::Server(format!(
                "instance {}: unexpected wal_segment_size {seg:?}",
                instance.id
            ))
        })?;
    Ok(Session {
        client,
        system_id: ident.system_id,
        timeline: ident.timeline,
        geometry,
    })
}

/// Records what was learned about the server on the instance's catalog row.
pub fn remember_facts(
    engine: &crate::Engine,
    instance: &mut Instance,
    session: &Session,
) -> EngineResult<()> {
    let version = session.client.server_version_num();
    let changed = instance.system_identifier != Some(session.system_id)
        || instance.pg_version_num != Some(version)
        || instance.wal_segment_size != Some(session.geometry.segment_size());
    if changed {
        instance.system_identifier = Some(session.system_id);
        instance.pg_version_num = Some(version);
        instance.wal_segment_size = Some(session.geometry.segment_size());
        engine.catalog.update_instance(instance)?;
    }
    Ok(())
}

/// What a first contact learns about a server.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerFacts {
    /// The cluster's system identifier (IDENTIFY_SYSTEM).
    pub system_id: u64,
    /// `server_version_num`, e.g. 150018.
    pub pg_version_num: u32,
    /// `wal_segment_size` in bytes.
    pub wal_segment_size: u64,
    /// The server's current timeline.
    pub timeline: pg_wal::TimelineId,
}

impl crate::Engine {
    /// Connects to `instance` and checks it can be backed up (reachable,
    /// credentials, REPLICATION privilege, wal_level).
    pub async fn probe(&self, instance: &Instance) -> EngineResult<ServerFacts> {
        let session = open_session(instance).await?;
        Ok(ServerFacts {
            system_id: session.system_id,
            pg_version_num: session.client.server_version_num(),
            wal_segment_size: session.geometry.segment_size(),
            timeline: session.timeline,
        })
    }
}

impl crate::Engine {
    /// Drops the permanent replication slot WAL archiving uses, so the
    /// server stops keeping WAL for Strata (log backup turned off, instance
    /// deregistered). Returns whether a slot existed.
    pub async fn drop_wal_slot(&self, instance_id: &str) -> EngineResult<bool> {
        let instance = self.catalog.get_instance(instance_id)?;
        let mut session = open_session(&instance).await?;
        let slot = crate::slot_name(instance_id);
        // Never WAIT: a slot still active (a walsender finishing) is retried
        // for a few seconds, then reported, rather than hanging the caller.
        for attempt in 0.. {
            match session.client.drop_slot(&slot, false).await {
                Ok(()) => return Ok(true),
                // 42704: undefined_object, the slot was never created.
                Err(e) if e.sqlstate() == Some("42704") => return Ok(false),
                // 55006: object_in_use.
                Err(e) if e.sqlstate() == Some("55006") && attempt < 20 => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(explain(&instance, e)),
            }
        }
        unreachable!("the loop returns")
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    fn instance(sslmode: &str, root: Option<&str>) -> Instance {
        Instance {
            sslrootcert: root.map(str::to_string),
            ..Instance::new("i", "db.example", 5432, "backup", sslmode.parse().unwrap())
        }
    }

    /// Only a checked certificate goes without a warning; `require` checks
    /// the chain when given a root certificate, as libpq does.
    #[test]
    fn unverified_connections_are_warned_about() {
        for (mode, root, verified) in [
            ("disable", None, false),
            ("allow", None, false),
            ("prefer", None, false),
            ("prefer", Some("/ca.crt"), false),
            ("require", None, false),
            ("require", Some("/ca.crt"), true),
            ("verify-ca", Some("/ca.crt"), true),
            ("verify-full", Some("/ca.crt"), true),
        ] {
            let i = instance(mode, root);
            assert_eq!(connection_verified(&i), verified, "{mode} {root:?}");
            let warnings = connection_warnings(&i);
            assert_eq!(warnings.is_empty(), verified, "{mode} {root:?}");
            if let Some(w) = warnings.first() {
                assert!(w.starts_with(&format!("sslmode={mode}: ")), "{w}");
                assert!(
                    w.contains("db.example:5432") && w.contains("verify-full"),
                    "{w}"
                );
            }
        }
    }
}
