//! The WAL receiver against a repository whose puts of complete segments
//! hang until the test lets them through: the receiver keeps reading the
//! replication stream while a put is stuck (segments wait in the uploader's
//! queue), acknowledges to the server only WAL that is stored, and once the
//! store answers every segment is stored, whole, contiguous and in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use strata_catalog::{Catalog, Instance, SqliteCatalog};
use strata_engine::{Engine, EngineSettings, Progress, WalReceiveOptions};
use strata_repo::storage::StorageResult;
use strata_repo::{LocalStorage, ObjectSize, Repository, Storage};
use testkit::Cluster;

#[derive(Debug, Default)]
struct Gate {
    closed: bool,
    /// The complete segment whose put is held.
    held: Option<String>,
    /// Complete segments stored, in the order stored.
    stored: Vec<String>,
}

/// Local storage whose puts of complete WAL segments wait while the gate
/// is closed.
#[derive(Debug)]
struct GatedStorage {
    inner: LocalStorage,
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl GatedStorage {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_closed(&self, closed: bool) {
        self.gate().closed = closed;
        self.changed.notify_all();
    }
}

/// Opens the gate when the test ends, passed or failed, so the runtime's
/// threads finish and a failure is reported rather than a hang.
struct OpenOnDrop(Arc<GatedStorage>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set_closed(false);
    }
}

fn is_complete_segment(key: &str) -> bool {
    key.contains("/wal/") && !key.ends_with(".partial") && !key.ends_with(".history")
}

impl Storage for GatedStorage {
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        if !is_complete_segment(key) {
            return self.inner.put(key, data);
        }
        let mut gate = self.gate();
        while gate.closed {
            gate.held = Some(key.to_string());
            self.changed.notify_all();
            gate = self.changed.wait(gate).unwrap_or_else(|p| p.into_inner());
        }
        gate.held = None;
        self.inner.put(key, data)?;
        gate.stored.push(key.to_string());
        Ok(())
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<String>> {
        self.inner.list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> StorageResult<Vec<ObjectSize>> {
        self.inner.list_sizes(prefix)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.inner.delete(key)
    }
    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.inner.exists(key)
    }
    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
}

/// The receiver's received position, as the service's metrics see it.
#[derive(Default)]
struct Received(AtomicU64);

impl Progress for Received {
    fn update(&self, _: &str, _: u64, _: Option<u64>) {}
    fn message(&self, _: &str) {}
    fn wal_position(&self, received: u64, _: u64) {
        self.0.fetch_max(received, Ordering::SeqCst);
    }
}

/// Polls `done` until it holds; panics with `what` after a minute.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a little WAL and ends the segment; returns the switch's LSN.
fn fill_segment(cluster: &Cluster, db: &str) -> String {
    cluster.psql(
        db,
        "INSERT INTO t SELECT g FROM generate_series(1, 100) g; SELECT pg_switch_wal()",
    )
}

fn lsn_value(cluster: &Cluster, lsn: &str) -> u64 {
    cluster
        .psql("postgres", &format!("SELECT '{lsn}'::pg_lsn - '0/0'"))
        .parse()
        .expect("an LSN difference is a number")
}

