//! `/metrics` in the Prometheus text exposition format (version 0.0.4).
//!
//! Collection and rendering are apart: the collectors fill [`Samples`] by
//! family name, and [`render`] writes the families of [`FAMILIES`] in their
//! order, so the text's layout is pinned by a unit test without a server.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Utc};
use strata_catalog::{BackupSet, BackupStatus, Instance};

use crate::{lock, Service, ServiceResult};

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every family: name, type and help, in the order they are written.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "strata_last_backup_age_seconds",
        "gauge",
        "Seconds since the last successful backup finished.",
    ),
    (
        "strata_last_backup_duration_seconds",
        "gauge",
        "Wall time of the last successful backup.",
    ),
    (
        "strata_last_backup_size_bytes",
        "gauge",
        "Data size of the last successful backup.",
    ),
    (
        "strata_last_backup_stored_bytes",
        "gauge",
        "Bytes the last successful backup added to the repository.",
    ),
    (
        "strata_backup_sets",
        "gauge",
        "Backup sets in the catalog by status.",
    ),
    (
        "strata_drill_failed",
        "gauge",
        "1 when the newest restore drill of the instance failed (alert on this).",
    ),
    (
        "strata_wal_archived_bytes",
        "gauge",
        "Bytes of WAL segments held for the instance.",
    ),
    (
        "strata_wal_receiver_up",
        "gauge",
        "1 while the WAL receiver streams (the server accepted START_REPLICATION) and its last attempt did not fail; 0 while it connects or fails.",
    ),
    (
        "strata_wal_receiver_failing",
        "gauge",
        "1 while the WAL receiver fails (cannot store or cannot stream) and retries; the reason is in StrataWalReceiver and the log.",
    ),
    (
        "strata_recovery_window_start_timestamp_seconds",
        "gauge",
        "Earliest time point-in-time recovery reaches (Unix seconds); no series without a window.",
    ),
    (
        "strata_recovery_window_end_timestamp_seconds",
        "gauge",
        "Latest time point-in-time recovery reaches: when the newest WAL was stored (Unix seconds).",
    ),
    (
        "strata_log_retention_promised_seconds",
        "gauge",
        "How far back the window should reach by now: the log retention, or less for an instance registered since.",
    ),
    (
        "strata_instance_unreachable_seconds",
        "gauge",
        "How long the WAL receiver has not reached the instance's server (refused, timed out, connection lost); 0 while it reaches it. The reason is in StrataUnreachableReason and the log.",
    ),
    (
        "strata_wal_receive_lag_bytes",
        "gauge",
        "Server end of WAL minus what the receiver has received.",
    ),
    (
        "strata_backup_storage_logical_bytes",
        "gauge",
        "Data size of the instance's backup sets added up (newest usage sample).",
    ),
    (
        "strata_backup_storage_stored_bytes",
        "gauge",
        "Bytes stored for the instance after deduplication and compression, by kind (newest usage sample): data and wal in its own region, cross_region in the target regions' repositories (outside the free quota).",
    ),
    (
        "strata_backup_storage_free_quota_bytes",
        "gauge",
        "Free backup storage of the instance.",
    ),
    (
        "strata_backup_storage_excess_bytes",
        "gauge",
        "Bytes stored above the free quota.",
    ),
    (
        "strata_backup_storage_billable_gb_hours_total",
        "counter",
        "Bytes above the free quota integrated over time since the first usage sample, in GB-hours (GB = 2^30 bytes).",
    ),
    ("strata_jobs", "gauge", "Jobs in the catalog by state."),
    (
        "strata_gc_last_run_timestamp_seconds",
        "gauge",
        "When garbage collection last ran.",
    ),
    (
        "strata_gc_last_deleted_packs",
        "gauge",
        "Packs the last garbage collection deleted.",
    ),
    (
        "strata_uptime_seconds",
        "gauge",
        "Seconds since the service started.",
    ),
    (
        "strata_node_info",
        "gauge",
        "1, labelled with this node's id and version; figures per instance are of the instances this node owns.",
    ),
    (
        "strata_node_owned_instances",
        "gauge",
        "Instances whose ownership lease this node holds.",
    ),
];

