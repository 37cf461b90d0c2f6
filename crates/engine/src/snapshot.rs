//! Snapshot backups: a copy-on-write snapshot of the data directory, made by
//! the agent on the database host while the server is in backup mode.
//!
//! The server's side is the same as any non-exclusive base backup: an
//! ordinary session runs `pg_backup_start` and keeps running until
//! `pg_backup_stop`, which returns the `backup_label` and `tablespace_map`
//! contents; in between, the agent reflinks every file (seconds, whatever the
//! size). A second connection holds a temporary slot from before the start
//! and streams the WAL from start to stop into the repository, as physical
//! backups do, so the set restores by time with the archived WAL like any
//! other. If anything fails, the session is closed, which ends backup mode on
//! the server; the set is recorded `Failed` with the reason.
//!
//! Once complete (labels written), the snapshot's fingerprint (see
//! `strata_agent::fingerprint`) is recorded on the set; an upload, a clone and
//! a local restore compare it first and refuse a snapshot changed on the host
//! since, which is then no longer counted as local.
//!
//! The agent's credential is kept in the catalog as `plain:<hex>`, or
//! `sealed:<hex>` under the repository's data key when it is encrypted (as the
//! shared link key is).

use std::path::Path;

use chrono::Utc;
use pg_replication::{ConnectOptions, ReplicationClient};
use pg_wal::{Lsn, TimelineId};
use strata_agent::proto::HostFacts;
use strata_agent::proto::Manifest;
use strata_agent::{AgentClient, AgentError, AgentKey, Fingerprint, Labels, SnapshotName};
use strata_catalog::{BackupSet, Instance, Job, JobState};

use crate::backup::{open_wal_slot, BackupWal, StreamStart};
use crate::blocking::blocking;
use crate::catalog_retry::retry_busy;
use crate::connect::{connect_options, explain};
use crate::{Engine, EngineError, EngineResult, Progress};

pub(crate) fn agent_error(url: &str, e: AgentError) -> EngineError {
    let text = e.to_string();
    // The client's messages name the agent already; add it when they don't.
    let text = if text.contains(url) {
        text
    } else {
        format!("agent at {url}: {text}")
    };
    if e.is_unreachable() {
        EngineError::Unreachable(text)
    } else {
        EngineError::Refused(text)
    }
}

