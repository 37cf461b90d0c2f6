//! The repository format is a contract: a repository written by an earlier
//! release must read back unchanged. `fixtures/repo-v1` is a small plain
//! repository written by the release before block references got readable
//! field names in Rust (commit 960a7ce); this test opens it with the current
//! code, checks it, and reads every file of its backup back byte for byte.
//!
//! The fixture holds a compressible file spanning several blocks, an
//! incompressible one (stored uncompressed), a file whose block repeats one
//! already stored (deduplicated), an empty file, directories and a
//! tablespace with its link.

use std::path::Path;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use pg_wal::{Lsn, TimelineId};
use strata_repo::{
    index_prefix, BackupManifest, BackupStats, BlockIndex, FileEntry, FileKind, InstanceRecord,
    LocalStorage, Repository, Storage, TablespaceEntry,
};

const FIXTURE: &str = "tests/fixtures/repo-v1";
const INSTANCE: &str = "fixture-db";
const BACKUP: &str = "20261206T000000Z";
const TABLESPACE: u32 = 16400;

/// Bytes that do not repeat (xorshift): zstd cannot shrink them.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Bytes that compress well but differ from block to block.
fn text(len: usize, seed: u32) -> Vec<u8> {
    (0..)
        .flat_map(|i: u32| format!("row {seed}:{i} of the fixture table\n").into_bytes())
        .take(len)
        .collect()
}

/// One file of the fixture's backup: (tablespace, path, contents); `None`
/// for a directory.
type Expected = (Option<u32>, &'static str, Option<Vec<u8>>);

fn expected_files(block_size: usize) -> Vec<Expected> {
    let big = text(2 * block_size + 1000, 1);
    // Its first block is the first block of `big`: stored once.
    let mut repeat = big[..block_size].to_vec();
    repeat.extend_from_slice(b"tail");
    vec![
        (None, "base", None),
        (None, "base/1", None),
        (None, "base/1/16384", Some(big)),
        (None, "base/1/16385", Some(noise(20_000, 7))),
        (None, "base/1/16386", Some(repeat)),
        (None, "base/1/PG_VERSION", Some(b"15\n".to_vec())),
        (None, "global", None),
        (None, "global/pg_filenode.map", Some(Vec::new())),
        (Some(TABLESPACE), "PG_15_202209061", None),
        (
            Some(TABLESPACE),
            "PG_15_202209061/1/16500",
            Some(text(3000, 2)),
        ),
    ]
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn repository_written_by_the_previous_release_reads_back_byte_exact() {
    // A copy: opening a local repository may tighten its permissions.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE),
        &dir.path().join("repo"),
    );
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
    let repo = Repository::open(storage).unwrap();
    assert!(repo.verify(&|_, _| {}).unwrap().is_clean());

    let instances = repo.list_instances().unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].id, INSTANCE);
    assert_eq!(instances[0].sslmode, "verify-full");
    assert_eq!(repo.list_backups(INSTANCE).unwrap(), vec![BACKUP]);

    let manifest = repo.read_manifest(INSTANCE, BACKUP).unwrap();
    assert_eq!(manifest.mode, "Manual");
    assert_eq!(manifest.system_identifier, 7_345_678_901_234_567_890);
    let expected = expected_files(repo.block_size());
    let regular: Vec<&FileEntry> = manifest
        .files
        .iter()
        .filter(|f| f.kind != FileKind::Symlink)
        .collect();
    assert_eq!(regular.len(), expected.len());
    for (entry, (tablespace, path, contents)) in regular.iter().zip(&expected) {
        assert_eq!(
            (entry.tablespace, entry.path.as_str()),
            (*tablespace, *path)
        );
        match contents {
            None => assert_eq!(entry.kind, FileKind::Dir, "{path}"),
            Some(contents) => {
                assert_eq!(entry.kind, FileKind::File, "{path}");
                let mut read = Vec::new();
                repo.read_blocks::<strata_repo::RepoError>(&entry.blocks, |b| {
                    read.extend_from_slice(&b);
                    Ok(())
                })
                .unwrap();
                assert_eq!(entry.size, contents.len() as u64, "{path}");
                assert!(read == *contents, "{path} differs");
                assert_eq!(entry.crc32c, Some(crc32c::crc32c(contents)), "{path}");
            }
        }
    }
    // The incompressible block is stored as is, the others compressed; the
    // repeated block points at the same place as the original.
    let file = |p: &str| manifest.files.iter().find(|f| f.path == p).unwrap();
    assert!(file("base/1/16385")
        .blocks
        .iter()
        .all(|b| b.compression == 0));
    assert!(file("base/1/16384")
        .blocks
        .iter()
        .all(|b| b.compression == 1));
    assert_eq!(
        file("base/1/16386").blocks[0],
        file("base/1/16384").blocks[0]
    );
    // And new manifests spell block references as the old ones did.
    let written = serde_json::to_value(&file("base/1/16384").blocks[0]).unwrap();
    let keys: Vec<&str> = written
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["c", "h", "o", "p", "r", "s"]);
    let link = file(&format!("pg_tblspc/{TABLESPACE}"));
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(link.link_target.as_deref(), Some("/srv/ts"));
    assert_eq!(manifest.tablespaces[0].location, "/srv/ts");

    // It has no block index: the first backup indexes it from its manifest,
    // deduplicates against it, and the repository still verifies clean.
    assert!(repo
        .storage()
        .list(&index_prefix(INSTANCE))
        .unwrap()
        .is_empty());
    let repo = repo.with_index_cache(dir.path().join("cache"));
    let index = repo.block_index(INSTANCE).unwrap();
    for f in manifest.all_files() {
        for b in &f.blocks {
            assert_eq!(index.get(&b.hash).as_ref(), Some(b));
        }
    }
    assert_eq!(
        repo.storage().list(&index_prefix(INSTANCE)).unwrap().len(),
        1
    );
    let mut writer = repo.block_writer(index);
    writer
        .add(&text(2 * repo.block_size() + 1000, 1)[..repo.block_size()])
        .unwrap();
    assert_eq!(writer.finish().unwrap().new_blocks, 0);
    assert!(repo.verify(&|_, _| {}).unwrap().is_clean());
}

