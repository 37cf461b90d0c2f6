//! The embedded SQLite catalog. WAL journal mode and a busy timeout let the
//! CLI and a running server share one file safely. SQLite's errors stay in
//! this file: [`From<rusqlite::Error>`] sorts them into the backend-neutral
//! [`CatalogError`] variants.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use pg_wal::{Lsn, TimelineId};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::lease::{lease_expired_reason, LeaseState};
use crate::*;

/// Classifies what SQLite reported: busy/locked is retryable, a unique or
/// primary-key violation is a conflict, a damaged file or a stored value of
/// the wrong type is corruption; the SQLite error stays the source.
impl From<rusqlite::Error> for CatalogError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi;
        use rusqlite::Error as E;
        match &e {
            E::QueryReturnedNoRows => CatalogError::NotFound(e.to_string()),
            E::SqliteFailure(f, _) => match f.code {
                ffi::ErrorCode::DatabaseBusy | ffi::ErrorCode::DatabaseLocked => {
                    CatalogError::Busy(Box::new(e))
                }
                ffi::ErrorCode::ConstraintViolation
                    if matches!(
                        f.extended_code,
                        ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    ) =>
                {
                    CatalogError::Conflict(Box::new(e))
                }
                ffi::ErrorCode::DatabaseCorrupt | ffi::ErrorCode::NotADatabase => {
                    CatalogError::Corrupt(Box::new(e))
                }
                _ => CatalogError::Backend(Box::new(e)),
            },
            E::FromSqlConversionFailure(..)
            | E::IntegralValueOutOfRange(..)
            | E::InvalidColumnType(..)
            | E::Utf8Error(..) => CatalogError::Corrupt(Box::new(e)),
            _ => CatalogError::Backend(Box::new(e)),
        }
    }
}

/// The SQLite catalog: one file, shared by every process of a data
/// directory. Opening it applies the migrations it lacks.
pub struct SqliteCatalog {
    conn: Mutex<Connection>,
    owner: LeaseOwner,
    lease: LeaseState,
}

impl SqliteCatalog {
    /// Opens (creating when absent) and upgrades the catalog file at `path`.
    pub fn open(path: &Path) -> CatalogResult<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A private catalog in memory, for tests and one-off tools.
    pub fn open_in_memory() -> CatalogResult<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> CatalogResult<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let supported = MIGRATIONS.last().map_or(0, |m| m.version);
        if version > supported {
            return Err(CatalogError::NewerSchema {
                found: version,
                supported,
            });
        }
        for step in MIGRATIONS.iter().filter(|m| m.version > version) {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if current >= step.version {
                continue; // another process migrated meanwhile
            }
            tx.execute_batch(step.sqlite)?;
            tx.pragma_update(None, "user_version", step.version)?;
            tx.commit()?;
        }
        Ok(SqliteCatalog {
            conn: Mutex::new(conn),
            owner: LeaseOwner::random(),
            lease: LeaseState::new(),
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> CatalogResult<T>,
    ) -> CatalogResult<T> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let answer = f(&conn);
        self.lease.note(&answer);
        answer
    }
}

/// A write transaction taken at once (`BEGIN IMMEDIATE`): what it reads
/// cannot change before it writes. Dropped without commit, it rolls back.
fn immediate(c: &Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn parse_ts(s: String) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
}

fn opt_ts(s: Option<String>) -> rusqlite::Result<Option<DateTime<Utc>>> {
    s.map(parse_ts).transpose()
}

fn lsn_to_sql(l: Lsn) -> i64 {
    l.0 as i64
}

fn lsn_from_sql(v: i64) -> Lsn {
    Lsn(v as u64)
}

fn instance_from_row(r: &Row) -> rusqlite::Result<Instance> {
    Ok(Instance {
        id: r.get::<_, String>(0)?.into(),
        host: r.get(1)?,
        port: r.get(2)?,
        user: r.get(3)?,
        password_env: r.get(4)?,
        dbname: r.get(5)?,
        sslmode: parsed(r, 6)?,
        sslrootcert: r.get(7)?,
        system_identifier: r.get::<_, Option<String>>(8)?.and_then(|s| s.parse().ok()),
        pg_version_num: r.get(9)?,
        wal_segment_size: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        created_at: parse_ts(r.get(11)?)?,
        password: r.get(12)?,
        agent_url: r.get(13)?,
        agent_key: r.get(14)?,
        agent_ca: r.get(15)?,
    })
}

const INSTANCE_COLS: &str = "id, host, port, user_name, password_env, dbname, sslmode, sslrootcert, system_identifier, pg_version_num, wal_segment_size, created_at, password, agent_url, agent_key, agent_ca";

/// A text column parsed into its type; a value this build does not know is
/// a conversion error that names it.
fn parsed<T>(r: &Row, i: usize) -> rusqlite::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = r.get(i)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn backup_from_row(r: &Row) -> rusqlite::Result<BackupSet> {
    let status: String = r.get(2)?;
    Ok(BackupSet {
        id: r.get::<_, String>(0)?.into(),
        instance_id: r.get::<_, String>(1)?.into(),
        status: BackupStatus::parse(&status).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
        })?,
        mode: parsed(r, 3)?,
        started_at: parse_ts(r.get(4)?)?,
        finished_at: opt_ts(r.get(5)?)?,
        start_lsn: r.get::<_, Option<i64>>(6)?.map(lsn_from_sql),
        stop_lsn: r.get::<_, Option<i64>>(7)?.map(lsn_from_sql),
        start_timeline: r.get::<_, Option<u32>>(8)?.map(TimelineId),
        stop_timeline: r.get::<_, Option<u32>>(9)?.map(TimelineId),
        pg_version_num: r.get(10)?,
        total_bytes: r.get::<_, i64>(11)? as u64,
        new_bytes: r.get::<_, i64>(12)? as u64,
        dedup_bytes: r.get::<_, i64>(13)? as u64,
        stored_bytes: r.get::<_, i64>(14)? as u64,
        file_count: r.get::<_, i64>(15)? as u64,
        error: r.get(16)?,
        job_id: r.get::<_, Option<i64>>(17)?.map(JobId::new),
        method: parsed(r, 18)?,
        snapshot_local: r.get(19)?,
        snapshot_uploaded: r.get(20)?,
        snapshot_bytes: r.get::<_, Option<i64>>(21)?.map(|v| v as u64),
        keep_until: keep_from_sql(r.get(22)?, opt_ts(r.get(23)?)?),
        keep_note: r.get(24)?,
        taken_under: taken_from_sql(r.get(25)?, r.get(26)?),
        snapshot_fingerprint: r.get(27)?,
    })
}

const BACKUP_COLS: &str = "id, instance_id, status, mode, started_at, finished_at, start_lsn, stop_lsn, start_timeline, stop_timeline, pg_version_num, total_bytes, new_bytes, dedup_bytes, stored_bytes, file_count, error, job_id, method, snapshot_local, snapshot_uploaded, snapshot_bytes, kept, keep_until, keep_note, taken_rule, taken_retention_days, snapshot_fingerprint";

const POLICY_COLS: &str = "instance_id, backup_days, backup_window, backup_retention_days, log_backup_enabled, log_retention_days, updated_at, last_auto_slot, backup_method, backup_interval_minutes, advanced_enabled, advanced_data_rules, advanced_log_retention_days, archive_retention_days, archive_keep_policy, archive_keep_count, keep_last";

fn wal_from_row(r: &Row) -> rusqlite::Result<WalSegmentRow> {
    Ok(WalSegmentRow {
        instance_id: r.get::<_, String>(0)?.into(),
        timeline: TimelineId(r.get(1)?),
        segment: r.get(2)?,
        partial: r.get(3)?,
        begin_lsn: lsn_from_sql(r.get(4)?),
        end_lsn: lsn_from_sql(r.get(5)?),
        size: r.get::<_, i64>(6)? as u64,
        checksum: r.get(7)?,
        first_commit: opt_ts(r.get(8)?)?,
        last_commit: opt_ts(r.get(9)?)?,
        commit_count: r.get::<_, i64>(10)? as u64,
        min_commit_xid: r.get(11)?,
        max_commit_xid: r.get(12)?,
        object_key: r.get(13)?,
        stored_at: parse_ts(r.get(14)?)?,
    })
}

