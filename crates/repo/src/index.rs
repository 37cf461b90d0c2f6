//! The block index: which blocks an instance's committed backups hold, kept in
//! the repository so that a backup does not read every earlier manifest.
//!
//! The index of an instance is a set of sorted runs (as in a log-structured
//! merge tree): each committed backup adds one run holding only the blocks it
//! stored new, written after its manifest, so only committed manifests vouch
//! for blocks. A run is one or more sealed objects (kind 5) of at most
//! [`RUN_PART_MAX`] entries, each a disjoint hash range. When runs pile up, the
//! two smallest are merged into one; nothing ever rewrites the whole index for
//! one backup. Each run names the backups it covers; a committed backup no run
//! covers (a repository written before the index existed, or a backup killed
//! between its commit and its run) is read from its manifest and indexed by
//! the next backup. Packs deleted by garbage collection leave entries behind:
//! every hit is checked against the packs listed when the index was opened, and
//! merges drop such entries. A run object that does not open (damaged,
//! tampered) makes the index be rebuilt from the manifests.
//!
//! Lookups do not hold entries in memory: each run object is decoded once into
//! a local cache file of fixed-size entries, read with one positioned read of a
//! 64-entry chunk per lookup; memory holds each chunk's first hash and
//! checksum. The format is specified in docs/REPOSITORY.md ("Block index").

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::manifest::BackupManifest;
use crate::object::{open, seal, ObjectKind};
use crate::{BackupId, BlockHash, BlockRef, PackId, RepoError, RepoResult, Repository};

/// Version of index run objects this build writes and reads.
pub const INDEX_RUN_VERSION: u32 = 1;
/// Bytes of one index entry, in run objects and cache files alike.
pub const ENTRY_LEN: usize = 56;
/// Most entries in one run object.
pub const RUN_PART_MAX: usize = 1 << 18;
/// Entries per checksummed chunk of a cache file: one lookup reads one chunk.
const CHUNK: usize = 64;
/// The two smallest runs are merged once the smaller holds at least
/// 1/`MERGE_FACTOR` of the larger's entries.
const MERGE_FACTOR: u64 = 4;
/// Runs kept before the two smallest are merged whatever their sizes.
const MAX_RUNS: usize = 12;
const CACHE_MAGIC: &[u8; 8] = b"STRATAIC";
const CACHE_VERSION: u32 = 1;
/// Magic, version, meta length, entry count, object length, checksum.
const CACHE_HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8;

/// Metadata of a run object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunMeta {
    /// [`INDEX_RUN_VERSION`].
    version: u32,
    /// Backup sets whose new blocks the run holds.
    covers: Vec<BackupId>,
    /// Packs the entries point into, by ordinal.
    packs: Vec<PackId>,
}

/// Blocks indexed: the instance's stored runs plus the blocks added since
/// (by the writer holding this index). Cheap to clone when nothing was added.
#[derive(Debug, Default, Clone)]
pub struct BlockIndex {
    stored: Option<Arc<StoredIndex>>,
    pub(crate) map: HashMap<BlockHash, BlockRef>,
}

impl BlockIndex {
    /// Blocks indexed (a block in two runs not yet merged counts twice).
    pub fn len(&self) -> usize {
        self.map.len() + self.stored.as_ref().map_or(0, |s| s.len())
    }

    /// True when no block is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the block is stored, if it is.
    pub fn get(&self, hash: &BlockHash) -> Option<BlockRef> {
        if let Some(b) = self.map.get(hash) {
            return Some(b.clone());
        }
        self.stored.as_ref().and_then(|s| s.get(hash))
    }

    /// True when the block is stored.
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.map.contains_key(hash) || self.stored.as_ref().is_some_and(|s| s.get(hash).is_some())
    }

    /// The blocks added to this index (by a writer) that its stored runs do
    /// not hold: what the backup's own run must list.
    pub(crate) fn added(self) -> AddedBlocks {
        let stored = self.stored;
        let mut blocks: Vec<BlockRef> = self
            .map
            .into_values()
            .filter(|b| stored.as_ref().is_none_or(|s| s.get(&b.hash).is_none()))
            .collect();
        blocks.sort_by_key(|b| b.hash);
        AddedBlocks {
            indexed: stored.is_some(),
            blocks,
            stored,
        }
    }
}

/// What a backup's writer stored that the index did not hold: given to
/// [`Repository::commit_backup`], which writes it as the backup's run.
#[derive(Debug, Default)]
pub struct AddedBlocks {
    /// False when the index was built from manifests only (nothing to write).
    indexed: bool,
    blocks: Vec<BlockRef>,
    stored: Option<Arc<StoredIndex>>,
}

/// What [`Repository::rebuild_block_index`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct IndexRebuild {
    /// Run objects deleted.
    pub objects_deleted: u64,
    /// Entries of the rebuilt run.
    pub entries: u64,
}

/// The runs of one instance, opened from their cache files.
#[derive(Debug)]
pub(crate) struct StoredIndex {
    runs: Vec<Arc<RunFile>>,
}

impl StoredIndex {
    fn len(&self) -> usize {
        self.runs.iter().map(|r| r.count as usize).sum()
    }

    fn get(&self, hash: &BlockHash) -> Option<BlockRef> {
        self.runs.iter().find_map(|r| r.get(hash))
    }
}

/// One run object, decoded into a local cache file.
#[derive(Debug)]
struct RunFile {
    /// Key of the run object in the repository.
    key: String,
    /// Cache file path.
    path: PathBuf,
    file: File,
    count: u64,
    entries_at: u64,
    /// First hash of every chunk.
    fence: Vec<[u8; 32]>,
    /// Checksum of every chunk.
    sums: Vec<[u8; 8]>,
    last: [u8; 32],
    meta: RunMeta,
    /// Whether each pack of `meta.packs` still exists.
    live: Vec<bool>,
}

impl RunFile {
    fn run_id(&self) -> &str {
        run_id_of(&self.key)
    }

