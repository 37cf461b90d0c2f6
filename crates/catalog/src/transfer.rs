//! Moving a SQLite catalog into an empty PostgreSQL catalog, checked row
//! for row.
//!
//! The copy is driven by the schema itself, not by a list kept by hand:
//! every table of the PostgreSQL catalog (both are at the newest step of
//! [`crate::MIGRATIONS`] once opened) is read whole from SQLite, each column
//! converted by its PostgreSQL type, and written in one transaction that
//! first locks every table and refuses to go on if any holds a row. Before
//! committing, the same transaction reads every table back and compares it
//! with what SQLite held, value for value (times to the microsecond, the
//! precision PostgreSQL keeps); any difference rolls the whole copy back.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, Utc};
use tokio_postgres::types::ToSql;

use crate::{CatalogError, CatalogResult, PgCatalog, SqliteCatalog};

/// One table copied: its name and how many rows it holds in both catalogs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableCopy {
    /// Table name.
    pub table: String,
    /// Rows copied and found again.
    pub rows: usize,
}

/// A column's type as PostgreSQL names it in `information_schema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnType {
    Text,
    Integer,
    Boolean,
    Time,
}

impl ColumnType {
    fn from_pg(name: &str) -> CatalogResult<ColumnType> {
        Ok(match name {
            "text" => ColumnType::Text,
            "bigint" => ColumnType::Integer,
            "boolean" => ColumnType::Boolean,
            "timestamp with time zone" => ColumnType::Time,
            other => {
                return Err(CatalogError::Invalid(format!(
                    "catalog column type {other:?} has no copy rule"
                )))
            }
        })
    }
}

/// One value as both catalogs can hold it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Null,
    Text(String),
    Integer(i64),
    Boolean(bool),
    Time(DateTime<Utc>),
}

impl Value {
    /// A parameter typed by the column, so a NULL has the column's type.
    fn param(&self, ty: ColumnType) -> Box<dyn ToSql + Sync + Send> {
        match (self, ty) {
            (Value::Text(s), _) => Box::new(Some(s.clone())),
            (Value::Integer(n), _) => Box::new(Some(*n)),
            (Value::Boolean(b), _) => Box::new(Some(*b)),
            (Value::Time(t), _) => Box::new(Some(*t)),
            (Value::Null, ColumnType::Text) => Box::new(None::<String>),
            (Value::Null, ColumnType::Integer) => Box::new(None::<i64>),
            (Value::Null, ColumnType::Boolean) => Box::new(None::<bool>),
            (Value::Null, ColumnType::Time) => Box::new(None::<DateTime<Utc>>),
        }
    }
}

type Columns = Vec<(String, ColumnType)>;
type Rows = Vec<Vec<Value>>;
/// Tables with their columns, and the identity column of those with one.
type Schema = (BTreeMap<String, Columns>, BTreeMap<String, String>);

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(chrono::Duration::microseconds(1))
        .unwrap_or(t)
}

/// Copies every row of `from` into `to`, which must be empty, in one
/// transaction, and checks the copy row for row before committing.
/// Returns the tables copied, by name.
pub fn copy_sqlite_to_postgres(
    from: &SqliteCatalog,
    to: &PgCatalog,
) -> CatalogResult<Vec<TableCopy>> {
    let (schema, identities) = postgres_schema(to)?;
    let source = read_sqlite(from, &schema)?;
    to.call(move |mut c| {
        let (schema, source, identities) = (schema.clone(), source.clone(), identities.clone());
        async move {
            let tx = c.transaction().await?;
            let names: Vec<&str> = schema.keys().map(String::as_str).collect();
            // Nobody writes while the copy runs; a catalog already in use is refused.
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                names.join(", ")
            ))
            .await?;
            for table in &names {
                let n: i64 = tx
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await?
                    .try_get(0)
                    .map_err(|e| CatalogError::Corrupt(Box::new(e)))?;
                if n > 0 {
                    return Err(CatalogError::Invalid(format!(
                        "the target catalog is not empty (table {table} holds {n} rows); \
                         migrate only into a new database"
                    )));
                }
            }
            let mut report = Vec::new();
            for (table, columns) in &schema {
                let rows = &source[table];
                let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
                let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
                let insert = tx
                    .prepare(&format!(
                        "INSERT INTO {table} ({}) VALUES ({})",
                        names.join(", "),
                        marks.join(", ")
                    ))
                    .await?;
                for row in rows {
                    let params: Vec<_> = row
                        .iter()
                        .zip(columns)
                        .map(|(v, (_, ty))| v.param(*ty))
                        .collect();
                    let refs: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    tx.execute(&insert, &refs).await?;
                }
                // Ids the catalog assigns continue after the copied ones.
                if let Some(id) = identities.get(table) {
                    tx.execute(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', '{id}'), max({id})) \
                             FROM {table} HAVING max({id}) IS NOT NULL"
                        ),
                        &[],
                    )
                    .await?;
                }
                let copied = read_postgres(&tx, table, columns).await?;
                let mut expected = rows.clone();
                expected.sort();
                if copied != expected {
                    let first = expected
                        .iter()
                        .zip(&copied)
                        .position(|(a, b)| a != b)
                        .unwrap_or(expected.len().min(copied.len()));
                    return Err(CatalogError::Invalid(format!(
                        "table {table}: the copy differs from the source ({} rows read back, {} \
                         copied; first difference at row {first}); nothing was committed",
                        copied.len(),
                        expected.len()
                    )));
                }
                report.push(TableCopy {
                    table: table.clone(),
                    rows: copied.len(),
                });
            }
            tx.commit().await?;
            Ok(report)
        }
    })
}

