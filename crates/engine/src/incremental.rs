//! Block-level incremental transfer (PostgreSQL 17 and later).
//!
//! With `summarize_wal = on` the server keeps summaries of which blocks WAL
//! touched. A backup that uploads the backup_manifest of an earlier backup
//! and asks for `INCREMENTAL` then receives, for each relation file, an
//! `INCREMENTAL.<name>` file holding only the blocks changed since that
//! backup, instead of the whole file. Strata rebuilds every such file into a
//! full one at once, block by block: a repository block whose pages did not
//! change is the earlier backup's block, referenced without being read; a
//! block with changed pages is the earlier block with those pages laid over
//! it, stored like any new block. The manifest that results lists whole
//! files, so an incremental backup restores exactly like a full one and
//! does not depend on the earlier manifest once committed.
//!
//! The file format (src/include/backup/basebackup_incremental.h and
//! src/bin/pg_combinebackup/reconstruct.c in PostgreSQL): a header of
//! native-endian u32 words — magic `0xd3ae1f0d`, the number of blocks, the
//! truncation length in blocks, then the block numbers, ascending — padded
//! to a page boundary when any block follows; then the pages in the order
//! of the list. The rebuilt file is `max(truncation length, last block + 1)`
//! pages long; a page below the truncation length that the file does not
//! hold comes from the earlier backup (zeros where that file was shorter),
//! and a page at or above it that the file does not hold is zeros.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use strata_repo::{BackupManifest, BlockRef, FileEntry, FileKind};

pub(crate) const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;
const INCREMENTAL_PREFIX: &str = "INCREMENTAL.";

/// `base/5/INCREMENTAL.16384.1` → `base/5/16384.1`; `None` for other names.
pub(crate) fn full_name(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let bare = name.strip_prefix(INCREMENTAL_PREFIX)?;
    if bare.is_empty() {
        return None;
    }
    Some(match dir {
        Some(dir) => format!("{dir}/{bare}"),
        None => bare.to_string(),
    })
}

/// The earlier backup an incremental transfer is relative to: its files'
/// blocks, by tablespace and path.
pub(crate) struct IncrementalBase {
    /// Its manifest, as read from the repository (also the block index's).
    pub manifest: BackupManifest,
    /// Index in `manifest.files` of each file, by tablespace and path.
    files: HashMap<(Option<u32>, String), usize>,
    /// The server's page size (`block_size`).
    pub page_size: usize,
    /// Pages per relation segment file (`segment_size` / `block_size`).
    pub segment_pages: u64,
}

impl IncrementalBase {
    pub fn new(manifest: BackupManifest, page_size: usize, segment_pages: u64) -> Self {
        let files = manifest
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind == FileKind::File)
            .map(|(i, f)| ((f.tablespace, f.path.clone()), i))
            .collect();
        IncrementalBase {
            manifest,
            files,
            page_size,
            segment_pages,
        }
    }

    pub fn backup_id(&self) -> &str {
        &self.manifest.backup_id
    }

    pub fn file(&self, tablespace: Option<u32>, path: &str) -> Option<&FileEntry> {
        let i = *self.files.get(&(tablespace, path.to_string()))?;
        self.manifest.files.get(i)
    }
}

/// What to store for one repository block of a rebuilt file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BlockPlan {
    /// Exactly this block of the earlier backup.
    Reuse(BlockRef),
    /// `len` bytes: the first `keep` bytes of the earlier block (zeros
    /// where it is shorter or absent), zeros after them, with `pages` laid
    /// over at their offsets.
    Build {
        base: Option<BlockRef>,
        keep: usize,
        len: usize,
        pages: Vec<(usize, Vec<u8>)>,
    },
}

impl BlockPlan {
    /// Carries out a `Build` given the earlier block's bytes (read by the
    /// caller when `base` is set).
    pub fn assemble(
        keep: usize,
        len: usize,
        base: Option<Vec<u8>>,
        pages: Vec<(usize, Vec<u8>)>,
    ) -> Vec<u8> {
        let mut out = base.unwrap_or_default();
        out.truncate(keep.min(len));
        out.resize(len, 0);
        for (at, page) in pages {
            out[at..at + page.len()].copy_from_slice(&page);
        }
        out
    }
}

/// Parses one `INCREMENTAL.*` file as it streams in and plans the blocks
/// of the full file it stands for, in order.
pub(crate) struct IncrementalFile {
    page_size: usize,
    pages_per_block: u64,
    /// Pages per relation segment: no file the server sends can be longer,
    /// so it bounds the block count, the block numbers and the truncation
    /// length (as pg_combinebackup checks them against `RELSEG_SIZE`).
    segment_pages: u64,
    /// Size of the incremental file as sent.
    size: u64,
    received: u64,
    /// The earlier backup's blocks of the same file.
    base: Vec<BlockRef>,
    header: Vec<u8>,
    header_len: Option<usize>,
    blocks: Vec<u32>,
    truncation: u64,
    /// Pages of the rebuilt file.
    total_pages: u64,
    /// Index in `blocks` of the page being received.
    next_listed: usize,
    page: Vec<u8>,
    /// Pages received for `pending_block`, not yet planned.
    pending: Vec<(usize, Vec<u8>)>,
    pending_block: u64,
    /// First block of the rebuilt file not yet planned.
    next_block: u64,
}

