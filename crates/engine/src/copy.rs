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
use strata_repo::{BackupManifest, BackupStats, BlockHash, BlockRef, RepoError, Repository};

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
        backup_ids: &[String],
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
                    known.map.entry(sa.h).or_insert_with(|| tb.clone());
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
    let files = copy
        .files
        .iter_mut()
        .chain(copy.server_manifest.iter_mut());
    for file in files {
        let mut blocks = Vec::with_capacity(file.blocks.len());
        let mut to_read = Vec::new();
        for (i, b) in file.blocks.iter().enumerate() {
            match known.map.get(&b.h) {
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
    report.stats = writer.finish()?;
    target.commit_manifest(&copy)?;
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
