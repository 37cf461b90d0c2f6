//! The PostgreSQL catalog, shared by every Strata node of a fleet.
//!
//! The catalog traits are synchronous (the engine calls them from blocking
//! threads, and some async handlers still call them directly), while the
//! client, `tokio-postgres` with a `deadpool` pool, is async. So a
//! [`PgCatalog`] owns a small tokio runtime of its own on which the pool and
//! its connections live: each method spawns its future there and waits for
//! the answer on a std channel. Waiting on a channel is allowed anywhere,
//! unlike `Handle::block_on`, which panics inside an async context, and the
//! connections never depend on the caller's runtime making progress.
//!
//! Atomicity matches the SQLite catalog's `BEGIN IMMEDIATE`: a multi-row
//! method runs in one transaction that first locks the rows it decides on
//! (`SELECT … FOR UPDATE`), and single-row rules are left to unique keys
//! (`INSERT … ON CONFLICT`). The lease takeover skips rows another
//! transaction holds (`FOR UPDATE SKIP LOCKED`), as job claiming will.
//! A transaction PostgreSQL aborted as a serialization failure or deadlock
//! is retried here a few times; other failures are sorted into the
//! backend-neutral [`CatalogError`] variants with the driver error as
//! source.
//!
//! Times are kept to the microsecond (PostgreSQL's `timestamptz`). Every
//! lease and expiry (heartbeats, ownership, job leases, repository holds,
//! console sessions, request nonces) is judged by the server's clock
//! (`now()`, the start of the deciding statement's transaction): the `now`
//! a caller passes is its own clock's reading and decides nothing here, and
//! a horizon given as a time (`forget_before`) counts only as its distance
//! from that `now`. So a node whose clock runs ahead cannot take a live
//! lease or forget what others still need, and one whose clock runs behind
//! cannot keep a dead lease or write one that lapses early.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use pg_wal::{Lsn, TimelineId};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use crate::lease::{lease_expired_reason, LeaseState};
use crate::*;

/// Connections each handle keeps at most.
const POOL_SIZE: usize = 8;
/// How often a transaction aborted by a serialization failure or a deadlock
/// is run again before the error is returned (as retryable `Busy`).
const TX_ATTEMPTS: u32 = 5;
/// Serializes schema migrations of nodes starting at once (any fixed key).
const MIGRATION_LOCK: i64 = 0x5354_5241_5441_0001; // "STRATA" + 1

/// Classifies what PostgreSQL reported: a unique violation is a conflict,
/// serialization failures, deadlocks, a lost or refused connection are
/// retryable, data corruption is corruption; the driver error stays the
/// source (it never carries the password).
impl From<tokio_postgres::Error> for CatalogError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(code) = e.code() {
            let c = code.code();
            return if *code == SqlState::UNIQUE_VIOLATION {
                CatalogError::Conflict(Box::new(e))
            } else if retryable_state(code)
                || c.starts_with("08") // connection exception
                || c.starts_with("57P") // operator intervention: shutdown, cannot connect now
                || c.starts_with("53")
            // insufficient resources (too many connections)
            {
                CatalogError::Busy(Box::new(e))
            } else if c == "XX001" || c == "XX002" {
                CatalogError::Corrupt(Box::new(e))
            } else {
                CatalogError::Backend(Box::new(e))
            };
        }
        if e.is_closed() || io_source(&e) {
            return CatalogError::Busy(Box::new(e));
        }
        CatalogError::Backend(Box::new(e))
    }
}

fn retryable_state(code: &SqlState) -> bool {
    *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
}

fn io_source(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

impl From<deadpool_postgres::PoolError> for CatalogError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError as P;
        match e {
            P::Backend(e) => e.into(),
            P::Timeout(_) => CatalogError::Busy(Box::new(e)),
            other => CatalogError::Backend(Box::new(other)),
        }
    }
}

/// True when PostgreSQL rolled the transaction back as a serialization
/// failure or deadlock: running it again is safe.
fn rolled_back_by_conflict(e: &CatalogError) -> bool {
    let CatalogError::Busy(source) = e else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(retryable_state)
}

/// A column read as the wrong type is a damaged catalog, not a panic.
fn corrupt(e: tokio_postgres::Error) -> CatalogError {
    CatalogError::Corrupt(Box::new(e))
}

/// Where a PostgreSQL catalog is and how to log in. The password comes from
/// the URL (libpq's `postgres://user:password@…` or `?password=`) or from
/// [`PgConnect::password`]; it is never part of a message.
#[derive(Clone)]
pub struct PgConnect {
    url: String,
    password: Option<String>,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect")
            .field("url", &redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl PgConnect {
    /// A `postgres://` (or `postgresql://`) URL with libpq's parameters;
    /// `sslmode` may be `disable`, `prefer`, `require`, `verify-ca` or
    /// `verify-full`, and `sslrootcert` names a CA file.
    pub fn new(url: &str) -> PgConnect {
        PgConnect {
            url: url.to_string(),
            password: None,
        }
    }

    /// Sets the password (e.g. read from an environment variable), in place
    /// of one the URL may carry.
    pub fn password(mut self, password: Option<String>) -> PgConnect {
        self.password = password;
        self
    }

    /// The URL with any password replaced by `***`, for messages.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }

    /// True when `text` names a PostgreSQL catalog rather than a file.
    pub fn is_url(text: &str) -> bool {
        text.starts_with("postgres://") || text.starts_with("postgresql://")
    }

    /// The driver's configuration and the TLS settings the URL asks for.
    fn config(&self) -> CatalogResult<(tokio_postgres::Config, TlsWanted)> {
        let invalid =
            |what: &str| CatalogError::Invalid(format!("catalog URL {}: {what}", self.redacted()));
        if !PgConnect::is_url(&self.url) {
            return Err(invalid("not a postgres:// URL"));
        }
        // tokio-postgres knows sslmode up to `require` and no sslrootcert:
        // both are taken out here and applied to the TLS connector.
        let (base, query) = match self.url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (self.url.as_str(), ""),
        };
        let mut tls = TlsWanted {
            mode: SslMode::Prefer,
            root_cert: None,
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => {
                    tls.mode = v
                        .parse()
                        .map_err(|e: InvalidSslMode| invalid(&e.to_string()))?;
                }
                Some(("sslrootcert", v)) => tls.root_cert = Some(v.into()),
                _ => kept.push(pair),
            }
        }
        let mut url = base.to_string();
        if !kept.is_empty() {
            url.push('?');
            url.push_str(&kept.join("&"));
        }
        let mut config: tokio_postgres::Config = url
            .parse()
            // The driver's message may quote the URL: say only what is wrong.
            .map_err(|_| invalid("cannot be parsed (see libpq's connection URIs)"))?;
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if let Some(pw) = &self.password {
            config.password(pw.as_bytes());
        }
        if config.get_application_name().is_none() {
            config.application_name("strata");
        }
        config.connect_timeout(Duration::from_secs(10));
        Ok((config, tls))
    }
}

struct TlsWanted {
    mode: SslMode,
    root_cert: Option<std::path::PathBuf>,
}

/// Replaces the password of a URL's user info, and a `password=` parameter,
/// with `***`.
fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = &out[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                let start = scheme_end + 3 + colon + 1;
                out.replace_range(start..scheme_end + 3 + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some(("password", _)) => "password=***".to_string(),
                _ => p.to_string(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

/// TLS as the URL asked: certificates are always verified, against
/// `sslrootcert` when given, else the system's roots.
fn tls_connector(tls: &TlsWanted) -> CatalogResult<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.root_cert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                CatalogError::Invalid(format!("catalog sslrootcert {}: {e}", path.display()))
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    CatalogError::Invalid(format!("catalog sslrootcert {}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    CatalogError::Invalid(format!("catalog sslrootcert {}: {e}", path.display()))
                })?;
            }
        }
        None if tls.mode != SslMode::Disable => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
        None => {}
    }
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .map_err(|e| CatalogError::Invalid(format!("catalog TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The PostgreSQL catalog: a pool of connections to one database, on a
/// runtime of its own. Opening it applies the migrations it lacks.
pub struct PgCatalog {
    pool: Pool,
    runtime: Option<tokio::runtime::Runtime>,
    owner: LeaseOwner,
    lease: LeaseState,
}

impl Drop for PgCatalog {
    fn drop(&mut self) {
        // A runtime dropped inside an async context panics; this one may be
        // dropped anywhere, so it is let go without waiting.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl PgCatalog {
    /// Connects to the database `connect` names and brings its schema up to
    /// date (see [`MIGRATIONS`]).
    pub fn open(connect: &PgConnect) -> CatalogResult<PgCatalog> {
        let (config, tls) = connect.config()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-catalog")
            .enable_all()
            .build()
            .map_err(|e| CatalogError::Backend(Box::new(e)))?;
        let manager = Manager::from_config(
            config,
            tls_connector(&tls)?,
            // Verified: a pooled connection answers a round trip before it
            // is handed out, so connections the server dropped while idle
            // (a restart, a terminated backend) are replaced instead of
            // failing the calls that would have drawn them.
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| CatalogError::Backend(Box::new(e)))?;
        let catalog = PgCatalog {
            pool,
            runtime: Some(runtime),
            owner: LeaseOwner::random(),
            lease: LeaseState::new(),
        };
        catalog.call(|mut c| async move { migrate(&mut c).await })?;
        Ok(catalog)
    }

    /// Runs `f` with a pooled connection on the catalog's runtime and waits
    /// for its answer. `f` is run again (with a fresh future) when
    /// PostgreSQL rolled its transaction back as a serialization failure or
    /// deadlock.
    pub(crate) fn call<T, F, Fut>(&self, f: F) -> CatalogResult<T>
    where
        F: Fn(Object) -> Fut + Send + 'static,
        Fut: Future<Output = CatalogResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        let Some(runtime) = &self.runtime else {
            return Err(stopped());
        };
        runtime.spawn(async move {
            let mut attempt = 1;
            let result = loop {
                let r = match pool.get().await {
                    Ok(client) => f(client).await,
                    Err(e) => Err(e.into()),
                };
                match r {
                    Err(e) if attempt < TX_ATTEMPTS && rolled_back_by_conflict(&e) => {
                        tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                        attempt += 1;
                    }
                    r => break r,
                }
            };
            let _ = tx.send(result);
        });
        let answer = rx.recv().map_err(|_| stopped()).and_then(|r| r);
        self.lease.note(&answer);
        answer
    }
}

/// One statement's text and owned parameters, kept for every attempt of
/// its call.
struct Statement {
    sql: String,
    params: Params,
}

/// Owned statement parameters: each value is moved into a box, so a call
/// can run again (after a serialization failure) without its caller.
macro_rules! sql_params {
    ($($value:expr),* $(,)?) => {
        vec![$(Box::new($value) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>),*]
    };
}

// The shapes of almost every method: one statement with its parameters,
// answering the rows it changed, every row, at most one row or exactly one.
// A method that needs a transaction calls [`PgCatalog::call`] itself.
impl PgCatalog {
    fn statement<T, F, Fut>(
        &self,
        sql: impl Into<String>,
        params: Params,
        run: F,
    ) -> CatalogResult<T>
    where
        F: Fn(Object, std::sync::Arc<Statement>) -> Fut + Send + 'static,
        Fut: Future<Output = CatalogResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let st = std::sync::Arc::new(Statement {
            sql: sql.into(),
            params,
        });
        self.call(move |c| run(c, st.clone()))
    }

    /// Runs `statements`, each deleting by the one parameter `key`, in one
    /// transaction: the first deletes the row itself, the others the rows
    /// that depend on it, and they run only when the first found it.
    /// False when it did not.
    fn delete_with_dependents(
        &self,
        statements: &'static [&'static str],
        key: &str,
    ) -> CatalogResult<bool> {
        let key = key.to_string();
        self.call(move |mut c| {
            let key = key.clone();
            async move {
                let tx = c.transaction().await?;
                for (i, sql) in statements.iter().enumerate() {
                    if tx.execute(*sql, &[&key]).await? == 0 && i == 0 {
                        return Ok(false);
                    }
                }
                tx.commit().await?;
                Ok(true)
            }
        })
    }

    /// Runs one statement; answers how many rows it changed.
    fn execute(&self, sql: impl Into<String>, params: Params) -> CatalogResult<u64> {
        self.statement(sql, params, |c, st| async move {
            Ok(c.execute(&st.sql, &refs(&st.params)).await?)
        })
    }

    /// Runs one query; answers every row, mapped by `row`.
    fn query<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        params: Params,
        row: fn(&Row) -> CatalogResult<T>,
    ) -> CatalogResult<Vec<T>> {
        self.statement(sql, params, move |c, st| async move {
            all(c.query(&st.sql, &refs(&st.params)).await?, row)
        })
    }

    /// Runs one query answering at most one row, mapped by `row`.
    fn query_opt<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        params: Params,
        row: fn(&Row) -> CatalogResult<T>,
    ) -> CatalogResult<Option<T>> {
        self.statement(sql, params, move |c, st| async move {
            c.query_opt(&st.sql, &refs(&st.params))
                .await?
                .map(|r| row(&r))
                .transpose()
        })
    }

    /// Runs one query answering exactly one row, mapped by `row`.
    fn query_one<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        params: Params,
        row: fn(&Row) -> CatalogResult<T>,
    ) -> CatalogResult<T> {
        self.statement(sql, params, move |c, st| async move {
            row(&c.query_one(&st.sql, &refs(&st.params)).await?)
        })
    }
}

