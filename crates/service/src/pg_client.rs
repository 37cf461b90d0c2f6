//! PostgreSQL's client programs (`psql`, `pg_dump`, `pg_restore`,
//! `pg_amcheck`) run against exactly one server.
//!
//! Names of databases, schemas, tables and roles come from API callers and
//! from registered servers, so they are data everywhere here:
//! - a connection is always one conninfo string built from key/value pairs
//!   with every value quoted (libpq parses a bare `-d NAME` holding `=` or
//!   starting with `postgresql://` as connection settings that win over
//!   `-h`/`-p`/`-U`; a `dbname` inside a conninfo string is never expanded
//!   again, see libpq's conninfo_array_parse);
//! - the child's environment is cleared: a password goes to the one server
//!   it belongs to, and nothing of Strata's own environment is inherited;
//! - names read back from a server travel hex-encoded, so a newline or a
//!   `|` in a name cannot split a row;
//! - names written into SQL are quoted identifiers, and string values are
//!   hex literals decoded by the server, which are read the same way
//!   whatever `standard_conforming_strings` says.

use std::path::Path;
use std::process::Command;

use strata_engine::EngineError;

use crate::ServiceResult;

/// Where and as whom a client program connects.
#[derive(Clone)]
pub(crate) struct ClientConn {
    /// Host name, address, or a Unix socket directory.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub sslmode: Option<strata_catalog::SslMode>,
    pub sslrootcert: Option<String>,
    /// Session settings sent at connection start (`PGOPTIONS`): they win
    /// over per-role and per-database settings stored in the server.
    pub options: Option<String>,
    /// Names this server in errors.
    pub label: String,
}

impl std::fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConn")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// A conninfo value: always single-quoted, `\` and `'` escaped.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// An SQL identifier.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL text value, spelled in hex so no quoting rule of the server can
/// change how it reads.
pub(crate) fn lit(s: &str) -> String {
    format!(
        "pg_catalog.convert_from(pg_catalog.decode('{}', 'hex'), 'UTF8')",
        hex(s.as_bytes())
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

impl ClientConn {
    /// The whole connection as one conninfo string for database `db`.
    pub fn conninfo(&self, db: &str) -> String {
        let mut parts = vec![
            format!("host={}", conninfo_value(&self.host)),
            format!("port={}", self.port),
            format!("user={}", conninfo_value(&self.user)),
            format!("dbname={}", conninfo_value(db)),
            "connect_timeout=10".to_string(),
            "client_encoding=UTF8".to_string(),
        ];
        if let Some(m) = &self.sslmode {
            parts.push(format!("sslmode={}", conninfo_value(m.as_str())));
        }
        if let Some(ca) = &self.sslrootcert {
            parts.push(format!("sslrootcert={}", conninfo_value(ca)));
        }
        parts.join(" ")
    }

    /// `program` with a clean environment and this connection's password;
    /// the caller adds the connection argument (see [`Self::command`]).
    pub fn bare_command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("PGCLIENTENCODING", "UTF8");
        for (k, v) in std::env::vars_os() {
            let k_str = k.to_string_lossy();
            if k_str == "LANG" || k_str == "TZ" || k_str.starts_with("LC_") {
                c.env(&k, v);
            }
        }
        if let Some(p) = &self.password {
            c.env("PGPASSWORD", p);
        }
        if let Some(o) = &self.options {
            c.env("PGOPTIONS", o);
        }
        c
    }

    /// `program -d <conninfo for db>` (psql, pg_dump, pg_restore).
    pub fn command(&self, program: &Path, db: &str) -> Command {
        let mut c = self.bare_command(program);
        c.arg(format!("--dbname={}", self.conninfo(db)));
        c
    }

    /// Runs SQL in `db` (one transaction when `atomic`); returns psql's
    /// unaligned output.
    pub fn run(&self, psql: &Path, db: &str, sql: &str, atomic: bool) -> ServiceResult<String> {
        let mut c = self.command(psql, db);
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]);
        if atomic {
            c.arg("--single-transaction");
        }
        let out = c
            .arg("-c")
            .arg(sql)
            .output()
            .map_err(EngineError::io("running psql"))?;
        if !out.status.success() {
            return Err(EngineError::Server(format!(
                "{}: {}",
                self.label,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The text values of the one-column query `sql`, read back exactly
    /// (hex-encoded on the way).
    pub fn names(&self, psql: &Path, db: &str, sql: &str) -> ServiceResult<Vec<String>> {
        let wrapped =
            format!("SELECT pg_catalog.encode(pg_catalog.convert_to(n::pg_catalog.text, 'UTF8'), 'hex') FROM ({sql}) AS q(n)");
        self.run(psql, db, &wrapped, false)?
            .lines()
            .map(|l| {
                unhex(l.trim()).ok_or_else(|| {
                    EngineError::Failed(format!("{}: unreadable name in psql output", self.label))
                        .into()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ClientConn {
        ClientConn {
            host: "/tmp/s".into(),
            port: 5432,
            user: "u'ser".into(),
            password: Some("secret".into()),
            sslmode: Some(strata_catalog::SslMode::VerifyFull),
            sslrootcert: None,
            options: None,
            label: "test".into(),
        }
    }

    #[test]
    fn names_stay_values_of_one_conninfo() {
        let c = conn();
        assert_eq!(
            c.conninfo("host=127.0.0.1 port=5999 user=leak"),
            "host='/tmp/s' port=5432 user='u\\'ser' dbname='host=127.0.0.1 port=5999 user=leak' connect_timeout=10 client_encoding=UTF8 sslmode='verify-full'"
        );
        assert!(c
            .conninfo("a\\' host='evil")
            .contains("dbname='a\\\\\\' host=\\'evil'"));
        let cmd = c.command(Path::new("psql"), "-d");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args.len(), 1);
        assert!(args[0].to_string_lossy().starts_with("--dbname=host="));
        let envs: Vec<_> = cmd.get_envs().collect();
        assert!(envs
            .iter()
            .any(|(k, v)| *k == "PGPASSWORD" && v.is_some_and(|v| v == "secret")));
    }

    #[test]
    fn sql_values_are_hex() {
        assert_eq!(
            lit("o'k\\"),
            "pg_catalog.convert_from(pg_catalog.decode('6f276b5c', 'hex'), 'UTF8')"
        );
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(unhex(&hex("é\n|x".as_bytes())).as_deref(), Some("é\n|x"));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