impl IncrementalFile {
    /// `block_size` is the repository's block size, a multiple of
    /// `page_size`; `base` is the earlier backup's entry for the file;
    /// `segment_pages` the server's pages per relation segment.
    pub fn new(
        size: u64,
        base: &FileEntry,
        page_size: usize,
        block_size: usize,
        segment_pages: u64,
    ) -> Result<Self, String> {
        if page_size == 0 || !block_size.is_multiple_of(page_size) {
            return Err(format!(
                "repository block size {block_size} is not a multiple of the page size {page_size}"
            ));
        }
        if segment_pages == 0 {
            return Err("a relation segment of 0 pages".into());
        }
        let n = base.blocks.len();
        if base
            .blocks
            .iter()
            .take(n.saturating_sub(1))
            .any(|b| b.raw_len as usize != block_size)
        {
            return Err(format!(
                "{}: the earlier backup's blocks are not {block_size} bytes each",
                base.path
            ));
        }
        Ok(IncrementalFile {
            page_size,
            pages_per_block: (block_size / page_size) as u64,
            segment_pages,
            size,
            received: 0,
            base: base.blocks.clone(),
            header: Vec::new(),
            header_len: None,
            blocks: Vec::new(),
            truncation: 0,
            total_pages: 0,
            next_listed: 0,
            page: Vec::with_capacity(page_size),
            pending: Vec::new(),
            pending_block: 0,
            next_block: 0,
        })
    }

    /// Page numbers (within the segment) the file holds.
    pub fn listed_blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Size of the rebuilt file, known once the header is read.
    pub fn full_size(&self) -> u64 {
        self.total_pages * self.page_size as u64
    }

    /// Takes the next bytes of the incremental file; plans for every block
    /// that can no longer change are appended to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<BlockPlan>) -> Result<(), String> {
        self.received += data.len() as u64;
        if self.received > self.size {
            return Err("more data than the incremental file's size".into());
        }
        while self.header_len.is_none() && !data.is_empty() {
            let want = self.header_wanted() - self.header.len();
            let take = want.min(data.len());
            self.header.extend_from_slice(&data[..take]);
            data = &data[take..];
            // At 12 bytes the magic and the block count can be checked;
            // when the whole header is in, the block list is read.
            if self.header.len() == 12 || self.header.len() == self.header_wanted() {
                self.parse_header()?;
            }
        }
        while !data.is_empty() {
            let take = (self.page_size - self.page.len()).min(data.len());
            self.page.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.page.len() == self.page_size {
                let page = std::mem::replace(&mut self.page, Vec::with_capacity(self.page_size));
                let blkno = *self
                    .blocks
                    .get(self.next_listed)
                    .ok_or("more pages than the header lists")? as u64;
                self.next_listed += 1;
                let block = blkno / self.pages_per_block;
                if !self.pending.is_empty() && block != self.pending_block {
                    self.plan_pending(out);
                }
                self.plan_until(block, out);
                self.pending_block = block;
                let at = ((blkno % self.pages_per_block) as usize) * self.page_size;
                self.pending.push((at, page));
            }
        }
        Ok(())
    }

    /// Plans the remaining blocks once the whole file is received.
    pub fn finish(mut self, out: &mut Vec<BlockPlan>) -> Result<u64, String> {
        if self.received != self.size || self.header_len.is_none() {
            return Err("incremental file ended early".into());
        }
        if self.next_listed != self.blocks.len() || !self.page.is_empty() {
            return Err("incremental file holds fewer pages than its header lists".into());
        }
        if !self.pending.is_empty() {
            self.plan_pending(out);
        }
        let blocks = self.total_pages.div_ceil(self.pages_per_block);
        self.plan_until(blocks, out);
        Ok(self.full_size())
    }

    /// Header bytes needed before it can be parsed further.
    fn header_wanted(&self) -> usize {
        if self.header.len() < 12 {
            return 12;
        }
        let n = self.word(1) as usize;
        let len = 12 + 4 * n;
        if n > 0 {
            len.div_ceil(self.page_size) * self.page_size
        } else {
            len
        }
    }

    fn word(&self, i: usize) -> u32 {
        u32::from_ne_bytes(self.header[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
    }

    fn parse_header(&mut self) -> Result<(), String> {
        if self.header.len() == 12 {
            if self.word(0) != INCREMENTAL_MAGIC {
                return Err(format!(
                    "bad incremental file magic {:#x} (expected {INCREMENTAL_MAGIC:#x})",
                    self.word(0)
                ));
            }
            let n = self.word(1) as u64;
            // Check the block count against the file size before trusting it.
            if 12 + 4 * n > self.size {
                return Err(format!(
                    "incremental header lists {n} blocks, more than the file can hold"
                ));
            }
            // The header is buffered whole and the rebuilt file planned
            // block by block: neither may be longer than a segment.
            if n > self.segment_pages {
                return Err(format!(
                    "incremental header lists {n} blocks, more than the {} pages of a relation segment",
                    self.segment_pages
                ));
            }
            if self.header.len() < self.header_wanted() {
                return Ok(());
            }
        }
        let n = self.word(1) as usize;
        let header_len = self.header_wanted();
        if header_len as u64 + (n as u64) * self.page_size as u64 != self.size {
            return Err(format!(
                "incremental file of {} bytes does not hold the {n} pages its header lists",
                self.size
            ));
        }
        // Servers of PostgreSQL 17 and 18 before their fix could send a truncation length past
        // the segment (a relation over one segment that VACUUM truncated); fixed servers clamp
        // it to the segment, and so does this, whatever the header claims.
        self.truncation = (self.word(2) as u64).min(self.segment_pages);
        self.blocks = (0..n).map(|i| self.word(3 + i)).collect();
        if self.blocks.windows(2).any(|w| w[0] >= w[1]) {
            return Err("incremental block list is not in ascending order".into());
        }
        // Ascending, so the last is the largest.
        if let Some(&last) = self
            .blocks
            .last()
            .filter(|&&b| b as u64 >= self.segment_pages)
        {
            return Err(format!(
                "incremental block number {last} is beyond a relation segment ({} pages)",
                self.segment_pages
            ));
        }
        let last = self.blocks.last().map(|&b| b as u64 + 1).unwrap_or(0);
        self.total_pages = self.truncation.max(last);
        self.header_len = Some(header_len);
        self.header = Vec::new();
        Ok(())
    }

    fn plan_pending(&mut self, out: &mut Vec<BlockPlan>) {
        let pages = std::mem::take(&mut self.pending);
        let block = self.pending_block;
        out.push(self.plan(block, pages));
        self.next_block = block + 1;
    }

    /// Plans the blocks before `end` that received no page.
    fn plan_until(&mut self, end: u64, out: &mut Vec<BlockPlan>) {
        while self.next_block < end {
            out.push(self.plan(self.next_block, Vec::new()));
            self.next_block += 1;
        }
    }

    fn plan(&self, block: u64, pages: Vec<(usize, Vec<u8>)>) -> BlockPlan {
        let first_page = block * self.pages_per_block;
        let pages_here = self.pages_per_block.min(self.total_pages - first_page);
        let len = (pages_here as usize) * self.page_size;
        // Pages of this block that come from the earlier backup.
        let from_base = self.truncation.saturating_sub(first_page).min(pages_here) as usize;
        let base = self.base.get(block as usize);
        if pages.is_empty() && from_base as u64 == pages_here {
            if let Some(b) = base.filter(|b| b.raw_len as usize == len) {
                return BlockPlan::Reuse(b.clone());
            }
        }
        BlockPlan::Build {
            base: base.filter(|_| from_base > 0).cloned(),
            keep: from_base * self.page_size,
            len,
            pages,
        }
    }
}

/// Which fork of a relation a data file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fork {
    Main,
    VisibilityMap,
    Other,
}

