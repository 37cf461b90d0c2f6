//! User backups (RDS's `ImportUserBackupFile` family): a full backup a
//! user made elsewhere with `pg_basebackup -Ft` and placed in the import
//! directory, imported as a backup set that no registered instance owns.
//!
//! Each user backup gets an owner id of its own ([`Instance::owns_user_backup`]):
//! two uploads may come from different clusters, and a set's WAL is kept
//! per owner. The owner is never registered (no receiver, no policy); it
//! is recorded in the repository only, so the set restores as a detached
//! instance's does (`CloneDBInstance` with the `BackupId`). The comment is
//! the set's keep note; the retention keeps the set until the import time
//! plus that many days, after which the retention round deletes it.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use strata_catalog::{BackupSet, BackupStatus, CatalogError, Instance, Job, KeepUntil};
use strata_engine::{EngineError, NoProgress};

use crate::policy::{invalid, Refusal};
use crate::{Service, ServiceResult};

/// Longest comment kept (RDS's descriptions are at most 256 characters).
pub const MAX_COMMENT: usize = 256;
/// Longest retention, in days.
pub const MAX_RETENTION_DAYS: u32 = 3650;

/// What `ImportUserBackupFile` asks for besides the file.
#[derive(Debug, Clone, Default)]
pub struct UserBackupRequest {
    /// The comment (RDS's `Comment`).
    pub comment: Option<String>,
    /// Days to keep it (RDS's `Retention`); none: until deleted.
    pub retention_days: Option<u32>,
    /// The PostgreSQL major version the backup must be of.
    pub engine_major: Option<u32>,
}

/// A comment as kept: at most [`MAX_COMMENT`] characters, no control
/// characters; an empty one is none.
pub fn check_comment(comment: &str) -> ServiceResult<Option<String>> {
    if comment.chars().count() > MAX_COMMENT || comment.chars().any(char::is_control) {
        return Err(invalid(
            Refusal::CommentMalformed,
            format!("Comment must be at most {MAX_COMMENT} characters without control characters"),
        ));
    }
    Ok((!comment.is_empty()).then(|| comment.to_string()))
}

/// A retention in days: 1 to [`MAX_RETENTION_DAYS`].
pub fn parse_retention(text: &str) -> ServiceResult<u32> {
    text.parse::<u32>()
        .ok()
        .filter(|d| (1..=MAX_RETENTION_DAYS).contains(d))
        .ok_or_else(|| {
            invalid(
                Refusal::UserBackupRetentionMalformed,
                format!(
                    "Retention must be a whole number of days from 1 to {MAX_RETENTION_DAYS}, got {:?}",
                    text.chars().take(32).collect::<String>()
                ),
            )
        })
}

/// `EngineVersion` as a PostgreSQL major version: `15` or `15.0`.
pub fn parse_engine_version(text: &str) -> ServiceResult<u32> {
    let major = text.strip_suffix(".0").unwrap_or(text);
    major
        .parse::<u32>()
        .ok()
        .filter(|m| (10..=99).contains(m) && !major.starts_with('0'))
        .ok_or_else(|| {
            invalid(
                Refusal::EngineVersionMalformed,
                format!(
                    "EngineVersion must be a PostgreSQL major version such as 16 or 16.0, got {:?}",
                    text.chars().take(32).collect::<String>()
                ),
            )
        })
}

/// When a user backup was imported: its job's start (the set's own start
/// is the original backup's).
pub fn imported_at(set: &BackupSet, job: Option<&Job>) -> DateTime<Utc> {
    job.map(|j| j.started_at).unwrap_or(set.started_at)
}

/// The retention of a user backup in whole days, when it has one.
pub fn retention_days(set: &BackupSet, job: Option<&Job>) -> Option<i64> {
    match set.keep_until {
        Some(KeepUntil::Until(until)) => {
            let secs = (until - imported_at(set, job)).num_seconds();
            Some((secs + 43_200) / 86_400)
        }
        _ => None,
    }
}

fn not_found(id: &str) -> crate::ServiceError {
    invalid(
        Refusal::UserBackupNotFound,
        format!(
            "there is no user backup {:?}",
            id.chars().take(64).collect::<String>()
        ),
    )
}

impl Service {
    /// Imports the `pg_basebackup -Ft` output directory `name` of the
    /// import directory as a new user backup: checked now (a refusal
    /// records nothing), stored in the background; returns the job, which
    /// names the set.
    pub async fn import_user_backup(
        self: &Arc<Self>,
        name: &str,
        req: UserBackupRequest,
    ) -> ServiceResult<Job> {
        let dir = self.import_dir_of(name)?;
        let comment = match req.comment.as_deref() {
            Some(c) => check_comment(c)?,
            None => None,
        };
        let until = req
            .retention_days
            .map(|d| KeepUntil::Until(self.now() + Duration::days(i64::from(d))));
        let owner = self.new_user_backup_owner()?;
        let pending = self
            .engine
            .prepare_user_import(
                &owner,
                &dir,
                req.engine_major,
                (until, comment),
                &NoProgress,
            )
            .await?;
        Ok(self.spawn_import(pending))
    }

