//! Several `strata serve` nodes sharing one catalog and one repository:
//! each instance is owned by exactly one node and the instances spread; a
//! node killed with SIGKILL loses its instances to the others, whose WAL
//! receivers resume with no hole in the archived WAL; a restarted node
//! rejoins and gets instances back. Whichever node is asked, a backup runs
//! on the instance's owner and every node reports the same WAL receivers.

mod common;

use common::{http_get, wait_for, Server, Strata};
use std::collections::{BTreeMap, BTreeSet};
use strata_service::fleet::{assign, desired_owner};
use testkit::Cluster;

const INSTANCES: usize = 6;
/// `node.lease_secs` of the test fleet: the smallest allowed, for speed.
const LEASE_SECS: u64 = 8;
/// The documented bound for WAL of a lost node's instances to resume:
/// lease + one scheduler tick + connecting, well under this.
const FAILOVER_BOUND_SECS: u64 = 30;

/// Signs an RPC call with the admin key `strata` created and returns the JSON answer.
fn api(strata: &Strata, server: &Server, params: &[(&str, &str)]) -> serde_json::Value {
    common::signed_call(strata, server.port, params)
}

/// `StrataNode` of every instance, as one node's API answers.
fn owners(strata: &Strata, server: &Server) -> BTreeMap<String, String> {
    let v = api(
        strata,
        server,
        &[("Action", "DescribeDBInstances"), ("PageSize", "100")],
    );
    common::instances_field(&v, "StrataNode")
}

/// `StrataWalReceiverState` of every instance, as one node's API answers.
fn receiver_states(strata: &Strata, server: &Server) -> BTreeMap<String, String> {
    let v = api(
        strata,
        server,
        &[("Action", "DescribeDBInstances"), ("PageSize", "100")],
    );
    common::instances_field(&v, "StrataWalReceiverState")
}

/// One backup job as `DescribeBackupTasks` of one node answers it.
fn backup_task(strata: &Strata, server: &Server, id: &str, job: &str) -> serde_json::Value {
    let v = api(
        strata,
        server,
        &[
            ("Action", "DescribeBackupTasks"),
            ("DBInstanceId", id),
            ("BackupJobId", job),
        ],
    );
    v["Items"]["BackupJob"][0].clone()
}

/// The instances a node's `/metrics` reports with a streaming WAL receiver,
/// and its `strata_node_owned_instances`.
fn streaming(server: &Server) -> (BTreeSet<String>, usize) {
    let (status, text) = http_get(server.port, "/metrics");
    assert!(status.contains("200"), "{status}");
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
        .unwrap_or_else(|| panic!("no strata_node_owned_instances in:\n{text}"))
        .parse()
        .unwrap();
    (up, owned)
}

/// Segment numbers of complete segments on timeline 1 have no holes.
fn assert_contiguous(strata: &Strata, id: &str) {
    let mut segs: Vec<u64> = strata
        .wal(id)
        .iter()
        .filter(|w| w["timeline"] == 1 && w["partial"] == false)
        .map(|w| u64::from_str_radix(&w["segment"].as_str().unwrap()[8..], 16).unwrap())
        .collect();
    segs.sort();
    assert!(!segs.is_empty(), "{id}: no complete segment");
    for pair in segs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{id}: hole in archived WAL: {segs:?}");
    }
}

/// Writes to every cluster and switches segments; returns, per instance,
/// the segment just completed, which its owner must archive.
fn write_everywhere(clusters: &[(String, Cluster)], round: u32) -> Vec<(String, String)> {
    clusters
        .iter()
        .map(|(id, c)| {
            c.psql(
                "postgres",
                &format!("INSERT INTO t SELECT generate_series(1, 500) + {round} * 1000"),
            );
            let seg = c.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
            (id.clone(), seg)
        })
        .collect()
}

