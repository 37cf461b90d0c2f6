//! Incremental storage, crashes and corruption: a second backup of an
//! unchanged database stores almost nothing; `kill -9` mid-backup records no
//! success and leaves a verifiable repository; a flipped byte in a pack, a
//! manifest or a WAL object is caught by `repo verify` and by restore; a
//! server that stops sending (its process stopped, its connection open) is
//! given up by the WAL receiver and fails a backup instead of holding them.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{wait_for, Strata};
use std::time::Instant;
use testkit::Cluster;

fn files_under(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn flip_byte(path: &Path, at_fraction: f64) -> Vec<u8> {
    let original = std::fs::read(path).unwrap();
    let mut bytes = original.clone();
    let i = ((bytes.len() as f64) * at_fraction) as usize;
    bytes[i] ^= 0x20;
    std::fs::write(path, &bytes).unwrap();
    original
}

#[test]
fn unchanged_database_second_backup_stores_under_one_percent() {
    let pg = Cluster::start_default(15);
    pg.pgbench("postgres", &["-i", "-q", "-s", "3"]);
    // Settled: the catalogs' hint bits set (a backup reads the catalogs
    // for its list of tables, which would set them between the two).
    pg.psql("postgres", "VACUUM");
    pg.psql("postgres", "CHECKPOINT");
    let strata = Strata::new("dedup");
    strata.add_instance("dedup", &pg);
    strata.backup("dedup");
    strata.backup("dedup");
    let sets = strata.backups("dedup");
    let first = sets[0]["stored_bytes"].as_u64().unwrap();
    let second = sets[1]["stored_bytes"].as_u64().unwrap();
    let total = sets[1]["total_bytes"].as_u64().unwrap();
    assert!(first > 1_000_000, "first backup stored only {first} bytes");
    assert!(
        second * 100 < first,
        "second backup stored {second} bytes, not under 1% of the first's {first}"
    );
    assert!(sets[1]["dedup_bytes"].as_u64().unwrap() * 100 > total * 99);
    for set in &sets {
        assert_eq!(
            set["new_bytes"].as_u64().unwrap() + set["dedup_bytes"].as_u64().unwrap(),
            set["total_bytes"].as_u64().unwrap(),
            "new and deduplicated bytes must add up to the backup's size: {set}"
        );
    }
}

#[test]
fn kill9_mid_backup_then_next_backup_and_verify_and_corruption() {
    let pg = Cluster::start_default(15);
    pg.pgbench("postgres", &["-i", "-q", "-s", "3"]);
    // A short lease: the killed backup's job is taken over soon after.
    let strata = Strata::with_config("crash", "", "[jobs]\nlease_secs = 2\n");
    strata.add_instance("crash", &pg);

    // A throttled backup, killed while it streams.
    let mut child = strata
        .command(&["backup", "create", "crash", "--max-rate", "4096"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the backup to start streaming", 60, || {
        strata
            .backups("crash")
            .first()
            .is_some_and(|b| b["status"] == "Running" && !b["start_lsn"].is_null())
    });
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let repo = strata.repo_dir();
    // Listing takes over jobs whose owner stopped renewing its lease.
    wait_for("the killed backup to be failed", 30, || {
        strata.backups("crash")[0]["status"] != "Running"
    });
    let sets = strata.backups("crash");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["status"], "Failed", "{sets:?}");
    assert!(sets[0]["error"]
        .as_str()
        .unwrap()
        .contains("stopped renewing its lease"));
    assert!(
        files_under(&repo, ".manifest").is_empty(),
        "a killed backup committed a manifest"
    );

    let id = strata.backup("crash");
    let sets = strata.backups("crash");
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[1]["id"], id.as_str());
    assert_eq!(sets[1]["status"], "Success");
    let report: serde_json::Value =
        serde_json::from_str(&strata.ok(&["repo", "verify", "--json"])).unwrap();
    assert!(
        report["problems"].as_array().unwrap().is_empty(),
        "{report}"
    );
    assert!(report["blocks_checked"].as_u64().unwrap() > 0);

    // WAL to corrupt as well.
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT 1 AS x; SELECT pg_switch_wal()",
    );
    let mut receiver = strata.wal_receiver("crash");
    wait_for("a complete WAL segment", 60, || {
        strata
            .wal("crash")
            .iter()
            .filter(|w| w["partial"] == false)
            .count()
            >= 2
    });
    receiver.stop();

    let pack = files_under(&repo.join("packs"), ".pack")
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let manifest = files_under(&repo, ".manifest").pop().unwrap();
    let wal = files_under(&repo.join("instances/crash/wal"), "")
        .into_iter()
        .find(|p| !p.to_string_lossy().ends_with(".partial"))
        .unwrap();
    for (object, fraction) in [(&pack, 0.5), (&manifest, 0.3), (&wal, 0.7)] {
        let original = flip_byte(object, fraction);
        let out = strata.run(&["repo", "verify"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "verify missed a flipped byte in {}",
            object.display()
        );
        let name = object.file_name().unwrap().to_string_lossy().to_string();
        let line = stdout
            .lines()
            .find(|l| l.starts_with("PROBLEM") && l.contains(&name))
            .unwrap_or_else(|| panic!("verify did not name {name}:\n{stdout}"));
        if object != &wal {
            assert!(
                line.contains(&id),
                "verify did not name backup {id}: {line}"
            );
        }
        {
            let target = strata.dir.join(format!("restore-corrupt-{name}"));
            let err = strata.fails(&[
                "restore",
                "crash",
                "--target-dir",
                &target.display().to_string(),
                "--backup",
                &id,
            ]);
            assert!(
                err.contains("corrupt") || err.contains("damaged"),
                "restore did not refuse the damaged repository: {err}"
            );
            assert!(
                !target.exists(),
                "a failed restore left {}",
                target.display()
            );
        }
        std::fs::write(object, original).unwrap();
    }
    strata.ok(&["repo", "verify"]);

    // The catalog can be rebuilt from the repository alone.
    std::fs::remove_file(strata.dir.join("data/catalog.db")).unwrap();
    let _ = std::fs::remove_file(strata.dir.join("data/catalog.db-wal"));
    let _ = std::fs::remove_file(strata.dir.join("data/catalog.db-shm"));
    strata.ok(&["repo", "reindex"]);
    let sets = strata.backups("crash");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["id"], id.as_str());
    assert!(strata.wal("crash").len() >= 2);
    let restored = strata.restore_and_start("crash", "after-reindex", 15, &[]);
    assert_eq!(restored.psql("postgres", "SELECT x FROM t"), "1");
    assert_eq!(
        restored.psql("postgres", "SELECT count(*) FROM pgbench_accounts"),
        "300000"
    );
}

