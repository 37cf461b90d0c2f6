//! Human output: tables, sizes, and progress (a bar on a terminal, plain
//! lines otherwise, always on stderr so stdout stays parseable).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use strata_catalog::{BackupMethod, BackupSet, BackupStatus, Instance, Job, WalSegmentRow};
use strata_engine::{Progress, SetDecision};
use strata_repo::VerifyReport;

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub struct CliProgress {
    bar: Option<ProgressBar>,
    last: Mutex<(Instant, u64)>,
    /// Whether the counts are bytes (else objects).
    bytes: bool,
}

impl CliProgress {
    /// A bar on a terminal, lines otherwise; counts are bytes.
    pub fn new() -> Self {
        Self::with_unit(true)
    }

    /// Like [`CliProgress::new`], counting objects instead of bytes.
    pub fn objects() -> Self {
        Self::with_unit(false)
    }

    fn with_unit(bytes: bool) -> Self {
        let template = if bytes {
            "{msg:8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg:8} [{bar:40}] {pos}/{len} objects eta {eta}"
        };
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        CliProgress {
            bar,
            last: Mutex::new((Instant::now(), u64::MAX)),
            bytes,
        }
    }

    /// Always plain lines (long-running commands such as `wal receive`).
    pub fn lines() -> Self {
        CliProgress {
            bar: None,
            last: Mutex::new((Instant::now(), u64::MAX)),
            bytes: true,
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for CliProgress {
    fn update(&self, phase: &str, done: u64, total: Option<u64>) {
        if let Some(bar) = &self.bar {
            bar.set_message(phase.to_string());
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
            return;
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let pct = total.filter(|t| *t > 0).map(|t| done.min(t) * 100 / t);
        let step = pct.map(|p| p / 10);
        let due = last.0.elapsed() >= Duration::from_secs(5);
        if step.is_some_and(|s| s != last.1) || due {
            *last = (Instant::now(), step.unwrap_or(u64::MAX));
            match (pct, total) {
                (Some(p), Some(t)) if !self.bytes => {
                    eprintln!("{phase}: {p}% ({done} of {t} objects)")
                }
                (Some(p), Some(t)) => eprintln!(
                    "{phase}: {p}% ({} of {})",
                    human_bytes(done),
                    human_bytes(t)
                ),
                _ => eprintln!("{phase}: {}", human_bytes(done)),
            }
        }
    }

    fn message(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn opt_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.as_ref().map(time).unwrap_or_else(|| "-".into())
}

/// A value, or "-" when unknown.
fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub fn print_instances(list: &[Instance]) {
    println!(
        "{:<20} {:<28} {:<12} {:<8} {:<22}",
        "ID", "ADDRESS", "USER", "VERSION", "SYSTEM ID"
    );
    for i in list {
        println!(
            "{:<20} {:<28} {:<12} {:<8} {:<22}",
            i.id,
            format!("{}:{}", i.host, i.port),
            i.user,
            or_dash(
                i.pg_version_num
                    .map(|v| format!("{}.{}", v / 10000, v % 10000))
            ),
            or_dash(i.system_identifier)
        );
    }
}

/// Backup sets with what retention decided for each (kept by, expiry).
pub fn print_backups(list: &[BackupSet], decisions: &[SetDecision]) {
    println!(
        "{:<15} {:<8} {:<9} {:<9} {:<21} {:<21} {:>10} {:>10} {:<14}",
        "ID", "STATUS", "MODE", "METHOD", "STARTED", "FINISHED", "SIZE", "NEW", "STOP LSN"
    );
    for b in list {
        println!(
            "{:<15} {:<8} {:<9} {:<9} {:<21} {:<21} {:>10} {:>10} {:<14}",
            b.id,
            b.status.as_str(),
            b.mode,
            b.method,
            time(&b.started_at),
            opt_time(b.finished_at),
            human_bytes(b.total_bytes),
            human_bytes(b.new_bytes),
            or_dash(b.stop_lsn)
        );
        if let Some(e) = &b.error {
            println!("    error: {e}");
        }
        if let Some(d) = decisions.iter().find(|d| d.backup_id == b.id) {
            println!(
                "    retention: {} by {}, expires {}",
                if d.delete { "goes" } else { "kept" },
                d.kept_by,
                opt_time(d.expires_at)
            );
        }
        if b.method == BackupMethod::Snapshot && b.status == BackupStatus::Success {
            let yes = |v: bool| if v { "yes" } else { "no" };
            println!(
                "    snapshot: on the database host {}, in the repository {}",
                yes(b.snapshot_local),
                yes(b.snapshot_uploaded)
            );
        }
    }
}

/// The retention dry run: per instance, each set's fate and why.
pub fn print_retention<'a>(reports: impl Iterator<Item = (&'a str, &'a [SetDecision], usize)>) {
    println!(
        "{:<20} {:<18} {:<7} {:<21} KEPT BY",
        "INSTANCE", "SET", "ACTION", "EXPIRES"
    );
    for (instance, sets, wal) in reports {
        for d in sets {
            println!(
                "{:<20} {:<18} {:<7} {:<21} {}",
                instance,
                d.backup_id,
                if d.delete { "delete" } else { "keep" },
                opt_time(d.expires_at),
                d.kept_by
            );
        }
        if wal > 0 {
            println!("{instance:<20} {wal} WAL object(s) would be deleted");
        }
    }
}

pub fn print_wal(list: &[WalSegmentRow]) {
    println!(
        "{:<26} {:<4} {:<8} {:>9} {:<21} {:<21}",
        "SEGMENT", "TLI", "STATE", "SIZE", "FIRST COMMIT", "LAST COMMIT"
    );
    for w in list {
        println!(
            "{:<26} {:<4} {:<8} {:>9} {:<21} {:<21}",
            w.segment,
            w.timeline,
            if w.partial { "partial" } else { "complete" },
            human_bytes(w.size),
            opt_time(w.first_commit),
            opt_time(w.last_commit)
        );
    }
}

/// A name from a server, with control characters escaped: a table named
/// with terminal escape sequences cannot drive the operator's terminal.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Recovery events, with what to pass to restore to just before each.
pub fn print_events(list: &[strata_engine::RecoveryEvent]) {
    println!(
        "{:<27} {:<13} {:>10} {:<16} {:<32} {:>9}  JUST BEFORE",
        "TIME", "EVENT", "XID", "DATABASE", "TABLE / NAME", "ROWS"
    );
    for e in list {
        let what = e
            .table_label()
            .or_else(|| e.name.clone())
            .unwrap_or_else(|| "-".into());
        let before = match (e.xid, e.before_lsn) {
            (_, Some(lsn)) => format!("--lsn {lsn} --exclusive"),
            (Some(x), None) => format!("--xid {x} --exclusive"),
            (None, None) => format!("--lsn {}", e.lsn),
        };
        println!(
            "{:<27} {:<13} {:>10} {:<16} {:<32} {:>9}  {}",
            e.time.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            e.kind,
            e.xid.map_or("-".into(), |x| x.to_string()),
            printable(e.database.as_deref().unwrap_or("-")),
            printable(&what),
            e.rows.map_or("-".into(), |r| r.to_string()),
            before
        );
    }
}

pub fn print_jobs(list: &[Job]) {
    println!(
        "{:<6} {:<12} {:<16} {:<10} {:>4} {:<21}",
        "ID", "KIND", "INSTANCE", "STATE", "%", "STARTED"
    );
    for j in list {
        println!(
            "{:<6} {:<12} {:<16} {:<10} {:>4} {:<21}",
            j.id,
            j.kind,
            j.instance_id.as_deref().unwrap_or("-"),
            j.state.as_str(),
            j.progress,
            time(&j.started_at)
        );
        if let Some(e) = &j.error {
            println!("    error: {e}");
        }
    }
}

pub fn print_usage(u: &strata_repo::RepositoryUsage) {
    println!(
        "{:<24} {:>5} {:>12} {:>12} {:>12} {:>12}",
        "INSTANCE", "SETS", "LOGICAL", "DATA", "WAL", "STORED"
    );
    for (id, i) in &u.instances {
        println!(
            "{:<24} {:>5} {:>12} {:>12} {:>12} {:>12}",
            id,
            i.backup_sets,
            human_bytes(i.logical_bytes),
            human_bytes(i.data_bytes()),
            human_bytes(i.wal_bytes),
            human_bytes(i.stored_bytes())
        );
    }
    println!(
        "unattributed {} · repository total {}",
        human_bytes(u.unattributed_bytes),
        human_bytes(u.total_bytes)
    );
}

pub fn print_verify(r: &VerifyReport) {
    println!(
        "checked {} objects ({}): {} packs with {} blocks, {} backup manifests, {} WAL objects",
        r.objects_checked,
        human_bytes(r.bytes_checked),
        r.packs_checked,
        r.blocks_checked,
        r.backups_checked,
        r.wal_objects_checked
    );
    if !r.unreferenced_packs.is_empty() {
        println!(
            "{} pack(s) referenced by no backup (left by interrupted backups; harmless)",
            r.unreferenced_packs.len()
        );
    }
    for p in &r.problems {
        let affected = if p.backups_affected.is_empty() {
            String::new()
        } else {
            format!(" [affects backup {}]", p.backups_affected.join(", "))
        };
        println!("PROBLEM {}: {}{}", p.object, p.reason, affected);
    }
    if r.problems.is_empty() {
        println!("repository is clean");
    }
}

/// What `strata backup show` reports of a committed backup set.
#[derive(serde::Serialize)]
pub struct BackupSummary {
    pub backup_id: strata_repo::BackupId,
    pub instance_id: strata_repo::InstanceId,
    pub label: String,
    pub mode: String,
    pub pg_version_num: u32,
    pub start_lsn: String,
    pub start_timeline: u32,
    pub stop_lsn: String,
    pub stop_timeline: u32,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub file_count: u64,
    pub total_bytes: u64,
    pub new_bytes: u64,
    pub dedup_bytes: u64,
    pub stored_bytes: u64,
    /// Bytes the server sent for the files (absent for backups from before this was recorded).
    pub received_bytes: Option<u64>,
    /// The backup whose unchanged blocks were taken by reference.
    pub incremental_from: Option<strata_repo::BackupId>,
    pub tablespaces: usize,
}

impl BackupSummary {
    pub fn of(m: &strata_repo::BackupManifest) -> Self {
        BackupSummary {
            backup_id: m.backup_id.clone(),
            instance_id: m.instance_id.clone(),
            label: m.label.clone(),
            mode: m.mode.clone(),
            pg_version_num: m.pg_version_num,
            start_lsn: m.start_lsn.to_string(),
            start_timeline: m.start_timeline.0,
            stop_lsn: m.stop_lsn.to_string(),
            stop_timeline: m.stop_timeline.0,
            start_time: m.start_time,
            stop_time: m.stop_time,
            file_count: m.stats.file_count,
            total_bytes: m.stats.total_bytes,
            new_bytes: m.stats.new_bytes,
            dedup_bytes: m.stats.dedup_bytes,
            stored_bytes: m.stats.stored_bytes,
            received_bytes: m.received_bytes,
            incremental_from: m.incremental_from.clone(),
            tablespaces: m.tablespaces.len(),
        }
    }

    pub fn print(&self) {
        let rows = [
            ("backup", self.backup_id.to_string()),
            ("instance", self.instance_id.to_string()),
            ("mode", self.mode.clone()),
            ("server version", self.pg_version_num.to_string()),
            (
                "WAL",
                format!(
                    "{} (timeline {}) to {} (timeline {})",
                    self.start_lsn, self.start_timeline, self.stop_lsn, self.stop_timeline
                ),
            ),
            ("started", time(&self.start_time)),
            ("finished", time(&self.stop_time)),
            (
                "files",
                format!("{} ({})", self.file_count, human_bytes(self.total_bytes)),
            ),
            (
                "new",
                format!(
                    "{} ({} stored)",
                    human_bytes(self.new_bytes),
                    human_bytes(self.stored_bytes)
                ),
            ),
            ("deduplicated", human_bytes(self.dedup_bytes)),
            (
                "sent by the server",
                match (self.received_bytes, &self.incremental_from) {
                    (Some(r), Some(from)) => {
                        format!("{} (changed blocks since backup {from})", human_bytes(r))
                    }
                    (Some(r), None) => format!("{} (every file)", human_bytes(r)),
                    (None, _) => "-".into(),
                },
            ),
        ];
        for (k, v) in rows {
            println!("{k:<19} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_a_server_cannot_carry_terminal_controls() {
        assert_eq!(printable("orders"), "orders");
        assert_eq!(printable("tëst"), "tëst");
        assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\nc");
    }
}
