//! The RPC actions: RDS 2014-08-15 operations with PostgreSQL semantics,
//! field names and value spellings as the official SDK models them, plus
//! Strata's extension actions (prefixed `Strata`). Fields RDS defines that
//! have a meaning here are filled; extension fields are prefixed `Strata`.

use std::sync::Arc;

use axum::http::StatusCode;
use chrono::Utc;
use serde_json::{json, Map, Value};
use strata_catalog::{
    ArchiveKeepPolicy, BackupId, BackupMethod, BackupMode, BackupPolicy, BackupSet, BackupStatus,
    Instance, Job, JobId, JobKind, JobState, KeepUntil, SslMode,
};
use strata_engine::SetDecision;
use strata_service::policy::{self, format_minutes, format_seconds};
use strata_service::{
    ExactPoint, ExactTarget, Lsn, PolicyChange, ReleasedKeep, RestoreSource, Service,
};

use crate::advanced;
use crate::cross_region;
use crate::encryption;
use crate::error::{quoted, shown, ApiError, ApiResult};
use crate::log_files::{self, Listing};
use crate::meta;
use crate::params::{page, Params};
use crate::user_backups;
use crate::ApiState;

/// Every action Strata answers, in alphabetical order.
pub const ACTIONS: &[&str] = &[
    "AuthorizeBackupEncryption",
    "CheckBackupEncryptionAuthorized",
    "CheckCreateDdrDBInstance",
    "CheckRegionSupportBackupEncryption",
    "CloneDBInstance",
    "CopyDatabaseBetweenInstances",
    "CreateBackup",
    "CreateDdrInstance",
    "DeleteBackup",
    "DeleteDBInstance",
    "DeleteUserBackupFile",
    "DescribeAvailableCrossRegion",
    "DescribeAvailableRecoveryTime",
    "DescribeBackupDatabase",
    "DescribeBackupPolicy",
    "DescribeBackupTasks",
    "DescribeBackups",
    "DescribeBinlogFiles",
    "DescribeCrossBackupMetaList",
    "DescribeCrossRegionBackupDBInstance",
    "DescribeCrossRegionBackups",
    "DescribeCrossRegionLogBackupFiles",
    "DescribeDBInstanceAttribute",
    "DescribeDBInstanceEncryptionKey",
    "DescribeDBInstances",
    "DescribeDetachedBackups",
    "DescribeInstanceCrossBackupPolicy",
    "DescribeLocalAvailableRecoveryTime",
    "DescribeLogBackupFiles",
    "DescribeMetaList",
    "EnableBackupEncryption",
    "ImportUserBackupFile",
    "ListUserBackupFiles",
    "ModifyBackupPolicy",
    "ModifyBackupSetExpireTime",
    "ModifyInstanceCrossBackupPolicy",
    "RecoveryDBInstance",
    "RestoreTable",
    "StrataDeregisterDBInstance",
    "StrataDescribeBackupStorageUsage",
    "StrataDescribeRecoveryEvents",
    "StrataDescribeRetention",
    "StrataImportBackupFile",
    "StrataKeepBackup",
    "StrataRegisterDBInstance",
    "StrataReleaseBackup",
    "StrataRotateBackupEncryptionKey",
    "StrataStartRestoreDrill",
    "UpdateUserBackupFile",
];

/// Whether Strata implements `action` (RDS's or an extension).
pub fn exists(action: &str) -> bool {
    ACTIONS.contains(&action)
}

type Fields = Map<String, Value>;

fn obj(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

pub async fn dispatch(state: &ApiState, action: &str, p: &Params) -> ApiResult<Fields> {
    let svc = &state.service;
    match action {
        "CheckCreateDdrDBInstance" => cross_region::check_ddr_instance(svc, p),
        "CloneDBInstance" => clone_instance(svc, p).await,
        "CopyDatabaseBetweenInstances" => copy_databases(svc, p),
        "AuthorizeBackupEncryption" => encryption::authorize(svc, p).await,
        "CheckBackupEncryptionAuthorized" => encryption::check_authorized(svc, p).await,
        "CheckRegionSupportBackupEncryption" => encryption::check_region_support(svc, p),
        "CreateBackup" => create_backup(svc, p).await,
        "DescribeDBInstanceEncryptionKey" => encryption::describe(svc, p).await,
        "EnableBackupEncryption" => encryption::enable(svc, p).await,
        "StrataRotateBackupEncryptionKey" => encryption::rotate(svc, p).await,
        "CreateDdrInstance" => cross_region::create_ddr_instance(svc, p),
        "DeleteBackup" => delete_backup(svc, p),
        "DeleteDBInstance" => delete_instance(svc, p).await,
        "DeleteUserBackupFile" => user_backups::delete(svc, p),
        "ImportUserBackupFile" => user_backups::import(svc, p).await,
        "ListUserBackupFiles" => user_backups::list(svc, p),
        "UpdateUserBackupFile" => user_backups::update(svc, p),
        "RecoveryDBInstance" => recover_databases(svc, p),
        "RestoreTable" => restore_table(svc, p),
        "StrataStartRestoreDrill" => start_drill(svc, p),
        "StrataImportBackupFile" => import_backup_file(svc, p).await,
        "StrataKeepBackup" => keep_backup(svc, p),
        "StrataReleaseBackup" => release_backup(svc, p),
        "StrataDescribeRetention" => describe_retention(svc, p).await,
        "StrataDescribeRecoveryEvents" => describe_recovery_events(svc, p),
        "DescribeAvailableCrossRegion" => cross_region::describe_available_regions(svc, p),
        "DescribeAvailableRecoveryTime" => cross_region::describe_recovery_time(svc, p),
        "DescribeBackupDatabase" => meta::describe_backup_database(svc, p).await,
        "DescribeBackupPolicy" => describe_backup_policy(svc, p),
        "DescribeBackupTasks" => describe_backup_tasks(svc, p),
        "DescribeBackups" => describe_backups(state, p).await,
        "DescribeBinlogFiles" => log_files::describe(state, p, Listing::Binlog),
        "DescribeLogBackupFiles" => log_files::describe(state, p, Listing::LogBackup),
        "DescribeCrossRegionBackupDBInstance" => cross_region::describe_instances(svc, p),
        "DescribeCrossBackupMetaList" => cross_region::describe_meta_list(svc, p).await,
        "DescribeCrossRegionBackups" => cross_region::describe_backups(svc, p),
        "DescribeDetachedBackups" => describe_detached_backups(state, p),
        "DescribeCrossRegionLogBackupFiles" => cross_region::describe_log_files(svc, p),
        "DescribeInstanceCrossBackupPolicy" => cross_region::describe_policy(svc, p),
        "DescribeDBInstanceAttribute" => describe_instance_attribute(svc, p),
        "DescribeDBInstances" => describe_instances(svc, p),
        "DescribeLocalAvailableRecoveryTime" => describe_recovery_time(svc, p),
        "DescribeMetaList" => meta::describe_meta_list(svc, p).await,
        "ModifyBackupPolicy" => modify_backup_policy(svc, p).await,
        "ModifyBackupSetExpireTime" => modify_backup_expiry(svc, p),
        "ModifyInstanceCrossBackupPolicy" => cross_region::modify_policy(svc, p),
        "StrataDeregisterDBInstance" => deregister_instance(svc, p).await,
        "StrataDescribeBackupStorageUsage" => describe_storage_usage(svc, p).await,
        "StrataRegisterDBInstance" => register_instance(svc, p).await,
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "InvalidAction.NotFound",
            format!("Specified api {} is not found.", shown(other)),
        )),
    }
}

fn instance(svc: &Service, p: &Params) -> ApiResult<Instance> {
    let id = p.required("DBInstanceId")?;
    Ok(svc.instance(id)?)
}

fn not_supported(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad(code, message)
}

// ----- backups -----

