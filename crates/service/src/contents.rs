//! What a backup set holds, database by database and table by table, for
//! RDS's `DescribeBackupDatabase`, `DescribeMetaList` and
//! `DescribeCrossBackupMetaList`: the list recorded in the set's manifest
//! when it was taken (see strata_engine's `contents` module), read back
//! from the repository that holds the set or its cross-region copy.
//!
//! For a point in time the list is that of the set a restore to that time
//! starts from, brought forward with what the WAL receiver saw between the
//! set and the time: tables and databases whose names it read from the
//! server in that interval are added (or renamed), and those recovery
//! events show dropped are taken out. The receiver reads names at most
//! once a second after a catalog change, so the list is exact to about a
//! second; a table created in the interval and renamed after the time is
//! missed (the catalog keeps one name per file, the last).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use strata_catalog::{
    BackupId, BackupMethod, BackupSet, BackupStatus, CrossBackup, DatabaseNameRow, InstanceId,
    RelationNameRow,
};
use strata_engine::{EngineError, EventFilter, RecoveryEvent};
use strata_repo::{BackupContents, DatabaseContents, Repository, TableContents};

use crate::policy::{invalid, Refusal};
use crate::window::{check_restore_time, WindowOf};
use crate::{Service, ServiceResult};

/// The databases and tables of one set (or of a point in time after it).
#[derive(Debug, Clone)]
pub struct SetContents {
    /// The instance the set was taken from.
    pub instance_id: InstanceId,
    /// The set the list was recorded with.
    pub backup_id: BackupId,
    /// The list, with drops up to `at` applied.
    pub contents: BackupContents,
    /// The point in time asked for, when not the set's own.
    pub at: Option<DateTime<Utc>>,
}

/// Reads the list recorded with `set` in `repo`; refused when the set is
/// not in the repository or was taken before lists were recorded.
fn read(
    repo: &Repository,
    set: &BackupSet,
    at: Option<DateTime<Utc>>,
) -> ServiceResult<SetContents> {
    if !set.in_repository() {
        let why = match set.status {
            BackupStatus::Success => {
                "is a snapshot on the database host, not uploaded to the repository".to_string()
            }
            other => format!("is {}", other.as_str()),
        };
        return Err(invalid(
            Refusal::NoContents,
            format!(
                "backup set {} {why}: it has no list of databases and tables",
                set.id
            ),
        ));
    }
    let contents = repo
        .read_contents(&set.instance_id, &set.id)
        .map_err(EngineError::from)?
        .ok_or_else(|| {
            let why = match set.method {
                BackupMethod::Snapshot => {
                    "is a snapshot backup, which records no list of databases and tables"
                }
                BackupMethod::Physical => {
                    "was taken before Strata recorded the databases and tables of its sets"
                }
            };
            invalid::<crate::ServiceError>(
                Refusal::NoContents,
                format!(
                    "backup set {} {why}; restore it (CloneDBInstance) to see them",
                    set.id
                ),
            )
        })?;
    Ok(SetContents {
        instance_id: set.instance_id.clone(),
        backup_id: set.id.clone(),
        contents,
        at,
    })
}

/// Brings `contents` (read from the server at `contents.read_at`) to time
/// `t` with the names the WAL receiver read from the server after that
/// and up to `t`: a database or table seen for the first time is added
/// (a table with size 0: its size was never read), one seen under a new
/// name takes it. Rows are the catalog's last name per file, so a table
/// created in the interval and renamed after `t` is missed, never shown
/// under a name it did not have yet.
fn apply_names(
    contents: &mut BackupContents,
    relations: &[RelationNameRow],
    databases: &[DatabaseNameRow],
    t: DateTime<Utc>,
) {
    let since = contents.read_at;
    let within = |seen: DateTime<Utc>| seen > since && seen <= t;
    let mut dbs: Vec<&DatabaseNameRow> = databases.iter().filter(|d| within(d.seen_at)).collect();
    dbs.sort_by_key(|d| d.seen_at);
    for row in dbs {
        match contents.databases.iter_mut().find(|d| d.oid == row.db_oid) {
            Some(d) => d.name = row.name.clone(),
            None => contents.databases.push(DatabaseContents {
                oid: row.db_oid,
                name: row.name.clone(),
                size: None,
                tables: Some(Vec::new()),
                truncated: false,
            }),
        }
    }
    let mut rels: Vec<&RelationNameRow> = relations
        .iter()
        .filter(|r| within(r.seen_at) && is_user_table(&r.schema, &r.kind))
        .collect();
    rels.sort_by_key(|r| r.seen_at);
    for row in rels {
        let Some(tables) = contents
            .databases
            .iter_mut()
            .find(|d| d.oid == row.db_oid)
            .and_then(|d| d.tables.as_mut())
        else {
            continue;
        };
        match tables.iter_mut().find(|t| t.oid == row.rel_oid) {
            Some(table) => {
                table.schema = row.schema.clone();
                table.name = row.name.clone();
            }
            None => tables.push(TableContents {
                oid: row.rel_oid,
                schema: row.schema.clone(),
                name: row.name.clone(),
                kind: row.kind.clone(),
                size: 0,
            }),
        }
    }
}

