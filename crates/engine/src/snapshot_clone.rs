//! Clones of snapshot sets on the database host: the agent reflinks the
//! set's local snapshot into its clone directory (seconds, whatever the
//! size), the engine puts the archived WAL recovery needs into the clone's
//! `pg_wal/`, and the agent starts a server there with the recovery target
//! (its configuration neutralized as any restore's, see docs/AGENT.md).
//! The clone is ready once its server has left recovery.
//!
//! A snapshot holds no WAL of its own; the WAL from the set's start to its
//! stop is in the archive once the set succeeded (`run_snapshot` waits for
//! it), and so is the WAL after it up to a target time. Anything that fails
//! after the agent made the clone deletes the clone again, so a failed
//! clone leaves nothing on the host.
//!
//! Reference: src/backend/access/transam/xlogrecovery.c (recovery targets,
//! `pg_wal/` read when `restore_command` finds nothing).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use pg_replication::{ConnectOptions, ReplicationClient};
use pg_wal::history::TimelineHistory;
use pg_wal::{history_file_name, Lsn, TimelineId, WalGeometry};
use strata_agent::proto::ErrorCode;
use strata_agent::{
    AgentClient, CloneName, SnapshotName, StartRequest, TargetRequest, WalFileName,
};
use strata_catalog::{
    BackupMethod, BackupSet, BackupStatus, Instance, JobId, JobState, WalSegmentRow,
};

use crate::blocking::blocking;
use crate::connect::connect_options;
use crate::restore::{plan_wal_from, StagedSegment};
use crate::snapshot::agent_error;
use crate::{Engine, EngineError, EngineResult, Progress, RecoveryTarget};

/// A clone of a snapshot set to make on the database host.
#[derive(Debug, Clone)]
pub struct AgentCloneOptions {
    /// The snapshot set (successful, its snapshot on the host).
    pub set: BackupSet,
    /// The clone's name on the agent.
    pub clone: CloneName,
    /// The port its server listens on.
    pub port: u16,
    /// Its `listen_addresses`.
    pub listen_addresses: String,
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// The caller's job, whose states this records (a failure included).
    pub job_id: Option<JobId>,
}

/// What a clone on the database host is once its server runs.
#[derive(Debug, Clone)]
pub struct AgentCloneOutcome {
    /// The set cloned.
    pub backup_id: strata_catalog::BackupId,
    /// The clone's data directory on the database host.
    pub data_dir: PathBuf,
    /// Where recovery was told to stop, in words.
    pub target: String,
    /// WAL segments put into the clone.
    pub wal_segments: u64,
    /// Settings of the source removed before the start.
    pub neutralized: Vec<String>,
}

/// The WAL a clone of a snapshot set recovers from and the target it is
/// started with.
pub(crate) struct ClonePlan {
    pub(crate) segments: Vec<StagedSegment>,
    pub(crate) target: RecoveryTarget,
}

/// Cuts the archived WAL from the set's start (`plan`, in order, as
/// [`plan_wal_from`] gives it) down to what recovery to `target` reads: up
/// to the stop position for the consistency point, up to the first segment
/// with a commit after the time for a time (all of it, recovering to the
/// end, when none commits later). `gap`: WAL is archived past the end of
/// the usable run.
fn plan_clone_wal(
    set: &BackupSet,
    geometry: WalGeometry,
    plan: Vec<StagedSegment>,
    target: &RecoveryTarget,
    gap: bool,
) -> EngineResult<ClonePlan> {
    let stop = set
        .stop_lsn
        .ok_or_else(|| EngineError::Failed(format!("backup {} has no stop position", set.id)))?;
    let reach = plan.last().map_or(Lsn::INVALID, |s| s.row.end_lsn);
    if reach < stop {
        return Err(EngineError::Refused(format!(
            "the WAL needed to make backup {} consistent (up to {stop}) is not in the archive (archived WAL ends at {reach})",
            set.id
        )));
    }
    let stop_seg = geometry.segment_of(stop);
    let (segments, target) = match target {
        RecoveryTarget::Immediate => (
            plan.into_iter().filter(|s| s.segno <= stop_seg).collect(),
            RecoveryTarget::Immediate,
        ),
        RecoveryTarget::Time(t) => {
            let later = plan
                .iter()
                .position(|s| s.segno >= stop_seg && s.row.last_commit.is_some_and(|c| c > *t));
            match later {
                Some(i) => (plan.into_iter().take(i + 1).collect(), target.clone()),
                // Nothing commits after the time: everything archived is before it.
                None if gap => {
                    return Err(EngineError::Refused(format!(
                        "target time {} lies beyond a gap in the archived WAL at {reach}; restore from a backup taken after the gap",
                        t.to_rfc3339()
                    )))
                }
                None => (plan, RecoveryTarget::Latest),
            }
        }
        other => (plan, other.clone()),
    };
    Ok(ClonePlan { segments, target })
}

