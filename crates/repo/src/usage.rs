//! How many bytes the repository holds for each instance, as the store
//! counts them (object sizes from its listing: what it bills).
//!
//! The rule, exact to the byte (docs/DESIGN.md, "Storage usage"):
//! - everything under `instances/<id>/wal/` (segments, partial segments,
//!   timeline histories) is that instance's WAL;
//! - everything else under `instances/<id>/` (manifests, the instance
//!   record) is that instance's backup data;
//! - a pack is backup data of the instances whose committed manifests
//!   reference at least one of its blocks: its whole object size (blocks of
//!   deleted sets still inside a live pack included, since they are stored
//!   until the pack goes), split evenly between them, the bytes left over by
//!   the division going one each to the first instances in id order;
//! - packs no manifest references (an interrupted backup, or garbage waiting
//!   for collection), `strata-repo.json` and anything else are nobody's:
//!   `unattributed_bytes`. Every listed byte lands in exactly one figure.
//!
//! Manifests never change once committed, so a [`UsageCache`] keeps what
//! each one references and a later measurement reads only new manifests.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::{InstanceId, PackId, RepoError, RepoResult, Repository};

/// Bytes stored for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstanceUsage {
    /// Committed backup sets (manifests) of the instance.
    pub backup_sets: u64,
    /// Sum of the data size of those sets (what restoring each writes).
    pub logical_bytes: u64,
    /// The instance's share of packs.
    pub pack_bytes: u64,
    /// Manifests and the instance record.
    pub metadata_bytes: u64,
    /// WAL segments, partial segments and timeline histories.
    pub wal_bytes: u64,
    /// Some of its sets are in a key domain this measurement could not open
    /// (its KMS key disabled or deleted): those sets are not counted and the
    /// packs only they use are unattributed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub locked: bool,
}

impl InstanceUsage {
    /// Backup data stored: pack share plus manifests and record.
    pub fn data_bytes(&self) -> u64 {
        self.pack_bytes + self.metadata_bytes
    }

    /// Everything stored for the instance.
    pub fn stored_bytes(&self) -> u64 {
        self.data_bytes() + self.wal_bytes
    }
}

/// One measurement of the whole repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepositoryUsage {
    /// Bytes attributed to each instance, by instance id.
    pub instances: BTreeMap<InstanceId, InstanceUsage>,
    /// Bytes attributed to no instance (see the module documentation).
    pub unattributed_bytes: u64,
    /// Every object's size added up.
    pub total_bytes: u64,
}

/// What a committed manifest references, remembered between measurements.
#[derive(Debug, Clone)]
struct ManifestRefs {
    size: u64,
    logical_bytes: u64,
    packs: Vec<PackId>,
}

/// Per-manifest results of earlier measurements, keyed by object key.
#[derive(Debug, Default)]
pub struct UsageCache {
    manifests: HashMap<String, ManifestRefs>,
}