async fn create_backup(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    // Encrypted backups need their KMS key usable: refused now, not as a failed job.
    encryption::check_instance_key(svc, &inst.id).await?;
    let method = match p.get("BackupMethod").unwrap_or("Physical") {
        "Physical" => BackupMethod::Physical,
        "Snapshot" => BackupMethod::Snapshot,
        other => {
            return Err(not_supported(
                "InvalidBackupMethod.NotSupported",
                format!(
                    "BackupMethod {} is not supported for PostgreSQL; use Physical or Snapshot.",
                    quoted(other)
                ),
            ))
        }
    };
    match p.get("BackupType").unwrap_or("Auto") {
        "Auto" | "FullBackup" => {}
        other => {
            return Err(ApiError::bad(
                "InvalidBackupType.Malformed",
                format!(
                    "BackupType must be Auto or FullBackup, got {}",
                    quoted(other)
                ),
            ))
        }
    }
    let job = svc.request_backup(&inst.id, method)?;
    Ok(obj(json!({"BackupJobId": job.id.to_string()})))
}

fn engine_version(v: Option<u32>) -> String {
    v.map(|n| (n / 10000).to_string()).unwrap_or_default()
}

/// Runs a service query that may measure the repository (usage before the
/// first sample walks every object) on the blocking pool, never on the
/// request's runtime thread.
pub(crate) async fn off_runtime<T: Send + 'static>(
    svc: &Arc<Service>,
    query: impl FnOnce(&Service) -> Result<T, strata_service::ServiceError> + Send + 'static,
) -> ApiResult<T> {
    let svc = Arc::clone(svc);
    match tokio::task::spawn_blocking(move || query(&svc)).await {
        Ok(answer) => Ok(answer?),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            e.to_string(),
        )),
    }
}

async fn describe_backups(state: &ApiState, p: &Params) -> ApiResult<Fields> {
    let svc = &state.service;
    let inst = instance(svc, p)?;
    let (start, end) = p.period()?;
    let (number, size) = p.paging(&[30, 50, 100], false)?;
    let policy = svc.policy(&inst.id)?;
    let mut sets = svc.backup_sets(&inst.id)?;
    let rules = svc.deletion_rules(&policy, &sets);
    let id = inst.id.clone();
    let stored_total = off_runtime(svc, move |svc| svc.current_usage(&id))
        .await?
        .stored_bytes();
    let encryption = encryption_field(svc);
    let id = inst.id.clone();
    let decisions: std::collections::HashMap<BackupId, SetDecision> =
        off_runtime(svc, move |svc| svc.retention_dry_run(&id))
            .await?
            .sets
            .into_iter()
            .map(|d| (d.backup_id.clone(), d))
            .collect();
    let drills: std::collections::HashMap<BackupId, strata_catalog::DrillResult> = svc
        .drills(&inst.id)?
        .into_iter()
        .map(|d| (d.backup_id.clone(), d))
        .collect();
    sets.reverse(); // newest first, as RDS lists them
    let matching: Vec<&BackupSet> = sets
        .iter()
        .filter(|b| p.get("BackupId").is_none_or(|id| b.id == id))
        .filter(|b| p.get("BackupMode").is_none_or(|m| b.mode.as_str() == m))
        .filter(|b| p.get("BackupStatus").is_none_or(|s| b.status.as_str() == s))
        .filter(|_| p.get("BackupType").is_none_or(|t| t == "FullBackup"))
        .filter(|b| start.is_none_or(|s| b.started_at >= s))
        .filter(|b| end.is_none_or(|e| b.started_at <= e))
        .collect();
    let items: Vec<Value> = page(&matching, number, size)
        .into_iter()
        .map(|b| {
            let mut item = json!({
                "BackupId": b.id,
                "DBInstanceId": b.instance_id,
                "HostInstanceID": b.instance_id,
                "BackupStatus": b.status.as_str(),
                "BackupStartTime": format_seconds(b.started_at),
                "BackupEndTime": b.finished_at.map(format_seconds).unwrap_or_default(),
                "BackupType": "FullBackup",
                "BackupMode": b.mode,
                "BackupMethod": b.method.as_str(),
                "BackupInitiator": if b.mode == BackupMode::Manual { "User" } else { "System" },
                "BackupSize": b.total_bytes,
                "Engine": "PostgreSQL",
                "EngineVersion": engine_version(b.pg_version_num),
                "IsAvail": i32::from(b.status == BackupStatus::Success && drills.get(&b.id).is_none_or(|d| d.status != "Failed")),
                "StoreStatus": if rules.refusal(b).is_none() { "Enabled" } else { "Disabled" },
                "StorageClass": "0",
                "Encryption": encryption,
                "StrataStoredSize": b.stored_bytes,
                "StrataFileCount": b.file_count,
            });
            let m = item.as_object_mut().expect("object");
            if let (Some(f), BackupStatus::Success) = (b.finished_at, b.status) {
                m.insert("ConsistentTime".into(), json!(f.timestamp()));
            }
            if let Some(d) = decisions.get(&b.id) {
                if let Some(t) = d.expires_at {
                    m.insert("ExpectExpireTime".into(), json!(format_seconds(t)));
                }
                m.insert("StrataKeptBy".into(), json!(d.kept_by.to_string()));
            }
            if let Some(k) = b.keep_until {
                m.insert("StrataKeepUntil".into(), json!(keep_until_field(k)));
            }
            if let Some(note) = &b.keep_note {
                m.insert("StrataKeepNote".into(), json!(note));
            }
            if let (Some(a), Some(z)) = (b.start_lsn, b.stop_lsn) {
                m.insert("StrataStartLsn".into(), json!(a.to_string()));
                m.insert("StrataStopLsn".into(), json!(z.to_string()));
            }
            if let Some(e) = &b.error {
                m.insert("StrataErrorMessage".into(), json!(e));
            }
            if b.method == BackupMethod::Snapshot {
                // Where the snapshot set's data is: on the database host
                // (clones from it are instant), in the repository, or both.
                m.insert("StrataSnapshotLocal".into(), json!(b.snapshot_local));
                m.insert("StrataSnapshotUploaded".into(), json!(b.snapshot_uploaded));
                if let Some(bytes) = b.snapshot_bytes {
                    m.insert("StrataSnapshotLocalSize".into(), json!(bytes));
                }
            }
            if b.in_repository() {
                let (url, _) = state.links.sign(&format!("/download/backups/{}/{}.tar", b.instance_id, b.id), Utc::now());
                let (zst, _) = state.links.sign(&format!("/download/backups/{}/{}.tar.zst", b.instance_id, b.id), Utc::now());
                m.insert("BackupDownloadURL".into(), json!(url));
                m.insert("BackupIntranetDownloadURL".into(), json!(url));
                m.insert("StrataBackupDownloadURLZstd".into(), json!(zst));
            }
            if let Some(d) = drills.get(&b.id) {
                m.insert("StrataDrillStatus".into(), json!(d.status));
                m.insert("StrataDrillMessage".into(), json!(d.detail));
                if let Some(f) = d.finished_at {
                    m.insert("StrataDrillTime".into(), json!(format_seconds(f)));
                }
            }
            item
        })
        .collect();
    Ok(obj(json!({
        "Items": {"Backup": items},
        "PageNumber": number.to_string(),
        "PageRecordCount": items.len().to_string(),
        "TotalRecordCount": matching.len().to_string(),
        "TotalEcsSnapshotSize": stored_total,
    })))
}