const WAL_COLS: &str = "instance_id, timeline, segment, partial, begin_lsn, end_lsn, size, checksum, first_commit, last_commit, commit_count, min_commit_xid, max_commit_xid, object_key, stored_at";

fn job_from_row(r: &Row) -> rusqlite::Result<Job> {
    let state: String = r.get(3)?;
    let started_at = parse_ts(r.get(7)?)?;
    Ok(Job {
        id: JobId::new(r.get(0)?),
        kind: parsed(r, 1)?,
        instance_id: r.get::<_, Option<String>>(2)?.map(Into::into),
        state: JobState::parse(&state).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e))
        })?,
        progress: r.get(4)?,
        detail: r.get(5)?,
        backup_id: r.get::<_, Option<String>>(6)?.map(Into::into),
        finished_at: opt_ts(r.get(8)?)?,
        error: r.get(9)?,
        pid: r.get(10)?,
        // Rows from before leases existed belong to no live owner.
        owner: LeaseOwner::from_stored(r.get::<_, Option<String>>(11)?.unwrap_or_default()),
        heartbeat_at: match r.get::<_, Option<String>>(12)? {
            Some(t) => parse_ts(t)?,
            None => started_at,
        },
        queued: r.get(13)?,
        node_id: r.get(14)?,
        lease_ms: r.get(15)?,
        started_at,
    })
}

const JOB_COLS: &str = "id, kind, instance_id, state, progress, detail, backup_id, started_at, finished_at, error, pid, owner, heartbeat_at, queued, node_id, lease_ms";

const MANAGED_COLS: &str = "instance_id, source_instance, backup_id, restore_time, data_dir, port, pg_major, status, error, created_at, agent_clone";

fn managed_from_row(r: &Row) -> rusqlite::Result<ManagedInstance> {
    Ok(ManagedInstance {
        instance_id: r.get::<_, String>(0)?.into(),
        source_instance: r.get::<_, String>(1)?.into(),
        backup_id: r.get::<_, Option<String>>(2)?.map(Into::into),
        restore_time: opt_ts(r.get(3)?)?,
        data_dir: r.get(4)?,
        port: r.get(5)?,
        pg_major: r.get(6)?,
        status: r.get(7)?,
        error: r.get(8)?,
        created_at: parse_ts(r.get(9)?)?,
        agent_clone: r.get(10)?,
    })
}

const CROSS_POLICY_COLS: &str = "instance_id, region, backup_enabled, log_backup_enabled, retention_days, backup_enabled_at, log_backup_enabled_at, updated_at";

fn cross_policy_from_row(r: &Row) -> rusqlite::Result<CrossBackupPolicy> {
    Ok(CrossBackupPolicy {
        instance_id: r.get::<_, String>(0)?.into(),
        region: r.get(1)?,
        backup_enabled: r.get(2)?,
        log_backup_enabled: r.get(3)?,
        retention_days: r.get(4)?,
        backup_enabled_at: opt_ts(r.get(5)?)?,
        log_backup_enabled_at: opt_ts(r.get(6)?)?,
        updated_at: parse_ts(r.get(7)?)?,
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> CatalogResult<String> {
    serde_json::to_string(v).map_err(|e| CatalogError::Invalid(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> CatalogResult<T> {
    serde_json::from_str(text).map_err(|e| CatalogError::Invalid(e.to_string()))
}

const DRILL_COLS: &str = "backup_id, instance_id, status, detail, started_at, finished_at, job_id";

fn drill_from_row(r: &Row) -> rusqlite::Result<DrillResult> {
    Ok(DrillResult {
        backup_id: r.get::<_, String>(0)?.into(),
        instance_id: r.get::<_, String>(1)?.into(),
        status: r.get(2)?,
        detail: r.get(3)?,
        started_at: parse_ts(r.get(4)?)?,
        finished_at: opt_ts(r.get(5)?)?,
        job_id: r.get::<_, Option<i64>>(6)?.map(JobId::new),
    })
}

const SAMPLE_COLS: &str =
    "instance_id, sampled_at, logical_bytes, data_bytes, wal_bytes, quota_bytes, cross_region_bytes";

fn sample_from_row(r: &Row) -> rusqlite::Result<UsageSample> {
    Ok(UsageSample {
        instance_id: r.get::<_, String>(0)?.into(),
        at: parse_ts(r.get(1)?)?,
        logical_bytes: r.get::<_, i64>(2)? as u64,
        data_bytes: r.get::<_, i64>(3)? as u64,
        wal_bytes: r.get::<_, i64>(4)? as u64,
        quota_bytes: r.get::<_, i64>(5)? as u64,
        cross_region_bytes: r.get::<_, Option<i64>>(6)?.map(|n| n as u64),
    })
}

fn key_from_row(r: &Row) -> rusqlite::Result<AccessKey> {
    Ok(AccessKey {
        id: r.get(0)?,
        secret: r.get(1)?,
        read_only: r.get(2)?,
        description: r.get(3)?,
        created_at: parse_ts(r.get(4)?)?,
    })
}

/// [`CatalogError::BackupRunning`] when `b` is `Running` and another set of
/// its instance is too (the unique index would refuse it; `INSERT OR
/// REPLACE` would delete the other row instead).
fn refuse_second_running(c: &Connection, b: &BackupSet) -> CatalogResult<()> {
    if b.status != BackupStatus::Running {
        return Ok(());
    }
    let running: Option<String> = c
        .query_row(
            "SELECT id FROM backup_sets WHERE instance_id = ?1 AND status = 'Running' AND id <> ?2",
            [b.instance_id.as_str(), b.id.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    match running {
        Some(running) => Err(CatalogError::BackupRunning {
            instance_id: b.instance_id.to_string(),
            running,
        }),
        None => Ok(()),
    }
}

/// Writes a backup set row with `verb` (`INSERT` / `INSERT OR REPLACE`);
/// returns the rows changed.
fn write_backup(c: &Connection, b: &BackupSet, verb: &str) -> CatalogResult<usize> {
    Ok(c.execute(
                &format!("{verb} INTO backup_sets ({BACKUP_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23,?24,?25,?26,?27,?28)"),
                params![
                    b.id.as_str(), b.instance_id.as_str(), b.status.as_str(), b.mode.as_str(), ts(&b.started_at),
                    b.finished_at.as_ref().map(ts), b.start_lsn.map(lsn_to_sql), b.stop_lsn.map(lsn_to_sql),
                    b.start_timeline.map(|t| t.0), b.stop_timeline.map(|t| t.0), b.pg_version_num,
                    b.total_bytes as i64, b.new_bytes as i64, b.dedup_bytes as i64, b.stored_bytes as i64,
                    b.file_count as i64, b.error, b.job_id.map(JobId::get), b.method.as_str(),
                    b.snapshot_local, b.snapshot_uploaded, b.snapshot_bytes.map(|v| v as i64),
                    b.keep_until.is_some(), keep_until_sql(b.keep_until).as_ref().map(ts), b.keep_note,
                    b.taken_under.as_ref().map(|t| t.rule.as_str()), b.taken_under.as_ref().map(|t| t.retention_days),
                    b.snapshot_fingerprint
                ],
            )?)
}

impl InstanceCatalog for SqliteCatalog {
    fn add_instance(&self, i: &Instance) -> CatalogResult<()> {
        self.with(|c| {
            let n = c.execute(
                &format!("INSERT OR IGNORE INTO instances ({INSTANCE_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)"),
                params![
                    i.id.as_str(), i.host, i.port, i.user, i.password_env, i.dbname, i.sslmode.as_str(), i.sslrootcert,
                    i.system_identifier.map(|v| v.to_string()), i.pg_version_num,
                    i.wal_segment_size.map(|v| v as i64), ts(&i.created_at), i.password,
                    i.agent_url, i.agent_key, i.agent_ca
                ],
            )?;
            if n == 0 {
                return Err(CatalogError::InstanceExists(i.id.to_string()));
            }
            Ok(())
        })
    }

    fn update_instance(&self, i: &Instance) -> CatalogResult<()> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE instances SET host=?2, port=?3, user_name=?4, password_env=?5, dbname=?6, sslmode=?7, sslrootcert=?8, system_identifier=?9, pg_version_num=?10, wal_segment_size=?11, password=?12, agent_url=?13, agent_key=?14, agent_ca=?15 WHERE id=?1",
                params![
                    i.id.as_str(), i.host, i.port, i.user, i.password_env, i.dbname, i.sslmode.as_str(), i.sslrootcert,
                    i.system_identifier.map(|v| v.to_string()), i.pg_version_num,
                    i.wal_segment_size.map(|v| v as i64), i.password,
                    i.agent_url, i.agent_key, i.agent_ca
                ],
            )?;
            if n == 0 {
                return Err(CatalogError::InstanceNotFound(i.id.to_string()));
            }
            Ok(())
        })
    }

    fn get_instance(&self, id: &str) -> CatalogResult<Instance> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1"),
                [id],
                instance_from_row,
            )
            .optional()?
            .ok_or_else(|| CatalogError::InstanceNotFound(id.to_string()))
        })
    }

    fn list_instances(&self) -> CatalogResult<Vec<Instance>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {INSTANCE_COLS} FROM instances ORDER BY id"
            ))?;
            let rows = st.query_map([], instance_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn delete_instance(&self, id: &str) -> CatalogResult<()> {
        self.with(|c| {
            let tx = immediate(c)?;
            if tx.execute("DELETE FROM instances WHERE id = ?1", [id])? == 0 {
                return Err(CatalogError::InstanceNotFound(id.to_string()));
            }
            tx.execute("DELETE FROM backup_policies WHERE instance_id = ?1", [id])?;
            tx.execute("DELETE FROM instance_owners WHERE instance_id = ?1", [id])?;
            tx.execute("DELETE FROM wal_receivers WHERE instance_id = ?1", [id])?;
            tx.execute("DELETE FROM relation_names WHERE instance_id = ?1", [id])?;
            tx.execute("DELETE FROM database_names WHERE instance_id = ?1", [id])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn put_managed(&self, m: &ManagedInstance) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO managed_instances ({MANAGED_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)"),
                params![
                    m.instance_id.as_str(), m.source_instance.as_str(), m.backup_id.as_deref(), m.restore_time.as_ref().map(ts),
                    m.data_dir, m.port, m.pg_major, m.status, m.error, ts(&m.created_at), m.agent_clone
                ],
            )?;
            Ok(())
        })
    }

    fn get_managed(&self, instance_id: &str) -> CatalogResult<Option<ManagedInstance>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {MANAGED_COLS} FROM managed_instances WHERE instance_id = ?1"),
                [instance_id],
                managed_from_row,
            )
            .optional()?)
        })
    }

    fn list_managed(&self) -> CatalogResult<Vec<ManagedInstance>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {MANAGED_COLS} FROM managed_instances ORDER BY created_at, instance_id"
            ))?;
            let rows = st.query_map([], managed_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn delete_managed(&self, instance_id: &str) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM managed_instances WHERE instance_id = ?1",
                [instance_id],
            )?;
            Ok(())
        })
    }
}

