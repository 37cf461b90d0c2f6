//! The Instances page: every registered server with its address, version,
//! state, last backup, recoverable window, the storage its backups use and
//! the node that owns it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};
use strata_catalog::{BackupStatus, Instance, ManagedInstance};

use crate::layout::{self, badge, bytes, sort_th, state_kind, time, Section};
use crate::{html_response, url_encode, ConsoleState, Page};

/// What the list shows of one instance.
struct Row {
    instance: Instance,
    backing_up: Option<u8>,
    /// For instances Strata created: their state, error and source.
    managed: Option<ManagedInstance>,
    /// `Running`, `Unreachable` (since when and why) or a managed state.
    state: strata_api::InstanceState,
    receiver: String,
    /// The node holding its ownership lease (empty while none does).
    node: String,
    last_backup: Option<chrono::DateTime<chrono::Utc>>,
    window: Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>,
    log_on: bool,
    data_bytes: u64,
    log_bytes: u64,
}

fn row(
    state: &ConsoleState,
    instance: Instance,
    owners: &std::collections::BTreeMap<String, String>,
) -> Result<Row, strata_api::ApiError> {
    let svc = &state.service;
    let backups = svc.backup_sets(&instance.id)?;
    let running = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Running)
        .find_map(|b| b.job_id)
        .or_else(|| svc.running_backup_job(&instance.id));
    let backing_up = running
        .and_then(|j| svc.job(j).ok())
        .filter(|j| !j.state.is_terminal())
        .map(|j| j.progress);
    let last_backup = backups
        .iter()
        .filter(|b| b.status == BackupStatus::Success)
        .filter_map(|b| b.finished_at)
        .max();
    let usage = crate::storage::current(svc, &instance.id)?;
    Ok(Row {
        receiver: strata_api::receiver_status(svc, &instance.id)?,
        state: strata_api::instance_state(svc, &instance)?,
        node: owners
            .get(instance.id.as_str())
            .cloned()
            .unwrap_or_default(),
        window: svc.recovery_window(&instance.id)?,
        log_on: svc.policy(&instance.id)?.log_backup_enabled,
        backing_up,
        managed: svc.managed_instance(&instance.id)?,
        last_backup,
        data_bytes: usage.data_bytes,
        log_bytes: usage.wal_bytes,
        instance,
    })
}

/// `GET /console/`.
pub async fn page(State(state): State<Arc<ConsoleState>>, page: Page) -> Response {
    // Catalog reads, and a repository walk for storage figures before the
    // first usage sample: on the blocking pool.
    let reader = Arc::clone(&state);
    let rows = tokio::task::spawn_blocking(move || {
        let owners = reader
            .service
            .instance_owners()
            .map_err(strata_api::ApiError::from)?;
        reader
            .service
            .instances()
            .map_err(strata_api::ApiError::from)
            .and_then(|list| {
                list.into_iter()
                    .map(|i| row(&reader, i, &owners))
                    .collect::<Result<Vec<_>, _>>()
            })
    })
    .await
    .unwrap_or_else(|e| {
        Err(strata_api::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("reading the instances stopped: {e}"),
        ))
    });
    let body = match rows {
        Ok(rows) => list(&rows),
        Err(e) => layout::error_box("The instances could not be read:", &e),
    };
    html_response(
        StatusCode::OK,
        layout::page(
            "Instances",
            Some(&page.who),
            Section::Instances,
            page.flash,
            body,
        ),
    )
}

fn list(rows: &[Row]) -> Markup {
    html! {
        div.pagehead {
            div {
                h1 { "Instances" }
                p.muted { (rows.len()) " PostgreSQL " (if rows.len() == 1 { "server" } else { "servers" }) " backed up by this Strata" }
            }
        }
        @if rows.is_empty() {
            div.empty {
                p { "No instances yet." }
                p.muted { "Register a server with " code { "strata instance add ID --host H --user U" }
                    " or the API action " code { "StrataRegisterDBInstance" } "; its first backup starts at once." }
            }
        } @else {
            div.card.tablewrap {
                table.data.sortable #instances {
                    thead { tr {
                        (sort_th("Instance ID", "text"))
                        (sort_th("Address", "text"))
                        (sort_th("PostgreSQL", "version"))
                        (sort_th("Status", "text"))
                        (sort_th("Last backup", "num"))
                        (sort_th("Recoverable window", "num"))
                        (sort_th("Storage used", "num"))
                        (sort_th("Node", "text"))
                    } }
                    tbody {
                        @for r in rows {
                            (instance_row(r))
                        }
                    }
                }
            }
        }
    }
}

