//! `strata import pgbackrest`: a real pgBackRest stanza (a full backup
//! compressed with zstd, a full and an incremental one with gzip, a
//! tablespace, WAL archived by `archive-push`) becomes backup sets that restore, from the
//! repository alone, to each backup's consistency point and to the last
//! archived WAL. Repositories that are not what they claim (a manifest
//! name leaving the data directory, a file whose SHA-1 differs, another
//! cluster's stanza) are refused with nothing stored.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{path_str, wait_for, Strata};
use testkit::Cluster;

const DB: &str = "postgres";
const STANZA: &str = "main";

/// A pgBackRest configuration in `work` for the stanza of `pg`.
struct PgBackRest {
    config: PathBuf,
    repo: PathBuf,
}

impl PgBackRest {
    fn new(work: &Path) -> PgBackRest {
        let repo = work.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        let config = work.join("pgbackrest.conf");
        let me = PgBackRest { config, repo };
        me.configure(None);
        me
    }

    /// Writes the configuration; the stanza's section once `pg` runs.
    fn configure(&self, pg: Option<&Cluster>) {
        let work = self.config.parent().unwrap();
        let mut text = format!(
            "[global]\nrepo1-path={}\nlog-path={}\nlock-path={}\nlog-level-console=warn\n\
             log-level-file=off\nstart-fast=y\ncompress-type=zst\nrepo1-retention-full=9\n",
            path_str(&self.repo),
            path_str(work),
            path_str(work)
        );
        if let Some(pg) = pg {
            text.push_str(&format!(
                "\n[{STANZA}]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
                path_str(pg.data_dir()),
                pg.port(),
                path_str(pg.data_dir().parent().unwrap())
            ));
        }
        std::fs::write(&self.config, text).unwrap();
        chown(work);
    }

    fn archive_command(&self) -> String {
        format!(
            "archive_command = 'pgbackrest --config={} --stanza={STANZA} archive-push %p'",
            path_str(&self.config)
        )
    }

    fn run(&self, args: &[&str]) {
        let mut cmd = Command::new("pgbackrest");
        cmd.arg(format!("--config={}", path_str(&self.config)))
            .arg(format!("--stanza={STANZA}"))
            .args(args);
        testkit::run_as_postgres(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "pgbackrest {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn chown(dir: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres", &path_str(dir)])
        .status()
        .unwrap();
    assert!(status.success());
}

fn digest(c: &Cluster) -> String {
    c.psql(
        DB,
        "SELECT (SELECT count(*) || ':' || md5(string_agg(id || note, ',' ORDER BY id)) FROM ledger) \
         || '|' || (SELECT count(*) || ':' || coalesce(sum(g), 0) FROM later) \
         || '|' || (SELECT count(*) || ':' || md5(string_agg(note, ',' ORDER BY id)) FROM far)",
    )
}

