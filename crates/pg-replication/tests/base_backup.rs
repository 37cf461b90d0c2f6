//! BASE_BACKUP end to end: archives, files, manifest, end position.

mod common;

use std::collections::HashMap;

use common::connect_superuser;
use pg_replication::{BaseBackupEvent, BaseBackupOptions, Lsn, TarEntryKind, TimelineId};
use testkit::{shared_cluster, Cluster};

#[derive(Default)]
struct Received {
    archives: Vec<(String, Option<u32>)>,
    /// path (archive-relative) → (announced size, bytes received)
    files: HashMap<String, (u64, u64)>,
    dirs: Vec<String>,
    pg_version: Vec<u8>,
    manifest: Vec<u8>,
    progress: Vec<u64>,
    end: Option<(Lsn, TimelineId)>,
}

async fn take_backup(cluster: &Cluster, opts: BaseBackupOptions) -> (Lsn, Option<u64>, Received) {
    let mut client = connect_superuser(cluster).await;
    let mut backup = client
        .base_backup(&opts)
        .await
        .unwrap_or_else(|e| panic!("BASE_BACKUP: {e}\n{}", cluster.log()));
    let start = backup.start_lsn();
    assert_eq!(backup.start_timeline(), TimelineId(1));
    let total = backup.total_size_bytes();
    assert_eq!(backup.tablespaces().len(), 1);
    assert_eq!(backup.tablespaces()[0].oid, None);

    let mut r = Received::default();
    let mut current: Option<String> = None;
    let mut in_archive = false;
    while let Some(event) = backup.next().await.expect("backup event") {
        assert!(r.end.is_none(), "nothing may follow Finished");
        match event {
            BaseBackupEvent::ArchiveStart {
                name,
                tablespace_oid,
                ..
            } => {
                assert!(!in_archive);
                in_archive = true;
                r.archives.push((name, tablespace_oid));
            }
            BaseBackupEvent::Entry(entry) => {
                assert!(in_archive);
                if let Some(prev) = current.take() {
                    let (size, got) = r.files[&prev];
                    assert_eq!(size, got, "{prev}: data length must equal size");
                }
                match entry.kind {
                    TarEntryKind::File => {
                        r.files.insert(entry.path.clone(), (entry.size, 0));
                        current = Some(entry.path);
                    }
                    TarEntryKind::Directory => r.dirs.push(entry.path),
                    TarEntryKind::Symlink { .. } => {}
                }
            }
            BaseBackupEvent::Data(chunk) => {
                let path = current.as_ref().expect("data belongs to a file");
                assert!(chunk.len() <= 1024 * 1024);
                r.files.get_mut(path).unwrap().1 += chunk.len() as u64;
                if path == "PG_VERSION" {
                    r.pg_version.extend_from_slice(&chunk);
                }
            }
            BaseBackupEvent::ArchiveEnd => {
                assert!(in_archive);
                in_archive = false;
                if let Some(prev) = current.take() {
                    let (size, got) = r.files[&prev];
                    assert_eq!(size, got, "{prev}: data length must equal size");
                }
            }
            BaseBackupEvent::Progress { bytes_done } => r.progress.push(bytes_done),
            BaseBackupEvent::Manifest(chunk) => {
                assert!(!in_archive);
                r.manifest.extend_from_slice(&chunk);
            }
            BaseBackupEvent::Finished {
                end_lsn,
                end_timeline,
            } => r.end = Some((end_lsn, end_timeline)),
        }
    }
    assert!(backup.next().await.unwrap().is_none());
    drop(backup);
    // Back in command mode.
    client
        .identify_system()
        .await
        .expect("identify after backup");
    (start, total, r)
}

fn check_backup(cluster: &Cluster, start: Lsn, total: Option<u64>, r: &Received) {
    assert_eq!(r.archives, vec![("base.tar".to_string(), None)]);
    for required in ["PG_VERSION", "global/pg_control", "backup_label"] {
        assert!(r.files.contains_key(required), "{required} missing");
    }
    assert!(r.dirs.iter().any(|d| d == "base"), "{:?}", r.dirs);
    assert_eq!(
        String::from_utf8_lossy(&r.pg_version).trim(),
        cluster.major().to_string()
    );
    let (end, tli) = r.end.expect("Finished");
    assert!(end >= start);
    assert_eq!(tli, TimelineId(1));

    let total = total.expect("PROGRESS gives an estimate");
    let received: u64 = r.files.values().map(|(size, _)| size).sum();
    assert!(total > 0 && received > 0);
    let last = *r.progress.last().expect("progress reported");
    assert!(last >= received, "progress {last} < file bytes {received}");
    assert!(r.progress.windows(2).all(|w| w[0] <= w[1]));

    let manifest: serde_json::Value =
        serde_json::from_slice(&r.manifest).expect("manifest is JSON");
    let files = manifest["Files"].as_array().expect("Files");
    assert!(!files.is_empty());
    for f in files {
        let path = f["Path"].as_str().expect("Path");
        let size = f["Size"].as_u64().expect("Size");
        let (announced, got) = r
            .files
            .get(path)
            .unwrap_or_else(|| panic!("manifest lists {path}, not received"));
        assert_eq!((*announced, *got), (size, size), "{path}");
        assert_eq!(f["Checksum-Algorithm"], "CRC32C", "{path}");
    }
    assert_eq!(
        files.len(),
        r.files.len(),
        "every received file is in the manifest"
    );
    let wal = &manifest["WAL-Ranges"][0];
    assert_eq!(wal["Start-LSN"].as_str().unwrap(), start.to_string());
    assert_eq!(wal["End-LSN"].as_str().unwrap(), end.to_string());
}

#[tokio::test]
async fn base_backup_pg15() {
    let cluster = shared_cluster(15);
    cluster.psql(
        "postgres",
        "CREATE TABLE IF NOT EXISTS bb_data AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    );
    let (start, total, received) = take_backup(
        cluster,
        BaseBackupOptions {
            label: "strata test".into(),
            ..Default::default()
        },
    )
    .await;
    check_backup(cluster, start, total, &received);
}

#[tokio::test]
async fn base_backup_without_manifest_or_progress() {
    let cluster = shared_cluster(15);
    let (_, total, r) = take_backup(
        cluster,
        BaseBackupOptions {
            label: "plain".into(),
            fast_checkpoint: true,
            progress: false,
            manifest: false,
            max_rate_kb: None,
            tablespace_map: false,
            incremental: false,
        },
    )
    .await;
    assert_eq!(total, None);
    assert!(r.manifest.is_empty());
    assert!(r.files.contains_key("global/pg_control"));
    assert!(r.end.is_some());
}

/// PostgreSQL 16-18 (from `.cache/pg`, installed by scripts/install-test-deps.sh; testkit panics
/// with that hint when one is missing).
#[tokio::test]
async fn base_backup_pg16_to_18() {
    for major in [16, 17, 18] {
        let cluster = Cluster::start_default(major);
        let (start, total, received) = take_backup(&cluster, BaseBackupOptions::default()).await;
        check_backup(&cluster, start, total, &received);
        let client = connect_superuser(&cluster).await;
        assert_eq!(client.server_version_num() / 10000, major);
    }
}
