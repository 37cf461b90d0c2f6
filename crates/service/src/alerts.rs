//! Notifications: what each round of the serving node finds worth telling
//! (a failed backup or drill job, a WAL receiver failing longer than a
//! threshold and its recovery, no successful backup within N hours, stored
//! bytes above the free quota, cross-region copies failing, a recovery
//! window shorter than the log retention promises) and their
//! delivery to the configured sinks, each recorded as a `notify` job.
//!
//! Each occurrence is announced once. A failed job is one occurrence; a
//! condition (WAL receiver, overdue backup, quota, copies) is announced when
//! it begins and re-armed when it ends. What was announced is kept in memory
//! only: after a restart, jobs that ended before it are not announced again,
//! and a condition still in force is announced once more (the catalog's
//! `notify` jobs record every delivery for the audit).
//!
//! A round reads only the jobs that ended since shortly before the previous
//! round ([`JOB_END_SLACK`]) and each instance's newest ended cross-region
//! copy, never the whole job history.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use strata_catalog::{BackupStatus, Instance, Job, JobId, JobKind, JobState};
use strata_notify::{Delivered, Event, EventKind, Notifier, NotifyError, Sink};

use crate::{finish_job, lock, Service};

/// Notification settings of the service.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// The sinks (none: notifications are off).
    pub notifier: Notifier,
    /// Announce an instance without a successful backup for this long
    /// (`None`: never).
    pub backup_overdue: Option<chrono::Duration>,
    /// Announce a WAL receiver failing (or its server unreachable) for
    /// longer than this.
    pub wal_failing_after: Duration,
    /// Announce a WAL receiver further behind its server than this many
    /// bytes for longer than `wal_failing_after` (`None`: never).
    pub wal_lag_bytes: Option<u64>,
    /// Announce a recovery window shorter than the log retention promises
    /// by more than this (`None`: never).
    pub window_short_by: Option<chrono::Duration>,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            notifier: Notifier::default(),
            backup_overdue: None,
            wal_failing_after: Duration::from_secs(300),
            wal_lag_bytes: None,
            window_short_by: None,
        }
    }
}

/// A state of an instance announced when it begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Condition {
    /// The WAL receiver fails.
    WalFailing,
    /// The WAL receiver stays behind its server.
    WalLagging,
    /// No recent successful backup.
    BackupOverdue,
    /// Above the free quota.
    OverQuota,
    /// The latest cross-region copy failed.
    CopyFailing,
    /// The recovery window falls short of the promise.
    WindowShort,
}

/// How often an instance's recovery window is measured (by the service
/// clock): it reads every WAL segment row of the instance.
const WINDOW_CHECK_EVERY: chrono::Duration = chrono::Duration::minutes(5);

/// By how much a recovery window from `begin` to `end` falls short of
/// `promised` (the log retention, or the time since registration when that
/// is shorter); `None` without a window at all.
pub(crate) fn window_shortfall(
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    promised: chrono::Duration,
) -> chrono::Duration {
    let length = window.map_or(chrono::Duration::zero(), |(begin, end)| end - begin);
    promised - length
}

/// How a condition changed in this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Began,
    Ended,
}

/// How far before the previous round a round looks for ended jobs: a job's
/// end time is taken before its record is written, so one that ended just
/// before a round may be visible only to the next.
pub(crate) const JOB_END_SLACK: chrono::Duration = chrono::Duration::minutes(10);

/// What was announced: failed jobs and conditions in force.
#[derive(Debug, Default)]
pub(crate) struct Occurrences {
    jobs: HashSet<JobId>,
    active: HashSet<(Condition, String)>,
    /// When the previous round read the ended jobs.
    last_round: Option<DateTime<Utc>>,
    /// When each instance's recovery window was last measured.
    window_checked: std::collections::HashMap<String, DateTime<Utc>>,
    /// Since when each instance's WAL receiver has been behind, while it is.
    lagging_since: std::collections::HashMap<String, DateTime<Utc>>,
}

impl Occurrences {
    /// Whether the failure of `job` is news (and now known).
    pub(crate) fn first_failure(&mut self, job: JobId) -> bool {
        self.jobs.insert(job)
    }

