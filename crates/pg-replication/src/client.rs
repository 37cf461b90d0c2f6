//! Connection startup, authentication and the walsender's single-result commands.
//!
//! Reference: doc/src/sgml/protocol.sgml ("Start-up", "SASL Authentication",
//! "Streaming Replication Protocol"), src/backend/replication/repl_gram.y for command syntax,
//! src/backend/replication/walsender.c for result shapes.

use std::path::PathBuf;

use bytes::Bytes;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::net::TcpStream;

use crate::conn::{data_row_columns, server_error, Backend, Connection, Transport};
use crate::tls::{client_config, server_name, Verify};
use crate::{ConnectOptions, Lsn, ReplicationError, SslMode, TimelineId};

/// Result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's database system identifier (`pg_control_system().system_identifier`).
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: TimelineId,
    /// Current WAL flush location (on a standby: replay location).
    pub xlogpos: Lsn,
    /// Database of a logical replication connection; `None` for physical ones.
    pub dbname: Option<String>,
}

/// Whether the connection can take a command, or a COPY is still running on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    Ready,
    Busy,
}

/// A physical replication connection (`replication=true`).
pub struct ReplicationClient {
    pub(crate) conn: Connection,
    pub(crate) state: ConnState,
    server_version_num: u32,
    /// Most bytes of rows one command's answer may bring (see [`MAX_RESULT_BYTES`]).
    max_result_bytes: usize,
}

/// Most bytes of rows kept from one command's answer: each message is bounded, their number is
/// the server's to choose, so a server answering without end would otherwise fill memory. The
/// largest answers Strata asks for (names of every relation of a cluster) are far below it.
pub const MAX_RESULT_BYTES: usize = 1 << 30;

/// What to do about TLS on one connection attempt.
#[derive(Clone, Copy)]
enum TlsPlan {
    Never,
    /// Ask; fall back to plaintext if the server says 'N'.
    Try(Verify),
    /// Ask; fail if the server says 'N'.
    Must(Verify),
}

/// `server_version` as `server_version_num`: "15.18 (Debian …)" → 150018, "9.6.24" → 90624.
/// `None` when the parts do not fit that encoding (a minor version of 10000 or more, or a
/// number past `u32`): the server sent this string, and a wrapped or ambiguous number
/// would pass for another version.
pub(crate) fn parse_server_version(v: &str) -> Option<u32> {
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let second: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let base = major.checked_mul(10000)?;
    if major >= 10 {
        (second < 10000).then_some(())?;
        base.checked_add(second)
    } else {
        let third: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (second < 100 && third < 100).then_some(())?;
        base.checked_add(second * 100 + third)
    }
}

/// Quotes an identifier for the replication grammar (slot names).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for the replication grammar (labels).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(crate) fn column_str<'a>(
    row: &'a [Option<Bytes>],
    idx: usize,
    what: &str,
) -> Result<Option<&'a str>, ReplicationError> {
    match row.get(idx) {
        None => Err(ReplicationError::protocol(format!(
            "{what}: missing column {idx}"
        ))),
        Some(None) => Ok(None),
        Some(Some(b)) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| ReplicationError::protocol(format!("{what}: column {idx} is not UTF-8"))),
    }
}

pub(crate) fn required_str<'a>(
    row: &'a [Option<Bytes>],
    idx: usize,
    what: &str,
) -> Result<&'a str, ReplicationError> {
    column_str(row, idx, what)?
        .ok_or_else(|| ReplicationError::protocol(format!("{what}: column {idx} is NULL")))
}

pub(crate) fn parse_lsn(text: &str, what: &str) -> Result<Lsn, ReplicationError> {
    text.parse::<Lsn>()
        .map_err(|_| ReplicationError::protocol(format!("{what}: invalid LSN {text:?}")))
}

pub(crate) fn parse_num<T: std::str::FromStr>(
    text: &str,
    what: &str,
) -> Result<T, ReplicationError> {
    text.parse::<T>()
        .map_err(|_| ReplicationError::protocol(format!("{what}: invalid number {text:?}")))
}

fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".postgresql/root.crt");
    path.exists().then_some(path)
}

/// TCP keepalive on a connection to a server: first probe after this much silence...
const KEEPALIVE_IDLE_SECS: libc::c_int = 60;
/// ...then one every this many seconds...
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 10;
/// ...and the connection is dropped after this many unanswered.
const KEEPALIVE_PROBES: libc::c_int = 6;