/// The tables a list holds, by the rule of the SQL that reads it
/// (strata_engine's `contents`): tables and materialized views (the names
/// read for recovery events have no partitioned or foreign tables) outside
/// the schemas reserved to the system.
fn is_user_table(schema: &str, kind: &str) -> bool {
    matches!(kind, "r" | "p" | "m" | "f")
        && schema != "information_schema"
        && !schema.starts_with("pg_")
}

/// Takes out of `contents` what `events` (recovery events committed after
/// the set, up to the time asked for) dropped: whole databases by OID,
/// tables by their OID when the dropped file's is known (`oid_of`), else
/// by schema and name.
fn apply_drops(
    contents: &mut BackupContents,
    events: &[RecoveryEvent],
    oid_of: impl Fn(u32, u32) -> Option<u32>,
) {
    for e in events {
        let Some(db_oid) = e.db_oid else { continue };
        match e.kind.as_str() {
            "DropDatabase" => contents.databases.retain(|d| d.oid != db_oid),
            "DropTable" => {
                let rel_oid = e.relfilenode.and_then(|f| oid_of(db_oid, f));
                let name = e.schema.as_ref().zip(e.table.as_ref());
                if rel_oid.is_none() && name.is_none() {
                    continue;
                }
                for d in contents.databases.iter_mut().filter(|d| d.oid == db_oid) {
                    if let Some(tables) = &mut d.tables {
                        tables.retain(|t| match (rel_oid, name) {
                            (Some(oid), _) => t.oid != oid,
                            (None, Some((schema, table))) => {
                                !(t.schema == *schema && t.name == *table)
                            }
                            (None, None) => true,
                        });
                    }
                }
            }
            _ => {}
        }
    }
}

impl Service {
    /// The databases and tables recorded with backup set `backup_id` of
    /// `instance_id`. Reads the repository: call it off the runtime.
    pub fn set_contents(&self, instance_id: &str, backup_id: &str) -> ServiceResult<SetContents> {
        let set = self.engine.catalog().get_backup(backup_id)?;
        if set.instance_id != instance_id {
            return Err(strata_catalog::CatalogError::BackupNotFound(backup_id.to_string()).into());
        }
        // The instance's own key domain when its backups are encrypted.
        let engine = self.engine.for_instance_blocking(instance_id)?;
        read(engine.repo(), &set, None)
    }

    /// The databases and tables a restore of `instance_id` to time `t`
    /// would hold, as far as the set it starts from and the recovery
    /// events after that set tell. Reads the repository: call it off the
    /// runtime.
    pub fn contents_at(&self, instance_id: &str, t: DateTime<Utc>) -> ServiceResult<SetContents> {
        check_restore_time(
            self.recovery_window(instance_id)?,
            t,
            WindowOf::Instance(instance_id),
        )?;
        let sets = self.engine.catalog().list_backups(instance_id)?;
        let set = sets
            .iter()
            .rev()
            .filter(|b| b.in_repository())
            .find(|b| b.finished_at.is_some_and(|f| f <= t))
            .ok_or_else(|| {
                invalid::<crate::ServiceError>(
                    Refusal::RestoreTimeOutsideWindow,
                    format!("no backup set of instance {instance_id} ends before {t}"),
                )
            })?;
        let engine = self.engine.for_instance_blocking(instance_id)?;
        let mut found = read(engine.repo(), set, Some(t))?;
        let (relations, databases) = self.engine.catalog().list_names(instance_id)?;
        apply_names(&mut found.contents, &relations, &databases, t);
        let oids: HashMap<(u32, u32), u32> = relations
            .iter()
            .map(|r| ((r.db_oid, r.relfilenode), r.rel_oid))
            .collect();
        // Drops committed after the set's stop position: some may precede
        // the list's read (and are then no-ops), none is missed.
        let filter = EventFilter {
            since: Some(set.started_at),
            until: Some(t),
            kinds: vec!["DropTable".into(), "DropDatabase".into()],
            ..Default::default()
        };
        let stop = set.stop_lsn;
        let events: Vec<RecoveryEvent> = self
            .engine
            .recovery_events(instance_id, &filter)?
            .into_iter()
            .filter(|e| stop.is_none_or(|s| e.lsn >= s))
            .collect();
        apply_drops(&mut found.contents, &events, |db, file| {
            oids.get(&(db, file)).copied()
        });
        Ok(found)
    }

