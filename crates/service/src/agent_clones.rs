//! Clones made on the database host from snapshot sets still there: the
//! source's agent reflinks the snapshot and starts the clone's server
//! itself, so a clone of any size runs in seconds. Strata records it as any
//! clone (a managed instance, `agent_clone` naming it on the agent) and
//! deletes it through the agent. A set whose snapshot is gone from the host
//! is restored from the repository instead, as clones always were.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use strata_catalog::{
    BackupId, BackupMethod, BackupSet, BackupStatus, Instance, InstanceId, JobId, ManagedInstance,
};
use strata_engine::{AgentCloneOptions, EngineError, NoProgress, RecoveryTarget};

use crate::{Service, ServiceResult};

/// The snapshot set a clone of `backups`' instance is made from on the
/// database host, if any: the set asked for, or the newest that ended by
/// the target time, when it is a successful snapshot still on the host.
pub(crate) fn local_snapshot_for(
    backups: &[BackupSet],
    backup_id: Option<&BackupId>,
    restore_time: Option<DateTime<Utc>>,
) -> Option<BackupSet> {
    let success = |b: &&BackupSet| b.status == BackupStatus::Success;
    let chosen = match (backup_id, restore_time) {
        (Some(id), _) => backups.iter().filter(success).find(|b| &b.id == id),
        (None, Some(t)) => backups
            .iter()
            .filter(success)
            .filter(|b| b.finished_at.is_some_and(|f| f <= t))
            .max_by_key(|b| b.finished_at),
        (None, None) => None,
    }?;
    (chosen.method == BackupMethod::Snapshot && chosen.snapshot_local).then(|| chosen.clone())
}

/// What the background part of a clone made.
pub(crate) struct Made {
    pub backup_id: BackupId,
    pub neutralized: Vec<String>,
}

impl Service {
    /// The host the clone of `source`'s snapshot is reached at: its agent's.
    pub(crate) fn agent_host(&self, source: &Instance) -> ServiceResult<String> {
        let agent = self
            .engine
            .agent(source)?
            .ok_or_else(|| EngineError::Refused(format!("instance {} has no agent", source.id)))?;
        Ok(agent.host().to_string())
    }

    /// Makes clone `id` of snapshot set `set` on the source's agent and
    /// records its data directory; when the snapshot is gone from the host
    /// restores the set from the repository into Strata's instances
    /// directory instead (`fallback`), the instance moved there first.
    pub(crate) async fn make_on_agent(
        self: &Arc<Self>,
        source: &Instance,
        id: &InstanceId,
        set: BackupSet,
        target: RecoveryTarget,
        job_id: JobId,
        fallback: impl FnOnce() -> Result<Made, EngineError> + Send + 'static,
    ) -> Result<Made, EngineError> {
        let engine = &self.engine;
        let clone = engine.catalog().get_instance(id)?;
        let name = strata_agent::CloneName::new(id.as_str())
            .map_err(|e| EngineError::Failed(format!("instance id {id} as a clone name: {e}")))?;
        let opts = AgentCloneOptions {
            set: set.clone(),
            clone: name,
            port: clone.port,
            listen_addresses: clone.host.clone(),
            target,
            job_id: Some(job_id),
        };
        match engine
            .clone_on_agent(source, &clone, &opts, &NoProgress)
            .await?
        {
            Some(made) => {
                if let Ok(Some(mut m)) = engine.catalog().get_managed(id) {
                    m.data_dir = made.data_dir.display().to_string();
                    engine.catalog().put_managed(&m)?;
                }
                Ok(Made {
                    backup_id: made.backup_id,
                    neutralized: made.neutralized,
                })
            }
            None => {
                tracing::info!(instance = %id, backup = %set.id, "the snapshot is no longer on the database host; restoring from the repository");
                let mut gone = set.clone();
                gone.snapshot_local = false;
                gone.snapshot_bytes = None;
                engine.record_snapshot_state(gone).await?;
                if !set.in_repository() {
                    return Err(EngineError::Refused(format!(
                        "backup {}: its snapshot is no longer on the database host and it was never uploaded to the repository",
                        set.id
                    )));
                }
                self.move_to_local(&clone)?;
                tokio::task::spawn_blocking(fallback)
                    .await
                    .map_err(|e| EngineError::Failed(format!("restore task: {e}")))?
            }
        }
    }