/// A relation data file: `base/5/16384_vm.2` is relation `base/5/16384`,
/// fork `VisibilityMap`, segment 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelFile {
    pub relation: String,
    pub fork: Fork,
    pub segno: u64,
}

/// Parses a (full, not `INCREMENTAL.`) data file path; `None` for files
/// that are not relation forks.
pub(crate) fn rel_file(path: &str) -> Option<RelFile> {
    let (dir, name) = path.rsplit_once('/')?;
    let (stem, segno) = match name.split_once('.') {
        Some((stem, seg)) if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) => {
            (stem, seg.parse().ok()?)
        }
        Some(_) => return None,
        None => (name, 0),
    };
    let (node, fork) = match stem.split_once('_') {
        Some((node, "vm")) => (node, Fork::VisibilityMap),
        Some((node, "fsm" | "init")) => (node, Fork::Other),
        Some(_) => return None,
        None => (stem, Fork::Main),
    };
    if node.is_empty() || !node.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(RelFile {
        relation: format!("{dir}/{node}"),
        fork,
        segno,
    })
}

/// Heap blocks changed since the earlier backup, per relation, as the
/// incremental main-fork files list them.
///
/// PostgreSQL clears visibility-map bits when it changes a heap page
/// without naming the map page in the WAL record, so WAL summaries miss
/// those changes and an incremental transfer can send a relation's changed
/// heap pages but not the map page that still says "all visible" for them
/// (index-only scans would then return deleted rows). Strata therefore
/// zeroes every map page taken from the earlier backup that covers a heap
/// page changed since: a zero page means "nothing known to be all
/// visible", which is always correct, and the next VACUUM sets the bits
/// again. Map pages the server did send are current and kept.
#[derive(Debug, Default)]
pub(crate) struct HeapChanges {
    /// `None`: the main fork came whole, so any page may have changed.
    by_relation: HashMap<(Option<u32>, String), Option<Vec<u64>>>,
}