/// The families with an entry are written (with no sample lines when the
/// entry is empty); a family without one is left out entirely.
#[derive(Default)]
struct Samples(BTreeMap<&'static str, Vec<(String, f64)>>);

impl Samples {
    /// Declares families that are written even when they have no sample.
    fn declare(&mut self, names: &[&'static str]) {
        for n in names {
            self.0.entry(n).or_default();
        }
    }

    fn push(&mut self, family: &'static str, labels: String, value: f64) {
        self.0.entry(family).or_default().push((labels, value));
    }
}

/// The exposition text of `samples`, family by family in [`FAMILIES`] order.
fn render(samples: &Samples) -> String {
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let Some(lines) = samples.0.get(name) else {
            continue;
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    }
    out
}

/// Families written for every scrape, empty or not.
const PER_INSTANCE: &[&str] = &[
    "strata_last_backup_age_seconds",
    "strata_last_backup_duration_seconds",
    "strata_last_backup_size_bytes",
    "strata_last_backup_stored_bytes",
    "strata_backup_sets",
    "strata_drill_failed",
    "strata_wal_archived_bytes",
    "strata_wal_receiver_up",
    "strata_wal_receiver_failing",
    "strata_recovery_window_start_timestamp_seconds",
    "strata_recovery_window_end_timestamp_seconds",
    "strata_log_retention_promised_seconds",
    "strata_instance_unreachable_seconds",
    "strata_wal_receive_lag_bytes",
    "strata_backup_storage_logical_bytes",
    "strata_backup_storage_stored_bytes",
    "strata_backup_storage_free_quota_bytes",
    "strata_backup_storage_excess_bytes",
    "strata_backup_storage_billable_gb_hours_total",
];

/// Job states, each with a `strata_jobs` series even at zero.
const JOB_STATES: &[&str] = &[
    "NoStart",
    "Preparing",
    "Waiting",
    "Uploading",
    "Checking",
    "Finished",
    "Failed",
];

impl Service {
    /// Renders every metric. Figures per instance come from the catalog;
    /// WAL lag from the live receivers. In a fleet each node reports the
    /// instances it owns (see [`Service::reports`]), so summing over the
    /// nodes counts each instance once.
    pub fn metrics(&self) -> ServiceResult<String> {
        let now = self.now();
        let mut samples = Samples::default();
        samples.declare(PER_INSTANCE);
        let owners = self.instance_owners()?;
        let instances = self.engine.catalog().list_instances()?;
        let desired = self.desired_owners(&instances)?;
        for i in &instances {
            if !self.reports(&i.id, &owners, &desired) {
                continue;
            }
            // One read of the sets serves both.
            let backups = self.engine.catalog().list_backups(&i.id)?;
            self.backup_samples(i, &backups, now, &mut samples)?;
            self.wal_samples(i, &backups, now, &mut samples)?;
            self.usage_samples(i, now, &mut samples)?;
        }
        let mut by_state: BTreeMap<&str, u64> = JOB_STATES.iter().map(|s| (*s, 0)).collect();
        for j in self.engine.catalog().list_jobs(None)? {
            *by_state.entry(j.state.as_str()).or_default() += 1;
        }
        samples.declare(&["strata_jobs"]);
        for (s, n) in by_state {
            samples.push("strata_jobs", format!("{{state=\"{s}\"}}"), n as f64);
        }
        let gc = lock(&self.housekeeping.last_gc).clone();
        if let Some((at, report)) = gc {
            let at = at.timestamp() as f64;
            samples.push("strata_gc_last_run_timestamp_seconds", String::new(), at);
            let deleted = report.packs_deleted as f64;
            samples.push("strata_gc_last_deleted_packs", String::new(), deleted);
        }
        let uptime = self.uptime().as_secs_f64();
        samples.push("strata_uptime_seconds", String::new(), uptime);
        let node = format!(
            "{{node=\"{}\",version=\"{}\"}}",
            label(self.node_id()),
            env!("CARGO_PKG_VERSION")
        );
        samples.push("strata_node_info", node, 1.0);
        let owned = self.owned_count() as f64;
        samples.push("strata_node_owned_instances", String::new(), owned);
        Ok(render(&samples))
    }

    /// The last successful backup, set counts by status and the newest drill.
    fn backup_samples(
        &self,
        i: &Instance,
        backups: &[BackupSet],
        now: DateTime<Utc>,
        out: &mut Samples,
    ) -> ServiceResult<()> {
        let l = format!("{{instance=\"{}\"}}", label(&i.id));
        if let Some(last) = backups
            .iter()
            .filter(|b| b.status == BackupStatus::Success)
            .max_by_key(|b| b.finished_at)
        {
            if let Some(f) = last.finished_at {
                let age = (now - f).num_milliseconds() as f64 / 1000.0;
                out.push("strata_last_backup_age_seconds", l.clone(), age);
                let took = (f - last.started_at).num_milliseconds() as f64 / 1000.0;
                out.push("strata_last_backup_duration_seconds", l.clone(), took);
            }
            let (total, stored) = (last.total_bytes as f64, last.stored_bytes as f64);
            out.push("strata_last_backup_size_bytes", l.clone(), total);
            out.push("strata_last_backup_stored_bytes", l.clone(), stored);
        }
        for status in [
            BackupStatus::Success,
            BackupStatus::Failed,
            BackupStatus::Running,
        ] {
            let n = backups.iter().filter(|b| b.status == status).count();
            let labels = format!(
                "{{instance=\"{}\",status=\"{}\"}}",
                label(&i.id),
                status.as_str()
            );
            out.push("strata_backup_sets", labels, n as f64);
        }
        let last_drill = self
            .engine
            .catalog()
            .list_drills(&i.id)?
            .into_iter()
            .filter(|d| d.finished_at.is_some() && d.status != "Skipped")
            .max_by_key(|d| d.finished_at);
        if let Some(d) = last_drill {
            let failed = if d.status == "Failed" { 1.0 } else { 0.0 };
            out.push("strata_drill_failed", l, failed);
        }
        Ok(())
    }

    /// Archived WAL bytes and the live receiver's state and lag.
    fn wal_samples(
        &self,
        i: &Instance,
        backups: &[BackupSet],
        now: DateTime<Utc>,
        out: &mut Samples,
    ) -> ServiceResult<()> {
        let l = format!("{{instance=\"{}\"}}", label(&i.id));
        let segments = self.engine.catalog().list_wal_segments(&i.id)?;
        let wal: u64 = segments.iter().map(|w| w.size).sum();
        out.push("strata_wal_archived_bytes", l.clone(), wal as f64);
        let policy = self.policy(&i.id)?;
        if policy.log_backup_enabled {
            if let Some((begin, end)) = crate::cross_region::recovery_window(backups, &segments) {
                let (begin, end) = (begin.timestamp() as f64, end.timestamp() as f64);
                out.push(
                    "strata_recovery_window_start_timestamp_seconds",
                    l.clone(),
                    begin,
                );
                out.push(
                    "strata_recovery_window_end_timestamp_seconds",
                    l.clone(),
                    end,
                );
            }
            let retention = i64::from(policy.effective_log_retention_days()) * 86_400;
            let registered = (now - i.created_at).num_seconds().max(0);
            let promised = retention.min(registered) as f64;
            out.push("strata_log_retention_promised_seconds", l.clone(), promised);
        }
        let st = self.wal.state(&i.id);
        let up = if st.is_up() { 1.0 } else { 0.0 };
        out.push("strata_wal_receiver_up", l.clone(), up);
        let failing = if st.failing.is_some() { 1.0 } else { 0.0 };
        out.push("strata_wal_receiver_failing", l.clone(), failing);
        let unreachable = match st.unreachable_since.filter(|_| st.running) {
            Some(since) => ((Utc::now() - since).num_milliseconds().max(0) as f64) / 1000.0,
            None => 0.0,
        };
        out.push(
            "strata_instance_unreachable_seconds",
            l.clone(),
            unreachable,
        );
        if st.last_message.is_some() {
            let lag = st.server_end.saturating_sub(st.received) as f64;
            out.push("strata_wal_receive_lag_bytes", l, lag);
        }
        Ok(())
    }

    /// Storage figures from the recorded usage samples only: a scrape never
    /// measures the repository.
    fn usage_samples(
        &self,
        i: &Instance,
        now: DateTime<Utc>,
        out: &mut Samples,
    ) -> ServiceResult<()> {
        let l = format!("{{instance=\"{}\"}}", label(&i.id));
        let samples = self
            .engine
            .catalog()
            .list_usage_samples(&i.id, None, None)?;
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return Ok(());
        };
        let logical = last.logical_bytes as f64;
        out.push("strata_backup_storage_logical_bytes", l.clone(), logical);
        let kinds = [
            ("data", Some(last.data_bytes)),
            ("wal", Some(last.wal_bytes)),
            ("cross_region", last.cross_region_bytes),
        ];
        for (kind, v) in kinds {
            // An unknown cross-region figure has no series.
            let Some(v) = v else { continue };
            let labels = format!("{{instance=\"{}\",kind=\"{kind}\"}}", label(&i.id));
            out.push("strata_backup_storage_stored_bytes", labels, v as f64);
        }
        let quota = last.quota_bytes as f64;
        out.push("strata_backup_storage_free_quota_bytes", l.clone(), quota);
        let excess = last.excess_bytes() as f64;
        out.push("strata_backup_storage_excess_bytes", l.clone(), excess);
        let gb_hours = crate::billable_gb_hours(&samples, first.at, now.max(last.at));
        out.push("strata_backup_storage_billable_gb_hours_total", l, gb_hours);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
    }

    #[test]
    fn families_are_written_in_table_order_and_absent_ones_left_out() {
        let mut s = Samples::default();
        s.push("strata_uptime_seconds", String::new(), 5.0);
        s.declare(&["strata_wal_receive_lag_bytes"]);
        s.push("strata_jobs", "{state=\"Failed\"}".into(), 2.0);
        let text = render(&s);
        let want = "\
# HELP strata_wal_receive_lag_bytes Server end of WAL minus what the receiver has received.
# TYPE strata_wal_receive_lag_bytes gauge
# HELP strata_jobs Jobs in the catalog by state.
# TYPE strata_jobs gauge
strata_jobs{state=\"Failed\"} 2
# HELP strata_uptime_seconds Seconds since the service started.
# TYPE strata_uptime_seconds gauge
strata_uptime_seconds 5
";
        assert_eq!(text, want);
        assert!(!text.contains("strata_gc_last_run"));
    }

    #[test]
    fn every_declared_family_has_a_help_line() {
        let names: Vec<&str> = FAMILIES.iter().map(|f| f.0).collect();
        for n in PER_INSTANCE {
            assert!(names.contains(n), "{n} is not in FAMILIES");
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a family is listed twice");
    }
}

#[cfg(test)]
mod deploy_files {
    //! The alerting rules and the dashboard in deploy/ name only series this
    //! module exports: a family renamed or dropped here fails this test, not
    //! an operator's alert that silently never fires.

    use super::FAMILIES;

    const RULES: &str = include_str!("../../../deploy/prometheus/strata-rules.yml");
    const RULE_TESTS: &str = include_str!("../../../deploy/prometheus/strata-rules.test.yml");
    const DASHBOARD: &str = include_str!("../../../deploy/grafana/strata.json");

    /// Every `strata_…` metric name in `text`.
    fn names(text: &str) -> std::collections::BTreeSet<&str> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("strata_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // A word that merely contains the prefix (`my_strata_x`) is not a name.
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !preceded {
                out.insert(&tail[..end]);
            }
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn rules_and_dashboard_use_exported_families() {
        let exported: Vec<&str> = FAMILIES.iter().map(|(name, _, _)| *name).collect();
        for (file, text) in [
            ("strata-rules.yml", RULES),
            ("strata-rules.test.yml", RULE_TESTS),
            ("strata.json", DASHBOARD),
        ] {
            let used = names(text);
            assert!(used.len() >= 5, "{file} names too few series: {used:?}");
            for name in used {
                assert!(
                    exported.contains(&name),
                    "{file} uses {name}, which /metrics does not export"
                );
            }
        }
    }

    #[test]
    fn metric_names_are_found_as_words() {
        let found = names("a strata_x{} + my_strata_y - (strata_z_total)");
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["strata_x", "strata_z_total"]
        );
    }
}
