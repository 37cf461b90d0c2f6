//! Restoring single databases and tables into the original instance (RDS's
//! `RestoreTable`), or whole databases into another one (`recovery`): the
//! backup is restored to a scratch server, the chosen objects are copied
//! with `pg_dump | pg_restore` into the target under their new names, and
//! the scratch server is removed. Nothing that exists in the target is
//! touched: every target name must be free. Into another instance grants
//! are left out (`--no-privileges`): they name the source's roles.
//!
//! A restore either completes or leaves nothing behind. Objects are loaded
//! under temporary names (`strata_restore_<job>_…`) in one transaction
//! each (`pg_restore --single-transaction`), then given their final names
//! in one transaction at the end (every whole database of a request
//! together); on any failure the temporary objects are dropped. Tables are renamed to their temporary names (with their indexes
//! and owned sequences) on the scratch copy before the dump.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Deserialize;
use strata_catalog::{Instance, JobId, JobKind, JobState};
use strata_engine::EngineError;

use crate::local::{RestoreSource, Scratch};
use crate::pg_client::{ident, lit, ClientConn};
use crate::policy::{invalid, Refusal};
use crate::{fail_job, finish_job, PolicyError, Service, ServiceResult};

/// Longest name PostgreSQL keeps (NAMEDATALEN - 1 bytes); longer ones are
/// cut silently, which would restore under another name.
const MAX_NAME_BYTES: usize = 63;

/// One entry of `TableMeta`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbSpec {
    /// Always `db`.
    #[serde(rename = "type", default = "db_kind")]
    pub kind: String,
    /// The database in the backup.
    pub name: String,
    /// The name to restore it under (a new database), or the existing database tables go into.
    #[serde(default)]
    pub newname: Option<String>,
    /// Tables to restore; none: the whole database.
    #[serde(default)]
    pub tables: Vec<TableSpec>,
}

/// One table of a `TableMeta` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Always `table`.
    #[serde(rename = "type", default = "table_kind")]
    pub kind: String,
    /// `schema.table` or `table` (schema `public`).
    pub name: String,
    /// The name it is restored under, in the same schema.
    pub newname: String,
}

fn db_kind() -> String {
    "db".into()
}

fn table_kind() -> String {
    "table".into()
}

/// Why a name cannot be used, if it cannot. An existing name only has to be
/// one PostgreSQL can hold; a new name must also be printable.
fn name_problem(s: &str, new: bool) -> Option<String> {
    if s.is_empty() {
        return Some("is empty".into());
    }
    if s.contains('\0') {
        return Some("contains a NUL character".into());
    }
    if s.len() > MAX_NAME_BYTES {
        return Some(format!(
            "is {} bytes long; PostgreSQL names hold at most {MAX_NAME_BYTES} bytes",
            s.len()
        ));
    }
    if new && s.chars().any(char::is_control) {
        return Some("contains a control character (newline, tab, …)".into());
    }
    None
}

/// Checks one name; `what` says which (e.g. "database newname").
fn check_name(kind: Refusal, what: &str, s: &str, new: bool) -> Result<(), PolicyError> {
    match name_problem(s, new) {
        None => Ok(()),
        Some(why) => Err(PolicyError {
            kind,
            message: format!("{what} {} {why}", shown(s)),
        }),
    }
}

/// A name as shown in a message: escaped, and cut when long.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().count() > 80 {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// Splits `schema.table` (default schema `public`).
fn split_table(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), name.to_string()),
    }
}

/// Parses and checks `TableMeta`.
pub fn parse_table_meta(text: &str) -> Result<Vec<DbSpec>, PolicyError> {
    let bad = |m: String| PolicyError {
        kind: Refusal::TableMetaMalformed,
        message: m,
    };
    let mut specs: Vec<DbSpec> = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "TableMeta must be a JSON list like [{{\"type\":\"db\",\"name\":\"db1\",\"newname\":\"db1_new\"}}]: {e}"
        ))
    })?;
    if specs.is_empty() {
        return Err(bad("TableMeta lists nothing to restore".into()));
    }
    // An empty newname (a form left blank) is no newname.
    for d in &mut specs {
        if d.newname.as_deref() == Some("") {
            d.newname = None;
        }
    }
    for d in &specs {
        if d.kind != "db" {
            return Err(bad(format!(
                "each entry needs \"type\":\"db\", got {}",
                shown(&d.kind)
            )));
        }
        if d.tables.is_empty() && d.newname.is_none() {
            return Err(bad(format!(
                "database {} needs a \"newname\" to be restored under",
                shown(&d.name)
            )));
        }
        if let Some(t) = d.tables.iter().find(|t| t.kind != "table") {
            return Err(bad(format!(
                "table entries need \"type\":\"table\", got {}",
                shown(&t.kind)
            )));
        }
    }
    check_specs(&specs)?;
    Ok(specs)
}

