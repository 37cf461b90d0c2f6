//! This node's membership of a fleet: its heartbeat, the ownership leases it
//! takes, renews and gives up, and the instances it may therefore run work
//! for.
//!
//! Every scheduler round starts with a fleet round ([`Service::fleet_round`]):
//! the node records its heartbeat and renews its leases when a renewal is
//! due (every quarter of the lease), reads the live nodes and the leases,
//! asks [`crate::fleet::plan`] what to do, claims what it should own (a
//! compare-and-set in the catalog) and gives up what another node should
//! own, after stopping its WAL receiver there. The rest of the round acts
//! only on the instances this node holds a lease on ([`Service::owns`]).
//!
//! Leases are judged by the catalog's clock
//! ([`strata_catalog::NodeCatalog::now`], read once per round), not by this
//! node's clock nor the service's [`crate::Clock`] (tests walk that one
//! through weeks): on PostgreSQL the server decides every claim and renewal
//! in the statement itself, so nodes whose clocks disagree still agree on
//! who holds what. A node also stops counting an
//! instance as its own once the lease it last saw lapses, even while the
//! catalog cannot be reached: it keeps that moment as a deadline on its own
//! monotonic clock (the lease's remaining time as the catalog's clock saw
//! it), so a node cut off from the catalog stops its instances' work by
//! itself at about the time another node may take them, whatever its wall
//! clock says.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use strata_catalog::{CatalogResult, InstanceOwner, Node};

use crate::{fleet, lock, Service};

/// The default lease: see `node.lease_secs` in the README and "Ownership
/// leases" in docs/DESIGN.md for how it bounds a failover.
pub const DEFAULT_NODE_LEASE: Duration = Duration::from_secs(20);

/// Which instances this node holds leases on, as of its last fleet round.
#[derive(Default)]
pub(crate) struct Membership {
    /// Owned instances and when their lease lapses as last seen, on this
    /// process's monotonic clock.
    owned: std::sync::Mutex<BTreeMap<String, Instant>>,
    /// When this node last recorded its heartbeat and renewed its leases.
    last_renewal: std::sync::Mutex<Option<Instant>>,
}

/// The live nodes: recent heartbeat, and this node whatever the catalog says.
fn live_nodes(
    me: &str,
    nodes: &[Node],
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> BTreeSet<String> {
    let mut live: BTreeSet<String> = nodes
        .iter()
        .filter(|n| n.heartbeat_at + ttl > now)
        .map(|n| n.id.clone())
        .collect();
    live.insert(me.to_string());
    live
}

fn owner_map(rows: &[InstanceOwner]) -> BTreeMap<String, fleet::Owner> {
    rows.iter()
        .map(|o| {
            let owner = fleet::Owner {
                node_id: o.node_id.clone(),
                expires_at: o.expires_at,
            };
            (o.instance_id.clone(), owner)
        })
        .collect()
}

/// A node of the fleet as the catalog records it, with how it is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// The node's row: id, API address, version, start and last heartbeat.
    pub node: Node,
    /// How its heartbeat looks from here.
    pub state: NodeState,
    /// Instances it holds an unexpired lease on.
    pub owned: usize,
    /// Whether it is the node answering.
    pub this_node: bool,
}

/// A node's health by its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Heartbeat within one lease: it takes and keeps instances.
    Live,
    /// Stopped cleanly: it recorded a heartbeat from long ago and gave its
    /// instances up.
    Left,
    /// No heartbeat for a lease or more (killed, its machine or network
    /// gone): its instances moved once their leases lapsed.
    Lost,
}

