//! Chosen databases of a backup restored elsewhere than where `RestoreTable`
//! puts them: RDS's `RecoveryDBInstance` (into an existing instance or a new
//! one) and `CopyDatabaseBetweenInstances` (into another instance).
//!
//! Into an existing instance both are a restore of whole databases whose
//! target is that instance (`tables`: the backup restored to a scratch
//! server, `pg_dump | pg_restore` under temporary names, renamed at the end,
//! nothing of the target touched and a taken name refused up front). Into
//! a new instance it is a clone (`local`) in which, before the instance is
//! reported running, the databases not asked for are dropped and the others
//! take their new names.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
use strata_catalog::{InstanceId, JobId, JobKind};

use crate::local::{while_starting, CloneRequest, RestoreSource};
use crate::pg_client::ident;
use crate::policy::{invalid, Refusal};
use crate::tables::{database_specs, original_conn, shown, DbSpec};
use crate::{PolicyError, Service, ServiceResult};

/// Databases every PostgreSQL cluster has: a new instance keeps them, and
/// no restored database may take their names.
const SYSTEM_DATABASES: [&str; 3] = ["postgres", "template0", "template1"];

/// `{"source name": "new name", …}` in the order given, each source once.
struct NamePairs(Vec<(String, String)>);

impl<'de> Deserialize<'de> for NamePairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = NamePairs;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping database names to new names")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NamePairs, A::Error> {
                let mut pairs: Vec<(String, String)> = Vec::new();
                while let Some((name, new)) = map.next_entry::<String, String>()? {
                    if pairs.iter().any(|(n, _)| *n == name) {
                        return Err(A::Error::custom(format!(
                            "database {} is named twice",
                            shown(&name)
                        )));
                    }
                    pairs.push((name, new));
                }
                Ok(NamePairs(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// Parses `DbNames`: RDS's `{"source name":"new name",…}` (names exactly
/// as given), or a comma-separated list of names each restored under its
/// own name (surrounding spaces trimmed). Names are checked as
/// `TableMeta`'s are.
pub fn parse_db_names(text: &str) -> Result<Vec<DbSpec>, PolicyError> {
    let bad = |m: String| PolicyError {
        kind: Refusal::DbNamesMalformed,
        message: m,
    };
    let pairs: Vec<(String, String)> = if text.trim_start().starts_with('{') {
        serde_json::from_str::<NamePairs>(text)
            .map_err(|e| {
                bad(format!(
                    "DbNames must be a JSON object like {{\"db1\":\"db1_new\"}}: {e}"
                ))
            })?
            .0
    } else {
        let names: Vec<&str> = text.split(',').map(str::trim).collect();
        if names.iter().any(|n| n.is_empty()) {
            return Err(bad(format!(
                "DbNames {} has an empty name; write db1,db2 or {{\"db1\":\"db1_new\"}}",
                shown(text)
            )));
        }
        let mut seen = HashSet::new();
        if let Some(twice) = names.iter().find(|n| !seen.insert(**n)) {
            return Err(bad(format!("database {} is named twice", shown(twice))));
        }
        names
            .into_iter()
            .map(|n| (n.to_string(), n.to_string()))
            .collect()
    };
    if pairs.is_empty() {
        return Err(bad("DbNames names no database".into()));
    }
    database_specs(pairs)
}

/// The rules of a new instance: templates are not restored by name, and
/// no database takes the name of one every cluster has.
fn check_new_instance_names(specs: &[DbSpec]) -> Result<(), PolicyError> {
    for d in specs {
        let new = d.newname.as_deref().unwrap_or(&d.name);
        if matches!(d.name.as_str(), "template0" | "template1") {
            return Err(invalid(
                Refusal::DatabaseNameFormat,
                format!(
                    "{} is a template every new instance has; name the databases to restore",
                    shown(&d.name)
                ),
            ));
        }
        if new != d.name && SYSTEM_DATABASES.contains(&new) {
            return Err(invalid(
                Refusal::DatabaseNameTaken,
                format!(
                    "database {} exists in every new instance; choose another new name",
                    shown(new)
                ),
            ));
        }
    }
    Ok(())
}

impl Service {
    /// `RecoveryDBInstance`: restores `specs` of `source_id`'s backups into
    /// `target_id`, or into a new instance when there is none. Returns the
    /// instance restored into and the job (the source's) at once.
    pub fn recover_databases(
        self: &Arc<Self>,
        source_id: &str,
        target_id: Option<&str>,
        src: RestoreSource,
        specs: Vec<DbSpec>,
    ) -> ServiceResult<(InstanceId, JobId)> {
        if let Some(target) = target_id {
            let job =
                self.restore_objects(source_id, target, src, specs, JobKind::RecoverDatabases)?;
            return Ok((InstanceId::from(target), job));
        }
        check_new_instance_names(&specs)?;
        let (backup_id, target) = self.check_restore_source(source_id, &src)?;
        let major = self.pg_major(source_id, backup_id.as_deref())?;
        let (id, _, job) = self.launch_clone(
            source_id,
            CloneRequest {
                backup_id,
                target,
                restore_time: src.restore_time,
                major,
                engine: self.engine.clone(),
                index: None,
                job_kind: JobKind::RecoverDatabases,
                on_host: None,
                databases: Some(specs),
            },
        )?;
        Ok((id, job))
    }

    /// `CopyDatabaseBetweenInstances`: `specs` of `source_id`'s backups (a
    /// set or a point in time, as RDS requires) restored into `target_id`.
    pub fn copy_databases(
        self: &Arc<Self>,
        source_id: &str,
        target_id: &str,
        src: RestoreSource,
        specs: Vec<DbSpec>,
    ) -> ServiceResult<JobId> {
        self.restore_objects(source_id, target_id, src, specs, JobKind::CopyDatabases)
    }

    /// On a new instance restored from a backup (blocking): carries out
    /// [`PrunePlan`] for the databases it holds.
    pub(crate) fn keep_only_databases(
        &self,
        instance_id: &str,
        major: u32,
        specs: &[DbSpec],
    ) -> ServiceResult<()> {
        let conn = original_conn(&self.engine.catalog().get_instance(instance_id)?)?;
        let psql = self.engine.client_tool("psql", major)?;
        // Every statement runs from template1, which is never renamed or copied.
        let maintenance = "template1";
        let present =
            while_starting(|| conn.names(&psql, maintenance, "SELECT datname FROM pg_database"))?;
        let plan = PrunePlan::new(&present, specs)?;
        let force = if major >= 13 { " WITH (FORCE)" } else { "" };
        for db in &plan.drop {
            let sql = format!("DROP DATABASE {}{force}", ident(db));
            conn.run(&psql, maintenance, &sql, false)?;
        }
        if !plan.renames.is_empty() {
            let sql: String = plan
                .renames
                .iter()
                .map(|(from, to)| {
                    format!("ALTER DATABASE {} RENAME TO {};\n", ident(from), ident(to))
                })
                .collect();
            conn.run(&psql, maintenance, &sql, true)?;
        }
        for (from, to) in &plan.copies {
            let sql = format!("CREATE DATABASE {} TEMPLATE {}", ident(to), ident(from));
            conn.run(&psql, maintenance, &sql, false)?;
        }
        Ok(())
    }
}

/// What turns a new instance holding every database of the restore point
/// into one holding only those asked for, under their new names.
#[derive(Debug, PartialEq)]
struct PrunePlan {
    /// Databases dropped (not named, not a system database).
    drop: Vec<String>,
    /// Renames in order, through temporary names so that swapped names
    /// never collide; run in one transaction.
    renames: Vec<(String, String)>,
    /// System databases asked for under another name: copied, as they stay.
    copies: Vec<(String, String)>,
}

impl PrunePlan {
    /// The plan for a cluster holding `present`; a named database it lacks
    /// is refused.
    fn new(present: &[String], specs: &[DbSpec]) -> Result<PrunePlan, PolicyError> {
        if let Some(d) = specs.iter().find(|d| !present.contains(&d.name)) {
            return Err(invalid(
                Refusal::DatabaseNotFound,
                format!(
                    "database {} does not exist at the chosen restore point",
                    shown(&d.name)
                ),
            ));
        }
        let is_system = |n: &str| SYSTEM_DATABASES.contains(&n);
        let named: HashSet<&str> = specs.iter().map(|d| d.name.as_str()).collect();
        let drop = present
            .iter()
            .filter(|db| !is_system(db) && !named.contains(db.as_str()))
            .cloned()
            .collect();
        let moved: Vec<(&str, &str)> = specs
            .iter()
            .map(|d| (d.name.as_str(), d.newname.as_deref().unwrap_or(&d.name)))
            .filter(|(name, new)| name != new)
            .collect();
        let mut renames = Vec::new();
        let mut finals = Vec::new();
        for (i, (name, new)) in moved.iter().filter(|(n, _)| !is_system(n)).enumerate() {
            let temp = (0..)
                .map(|k| format!("strata_recover_{i}_{k}"))
                .find(|t| !present.contains(t))
                .unwrap_or_default();
            renames.push((name.to_string(), temp.clone()));
            finals.push((temp, new.to_string()));
        }
        renames.extend(finals);
        let copies = moved
            .iter()
            .filter(|(n, _)| is_system(n))
            .map(|(n, new)| (n.to_string(), new.to_string()))
            .collect();
        Ok(PrunePlan {
            drop,
            renames,
            copies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(specs: &[DbSpec]) -> Vec<(&str, &str)> {
        specs
            .iter()
            .map(|d| (d.name.as_str(), d.newname.as_deref().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn db_names_as_rds_writes_them() {
        let specs = parse_db_names(r#"{"b":"b_new","a":"a"}"#).unwrap();
        assert_eq!(pairs(&specs), [("b", "b_new"), ("a", "a")]);
        let specs = parse_db_names("app, sales").unwrap();
        assert_eq!(pairs(&specs), [("app", "app"), ("sales", "sales")]);
        // Names that would be syntax elsewhere are only names here.
        let specs = parse_db_names(r#"{"-d":"host=evil port=1","a,b":" x "}"#).unwrap();
        assert_eq!(pairs(&specs), [("-d", "host=evil port=1"), ("a,b", " x ")]);
        for (bad, kind) in [
            ("", Refusal::DbNamesMalformed),
            ("a,,b", Refusal::DbNamesMalformed),
            ("a,a", Refusal::DbNamesMalformed),
            ("{}", Refusal::DbNamesMalformed),
            (r#"{"a":"x","a":"y"}"#, Refusal::DbNamesMalformed),
            (r#"{"a":1}"#, Refusal::DbNamesMalformed),
            (r#"{"a":"x""#, Refusal::DbNamesMalformed),
            (r#"{"a":"x","b":"x"}"#, Refusal::DatabaseNameTaken),
            (r#"{"a":"x\ny"}"#, Refusal::DatabaseNameFormat),
            (r#"{"a":""}"#, Refusal::DatabaseNameFormat),
        ] {
            assert_eq!(parse_db_names(bad).unwrap_err().kind, kind, "{bad:?}");
        }
        let long = format!(r#"{{"a":"{}"}}"#, "x".repeat(64));
        assert_eq!(
            parse_db_names(&long).unwrap_err().kind,
            Refusal::DatabaseNameFormat
        );
    }

    #[test]
    fn pruning_keeps_only_what_was_asked_for() {
        let present: Vec<String> = [
            "postgres",
            "template0",
            "template1",
            "a",
            "b",
            "other",
            "strata_recover_0_0",
        ]
        .map(String::from)
        .to_vec();
        let specs = parse_db_names(r#"{"a":"b","b":"a","postgres":"pg_copy"}"#).unwrap();
        let plan = PrunePlan::new(&present, &specs).unwrap();
        let owned = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .collect()
        };
        assert_eq!(
            plan,
            PrunePlan {
                drop: vec!["other".into(), "strata_recover_0_0".into()],
                renames: owned(&[
                    ("a", "strata_recover_0_1"),
                    ("b", "strata_recover_1_0"),
                    ("strata_recover_0_1", "b"),
                    ("strata_recover_1_0", "a"),
                ]),
                copies: owned(&[("postgres", "pg_copy")]),
            }
        );
        let kept = PrunePlan::new(&present, &parse_db_names("a").unwrap()).unwrap();
        assert_eq!(kept.drop, ["b", "other", "strata_recover_0_0"]);
        assert!(kept.renames.is_empty() && kept.copies.is_empty());
        let missing = PrunePlan::new(&present, &parse_db_names("gone").unwrap());
        assert_eq!(missing.unwrap_err().kind, Refusal::DatabaseNotFound);
    }

    #[test]
    fn new_instances_keep_their_system_databases() {
        let check = |text: &str| check_new_instance_names(&parse_db_names(text).unwrap());
        assert!(check(r#"{"app":"app2","postgres":"postgres"}"#).is_ok());
        assert!(check(r#"{"postgres":"pg_copy"}"#).is_ok());
        assert_eq!(
            check(r#"{"app":"postgres"}"#).unwrap_err().kind,
            Refusal::DatabaseNameTaken
        );
        assert_eq!(
            check(r#"{"app":"template1"}"#).unwrap_err().kind,
            Refusal::DatabaseNameTaken
        );
        assert_eq!(
            check("template0").unwrap_err().kind,
            Refusal::DatabaseNameFormat
        );
    }
}