/// `DescribeDetachedBackups`: the sets kept after their instance was
/// deregistered or deleted, in this server's region (`Region`), newest
/// first, with the filters and paging of `DescribeBackups`.
fn describe_detached_backups(state: &ApiState, p: &Params) -> ApiResult<Fields> {
    let svc = &state.service;
    let region = p.required("Region")?;
    if region != svc.regions().primary {
        return Err(ApiError::bad(
            "InvalidRegionId.NotFound",
            format!(
                "Region {} is not this server's region ({})",
                quoted(region),
                svc.regions().primary
            ),
        ));
    }
    let (start, end) = p.period()?;
    let (number, size) = p.paging(&[30, 50, 100], false)?;
    let mut sets = svc.detached_backups()?;
    sets.reverse();
    let matching: Vec<&BackupSet> = sets
        .iter()
        .filter(|b| p.get("DBInstanceId").is_none_or(|i| b.instance_id == i))
        .filter(|b| p.get("BackupId").is_none_or(|id| b.id == id))
        .filter(|b| p.get("BackupMode").is_none_or(|m| b.mode.as_str() == m))
        .filter(|b| p.get("BackupStatus").is_none_or(|s| b.status.as_str() == s))
        .filter(|b| start.is_none_or(|s| b.started_at >= s))
        .filter(|b| end.is_none_or(|e| b.started_at <= e))
        .collect();
    let items: Vec<Value> = page(&matching, number, size)
        .into_iter()
        .map(|b| {
            let success = b.status == BackupStatus::Success;
            let mut item = json!({
                "BackupId": b.id,
                "DBInstanceId": b.instance_id,
                "HostInstanceID": b.instance_id,
                "DBInstanceComment": b.instance_id,
                "BackupStatus": b.status.as_str(),
                "BackupStartTime": format_seconds(b.started_at),
                "BackupEndTime": b.finished_at.map(format_seconds).unwrap_or_default(),
                "BackupType": "FullBackup",
                "BackupMode": b.mode,
                "BackupMethod": b.method.as_str(),
                "BackupSize": b.total_bytes,
                "IsAvail": i32::from(success),
                "MetaStatus": "OK",
                // Deletable (`DeleteBackup` with the old instance id)
                // unless kept by hand or running.
                "StoreStatus": if b.kept_at(svc.now()) || b.status == BackupStatus::Running { "Disabled" } else { "Enabled" },
                "StrataEngineVersion": engine_version(b.pg_version_num),
            });
            let m = item.as_object_mut().expect("object");
            if let (Some(f), true) = (b.finished_at, success) {
                m.insert("ConsistentTime".into(), json!(f.timestamp()));
            }
            if let Some(k) = b.keep_until {
                m.insert("StrataKeepUntil".into(), json!(keep_until_field(k)));
            }
            if b.in_repository() {
                let (url, _) = state.links.sign(
                    &format!("/download/backups/{}/{}.tar", b.instance_id, b.id),
                    Utc::now(),
                );
                m.insert("BackupDownloadURL".into(), json!(url));
                m.insert("BackupIntranetDownloadURL".into(), json!(url));
            }
            item
        })
        .collect();
    Ok(obj(json!({
        "Items": {"Backup": items},
        "PageNumber": number.to_string(),
        "PageRecordCount": items.len().to_string(),
        "TotalRecordCount": matching.len().to_string(),
    })))
}

/// `Encryption` of backup sets: RDS puts a JSON object in a string; here it
/// describes the repository's encryption at rest, which covers every set:
/// `{"Encrypted":false}` or `{"Encrypted":true,"Algorithm":"xchacha20-poly1305","KeySource":"key-file"}`
/// (`KeySource` `key-file` or `passphrase`).
fn encryption_field(svc: &Service) -> String {
    let value = match &svc.repository().config().encryption {
        Some(e) if svc.repository().is_encrypted() => json!({
            "Encrypted": true,
            "Algorithm": e.cipher,
            "KeySource": e.key_source,
        }),
        _ => json!({"Encrypted": false}),
    };
    value.to_string()
}

/// `CrossRegionStoredSize` is left out while not known, and is not part
/// of `TotalStoredSize` (the quota does not cover it).
fn usage_sample_fields(s: &strata_catalog::UsageSample) -> Value {
    let mut fields = json!({
        "SampleTime": format_seconds(s.at),
        "LogicalSize": s.logical_bytes,
        "DataStoredSize": s.data_bytes,
        "LogStoredSize": s.wal_bytes,
        "TotalStoredSize": s.stored_bytes(),
        "FreeQuota": s.quota_bytes,
        "ExcessSize": s.excess_bytes(),
    });
    if let Some(n) = s.cross_region_bytes {
        fields["CrossRegionStoredSize"] = json!(n);
    }
    fields
}

/// Extension: what an instance's backups store, its free quota, and the
/// bytes above it integrated over `StartTime`..`EndTime` (default: from the
/// first sample to now) in GB-hours, with the samples of that period.
async fn describe_storage_usage(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let (start, end) = p.period()?;
    let id = inst.id.clone();
    let report = off_runtime(svc, move |svc| svc.usage_report(&id, start, end)).await?;
    let mut fields = obj(usage_sample_fields(&report.current));
    let samples: Vec<Value> = report.samples.iter().map(usage_sample_fields).collect();
    fields.extend(obj(json!({
        "DBInstanceId": inst.id,
        "FreeQuotaRule": report.quota.to_string(),
        "StartTime": format_seconds(report.from),
        "EndTime": format_seconds(report.to),
        "BillableGBHours": report.billable_gb_hours,
        "Samples": {"Sample": samples},
    })));
    Ok(fields)
}

fn delete_backup(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    // A registered instance, or a detached one (`DescribeDetachedBackups`).
    let instance_id = p.required("DBInstanceId")?;
    let ids: Vec<BackupId> = p
        .required("BackupId")?
        .split(',')
        .map(|s| BackupId::from(s.trim()))
        .filter(|s| !s.is_empty())
        .collect();
    if ids.is_empty() || ids.len() > 100 {
        return Err(ApiError::bad(
            "InvalidBackupId.Malformed",
            format!(
                "BackupId must list 1 to 100 backup set ids separated by commas, got {}",
                ids.len()
            ),
        ));
    }
    svc.delete_backups(instance_id, &ids)?;
    Ok(Map::new())
}

fn job_status_matches(filter: &str, state: JobState) -> bool {
    match filter {
        "Progressing" => matches!(
            state,
            JobState::Preparing | JobState::Waiting | JobState::Uploading | JobState::Checking
        ),
        other => state.as_str() == other,
    }
}

fn describe_backup_tasks(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let job_id = p.int("BackupJobId")?.map(JobId::new);
    let jobs: Vec<Job> = svc
        .jobs(Some(&inst.id))?
        .into_iter()
        .rev()
        .filter(|j| {
            matches!(
                j.kind,
                JobKind::Backup
                    | JobKind::SnapshotBackup
                    | JobKind::SnapshotUpload
                    | JobKind::Clone
                    | JobKind::RestoreTable
                    | JobKind::CrossCopy
                    | JobKind::DdrRestore
                    | JobKind::RecoverDatabases
                    | JobKind::CopyDatabases
            )
        })
        .filter(|j| job_id.is_none_or(|id| j.id == id))
        .filter(|j| {
            p.get("BackupJobStatus")
                .is_none_or(|s| job_status_matches(s, j.state))
        })
        .collect();
    if let (Some(id), true) = (job_id, jobs.is_empty()) {
        svc.job(id)?; // 404 for an unknown id
    }
    let mut items = Vec::new();
    for j in jobs {
        // Only backups take their mode from their set: other jobs cost no lookup.
        let mode = match (j.kind, j.backup_id.as_deref()) {
            (JobKind::Backup | JobKind::SnapshotBackup | JobKind::SnapshotUpload, Some(b)) => svc
                .backup_set(b)
                .map(|s| s.mode)
                .unwrap_or(BackupMode::Manual),
            _ => BackupMode::Manual,
        };
        let action = match j.kind {
            JobKind::Clone => "CloneDBInstance",
            JobKind::RestoreTable => "RestoreTable",
            JobKind::CrossCopy => "CrossRegionBackup",
            JobKind::DdrRestore => "CreateDdrInstance",
            JobKind::RecoverDatabases => "RecoveryDBInstance",
            JobKind::CopyDatabases => "CopyDatabaseBetweenInstances",
            JobKind::SnapshotUpload => "StrataSnapshotUpload",
            _ => "NormalBackupTask",
        };
        if p.get("BackupMode").is_some_and(|m| m != mode.as_str()) {
            continue;
        }
        let mut item = json!({
            "BackupJobId": j.id.to_string(),
            "BackupId": j.backup_id.clone().unwrap_or_default(),
            "BackupStatus": j.state.as_str(),
            "BackupProgressStatus": j.state.as_str(),
            "Process": format!("{}%", j.progress),
            "JobMode": mode,
            "TaskAction": action,
            "StrataStartTime": format_seconds(j.started_at),
            "StrataDetail": j.detail,
            "StrataNode": j.node_id.clone().unwrap_or_default(),
        });
        let m = item.as_object_mut().expect("object");
        if let Some(f) = j.finished_at {
            m.insert("StrataEndTime".into(), json!(format_seconds(f)));
        }
        if let Some(e) = &j.error {
            m.insert("StrataErrorMessage".into(), json!(e));
        }
        items.push(item);
        if items.len() == 100 {
            break;
        }
    }
    Ok(obj(json!({"Items": {"BackupJob": items}})))
}