impl BackupCatalog for SqliteCatalog {
    fn insert_backup(&self, b: &BackupSet) -> CatalogResult<()> {
        self.with(|c| {
            // One write transaction from the checks to the insert: of two
            // handles starting a backup of one instance, one finds the
            // other's set.
            let tx = immediate(c)?;
            let taken = tx
                .query_row(
                    "SELECT 1 FROM backup_sets WHERE id = ?1",
                    [b.id.as_str()],
                    |_| Ok(()),
                )
                .optional()?;
            if taken.is_some() {
                return Err(CatalogError::BackupExists(b.id.to_string()));
            }
            refuse_second_running(&tx, b)?;
            write_backup(&tx, b, "INSERT")?;
            tx.commit()?;
            Ok(())
        })
    }

    fn update_backup(&self, b: &BackupSet) -> CatalogResult<()> {
        self.with(|c| {
            // The checks and the write are one transaction: a takeover
            // cannot land between them.
            let tx = immediate(c)?;
            let existing = tx
                .query_row(
                    &format!("SELECT {BACKUP_COLS} FROM backup_sets WHERE id = ?1"),
                    [b.id.as_str()],
                    backup_from_row,
                )
                .optional()?
                .ok_or_else(|| CatalogError::BackupNotFound(b.id.to_string()))?;
            if existing.instance_id != b.instance_id {
                return Err(CatalogError::Invalid(format!(
                    "backup set {} belongs to instance {}, not {}",
                    b.id, existing.instance_id, b.instance_id
                )));
            }
            // A set failed by a takeover stays failed: its old owner may
            // still be running after a pause longer than its lease.
            if existing.status == BackupStatus::Failed && b.status != BackupStatus::Failed {
                if let Some(job_id) = existing.job_id {
                    let job = tx
                        .query_row(
                            &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                            [job_id.get()],
                            job_from_row,
                        )
                        .optional()?
                        .ok_or(CatalogError::JobNotFound(job_id))?;
                    if job.state.is_terminal() && job.owner.as_str() != self.owner.as_str() {
                        return Err(CatalogError::LeaseLost(job_id));
                    }
                }
            }
            refuse_second_running(&tx, b)?;
            write_backup(&tx, b, "INSERT OR REPLACE")?;
            tx.commit()?;
            Ok(())
        })
    }