    /// The databases and tables recorded with a cross-region copy, read
    /// from its region's repository. Call it off the runtime.
    pub fn copy_contents(&self, copy: &CrossBackup) -> ServiceResult<SetContents> {
        let repo = self.regions().target(&copy.region)?.repository()?;
        read(&repo, &copy.set, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_wal::{Lsn, TimelineId};
    use strata_repo::{DatabaseContents, TableContents};

    fn table(schema: &str, name: &str) -> TableContents {
        TableContents {
            oid: 16400,
            schema: schema.into(),
            name: name.into(),
            kind: "r".into(),
            size: 8192,
        }
    }

    fn event(kind: &str, db_oid: u32, schema: Option<&str>, table: Option<&str>) -> RecoveryEvent {
        RecoveryEvent {
            kind: kind.into(),
            timeline: TimelineId(1),
            xid: Some(700),
            time: Utc::now(),
            lsn: Lsn(0x3000028),
            end_lsn: Lsn(0x3000100),
            database: None,
            db_oid: Some(db_oid),
            schema: schema.map(str::to_string),
            table: table.map(str::to_string),
            relfilenode: Some(16401),
            rows: None,
            name: None,
            before_lsn: None,
        }
    }

    #[test]
    fn drops_after_the_set_leave_the_list_and_nothing_else_does() {
        let db = |oid: u32, name: &str, tables: Vec<TableContents>| DatabaseContents {
            oid,
            name: name.into(),
            size: None,
            tables: Some(tables),
            truncated: false,
        };
        let mut contents = BackupContents {
            read_at: Utc::now(),
            databases: vec![
                db(
                    5,
                    "shop",
                    vec![table("public", "orders"), table("s\"x", "orders")],
                ),
                db(6, "crm", vec![table("public", "orders")]),
                db(7, "gone", vec![]),
            ],
        };
        let mut no_name = event("DropTable", 6, None, None);
        no_name.relfilenode = Some(99999);
        apply_drops(
            &mut contents,
            &[
                event("DropTable", 5, Some("public"), Some("orders")),
                event("Truncate", 6, Some("public"), Some("orders")),
                // A drop whose table had no name or OID known: nothing to match.
                no_name,
                event("DropDatabase", 7, None, None),
            ],
            |_, _| None,
        );
        let names: Vec<(String, Vec<String>)> = contents
            .databases
            .iter()
            .map(|d| {
                let tables = d.tables.iter().flatten();
                (
                    d.name.clone(),
                    tables.map(|t| format!("{}.{}", t.schema, t.name)).collect(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("shop".to_string(), vec!["s\"x.orders".to_string()]),
                ("crm".to_string(), vec!["public.orders".to_string()]),
            ]
        );
    }

    fn rel(
        db_oid: u32,
        file: u32,
        rel_oid: u32,
        name: &str,
        seen: DateTime<Utc>,
    ) -> RelationNameRow {
        RelationNameRow {
            instance_id: "pg".into(),
            db_oid,
            relfilenode: file,
            rel_oid,
            schema: "public".into(),
            name: name.into(),
            kind: "r".into(),
            seen_at: seen,
        }
    }

    #[test]
    fn names_seen_between_the_list_and_the_time_bring_it_forward() {
        let read_at = Utc::now();
        let at = |secs: i64| read_at + chrono::Duration::seconds(secs);
        let mut orders = table("public", "orders");
        orders.oid = 100;
        let mut contents = BackupContents {
            read_at,
            databases: vec![DatabaseContents {
                oid: 5,
                name: "shop".into(),
                size: None,
                tables: Some(vec![orders]),
                truncated: false,
            }],
        };
        let mut toast = rel(5, 301, 201, "pg_toast_200", at(2));
        toast.schema = "pg_toast".into();
        toast.kind = "t".into();
        let relations = [
            // Seen before the list was read: already in it (or gone).
            rel(5, 300, 150, "older", at(-5)),
            // orders renamed, then a table created, then one created too late.
            rel(5, 310, 100, "orders_2025", at(2)),
            rel(5, 311, 200, "invoices", at(3)),
            toast,
            rel(5, 312, 250, "after_the_time", at(30)),
            // A database created in between, with a table.
            rel(9, 400, 500, "crm_people", at(4)),
        ];
        let databases = [DatabaseNameRow {
            instance_id: "pg".into(),
            db_oid: 9,
            name: "crm".into(),
            seen_at: at(4),
        }];
        apply_names(&mut contents, &relations, &databases, at(10));
        // invoices (file 311) dropped again before the time, found by its OID.
        let mut dropped = event("DropTable", 5, Some("public"), Some("renamed_since"));
        dropped.relfilenode = Some(311);
        apply_drops(&mut contents, &[dropped], |db, file| {
            relations
                .iter()
                .find(|r| (r.db_oid, r.relfilenode) == (db, file))
                .map(|r| r.rel_oid)
        });
        let listed: Vec<(String, Vec<String>)> = contents
            .databases
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    d.tables.iter().flatten().map(|t| t.name.clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![
                ("shop".to_string(), vec!["orders_2025".to_string()]),
                ("crm".to_string(), vec!["crm_people".to_string()]),
            ]
        );
    }
}