    /// Where this round's reading of ended jobs starts: shortly before the
    /// previous reading, or at `started` (the process start) for the first.
    pub(crate) fn ended_since(&self, started: DateTime<Utc>) -> DateTime<Utc> {
        self.last_round
            .map_or(started, |t| (t - JOB_END_SLACK).max(started))
    }

    /// Whether the recovery window of `instance` is due for measuring at
    /// `now` (and now measured); a clock set back makes it due.
    pub(crate) fn window_due(&mut self, instance: &str, now: DateTime<Utc>) -> bool {
        let due = self
            .window_checked
            .get(instance)
            .is_none_or(|&t| now < t || now - t >= WINDOW_CHECK_EVERY);
        if due {
            self.window_checked.insert(instance.to_string(), now);
        }
        due
    }

    /// Records a reading taken at `at` that found `read`, and forgets
    /// failures outside it: they can no longer come back, as the reading
    /// only moves forward. A reading that failed is not recorded, so the
    /// next one starts where this one would have.
    pub(crate) fn read_ended(&mut self, at: DateTime<Utc>, read: &HashSet<JobId>) {
        self.last_round = Some(at);
        self.jobs.retain(|j| read.contains(j));
    }

    /// Whether `instance`'s receiver, behind now or not (`behind`), has been
    /// behind without a break for at least `threshold` at `now`.
    pub(crate) fn behind_for(
        &mut self,
        instance: &str,
        behind: bool,
        now: DateTime<Utc>,
        threshold: chrono::Duration,
    ) -> bool {
        if !behind {
            self.lagging_since.remove(instance);
            return false;
        }
        let since = *self
            .lagging_since
            .entry(instance.to_string())
            .or_insert(now);
        now - since >= threshold
    }

    /// Records whether `condition` holds for `instance` and says whether
    /// that began or ended it.
    pub(crate) fn observe(
        &mut self,
        condition: Condition,
        instance: &str,
        holds: bool,
    ) -> Option<Change> {
        let key = (condition, instance.to_string());
        match (holds, self.active.contains(&key)) {
            (true, false) => {
                self.active.insert(key);
                Some(Change::Began)
            }
            (false, true) => {
                self.active.remove(&key);
                Some(Change::Ended)
            }
            _ => None,
        }
    }

    /// Forgets conditions of instances not in `instances` (deregistered,
    /// or run by another node now).
    pub(crate) fn retain(&mut self, instances: &HashSet<&str>) {
        self.active.retain(|(_, i)| instances.contains(i.as_str()));
        self.window_checked
            .retain(|i, _| instances.contains(i.as_str()));
        self.lagging_since
            .retain(|i, _| instances.contains(i.as_str()));
    }
}

/// The event a failed job makes, if its kind is announced.
fn failed_job_event(job: &Job, instance: &str) -> Option<Event> {
    let kind = match job.kind {
        JobKind::Backup | JobKind::SnapshotBackup => EventKind::BackupFailed,
        JobKind::Drill => EventKind::DrillFailed,
        _ => return None,
    };
    let error = job.error.clone().unwrap_or_default();
    let what = if kind == EventKind::DrillFailed {
        "restore drill"
    } else {
        "backup"
    };
    let at = job.finished_at.unwrap_or(job.started_at);
    Some(
        Event::new(
            kind,
            Some(instance),
            at,
            format!(
                "{what} job {} of instance {instance} failed: {error}",
                job.id
            ),
        )
        .with_details(json!({
            "job_id": job.id.get(),
            "backup_id": job.backup_id.as_ref().map(|b| b.to_string()),
            "error": error,
        })),
    )
}

impl Service {
    /// The configured notification sinks.
    pub fn notifier(&self) -> &Notifier {
        &self.settings.notify.notifier
    }

