//! The `Storage` contract, run against every backend: memory, a local
//! directory, a real S3-protocol server (s3s-fs), a real Azure Blob
//! Storage emulator (Azurite) and a real Google Cloud Storage emulator
//! (fake-gcs-server). Whatever the repository relies on —
//! atomic whole-object puts, exact ranged reads, sorted recursive listing
//! under a directory prefix, idempotent deletes, keys with slashes — must hold
//! on all, including objects large enough to go up as multipart uploads.

use std::sync::Arc;

use strata_repo::{
    AzureConfig, AzureStorage, GcsConfig, GcsStorage, LocalStorage, Repository, RetryPolicy,
    RetryingStorage, S3Config, S3Storage, Storage, StorageError,
};
use testkit::{Azurite, FakeGcs, S3Server};

const MIB: usize = 1024 * 1024;

/// Bytes that do not repeat within an object, so a misplaced range shows.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
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

fn s3_config(server: &S3Server, prefix: &str) -> S3Config {
    let mut config = S3Config::from_url(&format!("s3://{}/{prefix}", S3Server::BUCKET)).unwrap();
    config.endpoint = Some(server.endpoint());
    config.access_key_id = Some(S3Server::ACCESS_KEY.into());
    config.secret_access_key = Some(S3Server::SECRET_KEY.into());
    config.path_style = true;
    config.allow_http = true;
    // Small parts so a 12 MiB object is a three-part upload.
    config.tuning.multipart_threshold = 5 * MIB;
    config.tuning.part_size = 5 * MIB;
    config.tuning.max_concurrency = 4;
    config
}