/// A keep by hand as answers write it: `forever` or a UTC time.
fn keep_until_field(k: KeepUntil) -> String {
    match k {
        KeepUntil::Forever => "forever".into(),
        KeepUntil::Until(t) => format_seconds(t),
    }
}

/// A set's keep by hand as `StrataKeepBackup` and `StrataReleaseBackup`
/// answer it.
fn keep_fields(b: &BackupSet) -> Fields {
    obj(json!({
        "DBInstanceId": b.instance_id,
        "BackupId": b.id,
        "StrataKeepUntil": b.keep_until.map(keep_until_field).unwrap_or_default(),
        "StrataKeepNote": b.keep_note.clone().unwrap_or_default(),
    }))
}

fn keep_backup(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let backup_id = p.required("BackupId")?;
    let until = match p.get("KeepUntil") {
        None => KeepUntil::Forever,
        Some(v) => v.trim().parse::<KeepUntil>().map_err(|_| {
            ApiError::bad(
                "InvalidKeepUntil.Malformed",
                format!(
                    "KeepUntil must be forever or an RFC 3339 time, got {}",
                    quoted(v)
                ),
            )
        })?,
    };
    let note = p.get("Note").map(str::to_string);
    let set = svc.keep_backup(&inst.id, backup_id, until, note)?;
    Ok(keep_fields(&set))
}

fn release_backup(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let set = svc.release_backup(&inst.id, p.required("BackupId")?)?;
    Ok(keep_fields(&set))
}

/// `ModifyBackupSetExpireTime`: moves a set's expiry later (a keep by hand
/// until then, shown by `StrataKeepUntil`).
fn modify_backup_expiry(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let backup_id = p.required("BackupId")?;
    let until = p
        .time("ExpectExpireTime")?
        .ok_or_else(|| ApiError::missing("ExpectExpireTime"))?;
    let set = svc.extend_backup_expiry(&inst.id, backup_id, until)?;
    let data = json!({
        "DBInstanceId": set.instance_id,
        "BackupId": set.id,
        "ExpectExpireTime": format_seconds(until),
    });
    Ok(obj(json!({
        "Success": true,
        "Code": "Success",
        "Message": "",
        "Data": data.to_string(),
        "StrataKeepUntil": set.keep_until.map(keep_until_field).unwrap_or_default(),
    })))
}

/// The retention dry run: every set's fate now, what keeps it and until
/// when, and the WAL that would go.
async fn describe_retention(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let id = inst.id.clone();
    let decision = off_runtime(svc, move |svc| svc.retention_dry_run(&id)).await?;
    let items: Vec<Value> = decision
        .sets
        .iter()
        .map(|d| {
            json!({
                "BackupId": d.backup_id,
                "StrataAction": if d.delete { "Delete" } else { "Keep" },
                "StrataKeptBy": d.kept_by.to_string(),
                "ExpectExpireTime": d.expires_at.map(format_seconds).unwrap_or_default(),
            })
        })
        .collect();
    Ok(obj(json!({
        "DBInstanceId": inst.id,
        "Items": {"Backup": items},
        "StrataWalFilesToDelete": decision.wal.len(),
    })))
}

// ----- policy -----

fn policy_mode(p: &Params) -> ApiResult<&str> {
    match p.get("BackupPolicyMode").unwrap_or("DataBackupPolicy") {
        m @ ("DataBackupPolicy" | "LogBackupPolicy") => Ok(m),
        other => Err(ApiError::bad(
            "InvalidBackupPolicyMode.Malformed",
            format!(
                "BackupPolicyMode must be DataBackupPolicy or LogBackupPolicy, got {}",
                quoted(other)
            ),
        )),
    }
}

fn describe_backup_policy(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    policy_mode(p)?;
    let pol = svc.policy(&inst.id)?;
    let next = policy::next_backup_time(&pol, svc.now());
    Ok(obj(json!({
        "BackupRetentionPeriod": pol.backup_retention_days,
        "PreferredBackupPeriod": pol.backup_days.join(","),
        "PreferredBackupTime": pol.backup_window,
        "PreferredNextBackupTime": next.map(format_minutes).unwrap_or_default(),
        "BackupLog": if pol.log_backup_enabled { "Enable" } else { "Disabled" },
        "EnableBackupLog": if pol.log_backup_enabled { "1" } else { "0" },
        "LogBackupRetentionPeriod": pol.log_retention_days,
        "BackupMethod": pol.backup_method.as_str(),
        "Category": category(pol.backup_method),
        "BackupInterval": pol.backup_interval_minutes.map_or("-1".to_string(), |m| m.to_string()),
        "AdvancedBackupPolicyEnabled": pol.advanced_enabled,
        "AdvancedDataPolicies": advanced::describe_data(&pol),
        "AdvancedLogPolicies": advanced::describe_log(&pol),
        "ArchiveBackupRetentionPeriod": pol.archive_retention_days.to_string(),
        "ArchiveBackupKeepPolicy": pol.archive_keep_policy.as_str(),
        "ArchiveBackupKeepCount": pol.archive_keep_count.to_string(),
        "StrataKeepLastBackups": pol.keep_last.unwrap_or(0),
    })))
}

/// `BackupInterval`: minutes, or `-1` (or empty) for off, as RDS writes it.
fn backup_interval(p: &Params) -> ApiResult<Option<Option<u32>>> {
    let Some(v) = p.raw("BackupInterval").map(str::trim) else {
        return Ok(None);
    };
    if v.is_empty() || v == "-1" {
        return Ok(Some(None));
    }
    v.parse().map(|m| Some(Some(m))).map_err(|_| {
        ApiError::bad(
            "InvalidBackupInterval.Malformed",
            format!(
                "BackupInterval must be a number of minutes or -1 (off), got {}",
                quoted(v)
            ),
        )
    })
}

/// A whole number parameter that RDS error `code` refuses when malformed.
fn count(p: &Params, name: &str, code: &str) -> ApiResult<Option<u32>> {
    p.get(name)
        .map(|v| {
            v.trim().parse().map_err(|_| {
                ApiError::bad(
                    code,
                    format!("{name} must be a whole number, got {}", quoted(v)),
                )
            })
        })
        .transpose()
}

