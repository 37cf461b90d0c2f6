//! S3 Object Lock and as-of views against moto's S3 server: the store itself
//! refuses to delete locked packs, manifests and WAL objects (asked by an
//! independent client, boto3), garbage collection reports such packs as kept,
//! a reused pack's retention follows the newest set, and a view of the bucket
//! at an earlier time reads what a wipe removed or overwrote, and refuses
//! writes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use strata_repo::{
    pack_key, BackupManifest, BlockIndex, BlockRef, LockMode, ObjectLock, Repository, S3Config,
    S3Storage, Storage, StorageError,
};
use testkit::Moto;

fn config(moto: &Moto, bucket: &str, lock: Option<ObjectLock>) -> S3Config {
    let mut c = S3Config::from_url(&format!("s3://{bucket}/repo")).unwrap();
    c.endpoint = Some(moto.endpoint());
    c.access_key_id = Some(Moto::ACCESS_KEY.into());
    c.secret_access_key = Some(Moto::SECRET_KEY.into());
    c.path_style = true;
    c.allow_http = true;
    c.object_lock = lock;
    c
}

fn governance(days: u32) -> Option<ObjectLock> {
    Some(ObjectLock {
        mode: LockMode::Governance,
        days,
    })
}

fn manifest(instance: &str, id: &str, blocks: &[BlockRef]) -> BackupManifest {
    serde_json::from_value(serde_json::json!({
        "format_version": 1, "backup_id": id, "instance_id": instance, "mode": "Manual",
        "system_identifier": "1", "pg_version_num": 150000, "wal_segment_size": 16777216,
        "label": "t", "start_lsn": "0/2000028", "start_timeline": 1, "stop_lsn": "0/2000100",
        "stop_timeline": 1, "start_time": Utc::now(), "stop_time": Utc::now(),
        "tablespaces": [], "server_manifest": null,
        "files": [{"tablespace": null, "path": "base/1/1", "kind": "file", "mode": 384,
                   "size": 4096 * blocks.len(), "mtime": 0, "link_target": null,
                   "crc32c": null, "blocks": blocks}],
        "stats": {"file_count": 1, "total_bytes": 4096, "new_bytes": 0, "dedup_bytes": 0,
                  "stored_bytes": 0, "new_blocks": 0, "dedup_blocks": 0, "packs": 0}
    }))
    .unwrap()
}

/// One block in a pack of its own.
fn stored(repo: &Repository, byte: u8) -> BlockRef {
    let mut w = repo.block_writer(BlockIndex::default());
    let block = w.add(&vec![byte; 4096]).unwrap();
    w.finish().unwrap();
    block
}

/// What the store answers boto3 deleting every version of `key` (under
/// the repository prefix): one error code (or "deleted") per version.
fn delete_every_version(moto: &Moto, bucket: &str, key: &str) -> Vec<String> {
    let out = moto.boto3(&format!(
        "key = 'repo/' + {key:?}\n\
         for v in s3.list_object_versions(Bucket={bucket:?}, Prefix=key).get('Versions', []):\n\
         \x20   if v['Key'] != key: continue\n\
         \x20   try:\n\
         \x20       s3.delete_object(Bucket={bucket:?}, Key=key, VersionId=v['VersionId'])\n\
         \x20       print('deleted')\n\
         \x20   except s3.exceptions.ClientError as e:\n\
         \x20       print(e.response['Error']['Code'])\n"
    ));
    out.lines().map(str::to_string).collect()
}

/// The retain-until date boto3 reads for the current version of `key`.
fn retain_until(moto: &Moto, bucket: &str, key: &str) -> chrono::DateTime<Utc> {
    let out = moto.boto3(&format!(
        "r = s3.head_object(Bucket={bucket:?}, Key='repo/' + {key:?})\n\
         print(r['ObjectLockMode'], r['ObjectLockRetainUntilDate'].isoformat())\n"
    ));
    let (mode, date) = out.trim().split_once(' ').unwrap();
    assert_eq!(mode, "GOVERNANCE");
    chrono::DateTime::parse_from_rfc3339(date)
        .unwrap()
        .with_timezone(&Utc)
}

