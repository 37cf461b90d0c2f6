//! Recovery events: the committed transactions that destroyed data (a table
//! dropped or truncated, a database dropped, many rows deleted or updated
//! at once), decoded from WAL as it is received and stored with each
//! segment, so a user can find the moment to restore to and restore to just
//! before it.
//!
//! Classifying a commit's dropped files needs what the WAL alone cannot
//! say: which file was a table (and its name), and whether the table still
//! exists afterwards. When the commit is decoded the file is looked up in
//! the names last read from the server ([`crate::names`]); a dropped table
//! file whose transaction also created an empty file is a `TRUNCATE`, one
//! whose transaction only created filled files is a rewrite (`VACUUM FULL`,
//! `CLUSTER`), otherwise a drop. When events are listed the catalog's names
//! settle it for tables whose OID is known: still there under another file
//! means truncated (or rewritten), gone means dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pg_wal::decode::{RelFile, TxnChanges};
use pg_wal::{Lsn, TimelineId};
use serde::Serialize;
use strata_catalog::{RecoveryEventRow, RelationNameRow};
use strata_repo::{RecoveryEventInfo, RecoveryEventKind};

use crate::names::{RelName, RelationNames};
use crate::{Engine, EngineResult};

/// OIDs below this are assigned by initdb (`FirstNormalObjectId`): files
/// numbered below it that Strata has no name for belong to the system.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// Most events one commit yields. The decoder caps each list of a commit
/// at this many entries (`dropped` included), but their sum could pass it.
const MAX_COMMIT_EVENTS: usize = pg_wal::decode::MAX_ENTRIES;
/// Most file numbers the `filled` lists of one commit's events hold in all:
/// each dropped file of a rewrite carries the filled files of its database,
/// so a commit dropping and filling many files would multiply them.
const MAX_COMMIT_FILLED: usize = pg_wal::decode::MAX_ENTRIES;

/// The kinds of events listed, as the API and the CLI spell them.
pub const EVENT_KINDS: [&str; 6] = [
    "DropTable",
    "Truncate",
    "DropDatabase",
    "Delete",
    "Update",
    "RestorePoint",
];

/// How commits are turned into events while WAL is received.
#[derive(Debug, Clone)]
pub struct EventOptions {
    /// Names of the instance's relations (none: events carry numbers only,
    /// and get names when listed).
    pub names: Option<Arc<RelationNames>>,
    /// Rows one transaction must delete (or update) in one table to be an
    /// event.
    pub min_rows: u64,
}