impl HeapChanges {
    /// Records the pages an incremental main-fork segment lists.
    pub fn listed(
        &mut self,
        tablespace: Option<u32>,
        file: &RelFile,
        blocks: &[u32],
        segment_pages: u64,
    ) {
        let entry = self
            .by_relation
            .entry((tablespace, file.relation.clone()))
            .or_insert_with(|| Some(Vec::new()));
        if let Some(list) = entry {
            list.extend(
                blocks
                    .iter()
                    .map(|&b| file.segno * segment_pages + b as u64),
            );
        }
    }

    /// Records a main-fork segment that was sent whole.
    pub fn whole(&mut self, tablespace: Option<u32>, file: &RelFile) {
        self.by_relation
            .insert((tablespace, file.relation.clone()), None);
    }

    /// Whether map page `vm_page` (counted from the start of the fork) may
    /// describe a heap page that changed.
    fn stale(
        &self,
        tablespace: Option<u32>,
        relation: &str,
        vm_page: u64,
        page_size: usize,
    ) -> bool {
        // Two bits per heap page after the page header.
        let heap_per_page = ((page_size - PAGE_HEADER_SIZE) * 4) as u64;
        let first = vm_page * heap_per_page;
        match self.by_relation.get(&(tablespace, relation.to_string())) {
            None => false,
            Some(None) => true,
            Some(Some(list)) => list
                .iter()
                .any(|&b| b >= first && b < first + heap_per_page),
        }
    }

    /// Turns the plans of a visibility-map file into ones whose pages from
    /// the earlier backup are zeroed wherever their heap pages changed.
    pub fn guard_map(
        &self,
        tablespace: Option<u32>,
        file: &RelFile,
        plans: Vec<BlockPlan>,
        page_size: usize,
        block_size: usize,
        segment_pages: u64,
    ) -> Vec<BlockPlan> {
        let pages_per_block = block_size / page_size;
        plans
            .into_iter()
            .enumerate()
            .map(|(i, plan)| {
                let (base, keep, len, mut pages) = match plan {
                    BlockPlan::Reuse(b) => {
                        let len = b.raw_len as usize;
                        (Some(b), len, len, Vec::new())
                    }
                    BlockPlan::Build {
                        base,
                        keep,
                        len,
                        pages,
                    } => (base, keep, len, pages),
                };
                let mut zeroed = false;
                for p in 0..keep.min(len) / page_size {
                    let at = p * page_size;
                    if pages.iter().any(|(o, _)| *o == at) {
                        continue;
                    }
                    let vm_page = file.segno * segment_pages + (i * pages_per_block + p) as u64;
                    if self.stale(tablespace, &file.relation, vm_page, page_size) {
                        pages.push((at, vec![0; page_size]));
                        zeroed = true;
                    }
                }
                match base {
                    Some(b)
                        if !zeroed
                            && pages.is_empty()
                            && keep == len
                            && b.raw_len as usize == len =>
                    {
                        BlockPlan::Reuse(b)
                    }
                    base => BlockPlan::Build {
                        base,
                        keep,
                        len,
                        pages,
                    },
                }
            })
            .collect()
    }
}

/// `SizeOfPageHeaderData`, already a multiple of the maximum alignment.
const PAGE_HEADER_SIZE: usize = 24;

/// Removes the `INCREMENTAL FROM` lines from an incremental backup's
/// backup_label: PostgreSQL refuses to start from a directory whose label
/// has them (they mark a backup that still needs combining), and the files
/// Strata stores are already whole.
pub(crate) fn strip_backup_label(label: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(label);
    text.split_inclusive('\n')
        .filter(|line| !line.starts_with("INCREMENTAL FROM "))
        .collect::<String>()
        .into_bytes()
}

/// What a file of the server's manifest becomes in the rebuilt backup.
#[derive(Debug, Clone)]
pub(crate) struct ManifestChange {
    pub path: String,
    pub size: u64,
    /// CRC-32C of the new contents; `None` writes the entry without a
    /// checksum (pg_verifybackup then checks its size only).
    pub crc32c: Option<u32>,
}

/// Rewrites the backup_manifest of an incremental backup so it describes
/// the whole files Strata stores: `changes` maps a path as the server
/// listed it to the entry that replaces it. The layout and the
/// `Manifest-Checksum` (SHA-256 of everything before its own line) follow
/// what PostgreSQL writes, so pg_verifybackup accepts the result and the
/// server accepts it as the base of the next incremental backup.
pub(crate) fn rewrite_server_manifest(
    original: &[u8],
    changes: &HashMap<String, ManifestChange>,
) -> Result<Vec<u8>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(original).map_err(|e| format!("backup_manifest: {e}"))?;
    let field = |v: &serde_json::Value, k: &str| v.get(k).cloned();
    let version = field(&doc, "PostgreSQL-Backup-Manifest-Version")
        .ok_or("backup_manifest has no version")?;
    let files = doc
        .get("Files")
        .and_then(|f| f.as_array())
        .ok_or("backup_manifest has no Files list")?;
    let ranges = doc
        .get("WAL-Ranges")
        .and_then(|f| f.as_array())
        .ok_or("backup_manifest has no WAL-Ranges list")?;
    let mut out = format!(
        "{{ \"PostgreSQL-Backup-Manifest-Version\": {},\n",
        json(&version)
    );
    if let Some(sysid) = field(&doc, "System-Identifier") {
        out.push_str(&format!("\"System-Identifier\": {},\n", json(&sysid)));
    }
    out.push_str("\"Files\": [");
    let mut applied = 0;
    for (i, file) in files.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        let (line, changed) = manifest_file_line(file, changes)?;
        applied += usize::from(changed);
        out.push_str(&line);
    }
    if applied != changes.len() {
        return Err(format!(
            "backup_manifest lists {applied} of the {} files rebuilt",
            changes.len()
        ));
    }
    out.push_str("\n],\n\"WAL-Ranges\": [");
    for (i, range) in ranges.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(&wal_range_line(range)?);
    }
    out.push_str("\n],\n");
    let sum = hex::encode(Sha256::digest(out.as_bytes()));
    out.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    Ok(out.into_bytes())
}

