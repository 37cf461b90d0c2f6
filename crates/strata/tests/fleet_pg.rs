//! A fleet on the parts it runs on in production: three `strata serve`
//! processes sharing a PostgreSQL 15 catalog and an S3 repository (s3s-fs),
//! twelve registered PostgreSQL servers with log backup on. Checked: the
//! instances spread, every node's API answers for every instance, a node
//! killed with SIGKILL loses its instances to the others within the
//! documented bound with no hole in any instance's WAL, a restore to a time
//! inside that outage is exact, the backup the killed node was running ends
//! `Failed` with its reason and the next one succeeds, the node restarted
//! rejoins, and a restart of the catalog server is waited out with nothing
//! recorded twice.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{http_get, wait_for, Server, Strata};
use pg_wal::Lsn;
use strata_service::fleet::{assign, desired_owner};
use testkit::{Cluster, S3Server};

const INSTANCES: usize = 12;
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// The node killed; its instances move to the other two.
const VICTIM: usize = 2;
/// `node.lease_secs`: the smallest allowed, so the failover is quick.
const LEASE_SECS: u64 = 8;
/// `jobs.lease_secs`: how long the killed node's backup stays `Running`.
const JOB_LEASE_SECS: u64 = 6;
/// The documented bound (README, `node.lease_secs`): WAL of a lost node's
/// instances resumes within the lease plus a tick plus connecting, under
/// 30 s with the default lease.
const FAILOVER_BOUND_SECS: u64 = 30;

/// Signs an RPC call with the admin key and sends it to `port`.
fn api(strata: &Strata, port: u16, params: &[(&str, &str)]) -> serde_json::Value {
    common::signed_call(strata, port, params)
}

/// `StrataNode` of every instance, as the node on `port` answers.
fn owners(strata: &Strata, port: u16) -> BTreeMap<String, String> {
    let v = api(
        strata,
        port,
        &[("Action", "DescribeDBInstances"), ("PageSize", "100")],
    );
    common::instances_field(&v, "StrataNode")
}

/// The instances a node's `/metrics` reports streaming, and how many it owns.
fn streaming(port: u16) -> Result<(BTreeSet<String>, usize), String> {
    let (status, text) = http_get(port, "/metrics");
    if !status.contains("200") {
        return Err(format!("/metrics: {status}"));
    }
    let up = text
        .lines()
        .filter_map(|l| l.strip_prefix("strata_wal_receiver_up{instance=\""))
        .filter_map(|l| l.split_once("\"} "))
        .filter(|(_, v)| *v == "1")
        .map(|(id, _)| id.to_string())
        .collect();
    let owned = text
        .lines()
        .find_map(|l| l.strip_prefix("strata_node_owned_instances "))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no strata_node_owned_instances".to_string())?;
    Ok((up, owned))
}

