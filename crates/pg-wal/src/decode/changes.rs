//! What each in-flight transaction did that can destroy data, collected per xid from the
//! records that carry it (`xl_xid`) until its commit or abort record says how it ended.
//!
//! References: src/backend/access/transam/xact.c (`RecordTransactionCommit`: a commit lists its
//! committed subtransactions; an aborted subtransaction writes its own abort record),
//! src/backend/storage/ipc/standby.c (`LogCurrentRunningXacts`: every xid before
//! `oldestRunningXid` has finished) and src/backend/access/transam/transam.c
//! (`TransactionIdPrecedes`).
//!
//! Memory is capped: at most [`MAX_TRACKED_XIDS`] transactions, [`MAX_ENTRIES_PER_XID`]
//! relation files (or databases) per xid and [`MAX_ENTRIES`] in all, and [`MAX_ENTRIES`]
//! files dropped by one commit. What does not fit is not recorded, and the commit that would
//! have reported it says so (`TxnChanges::incomplete`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::record::{BlockChange, BlockKind, XactParts};
use super::{RelFile, RowChanges, TxnChanges};
use crate::Lsn;

/// In-flight transactions (and subtransactions) with something recorded.
pub const MAX_TRACKED_XIDS: usize = 65_536;
/// Relation files and databases recorded for one xid.
pub const MAX_ENTRIES_PER_XID: usize = 16_384;
/// Relation files and databases recorded across all xids. With the xid states this bounds the
/// tracker at roughly 30 MiB (about 115 bytes per entry with its index, 170 per state); a
/// few KiB is usual. Also the most dropped files one commit reports.
pub const MAX_ENTRIES: usize = 131_072;
/// Xids that were refused for want of room, remembered by their low bits (8 KiB).
const REFUSED_BITS: usize = 65_536;
/// Recycled states kept for the next transactions (they keep their vectors' capacity).
const SPARE_STATES: usize = 64;
/// Relations per xid searched one by one; past that, rows are found through an index.
const ROW_SCAN_LIMIT: usize = 8;

/// Multiplicative hashing for xids and relation files: keys come from the server's WAL and are
/// spread already, and SipHash on every heap record would cost more than the decoding.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct FastHasher(u64);

const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0.rotate_left(32) ^ u64::from(n)).wrapping_mul(FIBONACCI);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// `TransactionIdPrecedes`: modulo-2^32 comparison for normal xids (3 and up).
pub(super) fn xid_precedes(a: u32, b: u32) -> bool {
    const FIRST_NORMAL: u32 = 3;
    if a < FIRST_NORMAL || b < FIRST_NORMAL {
        return a < b;
    }
    (a.wrapping_sub(b) as i32) < 0
}

/// What one xid did so far.
#[derive(Debug, Default)]
struct XidState {
    created: Vec<RelFile>,
    truncated: Vec<RelFile>,
    dropped_databases: Vec<u32>,
    rows: Vec<RowChanges>,
    /// Position of each relation in `rows`, kept once there are more than [`ROW_SCAN_LIMIT`].
    row_index: FastMap<RelFile, usize>,
    /// Something was not recorded because a cap was reached.
    incomplete: bool,
    /// See [`TxnChanges::drop_database_lsn`].
    drop_database_lsn: Option<Lsn>,
}

impl XidState {
    fn entries(&self) -> usize {
        self.created.len() + self.truncated.len() + self.dropped_databases.len() + self.rows.len()
    }

    fn clear(&mut self) {
        self.created.clear();
        self.truncated.clear();
        self.dropped_databases.clear();
        self.rows.clear();
        if !self.row_index.is_empty() {
            self.row_index = FastMap::default();
        }
        self.incomplete = false;
        self.drop_database_lsn = None;
    }

