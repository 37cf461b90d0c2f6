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
//! live nodes, bounded by load: each instance ranks the nodes by a hash of
//! (node, instance) and goes to the first of them with room, no node taking
//! more than its share (the instance count over the node count, rounded up).
//! Every node computes the same answer from the same catalog without talking
//! to the others; pure rendezvous hashing alone leaves a small fleet uneven
//! (12 instances on 3 nodes came out 2 / 3 / 7), the bound makes it 4 / 4 / 4.
//! A node joining or leaving moves its own share and, where the bound
//! requires, the instances that fit their first choice least.

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

/// The live node ranked first for `instance_id` by rendezvous hashing alone,
/// or `None` without live nodes. [`assign`] gives the owner under the load
/// bound; the two agree whenever no node is over its share.
pub fn desired_owner<'a>(instance_id: &str, live_nodes: &'a BTreeSet<String>) -> Option<&'a str> {
    live_nodes
        .iter()
        .max_by_key(|n| (weight(n, instance_id), n.as_str()))
        .map(String::as_str)
}

/// The desired owner of every instance: its highest-ranked live node with
/// room, each node holding at most `ceil(instances / nodes)`. Deterministic
/// in its inputs (order of `instances` and duplicates do not matter), so every
/// node that reads the same catalog computes the same map. Empty without live
/// nodes.
///
/// Each instance starts at its first choice; while a node is over its share
/// it passes on the instances that rank it lowest to their next choice. A
/// node once at its share never drops below it, so no instance is passed on
/// by every node: the shares add up to at least the instance count.
pub fn assign(instances: &[String], live_nodes: &BTreeSet<String>) -> BTreeMap<String, String> {
    let nodes: Vec<&String> = live_nodes.iter().collect();
    if nodes.is_empty() {
        return BTreeMap::new();
    }
    let ids: BTreeSet<&String> = instances.iter().collect();
    let share = ids.len().div_ceil(nodes.len());
    // Each instance's nodes, best first, with its weight at each.
    let ranked: Vec<(&String, Vec<(u64, usize)>)> = ids
        .iter()
        .map(|id| {
            let mut r: Vec<(u64, usize)> = nodes
                .iter()
                .enumerate()
                .map(|(n, node)| (weight(node, id), n))
                .collect();
            r.sort_by(|a, b| b.0.cmp(&a.0).then(nodes[a.1].cmp(nodes[b.1])));
            (*id, r)
        })
        .collect();
    let mut choice = vec![0usize; ranked.len()];
    loop {
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        for (i, (_, r)) in ranked.iter().enumerate() {
            members[r[choice[i]].1].push(i);
        }
        let mut moved = false;
        for list in &mut members {
            if list.len() <= share {
                continue;
            }
            // Keep the instances that weigh this node most; pass on the rest.
            list.sort_by(|&a, &b| {
                let (wa, wb) = (ranked[a].1[choice[a]].0, ranked[b].1[choice[b]].0);
                wb.cmp(&wa).then(ranked[a].0.cmp(ranked[b].0))
            });
            for &i in &list[share..] {
                choice[i] += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    ranked
        .iter()
        .zip(&choice)
        .map(|((id, r), &c)| ((*id).clone(), nodes[r[c].1].clone()))
        .collect()
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
    let desired_owners = assign(instances, live_nodes);
    for id in instances {
        let desired = desired_owners.get(id).map(String::as_str);
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
        let owners = assign(ids, live);
        assert_eq!(owners.len(), ids.len(), "an instance without an owner");
        owners
    }

    fn counts(owners: &BTreeMap<String, String>) -> BTreeMap<&str, usize> {
        let mut c = BTreeMap::new();
        for o in owners.values() {
            *c.entry(o.as_str()).or_default() += 1;
        }
        c
    }

    #[test]
    fn instances_spread_evenly() {
        let live = nodes(&["node-a", "node-b", "node-c"]);
        for (n, most) in [(3000, 1000), (12, 4), (13, 5), (2, 1), (1, 1)] {
            let owners = settle(&instances(n), &live);
            let c = counts(&owners);
            assert!(c.values().all(|&k| k <= most), "{n} instances: {c:?}");
        }
        // The benchmark's twelve: rendezvous hashing alone puts 2, 3 and 7 of them on the three nodes.
        let ids: Vec<String> = (0..12).map(|i| format!("fleet-{i:03}")).collect();
        let firsts = ids
            .iter()
            .map(|i| (i.clone(), desired_owner(i, &live).unwrap().to_string()))
            .collect();
        let mut uneven: Vec<usize> = counts(&firsts).into_values().collect();
        uneven.sort();
        assert_eq!(uneven, [2, 3, 7]);
        assert_eq!(
            counts(&settle(&ids, &live))
                .into_values()
                .collect::<Vec<_>>(),
            [4, 4, 4]
        );
    }

    #[test]
    fn the_assignment_ignores_order_and_duplicates() {
        let live = nodes(&["a", "b", "c"]);
        let ids = instances(50);
        let mut shuffled: Vec<String> = ids.iter().rev().cloned().collect();
        shuffled.extend(ids[..5].iter().cloned());
        assert_eq!(assign(&ids, &live), assign(&shuffled, &live));
        assert!(assign(&ids, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_leaving_node_moves_its_own_instances_and_few_others() {
        let ids = instances(600);
        let before = settle(&ids, &nodes(&["a", "b", "c"]));
        let after = settle(&ids, &nodes(&["a", "b"]));
        let others_moved = ids
            .iter()
            .filter(|id| before[*id] != "c" && before[*id] != after[*id])
            .count();
        assert!(after.values().all(|o| o != "c"));
        assert_eq!(counts(&after).into_values().collect::<Vec<_>>(), [300, 300]);
        assert!(
            others_moved <= 30,
            "{others_moved} of 400 moved though their node stayed"
        );
    }

    #[test]
    fn a_joining_node_takes_a_fair_share_and_few_others_move() {
        let ids = instances(600);
        let before = settle(&ids, &nodes(&["a", "b", "c"]));
        let after = settle(&ids, &nodes(&["a", "b", "c", "d"]));
        let to_d = ids.iter().filter(|id| after[*id] == "d").count();
        let between_old = ids
            .iter()
            .filter(|id| after[*id] != "d" && before[*id] != after[*id])
            .count();
        assert_eq!(to_d, 150);
        assert!(
            between_old <= 30,
            "{between_old} of 600 moved between old nodes"
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
        let all = instances(50);
        let desired = assign(&all, &live);
        // Two instances whose desired owner is "a".
        let ids: Vec<String> = all
            .iter()
            .filter(|i| desired[*i] == "a")
            .take(2)
            .cloned()
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
        let p = plan("a", &all, &owners, &live, &BTreeSet::new(), now);
        assert!(p.claim.contains(&ids[0]) && !p.claim.contains(&ids[1]));
        assert_eq!(p.waiting, vec![ids[1].clone()]);
        // "b" gives it up on its next round, since it is idle there.
        let p = plan("b", &all, &owners, &live, &BTreeSet::new(), now);
        assert_eq!(p.release, vec![ids[1].clone()]);
        assert!(!p.claim.contains(&ids[0]) && !p.claim.contains(&ids[1]));
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