/// A server process stopped with SIGSTOP (its connections stay open and
/// silent, as with a hung server) and continued when dropped.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        // SAFETY: signals to a PostgreSQL backend of the test's own cluster.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP {pid}"
        );
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The pid of the walsender that holds the cluster's (only) slot, if one does.
fn slot_holder(pg: &Cluster) -> Option<i32> {
    pg.psql(
        "postgres",
        "SELECT active_pid FROM pg_replication_slots WHERE active_pid IS NOT NULL",
    )
    .parse()
    .ok()
}

#[test]
fn a_server_that_stops_sending_is_given_up() {
    let pg = Cluster::start_default(15);
    pg.pgbench("postgres", &["-i", "-q", "-s", "2"]);
    let strata = Strata::new("silent");
    let config = std::fs::read_to_string(&strata.config).unwrap().replace(
        "[wal]\n",
        "[wal]\nreceiver_timeout_secs = 3\nretry_max_secs = 1\n",
    );
    std::fs::write(&strata.config, config).unwrap();
    strata.add_instance("silent", &pg);

    // An idle server that hears from Strata every second (the tests'
    // `status_interval_secs`) sends nothing of its own; asked after 1.5 s
    // of silence it answers at once, so the stream outlives two timeouts on
    // the same walsender.
    let mut receiver = strata.wal_receiver("silent");
    wait_for("the receiver to stream", 60, || slot_holder(&pg).is_some());
    let walsender = slot_holder(&pg).unwrap();
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(slot_holder(&pg), Some(walsender), "{}", receiver.stderr());
    assert!(
        !receiver.stderr().contains("sent nothing"),
        "{}",
        receiver.stderr()
    );

    // The walsender stops: the receiver gives its connection up, and once
    // the server works again streams on a new one.
    let stopped = Stopped::new(walsender);
    wait_for("the receiver to give up", 60, || {
        receiver
            .stderr()
            .contains("sent nothing on the WAL stream for")
    });
    drop(stopped);
    wait_for("a new walsender", 60, || {
        slot_holder(&pg).is_some_and(|pid| pid != walsender)
    });
    let switch: pg_wal::Lsn = pg
        .psql(
            "postgres",
            "CREATE TABLE after_the_stop AS SELECT 1 AS x; SELECT pg_switch_wal()",
        )
        .parse()
        .unwrap();
    wait_for("the segment written after the stop", 60, || {
        strata.wal("silent").iter().any(|w| {
            let end: pg_wal::Lsn = w["end_lsn"].as_str().unwrap().parse().unwrap();
            w["partial"] == false && end > switch
        })
    });
    let err = receiver.stop();
    assert!(err.contains("reconnecting"), "{err}");

    // A backup fails, and says why, when the server stops sending its WAL
    // (found at once, not after the last file) or its data.
    let temporary_slot_holder =
        "SELECT active_pid FROM pg_replication_slots WHERE temporary AND active_pid IS NOT NULL";
    for (stuck, why) in [
        (
            temporary_slot_holder,
            "the backup's WAL stream failed: the server sent nothing",
        ),
        (
            "SELECT pid FROM pg_stat_progress_basebackup",
            "instance silent: the server sent no backup data for 3 s",
        ),
    ] {
        // The last backup's server processes are gone.
        wait_for("no backup on the server", 60, || {
            pg.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_progress_basebackup",
            ) == "0"
                && pg.psql("postgres", temporary_slot_holder).is_empty()
        });
        let backup = strata
            .command(&["backup", "create", "silent", "--max-rate", "512"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut backup = KillOnDrop(backup);
        wait_for("the backup to stream", 60, || {
            pg.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_progress_basebackup \
                 WHERE phase = 'streaming database files'",
            ) == "1"
                && !pg.psql("postgres", temporary_slot_holder).is_empty()
        });
        let pid: i32 = pg.psql("postgres", stuck).parse().unwrap();
        let stopped = Stopped::new(pid);
        // Well before the throttled backup would end (about a minute).
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = backup.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the backup still runs ({why})");
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(stopped);
        let mut err = String::new();
        std::io::Read::read_to_string(&mut backup.0.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{err}");
        assert!(err.contains(why), "{err}");
        let sets = strata.backups("silent");
        let failed = sets.last().unwrap();
        assert_eq!(failed["status"], "Failed", "{sets:?}");
        assert!(failed["error"].as_str().unwrap().contains(why), "{sets:?}");
    }

    // The server works again, and so do backups.
    strata.backup("silent");
    let sets = strata.backups("silent");
    assert_eq!(sets.len(), 3);
    assert_eq!(sets[2]["status"], "Success");
}

/// A child process killed (and reaped) when dropped, so a failed assertion
/// leaves none behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
