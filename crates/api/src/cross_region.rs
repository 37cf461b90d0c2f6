//! Cross-region backup actions: the policy and the instances that have one,
//! the copies and their WAL, the regions copies may go to, the window a copy
//! recovers, and restoring a new instance from the copies
//! (`CreateDdrInstance`, checked beforehand by `CheckCreateDdrDBInstance`). Field names as the SDK
//! models them; `CrossBackupId` and `CrossLogBackupId` are integers there.

use std::sync::Arc;

use axum::http::StatusCode;
use chrono::Utc;
use serde_json::{json, Map, Value};
use strata_catalog::{CrossBackup, CrossBackupPolicy, Instance};
use strata_service::policy::format_seconds;
use strata_service::{CopyChoice, CrossPolicyChange, Service};

use crate::error::{quoted, ApiError, ApiResult};
use crate::log_files::{log_times, overlaps};
use crate::params::{page, Params};

type Fields = Map<String, Value>;

pub(crate) fn obj(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn enable(on: bool) -> &'static str {
    if on {
        "Enable"
    } else {
        "Disable"
    }
}

fn policy_fields(svc: &Service, instance_id: &str, pol: Option<&CrossBackupPolicy>) -> Value {
    json!({
        "DBInstanceId": instance_id,
        "RegionId": svc.regions().primary,
        "CrossBackupRegion": pol.map(|p| p.region.clone()).unwrap_or_default(),
        "CrossBackupType": "1",
        "BackupEnabled": enable(pol.is_some_and(|p| p.backup_enabled)),
        "LogBackupEnabled": enable(pol.is_some_and(|p| p.log_backup_enabled)),
        "RetentType": 1,
        "Retention": pol.map(|p| p.retention_days).unwrap_or(7),
    })
}

pub fn modify_policy(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    if let Some(t) = p.get("CrossBackupType").filter(|t| *t != "1") {
        return Err(ApiError::bad(
            "InvalidCrossBackupType.Malformed",
            format!(
                "CrossBackupType must be 1 (every backup is copied), got {}",
                quoted(t)
            ),
        ));
    }
    if let Some(t) = p.int("RetentType")?.filter(|t| *t != 1) {
        return Err(ApiError::bad(
            "InvalidRetentType.Malformed",
            format!("RetentType must be 1 (kept for Retention days), got {t}"),
        ));
    }
    let change = CrossPolicyChange {
        region: p.get("CrossBackupRegion").map(str::to_string),
        backup_enabled: p.bool("BackupEnabled")?,
        log_backup_enabled: p.bool("LogBackupEnabled")?,
        retention_days: p.int("Retention")?,
    };
    let pol = svc.modify_cross_policy(&inst.id, change)?;
    Ok(obj(policy_fields(svc, &inst.id, Some(&pol))))
}

pub fn describe_policy(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    let pol = svc.cross_policy(&inst.id)?;
    Ok(instance_policy_fields(svc, &inst, pol.as_ref()))
}

/// An instance's cross-region backup settings with the instance's own
/// fields, as `DescribeInstanceCrossBackupPolicy` and
/// `DescribeCrossRegionBackupDBInstance` answer them.
fn instance_policy_fields(
    svc: &Service,
    inst: &Instance,
    pol: Option<&CrossBackupPolicy>,
) -> Fields {
    let mut fields = obj(policy_fields(svc, &inst.id, pol));
    let at = |t: Option<chrono::DateTime<Utc>>, on: bool| {
        t.filter(|_| on).map(format_seconds).unwrap_or_default()
    };
    fields.extend(obj(json!({
        "BackupEnabledTime": at(pol.as_ref().and_then(|p| p.backup_enabled_at), pol.as_ref().is_some_and(|p| p.backup_enabled)),
        "LogBackupEnabledTime": at(pol.as_ref().and_then(|p| p.log_backup_enabled_at), pol.as_ref().is_some_and(|p| p.log_backup_enabled)),
        "DBInstanceDescription": inst.id,
        "DBInstanceStatus": "Running",
        "Engine": "PostgreSQL",
        "EngineVersion": inst.pg_version_num.map(|v| (v / 10000).to_string()).unwrap_or_default(),
        "LockMode": "Unlock",
    })));
    fields
}