/// The agent's spelling of a recovery target.
fn target_request(target: &RecoveryTarget) -> TargetRequest {
    match target {
        RecoveryTarget::Latest => TargetRequest::Latest,
        RecoveryTarget::Immediate => TargetRequest::Immediate,
        RecoveryTarget::Time(t) => TargetRequest::Time(t.to_rfc3339()),
        RecoveryTarget::Lsn {
            lsn,
            inclusive: true,
        } => TargetRequest::Lsn(lsn.to_string()),
        RecoveryTarget::Lsn {
            lsn,
            inclusive: false,
        } => TargetRequest::LsnBefore(lsn.to_string()),
        RecoveryTarget::Xid {
            xid,
            inclusive: true,
        } => TargetRequest::Xid(xid.to_string()),
        RecoveryTarget::Xid {
            xid,
            inclusive: false,
        } => TargetRequest::XidBefore(xid.to_string()),
        RecoveryTarget::Name(n) => TargetRequest::Name(n.clone()),
    }
}

impl Engine {
    /// Clones snapshot set `opts.set` of `source` on its agent and starts
    /// it; `clone` is the instance the clone becomes (Strata connects to it
    /// to see recovery end). `Ok(None)`: the snapshot is no longer on the
    /// host and nothing was made (the caller may restore from the
    /// repository instead). On failure the agent's clone is deleted and the
    /// job, if any, is `Failed` with the reason.
    pub async fn clone_on_agent(
        &self,
        source: &Instance,
        clone: &Instance,
        opts: &AgentCloneOptions,
        progress: &dyn Progress,
    ) -> EngineResult<Option<AgentCloneOutcome>> {
        let mut job = match opts.job_id {
            Some(id) => {
                let engine = self.clone();
                Some(blocking(move || Ok(engine.catalog.get_job(id)?)).await?)
            }
            None => None,
        };
        let result = self
            .clone_on_agent_for_job(source, clone, opts, job.as_mut(), progress)
            .await;
        if let (Err(e), Some(job)) = (&result, job.as_mut()) {
            job.state = JobState::Failed;
            job.error = Some(e.to_string());
            job.finished_at = Some(Utc::now());
            let _ = self.record_job("recording a clone's failure", job).await;
        }
        result
    }