    /// This round's events for the instances this node runs, handed to the
    /// sinks in the background.
    pub(crate) fn notify_round(self: &Arc<Self>, instances: &[Instance], now: DateTime<Utc>) {
        if self.settings.notify.notifier.is_empty() {
            return;
        }
        let owned: Vec<&Instance> = instances.iter().filter(|i| self.owns(&i.id)).collect();
        let mut events = Vec::new();
        {
            let mut seen = lock(&self.occurrences);
            seen.retain(&owned.iter().map(|i| i.id.as_ref()).collect());
            // Job end times are wall-clock times, whatever the scheduler's clock.
            let (since, at) = (seen.ended_since(self.started_at), Utc::now());
            match self.engine.catalog().jobs_ended_since(since) {
                Ok(ended) => {
                    seen.read_ended(at, &ended.iter().map(|j| j.id).collect());
                    let owned_ids: HashSet<&str> = owned.iter().map(|i| i.id.as_ref()).collect();
                    for job in &ended {
                        let Some(id) = job.instance_id.as_deref() else {
                            continue;
                        };
                        if owned_ids.contains(id)
                            && job.state == JobState::Failed
                            && seen.first_failure(job.id)
                        {
                            events.extend(failed_job_event(job, id));
                        }
                    }
                }
                Err(e) => tracing::warn!("notifications: reading ended jobs: {e}"),
            }
            for instance in &owned {
                self.conditions(instance, now, &mut seen, &mut events);
            }
        }
        for event in events {
            self.dispatch(event);
        }
    }