/// A node's health: live within one lease of its heartbeat (the node
/// asking always is), left when its last heartbeat is the one from long ago
/// a clean stop records, lost otherwise.
fn node_state(
    this_node: bool,
    node: &Node,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> NodeState {
    if this_node || node.heartbeat_at + ttl > now {
        NodeState::Live
    } else if node.heartbeat_at == DateTime::UNIX_EPOCH {
        NodeState::Left
    } else {
        NodeState::Lost
    }
}

impl Service {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.settings.node.id
    }

    fn node_ttl(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.node.lease).unwrap_or(chrono::Duration::MAX)
    }

    /// Whether this node holds the lease of `instance_id` (as of its last
    /// fleet round, and not lapsed since).
    pub fn owns(&self, instance_id: &str) -> bool {
        lock(&self.membership.owned)
            .get(instance_id)
            .is_some_and(|until| *until > Instant::now())
    }

    /// How many instances this node holds leases on.
    pub fn owned_count(&self) -> usize {
        let now = Instant::now();
        lock(&self.membership.owned)
            .values()
            .filter(|until| **until > now)
            .count()
    }

    /// The node holding each instance's lease (lapsed leases left out), by
    /// instance id.
    pub fn instance_owners(&self) -> CatalogResult<BTreeMap<String, String>> {
        let catalog = self.engine.catalog();
        let now = catalog.now()?;
        Ok(catalog
            .list_owners()?
            .into_iter()
            .filter(|o| o.expires_at > now)
            .map(|o| (o.instance_id, o.node_id))
            .collect())
    }

    /// Every node that ever heartbeated on this catalog, by id, with its
    /// health judged as the fleet rounds judge it (this node is live).
    pub fn nodes_health(&self) -> CatalogResult<Vec<NodeHealth>> {
        let now = self.engine.catalog().now()?;
        let owners = self.instance_owners()?;
        let ttl = self.node_ttl();
        let mut nodes = self.engine.catalog().list_nodes()?;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes
            .into_iter()
            .map(|node| {
                let this_node = node.id == self.node_id();
                let state = node_state(this_node, &node, now, ttl);
                NodeHealth {
                    owned: owners.values().filter(|n| **n == node.id).count(),
                    state,
                    this_node,
                    node,
                }
            })
            .collect())
    }

    /// Whether this node reports `instance_id` (in `/metrics`): it holds
    /// its lease or, while no node validly holds it, it is the node that
    /// will. Exactly one live node answers yes for each instance.
    /// `desired` is [`fleet::assign`] over every instance and the live nodes.
    pub(crate) fn reports(
        &self,
        instance_id: &str,
        owners: &BTreeMap<String, String>,
        desired: &BTreeMap<String, String>,
    ) -> bool {
        match owners.get(instance_id) {
            Some(node) => node == self.node_id(),
            None => desired.get(instance_id).map(String::as_str) == Some(self.node_id()),
        }
    }

    /// The desired owner of each of `instances` among the live nodes
    /// ([`fleet::assign`]), as every live node computes it.
    pub(crate) fn desired_owners(
        &self,
        instances: &[strata_catalog::Instance],
    ) -> CatalogResult<BTreeMap<String, String>> {
        let ids: Vec<String> = instances
            .iter()
            .map(|i| String::from(i.id.clone()))
            .collect();
        Ok(fleet::assign(&ids, &self.live_nodes()?))
    }

    /// The live nodes as the catalog's heartbeats say.
    pub(crate) fn live_nodes(&self) -> CatalogResult<BTreeSet<String>> {
        let catalog = self.engine.catalog();
        let now = catalog.now()?;
        let nodes = catalog.list_nodes()?;
        Ok(live_nodes(self.node_id(), &nodes, now, self.node_ttl()))
    }

    /// One fleet round: heartbeat and renewals when due, claims, and the
    /// release of instances another node should own (their WAL receivers
    /// stopped first, flushing the partial segment, so the next owner finds
    /// the replication slot free and the catalog up to date).
    pub(crate) async fn fleet_round(self: &Arc<Self>, instance_ids: Vec<String>) {
        let svc = Arc::clone(self);
        let busy: BTreeSet<String> = self.backups.instances().into_iter().collect();
        let planned =
            tokio::task::spawn_blocking(move || svc.claim_round(&instance_ids, &busy)).await;
        let release = match planned {
            Ok(Ok(release)) => release,
            Ok(Err(e)) => {
                tracing::warn!("fleet round: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("fleet round: {e}");
                return;
            }
        };
        for id in release {
            self.wal.stop(&id).await;
            let svc = Arc::clone(self);
            let released = tokio::task::spawn_blocking(move || {
                svc.engine
                    .catalog()
                    .release_instance(&id, svc.node_id())
                    .map(|_| id)
            })
            .await;
            match released {
                Ok(Ok(id)) => {
                    tracing::info!(instance = %id, "released to the node that should own it")
                }
                Ok(Err(e)) => tracing::warn!("releasing an instance: {e}"),
                Err(e) => tracing::warn!("releasing an instance: {e}"),
            }
        }
    }

    /// Leaves the fleet (at shutdown, once its work stopped): records a
    /// heartbeat from long ago, so the other nodes count this one out at
    /// once, and gives up every lease it holds, so they take its instances
    /// in their next round rather than when the leases lapse.
    pub(crate) async fn release_all(self: &Arc<Self>) {
        let owned: Vec<String> = std::mem::take(&mut *lock(&self.membership.owned))
            .into_keys()
            .collect();
        let svc = Arc::clone(self);
        let released = tokio::task::spawn_blocking(move || {
            let catalog = svc.engine.catalog();
            catalog.heartbeat(&Node {
                id: svc.node_id().to_string(),
                api_address: svc.settings.node.api_address.clone(),
                started_at: svc.started_at,
                heartbeat_at: DateTime::UNIX_EPOCH,
                version: env!("CARGO_PKG_VERSION").to_string(),
            })?;
            for id in &owned {
                catalog.release_instance(id, svc.node_id())?;
            }
            CatalogResult::Ok(owned.len())
        })
        .await;
        match released {
            Ok(Ok(n)) => tracing::info!("released {n} instance(s) at shutdown"),
            Ok(Err(e)) => tracing::warn!("releasing instances at shutdown: {e}"),
            Err(e) => tracing::warn!("releasing instances at shutdown: {e}"),
        }
    }

    /// The catalog part of a fleet round (blocking): returns the instances
    /// to release. The owned set is updated before it returns, without the
    /// instances to release, so nothing new starts for them.
    fn claim_round(
        &self,
        instance_ids: &[String],
        busy: &BTreeSet<String>,
    ) -> CatalogResult<Vec<String>> {
        let catalog = self.engine.catalog();
        let me = self.node_id().to_string();
        let ttl = self.node_ttl();
        // The catalog's clock, read after `asked`: it said at most `now`
        // then, so a lease's `expires_at - now` counted from `asked` never
        // outlives the lease. Renewals and claims below end at or after
        // `now + ttl`.
        let asked = Instant::now();
        let now = catalog.now()?;
        let renewal_due = lock(&self.membership.last_renewal)
            .is_none_or(|t| t.elapsed() >= self.settings.node.lease / 4);
        if renewal_due {
            catalog.heartbeat(&Node {
                id: me.clone(),
                api_address: self.settings.node.api_address.clone(),
                started_at: self.started_at,
                heartbeat_at: now,
                version: env!("CARGO_PKG_VERSION").to_string(),
            })?;
            catalog.renew_instances(&me, now, ttl)?;
            *lock(&self.membership.last_renewal) = Some(Instant::now());
        }
        let live = live_nodes(&me, &catalog.list_nodes()?, now, ttl);
        let mut owners = owner_map(&catalog.list_owners()?);
        let plan = fleet::plan(&me, instance_ids, &owners, &live, busy, now);
        for id in &plan.claim {
            let held = owners
                .get(id)
                .is_some_and(|o| o.node_id == me && o.expires_at > now);
            if held {
                continue;
            }
            if catalog.claim_instance(id, &me, now, ttl)? {
                tracing::info!(instance = %id, "took ownership");
                owners.insert(
                    id.clone(),
                    fleet::Owner {
                        node_id: me.clone(),
                        expires_at: now + ttl,
                    },
                );
            }
        }
        let known: BTreeSet<&String> = instance_ids.iter().collect();
        let deadline = |expires_at: DateTime<Utc>| {
            asked + (expires_at - now).to_std().unwrap_or(Duration::ZERO)
        };
        let owned: BTreeMap<String, Instant> = owners
            .into_iter()
            .filter(|(id, o)| {
                o.node_id == me
                    && o.expires_at > now
                    && known.contains(id)
                    && !plan.release.contains(id)
            })
            .map(|(id, o)| (id, deadline(o.expires_at)))
            .collect();
        *lock(&self.membership.owned) = owned;
        Ok(plan.release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, NodeSettings, ServiceSettings};
    use strata_catalog::{Catalog, SqliteCatalog};
    use strata_engine::{Engine, EngineSettings};
    use strata_repo::{MemoryStorage, Repository};

    /// A node `id` on the catalog file at `path` (a handle of its own).
    fn node(id: &str, path: &std::path::Path) -> Arc<Service> {
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(path).unwrap());
        let repo = Repository::open_or_init(Arc::new(MemoryStorage::default())).unwrap();
        let engine = Engine::new(catalog, repo, EngineSettings::default());
        let settings = ServiceSettings {
            drills: false,
            node: NodeSettings {
                id: id.into(),
                api_address: format!("{id}:8080"),
                lease: Duration::from_secs(20),
            },
            ..Default::default()
        };
        Service::new(engine, Arc::new(ManualClock::new(Utc::now())), settings)
    }

    fn owned(svc: &Service, ids: &[String]) -> BTreeSet<String> {
        ids.iter().filter(|i| svc.owns(i)).cloned().collect()
    }

    #[tokio::test]
    async fn a_joining_node_gets_its_share_handed_over_and_nothing_is_owned_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let ids: Vec<String> = (0..12).map(|i| format!("pg-{i}")).collect();
        let a = node("a", &path);
        a.fleet_round(ids.clone()).await;
        assert_eq!(owned(&a, &ids).len(), 12, "a node alone owns everything");

        let b = node("b", &path);
        b.fleet_round(ids.clone()).await;
        assert!(owned(&b, &ids).is_empty(), "b waits for a to let go");
        // a sees b live and releases b's share; b claims it on its next
        // round.
        a.fleet_round(ids.clone()).await;
        b.fleet_round(ids.clone()).await;
        let (mine_a, mine_b) = (owned(&a, &ids), owned(&b, &ids));
        assert!(mine_a.is_disjoint(&mine_b), "{mine_a:?} {mine_b:?}");
        assert_eq!(mine_a.len() + mine_b.len(), 12);
        assert_eq!(
            (mine_a.len(), mine_b.len()),
            (6, 6),
            "the bound halves them"
        );
        let live = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let desired = fleet::assign(&ids, &live);
        for id in &mine_b {
            assert_eq!(desired[id], "b");
        }
        // The catalog agrees, and every node reads the same owners.
        assert_eq!(a.instance_owners().unwrap(), b.instance_owners().unwrap());
        assert_eq!(a.owned_count(), mine_a.len());

        // a stops: it leaves and its leases go at once; b takes everything
        // in its next round, without waiting for a lease to lapse.
        a.release_all().await;
        assert_eq!(a.owned_count(), 0);
        b.fleet_round(ids.clone()).await;
        assert_eq!(owned(&b, &ids).len(), 12);
        // What the console's Nodes page shows: a left, b live with all.
        let health: Vec<(String, NodeState, usize, bool)> = b
            .nodes_health()
            .unwrap()
            .into_iter()
            .map(|h| (h.node.id, h.state, h.owned, h.this_node))
            .collect();
        assert_eq!(
            health,
            [
                ("a".to_string(), NodeState::Left, 0, false),
                ("b".to_string(), NodeState::Live, 12, true)
            ]
        );
    }

    #[test]
    fn a_node_without_a_heartbeat_for_a_lease_is_lost_and_one_that_stopped_left() {
        let now = Utc::now();
        let ttl = chrono::Duration::seconds(20);
        let node = |heartbeat_at| Node {
            id: "n".into(),
            api_address: String::new(),
            started_at: now,
            heartbeat_at,
            version: String::new(),
        };
        let secs = chrono::Duration::seconds;
        assert_eq!(
            node_state(false, &node(now - secs(19)), now, ttl),
            NodeState::Live
        );
        assert_eq!(
            node_state(false, &node(now - secs(21)), now, ttl),
            NodeState::Lost
        );
        let stopped = node(DateTime::UNIX_EPOCH);
        assert_eq!(node_state(false, &stopped, now, ttl), NodeState::Left);
        // The node asking is live whatever the catalog last recorded.
        assert_eq!(node_state(true, &stopped, now, ttl), NodeState::Live);
    }

    #[test]
    fn a_node_is_live_while_its_heartbeat_is_recent_and_this_node_always() {
        let now = Utc::now();
        let ttl = chrono::Duration::seconds(20);
        let node = |id: &str, ago: i64| Node {
            id: id.into(),
            api_address: String::new(),
            started_at: now,
            heartbeat_at: now - chrono::Duration::seconds(ago),
            version: String::new(),
        };
        let nodes = [node("fresh", 5), node("stale", 21), node("me", 600)];
        let live = live_nodes("me", &nodes, now, ttl);
        assert_eq!(
            live.into_iter().collect::<Vec<_>>(),
            ["fresh".to_string(), "me".to_string()]
        );
    }
}