#[test]
fn locked_objects_are_refused_by_the_store_and_kept_by_collection() {
    let moto = Moto::start();
    moto.create_bucket("locked", true, true);
    let storage = Arc::new(S3Storage::new(config(&moto, "locked", governance(1))).unwrap());
    let repo = Repository::open_or_init(storage.clone()).unwrap();
    let kept = stored(&repo, 1);
    let garbage = stored(&repo, 2);
    repo.commit_manifest(&manifest("i1", "b1", std::slice::from_ref(&kept)))
        .unwrap();
    let wal = "instances/i1/wal/00000001/000000010000000000000001";
    storage.put(wal, b"wal bytes").unwrap();

    // Each kind of object is under a retention of a day, and the store
    // itself refuses to delete any version of it.
    let day = chrono::Duration::days(1);
    for key in [
        pack_key(kept.pack.as_str()),
        "instances/i1/backups/b1.manifest".to_string(),
        wal.to_string(),
    ] {
        let until = retain_until(&moto, "locked", &key);
        assert!(
            until > Utc::now() + day - chrono::Duration::minutes(5),
            "{key}: {until}"
        );
        assert_eq!(
            delete_every_version(&moto, "locked", &key),
            ["AccessDenied"],
            "{key}"
        );
        // Strata's own delete is refused the same way, and leaves no
        // delete marker behind: the object stays readable.
        match storage.delete(&key) {
            Err(StorageError::Locked { until: Some(u), .. }) => {
                assert!(u > Utc::now() + day - chrono::Duration::minutes(5))
            }
            other => panic!("{key}: {other:?}"),
        }
        assert!(storage.exists(&key).unwrap(), "{key}");
    }
    assert_eq!(storage.get(wal).unwrap(), b"wal bytes");

    // The unreferenced pack is due at once (no grace) but locked: reported
    // as kept until its date, still pending, and the next run does the same.
    let mut pending = strata_repo::PendingPacks::new();
    for _ in 0..2 {
        let (report, next) = repo
            .collect_garbage(&pending, Utc::now(), chrono::Duration::zero())
            .unwrap();
        assert_eq!(
            (report.packs_kept, report.packs_deleted, report.packs_locked),
            (1, 0, 1)
        );
        assert!(report.locked_until.unwrap() > Utc::now() + day - chrono::Duration::minutes(5));
        assert!(next.contains_key(garbage.pack.as_str()));
        pending = next;
    }
    let garbage_key = pack_key(garbage.pack.as_str());
    assert!(storage.exists(&garbage_key).unwrap());

    // Governance lets an operator with the bypass permission lift it; after
    // that Strata's delete removes every version for good.
    moto.boto3(&format!(
        "s3.put_object_retention(Bucket='locked', Key='repo/' + {garbage_key:?}, \
         BypassGovernanceRetention=True, Retention={{'Mode': 'GOVERNANCE', \
         'RetainUntilDate': __import__('datetime').datetime(2000, 1, 1)}})\n"
    ));
    let (report, _) = repo
        .collect_garbage(&pending, Utc::now(), chrono::Duration::zero())
        .unwrap();
    assert_eq!((report.packs_deleted, report.packs_locked), (1, 0));
    let left = moto.boto3(&format!(
        "print(len(s3.list_object_versions(Bucket='locked', Prefix='repo/' + {garbage_key:?})\
         .get('Versions', [])))\n"
    ));
    assert_eq!(left.trim(), "0");
}

#[test]
fn a_reused_pack_is_retained_as_long_as_the_newest_set() {
    let moto = Moto::start();
    moto.create_bucket("reuse", true, true);
    let first = Arc::new(S3Storage::new(config(&moto, "reuse", governance(1))).unwrap());
    let repo = Repository::open_or_init(first).unwrap();
    let block = stored(&repo, 7);
    repo.commit_manifest(&manifest("i1", "b1", std::slice::from_ref(&block)))
        .unwrap();
    let key = pack_key(block.pack.as_str());
    let before = retain_until(&moto, "reuse", &key);

    // A later set (here with a longer window) references the same pack.
    let later = Arc::new(S3Storage::new(config(&moto, "reuse", governance(3))).unwrap());
    let repo = Repository::open(later).unwrap();
    repo.commit_manifest(&manifest("i1", "b2", std::slice::from_ref(&block)))
        .unwrap();
    let after = retain_until(&moto, "reuse", &key);
    assert!(
        after > before + chrono::Duration::days(1),
        "{before} -> {after}"
    );
    assert_eq!(
        retain_until(&moto, "reuse", "instances/i1/backups/b2.manifest").date_naive(),
        after.date_naive()
    );
}

#[test]
fn lock_settings_are_refused_on_a_bucket_without_object_lock() {
    let moto = Moto::start();
    moto.create_bucket("plain", true, false);
    match S3Storage::new(config(&moto, "plain", governance(1))) {
        Err(StorageError::Config(m)) => {
            assert!(
                m.contains("bucket plain does not have Object Lock enabled"),
                "{m}"
            )
        }
        other => panic!("accepted: {other:?}"),
    }
    match S3Storage::new(config(&moto, "plain", governance(0))) {
        Err(StorageError::Config(m)) => assert!(m.contains("at least 1"), "{m}"),
        other => panic!("accepted: {other:?}"),
    }
}

