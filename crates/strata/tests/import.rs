//! `strata import basebackup`: the output of `pg_basebackup -Ft` taken
//! outside Strata (plain with `-X fetch`, gzip with `-X stream`, zstd
//! without a manifest, a tablespace in each) becomes a
//! backup set that restores, on its own, to the data the source had when
//! the backup was taken. Directories that are not what they claim (a member
//! name leaving the data directory, a link leading out, a truncated archive,
//! no base.tar, another cluster's backup) are refused with nothing stored.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{path_str, signed_call_status, state_digest, wait_for, Server, Strata};
use testkit::Cluster;

const DB: &str = "postgres";

/// `pg_basebackup -Ft` of `pg` with `extra` arguments into a new directory.
fn basebackup(pg: &Cluster, extra: &[&str]) -> PathBuf {
    let dir = testkit::temp_dir("strata-import-");
    let target = dir.join("out");
    let status = Command::new("chown")
        .args(["postgres:postgres", &path_str(&dir)])
        .status()
        .unwrap();
    assert!(status.success());
    let own = pg.bin_dir().join("pg_basebackup");
    let tool = if own.exists() {
        own
    } else {
        PathBuf::from("/usr/lib/postgresql/15/bin/pg_basebackup")
    };
    let mut cmd = Command::new(tool);
    cmd.args([
        "-h",
        pg.host(),
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
    ])
    .args(["-Ft", "-c", "fast", "--no-sync", "-D", &path_str(&target)])
    .args(extra);
    testkit::run_as_postgres(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target
}

/// Imports `dir` into `id`; returns the backup set id.
fn import(strata: &Strata, id: &str, dir: &Path) -> String {
    let out = strata.ok(&["import", "basebackup", "--instance", id, &path_str(dir)]);
    out.lines().last().unwrap().trim().to_string()
}

/// Files of the repository that hold data: packs and WAL.
fn stored(strata: &Strata) -> Vec<String> {
    common::files_under(&strata.repo_dir())
        .into_iter()
        .map(|p| path_str(&p))
        .filter(|p| p.contains("/packs/") || p.contains("/wal/") || p.ends_with(".manifest"))
        .collect()
}

#[test]
fn imported_basebackups_restore_to_the_data_at_backup_time() {
    let digest = |c: &Cluster| {
        let far = c.psql(
            DB,
            "SELECT count(*) || ':' || md5(string_agg(note, ',' ORDER BY id)) FROM far",
        );
        format!("{}|{far}", state_digest(c, DB))
    };
    let strata = Strata::new("import");
    let pg = Cluster::start_default(15);
    pg.pgbench(DB, &["-i", "-q", "-s", "1"]);
    pg.psql(
        DB,
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
         INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 500) g",
    );
    // A tablespace: its own archive, placed through tablespace_map.
    let ts_dir = testkit::temp_dir("strata-import-ts-");
    let status = Command::new("chown")
        .args(["postgres:postgres", &path_str(&ts_dir)])
        .status()
        .unwrap();
    assert!(status.success());
    pg.psql(
        DB,
        &format!("CREATE TABLESPACE spare LOCATION '{}'", path_str(&ts_dir)),
    );
    pg.psql(
        DB,
        "CREATE TABLE far (id int, note text) TABLESPACE spare; \
         INSERT INTO far SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
    );
    let id = "imported";
    strata.add_instance(id, &pg);

    let plain = basebackup(&pg, &["-X", "fetch"]);
    assert!(plain.join("base.tar").is_file() && plain.join("backup_manifest").is_file());
    let ts_oid = pg.psql(DB, "SELECT oid FROM pg_tablespace WHERE spcname = 'spare'");
    assert!(plain.join(format!("{ts_oid}.tar")).is_file());
    let at_plain = digest(&pg);
    pg.psql(
        DB,
        "UPDATE pgbench_accounts SET abalance = abalance + 3 WHERE aid <= 300; \
         INSERT INTO ledger VALUES (1000, 'between the backups'); \
         DELETE FROM far WHERE id <= 100",
    );
    let gzip = basebackup(&pg, &["-X", "stream", "-z"]);
    assert!(gzip.join("base.tar.gz").is_file() && gzip.join("pg_wal.tar.gz").is_file());
    let at_gzip = digest(&pg);
    assert_ne!(at_plain, at_gzip);
    pg.psql(
        DB,
        "INSERT INTO ledger VALUES (1500, 'before the zstd backup')",
    );
    // zstd, and no manifest: the end position comes from the WAL.
    let zstd = basebackup(&pg, &["-X", "fetch", "--compress=zstd", "--no-manifest"]);
    assert!(zstd.join("base.tar.zst").is_file() && !zstd.join("backup_manifest").exists());
    let at_zstd = digest(&pg);
    pg.psql(DB, "INSERT INTO ledger VALUES (2000, 'after every backup')");

    let first = import(&strata, id, &plain);
    let second = import(&strata, id, &gzip);
    let third = import(&strata, id, &zstd);
    // The same backup without its manifest ends where the manifest says.
    let bare = testkit::temp_dir("strata-import-bare-");
    for entry in std::fs::read_dir(&plain).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "backup_manifest" {
            std::fs::copy(entry.path(), bare.join(entry.file_name())).unwrap();
        }
    }
    let fourth = import(&strata, id, &bare);
    let sets = strata.backups(id);
    assert_eq!(sets.len(), 4, "{sets:?}");
    let row = |set: &str| sets.iter().find(|s| s["id"] == set).unwrap().clone();
    assert_eq!(row(&first)["stop_lsn"], row(&fourth)["stop_lsn"]);
    assert_eq!(row(&first)["start_lsn"], row(&fourth)["start_lsn"]);
    assert!(row(&fourth)["stop_lsn"].is_string(), "{}", row(&fourth));
    let _ = std::fs::remove_dir_all(bare);
    assert!(sets.iter().all(|s| s["status"] == "Success"), "{sets:?}");
    // The second import stores little: most blocks are the first's.
    let second_row = sets.iter().find(|s| s["id"] == second.as_str()).unwrap();
    assert!(
        second_row["dedup_bytes"].as_u64().unwrap() > second_row["new_bytes"].as_u64().unwrap(),
        "{second_row}"
    );

    // Every object the imports wrote reads back and checks out.
    strata.ok(&["repo", "verify"]);

    // The source is gone: each set restores from the repository alone.
    drop(pg);
    for (set, expected, name) in [
        (&first, &at_plain, "plain"),
        (&second, &at_gzip, "gzip"),
        (&third, &at_zstd, "zstd"),
    ] {
        let restored = strata.restore_and_start(id, name, 15, &["--backup", set, "--immediate"]);
        assert_eq!(&digest(&restored), expected, "{name}");
    }
    let _ = std::fs::remove_dir_all(ts_dir);
}