fn json(v: &serde_json::Value) -> String {
    serde_json::to_string(v).expect("JSON value")
}

/// One entry of the `Files` list as PostgreSQL writes it: the server's, or
/// the stored file's when `changes` lists it (then `true`).
fn manifest_file_line(
    file: &serde_json::Value,
    changes: &HashMap<String, ManifestChange>,
) -> Result<(String, bool), String> {
    let field = |k: &str| file.get(k).cloned();
    let path = match (file.get("Path"), file.get("Encoded-Path")) {
        (Some(p), _) => p.as_str().unwrap_or_default().to_string(),
        (None, Some(e)) => {
            let raw = hex::decode(e.as_str().unwrap_or_default())
                .map_err(|e| format!("backup_manifest Encoded-Path: {e}"))?;
            String::from_utf8_lossy(&raw).into_owned()
        }
        (None, None) => return Err("backup_manifest lists a file without a path".into()),
    };
    let modified = field("Last-Modified").ok_or("a file without Last-Modified")?;
    let change = changes.get(&path);
    let (name, size, checksum) = match change {
        Some(change) => {
            let checksum = change.crc32c.map(|c| {
                (
                    serde_json::Value::from("CRC32C"),
                    serde_json::Value::from(hex::encode(c.to_le_bytes())),
                )
            });
            (
                format!("\"Path\": {}", json(&change.path.clone().into())),
                serde_json::Value::from(change.size),
                checksum,
            )
        }
        None => {
            let name = match (file.get("Path"), file.get("Encoded-Path")) {
                (Some(p), _) => format!("\"Path\": {}", json(p)),
                (None, Some(e)) => format!("\"Encoded-Path\": {}", json(e)),
                (None, None) => unreachable!("checked above"),
            };
            let checksum = field("Checksum-Algorithm").zip(field("Checksum"));
            (
                name,
                field("Size").ok_or("a file without a size")?,
                checksum,
            )
        }
    };
    let mut out = format!(
        "{{ {name}, \"Size\": {}, \"Last-Modified\": {}",
        json(&size),
        json(&modified)
    );
    if let Some((algorithm, sum)) = checksum {
        out.push_str(&format!(
            ", \"Checksum-Algorithm\": {}, \"Checksum\": {}",
            json(&algorithm),
            json(&sum)
        ));
    }
    out.push_str(" }");
    Ok((out, change.is_some()))
}

/// One entry of the `WAL-Ranges` list as PostgreSQL writes it.
fn wal_range_line(range: &serde_json::Value) -> Result<String, String> {
    let field = |k: &str| range.get(k).cloned();
    Ok(format!(
        "{{ \"Timeline\": {}, \"Start-LSN\": {}, \"End-LSN\": {} }}",
        json(&field("Timeline").ok_or("a WAL range without Timeline")?),
        json(&field("Start-LSN").ok_or("a WAL range without Start-LSN")?),
        json(&field("End-LSN").ok_or("a WAL range without End-LSN")?),
    ))
}