    fn get(&self, hash: &BlockHash) -> Option<BlockRef> {
        let first = self.fence.first()?;
        if hash.0 < *first || hash.0 > self.last {
            return None;
        }
        let chunk = self.fence.partition_point(|f| *f <= hash.0) - 1;
        let mut buf = [0u8; CHUNK * ENTRY_LEN];
        let buf = match self.read_chunk(chunk, &mut buf) {
            Ok(b) => b,
            Err(why) => {
                // A miss stores the block again: safe, only less deduplication.
                tracing::warn!("block index cache {}: {why}", self.path.display());
                return None;
            }
        };
        let n = buf.len() / ENTRY_LEN;
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = &buf[mid * ENTRY_LEN..(mid + 1) * ENTRY_LEN];
            match e[..32].cmp(&hash.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let (b, pack) = decode_entry(e);
                    if !self.live.get(pack as usize).copied().unwrap_or(false) {
                        return None;
                    }
                    return Some(b.into_ref(self.meta.packs[pack as usize].clone()));
                }
            }
        }
        None
    }

    fn read_chunk<'a>(&self, chunk: usize, buf: &'a mut [u8]) -> Result<&'a [u8], String> {
        let start = chunk * CHUNK;
        let n = CHUNK.min(self.count as usize - start);
        let buf = &mut buf[..n * ENTRY_LEN];
        self.file
            .read_exact_at(buf, self.entries_at + (start * ENTRY_LEN) as u64)
            .map_err(|e| e.to_string())?;
        if chunk_sum(buf) != self.sums[chunk] {
            return Err(format!("chunk {chunk} does not match its checksum"));
        }
        Ok(buf)
    }

    /// Reads the entries in order, a chunk at a time.
    fn entries(&self) -> RunEntries<'_> {
        RunEntries {
            run: self,
            chunk: 0,
            buf: Vec::new(),
            at: 0,
        }
    }
}

/// An entry without its pack id (an ordinal into the run's pack table).
struct RawEntry {
    hash: BlockHash,
    offset: u64,
    stored_len: u32,
    raw_len: u32,
    compression: u8,
}

impl RawEntry {
    fn into_ref(self, pack: PackId) -> BlockRef {
        BlockRef {
            hash: self.hash,
            pack,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            compression: self.compression,
        }
    }
}

/// The live entries of one run in hash order.
struct RunEntries<'a> {
    run: &'a RunFile,
    chunk: usize,
    buf: Vec<u8>,
    at: usize,
}

impl Iterator for RunEntries<'_> {
    type Item = RepoResult<BlockRef>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.at < self.buf.len() {
                let e = &self.buf[self.at..self.at + ENTRY_LEN];
                self.at += ENTRY_LEN;
                let (b, pack) = decode_entry(e);
                if self.run.live[pack as usize] {
                    return Some(Ok(b.into_ref(self.run.meta.packs[pack as usize].clone())));
                }
                continue;
            }
            if self.chunk >= self.run.fence.len() {
                return None;
            }
            let mut buf = vec![0u8; CHUNK * ENTRY_LEN];
            let got = match self.run.read_chunk(self.chunk, &mut buf) {
                Ok(b) => b.len(),
                Err(why) => {
                    return Some(Err(RepoError::Cache(format!(
                        "{}: {why}",
                        self.run.path.display()
                    ))))
                }
            };
            buf.truncate(got);
            self.buf = buf;
            self.at = 0;
            self.chunk += 1;
        }
    }
}

fn encode_entry(out: &mut Vec<u8>, b: &BlockRef, pack: u32) {
    out.extend_from_slice(&b.hash.0);
    out.extend_from_slice(&pack.to_le_bytes());
    out.extend_from_slice(&b.stored_len.to_le_bytes());
    out.extend_from_slice(&b.offset.to_le_bytes());
    out.extend_from_slice(&b.raw_len.to_le_bytes());
    out.push(b.compression);
    out.extend_from_slice(&[0; 3]);
}

fn decode_entry(e: &[u8]) -> (RawEntry, u32) {
    let u32_at = |i: usize| u32::from_le_bytes(e[i..i + 4].try_into().expect("4 bytes"));
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&e[..32]);
    let entry = RawEntry {
        hash: BlockHash(hash),
        stored_len: u32_at(36),
        offset: u64::from_le_bytes(e[40..48].try_into().expect("8 bytes")),
        raw_len: u32_at(48),
        compression: e[52],
    };
    (entry, u32_at(32))
}

fn chunk_sum(chunk: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&blake3::hash(chunk).as_bytes()[..8]);
    out
}

/// `<run id>` of `instances/<i>/index/<run id>-<part>.run`.
fn run_id_of(key: &str) -> &str {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.rsplit_once('-').map_or(name, |(id, _)| id)
}

/// Where an instance's index runs live.
pub fn index_prefix(instance_id: &str) -> String {
    format!("instances/{instance_id}/index/")
}

fn run_key(instance_id: &str, run_id: &str, part: usize) -> String {
    format!("{}{run_id}-{part:04}.run", index_prefix(instance_id))
}

fn new_run_id() -> String {
    format!(
        "{:016x}{:08x}",
        chrono::Utc::now().timestamp_millis(),
        rand::random::<u32>()
    )
}

impl Repository {
    /// Caches decoded index runs under `dir` (default: a directory of this
    /// user's under the system's temporary directory).
    pub fn with_index_cache(mut self, dir: PathBuf) -> Self {
        self.index_cache = Some(Arc::new(dir));
        self
    }

    /// Every block referenced by a committed manifest of `instance_id` (whose
    /// pack still exists). Blocks of unfinished backups are deliberately not
    /// reused: only what a manifest vouches for counts as stored.
    pub fn block_index(&self, instance_id: &str) -> RepoResult<BlockIndex> {
        self.block_index_with(instance_id, None)
    }

    /// [`Repository::block_index`], taking the blocks of `read` (a manifest
    /// of the instance the caller holds already) without reading it again
    /// should the index not cover it yet.
    pub fn block_index_with(
        &self,
        instance_id: &str,
        read: Option<&BackupManifest>,
    ) -> RepoResult<BlockIndex> {
        let started = std::time::Instant::now();
        let index = self.choose_index(instance_id, read)?;
        tracing::info!(
            "instance {instance_id}: block index ready in {} ms ({} blocks, {})",
            started.elapsed().as_millis(),
            index.len(),
            match &index.stored {
                Some(s) => format!("{} run objects", s.runs.len()),
                None => "built from manifests".to_string(),
            }
        );
        Ok(index)
    }