/// Waits up to `secs` for `cond`; on timeout fails with why it last did not hold.
fn poll(what: &str, secs: u64, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match cond() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => {
                panic!("timed out after {secs} s waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

/// An instance's WAL has one row per segment and kind, and each complete
/// segment starts where the one before it ended.
fn assert_wal_whole(strata: &Strata, id: &str) {
    let wal = strata.wal(id);
    let keys: BTreeSet<String> = wal
        .iter()
        .map(|w| format!("{}/{}/{}", w["timeline"], w["segment"], w["partial"]))
        .collect();
    assert_eq!(keys.len(), wal.len(), "{id}: WAL recorded twice: {wal:#?}");
    let mut complete: Vec<&serde_json::Value> = wal
        .iter()
        .filter(|w| w["timeline"] == 1 && w["partial"] == false)
        .collect();
    complete.sort_by_key(|w| lsn(&w["begin_lsn"]));
    assert!(
        complete.len() >= 2,
        "{id}: {} complete segments",
        complete.len()
    );
    for pair in complete.windows(2) {
        assert_eq!(
            lsn(&pair[0]["end_lsn"]),
            lsn(&pair[1]["begin_lsn"]),
            "{id}: a hole in the WAL between {} and {}",
            pair[0]["segment"],
            pair[1]["segment"]
        );
    }
}

fn archived(strata: &Strata, id: &str, segment: &str) -> bool {
    strata
        .wal(id)
        .iter()
        .any(|w| w["segment"] == segment && w["partial"] == false)
}

/// Writes to every cluster and switches segments; returns, per instance,
/// the segment just completed, which its owner must archive.
fn write_everywhere(clusters: &[(String, Cluster)], round: u32) -> Vec<(String, String)> {
    clusters
        .iter()
        .map(|(id, c)| {
            c.psql(
                "postgres",
                &format!("INSERT INTO t SELECT generate_series(1, 200) + {round} * 1000"),
            );
            let seg = c.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
            (id.clone(), seg)
        })
        .collect()
}

/// The backup sets of every instance, by instance, as the catalog lists them.
fn all_backups(strata: &Strata, ids: &[String]) -> BTreeMap<String, Vec<serde_json::Value>> {
    ids.iter()
        .map(|id| (id.clone(), strata.backups(id)))
        .collect()
}

#[test]
fn a_fleet_on_a_postgres_catalog_and_s3_survives_a_node_and_a_catalog_restart() {
    let began = Instant::now();
    let s3 = S3Server::start();
    let catalog = testkit::catalog_database("fleet_pg");
    let top = format!(
        "catalog = {catalog:?}\nrepository = \"s3://{}/fleet\"\n",
        S3Server::BUCKET
    );
    let s3_section = format!(
        "[s3]\nendpoint = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\npath_style = true\nallow_http = true\n",
        s3.endpoint(),
        S3Server::ACCESS_KEY,
        S3Server::SECRET_KEY
    );
    let nodes: Vec<Strata> = NODES
        .iter()
        .enumerate()
        .map(|(i, id)| {
            // The victim's manual backups are throttled, so one is still
            // running when it is killed.
            let slow = if i == VICTIM {
                "manual_backup_max_rate_kb = 2048\n"
            } else {
                ""
            };
            let sections = format!(
                "{s3_section}[node]\nid = {id:?}\nlease_secs = {LEASE_SECS}\n[jobs]\nlease_secs = {JOB_LEASE_SECS}\n[scheduler]\ntick_secs = 1\n{slow}[drills]\nenabled = false\n"
            );
            Strata::with_config(&format!("fleetpg-{id}"), &top, &sections)
        })
        .collect();
    let names: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();

    // Instance ids chosen so each node is meant to own four (rendezvous
    // hashing is deterministic), so the victim surely owns some.
    let live: BTreeSet<String> = names.iter().cloned().collect();
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    let ids: Vec<String> = (0..200)
        .map(|i| format!("fpg-{i}"))
        .filter(|i| {
            let n = desired_owner(i, &live).unwrap();
            let count = per_node.entry(n).or_default();
            *count += 1;
            *count <= INSTANCES / NODES.len()
        })
        .take(INSTANCES)
        .collect();
    assert_eq!(ids.len(), INSTANCES);
    let victims: Vec<&String> = ids
        .iter()
        .filter(|i| desired_owner(i, &live) == Some(NODES[VICTIM]))
        .collect();
    // One of the victim's instances gets a backup that takes a while, another
    // the markers of the restore to a time.
    let (slow_id, pitr_id) = (victims[0].clone(), victims[1].clone());

    // Twelve small clusters, started in parallel.
    let clusters: Vec<(String, Cluster)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let slow = *id == slow_id;
                s.spawn(move || {
                    let c = Cluster::builder(15)
                        .conf("shared_buffers = 8MB")
                        .conf("max_connections = 20")
                        .conf("max_wal_size = 64MB")
                        .start();
                    c.psql(
                        "postgres",
                        "CREATE TABLE t (i int); CREATE TABLE marks (id int, note text)",
                    );
                    if slow {
                        // About 45 MB: some 20 s at the victim's 2 MB/s.
                        c.pgbench("postgres", &["-i", "-q", "-s", "3"]);
                    }
                    (id.clone(), c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut servers: Vec<Option<Server>> =
        nodes.iter().map(|s| Some(Server::start(s, &[]))).collect();
    for (id, c) in &clusters {
        nodes[0].add_instance(id, c);
    }
    let port = |servers: &[Option<Server>], i: usize| servers[i].as_ref().unwrap().port;

    // Every instance owned by exactly one node (StrataNode agrees with each
    // node's metrics), every live node owning some, each receiver streaming
    // on its owner only.
    let settled = |servers: &[Option<Server>], alive: &[usize]| -> Result<(), String> {
        let owners = owners(&nodes[0], port(servers, alive[0]));
        let mut streaming_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for &n in alive {
            let (up, owned) = streaming(port(servers, n))?;
            let mine = owners.values().filter(|o| **o == names[n]).count();
            if owned != mine || mine == 0 {
                return Err(format!(
                    "{} owns {owned} by its metrics, {mine} by StrataNode: {owners:?}",
                    names[n]
                ));
            }
            for id in up {
                streaming_on.entry(id).or_default().push(names[n].clone());
            }
        }
        for id in &ids {
            let owner = owners.get(id).cloned().unwrap_or_default();
            if !alive.iter().any(|&n| names[n] == owner)
                || streaming_on.get(id) != Some(&vec![owner.clone()])
            {
                return Err(format!(
                    "{id}: owner {owner:?}, streaming on {:?}",
                    streaming_on.get(id)
                ));
            }
        }
        Ok(())
    };
    poll("twelve instances to spread and back up", 180, || {
        settled(&servers, &[0, 1, 2])?;
        match ids.iter().find(|id| {
            !nodes[0]
                .backups(id)
                .iter()
                .any(|b| b["status"] == "Success")
        }) {
            Some(id) => Err(format!("{id}: first backup still running")),
            None => Ok(()),
        }
    });
    println!("spread and first backups: {:?}", began.elapsed());

    // Every node answers for every instance, the same.
    let before = owners(&nodes[0], port(&servers, 0));
    assert_eq!(
        before,
        assign(&ids, &live),
        "the owners are not the fleet's assignment"
    );
    assert_eq!(before.keys().cloned().collect::<Vec<_>>(), {
        let mut sorted = ids.clone();
        sorted.sort();
        sorted
    });
    for (n, name) in names.iter().enumerate() {
        assert_eq!(owners(&nodes[0], port(&servers, n)), before, "{name}");
        for id in &ids {
            let v = api(
                &nodes[0],
                port(&servers, n),
                &[
                    ("Action", "DescribeBinlogFiles"),
                    ("DBInstanceId", id),
                    ("StartTime", "2000-01-01T00:00Z"),
                    ("EndTime", "2100-01-01T00:00Z"),
                    ("PageSize", "100"),
                ],
            );
            assert!(
                v["TotalRecordCount"].as_u64().unwrap_or(0) >= 1,
                "{name} has no WAL of {id}: {v}"
            );
        }
    }
    let lost: Vec<String> = before
        .iter()
        .filter(|(_, n)| **n == names[VICTIM])
        .map(|(i, _)| i.clone())
        .collect();
    assert!(
        lost.contains(&slow_id) && lost.contains(&pitr_id),
        "{before:?}"
    );

    // A throttled backup runs on the victim...
    let job = api(
        &nodes[0],
        port(&servers, VICTIM),
        &[("Action", "CreateBackup"), ("DBInstanceId", &slow_id)],
    );
    assert!(job["BackupJobId"].is_string(), "{job}");
    wait_for("the slow backup to run", 60, || {
        nodes[0]
            .backups(&slow_id)
            .iter()
            .any(|b| b["status"] == "Running")
    });
    let successes_before = nodes[0]
        .backups(&slow_id)
        .iter()
        .filter(|b| b["status"] == "Success")
        .count();

    // ...when the victim dies; WAL is written while nobody archives its
    // instances, with markers around a time to restore to.
    servers[VICTIM].take().unwrap().kill9();
    let killed = Instant::now();
    let (_, pitr) = clusters.iter().find(|(id, _)| *id == pitr_id).unwrap();
    pitr.psql(
        "postgres",
        "INSERT INTO marks VALUES (1, 'before the target')",
    );
    std::thread::sleep(Duration::from_millis(300));
    let target = pitr.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(300));
    pitr.psql(
        "postgres",
        "INSERT INTO marks VALUES (2, 'after the target')",
    );
    let written = write_everywhere(&clusters, 1);
    poll(
        "the lost node's instances to stream on the survivors",
        FAILOVER_BOUND_SECS,
        || settled(&servers, &[0, 1]),
    );
    let failover = killed.elapsed();
    println!("failover (kill -9 to every receiver streaming on a survivor): {failover:?}");
    let after = owners(&nodes[0], port(&servers, 0));
    // Exactly the survivors' assignment: the lost node's share spread over
    // them, an instance of a survivor moving only where the load bound says.
    let survivors: BTreeSet<String> = names[..2].iter().cloned().collect();
    assert_eq!(after, assign(&ids, &survivors));
    wait_for("the outage's WAL to be archived", 90, || {
        written.iter().all(|(id, seg)| archived(&nodes[0], id, seg))
    });
    for id in &ids {
        assert_wal_whole(&nodes[0], id);
    }

    // The killed node's backup is failed once its job lease lapses, with
    // the reason; the next backup of that instance succeeds.
    poll("the killed node's backup to be failed", 60, || {
        let sets = nodes[0].backups(&slow_id);
        match sets.iter().find(|b| b["status"] == "Running") {
            Some(b) => Err(format!("still running: {b}")),
            None => Ok(()),
        }
    });
    let sets = nodes[0].backups(&slow_id);
    let failed: Vec<&serde_json::Value> = sets.iter().filter(|b| b["status"] == "Failed").collect();
    assert_eq!(failed.len(), 1, "{sets:#?}");
    assert!(
        failed[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "failed without a reason: {}",
        failed[0]
    );
    let next = nodes[0].backup(&slow_id);
    let sets = nodes[0].backups(&slow_id);
    let set = sets.iter().find(|b| b["id"] == next.as_str()).unwrap();
    assert_eq!(set["status"], "Success", "{set}");
    assert_eq!(
        sets.iter().filter(|b| b["status"] == "Success").count(),
        successes_before + 1
    );

    // A restore to the time between the markers holds exactly the first.
    let restored = nodes[0].restore_and_start(&pitr_id, "outage", 15, &["--time", &target]);
    assert_eq!(
        restored.psql(
            "postgres",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM marks"
        ),
        "1",
        "restore to {target} inside the outage"
    );
    drop(restored);

    // The victim comes back under its id and gets its share again.
    servers[VICTIM] = Some(Server::start(&nodes[VICTIM], &[]));
    poll("the restarted node to rejoin", 90, || {
        settled(&servers, &[0, 1, 2])
    });
    assert_eq!(owners(&nodes[0], port(&servers, VICTIM)), before);

    // The catalog server restarts while every source writes WAL: the
    // nodes wait it out and archive everything once, with no hole.
    let backups_before = all_backups(&nodes[0], &ids);
    testkit::catalog_server_stop();
    let mut written = write_everywhere(&clusters, 2);
    std::thread::sleep(Duration::from_secs(4));
    written.extend(write_everywhere(&clusters, 3));
    testkit::catalog_server_start();
    written.extend(write_everywhere(&clusters, 4));
    wait_for(
        "WAL written during the catalog outage archived",
        120,
        || written.iter().all(|(id, seg)| archived(&nodes[0], id, seg)),
    );
    poll("the fleet to settle after the catalog restart", 90, || {
        settled(&servers, &[0, 1, 2])
    });
    for id in &ids {
        assert_wal_whole(&nodes[0], id);
    }
    // No backup set appeared or changed for the outage: nothing recorded twice.
    let backups_after = all_backups(&nodes[0], &ids);
    for id in &ids {
        let key = |sets: &[serde_json::Value]| -> Vec<String> {
            sets.iter()
                .map(|b| format!("{} {}", b["id"], b["status"]))
                .collect()
        };
        assert_eq!(key(&backups_after[id]), key(&backups_before[id]), "{id}");
    }
    // A backup through the restarted catalog succeeds, on the owner's API.
    let id = ids.iter().find(|i| before[*i] == names[0]).unwrap();
    api(
        &nodes[0],
        port(&servers, 0),
        &[("Action", "CreateBackup"), ("DBInstanceId", id)],
    );
    poll("a backup after the catalog restart", 90, || {
        let sets = nodes[0].backups(id);
        let new: Vec<&serde_json::Value> = sets
            .iter()
            .filter(|b| !backups_before[id].iter().any(|o| o["id"] == b["id"]))
            .collect();
        match new.as_slice() {
            [b] if b["status"] == "Success" => Ok(()),
            [] => Err("no new backup set yet".into()),
            [b] if b["status"] == "Running" => Err("running".into()),
            _ => panic!("{new:?}"),
        }
    });
    println!("whole test: {:?}", began.elapsed());
}