/// A SQL string literal for `text` (standard_conforming_strings is on in
/// every supported release).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Engine {
    /// The credential as the catalog keeps it for `instance_id`.
    pub fn stored_agent_key(&self, instance_id: &str, key: &AgentKey) -> EngineResult<String> {
        let label = format!("agent-key:{instance_id}");
        let hex_key = key.to_hex();
        Ok(match self.repo.seal_secret(hex_key.as_bytes(), &label)? {
            Some(sealed) => format!("sealed:{}", hex::encode(sealed)),
            None => format!("plain:{hex_key}"),
        })
    }

    /// Gives `instance` its agent: the URL, the credential (kept as
    /// [`Engine::stored_agent_key`] says) and the trusted certificate, then
    /// checks the agent as [`Engine::check_agent`] does (the instance's
    /// system identifier must be known for the check to mean anything).
    pub async fn attach_agent(
        &self,
        instance: &mut Instance,
        url: &str,
        key: &AgentKey,
        ca_file: Option<String>,
    ) -> EngineResult<HostFacts> {
        // Parsed by the client: a URL, never a connection string.
        let client = AgentClient::new(url, key.clone(), ca_file.as_deref().map(Path::new))
            .map_err(|e| EngineError::Refused(e.to_string()))?;
        // Requests are signed but answers are not: over the network only TLS
        // vouches that the files and changed ranges come from the agent.
        if !client.uses_tls() && !client.is_loopback() {
            return Err(EngineError::Refused(format!(
                "agent at {url}: plain http is accepted on the loopback only; serve the agent over TLS (strata agent --tls-cert/--tls-key) and register its https URL with its certificate or CA file"
            )));
        }
        // One agent serves one data directory: a second instance on it would
        // see the first one's snapshots as strays and delete them.
        let same = |other: &str| other.trim_end_matches('/') == url.trim_end_matches('/');
        if let Some(other) = self
            .catalog
            .list_instances()?
            .into_iter()
            .find(|i| i.id != instance.id && i.agent_url.as_deref().is_some_and(same))
        {
            return Err(EngineError::Refused(format!(
                "agent at {url} already serves instance {}; one agent serves one instance",
                other.id
            )));
        }
        instance.agent_url = Some(url.to_string());
        instance.agent_key = Some(self.stored_agent_key(&instance.id, key)?);
        instance.agent_ca = ca_file;
        self.check_agent(instance).await
    }

    /// A client for the instance's agent; `None` when it has none.
    pub fn agent(&self, instance: &Instance) -> EngineResult<Option<AgentClient>> {
        let Some(url) = &instance.agent_url else {
            return Ok(None);
        };
        let bad = |why: &str| {
            EngineError::Refused(format!(
                "instance {}: the stored agent credential is unusable ({why}); register the agent again",
                instance.id
            ))
        };
        let stored = instance.agent_key.as_deref().ok_or_else(|| bad("none"))?;
        let (form, text) = stored.split_once(':').ok_or_else(|| bad("no form"))?;
        let hex_key = match form {
            "plain" => text.to_string(),
            "sealed" => {
                let sealed = hex::decode(text).map_err(|_| bad("not hex"))?;
                let opened = self
                    .repo
                    .open_secret(&sealed, &format!("agent-key:{}", instance.id))?;
                String::from_utf8(opened).map_err(|_| bad("not text"))?
            }
            _ => return Err(bad("unknown form")),
        };
        let key = AgentKey::from_hex(&hex_key).ok_or_else(|| bad("not a key"))?;
        let client = AgentClient::new(url, key, instance.agent_ca.as_deref().map(Path::new))
            .map_err(|e| agent_error(url, e))?;
        Ok(Some(client))
    }

    /// Checks the agent of `instance` can take its snapshots: reachable with
    /// the credential, on a file system that clones files, serving the
    /// cluster whose system identifier `instance` has.
    pub async fn check_agent(&self, instance: &Instance) -> EngineResult<HostFacts> {
        let agent = self.agent(instance)?.ok_or_else(|| {
            EngineError::Refused(format!(
                "instance {} has no agent: snapshot backups need `strata agent` on the database host, registered with --agent",
                instance.id
            ))
        })?;
        let facts = agent
            .facts()
            .await
            .map_err(|e| agent_error(agent.url(), e))?;
        if !facts.fs.reflink {
            return Err(EngineError::Refused(format!(
                "data directory {} is on {}, which cannot clone files; snapshots need a file system with reflink (XFS made with -m reflink=1, or btrfs)",
                facts.data_dir.display(),
                facts.fs.fs_type
            )));
        }
        if let (Some(served), Some(expected)) =
            (facts.system_identifier, instance.system_identifier)
        {
            if served != expected {
                return Err(EngineError::Refused(format!(
                    "the agent at {} serves the cluster with system identifier {served}, not instance {}'s ({expected})",
                    agent.url(),
                    instance.id
                )));
            }
        }
        Ok(facts)
    }

    /// Takes the snapshot of a prepared snapshot set: backup mode on the
    /// server, the agent's reflink copy, the label files written into the
    /// snapshot, the WAL from start to stop stored. Fills in the set; the
    /// caller records the outcome.
    pub(crate) async fn run_snapshot(
        &self,
        instance: &Instance,
        set: &mut BackupSet,
        job: &mut Job,
        progress: &dyn Progress,
    ) -> EngineResult<u64> {
        let facts = self.check_agent(instance).await?;
        let agent = self
            .agent(instance)?
            .ok_or_else(|| EngineError::Refused("the instance's agent was removed".into()))?;
        let name = SnapshotName::new(set.id.as_str()).map_err(|e| {
            EngineError::Failed(format!("backup id {} as a snapshot name: {e}", set.id))
        })?;
        // The agent refuses a snapshot below its free-space floor itself; refused here first,
        // a short host is spared the checkpoint and backup mode.
        if let Some(why) = facts.min_free.refusal(
            &facts.snapshot_dir,
            facts.fs.free_bytes,
            facts.fs.total_bytes,
        ) {
            return Err(EngineError::Refused(format!(
                "agent at {} refused: {why}",
                agent.url()
            )));
        }

        // The temporary slot first, so the server keeps the WAL from before
        // the start; then the session that holds backup mode.
        let (wal_session, slot) = open_wal_slot(instance).await?;
        let geometry = wal_session.geometry;
        let system_id = wal_session.system_id;
        let mut opts: ConnectOptions = connect_options(instance)?;
        opts.replication = false;
        if opts.dbname.is_none() {
            opts.dbname = Some("postgres".into());
        }
        let mut session = ReplicationClient::connect(&opts)
            .await
            .map_err(|e| explain(instance, e))?;
        let version = session.server_version_num();
        let label = crate::snapshot_label(&name);
        let start_sql = if version >= 150000 {
            format!("SELECT pg_backup_start({}, true)::text", literal(&label))
        } else {
            format!(
                "SELECT pg_start_backup({}, true, false)::text",
                literal(&label)
            )
        };
        job.state = JobState::Preparing;
        let start_lsn = first_lsn(&mut session, &start_sql, instance).await?;
        let timeline = checkpoint_timeline(&mut session, instance).await?;
        let start = StreamStart {
            system_id,
            pg_version: version,
            wal_segment_size: geometry.segment_size(),
            start_lsn,
            start_timeline: timeline,
            start_time: Utc::now(),
            total: None,
            stop_time: None,
        };
        set.start_lsn = Some(start_lsn);
        set.start_timeline = Some(timeline);
        set.pg_version_num = Some(version);
        let wal = BackupWal::start(self, instance, wal_session, slot, &start, geometry);
        progress.message(&format!(
            "backup {}: backup mode on at {start_lsn}; snapshot through {}",
            set.id,
            agent.url()
        ));

        // Any failure from here drops `session`: the server ends backup mode
        // when its session goes.
        let created = agent
            .create_snapshot(&name)
            .await
            .map_err(|e| agent_error(agent.url(), e))?;
        let stop_sql = if version >= 150000 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let rows = session
            .simple_query(stop_sql)
            .await
            .map_err(|e| explain(instance, e))?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Server("pg_backup_stop returned no row".into()))?;
        let text = |i: usize| row.get(i).cloned().flatten();
        let stop_lsn: Lsn = text(0)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| EngineError::Server("pg_backup_stop returned no LSN".into()))?;
        let backup_label = text(1)
            .ok_or_else(|| EngineError::Server("pg_backup_stop returned no label".into()))?;
        let tablespace_map = text(2).filter(|m| !m.is_empty());
        drop(session);
        agent
            .put_labels(
                &name,
                &Labels {
                    backup_label,
                    tablespace_map,
                },
            )
            .await
            .map_err(|e| agent_error(agent.url(), e))?;
        // Each file is in the snapshot, consistent once the WAL to the stop
        // position is replayed: stored now, as a physical backup's is.
        wal.stored(stop_lsn).await?;
        // Complete: what a later use compares with.
        let listing = agent
            .manifest(&name)
            .await
            .map_err(|e| agent_error(agent.url(), e))?;
        set.snapshot_fingerprint = match Fingerprint::of(&listing) {
            Ok(f) => Some(f.to_string()),
            Err(e) => {
                progress.message(&format!(
                    "backup {}: no fingerprint, its uses are not checked: {e}",
                    set.id
                ));
                None
            }
        };

        let space = agent.space(&name).await.ok();
        set.stop_lsn = Some(stop_lsn);
        set.stop_timeline = Some(timeline);
        set.total_bytes = created.manifest.total_bytes();
        set.file_count = created.manifest.entries.len() as u64;
        set.snapshot_local = true;
        set.snapshot_bytes = space.map(|s| s.exclusive_bytes);
        progress.message(&format!(
            "backup {}: snapshot of {} files ({} bytes) in {} ms, consistent at {stop_lsn}",
            set.id, set.file_count, set.total_bytes, created.elapsed_ms
        ));
        Ok(created.elapsed_ms)
    }

    /// Deletes the local snapshot of a snapshot set on its agent.
    pub async fn delete_local_snapshot(
        &self,
        instance: &Instance,
        set: &BackupSet,
    ) -> EngineResult<()> {
        let agent = self.agent(instance)?.ok_or_else(|| {
            EngineError::Refused(format!("instance {} has no agent", instance.id))
        })?;
        let name = SnapshotName::new(set.id.as_str())
            .map_err(|e| EngineError::Failed(format!("backup id {}: {e}", set.id)))?;
        match agent.delete_snapshot(&name).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(strata_agent::proto::ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(agent_error(agent.url(), e)),
        }
    }

    /// Uploads the snapshot set `backup_id` from its agent into the
    /// repository under `job` (whose states it records), reading only the
    /// blocks changed since the newest earlier snapshot set of the instance
    /// that is both still on the host and uploaded. Records the set as
    /// uploaded with what the repository gained; on failure the job is
    /// `Failed` with the reason and the set stays as it was (its snapshot
    /// on the host, still restorable there).
    pub async fn run_snapshot_upload(
        &self,
        mut job: Job,
        progress: &dyn Progress,
    ) -> EngineResult<(BackupSet, crate::UploadReport)> {
        let outcome = self.upload_for_job(&mut job, progress).await;
        let now = Utc::now();
        job.finished_at = Some(now);
        match &outcome {
            Ok(_) => {
                job.state = JobState::Finished;
                job.progress = 100;
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(e.to_string());
            }
        }
        self.record_job("recording a snapshot upload's end", &job)
            .await?;
        outcome
    }

    async fn upload_for_job(
        &self,
        job: &mut Job,
        progress: &dyn Progress,
    ) -> EngineResult<(BackupSet, crate::UploadReport)> {
        let backup_id = job.backup_id.clone().ok_or_else(|| {
            EngineError::Refused(format!("snapshot upload job {} names no backup", job.id))
        })?;
        let engine = self.clone();
        let id = backup_id.clone();
        let (set, instance, sets) = blocking(move || {
            let set = engine.catalog.get_backup(&id)?;
            let instance = engine.catalog.get_instance(&set.instance_id)?;
            let sets = engine.catalog.list_backups(&set.instance_id)?;
            Ok((set, instance, sets))
        })
        .await?;
        if set.method != strata_catalog::BackupMethod::Snapshot || !set.snapshot_local {
            return Err(EngineError::Refused(format!(
                "backup {backup_id} is not a snapshot on the database host"
            )));
        }
        let agent = self.agent(&instance)?.ok_or_else(|| {
            EngineError::Refused(format!("instance {} has no agent", instance.id))
        })?;
        let base = sets
            .iter()
            .filter(|b| {
                b.method == strata_catalog::BackupMethod::Snapshot
                    && b.snapshot_local
                    && b.snapshot_uploaded
                    && b.status == strata_catalog::BackupStatus::Success
                    && b.started_at < set.started_at
            })
            .max_by_key(|b| b.started_at)
            .and_then(|b| {
                Some(crate::SnapshotBase {
                    snapshot: SnapshotName::new(b.id.as_str()).ok()?,
                    backup_id: b.id.clone(),
                })
            });
        job.state = JobState::Uploading;
        job.detail = format!("upload of snapshot backup {backup_id} to the repository");
        self.record_job("recording a snapshot upload's start", job)
            .await?;
        let snapshot = SnapshotName::new(set.id.as_str())
            .map_err(|e| EngineError::Failed(format!("backup id {}: {e}", set.id)))?;
        let report = self
            .upload_snapshot(
                crate::SnapshotUpload {
                    instance_id: instance.id.to_string(),
                    backup_id: set.id.clone(),
                    agent,
                    snapshot,
                    base,
                },
                progress,
            )
            .await?;
        // The row as it is now (another round may have changed its local
        // state meanwhile), with the upload recorded.
        let engine = self.clone();
        let (id, stats) = (set.id.clone(), report.stats.clone());
        let set = blocking(move || {
            let mut set = engine.catalog.get_backup(&id)?;
            set.snapshot_uploaded = true;
            set.new_bytes = stats.new_bytes;
            set.dedup_bytes = stats.dedup_bytes;
            set.stored_bytes = stats.stored_bytes;
            retry_busy("recording an uploaded snapshot", || {
                engine.catalog.update_backup(&set)
            })?;
            Ok(set)
        })
        .await?;
        Ok((set, report))
    }

    /// Refuses snapshot set `set` if its snapshot changed on the database host since its
    /// fingerprint was taken, as `listing` (just read from the agent) shows it; such a set is
    /// recorded as no longer local, so nothing uses the snapshot again. A set taken before
    /// fingerprints passes.
    pub(crate) async fn check_snapshot_unchanged(
        &self,
        set: &BackupSet,
        listing: &Manifest,
    ) -> EngineResult<()> {
        if set.snapshot_fingerprint.is_none() {
            return Ok(());
        }
        let (engine, set, listing) = (self.clone(), set.clone(), listing.clone());
        blocking(move || engine.refuse_changed_snapshot(&set, &listing)).await
    }

    /// [`Engine::check_snapshot_unchanged`] off the runtime.
    pub(crate) fn refuse_changed_snapshot(
        &self,
        set: &BackupSet,
        listing: &Manifest,
    ) -> EngineResult<()> {
        let Some(text) = &set.snapshot_fingerprint else {
            return Ok(());
        };
        let taken = Fingerprint::parse(text)
            .map_err(|e| EngineError::Failed(format!("backup {}: {e}", set.id)))?;
        let changed = taken
            .check(listing)
            .map_err(|e| EngineError::Refused(format!("snapshot {}: {e}", set.id)))?;
        let Some(what) = changed else {
            return Ok(());
        };
        tracing::warn!(backup = %set.id, "snapshot changed on the database host: {what}");
        let mut row = self.catalog.get_backup(&set.id)?;
        row.snapshot_local = false;
        retry_busy("recording a changed snapshot as not local", || {
            self.catalog.update_backup(&row)
        })?;
        let instead = if set.snapshot_uploaded {
            "restore from the repository"
        } else {
            "restore from another backup"
        };
        Err(EngineError::Refused(format!(
            "snapshot {} changed on the database host after it was taken ({what}); it is not used: {instead}",
            set.id
        )))
    }

    /// Records a set's new snapshot state (local copy gone, or uploaded).
    pub async fn record_snapshot_state(&self, set: BackupSet) -> EngineResult<()> {
        let engine = self.clone();
        blocking(move || Ok(engine.catalog.update_backup(&set)?)).await
    }
}

/// The LSN in the first column of the only row `sql` returns.
async fn first_lsn(
    session: &mut ReplicationClient,
    sql: &str,
    instance: &Instance,
) -> EngineResult<Lsn> {
    let rows = session
        .simple_query(sql)
        .await
        .map_err(|e| explain(instance, e))?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| EngineError::Server(format!("{sql:?} returned no LSN")))
}

/// The timeline of the server's latest checkpoint (the backup's, right after
/// it started).
async fn checkpoint_timeline(
    session: &mut ReplicationClient,
    instance: &Instance,
) -> EngineResult<TimelineId> {
    let rows = session
        .simple_query("SELECT timeline_id::text FROM pg_control_checkpoint()")
        .await
        .map_err(|e| explain(instance, e))?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|t| t.parse().ok())
        .map(TimelineId)
        .ok_or_else(|| EngineError::Server("pg_control_checkpoint returned no timeline".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(literal("strata snapshot 17"), "'strata snapshot 17'");
    }
}
