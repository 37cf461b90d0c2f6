//! Names of a registered server's relations and databases, for recovery
//! events: the WAL names a table only by its storage file (`RelFileLocator`:
//! tablespace, database OID, `relfilenode`), so Strata reads `pg_class` and
//! `pg_database` over ordinary SQL sessions and keeps the last name seen
//! for every file and database, in memory for the receiver and in the
//! catalog for queries and restarts.
//!
//! Names are read when the receiver starts and again, throttled, after a
//! commit that changed the system catalogs (the decoder sees its relation
//! cache invalidations): a table created, renamed or truncated after the
//! last read is known under its new name before a later drop of it is
//! decoded, unless the drop follows within the throttle interval. Rows are
//! never removed: a dropped table keeps the name it last had.
//!
//! Reference: src/include/catalog/pg_class.h (`relkind`),
//! src/backend/utils/adt/dbsize.c (`pg_relation_filenode`, which resolves
//! mapped catalogs too).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use pg_replication::ReplicationClient;
use strata_catalog::{DatabaseNameRow, Instance, RelationNameRow};

use crate::blocking::blocking;
use crate::catalog_retry::retry_busy;
use crate::connect::{connect_options, explain};
use crate::{Engine, EngineError, EngineResult};

/// The name of one relation file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelName {
    /// The relation's OID: it stays when `TRUNCATE` or a rewrite gives the
    /// relation a new file.
    pub rel_oid: u32,
    /// Schema name.
    pub schema: String,
    /// Relation name.
    pub name: String,
    /// `pg_class.relkind`.
    pub kind: String,
}

impl RelName {
    /// A table or materialized view of the user's (not a system catalog,
    /// an index or a TOAST table).
    pub fn is_user_table(&self) -> bool {
        matches!(self.kind.as_str(), "r" | "m")
            && !matches!(self.schema.as_str(), "pg_catalog" | "information_schema")
            && !self.schema.starts_with("pg_toast")
    }
}

/// What is known of an instance's names.
#[derive(Debug, Default)]
struct Known {
    relations: HashMap<(u32, u32), RelName>,
    databases: HashMap<u32, String>,
}

/// The last names seen for an instance's relation files and databases.
#[derive(Debug)]
pub struct RelationNames {
    instance_id: String,
    known: Mutex<Known>,
}

impl RelationNames {
    /// Starts from the names the catalog recorded for `instance_id`.
    pub fn load(engine: &Engine, instance_id: &str) -> EngineResult<RelationNames> {
        let (relations, databases) = engine.catalog.list_names(instance_id)?;
        let mut known = Known::default();
        for r in relations {
            known.relations.insert(
                (r.db_oid, r.relfilenode),
                RelName {
                    rel_oid: r.rel_oid,
                    schema: r.schema,
                    name: r.name,
                    kind: r.kind,
                },
            );
        }
        for d in databases {
            known.databases.insert(d.db_oid, d.name);
        }
        Ok(RelationNames {
            instance_id: instance_id.to_string(),
            known: Mutex::new(known),
        })
    }

    /// The last name seen for a relation file.
    pub fn relation(&self, db_oid: u32, relfilenode: u32) -> Option<RelName> {
        self.lock().relations.get(&(db_oid, relfilenode)).cloned()
    }

    /// The last name seen for a database.
    pub fn database(&self, db_oid: u32) -> Option<String> {
        self.lock().databases.get(&db_oid).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rows of one complete read of the server that are new or
    /// changed, for the catalog.
    fn changes(&self, read: ServerNames) -> (Vec<RelationNameRow>, Vec<DatabaseNameRow>) {
        let known = self.lock();
        let now = read.at;
        let relations = read
            .relations
            .into_iter()
            .filter(|(db_oid, relfilenode, name)| {
                known.relations.get(&(*db_oid, *relfilenode)) != Some(name)
            })
            .map(|(db_oid, relfilenode, name)| RelationNameRow {
                instance_id: self.instance_id.as_str().into(),
                db_oid,
                relfilenode,
                rel_oid: name.rel_oid,
                schema: name.schema,
                name: name.name,
                kind: name.kind,
                seen_at: now,
            })
            .collect();
        let databases = read
            .databases
            .into_iter()
            .filter(|(db_oid, name)| known.databases.get(db_oid) != Some(name))
            .map(|(db_oid, name)| DatabaseNameRow {
                instance_id: self.instance_id.as_str().into(),
                db_oid,
                name,
                seen_at: now,
            })
            .collect();
        (relations, databases)
    }

    /// Takes in rows the catalog now holds.
    fn remember(&self, relations: &[RelationNameRow], databases: &[DatabaseNameRow]) {
        let mut known = self.lock();
        for r in relations {
            known.relations.insert(
                (r.db_oid, r.relfilenode),
                RelName {
                    rel_oid: r.rel_oid,
                    schema: r.schema.clone(),
                    name: r.name.clone(),
                    kind: r.kind.clone(),
                },
            );
        }
        for d in databases {
            known.databases.insert(d.db_oid, d.name.clone());
        }
    }
}

/// One read of a server's names.
struct ServerNames {
    at: DateTime<Utc>,
    /// (database OID, relfilenode, name)
    relations: Vec<(u32, u32, RelName)>,
    databases: Vec<(u32, String)>,
}

/// Every database, including those that refuse connections (their names
/// are needed when they are dropped).
const DATABASES_SQL: &str =
    "SELECT oid, datname, datallowconn FROM pg_catalog.pg_database ORDER BY oid LIMIT 10000";

/// Relations read from one server at most: a server with more (or one
/// that answers endlessly) costs bounded memory; the rest stay numbers.
const MAX_RELATIONS: usize = 500_000;

/// Every relation with storage of the connected database, up to `limit`.
fn relations_sql(limit: usize) -> String {
    format!(
        "SELECT pg_catalog.pg_relation_filenode(c.oid::pg_catalog.regclass), c.oid, n.nspname, c.relname, c.relkind \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'm', 'i', 't') \
         AND pg_catalog.pg_relation_filenode(c.oid::pg_catalog.regclass) IS NOT NULL \
         ORDER BY c.oid DESC LIMIT {limit}"
    )
}

pub(crate) fn oid(v: &Option<String>, what: &str) -> EngineResult<u32> {
    v.as_deref()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| EngineError::Failed(format!("the server answered {v:?} for {what}")))
}

