//! Restoring single databases and tables into the original instance (RDS's
//! `RestoreTable`): the backup is restored to a scratch server, the chosen
//! objects are copied with `pg_dump | pg_restore` into the original under
//! their new names, and the scratch server is removed. Nothing that exists
//! in the original is touched: every target name must be free.
//!
//! Tables are renamed (with their indexes and owned sequences) on the
//! scratch copy before the dump, so the restored objects never collide with
//! the originals they sit beside.

use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Deserialize;
use strata_catalog::{Instance, JobState};
use strata_engine::EngineError;

use crate::local::{RestoreSource, Scratch};
use crate::{fail_job, finish_job, PolicyError, Service, ServiceError, ServiceResult};

/// One entry of `TableMeta`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DbSpec {
    #[serde(rename = "type", default = "db_kind")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub newname: Option<String>,
    #[serde(default)]
    pub tables: Vec<TableSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TableSpec {
    #[serde(rename = "type", default = "table_kind")]
    pub kind: String,
    /// `schema.table` or `table` (schema `public`).
    pub name: String,
    pub newname: String,
}

fn db_kind() -> String {
    "db".into()
}

fn table_kind() -> String {
    "table".into()
}

fn invalid(code: &'static str, message: impl Into<String>) -> ServiceError {
    PolicyError {
        code,
        message: message.into(),
    }
    .into()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && !s.contains('\0')
}

/// SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
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
        code: "InvalidTableMeta.Malformed",
        message: m,
    };
    let specs: Vec<DbSpec> = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "TableMeta must be a JSON list like [{{\"type\":\"db\",\"name\":\"db1\",\"newname\":\"db1_new\"}}]: {e}"
        ))
    })?;
    if specs.is_empty() {
        return Err(bad("TableMeta lists nothing to restore".into()));
    }
    for d in &specs {
        if d.kind != "db" || !valid_name(&d.name) {
            return Err(bad(format!(
                "each entry needs \"type\":\"db\" and a database name, got {:?}",
                d.name
            )));
        }
        if d.tables.is_empty() && !d.newname.as_deref().is_some_and(valid_name) {
            return Err(bad(format!(
                "database {:?} needs a \"newname\" to be restored under",
                d.name
            )));
        }
        for t in &d.tables {
            let (schema, table) = split_table(&t.name);
            if t.kind != "table"
                || !valid_name(&schema)
                || !valid_name(&table)
                || !valid_name(&t.newname)
                || t.newname.contains('.')
            {
                return Err(bad(format!(
                    "table entries need \"type\":\"table\", a name (schema.table) and an unqualified newname, got {:?} -> {:?}",
                    t.name, t.newname
                )));
            }
        }
    }
    Ok(specs)
}

/// `psql`/`pg_dump` connection to a registered instance.
struct Original {
    instance: Instance,
    password: Option<String>,
}