    fn get_backup(&self, id: &str) -> CatalogResult<BackupSet> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {BACKUP_COLS} FROM backup_sets WHERE id = ?1"),
                [id],
                backup_from_row,
            )
            .optional()?
            .ok_or_else(|| CatalogError::BackupNotFound(id.to_string()))
        })
    }

    fn list_backups(&self, instance_id: &str) -> CatalogResult<Vec<BackupSet>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {BACKUP_COLS} FROM backup_sets WHERE instance_id = ?1 ORDER BY started_at, id"
            ))?;
            let rows = st.query_map([instance_id], backup_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn list_detached_backups(&self) -> CatalogResult<Vec<BackupSet>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {BACKUP_COLS} FROM backup_sets WHERE instance_id NOT IN (SELECT id FROM instances) ORDER BY started_at, id"
            ))?;
            let rows = st.query_map([], backup_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn delete_backup(&self, id: &str) -> CatalogResult<()> {
        self.with(|c| {
            let tx = immediate(c)?;
            if tx.execute("DELETE FROM backup_sets WHERE id = ?1", [id])? == 0 {
                return Err(CatalogError::BackupNotFound(id.to_string()));
            }
            tx.execute("DELETE FROM backup_drills WHERE backup_id = ?1", [id])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn put_drill(&self, d: &DrillResult) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO backup_drills ({DRILL_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7)"),
                params![
                    d.backup_id.as_str(), d.instance_id.as_str(), d.status, d.detail, ts(&d.started_at),
                    d.finished_at.as_ref().map(ts), d.job_id.map(JobId::get)
                ],
            )?;
            Ok(())
        })
    }

    fn get_drill(&self, backup_id: &str) -> CatalogResult<Option<DrillResult>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {DRILL_COLS} FROM backup_drills WHERE backup_id = ?1"),
                [backup_id],
                drill_from_row,
            )
            .optional()?)
        })
    }

    fn list_drills(&self, instance_id: &str) -> CatalogResult<Vec<DrillResult>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {DRILL_COLS} FROM backup_drills WHERE instance_id = ?1 ORDER BY started_at"
            ))?;
            let rows = st.query_map([instance_id], drill_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

impl WalCatalog for SqliteCatalog {
    fn upsert_wal_segment(&self, w: &WalSegmentRow) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO wal_segments ({WAL_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)"),
                params![
                    w.instance_id.as_str(), w.timeline.0, w.segment, w.partial, lsn_to_sql(w.begin_lsn),
                    lsn_to_sql(w.end_lsn), w.size as i64, w.checksum, w.first_commit.as_ref().map(ts),
                    w.last_commit.as_ref().map(ts), w.commit_count as i64, w.min_commit_xid,
                    w.max_commit_xid, w.object_key, ts(&w.stored_at)
                ],
            )?;
            Ok(())
        })
    }

    fn delete_wal_segment(
        &self,
        instance_id: &str,
        timeline: TimelineId,
        segment: &str,
        partial: bool,
    ) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM wal_segments WHERE instance_id=?1 AND timeline=?2 AND segment=?3 AND partial=?4",
                params![instance_id, timeline.0, segment, partial],
            )?;
            Ok(())
        })
    }

    fn find_wal_segment(
        &self,
        instance_id: &str,
        timeline: TimelineId,
        segment: &str,
    ) -> CatalogResult<Vec<WalSegmentRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {WAL_COLS} FROM wal_segments WHERE instance_id = ?1 AND timeline = ?2 AND segment = ?3"
            ))?;
            let rows = st.query_map(params![instance_id, timeline.0, segment], wal_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn list_wal_segments(&self, instance_id: &str) -> CatalogResult<Vec<WalSegmentRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {WAL_COLS} FROM wal_segments WHERE instance_id = ?1 ORDER BY timeline, segment, partial"
            ))?;
            let rows = st.query_map([instance_id], wal_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn upsert_restore_point(&self, r: &RestorePointRow) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO restore_points (instance_id, timeline, name, lsn, time) VALUES (?1,?2,?3,?4,?5)",
                params![r.instance_id.as_str(), r.timeline.0, r.name, lsn_to_sql(r.lsn), ts(&r.time)],
            )?;
            Ok(())
        })
    }

    fn list_restore_points(&self, instance_id: &str) -> CatalogResult<Vec<RestorePointRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT instance_id, timeline, name, lsn, time FROM restore_points WHERE instance_id = ?1 ORDER BY lsn",
            )?;
            let rows = st.query_map([instance_id], |r| {
                Ok(RestorePointRow {
                    instance_id: r.get::<_, String>(0)?.into(),
                    timeline: TimelineId(r.get(1)?),
                    name: r.get(2)?,
                    lsn: lsn_from_sql(r.get(3)?),
                    time: parse_ts(r.get(4)?)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn upsert_recovery_event(&self, e: &RecoveryEventRow) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO recovery_events ({EVENT_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)"),
                params![
                    e.instance_id.as_str(), e.timeline.0, lsn_to_sql(e.lsn), e.seq, lsn_to_sql(e.end_lsn),
                    e.kind, e.xid, ts(&e.time), e.db_oid, e.relfilenode, e.rel_oid, e.database, e.schema, e.table,
                    e.rows.map(|r| r as i64), files_to_text(&e.filled), e.before_lsn.map(lsn_to_sql)
                ],
            )?;
            Ok(())
        })
    }

    fn list_recovery_events(
        &self,
        instance_id: &str,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> CatalogResult<Vec<RecoveryEventRow>> {
        let rows: Vec<RecoveryEventRow> = self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {EVENT_COLS} FROM recovery_events WHERE instance_id = ?1 ORDER BY timeline, lsn, seq"
            ))?;
            let rows = st.query_map([instance_id], |r| {
                Ok(RecoveryEventRow {
                    instance_id: r.get::<_, String>(0)?.into(),
                    timeline: TimelineId(r.get(1)?),
                    lsn: lsn_from_sql(r.get(2)?),
                    seq: r.get(3)?,
                    end_lsn: lsn_from_sql(r.get(4)?),
                    kind: r.get(5)?,
                    xid: r.get(6)?,
                    time: parse_ts(r.get(7)?)?,
                    db_oid: r.get(8)?,
                    relfilenode: r.get(9)?,
                    rel_oid: r.get(10)?,
                    database: r.get(11)?,
                    schema: r.get(12)?,
                    table: r.get(13)?,
                    rows: r.get::<_, Option<i64>>(14)?.map(|v| v.max(0) as u64),
                    filled: r.get::<_, String>(15)?.split(',').filter_map(|s| s.parse().ok()).collect(),
                    before_lsn: r.get::<_, Option<i64>>(16)?.map(lsn_from_sql),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        // Times are text here; compared as times, not as strings.
        Ok(rows
            .into_iter()
            .filter(|e| since.is_none_or(|s| e.time >= s) && until.is_none_or(|u| e.time <= u))
            .collect())
    }

    fn upsert_names(
        &self,
        relations: &[RelationNameRow],
        databases: &[DatabaseNameRow],
    ) -> CatalogResult<()> {
        self.with(|c| {
            let tx = immediate(c)?;
            for r in relations {
                tx.execute(
                    "INSERT OR REPLACE INTO relation_names (instance_id, db_oid, relfilenode, rel_oid, schema_name, rel_name, rel_kind, seen_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                    params![r.instance_id.as_str(), r.db_oid, r.relfilenode, r.rel_oid, r.schema, r.name, r.kind, ts(&r.seen_at)],
                )?;
            }
            for d in databases {
                tx.execute(
                    "INSERT OR REPLACE INTO database_names (instance_id, db_oid, name, seen_at) VALUES (?1,?2,?3,?4)",
                    params![d.instance_id.as_str(), d.db_oid, d.name, ts(&d.seen_at)],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn list_names(
        &self,
        instance_id: &str,
    ) -> CatalogResult<(Vec<RelationNameRow>, Vec<DatabaseNameRow>)> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT instance_id, db_oid, relfilenode, rel_oid, schema_name, rel_name, rel_kind, seen_at FROM relation_names WHERE instance_id = ?1 ORDER BY db_oid, relfilenode",
            )?;
            let relations = st
                .query_map([instance_id], |r| {
                    Ok(RelationNameRow {
                        instance_id: r.get::<_, String>(0)?.into(),
                        db_oid: r.get(1)?,
                        relfilenode: r.get(2)?,
                        rel_oid: r.get(3)?,
                        schema: r.get(4)?,
                        name: r.get(5)?,
                        kind: r.get(6)?,
                        seen_at: parse_ts(r.get(7)?)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare(
                "SELECT instance_id, db_oid, name, seen_at FROM database_names WHERE instance_id = ?1 ORDER BY db_oid",
            )?;
            let databases = st
                .query_map([instance_id], |r| {
                    Ok(DatabaseNameRow {
                        instance_id: r.get::<_, String>(0)?.into(),
                        db_oid: r.get(1)?,
                        name: r.get(2)?,
                        seen_at: parse_ts(r.get(3)?)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok((relations, databases))
        })
    }
}

const EVENT_COLS: &str = "instance_id, timeline, lsn, seq, end_lsn, kind, xid, time, db_oid, relfilenode, rel_oid, database_name, schema_name, table_name, row_count, filled_files, before_lsn";

impl JobCatalog for SqliteCatalog {
    fn create_job(&self, kind: JobKind, instance_id: Option<&str>) -> CatalogResult<Job> {
        let id = self.with(|c| {
            let now = ts(&Utc::now());
            c.execute(
                "INSERT INTO jobs (kind, instance_id, state, started_at, pid, owner, heartbeat_at, lease_ms) VALUES (?1, ?2, 'NoStart', ?3, ?4, ?5, ?3, ?6)",
                params![kind.as_str(), instance_id, now, std::process::id(), self.owner.as_str(), self.lease.lease_ms()],
            )?;
            Ok(JobId::new(c.last_insert_rowid()))
        })?;
        self.get_job(id)
    }

    fn update_job(&self, j: &Job) -> CatalogResult<()> {
        self.with(|c| {
            let n = c.execute(
                // A job that ended under another owner (taken over when this
                // one stopped renewing its lease) is no longer this one's.
                "UPDATE jobs SET state=?2, progress=?3, detail=?4, backup_id=?5, finished_at=?6, error=?7 \
                 WHERE id=?1 AND (state NOT IN ('Finished', 'Failed') OR owner IS ?8)",
                params![
                    j.id.get(), j.state.as_str(), j.progress, j.detail, j.backup_id.as_deref(),
                    j.finished_at.as_ref().map(ts), j.error, self.owner.as_str()
                ],
            )?;
            if n == 0 {
                let exists: bool = c
                    .query_row("SELECT 1 FROM jobs WHERE id = ?1", [j.id.get()], |_| Ok(()))
                    .optional()?
                    .is_some();
                return Err(if exists {
                    CatalogError::LeaseLost(j.id)
                } else {
                    CatalogError::JobNotFound(j.id)
                });
            }
            Ok(())
        })
    }

    fn get_job(&self, id: JobId) -> CatalogResult<Job> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                [id.get()],
                job_from_row,
            )
            .optional()?
            .ok_or(CatalogError::JobNotFound(id))
        })
    }

    fn list_jobs(&self, instance_id: Option<&str>) -> CatalogResult<Vec<Job>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE ?1 IS NULL OR instance_id = ?1 ORDER BY id"
            ))?;
            let rows = st.query_map([instance_id], job_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn jobs_ended_since(&self, since: DateTime<Utc>) -> CatalogResult<Vec<Job>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE state IN ('Finished', 'Failed') \
                 AND finished_at >= ?1 ORDER BY id"
            ))?;
            let rows = st.query_map([ts(&since)], job_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn prune_jobs(&self, ended_before: DateTime<Utc>, limit: usize) -> CatalogResult<usize> {
        self.with(|c| {
            Ok(c.execute(
                &crate::prune_jobs_sql("?1", "?2"),
                params![ts(&ended_before), i64::try_from(limit).unwrap_or(i64::MAX)],
            )?)
        })
    }

    fn newest_ended_job(&self, instance_id: &str, kind: JobKind) -> CatalogResult<Option<Job>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE instance_id = ?1 AND kind = ?2 \
                     AND state IN ('Finished', 'Failed') AND finished_at IS NOT NULL \
                     ORDER BY finished_at DESC, id DESC LIMIT 1"
                ),
                params![instance_id, kind.as_str()],
                job_from_row,
            )
            .optional()?)
        })
    }

    fn newest_jobs(&self, kind: JobKind, limit: usize) -> CatalogResult<Vec<Job>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE kind = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = st.query_map(params![kind.as_str(), limit], job_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn queue_job(
        &self,
        kind: JobKind,
        instance_id: &str,
        backup_id: Option<&str>,
    ) -> CatalogResult<Job> {
        let id = self.with(|c| {
            c.execute(
                "INSERT INTO jobs (kind, instance_id, state, backup_id, started_at, pid, queued, heartbeat_at) \
                 VALUES (?1, ?2, 'NoStart', ?3, ?4, ?5, 1, ?4)",
                params![kind.as_str(), instance_id, backup_id, ts(&Utc::now()), std::process::id()],
            )?;
            Ok(JobId::new(c.last_insert_rowid()))
        })?;
        self.get_job(id)
    }

    fn queued_jobs(&self) -> CatalogResult<Vec<Job>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {JOB_COLS} FROM jobs WHERE queued = 1 ORDER BY id"
            ))?;
            let rows = st.query_map([], job_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn claim_queued_job(
        &self,
        id: JobId,
        node_id: &str,
        now: DateTime<Utc>,
    ) -> CatalogResult<Option<Job>> {
        self.with(|c| {
            // SQLite has one writer at a time: the conditional update is the
            // look and the claim at once, and a second claimer finds the job
            // no longer queued.
            let n = c.execute(
                "UPDATE jobs SET queued = 0, owner = ?2, node_id = ?3, heartbeat_at = ?4, pid = ?5, lease_ms = ?6 \
                 WHERE id = ?1 AND queued = 1",
                params![id.get(), self.owner.as_str(), node_id, ts(&now), std::process::id(), self.lease.lease_ms()],
            )?;
            if n == 0 {
                return Ok(None);
            }
            Ok(Some(c.query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                [id.get()],
                job_from_row,
            )?))
        })
    }

    fn lease_owner(&self) -> &LeaseOwner {
        &self.owner
    }

    fn set_job_lease(&self, lease: std::time::Duration) {
        self.lease.set_lease(lease);
    }

    fn renew_leases(&self, now: DateTime<Utc>) -> CatalogResult<usize> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE jobs SET heartbeat_at=?2, lease_ms=?3 WHERE owner=?1 AND state NOT IN ('Finished', 'Failed')",
                params![self.owner.as_str(), ts(&now), self.lease.lease_ms()],
            )?)
        })
    }

    fn fail_expired_jobs(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
    ) -> CatalogResult<usize> {
        let since_outage = self.lease.since_unreachable();
        if since_outage.is_some_and(|d| d < lease) {
            return Ok(0);
        }
        self.with(|c| {
            // One write transaction from the look to the takeover: an owner
            // renewing meanwhile waits, then finds its job already failed.
            let tx = immediate(c)?;
            let open: Vec<Job> = {
                let mut st = tx.prepare(&format!(
                    "SELECT {JOB_COLS} FROM jobs WHERE state NOT IN ('Finished', 'Failed') AND owner IS NOT ?1 AND queued = 0"
                ))?;
                let rows = st.query_map([self.owner.as_str()], job_from_row)?;
                rows.collect::<Result<_, _>>()?
            };
            let at = ts(&now);
            let mut failed = 0;
            let expired = |j: &Job| {
                let own = j.lease_ms.map(chrono::Duration::milliseconds).unwrap_or(lease);
                j.heartbeat_at
                    .checked_add_signed(own)
                    .is_some_and(|end| end < now)
                    && since_outage.is_none_or(|d| d > own)
            };
            for job in open.into_iter().filter(expired) {
                let reason = lease_expired_reason(&job);
                // The job changes hands: its old owner can no longer write it.
                tx.execute(
                    "UPDATE jobs SET state='Failed', finished_at=?2, error=?3, owner=?4 WHERE id=?1",
                    params![job.id.get(), at, reason, self.owner.as_str()],
                )?;
                tx.execute(
                    "UPDATE backup_sets SET status='Failed', finished_at=?2, error=?3 WHERE job_id=?1 AND status='Running'",
                    params![job.id.get(), at, reason],
                )?;
                failed += 1;
            }
            tx.commit()?;
            Ok(failed)
        })
    }
}