/// A ustar member written byte for byte (names a `tar` tool would refuse).
fn member(name: &str, typeflag: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000600\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h;
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A copy of `source` (a pg_basebackup -Ft directory) whose base.tar is `base`.
fn with_base(source: &Path, base: Vec<u8>) -> PathBuf {
    let dir = testkit::temp_dir("strata-import-hostile-");
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.join("base.tar"), base).unwrap();
    dir
}

/// `base.tar` without its end-of-archive blocks.
fn members_of(base: &[u8]) -> Vec<u8> {
    let mut end = base.len();
    while end >= 512 && base[end - 512..end].iter().all(|&b| b == 0) {
        end -= 512;
    }
    base[..end].to_vec()
}

#[test]
fn hostile_or_foreign_directories_are_refused_with_nothing_stored() {
    let strata = Strata::new("import-hostile");
    let pg = Cluster::start_default(15);
    pg.psql(
        DB,
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g",
    );
    let id = "target";
    strata.add_instance(id, &pg);
    let source = basebackup(&pg, &["-X", "fetch"]);
    let base = std::fs::read(source.join("base.tar")).unwrap();
    let members = members_of(&base);
    let trailer = vec![0u8; 1024];

    let hostile = |extra: Vec<u8>| [members.clone(), extra, trailer.clone()].concat();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "a name climbing out",
            with_base(&source, hostile(member("../escaped", b'0', "", b"x"))),
            "\"../escaped\"",
        ),
        (
            "a name inside that climbs out",
            with_base(
                &source,
                hostile(member("base/../../escaped", b'0', "", b"x")),
            ),
            "\"base/../../escaped\"",
        ),
        (
            "an absolute name",
            with_base(&source, hostile(member("/tmp/escaped", b'0', "", b"x"))),
            "\"/tmp/escaped\"",
        ),
        (
            "a link leading out",
            with_base(&source, hostile(member("base/evil", b'2', "/etc", b""))),
            "\"base/evil\"",
        ),
        (
            "a truncated archive",
            with_base(&source, base[..base.len() / 2].to_vec()),
            "truncated",
        ),
        (
            "an archive without its end",
            with_base(&source, members.clone()),
            "truncated",
        ),
    ];
    for (what, dir, why) in &cases {
        let err = strata.fails(&["import", "basebackup", "--instance", id, &path_str(dir)]);
        assert!(err.contains(why), "{what}: {err}");
        assert!(strata.backups(id).is_empty(), "{what}");
        assert_eq!(stored(&strata), Vec::<String>::new(), "{what}");
        let tasks: Vec<serde_json::Value> =
            serde_json::from_str(&strata.ok(&["task", "list", id, "--json"])).unwrap();
        assert!(tasks.is_empty(), "{what}: {tasks:?}");
    }

    // No base.tar at all.
    let no_base = with_base(&source, Vec::new());
    std::fs::remove_file(no_base.join("base.tar")).unwrap();
    let err = strata.fails(&[
        "import",
        "basebackup",
        "--instance",
        id,
        &path_str(&no_base),
    ]);
    assert!(err.contains("has no base.tar"), "{err}");

    // Another cluster's backup, once Strata knows the instance's cluster.
    let other = testkit::shared_cluster(15);
    strata.add_instance("other", other);
    strata.backup("other");
    let before = stored(&strata);
    let err = strata.fails(&[
        "import",
        "basebackup",
        "--instance",
        "other",
        &path_str(&source),
    ]);
    assert!(err.contains("system identifier"), "{err}");
    assert_eq!(strata.backups("other").len(), 1);
    assert_eq!(stored(&strata), before);

    // The untouched directory imports.
    import(&strata, id, &source);
    assert_eq!(strata.backups(id).len(), 1);
    let tasks: Vec<serde_json::Value> =
        serde_json::from_str(&strata.ok(&["task", "list", id, "--json"])).unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    for (_, dir, _) in cases {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(no_base);
}