#[test]
fn an_as_of_view_reads_the_bucket_before_a_wipe_and_refuses_writes() {
    let moto = Moto::start();
    moto.create_bucket("history", true, false);
    let live = S3Storage::new(config(&moto, "history", None)).unwrap();
    live.put("a/one", b"first").unwrap();
    live.put("a/two", b"second").unwrap();
    live.put("b/three", b"third").unwrap();
    // moto's LastModified has whole seconds: keep the instants apart.
    std::thread::sleep(Duration::from_millis(1100));
    let before_wipe = Utc::now();
    std::thread::sleep(Duration::from_millis(1100));
    // The wipe: overwritten, deleted (delete markers), and a new object.
    live.put("a/one", b"tampered").unwrap();
    live.delete("a/two").unwrap();
    live.delete("b/three").unwrap();
    live.put("b/four", b"new").unwrap();
    assert_eq!(live.list("").unwrap(), ["a/one", "b/four"]);

    let mut c = config(&moto, "history", None);
    c.as_of = Some(before_wipe);
    let view = S3Storage::new(c).unwrap();
    assert_eq!(view.list("").unwrap(), ["a/one", "a/two", "b/three"]);
    assert_eq!(view.list("a/").unwrap(), ["a/one", "a/two"]);
    assert_eq!(view.get("a/one").unwrap(), b"first");
    assert_eq!(view.get_range("a/two", 1, 3).unwrap(), b"eco");
    assert!(matches!(
        view.get_range("a/two", 4, 3),
        Err(StorageError::ShortRead { .. })
    ));
    assert!(view.exists("b/three").unwrap());
    assert!(!view.exists("b/four").unwrap());
    assert!(matches!(view.get("b/four"), Err(StorageError::NotFound(_))));
    for refused in [view.put("a/one", b"x"), view.delete("a/one")] {
        match refused {
            Err(StorageError::ReadOnly { why, .. }) => assert!(why.contains("read-only"), "{why}"),
            other => panic!("a write through the view: {other:?}"),
        }
    }
    assert_eq!(live.get("a/one").unwrap(), b"tampered");

    // Before anything was written, the repository was empty.
    let mut c = config(&moto, "history", None);
    c.as_of = Some(before_wipe - chrono::Duration::hours(1));
    assert!(S3Storage::new(c).unwrap().list("").unwrap().is_empty());
}

#[test]
fn an_as_of_view_is_refused_on_an_unversioned_bucket() {
    let moto = Moto::start();
    moto.create_bucket("flat", false, false);
    let mut c = config(&moto, "flat", None);
    c.as_of = Some(Utc::now());
    match S3Storage::new(c) {
        Err(StorageError::Config(m)) => assert!(m.contains("needs a versioned bucket"), "{m}"),
        other => panic!("accepted: {other:?}"),
    }
}

/// A refusal with no retention in force (here a legal hold, as a missing
/// delete permission would be) is not taken for a lock that ends: the
/// delete is refused with what the store showed, collection keeps the pack
/// and reports why, and goes on; once the hold is released it deletes it.
#[test]
fn a_refusal_without_a_retention_is_kept_and_said_apart_from_a_lock() {
    let moto = Moto::start();
    moto.create_bucket("held", true, true);
    let storage = Arc::new(S3Storage::new(config(&moto, "held", governance(1))).unwrap());
    let repo = Repository::open_or_init(storage.clone()).unwrap();
    let garbage = stored(&repo, 3);
    let key = pack_key(garbage.pack.as_str());
    // Its retention lifted (past), a legal hold put on instead.
    moto.boto3(&format!(
        "s3.put_object_retention(Bucket='held', Key='repo/' + {key:?}, \
         BypassGovernanceRetention=True, Retention={{'Mode': 'GOVERNANCE', \
         'RetainUntilDate': __import__('datetime').datetime(2000, 1, 1)}})\n\
         s3.put_object_legal_hold(Bucket='held', Key='repo/' + {key:?}, LegalHold={{'Status': 'ON'}})\n"
    ));
    match storage.delete(&key) {
        Err(StorageError::DeleteRefused { reason, .. }) => {
            assert!(reason.contains("legal hold is on"), "{reason}")
        }
        other => panic!("not refused for its legal hold: {other:?}"),
    }
    // Still there: nothing was deleted, no delete marker hides it.
    assert!(storage.exists(&key).unwrap());
    let (report, pending) = repo
        .collect_garbage(&Default::default(), Utc::now(), chrono::Duration::zero())
        .unwrap();
    assert_eq!(
        (
            report.packs_deleted,
            report.packs_locked,
            report.packs_refused
        ),
        (0, 0, 1)
    );
    assert!(report.refused_reason.unwrap().contains("legal hold is on"));
    assert!(pending.contains_key(garbage.pack.as_str()));
    // Released: the next collection deletes it.
    moto.boto3(&format!(
        "s3.put_object_legal_hold(Bucket='held', Key='repo/' + {key:?}, LegalHold={{'Status': 'OFF'}})\n"
    ));
    let (report, _) = repo
        .collect_garbage(&pending, Utc::now(), chrono::Duration::zero())
        .unwrap();
    assert_eq!((report.packs_deleted, report.packs_refused), (1, 0));
    assert!(!storage.exists(&key).unwrap());
}
