//! Retention of snapshots kept on database hosts, apart from the
//! repository's: each instance with an agent keeps its newest
//! `snapshot_keep_local` snapshots on the host (instant clones, cheap next
//! uploads); an older one is deleted there once it is uploaded, never
//! before. Snapshots the agent still has whose set is gone from the catalog
//! (deleted by retention or by a user) are deleted too. A snapshot whose
//! upload failed (agent or repository unreachable for a while) is queued for
//! upload again, so it does not stay the set's only copy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use strata_catalog::{
    BackupId, BackupMethod, BackupSet, BackupStatus, Instance, Job, JobKind, JobState,
};

use crate::{Service, ServiceResult};

/// Whether `b` is a successful snapshot set whose snapshot is still on the
/// database host.
fn is_local_snapshot(b: &BackupSet) -> bool {
    b.method == BackupMethod::Snapshot && b.snapshot_local && b.status == BackupStatus::Success
}

/// The local snapshots to delete from the host: past the newest `keep`
/// ones, and only those uploaded (a snapshot not uploaded is the set's only
/// copy).
pub(crate) fn local_snapshots_to_drop(sets: &[BackupSet], keep: usize) -> Vec<BackupId> {
    let mut local: Vec<&BackupSet> = sets.iter().filter(|b| is_local_snapshot(b)).collect();
    local.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    local
        .into_iter()
        .skip(keep)
        .filter(|b| b.snapshot_uploaded)
        .map(|b| b.id.clone())
        .collect()
}

/// The local snapshots to delete so those on the host take at most
/// `max_bytes`. `local` holds each local snapshot set with the bytes only it
/// holds on the host now (the agent's measure: what deleting it frees).
/// Counted from the newest, a snapshot that would take the total over the
/// budget is dropped if it is uploaded; the newest is never dropped, and one
/// not uploaded is kept (and counted) whatever it costs.
pub(crate) fn local_snapshots_over_space(
    local: &[(&BackupSet, u64)],
    max_bytes: u64,
) -> Vec<BackupId> {
    let mut newest_first: Vec<&(&BackupSet, u64)> = local.iter().collect();
    newest_first.sort_by(|(a, _), (b, _)| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let mut total = 0u64;
    let mut drop = Vec::new();
    for (i, (set, bytes)) in newest_first.into_iter().enumerate() {
        let over = total.saturating_add(*bytes) > max_bytes;
        if over && i > 0 && set.snapshot_uploaded {
            drop.push(set.id.clone());
        } else {
            total = total.saturating_add(*bytes);
        }
    }
    drop
}

/// Longest wait between two uploads of a snapshot that keep failing.
const UPLOAD_RETRY_MAX: chrono::Duration = chrono::Duration::hours(24);

/// The snapshot sets on the host whose newest upload failed and that are
/// not uploaded yet, due for another upload at `now`: `first_wait` after the
/// first failure, twice as long after each further one (at most a day). A
/// set never queued for upload (taken with the CLI, uploaded by
/// `strata backup upload`) is left alone, and so is one whose upload is
/// queued or runs.
pub(crate) fn uploads_to_retry(
    sets: &[BackupSet],
    jobs: &[Job],
    now: DateTime<Utc>,
    first_wait: chrono::Duration,
) -> Vec<BackupId> {
    let mut uploads: BTreeMap<&BackupId, Vec<&Job>> = BTreeMap::new();
    for job in jobs.iter().filter(|j| j.kind == JobKind::SnapshotUpload) {
        if let Some(id) = &job.backup_id {
            uploads.entry(id).or_default().push(job);
        }
    }
    let due = |id: &BackupId| {
        let Some(tries) = uploads.get(id) else {
            return false;
        };
        let Some(newest) = tries.iter().max_by_key(|j| j.id) else {
            return false;
        };
        if newest.state != JobState::Failed {
            return false;
        }
        let failures = tries.iter().filter(|j| j.state == JobState::Failed).count();
        let wait = (1..failures).fold(first_wait, |w, _| (w * 2).min(UPLOAD_RETRY_MAX));
        let failed_at = newest.finished_at.unwrap_or(newest.started_at);
        now - failed_at >= wait
    };
    sets.iter()
        .filter(|b| is_local_snapshot(b) && !b.snapshot_uploaded)
        .filter(|b| due(&b.id))
        .map(|b| b.id.clone())
        .collect()
}

impl Service {
    /// Queues again the uploads of `instance`'s snapshots that failed.
    pub(crate) fn retry_failed_uploads(self: &Arc<Self>, instance: &Instance) -> ServiceResult<()> {
        let catalog = self.engine.catalog();
        let sets = catalog.list_backups(&instance.id)?;
        let jobs = catalog.list_jobs(Some(&instance.id))?;
        let first_wait = self.settings.retention_interval;
        for id in uploads_to_retry(&sets, &jobs, self.now(), first_wait) {
            if let Some(set) = sets.iter().find(|b| b.id == id) {
                let job = self.request_snapshot_upload(set)?;
                tracing::info!(instance = %instance.id, backup = %id, job = %job, "snapshot upload failed before; queued again");
            }
        }
        Ok(())
    }

    /// Applies the local snapshot retention of `instance` on its agent.
    pub(crate) async fn prune_local_snapshots(
        self: &Arc<Self>,
        instance: &Instance,
    ) -> ServiceResult<()> {
        let Some(agent) = self.engine.agent(instance)? else {
            return Ok(());
        };
        // Listed before the catalog is read: a snapshot's set is recorded
        // before the agent makes it, so a snapshot listed here whose set the
        // catalog read next lacks is one whose set is gone, never one being
        // taken meanwhile.
        let on_host = agent.snapshots().await;
        let sets = self.engine.catalog().list_backups(&instance.id)?;
        for id in local_snapshots_to_drop(&sets, self.settings.snapshot_keep_local) {
            let Some(mut set) = sets.iter().find(|b| b.id == id).cloned() else {
                continue;
            };
            self.engine.delete_local_snapshot(instance, &set).await?;
            set.snapshot_local = false;
            set.snapshot_bytes = None;
            self.engine.record_snapshot_state(set).await?;
            tracing::info!(instance = %instance.id, backup = %id, "local snapshot deleted (uploaded, past the newest kept)");
        }
        if let Some(max_bytes) = self.settings.snapshot_local_max_bytes {
            self.prune_local_snapshots_by_space(instance, &agent, max_bytes)
                .await?;
        }
        // Snapshots whose set the catalog no longer has at all.
        let known: BTreeSet<&str> = sets.iter().map(|b| b.id.as_str()).collect();
        let on_host = match on_host {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(instance = %instance.id, "listing the agent's snapshots: {e}");
                return Ok(());
            }
        };
        for snapshot in on_host {
            if known.contains(snapshot.name.as_str()) {
                continue;
            }
            match agent.delete_snapshot(&snapshot.name).await {
                Ok(()) => {
                    tracing::info!(instance = %instance.id, snapshot = %snapshot.name.as_str(), "deleted a snapshot whose backup set is gone")
                }
                Err(e) => {
                    tracing::warn!(instance = %instance.id, "deleting snapshot {}: {e}", snapshot.name.as_str())
                }
            }
        }
        Ok(())
    }
}