fn stopped() -> CatalogError {
    CatalogError::Busy("the catalog's runtime stopped before answering".into())
}

/// Applies the steps of [`MIGRATIONS`] the database lacks, all in one
/// transaction under an advisory lock: nodes starting together wait for
/// the first, then find nothing left to do.
async fn migrate(c: &mut Object) -> CatalogResult<()> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS strata_schema_migrations (
            version bigint PRIMARY KEY,
            description text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let version: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM strata_schema_migrations",
            &[],
        )
        .await?
        .try_get(0)
        .map_err(corrupt)?;
    let supported = MIGRATIONS.last().map_or(0, |m| m.version);
    if version > supported {
        return Err(CatalogError::NewerSchema {
            found: version,
            supported,
        });
    }
    for step in MIGRATIONS.iter().filter(|m| m.version > version) {
        tx.batch_execute(step.postgres).await?;
        tx.execute(
            "INSERT INTO strata_schema_migrations (version, description) VALUES ($1, $2)",
            &[&step.version, &step.description],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

// Row mapping: one reader and one parameter list per entity, so a change of
// a field's type touches one place.

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> CatalogResult<T> {
    r.try_get(i).map_err(corrupt)
}

fn get_u64(r: &Row, i: usize) -> CatalogResult<u64> {
    let v: i64 = get(r, i)?;
    u64::try_from(v).map_err(|_| CatalogError::Invalid(format!("negative count {v} in column {i}")))
}

fn get_opt_u32(r: &Row, i: usize) -> CatalogResult<Option<u32>> {
    get::<Option<i64>>(r, i)?
        .map(|v| u32::try_from(v).map_err(|_| CatalogError::Invalid(format!("{v} in column {i}"))))
        .transpose()
}

fn get_u32(r: &Row, i: usize) -> CatalogResult<u32> {
    let v: i64 = get(r, i)?;
    u32::try_from(v).map_err(|_| CatalogError::Invalid(format!("{v} in column {i}")))
}

fn get_parsed<T>(r: &Row, i: usize) -> CatalogResult<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text: String = get(r, i)?;
    text.parse()
        .map_err(|e: T::Err| CatalogError::Corrupt(format!("{text:?}: {e}").into()))
}

/// A lease length as the microseconds a statement multiplies into an
/// interval (`now() + $n * interval '1 microsecond'`).
fn lease_micros(ttl: chrono::Duration) -> CatalogResult<i64> {
    ttl.num_microseconds()
        .ok_or_else(|| CatalogError::Invalid(format!("lease of {ttl}")))
}

/// A repository hold's lifetime, as [`RepoHold::expiry`] bounds it.
fn hold_micros(hold: &RepoHold) -> CatalogResult<i64> {
    lease_micros(chrono::Duration::from_std(hold.ttl).unwrap_or(chrono::Duration::days(1)))
}

fn lsn_to_sql(l: Lsn) -> i64 {
    l.0 as i64
}

fn lsn_from_sql(v: i64) -> Lsn {
    Lsn(v as u64)
}

fn opt_i64<T: TryInto<i64>>(v: Option<T>) -> Option<i64> {
    v.and_then(|v| v.try_into().ok())
}

type Params = Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>;

fn refs(p: &Params) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

const INSTANCE_COLS: &str = "id, host, port, user_name, password_env, dbname, sslmode, sslrootcert, system_identifier, pg_version_num, wal_segment_size, created_at, password, agent_url, agent_key, agent_ca";

fn instance_params(i: &Instance) -> Params {
    vec![
        Box::new(i.id.to_string()),
        Box::new(i.host.clone()),
        Box::new(i64::from(i.port)),
        Box::new(i.user.clone()),
        Box::new(i.password_env.clone()),
        Box::new(i.dbname.clone()),
        Box::new(i.sslmode.as_str().to_string()),
        Box::new(i.sslrootcert.clone()),
        Box::new(i.system_identifier.map(|v| v.to_string())),
        Box::new(opt_i64(i.pg_version_num)),
        Box::new(opt_i64(i.wal_segment_size)),
        Box::new(i.created_at),
        Box::new(i.password.clone()),
        Box::new(i.agent_url.clone()),
        Box::new(i.agent_key.clone()),
        Box::new(i.agent_ca.clone()),
    ]
}

fn instance_from_row(r: &Row) -> CatalogResult<Instance> {
    Ok(Instance {
        id: get::<String>(r, 0)?.into(),
        host: get(r, 1)?,
        port: u16::try_from(get::<i64>(r, 2)?)
            .map_err(|e| CatalogError::Invalid(format!("port: {e}")))?,
        user: get(r, 3)?,
        password_env: get(r, 4)?,
        dbname: get(r, 5)?,
        sslmode: get_parsed(r, 6)?,
        sslrootcert: get(r, 7)?,
        system_identifier: get::<Option<String>>(r, 8)?.and_then(|s| s.parse().ok()),
        pg_version_num: get_opt_u32(r, 9)?,
        wal_segment_size: get::<Option<i64>>(r, 10)?.map(|v| v as u64),
        created_at: get(r, 11)?,
        password: get(r, 12)?,
        agent_url: get(r, 13)?,
        agent_key: get(r, 14)?,
        agent_ca: get(r, 15)?,
    })
}

const BACKUP_COLS: &str = "id, instance_id, status, mode, started_at, finished_at, start_lsn, stop_lsn, start_timeline, stop_timeline, pg_version_num, total_bytes, new_bytes, dedup_bytes, stored_bytes, file_count, error, job_id, method, snapshot_local, snapshot_uploaded, snapshot_bytes, kept, keep_until, keep_note, taken_rule, taken_retention_days, snapshot_fingerprint";

fn backup_params(b: &BackupSet) -> Params {
    vec![
        Box::new(b.id.to_string()),
        Box::new(b.instance_id.to_string()),
        Box::new(b.status.as_str().to_string()),
        Box::new(b.mode.as_str().to_string()),
        Box::new(b.started_at),
        Box::new(b.finished_at),
        Box::new(b.start_lsn.map(lsn_to_sql)),
        Box::new(b.stop_lsn.map(lsn_to_sql)),
        Box::new(b.start_timeline.map(|t| i64::from(t.0))),
        Box::new(b.stop_timeline.map(|t| i64::from(t.0))),
        Box::new(opt_i64(b.pg_version_num)),
        Box::new(b.total_bytes as i64),
        Box::new(b.new_bytes as i64),
        Box::new(b.dedup_bytes as i64),
        Box::new(b.stored_bytes as i64),
        Box::new(b.file_count as i64),
        Box::new(b.error.clone()),
        Box::new(b.job_id.map(JobId::get)),
        Box::new(b.method.as_str().to_string()),
        Box::new(b.snapshot_local),
        Box::new(b.snapshot_uploaded),
        Box::new(b.snapshot_bytes.map(|v| v as i64)),
        Box::new(b.keep_until.is_some()),
        Box::new(keep_until_sql(b.keep_until)),
        Box::new(b.keep_note.clone()),
        Box::new(b.taken_under.as_ref().map(|t| t.rule.clone())),
        Box::new(b.taken_under.as_ref().map(|t| i64::from(t.retention_days))),
        Box::new(b.snapshot_fingerprint.clone()),
    ]
}

fn backup_from_row(r: &Row) -> CatalogResult<BackupSet> {
    let status: String = get(r, 2)?;
    Ok(BackupSet {
        id: get::<String>(r, 0)?.into(),
        instance_id: get::<String>(r, 1)?.into(),
        status: BackupStatus::parse(&status)
            .map_err(|e| CatalogError::Corrupt(e.to_string().into()))?,
        mode: get_parsed(r, 3)?,
        started_at: get(r, 4)?,
        finished_at: get(r, 5)?,
        start_lsn: get::<Option<i64>>(r, 6)?.map(lsn_from_sql),
        stop_lsn: get::<Option<i64>>(r, 7)?.map(lsn_from_sql),
        start_timeline: get_opt_u32(r, 8)?.map(TimelineId),
        stop_timeline: get_opt_u32(r, 9)?.map(TimelineId),
        pg_version_num: get_opt_u32(r, 10)?,
        total_bytes: get_u64(r, 11)?,
        new_bytes: get_u64(r, 12)?,
        dedup_bytes: get_u64(r, 13)?,
        stored_bytes: get_u64(r, 14)?,
        file_count: get_u64(r, 15)?,
        error: get(r, 16)?,
        job_id: get::<Option<i64>>(r, 17)?.map(JobId::new),
        method: get_parsed(r, 18)?,
        snapshot_local: get(r, 19)?,
        snapshot_uploaded: get(r, 20)?,
        snapshot_bytes: get::<Option<i64>>(r, 21)?.map(|v| v as u64),
        keep_until: keep_from_sql(get(r, 22)?, get(r, 23)?),
        keep_note: get(r, 24)?,
        taken_under: taken_from_sql(get(r, 25)?, get_opt_u32(r, 26)?),
        snapshot_fingerprint: get(r, 27)?,
    })
}

const WAL_COLS: &str = "instance_id, timeline, segment, partial, begin_lsn, end_lsn, size, checksum, first_commit, last_commit, commit_count, min_commit_xid, max_commit_xid, object_key, stored_at";

fn wal_params(w: &WalSegmentRow) -> Params {
    vec![
        Box::new(w.instance_id.to_string()),
        Box::new(i64::from(w.timeline.0)),
        Box::new(w.segment.clone()),
        Box::new(w.partial),
        Box::new(lsn_to_sql(w.begin_lsn)),
        Box::new(lsn_to_sql(w.end_lsn)),
        Box::new(w.size as i64),
        Box::new(w.checksum.clone()),
        Box::new(w.first_commit),
        Box::new(w.last_commit),
        Box::new(w.commit_count as i64),
        Box::new(opt_i64(w.min_commit_xid)),
        Box::new(opt_i64(w.max_commit_xid)),
        Box::new(w.object_key.clone()),
        Box::new(w.stored_at),
    ]
}

fn wal_from_row(r: &Row) -> CatalogResult<WalSegmentRow> {
    Ok(WalSegmentRow {
        instance_id: get::<String>(r, 0)?.into(),
        timeline: TimelineId(get_u32(r, 1)?),
        segment: get(r, 2)?,
        partial: get(r, 3)?,
        begin_lsn: lsn_from_sql(get(r, 4)?),
        end_lsn: lsn_from_sql(get(r, 5)?),
        size: get_u64(r, 6)?,
        checksum: get(r, 7)?,
        first_commit: get(r, 8)?,
        last_commit: get(r, 9)?,
        commit_count: get_u64(r, 10)?,
        min_commit_xid: get_opt_u32(r, 11)?,
        max_commit_xid: get_opt_u32(r, 12)?,
        object_key: get(r, 13)?,
        stored_at: get(r, 14)?,
    })
}

const JOB_COLS: &str = "id, kind, instance_id, state, progress, detail, backup_id, started_at, finished_at, error, pid, owner, heartbeat_at, queued, node_id, lease_ms";

fn job_from_row(r: &Row) -> CatalogResult<Job> {
    let state: String = get(r, 3)?;
    let started_at = get(r, 7)?;
    Ok(Job {
        id: JobId::new(get(r, 0)?),
        kind: get_parsed(r, 1)?,
        instance_id: get::<Option<String>>(r, 2)?.map(Into::into),
        state: JobState::parse(&state).map_err(|e| CatalogError::Corrupt(e.to_string().into()))?,
        progress: u8::try_from(get::<i64>(r, 4)?)
            .map_err(|e| CatalogError::Invalid(format!("job progress: {e}")))?,
        detail: get(r, 5)?,
        backup_id: get::<Option<String>>(r, 6)?.map(Into::into),
        finished_at: get(r, 8)?,
        error: get(r, 9)?,
        pid: get_u32(r, 10)?,
        // Rows from before leases existed belong to no live owner.
        owner: LeaseOwner::from_stored(get::<Option<String>>(r, 11)?.unwrap_or_default()),
        heartbeat_at: get::<Option<DateTime<Utc>>>(r, 12)?.unwrap_or(started_at),
        queued: get(r, 13)?,
        node_id: get(r, 14)?,
        lease_ms: get(r, 15)?,
        started_at,
    })
}

const MANAGED_COLS: &str = "instance_id, source_instance, backup_id, restore_time, data_dir, port, pg_major, status, error, created_at, agent_clone";

fn managed_params(m: &ManagedInstance) -> Params {
    vec![
        Box::new(m.instance_id.to_string()),
        Box::new(m.source_instance.to_string()),
        Box::new(m.backup_id.as_deref().map(str::to_string)),
        Box::new(m.restore_time),
        Box::new(m.data_dir.clone()),
        Box::new(i64::from(m.port)),
        Box::new(i64::from(m.pg_major)),
        Box::new(m.status.clone()),
        Box::new(m.error.clone()),
        Box::new(m.created_at),
        Box::new(m.agent_clone.clone()),
    ]
}

fn managed_from_row(r: &Row) -> CatalogResult<ManagedInstance> {
    Ok(ManagedInstance {
        instance_id: get::<String>(r, 0)?.into(),
        source_instance: get::<String>(r, 1)?.into(),
        backup_id: get::<Option<String>>(r, 2)?.map(Into::into),
        restore_time: get(r, 3)?,
        data_dir: get(r, 4)?,
        port: u16::try_from(get::<i64>(r, 5)?)
            .map_err(|e| CatalogError::Invalid(format!("port: {e}")))?,
        pg_major: get_u32(r, 6)?,
        status: get(r, 7)?,
        error: get(r, 8)?,
        created_at: get(r, 9)?,
        agent_clone: get(r, 10)?,
    })
}

const DRILL_COLS: &str = "backup_id, instance_id, status, detail, started_at, finished_at, job_id";

fn drill_params(d: &DrillResult) -> Params {
    vec![
        Box::new(d.backup_id.to_string()),
        Box::new(d.instance_id.to_string()),
        Box::new(d.status.clone()),
        Box::new(d.detail.clone()),
        Box::new(d.started_at),
        Box::new(d.finished_at),
        Box::new(d.job_id.map(JobId::get)),
    ]
}

fn drill_from_row(r: &Row) -> CatalogResult<DrillResult> {
    Ok(DrillResult {
        backup_id: get::<String>(r, 0)?.into(),
        instance_id: get::<String>(r, 1)?.into(),
        status: get(r, 2)?,
        detail: get(r, 3)?,
        started_at: get(r, 4)?,
        finished_at: get(r, 5)?,
        job_id: get::<Option<i64>>(r, 6)?.map(JobId::new),
    })
}

const POLICY_COLS: &str = "instance_id, backup_days, backup_window, backup_retention_days, log_backup_enabled, log_retention_days, updated_at, last_auto_slot, backup_method, backup_interval_minutes, advanced_enabled, advanced_data_rules, advanced_log_retention_days, archive_retention_days, archive_keep_policy, archive_keep_count, keep_last";

fn policy_params(p: &BackupPolicy) -> CatalogResult<Params> {
    Ok(vec![
        Box::new(p.instance_id.to_string()),
        Box::new(p.backup_days.join(",")),
        Box::new(p.backup_window.clone()),
        Box::new(i64::from(p.backup_retention_days)),
        Box::new(p.log_backup_enabled),
        Box::new(i64::from(p.log_retention_days)),
        Box::new(p.updated_at),
        Box::new(p.last_auto_slot),
        Box::new(p.backup_method.as_str().to_string()),
        Box::new(opt_i64(p.backup_interval_minutes)),
        Box::new(p.advanced_enabled),
        Box::new(rules_to_sql(&p.advanced_data_rules)?),
        Box::new(opt_i64(p.advanced_log_retention_days)),
        Box::new(i64::from(p.archive_retention_days)),
        Box::new(p.archive_keep_policy.as_str().to_string()),
        Box::new(i64::from(p.archive_keep_count)),
        Box::new(opt_i64(p.keep_last)),
    ])
}

fn policy_from_row(r: &Row) -> CatalogResult<BackupPolicy> {
    let days: String = get(r, 1)?;
    Ok(BackupPolicy {
        instance_id: get::<String>(r, 0)?.into(),
        backup_days: days
            .split(',')
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect(),
        backup_window: get(r, 2)?,
        backup_retention_days: get_u32(r, 3)?,
        log_backup_enabled: get(r, 4)?,
        log_retention_days: get_u32(r, 5)?,
        updated_at: get(r, 6)?,
        last_auto_slot: get(r, 7)?,
        backup_method: get_parsed(r, 8)?,
        backup_interval_minutes: get_opt_u32(r, 9)?,
        advanced_enabled: get(r, 10)?,
        advanced_data_rules: rules_from_sql(&get::<String>(r, 11)?)?,
        advanced_log_retention_days: get_opt_u32(r, 12)?,
        archive_retention_days: get_u32(r, 13)?,
        archive_keep_policy: get_parsed(r, 14)?,
        archive_keep_count: get_u32(r, 15)?,
        keep_last: get_opt_u32(r, 16)?,
    })
}

const CROSS_POLICY_COLS: &str = "instance_id, region, backup_enabled, log_backup_enabled, retention_days, backup_enabled_at, log_backup_enabled_at, updated_at";

fn cross_policy_params(p: &CrossBackupPolicy) -> Params {
    vec![
        Box::new(p.instance_id.to_string()),
        Box::new(p.region.clone()),
        Box::new(p.backup_enabled),
        Box::new(p.log_backup_enabled),
        Box::new(i64::from(p.retention_days)),
        Box::new(p.backup_enabled_at),
        Box::new(p.log_backup_enabled_at),
        Box::new(p.updated_at),
    ]
}

fn cross_policy_from_row(r: &Row) -> CatalogResult<CrossBackupPolicy> {
    Ok(CrossBackupPolicy {
        instance_id: get::<String>(r, 0)?.into(),
        region: get(r, 1)?,
        backup_enabled: get(r, 2)?,
        log_backup_enabled: get(r, 3)?,
        retention_days: get_u32(r, 4)?,
        backup_enabled_at: get(r, 5)?,
        log_backup_enabled_at: get(r, 6)?,
        updated_at: get(r, 7)?,
    })
}

const SAMPLE_COLS: &str =
    "instance_id, sampled_at, logical_bytes, data_bytes, wal_bytes, quota_bytes, cross_region_bytes";

fn sample_params(u: &UsageSample) -> Params {
    vec![
        Box::new(u.instance_id.to_string()),
        Box::new(u.at),
        Box::new(u.logical_bytes as i64),
        Box::new(u.data_bytes as i64),
        Box::new(u.wal_bytes as i64),
        Box::new(u.quota_bytes as i64),
        Box::new(u.cross_region_bytes.map(|n| n as i64)),
    ]
}

fn sample_from_row(r: &Row) -> CatalogResult<UsageSample> {
    Ok(UsageSample {
        instance_id: get::<String>(r, 0)?.into(),
        at: get(r, 1)?,
        logical_bytes: get_u64(r, 2)?,
        data_bytes: get_u64(r, 3)?,
        wal_bytes: get_u64(r, 4)?,
        quota_bytes: get_u64(r, 5)?,
        cross_region_bytes: get::<Option<i64>>(r, 6)?.map(|n| n as u64),
    })
}

const KEY_COLS: &str = "id, secret, read_only, description, created_at";

fn key_params(k: &AccessKey) -> Params {
    vec![
        Box::new(k.id.clone()),
        Box::new(k.secret.clone()),
        Box::new(k.read_only),
        Box::new(k.description.clone()),
        Box::new(k.created_at),
    ]
}

fn key_from_row(r: &Row) -> CatalogResult<AccessKey> {
    Ok(AccessKey {
        id: get(r, 0)?,
        secret: get(r, 1)?,
        read_only: get(r, 2)?,
        description: get(r, 3)?,
        created_at: get(r, 4)?,
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> CatalogResult<String> {
    serde_json::to_string(v).map_err(|e| CatalogError::Invalid(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> CatalogResult<T> {
    serde_json::from_str(text).map_err(|e| CatalogError::Corrupt(Box::new(e)))
}

/// `$1, $2, … $n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `a = EXCLUDED.a, …` for every column of `cols` but the first `key` ones.
fn excluded(cols: &str, key: usize) -> String {
    cols.split(", ")
        .skip(key)
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every row of a query mapped by `f`.
fn all<T>(rows: Vec<Row>, f: fn(&Row) -> CatalogResult<T>) -> CatalogResult<Vec<T>> {
    rows.iter().map(f).collect()
}

impl InstanceCatalog for PgCatalog {
    fn add_instance(&self, i: &Instance) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO instances ({INSTANCE_COLS}) VALUES ({}) ON CONFLICT (id) DO NOTHING",
            placeholders(16)
        );
        if self.execute(sql, instance_params(i))? == 0 {
            return Err(CatalogError::InstanceExists(i.id.to_string()));
        }
        Ok(())
    }

    fn update_instance(&self, i: &Instance) -> CatalogResult<()> {
        // Everything but the registration time (parameter 12).
        let mut p = instance_params(i);
        p.remove(11);
        let n = self.execute(
            "UPDATE instances SET host=$2, port=$3, user_name=$4, password_env=$5, dbname=$6, sslmode=$7, sslrootcert=$8, system_identifier=$9, pg_version_num=$10, wal_segment_size=$11, password=$12, agent_url=$13, agent_key=$14, agent_ca=$15 WHERE id=$1",
            p,
        )?;
        if n == 0 {
            return Err(CatalogError::InstanceNotFound(i.id.to_string()));
        }
        Ok(())
    }

    fn get_instance(&self, id: &str) -> CatalogResult<Instance> {
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = $1");
        self.query_opt(sql, sql_params![id.to_string()], instance_from_row)?
            .ok_or_else(|| CatalogError::InstanceNotFound(id.to_string()))
    }

    fn list_instances(&self) -> CatalogResult<Vec<Instance>> {
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances ORDER BY id");
        self.query(sql, sql_params![], instance_from_row)
    }

    fn delete_instance(&self, id: &str) -> CatalogResult<()> {
        let statements = &[
            "DELETE FROM instances WHERE id = $1",
            "DELETE FROM backup_policies WHERE instance_id = $1",
            "DELETE FROM instance_owners WHERE instance_id = $1",
            "DELETE FROM wal_receivers WHERE instance_id = $1",
            "DELETE FROM relation_names WHERE instance_id = $1",
            "DELETE FROM database_names WHERE instance_id = $1",
        ];
        if !self.delete_with_dependents(statements, id)? {
            return Err(CatalogError::InstanceNotFound(id.to_string()));
        }
        Ok(())
    }

    fn put_managed(&self, m: &ManagedInstance) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO managed_instances ({MANAGED_COLS}) VALUES ({}) ON CONFLICT (instance_id) DO UPDATE SET {}",
            placeholders(11),
            excluded(MANAGED_COLS, 1)
        );
        self.execute(sql, managed_params(m)).map(drop)
    }

    fn get_managed(&self, instance_id: &str) -> CatalogResult<Option<ManagedInstance>> {
        let sql = format!("SELECT {MANAGED_COLS} FROM managed_instances WHERE instance_id = $1");
        self.query_opt(sql, sql_params![instance_id.to_string()], managed_from_row)
    }

    fn list_managed(&self) -> CatalogResult<Vec<ManagedInstance>> {
        let sql = format!(
            "SELECT {MANAGED_COLS} FROM managed_instances ORDER BY created_at, instance_id"
        );
        self.query(sql, sql_params![], managed_from_row)
    }

    fn delete_managed(&self, instance_id: &str) -> CatalogResult<()> {
        self.execute(
            "DELETE FROM managed_instances WHERE instance_id = $1",
            sql_params![instance_id.to_string()],
        )
        .map(drop)
    }
}

impl PgCatalog {
    /// [`CatalogError::BackupRunning`] for a write of `b` that broke the
    /// rule of one running set per instance (the unique index
    /// `backup_sets_one_running`); any other error as it is.
    fn running_conflict(&self, e: CatalogError, b: &BackupSet) -> CatalogError {
        let CatalogError::Conflict(source) = &e else {
            return e;
        };
        let broke_the_rule = source
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(|e| e.as_db_error())
            .and_then(|e| e.constraint())
            == Some("backup_sets_one_running");
        if !broke_the_rule {
            return e;
        }
        let running = self
            .query_opt(
                "SELECT id FROM backup_sets WHERE instance_id = $1 AND status = 'Running'",
                sql_params![b.instance_id.to_string()],
                |r| get::<String>(r, 0),
            )
            .ok()
            .flatten()
            .unwrap_or_else(|| "that has ended since".to_string());
        CatalogError::BackupRunning {
            instance_id: b.instance_id.to_string(),
            running,
        }
    }
}

impl BackupCatalog for PgCatalog {
    fn insert_backup(&self, b: &BackupSet) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO backup_sets ({BACKUP_COLS}) VALUES ({}) ON CONFLICT (id) DO NOTHING",
            placeholders(28)
        );
        match self.execute(sql, backup_params(b)) {
            Ok(0) => Err(CatalogError::BackupExists(b.id.to_string())),
            Ok(_) => Ok(()),
            Err(e) => Err(self.running_conflict(e, b)),
        }
    }

    fn update_backup(&self, b: &BackupSet) -> CatalogResult<()> {
        let set = std::sync::Arc::new(b.clone());
        let p = std::sync::Arc::new(backup_params(b));
        let owner = self.owner.clone();
        let sql = format!(
            "UPDATE backup_sets SET ({BACKUP_COLS}) = ({}) WHERE id = $1",
            placeholders(28)
        );
        self.call(move |mut c| {
            let (set, p, owner, sql) = (set.clone(), p.clone(), owner.clone(), sql.clone());
            async move {
                // The row stays locked from the checks to the write: a
                // takeover cannot land between them.
                let tx = c.transaction().await?;
                let existing = tx
                    .query_opt(
                        &format!("SELECT {BACKUP_COLS} FROM backup_sets WHERE id = $1 FOR UPDATE"),
                        &[&set.id.as_str()],
                    )
                    .await?
                    .map(|r| backup_from_row(&r))
                    .transpose()?
                    .ok_or_else(|| CatalogError::BackupNotFound(set.id.to_string()))?;
                if existing.instance_id != set.instance_id {
                    return Err(CatalogError::Invalid(format!(
                        "backup set {} belongs to instance {}, not {}",
                        set.id, existing.instance_id, set.instance_id
                    )));
                }
                // A set failed by a takeover stays failed: its old owner may
                // still be running after a pause longer than its lease.
                if existing.status == BackupStatus::Failed && set.status != BackupStatus::Failed {
                    if let Some(job_id) = existing.job_id {
                        let job = tx
                            .query_opt(
                                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1"),
                                &[&job_id.get()],
                            )
                            .await?
                            .map(|r| job_from_row(&r))
                            .transpose()?
                            .ok_or(CatalogError::JobNotFound(job_id))?;
                        if job.state.is_terminal() && job.owner != owner {
                            return Err(CatalogError::LeaseLost(job_id));
                        }
                    }
                }
                tx.execute(&sql, &refs(&p)).await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .map_err(|e| self.running_conflict(e, b))
    }

    fn get_backup(&self, id: &str) -> CatalogResult<BackupSet> {
        let sql = format!("SELECT {BACKUP_COLS} FROM backup_sets WHERE id = $1");
        self.query_opt(sql, sql_params![id.to_string()], backup_from_row)?
            .ok_or_else(|| CatalogError::BackupNotFound(id.to_string()))
    }

    fn list_backups(&self, instance_id: &str) -> CatalogResult<Vec<BackupSet>> {
        let sql = format!(
            "SELECT {BACKUP_COLS} FROM backup_sets WHERE instance_id = $1 ORDER BY started_at, id"
        );
        self.query(sql, sql_params![instance_id.to_string()], backup_from_row)
    }

    fn list_detached_backups(&self) -> CatalogResult<Vec<BackupSet>> {
        let sql = format!(
            "SELECT {BACKUP_COLS} FROM backup_sets WHERE instance_id NOT IN (SELECT id FROM instances) ORDER BY started_at, id"
        );
        self.query(sql, sql_params![], backup_from_row)
    }

    fn delete_backup(&self, id: &str) -> CatalogResult<()> {
        let statements = &[
            "DELETE FROM backup_sets WHERE id = $1",
            "DELETE FROM backup_drills WHERE backup_id = $1",
        ];
        if !self.delete_with_dependents(statements, id)? {
            return Err(CatalogError::BackupNotFound(id.to_string()));
        }
        Ok(())
    }

    fn put_drill(&self, d: &DrillResult) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO backup_drills ({DRILL_COLS}) VALUES ({}) ON CONFLICT (backup_id) DO UPDATE SET {}",
            placeholders(7),
            excluded(DRILL_COLS, 1)
        );
        self.execute(sql, drill_params(d)).map(drop)
    }

    fn get_drill(&self, backup_id: &str) -> CatalogResult<Option<DrillResult>> {
        let sql = format!("SELECT {DRILL_COLS} FROM backup_drills WHERE backup_id = $1");
        self.query_opt(sql, sql_params![backup_id.to_string()], drill_from_row)
    }

    fn list_drills(&self, instance_id: &str) -> CatalogResult<Vec<DrillResult>> {
        let sql = format!(
            "SELECT {DRILL_COLS} FROM backup_drills WHERE instance_id = $1 ORDER BY started_at"
        );
        self.query(sql, sql_params![instance_id.to_string()], drill_from_row)
    }
}

impl WalCatalog for PgCatalog {
    fn upsert_wal_segment(&self, w: &WalSegmentRow) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO wal_segments ({WAL_COLS}) VALUES ({}) ON CONFLICT (instance_id, timeline, segment, partial) DO UPDATE SET {}",
            placeholders(15),
            excluded(WAL_COLS, 4)
        );
        self.execute(sql, wal_params(w)).map(drop)
    }

    fn delete_wal_segment(
        &self,
        instance_id: &str,
        timeline: TimelineId,
        segment: &str,
        partial: bool,
    ) -> CatalogResult<()> {
        self.execute(
            "DELETE FROM wal_segments WHERE instance_id=$1 AND timeline=$2 AND segment=$3 AND partial=$4",
            sql_params![
                instance_id.to_string(),
                i64::from(timeline.0),
                segment.to_string(),
                partial
            ],
        )
        .map(drop)
    }

    fn find_wal_segment(
        &self,
        instance_id: &str,
        timeline: TimelineId,
        segment: &str,
    ) -> CatalogResult<Vec<WalSegmentRow>> {
        let sql = format!(
            "SELECT {WAL_COLS} FROM wal_segments WHERE instance_id = $1 AND timeline = $2 AND segment = $3 ORDER BY partial"
        );
        let p = sql_params![
            instance_id.to_string(),
            i64::from(timeline.0),
            segment.to_string()
        ];
        self.query(sql, p, wal_from_row)
    }

    fn list_wal_segments(&self, instance_id: &str) -> CatalogResult<Vec<WalSegmentRow>> {
        let sql = format!(
            "SELECT {WAL_COLS} FROM wal_segments WHERE instance_id = $1 ORDER BY timeline, segment, partial"
        );
        self.query(sql, sql_params![instance_id.to_string()], wal_from_row)
    }

    fn upsert_restore_point(&self, r: &RestorePointRow) -> CatalogResult<()> {
        self.execute(
            "INSERT INTO restore_points (instance_id, timeline, name, lsn, time) VALUES ($1,$2,$3,$4,$5) \
             ON CONFLICT (instance_id, lsn) DO UPDATE SET timeline = EXCLUDED.timeline, name = EXCLUDED.name, time = EXCLUDED.time",
            sql_params![
                r.instance_id.to_string(),
                i64::from(r.timeline.0),
                r.name.clone(),
                lsn_to_sql(r.lsn),
                r.time
            ],
        )
        .map(drop)
    }

    fn list_restore_points(&self, instance_id: &str) -> CatalogResult<Vec<RestorePointRow>> {
        self.query(
            "SELECT instance_id, timeline, name, lsn, time FROM restore_points WHERE instance_id = $1 ORDER BY lsn",
            sql_params![instance_id.to_string()],
            |r| {
                Ok(RestorePointRow {
                    instance_id: get::<String>(r, 0)?.into(),
                    timeline: TimelineId(get_u32(r, 1)?),
                    name: get(r, 2)?,
                    lsn: lsn_from_sql(get(r, 3)?),
                    time: get(r, 4)?,
                })
            },
        )
    }

    fn upsert_recovery_event(&self, e: &RecoveryEventRow) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO recovery_events ({EVENT_COLS}) VALUES ({}) ON CONFLICT (instance_id, timeline, lsn, seq) DO UPDATE SET {}",
            placeholders(17),
            excluded(EVENT_COLS, 4)
        );
        self.execute(
            sql,
            sql_params![
                e.instance_id.to_string(),
                i64::from(e.timeline.0),
                lsn_to_sql(e.lsn),
                i64::from(e.seq),
                lsn_to_sql(e.end_lsn),
                e.kind.clone(),
                i64::from(e.xid),
                e.time,
                i64::from(e.db_oid),
                e.relfilenode.map(i64::from),
                e.rel_oid.map(i64::from),
                e.database.clone(),
                e.schema.clone(),
                e.table.clone(),
                opt_i64(e.rows),
                files_to_text(&e.filled),
                e.before_lsn.map(lsn_to_sql)
            ],
        )
        .map(drop)
    }

    fn list_recovery_events(
        &self,
        instance_id: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> CatalogResult<Vec<RecoveryEventRow>> {
        self.query(
            format!(
                "SELECT {EVENT_COLS} FROM recovery_events WHERE instance_id = $1 \
                 AND ($2::timestamptz IS NULL OR time >= $2) AND ($3::timestamptz IS NULL OR time <= $3) \
                 ORDER BY timeline, lsn, seq"
            ),
            sql_params![instance_id.to_string(), since, until],
            |r| {
                Ok(RecoveryEventRow {
                    instance_id: get::<String>(r, 0)?.into(),
                    timeline: TimelineId(get_u32(r, 1)?),
                    lsn: lsn_from_sql(get(r, 2)?),
                    seq: get_u32(r, 3)?,
                    end_lsn: lsn_from_sql(get(r, 4)?),
                    kind: get(r, 5)?,
                    xid: get_u32(r, 6)?,
                    time: get(r, 7)?,
                    db_oid: get_u32(r, 8)?,
                    relfilenode: get_opt_u32(r, 9)?,
                    rel_oid: get_opt_u32(r, 10)?,
                    database: get(r, 11)?,
                    schema: get(r, 12)?,
                    table: get(r, 13)?,
                    rows: get::<Option<i64>>(r, 14)?.map(|v| v.max(0) as u64),
                    filled: files_from_text(&get::<String>(r, 15)?)?,
                    before_lsn: get::<Option<i64>>(r, 16)?.map(lsn_from_sql),
                })
            },
        )
    }

    fn upsert_names(
        &self,
        relations: &[RelationNameRow],
        databases: &[DatabaseNameRow],
    ) -> CatalogResult<()> {
        let (relations, databases) = (relations.to_vec(), databases.to_vec());
        self.call(move |mut c| {
            let (relations, databases) = (relations.clone(), databases.clone());
            async move {
                let tx = c.transaction().await?;
                for r in &relations {
                    tx.execute(
                        "INSERT INTO relation_names (instance_id, db_oid, relfilenode, rel_oid, schema_name, rel_name, rel_kind, seen_at) \
                         VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (instance_id, db_oid, relfilenode) DO UPDATE SET \
                         rel_oid = EXCLUDED.rel_oid, schema_name = EXCLUDED.schema_name, rel_name = EXCLUDED.rel_name, \
                         rel_kind = EXCLUDED.rel_kind, seen_at = EXCLUDED.seen_at",
                        &[
                            &r.instance_id.to_string(),
                            &i64::from(r.db_oid),
                            &i64::from(r.relfilenode),
                            &i64::from(r.rel_oid),
                            &r.schema,
                            &r.name,
                            &r.kind,
                            &r.seen_at,
                        ],
                    )
                    .await?;
                }
                for d in &databases {
                    tx.execute(
                        "INSERT INTO database_names (instance_id, db_oid, name, seen_at) VALUES ($1,$2,$3,$4) \
                         ON CONFLICT (instance_id, db_oid) DO UPDATE SET name = EXCLUDED.name, seen_at = EXCLUDED.seen_at",
                        &[&d.instance_id.to_string(), &i64::from(d.db_oid), &d.name, &d.seen_at],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        })
    }

    fn list_names(
        &self,
        instance_id: &str,
    ) -> CatalogResult<(Vec<RelationNameRow>, Vec<DatabaseNameRow>)> {
        let relations = self.query(
            "SELECT instance_id, db_oid, relfilenode, rel_oid, schema_name, rel_name, rel_kind, seen_at \
             FROM relation_names WHERE instance_id = $1 ORDER BY db_oid, relfilenode",
            sql_params![instance_id.to_string()],
            |r| {
                Ok(RelationNameRow {
                    instance_id: get::<String>(r, 0)?.into(),
                    db_oid: get_u32(r, 1)?,
                    relfilenode: get_u32(r, 2)?,
                    rel_oid: get_u32(r, 3)?,
                    schema: get(r, 4)?,
                    name: get(r, 5)?,
                    kind: get(r, 6)?,
                    seen_at: get(r, 7)?,
                })
            },
        )?;
        let databases = self.query(
            "SELECT instance_id, db_oid, name, seen_at FROM database_names WHERE instance_id = $1 ORDER BY db_oid",
            sql_params![instance_id.to_string()],
            |r| {
                Ok(DatabaseNameRow {
                    instance_id: get::<String>(r, 0)?.into(),
                    db_oid: get_u32(r, 1)?,
                    name: get(r, 2)?,
                    seen_at: get(r, 3)?,
                })
            },
        )?;
        Ok((relations, databases))
    }
}

const EVENT_COLS: &str = "instance_id, timeline, lsn, seq, end_lsn, kind, xid, time, db_oid, relfilenode, rel_oid, database_name, schema_name, table_name, row_count, filled_files, before_lsn";

impl JobCatalog for PgCatalog {
    fn create_job(&self, kind: JobKind, instance_id: Option<&str>) -> CatalogResult<Job> {
        let sql = format!(
            "INSERT INTO jobs (kind, instance_id, state, started_at, pid, owner, heartbeat_at, lease_ms) \
             VALUES ($1, $2, 'NoStart', $3, $4, $5, now(), $6) RETURNING {JOB_COLS}"
        );
        let p = sql_params![
            kind.as_str(),
            instance_id.map(str::to_string),
            Utc::now(),
            i64::from(std::process::id()),
            self.owner.as_str().to_string(),
            self.lease.lease_ms()
        ];
        self.query_one(sql, p, job_from_row)
    }

    fn update_job(&self, j: &Job) -> CatalogResult<()> {
        // A job that ended under another owner (taken over when this one
        // stopped renewing its lease) is no longer this one's.
        let updated = self.execute(
            "UPDATE jobs SET state=$2, progress=$3, detail=$4, backup_id=$5, finished_at=$6, error=$7 \
             WHERE id=$1 AND (state NOT IN ('Finished', 'Failed') OR owner IS NOT DISTINCT FROM $8)",
            sql_params![
                j.id.get(),
                j.state.as_str(),
                i64::from(j.progress),
                j.detail.clone(),
                j.backup_id.as_deref().map(str::to_string),
                j.finished_at,
                j.error.clone(),
                self.owner.as_str().to_string()
            ],
        )?;
        if updated > 0 {
            return Ok(());
        }
        let exists = self.query_opt(
            "SELECT 1 FROM jobs WHERE id = $1",
            sql_params![j.id.get()],
            |_| Ok(()),
        )?;
        Err(match exists {
            Some(()) => CatalogError::LeaseLost(j.id),
            None => CatalogError::JobNotFound(j.id),
        })
    }

    fn get_job(&self, id: JobId) -> CatalogResult<Job> {
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1");
        self.query_opt(sql, sql_params![id.get()], job_from_row)?
            .ok_or(CatalogError::JobNotFound(id))
    }

    fn list_jobs(&self, instance_id: Option<&str>) -> CatalogResult<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE $1::text IS NULL OR instance_id = $1 ORDER BY id"
        );
        self.query(
            sql,
            sql_params![instance_id.map(str::to_string)],
            job_from_row,
        )
    }

    fn jobs_ended_since(&self, since: DateTime<Utc>) -> CatalogResult<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE state IN ('Finished', 'Failed') \
             AND finished_at >= $1 ORDER BY id"
        );
        self.query(sql, sql_params![since], job_from_row)
    }

    fn prune_jobs(&self, ended_before: DateTime<Utc>, limit: usize) -> CatalogResult<usize> {
        let n = self.execute(
            crate::prune_jobs_sql("$1", "$2"),
            sql_params![ended_before, i64::try_from(limit).unwrap_or(i64::MAX)],
        )?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn newest_ended_job(&self, instance_id: &str, kind: JobKind) -> CatalogResult<Option<Job>> {
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE instance_id = $1 AND kind = $2 \
             AND state IN ('Finished', 'Failed') AND finished_at IS NOT NULL \
             ORDER BY finished_at DESC, id DESC LIMIT 1"
        );
        self.query_opt(
            sql,
            sql_params![instance_id.to_string(), kind.as_str()],
            job_from_row,
        )
    }

    fn newest_jobs(&self, kind: JobKind, limit: usize) -> CatalogResult<Vec<Job>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE kind = $1 ORDER BY id DESC LIMIT $2");
        self.query(sql, sql_params![kind.as_str(), limit], job_from_row)
    }

    fn queue_job(
        &self,
        kind: JobKind,
        instance_id: &str,
        backup_id: Option<&str>,
    ) -> CatalogResult<Job> {
        let sql = format!(
            "INSERT INTO jobs (kind, instance_id, state, backup_id, started_at, pid, queued, heartbeat_at) \
             VALUES ($1, $2, 'NoStart', $3, $4, $5, true, now()) RETURNING {JOB_COLS}"
        );
        let p = sql_params![
            kind.as_str(),
            instance_id.to_string(),
            backup_id.map(str::to_string),
            Utc::now(),
            i64::from(std::process::id())
        ];
        self.query_one(sql, p, job_from_row)
    }

    fn queued_jobs(&self) -> CatalogResult<Vec<Job>> {
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE queued ORDER BY id");
        self.query(sql, sql_params![], job_from_row)
    }

    fn claim_queued_job(
        &self,
        id: JobId,
        node_id: &str,
        _now: DateTime<Utc>,
    ) -> CatalogResult<Option<Job>> {
        // A job another node is claiming right now is skipped, not waited
        // for: that node gets it, this one finds nothing.
        let sql = format!(
            "UPDATE jobs SET queued = false, owner = $2, node_id = $3, heartbeat_at = now(), pid = $4, lease_ms = $5 \
             WHERE id = (SELECT id FROM jobs WHERE id = $1 AND queued FOR UPDATE SKIP LOCKED) \
             AND queued RETURNING {JOB_COLS}"
        );
        let p = sql_params![
            id.get(),
            self.owner.as_str().to_string(),
            node_id.to_string(),
            i64::from(std::process::id()),
            self.lease.lease_ms()
        ];
        self.query_opt(sql, p, job_from_row)
    }

    fn lease_owner(&self) -> &LeaseOwner {
        &self.owner
    }

    fn set_job_lease(&self, lease: std::time::Duration) {
        self.lease.set_lease(lease);
    }

    fn renew_leases(&self, _now: DateTime<Utc>) -> CatalogResult<usize> {
        let n = self.execute(
            "UPDATE jobs SET heartbeat_at=now(), lease_ms=$2 WHERE owner=$1 AND state NOT IN ('Finished', 'Failed')",
            sql_params![self.owner.as_str().to_string(), self.lease.lease_ms()],
        )?;
        Ok(n as usize)
    }

    fn fail_expired_jobs(
        &self,
        _now: DateTime<Utc>,
        lease: chrono::Duration,
    ) -> CatalogResult<usize> {
        let since_outage = self.lease.since_unreachable();
        if since_outage.is_some_and(|d| d < lease) {
            return Ok(0);
        }
        let since_outage =
            since_outage.map_or(i64::MAX, |d| d.num_microseconds().unwrap_or(i64::MAX));
        let lease = lease_micros(lease)?;
        let owner = self.owner.as_str().to_string();
        self.call(move |mut c| {
            let owner = owner.clone();
            async move {
                // The expired jobs stay locked from the look to the takeover.
                // A job another transaction holds (its owner renewing, or
                // another node taking it over) is skipped, not waited for:
                // it is either alive or being handled.
                let tx = c.transaction().await?;
                let sql = format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE state NOT IN ('Finished', 'Failed') \
                     AND owner IS DISTINCT FROM $1 AND NOT queued \
                     AND coalesce(heartbeat_at, started_at) < now() - \
                         coalesce(lease_ms * 1000, $2::bigint) * interval '1 microsecond' \
                     AND coalesce(lease_ms * 1000, $2::bigint) < $3::bigint \
                     ORDER BY id FOR UPDATE SKIP LOCKED"
                );
                let expired = all(
                    tx.query(&sql, &[&owner, &lease, &since_outage]).await?,
                    job_from_row,
                )?;
                for job in &expired {
                    let reason = lease_expired_reason(job);
                    // The job changes hands: its old owner can no longer write it.
                    tx.execute(
                        "UPDATE jobs SET state='Failed', finished_at=now(), error=$2, owner=$3 WHERE id=$1",
                        &[&job.id.get(), &reason, &owner],
                    )
                    .await?;
                    tx.execute(
                        "UPDATE backup_sets SET status='Failed', finished_at=now(), error=$2 WHERE job_id=$1 AND status='Running'",
                        &[&job.id.get(), &reason],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(expired.len())
            }
        })
    }
}