/// Waits up to `secs` for `cond` to hold; on timeout, fails with why it
/// last did not.
fn poll(what: &str, secs: u64, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match cond() {
            Ok(()) => return,
            Err(why) if std::time::Instant::now() > deadline => {
                panic!("timed out waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(250)),
        }
    }
}

/// The running server of node `i`.
fn server(i: usize, servers: &[Option<Server>]) -> &Server {
    servers[i].as_ref().unwrap()
}

fn archived(strata: &Strata, id: &str, segment: &str) -> bool {
    strata
        .wal(id)
        .iter()
        .any(|w| w["segment"] == segment && w["partial"] == false)
}

#[test]
fn instances_spread_over_nodes_and_move_when_a_node_dies() {
    let shared = testkit::temp_dir("strata-fleet-shared-");
    let top = format!(
        "catalog = {:?}\nrepository = {:?}\n",
        shared.join("catalog.db").display().to_string(),
        shared.join("repo").display().to_string()
    );
    // Ids set in the configuration, so the instances' spread is known: two
    // instances hash to each node (rendezvous hashing is deterministic).
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("node-{n}"))
        .collect();
    let nodes: Vec<Strata> = ids
        .iter()
        .map(|id| {
            let sections = format!(
                "[node]\nid = {id:?}\nlease_secs = {LEASE_SECS}\n[drills]\nenabled = false\n"
            );
            Strata::with_config(&format!("fleet-{id}"), &top, &sections)
        })
        .collect();
    let live: BTreeSet<String> = ids.iter().cloned().collect();
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    let instance_ids: Vec<String> = (0..100)
        .map(|i| format!("fleet-{i}"))
        .filter(|i| {
            let n = desired_owner(i, &live).unwrap();
            let count = per_node.entry(n).or_default();
            *count += 1;
            *count <= INSTANCES / 3
        })
        .take(INSTANCES)
        .collect();
    assert_eq!(instance_ids.len(), INSTANCES);

    let clusters: Vec<(String, Cluster)> = instance_ids
        .iter()
        .map(|id| {
            let c = Cluster::builder(15)
                .conf("shared_buffers = 16MB")
                .conf("max_wal_size = 64MB")
                .start();
            c.psql("postgres", "CREATE TABLE t (i int)");
            (id.clone(), c)
        })
        .collect();
    let mut servers: Vec<Option<Server>> =
        nodes.iter().map(|s| Some(Server::start(s, &[]))).collect();
    for (id, c) in &clusters {
        nodes[0].add_instance(id, c);
    }

    // Every instance owned by exactly one node, each node owning some,
    // streaming there only.
    let settled = |servers: &[Option<Server>], alive: &[usize]| -> Result<(), String> {
        let owners = owners(&nodes[0], server(alive[0], servers));
        let mut streaming_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for &n in alive {
            let (up, owned) = streaming(server(n, servers));
            let mine = owners.values().filter(|o| **o == ids[n]).count();
            if owned != mine || mine == 0 {
                return Err(format!(
                    "node {} owns {owned} by its metrics, {mine} by StrataNode: {owners:?}",
                    ids[n]
                ));
            }
            for id in up {
                streaming_on.entry(id).or_default().push(ids[n].clone());
            }
        }
        for (id, _) in &clusters {
            let owner = owners.get(id).cloned().unwrap_or_default();
            if streaming_on.get(id) != Some(&vec![owner.clone()]) {
                return Err(format!(
                    "{id}: owner {owner:?}, streaming on {:?}",
                    streaming_on.get(id)
                ));
            }
        }
        Ok(())
    };
    poll("instances to spread over three nodes", 120, || {
        settled(&servers, &[0, 1, 2])?;
        let backed_up = clusters.iter().all(|(id, _)| {
            nodes[0]
                .backups(id)
                .iter()
                .any(|b| b["status"] == "Success")
        });
        if backed_up {
            Ok(())
        } else {
            Err("first backups still running".into())
        }
    });
    // The admin key is in the shared catalog: every node accepts node a's.
    let before = owners(&nodes[0], server(1, &servers));
    assert_eq!(
        before,
        assign(&instance_ids, &live),
        "the owners are not the fleet's assignment"
    );
    // Every node answers the same.
    assert_eq!(before, owners(&nodes[0], server(2, &servers)));
    poll("every node to report every receiver streaming", 60, || {
        let states: Vec<BTreeMap<String, String>> = (0..3)
            .map(|n| receiver_states(&nodes[0], server(n, &servers)))
            .collect();
        let all_streaming =
            states[0].len() == INSTANCES && states[0].values().all(|s| s == "Streaming");
        if all_streaming && states.iter().all(|s| *s == states[0]) {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    });

    // A backup asked of a node that does not own the instance is run by
    // the owner.
    let (target, owner) = before
        .iter()
        .find(|(_, n)| **n == ids[1])
        .map(|(i, n)| (i.clone(), n.clone()))
        .unwrap();
    let asked = api(
        &nodes[0],
        server(0, &servers),
        &[("Action", "CreateBackup"), ("DBInstanceId", &target)],
    );
    let job = asked["BackupJobId"].as_str().unwrap().to_string();
    poll("the queued backup to finish on its owner", 120, || {
        let task = backup_task(&nodes[0], server(2, &servers), &target, &job);
        match task["BackupStatus"].as_str() {
            Some("Finished") => Ok(()),
            Some("Failed") => panic!("the queued backup failed: {task}"),
            _ => Err(task.to_string()),
        }
    });
    let task = backup_task(&nodes[0], server(0, &servers), &target, &job);
    assert_eq!(task["StrataNode"], owner.as_str(), "{task}");
    let set = task["BackupId"].as_str().unwrap();
    assert!(
        nodes[0]
            .backups(&target)
            .iter()
            .any(|b| b["id"] == set && b["status"] == "Success"),
        "{set} not among {:?}",
        nodes[0].backups(&target)
    );
    let lost: Vec<String> = before
        .iter()
        .filter(|(_, n)| **n == ids[2])
        .map(|(i, _)| i.clone())
        .collect();
    assert!(!lost.is_empty());

    // Node c dies; WAL is written while nobody archives its instances.
    servers[2].take().unwrap().kill9();
    let written = write_everywhere(&clusters, 1);
    poll(
        "the lost node's instances to stream on the survivors",
        FAILOVER_BOUND_SECS,
        || settled(&servers, &[0, 1]),
    );
    let after = owners(&nodes[0], server(0, &servers));
    for id in &lost {
        assert!(
            after[id] == ids[0] || after[id] == ids[1],
            "{id}: {after:?}"
        );
    }
    // Exactly the survivors' assignment: the lost node's share spread over
    // them, an instance of a survivor moving only where the load bound says.
    let survivors: BTreeSet<String> = ids[..2].iter().cloned().collect();
    assert_eq!(after, assign(&instance_ids, &survivors));
    wait_for("the outage's WAL to be archived", 60, || {
        written.iter().all(|(id, seg)| archived(&nodes[0], id, seg))
    });
    for (id, _) in &clusters {
        assert_contiguous(&nodes[0], id);
    }

    // Node c comes back under the same id and gets its share again; the
    // instances it takes back keep archiving without a hole.
    servers[2] = Some(Server::start(&nodes[2], &[]));
    poll("the restarted node to rejoin", 90, || {
        settled(&servers, &[0, 1, 2])
    });
    assert_eq!(owners(&nodes[0], server(2, &servers)), before);
    let written = write_everywhere(&clusters, 2);
    wait_for("WAL after the rejoin to be archived", 60, || {
        written.iter().all(|(id, seg)| archived(&nodes[0], id, seg))
    });
    for (id, _) in &clusters {
        assert_contiguous(&nodes[0], id);
        // Nothing was interrupted: every backup succeeded.
        let sets = nodes[0].backups(id);
        assert!(
            sets.iter().all(|b| b["status"] == "Success"),
            "{id}: {sets:?}"
        );
    }
}
