//! Connection settings, spelled as libpq spells them.
//! Reference: doc/src/sgml/libpq.sgml (`sslmode`, `sslrootcert`, `connect_timeout`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plaintext first; TLS (unverified) only if the server refuses plaintext.
    Allow,
    /// TLS (unverified) if the server offers it, else plaintext.
    #[default]
    Prefer,
    /// TLS or fail; the certificate is not verified unless `sslrootcert` is set, in which case
    /// this behaves as `VerifyCa` (as libpq does).
    Require,
    /// TLS with the certificate chain checked against `sslrootcert`; the host name is not checked.
    VerifyCa,
    /// TLS with chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// The spelling libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `sslmode` libpq does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid sslmode {0:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
)]
pub struct InvalidSslMode(pub String);

impl FromStr for SslMode {
    type Err = InvalidSslMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(InvalidSslMode(other.to_string())),
        })
    }
}

/// Where and how to connect. `dbname` is sent in the startup packet but a physical replication
/// connection is not bound to a database.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Option<String>,
    /// Database named in the startup packet.
    pub dbname: Option<String>,
    /// TLS mode.
    pub sslmode: SslMode,
    /// PEM file of trusted CA certificates (libpq's `sslrootcert`).
    pub sslrootcert: Option<PathBuf>,
    /// `application_name` the server shows in `pg_stat_replication`.
    pub application_name: String,
    /// Bound on TCP connect, TLS handshake and authentication together.
    pub connect_timeout: Duration,
    /// A physical replication connection (the default). Without it the
    /// session is an ordinary one that runs SQL only, e.g. the functions
    /// that hold a cluster in backup mode while its files are copied by
    /// other means.
    pub replication: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: None,
            sslmode: SslMode::default(),
            sslrootcert: None,
            application_name: "strata".into(),
            connect_timeout: Duration::from_secs(30),
            replication: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_round_trips_libpq_spellings() {
        for s in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(s.parse::<SslMode>().unwrap().to_string(), s);
        }
        assert!("verify_full".parse::<SslMode>().is_err());
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }
}
