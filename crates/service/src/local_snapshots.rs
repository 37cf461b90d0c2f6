//! Retention of snapshots kept on database hosts, apart from the
//! repository's: each instance with an agent keeps its newest
//! `snapshot_keep_local` snapshots on the host (instant clones, cheap next
//! uploads); an older one is deleted there once it is uploaded, never
//! before. Snapshots the agent still has whose set is gone from the catalog
//! (deleted by retention or by a user) are deleted too.

use std::collections::BTreeSet;
use std::sync::Arc;

use strata_catalog::{BackupId, BackupMethod, BackupSet, BackupStatus, Instance};

use crate::{Service, ServiceResult};

/// The local snapshots to delete from the host: past the newest `keep`
/// ones, and only those uploaded (a snapshot not uploaded is the set's only
/// copy).
pub(crate) fn local_snapshots_to_drop(sets: &[BackupSet], keep: usize) -> Vec<BackupId> {
    let mut local: Vec<&BackupSet> = sets
        .iter()
        .filter(|b| {
            b.method == BackupMethod::Snapshot
                && b.snapshot_local
                && b.status == BackupStatus::Success
        })
        .collect();
    local.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    local
        .into_iter()
        .skip(keep)
        .filter(|b| b.snapshot_uploaded)
        .map(|b| b.id.clone())
        .collect()
}

impl Service {
    /// Applies the local snapshot retention of `instance` on its agent.
    pub(crate) async fn prune_local_snapshots(
        self: &Arc<Self>,
        instance: &Instance,
    ) -> ServiceResult<()> {
        let Some(agent) = self.engine.agent(instance)? else {
            return Ok(());
        };
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
        // Snapshots whose set the catalog no longer has at all.
        let known: BTreeSet<&str> = sets.iter().map(|b| b.id.as_str()).collect();
        let on_host = match agent.snapshots().await {
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
}
