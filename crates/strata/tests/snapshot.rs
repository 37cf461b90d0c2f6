//! Snapshot backups as an operator runs them, every part a separate process: a PostgreSQL 15
//! cluster on a loop-mounted XFS (`reflink=1`), `strata agent` serving its data directory, and
//! the `strata` CLI registering the instance with `--agent`, taking snapshots
//! (`backup create --snapshot`), uploading one (`backup upload`) and restoring by time from it
//! and the archived WAL. Also what an operator meets when something is wrong: a wrong key, an
//! agent serving another cluster or a data directory on ext4 (refused at registration), and an
//! agent killed before or during a snapshot (the set `Failed`, backup mode ended on the server,
//! the next snapshot fine).
//!
//! Each test has its own file system, cluster and agent (one of them kills its agent).
//! Timings are printed (`--nocapture`), never asserted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::{cluster_on, fake_data_dir, AgentProcess};
use common::{add_args, signed_call, state_digest, under_load_with_ddl, wait_for, Strata};
use testkit::{Cluster, FsKind, LoopFs};

/// The `Uid:` (real, effective, saved, file system) or `Gid:` line of /proc/PID/status.
fn ids_of(pid: u32, line: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = status
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap_or_else(|| panic!("no {line} line in {status}"));
    ids.split_whitespace().map(|n| n.parse().unwrap()).collect()
}

#[test]
fn an_agent_started_as_root_runs_as_the_data_directorys_owner_and_refuses_a_root_owned_one() {
    use std::os::unix::fs::MetadataExt;
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 300, true) else {
        return;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the agent is started as root here");
        return;
    }
    let data = fake_data_dir(&fs.path().join("owned"));
    let owner = std::fs::metadata(&data).unwrap();
    assert_ne!(owner.uid(), 0);
    // Clones in a directory two levels below what exists: every level made for the owner.
    let nested = fs.path().join("owned/deeper/clones");
    let nested_arg = nested.display().to_string();
    let agent =
        AgentProcess::start_with(&data, testkit::free_port(), &["--clone-dir", &nested_arg]);
    assert_eq!(ids_of(agent.pid(), "Uid:"), vec![owner.uid(); 4]);
    assert_eq!(ids_of(agent.pid(), "Gid:"), vec![owner.gid(); 4]);
    let groups = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert!(
        groups.lines().any(|l| l.trim_end() == "Groups:"),
        "{groups}"
    );
    // What it made, it made as the owner: the directories root created for it, and the key.
    let deeper = fs.path().join("owned/deeper");
    for made in [agent.snapshot_dir(), deeper, nested, agent.key_file()] {
        let meta = std::fs::symlink_metadata(&made).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (owner.uid(), owner.gid()),
            "{}",
            made.display()
        );
    }
    assert_eq!(
        std::fs::metadata(agent.snapshot_dir()).unwrap().mode() & 0o7777,
        0o700
    );

    // A data directory owned by root: refused with the reason, nothing created beside it.
    let root_owned = fake_data_dir(&fs.path().join("rooted"));
    let ok = Command::new("chown")
        .args(["-R", "root:root"])
        .arg(fs.path().join("rooted"))
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["agent", "--data-dir"])
        .arg(&root_owned)
        .args(["--listen", &format!("127.0.0.1:{}", testkit::free_port())])
        .env_remove("STRATA_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "data directory {} is owned by root; PostgreSQL never runs as root",
            root_owned.display()
        )),
        "{stderr}"
    );
    let mut beside: Vec<String> = std::fs::read_dir(fs.path().join("rooted"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["data"]);
}

/// `instance add ID` for `pg` with `--agent URL --agent-key-file KEY`.
fn add_with_agent(
    strata: &Strata,
    id: &str,
    pg: &Cluster,
    url: &str,
    key: &Path,
) -> std::process::Output {
    let port = pg.port().to_string();
    let key = key.display().to_string();
    let mut args = add_args(id, &port, "postgres");
    args.extend_from_slice(&["--agent", url, "--agent-key-file", &key]);
    strata.run(&args)
}

fn instance_ids(strata: &Strata) -> Vec<String> {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&strata.ok(&["instance", "list", "--json"])).unwrap();
    list.iter()
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Strata's sessions on `pg` (it connects with application_name `strata`).
fn strata_sessions(pg: &Cluster) -> String {
    pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'strata' AND backend_type = 'client backend'",
    )
}

