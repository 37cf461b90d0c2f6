//! Retention: which backup sets and WAL segments an instance's policy lets
//! go, deleting them, and the lock that keeps garbage collection away from
//! running backups.
//!
//! The rules, in order of precedence:
//! - the newest successful backup set is never deleted (or nothing could be
//!   restored);
//! - with log backup on, the oldest recoverable point (now minus the log
//!   retention) needs the newest set finished before it — its "anchor" — and
//!   every WAL segment after the anchor's start, so both stay;
//! - every kept set keeps the WAL between its start and stop LSN, without
//!   which it cannot reach consistency (with log backup off too);
//! - everything else older than its retention period goes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use chrono::{DateTime, Duration, Utc};
use pg_wal::Lsn;
use serde::Serialize;
use strata_catalog::{BackupPolicy, BackupSet, BackupStatus, WalSegmentRow};
use strata_repo::GcReport;

use crate::{Engine, EngineError, EngineResult};

/// Held while a backup writes packs (shared) or while garbage is collected
/// (exclusive). An advisory `flock` on a file beside the catalog, so every
/// process sharing the catalog takes part. Released on drop.
#[derive(Debug)]
pub struct GcGuard {
    _file: File,
}

fn try_flock(path: &Path, exclusive: bool) -> EngineResult<Option<GcGuard>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(EngineError::io(format!(
            "opening lock file {}",
            path.display()
        )))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(Some(GcGuard { _file: file }));
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(EngineError::Io {
            context: format!("locking {}", path.display()),
            source: err,
        })
    }
}

/// What a retention pass decided (and, once applied, did).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RetentionPlan {
    /// Backup set ids to delete (successful and failed ones).
    pub backups: Vec<String>,
    pub wal: Vec<WalSegmentRow>,
}

impl RetentionPlan {
    pub fn is_empty(&self) -> bool {
        self.backups.is_empty() && self.wal.is_empty()
    }
}

/// The set the oldest recoverable point restores from: the newest successful
/// set finished at or before `log_start`, else the oldest successful one.
pub fn pitr_anchor(successes: &[&BackupSet], log_start: DateTime<Utc>) -> Option<String> {
    successes
        .iter()
        .rev()
        .find(|b| b.finished_at.is_some_and(|f| f <= log_start))
        .or_else(|| successes.first())
        .map(|b| b.id.clone())
}

/// Decides what `policy` lets go at `now`. Pure: the scheduler's tests run it
/// against a fake clock.
pub fn plan_retention(
    policy: &BackupPolicy,
    backups: &[BackupSet],
    wal: &[WalSegmentRow],
    now: DateTime<Utc>,
) -> RetentionPlan {
    let data_start = now - Duration::days(policy.backup_retention_days as i64);
    let log_start = now - Duration::days(policy.log_retention_days as i64);
    let mut successes: Vec<&BackupSet> = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Success)
        .collect();
    successes.sort_by_key(|b| (b.started_at, b.id.clone()));
    let newest = successes.last().map(|b| b.id.clone());
    let anchor = if policy.log_backup_enabled {
        pitr_anchor(&successes, log_start)
    } else {
        None
    };
    let mut plan = RetentionPlan::default();
    for b in backups {
        let expired = b.finished_at.unwrap_or(b.started_at) < data_start;
        let protected = Some(&b.id) == newest.as_ref() || Some(&b.id) == anchor.as_ref();
        if expired && !protected && b.status != BackupStatus::Running {
            plan.backups.push(b.id.clone());
        }
    }
    let kept_ranges: Vec<(Lsn, Lsn)> = successes
        .iter()
        .filter(|b| !plan.backups.contains(&b.id))
        .filter_map(|b| Some((b.start_lsn?, b.stop_lsn?)))
        .collect();
    let needed_by_a_set = |w: &WalSegmentRow| {
        kept_ranges
            .iter()
            .any(|&(start, stop)| w.begin_lsn <= stop && w.end_lsn > start)
    };
    let anchor_start = anchor
        .as_ref()
        .and_then(|id| successes.iter().find(|b| &b.id == id))
        .and_then(|b| b.start_lsn);
    for w in wal {
        if needed_by_a_set(w) {
            continue;
        }
        let expired = if !policy.log_backup_enabled {
            true
        } else if let Some(start) = anchor_start {
            w.end_lsn <= start
        } else {
            w.last_commit.unwrap_or(w.stored_at) < log_start && successes.is_empty()
        };
        if expired {
            plan.wal.push(w.clone());
        }
    }
    plan
}

impl Engine {
    /// Shared (`exclusive = false`, waits) or exclusive (returns `None` when
    /// busy) hold on the garbage-collection lock; `None` lock path means this
    /// engine is alone and needs no lock.
    pub(crate) fn gc_guard(&self, exclusive: bool) -> EngineResult<Option<GcGuard>> {
        let Some(path) = &self.settings.lock_path else {
            return Ok(None);
        };
        if exclusive {
            return try_flock(path, true);
        }
        // A collection takes seconds; a backup waits for it rather than fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            if let Some(guard) = try_flock(path, false)? {
                return Ok(Some(guard));
            }
            if std::time::Instant::now() > deadline {
                return Err(EngineError::Conflict(
                    "garbage collection held the repository lock for 10 minutes".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Deletes one backup set: manifest first (so the set stops existing in
    /// the repository), then the catalog row. Its blocks are freed by the
    /// next garbage collection.
    pub fn delete_backup_set(&self, backup_id: &str) -> EngineResult<()> {
        let set = self.catalog.get_backup(backup_id)?;
        if set.status == BackupStatus::Running {
            return Err(EngineError::Conflict(format!(
                "backup {backup_id} is still running"
            )));
        }
        if set.status == BackupStatus::Success {
            self.repo.delete_backup(&set.instance_id, &set.id)?;
        }
        self.catalog.delete_backup(&set.id)?;
        Ok(())
    }

    /// Deletes WAL segments from the repository, then from the catalog.
    pub fn delete_wal_segments(&self, rows: &[WalSegmentRow]) -> EngineResult<()> {
        for w in rows {
            self.repo.delete_object(&w.object_key)?;
            self.catalog
                .delete_wal_segment(&w.instance_id, w.timeline, &w.segment, w.partial)?;
        }
        Ok(())
    }

    /// Applies an instance's policy at `now`; returns what was deleted.
    pub fn apply_retention(
        &self,
        policy: &BackupPolicy,
        now: DateTime<Utc>,
    ) -> EngineResult<RetentionPlan> {
        let backups = self.catalog.list_backups(&policy.instance_id)?;
        let wal = self.catalog.list_wal_segments(&policy.instance_id)?;
        let plan = plan_retention(policy, &backups, &wal, now);
        for id in &plan.backups {
            self.delete_backup_set(id)?;
        }
        self.delete_wal_segments(&plan.wal)?;
        Ok(plan)
    }

    /// Removes packs no manifest references. Returns `None` without doing
    /// anything while a backup runs (it will be tried again later).
    pub fn collect_garbage(&self) -> EngineResult<Option<GcReport>> {
        let Some(_guard) = self.gc_guard(true)? else {
            if self.settings.lock_path.is_some() {
                return Ok(None);
            }
            return Ok(Some(self.repo.collect_garbage()?));
        };
        Ok(Some(self.repo.collect_garbage()?))
    }
}