    fn choose_index(
        &self,
        instance_id: &str,
        read: Option<&BackupManifest>,
    ) -> RepoResult<BlockIndex> {
        match self.open_index(instance_id, read) {
            Ok(index) => Ok(index),
            Err(e @ RepoError::Corrupt { .. }) => {
                tracing::warn!(
                    "instance {instance_id}: {e}; rebuilding the block index from the manifests"
                );
                self.rebuild_block_index(instance_id)?;
                self.open_index(instance_id, read)
            }
            Err(e @ (RepoError::Cache(_) | RepoError::NewerFormat { .. })) => {
                tracing::warn!("instance {instance_id}: {e}; reading every manifest instead");
                self.index_from_manifests(instance_id, read)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the instance's index runs and writes one run from its
    /// manifests (`repo reindex`, or an index found damaged).
    pub fn rebuild_block_index(&self, instance_id: &str) -> RepoResult<IndexRebuild> {
        let mut report = IndexRebuild::default();
        for key in self.storage.list(&index_prefix(instance_id))? {
            self.storage.delete(&key)?;
            report.objects_deleted += 1;
        }
        if let Ok(dir) = self.index_cache_dir(instance_id) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let index = self.open_index(instance_id, None)?;
        report.entries = index.len() as u64;
        Ok(report)
    }

    /// Stores `entries` (sorted by hash, each hash once, in packs that
    /// exist) as one index run of `instance_id` covering `covers`: for tools
    /// that build an index without taking backups (benchmarks). Returns the
    /// entries written.
    pub fn import_index_run(
        &self,
        instance_id: &str,
        covers: Vec<BackupId>,
        entries: impl Iterator<Item = BlockRef>,
    ) -> RepoResult<u64> {
        let cache = self.index_cache_dir(instance_id)?;
        let mut previous: Option<BlockHash> = None;
        let mut count = 0u64;
        let checked = entries.map(|b| {
            if previous.is_some_and(|p| p >= b.hash) || !crate::pack::valid_pack_id(&b.pack) {
                return Err(RepoError::Format(format!(
                    "index entry {count} is out of order or names an impossible pack"
                )));
            }
            previous = Some(b.hash);
            count += 1;
            Ok(b)
        });
        self.write_run(instance_id, &cache, covers, checked)?;
        Ok(count)
    }

    /// Commits `manifest` (see [`Repository::commit_manifest`]), then writes
    /// the blocks it added as its index run and merges runs that piled up.
    /// A failure after the commit only costs deduplication until the next
    /// backup indexes this one from its manifest, so it is logged, not returned.
    pub fn commit_backup(&self, manifest: &BackupManifest, added: AddedBlocks) -> RepoResult<()> {
        self.commit_manifest(manifest)?;
        if !added.indexed {
            return Ok(());
        }
        if let Err(e) = self.index_committed(manifest, added) {
            tracing::warn!(
                "backup {}: writing its block index run: {e}; the next backup indexes it from its manifest",
                manifest.backup_id
            );
        }
        Ok(())
    }

    fn index_committed(&self, manifest: &BackupManifest, added: AddedBlocks) -> RepoResult<()> {
        let instance_id = manifest.instance_id.as_str();
        let cache = self.index_cache_dir(instance_id)?;
        let new = self.write_run(
            instance_id,
            &cache,
            vec![manifest.backup_id.clone()],
            added.blocks.into_iter().map(Ok),
        )?;
        let mut runs: Vec<Arc<RunFile>> = added.stored.map(|s| s.runs.clone()).unwrap_or_default();
        runs.extend(new);
        self.compact(instance_id, &cache, group_runs(runs))
    }

    /// Merges the two smallest runs while the smaller holds at least
    /// 1/[`MERGE_FACTOR`] of the other's entries, or while there are more
    /// than [`MAX_RUNS`]: each entry is rewritten a logarithmic number of
    /// times over the index's life, never once per backup.
    fn compact(
        &self,
        instance_id: &str,
        cache: &Path,
        mut groups: Vec<Vec<Arc<RunFile>>>,
    ) -> RepoResult<()> {
        let size = |g: &[Arc<RunFile>]| g.iter().map(|r| r.count).sum::<u64>().max(1);
        loop {
            groups.sort_by_key(|g| std::cmp::Reverse(size(g)));
            let n = groups.len();
            if n < 2 {
                return Ok(());
            }
            if size(&groups[n - 1]) * MERGE_FACTOR < size(&groups[n - 2]) && n <= MAX_RUNS {
                return Ok(());
            }
            let smaller = groups.pop().expect("two groups");
            let larger = groups.pop().expect("two groups");
            let existing: BTreeSet<BackupId> =
                self.list_backups(instance_id)?.into_iter().collect();
            let covers: BTreeSet<BackupId> = smaller
                .iter()
                .chain(&larger)
                .flat_map(|r| r.meta.covers.iter().cloned())
                .filter(|id| existing.contains(id))
                .collect();
            let merged = self.write_run(
                instance_id,
                cache,
                covers.into_iter().collect(),
                MergedEntries::new(chain_entries(&larger), chain_entries(&smaller)),
            )?;
            // The merged run is stored before the runs it replaces go.
            for r in smaller.iter().chain(&larger) {
                self.storage.delete(&r.key)?;
                let _ = std::fs::remove_file(&r.path);
            }
            if !merged.is_empty() {
                groups.push(merged);
            }
        }
    }

    /// Opens the instance's runs (fetching those not cached yet) and
    /// indexes the committed backups no run covers.
    fn open_index(
        &self,
        instance_id: &str,
        read: Option<&BackupManifest>,
    ) -> RepoResult<BlockIndex> {
        let cache = self.index_cache_dir(instance_id)?;
        // Runs first, then manifests: a run names only backups committed before it.
        let objects: Vec<crate::ObjectSize> = self
            .storage
            .list_sizes(&index_prefix(instance_id))?
            .into_iter()
            .filter(|o| o.key.ends_with(".run"))
            .collect();
        let backups = self.list_backups(instance_id)?;
        let live_packs = self.live_packs()?;
        let mut runs = Vec::with_capacity(objects.len());
        for object in &objects {
            let path = cache.join(file_name(&object.key));
            let mut run = match read_cache(&path, &object.key, object.size)? {
                Some(run) => run,
                None => {
                    let bytes = match self.storage.get(&object.key) {
                        Ok(b) => b,
                        // Merged away since the listing: its entries are in the merged run.
                        Err(crate::StorageError::NotFound(_)) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let (meta, payload) = self.decode_run(&object.key, &bytes)?;
                    write_cache(&cache, &object.key, bytes.len() as u64, meta, &payload)?
                }
            };
            run.live = run
                .meta
                .packs
                .iter()
                .map(|p| live_packs.contains(p.as_str()))
                .collect();
            runs.push(Arc::new(run));
        }
        drop_stale_cache_files(&cache, &objects);
        let covered: HashSet<&BackupId> = runs.iter().flat_map(|r| &r.meta.covers).collect();
        let missing: Vec<BackupId> = backups
            .iter()
            .filter(|id| !covered.contains(id))
            .cloned()
            .collect();
        let mut stored = StoredIndex { runs };
        if !missing.is_empty() {
            let new =
                self.index_manifests(instance_id, &cache, &missing, read, &stored, &live_packs)?;
            stored.runs.extend(new);
        }
        Ok(BlockIndex {
            stored: Some(Arc::new(stored)),
            map: HashMap::new(),
        })
    }

    /// Writes one run covering `missing` (committed backups no run
    /// covers) with their blocks that `stored` lacks.
    fn index_manifests(
        &self,
        instance_id: &str,
        cache: &Path,
        missing: &[BackupId],
        read: Option<&BackupManifest>,
        stored: &StoredIndex,
        live_packs: &HashSet<String>,
    ) -> RepoResult<Vec<Arc<RunFile>>> {
        let mut found: BTreeMap<BlockHash, BlockRef> = BTreeMap::new();
        let mut covers = Vec::new();
        let mut add = |m: &BackupManifest| {
            for file in m.all_files() {
                for b in &file.blocks {
                    if live_packs.contains(b.pack.as_str())
                        && !found.contains_key(&b.hash)
                        && stored.get(&b.hash).is_none()
                    {
                        found.insert(b.hash, b.clone());
                    }
                }
            }
        };
        for id in missing {
            match read {
                Some(m) if m.backup_id == *id => add(m),
                _ => match self.read_manifest(instance_id, id) {
                    Ok(m) => add(&m),
                    Err(RepoError::BackupNotFound(_)) => continue,
                    Err(e) => return Err(e),
                },
            }
            covers.push(id.clone());
        }
        tracing::info!(
            "instance {instance_id}: indexed {} backup(s) from their manifests ({} blocks)",
            covers.len(),
            found.len()
        );
        self.write_run(instance_id, cache, covers, found.into_values().map(Ok))
    }

    /// The index as builds before the persisted index made it, for when the
    /// cache cannot be used: every manifest read, every block held in memory.
    fn index_from_manifests(
        &self,
        instance_id: &str,
        read: Option<&BackupManifest>,
    ) -> RepoResult<BlockIndex> {
        let mut index = BlockIndex::default();
        let mut add = |manifest: &BackupManifest| {
            for file in manifest.all_files() {
                for block in &file.blocks {
                    index.map.entry(block.hash).or_insert_with(|| block.clone());
                }
            }
        };
        for backup_id in self.list_backups(instance_id)? {
            match read {
                Some(m) if m.backup_id == backup_id => add(m),
                _ => add(&self.read_manifest(instance_id, &backup_id)?),
            }
        }
        Ok(index)
    }

    /// Ids of the packs the repository holds.
    fn live_packs(&self) -> RepoResult<HashSet<String>> {
        Ok(self
            .storage
            .list("packs/")?
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".pack"))
            .map(str::to_string)
            .collect())
    }

    /// Stores `entries` (sorted by hash, each hash once) as one run of
    /// `covers`, in parts of at most [`RUN_PART_MAX`] entries, and caches it.
    /// A run with nothing to cover and nothing to hold is not written.
    fn write_run(
        &self,
        instance_id: &str,
        cache: &Path,
        covers: Vec<BackupId>,
        entries: impl Iterator<Item = RepoResult<BlockRef>>,
    ) -> RepoResult<Vec<Arc<RunFile>>> {
        let run_id = new_run_id();
        let mut written = Vec::new();
        let mut part: Vec<BlockRef> = Vec::new();
        for entry in entries {
            part.push(entry?);
            if part.len() == RUN_PART_MAX {
                let key = run_key(instance_id, &run_id, written.len());
                written.push(self.write_run_part(cache, &key, &covers, &part)?);
                part.clear();
            }
        }
        if !part.is_empty() || (written.is_empty() && !covers.is_empty()) {
            let key = run_key(instance_id, &run_id, written.len());
            written.push(self.write_run_part(cache, &key, &covers, &part)?);
        }
        Ok(written)
    }

    fn write_run_part(
        &self,
        cache: &Path,
        key: &str,
        covers: &[BackupId],
        blocks: &[BlockRef],
    ) -> RepoResult<Arc<RunFile>> {
        let mut packs: Vec<PackId> = Vec::new();
        let mut ordinals: HashMap<&str, u32> = HashMap::new();
        let mut payload = Vec::with_capacity(blocks.len() * ENTRY_LEN);
        for b in blocks {
            let ordinal = *ordinals.entry(b.pack.as_str()).or_insert_with(|| {
                packs.push(b.pack.clone());
                (packs.len() - 1) as u32
            });
            encode_entry(&mut payload, b, ordinal);
        }
        let meta = RunMeta {
            version: INDEX_RUN_VERSION,
            covers: covers.to_vec(),
            packs,
        };
        let bytes = seal(&self.keys, ObjectKind::IndexRun, &meta, &payload, Some(1))?;
        self.storage.put(key, &bytes)?;
        let mut run = write_cache(cache, key, bytes.len() as u64, meta, &payload)?;
        // Written from blocks in live packs (or from runs checked so).
        run.live = vec![true; run.meta.packs.len()];
        Ok(Arc::new(run))
    }

    /// Checks an index run object as a backup would before trusting it
    /// (`repo verify`).
    pub(crate) fn check_index_run(&self, key: &str, bytes: &[u8]) -> RepoResult<()> {
        self.decode_run(key, bytes).map(|_| ())
    }

    /// Opens a run object and checks every entry: sorted, each hash once,
    /// pack ordinals in range, pack ids well formed, lengths plausible.
    fn decode_run(&self, key: &str, bytes: &[u8]) -> RepoResult<(RunMeta, Vec<u8>)> {
        let opened = open::<RunMeta>(&self.keys, key, ObjectKind::IndexRun, bytes)?;
        let corrupt = |reason: String| RepoError::Corrupt {
            object: key.to_string(),
            reason,
        };
        let meta = opened.meta;
        if meta.version > INDEX_RUN_VERSION {
            return Err(RepoError::NewerFormat {
                found: meta.version,
                supported: INDEX_RUN_VERSION,
            });
        }
        if let Some(bad) = meta.packs.iter().find(|p| !crate::pack::valid_pack_id(p)) {
            return Err(corrupt(format!("names an impossible pack id {bad:?}")));
        }
        let payload = opened.payload;
        if payload.len() % ENTRY_LEN != 0 {
            return Err(corrupt(format!(
                "{} bytes of entries is not a whole number of {ENTRY_LEN}-byte entries",
                payload.len()
            )));
        }
        let block_size = self.config.block_size;
        let mut previous: Option<&[u8]> = None;
        for (i, e) in payload.chunks_exact(ENTRY_LEN).enumerate() {
            if previous.is_some_and(|p| p[..32] >= e[..32]) {
                return Err(corrupt(format!("entry {i} is out of order")));
            }
            previous = Some(e);
            let (entry, pack) = decode_entry(e);
            if pack as usize >= meta.packs.len()
                || entry.compression > 1
                || entry.raw_len > block_size
                || entry.stored_len as u64 > block_size as u64 + 1024 * 1024
                || entry.offset
                    > (2 * crate::MAX_BLOCK_SIZE as u64 + crate::DEFAULT_PACK_SIZE as u64)
            {
                return Err(corrupt(format!("entry {i} is impossible")));
            }
        }
        Ok((meta, payload))
    }

    /// This repository's directory for `instance_id` in the index cache:
    /// private to this user, created when missing.
    fn index_cache_dir(&self, instance_id: &str) -> RepoResult<PathBuf> {
        let base = match &self.index_cache {
            Some(dir) => dir.as_ref().clone(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            None => {
                std::env::temp_dir().join(format!("strata-index-{}", unsafe { libc::geteuid() }))
            }
        };
        let cache_err = |what: String| RepoError::Cache(format!("{}: {what}", base.display()));
        std::fs::create_dir_all(&base).map_err(|e| cache_err(e.to_string()))?;
        let meta = std::fs::symlink_metadata(&base).map_err(|e| cache_err(e.to_string()))?;
        // SAFETY: as above.
        let euid = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != euid {
            return Err(cache_err(format!("not a directory owned by user {euid}")));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| cache_err(e.to_string()))?;
        }
        for part in [self.config.repository_id.as_str(), instance_id] {
            let plain = !part.is_empty()
                && part.len() <= 128
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !plain {
                return Err(cache_err(format!("{part:?} cannot name a cache directory")));
            }
        }
        let dir = base.join(&self.config.repository_id).join(instance_id);
        std::fs::create_dir_all(&dir).map_err(|e| cache_err(e.to_string()))?;
        Ok(dir)
    }
}

/// Groups run objects by run, parts in hash order.
fn group_runs(runs: Vec<Arc<RunFile>>) -> Vec<Vec<Arc<RunFile>>> {
    let mut groups: BTreeMap<String, Vec<Arc<RunFile>>> = BTreeMap::new();
    for r in runs {
        groups.entry(r.run_id().to_string()).or_default().push(r);
    }
    groups
        .into_values()
        .map(|mut g| {
            g.sort_by(|a, b| a.key.cmp(&b.key));
            g
        })
        .collect()
}

fn chain_entries(group: &[Arc<RunFile>]) -> impl Iterator<Item = RepoResult<BlockRef>> + '_ {
    group.iter().flat_map(|r| r.entries())
}

/// Two sorted entry streams as one, each hash once (the first stream's entry kept).
struct MergedEntries<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<A, B> MergedEntries<A, B>
where
    A: Iterator<Item = RepoResult<BlockRef>>,
    B: Iterator<Item = RepoResult<BlockRef>>,
{
    fn new(a: A, b: B) -> Self {
        MergedEntries {
            a: a.peekable(),
            b: b.peekable(),
        }
    }
}

impl<A, B> Iterator for MergedEntries<A, B>
where
    A: Iterator<Item = RepoResult<BlockRef>>,
    B: Iterator<Item = RepoResult<BlockRef>>,
{
    type Item = RepoResult<BlockRef>;

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.a.peek(), self.b.peek()) {
            (None, None) => return None,
            (Some(_), None) | (Some(Err(_)), _) => std::cmp::Ordering::Less,
            (None, Some(_)) | (_, Some(Err(_))) => std::cmp::Ordering::Greater,
            (Some(Ok(x)), Some(Ok(y))) => x.hash.cmp(&y.hash),
        };
        match order {
            std::cmp::Ordering::Less => self.a.next(),
            std::cmp::Ordering::Greater => self.b.next(),
            std::cmp::Ordering::Equal => {
                self.b.next();
                self.a.next()
            }
        }
    }
}

fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

fn cache_error(path: &Path, e: impl std::fmt::Display) -> RepoError {
    RepoError::Cache(format!("{}: {e}", path.display()))
}

/// Writes the cache file of run object `key` (of `object_len` bytes):
///
/// ```text
/// "STRATAIC" | u32 version | u32 meta_len | u64 count | u64 object_len | [8] checksum
/// meta (JSON) | fence: count/64 rounded up × ([32] first hash | [8] chunk checksum) | entries
/// ```
///
/// The checksum covers the meta and fence; each chunk of 64 entries has its own.
fn write_cache(
    cache: &Path,
    key: &str,
    object_len: u64,
    meta: RunMeta,
    payload: &[u8],
) -> RepoResult<RunFile> {
    let name = file_name(key);
    let path = cache.join(name);
    let count = (payload.len() / ENTRY_LEN) as u64;
    let meta_json = serde_json::to_vec(&meta).map_err(|e| RepoError::Format(e.to_string()))?;
    let mut fence = Vec::new();
    let mut sums = Vec::new();
    let mut fence_bytes = Vec::new();
    for chunk in payload.chunks(CHUNK * ENTRY_LEN) {
        let mut first = [0u8; 32];
        first.copy_from_slice(&chunk[..32]);
        let sum = chunk_sum(chunk);
        fence_bytes.extend_from_slice(&first);
        fence_bytes.extend_from_slice(&sum);
        fence.push(first);
        sums.push(sum);
    }
    let mut head = Vec::with_capacity(CACHE_HEADER_LEN);
    head.extend_from_slice(CACHE_MAGIC);
    head.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    head.extend_from_slice(&(meta_json.len() as u32).to_le_bytes());
    head.extend_from_slice(&count.to_le_bytes());
    head.extend_from_slice(&object_len.to_le_bytes());
    head.extend_from_slice(&header_sum(&meta_json, &fence_bytes));
    let tmp = cache.join(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&head)?;
        f.write_all(&meta_json)?;
        f.write_all(&fence_bytes)?;
        f.write_all(payload)?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(cache_error(&path, e));
    }
    let file = File::open(&path).map_err(|e| cache_error(&path, e))?;
    let last = payload
        .len()
        .checked_sub(ENTRY_LEN)
        .map(|at| payload[at..at + 32].try_into().expect("32 bytes"))
        .unwrap_or([0; 32]);
    Ok(RunFile {
        key: key.to_string(),
        path,
        file,
        count,
        entries_at: (CACHE_HEADER_LEN + meta_json.len() + fence_bytes.len()) as u64,
        fence,
        sums,
        last,
        meta,
        live: Vec::new(),
    })
}