/// The retention options of `ModifyBackupPolicy` beyond the regular ones,
/// set on `change`.
fn retention_options(
    p: &Params,
    current: &BackupPolicy,
    change: &mut PolicyChange,
) -> ApiResult<()> {
    change.backup_interval_minutes = backup_interval(p)?;
    change.advanced_enabled = match p.int("EnableAdvancedBackupPolicy")? {
        None => None,
        Some(1) => Some(true),
        Some(0) => Some(false),
        Some(other) => {
            return Err(ApiError::bad(
                "InvalidEnableAdvancedBackupPolicy.Malformed",
                format!("EnableAdvancedBackupPolicy must be 1 or 0, got {other}"),
            ))
        }
    };
    let data = advanced::data_policies(p, current)?;
    if data.regular_days.is_some() && change.backup_days.is_some()
        || data.regular_retention.is_some() && change.backup_retention_days.is_some()
    {
        return Err(ApiError::bad(
            "InvalidParameterCombination",
            "the regular rule is given twice: in AdvancedDataPolicies (StrategyId regular) and in PreferredBackupPeriod or BackupRetentionPeriod",
        ));
    }
    change.backup_days = change.backup_days.take().or(data.regular_days);
    change.backup_retention_days = change
        .backup_retention_days
        .take()
        .or(data.regular_retention);
    change.advanced_data_rules = data.rules;
    let log = advanced::log_policies(p)?;
    change.advanced_log_retention_days = log.retention;
    if let Some(on) = log.enabled {
        if change.log_backup_enabled.is_some_and(|l| l != on) {
            return Err(ApiError::bad(
                "InvalidParameterCombination",
                "EnableBackupLog and AdvancedLogPolicies' EnableLogBackup disagree",
            ));
        }
        change.log_backup_enabled = Some(on);
    }
    const ARCHIVE: &str = "InvalidArchiveBackupPolicy.Malformed";
    change.archive_retention_days = count(p, "ArchiveBackupRetentionPeriod", ARCHIVE)?;
    change.archive_keep_policy = p
        .get("ArchiveBackupKeepPolicy")
        .map(|v| {
            v.trim().parse::<ArchiveKeepPolicy>().map_err(|_| {
                ApiError::bad(
                    ARCHIVE,
                    format!(
                        "ArchiveBackupKeepPolicy must be ByMonth, ByWeek or KeepAll, got {}",
                        quoted(v)
                    ),
                )
            })
        })
        .transpose()?;
    change.archive_keep_count = count(p, "ArchiveBackupKeepCount", ARCHIVE)?;
    change.keep_last = count(p, "StrataKeepLastBackups", "InvalidKeepLast.Malformed")?
        .map(|n| (n > 0).then_some(n));
    Ok(())
}

/// RDS's `Category` of a policy: `Flash` ("backup within seconds") is
/// snapshot backups.
fn category(method: BackupMethod) -> &'static str {
    match method {
        BackupMethod::Physical => "Standard",
        BackupMethod::Snapshot => "Flash",
    }
}

async fn modify_backup_policy(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    policy_mode(p)?;
    let by_category = match p.get("Category") {
        None => None,
        Some("Standard") => Some(BackupMethod::Physical),
        Some("Flash") => Some(BackupMethod::Snapshot),
        Some(other) => {
            return Err(ApiError::bad(
                "InvalidCategory.Malformed",
                format!("Category must be Standard or Flash, got {}", quoted(other)),
            ))
        }
    };
    let by_method = match p.get("BackupMethod") {
        None => None,
        Some("Physical") => Some(BackupMethod::Physical),
        Some("Snapshot") => Some(BackupMethod::Snapshot),
        Some(other) => {
            return Err(not_supported(
                "InvalidBackupMethod.NotSupported",
                format!(
                    "BackupMethod {} is not supported for PostgreSQL; use Physical or Snapshot.",
                    quoted(other)
                ),
            ))
        }
    };
    if let (Some(a), Some(b)) = (by_category, by_method) {
        if a != b {
            return Err(ApiError::bad(
                "InvalidParameterCombination",
                format!(
                    "Category {} and BackupMethod {} disagree: Flash is snapshot backups, Standard physical ones.",
                    category(a),
                    b.as_str()
                ),
            ));
        }
    }
    let log = match p.bool("EnableBackupLog")? {
        Some(v) => Some(v),
        None => p.bool("BackupLog")?,
    };
    let mut change = PolicyChange {
        backup_days: p.get("PreferredBackupPeriod").map(str::to_string),
        backup_window: p.get("PreferredBackupTime").map(str::to_string),
        backup_retention_days: p.get("BackupRetentionPeriod").map(str::to_string),
        log_backup_enabled: log,
        log_retention_days: p.get("LogBackupRetentionPeriod").map(str::to_string),
        backup_method: by_category.or(by_method),
        ..Default::default()
    };
    retention_options(p, &svc.policy(&inst.id)?, &mut change)?;
    let pol = svc.modify_policy(&inst.id, change).await?;
    Ok(obj(json!({
        "DBInstanceID": inst.id,
        "EnableBackupLog": if pol.log_backup_enabled { "1" } else { "0" },
        "StrataPreferredNextBackupTime": policy::next_backup_time(&pol, svc.now()).map(format_minutes).unwrap_or_default(),
    })))
}

// ----- log backups -----

fn describe_recovery_time(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let window = svc.recovery_window(&inst.id)?;
    Ok(obj(json!({
        "DBInstanceId": inst.id,
        "RecoveryBeginTime": window.map(|w| format_seconds(w.0)).unwrap_or_default(),
        "RecoveryEndTime": window.map(|w| format_seconds(w.1)).unwrap_or_default(),
    })))
}

/// `StrataDescribeRecoveryEvents`: what destroyed data and when, decoded
/// from the WAL, with the restore targets just before and just after each.
fn describe_recovery_events(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let (since, until) = p.period()?;
    let (number, size) = p.paging(&[30, 100], true)?;
    let mut kinds: Vec<String> = Vec::new();
    let asked = p.list("EventType", 100, "InvalidEventType.Malformed")?;
    for k in asked.unwrap_or_default() {
        let Some(known) = strata_engine::EVENT_KINDS
            .iter()
            .find(|known| known.eq_ignore_ascii_case(k))
        else {
            return Err(ApiError::bad(
                "InvalidEventType.Malformed",
                format!(
                    "EventType must be a comma-separated list of {}, got {}",
                    strata_engine::EVENT_KINDS.join(", "),
                    quoted(k)
                ),
            ));
        };
        if !kinds.iter().any(|have| have == known) {
            kinds.push(known.to_string());
        }
    }
    let filter = strata_engine::EventFilter {
        since,
        until,
        kinds,
        database: p.get("DBName").map(str::to_string),
        table: p.get("TableName").map(str::to_string),
    };
    let events = svc.recovery_events(&inst.id, &filter)?;
    let items: Vec<Value> = page(&events, number, size)
        .into_iter()
        .map(|e| recovery_event_fields(&e))
        .collect();
    Ok(obj(json!({
        "DBInstanceId": inst.id,
        "Items": {"RecoveryEvent": items},
        "PageNumber": number,
        "PageRecordCount": items.len(),
        "TotalRecordCount": events.len(),
    })))
}

fn recovery_event_fields(e: &strata_engine::RecoveryEvent) -> Value {
    // Each target is a set of parameters `RestoreTable` and
    // `CloneDBInstance` take as they are: recovery stops before the commit
    // record (not inclusive) or right after it (inclusive); an LSN target
    // at the record's start does the same.
    let xid_target = |xid: u32, inclusive: bool| {
        json!({
            "StrataRestoreTargetXid": xid.to_string(),
            "StrataRestoreTargetInclusive": inclusive.to_string(),
        })
    };
    let lsn_target = |lsn: Lsn, inclusive: bool| {
        json!({
            "StrataRestoreTargetLsn": lsn.to_string(),
            "StrataRestoreTargetInclusive": inclusive.to_string(),
        })
    };
    let targets = match (e.xid, e.before_lsn) {
        // A dropped database is gone before its commit: only a position
        // earlier in its transaction finds it intact.
        (Some(xid), Some(before)) => json!({
            "JustBefore": lsn_target(before, false),
            "JustAfter": xid_target(xid, true),
            "JustBeforeLsn": lsn_target(before, false),
            "JustAfterLsn": lsn_target(e.lsn, true),
        }),
        (Some(xid), None) => json!({
            "JustBefore": xid_target(xid, false),
            "JustAfter": xid_target(xid, true),
            "JustBeforeLsn": lsn_target(e.lsn, false),
            "JustAfterLsn": lsn_target(e.lsn, true),
        }),
        (None, _) => json!({"JustAfterLsn": lsn_target(e.lsn, true)}),
    };
    let mut m = json!({
        "EventType": e.kind,
        "EventTime": format_seconds(e.time),
        "StrataEventTime": e.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "Timeline": e.timeline.0,
        "Lsn": e.lsn.to_string(),
        "EndLsn": e.end_lsn.to_string(),
        "RestoreTargets": targets,
    });
    let fields = m.as_object_mut().expect("an object");
    let mut put = |k: &str, v: Value| {
        fields.insert(k.into(), v);
    };
    if let Some(x) = e.xid {
        put("Xid", json!(x.to_string()));
    }
    if let Some(d) = &e.database {
        put("DBName", json!(d));
    }
    if let Some(o) = e.db_oid {
        put("DBOid", json!(o));
    }
    if let Some(s) = &e.schema {
        put("SchemaName", json!(s));
    }
    if let Some(t) = &e.table {
        put("TableName", json!(t));
    }
    if let Some(f) = e.relfilenode {
        put("RelFileNode", json!(f));
    }
    if let Some(r) = e.rows {
        put("Rows", json!(r));
    }
    if let Some(n) = &e.name {
        put("RestorePointName", json!(n));
    }
    m
}