/// A name as the server sent it; one no PostgreSQL would send (a NUL
/// byte, longer than `NAMEDATALEN` allows) is refused, as it could not be
/// stored or shown as it is.
pub(crate) fn text(v: &Option<String>, what: &str) -> EngineResult<String> {
    let v = v
        .clone()
        .ok_or_else(|| EngineError::Failed(format!("the server answered NULL for {what}")))?;
    if v.contains('\0') || v.len() > MAX_NAME_BYTES {
        return Err(EngineError::Failed(format!(
            "the server answered an impossible {what} ({} bytes)",
            v.len()
        )));
    }
    Ok(v)
}

/// `NAMEDATALEN - 1` of a standard build, with room for builds that raise it.
const MAX_NAME_BYTES: usize = 255;

impl Engine {
    /// Reads the names of every relation of every database of `instance`
    /// that accepts connections, and records those new or changed in
    /// `names` and the catalog. Answers how many changed. A database the
    /// role may not connect to is skipped (its relations keep the names
    /// known before, or stay numbers).
    pub async fn refresh_names(
        &self,
        instance: &Instance,
        names: &RelationNames,
    ) -> EngineResult<usize> {
        let read = read_names(instance).await?;
        let (relations, databases) = names.changes(read);
        let changed = relations.len() + databases.len();
        if changed > 0 {
            // Remembered once stored: a failed write is tried again at the
            // next read.
            let catalog = self.catalog.clone();
            let (relations, databases) = blocking(move || {
                retry_busy("recording relation names", || {
                    catalog.upsert_names(&relations, &databases)
                })?;
                Ok((relations, databases))
            })
            .await?;
            names.remember(&relations, &databases);
        }
        Ok(changed)
    }
}

pub(crate) async fn sql_session(
    instance: &Instance,
    dbname: Option<&str>,
) -> EngineResult<ReplicationClient> {
    let mut opts = connect_options(instance)?;
    opts.replication = false;
    if let Some(db) = dbname {
        opts.dbname = Some(db.to_string());
    }
    let mut session = ReplicationClient::connect(&opts)
        .await
        .map_err(|e| explain(instance, e))?;
    // Users of the database may create functions and operators in schemas
    // on the search path that would outrank the built-in ones and run as
    // Strata's role: only pg_catalog is searched (the queries also name
    // it), whatever the database or role settings say.
    session
        .simple_query("SET search_path = pg_catalog, pg_temp")
        .await
        .map_err(|e| explain(instance, e))?;
    Ok(session)
}

