//! Deleting backup sets and WAL objects, and garbage collection.
//!
//! Deleting a backup set removes only its manifest: the blocks it listed may
//! be shared with other sets. Garbage collection is mark and sweep with a
//! grace period (as rustic's prune keeps packs for `keep-delete`): every pack
//! referenced by some committed manifest is kept; a pack referenced by none
//! is deleted only when an earlier collection, at least the grace period
//! before, already found it unreferenced. Until then it is "pending", with
//! the time it was first found so; the caller keeps that list between runs.
//! A reader that opened a manifest before its set was deleted (a restore, a
//! download, a copy) therefore keeps every block it needs for at least the
//! grace period. A pack being written by a running backup is referenced by
//! no manifest yet, so the caller must also make sure no backup runs during
//! a collection: the engine holds the repository exclusively in the catalog
//! and checks before each deletion that it still does (the fence of
//! [`Repository::collect_garbage_fenced`]). The block index of an instance
//! left without sets is deleted too; other instances' indexes keep entries of
//! deleted packs, which readers ignore (see `index`).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::{manifest_key, PackId, RepoResult, Repository, StorageError};

/// What one collection did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GcReport {
    /// Manifests read to find the referenced packs.
    pub manifests_scanned: u64,
    /// Packs still referenced.
    pub packs_kept: u64,
    /// Unreferenced packs deleted (their grace period was over).
    pub packs_deleted: u64,
    /// Unreferenced packs kept until their grace period is over.
    pub packs_pending: u64,
    /// Unreferenced packs the store refused to delete: an Object Lock
    /// retention keeps them (they stay pending and go at a later run).
    pub packs_locked: u64,
    /// The latest retain-until date among them, when the store said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<DateTime<Utc>>,
    /// Unreferenced packs the store refused to delete for another reason
    /// (a legal hold, a missing permission); they stay pending too.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packs_refused: u64,
    /// Why, as the store showed it for the first of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_reason: Option<String>,
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Packs found unreferenced by earlier collections: pack id -> when first
/// found so.
pub type PendingPacks = BTreeMap<PackId, DateTime<Utc>>;

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

    /// Mark and sweep over every instance's manifests at `now`: an
    /// unreferenced pack goes when `pending` says it was already
    /// unreferenced `grace` ago (with a zero grace, at once). Returns what
    /// was done and the pending list for the next run. The caller
    /// guarantees that no backup is writing packs meanwhile.
    pub fn collect_garbage(
        &self,
        pending: &PendingPacks,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> RepoResult<(GcReport, PendingPacks)> {
        self.collect_garbage_fenced(pending, now, grace, &mut || true)
    }

    /// [`Repository::collect_garbage`] that asks `still_held` before each
    /// deletion whether the caller still holds the repository: once it
    /// says no, nothing more is deleted and the rest stays pending (with
    /// its first-seen time) for the next collection.
    pub fn collect_garbage_fenced(
        &self,
        pending: &PendingPacks,
        now: DateTime<Utc>,
        grace: Duration,
        still_held: &mut dyn FnMut() -> bool,
    ) -> RepoResult<(GcReport, PendingPacks)> {
        let mut held = true;
        let mut report = GcReport::default();
        let mut still_pending = PendingPacks::new();
        let mut referenced: HashSet<PackId> = HashSet::new();
        // Index runs by instance, and the instances that still have a set.
        let mut index_runs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut with_sets: HashSet<String> = HashSet::new();
        for key in self.storage.list("instances/")? {
            let Some(rest) = key.strip_prefix("instances/") else {
                continue;
            };
            if let Some((instance_id, _)) = rest.split_once("/index/") {
                index_runs
                    .entry(instance_id.to_string())
                    .or_default()
                    .push(key.clone());
                continue;
            }
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
            with_sets.insert(instance_id.to_string());
            for file in manifest.all_files() {
                for block in &file.blocks {
                    if !referenced.contains(&block.pack) {
                        referenced.insert(block.pack.clone());
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
                continue;
            }
            let since = pending.get(id).copied().unwrap_or(now);
            let due = since
                .checked_add_signed(grace)
                .is_some_and(|end| end <= now);
            if due && held {
                held = still_held();
            }
            if due && held {
                match self.storage.delete(&key) {
                    Ok(()) => report.packs_deleted += 1,
                    Err(StorageError::Locked { until, .. }) => {
                        report.packs_locked += 1;
                        report.locked_until = report.locked_until.max(until);
                        still_pending.insert(PackId::from(id), since);
                    }
                    Err(e @ StorageError::DeleteRefused { .. }) => {
                        report.packs_refused += 1;
                        report.refused_reason.get_or_insert_with(|| e.to_string());
                        still_pending.insert(PackId::from(id), since);
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                still_pending.insert(PackId::from(id), since);
                report.packs_pending += 1;
            }
        }
        // An instance without sets has nothing to deduplicate against: its
        // block index would only point into the packs just deleted.
        for (instance_id, keys) in index_runs {
            if with_sets.contains(&instance_id) {
                continue;
            }
            if held {
                held = still_held();
            }
            if !held {
                break;
            }
            for key in keys {
                self.storage.delete(&key)?;
            }
        }
        Ok((report, still_pending))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{Duration, Utc};

    use super::*;
    use crate::manifest::BackupManifest;
    use crate::{pack_key, BlockIndex, BlockRef, LocalStorage, Storage};

    fn manifest(id: &str, blocks: Vec<BlockRef>) -> BackupManifest {
        crate::manifest::one_file_manifest("i", id, blocks, 1)
    }

    /// One block in a pack of its own.
    fn stored(repo: &Repository, byte: u8) -> BlockRef {
        let mut w = repo.block_writer(BlockIndex::default());
        let block = w.add(&vec![byte; 4096]).unwrap();
        w.finish().unwrap();
        block
    }

    #[test]
    fn an_unreferenced_pack_goes_only_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let repo = Repository::open_or_init(storage.clone()).unwrap();
        let kept = stored(&repo, 1);
        let garbage = stored(&repo, 2);
        assert_ne!(kept.pack, garbage.pack);
        repo.commit_manifest(&manifest("1", vec![kept.clone()]))
            .unwrap();
        let exists = |b: &BlockRef| storage.exists(&pack_key(&b.pack)).unwrap();
        let grace = Duration::hours(1);
        let t0 = Utc::now();

        // First sight: pending, not deleted.
        let (report, pending) = repo
            .collect_garbage(&PendingPacks::new(), t0, grace)
            .unwrap();
        assert_eq!(
            (
                report.packs_kept,
                report.packs_deleted,
                report.packs_pending
            ),
            (1, 0, 1)
        );
        assert_eq!(pending.get(&garbage.pack), Some(&t0));

        // The set is deleted; its pack becomes pending at t1, the first one
        // keeps its t0.
        repo.delete_backup("i", "1").unwrap();
        let t1 = t0 + Duration::minutes(30);
        let (report, pending) = repo.collect_garbage(&pending, t1, grace).unwrap();
        assert_eq!((report.packs_deleted, report.packs_pending), (0, 2));
        assert_eq!(pending.get(&garbage.pack), Some(&t0));
        assert_eq!(pending.get(&kept.pack), Some(&t1));
        assert!(exists(&garbage) && exists(&kept));
        assert_eq!(repo.read_block(&kept).unwrap(), vec![1; 4096]);

        // One grace after t0: only the first pack goes.
        let t2 = t0 + grace;
        let (report, pending) = repo.collect_garbage(&pending, t2, grace).unwrap();
        assert_eq!((report.packs_deleted, report.packs_pending), (1, 1));
        assert!(!exists(&garbage) && exists(&kept));

        // One grace after t1: the second.
        let (report, pending) = repo.collect_garbage(&pending, t1 + grace, grace).unwrap();
        assert_eq!((report.packs_deleted, report.packs_pending), (1, 0));
        assert!(pending.is_empty() && !exists(&kept));
    }

    #[test]
    fn a_collector_that_lost_its_hold_deletes_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let repo = Repository::open_or_init(storage.clone()).unwrap();
        let packs: Vec<BlockRef> = (10..13).map(|b| stored(&repo, b)).collect();
        let t0 = Utc::now() - Duration::hours(2);
        let pending: PendingPacks = packs.iter().map(|b| (b.pack.clone(), t0)).collect();
        // Held for the first deletion only, then taken over.
        let mut asked = 0;
        let (report, still) = repo
            .collect_garbage_fenced(&pending, Utc::now(), Duration::hours(1), &mut || {
                asked += 1;
                asked == 1
            })
            .unwrap();
        assert_eq!((report.packs_deleted, report.packs_pending), (1, 2));
        assert_eq!(asked, 2, "not asked again once the hold was lost");
        let left: Vec<&BlockRef> = packs
            .iter()
            .filter(|b| storage.exists(&pack_key(&b.pack)).unwrap())
            .collect();
        assert_eq!(left.len(), 2);
        // What was not deleted keeps its first-seen time for the next run.
        for b in left {
            assert_eq!(still.get(&b.pack), Some(&t0));
        }
    }

    #[test]
    fn a_pending_pack_referenced_again_is_kept_and_zero_grace_deletes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let repo = Repository::open_or_init(storage.clone()).unwrap();
        let block = stored(&repo, 3);
        let t0 = Utc::now();
        let (_, pending) = repo
            .collect_garbage(&PendingPacks::new(), t0, Duration::hours(1))
            .unwrap();
        assert_eq!(pending.len(), 1);
        repo.commit_manifest(&manifest("2", vec![block.clone()]))
            .unwrap();
        let later = t0 + Duration::hours(2);
        let (report, pending) = repo
            .collect_garbage(&pending, later, Duration::hours(1))
            .unwrap();
        assert_eq!((report.packs_kept, report.packs_deleted), (1, 0));
        assert!(pending.is_empty());

        repo.delete_backup("i", "2").unwrap();
        let (report, pending) = repo
            .collect_garbage(&pending, later, Duration::zero())
            .unwrap();
        assert_eq!(report.packs_deleted, 1);
        assert!(pending.is_empty());
        assert!(!storage.exists(&pack_key(&block.pack)).unwrap());
    }
}