/// `DescribeCrossRegionBackupDBInstance`: the instances whose backups or
/// log backups are copied to another region, in this server's region
/// (`RegionId`), optionally only those of `DBInstanceId` (up to 30, comma
/// separated).
pub fn describe_instances(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let region = p.required("RegionId")?;
    if region != svc.regions().primary {
        return Err(ApiError::bad(
            "InvalidRegionId.NotFound",
            format!(
                "RegionId {} is not this server's region ({})",
                quoted(region),
                svc.regions().primary
            ),
        ));
    }
    let wanted = p.list("DBInstanceId", 30, "InvalidDBInstanceId.Malformed")?;
    let (number, size) = p.paging(&[30, 100], true)?;
    let mut copied = Vec::new();
    for inst in svc.instances()? {
        if wanted
            .as_ref()
            .is_some_and(|w| !w.contains(&inst.id.as_str()))
        {
            continue;
        }
        let pol = svc
            .cross_policy(&inst.id)?
            .filter(|p| p.backup_enabled || p.log_backup_enabled);
        if let Some(pol) = pol {
            copied.push((inst, pol));
        }
    }
    let items: Vec<Fields> = page(&copied, number, size)
        .iter()
        .map(|(inst, pol)| instance_policy_fields(svc, inst, Some(pol)))
        .collect();
    Ok(obj(json!({
        "RegionId": svc.regions().primary,
        "Items": {"Item": items},
        "ItemsNumbers": items.len(),
        "PageNumber": number,
        "PageSize": size,
        "TotalRecords": copied.len(),
    })))
}

pub fn describe_available_regions(svc: &Arc<Service>, _p: &Params) -> ApiResult<Fields> {
    Ok(obj(
        json!({"Regions": {"Region": svc.regions().available()}}),
    ))
}

fn copy_fields(svc: &Service, c: &CrossBackup) -> Value {
    let set = &c.set;
    let major = set
        .pg_version_num
        .map(|v| (v / 10000).to_string())
        .unwrap_or_default();
    json!({
        "CrossBackupId": c.id,
        "CrossBackupRegion": c.region,
        "BackupStartTime": format_seconds(set.started_at),
        "BackupEndTime": set.finished_at.map(format_seconds).unwrap_or_default(),
        "ConsistentTime": set.finished_at.map(format_seconds).unwrap_or_default(),
        "BackupMethod": "Physical",
        "BackupType": "FullBackup",
        "BackupSetStatus": 0,
        "BackupSetScale": 0,
        "Category": "Standard",
        "CrossBackupSetSize": set.total_bytes,
        "CrossBackupSetFile": format!("{}.manifest", set.id),
        "CrossBackupSetLocation": "Strata",
        "CrossBackupDownloadLink": "",
        "DBInstanceStorageType": "local_ssd",
        "Engine": "PostgreSQL",
        "EngineVersion": major,
        "RestoreRegions": {"RestoreRegion": [c.region.clone()]},
        "StrataBackupId": set.id,
        "StrataCopiedBytes": c.copied_bytes,
        "StrataCopyTime": format_seconds(c.copied_at),
        "StrataSourceRegion": svc.regions().primary,
    })
}

pub fn describe_backups(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    let start = p.time("StartTime")?;
    let end = p.time("EndTime")?;
    let cross_id = p.int("CrossBackupId")?;
    let backup_id = p.get("BackupId");
    let region = p.get("CrossBackupRegion");
    let (number, size) = p.paging(&[30, 50, 100], false)?;
    let mut copies: Vec<CrossBackup> = svc
        .cross_backups(&inst.id)?
        .into_iter()
        .filter(|c| cross_id.is_none_or(|id| c.id == id))
        .filter(|c| backup_id.is_none_or(|b| c.set.id == b))
        .filter(|c| region.is_none_or(|r| c.region == r))
        .filter(|c| start.is_none_or(|s| c.set.started_at >= s))
        .filter(|c| end.is_none_or(|e| c.set.started_at <= e))
        .collect();
    copies.reverse();
    let items: Vec<Value> = page(&copies, number, size)
        .iter()
        .map(|c| copy_fields(svc, c))
        .collect();
    Ok(obj(json!({
        "RegionId": svc.regions().primary,
        "StartTime": start.map(format_seconds).unwrap_or_default(),
        "EndTime": end.map(format_seconds).unwrap_or_default(),
        "Items": {"Item": items},
        "PageNumber": number,
        "PageRecordCount": items.len(),
        "TotalRecordCount": copies.len(),
    })))
}