/// Whole databases restored under new names, as [`DbSpec`]s checked like
/// those of `TableMeta`: `(name in the backup, new name)` pairs.
pub fn database_specs(pairs: Vec<(String, String)>) -> Result<Vec<DbSpec>, PolicyError> {
    let specs: Vec<DbSpec> = pairs
        .into_iter()
        .map(|(name, newname)| DbSpec {
            kind: db_kind(),
            name,
            newname: Some(newname),
            tables: Vec::new(),
        })
        .collect();
    check_specs(&specs)?;
    Ok(specs)
}

/// The name rules every restore of databases and tables shares: names
/// PostgreSQL can hold, new names printable and each given once.
fn check_specs(specs: &[DbSpec]) -> Result<(), PolicyError> {
    let mut new_dbs = HashSet::new();
    for d in specs {
        check_name(Refusal::DatabaseNameFormat, "database name", &d.name, false)?;
        if let Some(new) = &d.newname {
            check_name(Refusal::DatabaseNameFormat, "database newname", new, true)?;
        }
        if d.tables.is_empty() {
            let new = d.newname.as_deref().unwrap_or_default();
            if !new_dbs.insert(new.to_string()) {
                return Err(PolicyError {
                    kind: Refusal::DatabaseNameTaken,
                    message: format!("database newname {} is given twice", shown(new)),
                });
            }
        }
        let mut new_tables = HashSet::new();
        for t in &d.tables {
            let (schema, table) = split_table(&t.name);
            check_name(Refusal::TableNameFormat, "schema name", &schema, false)?;
            check_name(Refusal::TableNameFormat, "table name", &table, false)?;
            check_name(Refusal::TableNameFormat, "table newname", &t.newname, true)?;
            if t.newname.contains('.') {
                return Err(PolicyError {
                    kind: Refusal::TableNameFormat,
                    message: format!(
                        "table newname {} must be unqualified (it is restored into the schema of {})",
                        shown(&t.newname),
                        shown(&t.name)
                    ),
                });
            }
            if !new_tables.insert((schema.clone(), t.newname.clone())) {
                return Err(PolicyError {
                    kind: Refusal::TableNameTaken,
                    message: format!("table newname {} is given twice", shown(&t.newname)),
                });
            }
        }
    }
    Ok(())
}

/// The connection to a registered instance, for its client programs.
pub(crate) fn original_conn(instance: &Instance) -> ServiceResult<ClientConn> {
    let password = strata_engine::instance_password(instance)?;
    Ok(ClientConn {
        host: instance.host.clone(),
        port: instance.port,
        user: instance.user.clone(),
        password,
        sslmode: Some(instance.sslmode),
        sslrootcert: instance.sslrootcert.clone(),
        options: None,
        label: format!("instance {}", instance.id),
    })
}

/// Names of a relation's schema in the original, to pick free ones.
fn relation_names(
    original: &ClientConn,
    psql: &Path,
    db: &str,
    schema: &str,
) -> ServiceResult<HashSet<String>> {
    Ok(original
        .names(
            psql,
            db,
            &format!(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {}",
                lit(schema)
            ),
        )?
        .into_iter()
        .collect())
}

impl Service {
    /// Checks `TableMeta` against the original instance (every target name
    /// free), then restores in the background. Returns the job id.
    pub fn restore_tables(
        self: &Arc<Self>,
        instance_id: &str,
        src: RestoreSource,
        specs: Vec<DbSpec>,
    ) -> ServiceResult<JobId> {
        self.restore_objects(instance_id, instance_id, src, specs, JobKind::RestoreTable)
    }