impl PolicyCatalog for SqliteCatalog {
    fn get_policy(&self, instance_id: &str) -> CatalogResult<Option<BackupPolicy>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {POLICY_COLS} FROM backup_policies WHERE instance_id = ?1"),
                [instance_id],
                |r| {
                    let days: String = r.get(1)?;
                    Ok(BackupPolicy {
                        instance_id: r.get::<_, String>(0)?.into(),
                        backup_days: days
                            .split(',')
                            .filter(|d| !d.is_empty())
                            .map(String::from)
                            .collect(),
                        backup_window: r.get(2)?,
                        backup_retention_days: r.get(3)?,
                        log_backup_enabled: r.get(4)?,
                        log_retention_days: r.get(5)?,
                        updated_at: parse_ts(r.get(6)?)?,
                        last_auto_slot: opt_ts(r.get(7)?)?,
                        backup_method: parsed(r, 8)?,
                        backup_interval_minutes: r.get(9)?,
                        advanced_enabled: r.get(10)?,
                        advanced_data_rules: rules_from_sql(&r.get::<_, String>(11)?).map_err(
                            |e| {
                                rusqlite::Error::FromSqlConversionFailure(
                                    11,
                                    rusqlite::types::Type::Text,
                                    Box::new(e),
                                )
                            },
                        )?,
                        advanced_log_retention_days: r.get(12)?,
                        archive_retention_days: r.get(13)?,
                        archive_keep_policy: parsed(r, 14)?,
                        archive_keep_count: r.get(15)?,
                        keep_last: r.get(16)?,
                    })
                },
            )
            .optional()?)
        })
    }

    fn put_policy(&self, p: &BackupPolicy) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO backup_policies ({POLICY_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)"),
                params![
                    p.instance_id.as_str(), p.backup_days.join(","), p.backup_window, p.backup_retention_days,
                    p.log_backup_enabled, p.log_retention_days, ts(&p.updated_at),
                    p.last_auto_slot.as_ref().map(ts), p.backup_method.as_str(),
                    p.backup_interval_minutes, p.advanced_enabled, rules_to_sql(&p.advanced_data_rules)?,
                    p.advanced_log_retention_days, p.archive_retention_days, p.archive_keep_policy.as_str(),
                    p.archive_keep_count, p.keep_last
                ],
            )?;
            Ok(())
        })
    }

    fn get_cross_policy(&self, instance_id: &str) -> CatalogResult<Option<CrossBackupPolicy>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!(
                    "SELECT {CROSS_POLICY_COLS} FROM cross_backup_policies WHERE instance_id = ?1"
                ),
                [instance_id],
                cross_policy_from_row,
            )
            .optional()?)
        })
    }

    fn put_cross_policy(&self, p: &CrossBackupPolicy) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO cross_backup_policies ({CROSS_POLICY_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)"),
                params![
                    p.instance_id.as_str(), p.region, p.backup_enabled, p.log_backup_enabled, p.retention_days,
                    p.backup_enabled_at.as_ref().map(ts), p.log_backup_enabled_at.as_ref().map(ts),
                    ts(&p.updated_at)
                ],
            )?;
            Ok(())
        })
    }
}