    fn find_row(&mut self, rel: RelFile) -> Option<usize> {
        match self.rows.last() {
            // Usually the same relation as the transaction's previous change.
            Some(last) if last.rel == rel => Some(self.rows.len() - 1),
            _ if self.rows.len() <= ROW_SCAN_LIMIT => self.rows.iter().position(|r| r.rel == rel),
            _ => {
                if self.row_index.is_empty() {
                    self.row_index = self
                        .rows
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (r.rel, i))
                        .collect();
                }
                self.row_index.get(&rel).copied()
            }
        }
    }

    fn add_row(&mut self, rel: RelFile) -> usize {
        let index = self.rows.len();
        self.rows.push(RowChanges {
            rel,
            deleted: 0,
            updated: 0,
        });
        if !self.row_index.is_empty() {
            self.row_index.insert(rel, index);
        }
        index
    }
}

/// Slots of the direct-mapped part of [`XidStates`].
const XID_SLOTS: usize = 4096;

/// Per-xid states. Xids in flight are usually close together, so most sit in the slot their
/// low bits choose, found without hashing; an xid whose slot is taken goes to a map.
#[derive(Default)]
struct XidStates {
    /// Empty until the first state; then [`XID_SLOTS`] long.
    slots: Vec<Option<(u32, Box<XidState>)>>,
    overflow: FastMap<u32, Box<XidState>>,
    len: usize,
}

impl std::fmt::Debug for XidStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XidStates").field("len", &self.len).finish()
    }
}

impl XidStates {
    fn slot(xid: u32) -> usize {
        xid as usize % XID_SLOTS
    }

    fn in_slot(&self, xid: u32) -> bool {
        matches!(self.slots.get(Self::slot(xid)), Some(Some((x, _))) if *x == xid)
    }

    fn get_mut(&mut self, xid: u32) -> Option<&mut Box<XidState>> {
        if self.in_slot(xid) {
            return self.slots[Self::slot(xid)].as_mut().map(|(_, state)| state);
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.overflow.get_mut(&xid)
    }

    /// Adds the state of an xid that has none.
    fn insert(&mut self, xid: u32, state: Box<XidState>) {
        if self.slots.is_empty() {
            self.slots.resize_with(XID_SLOTS, || None);
        }
        self.len += 1;
        let slot = &mut self.slots[Self::slot(xid)];
        if slot.is_none() {
            *slot = Some((xid, state));
        } else {
            self.overflow.insert(xid, state);
        }
    }

    fn remove(&mut self, xid: u32) -> Option<Box<XidState>> {
        let state = if self.in_slot(xid) {
            self.slots[Self::slot(xid)].take().map(|(_, state)| state)
        } else if self.overflow.is_empty() {
            None
        } else {
            self.overflow.remove(&xid)
        };
        self.len -= usize::from(state.is_some());
        state
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn xids(&self) -> impl Iterator<Item = u32> + '_ {
        let slots = self.slots.iter().flatten().map(|(xid, _)| *xid);
        slots.chain(self.overflow.keys().copied())
    }
}

/// Relation file created by an in-flight xid, and whether data went into it since.
#[derive(Debug, Clone, Copy)]
struct Created {
    xid: u32,
    filled: bool,
    loaded: bool,
}

/// Xids refused for want of room; a commit that may involve one of them is incomplete. Xids
/// are remembered by their low 16 bits, so one 65536 xids apart may be flagged too.
#[derive(Debug)]
struct Refused {
    bits: Box<[u64; REFUSED_BITS / 64]>,
    /// The latest refused xid: once it is older than every running xid, all have ended.
    latest: u32,
}

impl Refused {
    fn bit(xid: u32) -> (usize, u64) {
        let i = xid as usize % REFUSED_BITS;
        (i / 64, 1 << (i % 64))
    }