pub fn describe_log_files(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let inst = svc.instance(p.required("DBInstanceId")?)?;
    let (start, end) = p.required_period()?;
    let region = p.get("CrossBackupRegion");
    let (number, size) = p.paging(&[30, 50, 100], false)?;
    let files: Vec<_> = svc
        .cross_wal(&inst.id)?
        .into_iter()
        .filter(|w| region.is_none_or(|r| w.region == r))
        .filter(|w| overlaps(&w.row, start, end))
        .collect();
    let items: Vec<Value> = page(&files, number, size)
        .iter()
        .map(|w| {
            let (begin, finish) = log_times(&w.row);
            json!({
                "CrossLogBackupId": w.id,
                "CrossBackupRegion": w.region,
                "CrossLogBackupSize": w.row.size,
                "LogFileName": w.row.segment,
                "LogBeginTime": format_seconds(begin),
                "LogEndTime": format_seconds(finish),
                "CrossDownloadLink": "",
                "CrossIntranetDownloadLink": "",
                "LinkExpiredTime": "",
                "StrataTimeline": w.row.timeline.0,
                "StrataBeginLsn": w.row.begin_lsn.to_string(),
                "StrataEndLsn": w.row.end_lsn.to_string(),
                "StrataChecksum": w.row.checksum,
                "StrataCopyTime": format_seconds(w.copied_at),
            })
        })
        .collect();
    Ok(obj(json!({
        "DBInstanceId": inst.id,
        "RegionId": svc.regions().primary,
        "StartTime": format_seconds(start),
        "EndTime": format_seconds(end),
        "Items": {"Item": items},
        "PageNumber": number,
        "PageRecordCount": items.len(),
        "TotalRecordCount": files.len(),
    })))
}

fn find_copy(svc: &Service, instance_id: Option<&str>, id: i64) -> ApiResult<CrossBackup> {
    let instances = match instance_id {
        Some(i) => vec![svc.instance(i)?.id],
        None => svc.instances()?.into_iter().map(|i| i.id).collect(),
    };
    for i in instances {
        if let Some(c) = svc.cross_backups(&i)?.into_iter().find(|c| c.id == id) {
            return Ok(c);
        }
    }
    Err(ApiError::bad(
        "InvalidCrossBackupId.NotFound",
        format!("no cross-region backup {id}"),
    ))
}

pub fn describe_recovery_time(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let id = p
        .int("CrossBackupId")?
        .ok_or_else(|| ApiError::missing("CrossBackupId"))?;
    let copy = find_copy(svc, p.get("DBInstanceId"), id)?;
    let window = svc.cross_recovery_window(&copy)?;
    // Without copied WAL a copy still restores to its consistency point.
    let consistent = copy.set.finished_at.map(format_seconds).unwrap_or_default();
    Ok(obj(json!({
        "CrossBackupId": copy.id,
        "RegionId": svc.regions().primary,
        "RecoveryBeginTime": window.map(|w| format_seconds(w.0)).unwrap_or_else(|| consistent.clone()),
        "RecoveryEndTime": window.map(|w| format_seconds(w.1)).unwrap_or(consistent),
    })))
}

/// `CheckCreateDdrDBInstance`: whether `CreateDdrInstance` with the same
/// source (a copied set, `RestoreType` 0, or a point in time, 1) would
/// start. `IsValid` is `false` when the copies cannot give it, with the
/// reason in `StrataReason`; a malformed request is refused as
/// `CreateDdrInstance` refuses it.
pub fn check_ddr_instance(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let restore_type = match p.required("RestoreType")? {
        "0" | "BackupSet" => "BackupSet",
        "1" | "BackupTime" => "BackupTime",
        other => {
            return Err(ApiError::bad(
                "InvalidRestoreType.Malformed",
                format!(
                    "RestoreType must be 0 (a backup set) or 1 (a point in time), got {}",
                    quoted(other)
                ),
            ))
        }
    };
    let ddr = match ddr_source(svc, p, restore_type) {
        Ok(ddr) => ddr,
        // Well-formed, but naming a copy that is not there.
        Err(e) if e.code == "InvalidBackupSetID.NotFound" => {
            return Ok(check_answer(Some(e.message)))
        }
        Err(e) => return Err(e),
    };
    // `10.0`…`15.0` as RDS writes them, or a bare major version.
    let wanted_major = match p.get("EngineVersion") {
        None => None,
        Some(v) => Some(
            v.trim()
                .strip_suffix(".0")
                .unwrap_or(v.trim())
                .parse::<u32>()
                .map_err(|_| {
                    ApiError::bad(
                        "InvalidEngineVersion.Malformed",
                        format!(
                            "EngineVersion must be a PostgreSQL major version such as 15.0, got {}",
                            quoted(v)
                        ),
                    )
                })?,
        ),
    };
    let why_not =
        match svc.check_restore_from_copies(&ddr.source, ddr.region.as_deref(), ddr.choice) {
            Ok(major) if wanted_major.is_some_and(|w| w != major) => Some(format!(
                "InvalidEngineVersion: the copies are of PostgreSQL {major}, not {}",
                wanted_major.unwrap_or_default()
            )),
            Ok(_) => None,
            Err(e) => {
                let e = ApiError::from(e);
                // An unknown source instance is a bad request, not an answer.
                if e.status.is_server_error() || e.status == StatusCode::NOT_FOUND {
                    return Err(e);
                }
                Some(format!("{}: {}", e.code, e.message))
            }
        };
    Ok(check_answer(why_not))
}