/// Whether the slot's restart position (the flush position Strata
/// reported) is at least `lsn`.
fn slot_at_least(cluster: &Cluster, slot: &str, lsn: &str) -> bool {
    cluster.psql(
        "postgres",
        &format!(
            "SELECT coalesce(restart_lsn >= '{lsn}'::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    ) == "t"
}

#[test]
fn receipt_continues_while_a_segment_put_hangs() {
    let cluster = testkit::shared_cluster(15);
    let db = "uploader";
    cluster.psql("postgres", &format!("CREATE DATABASE {db}"));
    cluster.psql(db, "CREATE TABLE t (x int)");
    let dir = testkit::temp_dir("strata-wal-uploader-");
    let storage = Arc::new(GatedStorage {
        inner: LocalStorage::new(dir.join("repo")).unwrap(),
        gate: Mutex::new(Gate::default()),
        changed: Condvar::new(),
    });
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&dir.join("catalog.db")).unwrap());
    let repo = Repository::open_or_init(storage.clone() as Arc<dyn Storage>).unwrap();
    let settings = EngineSettings {
        wal_status_interval: Duration::from_millis(200),
        ..EngineSettings::default()
    };
    let engine = Engine::new(catalog.clone(), repo.clone(), settings);
    let id = "uploader";
    engine
        .add_instance(&Instance::new(
            id,
            cluster.host(),
            cluster.port(),
            "postgres",
            strata_catalog::SslMode::Disable,
        ))
        .unwrap();
    let slot = strata_engine::slot_name(id);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let received = Arc::new(Received::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    storage.set_closed(true);
    let _open = OpenOnDrop(storage.clone());
    let receiver = {
        let engine = engine.clone();
        let received = received.clone();
        runtime.spawn(async move {
            engine
                .receive_wal(id, shutdown, WalReceiveOptions::default(), &*received)
                .await
        })
    };
    wait_for("the receiver streams", || {
        received.0.load(Ordering::SeqCst) > 0
    });

    // The first segment completes and its put hangs.
    let first = fill_segment(cluster, db);
    wait_for("the first segment's put is held", || {
        storage.gate().held.is_some()
    });
    let held = storage.gate().held.clone().unwrap();

    // Two more segments and some WAL after them are still received.
    fill_segment(cluster, db);
    let third = fill_segment(cluster, db);
    cluster.psql(db, "INSERT INTO t VALUES (1)");
    let end = cluster.psql("postgres", "SELECT pg_current_wal_lsn()");
    let end_value = lsn_value(cluster, &end);
    wait_for("WAL after the held segment is received", || {
        received.0.load(Ordering::SeqCst) >= end_value
    });
    {
        let gate = storage.gate();
        assert_eq!(gate.held.as_deref(), Some(held.as_str()));
        assert!(gate.stored.is_empty(), "stored: {:?}", gate.stored);
    }
    // Nothing past what is stored is acknowledged as flushed: a partial
    // refresh may have stored the first segment up to its switch record
    // (the receiver pauses between small messages, so a refresh can fall
    // between that record and the segment's padding), never to its end.
    let first_end = cluster.psql(
        "postgres",
        &format!(
            "SELECT '0/0'::pg_lsn + (floor(('{first}'::pg_lsn - '0/0') / 16777216) + 1) * 16777216"
        ),
    );
    assert!(!slot_at_least(cluster, &slot, &first_end));
    assert!(!segments(&*catalog, id).iter().any(|w| !w.partial));

    // The store answers: everything queued is stored and acknowledged.
    storage.set_closed(false);
    wait_for("the slot follows what is stored", || {
        slot_at_least(cluster, &slot, &third)
    });
    stop.send(true).unwrap();
    runtime.block_on(receiver).unwrap().unwrap();

    let gate = storage.gate();
    assert_eq!(gate.stored.first(), Some(&held));
    let mut in_order = gate.stored.clone();
    in_order.sort();
    assert_eq!(gate.stored, in_order, "segments stored out of order");
    let complete: Vec<_> = segments(&*catalog, id)
        .into_iter()
        .filter(|w| !w.partial)
        .collect();
    assert_eq!(complete.len(), gate.stored.len());
    assert!(complete.len() >= 3, "{complete:?}");
    for pair in complete.windows(2) {
        assert_eq!(pair[0].end_lsn, pair[1].begin_lsn, "a gap in the archive");
    }
    for w in &complete {
        assert!(gate.stored.contains(&w.object_key));
        let (meta, bytes) = repo.read_wal(&w.object_key).unwrap();
        assert_eq!(bytes.len() as u64, meta.end_lsn - meta.begin_lsn);
        assert_eq!(w.end_lsn - w.begin_lsn, bytes.len() as u64);
    }
    assert!(lsn_value(cluster, &third) <= complete.last().unwrap().end_lsn.0);
}

fn segments(catalog: &dyn Catalog, id: &str) -> Vec<strata_catalog::WalSegmentRow> {
    let mut rows = catalog.list_wal_segments(id).unwrap();
    rows.sort_by_key(|w| (w.timeline, w.begin_lsn, w.partial));
    rows
}