    fn contains(&self, xid: u32) -> bool {
        let (word, mask) = Refused::bit(xid);
        self.bits[word] & mask != 0
    }
}

/// Per-xid change tracking between a transaction's first record and its end.
#[derive(Debug, Default)]
pub(super) struct ChangeTracker {
    states: XidStates,
    /// Files created by in-flight xids (also how a fill finds its file).
    created: FastMap<RelFile, Created>,
    /// Entries recorded in all states.
    entries: usize,
    // Boxes on purpose: a spare moves into `states` as a pointer, not a struct copy.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<XidState>>,
    refused: Option<Refused>,
    /// Rows a transaction must delete or update in one file for the file to be reported
    /// (0 and 1: every row change).
    min_rows: u64,
}

impl ChangeTracker {
    /// Reports only files with at least `min_rows` rows deleted or updated.
    pub fn set_min_rows(&mut self, min_rows: u64) {
        self.min_rows = min_rows;
    }

    fn small(&self, r: &RowChanges) -> bool {
        r.deleted < self.min_rows && r.updated < self.min_rows
    }

    /// A commit of one xid without subtransactions that only changed rows below the threshold
    /// (most commits of a busy server): its state is dropped without building a report.
    fn commit_below_threshold(&mut self, xid: u32, parts: &XactParts<'_>) -> bool {
        if self.min_rows <= 1
            || parts.catalog_changed
            || parts.removes_files()
            || parts.subxacts().next().is_some()
            || self.was_refused(xid)
        {
            return false;
        }
        let min_rows = self.min_rows;
        let Some(state) = self.states.get_mut(xid) else {
            return false;
        };
        let quiet = state.created.is_empty()
            && state.truncated.is_empty()
            && state.dropped_databases.is_empty()
            && !state.incomplete
            && state
                .rows
                .iter()
                .all(|r| r.deleted < min_rows && r.updated < min_rows);
        if quiet {
            if let Some(state) = self.take(xid) {
                self.recycle(state);
            }
        }
        quiet
    }

    /// Whether any in-flight xid created a file: only then are inserts and page images looked at.
    pub fn watching_fills(&self) -> bool {
        !self.created.is_empty()
    }

    /// The state of `xid`, made on first use if the caps allow (`None` otherwise).
    fn state(&mut self, xid: u32) -> Option<&mut Box<XidState>> {
        if self.states.get_mut(xid).is_none() {
            if self.states.len() >= MAX_TRACKED_XIDS {
                refuse(&mut self.refused, xid);
                return None;
            }
            let state = self.spare.pop().unwrap_or_default();
            self.states.insert(xid, state);
        }
        self.states.get_mut(xid)
    }

    /// Room for one more entry for `xid`; marks the state incomplete when there is none.
    fn room(&mut self, xid: u32) -> Option<&mut Box<XidState>> {
        let full = self.entries >= MAX_ENTRIES;
        let state = self.state(xid)?;
        if full || state.entries() >= MAX_ENTRIES_PER_XID {
            state.incomplete = true;
            return None;
        }
        self.entries += 1;
        self.states.get_mut(xid)
    }

    /// `XLOG_SMGR_CREATE` of a main fork by `xid`.
    pub fn on_create(&mut self, xid: u32, rel: RelFile) {
        if xid == 0 {
            return;
        }
        if let Some(state) = self.room(xid) {
            state.created.push(rel);
            self.created.insert(
                rel,
                Created {
                    xid,
                    filled: false,
                    loaded: false,
                },
            );
        }
    }

    /// `XLOG_SMGR_TRUNCATE` of a main fork by `xid` (VACUUM's, without an xid, is not a
    /// transaction's doing).
    pub fn on_truncate(&mut self, xid: u32, rel: RelFile) {
        if xid == 0 {
            return;
        }
        if let Some(state) = self.room(xid) {
            state.truncated.push(rel);
        }
    }

    /// `XLOG_DBASE_DROP` by `xid`.
    /// A database dropped by `xid`; its files go at `before` or later (see
    /// [`TxnChanges::drop_database_lsn`]).
    pub fn on_drop_database(&mut self, xid: u32, db: u32, before: Lsn) {
        if xid == 0 {
            return;
        }
        if let Some(state) = self.room(xid) {
            state.dropped_databases.push(db);
            state.drop_database_lsn =
                Some(state.drop_database_lsn.map_or(before, |l| l.min(before)));
        }
    }

