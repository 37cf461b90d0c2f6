//! The databases and tables of a backup set, read from the server over
//! ordinary SQL sessions once the backup's files are received and recorded
//! in the set's manifest, so a set can say what it holds (RDS's
//! `DescribeBackupDatabase`, `DescribeMetaList`) long after the live server
//! dropped a table, and a cross-region copy says the same.
//!
//! The list is the server's catalog at the moment of the read, just after
//! the server reported the backup's end: DDL committed between the end of
//! the backup and the read shows in the list, which is why RDS asks for no
//! DDL while a backup runs. A read that fails does not fail the backup: the
//! set is recorded without a list.
//!
//! Reference: src/include/catalog/pg_class.h (`relkind`, `relpersistence`),
//! src/backend/utils/adt/dbsize.c (`pg_database_size`,
//! `pg_total_relation_size`).

use std::time::Duration;

use chrono::Utc;
use strata_catalog::Instance;
use strata_repo::{BackupContents, DatabaseContents, TableContents};

use crate::connect::explain;
use crate::names::{oid as field_oid, sql_session, text as field_text};
use crate::{EngineError, EngineResult};

/// Tables one set records at most, over all its databases: a manifest
/// stays a few megabytes whatever the server holds.
pub const MAX_TABLES: usize = 100_000;

/// Longest the whole read may take before the set is recorded without a
/// list.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Every database but the templates, with its size when the role may
/// connect to it (`pg_database_size` requires that).
const DATABASES_SQL: &str = "SELECT d.oid, d.datname, d.datallowconn, \
     CASE WHEN pg_catalog.has_database_privilege(d.oid, 'CONNECT') \
     THEN pg_catalog.pg_database_size(d.oid) END \
     FROM pg_catalog.pg_database d WHERE NOT d.datistemplate ORDER BY d.oid LIMIT 10000";

/// The user's tables of the connected database (tables, partitioned
/// tables, materialized views, foreign tables; no temporary ones, no
/// system schema: names beginning `pg_` are reserved to the system), up
/// to `limit`.
fn tables_sql(limit: usize) -> String {
    format!(
        "SELECT c.oid, n.nspname, c.relname, c.relkind, pg_catalog.pg_total_relation_size(c.oid) \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'm', 'f') AND c.relpersistence <> 't' \
         AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_' \
         ORDER BY c.oid LIMIT {limit}"
    )
}

/// Reads the databases and tables of `instance`; `None` (with a warning)
/// when the server cannot be read in time.
pub(crate) async fn read_contents_or_none(
    instance: &Instance,
    backup_id: &str,
) -> Option<BackupContents> {
    match tokio::time::timeout(READ_TIMEOUT, read_contents(instance)).await {
        Ok(Ok(contents)) => Some(contents),
        Ok(Err(e)) => {
            tracing::warn!(instance = %instance.id, backup = backup_id, "the databases and tables of the backup were not recorded: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(instance = %instance.id, backup = backup_id, "the databases and tables of the backup were not recorded: the server did not answer within {}s", READ_TIMEOUT.as_secs());
            None
        }
    }
}

async fn read_contents(instance: &Instance) -> EngineResult<BackupContents> {
    let read_at = Utc::now();
    let mut first = sql_session(instance, None).await?;
    let rows = first
        .simple_query(DATABASES_SQL)
        .await
        .map_err(|e| explain(instance, e))?;
    drop(first);
    let mut databases = Vec::new();
    let mut room = MAX_TABLES;
    for row in &rows {
        let [oid, name, allow, size] = row.as_slice() else {
            return Err(EngineError::Failed(
                "pg_database: unexpected columns".into(),
            ));
        };
        let mut db = DatabaseContents {
            oid: field_oid(oid, "a database OID")?,
            name: field_text(name, "a database name")?,
            size: size.as_deref().and_then(|s| s.parse().ok()),
            tables: None,
            truncated: false,
        };
        if allow.as_deref() == Some("t") {
            match read_tables(instance, &db.name, room).await {
                Ok((tables, truncated)) => {
                    room -= tables.len();
                    db.tables = Some(tables);
                    db.truncated = truncated;
                }
                Err(e) => {
                    tracing::debug!(instance = %instance.id, "tables of database {:?} not read: {e}", db.name)
                }
            }
        }
        databases.push(db);
    }
    Ok(BackupContents { read_at, databases })
}

/// The tables of database `dbname`, at most `room` of them; true when
/// there were more.
async fn read_tables(
    instance: &Instance,
    dbname: &str,
    room: usize,
) -> EngineResult<(Vec<TableContents>, bool)> {
    // The name travels in the startup packet as one value: it is never
    // parsed as connection settings.
    let mut session = sql_session(instance, Some(dbname)).await?;
    let rows = session
        .simple_query(&tables_sql(room + 1))
        .await
        .map_err(|e| explain(instance, e))?;
    let mut tables = Vec::with_capacity(rows.len().min(room));
    for row in rows.iter().take(room) {
        let [oid, schema, name, kind, size] = row.as_slice() else {
            return Err(EngineError::Failed("pg_class: unexpected columns".into()));
        };
        tables.push(TableContents {
            oid: field_oid(oid, "a relation OID")?,
            schema: field_text(schema, "a schema name")?,
            name: field_text(name, "a relation name")?,
            kind: field_text(kind, "a relkind")?,
            // A table dropped between the list and its size has none.
            size: size.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
        });
    }
    Ok((tables, rows.len() > room))
}
