//! Deleting backup sets and WAL objects, and garbage collection.
//!
//! Deleting a backup set removes only its manifest: the blocks it listed may
//! be shared with other sets. Garbage collection is mark and sweep: every
//! pack referenced by some committed manifest is kept, every other pack is
//! removed. A pack being written by a running backup is referenced by no
//! manifest yet, so the caller must make sure no backup runs during a
//! collection (the engine holds a lock for that).

use std::collections::HashSet;

use serde::Serialize;

use crate::{manifest_key, RepoResult, Repository};

/// What one collection did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub manifests_scanned: u64,
    pub packs_kept: u64,
    pub packs_deleted: u64,
}

impl Repository {
    /// Removes a backup set's manifest; its blocks go at the next collection.
    pub fn delete_backup(&self, instance_id: &str, backup_id: &str) -> RepoResult<()> {
        self.storage.delete(&manifest_key(instance_id, backup_id))?;
        Ok(())
    }

    /// Removes one WAL object (segment or partial segment) by key.
    pub fn delete_object(&self, key: &str) -> RepoResult<()> {
        self.storage.delete(key)?;
        Ok(())
    }

    /// Mark and sweep over every instance's manifests. The caller guarantees
    /// that no backup is writing packs meanwhile.
    pub fn collect_garbage(&self) -> RepoResult<GcReport> {
        let mut report = GcReport::default();
        let mut referenced: HashSet<String> = HashSet::new();
        for key in self.storage.list("instances/")? {
            let Some(rest) = key.strip_prefix("instances/") else {
                continue;
            };
            let Some((instance_id, backup_id)) = rest
                .strip_suffix(".manifest")
                .and_then(|r| r.split_once("/backups/"))
            else {
                continue;
            };
            // A set deleted since the listing has no blocks left to keep.
            let manifest = match self.read_manifest(instance_id, backup_id) {
                Ok(m) => m,
                Err(crate::RepoError::BackupNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            report.manifests_scanned += 1;
            for file in manifest.all_files() {
                for block in &file.blocks {
                    if !referenced.contains(&block.p) {
                        referenced.insert(block.p.clone());
                    }
                }
            }
        }
        for key in self.storage.list("packs/")? {
            let Some(id) = key
                .rsplit('/')
                .next()
                .and_then(|name| name.strip_suffix(".pack"))
            else {
                continue;
            };
            if referenced.contains(id) {
                report.packs_kept += 1;
            } else {
                self.storage.delete(&key)?;
                report.packs_deleted += 1;
            }
        }
        Ok(report)
    }
}