impl CrossRegionCatalog for SqliteCatalog {
    fn insert_cross_backup(
        &self,
        region: &str,
        set: &BackupSet,
        copied_bytes: u64,
        copied_at: DateTime<Utc>,
    ) -> CatalogResult<i64> {
        let json = to_json(set)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO cross_backups (region, instance_id, backup_id, backup_set, copied_bytes, copied_at) VALUES (?1,?2,?3,?4,?5,?6)",
                params![region, set.instance_id.as_str(), set.id.as_str(), json, copied_bytes as i64, ts(&copied_at)],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    fn list_cross_backups(&self, instance_id: &str) -> CatalogResult<Vec<CrossBackup>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, region, backup_set, copied_bytes, copied_at FROM cross_backups WHERE instance_id = ?1 ORDER BY backup_id, id",
            )?;
            let rows = st.query_map([instance_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, region, json, copied_bytes, copied_at) = row?;
                out.push(CrossBackup {
                    id,
                    region,
                    set: from_json(&json)?,
                    copied_bytes: copied_bytes as u64,
                    copied_at: parse_ts(copied_at)?,
                });
            }
            Ok(out)
        })
    }

    fn delete_cross_backup(&self, id: i64) -> CatalogResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM cross_backups WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    fn insert_cross_wal(
        &self,
        region: &str,
        row: &WalSegmentRow,
        copied_at: DateTime<Utc>,
    ) -> CatalogResult<i64> {
        let json = to_json(row)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO cross_wal_segments (region, instance_id, timeline, segment, wal_segment, copied_at) VALUES (?1,?2,?3,?4,?5,?6)",
                params![region, row.instance_id.as_str(), row.timeline.0, row.segment, json, ts(&copied_at)],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    fn list_cross_wal(&self, instance_id: &str) -> CatalogResult<Vec<CrossWalSegment>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, region, wal_segment, copied_at FROM cross_wal_segments WHERE instance_id = ?1 ORDER BY timeline, segment, id",
            )?;
            let rows = st.query_map([instance_id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, region, json, copied_at) = row?;
                out.push(CrossWalSegment {
                    id,
                    region,
                    row: from_json(&json)?,
                    copied_at: parse_ts(copied_at)?,
                });
            }
            Ok(out)
        })
    }

    fn delete_cross_wal(&self, id: i64) -> CatalogResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM cross_wal_segments WHERE id = ?1", [id])?;
            Ok(())
        })
    }
}

impl UsageCatalog for SqliteCatalog {
    fn add_usage_sample(&self, u: &UsageSample) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO usage_samples ({SAMPLE_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7)"),
                params![
                    u.instance_id.as_str(), ts(&u.at), u.logical_bytes as i64, u.data_bytes as i64,
                    u.wal_bytes as i64, u.quota_bytes as i64,
                    u.cross_region_bytes.map(|n| n as i64)
                ],
            )?;
            Ok(())
        })
    }

    fn list_usage_samples(
        &self,
        instance_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> CatalogResult<Vec<UsageSample>> {
        // Timestamps are fixed-width RFC 3339 in UTC: text order is time order.
        let from = from.map(|t| ts(&t)).unwrap_or_default();
        let to = to.map(|t| ts(&t)).unwrap_or_else(|| "9".into());
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {SAMPLE_COLS} FROM usage_samples WHERE instance_id = ?1 AND sampled_at >= ?2 AND sampled_at <= ?3 ORDER BY sampled_at"
            ))?;
            let rows = st.query_map(params![instance_id, from, to], sample_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn last_usage_sample(&self, instance_id: &str) -> CatalogResult<Option<UsageSample>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {SAMPLE_COLS} FROM usage_samples WHERE instance_id = ?1 ORDER BY sampled_at DESC LIMIT 1"),
                [instance_id],
                sample_from_row,
            )
            .optional()?)
        })
    }
}

impl AccessCatalog for SqliteCatalog {
    fn add_access_key(&self, k: &AccessKey) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO access_keys (id, secret, read_only, description, created_at) VALUES (?1,?2,?3,?4,?5)",
                params![k.id, k.secret, k.read_only, k.description, ts(&k.created_at)],
            )?;
            Ok(())
        })
    }

    fn get_access_key(&self, id: &str) -> CatalogResult<Option<AccessKey>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT id, secret, read_only, description, created_at FROM access_keys WHERE id = ?1",
                [id],
                key_from_row,
            )
            .optional()?)
        })
    }

    fn list_access_keys(&self) -> CatalogResult<Vec<AccessKey>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, secret, read_only, description, created_at FROM access_keys ORDER BY created_at, id",
            )?;
            let rows = st.query_map([], key_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn delete_access_key(&self, id: &str) -> CatalogResult<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM access_keys WHERE id = ?1", [id])? > 0))
    }

    fn admit_nonce(
        &self,
        key_id: &str,
        nonce: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> CatalogResult<bool> {
        self.with(|c| {
            c.execute(
                "DELETE FROM used_nonces WHERE used_at < ?1",
                [ts(&forget_before)],
            )?;
            let n = c.execute(
                "INSERT OR IGNORE INTO used_nonces (key_id, nonce, used_at) VALUES (?1, ?2, ?3)",
                params![key_id, nonce, ts(&now)],
            )?;
            Ok(n == 1)
        })
    }

    fn shared_secret(&self, name: &str, candidate: &str) -> CatalogResult<String> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO shared_secrets (name, value, created_at) VALUES (?1, ?2, ?3)",
                params![name, candidate, ts(&Utc::now())],
            )?;
            Ok(c.query_row(
                "SELECT value FROM shared_secrets WHERE name = ?1",
                [name],
                |r| r.get(0),
            )?)
        })
    }

    fn put_session(&self, s: &ConsoleSession, forget_before: DateTime<Utc>) -> CatalogResult<()> {
        self.with(|c| {
            let tx = immediate(c)?;
            tx.execute(
                "DELETE FROM console_sessions WHERE last_seen_at < ?1",
                [ts(&forget_before)],
            )?;
            tx.execute(
                "INSERT INTO console_sessions (id_hash, key_id, read_only, csrf, created_at, last_seen_at, flash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    s.id_hash,
                    s.key_id,
                    s.read_only,
                    s.csrf,
                    ts(&s.created_at),
                    ts(&s.last_seen_at),
                    s.flash
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn touch_session(
        &self,
        id_hash: &str,
        now: DateTime<Utc>,
    ) -> CatalogResult<Option<ConsoleSession>> {
        self.with(|c| {
            let tx = immediate(c)?;
            let found = tx
                .query_row(
                    "SELECT id_hash, key_id, read_only, csrf, created_at, last_seen_at, flash \
                     FROM console_sessions WHERE id_hash = ?1",
                    [id_hash],
                    session_from_row,
                )
                .optional()?;
            if found.is_some() {
                tx.execute(
                    "UPDATE console_sessions SET last_seen_at = ?2 WHERE id_hash = ?1",
                    params![id_hash, ts(&now)],
                )?;
            }
            tx.commit()?;
            Ok(found)
        })
    }

    fn delete_session(&self, id_hash: &str) -> CatalogResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM console_sessions WHERE id_hash = ?1", [id_hash])?;
            Ok(())
        })
    }

    fn set_session_flash(&self, id_hash: &str, flash: &str) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE console_sessions SET flash = ?2 WHERE id_hash = ?1",
                params![id_hash, flash],
            )?;
            Ok(())
        })
    }

    fn take_session_flash(&self, id_hash: &str) -> CatalogResult<Option<String>> {
        self.with(|c| {
            let tx = immediate(c)?;
            let flash: Option<String> = tx
                .query_row(
                    "SELECT flash FROM console_sessions WHERE id_hash = ?1",
                    [id_hash],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            if flash.is_some() {
                tx.execute(
                    "UPDATE console_sessions SET flash = NULL WHERE id_hash = ?1",
                    [id_hash],
                )?;
            }
            tx.commit()?;
            Ok(flash)
        })
    }
}