    async fn clone_on_agent_for_job(
        &self,
        source: &Instance,
        clone: &Instance,
        opts: &AgentCloneOptions,
        mut job: Option<&mut strata_catalog::Job>,
        progress: &dyn Progress,
    ) -> EngineResult<Option<AgentCloneOutcome>> {
        let set = &opts.set;
        if set.method != BackupMethod::Snapshot || set.status != BackupStatus::Success {
            return Err(EngineError::Refused(format!(
                "backup {} is not a successful snapshot backup",
                set.id
            )));
        }
        let facts = self.check_agent(source).await?;
        let agent = self
            .agent(source)?
            .ok_or_else(|| EngineError::Refused("the instance's agent was removed".into()))?;
        let clone_dir = facts.clone_dir.ok_or_else(|| {
            EngineError::Refused(format!(
                "the agent at {} makes no clones (it has no clone directory)",
                agent.url()
            ))
        })?;
        let snapshot = SnapshotName::new(set.id.as_str()).map_err(|e| {
            EngineError::Failed(format!("backup id {} as a snapshot name: {e}", set.id))
        })?;
        if let Some(job) = job.as_deref_mut() {
            job.state = JobState::Preparing;
            self.record_job("recording a clone's start", job).await?;
        }
        let listing = match agent.manifest(&snapshot).await {
            Ok(listing) => listing,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => return Ok(None),
            Err(e) => return Err(agent_error(agent.url(), e)),
        };
        self.check_snapshot_unchanged(set, &listing).await?;
        // Planned before the clone is made: a refused target costs nothing.
        let (plan, geometry, histories) = self.clone_wal_plan(source, set, &opts.target).await?;

        match agent.clone_snapshot(&snapshot, &opts.clone).await {
            Ok(created) => progress.message(&format!(
                "backup {}: cloned into {} on the database host ({} files)",
                set.id,
                created.path.display(),
                created.files
            )),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => return Ok(None),
            Err(e) => return Err(agent_error(agent.url(), e)),
        }
        if let Some(job) = job {
            job.state = JobState::Uploading;
            job.progress = 30;
            self.record_job("recording a clone's state", job).await?;
        }
        let started = self
            .start_agent_clone(&agent, clone, opts, &plan, geometry, &histories, progress)
            .await;
        match started {
            Ok(neutralized) => Ok(Some(AgentCloneOutcome {
                backup_id: set.id.clone(),
                data_dir: clone_dir.join(opts.clone.as_str()),
                target: plan.target.to_string(),
                wal_segments: plan.segments.len() as u64,
                neutralized,
            })),
            Err(e) => {
                if let Err(d) = agent.delete_clone(&opts.clone).await {
                    tracing::warn!(clone = %opts.clone, "deleting the failed clone: {d}");
                }
                Err(e)
            }
        }
    }

    /// The archived WAL a clone of `set` needs for `target`, the WAL
    /// geometry and the timeline histories.
    async fn clone_wal_plan(
        &self,
        source: &Instance,
        set: &BackupSet,
        target: &RecoveryTarget,
    ) -> EngineResult<(ClonePlan, WalGeometry, Histories)> {
        let engine = self.clone();
        let (source, set, target) = (source.clone(), set.clone(), target.clone());
        blocking(move || engine.snapshot_wal_plan(&source, &set, &target)).await
    }

    /// [`Engine::clone_wal_plan`] on the calling thread.
    pub(crate) fn snapshot_wal_plan(
        &self,
        source: &Instance,
        set: &BackupSet,
        target: &RecoveryTarget,
    ) -> EngineResult<(ClonePlan, WalGeometry, Histories)> {
        let geometry = source
            .wal_segment_size
            .and_then(|s| WalGeometry::new(s).ok())
            .ok_or_else(|| {
                EngineError::Refused(format!(
                    "the WAL segment size of instance {} is not known yet",
                    source.id
                ))
            })?;
        let (start, timeline) = set.start_lsn.zip(set.start_timeline).ok_or_else(|| {
            EngineError::Failed(format!("backup {} has no start position", set.id))
        })?;
        let wal = self.catalog.list_wal_segments(&source.id)?;
        let histories = self.load_histories(&source.id)?;
        let staged = plan_wal_from(start, timeline, geometry, &wal, &histories);
        let reach = staged.last().map_or(Lsn::INVALID, |s| s.row.end_lsn);
        let gap = wal.iter().any(|w| w.begin_lsn > reach);
        let plan = plan_clone_wal(set, geometry, staged, target, gap)?;
        Ok((plan, geometry, histories))
    }

