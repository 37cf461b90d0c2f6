//! Immutable backups end to end, against moto's S3 with a bucket that has
//! Object Lock: a backup of a real PostgreSQL 15 server is locked, an attacker
//! with Strata's own credentials deletes what it can and overwrites a
//! manifest, and `strata restore --repo-as-of <before the wipe>` still brings
//! the table back. Also the refusals: lock settings on a bucket without Object
//! Lock, `--repo-as-of` on an unversioned bucket or with a bad time.

mod common;

use std::time::Duration;

use common::Strata;
use testkit::Moto;

/// A Strata whose repository is `s3://<bucket>/r` on `moto`, with `lock`
/// lines added to `[s3]`.
fn on_moto(name: &str, moto: &Moto, bucket: &str, lock: &str) -> Strata {
    Strata::with_config(
        name,
        &format!("repository = \"s3://{bucket}/r\"\n"),
        &format!(
            "[s3]\nendpoint = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\n\
             path_style = true\nallow_http = true\n{lock}",
            moto.endpoint(),
            Moto::ACCESS_KEY,
            Moto::SECRET_KEY
        ),
    )
}

#[test]
fn a_locked_backup_survives_a_wipe_and_is_restored_as_of_before_it() {
    let moto = Moto::start();
    moto.create_bucket("vault", true, true);
    let strata = on_moto(
        "objlock",
        &moto,
        "vault",
        "object_lock = \"governance\"\nobject_lock_days = 1\n",
    );
    let pg = testkit::shared_cluster(15);
    let db = "objlock_e2e";
    pg.psql("postgres", &format!("CREATE DATABASE {db}"));
    pg.psql(
        db,
        "CREATE TABLE items (id int PRIMARY KEY, note text); \
         INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 500) g",
    );
    let digest = |c: &testkit::Cluster| {
        c.psql(
            db,
            "SELECT count(*) || ':' || md5(string_agg(id || '=' || note, ',' ORDER BY id)) FROM items",
        )
    };
    let at_backup = digest(pg);
    let id = "vault";
    strata.add_instance(id, pg);
    let set = strata.backup(id);
    // moto's LastModified has whole seconds: keep the instants apart.
    std::thread::sleep(Duration::from_millis(1100));
    let before_wipe = chrono::Utc::now().to_rfc3339();
    std::thread::sleep(Duration::from_millis(1100));

    let gc = strata.ok(&["repo", "gc"]);
    assert!(gc.contains("deleted 0 pack(s)"), "{gc}");

    // The wipe, with Strata's own credentials: every version it can
    // delete, a delete marker on every key, a manifest overwritten.
    let manifest = format!("r/instances/{id}/backups/{set}.manifest");
    let wipe = moto.boto3(&format!(
        "refused = deleted = 0\n\
         for v in s3.list_object_versions(Bucket='vault', Prefix='r/').get('Versions', []):\n\
         \x20   try:\n\
         \x20       s3.delete_object(Bucket='vault', Key=v['Key'], VersionId=v['VersionId'])\n\
         \x20       deleted += 1\n\
         \x20   except s3.exceptions.ClientError as e:\n\
         \x20       assert e.response['Error']['Code'] == 'AccessDenied', e.response\n\
         \x20       refused += 1\n\
         for o in s3.list_objects_v2(Bucket='vault', Prefix='r/').get('Contents', []):\n\
         \x20   s3.delete_object(Bucket='vault', Key=o['Key'])\n\
         s3.put_object(Bucket='vault', Key={manifest:?}, Body=b'tampered')\n\
         print(refused, deleted)\n"
    ));
    let (refused, deleted) = wipe.trim().split_once(' ').unwrap();
    let refused: usize = refused.parse().unwrap();
    // Packs, the manifest and WAL objects were refused; the repository's
    // configuration and index were not under a lock.
    assert!(refused >= 2, "{wipe}");
    assert!(deleted.parse::<usize>().unwrap() >= 1, "{wipe}");

    // The live repository is gone...
    let target = strata.dir.join("restore-live");
    let err = strata.fails(&[
        "restore",
        id,
        "--target-dir",
        target.to_str().unwrap(),
        "--immediate",
    ]);
    assert!(!err.is_empty());

    // ...but the bucket as it was before the wipe restores the table.
    let restored = strata.restore_and_start(
        id,
        "asof",
        15,
        &["--immediate", "--repo-as-of", &before_wipe],
    );
    assert_eq!(digest(&restored), at_backup);
    assert!(at_backup.starts_with("500:"), "{at_backup}");
    drop(restored);
    pg.psql("postgres", &format!("DROP DATABASE {db}"));

    // Bad times are refused before anything is read.
    let target = strata.dir.join("restore-bad");
    for (time, why) in [
        ("yesterday", "--repo-as-of: invalid time \"yesterday\""),
        ("2026-13-01T00:00:00Z", "invalid time"),
        ("2999-01-01T00:00:00Z", "is in the future"),
    ] {
        let err = strata.fails(&[
            "restore",
            id,
            "--target-dir",
            target.to_str().unwrap(),
            "--immediate",
            "--repo-as-of",
            time,
        ]);
        assert!(err.contains(why), "{time}: {err}");
    }
}

#[test]
fn lock_and_as_of_are_refused_where_the_bucket_cannot_honour_them() {
    let moto = Moto::start();
    moto.create_bucket("nolock", true, false);
    moto.create_bucket("flat", false, false);
    let strata = on_moto(
        "objlock-refused",
        &moto,
        "nolock",
        "object_lock = \"compliance\"\nobject_lock_days = 30\n",
    );
    let err = strata.fails(&["backup", "list", "x"]);
    assert!(
        err.contains("bucket nolock does not have Object Lock enabled"),
        "{err}"
    );
    let strata = on_moto(
        "objlock-mode",
        &moto,
        "nolock",
        "object_lock = \"forever\"\nobject_lock_days = 30\n",
    );
    let err = strata.fails(&["backup", "list", "x"]);
    assert!(err.contains("\"governance\" or \"compliance\""), "{err}");

    let strata = on_moto("asof-flat", &moto, "flat", "");
    let target = strata.dir.join("restore");
    let err = strata.fails(&[
        "restore",
        "x",
        "--target-dir",
        target.to_str().unwrap(),
        "--immediate",
        "--repo-as-of",
        "2026-01-01T00:00:00Z",
    ]);
    assert!(err.contains("needs a versioned bucket"), "{err}");
}
