//! What a backup set holds: `DescribeBackupDatabase` (its databases) and
//! `DescribeMetaList` (its databases, or one database's tables, by set or
//! by point in time), with RDS's paging (`PageIndex` and `PageSize`, which
//! take effect only together) and database name filter (`Pattern`).
//! `DescribeCrossBackupMetaList` (in `cross_region`) answers the same
//! for a cross-region copy.
//!
//! `Tables` is `schema.table`, as `RestoreTable`'s `TableMeta` takes it;
//! the extension fields give the schema and the table apart, for names
//! that hold a dot. `Size` is in bytes.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use strata_service::policy::format_seconds;
use strata_service::{Service, SetContents};

use crate::actions::off_runtime;
use crate::error::{quoted, shown, ApiError, ApiResult};
use crate::params::Params;

type Fields = Map<String, Value>;

/// Largest `PageSize`.
const MAX_PAGE_SIZE: i64 = 1000;

fn obj(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// What a meta list asks for.
pub(crate) struct MetaQuery {
    /// `GetDbName`: that database's tables.
    database: Option<String>,
    /// `Pattern`: databases whose name holds it (ignoring case).
    pattern: Option<String>,
    /// `PageIndex` and `PageSize`, when both are given.
    page: Option<(usize, usize)>,
}

impl MetaQuery {
    pub(crate) fn from_params(p: &Params) -> ApiResult<MetaQuery> {
        let database = p.get("GetDbName").map(str::to_string);
        let pattern = p.get("Pattern").map(str::to_string);
        if database.is_some() && pattern.is_some() {
            return Err(ApiError::bad(
                "InvalidParameterCombination",
                "GetDbName lists one database's tables and Pattern matches database names; give one of them.",
            ));
        }
        Ok(MetaQuery {
            database,
            pattern,
            page: p.index_paging(MAX_PAGE_SIZE)?,
        })
    }
}

/// The `Items.Meta` list and paging fields of `found` for `q`, with the
/// instance, the set the list comes from and when it was read.
pub(crate) fn meta_fields(found: &SetContents, q: &MetaQuery) -> ApiResult<Fields> {
    let mut databases: Vec<_> = found.contents.databases.iter().collect();
    databases.sort_by(|a, b| a.name.cmp(&b.name));
    let mut truncated = databases.iter().any(|d| d.truncated);
    let items: Vec<Value> = match &q.database {
        Some(name) => {
            let db = databases.iter().find(|d| d.name == *name).ok_or_else(|| {
                ApiError::bad(
                    "InvalidDBName.NotFound",
                    format!(
                        "database {} is not in backup set {}",
                        quoted(name),
                        shown(&found.backup_id)
                    ),
                )
            })?;
            let Some(tables) = &db.tables else {
                return Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "IncorrectBackupSetState",
                    format!(
                        "the tables of database {} could not be read when backup set {} was taken (it refused connections)",
                        quoted(name),
                        shown(&found.backup_id)
                    ),
                ));
            };
            truncated = db.truncated;
            let mut tables: Vec<_> = tables.iter().collect();
            tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
            tables
                .into_iter()
                .map(|t| {
                    json!({
                        "Database": db.name,
                        "Tables": format!("{}.{}", t.schema, t.name),
                        "Size": t.size.to_string(),
                        "StrataSchema": t.schema,
                        "StrataTable": t.name,
                        "StrataTableKind": table_kind(&t.kind),
                        "StrataTableOid": t.oid,
                    })
                })
                .collect()
        }
        None => {
            let wanted = q.pattern.as_deref().map(str::to_lowercase);
            databases
                .into_iter()
                .filter(|d| {
                    wanted
                        .as_deref()
                        .is_none_or(|w| d.name.to_lowercase().contains(w))
                })
                .map(|d| {
                    let mut item = json!({
                        "Database": d.name,
                        "Tables": "",
                        "Size": d.size.map(|s| s.to_string()).unwrap_or_default(),
                        "StrataDatabaseOid": d.oid,
                    });
                    if let Some(tables) = &d.tables {
                        item["StrataTableCount"] = json!(tables.len());
                    }
                    item
                })
                .collect()
        }
    };
    let total = items.len();
    let (number, size) = q.page.unwrap_or((1, total.max(1)));
    let pages = total.div_ceil(size);
    let shown_items: Vec<Value> = items
        .into_iter()
        .skip((number - 1).saturating_mul(size))
        .take(size)
        .collect();
    let mut fields = obj(json!({
        "DBInstanceName": found.instance_id,
        "Items": {"Meta": shown_items},
        "PageNumber": number,
        "PageRecordCount": shown_items.len(),
        "TotalPageCount": pages,
        "TotalRecordCount": total,
        "StrataBackupId": found.backup_id,
        "StrataListTime": format_seconds(found.contents.read_at),
        "StrataListTruncated": truncated,
    }));
    if let Some(t) = found.at {
        fields.insert("StrataRestoreTime".into(), json!(format_seconds(t)));
    }
    Ok(fields)
}

/// `pg_class.relkind` in a word.
fn table_kind(relkind: &str) -> &'static str {
    match relkind {
        "r" => "Table",
        "p" => "PartitionedTable",
        "m" => "MaterializedView",
        "f" => "ForeignTable",
        _ => "Other",
    }
}