fn azure_config(azurite: &Azurite, prefix: &str) -> AzureConfig {
    let mut config =
        AzureConfig::from_url(&format!("azure://{}/{prefix}", Azurite::CONTAINER)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(azurite.endpoint());
    // Small blocks so a 12 MiB object is three blocks and a block list.
    config.tuning.multipart_threshold = 5 * MIB;
    config.tuning.part_size = 5 * MIB;
    config.tuning.max_concurrency = 4;
    config
}

fn gcs_config(server: &FakeGcs, prefix: &str) -> GcsConfig {
    let mut config = GcsConfig::from_url(&format!("gs://{}/{prefix}", FakeGcs::BUCKET)).unwrap();
    config.use_emulator = true;
    config.endpoint = Some(server.endpoint());
    // The emulator serves no XML-API multipart uploads: every object goes up whole.
    config.tuning.multipart_threshold = 64 * MIB;
    config.tuning.max_concurrency = 4;
    config
}

fn contract(s: &dyn Storage) {
    // Put, get, overwrite.
    s.put("a/b/c", b"hello").unwrap();
    s.put("a/d", b"world").unwrap();
    s.put("ab", b"sibling of a/").unwrap();
    s.put("instances/x/wal/00000001/000000010000000000000001", b"wal")
        .unwrap();
    assert_eq!(s.get("a/b/c").unwrap(), b"hello");
    s.put("a/d", b"world, replaced").unwrap();
    assert_eq!(s.get("a/d").unwrap(), b"world, replaced");

    // Ranged reads: exact, or ShortRead (never transient, never fewer bytes).
    assert_eq!(s.get_range("a/b/c", 1, 3).unwrap(), b"ell");
    assert_eq!(s.get_range("a/b/c", 0, 5).unwrap(), b"hello");
    assert_eq!(s.get_range("a/b/c", 5, 0).unwrap(), b"");
    for (offset, len) in [(3, 10), (5, 1), (100, 4)] {
        let err = s.get_range("a/b/c", offset, len).unwrap_err();
        assert!(
            matches!(err, StorageError::ShortRead { .. }),
            "range {offset}+{len}: {err}"
        );
        assert!(!err.is_transient());
    }

    // Listing: recursive under a directory, sorted, "a" and "a/" alike, never "ab".
    assert_eq!(s.list("a").unwrap(), vec!["a/b/c", "a/d"]);
    assert_eq!(s.list("a/").unwrap(), vec!["a/b/c", "a/d"]);
    assert_eq!(s.list("a/b").unwrap(), vec!["a/b/c"]);
    assert!(s.list("nothing/here").unwrap().is_empty());
    // Sizes are the stored objects' lengths, listed like the keys.
    let sized: Vec<(String, u64)> = s
        .list_sizes("a")
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    assert_eq!(
        sized,
        vec![("a/b/c".to_string(), 5), ("a/d".to_string(), 15)]
    );
    assert_eq!(s.list_sizes("").unwrap().len(), s.list("").unwrap().len());
    let all = s.list("").unwrap();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    for key in [
        "a/b/c",
        "a/d",
        "ab",
        "instances/x/wal/00000001/000000010000000000000001",
    ] {
        assert!(all.iter().any(|k| k == key), "{key} missing from {all:?}");
    }

    // Exists, delete (twice), not found.
    assert!(s.exists("a/d").unwrap());
    assert!(!s.exists("a/nope").unwrap());
    s.delete("a/d").unwrap();
    s.delete("a/d").unwrap();
    assert!(!s.exists("a/d").unwrap());
    let err = s.get("a/d").unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err}");
    assert!(!err.is_transient());
    assert!(matches!(
        s.get_range("a/d", 0, 1),
        Err(StorageError::NotFound(_))
    ));

    // Keys are checked the same way everywhere.
    for bad in ["", "/abs", "a//b", "a/./b", "../x", "a/.."] {
        assert!(
            matches!(s.put(bad, b""), Err(StorageError::InvalidKey(_))),
            "{bad:?} accepted"
        );
    }

    // A large object (multipart on S3), read whole and across part boundaries.
    let big = pattern(12 * MIB + 12345, 7);
    s.put("packs/ab/large.pack", &big).unwrap();
    assert_eq!(s.get("packs/ab/large.pack").unwrap(), big);
    let at = 5 * MIB as u64 - 100;
    assert_eq!(
        s.get_range("packs/ab/large.pack", at, 300).unwrap(),
        &big[at as usize..at as usize + 300]
    );
    let tail = big.len() as u64 - 10;
    assert_eq!(
        s.get_range("packs/ab/large.pack", tail, 10).unwrap(),
        &big[tail as usize..]
    );
    // Replaced by a small one: the whole new object, nothing of the old.
    s.put("packs/ab/large.pack", b"small now").unwrap();
    assert_eq!(s.get("packs/ab/large.pack").unwrap(), b"small now");

    // Concurrent writers and readers from plain threads.
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            scope.spawn(move || {
                for i in 0..5u32 {
                    let key = format!("concurrent/{t}/{i}");
                    let data = pattern(1000 + i as usize, t * 10 + i);
                    s.put(&key, &data).unwrap();
                    assert_eq!(s.get(&key).unwrap(), data);
                }
            });
        }
    });
    assert_eq!(s.list("concurrent").unwrap().len(), 20);
}

#[test]
fn memory_meets_the_contract() {
    contract(&strata_repo::MemoryStorage::new());
}

#[test]
fn local_directory_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(&LocalStorage::new(dir.path()).unwrap());
}

#[test]
fn s3_meets_the_contract() {
    let server = S3Server::start();
    let storage = S3Storage::new(s3_config(&server, "repo/one")).unwrap();
    contract(&storage);
    // The prefix is a real key prefix in the bucket; nothing is left in tmp.
    let on_disk = server.bucket_dir(S3Server::BUCKET).join("repo/one/a/b/c");
    assert_eq!(std::fs::read(on_disk).unwrap(), b"hello");
    assert_eq!(
        storage.describe(),
        format!(
            "s3://{}/repo/one at {}",
            S3Server::BUCKET,
            server.endpoint()
        )
    );
}