    /// A heap row change or a page written, by `xid`, in block 0's relation file.
    pub fn on_block(&mut self, xid: u32, change: BlockChange) {
        match change.kind {
            BlockKind::Fill => {
                if let Some(created) = self.created.get_mut(&change.rel) {
                    created.filled = true;
                }
            }
            BlockKind::Insert => {
                if let Some(created) = self.created.get_mut(&change.rel) {
                    created.filled = true;
                    created.loaded = true;
                }
            }
            BlockKind::Delete | BlockKind::Update => self.count_row(xid, change),
            // The decoder keeps these itself.
            BlockKind::Inplace => {}
        }
    }

    fn count_row(&mut self, xid: u32, change: BlockChange) {
        if xid == 0 {
            return;
        }
        let full = self.entries >= MAX_ENTRIES;
        let Some(state) = self.state(xid) else {
            return;
        };
        let found = state.find_row(change.rel);
        let index = match found {
            Some(index) => index,
            None if full || state.entries() >= MAX_ENTRIES_PER_XID => {
                state.incomplete = true;
                return;
            }
            None => state.add_row(change.rel),
        };
        let added = found.is_none();
        let row = &mut state.rows[index];
        match change.kind {
            BlockKind::Delete => row.deleted += 1,
            _ => row.updated += 1,
        }
        if added {
            self.entries += 1;
        }
    }

    /// Removes `xid`'s state.
    fn take(&mut self, xid: u32) -> Option<Box<XidState>> {
        let state = self.states.remove(xid)?;
        self.entries -= state.entries();
        Some(state)
    }

    /// Drops the files `xid` created from the index of created files, adding those that were
    /// filled to `filled`.
    fn unindex(&mut self, xid: u32, created: &[RelFile], mut report: Option<&mut TxnChanges>) {
        for rel in created {
            if self.created.get(rel).is_some_and(|c| c.xid == xid) {
                let Some(c) = self.created.remove(rel) else {
                    continue;
                };
                if let Some(report) = report.as_deref_mut() {
                    if c.filled {
                        report.filled.push(*rel);
                    }
                    if c.loaded {
                        report.loaded.push(*rel);
                    }
                }
            }
        }
    }

    /// Forgets `xid` altogether.
    fn discard(&mut self, xid: u32) {
        if let Some(state) = self.take(xid) {
            self.unindex(xid, &state.created, None);
            self.recycle(state);
        }
    }

    fn recycle(&mut self, mut state: Box<XidState>) {
        if self.spare.len() < SPARE_STATES {
            state.clear();
            self.spare.push(state);
        }
    }

    fn was_refused(&self, xid: u32) -> bool {
        self.refused.as_ref().is_some_and(|r| r.contains(xid))
    }

    /// A commit of `xid` (with the subtransactions it lists): what the transaction did, if
    /// anything worth reporting.
    pub fn commit(&mut self, xid: u32, parts: &XactParts<'_>) -> Option<Box<TxnChanges>> {
        if self.commit_below_threshold(xid, parts) {
            return None;
        }
        let mut report: Option<Box<TxnChanges>> = None;
        let mut incomplete = false;
        if !self.states.is_empty() || self.refused.is_some() {
            for id in std::iter::once(xid).chain(parts.subxacts()) {
                incomplete |= self.was_refused(id);
                let Some(mut state) = self.take(id) else {
                    continue;
                };
                let changes = report.get_or_insert_with(Box::default);
                self.unindex(id, &state.created, Some(changes));
                incomplete |= state.incomplete;
                merge(changes, &mut state);
                self.recycle(state);
            }
        }
        if report.is_none() && !incomplete && !parts.catalog_changed && !parts.removes_files() {
            return None;
        }
        let mut changes = report.unwrap_or_default();
        changes.db = parts.db;
        if parts.removes_files() {
            // The list is as long as the record says (up to 89 million files in a 1 GiB
            // record), and each file becomes an event downstream: keep what fits.
            let mut rels = parts.rels();
            changes.dropped = rels.by_ref().take(MAX_ENTRIES).collect();
            incomplete |= rels.next().is_some();
        }
        changes.catalog_changed = parts.catalog_changed;
        changes.incomplete = incomplete;
        normalize(&mut changes);
        if self.min_rows > 1 {
            let rows = std::mem::take(&mut changes.rows);
            changes.rows = rows.into_iter().filter(|r| !self.small(r)).collect();
        }
        let nothing = changes.dropped.is_empty()
            && changes.created.is_empty()
            && changes.truncated.is_empty()
            && changes.dropped_databases.is_empty()
            && changes.rows.is_empty()
            && !changes.catalog_changed
            && !changes.incomplete;
        (!nothing).then_some(changes)
    }