/// Imports the stanza in `repo` into `id`; returns the backup set ids.
fn import(strata: &Strata, id: &str, repo: &Path) -> Vec<String> {
    let out = strata.ok(&[
        "import",
        "pgbackrest",
        "--instance",
        id,
        "--repo",
        &path_str(repo),
        "--stanza",
        STANZA,
    ]);
    out.lines()
        .filter_map(|l| l.strip_prefix("imported backup "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

fn refused(strata: &Strata, id: &str, repo: &Path) -> String {
    strata.fails(&[
        "import",
        "pgbackrest",
        "--instance",
        id,
        "--repo",
        &path_str(repo),
        "--stanza",
        STANZA,
    ])
}

/// Files of the repository that hold data: packs, WAL, manifests.
fn stored(strata: &Strata) -> Vec<String> {
    common::files_under(&strata.repo_dir())
        .into_iter()
        .map(|p| path_str(&p))
        .filter(|p| p.contains("/packs/") || p.contains("/wal/") || p.ends_with(".manifest"))
        .collect()
}

/// A copy of the pgBackRest repository `repo`.
fn copy_of(repo: &Path) -> PathBuf {
    let dir = testkit::temp_dir("strata-pgbr-hostile-");
    let status = Command::new("cp")
        .args(["-a", &format!("{}/.", path_str(repo)), &path_str(&dir)])
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

/// The labels of the stanza's backups, oldest first.
fn labels(repo: &Path) -> Vec<String> {
    let mut labels: Vec<String> = std::fs::read_dir(repo.join("backup").join(STANZA))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("20") && !n.contains('.'))
        .collect();
    labels.sort();
    labels
}

#[test]
fn a_pgbackrest_stanza_imports_with_its_history() {
    let work = testkit::temp_dir("strata-pgbr-");
    let pgbr = PgBackRest::new(&work);
    let pg = Cluster::builder(15)
        .conf("archive_mode = on")
        .conf(&pgbr.archive_command())
        .start();
    pgbr.configure(Some(&pg));
    pgbr.run(&["stanza-create"]);
    // A tablespace: pgBackRest stores it under pg_tblspc/<oid>.
    let ts_dir = testkit::temp_dir("strata-pgbr-ts-");
    pg.psql(
        DB,
        &format!("CREATE TABLESPACE spare LOCATION '{}'", path_str(&ts_dir)),
    );
    pg.psql(
        DB,
        "CREATE TABLE far (id int, note text) TABLESPACE spare; \
         INSERT INTO far SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
    );
    pg.psql(
        DB,
        "CREATE TABLE ledger (id int PRIMARY KEY, note text); \
         INSERT INTO ledger SELECT g, md5(g::text) FROM generate_series(1, 3000) g; \
         CREATE TABLE later (g int)",
    );
    pgbr.run(&["backup", "--type=full"]);
    let at_first = digest(&pg);
    pg.psql(
        DB,
        "UPDATE ledger SET note = 'changed' WHERE id <= 500; \
         INSERT INTO later SELECT g FROM generate_series(1, 1000) g",
    );
    pgbr.run(&["backup", "--type=full", "--compress-type=gz"]);
    let at_second = digest(&pg);
    let after_second = pg.psql(
        DB,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    pg.psql(
        DB,
        "DELETE FROM ledger WHERE id > 2500; DELETE FROM far WHERE id <= 100",
    );
    pgbr.run(&["backup", "--type=incr", "--compress-type=gz"]);
    let at_third = digest(&pg);
    pg.psql(
        DB,
        "INSERT INTO ledger VALUES (9000, 'after every backup'); \
         UPDATE later SET g = -g WHERE g <= 10",
    );
    let last = pg.psql(DB, "SELECT pg_walfile_name(pg_current_wal_lsn())");
    pg.psql(DB, "SELECT pg_switch_wal()");
    wait_for("the last segment archived", 60, || {
        pg.psql(
            DB,
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        ) >= last
    });
    let at_end = digest(&pg);
    let points = [&at_first, &at_second, &at_third, &at_end];
    for (i, a) in points.iter().enumerate() {
        assert!(points[i + 1..].iter().all(|b| b != a), "{points:?}");
    }
    let repo = pgbr.repo.clone();
    let backups = labels(&repo);
    assert_eq!(backups.len(), 3, "{backups:?}");
    assert!(backups[2].ends_with('I'), "{backups:?}");
    let option = |label: &str| {
        let path = repo
            .join("backup")
            .join(STANZA)
            .join(label)
            .join("backup.manifest");
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("option-compress-type="))
            .unwrap()
            .to_string()
    };
    assert_eq!(option(&backups[0]), "\"zst\"");
    let first_manifest = std::fs::read_to_string(
        repo.join("backup")
            .join(STANZA)
            .join(&backups[0])
            .join("backup.manifest"),
    )
    .unwrap();
    assert!(first_manifest.contains("\npg_tblspc/"), "no tablespace");
    assert_eq!(option(&backups[1]), "\"gz\"");

    let strata = Strata::new("import-pgbackrest");
    let id = "imported";
    strata.add_instance(id, &pg);

    // A name in a manifest that climbs out of the data directory.
    let climbing = copy_of(&repo);
    let manifest = climbing
        .join("backup")
        .join(STANZA)
        .join(&backups[0])
        .join("backup.manifest");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replace(
        "[target:file]\n",
        "[target:file]\npg_data/../../escaped={\"checksum\":\"da39a3ee5e6b4b0d3255bfef95601890afd80709\",\"size\":1,\"timestamp\":1}\n",
    );
    std::fs::write(&manifest, text).unwrap();
    // A file of the first backup swapped for another of the same size.
    let swapped = copy_of(&repo);
    let data = swapped
        .join("backup")
        .join(STANZA)
        .join(&backups[0])
        .join("pg_data");
    // Two files of 8192 bytes with different contents, from the manifest.
    let text = std::fs::read_to_string(data.parent().unwrap().join("backup.manifest")).unwrap();
    let mut same_size: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| l.contains("\"size\":8192,"))
        .filter_map(|l| {
            let (name, value) = l.split_once('=')?;
            let sum = value.split("\"checksum\":\"").nth(1)?.get(..40)?;
            Some((name.strip_prefix("pg_data/")?, sum))
        })
        .collect();
    same_size.dedup_by(|a, b| a.1 == b.1);
    let (from, onto) = (same_size[0].0, same_size[1].0);
    std::fs::copy(
        data.join(format!("{from}.zst")),
        data.join(format!("{onto}.zst")),
    )
    .unwrap();
    let why_swapped = "SHA-1";
    // The WAL segment the second backup starts in, gone.
    let no_wal = copy_of(&repo);
    let second_manifest = std::fs::read_to_string(
        repo.join("backup")
            .join(STANZA)
            .join(&backups[1])
            .join("backup.manifest"),
    )
    .unwrap();
    let start_segment = second_manifest
        .lines()
        .find_map(|l| l.strip_prefix("backup-archive-start=\""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let segment_dir = no_wal
        .join("archive")
        .join(STANZA)
        .join("15-1")
        .join(&start_segment[..16]);
    for entry in std::fs::read_dir(&segment_dir).unwrap() {
        let path = entry.unwrap().path();
        if path_str(&path).contains(&format!("/{start_segment}-")) {
            std::fs::remove_file(path).unwrap();
        }
    }
    for (what, dir, why) in [
        (
            "a manifest name climbing out",
            &climbing,
            "\"pg_data/../../escaped\"",
        ),
        ("a file that is not the manifest's", &swapped, why_swapped),
        ("a backup without its WAL", &no_wal, start_segment.as_str()),
    ] {
        let err = refused(&strata, id, dir);
        assert!(err.contains(why), "{what}: {err}");
        assert!(strata.backups(id).is_empty(), "{what}");
        assert_eq!(stored(&strata), Vec::<String>::new(), "{what}");
        let tasks: Vec<serde_json::Value> =
            serde_json::from_str(&strata.ok(&["task", "list", id, "--json"])).unwrap();
        assert!(tasks.is_empty(), "{what}: {tasks:?}");
    }
    // Another cluster's stanza.
    let other = testkit::shared_cluster(15);
    strata.add_instance("other", other);
    strata.backup("other");
    let before = stored(&strata);
    let err = refused(&strata, "other", &repo);
    assert!(err.contains("system identifier"), "{err}");
    assert_eq!(strata.backups("other").len(), 1);
    assert_eq!(stored(&strata), before);
    for dir in [climbing, swapped, no_wal] {
        let _ = std::fs::remove_dir_all(dir);
    }

    let sets = import(&strata, id, &repo);
    assert_eq!(sets.len(), 3, "{sets:?}");
    let rows = strata.backups(id);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|s| s["status"] == "Success"), "{rows:?}");
    strata.ok(&["repo", "verify"]);

    // The source is gone: the repository alone restores every point.
    drop(pg);
    for (set, expected, name) in [
        (&sets[0], &at_first, "first"),
        (&sets[1], &at_second, "second"),
        (&sets[2], &at_third, "third"),
    ] {
        let restored = strata.restore_and_start(id, name, 15, &["--backup", set, "--immediate"]);
        assert_eq!(&digest(&restored), expected, "{name}");
    }
    // A time between the second backup and the third: the set is picked
    // by when pgBackRest says its backup ended.
    let restored = strata.restore_and_start(id, "time", 15, &["--time", &after_second]);
    assert_eq!(digest(&restored), at_second);
    // From the first backup through every segment archived since.
    let restored = strata.restore_and_start(id, "latest", 15, &["--backup", &sets[0]]);
    assert_eq!(digest(&restored), at_end);
    let _ = std::fs::remove_dir_all(work);
    let _ = std::fs::remove_dir_all(ts_dir);
}