/// Turns TCP keepalive on for `tcp`, so a server host that vanishes (powered off, a network
/// partition: nothing sends a reset) ends a backup or a WAL stream with an error within about
/// two minutes of silence, rather than after the system's default of two hours or never.
fn keep_alive(tcp: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            KEEPALIVE_INTERVAL_SECS,
        ),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
    ] {
        // SAFETY: fd is the open socket `tcp` owns; value lives across the call and its size
        // is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl ReplicationClient {
    /// Connects and authenticates; the whole exchange is bounded by `connect_timeout`.
    pub async fn connect(opts: &ConnectOptions) -> Result<Self, ReplicationError> {
        match tokio::time::timeout(opts.connect_timeout, Self::connect_by_sslmode(opts)).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::ConnectTimeout),
        }
    }

    async fn connect_by_sslmode(opts: &ConnectOptions) -> Result<Self, ReplicationError> {
        let plan = match opts.sslmode {
            SslMode::Disable => TlsPlan::Never,
            SslMode::Allow => {
                // libpq's order: plaintext first, TLS only if the server refuses (pg_hba.conf
                // `hostssl` lines make it answer "no pg_hba.conf entry", SQLSTATE 28000).
                return match Self::connect_once(opts, TlsPlan::Never).await {
                    Err(e) if e.sqlstate() == Some("28000") => {
                        Self::connect_once(opts, TlsPlan::Must(Verify::Nothing)).await
                    }
                    other => other,
                };
            }
            SslMode::Prefer => TlsPlan::Try(Verify::Nothing),
            // libpq: `require` with a root certificate verifies the chain like verify-ca.
            SslMode::Require if opts.sslrootcert.is_some() => TlsPlan::Must(Verify::Chain),
            SslMode::Require => TlsPlan::Must(Verify::Nothing),
            SslMode::VerifyCa => TlsPlan::Must(Verify::Chain),
            SslMode::VerifyFull => TlsPlan::Must(Verify::ChainAndName),
        };
        Self::connect_once(opts, plan).await
    }

    async fn connect_once(opts: &ConnectOptions, plan: TlsPlan) -> Result<Self, ReplicationError> {
        let mut tcp = TcpStream::connect((opts.host.as_str(), opts.port)).await?;
        tcp.set_nodelay(true)?;
        keep_alive(&tcp)?;
        let transport = match plan {
            TlsPlan::Never => Transport::Plain(tcp),
            TlsPlan::Try(verify) | TlsPlan::Must(verify) => {
                let mut req = bytes::BytesMut::new();
                frontend::ssl_request(&mut req);
                tokio::io::AsyncWriteExt::write_all(&mut tcp, &req).await?;
                match Connection::read_ssl_answer(&mut tcp).await? {
                    b'S' => {
                        let root = opts.sslrootcert.clone().or_else(default_root_cert);
                        let config = client_config(verify, root.as_deref())?;
                        let name = server_name(&opts.host)?;
                        let tls = tokio_rustls::TlsConnector::from(config)
                            .connect(name, tcp)
                            .await
                            .map_err(|e| ReplicationError::Tls(e.to_string()))?;
                        Transport::Tls(Box::new(tls))
                    }
                    b'N' if matches!(plan, TlsPlan::Try(_)) => Transport::Plain(tcp),
                    b'N' => {
                        return Err(ReplicationError::Tls(format!(
                            "server does not support SSL, but sslmode={} requires it",
                            opts.sslmode
                        )))
                    }
                    b'E' => {
                        return Err(ReplicationError::protocol(
                            "server answered SSLRequest with an error (pre-7.0 server?)",
                        ))
                    }
                    other => {
                        return Err(ReplicationError::protocol(format!(
                            "unexpected answer {:?} to SSLRequest",
                            char::from(other)
                        )))
                    }
                }
            }
        };
        let mut client = ReplicationClient {
            conn: Connection::new(transport),
            state: ConnState::Ready,
            server_version_num: 0,
            max_result_bytes: MAX_RESULT_BYTES,
        };
        client.startup(opts).await?;
        Ok(client)
    }

    async fn startup(&mut self, opts: &ConnectOptions) -> Result<(), ReplicationError> {
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &opts.user),
            ("application_name", &opts.application_name),
        ];
        if opts.replication {
            params.push(("replication", "true"));
        }
        if let Some(db) = &opts.dbname {
            params.push(("database", db));
        }
        frontend::startup_message(params, self.conn.out())?;
        self.conn.flush().await?;

        let password = || {
            opts.password.as_deref().ok_or_else(|| {
                ReplicationError::UnsupportedAuth(
                    "the server requested a password but none was configured".into(),
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.conn.read_regular("during startup").await?;
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), self.conn.out())?;
                    self.conn.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(opts.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), self.conn.out())?;
                    self.conn.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = Vec::new();
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| ReplicationError::protocol(format!("SASL mechanisms: {e}")))?
                    {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(ReplicationError::UnsupportedAuth(format!(
                            "server offers SASL mechanisms {offered:?}, we speak {SCRAM_SHA_256}"
                        )));
                    }
                    // No channel binding ("n,,"): the -PLUS variant is not implemented.
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), self.conn.out())?;
                    self.conn.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::protocol("SASL continue without SASL start")
                    })?;
                    s.update(body.data()).map_err(|e| {
                        ReplicationError::protocol(format!("SCRAM server-first-message: {e}"))
                    })?;
                    frontend::sasl_response(s.message(), self.conn.out())?;
                    self.conn.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::protocol("SASL final without SASL start")
                    })?;
                    s.finish(body.data()).map_err(|e| {
                        ReplicationError::protocol(format!(
                            "SCRAM server signature verification failed: {e}"
                        ))
                    })?;
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(ReplicationError::UnsupportedAuth(
                        "server requested Kerberos/GSSAPI/SSPI/SCM authentication".into(),
                    ))
                }
                Message::ParameterStatus(body) => self.on_parameter_status(&body)?,
                Message::BackendKeyData(_) => {}
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {
                    return Err(ReplicationError::protocol(
                        "unexpected message during startup",
                    ))
                }
            }
        }
        if self.server_version_num == 0 {
            return Err(ReplicationError::protocol(
                "server did not report server_version",
            ));
        }
        Ok(())
    }

    pub(crate) fn on_parameter_status(
        &mut self,
        body: &postgres_protocol::message::backend::ParameterStatusBody,
    ) -> Result<(), ReplicationError> {
        let name = body
            .name()
            .map_err(|e| ReplicationError::protocol(format!("ParameterStatus: {e}")))?;
        if name == "server_version" {
            let value = body
                .value()
                .map_err(|e| ReplicationError::protocol(format!("ParameterStatus: {e}")))?;
            self.server_version_num = parse_server_version(value).ok_or_else(|| {
                ReplicationError::protocol(format!(
                    "server_version {value:?} is not a PostgreSQL version number"
                ))
            })?;
        }
        Ok(())
    }

    /// e.g. 150018 for 15.18, 180004 for 18.4.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// True when the connection is encrypted with TLS.
    pub fn is_tls(&self) -> bool {
        self.conn.is_tls()
    }

    /// Lowers (or raises) the most bytes of rows one command's answer may bring; past it the
    /// command fails and the connection is left unusable (the rest of the answer unread).
    pub fn set_max_result_bytes(&mut self, max: usize) {
        self.max_result_bytes = max;
    }

    pub(crate) fn ensure_ready(&self) -> Result<(), ReplicationError> {
        match self.state {
            ConnState::Ready => Ok(()),
            ConnState::Busy => Err(ReplicationError::protocol(
                "connection is still inside an abandoned BASE_BACKUP or START_REPLICATION; reconnect",
            )),
        }
    }

    /// Sends a command and collects the rows of all its result sets (raw column values).
    pub(crate) async fn query_raw(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<Bytes>>>, ReplicationError> {
        self.ensure_ready()?;
        frontend::query(sql, self.conn.out())?;
        self.conn.flush().await?;
        let mut rows = Vec::new();
        let mut received = 0usize;
        let mut error = None;
        loop {
            let msg = match self.conn.read_message().await? {
                Backend::Message(m) => m,
                Backend::CopyBothResponse => {
                    self.state = ConnState::Busy;
                    return Err(ReplicationError::protocol(format!(
                        "{sql:?} unexpectedly started COPY BOTH"
                    )));
                }
            };
            match msg {
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                Message::DataRow(body) => {
                    received += body.buffer_bytes().len();
                    if received > self.max_result_bytes {
                        self.state = ConnState::Busy;
                        return Err(ReplicationError::protocol(format!(
                            "the answer to {sql:?} is larger than {} bytes",
                            self.max_result_bytes
                        )));
                    }
                    rows.push(data_row_columns(&body)?)
                }
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ParameterStatus(body) => self.on_parameter_status(&body)?,
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                Message::CopyOutResponse(_) | Message::CopyInResponse(_) => {
                    self.state = ConnState::Busy;
                    return Err(ReplicationError::protocol(format!(
                        "{sql:?} unexpectedly started COPY"
                    )));
                }
                _ => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected message in response to {sql:?}"
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Runs a command (or SQL the walsender accepts) and returns text rows; NULL is `None`.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let rows = self.query_raw(sql).await?;
        rows.into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|col| {
                        col.map(|b| {
                            String::from_utf8(b.to_vec()).map_err(|_| {
                                ReplicationError::protocol(format!("{sql:?}: non-UTF-8 value"))
                            })
                        })
                        .transpose()
                    })
                    .collect()
            })
            .collect()
    }

    async fn single_row(&mut self, sql: &str) -> Result<Vec<Option<Bytes>>, ReplicationError> {
        let mut rows = self.query_raw(sql).await?;
        if rows.len() != 1 {
            return Err(ReplicationError::protocol(format!(
                "{sql:?} returned {} rows, expected 1",
                rows.len()
            )));
        }
        Ok(rows.remove(0))
    }

    /// `IDENTIFY_SYSTEM`: the cluster's identity, timeline and WAL position.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const WHAT: &str = "IDENTIFY_SYSTEM";
        let row = self.single_row(WHAT).await?;
        Ok(SystemIdentity {
            system_id: parse_num(required_str(&row, 0, WHAT)?, WHAT)?,
            timeline: TimelineId(parse_num(required_str(&row, 1, WHAT)?, WHAT)?),
            xlogpos: parse_lsn(required_str(&row, 2, WHAT)?, WHAT)?,
            dbname: column_str(&row, 3, WHAT)?.map(str::to_string),
        })
    }

    /// `SHOW setting` (allowed on replication connections since PostgreSQL 10).
    pub async fn show(&mut self, setting: &str) -> Result<String, ReplicationError> {
        let sql = format!("SHOW {}", quote_ident(setting));
        let row = self.single_row(&sql).await?;
        Ok(required_str(&row, 0, &sql)?.to_string())
    }

    /// `UPLOAD_MANIFEST` (PostgreSQL 17+): hands the server the backup_manifest of an earlier
    /// backup, so that the next BASE_BACKUP on this connection can be `INCREMENTAL` to it.
    /// The server parses and checks the manifest as it arrives; its objections come back as
    /// the error, and the connection stays usable.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<(), ReplicationError> {
        const WHAT: &str = "UPLOAD_MANIFEST";
        if self.server_version_num() < 170000 {
            return Err(ReplicationError::Unsupported(
                "incremental backups need PostgreSQL 17".into(),
            ));
        }
        self.ensure_ready()?;
        frontend::query(WHAT, self.conn.out())?;
        self.conn.flush().await?;
        let mut error = None;
        let mut sent = false;
        loop {
            match self
                .conn
                .read_regular("in response to UPLOAD_MANIFEST")
                .await?
            {
                Message::CopyInResponse(_) if !sent => {
                    sent = true;
                    // CopyData messages of at most 64 KiB, as libpq clients send them.
                    for chunk in manifest.chunks(64 * 1024) {
                        frontend::CopyData::new(chunk)?.write(self.conn.out());
                        if self.conn.out().len() >= 1024 * 1024 {
                            self.conn.flush().await?;
                        }
                    }
                    frontend::copy_done(self.conn.out());
                    self.conn.flush().await?;
                }
                Message::CommandComplete(_) | Message::RowDescription(_) => {}
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ParameterStatus(body) => self.on_parameter_status(&body)?,
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {
                    self.state = ConnState::Busy;
                    return Err(ReplicationError::protocol(format!(
                        "unexpected message in response to {WHAT}"
                    )));
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None if sent => Ok(()),
            None => Err(ReplicationError::protocol(format!(
                "{WHAT} finished without asking for the manifest"
            ))),
        }
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and raw content.
    pub async fn timeline_history(
        &mut self,
        tli: TimelineId,
    ) -> Result<(String, Vec<u8>), ReplicationError> {
        let sql = format!("TIMELINE_HISTORY {}", tli.0);
        let row = self.single_row(&sql).await?;
        let name = required_str(&row, 0, &sql)?.to_string();
        let content = row
            .get(1)
            .cloned()
            .flatten()
            .ok_or_else(|| ReplicationError::protocol(format!("{sql}: no content")))?;
        Ok((name, content.to_vec()))
    }

    /// Creates a physical slot. Returns the slot's restart LSN when WAL was reserved and the
    /// server can tell (the command's `consistent_point` is `0/0` for physical slots, so on
    /// PostgreSQL 15+ it is read back with READ_REPLICATION_SLOT); `None` otherwise.
    pub async fn create_physical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        reserve_wal: bool,
    ) -> Result<Option<Lsn>, ReplicationError> {
        if temporary && self.server_version_num < 100000 {
            return Err(ReplicationError::Unsupported(
                "temporary replication slots need PostgreSQL 10".into(),
            ));
        }
        let mut sql = format!("CREATE_REPLICATION_SLOT {}", quote_ident(name));
        if temporary {
            sql.push_str(" TEMPORARY");
        }
        sql.push_str(" PHYSICAL");
        if reserve_wal {
            // The parenthesised option list replaced the bare keyword in PostgreSQL 15.
            sql.push_str(if self.server_version_num >= 150000 {
                " (RESERVE_WAL)"
            } else {
                " RESERVE_WAL"
            });
        }
        let row = self.single_row(&sql).await?;
        if let Some(text) = column_str(&row, 1, &sql)? {
            let lsn = parse_lsn(text, &sql)?;
            if lsn.0 != 0 {
                return Ok(Some(lsn));
            }
        }
        if reserve_wal && self.server_version_num >= 150000 {
            return Ok(self
                .read_replication_slot(name)
                .await?
                .and_then(|(lsn, _)| lsn));
        }
        Ok(None)
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`; WAIT blocks while another walsender holds the slot.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        let mut sql = format!("DROP_REPLICATION_SLOT {}", quote_ident(name));
        if wait {
            sql.push_str(" WAIT");
        }
        self.query_raw(&sql).await.map(|_| ())
    }

    /// `READ_REPLICATION_SLOT` (PostgreSQL 15+): `(restart_lsn, restart_tli)`, `None` if no
    /// such slot exists.
    pub async fn read_replication_slot(
        &mut self,
        name: &str,
    ) -> Result<Option<(Option<Lsn>, Option<TimelineId>)>, ReplicationError> {
        if self.server_version_num < 150000 {
            return Err(ReplicationError::Unsupported(format!(
                "READ_REPLICATION_SLOT needs PostgreSQL 15 (server is {})",
                self.server_version_num
            )));
        }
        let sql = format!("READ_REPLICATION_SLOT {}", quote_ident(name));
        let row = self.single_row(&sql).await?;
        if column_str(&row, 0, &sql)?.is_none() {
            return Ok(None);
        }
        let lsn = column_str(&row, 1, &sql)?
            .map(|t| parse_lsn(t, &sql))
            .transpose()?;
        let tli = column_str(&row, 2, &sql)?
            .map(|t| parse_num(t, &sql).map(TimelineId))
            .transpose()?;
        Ok(Some((lsn, tli)))
    }
}

pub(crate) fn log_notice(body: &postgres_protocol::message::backend::NoticeResponseBody) {
    let mut fields = body.fields();
    let mut text = String::new();
    while let Ok(Some(f)) = fields.next() {
        if f.type_() == b'M' {
            text = String::from_utf8_lossy(f.value_bytes()).into_owned();
        }
    }
    tracing::info!(target: "pg_replication", "server notice: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_probe_a_silent_peer() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let get = |level, name| {
            let mut value: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: the socket is open; value and len outlive the call.
            let rc = unsafe {
                libc::getsockopt(
                    tcp.as_raw_fd(),
                    level,
                    name,
                    &mut value as *mut libc::c_int as *mut libc::c_void,
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            value
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
        keep_alive(&tcp).unwrap();
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 60);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 6);
    }

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.18 (Debian 15.18-0+deb12u1)"),
            Some(150018)
        );
        assert_eq!(parse_server_version("18.4"), Some(180004));
        assert_eq!(parse_server_version("18beta1"), Some(180000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("x"), None);
        // The largest that fits, then past u32 (major * 10000 used to overflow).
        assert_eq!(parse_server_version("429496.7295"), Some(u32::MAX));
        assert_eq!(parse_server_version("429496.7296"), None);
        assert_eq!(parse_server_version("429497.0"), None);
        assert_eq!(parse_server_version("4294967295"), None);
        // Parts the encoding cannot hold would read as another version.
        assert_eq!(parse_server_version("15.10000"), None);
        assert_eq!(parse_server_version("9.100.1"), None);
        assert_eq!(parse_server_version("9.6.100"), None);
        assert_eq!(parse_server_version("9.99.99"), Some(99999));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
