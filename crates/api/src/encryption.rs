//! Per-instance backup encryption with a key management service:
//! `EnableBackupEncryption`, `DescribeDBInstanceEncryptionKey`,
//! `CheckRegionSupportBackupEncryption`, `CheckBackupEncryptionAuthorized`,
//! `AuthorizeBackupEncryption`, and `StrataRotateBackupEncryptionKey`. The
//! key domains behind them are described in docs/REPOSITORY.md ("Instance key
//! domains").

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Map, Value};
use strata_engine::strata_kms::{self, KeyMetadata};
use strata_engine::EngineError;
use strata_service::Service;

use crate::error::{quoted, ApiError, ApiResult};
use crate::params::Params;

type Fields = Map<String, Value>;

fn obj(v: Value) -> Fields {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// 400 when this server has no `[kms]` settings.
fn require_kms(svc: &Service) -> ApiResult<()> {
    match svc.engine().kms() {
        Some(_) => Ok(()),
        None => Err(ApiError::bad(
            "Strata.KmsNotConfigured",
            "Backup encryption needs a key management service: set the [kms] endpoint and credentials in Strata's configuration.",
        )),
    }
}

/// The `EncryptionKey` parameter, checked (a KMS key id, ARN or alias).
fn encryption_key(p: &Params, required: bool) -> ApiResult<Option<&str>> {
    let key = match p.get("EncryptionKey") {
        None | Some("") if required => return Err(ApiError::missing("EncryptionKey")),
        None | Some("") => return Ok(None),
        Some(k) => k,
    };
    if !strata_kms::valid_key_id(key) {
        return Err(ApiError::bad(
            "InvalidEncryptionKey.Malformed",
            format!(
                "EncryptionKey {} is not a KMS key id, ARN or alias (1 to 2048 characters of letters, digits and : / _ - .).",
                quoted(key)
            ),
        ));
    }
    Ok(Some(key))
}

/// Refuses, with the KMS's reason as an RDS-style code, work on an
/// instance whose encrypted backups' key cannot be unwrapped now.
pub(crate) async fn check_instance_key(svc: &Service, instance_id: &str) -> ApiResult<()> {
    svc.engine().instance_repo(instance_id).await?;
    Ok(())
}

pub(crate) async fn enable(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let id = p.required("DBInstanceName")?;
    let instance = svc.instance(id)?;
    require_kms(svc)?;
    let key = encryption_key(p, true)?.unwrap_or_default();
    let record = svc.enable_backup_encryption(&instance.id, key).await?;
    Ok(obj(json!({
        "DBInstanceId": instance.id,
        "EncryptionKey": record.kms_key_id,
    })))
}

pub(crate) async fn rotate(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let instance = svc.instance(p.required("DBInstanceId")?)?;
    require_kms(svc)?;
    let to = encryption_key(p, false)?;
    let record = svc.rotate_backup_encryption(&instance.id, to).await?;
    Ok(obj(json!({
        "DBInstanceId": instance.id,
        "EncryptionKey": record.kms_key_id,
        "StrataKeyVersion": record.key_version,
    })))
}

fn time(secs: Option<f64>) -> String {
    secs.and_then(strata_kms::epoch_time)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn key_fields(key_id: &str, meta: &KeyMetadata) -> Value {
    let status = if meta.enabled { "Enabled" } else { "Disabled" };
    json!({
        "EncryptionKey": meta.arn.clone().unwrap_or_else(|| key_id.to_string()),
        "EncryptionKeyStatus": status,
        "KeyUsage": meta.key_usage.clone().unwrap_or_default(),
        "Creator": meta.aws_account_id.clone().unwrap_or_default(),
        "DeleteDate": time(meta.deletion_date),
        "Description": meta.description.clone().unwrap_or_default(),
        "MaterialExpireTime": time(meta.valid_to),
        "Origin": meta.origin.clone().unwrap_or_default(),
        "KeyType": "CMK",
        "UsedBy": "BackupEncryption",
        "StrataKeyState": meta.key_state.clone().unwrap_or_default(),
    })
}

pub(crate) async fn describe(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    let instance = svc.instance(p.required("DBInstanceId")?)?;
    require_kms(svc)?;
    let asked = encryption_key(p, false)?;
    let Some(enc) = svc.backup_encryption(&instance.id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "InvalidEncryptionKey.NotFound",
            format!(
                "Backups of instance {} are not encrypted with a KMS key.",
                quoted(&instance.id)
            ),
        ));
    };
    let record = &enc.record;
    if let Some(a) = asked {
        if a != record.kms_key_id && !record.kms_key_id.ends_with(&format!("/{a}")) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidEncryptionKey.NotFound",
                format!(
                    "EncryptionKey {} is not the key of instance {}.",
                    quoted(a),
                    quoted(&instance.id)
                ),
            ));
        }
    }
    let mut fields = match &enc.key {
        Ok(meta) => key_fields(&record.kms_key_id, meta),
        // A deleted key or one Strata may no longer describe.
        Err(e) => json!({
            "EncryptionKey": record.kms_key_id,
            "EncryptionKeyStatus": "Disabled",
            "KeyType": "CMK",
            "UsedBy": "BackupEncryption",
            "StrataKeyState": e,
        }),
    };
    let extra = json!({
        "StrataKeyVersion": record.key_version,
        "StrataKeyDomain": record.key_domain.to_string(),
        "StrataKeyCreateTime": record.created_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "StrataKeyRotateTime": record.rotated_at.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default(),
    });
    let mut list_item = fields.clone();
    if let (Value::Object(f), Value::Object(e)) = (&mut fields, extra) {
        f.extend(e);
    }
    if let Value::Object(item) = &mut list_item {
        item.insert("AliasName".into(), Value::String(String::new()));
    }
    let mut out = obj(fields);
    // The SDK's model reads the list as a plain array.
    out.insert("EncryptionKeyList".into(), json!([list_item]));
    Ok(out)
}