impl Repository {
    /// Lists every object with its size and attributes each byte by the
    /// rule above. Reads only the manifests `cache` has not seen.
    pub fn measure_usage(&self, cache: &mut UsageCache) -> RepoResult<RepositoryUsage> {
        let objects = self.storage.list_sizes("")?;
        let mut usage = RepositoryUsage::default();
        let mut packs: Vec<(PackId, u64)> = Vec::new();
        let mut pack_users: HashMap<PackId, BTreeSet<InstanceId>> = HashMap::new();
        let mut seen_manifests = Vec::new();
        for object in &objects {
            usage.total_bytes += object.size;
            if let Some(name) = object.key.strip_prefix("packs/") {
                let id = name
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.strip_suffix(".pack"));
                match id {
                    Some(id) => packs.push((PackId::from(id), object.size)),
                    None => usage.unattributed_bytes += object.size,
                }
                continue;
            }
            let Some((instance_id, rest)) = object
                .key
                .strip_prefix("instances/")
                .and_then(|r| r.split_once('/'))
            else {
                usage.unattributed_bytes += object.size;
                continue;
            };
            let entry = usage
                .instances
                .entry(InstanceId::from(instance_id))
                .or_default();
            if rest.starts_with("wal/") {
                entry.wal_bytes += object.size;
                continue;
            }
            entry.metadata_bytes += object.size;
            let Some(backup_id) = rest
                .strip_prefix("backups/")
                .and_then(|r| r.strip_suffix(".manifest"))
            else {
                continue;
            };
            let cached = cache
                .manifests
                .get(&object.key)
                .filter(|m| m.size == object.size);
            let refs = match cached {
                Some(refs) => refs.clone(),
                None => match self.read_manifest(instance_id, backup_id) {
                    Ok(m) => {
                        let packs: BTreeSet<&PackId> = m
                            .all_files()
                            .flat_map(|f| f.blocks.iter().map(|b| &b.pack))
                            .collect();
                        let refs = ManifestRefs {
                            size: object.size,
                            logical_bytes: m.stats.total_bytes,
                            packs: packs.into_iter().cloned().collect(),
                        };
                        cache.manifests.insert(object.key.clone(), refs.clone());
                        refs
                    }
                    // Deleted since the listing: its bytes are gone too.
                    Err(RepoError::BackupNotFound(_)) => {
                        entry.metadata_bytes -= object.size;
                        usage.total_bytes -= object.size;
                        continue;
                    }
                    // An instance domain the reader does not hold: reported,
                    // not failed, so the other instances' figures stand.
                    Err(RepoError::DomainLocked { .. }) => {
                        entry.locked = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            seen_manifests.push(object.key.clone());
            entry.backup_sets += 1;
            entry.logical_bytes += refs.logical_bytes;
            for pack in refs.packs {
                pack_users
                    .entry(pack)
                    .or_default()
                    .insert(InstanceId::from(instance_id));
            }
        }
        // Deleted manifests leave the cache.
        let seen: BTreeSet<String> = seen_manifests.into_iter().collect();
        cache.manifests.retain(|key, _| seen.contains(key));
        for (id, size) in packs {
            let Some(users) = pack_users.get(&id) else {
                usage.unattributed_bytes += size;
                continue;
            };
            let n = users.len() as u64;
            for (i, user) in users.iter().enumerate() {
                let share = size / n + u64::from((i as u64) < size % n);
                usage.instances.entry(user.clone()).or_default().pack_bytes += share;
            }
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::manifest::BackupManifest;
    use crate::{BlockIndex, BlockRef, LocalStorage, Storage};

    use super::*;

    fn manifest(instance: &str, id: &str, blocks: Vec<BlockRef>, total: u64) -> BackupManifest {
        crate::manifest::one_file_manifest(instance, id, blocks, total)
    }

    /// Sizes straight from the file system, by key prefix.
    fn sizes(root: &std::path::Path, prefix: &str) -> u64 {
        let mut total = 0;
        let mut stack = vec![root.join(prefix)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.path() == root.join("tmp") {
                    continue;
                }
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    total += e.metadata().unwrap().len();
                }
            }
        }
        total
    }

    #[test]
    fn shared_and_unreferenced_packs_and_every_byte_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let storage = Arc::new(LocalStorage::new(&root).unwrap());
        let repo = Repository::open_or_init(storage.clone()).unwrap();
        let block = |seed: u8| -> Vec<u8> { (0..5000u32).map(|i| (i as u8) ^ seed).collect() };
        // Pack 1: blocks used by both instances. Pack 2: only by "b". Pack 3: nobody.
        let mut w = repo.block_writer(BlockIndex::default());
        let shared = w.add(&block(1)).unwrap();
        w.finish().unwrap();
        let mut w = repo.block_writer(BlockIndex::default());
        let own = w.add(&block(2)).unwrap();
        w.finish().unwrap();
        let mut w = repo.block_writer(BlockIndex::default());
        w.add(&block(3)).unwrap();
        w.finish().unwrap();
        repo.commit_manifest(&manifest("a", "1", vec![shared.clone()], 5000))
            .unwrap();
        repo.commit_manifest(&manifest(
            "b",
            "2",
            vec![shared.clone(), own.clone()],
            10000,
        ))
        .unwrap();
        storage
            .put(
                "instances/b/wal/00000001/000000010000000000000002",
                b"wal bytes",
            )
            .unwrap();

        let mut cache = UsageCache::default();
        let usage = repo.measure_usage(&mut cache).unwrap();
        let pack_size = |r: &BlockRef| {
            std::fs::metadata(root.join(crate::pack_key(&r.pack)))
                .unwrap()
                .len()
        };
        let (p1, p2) = (pack_size(&shared), pack_size(&own));
        let a = &usage.instances["a"];
        let b = &usage.instances["b"];
        assert_eq!(a.pack_bytes, p1 / 2 + p1 % 2);
        assert_eq!(b.pack_bytes, p1 / 2 + p2);
        assert_eq!(a.metadata_bytes, sizes(&root, "instances/a"));
        assert_eq!(b.wal_bytes, 9);
        assert_eq!(b.metadata_bytes, sizes(&root, "instances/b") - 9);
        assert_eq!((a.logical_bytes, b.logical_bytes), (5000, 10000));
        assert_eq!((a.backup_sets, b.backup_sets), (1, 1));
        assert_eq!(usage.total_bytes, sizes(&root, ""));
        let packs_total = sizes(&root, "packs");
        assert_eq!(
            usage.unattributed_bytes,
            packs_total - p1 - p2
                + std::fs::metadata(root.join(crate::CONFIG_KEY))
                    .unwrap()
                    .len()
        );
        assert_eq!(
            a.stored_bytes() + b.stored_bytes() + usage.unattributed_bytes,
            usage.total_bytes
        );

        // Deleting b's set: its pack becomes unattributed, the shared one a's alone.
        repo.delete_backup("b", "2").unwrap();
        let usage = repo.measure_usage(&mut cache).unwrap();
        assert_eq!(usage.instances["a"].pack_bytes, p1);
        assert_eq!(usage.instances["b"].pack_bytes, 0);
        assert_eq!(usage.instances["b"].backup_sets, 0);
        assert_eq!(cache.manifests.len(), 1);
    }

    #[test]
    fn an_instance_domain_not_held_is_marked_locked_and_the_rest_counted() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(LocalStorage::new(dir.path()).unwrap());
        let repo = Repository::open_or_init(storage).unwrap();
        let keys = crate::Keys::instance_domain(
            crate::KeyDomain(0x5eed),
            zeroize::Zeroizing::new([9; 32]),
            repo.repository_keys(),
        )
        .unwrap();
        let enc = repo.in_domain(keys);
        let mut w = repo.block_writer(BlockIndex::default());
        let plain = w.add(&[1u8; 4000]).unwrap();
        w.finish().unwrap();
        let mut w = enc.block_writer(BlockIndex::default());
        let sealed = w.add(&[2u8; 4000]).unwrap();
        w.finish().unwrap();
        repo.commit_manifest(&manifest("a", "1", vec![plain], 4000))
            .unwrap();
        enc.commit_manifest(&manifest("e", "2", vec![sealed], 4000))
            .unwrap();

        let usage = repo.measure_usage(&mut UsageCache::default()).unwrap();
        assert!(!usage.instances["a"].locked);
        assert_eq!(usage.instances["a"].backup_sets, 1);
        let e = &usage.instances["e"];
        assert!(e.locked);
        assert_eq!((e.backup_sets, e.pack_bytes), (0, 0));

        let all = repo.with_read_domains(vec![enc.domain_keys()]);
        let usage = all.measure_usage(&mut UsageCache::default()).unwrap();
        let e = &usage.instances["e"];
        assert!(!e.locked);
        assert_eq!(e.backup_sets, 1);
        assert!(e.pack_bytes > 0);
    }
}