/// The events of one commit, in a stable order; at most
/// [`MAX_COMMIT_EVENTS`] of them.
pub fn commit_events(
    changes: &TxnChanges,
    xid: u32,
    (lsn, end_lsn): (Lsn, Lsn),
    time: DateTime<Utc>,
    opts: &EventOptions,
) -> Vec<RecoveryEventInfo> {
    let names = opts.names.as_deref();
    let event = |kind, db_oid: u32| RecoveryEventInfo {
        kind,
        xid,
        lsn,
        end_lsn,
        time,
        db_oid,
        relfilenode: None,
        rel_oid: None,
        database: names.and_then(|n| n.database(db_oid)),
        schema: None,
        table: None,
        rows: None,
        filled: Vec::new(),
        before_lsn: None,
    };
    // Some(name) for a user table, Some(None) for a file Strata has no name
    // for that may be one, None for everything else.
    let table_file = |f: &RelFile| match names.and_then(|n| n.relation(f.db, f.rel)) {
        Some(name) if name.is_user_table() => Some(Some(name)),
        Some(_) => None,
        None if f.db != 0 && f.rel >= FIRST_NORMAL_OBJECT_ID => Some(None),
        None => None,
    };
    let on_table = |kind, f: &RelFile| {
        let name = table_file(f)?;
        let mut e = event(kind, f.db);
        e.relfilenode = Some(f.rel);
        if let Some(name) = name {
            e.rel_oid = Some(name.rel_oid);
            e.schema = Some(name.schema);
            e.table = Some(name.name);
        }
        Some(e)
    };

    let mut out = Vec::new();
    for &db in changes.dropped_databases.iter().take(MAX_COMMIT_EVENTS) {
        let mut e = event(RecoveryEventKind::DropDatabase, db);
        e.before_lsn = changes.drop_database_lsn;
        out.push(e);
    }
    let filled: HashSet<&RelFile> = changes.filled.iter().collect();
    // Files written only as page images, by database: a rewrite's. A file
    // rows were inserted into is a table emptied and loaded again (or
    // rewritten row by row): its old rows are gone.
    let loaded_files: HashSet<&RelFile> = changes.loaded.iter().collect();
    let mut rewritten: HashMap<u32, Vec<u32>> = HashMap::new();
    for f in changes.filled.iter().filter(|f| !loaded_files.contains(f)) {
        rewritten.entry(f.db).or_default().push(f.rel);
    }
    let mut filled_left = MAX_COMMIT_FILLED;
    let loaded = !changes.loaded.is_empty();
    let created_empty = loaded || changes.created.iter().any(|f| !filled.contains(f));
    let dropped_kind = if created_empty {
        RecoveryEventKind::Truncate
    } else if !changes.created.is_empty() {
        RecoveryEventKind::Rewrite
    } else {
        RecoveryEventKind::DropTable
    };
    for f in &changes.dropped {
        if out.len() >= MAX_COMMIT_EVENTS {
            return out;
        }
        out.extend(on_table(dropped_kind, f).map(|mut e| {
            if dropped_kind != RecoveryEventKind::DropTable {
                let files = rewritten.get(&f.db).map_or(&[][..], Vec::as_slice);
                // Past the budget the event goes without: a rewritten
                // table is then listed as truncated rather than hidden.
                if files.len() <= filled_left {
                    filled_left -= files.len();
                    e.filled = files.to_vec();
                }
            }
            e
        }));
    }
    for f in &changes.truncated {
        if out.len() >= MAX_COMMIT_EVENTS {
            return out;
        }
        out.extend(on_table(RecoveryEventKind::Truncate, f));
    }
    for r in &changes.rows {
        for (kind, rows) in [
            (RecoveryEventKind::Delete, r.deleted),
            (RecoveryEventKind::Update, r.updated),
        ] {
            if out.len() >= MAX_COMMIT_EVENTS {
                return out;
            }
            if rows >= opts.min_rows.max(1) {
                if let Some(mut e) = on_table(kind, &r.rel) {
                    e.rows = Some(rows);
                    out.push(e);
                }
            }
        }
    }
    out
}

/// A recovery event as listed: names settled, and the restore targets
/// just before and just after it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecoveryEvent {
    /// `DropTable`, `Truncate`, `DropDatabase`, `Delete`, `Update` or
    /// `RestorePoint`.
    pub kind: String,
    /// Timeline of the commit (or restore point) record.
    pub timeline: TimelineId,
    /// Transaction id (none for a restore point).
    pub xid: Option<u32>,
    /// Commit (or restore point) time.
    pub time: DateTime<Utc>,
    /// Start of the record.
    pub lsn: Lsn,
    /// End of the record.
    pub end_lsn: Lsn,
    /// Database name, or its OID as text when no name is known.
    pub database: Option<String>,
    /// Database OID.
    pub db_oid: Option<u32>,
    /// Schema name.
    pub schema: Option<String>,
    /// Table name.
    pub table: Option<String>,
    /// The table's storage file number.
    pub relfilenode: Option<u32>,
    /// Rows deleted or updated.
    pub rows: Option<u64>,
    /// Restore point name.
    pub name: Option<String>,
    /// Where recovery must stop to find the data as it was just before the
    /// event when that is not just before its commit: a dropped database
    /// is marked invalid and its files removed earlier in its transaction.
    pub before_lsn: Option<Lsn>,
}