    /// Restores databases and tables of `source_id`'s backups into
    /// `target_id` (the same instance or another one Strata backs up):
    /// checks every target name is free there, then restores in the
    /// background through a scratch server. The job, of `kind`, is the
    /// source's. Returns its id.
    pub(crate) fn restore_objects(
        self: &Arc<Self>,
        source_id: &str,
        target_id: &str,
        src: RestoreSource,
        specs: Vec<DbSpec>,
        kind: JobKind,
    ) -> ServiceResult<JobId> {
        self.engine.catalog().get_instance(source_id)?;
        let target = self.engine.catalog().get_instance(target_id)?;
        if !self.is_ready(target_id) {
            return Err(EngineError::Conflict(format!(
                "instance {target_id} is not running yet (or failed to be created); restore into it once it is Running"
            ))
            .into());
        }
        self.check_restore_source(source_id, &src)?;
        let major = target.pg_version_num.map(|v| v / 10000).unwrap_or(15);
        let psql = self.engine.client_tool("psql", major)?;
        self.engine.client_tool("pg_dump", major)?;
        self.engine.client_tool("pg_restore", major)?;
        let original = original_conn(&target)?;
        self.check_targets_free(&original, &psql, target_id, &specs)?;
        let mut job = self.engine.catalog().create_job(kind, Some(source_id))?;
        job.detail = describe(&specs);
        if target_id != source_id {
            job.detail.push_str(&format!(" into instance {target_id}"));
        }
        job.backup_id = src.backup_id.clone();
        self.engine.catalog().update_job(&job)?;
        let job_id = job.id;
        let svc = Arc::clone(self);
        let id = source_id.to_string();
        let keep_privileges = target_id == source_id;
        tokio::task::spawn_blocking(move || {
            let outcome = svc.start_scratch(&id, &src, job_id).and_then(|scratch| {
                let r =
                    svc.copy_objects(&scratch, &original, &psql, &specs, job_id, keep_privileges);
                scratch.remove();
                r
            });
            match outcome {
                Ok(()) => {
                    finish_job(&svc.engine, job_id, None);
                    tracing::info!(instance = %id, job = %job_id, "databases and tables restored");
                }
                Err(e) => {
                    tracing::warn!(instance = %id, job = %job_id, "restore of databases/tables failed: {e}");
                    fail_job(&svc.engine, job_id, &e.to_string());
                }
            }
        });
        Ok(job_id)
    }