    /// An abort of `xid` (a transaction or a subtransaction) and of the subtransactions it
    /// lists: nothing of theirs happened.
    pub fn abort(&mut self, xid: u32, parts: &XactParts<'_>) {
        if self.states.is_empty() {
            return;
        }
        for id in std::iter::once(xid).chain(parts.subxacts()) {
            self.discard(id);
        }
    }

    /// `XLOG_RUNNING_XACTS`: xids before `oldest` have ended, so any state of theirs left
    /// (their end was before our start, or was never logged, as after a crash) goes.
    pub fn oldest_running(&mut self, oldest: u32) {
        if self
            .refused
            .as_ref()
            .is_some_and(|r| xid_precedes(r.latest, oldest))
        {
            self.refused = None;
        }
        let ended: Vec<u32> = self
            .states
            .xids()
            .filter(|&xid| xid_precedes(xid, oldest))
            .collect();
        for xid in ended {
            self.discard(xid);
        }
    }

    /// Transactions currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.states.len()
    }
}

/// Remembers an xid that got no state for want of room.
fn refuse(refused: &mut Option<Refused>, xid: u32) {
    let refused = refused.get_or_insert_with(|| Refused {
        bits: Box::new([0; REFUSED_BITS / 64]),
        latest: xid,
    });
    let (word, mask) = Refused::bit(xid);
    refused.bits[word] |= mask;
    if xid_precedes(refused.latest, xid) {
        refused.latest = xid;
    }
}

/// Adds what a state recorded to a report; the first state's vectors move over whole.
fn merge(changes: &mut TxnChanges, state: &mut XidState) {
    if let Some(lsn) = state.drop_database_lsn {
        changes.drop_database_lsn = Some(changes.drop_database_lsn.map_or(lsn, |l| l.min(lsn)));
    }
    append(&mut changes.created, &mut state.created);
    append(&mut changes.truncated, &mut state.truncated);
    append(&mut changes.dropped_databases, &mut state.dropped_databases);
    // Rows of the same file from several subtransactions are summed in `normalize`.
    append(&mut changes.rows, &mut state.rows);
}

fn append<T>(to: &mut Vec<T>, from: &mut Vec<T>) {
    if to.is_empty() {
        std::mem::swap(to, from);
    } else {
        to.append(from);
    }
}

/// Sorted and without duplicates, so equal transactions give equal reports.
fn normalize(changes: &mut TxnChanges) {
    sort_dedup(&mut changes.dropped);
    sort_dedup(&mut changes.created);
    sort_dedup(&mut changes.filled);
    sort_dedup(&mut changes.loaded);
    sort_dedup(&mut changes.truncated);
    sort_dedup(&mut changes.dropped_databases);
    if changes.rows.len() > 1 {
        changes.rows.sort_unstable_by_key(|r| r.rel);
        changes.rows.dedup_by(|next, kept| {
            let same = next.rel == kept.rel;
            if same {
                kept.deleted += next.deleted;
                kept.updated += next.updated;
            }
            same
        });
    }
}