fn session_from_row(r: &Row) -> rusqlite::Result<ConsoleSession> {
    Ok(ConsoleSession {
        id_hash: r.get(0)?,
        key_id: r.get(1)?,
        read_only: r.get(2)?,
        csrf: r.get(3)?,
        created_at: parse_ts(r.get(4)?)?,
        last_seen_at: parse_ts(r.get(5)?)?,
        flash: r.get(6)?,
    })
}

impl GcCatalog for SqliteCatalog {
    fn acquire_repo_hold(&self, hold: &RepoHold, now: DateTime<Utc>) -> CatalogResult<bool> {
        self.with(|c| {
            // BEGIN IMMEDIATE: no other writer between the look and the take.
            let tx = immediate(c)?;
            tx.execute(
                "DELETE FROM repo_holds WHERE repository_id = ?1 AND expires_at < ?2",
                params![hold.repository_id, ts(&now)],
            )?;
            let conflicts: i64 = tx.query_row(
                "SELECT count(*) FROM repo_holds WHERE repository_id = ?1 AND (?2 OR exclusive)",
                params![hold.repository_id, hold.exclusive],
                |r| r.get(0),
            )?;
            if conflicts > 0 {
                tx.commit()?;
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO repo_holds (hold_id, repository_id, exclusive, owner, purpose, acquired_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    hold.id,
                    hold.repository_id,
                    hold.exclusive,
                    hold.owner.as_str(),
                    hold.purpose,
                    ts(&now),
                    ts(&hold.expiry(now))
                ],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn renew_repo_hold(&self, hold: &RepoHold, now: DateTime<Utc>) -> CatalogResult<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE repo_holds SET expires_at = ?2 WHERE hold_id = ?1",
                params![hold.id, ts(&hold.expiry(now))],
            )?;
            Ok(n == 1)
        })
    }

    fn release_repo_hold(&self, hold_id: &str) -> CatalogResult<()> {
        self.with(|c| {
            c.execute("DELETE FROM repo_holds WHERE hold_id = ?1", [hold_id])?;
            Ok(())
        })
    }

    fn gc_pending(
        &self,
        repository_id: &str,
    ) -> CatalogResult<std::collections::BTreeMap<String, DateTime<Utc>>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT pack_id, unreferenced_since FROM gc_pending WHERE repository_id = ?1",
            )?;
            let rows = st.query_map([repository_id], |r| {
                Ok((r.get::<_, String>(0)?, parse_ts(r.get(1)?)?))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn put_gc_pending(
        &self,
        repository_id: &str,
        pending: &std::collections::BTreeMap<String, DateTime<Utc>>,
    ) -> CatalogResult<()> {
        self.with(|c| {
            let tx = immediate(c)?;
            tx.execute(
                "DELETE FROM gc_pending WHERE repository_id = ?1",
                [repository_id],
            )?;
            {
                let mut st = tx.prepare(
                    "INSERT INTO gc_pending (repository_id, pack_id, unreferenced_since) VALUES (?1, ?2, ?3)",
                )?;
                for (pack, since) in pending {
                    st.execute(params![repository_id, pack, ts(since)])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }
}

fn node_from_row(r: &Row) -> rusqlite::Result<Node> {
    Ok(Node {
        id: r.get(0)?,
        api_address: r.get(1)?,
        started_at: parse_ts(r.get(2)?)?,
        heartbeat_at: parse_ts(r.get(3)?)?,
        version: r.get(4)?,
    })
}

fn owner_from_row(r: &Row) -> rusqlite::Result<InstanceOwner> {
    Ok(InstanceOwner {
        instance_id: r.get(0)?,
        node_id: r.get(1)?,
        epoch: r.get(2)?,
        expires_at: parse_ts(r.get(3)?)?,
    })
}

/// `now + ttl`, refusing a ttl that does not fit a timestamp.
fn lease_end(now: DateTime<Utc>, ttl: chrono::Duration) -> CatalogResult<DateTime<Utc>> {
    now.checked_add_signed(ttl)
        .ok_or_else(|| CatalogError::Invalid(format!("lease of {ttl} from {now}")))
}

impl NodeCatalog for SqliteCatalog {
    /// The process's clock: a SQLite catalog lives on the one host that
    /// uses it, so its clock is the catalog's.
    fn now(&self) -> CatalogResult<DateTime<Utc>> {
        Ok(Utc::now())
    }

    fn heartbeat(&self, n: &Node) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO nodes (id, api_address, started_at, heartbeat_at, version) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET api_address=excluded.api_address, started_at=excluded.started_at,
                 heartbeat_at=excluded.heartbeat_at, version=excluded.version",
                params![n.id, n.api_address, ts(&n.started_at), ts(&n.heartbeat_at), n.version],
            )?;
            Ok(())
        })
    }

    fn list_nodes(&self) -> CatalogResult<Vec<Node>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, api_address, started_at, heartbeat_at, version FROM nodes ORDER BY id",
            )?;
            let rows = st.query_map([], node_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn claim_instance(
        &self,
        instance_id: &str,
        node_id: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> CatalogResult<bool> {
        let until = ts(&lease_end(now, ttl)?);
        self.with(|c| {
            // BEGIN IMMEDIATE: the row read cannot change before the write,
            // so two nodes claiming at once are serialized and the second
            // sees the first's lease.
            let tx = immediate(c)?;
            let current = tx
                .query_row(
                    "SELECT instance_id, node_id, epoch, expires_at FROM instance_owners WHERE instance_id = ?1",
                    [instance_id],
                    owner_from_row,
                )
                .optional()?;
            let epoch = match current {
                None => 1,
                Some(o) if o.node_id == node_id => o.epoch,
                Some(o) if o.expires_at <= now => o.epoch + 1,
                Some(_) => return Ok(false),
            };
            tx.execute(
                "INSERT INTO instance_owners (instance_id, node_id, epoch, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(instance_id) DO UPDATE SET node_id=excluded.node_id, epoch=excluded.epoch, expires_at=excluded.expires_at",
                params![instance_id, node_id, epoch, until],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn renew_instances(
        &self,
        node_id: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> CatalogResult<usize> {
        let until = ts(&lease_end(now, ttl)?);
        self.with(|c| {
            Ok(c.execute(
                "UPDATE instance_owners SET expires_at=?2 WHERE node_id=?1",
                params![node_id, until],
            )?)
        })
    }

    fn release_instance(&self, instance_id: &str, node_id: &str) -> CatalogResult<bool> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM instance_owners WHERE instance_id=?1 AND node_id=?2",
                params![instance_id, node_id],
            )? > 0)
        })
    }

    fn list_owners(&self) -> CatalogResult<Vec<InstanceOwner>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT instance_id, node_id, epoch, expires_at FROM instance_owners ORDER BY instance_id",
            )?;
            let rows = st.query_map([], owner_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn publish_receiver(&self, r: &ReceiverStatus) -> CatalogResult<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO wal_receivers (instance_id, node_id, running, received_lsn, server_end_lsn, last_message_at, last_error, failing, published_at, failing_since, unreachable_since) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT(instance_id) DO UPDATE SET node_id=excluded.node_id, running=excluded.running, \
                 received_lsn=excluded.received_lsn, server_end_lsn=excluded.server_end_lsn, \
                 last_message_at=excluded.last_message_at, last_error=excluded.last_error, \
                 failing=excluded.failing, published_at=excluded.published_at, \
                 failing_since=excluded.failing_since, unreachable_since=excluded.unreachable_since",
                params![
                    r.instance_id, r.node_id, r.running, lsn_to_sql(Lsn(r.received_lsn)),
                    lsn_to_sql(Lsn(r.server_end_lsn)), r.last_message_at.as_ref().map(ts),
                    r.last_error, r.failing, ts(&r.published_at),
                    r.failing_since.as_ref().map(ts), r.unreachable_since.as_ref().map(ts)
                ],
            )?;
            Ok(())
        })
    }

    fn list_receivers(&self) -> CatalogResult<Vec<ReceiverStatus>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {RECEIVER_COLS} FROM wal_receivers ORDER BY instance_id"
            ))?;
            let rows = st.query_map([], receiver_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn get_receiver(&self, instance_id: &str) -> CatalogResult<Option<ReceiverStatus>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {RECEIVER_COLS} FROM wal_receivers WHERE instance_id = ?1"),
                [instance_id],
                receiver_from_row,
            )
            .optional()?)
        })
    }
}