// ----- restores -----

fn restore_source(p: &Params) -> ApiResult<RestoreSource> {
    let restore_time = match p.get("RestoreTime") {
        Some(v) => Some(crate::params::parse_time(v).ok_or_else(|| {
            ApiError::bad(
                "InvalidRestoreTime.Format",
                format!(
                    "RestoreTime must be yyyy-MM-ddTHH:mm:ssZ (UTC), got {}",
                    quoted(v)
                ),
            )
        })?),
        None => None,
    };
    let backup_id = p.get("BackupId").map(BackupId::from);
    let exact = exact_target(p)?;
    if exact.is_some() && restore_time.is_some() {
        return Err(ApiError::bad(
            "InvalidParameterCombination",
            format!("RestoreTime and {TARGET_XID}/{TARGET_LSN} name two different points; give one of them."),
        ));
    }
    if backup_id.is_none() && restore_time.is_none() && exact.is_none() {
        return Err(ApiError::bad(
            "MissingParameter",
            format!("Specify BackupId, RestoreTime, {TARGET_XID} or {TARGET_LSN} (BackupId may go with any of the others)."),
        ));
    }
    Ok(RestoreSource {
        backup_id,
        restore_time,
        exact,
    })
}

/// Extension parameters of the restores: recover to a transaction or a WAL
/// position, just after it (the default, as PostgreSQL's
/// `recovery_target_inclusive`) or just before it.
const TARGET_XID: &str = "StrataRestoreTargetXid";
const TARGET_LSN: &str = "StrataRestoreTargetLsn";
const TARGET_INCLUSIVE: &str = "StrataRestoreTargetInclusive";

/// The transaction or WAL position a restore asks for, if any.
fn exact_target(p: &Params) -> ApiResult<Option<ExactTarget>> {
    let xid = p.get(TARGET_XID).map(parse_xid).transpose()?;
    let lsn = p
        .get(TARGET_LSN)
        .map(|v| {
            v.parse::<Lsn>().map_err(|_| {
                ApiError::bad(
                    "InvalidRestoreTargetLsn.Malformed",
                    format!(
                        "{TARGET_LSN} must be a WAL position written as two hexadecimal numbers of up to 8 digits, e.g. 0/3000028, got {}",
                        quoted(v)
                    ),
                )
            })
        })
        .transpose()?;
    let inclusive = p
        .get(TARGET_INCLUSIVE)
        .map(|v| match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(ApiError::bad(
                "InvalidRestoreTargetInclusive.Malformed",
                format!(
                    "{TARGET_INCLUSIVE} must be true (just after the target) or false (just before it), got {}",
                    quoted(v)
                ),
            )),
        })
        .transpose()?;
    let point = match (xid, lsn) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "InvalidParameterCombination",
                format!("{TARGET_XID} and {TARGET_LSN} name two different points; give one of them."),
            ))
        }
        (Some(x), None) => ExactPoint::Xid(x),
        (None, Some(l)) => ExactPoint::Lsn(l),
        (None, None) if inclusive.is_some() => {
            return Err(ApiError::bad(
                "MissingParameter",
                format!("{TARGET_INCLUSIVE} says on which side of {TARGET_XID} or {TARGET_LSN} to stop; give one of them."),
            ))
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(ExactTarget {
        point,
        inclusive: inclusive.unwrap_or(true),
    }))
}

/// A transaction id as PostgreSQL's `recovery_target_xid` takes it here:
/// decimal digits, 1 to 4294967295.
fn parse_xid(v: &str) -> ApiResult<u32> {
    v.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| v.parse::<u32>().ok())
        .flatten()
        .filter(|x| *x != 0)
        .ok_or_else(|| {
            ApiError::bad(
                "InvalidRestoreTargetXid.Malformed",
                format!(
                    "{TARGET_XID} must be a transaction id in decimal, 1 to 4294967295 (txid_current() modulo 2^32), got {}",
                    quoted(v)
                ),
            )
        })
}

async fn clone_instance(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    // A registered instance, or one deregistered since whose sets were
    // kept (`DescribeDetachedBackups`): the service tells them apart.
    let src = restore_source(p)?;
    // A set alone names its instance (a user backup's owner, one no
    // longer registered, or a registered one).
    let named = match (p.get("DBInstanceId"), &src.backup_id) {
        (Some(id), _) => id.to_string(),
        (None, Some(set)) if src.restore_time.is_none() => {
            svc.backup_set(set)?.instance_id.to_string()
        }
        (None, _) => return Err(ApiError::missing("DBInstanceId")),
    };
    let source = named.as_str();
    if strata_catalog::Instance::valid_id(source) {
        // Encrypted sets restore only while their KMS key is usable.
        encryption::check_instance_key(svc, source).await?;
    }
    // PayType, DBInstanceClass, VPCId… describe billing and networking
    // this service does not have; they are accepted and ignored.
    let id = svc.clone_instance(source, src)?;
    Ok(obj(json!({"DBInstanceId": id, "OrderId": ""})))
}

async fn delete_instance(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let keep = match p.get("ReleasedKeepPolicy") {
        None | Some("None") => ReleasedKeep::None,
        // RDS spells it `Lastest`.
        Some("Lastest" | "Latest") => ReleasedKeep::Latest,
        Some("All") => ReleasedKeep::All,
        Some(other) => {
            return Err(ApiError::bad(
                "InvalidReleasedKeepPolicy.Malformed",
                format!(
                    "ReleasedKeepPolicy must be None, Lastest or All, got {}",
                    quoted(other)
                ),
            ))
        }
    };
    svc.delete_instance(&inst.id, keep).await?;
    Ok(Map::new())
}

fn restore_table(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let src = restore_source(p)?;
    let specs = strata_service::parse_table_meta(p.required("TableMeta")?)?;
    let job = svc.restore_tables(&inst.id, src, specs)?;
    Ok(obj(json!({"StrataJobId": job.to_string()})))
}

/// `RecoveryDBInstance`: `DbNames` of a set (its instance implied) or of
/// `DBInstanceId` at `RestoreTime`, into `TargetDBInstanceId` or, without
/// one, into a new instance. The new instance's class, storage, network
/// and billing fields have no meaning here and are ignored.
fn recover_databases(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let src = restore_source(p)?;
    let source = match (p.get("DBInstanceId"), &src.backup_id) {
        (Some(_), _) => instance(svc, p)?.id,
        (None, Some(set)) if src.restore_time.is_none() => svc.backup_set(set)?.instance_id,
        (None, _) => return Err(ApiError::missing("DBInstanceId")),
    };
    let specs = strata_service::parse_db_names(p.required("DbNames")?)?;
    let target = match p.get("TargetDBInstanceId") {
        Some(id) => Some(svc.instance(id)?.id),
        None => None,
    };
    let (id, job) = svc.recover_databases(&source, target.as_deref(), src, specs)?;
    Ok(obj(json!({
        "DBInstanceId": id,
        "OrderId": "",
        "StrataJobId": job.to_string(),
    })))
}