    /// Makes a clone registered to run on the database host a local one:
    /// its instance reached on this host, its record without an agent clone.
    fn move_to_local(&self, clone: &Instance) -> Result<(), EngineError> {
        let catalog = self.engine.catalog();
        let moved = Instance {
            host: "127.0.0.1".into(),
            ..clone.clone()
        };
        catalog.update_instance(&moved)?;
        if let Some(mut m) = catalog.get_managed(&clone.id)? {
            m.agent_clone = None;
            m.data_dir = self
                .settings
                .instances_dir
                .join(clone.id.as_str())
                .join("pgdata")
                .display()
                .to_string();
            catalog.put_managed(&m)?;
        }
        Ok(())
    }

    /// Stops and deletes the agent clone of managed instance `m` (its
    /// server first); one already gone is fine.
    pub(crate) async fn delete_agent_clone(
        &self,
        m: &ManagedInstance,
        name: &str,
    ) -> ServiceResult<()> {
        let source = match self.engine.catalog().get_instance(&m.source_instance) {
            Ok(s) => s,
            Err(strata_catalog::CatalogError::InstanceNotFound(_)) => {
                return Err(EngineError::Refused(format!(
                    "instance {}: its clone {name} runs on the database host of instance {}, which is no longer registered; register it again with its agent to delete the clone",
                    m.instance_id, m.source_instance
                ))
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        let agent = self.engine.agent(&source)?.ok_or_else(|| {
            EngineError::Refused(format!(
                "instance {}: its clone {name} runs on the database host of instance {}, which has no agent any more",
                m.instance_id, source.id
            ))
        })?;
        let clone = strata_agent::CloneName::new(name)
            .map_err(|e| EngineError::Failed(format!("agent clone {name:?}: {e}")))?;
        match agent.delete_clone(&clone).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(strata_agent::proto::ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(EngineError::Unreachable(e.to_string()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use strata_catalog::BackupMode;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, 9, minute, 0).unwrap()
    }

    fn set(id: &str, minute: u32, method: BackupMethod, local: bool) -> BackupSet {
        let mut b = BackupSet::started(id.into(), "a", BackupMode::Manual, t(minute), None);
        b.status = BackupStatus::Success;
        b.finished_at = Some(t(minute + 1));
        b.method = method;
        b.snapshot_local = local;
        b
    }

    #[test]
    fn a_clone_is_made_on_the_host_only_from_a_snapshot_still_there() {
        let sets = [
            set("phys", 0, BackupMethod::Physical, false),
            set("snap", 10, BackupMethod::Snapshot, true),
            set("pruned", 20, BackupMethod::Snapshot, false),
            set("snap2", 30, BackupMethod::Snapshot, true),
        ];
        let id = |s: &str| Some(BackupId::from(s));
        let chosen = |b: Option<BackupId>, t: Option<DateTime<Utc>>| {
            local_snapshot_for(&sets, b.as_ref(), t).map(|b| b.id.to_string())
        };
        assert_eq!(chosen(id("snap"), None).as_deref(), Some("snap"));
        assert_eq!(chosen(id("phys"), None), None);
        assert_eq!(chosen(id("pruned"), None), None);
        assert_eq!(chosen(id("missing"), None), None);
        // By time: the newest set ended by then decides.
        assert_eq!(chosen(None, Some(t(15))).as_deref(), Some("snap"));
        assert_eq!(chosen(None, Some(t(25))), None);
        assert_eq!(chosen(None, Some(t(45))).as_deref(), Some("snap2"));
        assert_eq!(chosen(None, Some(t(5))), None);
        assert_eq!(chosen(None, None), None);
    }
}
