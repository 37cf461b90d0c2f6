//! The Task Center: every job of every instance, newest first, filtered by
//! task type, status (RDS's Pending Execution / In Progress / Finished /
//! Failed) and instance. The page polls `/console/api/tasks` with the same
//! filters and updates its rows in place, so progress moves by itself.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use strata_catalog::{BackupId, BackupMode, InstanceId, Job, JobId, JobKind, JobState};

use crate::layout::{self, sort_th, Section};
use crate::{html_response, url_encode, ConsoleState, Page};

/// The newest tasks shown; older ones stay in the catalog and the API.
const SHOWN: usize = 500;

#[derive(Debug, Default, Deserialize)]
pub struct Filter {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub instance: String,
}

/// RDS's task status groups: (key, label).
pub const STATUSES: [(&str, &str); 4] = [
    ("pending", "Pending Execution"),
    ("progress", "In Progress"),
    ("finished", "Finished"),
    ("failed", "Failed"),
];

pub fn status_group(state: JobState) -> (&'static str, &'static str) {
    match state {
        JobState::NoStart => STATUSES[0],
        JobState::Preparing | JobState::Waiting | JobState::Uploading | JobState::Checking => {
            STATUSES[1]
        }
        JobState::Finished => STATUSES[2],
        JobState::Failed => STATUSES[3],
    }
}

/// Task types: (key, label) of a job, by its kind and, for backups, mode.
pub fn task_type(kind: JobKind, mode: Option<BackupMode>) -> (String, String) {
    let (key, label) = match (kind, mode) {
        (JobKind::Backup, Some(BackupMode::Automated)) => ("auto-backup", "Automatic Backup"),
        (JobKind::Backup, _) => ("manual-backup", "Manually Back Up Instance"),
        (JobKind::Restore, _) => ("restore", "Restore"),
        (JobKind::Clone, _) => ("clone", "Clone to New Instance"),
        (JobKind::RestoreTable, _) => ("restore-table", "Restore Databases or Tables"),
        (JobKind::Drill, _) => ("drill", "Restore Drill"),
        (JobKind::CrossCopy, _) => ("cross-copy", "Cross-Region Backup"),
        (JobKind::DdrRestore, _) => ("ddr-restore", "Restore from Cross-Region Backup"),
        (JobKind::SnapshotBackup, Some(BackupMode::Automated)) => {
            ("auto-snapshot", "Automatic Snapshot Backup")
        }
        (JobKind::SnapshotBackup, _) => ("manual-snapshot", "Manual Snapshot Backup"),
        (JobKind::SnapshotUpload, _) => ("snapshot-upload", "Upload Snapshot to Repository"),
        (JobKind::RecoverDatabases, _) => ("recover-databases", "Restore Databases"),
        (JobKind::CopyDatabases, _) => ("copy-databases", "Copy Databases Between Instances"),
        (JobKind::Notify, _) => ("notify", "Notification"),
    };
    (key.into(), label.into())
}

/// Whether a job of `kind` can have the task type `key`, whatever its set's mode.
fn could_be(kind: JobKind, key: &str) -> bool {
    [None, Some(BackupMode::Manual), Some(BackupMode::Automated)]
        .into_iter()
        .any(|mode| task_type(kind, mode).0 == key)
}

/// One row, as the page shows it and the poll returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    pub id: JobId,
    pub instance: InstanceId,
    #[serde(rename = "type")]
    pub kind: String,
    pub type_label: String,
    pub state: &'static str,
    pub status: &'static str,
    pub status_label: &'static str,
    pub progress: u8,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub backup_id: Option<BackupId>,
    pub error: Option<String>,
    pub detail: String,
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn to_task(job: &Job, mode: Option<BackupMode>) -> Task {
    let (kind, type_label) = task_type(job.kind, mode);
    let (status, status_label) = status_group(job.state);
    Task {
        id: job.id,
        instance: job.instance_id.clone().unwrap_or_default(),
        kind,
        type_label,
        state: job.state.as_str(),
        status,
        status_label,
        progress: job.progress,
        started_at: iso(job.started_at),
        finished_at: job.finished_at.map(iso),
        backup_id: job.backup_id.clone(),
        error: job.error.clone(),
        detail: job.detail.clone(),
    }
}

/// What the Task Center shows: the newest [`SHOWN`] tasks matching
/// `filter`, and every job kind in the catalog (for the type filter).
struct Listing {
    tasks: Vec<Task>,
    kinds: Vec<JobKind>,
}

