//! `repo reindex`: rebuilds the catalog's index of backup sets, WAL segments
//! and restore points from the repository alone (the repository is the
//! source of truth; jobs are operational history and are kept).

use serde::Serialize;
use strata_catalog::{BackupMode, BackupSet, BackupStatus, CatalogError, Instance};
use strata_repo::RepoError;

use crate::segment::record_segment;
use crate::{Engine, EngineResult};

/// What a reindex found in the repository and put in the catalog.
#[derive(Debug, Default, Serialize)]
pub struct ReindexReport {
    /// Instance records read.
    pub instances: u64,
    /// Instances the catalog did not know.
    pub instances_added: u64,
    /// Backup sets indexed.
    pub backups: u64,
    /// WAL segments indexed.
    pub wal_segments: u64,
}

impl Engine {
    /// Rebuilds the catalog's index from the repository (`strata repo reindex`).
    pub fn reindex(&self) -> EngineResult<ReindexReport> {
        let mut report = ReindexReport::default();
        self.catalog.clear_index()?;
        for rec in self.repo.list_instances()? {
            report.instances += 1;
            match self.catalog.get_instance(&rec.id) {
                Ok(_) => {}
                Err(CatalogError::InstanceNotFound(_)) => {
                    self.catalog.add_instance(&Instance {
                        id: rec.id.clone(),
                        host: rec.host.clone(),
                        port: rec.port,
                        user: rec.user.clone(),
                        password_env: rec.password_env.clone(),
                        password: None,
                        dbname: rec.dbname.clone(),
                        sslmode: rec.sslmode.parse().map_err(|e| RepoError::Corrupt {
                            object: strata_repo::instance_key(&rec.id),
                            reason: format!("{e}"),
                        })?,
                        sslrootcert: None,
                        system_identifier: None,
                        pg_version_num: None,
                        wal_segment_size: None,
                        created_at: rec.created_at,
                    })?;
                    report.instances_added += 1;
                }
                Err(e) => return Err(e.into()),
            }
            for backup_id in self.repo.list_backups(&rec.id)? {
                let m = self.repo.read_manifest(&rec.id, &backup_id)?;
                let inserted = self.catalog.insert_backup(&BackupSet {
                    id: m.backup_id.clone(),
                    instance_id: rec.id.clone(),
                    status: BackupStatus::Success,
                    // Manifests from before backup modes were recorded have none.
                    mode: if m.mode.is_empty() {
                        BackupMode::Manual
                    } else {
                        m.mode.parse().map_err(|e| RepoError::Corrupt {
                            object: strata_repo::manifest_key(&rec.id, &backup_id),
                            reason: format!("{e}"),
                        })?
                    },
                    started_at: m.start_time,
                    finished_at: Some(m.stop_time),
                    start_lsn: Some(m.start_lsn),
                    stop_lsn: Some(m.stop_lsn),
                    start_timeline: Some(m.start_timeline),
                    stop_timeline: Some(m.stop_timeline),
                    pg_version_num: Some(m.pg_version_num),
                    total_bytes: m.stats.total_bytes,
                    new_bytes: m.stats.new_bytes,
                    dedup_bytes: m.stats.dedup_bytes,
                    stored_bytes: m.stats.stored_bytes,
                    file_count: m.stats.file_count,
                    error: None,
                    job_id: None,
                });
                match inserted {
                    Ok(()) => {}
                    // Sets of two instances that started in the same
                    // millisecond (before ids were made unique) share an id;
                    // the catalog can index only one of them.
                    Err(strata_catalog::CatalogError::BackupExists(id)) => {
                        tracing::warn!(instance = %rec.id, "backup set {id} has the id of another instance's set; not indexed");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                report.backups += 1;
            }
            for obj in self.repo.list_wal(&rec.id)? {
                let (meta, _) = self.repo.read_wal(&obj.key)?;
                record_segment(self, &rec.id, &meta, obj.key.clone())?;
                report.wal_segments += 1;
            }
        }
        Ok(report)
    }
}