/// `CopyDatabaseBetweenInstances`: `DbNames` of `DBInstanceId`'s backup set
/// or point in time into `TargetDBInstanceId`. Users and their privileges
/// are not copied (`SyncUserPrivilege=YES` is refused): objects belong to
/// the target's connecting user.
fn copy_databases(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let source = instance(svc, p)?;
    let target = svc.instance(p.required("TargetDBInstanceId")?)?;
    let src = restore_source(p)?;
    match p.get("SyncUserPrivilege").map(str::trim) {
        None => {}
        Some(v) if v.eq_ignore_ascii_case("NO") => {}
        Some(v) if v.eq_ignore_ascii_case("YES") => {
            return Err(not_supported(
                "InvalidSyncUserPrivilege.NotSupported",
                "SyncUserPrivilege=YES is not supported: the copied objects belong to the user Strata connects to the target as; create users and grant privileges there, or send NO.",
            ))
        }
        Some(v) => {
            return Err(ApiError::bad(
                "InvalidSyncUserPrivilege.Malformed",
                format!("SyncUserPrivilege must be YES or NO, got {}", quoted(v)),
            ))
        }
    }
    let specs = strata_service::parse_db_names(p.required("DbNames")?)?;
    let job = svc.copy_databases(&source.id, &target.id, src, specs)?;
    Ok(obj(json!({"StrataJobId": job.to_string()})))
}

/// Imports the `pg_basebackup -Ft` output directory `BackupFile` of the
/// configured import directory (a name, never a path) as a backup set.
async fn import_backup_file(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let name = p.required("BackupFile")?;
    let job = svc.import_backup_file(&inst.id, name).await?;
    Ok(obj(json!({
        "BackupJobId": job.id.to_string(),
        "BackupId": job.backup_id.as_deref().unwrap_or_default(),
    })))
}

fn start_drill(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    let id = p.required("BackupId")?;
    let set = svc.backup_set(id)?;
    if set.instance_id != inst.id {
        return Err(strata_catalog::CatalogError::BackupNotFound(id.to_string()).into());
    }
    let job = svc.request_drill(id)?;
    Ok(obj(json!({"StrataJobId": job.to_string()})))
}

// ----- instances -----

/// The WAL receiver of an instance in a word (`Off`, `Streaming`,
/// `Starting`) or `Failing: <the last error>` while it fails and retries
/// (`StrataWalReceiver`).
pub fn receiver_status(svc: &Service, instance_id: &str) -> ApiResult<String> {
    let (state, error) = receiver_state(svc, instance_id, svc.wal_state(instance_id)?)?;
    Ok(receiver_words(state, error))
}

fn receiver_words(state: &str, error: Option<String>) -> String {
    match error {
        Some(e) => format!("{state}: {e}"),
        None => state.to_string(),
    }
}

/// The receiver's state word and, when `Failing`, why, from `wal` (the
/// owner's state: see [`Service::wal_state`]).
fn receiver_state(
    svc: &Service,
    instance_id: &str,
    wal: strata_service::WalReceiverState,
) -> ApiResult<(&'static str, Option<String>)> {
    let pol = svc.policy(instance_id)?;
    Ok(if !pol.log_backup_enabled {
        ("Off", None)
    } else if let Some(e) = wal.failing.or(wal.last_error.filter(|_| !wal.running)) {
        ("Failing", Some(e))
    } else if wal.running && wal.last_message.is_some() {
        ("Streaming", None)
    } else {
        ("Starting", None)
    })
}

/// What an instance's `DBInstanceStatus` says, and since when and why its
/// server cannot be reached while it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceState {
    /// `Running`, `Unreachable`, or the state of an instance Strata
    /// creates (`Creating`, `Failed`…).
    pub status: String,
    /// Since when the server cannot be reached, and why.
    pub unreachable: Option<(chrono::DateTime<Utc>, String)>,
}

/// The state of instance `i` as every node answers it.
pub fn instance_state(svc: &Service, i: &Instance) -> ApiResult<InstanceState> {
    let wal = svc.wal_state(&i.id)?;
    let managed = svc.managed_instance(&i.id)?;
    state_of(svc, i, managed.as_ref(), &wal)
}

/// The state from what the WAL receiver found (`wal`, the owner's view):
/// a server it cannot reach is `Unreachable` whatever it was, unless Strata
/// is still creating it or it failed to (their own state says more).
fn state_of(
    svc: &Service,
    i: &Instance,
    managed: Option<&strata_catalog::ManagedInstance>,
    wal: &strata_service::WalReceiverState,
) -> ApiResult<InstanceState> {
    let status = managed.map_or("Running", |m| m.status.as_str());
    let unreachable = match (wal.unreachable_since, &wal.failing) {
        (Some(since), Some(why))
            if status == "Running" && svc.policy(&i.id)?.log_backup_enabled =>
        {
            Some((since, why.clone()))
        }
        _ => None,
    };
    Ok(InstanceState {
        status: if unreachable.is_some() {
            "Unreachable".into()
        } else {
            status.into()
        },
        unreachable,
    })
}

/// What every node answers about the fleet's instances: the node holding
/// each one's ownership lease and each one's WAL receiver state.
struct FleetView {
    owners: std::collections::BTreeMap<String, String>,
    receivers: std::collections::BTreeMap<String, strata_service::WalReceiverState>,
}

impl FleetView {
    fn read(svc: &Service) -> ApiResult<FleetView> {
        Ok(FleetView {
            owners: svc.instance_owners()?,
            receivers: svc.wal_states()?,
        })
    }
}

/// An instance's fields; `fleet.owners` gives `StrataNode` (empty while no
/// node holds the instance's lease).
fn instance_fields(svc: &Service, i: &Instance, fleet: &FleetView) -> ApiResult<Value> {
    let wal = fleet
        .receivers
        .get(i.id.as_str())
        .cloned()
        .unwrap_or_default();
    let managed = svc.managed_instance(&i.id)?;
    let state = state_of(svc, i, managed.as_ref(), &wal)?;
    let failing_since = wal.failing_since;
    let (receiver_word, receiver_error) = receiver_state(svc, &i.id, wal)?;
    let receiver = receiver_words(receiver_word, receiver_error.clone());
    let owners = &fleet.owners;
    let (unreachable_since, unreachable_reason) = state
        .unreachable
        .map(|(since, why)| (format_seconds(since), why))
        .unwrap_or_default();
    let last_backup = svc
        .backup_sets(&i.id)?
        .into_iter()
        .filter(|b| b.status == BackupStatus::Success)
        .filter_map(|b| b.finished_at)
        .max();
    Ok(json!({
        "DBInstanceId": i.id,
        "DBInstanceDescription": i.id,
        "Engine": "PostgreSQL",
        "EngineVersion": engine_version(i.pg_version_num),
        "DBInstanceStatus": state.status,
        "StrataUnreachableSince": unreachable_since,
        "StrataUnreachableReason": unreachable_reason,
        "DBInstanceType": "Primary",
        "StrataCreatedByStrata": managed.is_some(),
        "StrataSourceDBInstanceId": managed.as_ref().map(|m| m.source_instance.clone()).unwrap_or_default(),
        "StrataErrorMessage": managed.as_ref().and_then(|m| m.error.clone()).unwrap_or_default(),
        "StrataDataDirectory": managed.as_ref().map(|m| m.data_dir.clone()).unwrap_or_default(),
        "StrataAgentClone": managed.as_ref().and_then(|m| m.agent_clone.clone()).unwrap_or_default(),
        "ConnectionString": i.host,
        "Port": i.port.to_string(),
        "CreateTime": format_seconds(i.created_at),
        "CreationTime": format_seconds(i.created_at),
        "RegionId": svc.regions().primary,
        "StrataUser": i.user,
        "StrataDBName": i.dbname.clone().unwrap_or_default(),
        "StrataSSLMode": i.sslmode.as_str(),
        "StrataConnectionVerified": strata_engine::connection_verified(i),
        "StrataSystemIdentifier": i.system_identifier.map(|s| s.to_string()).unwrap_or_default(),
        "StrataWalReceiver": receiver,
        "StrataWalReceiverState": receiver_word,
        "StrataWalReceiverError": receiver_error.unwrap_or_default(),
        "StrataWalReceiverFailingSince": failing_since.map(format_seconds).unwrap_or_default(),
        "StrataLastBackupTime": last_backup.map(format_seconds).unwrap_or_default(),
        "StrataNode": owners.get(i.id.as_str()).cloned().unwrap_or_default(),
    }))
}