#[test]
fn s3_storage_works_inside_async_tasks() {
    let server = S3Server::start();
    let storage: Arc<dyn Storage> = Arc::new(S3Storage::new(s3_config(&server, "")).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = storage.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("task/{i}");
                s.put(&key, key.as_bytes()).unwrap();
                s.get(&key).unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("task/{i}").into_bytes());
        }
    });
    // The last reference dropped inside a runtime must not panic.
    rt.block_on(async move { tokio::spawn(async move { drop(storage) }).await.unwrap() });
}

#[test]
fn s3_wrong_credentials_fail_clearly_and_are_not_retried() {
    let server = S3Server::start();
    let mut config = s3_config(&server, "");
    config.secret_access_key = Some("not-the-secret".into());
    let storage = RetryingStorage::new(S3Storage::new(config).unwrap(), RetryPolicy::default());
    let started = std::time::Instant::now();
    let err = storage.put("x", b"y").unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(err.to_string().contains("put x"), "{err}");
}

#[test]
fn repository_round_trip_on_s3() {
    let server = S3Server::start();
    let storage: Arc<dyn Storage> = Arc::new(S3Storage::new(s3_config(&server, "r")).unwrap());
    let repo = Repository::open_or_init(storage.clone()).unwrap();
    let mut writer = repo.block_writer(Default::default());
    let blocks: Vec<Vec<u8>> = (0..3).map(|i| pattern(100_000, i)).collect();
    let refs: Vec<_> = blocks.iter().map(|b| writer.add(b).unwrap()).collect();
    writer.finish().unwrap();
    let reopened = Repository::open(storage).unwrap();
    assert_eq!(reopened.config().repository_id, repo.config().repository_id);
    for (block, r) in blocks.iter().zip(&refs) {
        assert_eq!(&reopened.read_block(r).unwrap(), block);
    }
    assert!(reopened.verify(&|_, _| {}).unwrap().is_clean());
}

#[test]
fn azure_meets_the_contract() {
    let azurite = Azurite::start();
    let storage = AzureStorage::new(azure_config(&azurite, "repo/one")).unwrap();
    contract(&storage);
    // The prefix is a real blob name prefix in the container.
    let whole = AzureStorage::new(azure_config(&azurite, "")).unwrap();
    assert_eq!(whole.get("repo/one/a/b/c").unwrap(), b"hello");
    assert!(whole.list("a").unwrap().is_empty());
    assert_eq!(
        storage.describe(),
        format!(
            "azure://{}/repo/one at {}/{}",
            Azurite::CONTAINER,
            azurite.endpoint(),
            Azurite::ACCOUNT
        )
    );
    // Containers are separate namespaces.
    azurite.create_container("other");
    let mut other_config = azure_config(&azurite, "repo/one");
    other_config.container = "other".into();
    let other = AzureStorage::new(other_config).unwrap();
    assert!(other.list("").unwrap().is_empty());
    other.put("a/b/c", b"elsewhere").unwrap();
    assert_eq!(storage.get("a/b/c").unwrap(), b"hello");
}

#[test]
fn azure_wrong_key_or_missing_container_fail_clearly_and_are_not_retried() {
    let azurite = Azurite::start();
    let mut config = azure_config(&azurite, "");
    // A well-formed key that is not the account's.
    config.access_key = Some("bm90LXRoZS1rZXktbm90LXRoZS1rZXktbm90LXRoZS1rZXk=".into());
    let storage = RetryingStorage::new(AzureStorage::new(config).unwrap(), RetryPolicy::default());
    let err = storage.put("x", b"y").unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("put x"), "{err}");
    let mut missing = azure_config(&azurite, "");
    missing.container = "no-such-container".into();
    let storage = RetryingStorage::new(AzureStorage::new(missing).unwrap(), RetryPolicy::default());
    let err = storage.put("x", b"y").unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .contains("does the bucket or container exist?"),
        "{err}"
    );
    // Nothing was written anywhere by either attempt.
    let good = AzureStorage::new(azure_config(&azurite, "")).unwrap();
    assert!(good.list("").unwrap().is_empty());
}