    /// An owner id no set and no repository record uses yet.
    fn new_user_backup_owner(&self) -> ServiceResult<String> {
        let stamp = self.now().format("%Y%m%d%H%M%S%3f").to_string();
        for n in 0..1000u32 {
            let id = match n {
                0 => format!("{}{stamp}", strata_catalog::USER_BACKUP_OWNER_PREFIX),
                n => format!("{}{stamp}-{n}", strata_catalog::USER_BACKUP_OWNER_PREFIX),
            };
            if self.engine.catalog().list_backups(&id)?.is_empty()
                && self.engine.recorded_instance(&id)?.is_none()
            {
                return Ok(id);
            }
        }
        Err(
            EngineError::Conflict("too many user backups imported at once; try again".into())
                .into(),
        )
    }

    /// Every user backup, oldest first.
    pub fn user_backups(&self) -> ServiceResult<Vec<BackupSet>> {
        Ok(self
            .engine
            .catalog()
            .list_detached_backups()?
            .into_iter()
            .filter(|b| Instance::owns_user_backup(&b.instance_id))
            .collect())
    }

    /// The user backup `id`; refused for any other set.
    pub fn user_backup(&self, id: &str) -> ServiceResult<BackupSet> {
        match self.engine.catalog().get_backup(id) {
            Ok(set) if Instance::owns_user_backup(&set.instance_id) => Ok(set),
            Ok(_) | Err(CatalogError::BackupNotFound(_)) => Err(not_found(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes a user backup's comment and retention (counted from its
    /// import); only an imported one, not one still importing or failed.
    pub fn update_user_backup(
        &self,
        id: &str,
        comment: Option<&str>,
        retention_days: Option<u32>,
    ) -> ServiceResult<BackupSet> {
        let mut set = self.user_backup(id)?;
        if set.status != BackupStatus::Success {
            return Err(invalid(
                Refusal::BackupSetNotSuccessful,
                format!(
                    "user backup {id} is {}: only an imported one can be changed",
                    set.status.as_str()
                ),
            ));
        }
        if let Some(c) = comment {
            set.keep_note = check_comment(c)?;
        }
        if let Some(days) = retention_days {
            let job = set
                .job_id
                .and_then(|j| self.engine.catalog().get_job(j).ok());
            let until = imported_at(&set, job.as_ref()) + Duration::days(i64::from(days));
            if until <= self.now() {
                return Err(invalid(
                    Refusal::UserBackupRetentionMalformed,
                    format!("user backup {id} would expire at once: a retention of {days} days from its import ended at {}", crate::policy::format_seconds(until)),
                ));
            }
            set.keep_until = Some(KeepUntil::Until(until));
        }
        self.engine.catalog().update_backup(&set)?;
        Ok(set)
    }

    /// Deletes a user backup, its WAL with it; garbage collection then
    /// reclaims the blocks no other set shares.
    pub fn delete_user_backup(&self, id: &str) -> ServiceResult<()> {
        let set = self.user_backup(id)?;
        if set.status == BackupStatus::Running {
            return Err(EngineError::Conflict(format!(
                "user backup {id} is still importing; wait for it to finish"
            ))
            .into());
        }
        // Its retention is the user's to end, by this call.
        self.engine
            .keep_backup_set(&set.instance_id, &set.id, None)?;
        self.engine.delete_backup_set(&set.id)?;
        self.delete_wal_beyond(&set.instance_id, &[])?;
        self.housekeeping.request_gc();
        Ok(())
    }

    /// Deletes the user backups whose retention ended by `now`.
    pub(crate) fn expire_user_backups(&self, now: DateTime<Utc>) -> ServiceResult<()> {
        for set in self.user_backups()? {
            let ended = matches!(set.keep_until, Some(KeepUntil::Until(t)) if t <= now);
            if ended && set.status != BackupStatus::Running {
                tracing::info!(backup = %set.id, "user backup retention ended: deleting it");
                self.delete_user_backup(&set.id)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_retentions_and_versions_are_checked() {
        assert_eq!(
            check_comment("nightly").unwrap().as_deref(),
            Some("nightly")
        );
        assert_eq!(check_comment("").unwrap(), None);
        assert!(check_comment("a\nb").is_err());
        assert!(check_comment(&"x".repeat(MAX_COMMENT + 1)).is_err());
        assert_eq!(parse_retention("7").unwrap(), 7);
        for bad in ["0", "-1", "3651", "7d", "", "1e3"] {
            assert!(parse_retention(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_engine_version("15").unwrap(), 15);
        assert_eq!(parse_engine_version("16.0").unwrap(), 16);
        for bad in ["", "9.6", "015", "15.1", "x", "100"] {
            assert!(parse_engine_version(bad).is_err(), "{bad}");
        }
    }
}
