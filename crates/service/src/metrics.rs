//! `/metrics` in the Prometheus text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;

use strata_catalog::BackupStatus;

use crate::{lock, Service, ServiceResult};

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Service {
    /// Renders every metric. Figures per instance come from the catalog;
    /// WAL lag from the live receivers.
    pub fn metrics(&self) -> ServiceResult<String> {
        let now = self.now();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let instances = self.engine.catalog().list_instances()?;
        let (mut age, mut duration, mut size, mut stored) = (vec![], vec![], vec![], vec![]);
        let (mut lag, mut up, mut sets, mut wal_bytes) = (vec![], vec![], vec![], vec![]);
        let (mut drill_failed, mut failing) = (vec![], vec![]);
        let (mut logical, mut stored_now, mut quota, mut excess, mut gb_hours) =
            (vec![], vec![], vec![], vec![], vec![]);
        for i in &instances {
            let l = format!("{{instance=\"{}\"}}", label(&i.id));
            let backups = self.engine.catalog().list_backups(&i.id)?;
            if let Some(last) = backups
                .iter()
                .filter(|b| b.status == BackupStatus::Success)
                .max_by_key(|b| b.finished_at)
            {
                if let Some(f) = last.finished_at {
                    age.push((l.clone(), (now - f).num_milliseconds() as f64 / 1000.0));
                    duration.push((
                        l.clone(),
                        (f - last.started_at).num_milliseconds() as f64 / 1000.0,
                    ));
                }
                size.push((l.clone(), last.total_bytes as f64));
                stored.push((l.clone(), last.stored_bytes as f64));
            }
            for status in [
                BackupStatus::Success,
                BackupStatus::Failed,
                BackupStatus::Running,
            ] {
                let n = backups.iter().filter(|b| b.status == status).count();
                sets.push((
                    format!(
                        "{{instance=\"{}\",status=\"{}\"}}",
                        label(&i.id),
                        status.as_str()
                    ),
                    n as f64,
                ));
            }
            let wal: u64 = self
                .engine
                .catalog()
                .list_wal_segments(&i.id)?
                .iter()
                .map(|w| w.size)
                .sum();
            wal_bytes.push((l.clone(), wal as f64));
            let last_drill = self
                .engine
                .catalog()
                .list_drills(&i.id)?
                .into_iter()
                .filter(|d| d.finished_at.is_some() && d.status != "Skipped")
                .max_by_key(|d| d.finished_at);
            if let Some(d) = last_drill {
                drill_failed.push((l.clone(), if d.status == "Failed" { 1.0 } else { 0.0 }));
            }
            // Usage from the recorded samples only: a scrape never measures.
            let samples = self
                .engine
                .catalog()
                .list_usage_samples(&i.id, None, None)?;
            if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
                logical.push((l.clone(), last.logical_bytes as f64));
                let kinds = [
                    ("data", Some(last.data_bytes)),
                    ("wal", Some(last.wal_bytes)),
                    ("cross_region", last.cross_region_bytes),
                ];
                for (kind, v) in kinds {
                    // An unknown cross-region figure has no series.
                    let Some(v) = v else { continue };
                    stored_now.push((
                        format!("{{instance=\"{}\",kind=\"{kind}\"}}", label(&i.id)),
                        v as f64,
                    ));
                }
                quota.push((l.clone(), last.quota_bytes as f64));
                excess.push((l.clone(), last.excess_bytes() as f64));
                gb_hours.push((
                    l.clone(),
                    crate::billable_gb_hours(&samples, first.at, now.max(last.at)),
                ));
            }
            let st = self.wal_state(&i.id);
            up.push((l.clone(), if st.is_up() { 1.0 } else { 0.0 }));
            failing.push((l.clone(), if st.failing.is_some() { 1.0 } else { 0.0 }));
            if st.last_message.is_some() {
                lag.push((l, st.server_end.saturating_sub(st.received) as f64));
            }
        }
        family(
            "strata_last_backup_age_seconds",
            "gauge",
            "Seconds since the last successful backup finished.",
            age,
        );
        family(
            "strata_last_backup_duration_seconds",
            "gauge",
            "Wall time of the last successful backup.",
            duration,
        );
        family(
            "strata_last_backup_size_bytes",
            "gauge",
            "Data size of the last successful backup.",
            size,
        );
        family(
            "strata_last_backup_stored_bytes",
            "gauge",
            "Bytes the last successful backup added to the repository.",
            stored,
        );
        family(
            "strata_backup_sets",
            "gauge",
            "Backup sets in the catalog by status.",
            sets,
        );
        family(
            "strata_drill_failed",
            "gauge",
            "1 when the newest restore drill of the instance failed (alert on this).",
            drill_failed,
        );
        family(
            "strata_wal_archived_bytes",
            "gauge",
            "Bytes of WAL segments held for the instance.",
            wal_bytes,
        );
        family(
            "strata_wal_receiver_up",
            "gauge",
            "1 while the WAL receiver is streaming or connecting and its last attempt did not fail.",
            up,
        );
        family(
            "strata_wal_receiver_failing",
            "gauge",
            "1 while the WAL receiver fails (cannot store or cannot stream) and retries; the reason is in StrataWalReceiver and the log.",
            failing,
        );
        family(
            "strata_wal_receive_lag_bytes",
            "gauge",
            "Server end of WAL minus what the receiver has received.",
            lag,
        );
        family(
            "strata_backup_storage_logical_bytes",
            "gauge",
            "Data size of the instance's backup sets added up (newest usage sample).",
            logical,
        );
        family(
            "strata_backup_storage_stored_bytes",
            "gauge",
            "Bytes stored for the instance after deduplication and compression, by kind (newest usage sample): data and wal in its own region, cross_region in the target regions' repositories (outside the free quota).",
            stored_now,
        );
        family(
            "strata_backup_storage_free_quota_bytes",
            "gauge",
            "Free backup storage of the instance.",
            quota,
        );
        family(
            "strata_backup_storage_excess_bytes",
            "gauge",
            "Bytes stored above the free quota.",
            excess,
        );
        family(
            "strata_backup_storage_billable_gb_hours_total",
            "counter",
            "Bytes above the free quota integrated over time since the first usage sample, in GB-hours (GB = 2^30 bytes).",
            gb_hours,
        );
        let mut by_state: BTreeMap<&str, u64> = [
            "NoStart",
            "Preparing",
            "Waiting",
            "Uploading",
            "Checking",
            "Finished",
            "Failed",
        ]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
        for j in self.engine.catalog().list_jobs(None)? {
            *by_state.entry(j.state.as_str()).or_default() += 1;
        }
        family(
            "strata_jobs",
            "gauge",
            "Jobs in the catalog by state.",
            by_state
                .into_iter()
                .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n as f64))
                .collect(),
        );
        let gc = lock(&self.last_gc).clone();
        if let Some((at, report)) = gc {
            family(
                "strata_gc_last_run_timestamp_seconds",
                "gauge",
                "When garbage collection last ran.",
                vec![(String::new(), at.timestamp() as f64)],
            );
            family(
                "strata_gc_last_deleted_packs",
                "gauge",
                "Packs the last garbage collection deleted.",
                vec![(String::new(), report.packs_deleted as f64)],
            );
        }
        family(
            "strata_uptime_seconds",
            "gauge",
            "Seconds since the service started.",
            vec![(String::new(), self.uptime().as_secs_f64())],
        );
        Ok(out)
    }
}