impl PolicyCatalog for PgCatalog {
    fn get_policy(&self, instance_id: &str) -> CatalogResult<Option<BackupPolicy>> {
        let sql = format!("SELECT {POLICY_COLS} FROM backup_policies WHERE instance_id = $1");
        self.query_opt(sql, sql_params![instance_id.to_string()], policy_from_row)
    }

    fn put_policy(&self, policy: &BackupPolicy) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO backup_policies ({POLICY_COLS}) VALUES ({}) ON CONFLICT (instance_id) DO UPDATE SET {}",
            placeholders(17),
            excluded(POLICY_COLS, 1)
        );
        self.execute(sql, policy_params(policy)?).map(drop)
    }

    fn get_cross_policy(&self, instance_id: &str) -> CatalogResult<Option<CrossBackupPolicy>> {
        let sql =
            format!("SELECT {CROSS_POLICY_COLS} FROM cross_backup_policies WHERE instance_id = $1");
        self.query_opt(
            sql,
            sql_params![instance_id.to_string()],
            cross_policy_from_row,
        )
    }

    fn put_cross_policy(&self, policy: &CrossBackupPolicy) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO cross_backup_policies ({CROSS_POLICY_COLS}) VALUES ({}) ON CONFLICT (instance_id) DO UPDATE SET {}",
            placeholders(8),
            excluded(CROSS_POLICY_COLS, 1)
        );
        self.execute(sql, cross_policy_params(policy)).map(drop)
    }
}

