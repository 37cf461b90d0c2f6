//! Cross-region copies: a backup set or a WAL segment of one repository
//! written into another (RDS's cross-region backup).
//!
//! The two repositories hash blocks with different keys, so a block's
//! address in the target is only known from its raw bytes. A copy therefore
//! reads each block from the source and adds it through the target's
//! [`BlockWriter`](strata_repo::BlockWriter), which hashes with the target's
//! key and stores only blocks the target lacks. Blocks of earlier copies are
//! not even read: an earlier copy's target manifest lists exactly the same
//! files and blocks as its source manifest, so pairing the two gives the
//! target address of every source block they share. The manifest is written
//! last, so a copy cut short is no copy (its packs are garbage).

use std::collections::HashMap;

use strata_catalog::WalSegmentRow;
use strata_repo::{
    BackupId, BackupManifest, BackupStats, BlockHash, BlockRef, RepoError, Repository,
};

use crate::{EngineError, EngineResult};

/// What copying one backup set did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Blocks read from the source (those no earlier copy had).
    pub blocks_read: u64,
    /// Blocks whose target address an earlier copy gave.
    pub blocks_known: u64,
    /// Counters of the target's block writer.
    pub stats: BackupStats,
}

/// Target addresses of source blocks, learned from earlier copies.
#[derive(Default)]
pub struct CopiedBlocks {
    map: HashMap<BlockHash, BlockRef>,
}

impl CopiedBlocks {
    /// Pairs the source and target manifests of sets copied before (ids in
    /// `backup_ids`); a set missing on either side is skipped.
    pub fn learn(
        source: &Repository,
        target: &Repository,
        instance_id: &str,
        backup_ids: &[BackupId],
    ) -> EngineResult<CopiedBlocks> {
        let mut known = CopiedBlocks::default();
        for id in backup_ids {
            let (Some(from), Some(to)) = (
                read_if_present(source, instance_id, id)?,
                read_if_present(target, instance_id, id)?,
            ) else {
                continue;
            };
            for (a, b) in from.all_files().zip(to.all_files()) {
                if a.path != b.path || a.blocks.len() != b.blocks.len() {
                    return Err(EngineError::Failed(format!(
                        "the copy of backup {id} does not list the same files as its source"
                    )));
                }
                for (sa, tb) in a.blocks.iter().zip(&b.blocks) {
                    known.map.entry(sa.hash).or_insert_with(|| tb.clone());
                }
            }
        }
        Ok(known)
    }
}