#[test]
fn repository_round_trip_on_azure() {
    let azurite = Azurite::start();
    let storage: Arc<dyn Storage> =
        Arc::new(AzureStorage::new(azure_config(&azurite, "r")).unwrap());
    let repo = Repository::open_or_init(storage.clone()).unwrap();
    let mut writer = repo.block_writer(Default::default());
    let blocks: Vec<Vec<u8>> = (0..3).map(|i| pattern(100_000, i)).collect();
    let refs: Vec<_> = blocks.iter().map(|b| writer.add(b).unwrap()).collect();
    writer.finish().unwrap();
    let reopened = Repository::open(storage).unwrap();
    assert_eq!(reopened.config().repository_id, repo.config().repository_id);
    for (block, r) in blocks.iter().zip(&refs) {
        assert_eq!(&reopened.read_block(r).unwrap(), block);
    }
    assert!(reopened.verify(&|_, _| {}).unwrap().is_clean());
}

#[test]
fn gcs_meets_the_contract() {
    let server = FakeGcs::start();
    let storage = GcsStorage::new(gcs_config(&server, "repo/one")).unwrap();
    contract(&storage);
    // The prefix is a real object name prefix in the bucket.
    let whole = GcsStorage::new(gcs_config(&server, "")).unwrap();
    assert_eq!(whole.get("repo/one/a/b/c").unwrap(), b"hello");
    assert!(whole.list("a").unwrap().is_empty());
    assert_eq!(
        storage.describe(),
        format!("gs://{}/repo/one at {}", FakeGcs::BUCKET, server.endpoint())
    );
    // Buckets are separate namespaces.
    server.create_bucket("other-bucket");
    let mut other_config = gcs_config(&server, "repo/one");
    other_config.bucket = "other-bucket".into();
    let other = GcsStorage::new(other_config).unwrap();
    assert!(other.list("").unwrap().is_empty());
    other.put("a/b/c", b"elsewhere").unwrap();
    assert_eq!(storage.get("a/b/c").unwrap(), b"hello");
}

#[test]
fn gcs_missing_bucket_fails_clearly_and_is_not_retried() {
    // (fake-gcs-server answers a listing of a missing bucket with a 500, so
    // a write is what is checked here; Cloud Storage answers both with 404.)
    let server = FakeGcs::start();
    let mut missing = gcs_config(&server, "");
    missing.bucket = "no-such-bucket".into();
    let storage = RetryingStorage::new(GcsStorage::new(missing).unwrap(), RetryPolicy::default());
    let err = storage.put("x", b"y").unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .contains("does the bucket or container exist?"),
        "{err}"
    );
    // Nothing was written to the bucket that exists.
    let good = GcsStorage::new(gcs_config(&server, "")).unwrap();
    assert!(good.list("").unwrap().is_empty());
}

#[test]
fn repository_round_trip_on_gcs() {
    let server = FakeGcs::start();
    let storage: Arc<dyn Storage> = Arc::new(GcsStorage::new(gcs_config(&server, "r")).unwrap());
    let repo = Repository::open_or_init(storage.clone()).unwrap();
    let mut writer = repo.block_writer(Default::default());
    let blocks: Vec<Vec<u8>> = (0..3).map(|i| pattern(100_000, i)).collect();
    let refs: Vec<_> = blocks.iter().map(|b| writer.add(b).unwrap()).collect();
    writer.finish().unwrap();
    let reopened = Repository::open(storage).unwrap();
    assert_eq!(reopened.config().repository_id, repo.config().repository_id);
    for (block, r) in blocks.iter().zip(&refs) {
        assert_eq!(&reopened.read_block(r).unwrap(), block);
    }
    assert!(reopened.verify(&|_, _| {}).unwrap().is_clean());
}