impl CrossRegionCatalog for PgCatalog {
    fn insert_cross_backup(
        &self,
        region: &str,
        set: &BackupSet,
        copied_bytes: u64,
        copied_at: DateTime<Utc>,
    ) -> CatalogResult<i64> {
        self.query_one(
            "INSERT INTO cross_backups (region, instance_id, backup_id, backup_set, copied_bytes, copied_at) \
             VALUES ($1,$2,$3,$4,$5,$6) RETURNING id",
            sql_params![
                region.to_string(),
                set.instance_id.to_string(),
                set.id.to_string(),
                to_json(set)?,
                copied_bytes as i64,
                copied_at
            ],
            |r| get(r, 0),
        )
    }

    fn list_cross_backups(&self, instance_id: &str) -> CatalogResult<Vec<CrossBackup>> {
        self.query(
            "SELECT id, region, backup_set, copied_bytes, copied_at FROM cross_backups WHERE instance_id = $1 ORDER BY backup_id, id",
            sql_params![instance_id.to_string()],
            |r| {
                Ok(CrossBackup {
                    id: get(r, 0)?,
                    region: get(r, 1)?,
                    set: from_json(get(r, 2)?)?,
                    copied_bytes: get_u64(r, 3)?,
                    copied_at: get(r, 4)?,
                })
            },
        )
    }