fn instance_row(r: &Row) -> Markup {
    let i = &r.instance;
    let href = format!("/console/instances/{}/backups", url_encode(&i.id));
    let status = r.state.status.as_str();
    html! {
        tr data-instance=(i.id) {
            td data-v=(i.id) { a.strong href=(href) { (i.id) } }
            td data-v=(format!("{}:{}", i.host, i.port)) { code { (i.host) ":" (i.port) } }
            td data-v=(i.pg_version_num.unwrap_or(0)) { (layout::pg_version(i.pg_version_num)) }
            td data-v=(status) {
                @match (r.backing_up, status) {
                    (Some(p), "Running") => { (badge("info", &format!("Backing up {p}%"))) }
                    (_, "Running") => { (badge("ok", "Running")) }
                    (_, other) => { (badge(state_kind(other), other)) }
                }
                @if let Some((since, why)) = &r.state.unreachable {
                    div.sub {
                        "since " (time(*since))
                        div.err-text { (why) }
                    }
                }
                @if let Some(m) = &r.managed {
                    div.sub {
                        "Clone of " (m.source_instance)
                        @if let Some(e) = &m.error { div.err-text { (e) } }
                    }
                }
                div.sub {
                    "Log backup: "
                    span class=(format!("dot {}", state_kind(&r.receiver))) {}
                    span title=(r.receiver) { (r.receiver.split(':').next().unwrap_or("")) }
                }
            }
            td data-v=(layout::sort_time(r.last_backup)) {
                @match r.last_backup {
                    Some(t) => { (time(t)) }
                    None => { span.muted { "None yet" } }
                }
            }
            td data-v=(layout::sort_time(r.window.map(|w| w.0))) {
                @match (r.window, r.log_on) {
                    (Some((from, to)), _) => { (time(from)) span.muted { " – " } (time(to)) }
                    (None, false) => { span.muted { "Log backup off" } }
                    (None, true) => { span.muted { "After the first backup" } }
                }
            }
            td data-v=(r.data_bytes + r.log_bytes) {
                (bytes(r.data_bytes + r.log_bytes))
                div.sub { "data " (bytes(r.data_bytes)) " · log " (bytes(r.log_bytes)) }
            }
            td data-v=(r.node) {
                @if r.node.is_empty() { span.muted { "None yet" } } @else { code { (r.node) } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use strata_catalog::SslMode;

    fn row(state: strata_api::InstanceState, receiver: &str) -> Row {
        Row {
            instance: Instance::new("pg-1", "10.0.0.7", 5432, "postgres", SslMode::Disable),
            backing_up: None,
            managed: None,
            state,
            receiver: receiver.into(),
            node: "node-a".into(),
            last_backup: None,
            window: None,
            log_on: true,
            data_bytes: 0,
            log_bytes: 0,
        }
    }

    #[test]
    fn a_server_that_cannot_be_reached_is_listed_as_such_with_why_and_since_when() {
        let since = chrono::Utc
            .with_ymd_and_hms(2026, 12, 6, 18, 51, 52)
            .unwrap();
        let why = "cannot reach instance pg-1 (10.0.0.7:5432 as postgres): Connection refused";
        let html = instance_row(&row(
            strata_api::InstanceState {
                status: "Unreachable".into(),
                unreachable: Some((since, why.into())),
            },
            &format!("Failing: {why}"),
        ))
        .into_string();
        assert!(
            html.contains(r#"<span class="badge err">Unreachable</span>"#),
            "{html}"
        );
        assert!(html.contains("2026-12-06 18:51:52 UTC"), "{html}");
        assert!(html.contains(why), "{html}");
        assert!(!html.contains("Running"), "{html}");

        let html = instance_row(&row(
            strata_api::InstanceState {
                status: "Running".into(),
                unreachable: None,
            },
            "Streaming",
        ))
        .into_string();
        assert!(
            html.contains("Running") && !html.contains("Unreachable"),
            "{html}"
        );
    }
}