    /// Puts the planned WAL into the clone, starts its server and waits
    /// until recovery ended; returns the settings the agent neutralized.
    #[allow(clippy::too_many_arguments)]
    async fn start_agent_clone(
        &self,
        agent: &AgentClient,
        clone: &Instance,
        opts: &AgentCloneOptions,
        plan: &ClonePlan,
        geometry: WalGeometry,
        histories: &Histories,
        progress: &dyn Progress,
    ) -> EngineResult<Vec<String>> {
        for (tli, (_, bytes)) in histories {
            self.put_wal(agent, &opts.clone, &history_file_name(*tli), bytes.clone())
                .await?;
        }
        for seg in &plan.segments {
            let engine = self.clone();
            let row: WalSegmentRow = seg.row.clone();
            let (_, mut data) = blocking(move || engine.read_wal_row(&row)).await?;
            // A partial segment ends in zeros, as recovery expects.
            data.resize(geometry.segment_size() as usize, 0);
            let name = geometry.segment_file_name(seg.row.timeline, seg.segno);
            self.put_wal(agent, &opts.clone, &name, data).await?;
        }
        progress.message(&format!(
            "clone {}: {} WAL segments put; starting on port {}, recovering to {}",
            opts.clone,
            plan.segments.len(),
            opts.port,
            plan.target
        ));
        let started = agent
            .start_clone(
                &opts.clone,
                &StartRequest {
                    port: opts.port,
                    listen_addresses: Some(opts.listen_addresses.clone()),
                    target: Some(target_request(&plan.target)),
                    stay_in_recovery: false,
                },
            )
            .await
            .map_err(|e| agent_error(agent.url(), e))?;
        self.wait_recovered(agent, &opts.clone, clone).await?;
        Ok(started.neutralized)
    }

    async fn put_wal(
        &self,
        agent: &AgentClient,
        clone: &CloneName,
        name: &str,
        bytes: Vec<u8>,
    ) -> EngineResult<()> {
        let file = WalFileName::new(name)
            .map_err(|e| EngineError::Failed(format!("WAL file name {name}: {e}")))?;
        match agent.put_clone_wal(clone, &file, bytes).await {
            Ok(()) => Ok(()),
            // The snapshot already held it.
            Err(e) if e.code() == Some(ErrorCode::Exists) => Ok(()),
            Err(e) => Err(agent_error(agent.url(), e)),
        }
    }