/// `jobs` are every job in the catalog; `backup_mode` looks up the mode of a
/// backup set by id.
fn listing(
    mut jobs: Vec<Job>,
    backup_mode: impl Fn(&str) -> Option<BackupMode>,
    filter: &Filter,
) -> Listing {
    jobs.sort_by_key(|j| std::cmp::Reverse(j.id));
    let mut kinds: Vec<JobKind> = Vec::new();
    let mut tasks = Vec::new();
    for j in &jobs {
        if !kinds.contains(&j.kind) {
            kinds.push(j.kind);
        }
        let (status, _) = status_group(j.state);
        let instance = j.instance_id.as_deref().unwrap_or_default();
        if tasks.len() == SHOWN
            || (!filter.status.is_empty() && filter.status != status)
            || (!filter.instance.is_empty() && filter.instance != instance)
        {
            continue;
        }
        // A job whose kind cannot have the type asked for is passed over before its set is
        // looked up: a filter matching few jobs must not cost a lookup per job ever run.
        if !filter.kind.is_empty() && !could_be(j.kind, &filter.kind) {
            continue;
        }
        // Backups are typed by their set's mode: one lookup per job shown.
        let mode = match (j.kind, &j.backup_id) {
            (JobKind::Backup | JobKind::SnapshotBackup, Some(b)) => backup_mode(b),
            _ => None,
        };
        let task = to_task(j, mode);
        if filter.kind.is_empty() || task.kind == filter.kind {
            tasks.push(task);
        }
    }
    Listing { tasks, kinds }
}

/// `GET /console/tasks`.
pub async fn page(
    State(state): State<Arc<ConsoleState>>,
    page: Page,
    Query(filter): Query<Filter>,
) -> Response {
    let svc = &state.service;
    // Catalog reads block: off the runtime's workers, which also drive WAL receivers.
    let read = strata_api::off_the_workers(|| match (svc.jobs(None), svc.instances()) {
        (Ok(jobs), Ok(instances)) => Ok((
            listing(jobs, |b| svc.backup_set(b).ok().map(|b| b.mode), &filter),
            instances,
        )),
        (Err(e), _) | (_, Err(e)) => Err(e),
    });
    let body = match read {
        Ok((listing, instances)) => {
            let ids: Vec<InstanceId> = instances.into_iter().map(|i| i.id).collect();
            center(&listing, &filter, &ids)
        }
        Err(e) => layout::error_box("The tasks could not be read:", &e.into()),
    };
    html_response(
        StatusCode::OK,
        layout::page(
            "Task Center",
            Some(&page.who),
            Section::Tasks,
            page.flash,
            body,
        ),
    )
}