impl RecoveryEvent {
    /// `schema.table`, or the file number when no name is known.
    pub fn table_label(&self) -> Option<String> {
        match (&self.schema, &self.table, self.relfilenode) {
            (Some(s), Some(t), _) => Some(format!("{s}.{t}")),
            (_, _, Some(f)) => Some(format!("relfilenode {f}")),
            _ => None,
        }
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Committed at or after.
    pub since: Option<DateTime<Utc>>,
    /// Committed at or before.
    pub until: Option<DateTime<Utc>>,
    /// Kinds to keep (empty: all).
    pub kinds: Vec<String>,
    /// Database name to keep.
    pub database: Option<String>,
    /// Table name (`name` or `schema.name`) to keep.
    pub table: Option<String>,
}

impl EventFilter {
    fn keeps(&self, e: &RecoveryEvent) -> bool {
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k.eq_ignore_ascii_case(&e.kind)) {
            return false;
        }
        if let Some(db) = &self.database {
            if e.database.as_deref() != Some(db.as_str()) {
                return false;
            }
        }
        if let Some(t) = &self.table {
            let qualified = match (&e.schema, &e.table) {
                (Some(s), Some(n)) => (t == n) || *t == format!("{s}.{n}"),
                _ => false,
            };
            if !qualified {
                return false;
            }
        }
        true
    }
}

impl Engine {
    /// Recovery events of an instance (restore points included), oldest
    /// first.
    pub fn recovery_events(
        &self,
        instance_id: &str,
        filter: &EventFilter,
    ) -> EngineResult<Vec<RecoveryEvent>> {
        let rows = self
            .catalog
            .list_recovery_events(instance_id, filter.since, filter.until)?;
        let (relations, databases) = self.catalog.list_names(instance_id)?;
        let settle = Settle::new(&relations, &databases);
        let mut events: Vec<RecoveryEvent> = rows
            .into_iter()
            .filter_map(|row| settle.event(row))
            .collect();
        for rp in self.catalog.list_restore_points(instance_id)? {
            if filter.since.is_some_and(|s| rp.time < s)
                || filter.until.is_some_and(|u| rp.time > u)
            {
                continue;
            }
            events.push(RecoveryEvent {
                kind: "RestorePoint".into(),
                timeline: rp.timeline,
                xid: None,
                time: rp.time,
                // The catalog keeps where recovery to the point stops.
                lsn: rp.lsn,
                end_lsn: rp.lsn,
                database: None,
                db_oid: None,
                schema: None,
                table: None,
                relfilenode: None,
                rows: None,
                name: Some(rp.name),
                before_lsn: None,
            });
        }
        events.retain(|e| filter.keeps(e));
        events.sort_by_key(|e| (e.timeline, e.lsn));
        Ok(events)
    }
}

/// Names and kinds settled from the catalog's names.
struct Settle<'a> {
    by_file: HashMap<(u32, u32), &'a RelationNameRow>,
    /// Every file seen for a relation OID.
    files_of: HashMap<(u32, u32), Vec<&'a RelationNameRow>>,
    databases: HashMap<u32, &'a str>,
}

impl<'a> Settle<'a> {
    fn new(
        relations: &'a [RelationNameRow],
        databases: &'a [strata_catalog::DatabaseNameRow],
    ) -> Self {
        let mut files_of: HashMap<(u32, u32), Vec<&RelationNameRow>> = HashMap::new();
        for r in relations {
            files_of.entry((r.db_oid, r.rel_oid)).or_default().push(r);
        }
        Settle {
            by_file: relations
                .iter()
                .map(|r| ((r.db_oid, r.relfilenode), r))
                .collect(),
            files_of,
            databases: databases
                .iter()
                .map(|d| (d.db_oid, d.name.as_str()))
                .collect(),
        }
    }