impl Service {
    /// Measures every local snapshot of `instance` on its agent (recording the
    /// figure on its set) and deletes the uploaded ones that take the host's
    /// snapshots past `max_bytes`.
    async fn prune_local_snapshots_by_space(
        self: &Arc<Self>,
        instance: &Instance,
        agent: &strata_agent::AgentClient,
        max_bytes: u64,
    ) -> ServiceResult<()> {
        let sets = self.engine.catalog().list_backups(&instance.id)?;
        let mut measured: Vec<(BackupSet, u64)> = Vec::new();
        for set in sets.iter().filter(|b| is_local_snapshot(b)) {
            let Ok(name) = strata_agent::SnapshotName::new(set.id.as_str()) else {
                continue;
            };
            match agent.space(&name).await {
                Ok(space) => {
                    let mut set = set.clone();
                    if set.snapshot_bytes != Some(space.exclusive_bytes) {
                        set.snapshot_bytes = Some(space.exclusive_bytes);
                        self.engine.record_snapshot_state(set.clone()).await?;
                    }
                    measured.push((set, space.exclusive_bytes));
                }
                // Not measured this round: it is neither counted nor dropped.
                Err(e) => {
                    tracing::warn!(instance = %instance.id, backup = %set.id, "measuring a local snapshot: {e}")
                }
            }
        }
        let local: Vec<(&BackupSet, u64)> = measured.iter().map(|(s, b)| (s, *b)).collect();
        for id in local_snapshots_over_space(&local, max_bytes) {
            let Some((set, bytes)) = measured.iter().find(|(s, _)| s.id == id) else {
                continue;
            };
            let mut set = set.clone();
            self.engine.delete_local_snapshot(instance, &set).await?;
            set.snapshot_local = false;
            set.snapshot_bytes = None;
            self.engine.record_snapshot_state(set).await?;
            tracing::info!(instance = %instance.id, backup = %id, bytes, "local snapshot deleted (uploaded; the host's snapshots over snapshot.local_max_bytes)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};
    use strata_catalog::BackupMode;

    fn snap(id: &str, minutes: i64, uploaded: bool) -> BackupSet {
        let t = Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap() + Duration::minutes(minutes);
        let mut b = BackupSet::started(id.into(), "i", BackupMode::Automated, t, None);
        b.status = BackupStatus::Success;
        b.method = BackupMethod::Snapshot;
        b.snapshot_local = true;
        b.snapshot_uploaded = uploaded;
        b
    }

    #[test]
    fn the_newest_are_kept_and_nothing_unuploaded_is_dropped() {
        let mut physical = snap("p", 0, true);
        physical.method = BackupMethod::Physical;
        let mut gone = snap("gone", 1, true);
        gone.snapshot_local = false;
        let sets = vec![
            physical,
            gone,
            snap("a", 2, true),
            snap("b", 3, false),
            snap("c", 4, true),
            snap("d", 5, true),
            snap("e", 6, true),
        ];
        let drop = |keep| {
            local_snapshots_to_drop(&sets, keep)
                .into_iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(drop(2), ["c", "a"], "b is the only copy of its set");
        assert_eq!(drop(0), ["e", "d", "c", "a"]);
        assert!(drop(10).is_empty());
    }

    #[test]
    fn the_space_budget_drops_the_oldest_uploaded_snapshots_first() {
        let sets = [
            snap("a", 1, true),
            snap("b", 2, false),
            snap("c", 3, true),
            snap("d", 4, true),
            snap("e", 5, true),
        ];
        let bytes = [40u64, 30, 20, 10, 500];
        let local: Vec<(&BackupSet, u64)> = sets.iter().zip(bytes).collect();
        let drop = |max| {
            local_snapshots_over_space(&local, max)
                .into_iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
        };
        // The newest is kept even alone over the budget; b, not uploaded, stays.
        assert_eq!(drop(100), ["d", "c", "a"]);
        assert_eq!(drop(520), ["c", "a"]);
        assert_eq!(drop(560), ["a"]);
        assert!(drop(600).is_empty());
    }

    fn upload(id: i64, set: &str, state: JobState, failed_minutes: i64) -> Job {
        let t =
            Utc.with_ymd_and_hms(2026, 12, 6, 1, 0, 0).unwrap() + Duration::minutes(failed_minutes);
        Job {
            id: strata_catalog::JobId::new(id),
            kind: JobKind::SnapshotUpload,
            instance_id: Some("i".into()),
            state,
            progress: 0,
            detail: String::new(),
            backup_id: Some(set.into()),
            started_at: t,
            finished_at: (state == JobState::Failed).then_some(t),
            error: None,
            owner: strata_catalog::LeaseOwner::random(),
            heartbeat_at: t,
            pid: 0,
            queued: false,
            node_id: None,
            lease_ms: None,
        }
    }

    #[test]
    fn failed_uploads_are_retried_with_growing_waits() {
        let sets = vec![
            snap("failed-once", 0, false),
            snap("failed-thrice", 1, false),
            snap("running-again", 2, false),
            snap("never-queued", 3, false),
            snap("uploaded", 4, true),
        ];
        let jobs = vec![
            upload(1, "failed-once", JobState::Failed, 0),
            upload(2, "failed-thrice", JobState::Failed, 0),
            upload(3, "failed-thrice", JobState::Failed, 5),
            upload(4, "failed-thrice", JobState::Failed, 15),
            upload(5, "running-again", JobState::Failed, 0),
            upload(6, "running-again", JobState::Uploading, 5),
            upload(7, "uploaded", JobState::Failed, 0),
            upload(8, "uploaded", JobState::Finished, 5),
        ];
        let due = |minutes_after_first_failure: i64| {
            let now = Utc.with_ymd_and_hms(2026, 12, 6, 1, 0, 0).unwrap()
                + Duration::minutes(minutes_after_first_failure);
            uploads_to_retry(&sets, &jobs, now, Duration::minutes(5))
                .into_iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
        };
        assert!(due(4).is_empty());
        assert_eq!(due(5), ["failed-once"]);
        // Three failures, the last at minute 15: 20 minutes after it.
        assert_eq!(due(34), ["failed-once"]);
        assert_eq!(due(35), ["failed-once", "failed-thrice"]);
        // The set's local copy gone: nothing to upload from.
        let mut gone = sets.clone();
        gone[0].snapshot_local = false;
        let now = Utc.with_ymd_and_hms(2026, 12, 7, 0, 0, 0).unwrap();
        let ids: Vec<String> = uploads_to_retry(&gone, &jobs, now, Duration::minutes(5))
            .into_iter()
            .map(|b| b.to_string())
            .collect();
        assert_eq!(ids, ["failed-thrice"]);
    }
}