    /// Waits until the clone's server has left recovery (it accepts
    /// read-only sessions before); fails when it stops meanwhile.
    async fn wait_recovered(
        &self,
        agent: &AgentClient,
        name: &CloneName,
        clone: &Instance,
    ) -> EngineResult<()> {
        let mut opts: ConnectOptions = connect_options(clone)?;
        opts.replication = false;
        opts.dbname = Some("postgres".into());
        opts.connect_timeout = Duration::from_secs(5);
        let deadline = Instant::now() + self.settings.start_timeout;
        loop {
            let last = match ReplicationClient::connect(&opts).await {
                Ok(mut session) => match session
                    .simple_query("SELECT pg_is_in_recovery()::text")
                    .await
                {
                    Ok(rows) => {
                        let in_recovery = rows.first().and_then(|r| r.first().cloned().flatten());
                        if in_recovery.as_deref() == Some("false") {
                            return Ok(());
                        }
                        "still in recovery".to_string()
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            let status = agent
                .clone_status(name)
                .await
                .map_err(|e| agent_error(agent.url(), e))?;
            if !status.running {
                return Err(EngineError::RestoredServer(format!(
                    "the server of clone {name} stopped during recovery (its log is strata-server.log in the clone; last answer: {last})"
                )));
            }
            if Instant::now() >= deadline {
                return Err(EngineError::RestoredServer(format!(
                    "the server of clone {name} did not finish recovery within {}s ({last})",
                    self.settings.start_timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub(crate) type Histories = BTreeMap<TimelineId, (TimelineHistory, Vec<u8>)>;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone};
    use pg_wal::SegmentNo;

    const SEG: u64 = 16 << 20;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, 9, minute, 0).unwrap()
    }

    fn set(start: u64, stop: u64) -> BackupSet {
        let mut b = BackupSet::started(
            "1".into(),
            "a",
            strata_catalog::BackupMode::Manual,
            t(0),
            None,
        );
        b.status = BackupStatus::Success;
        b.method = BackupMethod::Snapshot;
        b.start_lsn = Some(Lsn(start));
        b.stop_lsn = Some(Lsn(stop));
        b.start_timeline = Some(TimelineId(1));
        b
    }

    fn staged(seg: u64, last_commit: Option<u32>, partial_end: Option<u64>) -> StagedSegment {
        StagedSegment {
            row: WalSegmentRow {
                instance_id: "a".into(),
                timeline: TimelineId(1),
                segment: format!("{:024X}", seg),
                partial: partial_end.is_some(),
                begin_lsn: Lsn(seg * SEG),
                end_lsn: Lsn(partial_end.unwrap_or((seg + 1) * SEG)),
                size: SEG,
                checksum: String::new(),
                first_commit: None,
                last_commit: last_commit.map(t),
                commit_count: 0,
                min_commit_xid: None,
                max_commit_xid: None,
                object_key: format!("wal/{seg}"),
                stored_at: t(59),
            },
            segno: SegmentNo(seg),
        }
    }

    fn geometry() -> WalGeometry {
        WalGeometry::new(SEG).unwrap()
    }

    fn refusal(r: EngineResult<ClonePlan>) -> String {
        match r {
            Ok(p) => panic!("planned {:?} instead of refusing", segnos(&p)),
            Err(e) => e.to_string(),
        }
    }

    fn segnos(p: &ClonePlan) -> Vec<u64> {
        p.segments.iter().map(|s| s.segno.0).collect()
    }

    #[test]
    fn the_consistency_point_needs_the_wal_to_the_stop_position() {
        let b = set(2 * SEG + 40, 3 * SEG + 100);
        let all = || (2..7).map(|s| staged(s, Some(s as u32), None)).collect();
        let p = plan_clone_wal(&b, geometry(), all(), &RecoveryTarget::Immediate, false).unwrap();
        assert_eq!(segnos(&p), [2, 3]);
        assert_eq!(p.target, RecoveryTarget::Immediate);

        // Archived WAL ending before the stop position: refused.
        let short = vec![staged(2, None, None), staged(3, None, Some(3 * SEG + 50))];
        let e = refusal(plan_clone_wal(
            &b,
            geometry(),
            short,
            &RecoveryTarget::Immediate,
            false,
        ));
        assert!(e.contains("is not in the archive"), "{e}");
    }

    #[test]
    fn a_time_takes_the_wal_up_to_the_first_later_commit() {
        let b = set(2 * SEG, 2 * SEG + 100);
        let all = || {
            (2..8)
                .map(|s| staged(s, Some(s as u32 * 5), None))
                .collect()
        };
        // Segment 4 commits last at minute 20: the first after 17.
        let p = plan_clone_wal(&b, geometry(), all(), &RecoveryTarget::Time(t(17)), false).unwrap();
        assert_eq!(segnos(&p), [2, 3, 4]);
        assert_eq!(p.target, RecoveryTarget::Time(t(17)));

        // Nothing commits after it: everything, recovering to the end.
        let p = plan_clone_wal(&b, geometry(), all(), &RecoveryTarget::Time(t(58)), false).unwrap();
        assert_eq!(segnos(&p), [2, 3, 4, 5, 6, 7]);
        assert_eq!(p.target, RecoveryTarget::Latest);

        // ... unless the archive has a gap after the usable WAL.
        let e = refusal(plan_clone_wal(
            &b,
            geometry(),
            all(),
            &RecoveryTarget::Time(t(58)),
            true,
        ));
        assert!(e.contains("gap"), "{e}");
    }

    #[test]
    fn targets_in_the_agents_spelling() {
        assert_eq!(
            target_request(&RecoveryTarget::Immediate),
            TargetRequest::Immediate
        );
        assert_eq!(
            target_request(&RecoveryTarget::Time(t(5))),
            TargetRequest::Time("2026-12-06T09:05:00+00:00".into())
        );
        assert_eq!(
            target_request(&RecoveryTarget::Lsn {
                lsn: Lsn(0x1_0000_0010),
                inclusive: true
            }),
            TargetRequest::Lsn("1/10".into())
        );
        assert_eq!(
            target_request(&RecoveryTarget::Lsn {
                lsn: Lsn(0x1_0000_0010),
                inclusive: false
            }),
            TargetRequest::LsnBefore("1/10".into())
        );
        assert_eq!(
            target_request(&RecoveryTarget::Xid {
                xid: 742,
                inclusive: false
            }),
            TargetRequest::XidBefore("742".into())
        );
    }
}