/// `backup create ID --snapshot`: the backup id and the wall time.
fn snapshot(strata: &Strata, id: &str) -> (String, Duration) {
    let started = Instant::now();
    let out = strata.ok(&["backup", "create", id, "--snapshot"]);
    let took = started.elapsed();
    let backup = out
        .lines()
        .last()
        .expect("backup id line")
        .trim()
        .to_string();
    (backup, took)
}

fn utc_now(pg: &Cluster) -> String {
    pg.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
}

#[test]
fn snapshot_backups_register_with_the_agent_and_restore_by_time() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let pg = cluster_on(&fs);
    let db = "postgres";
    let agent = AgentProcess::start(pg.data_dir(), testkit::free_port());
    let strata = Strata::new("snapshot");

    // A key that is not the agent's: refused, nothing registered.
    let wrong_key = strata.dir.join("wrong.key");
    std::fs::write(&wrong_key, format!("{}\n", "ab".repeat(32))).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrong_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = add_with_agent(&strata, "snap-wrong", &pg, &agent.url(), &wrong_key);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("agent at {} refused the credential", agent.url())),
        "{stderr}"
    );

    // An agent serving another cluster: refused by system identifier.
    let other_root = fs.path().join("other");
    let other_data = fake_data_dir(&other_root);
    let other = AgentProcess::start(&other_data, testkit::free_port());
    let out = add_with_agent(&strata, "snap-other", &pg, &other.url(), &other.key_file());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "the agent at {} serves the cluster with system identifier 42, not instance snap-other's",
            other.url()
        )),
        "{stderr}"
    );

    // The same agent once its data directory is on ext4 (mounted over it): refused with the
    // one line naming the file system and what is needed.
    if let Some(ext4) = LoopFs::or_skip(FsKind::Ext4, 64, true) {
        let ext4_data = fake_data_dir(&ext4.path().join("pg"));
        let bind = Command::new("mount")
            .arg("--bind")
            .arg(&ext4_data)
            .arg(&other_data)
            .status()
            .unwrap();
        assert!(bind.success());
        let out = add_with_agent(&strata, "snap-ext4", &pg, &other.url(), &other.key_file());
        let _ = Command::new("umount").arg(&other_data).status();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(
            stderr.trim_end(),
            format!(
                "error: data directory {} is on ext4, which cannot clone files; snapshots need a file system with reflink (XFS made with -m reflink=1, or btrfs)",
                other_data.display()
            )
        );
    }
    drop(other);
    assert!(
        instance_ids(&strata).is_empty(),
        "{:?}",
        instance_ids(&strata)
    );

    // The right agent and key: registered, the file system named.
    let out = add_with_agent(&strata, "snap", &pg, &agent.url(), &agent.key_file());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "agent at {}: data directory {} on xfs",
            agent.url(),
            pg.data_dir().display()
        )),
        "{stdout}"
    );
    assert_eq!(instance_ids(&strata), ["snap"]);
    let mut receiver = strata.wal_receiver("snap");

    // A snapshot under a light write load with DDL: tables created and rows inserted while
    // the backup runs.
    let ((backup, took), _) = under_load_with_ddl(
        &pg,
        db,
        1,
        |i| {
            format!(
                "CREATE TABLE ddl_{i} AS SELECT g AS x, md5(g::text) AS y FROM generate_series(1, 2000) g; \
                 INSERT INTO ddl_{i} SELECT g, 'more' FROM generate_series(1, 100) g; \
                 DROP TABLE IF EXISTS ddl_{}",
                i - 1
            )
        },
        || snapshot(&strata, "snap"),
    );
    println!("snapshot wall time under load: {:.2} s", took.as_secs_f64());

    let sets = strata.backups("snap");
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0]["id"], backup.as_str());
    assert_eq!(sets[0]["status"], "Success");
    assert_eq!(sets[0]["method"], "Snapshot");
    assert_eq!(sets[0]["snapshot_local"], true);
    assert_eq!(sets[0]["snapshot_uploaded"], false);
    let listed = strata.ok(&["backup", "list", "snap"]);
    assert!(
        listed.lines().next().unwrap().contains("METHOD"),
        "{listed}"
    );
    let row = listed
        .lines()
        .find(|l| l.starts_with(&backup))
        .unwrap_or_else(|| panic!("{backup} not listed:\n{listed}"));
    assert!(row.contains("Success") && row.contains("Snapshot"), "{row}");
    assert!(
        listed.contains("snapshot: on the database host yes, in the repository no"),
        "{listed}"
    );
    // The snapshot on the agent's side, with the label pg_backup_stop returned.
    let snap_dir = agent.snapshot_dir().join(&backup);
    let label = std::fs::read_to_string(snap_dir.join("backup_label")).unwrap();
    assert!(
        label.contains(&format!("LABEL: strata snapshot {backup}")),
        "{label}"
    );
    assert!(snap_dir.join("global/pg_control").is_file());
    assert!(snap_dir.join("PG_VERSION").is_file());

    // Two committed phases after the snapshot, the time between them.
    pg.psql(db, "INSERT INTO ledger VALUES (1, 'after the snapshot')");
    pg.pgbench(db, &["-n", "-c", "1", "-t", "50"]);
    std::thread::sleep(Duration::from_millis(300));
    let t1 = utc_now(&pg);
    let d1 = state_digest(&pg, db);
    std::thread::sleep(Duration::from_millis(300));
    pg.psql(db, "INSERT INTO ledger VALUES (2, 'later')");
    pg.pgbench(db, &["-n", "-c", "1", "-t", "50"]);
    assert_ne!(state_digest(&pg, db), d1);
    let end_lsn: pg_wal::Lsn = pg
        .psql(db, "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    wait_for("WAL archived past the second phase", 60, || {
        strata.wal("snap").iter().any(|w| {
            w["end_lsn"]
                .as_str()
                .and_then(|l| l.parse::<pg_wal::Lsn>().ok())
                .is_some_and(|l| l >= end_lsn)
        })
    });
    receiver.stop();

    // Uploaded into the repository, then restored by time from it and the archived WAL.
    let started = Instant::now();
    let out = strata.ok(&["backup", "upload", "snap", &backup]);
    println!(
        "snapshot upload: {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        out.lines().next().unwrap_or_default()
    );
    assert!(out.contains("uploaded") && out.contains("read "), "{out}");
    let sets = strata.backups("snap");
    assert_eq!(sets[0]["snapshot_uploaded"], true, "{sets:?}");
    assert!(strata
        .ok(&["backup", "list", "snap"])
        .contains("snapshot: on the database host yes, in the repository yes"));
    let restored = strata.restore_and_start("snap", "time", 15, &["--time", &t1]);
    assert_eq!(
        state_digest(&restored, db),
        d1,
        "restore to {t1} does not match the rows committed then"
    );
    assert_eq!(
        restored.psql(
            db,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger"
        ),
        "1"
    );
}