fn sort_dedup<T: Ord>(items: &mut Vec<T>) {
    if items.len() > 1 {
        items.sort_unstable();
        items.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: u32) -> RelFile {
        RelFile {
            spc: 1663,
            db: 5,
            rel: n,
        }
    }

    fn delete(n: u32) -> BlockChange {
        BlockChange {
            kind: BlockKind::Delete,
            rel: file(n),
        }
    }

    fn commit(tracker: &mut ChangeTracker, xid: u32) -> Option<Box<TxnChanges>> {
        tracker.commit(xid, &XactParts::default())
    }

    #[test]
    fn xid_comparison_wraps_around() {
        assert!(xid_precedes(100, 101));
        assert!(!xid_precedes(101, 100));
        assert!(!xid_precedes(100, 100));
        assert!(xid_precedes(0xFFFF_FFF0, 5));
        assert!(!xid_precedes(5, 0xFFFF_FFF0));
        // Special xids (0 to 2) compare plainly.
        assert!(xid_precedes(2, 0xFFFF_FFF0));
    }

    #[test]
    fn many_relations_in_one_transaction() {
        let mut tracker = ChangeTracker::default();
        for round in 0..3 {
            for n in (0..1000).rev() {
                tracker.on_block(7, delete(n));
                if round == 0 && n % 2 == 0 {
                    tracker.on_block(7, delete(n));
                }
            }
        }
        let changes = commit(&mut tracker, 7).expect("changes");
        assert_eq!(changes.rows.len(), 1000);
        assert!(changes.rows.windows(2).all(|w| w[0].rel < w[1].rel));
        assert!(changes
            .rows
            .iter()
            .all(|r| r.deleted == 3 + u64::from(r.rel.rel % 2 == 0)));
        assert_eq!(tracker.entries, 0);
        assert_eq!(tracker.tracked(), 0);
    }

    fn update(n: u32) -> BlockChange {
        BlockChange {
            kind: BlockKind::Update,
            rel: file(n),
        }
    }

    #[test]
    fn rows_below_the_threshold_are_left_out_and_a_commit_of_only_those_reports_nothing() {
        let mut tracker = ChangeTracker::default();
        tracker.set_min_rows(100);
        // A pgbench-like transaction: a few updates.
        for n in 1..=3 {
            tracker.on_block(7, update(n));
        }
        assert_eq!(commit(&mut tracker, 7), None);
        assert_eq!((tracker.entries, tracker.tracked()), (0, 0));
        // Enough deletes in one file: that file is reported, the small one is not.
        for _ in 0..100 {
            tracker.on_block(8, delete(1));
        }
        tracker.on_block(8, update(2));
        let changes = commit(&mut tracker, 8).expect("changes");
        assert_eq!(changes.rows.len(), 1);
        assert_eq!(
            (changes.rows[0].rel, changes.rows[0].deleted),
            (file(1), 100)
        );
        // Summed over subtransactions before the threshold applies: 3 x 40 rows.
        for xid in [10, 11, 12] {
            for _ in 0..40 {
                tracker.on_block(xid, delete(5));
            }
        }
        let mut subxacts = Vec::new();
        for xid in [11u32, 12] {
            subxacts.extend_from_slice(&xid.to_le_bytes());
        }
        let changes = tracker
            .commit(10, &XactParts::with_subxacts(&subxacts))
            .expect("changes");
        assert_eq!(changes.rows[0].deleted, 120);
        // A file created is reported whatever the rows.
        tracker.on_create(13, file(9));
        tracker.on_block(13, update(2));
        let changes = commit(&mut tracker, 13).expect("changes");
        assert_eq!(
            (changes.created.as_slice(), changes.rows.len()),
            (&[file(9)][..], 0)
        );
    }

    #[test]
    fn subtransactions_of_one_file_are_summed() {
        let mut tracker = ChangeTracker::default();
        for xid in [10, 11, 12] {
            for n in 0..20 {
                tracker.on_block(xid, delete(n));
            }
        }
        let mut subxacts = Vec::new();
        for xid in [11u32, 12] {
            subxacts.extend_from_slice(&xid.to_le_bytes());
        }
        let parts = XactParts::with_subxacts(&subxacts);
        let changes = tracker.commit(10, &parts).expect("changes");
        assert_eq!(changes.rows.len(), 20);
        assert!(changes.rows.iter().all(|r| r.deleted == 3));
    }

    #[test]
    fn per_xid_cap_makes_the_report_incomplete() {
        let mut tracker = ChangeTracker::default();
        for n in 0..MAX_ENTRIES_PER_XID as u32 + 10 {
            tracker.on_block(7, delete(n));
        }
        // Files already recorded still count.
        tracker.on_block(7, delete(0));
        tracker.on_create(7, file(1_000_000));
        let changes = commit(&mut tracker, 7).expect("changes");
        assert!(changes.incomplete);
        assert!(changes.created.is_empty());
        assert_eq!(changes.rows.len(), MAX_ENTRIES_PER_XID);
        assert_eq!(changes.rows[0].deleted, 2);
        assert_eq!(tracker.entries, 0);
    }

    #[test]
    fn total_cap_makes_the_report_incomplete() {
        let mut tracker = ChangeTracker::default();
        let per_xid = MAX_ENTRIES_PER_XID as u32;
        let xids = (MAX_ENTRIES / MAX_ENTRIES_PER_XID) as u32;
        for xid in 100..100 + xids {
            for n in 0..per_xid {
                tracker.on_block(xid, delete(n));
            }
        }
        assert_eq!(tracker.entries, MAX_ENTRIES);
        tracker.on_block(99, delete(1));
        let changes = commit(&mut tracker, 99).expect("changes");
        assert!(changes.incomplete && changes.rows.is_empty());
        // Room again once a transaction ended.
        let changes = commit(&mut tracker, 100).expect("changes");
        assert!(!changes.incomplete);
        tracker.on_block(98, delete(1));
        assert!(!commit(&mut tracker, 98).expect("changes").incomplete);
    }

    #[test]
    fn refused_xids_flag_their_commits_until_they_are_past() {
        let mut tracker = ChangeTracker::default();
        let first = 3u32;
        let late = first + MAX_TRACKED_XIDS as u32;
        for xid in first..late {
            tracker.on_block(xid, delete(1));
        }
        assert_eq!(tracker.tracked(), MAX_TRACKED_XIDS);
        tracker.on_block(late, delete(1));
        assert_eq!(tracker.tracked(), MAX_TRACKED_XIDS);
        let changes = commit(&mut tracker, late).expect("changes");
        assert!(changes.incomplete && changes.rows.is_empty());
        // (`first` shares its bit with `late`: refused xids are remembered by their low bits.)
        let changes = commit(&mut tracker, first + 1).expect("changes");
        assert!(!changes.incomplete);
        assert_eq!(changes.rows[0].deleted, 1);
        // Every xid up to `late` has ended: all forgotten, nothing flagged any more.
        tracker.oldest_running(late + 1);
        assert_eq!(tracker.tracked(), 0);
        assert_eq!(tracker.entries, 0);
        assert!(tracker.refused.is_none());
        assert_eq!(commit(&mut tracker, late), None);
    }

    #[test]
    fn fills_reach_the_creator_and_end_with_it() {
        let mut tracker = ChangeTracker::default();
        let fill = |n| BlockChange {
            kind: BlockKind::Fill,
            rel: file(n),
        };
        tracker.on_create(20, file(1));
        tracker.on_create(21, file(2));
        assert!(tracker.watching_fills());
        // The parent writes into the file its subtransaction created.
        tracker.on_block(20, fill(2));
        tracker.on_block(20, fill(3));
        tracker.abort(21, &XactParts::default());
        assert!(tracker.watching_fills());
        let changes = commit(&mut tracker, 20).expect("changes");
        assert_eq!(changes.created, vec![file(1)]);
        assert!(changes.filled.is_empty());
        assert!(!tracker.watching_fills());
    }
}
