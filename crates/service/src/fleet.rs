//! Which node of a fleet runs each instance's work.
//!
//! Several `strata serve` nodes may share one catalog. Each instance's WAL
//! receiver, scheduled backups, copies, drills and retention run on exactly
//! one of them: the node holding the instance's ownership lease. This module
//! is the pure decision a node makes on every round, from what the catalog
//! says (live nodes, current owners, their lease expiry) to which leases to
//! take and which to give up; the catalog's compare-and-set on the lease
//! row makes the decision safe when two nodes decide at once.
//!
//! The desired owner of an instance is chosen by rendezvous hashing over the
//! live nodes: every node computes the same answer without talking to the
//! others, instances spread evenly, and a node joining or leaving moves only
//! the instances that hash to it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// The lease row of one instance, as the catalog holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The node holding the lease.
    pub node_id: String,
    /// When the lease lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// What one node should do with ownership leases this round.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Instances to claim (free, lapsed, or already ours: renewed).
    pub claim: Vec<String>,
    /// Instances to give up, because another live node is their desired
    /// owner and nothing of theirs runs here now.
    pub release: Vec<String>,
    /// Instances this node wants but another node still validly holds; they
    /// come over once that node releases or its lease lapses.
    pub waiting: Vec<String>,
}

/// A node's weight for an instance: the highest weight among the live nodes
/// wins. SHA-256 keeps the weights stable across releases and platforms.
fn weight(node_id: &str, instance_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update((node_id.len() as u64).to_be_bytes());
    h.update(node_id.as_bytes());
    h.update(instance_id.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// The live node that should own `instance_id`, or `None` without live nodes.
pub fn desired_owner<'a>(instance_id: &str, live_nodes: &'a BTreeSet<String>) -> Option<&'a str> {
    live_nodes
        .iter()
        .max_by_key(|n| (weight(n, instance_id), n.as_str()))
        .map(String::as_str)
}

