//! The Notifications page: the configured sinks (kind and target, never a
//! secret: see `strata_notify::Sink::target`), which instances and events
//! each receives, the recent deliveries (the `notify` jobs of the Task
//! Center) and a "Send test" per sink, the console's `strata notify test`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup};
use strata_catalog::{Job, JobKind};
use strata_notify::Sink;

use crate::layout::{self, badge, state_kind, time, Section};
use crate::session::{Flash, Signed};
use crate::{csrf_ok, csrf_refused, html_response, ConsoleState, Fields, Page};

/// Where the page lives.
const PAGE: &str = "/console/notifications";

/// Deliveries the page lists, newest first.
const RECENT: usize = 50;

/// `GET /console/notifications`.
pub async fn page(State(state): State<Arc<ConsoleState>>, page: Page) -> Response {
    // A catalog read: on the blocking pool.
    let reader = Arc::clone(&state);
    let jobs = tokio::task::spawn_blocking(move || {
        reader
            .service
            .catalog()
            .newest_jobs(JobKind::Notify, RECENT)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("reading the deliveries stopped: {e}")));
    let body = html! {
        div.pagehead {
            div {
                h1 { "Notifications" }
                p.muted {
                    "Where Strata reports failed backups and drills, failing WAL receivers, overdue backups, "
                    "storage above the free quota and failing cross-region copies. Sinks are set in the "
                    "configuration file ([[notify.webhook]], [[notify.email]]); secrets are never shown."
                }
            }
        }
        (sinks(state.service.notifier().sinks(), &page.who))
        h2 { "Recent deliveries" }
        @match jobs {
            Ok(jobs) => (deliveries(&jobs)),
            Err(e) => div.notice.err role="alert" { "The deliveries could not be read: " (e) },
        }
    };
    html_response(
        StatusCode::OK,
        layout::page(
            "Notifications",
            Some(&page.who),
            Section::Notifications,
            page.flash,
            body,
        ),
    )
}

/// "all" for an empty filter, else the names joined.
fn filter(names: &[String]) -> Markup {
    if names.is_empty() {
        html! { span.muted { "all" } }
    } else {
        html! { (names.join(", ")) }
    }
}

fn sinks(sinks: &[Sink], who: &Signed) -> Markup {
    if sinks.is_empty() {
        return html! {
            div.card #sinks { p.muted { "No sink is configured: notifications are off." } }
        };
    }
    html! {
        div.card.tablewrap {
            table.data #sinks {
                thead { tr {
                    th scope="col" { "Sink" }
                    th scope="col" { "Kind" }
                    th scope="col" { "Target" }
                    th scope="col" { "Instances" }
                    th scope="col" { "Events" }
                    @if !who.read_only { th scope="col" { "Test" } }
                } }
                tbody {
                    @for s in sinks {
                        @let route = s.route();
                        @let events: Vec<String> = route.events.iter().map(|e| e.to_string()).collect();
                        tr data-sink=(s.name()) {
                            td { (s.name()) }
                            td { (s.kind()) }
                            td.target { code { (s.target()) } }
                            td.instances { (filter(&route.instances)) }
                            td.events { (filter(&events)) }
                            @if !who.read_only {
                                td {
                                    form method="post" action=(format!("{PAGE}/test")) {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="sink" value=(s.name());
                                        button type="submit" { "Send test" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn deliveries(jobs: &[Job]) -> Markup {
    if jobs.is_empty() {
        return html! { div.card #deliveries { p.muted { "Nothing was delivered yet." } } };
    }
    html! {
        div.card.tablewrap {
            table.data #deliveries {
                thead { tr {
                    th scope="col" { "Task" }
                    th scope="col" { "Started" }
                    th scope="col" { "Instance" }
                    th scope="col" { "Delivery" }
                    th scope="col" { "Outcome" }
                } }
                tbody {
                    @for j in jobs {
                        tr data-job=(j.id.get()) {
                            td { (j.id) }
                            td { (time(j.started_at)) }
                            td { (j.instance_id.as_deref().unwrap_or("—")) }
                            td { (j.detail) }
                            td {
                                (badge(state_kind(j.state.as_str()), j.state.as_str()))
                                @if let Some(e) = &j.error { " " span.muted { (e) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `POST /console/notifications/test`: a test event to one sink; the
/// outcome comes back as the page's one-time message.
pub async fn send_test(
    State(state): State<Arc<ConsoleState>>,
    page: Page,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let form = Fields(form);
    if !csrf_ok(&page.who, &form) {
        return csrf_refused(&page.who);
    }
    let name = form.get("sink");
    let flash = if page.who.read_only {
        Flash::Failed {
            text: "A read-only AccessKey cannot send test notifications.".into(),
            code: "Forbidden.ReadOnlyAccessKey".into(),
        }
    } else {
        match state
            .service
            .send_test_notification(name, "the Strata console")
            .await
        {
            None => Flash::Failed {
                text: format!("There is no notification sink named {name:?}."),
                code: "InvalidParameter".into(),
            },
            Some(Ok(done)) => Flash::Done {
                text: format!(
                    "Test notification delivered to {name}: {} after {} attempt(s).",
                    done.answer, done.attempts
                ),
                link: Some((
                    "/console/tasks".into(),
                    "It is recorded in the Task Center".into(),
                )),
            },
            Some(Err(e)) => Flash::Failed {
                text: format!("The test notification to {name} failed: {e}"),
                code: "NotificationFailed".into(),
            },
        }
    };
    state.flash(&page.who, flash);
    Redirect::to(PAGE).into_response()
}
