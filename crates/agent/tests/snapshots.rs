//! Snapshots of a running PostgreSQL 15 cluster on real loop-mounted XFS (reflink=1) and btrfs,
//! driven through the agent's signed HTTP API: contents, exclusions, shared extents, changed
//! ranges after a 1 % change, labels and clones; ext4 and a low free-space floor refused.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{default_layout, fake_data_dir, pseudo_random, start_agent};
use strata_agent::cow;
use strata_agent::proto::{EntryKind, ErrorCode};
use strata_agent::{
    Agent, AgentError, AgentKey, CloneName, FreeFloor, Labels, RelPath, SnapshotName, StartError,
};
use testkit::{Cluster, FsKind, LoopFs};

const PG: u32 = 15;
/// Pages of the test table (8 KiB each); 1 % of them is changed between snapshots.
const TABLE_PAGES: u64 = 1000;

fn name(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

/// Every regular file under `root`, by relative path.
fn files_under(root: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                out.insert(
                    p.strip_prefix(root).unwrap().to_string_lossy().to_string(),
                    p,
                );
            }
        }
    }
    out
}

fn started_cluster(fs: &LoopFs) -> Cluster {
    // No autovacuum and no timed checkpoints: between the test's own steps nothing else
    // writes relation files, so byte comparisons with the live directory are exact.
    Cluster::builder(PG)
        .in_dir(fs.path())
        .conf("autovacuum = off")
        .conf("checkpoint_timeout = 1h")
        .start()
}