const RECEIVER_COLS: &str = "instance_id, node_id, running, received_lsn, server_end_lsn, last_message_at, last_error, failing, published_at, failing_since, unreachable_since";

fn receiver_from_row(r: &Row) -> rusqlite::Result<ReceiverStatus> {
    Ok(ReceiverStatus {
        instance_id: r.get(0)?,
        node_id: r.get(1)?,
        running: r.get(2)?,
        received_lsn: lsn_from_sql(r.get(3)?).0,
        server_end_lsn: lsn_from_sql(r.get(4)?).0,
        last_message_at: opt_ts(r.get(5)?)?,
        last_error: r.get(6)?,
        failing: r.get(7)?,
        published_at: parse_ts(r.get(8)?)?,
        failing_since: opt_ts(r.get(9)?)?,
        unreachable_since: opt_ts(r.get(10)?)?,
    })
}

impl IndexCatalog for SqliteCatalog {
    fn clear_index(&self) -> CatalogResult<()> {
        self.with(|c| {
            let tx = immediate(c)?;
            tx.execute_batch(
                "DELETE FROM backup_sets; DELETE FROM wal_segments; DELETE FROM restore_points; DELETE FROM recovery_events;",
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> Instance {
        Instance {
            id: id.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password_env: None,
            password: None,
            dbname: None,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            system_identifier: Some(u64::MAX - 3),
            pg_version_num: Some(150018),
            wal_segment_size: Some(16 << 20),
            created_at: Utc::now(),
            agent_url: None,
            agent_key: None,
            agent_ca: None,
        }
    }

    /// Kinds, modes and sslmodes are stored as the strings earlier releases
    /// wrote: rows written that way read back, and new rows are spelled the
    /// same; a value no release wrote is an error that names it.
    #[test]
    fn typed_columns_keep_their_stored_spelling() {
        let cat = SqliteCatalog::open_in_memory().unwrap();
        let column = |sql: &str| -> String {
            cat.with(|c| Ok(c.query_row(sql, [], |r| r.get(0))?))
                .unwrap()
        };
        let kinds = [
            "backup",
            "restore",
            "clone",
            "ddr-restore",
            "restore-table",
            "drill",
            "cross-copy",
            "snapshot",
            "snapshot-upload",
            "recover-databases",
            "copy-databases",
            "notify",
        ];
        for (i, kind) in kinds.iter().enumerate() {
            cat.with(|c| {
                c.execute(
                    "INSERT INTO jobs (id, kind, state, started_at, pid) VALUES (?1, ?2, 'Finished', ?3, 1)",
                    params![100 + i as i64, kind, ts(&Utc::now())],
                )?;
                Ok(())
            })
            .unwrap();
        }
        for (i, kind) in kinds.iter().enumerate() {
            let job = cat.get_job(JobId::new(100 + i as i64)).unwrap();
            assert_eq!(job.kind.as_str(), *kind);
            assert_eq!(kind.parse::<JobKind>().unwrap(), job.kind);
            let new = cat.create_job(job.kind, None).unwrap();
            let stored = column(&format!("SELECT kind FROM jobs WHERE id = {}", new.id));
            assert_eq!(stored, *kind);
        }
        assert_eq!(JobKind::ALL.len(), 12);

        for (mode, sslmode) in [("Automated", "verify-full"), ("Manual", "disable")] {
            let id = format!("{mode}-{sslmode}");
            cat.add_instance(&Instance {
                sslmode: sslmode.parse().unwrap(),
                ..instance(&id)
            })
            .unwrap();
            assert_eq!(
                column(&format!("SELECT sslmode FROM instances WHERE id = '{id}'")),
                sslmode
            );
            cat.with(|c| {
                c.execute(
                    "INSERT INTO backup_sets (id, instance_id, status, mode, started_at) VALUES (?1, ?1, 'Success', ?2, ?3)",
                    params![id, mode, ts(&Utc::now())],
                )?;
                Ok(())
            })
            .unwrap();
            let set = cat.get_backup(&id).unwrap();
            assert_eq!(set.mode.as_str(), mode);
            assert_eq!(set.method, BackupMethod::Physical, "rows before methods");
            assert_eq!(cat.get_instance(&id).unwrap().sslmode.as_str(), sslmode);
        }

        cat.with(|c| {
            c.execute(
                "INSERT INTO jobs (id, kind, state, started_at, pid) VALUES (5000, 'wal-receive', 'Finished', ?1, 1)",
                params![ts(&Utc::now())],
            )?;
            Ok(())
        })
        .unwrap();
        let err = cat.get_job(JobId::new(5000)).unwrap_err().to_string();
        assert!(err.contains("\"wal-receive\""), "{err}");
        let err = "verify-none".parse::<SslMode>().unwrap_err().to_string();
        assert!(err.contains("verify-ca or verify-full"), "{err}");
        let err = "manual".parse::<BackupMode>().unwrap_err().to_string();
        assert!(err.contains("Automated or Manual"), "{err}");
        cat.with(|c| Ok(c.execute("UPDATE backup_sets SET method = 'Flash'", [])?))
            .unwrap();
        let err = cat.list_backups("Manual-disable").unwrap_err().to_string();
        assert!(err.contains("Physical or Snapshot"), "{err}");
    }

    #[test]
    fn jobs_from_before_leases_expire_from_their_start() {
        let cat = SqliteCatalog::open_in_memory().unwrap();
        let job = cat.create_job(JobKind::Restore, None).unwrap();
        cat.with(|c| {
            c.execute("UPDATE jobs SET owner = NULL, heartbeat_at = NULL", [])?;
            Ok(())
        })
        .unwrap();
        let lease = chrono::Duration::seconds(30);
        let got = cat.get_job(job.id).unwrap();
        assert_eq!(got.heartbeat_at, got.started_at);
        assert_eq!(
            cat.fail_expired_jobs(got.started_at + lease, lease)
                .unwrap(),
            0
        );
        let later = got.started_at + lease + chrono::Duration::seconds(1);
        assert_eq!(cat.fail_expired_jobs(later, lease).unwrap(), 1);
        assert!(cat
            .get_job(job.id)
            .unwrap()
            .error
            .unwrap()
            .contains("(none recorded)"));
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(SqliteCatalog::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            SqliteCatalog::open(&path),
            Err(CatalogError::NewerSchema { .. })
        ));
    }

    #[test]
    fn sqlite_errors_become_backend_neutral_variants() {
        use std::error::Error as _;
        // A second copy of a set in one region breaks a unique key.
        let cat = SqliteCatalog::open_in_memory().unwrap();
        let set = BackupSet::started("b1".into(), "db1", BackupMode::Manual, Utc::now(), None);
        cat.insert_cross_backup("eu", &set, 1, Utc::now()).unwrap();
        let err = cat
            .insert_cross_backup("eu", &set, 1, Utc::now())
            .unwrap_err();
        assert!(matches!(err, CatalogError::Conflict(_)), "{err:?}");
        assert!(!err.is_retryable());
        assert!(err.source().is_some(), "the SQLite error stays the source");

        // A stored value this build cannot read is corruption, not a panic.
        cat.insert_backup(&set).unwrap();
        cat.with(|c| Ok(c.execute("UPDATE backup_sets SET mode = 'Sideways'", [])?))
            .unwrap();
        let err = cat.get_backup("b1").unwrap_err();
        assert!(matches!(err, CatalogError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("Sideways"), "{err}");

        // A file that is not a database.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = SqliteCatalog::open(&path).err().expect("not a database");
        assert!(matches!(err, CatalogError::Corrupt(_)), "{err:?}");

        // Busy and locked are the retryable ones.
        for code in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_LOCKED] {
            let err = CatalogError::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ));
            assert!(
                matches!(err, CatalogError::Busy(_)) && err.is_retryable(),
                "{err:?}"
            );
        }
        let err = CatalogError::from(rusqlite::Error::QueryReturnedNoRows);
        assert!(matches!(err, CatalogError::NotFound(_)), "{err:?}");
    }
}