    /// The conditions of one instance that began or ended in this round.
    fn conditions(
        &self,
        instance: &Instance,
        now: DateTime<Utc>,
        seen: &mut Occurrences,
        events: &mut Vec<Event>,
    ) {
        let id: &str = instance.id.as_ref();
        let settings = &self.settings.notify;

        let wal = self.wal.state(id);
        let threshold =
            chrono::Duration::from_std(settings.wal_failing_after).unwrap_or(chrono::Duration::MAX);
        // The receiver's times are wall-clock times.
        let failing = wal
            .failing_since
            .is_some_and(|since| Utc::now() - since >= threshold);
        match seen.observe(Condition::WalFailing, id, failing) {
            Some(Change::Began) => {
                let reason = wal.failing.clone().unwrap_or_default();
                let unreachable = wal.unreachable_since.is_some();
                events.push(
                    Event::new(
                        EventKind::WalReceiverFailing,
                        Some(id),
                        now,
                        format!(
                            "the WAL receiver of instance {id} has been failing since {}{}: {reason}",
                            wal.failing_since.map(|t| t.to_rfc3339()).unwrap_or_default(),
                            if unreachable { " (server unreachable)" } else { "" }
                        ),
                    )
                    .with_details(json!({
                        "error": reason,
                        "failing_since": wal.failing_since,
                        "unreachable": unreachable,
                        "failures": wal.failures,
                    })),
                );
            }
            Some(Change::Ended) => events.push(Event::new(
                EventKind::WalReceiverRecovered,
                Some(id),
                now,
                format!("the WAL receiver of instance {id} streams again"),
            )),
            None => {}
        }

        // Behind by the figure `strata_wal_receive_lag_bytes` reports, for as
        // long as a failure must last before it is announced; a failing
        // receiver is announced as failing instead.
        let behind = wal.server_end.saturating_sub(wal.received);
        let lagging = settings.wal_lag_bytes.is_some_and(|limit| {
            let now_behind = wal.running && wal.failing.is_none() && behind > limit;
            seen.behind_for(id, now_behind, Utc::now(), threshold)
        });
        match seen.observe(Condition::WalLagging, id, lagging) {
            Some(Change::Began) => events.push(
                Event::new(
                    EventKind::WalReceiverLagging,
                    Some(id),
                    now,
                    format!(
                        "the WAL receiver of instance {id} is {behind} bytes behind its server \
                         (threshold {})",
                        settings.wal_lag_bytes.unwrap_or_default()
                    ),
                )
                .with_details(json!({
                    "behind_bytes": behind,
                    "received_lsn": pg_wal::Lsn(wal.received).to_string(),
                    "server_end_lsn": pg_wal::Lsn(wal.server_end).to_string(),
                    "threshold_bytes": settings.wal_lag_bytes,
                })),
            ),
            Some(Change::Ended) => events.push(Event::new(
                EventKind::WalReceiverCaughtUp,
                Some(id),
                now,
                format!("the WAL receiver of instance {id} is within the lag threshold again"),
            )),
            None => {}
        }

        if let Some(limit) = settings.backup_overdue {
            match self.engine.catalog().list_backups(id) {
                Ok(backups) => {
                    let newest = backups
                        .iter()
                        .filter(|b| b.status == BackupStatus::Success)
                        .filter_map(|b| b.finished_at)
                        .max();
                    let since = newest.unwrap_or(instance.created_at);
                    let overdue = now - since > limit;
                    if seen.observe(Condition::BackupOverdue, id, overdue) == Some(Change::Began) {
                        events.push(
                            Event::new(
                                EventKind::BackupOverdue,
                                Some(id),
                                now,
                                format!(
                                    "instance {id} has no successful backup within the last {} hour(s)",
                                    limit.num_hours()
                                ),
                            )
                            .with_details(json!({
                                "last_success": newest,
                                "hours": limit.num_hours(),
                            })),
                        );
                    }
                }
                Err(e) => tracing::warn!(instance = %id, "notifications: backups: {e}"),
            }
        }

        match self.engine.catalog().last_usage_sample(id) {
            Ok(sample) => {
                // A quota that is a share of the database size means nothing
                // before the first backup measured that size.
                let unknown = matches!(self.quota_rule(id), crate::FreeQuota::PercentOfDatabase(_));
                let over = sample
                    .as_ref()
                    .is_some_and(|s| s.excess_bytes() > 0 && !(unknown && s.quota_bytes == 0));
                if seen.observe(Condition::OverQuota, id, over) == Some(Change::Began) {
                    if let Some(s) = sample {
                        events.push(
                            Event::new(
                                EventKind::StorageOverQuota,
                                Some(id),
                                now,
                                format!(
                                    "instance {id} stores {} bytes, {} above its free quota",
                                    s.stored_bytes(),
                                    s.excess_bytes()
                                ),
                            )
                            .with_details(json!({
                                "stored_bytes": s.stored_bytes(),
                                "quota_bytes": s.quota_bytes,
                                "excess_bytes": s.excess_bytes(),
                            })),
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(instance = %id, "notifications: usage: {e}"),
        }

        if let Some(margin) = settings.window_short_by {
            if seen.window_due(id, now) {
                self.window_condition(instance, margin, now, seen, events);
            }
        }

        let failed_copy = match self
            .engine
            .catalog()
            .newest_ended_job(id, JobKind::CrossCopy)
        {
            Ok(job) => job.filter(|j| j.state == JobState::Failed),
            Err(e) => {
                tracing::warn!(instance = %id, "notifications: copies: {e}");
                return;
            }
        };
        if seen.observe(Condition::CopyFailing, id, failed_copy.is_some()) == Some(Change::Began) {
            if let Some(job) = failed_copy {
                let error = job.error.clone().unwrap_or_default();
                events.push(
                    Event::new(
                        EventKind::CrossRegionCopyFailing,
                        Some(id),
                        now,
                        format!("copies of instance {id} to another region fail: {error}"),
                    )
                    .with_details(json!({ "job_id": job.id.get(), "error": error })),
                );
            }
        }
    }

    /// Measures the recovery window of an instance with log backup on
    /// against its promise: the log retention, or the time since
    /// registration while that is shorter.
    fn window_condition(
        &self,
        instance: &Instance,
        margin: chrono::Duration,
        now: DateTime<Utc>,
        seen: &mut Occurrences,
        events: &mut Vec<Event>,
    ) {
        let id: &str = instance.id.as_ref();
        let measured = self.policy(id).and_then(|p| {
            if !p.log_backup_enabled {
                return Ok(None);
            }
            let retention = chrono::Duration::days(p.effective_log_retention_days().into());
            let promised = retention.min(now - instance.created_at);
            Ok(Some((self.recovery_window(id)?, promised)))
        });
        let (window, promised) = match measured {
            Ok(Some(m)) => m,
            Ok(None) => {
                seen.observe(Condition::WindowShort, id, false);
                return;
            }
            Err(e) => {
                tracing::warn!(instance = %id, "notifications: recovery window: {e}");
                return;
            }
        };
        let short = window_shortfall(window, promised);
        if seen.observe(Condition::WindowShort, id, short > margin) == Some(Change::Began) {
            events.push(
                Event::new(
                    EventKind::RecoveryWindowShort,
                    Some(id),
                    now,
                    format!(
                        "the recovery window of instance {id} is {} hour(s) shorter than its log retention promises",
                        short.num_hours()
                    ),
                )
                .with_details(json!({
                    "window_start": window.map(|w| w.0),
                    "window_end": window.map(|w| w.1),
                    "promised_seconds": promised.num_seconds(),
                    "short_by_seconds": short.num_seconds(),
                })),
            );
        }
    }

    /// Delivers `event` to every sink that wants it, in the background, one
    /// `notify` job per sink.
    pub(crate) fn dispatch(self: &Arc<Self>, event: Event) {
        tracing::info!(instance = ?event.instance, "notification: {}", event.message);
        let svc = Arc::clone(self);
        tokio::spawn(async move {
            let notifier = svc.settings.notify.notifier.clone();
            for sink in notifier.sinks_for(&event) {
                let _ = svc.deliver_recorded(sink, &event).await;
            }
        });
    }

    /// Sends a `test` event to the sink named `name` (as `strata notify
    /// test` does), recorded as a `notify` job like every delivery; `None`
    /// when no sink has that name.
    pub async fn send_test_notification(
        &self,
        name: &str,
        origin: &str,
    ) -> Option<Result<Delivered, NotifyError>> {
        let sink = self.notifier().sinks().iter().find(|s| s.name() == name)?;
        Some(self.deliver_recorded(sink, &Sink::test_event(origin)).await)
    }

    /// Delivers `event` to `sink`, recorded as a `notify` job whose detail
    /// says what went where and what the far end answered.
    async fn deliver_recorded(&self, sink: &Sink, event: &Event) -> Result<Delivered, NotifyError> {
        let catalog = self.engine.catalog();
        let job = match catalog.create_job(JobKind::Notify, event.instance.as_deref()) {
            Ok(mut job) => {
                job.state = JobState::Uploading;
                job.detail = format!("{} to {} {}", event.kind, sink.kind(), sink.name());
                let _ = catalog.update_job(&job);
                Some(job.id)
            }
            Err(e) => {
                tracing::warn!("notifications: recording a delivery: {e}");
                None
            }
        };
        let outcome = sink.deliver(event).await;
        match &outcome {
            Ok(done) => {
                if let Some(id) = job {
                    if let Ok(mut j) = catalog.get_job(id) {
                        j.detail.push_str(&format!(
                            ": {} after {} attempt(s)",
                            done.answer, done.attempts
                        ));
                        let _ = catalog.update_job(&j);
                    }
                    finish_job(&self.engine, id, None);
                }
            }
            Err(e) => {
                tracing::warn!(sink = %sink.name(), "notification not delivered: {e}");
                if let Some(id) = job {
                    crate::fail_job(&self.engine, id, &e.to_string());
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_is_announced_once_per_occurrence() {
        let mut seen = Occurrences::default();
        let rounds = [false, true, true, true, false, false, true, true];
        let changes: Vec<Option<Change>> = rounds
            .iter()
            .map(|&holds| seen.observe(Condition::WalFailing, "a", holds))
            .collect();
        assert_eq!(
            changes,
            [
                None,
                Some(Change::Began),
                None,
                None,
                Some(Change::Ended),
                None,
                Some(Change::Began),
                None
            ]
        );
        // Instances and conditions are independent.
        assert_eq!(
            seen.observe(Condition::WalFailing, "b", true),
            Some(Change::Began)
        );
        assert_eq!(
            seen.observe(Condition::OverQuota, "a", true),
            Some(Change::Began)
        );
    }

    #[test]
    fn a_failed_job_is_announced_once() {
        let mut seen = Occurrences::default();
        assert!(seen.first_failure(JobId::new(3)));
        assert!(!seen.first_failure(JobId::new(3)));
        assert!(seen.first_failure(JobId::new(4)));
    }

    #[test]
    fn ended_jobs_are_read_from_shortly_before_the_previous_round() {
        let mut seen = Occurrences::default();
        let start = Utc::now();
        let t1 = start + chrono::Duration::hours(1);
        assert_eq!(seen.ended_since(start), start);
        // Never before the process start.
        seen.read_ended(start + chrono::Duration::minutes(1), &HashSet::new());
        assert_eq!(seen.ended_since(start), start);
        assert!(seen.first_failure(JobId::new(1)));
        assert!(seen.first_failure(JobId::new(2)));
        seen.read_ended(t1, &[JobId::new(2)].into_iter().collect());
        assert_eq!(seen.ended_since(start), t1 - JOB_END_SLACK);
        // Without a new reading (a failed one), the start stays put.
        assert_eq!(seen.ended_since(start), t1 - JOB_END_SLACK);
        assert!(
            !seen.first_failure(JobId::new(2)),
            "still read: still known"
        );
        assert!(
            seen.first_failure(JobId::new(1)),
            "forgotten once out of reach"
        );
    }

    #[test]
    fn job_failures_map_to_events() {
        use strata_catalog::{JobCatalog, SqliteCatalog};
        let catalog = SqliteCatalog::open_in_memory().unwrap();
        let job = |kind: JobKind, state: JobState, error: &str| {
            let mut j = catalog.create_job(kind, None).unwrap();
            j.state = state;
            j.error = Some(error.to_string());
            j.finished_at = Some(Utc::now());
            j
        };
        let backup = job(JobKind::SnapshotBackup, JobState::Failed, "agent gone");
        let e = failed_job_event(&backup, "a\nb").unwrap();
        assert_eq!(e.kind, EventKind::BackupFailed);
        assert_eq!(e.instance.as_deref(), Some("a\nb"));
        assert_eq!(e.details["error"], "agent gone");
        assert_eq!(e.details["job_id"], backup.id.get());
        let drill = job(JobKind::Drill, JobState::Failed, "amcheck");
        assert_eq!(
            failed_job_event(&drill, "a").unwrap().kind,
            EventKind::DrillFailed
        );
        let restore = job(JobKind::Restore, JobState::Failed, "x");
        assert!(failed_job_event(&restore, "a").is_none());
    }

    #[test]
    fn windows_are_measured_against_the_promise_every_few_minutes() {
        let t = Utc::now();
        let h = chrono::Duration::hours;
        assert_eq!(window_shortfall(Some((t - h(30), t)), h(24)), h(-6));
        assert_eq!(window_shortfall(Some((t - h(10), t)), h(24)), h(14));
        assert_eq!(window_shortfall(None, h(2)), h(2));

        let mut seen = Occurrences::default();
        assert!(seen.window_due("a", t));
        assert!(!seen.window_due("a", t + chrono::Duration::minutes(1)));
        assert!(seen.window_due("b", t), "per instance");
        assert!(seen.window_due("a", t + WINDOW_CHECK_EVERY));
        assert!(seen.window_due("a", t), "a clock set back");
        seen.retain(&HashSet::new());
        assert!(seen.window_due("a", t), "forgotten with the instance");
    }

    #[test]
    fn a_receiver_is_lagging_once_behind_without_a_break_for_the_threshold() {
        let mut seen = Occurrences::default();
        let t0 = Utc::now();
        let five = chrono::Duration::minutes(5);
        let at = |m: i64| t0 + chrono::Duration::minutes(m);
        assert!(!seen.behind_for("a", true, at(0), five));
        assert!(!seen.behind_for("a", true, at(4), five));
        assert!(seen.behind_for("a", true, at(5), five));
        // A moment within the threshold starts the count again.
        assert!(!seen.behind_for("a", false, at(6), five));
        assert!(!seen.behind_for("a", true, at(7), five));
        assert!(!seen.behind_for("a", true, at(11), five));
        assert!(seen.behind_for("a", true, at(12), five));
        // Each instance counts on its own, and a forgotten one afresh.
        assert!(!seen.behind_for("b", true, at(12), five));
        seen.retain(&HashSet::from(["b"]));
        assert!(!seen.behind_for("a", true, at(13), five));
        assert!(seen.behind_for("b", true, at(17), five));
    }

    #[test]
    fn forgotten_instances_start_afresh() {
        let mut seen = Occurrences::default();
        seen.observe(Condition::BackupOverdue, "a", true);
        seen.observe(Condition::BackupOverdue, "b", true);
        seen.retain(&["b"].into_iter().collect());
        // "a" left this node and came back still overdue: announced again.
        assert_eq!(
            seen.observe(Condition::BackupOverdue, "a", true),
            Some(Change::Began)
        );
        assert_eq!(seen.observe(Condition::BackupOverdue, "b", true), None);
    }
}