fn describe_instances(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let (number, size) = p.paging(&[30, 100], true)?;
    let wanted = p.list("DBInstanceId", 30, "InvalidDBInstanceId.Malformed")?;
    if p.get("Engine")
        .is_some_and(|e| !e.eq_ignore_ascii_case("PostgreSQL"))
    {
        return Ok(obj(
            json!({"Items": {"DBInstance": []}, "PageNumber": number, "PageRecordCount": 0, "TotalRecordCount": 0}),
        ));
    }
    let all: Vec<Instance> = svc
        .instances()?
        .into_iter()
        .filter(|i| wanted.as_ref().is_none_or(|w| w.contains(&i.id.as_str())))
        .collect();
    let fleet = FleetView::read(svc)?;
    let items = page(&all, number, size)
        .iter()
        .map(|i| instance_fields(svc, i, &fleet))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(obj(json!({
        "Items": {"DBInstance": items},
        "PageNumber": number,
        "PageRecordCount": items.len(),
        "TotalRecordCount": all.len(),
    })))
}

fn describe_instance_attribute(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let mut items = Vec::new();
    let fleet = FleetView::read(svc)?;
    p.required("DBInstanceId")?;
    let ids = p
        .list("DBInstanceId", 30, "InvalidDBInstanceId.Malformed")?
        .unwrap_or_default();
    for id in ids {
        let i = svc.instance(id)?;
        items.push(instance_fields(svc, &i, &fleet)?);
    }
    Ok(obj(json!({"Items": {"DBInstanceAttribute": items}})))
}

async fn register_instance(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let id = p.required("DBInstanceId")?;
    if !Instance::valid_id(id) {
        return Err(ApiError::bad(
            "InvalidDBInstanceId.Malformed",
            format!(
                "DBInstanceId {} may only use letters, digits, '-', '_' and '.' (at most 64)",
                quoted(id)
            ),
        ));
    }
    let port = match p.int("Port")? {
        None => 5432,
        Some(n) if (1..=65535).contains(&n) => n as u16,
        Some(n) => {
            return Err(ApiError::bad(
                "InvalidPort.Malformed",
                format!("Port must be 1 to 65535, got {n}"),
            ))
        }
    };
    let sslmode = p.get("SSLMode").unwrap_or("prefer");
    let sslmode: SslMode = sslmode.parse().map_err(|_| {
        ApiError::bad(
            "InvalidSSLMode.Malformed",
            format!(
                "SSLMode must be disable, allow, prefer, require, verify-ca or verify-full, got {}",
                quoted(sslmode)
            ),
        )
    })?;
    let instance = Instance {
        password: p.get("Password").map(str::to_string),
        dbname: p.get("DBName").map(str::to_string),
        sslrootcert: p.get("SSLRootCert").map(str::to_string),
        ..Instance::new(id, p.required("Host")?, port, p.required("User")?, sslmode)
    };
    let agent = match p.get("AgentUrl") {
        // An agent's key or certificate without its URL would register an
        // instance that cannot take the snapshots its caller meant it to.
        None if p.get("AgentKey").is_some() || p.get("AgentCaFile").is_some() => {
            return Err(ApiError::bad(
                "MissingParameter",
                "AgentKey and AgentCaFile go with AgentUrl, the agent's URL, which is not supplied.",
            ))
        }
        None => None,
        Some(url) => {
            let key = p.required("AgentKey")?;
            let key = strata_agent::AgentKey::from_hex(key).ok_or_else(|| {
                ApiError::bad(
                    "InvalidAgentKey.Malformed",
                    "AgentKey must be the 64 hex digits of the agent's key file",
                )
            })?;
            Some(strata_service::AgentAccess {
                url: url.to_string(),
                key,
                ca_file: p.get("AgentCaFile").map(str::to_string),
            })
        }
    };
    let registered = svc.register_instance(instance, agent).await?;
    Ok(obj(json!({
        "DBInstanceId": registered.id,
        "EngineVersion": engine_version(registered.pg_version_num),
        "StrataSystemIdentifier": registered.system_identifier.map(|s| s.to_string()).unwrap_or_default(),
        "StrataConnectionVerified": strata_engine::connection_verified(&registered),
        "StrataAgentUrl": registered.agent_url.clone().unwrap_or_default(),
        "Warnings": strata_engine::connection_warnings(&registered),
    })))
}

async fn deregister_instance(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = instance(svc, p)?;
    svc.deregister_instance(&inst.id).await?;
    Ok(obj(json!({"DBInstanceId": inst.id})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &[(&str, &str)]) -> Result<RestoreSource, String> {
        let p = Params::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        restore_source(&p).map_err(|e| e.code)
    }

    #[test]
    fn transaction_and_lsn_targets_and_their_refusals() {
        let exact = |pairs: &[(&str, &str)]| source(pairs).map(|s| s.exact);
        assert_eq!(
            exact(&[(TARGET_XID, "742")]),
            Ok(Some(ExactTarget {
                point: ExactPoint::Xid(742),
                inclusive: true
            }))
        );
        assert_eq!(
            exact(&[(TARGET_XID, "4294967295"), (TARGET_INCLUSIVE, "false")]),
            Ok(Some(ExactTarget {
                point: ExactPoint::Xid(u32::MAX),
                inclusive: false
            }))
        );
        assert_eq!(
            exact(&[(TARGET_LSN, "16/B374D848"), (TARGET_INCLUSIVE, "0")]),
            Ok(Some(ExactTarget {
                point: ExactPoint::Lsn(Lsn(0x16_B374_D848)),
                inclusive: false
            }))
        );
        assert_eq!(
            exact(&[("BackupId", "b1"), (TARGET_XID, "7")]).map(|e| e.is_some()),
            Ok(true)
        );
        let refused: &[(&[(&str, &str)], &str)] = &[
            (&[(TARGET_XID, "0")], "InvalidRestoreTargetXid.Malformed"),
            (
                &[(TARGET_XID, "4294967296")],
                "InvalidRestoreTargetXid.Malformed",
            ),
            (&[(TARGET_XID, "-1")], "InvalidRestoreTargetXid.Malformed"),
            (&[(TARGET_XID, "+1")], "InvalidRestoreTargetXid.Malformed"),
            (&[(TARGET_XID, " 7")], "InvalidRestoreTargetXid.Malformed"),
            (
                &[(TARGET_LSN, "3000000")],
                "InvalidRestoreTargetLsn.Malformed",
            ),
            (&[(TARGET_LSN, "0/1'")], "InvalidRestoreTargetLsn.Malformed"),
            (
                &[(TARGET_XID, "7"), (TARGET_INCLUSIVE, "yes please")],
                "InvalidRestoreTargetInclusive.Malformed",
            ),
            (
                &[(TARGET_XID, "7"), (TARGET_LSN, "0/1")],
                "InvalidParameterCombination",
            ),
            (
                &[(TARGET_XID, "7"), ("RestoreTime", "2026-11-25T10:00:00Z")],
                "InvalidParameterCombination",
            ),
            (
                &[(TARGET_LSN, "0/1"), ("RestoreTime", "2026-11-25T10:00:00Z")],
                "InvalidParameterCombination",
            ),
            (
                &[("BackupId", "b1"), (TARGET_INCLUSIVE, "false")],
                "MissingParameter",
            ),
            (&[], "MissingParameter"),
        ];
        for (pairs, code) in refused {
            assert_eq!(
                source(pairs).map(|_| ()),
                Err(code.to_string()),
                "{pairs:?}"
            );
        }
    }
}