/// Writes the fixture's backup into a new repository at `root`: how
/// `fixtures/repo-v1` was made (by the release named above, into that
/// directory), and what the next format's fixture starts from.
fn write_backup(root: &Path) {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(root).unwrap());
    let repo = Repository::open_or_init(storage).unwrap();
    let at = Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap();
    repo.put_instance(&InstanceRecord {
        id: INSTANCE.into(),
        host: "db.example".into(),
        port: 5432,
        user: "backup".into(),
        dbname: None,
        sslmode: "verify-full".into(),
        password_env: None,
        created_at: at,
    })
    .unwrap();
    let mut writer = repo.block_writer(BlockIndex::default());
    let mut files = Vec::new();
    for (tablespace, path, contents) in expected_files(repo.block_size()) {
        let mut entry = FileEntry {
            tablespace,
            path: path.into(),
            kind: FileKind::Dir,
            mode: 0o700,
            size: 0,
            mtime: at.timestamp(),
            link_target: None,
            crc32c: None,
            blocks: Vec::new(),
        };
        if let Some(contents) = contents {
            entry.kind = FileKind::File;
            entry.mode = 0o600;
            entry.size = contents.len() as u64;
            entry.crc32c = Some(crc32c::crc32c(&contents));
            for chunk in contents.chunks(repo.block_size()) {
                entry.blocks.push(writer.add(chunk).unwrap());
            }
        }
        files.push(entry);
    }
    files.push(FileEntry {
        tablespace: None,
        path: format!("pg_tblspc/{TABLESPACE}"),
        kind: FileKind::Symlink,
        mode: 0o777,
        size: 0,
        mtime: at.timestamp(),
        link_target: Some("/srv/ts".into()),
        crc32c: None,
        blocks: Vec::new(),
    });
    let stats: BackupStats = writer.finish().unwrap();
    repo.commit_manifest(&BackupManifest {
        format_version: strata_repo::manifest::MANIFEST_VERSION,
        backup_id: BACKUP.into(),
        instance_id: INSTANCE.into(),
        system_identifier: 7_345_678_901_234_567_890,
        pg_version_num: 150_000,
        wal_segment_size: 16 * 1024 * 1024,
        label: "fixture".into(),
        mode: "Manual".into(),
        start_lsn: Lsn(0x300_0028),
        start_timeline: TimelineId(1),
        stop_lsn: Lsn(0x300_0100),
        stop_timeline: TimelineId(1),
        start_time: at,
        stop_time: at,
        tablespaces: vec![TablespaceEntry {
            oid: TABLESPACE,
            location: "/srv/ts".into(),
        }],
        files,
        server_manifest: None,
        incremental_from: None,
        received_bytes: None,
        stats,
        contents: None,
    })
    .unwrap();
}

/// Today's writer, given the fixture's files, stores what the fixture
/// holds: the same entries, sizes, checksums, block lengths and compression
/// (block hashes and pack names differ: each repository has its own keys).
#[test]
fn the_current_writer_stores_what_the_fixture_holds() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE),
        &dir.path().join("old"),
    );
    write_backup(&dir.path().join("new"));
    let shape = |name: &str| {
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path().join(name)).unwrap());
        let repo = Repository::open(storage).unwrap();
        let m = repo.read_manifest(INSTANCE, BACKUP).unwrap();
        let files: Vec<_> = m
            .files
            .iter()
            .map(|f| {
                let blocks: Vec<(u32, u32, u8)> = f
                    .blocks
                    .iter()
                    .map(|b| (b.raw_len, b.stored_len, b.compression))
                    .collect();
                (
                    f.tablespace,
                    f.path.clone(),
                    f.kind,
                    f.size,
                    f.crc32c,
                    f.link_target.clone(),
                    blocks,
                )
            })
            .collect();
        (m.mode, m.start_lsn, m.stop_lsn, m.tablespaces.len(), files)
    };
    assert_eq!(shape("new"), shape("old"));
}
