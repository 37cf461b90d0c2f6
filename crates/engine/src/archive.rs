//! Continuous WAL archiving from a permanent physical replication slot.
//!
//! The slot makes the server keep WAL until Strata has stored it, so a
//! receiver that was down resumes with no gap. Complete segments are stored
//! as they fill; the current one is stored as a `.partial` every
//! `wal_flush_interval`, which bounds the recovery point objective. Storing
//! is the [`WalUploader`]'s, off the runtime: the loop reading the stream
//! never waits on the repository unless the uploader's queue is full, and
//! acknowledges to the server only what the uploader reports stored. Timeline
//! switches (a promoted standby) are followed: the stream ends at the switch
//! point, the new timeline's history file is stored, and streaming continues
//! on the new timeline. Reference: PostgreSQL's receivelog.c describes the
//! same protocol dance from the client side.

use std::sync::Arc;
use std::time::Duration;

use pg_replication::{ReplicationClient, ReplicationMessage};
use pg_wal::history::TimelineHistory;
use pg_wal::{Lsn, TimelineId, WalGeometry};
use strata_catalog::Instance;
use tokio::sync::watch;

use crate::blocking::blocking;
use crate::connect::{explain, open_session, remember_facts};
use crate::events::EventOptions;
use crate::names::{NameRefresher, RelationNames};
use crate::segment::SegmentArchiver;
use crate::silence::Silence;
use crate::wal_uploader::{Stored, WalUploader};
use crate::{Engine, EngineError, EngineResult, Progress};

/// An XLogData message shorter than this, with nothing more received,
/// means the server sends WAL as commits flush it, one small message each:
/// the receiver then waits [`READ_PAUSE`] before reading again, so one
/// read takes in the WAL of many commits (at thousands of commits a
/// second, a read per message cost more CPU than storing the WAL). A
/// server sending a backlog fills its messages (128 kB) and is read
/// without pause.
const SMALL_MESSAGE: usize = 64 * 1024;

/// See [`SMALL_MESSAGE`]: short against the partial refresh interval, so
/// what is durable lags by no more than that; the socket buffers what
/// arrives meanwhile.
const READ_PAUSE: Duration = Duration::from_millis(20);

/// During a [`READ_PAUSE`] the socket is reported readable only once this
/// much has arrived (`SO_RCVLOWAT`): the kernel then holds back the
/// wake-ups the runtime would otherwise take once per commit for a task
/// that is not reading. More than a pause brings at the rates where
/// messages are small (so the pause's timer, not a packet, ends it), and
/// cut to a quarter of the socket's receive buffer when it is set, so
/// setting it never grows the buffer or clamps the TCP window (the buffer
/// grows by itself, to megabytes, once WAL streams).
const PAUSE_LOW_WATER: usize = 256 * 1024;

/// Options for [`Engine::receive_wal`].
#[derive(Debug, Clone, Default)]
pub struct WalReceiveOptions {
    /// Give up instead of reconnecting when the server goes away.
    pub no_reconnect: bool,
}

/// The replication slot Strata uses for an instance.
pub fn slot_name(instance_id: &str) -> String {
    let cleaned: String = instance_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("strata_{cleaned}");
    name.truncate(63);
    name
}

enum Ended {
    Shutdown,
}

/// What failed last, which decides when the receiver counts as working
/// again: a lost connection once it streams, storing once WAL is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Connection,
    Storing,
}

/// The receiver's health across reconnections.
#[derive(Debug, Default)]
struct Health {
    failing: Option<Failure>,
    /// WAL was stored since the last (re)connection.
    stored: bool,
}

impl Health {
    /// Records that WAL was stored (or, with `stored` false, that streaming
    /// started) and reports the recovery it ends.
    fn working(&mut self, stored: bool, progress: &dyn Progress) {
        self.stored |= stored;
        let recovered = match self.failing {
            Some(Failure::Connection) => true,
            Some(Failure::Storing) => stored,
            None => false,
        };
        if recovered {
            self.failing = None;
            progress.wal_recovered();
        }
    }
}