fn read_if_present(
    repo: &Repository,
    instance_id: &str,
    backup_id: &str,
) -> EngineResult<Option<BackupManifest>> {
    match repo.read_manifest(instance_id, backup_id) {
        Ok(m) => Ok(Some(m)),
        Err(RepoError::BackupNotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Copies backup set `backup_id` of `instance_id` from `source` to
/// `target`; the target manifest is committed last.
pub fn copy_backup_set(
    source: &Repository,
    target: &Repository,
    instance_id: &str,
    backup_id: &str,
    known: &CopiedBlocks,
) -> EngineResult<CopyReport> {
    let manifest = source.read_manifest(instance_id, backup_id)?;
    let mut writer = target.block_writer(target.block_index(instance_id)?);
    let mut report = CopyReport::default();
    let mut copy = manifest.clone();
    let files = copy.files.iter_mut().chain(copy.server_manifest.iter_mut());
    for file in files {
        let mut blocks = Vec::with_capacity(file.blocks.len());
        let mut to_read = Vec::new();
        for (i, b) in file.blocks.iter().enumerate() {
            match known.map.get(&b.hash) {
                Some(t) => blocks.push(Some(t.clone())),
                None => {
                    blocks.push(None);
                    to_read.push((i, b.clone()));
                }
            }
        }
        report.blocks_known += (file.blocks.len() - to_read.len()) as u64;
        report.blocks_read += to_read.len() as u64;
        let refs: Vec<BlockRef> = to_read.iter().map(|(_, b)| b.clone()).collect();
        let mut slots = to_read.iter().map(|(i, _)| *i);
        source.read_blocks(&refs, |raw| -> EngineResult<()> {
            let at = slots.next().expect("one slot per block read");
            blocks[at] = Some(writer.add(&raw)?);
            Ok(())
        })?;
        file.blocks = blocks
            .into_iter()
            .map(|b| b.expect("every block was known or read"))
            .collect();
    }
    let (stats, added) = writer.finish_indexed()?;
    report.stats = stats;
    target.commit_backup(&copy, added)?;
    Ok(report)
}

/// Copies one complete WAL segment (`row` is the source's catalog row) and
/// returns the row describing the copy: the target's object key and its
/// checksum (keyed with the target's hash key).
pub fn copy_wal_segment(
    source: &Repository,
    target: &Repository,
    row: &WalSegmentRow,
) -> EngineResult<WalSegmentRow> {
    let (mut meta, data) = source.read_wal(&row.object_key)?;
    meta.checksum = target.wal_checksum(&data);
    let key = target.put_wal_segment(&row.instance_id, &meta, &data)?;
    Ok(WalSegmentRow {
        object_key: key,
        checksum: meta.checksum,
        ..row.clone()
    })
}

/// Copies the instance's record (host, user, no password) when the target
/// lacks it, so the target can be reindexed on its own: as the catalog has
/// it (`registered`), else as the source repository records it, without
/// the variable holding the password unless the source is encrypted. An
/// unencrypted repository's record may be forged, and an encrypted target
/// would vouch for it (a reindex of the target trusts it).
pub fn copy_instance_record(
    source: &Repository,
    target: &Repository,
    instance_id: &str,
    registered: Option<&strata_catalog::Instance>,
) -> EngineResult<()> {
    if target.read_instance(instance_id)?.is_some() {
        return Ok(());
    }
    let rec = match registered {
        Some(instance) => Some(crate::entities::instance_record(instance)),
        None => source.read_instance(instance_id)?.map(|mut rec| {
            if !source.is_encrypted() {
                rec.password_env = None;
            }
            rec
        }),
    };
    if let Some(rec) = rec {
        target.put_instance(&rec)?;
    }
    Ok(())
}

/// Copies every timeline history of an instance the target lacks.
pub fn copy_histories(
    source: &Repository,
    target: &Repository,
    instance_id: &str,
) -> EngineResult<usize> {
    let have = target.list_histories(instance_id)?;
    let mut copied = 0;
    for tli in source.list_histories(instance_id)? {
        if have.contains(&tli) {
            continue;
        }
        if let Some(bytes) = source.read_history(instance_id, tli)? {
            target.put_history(instance_id, tli, &bytes)?;
            copied += 1;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;
    use pg_wal::{Lsn, TimelineId};
    use strata_repo::{FileEntry, FileKind, KeySource, LocalStorage, Storage, WalSegmentMeta};

    use super::*;

    fn repo(dir: &std::path::Path, name: &str, key: Option<&KeySource>) -> Repository {
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.join(name)).unwrap());
        Repository::open_or_init_with_key(storage, key).unwrap()
    }

    /// A small file of `blocks` distinct 4 KiB blocks, seeded by `seed`.
    fn content(seed: u8, blocks: usize) -> Vec<Vec<u8>> {
        (0..blocks)
            .map(|i| {
                (0..4096)
                    .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
                    .collect()
            })
            .collect()
    }

    /// Commits a backup set of one file made of `blocks`.
    fn backup(repo: &Repository, id: &str, blocks: &[Vec<u8>]) {
        let mut w = repo.block_writer(repo.block_index("db").unwrap());
        let refs = blocks.iter().map(|b| w.add(b).unwrap()).collect();
        w.finish().unwrap();
        let size = blocks.iter().map(|b| b.len() as u64).sum();
        repo.commit_manifest(&BackupManifest {
            format_version: 1,
            backup_id: id.into(),
            instance_id: "db".into(),
            system_identifier: 7,
            pg_version_num: 150000,
            wal_segment_size: 16 * 1024 * 1024,
            label: id.into(),
            mode: "Manual".into(),
            start_lsn: Lsn(0x100_0028),
            start_timeline: TimelineId(1),
            stop_lsn: Lsn(0x100_0100),
            stop_timeline: TimelineId(1),
            start_time: Utc::now(),
            stop_time: Utc::now(),
            tablespaces: Vec::new(),
            files: vec![FileEntry {
                tablespace: None,
                path: "base/1/1259".into(),
                kind: FileKind::File,
                mode: 0o600,
                size,
                mtime: 0,
                link_target: None,
                crc32c: None,
                blocks: refs,
            }],
            server_manifest: None,
            incremental_from: None,
            received_bytes: None,
            stats: BackupStats::default(),
            contents: None,
        })
        .unwrap();
    }

    fn read_back(repo: &Repository, id: &str) -> Vec<u8> {
        let m = repo.read_manifest("db", id).unwrap();
        let mut out = Vec::new();
        repo.read_blocks(&m.files[0].blocks, |raw| {
            out.extend(raw);
            Ok::<_, RepoError>(())
        })
        .unwrap();
        out
    }

    #[test]
    fn copies_rehash_into_an_encrypted_target_and_skip_known_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let source = repo(dir.path(), "source", None);
        let key_path = dir.path().join("key");
        std::fs::write(&key_path, "k".repeat(40)).unwrap();
        let target = repo(dir.path(), "target", Some(&KeySource::KeyFile(key_path)));

        let first = content(3, 6);
        backup(&source, "1000", &first);
        let report =
            copy_backup_set(&source, &target, "db", "1000", &CopiedBlocks::default()).unwrap();
        assert_eq!((report.blocks_read, report.blocks_known), (6, 0));
        assert_eq!(report.stats.new_blocks, 6);
        assert_eq!(read_back(&target, "1000"), first.concat());
        // Different keys: the same data has different addresses there.
        let (s, t) = (
            source.read_manifest("db", "1000").unwrap(),
            target.read_manifest("db", "1000").unwrap(),
        );
        assert_ne!(s.files[0].blocks[0].hash, t.files[0].blocks[0].hash);

        // Four blocks unchanged, two new: only the new ones are read and stored.
        let mut second = first.clone();
        second[1] = content(5, 1).remove(0);
        second[4] = content(7, 1).remove(0);
        backup(&source, "2000", &second);
        let known = CopiedBlocks::learn(&source, &target, "db", &["1000".into()]).unwrap();
        let report = copy_backup_set(&source, &target, "db", "2000", &known).unwrap();
        assert_eq!((report.blocks_read, report.blocks_known), (2, 4));
        assert_eq!(report.stats.new_blocks, 2);
        assert_eq!(read_back(&target, "2000"), second.concat());
        assert!(target.verify(&|_, _| {}).unwrap().is_clean());

        // A copy whose manifest was never written does not exist there.
        assert!(matches!(
            target.read_manifest("db", "3000"),
            Err(RepoError::BackupNotFound(_))
        ));
    }

    #[test]
    fn wal_copies_carry_the_target_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let source = repo(dir.path(), "source", None);
        let target = repo(dir.path(), "target", None);
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let meta = WalSegmentMeta {
            timeline: TimelineId(1),
            segment: "000000010000000000000001".into(),
            begin_lsn: Lsn(0x100_0000),
            end_lsn: Lsn(0x200_0000),
            partial: false,
            checksum: source.wal_checksum(&data),
            first_commit: None,
            last_commit: None,
            commit_count: 0,
            min_commit_xid: None,
            max_commit_xid: None,
            restore_points: Vec::new(),
            events: Vec::new(),
            events_omitted: 0,
            stored_at: Utc::now(),
        };
        let key = source.put_wal_segment("db", &meta, &data).unwrap();
        let row = WalSegmentRow {
            instance_id: "db".into(),
            timeline: meta.timeline,
            segment: meta.segment.clone(),
            partial: false,
            begin_lsn: meta.begin_lsn,
            end_lsn: meta.end_lsn,
            size: data.len() as u64,
            checksum: meta.checksum.clone(),
            first_commit: None,
            last_commit: None,
            commit_count: 0,
            min_commit_xid: None,
            max_commit_xid: None,
            object_key: key,
            stored_at: meta.stored_at,
        };
        let copy = copy_wal_segment(&source, &target, &row).unwrap();
        assert_ne!(copy.checksum, row.checksum);
        let (read_meta, read) = target.read_wal(&copy.object_key).unwrap();
        assert_eq!(read, data);
        assert_eq!(read_meta.checksum, copy.checksum);
    }
}
