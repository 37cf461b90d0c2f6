//! RDS's user backup operations: `ImportUserBackupFile`,
//! `ListUserBackupFiles`, `UpdateUserBackupFile`, `DeleteUserBackupFile`.
//! The file is `BackupFile`, one name in the configured import directory
//! (the output directory of `pg_basebackup -Ft`), never a path or an OSS
//! object: `Mode`, `BackupFile` as OSS JSON, `BucketRegion`, `RestoreSize`
//! and the replication fields are MySQL's and OSS's, refused or ignored as
//! said at each. Times are UNIX milliseconds, as RDS gives them here.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use strata_catalog::{BackupSet, BackupStatus};
use strata_service::user_backups::{
    imported_at, parse_engine_version, parse_retention, retention_days, UserBackupRequest,
};
use strata_service::Service;

use crate::error::{quoted, ApiError, ApiResult};
use crate::params::Params;

type Fields = Map<String, Value>;

/// RDS's status of a user backup.
fn status(set: &BackupSet) -> &'static str {
    match set.status {
        BackupStatus::Running => "Importing",
        BackupStatus::Success => "BackupSuccess",
        BackupStatus::Failed => "Failed",
    }
}

fn retention_param(p: &Params) -> ApiResult<Option<u32>> {
    Ok(match p.get("Retention") {
        Some(v) => Some(parse_retention(v)?),
        None => None,
    })
}

/// `ImportUserBackupFile`: checks the directory now (a refusal records
/// nothing) and imports it in the background; the user backup shows
/// `Importing` until it is stored.
pub async fn import(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    if let Some(mode) = p.get("Mode").filter(|m| *m != "stream") {
        return Err(ApiError::bad(
            "InvalidMode.NotSupported",
            format!(
                "Mode {} is not supported: BackupFile names a directory in the import directory",
                quoted(mode)
            ),
        ));
    }
    if p.get("BuildReplication").is_some_and(|b| b == "true") {
        return Err(ApiError::bad(
            "InvalidBuildReplication.NotSupported",
            "BuildReplication sets up MySQL replication, which has no meaning here",
        ));
    }
    let name = p.required("BackupFile")?;
    let req = UserBackupRequest {
        comment: p.get("Comment").map(str::to_string),
        retention_days: retention_param(p)?,
        engine_major: match p.get("EngineVersion") {
            Some(v) => Some(parse_engine_version(v)?),
            None => None,
        },
    };
    let job = svc.import_user_backup(name, req).await?;
    Ok(Map::from_iter([
        (
            "BackupId".to_string(),
            json!(job.backup_id.as_deref().unwrap_or_default()),
        ),
        ("Status".to_string(), json!("Importing")),
        ("StrataJobId".to_string(), json!(job.id.to_string())),
    ]))
}

/// `ListUserBackupFiles`: every user backup, oldest first, filtered by
/// `BackupId`, `Status` and `Comment` (a substring).
pub fn list(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let records: Vec<Value> = svc
        .user_backups()?
        .iter()
        .filter(|b| p.get("BackupId").is_none_or(|id| b.id == id))
        .filter(|b| p.get("Status").is_none_or(|s| status(b) == s))
        .filter(|b| {
            p.get("Comment")
                .is_none_or(|c| b.keep_note.as_deref().unwrap_or_default().contains(c))
        })
        .map(|b| record(svc, b))
        .collect();
    Ok(Map::from_iter([("Records".to_string(), json!(records))]))
}

fn record(svc: &Service, b: &BackupSet) -> Value {
    let job = b.job_id.and_then(|j| svc.job(j).ok());
    let millis = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis().to_string();
    let mut r = json!({
        "BackupId": b.id,
        "Status": status(b),
        "Comment": b.keep_note.clone().unwrap_or_default(),
        "CreationTime": millis(imported_at(b, job.as_ref())),
        "Engine": "PostgreSQL",
        "EngineVersion": b.pg_version_num.map(|v| format!("{}.0", v / 10000)).unwrap_or_default(),
        // Kilobytes of file data, as RDS gives the file's size.
        "OssFileSize": b.total_bytes.div_ceil(1024),
        "RestoreSize": b.total_bytes.div_ceil(1 << 30).max(1).to_string(),
        "Reason": b.error.clone().unwrap_or_default(),
        "StrataStoredBytes": b.stored_bytes,
        "StrataBackupStartTime": b.started_at.timestamp_millis().to_string(),
    });
    let m = r.as_object_mut().expect("a JSON object");
    if let Some(end) = job.as_ref().and_then(|j| j.finished_at) {
        m.insert("FinishTime".into(), json!(millis(end)));
        m.insert("ModificationTime".into(), json!(millis(end)));
    }
    if let Some(days) = retention_days(b, job.as_ref()) {
        m.insert("Retention".into(), json!(days));
    }
    if let Some(j) = &job {
        m.insert("StrataJobId".into(), json!(j.id.to_string()));
        m.insert("StrataProcess".into(), json!(format!("{}%", j.progress)));
    }
    r
}

/// `UpdateUserBackupFile`: a new `Comment` and/or `Retention`.
pub fn update(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let id = p.required("BackupId")?;
    let retention = retention_param(p)?;
    if p.get("Comment").is_none() && retention.is_none() {
        return Err(ApiError::missing("Comment"));
    }
    let set = svc.update_user_backup(id, p.get("Comment"), retention)?;
    Ok(Map::from_iter([("BackupId".to_string(), json!(set.id))]))
}

/// `DeleteUserBackupFile`.
pub fn delete(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let id = p.required("BackupId")?;
    svc.delete_user_backup(id)?;
    Ok(Map::from_iter([("BackupId".to_string(), json!(id))]))
}