    fn delete_cross_backup(&self, id: i64) -> CatalogResult<()> {
        self.execute("DELETE FROM cross_backups WHERE id = $1", sql_params![id])
            .map(drop)
    }

    fn insert_cross_wal(
        &self,
        region: &str,
        row: &WalSegmentRow,
        copied_at: DateTime<Utc>,
    ) -> CatalogResult<i64> {
        self.query_one(
            "INSERT INTO cross_wal_segments (region, instance_id, timeline, segment, wal_segment, copied_at) \
             VALUES ($1,$2,$3,$4,$5,$6) RETURNING id",
            sql_params![
                region.to_string(),
                row.instance_id.to_string(),
                i64::from(row.timeline.0),
                row.segment.clone(),
                to_json(row)?,
                copied_at
            ],
            |r| get(r, 0),
        )
    }

    fn list_cross_wal(&self, instance_id: &str) -> CatalogResult<Vec<CrossWalSegment>> {
        self.query(
            "SELECT id, region, wal_segment, copied_at FROM cross_wal_segments WHERE instance_id = $1 ORDER BY timeline, segment, id",
            sql_params![instance_id.to_string()],
            |r| {
                Ok(CrossWalSegment {
                    id: get(r, 0)?,
                    region: get(r, 1)?,
                    row: from_json(get(r, 2)?)?,
                    copied_at: get(r, 3)?,
                })
            },
        )
    }