fn header_sum(meta: &[u8], fence: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(meta);
    h.update(fence);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// Opens the cache file of run object `key`; `None` when there is none, or
/// it was made from an object of another length, or it is damaged.
fn read_cache(path: &Path, key: &str, object_len: u64) -> RepoResult<Option<RunFile>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cache_error(path, e)),
    };
    let file_len = file.metadata().map_err(|e| cache_error(path, e))?.len();
    let mut r = BufReader::new(&file);
    let mut head = [0u8; CACHE_HEADER_LEN];
    if r.read_exact(&mut head).is_err() || &head[..8] != CACHE_MAGIC {
        return Ok(None);
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let (version, meta_len, count, cached_len) =
        (u32_at(8), u32_at(12) as u64, u64_at(16), u64_at(24));
    let fence_len = count.div_ceil(CHUNK as u64) * 40;
    let entries_at = CACHE_HEADER_LEN as u64 + meta_len + fence_len;
    if version != CACHE_VERSION
        || cached_len != object_len
        || count
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(entries_at))
            != Some(file_len)
    {
        return Ok(None);
    }
    let mut meta_json = vec![0u8; meta_len as usize];
    let mut fence_bytes = vec![0u8; fence_len as usize];
    if r.read_exact(&mut meta_json).is_err() || r.read_exact(&mut fence_bytes).is_err() {
        return Ok(None);
    }
    if header_sum(&meta_json, &fence_bytes) != head[32..40] {
        tracing::warn!(
            "block index cache {} is damaged; fetching it again",
            path.display()
        );
        return Ok(None);
    }
    let Ok(meta) = serde_json::from_slice::<RunMeta>(&meta_json) else {
        return Ok(None);
    };
    let (mut fence, mut sums) = (Vec::new(), Vec::new());
    for f in fence_bytes.chunks_exact(40) {
        fence.push(f[..32].try_into().expect("32 bytes"));
        sums.push(f[32..].try_into().expect("8 bytes"));
    }
    let mut last = [0u8; 32];
    if count > 0 {
        file.read_exact_at(&mut last, entries_at + (count - 1) * ENTRY_LEN as u64)
            .map_err(|e| cache_error(path, e))?;
    }
    Ok(Some(RunFile {
        key: key.to_string(),
        path: path.to_path_buf(),
        file,
        count,
        entries_at,
        fence,
        sums,
        last,
        meta,
        live: Vec::new(),
    }))
}