/// `DescribeBackupDatabase`: the databases of one backup set, as
/// `"db1,db2"` (RDS's `DatabaseNames`) and as a list (names may hold a
/// comma).
pub(crate) async fn describe_backup_database(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    let backup_id = p.required("BackupId")?.to_string();
    let id = inst.id.clone();
    let found = off_runtime(svc, move |svc| svc.set_contents(&id, &backup_id)).await?;
    let mut names: Vec<&str> = found
        .contents
        .databases
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    names.sort_unstable();
    Ok(obj(json!({
        "DatabaseNames": names.join(","),
        "StrataDatabaseNames": names,
        "StrataBackupId": found.backup_id,
        "StrataListTime": format_seconds(found.contents.read_at),
    })))
}

/// `DescribeMetaList`: by backup set (`RestoreType` `BackupSetID`, the
/// default) or by point in time (`RestoreTime`).
pub(crate) async fn describe_meta_list(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    let query = MetaQuery::from_params(p)?;
    let id = inst.id.clone();
    let found = match p.get("RestoreType").unwrap_or("BackupSetID") {
        "BackupSetID" => {
            let backup_id = p.required("BackupSetID")?.trim().to_string();
            off_runtime(svc, move |svc| svc.set_contents(&id, &backup_id)).await?
        }
        "RestoreTime" => {
            let raw = p.required("RestoreTime")?;
            let t = crate::params::parse_time(raw).ok_or_else(|| {
                ApiError::bad(
                    "InvalidRestoreTime.Format",
                    format!(
                        "RestoreTime must be yyyy-MM-ddTHH:mm:ssZ (UTC), got {}",
                        quoted(raw)
                    ),
                )
            })?;
            off_runtime(svc, move |svc| svc.contents_at(&id, t)).await?
        }
        other => {
            return Err(ApiError::bad(
                "InvalidRestoreType.Malformed",
                format!(
                    "RestoreType must be BackupSetID or RestoreTime, got {}",
                    quoted(other)
                ),
            ))
        }
    };
    meta_fields(&found, &query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_service::{BackupContents, DatabaseContents, TableContents};

    fn found() -> SetContents {
        let table = |schema: &str, name: &str| TableContents {
            oid: 16400,
            schema: schema.into(),
            name: name.into(),
            kind: "r".into(),
            size: 8192,
        };
        let db = |name: &str, tables: Option<Vec<TableContents>>| DatabaseContents {
            oid: 16384,
            name: name.into(),
            size: Some(1 << 20),
            tables,
            truncated: false,
        };
        SetContents {
            instance_id: "pg".into(),
            backup_id: "1700000000000".into(),
            contents: BackupContents {
                read_at: chrono::Utc::now(),
                databases: vec![
                    db(
                        "TestDB2",
                        Some(vec![
                            table("z", "a"),
                            table("public", "b"),
                            table("public", "a"),
                        ]),
                    ),
                    db("postgres", Some(Vec::new())),
                    db("testdb1", None),
                ],
            },
            at: None,
        }
    }

    fn query(pairs: &[(&str, &str)]) -> ApiResult<MetaQuery> {
        MetaQuery::from_params(&Params::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn listed(fields: &Fields, key: &str) -> Vec<String> {
        fields["Items"]["Meta"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[key].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn databases_match_a_pattern_and_tables_are_sorted_and_paged() {
        let f = found();
        let all = meta_fields(&f, &query(&[]).unwrap()).unwrap();
        assert_eq!(listed(&all, "Database"), ["TestDB2", "postgres", "testdb1"]);
        assert_eq!(
            (
                all["TotalRecordCount"].as_u64(),
                all["TotalPageCount"].as_u64()
            ),
            (Some(3), Some(1))
        );
        let matched = meta_fields(&f, &query(&[("Pattern", "test")]).unwrap()).unwrap();
        assert_eq!(listed(&matched, "Database"), ["TestDB2", "testdb1"]);
        let tables = query(&[
            ("GetDbName", "TestDB2"),
            ("PageIndex", "2"),
            ("PageSize", "2"),
        ])
        .unwrap();
        let page = meta_fields(&f, &tables).unwrap();
        assert_eq!(listed(&page, "Tables"), ["z.a"]);
        assert_eq!(
            (
                page["PageNumber"].as_u64(),
                page["PageRecordCount"].as_u64(),
                page["TotalPageCount"].as_u64()
            ),
            (Some(2), Some(1), Some(2))
        );
        let first = meta_fields(&f, &query(&[("GetDbName", "TestDB2")]).unwrap()).unwrap();
        assert_eq!(listed(&first, "Tables"), ["public.a", "public.b", "z.a"]);
        let empty = meta_fields(&f, &query(&[("GetDbName", "postgres")]).unwrap()).unwrap();
        assert_eq!(
            (
                empty["TotalRecordCount"].as_u64(),
                empty["TotalPageCount"].as_u64()
            ),
            (Some(0), Some(0))
        );
    }

    #[test]
    fn unknown_and_unreadable_databases_are_refused() {
        let f = found();
        let code = |pairs: &[(&str, &str)]| {
            query(pairs)
                .and_then(|q| meta_fields(&f, &q))
                .map(|_| ())
                .unwrap_err()
                .code
        };
        assert_eq!(code(&[("GetDbName", "testdb")]), "InvalidDBName.NotFound");
        assert_eq!(code(&[("GetDbName", "testdb1")]), "IncorrectBackupSetState");
        assert_eq!(
            code(&[("GetDbName", "postgres"), ("Pattern", "p")]),
            "InvalidParameterCombination"
        );
    }
}