    fn delete_cross_wal(&self, id: i64) -> CatalogResult<()> {
        self.execute(
            "DELETE FROM cross_wal_segments WHERE id = $1",
            sql_params![id],
        )
        .map(drop)
    }
}

impl UsageCatalog for PgCatalog {
    fn add_usage_sample(&self, sample: &UsageSample) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO usage_samples ({SAMPLE_COLS}) VALUES ({}) ON CONFLICT (instance_id, sampled_at) DO UPDATE SET {}",
            placeholders(7),
            excluded(SAMPLE_COLS, 2)
        );
        self.execute(sql, sample_params(sample)).map(drop)
    }

    fn list_usage_samples(
        &self,
        instance_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> CatalogResult<Vec<UsageSample>> {
        let sql = format!(
            "SELECT {SAMPLE_COLS} FROM usage_samples WHERE instance_id = $1 \
             AND ($2::timestamptz IS NULL OR sampled_at >= $2) \
             AND ($3::timestamptz IS NULL OR sampled_at <= $3) ORDER BY sampled_at"
        );
        let p = sql_params![instance_id.to_string(), from, to];
        self.query(sql, p, sample_from_row)
    }

    fn last_usage_sample(&self, instance_id: &str) -> CatalogResult<Option<UsageSample>> {
        let sql = format!(
            "SELECT {SAMPLE_COLS} FROM usage_samples WHERE instance_id = $1 ORDER BY sampled_at DESC LIMIT 1"
        );
        self.query_opt(sql, sql_params![instance_id.to_string()], sample_from_row)
    }
}