/// What node `me` should do this round.
///
/// `live_nodes` are the nodes whose heartbeat is recent (including `me`);
/// `owners` the current lease rows; `busy` the instances with work running on
/// `me` that must not be interrupted (a backup in progress): they are kept
/// until that work ends, even when another node is now their desired owner.
pub fn plan(
    me: &str,
    instances: &[String],
    owners: &BTreeMap<String, Owner>,
    live_nodes: &BTreeSet<String>,
    busy: &BTreeSet<String>,
    now: DateTime<Utc>,
) -> Plan {
    let mut plan = Plan::default();
    for id in instances {
        let desired = desired_owner(id, live_nodes);
        let owner = owners.get(id);
        let mine = owner.is_some_and(|o| o.node_id == me && o.expires_at > now);
        let held_by_other = owner.is_some_and(|o| o.node_id != me && o.expires_at > now);
        if desired == Some(me) {
            if held_by_other {
                plan.waiting.push(id.clone());
            } else {
                plan.claim.push(id.clone());
            }
        } else if mine {
            if busy.contains(id) {
                plan.claim.push(id.clone());
            } else {
                plan.release.push(id.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn nodes(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn instances(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("pg-{i:04}")).collect()
    }

    /// Owners after every live node has run one round on an empty catalog.
    fn settle(ids: &[String], live: &BTreeSet<String>) -> BTreeMap<String, String> {
        ids.iter()
            .map(|i| (i.clone(), desired_owner(i, live).unwrap().to_string()))
            .collect()
    }

    #[test]
    fn instances_spread_evenly() {
        let ids = instances(3000);
        let live = nodes(&["node-a", "node-b", "node-c"]);
        let owners = settle(&ids, &live);
        for n in &live {
            let count = owners.values().filter(|o| *o == n).count();
            assert!((900..=1100).contains(&count), "{n} owns {count} of 3000");
        }
    }

    #[test]
    fn a_leaving_node_moves_only_its_own_instances() {
        let ids = instances(600);
        let before = settle(&ids, &nodes(&["a", "b", "c"]));
        let after = settle(&ids, &nodes(&["a", "b"]));
        for id in &ids {
            if before[id] != "c" {
                assert_eq!(before[id], after[id], "{id} moved though its node stayed");
            }
        }
        assert!(after.values().all(|o| o != "c"));
    }

    #[test]
    fn a_joining_node_takes_a_fair_share_and_nothing_else_moves() {
        let ids = instances(600);
        let before = settle(&ids, &nodes(&["a", "b", "c"]));
        let after = settle(&ids, &nodes(&["a", "b", "c", "d"]));
        let mut moved = 0;
        for id in &ids {
            if before[id] != after[id] {
                assert_eq!(after[id], "d", "{id} moved between old nodes");
                moved += 1;
            }
        }
        assert!(
            (100..=200).contains(&moved),
            "{moved} of 600 moved to the new node"
        );
    }

    #[test]
    fn each_node_claims_what_it_should_own_and_only_that() {
        let now = Utc::now();
        let ids = instances(40);
        let live = nodes(&["a", "b", "c"]);
        let mut claimed = BTreeMap::new();
        for me in &live {
            let p = plan(me, &ids, &BTreeMap::new(), &live, &BTreeSet::new(), now);
            assert!(p.release.is_empty() && p.waiting.is_empty());
            for id in p.claim {
                assert!(claimed.insert(id, me.clone()).is_none(), "claimed twice");
            }
        }
        assert_eq!(claimed.len(), ids.len(), "an instance is owned by nobody");
    }

    #[test]
    fn a_lapsed_lease_is_taken_and_a_valid_one_waited_for() {
        let now = Utc::now();
        let live = nodes(&["a", "b"]);
        // Instances whose desired owner is "a".
        let ids: Vec<String> = instances(50)
            .into_iter()
            .filter(|i| desired_owner(i, &live) == Some("a"))
            .take(2)
            .collect();
        let owners = BTreeMap::from([
            (
                ids[0].clone(),
                Owner {
                    node_id: "dead".into(),
                    expires_at: now - Duration::seconds(1),
                },
            ),
            (
                ids[1].clone(),
                Owner {
                    node_id: "b".into(),
                    expires_at: now + Duration::seconds(10),
                },
            ),
        ]);
        let p = plan("a", &ids, &owners, &live, &BTreeSet::new(), now);
        assert_eq!(p.claim, vec![ids[0].clone()]);
        assert_eq!(p.waiting, vec![ids[1].clone()]);
        // "b" gives it up on its next round, since it is idle there.
        let p = plan("b", &ids, &owners, &live, &BTreeSet::new(), now);
        assert_eq!(p.release, vec![ids[1].clone()]);
        assert!(p.claim.is_empty());
    }

    #[test]
    fn a_running_backup_keeps_its_instance_until_it_ends() {
        let now = Utc::now();
        let live = nodes(&["a", "b"]);
        let id = instances(50)
            .into_iter()
            .find(|i| desired_owner(i, &live) == Some("b"))
            .unwrap();
        let owners = BTreeMap::from([(
            id.clone(),
            Owner {
                node_id: "a".into(),
                expires_at: now + Duration::seconds(10),
            },
        )]);
        let ids = vec![id.clone()];
        let busy = BTreeSet::from([id.clone()]);
        let p = plan("a", &ids, &owners, &live, &busy, now);
        assert_eq!(p.claim, vec![id.clone()], "renewed while busy");
        assert!(p.release.is_empty());
        let p = plan("a", &ids, &owners, &live, &BTreeSet::new(), now);
        assert_eq!(p.release, vec![id]);
    }

    #[test]
    fn weights_are_stable_across_releases() {
        // Pinned values: changing the hash would move every instance of a
        // running fleet at upgrade.
        assert_eq!(weight("node-a", "pg-0001"), 9_458_420_230_958_172_216);
        assert_ne!(weight("node-a", "pg-0001"), weight("node-b", "pg-0001"));
        // Length-prefixing keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }
}
