//! `repo verify`: re-reads every object and checks every hash, then checks
//! that every block a manifest references is present and intact, naming the
//! backup sets a damaged object affects.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use crate::object::{open, ObjectKind};
use crate::pack::verify_pack;
use crate::{BlockHash, PackId, RepoError, RepoResult, Repository, StorageError, CONFIG_KEY};

/// Something verification found wrong.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyProblem {
    /// Key of the object.
    pub object: String,
    /// What is wrong with it.
    pub reason: String,
    /// Backup sets (as `instance/backup`) that cannot be restored because of it.
    pub backups_affected: Vec<String>,
}

/// What a verification checked and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Objects read and checked.
    pub objects_checked: u64,
    /// Bytes read.
    pub bytes_checked: u64,
    /// Packs checked.
    pub packs_checked: u64,
    /// Blocks checked.
    pub blocks_checked: u64,
    /// Backup sets checked.
    pub backups_checked: u64,
    /// WAL objects checked.
    pub wal_objects_checked: u64,
    /// Everything found wrong.
    pub problems: Vec<VerifyProblem>,
    /// Packs no manifest references (left by interrupted backups); harmless,
    /// removed by garbage collection.
    pub unreferenced_packs: Vec<String>,
}

impl VerifyReport {
    /// True when nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Repository {
    /// Checks the whole repository. `progress(done, total)` is called after
    /// each object.
    pub fn verify(&self, progress: &dyn Fn(u64, u64)) -> RepoResult<VerifyReport> {
        let keys: Vec<String> = self
            .storage
            .list("")?
            .into_iter()
            .filter(|k| k != CONFIG_KEY && !k.starts_with("tmp/"))
            .collect();
        let total = keys.len() as u64;
        let mut report = VerifyReport::default();
        // pack id -> (offset -> hash) for every intact pack.
        let mut packs: HashMap<PackId, HashMap<u64, BlockHash>> = HashMap::new();
        let mut bad_packs: HashMap<PackId, usize> = HashMap::new();
        let mut manifests = Vec::new();
        for (done, key) in keys.iter().enumerate() {
            let bytes = match self.storage.get(key) {
                Ok(b) => b,
                // Listed, then gone: deleted meanwhile (retention, a partial
                // WAL object replaced by its complete segment), not damaged.
                // A pack a manifest still needs is reported below anyway.
                Err(StorageError::NotFound(_)) => {
                    progress(done as u64 + 1, total);
                    continue;
                }
                Err(e) => {
                    report.problems.push(problem(key, e.to_string()));
                    continue;
                }
            };
            report.objects_checked += 1;
            report.bytes_checked += bytes.len() as u64;
            if let Some(id) = key
                .strip_prefix("packs/")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(_, file)| file.strip_suffix(".pack"))
            {
                report.packs_checked += 1;
                match verify_pack(&self.keys, key, &bytes) {
                    Ok(entries) => {
                        report.blocks_checked += entries.len() as u64;
                        packs.insert(
                            PackId::from(id),
                            entries.into_iter().map(|e| (e.offset, e.hash)).collect(),
                        );
                    }
                    Err(e) => {
                        bad_packs.insert(PackId::from(id), report.problems.len());
                        report.problems.push(problem(key, e.to_string()));
                    }
                }
            } else if key.ends_with(".manifest") {
                report.backups_checked += 1;
                match self.decode_manifest(key, &bytes) {
                    Ok(m) => manifests.push(m),
                    Err(e) => {
                        let mut p = problem(key, e.to_string());
                        p.backups_affected = backup_name_from_key(key).into_iter().collect();
                        report.problems.push(p);
                    }
                }
            } else if key.ends_with(".history") {
                if let Err(e) =
                    open::<serde_json::Value>(&self.keys, key, ObjectKind::TimelineHistory, &bytes)
                {
                    report.problems.push(problem(key, e.to_string()));
                }
            } else if key.ends_with("/instance") {
                if let Err(e) = self.open_instance_record(key, &bytes) {
                    report.problems.push(problem(key, e.to_string()));
                }
            } else if key.ends_with("/encryption-key.json") {
                let instance = key
                    .strip_prefix("instances/")
                    .and_then(|k| k.strip_suffix("/encryption-key.json"))
                    .unwrap_or_default();
                if let Err(e) = self.read_key_record(instance) {
                    report.problems.push(problem(key, e.to_string()));
                }
            } else if key.contains("/index/") && key.ends_with(".run") {
                if let Err(e) = self.check_index_run(key, &bytes) {
                    report.problems.push(problem(key, e.to_string()));
                }
            } else if key.contains("/wal/") {
                report.wal_objects_checked += 1;
                let checked = if key.contains(".partial.d/") {
                    self.check_wal_tail(key)
                } else {
                    self.read_wal(key).map(|_| ())
                };
                match checked {
                    Ok(_) | Err(RepoError::Storage(StorageError::NotFound(_))) => {}
                    Err(e) => report.problems.push(problem(key, e.to_string())),
                }
            } else {
                report
                    .problems
                    .push(problem(key, "unexpected object in the repository".into()));
            }
            progress(done as u64 + 1, total);
        }

        let mut referenced = BTreeSet::new();
        for m in &manifests {
            let name = format!("{}/{}", m.instance_id, m.backup_id);
            let mut missing: HashMap<PackId, String> = HashMap::new();
            for file in m.all_files() {
                for b in &file.blocks {
                    referenced.insert(b.pack.clone());
                    if let Some(&i) = bad_packs.get(&b.pack) {
                        if !report.problems[i].backups_affected.contains(&name) {
                            report.problems[i].backups_affected.push(name.clone());
                        }
                        continue;
                    }
                    let ok = packs
                        .get(&b.pack)
                        .and_then(|entries| entries.get(&b.offset))
                        .is_some_and(|h| *h == b.hash);
                    if !ok {
                        missing.entry(b.pack.clone()).or_insert_with(|| {
                            format!(
                                "block {} of {} (at offset {}) is missing",
                                b.hash, file.path, b.offset
                            )
                        });
                    }
                }
            }
            for (pack, reason) in missing {
                report.problems.push(VerifyProblem {
                    object: crate::pack_key(&pack),
                    reason,
                    backups_affected: vec![name.clone()],
                });
            }
        }
        report.unreferenced_packs = packs
            .keys()
            .filter(|id| !referenced.contains(*id))
            .map(|id| crate::pack_key(id))
            .collect();
        report.unreferenced_packs.sort();
        Ok(report)
    }
}

fn problem(key: &str, reason: String) -> VerifyProblem {
    VerifyProblem {
        object: key.to_string(),
        reason,
        backups_affected: Vec::new(),
    }
}

fn backup_name_from_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("instances/")?;
    let (instance, rest) = rest.split_once('/')?;
    let id = rest.strip_prefix("backups/")?.strip_suffix(".manifest")?;
    Some(format!("{instance}/{id}"))
}