/// `GET /console/api/tasks`: the rows the page would show now.
pub async fn json(
    State(state): State<Arc<ConsoleState>>,
    headers: HeaderMap,
    Query(filter): Query<Filter>,
) -> Response {
    let svc = &state.service;
    if strata_api::off_the_workers(|| state.sessions.get(&headers, svc.catalog())).is_none() {
        return json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "The session ended: sign in again."}),
        );
    }
    let read = strata_api::off_the_workers(|| {
        svc.jobs(None)
            .map(|jobs| listing(jobs, |b| svc.backup_set(b).ok().map(|b| b.mode), &filter))
    });
    match read {
        Ok(listing) => json_response(
            StatusCode::OK,
            serde_json::json!({ "tasks": listing.tasks }),
        ),
        Err(e) => {
            let e = strata_api::ApiError::from(e);
            json_response(
                e.status,
                serde_json::json!({"error": e.message, "code": e.code}),
            )
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn select(name: &str, label: &str, current: &str, options: &[(String, String)]) -> Markup {
    html! {
        label.field {
            span { (label) }
            select name=(name) {
                option value="" selected[current.is_empty()] { "All" }
                @for (k, v) in options {
                    option value=(k) selected[current == k] { (v) }
                }
            }
        }
    }
}

fn center(listing: &Listing, filter: &Filter, instances: &[InstanceId]) -> Markup {
    let mut types: Vec<(String, String)> = vec![
        task_type(JobKind::Backup, Some(BackupMode::Manual)),
        task_type(JobKind::Backup, Some(BackupMode::Automated)),
        task_type(JobKind::Restore, None),
    ];
    for &kind in &listing.kinds {
        let modes: &[Option<BackupMode>] = match kind {
            JobKind::Backup => &[],
            JobKind::SnapshotBackup => &[Some(BackupMode::Manual), Some(BackupMode::Automated)],
            _ => &[None],
        };
        for &mode in modes {
            let t = task_type(kind, mode);
            if !types.contains(&t) {
                types.push(t);
            }
        }
    }
    let statuses: Vec<(String, String)> = STATUSES
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let instance_options: Vec<(String, String)> = instances
        .iter()
        .map(|i| (i.to_string(), i.to_string()))
        .collect();
    let shown = &listing.tasks;
    html! {
        div.pagehead {
            div {
                h1 { "Task Center" }
                p.muted { "Backups and restores of every instance. "
                    span #live.live aria-live="polite" { "Progress updates by itself." } }
            }
        }
        form.filters method="get" action="/console/tasks" {
            (select("type", "Task type", &filter.kind, &types))
            (select("status", "Status", &filter.status, &statuses))
            (select("instance", "Instance", &filter.instance, &instance_options))
            button.secondary type="submit" { "Filter" }
            @if !filter.kind.is_empty() || !filter.status.is_empty() || !filter.instance.is_empty() {
                a.button.ghost href="/console/tasks" { "Clear" }
            }
        }
        div.card.tablewrap {
            table.data.sortable #tasks data-poll="/console/api/tasks" {
                thead { tr {
                    (sort_th("Task ID", "num"))
                    (sort_th("Instance", "text"))
                    (sort_th("Task type", "text"))
                    (sort_th("Status", "text"))
                    (sort_th("Progress", "num"))
                    (sort_th("Started", "num"))
                    (sort_th("Finished", "num"))
                    th scope="col" { "Details" }
                } }
                tbody {
                    @for t in shown {
                        (row(Some(t)))
                    }
                }
            }
            p.empty #tasks-empty hidden[!shown.is_empty()] { "No tasks match these filters." }
            template #task-row { (row(None)) }
        }
    }
}

/// A task row; with `None`, the empty row the script fills for new tasks.
/// Cells carry `data-f` names the script fills from the poll's JSON.
fn row(t: Option<&Task>) -> Markup {
    let started = t.and_then(|t| layout::parse_api_time(&t.started_at));
    let finished = t
        .and_then(|t| t.finished_at.as_deref())
        .and_then(layout::parse_api_time);
    let status_kind = t.map(|t| layout::state_kind(t.state)).unwrap_or("neutral");
    let (detail, failed) = match t {
        Some(Task { error: Some(e), .. }) => (e.clone(), true),
        Some(Task {
            backup_id: Some(b), ..
        }) => (format!("Backup set {b}"), false),
        Some(t) => (t.detail.clone(), false),
        None => (String::new(), false),
    };
    html! {
        tr data-task=[t.map(|t| t.id)] data-status=[t.map(|t| t.status)] {
            td data-f="id" data-v=[t.map(|t| t.id)] { @if let Some(t) = t { (t.id) } }
            td data-f="instance" data-v=[t.map(|t| &t.instance)] {
                a href=[t.map(|t| format!("/console/instances/{}/backups", url_encode(&t.instance)))] {
                    @if let Some(t) = t { (t.instance) }
                }
            }
            td data-f="type" data-v=[t.map(|t| &t.type_label)] { @if let Some(t) = t { (t.type_label) } }
            td data-f="status" data-v=[t.map(|t| t.status_label)] {
                span class=(format!("badge {status_kind}")) { @if let Some(t) = t { (t.status_label) } }
                span.sub.state { @if let Some(t) = t { (t.state) } }
            }
            td data-f="progress" data-v=[t.map(|t| t.progress)] {
                progress max="100" value=(t.map(|t| t.progress).unwrap_or(0)) {}
                span.pct { @if let Some(t) = t { (t.progress) "%" } }
            }
            td data-f="started" data-v=(layout::sort_time(started)) {
                @if let Some(s) = started { (layout::time(s)) }
            }
            td data-f="finished" data-v=(layout::sort_time(finished)) {
                @match finished {
                    Some(f) => { (layout::time(f)) }
                    None => { span.muted { "—" } }
                }
            }
            td data-f="detail" .err-text[failed] { (detail) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_fall_into_rds_status_groups() {
        assert_eq!(status_group(JobState::NoStart).1, "Pending Execution");
        for s in [
            JobState::Preparing,
            JobState::Waiting,
            JobState::Uploading,
            JobState::Checking,
        ] {
            assert_eq!(status_group(s).1, "In Progress");
        }
        assert_eq!(status_group(JobState::Finished).0, "finished");
        assert_eq!(status_group(JobState::Failed).0, "failed");
    }

    #[test]
    fn listing_filters_by_type_status_and_instance() {
        use strata_catalog::prelude::*;
        use strata_catalog::{BackupSet, BackupStatus, Instance, SqliteCatalog, SslMode};
        let catalog = SqliteCatalog::open_in_memory().unwrap();
        let now = chrono::Utc::now();
        for id in ["a", "b"] {
            catalog
                .add_instance(&Instance {
                    created_at: now,
                    ..Instance::new(id, "127.0.0.1", 5432, "postgres", SslMode::Disable)
                })
                .unwrap();
        }
        let backup_of = |kind: JobKind, instance: &str, set: &str, mode: BackupMode, state| {
            let mut row = BackupSet::started(set.into(), instance, mode, now, None);
            // The set stands where its job does: one runs per instance.
            row.status = match state {
                JobState::Finished => BackupStatus::Success,
                JobState::Failed => BackupStatus::Failed,
                _ => BackupStatus::Running,
            };
            catalog.insert_backup(&row).unwrap();
            let mut job = catalog.create_job(kind, Some(instance)).unwrap();
            job.backup_id = Some(set.into());
            job.state = state;
            catalog.update_job(&job).unwrap();
            job.id
        };
        let backup = |instance: &str, set: &str, mode: BackupMode, state: JobState| {
            backup_of(JobKind::Backup, instance, set, mode, state)
        };
        let auto = backup("a", "1", BackupMode::Automated, JobState::Finished);
        let manual = backup("a", "2", BackupMode::Manual, JobState::Uploading);
        let other = backup("b", "3", BackupMode::Manual, JobState::Failed);
        let ids = |f: Filter| -> Vec<JobId> {
            listing(
                catalog.list_jobs(None).unwrap(),
                |b| catalog.get_backup(b).ok().map(|b| b.mode),
                &f,
            )
            .tasks
            .iter()
            .map(|t| t.id)
            .collect()
        };
        // A snapshot the scheduler took is typed by its set's mode as a physical backup is.
        let snapshot = backup_of(
            JobKind::SnapshotBackup,
            "b",
            "4",
            BackupMode::Automated,
            JobState::Finished,
        );
        assert_eq!(ids(Filter::default()), [snapshot, other, manual, auto]);
        let auto_snapshots = Filter {
            kind: "auto-snapshot".into(),
            ..Filter::default()
        };
        assert_eq!(ids(auto_snapshots), [snapshot]);
        let kind = |k: &str| Filter {
            kind: k.into(),
            ..Filter::default()
        };
        assert_eq!(ids(kind("manual-backup")), [other, manual]);
        assert_eq!(ids(kind("auto-backup")), [auto]);
        let status = |s: &str| Filter {
            status: s.into(),
            ..Filter::default()
        };
        assert_eq!(ids(status("progress")), [manual]);
        assert_eq!(ids(status("failed")), [other]);
        assert!(ids(status("pending")).is_empty());
        let instance = Filter {
            instance: "b".into(),
            ..Filter::default()
        };
        assert_eq!(ids(instance), [snapshot, other]);

        // A type no backup can have looks no set up, however many backups there are.
        let lookups = std::cell::Cell::new(0);
        let notify = listing(
            catalog.list_jobs(None).unwrap(),
            |b| {
                lookups.set(lookups.get() + 1);
                catalog.get_backup(b).ok().map(|b| b.mode)
            },
            &kind("notify"),
        );
        assert!(notify.tasks.is_empty());
        assert_eq!(lookups.get(), 0);
        // A backup type looks up only the jobs of kinds that can have it.
        lookups.set(0);
        let autos = listing(
            catalog.list_jobs(None).unwrap(),
            |b| {
                lookups.set(lookups.get() + 1);
                catalog.get_backup(b).ok().map(|b| b.mode)
            },
            &kind("auto-snapshot"),
        );
        assert_eq!(autos.tasks.len(), 1);
        assert_eq!(lookups.get(), 1);
    }

    #[test]
    fn task_types_name_backups_by_mode() {
        assert_eq!(
            task_type(JobKind::Backup, Some(BackupMode::Manual)).1,
            "Manually Back Up Instance"
        );
        assert_eq!(task_type(JobKind::Backup, None).0, "manual-backup");
        assert_eq!(
            task_type(JobKind::Backup, Some(BackupMode::Automated)).1,
            "Automatic Backup"
        );
        assert_eq!(task_type(JobKind::Clone, None).1, "Clone to New Instance");
        assert_eq!(
            task_type(JobKind::RestoreTable, None).1,
            "Restore Databases or Tables"
        );
        assert_eq!(task_type(JobKind::CrossCopy, None).1, "Cross-Region Backup");
        assert_eq!(
            task_type(JobKind::SnapshotBackup, Some(BackupMode::Automated)).0,
            "auto-snapshot"
        );
        assert_eq!(
            task_type(JobKind::SnapshotBackup, None).0,
            "manual-snapshot"
        );
        // Other kinds are keyed by their catalog name.
        let by_mode = [JobKind::Backup, JobKind::SnapshotBackup];
        for kind in JobKind::ALL.into_iter().filter(|k| !by_mode.contains(k)) {
            assert_eq!(task_type(kind, None).0, kind.as_str());
        }
    }
}