#[test]
fn the_api_imports_only_names_in_the_import_directory() {
    let import_dir = testkit::temp_dir("strata-import-dir-");
    let strata = Strata::with_config(
        "import-api",
        "",
        &format!("[import]\ndir = {:?}\n", path_str(&import_dir)),
    );
    let pg = testkit::shared_cluster(15);
    let id = "apiimport";
    strata.add_instance(id, pg);
    let out = basebackup(pg, &["-X", "fetch"]);
    std::fs::rename(&out, import_dir.join("nightly-1")).unwrap();
    // A directory in place whose base.tar names a file outside.
    let base = std::fs::read(import_dir.join("nightly-1/base.tar")).unwrap();
    let hostile = [
        members_of(&base),
        member("../../outside", b'0', "", b"x"),
        vec![0u8; 1024],
    ]
    .concat();
    let planted = with_base(&import_dir.join("nightly-1"), hostile);
    std::fs::rename(&planted, import_dir.join("planted")).unwrap();
    std::os::unix::fs::symlink(import_dir.join("nightly-1"), import_dir.join("link")).unwrap();

    let server = Server::start(&strata, &[]);
    // The service takes the instance's first backup on its own; imports
    // wait for it (one backup of an instance at a time).
    let manual = || -> Vec<serde_json::Value> {
        strata
            .backups(id)
            .into_iter()
            .filter(|s| s["mode"] == "Manual")
            .collect()
    };
    wait_for("the service's first backup", 120, || {
        let sets = strata.backups(id);
        !sets.is_empty() && sets.iter().all(|s| s["status"] != "Running")
    });
    let call = |file: &str| {
        signed_call_status(
            &strata,
            server.port,
            &[
                ("Action", "StrataImportBackupFile"),
                ("DBInstanceId", id),
                ("BackupFile", file),
            ],
        )
    };
    for (file, code) in [
        ("../nightly-1", "InvalidBackupFile.Malformed"),
        (
            &path_str(&import_dir.join("nightly-1")),
            "InvalidBackupFile.Malformed",
        ),
        ("link", "InvalidBackupFile.Malformed"),
        ("absent", "InvalidBackupFile.NotFound"),
        ("planted", "InvalidParameter"),
    ] {
        let (status, answer) = call(file);
        assert!(status.contains("400"), "{file}: {status} {answer}");
        assert_eq!(answer["Code"], code, "{file}: {answer}");
    }
    assert_eq!(manual(), Vec::<serde_json::Value>::new());

    let (status, answer) = call("nightly-1");
    assert!(status.contains("200"), "{status} {answer}");
    let backup = answer["BackupId"].as_str().unwrap().to_string();
    assert!(!backup.is_empty() && !answer["BackupJobId"].as_str().unwrap().is_empty());
    wait_for("the import to finish", 120, || {
        manual()
            .iter()
            .any(|s| s["id"] == backup.as_str() && s["status"] != "Running")
    });
    let sets = manual();
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0]["status"], "Success", "{sets:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(import_dir);
}