async fn read_names(instance: &Instance) -> EngineResult<ServerNames> {
    let at = Utc::now();
    let mut first = sql_session(instance, None).await?;
    let rows = first
        .simple_query(DATABASES_SQL)
        .await
        .map_err(|e| explain(instance, e))?;
    let mut databases = Vec::new();
    let mut connectable = Vec::new();
    for row in &rows {
        let [db_oid, name, allow] = row.as_slice() else {
            return Err(EngineError::Failed(
                "pg_database: unexpected columns".into(),
            ));
        };
        let (db_oid, name) = (
            oid(db_oid, "a database OID")?,
            text(name, "a database name")?,
        );
        if allow.as_deref() == Some("t") {
            connectable.push((db_oid, name.clone()));
        }
        databases.push((db_oid, name));
    }
    drop(first);
    let mut relations = Vec::new();
    for (db_oid, dbname) in connectable {
        let room = MAX_RELATIONS.saturating_sub(relations.len());
        if room == 0 {
            tracing::warn!(instance = %instance.id, "more than {MAX_RELATIONS} relations: the names of the rest are not read");
            break;
        }
        // The name travels in the startup packet as one value: it is never
        // parsed as connection settings.
        let mut session = match sql_session(instance, Some(&dbname)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(instance = %instance.id, "names of database {dbname:?} not read: {e}");
                continue;
            }
        };
        let rows = session
            .simple_query(&relations_sql(room))
            .await
            .map_err(|e| explain(instance, e))?;
        for row in &rows {
            let [file, rel_oid, schema, name, kind] = row.as_slice() else {
                return Err(EngineError::Failed("pg_class: unexpected columns".into()));
            };
            relations.push((
                db_oid,
                oid(file, "a relfilenode")?,
                RelName {
                    rel_oid: oid(rel_oid, "a relation OID")?,
                    schema: text(schema, "a schema name")?,
                    name: text(name, "a relation name")?,
                    kind: text(kind, "a relkind")?,
                },
            ));
        }
    }
    Ok(ServerNames {
        at,
        relations,
        databases,
    })
}

/// Shortest time between two reads of a server's names.
const REFRESH_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads a server's names in the background when asked, at most once per
/// [`REFRESH_MIN_INTERVAL`]; requests meanwhile are folded into one. Stops
/// when dropped.
pub(crate) struct NameRefresher {
    wake: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl NameRefresher {
    /// Starts with a first read at once.
    pub fn start(
        engine: Engine,
        instance: Instance,
        names: std::sync::Arc<RelationNames>,
    ) -> NameRefresher {
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        wake.notify_one();
        let notified = wake.clone();
        let task = tokio::spawn(async move {
            // A server that refuses ordinary sessions to this role (a
            // replication-only pg_hba entry) would fail every read: said
            // once, and again only when the reason changes.
            let mut last_error = None;
            loop {
                notified.notified().await;
                match engine.refresh_names(&instance, &names).await {
                    Ok(changed) => {
                        last_error = None;
                        tracing::debug!(instance = %instance.id, changed, "relation names read")
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!(instance = %instance.id, "reading relation names (recovery events show file numbers meanwhile): {e}");
                        }
                        last_error = Some(e);
                    }
                }
                tokio::time::sleep(REFRESH_MIN_INTERVAL).await;
            }
        });
        NameRefresher { wake, task }
    }

    /// Asks for a read (names may have changed).
    pub fn request(&self) {
        self.wake.notify_one();
    }
}

impl Drop for NameRefresher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(oid: u32, name: &str) -> RelName {
        RelName {
            rel_oid: oid,
            schema: "public".into(),
            name: name.into(),
            kind: "r".into(),
        }
    }

    fn names() -> RelationNames {
        RelationNames {
            instance_id: "db".into(),
            known: Mutex::new(Known::default()),
        }
    }

    #[test]
    fn only_new_or_changed_names_reach_the_catalog_and_dropped_ones_stay() {
        let n = names();
        let read = |rels: Vec<(u32, u32, RelName)>| ServerNames {
            at: Utc::now(),
            relations: rels,
            databases: vec![(5, "shop".into())],
        };
        let absorb = |r: ServerNames| {
            let (rels, dbs) = n.changes(r);
            n.remember(&rels, &dbs);
            (rels, dbs)
        };
        let first = read(vec![(5, 100, rel(90, "a")), (5, 101, rel(91, "b"))]);
        // Nothing is remembered until the catalog took it.
        assert_eq!(n.changes(read(vec![(5, 100, rel(90, "a"))])).0.len(), 1);
        let (r, d) = absorb(first);
        assert_eq!((r.len(), d.len()), (2, 1));
        // b renamed, a dropped: one row changes, a's name is kept.
        let (r, d) = absorb(read(vec![(5, 101, rel(91, "b2"))]));
        assert_eq!((r.len(), d.len()), (1, 0));
        assert_eq!(r[0].name, "b2");
        assert_eq!(n.relation(5, 100), Some(rel(90, "a")));
        assert_eq!(n.relation(5, 101), Some(rel(91, "b2")));
        assert_eq!(n.database(5).as_deref(), Some("shop"));
        assert_eq!(n.relation(6, 100), None);
    }

    #[test]
    fn user_tables_are_told_from_catalogs_indexes_and_toast() {
        assert!(rel(1, "t").is_user_table());
        let mut r = rel(1, "t");
        r.kind = "i".into();
        assert!(!r.is_user_table());
        let mut r = rel(1, "pg_class");
        r.schema = "pg_catalog".into();
        assert!(!r.is_user_table());
        let mut r = rel(1, "pg_toast_1");
        r.schema = "pg_toast".into();
        r.kind = "t".into();
        assert!(!r.is_user_table());
    }
}
