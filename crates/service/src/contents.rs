//! What a backup set holds, database by database and table by table, for
//! RDS's `DescribeBackupDatabase`, `DescribeMetaList` and
//! `DescribeCrossBackupMetaList`: the list recorded in the set's manifest
//! when it was taken (see strata_engine's `contents` module), read back
//! from the repository that holds the set or its cross-region copy.
//!
//! For a point in time the list is that of the set a restore to that time
//! starts from, less the tables and databases recovery events show dropped
//! between the set's end and the time. Tables created or renamed in that
//! interval are not in it: the WAL names no table it creates, and the
//! names read from the server record no creation time.

use chrono::{DateTime, Utc};
use strata_catalog::{BackupId, BackupMethod, BackupSet, BackupStatus, CrossBackup, InstanceId};
use strata_engine::{EngineError, EventFilter, RecoveryEvent};
use strata_repo::{BackupContents, Repository};

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

/// Takes out of `contents` what `events` (recovery events committed after
/// the set) dropped: whole databases by OID, tables by database OID,
/// schema and name. A table dropped and created again under its name is
/// still taken out: the list does not know of creations.
fn apply_drops(contents: &mut BackupContents, events: &[RecoveryEvent]) {
    for e in events {
        let Some(db_oid) = e.db_oid else { continue };
        match e.kind.as_str() {
            "DropDatabase" => contents.databases.retain(|d| d.oid != db_oid),
            "DropTable" => {
                let (Some(schema), Some(table)) = (&e.schema, &e.table) else {
                    continue;
                };
                for d in contents.databases.iter_mut().filter(|d| d.oid == db_oid) {
                    if let Some(tables) = &mut d.tables {
                        tables.retain(|t| !(t.schema == *schema && t.name == *table));
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
        read(self.engine.repo(), &set, None)
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
        let mut found = read(self.engine.repo(), set, Some(t))?;
        let filter = EventFilter {
            since: set.finished_at,
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
        apply_drops(&mut found.contents, &events);
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
        apply_drops(
            &mut contents,
            &[
                event("DropTable", 5, Some("public"), Some("orders")),
                event("Truncate", 6, Some("public"), Some("orders")),
                // A drop whose table had no name known: nothing to match.
                event("DropTable", 6, None, None),
                event("DropDatabase", 7, None, None),
            ],
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
}
