//! `repo reindex`: rebuilds the catalog's index of backup sets, WAL segments
//! and restore points from the repository alone (the repository is the
//! source of truth; jobs are operational history and are kept, and so are
//! the keeps by hand and retention rules recorded on sets still stored), and
//! each instance's block index in the repository from its manifests.

use serde::Serialize;
use strata_catalog::CatalogError;

use crate::entities;
use crate::segment::record_segment;
use strata_repo::KeyDomain;

use crate::{Engine, EngineError, EngineResult};

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
    /// Blocks in the rebuilt block indexes of the instances.
    pub blocks: u64,
}

impl Engine {
    /// Rebuilds the catalog's index from the repository (`strata repo reindex`).
    /// Every encrypted instance's key domain is unlocked first (the KMS):
    /// while one cannot be, nothing is changed.
    pub fn reindex(&self) -> EngineResult<ReindexReport> {
        let repo = self.whole_repo_blocking("reindex")?;
        let mut report = ReindexReport::default();
        // What only the catalog knows of a set (a keep by hand, the rule it
        // was taken under) carries over to the rebuilt row.
        let mut known = std::collections::HashMap::new();
        for i in self.catalog.list_instances()? {
            for b in self.catalog.list_backups(&i.id)? {
                known.insert(b.id.clone(), (b.keep_until, b.keep_note, b.taken_under));
            }
        }
        self.catalog.clear_index()?;
        for rec in repo.list_instances()? {
            report.instances += 1;
            match self.catalog.get_instance(&rec.id) {
                Ok(_) => {}
                // A user backup's owner is never registered: its set is indexed alone.
                Err(CatalogError::InstanceNotFound(_))
                    if strata_catalog::Instance::owns_user_backup(&rec.id) => {}
                Err(CatalogError::InstanceNotFound(_)) => {
                    self.catalog
                        .add_instance(&entities::instance_from_record(&rec)?)?;
                    report.instances_added += 1;
                }
                Err(e) => return Err(e.into()),
            }
            for backup_id in repo.list_backups(&rec.id)? {
                let m = repo.read_manifest(&rec.id, &backup_id)?;
                let mut set = entities::backup_set_from_manifest(&rec.id, &m)?;
                if let Some((keep_until, keep_note, taken_under)) = known.remove(&set.id) {
                    (set.keep_until, set.keep_note, set.taken_under) =
                        (keep_until, keep_note, taken_under);
                }
                let inserted = self.catalog.insert_backup(&set);
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
            // The block index is written in the instance's own domain.
            let own = match repo.read_key_record(&rec.id)? {
                Some(k) => repo.writing_in(k.key_domain),
                None => repo.writing_in(KeyDomain::REPOSITORY),
            }
            .ok_or_else(|| {
                EngineError::Failed(format!("instance {}: key domain not unlocked", rec.id))
            })?;
            report.blocks += own.rebuild_block_index(&rec.id)?.entries;
            for obj in repo.list_wal(&rec.id)? {
                let (meta, _) = repo.read_wal(&obj.key)?;
                record_segment(self, &rec.id, &meta, obj.key.clone())?;
                report.wal_segments += 1;
            }
        }
        Ok(report)
    }
}
