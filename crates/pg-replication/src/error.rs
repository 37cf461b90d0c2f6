//! Errors of the replication-protocol client, with the retry classifier used by the engine.
//!
//! Server errors keep the fields of an ErrorResponse (protocol-error-fields.sgml); their SQLSTATE
//! classes follow src/backend/utils/errcodes.txt.

use std::fmt;

/// Everything that can go wrong talking to a walsender.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS could not be set up or verified.
    #[error("TLS error: {0}")]
    Tls(String),
    /// The server sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server asked for an authentication method this client does not speak.
    #[error("unsupported authentication: {0}")]
    UnsupportedAuth(String),
    /// The server lacks something Strata needs (version, setting, feature).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The server did not accept the connection within the connect timeout.
    #[error("timed out connecting to the server")]
    ConnectTimeout,
    /// An ErrorResponse from the server.
    #[error("{}", ServerDisplay { severity, code, message, detail, hint })]
    Server {
        /// `FATAL`, `ERROR`…
        severity: String,
        /// SQLSTATE, e.g. `28P01`.
        code: String,
        /// The primary message.
        message: String,
        /// The `DETAIL` line, if any.
        detail: Option<String>,
        /// The `HINT` line, if any.
        hint: Option<String>,
    },
}

/// Renders a server error the way psql does: `FATAL: message (SQLSTATE 28P01)` plus detail/hint.
struct ServerDisplay<'a> {
    severity: &'a str,
    code: &'a str,
    message: &'a str,
    detail: &'a Option<String>,
    hint: &'a Option<String>,
}

impl fmt::Display for ServerDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = self.detail {
            write!(f, "; DETAIL: {detail}")?;
        }
        if let Some(hint) = self.hint {
            write!(f, "; HINT: {hint}")?;
        }
        Ok(())
    }
}

impl ReplicationError {
    /// Whether retrying the same operation later may succeed without anyone changing anything:
    /// broken connections, timeouts, a server starting up or shutting down, too many connections,
    /// a slot still held by a dying walsender. Authentication, permission and protocol errors are
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io(_) | ReplicationError::ConnectTimeout => true,
            ReplicationError::Tls(_)
            | ReplicationError::Protocol(_)
            | ReplicationError::UnsupportedAuth(_)
            | ReplicationError::Unsupported(_) => false,
            ReplicationError::Server { code, .. } => {
                // 08: connection exception; 53: insufficient resources (53300 too many
                // connections); 57P01-03: admin/crash shutdown, cannot connect now; 40001/40P01:
                // serialization failure/deadlock; 55006: object in use (slot active).
                code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(
                        code.as_str(),
                        "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55006"
                    )
            }
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        ReplicationError::Protocol(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server {
            severity: "FATAL".into(),
            code: code.into(),
            message: "password authentication failed for user \"x\"".into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn server_error_reads_like_postgres() {
        assert_eq!(
            server("28P01").to_string(),
            "FATAL: password authentication failed for user \"x\" (SQLSTATE 28P01)"
        );
        let with_hint = ReplicationError::Server {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            with_hint.to_string(),
            "ERROR: replication slot \"s\" does not exist (SQLSTATE 42704); DETAIL: d; HINT: h"
        );
    }

    #[test]
    fn classifier() {
        assert!(!server("28P01").is_transient());
        assert!(!server("42501").is_transient());
        assert!(server("53300").is_transient());
        assert!(server("57P03").is_transient());
        assert!(server("08006").is_transient());
        assert!(ReplicationError::ConnectTimeout.is_transient());
        assert!(!ReplicationError::Protocol("x".into()).is_transient());
        assert_eq!(server("28P01").sqlstate(), Some("28P01"));
        assert_eq!(ReplicationError::ConnectTimeout.sqlstate(), None);
    }
}