pub(crate) fn check_region_support(svc: &Arc<Service>, p: &Params) -> ApiResult<Fields> {
    if let Some(id) = p.get("DBInstanceID").filter(|s| !s.is_empty()) {
        svc.instance(id)?;
    }
    Ok(obj(json!({
        "SupportBackupEncryption": svc.engine().kms().is_some(),
    })))
}

/// Whether the KMS accepts Strata's credentials: (state, message).
async fn authorized(svc: &Service) -> ApiResult<(bool, String)> {
    require_kms(svc)?;
    let kms = svc.engine().kms().expect("checked above");
    match kms.check_credentials().await {
        Ok(()) => Ok((true, String::new())),
        Err(strata_kms::KmsError::AccessDenied(m)) => Ok((false, m)),
        Err(e) => Err(EngineError::Kms(e).into()),
    }
}

pub(crate) async fn check_authorized(svc: &Arc<Service>, _p: &Params) -> ApiResult<Fields> {
    let (ok, _) = authorized(svc).await?;
    Ok(obj(json!({
        "AuthorizationState": if ok { "1" } else { "0" },
        "RoleARN": "",
    })))
}

pub(crate) async fn authorize(svc: &Arc<Service>, _p: &Params) -> ApiResult<Fields> {
    // Strata cannot grant itself access: access is its configured
    // credentials' policy at the KMS. It checks them and says so.
    let (ok, why) = authorized(svc).await?;
    let message = if ok {
        "Strata's KMS credentials are accepted.".to_string()
    } else {
        format!("The KMS refuses Strata's credentials ({why}): grant them kms:GenerateDataKey, kms:Decrypt, kms:ReEncrypt* and kms:DescribeKey on the keys to use.")
    };
    Ok(obj(json!({
        "AuthorizationState": if ok { 1 } else { 0 },
        "RoleARN": "",
        "Message": message,
    })))
}