impl Original {
    fn new(instance: Instance) -> ServiceResult<Self> {
        let password = match &instance.password_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                EngineError::Refused(format!(
                    "environment variable {var} (the password of {}) is not set",
                    instance.id
                ))
            })?),
            None => instance.password.clone(),
        };
        Ok(Original { instance, password })
    }

    fn command(&self, program: &std::path::Path, db: &str) -> Command {
        let mut c = Command::new(program);
        c.args([
            "-h",
            &self.instance.host,
            "-p",
            &self.instance.port.to_string(),
            "-U",
            &self.instance.user,
        ]);
        c.arg("-d").arg(db);
        c.env("PGSSLMODE", &self.instance.sslmode);
        c.env("PGCONNECT_TIMEOUT", "10");
        if let Some(ca) = &self.instance.sslrootcert {
            c.env("PGSSLROOTCERT", ca);
        }
        match &self.password {
            Some(p) => c.env("PGPASSWORD", p),
            None => c.env_remove("PGPASSWORD"),
        };
        c
    }

    fn psql(&self, psql: &std::path::Path, db: &str, sql: &str) -> ServiceResult<String> {
        let out = self
            .command(psql, db)
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(EngineError::io("running psql"))?;
        if !out.status.success() {
            return Err(EngineError::Server(format!(
                "instance {}: {}",
                self.instance.id,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Service {
    /// Checks `TableMeta` against the original instance (every target name
    /// free), then restores in the background. Returns the job id.
    pub fn restore_tables(
        self: &Arc<Self>,
        instance_id: &str,
        src: RestoreSource,
        specs: Vec<DbSpec>,
    ) -> ServiceResult<i64> {
        let instance = self.engine.catalog.get_instance(instance_id)?;
        self.check_restore_source(instance_id, &src)?;
        let major = instance.pg_version_num.map(|v| v / 10000).unwrap_or(15);
        let psql = self.engine.client_tool("psql", major)?;
        self.engine.client_tool("pg_dump", major)?;
        self.engine.client_tool("pg_restore", major)?;
        let original = Original::new(instance)?;
        let databases: Vec<String> = original
            .psql(&psql, "postgres", "SELECT datname FROM pg_database")?
            .lines()
            .map(str::to_string)
            .collect();
        for d in &specs {
            if d.tables.is_empty() {
                let new = d.newname.as_deref().unwrap_or_default();
                if databases.iter().any(|x| x == new) {
                    return Err(invalid(
                        "InvalidDBName.Duplicate",
                        format!("database {new:?} already exists in instance {instance_id}; choose another newname"),
                    ));
                }
                continue;
            }
            let into = d.newname.as_deref().unwrap_or(&d.name);
            if !databases.iter().any(|x| x == into) {
                return Err(invalid(
                    "InvalidDBName.NotFound",
                    format!("tables are restored into an existing database, and {into:?} does not exist in instance {instance_id}"),
                ));
            }
            for t in &d.tables {
                let (schema, _) = split_table(&t.name);
                let exists = original.psql(
                    &psql,
                    into,
                    &format!(
                        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {}",
                        lit(&schema),
                        lit(&t.newname)
                    ),
                )?;
                if exists.trim() != "0" {
                    return Err(invalid(
                        "InvalidTableName.Duplicate",
                        format!("{schema}.{} already exists in database {into:?}; choose another newname", t.newname),
                    ));
                }
            }
        }
        let mut job = self
            .engine
            .catalog
            .create_job("restore-table", Some(instance_id))?;
        job.detail = specs
            .iter()
            .map(|d| {
                if d.tables.is_empty() {
                    format!(
                        "database {} as {}",
                        d.name,
                        d.newname.as_deref().unwrap_or_default()
                    )
                } else {
                    let tables: Vec<String> = d
                        .tables
                        .iter()
                        .map(|t| format!("{} as {}", t.name, t.newname))
                        .collect();
                    format!(
                        "{} in {}",
                        tables.join(", "),
                        d.newname.as_deref().unwrap_or(&d.name)
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        job.backup_id = src.backup_id.clone();
        self.engine.catalog.update_job(&job)?;
        let job_id = job.id;
        let svc = Arc::clone(self);
        let id = instance_id.to_string();
        tokio::task::spawn_blocking(move || {
            let outcome = svc.start_scratch(&id, &src, job_id).and_then(|scratch| {
                let r = svc.copy_objects(&scratch, &original, &psql, &specs, job_id);
                scratch.remove();
                r
            });
            match outcome {
                Ok(()) => {
                    finish_job(&svc.engine, job_id, None);
                    tracing::info!(instance = %id, job = job_id, "databases and tables restored");
                }
                Err(e) => {
                    tracing::warn!(instance = %id, job = job_id, "restore of databases/tables failed: {e}");
                    fail_job(&svc.engine, job_id, &e.to_string());
                }
            }
        });
        Ok(job_id)
    }

    fn copy_objects(
        &self,
        scratch: &Scratch,
        original: &Original,
        psql: &std::path::Path,
        specs: &[DbSpec],
        job_id: i64,
    ) -> ServiceResult<()> {
        let pg_dump = self.engine.client_tool("pg_dump", scratch.major)?;
        let pg_restore = self.engine.client_tool("pg_restore", scratch.major)?;
        let in_backup: Vec<String> = scratch
            .psql("postgres", "SELECT datname FROM pg_database")?
            .lines()
            .map(str::to_string)
            .collect();
        for (i, d) in specs.iter().enumerate() {
            if !in_backup.contains(&d.name) {
                return Err(invalid(
                    "InvalidDBName.NotFound",
                    format!(
                        "database {:?} does not exist at the chosen restore point",
                        d.name
                    ),
                ));
            }
            if let Ok(mut job) = self.engine.catalog.get_job(job_id) {
                job.state = JobState::Uploading;
                job.progress = (90 + i * 9 / specs.len()).min(99) as u8;
                let _ = self.engine.catalog.update_job(&job);
            }
            let mut dump = Command::new(&pg_dump);
            dump.args(scratch.conn_args()).args(["-Fc", "-d", &d.name]);
            let target_db;
            if d.tables.is_empty() {
                target_db = d.newname.clone().unwrap_or_default();
                original.psql(
                    psql,
                    "postgres",
                    &format!("CREATE DATABASE {} TEMPLATE template0", ident(&target_db)),
                )?;
            } else {
                target_db = d.newname.clone().unwrap_or_else(|| d.name.clone());
                for t in &d.tables {
                    let (schema, table) = split_table(&t.name);
                    rename_on_scratch(scratch, &d.name, &schema, &table, &t.newname)?;
                    dump.arg("-t")
                        .arg(format!("{}.{}", ident(&schema), ident(&t.newname)));
                }
            }
            let copied = pipe(dump, {
                let mut r = original.command(&pg_restore, &target_db);
                r.args(["--exit-on-error", "--no-owner"]);
                r
            });
            if let Err(e) = copied {
                if d.tables.is_empty() {
                    // Nothing of the original was touched; drop the half copy.
                    let _ = original.psql(
                        psql,
                        "postgres",
                        &format!("DROP DATABASE IF EXISTS {}", ident(&target_db)),
                    );
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Renames a table on the scratch copy, with its indexes and owned
/// sequences, so the dump creates objects whose names are free in the
/// original.
fn rename_on_scratch(
    scratch: &Scratch,
    db: &str,
    schema: &str,
    table: &str,
    newname: &str,
) -> ServiceResult<()> {
    let qualified = format!("{}.{}", ident(schema), ident(table));
    let found = scratch.psql(
        db,
        &format!(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p')",
            lit(schema),
            lit(table)
        ),
    )?;
    if found.trim() != "1" {
        return Err(invalid(
            "InvalidTableName.NotFound",
            format!("table {schema}.{table} does not exist in database {db:?} at the chosen restore point"),
        ));
    }
    let dependents = scratch.psql(
        db,
        &format!(
            "SELECT c.relkind, c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE i.indrelid = '{q}'::regclass \
             UNION ALL \
             SELECT s.relkind, s.relname FROM pg_class s JOIN pg_depend d ON d.objid = s.oid \
               WHERE d.refobjid = '{q}'::regclass AND s.relkind = 'S' AND d.deptype IN ('a', 'i')",
            q = qualified.replace('\'', "''")
        ),
    )?;
    let mut sql = format!("ALTER TABLE {qualified} RENAME TO {};", ident(newname));
    for line in dependents.lines() {
        let Some((kind, name)) = line.split_once('|') else {
            continue;
        };
        let renamed = match name.strip_prefix(table) {
            Some(rest) => format!("{newname}{rest}"),
            None => format!("{newname}_{name}"),
        };
        let what = if kind == "S" { "SEQUENCE" } else { "INDEX" };
        sql.push_str(&format!(
            " ALTER {what} {}.{} RENAME TO {};",
            ident(schema),
            ident(name),
            ident(&renamed)
        ));
    }
    scratch.psql(db, &sql)?;
    Ok(())
}

/// Runs `producer | consumer`; fails with the stderr of whichever failed.
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
    let c = consumer
        .stdin(stdout)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(EngineError::io("running pg_restore"))?;
    let c_out = c
        .wait_with_output()
        .map_err(EngineError::io("waiting for pg_restore"))?;
    let p_out = p
        .wait_with_output()
        .map_err(EngineError::io("waiting for pg_dump"))?;
    if !p_out.status.success() {
        return Err(EngineError::Failed(format!(
            "pg_dump: {}",
            String::from_utf8_lossy(&p_out.stderr).trim()
        ))
        .into());
    }
    if !c_out.status.success() {
        return Err(EngineError::Failed(format!(
            "pg_restore: {}",
            String::from_utf8_lossy(&c_out.stderr).trim()
        ))
        .into());
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
            r#"[{"type":"db","name":"app","tables":[{"type":"table","name":"t","newname":"s.t2"}]}]"#,
        ] {
            assert_eq!(
                parse_table_meta(bad).unwrap_err().code,
                "InvalidTableMeta.Malformed",
                "{bad}"
            );
        }
        assert_eq!(split_table("t"), ("public".into(), "t".into()));
        assert_eq!(split_table("s.t"), ("s".into(), "t".into()));
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(lit("o'k"), "'o''k'");
    }
}