/// The `.partial-<name>` directory of a snapshot the agent is making, if any.
fn partial_snapshot(snapshot_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(snapshot_dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
        .map(|e| e.path())
}

/// Asserts the newest set of `id` is `Failed` naming the agent as unreachable, and that no
/// session of Strata is left on the server (so none holds backup mode).
fn assert_failed_unreachable(strata: &Strata, pg: &Cluster, id: &str, stderr: &str, url: &str) {
    let unreachable = format!("agent at {url} unreachable");
    assert!(stderr.contains(&unreachable), "{stderr}");
    let sets = strata.backups(id);
    let newest = sets
        .iter()
        .max_by_key(|s| s["id"].as_str().unwrap_or_default().to_string())
        .expect("a set recorded");
    assert_eq!(newest["status"], "Failed", "{newest}");
    assert!(
        newest["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&unreachable),
        "{newest}"
    );
    assert_eq!(strata_sessions(pg), "0");
}

#[test]
fn an_agent_killed_before_or_during_a_snapshot_fails_the_set_and_ends_backup_mode() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let pg = cluster_on(&fs);
    // 3000 tables and their WAL fill most of the file system: the floor is not what this test
    // is about.
    let mut agent = AgentProcess::start_with(
        pg.data_dir(),
        testkit::free_port(),
        &["--min-free-bytes", "1%"],
    );
    let strata = Strata::new("snapshot-kill");
    let out = add_with_agent(&strata, "killed", &pg, &agent.url(), &agent.key_file());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Killed before the snapshot.
    agent.kill9();
    let stderr = strata.fails(&["backup", "create", "killed", "--snapshot"]);
    assert_failed_unreachable(&strata, &pg, "killed", &stderr, &agent.url());
    agent.restart();
    let (first, took) = snapshot(&strata, "killed");
    println!(
        "snapshot after the agent's restart: {:.2} s",
        took.as_secs_f64()
    );
    assert!(agent
        .snapshot_dir()
        .join(&first)
        .join("backup_label")
        .is_file());

    // Killed during the reflink walk: enough small tables that the walk takes a while, the
    // kill as soon as the walk's `.partial-` directory shows.
    // One transaction per table: all in one would exceed the lock table.
    let mut sql = String::new();
    for i in 0..3000 {
        sql.push_str(&format!(
            "CREATE TABLE many_{i} (id int PRIMARY KEY, v text); INSERT INTO many_{i} VALUES (1, 'x');"
        ));
    }
    pg.psql("postgres", &sql);
    let mut backup = strata
        .command(&["backup", "create", "killed", "--snapshot"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup create");
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        if let Some(p) = partial_snapshot(&agent.snapshot_dir()) {
            break p;
        }
        if backup.try_wait().expect("poll backup create").is_some() {
            let out = backup.wait_with_output().expect("backup create output");
            panic!(
                "the snapshot ended before its walk was seen: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no .partial- snapshot directory appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    agent.kill9();
    let out = backup.wait_with_output().expect("backup create output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the snapshot succeeded although its agent was killed"
    );
    assert_failed_unreachable(&strata, &pg, "killed", &stderr, &agent.url());
    assert!(
        partial.is_dir(),
        "the killed walk's directory is left until the next start"
    );

    // Restarted: the partial snapshot removed, the next snapshot fine.
    agent.restart();
    assert!(
        !partial.exists(),
        "{} left after the restart",
        partial.display()
    );
    let (next, took) = snapshot(&strata, "killed");
    println!(
        "snapshot of {} files after the kill: {:.2} s",
        3000 * 4,
        took.as_secs_f64()
    );
    let sets = strata.backups("killed");
    let mut ok: Vec<String> = sets
        .iter()
        .filter(|s| s["status"] == "Success")
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ok.sort();
    let mut expected = vec![first, next.clone()];
    expected.sort();
    assert_eq!(ok, expected, "{sets:?}");
    assert_eq!(sets.len(), 4, "two failed, two successful: {sets:?}");
    assert!(agent
        .snapshot_dir()
        .join(&next)
        .join("backup_label")
        .is_file());
}

/// Checkpoints requested of `pg` so far (`pg_backup_start` requests one).
fn requested_checkpoints(pg: &Cluster) -> u64 {
    pg.psql("postgres", "SELECT checkpoints_req FROM pg_stat_bgwriter")
        .parse()
        .expect("checkpoints_req")
}

#[test]
fn a_snapshot_under_the_free_space_floor_is_refused_before_backup_mode_and_leaves_nothing() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let pg = cluster_on(&fs);
    let port = testkit::free_port();
    // A floor of the whole file system: never kept.
    let mut agent = AgentProcess::start_with(pg.data_dir(), port, &["--min-free-bytes", "100%"]);
    let strata = Strata::new("snapshot-floor");
    let out = add_with_agent(&strata, "floor", &pg, &agent.url(), &agent.key_file());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let checkpoints = requested_checkpoints(&pg);
    let stderr = strata.fails(&["backup", "create", "floor", "--snapshot"]);
    let refusal = format!(
        "agent at {} refused: snapshot refused: the file system of {} has ",
        agent.url(),
        agent.snapshot_dir().display()
    );
    assert!(stderr.contains(&refusal), "{stderr}");
    assert!(
        stderr.contains("bytes), under the floor of 100% ("),
        "{stderr}"
    );
    let sets = strata.backups("floor");
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(sets[0]["status"], "Failed", "{sets:?}");
    assert_eq!(sets[0]["method"], "Snapshot", "{sets:?}");
    assert!(
        sets[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&refusal),
        "{sets:?}"
    );
    // Nothing left behind: no snapshot (partial or not) next to the key and the latest request
    // time, no session or slot
    // of Strata on the server, and the server never went into backup mode (no checkpoint).
    let mut left: Vec<String> = std::fs::read_dir(agent.snapshot_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["agent.key", "agent.latest-request"]);
    assert_eq!(strata_sessions(&pg), "0");
    assert_eq!(
        pg.psql("postgres", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(requested_checkpoints(&pg), checkpoints);

    // The floor lowered (same key, same port): the next snapshot is taken, and its
    // checkpoint shows in the counter the refusal left alone.
    agent.kill9();
    let agent = AgentProcess::start_with(pg.data_dir(), port, &["--min-free-bytes", "1%"]);
    let (backup, _) = snapshot(&strata, "floor");
    assert!(agent
        .snapshot_dir()
        .join(&backup)
        .join("backup_label")
        .is_file());
    wait_for("the snapshot's checkpoint counted", 30, || {
        requested_checkpoints(&pg) > checkpoints
    });
    let statuses: Vec<String> = strata
        .backups("floor")
        .iter()
        .map(|s| s["status"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(statuses, ["Failed", "Success"]);
}

/// The instance fields of `id` in a `DescribeDBInstances` answer (none: not listed).
fn described(strata: &Strata, port: u16, id: &str) -> Option<serde_json::Value> {
    let v = signed_call(strata, port, &[("Action", "DescribeDBInstances")]);
    v["Items"]["DBInstance"]
        .as_array()
        .expect("DescribeDBInstances lists Items.DBInstance")
        .iter()
        .find(|i| i["DBInstanceId"] == id)
        .cloned()
}

/// `CloneDBInstance` of `source` with `params`; waits until the clone runs and returns its
/// description.
fn clone_via_api(
    strata: &Strata,
    port: u16,
    source: &str,
    params: &[(&str, &str)],
) -> serde_json::Value {
    let mut all = vec![("Action", "CloneDBInstance"), ("DBInstanceId", source)];
    all.extend_from_slice(params);
    let started = Instant::now();
    let v = signed_call(strata, port, &all);
    let id = v["DBInstanceId"].as_str().expect("clone id").to_string();
    let mut last = serde_json::Value::Null;
    wait_for("the clone to run", 180, || {
        last = described(strata, port, &id).expect("the clone is listed");
        last["DBInstanceStatus"] != "Creating"
    });
    assert_eq!(last["DBInstanceStatus"], "Running", "{last}");
    println!(
        "clone {id} ({params:?}) running after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    last
}

#[test]
fn snapshot_sets_clone_on_the_database_host_through_the_agent() {
    let Some(fs) = LoopFs::or_skip(FsKind::Xfs, 600, true) else {
        return;
    };
    let pg = cluster_on(&fs);
    let db = "postgres";
    let mut agent = AgentProcess::start(pg.data_dir(), testkit::free_port());
    let strata = Strata::new("snapclone");
    let out = add_with_agent(&strata, "src", &pg, &agent.url(), &agent.key_file());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut receiver = strata.wal_receiver("src");

    // A snapshot under pgbench load with DDL.
    let ((backup, _), _) = under_load_with_ddl(
        &pg,
        db,
        1,
        |i| {
            format!(
                "CREATE TABLE ddl_{i} AS SELECT g AS x FROM generate_series(1, 2000) g; \
                 DROP TABLE IF EXISTS ddl_{}",
                i - 1
            )
        },
        || snapshot(&strata, "src"),
    );

    // Two committed phases after it, a whole second (RestoreTime's precision) between them.
    pg.psql(db, "INSERT INTO ledger VALUES (1, 'after the snapshot')");
    pg.pgbench(db, &["-n", "-c", "1", "-t", "50"]);
    let d1 = state_digest(&pg, db);
    std::thread::sleep(Duration::from_millis(1100));
    let t1 = pg.psql(
        db,
        "SELECT to_char(date_trunc('second', clock_timestamp() AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql(db, "INSERT INTO ledger VALUES (2, 'later')");
    pg.pgbench(db, &["-n", "-c", "1", "-t", "50"]);
    assert_ne!(state_digest(&pg, db), d1);
    let end_lsn: pg_wal::Lsn = pg
        .psql(db, "SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    wait_for("WAL archived past the second phase", 60, || {
        strata.wal("src").iter().any(|w| {
            w["end_lsn"]
                .as_str()
                .and_then(|l| l.parse::<pg_wal::Lsn>().ok())
                .is_some_and(|l| l >= end_lsn)
        })
    });
    receiver.stop();

    // The set at its consistency point, as the repository restores it (uploaded for this
    // comparison only), into a directory off the snapshot's file system.
    strata.ok(&["backup", "upload", "src", &backup]);
    let from_repo = strata.restore_and_start(
        "src",
        "consistent",
        15,
        &["--backup", &backup, "--immediate"],
    );
    let consistent = state_digest(&from_repo, db);
    let tables = "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname LIKE 'ddl\\_%' AND relkind = 'r'";
    let consistent_tables = from_repo.psql(db, tables);
    drop(from_repo);

    // `strata restore --backup SET` on the database host, into a directory on the snapshot's
    // file system: reflinked from the snapshot, the same rows.
    let cli_dir = fs.path().join("cli-restore");
    let cli_port = testkit::free_port();
    let out = strata.ok(&[
        "restore",
        "src",
        "--backup",
        &backup,
        "--immediate",
        "--target-dir",
        &cli_dir.display().to_string(),
        "--start",
        "--port",
        &cli_port.to_string(),
    ]);
    assert!(out.contains("reflinked from the snapshot"), "{out}");
    let cli = testkit::Cluster::adopt(15, cli_dir.clone(), cli_port);
    assert_eq!(state_digest(&cli, db), consistent);
    assert_eq!(cli.psql(db, tables), consistent_tables);
    let auto = std::fs::read_to_string(cli_dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(&format!("strata restore of backup {backup}")),
        "{auto}"
    );
    drop(cli);

    let server = common::Server::start(&strata, &[]);
    let clone_root = pg.data_dir().parent().unwrap().join("strata-clones");

    // By BackupId: on the database host, rows as at the backup's consistency point.
    let by_set = clone_via_api(&strata, server.port, "src", &[("BackupId", &backup)]);
    let id = by_set["DBInstanceId"].as_str().unwrap().to_string();
    assert_eq!(by_set["StrataAgentClone"], id.as_str(), "{by_set}");
    assert_eq!(by_set["StrataSourceDBInstanceId"], "src");
    let dir = clone_root.join(&id);
    assert_eq!(
        by_set["StrataDataDirectory"],
        dir.display().to_string().as_str()
    );
    assert!(dir.join("PG_VERSION").is_file());
    let port: u16 = by_set["Port"].as_str().unwrap().parse().unwrap();
    let clone = testkit::Cluster::adopt(15, dir.clone(), port);
    assert_eq!(clone.psql(db, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(state_digest(&clone, db), consistent);
    assert_eq!(clone.psql(db, tables), consistent_tables);
    assert_eq!(clone.psql(db, "SELECT count(*) FROM ledger"), "0");
    // Its configuration sanitized as any restore's, by the agent.
    let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(&format!("# Written by strata agent for clone {id}")),
        "{auto}"
    );
    assert!(auto.contains("restore_command = 'false'"), "{auto}");

    // By RestoreTime: the rows committed by then.
    let by_time = clone_via_api(&strata, server.port, "src", &[("RestoreTime", &t1)]);
    let time_id = by_time["DBInstanceId"].as_str().unwrap().to_string();
    assert_eq!(by_time["StrataAgentClone"], time_id.as_str(), "{by_time}");
    let time_port: u16 = by_time["Port"].as_str().unwrap().parse().unwrap();
    let at_time = testkit::Cluster::adopt(15, clone_root.join(&time_id), time_port);
    assert_eq!(state_digest(&at_time, db), d1, "clone to {t1}");
    assert_eq!(
        at_time.psql(
            db,
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM ledger"
        ),
        "1"
    );

    // DeleteDBInstance: the server stopped and the directory gone on the host.
    for (clone_id, port) in [(&id, port), (&time_id, time_port)] {
        signed_call(
            &strata,
            server.port,
            &[
                ("Action", "DeleteDBInstance"),
                ("DBInstanceId", clone_id.as_str()),
            ],
        );
        assert!(described(&strata, server.port, clone_id).is_none());
        assert!(
            !clone_root.join(clone_id).exists(),
            "{clone_id} left on the host"
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server of {clone_id} still listens"
        );
    }
    assert_eq!(instance_ids(&strata), ["src"]);
    drop((clone, at_time));

    // A clone whose server cannot start (the agent finds no pg_ctl): Failed with the agent's
    // reason, nothing left on the host, deletable.
    agent.kill9();
    let agent = AgentProcess::start_with(
        pg.data_dir(),
        agent.port(),
        &["--pg-bin", "/nonexistent/bin"],
    );
    let v = signed_call(
        &strata,
        server.port,
        &[
            ("Action", "CloneDBInstance"),
            ("DBInstanceId", "src"),
            ("BackupId", &backup),
        ],
    );
    let failed = v["DBInstanceId"].as_str().unwrap().to_string();
    let mut last = serde_json::Value::Null;
    wait_for("the clone to fail", 120, || {
        last = described(&strata, server.port, &failed).expect("listed");
        last["DBInstanceStatus"] != "Creating"
    });
    assert_eq!(last["DBInstanceStatus"], "Failed", "{last}");
    let reason = last["StrataErrorMessage"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("agent at {} refused", agent.url()))
            && reason.contains("no pg_ctl in /nonexistent/bin"),
        "{reason}"
    );
    assert!(
        !clone_root.join(&failed).exists(),
        "the failed clone is left on the host"
    );
    signed_call(
        &strata,
        server.port,
        &[
            ("Action", "DeleteDBInstance"),
            ("DBInstanceId", failed.as_str()),
        ],
    );
    assert!(described(&strata, server.port, &failed).is_none());

    // One byte of a relation in a snapshot rewritten on the host by the PostgreSQL OS user, its
    // mtime put back: a clone of it and a reflink restore from it are refused naming the file,
    // the set is no longer local, and the next restore takes the repository's copy.
    let rel = pg.psql(db, "SELECT pg_relation_filepath('pgbench_accounts')");
    let rewrite_one_byte = |set: &str| {
        let file = agent.snapshot_dir().join(set).join(&rel);
        let file = file.display().to_string();
        let stamp = fs.path().join(format!("mtime-{set}")).display().to_string();
        let ok = std::process::Command::new("touch")
            .args(["-r", &file, &stamp])
            .status()
            .unwrap();
        assert!(ok.success(), "{file}");
        for args in [
            vec![
                "dd",
                "if=/dev/urandom",
                &format!("of={file}"),
                "bs=1",
                "count=1",
                "seek=8200",
                "conv=notrunc",
            ],
            vec!["touch", "-r", &stamp, &file],
        ] {
            let out = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
    };
    let is_local = |set: &str| {
        let row = strata
            .backups("src")
            .into_iter()
            .find(|b| b["id"] == set)
            .expect("the set is listed");
        row["snapshot_local"] == true
    };
    let (second, _) = snapshot(&strata, "src");
    assert!(is_local(&second));
    rewrite_one_byte(&second);
    let v = signed_call(
        &strata,
        server.port,
        &[
            ("Action", "CloneDBInstance"),
            ("DBInstanceId", "src"),
            ("BackupId", &second),
        ],
    );
    let refused = v["DBInstanceId"].as_str().unwrap().to_string();
    wait_for("the clone to fail", 120, || {
        last = described(&strata, server.port, &refused).expect("listed");
        last["DBInstanceStatus"] != "Creating"
    });
    assert_eq!(last["DBInstanceStatus"], "Failed", "{last}");
    let reason = last["StrataErrorMessage"].as_str().unwrap_or_default();
    assert_eq!(
        reason,
        format!(
            "snapshot {second} changed on the database host after it was taken ({rel}: ctime); it is not used: restore from another backup"
        ),
        "{last}"
    );
    assert!(!clone_root.join(&refused).exists());
    assert!(!is_local(&second));

    rewrite_one_byte(&backup);
    let restore = |name: &str| {
        vec![
            "restore".to_string(),
            "src".into(),
            "--backup".into(),
            backup.clone(),
            "--immediate".into(),
            "--target-dir".into(),
            fs.path().join(name).display().to_string(),
        ]
    };
    let args = restore("tampered");
    let err = strata.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains(&format!(
            "snapshot {backup} changed on the database host after it was taken ({rel}: ctime); it is not used: restore from the repository"
        )),
        "{err}"
    );
    assert!(!is_local(&backup));
    let args = restore("from-repo");
    let out = strata.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.contains("reflinked from the snapshot"), "{out}");
}