/// The snapshot round on one file system: see the module documentation.
async fn snapshot_round(kind: FsKind, size_mib: u64) {
    let Some(fs) = LoopFs::or_skip(kind, size_mib, true) else {
        return;
    };
    let cluster = started_cluster(&fs);
    let data = cluster.data_dir().to_path_buf();
    cluster.psql(
        "postgres",
        &format!(
            "CREATE TABLE t (id int, v int, pad text) WITH (fillfactor = 50);
             INSERT INTO t SELECT g, 0, repeat('x', 100) FROM generate_series(1, {}) g;
             CREATE UNLOGGED TABLE u (id int); INSERT INTO u SELECT generate_series(1, 1000);
             VACUUM (FREEZE) t; CHECKPOINT;",
            TABLE_PAGES * 36
        ),
    );
    // A tablespace on the same file system, with a table in it.
    let ts_dir = fs.path().join("tablespace");
    std::fs::create_dir(&ts_dir).unwrap();
    let ok = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&ts_dir)
        .status()
        .unwrap();
    assert!(ok.success());
    cluster.psql(
        "postgres",
        &format!("CREATE TABLESPACE ts LOCATION '{}'", ts_dir.display()),
    );
    cluster.psql(
        "postgres",
        "CREATE TABLE in_ts (id int) TABLESPACE ts; INSERT INTO in_ts SELECT generate_series(1, 5000); CHECKPOINT;",
    );
    let ts_oid = cluster
        .psql(
            "postgres",
            "SELECT oid FROM pg_tablespace WHERE spcname = 'ts'",
        )
        .trim()
        .to_string();
    let pages: u64 = cluster
        .psql("postgres", "SELECT pg_relation_size('t') / 8192")
        .trim()
        .parse()
        .unwrap();
    assert!(pages >= TABLE_PAGES, "table has {pages} pages");
    let table_file = cluster
        .psql("postgres", "SELECT pg_relation_filepath('t')")
        .trim()
        .to_string();
    let unlogged_file = cluster
        .psql("postgres", "SELECT pg_relation_filepath('u')")
        .trim()
        .to_string();
    let system_id: u64 = cluster
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .trim()
        .parse()
        .unwrap();
    // Things a base backup leaves out, planted where the server would have them.
    std::fs::create_dir_all(data.join("base/pgsql_tmp")).unwrap();
    std::fs::write(data.join("base/pgsql_tmp/pgsql_tmp4242.0"), b"spill").unwrap();
    std::fs::create_dir_all(data.join("pg_replslot/old_slot")).unwrap();
    std::fs::write(data.join("pg_replslot/old_slot/state"), b"slot").unwrap();
    std::fs::write(data.join("backup_label"), b"START WAL LOCATION: stale\n").unwrap();
    std::fs::create_dir_all(data.join("pg_stat_tmp")).unwrap();
    std::fs::write(data.join("pg_stat_tmp/global.tmp"), b"stats").unwrap();
    std::os::unix::fs::symlink("/etc", data.join("escape_link")).unwrap();

    let agent = start_agent(default_layout(&data), FreeFloor::Percent(5)).await;
    let facts = agent.client.facts().await.unwrap();
    assert_eq!(
        facts.fs.fs_type,
        if kind == FsKind::Xfs { "xfs" } else { "btrfs" }
    );
    assert!(facts.fs.reflink);
    assert!(facts.fs.total_bytes > 0 && facts.fs.free_bytes <= facts.fs.total_bytes);
    assert_eq!(facts.pg_major, Some(PG));
    assert_eq!(facts.system_identifier, Some(system_id));

    let s1 = agent.client.create_snapshot(&name("s1")).await.unwrap();
    eprintln!(
        "{kind:?}: snapshot of {} files, {} bytes in {} ms",
        s1.manifest.file_count(),
        s1.manifest.total_bytes(),
        s1.elapsed_ms
    );
    let snap1 = agent.layout.snapshot_dir.join("s1");
    let in_manifest: BTreeMap<String, _> = s1
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| (e.path.to_string(), e))
        .collect();
    assert_eq!(
        in_manifest.keys().collect::<Vec<_>>(),
        files_under(&snap1).keys().collect::<Vec<_>>()
    );

    // Left out: what pg_basebackup leaves out.
    let skipped = |rel: &str| {
        let file = rel.rsplit('/').next().unwrap();
        ["postmaster.pid", "postmaster.opts", "backup_label"].contains(&rel)
            || [
                "pg_wal/",
                "pg_replslot/",
                "pg_stat_tmp/",
                "pg_subtrans/",
                "pg_notify/",
                "pg_serial/",
                "pg_snapshots/",
                "pg_dynshmem/",
            ]
            .iter()
            .any(|d| rel.starts_with(d))
            || file.starts_with("pg_internal.init")
            || rel.contains("pgsql_tmp")
            || rel == unlogged_file
            || rel.starts_with(&format!("{unlogged_file}_fsm"))
            || rel.starts_with(&format!("{unlogged_file}."))
    };
    for gone in [
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "base/pgsql_tmp/pgsql_tmp4242.0",
        "pg_replslot/old_slot/state",
        "pg_stat_tmp/global.tmp",
        "global/pg_internal.init",
        unlogged_file.as_str(),
    ] {
        assert!(
            !in_manifest.contains_key(gone),
            "{gone} must not be in the snapshot"
        );
    }
    assert!(data.join("postmaster.pid").exists() && data.join(&unlogged_file).exists());
    assert!(
        in_manifest.contains_key(&format!("{unlogged_file}_init")),
        "the unlogged table's init fork is kept"
    );
    assert!(
        !snap1.join("escape_link").exists(),
        "symlinks outside pg_tblspc are not followed"
    );
    assert!(snap1.join("pg_wal/archive_status").is_dir() && snap1.join("pg_replslot").is_dir());
    assert_eq!(
        std::fs::read_dir(snap1.join("pg_wal")).unwrap().count(),
        1,
        "pg_wal holds only archive_status"
    );

    // Kept: every other file of the data directory, same bytes, same mode, same owner.
    let source = files_under(&data);
    let mut compared = 0;
    for (rel, src) in &source {
        if skipped(rel) {
            continue;
        }
        let entry = in_manifest
            .get(rel)
            .unwrap_or_else(|| panic!("{rel} missing from the snapshot"));
        let copy = snap1.join(rel);
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(src).unwrap(),
            "{rel} differs"
        );
        let (sm, cm) = (
            std::fs::metadata(src).unwrap(),
            std::fs::metadata(&copy).unwrap(),
        );
        assert_eq!(
            cm.permissions().mode() & 0o7777,
            sm.permissions().mode() & 0o7777,
            "{rel} mode"
        );
        assert_eq!(entry.mode, sm.permissions().mode() & 0o7777);
        assert_eq!(entry.size, sm.len());
        assert_eq!((cm.uid(), cm.gid()), (sm.uid(), sm.gid()), "{rel} owner");
        // Shared extents: right after the snapshot nothing differs from the source.
        if sm.len() >= 64 * 1024 {
            let c = cow::changed_ranges(&copy, src).unwrap();
            assert!(
                c.exact && c.ranges.is_empty(),
                "{rel} shares no extents with its source: {c:?}"
            );
        }
        compared += 1;
    }
    assert!(compared > 500, "only {compared} files compared");
    // The tablespace is a directory pg_tblspc/<oid>/ in the snapshot, with the same files.
    let ts_files = files_under(&ts_dir);
    assert!(
        ts_files.keys().any(|k| k.starts_with("PG_15_")),
        "{ts_files:?}"
    );
    assert!(
        std::fs::symlink_metadata(snap1.join(format!("pg_tblspc/{ts_oid}")))
            .unwrap()
            .is_dir()
    );
    for (rel, src) in &ts_files {
        let in_snap = format!("pg_tblspc/{ts_oid}/{rel}");
        assert!(in_manifest.contains_key(&in_snap), "{in_snap} missing");
        assert_eq!(
            std::fs::read(snap1.join(&in_snap)).unwrap(),
            std::fs::read(src).unwrap(),
            "{in_snap}"
        );
    }
    assert!(in_manifest.contains_key(&table_file));

    // Change 1 % of the table's pages, one row each (HOT, the page stays where it is).
    let changed_pages: Vec<u64> = (0..TABLE_PAGES / 100).map(|i| i * 100 + 7).collect();
    let tids = changed_pages
        .iter()
        .map(|p| format!("'({p},1)'"))
        .collect::<Vec<_>>()
        .join(",");
    cluster.psql(
        "postgres",
        &format!("UPDATE t SET v = v + 1 WHERE ctid = ANY (ARRAY[{tids}]::tid[]); CHECKPOINT;"),
    );
    let s2 = agent.client.create_snapshot(&name("s2")).await.unwrap();
    assert!(s2.manifest.file_count() > 500);
    let changes = agent
        .client
        .changed_ranges(&name("s2"), &name("s1"))
        .await
        .unwrap();
    let table = changes
        .iter()
        .find(|c| c.path.as_str() == table_file)
        .expect("table in changes");
    let page = 8192u64;
    let changed = table.changes.changed_bytes();
    let file_size = table.changes.size;
    eprintln!(
        "{kind:?}: table file {file_size} bytes, {changed} changed after updating {} pages ({:.2} %)",
        changed_pages.len(),
        changed as f64 * 100.0 / file_size as f64
    );
    assert!(table.changes.exact);
    for p in &changed_pages {
        assert!(
            table
                .changes
                .ranges
                .iter()
                .any(|r| r.offset <= p * page && (p + 1) * page <= r.end()),
            "page {p} not reported as changed: {:?}",
            table.changes.ranges
        );
    }
    // Covers the 1 % and not much more: at most twice the changed pages.
    assert!(
        changed <= 2 * changed_pages.len() as u64 * page,
        "{changed} bytes reported changed"
    );
    let total: u64 = changes.iter().map(|c| c.changes.size).sum();
    let total_changed: u64 = changes.iter().map(|c| c.changes.changed_bytes()).sum();
    eprintln!("{kind:?}: whole snapshot {total} bytes, {total_changed} changed");
    assert!(
        total_changed < total / 10,
        "{total_changed} of {total} bytes changed in the whole snapshot"
    );

    // Labels, then a clone equal to the snapshot.
    let labels = Labels {
        backup_label: "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".into(),
        tablespace_map: None,
    };
    agent.client.put_labels(&name("s2"), &labels).await.unwrap();
    let again = agent
        .client
        .put_labels(&name("s2"), &labels)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::Refused), "{again}");
    let clone = agent
        .client
        .clone_snapshot(&name("s2"), &CloneName::new("c1").unwrap())
        .await
        .unwrap();
    let snap2 = agent.layout.snapshot_dir.join("s2");
    let clone_files = files_under(&clone.path);
    assert_eq!(
        clone_files.keys().collect::<Vec<_>>(),
        files_under(&snap2).keys().collect::<Vec<_>>()
    );
    for (rel, path) in &clone_files {
        assert_eq!(
            std::fs::read(path).unwrap(),
            std::fs::read(snap2.join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(clone.path.join("backup_label")).unwrap(),
        labels.backup_label
    );
    let root_meta = std::fs::metadata(&clone.path).unwrap();
    assert_eq!(root_meta.permissions().mode() & 0o777, 0o700);
    let data_meta = std::fs::metadata(&data).unwrap();
    assert_eq!(
        (root_meta.uid(), root_meta.gid()),
        (data_meta.uid(), data_meta.gid())
    );
    assert_eq!(clone.path.parent(), agent.layout.clone_dir.as_deref());

    // Reading a range through the API gives the snapshot's bytes.
    let rel = RelPath::new(&table_file).unwrap();
    let got = agent
        .client
        .read_range_to_vec(&name("s2"), &rel, 8192, 3 * 8192)
        .await
        .unwrap();
    assert_eq!(
        got,
        std::fs::read(snap2.join(&table_file)).unwrap()[8192..4 * 8192].to_vec()
    );

    // Space, listing, deletion.
    let space = agent.client.space(&name("s2")).await.unwrap();
    assert!(space.exclusive_bytes < space.logical_bytes / 2, "{space:?}");
    let listed: Vec<String> = agent
        .client
        .snapshots()
        .await
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(listed, ["s1", "s2"]);
    agent.client.delete_snapshot(&name("s1")).await.unwrap();
    assert!(!snap1.exists());
    let listed = agent.client.snapshots().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].labelled);
    agent
        .client
        .delete_clone(&CloneName::new("c1").unwrap())
        .await
        .unwrap();
    assert!(!clone.path.exists());
    drop(agent);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_running_cluster_on_xfs() {
    snapshot_round(FsKind::Xfs, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_running_cluster_on_btrfs() {
    snapshot_round(FsKind::Btrfs, 400).await;
}

/// Overwriting 1 % of a file's 4 KiB blocks: the changed ranges are exactly those blocks.
#[test]
fn changed_ranges_after_rewriting_one_percent_of_blocks() {
    use std::io::{Seek, SeekFrom, Write};
    for (kind, size) in [(FsKind::Xfs, 300), (FsKind::Btrfs, 200)] {
        let Some(fs) = LoopFs::or_skip(kind, size, false) else {
            continue;
        };
        let blocks = 4096u64;
        let original = fs.path().join("file");
        std::fs::write(&original, pseudo_random((blocks * 4096) as usize, 1)).unwrap();
        let first = fs.path().join("first");
        cow::reflink(&original, &first, 0o600).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&original)
            .unwrap();
        let rewritten: Vec<u64> = (0..blocks / 100).map(|i| i * 100 + 3).collect();
        for b in &rewritten {
            f.seek(SeekFrom::Start(b * 4096)).unwrap();
            f.write_all(&pseudo_random(4096, *b + 100)).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        let second = fs.path().join("second");
        cow::reflink(&original, &second, 0o600).unwrap();
        let c = cow::changed_ranges(&second, &first).unwrap();
        assert!(c.exact, "{kind:?}");
        let expected: Vec<cow::ByteRange> = rewritten
            .iter()
            .map(|b| cow::ByteRange {
                offset: b * 4096,
                len: 4096,
            })
            .collect();
        assert_eq!(c.ranges, expected, "{kind:?}");
        // And against itself / its source: nothing.
        assert!(
            cow::changed_ranges(&second, &original)
                .unwrap()
                .ranges
                .is_empty(),
            "{kind:?}"
        );
        // A file the previous snapshot did not have is wholly new.
        let c = cow::changed_ranges(&second, &fs.path().join("absent")).unwrap();
        assert_eq!(c.changed_bytes(), blocks * 4096);
    }
}

/// On tmpfs (no FIEMAP, no reflink) nothing is ever claimed unchanged.
#[test]
fn without_extent_maps_the_whole_file_counts_as_changed() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::write(&a, vec![1u8; 64 * 1024]).unwrap();
    std::fs::write(&b, vec![1u8; 64 * 1024]).unwrap();
    let c = cow::changed_ranges(&b, &a).unwrap();
    assert_eq!(c.changed_bytes(), 64 * 1024, "{c:?}");
    assert!(!cow::probe(dir.path()).unwrap().reflink);
}

#[test]
fn ext4_is_refused_with_one_clear_line() {
    let Some(fs) = LoopFs::or_skip(FsKind::Ext4, 64, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 4096);
    let err = Agent::start(
        default_layout(&data),
        AgentKey::generate(),
        FreeFloor::Percent(5),
    )
    .unwrap_err();
    assert!(matches!(err, StartError::NotCopyOnWrite { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "data directory {} is on ext4, which cannot clone files; snapshots need a file system with reflink (XFS made with -m reflink=1, or btrfs)",
            data.display()
        )
    );
}

#[test]
fn a_snapshot_dir_on_another_file_system_is_refused() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let Some(other) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 4096);
    let mut layout = default_layout(&data);
    layout.snapshot_dir = other.path().join("snaps");
    let err = Agent::start(layout, AgentKey::generate(), FreeFloor::Percent(5)).unwrap_err();
    assert!(matches!(err, StartError::OtherFileSystem { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_below_the_free_space_floor_is_refused() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 1 << 20);
    let agent = start_agent(default_layout(&data), FreeFloor::Percent(99)).await;
    let err = agent.client.create_snapshot(&name("s1")).await.unwrap_err();
    match &err {
        AgentError::Refused {
            code,
            status,
            message,
            ..
        } => {
            assert_eq!((*code, *status), (ErrorCode::LowSpace, 507));
            assert!(message.contains("under the floor of 99%"), "{message}");
            assert!(message.contains("bytes free"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(
        common::entries_but_state(&agent.layout.snapshot_dir),
        0,
        "nothing was written"
    );
    drop(agent);
    let bytes_floor = start_agent(default_layout(&data), FreeFloor::Bytes(1 << 20)).await;
    let s = bytes_floor
        .client
        .create_snapshot(&name("s1"))
        .await
        .unwrap();
    assert_eq!(s.manifest.file_count(), 3);
}

#[test]
fn leftovers_of_an_interrupted_snapshot_are_removed_at_start() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    let data = fake_data_dir(fs.path(), 4096);
    let layout = default_layout(&data);
    std::fs::create_dir_all(layout.snapshot_dir.join(".partial-s1/base")).unwrap();
    std::fs::write(layout.snapshot_dir.join(".partial-s1/base/x"), b"half").unwrap();
    std::fs::create_dir_all(layout.snapshot_dir.join("done")).unwrap();
    let agent = Agent::start(layout.clone(), AgentKey::generate(), FreeFloor::Percent(1)).unwrap();
    assert!(!layout.snapshot_dir.join(".partial-s1").exists());
    let listed: Vec<String> = agent
        .store()
        .list()
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(listed, ["done"]);
    // The name is free again.
    agent
        .store()
        .create(&name("s1"), FreeFloor::Percent(1))
        .unwrap();
}