/// Errors of the repository or the catalog (a full disk, a refused write),
/// as opposed to the server or the network.
fn is_storage_error(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Repo(_) | EngineError::Catalog(_) | EngineError::Io { .. }
    )
}

impl Engine {
    /// Streams WAL of `instance_id` into the repository until `shutdown`
    /// turns true. Reconnects when the server goes away or storing fails,
    /// waiting 2 s, then twice as long after each failure in a row, up to
    /// `wal_retry_max`; every failure is reported through
    /// [`Progress::wal_failing`] with its cause, and the way back through
    /// [`Progress::wal_recovered`].
    pub async fn receive_wal(
        &self,
        instance_id: &str,
        mut shutdown: watch::Receiver<bool>,
        opts: WalReceiveOptions,
        progress: &dyn Progress,
    ) -> EngineResult<()> {
        let first_delay = Duration::from_secs(2).min(self.settings.wal_retry_max);
        let mut delay = first_delay;
        let mut failures: u32 = 0;
        let mut streamed_once = false;
        // A receiver started again after failing (by whoever supervises
        // it) reports its recovery once it streams.
        let mut health = Health {
            failing: Some(Failure::Connection),
            stored: false,
        };
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            health.stored = false;
            // An unreachable catalog is retried here like an unreachable
            // server (the slot holds the WAL meanwhile).
            let outcome = match self.catalog.get_instance(instance_id) {
                // Each connection unwraps the instance's key anew: a key
                // disabled in the KMS stops archiving at the next one.
                Ok(mut instance) => match self.for_instance(instance_id).await {
                    Ok(engine) => {
                        engine
                            .receive_once(
                                &mut instance,
                                &mut shutdown,
                                &mut streamed_once,
                                &mut health,
                                progress,
                            )
                            .await
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            };
            match outcome {
                Ok(Ended::Shutdown) => return Ok(()),
                Err(e) => {
                    // A repository that refuses writes (full, below its
                    // free-space minimum) may take space again: keep trying.
                    let retry = !opts.no_reconnect
                        && (streamed_once || e.is_transient() || is_storage_error(&e));
                    if !retry {
                        return Err(e);
                    }
                    if health.stored {
                        // It worked for a while: a new trouble starts over.
                        failures = 0;
                        delay = first_delay;
                    }
                    failures = failures.saturating_add(1);
                    health.failing = Some(if is_storage_error(&e) {
                        Failure::Storing
                    } else {
                        Failure::Connection
                    });
                    progress.wal_failing(&e, failures, delay);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    delay = (delay * 2).min(self.settings.wal_retry_max);
                }
            }
        }
    }

    async fn receive_once(
        &self,
        instance: &mut Instance,
        shutdown: &mut watch::Receiver<bool>,
        streamed_once: &mut bool,
        health: &mut Health,
        progress: &dyn Progress,
    ) -> EngineResult<Ended> {
        let mut session = open_session(instance).await?;
        remember_facts(self, instance, &session)?;
        let geometry = session.geometry;
        // Where the slot holds WAL from, when it was created just now: WAL
        // before that may already be gone from the server.
        let fresh_slot_start = self
            .ensure_slot(instance, &mut session.client, progress)
            .await?;
        let server_tli = session.timeline;
        self.store_history(instance, &mut session.client, server_tli)
            .await?;
        let (tli, mut start) = self
            .resume_point(instance, &mut session.client, server_tli, geometry)
            .await?;
        if let Some(held) = lost_before_slot(start, fresh_slot_start, tli == server_tli, geometry) {
            progress.message(&format!(
                "warning: WAL of {} from {start} to {held} was not held by a replication slot and cannot be archived; point-in-time recovery into that range is not possible (take a new backup)",
                instance.id
            ));
            start = held;
        }
        progress.message(&format!(
            "streaming WAL of {} from {start} on timeline {tli}",
            instance.id
        ));
        *streamed_once = true;

        let start = geometry.segment_start(geometry.segment_of(start));
        let mut uploader = WalUploader::start(self.clone(), &instance.id, start);
        let events = self.event_options(instance);
        let streamed = self
            .stream_wal(
                instance,
                &mut session.client,
                &mut uploader,
                geometry,
                (tli, start),
                events,
                shutdown,
                health,
                progress,
            )
            .await;
        // Whatever ended the stream, what was received is stored before a
        // reconnection reads the catalog for where to resume.
        let (left, stored) = uploader.finish().await;
        for s in &left {
            note_stored(s, health, progress);
        }
        // A storing failure is the cause, whatever the stream saw after it.
        stored?;
        streamed
    }

    /// Creates the instance's slot unless it exists; when created now,
    /// returns where it holds WAL from.
    async fn ensure_slot(
        &self,
        instance: &Instance,
        client: &mut ReplicationClient,
        progress: &dyn Progress,
    ) -> EngineResult<Option<Lsn>> {
        let slot = slot_name(&instance.id);
        match client.create_physical_slot(&slot, false, true).await {
            Ok(reserved) => {
                progress.message(&format!("created replication slot {slot}"));
                match reserved {
                    Some(lsn) => Ok(Some(lsn)),
                    None => Ok(Some(
                        client
                            .identify_system()
                            .await
                            .map_err(|e| explain(instance, e))?
                            .xlogpos,
                    )),
                }
            }
            Err(e) if e.sqlstate() == Some("42710") => Ok(None),
            Err(e) => Err(explain(instance, e)),
        }
    }

    /// Streams WAL from `from` (a segment start on its timeline), following
    /// timeline switches, handing segments to `uploader` and acknowledging
    /// to the server what it reports stored.
    #[allow(clippy::too_many_arguments)]
    async fn stream_wal(
        &self,
        instance: &Instance,
        client: &mut ReplicationClient,
        uploader: &mut WalUploader,
        geometry: WalGeometry,
        from: (TimelineId, Lsn),
        events: Option<(EventOptions, NameRefresher)>,
        shutdown: &mut watch::Receiver<bool>,
        health: &mut Health,
        progress: &dyn Progress,
    ) -> EngineResult<Ended> {
        let slot = slot_name(&instance.id);
        let (mut tli, start) = from;
        let (event_opts, refresher) = events.unzip();
        let mut archiver = SegmentArchiver::new(geometry, tli, start, uploader.queue())
            .with_events(event_opts.clone());
        let mut flush_tick = tokio::time::interval(self.settings.wal_flush_interval);
        let mut status_tick = tokio::time::interval(self.settings.wal_status_interval);
        let mut acknowledged = uploader.durable();
        loop {
            let seg_start = archiver.position();
            let mut stream = client
                .start_replication(Some(&slot), seg_start, Some(tli))
                .await
                .map_err(|e| explain(instance, e))?;
            // Only now is a lost connection over: a server that accepts
            // connections but cannot stream is still failing.
            progress.wal_streaming();
            health.working(false, progress);
            let mut silence = Silence::new(self.settings.wal_receiver_timeout);
            let next = loop {
                tokio::select! {
                    _ = shutdown.changed() => {
                        archiver.flush_partial().await?;
                        stop_stream(stream, archiver.position(), uploader, health, progress).await;
                        return Ok(Ended::Shutdown);
                    }
                    stored = uploader.next_stored() => match stored {
                        Some(s) => {
                            note_stored(&s, health, progress);
                            // Tell the server at once what became durable:
                            // its slot advances and its lag figures
                            // (pg_stat_replication's flush_lag) measure the
                            // repository, not the status interval.
                            if s.end > acknowledged {
                                acknowledged = s.end;
                                stream.send_status(archiver.position(), uploader.durable(), Lsn::INVALID, false)
                                    .await.map_err(|e| explain(instance, e))?;
                            }
                        }
                        // The worker failed; `finish` returns why.
                        None => return Err(EngineError::Failed("the WAL uploader stopped".into())),
                    },
                    msg = tokio::time::timeout_at(silence.deadline(), stream.next()) => {
                        // A message that is ready wins over the deadline.
                        let Ok(msg) = msg else {
                            let (written, flushed) = (archiver.position(), uploader.durable());
                            let silent = silence.at_deadline(&mut stream, written, flushed)
                                .await.map_err(|e| explain(instance, e))?;
                            if let Some(quiet) = silent {
                                return Err(EngineError::Unreachable(format!(
                                    "instance {}: the server sent nothing on the WAL stream for {} s, not even \
                                     when asked to answer (wal.receiver_timeout_secs)",
                                    instance.id,
                                    quiet.as_secs()
                                )));
                            }
                            continue;
                        };
                        match msg.map_err(|e| explain(instance, e))? {
                            Some(ReplicationMessage::XLogData { start, data, server_wal_end }) => {
                                // Waits only when the uploader's queue is full.
                                archiver.push(start, &data).await?;
                                if archiver.take_catalog_changed() {
                                    if let Some(r) = &refresher {
                                        r.request();
                                    }
                                }
                                progress.wal_position(archiver.position().0, server_wal_end.0);
                                if data.len() < SMALL_MESSAGE && !stream.has_buffered_message() {
                                    // Packets that come during the pause would
                                    // each wake the runtime to no purpose.
                                    let held = stream.hold_reads_below(PAUSE_LOW_WATER).is_ok();
                                    tokio::time::sleep(READ_PAUSE).await;
                                    if held {
                                        stream.hold_reads_below(1).map_err(|e| explain(instance, e))?;
                                    }
                                }
                            }
                            Some(ReplicationMessage::Keepalive { reply_requested, server_wal_end }) => {
                                progress.wal_position(archiver.position().0, server_wal_end.0);
                                if reply_requested {
                                    stream.send_status(archiver.position(), uploader.durable(), Lsn::INVALID, false)
                                        .await.map_err(|e| explain(instance, e))?;
                                }
                            }
                            Some(ReplicationMessage::EndOfTimeline { next_timeline, next_start }) => {
                                break (next_timeline, next_start);
                            }
                            None => return Err(EngineError::Unreachable(format!(
                                "instance {}: the server closed the WAL stream (connection lost)", instance.id))),
                        }
                        // After the message is handled: time spent storing
                        // it is no silence of the server's.
                        silence.heard();
                    }
                    _ = flush_tick.tick() => {
                        archiver.offer_partial()?;
                    }
                    _ = status_tick.tick() => {
                        stream.send_status(archiver.position(), uploader.durable(), Lsn::INVALID, false)
                            .await.map_err(|e| explain(instance, e))?;
                    }
                }
            };
            let (next_tli, next_start) = next;
            archiver.flush_partial().await?;
            stream.stop().await.map_err(|e| explain(instance, e))?;
            self.store_history(instance, client, next_tli).await?;
            progress.message(&format!(
                "timeline {tli} ended at {next_start}; following timeline {next_tli}"
            ));
            tli = next_tli;
            archiver = SegmentArchiver::new(geometry, tli, next_start, uploader.queue())
                .with_events(event_opts.clone());
        }
    }

    /// How the receiver of `instance` decodes recovery events, with the
    /// reader of its names (none when events are off or the names cannot
    /// be loaded from the catalog).
    fn event_options(&self, instance: &Instance) -> Option<(EventOptions, NameRefresher)> {
        if !self.settings.recovery_events {
            return None;
        }
        let names = match RelationNames::load(self, &instance.id) {
            Ok(n) => Arc::new(n),
            Err(e) => {
                tracing::warn!(instance = %instance.id, "recovery events off: {e}");
                return None;
            }
        };
        let opts = EventOptions {
            names: Some(names.clone()),
            min_rows: self.settings.event_min_rows,
        };
        Some((
            opts,
            NameRefresher::start(self.clone(), instance.clone(), names),
        ))
    }

    /// Stores the history file of `tli` unless it is stored already.
    async fn store_history(
        &self,
        instance: &Instance,
        client: &mut ReplicationClient,
        tli: TimelineId,
    ) -> EngineResult<()> {
        if tli.0 <= 1 {
            return Ok(());
        }
        let (repo, id) = (self.repo.clone(), instance.id.clone());
        if blocking(move || Ok(repo.read_history(&id, tli)?))
            .await?
            .is_some()
        {
            return Ok(());
        }
        let (_, content) = client
            .timeline_history(tli)
            .await
            .map_err(|e| explain(instance, e))?;
        let (repo, id) = (self.repo.clone(), instance.id.clone());
        blocking(move || Ok(repo.put_history(&id, tli, &content)?)).await
    }

    /// Where streaming resumes: after the newest complete segment archived,
    /// at the start of a partial one, or where the slot holds WAL from.
    async fn resume_point(
        &self,
        instance: &Instance,
        client: &mut ReplicationClient,
        server_tli: TimelineId,
        geometry: WalGeometry,
    ) -> EngineResult<(TimelineId, Lsn)> {
        let (catalog, id) = (self.catalog.clone(), instance.id.clone());
        let newest = blocking(move || Ok(catalog.list_wal_segments(&id)?))
            .await?
            .into_iter()
            .max_by(|a, b| {
                (a.timeline, a.begin_lsn, !a.partial).cmp(&(b.timeline, b.begin_lsn, !b.partial))
            });
        let (tli, pos) = match newest {
            Some(w) if w.partial => (w.timeline, w.begin_lsn),
            Some(w) => (w.timeline, w.end_lsn),
            None => {
                let slot = slot_name(&instance.id);
                let from_slot = if client.server_version_num() >= 150000 {
                    client
                        .read_replication_slot(&slot)
                        .await
                        .map_err(|e| explain(instance, e))?
                        .and_then(|(lsn, _)| lsn)
                } else {
                    None
                };
                let pos = match from_slot {
                    Some(lsn) if lsn.is_valid() => lsn,
                    _ => {
                        client
                            .identify_system()
                            .await
                            .map_err(|e| explain(instance, e))?
                            .xlogpos
                    }
                };
                (server_tli, pos)
            }
        };
        if tli > server_tli {
            return Err(EngineError::Refused(format!(
                "instance {}: the archive already holds timeline {tli} but the server is on timeline {server_tli}; this is not the server the archive came from",
                instance.id
            )));
        }
        if tli == server_tli {
            return Ok((tli, geometry.segment_start(geometry.segment_of(pos))));
        }
        let (repo, id) = (self.repo.clone(), instance.id.clone());
        let text = blocking(move || Ok(repo.read_history(&id, server_tli)?))
            .await?
            .ok_or_else(|| {
                EngineError::Failed(format!("history of timeline {server_tli} is not stored"))
            })?;
        let history = TimelineHistory::parse(server_tli, &String::from_utf8_lossy(&text))
            .map_err(|e| EngineError::Failed(format!("timeline {server_tli} history: {e}")))?;
        match history.switchpoint_of(tli) {
            // Still WAL of the old timeline to fetch: the server streams it
            // up to the switch point, then tells us to move on.
            Some(sp) if pos < sp => Ok((tli, geometry.segment_start(geometry.segment_of(pos)))),
            Some(sp) => {
                let next = history.timeline_at(sp);
                Ok((next, geometry.segment_start(geometry.segment_of(sp))))
            }
            None => Err(EngineError::Refused(format!(
                "instance {}: timeline {tli} in the archive is not an ancestor of the server's timeline {server_tli}",
                instance.id
            ))),
        }
    }
}

/// Reports what the uploader stored: a complete segment by name, and WAL
/// written as the sign that storing works.
fn note_stored(stored: &Stored, health: &mut Health, progress: &dyn Progress) {
    if let Some(name) = &stored.segment {
        progress.message(&format!("stored WAL segment {name}"));
    }
    if stored.wrote {
        health.working(true, progress);
    }
}

/// Where streaming must start instead of `start` when a slot created just
/// now (holding WAL from `fresh_slot`) holds nothing before a later segment
/// on the server's own timeline: the WAL in between is gone for good.
fn lost_before_slot(
    start: Lsn,
    fresh_slot: Option<Lsn>,
    on_server_timeline: bool,
    geometry: WalGeometry,
) -> Option<Lsn> {
    let held = fresh_slot.filter(|_| on_server_timeline)?;
    let held = geometry.segment_start(geometry.segment_of(held));
    (start < held).then_some(held)
}

/// Ends a stream being shut down: acknowledges to the server only what the
/// uploader stored, waiting for it (it stops early only when failing).
async fn stop_stream(
    mut stream: pg_replication::ReplicationStream<'_>,
    pos: Lsn,
    uploader: &mut WalUploader,
    health: &mut Health,
    progress: &dyn Progress,
) {
    while uploader.durable() < pos {
        match uploader.next_stored().await {
            Some(s) => note_stored(&s, health, progress),
            None => break,
        }
    }
    let _ = stream
        .send_status(pos, uploader.durable(), Lsn::INVALID, false)
        .await;
    let _ = stream.stop().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Recoveries(AtomicU32);

    impl Progress for Recoveries {
        fn update(&self, _: &str, _: u64, _: Option<u64>) {}
        fn message(&self, _: &str) {}
        fn wal_recovered(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A storing failure ends only when WAL is stored: reconnecting is not
    /// enough. A lost connection ends once streaming starts again.
    #[test]
    fn recovery_waits_for_what_failed() {
        let p = Recoveries::default();
        let mut h = Health {
            failing: Some(Failure::Storing),
            stored: false,
        };
        h.working(false, &p);
        assert_eq!(
            (h.failing, p.0.load(Ordering::SeqCst)),
            (Some(Failure::Storing), 0)
        );
        h.working(true, &p);
        assert_eq!((h.failing, p.0.load(Ordering::SeqCst)), (None, 1));
        assert!(h.stored);
        // Working while nothing failed reports nothing.
        h.working(true, &p);
        assert_eq!(p.0.load(Ordering::SeqCst), 1);
        h.failing = Some(Failure::Connection);
        h.working(false, &p);
        assert_eq!((h.failing, p.0.load(Ordering::SeqCst)), (None, 2));
    }

    #[test]
    fn full_repositories_are_storage_failures() {
        let full = EngineError::Repo(strata_repo::RepoError::Storage(
            strata_repo::StorageError::BelowMinFree {
                key: "packs/aa/b.pack".into(),
                needed: 1,
                free: 2,
                minimum: 3,
            },
        ));
        assert!(is_storage_error(&full));
        assert!(!full.is_transient());
        assert!(!is_storage_error(&EngineError::Unreachable("gone".into())));
    }

    /// Where WAL streaming starts when the slot was created just now: the
    /// WAL before the slot's segment is gone, whatever the catalog resumes from.
    #[test]
    fn wal_a_new_slot_did_not_hold() {
        let g = WalGeometry::new(16 << 20).unwrap();
        let seg = |n: u64| Lsn(n << 24);
        for (start, fresh, same_tli, expected) in [
            // An existing slot held everything since the last run.
            (seg(2), None, true, None),
            // A new slot holding from inside segment 5: resume at its start.
            (seg(2), Some(Lsn((5 << 24) + 0x28)), true, Some(seg(5))),
            // Already at or past the slot's segment: nothing lost.
            (seg(5), Some(Lsn((5 << 24) + 0x28)), true, None),
            (seg(6), Some(Lsn((5 << 24) + 0x28)), true, None),
            // Catching up an older timeline: the slot says nothing of it.
            (seg(2), Some(seg(5)), false, None),
        ] {
            assert_eq!(
                lost_before_slot(start, fresh, same_tli, g),
                expected,
                "{start} {fresh:?} {same_tli}"
            );
        }
    }
}