/// Removes cache files of run objects no longer in the repository.
fn drop_stale_cache_files(cache: &Path, objects: &[crate::ObjectSize]) {
    let names: HashSet<&str> = objects.iter().map(|o| file_name(&o.key)).collect();
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Dot files are other writers' files in progress.
        if !name.starts_with('.') && !names.contains(name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    use super::*;
    use crate::{KeySource, LocalStorage, PendingPacks, Storage};

    struct Fixture {
        dir: tempfile::TempDir,
        repo: Repository,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let storage = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
            let repo = Repository::open_or_init(storage)
                .unwrap()
                .with_index_cache(dir.path().join("cache"));
            Fixture { dir, repo }
        }

        /// The same repository as another process on another host sees it:
        /// a cache of its own, empty.
        fn elsewhere(&self, name: &str) -> Repository {
            self.repo
                .clone()
                .with_index_cache(self.dir.path().join(name))
        }

        fn run_keys(&self) -> Vec<String> {
            self.repo.storage().list(&index_prefix("i")).unwrap()
        }
    }

    fn manifest(id: &str, blocks: Vec<BlockRef>) -> BackupManifest {
        let size = blocks.iter().map(|b| b.raw_len as u64).sum::<u64>();
        crate::manifest::one_file_manifest("i", id, blocks, size)
    }

    fn block(seed: u32) -> Vec<u8> {
        let mut b = seed.to_le_bytes().repeat(1024);
        b.extend_from_slice(b"block");
        b
    }

    /// A backup of `blocks` (by seed) as the engine takes one: deduplicated
    /// against the index, committed with its run.
    fn backup(repo: &Repository, id: &str, seeds: impl Iterator<Item = u32>) -> BackupManifest {
        let mut w = repo.block_writer(repo.block_index("i").unwrap());
        let refs = seeds.map(|s| w.add(&block(s)).unwrap()).collect();
        let (_, added) = w.finish_indexed().unwrap();
        let m = manifest(id, refs);
        repo.commit_backup(&m, added).unwrap();
        m
    }

    /// What every manifest of the instance says, as builds without the index read it.
    fn from_manifests(repo: &Repository) -> HashMap<BlockHash, BlockRef> {
        repo.index_from_manifests("i", None).unwrap().map
    }

    fn assert_same(index: &BlockIndex, expected: &HashMap<BlockHash, BlockRef>) {
        for (hash, b) in expected {
            let got = index.get(hash).unwrap_or_else(|| panic!("{hash} missing"));
            assert_eq!(got.hash, *hash);
            // The same block may be stored twice (two backups stored it at once);
            // whichever the index names must read back as it.
            if got != *b {
                assert_eq!(got.raw_len, b.raw_len);
            }
        }
    }

    #[test]
    fn a_committed_backup_writes_its_run_and_the_next_backup_reads_only_runs() {
        let f = Fixture::new();
        let m1 = backup(&f.repo, "1", 0..40);
        assert_eq!(f.run_keys().len(), 1);
        let m2 = backup(&f.repo, "2", 20..60);
        // The second run holds only the 20 blocks the second backup added.
        let index = f.elsewhere("other").block_index("i").unwrap();
        assert_eq!(index.len(), 60);
        // Manifests are no longer needed to know the blocks: make them unreadable.
        for id in ["1", "2"] {
            f.repo
                .storage()
                .put(&crate::manifest_key("i", id), b"not a manifest")
                .unwrap();
        }
        let index = f.elsewhere("third").block_index("i").unwrap();
        for b in m1.files[0].blocks.iter().chain(&m2.files[0].blocks) {
            assert_eq!(index.get(&b.hash).as_ref(), Some(b));
        }
        // A backup of known blocks stores nothing.
        let mut w = f.repo.block_writer(index);
        w.add(&block(7)).unwrap();
        assert_eq!(w.finish().unwrap().new_blocks, 0);
    }

    #[test]
    fn merged_runs_equal_the_index_built_from_manifests() {
        let f = Fixture::new();
        for i in 0..24u32 {
            // Each backup keeps most blocks and changes a few, some sizes apart.
            let seeds = (0..30)
                .map(move |s| if s % 7 == 0 { 1000 * (i + 1) + s } else { s })
                .chain((0..i * i).map(move |s| 100_000 + i * 1000 + s));
            backup(&f.repo, &format!("{i:03}"), seeds);
        }
        let keys = f.run_keys();
        let runs: BTreeSet<&str> = keys.iter().map(|k| run_id_of(k)).collect();
        assert!(runs.len() <= 6, "{} runs: {keys:?}", runs.len());
        let expected = from_manifests(&f.repo);
        let index = f.elsewhere("fresh").block_index("i").unwrap();
        assert_same(&index, &expected);
        assert_eq!(index.len(), expected.len(), "each block once after merges");
        // Every backup is still covered.
        let covered: BTreeSet<BackupId> = index
            .stored
            .as_ref()
            .unwrap()
            .runs
            .iter()
            .flat_map(|r| r.meta.covers.clone())
            .collect();
        assert_eq!(covered.len(), 24);
    }

    #[test]
    fn a_run_larger_than_one_object_is_split_into_ranges_that_all_answer() {
        let f = Fixture::new();
        let cache = f.repo.index_cache_dir("i").unwrap();
        let pack = PackId::new("ab".repeat(16));
        let entries: Vec<BlockRef> = (0..RUN_PART_MAX as u64 + 5000)
            .map(|i| BlockHash(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .map(|hash| (hash, hash))
            .collect::<BTreeMap<_, _>>()
            .into_keys()
            .enumerate()
            .map(|(i, hash)| BlockRef {
                hash,
                pack: pack.clone(),
                offset: i as u64 % 1000,
                stored_len: 10,
                raw_len: 20,
                compression: 1,
            })
            .collect();
        let runs = f
            .repo
            .write_run("i", &cache, vec![], entries.clone().into_iter().map(Ok))
            .unwrap();
        assert_eq!(runs.len(), 2);
        let index = BlockIndex {
            stored: Some(Arc::new(StoredIndex { runs })),
            map: HashMap::new(),
        };
        for b in entries.iter().step_by(997) {
            assert_eq!(index.get(&b.hash).as_ref(), Some(b));
        }
        assert!(index.get(&BlockHash([0x55; 32])).is_none());
    }

    #[test]
    fn a_repository_without_an_index_is_indexed_from_its_manifests_once() {
        let f = Fixture::new();
        // Written as builds before the index did: manifests only.
        for (id, seeds) in [("1", 0..30u32), ("2", 10..50)] {
            let mut w = f
                .repo
                .block_writer(f.repo.index_from_manifests("i", None).unwrap());
            let refs = seeds.map(|s| w.add(&block(s)).unwrap()).collect();
            w.finish().unwrap();
            f.repo.commit_manifest(&manifest(id, refs)).unwrap();
        }
        assert!(f.run_keys().is_empty());
        let expected = from_manifests(&f.repo);
        let index = f.repo.block_index("i").unwrap();
        assert_same(&index, &expected);
        assert_eq!(
            f.run_keys().len(),
            1,
            "one run for the backups found uncovered"
        );
        // From now on the manifests are not read.
        for id in ["1", "2"] {
            f.repo
                .storage()
                .put(&crate::manifest_key("i", id), b"gone bad")
                .unwrap();
        }
        assert_same(&f.elsewhere("later").block_index("i").unwrap(), &expected);
    }

    #[test]
    fn a_backup_committed_without_its_run_is_indexed_by_the_next() {
        let f = Fixture::new();
        backup(&f.repo, "1", 0..10);
        // Killed between its commit and its run.
        let mut w = f.repo.block_writer(f.repo.block_index("i").unwrap());
        let refs = (5..25).map(|s| w.add(&block(s)).unwrap()).collect();
        w.finish().unwrap();
        f.repo.commit_manifest(&manifest("2", refs)).unwrap();
        let index = f.elsewhere("next").block_index("i").unwrap();
        assert_same(&index, &from_manifests(&f.repo));
    }

    #[test]
    fn entries_of_packs_deleted_by_gc_are_never_used() {
        let f = Fixture::new();
        let old = backup(&f.repo, "1", [1u32, 2].into_iter());
        let kept = backup(&f.repo, "2", [3u32].into_iter());
        let gone = old.files[0].blocks[0].clone();
        let cached = f.repo.block_index("i").unwrap();
        assert!(cached.contains(&gone.hash), "cached before the collection");
        f.repo.delete_backup("i", "1").unwrap();
        let (report, _) = f
            .repo
            .collect_garbage(&PendingPacks::new(), Utc::now(), Duration::zero())
            .unwrap();
        assert_eq!(report.packs_deleted, 1);
        assert!(!f
            .repo
            .storage()
            .exists(&crate::pack_key(&gone.pack))
            .unwrap());

        // The run of backup 1 still lists the block, the cache too: never trusted.
        let index = f.repo.block_index("i").unwrap();
        assert!(index.get(&gone.hash).is_none());
        assert_eq!(
            index.get(&kept.files[0].blocks[0].hash).as_ref(),
            Some(&kept.files[0].blocks[0])
        );
        let m = backup(&f.repo, "3", [1u32, 3].into_iter());
        let again = &m.files[0].blocks[0];
        assert_eq!(again.hash, gone.hash);
        assert_ne!(
            again.pack, gone.pack,
            "stored again, not taken from a deleted pack"
        );
        assert_eq!(f.repo.read_block(again).unwrap(), block(1));
        for b in &m.files[0].blocks {
            assert!(f.repo.storage().exists(&crate::pack_key(&b.pack)).unwrap());
        }
        // Merging drops what the deleted pack held.
        for i in 4..20 {
            backup(&f.repo, &i.to_string(), [3u32].into_iter());
        }
        let index = f.elsewhere("merged").block_index("i").unwrap();
        let packs: HashSet<PackId> = index
            .stored
            .as_ref()
            .unwrap()
            .runs
            .iter()
            .flat_map(|r| r.meta.packs.clone())
            .collect();
        assert!(!packs.contains(&gone.pack));
    }

    #[test]
    fn collecting_garbage_deletes_the_index_of_an_instance_without_sets() {
        let f = Fixture::new();
        backup(&f.repo, "1", 0..5);
        backup(&f.repo, "2", 3..9);
        let collect = || {
            f.repo
                .collect_garbage(&PendingPacks::new(), Utc::now(), Duration::zero())
                .unwrap()
        };
        f.repo.delete_backup("i", "1").unwrap();
        collect();
        assert!(
            !f.run_keys().is_empty(),
            "set 2 still deduplicates against it"
        );
        f.repo.delete_backup("i", "2").unwrap();
        let (report, _) = collect();
        assert!(report.packs_deleted >= 1);
        assert!(f.run_keys().is_empty());
        // The next backup starts from nothing and stores everything.
        let m = backup(&f.repo, "3", 0..4);
        for b in &m.files[0].blocks {
            assert!(f.repo.storage().exists(&crate::pack_key(&b.pack)).unwrap());
        }
    }

    #[test]
    fn a_damaged_run_is_detected_and_the_index_rebuilt_from_manifests() {
        let f = Fixture::new();
        backup(&f.repo, "1", 0..30);
        backup(&f.repo, "2", 20..40);
        let expected = from_manifests(&f.repo);
        let keys = f.run_keys();
        assert!(!keys.is_empty());
        let victim = &keys[0];
        let mut bytes = f.repo.storage().get(victim).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x20;
        f.repo.storage().put(victim, &bytes).unwrap();
        let report = f.repo.verify(&|_, _| {}).unwrap();
        assert!(
            report.problems.iter().any(|p| p.object == *victim),
            "{report:?}"
        );

        let index = f.elsewhere("fresh").block_index("i").unwrap();
        assert_same(&index, &expected);
        let now = f.run_keys();
        assert!(
            !now.contains(victim),
            "the damaged run was replaced: {now:?}"
        );
        assert!(f.repo.verify(&|_, _| {}).unwrap().is_clean());
    }

    #[test]
    fn a_run_of_another_kind_or_with_impossible_entries_is_refused() {
        let f = Fixture::new();
        backup(&f.repo, "1", 0..3);
        let key = f.run_keys().remove(0);
        let forged = |meta: serde_json::Value, payload: &[u8], kind: ObjectKind| {
            seal(&f.repo.keys, kind, &meta, payload, None).unwrap()
        };
        let good = f.repo.storage().get(&key).unwrap();
        let (meta, payload) = f.repo.decode_run(&key, &good).unwrap();
        let meta = serde_json::to_value(&meta).unwrap();
        // Another kind under the run's key.
        let other = forged(meta.clone(), &payload, ObjectKind::Manifest);
        assert!(matches!(
            f.repo.decode_run(&key, &other),
            Err(RepoError::Corrupt { .. })
        ));
        // A pack id that would reach a storage key.
        let mut bad_pack = meta.clone();
        bad_pack["packs"][0] = "../../strata-repo.json".into();
        let bytes = forged(bad_pack, &payload, ObjectKind::IndexRun);
        assert!(matches!(
            f.repo.decode_run(&key, &bytes),
            Err(RepoError::Corrupt { .. })
        ));
        // Entries out of order.
        let mut swapped = payload[ENTRY_LEN..2 * ENTRY_LEN].to_vec();
        swapped.extend_from_slice(&payload[..ENTRY_LEN]);
        swapped.extend_from_slice(&payload[2 * ENTRY_LEN..]);
        let bytes = forged(meta.clone(), &swapped, ObjectKind::IndexRun);
        assert!(matches!(
            f.repo.decode_run(&key, &bytes),
            Err(RepoError::Corrupt { .. })
        ));
        // A newer run format is not misread.
        let mut newer = meta;
        newer["version"] = (INDEX_RUN_VERSION + 1).into();
        let bytes = forged(newer, &payload, ObjectKind::IndexRun);
        assert!(matches!(
            f.repo.decode_run(&key, &bytes),
            Err(RepoError::NewerFormat { .. })
        ));
    }

    #[test]
    fn a_damaged_cache_file_costs_deduplication_never_a_wrong_block() {
        let f = Fixture::new();
        let m = backup(&f.repo, "1", 0..100);
        let cache = f.repo.index_cache_dir("i").unwrap();
        let key = f.run_keys().remove(0);
        let path = cache.join(file_name(&key));
        let mut bytes = std::fs::read(&path).unwrap();
        // The last entry's pack ordinal.
        let at = bytes.len() - ENTRY_LEN + 32;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let index = f.repo.block_index("i").unwrap();
        let mut found = 0;
        for b in &m.files[0].blocks {
            if let Some(got) = index.get(&b.hash) {
                assert_eq!(&got, b);
                found += 1;
            }
        }
        assert!(
            (1..100).contains(&found),
            "{found}: only the damaged chunk misses"
        );
        // Damage in the header: fetched again from the repository.
        let n = bytes.len();
        bytes[CACHE_HEADER_LEN + 2] ^= 1;
        bytes.truncate(n);
        std::fs::write(&path, &bytes).unwrap();
        let index = f.repo.block_index("i").unwrap();
        for b in &m.files[0].blocks {
            assert_eq!(index.get(&b.hash).as_ref(), Some(b));
        }
    }

    #[test]
    fn runs_of_an_encrypted_repository_are_sealed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, hex::encode([9u8; 32])).unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
        let repo = Repository::open_or_init_with_key(storage, Some(&KeySource::KeyFile(key_file)))
            .unwrap()
            .with_index_cache(dir.path().join("cache"));
        let m = backup(&repo, "1", 0..20);
        let key = repo.storage().list(&index_prefix("i")).unwrap().remove(0);
        let bytes = repo.storage().get(&key).unwrap();
        // Neither hashes nor pack ids appear in the clear.
        let b = &m.files[0].blocks[0];
        assert!(!bytes.windows(32).any(|w| w == b.hash.0));
        assert!(!bytes.windows(32).any(|w| w == b.pack.as_bytes()));
        let fresh = repo.clone().with_index_cache(dir.path().join("fresh"));
        assert_eq!(
            fresh.block_index("i").unwrap().get(&b.hash).as_ref(),
            Some(b)
        );
        let mut bad = bytes;
        let last = bad.len() - 1;
        bad[last] ^= 1;
        repo.storage().put(&key, &bad).unwrap();
        let rebuilt = repo.clone().with_index_cache(dir.path().join("third"));
        assert_eq!(
            rebuilt.block_index("i").unwrap().get(&b.hash).as_ref(),
            Some(b)
        );
        assert!(!repo
            .storage()
            .list(&index_prefix("i"))
            .unwrap()
            .contains(&key));
    }

    #[test]
    fn reindex_rebuilds_one_run_from_the_manifests() {
        let f = Fixture::new();
        for i in 0..5u32 {
            backup(&f.repo, &i.to_string(), i * 10..i * 10 + 15);
        }
        let report = f.repo.rebuild_block_index("i").unwrap();
        assert!(report.objects_deleted >= 1);
        assert_eq!(report.entries, 55);
        assert_eq!(f.run_keys().len(), 1);
        assert_same(
            &f.elsewhere("after").block_index("i").unwrap(),
            &from_manifests(&f.repo),
        );
    }

    #[test]
    fn a_cache_directory_of_another_user_is_not_used() {
        let f = Fixture::new();
        backup(&f.repo, "1", 0..5);
        let foreign = f.dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
        let repo = f.repo.clone().with_index_cache(foreign);
        assert!(matches!(
            repo.index_cache_dir("i"),
            Err(RepoError::Cache(_))
        ));
        // The index is then read from the manifests.
        assert_eq!(repo.block_index("i").unwrap().len(), 5);
    }
}