fn check_answer(why_not: Option<String>) -> Fields {
    obj(json!({
        "IsValid": why_not.is_none().to_string(),
        "StrataReason": why_not.unwrap_or_default(),
    }))
}

/// What a restore from copies starts from, as `CreateDdrInstance` and
/// `CheckCreateDdrDBInstance` name it.
struct DdrSource {
    source: strata_catalog::InstanceId,
    region: Option<String>,
    choice: CopyChoice,
}

/// The source of a restore from copies, `restore_type` `BackupSet` or
/// `BackupTime`.
fn ddr_source(svc: &Service, p: &Params, restore_type: &str) -> ApiResult<DdrSource> {
    if let Some(engine) = p
        .get("Engine")
        .filter(|e| !e.eq_ignore_ascii_case("PostgreSQL"))
    {
        return Err(ApiError::bad(
            "InvalidEngine.Malformed",
            format!("Engine must be PostgreSQL, got {}", quoted(engine)),
        ));
    }
    // Billing, class, storage and network parameters describe resources
    // this service does not have; they are accepted and ignored.
    let (source, region, choice) = match restore_type {
        "BackupSet" => {
            let id = cross_backup_id(p)?;
            let copy = find_copy(svc, p.get("SourceDBInstanceName"), id).map_err(|_| {
                ApiError::bad(
                    "InvalidBackupSetID.NotFound",
                    format!("no cross-region backup {id}"),
                )
            })?;
            (
                copy.set.instance_id.clone(),
                p.get("BackupSetRegion").map(str::to_string),
                CopyChoice::BackupSet(id),
            )
        }
        "BackupTime" => {
            let source = p.required("SourceDBInstanceName")?;
            let source_region = p.required("SourceRegion")?;
            if source_region != svc.regions().primary {
                return Err(ApiError::bad(
                    "InvalidSourceRegion.NotFound",
                    format!(
                        "SourceRegion {} is not this server's region ({})",
                        quoted(source_region),
                        svc.regions().primary
                    ),
                ));
            }
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
            // RegionId names the region the new instance is created in:
            // the copies there are what it restores from.
            let region = p
                .get("RegionId")
                .filter(|r| *r != svc.regions().primary)
                .map(str::to_string);
            (source.into(), region, CopyChoice::Time(t))
        }
        other => {
            return Err(ApiError::bad(
                "InvalidRestoreType.Malformed",
                format!(
                    "RestoreType must be BackupSet or BackupTime, got {}",
                    quoted(other)
                ),
            ))
        }
    };
    Ok(DdrSource {
        source,
        region,
        choice,
    })
}

pub fn create_ddr_instance(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let ddr = ddr_source(svc, p, p.required("RestoreType")?)?;
    let (id, port) = svc.restore_from_copies(&ddr.source, ddr.region.as_deref(), ddr.choice)?;
    Ok(obj(json!({
        "DBInstanceId": id,
        "ConnectionString": "127.0.0.1",
        "Port": port.to_string(),
        "OrderId": "",
    })))
}

/// `DescribeCrossBackupMetaList`: the databases, or one database's tables,
/// of a cross-region copy (`BackupSetId` is its `CrossBackupId`), read
/// from the copy's own region.
pub async fn describe_meta_list(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let query = crate::meta::MetaQuery::from_params(p)?;
    let id = cross_backup_id(p)?;
    let not_found =
        |why: String| ApiError::new(StatusCode::NOT_FOUND, "InvalidBackupSetID.NotFound", why);
    let copy =
        find_copy(svc, None, id).map_err(|_| not_found(format!("no cross-region backup {id}")))?;
    if let Some(region) = p.get("Region").filter(|r| *r != copy.region) {
        return Err(not_found(format!(
            "cross-region backup {id} is in region {}, not {}",
            copy.region,
            quoted(region)
        )));
    }
    let found = crate::actions::off_runtime(svc, move |svc| svc.copy_contents(&copy)).await?;
    let mut fields = crate::meta::meta_fields(&found, &query)?;
    fields.insert("StrataCrossBackupId".into(), json!(id));
    Ok(fields)
}

/// `BackupSetId` naming a cross-region copy (its `CrossBackupId`).
fn cross_backup_id(p: &Params) -> ApiResult<i64> {
    let raw = p.required("BackupSetId")?;
    raw.trim().parse().map_err(|_| {
        ApiError::bad(
            "InvalidBackupSetID.Malformed",
            format!(
                "BackupSetId must be a cross-region backup id (an integer), got {}",
                quoted(raw)
            ),
        )
    })
}