    /// The event as listed, or None for a rewrite that lost nothing.
    fn event(&self, row: RecoveryEventRow) -> Option<RecoveryEvent> {
        let mut kind = RecoveryEventKind::parse(&row.kind)?;
        let (mut schema, mut table, mut rel_oid) = (row.schema, row.table, row.rel_oid);
        if let (None, Some(file)) = (&table, row.relfilenode) {
            if let Some(r) = self.by_file.get(&(row.db_oid, file)) {
                // Decoded without names, the file turns out to be an
                // index, a TOAST table or a system catalog: not an event.
                let name = RelName {
                    rel_oid: r.rel_oid,
                    schema: r.schema.clone(),
                    name: r.name.clone(),
                    kind: r.kind.clone(),
                };
                if !name.is_user_table() {
                    return None;
                }
                (schema, table, rel_oid) = (Some(name.schema), Some(name.name), Some(r.rel_oid));
            }
        }
        if matches!(
            kind,
            RecoveryEventKind::DropTable | RecoveryEventKind::Truncate | RecoveryEventKind::Rewrite
        ) {
            if let (Some(oid), Some(file)) = (rel_oid, row.relfilenode) {
                // The relation's next file (file numbers come from the OID
                // counter, which only grows): the relation outlived the
                // commit in it, rewritten when the commit's transaction
                // filled it, truncated when not.
                let next = self.files_of.get(&(row.db_oid, oid)).and_then(|files| {
                    files
                        .iter()
                        .map(|f| f.relfilenode)
                        .filter(|&f| f > file)
                        .min()
                });
                kind = match next {
                    Some(next) if row.filled.contains(&next) => return None,
                    Some(_) => RecoveryEventKind::Truncate,
                    None => RecoveryEventKind::DropTable,
                };
            } else if kind == RecoveryEventKind::Rewrite {
                return None;
            }
        }
        let database = row
            .database
            .or_else(|| self.databases.get(&row.db_oid).map(|s| s.to_string()));
        Some(RecoveryEvent {
            kind: kind.as_str().into(),
            timeline: row.timeline,
            xid: Some(row.xid),
            time: row.time,
            lsn: row.lsn,
            end_lsn: row.end_lsn,
            database,
            db_oid: Some(row.db_oid),
            schema,
            table,
            relfilenode: row.relfilenode,
            rows: row.rows,
            name: None,
            before_lsn: row.before_lsn,
        })
    }
}