const SESSION_COLS: &str = "id_hash, key_id, read_only, csrf, created_at, last_seen_at, flash";

fn session_from_row(r: &Row) -> CatalogResult<ConsoleSession> {
    Ok(ConsoleSession {
        id_hash: get(r, 0)?,
        key_id: get(r, 1)?,
        read_only: get(r, 2)?,
        csrf: get(r, 3)?,
        created_at: get(r, 4)?,
        last_seen_at: get(r, 5)?,
        flash: get(r, 6)?,
    })
}

impl AccessCatalog for PgCatalog {
    fn add_access_key(&self, key: &AccessKey) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO access_keys ({KEY_COLS}) VALUES ({})",
            placeholders(5)
        );
        self.execute(sql, key_params(key)).map(drop)
    }

    fn get_access_key(&self, id: &str) -> CatalogResult<Option<AccessKey>> {
        let sql = format!("SELECT {KEY_COLS} FROM access_keys WHERE id = $1");
        self.query_opt(sql, sql_params![id.to_string()], key_from_row)
    }

    fn list_access_keys(&self) -> CatalogResult<Vec<AccessKey>> {
        let sql = format!("SELECT {KEY_COLS} FROM access_keys ORDER BY created_at, id");
        self.query(sql, sql_params![], key_from_row)
    }

    fn delete_access_key(&self, id: &str) -> CatalogResult<bool> {
        let n = self.execute(
            "DELETE FROM access_keys WHERE id = $1",
            sql_params![id.to_string()],
        )?;
        Ok(n > 0)
    }

    fn admit_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> CatalogResult<bool> {
        let keep = lease_micros(now - forget_before)?;
        self.execute(
            "DELETE FROM used_nonces WHERE used_at < now() - $1::bigint * interval '1 microsecond'",
            sql_params![keep],
        )?;
        // The primary key decides: of two nodes admitting the same nonce at
        // once, exactly one inserts it.
        let n = self.execute(
            "INSERT INTO used_nonces (key_id, nonce, used_at) VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
            sql_params![key_id.to_string(), nonce.to_string()],
        )?;
        Ok(n == 1)
    }

    fn shared_secret(&self, name: &str, candidate: &str) -> CatalogResult<String> {
        // The primary key decides which node's candidate is kept.
        self.execute(
            "INSERT INTO shared_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            sql_params![name.to_string(), candidate.to_string(), Utc::now()],
        )?;
        self.query_one(
            "SELECT value FROM shared_secrets WHERE name = $1",
            sql_params![name.to_string()],
            |r| get(r, 0),
        )
    }

    fn put_session(
        &self,
        session: &ConsoleSession,
        forget_before: DateTime<Utc>,
    ) -> CatalogResult<()> {
        let s = session.clone();
        let keep = lease_micros(session.last_seen_at - forget_before)?;
        self.call(move |mut c| {
            let s = s.clone();
            async move {
                let tx = c.transaction().await?;
                tx.execute(
                    "DELETE FROM console_sessions \
                     WHERE last_seen_at < now() - $1::bigint * interval '1 microsecond'",
                    &[&keep],
                )
                .await?;
                tx.execute(
                    &format!(
                        "INSERT INTO console_sessions ({SESSION_COLS}) \
                         VALUES ($1, $2, $3, $4, now(), now(), $5)"
                    ),
                    &[&s.id_hash, &s.key_id, &s.read_only, &s.csrf, &s.flash],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
        })
    }

    fn touch_session(
        &self,
        id_hash: &str,
        _now: DateTime<Utc>,
    ) -> CatalogResult<Option<ConsoleSession>> {
        // One statement: the row as it was before, and its touch.
        let sql = format!(
            "UPDATE console_sessions AS s SET last_seen_at = now() \
             FROM (SELECT {SESSION_COLS} FROM console_sessions WHERE id_hash = $1 FOR UPDATE) AS old \
             WHERE s.id_hash = old.id_hash \
             RETURNING {}",
            SESSION_COLS
                .split(", ")
                .map(|c| format!("old.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.query_opt(sql, sql_params![id_hash.to_string()], session_from_row)
    }

    fn delete_session(&self, id_hash: &str) -> CatalogResult<()> {
        self.execute(
            "DELETE FROM console_sessions WHERE id_hash = $1",
            sql_params![id_hash.to_string()],
        )
        .map(drop)
    }

    fn set_session_flash(&self, id_hash: &str, flash: &str) -> CatalogResult<()> {
        self.execute(
            "UPDATE console_sessions SET flash = $2 WHERE id_hash = $1",
            sql_params![id_hash.to_string(), flash.to_string()],
        )
        .map(drop)
    }

    fn take_session_flash(&self, id_hash: &str) -> CatalogResult<Option<String>> {
        // One statement, the row locked from the look to the clear: of two
        // requests taking the message at once only one sees it.
        let flash = self.query_opt(
            "UPDATE console_sessions AS s SET flash = NULL \
             FROM (SELECT id_hash, flash FROM console_sessions WHERE id_hash = $1 FOR UPDATE) AS old \
             WHERE s.id_hash = old.id_hash AND old.flash IS NOT NULL \
             RETURNING old.flash",
            sql_params![id_hash.to_string()],
            |r| get::<String>(r, 0),
        )?;
        Ok(flash)
    }
}

impl GcCatalog for PgCatalog {
    fn acquire_repo_hold(&self, hold: &RepoHold, _now: DateTime<Utc>) -> CatalogResult<bool> {
        let ttl = hold_micros(hold)?;
        let hold = hold.clone();
        self.call(move |mut c| {
            let hold = hold.clone();
            async move {
                let tx = c.transaction().await?;
                // One acquirer per repository at a time, on every node: the
                // look below cannot miss a hold being taken concurrently.
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('strata-repo-hold/' || $1, 0))",
                    &[&hold.repository_id],
                )
                .await?;
                tx.execute(
                    "DELETE FROM repo_holds WHERE repository_id = $1 AND expires_at < now()",
                    &[&hold.repository_id],
                )
                .await?;
                let row = tx
                    .query_one(
                        "SELECT count(*) FROM repo_holds WHERE repository_id = $1 AND ($2 OR exclusive)",
                        &[&hold.repository_id, &hold.exclusive],
                    )
                    .await?;
                let conflicts: i64 = get(&row, 0)?;
                if conflicts > 0 {
                    tx.commit().await?;
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO repo_holds (hold_id, repository_id, exclusive, owner, purpose, acquired_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, now(), now() + $6::bigint * interval '1 microsecond')",
                    &[
                        &hold.id,
                        &hold.repository_id,
                        &hold.exclusive,
                        &hold.owner.as_str(),
                        &hold.purpose,
                        &ttl,
                    ],
                )
                .await?;
                tx.commit().await?;
                Ok(true)
            }
        })
    }

    fn renew_repo_hold(&self, hold: &RepoHold, _now: DateTime<Utc>) -> CatalogResult<bool> {
        let n = self.execute(
            "UPDATE repo_holds SET expires_at = now() + $2::bigint * interval '1 microsecond' \
             WHERE hold_id = $1",
            sql_params![hold.id.clone(), hold_micros(hold)?],
        )?;
        Ok(n == 1)
    }

    fn release_repo_hold(&self, hold_id: &str) -> CatalogResult<()> {
        self.execute(
            "DELETE FROM repo_holds WHERE hold_id = $1",
            sql_params![hold_id.to_string()],
        )
        .map(drop)
    }

    fn gc_pending(&self, repository_id: &str) -> CatalogResult<BTreeMap<String, DateTime<Utc>>> {
        let pending: Vec<(String, DateTime<Utc>)> = self.query(
            "SELECT pack_id, unreferenced_since FROM gc_pending WHERE repository_id = $1",
            sql_params![repository_id.to_string()],
            |r| Ok((get(r, 0)?, get(r, 1)?)),
        )?;
        Ok(pending.into_iter().collect())
    }

    fn put_gc_pending(
        &self,
        repository_id: &str,
        pending: &BTreeMap<String, DateTime<Utc>>,
    ) -> CatalogResult<()> {
        let key = repository_id.to_string();
        let packs: Vec<String> = pending.keys().cloned().collect();
        let since: Vec<DateTime<Utc>> = pending.values().copied().collect();
        self.call(move |mut c| {
            let (key, packs, since) = (key.clone(), packs.clone(), since.clone());
            async move {
                let tx = c.transaction().await?;
                tx.execute("DELETE FROM gc_pending WHERE repository_id = $1", &[&key])
                    .await?;
                tx.execute(
                    "INSERT INTO gc_pending (repository_id, pack_id, unreferenced_since) \
                     SELECT $1, p, s FROM unnest($2::text[], $3::timestamptz[]) AS t(p, s)",
                    &[&key, &packs, &since],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
        })
    }
}

impl NodeCatalog for PgCatalog {
    fn now(&self) -> CatalogResult<DateTime<Utc>> {
        self.query_one("SELECT now()", sql_params![], |r| get(r, 0))
    }

    fn heartbeat(&self, n: &Node) -> CatalogResult<()> {
        self.execute(
            "INSERT INTO nodes (id, api_address, started_at, heartbeat_at, version) \
             VALUES ($1, $2, $3, CASE WHEN $4 = 'epoch'::timestamptz THEN $4 ELSE now() END, $5) \
             ON CONFLICT (id) DO UPDATE SET \
             api_address = EXCLUDED.api_address, started_at = EXCLUDED.started_at, \
             heartbeat_at = EXCLUDED.heartbeat_at, version = EXCLUDED.version",
            sql_params![
                n.id.clone(),
                n.api_address.clone(),
                n.started_at,
                n.heartbeat_at,
                n.version.clone()
            ],
        )
        .map(drop)
    }

    fn list_nodes(&self) -> CatalogResult<Vec<Node>> {
        self.query(
            "SELECT id, api_address, started_at, heartbeat_at, version FROM nodes ORDER BY id",
            sql_params![],
            |r| {
                Ok(Node {
                    id: get(r, 0)?,
                    api_address: get(r, 1)?,
                    started_at: get(r, 2)?,
                    heartbeat_at: get(r, 3)?,
                    version: get(r, 4)?,
                })
            },
        )
    }

    fn claim_instance(
        &self,
        instance_id: &str,
        node_id: &str,
        _now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> CatalogResult<bool> {
        // One statement: the row lock taken by ON CONFLICT makes the look and
        // the write one step, so of two racing claims exactly one changes
        // the row (the other sees the winner's valid lease and updates none).
        let claimed = self.query_opt(
            "INSERT INTO instance_owners (instance_id, node_id, epoch, expires_at) \
             VALUES ($1, $2, 1, now() + $3::bigint * interval '1 microsecond') \
             ON CONFLICT (instance_id) DO UPDATE SET \
             epoch = CASE WHEN instance_owners.node_id = EXCLUDED.node_id \
                     THEN instance_owners.epoch ELSE instance_owners.epoch + 1 END, \
             node_id = EXCLUDED.node_id, expires_at = EXCLUDED.expires_at \
             WHERE instance_owners.node_id = EXCLUDED.node_id \
                OR instance_owners.expires_at <= now() \
             RETURNING epoch",
            sql_params![
                instance_id.to_string(),
                node_id.to_string(),
                lease_micros(ttl)?
            ],
            |_| Ok(()),
        )?;
        Ok(claimed.is_some())
    }

    fn renew_instances(
        &self,
        node_id: &str,
        _now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> CatalogResult<usize> {
        let n = self.execute(
            "UPDATE instance_owners SET expires_at = now() + $2::bigint * interval '1 microsecond' \
             WHERE node_id = $1",
            sql_params![node_id.to_string(), lease_micros(ttl)?],
        )?;
        Ok(n as usize)
    }

    fn release_instance(&self, instance_id: &str, node_id: &str) -> CatalogResult<bool> {
        let n = self.execute(
            "DELETE FROM instance_owners WHERE instance_id = $1 AND node_id = $2",
            sql_params![instance_id.to_string(), node_id.to_string()],
        )?;
        Ok(n > 0)
    }

    fn list_owners(&self) -> CatalogResult<Vec<InstanceOwner>> {
        self.query(
            "SELECT instance_id, node_id, epoch, expires_at FROM instance_owners ORDER BY instance_id",
            sql_params![],
            |r| {
                Ok(InstanceOwner {
                    instance_id: get(r, 0)?,
                    node_id: get(r, 1)?,
                    epoch: get(r, 2)?,
                    expires_at: get(r, 3)?,
                })
            },
        )
    }

    fn publish_receiver(&self, r: &ReceiverStatus) -> CatalogResult<()> {
        let sql = format!(
            "INSERT INTO wal_receivers ({RECEIVER_COLS}) VALUES ({}) ON CONFLICT (instance_id) DO UPDATE SET {}",
            placeholders(11),
            excluded(RECEIVER_COLS, 1)
        );
        let p = sql_params![
            r.instance_id.clone(),
            r.node_id.clone(),
            r.running,
            lsn_to_sql(Lsn(r.received_lsn)),
            lsn_to_sql(Lsn(r.server_end_lsn)),
            r.last_message_at,
            r.last_error.clone(),
            r.failing.clone(),
            r.published_at,
            r.failing_since,
            r.unreachable_since
        ];
        self.execute(sql, p).map(drop)
    }

    fn list_receivers(&self) -> CatalogResult<Vec<ReceiverStatus>> {
        let sql = format!("SELECT {RECEIVER_COLS} FROM wal_receivers ORDER BY instance_id");
        self.query(sql, sql_params![], receiver_from_row)
    }

    fn get_receiver(&self, instance_id: &str) -> CatalogResult<Option<ReceiverStatus>> {
        let sql = format!("SELECT {RECEIVER_COLS} FROM wal_receivers WHERE instance_id = $1");
        self.query_opt(sql, sql_params![instance_id.to_string()], receiver_from_row)
    }
}

const RECEIVER_COLS: &str = "instance_id, node_id, running, received_lsn, server_end_lsn, \
                             last_message_at, last_error, failing, published_at, \
                             failing_since, unreachable_since";

fn receiver_from_row(r: &Row) -> CatalogResult<ReceiverStatus> {
    Ok(ReceiverStatus {
        instance_id: get(r, 0)?,
        node_id: get(r, 1)?,
        running: get(r, 2)?,
        received_lsn: lsn_from_sql(get(r, 3)?).0,
        server_end_lsn: lsn_from_sql(get(r, 4)?).0,
        last_message_at: get(r, 5)?,
        last_error: get(r, 6)?,
        failing: get(r, 7)?,
        published_at: get(r, 8)?,
        failing_since: get(r, 9)?,
        unreachable_since: get(r, 10)?,
    })
}

impl IndexCatalog for PgCatalog {
    fn clear_index(&self) -> CatalogResult<()> {
        self.call(|mut c| async move {
            let tx = c.transaction().await?;
            tx.batch_execute(
                "DELETE FROM backup_sets; DELETE FROM wal_segments; DELETE FROM restore_points; DELETE FROM recovery_events;",
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        for (url, shown) in [
            (
                "postgres://strata:hunter2@db:5432/cat?sslmode=require",
                "postgres://strata:***@db:5432/cat?sslmode=require",
            ),
            (
                "postgresql://db/cat?user=s&password=hunter2",
                "postgresql://db/cat?user=s&password=***",
            ),
            ("postgres://strata@db/cat", "postgres://strata@db/cat"),
        ] {
            assert_eq!(redact_url(url), shown);
            let debug = format!("{:?}", PgConnect::new(url).password(Some("hunter2".into())));
            assert!(!debug.contains("hunter2"), "{debug}");
        }
        let err = PgConnect::new("postgres://u:hunter2@db/cat?sslmode=sideways")
            .config()
            .err()
            .expect("a bad sslmode");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("sideways"), "{err}");
        let err = PgConnect::new("postgres://u:hunter2@db/cat?bogus=1")
            .config()
            .err()
            .expect("an unknown parameter");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    /// Raises SQLSTATE `code` on the server, as a real conflict would.
    async fn raise(c: &Object, code: &str) -> CatalogResult<()> {
        c.batch_execute(&format!(
            "DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{code}'; END $$"
        ))
        .await?;
        Ok(())
    }

    /// Counts the attempts of a call that raises `code` on its first
    /// `failures` attempts; returns what the call returned and the count.
    fn attempts(cat: &PgCatalog, code: &'static str, failures: u32) -> (CatalogResult<()>, u32) {
        use std::sync::atomic::{AtomicU32, Ordering};
        let count = std::sync::Arc::new(AtomicU32::new(0));
        let seen = count.clone();
        let r = cat.call(move |c| {
            let seen = seen.clone();
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) < failures {
                    raise(&c, code).await?;
                }
                Ok(())
            }
        });
        (r, count.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[test]
    fn server_errors_are_classified_and_only_rolled_back_conflicts_are_run_again() {
        let url = testkit::catalog_database("classify");
        let cat = PgCatalog::open(&PgConnect::new(&url)).unwrap();
        // Serialization failures and deadlocks: run again until they pass…
        for code in ["40001", "40P01"] {
            let (r, n) = attempts(&cat, code, 2);
            assert!(r.is_ok(), "{code}: {r:?}");
            assert_eq!(n, 3, "{code}");
        }
        // …or until the attempts are spent: then retryable for the caller.
        let (r, n) = attempts(&cat, "40001", u32::MAX);
        assert_eq!(n, TX_ATTEMPTS);
        let err = r.unwrap_err();
        assert!(
            matches!(err, CatalogError::Busy(_)) && err.is_retryable(),
            "{err:?}"
        );
        // A server shutting down or out of connections: retryable, not re-run
        // here (the statement may have committed before the connection went).
        for code in ["57P01", "53300", "08006"] {
            let (r, n) = attempts(&cat, code, 1);
            assert_eq!(n, 1, "{code}");
            let err = r.unwrap_err();
            assert!(err.is_retryable(), "{code}: {err:?}");
        }
        // A duplicate is a conflict, corruption is corruption, neither retried.
        let (r, n) = attempts(&cat, "23505", 1);
        assert_eq!(n, 1);
        assert!(matches!(r, Err(CatalogError::Conflict(_))), "{r:?}");
        let (r, _) = attempts(&cat, "XX001", 1);
        assert!(matches!(r, Err(CatalogError::Corrupt(_))), "{r:?}");
        let (r, _) = attempts(&cat, "42P01", 1);
        let err = r.unwrap_err();
        assert!(
            matches!(err, CatalogError::Backend(_)) && !err.is_retryable(),
            "{err:?}"
        );
        use std::error::Error as _;
        assert!(err.source().is_some(), "the driver error stays the source");
    }
}