    /// Refuses, before anything is written, a new database name the target
    /// already has, tables put into a database it lacks, and a new table
    /// name taken in its schema.
    fn check_targets_free(
        &self,
        original: &ClientConn,
        psql: &Path,
        instance_id: &str,
        specs: &[DbSpec],
    ) -> ServiceResult<()> {
        let databases = original.names(psql, "postgres", "SELECT datname FROM pg_database")?;
        for d in specs {
            if d.tables.is_empty() {
                let new = d.newname.as_deref().unwrap_or_default();
                if databases.iter().any(|x| x == new) {
                    return Err(invalid(
                        Refusal::DatabaseNameTaken,
                        format!(
                            "database {} already exists in instance {instance_id}; choose another newname",
                            shown(new)
                        ),
                    ));
                }
                continue;
            }
            let into = d.newname.as_deref().unwrap_or(&d.name);
            if !databases.iter().any(|x| x == into) {
                return Err(invalid(
                    Refusal::DatabaseNotFound,
                    format!(
                        "tables are restored into an existing database, and {} does not exist in instance {instance_id}",
                        shown(into)
                    ),
                ));
            }
            for t in &d.tables {
                let (schema, _) = split_table(&t.name);
                if relation_names(original, psql, into, &schema)?.contains(&t.newname) {
                    return Err(invalid(
                        Refusal::TableNameTaken,
                        format!(
                            "{}.{} already exists in database {}; choose another newname",
                            shown(&schema),
                            shown(&t.newname),
                            shown(into)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn copy_objects(
        &self,
        scratch: &Scratch,
        original: &ClientConn,
        psql: &Path,
        specs: &[DbSpec],
        job_id: JobId,
        keep_privileges: bool,
    ) -> ServiceResult<()> {
        let tools = Tools {
            pg_dump: self.engine.client_tool("pg_dump", scratch.major)?,
            pg_restore: self.engine.client_tool("pg_restore", scratch.major)?,
            psql: psql.to_path_buf(),
            scratch_psql: scratch.psql_tool().to_path_buf(),
            keep_privileges,
        };
        let in_backup = scratch.names("postgres", "SELECT datname FROM pg_database")?;
        for d in specs {
            if !in_backup.contains(&d.name) {
                return Err(invalid(
                    Refusal::DatabaseNotFound,
                    format!(
                        "database {} does not exist at the chosen restore point",
                        shown(&d.name)
                    ),
                ));
            }
        }
        // Whole databases load under temporary names and take their final
        // names together at the end: a failure drops every one loaded.
        let mut loaded: Vec<(String, String)> = Vec::new();
        let outcome = (|| {
            for (i, d) in specs.iter().enumerate() {
                if let Ok(mut job) = self.engine.catalog().get_job(job_id) {
                    job.state = JobState::Uploading;
                    job.progress = (90 + i * 9 / specs.len()).min(99) as u8;
                    let _ = self.engine.catalog().update_job(&job);
                }
                let temp = format!("strata_restore_{job_id}_{i}");
                if d.tables.is_empty() {
                    load_database(scratch, original, &tools, d, &temp)?;
                    loaded.push((temp, d.newname.clone().unwrap_or_default()));
                } else {
                    restore_tables(scratch, original, &tools, d, &temp)?;
                }
            }
            if loaded.is_empty() {
                return Ok(());
            }
            let renames: String = loaded
                .iter()
                .map(|(temp, name)| {
                    format!(
                        "ALTER DATABASE {} RENAME TO {};\n",
                        ident(temp),
                        ident(name)
                    )
                })
                .collect();
            original.run(&tools.psql, "postgres", &renames, true)?;
            Ok(())
        })();
        if outcome.is_err() {
            for (temp, _) in &loaded {
                drop_database(original, &tools, temp);
            }
        }
        outcome
    }
}

/// One line per database for the job's detail.
pub(crate) fn describe(specs: &[DbSpec]) -> String {
    specs
        .iter()
        .map(|d| {
            if d.tables.is_empty() {
                format!(
                    "database {} as {}",
                    shown(&d.name),
                    shown(d.newname.as_deref().unwrap_or_default())
                )
            } else {
                let tables: Vec<String> = d
                    .tables
                    .iter()
                    .map(|t| format!("{} as {}", shown(&t.name), shown(&t.newname)))
                    .collect();
                format!(
                    "{} in {}",
                    tables.join(", "),
                    shown(d.newname.as_deref().unwrap_or(&d.name))
                )
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

struct Tools {
    pg_dump: std::path::PathBuf,
    pg_restore: std::path::PathBuf,
    /// psql for the original instance.
    psql: std::path::PathBuf,
    /// psql of the scratch server's version.
    scratch_psql: std::path::PathBuf,
    /// Whether grants are restored: into the instance the backup is of,
    /// whose roles they name; elsewhere those roles need not exist.
    keep_privileges: bool,
}

/// Copies a whole database into the new database `temp`, dropped again if
/// the load fails.
fn load_database(
    scratch: &Scratch,
    original: &ClientConn,
    tools: &Tools,
    d: &DbSpec,
    temp: &str,
) -> ServiceResult<()> {
    // A temporary name someone else took fails here, before anything is ours to drop.
    original.run(
        &tools.psql,
        "postgres",
        &format!("CREATE DATABASE {} TEMPLATE template0", ident(temp)),
        false,
    )?;
    let mut dump = scratch.conn().command(&tools.pg_dump, &d.name);
    dump.arg("-Fc");
    let mut load = original.command(&tools.pg_restore, temp);
    load.args(["--exit-on-error", "--no-owner", "--single-transaction"]);
    if !tools.keep_privileges {
        load.arg("--no-privileges");
    }
    if let Err(e) = pipe(dump, load) {
        drop_database(original, tools, temp);
        return Err(e);
    }
    Ok(())
}

/// Drops a temporary database this restore created; a failure is logged.
fn drop_database(original: &ClientConn, tools: &Tools, temp: &str) {
    if let Err(e) = original.run(
        &tools.psql,
        "postgres",
        &format!("DROP DATABASE IF EXISTS {}", ident(temp)),
        false,
    ) {
        tracing::warn!("could not drop the partly restored database {temp}: {e}");
    }
}

/// A relation to rename at the end: where it was loaded and its final name.
struct Rename {
    kind: &'static str,
    schema: String,
    temp: String,
    name: String,
}

/// Copies tables into an existing database: each table with its indexes
/// and owned sequences is loaded under temporary names in one transaction,
/// then everything is renamed in one transaction.
fn restore_tables(
    scratch: &Scratch,
    original: &ClientConn,
    tools: &Tools,
    d: &DbSpec,
    temp: &str,
) -> ServiceResult<()> {
    let into = d.newname.clone().unwrap_or_else(|| d.name.clone());
    let mut dump = scratch.conn().command(&tools.pg_dump, &d.name);
    dump.arg("-Fc");
    let mut renames = Vec::new();
    let mut loaded_tables = Vec::new();
    // Per schema: the relations of the original, read once, plus every
    // name this restore chooses, so no two chosen names collide either.
    let mut names: HashMap<String, HashSet<String>> = HashMap::new();
    for (n, t) in d.tables.iter().enumerate() {
        let (schema, table) = split_table(&t.name);
        let table_temp = format!("{temp}_{n}");
        let deps = rename_on_scratch(scratch, tools, &d.name, &schema, &table, &table_temp)?;
        dump.arg(format!("--table={}.{}", ident(&schema), ident(&table_temp)));
        let taken = match names.entry(schema.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(relation_names(original, &tools.psql, &into, &schema)?),
        };
        // Temporary names someone else already uses are not ours to load
        // into (nor to drop on failure).
        for temp_name in std::iter::once(&table_temp).chain(deps.iter().map(|(_, _, t)| t)) {
            if taken.contains(temp_name) {
                return Err(EngineError::Conflict(format!(
                    "{}.{} already exists in database {}; remove it or retry later",
                    shown(&schema),
                    shown(temp_name),
                    shown(&into)
                ))
                .into());
            }
        }
        taken.insert(t.newname.clone());
        renames.push(Rename {
            kind: "TABLE",
            schema: schema.clone(),
            temp: table_temp.clone(),
            name: t.newname.clone(),
        });
        for (kind, old_name, dep_temp) in deps {
            let name = derived_name(&old_name, &table, &t.newname, taken);
            taken.insert(name.clone());
            renames.push(Rename {
                kind,
                schema: schema.clone(),
                temp: dep_temp,
                name,
            });
        }
        loaded_tables.push((schema, table_temp));
    }
    let mut load = original.command(&tools.pg_restore, &into);
    load.args(["--exit-on-error", "--no-owner", "--single-transaction"]);
    if !tools.keep_privileges {
        load.arg("--no-privileges");
    }
    // A failed load rolled back as a whole: nothing of it is left.
    pipe(dump, load)?;
    let sql: String = renames
        .iter()
        .map(|r| {
            format!(
                "ALTER {} {}.{} RENAME TO {};\n",
                r.kind,
                ident(&r.schema),
                ident(&r.temp),
                ident(&r.name)
            )
        })
        .collect();
    if let Err(e) = original.run(&tools.psql, &into, &sql, true) {
        let drop: String = loaded_tables
            .iter()
            .map(|(s, t)| format!("DROP TABLE IF EXISTS {}.{};\n", ident(s), ident(t)))
            .collect();
        if let Err(cleanup) = original.run(&tools.psql, &into, &drop, true) {
            tracing::warn!("could not drop partly restored tables in {into:?}: {cleanup}");
        }
        return Err(e);
    }
    Ok(())
}

/// The final name of an index or sequence of a restored table: the
/// table's name in it replaced by the new one (`t_pkey` → `t2_pkey`), cut to
/// what PostgreSQL holds, and numbered if taken.
fn derived_name(old: &str, table: &str, newname: &str, taken: &HashSet<String>) -> String {
    let base = match old.strip_prefix(table) {
        Some(rest) => format!("{newname}{rest}"),
        None => format!("{newname}_{old}"),
    };
    let free = |n: &String| !taken.contains(n);
    let candidate = cut(&base, MAX_NAME_BYTES);
    if free(&candidate) {
        return candidate;
    }
    (1..)
        .map(|i| {
            let suffix = format!("_{i}");
            format!("{}{suffix}", cut(&base, MAX_NAME_BYTES - suffix.len()))
        })
        .find(free)
        .unwrap_or(candidate)
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Renames a table on the scratch copy to `temp`, with its indexes and
/// owned sequences (to `temp_<k>`), so the dump loads under names nobody
/// uses in the original. Returns (kind, original name, temporary name) of
/// each dependent.
fn rename_on_scratch(
    scratch: &Scratch,
    tools: &Tools,
    db: &str,
    schema: &str,
    table: &str,
    temp: &str,
) -> ServiceResult<Vec<(&'static str, String, String)>> {
    let conn = scratch.conn();
    let psql = &tools.scratch_psql;
    let found = conn.names(
        psql,
        db,
        &format!(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p')",
            lit(schema),
            lit(table)
        ),
    )?;
    if found.len() != 1 {
        return Err(invalid(
            Refusal::TableNotFound,
            format!(
                "table {}.{} does not exist in database {} at the chosen restore point",
                shown(schema),
                shown(table),
                shown(db)
            ),
        ));
    }
    let qualified = format!("{}.{}", ident(schema), ident(table));
    let oid = format!("{}::regclass", lit(&qualified));
    let indexes = conn.names(
        psql,
        db,
        &format!("SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE i.indrelid = {oid}"),
    )?;
    let sequences = conn.names(
        psql,
        db,
        &format!(
            "SELECT s.relname FROM pg_class s JOIN pg_depend d ON d.objid = s.oid \
             WHERE d.refobjid = {oid} AND s.relkind = 'S' AND d.deptype IN ('a', 'i')"
        ),
    )?;
    scratch.disarm(db)?;
    let mut sql = format!("ALTER TABLE {qualified} RENAME TO {};", ident(temp));
    let mut deps = Vec::new();
    let all = indexes
        .into_iter()
        .map(|n| ("INDEX", n))
        .chain(sequences.into_iter().map(|n| ("SEQUENCE", n)));
    for (k, (kind, name)) in all.enumerate() {
        let dep_temp = format!("{temp}_{k}");
        sql.push_str(&format!(
            " ALTER {kind} {}.{} RENAME TO {};",
            ident(schema),
            ident(&name),
            ident(&dep_temp)
        ));
        deps.push((kind, name, dep_temp));
    }
    conn.run(psql, db, &sql, true)?;
    Ok(deps)
}

/// Runs `producer | consumer`; fails with the stderr of whichever failed.
/// The producer's stderr is read on a thread of its own, so neither side
/// waits on a full pipe.
fn pipe(mut producer: Command, mut consumer: Command) -> ServiceResult<()> {
    let mut p = producer
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(EngineError::io("running pg_dump"))?;
    let stdout = p
        .stdout
        .take()
        .ok_or_else(|| EngineError::Failed("pg_dump has no stdout".into()))?;
    let p_err = p.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut text);
            text
        })
    });
    let c = match consumer
        .stdin(stdout)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = p.kill();
            let _ = p.wait();
            return Err(EngineError::io("running pg_restore")(e).into());
        }
    };
    let c_out = c
        .wait_with_output()
        .map_err(EngineError::io("waiting for pg_restore"))?;
    let p_status = p.wait().map_err(EngineError::io("waiting for pg_dump"))?;
    let p_stderr = p_err.and_then(|t| t.join().ok()).unwrap_or_default();
    // A consumer that stopped makes the producer fail on a closed pipe:
    // its own error is the cause.
    if !c_out.status.success() {
        return Err(EngineError::Failed(format!(
            "pg_restore: {}",
            String::from_utf8_lossy(&c_out.stderr).trim()
        ))
        .into());
    }
    if !p_status.success() {
        return Err(EngineError::Failed(format!("pg_dump: {}", p_stderr.trim())).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_meta_as_rds_writes_it() {
        let specs =
            parse_table_meta(r#"[{"type":"db","name":"db1","newname":"db1_new"}]"#).unwrap();
        assert_eq!(specs[0].newname.as_deref(), Some("db1_new"));
        let specs = parse_table_meta(
            r#"[{"type":"db","name":"app","tables":[{"type":"table","name":"public.t","newname":"t_restored"}]}]"#,
        )
        .unwrap();
        assert_eq!(specs[0].tables[0].newname, "t_restored");
        for bad in [
            "not json",
            "[]",
            r#"[{"type":"db","name":"db1"}]"#,
            r#"[{"type":"table","name":"db1","newname":"x"}]"#,
            r#"[{"type":"db","name":"db1","newname":"x","extra":1}]"#,
        ] {
            assert_eq!(
                parse_table_meta(bad).unwrap_err().kind,
                Refusal::TableMetaMalformed,
                "{bad}"
            );
        }
        assert_eq!(split_table("t"), ("public".into(), "t".into()));
        assert_eq!(split_table("s.t"), ("s".into(), "t".into()));
    }

    #[test]
    fn hostile_names_are_data_or_refused_up_front() {
        let db = |new: &str| {
            parse_table_meta(
                &serde_json::json!([{"type": "db", "name": "src", "newname": new}]).to_string(),
            )
        };
        // Accepted as plain names: they reach PostgreSQL only as quoted values.
        for ok in [
            "host=127.0.0.1 port=5999 user=leak",
            "dbname=postgres",
            "postgresql://evil/x",
            "a'b\"c;DROP",
            "-d",
            "ünïcødé-名前",
            &"x".repeat(63),
            &"é".repeat(31),
        ] {
            assert!(db(ok).is_ok(), "{ok}");
        }
        for (bad, code) in [
            ("a\nb", Refusal::DatabaseNameFormat),
            ("a\0b", Refusal::DatabaseNameFormat),
            ("tab\there", Refusal::DatabaseNameFormat),
            (&"x".repeat(64) as &str, Refusal::DatabaseNameFormat),
            (&"é".repeat(32), Refusal::DatabaseNameFormat),
            ("", Refusal::TableMetaMalformed),
        ] {
            let e = db(bad).unwrap_err();
            assert_eq!(e.kind, code, "{bad:?}");
            assert!(!e.message.contains('\n'), "{:?}", e.message);
        }
        let table = |name: &str, new: &str| {
            parse_table_meta(
                &serde_json::json!([{"type": "db", "name": "app",
                    "tables": [{"type": "table", "name": name, "newname": new}]}])
                .to_string(),
            )
        };
        assert_eq!(
            table("public.t", "s.t2").unwrap_err().kind,
            Refusal::TableNameFormat
        );
        assert_eq!(
            table("public.t", &"n".repeat(64)).unwrap_err().kind,
            Refusal::TableNameFormat
        );
        assert!(table("public.t", &"n".repeat(63)).is_ok());
        assert!(table("we\"ird.t;x", "new'name").is_ok());
        let twice = parse_table_meta(r#"[{"name":"a","newname":"x"},{"name":"b","newname":"x"}]"#);
        assert_eq!(twice.unwrap_err().kind, Refusal::DatabaseNameTaken);
    }

    #[test]
    fn derived_names_fit_and_stay_free() {
        let none = HashSet::new();
        assert_eq!(derived_name("t_pkey", "t", "t2", &none), "t2_pkey");
        assert_eq!(derived_name("idx", "t", "t2", &none), "t2_idx");
        let long = "n".repeat(63);
        let name = derived_name("t_pkey", "t", &long, &none);
        assert_eq!(name.len(), 63);
        let taken: HashSet<String> = [name.clone()].into();
        let other = derived_name("t_pkey", "t", &long, &taken);
        assert!(other.len() <= 63 && other != name && other.ends_with("_1"));
        let multibyte = "é".repeat(31);
        let n = derived_name("t_pkey", "t", &multibyte, &none);
        assert!(n.len() <= 63 && n.starts_with(&multibyte));
    }
}