/// Whether a backup_manifest's `Manifest-Checksum` matches its contents:
/// SHA-256 of everything up to and including the next-to-last newline.
pub(crate) fn manifest_checksum_ok(manifest: &[u8]) -> bool {
    let newlines: Vec<usize> = manifest
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i)
        .take(2)
        .collect();
    let [last, before] = newlines[..] else {
        return false;
    };
    let tail = String::from_utf8_lossy(&manifest[before + 1..last]);
    let Some(expected) = tail
        .trim()
        .strip_prefix("\"Manifest-Checksum\": \"")
        .and_then(|t| t.strip_suffix("\"}"))
    else {
        return false;
    };
    hex::encode(Sha256::digest(&manifest[..=before])).eq_ignore_ascii_case(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_repo::{BlockHash, PackId};

    const PAGE: usize = 8192;
    const BLOCK: usize = 4 * PAGE;
    /// PostgreSQL's default: 1 GiB of 8 KiB pages.
    const SEGMENT: u64 = 131072;

    fn block_ref(n: u8, len: usize) -> BlockRef {
        BlockRef {
            hash: BlockHash([n; 32]),
            pack: PackId::new(format!("pack{n}")),
            offset: 0,
            stored_len: 1,
            raw_len: len as u32,
            compression: 1,
        }
    }

    fn base_file(pages: usize) -> FileEntry {
        let mut blocks = Vec::new();
        let mut left = pages * PAGE;
        let mut n = 0;
        while left > 0 {
            let len = left.min(BLOCK);
            blocks.push(block_ref(n, len));
            left -= len;
            n += 1;
        }
        FileEntry {
            tablespace: None,
            path: "base/5/16384".into(),
            kind: FileKind::File,
            mode: 0o600,
            size: (pages * PAGE) as u64,
            mtime: 0,
            link_target: None,
            crc32c: None,
            blocks,
        }
    }

    fn incremental(truncation: u32, blocks: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [INCREMENTAL_MAGIC, blocks.len() as u32, truncation] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        for b in blocks {
            out.extend_from_slice(&b.to_ne_bytes());
        }
        if !blocks.is_empty() {
            out.resize(out.len().div_ceil(PAGE) * PAGE, 0);
        }
        for b in blocks {
            out.extend(std::iter::repeat_n((*b as u8).wrapping_add(1), PAGE));
        }
        out
    }

    /// Feeds the file in awkward pieces and returns the plans.
    fn run(base: &FileEntry, file: &[u8], piece: usize) -> (Vec<BlockPlan>, u64) {
        let mut inc = IncrementalFile::new(file.len() as u64, base, PAGE, BLOCK, SEGMENT).unwrap();
        let mut plans = Vec::new();
        for chunk in file.chunks(piece) {
            inc.push(chunk, &mut plans).unwrap();
        }
        let size = inc.finish(&mut plans).unwrap();
        (plans, size)
    }

    #[test]
    fn names() {
        assert_eq!(
            full_name("base/5/INCREMENTAL.16384.1").as_deref(),
            Some("base/5/16384.1")
        );
        assert_eq!(full_name("INCREMENTAL.x").as_deref(), Some("x"));
        assert_eq!(full_name("base/5/16384"), None);
        assert_eq!(full_name("base/5/INCREMENTAL."), None);
    }

    #[test]
    fn unchanged_file_reuses_every_block() {
        let base = base_file(10);
        let (plans, size) = run(&base, &incremental(10, &[]), 5);
        assert_eq!(size, 10 * PAGE as u64);
        assert_eq!(
            plans,
            base.blocks
                .iter()
                .cloned()
                .map(BlockPlan::Reuse)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn changed_pages_are_laid_over_their_blocks() {
        let base = base_file(10);
        // Pages 1 and 2 (block 0) and 9 (block 2, the short last one) changed.
        let (plans, size) = run(&base, &incremental(10, &[1, 2, 9]), 777);
        assert_eq!(size, 10 * PAGE as u64);
        assert_eq!(plans.len(), 3);
        match &plans[0] {
            BlockPlan::Build {
                base: Some(b),
                keep,
                len,
                pages,
            } => {
                assert_eq!(b, &base.blocks[0]);
                assert_eq!((*keep, *len), (BLOCK, BLOCK));
                let offsets: Vec<usize> = pages.iter().map(|p| p.0).collect();
                assert_eq!(offsets, vec![PAGE, 2 * PAGE]);
                assert!(pages[0].1.iter().all(|&b| b == 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plans[1], BlockPlan::Reuse(base.blocks[1].clone()));
        match &plans[2] {
            BlockPlan::Build {
                keep, len, pages, ..
            } => {
                assert_eq!((*keep, *len), (2 * PAGE, 2 * PAGE));
                assert_eq!(pages[0].0, PAGE);
            }
            other => panic!("{other:?}"),
        }
        let assembled = BlockPlan::assemble(
            2 * PAGE,
            2 * PAGE,
            Some(vec![7; 2 * PAGE]),
            vec![(PAGE, vec![9; PAGE])],
        );
        assert!(assembled[..PAGE].iter().all(|&b| b == 7));
        assert!(assembled[PAGE..].iter().all(|&b| b == 9));
    }

    #[test]
    fn growth_truncation_and_holes() {
        let base = base_file(6);
        // Truncated to 5 pages, then page 9 written: pages 5..9 are zeros,
        // and block 1's tail (page 5 of the earlier file) must not survive.
        let (plans, size) = run(&base, &incremental(5, &[9]), PAGE);
        assert_eq!(size, 10 * PAGE as u64);
        assert_eq!(plans[0], BlockPlan::Reuse(base.blocks[0].clone()));
        match &plans[1] {
            BlockPlan::Build {
                base: Some(b),
                keep,
                len,
                pages,
            } => {
                assert_eq!(b, &base.blocks[1]);
                assert_eq!((*keep, *len), (PAGE, BLOCK));
                assert!(pages.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match &plans[2] {
            BlockPlan::Build {
                base, keep, pages, ..
            } => {
                assert_eq!((base, *keep), (&None, 0));
                assert_eq!(pages[0].0, PAGE);
            }
            other => panic!("{other:?}"),
        }
        // A file that grew past the earlier one without WAL for the new
        // pages (truncation length beyond the earlier size): zeros there.
        let (plans, size) = run(&base_file(2), &incremental(6, &[]), 100);
        assert_eq!(size, 6 * PAGE as u64);
        assert!(
            matches!(&plans[0], BlockPlan::Build { keep, len, .. } if *keep == BLOCK && *len == BLOCK)
        );
        assert!(matches!(&plans[1], BlockPlan::Build { base: None, .. }));
    }

    #[test]
    fn malformed_files_are_refused() {
        let base = base_file(4);
        let mut bad = incremental(4, &[1]);
        bad[0] ^= 1;
        let mut inc = IncrementalFile::new(bad.len() as u64, &base, PAGE, BLOCK, SEGMENT).unwrap();
        assert!(inc
            .push(&bad, &mut Vec::new())
            .unwrap_err()
            .contains("magic"));
        let good = incremental(4, &[1, 2]);
        let mut inc =
            IncrementalFile::new(good.len() as u64 + PAGE as u64, &base, PAGE, BLOCK, SEGMENT)
                .unwrap();
        assert!(inc.push(&good, &mut Vec::new()).is_err());
        let mut inc = IncrementalFile::new(good.len() as u64, &base, PAGE, BLOCK, SEGMENT).unwrap();
        inc.push(&good[..good.len() - 1], &mut Vec::new()).unwrap();
        assert!(inc.finish(&mut Vec::new()).is_err());
        assert!(IncrementalFile::new(10, &base, PAGE, PAGE * 3 / 2, SEGMENT).is_err());
    }

    /// A header of a few bytes must not make a file longer than a relation
    /// segment, nor its block list (buffered whole) longer than one.
    #[test]
    fn headers_beyond_a_relation_segment_are_refused() {
        let base = base_file(4);
        let refused = |file: &[u8]| {
            let mut inc =
                IncrementalFile::new(file.len() as u64, &base, PAGE, BLOCK, SEGMENT).unwrap();
            let mut plans = Vec::new();
            let err = inc.push(file, &mut plans).unwrap_err();
            assert!(plans.is_empty(), "{err}");
            err
        };
        // Truncation length 0xFFFFFFFF (2^32 pages, some 2^30 blocks had it been taken) is
        // cut to the segment, as fixed servers send it: the file is one segment long.
        for truncation in [u32::MAX, SEGMENT as u32 + 1] {
            let (plans, size) = run(&base, &incremental(truncation, &[]), 999);
            assert_eq!(size, SEGMENT * PAGE as u64, "{truncation}");
            assert_eq!(plans.len(), SEGMENT as usize / 4, "{truncation}");
        }
        // A block number past the segment makes the file as long.
        let err = refused(&incremental(4, &[1, 0xFFFF_FFFE]));
        assert!(
            err.contains("block number 4294967294 is beyond a relation segment (131072 pages)"),
            "{err}"
        );
        let err = refused(&incremental(4, &[SEGMENT as u32]));
        assert!(err.contains("block number 131072 is beyond"), "{err}");
        // A block count past the segment is refused at the 12th byte, before
        // the list is buffered (the file's size claims room for it).
        let n = SEGMENT + 1;
        let mut header = Vec::new();
        for w in [INCREMENTAL_MAGIC, n as u32, 4] {
            header.extend_from_slice(&w.to_ne_bytes());
        }
        let size = (12 + 4 * n).div_ceil(PAGE as u64) * PAGE as u64 + n * PAGE as u64;
        let mut inc = IncrementalFile::new(size, &base, PAGE, BLOCK, SEGMENT).unwrap();
        let err = inc.push(&header, &mut Vec::new()).unwrap_err();
        assert!(
            err.contains("lists 131073 blocks, more than the 131072 pages of a relation segment"),
            "{err}"
        );
        // The segment's own bounds are accepted: its last page, a whole segment.
        let (plans, size) = run(
            &base,
            &incremental(SEGMENT as u32, &[SEGMENT as u32 - 1]),
            999,
        );
        assert_eq!(size, SEGMENT * PAGE as u64);
        assert_eq!(plans.len(), SEGMENT as usize / 4);
        assert!(IncrementalFile::new(10, &base, PAGE, BLOCK, 0).is_err());
    }

    #[test]
    fn relation_file_names() {
        assert_eq!(
            rel_file("base/5/16384_vm.2"),
            Some(RelFile {
                relation: "base/5/16384".into(),
                fork: Fork::VisibilityMap,
                segno: 2
            })
        );
        assert_eq!(rel_file("base/5/16384").unwrap().fork, Fork::Main);
        assert_eq!(rel_file("global/1262_fsm").unwrap().fork, Fork::Other);
        assert_eq!(rel_file("base/5/PG_VERSION"), None);
        assert_eq!(rel_file("base/5/16384_xx"), None);
        assert_eq!(rel_file("pg_filenode.map"), None);
    }

    #[test]
    fn map_pages_over_changed_heap_pages_are_zeroed() {
        let heap_per_page = ((PAGE - PAGE_HEADER_SIZE) * 4) as u64;
        let vm = rel_file("base/5/16384_vm").unwrap();
        let main = rel_file("base/5/16384").unwrap();
        // A map of 6 pages from the earlier backup (blocks of 4, 2 pages),
        // the server sent page 5 again.
        let base = base_file(6);
        let (plans, _) = run(&base, &incremental(6, &[5]), 1000);
        let mut changes = HeapChanges::default();
        // Heap pages on map pages 1 and 5 changed.
        changes.listed(
            None,
            &main,
            &[heap_per_page as u32 + 3, 5 * heap_per_page as u32],
            131072,
        );
        let guarded = changes.guard_map(None, &vm, plans, PAGE, BLOCK, 131072);
        match &guarded[0] {
            BlockPlan::Build {
                base, keep, pages, ..
            } => {
                assert_eq!(
                    (base.as_ref(), *keep),
                    (Some(&base_file(6).blocks[0]), BLOCK)
                );
                assert_eq!(pages.len(), 1);
                assert_eq!(pages[0].0, PAGE);
                assert!(pages[0].1.iter().all(|&b| b == 0));
            }
            other => panic!("{other:?}"),
        }
        // Map page 5 was sent: kept as sent, page 4 untouched.
        match &guarded[1] {
            BlockPlan::Build { pages, .. } => {
                assert_eq!(pages.len(), 1);
                assert!(pages[0].1.iter().all(|&b| b == 6));
            }
            other => panic!("{other:?}"),
        }
        // No changed heap pages: the map is taken as it was.
        let (plans, _) = run(&base, &incremental(6, &[]), 1000);
        let none = HeapChanges::default().guard_map(None, &vm, plans, PAGE, BLOCK, 131072);
        assert!(none.iter().all(|p| matches!(p, BlockPlan::Reuse(_))));
        // A main fork sent whole: every page from the earlier backup is zeroed.
        let mut whole = HeapChanges::default();
        whole.whole(None, &main);
        let (plans, _) = run(&base, &incremental(6, &[]), 1000);
        let all = whole.guard_map(None, &vm, plans, PAGE, BLOCK, 131072);
        match &all[0] {
            BlockPlan::Build { pages, .. } => assert_eq!(pages.len(), 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn label_loses_incremental_lines() {
        let label = b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n\
CHECKPOINT LOCATION: 0/4000080\nINCREMENTAL FROM LSN: 0/2000028\nINCREMENTAL FROM TLI: 1\n\
START TIMELINE: 1\n";
        let out = String::from_utf8(strip_backup_label(label)).unwrap();
        assert!(!out.contains("INCREMENTAL"));
        assert!(out.ends_with("CHECKPOINT LOCATION: 0/4000080\nSTART TIMELINE: 1\n"));
    }

    #[test]
    fn manifest_rewrite_keeps_a_valid_checksum() {
        let mut original = String::from(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7439,\n\"Files\": [\n\
{ \"Path\": \"backup_label\", \"Size\": 10, \"Last-Modified\": \"2026-12-03 17:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"01020304\" },\n\
{ \"Path\": \"base/5/INCREMENTAL.16384\", \"Size\": 12, \"Last-Modified\": \"2026-12-03 17:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"0a0b0c0d\" },\n\
{ \"Encoded-Path\": \"6869\", \"Size\": 1, \"Last-Modified\": \"2026-12-03 17:00:00 GMT\" }\n\
],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000100\" }\n],\n",
        );
        let sum = hex::encode(Sha256::digest(original.as_bytes()));
        original.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
        assert!(manifest_checksum_ok(original.as_bytes()));
        let mut tampered = original.clone().into_bytes();
        tampered[60] ^= 1;
        assert!(!manifest_checksum_ok(&tampered));

        let changes = HashMap::from([(
            "base/5/INCREMENTAL.16384".to_string(),
            ManifestChange {
                path: "base/5/16384".into(),
                size: 81920,
                crc32c: None,
            },
        )]);
        let rewritten = rewrite_server_manifest(original.as_bytes(), &changes).unwrap();
        assert!(manifest_checksum_ok(&rewritten));
        let doc: serde_json::Value = serde_json::from_slice(&rewritten).unwrap();
        let files = doc["Files"].as_array().unwrap();
        assert_eq!(files[1]["Path"], "base/5/16384");
        assert_eq!(files[1]["Size"], 81920);
        assert!(files[1].get("Checksum").is_none());
        assert_eq!(files[0]["Checksum"], "01020304");
        assert_eq!(files[2]["Encoded-Path"], "6869");
        assert_eq!(doc["System-Identifier"], 7439);
        assert_eq!(doc["WAL-Ranges"][0]["End-LSN"], "0/4000100");
        // Nothing to change: the same document, byte for byte.
        assert_eq!(
            rewrite_server_manifest(original.as_bytes(), &HashMap::new()).unwrap(),
            original.into_bytes()
        );
        let missing = HashMap::from([(
            "nope".to_string(),
            changes["base/5/INCREMENTAL.16384"].clone(),
        )]);
        assert!(rewrite_server_manifest(&rewritten, &missing).is_err());
    }
}