/// The PostgreSQL catalog's tables (but its migration record) and
/// columns, and the identity column of each table that has one.
fn postgres_schema(to: &PgCatalog) -> CatalogResult<Schema> {
    let rows = to.call(|c| async move {
        c.query(
            "SELECT table_name::text, column_name::text, data_type::text, is_identity::text = 'YES' \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name <> 'strata_schema_migrations' \
             ORDER BY table_name, ordinal_position",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<_, String>(0)?,
                r.try_get::<_, String>(1)?,
                r.try_get::<_, String>(2)?,
                r.try_get::<_, bool>(3)?,
            ))
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(|e| CatalogError::Corrupt(Box::new(e)))
    })?;
    let mut schema: BTreeMap<String, Columns> = BTreeMap::new();
    let mut identities = BTreeMap::new();
    for (table, column, ty, identity) in rows {
        if identity {
            identities.insert(table.clone(), column.clone());
        }
        schema
            .entry(table)
            .or_default()
            .push((column, ColumnType::from_pg(&ty)?));
    }
    Ok((schema, identities))
}

/// Every row of every table in `schema`, read from SQLite in one read
/// transaction (a consistent picture), sorted.
fn read_sqlite(
    from: &SqliteCatalog,
    schema: &BTreeMap<String, Columns>,
) -> CatalogResult<BTreeMap<String, Rows>> {
    from.with(|c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Deferred)?;
        let mut tables: Vec<String> = tx
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        tables.sort();
        let expected: Vec<&String> = schema.keys().collect();
        if tables.iter().collect::<Vec<_>>() != expected {
            return Err(CatalogError::Invalid(format!(
                "the SQLite catalog's tables {tables:?} are not the PostgreSQL catalog's {expected:?}"
            )));
        }
        let mut out = BTreeMap::new();
        for (table, columns) in schema {
            let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
            let mut st = tx.prepare(&format!("SELECT {} FROM {table}", names.join(", ")))?;
            let mut rows = st.query([])?;
            let mut all = Vec::new();
            while let Some(r) = rows.next()? {
                let mut row = Vec::with_capacity(columns.len());
                for (i, (name, ty)) in columns.iter().enumerate() {
                    let v = match ty {
                        ColumnType::Text => r.get::<_, Option<String>>(i)?.map(Value::Text),
                        ColumnType::Integer => r.get::<_, Option<i64>>(i)?.map(Value::Integer),
                        ColumnType::Boolean => {
                            r.get::<_, Option<i64>>(i)?.map(|n| Value::Boolean(n != 0))
                        }
                        ColumnType::Time => match r.get::<_, Option<String>>(i)? {
                            Some(text) => Some(Value::Time(micros(
                                DateTime::parse_from_rfc3339(&text)
                                    .map_err(|e| {
                                        CatalogError::Corrupt(
                                            format!("{table}.{name} = {text:?}: {e}").into(),
                                        )
                                    })?
                                    .with_timezone(&Utc),
                            ))),
                            None => None,
                        },
                    };
                    row.push(v.unwrap_or(Value::Null));
                }
                all.push(row);
            }
            all.sort();
            out.insert(table.clone(), all);
        }
        Ok(out)
    })
}

/// Every row of `table` as PostgreSQL now holds it, sorted.
async fn read_postgres(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    columns: &Columns,
) -> CatalogResult<Rows> {
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    let rows = tx
        .query(&format!("SELECT {} FROM {table}", names.join(", ")), &[])
        .await?;
    let corrupt = |e: tokio_postgres::Error| CatalogError::Corrupt(Box::new(e));
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut row = Vec::with_capacity(columns.len());
        for (i, (_, ty)) in columns.iter().enumerate() {
            let v = match ty {
                ColumnType::Text => r
                    .try_get::<_, Option<String>>(i)
                    .map_err(corrupt)?
                    .map(Value::Text),
                ColumnType::Integer => r
                    .try_get::<_, Option<i64>>(i)
                    .map_err(corrupt)?
                    .map(Value::Integer),
                ColumnType::Boolean => r
                    .try_get::<_, Option<bool>>(i)
                    .map_err(corrupt)?
                    .map(Value::Boolean),
                ColumnType::Time => r
                    .try_get::<_, Option<DateTime<Utc>>>(i)
                    .map_err(corrupt)?
                    .map(Value::Time),
            };
            row.push(v.unwrap_or(Value::Null));
        }
        out.push(row);
    }
    out.sort();
    Ok(out)
}