/// The catalog rows of a segment's events.
pub(crate) fn event_rows<'a>(
    instance_id: &'a str,
    timeline: TimelineId,
    events: &'a [RecoveryEventInfo],
) -> impl Iterator<Item = RecoveryEventRow> + 'a {
    // Events of one commit are adjacent and share its LSN.
    let mut seq = 0u32;
    let mut last = None;
    events.iter().map(move |e| {
        seq = if last == Some(e.lsn) { seq + 1 } else { 0 };
        last = Some(e.lsn);
        RecoveryEventRow {
            instance_id: instance_id.into(),
            timeline,
            lsn: e.lsn,
            seq,
            end_lsn: e.end_lsn,
            kind: e.kind.as_str().into(),
            xid: e.xid,
            time: e.time,
            db_oid: e.db_oid,
            relfilenode: e.relfilenode,
            rel_oid: e.rel_oid,
            database: e.database.clone(),
            schema: e.schema.clone(),
            table: e.table.clone(),
            rows: e.rows,
            filled: e.filled.clone(),
            before_lsn: e.before_lsn,
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone;
    use pg_wal::decode::RowChanges;
    use strata_catalog::DatabaseNameRow;

    use super::*;

    /// A file of database 5 in the default tablespace.
    pub(crate) fn file(rel: u32) -> RelFile {
        RelFile {
            spc: 1663,
            db: 5,
            rel,
        }
    }

    fn time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
    }

    /// Events without names, at `min_rows`.
    pub(crate) fn opts(min_rows: u64) -> EventOptions {
        EventOptions {
            names: None,
            min_rows,
        }
    }

    fn kinds(changes: &TxnChanges, min_rows: u64) -> Vec<(RecoveryEventKind, Option<u32>)> {
        commit_events(
            changes,
            700,
            (Lsn(0x100), Lsn(0x140)),
            time(),
            &opts(min_rows),
        )
        .into_iter()
        .map(|e| (e.kind, e.relfilenode))
        .collect()
    }

    #[test]
    fn a_commit_is_classified_by_the_files_it_dropped_created_and_filled() {
        let dropped = TxnChanges {
            dropped: vec![file(20000)],
            ..Default::default()
        };
        assert_eq!(
            kinds(&dropped, 1000),
            [(RecoveryEventKind::DropTable, Some(20000))]
        );
        let truncated = TxnChanges {
            dropped: vec![file(20000)],
            created: vec![file(20010), file(20011)],
            filled: vec![file(20011)],
            ..Default::default()
        };
        assert_eq!(
            kinds(&truncated, 1000),
            [(RecoveryEventKind::Truncate, Some(20000))]
        );
        let rewritten = TxnChanges {
            dropped: vec![file(20000)],
            created: vec![file(20010)],
            filled: vec![file(20010)],
            ..Default::default()
        };
        assert_eq!(
            kinds(&rewritten, 1000),
            [(RecoveryEventKind::Rewrite, Some(20000))]
        );
        // System files and shared catalogs are never events.
        let system = TxnChanges {
            dropped: vec![
                file(1259),
                RelFile {
                    spc: 1664,
                    db: 0,
                    rel: 30000,
                },
            ],
            ..Default::default()
        };
        assert!(kinds(&system, 1000).is_empty());
    }

    #[test]
    fn rows_count_from_the_threshold_and_databases_always() {
        let changes = TxnChanges {
            rows: vec![
                RowChanges {
                    rel: file(20000),
                    deleted: 999,
                    updated: 1000,
                },
                RowChanges {
                    rel: file(20001),
                    deleted: 5000,
                    updated: 0,
                },
            ],
            dropped_databases: vec![16500],
            ..Default::default()
        };
        assert_eq!(
            kinds(&changes, 1000),
            [
                (RecoveryEventKind::DropDatabase, None),
                (RecoveryEventKind::Update, Some(20000)),
                (RecoveryEventKind::Delete, Some(20001)),
            ]
        );
        assert_eq!(kinds(&changes, 1).len(), 4);
    }

    /// A commit's lists are each capped by the decoder, but not their sum,
    /// nor the copies of the filled files each rewrite event carries.
    #[test]
    fn one_commit_yields_a_bounded_number_of_events_and_filled_files() {
        let many = |from: u32, n: usize| (from..from + n as u32).map(file).collect::<Vec<_>>();
        let changes = TxnChanges {
            dropped: many(20000, MAX_COMMIT_EVENTS),
            truncated: many(200_000, 10),
            rows: many(300_000, 10)
                .into_iter()
                .map(|rel| RowChanges {
                    rel,
                    deleted: 5,
                    updated: 5,
                })
                .collect(),
            dropped_databases: vec![16500],
            ..Default::default()
        };
        let events = kinds(&changes, 1);
        assert_eq!(events.len(), MAX_COMMIT_EVENTS);
        assert_eq!(events[0], (RecoveryEventKind::DropDatabase, None));
        assert_eq!(events[1], (RecoveryEventKind::DropTable, Some(20000)));

        // A rewrite of 1000 files: each dropped file's event would carry
        // all 1000 new ones.
        let files = many(400_000, 1000);
        let rewrite = TxnChanges {
            dropped: many(20000, 1000),
            created: files.clone(),
            filled: files,
            ..Default::default()
        };
        let events = commit_events(&rewrite, 700, (Lsn(0x100), Lsn(0x140)), time(), &opts(1));
        assert_eq!(events.len(), 1000);
        assert!(events.iter().all(|e| e.kind == RecoveryEventKind::Rewrite));
        let carried: usize = events.iter().map(|e| e.filled.len()).sum();
        assert_eq!(carried, MAX_COMMIT_FILLED / 1000 * 1000);
        assert_eq!(events[0].filled, (400_000..401_000).collect::<Vec<_>>());
        assert!(events[MAX_COMMIT_FILLED / 1000].filled.is_empty());
    }

    fn row(kind: RecoveryEventKind, relfilenode: u32, rel_oid: Option<u32>) -> RecoveryEventRow {
        RecoveryEventRow {
            instance_id: "i".into(),
            timeline: TimelineId(1),
            lsn: Lsn(0x100),
            seq: 0,
            end_lsn: Lsn(0x140),
            kind: kind.as_str().into(),
            xid: 700,
            time: time(),
            db_oid: 5,
            relfilenode: Some(relfilenode),
            rel_oid,
            database: None,
            schema: None,
            table: None,
            rows: None,
            filled: Vec::new(),
            before_lsn: None,
        }
    }

    fn name(relfilenode: u32, rel_oid: u32, name: &str) -> RelationNameRow {
        RelationNameRow {
            instance_id: "i".into(),
            db_oid: 5,
            relfilenode,
            rel_oid,
            schema: "public".into(),
            name: name.into(),
            kind: "r".into(),
            seen_at: time(),
        }
    }

    #[test]
    fn listing_settles_drops_truncates_and_rewrites_by_what_outlived_the_commit() {
        let names = [
            name(20000, 16400, "t"),
            name(20050, 16400, "t"),
            name(20001, 16401, "gone"),
        ];
        let dbs = [DatabaseNameRow {
            instance_id: "i".into(),
            db_oid: 5,
            name: "shop".into(),
            seen_at: time(),
        }];
        let settle = Settle::new(&names, &dbs);
        let kind = |r| settle.event(r).map(|e| e.kind);
        // 16400 has a newer file: it outlived the commit.
        assert_eq!(
            kind(row(RecoveryEventKind::DropTable, 20000, Some(16400))).as_deref(),
            Some("Truncate")
        );
        // ... and its transaction filled that new file: a rewrite.
        let mut rewrite = row(RecoveryEventKind::Rewrite, 20000, Some(16400));
        rewrite.filled = vec![20049, 20050];
        assert_eq!(kind(rewrite.clone()), None);
        rewrite.kind = "Truncate".into();
        assert_eq!(kind(rewrite), None);
        // 16401 did not: a rewrite whose table is gone was a drop (a swap).
        assert_eq!(
            kind(row(RecoveryEventKind::Rewrite, 20001, Some(16401))).as_deref(),
            Some("DropTable")
        );
        assert_eq!(
            kind(row(RecoveryEventKind::Truncate, 20001, Some(16401))).as_deref(),
            Some("DropTable")
        );
        // Unknown when decoded, named when listed.
        let e = settle
            .event(row(RecoveryEventKind::Delete, 20001, None))
            .unwrap();
        assert_eq!(
            (e.table.as_deref(), e.database.as_deref()),
            (Some("gone"), Some("shop"))
        );
        // Named only when listed, as an index: not an event.
        let mut index = name(20002, 16402, "t_pkey");
        index.kind = "i".into();
        let names2 = [index];
        let settle2 = Settle::new(&names2, &dbs);
        assert!(settle2
            .event(row(RecoveryEventKind::DropTable, 20002, None))
            .is_none());
        // Never named: the number stays.
        let e = settle
            .event(row(RecoveryEventKind::DropTable, 29999, None))
            .unwrap();
        assert_eq!(e.table_label().as_deref(), Some("relfilenode 29999"));
    }

    #[test]
    fn the_effects_of_one_commit_are_numbered_in_order() {
        let mut events = commit_events(
            &TxnChanges {
                dropped: vec![file(20000), file(20001)],
                ..Default::default()
            },
            700,
            (Lsn(0x100), Lsn(0x140)),
            time(),
            &opts(1000),
        );
        events.extend(commit_events(
            &TxnChanges {
                dropped: vec![file(20002)],
                ..Default::default()
            },
            701,
            (Lsn(0x200), Lsn(0x240)),
            time(),
            &opts(1000),
        ));
        let keys: Vec<(Lsn, u32)> = event_rows("i", TimelineId(1), &events)
            .map(|r| (r.lsn, r.seq))
            .collect();
        assert_eq!(keys, [(Lsn(0x100), 0), (Lsn(0x100), 1), (Lsn(0x200), 0)]);
    }
}
